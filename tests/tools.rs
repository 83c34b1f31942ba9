//! The tools, their registry, the JSON Lines protocol and the `tb-tool` binary (issue 6).

use crate::common::records;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::{Value, json};
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use tinybit::tools::calculator::{self, MAX_DEPTH, MAX_LEN};
use tinybit::tools::db::{SCHEMA_VERSION, Store};
use tinybit::tools::time::fixed_clock;
use tinybit::tools::{Registry, run_stream};

const BIN: &str = env!("CARGO_BIN_EXE_tb-tool");

fn at(iso: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(iso)
        .unwrap()
        .with_timezone(&Utc)
}

/// The built-ins over a database in `dir`, in `zone`, with the clock stopped at `now`.
fn registry(dir: &Path, zone: Tz, now: &str) -> Registry {
    Registry::builtins(
        Arc::new(Store::at(dir.join("tools.db"))),
        zone,
        fixed_clock(at(now)),
    )
}

fn berlin(dir: &Path, now: &str) -> Registry {
    registry(dir, chrono_tz::Europe::Berlin, now)
}

fn ok(r: &Registry, tool: &str, args: Value) -> Value {
    r.call(tool, &args)
        .unwrap_or_else(|e| panic!("{tool} {args}: {e}"))
}

fn err(r: &Registry, tool: &str, args: Value) -> String {
    match r.call(tool, &args) {
        Ok(v) => panic!("{tool} {args} should fail, gave {v}"),
        Err(e) => e,
    }
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_i64().unwrap())
        .collect()
}

fn titles(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["title"].as_str().unwrap())
        .collect()
}

fn calc(expr: &str) -> Result<Value, String> {
    let dir = tempfile::tempdir().unwrap();
    registry(dir.path(), Tz::UTC, "2026-01-01T00:00:00Z")
        .call("calculator", &json!({ "expr": expr }))
}

/// Runs tb-tool with `args`, `stdin` and extra environment; no database outside `TINYBIT_DB`.
fn tb_tool(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env("TINYBIT_DB", "/nonexistent/tinybit-test/tools.db")
        .env("TZ", "UTC");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("tb-tool starts");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

// ---- calculator ----

#[test]
fn calculator_answers() {
    for (expr, want) in [
        ("2^10", json!(1024)),
        ("12^2", json!(144)),
        ("sqrt(144)", json!(12)),
        ("1 + 2 * 3", json!(7)),
        ("7/2", json!(3.5)),
        ("2^3^2", json!(512)),
        ("(2^3)^2", json!(64)),
        ("2^3^2^0", json!(8)),
        ("-2^2", json!(-4)),
        ("2^-1", json!(0.5)),
        ("10 % 3", json!(1)),
        ("log(1000)", json!(3)),
        ("log(8, 2)", json!(3)),
        ("max(1, 5, 3) - min(4, 2)", json!(3)),
        ("abs(-3) + floor(2.7) + ceil(0.2)", json!(6)),
        ("9223372036854775807 + 1", json!(9223372036854775808.0)),
    ] {
        assert_eq!(calc(expr), Ok(want), "{expr}");
    }
    assert_eq!(calc("pi").unwrap().as_f64().unwrap(), std::f64::consts::PI);
    assert_eq!(calc("e").unwrap().as_f64().unwrap(), std::f64::consts::E);
    assert!((calc("sin(pi / 2) + cos(0)").unwrap().as_f64().unwrap() - 2.0).abs() < 1e-12);
}

#[test]
fn calculator_errors_say_what_went_wrong() {
    for (expr, says) in [
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("1/(1/0)", "division by zero"),
        ("0/0", "division by zero"),
        ("2^100000", "overflow"),
        ("10^308 * 10", "overflow"),
        ("sqrt(-1)", "no real value"),
        ("foo(1)", "unknown function 'foo'"),
        ("x + 1", "unknown name 'x'"),
        ("a = 3", "not arithmetic"),
        ("1; 2", "not arithmetic"),
        ("1 < 2", "not arithmetic"),
        ("\"text\"", "only numbers"),
        ("true", "only numbers"),
        ("sqrt(1, 2)", "takes 1 argument"),
        ("(1, 2)", "several values"),
        ("1 +", "cannot evaluate"),
        ("", "empty"),
        ("   ", "empty"),
        ("(1", "never closed"),
        ("1)", "no matching"),
    ] {
        let e = calc(expr).unwrap_err();
        assert!(
            e.contains(says),
            "{expr:?} gave {e:?}, expected it to say {says:?}"
        );
    }
    // No state between calls: an assignment is refused, and the name stays unknown.
    assert!(calc("a = 3").is_err());
    assert!(calc("a").unwrap_err().contains("unknown name 'a'"));

    let dir = tempfile::tempdir().unwrap();
    let r = registry(dir.path(), Tz::UTC, "2026-01-01T00:00:00Z");
    assert!(err(&r, "calculator", json!({"exp": "1"})).contains("unknown field `exp`"));
    assert!(err(&r, "calculator", json!({})).contains("missing field `expr`"));
    assert!(err(&r, "calculator", json!({"expr": 5})).contains("bad arguments for calculator"));
}

#[test]
fn calculator_survives_hostile_input() {
    let nested = |n: usize| format!("{}1{}", "(".repeat(n), ")".repeat(n));
    let cases = [
        "1+".repeat(50_000) + "1", // 100k characters
        nested(10_000),            // 10k nested parentheses
        "(".repeat(100_000),       // unbalanced and huge
        nested(MAX_DEPTH + 1),     // just over the depth cap
        "sqrt(".repeat(MAX_DEPTH + 1) + "1" + &")".repeat(MAX_DEPTH + 1),
        "2^100000".to_string(),
        "２+２".to_string(), // full-width digits
        "π * 2".to_string(),
        "1 + \u{0}".to_string(),
        "9".repeat(MAX_LEN + 1),
        "1".repeat(400),                               // a number beyond f64
        "str::substring(\"hello\", 9, 2)".to_string(), // evalexpr's own builtins are off
    ];
    for expr in &cases {
        let shown: String = expr.chars().take(30).collect();
        let result = calc(expr);
        assert!(
            result.is_err(),
            "{shown}… should be refused, gave {result:?}"
        );
    }
    // At the limits, work still gets done, and quickly enough for a test.
    assert_eq!(calc(&nested(MAX_DEPTH)), Ok(json!(1)));
    let negations = "-".repeat(MAX_LEN - 1) + "1"; // odd count of '-' signs
    assert_eq!(calc(&negations), Ok(json!(-1)));
    let tower = "1^".repeat((MAX_LEN - 1) / 2) + "1";
    assert_eq!(calc(&tower), Ok(json!(1)));
    let sum = "1+".repeat((MAX_LEN - 1) / 2) + "1";
    assert_eq!(calc(&sum), Ok(json!((MAX_LEN - 1) / 2 + 1)));
}

#[test]
fn calculator_whole_numbers_are_json_integers() {
    assert_eq!(calculator::to_json(1024.0), json!(1024));
    assert_eq!(calculator::to_json(-0.0), json!(0));
    assert_eq!(calculator::to_json(2.5), json!(2.5));
    assert_eq!(calculator::to_json(1e300), json!(1e300));
}

// ---- time ----

#[test]
fn time_in_zones_and_across_dst() {
    let dir = tempfile::tempdir().unwrap();
    let summer = berlin(dir.path(), "2026-07-01T12:00:00Z");
    let t = ok(&summer, "time", json!({}));
    assert_eq!(t["iso"], "2026-07-01T14:00:00+02:00");
    assert_eq!(
        (t["date"].as_str(), t["time"].as_str()),
        (Some("2026-07-01"), Some("14:00:00"))
    );
    assert_eq!(
        (t["weekday"].as_str(), t["zone"].as_str()),
        (Some("Wednesday"), Some("Europe/Berlin"))
    );
    assert_eq!(
        (t["offset"].as_str(), t["abbreviation"].as_str()),
        (Some("+02:00"), Some("CEST"))
    );
    assert_eq!(t["unix"], at("2026-07-01T12:00:00Z").timestamp());

    let winter = berlin(dir.path(), "2026-01-15T23:30:00Z");
    let t = ok(&winter, "time", json!({}));
    assert_eq!(
        (t["date"].as_str(), t["offset"].as_str()),
        (Some("2026-01-16"), Some("+01:00"))
    );
    assert_eq!(t["weekday"], "Friday");

    let tokyo = ok(&winter, "time", json!({"zone": "asia/tokyo"}));
    assert_eq!(
        (tokyo["zone"].as_str(), tokyo["time"].as_str()),
        (Some("Asia/Tokyo"), Some("08:30:00"))
    );
    let utc = ok(&winter, "time", json!({"zone": "utc"}));
    assert_eq!(
        (utc["zone"].as_str(), utc["iso"].as_str()),
        (Some("UTC"), Some("2026-01-15T23:30:00+00:00"))
    );

    assert!(
        err(&winter, "time", json!({"zone": "Mars/Olympus"}))
            .contains("unknown time zone 'Mars/Olympus'")
    );
    assert!(err(&winter, "time", json!({"tz": "UTC"})).contains("unknown field `tz`"));
}

// ---- todos ----

#[test]
fn todos_add_list_complete_delete() {
    let dir = tempfile::tempdir().unwrap();
    let r = berlin(dir.path(), "2026-05-01T08:00:00Z");
    for (i, text) in ["buy milk", "call mum", "water plants"].iter().enumerate() {
        let item = ok(&r, "todos", json!({"action": "add", "text": text}));
        assert_eq!(
            item,
            json!({"id": i + 1, "text": text, "done": false, "created": "2026-05-01T08:00:00Z", "completed": null})
        );
    }
    let done = ok(&r, "todos", json!({"action": "complete", "id": 2}));
    assert_eq!(
        (done["id"].as_i64(), done["done"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(ids(&ok(&r, "todos", json!({"action": "list"}))), [1, 3]);
    assert_eq!(
        ids(&ok(
            &r,
            "todos",
            json!({"action": "list", "status": "done"})
        )),
        [2]
    );
    assert_eq!(
        ids(&ok(&r, "todos", json!({"action": "list", "status": "all"}))),
        [1, 2, 3]
    );

    let gone = ok(&r, "todos", json!({"action": "delete", "id": "1"}));
    assert_eq!(
        (gone["text"].as_str(), gone["deleted"].as_bool()),
        (Some("buy milk"), Some(true))
    );
    let all = ok(&r, "todos", json!({"action": "list", "status": "all"}));
    assert_eq!(ids(&all), [2, 3]);
    assert_eq!(all[0]["done"], true);
    assert_eq!(all[1]["done"], false);
    // Ids are stable: a deleted id is never handed out again.
    assert_eq!(
        ok(&r, "todos", json!({"action": "add", "text": "new"}))["id"],
        4
    );

    for (args, says) in [
        (
            json!({"action": "complete", "id": 99}),
            "no item with id 99",
        ),
        (json!({"action": "delete", "id": 1}), "no item with id 1"),
        (json!({"action": "add", "text": "  "}), "empty"),
        (json!({"action": "add"}), "missing field `text`"),
        (
            json!({"action": "list", "status": "later"}),
            "unknown variant `later`",
        ),
        (
            json!({"action": "complete", "id": "abc"}),
            "positive integer",
        ),
        (json!({"action": "complete", "id": -1}), "positive integer"),
        (
            json!({"action": "finish", "id": 1}),
            "unknown action 'finish'",
        ),
        (json!({"text": "x"}), "missing \"action\""),
        (
            json!({"action": "add", "text": "x", "due": "today"}),
            "unknown field `due`",
        ),
    ] {
        let e = err(&r, "todos", args.clone());
        assert!(e.contains(says), "{args} gave {e:?}");
    }
    assert_eq!(
        ids(&ok(&r, "todos", json!({"action": "list", "status": "all"}))),
        [2, 3, 4]
    );
}

// ---- notes ----

#[test]
fn notes_save_search_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    let r = berlin(dir.path(), "2026-05-01T08:00:00Z");
    let gc = ok(
        &r,
        "notes",
        json!({"action": "save", "title": "GC", "body": "The garbage collector pauses for 40 ms.", "tags": ["rust", "#perf"]}),
    );
    assert_eq!(
        gc,
        json!({"id": 1, "title": "GC", "body": "The garbage collector pauses for 40 ms.", "tags": ["rust", "perf"], "created": "2026-05-01T08:00:00Z"})
    );
    let shop = ok(
        &r,
        "notes",
        json!({"action": "save", "body": "Shopping\nmilk, eggs and bread", "tags": "home, errands"}),
    );
    assert_eq!(
        (shop["title"].as_str(), shop["tags"].clone()),
        (Some("Shopping"), json!(["home", "errands"]))
    );
    ok(
        &r,
        "notes",
        json!({"action": "save", "title": "Collectors", "body": "stamps"}),
    );
    // Two more notes, so that bm25's IDF is positive for words found in two notes.
    ok(
        &r,
        "notes",
        json!({"action": "save", "title": "Trip", "body": "train at nine"}),
    );
    ok(
        &r,
        "notes",
        json!({"action": "save", "title": "Books", "body": "a novel"}),
    );

    let hits = ok(&r, "notes", json!({"action": "search", "query": "garbage"}));
    assert_eq!(ids(&hits), [1]);
    assert_eq!(
        hits[0]["snippet"].as_str().unwrap(),
        "The [garbage] collector pauses for 40 ms."
    );
    assert!(hits[0]["score"].as_f64().unwrap().is_finite());
    // A word in a title outranks the same word in a body; porter stemming matches "collectors".
    assert_eq!(
        titles(&ok(
            &r,
            "notes",
            json!({"action": "search", "query": "collector"})
        )),
        ["Collectors", "GC"]
    );
    // All words must match when some note has them all; otherwise any word will do.
    assert_eq!(
        ids(&ok(
            &r,
            "notes",
            json!({"action": "search", "query": "milk bread"})
        )),
        [2]
    );
    assert_eq!(
        ids(&ok(
            &r,
            "notes",
            json!({"action": "search", "query": "milk garbage"})
        ))
        .len(),
        2
    );
    assert_eq!(
        ids(&ok(
            &r,
            "notes",
            json!({"action": "search", "query": "garb*"})
        )),
        [1]
    );

    let list = ok(&r, "notes", json!({"action": "list"}));
    assert_eq!(ids(&list), [5, 4, 3, 2, 1]);
    assert_eq!(list[4], gc);
    assert_eq!(
        ids(&ok(&r, "notes", json!({"action": "list", "tag": "HOME"}))),
        [2]
    );
    assert_eq!(
        ids(&ok(&r, "notes", json!({"action": "list", "limit": 1}))),
        [5]
    );

    let gone = ok(&r, "notes", json!({"action": "delete", "id": 2}));
    assert_eq!(
        (gone["title"].as_str(), gone["deleted"].as_bool()),
        (Some("Shopping"), Some(true))
    );
    assert_eq!(
        ids(&ok(&r, "notes", json!({"action": "list"}))),
        [5, 4, 3, 1]
    );
    assert_eq!(
        ok(&r, "notes", json!({"action": "search", "query": "milk"})),
        json!([])
    );

    for (args, says) in [
        (json!({"action": "delete", "id": 2}), "no note with id 2"),
        (json!({"action": "search", "query": " "}), "query is empty"),
        (
            json!({"action": "search", "query": "x", "limit": 0}),
            "limit must be at least 1",
        ),
        (json!({"action": "save", "body": ""}), "empty"),
        (
            json!({"action": "save", "body": "x", "tags": 3}),
            "bad arguments for notes save",
        ),
        (json!({"action": "open", "id": 1}), "unknown action 'open'"),
    ] {
        let e = err(&r, "notes", args.clone());
        assert!(e.contains(says), "{args} gave {e:?}");
    }
}

#[test]
fn notes_any_text_is_a_valid_query() {
    let dir = tempfile::tempdir().unwrap();
    let r = berlin(dir.path(), "2026-05-01T08:00:00Z");
    ok(
        &r,
        "notes",
        json!({"action": "save", "title": "maths", "body": "what's 2+2? (four) -- see title:x and \"quoted\" text"}),
    );
    for query in [
        "\"quoted\"",
        "\"quoted",
        "quo*",
        "-",
        "--",
        "four)",
        "(four",
        "title:x",
        "see:",
        "x OR",
        "AND",
        "NOT x",
        "NEAR(a b)",
        "what's 2+2?",
        "*",
        "\"",
        "'",
        "^",
        "a -b",
        "col:val",
        "(((",
        "😀 four",
        "four\u{0}",
    ] {
        let hits = r.call("notes", &json!({"action": "search", "query": query}));
        assert!(hits.is_ok(), "{query:?} gave {hits:?}");
    }
    for query in [
        "\"quoted\"",
        "quo*",
        "(four",
        "four)",
        "title:x",
        "what's 2+2?",
        "-- four",
    ] {
        assert_eq!(
            ids(&ok(
                &r,
                "notes",
                json!({"action": "search", "query": query})
            )),
            [1],
            "{query:?}"
        );
    }
    let q = tinybit::tools::notes::fts_queries("say \"hi\" -x").unwrap();
    assert_eq!(q.0, r#""say" """hi""" "-x""#);
    assert_eq!(tinybit::tools::notes::fts_queries("- ( ) *"), None);
}

// ---- calendar ----

fn add_event(r: &Registry, title: &str, start: &str, end: Option<&str>) -> Value {
    ok(
        r,
        "calendar",
        json!({"action": "add", "title": title, "start": start, "end": end}),
    )
}

#[test]
fn calendar_ranges_across_midnight_and_dst() {
    let dir = tempfile::tempdir().unwrap();
    // Sunday 2026-03-29: Berlin moves its clocks from 02:00 to 03:00; the day has 23 hours.
    let r = berlin(dir.path(), "2026-03-29T08:00:00Z");
    add_event(&r, "saturday late", "2026-03-28T23:30", None);
    let overnight = add_event(
        &r,
        "overnight",
        "2026-03-28T23:00",
        Some("2026-03-29T01:00"),
    );
    let early = add_event(&r, "sunday early", "2026-03-29T00:30", None);
    let after_gap = add_event(&r, "after the jump", "2026-03-29 03:30", None);
    add_event(&r, "sunday night", "2026-03-29T23:30", None);
    add_event(&r, "monday", "2026-03-30T00:10", None);
    add_event(&r, "utc input", "2026-03-29T12:00Z", None);
    add_event(
        &r,
        "overlapping",
        "2026-03-29T12:00",
        Some("2026-03-29T13:00"),
    );

    assert_eq!(overnight["start"], "2026-03-28T23:00:00+01:00");
    assert_eq!(overnight["end"], "2026-03-29T01:00:00+01:00");
    assert_eq!(early["start"], "2026-03-29T00:30:00+01:00");
    assert_eq!(after_gap["start"], "2026-03-29T03:30:00+02:00");

    let list = |args: Value| {
        titles(&ok(&r, "calendar", args))
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let today = list(json!({"action": "list"}));
    assert_eq!(
        today,
        [
            "overnight",
            "sunday early",
            "after the jump",
            "overlapping",
            "utc input",
            "sunday night"
        ]
    );
    assert_eq!(list(json!({"action": "list", "range": "today"})), today);
    assert_eq!(
        list(json!({"action": "list", "range": "tomorrow"})),
        ["monday"]
    );
    assert_eq!(
        list(json!({"action": "list", "from": "2026-03-28", "to": "2026-03-28"})),
        ["overnight", "saturday late"]
    );
    assert_eq!(list(json!({"action": "list", "range": "week"})).len(), 7);
    assert_eq!(
        list(
            json!({"action": "list", "from": "2026-03-29T13:30+02:00", "to": "2026-03-29T14:30+02:00"})
        ),
        ["utc input"]
    );
    assert_eq!(
        list(json!({"action": "list", "from": "2026-03-30"})),
        ["monday"]
    );
    assert_eq!(
        list(json!({"action": "list", "to": "2026-03-28T23:15"})),
        ["overnight"]
    );
    let utc_input = &ok(
        &r,
        "calendar",
        json!({"action": "list", "from": "2026-03-29T14:00"}),
    )[0];
    assert_eq!(utc_input["start"], "2026-03-29T14:00:00+02:00");

    let e = err(
        &r,
        "calendar",
        json!({"action": "add", "title": "x", "start": "2026-03-29T02:30"}),
    );
    assert!(e.contains("does not exist in Europe/Berlin"), "{e}");

    let gone = ok(
        &r,
        "calendar",
        json!({"action": "delete", "id": early["id"]}),
    );
    assert_eq!(gone["title"], "sunday early");
    assert!(!list(json!({"action": "list"})).contains(&"sunday early".to_string()));
    assert_eq!(list(json!({"action": "list"})).len(), 5);
}

#[test]
fn calendar_fall_back_day_has_25_hours() {
    let dir = tempfile::tempdir().unwrap();
    // Sunday 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    let r = berlin(dir.path(), "2026-10-25T12:00:00Z");
    let twice = add_event(&r, "ambiguous", "2026-10-25T02:30", None);
    assert_eq!(
        twice["start"], "2026-10-25T02:30:00+02:00",
        "the first of the two"
    );
    add_event(&r, "last minute", "2026-10-25T23:59", None);
    add_event(&r, "next day", "2026-10-26T00:00", None);
    add_event(&r, "before", "2026-10-24T23:59:59", None);
    let today = ok(&r, "calendar", json!({"action": "list"}));
    assert_eq!(titles(&today), ["ambiguous", "last minute"]);
    assert_eq!(today[1]["start"], "2026-10-25T23:59:00+01:00");
}

#[test]
fn calendar_errors() {
    let dir = tempfile::tempdir().unwrap();
    let r = berlin(dir.path(), "2026-05-01T08:00:00Z");
    for (args, says) in [
        (
            json!({"action": "add", "title": "x", "start": "tomorrow 9am"}),
            "not an ISO-8601",
        ),
        (
            json!({"action": "add", "title": "x", "start": "2026-13-01T09:00"}),
            "not an ISO-8601",
        ),
        (
            json!({"action": "add", "title": "x", "start": "2026-05-01T10:00", "end": "2026-05-01T09:00"}),
            "end is before the start",
        ),
        (
            json!({"action": "add", "title": " ", "start": "2026-05-01T10:00"}),
            "title is empty",
        ),
        (
            json!({"action": "add", "title": "x"}),
            "missing field `start`",
        ),
        (
            json!({"action": "list", "range": "month"}),
            "unknown range 'month'",
        ),
        (
            json!({"action": "list", "range": "today", "from": "2026-05-01"}),
            "go with range \"between\"",
        ),
        (
            json!({"action": "list", "range": "between"}),
            "needs from and/or to",
        ),
        (
            json!({"action": "list", "from": "2026-05-02", "to": "2026-05-01"}),
            "'to' must be after 'from'",
        ),
        (json!({"action": "delete", "id": 7}), "no event with id 7"),
    ] {
        let e = err(&r, "calendar", args.clone());
        assert!(e.contains(says), "{args} gave {e:?}");
    }
}

// ---- registry, protocol, database ----

#[test]
fn registry_lists_and_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let r = berlin(dir.path(), "2026-05-01T08:00:00Z");
    assert_eq!(
        r.names(),
        ["calculator", "calendar", "notes", "time", "todos"]
    );
    for entry in r.list() {
        assert!(
            entry["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty() && !d.contains('\n'))
        );
        assert_eq!(entry["schema"]["type"], "object", "{entry}");
    }
    let prompt = r.prompt_lines();
    let lines: Vec<&str> = prompt.lines().collect();
    assert_eq!(lines.len(), 5);
    assert!(
        lines[0].starts_with("calculator(expr: string) - Evaluate arithmetic"),
        "{}",
        lines[0]
    );
    assert!(
        lines[3].starts_with("time(zone?: string) - "),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].starts_with("todos(action: add|list|complete|delete, id?: integer, status?: open|done|all, text?: string) - "),
        "{}",
        lines[4]
    );
    assert!(lines[2].contains("tags?: [string]|string"), "{}", lines[2]);
    let e = err(&r, "nope", json!({}));
    assert!(
        e.contains("unknown tool 'nope'; known tools: calculator, calendar, notes, time, todos"),
        "{e}"
    );
}

#[test]
fn call_json_line_records() {
    let dir = tempfile::tempdir().unwrap();
    let r = berlin(dir.path(), "2026-05-01T08:00:00Z");
    let line = |text: &str, n| r.call_json_line(text, n).to_json_line();
    assert_eq!(
        line(r#"{"tool":"calculator","args":{"expr":"2^10"}}"#, 1),
        r#"{"tool":"calculator","ok":true,"result":1024}"#
    );
    assert_eq!(
        line(
            r#"{"id":"a7","tool":"calculator","args":{"expr":"1/0"}}"#,
            2
        ),
        r#"{"tool":"calculator","id":"a7","ok":false,"error":"calculator: division by zero in '1/0'","line":2}"#
    );
    let rec = r.call_json_line("{\"tool\":", 3).to_json();
    assert_eq!(
        (rec["tool"].clone(), rec["ok"].clone(), rec["line"].clone()),
        (Value::Null, json!(false), json!(3))
    );
    assert!(rec["error"].as_str().unwrap().starts_with("malformed JSON"));
    let rec = r
        .call_json_line(r#"{"tool":"time","args":[1]}"#, 4)
        .to_json();
    assert_eq!(
        (rec["tool"].as_str(), rec["error"].as_str()),
        (
            Some("time"),
            Some("\"args\" must be a JSON object of the tool's arguments")
        )
    );
    // Missing args means no arguments; an id may be any JSON value.
    let rec = r.call_json_line(r#"{"tool":"time","id":{"n":1}}"#, 5);
    assert!(rec.ok());
    assert_eq!(rec.to_json()["id"], json!({"n": 1}));
    assert_eq!(r.call_json_line("[1,2]", 6).to_json()["ok"], false);
    assert_eq!(
        r.call_json_line(r#"{"args":{}}"#, 7).to_json()["tool"],
        Value::Null
    );
    assert_eq!(
        r.call_json_line(r#"{"tool":"calculator","args":{"expr":"1/0"}}"#, 8)
            .injection(),
        json!({"error": "calculator: division by zero in '1/0'"})
    );
}

#[test]
fn stream_gives_one_record_per_line_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let r = berlin(dir.path(), "2026-05-01T08:00:00Z");
    let mut input = Vec::new();
    input.extend_from_slice(b"{\"tool\":\"calculator\",\"args\":{\"expr\":\"2^10\"}}\n");
    input.extend_from_slice(b"not json\r\n");
    input.extend_from_slice(b"\n");
    input.extend_from_slice(b"{\"tool\":\"\xff\"}\n");
    input.extend_from_slice(
        b"{\"tool\":\"todos\",\"args\":{\"action\":\"add\",\"text\":\"milk\"},\"id\":9}",
    );
    let mut out = Vec::new();
    let summary = run_stream(&r, &input[..], &mut out).unwrap();
    assert_eq!((summary.lines, summary.failed), (5, 3));
    let lines: Vec<Value> = out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let oks: Vec<bool> = lines.iter().map(|l| l["ok"].as_bool().unwrap()).collect();
    assert_eq!(oks, [true, false, false, false, true]);
    assert_eq!(
        lines.iter().map(|l| l["line"].as_u64()).collect::<Vec<_>>(),
        [None, Some(2), Some(3), Some(4), None]
    );
    assert!(
        lines[3]["error"]
            .as_str()
            .unwrap()
            .contains("not valid UTF-8")
    );
    assert_eq!(
        (lines[4]["id"].as_i64(), lines[4]["result"]["text"].as_str()),
        (Some(9), Some("milk"))
    );
}

#[test]
fn database_is_lazy_private_and_versioned() {
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("a/b");
    let path = db_dir.join("tools.db");
    let r = Registry::builtins(
        Arc::new(Store::at(&path)),
        Tz::UTC,
        fixed_clock(at("2026-05-01T08:00:00Z")),
    );
    ok(&r, "time", json!({}));
    ok(&r, "calculator", json!({"expr": "1+1"}));
    assert!(
        !dir.path().join("a").exists(),
        "time and calculator must not touch the disk"
    );
    ok(&r, "todos", json!({"action": "add", "text": "x"}));
    #[cfg(unix)]
    {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode(&dir.path().join("a")), mode(&db_dir), mode(&path)),
            (0o700, 0o700, 0o600)
        );
    }

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // Reopening migrates nothing and keeps the data.
    let again = Registry::builtins(
        Arc::new(Store::at(&path)),
        Tz::UTC,
        fixed_clock(at("2026-05-01T08:00:00Z")),
    );
    assert_eq!(ids(&ok(&again, "todos", json!({"action": "list"}))), [1]);
    // A database from a newer tinybit is refused with a message, not damaged.
    conn.execute(
        "UPDATE schema_version SET version = ?1",
        [SCHEMA_VERSION + 1],
    )
    .unwrap();
    drop(conn);
    let newer = Registry::builtins(
        Arc::new(Store::at(&path)),
        Tz::UTC,
        fixed_clock(at("2026-05-01T08:00:00Z")),
    );
    let e = err(&newer, "todos", json!({"action": "list"}));
    assert!(
        e.contains("newer tinybit") && e.contains(&path.display().to_string()),
        "{e}"
    );

    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
    let bad = Registry::builtins(
        Arc::new(Store::at(&junk)),
        Tz::UTC,
        fixed_clock(at("2026-05-01T08:00:00Z")),
    );
    let e = err(&bad, "notes", json!({"action": "list"}));
    assert!(
        e.contains("junk.db") && e.contains("not a tinybit tool database"),
        "{e}"
    );
}

// ---- tb-tool, the binary ----

#[test]
fn tb_tool_stream_mixed_lines_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let db = db.to_str().unwrap();
    let too_deep = format!("{}1{}", "(".repeat(65), ")".repeat(65));
    let input = [
        "{\"tool\":\"calculator\",\"args\":{\"expr\":\"2^10\"}}\n",
        "{\"tool\":\"calculator\",\"args\":{\"expr\":\n",
        "{\"tool\":\"weather\",\"args\":{}}\n",
        "{\"tool\":\"todos\",\"args\":{\"action\":\"add\"},\"id\":1}\n",
        "{\"tool\":\"todos\",\"args\":{\"action\":\"add\",\"text\":\"milk\"},\"id\":2}\n",
        (json!({"tool": "calculator", "args": {"expr": too_deep}}).to_string() + "\n").as_str(),
        "{\"tool\":\"time\",\"args\":{\"zone\":\"utc\"}}\n",
    ]
    .concat();
    let out = tb_tool(&[], input.as_bytes(), &[("TINYBIT_DB", db)]);
    assert_eq!(out.status.code(), Some(1), "some calls failed");
    let recs = records(&out);
    assert_eq!(recs.len(), 7);
    assert_eq!(
        recs[0],
        json!({"tool": "calculator", "ok": true, "result": 1024})
    );
    assert_eq!(
        (recs[1]["tool"].clone(), recs[1]["line"].clone()),
        (Value::Null, json!(2))
    );
    assert!(
        recs[2]["error"]
            .as_str()
            .unwrap()
            .contains("unknown tool 'weather'")
    );
    assert_eq!(
        (recs[3]["id"].clone(), recs[3]["line"].clone()),
        (json!(1), json!(4))
    );
    assert!(
        recs[3]["error"]
            .as_str()
            .unwrap()
            .contains("missing field `text`")
    );
    assert_eq!(
        (recs[4]["id"].clone(), recs[4]["result"]["text"].clone()),
        (json!(2), json!("milk"))
    );
    assert!(
        recs[5]["error"]
            .as_str()
            .unwrap()
            .contains("deeper than 64")
    );
    assert_eq!(
        (recs[6]["ok"].clone(), recs[6]["result"]["zone"].clone()),
        (json!(true), json!("UTC"))
    );

    let good = "{\"tool\":\"calculator\",\"args\":{\"expr\":\"12^2\"}}\n{\"tool\":\"time\"}\n";
    let out = tb_tool(&[], good.as_bytes(), &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(records(&out).len(), 2);
    let empty = tb_tool(&[], b"", &[]);
    assert_eq!((empty.status.code(), empty.stdout.len()), (Some(0), 0));
    assert_eq!(tb_tool(&["--bogus"], b"", &[]).status.code(), Some(2));
    assert_eq!(
        tb_tool(&["--timeout", "0"], b"", &[]).status.code(),
        Some(2)
    );
}

#[test]
fn tb_tool_hostile_calculator_stream_never_crashes() {
    let exprs = [
        "1+".repeat(50_000) + "1",
        "(".repeat(10_000) + "1" + &")".repeat(10_000),
        "2^100000".into(),
        "√2 × π".into(),
    ];
    let input: String = exprs
        .iter()
        .map(|e| json!({"tool": "calculator", "args": {"expr": e}}).to_string() + "\n")
        .collect();
    let out = tb_tool(&[], input.as_bytes(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    assert!(
        recs.iter()
            .all(|r| r["ok"] == false && r["error"].is_string())
    );
}

#[test]
fn tb_tool_one_shot_forms() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let env = [("TINYBIT_DB", db.to_str().unwrap())];
    let text = |out: &Output| String::from_utf8(out.stdout.clone()).unwrap();
    let out = tb_tool(&["calculator", "--expr", "2^10"], b"", &env);
    assert_eq!((out.status.code(), text(&out)), (Some(0), "1024\n".into()));
    let out = tb_tool(&["calculator", "--json", "sqrt(144)"], b"", &env);
    assert_eq!(
        text(&out),
        "{\"tool\":\"calculator\",\"ok\":true,\"result\":12}\n"
    );
    let out = tb_tool(&["calculator", "1/0"], b"", &env);
    assert_eq!((out.status.code(), text(&out)), (Some(1), String::new()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("division by zero"));

    let out = tb_tool(&["todos", "add", "buy", "milk"], b"", &env);
    assert_eq!(
        (out.status.code(), text(&out)),
        (Some(0), "   1 [ ] buy milk\n".into())
    );
    tb_tool(&["todos", "add", "call", "mum"], b"", &env);
    assert_eq!(
        text(&tb_tool(&["todos", "complete", "2"], b"", &env)),
        "   2 [x] call mum\n"
    );
    let out = tb_tool(&["todos", "list", "--status", "all", "--json"], b"", &env);
    assert_eq!(records(&out)[0]["result"].as_array().unwrap().len(), 2);
    assert_eq!(
        tb_tool(&["todos", "delete", "7"], b"", &env).status.code(),
        Some(1)
    );

    tb_tool(
        &[
            "notes",
            "save",
            "--title",
            "GC",
            "--tag",
            "rust",
            "the",
            "garbage",
            "collector",
        ],
        b"",
        &env,
    );
    let out = tb_tool(&["notes", "search", "garbage"], b"", &env);
    assert_eq!(text(&out), "   1 GC  #rust\n     the [garbage] collector\n");
    let out = tb_tool(
        &["calendar", "add", "--start", "2026-12-01T09:00", "dentist"],
        b"",
        &env,
    );
    assert_eq!(text(&out), "   1 2026-12-01T09:00:00+00:00  dentist\n");
    let out = tb_tool(
        &[
            "calendar",
            "list",
            "--from",
            "2026-12-01",
            "--to",
            "2026-12-01",
            "--json",
        ],
        b"",
        &env,
    );
    assert_eq!(records(&out)[0]["result"][0]["title"], "dentist");
    let out = tb_tool(&["call", "calculator", "{\"expr\":\"12^2\"}"], b"", &env);
    assert_eq!(text(&out), "144\n");
    assert_eq!(
        tb_tool(&["call", "calculator", "{bad"], b"", &env)
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        tb_tool(&["time", "--zone", "Mars"], b"", &env)
            .status
            .code(),
        Some(1)
    );

    let out = tb_tool(&["list"], b"", &env);
    let names: Vec<Value> = records(&out).iter().map(|t| t["name"].clone()).collect();
    assert_eq!(names, ["calculator", "calendar", "notes", "time", "todos"]);
    let out = tb_tool(&["list", "--prompt"], b"", &env);
    assert_eq!(text(&out).lines().count(), 5);
}

/// What the schema-derived forms refuse, with exit 2 and a message naming what to give, and
/// what their help lists.
#[test]
fn tb_tool_one_shot_forms_refuse_what_the_schema_lacks() {
    let env = [("TINYBIT_DB", "/nonexistent/tinybit-test/tools.db")];
    for (args, says) in [
        (&["todos"][..], "give one of add, list, complete, delete"),
        (&["todos", "finish", "3"], "finish is not an action"),
        (
            &["todos", "add", "--colour", "red", "milk"],
            "has no --colour; its arguments: --text",
        ),
        (&["todos", "add", "--text"], "--text needs a value"),
        (
            &["todos", "complete", "three"],
            "'three' is not a whole number",
        ),
        (&["todos", "list", "soon"], "fill no argument here"),
        (
            &["calendar", "add", "dentist"],
            "give all but one of --start, --title",
        ),
        (&["weather", "paris"], "unknown command or tool 'weather'"),
        (&["list", "--bogus"], "list takes only --prompt"),
        (&["call"], "call takes TOOL"),
    ] {
        let out = tb_tool(args, b"", &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let help = |args: &[&str]| String::from_utf8(tb_tool(args, b"", &env).stdout).unwrap();
    let add = help(&["notes", "save", "--help"]);
    for flag in ["--title TITLE", "--body BODY", "--tags TAGS", "--json"] {
        assert!(add.contains(flag), "{add}");
    }
    assert!(
        !add.contains("--query"),
        "search's argument is not save's: {add}"
    );
    assert!(help(&["todos", "-h"]).contains("Actions: add, list, complete, delete"));
}

#[test]
fn eight_processes_adding_200_todos_each_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh/tools.db");
    assert!(!db.exists());
    let children: Vec<_> = (0..8)
        .map(|p| {
            let mut child = Command::new(BIN)
                .arg("--no-external")
                .env("TINYBIT_DB", &db)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let input: String = (0..200)
                .map(|i| json!({"tool": "todos", "args": {"action": "add", "text": format!("p{p} item {i}")}}).to_string() + "\n")
                .collect();
            // Feed stdin from a thread so all eight run at once.
            let mut stdin = child.stdin.take().unwrap();
            std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
            child
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let recs = records(&out);
        assert_eq!(recs.len(), 200);
        assert!(
            recs.iter().all(|r| r["ok"] == true),
            "{:?}",
            recs.iter().find(|r| r["ok"] != true)
        );
    }
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (rows, distinct, max): (i64, i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT text), MAX(id) FROM todos",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((rows, distinct, max), (1600, 1600, 1600));
}

// ---- external tools (shell scripts: Unix only) ----
#[cfg(unix)]
mod external_tools {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;
    use tinybit::tools::Tool;
    use tinybit::tools::external::{self, External};

    /// `PATH` with `dir` first.
    fn path_with(dir: &Path) -> String {
        let path = std::env::var("PATH").unwrap_or_default();
        format!("{}:{path}", dir.display())
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A directory of external tools: echo (described), fail, hang (records its child's pid), text,
    /// one shadowing a built-in, one with a bad name, one not executable.
    fn external_tools(dir: &Path) {
        script(
            dir,
            "tb-tool-echo",
            r#"if [ "$1" = "--describe" ]; then
      echo '{"description":"Echo the arguments back","schema":{"type":"object","properties":{"text":{"type":"string"}},"required":["text"]}}'
      exit 0
    fi
    read -r line
    printf '{"echoed":%s}\n' "$line""#,
        );
        script(
            dir,
            "tb-tool-fail",
            "echo 'no such city: Atlantis' >&2\nexit 3",
        );
        let hang = format!(
            "[ \"$1\" = --describe ] && exit 1\nsleep 60 &\necho $! > {}/hang.pid\nwait",
            dir.display()
        );
        script(dir, "tb-tool-hang", &hang);
        script(dir, "tb-tool-text", "cat > /dev/null\necho plain words");
        script(dir, "tb-tool-calculator", "echo 666");
        script(dir, "tb-tool-bad.name", "echo x");
        std::fs::write(dir.join("tb-tool-noexec"), "#!/bin/sh\necho x\n").unwrap();
    }

    #[test]
    fn external_tools_are_found_listed_and_called() {
        let dir = tempfile::tempdir().unwrap();
        external_tools(dir.path());
        let path = std::env::join_paths([dir.path(), Path::new("/nonexistent-dir")]).unwrap();
        let found = external::discover(&path, Duration::from_secs(20));
        let names: Vec<&str> = found.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["calculator", "echo", "fail", "hang", "text"]);

        let echo = External::new(
            "echo",
            dir.path().join("tb-tool-echo"),
            Duration::from_secs(20),
        );
        assert_eq!(echo.description(), "Echo the arguments back");
        assert_eq!(echo.schema()["required"], json!(["text"]));
        assert_eq!(
            echo.call(&json!({"text": "hi"})),
            Ok(json!({"echoed": {"text": "hi"}}))
        );
        let text = External::new(
            "text",
            dir.path().join("tb-tool-text"),
            Duration::from_secs(20),
        );
        assert_eq!(text.call(&json!({})), Ok(json!("plain words")));
        assert!(text.description().contains("gave no description"));
        let fail = External::new(
            "fail",
            dir.path().join("tb-tool-fail"),
            Duration::from_secs(20),
        );
        let e = fail.call(&json!({})).unwrap_err();
        assert!(
            e.contains("external tool 'fail'")
                && e.contains("no such city: Atlantis")
                && e.contains("3"),
            "{e}"
        );
        let gone = External::new(
            "gone",
            dir.path().join("tb-tool-gone"),
            Duration::from_secs(20),
        );
        assert!(
            gone.call(&json!({}))
                .unwrap_err()
                .contains("could not start")
        );

        // Through the binary: listed beside the built-ins (which win a name clash), and callable.
        let env_path = path_with(dir.path());
        let env = [("PATH", env_path.as_str())];
        let list = records(&tb_tool(&["list"], b"", &env));
        let names: Vec<&str> = list.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "calculator",
                "calendar",
                "echo",
                "fail",
                "hang",
                "notes",
                "text",
                "time",
                "todos"
            ]
        );
        assert!(
            list[0]["description"]
                .as_str()
                .unwrap()
                .starts_with("Evaluate arithmetic")
        );
        assert_eq!(list[2]["description"], "Echo the arguments back");
        let calls = concat!(
            "{\"tool\":\"echo\",\"args\":{\"text\":\"hi\"},\"id\":1}\n",
            "{\"tool\":\"calculator\",\"args\":{\"expr\":\"1+1\"}}\n",
            "{\"tool\":\"fail\"}\n",
        );
        let out = tb_tool(&[], calls.as_bytes(), &env);
        let recs = records(&out);
        assert_eq!(
            recs[0],
            json!({"tool": "echo", "id": 1, "ok": true, "result": {"echoed": {"text": "hi"}}})
        );
        assert_eq!(recs[1]["result"], 2);
        assert_eq!(
            (recs[2]["ok"].clone(), out.status.code()),
            (json!(false), Some(1))
        );
        let out = tb_tool(&["--no-external", "call", "echo", "{}"], b"", &env);
        assert_eq!(out.status.code(), Some(1));
    }

    /// The one-shot form comes from the schema, so an external tool has one with no code.
    #[test]
    fn an_external_tool_gets_a_one_shot_form_from_its_schema() {
        let dir = tempfile::tempdir().unwrap();
        external_tools(dir.path());
        let env_path = path_with(dir.path());
        let env = [("PATH", env_path.as_str())];
        let text = |out: &Output| String::from_utf8(out.stdout.clone()).unwrap();
        let out = tb_tool(&["echo", "hello", "there"], b"", &env);
        assert_eq!(text(&out), "{\"echoed\":{\"text\":\"hello there\"}}\n");
        let out = tb_tool(&["echo", "--text", "hi", "--json"], b"", &env);
        assert_eq!(
            records(&out)[0],
            json!({"tool": "echo", "ok": true, "result": {"echoed": {"text": "hi"}}})
        );
        let help = text(&tb_tool(&["echo", "--help"], b"", &env));
        assert!(
            help.contains("--text TEXT") && help.contains("Echo the arguments back"),
            "{help}"
        );
    }

    #[test]
    fn a_hanging_external_tool_is_stopped_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        external_tools(dir.path());
        let env_path = path_with(dir.path());
        let calls =
            "{\"tool\":\"hang\",\"args\":{}}\n{\"tool\":\"echo\",\"args\":{\"text\":\"after\"}}\n";
        let out = tb_tool(
            &["--timeout", "0.5"],
            calls.as_bytes(),
            &[("PATH", env_path.as_str())],
        );
        let recs = records(&out);
        assert_eq!(recs.len(), 2);
        let e = recs[0]["error"].as_str().unwrap();
        assert!(
            e.contains("did not finish within 0.5 s and was stopped"),
            "{e}"
        );
        assert_eq!(recs[1]["result"], json!({"echoed": {"text": "after"}}));
        assert_eq!(out.status.code(), Some(1));
        // The tool's own child (sleep 60) was killed with it: gone, or a zombie awaiting its reaper.
        // SIGKILL takes effect asynchronously: wait for it rather than racing it.
        let pid = std::fs::read_to_string(dir.path().join("hang.pid")).unwrap();
        let stat =
            || std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        let dead =
            |s: &str| s.is_empty() || s.rsplit(") ").next().is_some_and(|st| st.starts_with('Z'));
        let mut waited = 0;
        while !dead(&stat()) && waited < 1000 {
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        assert!(dead(&stat()), "the tool's child still runs: {}", stat());
    }
}

// ---- documentation ----

/// The `### tb-tool` section of README.md.
fn readme_section() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("### tb-tool\n")
        .expect("README has a ### tb-tool section");
    let rest = &readme[start + 12..];
    let end = rest
        .find("\n## ")
        .into_iter()
        .chain(rest.find("\n### "))
        .min()
        .unwrap_or(rest.len());
    rest[..end].to_string()
}

#[test]
fn readme_example_is_the_compiled_doctest() {
    let section = readme_section();
    let start = section
        .find("```rust\n")
        .expect("the section has a ```rust example")
        + 8;
    let example = &section[start..start + section[start..].find("```").unwrap()];
    // The doctest on `Tool` (src/lib/tools/mod.rs) is compiled and run by `cargo test --doc`.
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib/tools/mod.rs"))
            .unwrap();
    let doc: String = source
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("///"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l).to_string() + "\n")
        .collect();
    let start = doc.find("```rust\n").expect("Tool has a ```rust doctest") + 8;
    let doctest = &doc[start..start + doc[start..].find("```").unwrap()];
    assert_eq!(
        example, doctest,
        "README's example and the doctest on Tool must be the same code"
    );
}

#[test]
fn man_page_documents_every_flag_and_command() {
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/man1/tb-tool.1"))
        .unwrap()
        .replace('\\', "");
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "EXAMPLES",
        "EXIT STATUS",
        "FILES",
        "SEE ALSO",
    ] {
        assert!(
            man.contains(&format!(".SH {section}")),
            "man page lacks .SH {section}"
        );
    }
    let commands: &[&[&str]] = &[
        &[],
        &["list"],
        &["time"],
        &["calculator"],
        &["call"],
        &["todos"],
        &["todos", "add"],
        &["todos", "list"],
        &["todos", "complete"],
        &["todos", "delete"],
        &["notes"],
        &["notes", "save"],
        &["notes", "search"],
        &["notes", "list"],
        &["notes", "delete"],
        &["calendar"],
        &["calendar", "add"],
        &["calendar", "list"],
        &["calendar", "delete"],
    ];
    let mut flags = 0;
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = tb_tool(&args, b"", &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        for word in help.split_whitespace().filter(|w| w.starts_with("--")) {
            let flag = word.trim_end_matches(',');
            assert!(
                man.contains(flag),
                "man page lacks {flag} (from tb-tool {})",
                cmd.join(" ")
            );
            flags += 1;
        }
        if let Some(last) = cmd.last() {
            assert!(man.contains(last), "man page lacks the command {last}");
        }
    }
    assert!(flags > 30, "found only {flags} flags in the help texts");
}
