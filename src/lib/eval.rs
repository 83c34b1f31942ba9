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

/// Checks `--fail-above M=V` / `--fail-below M=V` against the metrics; returns the misses.
pub fn check_thresholds(
    metrics: &serde_json::Map<String, serde_json::Value>,
    above: &[(String, f64)],
    below: &[(String, f64)],
) -> Result<Vec<String>> {
    let mut misses = Vec::new();
    let get = |m: &str| -> Result<f64> {
        match metrics.get(m) {
            Some(v) if v.is_null() => Err(Error::Usage(format!(
                "metric '{m}' is null for this task and input (nothing to compute it from, such \
                 as a ratio with nothing to count, or a value that is not a finite number), so a \
                 threshold on it cannot be checked"
            ))),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::Usage(format!(
                    "metric '{m}' is {v}, not a number; a threshold on it cannot be checked"
                ))
            }),
            None => Err(Error::Usage(format!(
                "no metric '{m}' (have: {})",
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    };
    for (m, v) in above {
        let x = get(m)?;
        if x > *v {
            misses.push(format!("{m} = {x:.4} is above {v}"));
        }
    }
    for (m, v) in below {
        let x = get(m)?;
        if x < *v {
            misses.push(format!("{m} = {x:.4} is below {v}"));
        }
    }
    Ok(misses)
}

/// Parses `METRIC=VALUE`.
pub fn parse_threshold(s: &str) -> Result<(String, f64)> {
    let (m, v) = s
        .split_once('=')
        .ok_or_else(|| Error::Usage(format!("expected METRIC=VALUE, got '{s}'")))?;
    let v: f64 = v
        .trim()
        .parse()
        .ok()
        // NaN compares false with everything, so a NaN threshold could never be missed.
        .filter(|v: &f64| !v.is_nan())
        .ok_or_else(|| Error::Usage(format!("'{v}' in '{s}' is not a number")))?;
    Ok((m.trim().to_string(), v))
}

/// What `tb-eval` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Ppl,
    Gen,
    Tools,
}

impl Task {
    pub fn parse(s: &str) -> Result<Task> {
        match s {
            "ppl" => Ok(Task::Ppl),
            "gen" => Ok(Task::Gen),
            "tools" => Ok(Task::Tools),
            _ => Err(Error::Usage(format!(
                "unknown task '{s}' (ppl, gen, tools)"
            ))),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Task::Ppl => "ppl",
            Task::Gen => "gen",
            Task::Tools => "tools",
        }
    }
}

/// Everything one `tb-eval` invocation was asked.
pub struct EvalOptions {
    pub model: std::path::PathBuf,
    pub task: Task,
    pub files: Vec<std::path::PathBuf>,
    pub tokenizer: Option<std::path::PathBuf>,
    pub chunk: usize,
    /// ppl: segments evaluated side by side (1: one pass, the state carried through the file).
    pub batch: usize,
    /// Threads of the generation engine (0: one per core; the sequence forward uses the global
    /// pool that `cli::set_threads` sizes).
    pub threads: usize,
    pub max_tokens: usize,
    pub json: bool,
    pub quiet: bool,
    pub output: Option<std::path::PathBuf>,
    pub fail_above: Vec<(String, f64)>,
    pub fail_below: Vec<(String, f64)>,
    /// `auto`, `cpu`, `cuda[:N]`: where perplexity is computed (gen and tools decode on the CPU).
    pub device: String,
}

fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "reading", e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, "reading", e))?;
    Ok(hex::encode(h.finalize()))
}

/// The result as a table on stdout (without `--json`): for ppl one row per file (and `all`, their
/// sum, when there are several), then every other metric as `name value`.
fn print_table(
    per_file: &[serde_json::Value],
    metrics: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    use std::fmt::Write as _;
    use std::io::Write as _;
    const COLS: [&str; 5] = ["tokens", "bytes", "loss", "ppl", "bpb"];
    let num = |v: &serde_json::Value| match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x}"),
        Some(x) => format!("{x:.4}"),
        None => v.to_string(),
    };
    let mut t = String::new();
    let mut in_rows: &[&str] = &[];
    if !per_file.is_empty() {
        let all = serde_json::Value::Object(metrics.clone());
        let mut rows: Vec<(&str, &serde_json::Value)> = per_file
            .iter()
            .map(|r| (r["file"].as_str().unwrap_or("?"), r))
            .collect();
        if per_file.len() > 1 {
            rows.push(("all", &all));
        }
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(4);
        let _ = write!(t, "{:<w$}", "file");
        for c in COLS {
            let _ = write!(t, " {c:>10}");
        }
        t.push('\n');
        for (name, r) in rows {
            let _ = write!(t, "{name:<w$}");
            for c in COLS {
                let _ = write!(t, " {:>10}", num(&r[c]));
            }
            t.push('\n');
        }
        in_rows = &COLS;
    }
    let rest: Vec<_> = metrics
        .iter()
        .filter(|(k, _)| !in_rows.contains(&k.as_str()))
        .collect();
    let w = rest.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rest {
        let _ = writeln!(t, "{k:<w$}  {}", num(v));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(t.as_bytes())
        .and_then(|_| out.flush())
        .map_err(crate::output::stdout_err)
}

fn emit(json: bool, rec: serde_json::Value) -> Result<()> {
    if json {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{rec}").map_err(crate::output::stdout_err)?;
    }
    Ok(())
}

/// Runs an evaluation; writes records, the summary and the results file; returns missed thresholds.
pub fn run(o: &EvalOptions) -> Result<Vec<String>> {
    use serde_json::json;
    if o.batch == 0 {
        return Err(Error::usage(
            "--batch 0 is out of range: use at least 1 (default 1)",
        ));
    }
    if o.chunk == 0 {
        return Err(Error::usage(
            "--chunk 0 is out of range: use at least 1 token per chunk (default 1024)",
        ));
    }
    let dev = candle_core::Device::Cpu;
    let ck = crate::checkpoint::load(&o.model, &dev)?;
    let tok = match (&o.tokenizer, &ck.meta.tokenizer) {
        (Some(p), _) => Some(Tokenizer::from_file(p)?),
        (None, Some((k, p))) => Some(Tokenizer::from_metadata(k, p)?),
        (None, None) => None,
    };
    let started = std::time::Instant::now();
    let mut data_ids = Vec::new();
    let mut per_file = Vec::new();
    let metrics = match o.task {
        Task::Ppl => {
            if o.files.is_empty() {
                return Err(Error::usage(
                    "no input files: give text or token files to evaluate",
                ));
            }
            // Perplexity runs on the device (`--device`); checkpoints load on the CPU.
            let dev = crate::device::open(&o.device)?;
            let params = ck
                .params
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.to_device(&dev)?)))
                .collect::<Result<_>>()?;
            let model = Rwkv7::from_params(&ck.meta.config, &params)?;
            let (mut total, mut bytes) = (Nll::default(), 0u64);
            for (i, f) in o.files.iter().enumerate() {
                let d = EvalData::load(f, tok.as_ref())?;
                // With nothing predicted the mean loss is 0/0, which would read as a perfect score.
                if d.tokens.len() < 2 {
                    return Err(Error::Data(format!(
                        "{}: {} token(s), too few to score: perplexity needs at least 2 (one to \
                         predict from, one to predict); give a longer file",
                        f.display(),
                        d.tokens.len()
                    )));
                }
                let bar =
                    crate::output::progress_bar(d.tokens.len() as u64 - 1, PPL_PROGRESS, o.quiet);
                bar.set_prefix(format!("[{}/{}] {}", i + 1, o.files.len(), f.display()));
                let n = nll_batched(&model, &d.tokens, o.chunk, o.batch, &bar)?;
                bar.finish_and_clear();
                let r = summarize(&n, d.bytes);
                let rec = json!({"type": "metric", "file": f, "ppl": r.ppl, "bpb": r.bpb, "loss": r.loss, "tokens": r.tokens, "bytes": r.bytes});
                emit(o.json, rec.clone())?;
                per_file.push(rec);
                data_ids.push(json!({"path": f, "sha256": file_sha256(f)?, "tokens": r.tokens, "bytes": r.bytes}));
                total.sum += n.sum;
                total.tokens += n.tokens;
                bytes += d.bytes;
            }
            let r = summarize(&total, bytes);
            let secs = started.elapsed().as_secs_f64();
            // Cannot fail: a struct of numbers serialises (non-finite ones as null) to an object.
            let mut m = serde_json::to_value(&r)
                .unwrap()
                .as_object()
                .unwrap()
                .clone();
            m.insert("tok_per_s".into(), json!(r.tokens as f64 / secs));
            m
        }
        Task::Gen | Task::Tools => crate::evalgen::run(o, &ck, &tok, &mut data_ids)?,
    };
    let misses = check_thresholds(&metrics, &o.fail_above, &o.fail_below)?;
    let result = json!({
        "type": "result", "task": o.task.name(), "metrics": metrics,
        "model": {"path": o.model, "sha256": file_sha256(&o.model)?, "config": ck.meta.config.resolved()},
        "data": data_ids,
        "settings": {"device": o.device, "chunk": o.chunk, "batch": o.batch, "max_tokens": o.max_tokens, "fail_above": o.fail_above, "fail_below": o.fail_below},
        "passed": misses.is_empty(),
    });
    emit(o.json, result.clone())?;
    if let Some(p) = &o.output {
        // Cannot fail: a `json!` value with string keys always serialises.
        crate::fsutil::write_atomic(p, serde_json::to_string_pretty(&result).unwrap().as_bytes())?;
    }
    if !o.json {
        print_table(&per_file, &metrics)?;
    }
    Ok(misses)
}
