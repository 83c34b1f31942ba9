//! tb-convert: packed ternary checkpoints, dtype conversion, official RWKV-7 import and bad inputs,
//! mostly through the binary itself.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use tinybit::checkpoint::{self, Meta, TEMPLATE_RWKV, TEMPLATE_TINYBIT};
use tinybit::config::ModelConfig;
use tinybit::model::Rwkv7;
use tinybit::model::linear::ternarize;
use tinybit::model::params::{param_specs, ternary_eligible};
use tinybit::tokenizer::Tokenizer;

fn tb_convert(args: &[&str]) -> Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tb-convert"))
        .args(args)
        .output()
        .expect("running tb-convert");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "tb-convert panicked: {stderr}"
    );
    out
}

/// Runs tb-convert and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = tb_convert(args);
    assert!(
        out.status.success(),
        "tb-convert {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs tb-convert, expects exit status `code`; returns stderr.
fn fails(args: &[&str], code: i32) -> String {
    let out = tb_convert(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "tb-convert {args:?}: {stderr}"
    );
    assert!(stderr.starts_with("tb-convert: error: "), "{stderr}");
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn native_meta(cfg: &ModelConfig) -> Meta {
    Meta {
        config: cfg.clone(),
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: None,
    }
}

fn logits(model: &Rwkv7, tokens: &[u32]) -> Tensor {
    let input = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap();
    model.forward(&input, None).unwrap().0.squeeze(0).unwrap()
}

fn sample_tokens(vocab: usize) -> Vec<u32> {
    (0..17).map(|i| (i * 131 + 7) % vocab as u32).collect()
}

fn loaded_model(path: &Path) -> (checkpoint::Checkpoint, Rwkv7) {
    let ck = checkpoint::load(path, &Device::Cpu).unwrap();
    let model = Rwkv7::from_params(&ck.meta.config, &ck.params).unwrap();
    (ck, model)
}

/// Absmean ternarization written out here on plain floats (f64 accumulation), independent of
/// `linear::ternarize` and of the packer: γ = mean|w|, w' = γ·clamp(round(w/γ), −1, 1).
/// Returns w' and γ.
fn ternarized_here(t: &Tensor) -> (Tensor, f64) {
    let vals = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gamma = vals.iter().map(|v| v.abs() as f64).sum::<f64>() / vals.len() as f64;
    // The model's f32 mean differs from this one in the last bits (checked below against the
    // stored scale); a weight that close to a rounding boundary would make the comparison
    // ill-posed, and the (seeded) test weights have none.
    let tie = vals
        .iter()
        .find(|&&v| ((v as f64 / gamma).abs() - 0.5).abs() < 2e-6);
    assert!(
        tie.is_none(),
        "weight {tie:?} sits on a rounding boundary; change the seed"
    );
    let q: Vec<f32> = vals
        .iter()
        .map(|&v| ((v as f64 / gamma).round().clamp(-1.0, 1.0) * gamma) as f32)
        .collect();
    (Tensor::from_vec(q, t.dims(), &Device::Cpu).unwrap(), gamma)
}

/// `tb-convert --quantize --dtype f32`: the unpacked rest stays f32, so that only the packing
/// differs from the input.
fn pack_keeping_f32(src: &Path, out: &Path) {
    ok(&[
        "-i",
        s(src),
        "-o",
        s(out),
        "--quantize",
        "--dtype",
        "f32",
        "-q",
    ]);
}

#[test]
fn quantized_dense_model_equals_independent_ternarization() {
    let cfg = preset("tiny");
    let params = noisy_params(&cfg, 23);
    let dir = tempfile::tempdir().unwrap();
    let (src, packed) = (dir.path().join("f32.st"), dir.path().join("packed.st"));
    checkpoint::save(&src, &native_meta(&cfg), &params).unwrap();
    pack_keeping_f32(&src, &packed);

    let packed_bytes = std::fs::read(&packed).unwrap();
    let expected: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| {
            if !ternary_eligible(n) {
                return (n.clone(), t.clone());
            }
            let (q, gamma) = ternarized_here(t);
            let stored = read_tensor(&packed_bytes, &format!("{n}.scale"));
            let stored = stored.to_vec1::<f32>().unwrap()[0] as f64;
            assert!(
                (stored - gamma).abs() <= 1e-6 * gamma,
                "{n}: scale {stored} vs {gamma}"
            );
            (n.clone(), q)
        })
        .collect();
    let (ck, model) = loaded_model(&packed);
    assert_eq!(ck.meta.config, cfg.resolved());
    for (name, want) in &expected {
        let d = max_abs_diff(&ck.params[name], want);
        let tol = if ternary_eligible(name) { 1e-6 } else { 0.0 };
        assert!(d <= tol, "{name}: differs by {d}");
    }
    let tokens = sample_tokens(cfg.vocab_size);
    let got = logits(&model, &tokens);
    let d = max_abs_diff(&got, &logits(&model_of(&cfg, &expected), &tokens));
    assert!(d <= 1e-5, "packed model vs independent ternarization: {d}");
    // Post-hoc ternarization is lossy: the test would notice a packer that stored f32.
    let lossy = max_abs_diff(&got, &logits(&model_of(&cfg, &params), &tokens));
    assert!(lossy > 1e-3, "quantization changed nothing ({lossy})");

    // --info sees 6 packed matrices per layer at about 1.6 bits per weight.
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["--info", "--json", "-i", s(&packed)])).unwrap();
    let q = &info["quantization"];
    assert_eq!(q["kind"], "ternary-b3");
    assert_eq!(q["version"], "1");
    assert_eq!(q["matrices"], 6 * cfg.n_layer);
    let bits = q["bits_per_weight"].as_f64().unwrap();
    assert!((1.6..1.61).contains(&bits), "{bits} bits/weight");

    // Packing the dequantized file again gives back the same weights.
    let again = dir.path().join("again.st");
    pack_keeping_f32(&packed, &again);
    let (ck2, _) = loaded_model(&again);
    for (name, t) in &ck.params {
        assert_eq!(
            max_abs_diff(t, &ck2.params[name]),
            0.0,
            "{name} after re-packing"
        );
    }
}

#[test]
fn quantized_ternary_aware_model_keeps_its_weights() {
    // A model trained ternary-aware computes with absmean-ternarized weights γ·T already: packing
    // stores exactly those, and loading gives a master weight that BitLinear turns back into γ·T.
    let mut cfg = preset("tiny");
    cfg.ternary_att = true;
    cfg.ternary_ffn = true;
    let params = noisy_params(&cfg, 23);
    let dir = tempfile::tempdir().unwrap();
    let (src, packed) = (dir.path().join("f32.st"), dir.path().join("packed.st"));
    checkpoint::save(&src, &native_meta(&cfg), &params).unwrap();
    pack_keeping_f32(&src, &packed);
    let (ck, model) = loaded_model(&packed);
    for (name, t) in params.iter().filter(|(n, _)| ternary_eligible(n)) {
        let (want, got) = (ternarized_here(t).0, ternarize(&ck.params[name]).unwrap());
        let gamma = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Equal up to the rounding of an f32 mean over the matrix.
        let d = max_abs_diff(&want, &got);
        assert!(
            d <= 1e-4 * gamma,
            "{name}: BitLinear weight differs by {d} (γ {gamma})"
        );
    }
    // The logits agree but for BitLinear's 8-bit activation rounding, where a last-bit change
    // can move one activation by a step (storing γ·T as the master weight, which BitLinear would
    // shrink to γ·p·T, gives differences near 0.6 here).
    let tokens = sample_tokens(cfg.vocab_size);
    let diff = (logits(&model, &tokens) - logits(&model_of(&cfg, &params), &tokens))
        .unwrap()
        .abs()
        .unwrap();
    let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        max <= 0.03 && mean <= 2e-3,
        "logits changed by packing: max {max}, mean {mean}"
    );
}

/// A `bit`-shaped parameter set (values do not matter for sizes; zeros are fast to make).
fn zero_params(cfg: &ModelConfig) -> Vec<(String, Tensor)> {
    param_specs(cfg)
        .into_iter()
        .map(|s| {
            let t = Tensor::zeros(s.shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
            (s.name, t)
        })
        .collect()
}

#[test]
fn packed_bit_model_is_three_times_smaller() {
    // The real `bit` preset, 50,304-entry vocabulary included.
    let cfg = preset("bit");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("bit.st");
    checkpoint::save(&src, &native_meta(&cfg), &zero_params(&cfg)).unwrap();
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    let ratio_of = |extra: &[&str]| {
        let out = dir.path().join("packed.st");
        let mut args = vec!["-i", s(&src), "-o", s(&out), "--quantize", "-q"];
        args.extend_from_slice(extra);
        ok(&args);
        size(&src) / size(&out)
    };
    // The default: packed matrices, the rest (the 32M-entry embedding above all) in bf16.
    let default = ratio_of(&[]);
    let info: serde_json::Value = serde_json::from_str(&ok(&[
        "--info",
        "--json",
        "-i",
        s(&dir.path().join("packed.st")),
    ]))
    .unwrap();
    assert_eq!(
        info["dtypes"]["BF16"].as_u64().map(|n| n > 0),
        Some(true),
        "{info}"
    );
    // Asked to keep f32, the embedding dominates what is left.
    let f32_rest = ratio_of(&["--dtype", "f32"]);
    eprintln!("bit: f32 → packed (bf16 rest) {default:.2}×, packed+f32 {f32_rest:.2}×");
    assert!(default >= 3.0, "packed only {default:.2}× smaller");
    assert!(f32_rest >= 2.3, "packed+f32 only {f32_rest:.2}× smaller");
}

#[test]
fn dtype_round_trips_and_identity() {
    let cfg = preset("tiny");
    let params = noisy_params(&cfg, 13);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let meta = Meta {
        tokenizer: Some(Tokenizer::world().metadata()),
        ..native_meta(&cfg)
    };
    checkpoint::save(&p("f32.st"), &meta, &params).unwrap();

    // Identity re-save: same metadata, same values bit for bit, still f32.
    ok(&["-i", s(&p("f32.st")), "-o", s(&p("same.st")), "-q"]);
    let same = checkpoint::load(&p("same.st"), &Device::Cpu).unwrap();
    assert_eq!(
        same.meta,
        checkpoint::load(&p("f32.st"), &Device::Cpu).unwrap().meta
    );
    for (name, t) in &params {
        assert_eq!(max_abs_diff(t, &same.params[name]), 0.0, "{name}");
    }

    for (flag, dtype) in [("f16", DType::F16), ("bf16", DType::BF16)] {
        let narrow = p(&format!("{flag}.st"));
        ok(&[
            "-i",
            s(&p("f32.st")),
            "-o",
            s(&narrow),
            "--dtype",
            flag,
            "-q",
        ]);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["--info", "--json", "-i", s(&narrow)])).unwrap();
        let key = flag.to_uppercase();
        assert_eq!(
            info["dtypes"][&key],
            params.len(),
            "{flag}: {}",
            info["dtypes"]
        );
        assert_eq!(info["tokenizer"]["name"], "rwkv_vocab_v20230424");
        let rounded = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        let check = |path: &Path| {
            let ck = checkpoint::load(path, &Device::Cpu).unwrap();
            assert_eq!(ck.meta, meta_resolved(&meta));
            for (name, t) in &params {
                let d = max_abs_diff(&rounded(t), &ck.params[name]);
                assert_eq!(d, 0.0, "{flag} {name}");
            }
        };
        check(&narrow);
        // Without --dtype a narrow input stays narrow; back to f32 keeps the rounded values.
        ok(&["-i", s(&narrow), "-o", s(&p("kept.st")), "-q"]);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["--info", "--json", "-i", s(&p("kept.st"))])).unwrap();
        assert_eq!(info["dtypes"][&key], params.len());
        ok(&[
            "-i",
            s(&narrow),
            "-o",
            s(&p("wide.st")),
            "--dtype",
            "f32",
            "-q",
        ]);
        check(&p("wide.st"));
        assert_eq!(
            std::fs::metadata(p("wide.st")).unwrap().len(),
            std::fs::metadata(p("f32.st")).unwrap().len()
        );
    }

    // A value beyond f16's range is refused with advice, not stored as infinity.
    let mut big = params.clone();
    big[0].1 = (&big[0].1 * 0.0).unwrap().affine(1.0, 1e5).unwrap();
    checkpoint::save(&p("big.st"), &meta, &big).unwrap();
    let err = fails(
        &["-i", s(&p("big.st")), "-o", s(&p("x.st")), "--dtype", "f16"],
        65,
    );
    assert!(err.contains("emb.weight") && err.contains("bf16"), "{err}");
    ok(&[
        "-i",
        s(&p("big.st")),
        "-o",
        s(&p("x.st")),
        "--dtype",
        "bf16",
        "-q",
    ]);
    fails(
        &["-i", s(&p("f32.st")), "-o", s(&p("x.st")), "--dtype", "f8"],
        2,
    );
}

fn meta_resolved(m: &Meta) -> Meta {
    Meta {
        config: m.config.resolved(),
        ..m.clone()
    }
}

/// The golden model's tokens, logits and f32 parameters.
fn golden() -> (Vec<u32>, Tensor, HashMap<String, Tensor>) {
    let path = golden_dir().join("rwkv7_case_a.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let ck = checkpoint::load(&path, &Device::Cpu).unwrap();
    (
        tokens_of(&read_tensor(&bytes, "golden.tokens")),
        read_tensor(&bytes, "golden.logits"),
        ck.params,
    )
}

#[test]
fn official_pth_and_safetensors_import_reproduce_golden_logits() {
    let (tokens, want, golden_params) = golden();
    let dir = tempfile::tempdir().unwrap();
    for file in ["rwkv7_case_a.safetensors", "rwkv7_case_a.pth"] {
        let out = dir.path().join(format!("{file}.st"));
        let stdout = ok(&["-i", s(&golden_dir().join(file)), "-o", s(&out), "-q"]);
        assert_eq!(stdout.trim(), s(&out), "stdout carries the output path");
        let (ck, model) = loaded_model(&out);
        assert_eq!(ck.meta.template, TEMPLATE_RWKV);
        assert_eq!(
            ck.meta.tokenizer, None,
            "a 256-entry vocabulary gets no tokenizer"
        );
        let d = max_abs_diff(&logits(&model, &tokens), &want);
        assert!(d <= 1e-4, "{file}: logits differ from golden by {d}");
        // Every weight as in the golden file, the unused block-0 value-residual tensors included.
        for (name, t) in &golden_params {
            assert_eq!(max_abs_diff(t, &ck.params[name]), 0.0, "{file}: {name}");
        }
        let v1 = &ck.params["blocks.0.att.v1"];
        assert!(
            v1.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}

#[test]
fn official_bf16_pth_import() {
    let (tokens, want, golden_params) = golden();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16.st");
    ok(&[
        "-i",
        s(&golden_dir().join("rwkv7_case_a_bf16.pth")),
        "-o",
        s(&out),
        "-q",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["--info", "--json", "-i", s(&out)])).unwrap();
    assert_eq!(
        info["dtypes"]["BF16"],
        golden_params.len(),
        "kept as bf16 by default"
    );
    let (ck, model) = loaded_model(&out);
    // The weights are the golden ones rounded to bf16, exactly; the logits then match a model of
    // those weights to f32 precision and the golden logits to bf16 precision.
    let rounded: Vec<(String, Tensor)> = golden_params
        .iter()
        .map(|(n, t)| {
            let r = t
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (n.clone(), r)
        })
        .collect();
    for (name, t) in &rounded {
        assert_eq!(max_abs_diff(t, &ck.params[name]), 0.0, "{name}");
    }
    let got = logits(&model, &tokens);
    let d = max_abs_diff(&got, &logits(&model_of(&ck.meta.config, &rounded), &tokens));
    assert!(d <= 1e-4, "bf16 import vs bf16-rounded weights: {d}");
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_abs_diff(&got, &want);
    eprintln!("bf16 import: max |logit| {scale:.3}, max diff to golden {d:.4}");
    assert!(
        d <= 0.02 * scale.max(1.0),
        "bf16 logits differ from golden by {d}"
    );
}

/// A small official-layout model with the World vocabulary size, names prefixed as `torch.compile`
/// saves them, written as plain safetensors without tinybit metadata.
fn official_world_model(dir: &Path) -> (PathBuf, ModelConfig, Vec<(String, Tensor)>) {
    let cfg = ModelConfig::from_toml_str(
        "n_layer = 1\nd_model = 64\nd_ffn = 128\nvocab_size = 65536\n\
         lora_w = 8\nlora_a = 8\nlora_v = 8\nlora_g = 8\n",
        "test",
    )
    .unwrap();
    let params = noisy_params(&cfg, 14);
    let prefixed: Vec<(String, &Tensor)> = params
        .iter()
        .map(|(n, t)| (format!("_orig_mod.{n}"), t))
        .collect();
    let path = dir.join("official.safetensors");
    std::fs::write(&path, safetensors::serialize(prefixed, None).unwrap()).unwrap();
    (path, cfg, params)
}

#[test]
fn official_import_attaches_world_tokenizer_or_the_given_one() {
    let dir = tempfile::tempdir().unwrap();
    let (src, cfg, params) = official_world_model(dir.path());
    let out = dir.path().join("imported.st");
    ok(&["-i", s(&src), "-o", s(&out), "-q"]);
    let (ck, model) = loaded_model(&out);
    assert_eq!(ck.meta.tokenizer, Some(Tokenizer::world().metadata()));
    assert_eq!(ck.meta.template, TEMPLATE_RWKV);
    assert_eq!(ck.meta.config.vocab_size, 65536);
    let tokens = sample_tokens(cfg.vocab_size);
    let d = max_abs_diff(
        &logits(&model, &tokens),
        &logits(&model_of(&cfg, &params), &tokens),
    );
    assert_eq!(d, 0.0, "imported model computes differently");
    let info = ok(&["--info", "-i", s(&out)]);
    assert!(
        info.contains("rwkv_vocab_v20230424") && info.contains(&Tokenizer::world().sha256()),
        "{info}"
    );

    // --tokenizer attaches another one instead.
    let hf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/20B_tokenizer.json");
    let out2 = dir.path().join("hf.st");
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "-i",
        s(&src),
        "-o",
        s(&out2),
        "--tokenizer",
        s(&hf),
        "--json",
        "-q",
    ]))
    .unwrap();
    let want = Tokenizer::from_file(&hf).unwrap();
    assert_eq!(report["tokenizer"]["kind"], "hf");
    assert_eq!(report["tokenizer"]["sha256"], want.sha256());
    let ck2 = checkpoint::load(&out2, &Device::Cpu).unwrap();
    assert_eq!(ck2.meta.tokenizer, Some(want.metadata()));

    // A tokenizer with more ids than the model's vocabulary does not belong to it.
    let golden = golden_dir().join("rwkv7_case_a.pth");
    let err = fails(
        &["-i", s(&golden), "-o", s(&out2), "--tokenizer", s(&hf)],
        65,
    );
    assert!(err.contains("vocabulary of 256"), "{err}");
}

/// Rewrites a safetensors file's header metadata with `edit`.
fn rewrite_metadata(src: &Path, dst: &Path, edit: impl FnOnce(&mut HashMap<String, String>)) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = header.metadata().clone().unwrap();
    edit(&mut md);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    std::fs::write(dst, safetensors::serialize(st.tensors(), Some(md)).unwrap()).unwrap();
}

#[test]
fn corrupt_truncated_and_mismatched_inputs_exit_65() {
    let cfg = preset("tiny");
    let params = noisy_params(&cfg, 15);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let out = p("out.st");
    checkpoint::save(&p("good.st"), &native_meta(&cfg), &params).unwrap();
    ok(&[
        "-i",
        s(&p("good.st")),
        "-o",
        s(&p("packed.st")),
        "--quantize",
        "-q",
    ]);
    let convert_fails = |input: &Path| {
        let err = fails(&["-i", s(input), "-o", s(&out)], 65);
        let info_err = fails(&["--info", "-i", s(input)], 65);
        assert!(err.contains(s(input)), "message names the file: {err}");
        assert!(!out.exists(), "nothing written for a bad input");
        (err, info_err)
    };

    // Truncated checkpoint and .pth, and bytes that are neither format.
    let good = std::fs::read(p("good.st")).unwrap();
    std::fs::write(p("cut.st"), &good[..good.len() / 3]).unwrap();
    let (err, _) = convert_fails(&p("cut.st"));
    assert!(err.contains("truncated or corrupt"), "{err}");
    let pth = std::fs::read(golden_dir().join("rwkv7_case_a.pth")).unwrap();
    std::fs::write(p("cut.pth"), &pth[..pth.len() - 5000]).unwrap();
    convert_fails(&p("cut.pth"));
    std::fs::write(
        p("noise.bin"),
        b"this is not a model file at all, just text\n",
    )
    .unwrap();
    convert_fails(&p("noise.bin"));

    // One flipped byte inside the pickle of a .pth: caught by the archive's checksum.
    let at = pth
        .windows(b"data.pkl".len())
        .position(|w| w == b"data.pkl")
        .unwrap()
        + 200;
    let mut flipped = pth.clone();
    flipped[at] ^= 0x5a;
    std::fs::write(p("flipped.pth"), &flipped).unwrap();
    let (err, _) = convert_fails(&p("flipped.pth"));
    assert!(err.contains("corrupt"), "{err}");

    // Unknown version and kind of packed format.
    rewrite_metadata(&p("packed.st"), &p("v2.st"), |md| {
        md.insert("tinybit.quant.version".into(), "2".into());
    });
    let (err, info_err) = convert_fails(&p("v2.st"));
    assert!(
        err.contains("version 2") && info_err.contains("version 2"),
        "{err}"
    );
    rewrite_metadata(&p("packed.st"), &p("kind.st"), |md| {
        md.insert("tinybit.quant".into(), "quaternary".into());
    });
    assert!(convert_fails(&p("kind.st")).0.contains("quaternary"));
    // The same refusal from the plain loader every command uses.
    assert_eq!(
        checkpoint::load(&p("v2.st"), &Device::Cpu)
            .err()
            .unwrap()
            .exit_code(),
        65
    );

    // A packed matrix whose bytes do not match the config's shape.
    let mut small = cfg.clone();
    small.d_ffn = 384;
    let bytes = std::fs::read(p("packed.st")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = header.metadata().clone().unwrap();
    md.insert("tinybit.config".into(), small.resolved().to_json());
    let keep: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains(".ffn.key") || n.ends_with(".packed") || n.ends_with(".scale"))
        .collect();
    std::fs::write(
        p("shape.st"),
        safetensors::serialize(keep, Some(md)).unwrap(),
    )
    .unwrap();
    let (err, _) = convert_fails(&p("shape.st"));
    assert!(err.contains("ffn.key.weight"), "{err}");

    // An unpacked tensor whose shape contradicts the config.
    let mut wrong = params.clone();
    wrong[1].1 = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
    checkpoint::save(&p("wrong.st"), &native_meta(&cfg), &wrong).unwrap();
    let (err, _) = convert_fails(&p("wrong.st"));
    assert!(err.contains(&wrong[1].0) && err.contains("shape"), "{err}");

    // Missing input: 66; usage errors: 2.
    fails(&["-i", s(&p("nope.st")), "-o", s(&out)], 66);
    fails(&["-i", s(&p("good.st"))], 2);
    fails(&["--info", "-i", s(&p("good.st")), "-o", s(&out)], 2);
}

/// An imported official model evaluates in tb-eval and chats in tb-chat like a native one.
#[test]
fn imported_official_model_evaluates_and_chats() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let golden = crate::common::golden_dir().join("rwkv7_case_a.safetensors");
    let bytes = std::fs::read(&golden).unwrap();
    // tb-eval over the golden tokens equals the cross-entropy of the golden logits.
    let imported = dir.path().join("a.safetensors");
    let st = Command::new(env!("CARGO_BIN_EXE_tb-convert"))
        .args(["-q", "-i"])
        .arg(crate::common::golden_dir().join("rwkv7_case_a.pth"))
        .arg("-o")
        .arg(&imported)
        .status()
        .unwrap();
    assert!(st.success());
    let tokens = crate::common::tokens_of(&crate::common::read_tensor(&bytes, "golden.tokens"));
    let logits = crate::common::read_tensor(&bytes, "golden.logits")
        .to_vec2::<f32>()
        .unwrap();
    let want: f64 = logits
        .iter()
        .zip(&tokens[1..])
        .map(|(row, &t)| {
            let max = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            z.ln() - (row[t as usize] as f64 - max)
        })
        .sum::<f64>()
        / (tokens.len() - 1) as f64;
    let tokfile = dir.path().join("golden.bin");
    let mut w = tinybit::tokfile::TokenWriter::create(&tokfile, 256, &"0".repeat(64)).unwrap();
    w.push(&tokens).unwrap();
    w.add_source_bytes(tokens.len() as u64);
    w.finish().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tb-eval"))
        .arg("-m")
        .arg(&imported)
        .arg(&tokfile)
        .args(["--json", "-q", "--chunk", "5"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let got = last["metrics"]["loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-4,
        "tb-eval loss {got} vs golden {want}"
    );

    // A World-vocabulary official model (golden weights, a 65,536-row embedding and head) gets
    // the World tokenizer and the official template, and answers in tb-chat.
    let ck = tinybit::checkpoint::load(&golden, &candle_core::Device::Cpu).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = ck.ordered();
    for (name, t) in tensors.iter_mut() {
        if name == "emb.weight" || name == "head.weight" {
            let rows = t.to_vec2::<f32>().unwrap();
            let wide: Vec<f32> = (0..65536).flat_map(|i| rows[i % 256].clone()).collect();
            *t = candle_core::Tensor::from_vec(wide, (65536, 128), &candle_core::Device::Cpu)
                .unwrap();
        }
    }
    let official = dir.path().join("world-official.safetensors");
    let data: Vec<(String, &candle_core::Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    std::fs::write(&official, safetensors::serialize(data, None).unwrap()).unwrap();
    let model = dir.path().join("world.safetensors");
    let st = Command::new(env!("CARGO_BIN_EXE_tb-convert"))
        .args(["-q", "-i"])
        .arg(&official)
        .arg("-o")
        .arg(&model)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new(env!("CARGO_BIN_EXE_tb-chat"))
        .arg("-m")
        .arg(&model)
        .args(["-p", "hi", "--temp", "0", "-n", "5", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stats = recs.iter().find(|r| r["type"] == "stats").unwrap();
    // The official template, no system prompt: exactly "User: hi\n\nAssistant:".
    let want_prompt = Tokenizer::world()
        .encode("User: hi\n\nAssistant:")
        .unwrap()
        .len();
    assert_eq!(stats["prompt_tokens"], want_prompt);
    assert!(recs.iter().any(|r| r["type"] == "message"));
}

/// `--average`: the mean of three checkpoints, parameter by parameter, with the input's metadata;
/// another model, another tokenizer or a packed file is refused and nothing is written.
#[test]
fn average_writes_the_parameter_mean_and_refuses_other_models() {
    let cfg = preset("tiny");
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    let sets: Vec<Vec<(String, Tensor)>> = [31, 32, 33]
        .iter()
        .map(|&seed| noisy_params(&cfg, seed))
        .collect();
    for (i, params) in sets.iter().enumerate() {
        checkpoint::save(&path(&format!("{i}.st")), &native_meta(&cfg), params).unwrap();
    }
    let report = ok(&[
        "-i",
        s(&path("0.st")),
        "--average",
        s(&path("1.st")),
        "--average",
        s(&path("2.st")),
        "-o",
        s(&path("mean.st")),
        "--dtype",
        "f32",
        "--json",
        "-q",
    ]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["averaged"], 3, "{report}");
    let mean = checkpoint::load(&path("mean.st"), &Device::Cpu).unwrap();
    let first = checkpoint::load(&path("0.st"), &Device::Cpu).unwrap();
    assert_eq!(mean.meta, first.meta);
    for (j, (name, _)) in sets[0].iter().enumerate() {
        let vals: Vec<Vec<f32>> = sets
            .iter()
            .map(|p| p[j].1.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let got: Vec<f32> = mean.params[name].flatten_all().unwrap().to_vec1().unwrap();
        for (k, g) in got.iter().enumerate() {
            let want = vals.iter().map(|v| v[k] as f64).sum::<f64>() / 3.0;
            assert!(
                (*g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{name}[{k}]: {g} vs {want}"
            );
        }
    }

    // Refused, with status 65 and no output: another configuration, another tokenizer, a packed file.
    let mut other_cfg = cfg.clone();
    other_cfg.d_ffn += 32;
    checkpoint::save(
        &path("other.st"),
        &native_meta(&other_cfg),
        &noisy_params(&other_cfg, 34),
    )
    .unwrap();
    let mut with_tok = native_meta(&cfg);
    with_tok.tokenizer = Some(Tokenizer::world().metadata());
    checkpoint::save(&path("tok.st"), &with_tok, &sets[1]).unwrap();
    pack_keeping_f32(&path("1.st"), &path("packed.st"));
    for (file, says) in [
        ("other.st", "not the same model"),
        ("tok.st", "another tokenizer"),
        ("packed.st", "packed"),
    ] {
        let out = path("refused.st");
        let err = fails(
            &[
                "-i",
                s(&path("0.st")),
                "--average",
                s(&path(file)),
                "-o",
                s(&out),
            ],
            65,
        );
        assert!(err.contains(says) && err.contains(file), "{file}: {err}");
        assert!(!out.exists(), "{file}: output written");
    }
    let err = fails(
        &[
            "--info",
            "-i",
            s(&path("0.st")),
            "--average",
            s(&path("1.st")),
        ],
        2,
    );
    assert!(err.contains("--average"), "{err}");
}
