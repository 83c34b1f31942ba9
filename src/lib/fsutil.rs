//! Files: never half-written (write to a temporary name in the same directory, fsync, rename),
//! mapped inputs, and text read from a file or from stdin (`-`).

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Creates the directories an output file goes into (`-o data/tok.json` with no `data/` yet), as
/// `mkdir -p` would; a parent that is a file is an I/O error naming the output.
pub fn create_parent(path: &Path) -> Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => std::fs::create_dir_all(dir).map_err(|e| {
            Error::Io(format!(
                "creating the directory {} for {}: {e}",
                dir.display(),
                path.display()
            ))
        }),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` atomically: a crash leaves either the old file or the new one.
/// Missing parent directories are created.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    create_parent(path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::usage(format!("{} is not a file path", path.display())))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // Cannot fail: `tmp` was just built by joining a file name.
    debug_assert!(is_atomic_temp(&tmp.file_name().unwrap().to_string_lossy()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself must reach the disk too.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::output(path, "writing", e)
    })
}

/// Whether `name` is a temporary of `write_atomic` (`.NAME.tmpPID`).
pub fn is_atomic_temp(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.rsplit_once(".tmp"))
        .is_some_and(|(base, pid)| {
            !base.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Removes the temporaries of `write_atomic` calls that never finished in `dir` (the process was
/// killed between create and rename). Only for a caller whose lock excludes every other writer
/// of `dir`: a live writer's temporary looks the same. Returns the paths removed.
pub fn remove_atomic_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "listing", e))?;
    let mut removed = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, "listing", e))?;
        if is_atomic_temp(&e.file_name().to_string_lossy()) && e.path().is_file() {
            std::fs::remove_file(e.path())
                .map_err(|err| Error::io(e.path(), "removing stale temporary file", err))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}

/// Maps the input file `path` read-only, for a reader that wants it whole. `noun` says what the
/// file should be (`checkpoint`, `token file`): a directory given instead is refused as a missing
/// input (66) in those words, rather than with mmap's "No such device".
///
/// The map is only safe while nobody rewrites the file in place; tinybit's writers replace files
/// by rename (`write_atomic`).
/// Reads a text file, or all of stdin when `path` is `-` (as `-f -` promises).
pub fn read_text(path: &Path, noun: &str) -> Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
            .map_err(|e| Error::io("stdin", noun, e))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, noun, e))
}

pub fn map_input(path: &Path, noun: &str) -> Result<memmap2::Mmap> {
    // Asked before opening: Windows refuses to open a directory ("access denied").
    if path.is_dir() {
        let p = path.display();
        let hint = newest_safetensors(path)
            .map(|f| format!(" such as {}", f.display()))
            .unwrap_or_default();
        return Err(Error::NoInput(format!(
            "{p} is a directory, not a {noun} file; give the file itself{hint}"
        )));
    }
    let file =
        std::fs::File::open(path).map_err(|e| Error::io(path, &format!("opening {noun}"), e))?;
    // SAFETY: read-only map of a file tinybit's writers replace by rename, never in place.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, &format!("mapping {noun}"), e))
}

/// The last `*.safetensors` file in `dir` by name (a run directory's newest checkpoint).
fn newest_safetensors(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .max()
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
