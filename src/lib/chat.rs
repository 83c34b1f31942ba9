//! A chat session: the prompt template (byte for byte what training renders), the family's system
//! prompt, turns carried in the recurrent state, and the tool loop — a `<|tool_call|>` from the
//! model runs through the tool registry and its result is injected before generation continues.
//! The REPL, pipe mode and `--json` of `tb-chat` are thin layers over this.

use crate::checkpoint::TEMPLATE_RWKV;
use crate::constrain::CallConstraint;
use crate::engine::{Engine, EngineState};
use crate::error::{Error, Result};
use crate::generate::{Event, GenOptions, GenStats, Generation, StopReason};
use crate::sample::{Sampler, SamplerConfig};
use crate::template::{self, Message};
use crate::tokenizer::{Special, Tokenizer};
use crate::tools::Registry;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a turn produces, in order, for the caller to print or serialise.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatEvent {
    /// A piece of the reply's text.
    Delta(String),
    /// The model called a tool (`args` is null when the call could not be parsed).
    ToolCall {
        tool: Option<String>,
        args: serde_json::Value,
        raw: String,
    },
    /// What was injected as the tool's answer (a JSON value's text).
    ToolResult(String),
}

/// The outcome of one turn.
#[derive(Clone, Debug)]
pub struct Reply {
    pub text: String,
    pub stop: StopReason,
    pub stats: GenStats,
    pub tool_calls: usize,
}

/// Settings of a session.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// `None`: the family's default system prompt from the checkpoint's config.
    pub system: Option<String>,
    pub sampler: SamplerConfig,
    pub generation: GenOptions,
    /// Tool calls allowed per turn; past it the model is answered with an error.
    pub max_tool_calls: usize,
    /// `--unconstrained`: the model writes tool calls without `constrain`'s mask.
    pub unconstrained: bool,
}

pub struct Session {
    engine: Engine,
    tok: Tokenizer,
    template: String,
    system: String,
    tools: Option<Registry>,
    state: EngineState,
    sampler: Sampler,
    opts: ChatOptions,
    messages: Vec<Message>,
    /// Whether the state holds an earlier turn (a previous reply, or a loaded state).
    has_history: bool,
    /// Where conversations start when not from zeros (`--state-in`).
    base: Option<EngineState>,
}

impl Session {
    /// `tools`: the registry the model may call (`None` with `--no-tools`, or when the
    /// tokenizer has no tool markers).
    pub fn new(
        engine: Engine,
        tok: Tokenizer,
        tools: Option<Registry>,
        mut opts: ChatOptions,
    ) -> Result<Session> {
        let meta = engine.meta().clone();
        let tools = tools.filter(|_| {
            tok.special_id(Special::ToolCall).is_some() && meta.template != TEMPLATE_RWKV
        });
        let system = opts
            .system
            .clone()
            .unwrap_or_else(|| meta.config.family.system_prompt.clone());
        let state = engine.new_state();
        if let Some(r) = tools.as_ref().filter(|_| !opts.unconstrained) {
            opts.generation.constraint = Some(Arc::new(CallConstraint::new(r, &tok)));
        }
        Ok(Session {
            sampler: Sampler::new(opts.sampler.clone())?,
            engine,
            tok,
            template: meta.template,
            system,
            tools,
            state,
            opts,
            messages: Vec::new(),
            has_history: false,
            base: None,
        })
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn system(&self) -> &str {
        &self.system
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// The tools the model is told about (empty when tools are off).
    pub fn tool_lines(&self) -> Vec<String> {
        match &self.tools {
            Some(r) if !r.names().is_empty() => vec![r.prompt_lines()],
            _ => Vec::new(),
        }
    }

    pub fn tools(&self) -> Option<&Registry> {
        self.tools.as_ref()
    }

    /// Forgets the conversation: a fresh state, no history (the system prompt stays).
    /// Every conversation starts from the base state: zeros, or the one given to `set_state`
    /// (`--state-in`), so independent piped prompts each continue that saved conversation.
    pub fn reset(&mut self) {
        self.state = self.base.clone().unwrap_or_else(|| self.engine.new_state());
        self.messages.clear();
        self.has_history = self.base.is_some();
        self.sampler.clear_history();
    }

    /// A new system prompt; the conversation restarts.
    pub fn set_system(&mut self, text: &str) {
        self.system = text.to_string();
        self.reset();
    }

    /// Continues from a saved state (`--state-in`); the transcript before it is not known.
    pub fn set_state(&mut self, state: EngineState) {
        // A state saved after a finished turn: the next turn starts with the turn separator.
        self.base = Some(state);
        self.reset();
    }

    /// Tokens that bring the state to an open assistant turn after `user`. The first turn renders
    /// the system prompt, tool list and user message; later turns (or a loaded state) continue
    /// after the previous reply with exactly the text training puts there — the turn separator
    /// and the user turn as one piece — so the ids equal those of a full rendering.
    fn turn_tokens(&self, user: &str) -> Result<Vec<u32>> {
        let rwkv = self.template == TEMPLATE_RWKV;
        if !self.has_history {
            let mut msgs = Vec::new();
            if !self.system.is_empty() {
                msgs.push(Message::new("system", &self.system));
            }
            msgs.push(Message::new("user", user));
            let spans = if rwkv {
                template::render_rwkv(&msgs, true)?
            } else {
                template::render(&msgs, &self.tool_lines(), true)?
            };
            return Ok(template::to_tokens(&spans, &self.tok)?.0);
        }
        let one = [Message::new("user", user)];
        let spans = if rwkv {
            template::render_rwkv(&one, true)?
        } else {
            template::render(&one, &[], true)?
        };
        // The state ends at a closed turn (see `close_turn`); tinybit's separator follows the
        // `<|endoftext|>`, official models' blank line is already in the state.
        let sep = if rwkv { "" } else { "\n\n" };
        self.tok
            .encode(&format!("{sep}{}", template::to_string(&spans)))
    }

    /// One user turn: generates the reply, running tools the model calls, and calls `on` with
    /// every event as it happens.
    pub fn turn(
        &mut self,
        user: &str,
        on: &mut dyn FnMut(ChatEvent) -> Result<()>,
    ) -> Result<Reply> {
        let prompt = self.turn_tokens(user)?;
        let mut gen_opts = self.opts.generation.clone();
        // What a tool call may quote: this turn and the earlier ones.
        gen_opts.quotable = crate::constrain::quotable(&self.messages) + "\n" + user;
        if self.template == TEMPLATE_RWKV {
            // Official models end a reply with a blank line.
            gen_opts.stop.push("\n\n".into());
        }
        self.sampler.clear_history();
        let reply = run_generation(
            &mut self.engine,
            &mut self.state,
            &mut self.sampler,
            &self.tok,
            &prompt,
            gen_opts,
            self.tools.as_ref(),
            self.opts.max_tool_calls,
            on,
        )?;
        self.close_turn(&reply.stop)?;
        self.has_history = true;
        self.messages.push(Message::new("user", user));
        self.messages.push(Message::new("assistant", &reply.text));
        Ok(reply)
    }

    /// Ends the assistant turn in the state as training's rendering does, when generation stopped
    /// short of it (length or a stop string): `<|endoftext|>` for tinybit, the blank line for
    /// official models. The state then always sits at a turn boundary, so a saved state and a
    /// continued conversation are the same thing.
    fn close_turn(&mut self, stop: &StopReason) -> Result<()> {
        let closing = if self.template == TEMPLATE_RWKV {
            match stop {
                StopReason::StopString(s) if s == "\n\n" => Vec::new(),
                _ => self.tok.encode("\n\n")?,
            }
        } else if *stop == StopReason::EndOfText {
            Vec::new()
        } else {
            vec![
                self.tok
                    .special_id(Special::EndOfText)
                    .ok_or_else(|| Error::Data("the tokenizer has no <|endoftext|>".into()))?,
            ]
        };
        if !closing.is_empty() {
            self.engine.prefill(&closing, &mut self.state)?;
        }
        Ok(())
    }

    /// Plain completion (`--raw`): the prompt as given, no template, no tools.
    pub fn complete_raw(
        &mut self,
        prompt: &str,
        on: &mut dyn FnMut(ChatEvent) -> Result<()>,
    ) -> Result<Reply> {
        let ids = self.tok.encode(prompt)?;
        if ids.is_empty() {
            return Err(Error::usage("the prompt is empty"));
        }
        run_generation(
            &mut self.engine,
            &mut self.state,
            &mut self.sampler,
            &self.tok,
            &ids,
            self.opts.generation.clone(),
            None,
            0,
            on,
        )
    }

    /// `/save FILE`: the conversation as JSON Lines messages, and the state in `FILE.state`.
    pub fn save(&self, path: &Path) -> Result<PathBuf> {
        let mut text = String::new();
        if !self.system.is_empty() {
            // Cannot fail (here and below): a message of strings always serialises.
            text.push_str(&serde_json::to_string(&Message::new("system", &self.system)).unwrap());
            text.push('\n');
        }
        for m in &self.messages {
            text.push_str(&serde_json::to_string(m).unwrap());
            text.push('\n');
        }
        crate::fsutil::write_atomic(path, text.as_bytes())?;
        let state_path = state_path_for(path);
        self.state.save(&state_path, self.engine.config())?;
        Ok(state_path)
    }

    /// `/load FILE`: a conversation saved by `/save`, with its state.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "reading conversation", e))?;
        let mut messages = Vec::new();
        let mut system = None;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let m: Message = serde_json::from_str(line).map_err(|e| {
                Error::Data(format!("{}:{}: not a message: {e}", path.display(), i + 1))
            })?;
            if m.role == "system" && messages.is_empty() {
                system = Some(m.content);
            } else {
                messages.push(m);
            }
        }
        let state = EngineState::load(&state_path_for(path), self.engine.config())?;
        if let Some(s) = system {
            self.system = s;
        }
        self.state = state;
        self.has_history = !messages.is_empty();
        self.messages = messages;
        Ok(())
    }
}

/// Where `/save FILE` puts the state: beside it, `FILE.state`.
pub fn state_path_for(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".state");
    PathBuf::from(s)
}

/// Runs the generation loop, answering tool calls through `tools` (at most `max_calls`).
#[allow(clippy::too_many_arguments)]
fn run_generation(
    engine: &mut Engine,
    state: &mut EngineState,
    sampler: &mut Sampler,
    tok: &Tokenizer,
    prompt: &[u32],
    gen_opts: GenOptions,
    tools: Option<&Registry>,
    max_calls: usize,
    on: &mut dyn FnMut(ChatEvent) -> Result<()>,
) -> Result<Reply> {
    let mut run = Generation::new(engine, state, sampler, tok, prompt, gen_opts)?;
    let (mut text, mut calls, mut stop) = (String::new(), 0usize, StopReason::EndOfText);
    while let Some(ev) = run.next() {
        match ev? {
            Event::Text(s) => {
                text.push_str(&s);
                on(ChatEvent::Delta(s))?;
            }
            Event::ToolCall { raw, call } => {
                calls += 1;
                let (tool, args) = match &call {
                    Ok(c) => (Some(c.tool.clone()), c.args.clone()),
                    Err(_) => (None, serde_json::Value::Null),
                };
                on(ChatEvent::ToolCall {
                    tool,
                    args,
                    raw: raw.clone(),
                })?;
                let answer = match (tools, call) {
                    (None, _) => json!({"error": "tools are off in this session"}),
                    (Some(_), _) if calls > max_calls => {
                        json!({"error": format!("tool call limit ({max_calls} per turn) reached; answer without tools")})
                    }
                    (Some(_), Err(why)) => json!({"error": why}),
                    (Some(r), Ok(c)) => match r.call(&c.tool, &c.args) {
                        Ok(v) => v,
                        Err(e) => json!({"error": e}),
                    },
                };
                run.inject_tool_result(&answer.to_string())?;
            }
            Event::ToolResult(r) => on(ChatEvent::ToolResult(r))?,
            Event::Stop(r) => stop = r,
        }
    }
    Ok(Reply {
        text,
        stop,
        stats: run.stats().clone(),
        tool_calls: calls,
    })
}

/// A pipe-mode input line: plain text, or `{"prompt": ..., "system": ...}`.
pub struct PipeLine {
    pub prompt: String,
    pub system: Option<String>,
}

/// Parses one pipe-mode line (tb-chat reads them on stdin, `tb-eval --task gen` from its prompt
/// file).
pub fn parse_line(line: &str) -> std::result::Result<PipeLine, String> {
    let t = line.trim();
    if t.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(t).map_err(|e| format!("malformed JSON line: {e}"))?;
        let prompt = v
            .get("prompt")
            .and_then(|p| p.as_str())
            .ok_or("a JSON line needs a \"prompt\" string")?;
        let system = match v.get("system") {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => Some(s.as_str().ok_or("\"system\" must be a string")?.to_string()),
        };
        return Ok(PipeLine {
            prompt: prompt.to_string(),
            system,
        });
    }
    Ok(PipeLine {
        prompt: line.to_string(),
        system: None,
    })
}

/// What a REPL line asks for.
#[derive(Debug, PartialEq)]
pub enum ReplAction {
    /// Send it to the model.
    Say(String),
    /// A slash command ran; print this (may be empty).
    Done(String),
    Quit,
}

pub const REPL_HELP: &str = "\
/help           this help
/reset          forget the conversation (fresh state)
/system TEXT    set the system prompt and start over
/save FILE      save the conversation (JSON Lines) and its state (FILE.state)
/load FILE      load a conversation saved with /save
/tools          list the tools the model may call
/quit           leave (also Ctrl-D)";

/// Runs a slash command (the REPL's loop calls this for every line).
pub fn repl_command(session: &mut Session, line: &str) -> Result<ReplAction> {
    let t = line.trim();
    if !t.starts_with('/') {
        return Ok(ReplAction::Say(line.to_string()));
    }
    let (cmd, arg) = t
        .split_once(char::is_whitespace)
        .map_or((t, ""), |(c, a)| (c, a.trim()));
    let need = |what: &str| -> Result<&str> {
        if arg.is_empty() {
            Err(Error::usage(format!("{cmd} needs {what}")))
        } else {
            Ok(arg)
        }
    };
    Ok(match cmd {
        "/help" => ReplAction::Done(REPL_HELP.into()),
        "/reset" => {
            session.reset();
            ReplAction::Done("(conversation reset)".into())
        }
        "/system" => {
            session.set_system(need("the new system prompt")?);
            ReplAction::Done("(system prompt set; conversation reset)".into())
        }
        "/save" => {
            let path = PathBuf::from(need("a file name")?);
            let state = session.save(&path)?;
            ReplAction::Done(format!(
                "(saved {} and {})",
                path.display(),
                state.display()
            ))
        }
        "/load" => {
            let path = PathBuf::from(need("a file name")?);
            session.load(&path)?;
            ReplAction::Done(format!(
                "(loaded {} messages from {})",
                session.messages().len(),
                path.display()
            ))
        }
        "/tools" => ReplAction::Done(match session.tools() {
            Some(r) if !r.names().is_empty() => r.prompt_lines(),
            _ => "(tools are off)".into(),
        }),
        "/quit" | "/exit" => ReplAction::Quit,
        other => {
            return Err(Error::usage(format!(
                "unknown command {other}; /help lists them"
            )));
        }
    })
}
