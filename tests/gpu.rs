//! The GPU paths (issue 12): the WKV-7 CUDA kernel against
//! the CPU operator (its reference twin) and against the composed candle scan on the GPU, the
//! golden case through the model on the GPU, a training step on the GPU against the CPU's, and a
//! run started on the GPU resumed on the CPU. Without a GPU (or a build without `--features
//! cuda`) every GPU test prints "skipped: no GPU" to the real stderr, past the harness's
//! capture, and passes; the composed scan's own check runs everywhere.

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use std::io::Write;
use tinybit::checkpoint;
use tinybit::model::Rwkv7;
use tinybit::model::wkv::{self, Dims};
#[cfg(feature = "cuda")]
use tinybit::train::batch_loss;
use tinybit::train::{Trainable, token_nll};

/// The GPU, or `None` after saying "skipped: no GPU".
fn gpu(test: &str) -> Option<Device> {
    match tinybit::device::open("cuda") {
        Ok(d) => Some(d),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{test}: skipped: no GPU ({e})");
            None
        }
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// The op's outputs and the gradients of a fixed random functional of them (`Σ y·py + Σ s·ps`)
/// with respect to the packed inputs and the state: `[y, s_T, dx, ds0]` as host vectors.
fn wkv_run(dev: &Device, case: &crate::wkv_case::Case, composed: bool) -> [Vec<f32>; 4] {
    let d = case.d;
    let x = Var::from_vec(case.packed.clone(), (6, d.b, d.t, d.h, d.n), dev).unwrap();
    let s0 = Var::from_vec(case.s0.clone(), (d.b, d.h, d.n, d.n), dev).unwrap();
    let (y, s) = if composed {
        wkv::wkv7_composed(&x, &s0).unwrap()
    } else {
        wkv::wkv7_packed(&x, &s0).unwrap()
    };
    let probe = |t: &Tensor, seed: u64| {
        let mut rng = crate::wkv_case::Rng::new(seed);
        let v: Vec<f32> = (0..t.elem_count()).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, t.dims(), dev).unwrap()
    };
    let loss = ((&y * probe(&y, 7)).unwrap().sum_all().unwrap()
        + (&s * probe(&s, 8)).unwrap().sum_all().unwrap())
    .unwrap();
    let g = loss.backward().unwrap();
    [
        host(&y),
        host(&s),
        host(g.get(&x).unwrap()),
        host(g.get(&s0).unwrap()),
    ]
}

const PARTS: [&str; 4] = ["y", "s_T", "d(r,w,k,v,a,b)", "ds0"];

#[test]
fn gpu_wkv_matches_the_cpu_operator() {
    let Some(dev) = gpu("gpu_wkv_matches_the_cpu_operator") else {
        return;
    };
    for (i, d) in [
        Dims {
            b: 2,
            t: 37,
            h: 3,
            n: 64,
        },
        Dims {
            b: 1,
            t: 1,
            h: 1,
            n: 64,
        },
        Dims {
            b: 3,
            t: 64,
            h: 2,
            n: 64,
        },
        Dims {
            b: 1,
            t: 300,
            h: 2,
            n: 64,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let case = crate::wkv_case::random_case(d, 40 + i as u64);
        let want = wkv_run(&Device::Cpu, &case, false);
        let got = wkv_run(&dev, &case, false);
        for (k, part) in PARTS.iter().enumerate() {
            let e = rel_err(&got[k], &want[k]);
            eprintln!("gpu wkv {d:?} {part}: relative error {e:.2e}");
            assert!(e <= 1e-4, "{d:?} {part}: relative error {e:e}");
        }
    }
}

#[test]
fn gpu_wkv_matches_the_composed_scan_on_the_gpu() {
    let Some(dev) = gpu("gpu_wkv_matches_the_composed_scan_on_the_gpu") else {
        return;
    };
    let d = Dims {
        b: 2,
        t: 21,
        h: 2,
        n: 64,
    };
    let case = crate::wkv_case::random_case(d, 5);
    let fused = wkv_run(&dev, &case, false);
    let composed = wkv_run(&dev, &case, true);
    for (k, part) in PARTS.iter().enumerate() {
        let e = rel_err(&fused[k], &composed[k]);
        assert!(e <= 1e-4, "{part}: relative error {e:e}");
    }
}

/// The composed scan is itself right: it matches the CPU operator (runs everywhere, GPU or not).
#[test]
fn composed_scan_matches_the_cpu_operator() {
    let d = Dims {
        b: 2,
        t: 19,
        h: 2,
        n: 64,
    };
    let case = crate::wkv_case::random_case(d, 9);
    let op = wkv_run(&Device::Cpu, &case, false);
    let composed = wkv_run(&Device::Cpu, &case, true);
    for (k, part) in PARTS.iter().enumerate() {
        let e = rel_err(&composed[k], &op[k]);
        assert!(e <= 1e-4, "{part}: relative error {e:e}");
    }
}

#[test]
fn gpu_golden_case_a_logits_and_gradients() {
    let Some(dev) = gpu("gpu_golden_case_a_logits_and_gradients") else {
        return;
    };
    let dir = golden_dir();
    let model_bytes = std::fs::read(dir.join("rwkv7_case_a.safetensors")).unwrap();
    let grads_bytes = std::fs::read(dir.join("rwkv7_case_a_grads.safetensors")).unwrap();
    let ck = checkpoint::load(&dir.join("rwkv7_case_a.safetensors"), &Device::Cpu).unwrap();
    let params: Vec<(String, Tensor)> = ck
        .ordered()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(&dev).unwrap()))
        .collect();
    let tr = Trainable::new(&ck.meta.config, params).unwrap();
    let tokens = tokens_of(&read_tensor(&model_bytes, "golden.tokens"));
    let targets = tokens_of(&read_tensor(&grads_bytes, "golden.targets"));
    let t = tokens.len();
    let input = Tensor::from_slice(&tokens, (1, t), &dev).unwrap();
    let (logits, _) = tr.model.forward(&input, None).unwrap();
    let want = read_tensor(&model_bytes, "golden.logits");
    let d = max_abs_diff(
        &logits.squeeze(0).unwrap().to_device(&Device::Cpu).unwrap(),
        &want,
    );
    eprintln!("gpu golden logits: max abs diff {d:e}");
    assert!(d <= 1e-4, "logits differ by {d}");
    let tg = Tensor::from_slice(&targets, (1, t), &dev).unwrap();
    let mask = Tensor::ones((1, t), DType::F32, &dev).unwrap();
    let loss = token_nll(&logits, &tg, &mask).unwrap();
    let want_loss = read_tensor(&grads_bytes, "golden.loss")
        .to_vec1::<f32>()
        .unwrap()[0];
    let got_loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got_loss - want_loss).abs() <= 1e-4,
        "loss {got_loss} vs {want_loss}"
    );
    let grads = tr.gradient_tensors(&loss).unwrap();
    for ((name, _), g) in tr.vars.iter().zip(&grads) {
        let want = host(&read_tensor(&grads_bytes, &format!("grad.{name}")));
        let got = g
            .as_ref()
            .map(host)
            .unwrap_or_else(|| vec![0.0; want.len()]);
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
}

/// One training step (loss, gradients, clip, AdamW) of a noisy `tiny` model on the GPU equals
/// the CPU's: the loss within 1e-4, every gradient within 1e-3 of its largest element (as the
/// golden gradient check; measured 3e-4 on the GPU against the CPU's block op), and every
/// updated parameter within AdamW's own resolution: a first step moves an element by about
/// ±lr whatever its gradient's size, so where a gradient is ~0 its sign (and so the step) can
/// differ between devices; the bound is 2·lr (4·lr for att.w0, which has twice the lr).
#[cfg(feature = "cuda")]
#[test]
fn gpu_training_step_matches_the_cpu() {
    let Some(dev) = gpu("gpu_training_step_matches_the_cpu") else {
        return;
    };
    let cfg = preset("tiny");
    let params = noisy_params(&cfg, 11);
    let batch = {
        let ids: Vec<u32> = (0..2 * 33)
            .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
            .collect();
        let rows: Vec<(Vec<u32>, Vec<bool>)> = ids
            .chunks(33)
            .map(|r| (r.to_vec(), vec![true; 33]))
            .collect();
        tinybit::data::pack(&rows, 32)
    };
    let tcfg: tinybit::train::config::TrainConfig = toml::from_str(
        "train_data = \"x\"\ntokenizer = \"x\"\nbatch_size = 2\nctx_len = 32\nmax_steps = 1\nlr = 1e-3",
    )
    .unwrap();
    let lr = 1e-3;
    let step = |dev: &Device| -> (f32, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let moved = params
            .iter()
            .map(|(n, t)| (n.clone(), t.to_device(dev).unwrap()))
            .collect();
        let tr = Trainable::new(&cfg, moved).unwrap();
        let mut opt = tinybit::train::optim::Optimizer::new(tr.vars.clone(), &tcfg).unwrap();
        let loss = batch_loss(&tr.model, &batch).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        let grads: Vec<Vec<f32>>;
        if dev.is_cuda() {
            let g = tr.gradient_tensors(&loss).unwrap();
            grads = g
                .iter()
                .map(|g| g.as_ref().map(host).unwrap_or_default())
                .collect();
            let norm = opt.grad_norm_gpu(&g).unwrap();
            let s = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
            opt.step_gpu(&g, s as f32, lr, 0.1).unwrap();
        } else {
            let mut g = tr.gradients(&loss).unwrap();
            grads = tr.vars.iter().map(|(n, _)| g[n].clone()).collect();
            opt.clip(&mut g, 1.0);
            opt.step(&g, lr, 0.1).unwrap();
        }
        (
            l,
            grads,
            tr.params().unwrap().iter().map(|(_, t)| host(t)).collect(),
        )
    };
    let (cpu_loss, cpu_grads, cpu_params) = step(&Device::Cpu);
    let (gpu_loss, gpu_grads, gpu_params) = step(&dev);
    assert!(
        (cpu_loss - gpu_loss).abs() <= 1e-4,
        "loss {gpu_loss} vs {cpu_loss}"
    );
    for (i, (name, _)) in params.iter().enumerate() {
        if gpu_grads[i].is_empty() {
            assert!(
                cpu_grads[i].iter().all(|&g| g == 0.0),
                "{name}: no gradient on the GPU"
            );
            continue;
        }
        let scale = cpu_grads[i].iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = gpu_grads[i]
            .iter()
            .zip(&cpu_grads[i])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // The golden gradient check's bound (tests/gradients.rs): f32 sums in another order.
        assert!(
            d <= 1e-3 * scale + 1e-6,
            "{name}: gradients differ by {d:e} (max {scale:e})"
        );
        let bound = if name.ends_with("att.w0") { 4.0 } else { 2.0 } * lr as f32 + 1e-6;
        let d = gpu_params[i]
            .iter()
            .zip(&cpu_params[i])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            d <= bound,
            "{name}: parameters differ by {d:e} after one step (bound {bound:e})"
        );
    }
}

/// A run started on the GPU resumes on the CPU from the same files, and the reverse, and the
/// loss continues where an uninterrupted run's would (tb-train, `tiny` on Shakespeare).
#[test]
fn gpu_checkpoints_resume_on_the_cpu_and_back() {
    if gpu("gpu_checkpoints_resume_on_the_cpu_and_back").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let shakespeare = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tinyshakespeare.txt"),
    )
    .unwrap();
    std::fs::write(&text, &shakespeare[..100_000]).unwrap();
    let tok = tinybit::tokenizer::Tokenizer::train_bpe(std::slice::from_ref(&text), 512).unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    tok.save(&tok_path).unwrap();
    let data = dir.path().join("train.bin");
    tinybit::data::encode_to_file(
        &[text],
        &tok,
        &data,
        None,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    let tcfg = dir.path().join("train.toml");
    std::fs::write(
        &tcfg,
        format!(
            "train_data = {data:?}\ntokenizer = {tok_path:?}\nbatch_size = 2\nctx_len = 64\n\
             max_steps = 6\nlr = 3e-3\nwarmup_steps = 1\ndecay_fraction = 0.0\ncheckpoint_every = 1\n"
        ),
    )
    .unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    let run = |out: &std::path::Path, device: &str, steps: u64, resume: bool| -> Vec<f64> {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tb-train"));
        cmd.args(["-q", "--device", device, "--model-config"])
            .arg(&model)
            .arg("--train-config")
            .arg(&tcfg)
            .arg("--out")
            .arg(out)
            .args([
                "--set",
                "vocab_size=512",
                "--set",
                &format!("max_steps={steps}"),
            ])
            // Exact f32 products on the GPU too: this checks the files, not TF32's rounding.
            .args(["--set", "precision=f32"]);
        if resume {
            cmd.arg("--resume");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["type"] == "step")
            .map(|r| r["loss"].as_f64().unwrap())
            .collect()
    };
    let straight = run(&dir.path().join("cpu"), "cpu", 6, false);
    for (first, second) in [("cuda", "cpu"), ("cpu", "cuda")] {
        let out = dir.path().join(format!("{first}-{second}"));
        let mut losses = run(&out, first, 3, false);
        losses.extend(run(&out, second, 6, true));
        assert_eq!(losses.len(), 6);
        for (i, (a, b)) in losses.iter().zip(&straight).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs(),
                "{first}->{second} step {}: loss {a} vs {b}",
                i + 1
            );
        }
    }
}

/// The model on the GPU gives the CPU's logits on a longer sequence (the CUDA scan over many
/// 16-step checkpoints inside a whole model).
#[test]
fn gpu_model_forward_matches_the_cpu() {
    let Some(dev) = gpu("gpu_model_forward_matches_the_cpu") else {
        return;
    };
    let cfg = preset("tiny");
    let params = noisy_params(&cfg, 3);
    let cpu = model_of(&cfg, &params);
    let moved: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(&dev).unwrap()))
        .collect();
    let gpu_model: Rwkv7 = model_of(&cfg, &moved);
    let tokens: Vec<u32> = (0..2 * 100)
        .map(|i| (i * 31 + 5) % cfg.vocab_size as u32)
        .collect();
    let run = |m: &Rwkv7, d: &Device| {
        let x = Tensor::from_slice(&tokens, (2, 100), d).unwrap();
        host(&m.forward(&x, None).unwrap().0)
    };
    let e = rel_err(&run(&gpu_model, &dev), &run(&cpu, &Device::Cpu));
    assert!(e <= 1e-4, "logits: relative error {e:e}");
}

/// Values and input gradients of `f` (through `Σ f(x)·probe`) on the GPU, as host vectors.
fn twin_run(
    dev: &Device,
    inputs: &[(Vec<usize>, f32)],
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> Vec<Vec<f32>> {
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, (shape, scale))| {
            let mut rng = crate::wkv_case::Rng::new(100 + i as u64);
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.normal() * scale).collect();
            Var::from_vec(v, shape.as_slice(), dev).unwrap()
        })
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let mut rng = crate::wkv_case::Rng::new(7);
    let probe: Vec<f32> = (0..y.elem_count()).map(|_| rng.normal()).collect();
    let probe = Tensor::from_vec(probe, y.dims(), dev).unwrap();
    let g = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![host(&y)];
    // An input the function does not use has no gradient: zeros.
    out.extend(vars.iter().map(|v| {
        g.get(v)
            .map(host)
            .unwrap_or_else(|| vec![0.0; v.elem_count()])
    }));
    out
}

/// The CUDA norm (LayerNorm over 384 channels, GroupNorm in groups of 64), token-shift mix,
/// relu² and masked cross-entropy against their composed candle twins on the GPU: values and
/// every input gradient. (Called directly: the model uses them only with TINYBIT_CUDA_FUSED=1.)
#[test]
fn gpu_fused_ops_match_their_composed_twins() {
    use tinybit::model::fused::{
        cross_entropy, cross_entropy_reference, norm, norm_reference, relu_sq, relu_sq_reference,
        token_mix, token_mix_reference,
    };
    let Some(dev) = gpu("gpu_fused_ops_match_their_composed_twins") else {
        return;
    };
    let (b, t, c) = (3, 37, 384);
    for group in [c, 64] {
        let shapes = [(vec![b * t, c], 2.0), (vec![c], 1.0), (vec![c], 0.5)];
        let fused = twin_run(&dev, &shapes, &|x| {
            norm(&x[0], &x[1], &x[2], group, 1e-5).unwrap()
        });
        let composed = twin_run(&dev, &shapes, &|x| {
            norm_reference(&x[0], &x[1], &x[2], group, 1e-5).unwrap()
        });
        for (k, part) in ["y", "dx", "dw", "db"].iter().enumerate() {
            let e = rel_err(&fused[k], &composed[k]);
            eprintln!("gpu norm group {group} {part}: relative error {e:.2e}");
            assert!(e <= 1e-4, "norm group {group} {part}: relative error {e:e}");
        }
    }
    let shapes = [(vec![b * t, c], 1.0), (vec![b, c], 1.0), (vec![c], 0.5)];
    let fused = twin_run(&dev, &shapes, &|x| {
        token_mix(&x[0], &x[1], &x[2], t).unwrap()
    });
    let composed = twin_run(&dev, &shapes, &|x| {
        token_mix_reference(&x[0], &x[1], &x[2], t).unwrap()
    });
    for (k, part) in ["y", "dx", "dprev", "dmu"].iter().enumerate() {
        let e = rel_err(&fused[k], &composed[k]);
        eprintln!("gpu mix {part}: relative error {e:.2e}");
        assert!(e <= 1e-4, "mix {part}: relative error {e:e}");
    }
    let shapes = [(vec![b * t, 1344], 1.0)];
    let fused = twin_run(&dev, &shapes, &|x| relu_sq(&x[0]).unwrap());
    let composed = twin_run(&dev, &shapes, &|x| relu_sq_reference(&x[0]).unwrap());
    for (k, part) in ["y", "dx"].iter().enumerate() {
        let e = rel_err(&fused[k], &composed[k]);
        assert!(e <= 1e-5, "relu_sq {part}: relative error {e:e}");
    }
    let v = 1000;
    let targets: Vec<u32> = (0..b * t).map(|i| (i * 7919 % v) as u32).collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % 5 == 0 { 0.0 } else { 1.0 })
        .collect();
    let shapes = [(vec![b * t, v], 3.0)];
    let fused = twin_run(&dev, &shapes, &|x| {
        cross_entropy(&x[0], &targets, &mask).unwrap()
    });
    let composed = twin_run(&dev, &shapes, &|x| {
        cross_entropy_reference(&x[0], &targets, &mask).unwrap()
    });
    for (k, part) in ["loss", "dlogits"].iter().enumerate() {
        let e = rel_err(&fused[k], &composed[k]);
        eprintln!("gpu cross_entropy {part}: relative error {e:.2e}");
        assert!(e <= 1e-4, "cross_entropy {part}: relative error {e:e}");
    }
}

/// TimeMix's core on the GPU (the prep kernel, the CUDA scan, the CUDA GroupNorm) against its
/// composed twin on the GPU, layer 0 and a later layer (value residual): z, the final state and
/// the gradients of every activation, parameter and the initial state.
#[cfg(feature = "cuda")]
#[test]
fn gpu_time_mix_core_matches_its_composed_twin() {
    use tinybit::model::tmix::{Acts, Params, core_gpu, core_reference};
    let Some(dev) = gpu("gpu_time_mix_core_matches_its_composed_twin") else {
        return;
    };
    let (b, t, h, n) = (2, 37, 3, 64);
    let (rows, c) = (b * t, h * n);
    for residual in [false, true] {
        let na = if residual { 8 } else { 6 };
        let mut shapes: Vec<(Vec<usize>, f32)> = (0..na).map(|_| (vec![rows, c], 1.0)).collect();
        for (i, s) in [0.5f32, 0.5, 0.5, 0.7, 1.0, 0.3, 1.0, 0.2]
            .into_iter()
            .enumerate()
        {
            shapes.push((if i == 5 { vec![h, n] } else { vec![c] }, s));
        }
        shapes.push((vec![b, h, n, n], 0.3));
        let run = |f: fn(&Acts, &Params, &Tensor, usize) -> tinybit::Result<(Tensor, Tensor)>| {
            move |x: &[Tensor]| -> Tensor {
                let (acts, params, s0) = crate::fused::core_args(x, na);
                let (z, s) = f(&acts, &params, s0, b).unwrap();
                Tensor::cat(&[z.flatten_all().unwrap(), s.flatten_all().unwrap()], 0).unwrap()
            }
        };
        let got = twin_run(&dev, &shapes, &run(core_gpu));
        let want = twin_run(&dev, &shapes, &run(core_reference));
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(g, w);
            eprintln!("gpu time_mix_core residual={residual} part {k}: relative error {e:.2e}");
            assert!(
                e <= 1e-4,
                "time_mix_core residual={residual} part {k}: relative error {e:e}"
            );
        }
    }
}
