//! The RWKV World tokenizer (`rwkv_vocab_v20230424` of BlinkDL/RWKV-LM): a vocabulary of byte
//! strings, encoded by greedy longest match on the raw UTF-8 bytes, decoded by concatenating token
//! bytes.
//!
//! The vocabulary file has one `<id> <python literal> <byte length>` line per token; the literal is a
//! Python `str` (stored as its UTF-8 bytes) or a `b'...'` bytes literal. Id 0 is not in the file: it is
//! `<|endoftext|>`. The tool-call markers take four ids at the end of the padded 65536-id model
//! vocabulary, so every World vocabulary here has the same special ids.

use super::Special;
use crate::bad_data;
use crate::error::Result;

/// Ids the model vocabulary is padded to, as in the official World models.
pub const WORLD_VOCAB_SIZE: usize = 65536;
/// Where the four tool markers live: 65530..65533 (65534 and 65535 stay unused padding).
const FIRST_MARKER_ID: u32 = 65530;
const NO_TOKEN: u32 = u32::MAX;

/// The id of a special token in every World vocabulary.
pub fn special_id(s: Special) -> u32 {
    match s {
        Special::EndOfText => 0,
        Special::ToolCall => FIRST_MARKER_ID,
        Special::EndToolCall => FIRST_MARKER_ID + 1,
        Special::ToolResult => FIRST_MARKER_ID + 2,
        Special::EndToolResult => FIRST_MARKER_ID + 3,
    }
}

/// A parsed World vocabulary: the bytes of every id, and a trie over them for encoding.
pub struct WorldVocab {
    /// Indexed by id; empty for padding ids.
    tokens: Vec<Box<[u8]>>,
    trie: Trie,
}

impl WorldVocab {
    /// Parses vocabulary text. Errors say which line is wrong and how.
    pub fn parse(text: &str) -> Result<WorldVocab> {
        let mut tokens: Vec<Box<[u8]>> = vec![Box::default(); WORLD_VOCAB_SIZE];
        for s in Special::ALL {
            tokens[special_id(s) as usize] = s.as_str().as_bytes().into();
        }
        let mut n = 0usize;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (id, bytes) = parse_line(line).map_err(|e| bad_data!("line {}: {e}", i + 1))?;
            let slot = id as usize;
            if id == 0 || id >= FIRST_MARKER_ID {
                return Err(bad_data!(
                    "line {}: id {id} is reserved (0 is <|endoftext|>, {FIRST_MARKER_ID}.. are the tool markers); \
                     World vocabularies use ids 1..{FIRST_MARKER_ID}",
                    i + 1
                ));
            }
            if !tokens[slot].is_empty() {
                return Err(bad_data!("line {}: id {id} appears twice", i + 1));
            }
            tokens[slot] = bytes.into();
            n += 1;
        }
        if n == 0 {
            return Err(bad_data!(
                "no vocabulary lines (expected '<id> <python literal> <byte length>')"
            ));
        }
        // Special markers are matched only by `encode_with_special`, so they stay out of the trie.
        let entries: Vec<(&[u8], u32)> = (1..FIRST_MARKER_ID)
            .filter(|&id| !tokens[id as usize].is_empty())
            .map(|id| (&*tokens[id as usize], id))
            .collect();
        let trie = Trie::build(entries)?;
        Ok(WorldVocab { tokens, trie })
    }

    /// Greedy longest match: at each position, the longest vocabulary entry that prefixes the rest.
    pub fn encode(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(bytes.len() / 3 + 1);
        let mut pos = 0;
        while pos < bytes.len() {
            let (id, len) = self.trie.longest_prefix(&bytes[pos..]).ok_or_else(|| {
                bad_data!(
                    "byte 0x{:02x} at offset {pos} has no token in this World vocabulary; \
                     a usable vocabulary has a token for every single byte",
                    bytes[pos]
                )
            })?;
            ids.push(id);
            pos += len;
        }
        Ok(ids)
    }

    /// The bytes of one id; empty for padding ids and ids past the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.tokens.get(id as usize).map_or(&[], |t| t)
    }
}

/// Splits `<id> <literal> <byte length>`; the literal may itself contain spaces.
fn parse_line(line: &str) -> std::result::Result<(u32, Vec<u8>), String> {
    let malformed = || format!("expected '<id> <python literal> <byte length>', got {line:?}");
    let (id, rest) = line.split_once(' ').ok_or_else(malformed)?;
    let (literal, len) = rest.rsplit_once(' ').ok_or_else(malformed)?;
    let id: u32 = id.parse().map_err(|_| format!("bad id {id:?}"))?;
    let len: usize = len
        .parse()
        .map_err(|_| format!("bad byte length {len:?}"))?;
    let bytes = parse_py_literal(literal)?;
    if bytes.len() != len {
        return Err(format!(
            "literal {literal} is {} bytes but the line says {len}",
            bytes.len()
        ));
    }
    if bytes.is_empty() {
        return Err("empty token".into());
    }
    Ok((id, bytes))
}

/// Decodes a Python `str` literal (to UTF-8) or `b'...'` bytes literal, with Python's escapes:
/// `\\ \' \" \a \b \f \n \r \t \v`, octal `\ooo`, `\xhh`, and in `str` only `\uXXXX`, `\UXXXXXXXX`.
/// In a `str`, `\xhh` and octal are code points (`'\x80'` is U+0080, two UTF-8 bytes); in bytes they are
/// byte values. An unknown escape keeps its backslash, as Python does.
pub fn parse_py_literal(lit: &str) -> std::result::Result<Vec<u8>, String> {
    let (is_bytes, quoted) = match lit.strip_prefix(['b', 'B']) {
        Some(rest) => (true, rest),
        None => (false, lit),
    };
    let quote = quoted.chars().next().filter(|q| *q == '\'' || *q == '"');
    let body = quote
        .and_then(|q| quoted[1..].strip_suffix(q))
        .ok_or_else(|| format!("{lit} is not a quoted Python literal"))?;
    let mut out = Vec::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    let push_char = |out: &mut Vec<u8>, c: char| {
        if is_bytes {
            if !c.is_ascii() {
                return Err(format!("{lit}: bytes literal holds non-ASCII {c:?}"));
            }
            out.push(c as u8);
        } else {
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        }
        Ok(())
    };
    // A numeric escape: a byte in a bytes literal, a code point in a str.
    let push_value = |out: &mut Vec<u8>, v: u32| {
        if is_bytes {
            let b = u8::try_from(v).map_err(|_| format!("{lit}: escape value {v} > 255"))?;
            out.push(b);
            Ok(())
        } else {
            let c =
                char::from_u32(v).ok_or_else(|| format!("{lit}: U+{v:X} is not a character"))?;
            push_char(out, c)
        }
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            push_char(&mut out, c)?;
            continue;
        }
        let e = chars
            .next()
            .ok_or_else(|| format!("{lit}: ends in a lone backslash"))?;
        let simple = match e {
            '\\' => Some('\\'),
            '\'' => Some('\''),
            '"' => Some('"'),
            'a' => Some('\x07'),
            'b' => Some('\x08'),
            'f' => Some('\x0c'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\x0b'),
            _ => None,
        };
        if let Some(s) = simple {
            push_char(&mut out, s)?;
            continue;
        }
        let hex_digits = match e {
            'x' => 2,
            'u' if !is_bytes => 4,
            'U' if !is_bytes => 8,
            _ => 0,
        };
        if hex_digits > 0 {
            let digits: String = (0..hex_digits).filter_map(|_| chars.next()).collect();
            let v = (digits.len() == hex_digits)
                .then(|| u32::from_str_radix(&digits, 16).ok())
                .flatten()
                .ok_or_else(|| format!("{lit}: \\{e} needs {hex_digits} hex digits"))?;
            push_value(&mut out, v)?;
        } else if let Some(d) = e.to_digit(8) {
            let mut v = d;
            for _ in 0..2 {
                match chars.peek().and_then(|c| c.to_digit(8)) {
                    Some(d) => {
                        v = v * 8 + d;
                        chars.next();
                    }
                    None => break,
                }
            }
            push_value(&mut out, v)?;
        } else {
            push_char(&mut out, '\\')?;
            push_char(&mut out, e)?;
        }
    }
    Ok(out)
}

/// A byte trie stored flat: the children of node `i` are the nodes `first[i] .. first[i] + count[i]`,
/// sorted by `label`, so a step is one binary search and the whole trie is a few arrays.
struct Trie {
    label: Vec<u8>,
    first: Vec<u32>,
    count: Vec<u16>,
    token: Vec<u32>,
}

impl Trie {
    fn build(mut entries: Vec<(&[u8], u32)>) -> Result<Trie> {
        entries.sort_unstable();
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(bad_data!(
                "ids {} and {} have the same bytes {:?}",
                w[0].1,
                w[1].1,
                String::from_utf8_lossy(w[0].0)
            ));
        }
        let mut t = Trie {
            label: vec![0],
            first: vec![0],
            count: vec![0],
            token: vec![NO_TOKEN],
        };
        // Breadth first, so that all children of a node are created together and stay contiguous.
        // Each queue item: a node, the sorted entries under its prefix, and the prefix length.
        let mut queue = std::collections::VecDeque::from([(0usize, 0usize, entries.len(), 0usize)]);
        while let Some((node, mut lo, hi, depth)) = queue.pop_front() {
            if lo < hi && entries[lo].0.len() == depth {
                t.token[node] = entries[lo].1;
                lo += 1;
            }
            t.first[node] = t.label.len() as u32;
            while lo < hi {
                let b = entries[lo].0[depth];
                let end = lo + entries[lo..hi].partition_point(|e| e.0[depth] == b);
                queue.push_back((t.label.len(), lo, end, depth + 1));
                t.label.push(b);
                t.first.push(0);
                t.count.push(0);
                t.token.push(NO_TOKEN);
                t.count[node] += 1;
                lo = end;
            }
        }
        Ok(t)
    }

    /// The id and length of the longest entry that is a prefix of `bytes`.
    fn longest_prefix(&self, bytes: &[u8]) -> Option<(u32, usize)> {
        let mut node = 0usize;
        let mut best = None;
        for (i, &b) in bytes.iter().enumerate() {
            let first = self.first[node] as usize;
            let children = &self.label[first..first + self.count[node] as usize];
            match children.binary_search(&b) {
                Ok(k) => node = first + k,
                Err(_) => break,
            }
            if self.token[node] != NO_TOKEN {
                best = Some((self.token[node], i + 1));
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::parse_py_literal as p;

    #[test]
    fn python_literal_escapes() {
        assert_eq!(p(r"'\x00'").unwrap(), b"\0");
        assert_eq!(p(r"b'\x80'").unwrap(), b"\x80");
        // In a str, \x80 is the code point U+0080 (two UTF-8 bytes), not a byte.
        assert_eq!(p(r"'\x80'").unwrap(), "\u{80}".as_bytes());
        assert_eq!(p(r"'\u2002'").unwrap(), "\u{2002}".as_bytes());
        assert_eq!(p(r"'\U0001F980'").unwrap(), "🦀".as_bytes());
        assert_eq!(p(r"b'\u2002'").unwrap(), br"\u2002");
        assert_eq!(p(r"'\\'").unwrap(), b"\\");
        assert_eq!(p(r"'\''").unwrap(), b"'");
        assert_eq!(p(r#""'""#).unwrap(), b"'");
        assert_eq!(p(r#"'\"'"#).unwrap(), b"\"");
        assert_eq!(p(r"'\n\t\r\a\b\f\v'").unwrap(), b"\n\t\r\x07\x08\x0c\x0b");
        assert_eq!(p(r"'\101\0z'").unwrap(), b"A\0z");
        assert_eq!(p(r"b'\377'").unwrap(), b"\xff");
        assert_eq!(p(r"'\d'").unwrap(), br"\d");
        assert_eq!(p("'日本'").unwrap(), "日本".as_bytes());
        assert_eq!(p("' '").unwrap(), b" ");
        assert!(p("b'\\400'").is_err());
        assert!(p("'abc").is_err());
        assert!(p(r"'\x4'").is_err());
        assert!(p("b'é'").is_err());
        assert!(p("'\\'").is_err());
    }
}
