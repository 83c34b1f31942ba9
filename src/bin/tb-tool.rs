//! tb-tool: call tinybit's tools. Bare, it reads JSON Lines calls on stdin and writes one record per
//! line (the protocol of `tinybit::tools`); with a command, it makes one call from the shell.

use argh::FromArgs;
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tinybit::tools::{Options, Registry, run_stream};
use tinybit::{Error, Result, cli::stdout_err};

#[derive(FromArgs, argh::ArgsInfo)]
/// Call tinybit's tools. Without a command, read JSON Lines calls such as
/// {"tool":"calculator","args":{"expr":"2^10"}} on stdin and write one result record per line.
struct Cli {
    /// the tool database (default: $TINYBIT_DB, else $XDG_DATA_HOME/tinybit/tools.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// seconds an external tb-tool-NAME may run before it is stopped (default 30)
    #[argh(option, default = "30.0")]
    timeout: f64,
    /// ignore tb-tool-NAME executables on PATH
    #[argh(switch)]
    no_external: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand)]
enum Cmd {
    List(ListCmd),
    Time(TimeCmd),
    Calculator(CalculatorCmd),
    Todos(TodosCmd),
    Notes(NotesCmd),
    Calendar(CalendarCmd),
    Call(CallCmd),
}

/// A one-shot command: `--json` prints the protocol record instead of text.
macro_rules! leaf {
    ($name:ident, $cmd:tt, $doc:tt { $($body:tt)* }) => {
        #[derive(FromArgs, argh::ArgsInfo)]
        #[argh(subcommand, name = $cmd, description = $doc)]
        struct $name {
            /// print the JSON record ({"tool":...,"ok":...,"result":...}) instead of text
            #[argh(switch)]
            json: bool,
            $($body)*
        }
    };
}

#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand, name = "list")]
/// List the tools with their descriptions and argument schemas, one JSON object per line.
struct ListCmd {
    /// print the tool lines of the model's prompt instead: name(arg: type, ...) - description
    #[argh(switch)]
    prompt: bool,
}

leaf!(TimeCmd, "time", "Current date, time, weekday and zone." {
    /// an IANA zone such as Europe/Paris, or utc (default: local)
    #[argh(option)]
    zone: Option<String>,
});
leaf!(CalculatorCmd, "calculator", "Evaluate an arithmetic expression." {
    /// the expression, e.g. '2^10' (or give it as words after the flags)
    #[argh(option)]
    expr: Option<String>,
    #[argh(positional, greedy)]
    words: Vec<String>,
});
leaf!(CallCmd, "call", "Call any tool, external ones too, with a JSON argument object." {
    #[argh(positional)]
    tool: String,
    /// the arguments as a JSON object (default {})
    #[argh(positional, default = "String::from(\"{}\")")]
    args: String,
});

#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand, name = "todos")]
/// The to-do list.
struct TodosCmd {
    #[argh(subcommand)]
    action: TodosAction,
}
#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand)]
enum TodosAction {
    Add(TodoAdd),
    List(TodoList),
    Complete(TodoComplete),
    Delete(TodoDelete),
}
leaf!(TodoAdd, "add", "Add an item." { #[argh(positional, greedy)] text: Vec<String>, });
leaf!(TodoList, "list", "List items." {
    /// open, done or all (default open)
    #[argh(option, default = "String::from(\"open\")")]
    status: String,
});
leaf!(TodoComplete, "complete", "Mark an item done." { #[argh(positional)] id: i64, });
leaf!(TodoDelete, "delete", "Delete an item." { #[argh(positional)] id: i64, });

#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand, name = "notes")]
/// Notes with full-text search.
struct NotesCmd {
    #[argh(subcommand)]
    action: NotesAction,
}
#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand)]
enum NotesAction {
    Save(NoteSave),
    Search(NoteSearch),
    List(NoteList),
    Delete(NoteDelete),
}
leaf!(NoteSave, "save", "Save a note; its body is the words after the flags." {
    /// a title (default: the body's first line)
    #[argh(option)]
    title: Option<String>,
    /// a tag (repeatable)
    #[argh(option)]
    tag: Vec<String>,
    #[argh(positional, greedy)]
    body: Vec<String>,
});
leaf!(NoteSearch, "search", "Search notes; any text is a valid query." {
    /// at most this many results (default 20)
    #[argh(option)]
    limit: Option<u32>,
    #[argh(positional, greedy)]
    query: Vec<String>,
});
leaf!(NoteList, "list", "List notes, newest first." {
    /// only notes with this tag
    #[argh(option)]
    tag: Option<String>,
    /// at most this many (default 20)
    #[argh(option)]
    limit: Option<u32>,
});
leaf!(NoteDelete, "delete", "Delete a note." { #[argh(positional)] id: i64, });

#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand, name = "calendar")]
/// Calendar events.
struct CalendarCmd {
    #[argh(subcommand)]
    action: CalendarAction,
}
#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand)]
enum CalendarAction {
    Add(EventAdd),
    List(EventList),
    Delete(EventDelete),
}
leaf!(EventAdd, "add", "Add an event; its title is the words after the flags." {
    /// ISO-8601 start, e.g. 2026-12-01T09:00 (local time) or with an offset
    #[argh(option)]
    start: String,
    /// ISO-8601 end
    #[argh(option)]
    end: Option<String>,
    /// a note
    #[argh(option)]
    note: Option<String>,
    #[argh(positional, greedy)]
    title: Vec<String>,
});
leaf!(EventList, "list", "List events overlapping a range (default today)." {
    /// today, tomorrow, week or between
    #[argh(option)]
    range: Option<String>,
    /// ISO-8601 date or time the range starts at
    #[argh(option)]
    from: Option<String>,
    /// ISO-8601 date or time the range ends at (a date includes its whole day)
    #[argh(option)]
    to: Option<String>,
});
leaf!(EventDelete, "delete", "Delete an event." { #[argh(positional)] id: i64, });

/// Drops absent optional arguments, so the tool sees only what was given.
fn object(pairs: Value) -> Value {
    let mut map = pairs.as_object().cloned().unwrap_or_default();
    map.retain(|_, v| !v.is_null());
    Value::Object(map)
}

/// The tool, its argument object and `--json`, from a one-shot command.
fn one_shot(cmd: Cmd) -> Result<(String, Value, bool)> {
    let (tool, args, json) = match cmd {
        Cmd::List(_) => unreachable!("handled by the caller"),
        Cmd::Time(c) => ("time", json!({"zone": c.zone}), c.json),
        Cmd::Calculator(c) => {
            let expr = match (c.expr, c.words.is_empty()) {
                (Some(e), true) => e,
                (None, false) => c.words.join(" "),
                _ => {
                    return Err(Error::usage(
                        "calculator: give the expression either with --expr or as words",
                    ));
                }
            };
            ("calculator", json!({"expr": expr}), c.json)
        }
        Cmd::Call(c) => {
            let args: Value = serde_json::from_str(&c.args).map_err(|e| {
                Error::usage(format!("call {}: the arguments are not JSON ({e})", c.tool))
            })?;
            return Ok((c.tool, args, c.json));
        }
        Cmd::Todos(t) => match t.action {
            TodosAction::Add(c) => (
                "todos",
                json!({"action": "add", "text": c.text.join(" ")}),
                c.json,
            ),
            TodosAction::List(c) => (
                "todos",
                json!({"action": "list", "status": c.status}),
                c.json,
            ),
            TodosAction::Complete(c) => {
                ("todos", json!({"action": "complete", "id": c.id}), c.json)
            }
            TodosAction::Delete(c) => ("todos", json!({"action": "delete", "id": c.id}), c.json),
        },
        Cmd::Notes(n) => match n.action {
            NotesAction::Save(c) => {
                let args = json!({"action": "save", "title": c.title, "body": c.body.join(" "), "tags": c.tag});
                ("notes", args, c.json)
            }
            NotesAction::Search(c) => (
                "notes",
                json!({"action": "search", "query": c.query.join(" "), "limit": c.limit}),
                c.json,
            ),
            NotesAction::List(c) => (
                "notes",
                json!({"action": "list", "tag": c.tag, "limit": c.limit}),
                c.json,
            ),
            NotesAction::Delete(c) => ("notes", json!({"action": "delete", "id": c.id}), c.json),
        },
        Cmd::Calendar(k) => match k.action {
            CalendarAction::Add(c) => {
                let args = json!({"action": "add", "title": c.title.join(" "), "start": c.start, "end": c.end, "note": c.note});
                ("calendar", args, c.json)
            }
            CalendarAction::List(c) => (
                "calendar",
                json!({"action": "list", "range": c.range, "from": c.from, "to": c.to}),
                c.json,
            ),
            CalendarAction::Delete(c) => {
                ("calendar", json!({"action": "delete", "id": c.id}), c.json)
            }
        },
    };
    Ok((tool.to_string(), object(args), json))
}

/// Runs the command; a failed call is `Error::Failed` (exit status 1).
fn run(cli: Cli) -> Result<()> {
    if cli.version {
        println!("tb-tool {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if !(cli.timeout.is_finite() && cli.timeout > 0.0) {
        return Err(Error::usage(format!(
            "--timeout must be a positive number of seconds, got {}",
            cli.timeout
        )));
    }
    let opts = Options {
        db: cli.db,
        timeout: Duration::from_secs_f64(cli.timeout),
        external: !cli.no_external,
    };
    let registry = Registry::standard(&opts);
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    match cli.cmd {
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!(
                    "tb-tool: reading JSON Lines calls from the terminal; end with Ctrl-D (tb-tool --help for more)"
                );
            }
            let summary = run_stream(&registry, std::io::stdin().lock(), out)?;
            match summary.failed {
                0 => Ok(()),
                n => Err(Error::Failed(format!(
                    "{n} of {} calls failed (their records say why)",
                    summary.lines
                ))),
            }
        }
        Some(Cmd::List(c)) if c.prompt => {
            writeln!(out, "{}", registry.prompt_lines()).map_err(stdout_err)
        }
        Some(Cmd::List(_)) => {
            for tool in registry.list() {
                writeln!(out, "{tool}").map_err(stdout_err)?;
            }
            Ok(())
        }
        Some(cmd) => {
            let (tool, args, as_json) = one_shot(cmd)?;
            let record =
                registry.call_json_line(&json!({"tool": tool, "args": args}).to_string(), 1);
            if as_json {
                writeln!(out, "{}", record.to_json_line()).map_err(stdout_err)?;
            }
            match &record.outcome {
                Ok(result) if !as_json => {
                    let text = registry
                        .get(&tool)
                        .map(|t| t.render(result))
                        .unwrap_or_default();
                    if !text.is_empty() {
                        writeln!(out, "{text}").map_err(stdout_err)?;
                    }
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(Error::Failed(e.to_string())),
            }
        }
    }
}

fn main() -> ExitCode {
    match tinybit::cli::parse_args::<Cli>("tb-tool") {
        Ok(cli) => tinybit::cli::run_main("tb-tool", || run(cli)),
        Err(code) => code,
    }
}
