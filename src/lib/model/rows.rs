//! Row kernels: the per-token math of RWKV-7 on slices (rows of C channels in, rows out), written
//! once and run by both executors of the spec in `model::rwkv7` — the training ops (`fused`,
//! `tmix`, `block`) and the decode engine (`engine`). The numerical constants and the WKV call's
//! sizes (`Dims`, `FUSED_N`, `CHECKPOINT_EVERY`) live here too, so `cuda` needs nothing else of
//! the model.
//!
//! Sums use eight running partial sums, which the compiler keeps in one vector register; every
//! row is computed in one fixed order, so results do not depend on how rows are split over
//! threads.

/// LayerNorm's epsilon (ln0, ln1, ln2, ln_out).
pub const LN_EPS: f32 = 1e-5;
/// GroupNorm's epsilon on the WKV output (`ln_x`): the official 1e-5 × head_size_divisor² (8²).
pub const GROUPNORM_EPS: f32 = 64e-5;
/// The floor of ‖k ⊙ k_k‖ per head when it is normalised to κ̂ (F.normalize's default).
pub const NORMALIZE_EPS: f32 = 1e-12;

/// Head size the fused WKV kernels (CPU and CUDA) are compiled for; other sizes use the reference
/// twins.
pub const FUSED_N: usize = 64;

/// The WKV backward's checkpoint interval (steps between exact state copies).
pub const CHECKPOINT_EVERY: usize = 16;

/// Whether the CUDA norm kernel takes groups of `group` channels (a warp per group).
pub fn gpu_norm_supported(group: usize) -> bool {
    group > 0 && group % 32 == 0 && group <= 1024
}

/// Problem sizes of one WKV call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub n: usize,
}

impl Dims {
    /// Elements of one `[B,T,H,N]` tensor.
    pub fn tokens_len(&self) -> usize {
        self.b * self.t * self.h * self.n
    }

    /// Elements of one `[B,H,N,N]` state.
    pub fn state_len(&self) -> usize {
        self.b * self.h * self.n * self.n
    }

    /// Offset of token `t` of head `h` in batch row `b` of a `[B,T,H,N]` tensor.
    pub fn at(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.t + t) * self.h + h) * self.n
    }

    /// Number of saved states per head: one per 16 steps, the last one being the final state.
    pub fn checkpoints(&self) -> usize {
        self.t.div_ceil(CHECKPOINT_EVERY)
    }
}

/// Σ x.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Σ x·y, as [`sum`].
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0f32; 8];
    let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
    let rest: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in cx.zip(cy) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Σ (x·y)·z, as [`dot`] of `x ⊙ y` with `z` (the same products in the same order).
#[inline(always)]
pub fn dot3(x: &[f32], y: &[f32], z: &[f32]) -> f32 {
    let n = x.len().min(y.len()).min(z.len());
    let (x, y, z) = (&x[..n], &y[..n], &z[..n]);
    let mut acc = [0f32; 8];
    let split = n - n % 8;
    for i in (0..split).step_by(8) {
        for l in 0..8 {
            acc[l] += (x[i + l] * y[i + l]) * z[i + l];
        }
    }
    let rest: f32 = (split..n).map(|i| (x[i] * y[i]) * z[i]).sum();
    acc.iter().sum::<f32>() + rest
}

/// Mean and 1/sqrt(biased variance + eps) of one group.
#[inline(always)]
pub fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for l in 0..8 {
            let d = c[l] - mean;
            acc[l] += d * d;
        }
    }
    let var = (acc.iter().sum::<f32>() + rest) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `y = (x − mean) / sqrt(var + eps) ⊙ w + b` over one group (a LayerNorm row, or one head of
/// GroupNorm).
#[inline(always)]
pub fn norm_group(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let (mean, rstd) = moments(x, eps);
    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (x - mean) * rstd * w + b;
    }
}

/// Token shift and lerp of one token (step 1 of TimeMix and ChannelMix):
/// `y = x + (prev − x) ⊙ μ`, `prev` being the previous token's row.
#[inline(always)]
pub fn shift_mix(x: &[f32], prev: &[f32], mu: &[f32], y: &mut [f32]) {
    for (((y, &x), &p), &m) in y.iter_mut().zip(x).zip(prev).zip(mu) {
        *y = x + (p - x) * m;
    }
}

/// The previous-token row of row `r` of `x [B·T, C]` (sequences of `t`): row `r − 1`, or
/// `prev[b]` (`prev [B, C]`) for the first token of sequence `b`.
#[inline(always)]
pub fn prev_row<'a>(x: &'a [f32], prev: &'a [f32], r: usize, t: usize, c: usize) -> &'a [f32] {
    if r % t == 0 {
        &prev[(r / t) * c..][..c]
    } else {
        &x[(r - 1) * c..][..c]
    }
}

/// [`shift_mix`] for rows `row0..` of `x [B·T, C]` (sequences of `t`, `prev [B, C]` before
/// each), into `y`'s rows.
pub fn shift_mix_rows(x: &[f32], prev: &[f32], mu: &[f32], t: usize, row0: usize, y: &mut [f32]) {
    let c = mu.len();
    for (i, yr) in y.chunks_exact_mut(c).enumerate() {
        let r = row0 + i;
        shift_mix(&x[r * c..][..c], prev_row(x, prev, r, t, c), mu, yr);
    }
}

/// `exp` in a branch-free form that vectorises (Cephes `expf`: 2ⁿ by the 1.5·2²³ rounding trick,
/// a degree-6 polynomial on the remainder; about 1 ulp on [−87, 88], 0 below).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let z = x * std::f32::consts::LOG2_E + MAGIC;
    let n = z - MAGIC;
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p * r + c;
    }
    let p = p * r * r + r + 1.0;
    let two_n = f32::from_bits(z.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

/// σ(x) with libm's exp.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// σ(x) with [`exp_approx`] (TimeMix's rates and value-residual mix).
#[inline(always)]
pub fn sigmoid_fast(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// ChannelMix's activation, relu(x)².
#[inline(always)]
pub fn relu_sq(x: f32) -> f32 {
    let r = x.max(0.0);
    r * r
}

/// BitLinear's activation quantiser on one token, with candle's arithmetic
/// (`model::linear::quantize_act_8bit`): absmax to the 8-bit grid. The codes go to `q`, the
/// step `s` is returned, and `s·q` is the quantised input (the engine's ternary products take
/// the codes; its 8-bit head rows are made the same way). A NaN or infinite input gives a NaN
/// step and zero codes, so a diverged input gives NaN outputs as in the model, not silent zeros.
pub fn quantize_act(x: &[f32], q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU has AVX2.
        return unsafe { quantize_act_avx2(x, q) };
    }
    quantize_act_body(x, q)
}

/// The same code compiled for AVX2: eight lanes where baseline x86-64 has four (a ternary
/// prefill quantises every projection's input, 22% of its time when this ran scalar).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_act_avx2(x: &[f32], q: &mut [i8]) -> f32 {
    quantize_act_body(x, q)
}

/// Written to vectorise: the magnitude as bits (ordered as the values for finite inputs, and
/// at least infinity's bits for Inf and NaN) finds the absmax and the non-finite in one pass;
/// the codes are exact IEEE divisions and truncations, the same in every lane width.
#[inline(always)]
fn quantize_act_body(x: &[f32], q: &mut [i8]) -> f32 {
    let bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    if bits >= f32::INFINITY.to_bits() {
        q.fill(0);
        return f32::NAN;
    }
    let s = f32::from_bits(bits).max(1e-5) * (1.0f64 / 127.0) as f32 + 0.0;
    for (qv, v) in q.iter_mut().zip(x) {
        // `round_half_away` in integers: Rust's saturating float casts do not vectorise, and
        // none is needed here.
        let v = *v / s;
        // SAFETY: v is finite with |v| ≤ 127·(1+ε), so it truncates to an i32 exactly.
        let t = unsafe { v.to_int_unchecked::<i32>() };
        let d = v - t as f32;
        *qv = (t + (d >= 0.5) as i32 - (d <= -0.5) as i32).clamp(-128, 127) as i8;
    }
    s
}

/// `v.round()` (half away from zero, as candle rounds) for |v| < 2³¹, without the libm call
/// that `f32::round` is on baseline x86-64 (6% of a ternary decode): truncate, then step away
/// from zero when the dropped part is at least ½ (`v − trunc(v)` is exact). It may give +0 where
/// `round` gives −0. Its twin is an exact f64 rounding (`round_half_away_matches_exact_rounding`);
/// not `f32::round` itself, which MinGW's `roundf` gets wrong at 0.49999997 (it gives 1).
#[inline(always)]
pub fn round_half_away(v: f32) -> f32 {
    let t = v as i32 as f32;
    let d = v - t;
    if d >= 0.5 {
        t + 1.0
    } else if d <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// TimeMix's per-channel parameters (C each, `r_k` flattened `[H·N]`).
#[derive(Clone, Copy)]
pub struct TmixParams<'a> {
    pub w0: &'a [f32],
    pub a0: &'a [f32],
    pub v0: &'a [f32],
    pub k_k: &'a [f32],
    pub k_a: &'a [f32],
    pub r_k: &'a [f32],
    pub ln_w: &'a [f32],
    pub ln_b: &'a [f32],
}

/// One token's TimeMix activations after the projections and LoRAs (C each).
pub struct TmixRow<'a> {
    pub r: &'a [f32],
    /// `tanh(x_w w1) w2`, before `w0`.
    pub wl: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// `x_a a1 a2`, before `a0`.
    pub al: &'a [f32],
    /// `(x_v v1 v2, v_first)` outside layer 0.
    pub residual: Option<(&'a [f32], &'a [f32])>,
}

/// Step 7: the in-context learning rate `a = σ(a0 + al)` of one row.
#[inline(always)]
pub fn icl_rate(p: TmixParams, al: &[f32], a: &mut [f32]) {
    for ((a, &a0), &al) in a.iter_mut().zip(p.a0).zip(al) {
        *a = sigmoid_fast(a0 + al);
    }
}

/// Steps 3–8 on one token: the scan's inputs `[r, ŵ, k', v', −κ̂, κ̂⊙a]` (`n` = head size).
/// ŵ = w0 + wl is the decay logit (the scan takes `wkv::decay` of it).
#[inline(always)]
pub fn tmix_prep(p: TmixParams, n: usize, x: &TmixRow, o: [&mut [f32]; 6]) {
    let [sr, sw, sk, sv, sa, sb] = o;
    let c = sr.len();
    sr.copy_from_slice(x.r);
    // 3. Decay logit.
    for j in 0..c {
        sw[j] = p.w0[j] + x.wl[j];
    }
    // 4. Value residual.
    match x.residual {
        Some((vl, vf)) => {
            for j in 0..c {
                let nu = sigmoid_fast(p.v0[j] + vl[j]);
                sv[j] = x.v[j] + (vf[j] - x.v[j]) * nu;
            }
        }
        None => sv.copy_from_slice(x.v),
    }
    // 5.–8. a, then k' and (for now) a in the b plane, k ⊙ k_k in the a plane.
    icl_rate(p, x.al, sb);
    for j in 0..c {
        sk[j] = x.k[j] * (1.0 + (sb[j] - 1.0) * p.k_a[j]);
        sa[j] = x.k[j] * p.k_k[j];
    }
    for lo in (0..c).step_by(n) {
        let (kk, a) = (&mut sa[lo..lo + n], &mut sb[lo..lo + n]);
        let inv = 1.0 / dot(kk, kk).sqrt().max(NORMALIZE_EPS);
        for j in 0..n {
            let kappa = kk[j] * inv;
            kk[j] = -kappa;
            a[j] *= kappa;
        }
    }
}

/// One head's GroupNorm statistics of the scan output `y` and its bonus scalar `Σ r ⊙ r_k ⊙ k'`.
#[inline(always)]
pub fn head_stats(y: &[f32], r: &[f32], kp: &[f32], r_k: &[f32]) -> (f32, f32, f32) {
    let (mean, rstd) = moments(y, GROUPNORM_EPS);
    (mean, rstd, dot3(r, r_k, kp))
}

/// Steps 10–12 on one head of one token: `z = (GroupNorm(y)·ln_x + bonus·v') ⊙ g`. `lo` is the
/// head's first channel (for the parameters); the other slices are the head's `n` channels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn tmix_out_head(
    p: TmixParams,
    lo: usize,
    y: &[f32],
    r: &[f32],
    kp: &[f32],
    vp: &[f32],
    g: &[f32],
    z: &mut [f32],
) {
    let n = z.len();
    let (lnw, lnb) = (&p.ln_w[lo..lo + n], &p.ln_b[lo..lo + n]);
    let (mean, rstd, s) = head_stats(y, r, kp, &p.r_k[lo..lo + n]);
    for j in 0..n {
        z[j] = ((y[j] - mean) * rstd * lnw[j] + lnb[j] + s * vp[j]) * g[j];
    }
}

#[cfg(test)]
mod tests {
    use super::{quantize_act, round_half_away};

    /// `quantize_act` as first written (scalar folds and checks): the twin of the vectorised one.
    fn quantize_act_reference(x: &[f32], q: &mut [i8]) -> f32 {
        if x.iter().any(|v| !v.is_finite()) {
            q.fill(0);
            return f32::NAN;
        }
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
        let s = amax * (1.0f64 / 127.0) as f32 + 0.0;
        for (qv, v) in q.iter_mut().zip(x) {
            *qv = round_half_away(*v / s).clamp(-128.0, 127.0) as i8;
        }
        s
    }

    #[test]
    fn quantize_act_matches_its_scalar_twin() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let mut rows: Vec<Vec<f32>> = (1..70)
            .map(|n| (0..n).map(|_| next() * 10.0).collect())
            .collect();
        // Exact halves of the step, zeros, tiny values, negative zero, and the non-finite.
        rows.push((0..33).map(|i| (i as f32 - 16.0) * 0.5).collect());
        rows.push(vec![0.0; 17]);
        rows.push(vec![1e-7, -1e-7, -0.0, 3e-6]);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            rows.push(vec![1.0, bad, -2.0, 0.5, 7.0, 1.0, 1.0, 1.0, 2.0]);
        }
        for x in &rows {
            let (mut q, mut r) = (vec![1i8; x.len()], vec![2i8; x.len()]);
            let (s, sr) = (quantize_act(x, &mut q), quantize_act_reference(x, &mut r));
            assert!(s == sr || s.is_nan() && sr.is_nan(), "{s} vs {sr} on {x:?}");
            assert_eq!(q, r, "{x:?}");
        }
    }

    /// Half away from zero in f64, where `v ± 0.5` is exact for every f32 `v` below 2³¹, so the
    /// floor or ceiling is the true rounding (libm's `roundf` is not: MinGW's errs at 0.49999997).
    fn exact_round(v: f32) -> f32 {
        let w = v as f64;
        (if w >= 0.0 {
            (w + 0.5).floor()
        } else {
            (w - 0.5).ceil()
        }) as f32
    }

    #[test]
    fn round_half_away_matches_exact_rounding() {
        // Fixed points first, so the test does not rest on the reference alone.
        for (v, r) in [
            (0.5f32, 1.0f32),
            (1.5, 2.0),
            (2.5, 3.0),
            (0.499_999_97, 0.0),
            (-0.5, -1.0),
        ] {
            assert_eq!(round_half_away(v), r, "{v:e}");
        }
        let mut cases = vec![
            0.5f32,
            1.5,
            2.5,
            126.5,
            127.5,
            0.499_999_97,
            1.0 - f32::EPSILON / 2.0,
        ];
        cases.extend([0.0, 1e-30, 3.0, 127.0, 128.5, 1e6 + 0.5, 2_147_483_520.0]);
        // Every f32 step across [-130, 130) near the half-way points, and a sweep in between.
        for k in -130..130 {
            let h = k as f32 + 0.5;
            let (mut lo, mut hi) = (h, h);
            for _ in 0..8 {
                lo = lo.next_down();
                hi = hi.next_up();
                cases.extend([lo, hi]);
            }
        }
        cases.extend((0..100_000).map(|i| (i as f32 - 50_000.0) * 0.002_61));
        for v in cases.iter().flat_map(|&v| [v, -v]) {
            assert_eq!(round_half_away(v), exact_round(v), "{v:e}");
        }
    }
}
