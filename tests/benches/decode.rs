//! `cargo bench --bench decode`: the CPU engine on the `micro` shape with a 16384 vocabulary
//! (random weights), against the candle model measured in the same run.
//!
//! Prints decode tok/s (f32, f16, bf16 weights, and a packed BitLinear copy; 1 and 2 threads),
//! prefill tok/s for 512 tokens (engine chunked, engine token by token, candle sequence forward),
//! time to first token, and the resident memory after 100 and 10,000 generated tokens.
//! Set `TB_BENCH_QUICK=1` for a short run.

#[allow(dead_code)]
#[path = "../common.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::time::Instant;
use tinybit::checkpoint::{self, Meta, TEMPLATE_TINYBIT};
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

/// The memory measurement, run in a child process: load, generate, report VmRSS on the way.
fn rss_child(path: &Path, n: usize) {
    println!("before load:            {}", rss());
    let mut e = load(path, 2, None);
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

fn main() {
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
    let mut cfg = common::preset("micro");
    cfg.vocab_size = 16384;
    let dir = tempfile::tempdir().unwrap();
    let params = common::noisy_params(&cfg, 1);
    let meta = Meta {
        config: cfg.clone(),
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: None,
    };
    let path_of = |name: &str| dir.path().join(format!("micro-{name}.safetensors"));
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
        "micro, vocab 16384: {:.1}M parameters; kernel {:?}; {} CPUs",
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
    for name in ["f32", "f16", "bf16"] {
        for threads in [1, 2] {
            let mut e = load(&path_of(name), threads, None);
            let r = decode_rate(&mut e, n_decode);
            println!(
                "engine {name:>4}, {threads} thread{}:              {r:>7.1} tok/s  ({:.2} ms/token, {:.1}x candle)",
                if threads == 1 { " " } else { "s" },
                1000.0 / r,
                r / candle_rate
            );
        }
    }
    for threads in [1, 2] {
        let mut e = load(&path_of("ternary"), threads, None);
        let r = decode_rate(&mut e, n_decode);
        println!(
            "engine ternary (packed file, f16 rest), {threads} thread{}: {r:>7.1} tok/s  ({:.2} ms/token, {:.1}x candle f32)",
            if threads == 1 { " " } else { "s" },
            1000.0 / r,
            r / candle_rate
        );
    }
    let mut e = load(&path_of("f32"), 1, Some(Kernel::Portable));
    let r = decode_rate(&mut e, n_decode / 4);
    println!(
        "engine  f32, 1 thread, portable kernel: {r:>7.1} tok/s  ({:.1}x candle)",
        r / candle_rate
    );

    let n_prefill = 512;
    println!("\n== prefill ({n_prefill} tokens, f32 weights) ==");
    let prompt = tokens(n_prefill, 16384);
    let t0 = Instant::now();
    let input = Tensor::from_slice(&prompt, (1, n_prefill), &Device::Cpu).unwrap();
    let _ = model.forward(&input, None).unwrap();
    let candle_prefill = n_prefill as f64 / t0.elapsed().as_secs_f64();
    println!(
        "baseline candle sequence forward, {candle_threads} threads: {candle_prefill:>7.1} tok/s"
    );
    drop(model);
    for name in ["f32", "f16"] {
        for threads in [1, 2] {
            let mut e = load(&path_of(name), threads, None);
            let mut st = e.new_state();
            e.prefill(&prompt[..32], &mut st).unwrap();
            let mut st = e.new_state();
            let t0 = Instant::now();
            e.prefill(&prompt, &mut st).unwrap();
            let r = n_prefill as f64 / t0.elapsed().as_secs_f64();
            println!(
                "engine chunked {name:>4}, {threads} thread{}:       {r:>7.1} tok/s  ({:.1}x candle)",
                if threads == 1 { " " } else { "s" },
                r / candle_prefill
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
}
