//! The WKV-7 recurrence (TimeMix step 9 in `model::rwkv7`), forward and backward as the official
//! training kernel computes them (BlinkDL/RWKV-LM, `RWKV-v7/train_temp/cuda/rwkv7_clampw.cu`):
//! the fused CPU operator with its backward, the plain reference twins it is tested against, and
//! the candle custom op that wires both into autograd. It does not own anything around the scan
//! (key normalisation, GroupNorm, bonus).
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
//!
//! # Fused operator (N = 64 only)
//!
//! One rayon task per (b,h) pair, as the official kernel runs one thread block per pair; a task
//! keeps its state (and in the backward dS) on its stack, 16 KiB each, and writes its own rows of
//! the outputs in place.
//!
//! * Forward: the state is kept transposed (`st[j] = S[:,j]`), so that `sa = S a = Σ_j a_j S[:,j]`
//!   and `y = S r` are sums of scaled columns, plain vector FMAs with no horizontal adds. The
//!   tape keeps every `sa_t` and a copy of the state after every 16th step and after the last.
//! * Backward (the official kernel's backstepping): walks t = T−1 … 0 with S and dS row-major,
//!   so that the five key-indexed gradients (`dr, dŵ, dk, da, db`) are vector sums over rows and
//!   only `dv, dsa` need row sums (taken 16 rows at a time). `S_{t−1}` comes from inverting the update,
//!   `S_{t−1} = (S_t − v kᵀ − sa bᵀ) diag(1/w)`, except where it is a checkpoint or `s0`, which is
//!   taken exactly: at most 15 inversions in a row, and the soft clamp keeps `1/w ≤ 1.84`.
//!
//! * Inference ([`wkv7_step_head`], the decode engine's scan): the forward's step with no tape, on
//!   a state that the caller keeps transposed and that is updated in place.
//!
//! T need not be a multiple of 16. The kernels are written once over a small `Simd` trait and
//! compiled for AVX-512 and for AVX2+FMA (picked at run time: the default x86-64 target has only
//! SSE2) and for plain arrays; the tests run every variant the CPU supports. Other head sizes use
//! the reference twins. Measured with [`bench`] at B=4, T=256, H=6 on one core of the 2-core
//! AVX-512 build machine (while shared): forward ≈ 3.3 ms, backward ≈ 8–9 ms; the reference twins
//! take ≈ 0.25 s and ≈ 0.6 s.
//!
//! # Packing for candle (its custom ops take ≤ 3 inputs and return 1 output)
//!
//! * arg 1: `[6,B,T,H,N]` = `stack([r, ŵ, k, v, a, b], 0)`; arg 2: `s0 [B,H,N,N]`.
//! * output: one flat `[B·T·H·N + B·H·N·N]` tensor `[y | s_T]`; [`wkv7`] narrows and reshapes it,
//!   and narrow's backward zero-pads, so the op's `bwd` always receives the gradient of both parts.
//! * the forward's checkpoints and `sa` stay in the op struct (a [`Tape`] behind a `Mutex`) until
//!   the backward takes them; a second backward recomputes them.
//! * `bwd` returns the `[6,B,T,H,N]` gradient (stack's own backward splits it) and `ds0`.

use super::fused::{cpu_slice, storage_slice};
pub use super::rows::{CHECKPOINT_EVERY, Dims, FUSED_N};
use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// e^{-1/2}: the soft clamp that keeps the decay in (0.545, 1).
pub const EXP_NEG_HALF: f32 = 0.606_530_66;

/// Order of the six per-token inputs in the packed `[6,B,T,H,N]` tensors (inputs and gradients).
pub const INPUT_NAMES: [&str; 6] = ["r", "w", "k", "v", "a", "b"];

/// Decay multiplier from the raw logit: `exp(-e^{-1/2} σ(ŵ))`.
#[inline]
pub fn decay(w_raw: f32) -> f32 {
    (-EXP_NEG_HALF / (1.0 + (-w_raw).exp())).exp()
}

/// The six per-token inputs (`[B,T,H,N]` each, `w` holding the raw logit ŵ) and the initial state.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub r: &'a [f32],
    pub w: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub s0: &'a [f32],
}

impl<'a> Inputs<'a> {
    /// Splits a packed `[6,B,T,H,N]` slice (order [`INPUT_NAMES`]).
    pub fn from_packed(d: Dims, packed: &'a [f32], s0: &'a [f32]) -> Self {
        let m = d.tokens_len();
        let q = |i: usize| &packed[i * m..(i + 1) * m];
        Inputs {
            r: q(0),
            w: q(1),
            k: q(2),
            v: q(3),
            a: q(4),
            b: q(5),
            s0,
        }
    }

    /// The six rows of one token of one head, starting at offset `o`.
    #[inline(always)]
    fn tok<const N: usize>(&self, o: usize) -> Tok<N> {
        let f = |x: &[f32]| *row::<N>(x, o);
        Tok {
            r: f(self.r),
            w: f(self.w),
            k: f(self.k),
            v: f(self.v),
            a: f(self.a),
            b: f(self.b),
        }
    }

    fn check(&self, d: Dims) {
        let m = d.tokens_len();
        for (name, x) in INPUT_NAMES
            .iter()
            .zip([self.r, self.w, self.k, self.v, self.a, self.b])
        {
            assert_eq!(
                x.len(),
                m,
                "wkv7: input {name} has {} elements, {d:?} needs {m}",
                x.len()
            );
        }
        assert_eq!(
            self.s0.len(),
            d.state_len(),
            "wkv7: s0 length does not match {d:?}"
        );
    }
}

/// One token of one head of every input, as fixed-size rows (so the kernels index without checks).
/// Copied out of the input slices, so that the compiler knows that writes to the state (another
/// local) cannot alias them and vectorises the row loops.
struct Tok<const N: usize> {
    r: [f32; N],
    w: [f32; N],
    k: [f32; N],
    v: [f32; N],
    a: [f32; N],
    b: [f32; N],
}

/// Gradients of all seven inputs.
#[derive(Clone, Debug)]
pub struct Grads {
    /// `[6,B,T,H,N]` in the order of [`INPUT_NAMES`]; the `w` part is w.r.t. the raw logit ŵ.
    pub packed: Vec<f32>,
    /// `[B,H,N,N]`.
    pub s0: Vec<f32>,
}

impl Grads {
    fn zeros(d: Dims) -> Self {
        Grads {
            packed: vec![0.0; 6 * d.tokens_len()],
            s0: vec![0.0; d.state_len()],
        }
    }

    /// Gradient of input `q` (index into [`INPUT_NAMES`]).
    pub fn input(&self, q: usize) -> &[f32] {
        let m = self.packed.len() / 6;
        &self.packed[q * m..(q + 1) * m]
    }
}

// ---------------------------------------------------------------------------------------------
// Reference twins
// ---------------------------------------------------------------------------------------------

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

/// σ(ŵ), the decay multiplier and its derivative w.r.t. ŵ, in f64.
fn decay_f64(w_raw: f32) -> (f64, f64) {
    let c = (-0.5f64).exp();
    let sig = 1.0 / (1.0 + (-(w_raw as f64)).exp());
    let w = (-c * sig).exp();
    (w, -c * w * sig * (1.0 - sig))
}

/// One head of the forward in f64, keeping every state: `states[t+1] = S_t` (so `states[0] = s0`),
/// `sa[t]` and `y[t]`, each flattened.
fn forward_head_f64(d: Dims, x: &Inputs, bi: usize, hi: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (nt, n) = (d.t, d.n);
    let nn = n * n;
    let mut states = vec![0f64; (nt + 1) * nn];
    let (mut sa, mut y) = (vec![0f64; nt * n], vec![0f64; nt * n]);
    for (dst, &src) in states[..nn]
        .iter_mut()
        .zip(&x.s0[(bi * d.h + hi) * nn..][..nn])
    {
        *dst = src as f64;
    }
    for t in 0..nt {
        let o = d.at(bi, t, hi);
        let (prev, next) = states[t * nn..(t + 2) * nn].split_at_mut(nn);
        for i in 0..n {
            let sa_i: f64 = (0..n).map(|j| prev[i * n + j] * x.a[o + j] as f64).sum();
            for j in 0..n {
                next[i * n + j] = prev[i * n + j] * decay_f64(x.w[o + j]).0
                    + sa_i * x.b[o + j] as f64
                    + x.v[o + i] as f64 * x.k[o + j] as f64;
            }
            sa[t * n + i] = sa_i;
            y[t * n + i] = (0..n).map(|j| next[i * n + j] * x.r[o + j] as f64).sum();
        }
    }
    (states, sa, y)
}

/// The forward in f64: `y [B,T,H,N]` and `s_T [B,H,N,N]` (the precision finite-difference checks
/// of [`wkv7_backward_reference`] need).
pub fn wkv7_reference_f64(d: Dims, x: Inputs) -> (Vec<f64>, Vec<f64>) {
    x.check(d);
    let nn = d.n * d.n;
    let mut y = vec![0f64; d.tokens_len()];
    let mut s_t = vec![0f64; d.state_len()];
    for bi in 0..d.b {
        for hi in 0..d.h {
            let (states, _, yh) = forward_head_f64(d, &x, bi, hi);
            for t in 0..d.t {
                y[d.at(bi, t, hi)..][..d.n].copy_from_slice(&yh[t * d.n..(t + 1) * d.n]);
            }
            s_t[(bi * d.h + hi) * nn..][..nn].copy_from_slice(&states[d.t * nn..]);
        }
    }
    (y, s_t)
}

/// Reference backward: plain reverse-mode through the loop with every state stored, in f64.
/// `dy [B,T,H,N]` and `ds_t [B,H,N,N]` are the gradients of the two outputs.
pub fn wkv7_backward_reference(d: Dims, x: Inputs, dy: &[f32], ds_t: &[f32]) -> Grads {
    x.check(d);
    let (nt, n, m, nn) = (d.t, d.n, d.tokens_len(), d.n * d.n);
    let mut g = Grads::zeros(d);
    for bi in 0..d.b {
        for hi in 0..d.h {
            let (states, sa, _) = forward_head_f64(d, &x, bi, hi);
            let base = (bi * d.h + hi) * nn;
            let mut ds: Vec<f64> = ds_t[base..base + nn].iter().map(|&e| e as f64).collect();
            for t in (0..nt).rev() {
                let o = d.at(bi, t, hi);
                let (s_old, s_new) = (&states[t * nn..][..nn], &states[(t + 1) * nn..][..nn]);
                let f = |z: &[f32], i: usize| z[o + i] as f64;
                let mut dsa = vec![0f64; n];
                for i in 0..n {
                    for j in 0..n {
                        ds[i * n + j] += f(dy, i) * f(x.r, j);
                    }
                }
                for i in 0..n {
                    g.packed[3 * m + o + i] =
                        (0..n).map(|j| ds[i * n + j] * f(x.k, j)).sum::<f64>() as f32;
                    dsa[i] = (0..n).map(|j| ds[i * n + j] * f(x.b, j)).sum();
                }
                for j in 0..n {
                    let col = |z: &[f64], u: &dyn Fn(usize) -> f64| {
                        (0..n).map(|i| z[i * n + j] * u(i)).sum::<f64>()
                    };
                    let (w, dw_draw) = decay_f64(x.w[o + j]);
                    g.packed[o + j] = col(s_new, &|i| f(dy, i)) as f32;
                    g.packed[m + o + j] = (col(&ds, &|i| s_old[i * n + j]) * dw_draw) as f32;
                    g.packed[2 * m + o + j] = col(&ds, &|i| f(x.v, i)) as f32;
                    g.packed[4 * m + o + j] = col(s_old, &|i| dsa[i]) as f32;
                    g.packed[5 * m + o + j] = col(&ds, &|i| sa[t * n + i]) as f32;
                    for i in 0..n {
                        ds[i * n + j] = ds[i * n + j] * w + dsa[i] * f(x.a, j);
                    }
                }
            }
            for (dst, src) in g.s0[base..base + nn].iter_mut().zip(&ds) {
                *dst = *src as f32;
            }
        }
    }
    g
}

// ---------------------------------------------------------------------------------------------
// Fused kernels
// ---------------------------------------------------------------------------------------------

/// The vector operations the kernels are written in: `W` lanes of f32, plus a scalar
/// multiply-add (fused where the instruction set has FMA; `mul_add` is a libm call otherwise).
///
/// The x86 implementations execute AVX2/AVX-512 instructions. They are private and only reached
/// through `simd_entry!`, which checks the CPU first and calls them from functions compiled with
/// those features, where these `#[inline(always)]` wrappers and the intrinsics get inlined.
trait Simd {
    const W: usize;
    type V: Copy;
    fn zero() -> Self::V;
    fn splat(x: f32) -> Self::V;
    /// The first `W` elements of `x`.
    fn load(x: &[f32]) -> Self::V;
    fn store(v: Self::V, x: &mut [f32]);
    fn add(a: Self::V, b: Self::V) -> Self::V;
    fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`.
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane `l` of the result is the sum of the lanes of `v[l]` (`v.len() == W`): `W` horizontal
    /// sums for the price of about two.
    fn hsum_rows(v: &[Self::V]) -> Self::V;
    fn mad(a: f32, b: f32, c: f32) -> f32;
}

/// The widest `W` of any [`Simd`] implementation.
const MAX_W: usize = 16;

/// Plain arrays, for CPUs without AVX2+FMA (the compiler vectorises what it can).
struct Portable;

impl Simd for Portable {
    const W: usize = 8;
    type V = [f32; 8];
    #[inline(always)]
    fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    fn load(x: &[f32]) -> Self::V {
        // Cannot fail: rows of N = K·W elements are loaded W lanes at a time (`load_row`, `axpy`).
        x[..8].try_into().expect("8 lanes")
    }
    #[inline(always)]
    fn store(v: Self::V, x: &mut [f32]) {
        x[..8].copy_from_slice(&v);
    }
    #[inline(always)]
    fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l])
    }
    #[inline(always)]
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l] + c[l])
    }
    #[inline(always)]
    fn hsum_rows(v: &[Self::V]) -> Self::V {
        std::array::from_fn(|l| v[l].iter().sum())
    }
    #[inline(always)]
    fn mad(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    pub struct Avx2;
    pub struct Avx512;

    // SAFETY (every unsafe block below): the CPU has AVX2+FMA, resp. AVX-512F (see `Simd`), and
    // each load/store touches only the `W` elements that the slice index just bounds-checked.
    impl Simd for Avx2 {
        const W: usize = 8;
        type V = __m256;
        #[inline(always)]
        fn zero() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(x: &[f32]) -> __m256 {
            unsafe { _mm256_loadu_ps(x[..8].as_ptr()) }
        }
        #[inline(always)]
        fn store(v: __m256, x: &mut [f32]) {
            unsafe { _mm256_storeu_ps(x[..8].as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn hsum_rows(v: &[__m256]) -> __m256 {
            // Cannot fail: called with exactly one register per lane (8).
            let v: &[__m256; 8] = v.try_into().expect("8 rows");
            unsafe {
                // hadd works within 128-bit halves: after two rounds, half h of u0 holds the
                // partial sums [v0, v1, v2, v3] over that half's lanes, u1 those of v4..v7.
                let u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
                let u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
                let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
                let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
                _mm256_add_ps(lo, hi)
            }
        }
        #[inline(always)]
        fn mad(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    impl Simd for Avx512 {
        const W: usize = 16;
        type V = __m512;
        #[inline(always)]
        fn zero() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn load(x: &[f32]) -> __m512 {
            unsafe { _mm512_loadu_ps(x[..16].as_ptr()) }
        }
        #[inline(always)]
        fn store(v: __m512, x: &mut [f32]) {
            unsafe { _mm512_storeu_ps(x[..16].as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn hsum_rows(v: &[__m512]) -> __m512 {
            // Cannot fail: called with exactly one register per lane (16).
            let v: &[__m512; 16] = v.try_into().expect("16 rows");
            unsafe {
                // Each level adds pairs of vectors after gathering matching halves, halving the
                // partial sums per row: 16 rows × 16 → 8 vectors holding 2 rows × 8 (256-bit
                // halves) → 4 holding 4 × 4 (128-bit quarters) → 2 → 1, where lane 4k + e holds
                // row 4e + k; the final permute puts row r in lane r.
                let a: [__m512; 8] = std::array::from_fn(|m| {
                    let (p, q) = (v[2 * m], v[2 * m + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x44>(p, q),
                        _mm512_shuffle_f32x4::<0xEE>(p, q),
                    )
                });
                let b: [__m512; 4] = std::array::from_fn(|n| {
                    let (p, q) = (a[2 * n], a[2 * n + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x88>(p, q),
                        _mm512_shuffle_f32x4::<0xDD>(p, q),
                    )
                });
                let c: [__m512; 2] = std::array::from_fn(|u| {
                    let (p, q) = (b[2 * u], b[2 * u + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_ps::<0x88>(p, q),
                        _mm512_shuffle_ps::<0xDD>(p, q),
                    )
                });
                let d = _mm512_add_ps(
                    _mm512_shuffle_ps::<0x88>(c[0], c[1]),
                    _mm512_shuffle_ps::<0xDD>(c[0], c[1]),
                );
                let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
                _mm512_permutexvar_ps(order, d)
            }
        }
        #[inline(always)]
        fn mad(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }
}

/// `exp` in branch-free form so that loops over it vectorise (Cephes `expf`: round to an integer
/// power of two by the 1.5·2²³ trick, degree-6 polynomial on the remainder; ~1 ulp on [-87, 88]).
#[inline(always)]
fn exp_fast<S: Simd>(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let z = S::mad(x, std::f32::consts::LOG2_E, MAGIC);
    let n = z - MAGIC;
    let r = S::mad(n, 2.121_944_4e-4, S::mad(n, -0.693_359_4, x));
    let mut p = 1.987_569_1e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = S::mad(p, r, c);
    }
    let p = S::mad(p, r * r, r + 1.0);
    // z's low mantissa bits hold n; the exponent field of 2^n is n + 127.
    let two_n = f32::from_bits(z.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

/// σ(ŵ) of one head's row, and the decay multiplier `w = exp(-e^{-1/2} σ)` (plain loops the
/// compiler vectorises).
#[inline(always)]
fn decay_row<S: Simd, const N: usize>(w_raw: &[f32; N], sig: &mut [f32; N], w: &mut [f32; N]) {
    for j in 0..N {
        sig[j] = 1.0 / (1.0 + exp_fast::<S>(-w_raw[j]));
        w[j] = exp_fast::<S>(-EXP_NEG_HALF * sig[j]);
    }
}

/// For the backward also `1/w` and `∂w/∂ŵ`.
#[inline(always)]
fn decay_row_grad<S: Simd, const N: usize>(
    w_raw: &[f32; N],
    w: &mut [f32; N],
    winv: &mut [f32; N],
    dw_draw: &mut [f32; N],
) {
    let mut sig = [0f32; N];
    decay_row::<S, N>(w_raw, &mut sig, w);
    for j in 0..N {
        winv[j] = 1.0 / w[j];
        dw_draw[j] = -EXP_NEG_HALF * w[j] * sig[j] * (1.0 - sig[j]);
    }
}

#[inline(always)]
fn row<const N: usize>(x: &[f32], o: usize) -> &[f32; N] {
    // Cannot fail: the slice is exactly N long (a short one panics on the index, a caller bug).
    x[o..o + N].try_into().expect("row of N elements")
}

/// Copies `N` rows of `N` from a flat slice into a stack matrix.
#[inline(always)]
fn load_matrix<const N: usize>(dst: &mut [[f32; N]; N], src: &[f32]) {
    dst.as_flattened_mut().copy_from_slice(&src[..N * N]);
}

/// Copies a flat N×N matrix into a stack matrix, transposed: `dst[j][i] = src[i·N + j]`.
/// (Contiguous writes: vectorised with gathers, which are cheaper than scatters.)
#[inline(always)]
fn load_transposed<const N: usize>(dst: &mut [[f32; N]; N], src: &[f32]) {
    let src = &src[..N * N];
    for (j, dst_row) in dst.iter_mut().enumerate() {
        for (i, e) in dst_row.iter_mut().enumerate() {
            *e = src[i * N + j];
        }
    }
}

/// Layout of one head's tape: `[sa (T·N) | checkpoints (nck·N·N)]`; the checkpoints are stored
/// transposed (`[j][i]`, as the forward keeps the state).
fn tape_len(d: Dims) -> usize {
    d.t * d.n + d.checkpoints() * d.n * d.n
}

/// One output buffer that the per-head tasks write into at the same time, each only its own
/// rows: head (b,h) writes the rows `(b,·,h)` of `[B,T,H,N]` tensors and block `b·H + h` of
/// `[B,H,N,N]` ones, so no two tasks ever touch the same element. (Writing in place saves a
/// second buffer and a gather pass; slices cannot express this interleaving safely.)
struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the tasks only write disjoint ranges (see the type's comment), and the buffer outlives
// them (the borrow in `_buf`).
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    fn new(buf: &'a mut [f32]) -> Self {
        SharedOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// Copies `src` to `off..off + src.len()`.
    ///
    /// # Safety
    /// No other thread reads or writes that range while the buffer is shared.
    #[inline(always)]
    unsafe fn write(&self, off: usize, src: &[f32]) {
        assert!(
            off + src.len() <= self.len,
            "wkv7: output row out of bounds"
        );
        // SAFETY: in bounds (checked above), exclusive by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) }
    }
}

/// The `K` vectors of one row of `N = K·W` elements.
#[inline(always)]
fn load_row<S: Simd, const K: usize>(x: &[f32]) -> [S::V; K] {
    std::array::from_fn(|c| S::load(&x[c * S::W..]))
}

#[inline(always)]
fn store_row<S: Simd, const K: usize>(v: &[S::V; K], x: &mut [f32]) {
    for (c, &vc) in v.iter().enumerate() {
        S::store(vc, &mut x[c * S::W..]);
    }
}

/// `acc += coef · col`.
#[inline(always)]
fn axpy<S: Simd, const K: usize>(acc: &mut [S::V; K], coef: f32, col: &[f32]) {
    let coef = S::splat(coef);
    for (c, acc_c) in acc.iter_mut().enumerate() {
        *acc_c = S::fma(coef, S::load(&col[c * S::W..]), *acc_c);
    }
}

/// One column j of the forward update, on its transposed row `col = S[:,j]`:
/// `S[:,j] ← w_j S[:,j] + b_j sa + k_j v`, then `y += r_j S[:,j]`. `wbkr = (w_j, b_j, k_j, r_j)`.
#[inline(always)]
fn fwd_column<S: Simd, const K: usize>(
    col: &mut [f32],
    wbkr: [f32; 4],
    sa: &[S::V; K],
    v: &[S::V; K],
    y: &mut [S::V; K],
) {
    let [w, b, k, r] = wbkr.map(S::splat);
    for c in 0..K {
        let at = &mut col[c * S::W..];
        let new = S::fma(w, S::load(at), S::fma(b, sa[c], S::mul(k, v[c])));
        S::store(new, at);
        y[c] = S::fma(r, new, y[c]);
    }
}

/// One token's step on a transposed state (`st[j] = S[:,j]`): `x = [r, w, k, v, a, b]` with `w`
/// the decay multiplier. Returns `(sa, y)`.
#[inline(always)]
fn fwd_token<S: Simd, const N: usize, const K: usize>(
    st: &mut [[f32; N]; N],
    x: [&[f32; N]; 6],
) -> ([S::V; K], [S::V; K]) {
    let [r, w, k, v, a, b] = x;
    // Two accumulator sets (even / odd j) halve the dependency chains.
    let (mut acc0, mut acc1) = ([S::zero(); K], [S::zero(); K]);
    for j in (0..N).step_by(2) {
        axpy::<S, K>(&mut acc0, a[j], &st[j]);
        axpy::<S, K>(&mut acc1, a[j + 1], &st[j + 1]);
    }
    let sa: [S::V; K] = std::array::from_fn(|c| S::add(acc0[c], acc1[c]));
    let vv = load_row::<S, K>(v);
    let (mut y0, mut y1) = ([S::zero(); K], [S::zero(); K]);
    for j in (0..N).step_by(2) {
        fwd_column::<S, K>(&mut st[j], [w[j], b[j], k[j], r[j]], &sa, &vv, &mut y0);
        let j1 = j + 1;
        fwd_column::<S, K>(&mut st[j1], [w[j1], b[j1], k[j1], r[j1]], &sa, &vv, &mut y1);
    }
    (sa, std::array::from_fn(|c| S::add(y0[c], y1[c])))
}

/// Inference's scan of one head (N = 64; see [`wkv7_step_head`]).
#[inline(always)]
fn step_head<S: Simd, const N: usize, const K: usize>(
    c: usize,
    off: usize,
    ins: [&[f32]; 6],
    st: &mut [f32],
    y: &mut [f32],
) {
    let st: &mut [[f32; N]; N] = (st.as_chunks_mut::<N>().0)
        .try_into()
        .expect("an N×N state");
    let (mut sig, mut w) = ([0f32; N], [0f32; N]);
    for (ti, y_row) in y.chunks_exact_mut(N).enumerate() {
        let [r, w_raw, k, v, a, b] = ins.map(|x| *row::<N>(x, ti * c + off));
        decay_row::<S, N>(&w_raw, &mut sig, &mut w);
        let (_, yv) = fwd_token::<S, N, K>(st, [&r, &w, &k, &v, &a, &b]);
        store_row::<S, K>(&yv, y_row);
    }
}

/// The scan of one head for inference (the decode engine): every token of `y = [t, N]` through
/// the head's state, updated in place, with no tape. The state is kept transposed,
/// `st[j·N + i] = S[i][j]`, as the fused forward keeps it; the inputs `[r, ŵ, k, v, a, b]` are
/// `[t, C]` rows read at column `off`. N = 64 runs the fused forward's step on `isa`, any other
/// head size a plain loop (`tests/wkv.rs` holds both to [`wkv7_reference`]).
pub fn wkv7_step_head(
    isa: Isa,
    c: usize,
    off: usize,
    ins: [&[f32]; 6],
    st: &mut [f32],
    y: &mut [f32],
) {
    let n = st.len().isqrt();
    assert!(
        n * n == st.len() && y.len().is_multiple_of(n.max(1)),
        "wkv7: step shapes"
    );
    if n == FUSED_N {
        return step_head_isa(isa, c, off, ins, st, y);
    }
    let mut sa = vec![0f32; n];
    for (ti, y_row) in y.chunks_exact_mut(n).enumerate() {
        let [r, w_raw, k, v, a, b] = ins.map(|x| &x[ti * c + off..][..n]);
        sa.fill(0.0);
        for (col, &aj) in st.chunks_exact(n).zip(a) {
            sa.iter_mut().zip(col).for_each(|(s, &x)| *s += aj * x);
        }
        y_row.fill(0.0);
        for (j, col) in st.chunks_exact_mut(n).enumerate() {
            let wj = decay(w_raw[j]);
            for i in 0..n {
                col[i] = col[i] * wj + (b[j] * sa[i] + k[j] * v[i]);
                y_row[i] += r[j] * col[i];
            }
        }
    }
}

/// Forward of head `bh = b·H + h`: its rows of `out = [y | s_T]` and its tape (see
/// [`tape_len`]), with the state kept transposed (see the module docs).
#[inline(always)]
fn fwd_head<S: Simd, const N: usize, const K: usize>(
    d: Dims,
    bh: usize,
    x: Inputs<'_>,
    tape: &mut [f32],
    out: &SharedOut<'_>,
) {
    let (bi, hi, nt) = (bh / d.h, bh % d.h, d.t);
    let (sas, cks) = tape.split_at_mut(nt * N);
    let mut st = [[0f32; N]; N];
    load_transposed(&mut st, &x.s0[bh * N * N..]);
    let (mut sig, mut w) = ([0f32; N], [0f32; N]);
    for t in 0..nt {
        let Tok {
            r,
            w: w_raw,
            k,
            v,
            a,
            b,
        } = x.tok::<N>(d.at(bi, t, hi));
        decay_row::<S, N>(&w_raw, &mut sig, &mut w);
        let (sa, y) = fwd_token::<S, N, K>(&mut st, [&r, &w, &k, &v, &a, &b]);
        let mut y_row = [0f32; N];
        store_row::<S, K>(&y, &mut y_row);
        // SAFETY: row (b,t,h) belongs to this head only.
        unsafe { out.write(d.at(bi, t, hi), &y_row) };
        store_row::<S, K>(&sa, &mut sas[t * N..]);
        if (t + 1) % CHECKPOINT_EVERY == 0 || t + 1 == nt {
            cks[(t / CHECKPOINT_EVERY) * N * N..][..N * N].copy_from_slice(st.as_flattened());
        }
    }
    let mut s_final = [[0f32; N]; N];
    load_transposed(&mut s_final, st.as_flattened());
    // SAFETY: state block b·H + h belongs to this head only.
    unsafe { out.write(d.tokens_len() + bh * N * N, s_final.as_flattened()) };
}

/// Backward of head `bh` (backstepping, see the module doc): its rows of
/// `out = [dr | dŵ | dk | dv | da | db | ds0]` (the packed gradient layout); `tape` is that head's part of the forward's tape. Each step makes two
/// passes over the rows of S and dS: the first adds `dy rᵀ` to dS, steps S back and computes
/// `dr, dv, dsa`; the second, which needs all of `dsa`, computes `dk, db, dŵ, da` and propagates
/// dS. Splitting there keeps the row sums off the critical path, and each pass's accumulators
/// fit in registers.
#[inline(always)]
fn bwd_head<S: Simd, const N: usize, const K: usize>(
    d: Dims,
    bh: usize,
    x: Inputs<'_>,
    tape: &[f32],
    dy: &[f32],
    ds_t: &[f32],
    out: &SharedOut<'_>,
) {
    let (bi, hi, nt) = (bh / d.h, bh % d.h, d.t);
    let (sas, cks) = tape.split_at(nt * N);
    let m = d.tokens_len();
    let (mut s, mut ds) = ([[0f32; N]; N], [[0f32; N]; N]);
    load_transposed(&mut s, &cks[(d.checkpoints() - 1) * N * N..]);
    load_matrix(&mut ds, &ds_t[bh * N * N..]);
    let (mut w, mut winv, mut dw_draw) = ([0f32; N], [0f32; N], [0f32; N]);
    let (mut dv, mut dsa) = ([0f32; N], [0f32; N]);
    for t in (0..nt).rev() {
        let o = d.at(bi, t, hi);
        let Tok {
            r,
            w: w_raw,
            k,
            v,
            a,
            b,
        } = x.tok::<N>(o);
        let (dyt, sat) = (*row::<N>(dy, o), *row::<N>(sas, t * N));
        decay_row_grad::<S, N>(&w_raw, &mut w, &mut winv, &mut dw_draw);

        // Pass 1: dS += dy rᵀ; dr = S_tᵀ dy; S_{t-1} = (S_t − v kᵀ − sa bᵀ) diag(1/w);
        // dv = dS k; dsa = dS b.
        let (rv, kv, bv, winvv) = (
            load_row::<S, K>(&r),
            load_row::<S, K>(&k),
            load_row::<S, K>(&b),
            load_row::<S, K>(&winv),
        );
        let mut dr = [S::zero(); K];
        // Rows in blocks of W, so that the row sums for dv and dsa are taken W at a time.
        for blk in (0..N).step_by(S::W) {
            let (mut acc_dv, mut acc_dsa) = ([S::zero(); MAX_W], [S::zero(); MAX_W]);
            for l in 0..S::W {
                let i = blk + l;
                let (srow, drow) = (&mut s[i], &mut ds[i]);
                let (dy_i, nv_i, nsa_i) = (S::splat(dyt[i]), S::splat(-v[i]), S::splat(-sat[i]));
                for c in 0..K {
                    let j = c * S::W;
                    let s_t = S::load(&srow[j..]);
                    dr[c] = S::fma(dy_i, s_t, dr[c]);
                    let g = S::fma(dy_i, rv[c], S::load(&drow[j..]));
                    S::store(g, &mut drow[j..]);
                    let s_prev = S::mul(S::fma(nv_i, kv[c], S::fma(nsa_i, bv[c], s_t)), winvv[c]);
                    S::store(s_prev, &mut srow[j..]);
                    acc_dv[l] = S::fma(g, kv[c], acc_dv[l]);
                    acc_dsa[l] = S::fma(g, bv[c], acc_dsa[l]);
                }
            }
            S::store(S::hsum_rows(&acc_dv[..S::W]), &mut dv[blk..]);
            S::store(S::hsum_rows(&acc_dsa[..S::W]), &mut dsa[blk..]);
        }
        // Where S_{t-1} was saved (or is s0), take it exactly instead of the inversion.
        if t == 0 {
            load_matrix(&mut s, &x.s0[bh * N * N..]);
        } else if t % CHECKPOINT_EVERY == 0 {
            load_transposed(&mut s, &cks[(t / CHECKPOINT_EVERY - 1) * N * N..]);
        }

        // Pass 2: dk = dSᵀ v; db = dSᵀ sa; dmul = colsum(dS ⊙ S_{t-1}); da = S_{t-1}ᵀ dsa;
        // dS ← dS diag(w) + dsa aᵀ.
        let (wv, av) = (load_row::<S, K>(&w), load_row::<S, K>(&a));
        let (mut dk, mut db, mut dmul, mut da) = (
            [S::zero(); K],
            [S::zero(); K],
            [S::zero(); K],
            [S::zero(); K],
        );
        for i in 0..N {
            let (srow, drow) = (&s[i], &mut ds[i]);
            let (v_i, sa_i, dsa_i) = (S::splat(v[i]), S::splat(sat[i]), S::splat(dsa[i]));
            for c in 0..K {
                let j = c * S::W;
                let (g, s_prev) = (S::load(&drow[j..]), S::load(&srow[j..]));
                dk[c] = S::fma(v_i, g, dk[c]);
                db[c] = S::fma(sa_i, g, db[c]);
                dmul[c] = S::fma(g, s_prev, dmul[c]);
                da[c] = S::fma(dsa_i, s_prev, da[c]);
                S::store(S::fma(g, wv[c], S::mul(dsa_i, av[c])), &mut drow[j..]);
            }
        }
        let dwv = load_row::<S, K>(&dw_draw);
        let dw: [S::V; K] = std::array::from_fn(|c| S::mul(dmul[c], dwv[c]));
        let mut rows = [[0f32; N]; 6];
        for (q, g) in [(0, &dr), (1, &dw), (2, &dk), (4, &da), (5, &db)] {
            store_row::<S, K>(g, &mut rows[q]);
        }
        rows[3] = dv;
        for (q, g) in rows.iter().enumerate() {
            // SAFETY: row (b,t,h) of each gradient belongs to this head only.
            unsafe { out.write(q * m + o, g) };
        }
    }
    // SAFETY: state block b·H + h belongs to this head only.
    unsafe { out.write(6 * m + bh * N * N, ds.as_flattened()) };
}

/// Instruction sets the fused kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// Whether this CPU can run the kernels compiled for `self`.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The instruction sets this CPU can run, best first (the portable one always, last).
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// The one the fused scan uses.
    pub fn best() -> Isa {
        Isa::available()[0]
    }
}

/// Defines `$name(isa, args)` calling the generic kernel `$kernel::<_, FUSED_N, _>` compiled for
/// instruction set `isa`. Panics if this CPU cannot run it.
macro_rules! simd_entry {
    ($name:ident => $kernel:ident ($($arg:ident: $ty:ty),*)) => {
        fn $name(isa: Isa, $($arg: $ty),*) {
            assert!(isa.supported(), "wkv7: this CPU cannot run the {isa:?} kernels");
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $kernel::<x86::Avx512, FUSED_N, { FUSED_N / 16 }>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $kernel::<x86::Avx2, FUSED_N, { FUSED_N / 8 }>($($arg),*)
                }
                match isa {
                    // SAFETY: the CPU has these features (asserted above).
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Portable => {}
                }
            }
            $kernel::<Portable, FUSED_N, { FUSED_N / 8 }>($($arg),*)
        }
    };
}

simd_entry!(fwd_head_isa => fwd_head(
    d: Dims, bh: usize, x: Inputs<'_>, tape: &mut [f32], out: &SharedOut<'_>
));
simd_entry!(step_head_isa => step_head(
    c: usize, off: usize, ins: [&[f32]; 6], st: &mut [f32], y: &mut [f32]
));
simd_entry!(bwd_head_isa => bwd_head(
    d: Dims, bh: usize, x: Inputs<'_>, tape: &[f32], dy: &[f32], ds_t: &[f32], out: &SharedOut<'_>
));

/// What the fused forward keeps for the backward: every head's `[sa | checkpoints]`.
#[derive(Debug)]
pub struct Tape {
    d: Dims,
    bufs: Vec<f32>,
}

/// Fused forward (N = 64). Returns `[y (B,T,H,N) | s_T (B,H,N,N)]` flat, and the tape for the
/// backward. Panics if `d.n != FUSED_N` or a slice length does not match `d`.
pub fn wkv7_fused_forward(d: Dims, x: Inputs) -> (Vec<f32>, Tape) {
    wkv7_fused_forward_on(Isa::best(), d, x)
}

/// [`wkv7_fused_forward`] on the kernels of `isa` (tests hold every variant to the reference).
/// Panics if this CPU cannot run them.
pub fn wkv7_fused_forward_on(isa: Isa, d: Dims, x: Inputs) -> (Vec<f32>, Tape) {
    assert_eq!(
        d.n, FUSED_N,
        "wkv7: the fused kernel needs head size {FUSED_N}, got {}",
        d.n
    );
    x.check(d);
    let m = d.tokens_len();
    let mut out = vec![0f32; m + d.state_len()];
    if d.t == 0 {
        out.copy_from_slice(x.s0);
        return (out, Tape { d, bufs: vec![] });
    }
    let task_len = tape_len(d);
    let mut bufs = vec![0f32; d.b * d.h * task_len];
    let shared = SharedOut::new(&mut out);
    bufs.par_chunks_mut(task_len)
        .enumerate()
        .for_each(|(bh, tape)| fwd_head_isa(isa, d, bh, x, tape, &shared));
    (out, Tape { d, bufs })
}

/// Fused backward (N = 64) from the tape of [`wkv7_fused_forward`] on the same inputs.
/// `dy [B,T,H,N]`, `ds_t [B,H,N,N]`. Panics if shapes do not match.
pub fn wkv7_fused_backward(d: Dims, x: Inputs, tape: &Tape, dy: &[f32], ds_t: &[f32]) -> Grads {
    wkv7_fused_backward_on(Isa::best(), d, x, tape, dy, ds_t)
}

/// [`wkv7_fused_backward`] on the kernels of `isa`.
pub fn wkv7_fused_backward_on(
    isa: Isa,
    d: Dims,
    x: Inputs,
    tape: &Tape,
    dy: &[f32],
    ds_t: &[f32],
) -> Grads {
    assert_eq!(tape.d, d, "wkv7: the tape was recorded for other sizes");
    x.check(d);
    assert_eq!(
        (dy.len(), ds_t.len()),
        (d.tokens_len(), d.state_len()),
        "wkv7: gradient lengths do not match {d:?}"
    );
    if d.t == 0 {
        return Grads {
            packed: vec![],
            s0: ds_t.to_vec(),
        };
    }
    let task_len = tape_len(d);
    let mut packed = vec![0f32; 6 * d.tokens_len() + d.state_len()];
    let shared = SharedOut::new(&mut packed);
    (0..d.b * d.h).into_par_iter().for_each(|bh| {
        bwd_head_isa(
            isa,
            d,
            bh,
            x,
            &tape.bufs[bh * task_len..][..task_len],
            dy,
            ds_t,
            &shared,
        )
    });
    let s0 = packed.split_off(6 * d.tokens_len());
    Grads { packed, s0 }
}

// ---------------------------------------------------------------------------------------------
// candle op
// ---------------------------------------------------------------------------------------------

struct Wkv7Op {
    d: Dims,
    /// Filled by the fused forward, taken by the backward (None: N ≠ 64, or already taken).
    tape: Mutex<Option<Tape>>,
    /// The same for the CUDA kernel (`kernels/wkv7.cu`), whose tape stays on the GPU.
    #[cfg(feature = "cuda")]
    gpu_tape: Mutex<Option<crate::cuda::WkvTape>>,
}

impl CustomOp2 for Wkv7Op {
    fn name(&self) -> &'static str {
        "wkv7"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.d;
        let x = Inputs::from_packed(
            d,
            cpu_slice(s1, l1, "wkv7", "packed r,w,k,v,a,b")?,
            cpu_slice(s2, l2, "wkv7", "s0")?,
        );
        let out = if d.n == FUSED_N {
            let (out, tape) = wkv7_fused_forward(d, x);
            *self.tape.lock().unwrap_or_else(|e| e.into_inner()) = Some(tape);
            out
        } else {
            let (mut y, s_t) = wkv7_reference(d, x.r, x.w, x.k, x.v, x.a, x.b, x.s0);
            y.extend_from_slice(&s_t);
            y
        };
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (out, tape) = crate::cuda::wkv7_forward(self.d, s1, l1, s2, l2)?;
        *self.gpu_tape.lock().unwrap_or_else(|e| e.into_inner()) = Some(tape);
        Ok((out, Shape::from(self.d.tokens_len() + self.d.state_len())))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.d;
        let grad_res = grad_res.contiguous()?;
        #[cfg(feature = "cuda")]
        if arg1.device().is_cuda() {
            // The backward kernel, from the tape the forward left on the GPU (or a new one).
            let g = crate::cuda::gpu_op3(
                "wkv7_backward",
                [arg1, arg2, &grad_res],
                |[(x, lx), (s0, ls), (g, lg)]| {
                    let saved = self
                        .gpu_tape
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    let tape = match saved {
                        Some(t) => t,
                        None => crate::cuda::wkv7_forward(d, x, lx, s0, ls)?.1,
                    };
                    let out = crate::cuda::wkv7_backward(&tape, x, lx, s0, ls, g, lg)?;
                    Ok((out, Shape::from(6 * d.tokens_len() + d.state_len())))
                },
            )?;
            let m = 6 * d.tokens_len();
            return Ok((
                Some(g.narrow(0, 0, m)?.reshape(arg1.shape())?),
                Some(g.narrow(0, m, d.state_len())?.reshape(arg2.shape())?),
            ));
        }
        let (st1, l1) = arg1.storage_and_layout();
        let (st2, l2) = arg2.storage_and_layout();
        let (stg, lg) = grad_res.storage_and_layout();
        let x = Inputs::from_packed(
            d,
            storage_slice(&st1, l1, "wkv7", "packed r,w,k,v,a,b")?,
            storage_slice(&st2, l2, "wkv7", "s0")?,
        );
        let (dy, ds_t) =
            storage_slice(&stg, lg, "wkv7", "output gradient")?.split_at(d.tokens_len());
        let g = if d.n == FUSED_N {
            let saved = self.tape.lock().unwrap_or_else(|e| e.into_inner()).take();
            let tape = saved.unwrap_or_else(|| wkv7_fused_forward(d, x).1);
            wkv7_fused_backward(d, x, &tape, dy, ds_t)
        } else {
            wkv7_backward_reference(d, x, dy, ds_t)
        };
        let dev = arg1.device();
        Ok((
            Some(Tensor::from_vec(g.packed, arg1.shape(), dev)?),
            Some(Tensor::from_vec(g.s0, arg2.shape(), dev)?),
        ))
    }
}

fn shape_err(what: &str, got: &Tensor, want: String) -> Error {
    Error::data(format!(
        "wkv7: {what} has shape {:?} and dtype {:?}, expected {want} f32 (a bug in the caller's reshapes)",
        got.dims(),
        got.dtype()
    ))
}

/// The WKV-7 operator on tensors: `r, ŵ, k, v, a, b [B,T,H,N]`, `s0 [B,H,N,N]`, all f32 →
/// `(y [B,T,H,N], s_final [B,H,N,N])`, with gradients for all seven inputs (ŵ is the raw decay
/// logit). CPU only.
pub fn wkv7(
    r: &Tensor,
    w: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s0: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dims = r.dims().to_vec();
    for (name, x) in INPUT_NAMES.iter().zip([r, w, k, v, a, b]) {
        if x.rank() != 4 || x.dims() != dims.as_slice() || x.dtype() != DType::F32 {
            return Err(shape_err(
                &format!("input {name}"),
                x,
                format!("[B,T,H,N] = {dims:?}"),
            ));
        }
    }
    wkv7_packed(&Tensor::stack(&[r, w, k, v, a, b], 0)?, s0)
}

/// [`wkv7`] on inputs already packed as `[6,B,T,H,N]` (order [`INPUT_NAMES`]), which saves the
/// stack copy when the caller can produce them in one tensor.
pub fn wkv7_packed(x: &Tensor, s0: &Tensor) -> Result<(Tensor, Tensor)> {
    let (six, nb, nt, nh, n) = x
        .dims5()
        .map_err(|_| shape_err("packed input", x, "[6,B,T,H,N]".into()))?;
    if six != 6 || x.dtype() != DType::F32 {
        return Err(shape_err("packed input", x, "[6,B,T,H,N]".into()));
    }
    if s0.dims() != [nb, nh, n, n] || s0.dtype() != DType::F32 {
        return Err(shape_err(
            "s0",
            s0,
            format!("[B,H,N,N] = {:?}", [nb, nh, n, n]),
        ));
    }
    let d = Dims {
        b: nb,
        t: nt,
        h: nh,
        n,
    };
    let op = Wkv7Op {
        d,
        tape: Mutex::new(None),
        #[cfg(feature = "cuda")]
        gpu_tape: Mutex::new(None),
    };
    if x.device().is_cuda() && (d.t == 0 || d.n != FUSED_N) {
        // Nothing to scan (the state passes through), or a head size the CUDA kernel does not
        // have: the composed scan, whose ops candle runs anywhere.
        return wkv7_composed(x, s0);
    }
    let out = x.contiguous()?.apply_op2(&s0.contiguous()?, op)?;
    let y = out.narrow(0, 0, d.tokens_len())?.reshape((nb, nt, nh, n))?;
    let s_t = out
        .narrow(0, d.tokens_len(), d.state_len())?
        .reshape((nb, nh, n, n))?;
    Ok((y, s_t))
}

/// The scan as a loop of plain candle ops over time, the math of the module docs step by step:
/// the composed twin of the CUDA kernel (and the "naive loop" it is benchmarked against). Runs
/// on any device, with gradients; about ten ops per token, so keep T small (the backward walks
/// the graph recursively). Same packing as [`wkv7_packed`].
pub fn wkv7_composed(x: &Tensor, s0: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, nb, nt, nh, n) = x.dims5()?;
    let input = |q: usize| x.get(q);
    let (r, w_raw, k, v, a, b) = (
        input(0)?,
        input(1)?,
        input(2)?,
        input(3)?,
        input(4)?,
        input(5)?,
    );
    let w = (candle_nn::ops::sigmoid(&w_raw)? * -(EXP_NEG_HALF as f64))?.exp()?;
    // Token t of a [B,T,H,N] input as a row [B,H,1,N] or a column [B,H,N,1].
    let row = |z: &Tensor, t: usize| -> Result<Tensor> {
        Ok(z.narrow(1, t, 1)?.squeeze(1)?.unsqueeze(2)?.contiguous()?)
    };
    let col =
        |z: &Tensor, t: usize| -> Result<Tensor> { Ok(row(z, t)?.transpose(2, 3)?.contiguous()?) };
    let mut s = s0.clone();
    let mut ys = Vec::with_capacity(nt);
    for t in 0..nt {
        // sa = S a;  S = S diag(w) + sa bᵀ + v kᵀ;  y = S r.
        let sa = s.matmul(&col(&a, t)?)?;
        s = ((s.broadcast_mul(&row(&w, t)?)? + sa.matmul(&row(&b, t)?)?)?
            + col(&v, t)?.matmul(&row(&k, t)?)?)?;
        ys.push(s.matmul(&col(&r, t)?)?.squeeze(3)?);
    }
    let y = if nt == 0 {
        Tensor::zeros((nb, 0, nh, n), DType::F32, x.device())?
    } else {
        Tensor::stack(&ys, 1)?
    };
    Ok((y, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_matches_std() {
        let mut worst = 0f32;
        for i in -8700..8800 {
            let x = i as f32 * 0.01 + 0.003;
            let (got, want) = (exp_fast::<Portable>(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "exp_fast worst relative error {worst}");
    }
}
