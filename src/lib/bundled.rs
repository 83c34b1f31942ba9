//! The bundled assistant: a small tool-using model trained by tinybit itself
//! (`scripts/train_assistant.sh`), compiled into the commands that use it, so `tb-chat` and
//! `tb-eval` work without `-m` on a fresh clone and after `cargo install`.
//!
//! The engine maps checkpoints from files, so the embedded bytes are written once to
//! `$XDG_CACHE_HOME/tinybit/models/assistant-HASH.safetensors` (named by their sha256, so a
//! rebuilt binary with another model never reads a stale copy) and loaded from there.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// The model file (f16, its tokenizer, template and system prompt inside).
pub const BYTES: &[u8] = include_bytes!("assets/assistant.safetensors");

/// The bundled model as a file, written on first use.
pub fn path() -> Result<PathBuf> {
    let dir = crate::fetch::cache_root()
        .unwrap_or_else(|_| std::env::temp_dir().join("tinybit"))
        .join("models");
    let hash = crate::fsutil::sha256_hex(BYTES);
    let file = dir.join(format!("assistant-{}.safetensors", &hash[..16]));
    let complete = std::fs::metadata(&file).is_ok_and(|m| m.len() == BYTES.len() as u64);
    if !complete {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::output(&dir, "creating the directory for the bundled model", e))?;
        crate::fsutil::write_atomic(&file, BYTES)?;
    }
    Ok(file)
}
