//! One error type for the whole toolkit, and the exit statuses of tinybit(7), EXIT STATUS.
//!
//! Every variant carries a message that already names the file, line or tensor and says what to do;
//! `exit_code` maps the kind of failure to the sysexits-style status every `tb-*` command returns.

use std::path::Path;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command ran to the end but what it checked failed: a `tb-eval` threshold missed, a
    /// `tb-tool` call refused (its record says why) (exit 1).
    #[error("{0}")]
    Failed(String),
    /// Unknown flag, missing argument, contradictory options (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Bad input data: malformed JSON line, corrupt or mismatched checkpoint, invalid config (exit 65).
    #[error("{0}")]
    Data(String),
    /// An input file does not exist (exit 66).
    #[error("{0}")]
    NoInput(String),
    /// Network unreachable, requested device absent (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// Disk full, permission denied, other I/O failure (exit 74).
    #[error("{0}")]
    Io(String),
    /// Another run holds the lock; try again later (exit 75).
    #[error("{0}")]
    TempFail(String),
    /// Interrupted by SIGINT/SIGTERM after saving what had to be saved (exit 130).
    #[error("{0}")]
    Interrupted(String),
    /// The reader of stdout went away (`tb-chat ... | head -1`): the command ends quietly with 0.
    #[error("writing to stdout: the pipe was closed")]
    ClosedPipe,
    /// A tensor operation failed; this is a bug or a shape problem in input data (exit 65).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// The process exit status for this error (tinybit(7), EXIT STATUS).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Failed(_) => 1,
            Error::Usage(_) => 2,
            Error::Data(_) | Error::Candle(_) => 65,
            Error::NoInput(_) => 66,
            Error::Unavailable(_) => 69,
            Error::Io(_) => 74,
            Error::TempFail(_) => 75,
            Error::Interrupted(_) => 130,
            Error::ClosedPipe => 0,
        }
    }

    /// An I/O error on `path`, classified: a missing file, or a directory where a file belongs, is
    /// `NoInput` (66); content a reader refused (text that is not UTF-8) is `Data` (65); anything
    /// else `Io` (74).
    pub fn io(path: impl AsRef<Path>, what: &str, e: std::io::Error) -> Error {
        let p = path.as_ref().display();
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NoInput(format!("{what} {p}: no such file"))
        } else if e.kind() == std::io::ErrorKind::IsADirectory
            // Windows says "access denied" when asked to open a directory.
            || (e.kind() == std::io::ErrorKind::PermissionDenied && path.as_ref().is_dir())
        {
            Error::NoInput(format!("{what} {p}: {p} is a directory, not a file"))
        } else if e.kind() == std::io::ErrorKind::InvalidData {
            Error::Data(format!("{what} {p}: {e}"))
        } else {
            Error::Io(format!("{what} {p}: {e}"))
        }
    }

    /// An I/O error creating or writing the output `path`: always `Io` (74). A missing directory
    /// is not a missing input (66); the message says so.
    pub fn output(path: impl AsRef<Path>, what: &str, e: std::io::Error) -> Error {
        let p = path.as_ref().display();
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Io(format!(
                "{what} {p}: cannot create the output, its directory does not exist; create it first"
            ))
        } else {
            Error::Io(format!("{what} {p}: {e}"))
        }
    }

    pub fn data(msg: impl Into<String>) -> Error {
        Error::Data(msg.into())
    }

    pub fn usage(msg: impl Into<String>) -> Error {
        Error::Usage(msg.into())
    }
}

/// Shorthand for building a `Data` error with `format!` syntax.
#[macro_export]
macro_rules! bad_data {
    ($($arg:tt)*) => { $crate::error::Error::Data(format!($($arg)*)) };
}
