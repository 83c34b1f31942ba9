//! tb-tok: text to token files and back, and tokenizer training.

use argh::FromArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use tinybit::cli::{load_tokenizer, parse_args, progress_bar, run_main};
use tinybit::error::{Error, Result};
use tinybit::tokenizer::Tokenizer;
use tinybit::tokfile::TokenFile;

#[derive(FromArgs, argh::ArgsInfo)]
/// Turn text into token files and back; train a tokenizer.
struct Args {
    #[argh(subcommand)]
    cmd: Option<Cmd>,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

#[derive(FromArgs, argh::ArgsInfo)]
#[argh(subcommand)]
enum Cmd {
    Encode(Encode),
    Decode(Decode),
    Train(Train),
    Count(Count),
    Toolchat(Toolchat),
}

#[derive(FromArgs, argh::ArgsInfo)]
/// Encode text files, directories or JSON Lines (a "text" field per line) into a token file.
#[argh(subcommand, name = "encode")]
struct Encode {
    /// the token file to write
    #[argh(option, short = 'o')]
    output: PathBuf,
    /// a tokenizer.json or RWKV World vocabulary file
    #[argh(option)]
    tokenizer: Option<PathBuf>,
    /// take the tokenizer from this checkpoint
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// also write a validation token file here
    #[argh(option)]
    val_output: Option<PathBuf>,
    /// fraction of the text that goes to --val-output (default 0.1)
    #[argh(option, default = "0.1")]
    val_fraction: f64,
    /// input files or directories
    #[argh(positional)]
    inputs: Vec<PathBuf>,
}

#[derive(FromArgs, argh::ArgsInfo)]
/// Decode a token file to text on stdout.
#[argh(subcommand, name = "decode")]
struct Decode {
    /// a tokenizer.json or RWKV World vocabulary file
    #[argh(option)]
    tokenizer: Option<PathBuf>,
    /// take the tokenizer from this checkpoint
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// the token file
    #[argh(positional)]
    input: PathBuf,
}

#[derive(FromArgs, argh::ArgsInfo)]
/// Train a byte-level BPE tokenizer (with tinybit's special tokens) on text.
#[argh(subcommand, name = "train")]
struct Train {
    /// vocabulary size, special tokens included
    #[argh(option)]
    vocab_size: usize,
    /// where to write tokenizer.json
    #[argh(option, short = 'o')]
    output: PathBuf,
    /// input files or directories
    #[argh(positional)]
    inputs: Vec<PathBuf>,
}

#[derive(FromArgs, argh::ArgsInfo)]
/// Print a token file's header as one JSON object.
#[argh(subcommand, name = "count")]
struct Count {
    /// the token file
    #[argh(positional)]
    input: PathBuf,
}

#[derive(FromArgs, argh::ArgsInfo)]
/// Generate synthetic tool-use conversations (SFT data) and held-out tool cases.
#[argh(subcommand, name = "toolchat")]
struct Toolchat {
    /// the directory to write train.jsonl, heldout.jsonl, cases.jsonl and train.txt into
    #[argh(option, short = 'o')]
    output: PathBuf,
    /// training conversations (default 20000)
    #[argh(option, default = "20000")]
    train: usize,
    /// held-out conversations (default 500)
    #[argh(option, default = "500")]
    heldout: usize,
    /// random seed (default 1)
    #[argh(option, default = "1")]
    seed: u64,
    /// take the system prompt from this model config (default: the general family's)
    #[argh(option)]
    model_config: Option<PathBuf>,
    /// build some training fillers from this tokenizer's word pieces
    #[argh(option)]
    tokenizer: Option<PathBuf>,
    /// build some training fillers from the word pieces of this model's tokenizer
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
}

fn main() -> ExitCode {
    match parse_args::<Args>("tb-tok") {
        Ok(args) => run_main("tb-tok", || run(args)),
        Err(code) => code,
    }
}

fn need_inputs(inputs: &[PathBuf]) -> Result<()> {
    if inputs.is_empty() {
        return Err(Error::usage("no input files given"));
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    if args.version {
        println!("tb-tok {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let Some(cmd) = args.cmd else {
        return Err(Error::usage(
            "missing command: encode, decode, train, count or toolchat (see tb-tok --help)",
        ));
    };
    match cmd {
        Cmd::Encode(a) => {
            need_inputs(&a.inputs)?;
            tinybit::data::check_val_fraction(a.val_fraction)?;
            let tok = load_tokenizer(a.model.as_deref(), a.tokenizer.as_deref())?;
            let val = a.val_output.as_deref().map(|p| (a.val_fraction, p));
            let bytes = tinybit::data::input_bytes(&a.inputs)?;
            let bar = progress_bar(bytes, tinybit::data::ENCODE_PROGRESS, false);
            let (h, hv) = tinybit::data::encode_to_file(&a.inputs, &tok, &a.output, val, &bar)?;
            let report = |p: &std::path::Path, h: &tinybit::tokfile::Header| {
                let (n, b) = (h.n_tokens, h.source_bytes);
                eprintln!("tb-tok: {}: {n} tokens from {b} bytes", p.display())
            };
            report(&a.output, &h);
            if let (Some(hv), Some(p)) = (hv, &a.val_output) {
                report(p, &hv);
            }
            println!("{}", a.output.display());
        }
        Cmd::Decode(a) => {
            let tok = load_tokenizer(a.model.as_deref(), a.tokenizer.as_deref())?;
            let out = std::io::BufWriter::new(std::io::stdout().lock());
            tinybit::data::decode_file(&a.input, &tok, out)?;
        }
        Cmd::Train(a) => {
            need_inputs(&a.inputs)?;
            let files = tinybit::data::expand_inputs(&a.inputs)?;
            let tok = Tokenizer::train_bpe(&files, a.vocab_size)?;
            tok.save(&a.output)?;
            eprintln!("tb-tok: trained {} tokens", tok.vocab_size());
            println!("{}", a.output.display());
        }
        Cmd::Toolchat(a) => {
            let system = match &a.model_config {
                Some(p) => tinybit::config::ModelConfig::load(p)?.family.system_prompt,
                None => tinybit::config::Family::default().system_prompt,
            };
            let vocab = match (&a.model, &a.tokenizer) {
                (None, None) => None,
                (m, t) => Some(load_tokenizer(m.as_deref(), t.as_deref())?),
            };
            let (dir, seed, system) = (&a.output, a.seed, &system);
            let w = tinybit::toolgen::write(dir, seed, a.train, a.heldout, system, vocab.as_ref())?;
            eprintln!(
                "tb-tok: {}: {} training and {} held-out conversations, {} cases",
                a.output.display(),
                w.train,
                w.heldout,
                w.cases
            );
            println!("{}", a.output.display());
        }
        Cmd::Count(a) => {
            let f = TokenFile::open(&a.input)?;
            let h = &f.header;
            let rec = serde_json::json!({
                "tokens": h.n_tokens, "source_bytes": h.source_bytes,
                "bytes_per_token": h.source_bytes as f64 / h.n_tokens.max(1) as f64,
                "token_bytes": h.token_bytes, "tokenizer_sha256": h.tokenizer_sha256,
            });
            println!("{rec}");
        }
    }
    Ok(())
}
