//! External tools, git-style: an executable `tb-tool-NAME` on `PATH` is the tool `NAME`.
//!
//! A call runs it with the argument object as one JSON line on stdin; what it prints on stdout is
//! the result (JSON if it parses as JSON, otherwise the text as a string). A non-zero exit is an
//! error whose message is its stderr. `tb-tool-NAME --describe` may print
//! `{"description": "...", "schema": {...}}` for listings and prompts; it must have no side effects.
//! Every run has a time limit; at the limit the tool's whole process group (on Windows, its
//! process tree) is killed. On Windows the file is `tb-tool-NAME.exe`.

use super::{Tool, ToolResult};
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::io::{Read, Write};
#[cfg(unix)]
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const PREFIX: &str = "tb-tool-";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// `--describe` should answer at once; listing all tools must not take long.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_STDOUT: usize = 1 << 20;
const MAX_STDERR: usize = 64 << 10;

pub struct External {
    name: String,
    path: PathBuf,
    timeout: Duration,
    /// (description, schema), asked for on first use.
    meta: OnceLock<(String, Value)>,
}

/// Every `tb-tool-NAME` executable in the directories of `path_var` (a `PATH` value); the first of
/// a name wins, as in a shell. Names must be `[A-Za-z0-9_-]+` (so `tb-tool-x.sh` is skipped).
pub fn discover(path_var: &OsStr, timeout: Duration) -> Vec<External> {
    let mut found: Vec<External> = Vec::new();
    for dir in std::env::split_paths(path_var).filter(|d| !d.as_os_str().is_empty()) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut candidates: Vec<(String, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let name = tool_name(&file)?;
                Some((name.to_string(), e.path()))
            })
            .filter(|(_, path)| is_executable(path))
            .collect();
        candidates.sort();
        for (name, path) in candidates {
            if !found.iter().any(|t| t.name == name) {
                found.push(External::new(name, path, timeout));
            }
        }
    }
    found
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The tool a file name is: `tb-tool-NAME` (on Windows `tb-tool-NAME.exe`) with a valid NAME.
fn tool_name(file: &str) -> Option<&str> {
    let name = file.strip_prefix(PREFIX)?;
    #[cfg(windows)]
    let name = name
        .len()
        .checked_sub(4)
        .filter(|&n| name.is_char_boundary(n) && name[n..].eq_ignore_ascii_case(".exe"))
        .map(|n| &name[..n])?;
    valid_name(name).then_some(name)
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Windows has no execute bit: the `.exe` name (checked by `tool_name`) says it runs.
#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Kills a tool and what it started: its process group on Unix, its process tree on Windows.
fn kill_tree(pid: u32) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a negative pid signals the process group we created; no memory is shared.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
    #[cfg(windows)]
    let _ = Command::new("taskkill")
        .args(["/F", "/T", "/PID", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl External {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>, timeout: Duration) -> Self {
        External {
            name: name.into(),
            path: path.into(),
            timeout,
            meta: OnceLock::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self) -> &(String, Value) {
        self.meta.get_or_init(|| {
            let fallback = || {
                (
                    format!(
                        "external tool {} (it gave no description with --describe)",
                        self.path.display()
                    ),
                    json!({"type": "object"}),
                )
            };
            let mut cmd = Command::new(&self.path);
            cmd.arg("--describe");
            let Ok(out) = run_limited(&mut cmd, b"", self.timeout.min(DESCRIBE_TIMEOUT)) else {
                return fallback();
            };
            let answer: Option<Value> = serde_json::from_slice(&out.stdout)
                .ok()
                .filter(|_| out.status.success());
            match answer
                .as_ref()
                .and_then(|a| Some((a.get("description")?.as_str()?, a)))
            {
                Some((desc, a)) => {
                    let schema = a.get("schema").filter(|s| s.is_object()).cloned();
                    (
                        desc.lines().next().unwrap_or("").to_string(),
                        schema.unwrap_or(json!({"type": "object"})),
                    )
                }
                None => fallback(),
            }
        })
    }

    fn who(&self) -> String {
        format!("external tool '{}' ({})", self.name, self.path.display())
    }
}

impl Tool for External {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.meta().0
    }

    fn schema(&self) -> Value {
        self.meta().1.clone()
    }

    fn call(&self, args: &Value) -> ToolResult {
        let input = format!("{args}\n");
        let out = run_limited(
            &mut Command::new(&self.path),
            input.as_bytes(),
            self.timeout,
        )
        .map_err(|e| match e {
            RunError::Spawn(e) => {
                format!(
                    "{} could not start: {e}; check that it is executable and its #! line",
                    self.who()
                )
            }
            RunError::Timeout => format!(
                "{} did not finish within {} s and was stopped; fix the tool or raise --timeout",
                self.who(),
                self.timeout.as_secs_f64()
            ),
        })?;
        if out.stdout.len() > MAX_STDOUT {
            return Err(format!(
                "{} wrote more than {MAX_STDOUT} bytes on stdout; results must be smaller",
                self.who()
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let said = [stderr.trim(), stdout.trim()]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or("no message");
            return Err(format!(
                "{} failed ({}): {}",
                self.who(),
                out.status,
                tail(said, 1000)
            ));
        }
        let text = stdout.trim();
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        })
    }
}

/// The last `max` bytes of `s`, on a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

pub struct Output {
    pub status: ExitStatus,
    /// At most `MAX_STDOUT + 1` bytes: more means it wrote too much.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug)]
pub enum RunError {
    Spawn(std::io::Error),
    Timeout,
}

/// Runs `cmd` in its own process group with `input` on stdin, collecting stdout and stderr, for at
/// most `limit`. At the limit the whole group (tree) is killed, so children it started die with it.
pub fn run_limited(cmd: &mut Command, input: &[u8], limit: Duration) -> Result<Output, RunError> {
    let deadline = Instant::now() + limit;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let pid = child.id();
    let kill_group = || kill_tree(pid);
    // Cannot fail (here and below): the child was spawned with all three streams piped, each
    // taken once.
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let input = input.to_vec();
    // A tool that does not read its stdin closes the pipe; that is not an error.
    thread::spawn(move || drop(stdin.write_all(&input)));
    let stdout = read_to_end(child.stdout.take().expect("stdout was piped"), MAX_STDOUT);
    let stderr = read_to_end(child.stderr.take().expect("stderr was piped"), MAX_STDERR);
    let (tx, exited) = mpsc::channel();
    thread::spawn(move || drop(tx.send(child.wait())));

    let left = || deadline.saturating_duration_since(Instant::now());
    let status = match exited.recv_timeout(left()) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(RunError::Spawn(e)),
        Err(_) => {
            kill_group();
            let _ = exited.recv(); // reap it
            return Err(RunError::Timeout);
        }
    };
    // Its pipes stay open while a background child of it lives; that counts against the limit too.
    match (stdout.recv_timeout(left()), stderr.recv_timeout(left())) {
        (Ok(stdout), Ok(stderr)) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        _ => {
            kill_group();
            Err(RunError::Timeout)
        }
    }
}

/// Reads `pipe` to its end on a thread, keeping at most `max + 1` bytes (the rest is drained so
/// the writer never blocks).
fn read_to_end(pipe: impl Read + Send + 'static, max: usize) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut pipe = pipe;
        let _ = (&mut pipe).take(max as u64 + 1).read_to_end(&mut kept);
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        let _ = tx.send(kept);
    });
    rx
}
