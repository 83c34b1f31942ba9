//! Measured quality: perplexity and bits per byte over text or token files, computed in sequence
//! mode in chunks with the recurrent state carried across them — so any length works and the
//! result equals one pass over the whole text. Returns numbers; prints nothing.
//!
//! The sequence forward of the candle model (fused ops, 1024-token GEMMs) is what runs: the
//! decode engine's prefill with every position's logits was 3× slower on `micro` (336 vs 986
//! tok/s, 2 threads), as its 32-token chunks and GEMV kernels are built for prompts.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Rwkv7, State};
use crate::tokenizer::Tokenizer;
use crate::tokfile::TokenFile;
use candle_core::{D, Tensor};
use indicatif::ProgressBar;
use serde::Serialize;
use std::path::Path;

/// Accumulated negative log-likelihood over a token stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Nll {
    /// Σ −ln p(token), in nats.
    pub sum: f64,
    /// Number of predicted tokens.
    pub tokens: u64,
}

/// Tokens and source byte count of one evaluation input.
pub struct EvalData {
    pub tokens: Vec<u32>,
    pub bytes: u64,
}

impl EvalData {
    /// A token file (its header carries the byte count; the tokenizer must match) or a text file
    /// (tokenized here).
    pub fn load(path: &Path, tok: Option<&Tokenizer>) -> Result<EvalData> {
        let mut head = [0u8; 8];
        let is_tokfile = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok()
            && &head == crate::tokfile::MAGIC;
        if is_tokfile {
            let f = TokenFile::open(path)?;
            if let Some(t) = tok {
                f.check_tokenizer(&t.sha256())?;
            }
            return Ok(EvalData {
                tokens: f.slice(0, f.len()),
                bytes: f.header.source_bytes,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "reading", e))?;
        let tok = tok.ok_or_else(|| {
            Error::Data(format!(
                "{}: text input needs a tokenizer, and the model carries none (--tokenizer)",
                path.display()
            ))
        })?;
        Ok(EvalData {
            tokens: tok.encode(&text)?,
            bytes: text.len() as u64,
        })
    }
}

/// The NLL of `tokens[1..]` given their prefixes, in chunks of `chunk` tokens, state carried.
pub fn nll(model: &Rwkv7, tokens: &[u32], chunk: usize) -> Result<Nll> {
    nll_shown(model, tokens, chunk, &ProgressBar::hidden())
}

/// The bar of `tb-eval` ppl: predictions scored, and the running perplexity.
pub const PPL_PROGRESS: &str = "{prefix} {human_pos}/{human_len} tokens | {msg} | ETA {eta}";

/// Advances `progress` by the predictions just scored and shows the running perplexity.
fn show(progress: &ProgressBar, total: &Nll, scored: u64) {
    progress.inc(scored);
    progress.set_message(format!(
        "ppl {:.3} | {:.0} tok/s",
        (total.sum / total.tokens.max(1) as f64).exp(),
        progress.position() as f64 / progress.elapsed().as_secs_f64().max(1e-9)
    ));
}

/// [`nll`] with a progress bar (length: the predictions, `tokens.len() - 1`).
fn nll_shown(model: &Rwkv7, tokens: &[u32], chunk: usize, progress: &ProgressBar) -> Result<Nll> {
    let chunk = chunk.max(1);
    let dev = model.device();
    let mut state: Option<State> = None;
    let mut out = Nll::default();
    let mut start = 0;
    // Each chunk predicts its own tokens 1.. and the first token of the next chunk.
    while start + 1 < tokens.len() {
        let end = (start + chunk).min(tokens.len() - 1);
        let input = Tensor::from_slice(&tokens[start..end], (1, end - start), dev)?;
        let (logits, st) = model.forward(&input, state.as_ref())?;
        out.sum += picked_nll(&logits.squeeze(0)?, &tokens[start + 1..end + 1], None)?;
        out.tokens += (end - start) as u64;
        show(progress, &out, (end - start) as u64);
        state = Some(st);
        start = end;
    }
    Ok(out)
}

/// Σ −log softmax(logits)[target] over the rows of `logits [R, V]` (rows whose `mask` is 0
/// left out), summed in f64.
fn picked_nll(logits: &Tensor, targets: &[u32], mask: Option<&[f32]>) -> Result<f64> {
    let dev = logits.device();
    let targets = Tensor::from_slice(targets, targets.len(), dev)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    let mut nll = (log_z - picked)?.squeeze(1)?;
    if let Some(m) = mask {
        nll = (nll * Tensor::from_slice(m, m.len(), dev)?)?;
    }
    Ok(nll
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// [`nll`] over `batch` contiguous segments of the predictions run side by side, one
/// `[batch, chunk]` forward per step (what keeps a GPU busy). Each segment starts from a zero
/// state, so its first tokens see less context than in one pass: the result equals [`nll`]'s
/// only for `batch` = 1 (llama.cpp's perplexity, likewise, scores independent windows). The last
/// segment may be shorter; its missing positions are padded and left out of the sum.
/// `progress` advances by the predictions scored (length: `tokens.len() - 1`).
pub fn nll_batched(
    model: &Rwkv7,
    tokens: &[u32],
    chunk: usize,
    batch: usize,
    progress: &ProgressBar,
) -> Result<Nll> {
    if batch <= 1 || tokens.len() < 3 {
        return nll_shown(model, tokens, chunk, progress);
    }
    let chunk = chunk.max(1);
    check_batch_memory(
        &model.cfg,
        tokens.len(),
        chunk,
        batch,
        crate::device::memory_bytes(model.device()),
    )?;
    // Prediction p reads tokens[p] and is scored on tokens[p + 1].
    let m = tokens.len() - 1;
    let seg = m.div_ceil(batch.min(m));
    let segs: Vec<(usize, usize)> = (0..m.div_ceil(seg))
        .map(|i| (i * seg, ((i + 1) * seg).min(m)))
        .collect();
    let dev = model.device();
    let mut state: Option<State> = None;
    let mut out = Nll::default();
    let mut k = 0;
    while k < seg {
        let len = chunk.min(seg - k);
        let n = segs.len() * len;
        let (mut inputs, mut targets, mut mask) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
        let before = out.tokens;
        for (i, &(a, b)) in segs.iter().enumerate() {
            for j in 0..len {
                let p = a + k + j;
                if p < b {
                    let r = i * len + j;
                    (inputs[r], targets[r], mask[r]) = (tokens[p], tokens[p + 1], 1.0);
                    out.tokens += 1;
                }
            }
        }
        let input = Tensor::from_vec(inputs, (segs.len(), len), dev)?;
        let (logits, st) = model.forward(&input, state.as_ref())?;
        let v = logits.dim(D::Minus1)?;
        out.sum += picked_nll(&logits.reshape((n, v))?, &targets, Some(&mask))?;
        show(progress, &out, out.tokens - before);
        state = Some(st);
        k += len;
    }
    Ok(out)
}

/// A lower bound on the memory of one step of [`nll_batched`] over `tokens` tokens: the rows
/// run side by side (`batch`, at most one per prediction), each with its recurrent state
/// (n_layer × (C·N + 2C) floats) and its logits (its step's length × vocab floats). Returns
/// (rows, bytes).
pub fn batch_memory(cfg: &ModelConfig, tokens: usize, chunk: usize, batch: usize) -> (usize, f64) {
    let m = tokens.saturating_sub(1).max(1);
    let rows = batch.clamp(1, m);
    let len = chunk.max(1).min(m.div_ceil(rows));
    let (c, n) = (cfg.d_model as f64, cfg.head_size as f64);
    let state = cfg.n_layer as f64 * (c * n + 2.0 * c);
    let logits = len as f64 * cfg.vocab_size as f64;
    (rows, 4.0 * rows as f64 * (state + logits))
}

/// Refuses (usage error, 2) a `--batch` whose rows cannot fit in `limit` bytes (the device's
/// memory, see [`crate::device::memory_bytes`]), naming the estimate, before allocating.
pub fn check_batch_memory(
    cfg: &ModelConfig,
    tokens: usize,
    chunk: usize,
    batch: usize,
    limit: Option<u64>,
) -> Result<()> {
    let (rows, bytes) = batch_memory(cfg, tokens, chunk, batch);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    match limit {
        Some(limit) if bytes > limit as f64 => Err(Error::usage(format!(
            "--batch {batch}: {rows} rows side by side need at least {:.1} GiB (their states and \
             logits), more than the {:.1} GiB of memory this device has; lower --batch",
            gib(bytes),
            gib(limit as f64)
        ))),
        _ => Ok(()),
    }
}

/// Perplexity and bits per byte.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PplResult {
    pub ppl: f64,
    /// Mean NLL per token, nats.
    pub loss: f64,
    pub bpb: f64,
    pub tokens: u64,
    pub bytes: u64,
}

pub fn summarize(n: &Nll, bytes: u64) -> PplResult {
    let loss = n.sum / n.tokens.max(1) as f64;
    PplResult {
        ppl: loss.exp(),
        loss,
        bpb: n.sum / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: n.tokens,
        bytes,
    }
}
