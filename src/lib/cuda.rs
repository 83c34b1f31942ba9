//! The project's own CUDA kernels (`kernels/*.cu`, compiled to PTX by `build.rs`) and the
//! launchers the candle ops call from their `cuda_fwd`. Everything else on the GPU is candle's.

use crate::model::wkv::{CHUNK, Dims, FUSED_N};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};

const WKV7_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/wkv7.ptx"));
const OPTIM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// The storage's data from the layout's offset on, which must be contiguous.
fn contiguous<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let (lo, hi) = l
        .contiguous_offsets()
        .ok_or_else(|| err(format!("{what} is not contiguous")))?;
    if s.dtype() != DType::F32 {
        return Err(err(format!("{what} is {:?}; the kernel takes f32", s.dtype())));
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
    let mut ck = unsafe { dev.alloc::<f32>(d.b * d.h * d.t.div_ceil(CHUNK) * d.n * d.n)? };
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
        a.arg(&b).arg(&t).arg(&h).arg(&x).arg(&s0).arg(&tape.sa).arg(&tape.ck);
        a.arg(&dy).arg(&ds_t).arg(&mut dx).arg(&mut ds0);
        // SAFETY: as in the forward.
        unsafe { a.launch(wkv_launch(d)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Grid for a grid-stride loop over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1024) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// AdamW's constants for one parameter and step, as the kernel takes them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWArgs {
    /// Multiplies the gradient first (clipping, accumulation).
    pub gscale: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub decay: f32,
}

/// AdamW on the GPU, in place: `p` (a parameter's storage), its gradient and both moments.
pub fn adamw(
    p: &mut CudaStorage,
    lp: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    h: AdamWArgs,
) -> Result<()> {
    let dev = p.device().clone();
    let g = contiguous(g, lg, "adamw gradient")?;
    let (lo, hi) = lp
        .contiguous_offsets()
        .ok_or_else(|| err("adamw: parameter not contiguous".into()))?;
    let n = hi - lo;
    if g.len() != n || m.len() != n || v.len() != n {
        return Err(err(format!(
            "adamw: sizes differ (parameter {n}, gradient {}, moments {} {})",
            g.len(),
            m.len(),
            v.len()
        )));
    }
    let mut p = p.as_cuda_slice_mut::<f32>()?.slice_mut(lo..hi);
    let f = dev.get_or_load_custom_func("adamw_f32", "tinybit_optim", OPTIM_PTX)?;
    let n64 = n as u64;
    let mut a = f.builder();
    a.arg(&n64).arg(&mut p).arg(&g).arg(m).arg(v);
    a.arg(&h.gscale).arg(&h.beta1).arg(&h.beta2).arg(&h.eps);
    a.arg(&h.step_size).arg(&h.bc2_sqrt).arg(&h.decay);
    // SAFETY: argument types match kernels/optim.cu.
    unsafe { a.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// Adds Σ g² of `g` to `out[slot]` on the GPU.
pub fn sumsq_into(g: &CudaStorage, lg: &Layout, out: &mut CudaSlice<f32>, slot: u32) -> Result<()> {
    let dev = g.device().clone();
    let g = contiguous(g, lg, "gradient")?;
    let n64 = g.len() as u64;
    let f = dev.get_or_load_custom_func("sumsq_f32", "tinybit_optim", OPTIM_PTX)?;
    let mut a = f.builder();
    a.arg(&n64).arg(&g).arg(out).arg(&slot);
    // SAFETY: argument types match kernels/optim.cu; 256 threads = 8 warps ≤ 32 partials.
    unsafe { a.launch(elementwise(g.len())) }.w()?;
    Ok(())
}
