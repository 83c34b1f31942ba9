//! Training throughput of `micro` (configs/micro.toml) with a 16384-token vocabulary at batch
//! 4 × 256 (issue 4): forward-only, forward+backward and forward+backward+AdamW tokens/s, peak
//! RSS, and the fused WKV op against its reference twins. Run with `cargo bench --bench train`.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::Instant;
use tinybit::config::ModelConfig;
use tinybit::data::Batch;
use tinybit::model::Rwkv7;
use tinybit::model::init::init_params;
use tinybit::model::wkv;
use tinybit::train::config::TrainConfig;
use tinybit::train::optim::Optimizer;
use tinybit::train::{Trainable, batch_loss};

const BATCH: usize = 4;
const CTX: usize = 256;
const VOCAB: usize = 16384;

fn main() {
    let r = std::thread::Builder::new()
        .stack_size(1 << 30)
        .spawn(run)
        .unwrap()
        .join();
    if r.is_err() {
        std::process::exit(1);
    }
}

fn run() {
    let iters: usize = std::env::var("TB_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/micro.toml");
    let cfg = ModelConfig::load(&path)
        .unwrap()
        .with_overrides(&[("vocab_size".into(), VOCAB.to_string())])
        .unwrap();
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let params = init_params(&cfg, 1, &dev).unwrap();
    eprintln!("init {:.2} s", t0.elapsed().as_secs_f64());
    let batch = random_batch(&cfg);
    let tokens = (BATCH * CTX) as f64;

    let plain: HashMap<String, Tensor> = params.iter().cloned().collect();
    let model = Rwkv7::from_params(&cfg, &plain).unwrap();
    let fwd = time(iters, || {
        batch_loss(&model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    });
    drop(model);
    if std::env::var_os("TB_BENCH_FORWARD_ONLY").is_some() {
        println!("forward {:.1} tok/s, cpu {:.3} s", tokens / fwd.0, fwd.2);
        return;
    }
    let tr = Trainable::new(&cfg, params.clone()).unwrap();
    if std::env::var_os("TB_BENCH_FB_ONLY").is_some() {
        let fb = time(iters, || {
            let loss = batch_loss(&tr.model, &batch).unwrap();
            std::hint::black_box(tr.gradients(&loss).unwrap());
        });
        println!(
            "forward+backward {:.1} tok/s, cpu {:.3} s",
            tokens / fb.0,
            fb.2
        );
        return;
    }
    drop(tr);

    let tr = Trainable::new(&cfg, params).unwrap();
    let fb = time(iters, || {
        let loss = batch_loss(&tr.model, &batch).unwrap();
        std::hint::black_box(tr.gradients(&loss).unwrap());
    });
    let tcfg: TrainConfig = toml::from_str(
        "train_data = \"x\"\ntokenizer = \"x\"\nbatch_size = 4\nctx_len = 256\nmax_steps = 10\nlr = 1e-4\n",
    )
    .unwrap();
    let mut opt = Optimizer::new(tr.vars.clone(), &tcfg);
    let full = time(iters, || {
        let loss = batch_loss(&tr.model, &batch).unwrap();
        let mut g = tr.gradients(&loss).unwrap();
        opt.clip(&mut g, 1.0);
        opt.step(&g, 1e-4, 0.1).unwrap();
    });
    let rows = [
        ("forward", fwd, 1537.0, 2174.0),
        ("forward+backward", fb, 481.0, 709.0),
        ("forward+backward+AdamW", full, 465.0, 670.0),
    ];
    println!(
        "micro, vocab {VOCAB}, batch {BATCH}x{CTX}, {} threads: tok/s (best of {iters}; median)",
        rayon::current_num_threads()
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9}",
        "", "tok/s", "median", "/torch", "/ceiling"
    );
    for (name, (min, med, _), torch, ceil) in rows {
        let best = tokens / min;
        println!(
            "{name:<24} {best:9.1} {:9.1} {:9.2} {:9.2}",
            tokens / med,
            best / torch,
            best / ceil
        );
    }
    println!("peak RSS {:.2} GB (torch 3.7 GB)", peak_rss_gb());
    let d = wkv::Dims {
        b: BATCH,
        t: CTX,
        h: cfg.n_head(),
        n: cfg.head_size,
    };
    println!("{}", wkv::bench(d, 5).unwrap());
}

fn random_batch(cfg: &ModelConfig) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let rows: Vec<(Vec<u32>, Vec<bool>)> = (0..BATCH)
        .map(|_| {
            let ids = (0..=CTX)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            (ids, vec![true; CTX + 1])
        })
        .collect();
    tinybit::data::pack(&rows, CTX)
}

/// Runs `f` once to warm up, then `iters` times; (min, median) wall seconds per call and the
/// minimum CPU seconds (user + system, all threads) per call.
fn time(iters: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
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
    (s[0].0, s[s.len() / 2].0, cpu)
}

/// CPU time of this process so far.
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
