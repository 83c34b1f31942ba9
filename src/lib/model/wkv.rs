//! The WKV-7 recurrence (RWKV7.md §4.1 step 9, §7).
//!
//! Per (batch, head), with `S` an N×N matrix indexed `[i = value channel, j = key channel]`:
//!
//! ```text
//! w_t  = exp(-e^{-1/2} · σ(ŵ_t))            decay multiplier from the raw logit ŵ
//! sa_t = S_{t-1} a_t
//! S_t  = S_{t-1} diag(w_t) + sa_t b_tᵀ + v_t k_tᵀ
//! y_t  = S_t r_t
//! ```
//!
//! Inputs `r, w(=ŵ), k, v, a, b` are `[B,T,H,N]` f32, the state `[B,H,N,N]` f32.

use crate::error::Result;
use candle_core::Tensor;

/// e^{-1/2}: the soft clamp that keeps the decay in (0.545, 1).
pub const EXP_NEG_HALF: f32 = 0.606_530_66;

/// Decay multiplier from the raw logit: `exp(-e^{-1/2} σ(ŵ))`.
#[inline]
pub fn decay(w_raw: f32) -> f32 {
    (-EXP_NEG_HALF / (1.0 + (-w_raw).exp())).exp()
}

/// Problem sizes of one WKV call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub n: usize,
}

/// Reference twin: the recurrence written as plainly as possible, one (b,h) at a time.
/// Returns `(y [B,T,H,N], s_final [B,H,N,N])`.
#[allow(clippy::too_many_arguments)]
pub fn wkv7_reference(
    d: Dims,
    r: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    a: &[f32],
    b: &[f32],
    s0: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        b: nb,
        t: nt,
        h: nh,
        n,
    } = d;
    let mut y = vec![0f32; nb * nt * nh * n];
    let mut s_out = s0.to_vec();
    for bi in 0..nb {
        for hi in 0..nh {
            let s = &mut s_out[(bi * nh + hi) * n * n..][..n * n];
            for ti in 0..nt {
                let o = ((bi * nt + ti) * nh + hi) * n;
                let (r, w, k, v, a, bb) = (
                    &r[o..o + n],
                    &w[o..o + n],
                    &k[o..o + n],
                    &v[o..o + n],
                    &a[o..o + n],
                    &b[o..o + n],
                );
                for i in 0..n {
                    let row = &mut s[i * n..(i + 1) * n];
                    let sa: f32 = (0..n).map(|j| row[j] * a[j]).sum();
                    let mut acc = 0f32;
                    for j in 0..n {
                        row[j] = row[j] * decay(w[j]) + sa * bb[j] + v[i] * k[j];
                        acc += row[j] * r[j];
                    }
                    y[o + i] = acc;
                }
            }
        }
    }
    (y, s_out)
}

/// The WKV-7 operator on tensors: `(y [B,T,H,N], s_final [B,H,N,N])`.
///
/// Forward only for now (no gradient is recorded); the fused operator with its backward replaces
/// the body of this function without changing its signature.
pub fn wkv7(
    r: &Tensor,
    w: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s0: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (nb, nt, nh, n) = r.dims4()?;
    let d = Dims {
        b: nb,
        t: nt,
        h: nh,
        n,
    };
    let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
    let (y, s) = wkv7_reference(
        d,
        &flat(r)?,
        &flat(w)?,
        &flat(k)?,
        &flat(v)?,
        &flat(a)?,
        &flat(b)?,
        &flat(s0)?,
    );
    let dev = r.device();
    Ok((
        Tensor::from_vec(y, (nb, nt, nh, n), dev)?,
        Tensor::from_vec(s, (nb, nh, n, n), dev)?,
    ))
}
