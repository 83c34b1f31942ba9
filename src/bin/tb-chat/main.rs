//! tb-chat: talk to a model — a REPL on a terminal, one prompt per line from a pipe, or `-p`.

mod front;

use argh::FromArgs;
use front::Output;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tinybit::chat::{ChatOptions, Session};
use tinybit::cli::{load_tokenizer, on_off, parse_args, run_main, set_threads};
use tinybit::engine::{Engine, EngineOptions, EngineState};
use tinybit::error::{Error, Result};
use tinybit::generate::GenOptions;
use tinybit::sample::SamplerConfig;
use tinybit::tools::{Options as ToolOptions, Registry};

#[derive(FromArgs, argh::ArgsInfo)]
/// Chat with an RWKV-7 model: a REPL on a terminal, one prompt per stdin line from a pipe, or -p.
struct Args {
    /// the checkpoint, or a NAME in $XDG_DATA_HOME/tinybit/models (default: $TINYBIT_MODEL, else
    /// the bundled assistant)
    #[argh(option, short = 'm')]
    model: Option<PathBuf>,
    /// tokenizer file, overriding the checkpoint's
    #[argh(option)]
    tokenizer: Option<PathBuf>,
    /// one prompt: answer it and exit
    #[argh(option, short = 'p')]
    prompt: Option<String>,
    /// read one prompt from this file (- for all of stdin)
    #[argh(option, short = 'f')]
    file: Option<PathBuf>,
    /// system prompt (default: the model family's)
    #[argh(option)]
    system: Option<String>,
    /// plain completion: no chat template, no tools
    #[argh(switch)]
    raw: bool,
    /// JSON Lines records on stdout: delta, tool_call, tool_result, message, stats, error
    #[argh(switch)]
    json: bool,
    /// piped lines are turns of one conversation instead of independent prompts
    #[argh(switch)]
    r#continue: bool,
    /// start from this state file
    #[argh(option)]
    state_in: Option<PathBuf>,
    /// save the final state to this file
    #[argh(option)]
    state_out: Option<PathBuf>,
    /// do not offer tools to the model
    #[argh(switch)]
    no_tools: bool,
    /// let the model write tool calls freely (by default a call must fit the tools' schemas, and
    /// an argument that quotes the conversation, such as a todo's text, the user's words)
    #[argh(switch)]
    unconstrained: bool,
    /// added to the logit of each token that continues the answer's copy of the turn's tool
    /// results (default 12; 0 turns it off)
    #[argh(option, default = "tinybit::generate::DEFAULT_COPY_BIAS")]
    copy_bias: f32,
    /// tool calls allowed per turn (default 4)
    #[argh(option, default = "4")]
    max_tool_calls: usize,
    /// the tools' SQLite database (default $XDG_DATA_HOME/tinybit/tools.db or TINYBIT_DB)
    #[argh(option)]
    db: Option<PathBuf>,
    /// temperature; 0 is greedy (default 0.8)
    #[argh(option, default = "0.8")]
    temp: f32,
    /// keep the K most likely tokens; 0 is off (default 40)
    #[argh(option, default = "40")]
    top_k: usize,
    /// nucleus sampling threshold; 1 is off (default 0.95)
    #[argh(option, default = "0.95")]
    top_p: f32,
    /// drop tokens below this fraction of the top probability; 0 is off (default 0.05)
    #[argh(option, default = "0.05")]
    min_p: f32,
    /// penalty on repeated tokens; 1 is off (default 1.0)
    #[argh(option, default = "1.0")]
    repeat_penalty: f32,
    /// penalty on tokens already present; 0 is off
    #[argh(option, default = "0.0")]
    presence_penalty: f32,
    /// penalty growing with each repetition; 0 is off
    #[argh(option, default = "0.0")]
    frequency_penalty: f32,
    /// most tokens generated per reply (default 512)
    #[argh(option, short = 'n', default = "512")]
    max_tokens: usize,
    /// sampling seed (default 0)
    #[argh(option, short = 's', default = "0")]
    seed: u64,
    /// stop when the reply contains this text (repeatable)
    #[argh(option)]
    stop: Vec<String>,
    /// CPU threads (default: all cores)
    #[argh(option, short = 't', default = "0")]
    threads: usize,
    /// on|off: the output head as 8-bit rows (default: on for packed ternary models)
    #[argh(option, from_str_fn(on_off))]
    head_q8: Option<bool>,
    /// cpu or auto (tb-chat decodes on the CPU; its engine has no GPU path yet)
    #[argh(option, default = "String::from(\"cpu\")")]
    device: String,
    /// list the models -m NAME finds, and exit
    #[argh(switch)]
    list_models: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

fn main() -> ExitCode {
    match parse_args::<Args>("tb-chat") {
        Ok(mut args) => {
            args.threads = set_threads(args.threads);
            run_main("tb-chat", || run(args))
        }
        Err(code) => code,
    }
}

fn run(a: Args) -> Result<()> {
    if a.version {
        println!("tb-chat {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let out = if a.json { Output::Json } else { Output::Text };
    if a.list_models {
        return front::list_models(out);
    }
    tinybit::device::require_cpu(&a.device, "tb-chat")?;
    let model = tinybit::models::resolve(a.model.clone())?;
    let engine = Engine::load(
        &model,
        &EngineOptions {
            threads: a.threads,
            head_q8: a.head_q8,
            ..Default::default()
        },
    )?;
    let tok = load_tokenizer(Some(&model), a.tokenizer.as_deref())?;
    let tools = (!a.no_tools && !a.raw).then(|| {
        Registry::standard(&ToolOptions {
            db: a.db.clone(),
            ..Default::default()
        })
    });
    let sampler = SamplerConfig {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        ..Default::default()
    };
    let opts = ChatOptions {
        system: a.system.clone(),
        sampler,
        generation: GenOptions {
            max_tokens: Some(a.max_tokens),
            stop: a.stop.clone(),
            copy_bias: a.copy_bias,
            ..Default::default()
        },
        max_tool_calls: a.max_tool_calls,
        unconstrained: a.unconstrained,
    };
    let mut session = Session::new(engine, tok, tools, opts)?;
    if let Some(p) = &a.state_in {
        session.set_state(EngineState::load(p, session.engine().config())?);
    }
    let one_shot = match (&a.prompt, &a.file) {
        (Some(_), Some(_)) => return Err(Error::usage("give -p or -f, not both")),
        (Some(p), None) => Some(p.clone()),
        (None, Some(f)) => Some(tinybit::fsutil::read_text(f, "reading prompt")?),
        (None, None) => None,
    };
    let mut failed = Vec::new();
    if let Some(prompt) = one_shot {
        front::answer(&mut session, &prompt, a.raw, out, None)?;
    } else if std::io::stdin().is_terminal() {
        front::repl(&mut session, a.raw)?;
    } else {
        failed = front::pipe(
            &mut session,
            std::io::stdin().lock(),
            a.raw,
            a.r#continue,
            out,
        )?;
    }
    if let Some(p) = &a.state_out {
        session.state().save(p, session.engine().config())?;
    }
    front::failed_lines(&failed, out).map_or(Ok(()), Err)
}
