//! The man pages in `man/`: every binary in `src/bin` has `man/man1/NAME.1`, which names every flag
//! its `--help` (and each subcommand's `--help`) lists; every page has the required sections and
//! formats without roff warnings; and what `tinybit.7`, `tinybit-models.7`, `tb-chat.1` and
//! `tb-eval.1` state about the code (exit statuses, record fields, metadata keys, parameter counts)
//! matches the code.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sections every page has, in this order.
const SECTIONS: [&str; 8] = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "EXAMPLES",
    "EXIT STATUS",
    "FILES",
    "SEE ALSO",
];

/// Every binary in src/bin, by name (`tb-tok`, ...), found at test time: `NAME.rs`, or
/// `NAME/main.rs` for one with modules of its own.
fn binaries() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join("src/bin"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let is_bin = p.extension().is_some_and(|x| x == "rs") || p.join("main.rs").is_file();
            is_bin.then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    out.sort();
    out
}

/// A built binary: cargo builds every binary next to the ones this test names.
fn exe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tb-tok"))
        .with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// Every man page in man/, as (path, section directory number).
fn pages() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root().join("man")).unwrap() {
        let dir = dir.unwrap().path();
        if dir.is_dir() {
            for f in std::fs::read_dir(&dir).unwrap() {
                out.push(f.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

/// The page's text with roff's escapes for hyphens, fonts and backslashes undone, so flags and
/// JSON read as they print.
fn plain(roff: &str) -> String {
    let mut out = String::with_capacity(roff.len());
    let mut chars = roff.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('-') => out.push('-'),
            Some('e') => out.push('\\'),
            Some('&') | Some('%') => {}
            Some('f') => {
                // \fB, \fR, \fI, \fP, or \f(XX
                if chars.next() == Some('(') {
                    chars.next();
                    chars.next();
                }
            }
            Some('(') => {
                let name: String = [chars.next(), chars.next()].into_iter().flatten().collect();
                out.push_str(match name.as_str() {
                    "aq" => "'",
                    "dq" => "\"",
                    "hy" | "mi" => "-",
                    _ => "?",
                });
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn read_page(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Whether `flag` occurs in `text` as a whole word (`--out` is not found in `--output`).
fn has_word(text: &str, flag: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(flag).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + flag.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// The flags and subcommands one `--help` text lists (argh's layout: entries indented by two
/// spaces under "Options:" and "Commands:", continuation lines indented further).
fn parse_help(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut flags, mut commands) = (Vec::new(), Vec::new());
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        let Some(entry) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) else {
            continue;
        };
        let head = entry.split("  ").next().unwrap();
        match section {
            "Options" => flags.extend(
                head.split(", ")
                    .filter(|f| f.starts_with('-'))
                    .map(str::to_string),
            ),
            "Commands" => commands.push(head.trim().to_string()),
            _ => {}
        }
    }
    (flags, commands)
}

/// `(command path, flag)` for every flag of a binary and its subcommands, recursively.
fn all_flags(bin: &Path, path: &[String], out: &mut Vec<(String, String)>) {
    let o = Command::new(bin)
        .args(path)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running {} --help: {e}", bin.display()));
    assert!(
        o.status.success(),
        "{} {path:?} --help failed",
        bin.display()
    );
    let text = String::from_utf8(o.stdout).unwrap();
    let (flags, commands) = parse_help(&text);
    assert!(!flags.is_empty(), "no options parsed from:\n{text}");
    out.extend(flags.into_iter().map(|f| (path.join(" "), f)));
    for c in commands {
        let mut sub = path.to_vec();
        sub.push(c);
        all_flags(bin, &sub, out);
    }
}

#[test]
fn help_parser_reads_argh_layout() {
    let text = "Usage: x [-o <o>]\n\nDoes x.\n\nOptions:\n  -o, --output      where\n                    --not-a-flag here\n  --val-fraction    f\n  --help, help      help\n\nCommands:\n  encode            Encode\n                    more\n  count             Count\n";
    let (flags, commands) = parse_help(text);
    assert_eq!(flags, ["-o", "--output", "--val-fraction", "--help"]);
    assert_eq!(commands, ["encode", "count"]);
    assert!(has_word("use --out DIR", "--out") && !has_word("use --output", "--out"));
    assert!(has_word("(-q)", "-q") && !has_word("-qx", "-q"));
    assert_eq!(plain(r"\fB\-\-json\fR \(aqx\(aq \e"), "--json 'x' \\");
}

#[test]
fn every_binary_has_a_page_naming_all_its_flags() {
    let bins = binaries();
    assert!(bins.contains(&"tb-tok".to_string()), "{bins:?}");
    let mut missing = Vec::new();
    for b in &bins {
        let page = root().join("man/man1").join(format!("{b}.1"));
        assert!(page.exists(), "{b} has no man page {}", page.display());
        let text = plain(&read_page(&page));
        let mut flags = Vec::new();
        all_flags(&exe(b), &[], &mut flags);
        for (cmd, flag) in flags {
            if !has_word(&text, &flag) {
                missing.push(format!("{b} {cmd} {flag}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags not in their man page: {missing:?}"
    );
}

/// `--completions bash|zsh|fish` prints each binary's completion script from its argh definitions:
/// sourced by bash, it completes a flag of the command (and of a subcommand); every page documents
/// it; an unknown shell is a usage error.
#[cfg(unix)] // sources the bash script in bash
#[test]
fn every_binary_prints_shell_completions() {
    for b in binaries() {
        let run = |shell: &str| {
            Command::new(exe(&b))
                .args(["--completions", shell])
                .output()
                .unwrap()
        };
        let bash = run("bash");
        assert!(bash.status.success(), "{b}");
        let script = String::from_utf8(bash.stdout).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.bash");
        std::fs::write(&file, &script).unwrap();
        // `--ver` completes to `--version`, which every command has.
        let probe = format!(
            "source {}; COMP_WORDS=({b} --ver); COMP_CWORD=1; _{b}; echo \"${{COMPREPLY[@]}}\"",
            file.display()
        );
        let o = Command::new("bash").args(["-c", &probe]).output().unwrap();
        let got = String::from_utf8_lossy(&o.stdout);
        assert!(
            got.split_whitespace().any(|w| w == "--version"),
            "{b}: bash completed --ver to {got:?} ({})",
            String::from_utf8_lossy(&o.stderr)
        );
        let zsh = String::from_utf8(run("zsh").stdout).unwrap();
        assert!(zsh.starts_with(&format!("#compdef {b}")), "{b}: {zsh}");
        let fish = String::from_utf8(run("fish").stdout).unwrap();
        assert!(fish.contains(&format!("complete -c {b}")), "{b}: {fish}");
        assert_eq!(run("tcsh").status.code(), Some(2), "{b}");
        let page = plain(&read_page(&root().join("man/man1").join(format!("{b}.1"))));
        assert!(
            has_word(&page, "--completions"),
            "{b}.1 does not document --completions"
        );
    }
    // A subcommand's flags: tb-tok encode --val… offers --val-output and --val-fraction.
    let script = Command::new(exe("tb-tok"))
        .args(["--completions", "bash"])
        .output()
        .unwrap()
        .stdout;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.bash");
    std::fs::write(&file, script).unwrap();
    let probe = format!(
        "source {}; COMP_WORDS=(tb-tok encode --val); COMP_CWORD=2; _tb-tok; echo \"${{COMPREPLY[@]}}\"",
        file.display()
    );
    let o = Command::new("bash").args(["-c", &probe]).output().unwrap();
    let mut got: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    got.sort();
    assert_eq!(got, ["--val-fraction", "--val-output"]);
}

/// The `.SH` titles of a page, in order.
fn sections(roff: &str) -> Vec<String> {
    roff.lines()
        .filter_map(|l| l.strip_prefix(".SH "))
        .map(|t| t.trim().trim_matches('"').to_string())
        .collect()
}

#[test]
fn every_page_has_the_required_sections() {
    let all = pages();
    for want in [
        "man1/tb-tok.1",
        "man1/tb-train.1",
        "man7/tinybit.7",
        "man7/tinybit-training.7",
        "man7/tinybit-models.7",
    ] {
        assert!(
            all.contains(&root().join("man").join(want)),
            "{want} missing"
        );
    }
    for p in &all {
        let roff = read_page(p);
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        let section = p.extension().unwrap().to_string_lossy().to_string();
        assert_eq!(
            p.parent().unwrap().file_name().unwrap().to_string_lossy(),
            format!("man{section}"),
            "{} is in the wrong directory",
            p.display()
        );
        let th = roff.lines().find(|l| l.starts_with(".TH ")).unwrap_or("");
        let want_th = format!(".TH {} {section} ", name.to_uppercase().replace('-', "\\-"));
        assert!(th.starts_with(&want_th), "{}: {th:?}", p.display());
        let titles = sections(&roff);
        let order: Vec<&str> = titles
            .iter()
            .map(String::as_str)
            .filter(|t| SECTIONS.contains(t))
            .collect();
        assert_eq!(order, SECTIONS, "{}: sections {titles:?}", p.display());
        // The NAME line is "name \- summary".
        let after_name = roff.split(".SH NAME\n").nth(1).unwrap();
        assert!(
            plain(after_name.lines().next().unwrap()).starts_with(&format!("{name} - ")),
            "{}: NAME line",
            p.display()
        );
        // References to tinybit's own section-7 pages point at pages that exist.
        for (i, _) in roff.match_indices(".BR tinybit") {
            let mut words = roff[i + 4..].split_whitespace();
            let page = plain(words.next().unwrap());
            if !words.next().is_some_and(|w| w.starts_with("(7)")) {
                continue;
            }
            assert!(
                root().join(format!("man/man7/{page}.7")).exists(),
                "{} refers to {page}(7), which does not exist",
                p.display()
            );
        }
    }
}

#[test]
fn pages_format_without_warnings() {
    for p in pages() {
        let o = match Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&p)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .env("LC_ALL", "C.UTF-8")
            .output()
        {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("note: man is not installed; roff warnings not checked");
                return;
            }
            Err(e) => panic!("running man: {e}"),
        };
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && err.is_empty(),
            "{}:\n{err}",
            p.display()
        );
        assert!(
            o.stdout.len() > 500,
            "{}: formatted to almost nothing",
            p.display()
        );
    }
}

/// The text of one `.SH` section.
fn section_text(roff: &str, title: &str) -> String {
    let start = roff
        .find(&format!(".SH {title}\n"))
        .or_else(|| roff.find(&format!(".SH \"{title}\"\n")))
        .unwrap_or_else(|| panic!("no section {title}"));
    let rest = &roff[start + 4..];
    let end = rest.find("\n.SH ").map_or(rest.len(), |e| e + 1);
    rest[..end].to_string()
}

#[test]
fn tinybit_7_lists_every_exit_status() {
    use tinybit::error::Error;
    let text = plain(&section_text(
        &read_page(&root().join("man/man7/tinybit.7")),
        "EXIT STATUS",
    ));
    let errors = [
        Error::Usage(String::new()),
        Error::Data(String::new()),
        Error::NoInput(String::new()),
        Error::Unavailable(String::new()),
        Error::Io(String::new()),
        Error::TempFail(String::new()),
        Error::Interrupted(String::new()),
    ];
    let mut codes: Vec<u8> = errors.iter().map(Error::exit_code).collect();
    codes.extend([0, 1]);
    for c in codes {
        let row = text.lines().any(|l| l.starts_with(&format!("{c}\t")));
        assert!(row, "exit status {c} is not a row of tinybit(7)'s table");
    }
}

/// The JSON records one source file emits: for each `json!({"type": "T", ...})`, T and its keys
/// (those of nested objects too).
fn emitted_records(source: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (i, _) in source.match_indices("json!({") {
        let body = &source[i + 6..];
        if !body[1..].trim_start().starts_with("\"type\": \"") {
            continue;
        }
        let body = &body[..body.find("})").unwrap()];
        let keys: Vec<String> = body
            .split('"')
            .collect::<Vec<_>>()
            .windows(2)
            .enumerate()
            // Odd pieces are inside quotes; a key is a quoted string followed by ':'.
            .filter(|(k, w)| k % 2 == 1 && w[1].trim_start().starts_with(':'))
            .map(|(_, w)| w[0].to_string())
            .collect();
        let ty = body.split('"').nth(3).unwrap().to_string();
        out.push((ty, keys));
    }
    out
}

#[test]
fn tinybit_7_documents_every_tb_train_record_field() {
    let records = records_of(
        &["src/lib/train/mod.rs"],
        &["start", "step", "eval", "sample", "checkpoint", "done"],
    );
    assert_records_shown("man7/tinybit.7", &records);
}

/// Every record in `records` appears in the page as an example line (a line starting with `{`)
/// of its type, and every field of the record in one of them.
fn assert_records_shown(page: &str, records: &[(String, Vec<String>)]) {
    let text = plain(&read_page(&root().join("man").join(page)));
    for (ty, keys) in records {
        let examples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with('{') && l.contains(&format!("\"type\":\"{ty}\"")))
            .collect();
        assert!(!examples.is_empty(), "{page} shows no {ty} record");
        for k in keys {
            assert!(
                examples.iter().any(|l| l.contains(&format!("\"{k}\":"))),
                "{page}: the {ty} record's field {k} is not shown"
            );
        }
    }
}

/// The records the given source files emit; `want` must all be among them.
fn records_of(files: &[&str], want: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut records = Vec::new();
    for f in files {
        let source = std::fs::read_to_string(root().join(f)).unwrap();
        records.extend(emitted_records(&source));
    }
    let types: Vec<&str> = records.iter().map(|(t, _)| t.as_str()).collect();
    for t in want {
        assert!(
            types.contains(t),
            "no {t} record found in {files:?}: {types:?}"
        );
    }
    records
}

#[test]
fn tb_chat_1_documents_every_record_field() {
    let mut records = records_of(
        &["src/bin/tb-chat/front.rs"],
        &[
            "delta",
            "tool_call",
            "tool_result",
            "message",
            "stats",
            "error",
        ],
    );
    // Pipe mode adds the input line number to these two.
    for (ty, keys) in &mut records {
        if ty == "message" || ty == "stats" {
            keys.push("line".into());
        }
    }
    assert_records_shown("man1/tb-chat.1", &records);
}

#[test]
fn tb_eval_1_documents_every_record_field() {
    let records = records_of(
        &[
            "src/lib/eval/mod.rs",
            "src/lib/eval/ppl.rs",
            "src/lib/eval/generating.rs",
        ],
        &["metric", "sample", "result"],
    );
    assert_records_shown("man1/tb-eval.1", &records);
}

#[test]
fn tinybit_7_names_every_metadata_key_and_the_token_header() {
    let page = read_page(&root().join("man/man7/tinybit.7"));
    let text = plain(&page);
    for file in [
        "src/lib/checkpoint.rs",
        "src/lib/model/state.rs",
        "src/lib/train/mod.rs",
    ] {
        let source = std::fs::read_to_string(root().join(file)).unwrap();
        for (i, _) in source.match_indices("\"tinybit.") {
            let key = source[i + 1..].split('"').next().unwrap();
            assert!(
                has_word(&text, key),
                "tinybit(7) does not name {key} ({file})"
            );
        }
    }
    assert!(text.contains(std::str::from_utf8(tinybit::tokfile::MAGIC).unwrap()));
    assert!(has_word(
        &text,
        &format!("{}", tinybit::tokfile::HEADER_LEN)
    ));
}

/// `12345678` → `12,345,678`.
fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn tinybit_models_7_tables_match_the_presets() {
    let page = read_page(&root().join("man/man7/tinybit-models.7"));
    // tbl rows: cells separated by tabs, the first cell the size (tiny, micro, bit, qbit).
    let row = |size: &str, cells: usize| -> Vec<String> {
        page.lines()
            .map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>())
            .find(|c| c.len() == cells && c[0] == size)
            .unwrap_or_else(|| panic!("tinybit-models(7) has no {cells}-cell row for {size}"))
    };
    let mut presets = 0;
    for e in std::fs::read_dir(root().join("configs")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if name.starts_with("train-") {
            continue;
        }
        let cfg = tinybit::config::ModelConfig::load(&p).unwrap();
        // A -coding preset shares its size's architecture, so its numbers are that size's row.
        let size = name.trim_end_matches("-coding");
        let l = cfg.lora();
        let want = [
            size.to_string(),
            cfg.n_layer.to_string(),
            cfg.d_model.to_string(),
            cfg.d_ffn.to_string(),
            cfg.vocab_size.to_string(),
            format!("{}/{}/{}/{}", l.w, l.a, l.v, l.g),
            if cfg.ternary_ffn { "yes" } else { "no" }.to_string(),
            grouped(cfg.param_count()),
        ];
        assert_eq!(row(size, 8), want, "{name}: the sizes table");
        let families = row(size, 3);
        let column = match cfg.family.name.as_str() {
            "general" => 1,
            "coding" => 2,
            other => panic!("{name}: family {other}"),
        };
        assert_eq!(families[column], name, "{name}: the families table");
        presets += 1;
    }
    assert_eq!(
        presets, 8,
        "tiny, micro, bit, qbit, three -coding presets and the assistant"
    );
}
