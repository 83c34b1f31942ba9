//! `cargo bench --bench decode`: the CPU engine on the `micro` shape with a 16384 vocabulary
//! (random weights), against the candle model measured in the same run. `TB_BENCH_SHAPE=bit` or
//! `qbit` takes that preset's shape instead (still vocab 16384, and the packed copy ternary in
//! attention and FFN alike, as micro's).
//!
//! Prints decode tok/s (f32, f16, bf16 weights, and a packed BitLinear copy; 1 and 2 threads)
//! with the weight bytes each token reads and the bandwidth that makes, against this machine's
//! read bandwidth measured in the same run (a 512 MiB buffer) and against a plain read of as
//! many bytes as the token reads (which a large L3 may hold between tokens); prefill tok/s for
//! 512 tokens (engine chunked, engine token by token, candle sequence forward); time to first
//! token; the resident memory after 100 and 10,000 generated tokens; and the fixed cost of a
//! layer per token (d_model 128 models of 2 and 10 layers, against llama.cpp on the same shapes).
//!
//! When llama.cpp's anchor is found (`TB_LLAMACPP_ANCHOR`, default `../shared/anchors/llamacpp`
//! beside the checkout; `TB_BENCH_NO_LLAMACPP=1` skips it), its llama-bench runs first on the
//! same shape (`scripts/bench_llamacpp.sh`) and every engine figure is printed as a ratio to it;
//! it runs again after the engine, and each ratio is printed against both runs (on a shared host a
//! neighbour's load can change in between: a goal met against one run only is not met).
//! Set `TB_BENCH_QUICK=1` for a short run. To profile one precision: `TB_BENCH_KEEP=DIR` keeps the
//! model files in DIR, then `TB_BENCH_RSS_CHILD=DIR/micro-ternary.safetensors
//! TB_BENCH_RSS_TOKENS=N` on the bench binary decodes N tokens of it and nothing else
//! (on `TB_BENCH_THREADS`, default 2; `TB_BENCH_PREFILL_REPS=N` instead: N prefills of 512
//! tokens, on `TB_BENCH_THREADS`, default 1).

#[allow(dead_code)]
#[path = "../common.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tinybit::checkpoint::{self, Meta, TEMPLATE_TINYBIT};
use tinybit::config::ModelConfig;
use tinybit::engine::{Engine, EngineOptions, Kernel};
use tinybit::generate::{Event, GenOptions, Generation};
use tinybit::model::Rwkv7;
use tinybit::sample::{Sampler, SamplerConfig};
use tinybit::tokenizer::Tokenizer;

fn quick() -> bool {
    std::env::var_os("TB_BENCH_QUICK").is_some()
}

/// `VmRSS`, `RssAnon` and `RssFile` of this process, in MiB.
fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or("?".to_string(), |kb| format!("{:.1}", kb / 1024.0))
    };
    format!(
        "VmRSS {} MiB (anon {}, file {})",
        field("VmRSS:"),
        field("RssAnon:"),
        field("RssFile:")
    )
}

/// Eight independent sums, so the loop is bound by loads, not by one add chain; on x86 the
/// line 4 KiB ahead is requested each time, as the engine's products do (the hardware prefetcher
/// stops at page boundaries, and a single thread without it reads far below the machine's rate).
fn sum_lanes(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for ch in c.chunks_exact(8) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is baseline on x86_64; a prefetch never faults.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(ch.as_ptr().wrapping_add(512).cast());
        }
        for (a, v) in acc.iter_mut().zip(ch) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().fold(0, |a, v| a.wrapping_add(*v))
}

/// Read bandwidth in GB/s: `threads` threads summing disjoint parts of a buffer of `bytes`,
/// again and again for at least 512 MiB, best of three. The buffer is on 2 MiB pages where Linux
/// grants them, as the engine's weights are. A buffer the size of a model's per-token reads tells
/// what a plain read of the same bytes reaches wherever they live: on a host with a large L3 a
/// whole model can stay in cache between tokens, and beat the memory's figure.
fn read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let n = bytes.div_ceil(64) * 8;
    let passes = (512usize << 20).div_ceil(n * 8);
    let mut region = memmap2::MmapMut::map_anon(n * 8).unwrap();
    #[cfg(target_os = "linux")]
    let _ = region.advise(memmap2::Advice::HugePage);
    // SAFETY: the anonymous map is page-aligned, n·8 bytes long, and ours alone.
    let buf: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(region.as_mut_ptr().cast(), n) };
    for (i, v) in buf.iter_mut().enumerate() {
        *v = i as u64;
    }
    let buf = &*buf;
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let sum: u64 = std::thread::scope(|sc| {
            let parts: Vec<_> = buf
                .chunks(n.div_ceil(threads).next_multiple_of(8))
                .map(|c| sc.spawn(move || (0..passes).map(|_| sum_lanes(c)).sum::<u64>()))
                .collect();
            parts.into_iter().map(|h| h.join().unwrap()).sum()
        });
        std::hint::black_box(sum);
        best = best.max((passes * n * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// llama-bench's tok/s by (type, threads, test), e.g. ("TQ2_0", 1, "tg128").
type Llama = HashMap<(String, usize, String), f64>;

/// The llama.cpp types the anchor runs for the main table.
const ALL_TYPES: &str = "F32 F16 Q8_0 Q4_0 TQ2_0";

/// Runs llama.cpp's anchor on a shape when it is there, for `types`.
fn llamacpp(cfg: &ModelConfig, types: &str) -> Llama {
    let mut out = Llama::new();
    if std::env::var_os("TB_BENCH_NO_LLAMACPP").is_some() {
        return out;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let anchor = std::env::var_os("TB_LLAMACPP_ANCHOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/anchors/llamacpp"));
    if !anchor.join("bench.sh").exists() {
        println!(
            "(no llama.cpp anchor at {}; set TB_LLAMACPP_ANCHOR)",
            anchor.display()
        );
        return out;
    }
    let run = std::process::Command::new("bash")
        .arg(root.join("scripts/bench_llamacpp.sh"))
        .arg(&anchor)
        .arg("--")
        .args(["--n-layer", &cfg.n_layer.to_string()])
        .args(["--d-model", &cfg.d_model.to_string()])
        .args(["--d-ffn", &cfg.d_ffn.to_string()])
        .args(["--vocab", &cfg.vocab_size.to_string()])
        .env("THREADS", "1,2")
        .env("TYPES", types)
        .env("REPS", if quick() { "1" } else { "3" })
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    print!("{text}");
    if !run.status.success() {
        println!(
            "(llama.cpp anchor failed: {})",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    for line in text.lines().filter(|l| l.starts_with("| rwkv7")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(model), Some(threads), Some(test), Some(rate)) =
            (cells.get(1), cells.get(5), cells.get(6), cells.get(7))
        else {
            continue;
        };
        let types = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "TQ1_0", "TQ2_0"];
        let ty = model.split_whitespace().find(|w| types.contains(w));
        let ty = ty.unwrap_or("?").to_string();
        let rate = rate.split_whitespace().next().and_then(|r| r.parse().ok());
        if let (Ok(threads), Some(rate)) = (threads.parse(), rate) {
            out.insert((ty, threads, test.to_string()), rate);
        }
    }
    out
}

/// "1.23x llama.cpp TYPE" or nothing when the anchor did not run.
fn vs(llama: &Llama, rate: f64, types: &[&str], threads: usize, test: &str) -> String {
    let best = types
        .iter()
        .filter_map(|t| Some((*t, *llama.get(&(t.to_string(), threads, test.to_string()))?)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    best.map_or(String::new(), |(t, r)| {
        format!("  {:.2}x llama.cpp {t} ({r:.1})", rate / r)
    })
}

fn load(path: &Path, threads: usize, kernel: Option<Kernel>) -> Engine {
    Engine::load(
        path,
        &EngineOptions {
            threads,
            kernel,
            ..Default::default()
        },
    )
    .unwrap()
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7919 + 13) % vocab as u32)
        .collect()
}

/// Greedy decode tok/s: engine step + argmax, after a short prompt and a warm-up.
fn decode_rate(e: &mut Engine, n: usize) -> f64 {
    let mut st = e.new_state();
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let mut next = s
        .sample(e.prefill(&tokens(16, 16384), &mut st).unwrap())
        .unwrap();
    for _ in 0..8 {
        next = s.sample(e.step(next, &mut st).unwrap()).unwrap();
    }
    let t0 = Instant::now();
    for _ in 0..n {
        next = s.sample(e.step(next, &mut st).unwrap()).unwrap();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

const RSS_CHILD: &str = "TB_BENCH_RSS_CHILD";

/// A profiling child's engine threads: `TB_BENCH_THREADS`, else `default`.
fn child_threads(default: usize) -> usize {
    std::env::var("TB_BENCH_THREADS").map_or(default, |v| {
        v.parse().expect("TB_BENCH_THREADS is a thread count")
    })
}

/// The memory measurement, run in a child process: load, generate, report VmRSS on the way.
fn rss_child(path: &Path, n: usize) {
    println!("before load:            {}", rss());
    let mut e = load(path, child_threads(2), None);
    println!("after load:             {}", rss());
    let mut st = e.new_state();
    let mut s = Sampler::new(SamplerConfig::default()).unwrap();
    let tok = Tokenizer::world();
    let mut dec = tok.stream_decoder();
    let mut text_bytes = 0usize;
    let mut next = s
        .sample(e.prefill(&tokens(16, 16384), &mut st).unwrap())
        .unwrap();
    let t0 = Instant::now();
    for i in 1..=n {
        s.accept(next);
        text_bytes += dec.push(next).len();
        next = s.sample(e.step(next, &mut st).unwrap()).unwrap();
        if i == 100 || i == n {
            println!("after {i:>6} tokens:     {}", rss());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "({n} tokens in {secs:.1} s = {:.1} tok/s including sampling; {text_bytes} bytes of text)",
        n as f64 / secs
    );
}

/// The prefill alone, for a profiler: `reps` prompts of 512 tokens.
fn prefill_child(path: &Path, reps: usize) {
    let threads = child_threads(1);
    let mut e = load(path, threads, None);
    let prompt = tokens(512, 16384);
    let t0 = Instant::now();
    for _ in 0..reps {
        let mut st = e.new_state();
        e.prefill(&prompt, &mut st).unwrap();
    }
    let rate = (reps * prompt.len()) as f64 / t0.elapsed().as_secs_f64();
    println!("prefill, {threads} threads: {rate:.1} tok/s");
}

fn main() {
    if let (Some(path), Ok(reps)) = (
        std::env::var_os(RSS_CHILD),
        std::env::var("TB_BENCH_PREFILL_REPS"),
    ) {
        prefill_child(Path::new(&path), reps.parse().unwrap());
        return;
    }
    if let Some(path) = std::env::var_os(RSS_CHILD) {
        let n = std::env::var("TB_BENCH_RSS_TOKENS")
            .unwrap()
            .parse()
            .unwrap();
        rss_child(Path::new(&path), n);
        return;
    }
    let n_decode = if quick() { 40 } else { 300 };
    let n_rss = if quick() { 1000 } else { 10_000 };
    let shape = std::env::var("TB_BENCH_SHAPE").unwrap_or_else(|_| "micro".into());
    let mut cfg = common::preset(&shape);
    cfg.vocab_size = 16384;
    assert_eq!(cfg.head_size, 64, "llama.cpp's anchor makes heads of 64");
    // TB_BENCH_KEEP=DIR keeps the model files there (to profile one: TB_BENCH_RSS_CHILD=FILE).
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("TB_BENCH_KEEP").map_or(tmp.path().to_path_buf(), PathBuf::from);
    std::fs::create_dir_all(&dir).unwrap();
    let params = common::noisy_params(&cfg, 1);
    let meta = Meta {
        config: cfg.clone(),
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: None,
    };
    let path_of = |name: &str| dir.join(format!("{shape}-{name}.safetensors"));
    for (dt, name) in [
        (DType::F32, "f32"),
        (DType::F16, "f16"),
        (DType::BF16, "bf16"),
    ] {
        checkpoint::save_with_dtype(&path_of(name), &meta, &params, dt).unwrap();
    }
    // The same weights as a BitLinear model, packed (trits for r/k/v/o and the FFN, f16 rest).
    let mut tern_cfg = cfg.clone();
    tern_cfg.ternary_att = true;
    tern_cfg.ternary_ffn = true;
    let tern_meta = Meta {
        config: tern_cfg,
        ..meta.clone()
    };
    checkpoint::save_ternary(&path_of("ternary"), &tern_meta, &params, DType::F16).unwrap();
    drop(params);
    println!(
        "{shape}, vocab 16384: {:.1}M parameters; kernel {:?}; {} CPUs",
        cfg.param_count() as f64 / 1e6,
        Kernel::detect(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // Memory in a fresh process: this one already holds the allocator's leftovers from building
    // the model.
    println!(
        "\n== resident memory (f16 weights mapped, 2 threads, default sampler; fresh process) =="
    );
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(RSS_CHILD, path_of("f16"))
        .env("TB_BENCH_RSS_TOKENS", n_rss.to_string())
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&child.stdout));
    assert!(
        child.status.success(),
        "{}",
        String::from_utf8_lossy(&child.stderr)
    );

    println!("\n== llama.cpp anchor (same shape, random weights; run first, same sitting) ==");
    let llama = llamacpp(&cfg, ALL_TYPES);
    let big = if quick() { 256 << 20 } else { 512 << 20 };
    let bw = [read_bandwidth(big, 1), read_bandwidth(big, 2)];
    println!(
        "\nmachine read bandwidth (a {} MiB buffer): {:.1} GB/s (1 thread), {:.1} GB/s (2 threads); load average {}",
        big >> 20,
        bw[0],
        bw[1],
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    println!("\n== decode (greedy, {n_decode} tokens after a 16-token prompt) ==");
    let candle_threads = candle_core::utils::get_num_threads();
    let ck = checkpoint::load(&path_of("f32"), &Device::Cpu).unwrap();
    let model = Rwkv7::from_params(&ck.meta.config, &ck.params).unwrap();
    drop(ck);
    let candle_rate = {
        let mut st = model.zero_state(1).unwrap();
        let prompt = tokens(16, 16384);
        let input = Tensor::from_slice(&prompt, (1, 16), &Device::Cpu).unwrap();
        let (_, s0) = model.forward(&input, None).unwrap();
        st.layers = s0.layers;
        let n = if quick() { 5 } else { 40 };
        let mut next = 1u32;
        let t0 = Instant::now();
        for _ in 0..n {
            let logits = model.step(&[next], &mut st).unwrap();
            next = logits
                .squeeze(0)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
        }
        n as f64 / t0.elapsed().as_secs_f64()
    };
    println!(
        "baseline candle Rwkv7::step, f32, {candle_threads} threads: {candle_rate:>7.1} tok/s"
    );
    // "ternary": the packed BitLinear file (2-bit body, 8-bit activations, f16 LoRAs; its f16 head
    // loaded as 8-bit rows, `EngineOptions::head_q8`'s default for packed files); "+f16h": the
    // same file with the head as stored.
    let mut decode = HashMap::new();
    // (label, tok/s, llama.cpp types, threads, llama-bench test) of each figure with a ratio.
    let mut against: Vec<(String, f64, &[&str], usize, &str)> = Vec::new();
    for name in ["f32", "f16", "bf16", "ternary", "ternary+f16h"] {
        for threads in [1, 2] {
            let file = path_of(name.trim_end_matches("+f16h"));
            let opts = EngineOptions {
                threads,
                head_q8: name.ends_with("+f16h").then_some(false),
                ..Default::default()
            };
            let mut e = Engine::load(&file, &opts).unwrap();
            let r = decode_rate(&mut e, n_decode);
            decode.insert((name, threads), r);
            let bytes = e.bytes_per_token() as f64;
            let gbs = bytes * r / 1e9;
            let plain = read_bandwidth(bytes as usize, threads);
            let llama_types: &[&str] = match name {
                "f32" => &["F32"],
                "f16" => &["F16"],
                "ternary" | "ternary+f16h" => &["TQ2_0", "Q4_0", "Q8_0"],
                _ => &[],
            };
            println!(
                "engine {name:>11}, {threads} thread{}: {r:>7.1} tok/s  {:.2} ms/token, {:.1} MB/token = {gbs:.1} GB/s ({:.0}% of the machine's, {:.0}% of a plain read of as many bytes: {plain:.1} GB/s), {:.2}x engine f32, {:.1}x candle{}",
                if threads == 1 { " " } else { "s" },
                1000.0 / r,
                bytes / 1e6,
                100.0 * gbs / bw[threads - 1],
                100.0 * gbs / plain,
                r / decode[&("f32", threads)],
                r / candle_rate,
                vs(&llama, r, llama_types, threads, "tg128"),
            );
            against.push((
                format!("decode {name}, {threads}t"),
                r,
                llama_types,
                threads,
                "tg128",
            ));
        }
    }
    let mut e = load(&path_of("f32"), 1, Some(Kernel::Portable));
    let r = decode_rate(&mut e, n_decode / 4);
    println!(
        "engine  f32, 1 thread, portable kernel: {r:>7.1} tok/s  ({:.1}x candle)",
        r / candle_rate
    );

    let n_prefill = 512;
    println!("\n== prefill ({n_prefill} tokens) ==");
    let prompt = tokens(n_prefill, 16384);
    let t0 = Instant::now();
    let input = Tensor::from_slice(&prompt, (1, n_prefill), &Device::Cpu).unwrap();
    let _ = model.forward(&input, None).unwrap();
    let candle_prefill = n_prefill as f64 / t0.elapsed().as_secs_f64();
    println!(
        "baseline candle sequence forward, {candle_threads} threads: {candle_prefill:>7.1} tok/s"
    );
    drop(model);
    for name in ["f32", "f16", "ternary"] {
        for threads in [1, 2] {
            let mut e = load(&path_of(name), threads, None);
            let mut st = e.new_state();
            e.prefill(&prompt[..32], &mut st).unwrap();
            let mut st = e.new_state();
            let t0 = Instant::now();
            e.prefill(&prompt, &mut st).unwrap();
            let r = n_prefill as f64 / t0.elapsed().as_secs_f64();
            let llama_types: &[&str] = match name {
                "f32" => &["F32"],
                "f16" => &["F16"],
                _ => &["TQ2_0", "Q4_0", "Q8_0"],
            };
            println!(
                "engine chunked {name:>7}, {threads} thread{}: {r:>7.1} tok/s  ({:.1}x candle f32){}",
                if threads == 1 { " " } else { "s" },
                r / candle_prefill,
                vs(&llama, r, llama_types, threads, "pp512"),
            );
            against.push((
                format!("prefill {name}, {threads}t"),
                r,
                llama_types,
                threads,
                "pp512",
            ));
        }
    }
    if !llama.is_empty() {
        println!("\n== llama.cpp anchor, run again after the engine ==");
        let again = llamacpp(&cfg, ALL_TYPES);
        println!("\n== each ratio against llama.cpp's first run | its second run ==");
        for (label, r, types, threads, test) in against.iter().filter(|a| !a.2.is_empty()) {
            println!(
                "{label:<24}{} |{}",
                vs(&llama, *r, types, *threads, test),
                vs(&again, *r, types, *threads, test)
            );
        }
    }
    let mut e = load(&path_of("f32"), 2, None);
    let mut st = e.new_state();
    let t0 = Instant::now();
    for &t in &prompt {
        e.step(t, &mut st).unwrap();
    }
    let r = n_prefill as f64 / t0.elapsed().as_secs_f64();
    println!(
        "engine token by token f32, 2 threads: {r:>7.1} tok/s  ({:.1}x candle)",
        r / candle_prefill
    );

    println!("\n== time to first token (generation loop, default sampler, 2 threads) ==");
    let tok = Tokenizer::world();
    for name in ["f32", "f16"] {
        for n_prompt in [16, 512] {
            // Load time is separate: the engine is built once per chat.
            let t_load = Instant::now();
            let mut e = load(&path_of(name), 2, None);
            let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
            let mut st = e.new_state();
            let mut s = Sampler::new(SamplerConfig::default()).unwrap();
            let opts = GenOptions {
                max_tokens: Some(1),
                ..Default::default()
            };
            let p = &prompt[..n_prompt];
            let mut g = Generation::new(&mut e, &mut st, &mut s, &tok, p, opts).unwrap();
            for ev in g.by_ref() {
                if matches!(ev.unwrap(), Event::Stop(_)) {
                    break;
                }
            }
            let ttft = g.stats().time_to_first_token.unwrap();
            println!(
                "{name:>4}, {n_prompt:>3}-token prompt: {:>7.1} ms  (engine load {load_ms:.1} ms)",
                ttft.as_secs_f64() * 1e3
            );
        }
    }
    fixed_cost(&dir);
}

/// What a token costs in one layer apart from reading weights: two f32 models of d_model 128
/// (2 and 10 layers, vocab 16384, weights small enough to stay in cache), the difference of
/// their per-token times over the 8 extra layers, next to llama.cpp's on the same two shapes.
fn fixed_cost(dir: &Path) {
    println!(
        "\n== fixed cost per layer (d_model 128, f32; 10-layer minus 2-layer time per token / 8) =="
    );
    let mut us = HashMap::new();
    let mut llama = HashMap::new();
    let mut bytes = HashMap::new();
    for n_layer in [2, 10] {
        let mut cfg = common::preset("micro");
        (cfg.n_layer, cfg.d_model, cfg.d_ffn, cfg.vocab_size) = (n_layer, 128, 448, 16384);
        let meta = Meta {
            config: cfg.clone(),
            template: TEMPLATE_TINYBIT.into(),
            tokenizer: None,
        };
        let path = dir.join(format!("d128-l{n_layer}.safetensors"));
        checkpoint::save_with_dtype(&path, &meta, &common::noisy_params(&cfg, 2), DType::F32)
            .unwrap();
        for threads in [1, 2] {
            let mut e = load(&path, threads, None);
            let r = decode_rate(&mut e, if quick() { 300 } else { 2000 });
            us.insert((n_layer, threads), 1e6 / r);
            bytes.insert(n_layer, e.bytes_per_token() as f64);
        }
        let l = llamacpp(&cfg, "F32");
        for threads in [1, 2] {
            if let Some(r) = l.get(&("F32".to_string(), threads, "tg128".to_string())) {
                llama.insert((n_layer, threads), 1e6 / r);
            }
        }
    }
    for threads in [1, 2] {
        let per_layer = |t: &HashMap<(usize, usize), f64>| {
            Some((t.get(&(10, threads))? - t.get(&(2, threads))?) / 8.0)
        };
        let engine = per_layer(&us).unwrap();
        // A layer's weights are not nothing at d_model 128 (0.8 MB in f32): the time a plain
        // read of them takes, at the rate a buffer of the 10-layer model's size reads, is
        // subtracted to leave the fixed cost.
        let layer_bytes = (bytes[&10] - bytes[&2]) / 8.0;
        let read_us = layer_bytes / read_bandwidth(bytes[&10] as usize, threads) / 1e3;
        let theirs = per_layer(&llama).map_or(String::new(), |l| {
            format!(
                ";  llama.cpp {l:.1} µs per layer ({:.1}x the engine's)",
                l / engine
            )
        });
        println!(
            "{threads} thread{}: engine {engine:.1} µs per layer ({:.2} MB of weights, {read_us:.1} µs to read them plainly: {:.1} µs fixed), {:.0} µs per token at 10 layers{theirs}",
            if threads == 1 { " " } else { "s" },
            layer_bytes / 1e6,
            engine - read_us,
            us[&(10, threads)]
        );
    }
}
