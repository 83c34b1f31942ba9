//! One download into a part file, in HTTP Range requests of bounded size.
//!
//! minreq's `with_timeout` is a deadline for the whole request, not an idle timeout, so each request
//! asks for at most `range_size` bytes under its own deadline. A request that times out or loses
//! its connection keeps what it brought, and the next one resumes there; only attempts that bring no
//! new byte count towards giving up.

use super::Fetcher;
use super::cache::Part;
use super::progress::Progress;
use crate::error::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

const MAX_REDIRECTS: usize = 10;
/// Attempts in a row that bring no new byte before the download is given up.
const MAX_FRUITLESS: u32 = 3;
const USER_AGENT: &str = concat!("tinybit/", env!("CARGO_PKG_VERSION"));

pub(super) struct Download<'a> {
    pub fetcher: &'a Fetcher,
    pub url: &'a str,
    /// Sent as a bearer token, to the URL's own origin only (not to hosts it redirects to).
    pub token: Option<&'a str>,
    pub label: &'a str,
}

/// What one attempt achieved.
enum Step {
    Done,
    Progress,
    /// No new byte; `timed_out` when the deadline was spent waiting (no pause needed before retrying).
    Fruitless {
        why: String,
        timed_out: bool,
    },
}

/// How a request failed before a response arrived.
enum SendError {
    Fatal(Error),
    Transient { why: String, timed_out: bool },
}

struct State<'p> {
    part: &'p Part,
    /// Bytes in the part file.
    len: u64,
    /// The file's full size, once a response has told it.
    total: Option<u64>,
    /// The most bytes the part has held: progress after the server forced a restart means passing it.
    best: u64,
    /// Seconds allowed per request; doubled when a server that ignores Range keeps running out of time.
    deadline: u64,
    /// The validator of the bytes in the part, sent as `If-Range` so a changed file restarts cleanly.
    etag: Option<String>,
    progress: Progress,
}

impl Download<'_> {
    /// Downloads into `part` until the file is complete; returns its size.
    pub fn run(&self, part: &Part) -> Result<u64> {
        let len = part
            .file
            .metadata()
            .map_err(|e| Error::io(&part.path, "reading", e))?
            .len();
        let etag = if len > 0 {
            std::fs::read_to_string(&part.etag_path).ok()
        } else {
            None
        };
        let mut st = State {
            part,
            len,
            total: None,
            best: len,
            deadline: self.fetcher.stall_timeout,
            etag: etag.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()),
            progress: Progress::new(
                self.fetcher.progress && !self.fetcher.quiet,
                self.label,
                len,
            ),
        };
        if len > 0 {
            self.note(&mut st, &format!("resuming {} at byte {len}", self.url));
        } else {
            self.note(&mut st, &format!("downloading {}", self.url));
        }
        let mut fruitless = 0;
        loop {
            match self.attempt(&mut st)? {
                Step::Done => break,
                Step::Progress => fruitless = 0,
                Step::Fruitless { why, timed_out } => {
                    fruitless += 1;
                    if fruitless >= MAX_FRUITLESS {
                        return Err(Error::Unavailable(format!(
                            "{why} ({fruitless} attempts in a row brought no data)"
                        )));
                    }
                    self.note(&mut st, &format!("{why}; trying again"));
                    if !timed_out {
                        std::thread::sleep(Duration::from_millis(500 * u64::from(fruitless)));
                    }
                }
            }
        }
        st.progress.finish();
        Ok(st.len)
    }

    fn note(&self, st: &mut State, msg: &str) {
        if !self.fetcher.quiet {
            st.progress
                .note(&format!("{}: {msg}", crate::output::program_name()));
        }
    }

    fn attempt(&self, st: &mut State) -> Result<Step> {
        let start = st.len;
        let end = start.saturating_add(self.fetcher.range_size - 1);
        let mut resp = match self.send(start, end, st) {
            Ok(resp) => resp,
            Err(SendError::Fatal(e)) => return Err(e),
            Err(SendError::Transient { why, timed_out }) => {
                return Ok(Step::Fruitless { why, timed_out });
            }
        };
        let status = resp.status_code;
        let reason = resp.reason_phrase.trim().to_string();
        match status {
            206 => {
                let range = header(&resp, "content-range").and_then(parse_content_range);
                let Some((first, last, total)) = range.filter(|&(a, b, _)| a == start && b >= a)
                else {
                    // An answer for other bytes than asked cannot be appended: start over.
                    self.restart(st);
                    return Ok(Step::Fruitless {
                        why: "the server answered a different range than asked".into(),
                        timed_out: false,
                    });
                };
                if start == 0 {
                    self.remember_etag(&resp, st);
                }
                st.total = total.or(st.total);
                let want = last - first + 1;
                let (got, err) = self.copy(&mut resp, st, want)?;
                if got < want {
                    return Ok(self.judge(st, err));
                }
                // A range shorter than asked for ends the file when the size is not known.
                let complete = st.total.map_or(last < end, |t| st.len >= t);
                Ok(if complete { Step::Done } else { Step::Progress })
            }
            200 => {
                if st.len > 0 {
                    self.note(st, "the server ignored the Range request and sent the whole file; starting over");
                    self.restart(st);
                }
                self.remember_etag(&resp, st);
                let length = header(&resp, "content-length").and_then(|v| v.parse::<u64>().ok());
                st.total = length;
                let (got, err) = self.copy(&mut resp, st, length.unwrap_or(u64::MAX))?;
                if err.is_none() && length.is_none_or(|l| got == l) {
                    return Ok(Step::Done);
                }
                // The whole body must fit in one deadline here, so give the next attempt longer.
                if err.as_ref().is_some_and(is_timeout) {
                    st.deadline = st.deadline.saturating_mul(2);
                }
                Ok(self.judge(st, err))
            }
            416 => {
                let total = header(&resp, "content-range").and_then(parse_unsatisfied_range);
                if total == Some(st.len) {
                    return Ok(Step::Done);
                }
                self.restart(st);
                Ok(Step::Fruitless {
                    why:
                        "the server refused the range asked for (the file changed?); starting over"
                            .into(),
                    timed_out: false,
                })
            }
            404 | 410 => Err(Error::NoInput(format!(
                "{} does not exist (HTTP {status} {reason}); check the URL, or --repo, --revision and --file",
                self.url
            ))),
            401 | 403 => {
                let hint = match (self.token.is_some(), self.fetcher.hf_token.is_some()) {
                    (true, _) => {
                        "HF_TOKEN was sent; check that it grants access to this repository"
                    }
                    (false, true) => "HF_TOKEN is sent only to the hub, not to a plain URL",
                    (false, false) => {
                        "for a gated or private repository set HF_TOKEN to an access token"
                    }
                };
                Err(Error::Unavailable(format!(
                    "access refused (HTTP {status} {reason}); {hint}"
                )))
            }
            408 | 425 | 429 | 500..=599 => Ok(Step::Fruitless {
                why: format!("the server answered HTTP {status} {reason}"),
                timed_out: false,
            }),
            _ => Err(Error::Unavailable(format!(
                "unexpected answer HTTP {status} {reason}"
            ))),
        }
    }

    /// Sends one GET for bytes `start..=end`, following redirects itself so the token stays with
    /// the URL's origin.
    fn send(&self, start: u64, end: u64, st: &State) -> Result<minreq::ResponseLazy, SendError> {
        let origin = origin(self.url);
        let mut url = self.url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = minreq::get(url.as_str())
                .with_timeout(st.deadline)
                .with_follow_redirects(false)
                .with_header("User-Agent", USER_AGENT)
                .with_header("Connection", "close")
                .with_header("Range", format!("bytes={start}-{end}"));
            if let Some(tag) = st.etag.as_deref().filter(|_| start > 0) {
                req = req.with_header("If-Range", tag);
            }
            if let Some(token) = self.token.filter(|_| origin == self::origin(&url)) {
                req = req.with_header("Authorization", format!("Bearer {token}"));
            }
            if let Some(proxy) = self.fetcher.proxy_for(&url).map_err(SendError::Fatal)? {
                req = req.with_proxy(proxy);
            }
            let resp = req.send_lazy().map_err(|e| classify(e, st.deadline))?;
            if !matches!(resp.status_code, 301 | 302 | 303 | 307 | 308) {
                return Ok(resp);
            }
            let Some(location) = header(&resp, "location") else {
                return Err(SendError::Fatal(Error::Unavailable(format!(
                    "{url} redirected (HTTP {}) without saying where",
                    resp.status_code
                ))));
            };
            url = join_url(&url, location);
        }
        Err(SendError::Fatal(Error::Unavailable(format!(
            "more than {MAX_REDIRECTS} redirects"
        ))))
    }

    /// Appends up to `want` bytes of the body to the part. Returns the bytes written and the read
    /// error that cut it short, if any; a write error (disk full) is fatal.
    fn copy(
        &self,
        resp: &mut minreq::ResponseLazy,
        st: &mut State,
        want: u64,
    ) -> Result<(u64, Option<std::io::Error>)> {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        while got < want {
            let n = (want - got).min(buf.len() as u64) as usize;
            match resp.read(&mut buf[..n]) {
                Ok(0) => break,
                Ok(n) => {
                    (&st.part.file)
                        .write_all(&buf[..n])
                        .map_err(|e| Error::io(&st.part.path, "writing the download to", e))?;
                    got += n as u64;
                    st.len += n as u64;
                    st.progress.update(st.len, st.total);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Ok((got, Some(e))),
            }
        }
        Ok((got, None))
    }

    /// An attempt that was cut short: progress if the part grew past anything it held before.
    fn judge(&self, st: &mut State, err: Option<std::io::Error>) -> Step {
        if st.len > st.best {
            st.best = st.len;
            return Step::Progress;
        }
        match err {
            Some(e) if is_timeout(&e) => Step::Fruitless {
                why: format!("no data for {} s (--timeout)", st.deadline),
                timed_out: true,
            },
            Some(e) => Step::Fruitless {
                why: format!("the connection failed: {e}"),
                timed_out: false,
            },
            None => Step::Fruitless {
                why: "the server closed the connection before the end of the data".into(),
                timed_out: false,
            },
        }
    }

    /// Empties the part: its bytes cannot be continued.
    fn restart(&self, st: &mut State) {
        // The part is opened for appending, so after truncation writes start at byte 0 again.
        if let Err(e) = st.part.file.set_len(0) {
            self.note(st, &format!("cannot empty {}: {e}", st.part.path.display()));
        }
        st.len = 0;
        st.total = None;
        st.etag = None;
        let _ = std::fs::remove_file(&st.part.etag_path);
    }

    /// Keeps the response's strong ETag (weak ones cannot guard byte ranges) next to the part.
    fn remember_etag(&self, resp: &minreq::ResponseLazy, st: &mut State) {
        st.etag = header(resp, "etag")
            .filter(|t| !t.starts_with("W/"))
            .map(str::to_string);
        let _ = match &st.etag {
            Some(tag) => std::fs::write(&st.part.etag_path, tag),
            None => std::fs::remove_file(&st.part.etag_path),
        };
    }
}

impl Fetcher {
    /// The proxy for `url` from the environment's proxy variables, as minreq wants it.
    fn proxy_for(&self, url: &str) -> Result<Option<minreq::Proxy>> {
        let (var, value) = if url.starts_with("https://") {
            ("HTTPS_PROXY", &self.https_proxy)
        } else {
            ("HTTP_PROXY", &self.http_proxy)
        };
        let Some(raw) = value else { return Ok(None) };
        // The value is not echoed: it may hold a password.
        minreq::Proxy::new(raw.trim().trim_end_matches('/'))
            .map(Some)
            .map_err(|e| {
                Error::usage(format!(
                    "{var} (or {}) is not a usable proxy address ({e}); expected \
                 http://[user:password@]host:port",
                    var.to_lowercase()
                ))
            })
    }
}

fn header<'r>(resp: &'r minreq::ResponseLazy, name: &str) -> Option<&'r str> {
    resp.headers
        .iter()
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn is_timeout(e: &std::io::Error) -> bool {
    // A socket read timeout shows as WouldBlock on Unix and TimedOut elsewhere.
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// Sorts a failed request: no route to the server is final, a timeout or a reset is worth retrying.
fn classify(e: minreq::Error, deadline: u64) -> SendError {
    let fatal = |why: String| SendError::Fatal(Error::Unavailable(why));
    match e {
        minreq::Error::IoError(io) if is_timeout(&io) => SendError::Transient {
            why: format!("no answer within {deadline} s (--timeout)"),
            timed_out: true,
        },
        minreq::Error::IoError(io) => match io.kind() {
            ErrorKind::ConnectionRefused
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::NetworkDown
            | ErrorKind::AddrNotAvailable => fatal(io.to_string()),
            // getaddrinfo failures have no ErrorKind of their own.
            _ if io.to_string().contains("lookup address") => {
                fatal(format!("cannot resolve the host name ({io})"))
            }
            _ => SendError::Transient {
                why: format!("the connection failed: {io}"),
                timed_out: false,
            },
        },
        minreq::Error::AddressNotFound => fatal("cannot resolve the host name".into()),
        minreq::Error::BadProxy
        | minreq::Error::BadProxyCreds
        | minreq::Error::ProxyConnect
        | minreq::Error::InvalidProxyCreds => fatal(format!("the proxy failed: {e}")),
        minreq::Error::InvalidProtocol
        | minreq::Error::InvalidProtocolInRedirect
        | minreq::Error::PunycodeConversionFailed
        | minreq::Error::PunycodeFeatureNotEnabled
        | minreq::Error::HttpsFeatureNotEnabled => fatal(e.to_string()),
        other => SendError::Transient {
            why: other.to_string(),
            timed_out: false,
        },
    }
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, total) = v.strip_prefix("bytes")?.trim().split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?, total))
}

/// `bytes */TOTAL`, as sent with 416.
fn parse_unsatisfied_range(v: &str) -> Option<u64> {
    v.strip_prefix("bytes")?
        .trim()
        .strip_prefix("*/")?
        .trim()
        .parse()
        .ok()
}

/// `scheme://authority` of a URL, lowercased.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    format!("{scheme}://{authority}").to_ascii_lowercase()
}

/// Resolves a `Location` header against the URL it came from.
fn join_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let scheme = base.split_once("://").map_or("http", |(s, _)| s);
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}");
    }
    if location.starts_with('/') {
        let origin_len = base.find("://").map_or(0, |i| i + 3);
        let authority_end = base[origin_len..]
            .find(['/', '?', '#'])
            .map_or(base.len(), |i| origin_len + i);
        return format!("{}{location}", &base[..authority_end]);
    }
    let path = base.split(['?', '#']).next().unwrap_or(base);
    match path.rfind('/') {
        Some(i) if i + 1 > path.find("://").map_or(0, |j| j + 3) => {
            format!("{}{location}", &path[..=i])
        }
        _ => format!("{path}/{location}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(
            parse_content_range("bytes 100-199/*"),
            Some((100, 199, None))
        );
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_unsatisfied_range("bytes */1000"), Some(1000));
        assert_eq!(parse_unsatisfied_range("bytes 0-1/2"), None);
    }

    #[test]
    fn redirects_resolve_against_their_base() {
        let base = "https://hub.example/a/resolve/main/t.json?x=1";
        assert_eq!(
            join_url(base, "https://cdn.example/x"),
            "https://cdn.example/x"
        );
        assert_eq!(join_url(base, "//cdn.example/x"), "https://cdn.example/x");
        assert_eq!(join_url(base, "/api/x"), "https://hub.example/api/x");
        assert_eq!(
            join_url(base, "other.json"),
            "https://hub.example/a/resolve/main/other.json"
        );
        assert_eq!(join_url("http://h:8080", "/p"), "http://h:8080/p");
        assert_eq!(
            origin("https://Hub.example:443/a?b"),
            "https://hub.example:443"
        );
    }

    #[test]
    fn proxies_come_from_the_variable_for_the_scheme() {
        let mut f = crate::fetch::tests::fetcher("https://huggingface.co");
        f.https_proxy = Some("http://user:pw@proxy.example:3128/".into());
        f.http_proxy = None;
        assert!(f.proxy_for("https://huggingface.co/x").unwrap().is_some());
        assert!(f.proxy_for("http://127.0.0.1/x").unwrap().is_none());
        f.http_proxy = Some("socks5://proxy.example:1080".into());
        let err = f.proxy_for("http://127.0.0.1/x").unwrap_err().to_string();
        assert!(
            err.contains("HTTP_PROXY") && !err.contains("socks5"),
            "{err}"
        );
    }
}
