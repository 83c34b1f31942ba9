//! tb-eval as tb-eval(1) describes it: ppl over text and token files (chunking does not change the
//! result), the results file and thresholds, gen's built-in prompts, and a closed output pipe.

use crate::common::records;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tinybit::eval::generating::BUILTIN_PROMPTS;
use tinybit::tokenizer::Tokenizer;
use tinybit::tokfile::TokenWriter;

const TB_EVAL: &str = env!("CARGO_BIN_EXE_tb-eval");

fn eval(model: &Path, args: &[&str]) -> Output {
    Command::new(TB_EVAL)
        .arg("-m")
        .arg(model)
        .args(["-t", "1", "-q"])
        .args(args)
        .output()
        .unwrap()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn shakespeare(bytes: usize) -> String {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tinyshakespeare.txt"),
    )
    .unwrap();
    text[..bytes].to_string()
}

#[test]
fn ppl_over_text_and_token_files_in_any_chunk_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let text = shakespeare(1500);
    std::fs::write(p("val.txt"), &text).unwrap();
    let tok = Tokenizer::world();
    let ids = tok.encode(&text).unwrap();
    let mut w = TokenWriter::create(&dir.path().join("val.bin"), 65536, &tok.sha256()).unwrap();
    w.push(&ids).unwrap();
    w.add_source_bytes(text.len() as u64);
    w.finish().unwrap();

    let whole = eval(&model, &["--json", "-o", &p("whole.json"), &p("val.txt")]);
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    let recs = records(&whole);
    assert_eq!(recs.len(), 2, "one metric record per file, then the result");
    assert_eq!(recs[0]["type"], "metric");
    assert_eq!(recs[1]["type"], "result");
    let result = read_json(&dir.path().join("whole.json"));
    assert_eq!(result, recs[1], "-o holds the result record");
    let m = &result["metrics"];
    assert_eq!(
        m["tokens"],
        ids.len() as u64 - 1,
        "every token but the first"
    );
    assert_eq!(m["bytes"], text.len() as u64);
    let (loss, bpb) = (m["loss"].as_f64().unwrap(), m["bpb"].as_f64().unwrap());
    let nll = loss * (ids.len() - 1) as f64;
    assert!((bpb - nll / std::f64::consts::LN_2 / text.len() as f64).abs() < 1e-9);
    assert!((m["ppl"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert_eq!(result["passed"], true);
    assert_eq!(result["settings"]["chunk"], 1024);
    assert_eq!(result["data"][0]["bytes"], text.len() as u64);
    assert_eq!(result["model"]["sha256"].as_str().unwrap().len(), 64);

    // Chunks of 7 tokens with the state carried: the same loss as one pass.
    let chunked = eval(&model, &["--chunk", "7", "--json", &p("val.txt")]);
    let l7 = records(&chunked)[1]["metrics"]["loss"].as_f64().unwrap();
    assert!((l7 - loss).abs() < 1e-4 * loss, "{l7} vs {loss}");

    // The token file of the same text gives the same numbers.
    let bin = eval(&model, &["--json", &p("val.bin")]);
    let mb = &records(&bin)[1]["metrics"];
    assert_eq!(mb["tokens"], m["tokens"]);
    assert_eq!(mb["bytes"], m["bytes"]);
    assert!((mb["loss"].as_f64().unwrap() - loss).abs() < 1e-9);

    // A missed threshold: status 1, and the results file says so.
    let miss = eval(
        &model,
        &[
            "--fail-above",
            "ppl=1",
            "-o",
            &p("miss.json"),
            &p("val.txt"),
        ],
    );
    assert_eq!(miss.status.code(), Some(1));
    assert_eq!(read_json(&dir.path().join("miss.json"))["passed"], false);
    let pass = eval(&model, &["--fail-below", "ppl=1", &p("val.txt")]);
    assert_eq!(pass.status.code(), Some(0));
    // An unknown metric is a usage error.
    let unknown = eval(&model, &["--fail-above", "accuracy=1", &p("val.txt")]);
    assert_eq!(unknown.status.code(), Some(2));
    // ppl needs files.
    assert_eq!(eval(&model, &[]).status.code(), Some(2));
}

#[test]
fn gen_without_files_answers_the_builtin_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let out = eval(&model, &["--task", "gen", "--json", "-n", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&out);
    let samples: Vec<&serde_json::Value> = recs.iter().filter(|r| r["type"] == "sample").collect();
    let prompts: Vec<&str> = samples
        .iter()
        .map(|r| r["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, BUILTIN_PROMPTS);
    let tokens: u64 = samples.iter().map(|r| r["tokens"].as_u64().unwrap()).sum();
    let result = recs.last().unwrap();
    assert_eq!(result["type"], "result");
    assert_eq!(result["metrics"]["prompts"], BUILTIN_PROMPTS.len());
    assert_eq!(result["metrics"]["generated_tokens"], tokens);
    assert_eq!(result["data"], serde_json::json!([]));

    // A reader that goes away (`| head`) ends tb-eval quietly with 0.
    let mut child = Command::new(TB_EVAL)
        .arg("-m")
        .arg(&model)
        .args(["-t", "1", "-q", "--task", "gen", "-n", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let closed = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&closed.stderr);
    assert!(
        closed.status.success() && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn ppl_on_too_few_tokens_is_refused_not_a_perfect_score() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let tok = Tokenizer::world();
    let empty_bin = dir.path().join("empty.bin");
    TokenWriter::create(&empty_bin, 65536, &tok.sha256())
        .unwrap()
        .finish()
        .unwrap();
    let one_byte = dir.path().join("one.txt");
    std::fs::write(&one_byte, "a").unwrap();
    let empty_txt = dir.path().join("empty.txt");
    std::fs::write(&empty_txt, "").unwrap();
    for f in [&empty_txt, &one_byte, &empty_bin] {
        let f = f.to_str().unwrap();
        let out = eval(&model, &["--fail-above", "ppl=40", f]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(65), "{f}: {err}");
        assert!(err.contains(f) && err.contains("too few"), "{err}");
    }
}

#[test]
fn nan_threshold_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let text = dir.path().join("val.txt");
    std::fs::write(&text, shakespeare(200)).unwrap();
    for flag in ["--fail-below", "--fail-above"] {
        let out = eval(&model, &[flag, "ppl=nan", text.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains("ppl=nan"), "{err}");
    }
}
