//! Constrained tool calls: an argument that quotes the conversation (a todo's text, a note's
//! title: `Tool::quoted_args`) may only take text that occurs earlier in the conversation.
//!
//! A small model routes a request well but garbles a name it never saw in training ("Kenji" →
//! "Inji"). While it writes such an argument, `Quoting::mask` keeps the tokens that extend the
//! value to a piece of the conversation's text (what the user, the tools and the assistant said;
//! not the system prompt) and masks the rest, so the most likely *possible* continuation wins:
//! the name is copied. A value is whole words of the text, copied as written but for a capital
//! first letter, which may be written small ("Buy milk" → "buy milk"): it starts where a word
//! starts and ends where one ends. The comparison is made on the JSON-escaped text, the form the model writes. Whether the
//! value ends is the model's choice (`mask`). Everything outside those values (the tool name,
//! other arguments, the end marker) is left to the model.
//!
//! A call's keys come sorted (`{"args": {...}, "tool": ...}`, as serde writes them), so the tool is
//! usually not known while its arguments are written: then an argument is quoted when every tool
//! that has an argument of that name quotes it (`text`, `title`, `query`... of the built-ins).

use crate::tokenizer::{Special, Tokenizer};
use crate::tools::Registry;
use std::collections::{BTreeMap, BTreeSet};

/// The quoted arguments of a registry's tools, and the bytes of every token of the model.
#[derive(Debug)]
pub struct Quoting {
    /// Tool name → its quoted argument names.
    args: BTreeMap<String, Vec<String>>,
    /// The argument names quoted whatever the tool (every tool that has one quotes it).
    any_tool: BTreeSet<String>,
    /// Each token id's bytes (a special token: `None`, never part of a quoted value).
    tokens: Vec<Option<Vec<u8>>>,
}

/// Where the text of a partial tool call stands, as far as quoting needs to know.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Open containers, outermost first; an object's entry is the key of the value being read.
    stack: Vec<Frame>,
    lex: Lex,
    /// The key or string value being read, raw (escapes as written).
    buf: Vec<u8>,
    /// The call's top-level `"tool"` value, once read.
    tool: Option<String>,
    /// The string being read is a quoted argument's value.
    quoting: bool,
    /// Not JSON the scanner follows: nothing is constrained from here on.
    lost: bool,
}

#[derive(Clone, Debug)]
enum Frame {
    Object(Option<String>),
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
    pub fn of(q: &Quoting, bytes: &[u8]) -> Scan {
        let mut s = Scan::default();
        for &b in bytes {
            s.push(q, b);
        }
        s
    }

    /// Inside a quoted argument's value: its raw text so far.
    pub fn quoted_value(&self) -> Option<&[u8]> {
        (self.quoting && !self.lost).then_some(&self.buf[..])
    }

    fn push(&mut self, q: &Quoting, b: u8) {
        if self.lost {
            return;
        }
        let ws = b.is_ascii_whitespace();
        match self.lex {
            Lex::Value | Lex::Key | Lex::Colon | Lex::After if ws => {}
            Lex::Value => match b {
                b'{' => {
                    self.stack.push(Frame::Object(None));
                    self.lex = Lex::Key;
                }
                b'[' => self.stack.push(Frame::Array),
                b']' => self.close(Frame::Array),
                b'"' => {
                    self.buf.clear();
                    self.quoting = self.quoted_here(q);
                    self.lex = Lex::InString(false);
                }
                _ => self.lex = Lex::Bare,
            },
            Lex::Key => match b {
                b'"' => {
                    self.buf.clear();
                    self.lex = Lex::InKey(false);
                }
                b'}' => self.close(Frame::Object(None)),
                _ => self.lost = true,
            },
            Lex::InKey(escaped) | Lex::InString(escaped) => {
                let in_key = matches!(self.lex, Lex::InKey(_));
                if b == b'"' && !escaped {
                    if in_key {
                        let key = String::from_utf8_lossy(&self.buf).into_owned();
                        match self.stack.last_mut() {
                            Some(Frame::Object(k)) => *k = Some(key),
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
            Lex::Bare if ws => self.lex = Lex::After,
            Lex::Bare | Lex::After => match b {
                b',' => {
                    self.lex = match self.stack.last() {
                        Some(Frame::Object(_)) => Lex::Key,
                        Some(Frame::Array) => Lex::Value,
                        None => {
                            self.lost = true;
                            Lex::After
                        }
                    }
                }
                b'}' => self.close(Frame::Object(None)),
                b']' => self.close(Frame::Array),
                _ if self.lex == Lex::Bare => {}
                _ => self.lost = true,
            },
        }
    }

    /// Ends the innermost container, which must be of `kind`'s sort.
    fn close(&mut self, kind: Frame) {
        match (self.stack.pop(), kind) {
            (Some(Frame::Object(_)), Frame::Object(_)) | (Some(Frame::Array), Frame::Array) => {
                self.lex = Lex::After
            }
            _ => self.lost = true,
        }
    }

    fn key(&self, depth: usize) -> Option<&str> {
        match self.stack.get(depth) {
            Some(Frame::Object(Some(k))) => Some(k),
            _ => None,
        }
    }

    /// A string starting here is the value of `{"tool": T, "args": {K: here}}` with K quoted by T
    /// (by every tool that has a K, while T is not yet written).
    fn quoted_here(&self, q: &Quoting) -> bool {
        self.stack.len() == 2
            && self.key(0) == Some("args")
            && self.key(1).is_some_and(|k| match &self.tool {
                Some(t) => q.args.get(t).is_some_and(|ks| ks.iter().any(|x| x == k)),
                None => q.any_tool.contains(k),
            })
    }
}

impl Quoting {
    /// The quoted arguments of `reg`'s tools (`Tool::quoted_args`), for `tok`'s model.
    pub fn new(reg: &Registry, tok: &Tokenizer) -> Quoting {
        let special: Vec<u32> = Special::ALL
            .iter()
            .filter_map(|&s| tok.special_id(s))
            .collect();
        let tokens = (0..tok.vocab_size() as u32)
            .map(|id| (!special.contains(&id)).then(|| tok.token_bytes(id)))
            .collect();
        Quoting {
            args: reg.quoted_args(),
            any_tool: quoted_by_any_tool(reg),
            tokens,
        }
    }

    /// The text quoted values are checked against: the conversation's text (`GenOptions::quotable`)
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

    /// Whether token `id` may come next in a call whose text so far left `scan`: it writes no
    /// quoted value, or it extends the one being written to a piece of `source` (when it also
    /// closes the value, the rest of the token is scanned on for another one).
    pub fn allowed(&self, scan: &Scan, source: &[u8], id: u32) -> bool {
        let Some(tok) = self.tokens.get(id as usize) else {
            return false;
        };
        if scan.lost || (!scan.quoting && !tok.as_ref().is_some_and(|t| t.contains(&b'"'))) {
            return true;
        }
        let Some(tok) = tok else {
            // A special token inside a value would cut the call short.
            return !scan.quoting;
        };
        let mut s = scan.clone();
        for &b in tok {
            let was_quoting = s.quoting;
            s.push(self, b);
            if was_quoting && !s.quoting && !occurs(source, &s.buf, true) {
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
        let n = self.tokens.len().min(logits.len());
        let mut mask: Vec<bool> = (0..n as u32)
            .map(|id| self.allowed(scan, source, id))
            .collect();
        if scan.quoted_value().is_none() {
            return mask;
        }
        let escaped = scan.lex == Lex::InString(true);
        let ends: Vec<bool> = self.tokens[..n]
            .iter()
            .map(|t| t.as_ref().is_none_or(|t| ends_string(t, escaped)))
            .collect();
        let max = logits[..n].iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        let (mut p_end, mut p_on) = (0f64, 0f64);
        for (i, &l) in logits[..n].iter().enumerate() {
            let p = ((l - max) as f64).exp();
            if ends[i] { p_end += p } else { p_on += p }
        }
        let end = p_end >= p_on;
        if (0..n).any(|i| mask[i] && ends[i] == end) {
            for i in 0..n {
                mask[i] &= ends[i] == end;
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

/// Whether `value` (a string value's raw JSON text) may be written as a whole quoted argument when
/// the conversation's text is `source` (`Quoting::source`).
pub fn quotes(source: &[u8], value: &[u8]) -> bool {
    occurs(source, value, true)
}

/// `needle` is a piece of `hay` (but for a capital first letter written small) that starts where a
/// word starts, not with a space, and when `whole`, is not empty and ends where a word ends.
fn occurs(hay: &[u8], needle: &[u8], whole: bool) -> bool {
    // A letter or digit, or a byte of a non-ASCII character (most of them are letters).
    let word = |i: usize| {
        hay.get(i)
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b >= 0x80)
    };
    let Some((&first, rest)) = needle.split_first() else {
        return !whole;
    };
    if first.is_ascii_whitespace() {
        return false;
    }
    let n = needle.len();
    // A sentence's capital may become small ("Buy milk" → "buy milk"), not the reverse.
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), hay).any(|p| {
        hay[p + 1..].starts_with(rest) && (p == 0 || !word(p - 1)) && (!whole || !word(p + n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoting() -> Quoting {
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
        ];
        Quoting {
            args,
            any_tool: BTreeSet::from(["text".to_string()]),
            tokens: pieces.iter().map(|p| Some(p.as_bytes().to_vec())).collect(),
        }
    }

    #[test]
    fn a_quoted_value_extends_only_to_text_of_the_transcript() {
        let q = quoting();
        let src = Quoting::source("User: please remind me to Call Kenji tomorrow");
        let head = br#"{"tool": "todos", "args": {"action": "add", "text": "call"#;
        let scan = Scan::of(&q, head);
        assert_eq!(scan.quoted_value(), Some(&b"call"[..]));
        let ok: Vec<bool> = (0..10).map(|id| q.allowed(&scan, &src, id)).collect();
        // `"` ends the value "call"; " Kenji" extends it; " In" does not occur; `"}` ends it.
        assert_eq!(
            ok,
            [
                true, false, true, false, false, true, true, true, false, false
            ]
        );
        // A token that opens the value is checked too, and the action's value is free.
        let before = Scan::of(&q, br#"{"tool": "todos", "args": {"action": "add", "#);
        assert!(before.quoted_value().is_none());
        assert!(q.allowed(&before, &src, 7));
        let action = Scan::of(&q, br#"{"tool": "todos", "args": {"action": ""#);
        assert!(q.allowed(&action, &src, 9));
        // Another tool's "text" is not quoted; before the tool is known, "text" is.
        let other = Scan::of(&q, br#"{"tool": "notes", "args": {"text": ""#);
        assert!(other.quoted_value().is_none());
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
        let src = Quoting::source("remind me to call Kenji");
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
        assert_eq!(keep, [0, 5, 6, 7]);
    }

    #[test]
    fn escapes_and_case_follow_the_json_form() {
        let q = quoting();
        let src = Quoting::source("save \"Ken\\x\" now\nCall");
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
