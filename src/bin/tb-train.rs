//! tb-train: train an RWKV-7 model from a model config and a train config.

use argh::FromArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tinybit::cli::{config_threads, parse_args, parse_set, run_main, set_threads, with_big_stack};
use tinybit::config::ModelConfig;
use tinybit::error::{Error, Result};
use tinybit::train::{self, RunOptions, config::TrainConfig};

#[derive(FromArgs, argh::ArgsInfo)]
/// Train (or resume training) an RWKV-7 model. Progress is JSON Lines on stdout.
struct Args {
    /// model architecture (TOML), e.g. configs/micro.toml
    #[argh(option)]
    model_config: Option<PathBuf>,
    /// training settings (TOML), e.g. configs/train-micro-l4.toml
    #[argh(option)]
    train_config: Option<PathBuf>,
    /// run directory for checkpoints and train.jsonl (default runs/NAME)
    #[argh(option)]
    out: Option<PathBuf>,
    /// continue from the newest complete checkpoint in --out (safe to repeat)
    #[argh(switch)]
    resume: bool,
    /// start from this checkpoint's weights (fine-tuning; its config and tokenizer, new optimizer)
    #[argh(option)]
    init_from: Option<PathBuf>,
    /// with --init-from: a deeper model (more layers) than the checkpoint, its new layers starting as identity
    #[argh(switch)]
    grow: bool,
    /// prove the pipeline on the CPU in about a minute: tiny model, bundled text, a few dozen steps
    #[argh(switch)]
    smoke_test: bool,
    /// override a config value, key=value (repeatable; model.KEY or train.KEY to disambiguate)
    #[argh(option)]
    set: Vec<String>,
    /// stop with a checkpoint after this many seconds
    #[argh(option)]
    max_time: Option<f64>,
    /// CPU threads (default: all cores)
    #[argh(option, short = 't', default = "0")]
    threads: usize,
    /// auto (default: the GPU when built with cuda and present), cpu or cuda[:N]
    #[argh(option)]
    device: Option<String>,
    /// no progress bar or notes on stderr
    #[argh(switch, short = 'q')]
    quiet: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// A step too big for the memory left (the estimate checked first is a lower bound) ends with
/// exit 74 and a message, not an abort.
#[global_allocator]
static ALLOC: tinybit::cli::ExitOnOom = tinybit::cli::ExitOnOom {
    name: "tb-train",
    hint: "lower batch_size or ctx_len (grad_accum adds tokens a step without adding memory), or free memory",
};

fn main() -> ExitCode {
    match parse_args::<Args>("tb-train") {
        Ok(mut args) => {
            args.threads = set_threads(args.threads);
            run_main("tb-train", || with_big_stack(move || run(args)))
        }
        Err(code) => code,
    }
}

fn run(args: Args) -> Result<()> {
    if args.version {
        println!("tb-train {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let Some(tpath) = &args.train_config else {
        return Err(Error::usage("--train-config is required"));
    };
    if args.grow && args.init_from.is_none() {
        return Err(Error::usage("--grow needs --init-from"));
    }
    if args.smoke_test && args.init_from.is_some() {
        return Err(Error::usage(
            "--smoke-test and --init-from do not go together",
        ));
    }
    // The model: its config, or the --init-from checkpoint's (whose architecture wins).
    let (model, name_from) = match (&args.model_config, &args.init_from) {
        (Some(m), _) => (ModelConfig::load(m)?, m),
        (None, Some(ck)) => (tinybit::checkpoint::read_meta(ck)?.config, ck),
        (None, None) => {
            return Err(Error::usage(
                "--model-config (or --init-from) and --train-config are required",
            ));
        }
    };
    let out = args.out.clone().unwrap_or_else(|| {
        let name = name_from
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "run".into());
        PathBuf::from("runs").join(if args.smoke_test {
            format!("{name}-smoke")
        } else {
            name
        })
    });
    let train_text =
        std::fs::read_to_string(tpath).map_err(|e| Error::io(tpath, "reading train config", e))?;
    let train: TrainConfig = if args.smoke_test {
        // The smoke test replaces the data paths, so the config's own may not exist yet.
        toml::from_str(&train_text)
            .map_err(|e| Error::Data(format!("train config {}: {e}", tpath.display())))?
    } else {
        TrainConfig::load(tpath)?
    };
    let (mut model, mut train) = train::split_overrides(&model, &train, &parse_set(&args.set)?)?;
    config_threads(args.threads, train.threads);
    // A device that is not there fails before anything is written.
    let device = args.device.clone().unwrap_or_else(|| train.device.clone());
    let dev = tinybit::device::open(if args.smoke_test && args.device.is_none() {
        "cpu"
    } else {
        &device
    })?;
    // So does a step too big for it (the smoke test brings its own small sizes).
    if !args.smoke_test {
        train::check_memory(&model, &train, tinybit::device::memory_bytes(&dev))?;
    }
    // Locked before the smoke test writes its data into it.
    let dir = train::RunDir::open(&out, args.resume)?;
    if args.smoke_test {
        (model, train) = train::smoke::prepare(&model, &train, dir.path())?;
    }
    // After the smoke test's own settings (the CPU), so `--smoke-test --device cuda` works.
    if let Some(d) = &args.device {
        train.device = d.clone();
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::Io(format!("installing signal handler: {e}")))?;
    }
    if !args.quiet {
        eprintln!(
            "tb-train: {} layers, d_model {}, vocab {} ({:.1}M parameters) → {}",
            model.n_layer,
            model.d_model,
            model.vocab_size,
            model.param_count() as f64 / 1e6,
            out.display()
        );
    }
    let opts = RunOptions {
        model,
        train,
        dir,
        resume: args.resume,
        init_from: args.init_from,
        grow: args.grow,
        max_time: args.max_time,
        quiet: args.quiet,
        stop,
    };
    if let Some(path) = train::run(opts)?
        && !args.quiet
    {
        eprintln!("tb-train: last checkpoint {}", path.display());
    }
    Ok(())
}
