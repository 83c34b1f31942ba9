//! `tb-tool`'s command line after the global options, derived from each tool's schema, so every
//! tool (an external `tb-tool-NAME` too) has a shell form without code of its own:
//!
//! ```text
//! tb-tool TOOL [ACTION] [--ARG VALUE]... [WORDS]... [--json]
//! tb-tool call TOOL [ARGS_JSON] [--json]
//! tb-tool list [--prompt]
//! ```
//!
//! * ACTION is the first word when the schema has an `action` enum.
//! * A property applies to an action when its description starts with that action's name
//!   (`"add: what to do"`, `"search, list: at most this many"`); one without such a prefix
//!   applies to every action. Each applicable property is a flag `--NAME VALUE`: integers and
//!   numbers are parsed, an array takes the flag once per item, under its name or its singular
//!   (`--tag` for `tags`) unless that is a property of the action itself.
//! * The WORDS, joined by spaces, fill the one argument of the action still missing: a string or
//!   integer property whose description says neither "default" nor "optional". `--` ends the
//!   flags (an expression such as `-3+4`).

use super::{Registry, Tool, render_plain, run_stream};
use crate::error::{Error, Result};
use crate::output::stdout_err;
use serde_json::{Map, Value, json};
use std::io::{BufRead, Write};

/// What the words after the global options ask for.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// No words: JSON Lines calls on stdin.
    Stream,
    /// `list`, or `list --prompt`.
    List { prompt: bool },
    /// One call; `json`: print the protocol record instead of the tool's text.
    Call {
        tool: String,
        args: Value,
        json: bool,
    },
    /// `--help` after a command: its usage.
    Help(String),
}

const JSON_HELP: &str =
    "print the JSON record ({\"tool\":...,\"ok\":...,\"result\":...}) instead of text";
const HELP_HELP: &str = "display usage information";

/// Parses the words after the global options.
pub fn parse(reg: &Registry, words: &[String]) -> Result<Command> {
    let Some((first, rest)) = words.split_first() else {
        return Ok(Command::Stream);
    };
    let help = rest.iter().any(|w| w == "--help");
    match first.as_str() {
        "list" if help => Ok(Command::Help(usage(
            "tb-tool list [--prompt]",
            "List the tools with their descriptions and argument schemas, one JSON object per line.",
            &[(
                "--prompt".into(),
                "print the tool lines of the model's prompt instead: name(arg: type, ...) - description".into(),
            )],
        ))),
        "list" => match rest {
            [] => Ok(Command::List { prompt: false }),
            [p] if p == "--prompt" => Ok(Command::List { prompt: true }),
            _ => Err(Error::usage(format!(
                "list takes only --prompt, not {}",
                rest.join(" ")
            ))),
        },
        "call" if help => Ok(Command::Help(usage(
            "tb-tool call TOOL [ARGS_JSON] [--json]",
            "Call any tool, external ones too, with a JSON argument object (default {}).",
            &[],
        ))),
        "call" => {
            let json = rest.iter().any(|w| w == "--json");
            match rest.iter().filter(|w| *w != "--json").collect::<Vec<_>>()[..] {
                [tool] => call(tool, "{}", json),
                [tool, args] => call(tool, args, json),
                _ => Err(Error::usage("call takes TOOL and an optional JSON argument object")),
            }
        }
        name => {
            let tool = reg.get(name).ok_or_else(|| {
                Error::usage(format!(
                    "unknown command or tool '{name}'; tools: {} (tb-tool --help)",
                    reg.names().join(", ")
                ))
            })?;
            let form = Form::of(tool, rest)?;
            if help {
                return Ok(Command::Help(form.help(tool)));
            }
            form.parse(tool, &rest[form.action.is_some() as usize..])
        }
    }
}

/// Runs a command: a failed call (or any failed call of a stream) is `Error::Failed`, exit 1.
pub fn run(reg: &Registry, cmd: Command, input: impl BufRead, mut out: impl Write) -> Result<()> {
    match cmd {
        Command::Stream => match run_stream(reg, input, out)? {
            s if s.failed == 0 => Ok(()),
            s => Err(Error::Failed(format!(
                "{} of {} calls failed (their records say why)",
                s.failed, s.lines
            ))),
        },
        Command::Help(text) => write!(out, "{text}").map_err(stdout_err),
        Command::List { prompt: true } => {
            writeln!(out, "{}", reg.prompt_lines()).map_err(stdout_err)
        }
        Command::List { prompt: false } => reg
            .list()
            .iter()
            .try_for_each(|t| writeln!(out, "{t}"))
            .map_err(stdout_err),
        Command::Call { tool, args, json } => {
            let record = reg.call_json_line(&json!({"tool": tool, "args": args}).to_string(), 1);
            // With --json the record is printed even when the call failed.
            let text = match &record.outcome {
                _ if json => record.to_json_line(),
                Ok(result) => reg.get(&tool).map(|t| t.render(result)).unwrap_or_default(),
                Err(_) => String::new(),
            };
            if !text.is_empty() {
                writeln!(out, "{text}").map_err(stdout_err)?;
            }
            record.outcome.map(drop).map_err(Error::Failed)
        }
    }
}

fn call(tool: &str, args: &str, json: bool) -> Result<Command> {
    let args = serde_json::from_str(args)
        .map_err(|e| Error::usage(format!("call {tool}: the arguments are not JSON ({e})")))?;
    Ok(Command::Call {
        tool: tool.to_string(),
        args,
        json,
    })
}

/// One tool's shell form: its action (when it has actions) and the properties that apply.
struct Form {
    actions: Vec<String>,
    action: Option<String>,
    /// (name, schema) of each applicable property but `action`.
    props: Vec<(String, Value)>,
}

impl Form {
    fn of(tool: &dyn Tool, rest: &[String]) -> Result<Form> {
        let schema = tool.schema();
        let all = schema
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let actions: Vec<String> = all
            .get("action")
            .and_then(|a| a.get("enum"))
            .and_then(Value::as_array)
            .map(|e| e.iter().map(render_plain).collect())
            .unwrap_or_default();
        let action = match rest.first() {
            Some(a) if actions.contains(a) => Some(a.clone()),
            Some(h) if h == "--help" => None,
            _ if actions.is_empty() => None,
            other => {
                return Err(Error::usage(format!(
                    "{}: {} is not an action; give one of {}",
                    tool.name(),
                    other.map_or("nothing", |s| s.as_str()),
                    actions.join(", ")
                )));
            }
        };
        let applies = |desc: &str| match desc.split_once(':') {
            Some((names, _)) if names.split(", ").all(|n| actions.iter().any(|a| a == n)) => action
                .as_ref()
                .is_none_or(|a| names.split(", ").any(|n| n == a)),
            _ => true,
        };
        let props = all
            .into_iter()
            .filter(|(name, p)| name != "action" && applies(describe(p)))
            .collect();
        Ok(Form {
            actions,
            action,
            props,
        })
    }

    /// The property a flag names: itself, or an array property under its singular.
    fn flag(&self, flag: &str) -> Option<&(String, Value)> {
        let exact = self.props.iter().find(|(n, _)| n == flag);
        exact.or_else(|| {
            self.props
                .iter()
                .find(|(n, p)| n.strip_suffix('s') == Some(flag) && is_array(p))
        })
    }

    fn parse(&self, tool: &dyn Tool, rest: &[String]) -> Result<Command> {
        let name = match &self.action {
            Some(a) => format!("{} {a}", tool.name()),
            None => tool.name().to_string(),
        };
        let mut args = Map::new();
        let (mut words, mut json, mut flags_end) = (Vec::new(), false, false);
        let mut it = rest.iter();
        while let Some(w) = it.next() {
            let Some(flag) = w.strip_prefix("--").filter(|_| !flags_end) else {
                words.push(w.as_str());
                continue;
            };
            match flag {
                "" => flags_end = true,
                "json" => json = true,
                _ => {
                    let (key, prop) = self.flag(flag).ok_or_else(|| {
                        Error::usage(format!("{name} has no --{flag}; {}", self.flag_list()))
                    })?;
                    let value = it
                        .next()
                        .ok_or_else(|| Error::usage(format!("{name}: --{flag} needs a value")))?;
                    let v = typed(prop, value)
                        .map_err(|e| Error::usage(format!("{name}: --{flag}: {e}")))?;
                    if !is_array(prop) {
                        args.insert(key.clone(), v);
                    } else if let Value::Array(items) = args.entry(key.clone()).or_insert(json!([]))
                    {
                        items.push(v);
                    }
                }
            }
        }
        if !words.is_empty() {
            let open: Vec<&(String, Value)> = self
                .props
                .iter()
                .filter(|(n, p)| !args.contains_key(n) && takes_words(p))
                .collect();
            let [(key, prop)] = open[..] else {
                return Err(Error::usage(format!(
                    "{name}: the words '{}' fill no argument here ({})",
                    words.join(" "),
                    match open.len() {
                        0 => "none is left".to_string(),
                        _ => format!(
                            "give all but one of --{} as flags",
                            names(&open).join(", --")
                        ),
                    }
                )));
            };
            let v =
                typed(prop, &words.join(" ")).map_err(|e| Error::usage(format!("{name}: {e}")))?;
            args.insert(key.clone(), v);
        }
        if let Some(a) = &self.action {
            args.insert("action".into(), json!(a));
        }
        Ok(Command::Call {
            tool: tool.name().to_string(),
            args: Value::Object(args),
            json,
        })
    }

    fn flag_list(&self) -> String {
        match self.props.len() {
            0 => "it takes no arguments".into(),
            _ => format!(
                "its arguments: --{}",
                names(&self.props.iter().collect::<Vec<_>>()).join(", --")
            ),
        }
    }

    fn help(&self, tool: &dyn Tool) -> String {
        let head = match (&self.action, self.actions.is_empty()) {
            (Some(a), _) => format!("tb-tool {} {a}", tool.name()),
            (None, true) => format!("tb-tool {}", tool.name()),
            (None, false) => format!("tb-tool {} ACTION", tool.name()),
        };
        let mut about = tool.description().to_string();
        if self.action.is_none() && !self.actions.is_empty() {
            about += &format!("\n\nActions: {}", self.actions.join(", "));
        }
        if self.props.iter().any(|(_, p)| takes_words(p)) {
            about += "\n\nThe words after the flags fill the one argument that has no default and is not given as a flag.";
        }
        let flags: Vec<(String, String)> = self
            .props
            .iter()
            .map(|(n, p)| {
                (
                    format!("--{n} {}", n.to_uppercase()),
                    describe(p).to_string(),
                )
            })
            .collect();
        usage(
            &format!("{head} [OPTIONS] [WORDS]... [--json]"),
            &about,
            &flags,
        )
    }
}

fn names<'a>(props: &[&'a (String, Value)]) -> Vec<&'a str> {
    props.iter().map(|(n, _)| n.as_str()).collect()
}

fn describe(p: &Value) -> &str {
    p.get("description").and_then(Value::as_str).unwrap_or("")
}

fn is_array(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some("array")
        || p.get("anyOf")
            .and_then(Value::as_array)
            .is_some_and(|alts| alts.iter().any(is_array))
}

fn takes_words(p: &Value) -> bool {
    let d = describe(p).to_lowercase();
    let kind = p.get("type").and_then(Value::as_str);
    matches!(kind, Some("string" | "integer")) && !d.contains("default") && !d.contains("optional")
}

/// A flag's or the words' text as the property's JSON type.
fn typed(p: &Value, s: &str) -> std::result::Result<Value, String> {
    let kind = p.get("type").and_then(Value::as_str);
    let bad = |what: &str| format!("'{s}' is not {what}");
    Ok(match kind {
        Some("integer") => json!(s.trim().parse::<i64>().map_err(|_| bad("a whole number"))?),
        Some("number") => json!(s.trim().parse::<f64>().map_err(|_| bad("a number"))?),
        Some("boolean") => json!(s.trim().parse::<bool>().map_err(|_| bad("true or false"))?),
        _ => json!(s),
    })
}

/// A help text in argh's layout.
fn usage(line: &str, about: &str, flags: &[(String, String)]) -> String {
    let mut all = flags.to_vec();
    if line.contains("--json") {
        all.push(("--json".into(), JSON_HELP.into()));
    }
    all.push(("--help, -h".into(), HELP_HELP.into()));
    let width = all.iter().map(|(f, _)| f.len()).max().unwrap_or(0);
    let mut out = format!("Usage: {line}\n\n{about}\n\nOptions:\n");
    for (f, d) in all {
        out += &format!("  {f:width$}  {d}\n");
    }
    out
}
