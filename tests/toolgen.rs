//! `tb-tok toolchat`'s generator: deterministic, held out by template and entity, every injected
//! result the real tool's; and the tools' meaning-aware argument comparison the scorer uses.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use tinybit::template::Conversation;
use tinybit::toolgen::{self, Scratch};
use tinybit::tools::Tool;

fn generate(dir: &std::path::Path, seed: u64, train: usize, heldout: usize) {
    toolgen::write(dir, seed, train, heldout, "You are a test.", None).unwrap();
}

fn read(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

#[test]
fn toolchat_is_deterministic_and_leaves_no_scratch_database() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    generate(a.path(), 7, 300, 40);
    generate(b.path(), 7, 300, 40);
    for f in ["train.jsonl", "heldout.jsonl", "cases.jsonl", "train.txt"] {
        assert_eq!(
            read(a.path(), f),
            read(b.path(), f),
            "{f} differs between runs"
        );
    }
    let names: Vec<String> = std::fs::read_dir(a.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    // The held-out set does not depend on the training set's size.
    let c = tempfile::tempdir().unwrap();
    generate(c.path(), 7, 50, 40);
    assert_eq!(
        read(a.path(), "heldout.jsonl"),
        read(c.path(), "heldout.jsonl")
    );
    assert_ne!(read(a.path(), "train.jsonl"), read(c.path(), "train.jsonl"));
}

/// The texts a conversation's gold calls carry (todo texts, note bodies, event titles).
fn entities(line: &str) -> Vec<String> {
    let conv: Conversation = serde_json::from_str(line).unwrap();
    conv.messages
        .iter()
        .filter_map(|m| m.tool_call.as_ref())
        .flat_map(|c| {
            ["text", "body", "title"]
                .iter()
                .filter_map(|k| c["args"][k].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn held_out_conversations_use_entities_and_phrasings_training_never_shows() {
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), 3, 3000, 300);
    let train = read(d.path(), "train.jsonl");
    let held = read(d.path(), "heldout.jsonl");
    let train_entities: BTreeSet<String> = train.lines().flat_map(entities).collect();
    let held_entities: BTreeSet<String> = held.lines().flat_map(entities).collect();
    assert!(held_entities.len() >= 10, "{held_entities:?}");
    let shared: Vec<_> = held_entities.intersection(&train_entities).collect();
    assert!(shared.is_empty(), "entities in both splits: {shared:?}");
    // Training fillers include English words (so copying is learnt over real words' tokens), but
    // never a word of a held-out entity: these three, of "hair dryer", "printer cable" and "ice
    // skates", are in the word list, and only held-out entities use them.
    let words: BTreeSet<&str> = include_str!("../src/lib/assets/words.txt")
        .lines()
        .collect();
    let train_words: BTreeSet<String> = train_entities
        .iter()
        .flat_map(|e| e.split(' ').map(str::to_lowercase).collect::<Vec<_>>())
        .collect();
    let copied = train_words
        .iter()
        .filter(|w| words.contains(w.as_str()))
        .count();
    assert!(
        copied >= 300,
        "only {copied} English filler words in training"
    );
    let lower = train.to_lowercase();
    let fillers: BTreeSet<&str> = toolgen::corpus_words().iter().copied().collect();
    assert!(fillers.len() > 5000, "{} filler words", fillers.len());
    let held_words: BTreeSet<String> = held_entities
        .iter()
        .flat_map(|e| e.split(' ').map(str::to_lowercase).collect::<Vec<_>>())
        .collect();
    for w in ["hair", "cable", "ice"] {
        assert!(words.contains(w), "{w} left the word list: pick another");
        assert!(held_words.contains(w), "{w} is not in a held-out entity");
        assert!(
            !fillers.contains(w),
            "held-out entity word {w:?} is a filler"
        );
        assert!(
            !lower.contains(&format!(" {w} ")) && !lower.contains(&format!(" {w}\"")),
            "held-out entity word {w:?} reached training"
        );
    }
    // Phrasings: a held-out request's words around its values never start a training request.
    let firsts = |text: &str| -> BTreeSet<String> {
        text.lines()
            .flat_map(|l| {
                let c: Conversation = serde_json::from_str(l).unwrap();
                c.messages
                    .into_iter()
                    .filter(|m| {
                        m.role == "user" && m.content.to_lowercase().starts_with("remind me of ")
                    })
                    .map(|m| m.content)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // "remind me of {title} ... in my calendar" is the held-out calendar phrasing (index 9).
    assert!(
        firsts(&train).is_empty(),
        "a held-out phrasing reached training"
    );
    assert!(
        !firsts(&held).is_empty(),
        "the held-out phrasing never appears"
    );
    // Every case names what it expects and where its tools start.
    let cases: Vec<Value> = read(d.path(), "cases.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(cases.len() >= 300);
    assert!(
        cases.iter().any(|c| c["expected"].is_null()),
        "no no-tool case"
    );
    assert!(
        cases
            .iter()
            .all(|c| c["now"].is_string() && c["setup"].is_array())
    );
    let tools: BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| c["expected"]["tool"].as_str())
        .collect();
    assert_eq!(
        tools,
        ["calculator", "calendar", "notes", "time", "todos"]
            .into_iter()
            .collect()
    );
}

/// The distinct token ids of what the assistant writes in `jsonl` (its calls and its replies):
/// what fine-tuning makes the model write.
fn written_tokens(jsonl: &str, tok: &tinybit::tokenizer::Tokenizer) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for line in jsonl.lines() {
        let conv: Conversation = serde_json::from_str(line).unwrap();
        for m in conv.messages.iter().filter(|m| m.role == "assistant") {
            let call = m
                .tool_call
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            for text in [&m.content, &call] {
                ids.extend(tok.encode(&format!(" {text}")).unwrap());
            }
        }
    }
    ids
}

/// With the model's tokenizer, training fillers are built from its word pieces: the assistant
/// writes many more of the model's tokens in training, the held-out files stay byte for byte
/// the same, and no held-out entity's word becomes a filler.
#[test]
fn fillers_from_the_tokenizer_cover_its_pieces_and_leave_the_held_out_side_alone() {
    let model = tinybit::bundled::path().unwrap();
    let tok = tinybit::cli::load_tokenizer(Some(&model), None).unwrap();
    let (plain, pieces) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    toolgen::write(plain.path(), 4, 2000, 200, "You are a test.", None).unwrap();
    toolgen::write(pieces.path(), 4, 2000, 200, "You are a test.", Some(&tok)).unwrap();
    for f in ["heldout.jsonl", "cases.jsonl"] {
        assert_eq!(read(plain.path(), f), read(pieces.path(), f), "{f} changed");
    }
    let (before, after) = (
        read(plain.path(), "train.jsonl"),
        read(pieces.path(), "train.jsonl"),
    );
    let (n0, n1) = (
        written_tokens(&before, &tok).len(),
        written_tokens(&after, &tok).len(),
    );
    assert!(
        n1 >= n0 + n0 / 8,
        "the assistant writes {n1} distinct tokens, {n0} without pieces"
    );
    let train_entities: BTreeSet<String> = after.lines().flat_map(entities).collect();
    let held = read(pieces.path(), "heldout.jsonl");
    let held_entities: BTreeSet<String> = held.lines().flat_map(entities).collect();
    let shared: Vec<_> = held_entities.intersection(&train_entities).collect();
    assert!(shared.is_empty(), "entities in both splits: {shared:?}");
    // " hair" is one token of the vocabulary, and the word of the held-out "hair dryer".
    let lower = after.to_lowercase();
    assert!(
        !lower.contains(" hair ") && !lower.contains(" hair\""),
        "a held-out word is a filler"
    );
}

/// A tokenizer with no word pieces to build fillers from (one trained on digits: its letters are
/// single bytes, no token starts a word) is refused with a clear error before anything is written.
#[test]
fn a_tokenizer_without_word_pieces_is_refused_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("digits.txt");
    std::fs::write(&text, "12 34 56 78 90 1234 5678\n".repeat(50)).unwrap();
    let tok = tinybit::tokenizer::Tokenizer::train_bpe(&[text], 300).unwrap();
    let out = d.path().join("out");
    let err = toolgen::write(&out, 1, 20, 5, "You are a test.", Some(&tok))
        .err()
        .expect("a tokenizer without pieces is refused");
    assert!(err.to_string().contains("no word pieces"), "{err}");
    assert!(!out.exists(), "something was written");
}

#[test]
fn every_injected_result_is_what_the_real_tool_returns() {
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), 5, 200, 0);
    let db = tempfile::tempdir().unwrap();
    let scratch = Scratch::new(&db.path().join("t.db"));
    let cases = tempfile::tempdir().unwrap();
    // Re-run each held-out case's conversation on a fresh database: the replayed calls give the
    // results the generator injected.
    generate(cases.path(), 5, 0, 60);
    let mut checked = 0;
    for line in read(cases.path(), "cases.jsonl").lines() {
        let c: Value = serde_json::from_str(line).unwrap();
        let now = chrono::DateTime::parse_from_rfc3339(c["now"].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc);
        let reg = scratch.reset(now).unwrap();
        let msgs = c["messages"].as_array().unwrap();
        let calls: Vec<(usize, &Value)> = msgs
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.get("tool_call").map(|c| (i, c)))
            .collect();
        for step in toolgen::replay_order(c["setup"].as_array().unwrap(), &calls) {
            let call = step.call;
            let got = reg
                .call(call["tool"].as_str().unwrap(), &call["args"])
                .unwrap();
            if let Some(i) = step.index {
                let injected: Value =
                    serde_json::from_str(msgs[i + 1]["content"].as_str().unwrap()).unwrap();
                assert_eq!(got, injected, "call {call}");
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} calls replayed");
    // The training text renders the tools line every conversation is shown.
    assert!(read(d.path(), "train.txt").contains("\ntools: calculator(expr: string)"));
}

#[test]
fn tools_compare_arguments_by_meaning() {
    use tinybit::tools::{
        calculator::Calculator, calendar::Calendar, db::Store, time::fixed_clock,
    };
    let calc = Calculator;
    assert!(calc.same_args(&json!({"expr": "12*18"}), &json!({"expr": "18 * 12"})));
    assert!(!calc.same_args(&json!({"expr": "12+18"}), &json!({"expr": "12*18"})));
    assert!(!calc.same_args(&json!({"expr": "12*18"}), &json!({"expr": "12*18", "x": 1})));
    let d = tempfile::tempdir().unwrap();
    let cal = Calendar::new(
        std::sync::Arc::new(Store::at(d.path().join("c.db"))),
        chrono_tz::UTC,
        fixed_clock(chrono::Utc::now()),
    );
    let add = |start: &str| json!({"action": "add", "title": "dentist", "start": start});
    assert!(cal.same_args(&add("2026-12-10T15:00"), &add("2026-12-10T15:00:00")));
    assert!(cal.same_args(&add("2026-12-10T15:00"), &add("2026-12-10T15:00Z")));
    assert!(!cal.same_args(&add("2026-12-10T15:00"), &add("2026-12-10T16:00")));
    assert!(!cal.same_args(
        &add("2026-12-10T15:00"),
        &json!({"action": "add", "title": "dentist!", "start": "2026-12-10T15:00"})
    ));
}

/// Constrained decoding (`constrain`) lets a call take only what the registry's schemas and the
/// user's words allow: every gold call the generator writes, cut into the bundled model's tokens,
/// must pass it token by token, or the constraint would forbid the call the model was trained to
/// write.
#[test]
fn every_gold_call_passes_the_call_constraint_token_by_token() {
    use tinybit::constrain::{CallConstraint, Scan};
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), 11, 3000, 300);
    let db = tempfile::tempdir().unwrap();
    let reg = Scratch::new(&db.path().join("t.db"))
        .reset(chrono::Utc::now())
        .unwrap();
    let model = tinybit::bundled::path().unwrap();
    let tok = tinybit::cli::load_tokenizer(Some(&model), None).unwrap();
    let q = CallConstraint::new(&reg, &tok);
    let end = tok
        .special_id(tinybit::tokenizer::Special::EndToolCall)
        .unwrap();
    let (mut calls, mut quoted, mut bad) = (0, 0, Vec::new());
    for file in ["train.jsonl", "heldout.jsonl"] {
        for line in read(d.path(), file).lines() {
            let conv: Conversation = serde_json::from_str(line).unwrap();
            for (i, m) in conv.messages.iter().enumerate() {
                let Some(call) = &m.tool_call else { continue };
                let source =
                    CallConstraint::source(&tinybit::constrain::quotable(&conv.messages[..=i]));
                let text = serde_json::to_string(call).unwrap();
                let mut ids = tok.encode(&text).unwrap();
                ids.push(end);
                let mut written = Vec::new();
                calls += 1;
                for id in ids {
                    let scan = Scan::of(&q, &written);
                    quoted += scan.quoted_value().is_some() as usize;
                    if !q.allowed(&scan, &source, id) {
                        let at = String::from_utf8_lossy(&written).into_owned();
                        bad.push(format!("{text} at {at:?}"));
                        break;
                    }
                    written.extend(tok.token_bytes(id));
                }
            }
        }
    }
    assert!(
        calls > 2000 && quoted > 1000,
        "{calls} calls, {quoted} quoted tokens"
    );
    assert!(
        bad.is_empty(),
        "{} of {calls}: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}
