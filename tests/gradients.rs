//! Gradients are right: the loss and every weight gradient against the golden file, and the gate
//! tests of a fresh model (initial loss, every parameter learns, one batch can be memorised,
//! BitLinear really is ternary and still trains).

use crate::common::*;
use candle_core::{Device, Tensor};
use tinybit::checkpoint;
use tinybit::data::Batch;
use tinybit::model::fused::Kernels;
use tinybit::model::init::init_params;
use tinybit::model::params::is_unused;
use tinybit::train::config::TrainConfig;
use tinybit::train::optim::Optimizer;
use tinybit::train::{Trainable, batch_loss, batch_loss_plain, token_nll};

fn check_grad(name: &str, got: &[f32], want: &Tensor) {
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "{name}: size");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-3 * scale + 1e-6,
        "{name}: max|g - g_ref| = {err:e}, max|g_ref| = {scale:e}"
    );
}

#[test]
fn golden_gradients() {
    let dir = golden_dir();
    let grads_bytes = std::fs::read(dir.join("rwkv7_case_a_grads.safetensors")).unwrap();
    let model_bytes = std::fs::read(dir.join("rwkv7_case_a.safetensors")).unwrap();
    let ck = checkpoint::load(&dir.join("rwkv7_case_a.safetensors"), &Device::Cpu).unwrap();
    let tr = Trainable::new(&ck.meta.config, ck.ordered()).unwrap();
    let tokens = tokens_of(&read_tensor(&model_bytes, "golden.tokens"));
    let targets = tokens_of(&read_tensor(&grads_bytes, "golden.targets"));
    let t = tokens.len();
    let input = Tensor::from_slice(&tokens, (1, t), &Device::Cpu).unwrap();
    let (logits, _) = tr.model.forward(&input, None).unwrap();
    let tg = Tensor::from_slice(&targets, (1, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, t), candle_core::DType::F32, &Device::Cpu).unwrap();
    let loss = token_nll(&logits, &tg, &mask).unwrap();
    let want_loss = read_tensor(&grads_bytes, "golden.loss")
        .to_vec1::<f32>()
        .unwrap()[0];
    let got_loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got_loss - want_loss).abs() <= 1e-4,
        "loss {got_loss} vs {want_loss}"
    );
    let grads = tr.gradients(&loss).unwrap();
    let mut checked = 0;
    for (name, _) in &tr.vars {
        let want = read_tensor(&grads_bytes, &format!("grad.{name}"));
        check_grad(name, &grads[name], &want);
        if is_unused(name) {
            assert!(
                grads[name].iter().all(|g| *g == 0.0),
                "{name} must have a zero gradient"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, tr.vars.len());
}

fn tiny_batch(vocab: usize, b: usize, t: usize, seed: u32) -> Batch {
    let ids: Vec<u32> = (0..b * (t + 1))
        .map(|i| ((i as u32 * 2654435761) ^ seed) % vocab as u32)
        .collect();
    let rows: Vec<(Vec<u32>, Vec<bool>)> = ids
        .chunks(t + 1)
        .map(|r| (r.to_vec(), vec![true; t + 1]))
        .collect();
    tinybit::data::pack(&rows, t)
}

#[test]
fn fresh_model_gates() {
    let cfg = preset("tiny");
    let tr = Trainable::new(&cfg, init_params(&cfg, 11, &Device::Cpu).unwrap()).unwrap();
    let batch = tiny_batch(cfg.vocab_size, 2, 32, 7);
    let loss = batch_loss(&tr.model, &batch).unwrap();
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(l <= 2.0 * (cfg.vocab_size as f64).ln(), "initial loss {l}");
    // The official init zeroes several matrices (their gradient then vanishes in some paths): a
    // perturbed model shows whether every parameter is wired into the graph.
    let tr = Trainable::new(&cfg, noisy_params(&cfg, 12)).unwrap();
    let loss = batch_loss(&tr.model, &batch).unwrap();
    let grads = tr.gradients(&loss).unwrap();
    for (name, g) in &grads {
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        if is_unused(name) {
            assert!(
                g.iter().all(|x| *x == 0.0),
                "{name} is unused and must get no gradient"
            );
        } else {
            assert!(g.iter().any(|x| *x != 0.0), "{name} receives no gradient");
        }
    }
}

/// SFT rows open with the same unlearned system prompt and tool lines: `batch_loss` runs that
/// opening once and repeats its state. Loss and every gradient must be those of the plain forward
/// (its twin), with ragged rows (padding) and both kernel sets.
#[test]
fn a_shared_opening_runs_once_with_the_plain_loss_and_gradients() {
    let cfg = preset("tiny");
    let v = cfg.vocab_size as u32;
    let opening: Vec<u32> = (0..40u32).map(|i| (i * 7919 + 3) % v).collect();
    let rows: Vec<(Vec<u32>, Vec<bool>)> = (0..3u32)
        .map(|r| {
            let len = 20 + 9 * r as usize;
            let mut ids = opening.clone();
            ids.extend((0..len as u32).map(|i| (i * 2654435761 ^ (r + 1) * 97) % v));
            // The first few tokens after the opening are a user turn: not learned either.
            let learn = (0..ids.len()).map(|i| i >= opening.len() + 4).collect();
            (ids, learn)
        })
        .collect();
    let batch = tinybit::data::pack(&rows, 72);
    assert_eq!(tinybit::train::shared_opening(&batch), 40);
    for kernels in [Kernels::Fused, Kernels::Ops, Kernels::Reference] {
        let mut tr = Trainable::new(&cfg, noisy_params(&cfg, 21)).unwrap();
        tr.model.set_kernels(kernels);
        let shared = batch_loss(&tr.model, &batch).unwrap();
        let plain = batch_loss_plain(&tr.model, &batch).unwrap();
        let (ls, lp) = (
            shared.to_scalar::<f32>().unwrap(),
            plain.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (ls - lp).abs() <= 1e-5 * lp.abs(),
            "{kernels:?}: loss {ls} vs {lp}"
        );
        let (gs, gp) = (
            tr.gradients(&shared).unwrap(),
            tr.gradients(&plain).unwrap(),
        );
        for (name, want) in &gp {
            let want = Tensor::from_slice(want, want.len(), &Device::Cpu).unwrap();
            check_grad(&format!("{kernels:?} {name}"), &gs[name], &want);
        }
    }
}

fn train_cfg(lr: f64) -> TrainConfig {
    toml::from_str(&format!(
        "train_data = \"x\"\ntokenizer = \"x\"\nbatch_size = 2\nctx_len = 32\nmax_steps = 300\nlr = {lr}\n"
    ))
    .unwrap()
}

#[test]
fn tiny_overfits_one_batch() {
    let cfg = preset("tiny");
    let tr = Trainable::new(&cfg, init_params(&cfg, 3, &Device::Cpu).unwrap()).unwrap();
    let mut opt = Optimizer::new(tr.vars.clone(), &train_cfg(3e-3)).unwrap();
    let batch = tiny_batch(cfg.vocab_size, 2, 32, 99);
    let mut last = f64::MAX;
    for step in 0..300 {
        let loss = batch_loss(&tr.model, &batch).unwrap();
        last = loss.to_scalar::<f32>().unwrap() as f64;
        if last < 0.05 {
            eprintln!("tiny_overfits_one_batch: loss {last:.4} at step {step}");
            break;
        }
        let mut g = tr.gradients(&loss).unwrap();
        opt.clip(&mut g, 1.0);
        opt.step(&g, 3e-3, 0.0).unwrap();
    }
    assert!(last < 0.05, "loss still {last} after 300 steps");
}

#[test]
fn ternary_forward_uses_three_levels_and_trains() {
    let mut cfg = preset("tiny");
    cfg.ternary_att = true;
    cfg.ternary_ffn = true;
    let params = noisy_params(&cfg, 21);
    // The forward's weights are γ·{−1,0,+1}: check each eligible matrix independently.
    for (name, w) in &params {
        if !tinybit::model::params::ternary_eligible(name) {
            continue;
        }
        let q = tinybit::model::linear::ternarize(w).unwrap();
        let mut levels: Vec<f32> = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        levels.sort_by(|a, b| a.partial_cmp(b).unwrap());
        levels.dedup();
        assert_eq!(levels.len(), 3, "{name}: {levels:?}");
        let gamma = w
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (levels[2] - gamma).abs() < 1e-6
                && (levels[0] + gamma).abs() < 1e-6
                && levels[1] == 0.0
        );
    }
    // The model's output equals a dense model run on independently ternarised weights and
    // 8-bit activations only approximately (activations differ), but it must differ from the
    // dense model on the master weights: the quantised path is really taken.
    let ternary = model_of(&cfg, &params);
    let mut dense_cfg = cfg.clone();
    dense_cfg.ternary_att = false;
    dense_cfg.ternary_ffn = false;
    let dense = model_of(&dense_cfg, &params);
    let toks = Tensor::from_slice(&[3u32, 1, 4, 1, 5, 9, 2, 6], (1, 8), &Device::Cpu).unwrap();
    let (a, _) = ternary.forward(&toks, None).unwrap();
    let (b, _) = dense.forward(&toks, None).unwrap();
    assert!(
        max_abs_diff(&a, &b) > 1e-3,
        "ternary forward equals the dense one"
    );
    // Gradients reach the full-precision master weights, and training lowers the loss.
    let tr = Trainable::new(&cfg, params).unwrap();
    let batch = tiny_batch(cfg.vocab_size, 2, 16, 5);
    let mut opt = Optimizer::new(tr.vars.clone(), &train_cfg(2e-3)).unwrap();
    let first = batch_loss(&tr.model, &batch).unwrap();
    let g = tr.gradients(&first).unwrap();
    for (name, _) in tr
        .vars
        .iter()
        .filter(|(n, _)| tinybit::model::params::ternary_eligible(n))
    {
        assert!(
            g[name].iter().any(|x| *x != 0.0),
            "{name}: no gradient reaches the master weights"
        );
    }
    let mut loss = first.to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        let l = batch_loss(&tr.model, &batch).unwrap();
        loss = l.to_scalar::<f32>().unwrap();
        let mut g = tr.gradients(&l).unwrap();
        opt.clip(&mut g, 1.0);
        opt.step(&g, 2e-3, 0.0).unwrap();
    }
    assert!(
        loss < first.to_scalar::<f32>().unwrap() - 0.5,
        "ternary training did not lower the loss"
    );
}
