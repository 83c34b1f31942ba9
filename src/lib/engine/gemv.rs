//! Matrices in their stored dtype and the products the engine needs: `y = W x` for one token
//! (GEMV) and for a tile of tokens (prefill), always accumulating in f32.
//!
//! Two kernel families compute the same thing: `Kernel::Avx2` (x86_64 AVX2 + FMA + F16C, chosen at
//! run time) and `Kernel::Portable`, plain Rust written with eight independent partial sums so the
//! compiler can vectorise it on any target. The portable one is the reference twin: a test asserts
//! they agree.
//!
//! Besides the float dtypes, a matrix may hold ternary weights: one trit (−1, 0, +1) per byte and
//! one scale γ, `y = γ · Σ t·x`. A denser packing (2 bits as in bitnet.cpp's I2_S, int8
//! activations) is another `WeightDtype` and another row kernel here; nothing outside this file
//! looks inside a `Matrix`.

use std::any::Any;
use std::sync::Arc;

/// How a matrix's elements are stored. Products always compute in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    BF16,
    /// Trits as i8, times the matrix's scale.
    Ternary,
}

impl WeightDtype {
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::BF16 => 2,
            WeightDtype::Ternary => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::BF16 => "bf16",
            WeightDtype::Ternary => "ternary",
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            "bf16" => Ok(WeightDtype::BF16),
            _ => Err(crate::Error::usage(format!(
                "unknown weight dtype '{s}'; use f32, f16 or bf16"
            ))),
        }
    }
}

/// Which implementation of the products runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// `requested` if this CPU can run it, else the portable kernel.
    pub fn or_portable(self) -> Kernel {
        match self {
            Kernel::Avx2 => Kernel::detect(),
            Kernel::Portable => Kernel::Portable,
        }
    }
}

/// Keeps the bytes a matrix points into alive: the checkpoint's memory map or an owned buffer.
type Keep = Arc<dyn Any + Send + Sync>;

/// A row-major `[rows, cols]` matrix whose elements live in a memory map or an owned buffer.
pub struct Matrix {
    rows: usize,
    cols: usize,
    dtype: WeightDtype,
    /// Multiplies every element (γ of a ternary matrix; 1 for the float dtypes, an exact no-op).
    scale: f32,
    /// Start of element 0; aligned for the dtype; `rows·cols` elements long.
    ptr: *const u8,
    _keep: Keep,
}

// SAFETY: the pointed-to bytes are immutable and kept alive by `_keep` for the matrix's lifetime.
unsafe impl Send for Matrix {}
unsafe impl Sync for Matrix {}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Matrix[{}x{} {}]",
            self.rows,
            self.cols,
            self.dtype.name()
        )
    }
}

/// The element codes the kernels are specialised on (const generics want an integer).
const K_F32: u8 = 0;
const K_F16: u8 = 1;
const K_BF16: u8 = 2;
const K_TRIT: u8 = 3;

/// Bytes per element of a kernel's dtype.
const fn esize(k: u8) -> usize {
    match k {
        K_F32 => 4,
        K_TRIT => 1,
        _ => 2,
    }
}

impl Matrix {
    /// A matrix over bytes someone else owns. Returns `None` when `bytes` is not aligned for the
    /// dtype or the host is big-endian (the caller then copies), or has the wrong length.
    ///
    /// # Safety
    /// `bytes` must stay valid and unchanged as long as `keep` lives.
    pub unsafe fn borrowed(
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
        bytes: &[u8],
        keep: Keep,
    ) -> Option<Matrix> {
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.bytes());
        if !aligned || cfg!(target_endian = "big") || bytes.len() != rows * cols * dtype.bytes() {
            return None;
        }
        if dtype == WeightDtype::Ternary {
            return None;
        }
        Some(Matrix {
            rows,
            cols,
            dtype,
            scale: 1.0,
            ptr: bytes.as_ptr(),
            _keep: keep,
        })
    }

    /// An owned f32 matrix.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        let ptr = data.as_ptr().cast::<u8>();
        // The Vec's heap buffer does not move when the Vec is moved into the Arc.
        Matrix {
            rows,
            cols,
            dtype: WeightDtype::F32,
            scale: 1.0,
            ptr,
            _keep: Arc::new(data),
        }
    }

    /// A ternary matrix: trits in {−1, 0, +1}, row-major, and the scale γ.
    pub fn from_trits(rows: usize, cols: usize, trits: Vec<i8>, gamma: f32) -> Matrix {
        assert_eq!(trits.len(), rows * cols, "matrix data length");
        assert!(
            trits.iter().all(|t| (-1..=1).contains(t)),
            "trits are −1, 0 or +1"
        );
        Matrix {
            rows,
            cols,
            dtype: WeightDtype::Ternary,
            scale: gamma,
            ptr: trits.as_ptr().cast::<u8>(),
            _keep: Arc::new(trits),
        }
    }

    /// An owned matrix in a float `dtype`, rounded from f32 values (round to nearest even).
    pub fn from_f32_as(rows: usize, cols: usize, data: Vec<f32>, dtype: WeightDtype) -> Matrix {
        let bits: Vec<u16> = match dtype {
            WeightDtype::F32 => return Matrix::from_f32(rows, cols, data),
            WeightDtype::Ternary => panic!("ternary matrices are built with from_trits"),
            WeightDtype::F16 => data
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect(),
            WeightDtype::BF16 => data
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect(),
        };
        assert_eq!(bits.len(), rows * cols, "matrix data length");
        Matrix {
            rows,
            cols,
            dtype,
            scale: 1.0,
            ptr: bits.as_ptr().cast::<u8>(),
            _keep: Arc::new(bits),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// Bytes of element storage.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.bytes()
    }

    fn row_ptr(&self, r: usize) -> *const u8 {
        debug_assert!(r < self.rows);
        // SAFETY: r < rows, so the offset stays inside the matrix.
        unsafe { self.ptr.add(r * self.cols * self.dtype.bytes()) }
    }

    /// Row `r` converted to f32 (the embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols);
        let p = self.row_ptr(r);
        for (c, o) in out.iter_mut().enumerate() {
            // SAFETY: c < cols.
            *o = unsafe { load1(self.dtype, p, c) } * self.scale;
        }
    }

    /// Every element as f32, row-major (for tests and conversions).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, row);
        }
        out
    }

    /// Rows `r0..r1` of `Y = X Wᵀ` for `t` tokens: `x` is `[t, cols]`, and the result for token `i`,
    /// row `r` goes to `y[i·y_stride + r]`.
    ///
    /// # Safety
    /// `y` must be valid for those writes, and no other thread may write them concurrently.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_into(
        &self,
        kernel: Kernel,
        r0: usize,
        r1: usize,
        x: &[f32],
        t: usize,
        y: *mut f32,
        y_stride: usize,
    ) {
        assert!(r0 <= r1 && r1 <= self.rows && x.len() >= t * self.cols);
        let args = Rows {
            w: self.ptr,
            scale: self.scale,
            cols: self.cols,
            r0,
            r1,
            x: x.as_ptr(),
            t,
            y,
            y_stride,
        };
        // SAFETY: bounds asserted above; the caller vouches for `y`; Avx2 is only ever selected
        // when the CPU has the features (`Kernel::or_portable`).
        unsafe {
            match (kernel, self.dtype) {
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, WeightDtype::F32) => avx2::rows::<K_F32>(&args),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, WeightDtype::F16) => avx2::rows::<K_F16>(&args),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, WeightDtype::BF16) => avx2::rows::<K_BF16>(&args),
                #[cfg(target_arch = "x86_64")]
                (Kernel::Avx2, WeightDtype::Ternary) => avx2::rows::<K_TRIT>(&args),
                (_, WeightDtype::F32) => portable::rows::<K_F32>(&args),
                (_, WeightDtype::F16) => portable::rows::<K_F16>(&args),
                (_, WeightDtype::BF16) => portable::rows::<K_BF16>(&args),
                (_, WeightDtype::Ternary) => portable::rows::<K_TRIT>(&args),
            }
        }
    }

    /// `y = W x` for one vector, single-threaded.
    pub fn gemv(&self, kernel: Kernel, x: &[f32], y: &mut [f32]) {
        assert_eq!(y.len(), self.rows);
        // SAFETY: y is exclusively borrowed and has `rows` elements.
        unsafe { self.rows_into(kernel, 0, self.rows, x, 1, y.as_mut_ptr(), self.rows) }
    }
}

/// One call's arguments, shared by both kernel families.
struct Rows {
    w: *const u8,
    /// Applied to each finished dot product.
    scale: f32,
    cols: usize,
    r0: usize,
    r1: usize,
    x: *const f32,
    t: usize,
    y: *mut f32,
    y_stride: usize,
}

/// Element `i` of a row as f32.
///
/// # Safety
/// `p` must point to a row with more than `i` elements of the dtype.
#[inline(always)]
unsafe fn load1(dtype: WeightDtype, p: *const u8, i: usize) -> f32 {
    unsafe {
        match dtype {
            WeightDtype::F32 => *p.cast::<f32>().add(i),
            WeightDtype::F16 => half::f16::from_bits(*p.cast::<u16>().add(i)).to_f32(),
            WeightDtype::BF16 => f32::from_bits((*p.cast::<u16>().add(i) as u32) << 16),
            WeightDtype::Ternary => *p.cast::<i8>().add(i) as f32,
        }
    }
}

#[inline(always)]
unsafe fn load1k<const K: u8>(p: *const u8, i: usize) -> f32 {
    let dtype = match K {
        K_F32 => WeightDtype::F32,
        K_F16 => WeightDtype::F16,
        K_BF16 => WeightDtype::BF16,
        _ => WeightDtype::Ternary,
    };
    unsafe { load1(dtype, p, i) }
}

/// Plain Rust: eight partial sums per dot product, the same arithmetic on every target.
mod portable {
    use super::{Rows, load1k};

    const LANES: usize = 8;

    /// Σ w[i]·x[i] with LANES interleaved partial sums.
    #[inline(always)]
    unsafe fn dot<const K: u8>(w: *const u8, x: &[f32]) -> f32 {
        let n = x.len();
        let mut acc = [0f32; LANES];
        let full = n / LANES * LANES;
        let mut i = 0;
        while i < full {
            for l in 0..LANES {
                // SAFETY: i + l < n = the row length.
                acc[l] += unsafe { load1k::<K>(w, i + l) } * x[i + l];
            }
            i += LANES;
        }
        let mut s: f32 = acc.iter().sum();
        for (j, xv) in x.iter().enumerate().skip(full) {
            // SAFETY: j < n.
            s += unsafe { load1k::<K>(w, j) } * xv;
        }
        s
    }

    pub(super) unsafe fn rows<const K: u8>(a: &Rows) {
        for r in a.r0..a.r1 {
            // SAFETY: r < rows (checked by the caller); x holds t rows of `cols`.
            unsafe {
                let w = a.w.add(r * a.cols * super::esize(K));
                for i in 0..a.t {
                    let x = std::slice::from_raw_parts(a.x.add(i * a.cols), a.cols);
                    *a.y.add(i * a.y_stride + r) = dot::<K>(w, x) * a.scale;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{K_BF16, K_F16, K_F32, K_TRIT, Rows, esize, load1k};
    use std::arch::x86_64::*;

    /// Tokens per two-row tile: 2·TILE2 accumulators + 2 weights + 1 input fit in 16 registers.
    const TILE2: usize = 6;

    /// Eight consecutive elements as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const K: u8>(p: *const u8, i: usize) -> __m256 {
        unsafe {
            match K {
                K_F32 => _mm256_loadu_ps(p.cast::<f32>().add(i)),
                K_F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<u16>().add(i).cast())),
                K_TRIT => _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    p.cast::<i8>().add(i).cast(),
                ))),
                _ => {
                    debug_assert_eq!(K, K_BF16);
                    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast::<u16>().add(i).cast()));
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// One row times one vector: four accumulators hide the FMA latency; memory-bound anyway.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const K: u8>(w: *const u8, x: *const f32, n: usize) -> f32 {
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let j = i + 8 * u;
                    *a = _mm256_fmadd_ps(load8::<K>(w, j), _mm256_loadu_ps(x.add(j)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(load8::<K>(w, i), _mm256_loadu_ps(x.add(i)), acc[0]);
                i += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut s = hsum(sum);
            while i < n {
                s += load1k::<K>(w, i) * *x.add(i);
                i += 1;
            }
            s
        }
    }

    /// One row times `T` vectors (stride `stride`): each weight load feeds T FMAs, which is what
    /// makes prefill compute-bound instead of memory-bound.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_tile<const K: u8, const T: usize>(
        w: *const u8,
        x: *const f32,
        stride: usize,
        n: usize,
    ) -> [f32; T] {
        unsafe {
            let mut acc = [_mm256_setzero_ps(); T];
            let mut i = 0;
            while i + 8 <= n {
                let wv = load8::<K>(w, i);
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(t * stride + i)), *a);
                }
                i += 8;
            }
            let mut out = [0f32; T];
            for t in 0..T {
                let mut s = hsum(acc[t]);
                for j in i..n {
                    s += load1k::<K>(w, j) * *x.add(t * stride + j);
                }
                out[t] = s;
            }
            out
        }
    }

    /// Two rows times `T` vectors: each vector load feeds two FMAs, each weight load T, which
    /// halves the loads per FMA of the one-row tile (prefill is load-port-bound, not DRAM-bound).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_tile2<const K: u8, const T: usize>(
        w0: *const u8,
        w1: *const u8,
        x: *const f32,
        stride: usize,
        n: usize,
    ) -> [[f32; T]; 2] {
        unsafe {
            let mut acc0 = [_mm256_setzero_ps(); T];
            let mut acc1 = [_mm256_setzero_ps(); T];
            let mut i = 0;
            while i + 8 <= n {
                let a = load8::<K>(w0, i);
                let b = load8::<K>(w1, i);
                for t in 0..T {
                    let xv = _mm256_loadu_ps(x.add(t * stride + i));
                    acc0[t] = _mm256_fmadd_ps(a, xv, acc0[t]);
                    acc1[t] = _mm256_fmadd_ps(b, xv, acc1[t]);
                }
                i += 8;
            }
            let mut out = [[0f32; T]; 2];
            for t in 0..T {
                let (mut s0, mut s1) = (hsum(acc0[t]), hsum(acc1[t]));
                for j in i..n {
                    let xv = *x.add(t * stride + j);
                    s0 += load1k::<K>(w0, j) * xv;
                    s1 += load1k::<K>(w1, j) * xv;
                }
                out[0][t] = s0;
                out[1][t] = s1;
            }
            out
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile2<const K: u8, const T: usize>(
        a: &Rows,
        w: *const u8,
        rb: usize,
        r: usize,
        i0: usize,
    ) {
        unsafe {
            let out = dot_tile2::<K, T>(w, w.add(rb), a.x.add(i0 * a.cols), a.cols, a.cols);
            for (dr, row) in out.iter().enumerate() {
                for (t, v) in row.iter().enumerate() {
                    *a.y.add((i0 + t) * a.y_stride + r + dr) = *v * a.scale;
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const K: u8, const T: usize>(a: &Rows, w: *const u8, r: usize, i0: usize) {
        unsafe {
            let out = dot_tile::<K, T>(w, a.x.add(i0 * a.cols), a.cols, a.cols);
            for (t, v) in out.iter().enumerate() {
                *a.y.add((i0 + t) * a.y_stride + r) = *v * a.scale;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows<const K: u8>(a: &Rows) {
        let rb = a.cols * esize(K);
        let mut r = a.r0;
        if a.t > 1 {
            // Pairs of rows first; an odd last row goes through the one-row tiles below.
            while r + 2 <= a.r1 {
                // SAFETY: r + 1 < rows; x/y extents were checked by the caller.
                unsafe {
                    let w = a.w.add(r * rb);
                    let mut i = 0;
                    while i + TILE2 <= a.t {
                        tile2::<K, TILE2>(a, w, rb, r, i);
                        i += TILE2;
                    }
                    while i < a.t {
                        tile2::<K, 1>(a, w, rb, r, i);
                        i += 1;
                    }
                }
                r += 2;
            }
        }
        for r in r..a.r1 {
            // SAFETY: r < rows and the x/y extents were checked by the caller.
            unsafe {
                let w = a.w.add(r * rb);
                if a.t == 1 {
                    *a.y.add(r) = dot::<K>(w, a.x, a.cols) * a.scale;
                    continue;
                }
                let mut i = 0;
                while i + 8 <= a.t {
                    tile::<K, 8>(a, w, r, i);
                    i += 8;
                }
                if i + 4 <= a.t {
                    tile::<K, 4>(a, w, r, i);
                    i += 4;
                }
                while i < a.t {
                    tile::<K, 1>(a, w, r, i);
                    i += 1;
                }
            }
        }
    }
}

/// Dot product of two f32 slices with the chosen kernel (the WKV update uses it).
#[inline]
pub fn dot_f32(kernel: Kernel, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut y = 0f32;
    let row = Rows {
        w: a.as_ptr().cast(),
        scale: 1.0,
        cols: a.len(),
        r0: 0,
        r1: 1,
        x: b.as_ptr(),
        t: 1,
        y: &mut y,
        y_stride: 1,
    };
    // SAFETY: one row of `a.len()` f32, one vector of the same length, one output.
    unsafe {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::rows::<K_F32>(&row),
            _ => portable::rows::<K_F32>(&row),
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn borrowed_bytes_must_be_aligned_and_sized() {
        let words: Vec<u32> = (0..17).map(|i| (i as f32).to_bits()).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let keep: Keep = Arc::new(());
        // The Vec<u8> may sit anywhere; find an aligned and a misaligned start inside it.
        let off = (4 - bytes.as_ptr() as usize % 4) % 4;
        let aligned = &bytes[off..off + 12];
        let m = unsafe { Matrix::borrowed(3, 1, WeightDtype::F32, aligned, keep.clone()) };
        assert!(m.is_some() || cfg!(target_endian = "big"));
        let odd = &bytes[off + 1..off + 13];
        assert!(unsafe { Matrix::borrowed(3, 1, WeightDtype::F32, odd, keep.clone()) }.is_none());
        assert!(unsafe { Matrix::borrowed(2, 1, WeightDtype::F32, aligned, keep) }.is_none());
    }

    /// Every dtype, odd shapes (tails of 1..7 columns, token tiles of 8, 4 and 1): the AVX2 kernel
    /// against the portable twin, and both against an f64 sum.
    #[test]
    fn kernels_agree_with_the_portable_twin() {
        let mut seed = 1u64;
        for dtype in [
            WeightDtype::F32,
            WeightDtype::F16,
            WeightDtype::BF16,
            WeightDtype::Ternary,
        ] {
            for (rows, cols, t) in [
                (5, 3, 1),
                (37, 69, 1),
                (64, 384, 1),
                (17, 101, 13),
                (9, 40, 8),
            ] {
                let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
                let m = if dtype == WeightDtype::Ternary {
                    let trits = w
                        .iter()
                        .map(|v| (v * 3.0).round().clamp(-1.0, 1.0) as i8)
                        .collect();
                    Matrix::from_trits(rows, cols, trits, 0.37)
                } else {
                    Matrix::from_f32_as(rows, cols, w, dtype)
                };
                let wq = m.to_f32_vec();
                let x: Vec<f32> = (0..t * cols).map(|_| lcg(&mut seed)).collect();
                let mut got = Vec::new();
                for kernel in [Kernel::Portable, Kernel::Avx2.or_portable()] {
                    let mut y = vec![f32::NAN; t * rows];
                    unsafe { m.rows_into(kernel, 0, rows, &x, t, y.as_mut_ptr(), rows) };
                    got.push(y);
                }
                for i in 0..t {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| wq[r * cols + c] as f64 * x[i * cols + c] as f64)
                            .sum();
                        for y in &got {
                            let d = (y[i * rows + r] as f64 - want).abs();
                            assert!(d < 1e-5, "{dtype:?} {rows}x{cols} t={t}: {d}");
                        }
                    }
                }
            }
        }
    }
}
