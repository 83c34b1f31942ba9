//! Constrained tool calls: while the model writes a `<|tool_call|>`, `CallConstraint::mask` keeps
//! only the tokens that leave a call the registry can run, and an argument that quotes the
//! conversation (a todo's text, a note's title: `Tool::quoted_args`) takes only words the user
//! wrote. Among what is left, the model's most likely token wins (or is sampled).
//!
//! - **The call**: one JSON object with the keys `args` and `tool`, each once; argument names
//!   of a tool that takes every argument written so far; a value of the type its schema gives
//!   (an enum's value is one of it); the tool's name one that takes the arguments written; the
//!   end marker only once the object is complete.
//! - **Quoted values**: a small model routes a request well but garbles a name it never saw in
//!   training ("Kenji" → "Inji"). A quoted value is whole words of what the user said
//!   (`GenOptions::quotable`), copied as written but for a capital first letter, which may be
//!   written small ("Buy milk" → "buy milk"); it does not end on a space or a full stop, and
//!   never goes where it could no longer end. It is compared in its JSON-escaped form, the one
//!   the model writes. Whether it ends is the model's choice (`mask`); what it says is the user's.
//!
//! A call's keys come sorted (`{"args": {...}, "tool": ...}`, as serde writes them), so the tool is
//! usually not known while its arguments are written: then an argument is quoted when every tool
//! that has an argument of that name quotes it (`text`, `title`, `query`... of the built-ins), and
//! the argument names and types allowed are those of every tool that still fits.
//!
//! `--unconstrained` (tb-chat, tb-eval) leaves the call to the model alone.

use crate::template::Message;
use crate::tokenizer::{Special, Tokenizer};
use crate::tools::Registry;
use std::collections::{BTreeMap, BTreeSet};

/// The keys of a call object.
const CALL_KEYS: [&str; 2] = ["args", "tool"];

/// What a call may quote (`GenOptions::quotable`): what the user said in `messages`.
pub fn quotable(messages: &[Message]) -> String {
    let said = messages.iter().filter(|m| m.role == "user");
    said.map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a registry's tools accept (names, argument schemas, quoted arguments), and the bytes of
/// every token of the model.
#[derive(Debug)]
pub struct CallConstraint {
    /// Tool name → its quoted argument names.
    args: BTreeMap<String, Vec<String>>,
    /// The argument names quoted whatever the tool (every tool that has one quotes it).
    any_tool: BTreeSet<String>,
    /// Each token id's bytes (a special token: `None`, never part of a quoted value).
    tokens: Vec<Option<Vec<u8>>>,
    /// The special ids that end a call: `<|end_tool_call|>`, `<|endoftext|>`.
    closers: Vec<u32>,
    tool_names: Vec<String>,
    /// Tool name → argument name → its schema (tools whose schema lists `properties`).
    arg_schemas: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

/// Where the text of a partial tool call stands, as far as quoting needs to know.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Open containers, outermost first.
    stack: Vec<Frame>,
    lex: Lex,
    /// The key or string value being read, raw (escapes as written).
    buf: Vec<u8>,
    /// The call's top-level `"tool"` value, once read.
    tool: Option<String>,
    /// The argument names of the call's `"args"` object, once it is closed.
    args_written: Option<Vec<String>>,
    /// The string being read is a quoted argument's value.
    quoting: bool,
    /// Not JSON the scanner follows: nothing is constrained from here on.
    lost: bool,
    /// (Set by `of`.) Inside a string whose text nothing constrains.
    free_string: bool,
    /// Just after a comma: a container may not end here (`[1,]`).
    after_comma: bool,
}

#[derive(Clone, Debug)]
enum Frame {
    /// Its keys so far; the last is the key of the value being read.
    Object(Vec<String>),
    Array,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Lex {
    /// Before a value.
    #[default]
    Value,
    /// In an object, before a key or its end.
    Key,
    /// Inside a key's string (`true`: after a backslash).
    InKey(bool),
    /// After a key, before its colon.
    Colon,
    /// Inside a string value (`true`: after a backslash).
    InString(bool),
    /// Inside a number, `true`, `false` or `null`.
    Bare,
    /// After a value: a comma or the end of its container.
    After,
}

impl Scan {
    /// The state after the call's text `bytes` (the bytes after `<|tool_call|>`).
    pub fn of(q: &CallConstraint, bytes: &[u8]) -> Scan {
        let mut s = Scan::default();
        for &b in bytes {
            s.push(q, b);
        }
        s.free_string = match s.lex {
            Lex::InKey(_) => s.names_here(q, true).is_none(),
            Lex::InString(_) => !s.quoting && s.names_here(q, false).is_none(),
            _ => false,
        };
        s
    }

    /// The call's object is complete.
    fn complete(&self) -> bool {
        self.stack.is_empty() && self.lex == Lex::After && !self.lost
    }

    /// Inside a quoted argument's value: its raw text so far.
    pub fn quoted_value(&self) -> Option<&[u8]> {
        (self.quoting && !self.lost).then_some(&self.buf[..])
    }

    fn push(&mut self, q: &CallConstraint, b: u8) {
        if self.lost {
            return;
        }
        // JSON's whitespace (not form feed).
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let after_comma = std::mem::take(&mut self.after_comma);
        if after_comma && (ws || !matches!(b, b'}' | b']')) {
            self.after_comma = ws;
        } else if after_comma {
            self.lost = true;
            return;
        }
        match self.lex {
            Lex::Value | Lex::Key | Lex::Colon | Lex::After if ws => {}
            // A call is one object.
            Lex::Value if self.stack.is_empty() && b != b'{' => self.lost = true,
            Lex::Value if !self.value_fits(q, b) => self.lost = true,
            Lex::Value => match b {
                b'{' => {
                    self.stack.push(Frame::Object(Vec::new()));
                    self.lex = Lex::Key;
                }
                b'[' => self.stack.push(Frame::Array),
                b']' => self.close(Frame::Array),
                b'"' => {
                    self.buf.clear();
                    self.quoting = self.quoted_here(q);
                    self.lex = Lex::InString(false);
                }
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                    self.buf.clear();
                    self.buf.push(b);
                    self.lex = Lex::Bare;
                }
                _ => self.lost = true,
            },
            Lex::Key => match b {
                b'"' => {
                    self.buf.clear();
                    self.lex = Lex::InKey(false);
                }
                b'}' => self.close(Frame::Object(Vec::new())),
                _ => self.lost = true,
            },
            Lex::InKey(escaped) | Lex::InString(escaped) => {
                let in_key = matches!(self.lex, Lex::InKey(_));
                if b < 0x20 {
                    // A raw control character: JSON wants it escaped.
                    self.lost = true;
                    return;
                }
                if b == b'"' && !escaped {
                    if !self.name_fits(q, in_key, true) {
                        self.lost = true;
                        return;
                    }
                    if in_key {
                        let key = String::from_utf8_lossy(&self.buf).into_owned();
                        match self.stack.last_mut() {
                            // A key written twice is not one call's meaning.
                            Some(Frame::Object(keys)) if !keys.contains(&key) => keys.push(key),
                            _ => self.lost = true,
                        }
                        self.lex = Lex::Colon;
                    } else {
                        if self.stack.len() == 1 && self.key(0) == Some("tool") {
                            self.tool = Some(String::from_utf8_lossy(&self.buf).into_owned());
                        }
                        self.quoting = false;
                        self.lex = Lex::After;
                    }
                    return;
                }
                self.buf.push(b);
                if !self.name_fits(q, in_key, false) {
                    self.lost = true;
                }
                let escaped = b == b'\\' && !escaped;
                self.lex = if in_key {
                    Lex::InKey(escaped)
                } else {
                    Lex::InString(escaped)
                };
            }
            Lex::Colon => match b {
                b':' => self.lex = Lex::Value,
                _ => self.lost = true,
            },
            // A number, `true`, `false` or `null`, once it ends.
            Lex::Bare if ws || b",}]".contains(&b) => {
                if serde_json::from_slice::<serde_json::Value>(&self.buf).is_err() {
                    self.lost = true;
                    return;
                }
                self.lex = Lex::After;
                if !ws {
                    self.push(q, b);
                }
            }
            Lex::Bare => {
                self.buf.push(b);
                let literal = ["true", "false", "null"]
                    .iter()
                    .any(|l| l.as_bytes().starts_with(&self.buf));
                // A number's prefix is a number, or one with a digit more ("1.", "-", "2e+").
                let json = |t: &[u8]| serde_json::from_slice::<serde_json::Number>(t).is_ok();
                if !literal && !json(&self.buf) && !json(&[&self.buf[..], b"0"].concat()) {
                    self.lost = true;
                }
            }
            Lex::After => match b {
                b',' => {
                    self.after_comma = true;
                    self.lex = match self.stack.last() {
                        Some(Frame::Object(_)) => Lex::Key,
                        Some(Frame::Array) => Lex::Value,
                        None => {
                            self.lost = true;
                            Lex::After
                        }
                    };
                    // Only where another key can still follow.
                    if self.lex == Lex::Key && !self.key_can_follow(q) {
                        self.lost = true;
                    }
                }
                b'}' => self.close(Frame::Object(Vec::new())),
                b']' => self.close(Frame::Array),
                _ => self.lost = true,
            },
        }
    }

    /// Some key not yet written in the innermost object may be written (where names are known).
    fn key_can_follow(&self, q: &CallConstraint) -> bool {
        let Some(names) = self.names_here(q, true) else {
            return true;
        };
        match self.stack.last() {
            Some(Frame::Object(keys)) => names.iter().any(|n| !keys.contains(n)),
            _ => true,
        }
    }

    /// Ends the innermost container, which must be of `kind`'s sort.
    fn close(&mut self, kind: Frame) {
        let closes_args = self.stack.len() == 2 && self.key(0) == Some("args");
        if self.stack.len() == 1 && self.tool.is_none() {
            // A call names its tool.
            self.lost = true;
            return;
        }
        match (self.stack.pop(), kind) {
            (Some(Frame::Object(keys)), Frame::Object(_)) => {
                if closes_args {
                    self.args_written = Some(keys);
                }
                self.lex = Lex::After
            }
            (Some(Frame::Array), Frame::Array) => self.lex = Lex::After,
            _ => self.lost = true,
        }
    }

    fn key(&self, depth: usize) -> Option<&str> {
        match self.stack.get(depth) {
            Some(Frame::Object(keys)) => keys.last().map(String::as_str),
            _ => None,
        }
    }

    /// The names the key (`in_key`) or string value being read must be one of, where the
    /// registry says: the call's keys; the argument names of the tools that fit the call so far;
    /// an argument's enum; the names of the tools that take the arguments written.
    fn names_here(&self, q: &CallConstraint, in_key: bool) -> Option<Vec<String>> {
        match (in_key, self.stack.len(), self.key(0)) {
            (true, 1, _) => Some(CALL_KEYS.map(String::from).to_vec()),
            (true, 2, Some("args")) => {
                let tools = self.tools_here(q)?;
                Some(
                    tools
                        .iter()
                        .flat_map(|t| q.arg_schemas[*t].keys().cloned())
                        .collect(),
                )
            }
            (false, 2, Some("args")) => {
                let mut names = Vec::new();
                for schema in self.arg_schemas_here(q)? {
                    let one_of = schema.get("enum")?.as_array()?;
                    names.extend(one_of.iter().filter_map(|v| v.as_str().map(str::to_string)));
                }
                Some(names)
            }
            (false, 1, Some("tool")) => match &self.args_written {
                Some(args) => Some(q.fitting(args)?.into_iter().cloned().collect()),
                None => Some(q.tool_names.clone()),
            },
            _ => None,
        }
    }

    /// Inside `"args"`: the tools the call may be for (its tool, once written; else those that
    /// take every argument written so far). `None`: not known (a tool lists no arguments).
    fn tools_here<'q>(&self, q: &'q CallConstraint) -> Option<Vec<&'q String>> {
        match &self.tool {
            Some(t) => q.arg_schemas.get_key_value(t).map(|(t, _)| vec![t]),
            None => match self.stack.get(1) {
                Some(Frame::Object(written)) => q.fitting(written),
                _ => None,
            },
        }
    }

    /// The schemas of the argument whose value is being read, in the tools it may be for.
    fn arg_schemas_here<'q>(&self, q: &'q CallConstraint) -> Option<Vec<&'q serde_json::Value>> {
        if self.stack.len() != 2 || self.key(0) != Some("args") {
            return None;
        }
        let k = self.key(1)?;
        let tools = self.tools_here(q)?;
        let schemas: Vec<_> = tools
            .iter()
            .filter_map(|t| q.arg_schemas[*t].get(k))
            .collect();
        (!schemas.is_empty()).then_some(schemas)
    }

    /// A value may start with `b` here: its first byte names a JSON type its argument's schema
    /// allows, in one of the tools the call may be for (no schema: any type).
    fn value_fits(&self, q: &CallConstraint, b: u8) -> bool {
        match (self.stack.len(), self.key(0)) {
            (1, Some("tool")) => return b == b'"',
            (1, Some("args")) => return b == b'{',
            _ => {}
        }
        let kind = match b {
            b'"' => "string",
            b'-' | b'0'..=b'9' => "number",
            b'[' => "array",
            b'{' => "object",
            b't' | b'f' => "boolean",
            _ => "null",
        };
        let Some(schemas) = self.arg_schemas_here(q) else {
            return true;
        };
        let mut kinds = Vec::new();
        !schemas.iter().all(|s| json_types(s, &mut kinds))
            || kinds
                .iter()
                .any(|k| *k == kind || (*k == "integer" && kind == "number"))
    }

    /// The key (`in_key`) or string being read is, or with `whole` can still become, one of
    /// `names_here` (a key not yet written in its object), where there is such a list.
    fn name_fits(&self, q: &CallConstraint, in_key: bool, whole: bool) -> bool {
        let Some(names) = self.names_here(q, in_key) else {
            return true;
        };
        let used = |n: &String| match self.stack.last() {
            Some(Frame::Object(keys)) if in_key => keys.contains(n),
            _ => false,
        };
        names.iter().any(|n| {
            !used(n)
                && if whole {
                    n.as_bytes() == self.buf
                } else {
                    n.as_bytes().starts_with(&self.buf)
                }
        })
    }

    /// A string starting here is the value of `{"tool": T, "args": {K: here}}` with K quoted by T
    /// (by every tool that has a K, while T is not yet written).
    fn quoted_here(&self, q: &CallConstraint) -> bool {
        self.stack.len() == 2
            && self.key(0) == Some("args")
            && self.key(1).is_some_and(|k| match &self.tool {
                Some(t) => q.args.get(t).is_some_and(|ks| ks.iter().any(|x| x == k)),
                None => q.any_tool.contains(k),
            })
    }
}

impl CallConstraint {
    /// What `reg`'s tools accept (names, schemas, `Tool::quoted_args`), for `tok`'s model.
    pub fn new(reg: &Registry, tok: &Tokenizer) -> CallConstraint {
        let special: Vec<u32> = Special::ALL
            .iter()
            .filter_map(|&s| tok.special_id(s))
            .collect();
        let tokens = (0..tok.vocab_size() as u32)
            .map(|id| (!special.contains(&id)).then(|| tok.token_bytes(id)))
            .collect();
        CallConstraint {
            args: reg.quoted_args(),
            any_tool: quoted_by_any_tool(reg),
            tokens,
            closers: [Special::EndToolCall, Special::EndOfText]
                .iter()
                .filter_map(|&s| tok.special_id(s))
                .collect(),
            tool_names: reg.names().iter().map(|n| n.to_string()).collect(),
            arg_schemas: reg
                .names()
                .iter()
                .filter_map(|&t| {
                    let props = reg.get(t)?.schema()["properties"].as_object()?.clone();
                    Some((t.to_string(), props))
                })
                .collect(),
        }
    }

    /// The tools that take every argument in `args`; `None` when a tool does not list its own.
    fn fitting(&self, args: &[String]) -> Option<Vec<&String>> {
        if self.arg_schemas.len() < self.tool_names.len() {
            return None;
        }
        let fits = |t: &&String| args.iter().all(|a| self.arg_schemas[*t].contains_key(a));
        Some(self.arg_schemas.keys().filter(fits).collect())
    }

    /// The text quoted values are checked against: what the user said (`GenOptions::quotable`)
    /// as it would be written inside a JSON string, line breaks and tabs as spaces (so that an
    /// escape's letter, `\n`, does not join the next word).
    pub fn source(text: &str) -> Vec<u8> {
        let flat: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let quoted = serde_json::to_string(&flat).expect("a string serialises");
        quoted.as_bytes()[1..quoted.len() - 1].to_vec()
    }

    /// Whether token `id` may come next in a call whose text so far left `scan`:
    /// - the call stays one JSON object, and ends (`<|end_tool_call|>`, or end-of-text) only once
    ///   that object is complete;
    /// - a quoted value stays a piece of `source` that starts where a word starts, and when the
    ///   token ends it, whole words of it (the rest of the token is scanned on).
    ///
    /// Text that is no JSON already (a call written without the mask) is not constrained.
    pub fn allowed(&self, scan: &Scan, source: &[u8], id: u32) -> bool {
        if scan.lost {
            return true;
        }
        let Some(tok) = self.tokens.get(id as usize) else {
            return false;
        };
        let Some(tok) = tok else {
            return scan.complete() && self.closers.contains(&id);
        };
        if tok.is_empty() {
            // An unused id (padding): it writes nothing, so it could repeat forever.
            return false;
        }
        // Inside a free string, a token without a quote stays in it: nothing to check.
        if scan.free_string && !tok.contains(&b'"') {
            return true;
        }
        let mut s = scan.clone();
        for &b in tok {
            let was_quoting = s.quoting;
            s.push(self, b);
            if s.lost || (was_quoting && !s.quoting && !occurs(source, &s.buf, true)) {
                return false;
            }
        }
        !s.quoting || occurs(source, &s.buf, false)
    }

    /// Which ids may come next, given the model's `logits` for them.
    ///
    /// Inside a quoted value, whether it ends here is the model's choice, what it says is not:
    /// when the tokens that would end it (allowed or not) are less likely together than those
    /// that would go on, only allowed tokens that go on are kept, and the reverse. Otherwise a
    /// model that wants a word the text does not have ("findbox" for "toolbox") would end the
    /// value early, on the best-scoring token it may write, instead of copying on.
    pub fn mask(&self, scan: &Scan, source: &[u8], logits: &[f32]) -> Vec<bool> {
        // One entry per logit: a model may pad its vocabulary past the tokenizer's ids, and
        // those ids are never allowed.
        let n = logits.len();
        if scan.lost {
            return vec![true; n];
        }
        let mut mask: Vec<bool> = (0..n as u32)
            .map(|id| self.allowed(scan, source, id))
            .collect();
        if scan.quoted_value().is_none() {
            return mask;
        }
        // Per id: whether it would end the value (specials do), or neither (no text at all).
        let escaped = scan.lex == Lex::InString(true);
        let ends: Vec<Option<bool>> = (0..n)
            .map(|i| match self.tokens.get(i) {
                Some(None) => Some(true),
                Some(Some(t)) if !t.is_empty() => Some(ends_string(t, escaped)),
                _ => None,
            })
            .collect();
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        let (mut p_end, mut p_on) = (0f64, 0f64);
        for (&l, e) in logits.iter().zip(&ends) {
            let p = ((l - max) as f64).exp();
            match e {
                Some(true) => p_end += p,
                Some(false) => p_on += p,
                None => {}
            }
        }
        let end = p_end >= p_on;
        if (0..n).any(|i| mask[i] && ends[i] == Some(end)) {
            for i in 0..n {
                mask[i] &= ends[i] == Some(end);
            }
        }
        mask
    }
}

/// Whether `tok`, written inside a string (`escaped`: just after a backslash), ends it.
fn ends_string(tok: &[u8], mut escaped: bool) -> bool {
    for &b in tok {
        if b == b'"' && !escaped {
            return true;
        }
        escaped = b == b'\\' && !escaped;
    }
    false
}

/// Adds the JSON types `schema` allows to `out`; false when it does not say (any type).
fn json_types<'s>(schema: &'s serde_json::Value, out: &mut Vec<&'s str>) -> bool {
    if let Some(values) = schema["enum"].as_array() {
        for v in values {
            out.push(match v {
                serde_json::Value::String(_) => "string",
                serde_json::Value::Number(_) => "number",
                serde_json::Value::Bool(_) => "boolean",
                _ => "null",
            });
        }
        true
    } else if let Some(t) = schema["type"].as_str() {
        out.push(t);
        true
    } else if let Some(options) = schema["anyOf"].as_array() {
        options.iter().all(|o| json_types(o, out))
    } else {
        false
    }
}

/// The argument names that every tool of `reg` having one quotes.
fn quoted_by_any_tool(reg: &Registry) -> BTreeSet<String> {
    let args = reg.quoted_args();
    let quotes = |t: &str, k: &str| args.get(t).is_some_and(|ks| ks.iter().any(|x| x == k));
    let has = |t: &str, k: &str| {
        reg.get(t)
            .is_some_and(|tool| tool.schema()["properties"].get(k).is_some())
    };
    args.values()
        .flatten()
        .filter(|k| reg.names().iter().all(|t| !has(t, k) || quotes(t, k)))
        .cloned()
        .collect()
}

/// `needle` is a piece of `hay` (but for a capital first letter written small) that starts where a
/// word starts, not with a space, and can end as a value may: where a word ends, not with a space
/// or a sentence's punctuation ("mum." is "mum"). With `whole` it ends there; otherwise it ends
/// there or a later word of `hay` is still to come (a value that can no longer end is a dead end).
fn occurs(hay: &[u8], needle: &[u8], whole: bool) -> bool {
    // A letter or digit, or a byte of a non-ASCII character (most of them are letters).
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b >= 0x80;
    let word = |i: usize| hay.get(i).is_some_and(|&b| is_word(b));
    let Some((&first, rest)) = needle.split_first() else {
        return !whole;
    };
    if first.is_ascii_whitespace() {
        return false;
    }
    let n = needle.len();
    let last = needle[n - 1];
    let can_end_here =
        |p: usize| !last.is_ascii_whitespace() && !b".,;:!?".contains(&last) && !word(p + n);
    // A sentence's capital may become small ("Buy milk" → "buy milk"), not the reverse.
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), hay).any(|p| {
        hay[p + 1..].starts_with(rest)
            && (p == 0 || !word(p - 1))
            && (can_end_here(p) || (!whole && hay[p + n..].iter().any(|&b| is_word(b))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    fn quoting() -> CallConstraint {
        let args = BTreeMap::from([("todos".to_string(), vec!["text".to_string()])]);
        let pieces = [
            "\"",
            "call",
            " Kenji",
            " In",
            "ji",
            "\"}",
            "\", \"",
            "\"text\": \"",
            "ken",
            "x",
            "all",
            " Ken",
            "}",
            " as done",
        ];
        let mut tokens: Vec<_> = pieces.iter().map(|p| Some(p.as_bytes().to_vec())).collect();
        tokens.push(None); // 14: <|end_tool_call|>
        tokens.push(Some(b".".to_vec())); // 15
        tokens.push(Some(Vec::new())); // 16: an unused id
        CallConstraint {
            args,
            any_tool: BTreeSet::from(["text".to_string()]),
            tokens,
            closers: vec![14],
            tool_names: vec!["notes".into(), "todos".into()],
            arg_schemas: BTreeMap::from([
                (
                    "notes".to_string(),
                    schema(json!({"query": {"type": "string"}, "limit": {}})),
                ),
                (
                    "todos".to_string(),
                    schema(
                        json!({"action": {"enum": ["add", "list"]}, "text": {"type": "string"}}),
                    ),
                ),
            ]),
        }
    }

    #[test]
    fn a_quoted_value_extends_only_to_text_of_the_transcript() {
        let q = quoting();
        let src = CallConstraint::source("User: please remind me to Call Kenji tomorrow");
        let head = br#"{"tool": "todos", "args": {"action": "add", "text": "call"#;
        let scan = Scan::of(&q, head);
        assert_eq!(scan.quoted_value(), Some(&b"call"[..]));
        let ok: Vec<bool> = (0..10).map(|id| q.allowed(&scan, &src, id)).collect();
        // `"` ends the value "call"; " Kenji" extends it; " In" does not occur; `"}` ends it;
        // `", "` would end it and go on to a key todos does not have; `"text": "` would go on
        // with no comma.
        assert_eq!(
            ok,
            [
                true, false, true, false, false, true, false, false, false, false
            ]
        );
        // A token that opens the value is checked too, and the action's value is one of its enum.
        let before = Scan::of(&q, br#"{"tool": "todos", "args": {"action": "add", "#);
        assert!(before.quoted_value().is_none());
        assert!(q.allowed(&before, &src, 7));
        let action = Scan::of(&q, br#"{"tool": "todos", "args": {"action": ""#);
        assert!(!q.allowed(&action, &src, 9));
        // Another tool's argument is not quoted (here free text); before the tool is known,
        // "text" is.
        let other = Scan::of(&q, br#"{"tool": "notes", "args": {"query": ""#);
        assert!(other.quoted_value().is_none() && q.allowed(&other, &src, 3));
        let sorted = Scan::of(&q, br#"{"args": {"text": ""#);
        assert!(q.allowed(&sorted, &src, 1) && !q.allowed(&sorted, &src, 10));
        // Whole words: "all" starts inside "call"; "call Ken" may go on, but not end there.
        let ken = Scan::of(&q, br#"{"args":{"text":"call Ken"#);
        assert!(q.allowed(&ken, &src, 4) && !q.allowed(&ken, &src, 0));
    }

    #[test]
    fn arguments_are_quoted_whatever_the_tool_when_no_tool_disagrees() {
        let dir = std::env::temp_dir().join(format!("tb-quote-{}", std::process::id()));
        let reg = Registry::standard(&crate::tools::Options {
            db: Some(dir.join("t.db")),
            external: false,
            ..Default::default()
        });
        let any: Vec<String> = quoted_by_any_tool(&reg).into_iter().collect();
        assert_eq!(any, ["body", "note", "query", "tag", "text", "title"]);
    }

    #[test]
    fn the_model_decides_whether_a_value_ends_and_the_text_what_it_says() {
        let q = quoting();
        let src = CallConstraint::source("remind me to call Kenji");
        let scan = Scan::of(&q, br#"{"args":{"text":"call"#);
        // The model wants " In" (not in the text): going on outweighs ending, so `"` is masked
        // and the copy " Kenji" is what it may write.
        let mut logits = vec![0f32; 12];
        logits[3] = 5.0;
        let keep: Vec<u32> = (0..12u32)
            .filter(|&i| q.mask(&scan, &src, &logits)[i as usize])
            .collect();
        assert_eq!(keep, [2, 11]);
        // It wants to end: only tokens that end the value are kept.
        logits[3] = 0.0;
        logits[0] = 5.0;
        let keep: Vec<u32> = (0..12u32)
            .filter(|&i| q.mask(&scan, &src, &logits)[i as usize])
            .collect();
        assert_eq!(keep, [0, 5, 6]);
    }

    #[test]
    fn the_call_stays_one_json_object_and_ends_when_it_is_complete() {
        let q = quoting();
        let src = CallConstraint::source("remind me to call Kenji.");
        let allowed = |text: &[u8]| -> Vec<u32> {
            let scan = Scan::of(&q, text);
            (0..17).filter(|&i| q.allowed(&scan, &src, i)).collect()
        };
        // After a value: a comma or the object's end, not the end marker or more words.
        assert_eq!(allowed(br#"{"args":{"text":"call Kenji""#), [12]);
        assert_eq!(
            allowed(br#"{"args":{"text":"call Kenji"},"tool":"todos"}"#),
            [14]
        );
        // A key is written once.
        assert!(!allowed(br#"{"args":{"text":"call","#).contains(&7));
        // A value may not end on the sentence's full stop, nor go on to where it cannot end.
        let kenji = Scan::of(&q, br#"{"args":{"text":"call Kenji."#);
        assert!(!q.allowed(&kenji, &src, 0));
        let kenji = Scan::of(&q, br#"{"args":{"text":"call Kenji"#);
        assert!(q.allowed(&kenji, &src, 0) && !q.allowed(&kenji, &src, 15));
        // Keys, the tool's name and bare values are what the registry and JSON allow.
        assert!(!allowed(br#"{"ar"#).contains(&1));
        assert!(!allowed(br#"{"args":{"text":"call"},"tool":""#).contains(&1));
        assert!(!allowed(br#"{"tool":"notes","args":{"limit":t"#).contains(&9));
        assert!(!allowed(br#"{"args":{"text":"#).contains(&12)); // a string, not an object
        assert!(!allowed(br#"{"tool":"todos","args":{"te"#).contains(&8));
        assert!(!allowed(br#"{"tool":"todos","args":{""#).contains(&10));
        // No trailing comma, no comma where no key can follow, no call without its tool, and
        // the tool's name a string.
        assert!(!allowed(br#"{"args":{"text":"call","#).contains(&12));
        let both = allowed(br#"{"args":{"action":"add","text":"call"#);
        assert!(both.contains(&5) && !both.contains(&6));
        assert!(!allowed(br#"{"args":{"text":"call"}"#).contains(&12));
        assert!(!allowed(br#"{"args":{"text":"call"},"tool":"#).contains(&10));
        // An unused id is never allowed, and the mask covers a padded vocabulary.
        assert!(!allowed(br#"{"args":{"text":"ca"#).contains(&16));
        let m = q.mask(&Scan::of(&q, br#"{"#), &src, &[0.0; 20]);
        assert_eq!(m.len(), 20);
        assert!(!m[16..].iter().any(|&x| x));
        // A call is an object: nothing else may start it.
        assert_eq!(allowed(b""), Vec::<u32>::new());
    }

    #[test]
    fn escapes_and_case_follow_the_json_form() {
        let q = quoting();
        let src = CallConstraint::source("save \"Ken\\x\" now\nCall");
        let scan = Scan::of(&q, br#"{"tool":"todos","args":{"text":"\"Ken\\"#);
        assert_eq!(scan.quoted_value(), Some(&br#"\"Ken\\"#[..]));
        assert!(q.allowed(&scan, &src, 9)); // x
        // Only a first letter's case may differ; a line break is a word boundary.
        let upper = Scan::of(&q, br#"{"tool":"todos","args":{"text":"\"KEN\\"#);
        assert!(!q.allowed(&upper, &src, 9));
        let call = Scan::of(&q, br#"{"tool":"todos","args":{"text":""#);
        assert!(q.allowed(&call, &src, 1));
        let broken = Scan::of(&q, br#"{"tool":"todos" "args""#);
        assert!(broken.quoted_value().is_none() && q.allowed(&broken, &src, 3));
    }
}
