//! A one-line progress bar on stderr, redrawn in place at most ten times a second.

use std::io::Write;
use std::time::{Duration, Instant};

pub(super) struct Progress<'a> {
    enabled: bool,
    label: &'a str,
    started: Instant,
    /// Bytes already on disk when this run began: the rate counts only what this run fetched.
    start_bytes: u64,
    last_draw: Option<Instant>,
    /// The latest figures, drawn once more at the end so the bar shows where it stopped.
    last: (u64, Option<u64>),
}

impl<'a> Progress<'a> {
    pub fn new(enabled: bool, label: &'a str, start_bytes: u64) -> Progress<'a> {
        Progress {
            enabled,
            label,
            started: Instant::now(),
            start_bytes,
            last_draw: None,
            last: (start_bytes, None),
        }
    }

    pub fn update(&mut self, done: u64, total: Option<u64>) {
        self.last = (done, total);
        if self.enabled
            && self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100))
        {
            self.draw();
        }
    }

    fn draw(&mut self) {
        let (done, total) = self.last;
        self.last_draw = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done.saturating_sub(self.start_bytes) as f64 / secs;
        let line = match total.filter(|&t| t > 0) {
            Some(t) => {
                const WIDTH: usize = 30;
                let filled = ((done.min(t) as f64 / t as f64) * WIDTH as f64) as usize;
                format!(
                    "{} [{}{}] {}/{} {}/s",
                    self.label,
                    "#".repeat(filled),
                    " ".repeat(WIDTH - filled),
                    human(done as f64),
                    human(t as f64),
                    human(rate)
                )
            }
            None => format!("{} {} {}/s", self.label, human(done as f64), human(rate)),
        };
        // \x1b[K clears what a longer previous line left behind.
        let _ = write!(std::io::stderr(), "\r{line}\x1b[K");
    }

    /// Ends the bar's line so later messages start on a fresh one.
    pub fn finish(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            self.draw();
            let _ = writeln!(std::io::stderr());
            self.last_draw = None;
        }
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
