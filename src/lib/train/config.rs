//! The training configuration (TOML, unknown keys rejected, `--set` overrides).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Learning-rate and weight-decay schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Warmup → stable → cosine decay over the last `decay_fraction` of the steps.
    Wsd,
    /// Warmup → cosine decay over all remaining steps.
    Cosine,
    /// BitNet b1.58's two stages: full learning rate with weight decay for the first half, then a
    /// cooled-down learning rate and no weight decay.
    Bitnet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    /// Experimental: Muon (orthogonalised momentum) for 2-D weight matrices, AdamW for the rest.
    Muon,
}

fn d_one() -> usize {
    1
}
fn d_lr_final() -> f64 {
    3e-5
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.99
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_decay_fraction() -> f64 {
    0.2
}
fn d_eval_batches() -> usize {
    8
}
fn d_keep() -> usize {
    3
}
fn d_sample_tokens() -> usize {
    48
}
fn d_template() -> String {
    crate::checkpoint::TEMPLATE_TINYBIT.into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Token file (`tb-tok encode`) or `.jsonl` conversations (SFT).
    pub train_data: PathBuf,
    /// Validation token file; none → no validation.
    #[serde(default)]
    pub val_data: Option<PathBuf>,
    /// The tokenizer the data was made with (embedded in every checkpoint).
    pub tokenizer: PathBuf,
    pub batch_size: usize,
    pub ctx_len: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    pub max_steps: u64,
    pub lr: f64,
    #[serde(default = "d_lr_final")]
    pub lr_final: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "d_schedule")]
    pub schedule: Schedule,
    #[serde(default = "d_decay_fraction")]
    pub decay_fraction: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    #[serde(default = "d_optimizer")]
    pub optimizer: OptimizerKind,
    /// Validation every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "d_eval_batches")]
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    #[serde(default = "d_keep")]
    pub keep_best: usize,
    #[serde(default = "d_keep")]
    pub keep_recent: usize,
    #[serde(default = "d_one_u64")]
    pub seed: u64,
    /// `auto` (the GPU when built with `cuda` and one answers), `cpu` or `cuda[:N]`.
    #[serde(default = "d_device")]
    pub device: String,
    /// GPU matrix products: `auto` (= `tf32`), `tf32` or `f32` (see `device::set_precision`).
    #[serde(default = "d_precision")]
    pub precision: String,
    /// CPU threads (0: all cores).
    #[serde(default)]
    pub threads: usize,
    #[serde(default = "d_template")]
    pub template: String,
    /// A short greedy sample (a `sample` record) every N steps (0: never).
    #[serde(default)]
    pub sample_every: u64,
    /// The sample's prompt; none → the start of the training data (an SFT set: its first
    /// conversation up to the reply).
    #[serde(default)]
    pub sample_prompt: Option<String>,
    /// Tokens per sample.
    #[serde(default = "d_sample_tokens")]
    pub sample_tokens: usize,
}

fn d_schedule() -> Schedule {
    Schedule::Wsd
}
fn d_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn d_one_u64() -> u64 {
    1
}
fn d_precision() -> String {
    "auto".into()
}
fn d_device() -> String {
    "auto".into()
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "reading train config", e))?;
        let mut cfg: TrainConfig = toml::from_str(&text)
            .map_err(|e| Error::Data(format!("train config {}: {e}", path.display())))?;
        // Relative data paths are relative to the config file's directory... unless they exist as given.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            Some(&mut cfg.train_data),
            cfg.val_data.as_mut(),
            Some(&mut cfg.tokenizer),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(Error::Data(format!("invalid train config: {m}")));
        if self.batch_size == 0 || self.ctx_len == 0 || self.grad_accum == 0 {
            return fail("batch_size, ctx_len and grad_accum must be positive");
        }
        if self.max_steps == 0 {
            return fail("max_steps must be positive");
        }
        if !(self.lr > 0.0) || self.lr_final < 0.0 {
            return fail("lr must be positive and lr_final not negative");
        }
        if !(0.0..=1.0).contains(&self.decay_fraction) {
            return fail("decay_fraction must be in [0, 1]");
        }
        Ok(())
    }
}
