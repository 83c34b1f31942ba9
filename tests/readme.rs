//! The README's examples run as written (issue 17), in order, in a fresh temporary directory that
//! holds only what a clone has (`configs`, `tests`, `scripts`, and `target/release` with the built
//! commands), with a new HOME and no XDG variables set:
//!
//! - a ` ```sh runnable` block must exit 0 under `bash -euo pipefail`;
//! - in a ` ```console runnable` block every `$ ` command (a trailing `\` continues it) must print
//!   the lines below it; dates and times are masked, and a `stats` record is compared by its keys
//!   (timings vary).
//!
//! Unix only: the blocks are bash (Windows users have the PowerShell twins in `scripts/`).
#![cfg(unix)]

use std::path::Path;
use std::process::Command;

/// (kind, first line number, body) of every runnable block, in order.
fn runnable_blocks(readme: &str) -> Vec<(&'static str, usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(&'static str, usize, String)> = None;
    for (i, line) in readme.lines().enumerate() {
        if let Some((kind, start, mut body)) = current.take() {
            if line.trim_start().starts_with("```") {
                out.push((kind, start, body));
            } else {
                body.push_str(line);
                body.push('\n');
                current = Some((kind, start, body));
            }
            continue;
        }
        let fence = line.trim();
        if fence == "```sh runnable" {
            current = Some(("sh", i + 2, String::new()));
        } else if fence == "```console runnable" {
            current = Some(("console", i + 2, String::new()));
        }
    }
    assert!(current.is_none(), "an unclosed block in README.md");
    out
}

/// A console transcript as (command, expected output lines).
fn transcript(body: &str) -> Vec<(String, Vec<String>)> {
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    let mut continued = false;
    for line in body.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push((cmd.to_string(), Vec::new()));
            continued = cmd.ends_with('\\');
        } else if continued {
            let (cmd, _) = steps.last_mut().unwrap();
            cmd.push('\n');
            cmd.push_str(line);
            continued = line.ends_with('\\');
        } else {
            steps
                .last_mut()
                .expect("a console block starts with a $ command")
                .1
                .push(line.to_string());
        }
    }
    steps
}

/// A line as compared: times masked; a `stats` record reduced to its sorted keys.
fn comparable(line: &str) -> String {
    let time = regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?(Z|[+-]\d\d:\d\d)?").unwrap();
    if line.contains(r#""type":"stats""#)
        && let Ok(serde_json::Value::Object(m)) = serde_json::from_str(line)
    {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        return format!("stats record with {keys:?}");
    }
    time.replace_all(line, "<time>").into_owned()
}

#[test]
fn readme_examples_run_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = runnable_blocks(&readme);
    assert!(
        blocks.len() >= 5,
        "README.md has {} runnable blocks",
        blocks.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["configs", "tests", "scripts"] {
        std::os::unix::fs::symlink(root.join(name), d.join(name)).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_tb-chat")).parent().unwrap();
    std::fs::create_dir(d.join("target")).unwrap();
    std::os::unix::fs::symlink(bin, d.join("target/release")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let shell = |script: &str| {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(d)
            .env("PATH", &path)
            // A fresh user: the XDG defaults under a new HOME.
            .env("HOME", d.join("home"))
            .env_remove("XDG_DATA_HOME")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("XDG_STATE_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("TINYBIT_MODEL")
            .env_remove("TINYBIT_DB")
            .env_remove("RAYON_NUM_THREADS")
            .output()
            .unwrap()
    };
    for (kind, line, body) in blocks {
        let started = std::time::Instant::now();
        // `cargo test readme -- --nocapture` shows each block's time: the README walk, timed.
        let timed = || {
            eprintln!(
                "README.md block at line {line}: {:.1} s",
                started.elapsed().as_secs_f64()
            )
        };
        if kind == "sh" {
            let o = shell(&body);
            timed();
            assert!(
                o.status.success(),
                "README.md block at line {line} failed ({}):\n{body}\nstderr:\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            continue;
        }
        // One shell for the whole transcript, so `echo $?` sees the command before it; a marker
        // line after each command splits the output, and the command's status is restored.
        const MARK: &str = "@@readme-step-done@@";
        let steps = transcript(&body);
        let mut script = String::from("set +e\n");
        for (cmd, _) in &steps {
            script.push_str(&format!("{cmd}\n__s=$?; echo {MARK}; (exit $__s)\n"));
        }
        let o = shell(&script);
        timed();
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        let outputs: Vec<&str> = stdout.split(&format!("{MARK}\n")).collect();
        for (i, (cmd, want)) in steps.iter().enumerate() {
            let got: Vec<String> = outputs
                .get(i)
                .unwrap_or(&"")
                .lines()
                .map(comparable)
                .collect();
            let want: Vec<String> = want.iter().map(|l| comparable(l)).collect();
            assert_eq!(
                got,
                want,
                "README.md block at line {line}: `{cmd}` printed something else (stderr: {})",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

#[test]
fn transcripts_parse_commands_continuations_and_output() {
    let steps = transcript("$ printf 'a\\n' \\\n    'b'\na\nb\n$ echo $?\n0\n");
    assert_eq!(
        steps,
        [
            (
                "printf 'a\\n' \\\n    'b'".to_string(),
                vec!["a".to_string(), "b".to_string()]
            ),
            ("echo $?".to_string(), vec!["0".to_string()]),
        ]
    );
    assert_eq!(
        comparable(r#"{"created":"2026-11-26T10:03:06Z","id":1}"#),
        r#"{"created":"<time>","id":1}"#
    );
    assert_eq!(
        comparable(r#"{"ttft_ms":5.1,"type":"stats"}"#),
        comparable(r#"{"type":"stats","ttft_ms":9}"#)
    );
}
