//! Downloads with a local cache: the only part of tinybit that touches the network.
//!
//! A file is fetched from any `http(s)://` URL, or from a Hugging Face repository by name
//! (`{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`), into a cache directory laid out as
//!
//! ```text
//! CACHE/sha256/HEX/NAME        the downloaded files, by the sha256 of their content
//! CACHE/urls/KEY.json          KEY = sha256 of the URL: which content that URL gave
//! CACHE/partial/KEY.part       a download in progress (and KEY.etag, its validator)
//! ```
//!
//! so a second fetch of the same URL, or of any URL with a known `--sha256`, is answered from disk
//! without the network. Downloads go to the `.part` file in HTTP Range requests of bounded size, each
//! with its own deadline (minreq's timeout is a total deadline, not an idle one), resume from the
//! part's length, and are renamed into place only when complete and, if asked, sha256-verified.

mod cache;
mod download;
mod progress;

use crate::error::{Error, Result};
use cache::Cache;
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

/// The Hugging Face hub; `HF_ENDPOINT` overrides it (a mirror, or a local server in tests).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The repository whose tokenizer tinybit uses by default: GPT-NeoX-20B's byte-level BPE, the same
/// vocabulary as RWKV's `20B_tokenizer.json`.
pub const DEFAULT_REPO: &str = "EleutherAI/gpt-neox-20b";
pub const DEFAULT_REVISION: &str = "main";
pub const DEFAULT_FILE: &str = "tokenizer.json";
/// Seconds one range request may take before it counts as stalled.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 30;
/// Bytes asked for in one Range request: small enough to finish well within the timeout on a slow link.
pub const DEFAULT_RANGE_SIZE: u64 = 8 << 20;

/// How to download and where to cache. Build one with [`Fetcher::from_env`] and adjust the fields.
/// (No `Debug`: it would print the token and proxy passwords.)
#[derive(Clone)]
pub struct Fetcher {
    /// Cache root (default `$XDG_CACHE_HOME/tinybit`).
    pub cache_dir: PathBuf,
    /// Seconds one range request (connect, headers and body) may take; an attempt that brings no new
    /// byte in that time is a stall, and three stalls in a row end the download.
    pub stall_timeout: u64,
    /// Bytes per Range request.
    pub range_size: u64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// No notes on stderr (errors are still returned).
    pub quiet: bool,
    /// Never touch the network: answer from the cache or fail.
    pub offline: bool,
    /// Download again even when the cache has the URL.
    pub refresh: bool,
    /// Base address of the Hugging Face hub, without a trailing slash.
    pub hf_endpoint: String,
    /// Sent as `Authorization: Bearer` to the hub (never to other hosts).
    pub hf_token: Option<String>,
    /// Proxy for `https://` URLs (`https_proxy`/`HTTPS_PROXY`).
    pub https_proxy: Option<String>,
    /// Proxy for `http://` URLs (`http_proxy`/`HTTP_PROXY`).
    pub http_proxy: Option<String>,
}

impl Fetcher {
    /// Defaults plus what the environment says: `HF_ENDPOINT`, `HF_TOKEN`, the proxy variables (both
    /// cases, because minreq itself honours only the lowercase ones), a progress bar when stderr is
    /// a terminal, and the cache in `cache_dir` or else under `XDG_CACHE_HOME`/`HOME`.
    pub fn from_env(cache_dir: Option<&Path>) -> Result<Fetcher> {
        let cache_dir = match cache_dir {
            Some(dir) => dir.to_path_buf(),
            None => cache_root()?,
        };
        Ok(Fetcher {
            cache_dir,
            stall_timeout: DEFAULT_STALL_TIMEOUT_SECS,
            range_size: DEFAULT_RANGE_SIZE,
            progress: std::io::stderr().is_terminal(),
            quiet: false,
            offline: false,
            refresh: false,
            hf_endpoint: env_var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            hf_token: env_var("HF_TOKEN"),
            https_proxy: env_var("https_proxy").or_else(|| env_var("HTTPS_PROXY")),
            http_proxy: env_var("http_proxy").or_else(|| env_var("HTTP_PROXY")),
        })
    }

    /// The hub address of `file` in `repo` at `revision`. A revision such as `refs/pr/1` has its
    /// slashes escaped, as the hub expects.
    pub fn hf_url(&self, repo: &str, revision: &str, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.hf_endpoint,
            percent_encode(repo, true),
            percent_encode(revision, false),
            percent_encode(file, true)
        )
    }

    /// Fetches `file` from the Hugging Face repository `repo` (`owner/name`) at `revision`; returns
    /// the cached file's path.
    pub fn fetch_hf(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        expected_sha256: Option<&str>,
    ) -> Result<PathBuf> {
        for (what, value) in [("--repo", repo), ("--revision", revision), ("--file", file)] {
            if value.trim().is_empty() || value.split('/').any(|s| s.is_empty() || s == "..") {
                return Err(Error::usage(format!(
                    "{what} '{value}' is not a valid hub path; expected e.g. --repo {DEFAULT_REPO} \
                     --revision {DEFAULT_REVISION} --file {DEFAULT_FILE}"
                )));
            }
        }
        let url = self.hf_url(repo, revision, file);
        check_url(&url).map_err(|e| {
            Error::usage(format!(
                "{e} (the hub address comes from HF_ENDPOINT, or is {DEFAULT_ENDPOINT})"
            ))
        })?;
        self.fetch(&url, expected_sha256, self.hf_token.as_deref())
    }

    /// Fetches any `http://` or `https://` URL; returns the cached file's path.
    pub fn fetch_url(&self, url: &str, expected_sha256: Option<&str>) -> Result<PathBuf> {
        self.fetch(url, expected_sha256, None)
    }

    fn fetch(&self, url: &str, expected: Option<&str>, token: Option<&str>) -> Result<PathBuf> {
        // A malformed URL is the user's to fix, not the network's: refuse it before any I/O.
        check_url(url)?;
        let expected = expected.map(parse_sha256).transpose()?;
        let expected = expected.as_deref();
        if self.stall_timeout == 0 || self.range_size == 0 {
            return Err(Error::usage(
                "the stall timeout and the range size must be at least 1",
            ));
        }
        let cache = Cache::open(&self.cache_dir)?;
        let cached = cache.lookup(url, expected)?;
        if let (Some(path), false) = (&cached, self.refresh) {
            return Ok(path.clone());
        }
        if self.offline {
            return Err(Error::Unavailable(format!(
                "{url} is not in the cache {} and --offline forbids downloading it; run without \
                 --offline, or pass --cache-dir where a copy is",
                self.cache_dir.display()
            )));
        }

        let part = cache.begin(url)?;
        let len = download::Download {
            fetcher: self,
            url,
            token,
            label: cache::file_name(url),
        }
        .run(&part)
        .map_err(|e| {
            // An empty part (nothing arrived) would only clutter the cache.
            if std::fs::metadata(&part.path).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(&part.path);
            }
            match e {
                Error::Unavailable(why) => Error::Unavailable(self.unavailable_message(
                    url,
                    &why,
                    cached.as_deref(),
                    &part,
                )),
                other => other,
            }
        })?;

        let hex = sha256_file(&part.path)?;
        if let Some(want) = expected.filter(|&want| want != hex) {
            part.discard();
            return Err(Error::Data(format!(
                "sha256 mismatch for {url}: expected {want}, got {hex} ({len} bytes); the download \
                 was deleted. Check the --sha256 value, or whether the file changed upstream"
            )));
        }
        cache.store(url, part, &hex, len)
    }

    /// The exit-69 message: what failed, that the cache could not help, and what to do.
    fn unavailable_message(
        &self,
        url: &str,
        why: &str,
        cached: Option<&Path>,
        part: &cache::Part,
    ) -> String {
        let cache_note = match cached {
            Some(p) => format!(
                "--refresh was given, so the cached copy {} was not used",
                p.display()
            ),
            None => format!(
                "the cache {} was empty for this URL, with no earlier copy to fall back on",
                self.cache_dir.display()
            ),
        };
        let kept = std::fs::metadata(&part.path).map(|m| m.len()).unwrap_or(0);
        let resume = if kept > 0 {
            format!("; the {kept} bytes already downloaded are kept and the next run resumes there")
        } else {
            String::new()
        };
        format!(
            "cannot download {url}: {why}; {cache_note}. Check the network and the proxy \
             (HTTPS_PROXY), then run again{resume}"
        )
    }
}

/// Refuses a malformed URL as a usage error (2) before any network I/O, naming what is wrong: the
/// scheme must be `http` or `https`, the host non-empty, a bracketed IPv6 literal (`[::1]`) a valid
/// address, and a port a number from 1 to 65535. Whether the host exists is the network's answer.
pub fn check_url(url: &str) -> Result<()> {
    let bad = |why: String| Error::usage(format!("'{url}' is not a valid URL: {why}"));
    let rest = match url.split_once("://") {
        Some(("http" | "https", rest)) => rest,
        _ => {
            return Err(Error::usage(format!(
                "'{url}' is not an http:// or https:// URL; to fetch from the hub by name use --repo"
            )));
        }
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    // user:password@ is not part of the host.
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(inside) = host_port.strip_prefix('[') {
        let Some((addr, after)) = inside.split_once(']') else {
            return Err(bad(format!(
                "the IPv6 address '[{inside}' has no closing ']'; write it as http://[::1]:8080/PATH"
            )));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad(format!("'[{addr}]' is not an IPv6 address")));
        }
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| {
                bad(format!(
                    "'{after}' follows the IPv6 address; only :PORT may follow its ']'"
                ))
            })?),
        };
        (addr, port)
    } else {
        match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(bad(
            "it has no host; expected http://HOST/PATH or https://HOST/PATH".into(),
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|&c| c.is_whitespace() || c.is_control() || "[]<>\"{}|\\^`".contains(c))
    {
        return Err(bad(format!("the host '{host}' contains {c:?}")));
    }
    if let Some(p) = port {
        let ok = !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n));
        if !ok {
            return Err(bad(format!(
                "the port '{p}' is not a number from 1 to 65535"
            )));
        }
    }
    Ok(())
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// tinybit's cache directory: `$XDG_CACHE_HOME/tinybit`, else `$HOME/.cache/tinybit`.
pub fn cache_root() -> Result<PathBuf> {
    crate::dirs::tinybit_dir(crate::dirs::Base::Cache).ok_or_else(|| {
        Error::usage(
            "neither XDG_CACHE_HOME nor HOME is set, so there is no default cache; pass --cache-dir DIR",
        )
    })
}

/// A byte count with an optional binary suffix: `65536`, `64K`, `8M`, `1G`.
pub fn parse_byte_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::usage(format!(
                "'{s}' is not a size: expected a positive byte count such as 65536, 64K or 8M"
            ))
        })
}

/// A sha256 given by the user: 64 hex digits, returned lowercase.
pub fn parse_sha256(s: &str) -> Result<String> {
    let s = s.trim();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(Error::usage(format!(
            "--sha256 '{s}' is not a sha256: expected 64 hex digits (as printed by sha256sum)"
        )))
    }
}

/// The sha256 of a file's content, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "opening", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, "reading", e)),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` when `keep_slash`).
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn fetcher(endpoint: &str) -> Fetcher {
        Fetcher {
            cache_dir: PathBuf::from("/nonexistent"),
            stall_timeout: 1,
            range_size: 1,
            progress: false,
            quiet: true,
            offline: false,
            refresh: false,
            hf_endpoint: endpoint.into(),
            hf_token: None,
            https_proxy: None,
            http_proxy: None,
        }
    }

    #[test]
    fn malformed_urls_are_usage_errors() {
        for ok in [
            "http://127.0.0.1:9/x",
            "https://huggingface.co/a/b/resolve/main/t.json",
            "http://[::1]:8080/x",
            "http://[::1]",
            "http://user:pw@example.com:65535/x",
            "http://example.com?x=1",
            "http://example.com#f",
            "http://example.com:1",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}: {:?}", check_url(ok).err());
        }
        for (bad, names) in [
            ("ftp://example.com/x", "http://"),
            ("example.com/x", "http://"),
            ("http://", "no host"),
            ("http:///x", "no host"),
            ("http://:80/x", "no host"),
            ("http://user@/x", "no host"),
            ("http://[::1/x", "closing ']'"),
            ("http://[::g]/x", "not an IPv6 address"),
            ("http://[]/x", "not an IPv6 address"),
            ("http://[::1]x/y", "only :PORT"),
            ("http://h:99999/x", "port '99999'"),
            ("http://h:0/x", "port '0'"),
            ("http://h:/x", "port ''"),
            ("http://h:-1/x", "port '-1'"),
            ("http://h:+80/x", "port '+80'"),
            ("http://h:18446744073709551616/x", "port"),
            ("http://exa mple.com/x", "contains ' '"),
        ] {
            let e = check_url(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            let msg = e.to_string();
            assert!(msg.contains(bad) && msg.contains(names), "{bad}: {msg}");
        }
    }

    #[test]
    fn hub_url_escapes_revision_slashes_but_not_path_ones() {
        let f = fetcher("http://127.0.0.1:9");
        assert_eq!(
            f.hf_url("EleutherAI/gpt-neox-20b", "main", "tokenizer.json"),
            "http://127.0.0.1:9/EleutherAI/gpt-neox-20b/resolve/main/tokenizer.json"
        );
        assert_eq!(
            f.hf_url("a/b", "refs/pr/1", "sub dir/t.json"),
            "http://127.0.0.1:9/a/b/resolve/refs%2Fpr%2F1/sub%20dir/t.json"
        );
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_byte_size("65536").unwrap(), 65536);
        assert_eq!(parse_byte_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_byte_size("8m").unwrap(), 8 << 20);
        for bad in ["", "0", "K", "1.5M", "-1", "99999999999G"] {
            assert_eq!(parse_byte_size(bad).unwrap_err().exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn sha256_must_be_64_hex_digits() {
        let good = "AB".repeat(32);
        assert_eq!(parse_sha256(&good).unwrap(), "ab".repeat(32));
        assert_eq!(parse_sha256("abc").unwrap_err().exit_code(), 2);
        assert_eq!(parse_sha256(&"g".repeat(64)).unwrap_err().exit_code(), 2);
    }
}
