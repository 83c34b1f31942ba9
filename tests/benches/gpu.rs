//! GPU training throughput (issue 12), one JSON line per result, beside a PyTorch anchor measured
//! once on an H200: PyTorch 2.11 eager with the official RWKV-7 training kernel (`rwkv7_clampw`,
//! BlinkDL/RWKV-LM `RWKV-v7/train_temp`), forward + backward + fused AdamW, bf16 weights, random
//! tokens, micro, vocab 16384, ctx 512. Needs `--features cuda` and a GPU;
//! `scripts/gpu_check.sh` runs it.
//!
//! * `train_step`: forward + backward + clip + AdamW of `micro` (vocab 16384, ctx 512, official
//!   init, random tokens) at each batch of `TB_BENCH_BATCHES` (default `4,16`) and each variant
//!   of `TB_BENCH_VARIANTS` (default `fused:tf32,default:tf32,default:f32`: tinybit's CUDA twins
//!   of the fused ops (opt-in, `TINYBIT_CUDA_FUSED=1`), or candle's composed ops around the WKV
//!   kernel as the baseline measured in the same run, or `composed` for the reference twins;
//!   matrix products in tf32 or f32), best and median of `TB_BENCH_ITERS` (default 5) steps after two
//!   warm-ups, with the forward alone and forward+backward timed too; MFU as the anchor counts it
//!   (6 FLOP per matrix weight and token, against 989 TFLOP/s dense bf16).
//! * `wkv`: the WKV-7 kernel alone per layer call at B16 T512 H6 (anchor: forward 0.51 ms,
//!   forward+backward 1.44 ms), and against the composed candle loop of the scan (`naive`, at
//!   T 64, where that loop's graph stays small).
//!
//! `TB_BENCH_WKV=0` skips the WKV part; `TB_BENCH_TRAIN=0` the training steps.

#[path = "common.rs"]
mod common;
#[path = "../wkv_case.rs"]
mod wkv_case;
use candle_core::{Device, Tensor, Var};
use common::{matmul_params, random_batch};
use serde_json::json;
use std::time::Instant;
use tinybit::config::ModelConfig;
use tinybit::model::fused::Kernels;
use tinybit::model::init::init_params;
use tinybit::model::wkv;
use tinybit::train::config::TrainConfig;
use tinybit::train::optim::Optimizer;
use tinybit::train::{Trainable, batch_loss};

const CTX: usize = 512;
const VOCAB: usize = 16384;
const PEAK_FLOPS: f64 = 989e12;

/// The anchor's tok/s (see the module doc) by batch.
const ANCHOR: [(usize, f64); 6] = [
    (4, 18_419.0),
    (16, 86_703.0),
    (32, 153_565.0),
    (64, 235_757.0),
    (128, 256_202.0),
    (256, 287_627.0),
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    tinybit::cli::with_big_stack(run);
}

fn run() {
    let dev = match tinybit::device::open("cuda") {
        Ok(d) => d,
        Err(e) => {
            println!(
                "{}",
                json!({"bench": "gpu", "skipped": format!("no GPU: {e}")})
            );
            return;
        }
    };
    let iters: usize = env_or("TB_BENCH_ITERS", 5);
    if env_or("TB_BENCH_TRAIN", 1) != 0 {
        let batches = std::env::var("TB_BENCH_BATCHES").unwrap_or_else(|_| "4,16".into());
        let variants = std::env::var("TB_BENCH_VARIANTS")
            .unwrap_or_else(|_| "fused:tf32,default:tf32,default:f32".into());
        for b in batches
            .split(',')
            .filter_map(|s| s.trim().parse::<usize>().ok())
        {
            for v in variants.split(',') {
                let (kernels, precision) = v.trim().split_once(':').unwrap_or((v.trim(), "tf32"));
                tinybit::device::set_precision(precision).expect("precision");
                train_step(&dev, b, iters, kernels, precision);
            }
        }
    }
    if env_or("TB_BENCH_WKV", 1) != 0 {
        wkv_alone(&dev, iters);
    }
}

fn sync(dev: &Device) {
    dev.synchronize().expect("synchronize");
}

/// Best and median seconds of `iters` calls after `warm` warm-ups; `f` ends with a sync.
fn time(warm: usize, iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warm {
        f();
    }
    let mut s: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2])
}

fn train_step(dev: &Device, batch: usize, iters: usize, kernels: &str, precision: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/micro.toml");
    let cfg = ModelConfig::load(&path)
        .and_then(|c| c.with_overrides(&[("vocab_size".into(), VOCAB.to_string())]))
        .expect("configs/micro.toml");
    let params: Vec<(String, Tensor)> = init_params(&cfg, 1, &Device::Cpu)
        .expect("init")
        .into_iter()
        .map(|(n, t)| (n, t.to_device(dev).expect("to GPU")))
        .collect();
    let mut tr = Trainable::new(&cfg, params).expect("trainable");
    // fused: the CUDA twins of the fused ops; default: candle's ops around the WKV kernel (what
    // runs unless TINYBIT_CUDA_FUSED=1); composed: every op composed (the reference twins).
    tinybit::model::fused::set_cuda_fused(kernels == "fused");
    if kernels == "composed" {
        tr.model.set_kernels(Kernels::Reference);
    }
    let tr = tr;
    let tcfg: TrainConfig = toml::from_str(&format!(
        "train_data = \"x\"\ntokenizer = \"x\"\nbatch_size = {batch}\nctx_len = {CTX}\nmax_steps = 10\nlr = 1e-4\n"
    ))
    .unwrap();
    let mut opt = Optimizer::new(tr.vars.clone(), &tcfg).expect("optimizer");
    let data = random_batch(&cfg, batch, CTX);
    let mut loss = 0.0;
    let step = |opt: &mut Optimizer, loss: &mut f32| -> tinybit::Result<()> {
        let l = batch_loss(&tr.model, &data)?;
        *loss = l.to_scalar::<f32>()?;
        let g = tr.gradient_tensors(&l)?;
        let norm = opt.grad_norm_gpu(&g)?;
        let s = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        opt.step_gpu(&g, s as f32, 1e-4, 0.1)?;
        sync(dev);
        Ok(())
    };
    // A batch that does not fit is a result, not a crash.
    if let Err(e) = step(&mut opt, &mut loss) {
        println!(
            "{}",
            json!({"bench": "train_step", "batch": batch, "ctx": CTX, "kernels": kernels, "precision": precision,
                "error": e.to_string().lines().next().unwrap_or("")})
        );
        return;
    }
    let (best, median) = time(1, iters, || step(&mut opt, &mut loss).expect("step"));
    let (fwd, _) = time(1, iters, || {
        let l = batch_loss(&tr.model, &data).expect("forward");
        std::hint::black_box(l.to_scalar::<f32>().expect("loss"));
    });
    let (fwd_bwd, _) = time(1, iters, || {
        let l = batch_loss(&tr.model, &data).expect("forward");
        std::hint::black_box(tr.gradient_tensors(&l).expect("backward"));
        sync(dev);
    });
    let tokens = (batch * CTX) as f64;
    let tok_s = tokens / best;
    let anchor = ANCHOR.iter().find(|a| a.0 == batch).map(|a| a.1);
    println!(
        "{}",
        json!({"bench": "train_step", "model": "micro", "vocab": VOCAB, "batch": batch, "ctx": CTX,
            "kernels": kernels, "precision": precision, "tok_per_s": tok_s, "tok_per_s_median": tokens / median,
            "ms_per_step": best * 1e3, "ms_forward": fwd * 1e3, "ms_forward_backward": fwd_bwd * 1e3, "mfu": 6.0 * matmul_params(&cfg) * tok_s / PEAK_FLOPS,
            "anchor_tok_per_s": anchor, "vs_anchor": anchor.map(|a| tok_s / a), "loss": loss})
    );
}

/// Forward and forward+backward ms of one WKV call on the GPU, fused kernel or composed loop.
fn wkv_ms(dev: &Device, d: wkv::Dims, iters: usize, composed: bool) -> (f64, f64) {
    let case = wkv_case::random_case(d, 3);
    let x = Var::from_vec(case.packed, (6, d.b, d.t, d.h, d.n), dev).unwrap();
    let s0 = Var::from_vec(case.s0, (d.b, d.h, d.n, d.n), dev).unwrap();
    let call = || {
        if composed {
            wkv::wkv7_composed(&x, &s0).unwrap()
        } else {
            wkv::wkv7_packed(&x, &s0).unwrap()
        }
    };
    let (fwd, _) = time(2, iters, || {
        std::hint::black_box(call());
        sync(dev);
    });
    let (both, _) = time(2, iters, || {
        let (y, s) = call();
        let loss = (y.sum_all().unwrap() + s.sum_all().unwrap()).unwrap();
        std::hint::black_box(loss.backward().unwrap());
        sync(dev);
    });
    (fwd * 1e3, both * 1e3)
}

fn wkv_alone(dev: &Device, iters: usize) {
    let d = wkv::Dims {
        b: 16,
        t: 512,
        h: 6,
        n: 64,
    };
    let (f, fb) = wkv_ms(dev, d, iters, false);
    println!(
        "{}",
        json!({"bench": "wkv", "shape": "B16 T512 H6 N64", "fwd_ms": f, "fwd_bwd_ms": fb,
            "anchor_fwd_ms": 0.51, "anchor_fwd_bwd_ms": 1.44, "vs_anchor": 1.44 / fb})
    );
    let small = wkv::Dims { t: 64, ..d };
    let (ff, ffb) = wkv_ms(dev, small, iters, false);
    let (nf, nfb) = wkv_ms(dev, small, iters.min(3), true);
    println!(
        "{}",
        json!({"bench": "wkv_vs_naive", "shape": "B16 T64 H6 N64", "fused_fwd_bwd_ms": ffb,
            "naive_fwd_bwd_ms": nfb, "fused_fwd_ms": ff, "naive_fwd_ms": nf,
            "speedup_fwd_bwd": nfb / ffb, "seed_claim": 25.0})
    );
}
