//! The download cache's layout on disk (see the module above), its lookups and its atomic updates.

use crate::error::{Error, Result};
use crate::fsutil::{sha256_hex, write_atomic};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

pub(super) struct Cache {
    dir: PathBuf,
}

/// What `urls/KEY.json` records: the URL gave this content.
#[derive(Serialize, Deserialize)]
struct Entry {
    url: String,
    sha256: String,
    size: u64,
    name: String,
}

/// A download in progress: `partial/KEY.part`, locked against a second `tb-fetch` of the same URL.
pub(super) struct Part {
    pub path: PathBuf,
    /// The server's ETag for the bytes in the part, sent back as `If-Range` when resuming.
    pub etag_path: PathBuf,
    pub file: File,
}

impl Part {
    /// Deletes the part (after a sha256 mismatch: its bytes must not be resumed).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.etag_path);
    }
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache> {
        for sub in ["", "sha256", "urls", "partial"] {
            create_private_dir(&dir.join(sub))?;
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    /// The cached file for `url`: by content hash when one is expected (any URL that gave that
    /// content will do), else by what this URL gave last time.
    pub fn lookup(&self, url: &str, expected: Option<&str>) -> Result<Option<PathBuf>> {
        if let Some(want) = expected {
            let Some(path) = self.by_content(want)? else {
                return Ok(None);
            };
            // Remember the URL too, so a later call without --sha256 finds the file as well.
            if self.read_entry(url).is_none_or(|e| e.sha256 != want) {
                let size = std::fs::metadata(&path)
                    .map_err(|e| Error::io(&path, "reading", e))?
                    .len();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                self.write_entry(
                    url,
                    want,
                    size,
                    &name.unwrap_or_else(|| file_name(url).into()),
                )?;
            }
            return Ok(Some(path));
        }
        Ok(self
            .read_entry(url)
            .map(|e| self.blob_path(&e.sha256, &e.name))
            .filter(|p| p.is_file()))
    }

    /// Opens (or creates) the part file for `url` and locks it.
    pub fn begin(&self, url: &str) -> Result<Part> {
        let key = sha256_hex(url.as_bytes());
        let path = self.dir.join("partial").join(format!("{key}.part"));
        let etag_path = path.with_extension("etag");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "creating the download file", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::TempFail(format!(
                    "another tb-fetch is downloading {url} into {}; wait for it, then run again",
                    path.display()
                )));
            }
            // A file system without locks: go on unprotected rather than refuse to download.
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, "locking", e)),
        }
        Ok(Part {
            path,
            etag_path,
            file,
        })
    }

    /// Moves a complete, verified part to `sha256/HEX/NAME` and records that `url` gave it.
    pub fn store(&self, url: &str, part: Part, hex: &str, size: u64) -> Result<PathBuf> {
        part.file
            .sync_all()
            .map_err(|e| Error::io(&part.path, "syncing", e))?;
        let name = file_name(url);
        let dest = self.blob_path(hex, name);
        if let Some(parent) = dest.parent() {
            create_private_dir(parent)?;
        }
        std::fs::rename(&part.path, &dest)
            .map_err(|e| Error::io(&dest, "moving the download to", e))?;
        let _ = std::fs::remove_file(&part.etag_path);
        self.write_entry(url, hex, size, name)?;
        Ok(dest)
    }

    fn blob_path(&self, hex: &str, name: &str) -> PathBuf {
        self.dir.join("sha256").join(hex).join(name)
    }

    fn by_content(&self, hex: &str) -> Result<Option<PathBuf>> {
        let dir = self.dir.join("sha256").join(hex);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&dir, "reading the cache directory", e)),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        Ok(files.into_iter().next())
    }

    fn entry_path(&self, url: &str) -> PathBuf {
        self.dir
            .join("urls")
            .join(format!("{}.json", sha256_hex(url.as_bytes())))
    }

    /// The entry for `url`; an unreadable or foreign entry counts as none (the file is downloaded again).
    fn read_entry(&self, url: &str) -> Option<Entry> {
        let text = std::fs::read_to_string(self.entry_path(url)).ok()?;
        let e: Entry = serde_json::from_str(&text).ok()?;
        let sane = e.url == url
            && e.sha256.len() == 64
            && e.sha256.bytes().all(|b| b.is_ascii_hexdigit())
            && !e.name.is_empty()
            && !e.name.contains(['/', '\\'])
            && e.name != ".."
            && e.name != ".";
        sane.then_some(e)
    }

    /// Written atomically, so a reader never sees half an entry.
    fn write_entry(&self, url: &str, hex: &str, size: u64, name: &str) -> Result<()> {
        let entry = Entry {
            url: url.into(),
            sha256: hex.into(),
            size,
            name: name.into(),
        };
        // Cannot fail: a struct of strings and integers always serialises.
        let text = serde_json::to_string(&entry).expect("an entry always serialises")
            + "
";
        write_atomic(&self.entry_path(url), text.as_bytes())
    }
}

/// The name a download from `url` gets in the cache: its last path segment, reduced to safe characters.
pub(super) fn file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let last = path.rsplit('/').next().unwrap_or("");
    let safe = last
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._+".contains(&b));
    if !safe || last.is_empty() || last.starts_with('.') || path.matches('/').count() < 3 {
        "download"
    } else {
        last
    }
}

/// Creates `dir` (and its parents) readable by the user only, as tinybit(7), FILES, promises.
fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| Error::io(dir, "creating the cache directory", e))
}

#[cfg(test)]
mod tests {
    use super::file_name;

    #[test]
    fn file_names_come_from_the_last_safe_path_segment() {
        assert_eq!(
            file_name("https://h/a/resolve/main/tokenizer.json?x=1"),
            "tokenizer.json"
        );
        assert_eq!(file_name("https://h/"), "download");
        assert_eq!(file_name("https://h"), "download");
        assert_eq!(file_name("https://h/a%20b"), "download");
        assert_eq!(file_name("https://h/.hidden"), "download");
    }
}
