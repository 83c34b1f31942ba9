//! tb-convert: import, re-save, quantize, average and inspect checkpoints. Flags only; the work is
//! in `tinybit::convert`.

use argh::FromArgs;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tinybit::cli::{run_main, stdout_err};
use tinybit::convert::{self, Options};
use tinybit::{Error, Result};

/// Convert a checkpoint: import an official RWKV-7 .pth or safetensors file, change the stored
/// dtype, pack the ternary-eligible matrices, average checkpoints, or describe one with --info.
#[derive(FromArgs, argh::ArgsInfo)]
struct Args {
    /// the checkpoint to read: a tinybit or official RWKV-7 safetensors file, or an official
    /// PyTorch .pth state_dict
    #[argh(option, short = 'i')]
    input: Option<PathBuf>,

    /// where to write the converted checkpoint (safetensors, written atomically)
    #[argh(option, short = 'o')]
    output: Option<PathBuf>,

    /// pack every ternary-eligible matrix (attention r/k/v/o, FFN key/value) to ternary
    /// {-1, 0, +1} with its absmean scale, five weights per byte
    #[argh(switch)]
    quantize: bool,

    /// storage type of the tensors that are not packed: f32, f16 or bf16 (default: the input's
    /// when all its parameters share one of these, else f32)
    #[argh(option)]
    dtype: Option<String>,

    /// attach this tokenizer (tokenizer.json or World vocabulary .txt) instead of the input's
    #[argh(option)]
    tokenizer: Option<PathBuf>,

    /// average the input's parameters with this checkpoint's (repeat the flag for more; equal
    /// weights): the same model, configuration and tokenizer, not packed
    #[argh(option)]
    average: Vec<PathBuf>,

    /// describe the input (architecture, parameters per part, dtypes, quantization, template,
    /// tokenizer) on stdout instead of converting it
    #[argh(switch)]
    info: bool,

    /// print the --info description, or the conversion report, as one JSON object
    #[argh(switch)]
    json: bool,

    /// print nothing on stderr except errors
    #[argh(switch, short = 'q')]
    quiet: bool,

    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

fn main() -> ExitCode {
    match tinybit::cli::parse_args::<Args>("tb-convert") {
        Ok(args) => run_main("tb-convert", || run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if args.version {
        return writeln!(out, "tb-convert {}", env!("CARGO_PKG_VERSION")).map_err(stdout_err);
    }
    let input = args
        .input
        .ok_or_else(|| Error::usage("--input FILE is required; see tb-convert --help"))?;
    if args.info {
        if args.output.is_some()
            || args.quantize
            || args.dtype.is_some()
            || !args.average.is_empty()
        {
            return Err(Error::usage(
                "--info only reads its input; drop --output, --quantize, --dtype and --average",
            ));
        }
        let info = convert::info(&input)?;
        let text = if args.json {
            // Cannot fail: a struct of strings and numbers always serialises.
            serde_json::to_string(&info).expect("info serialises") + "\n"
        } else {
            info.to_text()
        };
        return out.write_all(text.as_bytes()).map_err(stdout_err);
    }
    let output = args.output.ok_or_else(|| {
        Error::usage("--output FILE is required to convert (or use --info to inspect)")
    })?;
    let opts = Options {
        quantize: args.quantize,
        dtype: args
            .dtype
            .as_deref()
            .map(convert::parse_dtype)
            .transpose()?,
        tokenizer: args.tokenizer,
        average: args.average,
    };
    let report = convert::convert(&input, &output, &opts)?;
    if !args.quiet {
        eprintln!("tb-convert: {}", report.summary());
    }
    let line = if args.json {
        // Cannot fail: a struct of strings and numbers always serialises.
        serde_json::to_string(&report).expect("report serialises")
    } else {
        report.output.clone()
    };
    writeln!(out, "{line}").map_err(stdout_err)
}
