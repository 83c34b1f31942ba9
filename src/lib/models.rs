//! Which model a command runs, and the models a user has by name.
//!
//! `-m` takes a file, or a NAME: `NAME.safetensors` in `$XDG_DATA_HOME/tinybit/models/` (put models
//! there with `tb-convert -o` or `cp`). Without `-m`, `$TINYBIT_MODEL` (a file or a name), else the
//! bundled assistant, which is also the name `assistant` when the directory has no such file.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The environment variable naming a default model instead of the bundled one.
pub const ENV: &str = "TINYBIT_MODEL";

/// The bundled assistant's name.
pub const BUNDLED: &str = "assistant";

/// The model file a command runs: `-m`, else `$TINYBIT_MODEL`, else the bundled assistant.
pub fn resolve(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return find(&p, "-m");
    }
    match std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        Some(p) => find(Path::new(&p), ENV),
        None => crate::bundled::path(),
    }
}

/// A bare name (no directory, no extension) may be a model in the models directory.
fn as_name(p: &Path) -> Option<&str> {
    let s = p.to_str()?;
    let bare = !s.is_empty()
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_alphanumeric() || "-_.".contains(c))
        && p.extension().is_none_or(|e| e != "safetensors");
    bare.then_some(s)
}

/// `p` itself when it exists or is not a bare name; else the named model.
fn find(p: &Path, source: &str) -> Result<PathBuf> {
    let Some(name) = as_name(p).filter(|_| !p.exists()) else {
        return Ok(p.to_path_buf());
    };
    if let Some(file) = crate::dirs::models_dir()
        .map(|d| d.join(format!("{name}.safetensors")))
        .filter(|f| f.is_file())
    {
        return Ok(file);
    }
    if name == BUNDLED {
        return crate::bundled::path();
    }
    let dir = crate::dirs::models_dir().map_or_else(
        || "no models directory (HOME is unset)".into(),
        |d| d.display().to_string(),
    );
    Err(Error::NoInput(format!(
        "{source} {name}: no such file, and no {name}.safetensors in {dir}; \
         `tb-chat --list-models` lists the models there"
    )))
}

/// A model `-m NAME` finds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
}

/// The models in the models directory by name, then the bundled assistant unless a file shadows
/// its name. The bundled one's path is where it is (or will be) written; `bytes` is its size.
pub fn list() -> Result<Vec<Listed>> {
    let mut found = Vec::new();
    if let Some(dir) = crate::dirs::models_dir() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => Some(e),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&dir, "listing the models in", e)),
        };
        for entry in entries.into_iter().flatten().filter_map(|e| e.ok()) {
            let path = entry.path();
            let name = path
                .file_stem()
                .and_then(|n| n.to_str())
                .filter(|_| path.extension().is_some_and(|e| e == "safetensors"));
            let (Some(name), Ok(meta)) = (name, entry.metadata()) else {
                continue;
            };
            if meta.is_file() && as_name(Path::new(name)).is_some() {
                found.push(Listed {
                    name: name.to_string(),
                    bytes: meta.len(),
                    path,
                });
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    if !found.iter().any(|m| m.name == BUNDLED) {
        found.push(Listed {
            name: BUNDLED.into(),
            path: crate::bundled::path()?,
            bytes: crate::bundled::BYTES.len() as u64,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_and_paths() {
        for name in ["assistant", "micro-coding", "my_model.v2"] {
            assert_eq!(as_name(Path::new(name)), Some(name));
        }
        for path in [
            "m.safetensors",
            "./m",
            "runs/m",
            "/tmp/m",
            "",
            ".hidden",
            "a b",
        ] {
            assert_eq!(as_name(Path::new(path)), None, "{path}");
        }
    }
}
