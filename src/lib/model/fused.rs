//! Fused CPU operators for training, each a candle custom op with a hand-written backward, and
//! each with a composed twin (`*_reference`, plain candle ops) that the tests hold it to, forward
//! and backward.
//!
//! Why: candle runs every elementwise op as its own pass with a fresh buffer, and its backward
//! adds every gradient into a fresh zero tensor, so a chain of small ops costs several memory
//! passes per op. One op per chain, with its rows split over rayon, does the same work in one or
//! two passes.
//!
//! * [`norm`]: LayerNorm (one group) or GroupNorm (`ln_x`: a group per head), with weight and
//!   bias (candle's fused layer norm has no backward).
//! * [`token_mix`]: the token shift and lerp `x + (prev − x) ⊙ μ`.
//! * [`linear`]: `x Wᵀ` with W `[out, in]` as stored, without a transpose node, whose backward
//!   would add a strided copy of every weight gradient.
//! * [`relu_sq`]: ChannelMix's `relu(x)²`.
//! * [`cross_entropy`] on logits, and [`head_cross_entropy`], the head matmul fused with the
//!   loss: its forward turns the logits in place into `softmax − onehot`, which is all the
//!   backward needs, so the `[B·T, V]` logits never become graph nodes.
//!
//! Parallel loops split rows into tasks of a size fixed by the shape alone, and reductions add
//! the tasks' partial sums in task order, so results do not depend on the thread count.
//! [`Kernels`] chooses between the fused ops and the twins; the twins are also the fallback off
//! the CPU or for other dtypes.

pub(crate) use super::rows::{dot, exp_approx, moments, sum};
use super::rows::{gpu_norm_supported, norm_group, prev_row, shift_mix_rows};
use crate::error::{Error, Result};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------------------------

/// The f32 elements a contiguous layout covers.
pub(crate) fn cpu_slice<'a>(
    cpu: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} is not contiguous; call .contiguous() first")
    };
    Ok(&cpu.as_slice::<f32>()?[lo..hi])
}

/// Like [`cpu_slice`], for a storage that must be on the CPU.
pub(crate) fn storage_slice<'a>(
    st: &'a Storage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(cpu) = st else {
        candle_core::bail!("{op}: {what} is not on the CPU; only a CPU kernel exists")
    };
    cpu_slice(cpu, l, op, what)
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor.
pub(crate) fn with_slice<R>(
    t: &Tensor,
    op: &str,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    f(storage_slice(&st, l, op, what)?)
}

/// A matrix in a slice: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix at the start of `data`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(
            data.len() >= rows * cols,
            "matrix of {rows}×{cols} in {} elements",
            data.len()
        );
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The transpose (a view).
    pub(crate) fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `beta · a·b` in a new row-major vector (written once, not zeroed first).
pub(crate) fn gemm_new(a: Mat, b: Mat, beta: f32) -> Vec<f32> {
    let len = a.rows * b.cols;
    let mut out = Vec::with_capacity(len);
    // SAFETY: the capacity holds a.rows × b.cols elements; gemm without accumulation writes every
    // one of them (or the zero fill does, for an empty inner size) before the length is set.
    unsafe {
        gemm_raw(out.as_mut_ptr(), a, b, beta, false);
        out.set_len(len);
    }
    out
}

/// `dst = beta · a·b`, or `dst += beta · a·b` when `accumulate`; `dst` is row-major
/// `a.rows × b.cols`.
pub(crate) fn gemm_into(dst: &mut [f32], a: Mat, b: Mat, beta: f32, accumulate: bool) {
    assert_eq!(dst.len(), a.rows * b.cols, "gemm: destination size");
    // SAFETY: dst is an exclusive borrow of exactly a.rows × b.cols elements.
    unsafe { gemm_raw(dst.as_mut_ptr(), a, b, beta, accumulate) }
}

/// # Safety
/// `dst` is valid for writes (and, when `accumulate`, reads) of `a.rows × b.cols` elements that
/// nothing else accesses meanwhile.
unsafe fn gemm_raw(dst: *mut f32, a: Mat, b: Mat, beta: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner sizes {k} and {} differ", b.rows);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: the caller's contract.
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
        }
        return;
    }
    // The last element each view reads must lie inside its slice (gemm takes raw pointers).
    for x in [a, b] {
        assert!(
            (x.rows - 1) * x.rs + (x.cols - 1) * x.cs < x.data.len(),
            "gemm: matrix view out of bounds"
        );
    }
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the views lie inside their slices (checked above), dst is the caller's, and it
    // cannot overlap a or b (shared borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// A vector of `count` planes of `len` elements, each written whole by a GEMM or a copy before
/// the vector is handed out: no zero fill first (these are the biggest buffers of a block).
pub(crate) struct Planes {
    buf: Vec<f32>,
    len: usize,
    written: Vec<bool>,
}

impl Planes {
    pub(crate) fn new(count: usize, len: usize) -> Planes {
        Planes {
            buf: Vec::with_capacity(count * len),
            len,
            written: vec![false; count],
        }
    }

    /// Plane `q` = `beta · a·b`.
    pub(crate) fn gemm(&mut self, q: usize, a: Mat, b: Mat, beta: f32) {
        assert!(
            q < self.written.len(),
            "plane {q} of {}",
            self.written.len()
        );
        assert_eq!(a.rows * b.cols, self.len, "gemm: plane size");
        // SAFETY: plane q lies inside the capacity; gemm without accumulation writes all of its
        // a.rows × b.cols elements (zeros for an empty inner size) and reads none of them.
        unsafe { gemm_raw(self.buf.as_mut_ptr().add(q * self.len), a, b, beta, false) };
        self.written[q] = true;
    }

    /// Plane `q` = `src`.
    pub(crate) fn copy(&mut self, q: usize, src: &[f32]) {
        assert!(
            q < self.written.len(),
            "plane {q} of {}",
            self.written.len()
        );
        assert_eq!(src.len(), self.len, "copy: plane size");
        let dst = &mut self.buf.spare_capacity_mut()[q * self.len..(q + 1) * self.len];
        for (d, &x) in dst.iter_mut().zip(src) {
            d.write(x);
        }
        self.written[q] = true;
    }

    /// The planes, end to end. Panics when one was not written.
    pub(crate) fn finish(mut self) -> Vec<f32> {
        assert!(self.written.iter().all(|&w| w), "a plane was not written");
        // SAFETY: every plane, hence every element up to the length, was written (checked).
        unsafe { self.buf.set_len(self.written.len() * self.len) };
        self.buf
    }
}

/// Rows per parallel task for `rows` rows of `row_len` elements: about 64 KiB of a row-wise
/// tensor per task, and a function of the shape only (see the module docs).
pub(crate) fn rows_per_task(rows: usize, row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).clamp(1, rows.max(1))
}

/// Calls `f(first_row, chunk)` on consecutive chunks of `out` of `rows_per_task` rows each, in
/// parallel, and returns what each call returned, in row order.
pub(crate) fn par_rows<T: Send>(
    out: &mut [f32],
    row_len: usize,
    f: impl Fn(usize, &mut [f32]) -> T + Sync + Send,
) -> Vec<T> {
    let rows = out.len() / row_len.max(1);
    let per = rows_per_task(rows, row_len);
    if rows <= per {
        return vec![f(0, out)];
    }
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .map(|(i, chunk)| f(i * per, chunk))
        .collect()
}

/// [`par_rows`] over `K` planes of the same shape laid end to end in `planes`: `f(first_row,
/// [the task's rows of each plane])`.
pub(crate) fn par_rows_planes<const K: usize, T: Send>(
    planes: &mut [f32],
    row_len: usize,
    f: impl Fn(usize, &mut [&mut [f32]; K]) -> T + Sync + Send,
) -> Vec<T> {
    let plane_len = planes.len() / K;
    let rows = plane_len / row_len.max(1);
    let per = rows_per_task(rows, row_len);
    let mut columns: Vec<_> = planes
        .chunks_exact_mut(plane_len.max(1))
        .map(|p| {
            p.chunks_mut(per * row_len.max(1))
                .collect::<Vec<_>>()
                .into_iter()
        })
        .collect();
    // Cannot fail: the K planes have the same length, so each yields rows.div_ceil(per) chunks.
    let tasks: Vec<[&mut [f32]; K]> = (0..rows.div_ceil(per))
        .map(|_| std::array::from_fn(|k| columns[k].next().expect("equal planes")))
        .collect();
    tasks
        .into_par_iter()
        .enumerate()
        .map(|(i, mut chunks)| f(i * per, &mut chunks))
        .collect()
}

/// Elements per task of the elementwise helpers below (64 KiB of f32).
const PAR_CHUNK: usize = 16 * 1024;

/// `len` zeros written by the rayon pool. On a warm heap `vec![0; len]` is one long memset on
/// the calling thread while the pool waits; this splits it (and the page faults of fresh memory).
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    if len <= PAR_CHUNK {
        return vec![0f32; len];
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(PAR_CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the loop above initialised the first `len` elements of the capacity.
    unsafe { v.set_len(len) };
    v
}

/// `f` of each element of `x`, into a new vector, by the rayon pool.
pub(crate) fn map_new(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    let len = x.len();
    if len <= PAR_CHUNK {
        return x.iter().map(|&v| f(v)).collect();
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                d.write(f(s));
            }
        });
    // SAFETY: the loop above initialised the first `len` elements of the capacity.
    unsafe { v.set_len(len) };
    v
}

/// `dst.copy_from_slice(src)` by the rayon pool.
pub(crate) fn par_copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "par_copy: sizes differ");
    if dst.len() <= PAR_CHUNK {
        return dst.copy_from_slice(src);
    }
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Adds the partial sums of the tasks, in task order.
pub(crate) fn sum_partials(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut acc = vec![0f32; len];
    for p in parts {
        for (a, x) in acc.iter_mut().zip(p) {
            *a += x;
        }
    }
    acc
}

pub(crate) fn op_err(op: &str, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {msg}"))
}

/// Whether the fused kernels can run on these tensors (CPU, f32).
pub(crate) fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The tensor's data as a contiguous tensor (a no-op when it already is one).
fn contig(t: &Tensor) -> Result<Tensor> {
    Ok(t.contiguous()?)
}

// ---------------------------------------------------------------------------------------------
// Norm: LayerNorm and GroupNorm with weight and bias
// ---------------------------------------------------------------------------------------------

/// [`norm`] on slices: rows of `w.len()` channels, groups of `group`.
pub(crate) fn norm_rows(x: &[f32], w: &[f32], b: &[f32], group: usize, eps: f32) -> Vec<f32> {
    let (c, g) = (w.len(), group);
    let mut y = zeros(x.len());
    par_rows(&mut y, c, |row0, ys| {
        let xs = &x[row0 * c..][..ys.len()];
        for ((xg, yg), (wg, bg)) in xs
            .chunks_exact(g)
            .zip(ys.chunks_exact_mut(g))
            .zip(w.chunks_exact(g).cycle().zip(b.chunks_exact(g).cycle()))
        {
            norm_group(xg, wg, bg, eps, yg);
        }
    });
    y
}

/// The backward of [`norm_rows`]: `dx` and `[dw | db]`.
pub(crate) fn norm_rows_backward(
    xs: &[f32],
    ws: &[f32],
    dys: &[f32],
    group: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (c, g) = (ws.len(), group);
    let mut dx = zeros(xs.len());
    let parts = par_rows(&mut dx, c, |row0, dxs| {
        // [dw | db] of these rows.
        let mut part = vec![0f32; 2 * c];
        let (pw, pb) = part.split_at_mut(c);
        let xs = &xs[row0 * c..][..dxs.len()];
        let dys = &dys[row0 * c..][..dxs.len()];
        for (r, dxr) in dxs.chunks_exact_mut(c).enumerate() {
            let (xr, dyr) = (&xs[r * c..][..c], &dys[r * c..][..c]);
            for o in (0..c).step_by(g) {
                let (xg, dyg) = (&xr[o..o + g], &dyr[o..o + g]);
                let (mean, rstd) = moments(xg, eps);
                let (mut mg, mut mgx) = (0f32, 0f32);
                for i in 0..g {
                    let xhat = (xg[i] - mean) * rstd;
                    let gi = dyg[i] * ws[o + i];
                    mg += gi;
                    mgx += gi * xhat;
                    pw[o + i] += dyg[i] * xhat;
                    pb[o + i] += dyg[i];
                }
                let (mg, mgx) = (mg / g as f32, mgx / g as f32);
                for i in 0..g {
                    let xhat = (xg[i] - mean) * rstd;
                    dxr[o + i] = rstd * (dyg[i] * ws[o + i] - mg - xhat * mgx);
                }
            }
        }
        part
    });
    (dx, sum_partials(parts, 2 * c))
}

struct NormOp {
    group: usize,
    eps: f32,
}

impl NormOp {
    const NAME: &'static str = "norm";

    /// Channels per row, checking that w and b have that many and the groups divide them.
    fn channels(&self, x: usize, w: usize, b: usize) -> candle_core::Result<usize> {
        if w != b || w == 0 || x % w != 0 || w % self.group != 0 {
            return Err(op_err(
                Self::NAME,
                format!(
                    "{x} inputs, {w} weights, {b} biases, groups of {}: the sizes do not fit",
                    self.group
                ),
            ));
        }
        Ok(w)
    }
}

impl CustomOp3 for NormOp {
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
        let x = cpu_slice(s1, l1, Self::NAME, "x")?;
        let w = cpu_slice(s2, l2, Self::NAME, "weight")?;
        let b = cpu_slice(s3, l3, Self::NAME, "bias")?;
        self.channels(x.len(), w.len(), b.len())?;
        let y = norm_rows(x, w, b, self.group, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::norm_forward(s1, l1, s2, l2, s3, l3, self.group, self.eps)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (c, g) = (w.elem_count(), self.group);
        self.channels(x.elem_count(), c, b.elem_count())?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let n = x.elem_count();
            let (group, eps) = (self.group, self.eps);
            let out = crate::cuda::gpu_op3(
                "norm_backward",
                [x, w, &dy],
                |[(x, lx), (w, lw), (dy, ld)]| {
                    let out = crate::cuda::norm_backward(x, lx, w, lw, dy, ld, group, eps)?;
                    Ok((
                        out,
                        Shape::from(lx.shape().elem_count() + 2 * lw.shape().elem_count()),
                    ))
                },
            )?;
            return Ok((
                Some(out.narrow(0, 0, n)?.reshape(x.shape())?),
                Some(out.narrow(0, n, c)?.reshape(w.shape())?),
                Some(out.narrow(0, n + c, c)?.reshape(b.shape())?),
            ));
        }
        let (dx, dwb) = with_slice(x, Self::NAME, "x", |xs| {
            with_slice(w, Self::NAME, "weight", |ws| {
                with_slice(&dy, Self::NAME, "output gradient", |dys| {
                    Ok(norm_rows_backward(xs, ws, dys, g, self.eps))
                })
            })
        })?;
        let dev = x.device();
        let dw = Tensor::from_slice(&dwb[..c], w.shape(), dev)?;
        let db = Tensor::from_slice(&dwb[c..], b.shape(), dev)?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(dw),
            Some(db),
        ))
    }
}

/// 0: not read yet, 1: off, 2: on.
static CUDA_FUSED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the model runs the CUDA twins of the fused ops on the GPU (norm, token mix, relu²,
/// cross-entropy, TimeMix's scan-input preparation, `kernels/fused.cu`) instead of candle's
/// composed ops. Off unless `TINYBIT_CUDA_FUSED=1`: they were written in a session whose GPU
/// time ran out before they ran on a GPU, so they stay opt-in until `scripts/gpu_check.sh` has
/// passed their twin tests on one (the WKV, AdamW and gradient-norm kernels have).
pub fn cuda_fused() -> bool {
    use std::sync::atomic::Ordering;
    match CUDA_FUSED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("TINYBIT_CUDA_FUSED").is_ok_and(|v| v == "1");
            CUDA_FUSED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        v => v == 2,
    }
}

/// Turns [`cuda_fused`] on or off for this process (benchmarks).
pub fn set_cuda_fused(on: bool) {
    CUDA_FUSED.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
}

/// Normalises each group of `group` consecutive channels of the last axis (mean 0, biased
/// variance 1, `eps` added to the variance), then `· w + b` per channel. `w`, `b`: `C` elements
/// (any shape), C = the last axis, a multiple of `group`. LayerNorm is `group = C`.
pub fn norm(x: &Tensor, w: &Tensor, b: &Tensor, group: usize, eps: f64) -> Result<Tensor> {
    Ok(contig(x)?.apply_op3(
        &contig(w)?,
        &contig(b)?,
        NormOp {
            group,
            eps: eps as f32,
        },
    )?)
}

/// [`norm`] composed of candle ops.
pub fn norm_reference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    group: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let c = *dims.last().ok_or_else(|| Error::data("norm of a scalar"))?;
    let mut grouped = dims.clone();
    // Cannot fail: `dims` has a last axis (checked just above).
    *grouped.last_mut().unwrap() = c / group;
    grouped.push(group);
    let xg = x.reshape(grouped)?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims)?;
    Ok(xn
        .broadcast_mul(&w.flatten_all()?)?
        .broadcast_add(&b.flatten_all()?)?)
}

// ---------------------------------------------------------------------------------------------
// Token shift + lerp
// ---------------------------------------------------------------------------------------------

/// `x + (p − x) ⊙ μ` for rows of `[B·T, C]`, `p` the previous row in the same sequence or
/// `prev[b]` for the first.
struct MixOp {
    t: usize,
}

impl MixOp {
    const NAME: &'static str = "token_mix";

    /// (B, C), checking the sizes.
    fn dims(&self, x: usize, prev: usize, mu: usize) -> candle_core::Result<(usize, usize)> {
        let c = mu;
        if c == 0 || self.t == 0 || prev % c != 0 || x != prev * self.t {
            return Err(op_err(
                Self::NAME,
                format!(
                    "x has {x} elements, prev {prev}, mu {mu}, T = {}: not [B,T,C], [B,C], [C]",
                    self.t
                ),
            ));
        }
        Ok((prev / c, c))
    }
}

impl CustomOp3 for MixOp {
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
        let x = cpu_slice(s1, l1, Self::NAME, "x")?;
        let prev = cpu_slice(s2, l2, Self::NAME, "prev")?;
        let mu = cpu_slice(s3, l3, Self::NAME, "mu")?;
        let (_, c) = self.dims(x.len(), prev.len(), mu.len())?;
        let t = self.t;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, c, |row0, ys| {
            shift_mix_rows(x, prev, mu, t, row0, ys)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::mix_forward(s1, l1, s2, l2, s3, l3, self.t)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        prev: &Tensor,
        mu: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (nb, c) = self.dims(x.elem_count(), prev.elem_count(), mu.elem_count())?;
        let t = self.t;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (n, np) = (x.elem_count(), prev.elem_count());
            // μ is read inside (custom ops take at most three tensors).
            let out = crate::cuda::gpu_op3(
                "mix_backward",
                [x, prev, &dy],
                |[(x, lx), (p, lp), (dy, ld)]| {
                    let (ms, lm) = mu.storage_and_layout();
                    let candle_core::Storage::Cuda(m) = &*ms else {
                        candle_core::bail!("mix_backward: mu is not on the GPU")
                    };
                    let out = crate::cuda::mix_backward(x, lx, p, lp, m, lm, dy, ld, t)?;
                    let n =
                        lx.shape().elem_count() + lp.shape().elem_count() + lm.shape().elem_count();
                    Ok((out, Shape::from(n)))
                },
            )?;
            return Ok((
                Some(out.narrow(0, 0, n)?.reshape(x.shape())?),
                Some(out.narrow(0, n, np)?.reshape(prev.shape())?),
                Some(out.narrow(0, n + np, c)?.reshape(mu.shape())?),
            ));
        }
        let (dx, dprev, dmu) = with_slice(x, Self::NAME, "x", |xs| {
            with_slice(prev, Self::NAME, "prev", |ps| {
                with_slice(mu, Self::NAME, "mu", |mus| {
                    with_slice(&dy, Self::NAME, "output gradient", |dys| {
                        let mut dx = vec![0f32; xs.len()];
                        let parts = par_rows(&mut dx, c, |row0, dxs| {
                            let mut dmu = vec![0f32; c];
                            for (i, dxr) in dxs.chunks_exact_mut(c).enumerate() {
                                let r = row0 + i;
                                let (xr, pr) = (&xs[r * c..][..c], prev_row(xs, ps, r, t, c));
                                let dyr = &dys[r * c..][..c];
                                // Row r is also the previous token of row r + 1.
                                let next = (r % t + 1 < t).then(|| &dys[(r + 1) * c..][..c]);
                                for j in 0..c {
                                    dxr[j] = dyr[j] * (1.0 - mus[j]);
                                    dmu[j] += dyr[j] * (pr[j] - xr[j]);
                                }
                                if let Some(dn) = next {
                                    for j in 0..c {
                                        dxr[j] += dn[j] * mus[j];
                                    }
                                }
                            }
                            dmu
                        });
                        let mut dprev = vec![0f32; nb * c];
                        for (b, dp) in dprev.chunks_exact_mut(c).enumerate() {
                            let dyr = &dys[b * t * c..][..c];
                            for j in 0..c {
                                dp[j] = dyr[j] * mus[j];
                            }
                        }
                        Ok((dx, dprev, sum_partials(parts, c)))
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dprev, prev.shape(), dev)?),
            Some(Tensor::from_vec(dmu, mu.shape(), dev)?),
        ))
    }
}

/// Token shift and lerp: `x + (p − x) ⊙ μ` where `p` is the previous token's row (`prev[b]` for
/// the first of each sequence). `x`: `[B·T, C]` (or `[B,T,C]`), `prev`: `[B, C]`, `mu`: `C`
/// elements. μ = 0 keeps the current token, μ = 1 takes the previous one.
pub fn token_mix(x: &Tensor, prev: &Tensor, mu: &Tensor, t: usize) -> Result<Tensor> {
    Ok(contig(x)?.apply_op3(&contig(prev)?, &contig(mu)?, MixOp { t })?)
}

/// [`token_mix`] composed of candle ops.
pub fn token_mix_reference(x: &Tensor, prev: &Tensor, mu: &Tensor, t: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = prev.dims2()?;
    let x3 = x.reshape((b, t, c))?;
    let shifted = if t == 1 {
        prev.unsqueeze(1)?
    } else {
        Tensor::cat(&[&prev.unsqueeze(1)?, &x3.narrow(1, 0, t - 1)?], 1)?
    };
    let d = (shifted - &x3)?;
    Ok((&x3 + d.broadcast_mul(&mu.flatten_all()?)?)?.reshape(dims)?)
}

// ---------------------------------------------------------------------------------------------
// Linear
// ---------------------------------------------------------------------------------------------

/// `x [.., in] · Wᵀ`, W `[out, in]`.
struct LinearOp;

impl LinearOp {
    const NAME: &'static str = "linear";

    /// (rows, in, out).
    fn dims(x: &Shape, w: &Shape) -> candle_core::Result<(usize, usize, usize)> {
        let (n, k) = w.dims2()?;
        let kx = *x.dims().last().unwrap_or(&0);
        if kx != k || x.rank() < 1 {
            return Err(op_err(
                Self::NAME,
                format!("x {x:?} does not match weight {w:?} ([out, in])"),
            ));
        }
        Ok((x.elem_count() / k.max(1), k, n))
    }
}

fn out_shape(x: &Shape, n: usize) -> Shape {
    let mut d = x.dims().to_vec();
    // Cannot fail: the op's shape check refused inputs of rank 0 before the output shape is asked.
    *d.last_mut().unwrap() = n;
    Shape::from(d)
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = Self::dims(l1.shape(), l2.shape())?;
        let x = cpu_slice(s1, l1, Self::NAME, "x")?;
        let w = cpu_slice(s2, l2, Self::NAME, "weight")?;
        let y = gemm_new(Mat::new(x, m, k), Mat::new(w, n, k).t(), 1.0);
        Ok((CpuStorage::F32(y), out_shape(l1.shape(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k, n) = Self::dims(x.shape(), w.shape())?;
        let dy = dy.contiguous()?;
        let (dx, dw) = with_slice(x, Self::NAME, "x", |xs| {
            with_slice(w, Self::NAME, "weight", |ws| {
                with_slice(&dy, Self::NAME, "output gradient", |dys| {
                    let dyv = Mat::new(dys, m, n);
                    let dx = gemm_new(dyv, Mat::new(ws, n, k), 1.0);
                    let dw = gemm_new(dyv.t(), Mat::new(xs, m, k), 1.0);
                    Ok((dx, dw))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

/// `x [.., in] → [.., out]`: `x Wᵀ` for a weight stored `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(contig(x)?.apply_op2(&contig(w)?, LinearOp)?)
}

/// [`linear`] composed of candle ops.
pub fn linear_reference(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims
        .last()
        .ok_or_else(|| Error::data("linear of a scalar"))?;
    let rows = x.elem_count() / k.max(1);
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut out = dims;
    // Cannot fail: `dims` has a last axis (checked just above).
    *out.last_mut().unwrap() = w.dim(0)?;
    Ok(y.reshape(out)?)
}

// ---------------------------------------------------------------------------------------------
// relu²
// ---------------------------------------------------------------------------------------------

struct ReluSqOp;

impl CustomOp1 for ReluSqOp {
    fn name(&self) -> &'static str {
        "relu_sq"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, "relu_sq", "x")?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, 1, |i0, ys| {
            for (y, &x) in ys.iter_mut().zip(&x[i0..]) {
                *y = super::rows::relu_sq(x);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::relu_sq(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if x.device().is_cuda() {
            // 2·relu(x)·dy, three candle kernels (the composed twin's backward takes more).
            return Ok(Some((x.relu()?.affine(2.0, 0.0)? * dy)?));
        }
        let dy = dy.contiguous()?;
        let dx = with_slice(x, "relu_sq", "x", |xs| {
            with_slice(&dy, "relu_sq", "output gradient", |dys| {
                let mut dx = vec![0f32; xs.len()];
                par_rows(&mut dx, 1, |i0, dxs| {
                    for ((d, &x), &g) in dxs.iter_mut().zip(&xs[i0..]).zip(&dys[i0..]) {
                        *d = 2.0 * x.max(0.0) * g;
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `relu(x)²`, elementwise.
pub fn relu_sq(x: &Tensor) -> Result<Tensor> {
    Ok(contig(x)?.apply_op1(ReluSqOp)?)
}

/// [`relu_sq`] composed of candle ops.
pub fn relu_sq_reference(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?.sqr()?)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// Turns one row of logits into `(softmax − onehot(target)) · scale` in place and returns
/// `−log softmax[target]`. `scale = 0` (a masked row) zeroes the row.
#[inline(always)]
fn xent_row_generic(row: &mut [f32], target: usize, scale: f32) -> f32 {
    let logit = row[target];
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for l in 0..8 {
            m[l] = m[l].max(c[l]);
        }
    }
    max = m.iter().fold(max, |a, &b| a.max(b));
    for v in row.iter_mut() {
        *v = exp_approx(*v - max);
    }
    let total = sum(row);
    let nll = max + total.ln() - logit;
    let s = scale / total;
    for v in row.iter_mut() {
        *v *= s;
    }
    row[target] -= scale;
    nll
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn xent_row_avx2(row: &mut [f32], target: usize, scale: f32) -> f32 {
    xent_row_generic(row, target, scale)
}

fn xent_row(row: &mut [f32], target: usize, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { xent_row_avx2(row, target, scale) };
    }
    xent_row_generic(row, target, scale)
}

/// The per-target weights `mask / Σ mask` (Σ at least 1) and a check of the targets.
fn target_weights(
    op: &str,
    targets: &[u32],
    mask: &[f32],
    vocab: usize,
) -> candle_core::Result<Vec<f32>> {
    if targets.len() != mask.len() {
        return Err(op_err(
            op,
            format!("{} targets but {} mask entries", targets.len(), mask.len()),
        ));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(op_err(
            op,
            format!("target {t} is outside the vocabulary of {vocab}"),
        ));
    }
    let count = mask.iter().map(|&m| m as f64).sum::<f64>().max(1.0);
    Ok(mask.iter().map(|&m| (m as f64 / count) as f32).collect())
}

/// Turns `logits [R, V]` in place into `(softmax − onehot)·weight` per row; returns the loss
/// `Σ weight·(−log p(target))`.
fn xent_in_place(logits: &mut [f32], v: usize, targets: &[u32], weights: &[f32]) -> f32 {
    let nll = par_rows(logits, v, |row0, rows| {
        rows.chunks_exact_mut(v)
            .enumerate()
            .map(|(i, row)| {
                let r = row0 + i;
                if weights[r] == 0.0 {
                    row.fill(0.0);
                    0.0
                } else {
                    weights[r] as f64 * xent_row(row, targets[r] as usize, weights[r]) as f64
                }
            })
            .collect::<Vec<f64>>()
    });
    nll.into_iter().flatten().sum::<f64>() as f32
}

/// What a cross-entropy forward leaves for its backward: `(softmax − onehot)·weight`, `[R, V]`.
type Saved = Mutex<Option<Vec<f32>>>;

fn take_saved(s: &Saved) -> Option<Vec<f32>> {
    s.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Cross-entropy of logits `[.., V]`.
struct XentOp {
    targets: Vec<u32>,
    mask: Vec<f32>,
    saved: Saved,
    /// The same for the CUDA kernel, on the GPU.
    #[cfg(feature = "cuda")]
    saved_gpu: Mutex<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>,
}

impl XentOp {
    const NAME: &'static str = "cross_entropy";

    /// `(softmax − onehot)·weight` and the loss.
    fn compute(&self, logits: &[f32], v: usize) -> candle_core::Result<(Vec<f32>, f32)> {
        let weights = target_weights(Self::NAME, &self.targets, &self.mask, v)?;
        if logits.len() != weights.len() * v {
            return Err(op_err(
                Self::NAME,
                format!("{} logits for {} targets", logits.len(), weights.len()),
            ));
        }
        let mut d = logits.to_vec();
        let loss = xent_in_place(&mut d, v, &self.targets, &weights);
        Ok((d, loss))
    }
}

impl CustomOp1 for XentOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = *l.dims().last().unwrap_or(&1);
        let (d, loss) = self.compute(cpu_slice(s, l, Self::NAME, "logits")?, v)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (loss, d) = self.cuda_compute(s, l)?;
        *self.saved_gpu.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let v = logits.dim(D::Minus1)?;
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let d = logits.apply_op1_no_bwd(&XentGradOp(self))?;
            return Ok(Some(d.broadcast_mul(grad)?));
        }
        let d = match take_saved(&self.saved) {
            Some(d) => d,
            None => with_slice(logits, Self::NAME, "logits", |l| Ok(self.compute(l, v)?.0))?,
        };
        let d = Tensor::from_vec(d, logits.shape(), logits.device())?;
        Ok(Some(d.broadcast_mul(grad)?))
    }
}

#[cfg(feature = "cuda")]
impl XentOp {
    /// The loss and `(softmax − onehot)·weight` on the GPU (`kernels/fused.cu`).
    fn cuda_compute(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(
        candle_core::CudaStorage,
        candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    )> {
        let v = *l.dims().last().unwrap_or(&1);
        let weights = target_weights(Self::NAME, &self.targets, &self.mask, v)?;
        crate::cuda::cross_entropy(s, l, &self.targets, &weights)
    }
}

/// The saved gradient of a [`XentOp`] on the GPU as a tensor (recomputed if already taken).
#[cfg(feature = "cuda")]
struct XentGradOp<'a>(&'a XentOp);

#[cfg(feature = "cuda")]
impl CustomOp1 for XentGradOp<'_> {
    fn name(&self) -> &'static str {
        "cross_entropy_grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cross_entropy_grad: the CPU backward runs in XentOp::bwd")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let saved = self
            .0
            .saved_gpu
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let d = match saved {
            Some(d) => d,
            None => self.0.cuda_compute(s, l)?.1,
        };
        let dev = s.device.clone();
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(d, dev),
            l.shape().clone(),
        ))
    }
}

/// Σ mask·(−log softmax(logits)[target]) / Σ mask (Σ mask at least 1): the masked mean
/// cross-entropy in nats. `logits`: `[.., V]`; `targets`, `mask`: one per row.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], mask: &[f32]) -> Result<Tensor> {
    let op = XentOp {
        targets: targets.to_vec(),
        mask: mask.to_vec(),
        saved: Mutex::new(None),
        #[cfg(feature = "cuda")]
        saved_gpu: Mutex::new(None),
    };
    Ok(contig(logits)?.apply_op1(op)?)
}

/// [`cross_entropy`] composed of candle ops. The max is detached: it only stabilises the
/// exponent.
pub fn cross_entropy_reference(logits: &Tensor, targets: &[u32], mask: &[f32]) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let dev = logits.device();
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&log_z)?;
    let idx = Tensor::from_slice(targets, (targets.len(), 1), dev)?;
    let picked = logp.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?;
    let count = mask.iter().sum::<f32>().max(1.0);
    let mask = Tensor::from_slice(mask, mask.len(), dev)?;
    Ok(((picked * mask)?.sum_all()?.neg()? / count as f64)?)
}

/// The head matmul and the cross-entropy in one op: `x [R, C]`, head `[V, C]`.
struct HeadXentOp {
    targets: Vec<u32>,
    mask: Vec<f32>,
    saved: Saved,
}

impl HeadXentOp {
    const NAME: &'static str = "head_cross_entropy";

    fn compute(
        &self,
        x: &[f32],
        w: &[f32],
        c: usize,
        v: usize,
    ) -> candle_core::Result<(Vec<f32>, f32)> {
        let weights = target_weights(Self::NAME, &self.targets, &self.mask, v)?;
        let r = weights.len();
        if x.len() != r * c || w.len() != v * c {
            return Err(op_err(
                Self::NAME,
                format!(
                    "x has {} elements and the head {}, for {r} rows, C = {c}, V = {v}",
                    x.len(),
                    w.len()
                ),
            ));
        }
        let mut d = gemm_new(Mat::new(x, r, c), Mat::new(w, v, c).t(), 1.0);
        let loss = xent_in_place(&mut d, v, &self.targets, &weights);
        Ok((d, loss))
    }
}

impl CustomOp2 for HeadXentOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, c) = l2.shape().dims2()?;
        let x = cpu_slice(s1, l1, Self::NAME, "x")?;
        let w = cpu_slice(s2, l2, Self::NAME, "head")?;
        let (d, loss) = self.compute(x, w, c, v)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (v, c) = w.dims2()?;
        let r = x.elem_count() / c;
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let (dx, dw) = with_slice(x, Self::NAME, "x", |xs| {
            with_slice(w, Self::NAME, "head", |ws| {
                let d = match take_saved(&self.saved) {
                    Some(d) => d,
                    None => self.compute(xs, ws, c, v)?.0,
                };
                let dm = Mat::new(&d, r, v);
                let dx = gemm_new(dm, Mat::new(ws, v, c), g);
                let dw = gemm_new(dm.t(), Mat::new(xs, r, c), g);
                Ok((dx, dw))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

/// [`cross_entropy`] of `linear(x, head)`, without the logits ever being a graph node:
/// `x [R, C]`, `head [V, C]`.
pub fn head_cross_entropy(
    x: &Tensor,
    head: &Tensor,
    targets: &[u32],
    mask: &[f32],
) -> Result<Tensor> {
    let op = HeadXentOp {
        targets: targets.to_vec(),
        mask: mask.to_vec(),
        saved: Mutex::new(None),
    };
    Ok(contig(x)?.apply_op2(&contig(head)?, op)?)
}

// ---------------------------------------------------------------------------------------------
// The switch
// ---------------------------------------------------------------------------------------------

/// Which implementation of these operators a model runs. Off the CPU, or for other dtypes than
/// f32, the composed twins run whatever the choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The default: each dense block of the model as one op (`block`), the fused operators of
    /// this module elsewhere (and for blocks with ternary linears).
    #[default]
    Fused,
    /// The fused operators of this module and TimeMix's core, one op each: the twin the block op
    /// is tested against.
    Ops,
    /// Their composed reference twins, plain candle ops (slow; for tests and benchmarks).
    Reference,
}

impl Kernels {
    fn fused(self, ts: &[&Tensor]) -> bool {
        self != Kernels::Reference && fusable(ts)
    }

    /// Whether the CUDA twins of these ops run on these tensors: f32 on the GPU, in a build with
    /// the `cuda` feature, and [`cuda_fused`] on.
    pub(crate) fn gpu(self, ts: &[&Tensor]) -> bool {
        cfg!(feature = "cuda")
            && self != Kernels::Reference
            && cuda_fused()
            && ts
                .iter()
                .all(|t| t.device().is_cuda() && t.dtype() == DType::F32)
    }

    pub fn norm(
        self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        group: usize,
        eps: f64,
    ) -> Result<Tensor> {
        if self.fused(&[x, w, b]) || (self.gpu(&[x, w, b]) && gpu_norm_supported(group)) {
            norm(x, w, b, group, eps)
        } else {
            norm_reference(x, w, b, group, eps)
        }
    }

    pub fn token_mix(self, x: &Tensor, prev: &Tensor, mu: &Tensor, t: usize) -> Result<Tensor> {
        if self.fused(&[x, prev, mu]) || self.gpu(&[x, prev, mu]) {
            token_mix(x, prev, mu, t)
        } else {
            token_mix_reference(x, prev, mu, t)
        }
    }

    pub fn linear(self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.fused(&[x, w]) {
            linear(x, w)
        } else {
            linear_reference(x, w)
        }
    }

    pub fn relu_sq(self, x: &Tensor) -> Result<Tensor> {
        if self.fused(&[x]) || self.gpu(&[x]) {
            relu_sq(x)
        } else {
            relu_sq_reference(x)
        }
    }

    pub fn cross_entropy(self, logits: &Tensor, targets: &[u32], mask: &[f32]) -> Result<Tensor> {
        if self.fused(&[logits]) || self.gpu(&[logits]) {
            cross_entropy(logits, targets, mask)
        } else {
            cross_entropy_reference(logits, targets, mask)
        }
    }

    pub fn head_cross_entropy(
        self,
        x: &Tensor,
        head: &Tensor,
        targets: &[u32],
        mask: &[f32],
    ) -> Result<Tensor> {
        if self.fused(&[x, head]) {
            head_cross_entropy(x, head, targets, mask)
        } else if self.gpu(&[x, head]) {
            // On the GPU: cuBLAS for the head, the CUDA kernel for the loss.
            cross_entropy(&linear_reference(x, head)?, targets, mask)
        } else {
            cross_entropy_reference(&linear_reference(x, head)?, targets, mask)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_are_written_whole_or_refused() {
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.3 - 1.7).collect();
        let b: Vec<f32> = (0..20).map(|i| 0.9 - i as f32 * 0.11).collect();
        let mut p = Planes::new(2, 15);
        p.gemm(1, Mat::new(&a, 3, 4), Mat::new(&b, 4, 5), 2.0);
        p.copy(0, &[7.0; 15]);
        let v = p.finish();
        assert_eq!(&v[..15], &[7.0; 15]);
        assert_eq!(
            &v[15..],
            &gemm_new(Mat::new(&a, 3, 4), Mat::new(&b, 4, 5), 2.0)[..]
        );
        let unwritten = std::panic::catch_unwind(|| {
            let mut p = Planes::new(2, 15);
            p.copy(0, &[1.0; 15]);
            p.finish()
        });
        assert!(
            unwritten.is_err(),
            "a plane left unwritten must not be handed out"
        );
    }
}
