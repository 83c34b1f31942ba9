//! The engine's view of a checkpoint: the big matrices point straight into the memory-mapped file
//! (or are converted once at load), the small vectors are copied to f32 and the LoRA matrices
//! transposed in their stored dtype.
//! BitLinear matrices are held as trits and a scale, packed for the integer kernels: read from a
//! packed checkpoint (`ternary-b3`), or ternarised from f32 master weights exactly as the model
//! does.

use super::gemv::{Matrix, WeightDtype};
use crate::checkpoint::{self, Meta};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::linear::absmean_ternary;
use crate::model::params::{is_ternary, layer_name, param_specs};
use crate::model::rows::{self, LN_EPS};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// LayerNorm / GroupNorm affine parameters.
pub(crate) struct Norm {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl Norm {
    /// LayerNorm of each row of `x` (rows of `w.len()`) into `out`.
    pub fn rows(&self, x: &[f32], out: &mut [f32]) {
        let c = self.w.len();
        for (x, y) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            rows::norm_group(x, &self.w, &self.b, LN_EPS, y);
        }
    }
}

/// The value-residual parameters, absent in layer 0 (present in official files, never used).
pub(crate) struct ValueResidual {
    pub v0: Vec<f32>,
    /// `[Dv, C]` (transposed from the file's `[C, Dv]`, so every product is `W x`).
    pub v1: Matrix,
    /// `[C, Dv]`.
    pub v2: Matrix,
}

pub(crate) struct Block {
    pub ln1: Norm,
    pub ln2: Norm,
    /// Token-shift mix coefficients of r, w, k, v, a, g.
    pub mu: [Vec<f32>; 6],
    pub w0: Vec<f32>,
    pub a0: Vec<f32>,
    pub k_k: Vec<f32>,
    pub k_a: Vec<f32>,
    /// `[H·N]`.
    pub r_k: Vec<f32>,
    /// LoRA first halves `[D, C]` and second halves `[C, D]`, all transposed from the file.
    pub w1: Matrix,
    pub w2: Matrix,
    pub a1: Matrix,
    pub a2: Matrix,
    pub g1: Matrix,
    pub g2: Matrix,
    pub vres: Option<ValueResidual>,
    /// The projections: `WeightDtype::Ternary` for BitLinear ones (whose input the engine
    /// quantises to 8 bits per token, as model::linear does), float otherwise.
    pub r: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    pub o: Matrix,
    pub ln_x: Norm,
    pub ffn_mu: Vec<f32>,
    pub ffn_key: Matrix,
    pub ffn_value: Matrix,
}

pub(crate) struct Weights {
    pub meta: Meta,
    pub emb: Matrix,
    pub ln0: Norm,
    pub blocks: Vec<Block>,
    pub ln_out: Norm,
    /// `None`: tied to the embedding.
    pub head: Option<Matrix>,
    /// Bytes of `streamed_mut`'s matrices.
    streamed_bytes: usize,
}

impl Weights {
    pub fn cfg(&self) -> &ModelConfig {
        &self.meta.config
    }

    pub fn head(&self) -> &Matrix {
        self.head.as_ref().unwrap_or(&self.emb)
    }

    /// Every matrix a decoded token streams (the head, not the embedding: a token reads one of its
    /// rows, unless it is the head).
    fn streamed_mut(&mut self) -> Vec<&mut Matrix> {
        let head = self.head.as_mut().unwrap_or(&mut self.emb);
        let body = self.blocks.iter_mut().flat_map(|b| {
            let vres = b.vres.as_mut().map(|r| [&mut r.v1, &mut r.v2]);
            [
                &mut b.w1,
                &mut b.w2,
                &mut b.a1,
                &mut b.a2,
                &mut b.g1,
                &mut b.g2,
                &mut b.r,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.ffn_key,
                &mut b.ffn_value,
            ]
            .into_iter()
            .chain(vres.into_iter().flatten())
        });
        body.chain([head]).collect()
    }

    /// Matrix bytes one decoded token reads: the streamed matrices and one embedding row (the
    /// small vectors are left out).
    pub fn bytes_per_token(&self) -> usize {
        self.streamed_bytes + self.emb.bytes() / self.emb.rows()
    }
}

fn stored_dtype(d: Dtype) -> Option<WeightDtype> {
    match d {
        Dtype::F32 => Some(WeightDtype::F32),
        Dtype::F16 => Some(WeightDtype::F16),
        Dtype::BF16 => Some(WeightDtype::BF16),
        _ => None,
    }
}

/// Index of the first non-finite element, read from the bit patterns (exponent all ones).
fn first_non_finite(dtype: WeightDtype, data: &[u8]) -> Option<usize> {
    match dtype {
        WeightDtype::F32 => data.chunks_exact(4).position(|b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        WeightDtype::F16 => data
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
        WeightDtype::BF16 => data
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        // Trits are never stored as tensor bytes a float check applies to.
        WeightDtype::Ternary | WeightDtype::Q8 => None,
    }
}

/// BitLinear's weight quantiser, the model's own (`absmean_ternary`), so the trits and γ are
/// exactly those of the candle forward and of a file packed by `checkpoint::save_ternary`.
fn ternarize(w: Vec<f32>, shape: &[usize]) -> Result<(Vec<i8>, f32)> {
    let t = candle_core::Tensor::from_vec(w, shape, &candle_core::Device::Cpu)?;
    let (trits, gamma) = absmean_ternary(&t)?;
    let trits = trits.flatten_all()?.to_vec1::<f32>()?;
    Ok((trits.into_iter().map(|v| v as i8).collect(), gamma))
}

struct Loader<'a> {
    st: SafeTensors<'a>,
    /// The file packs ternary-eligible matrices (`NAME.packed` + `NAME.scale`).
    packed: bool,
    shapes: HashMap<String, Vec<usize>>,
    file: String,
    map: Arc<memmap2::Mmap>,
    dtype: Option<WeightDtype>,
    cfg: ModelConfig,
}

impl<'a> Loader<'a> {
    /// The tensor, checked against the config's shape and for non-finite values.
    fn view(&self, name: &str) -> Result<TensorView<'a>> {
        let file = &self.file;
        let want = &self.shapes[name];
        let view = self.st.tensor(name).map_err(|_| {
            Error::Data(format!(
                "checkpoint {file}: tensor {name} is missing (expected shape {want:?})"
            ))
        })?;
        if view.shape() != want.as_slice() {
            return Err(Error::Data(format!(
                "checkpoint {file}: tensor {name} has shape {:?}, but the config says {want:?}",
                view.shape()
            )));
        }
        Ok(view)
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        let view = self.view(name)?;
        let vals = checkpoint::to_f32(name, &self.file, view.dtype(), view.data())?;
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            return Err(Error::Data(format!(
                "checkpoint {}: tensor {name} holds a non-finite value at index {i}",
                self.file
            )));
        }
        Ok(vals)
    }

    /// A `[rows, cols]` matrix in the requested dtype: mapped when the file already stores it so
    /// (and it is aligned), converted once otherwise.
    fn matrix(&self, name: &str) -> Result<Matrix> {
        let view = self.view(name)?;
        let (rows, cols) = (view.shape()[0], view.shape()[1]);
        if let Some(stored) = stored_dtype(view.dtype())
            && self.dtype.is_none_or(|d| d == stored)
        {
            if let Some(i) = first_non_finite(stored, view.data()) {
                return Err(Error::Data(format!(
                    "checkpoint {}: tensor {name} holds a non-finite value at index {i}",
                    self.file
                )));
            }
            // SAFETY: the bytes live in the map, which the matrix keeps alive; checkpoints are
            // replaced by rename, never rewritten in place.
            if let Some(m) =
                unsafe { Matrix::borrowed(rows, cols, stored, view.data(), self.map.clone()) }
            {
                return Ok(m);
            }
        }
        let vals = self.vector(name)?;
        let dtype = self
            .dtype
            .or_else(|| stored_dtype(view.dtype()))
            .unwrap_or(WeightDtype::F32);
        Ok(Matrix::from_f32_as(rows, cols, vals, dtype))
    }

    /// A LoRA matrix stored `[in, out]`, transposed to `[out, in]`, kept in the file's float
    /// dtype (exact: the values came from it; f16 halves the bytes that f32 would read per token,
    /// and a ternary model's LoRAs are a third of them).
    fn lora(&self, name: &str) -> Result<Matrix> {
        let stored = stored_dtype(self.view(name)?.dtype()).unwrap_or(WeightDtype::F32);
        let vals = self.vector(name)?;
        let (din, dout) = (self.shapes[name][0], self.shapes[name][1]);
        let mut t = vec![0f32; vals.len()];
        for i in 0..din {
            for o in 0..dout {
                t[o * din + i] = vals[i * dout + o];
            }
        }
        Ok(Matrix::from_f32_as(dout, din, t, stored))
    }

    fn linear(&self, name: &str) -> Result<Matrix> {
        let (rows, cols) = (self.shapes[name][0], self.shapes[name][1]);
        let ternary = is_ternary(&self.cfg, name);
        if self.packed && self.st.tensor(&format!("{name}.packed")).is_ok() {
            // The model would ternarise the dequantised matrix again and get these trits and
            // this γ back (checkpoint::unpack_matrix), so they are used directly. A dense layer
            // packed after training keeps f32 inputs, as in the model.
            let (trits, gamma) =
                checkpoint::read_packed(&self.st, name, &[rows, cols], &self.file)?;
            return Ok(if ternary {
                Matrix::from_trits(rows, cols, &trits, gamma)
            } else {
                Matrix::from_trits_dense(rows, cols, &trits, gamma)
            });
        }
        if ternary {
            let (trits, gamma) = ternarize(self.vector(name)?, &[rows, cols])?;
            return Ok(Matrix::from_trits(rows, cols, &trits, gamma));
        }
        self.matrix(name)
    }

    fn norm(&self, prefix: &str) -> Result<Norm> {
        Ok(Norm {
            w: self.vector(&format!("{prefix}.weight"))?,
            b: self.vector(&format!("{prefix}.bias"))?,
        })
    }

    fn block(&self, i: usize) -> Result<Block> {
        use crate::model::params::layer::*;
        let name = |j: usize| layer_name(i, j);
        let vec = |j: usize| self.vector(&name(j));
        let lora = |j: usize| self.lora(&name(j));
        let lin = |j: usize| self.linear(&name(j));
        let norm = |w: usize, b: usize| -> Result<Norm> {
            Ok(Norm {
                w: vec(w)?,
                b: vec(b)?,
            })
        };
        Ok(Block {
            ln1: norm(LN1_W, LN1_B)?,
            ln2: norm(LN2_W, LN2_B)?,
            mu: [
                vec(X_R)?,
                vec(X_W)?,
                vec(X_K)?,
                vec(X_V)?,
                vec(X_A)?,
                vec(X_G)?,
            ],
            w0: vec(W0)?,
            a0: vec(A0)?,
            k_k: vec(K_K)?,
            k_a: vec(K_A)?,
            r_k: vec(R_K)?,
            w1: lora(W1)?,
            w2: lora(W2)?,
            a1: lora(A1)?,
            a2: lora(A2)?,
            g1: lora(G1)?,
            g2: lora(G2)?,
            vres: if i == 0 {
                None
            } else {
                Some(ValueResidual {
                    v0: vec(V0)?,
                    v1: lora(V1)?,
                    v2: lora(V2)?,
                })
            },
            r: lin(WR)?,
            k: lin(WK)?,
            v: lin(WV)?,
            o: lin(WO)?,
            ln_x: norm(LNX_W, LNX_B)?,
            ffn_mu: vec(FFN_X_K)?,
            ffn_key: lin(FK)?,
            ffn_value: lin(FV)?,
        })
    }
}

/// Maps a checkpoint and builds the engine's weights. `dtype`: store the big matrices as this
/// (converted once) instead of as the file has them; `head_q8`: the head (the embedding too when
/// tied) as 8-bit rows, `None` = only when the file is packed.
pub(crate) fn load(
    path: &Path,
    dtype: Option<WeightDtype>,
    head_q8: Option<bool>,
) -> Result<Weights> {
    // Read-only map; writers replace checkpoints by rename, never in place.
    let map = Arc::new(crate::fsutil::map_input(path, "checkpoint")?);
    let file = path.display().to_string();
    let bytes: &[u8] = &map[..];
    // The header checks (format, versions, every parameter's presence and shape) are the
    // checkpoint module's; the loader below only reads.
    let header = checkpoint::inspect(bytes, &file)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::Data(format!(
            "checkpoint {file} is truncated or corrupt ({e}); re-download or re-convert it"
        ))
    })?;
    let meta = header.meta;
    let cfg = meta.config.clone();
    let ld = Loader {
        st,
        packed: header.quant.is_some(),
        shapes: param_specs(&cfg)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect(),
        file,
        map: map.clone(),
        dtype,
        cfg: cfg.clone(),
    };
    let blocks = (0..cfg.n_layer)
        .map(|i| ld.block(i))
        .collect::<Result<_>>()?;
    let q8 = |m: Matrix| match head_q8.unwrap_or(ld.packed) {
        true => Matrix::from_f32_q8(m.rows(), m.cols(), &m.to_f32_vec()),
        false => m,
    };
    let emb = ld.matrix("emb.weight")?;
    let mut w = Weights {
        emb: if cfg.tie_embeddings { q8(emb) } else { emb },
        ln0: ld.norm("blocks.0.ln0")?,
        blocks,
        ln_out: ld.norm("ln_out")?,
        head: if cfg.tie_embeddings {
            None
        } else {
            Some(q8(ld.matrix("head.weight")?))
        },
        meta,
        streamed_bytes: 0,
    };
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
    let mut streamed = w.streamed_mut();
    let streamed_bytes = streamed.iter().map(|m| m.bytes()).sum();
    // A copy at load, for fewer TLB misses on every token (see `Matrix::move_to_huge_pages`).
    #[cfg(target_os = "linux")]
    Matrix::move_to_huge_pages(&mut streamed)
        .map_err(|e| Error::Io(format!("engine weights: cannot map memory for them ({e})")))?;
    w.streamed_bytes = streamed_bytes;
    Ok(w)
}
