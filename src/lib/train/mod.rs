//! Training: batches → forward → masked cross-entropy → backward → clip → AdamW, with validation,
//! atomic checkpoints, retention, resume, a run-directory lock and clean stops on signals — the
//! trainer a user leaves running under cron.
//!
//! Reproducibility: the batch of step s is drawn from an RNG that is a pure function of
//! (seed, s), so a resumed run sees exactly the data an uninterrupted one would; weights and
//! optimiser moments are saved bit-exactly, so with one thread resume is bit-for-bit.
//!
//! Watching a run: on a terminal a live line (step, loss, tok/s, lr, ETA) on stderr; records on
//! stdout and in `train.jsonl`; `loss.svg` redrawn at every evaluation; `sample` records every
//! `sample_every` steps. A closed stdout stops the run with a checkpoint, as SIGTERM does.

pub mod config;
pub mod optim;
pub mod plot;
pub mod smoke;

use crate::checkpoint::{self, Checkpoint, Meta};
use crate::config::ModelConfig;
use crate::data::{Batch, Dataset, step_rng};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::model::Rwkv7;
use crate::model::fused::Kernels;
use crate::model::init::init_params;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor, Var};
use config::TrainConfig;
use optim::{Optimizer, schedule};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A model whose parameters are training variables.
pub struct Trainable {
    pub cfg: ModelConfig,
    pub model: Rwkv7,
    pub vars: Vec<(String, Var)>,
}

impl Trainable {
    pub fn new(cfg: &ModelConfig, params: Vec<(String, Tensor)>) -> Result<Trainable> {
        let vars: Vec<(String, Var)> = params
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        let map: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let model = Rwkv7::from_params(cfg, &map)?;
        Ok(Trainable {
            cfg: cfg.clone(),
            model,
            vars,
        })
    }

    /// The current values, detached, on the CPU, in canonical order (for checkpoints).
    pub fn params(&self) -> Result<Vec<(String, Tensor)>> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_detached_tensor().to_device(&Device::Cpu)?)))
            .collect()
    }

    /// The gradient of `loss` for every parameter as a tensor on the parameter's device, in
    /// `vars` order (`None` where none flows): the GPU path, where gradients stay on the GPU.
    pub fn gradient_tensors(&self, loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grads = loss.backward()?;
        self.vars
            .iter()
            .map(|(_, v)| {
                Ok(grads
                    .get(v.as_tensor())
                    .map(Tensor::contiguous)
                    .transpose()?)
            })
            .collect()
    }

    /// The gradient of `loss` for every parameter, as flat vectors (zeros where none flows).
    pub fn gradients(&self, loss: &Tensor) -> Result<HashMap<String, Vec<f32>>> {
        let grads = loss.backward()?;
        self.vars
            .iter()
            .map(|(n, v)| {
                let g = match grads.get(v.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![0.0; v.elem_count()],
                };
                Ok((n.clone(), g))
            })
            .collect()
    }
}

/// Masked mean cross-entropy (nats per counted target) of a batch, as a graph node. The head
/// matmul is fused with the loss, so the `[B·T, V]` logits never enter the graph.
///
/// Rows that open with the same tokens, none of whose targets is learned, run that opening once:
/// every SFT conversation starts with the same system prompt and tool lines, most of its tokens.
/// The opening's state is repeated for every row and the rest runs from it; gradients flow back
/// through the repeat, so loss and gradients are [`batch_loss_plain`]'s (a test ties them).
pub fn batch_loss(model: &Rwkv7, batch: &Batch) -> Result<Tensor> {
    let (b, t) = (batch.b, batch.t);
    let p = shared_opening(batch);
    // Below a few dozen tokens the saving does not pay for a second forward call.
    if b < 2 || p < 32 {
        return batch_loss_plain(model, batch);
    }
    let dev = model.device();
    let opening = Tensor::from_slice(&batch.inputs[..p], (1, p), dev)?;
    let (_, st) = model.hidden(&opening, None)?;
    // Each row's columns from p on.
    fn rest<T: Copy>(v: &[T], t: usize, p: usize) -> Vec<T> {
        v.chunks_exact(t)
            .flat_map(|r| r[p..].iter().copied())
            .collect()
    }
    let inputs = Tensor::from_vec(rest(&batch.inputs, t, p), (b, t - p), dev)?;
    let (x, _) = model.hidden(&inputs, Some(&st.repeat(b)?))?;
    let (targets, mask) = (rest(&batch.targets, t, p), rest(&batch.mask, t, p));
    model
        .kernels()
        .head_cross_entropy(&x, model.head_weight(), &targets, &mask)
}

/// The loss of a batch as one forward over every row and token: [`batch_loss`]'s reference twin.
pub fn batch_loss_plain(model: &Rwkv7, batch: &Batch) -> Result<Tensor> {
    let inputs = Tensor::from_slice(&batch.inputs, (batch.b, batch.t), model.device())?;
    let (x, _) = model.hidden(&inputs, None)?;
    model
        .kernels()
        .head_cross_entropy(&x, model.head_weight(), &batch.targets, &batch.mask)
}

/// How many leading input tokens every row shares with no learned target among them (at most
/// `t - 1`, so a rest is left to run).
pub fn shared_opening(batch: &Batch) -> usize {
    let t = batch.t;
    let first = &batch.inputs[..t];
    (0..t.saturating_sub(1))
        .find(|&i| {
            (0..batch.b)
                .any(|r| batch.inputs[r * t + i] != first[i] || batch.mask[r * t + i] != 0.0)
        })
        .unwrap_or(t.saturating_sub(1))
}

/// Σ mask·(−log p(target)) / Σ mask of logits `[B,T,V]`, targets and mask `[B,T]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let targets = targets
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let mask = mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Kernels::Fused.cross_entropy(logits, &targets, &mask)
}

/// What a run writes: every record to `train.jsonl`, and to stdout while someone reads it.
pub struct Reporter {
    log: std::fs::File,
    /// The live line on stderr (a terminal, not `-q`); records are printed above it.
    bar: Option<indicatif::ProgressBar>,
    /// stdout is a terminal: with the live line there, `step` records go to `train.jsonl` only
    /// (one line per step would scroll the live line away).
    stdout_tty: bool,
    /// The reader of stdout went away (`tb-train | head`): records go to `train.jsonl` only and
    /// `stop` is raised, so the run checkpoints and ends as on SIGTERM.
    closed: bool,
    stop: Arc<AtomicBool>,
}

impl Reporter {
    fn emit(&mut self, rec: serde_json::Value) -> Result<()> {
        let line = format!("{rec}\n");
        self.log
            .write_all(line.as_bytes())
            .map_err(|e| Error::Io(format!("appending train.jsonl: {e}")))?;
        if self.closed || (self.bar.is_some() && self.stdout_tty && rec["type"] == "step") {
            return Ok(());
        }
        let print = || {
            let mut out = std::io::stdout().lock();
            out.write_all(line.as_bytes())
                .and_then(|_| out.flush())
                .map_err(crate::output::stdout_err)
        };
        let printed = match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        };
        match printed {
            Err(Error::ClosedPipe) => {
                self.closed = true;
                self.stop.store(true, Ordering::SeqCst);
                Ok(())
            }
            other => other,
        }
    }
}

/// The live line, short enough for 80 columns:
/// `step 120/2000 | loss 3.2104 | 41.2k tok/s | lr 6.0e-4 | val 3.3012 | 2m, ETA 34m`.
fn live_line(max_steps: u64, start_step: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(max_steps),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("step {pos}/{len} | {msg} | {elapsed}, ETA {eta}")
            // Cannot fail: a constant template (test `live_line_template_parses`).
            .expect("valid template"),
    );
    bar.set_position(start_step);
    bar.reset_eta();
    bar
}

/// Leaves the live line as it last was and moves stderr to a fresh line.
fn end_live_line(bar: Option<indicatif::ProgressBar>) {
    if let Some(b) = bar {
        b.abandon();
        eprintln!();
    }
}

/// `n` tokens greedily after `prompt`, decoded: what the model says at this point of training.
fn sample(model: &Rwkv7, tok: &Tokenizer, prompt: &[u32], n: usize) -> Result<String> {
    if prompt.is_empty() {
        return Ok(String::new());
    }
    let t = Tensor::from_slice(prompt, (1, prompt.len()), model.device())?;
    let (logits, mut state) = model.forward(&t, None)?;
    let mut last = logits.get(0)?.get(prompt.len() - 1)?;
    let eot = tok.special_id(crate::tokenizer::Special::EndOfText);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = last.argmax(candle_core::D::Minus1)?.to_scalar::<u32>()?;
        if Some(id) == eot {
            break;
        }
        out.push(id);
        last = model.step(&[id], &mut state)?.get(0)?;
    }
    tok.decode(&out)
}

/// Options of one `tb-train` invocation.
pub struct RunOptions {
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// The run directory, already locked.
    pub dir: RunDir,
    pub resume: bool,
    /// A fresh run starts from this checkpoint's weights instead of the init (fine-tuning); its
    /// tokenizer, when it carries one, is the run's.
    pub init_from: Option<PathBuf>,
    /// With `init_from`: the model may have more layers than the checkpoint (see [`grow_params`]).
    pub grow: bool,
    /// Stop (with a checkpoint) after this many seconds.
    pub max_time: Option<f64>,
    pub quiet: bool,
    /// Set by SIGINT/SIGTERM: finish the step, checkpoint, exit 130.
    pub stop: Arc<AtomicBool>,
}

/// One complete checkpoint on disk.
#[derive(Clone, Debug)]
pub struct Saved {
    pub step: u64,
    pub val_loss: Option<f64>,
}

fn stem(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step:07}"))
}

/// Complete checkpoints (weights, optimiser state and meta all present), oldest first. The meta
/// file is written last, so its presence marks a complete checkpoint.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<Saved>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(step) = name
            .strip_prefix("step_")
            .and_then(|r| r.strip_suffix(".json"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let s = stem(dir, step);
        if !s.with_extension("safetensors").exists() || !s.with_extension("optim").exists() {
            continue;
        }
        let meta: serde_json::Value = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        out.push(Saved {
            step,
            val_loss: meta.get("val_loss").and_then(|v| v.as_f64()),
        });
    }
    out.sort_by_key(|s| s.step);
    Ok(out)
}

/// Keeps the best `best` by validation loss and the `recent` most recent; deletes the rest.
fn retain(dir: &Path, best: usize, recent: usize) -> Result<()> {
    let all = list_checkpoints(dir)?;
    let mut keep: Vec<u64> = all.iter().rev().take(recent).map(|s| s.step).collect();
    let mut by_loss: Vec<&Saved> = all.iter().filter(|s| s.val_loss.is_some()).collect();
    // total_cmp: a hand-edited step_*.json must not be able to make the sort panic.
    by_loss.sort_by(|a, b| {
        let loss = |s: &Saved| s.val_loss.unwrap_or(f64::INFINITY);
        loss(a).total_cmp(&loss(b))
    });
    keep.extend(by_loss.iter().take(best).map(|s| s.step));
    for s in all.iter().filter(|s| !keep.contains(&s.step)) {
        let base = stem(dir, s.step);
        // Meta first: a half-deleted checkpoint must not look complete.
        for ext in ["json", "optim", "safetensors"] {
            let _ = std::fs::remove_file(base.with_extension(ext));
        }
    }
    Ok(())
}

/// Validation loss and bits per byte over `cfg.eval_batches` fixed batches.
fn evaluate(
    model: &Rwkv7,
    val: &Dataset,
    cfg: &TrainConfig,
    bytes_per_token: f64,
) -> Result<(f64, f64)> {
    let mut total = 0.0;
    for i in 0..cfg.eval_batches {
        let batch = val.batch(
            cfg.batch_size,
            cfg.ctx_len,
            &mut step_rng(cfg.seed ^ 0x5eed_7a1d, i as u64),
        )?;
        total += batch_loss(model, &batch)?.to_scalar::<f32>()? as f64;
    }
    let loss = total / cfg.eval_batches.max(1) as f64;
    Ok((loss, loss / std::f64::consts::LN_2 / bytes_per_token))
}

/// The run directory's lock: a second `tb-train` on it exits 75 at once.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let f =
        std::fs::File::create(&path).map_err(|e| Error::output(&path, "creating lock file", e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::TempFail(format!(
            "{} is locked by another tb-train run; try again later",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, "locking", e)),
    }
}

/// A run directory held by this process: created, locked, checked and cleaned before anything
/// else is written to it, so a refused run (locked: 75; holding checkpoints without `--resume`: 2)
/// has written nothing. Held until dropped.
pub struct RunDir {
    path: PathBuf,
    _lock: std::fs::File,
}

impl RunDir {
    pub fn open(dir: &Path, resume: bool) -> Result<RunDir> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::output(dir, "creating run directory", e))?;
        let lock = lock_dir(dir)?;
        if !resume && !list_checkpoints(dir)?.is_empty() {
            return Err(Error::Usage(format!(
                "{} already holds checkpoints; add --resume to continue that run, or choose another --out",
                dir.display()
            )));
        }
        // A run killed while writing a checkpoint leaves its temporary file behind; under the
        // lock no other run is writing here.
        crate::fsutil::remove_atomic_temps(dir)?;
        Ok(RunDir {
            path: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What one training step needs in memory, at least (bytes, as f64 so no config overflows it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepMemory {
    /// Tokens in one micro-batch: `batch_size × ctx_len` (`grad_accum` runs them in turn).
    pub tokens: f64,
    /// Weights, gradients and the optimizer's two moments: 16 bytes a parameter.
    pub params: f64,
    /// Activations kept for the backward pass.
    pub activations: f64,
}

impl StepMemory {
    pub fn total(&self) -> f64 {
        self.params + self.activations
    }
}

/// A lower bound on a training step's memory. The activations are counted as 24·C + 2·F floats
/// per token and layer plus 8·C per token (embedding, final norm, head input); tinybit's CPU
/// trainer measures about 37·C + 2·F per token and layer, so a config this refuses would not
/// have run.
pub fn step_memory(model: &ModelConfig, train: &TrainConfig) -> StepMemory {
    let (c, f) = (model.d_model as f64, model.d_ffn as f64);
    let tokens = train.batch_size as f64 * train.ctx_len as f64;
    let per_token = model.n_layer as f64 * (24.0 * c + 2.0 * f) + 8.0 * c;
    StepMemory {
        tokens,
        params: 16.0 * model.param_count_f64(),
        activations: 4.0 * tokens * per_token,
    }
}

fn gib(bytes: f64) -> String {
    if bytes >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    }
}

/// Refuses (exit 65) a config whose step cannot fit in `limit` bytes (the device's memory; see
/// [`crate::device::memory_bytes`]), or whose sizes overflow, naming the estimate, before
/// anything is allocated or written.
pub fn check_memory(model: &ModelConfig, train: &TrainConfig, limit: Option<u64>) -> Result<()> {
    let m = step_memory(model, train);
    let what = format!(
        "batch_size {} × ctx_len {} = {:.0} tokens a step",
        train.batch_size, train.ctx_len, m.tokens
    );
    if train.batch_size.checked_mul(train.ctx_len).is_none()
        || !m.total().is_finite()
        || m.total() >= u64::MAX as f64
    {
        return Err(Error::Data(format!(
            "invalid train config: {what} overflows; lower batch_size or ctx_len"
        )));
    }
    if let Some(limit) = limit
        && m.total() > limit as f64
    {
        return Err(Error::Data(format!(
            "invalid train config: {what} needs at least {} ({} of activations, {} of weights, \
             gradients and optimizer state), more than the {} of memory this device has; lower \
             batch_size or ctx_len (grad_accum adds tokens a step without adding memory)",
            gib(m.total()),
            gib(m.activations),
            gib(m.params),
            gib(limit as f64)
        )));
    }
    Ok(())
}

/// Whether a checkpoint of architecture `from` can start a model of architecture `to` by growth:
/// the same in all but a larger number of layers.
pub fn check_growth(from: &ModelConfig, to: &ModelConfig) -> Result<()> {
    let mut same = from.clone();
    same.n_layer = to.n_layer;
    if same.arch_hash() != to.arch_hash() || to.n_layer <= from.n_layer {
        return Err(Error::Usage(format!(
            "--grow needs a model that differs from the checkpoint only in having more layers (it has {}, the model config {}; widths, vocabulary and ternary choices must be equal)",
            from.n_layer, to.n_layer
        )));
    }
    Ok(())
}

/// The parameters of a deeper model started from a checkpoint (depth growth): the checkpoint's
/// embedding, head and blocks fill the model's first layers, and the layers past them take the
/// fresh init of `cfg` at their depth. That init zeroes each block's output projections
/// (`att.output`, `ffn.value`), so a new block adds nothing to the residual stream and the grown
/// model starts out computing exactly what the checkpoint computed; training then gives the new
/// blocks their share.
pub fn grow_params(ck: &Checkpoint, cfg: &ModelConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    check_growth(&ck.meta.config, cfg)?;
    let mut params = init_params(cfg, seed, &Device::Cpu)?;
    for (name, t) in params.iter_mut() {
        if let Some(old) = ck.params.get(name.as_str()) {
            *t = old.to_dtype(DType::F32)?;
        }
    }
    Ok(params)
}

/// Runs training as `opts` says. Returns the last checkpoint's weights path.
pub fn run(opts: RunOptions) -> Result<Option<PathBuf>> {
    let RunOptions {
        model: mcfg,
        train: tcfg,
        dir,
        resume,
        init_from,
        grow,
        max_time,
        quiet,
        stop,
    } = opts;
    let started = Instant::now();
    let dev = crate::device::open(&tcfg.device)?;
    check_memory(&mcfg, &tcfg, crate::device::memory_bytes(&dev))?;
    let precision = crate::device::set_precision(&tcfg.precision)?;
    let out = dir.path().to_path_buf();
    // With --init-from the checkpoint's tokenizer (when it has one) is the run's, resumed or not.
    let init_meta = init_from
        .as_deref()
        .map(checkpoint::read_meta)
        .transpose()?;
    if let Some(m) = &init_meta {
        let what = init_from.as_deref().unwrap_or(Path::new("")).display();
        if grow {
            check_growth(&m.config, &mcfg).map_err(|e| Error::Usage(format!("{what}: {e}")))?;
        } else if m.config.arch_hash() != mcfg.arch_hash() {
            return Err(Error::Usage(format!(
                "{what}: its architecture differs from the model config (or --set) given; drop those to train it as it is (or add --grow for a deeper model)"
            )));
        }
    }
    let tok = match init_meta.as_ref().and_then(|m| m.tokenizer.as_ref()) {
        Some((kind, payload)) => Tokenizer::from_metadata(kind, payload)?,
        None => Tokenizer::from_file(&tcfg.tokenizer)?,
    };
    if tok.vocab_size() > mcfg.vocab_size {
        return Err(Error::Data(format!(
            "the tokenizer has {} tokens but the model's vocab_size is {}; raise vocab_size",
            tok.vocab_size(),
            mcfg.vocab_size
        )));
    }
    let train_data = Dataset::open(&tcfg.train_data, &tok, &tcfg.template)?;
    let val = match &tcfg.val_data {
        Some(p) => {
            let val = Dataset::open(p, &tok, &tcfg.template)?;
            let bpt = val.bytes_per_token(&tok)?;
            Some((val, bpt))
        }
        None => None,
    };
    let log_path = out.join("train.jsonl");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, "opening", e))?;
    let mut rep = Reporter {
        log,
        bar: None,
        stdout_tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        closed: false,
        stop: stop.clone(),
    };

    // Fresh start or resume.
    let saved = list_checkpoints(&out)?;
    // `RunDir::open` refused checkpoints without --resume.
    let (tr, mut opt, start_step) = match saved.last().filter(|_| resume) {
        Some(last) => {
            let base = stem(&out, last.step);
            // Checkpoints are device-independent: read on the CPU, then moved.
            let ck = checkpoint::load(&base.with_extension("safetensors"), &Device::Cpu)?;
            if ck.meta.config.arch_hash() != mcfg.arch_hash() {
                return Err(Error::Data(format!(
                    "{}: the run directory holds a different model than --model-config; use another --out",
                    out.display()
                )));
            }
            let tr = Trainable::new(&mcfg, to_device(ck.ordered(), &dev)?)?;
            let mut opt = Optimizer::new(tr.vars.clone(), &tcfg)?;
            let optim_path = base.with_extension("optim");
            let bytes =
                std::fs::read(&optim_path).map_err(|e| Error::io(&optim_path, "reading", e))?;
            let (t, moments) = read_optim(&bytes, &optim_path.display().to_string())?;
            opt.load_state(&moments, t, &optim_path.display().to_string())?;
            (tr, opt, last.step)
        }
        None => {
            // Initialised on the CPU whatever the device, so a seed gives the same model anywhere.
            let params = match &init_from {
                Some(p) if grow => {
                    grow_params(&checkpoint::load(p, &Device::Cpu)?, &mcfg, tcfg.seed)?
                }
                Some(p) => checkpoint::load(p, &Device::Cpu)?.ordered(),
                None => init_params(&mcfg, tcfg.seed, &Device::Cpu)?,
            };
            let tr = Trainable::new(&mcfg, to_device(params, &dev)?)?;
            let opt = Optimizer::new(tr.vars.clone(), &tcfg)?;
            (tr, opt, 0)
        }
    };
    let resolved = json!({"model": mcfg.resolved(), "train": tcfg});
    write_atomic(
        &out.join("config.json"),
        // Cannot fail: a `json!` value with string keys always serialises.
        serde_json::to_string_pretty(&resolved).unwrap().as_bytes(),
    )?;
    if start_step >= tcfg.max_steps {
        rep.emit(json!({"type": "done", "step": start_step, "reason": "already complete"}))?;
        if !quiet {
            eprintln!(
                "tb-train: {}: already complete at step {start_step}",
                out.display()
            );
        }
        return Ok(Some(stem(&out, start_step).with_extension("safetensors")));
    }
    let n_params: usize = tr.vars.iter().map(|(_, v)| v.elem_count()).sum();
    rep.emit(json!({"type": "start", "step": start_step, "max_steps": tcfg.max_steps, "params": n_params,
        "out": out, "resumed": start_step > 0, "init_from": init_from, "tokens_per_step": tcfg.batch_size.saturating_mul(tcfg.ctx_len).saturating_mul(tcfg.grad_accum),
        "threads": rayon::current_num_threads(), "device": crate::device::name(&dev),
        "precision": if dev.is_cuda() { precision } else { "f32" }}))?;

    rep.bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| live_line(tcfg.max_steps, start_step));
    let plot_path = out.join("loss.svg");
    let mut history = plot::History::from_log(&log_path, start_step)?;
    let sample_prompt = match &tcfg.sample_prompt {
        Some(p) => tok.encode(p)?,
        None => train_data.sample_prompt(),
    };
    let mut tok_per_s: Option<f64> = None;
    let mut val_note = String::new();
    let meta = Meta {
        config: mcfg.clone(),
        template: tcfg.template.clone(),
        tokenizer: Some(tok.metadata()),
    };
    let mut last_val: Option<f64> = None;
    let mut last_path = None;
    let mut step = start_step;
    let mut train_loss = f64::NAN;
    let gpu = dev.is_cuda();
    while step < tcfg.max_steps {
        let t0 = Instant::now();
        let (lr, wd) = schedule(&tcfg, step);
        let mut grads: HashMap<String, Vec<f32>> = HashMap::new();
        // On the GPU the gradients stay there (vars order).
        let mut gpu_grads: Vec<Option<Tensor>> = vec![None; tr.vars.len()];
        let mut loss_sum = 0.0;
        for micro in 0..tcfg.grad_accum {
            let micro_index = step
                .wrapping_mul(tcfg.grad_accum as u64)
                .wrapping_add(micro as u64);
            let mut rng = step_rng(tcfg.seed, micro_index);
            let batch = train_data.batch(tcfg.batch_size, tcfg.ctx_len, &mut rng)?;
            let loss = batch_loss(&tr.model, &batch)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            if gpu {
                for (acc, g) in gpu_grads.iter_mut().zip(tr.gradient_tensors(&loss)?) {
                    *acc = match (acc.take(), g) {
                        (Some(a), Some(g)) => Some((a + g)?),
                        (a, g) => a.or(g),
                    };
                }
                continue;
            }
            for (n, g) in tr.gradients(&loss)? {
                match grads.get_mut(&n) {
                    Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
                    None => {
                        grads.insert(n, g);
                    }
                }
            }
        }
        if tcfg.grad_accum > 1 && !gpu {
            let s = 1.0 / tcfg.grad_accum as f32;
            grads
                .values_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= s));
        }
        train_loss = loss_sum / tcfg.grad_accum as f64;
        if !train_loss.is_finite() {
            return Err(Error::Data(format!(
                "loss became {train_loss} at step {step}; lower lr or check the data (last good checkpoint kept)"
            )));
        }
        let gnorm = if gpu {
            gpu_update(&mut opt, &gpu_grads, &tcfg, lr, wd)?
        } else {
            let gnorm = opt.clip(&mut grads, tcfg.grad_clip);
            opt.step(&grads, lr, wd)?;
            gnorm
        };
        step += 1;
        let tokens = tcfg.batch_size as f64 * tcfg.ctx_len as f64 * tcfg.grad_accum as f64;
        let rate = tokens / t0.elapsed().as_secs_f64();
        rep.emit(
            json!({"type": "step", "step": step, "loss": train_loss, "lr": lr,
            "tok_per_s": rate, "grad_norm": gnorm}),
        )?;
        history.train.push((step, train_loss));
        // The live line's rate is smoothed: single steps are noisy.
        let smooth = tok_per_s.map_or(rate, |r| 0.9 * r + 0.1 * rate);
        tok_per_s = Some(smooth);
        if let Some(b) = &rep.bar {
            b.set_position(step);
            b.set_message(format!(
                "loss {train_loss:.4} | {:.1}k tok/s | lr {lr:.1e}{val_note}",
                smooth / 1e3
            ));
        }
        let last = step == tcfg.max_steps;
        if let Some((vd, bpt)) = &val
            && (last || (tcfg.eval_every > 0 && step % tcfg.eval_every == 0))
        {
            let (vl, bpb) = evaluate(&tr.model, vd, &tcfg, *bpt)?;
            last_val = Some(vl);
            rep.emit(json!({"type": "eval", "step": step, "val_loss": vl, "val_bpb": bpb}))?;
            history.val.push((step, vl, bpb));
            history.draw(&plot_path)?;
            val_note = format!(" | val {vl:.4}");
        }
        if tcfg.sample_every > 0 && (step % tcfg.sample_every == 0 || last) {
            let text = sample(&tr.model, &tok, &sample_prompt, tcfg.sample_tokens)?;
            rep.emit(json!({"type": "sample", "step": step, "prompt": tok.decode(&sample_prompt)?, "text": text}))?;
        }
        let interrupted = stop.load(Ordering::SeqCst);
        let out_of_time = max_time.is_some_and(|m| started.elapsed().as_secs_f64() >= m);
        if last
            || interrupted
            || out_of_time
            || (tcfg.checkpoint_every > 0 && step % tcfg.checkpoint_every == 0)
        {
            let path = save_checkpoint(&out, step, &tr, &opt, &meta, &tcfg, train_loss, last_val)?;
            rep.emit(json!({"type": "checkpoint", "step": step, "path": path}))?;
            if val.is_none() {
                // No evaluations to redraw at: the training curve is drawn with each checkpoint.
                history.draw(&plot_path)?;
            }
            retain(&out, tcfg.keep_best, tcfg.keep_recent)?;
            last_path = Some(path);
        }
        if interrupted {
            let why = if rep.closed {
                "stdout closed"
            } else {
                "interrupted"
            };
            rep.emit(json!({"type": "done", "step": step, "reason": why, "loss": train_loss}))?;
            end_live_line(rep.bar.take());
            return Err(Error::Interrupted(format!(
                "{why} at step {step}; checkpoint saved, resume with --resume"
            )));
        }
        if out_of_time {
            rep.emit(
                json!({"type": "done", "step": step, "reason": "max_time", "loss": train_loss}),
            )?;
            end_live_line(rep.bar.take());
            return Ok(last_path);
        }
    }
    rep.emit(json!({"type": "done", "step": step, "reason": "complete", "loss": train_loss, "val_loss": last_val,
        "seconds": started.elapsed().as_secs_f64()}))?;
    end_live_line(rep.bar.take());
    Ok(last_path)
}

/// Moves named parameters to `dev`.
fn to_device(params: Vec<(String, Tensor)>, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    params
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(dev)?)))
        .collect()
}

/// The GPU's clip + AdamW step on gradients summed over `grad_accum` micro-batches; returns
/// the global gradient norm (of the mean gradient) before clipping.
#[cfg(feature = "cuda")]
fn gpu_update(
    opt: &mut Optimizer,
    grads: &[Option<Tensor>],
    tcfg: &TrainConfig,
    lr: f64,
    wd: f64,
) -> Result<f64> {
    let mean = 1.0 / tcfg.grad_accum as f64;
    let norm = opt.grad_norm_gpu(grads)? * mean;
    let clip = if tcfg.grad_clip > 0.0 && norm > tcfg.grad_clip {
        tcfg.grad_clip / (norm + 1e-6)
    } else {
        1.0
    };
    opt.step_gpu(grads, (mean * clip) as f32, lr, wd)?;
    Ok(norm)
}

#[cfg(not(feature = "cuda"))]
fn gpu_update(
    _: &mut Optimizer,
    _: &[Option<Tensor>],
    _: &TrainConfig,
    _: f64,
    _: f64,
) -> Result<f64> {
    Err(Error::Unavailable("this build has no GPU support".into()))
}

/// Writes weights, optimiser state, then meta (the meta marks the checkpoint complete).
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    dir: &Path,
    step: u64,
    tr: &Trainable,
    opt: &Optimizer,
    meta: &Meta,
    tcfg: &TrainConfig,
    train_loss: f64,
    val_loss: Option<f64>,
) -> Result<PathBuf> {
    let base = stem(dir, step);
    let weights = base.with_extension("safetensors");
    checkpoint::save(&weights, meta, &tr.params()?)?;
    let state = opt.state_tensors()?;
    let md: HashMap<String, String> = [
        ("tinybit.format".into(), "optim".into()),
        ("tinybit.version".into(), "1".into()),
        ("t".into(), opt.t.to_string()),
    ]
    .into();
    let bytes = safetensors::serialize(state.iter().map(|(n, t)| (n.clone(), t)), Some(md))
        .map_err(|e| Error::Io(format!("serialising optimizer state: {e}")))?;
    write_atomic(&base.with_extension("optim"), &bytes)?;
    if std::env::var_os("TINYBIT_TEST_ABORT_IN_CHECKPOINT").is_some() {
        // Test hook: die as a SIGKILL would, between the weights and the meta file.
        std::process::abort();
    }
    let info = json!({"step": step, "train_loss": train_loss, "val_loss": val_loss,
        "time": chrono::Utc::now().to_rfc3339(), "model": meta.config.resolved(), "train": tcfg});
    write_atomic(
        &base.with_extension("json"),
        // Cannot fail: a `json!` value with string keys always serialises.
        serde_json::to_string_pretty(&info).unwrap().as_bytes(),
    )?;
    Ok(weights)
}

/// Reads an `.optim` file: Adam's step count and every moment tensor.
fn read_optim(bytes: &[u8], file: &str) -> Result<(u64, HashMap<String, Vec<f32>>)> {
    let bad = |m: String| Error::Data(format!("optimizer state {file}: {m}"));
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("corrupt ({e})")))?;
    let md = header.metadata().clone().unwrap_or_default();
    if md.get("tinybit.format").map(String::as_str) != Some("optim") {
        return Err(bad("not a tinybit optimizer state".into()));
    }
    let t = md
        .get("t")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("no step count".into()))?;
    let st =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(format!("corrupt ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            // Cannot fail: chunks_exact(4) gives 4-byte slices.
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        out.insert(name, v);
    }
    Ok((t, out))
}

/// Splits `--set` overrides between the model and the train config: `model.`/`train.` prefixes
/// choose explicitly; a bare key goes to whichever config has that field.
pub fn split_overrides(
    model: &ModelConfig,
    train: &TrainConfig,
    sets: &[(String, String)],
) -> Result<(ModelConfig, TrainConfig)> {
    let (mut ms, mut ts) = (Vec::new(), Vec::new());
    let model_keys = toml::Table::try_from(model).map_err(|e| Error::Data(e.to_string()))?;
    for (k, v) in sets {
        if let Some(k) = k.strip_prefix("model.") {
            ms.push((k.to_string(), v.clone()));
        } else if let Some(k) = k.strip_prefix("train.") {
            ts.push((k.to_string(), v.clone()));
        } else if model_keys.contains_key(k.split('.').next().unwrap_or(k)) || is_model_field(k) {
            ms.push((k.clone(), v.clone()));
        } else {
            ts.push((k.clone(), v.clone()));
        }
    }
    let m = model.with_overrides(&ms)?;
    let t: TrainConfig = crate::config::apply_overrides(train, &ts, "train config")?;
    t.validate()?;
    Ok((m, t))
}

fn is_model_field(k: &str) -> bool {
    ["lora_w", "lora_a", "lora_v", "lora_g", "family"]
        .iter()
        .any(|f| k == *f || k.starts_with(&format!("{f}.")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn live_line_template_parses() {
        super::end_live_line(Some(super::live_line(10, 0)));
    }
}
