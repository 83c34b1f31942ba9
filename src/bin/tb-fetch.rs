//! tb-fetch: downloads a tokenizer (or any file) into the local cache and prints its path.

use argh::FromArgs;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tinybit::cli::{parse_args, run_main, stdout_err};
use tinybit::error::{Error, Result};
use tinybit::fetch::{self, Fetcher};

/// Download a file from a Hugging Face repository (by default the GPT-NeoX-20B tokenizer.json)
/// or from a URL into the cache, and print its local path on stdout.
#[derive(FromArgs, argh::ArgsInfo)]
struct Args {
    /// an http:// or https:// URL to fetch instead of a hub file
    #[argh(positional)]
    url: Option<String>,
    /// hub repository, owner/name (default EleutherAI/gpt-neox-20b)
    #[argh(option)]
    repo: Option<String>,
    /// branch, tag or commit in the repository (default main)
    #[argh(option)]
    revision: Option<String>,
    /// file in the repository (default tokenizer.json)
    #[argh(option)]
    file: Option<String>,
    /// expected sha256 of the content: a mismatch is refused, and a cached copy with this hash is
    /// used whatever its URL
    #[argh(option)]
    sha256: Option<String>,
    /// cache directory (default $XDG_CACHE_HOME/tinybit)
    #[argh(option)]
    cache_dir: Option<PathBuf>,
    /// seconds one range request may take before it counts as stalled (default 30)
    #[argh(option, default = "fetch::DEFAULT_STALL_TIMEOUT_SECS")]
    timeout: u64,
    /// bytes per range request, with an optional K, M or G suffix (default 8M)
    #[argh(option, default = "String::from(\"8M\")")]
    range_size: String,
    /// never touch the network: answer from the cache or fail with status 69
    #[argh(switch)]
    offline: bool,
    /// download again even when the cache has the file
    #[argh(switch)]
    refresh: bool,
    /// no progress bar or notes on stderr
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

fn main() -> ExitCode {
    match parse_args::<Args>("tb-fetch") {
        Ok(args) => run_main("tb-fetch", || run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> Result<()> {
    if args.version {
        println!("tb-fetch {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let mut fetcher = Fetcher::from_env(args.cache_dir.as_deref())?;
    fetcher.stall_timeout = args.timeout;
    fetcher.range_size = fetch::parse_byte_size(&args.range_size)?;
    fetcher.offline = args.offline;
    fetcher.refresh = args.refresh;
    fetcher.quiet = args.quiet;
    let sha256 = args.sha256.as_deref();
    let path = match &args.url {
        Some(url) => {
            if args.repo.is_some() || args.revision.is_some() || args.file.is_some() {
                return Err(Error::usage(
                    "give either a URL or --repo/--revision/--file, not both",
                ));
            }
            fetcher.fetch_url(url, sha256)?
        }
        None => fetcher.fetch_hf(
            args.repo.as_deref().unwrap_or(fetch::DEFAULT_REPO),
            args.revision.as_deref().unwrap_or(fetch::DEFAULT_REVISION),
            args.file.as_deref().unwrap_or(fetch::DEFAULT_FILE),
            sha256,
        )?,
    };
    writeln!(std::io::stdout(), "{}", path.display()).map_err(stdout_err)
}
