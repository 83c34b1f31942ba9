//! Ternary products in integer arithmetic: 2-bit weights times 8-bit activations.
//!
//! BitLinear computes `y = γ · Σ t·x̂` with trits `t ∈ {−1, 0, +1}` and the input `x̂` on an 8-bit
//! grid per token, `x̂ = s·q` with `q ∈ [−128, 127]` and `s = absmax/127`. So every product is
//! an exact integer dot product `Σ t·q` scaled once by `γ·s` at the end.
//!
//! **Layout** (like bitnet.cpp's I2_S): each row is padded with zero trits to a multiple of
//! `GROUP` = 128 columns and packed four trits a byte, as `u = t + 1 ∈ {0, 1, 2}`. Group `g` is 32
//! bytes; byte `j` holds columns `128g + j + 32s` at bits `2s..2s+2` (s = 0..3), so one shift and
//! one mask turn 32 loaded bytes into 32 weights for 32 *consecutive* activations. Because
//! `u = t + 1`, `Σ t·q = Σ u·q − Σ q`: the unsigned×signed byte products that `vpdpbusd`
//! (AVX-512 VNNI) and `vpmaddubsw` (AVX2) compute, minus a per-token sum computed once.
//!
//! **Kernels**: a portable scalar twin (the reference), AVX2, AVX-512 VNNI and NEON. All compute
//! the same integer, so they agree bit for bit (tested), and the result differs from the f32
//! product of the dequantised operands only by the f32 rounding of that product.

use super::kernel::Kernel;
use crate::model::rows::quantize_act;

/// Columns per packed group (32 bytes).
pub const GROUP: usize = 128;

/// `cols` rounded up to whole groups.
pub fn padded(cols: usize) -> usize {
    cols.div_ceil(GROUP) * GROUP
}

/// Packs row-major trits `[rows, cols]` into the 2-bit layout, `rows · padded(cols) / 4` bytes.
pub fn pack(trits: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(trits.len(), rows * cols, "trit count");
    let kp = padded(cols);
    let mut out = vec![0u8; rows * kp / 4];
    for (row, packed) in trits
        .chunks_exact(cols.max(1))
        .zip(out.chunks_exact_mut(kp / 4))
    {
        // Padding columns are t = 0, so they add nothing to Σ t·q.
        for c in 0..kp {
            let t = row.get(c).copied().unwrap_or(0);
            assert!((-1..=1).contains(&t), "trits are −1, 0 or +1");
            let (g, j, s) = (c / GROUP, c % 32, (c % GROUP) / 32);
            packed[g * 32 + j] |= ((t + 1) as u8) << (2 * s);
        }
    }
    out
}

/// Trit `c` of a packed row.
pub fn trit(row: &[u8], c: usize) -> i8 {
    let (g, j, s) = (c / GROUP, c % 32, (c % GROUP) / 32);
    ((row[g * 32 + j] >> (2 * s)) & 3) as i8 - 1
}

/// `t` tokens' activations quantised to 8 bits: row `i` is `q[i·kp..]` (zero-padded to whole
/// groups), its step `scale[i]` and `Σ q` in `sum[i]`. Buffers grow once and are reused.
#[derive(Default, Debug)]
pub struct QuantActs {
    cols: usize,
    kp: usize,
    t: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<i32>,
}

impl QuantActs {
    /// Quantises `x = [t, cols]` token by token.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        assert!(cols > 0 && x.len().is_multiple_of(cols), "activation shape");
        let (t, kp) = (x.len() / cols, padded(cols));
        self.q.clear();
        self.q.resize(t * kp, 0);
        self.scale.clear();
        self.sum.clear();
        for (xr, qr) in x.chunks_exact(cols).zip(self.q.chunks_exact_mut(kp)) {
            self.scale.push(quantize_act(xr, &mut qr[..cols]));
            self.sum.push(qr.iter().map(|&v| v as i32).sum());
        }
        (self.cols, self.kp, self.t) = (cols, kp, t);
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn tokens(&self) -> usize {
        self.t
    }

    /// Token `i`'s dequantised input `s·q` (what the f32 path multiplies).
    pub fn dequantized(&self, i: usize) -> Vec<f32> {
        let q = &self.q[i * self.kp..i * self.kp + self.cols];
        q.iter().map(|&v| v as f32 * self.scale[i]).collect()
    }
}

/// One call: rows `r0..r1` of a packed matrix times every token of `acts`;
/// `y[i·y_stride + r] = γ·sᵢ·Σ tᵣ·qᵢ`.
pub(crate) struct Call<'a> {
    pub w: *const u8,
    pub gamma: f32,
    pub r0: usize,
    pub r1: usize,
    pub acts: &'a QuantActs,
    pub y: *mut f32,
    pub y_stride: usize,
}

/// Runs a call on `kernel`'s integer products (which this CPU must support).
///
/// # Safety
/// `w` must hold at least `r1` packed rows of `acts.cols` columns, and `y` must be valid for the
/// writes, with no other thread writing them.
pub(crate) unsafe fn rows(kernel: Kernel, a: &Call) {
    debug_assert!(kernel.supported());
    // SAFETY: forwarded from the caller; each variant runs only where `supported` said yes.
    unsafe {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => tiles_avx2(a),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => tiles_avx512(a),
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => tiles_neon(a),
            _ => tiles::<Scalar>(a),
        }
    }
}

// The loop compiled once per ISA with its features on, so that the dot products inline into it:
// at d_model 512 a row is only four groups, and a call per row cost as much as its arithmetic.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tiles_avx2(a: &Call) {
    // SAFETY: forwarded from `rows`.
    unsafe { tiles::<Avx2>(a) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tiles_avx512(a: &Call) {
    // SAFETY: forwarded from `rows`.
    unsafe { tiles::<Avx512>(a) }
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn tiles_neon(a: &Call) {
    // SAFETY: forwarded from `rows`.
    unsafe { tiles::<Neon>(a) }
}

/// Tokens sharing each unpacked weight group during prefill.
const TILE: usize = 4;

/// One ISA's dot products of a packed row with `T` token rows (`kp` columns, stride `kp`).
trait Dots {
    /// # Safety
    /// `w` holds `kp/4` bytes, `q` holds `T` rows of `kp` codes.
    unsafe fn dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T];

    /// Four consecutive packed rows (`row_bytes` apart) times one token's codes: decode's case,
    /// where an ISA may share the code loads and the horizontal sums between rows.
    ///
    /// # Safety
    /// `w` holds four rows of `kp/4` bytes, `q` holds `kp` codes.
    #[inline(always)]
    unsafe fn rows4(w: *const u8, row_bytes: usize, q: *const i8, kp: usize) -> [i32; 4] {
        // SAFETY: forwarded from the caller.
        std::array::from_fn(|j| unsafe { Self::dots::<1>(w.add(j * row_bytes), q, kp)[0] })
    }
}

/// The loop over rows and token tiles, shared by every ISA: only `dots` differs.
#[inline(always)]
unsafe fn tiles<D: Dots>(a: &Call) {
    let acts = a.acts;
    let (kp, t) = (acts.kp, acts.t);
    let row_bytes = kp / 4;
    let mut r0 = a.r0;
    if t == 1 {
        while r0 + 4 <= a.r1 {
            // SAFETY: rows r0..r0+4 are inside r0..r1, and the one token's codes in `acts.q`.
            unsafe {
                let d = D::rows4(a.w.add(r0 * row_bytes), row_bytes, acts.q.as_ptr(), kp);
                for (j, v) in d.into_iter().enumerate() {
                    *a.y.add(r0 + j) = finish(acts, 0, v, a.gamma);
                }
            }
            r0 += 4;
        }
    }
    for r in r0..a.r1 {
        // SAFETY: r < r1 ≤ rows (caller), token rows are inside `acts.q`, outputs are the caller's.
        unsafe {
            let w = a.w.add(r * row_bytes);
            let mut i = 0;
            while i + TILE <= t {
                let d = D::dots::<TILE>(w, acts.q.as_ptr().add(i * kp), kp);
                for (k, v) in d.into_iter().enumerate() {
                    *a.y.add((i + k) * a.y_stride + r) = finish(acts, i + k, v, a.gamma);
                }
                i += TILE;
            }
            while i < t {
                let [v] = D::dots::<1>(w, acts.q.as_ptr().add(i * kp), kp);
                *a.y.add(i * a.y_stride + r) = finish(acts, i, v, a.gamma);
                i += 1;
            }
        }
    }
}

/// `Σ u·q` → `γ·s·Σ t·q`, written once so every ISA rounds alike.
#[inline(always)]
fn finish(acts: &QuantActs, i: usize, uq: i32, gamma: f32) -> f32 {
    (uq - acts.sum[i]) as f32 * (acts.scale[i] * gamma)
}

/// The reference: byte by byte, trit by trit.
struct Scalar;

impl Dots for Scalar {
    unsafe fn dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T] {
        // SAFETY: extents from the caller.
        let (w, q) = unsafe {
            (
                std::slice::from_raw_parts(w, kp / 4),
                std::slice::from_raw_parts(q, T * kp),
            )
        };
        std::array::from_fn(|k| {
            let q = &q[k * kp..(k + 1) * kp];
            let mut acc = 0i32;
            for (wg, qg) in w.chunks_exact(32).zip(q.chunks_exact(GROUP)) {
                for (j, &b) in wg.iter().enumerate() {
                    for s in 0..4 {
                        acc += ((b >> (2 * s)) & 3) as i32 * qg[32 * s + j] as i32;
                    }
                }
            }
            acc
        })
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Dots for Avx2 {
    #[inline(always)]
    unsafe fn dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T] {
        // SAFETY: chosen only when AVX2 is present; extents from the caller.
        unsafe { avx2_dots::<T>(w, q, kp) }
    }
}

/// Per group: four masks of the 32 loaded bytes give 4×32 weights; `vpmaddubsw` multiplies them
/// with 32 codes each into pairs (|pair| ≤ 2·2·128, so four of them still fit in i16), and one
/// `vpmaddwd` by ones widens to i32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T] {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); T];
    for g in 0..kp / GROUP {
        // SAFETY: g < kp/128, so the 32 bytes and the 128 codes of each token are in bounds.
        unsafe {
            let b = _mm256_loadu_si256(w.add(g * 32).cast());
            let u = [
                _mm256_and_si256(b, mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(b), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask),
                _mm256_and_si256(_mm256_srli_epi16::<6>(b), mask),
            ];
            for (k, a) in acc.iter_mut().enumerate() {
                let x = q.add(k * kp + g * GROUP);
                let p =
                    |s: usize| _mm256_maddubs_epi16(u[s], _mm256_loadu_si256(x.add(32 * s).cast()));
                let pairs =
                    _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    acc.map(|a| {
        let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    })
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Dots for Avx512 {
    #[inline(always)]
    unsafe fn dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T] {
        // SAFETY: chosen only when AVX-512 F/BW/VNNI are present; extents from the caller.
        unsafe { avx512_dots::<T>(w, q, kp) }
    }

    #[inline(always)]
    unsafe fn rows4(w: *const u8, row_bytes: usize, q: *const i8, kp: usize) -> [i32; 4] {
        // SAFETY: as for `dots`.
        unsafe { avx512_rows4(w, row_bytes, q, kp) }
    }
}

/// Per group: the 32 bytes broadcast to both halves of a 512-bit register and shifted by 0|2
/// and 4|6 bits per half give the weights of columns 0–63 and 64–127 in order, each one
/// `vpdpbusd` (u8 × i8, four products summed into i32) against 64 consecutive codes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512_dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T] {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(3);
    // Shifting whole 64-bit lanes moves the neighbour byte's bits into the top of each byte;
    // the mask keeps only the two low bits, which are this byte's.
    let lo = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    let hi = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    let mut acc = [_mm512_setzero_si512(); T];
    for g in 0..kp / GROUP {
        // SAFETY: g < kp/128, so the 32 bytes and the 128 codes of each token are in bounds.
        unsafe {
            let b = _mm512_broadcast_i64x4(_mm256_loadu_si256(w.add(g * 32).cast()));
            let u01 = _mm512_and_si512(_mm512_srlv_epi64(b, lo), mask);
            let u23 = _mm512_and_si512(_mm512_srlv_epi64(b, hi), mask);
            for (k, a) in acc.iter_mut().enumerate() {
                let x = q.add(k * kp + g * GROUP);
                *a = _mm512_dpbusd_epi32(*a, u01, _mm512_loadu_si512(x.cast()));
                *a = _mm512_dpbusd_epi32(*a, u23, _mm512_loadu_si512(x.add(64).cast()));
            }
        }
    }
    acc.map(|a| _mm512_reduce_add_epi32(a))
}

/// `avx512_dots` for four rows and one token: each group's 128 codes are loaded once for the
/// four rows, whose sums are independent chains, and one reduction tree finishes all four.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512_rows4(w: *const u8, row_bytes: usize, q: *const i8, kp: usize) -> [i32; 4] {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(3);
    let lo = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    let hi = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    let mut acc = [_mm512_setzero_si512(); 4];
    let ahead = w.wrapping_add(super::gemv::PREFETCH);
    for l in (0..4 * row_bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l).cast());
    }
    for g in 0..kp / GROUP {
        // SAFETY: g < kp/128: the 32 bytes of each row and the 128 codes are in bounds.
        unsafe {
            let x0 = _mm512_loadu_si512(q.add(g * GROUP).cast());
            let x1 = _mm512_loadu_si512(q.add(g * GROUP + 64).cast());
            for (j, a) in acc.iter_mut().enumerate() {
                let p = w.add(j * row_bytes + g * 32);
                let b = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()));
                *a = _mm512_dpbusd_epi32(*a, _mm512_and_si512(_mm512_srlv_epi64(b, lo), mask), x0);
                *a = _mm512_dpbusd_epi32(*a, _mm512_and_si512(_mm512_srlv_epi64(b, hi), mask), x1);
            }
        }
    }
    let q = acc.map(|v| {
        let h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    });
    let s = _mm_hadd_epi32(_mm_hadd_epi32(q[0], q[1]), _mm_hadd_epi32(q[2], q[3]));
    let mut out = [0i32; 4];
    // SAFETY: four i32 fit in `out`.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), s) };
    out
}

#[cfg(target_arch = "aarch64")]
struct Neon;

#[cfg(target_arch = "aarch64")]
impl Dots for Neon {
    #[inline(always)]
    unsafe fn dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T] {
        // SAFETY: NEON is part of every aarch64 target Rust supports; extents from the caller.
        unsafe { neon_dots::<T>(w, q, kp) }
    }
}

/// Per half group (16 bytes): four shifts and masks give 4×16 weights (0..2, valid as i8);
/// `smull`/`smlal2` multiply them with 16 codes into i16 pairs, `sadalp` widens into i32.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon_dots<const T: usize>(w: *const u8, q: *const i8, kp: usize) -> [i32; T] {
    use std::arch::aarch64::*;
    let mask = vdupq_n_u8(3);
    let mut acc = [vdupq_n_s32(0); T];
    for g in 0..kp / GROUP {
        for h in 0..2 {
            // SAFETY: g < kp/128 and h < 2 keep every load inside the row and the codes.
            unsafe {
                let b = vld1q_u8(w.add(g * 32 + h * 16));
                let u = [
                    vandq_u8(b, mask),
                    vandq_u8(vshrq_n_u8::<2>(b), mask),
                    vandq_u8(vshrq_n_u8::<4>(b), mask),
                    vshrq_n_u8::<6>(b),
                ]
                .map(|v| vreinterpretq_s8_u8(v));
                for (k, a) in acc.iter_mut().enumerate() {
                    let x = q.add(k * kp + g * GROUP + h * 16);
                    for (s, us) in u.iter().enumerate() {
                        let xs = vld1q_s8(x.add(32 * s));
                        let p = vmull_s8(vget_low_s8(*us), vget_low_s8(xs));
                        *a = vpadalq_s16(*a, vmlal_high_s8(p, *us, xs));
                    }
                }
            }
        }
    }
    acc.map(|a| vaddvq_s32(a))
}
