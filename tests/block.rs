//! The fused block op (`Kernels::Fused`: one op per dense block) against the per-op path
//! (`Kernels::Ops`: the fused operators one by one): the hidden output, the final state and the
//! gradients of every parameter (the embedding's carries the gradient of layer 0's input) and of
//! the initial state, for layer 0 and a later layer, with a non-zero state in, B ≥ 2 and T not a
//! multiple of the scan's 16-step chunks; and the same bits with one thread as with three.

use crate::common::*;
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use tinybit::model::fused::Kernels;
use tinybit::model::params::is_unused;
use tinybit::model::state::{LayerState, State};
use tinybit::train::Trainable;

/// Everything one run yields, by name: "hidden", "state.{i}.{field}", "grad.{param}",
/// "grad.state.{i}.{field}".
type Run = HashMap<String, Vec<f32>>;

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| scale * rng.random_range(-1f32..1.0))
        .collect()
}

fn run(kernels: Kernels, b: usize, t: usize) -> Run {
    let cfg = preset("tiny");
    let mut tr = Trainable::new(&cfg, noisy_params(&cfg, 31)).unwrap();
    tr.model.set_kernels(kernels);
    let dev = Device::Cpu;
    let zero = tr.model.zero_state(b).unwrap();
    // A non-zero initial state, as variables.
    let mut seed = 500;
    let mut var = |like: &Tensor, scale: f32| {
        seed += 1;
        Var::from_vec(randn(seed, like.elem_count(), scale), like.dims(), &dev).unwrap()
    };
    let state_vars: Vec<[Var; 3]> = zero
        .layers
        .iter()
        .map(|l| {
            [
                var(&l.att_shift, 1.0),
                var(&l.ffn_shift, 1.0),
                var(&l.wkv, 0.3),
            ]
        })
        .collect();
    let state = State {
        layers: state_vars
            .iter()
            .map(|[a, f, w]| LayerState {
                att_shift: a.as_tensor().clone(),
                ffn_shift: f.as_tensor().clone(),
                wkv: w.as_tensor().clone(),
            })
            .collect(),
    };
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i as u32 * 2654435761) >> 7) % cfg.vocab_size as u32)
        .collect();
    let tokens = Tensor::from_slice(&ids, (b, t), &dev).unwrap();
    let (hidden, st) = tr.model.hidden(&tokens, Some(&state)).unwrap();
    // A loss that reaches every output: Σ out ⊙ probe over the hidden rows and the final state.
    let mut out = Run::new();
    let mut probe_seed = 900;
    let mut term = |name: String, t: &Tensor| {
        probe_seed += 1;
        out.insert(name, values(t));
        let probe = Tensor::from_vec(randn(probe_seed, t.elem_count(), 1.0), t.dims(), &dev);
        (t * probe.unwrap()).unwrap().sum_all().unwrap()
    };
    let mut loss = term("hidden".into(), &hidden);
    for (i, l) in st.layers.iter().enumerate() {
        for (field, t) in [
            ("att_shift", &l.att_shift),
            ("ffn_shift", &l.ffn_shift),
            ("wkv", &l.wkv),
        ] {
            loss = (loss + term(format!("state.{i}.{field}"), t)).unwrap();
        }
    }
    let grads = loss.backward().unwrap();
    let grad = |v: &Var| {
        grads
            .get(v.as_tensor())
            .map(values)
            .unwrap_or_else(|| vec![0.0; v.elem_count()])
    };
    for (name, v) in &tr.vars {
        out.insert(format!("grad.{name}"), grad(v));
    }
    for (i, vs) in state_vars.iter().enumerate() {
        for (field, v) in ["att_shift", "ffn_shift", "wkv"].iter().zip(vs) {
            out.insert(format!("grad.state.{i}.{field}"), grad(v));
        }
    }
    out
}

#[test]
fn block_op_matches_per_op_path() {
    for (b, t) in [(2, 21), (3, 1)] {
        let (fused, ops) = (run(Kernels::Fused, b, t), run(Kernels::Ops, b, t));
        assert_eq!(fused.len(), ops.len());
        for (name, want) in &ops {
            let got = &fused[name];
            assert_eq!(got.len(), want.len(), "{name}: size");
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Values to f32 rounding, gradients as the fused ops' own twin tests.
            let tol = if name.starts_with("grad.") {
                1e-4
            } else {
                1e-5
            };
            assert!(
                err <= tol * scale + 1e-6,
                "b{b} t{t} {name}: max err {err:e}, max |per-op| {scale:e}"
            );
            // Every parameter the hidden state depends on gets a gradient (not the head, nor
            // layer 0's v0, v1, v2).
            let unused = name
                .strip_prefix("grad.")
                .is_some_and(|p| is_unused(p) || p == "head.weight");
            assert!(unused || scale > 0.0, "b{b} t{t} {name}: all zero");
        }
    }
}

#[test]
fn block_op_does_not_depend_on_the_thread_count() {
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let one = pool(1).install(|| run(Kernels::Fused, 2, 21));
    let three = pool(3).install(|| run(Kernels::Fused, 2, 21));
    for (name, v) in &one {
        assert!(v == &three[name], "{name} differs between 1 and 3 threads");
    }
}

/// Without gradients the block op runs from 64 tokens on (fewer keep the per-op path): a plain
/// model's logits and final state against the per-op path, from a non-zero state.
#[test]
fn block_op_inference_matches_per_op_path() {
    let cfg = preset("tiny");
    let mut model = model_of(&cfg, &noisy_params(&cfg, 32));
    let (b, t) = (2, 37);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i as u32 * 40503) >> 3) % cfg.vocab_size as u32)
        .collect();
    let tokens = Tensor::from_slice(&ids, (b, t), &Device::Cpu).unwrap();
    // A state from a first chunk, so the second starts from a non-zero one.
    let (_, st) = model.forward(&tokens, None).unwrap();
    let run = |model: &tinybit::model::Rwkv7| {
        let (logits, st) = model.forward(&tokens, Some(&st)).unwrap();
        let mut out = vec![values(&logits)];
        for l in &st.layers {
            out.extend([&l.att_shift, &l.ffn_shift, &l.wkv].map(values));
        }
        out
    };
    let fused = run(&model);
    model.set_kernels(Kernels::Ops);
    let ops = run(&model);
    for (i, (got, want)) in fused.iter().zip(&ops).enumerate() {
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            scale > 0.0 && err <= 1e-5 * scale + 1e-6,
            "output {i}: {err:e} of {scale:e}"
        );
    }
}
