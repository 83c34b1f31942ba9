//! `calendar`: events with a start, an optional end and note; listed by date range.
//!
//! Times are ISO-8601. One without an offset (`2026-12-01T09:00`) is wall-clock time in the
//! calendar's zone; one with an offset or `Z` is that instant. Events are stored as instants (unix
//! seconds), so ranges are exact across midnight and DST changes: "today" is local midnight to the
//! next local midnight, whether that day has 23, 24 or 25 hours. Output is ISO-8601 with the offset.

use super::db::Store;
use super::time::{Clock, iso};
use super::{Id, Tool, ToolResult, mark_deleted, parse_args, split_action};
use chrono::{
    DateTime, Datelike, Days, FixedOffset, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc,
};
use chrono_tz::Tz;
use rusqlite::{OptionalExtension, Row, params};
use serde_json::{Value, json};
use std::sync::Arc;

pub struct Calendar {
    store: Arc<Store>,
    zone: Tz,
    clock: Clock,
}

impl Calendar {
    /// A calendar whose wall-clock times and day boundaries are those of `zone`.
    pub fn new(store: Arc<Store>, zone: Tz, clock: Clock) -> Self {
        Calendar { store, zone, clock }
    }
}

const ACTIONS: &[&str] = &["add", "list", "delete"];
const RANGES: &[&str] = &["today", "tomorrow", "week", "between"];
const COLUMNS: &str = "id, title, start_ts, end_ts, note";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    title: String,
    start: String,
    end: Option<String>,
    note: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct List {
    range: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    id: Id,
}

/// Which end of a day a date-only value stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DayEdge {
    Start,
    /// The next midnight: `to: "2026-12-03"` includes all of the 3rd.
    End,
}

/// Parses an ISO-8601 date-time (offset optional) or a date, as an instant. Naive times are in
/// `zone`; a time that a DST jump skips is an error, a repeated one means its first occurrence.
pub fn parse_time(text: &str, zone: Tz, edge: DayEdge) -> Result<DateTime<Utc>, String> {
    let s = text.trim().replacen(' ', "T", 1);
    let bad = || {
        format!(
            "'{text}' is not an ISO-8601 date or time; write 2026-12-01T09:00 (local), \
             2026-12-01T09:00+01:00, 2026-12-01T08:00Z or 2026-12-01"
        )
    };
    let with_offset = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix('z'))
        .map(|b| format!("{b}+00:00"));
    let s = with_offset.as_deref().unwrap_or(&s);
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M%:z"] {
        if let Ok(t) = DateTime::<FixedOffset>::parse_from_str(s, fmt) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return zone
                .from_local_datetime(&t)
                .earliest()
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| {
                    format!(
                        "{text} does not exist in {} (the clocks skip it for daylight saving time)",
                        zone.name()
                    )
                });
        }
    }
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad())?;
    Ok(match edge {
        DayEdge::Start => day_start(date, zone),
        DayEdge::End => day_start(date.checked_add_days(Days::new(1)).ok_or_else(bad)?, zone),
    })
}

/// The first instant of `date` in `zone` (midnight, or the first moment after a DST gap at midnight).
pub fn day_start(date: NaiveDate, zone: Tz) -> DateTime<Utc> {
    // Cannot fail: 00:00:00 is a valid time on every date; and some quarter hour of a day is never
    // in a DST gap (gaps last at most a few hours).
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    (0..=24 * 4)
        .find_map(|quarter| {
            zone.from_local_datetime(&(midnight + chrono::Duration::minutes(15 * quarter)))
                .earliest()
        })
        .expect("every day has a first valid quarter hour")
        .with_timezone(&Utc)
}

fn no_such(id: i64) -> String {
    format!(
        "calendar: no event with id {id}; {{\"action\":\"list\",\"range\":\"between\",\"from\":\"2000-01-01\"}} shows the ids"
    )
}

impl Calendar {
    fn event(&self, row: &Row) -> rusqlite::Result<Value> {
        let at = |ts: i64| DateTime::from_timestamp(ts, 0).map(|t| iso(t, self.zone));
        Ok(json!({
            "id": row.get::<_, i64>(0)?,
            "title": row.get::<_, String>(1)?,
            "start": at(row.get(2)?),
            "end": row.get::<_, Option<i64>>(3)?.and_then(at),
            "note": row.get::<_, Option<String>>(4)?,
        }))
    }

    /// [from, to) in unix seconds; `None` is unbounded.
    fn range(&self, args: &List) -> Result<(Option<i64>, Option<i64>), String> {
        let today = (self.clock)().with_timezone(&self.zone).date_naive();
        let day = |n: u64| day_start(today + Days::new(n), self.zone).timestamp();
        let given = args.from.is_some() || args.to.is_some();
        let range = args
            .range
            .as_deref()
            .unwrap_or(if given { "between" } else { "today" });
        if given && range != "between" {
            return Err(format!(
                "calendar list: from/to go with range \"between\", not \"{range}\""
            ));
        }
        let at = |v: &Option<String>, edge| {
            v.as_deref()
                .map(|t| parse_time(t, self.zone, edge).map(|t| t.timestamp()))
                .transpose()
        };
        let (from, to) = match range {
            "today" => (Some(day(0)), Some(day(1))),
            "tomorrow" => (Some(day(1)), Some(day(2))),
            "week" => {
                let monday = today - Days::new(today.weekday().num_days_from_monday().into());
                let start = |n| day_start(monday + Days::new(n), self.zone).timestamp();
                (Some(start(0)), Some(start(7)))
            }
            "between" if given => (at(&args.from, DayEdge::Start)?, at(&args.to, DayEdge::End)?),
            "between" => return Err("calendar list: range \"between\" needs from and/or to".into()),
            other => {
                return Err(format!(
                    "calendar list: unknown range '{other}'; expected one of: {}",
                    RANGES.join(", ")
                ));
            }
        };
        if let (Some(f), Some(t)) = (from, to) {
            if t <= f {
                return Err("calendar list: 'to' must be after 'from'".into());
            }
        }
        Ok((from, to))
    }

    fn add(&self, args: Add) -> ToolResult {
        if args.title.trim().is_empty() {
            return Err("calendar add: the title is empty; name the event".into());
        }
        let start = parse_time(&args.start, self.zone, DayEdge::Start)
            .map_err(|e| format!("calendar add: start {e}"))?;
        let end = args
            .end
            .as_deref()
            .map(|e| {
                parse_time(e, self.zone, DayEdge::Start)
                    .map_err(|e| format!("calendar add: end {e}"))
            })
            .transpose()?;
        if end.is_some_and(|end| end < start) {
            return Err("calendar add: the end is before the start".into());
        }
        let created = (self.clock)().to_rfc3339_opts(SecondsFormat::Secs, true);
        let note = args.note.filter(|n| !n.trim().is_empty());
        self.store.with(|c| {
            c.query_row(
                &format!(
                    "INSERT INTO events (title, start_ts, end_ts, note, created) VALUES (?1, ?2, ?3, ?4, ?5)
                     RETURNING {COLUMNS}"
                ),
                params![args.title.trim(), start.timestamp(), end.map(|e| e.timestamp()), note, created],
                |r| self.event(r),
            )
        })
    }

    fn list(&self, args: List) -> ToolResult {
        let (from, to) = self.range(&args)?;
        // An event is in the range if it overlaps it; one without an end is a point in time.
        let sql = format!(
            "SELECT {COLUMNS} FROM events
             WHERE (?2 IS NULL OR start_ts < ?2)
               AND (?1 IS NULL OR start_ts >= ?1 OR end_ts > ?1)
             ORDER BY start_ts, id"
        );
        self.store.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt
                .query_map(params![from, to], |r| self.event(r))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Value::Array(rows))
        })
    }

    fn delete(&self, id: i64) -> ToolResult {
        let sql = format!("DELETE FROM events WHERE id = ?1 RETURNING {COLUMNS}");
        let gone = self
            .store
            .with(|c| c.query_row(&sql, [id], |r| self.event(r)).optional())?;
        gone.map(mark_deleted).ok_or_else(|| no_such(id))
    }
}

impl Tool for Calendar {
    fn name(&self) -> &str {
        "calendar"
    }

    fn description(&self) -> &str {
        "Calendar: add (title, start, end, note; ISO-8601 like 2026-12-01T09:00), \
         list (range: today|tomorrow|week, or from/to), delete (id)"
    }

    fn quoted_args(&self) -> &[&str] {
        &["title", "note"]
    }

    fn schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "action": {"enum": ACTIONS},
                "title": {"type": "string", "description": "add: what the event is"},
                "start": {"type": "string", "description": "add: ISO-8601 start, e.g. 2026-12-01T09:00 (local time) or with an offset"},
                "end": {"type": "string", "description": "add: ISO-8601 end (optional)"},
                "note": {"type": "string", "description": "add: a note (optional)"},
                "range": {"enum": RANGES, "description": "list: today (default), tomorrow, this week (Monday to Sunday), or between from and to"},
                "from": {"type": "string", "description": "list: ISO-8601 date or time; a date means its start"},
                "to": {"type": "string", "description": "list: ISO-8601 date or time; a date includes that whole day"},
                "id": {"type": "integer", "description": "delete: the event's id"}
            },
            "required": ["action"],
            "additionalProperties": false
        })
    }

    /// Dates and times are the same when they name the same instant (`2026-12-10T15:00` =
    /// `2026-12-10T15:00:00`).
    fn same_args(&self, a: &Value, b: &Value) -> bool {
        super::same_keys(a, b, |k, x, y| {
            let edge = if k == "to" {
                DayEdge::End
            } else {
                DayEdge::Start
            };
            let at = |v: &Value| v.as_str().and_then(|t| parse_time(t, self.zone, edge).ok());
            matches!(k, "start" | "end" | "from" | "to") && at(x).is_some() && at(x) == at(y)
        })
    }

    fn call(&self, args: &Value) -> ToolResult {
        let (action, rest) = split_action("calendar", args, ACTIONS)?;
        match action.as_str() {
            "add" => self.add(parse_args("calendar add", &rest)?),
            "list" => self.list(parse_args("calendar list", &rest)?),
            _ => {
                let ById { id: Id(id) } = parse_args("calendar delete", &rest)?;
                self.delete(id)
            }
        }
    }

    fn render(&self, result: &Value) -> String {
        let line = |e: &Value| {
            let gone = if e["deleted"] == true {
                "deleted: "
            } else {
                ""
            };
            let mut s = format!(
                "{gone}{:>4} {}",
                e["id"].to_string(),
                e["start"].as_str().unwrap_or("")
            );
            if let Some(end) = e["end"].as_str() {
                s += &format!(" - {end}");
            }
            s += &format!("  {}", e["title"].as_str().unwrap_or(""));
            if let Some(note) = e["note"].as_str() {
                s += &format!(" ({note})");
            }
            s
        };
        match result {
            Value::Array(items) => items.iter().map(line).collect::<Vec<_>>().join("\n"),
            one => line(one),
        }
    }
}
