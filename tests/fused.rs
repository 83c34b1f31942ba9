//! The fused training operators (`model::fused`, TimeMix's core in `model::tmix`) against their
//! composed twins, forward and backward, and the row kernels of `model::rows`.

use candle_core::{Device, Tensor, Var};
use tinybit::error::Result;
use tinybit::model::fused::*;
use tinybit::model::rows::{dot, dot3, exp_approx};
use tinybit::model::tmix::{Acts, Params, core, core_reference};

// ---- helpers ----

fn randn(seed: u64, shape: &[usize], scale: f32) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..shape.iter().product::<usize>())
        .map(|_| {
            let z: f32 = rand_distr::StandardNormal.sample(&mut rng);
            scale * z
        })
        .collect()
}

fn var(seed: u64, shape: &[usize], scale: f32) -> Var {
    Var::from_vec(randn(seed, shape, scale), shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= rel * scale + 1e-6,
        "{what}: max err {err:e}, max |ref| {scale:e}"
    );
}

/// Runs `fused` and `reference` on the same inputs; compares the outputs and the gradients
/// of `Σ out ⊙ probe` (probe random) with respect to every input.
fn check_twins(
    what: &str,
    inputs: &[Var],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&ts).unwrap(), reference(&ts).unwrap());
    assert_eq!(a.dims(), b.dims(), "{what}: output shape");
    assert_close(&format!("{what} output"), &values(&a), &values(&b), 1e-5);
    let probe = Tensor::from_vec(randn(99, a.dims(), 1.0), a.dims(), &Device::Cpu).unwrap();
    let ga = (&a * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (&b * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // An input the reference does not use gets no gradient there: the fused one must be 0.
    let grad = |g: &candle_core::backprop::GradStore, v: &Var| match g.get(v) {
        Some(x) => {
            assert_eq!(x.dims(), v.dims(), "{what}: gradient shape");
            values(x)
        }
        None => vec![0.0; v.elem_count()],
    };
    for (i, v) in inputs.iter().enumerate() {
        let (x, y) = (grad(&ga, v), grad(&gb, v));
        assert_close(&format!("{what} gradient {i}"), &x, &y, 1e-4);
    }
}

/// TimeMix core arguments from `x`: `na` activation planes (6 in layer 0, else 8), then the
/// eight parameters in the order of `tmix::PARAMS`, then the initial state.
pub fn core_args(x: &[Tensor], na: usize) -> (Acts<'_>, Params<'_>, &Tensor) {
    let acts = Acts {
        r: &x[0],
        wl: &x[1],
        k: &x[2],
        v: &x[3],
        al: &x[4],
        g: &x[5],
        residual: (na == 8).then(|| (&x[6], &x[7])),
    };
    let p = &x[na..];
    let params = Params {
        w0: &p[0],
        a0: &p[1],
        v0: &p[2],
        k_k: &p[3],
        k_a: &p[4],
        r_k: &p[5],
        ln_w: &p[6],
        ln_b: &p[7],
    };
    (acts, params, &x[na + 8])
}

// ---- tests ----

#[test]
fn norm_matches_reference() {
    for (rows, c, group) in [(7, 48, 48), (5, 48, 16), (1, 8, 8), (300, 64, 64)] {
        let inputs = [
            var(1, &[rows, c], 2.0),
            var(2, &[c], 1.0),
            var(3, &[1, 1, c], 1.0),
        ];
        check_twins(
            &format!("norm {rows}x{c}/{group}"),
            &inputs,
            |t| norm(&t[0], &t[1], &t[2], group, 1e-5),
            |t| norm_reference(&t[0], &t[1], &t[2], group, 1e-5),
        );
    }
}

#[test]
fn token_mix_matches_reference() {
    for (b, t, c) in [(2, 5, 16), (3, 1, 8), (1, 70, 24)] {
        let inputs = [
            var(4, &[b * t, c], 1.0),
            var(5, &[b, c], 1.0),
            var(6, &[1, 1, c], 0.5),
        ];
        check_twins(
            &format!("token_mix {b}x{t}x{c}"),
            &inputs,
            |x| token_mix(&x[0], &x[1], &x[2], t),
            |x| token_mix_reference(&x[0], &x[1], &x[2], t),
        );
    }
}

#[test]
fn linear_and_relu_sq_match_reference() {
    for (rows, k, n) in [(1, 8, 3), (37, 24, 40), (64, 64, 64)] {
        let inputs = [var(7, &[rows, k], 1.0), var(8, &[n, k], 0.3)];
        check_twins(
            &format!("linear {rows}x{k}->{n}"),
            &inputs,
            |t| linear(&t[0], &t[1]),
            |t| linear_reference(&t[0], &t[1]),
        );
    }
    check_twins(
        "relu_sq",
        &[var(9, &[33, 17], 1.0)],
        |t| relu_sq(&t[0]),
        |t| relu_sq_reference(&t[0]),
    );
}

#[test]
fn cross_entropy_matches_reference() {
    let (r, c, v) = (13, 16, 50);
    let targets: Vec<u32> = (0..r as u32).map(|i| (i * 7 + 3) % v as u32).collect();
    let mask: Vec<f32> = (0..r).map(|i| if i % 4 == 1 { 0.0 } else { 1.0 }).collect();
    check_twins(
        "cross_entropy",
        &[var(10, &[r, v], 3.0)],
        |t| cross_entropy(&t[0], &targets, &mask),
        |t| cross_entropy_reference(&t[0], &targets, &mask),
    );
    check_twins(
        "head_cross_entropy",
        &[var(11, &[r, c], 1.0), var(12, &[v, c], 1.0)],
        |t| head_cross_entropy(&t[0], &t[1], &targets, &mask),
        |t| cross_entropy_reference(&linear_reference(&t[0], &t[1])?, &targets, &mask),
    );
    // All rows masked: the loss is 0 and so is every gradient.
    let x = var(13, &[r, v], 1.0);
    let zero = vec![0.0; r];
    let loss = cross_entropy(x.as_tensor(), &targets, &zero).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    let g = loss.backward().unwrap();
    assert!(values(g.get(&x).unwrap()).iter().all(|&e| e == 0.0));
    // A target outside the vocabulary is an error, not a panic.
    let bad = vec![v as u32; r];
    assert!(cross_entropy(x.as_tensor(), &bad, &mask).is_err());
}

/// The parallel kernels give the same bits with one thread as with three (the row split and
/// the order of partial sums depend on the shape only).
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let run = || {
        let x = var(14, &[301, 64], 1.0);
        let w = var(15, &[64], 1.0);
        let b = var(16, &[64], 1.0);
        let prev = var(17, &[7, 64], 1.0);
        let y = norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 16, 1e-5).unwrap();
        let y = token_mix(&y, prev.as_tensor(), w.as_tensor(), 43).unwrap();
        let targets: Vec<u32> = (0..301).map(|i| i % 64).collect();
        let loss = cross_entropy(&y, &targets, &vec![1.0; 301]).unwrap();
        let g = loss.backward().unwrap();
        [&x, &w, &b, &prev].map(|v| values(g.get(v).unwrap()))
    };
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    assert_eq!(pool(1).install(run), pool(3).install(run));
}

/// The fused core against the composed one: z, s_T and the gradients of every activation,
/// parameter and the initial state; layer 0 and later layers; the fused scan (N = 64, with
/// T not a multiple of its 16-step chunks) and the reference scan (N = 8).
#[test]
fn core_matches_reference() {
    for (b, t, h, n, residual) in [
        (2, 21, 2, 64, true),
        (1, 5, 1, 64, false),
        (2, 3, 3, 8, true),
    ] {
        let (rows, c) = (b * t, h * n);
        let mut seed = 100;
        let mut next = |shape: &[usize], scale: f32| {
            seed += 1;
            var(seed, shape, scale)
        };
        let acts: Vec<Var> = (0..if residual { 8 } else { 6 })
            .map(|_| next(&[rows, c], 1.0))
            .collect();
        let params: Vec<Var> = [0.5, 0.5, 0.5, 0.7, 1.0, 0.3, 1.0, 0.2]
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                // r_k, the sixth, is [H, N].
                let shape = if i == 5 { vec![h, n] } else { vec![c] };
                next(&shape, s)
            })
            .collect();
        let s0 = next(&[b, h, n, n], 0.3);
        let inputs: Vec<Var> = acts.iter().chain(&params).chain([&s0]).cloned().collect();
        let na = acts.len();
        let run = |f: fn(&Acts, &Params, &Tensor, usize) -> Result<(Tensor, Tensor)>| {
            move |x: &[Tensor]| -> Result<Tensor> {
                let (acts, params, s0) = core_args(x, na);
                let (z, s) = f(&acts, &params, s0, b)?;
                Ok(Tensor::cat(&[z.flatten_all()?, s.flatten_all()?], 0)?)
            }
        };
        check_twins(
            &format!("time_mix_core b{b} t{t} h{h} n{n} residual={residual}"),
            &inputs,
            run(core),
            run(core_reference),
        );
    }
}

#[test]
fn exp_approx_is_close_to_exp() {
    let mut worst = 0f32;
    for i in -8700..8800 {
        let x = i as f32 * 0.01 + 0.003;
        worst = worst.max(((exp_approx(x) - x.exp()) / x.exp()).abs());
    }
    assert!(worst < 5e-7, "worst relative error {worst}");
    assert_eq!(exp_approx(-1e30), exp_approx(-87.0));
}

/// `dot3` is `dot` of the elementwise product, bit for bit (the training core's bonus used
/// that form before).
#[test]
fn dot3_is_dot_of_the_product() {
    for n in [1, 7, 8, 13, 64] {
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let z: Vec<f32> = (0..n).map(|i| 0.5 - i as f32 * 0.01).collect();
        let xy: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a * b).collect();
        assert_eq!(dot3(&x, &y, &z).to_bits(), dot(&xy, &z).to_bits(), "n={n}");
    }
}
