//! Where tinybit keeps its files: one resolver for the XDG base directories.
//!
//! Data (`$XDG_DATA_HOME/tinybit`: the tool database, `models/`), cache (`$XDG_CACHE_HOME/tinybit`:
//! downloads, the bundled model's copy) and state (`$XDG_STATE_HOME/tinybit`: the REPL history).
//! A relative XDG path is invalid and ignored, as the specification says; then the home directory's
//! default applies. Windows has no XDG and often no `HOME`: there `USERPROFILE` is the home.

use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Data,
    Cache,
    State,
}

impl Base {
    /// The XDG variable naming this directory.
    pub fn var(self) -> &'static str {
        match self {
            Base::Data => "XDG_DATA_HOME",
            Base::Cache => "XDG_CACHE_HOME",
            Base::State => "XDG_STATE_HOME",
        }
    }

    /// Its default under the home directory.
    fn under_home(self) -> &'static str {
        match self {
            Base::Data => ".local/share",
            Base::Cache => ".cache",
            Base::State => ".local/state",
        }
    }
}

/// `$XDG_…_HOME/tinybit`, else `HOME/<default>/tinybit`; `None` when neither is set. Callers say
/// what to pass instead (`--db`, `--cache-dir`).
pub fn tinybit_dir(base: Base) -> Option<PathBuf> {
    resolve(base, &|k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// `$XDG_DATA_HOME/tinybit/models`: where `-m NAME` looks for `NAME.safetensors`.
pub fn models_dir() -> Option<PathBuf> {
    tinybit_dir(Base::Data).map(|d| d.join("models"))
}

fn resolve(base: Base, env: &dyn Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    if let Some(x) = env(base.var()).filter(|p| p.is_absolute()) {
        return Some(x.join("tinybit"));
    }
    let home = env("HOME").or_else(|| {
        if cfg!(windows) {
            env("USERPROFILE")
        } else {
            None
        }
    })?;
    Some(Path::new(&home).join(base.under_home()).join("tinybit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `p` made absolute for this platform: Windows wants a drive (`/d` is relative there).
    fn abs(p: &str) -> PathBuf {
        if cfg!(windows) && p.starts_with('/') {
            PathBuf::from(format!("C:{p}"))
        } else {
            PathBuf::from(p)
        }
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<PathBuf> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| abs(v))
    }

    #[test]
    fn xdg_then_home_and_relative_xdg_ignored() {
        let all = env(&[
            ("XDG_DATA_HOME", "/d"),
            ("XDG_CACHE_HOME", "/c"),
            ("XDG_STATE_HOME", "/s"),
            ("HOME", "/h"),
        ]);
        assert_eq!(resolve(Base::Data, &all).unwrap(), abs("/d/tinybit"));
        assert_eq!(resolve(Base::Cache, &all).unwrap(), abs("/c/tinybit"));
        assert_eq!(resolve(Base::State, &all).unwrap(), abs("/s/tinybit"));
        let relative = env(&[
            ("XDG_DATA_HOME", "d"),
            ("XDG_CACHE_HOME", "c"),
            ("XDG_STATE_HOME", "s"),
            ("HOME", "/h"),
        ]);
        assert_eq!(
            resolve(Base::Data, &relative).unwrap(),
            abs("/h/.local/share/tinybit")
        );
        assert_eq!(
            resolve(Base::Cache, &relative).unwrap(),
            abs("/h/.cache/tinybit")
        );
        assert_eq!(
            resolve(Base::State, &relative).unwrap(),
            abs("/h/.local/state/tinybit")
        );
        assert_eq!(resolve(Base::Data, &env(&[])), None);
    }
}
