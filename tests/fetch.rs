//! tb-fetch against a real HTTP/1.1 server on 127.0.0.1, started by each test in a thread.
//!
//! The server answers one request per connection and closes it. Its behaviour is switched by the
//! test (honour Range or not, cut the first answer short, stall, fail with 503, require a token, act
//! as a CONNECT proxy), and it logs every request so the tests can see what tb-fetch asked for.
//! Nothing here touches the internet.

use crate::common::stderr;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the test server behaves; changed between runs through `Server::set`.
#[derive(Clone, Default)]
struct Behaviour {
    /// Path → (body, ETag).
    files: HashMap<String, (Vec<u8>, String)>,
    /// Answer every request with 200 and the whole body, as servers without Range support do.
    ignore_range: bool,
    /// Cut the next answer short after this many body bytes (then behave normally again).
    drop_next_after: Option<usize>,
    /// After cutting that answer short, go down (as if the server crashed).
    down_after_drop: bool,
    /// Accept, read the request, never answer.
    stall: bool,
    /// Answer 503 to everything (a server that is down).
    down: bool,
    /// Answer 401 unless `Authorization: Bearer TOKEN`.
    token: Option<String>,
}

#[derive(Clone, Debug)]
struct Logged {
    path: String,
    range: Option<String>,
    auth: Option<String>,
    /// The `CONNECT` target when the request came through the proxy tunnel.
    connect: Option<String>,
    status: u16,
    body_bytes: usize,
}

struct Server {
    port: u16,
    behaviour: Arc<Mutex<Behaviour>>,
    log: Arc<Mutex<Vec<Logged>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Hard limits that keep a broken test from hanging: connections served, server lifetime, and
/// how long one connection may be held.
const MAX_CONNECTIONS: usize = 500;
const SERVER_LIFETIME: Duration = Duration::from_secs(120);
const CONNECTION_LIMIT: Duration = Duration::from_secs(15);

impl Server {
    fn start(behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, l, s) = (behaviour.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let born = Instant::now();
            for _ in 0..MAX_CONNECTIONS {
                let stream = loop {
                    if s.load(Ordering::SeqCst) || born.elapsed() > SERVER_LIFETIME {
                        return;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => return,
                    }
                };
                // One thread per connection, so a stalled one does not delay accepting the next.
                let (b, l, s) = (b.clone(), l.clone(), s.clone());
                std::thread::spawn(move || serve(stream, &b, &l, &s));
            }
        });
        Server {
            port,
            behaviour,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.behaviour.lock().unwrap());
    }

    fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Stops the server and closes its port, so a later connection is refused.
    fn shut_down(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a request head: the request line and the headers (names lowercased).
fn read_head(reader: &mut BufReader<TcpStream>) -> Option<(String, HashMap<String, String>)> {
    let mut line = String::new();
    reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
    let mut headers = HashMap::new();
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some((line.trim().to_string(), headers))
}

fn serve(
    stream: TcpStream,
    behaviour: &Mutex<Behaviour>,
    log: &Mutex<Vec<Logged>>,
    stop: &AtomicBool,
) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let Some((mut line, mut headers)) = read_head(&mut reader) else {
        return;
    };

    // A CONNECT proxy: agree, then read the tunnelled request from the same connection.
    let mut connect = None;
    if let Some(target) = line.strip_prefix("CONNECT ") {
        connect = Some(target.split_whitespace().next().unwrap_or("").to_string());
        if out
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .is_err()
        {
            return;
        }
        let Some(next) = read_head(&mut reader) else {
            return;
        };
        (line, headers) = next;
    }

    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut entry = Logged {
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
        connect,
        status: 0,
        body_bytes: 0,
    };
    let b = {
        let mut guard = behaviour.lock().unwrap();
        let snapshot = guard.clone();
        if guard.drop_next_after.take().is_some() && guard.down_after_drop {
            guard.down = true;
        }
        snapshot
    };

    if b.stall {
        log.lock().unwrap().push(entry);
        // Hold the connection until the client gives up (it closes: read gives 0) or limits pass.
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)));
        let held = Instant::now();
        let mut buf = [0u8; 256];
        while held.elapsed() < CONNECTION_LIMIT && !stop.load(Ordering::SeqCst) {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        return;
    }

    let (status, extra, body): (u16, Vec<String>, &[u8]) = if b.down {
        (503, vec![], b"down for maintenance")
    } else if b
        .token
        .as_ref()
        .is_some_and(|t| entry.auth != Some(format!("Bearer {t}")))
    {
        (401, vec![], b"token required")
    } else if let Some((data, etag)) = b.files.get(&path) {
        let etag_header = format!("ETag: {etag}");
        let if_range_ok = headers.get("if-range").is_none_or(|t| t == etag);
        match entry
            .range
            .as_deref()
            .and_then(parse_range)
            .filter(|_| !b.ignore_range && if_range_ok)
        {
            Some((first, _)) if first >= data.len() => (
                416,
                vec![format!("Content-Range: bytes */{}", data.len())],
                &[][..],
            ),
            Some((first, last)) => {
                let last = last.unwrap_or(usize::MAX).min(data.len() - 1);
                let cr = format!("Content-Range: bytes {first}-{last}/{}", data.len());
                (206, vec![cr, etag_header], &data[first..=last])
            }
            None => (200, vec![etag_header], &data[..]),
        }
    } else {
        (404, vec![], b"no such file")
    };

    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    for h in &extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    let sent = b.drop_next_after.unwrap_or(body.len()).min(body.len());
    // Logged before answering: once the client has its answer it may exit and the test look.
    entry.status = status;
    entry.body_bytes = sent;
    log.lock().unwrap().push(entry);
    let _ = out
        .write_all(head.as_bytes())
        .and_then(|_| out.write_all(&body[..sent]));
    let _ = out.flush();
    // Dropping both halves closes the connection, cutting the body short when `sent` < len.
}

fn parse_range(v: &str) -> Option<(usize, Option<usize>)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    Some((
        a.parse().ok()?,
        if b.is_empty() {
            None
        } else {
            Some(b.parse().ok()?)
        },
    ))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Service Unavailable",
    }
}

/// Deterministic test content of `n` bytes (not all one value, so misplaced bytes show).
fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 32) as u8
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

fn serving(files: &[(&str, &[u8])]) -> Behaviour {
    Behaviour {
        files: files
            .iter()
            .map(|(p, d)| {
                (
                    p.to_string(),
                    (d.to_vec(), format!("\"{}\"", &sha256_hex(d)[..16])),
                )
            })
            .collect(),
        ..Behaviour::default()
    }
}

const PROXY_VARS: [&str; 6] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

/// Runs tb-fetch with a clean environment for what it reads, plus `env`.
fn tb_fetch(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tb-fetch"));
    cmd.args(args);
    for var in PROXY_VARS
        .iter()
        .chain(&["HF_TOKEN", "HF_ENDPOINT", "XDG_CACHE_HOME"])
    {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("tb-fetch runs")
}

fn stdout_path(out: &Output) -> PathBuf {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        text.lines().count(),
        1,
        "stdout is exactly the path: {text:?}"
    );
    PathBuf::from(text.trim_end())
}

fn assert_status(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", stderr(out));
}

/// Files left in the cache's partial/ directory.
fn partials(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("partial"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn tokenizer_bytes() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/20B_tokenizer.json"
    ))
    .unwrap()
}

#[test]
fn fetch_by_repository_name_through_hf_endpoint_in_ranges() {
    let data = tokenizer_bytes();
    let server = Server::start(serving(&[(
        "/acme/tiny-tok/resolve/v1.0/tokenizer.json",
        &data,
    )]));
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    let out = tb_fetch(
        &[
            "--repo",
            "acme/tiny-tok",
            "--revision",
            "v1.0",
            "--cache-dir",
            cache_arg,
            "--range-size",
            "256K",
        ],
        &[("HF_ENDPOINT", &server.endpoint())],
    );
    assert_status(&out, 0);
    let path = stdout_path(&out);
    assert!(path.starts_with(cache.path()), "{path:?} is in the cache");
    assert_eq!(path.file_name().unwrap(), "tokenizer.json");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(partials(cache.path()).is_empty(), "no part file left");

    let log = server.log();
    let ranges = data.len().div_ceil(256 << 10);
    assert_eq!(log.len(), ranges, "one request per 256 KiB range: {log:?}");
    for (i, req) in log.iter().enumerate() {
        assert_eq!(req.path, "/acme/tiny-tok/resolve/v1.0/tokenizer.json");
        assert_eq!(req.status, 206);
        let first = i * (256 << 10);
        assert_eq!(
            req.range.as_deref(),
            Some(format!("bytes={first}-{}", first + (256 << 10) - 1).as_str())
        );
        assert_eq!(req.auth, None, "no HF_TOKEN, no Authorization header");
    }
}

#[test]
fn default_repository_is_the_gpt_neox_tokenizer() {
    let data = content(5000, 1);
    let server = Server::start(serving(&[(
        "/EleutherAI/gpt-neox-20b/resolve/main/tokenizer.json",
        &data,
    )]));
    let cache = tempfile::tempdir().unwrap();
    let out = tb_fetch(
        &["-q", "--cache-dir", cache.path().to_str().unwrap()],
        &[("HF_ENDPOINT", &server.endpoint())],
    );
    assert_status(&out, 0);
    assert_eq!(std::fs::read(stdout_path(&out)).unwrap(), data);
    assert!(
        out.stderr.is_empty(),
        "-q: nothing on stderr, got {}",
        stderr(&out)
    );
}

#[test]
fn plain_url_then_cached_second_call_with_the_server_gone() {
    let data = content(300_000, 2);
    let server = Server::start(serving(&[("/files/weights.bin", &data)]));
    let url = server.url("/files/weights.bin");
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let first = tb_fetch(&[&url, "--cache-dir", dir, "--range-size", "64K"], &[]);
    assert_status(&first, 0);
    let path = stdout_path(&first);
    assert_eq!(path.file_name().unwrap(), "weights.bin");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(server.log().len(), 5, "300000 bytes in 64 KiB ranges");
    // The cache is keyed by content: the file lives under its own sha256.
    let hex = sha256_hex(&data);
    assert!(
        path.parent()
            .unwrap()
            .ends_with(Path::new("sha256").join(&hex)),
        "{path:?}"
    );

    server.shut_down();
    let again = tb_fetch(&[&url, "--cache-dir", dir], &[]);
    assert_status(&again, 0);
    assert_eq!(stdout_path(&again), path);

    // With the right --sha256 the file is found by content, even under another URL.
    let other = "http://127.0.0.1:9/elsewhere/copy.bin";
    let by_hash = tb_fetch(
        &[other, "--cache-dir", dir, "--sha256", &hex.to_uppercase()],
        &[],
    );
    assert_status(&by_hash, 0);
    assert_eq!(stdout_path(&by_hash), path);
    // ... and that URL is now known without the hash too.
    let remembered = tb_fetch(&[other, "--cache-dir", dir, "--offline"], &[]);
    assert_status(&remembered, 0);
    assert_eq!(stdout_path(&remembered), path);
}

#[test]
fn resume_after_the_server_drops_the_connection_mid_file() {
    let data = content(200_000, 3);
    let server = Server::start(serving(&[("/big.bin", &data)]));
    let url = server.url("/big.bin");
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();

    // First run: the answer breaks off after 70000 bytes, then the server is down.
    server.set(|b| {
        b.drop_next_after = Some(70_000);
        b.down_after_drop = true;
    });
    let out = tb_fetch(&[&url, "--cache-dir", dir, "--timeout", "5"], &[]);
    assert_status(&out, 69);
    let err = stderr(&out);
    assert!(err.contains(&url) && err.contains("503"), "{err}");
    assert!(
        err.contains("70000 bytes already downloaded are kept"),
        "{err}"
    );
    let parts = partials(cache.path());
    let part = parts
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "part"))
        .expect("a part file");
    assert_eq!(
        std::fs::read(part).unwrap(),
        data[..70_000],
        "the part holds the bytes received"
    );

    // Second run: the server is back and the download continues where it stopped.
    server.set(|b| b.down = false);
    server.clear_log();
    let out = tb_fetch(&[&url, "--cache-dir", dir, "--timeout", "5"], &[]);
    assert_status(&out, 0);
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    assert_eq!(std::fs::read(stdout_path(&out)).unwrap(), data);
    let log = server.log();
    assert_eq!(
        log[0].range.as_deref().unwrap_or("").split('-').next(),
        Some("bytes=70000"),
        "{log:?}"
    );
    let fetched: usize = log.iter().map(|r| r.body_bytes).sum();
    assert_eq!(
        fetched,
        data.len() - 70_000,
        "only the missing bytes were fetched"
    );
    assert!(partials(cache.path()).is_empty());
}

#[test]
fn a_drop_within_one_run_is_resumed_by_the_next_range_request() {
    let data = content(100_000, 4);
    let server = Server::start(serving(&[("/f.bin", &data)]));
    server.set(|b| b.drop_next_after = Some(12_345));
    let cache = tempfile::tempdir().unwrap();
    let out = tb_fetch(
        &[
            &server.url("/f.bin"),
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_status(&out, 0);
    assert_eq!(std::fs::read(stdout_path(&out)).unwrap(), data);
    let log = server.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        log[1].range.as_deref().unwrap_or("").split('-').next(),
        Some("bytes=12345")
    );
}

#[test]
fn a_server_that_ignores_range_makes_the_download_start_over_cleanly() {
    let data = content(150_000, 5);
    let server = Server::start(serving(&[("/norange.bin", &data)]));
    // The first answer breaks off; the retry asks for the rest, but gets 200 and the whole file.
    server.set(|b| {
        b.ignore_range = true;
        b.drop_next_after = Some(40_000);
    });
    let cache = tempfile::tempdir().unwrap();
    let out = tb_fetch(
        &[
            &server.url("/norange.bin"),
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_status(&out, 0);
    let got = std::fs::read(stdout_path(&out)).unwrap();
    assert_eq!(got.len(), data.len(), "not appended to the partial bytes");
    assert!(got == data);
    let log = server.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log.iter().all(|r| r.status == 200));
    assert_eq!(
        log[1].range.as_deref().unwrap_or("").split('-').next(),
        Some("bytes=40000")
    );
    assert!(stderr(&out).contains("starting over"), "{}", stderr(&out));
}

#[test]
fn a_file_changed_on_the_server_between_runs_is_downloaded_afresh() {
    let old = content(90_000, 6);
    let new = content(90_000, 7);
    let server = Server::start(serving(&[("/moving.bin", &old)]));
    server.set(|b| {
        b.drop_next_after = Some(30_000);
        b.down_after_drop = true;
    });
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let url = server.url("/moving.bin");
    assert_status(&tb_fetch(&[&url, "--cache-dir", dir], &[]), 69);

    // The file is replaced (new ETag): If-Range makes the server send the whole new file.
    let replaced = serving(&[("/moving.bin", &new)]);
    server.set(|b| *b = replaced);
    server.clear_log();
    let out = tb_fetch(
        &[&url, "--cache-dir", dir, "--sha256", &sha256_hex(&new)],
        &[],
    );
    assert_status(&out, 0);
    assert!(std::fs::read(stdout_path(&out)).unwrap() == new);
    assert_eq!(server.log()[0].status, 200, "{:?}", server.log());
}

#[test]
fn sha256_mismatch_exits_65_naming_both_hashes_and_keeps_nothing() {
    let data = content(50_000, 8);
    let server = Server::start(serving(&[("/t.json", &data)]));
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let wrong = "0".repeat(64);
    let out = tb_fetch(
        &[
            &server.url("/t.json"),
            "--cache-dir",
            dir,
            "--sha256",
            &wrong,
        ],
        &[],
    );
    assert_status(&out, 65);
    let err = stderr(&out);
    assert!(
        err.contains(&wrong) && err.contains(&sha256_hex(&data)),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(partials(cache.path()).is_empty(), "the bad part is deleted");
    let blobs = std::fs::read_dir(cache.path().join("sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "nothing entered the cache");

    // Not a sha256 at all: a usage error before any download.
    server.clear_log();
    assert_status(
        &tb_fetch(
            &[
                &server.url("/t.json"),
                "--cache-dir",
                dir,
                "--sha256",
                "abc",
            ],
            &[],
        ),
        2,
    );
    assert!(server.log().is_empty());
}

#[test]
fn not_found_exits_66_with_the_url() {
    let server = Server::start(serving(&[]));
    let cache = tempfile::tempdir().unwrap();
    let out = tb_fetch(
        &[
            "--repo",
            "acme/missing",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        &[("HF_ENDPOINT", &server.endpoint())],
    );
    assert_status(&out, 66);
    let err = stderr(&out);
    let url = server.url("/acme/missing/resolve/main/tokenizer.json");
    assert!(err.contains(&url) && err.contains("404"), "{err}");
    assert_eq!(server.log().len(), 1, "a 404 is not retried");
    assert!(
        partials(cache.path()).is_empty(),
        "no empty part file left behind"
    );
}

#[test]
fn a_stalled_server_times_out_with_69() {
    let server = Server::start(Behaviour {
        stall: true,
        ..serving(&[("/slow.bin", b"never sent")])
    });
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/slow.bin");
    let out = tb_fetch(
        &[
            &url,
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--timeout",
            "1",
        ],
        &[],
    );
    assert_status(&out, 69);
    let err = stderr(&out);
    assert!(
        err.contains(&url) && err.contains("--timeout") && err.contains("cache"),
        "{err}"
    );
    assert_eq!(
        server.log().len(),
        3,
        "three stalled attempts, then it gives up"
    );
    assert!(
        partials(cache.path()).is_empty(),
        "no empty part file left behind"
    );
}

#[test]
fn no_network_exits_69_naming_the_url_and_the_empty_cache() {
    // A port that was just closed: connections are refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cache = tempfile::tempdir().unwrap();
    let out = tb_fetch(
        &["--cache-dir", cache.path().to_str().unwrap()],
        &[("HF_ENDPOINT", &endpoint)],
    );
    assert_status(&out, 69);
    let err = stderr(&out);
    let url = format!("{endpoint}/EleutherAI/gpt-neox-20b/resolve/main/tokenizer.json");
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("cache") && err.contains("was empty"), "{err}");
    assert!(out.stdout.is_empty());

    // --offline never tries the network.
    let out = tb_fetch(
        &["--offline", "--cache-dir", cache.path().to_str().unwrap()],
        &[("HF_ENDPOINT", &endpoint)],
    );
    assert_status(&out, 69);
    assert!(stderr(&out).contains("--offline"), "{}", stderr(&out));
}

#[test]
fn hf_token_goes_to_the_hub_as_a_bearer_token_and_nowhere_else() {
    let data = content(1000, 9);
    let mut behaviour = serving(&[
        ("/acme/gated/resolve/main/tokenizer.json", &data),
        ("/plain.bin", &data),
    ]);
    behaviour.token = Some("hf_secret".into());
    let server = Server::start(behaviour);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let endpoint = server.endpoint();

    let refused = tb_fetch(
        &["--repo", "acme/gated", "--cache-dir", dir],
        &[("HF_ENDPOINT", &endpoint)],
    );
    assert_status(&refused, 69);
    assert!(
        stderr(&refused).contains("HF_TOKEN"),
        "{}",
        stderr(&refused)
    );

    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_TOKEN", "hf_secret"),
    ];
    let ok = tb_fetch(&["--repo", "acme/gated", "--cache-dir", dir], &env);
    assert_status(&ok, 0);
    assert_eq!(
        server.log().last().unwrap().auth.as_deref(),
        Some("Bearer hf_secret")
    );

    // A plain URL never receives the token.
    let plain = tb_fetch(&[&server.url("/plain.bin"), "--cache-dir", dir], &env);
    assert_status(&plain, 69);
    assert_eq!(server.log().last().unwrap().auth, None);
}

#[test]
fn uppercase_proxy_variables_are_honoured() {
    let data = content(20_000, 10);
    // The server doubles as a CONNECT proxy; the URL's host does not resolve, so only the proxy
    // can deliver it.
    let server = Server::start(serving(&[("/via/proxy.bin", &data)]));
    let proxy = server.endpoint();
    let cache = tempfile::tempdir().unwrap();
    let out = tb_fetch(
        &[
            "http://tinybit.invalid/via/proxy.bin",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        &[("HTTP_PROXY", &proxy)],
    );
    assert_status(&out, 0);
    assert_eq!(std::fs::read(stdout_path(&out)).unwrap(), data);
    assert_eq!(
        server.log()[0].connect.as_deref(),
        Some("tinybit.invalid:80")
    );
}

#[test]
fn usage_errors_exit_2() {
    let url = "http://127.0.0.1:9/x";
    assert_status(&tb_fetch(&["--bogus"], &[]), 2);
    assert_status(
        &tb_fetch(&[url, "--repo", "a/b", "--cache-dir", "/tmp"], &[]),
        2,
    );
    assert_status(
        &tb_fetch(&["ftp://example.com/x", "--cache-dir", "/tmp"], &[]),
        2,
    );
    assert_status(
        &tb_fetch(&[url, "--range-size", "lots", "--cache-dir", "/tmp"], &[]),
        2,
    );
    assert_status(
        &tb_fetch(&[url, "--timeout", "0", "--cache-dir", "/tmp"], &[]),
        2,
    );
    let help = tb_fetch(&["--help"], &[]);
    assert_status(&help, 0);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--sha256"));
}

#[test]
fn man_page_documents_every_flag() {
    let help = tb_fetch(&["--help"], &[]);
    let help = String::from_utf8(help.stdout).unwrap();
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/man1/tb-fetch.1"))
        .unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .map(|w| w.trim_end_matches([',', ':']))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    assert!(flags.len() >= 10, "{flags:?}");
    for flag in flags {
        let roff = flag.replace('-', "\\-");
        assert!(
            man.contains(&roff),
            "man/man1/tb-fetch.1 does not document {flag}"
        );
    }
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "EXAMPLES",
        "EXIT STATUS",
        "ENVIRONMENT",
        "FILES",
        "SEE ALSO",
    ] {
        assert!(
            man.contains(&format!(".SH {section}")) || man.contains(&format!(".SH \"{section}\"")),
            "{section}"
        );
    }
}
