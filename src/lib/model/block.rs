//! One whole RWKV-7 block (ln1, TimeMix, residual, ln2, ChannelMix, residual; the math and its
//! step numbers are in `model::rwkv7`) as a single candle op with a hand-written backward, for
//! dense (f32, CPU) training.
//!
//! Why: candle's backward adds every gradient of every graph edge into a fresh zeroed tensor, so
//! each graph node costs several passes over activation-sized buffers.
//! The per-op path (`Kernels::Ops`: norm, six token mixes, three projections, four LoRAs,
//! TimeMix's core, output matrix, residual, norm, mix, key, relu², value, residual, and the state
//! narrows) is about 35 nodes per layer; this is one, plus the concatenation of its parameters
//! and of its state.
//!
//! The op's three arguments:
//! * the block's input: in layer 0 the ln0 output `x [R, C]` (R = B·T); in later layers the
//!   previous block's whole output, of which it reads `x` and `v_first`;
//! * the block's parameters flattened and concatenated in checkpoint order (`params::layer`),
//!   the matrices as stored (LoRAs `[in, out]`, linears `[out, in]`). Layer 0 carries `v0, v1,
//!   v2` too, unused (zero gradient);
//! * the layer's state `[att_shift [B,C] | ffn_shift [B,C] | wkv [B,H,N,N]]`.
//!
//! Its output `[2R + 2B + B·N, C]`: the new residual stream `x` (R rows), `v_first` (R rows:
//! layer 0's value, passed through by later layers), then the new state in the same layout as
//! the input state (B + B + B·N rows). [`hidden_of`] and [`state_of`] cut it apart.
//!
//! The forward keeps the activations the backward needs (norm outputs, mixes, LoRA hiddens, the
//! core's inputs and output, the FFN's pre-activation); the backward is the chain of the
//! slice-level pieces of `fused` and `tmix` in reverse, with the weight gradients written by the
//! GEMMs straight into the packed parameter gradient. As elsewhere, parallel loops split rows by
//! shape only and add partial sums in task order, so results do not depend on the thread count.

use super::fused::{
    Mat, Planes, cpu_slice, fusable, gemm_into, gemm_new, map_new, norm_rows, norm_rows_backward,
    op_err, par_copy, par_rows, sum_partials, with_slice, zeros,
};
use super::params::layer::{self, *};
use super::params::layer_shape;
use super::rows::{LN_EPS, prev_row, relu_sq, shift_mix_rows, sigmoid};
use super::state::LayerState;
use super::tmix::{self, CoreOp};
use super::wkv::Dims;
use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use std::sync::Mutex;

const NP: usize = layer::COUNT;

/// The token-mix planes, in the order of the coefficients.
const M_R: usize = 0;
const M_W: usize = 1;
const M_K: usize = 2;
const M_V: usize = 3;
const M_A: usize = 4;
const M_G: usize = 5;

/// The sizes of one call: B sequences of T tokens, H heads of N channels, F = d_ffn, and the
/// LoRA ranks of w, a, v, g.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub n: usize,
    pub f: usize,
    pub lora: [usize; 4],
}

impl BlockDims {
    fn c(&self) -> usize {
        self.h * self.n
    }

    fn rows(&self) -> usize {
        self.b * self.t
    }

    /// The shape of each parameter, in the order of `params::layer`.
    pub fn shapes(&self) -> [Vec<usize>; NP] {
        std::array::from_fn(|i| layer_shape(i, self.h, self.n, self.f, self.lora))
    }

    /// Where each parameter starts in the packed vector, and (last) its length.
    fn offsets(&self) -> [usize; NP + 1] {
        let shapes = self.shapes();
        let mut off = [0; NP + 1];
        for i in 0..NP {
            off[i + 1] = off[i] + shapes[i].iter().product::<usize>();
        }
        off
    }

    /// Rows of C in the packed state: att_shift, ffn_shift, wkv.
    fn state_rows(&self) -> usize {
        2 * self.b + self.b * self.n
    }

    /// Rows of C in the output.
    fn out_rows(&self) -> usize {
        2 * self.rows() + self.state_rows()
    }

    fn wkv(&self) -> Dims {
        Dims {
            b: self.b,
            t: self.t,
            h: self.h,
            n: self.n,
        }
    }
}

/// The packed parameters, by index of `params::layer`.
struct Packed<'a> {
    p: &'a [f32],
    off: [usize; NP + 1],
}

impl<'a> Packed<'a> {
    fn get(&self, i: usize) -> &'a [f32] {
        &self.p[self.off[i]..self.off[i + 1]]
    }

    /// Parameters `i..j`, end to end.
    fn range(&self, i: usize, j: usize) -> &'a [f32] {
        &self.p[self.off[i]..self.off[j]]
    }

    /// TimeMix's core parameters, gathered in the order of [`tmix::PARAMS`].
    fn core(&self) -> Vec<f32> {
        tmix::PARAMS
            .iter()
            .flat_map(|&i| self.get(i))
            .copied()
            .collect()
    }
}

/// The gradient of parameter `i` in the packed gradient.
fn seg<'a>(dp: &'a mut [f32], off: &[usize; NP + 1], i: usize) -> &'a mut [f32] {
    &mut dp[off[i]..off[i + 1]]
}

/// The gradients of parameters `i` and `i + 1`.
fn pair<'a>(dp: &'a mut [f32], off: &[usize; NP + 1], i: usize) -> (&'a mut [f32], &'a mut [f32]) {
    dp[off[i]..off[i + 2]].split_at_mut(off[i + 1] - off[i])
}

/// `f` on every element, in parallel.
fn map(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send) {
    par_rows(x, 1, |_, xs| {
        for v in xs {
            *v = f(*v);
        }
    });
}

/// `x[i] = f(x[i], y[i])`, in parallel.
fn zip_map(x: &mut [f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) {
    par_rows(x, 1, |i0, xs| {
        for (v, &w) in xs.iter_mut().zip(&y[i0..]) {
            *v = f(*v, w);
        }
    });
}

fn add(x: &mut [f32], y: &[f32]) {
    zip_map(x, y, |a, b| a + b);
}

/// The token shift and lerp `x + (p − x) ⊙ μ_q` for each coefficient row `μ_q` of `mus`
/// (`K·C`): K planes of `[R, C]`. `prev`: `[B, C]`.
fn mix_planes(x: &[f32], prev: &[f32], mus: &[f32], t: usize, c: usize) -> Vec<f32> {
    let m = x.len();
    let mut out = zeros(m * (mus.len() / c));
    if m == 0 {
        return out;
    }
    for (q, o) in out.chunks_exact_mut(m).enumerate() {
        let mu = &mus[q * c..][..c];
        par_rows(o, c, |row0, ys| shift_mix_rows(x, prev, mu, t, row0, ys));
    }
    out
}

/// The backward of [`mix_planes`] given the planes' gradients `dys`: `(dx, dμ [K·C], dprev)`.
fn mix_planes_backward(
    x: &[f32],
    prev: &[f32],
    mus: &[f32],
    dys: &[f32],
    t: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (m, kq) = (x.len(), mus.len() / c);
    let mut dx = zeros(m);
    let parts = par_rows(&mut dx, c, |row0, dxs| {
        let mut dmu = vec![0f32; kq * c];
        for (i, dxr) in dxs.chunks_exact_mut(c).enumerate() {
            let r = row0 + i;
            let (xr, pr) = (&x[r * c..][..c], prev_row(x, prev, r, t, c));
            // Row r is also the previous token of row r + 1.
            let next = r % t + 1 < t;
            for q in 0..kq {
                let mu = &mus[q * c..][..c];
                let dy = &dys[q * m + r * c..][..c];
                let dm = &mut dmu[q * c..][..c];
                for j in 0..c {
                    dxr[j] += dy[j] * (1.0 - mu[j]);
                    dm[j] += dy[j] * (pr[j] - xr[j]);
                }
                if next {
                    let dn = &dys[q * m + (r + 1) * c..][..c];
                    for j in 0..c {
                        dxr[j] += dn[j] * mu[j];
                    }
                }
            }
        }
        dmu
    });
    let mut dprev = vec![0f32; prev.len()];
    for (b, dp) in dprev.chunks_exact_mut(c).enumerate() {
        for q in 0..kq {
            let mu = &mus[q * c..][..c];
            let dy = &dys[q * m + b * t * c..][..c];
            for j in 0..c {
                dp[j] += dy[j] * mu[j];
            }
        }
    }
    (dx, sum_partials(parts, kq * c), dprev)
}

/// The last token's row of each sequence of `x [B·T, C]`, into `out [B, C]`.
fn last_rows(x: &[f32], out: &mut [f32], t: usize, c: usize) {
    for (b, o) in out.chunks_exact_mut(c).enumerate() {
        o.copy_from_slice(&x[((b + 1) * t - 1) * c..][..c]);
    }
}

/// Adds `d [B, C]` to the last token's row of each sequence of `dx [B·T, C]`.
fn add_last_rows(dx: &mut [f32], d: &[f32], t: usize, c: usize) {
    for (b, g) in d.chunks_exact(c).enumerate() {
        add(&mut dx[((b + 1) * t - 1) * c..][..c], g);
    }
}

/// The activation between a LoRA's two matrices.
#[derive(Clone, Copy)]
enum Act {
    None,
    Tanh,
    Sigmoid,
}

/// The backward of `y = act(x·m1)·m2` for `x [R, C]`, `m1 [C, rank]`, `m2 [rank, C]`, given
/// the hidden `hid = act(x·m1)` `[R, rank]` and `dy`: writes `dm1` and `dm2` and returns the
/// gradient of `x·m1` (`dx` is that times `m1ᵀ`, which the caller adds where it wants it).
fn lora_backward(
    x: Mat,
    hid: &[f32],
    m2: &[f32],
    act: Act,
    dy: &[f32],
    (dm1, dm2): (&mut [f32], &mut [f32]),
) -> Vec<f32> {
    let (r, c) = (x.rows(), x.cols());
    let rank = hid.len() / r.max(1);
    let dym = Mat::new(dy, r, c);
    gemm_into(dm2, Mat::new(hid, r, rank).t(), dym, 1.0, false);
    let mut dh = gemm_new(dym, Mat::new(m2, rank, c).t(), 1.0);
    match act {
        Act::None => {}
        Act::Tanh => zip_map(&mut dh, hid, |d, h| d * (1.0 - h * h)),
        Act::Sigmoid => zip_map(&mut dh, hid, |d, h| d * h * (1.0 - h)),
    }
    gemm_into(dm1, x.t(), Mat::new(&dh, r, rank), 1.0, false);
    dh
}

/// What the forward keeps for the backward (all `[R, C]` unless said otherwise).
struct Saved {
    /// ln1 output.
    xa: Vec<f32>,
    /// The six token mixes, planes in the order of the coefficients.
    mixes: Vec<f32>,
    /// The core's activation planes (in the order of [`tmix::ACTS`]).
    acts: Vec<f32>,
    /// The LoRA hiddens `tanh(x_w w1)`, `x_a a1`, `σ(x_g g1)`, `x_v v1` (`[R, rank]`; the last
    /// empty in layer 0).
    hw: Vec<f32>,
    ha: Vec<f32>,
    hg: Vec<f32>,
    hv: Vec<f32>,
    /// The core's output (the output matrix's input).
    z: Vec<f32>,
    /// The residual stream after TimeMix.
    x2: Vec<f32>,
    /// ln2 output and its token mix.
    xf: Vec<f32>,
    xk: Vec<f32>,
    /// The FFN key's output `[R, F]` (before relu²).
    kk: Vec<f32>,
}

struct BlockOp {
    d: BlockDims,
    /// Layer 0: no value residual; the block's input is `x` alone.
    first: bool,
    /// Whether the state wants a gradient.
    s_grad: bool,
    core: CoreOp,
    saved: Mutex<Option<Saved>>,
}

impl BlockOp {
    const NAME: &'static str = "block";

    fn check(&self, x: usize, p: usize, s: usize) -> candle_core::Result<()> {
        let d = self.d;
        let c = d.c();
        let want_x = if self.first {
            d.rows() * c
        } else {
            d.out_rows() * c
        };
        if x != want_x || p != d.offsets()[NP] || s != d.state_rows() * c || d.t == 0 {
            return Err(op_err(
                Self::NAME,
                format!(
                    "input of {x}, {p} parameters, state of {s} do not fit {d:?} (layer 0: {})",
                    self.first
                ),
            ));
        }
        Ok(())
    }

    /// The forward: the packed output and what the backward needs (the core keeps its own).
    fn forward(&self, xin: &[f32], p: &[f32], s: &[f32]) -> (Vec<f32>, Saved) {
        let d = self.d;
        let (b, t, c, f) = (d.b, d.t, d.c(), d.f);
        let [lw, la, lv, lg] = d.lora;
        let (r, m) = (d.rows(), d.rows() * c);
        let pp = Packed {
            p,
            off: d.offsets(),
        };
        let x = &xin[..m];
        let (att0, rest) = s.split_at(b * c);
        let (ffn0, wkv0) = rest.split_at(b * c);
        let lin = |i: usize, out: usize, inp: usize| Mat::new(pp.get(i), out, inp).t();

        // ln1, then TimeMix step 1, the token shift (steps as numbered in `rwkv7`).
        let xa = norm_rows(x, pp.get(LN1_W), pp.get(LN1_B), c, LN_EPS);
        let mixes = mix_planes(&xa, att0, pp.range(X_R, X_G + 1), t, c);
        let xm = |q: usize| Mat::new(&mixes[q * m..(q + 1) * m], r, c);
        // 2. The projections and the LoRA halves of 3.–6., straight into the core's planes.
        let planes = if self.first { 6 } else { 8 };
        let mut pl = Planes::new(planes, m);
        pl.gemm(tmix::R, xm(M_R), lin(WR, c, c), 1.0);
        pl.gemm(tmix::K, xm(M_K), lin(WK, c, c), 1.0);
        pl.gemm(tmix::V, xm(M_V), lin(WV, c, c), 1.0);
        let mut hw = gemm_new(xm(M_W), Mat::new(pp.get(W1), c, lw), 1.0);
        map(&mut hw, f32::tanh);
        let w2 = Mat::new(pp.get(W2), lw, c);
        pl.gemm(tmix::WL, Mat::new(&hw, r, lw), w2, 1.0);
        let ha = gemm_new(xm(M_A), Mat::new(pp.get(A1), c, la), 1.0);
        pl.gemm(
            tmix::AL,
            Mat::new(&ha, r, la),
            Mat::new(pp.get(A2), la, c),
            1.0,
        );
        let mut hg = gemm_new(xm(M_G), Mat::new(pp.get(G1), c, lg), 1.0);
        map(&mut hg, sigmoid);
        pl.gemm(
            tmix::G,
            Mat::new(&hg, r, lg),
            Mat::new(pp.get(G2), lg, c),
            1.0,
        );
        let hv = if self.first {
            Vec::new()
        } else {
            let h = gemm_new(xm(M_V), Mat::new(pp.get(V1), c, lv), 1.0);
            pl.gemm(
                tmix::VL,
                Mat::new(&h, r, lv),
                Mat::new(pp.get(V2), lv, c),
                1.0,
            );
            pl.copy(tmix::VF, &xin[m..2 * m]);
            h
        };
        let acts = pl.finish();
        // 3.–11. (the WKV scan included), then 12. the output matrix and the residual.
        let mut z = self.core.forward_keep(&acts, &pp.core(), wkv0);
        let s_t = z.split_off(m);
        let mut x2 = map_new(x, |v| v);
        gemm_into(&mut x2, Mat::new(&z, r, c), lin(WO, c, c), 1.0, true);
        // ChannelMix and its residual.
        let xf = norm_rows(&x2, pp.get(LN2_W), pp.get(LN2_B), c, LN_EPS);
        let xk = mix_planes(&xf, ffn0, pp.get(FFN_X_K), t, c);
        let kk = gemm_new(Mat::new(&xk, r, c), lin(FK, f, c), 1.0);
        let hf = map_new(&kk, relu_sq);
        let mut out = zeros(d.out_rows() * c);
        {
            let (xo, rest) = out.split_at_mut(m);
            let (vo, rest) = rest.split_at_mut(m);
            let (att_o, rest) = rest.split_at_mut(b * c);
            let (ffn_o, wkv_o) = rest.split_at_mut(b * c);
            par_copy(xo, &x2);
            gemm_into(xo, Mat::new(&hf, r, f), lin(FV, c, f), 1.0, true);
            if self.first {
                par_copy(vo, &acts[tmix::V * m..(tmix::V + 1) * m]);
            } else {
                par_copy(vo, &xin[m..2 * m]);
            }
            last_rows(&xa, att_o, t, c);
            last_rows(&xf, ffn_o, t, c);
            wkv_o.copy_from_slice(&s_t);
        }
        let saved = Saved {
            xa,
            mixes,
            acts,
            hw,
            ha,
            hg,
            hv,
            z,
            x2,
            xf,
            xk,
            kk,
        };
        (out, saved)
    }

    /// The gradients of the input, the parameters and the state, given the output's.
    fn backward(
        &self,
        xin: &[f32],
        p: &[f32],
        s: &[f32],
        dout: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.d;
        let (b, t, c, f) = (d.b, d.t, d.c(), d.f);
        let (r, m) = (d.rows(), d.rows() * c);
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Without a kept forward (a second backward), run it again: that also refills the core.
        let Saved {
            xa,
            mixes,
            acts,
            hw,
            ha,
            hg,
            hv,
            z,
            x2,
            xf,
            xk,
            kk,
        } = saved.unwrap_or_else(|| self.forward(xin, p, s).1);
        let off = d.offsets();
        let pp = Packed { p, off };
        let x = &xin[..m];
        let (att0, rest) = s.split_at(b * c);
        let (ffn0, wkv0) = rest.split_at(b * c);
        let (dx3, rest) = dout.split_at(m);
        let (dvf_out, rest) = rest.split_at(m);
        let (datt_t, rest) = rest.split_at(b * c);
        let (dffn_t, ds_t) = rest.split_at(b * c);
        let mut dp = zeros(p.len());

        // ChannelMix: value, relu², key, token mix, ln2; plus the residual.
        let hf = map_new(&kk, relu_sq);
        let dy = Mat::new(dx3, r, c);
        gemm_into(
            seg(&mut dp, &off, FV),
            dy.t(),
            Mat::new(&hf, r, f),
            1.0,
            false,
        );
        drop(hf);
        let mut dh = gemm_new(dy, Mat::new(pp.get(FV), c, f), 1.0);
        zip_map(&mut dh, &kk, |g, k| 2.0 * k.max(0.0) * g);
        let dhm = Mat::new(&dh, r, f);
        gemm_into(
            seg(&mut dp, &off, FK),
            dhm.t(),
            Mat::new(&xk, r, c),
            1.0,
            false,
        );
        let dxk = gemm_new(dhm, Mat::new(pp.get(FK), f, c), 1.0);
        drop(dh);
        let (mut dxf, dmu, dffn0) = mix_planes_backward(&xf, ffn0, pp.get(FFN_X_K), &dxk, t, c);
        seg(&mut dp, &off, FFN_X_K).copy_from_slice(&dmu);
        add_last_rows(&mut dxf, dffn_t, t, c);
        let (mut dx2, dwb) = norm_rows_backward(&x2, pp.get(LN2_W), &dxf, c, LN_EPS);
        dp[off[LN2_W]..off[LN2_B + 1]].copy_from_slice(&dwb);
        add(&mut dx2, dx3);

        // The output matrix and the core.
        let dy = Mat::new(&dx2, r, c);
        gemm_into(
            seg(&mut dp, &off, WO),
            dy.t(),
            Mat::new(&z, r, c),
            1.0,
            false,
        );
        let dz = gemm_new(dy, Mat::new(pp.get(WO), c, c), 1.0);
        let (mut dacts, dcore, ds0) = self.core.backward(&acts, &pp.core(), wkv0, &dz, ds_t);
        drop(dz);
        for (&i, g) in tmix::PARAMS.iter().zip(dcore.chunks_exact(c)) {
            seg(&mut dp, &off, i).copy_from_slice(g);
        }
        // The v_first output: layer 0's v, or passed through from the input.
        let q = if self.first { tmix::V } else { tmix::VF };
        add(&mut dacts[q * m..(q + 1) * m], dvf_out);
        drop(acts);
        let da = |q: usize| &dacts[q * m..(q + 1) * m];

        // The projections and the LoRAs, into the gradients of the six mixes.
        let xm = |q: usize| Mat::new(&mixes[q * m..(q + 1) * m], r, c);
        let mut dm = Planes::new(6, m);
        for (mq, aq, w) in [(M_R, tmix::R, WR), (M_K, tmix::K, WK), (M_V, tmix::V, WV)] {
            let g = Mat::new(da(aq), r, c);
            gemm_into(seg(&mut dp, &off, w), g.t(), xm(mq), 1.0, false);
            dm.gemm(mq, g, Mat::new(pp.get(w), c, c), 1.0);
        }
        let loras = [
            (M_W, &hw, W1, Act::Tanh, tmix::WL),
            (M_A, &ha, A1, Act::None, tmix::AL),
            (M_G, &hg, G1, Act::Sigmoid, tmix::G),
        ];
        for (mq, hid, w, act, aq) in loras {
            let (m1, m2) = (pp.get(w), pp.get(w + 1));
            let dh = lora_backward(xm(mq), hid, m2, act, da(aq), pair(&mut dp, &off, w));
            let rank = hid.len() / r.max(1);
            dm.gemm(mq, Mat::new(&dh, r, rank), Mat::new(m1, c, rank).t(), 1.0);
        }
        let mut dmix = dm.finish();
        if !self.first {
            let (v1, v2) = (pp.get(V1), pp.get(V2));
            let dh = lora_backward(
                xm(M_V),
                &hv,
                v2,
                Act::None,
                da(tmix::VL),
                pair(&mut dp, &off, V1),
            );
            let rank = hv.len() / r.max(1);
            let dxv = &mut dmix[M_V * m..(M_V + 1) * m];
            gemm_into(
                dxv,
                Mat::new(&dh, r, rank),
                Mat::new(v1, c, rank).t(),
                1.0,
                true,
            );
        }
        drop(mixes);

        // The six token mixes, ln1, and the residual.
        let mus = pp.range(X_R, X_G + 1);
        let (mut dxa, dmus, datt0) = mix_planes_backward(&xa, att0, mus, &dmix, t, c);
        drop(dmix);
        dp[off[X_R]..off[X_G + 1]].copy_from_slice(&dmus);
        add_last_rows(&mut dxa, datt_t, t, c);
        let (mut dx, dwb) = norm_rows_backward(x, pp.get(LN1_W), &dxa, c, LN_EPS);
        dp[off[LN1_W]..off[LN1_B + 1]].copy_from_slice(&dwb);
        add(&mut dx, &dx2);
        if !self.first {
            let mut all = zeros(d.out_rows() * c);
            par_copy(&mut all[..m], &dx);
            par_copy(&mut all[m..2 * m], da(tmix::VF));
            dx = all;
        }
        let mut ds = datt0;
        ds.extend_from_slice(&dffn0);
        ds.extend_from_slice(&ds0);
        (dx, dp, ds)
    }
}

impl CustomOp3 for BlockOp {
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
        let x = cpu_slice(s1, l1, Self::NAME, "input")?;
        let p = cpu_slice(s2, l2, Self::NAME, "parameters")?;
        let s = cpu_slice(s3, l3, Self::NAME, "state")?;
        self.check(x.len(), p.len(), s.len())?;
        let (out, saved) = self.forward(x, p, s);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.d.out_rows(), self.d.c())),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dp, ds) = with_slice(x, Self::NAME, "input", |xs| {
            with_slice(p, Self::NAME, "parameters", |ps| {
                with_slice(s, Self::NAME, "state", |ss| {
                    with_slice(&grad, Self::NAME, "output gradient", |gs| {
                        self.check(xs.len(), ps.len(), ss.len())?;
                        Ok(self.backward(xs, ps, ss, gs))
                    })
                })
            })
        })?;
        let dev = x.device();
        let ds = if self.s_grad {
            Some(Tensor::from_vec(ds, s.shape(), dev)?)
        } else {
            None
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dp, p.shape(), dev)?),
            ds,
        ))
    }
}

/// Whether the block op can run on these tensors (CPU, f32).
pub fn supported(x: &Tensor, params: &[Tensor], st: &LayerState) -> bool {
    let mut all: Vec<&Tensor> = vec![x, &st.att_shift, &st.ffn_shift, &st.wkv];
    all.extend(params);
    fusable(&all)
}

/// One block (see the module docs): `input` is the ln0 output `[B·T, C]` in layer 0 (`first`)
/// and the previous block's output otherwise; `params` the block's tensors in the order of
/// `params::layer`; `st` the layer's state before the first token. Returns the packed output.
pub fn block(
    input: &Tensor,
    params: &[Tensor],
    st: &LayerState,
    d: BlockDims,
    first: bool,
) -> Result<Tensor> {
    let shapes = d.shapes();
    if params.len() != NP {
        return Err(Error::data(format!(
            "block: {} parameters, expected {NP}",
            params.len()
        )));
    }
    for ((t, want), name) in params.iter().zip(&shapes).zip(layer::NAMES) {
        if t.elem_count() != want.iter().product::<usize>() {
            return Err(Error::data(format!(
                "block: {name} has shape {:?}, expected {want:?}",
                t.dims()
            )));
        }
    }
    // Every size is a multiple of C, so the flat concatenation is a concatenation of rows of C.
    // The matrices stored with C columns (LoRA second halves, r/k/v/o, FFN key) join as they
    // are: a reshape would be one more graph node, whose backward costs a zeroed tensor and an
    // add of the weight's size.
    let c = d.c();
    let rows: Vec<Tensor> = params
        .iter()
        .map(|t| match t.dims() {
            [_, cols] if *cols == c => Ok(t.clone()),
            _ => t.reshape((t.elem_count() / c, c)),
        })
        .collect::<candle_core::Result<_>>()?;
    let packed = Tensor::cat(&rows, 0)?;
    let state = Tensor::cat(
        &[
            st.att_shift.reshape((d.b, c))?,
            st.ffn_shift.reshape((d.b, c))?,
            st.wkv.reshape((d.b * d.n, c))?,
        ],
        0,
    )?;
    let op = BlockOp {
        d,
        first,
        s_grad: state.track_op(),
        core: CoreOp::new(d.wkv(), !first),
        saved: Mutex::new(None),
    };
    Ok(input.contiguous()?.apply_op3(&packed, &state, op)?)
}

/// The residual stream `[B·T, C]` of a block's output.
pub fn hidden_of(out: &Tensor, d: BlockDims) -> Result<Tensor> {
    Ok(out.narrow(0, 0, d.rows())?)
}

/// The state after the last token, from a block's output.
pub fn state_of(out: &Tensor, d: BlockDims) -> Result<LayerState> {
    let (b, at) = (d.b, 2 * d.rows());
    Ok(LayerState {
        att_shift: out.narrow(0, at, b)?,
        ffn_shift: out.narrow(0, at + b, b)?,
        wkv: out
            .narrow(0, at + 2 * b, b * d.n)?
            .reshape((b, d.h, d.n, d.n))?,
    })
}
