//! The token file: a 64-byte header, then the tokens (u16 when the vocabulary fits, else u32),
//! little-endian and memory-mappable.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "TBTOKENS"
//!      8     4  format version (u32, = 1)
//!     12     4  bytes per token (u32: 2 or 4)
//!     16     8  token count (u64)
//!     24     8  byte count of the source text (u64; bits per byte needs it)
//!     32    32  sha256 of the tokenizer (raw bytes); a file from another tokenizer is refused
//!     64     …  tokens
//! ```

use crate::error::{Error, Result};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"TBTOKENS";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub token_bytes: u32,
    pub n_tokens: u64,
    pub source_bytes: u64,
    /// Hex sha256 of the tokenizer the tokens came from.
    pub tokenizer_sha256: String,
}

fn hex_to_bytes(hex: &str) -> Result<[u8; 32]> {
    let bad = || Error::Data(format!("tokenizer sha256 '{hex}' is not 64 hex digits"));
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl Header {
    fn encode(&self) -> Result<[u8; HEADER_LEN]> {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.token_bytes.to_le_bytes());
        h[16..24].copy_from_slice(&self.n_tokens.to_le_bytes());
        h[24..32].copy_from_slice(&self.source_bytes.to_le_bytes());
        h[32..64].copy_from_slice(&hex_to_bytes(&self.tokenizer_sha256)?);
        Ok(h)
    }

    fn decode(h: &[u8], file: &str) -> Result<Header> {
        // What there is of the magic must match; only then is a short file a cut-off token file.
        let magic_len = h.len().min(MAGIC.len());
        if h.is_empty() {
            return Err(Error::Data(format!(
                "{file} is empty, not a tinybit token file; create it with tb-tok encode"
            )));
        }
        if h[..magic_len] != MAGIC[..magic_len] {
            return Err(Error::Data(format!(
                "{file} is not a tinybit token file (bad magic); create it with tb-tok encode"
            )));
        }
        if h.len() < HEADER_LEN {
            return Err(Error::Data(format!(
                "{file}: truncated header: the file is {} bytes, but a token file's header alone is \
                 {HEADER_LEN}; the file was cut short: create it again with tb-tok encode",
                h.len()
            )));
        }
        // Cannot fail: the header is at least HEADER_LEN bytes (checked above) and the slices are 4 and 8 long.
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::Data(format!(
                "{file}: token file version {version}; this tinybit reads version {VERSION}"
            )));
        }
        let token_bytes = u32_at(12);
        if token_bytes != 2 && token_bytes != 4 {
            return Err(Error::Data(format!(
                "{file}: {token_bytes} bytes per token; expected 2 or 4"
            )));
        }
        Ok(Header {
            token_bytes,
            n_tokens: u64_at(16),
            source_bytes: u64_at(24),
            tokenizer_sha256: hex::encode(&h[32..64]),
        })
    }
}

/// Streams tokens into a new token file; the header is written last and the file renamed into
/// place by `finish`, so an interrupted run never leaves a file that looks complete.
pub struct TokenWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<std::fs::File>,
    header: Header,
    /// Header written and synced: only the rename is left.
    sealed: bool,
}

impl TokenWriter {
    /// `vocab_size` decides the width: u16 when every id fits.
    pub fn create(path: &Path, vocab_size: usize, tokenizer_sha256: &str) -> Result<TokenWriter> {
        hex_to_bytes(tokenizer_sha256)?;
        crate::fsutil::create_parent(path)?;
        let tmp = path.with_extension(format!("part{}", std::process::id()));
        let file = std::fs::File::create(&tmp)
            .map_err(|e| Error::output(path, "creating token file", e))?;
        // From here the writer owns the temporary: every failure below, and every later one,
        // drops it, and the drop removes the file (a full disk leaves nothing behind).
        let mut w = TokenWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            header: Header {
                token_bytes: if vocab_size <= 1 << 16 { 2 } else { 4 },
                n_tokens: 0,
                source_bytes: 0,
                tokenizer_sha256: tokenizer_sha256.to_string(),
            },
            sealed: false,
        };
        // Unbuffered, so a disk that cannot take even the header fails here.
        w.out
            .get_mut()
            .write_all(&[0u8; HEADER_LEN])
            .map_err(|e| Error::output(&w.tmp, "writing", e))?;
        Ok(w)
    }

    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        let wide = self.header.token_bytes == 4;
        for &id in ids {
            let r = if wide {
                self.out.write_all(&id.to_le_bytes())
            } else {
                let narrow = u16::try_from(id).map_err(|_| {
                    Error::Data(format!("token id {id} does not fit the u16 token file"))
                })?;
                self.out.write_all(&narrow.to_le_bytes())
            };
            r.map_err(|e| Error::output(&self.tmp, "writing", e))?;
        }
        self.header.n_tokens += ids.len() as u64;
        Ok(())
    }

    /// Counts bytes of source text (for bits per byte).
    pub fn add_source_bytes(&mut self, n: u64) {
        self.header.source_bytes += n;
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Writes the tokens still buffered and the header, and syncs the temporary file: what is
    /// left is the rename of [`finish`](Self::finish). Lets a caller with two files (train and
    /// validation) see both written before either is renamed into place.
    pub fn seal(&mut self) -> Result<()> {
        if self.sealed {
            return Ok(());
        }
        let tmp = self.tmp.clone();
        let io = |e| Error::output(&tmp, "writing", e);
        self.out.flush().map_err(io)?;
        let header = self.header.encode()?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        self.sealed = true;
        Ok(())
    }

    pub fn finish(mut self) -> Result<Header> {
        self.seal()?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::output(&self.path, "renaming token file", e))?;
        Ok(self.header.clone())
    }
}

impl Drop for TokenWriter {
    fn drop(&mut self) {
        // Only an unfinished writer still has its temporary file (after `finish` this fails
        // harmlessly: the name is gone).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// A token file opened read-only through a memory map.
pub struct TokenFile {
    pub header: Header,
    pub path: PathBuf,
    mmap: memmap2::Mmap,
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<TokenFile> {
        // Read-only map; token files are written under a temporary name and renamed.
        let mmap = crate::fsutil::map_input(path, "token file")?;
        let name = path.display().to_string();
        let header = Header::decode(&mmap, &name)?;
        // Checked: a forged count whose product wraps around must not pass for the file's size.
        let want = header
            .n_tokens
            .checked_mul(header.token_bytes as u64)
            .and_then(|b| b.checked_add(HEADER_LEN as u64));
        if want != Some(mmap.len() as u64) {
            let want = want.map_or_else(|| "more than 2^64".into(), |w| w.to_string());
            return Err(Error::Data(format!(
                "{name}: token file is {} bytes but its header promises {want} (truncated or corrupt)",
                mmap.len()
            )));
        }
        Ok(TokenFile {
            header,
            path: path.to_path_buf(),
            mmap,
        })
    }

    /// Refuses a file made with another tokenizer.
    pub fn check_tokenizer(&self, sha256: &str) -> Result<()> {
        if self.header.tokenizer_sha256 != sha256 {
            return Err(Error::Data(format!(
                "{}: tokens were made with tokenizer {}…, but this model's tokenizer is {}…; re-encode the text with tb-tok",
                self.path.display(),
                &self.header.tokenizer_sha256[..12],
                &sha256[..12.min(sha256.len())]
            )));
        }
        Ok(())
    }

    /// Refuses an id the tokenizer does not have (a corrupt file, or one written by hand), naming
    /// the first one's position: decoding would otherwise drop it silently.
    pub fn check_ids(&self, vocab_size: usize) -> Result<()> {
        if let Some(i) = (0..self.len()).find(|&i| self.get(i) as usize >= vocab_size) {
            return Err(Error::Data(format!(
                "{}: token {i} is id {}, outside the tokenizer's {vocab_size} ids; the file is \
                 corrupt or was not made with this tokenizer: re-encode the text with tb-tok",
                self.path.display(),
                self.get(i)
            )));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.header.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i`.
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let d = &self.mmap[HEADER_LEN..];
        if self.header.token_bytes == 2 {
            u16::from_le_bytes([d[2 * i], d[2 * i + 1]]) as u32
        } else {
            // Cannot fail: the slice is 4 bytes (`open` checked the file holds every token).
            u32::from_le_bytes(d[4 * i..4 * i + 4].try_into().unwrap())
        }
    }

    /// Tokens `start..start+len` as u32.
    pub fn slice(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.get(i)).collect()
    }
}
