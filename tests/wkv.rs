//! The WKV-7 candle op against the golden vectors and against the reference twins.

use crate::common::golden_dir;
use crate::wkv_case::{self, Case, Rng, random_case};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use tinybit::model::wkv::{self, Dims, FUSED_N, INPUT_NAMES, Isa};

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Per tensor: `max|got − want| ≤ rel · max|want| + 1e-6`.
fn assert_close(name: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    let scale = want.iter().fold(0f32, |m, q| m.max(q.abs()));
    assert!(
        err <= rel * scale + 1e-6,
        "{name}: max err {err} vs max |ref| {scale}"
    );
}

/// The op's output, final state and all seven gradients of `L = Σ y·dy + Σ s_T·ds_T`, through
/// `loss.backward()`, against the float64 golden file.
#[test]
fn golden_gradients_wkv_op() {
    let path = golden_dir().join("rwkv7_wkv_op.safetensors");
    let g: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let var = |name: &str| Var::from_tensor(&g[name]).unwrap();
    let names = ["r", "w_raw", "k", "v", "a", "b"];
    let xs: Vec<Var> = names.iter().map(|n| var(n)).collect();
    let s0 = var("s0");
    let (y, s_t) = wkv::wkv7(&xs[0], &xs[1], &xs[2], &xs[3], &xs[4], &xs[5], &s0).unwrap();
    let loss = ((&y * &g["dy"]).unwrap().sum_all().unwrap()
        + (&s_t * &g["dsT"]).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    assert_close("y", &to_vec(&y), &to_vec(&g["y"]), 1e-3);
    assert_close("sT", &to_vec(&s_t), &to_vec(&g["sT"]), 1e-3);
    for (name, x) in names.iter().zip(&xs).chain([(&"s0", &s0)]) {
        let got = grads
            .get(x)
            .unwrap_or_else(|| panic!("no gradient recorded for {name}"));
        assert_close(
            &format!("grad.{name}"),
            &to_vec(got),
            &to_vec(&g[&format!("grad.{name}")]),
            1e-3,
        );
    }
}

/// Through the candle op with only `y` in the loss (s_T's gradient arrives as narrow's zero
/// padding), on the fused size N = 64 with T not a multiple of 16, and on N = 8, which takes the
/// reference fallback.
#[test]
fn wkv_op_gradients_match_reference_backward() {
    for d in [
        Dims {
            b: 2,
            t: 21,
            h: 2,
            n: 64,
        },
        Dims {
            b: 1,
            t: 7,
            h: 3,
            n: 8,
        },
    ] {
        let case = random_case(d, 5);
        let dev = Device::Cpu;
        let mut rng = Rng::new(6);
        let dy: Vec<f32> = (0..d.tokens_len()).map(|_| rng.normal()).collect();
        let xs: Vec<Var> = (0..6)
            .map(|q| {
                let part = case.packed[q * d.tokens_len()..(q + 1) * d.tokens_len()].to_vec();
                Var::from_vec(part, (d.b, d.t, d.h, d.n), &dev).unwrap()
            })
            .collect();
        let s0 = Var::from_vec(case.s0.clone(), (d.b, d.h, d.n, d.n), &dev).unwrap();
        let (y, s_t) = wkv::wkv7(&xs[0], &xs[1], &xs[2], &xs[3], &xs[4], &xs[5], &s0).unwrap();
        let (y_ref, s_ref) = {
            let x = case.inputs();
            wkv::wkv7_reference(d, x.r, x.w, x.k, x.v, x.a, x.b, x.s0)
        };
        assert_close(&format!("{d:?} y"), &to_vec(&y), &y_ref, 1e-4);
        assert_close(&format!("{d:?} sT"), &to_vec(&s_t), &s_ref, 1e-4);
        let dy_t = Tensor::from_vec(dy.clone(), (d.b, d.t, d.h, d.n), &dev).unwrap();
        let grads = (&y * &dy_t).unwrap().sum_all().unwrap().backward().unwrap();
        let want = wkv::wkv7_backward_reference(d, case.inputs(), &dy, &vec![0.0; d.state_len()]);
        for (q, name) in INPUT_NAMES.iter().enumerate() {
            let got = to_vec(grads.get(&xs[q]).expect("gradient recorded"));
            assert_close(&format!("{d:?} d{name}"), &got, want.input(q), 1e-4);
        }
        assert_close(
            &format!("{d:?} ds0"),
            &to_vec(grads.get(&s0).unwrap()),
            &want.s0,
            1e-4,
        );
    }
}

#[test]
fn wkv_op_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, &dev).unwrap();
    let short = Tensor::zeros((1, 3, 2, 8), candle_core::DType::F32, &dev).unwrap();
    let s0 = Tensor::zeros((1, 2, 8, 8), candle_core::DType::F32, &dev).unwrap();
    let err = wkv::wkv7(&x, &x, &short, &x, &x, &x, &s0).unwrap_err();
    assert_eq!(err.exit_code(), 65);
    assert!(err.to_string().contains("input k"), "{err}");
    let bad_state = Tensor::zeros((1, 2, 8, 4), candle_core::DType::F32, &dev).unwrap();
    let err = wkv::wkv7(&x, &x, &x, &x, &x, &x, &bad_state).unwrap_err();
    assert!(err.to_string().contains("s0"), "{err}");
}

/// The benchmark runs end to end (timings are not checked; see `wkv_case::bench`).
#[test]
fn wkv_bench_runs() {
    let report = wkv_case::bench(
        Dims {
            b: 1,
            t: 5,
            h: 2,
            n: 64,
        },
        1,
    )
    .unwrap();
    assert_eq!(report.lines().count(), 6, "{report}");
    assert!(
        report.contains("fused") && report.contains("reference") && report.contains("candle op"),
        "{report}"
    );
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, e| m.max(e.abs()))
}

/// The f64 reference backward agrees with central finite differences of the f64 forward.
#[test]
fn reference_backward_matches_finite_differences() {
    let d = Dims {
        b: 1,
        t: 5,
        h: 2,
        n: 8,
    };
    let case = random_case(d, 11);
    let mut rng = Rng::new(12);
    let dy: Vec<f32> = (0..d.tokens_len()).map(|_| rng.normal()).collect();
    let ds_t: Vec<f32> = (0..d.state_len()).map(|_| rng.normal()).collect();
    // L = Σ y·dy + Σ s_T·ds_T, in f64.
    let loss = |c: &Case| -> f64 {
        let (y, s_t) = wkv::wkv7_reference_f64(d, c.inputs());
        let dot = |a: &[f64], b: &[f32]| a.iter().zip(b).map(|(p, &q)| p * q as f64).sum::<f64>();
        dot(&y, &dy) + dot(&s_t, &ds_t)
    };
    let g = wkv::wkv7_backward_reference(d, case.inputs(), &dy, &ds_t);
    let eps = 1e-3f32;
    fn entry(c: &mut Case, on_state: bool, idx: usize) -> &mut f32 {
        if on_state {
            &mut c.s0[idx]
        } else {
            &mut c.packed[idx]
        }
    }
    for probe in 0..40 {
        let (on_state, idx) = if probe % 7 == 6 {
            (true, rng.next_u64() as usize % d.state_len())
        } else {
            (false, rng.next_u64() as usize % (6 * d.tokens_len()))
        };
        let (mut plus, mut minus) = (case.clone(), case.clone());
        *entry(&mut plus, on_state, idx) += eps;
        *entry(&mut minus, on_state, idx) -= eps;
        // The step actually taken in f32.
        let step = (*entry(&mut plus, on_state, idx) - *entry(&mut minus, on_state, idx)) as f64;
        let fd = (loss(&plus) - loss(&minus)) / step;
        let an = if on_state { g.s0[idx] } else { g.packed[idx] } as f64;
        assert!(
            (fd - an).abs() <= 1e-4 * (1.0 + an.abs()),
            "probe {probe}: fd {fd} vs analytic {an}"
        );
    }
}

/// Every instruction set this CPU can run (the portable one always), forward and backward, on
/// T = 1, 5, 16, 37 and 64 (not all multiples of the checkpoint interval).
#[test]
fn fused_forward_and_backward_match_reference() {
    let isas = Isa::available();
    assert_eq!(isas.last(), Some(&Isa::Portable));
    let shapes = [(1, 1, 1), (2, 5, 1), (1, 16, 2), (2, 37, 2), (1, 64, 3)];
    for (i, &(b, t, h)) in shapes.iter().enumerate() {
        let d = Dims {
            b,
            t,
            h,
            n: FUSED_N,
        };
        let case = random_case(d, 100 + i as u64);
        let x = case.inputs();
        let mut rng = Rng::new(200 + i as u64);
        let dy: Vec<f32> = (0..d.tokens_len()).map(|_| rng.normal()).collect();
        let ds_t: Vec<f32> = (0..d.state_len()).map(|_| rng.normal()).collect();
        let (y_ref, s_ref) = wkv::wkv7_reference(d, x.r, x.w, x.k, x.v, x.a, x.b, x.s0);
        let g_ref = wkv::wkv7_backward_reference(d, x, &dy, &ds_t);
        for &isa in &isas {
            let (out, tape) = wkv::wkv7_fused_forward_on(isa, d, x);
            let g = wkv::wkv7_fused_backward_on(isa, d, x, &tape, &dy, &ds_t);
            let (y, s_t) = out.split_at(d.tokens_len());
            let mut pairs: Vec<(String, &[f32], &[f32])> =
                vec![("y".into(), y, &y_ref), ("sT".into(), s_t, &s_ref)];
            for (q, name) in INPUT_NAMES.iter().enumerate() {
                pairs.push((format!("d{name}"), g.input(q), g_ref.input(q)));
            }
            pairs.push(("ds0".into(), &g.s0, &g_ref.s0));
            for (name, got, want) in pairs {
                let err = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                let scale = max_abs(want);
                assert!(
                    err <= 1e-4 * scale + 1e-6,
                    "{isa:?} {d:?} {name}: max err {err} vs max |ref| {scale}"
                );
            }
        }
    }
}

/// An empty sequence passes the state through, and its gradient back.
#[test]
fn fused_handles_empty_sequence() {
    let d = Dims {
        b: 2,
        t: 0,
        h: 1,
        n: FUSED_N,
    };
    let case = random_case(d, 3);
    let (out, tape) = wkv::wkv7_fused_forward(d, case.inputs());
    assert_eq!(out, case.s0);
    let ds_t: Vec<f32> = (0..d.state_len()).map(|e| e as f32).collect();
    let g = wkv::wkv7_fused_backward(d, case.inputs(), &tape, &[], &ds_t);
    assert!(g.packed.is_empty());
    assert_eq!(g.s0, ds_t);
}

/// Inference's scan (`wkv7_step_head`, the decode engine's): every instruction set at N = 64 and
/// the plain loop at N = 16, on a transposed state updated in place and tokens read from
/// `[T, C]` rows at the head's column, against the reference (B = 1, every head of a case).
#[test]
fn step_head_matches_reference() {
    for (n, t, h) in [(FUSED_N, 1, 2), (FUSED_N, 19, 2), (16, 7, 3)] {
        let d = Dims { b: 1, t, h, n };
        let case = random_case(d, 300 + t as u64);
        let x = case.inputs();
        let (y_ref, s_ref) = wkv::wkv7_reference(d, x.r, x.w, x.k, x.v, x.a, x.b, x.s0);
        let transpose = |s: &[f32]| -> Vec<f32> {
            s.chunks_exact(n * n)
                .flat_map(|m| (0..n * n).map(move |e| m[(e % n) * n + e / n]))
                .collect()
        };
        let isas = if n == FUSED_N {
            Isa::available()
        } else {
            vec![Isa::Portable]
        };
        for isa in isas {
            let mut st = transpose(x.s0);
            let mut y = vec![0f32; d.tokens_len()];
            for hi in 0..h {
                let mut yh = vec![0f32; t * n];
                let ins = [x.r, x.w, x.k, x.v, x.a, x.b];
                let sh = &mut st[hi * n * n..(hi + 1) * n * n];
                wkv::wkv7_step_head(isa, h * n, hi * n, ins, sh, &mut yh);
                for ti in 0..t {
                    y[(ti * h + hi) * n..][..n].copy_from_slice(&yh[ti * n..][..n]);
                }
            }
            for (name, got, want) in [("y", y, &y_ref), ("sT", transpose(&st), &s_ref)] {
                let err = got
                    .iter()
                    .zip(want.iter())
                    .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                let scale = max_abs(want);
                assert!(
                    err <= 1e-4 * scale + 1e-6,
                    "{isa:?} {d:?} {name}: max err {err} vs max |ref| {scale}"
                );
            }
        }
    }
}
