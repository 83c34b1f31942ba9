//! The scripts in `scripts/`: `--help`, the commands `--dry-run` prints, a real `prepare_data.sh`
//! run on a small local corpus with the built binaries, usage errors, and the PowerShell twins.

#[cfg(unix)]
use crate::common::stderr;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
#[cfg(unix)]
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[cfg(unix)]
/// The directory cargo built the binaries into (what `TB_BIN` names).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tb-tok"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[cfg(unix)]
/// Variables the scripts read, cleared so the caller's shell cannot change a test's outcome.
const SCRIPT_VARS: [&str; 13] = [
    "DATA_PROFILE",
    "TOTAL_TOKENS",
    "BYTES_PER_TOKEN",
    "VOCAB_SIZE",
    "VAL_FRACTION",
    "SOURCES",
    "URLS",
    "TOKENIZER",
    "TB_BIN",
    "CARGO_HOME",
    "TINYBIT_BUCKET",
    "TINYBIT_RUN",
    "TINYBIT_HOME",
];

#[cfg(unix)]
/// Runs `bash scripts/NAME ARGS` from the repository root with `env` set.
fn script(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("bash");
    c.arg(root().join("scripts").join(name))
        .args(args)
        .current_dir(root());
    for v in SCRIPT_VARS {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    c.output().expect("running bash")
}

#[cfg(unix)]
fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[cfg(unix)]
/// Asserts success and returns stdout.
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

#[cfg(unix)]
fn status(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

#[cfg(unix)]
/// The one line of `out` that starts with `prefix`.
fn line_starting<'a>(out: &'a str, prefix: &str) -> &'a str {
    let found: Vec<&str> = out.lines().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(
        found.len(),
        1,
        "one line starting with {prefix:?} in:\n{out}"
    );
    found[0]
}

/// Every `.sh` under scripts/, relative to it (e.g. `cloud/startup.sh`).
fn shell_scripts() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else if p.extension().is_some_and(|x| x == "sh" || x == "ps1") {
                // `/` on every platform, as the names below are written.
                out.push(
                    p.strip_prefix(base)
                        .unwrap()
                        .display()
                        .to_string()
                        .replace('\\', "/"),
                );
            }
        }
    }
    let mut out = Vec::new();
    let base = root().join("scripts");
    walk(&base, &base, &mut out);
    out.sort();
    out
}

#[cfg(unix)] // runs bash
#[test]
fn every_script_has_help_and_dry_run() {
    let sh: Vec<String> = shell_scripts()
        .into_iter()
        .filter(|s| s.ends_with(".sh"))
        .collect();
    assert!(sh.len() >= 3, "scripts found: {sh:?}");
    for s in &sh {
        let out = ok(&script(s, &["--help"], &[]));
        assert!(out.starts_with("Usage:"), "{s} --help:\n{out}");
        for flag in ["--dry-run", "--help"] {
            assert!(out.contains(flag), "{s} --help does not mention {flag}");
        }
        let bad = script(s, &["--no-such-flag"], &[]);
        assert_eq!(
            status(&bad),
            2,
            "{s} with an unknown flag: {}",
            stderr(&bad)
        );
        assert!(
            stderr(&bad).contains("--no-such-flag"),
            "{s}: {}",
            stderr(&bad)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(root().join("scripts").join(s))
                .unwrap()
                .permissions()
                .mode();
            assert!(mode & 0o111 != 0, "{s} is not executable");
        }
    }
}

/// The `--flag`s a file mentions: `--` after a non-word character, then a lower-case letter.
fn long_flags(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i + 2 < b.len() {
        if b[i] == b'-'
            && b[i + 1] == b'-'
            && b[i + 2].is_ascii_lowercase()
            && (i == 0 || !word(b[i - 1]))
        {
            let end = (i + 2..b.len()).find(|&j| !word(b[j])).unwrap_or(b.len());
            out.insert(text[i..end].trim_end_matches('-').to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn every_sh_has_a_ps1_twin_with_the_same_flags() {
    let all = shell_scripts();
    let mut pairs = 0;
    for s in &all {
        let twin = if let Some(stem) = s.strip_suffix(".sh") {
            if [
                "bench_llamacpp.sh",
                "cloud/startup.sh",
                "gpu_bundle.sh",
                "gpu_check.sh",
                "setup_cuda.sh",
            ]
            .contains(&s.as_str())
            {
                // Linux only: the cloud VM, the cuda build, a rented GPU box, llama.cpp's Linux build.
                continue;
            }
            format!("{stem}.ps1")
        } else {
            format!("{}.sh", s.strip_suffix(".ps1").unwrap())
        };
        assert!(all.contains(&twin), "{s} has no twin {twin}");
        let read = |f: &str| std::fs::read_to_string(root().join("scripts").join(f)).unwrap();
        let (mine, theirs) = (long_flags(&read(s)), long_flags(&read(&twin)));
        assert!(
            mine.contains("--help") && mine.contains("--dry-run"),
            "{s}: {mine:?}"
        );
        assert_eq!(mine, theirs, "{s} and {twin} mention different flags");
        pairs += 1;
    }
    // prepare_data and gcp_launch, each seen from both sides.
    assert!(pairs >= 4, "twins checked: {pairs}");
}

#[test]
fn long_flags_are_found_as_words() {
    let f = long_flags("a --dry-run, --zone=x b--no x --Upper -- --set\n$i--");
    let want: BTreeSet<String> = ["--dry-run", "--zone", "--set"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(f, want);
}

#[cfg(unix)]
/// A small corpus: two text files (one in a subdirectory), and files that must be skipped.
fn corpus_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("tests/data/tinyshakespeare.txt")).unwrap();
    let cut = |n: usize| &text[..text[..n].rfind('\n').unwrap() + 1];
    let p = dir.path();
    std::fs::create_dir_all(p.join("sub")).unwrap();
    std::fs::create_dir_all(p.join(".hidden")).unwrap();
    std::fs::write(p.join("a.txt"), cut(100_000)).unwrap();
    std::fs::write(p.join("sub/b.txt"), &text[200_000..200_000 + 100_000]).unwrap();
    std::fs::write(p.join("image.bin"), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    std::fs::write(p.join("latin1.txt"), b"caf\xe9 cr\xe8me\n").unwrap();
    std::fs::write(p.join(".hidden/secret.txt"), "hidden\n").unwrap();
    dir
}

#[cfg(unix)] // runs bash
#[test]
fn prepare_data_builds_token_files_from_a_local_dir() {
    let src = corpus_dir();
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("data");
    let (s, d) = (src.path().to_str().unwrap(), data.to_str().unwrap());
    let bin = bin_dir();
    // 40,000 tokens × 4 bytes: a.txt (≤ 100,000 bytes) whole, then the head of sub/b.txt.
    let env = [
        ("TB_BIN", bin.to_str().unwrap()),
        ("TOTAL_TOKENS", "40000"),
        ("VOCAB_SIZE", "300"),
        ("VAL_FRACTION", "0.1"),
    ];
    let o = script("prepare_data.sh", &[d, s], &env);
    let printed = ok(&o);
    let want: Vec<String> = ["tokenizer.json", "train.bin", "val.bin"]
        .iter()
        .map(|f| data.join(f).display().to_string())
        .collect();
    assert_eq!(printed.lines().collect::<Vec<_>>(), want, "stdout");

    let corpus = data.join("corpus");
    let mut names: Vec<String> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".prepare_data", "000001-a.txt", "000002-b.txt"]);
    let a = std::fs::read(src.path().join("a.txt")).unwrap();
    assert_eq!(std::fs::read(corpus.join("000001-a.txt")).unwrap(), a);
    let b = std::fs::read(src.path().join("sub/b.txt")).unwrap();
    let b_cut = std::fs::read(corpus.join("000002-b.txt")).unwrap();
    let budget = 40_000 * 4 - a.len();
    assert!(
        b_cut.len() <= budget && b_cut.len() + 200 > budget,
        "{}",
        b_cut.len()
    );
    assert!(
        b.starts_with(&b_cut) && b_cut.ends_with(b"\n"),
        "cut after a whole line"
    );

    let count = |f: &str| -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_tb-tok"))
            .args(["count", data.join(f).to_str().unwrap()])
            .output()
            .unwrap();
        serde_json::from_str(&ok(&o)).unwrap()
    };
    let (train, val) = (count("train.bin"), count("val.bin"));
    assert!(train["tokens"].as_u64().unwrap() > 10_000, "{train}");
    assert!(val["tokens"].as_u64().unwrap() > 1_000, "{val}");
    let bytes = train["source_bytes"].as_u64().unwrap() + val["source_bytes"].as_u64().unwrap();
    assert_eq!(
        bytes,
        (a.len() + b_cut.len()) as u64,
        "every corpus byte encoded once"
    );
    assert_eq!(train["tokenizer_sha256"], val["tokenizer_sha256"]);
    let tok = tinybit::tokenizer::Tokenizer::from_file(&data.join("tokenizer.json")).unwrap();
    assert!(tok.vocab_size() <= 300, "VOCAB_SIZE: {}", tok.vocab_size());
    assert_eq!(train["tokenizer_sha256"].as_str().unwrap(), tok.sha256());

    // A second run replaces its own corpus, and TOKENIZER skips training.
    let mut env2 = env.to_vec();
    let tok_copy = out.path().join("given.json");
    std::fs::copy(data.join("tokenizer.json"), &tok_copy).unwrap();
    env2.push(("TOKENIZER", tok_copy.to_str().unwrap()));
    env2.push(("TOTAL_TOKENS", "1000"));
    let o = script("prepare_data.sh", &[d, s], &env2);
    ok(&o);
    assert!(!stderr(&o).contains("trained"), "{}", stderr(&o));
    assert_eq!(
        count("train.bin")["tokenizer_sha256"],
        train["tokenizer_sha256"]
    );
    let n = std::fs::read_dir(&corpus).unwrap().count();
    assert_eq!(n, 2, "the marker and the head of a.txt");
}

#[cfg(unix)] // runs bash
#[test]
fn prepare_data_dry_run_prints_the_tb_tok_commands() {
    let src = corpus_dir();
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("data");
    let (s, d) = (src.path().to_str().unwrap(), data.to_str().unwrap());
    let bin = bin_dir();
    let tok = format!("{}/tb-tok", bin.display());
    let env = [("TB_BIN", bin.to_str().unwrap())];
    let printed = ok(&script("prepare_data.sh", &["--dry-run", d, s], &env));
    assert!(!data.exists(), "a dry run writes nothing");
    let c = format!("{d}/corpus");
    let copies: Vec<&str> = printed.lines().filter(|l| l.starts_with("cp ")).collect();
    assert_eq!(
        copies,
        [
            format!("cp {s}/a.txt {c}/000001-a.txt"),
            format!("cp {s}/sub/b.txt {c}/000002-b.txt")
        ],
        "sorted; .hidden, image.bin and latin1.txt skipped"
    );
    assert_eq!(
        line_starting(&printed, &format!("{tok} train")),
        format!("{tok} train --vocab-size 50304 -o {d}/tokenizer.json {c}")
    );
    assert_eq!(
        line_starting(&printed, &format!("{tok} encode")),
        format!(
            "{tok} encode --tokenizer {d}/tokenizer.json -o {d}/train.bin --val-output {d}/val.bin --val-fraction 0.05 {c}"
        )
    );

    // The general profile's bundled text when nothing is named, cut to TOTAL_TOKENS.
    let env = [("TB_BIN", bin.to_str().unwrap()), ("TOTAL_TOKENS", "1000")];
    let printed = ok(&script("prepare_data.sh", &["--dry-run", d], &env));
    let shakespeare = root().join("tests/data/tinyshakespeare.txt");
    assert_eq!(
        line_starting(&printed, "head -c"),
        format!(
            "head -c 4000 {} | LC_ALL=C sed '$d' > {c}/000001-tinyshakespeare.txt",
            shakespeare.display()
        )
    );

    // The coding profile: the .rs files under each crate's src/ in the cargo registry.
    let cargo = tempfile::tempdir().unwrap();
    let krate = cargo.path().join("registry/src/index.example/foo-1.0");
    std::fs::create_dir_all(krate.join("src/bar")).unwrap();
    std::fs::write(krate.join("src/lib.rs"), "pub mod bar;\n").unwrap();
    std::fs::write(krate.join("src/bar/mod.rs"), "pub fn f() {}\n").unwrap();
    std::fs::write(krate.join("src/notes.txt"), "not rust\n").unwrap();
    std::fs::write(krate.join("build.rs"), "fn main() {}\n").unwrap();
    let env = [
        ("TB_BIN", bin.to_str().unwrap()),
        ("DATA_PROFILE", "coding"),
        ("CARGO_HOME", cargo.path().to_str().unwrap()),
    ];
    let printed = ok(&script("prepare_data.sh", &["--dry-run", d], &env));
    let copies: Vec<&str> = printed.lines().filter(|l| l.starts_with("cp ")).collect();
    let k = krate.display();
    assert_eq!(
        copies,
        [
            format!("cp {k}/src/bar/mod.rs {c}/000001-mod.rs"),
            format!("cp {k}/src/lib.rs {c}/000002-lib.rs")
        ]
    );

    // TOKENIZER replaces training; URLS go through tb-fetch.
    let env = [
        ("TB_BIN", bin.to_str().unwrap()),
        ("TOKENIZER", "tests/data/20B_tokenizer.json"),
        ("URLS", "https://example.com/a.txt"),
    ];
    let printed = ok(&script("prepare_data.sh", &["--dry-run", d], &env));
    assert!(!printed.contains(" train "), "{printed}");
    line_starting(
        &printed,
        &format!("cp tests/data/20B_tokenizer.json {d}/tokenizer.json"),
    );
    line_starting(
        &printed,
        &format!("{}/tb-fetch -q https://example.com/a.txt", bin.display()),
    );
}

#[cfg(unix)] // runs bash
#[test]
fn prepare_data_usage_and_input_errors() {
    let src = corpus_dir();
    let out = tempfile::tempdir().unwrap();
    let d = out.path().join("data");
    let d = d.to_str().unwrap();
    let bin = bin_dir();
    let tb = ("TB_BIN", bin.to_str().unwrap());
    let run = |args: &[&str], env: &[(&str, &str)]| status(&script("prepare_data.sh", args, env));
    assert_eq!(run(&[], &[tb]), 2, "no OUT_DIR");
    assert_eq!(run(&[d], &[tb, ("DATA_PROFILE", "poetry")]), 2);
    assert_eq!(run(&[d], &[tb, ("TOTAL_TOKENS", "lots")]), 2);
    assert_eq!(run(&[d, "/no/such/dir"], &[tb]), 66);
    assert_eq!(run(&[d], &[tb, ("TOKENIZER", "/no/such.json")]), 66);
    let latin1 = src.path().join("latin1.txt");
    assert_eq!(
        run(&[d, latin1.to_str().unwrap()], &[tb]),
        65,
        "no UTF-8 text"
    );
    let empty = tempfile::tempdir().unwrap();
    let o = script(
        "prepare_data.sh",
        &[d, src.path().to_str().unwrap()],
        &[("TB_BIN", empty.path().to_str().unwrap())],
    );
    assert_eq!(status(&o), 69, "{}", stderr(&o));
    assert!(stderr(&o).contains("tb-tok not found"), "{}", stderr(&o));
    // A corpus directory the script did not make is never deleted.
    let mine = out.path().join("mine");
    std::fs::create_dir_all(mine.join("corpus")).unwrap();
    std::fs::write(mine.join("corpus/keep.txt"), "keep\n").unwrap();
    assert_eq!(
        run(
            &[mine.to_str().unwrap(), src.path().to_str().unwrap()],
            &[tb]
        ),
        2
    );
    assert!(mine.join("corpus/keep.txt").exists());
}

#[cfg(unix)] // runs bash
#[test]
fn gcp_launch_dry_run_creates_an_l4_vm() {
    let data = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "train.bin", "val.bin"] {
        std::fs::write(data.path().join(f), "x").unwrap();
    }
    let d = data.path().to_str().unwrap();
    let args = [
        "--dry-run",
        "--project",
        "my-proj",
        "--zone=europe-west4-b",
        "--bucket",
        "gs://my-bucket/",
        "--name",
        "qbit-run",
        "--model-config",
        "configs/qbit.toml",
        "--train-config",
        "configs/train-qbit-l4.toml",
        "--data",
        d,
        "--set",
        "lr=1e-3",
        "--set",
        "device=cuda:0",
        "--spot",
    ];
    let out = ok(&script("gcp_launch.sh", &args, &[]));
    let create = line_starting(&out, "gcloud compute instances create ");
    let startup = root().join("scripts/cloud/startup.sh");
    for part in [
        "create qbit-run ",
        " --zone=europe-west4-b ",
        " --project=my-proj ",
        " --machine-type=g2-standard-8 ",
        " --accelerator=type=nvidia-l4,count=1 ",
        " --maintenance-policy=TERMINATE ",
        " --image-family=common-cu",
        " --image-project=deeplearning-platform-release ",
        " --scopes=cloud-platform ",
        "tinybit-bucket=gs://my-bucket,tinybit-run=qbit-run ",
        &format!(
            " --metadata-from-file=startup-script={} ",
            startup.display()
        ),
        " --provisioning-model=SPOT --instance-termination-action=STOP",
    ] {
        assert!(create.contains(part), "{part:?} missing from:\n{create}");
    }
    line_starting(
        &out,
        "gcloud storage buckets create gs://my-bucket --location=europe-west4 --project=my-proj",
    );
    line_starting(&out, "tar -czf ");
    line_starting(
        &out,
        "gcloud storage cp configs/qbit.toml gs://my-bucket/qbit-run/config/model.toml",
    );
    line_starting(
        &out,
        "gcloud storage cp configs/train-qbit-l4.toml gs://my-bucket/qbit-run/config/train.toml",
    );
    line_starting(
        &out,
        &format!(
            "gcloud storage cp {d}/tokenizer.json {d}/train.bin {d}/val.bin gs://my-bucket/qbit-run/data/"
        ),
    );
    let sets = out.split("set.txt <<'EOF'\n").nth(1).unwrap();
    assert!(sets.starts_with("lr=1e-3\ndevice=cuda:0\nEOF\n"), "{out}");
    // The create command is the last thing it does.
    assert_eq!(out.lines().last().unwrap(), create);

    // On-demand by default; the run name follows the model config.
    let out = ok(&script(
        "gcp_launch.sh",
        &["--dry-run", "--bucket", "b", "--data", d],
        &[],
    ));
    let create = line_starting(&out, "gcloud compute instances create ");
    assert!(create.starts_with(
        "gcloud compute instances create tinybit-micro --zone=us-central1-a --machine-type"
    ));
    assert!(
        !create.contains("SPOT") && !create.contains("--project"),
        "{create}"
    );

    let out = ok(&script(
        "gcp_launch.sh",
        &["--dry-run", "--restart", "--bucket", "b", "--name", "r1"],
        &[],
    ));
    assert_eq!(
        out,
        "gcloud compute instances start r1 --zone=us-central1-a\n"
    );

    assert_eq!(
        status(&script("gcp_launch.sh", &["--dry-run"], &[])),
        2,
        "no --bucket"
    );
    assert_eq!(
        status(&script("gcp_launch.sh", &["--dry-run", "--bucket"], &[])),
        2,
        "--bucket without a value"
    );
    assert_eq!(
        status(&script(
            "gcp_launch.sh",
            &["--dry-run", "--bucket", "b", "--name", "Upper"],
            &[]
        )),
        2,
        "not a VM name"
    );
}

#[cfg(unix)] // runs bash
#[test]
fn startup_dry_run_builds_with_cuda_and_supervises_tb_train() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let env = [
        ("TINYBIT_BUCKET", "gs://b"),
        ("TINYBIT_RUN", "r"),
        ("TINYBIT_HOME", h),
        ("HOME", "/root"),
    ];
    let boot = ok(&script("cloud/startup.sh", &["--dry-run"], &env));
    for line in [
        format!("gcloud storage cp gs://b/r/src/tinybit-src.tar.gz {h}/tinybit-src.tar.gz"),
        format!("gcloud storage rsync --recursive gs://b/r/data {h}/data"),
        format!(
            "env CUDA_COMPUTE_CAP=89 /root/.cargo/bin/cargo build --release --features cuda --bin tb-train --manifest-path {h}/src/Cargo.toml"
        ),
        format!("gcloud storage rsync --recursive gs://b/r/run {h}/run"),
        format!("ExecStart={h}/startup.sh train"),
        "Restart=on-failure".into(),
        format!("ExecStart={h}/startup.sh sync"),
        "systemctl enable --now tinybit-sync.timer".into(),
        "systemctl restart tinybit-train.service".into(),
    ] {
        line_starting(&boot, &line);
    }

    std::fs::create_dir_all(home.path().join("config")).unwrap();
    std::fs::write(home.path().join("config/set.txt"), "lr=1e-3\n\n").unwrap();
    let train = ok(&script("cloud/startup.sh", &["--dry-run", "train"], &env));
    let cmd = line_starting(&train, &format!("{h}/src/target/release/tb-train "));
    assert_eq!(
        cmd,
        format!(
            "{h}/src/target/release/tb-train --model-config config/model.toml --train-config config/train.toml \
             --out run --resume --set train.train_data=data/train.bin --set train.val_data=data/val.bin \
             --set train.tokenizer=data/tokenizer.json --set lr=1e-3"
        )
    );
    // When tb-train succeeds: mark, sync, power off — in that order.
    let after: Vec<&str> = train.split(cmd).nth(1).unwrap().lines().skip(1).collect();
    assert_eq!(after[0], format!("touch {h}/run/DONE"));
    assert!(
        after[1]
            .starts_with("gcloud storage rsync --recursive --delete-unmatched-destination-objects")
            && after[1].ends_with(&format!("{h}/run gs://b/r/run")),
        "{}",
        after[1]
    );
    assert_eq!(after[2], "systemctl poweroff");

    // A run marked DONE is not started again at boot.
    std::fs::create_dir_all(home.path().join("run")).unwrap();
    std::fs::write(home.path().join("run/DONE"), "").unwrap();
    let o = script("cloud/startup.sh", &["--dry-run"], &env);
    assert!(!ok(&o).contains("systemctl restart"), "{}", stdout(&o));
    assert!(stderr(&o).contains("marked DONE"), "{}", stderr(&o));
}
