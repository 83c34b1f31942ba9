//! `todos`: a to-do list. Ids come from AUTOINCREMENT, so an id is never reused after a delete.

use super::db::Store;
use super::time::Clock;
use super::{Id, Tool, ToolResult, parse_args, split_action};
use chrono::SecondsFormat;
use rusqlite::{OptionalExtension, Row, params};
use serde_json::{Value, json};
use std::sync::Arc;

pub struct Todos {
    store: Arc<Store>,
    clock: Clock,
}

impl Todos {
    pub fn new(store: Arc<Store>, clock: Clock) -> Self {
        Todos { store, clock }
    }

    fn now(&self) -> String {
        (self.clock)().to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

const ACTIONS: &[&str] = &["add", "list", "complete", "delete"];
const COLUMNS: &str = "id, text, done, created, completed";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    text: String,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct List {
    #[serde(default)]
    status: Status,
}

#[derive(serde::Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Status {
    #[default]
    Open,
    Done,
    All,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    id: Id,
}

fn item(row: &Row) -> rusqlite::Result<Value> {
    Ok(json!({
        "id": row.get::<_, i64>(0)?,
        "text": row.get::<_, String>(1)?,
        "done": row.get::<_, bool>(2)?,
        "created": row.get::<_, String>(3)?,
        "completed": row.get::<_, Option<String>>(4)?,
    }))
}

fn no_such(id: i64) -> String {
    format!("todos: no item with id {id}; {{\"action\":\"list\",\"status\":\"all\"}} shows the ids")
}

impl Tool for Todos {
    fn name(&self) -> &str {
        "todos"
    }

    fn description(&self) -> &str {
        "To-do list: add (text), list (status: open|done|all, default open), complete (id), delete (id)"
    }

    fn quoted_args(&self) -> &[&str] {
        &["text"]
    }

    fn schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "action": {"enum": ACTIONS},
                "text": {"type": "string", "description": "add: what to do"},
                "status": {"enum": ["open", "done", "all"], "description": "list: which items (default open)"},
                "id": {"type": "integer", "description": "complete, delete: the item's id"}
            },
            "required": ["action"],
            "additionalProperties": false
        })
    }

    fn call(&self, args: &Value) -> ToolResult {
        let (action, rest) = split_action("todos", args, ACTIONS)?;
        match action.as_str() {
            "add" => {
                let Add { text } = parse_args("todos add", &rest)?;
                if text.trim().is_empty() {
                    return Err("todos add: the text is empty; say what to do".into());
                }
                let now = self.now();
                self.store.with(|c| {
                    c.query_row(
                        &format!(
                            "INSERT INTO todos (text, created) VALUES (?1, ?2) RETURNING {COLUMNS}"
                        ),
                        params![text.trim(), now],
                        item,
                    )
                })
            }
            "list" => {
                let List { status } = parse_args("todos list", &rest)?;
                let filter = match status {
                    Status::Open => "WHERE done = 0",
                    Status::Done => "WHERE done = 1",
                    Status::All => "",
                };
                self.store.with(|c| {
                    let mut stmt =
                        c.prepare(&format!("SELECT {COLUMNS} FROM todos {filter} ORDER BY id"))?;
                    let rows = stmt
                        .query_map([], item)?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(Value::Array(rows))
                })
            }
            "complete" => {
                let ById { id: Id(id) } = parse_args("todos complete", &rest)?;
                let now = self.now();
                let sql = format!(
                    "UPDATE todos SET done = 1, completed = COALESCE(completed, ?2) WHERE id = ?1 RETURNING {COLUMNS}"
                );
                self.store
                    .with(|c| c.query_row(&sql, params![id, now], item).optional())?
                    .ok_or_else(|| no_such(id))
            }
            _ => {
                let ById { id: Id(id) } = parse_args("todos delete", &rest)?;
                let sql = format!("DELETE FROM todos WHERE id = ?1 RETURNING {COLUMNS}");
                let gone = self
                    .store
                    .with(|c| c.query_row(&sql, [id], item).optional())?;
                gone.map(super::mark_deleted).ok_or_else(|| no_such(id))
            }
        }
    }

    fn render(&self, result: &Value) -> String {
        let line = |t: &Value| {
            let mark = if t["done"] == true { "x" } else { " " };
            let gone = if t["deleted"] == true {
                "deleted: "
            } else {
                ""
            };
            format!(
                "{gone}{:>4} [{mark}] {}",
                t["id"].to_string(),
                t["text"].as_str().unwrap_or("")
            )
        };
        match result {
            Value::Array(items) => items.iter().map(line).collect::<Vec<_>>().join("\n"),
            one => line(one),
        }
    }
}
