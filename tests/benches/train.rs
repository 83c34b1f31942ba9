//! Training throughput (issue 4): `micro` (configs/micro.toml: 16 layers, d 384, ffn 1344, tied
//! head) with a 16384-token vocabulary and official-init weights, at batch 4 × 256 on the CPU.
//! Run with `cargo bench --bench train` (about a minute and a half on 2 cores).
//!
//! Prints forward-only, forward+backward and forward+backward+AdamW tokens/s, the peak RSS, and
//! the fused WKV op against its reference twins. The baselines, measured in the same run where
//! they can be: the same forward+backward with the per-op fused path instead of one op per
//! block (`Kernels::Ops`) and with every fused op replaced by its composed twin
//! (`Kernels::Reference`), an sgemm probe (the machine's speed right now, which varies several
//! times over on a shared machine), and as constants a PyTorch anchor (`TORCH`).
//!
//! Threads as `tb-train` sets them (`cli::set_threads`); `RAYON_NUM_THREADS=1` for one core.
//! `TB_BENCH_ITERS` (default 3) sets the timed repetitions after one warm-up;
//! `TB_BENCH_PROFILE=1` times only forward+backward+AdamW (for `perf record`) and exits.

#[path = "common.rs"]
mod common;
#[path = "../wkv_case.rs"]
mod wkv_case;
use candle_core::{Device, Tensor};
use common::{matmul_params, random_batch};
use std::collections::HashMap;
use std::time::Instant;
use tinybit::config::ModelConfig;
use tinybit::model::Rwkv7;
use tinybit::model::fused::Kernels;
use tinybit::model::init::init_params;
use tinybit::model::wkv;
use tinybit::train::config::TrainConfig;
use tinybit::train::optim::Optimizer;
use tinybit::train::{Trainable, batch_loss};

const BATCH: usize = 4;
const CTX: usize = 256;
const VOCAB: usize = 16384;

/// An independent PyTorch implementation at a like shape (L16 d384 ffn1344, vocab 16384, batch
/// 4 × 256; torch 2.15 CPU/MKL, f32, 2 threads, AdamW) on this machine type, a 2-core AVX-512 EPYC
/// (best runs at low load): with a chunked WKV, and without the WKV as a lower bound. Tokens/s.
const TORCH: [(&str, f64, f64); 3] = [
    ("forward", 1537.0, 2174.0),
    ("forward+backward", 481.0, 709.0),
    ("forward+backward+AdamW", 465.0, 670.0),
];
const TORCH_PEAK_GB: f64 = 3.7;

fn main() {
    tinybit::cli::set_threads(0);
    tinybit::cli::with_big_stack(run);
}

fn run() {
    let iters: usize = std::env::var("TB_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/micro.toml");
    let cfg = ModelConfig::load(&path)
        .and_then(|c| c.with_overrides(&[("vocab_size".into(), VOCAB.to_string())]))
        .expect("configs/micro.toml");
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    println!(
        "micro ({} layers, d {}, ffn {}), vocab {VOCAB}, batch {BATCH}x{CTX}, {threads} threads; \
         best of {iters} after a warm-up",
        cfg.n_layer, cfg.d_model, cfg.d_ffn
    );
    let sgemm = sgemm_probe();
    println!("sgemm probe 1024^3: {sgemm:.0} GFLOP/s (torch's anchor runs saw 190-200)");

    let params = init_params(&cfg, 1, &dev).expect("init");
    let batch = random_batch(&cfg, BATCH, CTX);
    let tokens = (BATCH * CTX) as f64;
    if std::env::var_os("TB_BENCH_PROFILE").is_some() {
        let tcfg = train_config();
        let tr = Trainable::new(&cfg, params).expect("trainable");
        let mut opt = Optimizer::new(tr.vars.clone(), &tcfg).unwrap();
        let t = time(iters, || {
            let loss = batch_loss(&tr.model, &batch).unwrap();
            let mut g = tr.gradients(&loss).unwrap();
            opt.clip(&mut g, 1.0);
            opt.step(&g, 1e-4, 0.1).unwrap();
        });
        println!(
            "forward+backward+AdamW {:.1} tok/s, {:.2} CPU s/step",
            tokens / t.min,
            t.cpu
        );
        return;
    }
    let plain: HashMap<String, Tensor> = params.iter().cloned().collect();
    let model = Rwkv7::from_params(&cfg, &plain).expect("model");
    let fwd = time(iters, || {
        batch_loss(&model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    });
    drop(model);

    let mut tr = Trainable::new(&cfg, params).expect("trainable");
    let fb = time(iters, || {
        let loss = batch_loss(&tr.model, &batch).unwrap();
        std::hint::black_box(tr.gradients(&loss).unwrap());
    });
    let tcfg = train_config();
    let mut opt = Optimizer::new(tr.vars.clone(), &tcfg).unwrap();
    let full = time(iters, || {
        let loss = batch_loss(&tr.model, &batch).unwrap();
        let mut g = tr.gradients(&loss).unwrap();
        opt.clip(&mut g, 1.0);
        opt.step(&g, 1e-4, 0.1).unwrap();
    });
    let peak = peak_rss_gb();
    tr.model.set_kernels(Kernels::Ops);
    let per_op = time(iters, || {
        let loss = batch_loss(&tr.model, &batch).unwrap();
        std::hint::black_box(tr.gradients(&loss).unwrap());
    });
    tr.model.set_kernels(Kernels::Reference);
    let reference = time(1, || {
        let loss = batch_loss(&tr.model, &batch).unwrap();
        std::hint::black_box(tr.gradients(&loss).unwrap());
    });

    let flops = 2.0 * matmul_params(&cfg) * tokens;
    println!(
        "\n{:<24} {:>8} {:>8} {:>10} {:>8} {:>8} {:>9}",
        "", "tok/s", "median", "CPU s/step", "/torch", "/ceiling", "GFLOP/s"
    );
    for ((name, torch, ceiling), (t, passes)) in
        TORCH.iter().zip([(fwd, 1.0), (fb, 3.0), (full, 3.0)])
    {
        let best = tokens / t.min;
        println!(
            "{name:<24} {best:8.1} {:8.1} {:10.2} {:8.2} {:8.2} {:9.0}",
            tokens / t.median,
            t.cpu,
            best / torch,
            best / ceiling,
            passes * flops / t.min / 1e9
        );
    }
    println!(
        "{:<24} {:8.1} {:8.1} {:10.2}   block op: {:.2}x faster",
        "  (per-op fused path)",
        tokens / per_op.min,
        tokens / per_op.median,
        per_op.cpu,
        per_op.min / fb.min
    );
    println!(
        "{:<24} {:8.1} {:>8} {:10.2}   fused ops: {:.1}x faster",
        "  (reference twins)",
        tokens / reference.min,
        "",
        reference.cpu,
        reference.min / fb.min
    );
    println!("peak RSS (VmHWM, before the twins ran) {peak:.2} GB; torch {TORCH_PEAK_GB} GB");

    let d = wkv::Dims {
        b: BATCH,
        t: CTX,
        h: cfg.n_head(),
        n: cfg.head_size,
    };
    let w = wkv_case::bench_times(d, 5).expect("wkv bench");
    let (f, b) = w.fused.expect("micro's head size has a fused WKV kernel");
    let fused = f.0 + b.0;
    let twin = w.reference_forward.0 + w.reference_backward.0;
    println!(
        "\nWKV op per layer: fused fwd {:.2} + bwd {:.2} = {fused:.2} ms; reference twins \
         {:.0} + {:.0} ms ({:.0}x); through candle {:.2} ms",
        f.0,
        b.0,
        w.reference_forward.0,
        w.reference_backward.0,
        twin / fused,
        w.candle_op.0
    );
}

fn train_config() -> TrainConfig {
    toml::from_str(
        "train_data = \"x\"\ntokenizer = \"x\"\nbatch_size = 4\nctx_len = 256\nmax_steps = 10\nlr = 1e-4\n",
    )
    .unwrap()
}

/// Seconds per call: minimum and median wall time, and the least CPU time (all threads).
#[derive(Clone, Copy)]
struct Timing {
    min: f64,
    median: f64,
    cpu: f64,
}

/// Runs `f` once to warm up, then `iters` times.
fn time(iters: usize, mut f: impl FnMut()) -> Timing {
    f();
    let mut s: Vec<(f64, f64)> = (0..iters.max(1))
        .map(|_| {
            let (t0, c0) = (Instant::now(), cpu_seconds());
            f();
            (t0.elapsed().as_secs_f64(), cpu_seconds() - c0)
        })
        .collect();
    let cpu = s.iter().map(|x| x.1).fold(f64::MAX, f64::min);
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    Timing {
        min: s[0].0,
        median: s[s.len() / 2].0,
        cpu,
    }
}

/// GFLOP/s of a 1024³ f32 matmul through candle (best of 5).
fn sgemm_probe() -> f64 {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1., (1024, 1024), &dev).unwrap();
    let b = Tensor::randn(0f32, 1., (1024, 1024), &dev).unwrap();
    let t = time(5, || {
        std::hint::black_box(a.matmul(&b).unwrap());
    });
    2.0 * 1024f64.powi(3) / t.min / 1e9
}

/// CPU time of this process so far (0 where getrusage is missing).
#[cfg(not(unix))]
fn cpu_seconds() -> f64 {
    0.0
}

/// CPU time of this process so far.
#[cfg(unix)]
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// VmHWM from /proc/self/status, in GB (0 where unavailable).
fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb * 1024.0 / 1e9)
        .unwrap_or(0.0)
}
