//! TimeMix's core as one fused op: everything between the projections and the output matrix
//! (TimeMix steps 3–12 of `model::rwkv7` without their matmuls) — decay logit, value residual,
//! in-context rate, key normalisation and modulation, the WKV-7 scan, GroupNorm, bonus and gate —
//! with a hand-written backward, and [`core_reference`], its twin composed of candle ops.
//!
//! Inputs, all rows `[B·T, C]` with C = H·N:
//! * activations ([`Acts`]): `r, k, v` (projections), `wl = tanh(x_w w1) w2`, `al = x_a a1 a2`,
//!   `g = σ(x_g g1) g2`, and outside layer 0 `vl = x_v v1 v2` and `v_first`;
//! * parameters ([`Params`]): `w0, a0, v0, k_k, k_a` (`C` each), `r_k` (`[H,N]`), `ln_x` weight
//!   and bias;
//! * the WKV state `s0 [B,H,N,N]`.
//!
//! Output: `z = (GroupNorm(y)·ln_x + bonus) ⊙ g`, the input of the output matrix, and the final
//! state. For candle the op takes three packed arguments: the activations stacked `[K·R, C]` in
//! the order of [`ACTS`], the parameters `[8·C]` in the order of [`PARAMS`], and `s0`; it returns
//! `[R + B·N, C]` = z over the final state (B·H·N·N = B·N rows of C). The forward keeps the scan's
//! output `y` and its tape for the backward; everything else the backward recomputes from the
//! inputs in one pass.

use super::fused::{
    Kernels, cpu_slice, dot, fusable, map_new, op_err, par_rows, par_rows_planes, sum_partials,
    with_slice, zeros,
};
use super::rows::{
    GROUPNORM_EPS, NORMALIZE_EPS, TmixParams, TmixRow, head_stats, icl_rate, sigmoid_fast,
    tmix_out_head, tmix_prep,
};
use super::wkv::{
    self, Dims, FUSED_N, Inputs, Tape, wkv7_backward_reference, wkv7_fused_backward,
    wkv7_fused_forward, wkv7_reference,
};
use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp3, D, Layout, Shape, Tensor};
use candle_nn::ops::sigmoid;
use std::sync::Mutex;

/// Order of the activation planes: layer 0 passes the first six.
pub const ACTS: [&str; 8] = ["r", "wl", "k", "v", "al", "g", "vl", "v_first"];
/// The parameter rows, in order: indices of `params::layer`.
pub const PARAMS: [usize; 8] = {
    use super::params::layer::*;
    [W0, A0, V0, K_K, K_A, R_K, LNX_W, LNX_B]
};

pub(crate) const R: usize = 0;
pub(crate) const WL: usize = 1;
pub(crate) const K: usize = 2;
pub(crate) const V: usize = 3;
pub(crate) const AL: usize = 4;
pub(crate) const G: usize = 5;
pub(crate) const VL: usize = 6;
pub(crate) const VF: usize = 7;

const P_W0: usize = 0;
const P_A0: usize = 1;
const P_V0: usize = 2;
const P_KK: usize = 3;
const P_KA: usize = 4;
const P_RK: usize = 5;
const P_LNW: usize = 6;
const P_LNB: usize = 7;

/// The activations of one call (`[B·T, C]` each).
pub struct Acts<'a> {
    pub r: &'a Tensor,
    pub wl: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub al: &'a Tensor,
    pub g: &'a Tensor,
    /// `(vl, v_first)` outside layer 0.
    pub residual: Option<(&'a Tensor, &'a Tensor)>,
}

/// The layer's parameters: vectors of `C` elements (any shape), `r_k` `[H,N]`.
pub struct Params<'a> {
    pub w0: &'a Tensor,
    pub a0: &'a Tensor,
    pub v0: &'a Tensor,
    pub k_k: &'a Tensor,
    pub k_a: &'a Tensor,
    pub r_k: &'a Tensor,
    pub ln_w: &'a Tensor,
    pub ln_b: &'a Tensor,
}

/// The plane `q` of equal planes of `len` laid end to end.
fn plane(x: &[f32], q: usize, len: usize) -> &[f32] {
    &x[q * len..(q + 1) * len]
}

/// Row `i` (of `c`) of each of `K` chunks.
fn rows_mut<'a, const K: usize>(
    o: &'a mut [&mut [f32]; K],
    i: usize,
    c: usize,
) -> [&'a mut [f32]; K] {
    let mut it = o.iter_mut();
    // Cannot fail: `o` has exactly K slices, and from_fn asks for K.
    std::array::from_fn(|_| &mut it.next().expect("K chunks")[i * c..(i + 1) * c])
}

impl<'a> TmixParams<'a> {
    fn new(p: &'a [f32], c: usize) -> Self {
        let q = |i: usize| plane(p, i, c);
        TmixParams {
            w0: q(P_W0),
            a0: q(P_A0),
            v0: q(P_V0),
            k_k: q(P_KK),
            k_a: q(P_KA),
            r_k: q(P_RK),
            ln_w: q(P_LNW),
            ln_b: q(P_LNB),
        }
    }
}

/// Row `row` of every activation plane.
impl<'a> TmixRow<'a> {
    fn new(a: &'a [f32], m: usize, residual: bool, row: usize, c: usize) -> Self {
        let q = |i: usize| &plane(a, i, m)[row * c..(row + 1) * c];
        TmixRow {
            r: q(R),
            wl: q(WL),
            k: q(K),
            v: q(V),
            al: q(AL),
            residual: residual.then(|| (q(VL), q(VF))),
        }
    }
}

/// What the forward keeps for the backward.
struct Saved {
    /// The scan's inputs (six planes of `[R, C]`).
    scan_in: Vec<f32>,
    /// The scan's output y `[R, C]`.
    y: Vec<f32>,
    /// The fused scan's tape (None when the reference scan ran).
    tape: Option<Tape>,
}

pub(crate) struct CoreOp {
    d: Dims,
    residual: bool,
    /// Whether `s0` wants a gradient (it is a plain zero tensor in training).
    s0_grad: bool,
    saved: Mutex<Option<Saved>>,
}

impl CoreOp {
    const NAME: &'static str = "time_mix_core";

    /// The core of `d` (`residual`: outside layer 0), for use inside a bigger op.
    pub(crate) fn new(d: Dims, residual: bool) -> CoreOp {
        CoreOp {
            d,
            residual,
            s0_grad: false,
            saved: Mutex::new(None),
        }
    }

    /// [`CoreOp::forward`] that keeps what the backward needs in the op: `[z | s_T]`.
    pub(crate) fn forward_keep(&self, acts: &[f32], p: &[f32], s0: &[f32]) -> Vec<f32> {
        let (out, saved) = self.forward(acts, p, s0);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        out
    }

    fn planes(&self) -> usize {
        if self.residual { 8 } else { 6 }
    }

    fn check(&self, acts: usize, params: usize, s0: usize) -> candle_core::Result<()> {
        let (m, c) = (self.d.tokens_len(), self.d.h * self.d.n);
        if acts != self.planes() * m || params != 8 * c || s0 != self.d.state_len() {
            return Err(op_err(
                Self::NAME,
                format!(
                    "{acts} activations, {params} parameters, {s0} state elements do not fit {:?}",
                    self.d
                ),
            ));
        }
        Ok(())
    }

    /// The scan's six inputs `[r, ŵ, k', v', −κ̂, κ̂⊙a]` (planes of `[R, C]`).
    fn scan_inputs(&self, acts: &[f32], p: &[f32]) -> Vec<f32> {
        let (m, n) = (self.d.tokens_len(), self.d.n);
        let c = self.d.h * n;
        let p = TmixParams::new(p, c);
        let mut out = zeros(6 * m);
        par_rows_planes::<6, ()>(&mut out, c, |row0, o| {
            for i in 0..o[0].len() / c {
                let x = TmixRow::new(acts, m, self.residual, row0 + i, c);
                tmix_prep(p, n, &x, rows_mut(o, i, c));
            }
        });
        out
    }

    /// The forward: `[z | s_T]` and what the backward needs.
    fn forward(&self, acts: &[f32], p: &[f32], s0: &[f32]) -> (Vec<f32>, Saved) {
        let d = self.d;
        let (m, n) = (d.tokens_len(), d.n);
        let c = d.h * n;
        let scan_in = self.scan_inputs(acts, p);
        let x = Inputs::from_packed(d, &scan_in, s0);
        let (mut out, tape) = if d.n == FUSED_N {
            let (out, tape) = wkv7_fused_forward(d, x);
            (out, Some(tape))
        } else {
            let (mut y, s) = wkv7_reference(d, x.r, x.w, x.k, x.v, x.a, x.b, x.s0);
            y.extend_from_slice(&s);
            (y, None)
        };
        // `out` becomes [z | s_T]; y moves to the tape.
        let y = map_new(&out[..m], |v| v);
        let g = plane(acts, G, m);
        let prm = TmixParams::new(p, c);
        let (rp, kp, vp) = (
            plane(&scan_in, 0, m),
            plane(&scan_in, 2, m),
            plane(&scan_in, 3, m),
        );
        par_rows(&mut out[..m], c, |row0, zs| {
            for (i, z) in zs.chunks_exact_mut(c).enumerate() {
                let at = (row0 + i) * c;
                for lo in (0..c).step_by(n) {
                    let h = at + lo..at + lo + n;
                    let z = &mut z[lo..lo + n];
                    let (y, r, kp, vp, g) = (
                        &y[h.clone()],
                        &rp[h.clone()],
                        &kp[h.clone()],
                        &vp[h.clone()],
                        &g[h],
                    );
                    tmix_out_head(prm, lo, y, r, kp, vp, g, z);
                }
            }
        });
        (out, Saved { scan_in, y, tape })
    }

    /// Gradients of the activations (planes in the order of [`ACTS`]), the parameters (in the
    /// order of [`PARAMS`]) and `s0`, given those of z and s_T.
    pub(crate) fn backward(
        &self,
        a: &[f32],
        p: &[f32],
        s0: &[f32],
        dz: &[f32],
        ds_t: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.d;
        let (m, n) = (d.tokens_len(), d.n);
        let c = d.h * n;
        let planes = self.planes();
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Saved { scan_in, y, tape } = saved.unwrap_or_else(|| self.forward(a, p, s0).1);
        let x = Inputs::from_packed(d, &scan_in, s0);
        let prm = TmixParams::new(p, c);
        let g = plane(a, G, m);
        let (rp, kp, vp) = (
            plane(&scan_in, 0, m),
            plane(&scan_in, 2, m),
            plane(&scan_in, 3, m),
        );

        // Output side, z = (GroupNorm(y)·ln_w + ln_b + s·v') ⊙ g with s = Σ r k' r_k per head.
        // Writes dg, the bonus's parts of dr, dk', dv' (into the r, k, v planes, completed
        // below) and dy (an extra last plane). Partial sums: [d ln_w | d ln_b | d r_k].
        let mut work = zeros((planes + 1) * m);
        let post = |row0: usize, o: &mut [&mut [f32]]| -> Vec<f32> {
            let mut part = vec![0f32; 3 * c];
            let (mut yn, mut dout, mut tmp) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            for i in 0..o[0].len() / c {
                let at = (row0 + i) * c;
                for lo in (0..c).step_by(n) {
                    let (y, g, dz) = (&y[at + lo..][..n], &g[at + lo..][..n], &dz[at + lo..][..n]);
                    let (r, kp, vp) = (
                        &rp[at + lo..][..n],
                        &kp[at + lo..][..n],
                        &vp[at + lo..][..n],
                    );
                    let (lnw, lnb, rk) = (
                        &prm.ln_w[lo..lo + n],
                        &prm.ln_b[lo..lo + n],
                        &prm.r_k[lo..lo + n],
                    );
                    let (mean, rstd, s) = head_stats(y, r, kp, rk);
                    let (dlnw, rest) = part.split_at_mut(c);
                    let (dlnb, drk) = rest.split_at_mut(c);
                    {
                        let dg = &mut o[G][i * c + lo..][..n];
                        for j in 0..n {
                            yn[j] = (y[j] - mean) * rstd;
                            dout[j] = dz[j] * g[j];
                            dg[j] = dz[j] * (yn[j] * lnw[j] + lnb[j] + s * vp[j]);
                            dlnw[lo + j] += dout[j] * yn[j];
                            dlnb[lo + j] += dout[j];
                        }
                    }
                    {
                        let dvb = &mut o[V][i * c + lo..][..n];
                        for j in 0..n {
                            dvb[j] = s * dout[j];
                        }
                    }
                    let ds = dot(&dout, vp);
                    // GroupNorm: dŷ = dout ⊙ ln_w.
                    for j in 0..n {
                        tmp[j] = dout[j] * lnw[j];
                    }
                    let mg = crate::model::fused::sum(&tmp) / n as f32;
                    let mgx = dot(&tmp, &yn) / n as f32;
                    {
                        let dyo = &mut o[planes][i * c + lo..][..n];
                        for j in 0..n {
                            dyo[j] = rstd * (tmp[j] - mg - yn[j] * mgx);
                        }
                    }
                    {
                        let drb = &mut o[R][i * c + lo..][..n];
                        for j in 0..n {
                            drb[j] = ds * kp[j] * rk[j];
                        }
                    }
                    {
                        let dkb = &mut o[K][i * c + lo..][..n];
                        for j in 0..n {
                            dkb[j] = ds * r[j] * rk[j];
                            drk[lo + j] += ds * r[j] * kp[j];
                        }
                    }
                }
            }
            part
        };
        let parts = if self.residual {
            par_rows_planes::<9, _>(&mut work, c, |r0, o| post(r0, o))
        } else {
            par_rows_planes::<7, _>(&mut work, c, |r0, o| post(r0, o))
        };
        let post_sums = sum_partials(parts, 3 * c);

        // The scan.
        let dy = &work[planes * m..];
        let sg = match &tape {
            Some(t) => wkv7_fused_backward(d, x, t, dy, ds_t),
            None => wkv7_backward_reference(d, x, dy, ds_t),
        };
        work.truncate(planes * m);

        // Input side: from the scan's input gradients to the op's. Partial sums:
        // [dw0 | da0 | dv0 | dk_k | dk_a].
        let pre = |row0: usize, o: &mut [&mut [f32]]| -> Vec<f32> {
            let mut part = vec![0f32; 5 * c];
            let (mut av, mut dkap) = (vec![0f32; c], vec![0f32; n]);
            for i in 0..o[0].len() / c {
                let at = (row0 + i) * c;
                let xr = TmixRow::new(a, m, self.residual, row0 + i, c);
                let sgr = |q: usize| &sg.input(q)[at..at + c];
                let (s_r, s_w, s_k, s_v, s_a, s_b) =
                    (sgr(0), sgr(1), sgr(2), sgr(3), sgr(4), sgr(5));
                let neg_kappa = &plane(&scan_in, 4, m)[at..at + c];
                let (dw0, rest) = part.split_at_mut(c);
                let (da0, rest) = rest.split_at_mut(c);
                let (dv0, rest) = rest.split_at_mut(c);
                let (dkk_p, dka) = rest.split_at_mut(c);
                {
                    let dr = &mut o[R][i * c..(i + 1) * c];
                    for j in 0..c {
                        dr[j] += s_r[j];
                    }
                }
                {
                    let dwl = &mut o[WL][i * c..(i + 1) * c];
                    dwl.copy_from_slice(s_w);
                    for j in 0..c {
                        dw0[j] += s_w[j];
                    }
                }
                // v' = v + (v_first − v) ⊙ ν outside layer 0.
                match xr.residual {
                    Some((vl, vf)) => {
                        let [dv, dvl, dvf] = {
                            let (lo_part, hi_part) = o.split_at_mut(VL);
                            let (dvl, dvf) = hi_part.split_at_mut(1);
                            [
                                &mut lo_part[V][i * c..(i + 1) * c],
                                &mut dvl[0][i * c..(i + 1) * c],
                                &mut dvf[0][i * c..(i + 1) * c],
                            ]
                        };
                        for j in 0..c {
                            let nu = sigmoid_fast(prm.v0[j] + vl[j]);
                            let dvp = dv[j] + s_v[j];
                            dv[j] = dvp * (1.0 - nu);
                            dvf[j] = dvp * nu;
                            dvl[j] = dvp * (vf[j] - xr.v[j]) * nu * (1.0 - nu);
                            dv0[j] += dvl[j];
                        }
                    }
                    None => {
                        let dv = &mut o[V][i * c..(i + 1) * c];
                        for j in 0..c {
                            dv[j] += s_v[j];
                        }
                    }
                }
                // κ̂ = k⊙k_k / ‖k⊙k_k‖ per head (the scan's a = −κ̂, b = κ̂ ⊙ a) and
                // k' = k ⊙ (1 + (a − 1) ⊙ k_a), a = σ(a0 + al).
                icl_rate(prm, xr.al, &mut av);
                let (dk_all, dal_all) = {
                    let (lo_part, hi_part) = o.split_at_mut(AL);
                    (
                        &mut lo_part[K][i * c..(i + 1) * c],
                        &mut hi_part[0][i * c..(i + 1) * c],
                    )
                };
                for lo in (0..c).step_by(n) {
                    let h = lo..lo + n;
                    let (k, k_k, k_a) =
                        (&xr.k[h.clone()], &prm.k_k[h.clone()], &prm.k_a[h.clone()]);
                    let (av, nk) = (&av[h.clone()], &neg_kappa[h.clone()]);
                    let (s_a, s_b) = (&s_a[h.clone()], &s_b[h.clone()]);
                    // ‖k ⊙ k_k‖ (dkap as scratch).
                    for j in 0..n {
                        dkap[j] = k[j] * k_k[j];
                    }
                    let raw = dot(&dkap, &dkap).sqrt();
                    let norm = raw.max(NORMALIZE_EPS);
                    // dκ̂ = db ⊙ a − da.
                    for j in 0..n {
                        dkap[j] = s_b[j] * av[j] - s_a[j];
                    }
                    // κ̂·dκ̂ (κ̂ = −nk); below the clamp the norm is a constant.
                    let proj = if raw > NORMALIZE_EPS {
                        -dot(nk, &dkap)
                    } else {
                        0.0
                    };
                    let (dk, dal) = (&mut dk_all[h.clone()], &mut dal_all[h.clone()]);
                    let (dkk_p, dka, da0) = (
                        &mut dkk_p[h.clone()],
                        &mut dka[h.clone()],
                        &mut da0[h.clone()],
                    );
                    let s_k = &s_k[h.clone()];
                    for j in 0..n {
                        let kappa = -nk[j];
                        let dkk = (dkap[j] - kappa * proj) / norm;
                        let dkp = dk[j] + s_k[j];
                        let da = s_b[j] * kappa + dkp * k[j] * k_a[j];
                        dk[j] = dkp * (1.0 + (av[j] - 1.0) * k_a[j]) + dkk * k_k[j];
                        dkk_p[j] += dkk * k[j];
                        dka[j] += dkp * k[j] * (av[j] - 1.0);
                        dal[j] = da * av[j] * (1.0 - av[j]);
                        da0[j] += dal[j];
                    }
                }
            }
            part
        };
        let parts = if self.residual {
            par_rows_planes::<8, _>(&mut work, c, |r0, o| pre(r0, o))
        } else {
            par_rows_planes::<6, _>(&mut work, c, |r0, o| pre(r0, o))
        };
        let mut dp = sum_partials(parts, 5 * c);
        dp.extend_from_slice(&post_sums[2 * c..]);
        dp.extend_from_slice(&post_sums[..2 * c]);
        (work, dp, sg.s0)
    }
}

impl CustomOp3 for CoreOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let acts = cpu_slice(s1, l1, Self::NAME, "activations")?;
        let p = cpu_slice(s2, l2, Self::NAME, "parameters")?;
        let s0 = cpu_slice(s3, l3, Self::NAME, "state")?;
        self.check(acts.len(), p.len(), s0.len())?;
        let (out, saved) = self.forward(acts, p, s0);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let c = self.d.h * self.d.n;
        let rows = out.len() / c;
        Ok((CpuStorage::F32(out), Shape::from((rows, c))))
    }

    fn bwd(
        &self,
        acts: &Tensor,
        params: &Tensor,
        s0: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let m = self.d.tokens_len();
        let (dacts, dp, ds0) = with_slice(acts, Self::NAME, "activations", |a| {
            with_slice(params, Self::NAME, "parameters", |p| {
                with_slice(s0, Self::NAME, "state", |s0s| {
                    with_slice(&grad, Self::NAME, "output gradient", |gr| {
                        self.check(a.len(), p.len(), s0s.len())?;
                        Ok(self.backward(a, p, s0s, &gr[..m], &gr[m..]))
                    })
                })
            })
        })?;
        let dev = acts.device();
        let ds0 = if self.s0_grad {
            Some(Tensor::from_vec(ds0, s0.shape(), dev)?)
        } else {
            None
        };
        Ok((
            Some(Tensor::from_vec(dacts, acts.shape(), dev)?),
            Some(Tensor::from_vec(dp, params.shape(), dev)?),
            ds0,
        ))
    }
}

/// TimeMix's core (see the module docs): `(z [R, C], s_T [B,H,N,N])`; `b` sequences.
pub fn core(x: &Acts, p: &Params, s0: &Tensor, b: usize) -> Result<(Tensor, Tensor)> {
    let (rows, c) = x.r.dims2()?;
    let (h, n) = p.r_k.dims2()?;
    if c != h * n || rows % b.max(1) != 0 {
        return Err(Error::data(format!(
            "time_mix_core: activations [{rows}, {c}] do not fit {b} sequences of {h} heads of {n}"
        )));
    }
    let d = Dims {
        b,
        t: rows / b,
        h,
        n,
    };
    let mut acts = vec![x.r, x.wl, x.k, x.v, x.al, x.g];
    if let Some((vl, vf)) = x.residual {
        acts.extend([vl, vf]);
    }
    let acts = Tensor::cat(&acts, 0)?;
    let flat = |t: &Tensor| t.flatten_all();
    let params = Tensor::cat(
        &[
            flat(p.w0)?,
            flat(p.a0)?,
            flat(p.v0)?,
            flat(p.k_k)?,
            flat(p.k_a)?,
            flat(p.r_k)?,
            flat(p.ln_w)?,
            flat(p.ln_b)?,
        ],
        0,
    )?;
    let op = CoreOp {
        d,
        residual: x.residual.is_some(),
        s0_grad: s0.track_op(),
        saved: Mutex::new(None),
    };
    let out = acts.apply_op3(&params, &s0.contiguous()?, op)?;
    let z = out.narrow(0, 0, rows)?;
    let s_t = out.narrow(0, rows, b * n)?.reshape((b, h, n, n))?;
    Ok((z, s_t))
}

/// [`core`] composed of candle ops (the model's math as `model::rwkv7` writes it).
pub fn core_reference(x: &Acts, p: &Params, s0: &Tensor, b: usize) -> Result<(Tensor, Tensor)> {
    core_composed(x, p, s0, b, Kernels::Reference)
}

/// [`core_reference`] with its GroupNorm through `kn` (on the GPU: the CUDA norm kernel, around
/// the WKV op's CUDA kernel; everything else stays candle's composed ops).
fn core_composed(
    x: &Acts,
    p: &Params,
    s0: &Tensor,
    b: usize,
    kn: Kernels,
) -> Result<(Tensor, Tensor)> {
    let (rows, c) = x.r.dims2()?;
    let (h, n) = p.r_k.dims2()?;
    let t = rows / b;
    let heads = |z: &Tensor| z.reshape((b, t, h, n));
    let vec = |z: &Tensor| z.flatten_all();
    // 3. Decay logit ŵ (the scan turns it into exp(−e^{−1/2} σ(ŵ))).
    let w = x.wl.broadcast_add(&vec(p.w0)?)?;
    // 4. Value residual.
    let v = match x.residual {
        None => x.v.clone(),
        Some((vl, vf)) => {
            let nu = sigmoid(&vl.broadcast_add(&vec(p.v0)?)?)?;
            (x.v + (vf - x.v)? * nu)?
        }
    };
    // 5. In-context learning rate.
    let a = sigmoid(&x.al.broadcast_add(&vec(p.a0)?)?)?;
    // 7. Key normalisation per head (of the un-modulated k).
    let kk = heads(&x.k.broadcast_mul(&vec(p.k_k)?)?)?;
    let norm = kk
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(NORMALIZE_EPS, f32::MAX)?;
    let kk = kk.broadcast_div(&norm)?;
    // 8. Key modulation k' = k ⊙ (1 + (a − 1) ⊙ k_a).
    let k = (x.k * ((&a - 1.0)?.broadcast_mul(&vec(p.k_a)?)? + 1.0)?)?;
    // 9. The scan, with a = −κ̂, b = κ̂ ⊙ a.
    let (r, w, k, v, a) = (heads(x.r)?, heads(&w)?, heads(&k)?, heads(&v)?, heads(&a)?);
    let (y, s) = wkv::wkv7(&r, &w, &k, &v, &kk.neg()?, &(&kk * &a)?, s0)?;
    // 10. GroupNorm per head, then per-channel affine.
    let y = kn.norm(
        &y.reshape((rows, c))?,
        p.ln_w,
        p.ln_b,
        n,
        GROUPNORM_EPS as f64,
    )?;
    // 11. Bonus: (Σ_j r_j k'_j r_k[h,j]) · v per head.
    let rk = (&r * &k)?.broadcast_mul(p.r_k)?.sum_keepdim(D::Minus1)?;
    let bonus = rk.broadcast_mul(&v)?.reshape((rows, c))?;
    // 12. Gate.
    Ok((((y + bonus)? * x.g)?, s))
}

/// The scan-input preparation on the GPU (`kernels/fused.cu`, the twin of `tmix_prep`):
/// `(acts [P, R, C], prm [5·C]) → [6, R, C]`, planes as in the kernel's comment.
#[cfg(feature = "cuda")]
struct PrepOp {
    n: usize,
    residual: bool,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for PrepOp {
    fn name(&self) -> &'static str {
        "time_mix_prep"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("time_mix_prep runs on the GPU only; the CPU has the core op")
    }

    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &Layout,
        p: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::prep_forward(a, la, p, lp, self.n, self.residual)?;
        let (planes, rows, c) = la.shape().dims3()?;
        let _ = planes;
        Ok((out, Shape::from((6, rows, c))))
    }

    fn bwd(
        &self,
        acts: &Tensor,
        prm: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, residual) = (self.n, self.residual);
        let out = crate::cuda::gpu_op3(
            "time_mix_prep_backward",
            [acts, prm, &grad],
            |[(a, la), (p, lp), (g, lg)]| {
                let out = crate::cuda::prep_backward(a, la, p, lp, g, lg, n, residual)?;
                Ok((
                    out,
                    Shape::from(la.shape().elem_count() + lp.shape().elem_count()),
                ))
            },
        )?;
        let na = acts.elem_count();
        Ok((
            Some(out.narrow(0, 0, na)?.reshape(acts.shape())?),
            Some(out.narrow(0, na, prm.elem_count())?.reshape(prm.shape())?),
        ))
    }
}

/// TimeMix's core on the GPU: steps 3–8 as one CUDA op (`PrepOp`), the WKV scan as the CUDA
/// kernel, GroupNorm as the CUDA norm; bonus and gate as candle ops. The same math as
/// [`core_reference`], which it is tested against.
#[cfg(feature = "cuda")]
pub fn core_gpu(x: &Acts, p: &Params, s0: &Tensor, b: usize) -> Result<(Tensor, Tensor)> {
    let (rows, c) = x.r.dims2()?;
    let (h, n) = p.r_k.dims2()?;
    let t = rows / b;
    let mut planes = vec![x.r, x.wl, x.k, x.v, x.al];
    if let Some((vl, vf)) = x.residual {
        planes.extend([vl, vf]);
    }
    let acts = Tensor::stack(&planes, 0)?;
    let flat = |t: &Tensor| t.flatten_all();
    let prm = Tensor::cat(
        &[
            flat(p.w0)?,
            flat(p.a0)?,
            flat(p.v0)?,
            flat(p.k_k)?,
            flat(p.k_a)?,
        ],
        0,
    )?;
    let op = PrepOp {
        n,
        residual: x.residual.is_some(),
    };
    let scan_in = acts.apply_op2(&prm, op)?.reshape((6, b, t, h, n))?;
    let (y, s) = wkv::wkv7_packed(&scan_in, s0)?;
    // 10. GroupNorm per head, then per-channel affine (the CUDA kernel when its groups fit).
    let y = y.reshape((rows, c))?;
    let y = if super::rows::gpu_norm_supported(n) {
        super::fused::norm(&y, p.ln_w, p.ln_b, n, GROUPNORM_EPS as f64)?
    } else {
        super::fused::norm_reference(&y, p.ln_w, p.ln_b, n, GROUPNORM_EPS as f64)?
    };
    // 11. Bonus: (Σ_j r_j k'_j r_k[h,j]) · v' per head, from the scan's own inputs.
    let (r, k, v) = (scan_in.get(0)?, scan_in.get(2)?, scan_in.get(3)?);
    let rk = (&r * &k)?.broadcast_mul(p.r_k)?.sum_keepdim(D::Minus1)?;
    let bonus = rk.broadcast_mul(&v)?.reshape((rows, c))?;
    // 12. Gate.
    Ok((((y + bonus)? * x.g)?, s))
}

impl Kernels {
    /// TimeMix's core, fused or composed (see [`core`]).
    pub fn time_mix_core(
        self,
        x: &Acts,
        p: &Params,
        s0: &Tensor,
        b: usize,
    ) -> Result<(Tensor, Tensor)> {
        let all = [x.r, x.wl, x.k, x.v, x.al, x.g, p.w0, p.r_k, s0];
        if self != Kernels::Reference && fusable(&all) {
            return core(x, p, s0, b);
        }
        #[cfg(feature = "cuda")]
        if self.gpu(&all) && p.r_k.dims2().is_ok_and(|(_, n)| n == FUSED_N) {
            return core_gpu(x, p, s0, b);
        }
        core_composed(x, p, s0, b, self)
    }
}
