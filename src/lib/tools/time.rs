//! `time`: the current date, time, weekday and zone; and the clock and zone helpers `calendar` shares.

use super::{Tool, ToolResult, parse_args};
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Value, json};
use std::sync::Arc;

/// Where tools read "now" from; tests pass a fixed instant.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// A clock stopped at `t`.
pub fn fixed_clock(t: DateTime<Utc>) -> Clock {
    Arc::new(move || t)
}

/// The user's IANA zone: `TZ`, else the `/etc/localtime` link, else `/etc/timezone`, else UTC.
/// A `TZ` that names no known zone means UTC (as for the C library), with a warning on stderr the
/// first time.
pub fn local_zone() -> Tz {
    let from_tz = match std::env::var("TZ") {
        Ok(v) if !v.trim().is_empty() => Some(tz_zone(&v).unwrap_or_else(|| {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                crate::output::warn(format!("TZ={v} is not a known zone; using UTC"));
            });
            Tz::UTC
        })),
        _ => None,
    };
    let from_link = || {
        let target = std::fs::read_link("/etc/localtime").ok()?;
        zoneinfo_name(target.to_str()?)
    };
    let from_file = || parse_zone(std::fs::read_to_string("/etc/timezone").ok()?.trim()).ok();
    from_tz
        .or_else(from_link)
        .or_else(from_file)
        .unwrap_or(Tz::UTC)
}

/// The zone a `TZ` value names: `Europe/Paris`, `:Europe/Paris`, or a zoneinfo file path
/// (`:/usr/share/zoneinfo/Europe/Paris`); `None` for anything else (a POSIX rule such as
/// `CET-1CEST` that is not also a zone name, or a misspelling).
fn tz_zone(value: &str) -> Option<Tz> {
    let v = value.trim().trim_start_matches(':');
    parse_zone(v).ok().or_else(|| zoneinfo_name(v))
}

/// The zone of a path inside a zoneinfo directory (`/usr/share/zoneinfo/Europe/Paris`).
fn zoneinfo_name(path: &str) -> Option<Tz> {
    let name = &path[path.find("zoneinfo/")? + "zoneinfo/".len()..];
    parse_zone(name).ok()
}

/// An IANA zone name (`Europe/Paris`, any case) or `utc`.
pub fn parse_zone(name: &str) -> Result<Tz, String> {
    let name = name.trim();
    if let Ok(tz) = name.parse::<Tz>() {
        return Ok(tz);
    }
    chrono_tz::TZ_VARIANTS.iter().copied().find(|tz| tz.name().eq_ignore_ascii_case(name)).ok_or_else(|| {
        format!("unknown time zone '{name}'; use an IANA name such as Europe/Paris or America/New_York, or utc")
    })
}

/// An instant in `zone` as ISO-8601 with offset, to the second (`2026-12-01T09:00:00+01:00`).
pub fn iso(t: DateTime<Utc>, zone: Tz) -> String {
    t.with_timezone(&zone)
        .to_rfc3339_opts(SecondsFormat::Secs, false)
}

pub struct Time {
    zone: Tz,
    clock: Clock,
}

impl Time {
    /// Answers in `zone` unless a call names another.
    pub fn new(zone: Tz, clock: Clock) -> Self {
        Time { zone, clock }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    zone: Option<String>,
}

impl Tool for Time {
    fn name(&self) -> &str {
        "time"
    }

    fn description(&self) -> &str {
        "Current date, time, weekday and time zone; zone is an IANA name like Europe/Paris, or utc (default: local)"
    }

    fn schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "zone": {"type": "string", "description": "IANA time zone name (Europe/Paris) or utc; default: the local zone"}
            },
            "additionalProperties": false
        })
    }

    fn call(&self, args: &Value) -> ToolResult {
        let args: Args = parse_args("time", args)?;
        let zone = match args.zone.as_deref() {
            None | Some("") => self.zone,
            Some(name) => parse_zone(name)?,
        };
        let now = (self.clock)();
        let local = zone.from_utc_datetime(&now.naive_utc());
        Ok(json!({
            "iso": iso(now, zone),
            "date": local.format("%Y-%m-%d").to_string(),
            "time": local.format("%H:%M:%S").to_string(),
            "weekday": local.format("%A").to_string(),
            "zone": zone.name(),
            "abbreviation": local.format("%Z").to_string(),
            "offset": local.format("%:z").to_string(),
            "unix": now.timestamp(),
        }))
    }

    fn render(&self, r: &Value) -> String {
        format!(
            "{} {} {} {} ({}, {})",
            r["weekday"].as_str().unwrap_or(""),
            r["date"].as_str().unwrap_or(""),
            r["time"].as_str().unwrap_or(""),
            r["zone"].as_str().unwrap_or(""),
            r["abbreviation"].as_str().unwrap_or(""),
            r["offset"].as_str().unwrap_or(""),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_tz_is_no_zone_and_valid_forms_are() {
        for ok in [
            "Europe/Paris",
            ":Europe/Paris",
            " europe/paris ",
            "/usr/share/zoneinfo/Europe/Paris",
            ":/usr/share/zoneinfo/Europe/Paris",
        ] {
            assert_eq!(tz_zone(ok), Some(chrono_tz::Europe::Paris), "{ok}");
        }
        assert_eq!(tz_zone("UTC"), Some(Tz::UTC));
        for bad in [
            "Nowhere/Atlantis",
            "CET-1CEST,M3.5.0,M10.5.0/3",
            "zoneinfo/",
            ":",
        ] {
            assert_eq!(tz_zone(bad), None, "{bad}");
        }
    }
}
