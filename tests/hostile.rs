//! Hostile inputs (issue 16): non-finite numbers, empty data, out-of-range values and interrupted
//! writes are refused with the documented exit status and a message naming the culprit, never a
//! panic (exit 101) or a silent success.

use crate::common::stderr;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;
use tinybit::checkpoint::{self, Meta, TEMPLATE_TINYBIT};
use tinybit::sample::{Sampler, SamplerConfig};
use tinybit::tokenizer::Tokenizer;

const TB_CHAT: &str = env!("CARGO_BIN_EXE_tb-chat");

fn run(bin: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tiny random model of the chat tests, its head weights scaled so the largest is `head_max`.
fn model_with_head_max(dir: &Path, head_max: f32) -> PathBuf {
    let mut cfg = crate::common::preset("tiny");
    cfg.vocab_size = 65536;
    let params: Vec<(String, Tensor)> = crate::common::noisy_params(&cfg, 17)
        .into_iter()
        .map(|(n, t)| {
            let t = if n == "head.weight" {
                let max = t
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // Two steps: head_max / max itself may not fit in f32.
                let unit = t.affine(1.0 / max as f64, 0.0).unwrap();
                unit.affine(head_max as f64, 0.0).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    let path = dir.join("big_head.safetensors");
    let meta = Meta {
        config: cfg,
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: Some(Tokenizer::world().metadata()),
    };
    checkpoint::save(&path, &meta, &params).unwrap();
    path
}

fn chat(model: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["-m", s(model), "--no-tools", "-p", "hi", "-n", "3"];
    all.extend_from_slice(args);
    run(TB_CHAT, &all)
}

#[test]
fn sampler_refuses_non_finite_logits() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for cfg in [SamplerConfig::greedy(), SamplerConfig::default()] {
            let e = Sampler::new(cfg)
                .unwrap()
                .sample(&[0.5, bad, 1.0])
                .unwrap_err();
            assert_eq!(e.exit_code(), 65);
            assert!(e.to_string().contains("non-finite logit"), "{e}");
        }
    }
}

#[test]
fn sampler_underflowing_temperature_is_greedy() {
    // 1/1e-38 is infinite in f32; 1e-37 is finite but 100/1e-37 overflows.
    let logits = [0.0, 100.0, 99.0, -100.0];
    for t in [1e-38, 1e-37, f32::MIN_POSITIVE] {
        let mut smp = Sampler::new(SamplerConfig {
            temperature: t,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(smp.sample(&logits).unwrap(), 1, "temperature {t}");
        // An all-zero row makes 0 × ∞ = NaN if the temperature is applied blindly.
        assert!(smp.sample(&[0.0, 0.0]).unwrap() < 2, "temperature {t}");
    }
}

#[test]
fn chat_tiny_temperature_answers_like_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let tiny = chat(&model, &["--temp", "1e-38"]);
    assert_eq!(tiny.status.code(), Some(0), "{}", stderr(&tiny));
    let greedy = chat(&model, &["--temp", "0"]);
    assert_eq!(greedy.status.code(), Some(0), "{}", stderr(&greedy));
    assert_eq!(tiny.stdout, greedy.stdout);
}

/// A valid state file of `model` with one NaN in layer 0's wkv matrix.
fn nan_state(dir: &Path, model: &Path) -> PathBuf {
    let cfg = checkpoint::read_meta(model).unwrap().config;
    let mut st = tinybit::model::State::zeros(&cfg, 1, &Device::Cpu).unwrap();
    let wkv = &mut st.layers[0].wkv;
    let mut v = wkv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[3] = f32::NAN;
    *wkv = Tensor::from_vec(v, wkv.dims(), &Device::Cpu).unwrap();
    let path = dir.join("nan.state");
    st.save(&path, &cfg).unwrap();
    path
}

#[test]
fn chat_state_in_with_nan_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let state = nan_state(dir.path(), &model);
    for temp in ["0", "0.8"] {
        let out = chat(&model, &["--temp", temp, "--state-in", s(&state)]);
        assert_eq!(
            out.status.code(),
            Some(65),
            "--temp {temp}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains(s(&state)), "{}", stderr(&out));
        assert!(stderr(&out).contains("non-finite"), "{}", stderr(&out));
        assert!(out.stdout.is_empty(), "no reply from a corrupt state");
    }
}

#[test]
fn chat_overflowing_checkpoint_logits_are_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    // Every weight is finite, but their dot products with the last hidden state are not.
    let model = model_with_head_max(dir.path(), f32::MAX / 2.0);
    for temp in ["0", "0.8"] {
        let out = chat(&model, &["--temp", temp]);
        assert_eq!(
            out.status.code(),
            Some(65),
            "--temp {temp}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("non-finite logit"),
            "{}",
            stderr(&out)
        );
    }
    // Pipe mode with --json: the failure is an error record, and the exit status 65.
    let mut child = Command::new(TB_CHAT)
        .args(["-m", s(&model), "--no-tools", "--json", "-n", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let recs = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        recs.contains("\"type\":\"error\"") && recs.contains("non-finite logit"),
        "{recs}"
    );
}

/// `-o dir/that/does/not/exist/FILE` creates the directories (as `mkdir -p`); a parent that is a
/// regular file is an I/O error (74) naming the output, not a missing input (66).
#[test]
fn missing_output_directories_are_created_and_a_file_in_the_way_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let m = s(&model);
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "To be, or not to be, that is the question.\n".repeat(20),
    )
    .unwrap();
    let t = s(&text);
    let missing = dir.path().join("no-such-dir/sub");
    let out = |name: &str| missing.join(name).to_str().unwrap().to_string();
    let tb = |name: &str| match name {
        "tb-convert" => env!("CARGO_BIN_EXE_tb-convert"),
        "tb-eval" => env!("CARGO_BIN_EXE_tb-eval"),
        "tb-tok" => env!("CARGO_BIN_EXE_tb-tok"),
        _ => TB_CHAT,
    };
    let cases: Vec<(&str, Vec<String>, String)> = vec![
        (
            "tb-convert",
            vec!["-i".into(), m.into(), "-o".into(), out("c.safetensors")],
            out("c.safetensors"),
        ),
        (
            "tb-chat",
            [
                "-m",
                m,
                "--no-tools",
                "--temp",
                "0",
                "-n",
                "1",
                "-p",
                "hi",
                "--state-out",
            ]
            .iter()
            .map(|a| a.to_string())
            .chain([out("s.state")])
            .collect(),
            out("s.state"),
        ),
        (
            "tb-eval",
            vec![
                "-m".into(),
                m.into(),
                "-q".into(),
                "-o".into(),
                out("r.json"),
                t.into(),
            ],
            out("r.json"),
        ),
        (
            "tb-tok",
            vec![
                "encode".into(),
                "-m".into(),
                m.into(),
                "-o".into(),
                out("t.bin"),
                t.into(),
            ],
            out("t.bin"),
        ),
        (
            "tb-tok",
            vec![
                "train".into(),
                "--vocab-size".into(),
                "300".into(),
                "-o".into(),
                out("tok.json"),
                t.into(),
            ],
            out("tok.json"),
        ),
    ];
    for (bin, args, target) in &cases {
        let o = Command::new(tb(bin)).args(args).output().unwrap();
        assert!(o.status.success(), "{bin} {args:?}: {}", stderr(&o));
        assert!(
            Path::new(target).is_file(),
            "{bin}: {target} was not written"
        );
        std::fs::remove_dir_all(dir.path().join("no-such-dir")).unwrap();
    }
    // A file where a directory must go.
    std::fs::write(dir.path().join("no-such-dir"), "a file").unwrap();
    for (bin, args, target) in &cases {
        let o = Command::new(tb(bin)).args(args).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(74), "{bin} {args:?}: {err}");
        assert!(
            err.contains(target.as_str()) && err.contains("creating the directory"),
            "{bin}: {err}"
        );
    }
}

#[test]
fn out_of_range_numeric_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "To be, or not to be, that is the question.\n".repeat(20),
    )
    .unwrap();
    let (m, t) = (s(&model), s(&text));
    for f in ["1.5", "-0.1", "nan", "0", "1"] {
        let (train, val) = (dir.path().join("t.bin"), dir.path().join("v.bin"));
        let o = run(
            env!("CARGO_BIN_EXE_tb-tok"),
            &[
                "encode",
                "-m",
                m,
                "-o",
                s(&train),
                "--val-output",
                s(&val),
                "--val-fraction",
                f,
                t,
            ],
        );
        assert_eq!(
            o.status.code(),
            Some(2),
            "--val-fraction {f}: {}",
            stderr(&o)
        );
        assert!(stderr(&o).contains("--val-fraction"), "{}", stderr(&o));
        assert!(!train.exists() && !val.exists(), "nothing written for {f}");
    }
    let o = run(env!("CARGO_BIN_EXE_tb-eval"), &["-m", m, "--chunk", "0", t]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--chunk"), "{}", stderr(&o));
}

// ---- issue 16, defects 9, 10, 12, 13, 14 ----

/// Runs `cmd` with `stdin`, killing it and failing the test when it is still running after
/// `limit_s` seconds (a hang must fail the test, not the whole suite).
fn run_with_limit(mut cmd: Command, stdin: &[u8], limit_s: u64) -> std::process::Output {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > std::time::Duration::from_secs(limit_s) {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("{cmd:?} still running after {limit_s} s; killed. stderr: {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = writer.join();
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn hamlet(dir: &Path) -> PathBuf {
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "To be, or not to be, that is the question.\n".repeat(20),
    )
    .unwrap();
    text
}

#[test]
fn oversized_thread_count_is_clamped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let text = hamlet(dir.path());
    let (m, t) = (s(&model), s(&text));
    let mut chat = Command::new(TB_CHAT);
    chat.args(["-m", m, "--no-tools", "--temp", "0", "-n", "3", "-p", "hi"])
        .args(["-t", "100000"]);
    let mut eval = Command::new(env!("CARGO_BIN_EXE_tb-eval"));
    eval.args(["-m", m, "-q", "-t", "100000", t]);
    for cmd in [chat, eval] {
        let name = format!("{cmd:?}");
        let o = run_with_limit(cmd, b"", 90);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{name}: {err}");
        let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
        assert_eq!(warnings.len(), 1, "{name}: one warning: {err}");
        assert!(
            warnings[0].contains("-t 100000") && warnings[0].contains("threads"),
            "{name}: {err}"
        );
    }
}

#[cfg(unix)]
#[test]
fn fifo_in_an_input_directory_is_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("corpus");
    std::fs::create_dir(&inputs).unwrap();
    std::fs::write(inputs.join("a.txt"), "Once upon a time.\n".repeat(10)).unwrap();
    let fifo = inputs.join("b.txt");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let out = dir.path().join("out.bin");
    let tokenizer = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/20B_tokenizer.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-tok"));
    cmd.args([
        "encode",
        "--tokenizer",
        tokenizer,
        "-o",
        s(&out),
        s(&inputs),
    ]);
    let o = run_with_limit(cmd, b"", 20);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning") && err.contains(s(&fifo)) && err.contains("FIFO"),
        "{err}"
    );
    let f = tinybit::tokfile::TokenFile::open(&out).unwrap();
    assert!(f.len() > 10, "a.txt was still encoded");
}

#[test]
fn checkpoint_that_is_a_directory_says_it_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let text = hamlet(dir.path());
    let run_dir = dir.path().join("runs");
    std::fs::create_dir(&run_dir).unwrap();
    let (d, t) = (s(&run_dir), s(&text));
    let out = dir.path().join("x.safetensors");
    let tok_out = dir.path().join("x.bin");
    let cases: [(&str, Vec<&str>); 4] = [
        (TB_CHAT, vec!["-m", d, "--no-tools", "-p", "hi"]),
        (env!("CARGO_BIN_EXE_tb-eval"), vec!["-m", d, t]),
        (
            env!("CARGO_BIN_EXE_tb-convert"),
            vec!["-i", d, "-o", s(&out)],
        ),
        (
            env!("CARGO_BIN_EXE_tb-tok"),
            vec!["encode", "-m", d, "-o", s(&tok_out), t],
        ),
    ];
    for (bin, args) in cases {
        let o = run(bin, &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(66), "{bin} {args:?}: {err}");
        assert!(
            err.contains(d) && err.contains("is a directory") && !err.contains("os error"),
            "{bin} {args:?}: {err}"
        );
    }
}

#[test]
fn token_file_truncated_inside_its_header_says_truncated_header() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.bin");
    let mut w = tinybit::tokfile::TokenWriter::create(&full, 256, &"0".repeat(64)).unwrap();
    w.push(&[1, 2, 3]).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(&full).unwrap();
    for keep in [4, 8, 30, 63] {
        let cut = dir.path().join(format!("cut{keep}.bin"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let e = tinybit::tokfile::TokenFile::open(&cut).err().unwrap();
        let msg = e.to_string();
        assert_eq!(e.exit_code(), 65, "{msg}");
        assert!(
            msg.contains("truncated header") && !msg.contains("bad magic"),
            "{keep} bytes: {msg}"
        );
    }
    // A wrong magic is still a wrong magic.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, b"NOTTOKENS and more").unwrap();
    let msg = tinybit::tokfile::TokenFile::open(&other)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("bad magic"), "{msg}");
}

#[test]
fn state_mismatch_message_prints_the_value_not_some() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::common::preset("tiny");
    let mut other = cfg.clone();
    other.n_layer += 1;
    let path = dir.path().join("s.state");
    tinybit::model::State::zeros(&cfg, 1, &Device::Cpu)
        .unwrap()
        .save(&path, &cfg)
        .unwrap();
    let msg = tinybit::model::State::load(&path, &other, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(&cfg.arch_hash()) && !msg.contains("Some("),
        "{msg}"
    );
    // A state file without a format version: the message says so, not `None`.
    let st = tinybit::model::State::zeros(&cfg, 1, &Device::Cpu).unwrap();
    let meta: std::collections::HashMap<String, String> =
        [("tinybit.format".to_string(), "state".to_string())].into();
    let t = &st.layers[0].wkv;
    let bytes = safetensors::serialize([("state.0.wkv".to_string(), t)], Some(meta)).unwrap();
    let bare = dir.path().join("bare.state");
    std::fs::write(&bare, bytes).unwrap();
    let msg = tinybit::model::State::load(&bare, &cfg, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        !msg.contains("None") && !msg.contains("Some(") && msg.contains("version"),
        "{msg}"
    );
}

#[test]
fn chat_pipe_failure_without_json_says_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::chat::tiny_model(dir.path());
    let mut cmd = Command::new(TB_CHAT);
    cmd.args(["-m", s(&model), "--no-tools", "--temp", "0", "-n", "2"]);
    let o = run_with_limit(cmd, b"{oops\nhi\n", 60);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(65), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("error")
            && last.contains("line 1")
            && last.contains("malformed JSON")
            && !last.contains("error records"),
        "{err}"
    );
    // With --json the records are there to see.
    let mut cmd = Command::new(TB_CHAT);
    cmd.args([
        "-m",
        s(&model),
        "--no-tools",
        "--temp",
        "0",
        "-n",
        "2",
        "--json",
    ]);
    let o = run_with_limit(cmd, b"{oops\nhi\n", 60);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"type\":\"error\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn threshold_on_a_null_metric_says_the_metric_is_null() {
    let metrics = serde_json::json!({"bpb": 1.5, "ppl": null, "tokens": 10});
    let metrics = metrics.as_object().unwrap();
    for (above, below) in [
        (vec![("ppl".to_string(), 40.0)], vec![]),
        (vec![], vec![("ppl".to_string(), 1.0)]),
    ] {
        let e = tinybit::eval::check_thresholds(metrics, &above, &below)
            .err()
            .unwrap();
        let msg = e.to_string();
        assert_eq!(e.exit_code(), 2, "{msg}");
        assert!(
            msg.contains("'ppl'") && msg.contains("null") && !msg.contains("no metric"),
            "{msg}"
        );
    }
    // A metric that really is absent still lists the ones there are.
    let msg = tinybit::eval::check_thresholds(metrics, &[("exact_match".into(), 0.5)], &[])
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("no metric 'exact_match'"), "{msg}");
}

#[test]
fn malformed_fetch_urls_are_usage_errors_before_any_network_io() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    for (url, names) in [
        ("http://127.0.0.1:99999/x", "port"),
        ("http://127.0.0.1:0/x", "port"),
        ("http://", "host"),
        ("https:///tokenizer.json", "host"),
        ("http://[::1/x", "IPv6"),
        ("http://[not:an:address]/x", "IPv6"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-fetch"));
        cmd.args([url, "--cache-dir", s(&cache), "--timeout", "5"])
            .env("http_proxy", "http://127.0.0.1:9")
            .env("https_proxy", "http://127.0.0.1:9");
        let o = run_with_limit(cmd, b"", 30);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{url}: {err}");
        assert!(err.contains(url) && err.contains(names), "{url}: {err}");
        assert!(!cache.join("partial").exists(), "{url}: nothing cached");
    }
}

#[test]
fn calculator_log_base_1_is_a_division_by_zero_not_an_overflow() {
    for expr in ["log(8,1)", "log(1, 1)", "2 + log(8, 1)"] {
        let e = tinybit::tools::calculator::evaluate(expr).unwrap_err();
        assert!(
            e.contains("division by zero") && e.contains("base 1") && !e.contains("overflow"),
            "{expr}: {e}"
        );
    }
    assert_eq!(tinybit::tools::calculator::evaluate("log(8, 2)"), Ok(3.0));
    // Base 0 is no base either (f64::log gives -0 for it).
    let e = tinybit::tools::calculator::evaluate("log(8, 0)").unwrap_err();
    assert!(e.contains("must be positive"), "{e}");
}

#[test]
fn invalid_tz_warns_once_and_uses_utc() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-tool"));
    cmd.env("TZ", "Nowhere/Atlantis")
        .env("TINYBIT_DB", "/nonexistent/tinybit-test/tools.db");
    let o = run_with_limit(
        cmd,
        b"{\"tool\":\"time\",\"args\":{}}\n{\"tool\":\"time\",\"args\":{}}\n",
        30,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        err.matches("TZ=Nowhere/Atlantis is not a known zone; using UTC")
            .count(),
        1,
        "{err}"
    );
    let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2);
    for r in recs {
        assert_eq!(r["result"]["zone"], "UTC", "{r}");
    }
    // A valid zone, with or without the leading ':' or as a zoneinfo path: no warning.
    for tz in [
        "Europe/Paris",
        ":Europe/Paris",
        "/usr/share/zoneinfo/Europe/Paris",
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-tool"));
        cmd.env("TZ", tz)
            .env("TINYBIT_DB", "/nonexistent/tinybit-test/tools.db");
        let o = run_with_limit(cmd, b"{\"tool\":\"time\",\"args\":{}}\n", 30);
        assert!(!stderr(&o).contains("warning"), "TZ={tz}: {}", stderr(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Europe/Paris"),
            "TZ={tz}"
        );
    }
}

// ---- issue 16, defect 3 ----

/// A tokenizer, a token file and a tiny model config in `dir`: real inputs, so only the sizes
/// of the train config can be at fault.
fn train_inputs(dir: &Path) -> PathBuf {
    let text = hamlet(dir);
    let tok = dir.join("tok.json");
    let data = dir.join("train.bin");
    let tb_tok = env!("CARGO_BIN_EXE_tb-tok");
    let o = run(
        tb_tok,
        &["train", "--vocab-size", "300", "-o", s(&tok), s(&text)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        tb_tok,
        &["encode", "--tokenizer", s(&tok), "-o", s(&data), s(&text)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let model = dir.join("model.toml");
    std::fs::write(
        &model,
        "n_layer = 2\nd_model = 64\nd_ffn = 128\nvocab_size = 512\n",
    )
    .unwrap();
    model
}

fn train_config(dir: &Path, batch_size: &str, ctx_len: &str) -> PathBuf {
    let path = dir.join(format!("train-{batch_size}-{ctx_len}.toml"));
    std::fs::write(
        &path,
        format!(
            "train_data = \"train.bin\"\ntokenizer = \"tok.json\"\nbatch_size = {batch_size}\n\
             ctx_len = {ctx_len}\nmax_steps = 1\nlr = 1e-3\ndevice = \"cpu\"\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn huge_batch_size_is_refused_with_a_memory_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = train_inputs(d);
    let tb_train = env!("CARGO_BIN_EXE_tb-train");
    let out = d.join("run");
    let sane = train_config(d, "2", "16");
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        // Petabytes of activations: more than any machine has.
        (train_config(d, "4294967296", "64"), vec![], "GiB"),
        (sane.clone(), vec!["--set", "batch_size=4294967296"], "GiB"),
        (sane.clone(), vec!["--set", "ctx_len=1099511627776"], "GiB"),
        // batch_size × ctx_len does not fit in a machine word.
        (
            train_config(d, "9223372036854775807", "4"),
            vec![],
            "overflows",
        ),
    ];
    for (train, extra, says) in cases {
        let mut args = vec![
            "--model-config",
            s(&model),
            "--train-config",
            s(&train),
            "--out",
            s(&out),
            "-q",
            "-t",
            "1",
        ];
        args.extend(extra.iter().copied());
        let o = run(tb_train, &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(65), "{args:?}: {err}");
        assert!(
            err.contains("batch_size") && err.contains("ctx_len") && err.contains(says),
            "{args:?}: {err}"
        );
        if says == "GiB" {
            assert!(
                err.contains("needs at least") && err.contains("memory"),
                "{err}"
            );
        }
        assert!(
            !out.exists(),
            "{args:?}: nothing written before the refusal"
        );
    }
}

#[test]
fn step_memory_estimate_is_a_bound_that_grows_with_the_step() {
    let model = tinybit::config::ModelConfig::from_toml_str(
        "n_layer = 2\nd_model = 64\nd_ffn = 128\nvocab_size = 512\n",
        "test",
    )
    .unwrap();
    let text = "train_data = \"t.bin\"\ntokenizer = \"t.json\"\nbatch_size = 2\nctx_len = 16\n\
                max_steps = 1\nlr = 1e-3\n";
    let small: tinybit::train::config::TrainConfig = toml::from_str(text).unwrap();
    let m = tinybit::train::step_memory(&model, &small);
    assert_eq!(m.tokens, 32.0);
    assert!(m.params >= 16.0 * model.param_count() as f64);
    // A small step fits in a GiB; the same step a million times over does not.
    tinybit::train::check_memory(&model, &small, Some(1 << 30)).unwrap();
    let big = tinybit::train::config::TrainConfig {
        batch_size: 2 << 20,
        ..small.clone()
    };
    let e = tinybit::train::check_memory(&model, &big, Some(1 << 30)).unwrap_err();
    assert_eq!(e.exit_code(), 65, "{e}");
    // Overflow is refused whatever the device; a device of unknown size bounds nothing else.
    let huge = tinybit::train::config::TrainConfig {
        batch_size: usize::MAX,
        ctx_len: usize::MAX,
        ..small.clone()
    };
    let e = tinybit::train::check_memory(&model, &huge, None).unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    tinybit::train::check_memory(&model, &big, None).unwrap();
}

// ---- issue 16, defect 7 ----

/// Makes `cmd` run with a file-size limit of `bytes` (RLIMIT_FSIZE): a write past it fails with
/// EFBIG, as a write on a full disk fails with ENOSPC, and it does so for root too. SIGXFSZ is
/// ignored, so the write returns the error instead of killing the process.
#[cfg(unix)]
fn file_size_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls the async-signal-safe signal and
    // setrlimit.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(unix)]
const TOKENIZER_20B: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/20B_tokenizer.json");

#[cfg(unix)]
#[test]
fn tok_encode_on_a_full_disk_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = hamlet(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let (bin, val) = (out.join("train.bin"), out.join("val.bin"));
    // 0: not even the header fits; 64: the header fits, the tokens do not; 100: a few do.
    for limit in [0, 64, 100] {
        for with_val in [false, true] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-tok"));
            cmd.args(["encode", "--tokenizer", TOKENIZER_20B, "-o", s(&bin)]);
            if with_val {
                cmd.args(["--val-output", s(&val), "--val-fraction", "0.5"]);
            }
            cmd.arg(&text);
            let o = file_size_limit(&mut cmd, limit).output().unwrap();
            let err = stderr(&o);
            let what = format!("limit {limit}, val {with_val}");
            assert_eq!(o.status.code(), Some(74), "{what}: {err}");
            assert!(
                err.contains(s(&out)) && !err.contains("panicked"),
                "{what}: {err}"
            );
            assert_eq!(listing(&out), Vec::<String>::new(), "{what}: {err}");
        }
    }
    // tb-tok train's tokenizer.json likewise.
    let tok = out.join("tok.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-tok"));
    cmd.args(["train", "--vocab-size", "300", "-o", s(&tok)])
        .arg(&text);
    let o = file_size_limit(&mut cmd, 100).output().unwrap();
    assert_eq!(o.status.code(), Some(74), "{}", stderr(&o));
    assert_eq!(listing(&out), Vec::<String>::new(), "{}", stderr(&o));
    // Without the limit the same commands succeed (the limit was the only fault).
    let o = run(
        env!("CARGO_BIN_EXE_tb-tok"),
        &[
            "encode",
            "--tokenizer",
            TOKENIZER_20B,
            "-o",
            s(&bin),
            s(&text),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(listing(&out), vec!["train.bin".to_string()]);
}

// ---- issue 16, defect 15 ----

/// Every file and directory under `dir`, as paths relative to it, sorted.
#[cfg(unix)]
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[cfg(unix)]
#[test]
fn failing_commands_leave_their_output_directory_as_it_was() {
    let inp = tempfile::tempdir().unwrap();
    let i = inp.path();
    let model = crate::chat::tiny_model(i);
    let m = s(&model).to_string();
    let nan = nan_state(i, &model);
    let hot = model_with_head_max(i, f32::MAX / 2.0);
    let train_model = train_inputs(i);
    let text = hamlet(i);
    let t = s(&text).to_string();
    let empty = i.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let corrupt = i.join("corrupt.safetensors");
    std::fs::write(
        &corrupt,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":garbage}   ",
    )
    .unwrap();
    let huge = train_config(i, "4294967296", "64");
    let smoke = train_config(i, "2", "16");

    let chat = ["--no-tools", "--temp", "0", "-n", "2", "-p", "hi"];
    // (what, binary, arguments with OUT for the output directory, file-size limit, status)
    type Case = (&'static str, &'static str, Vec<String>, Option<u64>, i32);
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let cases: Vec<Case> = vec![
        (
            "chat: NaN state",
            TB_CHAT,
            [
                v(&[
                    "-m",
                    &m,
                    "--state-in",
                    s(&nan),
                    "--state-out",
                    "OUT/s.state",
                ]),
                v(&chat),
            ]
            .concat(),
            None,
            65,
        ),
        (
            "chat: overflowing logits",
            TB_CHAT,
            [v(&["-m", s(&hot), "--state-out", "OUT/s.state"]), v(&chat)].concat(),
            None,
            65,
        ),
        (
            "chat: full disk",
            TB_CHAT,
            [v(&["-m", &m, "--state-out", "OUT/s.state"]), v(&chat)].concat(),
            Some(0),
            74,
        ),
        (
            // Missing directories are created; /dev/null is a file, so no directory goes there.
            "chat: output directory cannot be made",
            TB_CHAT,
            [
                v(&["-m", &m, "--state-out", "/dev/null/no/s.state"]),
                v(&chat),
            ]
            .concat(),
            None,
            74,
        ),
        (
            "eval: empty data",
            env!("CARGO_BIN_EXE_tb-eval"),
            v(&["-m", &m, "-q", "-o", "OUT/r.json", s(&empty)]),
            None,
            65,
        ),
        (
            "eval: NaN threshold",
            env!("CARGO_BIN_EXE_tb-eval"),
            v(&[
                "-m",
                &m,
                "-q",
                "-o",
                "OUT/r.json",
                "--fail-below",
                "ppl=nan",
                &t,
            ]),
            None,
            2,
        ),
        (
            "eval: full disk",
            env!("CARGO_BIN_EXE_tb-eval"),
            v(&["-m", &m, "-q", "-o", "OUT/r.json", &t]),
            Some(0),
            74,
        ),
        (
            "convert: corrupt checkpoint",
            env!("CARGO_BIN_EXE_tb-convert"),
            v(&["-i", s(&corrupt), "-o", "OUT/c.safetensors"]),
            None,
            65,
        ),
        (
            "convert: full disk",
            env!("CARGO_BIN_EXE_tb-convert"),
            v(&["-i", &m, "-o", "OUT/c.safetensors"]),
            Some(4096),
            74,
        ),
        (
            "convert: output directory cannot be made",
            env!("CARGO_BIN_EXE_tb-convert"),
            v(&["-i", &m, "-o", "/dev/null/no/c.safetensors"]),
            None,
            74,
        ),
        (
            "tok encode: bad --val-fraction",
            env!("CARGO_BIN_EXE_tb-tok"),
            v(&[
                "encode",
                "-m",
                &m,
                "-o",
                "OUT/t.bin",
                "--val-output",
                "OUT/v.bin",
                "--val-fraction",
                "1.5",
                &t,
            ]),
            None,
            2,
        ),
        (
            "tok encode: full disk",
            env!("CARGO_BIN_EXE_tb-tok"),
            v(&[
                "encode",
                "-m",
                &m,
                "-o",
                "OUT/t.bin",
                "--val-output",
                "OUT/v.bin",
                &t,
            ]),
            Some(100),
            74,
        ),
        (
            "tok encode: disk full before the header",
            env!("CARGO_BIN_EXE_tb-tok"),
            v(&["encode", "-m", &m, "-o", "OUT/t.bin", &t]),
            Some(0),
            74,
        ),
        (
            "tok train: full disk",
            env!("CARGO_BIN_EXE_tb-tok"),
            v(&["train", "--vocab-size", "300", "-o", "OUT/tok.json", &t]),
            Some(100),
            74,
        ),
        (
            "train: huge batch_size",
            env!("CARGO_BIN_EXE_tb-train"),
            v(&[
                "--model-config",
                s(&train_model),
                "--train-config",
                s(&huge),
                "--out",
                "OUT/run",
                "-q",
            ]),
            None,
            65,
        ),
        (
            "train: smoke test on a locked run",
            env!("CARGO_BIN_EXE_tb-train"),
            v(&[
                "--model-config",
                s(&train_model),
                "--train-config",
                s(&smoke),
                "--out",
                "OUT/run",
                "-q",
                "--smoke-test",
            ]),
            None,
            75,
        ),
        (
            "fetch: malformed URL",
            env!("CARGO_BIN_EXE_tb-fetch"),
            v(&["http://[::1/x", "--cache-dir", "OUT/cache"]),
            None,
            2,
        ),
    ];
    for (what, bin, args, limit, status) in cases {
        let out = tempfile::tempdir().unwrap();
        let o = out.path();
        // The locked run exists before, and must be as it was after.
        let _lock = (what == "train: smoke test on a locked run").then(|| {
            std::fs::create_dir(o.join("run")).unwrap();
            let f = std::fs::File::create(o.join("run/lock")).unwrap();
            f.lock().unwrap();
            f
        });
        let before = tree(o);
        let args: Vec<String> = args.iter().map(|a| a.replace("OUT", s(o))).collect();
        let mut cmd = Command::new(bin);
        // Stray writes to the working directory or the XDG places would land in OUT too.
        cmd.args(&args)
            .current_dir(o)
            .stdin(std::process::Stdio::null());
        for var in [
            "XDG_DATA_HOME",
            "XDG_CACHE_HOME",
            "XDG_STATE_HOME",
            "XDG_CONFIG_HOME",
        ] {
            cmd.env(var, o.join("xdg"));
        }
        if let Some(bytes) = limit {
            file_size_limit(&mut cmd, bytes);
        }
        let r = cmd.output().unwrap();
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(status), "{what}: {args:?}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(
            tree(o),
            before,
            "{what}: {args:?} left debris; stderr: {err}"
        );
    }
}

// ---- issue 16: fuzz ----

use rand::{Rng, SeedableRng};

/// The statuses tinybit(7), EXIT STATUS, documents for a failure.
const DOCUMENTED: [u8; 6] = [2, 65, 66, 69, 74, 75];

/// Seeded mutations of a valid file: random bytes, flipped bytes (mostly in the header, where
/// the parsing is), cuts, hostile numbers in the header's text and in its binary fields.
struct Mutator {
    rng: rand_chacha::ChaCha8Rng,
}

/// Numbers a forger picks: zero, one, the edges of u32/i64/u64, a float that is not an integer.
const HOSTILE_NUMBERS: [&str; 9] = [
    "0",
    "1",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "1e308",
    "-1",
];
const HOSTILE_U64: [u64; 8] = [
    0,
    1,
    u32::MAX as u64,
    1 << 32,
    (1 << 62) + 7,
    (1 << 63) + 7,
    u64::MAX,
    u64::MAX / 2 + 1,
];

impl Mutator {
    fn new(seed: u64) -> Mutator {
        Mutator {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.rng.random::<u8>()).collect()
    }

    /// A mutation of `valid` whose first `header` bytes are its header. Returns the strategy's
    /// name with the bytes.
    fn mutate(&mut self, valid: &[u8], header: usize) -> (&'static str, Vec<u8>) {
        let header = header.clamp(1, valid.len());
        let mut v = valid.to_vec();
        match self.rng.random_range(0..7) {
            0 => {
                let n = self.rng.random_range(0..300);
                ("random", self.bytes(n))
            }
            1 => {
                // The right prefix, then noise.
                let keep = self.rng.random_range(0..=header.min(16));
                v.truncate(keep);
                let n = self.rng.random_range(0..300);
                v.extend(self.bytes(n));
                ("prefix + random", v)
            }
            2 => {
                for _ in 0..self.rng.random_range(1..8) {
                    let at = if self.rng.random_bool(0.75) {
                        self.rng.random_range(0..header)
                    } else {
                        self.rng.random_range(0..v.len())
                    };
                    v[at] = self.rng.random();
                }
                ("flipped bytes", v)
            }
            3 => {
                let at = self.rng.random_range(0..v.len());
                v.truncate(at);
                ("cut", v)
            }
            4 => {
                // A hostile number in place of a run of digits in the header's text.
                let digits: Vec<usize> = (0..header)
                    .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit()))
                    .collect();
                if digits.is_empty() {
                    return ("cut", v[..header / 2].to_vec());
                }
                let start = digits[self.rng.random_range(0..digits.len())];
                let end = (start..v.len())
                    .find(|&i| !v[i].is_ascii_digit())
                    .unwrap_or(v.len());
                let n = HOSTILE_NUMBERS[self.rng.random_range(0..HOSTILE_NUMBERS.len())];
                v.splice(start..end, n.bytes());
                ("hostile number in the header", v)
            }
            5 => {
                // A hostile little-endian u64 at an 8-aligned offset of the binary header.
                let slots = (v.len().min(64) / 8).max(1);
                let at = 8 * self.rng.random_range(0..slots);
                let n = HOSTILE_U64[self.rng.random_range(0..HOSTILE_U64.len())];
                let b = n.to_le_bytes();
                let end = (at + 8).min(v.len());
                v[at..end].copy_from_slice(&b[..end - at]);
                ("hostile u64 field", v)
            }
            _ => {
                let n = self.rng.random_range(1..64);
                let extra = self.bytes(n);
                let at = self.rng.random_range(0..=v.len());
                v.splice(at..at, extra);
                ("inserted bytes", v)
            }
        }
    }
}

/// The length of a safetensors file's header (8 + its JSON).
fn safetensors_header(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Runs `check` on `cases` mutations of `valid`; a panic or an undocumented status fails, naming
/// the case (seeded: the same case comes back on every run). `check` says whether the input was
/// accepted; both outcomes must occur, so the mutations reach past the first check.
fn fuzz(
    kind: &str,
    seed: u64,
    cases: usize,
    valid: &[&[u8]],
    header: impl Fn(&[u8]) -> usize,
    mut check: impl FnMut(&[u8]) -> Result<bool, String>,
) {
    let mut m = Mutator::new(seed);
    let mut failures = Vec::new();
    let mut accepted = 0;
    for case in 0..cases {
        let base = valid[case % valid.len()];
        let (how, bytes) = m.mutate(base, header(base));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes)));
        match r {
            Ok(Ok(ok)) => accepted += ok as usize,
            Ok(Err(e)) => failures.push(format!("case {case} ({how}): {e}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("case {case} ({how}): panicked: {msg}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{kind}: {} of {cases} cases failed (seed {seed}); first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("fuzz {kind}: {accepted} of {cases} mutations accepted, the rest refused cleanly");
    assert!(
        accepted > 0 && accepted < cases,
        "{kind}: {accepted} of {cases} mutations accepted; the fuzz must see both outcomes"
    );
}

/// Whether `r` accepted the input; an error must carry a documented status and a message.
fn documented(r: tinybit::error::Result<()>) -> Result<bool, String> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if DOCUMENTED.contains(&e.exit_code()) && !e.to_string().is_empty() => Ok(false),
        Err(e) => Err(format!("status {} for: {e}", e.exit_code())),
    }
}

/// A small model with a small BPE (so mutated copies stay small), its tokenizer, and its files.
struct FuzzFiles {
    cfg: tinybit::config::ModelConfig,
    tok: Tokenizer,
    checkpoint: Vec<u8>,
    ternary: Vec<u8>,
    state: Vec<u8>,
    tokens_u16: Vec<u8>,
    tokens_u32: Vec<u8>,
}

fn fuzz_files(dir: &Path) -> FuzzFiles {
    let text = hamlet(dir);
    let tok = Tokenizer::train_bpe(std::slice::from_ref(&text), 300).unwrap();
    let cfg = tinybit::config::ModelConfig::from_toml_str(
        "n_layer = 1\nd_model = 64\nd_ffn = 64\nvocab_size = 320\nlora_w = 8\nlora_a = 8\n\
         lora_v = 8\nlora_g = 8\n",
        "fuzz",
    )
    .unwrap();
    let meta = Meta {
        config: cfg.clone(),
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: Some(tok.metadata()),
    };
    let params = crate::common::noisy_params(&cfg, 5);
    let ck = dir.join("fuzz.safetensors");
    checkpoint::save(&ck, &meta, &params).unwrap();
    let tern = dir.join("fuzz-ternary.safetensors");
    checkpoint::save_ternary(&tern, &meta, &params, candle_core::DType::F16).unwrap();
    let st = dir.join("fuzz.state");
    tinybit::model::State::zeros(&cfg, 1, &Device::Cpu)
        .unwrap()
        .save(&st, &cfg)
        .unwrap();
    let tokens = |name: &str, vocab: usize| {
        let p = dir.join(name);
        let mut w = tinybit::tokfile::TokenWriter::create(&p, vocab, &tok.sha256()).unwrap();
        w.push(&tok.encode("To be, or not to be").unwrap()).unwrap();
        w.add_source_bytes(19);
        w.finish().unwrap();
        std::fs::read(&p).unwrap()
    };
    FuzzFiles {
        checkpoint: std::fs::read(&ck).unwrap(),
        ternary: std::fs::read(&tern).unwrap(),
        state: std::fs::read(&st).unwrap(),
        tokens_u16: tokens("u16.bin", 320),
        tokens_u32: tokens("u32.bin", 70_000),
        cfg,
        tok,
    }
}

const FUZZ_CASES: usize = 3000;

#[test]
fn fuzz_checkpoints_states_and_token_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let f = fuzz_files(dir.path());
    fuzz(
        "checkpoint",
        1,
        FUZZ_CASES,
        &[&f.checkpoint, &f.ternary],
        safetensors_header,
        |b| {
            let loaded = documented(checkpoint::from_bytes(b, "fuzz", &Device::Cpu).map(|_| ()))?;
            documented(checkpoint::inspect(b, "fuzz").map(|_| ()))?;
            Ok(loaded)
        },
    );
    let path = dir.path().join("case");
    fuzz(
        "state file",
        2,
        FUZZ_CASES,
        &[&f.state],
        safetensors_header,
        |b| {
            std::fs::write(&path, b).unwrap();
            documented(tinybit::model::State::load(&path, &f.cfg, &Device::Cpu).map(|_| ()))
        },
    );
    fuzz(
        "token file",
        3,
        FUZZ_CASES,
        &[&f.tokens_u16, &f.tokens_u32],
        |_| tinybit::tokfile::HEADER_LEN,
        |b| {
            std::fs::write(&path, b).unwrap();
            documented((|| {
                let t = tinybit::tokfile::TokenFile::open(&path)?;
                t.check_tokenizer(&f.tok.sha256())?;
                t.check_ids(f.tok.vocab_size())?;
                // Every token readable, and decodable.
                let ids = t.slice(0, t.len());
                f.tok.decode(&ids)?;
                Ok(())
            })())
        },
    );
    // A count forged so that count × width wraps around to the file's real size.
    for (valid, width) in [(&f.tokens_u16, 2u64), (&f.tokens_u32, 4)] {
        let n = u64::from_le_bytes(valid[16..24].try_into().unwrap());
        let mut forged = valid.clone();
        forged[16..24].copy_from_slice(&(n + (1 << 63) / (width / 2)).to_le_bytes());
        std::fs::write(&path, &forged).unwrap();
        let e = tinybit::tokfile::TokenFile::open(&path).err().unwrap();
        assert_eq!(e.exit_code(), 65, "{e}");
        assert!(e.to_string().contains("more than 2^64"), "{e}");
    }
}

#[test]
fn fuzz_json_lines_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::world();
    let store = std::sync::Arc::new(tinybit::tools::db::Store::at(dir.path().join("tools.db")));
    let tools = tinybit::tools::Registry::builtins(
        store,
        chrono_tz::UTC,
        tinybit::tools::time::system_clock(),
    );
    let valid: [&[u8]; 7] = [
        br#"{"tool":"calculator","args":{"expr":"2^10 + sqrt(16) * (3 - 1)"},"id":7}"#,
        br#"{"tool":"time","args":{}}"#,
        br#"{"tool":"todos","args":{"action":"add","text":"buy milk","due":"2026-01-02"}}"#,
        br#"{"tool":"notes","args":{"action":"search","query":"milk"}}"#,
        br#"{"tool":"calendar","args":{"action":"list","from":"2026-01-01","to":"2026-01-31"}}"#,
        br#"{"prompt":"hi","system":"be brief"}"#,
        br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
    ];
    let conv = dir.path().join("conv.jsonl");
    let mut line_no = 0u64;
    fuzz(
        "JSON line",
        4,
        FUZZ_CASES,
        &valid,
        |b| b.len(),
        |b| {
            let line = String::from_utf8_lossy(b);
            line_no += 1;
            // tb-tool: exactly one record, an error with a message when not ok, valid JSON.
            let rec = tools.call_json_line(&line, line_no);
            let json: serde_json::Value = serde_json::from_str(&rec.to_json_line())
                .map_err(|e| format!("tb-tool record is not JSON: {e}"))?;
            if !rec.ok() && !json["error"].as_str().is_some_and(|e| !e.is_empty()) {
                return Err(format!("failed call without a message: {json}"));
            }
            // tb-chat's pipe mode: a prompt, or a reason.
            if let Err(e) = tinybit::chat::parse_line(&line)
                && e.is_empty()
            {
                return Err("pipe line refused without a reason".into());
            }
            // tb-train's SFT data.
            std::fs::write(&conv, b).unwrap();
            let conv_ok = documented(
                tinybit::data::load_conversations(&conv, &tok, TEMPLATE_TINYBIT).map(|_| ()),
            )?;
            Ok(rec.ok() || conv_ok)
        },
    );
    // Bytes that are not UTF-8 are bad data (65), as in tb-tok, not an I/O error (74).
    std::fs::write(&conv, b"\xff\xfe{\"messages\":[]}\n").unwrap();
    let e = tinybit::data::load_conversations(&conv, &tok, TEMPLATE_TINYBIT)
        .err()
        .unwrap();
    assert_eq!(e.exit_code(), 65, "{e}");
}

/// A handful of each kind through the real binaries: no panic, a documented status.
#[test]
fn fuzz_through_the_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = fuzz_files(d);
    let model = d.join("fuzz.safetensors");
    let text = hamlet(d);
    let mut m = Mutator::new(5);
    let mut cases: Vec<(String, Command)> = Vec::new();
    for i in 0..6 {
        let (how, b) = m.mutate(&f.checkpoint, safetensors_header(&f.checkpoint));
        let p = d.join(format!("ck{i}.safetensors"));
        std::fs::write(&p, b).unwrap();
        let mut c = Command::new(TB_CHAT);
        c.args([
            "-m",
            s(&p),
            "--no-tools",
            "--temp",
            "0",
            "-n",
            "2",
            "-p",
            "hi",
        ]);
        cases.push((format!("tb-chat -m <{how}>"), c));
        let mut c = Command::new(env!("CARGO_BIN_EXE_tb-eval"));
        c.args(["-m", s(&p), "-q", s(&text)]);
        cases.push((format!("tb-eval -m <{how}>"), c));

        let (how, b) = m.mutate(&f.state, safetensors_header(&f.state));
        let p = d.join(format!("s{i}.state"));
        std::fs::write(&p, b).unwrap();
        let mut c = Command::new(TB_CHAT);
        c.args([
            "-m",
            s(&model),
            "--no-tools",
            "--temp",
            "0",
            "-n",
            "2",
            "-p",
            "hi",
        ])
        .args(["--state-in", s(&p)]);
        cases.push((format!("tb-chat --state-in <{how}>"), c));

        let (how, b) = m.mutate(&f.tokens_u16, tinybit::tokfile::HEADER_LEN);
        let p = d.join(format!("t{i}.bin"));
        std::fs::write(&p, b).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_tb-eval"));
        c.args(["-m", s(&model), "-q", s(&p)]);
        cases.push((format!("tb-eval <{how}>"), c));
        let mut c = Command::new(env!("CARGO_BIN_EXE_tb-tok"));
        c.args(["decode", "-m", s(&model), s(&p)]);
        cases.push((format!("tb-tok decode <{how}>"), c));
    }
    let mut lines = Vec::new();
    for _ in 0..40 {
        let (_, b) = m.mutate(
            br#"{"tool":"calculator","args":{"expr":"2^10"},"id":1}"#,
            50,
        );
        lines.extend(b.into_iter().filter(|&c| c != b'\n'));
        lines.push(b'\n');
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_tb-tool"));
    c.env("TINYBIT_DB", d.join("tools.db"));
    cases.push(("tb-tool <40 mutated calls>".into(), c));
    let mut c = Command::new(TB_CHAT);
    c.args([
        "-m",
        s(&model),
        "--no-tools",
        "--temp",
        "0",
        "-n",
        "2",
        "--json",
    ]);
    cases.push(("tb-chat <40 mutated pipe lines>".into(), c));
    for (what, c) in cases {
        let o = run_with_limit(c, &lines, 60);
        let err = stderr(&o);
        let code = o.status.code();
        assert!(
            code.is_some_and(|c| c == 0 || c == 1 || DOCUMENTED.contains(&(c as u8))),
            "{what}: status {:?}: {err}",
            o.status
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
}

/// Makes `cmd` run with its address space capped at `bytes` (RLIMIT_AS): allocations past it
/// fail, as they do on a machine whose memory is spent.
#[cfg(unix)]
fn address_space_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls the async-signal-safe setrlimit.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[cfg(target_os = "linux")]
#[test]
fn allocation_failure_in_tb_train_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = train_inputs(d);
    // About 10 GiB of activations: within many machines' memory (so the estimate lets it
    // through), far past the 3 GiB the process may map.
    let train = train_config(d, "40960", "16");
    let out = d.join("run");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-train"));
    cmd.args(["--model-config", s(&model), "--train-config", s(&train)])
        .args(["--out", s(&out), "-q", "-t", "1"]);
    let o = address_space_limit(&mut cmd, 3 << 30).output().unwrap();
    let err = stderr(&o);
    // 65: this machine has too little memory for the estimate, refused before allocating;
    // 74: the allocation failed. Never the abort's SIGABRT (status 134).
    match o.status.code() {
        Some(74) => assert!(
            err.contains("out of memory")
                && err.contains("lower batch_size")
                && !err.contains("panicked"),
            "{err}"
        ),
        Some(65) => assert!(err.contains("needs at least"), "{err}"),
        _ => panic!("status {:?}: {err}", o.status),
    }
}

#[test]
fn eval_batch_too_big_for_memory_is_refused_not_killed() {
    // The estimate: one row per prediction at most, each with its state and logits.
    let mut cfg = crate::common::preset("tiny");
    cfg.vocab_size = 65536;
    let (rows, bytes) = tinybit::eval::batch_memory(&cfg, 101, 512, 1_000_000);
    assert_eq!(rows, 100, "clamped to the predictions there are");
    assert!(bytes >= 4.0 * 100.0 * 65536.0, "{bytes}");
    tinybit::eval::check_batch_memory(&cfg, 101, 512, 1_000_000, Some(1 << 30)).unwrap();
    let e = tinybit::eval::check_batch_memory(&cfg, 1_000_001, 512, 1_000_000, Some(1 << 30))
        .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(
        e.to_string().contains("--batch 1000000") && e.to_string().contains("GiB"),
        "{e}"
    );

    // Through tb-eval: ~50,000 rows of 330 kB, with the address space capped at 4 GiB. Refused by
    // the estimate (2) where the machine has less memory, else the allocation fails (74); never
    // an abort (134) or the OOM killer (137).
    #[cfg(target_os = "linux")]
    {
        let dir = tempfile::tempdir().unwrap();
        let model = crate::chat::tiny_model(dir.path());
        let text = dir.path().join("long.txt");
        std::fs::write(
            &text,
            "To be, or not to be, that is the question.\n".repeat(5000),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-eval"));
        cmd.args([
            "-m",
            s(&model),
            "-q",
            "-t",
            "1",
            "--batch",
            "1000000",
            s(&text),
        ]);
        let o = address_space_limit(&mut cmd, 4 << 30).output().unwrap();
        let err = stderr(&o);
        match o.status.code() {
            Some(2) => assert!(err.contains("lower --batch"), "{err}"),
            Some(74) => assert!(
                err.contains("out of memory") && err.contains("--batch"),
                "{err}"
            ),
            _ => panic!("status {:?}: {err}", o.status),
        }
    }
}

#[test]
fn tok_train_huge_vocab_size_is_a_usage_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let text = hamlet(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let tok = out.join("tok.json");
    for v in ["1048577", "4294967296", "18446744073709551615"] {
        let o = run(
            env!("CARGO_BIN_EXE_tb-tok"),
            &["train", "--vocab-size", v, "-o", s(&tok), s(&text)],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "--vocab-size {v}: {err}");
        assert!(err.contains(v) && err.contains("out of range"), "{err}");
        assert_eq!(listing(&out), Vec::<String>::new());
    }
    // The largest allowed on a small text: as many merges as the text has, quickly.
    let o = run(
        env!("CARGO_BIN_EXE_tb-tok"),
        &["train", "--vocab-size", "1048576", "-o", s(&tok), s(&text)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let t = Tokenizer::from_file(&tok).unwrap();
    assert!(t.vocab_size() < 1000, "{}", t.vocab_size());
}
