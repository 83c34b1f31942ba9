//! Training data: text → token files (streaming, so a corpus larger than memory works), batches of
//! windows for pre-training, and rendered conversations with a loss mask for SFT.

use crate::error::{Error, Result};
use crate::template::{self, Conversation};
use crate::tokenizer::{Special, Tokenizer};
use crate::tokfile::{Header, TokenFile, TokenWriter};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Text is encoded in pieces of about this many bytes, cut after a newline (also the grain of the
/// validation split).
const CHUNK_BYTES: usize = 4 * 1024;

/// Expands inputs: files as given, directories walked recursively in sorted order (hidden entries
/// skipped). Inside a directory only regular files are taken: a FIFO, socket or device there is
/// skipped with a warning naming it (reading a FIFO nobody writes to would block forever). A
/// non-regular file named on the command line (`<(zcat corpus.gz)`) is read as given.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p, "reading input", e))?;
        if meta.is_dir() {
            walk_dir(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Appends the regular files under `dir` to `out` (see `expand_inputs`).
fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, "listing directory", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|e| {
            !e.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    entries.sort();
    for e in entries {
        // Follows symbolic links, as reading the file would.
        let meta = std::fs::metadata(&e).map_err(|err| Error::io(&e, "reading input", err))?;
        if meta.is_dir() {
            walk_dir(&e, out)?;
        } else if meta.is_file() {
            out.push(e);
        } else {
            crate::output::warn(format!(
                "skipping {}: {}, not a regular file",
                e.display(),
                file_kind(&meta)
            ));
        }
    }
    Ok(())
}

/// What a non-regular, non-directory file is, in words.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    let _ = meta;
    "a special file"
}

fn is_jsonl(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "jsonl" || e == "ndjson")
}

/// The total size in bytes of the files the inputs name (directories expanded), for progress.
pub fn input_bytes(inputs: &[PathBuf]) -> Result<u64> {
    expand_inputs(inputs)?
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| Error::io(p, "reading", e))
        })
        .sum()
}

/// Calls `f(text, end_of_document)` for every piece of text in the inputs: a plain file is one
/// document read in newline-aligned chunks; in a `.jsonl` file each line's `"text"` is a document.
pub fn for_each_chunk(
    inputs: &[PathBuf],
    mut f: impl FnMut(&str, bool) -> Result<()>,
) -> Result<()> {
    for path in expand_inputs(inputs)? {
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, "opening", e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        if is_jsonl(&path) {
            let mut line = String::new();
            let mut n = 0;
            loop {
                line.clear();
                n += 1;
                if reader
                    .read_line(&mut line)
                    .map_err(|e| Error::io(&path, "reading", e))?
                    == 0
                {
                    break;
                }
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                    Error::Data(format!("{}:{n}: malformed JSON line: {e}", path.display()))
                })?;
                let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                    Error::Data(format!(
                        "{}:{n}: expected an object with a \"text\" string",
                        path.display()
                    ))
                })?;
                f(text, true)?;
            }
        } else {
            let mut buf: Vec<u8> = Vec::with_capacity(2 * CHUNK_BYTES);
            loop {
                let mut piece = Vec::with_capacity(CHUNK_BYTES);
                let got = (&mut reader)
                    .take(CHUNK_BYTES as u64)
                    .read_to_end(&mut piece)
                    .map_err(|e| Error::io(&path, "reading", e))?;
                buf.extend_from_slice(&piece);
                let eof = got == 0;
                // Cut after the last newline so no word (or UTF-8 character) is split.
                let cut = if eof {
                    buf.len()
                } else {
                    buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
                };
                if cut > 0 || eof {
                    let text = std::str::from_utf8(&buf[..cut]).map_err(|e| {
                        Error::Data(format!("{}: not UTF-8 text: {e}", path.display()))
                    })?;
                    f(text, eof)?;
                    buf.drain(..cut);
                }
                if eof {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Refuses a `--val-fraction` outside (0, 1): 0 or 1 would leave one of the two files empty.
pub fn check_val_fraction(f: f64) -> Result<()> {
    if f > 0.0 && f < 1.0 {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "--val-fraction {f} is out of range: use a fraction between 0 and 1, e.g. 0.1"
        )))
    }
}

/// The bar of `tb-tok encode`: input bytes read, tokens written.
pub const ENCODE_PROGRESS: &str =
    "encoding {binary_bytes}/{binary_total_bytes} | {msg} | {binary_bytes_per_sec}, ETA {eta}";

/// Encodes text inputs into a token file, documents separated by `<|endoftext|>`. With
/// `val = Some((fraction, path))` a deterministic `fraction` of the chunks goes to a second file.
/// `progress` (length: the inputs' bytes) advances by each chunk's bytes and shows the tokens so far.
pub fn encode_to_file(
    inputs: &[PathBuf],
    tok: &Tokenizer,
    out: &Path,
    val: Option<(f64, &Path)>,
    progress: &indicatif::ProgressBar,
) -> Result<(Header, Option<Header>)> {
    let eot = tok
        .special_id(Special::EndOfText)
        .ok_or_else(|| Error::Data("tokenizer has no <|endoftext|>".into()))?;
    if let Some((f, _)) = val {
        check_val_fraction(f)?;
    }
    let sha = tok.sha256();
    let mut train = TokenWriter::create(out, tok.vocab_size(), &sha)?;
    let mut valw = match val {
        Some((_, p)) => Some(TokenWriter::create(p, tok.vocab_size(), &sha)?),
        None => None,
    };
    let fraction = val.map_or(0.0, |(f, _)| f);
    let mut index = 0u64;
    let mut tokens = 0u64;
    for_each_chunk(inputs, |text, end| {
        // Chunk i goes to validation when floor((i+1)·f) > floor(i·f): an even spread.
        let to_val = valw.is_some()
            && ((index + 1) as f64 * fraction).floor() > (index as f64 * fraction).floor();
        index += 1;
        let w = if to_val {
            // Cannot fail: `to_val` is only true when `valw` is Some.
            valw.as_mut().unwrap()
        } else {
            &mut train
        };
        let ids = tok.encode(text)?;
        w.push(&ids)?;
        w.add_source_bytes(text.len() as u64);
        if end {
            w.push(&[eot])?;
        }
        tokens += ids.len() as u64;
        progress.inc(text.len() as u64);
        progress.set_message(format!("{tokens} tokens"));
        Ok(())
    })?;
    progress.finish_and_clear();
    // Both files complete before either is renamed into place: a failure (a full disk) leaves
    // neither.
    train.seal()?;
    if let Some(w) = valw.as_mut() {
        w.seal()?;
    }
    let h = train.finish()?;
    let hv = valw.map(|w| w.finish()).transpose()?;
    Ok((h, hv))
}

/// Writes a token file's text to `out`, after checking that it was made by `tok` and that its ids
/// fit `tok`'s vocabulary. Multi-byte characters split across tokens come out whole.
pub fn decode_file(input: &Path, tok: &Tokenizer, mut out: impl std::io::Write) -> Result<()> {
    let f = TokenFile::open(input)?;
    f.check_tokenizer(&tok.sha256())?;
    f.check_ids(tok.vocab_size())?;
    let mut dec = tok.stream_decoder();
    let stdout = crate::output::stdout_err;
    for i in 0..f.len() {
        out.write_all(dec.push(f.get(i)).as_bytes())
            .map_err(stdout)?;
    }
    out.write_all(dec.finish().as_bytes()).map_err(stdout)?;
    out.flush().map_err(stdout)
}

/// A batch of `B` rows of `T + 1` tokens: inputs are `[.., :T]`, targets `[.., 1:]`; `mask[i]`
/// says whether target `i` counts in the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
}

/// The RNG of one training step: a pure function of seed and step, so a resumed run draws exactly
/// the batches an uninterrupted one would.
pub fn step_rng(seed: u64, step: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step);
    rng
}

/// Where training batches come from.
pub enum Dataset {
    /// Random windows of a token file (pre-training).
    Tokens(TokenFile),
    /// Rendered conversations with their loss masks (SFT).
    Chat(Vec<(Vec<u32>, Vec<bool>)>),
}

impl Dataset {
    /// Opens a token file, or a `.jsonl` file of conversations rendered with `template_name`.
    pub fn open(path: &Path, tok: &Tokenizer, template_name: &str) -> Result<Dataset> {
        if is_jsonl(path) {
            return Ok(Dataset::Chat(load_conversations(path, tok, template_name)?));
        }
        let f = TokenFile::open(path)?;
        f.check_tokenizer(&tok.sha256())?;
        Ok(Dataset::Tokens(f))
    }

    /// Source bytes per token: the token file's, or the rendered conversations' (for bits per
    /// byte).
    pub fn bytes_per_token(&self, tok: &Tokenizer) -> Result<f64> {
        Ok(match self {
            Dataset::Tokens(f) => f.header.source_bytes as f64 / f.header.n_tokens.max(1) as f64,
            Dataset::Chat(convs) => {
                let (mut bytes, mut tokens) = (0usize, 0usize);
                for (ids, _) in convs {
                    bytes += tok.decode(ids)?.len();
                    tokens += ids.len();
                }
                bytes as f64 / tokens.max(1) as f64
            }
        })
    }

    /// A prompt for training samples: the first 16 tokens of a token file, or the first
    /// conversation up to its first learned token (the reply).
    pub fn sample_prompt(&self) -> Vec<u32> {
        match self {
            Dataset::Tokens(f) => f.slice(0, f.len().min(16)),
            Dataset::Chat(convs) => convs
                .first()
                .map(|(ids, learn)| {
                    let reply = learn.iter().position(|&l| l).unwrap_or(ids.len());
                    ids[..reply].to_vec()
                })
                .unwrap_or_default(),
        }
    }

    /// Batch `b × t` drawn with `rng`.
    pub fn batch(&self, b: usize, t: usize, rng: &mut ChaCha8Rng) -> Result<Batch> {
        let mut rows = Vec::with_capacity(b);
        match self {
            Dataset::Tokens(f) => {
                if f.len() < t + 2 {
                    return Err(Error::Data(format!(
                        "{}: {} tokens, too few for a context of {t}",
                        f.path.display(),
                        f.len()
                    )));
                }
                for _ in 0..b {
                    let start = rng.random_range(0..f.len() - t - 1);
                    rows.push((f.slice(start, t + 1), vec![true; t + 1]));
                }
            }
            Dataset::Chat(convs) => {
                if convs.is_empty() {
                    return Err(Error::Data("no conversations in the SFT data".into()));
                }
                for _ in 0..b {
                    let (ids, learn) = &convs[rng.random_range(0..convs.len())];
                    rows.push((ids.clone(), learn.clone()));
                }
            }
        }
        Ok(pack(&rows, t))
    }
}

/// Packs rows of tokens into a `[B, T+1]` batch, truncating or padding (padding is masked out).
pub fn pack(rows: &[(Vec<u32>, Vec<bool>)], t: usize) -> Batch {
    let b = rows.len();
    let (mut inputs, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (ids, learn) in rows {
        for i in 0..t {
            inputs.push(ids.get(i).copied().unwrap_or(0));
            let target = ids.get(i + 1).copied();
            targets.push(target.unwrap_or(0));
            // Target i+1 counts when it exists and is learned.
            mask.push(if target.is_some() && learn[i + 1] {
                1.0
            } else {
                0.0
            });
        }
    }
    Batch {
        b,
        t,
        inputs,
        targets,
        mask,
    }
}

/// Reads `{"messages": [...]}` lines and renders each with its loss mask.
pub fn load_conversations(
    path: &Path,
    tok: &Tokenizer,
    template_name: &str,
) -> Result<Vec<(Vec<u32>, Vec<bool>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "reading", e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let conv: Conversation = serde_json::from_str(line).map_err(|e| {
            Error::Data(format!(
                "{}:{}: not a conversation: {e}",
                path.display(),
                i + 1
            ))
        })?;
        let spans = template::render_named(template_name, &conv.messages, &conv.tools, false)
            .map_err(|e| Error::Data(format!("{}:{}: {e}", path.display(), i + 1)))?;
        out.push(template::to_tokens(&spans, tok)?);
    }
    Ok(out)
}
