//! tb-eval: perplexity equals an independent cross-entropy, chunking changes nothing, thresholds
//! set the exit status, the results file follows its schema, gen and tools tasks run.

use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;
use tinybit::checkpoint::{self, Meta, TEMPLATE_TINYBIT};
use tinybit::tokenizer::Tokenizer;

const TB_EVAL: &str = env!("CARGO_BIN_EXE_tb-eval");

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    text: PathBuf,
    tok: Tokenizer,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let corpus = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tinyshakespeare.txt"),
    )
    .unwrap();
    let train = dir.path().join("train.txt");
    std::fs::write(&train, &corpus[..30_000]).unwrap();
    let text = dir.path().join("eval.txt");
    std::fs::write(&text, &corpus[50_000..51_500]).unwrap();
    let tok = Tokenizer::train_bpe(&[train], 300).unwrap();
    let mut cfg = crate::common::preset("tiny");
    cfg.vocab_size = tok.vocab_size().div_ceil(64) * 64;
    let params = crate::common::noisy_params(&cfg, 23);
    let model = dir.path().join("m.safetensors");
    let meta = Meta {
        config: cfg,
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: Some(tok.metadata()),
    };
    checkpoint::save(&model, &meta, &params).unwrap();
    Setup {
        dir,
        model,
        text,
        tok,
    }
}

/// Σ −log softmax(logits)[target] in f64, from one whole-sequence forward.
fn independent_nll(model: &Path, ids: &[u32]) -> f64 {
    let ck = checkpoint::load(model, &Device::Cpu).unwrap();
    let m = tinybit::model::Rwkv7::from_params(&ck.meta.config, &ck.params).unwrap();
    let input =
        Tensor::from_slice(&ids[..ids.len() - 1], (1, ids.len() - 1), &Device::Cpu).unwrap();
    let (logits, _) = m.forward(&input, None).unwrap();
    let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    rows.iter()
        .zip(&ids[1..])
        .map(|(row, &t)| {
            let max = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let z: f64 = row.iter().map(|&x| ((x as f64) - max).exp()).sum();
            -((row[t as usize] as f64 - max) - z.ln())
        })
        .sum()
}

#[test]
fn perplexity_equals_independent_cross_entropy_and_chunking_changes_nothing() {
    let s = setup();
    let ck = checkpoint::load(&s.model, &Device::Cpu).unwrap();
    let m = tinybit::model::Rwkv7::from_params(&ck.meta.config, &ck.params).unwrap();
    let ids = s
        .tok
        .encode(&std::fs::read_to_string(&s.text).unwrap())
        .unwrap();
    assert!(ids.len() > 100);
    let want = independent_nll(&s.model, &ids);
    let one_pass = tinybit::eval::nll(&m, &ids, 1 << 20).unwrap();
    let chunked = tinybit::eval::nll(&m, &ids, 7).unwrap();
    assert_eq!(one_pass.tokens as usize, ids.len() - 1);
    assert_eq!(chunked.tokens, one_pass.tokens);
    assert!(
        (one_pass.sum - want).abs() / want < 1e-5,
        "{} vs {want}",
        one_pass.sum
    );
    assert!(
        (chunked.sum - one_pass.sum).abs() / want < 1e-5,
        "chunked {} vs {}",
        chunked.sum,
        one_pass.sum
    );
    let r = tinybit::eval::summarize(&chunked, 1500);
    assert!((r.ppl - (want / (ids.len() - 1) as f64).exp()).abs() / r.ppl < 1e-5);
    assert!((r.bpb - want / std::f64::consts::LN_2 / 1500.0).abs() < 1e-6);
}

fn eval(s: &Setup, args: &[&str]) -> std::process::Output {
    Command::new(TB_EVAL)
        .arg("-m")
        .arg(&s.model)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn thresholds_set_the_exit_status_and_results_follow_the_schema() {
    let s = setup();
    let text = s.text.to_str().unwrap();
    let results = s.dir.path().join("r.json");
    let ok = eval(
        &s,
        &[
            text,
            "--json",
            "-o",
            results.to_str().unwrap(),
            "--fail-above",
            "ppl=1e9",
            "--chunk",
            "64",
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    // Without --json: the table on stdout, a row per file with the same figures.
    let table = eval(&s, &[text, "--chunk", "64"]);
    let table = String::from_utf8(table.stdout).unwrap();
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["file", "tokens", "bytes", "loss", "ppl", "bpb"],
        "{table}"
    );
    assert_eq!(lines[1][0], text, "{table}");
    assert_eq!(lines[1][1], r["metrics"]["tokens"].to_string(), "{table}");
    assert_eq!(lines[1][2], "1500", "{table}");
    let ppl: f64 = lines[1][4].parse().unwrap();
    assert!(
        (ppl - r["metrics"]["ppl"].as_f64().unwrap()).abs() < 1e-3 * ppl,
        "{table}"
    );
    assert_eq!(lines[2][0], "tok_per_s", "{table}");
    assert_eq!(r["type"], "result");
    assert_eq!(r["task"], "ppl");
    for k in ["ppl", "bpb", "loss", "tokens", "bytes", "tok_per_s"] {
        assert!(r["metrics"][k].is_number(), "metrics.{k}");
    }
    assert_eq!(r["metrics"]["bytes"], 1500);
    let sha = tinybit::fsutil::sha256_hex(&std::fs::read(&s.model).unwrap());
    assert_eq!(r["model"]["sha256"], sha);
    assert!(r["model"]["config"]["n_layer"].is_u64());
    assert_eq!(
        r["data"][0]["sha256"],
        tinybit::fsutil::sha256_hex(&std::fs::read(&s.text).unwrap())
    );
    assert_eq!(r["settings"]["chunk"], 64);
    assert_eq!(r["passed"], true);
    // The --json records: a metric per file, then the result.
    let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&ok.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs[0]["type"], "metric");
    assert_eq!(recs.last().unwrap()["type"], "result");
    // Missed thresholds: exit 1, for makefiles.
    assert_eq!(
        eval(&s, &[text, "-q", "--fail-above", "ppl=1.5"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        eval(&s, &[text, "-q", "--fail-below", "bpb=1000"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        eval(&s, &[text, "-q", "--fail-below", "bpb=0.001"])
            .status
            .code(),
        Some(0)
    );
    // An unknown metric or a bad value is a usage error.
    assert_eq!(
        eval(&s, &[text, "-q", "--fail-above", "nope=1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        eval(&s, &[text, "-q", "--fail-above", "ppl"]).status.code(),
        Some(2)
    );
    // A token file with another tokenizer is refused; a missing file is 66.
    assert_eq!(eval(&s, &["/nonexistent/file.txt"]).status.code(), Some(66));
}

#[test]
fn gen_and_tools_tasks_run_on_the_generation_loop() {
    let s = setup();
    let generated = eval(&s, &["--task", "gen", "-n", "4", "--json"]);
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&generated.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let samples: Vec<_> = recs.iter().filter(|r| r["type"] == "sample").collect();
    assert_eq!(
        samples.len(),
        tinybit::eval::generating::BUILTIN_PROMPTS.len()
    );
    assert!(samples.iter().all(|r| r["tokens"].as_u64().unwrap() <= 4));
    let cases = s.dir.path().join("cases.jsonl");
    std::fs::write(
        &cases,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"2^10?\"}],\"expected\":{\"tool\":\"calculator\",\"args\":{\"expr\":\"2^10\"}}}\n\
         {\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}],\"expected\":null}\n",
    )
    .unwrap();
    let out = eval(
        &s,
        &[
            "--task",
            "tools",
            "-n",
            "8",
            "--json",
            cases.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let m = &last["metrics"];
    assert_eq!(m["cases"], 2);
    for k in ["tool_selection", "exact_match", "arg_f1", "irrelevance"] {
        assert!(m[k].is_number(), "{k}: {m}");
    }
    // The same metrics per kind of request.
    assert_eq!(m["by_request"]["calculator"]["cases"], 1, "{m}");
    assert_eq!(m["by_request"]["none"]["cases"], 1, "{m}");
    assert!(m["by_request"]["none"]["irrelevance"].is_number(), "{m}");
    // Without --json the table ends with a row per kind of request.
    let out = eval(&s, &["--task", "tools", "-n", "8", cases.to_str().unwrap()]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("request "))
        .collect();
    assert!(rows[0].ends_with("answer_has_result"), "{table}");
    assert!(
        rows[1].starts_with("calculator ") && rows[2].starts_with("none "),
        "{table}"
    );
    // A malformed case file is bad input.
    std::fs::write(&cases, "{\"messages\":[]}\n").unwrap();
    assert_eq!(
        eval(&s, &["--task", "tools", cases.to_str().unwrap()])
            .status
            .code(),
        Some(65)
    );
}

/// `--batch N` scores the same predictions as one pass, split into N segments that each start
/// from a fresh state: the sum equals independent one-pass NLLs of the segments (up to the
/// rounding of batched GEMMs), and N = 1 is the one-pass result exactly. (The model is random, so
/// whether fresh states cost it anything is not asked.)
#[test]
fn batched_ppl_equals_independent_segments() {
    use tinybit::eval::{nll, nll_batched};
    let s = setup();
    let ck = checkpoint::load(&s.model, &Device::Cpu).unwrap();
    let m = tinybit::model::Rwkv7::from_params(&ck.meta.config, &ck.params).unwrap();
    let text = std::fs::read_to_string(&s.text).unwrap();
    let ids = s.tok.encode(&text).unwrap();
    let one = nll(&m, &ids, 64).unwrap();
    let hidden = indicatif::ProgressBar::hidden();
    assert_eq!(nll_batched(&m, &ids, 64, 1, &hidden).unwrap(), one);
    for batch in [3, 7] {
        let got = nll_batched(&m, &ids, 50, batch, &hidden).unwrap();
        let preds = ids.len() - 1;
        let seg = preds.div_ceil(batch);
        let mut want = 0.0;
        for a in (0..preds).step_by(seg) {
            let b = (a + seg).min(preds);
            want += nll(&m, &ids[a..=b], 1024).unwrap().sum;
        }
        assert_eq!(got.tokens as usize, preds, "every prediction counted once");
        assert!(
            (got.sum - want).abs() <= 1e-4 * want,
            "batch {batch}: {} vs {want}",
            got.sum
        );
    }
}
