//! Tools a model (or a script) can call: the `Tool` trait, the `Registry` that holds them, and the
//! JSON Lines protocol of `tb-tool` (tinybit(7), JSON LINES).
//!
//! A call is `{"tool": NAME, "args": {...}, "id": ANY?}`; its record is
//! `{"tool": NAME, "id"?, "ok": true, "result": VALUE}` or `{"tool": NAME|null, "id"?, "ok": false,
//! "error": "...", "line": N}`. `tb-tool` and `tb-chat`'s tool loop both go through
//! [`Registry::call_json_line`], so a tool behaves the same wherever it is called from.
//!
//! Built-ins: `time`, `calculator` (no disk), and `todos`, `notes`, `calendar` (one SQLite database,
//! opened on their first call). Executables named `tb-tool-NAME` on `PATH` join the same registry
//! ([`external`]).

pub mod calculator;
pub mod calendar;
pub mod db;
pub mod external;
pub mod notes;
pub mod shell;
pub mod time;
pub mod todos;

use crate::output::stdout_err;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What a tool call returns: a JSON value, or a message that says what was wrong and what to do.
pub type ToolResult = std::result::Result<Value, String>;

/// A tool: a named function from a JSON argument object to a JSON value.
///
/// Adding a tool is implementing this trait and registering it:
///
/// ```rust
/// use serde_json::{Value, json};
/// use tinybit::tools::{Registry, Tool};
///
/// /// Says hello to someone.
/// struct Greet;
///
/// impl Tool for Greet {
///     fn name(&self) -> &str {
///         "greet"
///     }
///     fn description(&self) -> &str {
///         "Say hello to someone by name"
///     }
///     fn schema(&self) -> Value {
///         json!({
///             "type": "object",
///             "properties": {"who": {"type": "string", "description": "the name"}},
///             "required": ["who"],
///             "additionalProperties": false
///         })
///     }
///     fn call(&self, args: &Value) -> Result<Value, String> {
///         let who = args["who"].as_str().ok_or("greet needs a string 'who'")?;
///         Ok(json!(format!("hello, {who}")))
///     }
/// }
///
/// fn main() {
///     let mut registry = Registry::new();
///     registry.register(Greet);
///     let line = r#"{"tool":"greet","args":{"who":"Ada"}}"#;
///     let record = registry.call_json_line(line, 1);
///     assert_eq!(record.to_json_line(), r#"{"tool":"greet","ok":true,"result":"hello, Ada"}"#);
///     assert_eq!(registry.prompt_lines(), "greet(who: string) - Say hello to someone by name");
/// }
/// ```
pub trait Tool: Send + Sync {
    /// The name the model and scripts call it by: `[A-Za-z0-9_-]+`.
    fn name(&self) -> &str;
    /// One line, shown in `tb-tool list` and in the model's prompt.
    fn description(&self) -> &str;
    /// A JSON Schema object of the arguments (`type`, `properties`, `required`). `tb-tool`'s
    /// one-shot form is derived from it (`tools::shell`): an `action` enum is the first word, a
    /// property described `ACTION[, ACTION]: …` applies to those actions only, and the words fill
    /// the one string or integer argument whose description says neither "default" nor "optional".
    fn schema(&self) -> Value;
    /// Runs the tool. Errors are messages for a person or a model: say what was wrong and what to do.
    fn call(&self, args: &Value) -> ToolResult;
    /// The result as text for a person at a shell (`tb-tool NAME ...` without `--json`).
    fn render(&self, result: &Value) -> String {
        render_plain(result)
    }
    /// Whether two argument objects ask for the same thing (`tb-eval --task tools` scores calls
    /// with it). JSON equality unless the tool knows better (an expression by its value, a date by
    /// its instant).
    fn same_args(&self, a: &Value, b: &Value) -> bool {
        a == b
    }
    /// String arguments whose value is text quoted from the conversation (a todo's text, a note's
    /// title). While a model writes one, generation only lets it write words the user wrote
    /// (`constrain`), so a name it never saw in training is copied, not misspelt. None unless the
    /// tool says so.
    fn quoted_args(&self) -> &[&str] {
        &[]
    }
}

/// Argument objects equal key by key, with `same(key, x, y)` deciding for the keys both have.
pub fn same_keys(a: &Value, b: &Value, same: impl Fn(&str, &Value, &Value) -> bool) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, x)| b.get(k).is_some_and(|y| x == y || same(k, x, y)))
        }
        _ => a == b,
    }
}

/// Strings as they are, everything else as compact JSON.
pub fn render_plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// How `Registry::standard` finds the database and the external tools.
#[derive(Clone, Debug)]
pub struct Options {
    /// The database file; `None` means `TINYBIT_DB`, else `$XDG_DATA_HOME/tinybit/tools.db`.
    pub db: Option<PathBuf>,
    /// How long an external tool may run before it is killed.
    pub timeout: Duration,
    /// Whether to look for `tb-tool-NAME` executables on `PATH`.
    pub external: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            db: None,
            timeout: external::DEFAULT_TIMEOUT,
            external: true,
        }
    }
}

/// The tools by name (sorted, so listings and prompts are stable).
#[derive(Default)]
pub struct Registry {
    tools: BTreeMap<String, Box<dyn Tool>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in tools over one database, in `zone`, reading time from `clock`.
    pub fn builtins(store: Arc<db::Store>, zone: chrono_tz::Tz, clock: time::Clock) -> Self {
        let mut r = Registry::new();
        r.register(time::Time::new(zone, clock.clone()));
        r.register(calculator::Calculator);
        r.register(todos::Todos::new(store.clone(), clock.clone()));
        r.register(notes::Notes::new(store.clone(), clock.clone()));
        r.register(calendar::Calendar::new(store, zone, clock));
        r
    }

    /// What `tb-tool` and `tb-chat` use: the built-ins (local zone, system clock, database from
    /// `opts.db` / the environment) and, unless disabled, every `tb-tool-NAME` on `PATH` whose name
    /// is not already taken by a built-in.
    pub fn standard(opts: &Options) -> Self {
        let store = match &opts.db {
            Some(path) => db::Store::at(path.clone()),
            None => db::Store::from_env(),
        };
        let mut r = Registry::builtins(Arc::new(store), time::local_zone(), time::system_clock());
        if opts.external {
            let path = std::env::var_os("PATH").unwrap_or_default();
            for tool in external::discover(&path, opts.timeout) {
                if r.get(tool.name()).is_none() {
                    r.register(tool);
                }
            }
        }
        r
    }

    /// Adds a tool, replacing any tool of the same name (which is returned).
    pub fn register(&mut self, tool: impl Tool + 'static) -> Option<Box<dyn Tool>> {
        self.tools.insert(tool.name().to_string(), Box::new(tool))
    }

    pub fn get(&self, name: &str) -> Option<&dyn Tool> {
        self.tools.get(name).map(|t| t.as_ref())
    }

    /// Tool names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tools.keys().map(String::as_str).collect()
    }

    /// One `{"name", "description", "schema"}` object per tool, sorted by name (`tb-tool list`).
    pub fn list(&self) -> Vec<Value> {
        self.tools
            .values()
            .map(
                |t| json!({"name": t.name(), "description": t.description(), "schema": t.schema()}),
            )
            .collect()
    }

    /// Each tool's `quoted_args`, by tool name (tools without any are left out).
    pub fn quoted_args(&self) -> BTreeMap<String, Vec<String>> {
        self.tools
            .iter()
            .filter(|(_, t)| !t.quoted_args().is_empty())
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.quoted_args().iter().map(|a| a.to_string()).collect(),
                )
            })
            .collect()
    }

    /// Calls a tool by name.
    pub fn call(&self, name: &str, args: &Value) -> ToolResult {
        let tool = self.get(name).ok_or_else(|| {
            format!(
                "unknown tool '{name}'; known tools: {} (`tb-tool list` shows their arguments)",
                self.names().join(", ")
            )
        })?;
        tool.call(args)
    }

    /// The whole protocol for one input line (`line_no` counts from 1): parse the call, run it,
    /// and return its record. Never fails: every problem becomes an `ok: false` record.
    pub fn call_json_line(&self, line: &str, line_no: u64) -> CallRecord {
        let mut record = CallRecord {
            tool: None,
            id: None,
            outcome: Ok(Value::Null),
            line: line_no,
        };
        let call: Map<String, Value> = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                record.outcome =
                    Err(r#"a call must be a JSON object {"tool": NAME, "args": {...}}"#.into());
                return record;
            }
            Err(e) if line.trim().is_empty() => {
                record.outcome = Err(format!(
                    "empty line is not a call ({e}); send one JSON object per line"
                ));
                return record;
            }
            Err(e) => {
                record.outcome = Err(format!("malformed JSON: {e}"));
                return record;
            }
        };
        record.id = call.get("id").cloned();
        let name = match call.get("tool") {
            Some(Value::String(name)) => name.clone(),
            Some(_) => {
                record.outcome = Err("\"tool\" must be a string naming the tool".into());
                return record;
            }
            None => {
                record.outcome =
                    Err(r#"missing "tool": a call is {"tool": NAME, "args": {...}}"#.into());
                return record;
            }
        };
        record.tool = Some(name.clone());
        let empty = Value::Object(Map::new());
        record.outcome = match call.get("args") {
            None | Some(Value::Null) => self.call(&name, &empty),
            Some(args @ Value::Object(_)) => self.call(&name, args),
            Some(_) => Err("\"args\" must be a JSON object of the tool's arguments".into()),
        };
        record
    }

    /// The tool list of the prompt template: one `name(arg: type, ...) - description` per line.
    pub fn prompt_lines(&self) -> String {
        let lines: Vec<String> = self
            .tools
            .values()
            .map(|t| prompt_line(t.as_ref()))
            .collect();
        lines.join("\n")
    }
}

/// The outcome of one protocol line.
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord {
    /// The tool named by the call; `None` when the line was not a call object naming one.
    pub tool: Option<String>,
    /// The call's `"id"`, echoed.
    pub id: Option<Value>,
    pub outcome: ToolResult,
    /// The input line number (from 1); reported on failures.
    pub line: u64,
}

#[derive(Serialize)]
struct Wire<'a> {
    tool: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: &'a Option<Value>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u64>,
}

impl CallRecord {
    pub fn ok(&self) -> bool {
        self.outcome.is_ok()
    }

    fn wire(&self) -> Wire<'_> {
        let (result, error) = match &self.outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e.as_str())),
        };
        Wire {
            tool: &self.tool,
            id: &self.id,
            ok: self.ok(),
            result,
            error,
            line: error.map(|_| self.line),
        }
    }

    /// The record as a JSON value.
    pub fn to_json(&self) -> Value {
        // Cannot fail: the wire record holds JSON values and strings only.
        serde_json::to_value(self.wire()).expect("a record is always serialisable")
    }

    /// The record as one line of JSON (fields in the documented order), without the newline.
    pub fn to_json_line(&self) -> String {
        // Cannot fail: the wire record holds JSON values and strings only.
        serde_json::to_string(&self.wire()).expect("a record is always serialisable")
    }

    /// What the chat runtime injects after a tool call: the result, or `{"error": "..."}`.
    pub fn injection(&self) -> Value {
        match &self.outcome {
            Ok(v) => v.clone(),
            Err(e) => json!({ "error": e }),
        }
    }
}

/// Counts of one `run_stream`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub lines: u64,
    pub failed: u64,
}

/// Bare `tb-tool`: one record per input line, in order, flushed as it is written, until EOF.
/// Only I/O on the streams themselves is an `Err`; failed calls are counted in the summary.
pub fn run_stream(
    registry: &Registry,
    mut input: impl BufRead,
    mut output: impl Write,
) -> crate::Result<StreamSummary> {
    let mut summary = StreamSummary::default();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|e| crate::Error::Io(format!("reading calls from stdin: {e}")))?;
        if n == 0 {
            return Ok(summary);
        }
        summary.lines += 1;
        let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let record = match std::str::from_utf8(text) {
            Ok(line) => registry.call_json_line(line, summary.lines),
            Err(e) => CallRecord {
                tool: None,
                id: None,
                outcome: Err(format!("line is not valid UTF-8 ({e})")),
                line: summary.lines,
            },
        };
        if !record.ok() {
            summary.failed += 1;
        }
        writeln!(output, "{}", record.to_json_line()).map_err(stdout_err)?;
        output.flush().map_err(stdout_err)?;
    }
}

/// `name(arg: type, opt?: type) - description`, required arguments first.
pub fn prompt_line(tool: &dyn Tool) -> String {
    let schema = tool.schema();
    let props = schema.get("properties").and_then(Value::as_object);
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut args = Vec::new();
    if let Some(props) = props {
        for name in &required {
            if let Some(p) = props.get(*name) {
                args.push(format!("{name}: {}", type_name(p)));
            }
        }
        for (name, p) in props
            .iter()
            .filter(|(n, _)| !required.contains(&n.as_str()))
        {
            args.push(format!("{name}?: {}", type_name(p)));
        }
    }
    format!(
        "{}({}) - {}",
        tool.name(),
        args.join(", "),
        tool.description()
    )
}

/// `string`, `integer`, `a|b|c` for an enum, `[string]` for an array, `string|[string]` for `anyOf`.
fn type_name(prop: &Value) -> String {
    if let Some(values) = prop.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(render_plain)
            .collect::<Vec<_>>()
            .join("|");
    }
    if let Some(alts) = prop.get("anyOf").and_then(Value::as_array) {
        return alts.iter().map(type_name).collect::<Vec<_>>().join("|");
    }
    match prop.get("type").and_then(Value::as_str) {
        Some("array") => format!(
            "[{}]",
            prop.get("items").map(type_name).unwrap_or("any".into())
        ),
        Some(t) => t.to_string(),
        None => "any".to_string(),
    }
}

/// Reads a tool's argument object into `T` (which should `deny_unknown_fields`), naming the tool
/// in the error so a model sees what to fix.
pub fn parse_args<T: DeserializeOwned>(tool: &str, args: &Value) -> std::result::Result<T, String> {
    T::deserialize(args).map_err(|e| format!("bad arguments for {tool}: {e}"))
}

/// For tools driven by an `"action"`: returns the action (one of `actions`) and the remaining
/// arguments, to be read with `parse_args`.
pub fn split_action(
    tool: &str,
    args: &Value,
    actions: &[&str],
) -> std::result::Result<(String, Value), String> {
    let expected = actions.join(", ");
    let mut rest = args.as_object().cloned().ok_or_else(|| {
        format!("bad arguments for {tool}: expected an object with an \"action\"")
    })?;
    match rest.remove("action") {
        Some(Value::String(a)) if actions.contains(&a.as_str()) => Ok((a, Value::Object(rest))),
        Some(Value::String(a)) => Err(format!(
            "unknown action '{a}' for {tool}; expected one of: {expected}"
        )),
        Some(_) => Err(format!(
            "bad arguments for {tool}: \"action\" must be a string, one of: {expected}"
        )),
        None => Err(format!(
            "bad arguments for {tool}: missing \"action\", one of: {expected}"
        )),
    }
}

/// A removed record as `delete` actions return it: the record with `"deleted": true`.
pub fn mark_deleted(mut record: Value) -> Value {
    if let Value::Object(map) = &mut record {
        map.insert("deleted".into(), Value::Bool(true));
    }
    record
}

/// A record id as models write it: `3` or `"3"`.
#[derive(Clone, Copy, Debug, serde::Deserialize)]
#[serde(try_from = "Value")]
pub struct Id(pub i64);

impl TryFrom<Value> for Id {
    type Error = String;
    fn try_from(v: Value) -> std::result::Result<Self, String> {
        let n = match &v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().trim_start_matches('#').parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if n > 0 => Ok(Id(n)),
            _ => Err(format!("id must be a positive integer, got {v}")),
        }
    }
}
