//! tb-eval's generating tasks, on the one generation loop: sanity prompts (`gen`) and tool-call
//! cases (`tools`) with format validity, tool selection, exact match, argument F1 and irrelevance.

use super::EvalOptions;
use crate::chat::{ChatOptions, Session};
use crate::checkpoint::Checkpoint;
use crate::constrain::CallConstraint;
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::generate::{Event, GenOptions, Generation};
use crate::sample::{Sampler, SamplerConfig};
use crate::template::{self, Message};
use crate::tokenizer::Tokenizer;
use crate::toolgen::Scratch;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use std::path::Path;
use std::sync::Arc;

/// The built-in sanity prompts: short, varied, and answerable by a small model.
pub const BUILTIN_PROMPTS: [&str; 6] = [
    "Hello! Who are you?",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three colours.",
    "Finish the line: To be, or not to be,",
    "What is 2 + 2?",
];

/// Writes to stdout; a closed pipe becomes the error `run_main` ends quietly on (println! would
/// panic).
fn out(s: &str) -> Result<()> {
    use std::io::Write;
    std::io::stdout()
        .lock()
        .write_all(s.as_bytes())
        .map_err(crate::output::stdout_err)
}

fn lines_of(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "reading", e))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect())
}

/// Runs `gen` or `tools`; returns the metrics and records the data's identity in `data_ids`.
pub fn run(
    o: &EvalOptions,
    ck: &Checkpoint,
    tok: &Option<Tokenizer>,
    data_ids: &mut Vec<Value>,
) -> Result<Map<String, Value>> {
    let tok = tok.clone().ok_or_else(|| {
        Error::Data(format!(
            "{}: generation needs a tokenizer (--tokenizer)",
            o.model.display()
        ))
    })?;
    let opts = EngineOptions {
        threads: o.threads,
        ..Default::default()
    };
    let engine = Engine::load(&o.model, &opts)?;
    let limits = GenOptions {
        max_tokens: Some(o.max_tokens),
        copy_bias: o.copy_bias,
        ..Default::default()
    };
    for f in &o.files {
        data_ids.push(json!({"path": f, "sha256": crate::fsutil::sha256_hex(&std::fs::read(f).map_err(|e| Error::io(f, "reading", e))?)}));
    }
    match o.task {
        super::Task::Tools => tools_task(o, ck, engine, &tok, limits),
        _ => gen_task(o, engine, tok, limits),
    }
}

fn gen_task(
    o: &EvalOptions,
    engine: Engine,
    tok: Tokenizer,
    limits: GenOptions,
) -> Result<Map<String, Value>> {
    let mut prompts: Vec<String> = Vec::new();
    for f in &o.files {
        for (n, line) in lines_of(f)? {
            let p = match crate::chat::parse_line(&line) {
                Ok(p) => p.prompt,
                Err(why) => return Err(Error::Data(format!("{}:{n}: {why}", f.display()))),
            };
            prompts.push(p);
        }
    }
    if o.files.is_empty() {
        prompts = BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect();
    }
    let opts = ChatOptions {
        system: None,
        sampler: SamplerConfig::greedy(),
        generation: limits,
        max_tool_calls: 0,
        unconstrained: true,
    };
    let mut session = Session::new(engine, tok, None, opts)?;
    let (mut tokens, mut secs) = (0usize, 0f64);
    for p in &prompts {
        session.reset();
        let reply = session.turn(p, &mut |_| Ok(()))?;
        let s = &reply.stats;
        tokens += s.generated_tokens;
        secs += s.decode_time.as_secs_f64();
        if o.json {
            let rec = json!({"type": "sample", "prompt": p, "output": reply.text, "tokens": s.generated_tokens,
                "tok_per_s": s.decode_tok_per_s(), "stop": reply.stop.as_str()});
            out(&format!("{rec}\n"))?;
        } else {
            out(&format!(
                "### {p}\n{}\n[{} tokens, {:.1} tok/s, {}]\n\n",
                reply.text,
                s.generated_tokens,
                s.decode_tok_per_s(),
                reply.stop.as_str()
            ))?;
        }
    }
    let mut m = Map::new();
    m.insert("prompts".into(), json!(prompts.len()));
    m.insert("generated_tokens".into(), json!(tokens));
    m.insert("tok_per_s".into(), json!(tokens as f64 / secs.max(1e-9)));
    Ok(m)
}

/// One tool-call case: the conversation so far, the call expected next (`null`: none), the facts
/// the final answer must contain, and the tools' starting state (`tb-tok toolchat` writes these).
struct Case {
    messages: Vec<Message>,
    expected: Option<Value>,
    answer_contains: Vec<String>,
    /// The tools' clock (default: now).
    now: Option<DateTime<Utc>>,
    /// Calls run on the scratch database before the conversation.
    setup: Vec<Value>,
    /// Where the case was read, for errors.
    at: String,
}

fn read_cases(path: &Path) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for (n, line) in lines_of(path)? {
        let bad = |m: String| Error::Data(format!("{}:{n}: {m}", path.display()));
        let v: Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("malformed JSON line: {e}")))?;
        let messages: Vec<Message> =
            serde_json::from_value(v.get("messages").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("\"messages\": {e}")))?;
        let expected = match v.get("expected") {
            None => {
                return Err(bad(
                    "no \"expected\" (an object {\"tool\",\"args\"} or null)".into(),
                ));
            }
            Some(Value::Null) => None,
            Some(e @ Value::Object(_)) if e.get("tool").is_some_and(|t| t.is_string()) => {
                Some(e.clone())
            }
            Some(_) => {
                return Err(bad(
                    "\"expected\" must be {\"tool\": NAME, \"args\": {...}} or null".into(),
                ));
            }
        };
        let answer_contains: Vec<String> = match v.get("answer_contains") {
            None | Some(Value::Null) => Vec::new(),
            Some(a) => serde_json::from_value(a.clone())
                .map_err(|_| bad("\"answer_contains\" must be a list of strings".into()))?,
        };
        let now = match v.get("now") {
            None | Some(Value::Null) => None,
            Some(t) => Some(
                t.as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .ok_or_else(|| bad(format!("\"now\": {t} is not an RFC 3339 time")))?
                    .with_timezone(&Utc),
            ),
        };
        let setup = match v.get("setup") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(bad("\"setup\" must be a list of calls".into())),
        };
        out.push(Case {
            messages,
            expected,
            answer_contains,
            now,
            setup,
            at: format!("{}:{n}", path.display()),
        });
    }
    Ok(out)
}

/// Argument F1 of one call: key/value pairs compared as JSON values.
pub fn arg_f1(predicted: &Value, expected: &Value) -> f64 {
    let empty = Map::new();
    let p = predicted.as_object().unwrap_or(&empty);
    let e = expected.as_object().unwrap_or(&empty);
    if p.is_empty() && e.is_empty() {
        return 1.0;
    }
    let matched = e.iter().filter(|(k, v)| p.get(*k) == Some(v)).count() as f64;
    if matched == 0.0 {
        return 0.0;
    }
    let (prec, rec) = (matched / p.len() as f64, matched / e.len() as f64);
    2.0 * prec * rec / (prec + rec)
}

/// What the model did on one case.
#[derive(Clone, Default)]
pub struct Outcome {
    /// The text between the markers of its first call, when the model called a tool.
    pub raw: Option<String>,
    /// Its parse, when valid.
    pub call: Option<(String, Value)>,
    /// Whether the final answer held every fact the case names (`None`: the case names none).
    pub answer_ok: Option<bool>,
}

/// Scores outcomes against expectations, arguments compared as JSON values.
pub fn score(cases: &[(Option<Value>, Outcome)]) -> Map<String, Value> {
    score_by(cases, &|_, a, b| a == b)
}

/// Scores outcomes; `same(tool, predicted, expected)` says whether two argument objects ask for
/// the same thing (`Tool::same_args`).
pub fn score_by(
    cases: &[(Option<Value>, Outcome)],
    same: &dyn Fn(&str, &Value, &Value) -> bool,
) -> Map<String, Value> {
    let (
        mut emitted,
        mut valid,
        mut want_call,
        mut right_tool,
        mut exact,
        mut f1_sum,
        mut want_none,
        mut quiet,
    ) = (0, 0, 0, 0, 0, 0.0, 0, 0);
    for (expected, out) in cases {
        if out.raw.is_some() {
            emitted += 1;
            valid += out.call.is_some() as usize;
        }
        match expected {
            Some(e) => {
                want_call += 1;
                if let Some((tool, args)) = &out.call {
                    let e_args = e.get("args").cloned().unwrap_or(json!({}));
                    if Some(tool.as_str()) == e["tool"].as_str() {
                        right_tool += 1;
                        exact += same(tool, args, &e_args) as usize;
                        f1_sum += arg_f1(args, &e_args);
                    }
                }
            }
            None => {
                want_none += 1;
                quiet += out.raw.is_none() as usize;
            }
        }
    }
    let ratio = |a: usize, b: usize| {
        if b == 0 {
            Value::Null
        } else {
            json!(a as f64 / b as f64)
        }
    };
    let checked: Vec<bool> = cases.iter().filter_map(|(_, o)| o.answer_ok).collect();
    let mut m = Map::new();
    m.insert("cases".into(), json!(cases.len()));
    m.insert("format_validity".into(), ratio(valid, emitted));
    m.insert("tool_selection".into(), ratio(right_tool, want_call));
    m.insert("exact_match".into(), ratio(exact, want_call));
    m.insert(
        "arg_f1".into(),
        if want_call == 0 {
            Value::Null
        } else {
            json!(f1_sum / want_call as f64)
        },
    );
    m.insert("irrelevance".into(), ratio(quiet, want_none));
    m.insert(
        "answer_has_result".into(),
        ratio(checked.iter().filter(|&&ok| ok).count(), checked.len()),
    );
    m
}

/// The kind of request a case makes, for `by_request`: the expected tool and its `action`
/// ("todos add"), the tool alone when it takes no action, or "none".
fn request_kind(expected: &Option<Value>) -> String {
    match expected {
        None => "none".into(),
        Some(e) => {
            let tool = e["tool"].as_str().unwrap_or("?");
            match e["args"]["action"].as_str() {
                Some(a) => format!("{tool} {a}"),
                None => tool.into(),
            }
        }
    }
}

/// The metrics of `score_by` per kind of request (`request_kind`), where a small model's
/// failures gather (one tool, one action); a metric with nothing to count is left out.
pub fn by_request(
    cases: &[(Option<Value>, Outcome)],
    same: &dyn Fn(&str, &Value, &Value) -> bool,
) -> Map<String, Value> {
    let mut kinds: std::collections::BTreeMap<String, Vec<(Option<Value>, Outcome)>> =
        Default::default();
    for c in cases {
        kinds.entry(request_kind(&c.0)).or_default().push(c.clone());
    }
    kinds
        .into_iter()
        .map(|(kind, group)| {
            let mut m = score_by(&group, same);
            m.retain(|_, v| !v.is_null());
            (kind, Value::Object(m))
        })
        .collect()
}

/// Most tool calls run per case; further calls are answered with an error.
const MAX_CALLS: usize = 4;

/// Removes the scratch database (and its journal files) however the evaluation ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Each case runs on the built-in tools over a scratch database (emptied per case, its `setup`
/// and the conversation's earlier calls replayed, the clock at its `now`): the model's calls are
/// executed, their results injected, and the final answer checked for the case's facts.
fn tools_task(
    o: &EvalOptions,
    ck: &Checkpoint,
    mut engine: Engine,
    tok: &Tokenizer,
    limits: GenOptions,
) -> Result<Map<String, Value>> {
    if o.files.is_empty() {
        return Err(Error::usage(
            "--task tools needs a JSON Lines file of cases",
        ));
    }
    let db =
        RemoveOnDrop(std::env::temp_dir().join(format!("tinybit-eval-{}.db", std::process::id())));
    let scratch = Scratch::new(&db.0);
    let tools = scratch.reset(Utc::now())?;
    let tool_lines = vec![tools.prompt_lines()];
    let constraint = (!o.unconstrained).then(|| Arc::new(CallConstraint::new(&tools, tok)));
    let system = ck.meta.config.family.system_prompt.clone();
    let mut results = Vec::new();
    let mut registry = None;
    for f in &o.files {
        for case in read_cases(f)? {
            let reg = scratch.reset(case.now.unwrap_or_else(Utc::now))?;
            let calls: Vec<(usize, &Value)> = case
                .messages
                .iter()
                .enumerate()
                .filter_map(|(i, m)| m.tool_call.as_ref().map(|c| (i, c)))
                .collect();
            for step in crate::toolgen::replay_order(&case.setup, &calls) {
                let call = step.call;
                let (tool, args) = (call["tool"].as_str().unwrap_or(""), &call["args"]);
                // The conversation's own calls may have failed when it was recorded; setup may not.
                if let Err(e) = reg.call(tool, args)
                    && step.index.is_none()
                {
                    return Err(Error::Data(format!("{}: setup call {call}: {e}", case.at)));
                }
            }
            let mut msgs = case.messages.clone();
            if msgs.first().is_none_or(|m| m.role != "system") && !system.is_empty() {
                msgs.insert(0, Message::new("system", &system));
            }
            let spans = template::render(&msgs, &tool_lines, true)?;
            let (prompt, _) = template::to_tokens(&spans, tok)?;
            let mut state = engine.new_state();
            let mut sampler = Sampler::new(SamplerConfig::greedy())?;
            let mut g = Generation::new(
                &mut engine,
                &mut state,
                &mut sampler,
                tok,
                &prompt,
                GenOptions {
                    constraint: constraint.clone(),
                    quotable: crate::constrain::quotable(&case.messages),
                    ..limits.clone()
                },
            )?;
            let mut outcome = Outcome::default();
            let (mut text, mut calls) = (String::new(), 0);
            while let Some(ev) = g.next() {
                match ev? {
                    Event::ToolCall { raw, call } => {
                        calls += 1;
                        if calls == 1 {
                            outcome.raw = Some(raw);
                            outcome.call =
                                call.as_ref().ok().map(|c| (c.tool.clone(), c.args.clone()));
                        }
                        let answer = match call {
                            _ if calls > MAX_CALLS => json!({"error": "too many tool calls"}),
                            Ok(c) => reg
                                .call(&c.tool, &c.args)
                                .unwrap_or_else(|e| json!({"error": e})),
                            Err(why) => json!({"error": why}),
                        };
                        g.inject_tool_result(&answer.to_string())?;
                    }
                    Event::Text(t) => text.push_str(&t),
                    _ => {}
                }
            }
            if !case.answer_contains.is_empty() {
                let lower = text.to_lowercase();
                outcome.answer_ok = Some(
                    case.answer_contains
                        .iter()
                        .all(|fact| lower.contains(&fact.to_lowercase())),
                );
            }
            if o.json {
                let rec = json!({"type": "sample", "expected": case.expected, "raw": outcome.raw,
                    "call": outcome.call.as_ref().map(|(t, a)| json!({"tool": t, "args": a})),
                    "answer": text, "answer_ok": outcome.answer_ok});
                out(&format!("{rec}\n"))?;
            }
            results.push((case.expected, outcome));
            registry = Some(reg);
        }
    }
    let same = |tool: &str, a: &Value, b: &Value| match registry.as_ref().and_then(|r| r.get(tool))
    {
        Some(t) => t.same_args(a, b),
        None => a == b,
    };
    let mut m = score_by(&results, &same);
    m.insert(
        "by_request".into(),
        Value::Object(by_request(&results, &same)),
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_counts_each_metric() {
        let call = |t: &str, a: Value| Outcome {
            raw: Some("x".into()),
            call: Some((t.into(), a)),
            answer_ok: None,
        };
        let cases = vec![
            (
                Some(json!({"tool": "calculator", "args": {"expr": "2^10"}})),
                call("calculator", json!({"expr": "2^10"})),
            ),
            (
                Some(json!({"tool": "todos", "args": {"action": "add", "text": "milk"}})),
                call("todos", json!({"action": "add", "text": "eggs"})),
            ),
            (
                Some(json!({"tool": "time", "args": {}})),
                Outcome {
                    raw: Some("{oops".into()),
                    ..Default::default()
                },
            ),
            (None, Outcome::default()),
            (None, call("time", json!({}))),
        ];
        let m = score(&cases);
        assert_eq!(m["format_validity"], json!(0.75)); // 3 of 4 emitted calls parse
        assert_eq!(m["tool_selection"], json!(2.0 / 3.0));
        assert_eq!(m["exact_match"], json!(1.0 / 3.0));
        assert_eq!(m["arg_f1"], json!((1.0 + 0.5) / 3.0));
        assert_eq!(m["irrelevance"], json!(0.5));

        let kinds = by_request(&cases, &|_, a, b| a == b);
        let names: Vec<&str> = kinds.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["calculator", "none", "time", "todos add"]);
        assert_eq!(kinds["calculator"]["exact_match"], json!(1.0));
        assert_eq!(kinds["todos add"]["tool_selection"], json!(1.0));
        assert_eq!(kinds["todos add"]["exact_match"], json!(0.0));
        assert_eq!(kinds["time"]["format_validity"], json!(0.0));
        assert_eq!(kinds["none"]["cases"], json!(2));
        assert_eq!(kinds["none"]["irrelevance"], json!(0.5));
        // Nothing to count is left out, not written as null.
        assert!(kinds["none"].get("exact_match").is_none());
    }
}
