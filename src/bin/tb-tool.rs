//! tb-tool: call tinybit's tools. Bare, it reads JSON Lines calls on stdin and writes one record per
//! line (the protocol of `tinybit::tools`); with a command, it makes one call from the shell, in a
//! form derived from the tool's schema (`tinybit::tools::shell`).

use argh::FromArgs;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tinybit::tools::shell::{self, Command};
use tinybit::tools::{Options, Registry};
use tinybit::{Error, Result};

#[derive(FromArgs, argh::ArgsInfo)]
/// Call tinybit's tools. Without a command, read JSON Lines calls such as
/// {"tool":"calculator","args":{"expr":"2^10"}} on stdin and write one result record per line.
/// Commands: TOOL [ACTION] [OPTIONS] [WORDS]... makes one call, its options being the tool's
/// arguments (tb-tool TOOL -h lists them); call TOOL [ARGS_JSON]; list [--prompt].
struct Cli {
    /// the tool database (default: $TINYBIT_DB, else $XDG_DATA_HOME/tinybit/tools.db)
    #[argh(option)]
    db: Option<PathBuf>,
    /// seconds an external tb-tool-NAME may run before it is stopped (default 30)
    #[argh(option, default = "30.0")]
    timeout: f64,
    /// ignore tb-tool-NAME executables on PATH
    #[argh(switch)]
    no_external: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    /// the command and its words
    #[argh(positional, greedy)]
    command: Vec<String>,
}

/// Runs the command; a failed call is `Error::Failed` (exit status 1).
fn run(cli: Cli) -> Result<()> {
    if cli.version {
        println!("tb-tool {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if !(cli.timeout.is_finite() && cli.timeout > 0.0) {
        return Err(Error::usage(format!(
            "--timeout must be a positive number of seconds, got {}",
            cli.timeout
        )));
    }
    let registry = Registry::standard(&Options {
        db: cli.db,
        timeout: Duration::from_secs_f64(cli.timeout),
        external: !cli.no_external,
    });
    let cmd = shell::parse(&registry, &cli.command)?;
    if cmd == Command::Stream && std::io::stdin().is_terminal() {
        eprintln!(
            "tb-tool: reading JSON Lines calls from the terminal; end with Ctrl-D (tb-tool --help for more)"
        );
    }
    shell::run(
        &registry,
        cmd,
        std::io::stdin().lock(),
        std::io::stdout().lock(),
    )
}

fn main() -> ExitCode {
    match tinybit::cli::parse_args::<Cli>("tb-tool") {
        Ok(cli) => tinybit::cli::run_main("tb-tool", || run(cli)),
        Err(code) => code,
    }
}
