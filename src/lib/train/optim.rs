//! AdamW written here (candle's keeps its moments private, so a run could not resume), with
//! parameter groups: weight decay only on the big matrices, 2× learning rate on `att.w0`
//! (RWKV7.md §8). Muon is an experimental alternative for 2-D weight matrices.
//!
//! Moments live in plain `Vec<f32>`s: the update is one fused loop per parameter, and saving or
//! restoring them is a byte copy.

use super::config::{OptimizerKind, Schedule, TrainConfig};
use crate::error::{Error, Result};
use crate::model::params::{ParamKind, kind_of};
use candle_core::{Tensor, Var};
use std::collections::HashMap;

/// Learning rate and weight decay at `step` (0-based).
pub fn schedule(cfg: &TrainConfig, step: u64) -> (f64, f64) {
    let (lr, lr_final, total) = (cfg.lr, cfg.lr_final, cfg.max_steps.max(1));
    if step < cfg.warmup_steps {
        // Linear warmup from 1% (the official trainer's 0.01 + 0.99·t/warmup).
        let f = 0.01 + 0.99 * step as f64 / cfg.warmup_steps as f64;
        return (lr * f, cfg.weight_decay);
    }
    let cosine = |from: u64, to: u64, hi: f64, lo: f64| {
        let p = ((step - from) as f64 / (to - from).max(1) as f64).clamp(0.0, 1.0);
        lo + 0.5 * (hi - lo) * (1.0 + (std::f64::consts::PI * p).cos())
    };
    match cfg.schedule {
        Schedule::Cosine => (
            cosine(cfg.warmup_steps, total, lr, lr_final),
            cfg.weight_decay,
        ),
        Schedule::Wsd => {
            let decay_start = total - ((total as f64 * cfg.decay_fraction) as u64).min(total);
            let start = decay_start.max(cfg.warmup_steps);
            if step < start {
                (lr, cfg.weight_decay)
            } else {
                (cosine(start, total, lr, lr_final), cfg.weight_decay)
            }
        }
        Schedule::Bitnet => {
            let half = (total / 2).max(cfg.warmup_steps);
            if step < half {
                (
                    cosine(cfg.warmup_steps, half, lr, lr * 0.5),
                    cfg.weight_decay,
                )
            } else {
                // Stage two: cooled down, no weight decay (ternary weights stop drifting to zero).
                (cosine(half, total, lr * 0.3, lr_final), 0.0)
            }
        }
    }
}

/// One trainable parameter with its optimiser state.
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct Optimizer {
    pub slots: Vec<Slot>,
    /// Number of updates done (Adam's bias correction).
    pub t: u64,
    kind: OptimizerKind,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Optimizer {
    pub fn new(params: Vec<(String, Var)>, cfg: &TrainConfig) -> Optimizer {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                Slot {
                    kind: kind_of(&name),
                    name,
                    var,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            })
            .collect();
        Optimizer {
            slots,
            t: 0,
            kind: cfg.optimizer,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
        }
    }

    /// Scales gradients so their global L2 norm is at most `max`; returns the norm before clipping.
    pub fn clip(&self, grads: &mut HashMap<String, Vec<f32>>, max: f64) -> f64 {
        // Summed in parameter order (not the map's), so the norm is reproducible to the bit.
        let sq: f64 = self
            .slots
            .iter()
            .filter_map(|s| grads.get(&s.name))
            .flat_map(|g| g.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum();
        let norm = sq.sqrt();
        if max > 0.0 && norm > max {
            let s = (max / (norm + 1e-6)) as f32;
            grads
                .values_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= s));
        }
        norm
    }

    /// One update with learning rate `lr` and weight decay `wd` (decoupled, matrices only).
    pub fn step(&mut self, grads: &HashMap<String, Vec<f32>>, lr: f64, wd: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.eps as f32);
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.name) else {
                continue;
            };
            let mut p = slot.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let lr_p = if slot.name.ends_with("att.w0") {
                2.0 * lr
            } else {
                lr
            };
            let wd_p = if slot.kind == ParamKind::Matrix {
                wd
            } else {
                0.0
            };
            let muon = self.kind == OptimizerKind::Muon
                && slot.kind == ParamKind::Matrix
                && !slot.name.starts_with("emb")
                && !slot.name.starts_with("head");
            if muon {
                muon_update(slot, g, &mut p, lr_p, wd_p, b1)?;
            } else {
                let step_size = (lr_p / bc1) as f32;
                let bc2_sqrt = bc2.sqrt() as f32;
                let decay = 1.0 - (lr_p * wd_p) as f32;
                for i in 0..p.len() {
                    let gi = g[i];
                    slot.m[i] = b1 * slot.m[i] + (1.0 - b1) * gi;
                    slot.v[i] = b2 * slot.v[i] + (1.0 - b2) * gi * gi;
                    p[i] =
                        p[i] * decay - step_size * slot.m[i] / (slot.v[i].sqrt() / bc2_sqrt + eps);
                }
            }
            let t = Tensor::from_vec(p, slot.var.shape(), slot.var.device())?;
            slot.var.set(&t)?;
        }
        Ok(())
    }

    /// The moments, for the `.optim` file.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for s in &self.slots {
            let dev = s.var.device();
            out.push((
                format!("m.{}", s.name),
                Tensor::from_slice(&s.m, s.m.len(), dev)?,
            ));
            out.push((
                format!("v.{}", s.name),
                Tensor::from_slice(&s.v, s.v.len(), dev)?,
            ));
        }
        Ok(out)
    }

    /// Restores the moments saved by `state_tensors`.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Vec<f32>>,
        t: u64,
        file: &str,
    ) -> Result<()> {
        for s in &mut self.slots {
            for (prefix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let src = tensors.get(&key).ok_or_else(|| {
                    Error::Data(format!("optimizer state {file}: tensor {key} is missing"))
                })?;
                if src.len() != dst.len() {
                    return Err(Error::Data(format!(
                        "optimizer state {file}: tensor {key} has the wrong size"
                    )));
                }
                dst.copy_from_slice(src);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Muon: momentum, then an approximately orthogonal update from five Newton–Schulz iterations,
/// scaled so its RMS matches AdamW's (≈0.2), plus decoupled weight decay.
fn muon_update(
    slot: &mut Slot,
    g: &[f32],
    p: &mut [f32],
    lr: f64,
    wd: f64,
    beta: f32,
) -> Result<()> {
    for (m, &gi) in slot.m.iter_mut().zip(g) {
        *m = beta * *m + gi;
    }
    // Nesterov-style look-ahead.
    let look: Vec<f32> = slot.m.iter().zip(g).map(|(m, gi)| gi + beta * m).collect();
    let (rows, cols) = slot.var.dims2()?;
    let dev = slot.var.device();
    let mut x = Tensor::from_vec(look, (rows, cols), dev)?;
    let transposed = rows > cols;
    if transposed {
        x = x.t()?.contiguous()?;
    }
    let norm = x.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? + 1e-7;
    x = (x / norm as f64)?;
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    for _ in 0..5 {
        let xxt = x.matmul(&x.t()?)?;
        let poly = ((&xxt * b)? + (xxt.matmul(&xxt)? * c)?)?;
        x = ((&x * a)? + poly.matmul(&x)?)?;
    }
    if transposed {
        x = x.t()?.contiguous()?;
    }
    let scale = 0.2 * (rows.max(cols) as f64).sqrt();
    let upd = x.flatten_all()?.to_vec1::<f32>()?;
    let decay = 1.0 - (lr * wd) as f32;
    for (pi, u) in p.iter_mut().zip(upd) {
        *pi = *pi * decay - (lr * scale) as f32 * u;
    }
    Ok(())
}
