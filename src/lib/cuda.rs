//! The project's own CUDA kernels (`kernels/*.cu`, compiled to PTX by `build.rs`) and the
//! launchers the candle ops call from their `cuda_fwd`. Everything else on the GPU is candle's.

use crate::model::rows::{CHECKPOINT_EVERY, Dims, FUSED_N};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};

const WKV7_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/wkv7.ptx"));
pub(crate) const OPTIM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));

pub(crate) fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// The storage's data from the layout's offset on, which must be contiguous.
pub(crate) fn contiguous<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let (lo, hi) = l
        .contiguous_offsets()
        .ok_or_else(|| err(format!("{what} is not contiguous")))?;
    if s.dtype() != DType::F32 {
        return Err(err(format!(
            "{what} is {:?}; the kernel takes f32",
            s.dtype()
        )));
    }
    Ok(s.as_cuda_slice::<f32>()?.slice(lo..hi))
}

/// What the WKV forward keeps on the GPU for the backward: every head's `sa_t` (`[B·H, T, N]`)
/// and its state checkpoints (`[B·H, ⌈T/16⌉, N, N]`, transposed).
pub struct WkvTape {
    d: Dims,
    sa: CudaSlice<f32>,
    ck: CudaSlice<f32>,
}

fn wkv_launch(d: Dims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((d.b * d.h) as u32, 1, 1),
        block_dim: (FUSED_N as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_wkv(d: Dims) -> Result<()> {
    if d.n != FUSED_N || d.t == 0 {
        return Err(err(format!(
            "wkv7: the CUDA kernel needs head size {FUSED_N} and T ≥ 1, got {d:?}"
        )));
    }
    Ok(())
}

/// WKV-7 forward: packed `x [6,B,T,H,N]` and `s0 [B,H,N,N]` → `[y | s_T]` (f32, flat) and the tape.
pub fn wkv7_forward(
    d: Dims,
    x: &CudaStorage,
    lx: &Layout,
    s0: &CudaStorage,
    ls: &Layout,
) -> Result<(CudaStorage, WkvTape)> {
    check_wkv(d)?;
    let dev: &CudaDevice = x.device();
    let x = contiguous(x, lx, "wkv7 input")?;
    let s0 = contiguous(s0, ls, "wkv7 s0")?;
    let (m, ns) = (d.tokens_len(), d.state_len());
    // SAFETY: the kernel writes every element of y, s_T and the tape.
    let mut out = unsafe { dev.alloc::<f32>(m + ns)? };
    let mut sa = unsafe { dev.alloc::<f32>(m)? };
    let mut ck =
        unsafe { dev.alloc::<f32>(d.b * d.h * d.t.div_ceil(CHECKPOINT_EVERY) * d.n * d.n)? };
    let f = dev.get_or_load_custom_func("wkv7_fwd_f32", "tinybit_wkv7", WKV7_PTX)?;
    let (b, t, h) = (d.b as i32, d.t as i32, d.h as i32);
    {
        let (mut y, mut s_t) = out.split_at_mut(m);
        let mut a = f.builder();
        a.arg(&b).arg(&t).arg(&h).arg(&x).arg(&s0);
        a.arg(&mut y).arg(&mut s_t).arg(&mut sa).arg(&mut ck);
        // SAFETY: argument types and sizes match the kernel's signature (kernels/wkv7.cu).
        unsafe { a.launch(wkv_launch(d)) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        WkvTape { d, sa, ck },
    ))
}

/// WKV-7 backward from the forward's tape: `dout = [dy | ds_T]` → `[dx (6,B,T,H,N) | ds0]`.
pub fn wkv7_backward(
    tape: &WkvTape,
    x: &CudaStorage,
    lx: &Layout,
    s0: &CudaStorage,
    ls: &Layout,
    dout: &CudaStorage,
    lg: &Layout,
) -> Result<CudaStorage> {
    let d = tape.d;
    check_wkv(d)?;
    let dev: &CudaDevice = x.device();
    let x = contiguous(x, lx, "wkv7 input")?;
    let s0 = contiguous(s0, ls, "wkv7 s0")?;
    let g = contiguous(dout, lg, "wkv7 output gradient")?;
    let m = d.tokens_len();
    let (dy, ds_t) = g.split_at(m);
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<f32>(6 * m + d.state_len())? };
    let f = dev.get_or_load_custom_func("wkv7_bwd_f32", "tinybit_wkv7", WKV7_PTX)?;
    let (b, t, h) = (d.b as i32, d.t as i32, d.h as i32);
    {
        let (mut dx, mut ds0) = out.split_at_mut(6 * m);
        let mut a = f.builder();
        a.arg(&b)
            .arg(&t)
            .arg(&h)
            .arg(&x)
            .arg(&s0)
            .arg(&tape.sa)
            .arg(&tape.ck);
        a.arg(&dy).arg(&ds_t).arg(&mut dx).arg(&mut ds0);
        // SAFETY: as in the forward.
        unsafe { a.launch(wkv_launch(d)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Grid for a grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1024) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

/// Warps per block of the norm kernels.
const NORM_WARPS: usize = 8;

/// Blocks for the norm kernels over `items` (row, group) items with `gpr` groups per row: a
/// multiple of `gpr`, so that every warp's grid stride keeps it on the same channels.
fn norm_grid(items: usize, gpr: usize) -> LaunchConfig {
    let want = items.div_ceil(NORM_WARPS).clamp(1, 1056);
    let blocks = want.div_ceil(gpr) * gpr;
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: ((32 * NORM_WARPS) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn norm_dims(x: usize, c: usize, group: usize) -> Result<(usize, usize)> {
    if c == 0 || x % c != 0 || !crate::model::rows::gpu_norm_supported(group) || c % group != 0 {
        return Err(err(format!(
            "norm: {x} inputs, {c} channels, groups of {group}: not a size the kernel takes"
        )));
    }
    Ok((x / group, c / group))
}

/// Norm forward (`norm_rows` on the GPU): `y` for `x [.., C]`, `w`, `b` `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn norm_forward(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    group: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (x, w, b) = (
        contiguous(x, lx, "norm input")?,
        contiguous(w, lw, "norm weight")?,
        contiguous(b, lb, "norm bias")?,
    );
    let (items, gpr) = norm_dims(x.len(), w.len(), group)?;
    let mut y = unsafe { dev.alloc::<f32>(x.len())? };
    let f = dev.get_or_load_custom_func("norm_fwd_f32", "tinybit_fused", FUSED_PTX)?;
    let (items64, g, c) = (items as u64, group as i32, w.len() as i32);
    let mut a = f.builder();
    a.arg(&items64)
        .arg(&g)
        .arg(&c)
        .arg(&eps)
        .arg(&x)
        .arg(&w)
        .arg(&b)
        .arg(&mut y);
    // SAFETY: argument types match kernels/fused.cu.
    unsafe { a.launch(norm_grid(items, gpr)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// Norm backward: `[dx | dw | db]` flat.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    group: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (x, w, dy) = (
        contiguous(x, lx, "norm input")?,
        contiguous(w, lw, "norm weight")?,
        contiguous(dy, ldy, "norm output gradient")?,
    );
    let (items, gpr) = norm_dims(x.len(), w.len(), group)?;
    let (n, c) = (x.len(), w.len());
    let mut out = dev.alloc_zeros::<f32>(n + 2 * c)?;
    let f = dev.get_or_load_custom_func("norm_bwd_f32", "tinybit_fused", FUSED_PTX)?;
    let (items64, g, ci) = (items as u64, group as i32, c as i32);
    {
        let (mut dx, mut rest) = out.split_at_mut(n);
        let (mut dw, mut db) = rest.split_at_mut(c);
        let mut a = f.builder();
        a.arg(&items64)
            .arg(&g)
            .arg(&ci)
            .arg(&eps)
            .arg(&x)
            .arg(&w)
            .arg(&dy);
        a.arg(&mut dx).arg(&mut dw).arg(&mut db);
        // SAFETY: argument types match kernels/fused.cu; dw and db start at zero.
        unsafe { a.launch(norm_grid(items, gpr)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Token-shift mix forward (`MixOp` on the GPU): `x [B·T, C]`, `prev [B, C]`, `mu [C]`.
#[allow(clippy::too_many_arguments)]
pub fn mix_forward(
    x: &CudaStorage,
    lx: &Layout,
    prev: &CudaStorage,
    lp: &Layout,
    mu: &CudaStorage,
    lm: &Layout,
    t: usize,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (x, prev, mu) = (
        contiguous(x, lx, "mix input")?,
        contiguous(prev, lp, "mix prev")?,
        contiguous(mu, lm, "mix mu")?,
    );
    let c = mu.len();
    let rows = x.len() / c.max(1);
    if c == 0 || t == 0 || x.len() != rows * c || rows % t != 0 || prev.len() != rows / t * c {
        return Err(err(format!(
            "mix: {} inputs, {} prev, {c} channels, T = {t}: the sizes do not fit",
            x.len(),
            prev.len()
        )));
    }
    let mut y = unsafe { dev.alloc::<f32>(x.len())? };
    let f = dev.get_or_load_custom_func("mix_fwd_f32", "tinybit_fused", FUSED_PTX)?;
    let (rows64, ti, ci) = (rows as u64, t as i32, c as i32);
    let mut a = f.builder();
    a.arg(&rows64)
        .arg(&ti)
        .arg(&ci)
        .arg(&x)
        .arg(&prev)
        .arg(&mu)
        .arg(&mut y);
    // SAFETY: argument types match kernels/fused.cu.
    unsafe { a.launch(elementwise(x.len())) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// Token-shift mix backward: `[dx | dprev | dmu]` flat.
#[allow(clippy::too_many_arguments)]
pub fn mix_backward(
    x: &CudaStorage,
    lx: &Layout,
    prev: &CudaStorage,
    lp: &Layout,
    mu: &CudaStorage,
    lm: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    t: usize,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (x, prev, mu, dy) = (
        contiguous(x, lx, "mix input")?,
        contiguous(prev, lp, "mix prev")?,
        contiguous(mu, lm, "mix mu")?,
        contiguous(dy, ldy, "mix output gradient")?,
    );
    let c = mu.len();
    let rows = x.len() / c.max(1);
    if c == 0 || t == 0 || dy.len() != x.len() || prev.len() != rows / t * c {
        return Err(err("mix backward: the sizes do not fit".into()));
    }
    let (n, np) = (x.len(), prev.len());
    let mut out = dev.alloc_zeros::<f32>(n + np + c)?;
    let f = dev.get_or_load_custom_func("mix_bwd_f32", "tinybit_fused", FUSED_PTX)?;
    // Slices of 64 rows: enough threads to fill the GPU, few atomics per channel.
    let per_slice = 64usize;
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(128) as u32, rows.div_ceil(per_slice) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows64, ti, ci, ps) = (rows as u64, t as i32, c as i32, per_slice as i32);
    {
        let (mut dx, mut rest) = out.split_at_mut(n);
        let (mut dprev, mut dmu) = rest.split_at_mut(np);
        let mut a = f.builder();
        a.arg(&rows64)
            .arg(&ti)
            .arg(&ci)
            .arg(&ps)
            .arg(&x)
            .arg(&prev)
            .arg(&mu)
            .arg(&dy);
        a.arg(&mut dx).arg(&mut dprev).arg(&mut dmu);
        // SAFETY: argument types match kernels/fused.cu; dmu starts at zero.
        unsafe { a.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Masked cross-entropy of `logits [R, V]` with per-row `targets` and `weights` (already checked
/// and normalised by the caller): the loss (one element) and `(softmax − onehot)·weight`.
pub fn cross_entropy(
    logits: &CudaStorage,
    l: &Layout,
    targets: &[u32],
    weights: &[f32],
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = logits.device().clone();
    let x = contiguous(logits, l, "logits")?;
    let rows = weights.len();
    if rows == 0 || targets.len() != rows || x.len() % rows != 0 {
        return Err(err(format!(
            "cross_entropy: {} logits for {rows} targets",
            x.len()
        )));
    }
    let v = x.len() / rows;
    let stream = dev.cuda_stream();
    let t = stream.clone_htod(targets).w()?;
    let w = stream.clone_htod(weights).w()?;
    let mut d = unsafe { dev.alloc::<f32>(x.len())? };
    let mut loss = dev.alloc_zeros::<f32>(1)?;
    let f = dev.get_or_load_custom_func("xent_f32", "tinybit_fused", FUSED_PTX)?;
    let vi = v as i32;
    let mut a = f.builder();
    a.arg(&vi)
        .arg(&x)
        .arg(&t)
        .arg(&w)
        .arg(&mut d)
        .arg(&mut loss);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match kernels/fused.cu; every target is below V (checked by the
    // caller); loss starts at zero.
    unsafe { a.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(loss, dev), d))
}

/// `relu(x)²` on the GPU.
pub fn relu_sq(x: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let x = contiguous(x, l, "relu_sq input")?;
    let mut y = unsafe { dev.alloc::<f32>(x.len())? };
    let f = dev.get_or_load_custom_func("relu_sq_f32", "tinybit_fused", FUSED_PTX)?;
    let n = x.len() as u64;
    let mut a = f.builder();
    a.arg(&n).arg(&x).arg(&mut y);
    // SAFETY: argument types match kernels/fused.cu.
    unsafe { a.launch(elementwise(x.len())) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// TimeMix's scan-input preparation (`prep_row` on the GPU): `acts [P, R, C]` (P = 5, or 7 with
/// the value residual), `prm [5, C]` → `[6, R, C]`. `n` is the head size.
pub fn prep_forward(
    acts: &CudaStorage,
    la: &Layout,
    prm: &CudaStorage,
    lp: &Layout,
    n: usize,
    residual: bool,
) -> Result<CudaStorage> {
    let dev = acts.device().clone();
    let (acts, prm) = (
        contiguous(acts, la, "prep activations")?,
        contiguous(prm, lp, "prep parameters")?,
    );
    let (rows, h) = prep_dims(acts.len(), prm.len(), n, residual)?;
    let mut out = unsafe { dev.alloc::<f32>(6 * rows * h * n)? };
    let f = dev.get_or_load_custom_func("prep_fwd_f32", "tinybit_fused", FUSED_PTX)?;
    let (r64, hi, ni, res) = (rows as u64, h as i32, n as i32, residual as i32);
    let mut a = f.builder();
    a.arg(&r64)
        .arg(&hi)
        .arg(&ni)
        .arg(&res)
        .arg(&acts)
        .arg(&prm)
        .arg(&mut out);
    // SAFETY: argument types match kernels/fused.cu.
    unsafe { a.launch(norm_grid(rows * h, h)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Rows and heads, from the sizes of the prep inputs.
fn prep_dims(acts: usize, prm: usize, n: usize, residual: bool) -> Result<(usize, usize)> {
    let c = prm / 5;
    let ok_n = matches!(n, 32 | 64 | 128);
    if !ok_n || c == 0 || prm != 5 * c || c % n != 0 {
        return Err(err(format!(
            "prep: {prm} parameters for head size {n}: not a size the kernel takes"
        )));
    }
    let planes = if residual { 7 } else { 5 };
    if acts % (planes * c) != 0 {
        return Err(err(format!(
            "prep: {acts} activations are not {planes} planes of C = {c}"
        )));
    }
    Ok((acts / (planes * c), c / n))
}

/// The backward of [`prep_forward`]: `[dacts (P, R, C) | dprm (5, C)]`.
pub fn prep_backward(
    acts: &CudaStorage,
    la: &Layout,
    prm: &CudaStorage,
    lp: &Layout,
    dout: &CudaStorage,
    ld: &Layout,
    n: usize,
    residual: bool,
) -> Result<CudaStorage> {
    let dev = acts.device().clone();
    let (acts, prm, dout) = (
        contiguous(acts, la, "prep activations")?,
        contiguous(prm, lp, "prep parameters")?,
        contiguous(dout, ld, "prep output gradient")?,
    );
    let (rows, h) = prep_dims(acts.len(), prm.len(), n, residual)?;
    let mut out = dev.alloc_zeros::<f32>(acts.len() + prm.len())?;
    let f = dev.get_or_load_custom_func("prep_bwd_f32", "tinybit_fused", FUSED_PTX)?;
    let (r64, hi, ni, res) = (rows as u64, h as i32, n as i32, residual as i32);
    {
        let (mut dacts, mut dprm) = out.split_at_mut(acts.len());
        let mut a = f.builder();
        a.arg(&r64)
            .arg(&hi)
            .arg(&ni)
            .arg(&res)
            .arg(&acts)
            .arg(&prm)
            .arg(&dout);
        a.arg(&mut dacts).arg(&mut dprm);
        // SAFETY: argument types match kernels/fused.cu; dprm starts at zero.
        unsafe { a.launch(norm_grid(rows * h, h)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// An op that runs on the GPU only, computed by `f` from its inputs' storage: how a backward
/// written as a kernel hands candle a tensor (candle makes tensors from storage only through
/// ops). Applied without a backward of its own.
struct GpuOp<F> {
    name: &'static str,
    f: F,
}

type Stored<'a> = (&'a CudaStorage, &'a Layout);

impl<F> candle_core::CustomOp3 for GpuOp<F>
where
    F: Fn([Stored; 3]) -> Result<(CudaStorage, candle_core::Shape)>,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Err(err(format!("{}: runs on the GPU only", self.name)))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, candle_core::Shape)> {
        (self.f)([(s1, l1), (s2, l2), (s3, l3)])
    }
}

/// `f` on the storage of three GPU tensors, as a tensor (see [`GpuOp`]).
pub fn gpu_op3(
    name: &'static str,
    t: [&candle_core::Tensor; 3],
    f: impl Fn([Stored; 3]) -> Result<(CudaStorage, candle_core::Shape)>,
) -> Result<candle_core::Tensor> {
    t[0].apply_op3_no_bwd(t[1], t[2], &GpuOp { name, f })
}
