//! `Linear`: one type, two variants. Dense is `y = x Wᵀ`. Ternary is BitNet b1.58's BitLinear:
//! absmean-quantised weights in {−γ, 0, +γ} and per-token 8-bit absmax activations in the forward
//! pass, full-precision master weights updated by the optimiser.
//!
//! The straight-through estimator is written `x + (q(x) − x).detach()`: candle's `round` has a zero
//! gradient, so the quantiser itself must stay out of the gradient path.

use super::fused::Kernels;
use crate::error::Result;
use candle_core::{D, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKind {
    Dense,
    Ternary,
}

#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`, the torch convention of the official checkpoints.
    pub weight: Tensor,
    pub kind: LinearKind,
}

/// Absmean ternary quantisation of a weight matrix: `γ·RoundClip(W/γ, −1, 1)`, γ = mean|W|.
pub fn ternarize(w: &Tensor) -> Result<Tensor> {
    let (trits, gamma) = absmean_ternary(w)?;
    Ok((trits * gamma as f64)?)
}

/// The two parts of `ternarize`: the trits `RoundClip(W/γ, −1, 1)` (as f32) and γ = mean|W|.
/// The checkpoint packer uses these too, so a packed matrix is exactly what BitLinear computes.
pub fn absmean_ternary(w: &Tensor) -> Result<(Tensor, f32)> {
    let gamma = w.abs()?.mean_all()?.to_scalar::<f32>()?.max(1e-5);
    Ok(((w / gamma as f64)?.round()?.clamp(-1f32, 1f32)?, gamma))
}

/// Per-token (last axis) absmax quantisation to the 8-bit grid, returned dequantised.
pub fn quantize_act_8bit(x: &Tensor) -> Result<Tensor> {
    let amax = x.abs()?.max_keepdim(D::Minus1)?.clamp(1e-5f32, f32::MAX)?;
    let scale = (amax / 127.0)?;
    Ok(x.broadcast_div(&scale)?
        .round()?
        .clamp(-128f32, 127f32)?
        .broadcast_mul(&scale)?)
}

/// Straight-through estimator: the forward value of `q`, the gradient of `x`.
fn ste(x: &Tensor, q: &Tensor) -> Result<Tensor> {
    Ok((x + (q - x)?.detach())?)
}

impl Linear {
    pub fn new(weight: Tensor, kind: LinearKind) -> Linear {
        Linear { weight, kind }
    }

    /// `x [.., in] → [.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Kernels::Fused)
    }

    /// [`Linear::forward`] with the matmul of `kernels`.
    pub fn forward_with(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let (x, w) = match self.kind {
            LinearKind::Dense => (x.clone(), self.weight.clone()),
            LinearKind::Ternary => {
                let wd = self.weight.detach();
                let xd = x.detach();
                (
                    ste(x, &quantize_act_8bit(&xd)?)?,
                    ste(&self.weight, &ternarize(&wd)?)?,
                )
            }
        };
        kernels.linear(&x, &w)
    }
}

/// `x [.., k] · m [k, n] → [.., n]`, flattening the leading axes into one GEMM.
pub fn matmul_last(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims
        .last()
        .ok_or_else(|| crate::error::Error::data("matmul_last of a scalar"))?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, k))?.matmul(m)?;
    let mut out = dims;
    // Cannot fail: `out` is `dims`, which has a last axis (checked above).
    *out.last_mut().unwrap() = m.dim(1)?;
    Ok(y.reshape(out)?)
}
