//! `notes`: saved notes with full-text search (SQLite FTS5, ranked by bm25, with snippets).
//!
//! Any text is a valid query: each word of it is quoted as an FTS5 string, so quotes, `*`, `-`,
//! `:` and parentheses are searched for as text instead of being read as query syntax. A word
//! ending in `*` stays a prefix search. All words must match; if no note has them all, notes with
//! any of them are returned, best first.

use super::db::Store;
use super::time::Clock;
use super::{Id, Tool, ToolResult, mark_deleted, parse_args, split_action};
use chrono::SecondsFormat;
use rusqlite::{OptionalExtension, Row, params};
use serde_json::{Value, json};
use std::sync::Arc;

pub struct Notes {
    store: Arc<Store>,
    clock: Clock,
}

impl Notes {
    pub fn new(store: Arc<Store>, clock: Clock) -> Self {
        Notes { store, clock }
    }
}

const ACTIONS: &[&str] = &["save", "search", "list", "delete"];
const COLUMNS: &str = "id, title, body, tags, created";
const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 200;
/// bm25 column weights (title, body, tags): a word in the title counts most.
const RANK: &str = "bm25(notes_fts, 4.0, 1.0, 2.0)";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Save {
    title: Option<String>,
    body: String,
    tags: Option<Tags>,
}

/// `["work", "idea"]`, or one string of words: `"work, idea"`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Tags {
    List(Vec<String>),
    Text(String),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Search {
    query: String,
    limit: Option<u32>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct List {
    limit: Option<u32>,
    tag: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    id: Id,
}

fn note(row: &Row) -> rusqlite::Result<Value> {
    Ok(json!({
        "id": row.get::<_, i64>(0)?,
        "title": row.get::<_, String>(1)?,
        "body": row.get::<_, String>(2)?,
        "tags": tags_value(&row.get::<_, String>(3)?),
        "created": row.get::<_, String>(4)?,
    }))
}

fn tags_value(stored: &str) -> Value {
    serde_json::from_str(stored).unwrap_or_else(|_| json!([]))
}

/// Tags as words: split on commas and spaces, `#` dropped, duplicates removed, order kept.
fn normalise_tags(tags: Option<Tags>) -> Vec<String> {
    let raw: Vec<String> = match tags {
        None => Vec::new(),
        Some(Tags::List(list)) => list,
        Some(Tags::Text(text)) => vec![text],
    };
    let mut out: Vec<String> = Vec::new();
    for word in raw
        .iter()
        .flat_map(|t| t.split(|c: char| c == ',' || c.is_whitespace()))
    {
        let word = word.trim_start_matches('#');
        if !word.is_empty() && !out.iter().any(|t| t == word) {
            out.push(word.to_string());
        }
    }
    out
}

/// A title from the body's first line when none is given.
fn default_title(body: &str) -> String {
    let first = body
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    match first.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &first[..cut]),
        None => first.to_string(),
    }
}

/// The FTS5 queries for `text`: (all words, any word). `None` when it has no searchable word.
pub fn fts_queries(text: &str) -> Option<(String, String)> {
    // FTS5's query parser stops at a NUL even inside a string; control characters separate words.
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words: Vec<String> = text
        .split_whitespace()
        .filter_map(|word| {
            let core = word.trim_end_matches('*');
            let prefix = if core.len() < word.len() { "*" } else { "" };
            // A word of punctuation alone has no tokens; an empty FTS5 string is not worth a query.
            core.chars()
                .any(char::is_alphanumeric)
                .then(|| format!("\"{}\"{prefix}", core.replace('"', "\"\"")))
        })
        .collect();
    (!words.is_empty()).then(|| (words.join(" "), words.join(" OR ")))
}

fn limit(given: Option<u32>, what: &str) -> Result<u32, String> {
    match given.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(format!("notes {what}: limit must be at least 1")),
        n => Ok(n.min(MAX_LIMIT)),
    }
}

fn no_such(id: i64) -> String {
    format!("notes: no note with id {id}; {{\"action\":\"list\"}} shows the ids")
}

impl Notes {
    fn save(&self, args: Save) -> ToolResult {
        if args.body.trim().is_empty() && args.title.as_deref().is_none_or(|t| t.trim().is_empty())
        {
            return Err(
                "notes save: both title and body are empty; give the note some text".into(),
            );
        }
        let title = match args.title {
            Some(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => default_title(&args.body),
        };
        let tags = normalise_tags(args.tags);
        let tags_json = Value::from(tags.clone()).to_string();
        let created = (self.clock)().to_rfc3339_opts(SecondsFormat::Secs, true);
        self.store.with(|c| {
            let tx = c.transaction()?;
            let saved = tx.query_row(
                &format!("INSERT INTO notes (title, body, tags, created) VALUES (?1, ?2, ?3, ?4) RETURNING {COLUMNS}"),
                params![title, args.body, tags_json, created],
                note,
            )?;
            tx.execute(
                "INSERT INTO notes_fts (rowid, title, body, tags) VALUES (?1, ?2, ?3, ?4)",
                params![saved["id"].as_i64(), title, args.body, tags.join(" ")],
            )?;
            tx.commit()?;
            Ok(saved)
        })
    }

    fn search(&self, args: Search) -> ToolResult {
        if args.query.trim().is_empty() {
            return Err("notes search: the query is empty; give a word to look for".into());
        }
        let limit = limit(args.limit, "search")?;
        let Some((all, any)) = fts_queries(&args.query) else {
            return Ok(json!([]));
        };
        let sql = format!(
            "SELECT notes.id, notes.title, notes.tags, notes.created,
                    snippet(notes_fts, -1, '[', ']', '…', 12), {RANK}
             FROM notes_fts JOIN notes ON notes.id = notes_fts.rowid
             WHERE notes_fts MATCH ?1 ORDER BY {RANK} LIMIT ?2"
        );
        self.store.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let mut run = |q: &str| -> rusqlite::Result<Vec<Value>> {
                stmt.query_map(params![q, limit], |r| {
                    Ok(json!({
                        "id": r.get::<_, i64>(0)?,
                        "title": r.get::<_, String>(1)?,
                        "tags": tags_value(&r.get::<_, String>(2)?),
                        "created": r.get::<_, String>(3)?,
                        "snippet": r.get::<_, String>(4)?,
                        // bm25 is negative, lower is better; report it so that higher is better.
                        "score": -r.get::<_, f64>(5)?,
                    }))
                })?
                .collect()
            };
            let mut hits = run(&all)?;
            if hits.is_empty() && any != all {
                hits = run(&any)?;
            }
            Ok(Value::Array(hits))
        })
    }

    fn list(&self, args: List) -> ToolResult {
        let limit = limit(args.limit, "list")?;
        let sql = format!(
            "SELECT {COLUMNS} FROM notes
             WHERE ?1 IS NULL OR EXISTS (SELECT 1 FROM json_each(notes.tags) WHERE value = ?1 COLLATE NOCASE)
             ORDER BY id DESC LIMIT ?2"
        );
        let tag = args
            .tag
            .map(|t| t.trim().trim_start_matches('#').to_string());
        self.store.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt
                .query_map(params![tag, limit], note)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Value::Array(rows))
        })
    }

    fn delete(&self, id: i64) -> ToolResult {
        let gone = self.store.with(|c| {
            let tx = c.transaction()?;
            let gone = tx
                .query_row(
                    &format!("DELETE FROM notes WHERE id = ?1 RETURNING {COLUMNS}"),
                    [id],
                    note,
                )
                .optional()?;
            tx.execute("DELETE FROM notes_fts WHERE rowid = ?1", [id])?;
            tx.commit()?;
            Ok(gone)
        })?;
        gone.map(mark_deleted).ok_or_else(|| no_such(id))
    }
}

impl Tool for Notes {
    fn name(&self) -> &str {
        "notes"
    }

    fn description(&self) -> &str {
        "Notes: save (body, title, tags), search (query: words; best matches with snippets), list (tag, limit), delete (id)"
    }

    fn quoted_args(&self) -> &[&str] {
        &["title", "body", "query", "tag"]
    }

    fn schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "action": {"enum": ACTIONS},
                "title": {"type": "string", "description": "save: a title (default: the body's first line)"},
                "body": {"type": "string", "description": "save: the note's text"},
                "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
                         "description": "save: tags, as a list or as words separated by commas or spaces"},
                "query": {"type": "string", "description": "search: words to look for; any text is accepted"},
                "tag": {"type": "string", "description": "list: only notes with this tag"},
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                          "description": "search, list: at most this many (default 20)"},
                "id": {"type": "integer", "description": "delete: the note's id"}
            },
            "required": ["action"],
            "additionalProperties": false
        })
    }

    fn call(&self, args: &Value) -> ToolResult {
        let (action, rest) = split_action("notes", args, ACTIONS)?;
        match action.as_str() {
            "save" => self.save(parse_args("notes save", &rest)?),
            "search" => self.search(parse_args("notes search", &rest)?),
            "list" => self.list(parse_args("notes list", &rest)?),
            _ => {
                let ById { id: Id(id) } = parse_args("notes delete", &rest)?;
                self.delete(id)
            }
        }
    }

    fn render(&self, result: &Value) -> String {
        let line = |n: &Value| {
            let tags: Vec<String> = n["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| format!("#{}", super::render_plain(t)))
                .collect();
            let gone = if n["deleted"] == true {
                "deleted: "
            } else {
                ""
            };
            let mut s = format!(
                "{gone}{:>4} {}",
                n["id"].to_string(),
                n["title"].as_str().unwrap_or("")
            );
            if !tags.is_empty() {
                s += &format!("  {}", tags.join(" "));
            }
            if let Some(snippet) = n["snippet"].as_str() {
                s += &format!("\n     {}", snippet.replace('\n', " "));
            }
            s
        };
        match result {
            Value::Array(items) => items.iter().map(line).collect::<Vec<_>>().join("\n"),
            one => line(one),
        }
    }
}
