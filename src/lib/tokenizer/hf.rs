//! Hugging Face `tokenizer.json` tokenizers (the `tokenizers` crate with `fancy-regex` and no
//! default features: pure Rust, no C or C++ to build):
//! loading with the five special tokens ensured, per-token bytes for streaming, and BPE training.

use super::Special;
use crate::bad_data;
use crate::error::{Error, Result};
use std::path::PathBuf;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::{digits::Digits, sequence::Sequence};
use tokenizers::{AddedToken, TokenizerBuilder};

/// A loaded tokenizer.json with what encoding and streaming need precomputed.
pub struct HfTokenizer {
    /// Set to never match special tokens: `encode` is for untrusted text; trusted template text is
    /// split on the markers by the caller.
    pub tok: tokenizers::Tokenizer,
    /// The tokenizer JSON after the special tokens were ensured: the identity and what `save` writes.
    pub json: String,
    /// `Some` when the decoder is byte-level: the inverse of GPT-2's byte-to-char alphabet.
    char_to_byte: Option<std::collections::HashMap<char, u8>>,
    pub vocab_size: usize,
}

impl HfTokenizer {
    /// Parses tokenizer.json text; any of the five special tokens it lacks are added as special
    /// tokens at the end of the vocabulary, and `json` then holds the re-serialised tokenizer.
    pub fn from_json(json: &str) -> Result<HfTokenizer> {
        let mut tok: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| bad_data!("not a valid tokenizer.json: {e}"))?;
        let missing: Vec<AddedToken> = Special::ALL
            .iter()
            .filter(|s| tok.token_to_id(s.as_str()).is_none())
            .map(|s| AddedToken::from(s.as_str(), true))
            .collect();
        let json = if missing.is_empty() {
            // Kept verbatim, so a payload read back from a checkpoint hashes to the same identity.
            json.to_string()
        } else {
            tok.add_special_tokens(missing)
                .map_err(|e| bad_data!("adding the special tokens: {e}"))?;
            tok.to_string(false)
                .map_err(|e| bad_data!("serialising the tokenizer: {e}"))?
        };
        tok.set_encode_special_tokens(true);
        let char_to_byte = tok.get_decoder().is_some_and(is_byte_level).then(|| {
            byte_level_alphabet()
                .into_iter()
                .map(|(b, c)| (c, b))
                .collect()
        });
        let max_added = tok
            .get_added_tokens_decoder()
            .keys()
            .max()
            .map_or(0, |&id| id as usize + 1);
        let vocab_size = tok.get_vocab_size(true).max(max_added);
        Ok(HfTokenizer {
            tok,
            json,
            char_to_byte,
            vocab_size,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode_fast(text, false)
            .map_err(|e| bad_data!("encoding text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, false)
            .map_err(|e| bad_data!("decoding token ids: {e}"))
    }

    /// The bytes one token contributes to the decoded text. Byte-level tokens map back through the
    /// alphabet exactly as the ByteLevel decoder does (a token with a char outside the alphabet, such
    /// as an added token, is its own UTF-8); other decoders fall back to decoding the id alone.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(token) = self.tok.id_to_token(id) else {
            return Vec::new();
        };
        match &self.char_to_byte {
            Some(map) => token
                .chars()
                .map(|c| map.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| token.into_bytes()),
            None => self
                .decode(&[id])
                .map(String::into_bytes)
                .unwrap_or_default(),
        }
    }
}

fn is_byte_level(d: &DecoderWrapper) -> bool {
    match d {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(s) => s.get_decoders().iter().any(is_byte_level),
        _ => false,
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes are
/// shifted to U+0100.. so that every byte is a visible character.
fn byte_level_alphabet() -> Vec<(u8, char)> {
    let visible = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut shifted = 0u32;
    (0..=255u8)
        .map(|b| {
            if visible(b) {
                (b, char::from(b))
            } else {
                shifted += 1;
                (
                    b,
                    // Cannot fail: at most 68 bytes are shifted, to U+0100..U+0143, all scalar values.
                    char::from_u32(255 + shifted).expect("U+0100..U+0143 are chars"),
                )
            }
        })
        .collect()
}

/// The largest vocabulary `train_bpe_json` trains (2^20).
pub const MAX_BPE_VOCAB: usize = 1 << 20;

/// Trains a byte-level BPE whose vocabulary holds the five special tokens (ids 0..4), the 256 byte
/// symbols and merges up to `vocab_size`, and returns its tokenizer.json text.
///
/// No normalizer (byte-level BPE recipes often add NFC): decode(encode(x)) is then x byte for byte,
/// and bits per byte count the bytes actually modelled. Digits are split one per token before the
/// byte-level step (as LLaMA's tokenizer does): a small model then copies a number digit by digit,
/// instead of learning every multi-digit token as a symbol of its own.
pub fn train_bpe_json(files: &[PathBuf], vocab_size: usize) -> Result<String> {
    let min = Special::ALL.len() + 256;
    if vocab_size < min {
        return Err(Error::usage(format!(
            "vocab size {vocab_size} is too small for a byte-level BPE: it needs at least {min} \
             (5 special tokens and 256 bytes)"
        )));
    }
    if vocab_size > MAX_BPE_VOCAB {
        return Err(Error::usage(format!(
            "vocab size {vocab_size} is out of range: a BPE trained here has at most \
             {MAX_BPE_VOCAB} tokens (the largest released vocabularies have about 262,000)"
        )));
    }
    if files.is_empty() {
        return Err(Error::usage(
            "training a tokenizer needs at least one text file",
        ));
    }
    // Each merge needs a pair seen twice and removes both: no text of B bytes gives more than
    // B/2 merges. The trainer allocates for the vocabulary asked, so ask for no more than that
    // (when every input is a regular file, whose size is known; a pipe's is not).
    let mut bytes = Some(0u64);
    for f in files {
        let m = std::fs::metadata(f).map_err(|e| Error::io(f, "tokenizer training file", e))?;
        bytes = bytes
            .filter(|_| m.is_file())
            .map(|b| b.saturating_add(m.len()));
    }
    let vocab_size = match bytes {
        Some(b) => vocab_size.min(min.saturating_add(usize::try_from(b / 2).unwrap_or(usize::MAX))),
        None => vocab_size,
    };
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(
            Special::ALL
                .iter()
                .map(|s| AddedToken::from(s.as_str(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, ByteLevel, ByteLevel>::new(
        )
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]))))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| bad_data!("building the BPE tokenizer: {e}"))?;
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    tok.train_from_files(&mut trainer, names.clone())
        .map_err(|e| {
            bad_data!(
                "training BPE on {}: {e} (the files must be UTF-8 text)",
                names.join(", ")
            )
        })?;
    tok.to_string(false)
        .map_err(|e| bad_data!("serialising the trained tokenizer: {e}"))
}
