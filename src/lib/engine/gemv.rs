//! Matrices in their stored dtype and the products the engine needs: `y = W x` for one token
//! (GEMV) and for a tile of tokens (prefill), always accumulating in f32.
//!
//! Two kernel families compute the same thing: `Kernel::Avx2` (x86_64 AVX2 + FMA + F16C, chosen at
//! run time) and `Kernel::Portable`, plain Rust written with eight independent partial sums so the
//! compiler can vectorise it on any target. The portable one is the reference twin: a test asserts
//! they agree.
//!
//! Besides the float dtypes, a matrix may hold BitLinear's ternary weights, 2 bits each, times one
//! scale γ; its products take 8-bit activations (`Input::Q8`) and run in integer arithmetic
//! (`engine::ternary`, with its own kernels per ISA). Nothing outside these two files looks
//! inside a `Matrix`.

pub use super::kernel::Kernel;
use super::ternary::{self, QuantActs};
use std::any::Any;
use std::sync::Arc;

/// How a matrix's elements are stored. Products always compute in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    BF16,
    /// Trits packed 2 bits each (`engine::ternary`'s layout), times the matrix's scale.
    Ternary,
    /// Signed bytes times a scale per row (absmax/127): the optional 8-bit head.
    Q8,
}

impl WeightDtype {
    /// Bytes of one stored row of `cols` elements.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            WeightDtype::F32 => 4 * cols,
            WeightDtype::F16 | WeightDtype::BF16 => 2 * cols,
            WeightDtype::Ternary => ternary::padded(cols) / 4,
            WeightDtype::Q8 => cols,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::BF16 => "bf16",
            WeightDtype::Ternary => "ternary",
            WeightDtype::Q8 => "q8",
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

/// The right-hand side of a product: f32 rows for float matrices, 8-bit codes for ternary ones.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [f32]),
    Q8(&'a QuantActs),
}

/// Keeps the bytes a matrix points into alive: the checkpoint's memory map or an owned buffer.
type Keep = Arc<dyn Any + Send + Sync>;

/// A row-major `[rows, cols]` matrix whose elements live in a memory map or an owned buffer.
pub struct Matrix {
    rows: usize,
    cols: usize,
    dtype: WeightDtype,
    /// Multiplies every element (γ of ternary weights; 1 for a float matrix, an exact no-op).
    scale: f32,
    /// One more factor per row (Q8), or empty.
    row_scale: Vec<f32>,
    /// Start of row 0; aligned for the dtype; `rows` rows of `dtype.row_bytes(cols)`.
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
const K_Q8: u8 = 3;

/// Bytes per element of a kernel's dtype.
const fn esize(k: u8) -> usize {
    match k {
        K_F32 => 4,
        K_Q8 => 1,
        _ => 2,
    }
}

impl Rows {
    /// A finished dot product of row `r`, scaled.
    #[inline(always)]
    fn out(&self, r: usize, dot: f32) -> f32 {
        let v = dot * self.scale;
        if self.row_scale.is_null() {
            v
        } else {
            // SAFETY: a non-null `row_scale` has one entry per matrix row, and r < rows.
            v * unsafe { *self.row_scale.add(r) }
        }
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
        if matches!(dtype, WeightDtype::Ternary | WeightDtype::Q8) {
            return None;
        }
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.row_bytes(1));
        if !aligned || cfg!(target_endian = "big") || bytes.len() != rows * dtype.row_bytes(cols) {
            return None;
        }
        Some(Matrix {
            rows,
            cols,
            dtype,
            row_scale: Vec::new(),
            scale: 1.0,
            ptr: bytes.as_ptr(),
            _keep: keep,
        })
    }

    /// Moves the bytes of `matrices` into one fresh anonymous region that the kernel is asked to
    /// back with 2 MiB pages (transparent huge pages; `madvise` mode is the common default, so
    /// nothing gets them unasked). A decoded token streams every matrix once: over 4 KiB pages
    /// micro's 17–137 MB are 4,000–33,000 pages per token, far more than the TLB holds. On an x86
    /// host the page walks cost a plain single-thread read 10–30% of its bandwidth, and f32 and
    /// ternary decode 4–7%. Returns the region's length, or 0 where huge pages are refused (then
    /// nothing moved).
    #[cfg(target_os = "linux")]
    pub fn move_to_huge_pages(matrices: &mut [&mut Matrix]) -> std::io::Result<usize> {
        const HUGE: usize = 2 << 20;
        let size = |m: &Matrix| m.rows * m.dtype.row_bytes(m.cols);
        // Each matrix starts on a cache line (the dtype alignment the kernels need is ≤ 4).
        let offsets: Vec<usize> = matrices
            .iter()
            .scan(0usize, |end, m| {
                let at = end.next_multiple_of(64);
                *end = at + size(m);
                Some(at)
            })
            .collect();
        let len = match (offsets.last(), matrices.last()) {
            (Some(&at), Some(m)) => at + size(m),
            _ => return Ok(0),
        };
        // One huge page more, so the region can start on a 2 MiB boundary.
        let mut region = memmap2::MmapOptions::new().len(len + HUGE).map_anon()?;
        let pad = (HUGE - region.as_ptr() as usize % HUGE) % HUGE;
        if region
            .advise_range(memmap2::Advice::HugePage, pad, len)
            .is_err()
        {
            return Ok(0);
        }
        for (m, &at) in matrices.iter().zip(&offsets) {
            let n = size(m);
            // SAFETY: `ptr` addresses the matrix's n bytes (the struct's invariant).
            let src = unsafe { std::slice::from_raw_parts(m.ptr, n) };
            region[pad + at..pad + at + n].copy_from_slice(src);
        }
        let region = Arc::new(region.make_read_only()?);
        for (m, &at) in matrices.iter_mut().zip(&offsets) {
            // SAFETY: in bounds of the region, which the matrix now keeps alive, read-only.
            m.ptr = unsafe { region.as_ptr().add(pad + at) };
            m._keep = region.clone();
        }
        Ok(len)
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
            row_scale: Vec::new(),
            scale: 1.0,
            ptr,
            _keep: Arc::new(data),
        }
    }

    /// A BitLinear matrix: trits in {−1, 0, +1}, row-major, and the scale γ, packed 2 bits each.
    /// Its products take 8-bit activations.
    pub fn from_trits(rows: usize, cols: usize, trits: &[i8], gamma: f32) -> Matrix {
        let packed = ternary::pack(trits, rows, cols);
        Matrix {
            rows,
            cols,
            dtype: WeightDtype::Ternary,
            row_scale: Vec::new(),
            scale: gamma,
            ptr: packed.as_ptr(),
            _keep: Arc::new(packed),
        }
    }

    /// Ternary weights of a dense layer (a post-training packed file): the trits as f16, exact,
    /// times γ, so its products take f32 activations as the model's do.
    pub fn from_trits_dense(rows: usize, cols: usize, trits: &[i8], gamma: f32) -> Matrix {
        let vals = trits.iter().map(|&t| t as f32).collect();
        Matrix {
            scale: gamma,
            ..Matrix::from_f32_as(rows, cols, vals, WeightDtype::F16)
        }
    }

    /// An 8-bit matrix from f32 values: each row rounded to 255 levels of its absmax/127.
    pub fn from_f32_q8(rows: usize, cols: usize, data: &[f32]) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        let mut codes = vec![0i8; rows * cols];
        let row_scale = data
            .chunks_exact(cols.max(1))
            .zip(codes.chunks_exact_mut(cols.max(1)))
            .map(|(row, q)| crate::model::rows::quantize_act(row, q))
            .collect();
        Matrix {
            rows,
            cols,
            dtype: WeightDtype::Q8,
            scale: 1.0,
            row_scale,
            ptr: codes.as_ptr().cast(),
            _keep: Arc::new(codes),
        }
    }

    /// An owned matrix in a float `dtype`, rounded from f32 values (round to nearest even).
    pub fn from_f32_as(rows: usize, cols: usize, data: Vec<f32>, dtype: WeightDtype) -> Matrix {
        let bits: Vec<u16> = match dtype {
            WeightDtype::F32 => return Matrix::from_f32(rows, cols, data),
            WeightDtype::Ternary => panic!("ternary matrices are built with from_trits"),
            WeightDtype::Q8 => return Matrix::from_f32_q8(rows, cols, &data),
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
            row_scale: Vec::new(),
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

    /// Bytes of element storage (with Q8's row scales).
    pub fn bytes(&self) -> usize {
        self.rows * self.dtype.row_bytes(self.cols) + 4 * self.row_scale.len()
    }

    fn row_ptr(&self, r: usize) -> *const u8 {
        debug_assert!(r < self.rows);
        // SAFETY: r < rows, so the offset stays inside the matrix.
        unsafe { self.ptr.add(r * self.dtype.row_bytes(self.cols)) }
    }

    /// Row `r` converted to f32 (the embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols);
        let p = self.row_ptr(r);
        if self.dtype == WeightDtype::Ternary {
            // SAFETY: the row is `row_bytes(cols)` long.
            let row = unsafe { std::slice::from_raw_parts(p, self.dtype.row_bytes(self.cols)) };
            for (c, o) in out.iter_mut().enumerate() {
                *o = ternary::trit(row, c) as f32 * self.scale;
            }
            return;
        }
        let scale = self.scale * self.row_scale.get(r).copied().unwrap_or(1.0);
        for (c, o) in out.iter_mut().enumerate() {
            // SAFETY: c < cols.
            *o = unsafe { load1(self.dtype, p, c) } * scale;
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
    /// row `r` goes to `y[i·y_stride + r]`. A ternary matrix takes `Input::Q8`, a float one
    /// `Input::F32`.
    ///
    /// # Safety
    /// `y` must be valid for those writes, and no other thread may write them concurrently;
    /// `kernel` must be one this CPU supports (`Kernel::or_portable`).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_into(
        &self,
        kernel: Kernel,
        r0: usize,
        r1: usize,
        x: Input,
        t: usize,
        y: *mut f32,
        y_stride: usize,
    ) {
        assert!(r0 <= r1 && r1 <= self.rows);
        let x = match x {
            Input::Q8(acts) => {
                assert!(
                    self.dtype == WeightDtype::Ternary,
                    "8-bit input to a float matrix"
                );
                assert!(
                    acts.cols() == self.cols && acts.tokens() == t,
                    "input shape"
                );
                let call = ternary::Call {
                    w: self.ptr,
                    gamma: self.scale,
                    r0,
                    r1,
                    acts,
                    y,
                    y_stride,
                };
                // SAFETY: bounds asserted above; the caller vouches for `y`; the kernel is one
                // this CPU supports (`Kernel::or_portable`).
                unsafe { ternary::rows(kernel, &call) };
                return;
            }
            Input::F32(x) => x,
        };
        assert!(
            self.dtype != WeightDtype::Ternary,
            "f32 input to a ternary matrix"
        );
        assert!(x.len() >= t * self.cols);
        let args = Rows {
            w: self.ptr,
            scale: self.scale,
            row_scale: if self.row_scale.is_empty() {
                std::ptr::null()
            } else {
                self.row_scale.as_ptr()
            },
            cols: self.cols,
            r0,
            r1,
            x: x.as_ptr(),
            t,
            y,
            y_stride,
        };
        // SAFETY: bounds asserted above; the caller vouches for `y`; the AVX2 family is only
        // ever selected when the CPU has the features (`Kernel::or_portable`).
        unsafe {
            match (kernel.float_avx2(), self.dtype) {
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::F32) if t == 1 && kernel == Kernel::Avx512 => {
                    avx512::rows1::<K_F32>(&args)
                }
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::F16) if t == 1 && kernel == Kernel::Avx512 => {
                    avx512::rows1::<K_F16>(&args)
                }
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::BF16) if t == 1 && kernel == Kernel::Avx512 => {
                    avx512::rows1::<K_BF16>(&args)
                }
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::Q8) if t == 1 && kernel == Kernel::Avx512 => {
                    avx512::rows1::<K_Q8>(&args)
                }
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::F32) => avx2::rows::<K_F32>(&args),
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::F16) => avx2::rows::<K_F16>(&args),
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::BF16) => avx2::rows::<K_BF16>(&args),
                #[cfg(target_arch = "x86_64")]
                (true, WeightDtype::Q8) => avx2::rows::<K_Q8>(&args),
                (_, WeightDtype::F32) => portable::rows::<K_F32>(&args),
                (_, WeightDtype::F16) => portable::rows::<K_F16>(&args),
                (_, WeightDtype::BF16) => portable::rows::<K_BF16>(&args),
                (_, WeightDtype::Q8) => portable::rows::<K_Q8>(&args),
                (_, WeightDtype::Ternary) => unreachable!("checked above"),
            }
        }
    }

    /// `y = W x` for one vector, single-threaded (on the portable kernel if this CPU lacks
    /// `kernel`).
    pub fn gemv(&self, kernel: Kernel, x: Input, y: &mut [f32]) {
        assert_eq!(y.len(), self.rows);
        let kernel = kernel.or_portable();
        // SAFETY: y is exclusively borrowed and has `rows` elements; the kernel is supported.
        unsafe { self.rows_into(kernel, 0, self.rows, x, 1, y.as_mut_ptr(), self.rows) }
    }
}

/// One call's arguments, shared by both kernel families.
struct Rows {
    w: *const u8,
    /// Applied to each finished dot product.
    scale: f32,
    /// Row `r`'s extra factor at `row_scale[r]`, or null.
    row_scale: *const f32,
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
            WeightDtype::Q8 => *p.cast::<i8>().add(i) as f32,
            WeightDtype::Ternary => unreachable!("ternary rows are unpacked by engine::ternary"),
        }
    }
}

#[inline(always)]
unsafe fn load1k<const K: u8>(p: *const u8, i: usize) -> f32 {
    let dtype = match K {
        K_F32 => WeightDtype::F32,
        K_F16 => WeightDtype::F16,
        K_Q8 => WeightDtype::Q8,
        _ => WeightDtype::BF16,
    };
    unsafe { load1(dtype, p, i) }
}

/// How far ahead of its loads a one-token product asks for weights (`_mm_prefetch`), in bytes of
/// each row stream. A token reads every matrix once, in order, and the hardware prefetcher
/// stops at each 4 KiB page; measured on an x86 host (micro, one thread), 2–8 KiB ahead made f32
/// decode about 12% and f16 decode 40–70% faster than none. Past a matrix's end it is harmless (a
/// prefetch never faults, hence `wrapping_add`).
#[cfg(target_arch = "x86_64")]
pub(super) const PREFETCH: usize = 4096;

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
                    *a.y.add(i * a.y_stride + r) = a.out(r, dot::<K>(w, x));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{K_BF16, K_F16, K_F32, K_Q8, PREFETCH, Rows, esize, load1k};
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
                K_Q8 => _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
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

    /// One row times one vector: four accumulators hide the FMA latency; memory-bound anyway,
    /// so the weights `PREFETCH` bytes ahead are requested while these are summed.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot<const K: u8>(w: *const u8, x: *const f32, n: usize) -> f32 {
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                let b = w.wrapping_add(i * esize(K) + PREFETCH);
                for l in 0..(32 * esize(K)).div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(64 * l).cast());
                }
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
    unsafe fn dot_tile2<const K: u8, const T: usize, const PF: bool>(
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
            // The next pair of rows (w0 + 2·row, w1 + 2·row): prefetched while this pair's first
            // tile runs, since the hardware prefetcher does not follow two interleaved streams
            // that jump rows (prefetching past the matrix is harmless, hence `wrapping_add`).
            let rb = w1 as usize - w0 as usize;
            while i + 8 <= n {
                if PF {
                    let o = 2 * rb + i * esize(K);
                    _mm_prefetch::<_MM_HINT_T0>(w0.wrapping_add(o).cast());
                    _mm_prefetch::<_MM_HINT_T0>(w1.wrapping_add(o).cast());
                }
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
    unsafe fn tile2<const K: u8, const T: usize, const PF: bool>(
        a: &Rows,
        w: *const u8,
        rb: usize,
        r: usize,
        i0: usize,
    ) {
        unsafe {
            let out = dot_tile2::<K, T, PF>(w, w.add(rb), a.x.add(i0 * a.cols), a.cols, a.cols);
            for (dr, row) in out.iter().enumerate() {
                for (t, v) in row.iter().enumerate() {
                    *a.y.add((i0 + t) * a.y_stride + r + dr) = a.out(r + dr, *v);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const K: u8, const T: usize>(a: &Rows, w: *const u8, r: usize, i0: usize) {
        unsafe {
            let out = dot_tile::<K, T>(w, a.x.add(i0 * a.cols), a.cols, a.cols);
            for (t, v) in out.iter().enumerate() {
                *a.y.add((i0 + t) * a.y_stride + r) = a.out(r, *v);
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
                    if i + TILE2 <= a.t {
                        tile2::<K, TILE2, true>(a, w, rb, r, i);
                        i += TILE2;
                    }
                    while i + TILE2 <= a.t {
                        tile2::<K, TILE2, false>(a, w, rb, r, i);
                        i += TILE2;
                    }
                    // The last t mod 6 tokens in one tile: one token at a time would leave a
                    // single accumulator per row waiting on the FMA latency.
                    match a.t - i {
                        0 => {}
                        1 => tile2::<K, 1, false>(a, w, rb, r, i),
                        2 => tile2::<K, 2, false>(a, w, rb, r, i),
                        3 => tile2::<K, 3, false>(a, w, rb, r, i),
                        4 => tile2::<K, 4, false>(a, w, rb, r, i),
                        _ => tile2::<K, 5, false>(a, w, rb, r, i),
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
                    *a.y.add(r) = a.out(r, dot::<K>(w, a.x, a.cols));
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

/// One token on AVX-512 (decode): four rows at a time against one load of the input, 16 lanes
/// per load. A micro model's head (16,384 rows of 8-bit codes) is bound by the widening
/// conversions, not by memory, and 16 lanes halve them; the LoRA rows are short (64 columns),
/// so their four horizontal sums share one reduction tree.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{K_BF16, K_F16, K_F32, K_Q8, PREFETCH, Rows, esize, load1k};
    use std::arch::x86_64::*;

    /// Sixteen consecutive elements as f32.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load16<const K: u8>(p: *const u8, i: usize) -> __m512 {
        unsafe {
            match K {
                K_F32 => _mm512_loadu_ps(p.cast::<f32>().add(i)),
                K_F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<u16>().add(i).cast())),
                K_Q8 => _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    p.cast::<i8>().add(i).cast(),
                ))),
                _ => {
                    debug_assert_eq!(K, K_BF16);
                    let h =
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast::<u16>().add(i).cast()));
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
                }
            }
        }
    }

    /// The sums of four accumulators' lanes, in order.
    #[target_feature(enable = "avx512f,avx2")]
    #[inline]
    fn hsum4(a: [__m512; 4]) -> [f32; 4] {
        let q = a.map(|v| {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let h = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
            _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
        });
        let s = _mm_hadd_ps(_mm_hadd_ps(q[0], q[1]), _mm_hadd_ps(q[2], q[3]));
        let mut out = [0f32; 4];
        // SAFETY: four f32 fit in `out`.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        out
    }

    /// Rows `r..r + N` (N ≤ 4) times the one input vector.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const K: u8, const N: usize>(a: &Rows, r: usize) {
        let rb = a.cols * esize(K);
        let full = a.cols / 16 * 16;
        let mut acc = [_mm512_setzero_ps(); 4];
        // SAFETY: r + N ≤ r1 ≤ rows and the input holds `cols` values (checked by the caller).
        unsafe {
            let w = a.w.add(r * rb);
            let mut i = 0;
            while i < full {
                // Rows r..r+N are one contiguous stream: a line each, PREFETCH bytes on.
                if (i * esize(K)).is_multiple_of(64) {
                    for j in 0..N {
                        let p = w.wrapping_add(j * rb + i * esize(K) + PREFETCH);
                        _mm_prefetch::<_MM_HINT_T0>(p.cast());
                    }
                }
                let x = _mm512_loadu_ps(a.x.add(i));
                for (j, acc) in acc.iter_mut().enumerate().take(N) {
                    *acc = _mm512_fmadd_ps(load16::<K>(w.add(j * rb), i), x, *acc);
                }
                i += 16;
            }
            let sums = hsum4(acc);
            for (j, &s) in sums.iter().enumerate().take(N) {
                let mut s = s;
                for c in full..a.cols {
                    s += load1k::<K>(w.add(j * rb), c) * *a.x.add(c);
                }
                *a.y.add(r + j) = a.out(r + j, s);
            }
        }
    }

    /// Rows `r0..r1` of `y = W x` for one token (`a.t == 1`).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn rows1<const K: u8>(a: &Rows) {
        debug_assert_eq!(a.t, 1);
        let mut r = a.r0;
        // SAFETY: every block stays inside r0..r1 (the caller's bounds).
        unsafe {
            while r + 4 <= a.r1 {
                block::<K, 4>(a, r);
                r += 4;
            }
            match a.r1 - r {
                0 => {}
                1 => block::<K, 1>(a, r),
                2 => block::<K, 2>(a, r),
                _ => block::<K, 3>(a, r),
            }
        }
    }
}
