//! Text ↔ token ids: Hugging Face `tokenizer.json` files (byte-level BPE, loaded or trained) and the
//! RWKV World vocabulary, behind one `Tokenizer`.
//!
//! Two encoders on purpose (tinybit(7), PROMPT TEMPLATE): `encode` is for untrusted text (user
//! input, tool output) and never produces a special token, so nobody can forge a tool call by typing
//! `<|tool_call|>`; `encode_with_special` is for the trusted prompt template and turns the marker
//! strings into their special ids.
//!
//! A tokenizer's identity is its payload (`metadata`): the tokenizer.json text, or the name of the
//! compiled-in World vocabulary. Checkpoints store it, so a model never needs a separate file.

mod hf;
mod world;

use crate::bad_data;
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use world::WorldVocab;

/// The one World vocabulary compiled into the library.
pub const WORLD_VOCAB_NAME: &str = "rwkv_vocab_v20230424";
const WORLD_VOCAB_TEXT: &str = include_str!("rwkv_vocab_v20230424.txt");

/// The special tokens of the prompt template and the tool protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Special {
    EndOfText,
    ToolCall,
    EndToolCall,
    ToolResult,
    EndToolResult,
}

impl Special {
    pub const ALL: [Special; 5] = [
        Special::EndOfText,
        Special::ToolCall,
        Special::EndToolCall,
        Special::ToolResult,
        Special::EndToolResult,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Special::EndOfText => "<|endoftext|>",
            Special::ToolCall => "<|tool_call|>",
            Special::EndToolCall => "<|end_tool_call|>",
            Special::ToolResult => "<|tool_result|>",
            Special::EndToolResult => "<|end_tool_result|>",
        }
    }
}

/// A tokenizer of either kind. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    kind: Kind,
    /// What `metadata` returns: tokenizer.json text, the World vocabulary's name, or a custom World
    /// vocabulary's text.
    payload: String,
    /// Indexed by `Special as usize` (declaration order, the order of `Special::ALL`).
    specials: [Option<u32>; 5],
}

enum Kind {
    Hf(hf::HfTokenizer),
    World(Arc<WorldVocab>),
}

impl Tokenizer {
    /// Loads a tokenizer.json or a World vocabulary text file, told apart by content (JSON starts
    /// with `{`). Errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "reading tokenizer", e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            bad_data!(
                "tokenizer {}: not UTF-8 text ({e}); expected a tokenizer.json or a World vocabulary .txt",
                path.display()
            )
        })?;
        let loaded = if text.trim_start().starts_with('{') {
            Self::from_json_str(&text)
        } else {
            Self::from_world_text(&text)
        };
        loaded.map_err(|e| match e {
            Error::Data(msg) => bad_data!("tokenizer {}: {msg}", path.display()),
            other => other,
        })
    }

    /// A Hugging Face tokenizer from tokenizer.json text. Special tokens it lacks are added at the end
    /// of the vocabulary, and the payload is the JSON after adding them.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let mut t = hf::HfTokenizer::from_json(json)?;
        let specials = Special::ALL.map(|s| t.tok.token_to_id(s.as_str()));
        let payload = std::mem::take(&mut t.json);
        Ok(Self::new(Kind::Hf(t), payload, specials))
    }

    /// The compiled-in RWKV World vocabulary (`rwkv_vocab_v20230424`), parsed once per process.
    pub fn world() -> Self {
        static VOCAB: OnceLock<Arc<WorldVocab>> = OnceLock::new();
        let vocab = VOCAB.get_or_init(|| {
            Arc::new(
                // Cannot fail: the vocabulary is compiled in, and a test parses it.
                WorldVocab::parse(WORLD_VOCAB_TEXT)
                    .expect("the compiled-in World vocabulary parses"),
            )
        });
        Self::new_world(vocab.clone(), WORLD_VOCAB_NAME.to_string())
    }

    /// A World vocabulary from its text; the compiled-in one is recognised and named. Custom
    /// vocabularies use ids 1..65530, like the official one.
    fn from_world_text(text: &str) -> Result<Self> {
        if text == WORLD_VOCAB_TEXT {
            return Ok(Self::world());
        }
        let vocab = WorldVocab::parse(text).map_err(|e| match e {
            Error::Data(msg) => bad_data!("World vocabulary {msg}"),
            other => other,
        })?;
        Ok(Self::new_world(Arc::new(vocab), text.to_string()))
    }

    fn new_world(vocab: Arc<WorldVocab>, payload: String) -> Self {
        let specials = Special::ALL.map(|s| Some(world::special_id(s)));
        Self::new(Kind::World(vocab), payload, specials)
    }

    fn new(kind: Kind, payload: String, specials: [Option<u32>; 5]) -> Self {
        Tokenizer {
            inner: Arc::new(Inner {
                kind,
                payload,
                specials,
            }),
        }
    }

    /// Rebuilds a tokenizer from what `metadata` returned (e.g. read from a checkpoint).
    pub fn from_metadata(kind: &str, payload: &str) -> Result<Self> {
        match kind {
            "hf" => Self::from_json_str(payload),
            "world" if payload == WORLD_VOCAB_NAME => Ok(Self::world()),
            "world" => Self::from_world_text(payload),
            _ => Err(bad_data!(
                "unknown tokenizer kind {kind:?} in metadata (expected \"hf\" or \"world\"); \
                 the file was written by a newer or different program"
            )),
        }
    }

    /// `("hf", tokenizer.json text)` or `("world", "rwkv_vocab_v20230424" or the vocabulary text)`.
    pub fn metadata(&self) -> (String, String) {
        (self.kind().to_string(), self.inner.payload.clone())
    }

    /// Hex sha256 of the payload: the tokenizer's identity (token files and checkpoints record it).
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.inner.payload.as_bytes()))
    }

    pub fn kind(&self) -> &'static str {
        match self.inner.kind {
            Kind::Hf(_) => "hf",
            Kind::World(_) => "world",
        }
    }

    /// Encodes untrusted text: special-token strings in it are ordinary text, never special ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner.kind {
            Kind::Hf(t) => t.encode(text),
            Kind::World(v) => v.encode(text.as_bytes()),
        }
    }

    /// Encodes trusted template text: the five marker strings become their special ids, the text
    /// between them is encoded as by `encode`.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let markers: Vec<(&str, u32)> = Special::ALL
            .iter()
            .zip(self.inner.specials)
            .filter_map(|(s, id)| Some((s.as_str(), id?)))
            .collect();
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            // The earliest marker; no marker is a prefix of another, so ties cannot happen.
            let next = markers
                .iter()
                .filter_map(|&(m, id)| rest.find(m).map(|at| (at, m.len(), id)))
                .min();
            let Some((at, len, id)) = next else { break };
            ids.extend(self.encode(&rest[..at])?);
            ids.push(id);
            rest = &rest[at + len..];
        }
        ids.extend(self.encode(rest)?);
        Ok(ids)
    }

    /// Decodes ids to text; invalid UTF-8 (possible with byte tokens) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(bad_data!(
                "token id {bad} is out of range for this tokenizer ({n} ids); \
                 the ids come from a model with a different vocabulary"
            ));
        }
        match &self.inner.kind {
            Kind::Hf(t) => t.decode(ids),
            Kind::World(v) => {
                let bytes: Vec<u8> = ids
                    .iter()
                    .flat_map(|&id| v.token_bytes(id))
                    .copied()
                    .collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// The raw bytes one token adds to the text (possibly part of a UTF-8 character); empty for
    /// unused and out-of-range ids. Special tokens give their marker string.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match &self.inner.kind {
            Kind::Hf(t) => t.token_bytes(id),
            Kind::World(v) => v.token_bytes(id).to_vec(),
        }
    }

    pub fn special_id(&self, s: Special) -> Option<u32> {
        self.inner.specials[s as usize]
    }

    /// Ids the model's embedding and head need, special tokens included (World: 65536, padded).
    pub fn vocab_size(&self) -> usize {
        match &self.inner.kind {
            Kind::Hf(t) => t.vocab_size,
            Kind::World(_) => world::WORLD_VOCAB_SIZE,
        }
    }

    /// Trains a byte-level BPE of `vocab_size` ids (fewer when the text allows fewer merges) on
    /// UTF-8 text files. The five special tokens are ids 0..4. Deterministic for the same files.
    pub fn train_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Self> {
        Self::from_json_str(&hf::train_bpe_json(files, vocab_size)?)
    }

    /// Writes the payload a file loader reads back: tokenizer.json, or the World vocabulary text.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = match &self.inner.kind {
            Kind::World(_) if self.inner.payload == WORLD_VOCAB_NAME => WORLD_VOCAB_TEXT,
            _ => &self.inner.payload,
        };
        // Atomic: a full disk leaves neither a half-written tokenizer nor a temporary.
        crate::fsutil::write_atomic(path, text.as_bytes())
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new(self)
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size())
            .field("sha256", &self.sha256())
            .finish()
    }
}

/// Turns generated ids into text as they arrive, never splitting a UTF-8 character: bytes of an
/// incomplete character are held until the tokens that complete it come.
pub struct StreamDecoder {
    tok: Tokenizer,
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new(tok: &Tokenizer) -> Self {
        StreamDecoder {
            tok: tok.clone(),
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text it completes (often empty mid-character). Bytes that can
    /// never become valid UTF-8 are emitted at once as U+FFFD.
    pub fn push(&mut self, id: u32) -> String {
        self.pending.extend(self.tok.token_bytes(id));
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = &self.pending[start..start + e.valid_up_to()];
                    // Cannot fail: `valid_up_to` bytes are valid UTF-8 by definition.
                    out.push_str(std::str::from_utf8(valid).expect("checked valid"));
                    start += e.valid_up_to();
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += bad;
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Ends the stream: whatever is held back is flushed, an incomplete character as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
