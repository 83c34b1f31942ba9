//! The CPU engine against the golden files and the candle model, the sampler on hand-made logits,
//! and the generation loop (events, stop strings, tool calls, state, determinism).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use tinybit::checkpoint::{self, Meta, TEMPLATE_TINYBIT};
use tinybit::config::ModelConfig;
use tinybit::engine::{Engine, EngineOptions, EngineState, Kernel, PREFILL_CHUNK, WeightDtype};
use tinybit::generate::{Event, GenOptions, Generation, OutputParser, StopReason, ToolCall};
use tinybit::model::params::ternary_eligible;
use tinybit::model::{Rwkv7, State};
use tinybit::sample::{Sampler, SamplerConfig};
use tinybit::tokenizer::{Special, Tokenizer};

const TOL: f32 = 1e-4;

/// The head as stored: these tests compare with candle, which has no 8-bit head.
fn opts(threads: usize) -> EngineOptions {
    EngineOptions {
        threads,
        head_q8: Some(false),
        ..Default::default()
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Max |Δ| over every state tensor of two candle states.
fn state_diff(a: &State, b: &State) -> f32 {
    a.layers
        .iter()
        .zip(&b.layers)
        .map(|(x, y)| {
            max_diff(&flat(&x.att_shift), &flat(&y.att_shift))
                .max(max_diff(&flat(&x.wkv), &flat(&y.wkv)))
                .max(max_diff(&flat(&x.ffn_shift), &flat(&y.ffn_shift)))
        })
        .fold(0f32, f32::max)
}

fn engine_state_diff(cfg: &ModelConfig, a: &EngineState, b: &EngineState) -> f32 {
    state_diff(
        &a.to_model_state(cfg, &Device::Cpu).unwrap(),
        &b.to_model_state(cfg, &Device::Cpu).unwrap(),
    )
}

/// All logits of `tokens` fed one at a time.
fn stepwise(e: &mut Engine, st: &mut EngineState, tokens: &[u32]) -> Vec<f32> {
    let mut out = Vec::new();
    for &t in tokens {
        out.extend_from_slice(e.step(t, st).unwrap());
    }
    out
}

/// All logits of `tokens` through the chunked path.
fn chunked(e: &mut Engine, st: &mut EngineState, tokens: &[u32]) -> Vec<f32> {
    let mut out = Vec::new();
    e.forward_all(tokens, st, |_, l| out.extend_from_slice(l))
        .unwrap();
    out
}

fn check_golden_state(file: &str, what: &str, cfg: &ModelConfig, st: &EngineState, bytes: &[u8]) {
    let got = st.to_model_state(cfg, &Device::Cpu).unwrap();
    for (i, l) in got.layers.iter().enumerate() {
        for (field, t) in [
            ("att_shift", &l.att_shift),
            ("wkv", &l.wkv),
            ("ffn_shift", &l.ffn_shift),
        ] {
            let want = read_tensor(bytes, &format!("golden.state.{i}.{field}"));
            let d = max_diff(&flat(t), &flat(&want));
            assert!(
                d <= TOL,
                "{file} ({what}): state.{i}.{field} differs by {d}"
            );
        }
    }
}

#[test]
fn engine_golden_parity() {
    let files = golden_model_files();
    assert!(!files.is_empty(), "no golden model files");
    for path in files {
        let file = path.display().to_string();
        let bytes = std::fs::read(&path).unwrap();
        let tokens = tokens_of(&read_tensor(&bytes, "golden.tokens"));
        let tokens2 = tokens_of(&read_tensor(&bytes, "golden.tokens2"));
        let want = flat(&read_tensor(&bytes, "golden.logits"));
        let want2 = flat(&read_tensor(&bytes, "golden.logits2"));
        for (threads, kernel) in [(1, None), (2, None), (1, Some(Kernel::Portable))] {
            let what = format!("threads {threads}, kernel {kernel:?}");
            let mut e = Engine::load(
                &path,
                &EngineOptions {
                    threads,
                    kernel,
                    ..Default::default()
                },
            )
            .unwrap();
            let cfg = e.config().clone();
            let v = cfg.vocab_size;
            // Official layouts carry no tokenizer: a usage error that says what to pass.
            let err = e.tokenizer().unwrap_err();
            assert!(err.to_string().contains("--tokenizer"), "{err}");

            // Token by token.
            let mut st = e.new_state();
            let d = max_diff(&stepwise(&mut e, &mut st, &tokens), &want);
            assert!(
                d <= TOL,
                "{file} ({what}): token-by-token logits differ by {d}"
            );
            check_golden_state(&file, &what, &cfg, &st, &bytes);

            // Chunked, every position's logits.
            let mut st = e.new_state();
            let d = max_diff(&chunked(&mut e, &mut st, &tokens), &want);
            assert!(d <= TOL, "{file} ({what}): chunked logits differ by {d}");
            check_golden_state(&file, &what, &cfg, &st, &bytes);

            // Prefill: the last position only.
            let mut st = e.new_state();
            let last = e.prefill(&tokens, &mut st).unwrap().to_vec();
            let d = max_diff(&last, &want[want.len() - v..]);
            assert!(d <= TOL, "{file} ({what}): prefill logits differ by {d}");
            check_golden_state(&file, &what, &cfg, &st, &bytes);

            // Continuation from that state, as one chunk.
            let d = max_diff(&chunked(&mut e, &mut st, &tokens2), &want2);
            assert!(
                d <= TOL,
                "{file} ({what}): continuation logits differ by {d}"
            );
        }
        eprintln!("engine_golden_parity: {file} ok");
    }
}

fn meta_of(cfg: &ModelConfig, tokenizer: Option<&Tokenizer>) -> Meta {
    Meta {
        config: cfg.clone(),
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: tokenizer.map(|t| t.metadata()),
    }
}

/// The candle model and the candle forward of `tokens` from a zero state, for a checkpoint file.
fn candle_reference(path: &Path, tokens: &[u32]) -> (Rwkv7, Vec<f32>, State) {
    let ck = checkpoint::load(path, &Device::Cpu).unwrap();
    let model = Rwkv7::from_params(&ck.meta.config, &ck.params).unwrap();
    let input = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap();
    let (logits, state) = model.forward(&input, None).unwrap();
    (model, flat(&logits), state)
}

fn test_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7919 + 13) % vocab as u32)
        .collect()
}

/// A `micro`-shaped model with a 16384 vocabulary, stored as f32, f16 and bf16: each engine (one
/// and two threads, mapped or converted at load) against the candle forward of the same file.
#[test]
fn engine_matches_candle_on_micro_in_every_dtype() {
    let mut cfg = preset("micro");
    cfg.vocab_size = 16384;
    let params = noisy_params(&cfg, 3);
    let dir = tempfile::tempdir().unwrap();
    // A full chunk and a partial one.
    let tokens = test_tokens(PREFILL_CHUNK + 8, cfg.vocab_size);
    let meta = meta_of(&cfg, None);
    for (dtype, name) in [
        (DType::F32, "f32"),
        (DType::F16, "f16"),
        (DType::BF16, "bf16"),
    ] {
        let path = dir.path().join(format!("micro-{name}.safetensors"));
        checkpoint::save_with_dtype(&path, &meta, &params, dtype).unwrap();
        let (_, want, want_state) = candle_reference(&path, &tokens);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut by_threads = Vec::new();
        for threads in [1, 2] {
            let mut e = Engine::load(&path, &opts(threads)).unwrap();
            assert_eq!(e.weight_dtype().name(), name);
            let mut st = e.new_state();
            let got = chunked(&mut e, &mut st, &tokens);
            let d = max_diff(&got, &want);
            eprintln!("micro {name}, {threads} threads: max |logit| {scale}, max diff {d}");
            assert!(
                d <= TOL,
                "micro {name}, {threads} threads: logits differ by {d}"
            );
            let sd = state_diff(&st.to_model_state(&cfg, &Device::Cpu).unwrap(), &want_state);
            assert!(sd <= TOL, "micro {name}: state differs by {sd}");
            // A few decode steps from there agree with the candle step.
            let mut st1 = e.new_state();
            let steps = stepwise(&mut e, &mut st1, &tokens[..3]);
            let v = cfg.vocab_size;
            let d = max_diff(&steps, &want[..3 * v]);
            assert!(d <= TOL, "micro {name}: step logits differ by {d}");
            by_threads.push(got);
        }
        // Each output row is computed by one thread in one order: thread count changes nothing.
        assert!(
            by_threads[0] == by_threads[1],
            "micro {name}: 1 vs 2 threads differ"
        );
    }

    // Widening f16 to f32 at load is exact, and the kernels accumulate in the same order.
    let f16_path = dir.path().join("micro-f16.safetensors");
    let all_logits = |path: &Path, dtype| {
        let o = EngineOptions {
            threads: 1,
            dtype,
            ..Default::default()
        };
        let mut e = Engine::load(path, &o).unwrap();
        assert_eq!(e.weight_dtype(), dtype.unwrap_or(e.weight_dtype()));
        let mut st = e.new_state();
        chunked(&mut e, &mut st, &tokens)
    };
    assert!(
        all_logits(&f16_path, None) == all_logits(&f16_path, Some(WeightDtype::F32)),
        "f16 mapped vs widened to f32 at load"
    );
    // Narrowing at load (`dtype`) rounds the big matrices as candle's `to_dtype` does; the small
    // vectors stay f32.
    let rounded: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| {
            let big = ternary_eligible(n) || n == "emb.weight" || n == "head.weight";
            let t = if big {
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            } else {
                t.clone()
            };
            (n.clone(), t)
        })
        .collect();
    let rounded_path = dir.path().join("micro-rounded.safetensors");
    checkpoint::save(&rounded_path, &meta, &rounded).unwrap();
    let (_, want, _) = candle_reference(&rounded_path, &tokens);
    let f32_path = dir.path().join("micro-f32.safetensors");
    let d = max_diff(&all_logits(&f32_path, Some(WeightDtype::BF16)), &want);
    assert!(
        d <= TOL,
        "micro f32 file narrowed to bf16 at load: logits differ by {d}"
    );
}

/// BitLinear models (f32 master weights, and packed `ternary-b3` files), and a dense model packed
/// by `save_ternary`, against the candle forward.
///
/// A packed BitLinear file is compared with its master file in the engine, bit for bit (the same
/// trits and γ), not with candle: candle dequantises it and ternarises again, recomputing γ in f32
/// (~1e-5 relative), and such a difference moves an 8-bit activation across a rounding boundary
/// often enough to change logits by ~1e-3.
#[test]
fn engine_matches_candle_with_ternary_and_packed_matrices() {
    let dir = tempfile::tempdir().unwrap();
    // A full chunk and a partial one.
    let tokens = test_tokens(PREFILL_CHUNK + 5, 4096);
    let engine_logits = |path: &Path, threads| {
        let mut e = Engine::load(path, &opts(threads)).unwrap();
        let mut st = e.new_state();
        let all = chunked(&mut e, &mut st, &tokens);
        let mut st1 = e.new_state();
        let steps = stepwise(&mut e, &mut st1, &tokens[..4]);
        (all, steps, st)
    };
    for bitlinear in [true, false] {
        let mut cfg = preset("tiny");
        cfg.ternary_att = bitlinear;
        cfg.ternary_ffn = bitlinear;
        let params = noisy_params(&cfg, 5);
        let meta = meta_of(&cfg, None);
        let master = dir.path().join(format!("master-{bitlinear}.safetensors"));
        checkpoint::save(&master, &meta, &params).unwrap();
        let packed = dir.path().join(format!("packed-{bitlinear}.safetensors"));
        let n = checkpoint::save_ternary(&packed, &meta, &params, DType::F32).unwrap();
        assert_eq!(n, 6 * cfg.n_layer);
        // The candle reference: the master file of the BitLinear model, the packed dense one
        // (a dense master file is just the dense model, checked elsewhere).
        let reference = if bitlinear { &master } else { &packed };
        let what = format!("{} (BitLinear {bitlinear})", reference.display());
        let (_, want, want_state) = candle_reference(reference, &tokens);
        // A BitLinear input on an 8-bit rounding boundary may round the other way under another
        // f32 summation order (candle's vs the engine's; aarch64 showed it: one code flip moved
        // logits by up to 6e-3, 2.7e-4 on average over the 4 tokens after it). So the bounds there
        // are a flip's size, for the largest and the mean difference; a systematic error (a
        // wrong scale, a wrong trit) moves logits by far more.
        let (tol, tol_mean) = if bitlinear { (2e-2, 2e-3) } else { (TOL, TOL) };
        let mean = |a: &[f32], b: &[f32]| {
            a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
        };
        for threads in [1, 2] {
            let (all, steps, st) = engine_logits(reference, threads);
            let (d, m) = (max_diff(&all, &want), mean(&all, &want));
            assert!(
                d <= tol && m <= tol_mean,
                "{what}: logits differ by {d} (mean {m})"
            );
            let sd = state_diff(&st.to_model_state(&cfg, &Device::Cpu).unwrap(), &want_state);
            assert!(sd <= tol, "{what}: state differs by {sd}");
            let want = &want[..4 * 4096];
            let (d, m) = (max_diff(&steps, want), mean(&steps, want));
            assert!(
                d <= tol && m <= tol_mean,
                "{what}: step logits differ by {d} (mean {m})"
            );
        }
        if bitlinear {
            let (a, b) = (engine_logits(&master, 2), engine_logits(&packed, 2));
            assert!(
                a.0 == b.0 && a.1 == b.1,
                "packed vs master BitLinear differ"
            );
        }
    }
    // Ternary is not a conversion target.
    let err = Engine::load(
        &dir.path().join("packed-true.safetensors"),
        &EngineOptions {
            dtype: Some(WeightDtype::Ternary),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert_eq!(err.exit_code(), 2, "{err}");
}

/// A tiny model with the World vocabulary (65536 ids) and its tokenizer in the metadata.
fn tiny_world_model(dir: &Path) -> (PathBuf, Tokenizer) {
    let mut cfg = preset("tiny");
    cfg.vocab_size = 65536;
    let tok = Tokenizer::world();
    let path = dir.join("tiny-world.safetensors");
    let params = noisy_params(&cfg, 11);
    checkpoint::save_with_dtype(&path, &meta_of(&cfg, Some(&tok)), &params, DType::F16).unwrap();
    (path, tok)
}

#[test]
fn engine_state_files_and_candle_states_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny_world_model(dir.path());
    let mut e = Engine::load(&path, &opts(2)).unwrap();
    let cfg = e.config().clone();
    // The checkpoint carries its tokenizer.
    assert_eq!(e.tokenizer().unwrap().sha256(), Tokenizer::world().sha256());
    let tokens = test_tokens(20, cfg.vocab_size);
    let (model, _, _) = candle_reference(&path, &tokens);

    // Engine state → file → engine state: continuing gives the same logits as never stopping.
    let mut st = e.new_state();
    e.prefill(&tokens[..12], &mut st).unwrap();
    let file = dir.path().join("conv.state");
    st.save(&file, &cfg).unwrap();
    let mut resumed = EngineState::load(&file, &cfg).unwrap();
    assert_eq!(resumed, st);
    let a = stepwise(&mut e, &mut st, &tokens[12..]);
    let b = stepwise(&mut e, &mut resumed, &tokens[12..]);
    assert_eq!(a, b);

    // A candle state (from the candle forward) continues in the engine like the candle model.
    let input = Tensor::from_slice(&tokens[..12], (1, 12), &Device::Cpu).unwrap();
    let (_, cst) = model.forward(&input, None).unwrap();
    let mut from_candle = EngineState::from_model_state(&cfg, &cst).unwrap();
    let mut cst2 = cst.clone();
    let want: Vec<f32> = tokens[12..]
        .iter()
        .flat_map(|&t| flat(&model.step(&[t], &mut cst2).unwrap()))
        .collect();
    let got = stepwise(&mut e, &mut from_candle, &tokens[12..]);
    let d = max_diff(&got, &want);
    assert!(d <= TOL, "continuing a candle state: logits differ by {d}");

    // A state file of another model is refused; so is a state of another shape.
    let mut other = cfg.clone();
    other.n_layer = 3;
    assert!(EngineState::load(&file, &other).is_err());
    let mut wrong = EngineState::zeros(&other);
    let err = e.step(1, &mut wrong).unwrap_err();
    assert!(err.to_string().contains("state"), "{err}");
    // An id outside the vocabulary is bad data (65), not a panic.
    let err = e.step(cfg.vocab_size as u32, &mut st).unwrap_err();
    assert_eq!(err.exit_code(), 65, "{err}");
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn engine_load_errors_name_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    assert_eq!(
        Engine::load(&missing, &opts(1)).err().unwrap().exit_code(),
        66
    );
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let err = Engine::load(&junk, &opts(1)).err().unwrap();
    assert_eq!(err.exit_code(), 65);
    assert!(err.to_string().contains("junk.safetensors"), "{err}");
    // A non-finite weight is reported by tensor name.
    let cfg = preset("tiny");
    let mut params = noisy_params(&cfg, 2);
    let (name, t) = params
        .iter_mut()
        .find(|(n, _)| n == "blocks.1.att.key.weight")
        .unwrap();
    let mut vals = flat(t);
    vals[5] = f32::NAN;
    *t = Tensor::from_vec(vals, t.dims(), &Device::Cpu).unwrap();
    let name = name.clone();
    let bad = dir.path().join("nan.safetensors");
    checkpoint::save(&bad, &meta_of(&cfg, None), &params).unwrap();
    let err = Engine::load(&bad, &opts(1)).err().unwrap();
    assert!(err.to_string().contains(&name), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Sampler

fn sampler(cfg: SamplerConfig) -> Sampler {
    Sampler::new(cfg).unwrap()
}

/// How often each id is drawn in `n` samples.
fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> HashMap<u32, usize> {
    let mut h = HashMap::new();
    for _ in 0..n {
        *h.entry(s.sample(logits).unwrap()).or_insert(0) += 1;
    }
    h
}

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

fn plain(temperature: f32, seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        ..Default::default()
    }
}

#[test]
fn sampler_greedy_takes_the_largest_logit_and_the_smaller_id_on_ties() {
    let mut s = sampler(SamplerConfig::greedy());
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]).unwrap(), 1);
    assert_eq!(s.sample(&[0.5, 3.0, 3.0, 1.0]).unwrap(), 1);
    assert_eq!(s.sample(&[-5.0, -4.0, -4.5]).unwrap(), 1);
}

#[test]
fn sampler_truncation_keeps_what_is_documented() {
    let probs = [0.5, 0.3, 0.15, 0.05];
    let logits = logits_of(&probs);
    let n = 4000;
    // Temperature 1 without truncation: frequencies follow the probabilities.
    let h = histogram(&mut sampler(plain(1.0, 1)), &logits, n);
    for (id, p) in probs.iter().enumerate() {
        let f = *h.get(&(id as u32)).unwrap_or(&0) as f32 / n as f32;
        assert!(
            (f - p).abs() < 0.03,
            "id {id}: frequency {f}, probability {p}"
        );
    }
    // top-k 2: only the two largest, renormalised (0.5/0.8 = 0.625).
    let h = histogram(
        &mut sampler(SamplerConfig {
            top_k: 2,
            ..plain(1.0, 2)
        }),
        &logits,
        n,
    );
    assert_eq!(h.keys().copied().max(), Some(1), "{h:?}");
    let f0 = h[&0] as f32 / n as f32;
    assert!(
        (f0 - 0.625).abs() < 0.03,
        "top-k: frequency of id 0 is {f0}"
    );
    // top-p 0.75: 0.5 alone is not enough, 0.5 + 0.3 is.
    let h = histogram(
        &mut sampler(SamplerConfig {
            top_p: 0.75,
            ..plain(1.0, 3)
        }),
        &logits,
        n,
    );
    assert_eq!(h.len(), 2, "top-p: {h:?}");
    assert!(h.contains_key(&0) && h.contains_key(&1));
    // min-p 0.2: keep p ≥ 0.2·0.5 = 0.1.
    let h = histogram(
        &mut sampler(SamplerConfig {
            min_p: 0.2,
            ..plain(1.0, 4)
        }),
        &logits,
        n,
    );
    let mut ids: Vec<u32> = h.keys().copied().collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2], "min-p: {h:?}");
    // A small temperature sharpens towards the argmax; a large one flattens.
    let h = histogram(&mut sampler(plain(0.05, 5)), &logits, 500);
    assert_eq!(h.get(&0), Some(&500));
    let h = histogram(&mut sampler(plain(100.0, 6)), &logits, n);
    let f3 = h[&3] as f32 / n as f32;
    assert!(
        (f3 - 0.25).abs() < 0.04,
        "temperature 100: frequency of id 3 is {f3}"
    );
}

#[test]
fn sampler_top_p_on_a_large_vocabulary_matches_a_full_sort() {
    // 20000 ids with a slowly decaying distribution: the nucleus needs more than the first
    // selection round. Every drawn id must be inside the nucleus computed by a full sort.
    let logits: Vec<f32> = (0..20000)
        .map(|i| -((i * 7) % 20000) as f32 / 3000.0)
        .collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let max = logits[order[0]];
    let p: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let total: f64 = p.iter().sum();
    let mut acc = 0.0;
    let mut nucleus = std::collections::HashSet::new();
    for &i in &order {
        nucleus.insert(i as u32);
        acc += p[i];
        if acc >= 0.5 * total {
            break;
        }
    }
    assert!(nucleus.len() > 256, "the test needs a wide nucleus");
    let mut s = sampler(SamplerConfig {
        top_p: 0.5,
        ..plain(1.0, 9)
    });
    for _ in 0..300 {
        let id = s.sample(&logits).unwrap();
        assert!(nucleus.contains(&id), "{id} is outside the nucleus");
    }
}

#[test]
fn sampler_penalties_follow_their_rules() {
    let greedy_with = |c: SamplerConfig, history: &[u32], logits: &[f32]| {
        let mut s = sampler(c);
        history.iter().for_each(|&t| s.accept(t));
        s.sample(logits).unwrap()
    };
    let g = SamplerConfig::greedy();
    // Repetition: a positive logit is divided (2.0 → 1.0 < 1.9), a negative one multiplied.
    let rep = SamplerConfig {
        repeat_penalty: 2.0,
        ..g.clone()
    };
    assert_eq!(greedy_with(g.clone(), &[0], &[2.0, 1.9]), 0);
    assert_eq!(greedy_with(rep.clone(), &[0], &[2.0, 1.9]), 1);
    assert_eq!(greedy_with(rep.clone(), &[0], &[-1.0, -1.5]), 1);
    assert_eq!(greedy_with(rep.clone(), &[0], &[-1.0, -2.5]), 0);
    // Presence: once per token, however often it occurred.
    let pres = SamplerConfig {
        presence_penalty: 0.2,
        ..g.clone()
    };
    assert_eq!(greedy_with(pres.clone(), &[0], &[1.0, 0.9]), 1);
    assert_eq!(greedy_with(pres.clone(), &[0, 0, 0], &[1.0, 0.75]), 0);
    // Frequency: per occurrence.
    let freq = SamplerConfig {
        frequency_penalty: 0.06,
        ..g.clone()
    };
    assert_eq!(greedy_with(freq.clone(), &[0], &[1.0, 0.9]), 0);
    assert_eq!(greedy_with(freq.clone(), &[0, 0], &[1.0, 0.9]), 1);
    // The window: only the last `penalty_last_n` accepted tokens count.
    let window = SamplerConfig {
        penalty_last_n: 2,
        ..pres
    };
    assert_eq!(greedy_with(window.clone(), &[0, 5], &[1.0, 0.9]), 1);
    assert_eq!(greedy_with(window, &[0, 5, 6], &[1.0, 0.9]), 0);
}

#[test]
fn sampler_seed_reproduces_and_bad_values_are_refused() {
    let logits: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 / 30.0).collect();
    let draw = |seed| {
        let mut s = sampler(SamplerConfig {
            seed,
            ..Default::default()
        });
        (0..50)
            .map(|_| s.sample(&logits).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
    for bad in [
        SamplerConfig {
            temperature: -1.0,
            ..Default::default()
        },
        SamplerConfig {
            top_p: 0.0,
            ..Default::default()
        },
        SamplerConfig {
            min_p: 1.5,
            ..Default::default()
        },
        SamplerConfig {
            repeat_penalty: 0.0,
            ..Default::default()
        },
    ] {
        let err = Sampler::new(bad).err().unwrap();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().starts_with("--"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Output parser and generation loop

fn parse_all(tok: &Tokenizer, stops: &[&str], ids: &[u32]) -> Vec<Event> {
    let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let mut p = OutputParser::new(tok, &stops);
    let mut q = VecDeque::new();
    for &id in ids {
        p.push(id, &mut q);
    }
    p.finish(StopReason::MaxTokens, &mut q);
    q.into_iter().collect()
}

fn text_of(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Text(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn parser_stop_strings_are_held_back_and_never_shown() {
    let tok = Tokenizer::world();
    let ids = tok.encode("Hello world. User: more text").unwrap();
    let ev = parse_all(&tok, &["User:", "zzz"], &ids);
    assert_eq!(text_of(&ev), "Hello world. ");
    assert_eq!(
        ev.last(),
        Some(&Event::Stop(StopReason::StopString("User:".into())))
    );
    // A stop string cut across single-byte tokens: nothing of it leaks before it completes.
    let ids: Vec<u32> = "ab\n\nc".bytes().map(|b| b as u32 + 1).collect();
    let ev = parse_all(&tok, &["\n\n"], &ids);
    assert_eq!(text_of(&ev), "ab");
    assert_eq!(
        ev.last(),
        Some(&Event::Stop(StopReason::StopString("\n\n".into())))
    );
    // Held back: the first newline is not shown before the second one decides.
    let mut p = OutputParser::new(&tok, &["\n\n".to_string()]);
    let mut q = VecDeque::new();
    for &id in &ids[..3] {
        p.push(id, &mut q);
    }
    assert_eq!(text_of(&q.into_iter().collect::<Vec<_>>()), "ab");
    // A held prefix that never completes is emitted at the end.
    let ev = parse_all(&tok, &["\n\nX"], &ids);
    assert_eq!(text_of(&ev), "ab\n\nc");
    assert_eq!(ev.last(), Some(&Event::Stop(StopReason::MaxTokens)));
}

#[test]
fn parser_streams_utf8_whole_and_stops_at_end_of_text() {
    let tok = Tokenizer::world();
    let text = "naïve café — 日本語 🦀!";
    // Byte tokens: every multi-byte character arrives in pieces.
    let mut ids: Vec<u32> = text.bytes().map(|b| b as u32 + 1).collect();
    ids.push(tok.special_id(Special::EndOfText).unwrap());
    ids.extend(tok.encode("never shown").unwrap());
    let ev = parse_all(&tok, &[], &ids);
    assert_eq!(text_of(&ev), text);
    assert_eq!(ev.last(), Some(&Event::Stop(StopReason::EndOfText)));
    assert_eq!(ev.iter().filter(|e| matches!(e, Event::Stop(_))).count(), 1);
}

#[test]
fn parser_takes_a_call_ended_by_end_of_text() {
    let tok = Tokenizer::world();
    let ids = tok
        .encode_with_special("<|tool_call|>{\"tool\":\"time\",\"args\":{}}<|endoftext|>")
        .unwrap();
    let ev = parse_all(&tok, &[], &ids);
    assert!(
        matches!(&ev[0], Event::ToolCall { call: Ok(c), .. } if c.tool == "time"),
        "{ev:?}"
    );
    // One cut short is a failed call that says why (the caller answers it with an error and the
    // model goes on), not a silent stop with an empty reply.
    let ids = tok
        .encode_with_special("<|tool_call|>{\"tool\":\"ti<|endoftext|>")
        .unwrap();
    let ev = parse_all(&tok, &[], &ids);
    assert!(
        matches!(&ev[0], Event::ToolCall { raw, call: Err(why) }
            if raw == "{\"tool\":\"ti" && why.contains("ended with end-of-text")),
        "{ev:?}"
    );
    assert_eq!(ev[1..], [Event::Stop(StopReason::MaxTokens)]);
}

#[test]
fn parser_turns_tool_calls_into_events() {
    let tok = Tokenizer::world();
    let ids = tok
        .encode_with_special(
            "Let me compute.<|tool_call|>{\"tool\":\"calculator\",\"args\":{\"expr\":\"2^10\"}}\
             <|end_tool_call|><|tool_result|>1024<|end_tool_result|>It is 1024.",
        )
        .unwrap();
    let ev = parse_all(&tok, &[], &ids);
    let at = ev
        .iter()
        .position(|e| matches!(e, Event::ToolCall { .. }))
        .expect("a tool call event");
    assert_eq!(text_of(&ev[..at]), "Let me compute.");
    let Event::ToolCall { raw, call } = &ev[at] else {
        unreachable!()
    };
    assert_eq!(
        raw,
        "{\"tool\":\"calculator\",\"args\":{\"expr\":\"2^10\"}}"
    );
    assert_eq!(
        call,
        &Ok(ToolCall {
            tool: "calculator".into(),
            args: serde_json::json!({"expr": "2^10"})
        })
    );
    // Result markers are not text; the result itself (model-written here) is.
    assert_eq!(text_of(&ev[at + 1..]), "1024It is 1024.");
    // A malformed call is still an event, with the reason.
    let ids = tok
        .encode_with_special("<|tool_call|>{\"tool\": calc<|end_tool_call|>")
        .unwrap();
    let ev = parse_all(&tok, &[], &ids);
    let Event::ToolCall { call: Err(why), .. } = &ev[0] else {
        panic!("expected a failed tool call, got {ev:?}");
    };
    assert!(why.contains("not valid JSON"), "{why}");
    // Typed marker text (encoded as untrusted) is plain text, not a call.
    let ids = tok.encode("<|tool_call|>{}<|end_tool_call|>").unwrap();
    let ev = parse_all(&tok, &[], &ids);
    assert_eq!(text_of(&ev), "<|tool_call|>{}<|end_tool_call|>");
}

/// Runs one generation to the end; returns the events and the tokens it fed.
fn generate(
    e: &mut Engine,
    st: &mut EngineState,
    s: &mut Sampler,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: GenOptions,
) -> (Vec<Event>, Vec<u32>) {
    let mut g = Generation::new(e, st, s, tok, prompt, opts).unwrap();
    let mut ev = Vec::new();
    for x in g.by_ref() {
        ev.push(x.unwrap());
    }
    let fed = g.tokens().to_vec();
    (ev, fed)
}

#[test]
fn generation_greedy_is_the_argmax_chain_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tok) = tiny_world_model(dir.path());
    let prompt = tok.encode("The quick brown fox").unwrap();
    let n = 24;
    let run = |threads| {
        let mut e = Engine::load(&path, &opts(threads)).unwrap();
        let mut st = e.new_state();
        let mut s = sampler(SamplerConfig::greedy());
        let max = GenOptions {
            max_tokens: Some(n),
            ..Default::default()
        };
        generate(&mut e, &mut st, &mut s, &tok, &prompt, max)
    };
    let (ev, fed) = run(1);
    assert_eq!(
        ev.last(),
        Some(&Event::Stop(StopReason::MaxTokens)),
        "{ev:?}"
    );
    // Unless the model said <|endoftext|>, exactly n tokens were sampled and fed.
    let generated = &fed[prompt.len()..];
    assert!(
        generated.len() == n || generated.last() == tok.special_id(Special::EndOfText).as_ref()
    );
    // The same chain by hand: argmax, feed, repeat.
    let mut e = Engine::load(&path, &opts(1)).unwrap();
    let mut st = e.new_state();
    let mut logits = e.prefill(&prompt, &mut st).unwrap().to_vec();
    for &want in generated {
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        assert_eq!(best, want);
        logits = e.step(want, &mut st).unwrap().to_vec();
    }
    assert_eq!(run(1), (ev.clone(), fed.clone()));
    assert_eq!(run(2), (ev, fed));
}

#[test]
fn generation_seed_reproduces_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tok) = tiny_world_model(dir.path());
    let prompt = tok.encode("Once upon a time").unwrap();
    let run = |threads, seed| {
        let mut e = Engine::load(&path, &opts(threads)).unwrap();
        let mut st = e.new_state();
        let mut s = sampler(SamplerConfig {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..Default::default()
        });
        let max = GenOptions {
            max_tokens: Some(32),
            ..Default::default()
        };
        generate(&mut e, &mut st, &mut s, &tok, &prompt, max).1
    };
    let a = run(1, 42);
    assert_eq!(a, run(1, 42));
    assert_eq!(a, run(2, 42));
    assert_ne!(a, run(1, 43));
}

#[test]
fn generation_injection_and_the_final_state_match_the_fed_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tok) = tiny_world_model(dir.path());
    let mut e = Engine::load(&path, &opts(2)).unwrap();
    let cfg = e.config().clone();
    let prompt = tok.encode("Compute 2^10 please.").unwrap();
    let mut st = e.new_state();
    let mut s = sampler(SamplerConfig {
        seed: 5,
        ..Default::default()
    });
    let opts = GenOptions {
        max_tokens: Some(12),
        ..Default::default()
    };
    let (events, fed) = {
        let mut g = Generation::new(&mut e, &mut st, &mut s, &tok, &prompt, opts).unwrap();
        let mut events = Vec::new();
        let mut injected = false;
        while let Some(ev) = g.next() {
            let ev = ev.unwrap();
            // Answer after the first piece of text, as a chat session answers a tool call.
            if !injected && matches!(ev, Event::Text(_)) {
                g.inject_tool_result("1024").unwrap();
                injected = true;
            }
            events.push(ev);
        }
        assert!(injected, "no text was generated: {events:?}");
        (events, g.tokens().to_vec())
    };
    assert!(
        events.contains(&Event::ToolResult("1024".into())),
        "{events:?}"
    );
    // The injected tokens sit in the fed stream, wrapped in the result markers.
    let result = [
        vec![tok.special_id(Special::ToolResult).unwrap()],
        tok.encode("1024").unwrap(),
        vec![tok.special_id(Special::EndToolResult).unwrap()],
    ]
    .concat();
    assert!(
        fed.windows(result.len()).any(|w| w == result.as_slice()),
        "injected tokens missing from {fed:?}"
    );
    // Replaying the fed tokens on a fresh state reproduces the state the loop left.
    let mut replay = e.new_state();
    e.prefill(&fed, &mut replay).unwrap();
    let d = engine_state_diff(&cfg, &replay, &st);
    assert!(d <= 1e-4, "final state differs from the replay by {d}");
    // Empty prompts are refused.
    let mut s = sampler(SamplerConfig::greedy());
    assert!(Generation::new(&mut e, &mut st, &mut s, &tok, &[], GenOptions::default()).is_err());
}

#[test]
fn generation_stops_on_stop_strings_and_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tok) = tiny_world_model(dir.path());
    let mut e = Engine::load(&path, &opts(1)).unwrap();
    let prompt = tok.encode("Hi").unwrap();
    let greedy = |e: &mut Engine, opts| {
        let mut st = e.new_state();
        let mut s = sampler(SamplerConfig::greedy());
        generate(e, &mut st, &mut s, &tok, &prompt, opts)
    };
    // Zero tokens: only the prompt is fed.
    let (ev, fed) = greedy(
        &mut e,
        GenOptions {
            max_tokens: Some(0),
            ..Default::default()
        },
    );
    assert_eq!(ev, [Event::Stop(StopReason::MaxTokens)]);
    assert_eq!(fed, prompt);
    // Use a piece of the greedy output as a stop string: generation ends right before it.
    let (ev, _) = greedy(
        &mut e,
        GenOptions {
            max_tokens: Some(40),
            ..Default::default()
        },
    );
    let full = text_of(&ev);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 6, "too little text to cut: {full:?}");
    let stop: String = chars[4..6].iter().collect();
    let cut = full.find(&stop).unwrap();
    let (ev, _) = greedy(
        &mut e,
        GenOptions {
            max_tokens: Some(40),
            stop: vec![stop.clone()],
            ..Default::default()
        },
    );
    assert_eq!(text_of(&ev), full[..cut]);
    assert_eq!(ev.last(), Some(&Event::Stop(StopReason::StopString(stop))));
}

/// Bytes per token, every logit and the final state of `tokens` with the head as stored or as
/// 8-bit rows.
fn head_run(path: &Path, head_q8: Option<bool>, tokens: &[u32]) -> (usize, Vec<f32>, EngineState) {
    let o = EngineOptions {
        threads: 2,
        head_q8,
        ..Default::default()
    };
    let mut e = Engine::load(path, &o).unwrap();
    let mut st = e.new_state();
    let logits = chunked(&mut e, &mut st, tokens);
    (e.bytes_per_token(), logits, st)
}

/// The 8-bit head (`head_q8`): about half the head bytes of f16, the same hidden states (the body and
/// the untied embedding are untouched), and logits close to the f16 head's (8-bit rows move each
/// logit by at most `Σ|x|·absmax_row/254`; well under 5% of the logit range on this model).
#[test]
fn engine_q8_head_reads_half_the_bytes_and_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny_world_model(dir.path());
    let tokens = test_tokens(20, 65536);
    let (b16, l16, s16) = head_run(&path, Some(false), &tokens);
    let (b8, l8, s8) = head_run(&path, Some(true), &tokens);
    let cfg = preset("tiny");
    assert!(!cfg.tie_embeddings);
    // f16 rows → byte rows and a 4-byte scale each.
    let want = 65536 * (2 * cfg.d_model) - 65536 * (cfg.d_model + 4);
    assert_eq!(b16 - b8, want, "bytes per token {b16} → {b8}");
    assert!(s16 == s8, "the head changed the state");
    let range = l16.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_diff(&l16, &l8);
    assert!(
        d > 0.0 && d < 0.05 * range,
        "q8 head moved a logit by {d} (range {range})"
    );
}

/// Unless told otherwise, a packed ternary file loads its head as 8-bit rows (there the head is
/// most of the bytes a token reads) and a float file keeps its head as stored.
#[test]
fn engine_packed_files_default_to_the_8_bit_head() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = preset("tiny");
    cfg.ternary_att = true;
    cfg.ternary_ffn = true;
    let params = noisy_params(&cfg, 5);
    let float = dir.path().join("float.safetensors");
    checkpoint::save(&float, &meta_of(&cfg, None), &params).unwrap();
    let packed = dir.path().join("packed.safetensors");
    checkpoint::save_ternary(&packed, &meta_of(&cfg, None), &params, DType::F16).unwrap();
    let tokens = test_tokens(5, cfg.vocab_size);
    for (path, q8_by_default) in [(&float, false), (&packed, true)] {
        let (default, ..) = head_run(path, None, &tokens);
        let (stored, ..) = head_run(path, Some(false), &tokens);
        let (q8, ..) = head_run(path, Some(true), &tokens);
        let want = if q8_by_default { q8 } else { stored };
        assert!(q8 < stored, "{}: {q8} vs {stored} bytes", path.display());
        assert_eq!(default, want, "{}: default head", path.display());
    }
}

/// With a tied head the embedding rows are read as 8-bit too (`row_into` with row scales): the
/// state moves a little, the logits stay close, and the shared table is counted once (plus one
/// row for the lookup).
#[test]
fn engine_q8_head_with_tied_embeddings_reads_8_bit_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = preset("tiny");
    cfg.tie_embeddings = true;
    let path = dir.path().join("tied.safetensors");
    let params = noisy_params(&cfg, 13);
    checkpoint::save_with_dtype(&path, &meta_of(&cfg, None), &params, DType::F16).unwrap();
    let tokens = test_tokens(20, cfg.vocab_size);
    let (b16, l16, s16) = head_run(&path, Some(false), &tokens);
    let (b8, l8, s8) = head_run(&path, Some(true), &tokens);
    let (v, c) = (cfg.vocab_size, cfg.d_model);
    assert_eq!(
        b16 - b8,
        (v + 1) * 2 * c - (v + 1) * (c + 4),
        "{b16} → {b8}"
    );
    let sd = engine_state_diff(&cfg, &s16, &s8);
    assert!(sd > 0.0 && sd < 0.05, "state moved by {sd}");
    let range = l16.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = max_diff(&l16, &l8);
    assert!(d < 0.05 * range, "logits moved by {d} (range {range})");
}

/// The perplexity cost of the 8-bit head on a trained model: the bundled assistant's own tokens
/// (those it was trained to write) in its 60 held-out test conversations
/// (`tests/data/assistant-cases.jsonl`, rendered as tb-chat renders them). The bar for
/// turning it on by default is < 1%.
#[test]
fn engine_q8_head_costs_under_one_percent_perplexity_on_the_bundled_assistant() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("src/lib/assets/assistant.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let tools = tinybit::tools::Registry::standard(&tinybit::tools::Options {
        db: Some(dir.path().join("tools.db")),
        external: false,
        ..Default::default()
    })
    .prompt_lines();
    let cases = std::fs::read_to_string(root.join("tests/data/assistant-cases.jsonl")).unwrap();
    let mut nll = [0f64; 2];
    let mut count = 0usize;
    for (q, q8) in [false, true].into_iter().enumerate() {
        let o = EngineOptions {
            threads: 2,
            head_q8: Some(q8),
            ..Default::default()
        };
        let mut e = Engine::load(&model, &o).unwrap();
        let tok = e.tokenizer().unwrap();
        count = 0;
        for line in cases.lines() {
            let case: serde_json::Value = serde_json::from_str(line).unwrap();
            let msgs: Vec<tinybit::template::Message> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let spans = tinybit::template::render(&msgs, &[tools.clone()], false).unwrap();
            let (ids, learn) = tinybit::template::to_tokens(&spans, &tok).unwrap();
            let mut st = e.new_state();
            e.forward_all(&ids[..ids.len() - 1], &mut st, |i, row| {
                if learn[i + 1] {
                    let max = row.iter().fold(f32::MIN, |m, &x| m.max(x));
                    let z: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                    nll[q] += z.ln() - (row[ids[i + 1] as usize] - max) as f64;
                    count += 1;
                }
            })
            .unwrap();
        }
    }
    let (p16, p8) = ((nll[0] / count as f64).exp(), (nll[1] / count as f64).exp());
    eprintln!("bundled assistant over {count} tokens: ppl {p16:.4} (f16 head), {p8:.4} (q8 head)");
    assert!(
        (p8 - p16).abs() < 0.01 * p16,
        "the q8 head moves perplexity {p16} → {p8}"
    );
}
