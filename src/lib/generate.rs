//! The one generation loop every generating command uses: an iterator of `Event`s.
//!
//! ```text
//! let mut gen = Generation::new(&mut engine, &mut state, &mut sampler, &tok, &prompt, opts)?;
//! while let Some(ev) = gen.next() {
//!     match ev? {
//!         Event::Text(s) => print!("{s}"),
//!         Event::ToolCall { call, .. } => gen.inject_tool_result(&run(call))?,
//!         Event::ToolResult(_) => {}
//!         Event::Stop(reason) => eprintln!("[{}]", reason.as_str()),
//!     }
//! }
//! ```
//!
//! - Text comes out as soon as it is complete UTF-8 (`StreamDecoder`) and cannot be the start of a
//!   stop string; the stop string itself is never shown.
//! - `<|tool_call|>{json}<|end_tool_call|>` in the generated ids (the tokenizer's special ids) is
//!   not shown as text: it becomes one `ToolCall` event. The caller runs the tool and answers with
//!   `inject_tool_result` (or injects nothing); generation then continues after the injected tokens.
//! - Every token enters the state: when the iterator ends, `state` holds the prompt, the generated
//!   tokens (the final one included: `<|endoftext|>`, the token that completed a stop string, or
//!   the last one allowed by `max_tokens`) and whatever was injected.
//! - Every token that enters the model is also given to the sampler's penalty window.

use crate::constrain::{CallConstraint, Scan};
use crate::engine::{Engine, EngineState};
use crate::error::{Error, Result};
use crate::sample::Sampler;
use crate::tokenizer::{Special, StreamDecoder, Tokenizer};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `--copy-bias`'s default: chosen on the second held-out sample of the bundled assistant's
/// tool conversations (answers holding the tool's result: 0.771 without, 0.864 / 0.883 / 0.879
/// at 6 / 12 / 20, before the results of a turn's earlier calls were searched too and digits
/// and dashes inside a value could follow a word, which made 12 give 0.903); far above a near
/// tie, yet a token the model is sure of still wins.
pub const DEFAULT_COPY_BIAS: f32 = 12.0;

/// Limits of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenOptions {
    /// `-n/--max-tokens`: sampled tokens at most (tool-call tokens count); `None` = no limit.
    pub max_tokens: Option<usize>,
    /// `--stop`: generation ends when the text contains one of these (empty strings are ignored).
    pub stop: Vec<String>,
    /// What a tool call may be (`constrain`); `None`: whatever the model writes.
    pub constraint: Option<Arc<CallConstraint>>,
    /// The text its quoted arguments may copy: what the user said, this turn and the earlier
    /// ones (`constrain::quotable`; not the system prompt, tool results or the model's replies).
    pub quotable: String,
    /// After a tool result, outside a call: added to the logit of every token that continues a
    /// copy of the result (`Generation::copy_logits`); 0 = off.
    pub copy_bias: f32,
}

/// A parsed tool call: `{"tool": NAME, "args": {...}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub tool: String,
    /// The arguments object (`{}` when the call has none).
    pub args: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced `<|endoftext|>`.
    EndOfText,
    /// The text reached this stop string.
    StopString(String),
    /// `max_tokens` tokens were sampled.
    MaxTokens,
}

impl StopReason {
    /// The name used in JSON records (`"stop"` reason field).
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::EndOfText => "eos",
            StopReason::StopString(_) => "stop",
            StopReason::MaxTokens => "length",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Generated text (a piece of a reply).
    Text(String),
    /// The model called a tool. `raw` is the text between the markers; `call` is its parse, or why
    /// it is not a valid call (the caller answers that with `{"error": ...}`).
    ToolCall {
        raw: String,
        call: std::result::Result<ToolCall, String>,
    },
    /// A result the caller injected with `inject_tool_result`, in stream order.
    ToolResult(String),
    /// The end of the generation; nothing follows.
    Stop(StopReason),
}

/// Parses a tool call's JSON text.
pub fn parse_tool_call(raw: &str) -> std::result::Result<ToolCall, String> {
    let v: serde_json::Value = serde_json::from_str(raw.trim())
        .map_err(|e| format!("the tool call is not valid JSON ({e}): {raw}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("the tool call is not a JSON object: {raw}"))?;
    let tool = obj
        .get("tool")
        .and_then(|t| t.as_str())
        .ok_or_else(|| format!("the tool call has no \"tool\" name: {raw}"))?
        .to_string();
    let args = match obj.get("args") {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(a @ serde_json::Value::Object(_)) => a.clone(),
        Some(_) => return Err(format!("the tool call's \"args\" is not an object: {raw}")),
    };
    Ok(ToolCall { tool, args })
}

/// Token ids → events: UTF-8-safe text, held back while it may be the start of a stop string;
/// tool calls cut out of the text; the end-of-text token and stop strings end the stream.
/// The part of the loop that does not need a model, usable on its own (e.g. to replay ids).
pub struct OutputParser {
    tok: Tokenizer,
    dec: StreamDecoder,
    eot: Option<u32>,
    call_open: Option<u32>,
    call_close: Option<u32>,
    stops: Vec<String>,
    /// Text decoded but not yet emitted (a possible stop-string prefix).
    held: String,
    /// Bytes of the tool call being read, between its markers.
    call: Option<Vec<u8>>,
    stopped: bool,
}

impl OutputParser {
    pub fn new(tok: &Tokenizer, stops: &[String]) -> OutputParser {
        OutputParser {
            tok: tok.clone(),
            dec: tok.stream_decoder(),
            eot: tok.special_id(Special::EndOfText),
            call_open: tok.special_id(Special::ToolCall),
            call_close: tok.special_id(Special::EndToolCall),
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            call: None,
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text of the tool call being written (after `<|tool_call|>`), while one is open.
    pub fn open_call(&self) -> Option<&[u8]> {
        self.call.as_deref()
    }

    fn is_special(&self, id: u32) -> bool {
        Special::ALL
            .iter()
            .any(|&s| self.tok.special_id(s) == Some(id))
    }

    /// Adds one generated id; appends the events it completes to `out`.
    pub fn push(&mut self, id: u32, out: &mut VecDeque<Event>) {
        if self.stopped {
            return;
        }
        if Some(id) == self.eot {
            // A small model sometimes ends a call with end-of-text instead of its marker. A call
            // that parses is that call; one cut short is a failed call (its error goes back to
            // the model, which answers on), not a silent stop with an empty reply.
            if let Some(buf) = self.call.take() {
                let raw = String::from_utf8_lossy(&buf).into_owned();
                let call = parse_tool_call(&raw).map_err(|why| {
                    format!("the call ended with end-of-text before <|end_tool_call|>: {why}")
                });
                out.push_back(Event::ToolCall { raw, call });
                return;
            }
            self.finish(StopReason::EndOfText, out);
            return;
        }
        if let Some(buf) = &mut self.call {
            if Some(id) == self.call_close {
                let raw = String::from_utf8_lossy(buf).into_owned();
                self.call = None;
                let call = parse_tool_call(&raw);
                out.push_back(Event::ToolCall { raw, call });
            } else {
                buf.extend(self.tok.token_bytes(id));
            }
            return;
        }
        if Some(id) == self.call_open {
            self.flush_text(out);
            self.call = Some(Vec::new());
            return;
        }
        if self.is_special(id) {
            // A marker the model has no business writing here (a result, a stray end marker).
            return;
        }
        let piece = self.dec.push(id);
        self.held.push_str(&piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, s)) = found {
            let s = s.clone();
            self.held.truncate(at);
            self.emit_held(out);
            self.stopped = true;
            out.push_back(Event::Stop(StopReason::StopString(s)));
            return;
        }
        // Emit all but the longest tail that could still grow into a stop string.
        let keep = self.longest_stop_prefix_tail();
        let cut = self.held.len() - keep;
        if cut > 0 {
            let rest = self.held.split_off(cut);
            out.push_back(Event::Text(std::mem::replace(&mut self.held, rest)));
        }
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_stop_prefix_tail(&self) -> usize {
        let h = &self.held;
        (1..=h.len())
            .rev()
            .filter(|&n| h.is_char_boundary(h.len() - n))
            .find(|&n| {
                let tail = &h[h.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }

    fn emit_held(&mut self, out: &mut VecDeque<Event>) {
        if !self.held.is_empty() {
            out.push_back(Event::Text(std::mem::take(&mut self.held)));
        }
    }

    /// Emits everything held, an incomplete UTF-8 character as U+FFFD.
    fn flush_text(&mut self, out: &mut VecDeque<Event>) {
        let rest = self.dec.finish();
        self.held.push_str(&rest);
        self.emit_held(out);
    }

    /// Ends the stream for `reason`: held text is flushed, an unfinished tool call dropped.
    pub fn finish(&mut self, reason: StopReason, out: &mut VecDeque<Event>) {
        if self.stopped {
            return;
        }
        self.call = None;
        self.flush_text(out);
        self.stopped = true;
        out.push_back(Event::Stop(reason));
    }
}

/// Timings of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenStats {
    /// Tokens of the prompt (the first feed).
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    /// Tokens sampled.
    pub generated_tokens: usize,
    /// Time feeding generated and injected tokens and sampling.
    pub decode_time: Duration,
    /// From `Generation::new` to the first sampled token.
    pub time_to_first_token: Option<Duration>,
}

impl GenStats {
    pub fn prefill_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    pub fn decode_tok_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// One generation: prompt in, events out. See the module documentation.
pub struct Generation<'a> {
    engine: &'a mut Engine,
    state: &'a mut EngineState,
    sampler: &'a mut Sampler,
    tok: Tokenizer,
    parser: OutputParser,
    opts: GenOptions,
    /// Tokens to feed before the next sample: the prompt, the last sampled token, injections.
    pending: Vec<u32>,
    queue: VecDeque<Event>,
    /// Every token fed so far, in order.
    fed: Vec<u32>,
    /// `opts.quotable` as quoted arguments are checked against (`CallConstraint::source`).
    quote_source: Vec<u8>,
    /// The tool results' tokens of this generation, each after `u32::MAX` (a token of no text, so
    /// no run crosses from one result into the next), with their `copy_key`s, and the keys of
    /// the last (at most 8) tokens sampled since the last result (`copy_logits`). An answer after
    /// two calls may quote both results.
    result: Vec<u32>,
    result_keys: Vec<Vec<u8>>,
    since_result: Vec<Vec<u8>>,
    prompt_fed: bool,
    done: bool,
    started: Instant,
    stats: GenStats,
}

impl<'a> Generation<'a> {
    /// Starts a generation after `prompt` (at least one token: the next token's logits come from
    /// feeding it), continuing from `state`. Nothing runs until the first `next()`.
    pub fn new(
        engine: &'a mut Engine,
        state: &'a mut EngineState,
        sampler: &'a mut Sampler,
        tok: &Tokenizer,
        prompt: &[u32],
        opts: GenOptions,
    ) -> Result<Generation<'a>> {
        if prompt.is_empty() {
            return Err(Error::usage(
                "generation needs a prompt of at least one token",
            ));
        }
        let quote_source = match opts.constraint {
            Some(_) => CallConstraint::source(&opts.quotable),
            None => Vec::new(),
        };
        Ok(Generation {
            engine,
            state,
            sampler,
            tok: tok.clone(),
            parser: OutputParser::new(tok, &opts.stop),
            opts,
            pending: prompt.to_vec(),
            queue: VecDeque::new(),
            fed: Vec::new(),
            quote_source,
            result: Vec::new(),
            result_keys: Vec::new(),
            since_result: Vec::new(),
            prompt_fed: false,
            done: false,
            started: Instant::now(),
            stats: GenStats::default(),
        })
    }

    pub fn stats(&self) -> &GenStats {
        &self.stats
    }

    /// Every token fed into the state so far, in order: the prompt, sampled and injected tokens.
    /// Feeding these to a fresh copy of the starting state reproduces the current state.
    pub fn tokens(&self) -> &[u32] {
        &self.fed
    }

    /// Queues tokens to feed before generation continues (e.g. text the caller adds).
    pub fn inject(&mut self, tokens: &[u32]) {
        self.pending.extend_from_slice(tokens);
    }

    /// Answers a tool call: `<|tool_result|>` + `result` (a JSON value's text, encoded as untrusted
    /// text: markers inside it stay plain text) + `<|end_tool_result|>`; a `ToolResult` event
    /// follows in the stream.
    pub fn inject_tool_result(&mut self, result: &str) -> Result<()> {
        let id = |s: Special| {
            self.tok.special_id(s).ok_or_else(|| {
                Error::Data(format!(
                    "this model's tokenizer has no {} token, so it cannot take tool results; \
                     run without tools",
                    s.as_str()
                ))
            })
        };
        let (open, close) = (id(Special::ToolResult)?, id(Special::EndToolResult)?);
        let encoded = self.tok.encode(result)?;
        for id in std::iter::once(u32::MAX).chain(encoded.iter().copied()) {
            self.result.push(id);
            self.result_keys.push(self.copy_key(id));
        }
        self.since_result.clear();
        let mut toks = vec![open];
        toks.extend(&encoded);
        toks.push(close);
        self.inject(&toks);
        self.queue.push_back(Event::ToolResult(result.to_string()));
        Ok(())
    }

    /// Feeds the pending tokens (prefill for many, a step for one); the logits are then ready.
    fn feed(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        self.engine.prefill(&self.pending, self.state)?;
        for &id in &self.pending {
            self.sampler.accept(id);
        }
        self.fed.extend_from_slice(&self.pending);
        if self.prompt_fed {
            self.stats.decode_time += t0.elapsed();
        } else {
            self.prompt_fed = true;
            self.stats.prompt_tokens = self.pending.len();
            self.stats.prefill_time = t0.elapsed();
        }
        self.pending.clear();
        Ok(())
    }

    /// Samples one token and turns it into events.
    fn advance(&mut self) -> Result<()> {
        self.feed()?;
        if self
            .opts
            .max_tokens
            .is_some_and(|m| self.stats.generated_tokens >= m)
        {
            self.parser.finish(StopReason::MaxTokens, &mut self.queue);
            return Ok(());
        }
        let t0 = Instant::now();
        let id = if let Some(mask) = self.call_mask() {
            self.sampler.sample_masked(self.engine.logits(), &mask)?
        } else if let Some(logits) = self.copy_logits() {
            self.sampler.sample(&logits)?
        } else {
            self.sampler.sample(self.engine.logits())?
        };
        if !self.result.is_empty() {
            if self.since_result.len() == COPY_RUN {
                self.since_result.remove(0);
            }
            self.since_result.push(self.copy_key(id));
        }
        self.stats.decode_time += t0.elapsed();
        self.stats.generated_tokens += 1;
        self.stats
            .time_to_first_token
            .get_or_insert_with(|| self.started.elapsed());
        self.pending.push(id);
        self.parser.push(id, &mut self.queue);
        if self.parser.stopped() {
            // The final token enters the state too, so the state matches the transcript.
            self.feed()?;
        }
        Ok(())
    }

    /// After a tool result and outside a call, with `opts.copy_bias` set: the logits with the bias
    /// added to each token that continues a copy of the result (`copy_candidates`). A small model
    /// that has begun to copy a name or a list from the result tends to drift to a frequent word
    /// piece midway ("find the toolbox" → "find the findbox"); the bias holds it to the copy it
    /// began, and leaves the rest (where to start copying, whether to copy at all) to the model.
    fn copy_logits(&self) -> Option<Vec<f32>> {
        if self.opts.copy_bias <= 0.0 || self.parser.open_call().is_some() {
            return None;
        }
        let wordy = |k: &Vec<u8>| k.iter().any(|b| b.is_ascii_alphabetic() || *b >= 0x80);
        // What may follow: anything but the result's JSON structure (quotes, brackets, colons,
        // commas) and the underscores of identifiers ("America/Sao_Paulo"), so "HX-20931" is
        // copied whole but an answer is not walked out of a value or into a zone name.
        let inside = |k: &Vec<u8>| !k.is_empty() && !k.iter().any(|b| b"\"{}[]:,_".contains(b));
        let next = copy_candidates(&self.result_keys, &self.since_result, wordy, inside);
        if next.is_empty() {
            return None;
        }
        let mut logits = self.engine.logits().to_vec();
        for p in next {
            logits[self.result[p] as usize] += self.opts.copy_bias;
        }
        Some(logits)
    }

    /// What `copy_candidates` compares a token by: its text without a leading space, so that
    /// "buy" after a JSON quote in the result matches " buy" in the answer.
    fn copy_key(&self, id: u32) -> Vec<u8> {
        let b = self.tok.token_bytes(id);
        b.strip_prefix(b" ")
            .map_or_else(|| b.clone(), <[u8]>::to_vec)
    }

    /// Inside a tool call with `opts.constraint` set: which ids may come next (`constrain`).
    fn call_mask(&self) -> Option<Vec<bool>> {
        let (q, call) = (self.opts.constraint.as_ref()?, self.parser.open_call()?);
        Some(q.mask(&Scan::of(q, call), &self.quote_source, self.engine.logits()))
    }
}

/// The longest run of written tokens `copy_candidates` looks for in the results.
const COPY_RUN: usize = 8;

/// Where, in `result`, the tokens are that follow the longest run (up to 8 tokens) of
/// `written`'s last tokens found there, of those that may be copied (`inside`: not the result's
/// JSON structure); empty when there is no such run. Tokens are compared by a key
/// (`Generation::copy_key`). A run must hold a word piece (`wordy`), because a result's digits
/// and punctuation match everywhere ("974 × 59" → "974" found in "57466"'s "74").
pub fn copy_candidates<K: PartialEq>(
    result: &[K],
    written: &[K],
    wordy: impl Fn(&K) -> bool,
    inside: impl Fn(&K) -> bool,
) -> Vec<usize> {
    for l in (1..=written.len().min(COPY_RUN)).rev() {
        let tail = &written[written.len() - l..];
        if !tail.iter().any(&wordy) {
            break;
        }
        let mut found = false;
        let next: Vec<usize> = (l..result.len())
            .filter(|&p| result[p - l..p] == *tail)
            .inspect(|_| found = true)
            .filter(|&p| inside(&result[p]))
            .collect();
        if found {
            return next;
        }
    }
    Vec::new()
}

impl Iterator for Generation<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(Ok(ev));
            }
            if self.done || self.parser.stopped() {
                self.done = true;
                return None;
            }
            if let Err(e) = self.advance() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}
