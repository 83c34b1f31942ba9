//! AdamW written here (candle's keeps its moments private, so a run could not resume), with
//! parameter groups: weight decay only on the big matrices, 2× learning rate on `att.w0`
//! (the official x070 trainer's groups, BlinkDL/RWKV-LM `RWKV-v7/train_temp`). Muon is an experimental alternative for 2-D weight matrices.
//!
//! Moments live in plain `Vec<f32>`s: the update is one fused loop per parameter, split over
//! threads and written into the parameter's storage in place (`AdamWOp`); saving or restoring
//! the moments is a byte copy. [`adamw_reference`] is the update written plainly, the twin the
//! tests hold the fast path to.

use super::config::{OptimizerKind, Schedule, TrainConfig};
use crate::error::{Error, Result};
use crate::model::params::{ParamKind, kind_of};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// Elements per parallel task of the elementwise loops: fixed, so results never depend on the
/// number of threads.
const TASK: usize = 1 << 14;

/// AdamW's constants for one parameter and step.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bc2_sqrt: f32,
    /// `1 − lr·wd` (decoupled weight decay).
    pub decay: f32,
}

impl AdamW {
    #[inline(always)]
    fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        *p = *p * self.decay - self.step_size * *m / (v.sqrt() / self.bc2_sqrt + self.eps);
    }
}

/// The update written plainly, one element after another: the twin of [`AdamWOp`].
pub fn adamw_reference(h: &AdamW, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for i in 0..p.len() {
        let (gi, mut mi, mut vi) = (g[i], m[i], v[i]);
        mi = h.beta1 * mi + (1.0 - h.beta1) * gi;
        vi = h.beta2 * vi + (1.0 - h.beta2) * gi * gi;
        p[i] = p[i] * h.decay - h.step_size * mi / (vi.sqrt() / h.bc2_sqrt + h.eps);
        (m[i], v[i]) = (mi, vi);
    }
}

/// AdamW applied to a parameter's own storage, in parallel tasks (candle would otherwise copy
/// the parameter out and back in, which cost a tenth of a `micro` training step).
struct AdamWOp<'a> {
    h: AdamW,
    g: &'a [f32],
    mv: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp1 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = s else {
            return Err(candle_core::Error::Msg(
                "adamw: parameters must be f32".into(),
            ));
        };
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: parameter not contiguous".into()))?;
        let p = &mut data[start..end];
        // Cannot fail unless another thread panicked while holding the lock; that panic is the error reported.
        let mut guard = self.mv.lock().unwrap();
        let (m, v) = &mut *guard;
        if p.len() != self.g.len() || m.len() != p.len() || v.len() != p.len() {
            return Err(candle_core::Error::Msg("adamw: sizes differ".into()));
        }
        let h = self.h;
        p.par_chunks_mut(TASK)
            .zip(self.g.par_chunks(TASK))
            .zip(m.par_chunks_mut(TASK))
            .zip(v.par_chunks_mut(TASK))
            .for_each(|(((p, g), m), v)| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                    h.update(p, g, m, v);
                }
            });
        Ok(())
    }
}

/// AdamW on a GPU parameter's storage: the kernel in `kernels/optim.cu`.
#[cfg(feature = "cuda")]
struct AdamWGpuOp<'a> {
    h: AdamW,
    gscale: f32,
    g: &'a Tensor,
    mv: Mutex<(&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
}

#[cfg(feature = "cuda")]
impl InplaceOp1 for AdamWGpuOp<'_> {
    fn name(&self) -> &'static str {
        "adamw_gpu"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("adamw_gpu: the parameter is on the CPU")
    }

    fn cuda_fwd(&self, p: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let (gs, gl) = self.g.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*gs else {
            candle_core::bail!("adamw_gpu: the gradient is not on the GPU")
        };
        let mut guard = self.mv.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *guard;
        gpu::adamw(p, l, g, gl, m, v, &self.h, self.gscale)
    }
}

/// Learning rate and weight decay at `step` (0-based).
pub fn schedule(cfg: &TrainConfig, step: u64) -> (f64, f64) {
    let (lr, lr_final, total) = (cfg.lr, cfg.lr_final, cfg.max_steps.max(1));
    if step < cfg.warmup_steps {
        // Linear warmup from 1% (the official trainer's 0.01 + 0.99·t/warmup).
        let f = 0.01 + 0.99 * step as f64 / cfg.warmup_steps as f64;
        return (lr * f, cfg.weight_decay);
    }
    let cosine = |from: u64, to: u64, hi: f64, lo: f64| {
        let p = ((step - from) as f64 / (to - from).max(1) as f64).clamp(0.0, 1.0);
        lo + 0.5 * (hi - lo) * (1.0 + (std::f64::consts::PI * p).cos())
    };
    match cfg.schedule {
        Schedule::Cosine => (
            cosine(cfg.warmup_steps, total, lr, lr_final),
            cfg.weight_decay,
        ),
        Schedule::Wsd => {
            let decay_start = total - ((total as f64 * cfg.decay_fraction) as u64).min(total);
            let start = decay_start.max(cfg.warmup_steps);
            if step < start {
                (lr, cfg.weight_decay)
            } else {
                (cosine(start, total, lr, lr_final), cfg.weight_decay)
            }
        }
        Schedule::Bitnet => {
            let half = (total / 2).max(cfg.warmup_steps);
            if step < half {
                (
                    cosine(cfg.warmup_steps, half, lr, lr * 0.5),
                    cfg.weight_decay,
                )
            } else {
                // Stage two: cooled down, no weight decay (ternary weights stop drifting to zero).
                (cosine(half, total, lr * 0.3, lr_final), 0.0)
            }
        }
    }
}

/// One trainable parameter with its optimiser state.
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
    /// The moments on the host (CPU parameters; for a GPU parameter, what the last
    /// `load_state` read).
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// The moments of a GPU parameter, which live on its GPU.
    #[cfg(feature = "cuda")]
    gpu: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

pub struct Optimizer {
    pub slots: Vec<Slot>,
    /// Number of updates done (Adam's bias correction).
    pub t: u64,
    kind: OptimizerKind,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Optimizer {
    pub fn new(params: Vec<(String, Var)>, cfg: &TrainConfig) -> Result<Optimizer> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                #[cfg(feature = "cuda")]
                let gpu = match var.device() {
                    candle_core::Device::Cuda(d) => Some((d.alloc_zeros(n)?, d.alloc_zeros(n)?)),
                    _ => None,
                };
                Ok(Slot {
                    kind: kind_of(&name),
                    name,
                    var,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    #[cfg(feature = "cuda")]
                    gpu,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Optimizer {
            slots,
            t: 0,
            kind: cfg.optimizer,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
        })
    }

    /// Scales gradients so their global L2 norm is at most `max`; returns the norm before clipping.
    pub fn clip(&self, grads: &mut HashMap<String, Vec<f32>>, max: f64) -> f64 {
        // Summed in parameter order (not the map's) and in fixed tasks added in order, so the
        // norm is reproducible to the bit whatever the thread count.
        let sq: f64 = self
            .slots
            .iter()
            .filter_map(|s| grads.get(&s.name))
            .map(|g| {
                let parts: Vec<f64> = g
                    .par_chunks(TASK)
                    .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum())
                    .collect();
                parts.iter().sum::<f64>()
            })
            .sum();
        let norm = sq.sqrt();
        if max > 0.0 && norm > max {
            let s = (max / (norm + 1e-6)) as f32;
            grads.values_mut().for_each(|g| {
                g.par_chunks_mut(TASK)
                    .for_each(|c| c.iter_mut().for_each(|x| *x *= s))
            });
        }
        norm
    }

    /// A parameter's learning rate and weight decay (its group's, as in the official x070 trainer), and whether
    /// Muon updates it.
    fn group(&self, slot: &Slot, lr: f64, wd: f64) -> (f64, f64, bool) {
        let lr_p = if slot.name.ends_with("att.w0") {
            2.0 * lr
        } else {
            lr
        };
        let wd_p = if slot.kind == ParamKind::Matrix {
            wd
        } else {
            0.0
        };
        let muon = self.kind == OptimizerKind::Muon
            && slot.kind == ParamKind::Matrix
            && !slot.name.starts_with("emb")
            && !slot.name.starts_with("head");
        (lr_p, wd_p, muon)
    }

    /// AdamW's constants at step `self.t` for learning rate `lr_p` and weight decay `wd_p`.
    fn adamw(&self, lr_p: f64, wd_p: f64) -> AdamW {
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        AdamW {
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            step_size: (lr_p / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay: 1.0 - (lr_p * wd_p) as f32,
        }
    }

    /// One update with learning rate `lr` and weight decay `wd` (decoupled, matrices only).
    pub fn step(&mut self, grads: &HashMap<String, Vec<f32>>, lr: f64, wd: f64) -> Result<()> {
        self.t += 1;
        let b1 = self.beta1 as f32;
        for i in 0..self.slots.len() {
            let Some(g) = grads.get(&self.slots[i].name) else {
                continue;
            };
            let (lr_p, wd_p, muon) = self.group(&self.slots[i], lr, wd);
            let h = self.adamw(lr_p, wd_p);
            let slot = &mut self.slots[i];
            if muon {
                let mut p = slot.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                muon_update(slot, g, &mut p, lr_p, wd_p, b1)?;
                let t = Tensor::from_vec(p, slot.var.shape(), slot.var.device())?;
                slot.var.set(&t)?;
            } else {
                let op = AdamWOp {
                    h,
                    g,
                    mv: Mutex::new((&mut slot.m, &mut slot.v)),
                };
                slot.var.as_tensor().inplace_op1(&op)?;
            }
        }
        Ok(())
    }

    /// The global L2 norm of GPU gradients (slot order; `None`: no gradient), summed on the GPU
    /// per parameter and over parameters on the host in order: one copy of a few floats.
    #[cfg(feature = "cuda")]
    pub fn grad_norm_gpu(&self, grads: &[Option<Tensor>]) -> Result<f64> {
        let Some(first) = grads.iter().flatten().next() else {
            return Ok(0.0);
        };
        let dev = first.device().as_cuda_device()?.clone();
        let mut sums = dev.alloc_zeros::<f32>(grads.len())?;
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let (st, l) = g.storage_and_layout();
            let candle_core::Storage::Cuda(cs) = &*st else {
                return Err(Error::Data(format!(
                    "gradient of {} is not on the GPU",
                    self.slots[i].name
                )));
            };
            gpu::sumsq_into(cs, l, &mut sums, i as u32)?;
        }
        let host = dev.clone_dtoh(&sums)?;
        Ok(host.iter().map(|&x| x as f64).sum::<f64>().sqrt())
    }

    /// [`Optimizer::step`] for parameters on the GPU: AdamW in place there, one kernel per
    /// parameter, each gradient scaled by `gscale` on the way (clipping, accumulation).
    #[cfg(feature = "cuda")]
    pub fn step_gpu(
        &mut self,
        grads: &[Option<Tensor>],
        gscale: f32,
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        self.t += 1;
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let (lr_p, wd_p, muon) = self.group(&self.slots[i], lr, wd);
            if muon {
                return Err(Error::Usage(
                    "optimizer = \"muon\" runs on the CPU only; use adamw on the GPU".into(),
                ));
            }
            let h = self.adamw(lr_p, wd_p);
            let slot = &mut self.slots[i];
            let Some((m, v)) = slot.gpu.as_mut() else {
                return Err(Error::Data(format!("{} is not on the GPU", slot.name)));
            };
            let op = AdamWGpuOp {
                h,
                gscale,
                g,
                mv: Mutex::new((m, v)),
            };
            slot.var.as_tensor().inplace_op1(&op)?;
        }
        Ok(())
    }

    /// The moments, for the `.optim` file (host tensors, whichever device trains).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for s in &self.slots {
            let (m, v) = self.moments(s)?;
            let n = m.len();
            out.push((
                format!("m.{}", s.name),
                Tensor::from_vec(m, n, &candle_core::Device::Cpu)?,
            ));
            out.push((
                format!("v.{}", s.name),
                Tensor::from_vec(v, n, &candle_core::Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    /// A slot's moments, copied from the GPU when they live there.
    fn moments(&self, s: &Slot) -> Result<(Vec<f32>, Vec<f32>)> {
        #[cfg(feature = "cuda")]
        if let (Some((m, v)), candle_core::Device::Cuda(d)) = (&s.gpu, s.var.device()) {
            return Ok((d.clone_dtoh(m)?, d.clone_dtoh(v)?));
        }
        Ok((s.m.clone(), s.v.clone()))
    }

    /// Restores the moments saved by `state_tensors`.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Vec<f32>>,
        t: u64,
        file: &str,
    ) -> Result<()> {
        for s in &mut self.slots {
            for (prefix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let src = tensors.get(&key).ok_or_else(|| {
                    Error::Data(format!("optimizer state {file}: tensor {key} is missing"))
                })?;
                if src.len() != dst.len() {
                    return Err(Error::Data(format!(
                        "optimizer state {file}: tensor {key} has the wrong size"
                    )));
                }
                dst.copy_from_slice(src);
            }
            #[cfg(feature = "cuda")]
            if let (Some((m, v)), candle_core::Device::Cuda(d)) = (s.gpu.as_mut(), s.var.device()) {
                d.memcpy_htod(&s.m, m)?;
                d.memcpy_htod(&s.v, v)?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Muon: momentum, then an approximately orthogonal update from five Newton–Schulz iterations,
/// scaled so its RMS matches AdamW's (≈0.2), plus decoupled weight decay.
fn muon_update(
    slot: &mut Slot,
    g: &[f32],
    p: &mut [f32],
    lr: f64,
    wd: f64,
    beta: f32,
) -> Result<()> {
    for (m, &gi) in slot.m.iter_mut().zip(g) {
        *m = beta * *m + gi;
    }
    // Nesterov-style look-ahead.
    let look: Vec<f32> = slot.m.iter().zip(g).map(|(m, gi)| gi + beta * m).collect();
    let (rows, cols) = slot.var.dims2()?;
    let dev = slot.var.device();
    let mut x = Tensor::from_vec(look, (rows, cols), dev)?;
    let transposed = rows > cols;
    if transposed {
        x = x.t()?.contiguous()?;
    }
    let norm = x.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? + 1e-7;
    x = (x / norm as f64)?;
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    for _ in 0..5 {
        let xxt = x.matmul(&x.t()?)?;
        let poly = ((&xxt * b)? + (xxt.matmul(&xxt)? * c)?)?;
        x = ((&x * a)? + poly.matmul(&x)?)?;
    }
    if transposed {
        x = x.t()?.contiguous()?;
    }
    let scale = 0.2 * (rows.max(cols) as f64).sqrt();
    let upd = x.flatten_all()?.to_vec1::<f32>()?;
    let decay = 1.0 - (lr * wd) as f32;
    for (pi, u) in p.iter_mut().zip(upd) {
        *pi = *pi * decay - (lr * scale) as f32 * u;
    }
    Ok(())
}

/// The optimiser's CUDA launchers (`kernels/optim.cu`), on the shared plumbing of `crate::cuda`.
#[cfg(feature = "cuda")]
mod gpu {
    use super::AdamW;
    use crate::cuda::{OPTIM_PTX, contiguous, elementwise, err};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{Layout, Result};

    /// AdamW on the GPU, in place: `p` (a parameter's storage), its gradient times `gscale` and both
    /// moments (the kernel is the twin of `AdamW::update`).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        p: &mut CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        h: &AdamW,
        gscale: f32,
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
        a.arg(&gscale).arg(&h.beta1).arg(&h.beta2).arg(&h.eps);
        a.arg(&h.step_size).arg(&h.bc2_sqrt).arg(&h.decay);
        // SAFETY: argument types match kernels/optim.cu.
        unsafe { a.launch(elementwise(n)) }.w()?;
        Ok(())
    }

    /// Adds Σ g² of `g` to `out[slot]` on the GPU.
    pub fn sumsq_into(
        g: &CudaStorage,
        lg: &Layout,
        out: &mut CudaSlice<f32>,
        slot: u32,
    ) -> Result<()> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place, parallel AdamW equals the plain loop bit for bit, with the 2× learning rate
    /// of `att.w0`, weight decay on matrices only, and bias correction over several steps.
    #[test]
    fn adamw_in_place_equals_reference() {
        let cfg: TrainConfig = toml::from_str(
            "train_data = \"x\"\ntokenizer = \"x\"\nbatch_size = 1\nctx_len = 8\nmax_steps = 9\nlr = 1e-3\n",
        )
        .unwrap();
        let dev = Device::Cpu;
        // Sizes that leave partial tasks; values spread over several orders of magnitude.
        let shapes = [
            ("blocks.0.att.key.weight", vec![3 * TASK / 64 + 5, 64]),
            ("blocks.0.att.w0", vec![1, 1, 1000]),
            ("blocks.0.ln1.weight", vec![77]),
        ];
        let value = |i: usize, k: u32| {
            ((i as f32 * 0.37 + k as f32).sin()) * 10f32.powi((i % 5) as i32 - 3)
        };
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .map(|(n, s)| {
                let len = s.iter().product::<usize>();
                let data: Vec<f32> = (0..len).map(|i| value(i, 1)).collect();
                let t = Tensor::from_vec(data, s.as_slice(), &dev).unwrap();
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let mut plain: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = vars
            .iter()
            .map(|(_, v)| {
                let p = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let n = v.elem_count();
                (p, vec![0.0; n], vec![0.0; n])
            })
            .collect();
        let mut opt = Optimizer::new(vars, &cfg).unwrap();
        let (lr, wd) = (3e-3, 0.1);
        for step in 1..=3u32 {
            let grads: HashMap<String, Vec<f32>> = opt
                .slots
                .iter()
                .map(|s| {
                    let g = (0..s.var.elem_count())
                        .map(|i| value(i, 7 * step))
                        .collect();
                    (s.name.clone(), g)
                })
                .collect();
            opt.step(&grads, lr, wd).unwrap();
            for (slot, (p, m, v)) in opt.slots.iter().zip(plain.iter_mut()) {
                let lr_p = if slot.name.ends_with("att.w0") {
                    2.0 * lr
                } else {
                    lr
                };
                let wd_p = if slot.kind == ParamKind::Matrix {
                    wd
                } else {
                    0.0
                };
                let t = step as i32;
                let h = AdamW {
                    beta1: cfg.beta1 as f32,
                    beta2: cfg.beta2 as f32,
                    eps: cfg.eps as f32,
                    step_size: (lr_p / (1.0 - cfg.beta1.powi(t))) as f32,
                    bc2_sqrt: (1.0 - cfg.beta2.powi(t)).sqrt() as f32,
                    decay: 1.0 - (lr_p * wd_p) as f32,
                };
                adamw_reference(&h, p, &grads[&slot.name], m, v);
                let got: Vec<f32> = slot
                    .var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(&got, p, "{} at step {step}", slot.name);
                assert_eq!(&slot.m, m);
                assert_eq!(&slot.v, v);
            }
        }
    }
}
