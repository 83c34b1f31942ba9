//! tb-chat: pipe mode, --json records, --continue vs --state-in, the REPL's slash commands, and a
//! tool call made by a model trained here to make it.

use crate::common::records;
use candle_core::Device;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tinybit::chat::{ChatOptions, ReplAction, Session, repl_command};
use tinybit::checkpoint::{self, Meta, TEMPLATE_TINYBIT};
use tinybit::engine::{Engine, EngineOptions};
use tinybit::generate::GenOptions;
use tinybit::sample::SamplerConfig;
use tinybit::template::{self, Message};
use tinybit::tokenizer::Tokenizer;
use tinybit::train::Trainable;
use tinybit::train::optim::Optimizer;

const TB_CHAT: &str = env!("CARGO_BIN_EXE_tb-chat");

/// A tiny random model with the World tokenizer, saved as a checkpoint.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let mut cfg = crate::common::preset("tiny");
    cfg.vocab_size = 65536;
    let params = crate::common::noisy_params(&cfg, 17);
    let path = dir.join("tiny.safetensors");
    let meta = Meta {
        config: cfg,
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: Some(Tokenizer::world().metadata()),
    };
    checkpoint::save(&path, &meta, &params).unwrap();
    path
}

fn chat(model: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(TB_CHAT)
        .arg("-m")
        .arg(model)
        .args(["--temp", "0", "-n", "12", "--no-tools"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn messages(recs: &[serde_json::Value]) -> Vec<String> {
    recs.iter()
        .filter(|r| r["type"] == "message")
        .map(|r| r["content"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn piped_prompts_get_one_answer_each_with_documented_records() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = chat(
        &model,
        &["--json"],
        "Hello\n{\"prompt\":\"Hi\",\"system\":\"Be terse.\"}\n\nThird\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&out.stdout);
    assert_eq!(messages(&recs).len(), 3, "three prompts, three answers");
    // The record schema of tb-chat(1): every record has a type and its fields.
    for r in &recs {
        match r["type"].as_str().unwrap() {
            "delta" => assert!(r["text"].is_string()),
            "message" => {
                assert_eq!(r["role"], "assistant");
                assert!(r["content"].is_string() && r["stop"].is_string() && r["line"].is_u64());
            }
            "stats" => {
                for f in [
                    "prompt_tokens",
                    "generated_tokens",
                    "prefill_tok_per_s",
                    "decode_tok_per_s",
                ] {
                    assert!(r[f].is_number(), "stats.{f}");
                }
            }
            other => panic!("unexpected record type {other}"),
        }
    }
    // Deltas concatenate to the message.
    let deltas: String = recs
        .iter()
        .take_while(|r| r["type"] != "message")
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, messages(&recs)[0]);
    // Plain output: stdout carries only the answers (greedy: the same text as the records).
    let plain = chat(&model, &[], "Hello\n");
    assert!(plain.status.success());
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        format!("{}\n", messages(&recs)[0])
    );
    // A malformed line is an error record; the others are still answered; exit 65.
    let bad = chat(&model, &["--json"], "Hello\n{oops\nThird\n");
    assert_eq!(bad.status.code(), Some(65));
    let recs = records(&bad.stdout);
    assert_eq!(messages(&recs).len(), 2);
    assert!(recs.iter().any(|r| r["type"] == "error" && r["line"] == 2));
}

#[test]
fn continue_equals_state_in_from_the_first_turn() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let st = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let both = chat(
        &model,
        &["--json", "--continue", "--state-out", &st("both")],
        "What is your name?\nAnd your quest?\n",
    );
    assert!(
        both.status.success(),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
    let first = chat(
        &model,
        &["--json", "--state-out", &st("first")],
        "What is your name?\n",
    );
    assert!(first.status.success());
    let second = chat(
        &model,
        &[
            "--json",
            "--state-in",
            &st("first"),
            "--state-out",
            &st("second"),
        ],
        "And your quest?\n",
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let (a, b) = (
        messages(&records(&both.stdout)),
        messages(&records(&second.stdout)),
    );
    assert_eq!(
        a[1], b[0],
        "--continue's second answer must equal --state-in's"
    );
    let cfg = checkpoint::read_meta(&model).unwrap().config;
    let read =
        |name: &str| tinybit::engine::EngineState::load(&dir.path().join(name), &cfg).unwrap();
    assert!(
        read("both") == read("second"),
        "the final states must be identical too"
    );
    // Without the first turn's state the conversation is another one (the test can fail).
    let alone = chat(
        &model,
        &["--json", "--state-out", &st("alone")],
        "And your quest?\n",
    );
    assert!(alone.status.success());
    assert!(
        read("alone") != read("second"),
        "the state must depend on the first turn"
    );
}

#[test]
fn repl_slash_commands_work_through_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let engine = Engine::load(
        &model,
        &EngineOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let opts = ChatOptions {
        system: None,
        sampler: SamplerConfig::greedy(),
        generation: GenOptions {
            max_tokens: Some(8),
            ..Default::default()
        },
        max_tool_calls: 2,
        unconstrained: false,
    };
    let registry = tinybit::tools::Registry::standard(&tinybit::tools::Options {
        db: Some(dir.path().join("tools.db")),
        external: false,
        ..Default::default()
    });
    let mut s = Session::new(engine, Tokenizer::world(), Some(registry), opts).unwrap();
    assert!(
        matches!(repl_command(&mut s, "/help").unwrap(), ReplAction::Done(h) if h.contains("/save"))
    );
    assert!(
        matches!(repl_command(&mut s, "/tools").unwrap(), ReplAction::Done(t) if t.contains("calculator("))
    );
    assert_eq!(
        repl_command(&mut s, "hello").unwrap(),
        ReplAction::Say("hello".into())
    );
    let first = s.turn("hello", &mut |_| Ok(())).unwrap().text;
    assert_eq!(s.messages().len(), 2);
    let file = dir.path().join("conv.jsonl");
    repl_command(&mut s, &format!("/save {}", file.display())).unwrap();
    assert!(file.exists() && dir.path().join("conv.jsonl.state").exists());
    let after_save = s.turn("again", &mut |_| Ok(())).unwrap().text;
    repl_command(&mut s, "/reset").unwrap();
    assert!(s.messages().is_empty());
    assert_eq!(
        s.turn("hello", &mut |_| Ok(())).unwrap().text,
        first,
        "reset gives a fresh state"
    );
    repl_command(&mut s, &format!("/load {}", file.display())).unwrap();
    assert_eq!(s.messages().len(), 2);
    assert_eq!(
        s.turn("again", &mut |_| Ok(())).unwrap().text,
        after_save,
        "load restores the state"
    );
    repl_command(&mut s, "/system You are a pirate.").unwrap();
    assert_eq!(s.system(), "You are a pirate.");
    assert!(s.messages().is_empty());
    assert!(repl_command(&mut s, "/nope").is_err());
    assert!(repl_command(&mut s, "/save").is_err());
    assert_eq!(repl_command(&mut s, "/quit").unwrap(), ReplAction::Quit);
}

#[test]
fn a_tool_call_from_the_model_is_executed_and_its_result_injected() {
    let dir = tempfile::tempdir().unwrap();
    // A small byte-level BPE with the tool markers, trained on text that has the template's words.
    let text = dir.path().join("text.txt");
    let corpus = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tinyshakespeare.txt"),
    )
    .unwrap();
    std::fs::write(&text, &corpus[..40_000]).unwrap();
    let tok = Tokenizer::train_bpe(&[text], 400).unwrap();
    let mut cfg = crate::common::preset("tiny");
    cfg.vocab_size = tok.vocab_size().div_ceil(64) * 64;
    cfg.n_layer = 2;
    // The conversation tb-chat will render: system prompt, the tool list, the user's question.
    let system = "Use tools.";
    let registry = tinybit::tools::Registry::standard(&tinybit::tools::Options {
        db: Some(dir.path().join("tools.db")),
        external: false,
        ..Default::default()
    });
    let conv = vec![
        Message::new("system", system),
        Message::new("user", "2^10?"),
        Message {
            role: "assistant".into(),
            content: String::new(),
            tool_call: Some(serde_json::json!({"tool": "calculator", "args": {"expr": "2^10"}})),
        },
        Message::new("tool", "1024"),
        Message::new("assistant", "1024."),
    ];
    let spans = template::render(&conv, &[registry.prompt_lines()], false).unwrap();
    let (ids, learn) = template::to_tokens(&spans, &tok).unwrap();
    // Memorise it.
    let tr = Trainable::new(&cfg, crate::common::noisy_params(&cfg, 5)).unwrap();
    let tcfg: tinybit::train::config::TrainConfig = toml::from_str(
        "train_data = \"x\"\ntokenizer = \"x\"\nbatch_size = 1\nctx_len = 8\nmax_steps = 1\nlr = 3e-3\n",
    )
    .unwrap();
    let mut opt = Optimizer::new(tr.vars.clone(), &tcfg).unwrap();
    let batch = tinybit::data::pack(&[(ids.clone(), learn)], ids.len() - 1);
    let mut loss = f32::MAX;
    for _ in 0..400 {
        let l = tinybit::train::batch_loss(&tr.model, &batch).unwrap();
        loss = l.to_scalar::<f32>().unwrap();
        if loss < 0.01 {
            break;
        }
        let mut g = tr.gradients(&l).unwrap();
        opt.clip(&mut g, 1.0);
        opt.step(&g, 3e-3, 0.0).unwrap();
    }
    assert!(
        loss < 0.05,
        "the model did not learn the conversation (loss {loss})"
    );
    let model = dir.path().join("tool-model.safetensors");
    let meta = Meta {
        config: cfg,
        template: TEMPLATE_TINYBIT.into(),
        tokenizer: Some(tok.metadata()),
    };
    checkpoint::save(&model, &meta, &tr.params().unwrap()).unwrap();
    let _ = Device::Cpu;

    let out = Command::new(TB_CHAT)
        .arg("-m")
        .arg(&model)
        .args([
            "--temp", "0", "-n", "60", "--json", "--system", system, "-p", "2^10?", "--db",
        ])
        .arg(dir.path().join("tools.db"))
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&out.stdout);
    let call = recs
        .iter()
        .find(|r| r["type"] == "tool_call")
        .expect("the model called a tool");
    assert_eq!(call["tool"], "calculator");
    assert_eq!(call["args"], serde_json::json!({"expr": "2^10"}));
    let result = recs
        .iter()
        .find(|r| r["type"] == "tool_result")
        .expect("the result was injected");
    assert_eq!(result["result"], serde_json::json!(1024));
    let msg = recs.iter().find(|r| r["type"] == "message").unwrap();
    assert_eq!(msg["tool_calls"], 1);
    assert!(msg["content"].as_str().unwrap().contains("1024"), "{msg}");
}

/// `-m NAME` finds `NAME.safetensors` in `$XDG_DATA_HOME/tinybit/models`, `--list-models` shows it
/// (and the bundled assistant), a missing name is a clear 66, and `-f -` reads the prompt from stdin.
#[test]
fn models_by_name_and_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("data/tinybit/models");
    std::fs::create_dir_all(&models).unwrap();
    let file = tiny_model(&models);
    std::fs::rename(&file, models.join("mini.safetensors")).unwrap();
    std::fs::write(models.join("notes.txt"), "not a model").unwrap();
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(TB_CHAT)
            .current_dir(dir.path())
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .env_remove("TINYBIT_MODEL")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    };
    let by_name = run(
        &[
            "-m", "mini", "--raw", "--temp", "0", "-n", "8", "-p", "Hello",
        ],
        "",
    );
    assert!(by_name.status.success(), "{by_name:?}");
    let by_path = run(
        &[
            "-m",
            models.join("mini.safetensors").to_str().unwrap(),
            "--raw",
            "--temp",
            "0",
            "-n",
            "8",
            "-f",
            "-",
        ],
        "Hello",
    );
    assert!(by_path.status.success(), "{by_path:?}");
    assert_eq!(
        by_name.stdout, by_path.stdout,
        "the name and the path are the same model, and -f - read the same prompt"
    );

    let listed = run(&["--list-models", "--json"], "");
    assert!(listed.status.success(), "{listed:?}");
    let names: Vec<String> = records(&listed.stdout)
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["mini", "assistant"]);
    let text = String::from_utf8(run(&["--list-models"], "").stdout).unwrap();
    assert!(
        text.starts_with("mini ") && text.contains("mini.safetensors"),
        "{text}"
    );

    let missing = run(&["-m", "nosuch", "-p", "hi"], "");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(66), "{err}");
    assert!(
        err.contains("nosuch.safetensors") && err.contains("--list-models"),
        "{err}"
    );

    let help = run(&["-h"], "");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--list-models"));
}

/// The answers' copy bias pushes the tokens that continue the longest run of the answer's last
/// tokens found in the tool result, if the run holds a word piece (keys below 100 here) and the
/// token is not JSON structure (keys from 300 here); it returns their positions in the result.
#[test]
fn copy_candidates_continue_the_longest_run_of_words() {
    use tinybit::generate::copy_candidates;
    let wordy = |t: &u32| *t < 100;
    let inside = |t: &u32| *t < 300;
    let result = [1, 2, 3, 200, 1, 2, 4, 5, 301, 6, 7, 200, 8];
    let none = Vec::<usize>::new();
    // [1, 2] occurs twice: both continuations (3 at 2, 4 at 6).
    assert_eq!(
        copy_candidates(&result, &[9, 1, 2], wordy, inside),
        vec![2, 6]
    );
    // The longer run [2, 4] decides, not [4] alone.
    assert_eq!(copy_candidates(&result, &[7, 2, 4], wordy, inside), vec![7]);
    // A digit or dash inside a value follows a word ([3] → 200 at 3)...
    assert_eq!(copy_candidates(&result, &[3], wordy, inside), vec![3]);
    // ...and a word follows a run that holds one ([7, 200] → 8 at 12).
    assert_eq!(
        copy_candidates(&result, &[6, 7, 200], wordy, inside),
        vec![12]
    );
    // Found, but what follows is JSON structure: nothing, and no shorter run is tried.
    assert_eq!(copy_candidates(&result, &[4, 5], wordy, inside), none);
    // A run without a word piece is no copy, though 200 → 1 is in the result.
    assert_eq!(copy_candidates(&result, &[200], wordy, inside), none);
    // Nothing written yet, or nothing found.
    assert_eq!(copy_candidates(&result, &[], wordy, inside), none);
    assert_eq!(copy_candidates(&result, &[9], wordy, inside), none);
    // Runs longer than 8 tokens are cut to their last 8.
    let long: Vec<u32> = (10..30).collect();
    let mut written = vec![50];
    written.extend(20..28);
    assert_eq!(copy_candidates(&long, &written, wordy, inside), vec![18]);
}
