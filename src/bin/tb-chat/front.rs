//! tb-chat's front ends over a `chat::Session`: one-shot, pipe mode (one prompt per line, or
//! `--continue` turns), `--json` records, the model list and the REPL (its slash commands are
//! `chat::repl_command`).

use serde_json::json;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use tinybit::chat::{ChatEvent, ReplAction, Reply, Session, parse_line, repl_command};
use tinybit::{Error, Result};

/// How replies are written to stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The reply's text, streamed, then a newline.
    Text,
    /// Flat JSON Lines records: delta, tool_call, tool_result, message, stats, error.
    Json,
}

fn write_out(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|_| out.flush())
        .map_err(tinybit::output::stdout_err)
}

fn record(rec: serde_json::Value) -> Result<()> {
    write_out(&format!("{rec}\n"))
}

/// One turn (or a raw completion) with its output written as `out` says. `line` numbers pipe-mode
/// records.
pub fn answer(
    session: &mut Session,
    prompt: &str,
    raw: bool,
    out: Output,
    line: Option<usize>,
) -> Result<Reply> {
    let mut on = |ev: ChatEvent| -> Result<()> {
        match (out, ev) {
            (Output::Text, ChatEvent::Delta(s)) => write_out(&s),
            (Output::Text, _) => Ok(()),
            (Output::Json, ChatEvent::Delta(s)) => record(json!({"type": "delta", "text": s})),
            (Output::Json, ChatEvent::ToolCall { tool, args, raw }) => {
                record(json!({"type": "tool_call", "tool": tool, "args": args, "raw": raw}))
            }
            (Output::Json, ChatEvent::ToolResult(r)) => {
                let v: serde_json::Value =
                    serde_json::from_str(&r).unwrap_or(serde_json::Value::String(r));
                record(json!({"type": "tool_result", "result": v}))
            }
        }
    };
    let reply = if raw {
        session.complete_raw(prompt, &mut on)?
    } else {
        session.turn(prompt, &mut on)?
    };
    match out {
        Output::Text => write_out("\n")?,
        Output::Json => {
            let mut msg = json!({"type": "message", "role": "assistant", "content": reply.text,
                "stop": reply.stop.as_str(), "tool_calls": reply.tool_calls});
            let s = &reply.stats;
            let mut stats = json!({"type": "stats", "prompt_tokens": s.prompt_tokens,
                "generated_tokens": s.generated_tokens, "prefill_tok_per_s": s.prefill_tok_per_s(),
                "decode_tok_per_s": s.decode_tok_per_s(),
                "ttft_ms": s.time_to_first_token.map(|d| d.as_secs_f64() * 1e3)});
            if let Some(n) = line {
                msg["line"] = json!(n);
                stats["line"] = json!(n);
            }
            record(msg)?;
            record(stats)?;
        }
    }
    Ok(reply)
}

/// Pipe mode: each non-empty line is answered in order — independently (fresh state), or as turns
/// of one conversation with `continue_`. A bad line gets an error (record) and the rest still
/// runs. Returns the lines that failed, with why (`failed_lines` makes the final error of them).
pub fn pipe(
    session: &mut Session,
    input: impl BufRead,
    raw: bool,
    continue_: bool,
    out: Output,
) -> Result<Vec<(usize, String)>> {
    let mut failed = Vec::new();
    let default_system = session.system().to_string();
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| Error::Io(format!("reading stdin: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = match parse_line(&line) {
            Ok(p) => p,
            Err(why) => {
                report_line_error(out, n, &why)?;
                failed.push((n, why));
                continue;
            }
        };
        if !continue_ {
            match &parsed.system {
                Some(s) => session.set_system(s),
                None if session.system() != default_system => session.set_system(&default_system),
                None => session.reset(),
            }
        } else if let Some(s) = &parsed.system
            && session.messages().is_empty()
        {
            session.set_system(s);
        }
        if let Err(e) = answer(session, &parsed.prompt, raw, out, Some(n)) {
            // A closed stdout ends the run; other failures are this line's.
            if matches!(e, Error::ClosedPipe) {
                return Err(e);
            }
            let why = e.to_string();
            report_line_error(out, n, &why)?;
            failed.push((n, why));
        }
    }
    Ok(failed)
}

/// The error that ends a pipe run in which some lines failed (exit 65), or `None` when none did.
/// It names the failed lines and the first one's reason; with `--json` each failure is also an
/// error record on stdout, without it a line on stderr.
pub fn failed_lines(failed: &[(usize, String)], out: Output) -> Option<Error> {
    let ((first, why), rest) = failed.split_first()?;
    const SHOWN: usize = 10;
    let which = if rest.is_empty() {
        format!("stdin line {first} failed: {why}")
    } else {
        let mut nums: Vec<String> = failed
            .iter()
            .take(SHOWN)
            .map(|(n, _)| n.to_string())
            .collect();
        if failed.len() > SHOWN {
            nums.push("…".into());
        }
        format!(
            "{} stdin lines failed (lines {}); the first, line {first}: {why}",
            failed.len(),
            nums.join(", ")
        )
    };
    let more = match out {
        Output::Json => " (each has an error record on stdout)",
        Output::Text if rest.is_empty() => "",
        Output::Text => " (each is reported above)",
    };
    Some(Error::Data(format!("{which}{more}")))
}

fn report_line_error(out: Output, n: usize, why: &str) -> Result<()> {
    match out {
        Output::Json => record(json!({"type": "error", "line": n, "message": why})),
        Output::Text => {
            eprintln!("tb-chat: stdin line {n}: {why}");
            Ok(())
        }
    }
}

/// `--list-models`: each model `-m NAME` finds, a line `NAME  SIZE  PATH` (a `model` record with
/// `--json`).
pub fn list_models(out: Output) -> Result<()> {
    for m in tinybit::models::list()? {
        let line = match out {
            Output::Json => {
                json!({"type": "model", "name": m.name, "path": m.path, "bytes": m.bytes})
                    .to_string()
            }
            Output::Text => format!(
                "{:<20} {:>7.1} MB  {}",
                m.name,
                m.bytes as f64 / 1e6,
                m.path.display()
            ),
        };
        write_out(&format!("{line}\n"))?;
    }
    Ok(())
}

/// The REPL's history file: `$XDG_STATE_HOME/tinybit/history` (created user-only).
pub fn history_path() -> Option<PathBuf> {
    let dir = tinybit::dirs::tinybit_dir(tinybit::dirs::Base::State)?;
    std::fs::create_dir_all(&dir).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    Some(dir.join("history"))
}

/// The interactive loop on a terminal (rustyline: line editing and history).
pub fn repl(session: &mut Session, raw: bool) -> Result<()> {
    use rustyline::error::ReadlineError;
    let mut rl = rustyline::DefaultEditor::new()
        .map_err(|e| Error::Io(format!("starting the line editor: {e}")))?;
    let hist = history_path();
    if let Some(h) = &hist {
        let _ = rl.load_history(h);
    }
    eprintln!("tinybit chat — /help for commands, Ctrl-D to leave.");
    loop {
        match rl.readline("> ") {
            Ok(line) => {
                if line.trim().is_empty() {
                    continue;
                }
                let _ = rl.add_history_entry(line.as_str());
                match repl_command(session, &line) {
                    Ok(ReplAction::Say(text)) => {
                        if let Err(e) = answer(session, &text, raw, Output::Text, None) {
                            eprintln!("tb-chat: {e}");
                        }
                    }
                    Ok(ReplAction::Done(msg)) => {
                        if !msg.is_empty() {
                            eprintln!("{msg}");
                        }
                    }
                    Ok(ReplAction::Quit) => break,
                    Err(e) => eprintln!("tb-chat: {e}"),
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(Error::Io(format!("reading the terminal: {e}"))),
        }
    }
    if let Some(h) = &hist {
        let _ = rl.save_history(h);
    }
    Ok(())
}
