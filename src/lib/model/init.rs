//! A fresh model: the official x070 initialisation (BlinkDL/RWKV-LM,
//! `RWKV-v7/train_temp/src/model.py`), deterministic for a seed.

use super::params::param_specs;
use crate::config::ModelConfig;
use crate::error::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A `[rows, cols]` matrix with orthonormal rows or columns (whichever are fewer), times `gain`.
/// Cholesky-QR of a Gaussian matrix in f64: `Q = G R⁻¹` with `GᵀG = RᵀR`. The GEMMs go through
/// candle, so even the `[V, C]` head initialises in well under a second.
fn orthogonal(rows: usize, cols: usize, gain: f64, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
    let (k, len) = (rows.min(cols), rows.max(cols));
    let g: Vec<f64> = (0..len * k)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect();
    let g = Tensor::from_vec(g, (len, k), &Device::Cpu)?;
    let m = g.t()?.matmul(&g)?.to_vec2::<f64>()?;
    // Cholesky: M = Rᵀ R with R upper triangular.
    let mut r = vec![vec![0f64; k]; k];
    for i in 0..k {
        for j in i..k {
            let s: f64 = m[i][j] - (0..i).map(|p| r[p][i] * r[p][j]).sum::<f64>();
            r[i][j] = if i == j {
                s.max(1e-300).sqrt()
            } else {
                s / r[i][i]
            };
        }
    }
    // R⁻¹ by back substitution, column by column.
    let mut rinv = vec![0f64; k * k];
    for col in 0..k {
        for i in (0..=col).rev() {
            let rhs = if i == col { 1.0 } else { 0.0 };
            let s: f64 = (i + 1..=col).map(|p| r[i][p] * rinv[p * k + col]).sum();
            rinv[i * k + col] = (rhs - s) / r[i][i];
        }
    }
    let q = g.matmul(&Tensor::from_vec(rinv, (k, k), &Device::Cpu)?)?; // [len, k], orthonormal columns
    let q = if rows >= cols { q } else { q.t()? };
    Ok((q * gain)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Every parameter of a fresh model, in `param_specs` order.
pub fn init_params(cfg: &ModelConfig, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (c, n_layer, v) = (cfg.d_model, cfg.n_layer, cfg.vocab_size);
    let head_size = cfg.head_size;
    let mut out = Vec::new();
    for spec in param_specs(cfg) {
        let name = spec.name.as_str();
        let numel: usize = spec.shape.iter().product();
        let layer: usize = name
            .strip_prefix("blocks.")
            .and_then(|r| r.split('.').next()?.parse().ok())
            .unwrap_or(0);
        let r01 = if n_layer > 1 {
            layer as f64 / (n_layer - 1) as f64
        } else {
            0.0
        };
        let r10 = 1.0 - layer as f64 / n_layer as f64;
        // The official init's channel-wise profiles.
        let ddd = |i: usize| i as f64 / c as f64;
        let linear = |i: usize| i as f64 / (c - 1).max(1) as f64 - 0.5;
        let zigzag = |i: usize| {
            let half = (head_size - 1) as f64 / 2.0;
            let z = ((i % head_size) as f64 - half) / half;
            z * z.abs()
        };
        let per_channel =
            |f: &dyn Fn(usize) -> f64| (0..c).map(|i| f(i) as f32).collect::<Vec<f32>>();
        // Cannot fail: rsplit yields at least one piece, even of an empty name.
        let last = name.rsplit('.').next().unwrap();
        let stem = name.rsplit_once('.').map(|(a, _)| a).unwrap_or(name);
        let vals: Vec<f32> = match (stem.rsplit('.').next().unwrap_or(""), last) {
            (_, "x_r") | (_, "x_g") => per_channel(&|i| 1.0 - ddd(i).powf(0.2 * r10)),
            (_, "x_w") | (_, "x_a") => per_channel(&|i| 1.0 - ddd(i).powf(0.9 * r10)),
            ("att", "x_k") | (_, "x_v") => per_channel(&|i| 1.0 - ddd(i).powf(0.7 * r10)),
            ("ffn", "x_k") => per_channel(&|i| 1.0 - ddd(i).powf(r10.powi(4))),
            (_, "w0") => per_channel(&|i| {
                -6.0 + 6.0 * (i as f64 / (c - 1).max(1) as f64).powf(1.0 + r01.powf(0.3))
                    + 0.5
                    + 2.5 * zigzag(i)
            }),
            (_, "a0") => per_channel(&|i| -0.19 + 0.3 * zigzag(i) + 0.4 * linear(i)),
            (_, "v0") => per_channel(&|i| 0.73 - 0.4 * linear(i)),
            (_, "k_k") => per_channel(&|i| 0.71 - 0.1 * linear(i)),
            (_, "k_a") => vec![1.02; numel],
            (_, "r_k") => vec![-0.04; numel],
            (_, "w1") | (_, "a1") | (_, "v1") | (_, "g1") => vec![0.0; numel],
            (_, "w2") | (_, "a2") | (_, "v2") | (_, "g2") => {
                orthogonal(spec.shape[0], spec.shape[1], 0.1, &mut rng)?
            }
            ("ln_x", "weight") => {
                vec![((1 + layer) as f64 / n_layer as f64).powf(0.7) as f32; numel]
            }
            (_, "bias") => vec![0.0; numel],
            (s, "weight") if s.starts_with("ln") => vec![1.0; numel],
            ("emb", "weight") => (0..numel)
                .map(|_| rng.random_range(-1e-4f32..1e-4))
                .collect(),
            ("head", "weight") => {
                let gain = if v > c {
                    0.5 * (v as f64 / c as f64).sqrt()
                } else {
                    0.5
                };
                orthogonal(v, c, gain, &mut rng)?
            }
            ("receptance", _) | ("value", _) if name.contains(".att.") => {
                orthogonal(c, c, 1.0, &mut rng)?
            }
            ("key", _) if name.contains(".ffn.") => {
                orthogonal(spec.shape[0], spec.shape[1], 1.0, &mut rng)?
            }
            ("key", _) => orthogonal(c, c, 0.1, &mut rng)?,
            ("output", _) | ("value", _) => vec![0.0; numel],
            _ => unreachable!("no init rule for {name}"),
        };
        out.push((
            spec.name.clone(),
            Tensor::from_vec(vals, spec.shape.as_slice(), dev)?,
        ));
    }
    Ok(out)
}
