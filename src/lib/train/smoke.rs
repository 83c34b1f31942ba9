//! `tb-train --smoke-test`: proves the whole pipeline on the CPU in about a minute, whatever
//! configs it is given — tokenizer training, token files, a shrunken model, a few dozen steps with
//! validation, and a final checkpoint.

use super::config::{Schedule, TrainConfig};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use std::path::Path;

/// Public-domain Shakespeare shipped with tinybit, so the smoke test needs no download.
pub const BUNDLED_TEXT: &str = include_str!("../../../tests/data/tinyshakespeare.txt");

const SMOKE_TEXT_BYTES: usize = 300_000;
const SMOKE_VOCAB: usize = 2048;

/// Writes the smoke data into `dir/smoke-data` and returns the shrunken configs that use it.
pub fn prepare(
    model: &ModelConfig,
    train: &TrainConfig,
    dir: &Path,
) -> Result<(ModelConfig, TrainConfig)> {
    let data = dir.join("smoke-data");
    std::fs::create_dir_all(&data).map_err(|e| Error::output(&data, "creating", e))?;
    let cut = BUNDLED_TEXT[..SMOKE_TEXT_BYTES]
        .rfind('\n')
        .map_or(SMOKE_TEXT_BYTES, |i| i + 1);
    let text_path = data.join("shakespeare.txt");
    std::fs::write(&text_path, &BUNDLED_TEXT[..cut])
        .map_err(|e| Error::output(&text_path, "writing", e))?;
    let tok = Tokenizer::train_bpe(std::slice::from_ref(&text_path), SMOKE_VOCAB)?;
    let tok_path = data.join("tokenizer.json");
    tok.save(&tok_path)?;
    let (train_bin, val_bin) = (data.join("train.bin"), data.join("val.bin"));
    crate::data::encode_to_file(
        &[text_path],
        &tok,
        &train_bin,
        Some((0.1, &val_bin)),
        &indicatif::ProgressBar::hidden(),
    )?;

    let head = model.head_size;
    let d_model = model.d_model.min(256).max(head) / head * head;
    let m = ModelConfig {
        n_layer: model.n_layer.min(4),
        d_model,
        d_ffn: model.d_ffn.min(d_model * 7 / 2 / 32 * 32),
        vocab_size: tok.vocab_size().div_ceil(64) * 64,
        lora_w: None,
        lora_a: None,
        lora_v: None,
        lora_g: None,
        ..model.clone()
    };
    let t = TrainConfig {
        train_data: train_bin,
        val_data: Some(val_bin),
        tokenizer: tok_path,
        // 120 steps of 8 × 128 tokens: enough for the model to write words and line breaks in
        // Shakespeare's shape (40 steps of 4 × 64 wrote only newlines and commas).
        batch_size: 8,
        ctx_len: 128,
        grad_accum: 1,
        max_steps: 120,
        lr: 3e-3,
        lr_final: 3e-4,
        warmup_steps: 6,
        schedule: Schedule::Cosine,
        eval_every: 60,
        eval_batches: 2,
        checkpoint_every: 0,
        device: "cpu".into(),
        ..train.clone()
    };
    Ok((m, t))
}
