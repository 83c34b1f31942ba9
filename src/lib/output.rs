//! What the library writes for people: stdout records that end quietly on a closed pipe,
//! one-line warnings under the program's name, and progress bars drawn only on a terminal.

use crate::error::Error;

/// Maps a write error on stdout: a broken pipe becomes the quiet-exit case of `run_main`.
pub fn stdout_err(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return Error::ClosedPipe;
    }
    Error::Io(format!("writing to stdout: {e}"))
}

/// The program's name as invoked (`tb-chat`), for messages printed from library code.
pub fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "tinybit".into())
}

/// Prints `NAME: warning: MSG` on stderr (one line).
pub fn warn(msg: impl std::fmt::Display) {
    eprintln!("{}: warning: {msg}", program_name());
}

/// A progress bar on stderr with this indicatif `template`, drawn only when stderr is a terminal
/// and `quiet` is off (otherwise hidden: updates cost nothing and print nothing).
pub fn progress_bar(len: u64, template: &str, quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    // The templates are constants of the callers, each drawn by a test through `style_of`.
    bar.set_style(style_of(template));
    bar
}

/// The style of a progress-bar template (panics on a malformed one: they are constants).
pub fn style_of(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|e| panic!("progress template {template:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_templates_parse() {
        for t in [crate::data::ENCODE_PROGRESS, crate::eval::PPL_PROGRESS] {
            style_of(t);
        }
    }
}
