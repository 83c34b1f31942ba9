//! Synthetic tool-use conversations (SFT data) for the five built-in tools, and the held-out cases
//! `tb-eval --task tools` scores (`tb-tok toolchat`).
//!
//! Every gold call is run by the real tool registry — on a scratch database, with the clock stopped
//! at the conversation's `now` — and its real result is injected before the final answer, which
//! quotes that result. Conversations are rendered by the same template training and chat use.
//!
//! Held out by template *and* by entity: every phrasing list and every entity list (todo texts,
//! note topics, event titles, names) is split by index, one in five held out, so the held-out
//! conversations use sentences and names the training set never shows. Numbers, dates and times are
//! drawn fresh for each conversation. Time zones are a closed set the model has to know, so all of
//! them appear in training; so are the arithmetic words (`OPERATOR_WORDS`: "less", "half of", ...),
//! which training shows in frames of their own while the held-out templates stay unseen.
//!
//! A slot filled from a short list is memorised, not copied: a model trained on 40 names answers
//! "call Ursula" with one of them. So half of the training side's names and objects, and some whole
//! todo texts, are fillers that can only be copied: made-up words (`made_up`), and words of the
//! English corpora (`corpus_words`) so that copying is learnt over the tokens of real words too,
//! not only over made-up syllables (a model trained on syllables alone turns "hair dryer" into
//! "flyasya"). Words of held-out entities are never fillers.
//!
//! Given the model's tokenizer (`write`'s `vocab`: `tb-tok toolchat -m MODEL`), three in four
//! fillers are built from its word pieces instead (`vocab_word`), so that fine-tuning makes the
//! model write nearly every token it has. A token the assistant never writes in fine-tuning is
//! pushed down until the model cannot copy it: "toolbox" (" tool" "b" "ox") came out as "findbox",
//! and in 60,000 conversations the assistant had never written " tool". A piece may be part of a
//! held-out word; the held-out word itself is never a filler.

use crate::error::{Error, Result};
use crate::template::Message;
use crate::tools::{Registry, db::Store, time::fixed_clock};
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// Which side of the split a conversation is drawn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Heldout,
}

/// One in `HOLDOUT` of every phrasing and entity list is held out.
const HOLDOUT: usize = 5;

/// Whether entry `i` of a phrasing or entity list is held out (index % 5 == 4).
fn held_out(i: usize) -> bool {
    i % HOLDOUT == HOLDOUT - 1
}

/// Picks from the part of `list` that belongs to `split` ([`held_out`]).
fn pick<'a, T>(rng: &mut Draw, list: &'a [T], split: Split) -> &'a T {
    let part: Vec<&T> = list
        .iter()
        .enumerate()
        .filter(|(i, _)| held_out(*i) == (split == Split::Heldout))
        .map(|(_, t)| t)
        .collect();
    assert!(
        !part.is_empty(),
        "every list has at least {HOLDOUT} entries"
    );
    part[rng.random_range(0..part.len())]
}

/// Picks from a list that is not split (connectives, closed sets).
fn any<'a, T>(rng: &mut Draw, list: &'a [T]) -> &'a T {
    &list[rng.random_range(0..list.len())]
}

/// The generator's random numbers, and the tokenizer's word pieces a training filler may use
/// (none without a tokenizer).
struct Draw {
    rng: ChaCha8Rng,
    pieces: Option<Rc<Pieces>>,
}

impl Draw {
    /// Seeded like `ChaCha8Rng` on `stream`: the draws are the same as that generator's.
    fn new(seed: u64, stream: u64, pieces: Option<Rc<Pieces>>) -> Draw {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Draw { rng, pieces }
    }
}

impl rand::RngCore for Draw {
    fn next_u32(&mut self) -> u32 {
        self.rng.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.rng.fill_bytes(dst)
    }
}

/// A tokenizer's word pieces: those that start a word, capitalised (" Pa") or small (" hair"),
/// and the small ones that go on inside one ("aul").
struct Pieces {
    tok: crate::tokenizer::Tokenizer,
    capital: Vec<u32>,
    small: Vec<u32>,
    inner: Vec<u32>,
}

impl Pieces {
    /// The letter-only tokens of `tok` (ids ascending, so the draws depend on the vocabulary alone);
    /// an error when it lacks one of the three kinds (a vocabulary of digits, or of bytes only).
    fn of(tok: &crate::tokenizer::Tokenizer) -> Result<Pieces> {
        let mut p = Pieces {
            tok: tok.clone(),
            capital: Vec::new(),
            small: Vec::new(),
            inner: Vec::new(),
        };
        let lower = |b: &[u8]| !b.is_empty() && b.iter().all(u8::is_ascii_lowercase);
        for id in 0..tok.vocab_size() as u32 {
            match tok.token_bytes(id).as_slice() {
                [b' ', first, rest @ ..]
                    if first.is_ascii_uppercase() && (rest.is_empty() || lower(rest)) =>
                {
                    p.capital.push(id)
                }
                [b' ', rest @ ..] if lower(rest) => p.small.push(id),
                b if lower(b) => p.inner.push(id),
                _ => {}
            }
        }
        if p.capital.is_empty() || p.small.is_empty() || p.inner.is_empty() {
            return Err(Error::Data(format!(
                "the tokenizer has no word pieces to build fillers from ({} that start a capitalised \
                 word, {} a small one, {} inside a word): generate without --tokenizer/-m",
                p.capital.len(),
                p.small.len(),
                p.inner.len()
            )));
        }
        Ok(p)
    }
}

/// A word of one start piece and up to two inner ones (" P" + "aul" + "ic"), capitalised or not,
/// that the tokenizer splits into just those pieces (so each of them is copied in training),
/// and never a held-out entity's word. `None` when a few tries find none.
fn vocab_word(rng: &mut Draw, capital: bool) -> Option<String> {
    let p = rng.pieces.clone()?;
    let tok = &p.tok;
    for _ in 0..8 {
        let mut ids = vec![*any(rng, if capital { &p.capital } else { &p.small })];
        for _ in 0..*any(rng, &[0, 1, 1, 2]) {
            ids.push(*any(rng, &p.inner));
        }
        let text = tok.decode(&ids).ok()?;
        let word = text.trim_start();
        if word.len() <= 12
            && tok.encode(&text).ok()? == ids
            && !heldout_entity_words().contains(&word.to_lowercase())
        {
            return Some(word.to_string());
        }
    }
    None
}

/// A made-up word of two or three syllables ("dalvo", "quenrisa", "ostru"): training slots
/// filled with words no list holds teach copying, where a closed list of fillers teaches recall.
fn made_up(rng: &mut Draw) -> String {
    // The empty onsets give words that start with a vowel ("Ursula" must be copyable too).
    const ONSETS: &[&str] = &[
        "", "", "", "b", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l", "m",
        "n", "p", "pl", "qu", "r", "s", "sh", "st", "t", "tr", "v", "w", "y", "z",
    ];
    const NUCLEI: &[&str] = &["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"];
    const CODAS: &[&str] = &["", "", "", "n", "r", "l", "s", "m", "t", "nd", "st", "x"];
    let syllables = rng.random_range(2..4);
    (0..syllables)
        .map(|_| {
            format!(
                "{}{}{}",
                any(rng, ONSETS),
                any(rng, NUCLEI),
                any(rng, CODAS)
            )
        })
        .collect()
}

/// The English words a training filler draws from, less every word of a held-out entity (so the
/// held-out names and objects stay unseen). `assets/words.txt` holds the lowercase words of 3 to 10
/// letters that occur at least 5 times in `tests/data`'s three corpora, made by `cat
/// tests/data/{grimm,tinyshakespeare,wikitext2-valid}.txt | tr -cs 'A-Za-z' '\n' | grep -E
/// '^[a-z]{3,10}$' | LC_ALL=C sort | uniq -c | awk '$1>=5 {print $2}'`.
pub fn corpus_words() -> &'static [&'static str] {
    static WORDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    WORDS.get_or_init(|| {
        let held = heldout_entity_words();
        include_str!("assets/words.txt")
            .lines()
            .map(str::trim)
            .filter(|w| !w.is_empty() && !held.contains(*w))
            .collect()
    })
}

/// Every word, lowercased, of the held-out part of each entity list.
fn heldout_entity_words() -> &'static std::collections::HashSet<String> {
    static WORDS: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    WORDS.get_or_init(|| {
        let notes = NOTE_FACTS.iter().flat_map(|(q, t, b)| [*q, *t, *b]);
        let notes: Vec<&str> = notes.collect();
        let lists: [&[&str]; 4] = [NAMES, ITEMS, TODO_TEXTS, EVENTS];
        let mut texts: Vec<&str> = lists
            .iter()
            .flat_map(|l| {
                l.iter()
                    .enumerate()
                    .filter(|(i, _)| held_out(*i))
                    .map(|(_, t)| *t)
            })
            .collect();
        // A note fact is three strings: held out together, by the fact's index.
        texts.extend(
            notes
                .chunks(3)
                .enumerate()
                .filter(|(i, _)| held_out(*i))
                .flat_map(|(_, c)| c),
        );
        texts
            .iter()
            .flat_map(|t| t.split(|c: char| !c.is_ascii_alphabetic()))
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    })
}

/// A training filler word (`capital`: a name's): made up or from the English corpora, half each;
/// with the tokenizer's pieces, three in four are built from them instead (a piece must be drawn
/// often: fine-tuning sees about a quarter of 60,000 conversations).
fn filler(rng: &mut Draw, capital: bool) -> String {
    // Without pieces, nothing is drawn here: the data stay what they were without a tokenizer.
    if rng.pieces.is_some()
        && rng.random_bool(0.75)
        && let Some(w) = vocab_word(rng, capital)
    {
        return w;
    }
    let w = if rng.random_bool(0.5) {
        made_up(rng)
    } else {
        any(rng, corpus_words()).to_string()
    };
    if capital { capitalize(&w) } else { w }
}

/// A person's name: on the training side half are fillers, so the model learns to copy names.
fn name(rng: &mut Draw, split: Split) -> String {
    if split == Split::Train && rng.random_bool(0.5) {
        return filler(rng, true);
    }
    pick(rng, NAMES, split).to_string()
}

/// A household object: on the training side half are fillers (a word, two words, or a word before
/// a real object's last word, "dalvo lamp").
fn item(rng: &mut Draw, split: Split) -> String {
    if split == Split::Train && rng.random_bool(0.5) {
        let word = filler(rng, false);
        match rng.random_range(0..3) {
            0 => return word,
            1 => return format!("{word} {}", filler(rng, false)),
            _ => {}
        }
        let real = pick(rng, ITEMS, split);
        return format!("{word} {}", real.rsplit(' ').next().unwrap_or(real));
    }
    pick(rng, ITEMS, split).to_string()
}

/// The tool registry the generator and the evaluator run calls on: the built-ins over a scratch
/// database, in UTC, with the clock stopped at `now`.
pub struct Scratch {
    store: Arc<Store>,
}

impl Scratch {
    pub fn new(path: &Path) -> Scratch {
        Scratch {
            store: Arc::new(Store::at(path)),
        }
    }

    /// Empties the database (ids restart at 1) and returns the tools with their clock at `now`.
    pub fn reset(&self, now: DateTime<Utc>) -> Result<Registry> {
        self.store
            .with(|c| {
                c.execute_batch(
                    "DELETE FROM todos; DELETE FROM notes; DELETE FROM notes_fts; DELETE FROM events;
                     DELETE FROM sqlite_sequence;",
                )
            })
            .map_err(Error::Data)?;
        Ok(Registry::builtins(
            self.store.clone(),
            chrono_tz::UTC,
            fixed_clock(now),
        ))
    }
}

/// A generated conversation: its messages, the state its tools started from, and per assistant
/// turn what a scorer checks.
pub struct Generated {
    pub messages: Vec<Message>,
    pub now: DateTime<Utc>,
    /// Calls run before the conversation (earlier todos, notes, events).
    pub setup: Vec<Value>,
    pub turns: Vec<Turn>,
}

/// One assistant turn: where it starts in `messages`, the first call expected (`None`: answer
/// without a tool), and what the final answer must contain.
pub struct Turn {
    pub start: usize,
    pub expected: Option<Value>,
    pub answer_contains: Vec<String>,
}

struct Conv<'r> {
    reg: &'r Registry,
    messages: Vec<Message>,
    setup: Vec<Value>,
    turns: Vec<Turn>,
}

impl Conv<'_> {
    fn call_value(&self, tool: &str, args: &Value) -> Result<Value> {
        self.reg
            .call(tool, args)
            .map_err(|e| Error::Data(format!("toolchat: gold call {tool} {args} failed: {e}")))
    }

    /// Runs a call before the conversation (not shown to the model).
    fn setup(&mut self, tool: &str, args: Value) -> Result<Value> {
        let r = self.call_value(tool, &args)?;
        // "at": how many messages existed when it ran, so a replay runs it in the same order
        // relative to the conversation's own calls (ids, search scores depend on that order).
        self.setup
            .push(json!({"tool": tool, "args": args, "at": self.messages.len()}));
        Ok(r)
    }

    fn user(&mut self, text: &str) {
        self.messages.push(Message::new("user", text));
        self.turns.push(Turn {
            start: self.messages.len(),
            expected: None,
            answer_contains: Vec::new(),
        });
    }

    /// The assistant calls `tool`; the real result is injected and returned.
    fn call(&mut self, tool: &str, args: Value) -> Result<Value> {
        let r = self.call_value(tool, &args)?;
        let call = json!({"tool": tool, "args": args});
        // Cannot fail: the generator always opens a user turn before the assistant calls (generated data, no user input).
        let turn = self.turns.last_mut().expect("a user turn first");
        if turn.expected.is_none() && self.messages.len() == turn.start {
            turn.expected = Some(call.clone());
        }
        let mut m = Message::new("assistant", "");
        m.tool_call = Some(call);
        self.messages.push(m);
        self.messages.push(Message::new("tool", &r.to_string()));
        Ok(r)
    }

    /// The final answer of the turn; `contains` are the result facts a scorer looks for in it.
    fn answer(&mut self, text: &str, contains: &[String]) {
        self.messages.push(Message::new("assistant", text));
        // Cannot fail: as in `call`, an answer always follows a user turn.
        let turn = self.turns.last_mut().expect("a user turn first");
        turn.answer_contains.extend(contains.iter().cloned());
    }
}

// ---------------------------------------------------------------------------------------------
// Surface variation: politeness, casing, typos, punctuation.

/// Openers that fit any sentence (a question or a request).
const OPENERS: &[&str] = &[
    "",
    "",
    "",
    "",
    "hey, ",
    "hi! ",
    "quick one: ",
    "ok ",
    "so ",
    "tinybit, ",
];

/// Openers only a request takes ("please add ...", not "please what is ...").
const REQUEST_OPENERS: &[&str] = &["please ", "can you ", "could you ", "would you "];

/// Makes a request template sound like a person typed it: an opener, casing, a typo,
/// punctuation. Only the template's own words change: `{slots}` are filled afterwards, so values
/// reach the model exactly as the gold call has them.
fn surface(rng: &mut Draw, template: &str, question: bool) -> String {
    let mut s = template.to_string();
    if rng.random_bool(0.3) {
        s = typo(rng, &s);
    }
    let opener = if !question && rng.random_bool(0.3) {
        *any(rng, REQUEST_OPENERS)
    } else {
        *any(rng, OPENERS)
    };
    s = format!("{opener}{s}");
    let end = if question { "?" } else { "." };
    match rng.random_range(0..10) {
        0..=3 => s.push_str(end),
        4 => s.push_str(if question { "??" } else { "!" }),
        5 => s.push_str(" please"),
        6 => s.push_str(", thanks"),
        _ => {}
    }
    match rng.random_range(0..10) {
        0..=4 => capitalize(&s),
        5 => outside_slots(&s, str::to_uppercase),
        _ => outside_slots(&s, str::to_lowercase),
    }
}

/// A phrasing of `split` from `list`, surfaced.
fn ask(rng: &mut Draw, list: &[&str], split: Split, question: bool) -> String {
    let t = *pick(rng, list, split);
    surface(rng, t, question)
}

/// A phrasing from `list`'s part for `split`; on the training side, one time in three, one of
/// `more` instead: phrasings only training uses, so training sees more ways to ask while the
/// held-out phrasings stay the same and unseen.
fn phrasing<'a, T>(rng: &mut Draw, list: &'a [T], more: &'a [T], split: Split) -> &'a T {
    if split == Split::Train && rng.random_bool(1.0 / 3.0) {
        return any(rng, more);
    }
    pick(rng, list, split)
}

/// [`ask`] with training-only phrasings (`phrasing`).
fn ask_more(rng: &mut Draw, list: &[&str], more: &[&str], split: Split, question: bool) -> String {
    let t = *phrasing(rng, list, more, split);
    surface(rng, t, question)
}

/// Applies `f` to the text outside `{slot}` names.
fn outside_slots(s: &str, f: fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
        out.push_str(&f(&rest[..open]));
        out.push_str(&rest[open..close]);
        rest = &rest[close..];
    }
    out.push_str(&f(rest));
    out
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Swaps two neighbouring letters of one long word of the template text (never inside a value:
/// values are substituted after this runs, so they reach the model intact).
fn typo(rng: &mut Draw, s: &str) -> String {
    let words: Vec<&str> = s.split(' ').collect();
    let long: Vec<usize> = (0..words.len())
        .filter(|&i| {
            words[i].len() >= 5
                && words[i].chars().all(|c| c.is_ascii_lowercase())
                && !words[i].contains('{')
        })
        .collect();
    if long.is_empty() {
        return s.to_string();
    }
    let w = long[rng.random_range(0..long.len())];
    let mut chars: Vec<char> = words[w].chars().collect();
    let i = rng.random_range(1..chars.len() - 1);
    chars.swap(i, i + 1);
    let mut out: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    out[w] = chars.into_iter().collect();
    out.join(" ")
}

/// Fills `{name}` slots.
fn fill(template: &str, slots: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (k, v) in slots {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Numbers.

const NUMBER_WORDS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// How a user writes `n`: digits, with a thousands comma, or (small numbers) as a word.
fn say_number(rng: &mut Draw, n: i64) -> String {
    if (0..=20).contains(&n) && rng.random_bool(0.25) {
        return NUMBER_WORDS[n as usize].to_string();
    }
    if n.abs() >= 1000 && rng.random_bool(0.4) {
        let digits = n.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        return if n < 0 { format!("-{out}") } else { out };
    }
    n.to_string()
}

/// A number of a size people ask about: mostly 2–99, sometimes up to 9999.
fn number(rng: &mut Draw) -> i64 {
    match rng.random_range(0..10) {
        0..=5 => rng.random_range(2..100),
        6..=8 => rng.random_range(100..1000),
        _ => rng.random_range(1000..10000),
    }
}

/// The calculator's result as the JSON text it returns, when it is short enough to quote.
fn result_text(v: &Value) -> Option<String> {
    let s = v.to_string();
    (s.len() <= 10).then_some(s)
}

// ---------------------------------------------------------------------------------------------
// The calculator.

/// (operator word templates, expression form, how the answer restates it)
const ARITH: &[(&str, &str, char)] = &[
    ("what is {a} plus {b}", "{a}+{b}", '+'),
    ("what's {a} times {b}", "{a}*{b}", '*'),
    ("calculate {a} minus {b}", "{a}-{b}", '-'),
    ("{a} divided by {b}", "{a}/{b}", '/'),
    ("how much is {a} multiplied by {b}", "{a}*{b}", '*'),
    ("{a} + {b}", "{a}+{b}", '+'),
    ("what is {a}*{b}", "{a}*{b}", '*'),
    ("compute {a} - {b}", "{a}-{b}", '-'),
    ("what do you get if you add {a} and {b}", "{a}+{b}", '+'),
    ("{a} x {b}", "{a}*{b}", '*'),
    ("work out {a} over {b}", "{a}/{b}", '/'),
    ("what is {a} added to {b}", "{b}+{a}", '+'),
    ("subtract {b} from {a}", "{a}-{b}", '-'),
    ("multiply {a} by {b}", "{a}*{b}", '*'),
    ("what's {a} / {b}", "{a}/{b}", '/'),
    ("how much is {a} and {b} together", "{a}+{b}", '+'),
    ("{a} times {b} equals what", "{a}*{b}", '*'),
    ("take {b} away from {a}", "{a}-{b}", '-'),
    ("divide {a} by {b}", "{a}/{b}", '/'),
    ("sum of {a} and {b}", "{a}+{b}", '+'),
    ("what is the product of {a} and {b}", "{a}*{b}", '*'),
    ("{a} minus {b} is how much", "{a}-{b}", '-'),
    ("how many is {a} split into {b} equal parts", "{a}/{b}", '/'),
    ("{a} * {b} = ?", "{a}*{b}", '*'),
    ("what's {a} less {b}", "{a}-{b}", '-'),
];

/// The arithmetic words of the held-out templates ("multiplied by", "x", "/", "sum", "less") in
/// frames of their own, shown on the training side only: the words are a closed set the model
/// has to know, the held-out sentences stay unseen.
const OPERATOR_WORDS: &[(&str, &str, char)] = &[
    ("calculate {a} multiplied by {b}", "{a}*{b}", '*'),
    ("{a} multiplied by {b} is what", "{a}*{b}", '*'),
    ("compute {a} x {b}", "{a}*{b}", '*'),
    ("{a} x {b} is how much", "{a}*{b}", '*'),
    ("calculate {a} / {b}", "{a}/{b}", '/'),
    ("{a} / {b} is how much", "{a}/{b}", '/'),
    ("what do {a} and {b} sum to", "{a}+{b}", '+'),
    ("add up {a} and {b}", "{a}+{b}", '+'),
    ("calculate {a} less {b}", "{a}-{b}", '-'),
    ("{a} less {b} equals what", "{a}-{b}", '-'),
];

/// The same for the held-out functions' words ("half of", "a third of").
const FUNCTION_WORDS: &[(&str, &str)] = &[
    ("calculate half of {even}", "{even}/2"),
    ("half of {even} is how much", "{even}/2"),
    ("compute a third of {t3}", "{t3}/3"),
    ("a third of {t3} is what", "{t3}/3"),
];

/// Word problems: (template, expression). The numbers must be pulled out of the sentence.
const WORD_PROBLEMS: &[(&str, &str)] = &[
    (
        "a crate holds {a} apples. how many apples are in {b} crates",
        "{b}*{a}",
    ),
    (
        "I had {a} dollars and spent {b}. how much do I have left",
        "{a}-{b}",
    ),
    (
        "tickets cost {a} euros each. what do {b} tickets cost",
        "{b}*{a}",
    ),
    (
        "I walked {a} km on monday and {b} km on tuesday. how far is that in total",
        "{a}+{b}",
    ),
    (
        "{b} friends share a bill of {a} dollars equally. how much does each pay",
        "{a}/{b}",
    ),
    (
        "a box has {a} pencils. how many pencils in {b} boxes",
        "{b}*{a}",
    ),
    (
        "there were {a} people on the bus and {b} got off. how many are left",
        "{a}-{b}",
    ),
    (
        "my rent is {a} a month. how much is that for {b} months",
        "{a}*{b}",
    ),
    (
        "I read {a} pages yesterday and {b} today. how many pages is that",
        "{a}+{b}",
    ),
    (
        "{a} cookies go into bags of {b}. how many bags do I need to fill",
        "{a}/{b}",
    ),
    (
        "a car drives {a} km per hour for {b} hours. how far does it go",
        "{a}*{b}",
    ),
    (
        "the shop had {a} shirts and sold {b}. how many remain",
        "{a}-{b}",
    ),
    (
        "our team scored {a} points and theirs {b}. how many points together",
        "{a}+{b}",
    ),
    (
        "each row has {a} seats and there are {b} rows. how many seats",
        "{b}*{a}",
    ),
    (
        "a rope of {a} meters is cut into {b} equal pieces. how long is each piece",
        "{a}/{b}",
    ),
    ("I save {a} a week. how much after {b} weeks", "{a}*{b}"),
    (
        "a tank holds {a} liters and {b} liters leak out. how much is left",
        "{a}-{b}",
    ),
    (
        "one bag weighs {a} kg, another {b} kg. what do they weigh together",
        "{a}+{b}",
    ),
    (
        "a recipe needs {a} grams of flour per cake. how much flour for {b} cakes",
        "{b}*{a}",
    ),
    (
        "{a} students are split into {b} equal groups. how big is each group",
        "{a}/{b}",
    ),
];

/// Training-only word problems (`phrasing`). `WORD_PROBLEMS`' held-out entries (every fifth) are
/// all divisions, so its training side had none: these divide in frames of their own (no sharing
/// a bill, bags, cutting or splitting into groups), so division is learned and the held-out
/// sentences stay unseen.
const WORD_PROBLEMS_MORE: &[(&str, &str)] = &[
    (
        "{a} eggs are packed {b} to a carton. how many cartons are there",
        "{a}/{b}",
    ),
    (
        "a book of {a} pages is read in {b} days, the same number every day. how many pages a day",
        "{a}/{b}",
    ),
    (
        "{a} euros of prize money go to {b} winners, the same to everyone. what does one winner get",
        "{a}/{b}",
    ),
    (
        "a trip of {a} km takes {b} days at the same distance per day. how far per day",
        "{a}/{b}",
    ),
    (
        "{a} chairs stand in {b} rows of the same length. how many chairs per row",
        "{a}/{b}",
    ),
    (
        "I paid {a} dollars for {b} identical books. what did one book cost",
        "{a}/{b}",
    ),
    (
        "{a} minutes of video make {b} episodes of the same length. how long is one episode",
        "{a}/{b}",
    ),
    (
        "a farmer puts {a} apples into crates of {b}. how many crates does he use",
        "{a}/{b}",
    ),
    (
        "a class collects {a} euros, {b} euros from every child. how many children are there",
        "{a}/{b}",
    ),
    (
        "{a} km at {b} km per hour: how many hours is that",
        "{a}/{b}",
    ),
];

/// Functions and powers: (template, expression) over one number `{a}` (and `{b}` for powers).
const FUNCTIONS: &[(&str, &str)] = &[
    ("what is the square root of {sq}", "sqrt({sq})"),
    ("{a} squared", "{a}^2"),
    ("what is {p} to the power of {e}", "{p}^{e}"),
    ("{pct}% of {c}", "{c}*{pct}/100"),
    ("what is half of {even}", "{even}/2"),
    ("sqrt of {sq}", "sqrt({sq})"),
    ("{p} raised to {e}", "{p}^{e}"),
    ("what's {pct} percent of {c}", "{c}*{pct}/100"),
    ("{a} cubed", "{a}^3"),
    ("what is a third of {t3}", "{t3}/3"),
];

const CALC_ANSWERS: &[&str] = &[
    "{shown} = {r}.",
    "That's {r}.",
    "The answer is {r}.",
    "It comes to {r}.",
    "{r}.",
    "{shown} is {r}.",
];

const WORD_ANSWERS: &[&str] = &[
    "That makes {r}.",
    "The answer is {r}.",
    "{r} in total.",
    "It's {r}.",
];

/// Operands for `op` that keep the result short (exact division, positive differences).
fn operands(rng: &mut Draw, op: char) -> (i64, i64) {
    let (a, b) = (number(rng), number(rng));
    match op {
        '/' => {
            let b = rng.random_range(2..13);
            (b * rng.random_range(2..200), b)
        }
        '-' => (a.max(b), a.min(b)),
        '*' => (a.min(999), rng.random_range(2..100)),
        _ => (a, b),
    }
}

fn run_calc(c: &mut Conv, expr: &str) -> Result<Option<String>> {
    let r = c.call("calculator", json!({ "expr": expr }))?;
    Ok(result_text(&r))
}

/// One calculation turn. Returns the result, for a follow-up.
fn calculator_turn(rng: &mut Draw, c: &mut Conv, split: Split) -> Result<Option<i64>> {
    for _ in 0..20 {
        let kind = rng.random_range(0..10);
        let (user, expr, word) = if kind < 5 {
            let (t, e, op) = if split == Split::Train && rng.random_bool(0.25) {
                *any(rng, OPERATOR_WORDS)
            } else {
                *pick(rng, ARITH, split)
            };
            let (a, b) = operands(rng, op);
            let (sa, sb) = (say_number(rng, a), say_number(rng, b));
            (
                fill(&surface(rng, t, true), &[("a", &sa), ("b", &sb)]),
                fill(e, &[("a", &a.to_string()), ("b", &b.to_string())]),
                false,
            )
        } else if kind < 8 {
            let (t, e) = *phrasing(rng, WORD_PROBLEMS, WORD_PROBLEMS_MORE, split);
            let div = e.contains('/');
            let (a, b) = if div {
                let b = rng.random_range(2..13);
                (b * rng.random_range(2..60), b)
            } else if e.contains('-') {
                let (x, y) = (rng.random_range(20..500), rng.random_range(2..20));
                (x.max(y), x.min(y))
            } else {
                (rng.random_range(2..100), rng.random_range(2..50))
            };
            let (sa, sb) = (say_number(rng, a), say_number(rng, b));
            (
                fill(&surface(rng, t, true), &[("a", &sa), ("b", &sb)]),
                fill(e, &[("a", &a.to_string()), ("b", &b.to_string())]),
                true,
            )
        } else {
            let (t, e) = if split == Split::Train && rng.random_bool(0.25) {
                *any(rng, FUNCTION_WORDS)
            } else {
                *pick(rng, FUNCTIONS, split)
            };
            let root = rng.random_range(2..40i64);
            let vals = [
                ("sq", (root * root).to_string()),
                ("a", rng.random_range(2..30i64).to_string()),
                ("p", rng.random_range(2..10i64).to_string()),
                ("e", rng.random_range(2..6i64).to_string()),
                ("pct", (*any(rng, &[5, 10, 15, 20, 25, 50, 75])).to_string()),
                ("c", (rng.random_range(1..50i64) * 20).to_string()),
                ("even", (rng.random_range(2..500i64) * 2).to_string()),
                ("t3", (rng.random_range(2..300i64) * 3).to_string()),
            ];
            let slots: Vec<(&str, &str)> = vals.iter().map(|(k, v)| (*k, v.as_str())).collect();
            (fill(&surface(rng, t, true), &slots), fill(e, &slots), false)
        };
        // Skip results too long to quote before anything is recorded.
        let value = crate::tools::calculator::evaluate(&expr).map_err(Error::Data)?;
        let Some(r) = result_text(&crate::tools::calculator::to_json(value)) else {
            continue;
        };
        c.user(&user);
        run_calc(c, &expr)?;
        let shown = expr.replace('*', " × ").replace('/', " / ");
        let ans = if word {
            *any(rng, WORD_ANSWERS)
        } else {
            *any(rng, CALC_ANSWERS)
        };
        c.answer(&fill(ans, &[("shown", &shown), ("r", &r)]), &[r.clone()]);
        return Ok(r.parse::<i64>().ok());
    }
    Err(Error::Data(
        "toolchat: no short calculator result in 20 draws".into(),
    ))
}

/// "and times 3?" after a result: the follow-up names only the new operand.
const FOLLOW_UPS: &[(&str, &str)] = &[
    ("and times {b}", "{prev}*{b}"),
    ("now add {b}", "{prev}+{b}"),
    ("and minus {b}", "{prev}-{b}"),
    ("multiply that by {b}", "{prev}*{b}"),
    ("plus {b} more", "{prev}+{b}"),
];

fn follow_up_turn(rng: &mut Draw, c: &mut Conv, split: Split, prev: i64) -> Result<()> {
    let (t, e) = *pick(rng, FOLLOW_UPS, split);
    let b = rng.random_range(2..20i64);
    let expr = fill(e, &[("prev", &prev.to_string()), ("b", &b.to_string())]);
    let user = fill(&surface(rng, t, true), &[("b", &say_number(rng, b))]);
    c.user(&user);
    if let Some(r) = run_calc(c, &expr)? {
        c.answer(&format!("That gives {r}."), &[r]);
    } else {
        c.answer("That gives a long number; see the result above.", &[]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Time.

/// (how a user names the place, IANA zone). A closed set: all appear in training.
const ZONES: &[(&str, &str)] = &[
    ("Tokyo", "Asia/Tokyo"),
    ("London", "Europe/London"),
    ("Paris", "Europe/Paris"),
    ("New York", "America/New_York"),
    ("Berlin", "Europe/Berlin"),
    ("Sydney", "Australia/Sydney"),
    ("Los Angeles", "America/Los_Angeles"),
    ("Chicago", "America/Chicago"),
    ("Madrid", "Europe/Madrid"),
    ("Rome", "Europe/Rome"),
    ("Moscow", "Europe/Moscow"),
    ("Dubai", "Asia/Dubai"),
    ("Singapore", "Asia/Singapore"),
    ("Shanghai", "Asia/Shanghai"),
    ("Kolkata", "Asia/Kolkata"),
    ("Toronto", "America/Toronto"),
    ("Mexico City", "America/Mexico_City"),
    ("Sao Paulo", "America/Sao_Paulo"),
    ("Cairo", "Africa/Cairo"),
    ("Lagos", "Africa/Lagos"),
    ("UTC", "UTC"),
];

const ASK_TIME: &[&str] = &[
    "what time is it",
    "what's the time",
    "tell me the time",
    "do you know what time it is",
    "time please",
    "what is the current time",
    "got the time",
    "what time is it right now",
    "can I get the time",
    "what's the time now",
];

const ASK_DATE: &[&str] = &[
    "what's the date today",
    "what day is it",
    "what is today's date",
    "which day of the week is it",
    "today's date",
    "what date is it",
    "is it monday today",
    "what's today",
    "tell me today's date",
    "what day of the month is it",
];

const ASK_ZONE: &[&str] = &[
    "what time is it in {city}",
    "what's the time in {city} right now",
    "current time in {city}",
    "time in {city}",
    "what is the time over in {city}",
    "tell me the time in {city}",
    "is it late in {city}",
    "what's the local time in {city}",
    "what time do they have in {city}",
    "what day is it in {city}",
];

/// `HH:MM` of the time tool's `"time"` (`HH:MM:SS`).
fn hhmm(v: &Value) -> String {
    v["time"]
        .as_str()
        .and_then(|t| t.get(..5))
        .unwrap_or("")
        .to_string()
}

fn time_turn(rng: &mut Draw, c: &mut Conv, split: Split) -> Result<()> {
    match rng.random_range(0..3) {
        0 => {
            c.user(&ask(rng, ASK_TIME, split, true));
            let r = c.call("time", json!({}))?;
            let t = hhmm(&r);
            let a = any(
                rng,
                &["It's {t}.", "It is {t} now.", "The time is {t}.", "{t}."],
            );
            c.answer(&fill(a, &[("t", &t)]), &[t]);
        }
        1 => {
            c.user(&ask(rng, ASK_DATE, split, true));
            let r = c.call("time", json!({}))?;
            let (d, w) = (
                r["date"].as_str().unwrap_or(""),
                r["weekday"].as_str().unwrap_or(""),
            );
            let a = any(rng, &["Today is {w}, {d}.", "It's {w}, {d}.", "{w} {d}."]);
            c.answer(&fill(a, &[("w", w), ("d", d)]), &[d.to_string()]);
        }
        _ => {
            let (city, zone) = *any(rng, ZONES);
            let t = ask(rng, ASK_ZONE, split, true);
            c.user(&fill(&t, &[("city", city)]));
            let r = c.call("time", json!({ "zone": zone }))?;
            let (hm, w) = (hhmm(&r), r["weekday"].as_str().unwrap_or(""));
            let a = any(
                rng,
                &[
                    "In {city} it's {t} ({w}).",
                    "It's {t} in {city}.",
                    "{city}: {t}, {w}.",
                ],
            );
            c.answer(&fill(a, &[("city", city), ("t", &hm), ("w", w)]), &[hm]);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Todos.

const TODO_TEXTS: &[&str] = &[
    "buy milk",
    "call the plumber",
    "water the plants",
    "renew my passport",
    "pay the electricity bill",
    "book a table for friday",
    "pick up the dry cleaning",
    "email Sarah about the report",
    "clean the fridge",
    "buy a birthday present for mum",
    "take the car for a service",
    "return the library books",
    "fix the bike tyre",
    "send the invoice",
    "order new printer ink",
    "walk the dog",
    "buy bread and eggs",
    "call grandma",
    "cancel the gym membership",
    "update my CV",
    "change the bed sheets",
    "buy stamps",
    "charge the camera battery",
    "make a dentist appointment",
    "reply to Tom",
    "back up my laptop",
    "repot the basil",
    "buy coffee beans",
    "check the tyre pressure",
    "write thank-you cards",
    "defrost the freezer",
    "submit the expense report",
    "buy batteries",
    "feed the cat",
    "take out the recycling",
    "read chapter 4",
    "file my taxes",
    "sharpen the kitchen knives",
    "pack for the trip",
    "print the boarding passes",
];

/// People's names: half the entities are built around one, so the model must copy a name it may
/// never have seen rather than recall a closed list.
const NAMES: &[&str] = &[
    "Anna", "Tom", "Sarah", "Marco", "Priya", "Leo", "Mia", "Olga", "Omar", "Chen", "Fatima",
    "Lars", "Ines", "Kofi", "Yuki", "Diego", "Elena", "Raj", "Zoe", "Hannah", "Ivan", "Nadia",
    "Pablo", "Greta", "Sven", "Aisha", "Bruno", "Clara", "Dmitri", "Emeka", "Freya", "Hugo",
    "Ingrid", "Jonas", "Kenji", "Lucia", "Mateo", "Nora", "Oscar", "Paula", "Quentin", "Rosa",
    "Sami", "Tariq", "Ursula", "Viktor", "Wendy", "Xavier", "Yara", "Beatrix",
];

/// Household things, for todos, notes and events built around an object.
const ITEMS: &[&str] = &[
    "umbrella",
    "passport",
    "spare key",
    "blue scarf",
    "drill",
    "tent",
    "laptop charger",
    "camping stove",
    "winter coat",
    "hair dryer",
    "ladder",
    "sewing kit",
    "yoga mat",
    "tennis racket",
    "toolbox",
    "rice cooker",
    "picnic blanket",
    "sleeping bag",
    "flashlight",
    "garden hose",
    "extension cord",
    "suitcase",
    "headphones",
    "guitar",
    "microwave",
    "vacuum cleaner",
    "toaster",
    "bike pump",
    "fishing rod",
    "blender",
    "kettle",
    "lawn mower",
    "space heater",
    "baby monitor",
    "printer cable",
    "coffee grinder",
    "phone charger",
    "sunglasses",
    "rain boots",
    "ice skates",
    "snowboard",
    "paint brushes",
    "tripod",
    "keyboard",
    "desk lamp",
    "wok",
    "cast iron pan",
    "board games",
    "photo album",
    "swimsuit",
];

const PLACES: &[&str] = &[
    "garage",
    "attic",
    "basement",
    "hall cupboard",
    "car boot",
    "shed",
    "kitchen drawer",
    "top shelf",
    "spare room",
    "office",
];

const THINGS: &[&str] = &[
    "report", "invoice", "photos", "slides", "contract", "tickets", "budget",
];

/// A todo text: a fixed one, or one built around a name or an object from `split`'s part.
fn todo_text(rng: &mut Draw, split: Split) -> String {
    // A fixed text the model never saw must be copied whole: train that on whole made-up texts.
    if split == Split::Train && rng.random_bool(0.15) {
        let words = rng.random_range(1..4);
        let rest: Vec<String> = (0..words).map(|_| filler(rng, false)).collect();
        return format!("{} {}", any(rng, TODO_VERBS), rest.join(" "));
    }
    let name = name(rng, split);
    let item = item(rng, split);
    let thing = *any(rng, THINGS);
    let n = rng.random_range(2..60).to_string();
    let t = *any(
        rng,
        &[
            "",
            "",
            "call {name}",
            "email {name} about the {thing}",
            "buy a new {item}",
            "find the {item}",
            "fix the {item}",
            "return {name}'s {item}",
            "send {name} the {thing}",
            "pay {name} back {n} euros",
            "lend {name} the {item}",
            "pack the {item}",
            "clean the {item}",
            "sell the old {item}",
            "ask {name} about the {item}",
            "text {name} about friday",
        ],
    );
    if t.is_empty() {
        return pick(rng, TODO_TEXTS, split).to_string();
    }
    fill(
        t,
        &[
            ("name", &name),
            ("item", &item),
            ("thing", thing),
            ("n", &n),
        ],
    )
}

/// Verbs that start the made-up training todos.
const TODO_VERBS: &[&str] = &[
    "buy", "call", "fix", "find", "clean", "book", "pay", "send", "check", "order", "return",
    "pack", "email", "visit", "sort",
];

/// An event title: a fixed one, or one built around a name from `split`'s part.
fn event_title(rng: &mut Draw, split: Split) -> String {
    let name = name(rng, split);
    let t = *any(
        rng,
        &[
            "",
            "",
            "lunch with {name}",
            "coffee with {name}",
            "call with {name}",
            "{name}'s birthday party",
            "meeting with {name}",
            "dinner with {name}",
            "{name} visiting",
            "tennis with {name}",
            "interview with {name}",
        ],
    );
    if t.is_empty() {
        return pick(rng, EVENTS, split).to_string();
    }
    fill(t, &[("name", &name)])
}

/// A note: (what a search for it asks, title, body): a fixed one, or one built around a name or
/// an object from `split`'s part, with fresh numbers to copy.
fn note_fact(rng: &mut Draw, split: Split) -> (String, String, String) {
    let name = name(rng, split);
    let item = item(rng, split);
    let place = *any(rng, PLACES);
    let n4 = rng.random_range(1000..10000).to_string();
    let n = rng.random_range(2..300).to_string();
    let month = *any(rng, MONTHS);
    let day = rng.random_range(1..29).to_string();
    let (q, title, body) = *any(
        rng,
        &[
            ("", "", ""),
            ("", "", ""),
            ("{name}", "{name}'s number", "{name}'s number is 555-{n4}"),
            ("{item}", "{item}", "the {item} is in the {place}"),
            (
                "{name}",
                "{name}'s birthday",
                "{name}'s birthday is on {month} {day}",
            ),
            ("{item}", "{item} price", "the {item} cost {n} euros"),
            (
                "{name}",
                "{name}'s address",
                "{name} lives at {n} Mill Street",
            ),
            ("{item}", "{item} code", "the {item} code is {n4}"),
        ],
    );
    if q.is_empty() {
        let (q, title, body) = *pick(rng, NOTE_FACTS, split);
        return (q.to_string(), title.to_string(), body.to_string());
    }
    let slots = [
        ("name", name.as_str()),
        ("item", item.as_str()),
        ("place", place),
        ("n4", n4.as_str()),
        ("n", n.as_str()),
        ("month", month),
        ("day", day.as_str()),
    ];
    (fill(q, &slots), fill(title, &slots), fill(body, &slots))
}

const ADD_TODO: &[&str] = &[
    "remind me to {x}",
    "add {x} to my todo list",
    "put {x} on my list",
    "new todo: {x}",
    "I need to {x}, add it to my todos",
    "add a todo to {x}",
    "todo: {x}",
    "don't let me forget to {x}",
    "can you add '{x}' to my tasks",
    "add to my to-do list: {x}",
    "make a todo: {x}",
    "I have to {x}. put it on the list",
    "note on my todo list that I must {x}",
    "please track this task: {x}",
    "remember for me: {x}",
];

const LIST_TODOS: &[&str] = &[
    "what's on my todo list",
    "show my todos",
    "what do I still have to do",
    "list my tasks",
    "what's left on my list",
    "read me my to-do list",
    "any open todos",
    "what are my todos",
    "show me what I need to do",
    "which tasks are open",
];

const DONE_TODO: &[&str] = &[
    "mark todo {id} as done",
    "I finished number {id}",
    "tick off item {id}",
    "done with todo {id}",
    "complete task {id}",
    "check off #{id}",
    "todo {id} is done",
    "set item {id} to done",
    "I did task {id}",
    "close todo number {id}",
];

/// Training-only ways to add a todo (`phrasing`). These lists were written after the held-out
/// results were seen, so none mirrors a held-out phrasing's frame ("{x}, add it to my todos",
/// "pull up my {q} note", "do I have a note on {q}"): they widen training, not copy the test.
const ADD_TODO_MORE: &[&str] = &[
    "stick {x} on my todo list",
    "add this task: {x}",
    "put down {x} as a task",
    "new task: {x}",
    "log a todo: {x}",
    "task for later: {x}",
    "could you track {x} for me",
    "my to-do list needs {x}",
];

/// Training-only ways to ask for the todo list.
const LIST_TODOS_MORE: &[&str] = &[
    "what's on my plate",
    "read out my tasks",
    "my todos please",
    "show the task list",
    "what do I need to get done",
    "tell me my tasks",
    "anything pending",
    "give me my to-do list",
    "what tasks do I have",
    "show my to-do items",
    "what haven't I finished yet",
    "do I have unfinished tasks",
    "how many todos do I still have",
    "run through my todos",
    "what's still undone",
    "anything still to do today",
];

fn quote_list(items: &[String]) -> String {
    items.join("; ")
}

fn todos_turn(rng: &mut Draw, c: &mut Conv, split: Split) -> Result<()> {
    match rng.random_range(0..10) {
        0..=4 => {
            let x = &todo_text(rng, split);
            let t = ask_more(rng, ADD_TODO, ADD_TODO_MORE, split, false);
            c.user(&fill(&t, &[("x", x)]));
            let r = c.call("todos", json!({"action": "add", "text": x}))?;
            let id = r["id"].to_string();
            let a = any(
                rng,
                &[
                    "Added \"{x}\" to your todos.",
                    "Done: \"{x}\" is on your list (#{id}).",
                    "OK, I added todo {id}: {x}.",
                    "Added: {x}.",
                ],
            );
            c.answer(&fill(a, &[("x", x), ("id", &id)]), &[x.to_string()]);
        }
        5..=7 => {
            let n = rng.random_range(0..4);
            for _ in 0..n {
                let x = todo_text(rng, split);
                c.setup("todos", json!({"action": "add", "text": x}))?;
            }
            c.user(&ask_more(rng, LIST_TODOS, LIST_TODOS_MORE, split, true));
            let r = c.call("todos", json!({"action": "list"}))?;
            let items: Vec<String> = r
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| i["text"].as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            if items.is_empty() {
                c.answer("Your todo list is empty.", &[]);
            } else {
                let a = format!("You have {} open: {}.", items.len(), quote_list(&items));
                c.answer(&a, &items);
            }
        }
        _ => {
            let n = rng.random_range(1..5);
            let mut texts = Vec::new();
            for _ in 0..n {
                let x = todo_text(rng, split);
                c.setup("todos", json!({"action": "add", "text": x}))?;
                texts.push(x);
            }
            let id = rng.random_range(1..=n);
            let t = ask(rng, DONE_TODO, split, false);
            c.user(&fill(&t, &[("id", &id.to_string())]));
            let r = c.call("todos", json!({"action": "complete", "id": id}))?;
            let x = r["text"].as_str().unwrap_or("").to_string();
            let a = format!("Marked \"{x}\" as done.");
            c.answer(&a, &[x]);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Notes.

/// (topic word, title, body)
const NOTE_FACTS: &[(&str, &str, &str)] = &[
    ("wifi", "wifi", "the wifi password is blue-harbor-42"),
    ("parking", "parking", "the car is parked on level 3, row B"),
    ("locker", "gym locker", "my gym locker code is 7781"),
    (
        "recipe",
        "pancakes",
        "pancakes: 2 eggs, 250 ml milk, 120 g flour",
    ),
    (
        "books",
        "books to read",
        "books to read: Dune, Emma, The Hobbit",
    ),
    (
        "gift",
        "gift ideas",
        "gift ideas for Leo: a kite, a chess set",
    ),
    ("plumber", "plumber", "the plumber's number is 555-0142"),
    ("doctor", "doctor", "Dr. Patel sees patients on tuesdays"),
    ("garden", "garden", "plant the tulip bulbs in october"),
    (
        "flight",
        "flight",
        "flight BA 304 leaves at 07:40 from gate 12",
    ),
    ("bike", "bike lock", "the bike lock combination is 4-1-9-6"),
    (
        "meeting",
        "meeting notes",
        "meeting notes: launch moved to june",
    ),
    (
        "paint",
        "paint colour",
        "the living room paint is Sea Mist 220",
    ),
    ("shoes", "shoe size", "Mia wears shoe size 31"),
    (
        "insurance",
        "insurance",
        "the insurance policy number is HX-20931",
    ),
    ("movie", "movies", "movies to watch: Alien, Amelie, Up"),
    ("tea", "tea", "green tea steeps for 3 minutes at 80 degrees"),
    ("printer", "printer", "the printer takes HP 305 cartridges"),
    (
        "hotel",
        "hotel",
        "the hotel is the Blue Fern on King Street",
    ),
    ("vet", "vet", "the cat's vaccination is due in may"),
    ("bank", "bank", "the bank branch closes at 4pm on fridays"),
    ("train", "train", "the 8:15 train leaves from platform 2"),
    ("soup", "soup", "lentil soup needs 40 minutes to cook"),
    (
        "neighbor",
        "neighbor",
        "the neighbor's name is Olga, flat 5",
    ),
    ("bins", "bins", "the bins go out on wednesday night"),
];

const TAGS: &[&str] = &[
    "work", "home", "ideas", "travel", "family", "shopping", "health",
];

const SAVE_NOTE: &[&str] = &[
    "take a note: {body}",
    "save a note that {body}",
    "note down: {body}",
    "write this down: {body}",
    "please remember in my notes that {body}",
    "make a note: {body}",
    "store this in my notes: {body}",
    "jot down that {body}",
    "new note: {body}",
    "add a note saying {body}",
];

const SEARCH_NOTES: &[&str] = &[
    "search my notes for {q}",
    "find my note about {q}",
    "what did I write about {q}",
    "look up {q} in my notes",
    "do I have a note on {q}",
    "check my notes for {q}",
    "what was the {q} thing I saved",
    "find {q} in my notes",
    "anything in my notes about {q}",
    "pull up my {q} note",
];

/// Training-only ways to save, search and list notes.
const SAVE_NOTE_MORE: &[&str] = &[
    "note this: {body}",
    "put in my notes: {body}",
    "record that {body}",
    "keep a note that {body}",
    "save this to my notes: {body}",
    "log in my notes: {body}",
    "for my notes: {body}",
    "file a note: {body}",
];

const SEARCH_NOTES_MORE: &[&str] = &[
    "open my note about {q}",
    "show me the note on {q}",
    "did I save anything about {q}",
    "read me my note about {q}",
    "look for {q} in my notes",
    "what's in my note about {q}",
    "which note mentions {q}",
    "what do my notes say about {q}",
    "find the note with {q}",
    "show notes mentioning {q}",
    "get me what I noted about {q}",
    "search notes: {q}",
    "I wrote something about {q}, find it",
];

const LIST_NOTES_MORE: &[&str] = &[
    "read me all my notes",
    "which notes have I saved",
    "my notes please",
    "show every note",
    "give me a list of my notes",
];

const LIST_NOTES: &[&str] = &[
    "list my notes",
    "show me my notes",
    "what notes do I have",
    "show all my notes",
    "what have I noted down",
];

const LIST_TAGGED: &[&str] = &[
    "show my notes tagged {tag}",
    "list my {tag} notes",
    "which notes have the tag {tag}",
    "notes with tag {tag}",
    "what's in my {tag} notes",
];

fn notes_turn(rng: &mut Draw, c: &mut Conv, split: Split) -> Result<()> {
    match rng.random_range(0..10) {
        0..=3 => {
            let (_, title, body) = note_fact(rng, split);
            let (title, body) = (title.as_str(), body.as_str());
            let t = phrasing(rng, SAVE_NOTE, SAVE_NOTE_MORE, split);
            let (args, user) = match rng.random_range(0..3) {
                0 => (
                    json!({"action": "save", "title": title, "body": body}),
                    format!("{} (title: {title})", fill(t, &[("body", body)])),
                ),
                1 => {
                    let tag = *any(rng, TAGS);
                    (
                        json!({"action": "save", "body": body, "tags": tag}),
                        format!("{}, tag it {tag}", fill(t, &[("body", body)])),
                    )
                }
                _ => (
                    json!({"action": "save", "body": body}),
                    fill(t, &[("body", body)]),
                ),
            };
            c.user(&surface_keep_case(rng, &user));
            let r = c.call("notes", args)?;
            let title = r["title"].as_str().unwrap_or("").to_string();
            let id = r["id"].to_string();
            let a = any(
                rng,
                &["Saved note {id}: {t}.", "Noted as \"{t}\".", "Saved: {t}."],
            );
            c.answer(&fill(a, &[("t", &title), ("id", &id)]), &[title.clone()]);
        }
        4..=7 => {
            // Some notes exist; the user asks for one of them (or for something not there).
            let mut saved = Vec::new();
            for _ in 0..rng.random_range(1..4) {
                let (q, title, body) = note_fact(rng, split);
                c.setup(
                    "notes",
                    json!({"action": "save", "title": title, "body": body}),
                )?;
                saved.push(q);
            }
            let q = &if rng.random_bool(0.8) {
                saved[rng.random_range(0..saved.len())].clone()
            } else {
                note_fact(rng, split).0
            };
            let t = ask_more(rng, SEARCH_NOTES, SEARCH_NOTES_MORE, split, true);
            c.user(&fill(&t, &[("q", q)]));
            let r = c.call("notes", json!({"action": "search", "query": q}))?;
            match r.as_array().and_then(|a| a.first()) {
                Some(hit) => {
                    let title = hit["title"].as_str().unwrap_or("").to_string();
                    let snippet = hit["snippet"]
                        .as_str()
                        .unwrap_or("")
                        .replace(['[', ']'], "");
                    c.answer(&format!("Found \"{title}\": {snippet}"), &[title]);
                }
                None => c.answer(&format!("I found no note about {q}."), &[]),
            }
        }
        _ => {
            let tagged = rng.random_bool(0.5);
            let tag = *any(rng, TAGS);
            for _ in 0..rng.random_range(0..4) {
                let (_, title, body) = note_fact(rng, split);
                let t = if rng.random_bool(0.5) {
                    tag
                } else {
                    *any(rng, TAGS)
                };
                c.setup(
                    "notes",
                    json!({"action": "save", "title": title, "body": body, "tags": t}),
                )?;
            }
            let (user, args) = if tagged {
                let t = ask(rng, LIST_TAGGED, split, true);
                (
                    fill(&t, &[("tag", tag)]),
                    json!({"action": "list", "tag": tag}),
                )
            } else {
                (
                    ask_more(rng, LIST_NOTES, LIST_NOTES_MORE, split, true),
                    json!({"action": "list"}),
                )
            };
            c.user(&user);
            let r = c.call("notes", args)?;
            let titles: Vec<String> = r
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|n| n["title"].as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            if titles.is_empty() {
                c.answer("You have no notes there yet.", &[]);
            } else {
                c.answer(
                    &format!("{} notes: {}.", titles.len(), quote_list(&titles)),
                    &titles,
                );
            }
        }
    }
    Ok(())
}

/// Note text is data: only an opener and punctuation vary, never its letters or case.
fn surface_keep_case(rng: &mut Draw, text: &str) -> String {
    let opener = *any(rng, &["", "", "please ", "hey, ", "could you "]);
    capitalize(&format!("{opener}{text}"))
}

// ---------------------------------------------------------------------------------------------
// The calendar.

const EVENTS: &[&str] = &[
    "dentist",
    "team meeting",
    "lunch with Anna",
    "yoga class",
    "haircut",
    "parents evening",
    "call with the bank",
    "piano lesson",
    "job interview",
    "dinner with Yuki",
    "car service",
    "book club",
    "football practice",
    "doctor's appointment",
    "coffee with Priya",
    "flight to Lisbon",
    "project review",
    "swimming",
    "birthday party for Jo",
    "plumber visit",
    "school play",
    "tax advisor",
    "vet appointment",
    "date night",
    "guitar lesson",
];

const ADD_EVENT: &[&str] = &[
    "add {title} to my calendar on {date} at {time}",
    "schedule {title} for {date} at {time}",
    "put {title} in my calendar: {date}, {time}",
    "I have {title} on {date} at {time}",
    "book {title} on {date} at {time}",
    "create an event {title} at {time} on {date}",
    "calendar: {title}, {date} {time}",
    "set up {title} for {time} on {date}",
    "new event on {date} at {time}: {title}",
    "remind me of {title} on {date} at {time} in my calendar",
];

const LIST_EVENTS: &[&str] = &[
    "what's on my calendar {when}",
    "do I have anything {when}",
    "what are my appointments {when}",
    "show my schedule for {when}",
    "am I busy {when}",
    "any events {when}",
    "what's planned {when}",
    "check my calendar for {when}",
    "what meetings do I have {when}",
    "list my events {when}",
];

const MONTHS: &[&str] = &[
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// How a user writes a date (the year is always given: the model does not know today's).
fn say_date(rng: &mut Draw, d: NaiveDate) -> String {
    let m = MONTHS[d.month0() as usize];
    match rng.random_range(0..5) {
        0 => d.format("%Y-%m-%d").to_string(),
        1 => format!("{m} {}, {}", d.day(), d.year()),
        2 => format!("{} {m} {}", d.day(), d.year()),
        3 => format!("{} {} {}", &m[..3], d.day(), d.year()),
        _ => format!("the {} of {m} {}", ordinal(d.day()), d.year()),
    }
}

fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// How a user writes a time of day.
fn say_time(rng: &mut Draw, h: u32, m: u32) -> String {
    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
    let ampm = if h < 12 { "am" } else { "pm" };
    match rng.random_range(0..4) {
        0 => format!("{h:02}:{m:02}"),
        1 if m == 0 => format!("{h12}{ampm}"),
        1 | 2 => format!("{h12}:{m:02} {ampm}"),
        _ if h == 12 && m == 0 => "noon".into(),
        _ => format!("{h}:{m:02}"),
    }
}

fn calendar_turn(rng: &mut Draw, c: &mut Conv, split: Split, now: DateTime<Utc>) -> Result<()> {
    if rng.random_bool(0.55) {
        let title = &event_title(rng, split);
        let date = now.date_naive() + Duration::days(rng.random_range(0..120));
        let (h, m) = (
            rng.random_range(7..21u32),
            *any(rng, &[0u32, 0, 15, 30, 45]),
        );
        let t = pick(rng, ADD_EVENT, split);
        let user = fill(
            t,
            &[
                ("title", title),
                ("date", &say_date(rng, date)),
                ("time", &say_time(rng, h, m)),
            ],
        );
        c.user(&surface_keep_case(rng, &user));
        let start = format!("{}T{h:02}:{m:02}", date.format("%Y-%m-%d"));
        let r = c.call(
            "calendar",
            json!({"action": "add", "title": title, "start": start}),
        )?;
        let a = any(
            rng,
            &[
                "Added \"{title}\" on {d} at {t}.",
                "OK: {title}, {d} {t} (event {id}).",
                "It's in your calendar: {title} on {d} at {t}.",
            ],
        );
        let (d, hm) = (
            date.format("%Y-%m-%d").to_string(),
            format!("{h:02}:{m:02}"),
        );
        c.answer(
            &fill(
                a,
                &[
                    ("title", title),
                    ("d", &d),
                    ("t", &hm),
                    ("id", &r["id"].to_string()),
                ],
            ),
            &[title.to_string()],
        );
        return Ok(());
    }
    // Listing: events today, tomorrow and later this week exist first.
    for _ in 0..rng.random_range(0..4) {
        let title = event_title(rng, split);
        let day = now.date_naive() + Duration::days(rng.random_range(0..3));
        let start = format!(
            "{}T{:02}:00",
            day.format("%Y-%m-%d"),
            rng.random_range(8..20)
        );
        c.setup(
            "calendar",
            json!({"action": "add", "title": title, "start": start}),
        )?;
    }
    let (when, range) = *any(
        rng,
        &[
            ("today", "today"),
            ("tomorrow", "tomorrow"),
            ("this week", "week"),
        ],
    );
    let t = ask(rng, LIST_EVENTS, split, true);
    c.user(&fill(&t, &[("when", when)]));
    let r = c.call("calendar", json!({"action": "list", "range": range}))?;
    let events: Vec<(String, String)> = r
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let start = e["start"].as_str().unwrap_or("");
                    (
                        e["title"].as_str().unwrap_or("").to_string(),
                        start.get(11..16).unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if events.is_empty() {
        c.answer(&format!("Nothing on your calendar {when}."), &[]);
    } else {
        let list: Vec<String> = events.iter().map(|(t, s)| format!("{t} at {s}")).collect();
        let titles: Vec<String> = events.iter().map(|(t, _)| t.clone()).collect();
        c.answer(&format!("{when}: {}.", quote_list(&list)), &titles);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Turns that need no tool.

/// (what users say, what the assistant answers)
const NO_TOOL: &[(&[&str], &[&str])] = &[
    (
        &[
            "hi",
            "hello",
            "hey there",
            "good morning",
            "hello tinybit",
            "yo",
            "hiya",
            "good evening",
            "hey",
            "greetings",
        ],
        &[
            "Hello! I can do math, tell the time, and keep your todos, notes and calendar.",
            "Hi! What can I do for you?",
            "Hello. Ask me to calculate something or to keep a todo, a note or an event.",
        ],
    ),
    (
        &[
            "thanks",
            "thank you",
            "thanks a lot",
            "cheers",
            "great, thanks",
            "thank you so much",
            "perfect, thank you",
            "ty",
            "much appreciated",
            "thanks!",
        ],
        &["You're welcome.", "Glad to help.", "Any time."],
    ),
    (
        &[
            "bye",
            "goodbye",
            "see you",
            "that's all for now",
            "good night",
            "see you later",
            "bye bye",
            "I'm done",
            "talk later",
            "ok that's it",
        ],
        &["Bye!", "Goodbye.", "See you."],
    ),
    (
        &[
            "who are you",
            "what are you",
            "what's your name",
            "are you a person",
            "introduce yourself",
            "are you chatgpt",
            "are you human",
            "what is tinybit",
            "who made you",
            "are you an ai",
        ],
        &[
            "I'm tinybit, a small assistant that runs on your computer. I can calculate, tell the time, and manage todos, notes and a calendar.",
            "I'm tinybit: a small local model with a few tools, not a person.",
        ],
    ),
    (
        &[
            "what can you do",
            "help",
            "what are your features",
            "how can you help me",
            "what tools do you have",
            "what do you know how to do",
            "list your skills",
            "how do I use you",
            "what are you good at",
            "what can I ask you",
        ],
        &[
            "I can do arithmetic, tell the time in any zone, and keep your todos, notes and calendar events. I don't know facts about the world.",
            "Math, the time, todos, notes and a calendar. Ask me, for example, \"what is 17 times 23\" or \"remind me to buy milk\".",
        ],
    ),
    (
        &[
            "what is the capital of Peru",
            "who wrote Hamlet",
            "how tall is Mount Everest",
            "who won the world cup in 2010",
            "what's the population of Canada",
            "when did World War 2 end",
            "who is the president of France",
            "what is the speed of light",
            "how many moons does Jupiter have",
            "what language do they speak in Brazil",
        ],
        &[
            "I can't answer that reliably: I'm a small model without a knowledge base or the internet.",
            "I don't know. I'm a small local model, not a knowledge source; please check a reference.",
        ],
    ),
    (
        &[
            "what's the weather tomorrow",
            "book me a flight to Rome",
            "send an email to my boss",
            "play some music",
            "order a pizza",
            "turn on the lights",
            "translate hello into Japanese",
            "what's the latest news",
            "call my mum",
            "open youtube",
        ],
        &[
            "I can't do that: I only have a calculator, the time, todos, notes and a calendar, and no internet.",
            "That's outside what I can do. I work offline with a few local tools.",
        ],
    ),
    (
        &[
            "what's your favourite colour",
            "do you like cats",
            "what do you think about football",
            "which is better, tea or coffee",
            "do you have feelings",
            "are you happy",
            "what's the meaning of life",
            "do you like music",
            "what is your favourite food",
            "are dogs better than cats",
        ],
        &[
            "I don't have opinions or feelings; I'm a small program.",
            "I have no preferences of my own, but I'm happy to help with math, time or your lists.",
        ],
    ),
    (
        &[
            "tell me a joke",
            "make me laugh",
            "say something funny",
            "do you know any jokes",
            "joke please",
            "I need a laugh",
            "got a joke",
            "tell me something funny",
            "another joke",
            "a joke please",
        ],
        &[
            "Why did the scarecrow win an award? He was outstanding in his field.",
            "I told my computer a joke about UDP. I'm not sure it got it.",
            "Parallel lines have so much in common. It's a shame they'll never meet.",
            "Why don't eggs tell jokes? They'd crack each other up.",
        ],
    ),
    (
        &[
            "write me a poem",
            "write an essay about dogs",
            "summarize this book for me",
            "explain quantum physics",
            "write a story about a dragon",
            "give me a recipe for lasagna",
            "teach me french",
            "write my homework",
            "explain how cars work",
            "describe the ocean",
        ],
        &[
            "That is more than a small model like me does well. I can calculate, tell the time, and keep todos, notes and events.",
            "Sorry, I'm too small to write that well. Try me with math, time, todos, notes or your calendar.",
        ],
    ),
];

/// Training-only ways to say each `NO_TOOL` group's thing (`phrasing`), in `NO_TOOL`'s order.
/// Written after the held-out results were seen, so none is in a held-out phrasing's frame ("ok
/// that's it", "what tools do you have", "do you have feelings", "order a pizza"...): they widen
/// training, not copy the test.
const NO_TOOL_MORE: &[&[&str]] = &[
    &[
        "good afternoon",
        "howdy",
        "hey, how are you",
        "hello again",
        "heya",
        "hi, anyone there",
    ],
    &[
        "thx",
        "appreciate it",
        "that was helpful",
        "many thanks",
        "you're a star",
        "ta",
    ],
    &[
        "later!",
        "I'm off now",
        "nothing else",
        "take care",
        "have a nice day",
        "farewell",
    ],
    &[
        "what should I call you",
        "who am I talking to",
        "are you real",
        "what kind of program are you",
        "is this a bot",
        "where do you run",
    ],
    &[
        "what are you for",
        "what things can you help with",
        "any tips on using you",
        "what commands do you understand",
        "show me what you can do",
        "what jobs can you do",
    ],
    &[
        "who painted the Mona Lisa",
        "how old is the universe",
        "what's the largest ocean",
        "who discovered penicillin",
        "how deep is the Pacific",
        "what year did the Titanic sink",
    ],
    &[
        "buy me new shoes",
        "set an alarm on my phone",
        "check my bank balance",
        "download this file",
        "call a taxi",
        "print this page",
    ],
    &[
        "do you get bored",
        "what's your favourite movie",
        "do you dream",
        "are you sad",
        "summer or winter",
        "do you love me",
    ],
    &[
        "tell me a pun",
        "know any riddles",
        "cheer me up",
        "be funny",
        "make a joke",
        "humour me",
    ],
    &[
        "write a song about rain",
        "compose a letter to my landlord",
        "summarize the news",
        "explain black holes",
        "draft a speech for a wedding",
        "tell me a bedtime story",
    ],
];

const COUNTRIES: &[&str] = &[
    "Peru", "Norway", "Kenya", "Vietnam", "Chile", "Egypt", "Poland", "Canada", "Japan", "Ghana",
    "Iceland", "Mexico", "Nepal", "Portugal", "Morocco",
];

const CITIES: &[&str] = &[
    "Rome", "Oslo", "Nairobi", "Lima", "Hanoi", "Cairo", "Krakow", "Osaka", "Accra", "Seville",
    "Dublin", "Quito", "Porto", "Boston", "Perth",
];

/// Requests outside the tools built around a place or a name: (template, answers).
const OUT_OF_SCOPE: &[(&str, &[&str])] = &[
    ("what is the capital of {country}", NO_KNOWLEDGE),
    ("how many people live in {city}", NO_KNOWLEDGE),
    ("what language do they speak in {country}", NO_KNOWLEDGE),
    ("tell me about the history of {country}", NO_KNOWLEDGE),
    ("what is {city} famous for", NO_KNOWLEDGE),
    ("book me a flight to {city}", NO_ACTION),
    ("what's the weather in {city}", NO_ACTION),
    ("send {name} a text", NO_ACTION),
    ("find a restaurant in {city}", NO_ACTION),
    ("order a {item} online", NO_ACTION),
    ("how do I get to {city}", NO_ACTION),
    ("email {name} for me", NO_ACTION),
    ("what time does the {item} shop open", NO_ACTION),
];

/// Training-only requests outside the tools (`phrasing`), none in a held-out one's frame ("what
/// is {city} famous for", "order a {item} online").
const OUT_OF_SCOPE_MORE: &[(&str, &[&str])] = &[
    ("who is the president of {country}", NO_KNOWLEDGE),
    ("what currency does {country} use", NO_KNOWLEDGE),
    ("when was {city} founded", NO_KNOWLEDGE),
    ("what's the tallest mountain in {country}", NO_KNOWLEDGE),
    ("who invented the {item}", NO_KNOWLEDGE),
    ("how far away is {city}", NO_KNOWLEDGE),
    ("explain how a {item} works", NO_KNOWLEDGE),
    ("what should I visit in {country}", NO_KNOWLEDGE),
    ("play some music", NO_ACTION),
    ("turn on the lights", NO_ACTION),
    ("rent a car in {city}", NO_ACTION),
    ("what's the news in {country}", NO_ACTION),
    ("reserve a table for two in {city}", NO_ACTION),
    ("post this on social media", NO_ACTION),
];

const NO_KNOWLEDGE: &[&str] = &[
    "I can't answer that reliably: I'm a small model without a knowledge base or the internet.",
    "I don't know. I'm a small local model, not a knowledge source; please check a reference.",
];

const NO_ACTION: &[&str] = &[
    "I can't do that: I only have a calculator, the time, todos, notes and a calendar, and no internet.",
    "That's outside what I can do. I work offline with a few local tools.",
];

fn no_tool_turn(rng: &mut Draw, c: &mut Conv, split: Split) {
    if rng.random_bool(0.35) {
        let (t, answers) = *phrasing(rng, OUT_OF_SCOPE, OUT_OF_SCOPE_MORE, split);
        let slots = [
            ("country", *pick(rng, COUNTRIES, split)),
            ("city", *pick(rng, CITIES, split)),
            ("name", &name(rng, split)),
            ("item", &item(rng, split)),
        ];
        c.user(&fill(&surface(rng, t, true), &slots));
        c.answer(*any(rng, answers), &[]);
        return;
    }
    // The same draw `any(rng, NO_TOOL)` made, so the held-out conversations stay byte-identical.
    let group = rng.random_range(0..NO_TOOL.len());
    let (asks, answers) = NO_TOOL[group];
    let ask = *phrasing(rng, asks, NO_TOOL_MORE[group], split);
    let question = !matches!(ask.chars().last(), Some('!'));
    let user = if rng.random_bool(0.5) {
        capitalize(ask)
    } else {
        surface(rng, ask, question)
    };
    c.user(&user);
    c.answer(*any(rng, answers), &[]);
}

// ---------------------------------------------------------------------------------------------
// Several calls in one turn.

fn two_todos_turn(rng: &mut Draw, c: &mut Conv, split: Split) -> Result<()> {
    let x = todo_text(rng, split);
    let mut y = todo_text(rng, split);
    if y == x {
        y = todo_text(rng, split);
    }
    let (x, y) = (x.as_str(), y.as_str());
    let t = any(
        rng,
        &[
            "add {x} and {y} to my todos",
            "remind me to {x} and to {y}",
            "two todos: {x}, {y}",
            "put {x} and also {y} on my list",
        ],
    );
    c.user(&fill(&surface(rng, t, false), &[("x", x), ("y", y)]));
    c.call("todos", json!({"action": "add", "text": x}))?;
    if y != x {
        c.call("todos", json!({"action": "add", "text": y}))?;
        c.answer(
            &format!("Added both: \"{x}\" and \"{y}\"."),
            &[x.to_string(), y.to_string()],
        );
    } else {
        c.answer(&format!("Added \"{x}\"."), &[x.to_string()]);
    }
    Ok(())
}

fn two_calcs_turn(rng: &mut Draw, c: &mut Conv) -> Result<()> {
    let (a, b) = (rng.random_range(2..50i64), rng.random_range(2..50i64));
    let (p, q) = (rng.random_range(10..500i64), rng.random_range(2..100i64));
    let t = any(
        rng,
        &[
            "what is {a} times {b} and {p} plus {q}",
            "compute {a}*{b}, then {p}+{q}",
            "two sums: {a} x {b} and {p} + {q}",
        ],
    );
    let (sa, sb, sp, sq) = (a.to_string(), b.to_string(), p.to_string(), q.to_string());
    let t = surface(rng, t, true);
    c.user(&fill(&t, &[("a", &sa), ("b", &sb), ("p", &sp), ("q", &sq)]));
    let r1 = c
        .call("calculator", json!({"expr": format!("{a}*{b}")}))?
        .to_string();
    let r2 = c
        .call("calculator", json!({"expr": format!("{p}+{q}")}))?
        .to_string();
    c.answer(
        &format!("{a} × {b} = {r1} and {p} + {q} = {r2}."),
        &[r1, r2],
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// One conversation of one to three turns, starting from a fresh scratch database.
fn conversation(
    rng: &mut Draw,
    scratch: &Scratch,
    split: Split,
    system: &str,
) -> Result<Generated> {
    // "Now" somewhere in 2026–2027, at a whole second.
    // Cannot fail: a whole-second timestamp in 2026-2027 is in range and unambiguous in UTC.
    let now = Utc
        .timestamp_opt(1_767_225_600 + rng.random_range(0..2 * 365 * 86_400), 0)
        .single()
        .expect("in range");
    let reg = scratch.reset(now)?;
    let mut c = Conv {
        reg: &reg,
        messages: vec![Message::new("system", system)],
        setup: Vec::new(),
        turns: Vec::new(),
    };
    let turns = *any(rng, &[1, 1, 1, 2, 2, 3]);
    let mut last_calc = None;
    for _ in 0..turns {
        let roll = rng.random_range(0..100);
        last_calc = match roll {
            0..=21 => calculator_turn(rng, &mut c, split)?,
            22..=25 if last_calc.is_some() => {
                // Cannot fail: the match arm's guard checked `last_calc.is_some()`.
                follow_up_turn(rng, &mut c, split, last_calc.unwrap())?;
                None
            }
            22..=33 => {
                time_turn(rng, &mut c, split)?;
                None
            }
            34..=47 => {
                todos_turn(rng, &mut c, split)?;
                None
            }
            48..=59 => {
                notes_turn(rng, &mut c, split)?;
                None
            }
            60..=71 => {
                calendar_turn(rng, &mut c, split, now)?;
                None
            }
            72..=74 => {
                two_todos_turn(rng, &mut c, split)?;
                None
            }
            75..=76 => {
                two_calcs_turn(rng, &mut c)?;
                None
            }
            _ => {
                no_tool_turn(rng, &mut c, split);
                None
            }
        };
    }
    Ok(Generated {
        messages: c.messages,
        now,
        setup: c.setup,
        turns: c.turns,
    })
}

/// The SFT record of a conversation: `{"messages": [...], "tools": [...]}` (the tool lines the
/// model is shown, as `tb-chat` shows them).
pub fn training_record(g: &Generated, tools: &[String]) -> Value {
    json!({"messages": g.messages, "tools": tools})
}

/// One `tb-eval --task tools` case per assistant turn: the conversation up to it, the first call
/// expected, the facts the final answer must contain, and the state the tools start from.
pub fn cases_of(g: &Generated) -> Vec<Value> {
    g.turns
        .iter()
        .map(|t| {
            json!({
                "messages": g.messages[..t.start],
                "expected": t.expected,
                "answer_contains": t.answer_contains,
                "now": g.now.to_rfc3339(),
                // Only what ran before this turn: later turns' setup is not this case's state.
                "setup": g.setup.iter().filter(|s| setup_at(s) < t.start).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Where a setup call ran: before message `at` (0, before everything, when it does not say).
fn setup_at(s: &Value) -> usize {
    s["at"].as_u64().unwrap_or(0) as usize
}

/// One call of a replay: a setup call, or the conversation's call in message `index`.
pub struct Replayed<'a> {
    pub call: &'a Value,
    pub index: Option<usize>,
}

/// The order in which to rerun a case's `setup` and its conversation's calls (`(message index,
/// call)`) on a fresh registry so that every call sees the state it saw when it was recorded:
/// each setup call before the message it preceded.
pub fn replay_order<'a>(setup: &'a [Value], calls: &[(usize, &'a Value)]) -> Vec<Replayed<'a>> {
    let mut setup: Vec<&Value> = setup.iter().collect();
    setup.sort_by_key(|s| setup_at(s));
    let mut out = Vec::new();
    let mut next = setup.into_iter().peekable();
    for &(index, call) in calls {
        while let Some(s) = next.next_if(|s| setup_at(s) <= index) {
            out.push(Replayed {
                call: s,
                index: None,
            });
        }
        out.push(Replayed {
            call,
            index: Some(index),
        });
    }
    out.extend(next.map(|call| Replayed { call, index: None }));
    out
}

/// What `tb-tok toolchat` writes.
pub struct Written {
    pub train: usize,
    pub heldout: usize,
    pub cases: usize,
}

/// Writes `DIR/train.jsonl` and `DIR/heldout.jsonl` (SFT conversations), `DIR/cases.jsonl` (the
/// held-out conversations' tool cases) and `DIR/train.txt` (the training conversations rendered,
/// for `tb-tok train`). Deterministic given `seed` (and `vocab`, the tokenizer whose word pieces
/// training fillers may use: it changes the training side only); the tools run on a scratch
/// database in `dir`, removed afterwards.
pub fn write(
    dir: &Path,
    seed: u64,
    n_train: usize,
    n_heldout: usize,
    system: &str,
    vocab: Option<&crate::tokenizer::Tokenizer>,
) -> Result<Written> {
    // A tokenizer without pieces is refused before anything is written.
    let pieces = vocab.map(Pieces::of).transpose()?.map(Rc::new);
    std::fs::create_dir_all(dir).map_err(|e| Error::output(dir, "creating", e))?;
    let db = dir.join(format!(".toolchat-{}.db", std::process::id()));
    let result = write_with(dir, &db, seed, n_train, n_heldout, system, pieces);
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = db.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    result
}

fn write_with(
    dir: &Path,
    db: &Path,
    seed: u64,
    n_train: usize,
    n_heldout: usize,
    system: &str,
    pieces: Option<Rc<Pieces>>,
) -> Result<Written> {
    let scratch = Scratch::new(db);
    let tools: Vec<String> = scratch
        .reset(Utc::now())?
        .prompt_lines()
        .lines()
        .map(str::to_string)
        .collect();
    let mut out = Written {
        train: n_train,
        heldout: n_heldout,
        cases: 0,
    };
    for (split, n, name) in [
        (Split::Train, n_train, "train"),
        (Split::Heldout, n_heldout, "heldout"),
    ] {
        // One stream per split, so the held-out set does not change with the training set's size.
        let mut rng = Draw::new(seed, split as u64, pieces.clone());
        let (mut jsonl, mut text, mut cases) = (String::new(), String::new(), String::new());
        for _ in 0..n {
            let g = conversation(&mut rng, &scratch, split, system)?;
            jsonl.push_str(&training_record(&g, &tools).to_string());
            jsonl.push('\n');
            if split == Split::Train {
                let spans = crate::template::render(&g.messages, &tools, false)?;
                text.push_str(&crate::template::to_string(&spans));
            } else {
                for c in cases_of(&g) {
                    cases.push_str(&c.to_string());
                    cases.push('\n');
                    out.cases += 1;
                }
            }
        }
        crate::fsutil::write_atomic(&dir.join(format!("{name}.jsonl")), jsonl.as_bytes())?;
        if split == Split::Train {
            crate::fsutil::write_atomic(&dir.join("train.txt"), text.as_bytes())?;
        } else {
            crate::fsutil::write_atomic(&dir.join("cases.jsonl"), cases.as_bytes())?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// An expression template without its slots: what it asks to compute ("{a}/{b}" → "/").
    fn shape(expr: &str) -> String {
        let mut out = String::new();
        let mut in_slot = false;
        for c in expr.chars() {
            match c {
                '{' => in_slot = true,
                '}' => in_slot = false,
                c if !in_slot => out.push(c),
                _ => {}
            }
        }
        out
    }

    /// The shapes of `list`'s held-out entries, and those of its training entries plus `more`.
    fn shapes(
        list: &[(&str, &str)],
        more: &[(&str, &str)],
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let side = |held: bool| {
            list.iter()
                .enumerate()
                .filter(move |(i, _)| held_out(*i) == held)
        };
        let held = side(true).map(|(_, t)| shape(t.1)).collect();
        let train = side(false)
            .map(|(_, t)| t)
            .chain(more)
            .map(|t| shape(t.1))
            .collect();
        (held, train)
    }

    /// A split by template tests new wordings of what training taught, not a computation training
    /// never asked for: every held-out template's expression shape has a training twin. (Before
    /// `WORD_PROBLEMS_MORE`, the held-out word problems were all divisions and training had none.)
    #[test]
    fn training_asks_for_every_computation_the_held_out_templates_do() {
        let pairs =
            |l: &[(&'static str, &'static str, char)]| -> Vec<(&'static str, &'static str)> {
                l.iter().map(|t| (t.0, t.1)).collect()
            };
        let lists = [
            ("ARITH", pairs(ARITH), pairs(OPERATOR_WORDS)),
            (
                "WORD_PROBLEMS",
                WORD_PROBLEMS.to_vec(),
                WORD_PROBLEMS_MORE.to_vec(),
            ),
            ("FUNCTIONS", FUNCTIONS.to_vec(), FUNCTION_WORDS.to_vec()),
            ("FOLLOW_UPS", FOLLOW_UPS.to_vec(), Vec::new()),
        ];
        for (name, list, more) in lists {
            let (held, train) = shapes(&list, &more);
            let missing: Vec<_> = held.difference(&train).collect();
            assert!(missing.is_empty(), "{name}: held out only: {missing:?}");
        }
        // Training-only chit-chat: one list per `NO_TOOL` group, none a held-out phrasing.
        assert_eq!(NO_TOOL_MORE.len(), NO_TOOL.len());
        for ((asks, _), more) in NO_TOOL.iter().zip(NO_TOOL_MORE) {
            let held: Vec<_> = asks
                .iter()
                .enumerate()
                .filter(|(i, _)| held_out(*i))
                .collect();
            assert!(held.iter().all(|(_, h)| !more.contains(h)), "{held:?}");
        }
        // The check can fail: without the training-only problems, division is held out only.
        let (held, train) = shapes(WORD_PROBLEMS, &[]);
        assert!(!held.is_subset(&train), "{held:?} {train:?}");
    }
}
