//! tb-train and the data pipeline: smoke run, resume equivalence, crash during a checkpoint, lock
//! contention, a token file from another tokenizer, the SFT loss mask.

use crate::common::{of_type, records};
use std::path::{Path, PathBuf};
use std::process::Command;
use tinybit::data::{load_conversations, pack};
use tinybit::template::{self, Message};
use tinybit::tokenizer::Tokenizer;

const TB_TRAIN: &str = env!("CARGO_BIN_EXE_tb-train");
const TB_TOK: &str = env!("CARGO_BIN_EXE_tb-tok");

fn shakespeare() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tinyshakespeare.txt")
}

/// A small run fixture: a 512-token BPE on 60 kB of Shakespeare, token files, tiny configs.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(max_steps: u64, checkpoint_every: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let text = std::fs::read_to_string(shakespeare()).unwrap();
        let cut = text[..60_000].rfind('\n').unwrap();
        std::fs::write(d.join("text.txt"), &text[..cut]).unwrap();
        let ok = |c: &mut Command| assert!(c.output().unwrap().status.success(), "{c:?}");
        ok(Command::new(TB_TOK)
            .args(["train", "--vocab-size", "512", "-o"])
            .arg(d.join("tok.json"))
            .arg(d.join("text.txt")));
        ok(Command::new(TB_TOK)
            .args(["encode", "--tokenizer"])
            .arg(d.join("tok.json"))
            .arg("-o")
            .arg(d.join("train.bin"))
            .arg("--val-output")
            .arg(d.join("val.bin"))
            .arg(d.join("text.txt")));
        std::fs::write(
            d.join("model.toml"),
            "n_layer = 2\nd_model = 64\nd_ffn = 128\nvocab_size = 512\n",
        )
        .unwrap();
        std::fs::write(
            d.join("train.toml"),
            format!(
                "train_data = \"train.bin\"\nval_data = \"val.bin\"\ntokenizer = \"tok.json\"\nbatch_size = 2\n\
                 ctx_len = 16\nmax_steps = {max_steps}\nlr = 3e-3\nwarmup_steps = 2\nweight_decay = 0.1\n\
                 schedule = \"wsd\"\ndecay_fraction = 0.0\n\
                 eval_every = 2\neval_batches = 1\ncheckpoint_every = {checkpoint_every}\n"
            ),
        )
        .unwrap();
        Fixture { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `tb-train --init-from CKPT` for one step with the fixture's train config, into `out`.
    fn tune(&self, ck: &Path, out: &str, extra: &[&str]) -> std::process::Output {
        Command::new(TB_TRAIN)
            .arg("--init-from")
            .arg(ck)
            .arg("--train-config")
            .arg(self.path("train.toml"))
            .arg("--out")
            .arg(self.path(out))
            .args(["-q", "-t", "1", "--set", "max_steps=1"])
            .args(extra)
            .output()
            .unwrap()
    }

    /// A model's loss on batch 0 of the run's data (what a run's first step reports), through
    /// the library.
    fn first_batch_loss(&self, model: &tinybit::model::Rwkv7) -> f32 {
        use tinybit::data::{Dataset, step_rng};
        let tok = Tokenizer::from_file(&self.path("tok.json")).unwrap();
        let data = Dataset::open(&self.path("train.bin"), &tok, "tinybit").unwrap();
        let batch = data.batch(2, 16, &mut step_rng(1, 0)).unwrap();
        tinybit::train::batch_loss(model, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// A 4-step run into `base`, for the `--init-from` tests: its last checkpoint.
    fn base_checkpoint(&self) -> PathBuf {
        let base = self.train("base", &[]);
        assert!(
            base.status.success(),
            "{}",
            String::from_utf8_lossy(&base.stderr)
        );
        self.path("base/step_0000004.safetensors")
    }

    fn train(&self, out: &str, extra: &[&str]) -> std::process::Output {
        Command::new(TB_TRAIN)
            .arg("--model-config")
            .arg(self.path("model.toml"))
            .arg("--train-config")
            .arg(self.path("train.toml"))
            .arg("--out")
            .arg(self.path(out))
            .args(["-q", "-t", "1"])
            .args(extra)
            .output()
            .unwrap()
    }
}

#[test]
fn smoke_test_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(TB_TRAIN)
        .arg("--model-config")
        .arg(root.join("configs/micro.toml"))
        .arg("--train-config")
        .arg(root.join("configs/train-micro-l4.toml"))
        .arg("--smoke-test")
        .arg("--out")
        .arg(dir.path())
        .arg("-q")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&out.stdout);
    let steps = of_type(&recs, "step");
    assert!(steps.len() >= 2);
    let first = steps[0]["loss"].as_f64().unwrap();
    let last = steps.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first - 0.5, "loss did not fall: {first} → {last}");
    assert!(!of_type(&recs, "eval").is_empty());
    let ck = of_type(&recs, "checkpoint");
    let path = ck.last().unwrap()["path"].as_str().unwrap();
    // The checkpoint alone is enough: config and tokenizer travel in it.
    let c = tinybit::checkpoint::load(Path::new(path), &candle_core::Device::Cpu).unwrap();
    assert!(c.meta.config.n_layer <= 4 && c.meta.config.d_model <= 256);
    assert!(c.meta.tokenizer.is_some());
}

#[test]
fn resume_equals_straight_run_bit_for_bit() {
    let f = Fixture::new(6, 3);
    let straight = f.train("a", &[]);
    assert!(
        straight.status.success(),
        "{}",
        String::from_utf8_lossy(&straight.stderr)
    );
    // Same run, stopped at step 3 by --set max_steps=3, then resumed to 6.
    let half = f.train("b", &["--set", "max_steps=3"]);
    assert!(half.status.success());
    let resumed = f.train("b", &["--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let a = std::fs::read(f.path("a/step_0000006.safetensors")).unwrap();
    let b = std::fs::read(f.path("b/step_0000006.safetensors")).unwrap();
    let (wa, wb) = (weights_of(&a), weights_of(&b));
    assert_eq!(wa.len(), wb.len());
    for (name, va) in &wa {
        assert_eq!(Some(va), wb.get(name), "{name} differs after resume");
    }
    // Resuming a finished run is a no-op with exit 0.
    let again = f.train("b", &["--resume"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already complete"));
}

fn weights_of(bytes: &[u8]) -> std::collections::HashMap<String, Vec<u8>> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

#[test]
fn killed_during_checkpoint_resumes_from_last_complete() {
    let f = Fixture::new(4, 2);
    // Steps 1-2, a complete checkpoint at 2; then die while writing the one at 4.
    assert!(f.train("r", &["--set", "max_steps=2"]).status.success());
    let crashed = Command::new(TB_TRAIN)
        .env("TINYBIT_TEST_ABORT_IN_CHECKPOINT", "1")
        .arg("--model-config")
        .arg(f.path("model.toml"))
        .arg("--train-config")
        .arg(f.path("train.toml"))
        .arg("--out")
        .arg(f.path("r"))
        .args(["--resume", "-q"])
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    assert!(
        f.path("r/step_0000004.safetensors").exists(),
        "the crash hook fires after the weights"
    );
    assert!(!f.path("r/step_0000004.json").exists());
    let list = tinybit::train::list_checkpoints(&f.path("r")).unwrap();
    assert_eq!(
        list.last().unwrap().step,
        2,
        "the half-written checkpoint must not count"
    );
    let resumed = f.train("r", &["--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let recs = records(&resumed.stdout);
    assert_eq!(of_type(&recs, "start")[0]["step"], 2);
    assert!(f.path("r/step_0000004.json").exists());
}

#[test]
fn locked_run_directory_exits_75() {
    let f = Fixture::new(2, 0);
    std::fs::create_dir_all(f.path("l")).unwrap();
    let lock = std::fs::File::create(f.path("l/lock")).unwrap();
    lock.lock().unwrap();
    let out = f.train("l", &[]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn token_file_from_another_tokenizer_is_refused() {
    let f = Fixture::new(2, 0);
    // Re-train the tokenizer with another size: same text, different identity.
    let st = Command::new(TB_TOK)
        .args(["train", "--vocab-size", "400", "-o"])
        .arg(f.path("tok.json"))
        .arg(f.path("text.txt"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = f.train("x", &[]);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tokenizer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sft_batch_masks_exactly_the_non_assistant_tokens() {
    let tok = Tokenizer::world();
    let conv = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "What is 2^10?"),
        Message {
            role: "assistant".into(),
            content: "Let me compute.".into(),
            tool_call: Some(serde_json::json!({"tool": "calculator", "args": {"expr": "2^10"}})),
        },
        Message::new("tool", "1024"),
        Message::new("assistant", "It is 1024."),
        Message::new("user", "Thanks"),
        Message::new("assistant", "You are welcome."),
    ];
    let spans = template::render(&conv, &[], false).unwrap();
    // The rendered string, byte for byte (tinybit(7), PROMPT TEMPLATE).
    assert_eq!(
        template::to_string(&spans),
        "system: Be brief.\n\nuser: What is 2^10?\n\nassistant: Let me compute.<|tool_call|>{\"args\":{\"expr\":\"2^10\"},\"tool\":\"calculator\"}<|end_tool_call|><|tool_result|>1024<|end_tool_result|>It is 1024.<|endoftext|>\n\nuser: Thanks\n\nassistant: You are welcome.<|endoftext|>\n\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sft.jsonl");
    std::fs::write(
        &path,
        format!("{}\n", serde_json::json!({"messages": conv})),
    )
    .unwrap();
    let convs = load_conversations(&path, &tok, "tinybit").unwrap();
    let (ids, learn) = &convs[0];
    // Independently: the learned tokens are exactly the assistant text, the call and the EOTs.
    let learned: Vec<u32> = ids
        .iter()
        .zip(learn)
        .filter(|(_, l)| **l)
        .map(|(i, _)| *i)
        .collect();
    let mut want = tok.encode("Let me compute.").unwrap();
    want.push(65530); // <|tool_call|>
    want.extend(
        tok.encode("{\"args\":{\"expr\":\"2^10\"},\"tool\":\"calculator\"}")
            .unwrap(),
    );
    want.push(65531); // <|end_tool_call|>
    want.extend(tok.encode("It is 1024.").unwrap());
    want.push(0); // <|endoftext|>
    want.extend(tok.encode("You are welcome.").unwrap());
    want.push(0);
    assert_eq!(learned, want);
    // In a packed batch, target i counts exactly when token i+1 is learned.
    let t = ids.len() - 1;
    let batch = pack(&convs, t);
    for i in 0..t {
        assert_eq!(batch.mask[i] == 1.0, learn[i + 1], "position {i}");
        assert_eq!(batch.targets[i], ids[i + 1]);
    }
}

#[test]
fn train_config_threads_size_the_pool_unless_t_is_given() {
    let f = Fixture::new(1, 1);
    let threads_of = |out: &str, extra: &[&str]| {
        let o = Command::new(TB_TRAIN)
            .arg("--model-config")
            .arg(f.path("model.toml"))
            .arg("--train-config")
            .arg(f.path("train.toml"))
            .arg("--out")
            .arg(f.path(out))
            .arg("-q")
            .args(extra)
            .env_remove("RAYON_NUM_THREADS")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        of_type(&records(&o.stdout), "start")[0]["threads"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(threads_of("a", &["--set", "threads=3"]), 3);
    assert_eq!(threads_of("b", &["--set", "threads=3", "-t", "2"]), 2);
}

/// The loss a run's first step reports.
fn first_loss(out: &std::process::Output) -> f64 {
    of_type(&records(&out.stdout), "step")[0]["loss"]
        .as_f64()
        .unwrap()
}

/// `--init-from` starts a run from a checkpoint's weights: its first step's loss is that
/// checkpoint's loss on the first batch (computed here independently), not a fresh model's; the
/// checkpoint's config is the model's when `--model-config` is left out; an architecture change
/// by `--set` is refused (2).
#[test]
fn init_from_starts_from_the_checkpoints_weights() {
    let f = Fixture::new(4, 0);
    let ck = f.base_checkpoint();
    // The checkpoint's loss on batch 0 of the run's data, through the library.
    let c = tinybit::checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    let model = tinybit::model::Rwkv7::from_params(&c.meta.config, &c.params).unwrap();
    let want = f.first_batch_loss(&model) as f64;

    let tuned = f.tune(&ck, "tuned", &[]);
    assert!(
        tuned.status.success(),
        "{}",
        String::from_utf8_lossy(&tuned.stderr)
    );
    let got = first_loss(&tuned);
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "first loss {got}, the checkpoint's {want}"
    );
    let fresh = f.train("fresh", &["--set", "max_steps=1"]);
    assert!(
        (first_loss(&fresh) - want).abs() > 1e-3,
        "a fresh model scores like the checkpoint"
    );
    let start = &records(&tuned.stdout)[0];
    assert_eq!(start["init_from"].as_str().unwrap(), ck.to_str().unwrap());
    let saved = tinybit::checkpoint::read_meta(&f.path("tuned/step_0000001.safetensors")).unwrap();
    assert_eq!(saved.config.arch_hash(), c.meta.config.arch_hash());

    let changed = f.tune(&ck, "changed", &["--set", "n_layer=3"]);
    assert_eq!(
        changed.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&changed.stderr)
    );
}

#[test]
fn grow_starts_a_deeper_model_that_computes_what_the_checkpoint_did() {
    let f = Fixture::new(4, 0);
    let ck = f.base_checkpoint();
    let grown = f.tune(&ck, "grown", &["--set", "n_layer=4", "--grow"]);
    assert!(
        grown.status.success(),
        "{}",
        String::from_utf8_lossy(&grown.stderr)
    );

    // The grown model's loss before any step is the checkpoint's: its new blocks add nothing.
    let c = tinybit::checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    let mut cfg = c.meta.config.clone();
    cfg.n_layer = 4;
    let params: std::collections::HashMap<_, _> = tinybit::train::grow_params(&c, &cfg, 7)
        .unwrap()
        .into_iter()
        .collect();
    assert!(params.contains_key("blocks.3.att.receptance.weight"));
    let small = tinybit::model::Rwkv7::from_params(&c.meta.config, &c.params).unwrap();
    let deep = tinybit::model::Rwkv7::from_params(&cfg, &params).unwrap();
    let (want, got) = (f.first_batch_loss(&small), f.first_batch_loss(&deep));
    assert!(
        (got - want).abs() <= 1e-6 * want,
        "grown {got}, checkpoint {want}"
    );
    // So is the run's first loss, and the run writes the deeper model.
    let first = first_loss(&grown);
    assert!(
        (first - want as f64).abs() <= 1e-5 * want as f64,
        "first loss {first}, checkpoint {want}"
    );
    let saved = tinybit::checkpoint::read_meta(&f.path("grown/step_0000001.safetensors")).unwrap();
    assert_eq!(saved.config.n_layer, 4);

    // Anything but more layers is refused, and so is --grow alone.
    for (out, extra) in [
        (
            "wider",
            &["--set", "n_layer=4", "--set", "d_ffn=256", "--grow"][..],
        ),
        ("shallower", &["--set", "n_layer=1", "--grow"][..]),
        ("deeper-without-grow", &["--set", "n_layer=4"][..]),
    ] {
        let o = f.tune(&ck, out, extra);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{out}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !f.path(out).join("step_0000001.safetensors").exists(),
            "{out}"
        );
    }
    let alone = f.train("alone", &["--grow"]);
    assert_eq!(
        alone.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
}

#[test]
fn stale_checkpoint_temporaries_are_removed_under_the_lock() {
    let f = Fixture::new(2, 0);
    assert!(f.train("r", &[]).status.success());
    // What a SIGKILL during write_atomic leaves behind, and look-alikes that are not its.
    let stale = [".step_0000002.safetensors.tmp4194301", ".config.json.tmp12"];
    let kept = [
        "notes.tmp12",
        ".step.tmpabc",
        ".tmp12",
        "step_0000002.safetensors.tmp12",
    ];
    for n in stale.iter().chain(&kept) {
        std::fs::write(f.path("r").join(n), b"partial").unwrap();
    }
    let out = f.train("r", &["--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in stale {
        assert!(!f.path("r").join(n).exists(), "{n} should be removed");
    }
    for n in kept {
        assert!(
            f.path("r").join(n).exists(),
            "{n} is not a temporary and must stay"
        );
    }
    // A locked directory is not touched.
    std::fs::write(f.path("r").join(stale[0]), b"partial").unwrap();
    let lock = std::fs::File::open(f.path("r/lock")).unwrap();
    lock.lock().unwrap();
    assert_eq!(f.train("r", &["--resume"]).status.code(), Some(75));
    assert!(f.path("r").join(stale[0]).exists());
}

#[test]
fn smoke_test_writes_nothing_into_a_locked_or_finished_run() {
    let f = Fixture::new(2, 0);
    std::fs::create_dir_all(f.path("l")).unwrap();
    let lock = std::fs::File::create(f.path("l/lock")).unwrap();
    lock.lock().unwrap();
    let out = f.train("l", &["--smoke-test"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!f.path("l/smoke-data").exists(), "written before the lock");
    // A run that holds checkpoints, without --resume: refused (2) before the smoke data.
    assert!(f.train("done", &[]).status.success());
    let out = f.train("done", &["--smoke-test"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !f.path("done/smoke-data").exists(),
        "written before the check"
    );
}

/// `RUN/loss.svg` is well-formed SVG with one validation marker per evaluation, across a resume
/// (the history is rebuilt from train.jsonl); `sample_every` prints greedy `sample` records.
#[test]
fn loss_plot_has_one_point_per_evaluation_and_samples_are_printed() {
    let f = Fixture::new(6, 2);
    let first = f.train("run", &["--set", "max_steps=4", "--set", "sample_every=2"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let recs = records(&first.stdout);
    let samples = of_type(&recs, "sample");
    assert_eq!(
        samples
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 4]
    );
    // The default prompt is the start of the training data.
    let text = std::fs::read_to_string(f.path("text.txt")).unwrap();
    let prompt = samples[0]["prompt"].as_str().unwrap();
    assert!(!prompt.is_empty() && text.starts_with(prompt), "{prompt:?}");
    assert!(samples.iter().all(|r| r["text"].is_string()));

    let circles = |svg: &str| {
        let doc = roxmltree::Document::parse(svg).expect("loss.svg is well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.tag_name().name() == "circle")
            .count()
    };
    let svg = std::fs::read_to_string(f.path("run/loss.svg")).unwrap();
    assert_eq!(circles(&svg), 2, "evaluations at steps 2 and 4");

    let resumed = f.train("run", &["--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let svg = std::fs::read_to_string(f.path("run/loss.svg")).unwrap();
    assert_eq!(
        circles(&svg),
        3,
        "steps 2, 4 and 6, the first two from train.jsonl"
    );
}

/// `tb-train | head -2`: the closed stdout stops the run with a checkpoint, as SIGTERM does
/// (status 130, "resume with --resume"), and train.jsonl keeps every record.
#[test]
fn closed_stdout_checkpoints_like_sigterm() {
    use std::io::BufRead;
    let f = Fixture::new(1000, 0);
    let mut child = Command::new(TB_TRAIN)
        .arg("--model-config")
        .arg(f.path("model.toml"))
        .arg("--train-config")
        .arg(f.path("train.toml"))
        .arg("--out")
        .arg(f.path("run"))
        .args(["-q", "-t", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap();
    }
    drop(out);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("stdout closed at step") && err.contains("--resume"),
        "{err}"
    );
    let log = std::fs::read_to_string(f.path("run/train.jsonl")).unwrap();
    let recs = records(log.as_bytes());
    let done = recs.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["reason"], "stdout closed");
    let step = done["step"].as_u64().unwrap();
    assert!(step < 1000, "it stopped early");
    assert!(
        f.path(&format!("run/step_{step:07}.safetensors")).exists(),
        "checkpoint at step {step}"
    );
    assert_eq!(of_type(&recs, "checkpoint").len(), 1);
}
