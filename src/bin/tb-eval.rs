//! tb-eval: measure a model — perplexity and bits per byte, generation sanity prompts, tool calls.

use argh::FromArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use tinybit::cli::{parse_args, run_main, set_threads, with_big_stack};
use tinybit::error::{Error, Result};
use tinybit::eval::{self, EvalOptions, Task};

#[derive(FromArgs, argh::ArgsInfo)]
/// Evaluate a model: perplexity and bits per byte over text or token files (ppl), sanity prompts
/// (gen), or tool-call cases (tools). A table on stdout, records with --json, results with -o.
struct Args {
    /// the checkpoint, or a NAME in $XDG_DATA_HOME/tinybit/models (default: $TINYBIT_MODEL, else
    /// the bundled assistant)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// ppl (default), gen or tools
    #[argh(option, default = "String::from(\"ppl\")")]
    task: String,
    /// write every metric, the model's and data's identity and the settings to this JSON file
    #[argh(option, short = 'o')]
    output: Option<PathBuf>,
    /// JSON Lines records on stdout
    #[argh(switch)]
    json: bool,
    /// exit 1 when METRIC is above VALUE (METRIC=VALUE, repeatable), e.g. ppl=40
    #[argh(option)]
    fail_above: Vec<String>,
    /// exit 1 when METRIC is below VALUE (METRIC=VALUE, repeatable), e.g. exact_match=0.5
    #[argh(option)]
    fail_below: Vec<String>,
    /// tokens per sequence-mode chunk for ppl (default 1024)
    #[argh(option, default = "1024")]
    chunk: usize,
    /// ppl: evaluate N segments of each file side by side (default 1: one pass; larger keeps a
    /// GPU busy, each segment starting from a zero state)
    #[argh(option, default = "1")]
    batch: usize,
    /// tokenizer file, overriding the one in the checkpoint
    #[argh(option)]
    tokenizer: Option<PathBuf>,
    /// most tokens generated per prompt for gen and tools (default 128)
    #[argh(option, short = 'n', default = "128")]
    max_tokens: usize,
    /// CPU threads (default: all cores)
    #[argh(option, short = 't', default = "0")]
    threads: usize,
    /// auto (default: the GPU when built with cuda and present), cpu or cuda[:N]; ppl only
    #[argh(option, default = "String::from(\"auto\")")]
    device: String,
    /// tools: let the model write tool calls freely (by default constrained as in tb-chat)
    #[argh(switch)]
    unconstrained: bool,
    /// tools: the answers' bias toward copying the tool result, as tb-chat's (default 12; 0: off)
    #[argh(option, default = "tinybit::generate::DEFAULT_COPY_BIAS")]
    copy_bias: f32,
    /// no progress on stderr
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    /// text or token files (ppl), prompt files (gen), case files (tools)
    #[argh(positional)]
    files: Vec<PathBuf>,
}

/// A `--batch` too big for the memory left (the estimate checked first is a lower bound) ends
/// with exit 74 and a message, not an abort.
#[global_allocator]
static ALLOC: tinybit::cli::ExitOnOom = tinybit::cli::ExitOnOom {
    name: "tb-eval",
    hint: "lower --batch, or free memory",
};

fn main() -> ExitCode {
    match parse_args::<Args>("tb-eval") {
        Ok(mut args) => {
            args.threads = set_threads(args.threads);
            run_main("tb-eval", || with_big_stack(move || run(args)))
        }
        Err(code) => code,
    }
}

fn run(a: Args) -> Result<()> {
    if a.version {
        println!("tb-eval {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let model = tinybit::models::resolve(a.model)?;
    let task = Task::parse(&a.task)?;
    let opts = EvalOptions {
        model,
        task,
        files: a.files,
        tokenizer: a.tokenizer,
        chunk: a.chunk,
        batch: a.batch,
        threads: a.threads,
        max_tokens: a.max_tokens,
        json: a.json,
        quiet: a.quiet,
        output: a.output,
        device: a.device,
        unconstrained: a.unconstrained,
        copy_bias: a.copy_bias,
        fail_above: a
            .fail_above
            .iter()
            .map(|s| eval::parse_threshold(s))
            .collect::<Result<_>>()?,
        fail_below: a
            .fail_below
            .iter()
            .map(|s| eval::parse_threshold(s))
            .collect::<Result<_>>()?,
    };
    let misses = eval::run(&opts)?;
    if misses.is_empty() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "threshold missed: {}",
            misses.join("; ")
        )))
    }
}
