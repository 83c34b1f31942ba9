//! The download's progress bar on stderr (indicatif), and notes printed above it.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub(super) struct Progress {
    /// `None` when stderr is not a terminal or `-q` was given: then there is no bar.
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar labelled `label`, starting at `start_bytes` (bytes already on disk from an earlier run).
    pub fn new(enabled: bool, label: &str, start_bytes: u64) -> Progress {
        let bar = enabled.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(Self::style(false));
            bar.set_prefix(label.to_string());
            bar.set_position(start_bytes);
            // The rate counts only what this run fetched.
            bar.reset_eta();
            bar
        });
        Progress { bar }
    }

    fn style(sized: bool) -> ProgressStyle {
        let template = if sized {
            "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}"
        } else {
            "{prefix} {binary_bytes} {binary_bytes_per_sec}"
        };
        // The templates are constants, checked by the test below.
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("#> ")
    }

    pub fn update(&mut self, done: u64, total: Option<u64>) {
        let Some(bar) = &self.bar else { return };
        if let Some(t) = total.filter(|&t| t > 0)
            && bar.length() != Some(t)
        {
            bar.set_length(t);
            bar.set_style(Self::style(true));
        }
        bar.set_position(done);
    }

    /// Prints `line` on stderr above the bar (the bar is redrawn below it).
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Leaves the bar drawn where it stopped, on its own line.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_styles_parse() {
        super::Progress::style(false);
        super::Progress::style(true);
    }
}
