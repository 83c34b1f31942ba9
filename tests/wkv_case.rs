//! WKV-7 test and benchmark data (shared by the integration tests and, through `#[path]`, the
//! benchmarks): random inputs with model-like ranges, and a small timing of the fused scan
//! against its reference twins and the candle op.
#![allow(dead_code)] // each benchmark uses a part

use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;
use tinybit::model::wkv::{
    self, Dims, EXP_NEG_HALF, FUSED_N, Inputs, wkv7, wkv7_backward_reference, wkv7_fused_backward,
    wkv7_fused_forward, wkv7_reference,
};

/// Owned inputs of one call, for tests and benchmarks.
#[derive(Clone, Debug)]
pub struct Case {
    pub d: Dims,
    /// `[6,B,T,H,N]` in the order of `wkv::INPUT_NAMES`.
    pub packed: Vec<f32>,
    pub s0: Vec<f32>,
}

impl Case {
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs::from_packed(self.d, &self.packed, &self.s0)
    }
}

/// Reproducible test data: ChaCha8 with a seed, uniform and standard-normal draws.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0.random::<f32>()
    }

    pub fn normal(&mut self) -> f32 {
        let z: f32 = StandardNormal.sample(&mut self.0);
        z
    }
}

/// Random inputs with model-like ranges: `a = −κ̂`, `b = κ̂ ⊙ iclr` with `κ̂` a unit vector per
/// head and `iclr ∈ (0,1)`, decays `w` spread over 0.55 … 0.9999, r, k, v, s0 roughly O(1).
pub fn random_case(d: Dims, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let m = d.tokens_len();
    let mut packed = vec![0f32; 6 * m];
    for tok in 0..m / d.n.max(1) {
        let o = tok * d.n;
        let kappa: Vec<f32> = (0..d.n).map(|_| rng.normal()).collect();
        let norm = kappa.iter().map(|e| e * e).sum::<f32>().sqrt().max(1e-12);
        for j in 0..d.n {
            let decay = 0.55 + 0.4499 * rng.uniform();
            // Invert w = exp(−e^{−1/2} σ(ŵ)) for ŵ.
            let sig = -decay.ln() / EXP_NEG_HALF;
            packed[o + j] = 0.5 * rng.normal();
            packed[m + o + j] = (sig / (1.0 - sig)).ln();
            packed[2 * m + o + j] = 0.3 * rng.normal();
            packed[3 * m + o + j] = rng.normal();
            packed[4 * m + o + j] = -kappa[j] / norm;
            packed[5 * m + o + j] = kappa[j] / norm * rng.uniform();
        }
    }
    let s0 = (0..d.state_len()).map(|_| 0.3 * rng.normal()).collect();
    Case { d, packed, s0 }
}

/// Runs `f` `iters` times (at least once); returns the (minimum, median) wall time per call in
/// milliseconds, the minimum being the better estimate on a busy machine.
fn time_calls(
    iters: usize,
    mut f: impl FnMut() -> tinybit::Result<()>,
) -> tinybit::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[0], ms[ms.len() / 2]))
}

/// What [`bench`] measured: (minimum, median) milliseconds per call.
#[derive(Clone, Copy, Debug)]
pub struct BenchTimes {
    /// The fused forward and backward; None when `d.n` has no fused kernel.
    pub fused: Option<((f64, f64), (f64, f64))>,
    pub reference_forward: (f64, f64),
    pub reference_backward: (f64, f64),
    pub candle_op: (f64, f64),
}

/// Times, on random inputs of size `d`: the fused forward and backward (`iters` calls each), the
/// reference twins (one call each) and the candle op through `backward()` of `Σ y·dy` (`iters`
/// calls, including the stacking of the inputs, the loss and candle's own gradient sums).
pub fn bench_times(d: Dims, iters: usize) -> tinybit::Result<BenchTimes> {
    let case = random_case(d, 7);
    let x = case.inputs();
    let mut rng = Rng::new(8);
    let dy: Vec<f32> = (0..d.tokens_len()).map(|_| rng.normal()).collect();
    let ds_t = vec![0f32; d.state_len()];
    let fused = if d.n == FUSED_N {
        let tape = wkv7_fused_forward(d, x).1;
        let fwd = time_calls(iters, || {
            std::hint::black_box(wkv7_fused_forward(d, x));
            Ok(())
        })?;
        let bwd = time_calls(iters, || {
            std::hint::black_box(wkv7_fused_backward(d, x, &tape, &dy, &ds_t));
            Ok(())
        })?;
        Some((fwd, bwd))
    } else {
        None
    };
    let reference_forward = time_calls(1, || {
        std::hint::black_box(wkv7_reference(d, x.r, x.w, x.k, x.v, x.a, x.b, x.s0));
        Ok(())
    })?;
    let reference_backward = time_calls(1, || {
        std::hint::black_box(wkv7_backward_reference(d, x, &dy, &ds_t));
        Ok(())
    })?;

    let dev = candle_core::Device::Cpu;
    let m = d.tokens_len();
    let shape = (d.b, d.t, d.h, d.n);
    let xs = (0..6)
        .map(|q| candle_core::Var::from_slice(&case.packed[q * m..(q + 1) * m], shape, &dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let s0 = candle_core::Var::from_slice(&case.s0, (d.b, d.h, d.n, d.n), &dev)?;
    let dy_t = candle_core::Tensor::from_vec(dy.clone(), shape, &dev)?;
    let candle_op = time_calls(iters, || {
        let (y, _) = wkv7(&xs[0], &xs[1], &xs[2], &xs[3], &xs[4], &xs[5], &s0)?;
        std::hint::black_box((y * &dy_t)?.sum_all()?.backward()?);
        Ok(())
    })?;
    Ok(BenchTimes {
        fused,
        reference_forward,
        reference_backward,
        candle_op,
    })
}

/// [`bench_times`] as a small report, one line per measurement.
pub fn bench(d: Dims, iters: usize) -> tinybit::Result<String> {
    let t = bench_times(d, iters)?;
    let line = |what: &str, (min, med): (f64, f64)| {
        format!("{what:<28} min {min:9.3} ms  median {med:9.3} ms")
    };
    let mut lines = vec![format!(
        "wkv7 bench {d:?}, {} threads, {:?} kernels",
        rayon::current_num_threads(),
        wkv::Isa::best()
    )];
    if let Some((fwd, bwd)) = t.fused {
        lines.push(line("fused forward", fwd));
        lines.push(line("fused backward", bwd));
    }
    lines.push(line("reference forward", t.reference_forward));
    lines.push(line("reference backward (f64)", t.reference_backward));
    lines.push(line("candle op forward+backward", t.candle_op));
    Ok(lines.join("\n"))
}
