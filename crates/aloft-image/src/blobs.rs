//! The content-addressed blob store: `<images>/blobs/sha256/<hex>`.
//!
//! A blob is only ever visible under its final name after its SHA-256 and size were
//! checked: bytes go to a temporary file in `<images>/blobs/tmp/`, are verified, then
//! renamed into place. Blobs are shared by every image that references them.
//!
//! Downloads may be resumed: [`BlobStore::resumable`] keeps the partial bytes of an
//! interrupted download in `<images>/blobs/partial/<hex>` and hashes them again before
//! appending the rest. A partial file never becomes a blob without full verification.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Errors of the blob store. Each names the digest or path it failed on.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },
    #[error("blob {expected}: content has digest {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} is not in the store")]
    NotFound { digest: String },
    #[error("blob store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks `digest` is `sha256:<64 lowercase hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, BlobError> {
    let invalid = || BlobError::InvalidDigest {
        digest: digest.to_string(),
    };
    let hex = digest.strip_prefix("sha256:").ok_or_else(invalid)?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid());
    }
    Ok(hex)
}

/// The blob store rooted at `<images>/blobs`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating the directories of) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        for dir in [root.join("sha256"), root.join("tmp"), root.join("partial")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(Self { root })
    }

    /// Where the blob `digest` lives (whether or not it is present).
    pub fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        Ok(self.root.join("sha256").join(digest_hex(digest)?))
    }

    /// Is the blob present (with the given size, if one is given)?
    pub fn has(&self, digest: &str, size: Option<u64>) -> bool {
        match self
            .path(digest)
            .and_then(|p| fs::metadata(&p).map_err(io_err(&p)))
        {
            Ok(m) => m.is_file() && size.is_none_or(|s| s == m.len()),
            Err(_) => false,
        }
    }

    /// Opens a present blob for reading.
    pub fn open_blob(&self, digest: &str) -> Result<File, BlobError> {
        let path = self.path(digest)?;
        File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => BlobError::NotFound {
                digest: digest.to_string(),
            },
            _ => BlobError::Io { path, source },
        })
    }

    /// Reads a (small) present blob completely.
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, BlobError> {
        let mut buf = Vec::new();
        let path = self.path(digest)?;
        self.open_blob(digest)?
            .read_to_end(&mut buf)
            .map_err(io_err(&path))?;
        Ok(buf)
    }

    /// Every digest present in the store.
    pub fn list(&self) -> Result<Vec<String>, BlobError> {
        let dir = self.root.join("sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(name) = entry.file_name().to_str() {
                let digest = format!("sha256:{name}");
                if digest_hex(&digest).is_ok() {
                    out.push(digest);
                }
            }
        }
        Ok(out)
    }

    /// Removes a blob (absent is fine).
    pub fn remove(&self, digest: &str) -> Result<(), BlobError> {
        let path = self.path(digest)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    /// A writer for a blob whose digest (and maybe size) is known in advance.
    pub fn writer(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter, BlobError> {
        digest_hex(digest)?;
        let (tmp, file) = self.temp_file()?;
        Ok(BlobWriter {
            store: self.clone(),
            expected: Some((digest.to_string(), size)),
            tmp: Some(tmp),
            file,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// A writer for a blob whose digest is learned from its content.
    pub fn writer_unknown(&self) -> Result<BlobWriter, BlobError> {
        let (tmp, file) = self.temp_file()?;
        Ok(BlobWriter {
            store: self.clone(),
            expected: None,
            tmp: Some(tmp),
            file,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// A writer continuing an interrupted download of `digest`. Its
    /// [`BlobWriter::written`] tells from which offset to resume.
    pub fn resumable(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter, BlobError> {
        let hex = digest_hex(digest)?;
        let path = self.root.join("partial").join(hex);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf).map_err(io_err(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            written += n as u64;
        }
        if size.is_some_and(|s| written > s) {
            // Longer than the blob can be: start over.
            file.set_len(0).map_err(io_err(&path))?;
            hasher = Sha256::new();
            written = 0;
        }
        Ok(BlobWriter {
            store: self.clone(),
            expected: Some((digest.to_string(), size)),
            tmp: Some(path),
            file,
            hasher,
            written,
        })
    }

    /// Bytes kept from an interrupted download of `digest` (0 if none).
    pub fn partial_len(&self, digest: &str) -> u64 {
        digest_hex(digest)
            .ok()
            .and_then(|hex| fs::metadata(self.root.join("partial").join(hex)).ok())
            .map_or(0, |m| m.len())
    }

    /// Copies `reader` into the store, checking it against `expected` when given.
    /// Returns the digest and size.
    pub fn ingest(
        &self,
        mut reader: impl Read,
        expected: Option<(&str, Option<u64>)>,
    ) -> Result<(String, u64), BlobError> {
        let mut w = match expected {
            Some((d, s)) => self.writer(d, s)?,
            None => self.writer_unknown()?,
        };
        let tmp = w.tmp.clone().unwrap_or_default();
        let mut buf = vec![0u8; 1 << 17];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(BlobError::Io {
                        path: tmp.clone(),
                        source,
                    });
                }
            };
            w.write_all(&buf[..n]).map_err(io_err(&tmp))?;
        }
        w.commit()
    }

    /// Removes leftovers of interrupted writes (not resumable partial downloads).
    pub fn clean_tmp(&self) -> Result<(), BlobError> {
        let dir = self.root.join("tmp");
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(())
    }

    fn temp_file(&self) -> Result<(PathBuf, File), BlobError> {
        let path = self.root.join("tmp").join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok((path, file))
    }
}

/// Bytes on their way into the store. Dropping it without [`BlobWriter::commit`]
/// removes the temporary file (a resumable partial download is kept).
pub struct BlobWriter {
    store: BlobStore,
    expected: Option<(String, Option<u64>)>,
    tmp: Option<PathBuf>,
    file: File,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    /// Bytes written so far (for a resumed download: the offset to resume from).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Discards everything written so far (the server ignored a range request).
    pub fn restart(&mut self) -> Result<(), BlobError> {
        let path = self.tmp.clone().unwrap_or_default();
        self.file.set_len(0).map_err(io_err(&path))?;
        self.hasher = Sha256::new();
        self.written = 0;
        Ok(())
    }

    /// Verifies digest and size and moves the blob into place. On a mismatch the
    /// temporary bytes are deleted and the error names the expected digest.
    pub fn commit(mut self) -> Result<(String, u64), BlobError> {
        let tmp = self.tmp.take().unwrap_or_default();
        let result = self.finish(&tmp);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn finish(&mut self, tmp: &Path) -> Result<(String, u64), BlobError> {
        self.file.flush().map_err(io_err(tmp))?;
        let actual = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        let digest = match &self.expected {
            Some((expected, size)) => {
                if let Some(size) = size
                    && *size != self.written
                {
                    return Err(BlobError::SizeMismatch {
                        digest: expected.clone(),
                        expected: *size,
                        actual: self.written,
                    });
                }
                if *expected != actual {
                    return Err(BlobError::DigestMismatch {
                        expected: expected.clone(),
                        actual,
                    });
                }
                expected.clone()
            }
            None => actual,
        };
        let dest = self.store.path(&digest)?;
        fs::rename(tmp, &dest).map_err(io_err(&dest))?;
        Ok((digest, self.written))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take()
            && tmp.parent().and_then(Path::file_name) == Some("tmp".as_ref())
        {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn verified_blob_lands_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = sha(b"hello");
        let (got, size) = store.ingest(&b"hello"[..], Some((&d, Some(5)))).unwrap();
        assert_eq!((got.as_str(), size), (d.as_str(), 5));
        assert!(store.has(&d, Some(5)));
        assert_eq!(store.read(&d).unwrap(), b"hello");
    }

    #[test]
    fn mismatch_names_digest_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = sha(b"hello");
        let err = store
            .ingest(&b"hellO"[..], Some((&d, Some(5))))
            .unwrap_err();
        assert!(err.to_string().contains(&d), "{err}");
        let err = store.ingest(&b"hell"[..], Some((&d, Some(5)))).unwrap_err();
        assert!(matches!(err, BlobError::SizeMismatch { .. }), "{err}");
        assert!(!store.has(&d, None));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn resumable_download_continues_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"0123456789abcdef";
        let d = sha(data);
        {
            let mut w = store.resumable(&d, Some(16)).unwrap();
            w.write_all(&data[..7]).unwrap();
            // interrupted: dropped without commit
        }
        let mut w = store.resumable(&d, Some(16)).unwrap();
        assert_eq!(w.written(), 7);
        w.write_all(&data[7..]).unwrap();
        w.commit().unwrap();
        assert_eq!(store.read(&d).unwrap(), data);
    }

    #[test]
    fn bad_digests_are_refused() {
        for d in ["sha256:abc", "md5:00", "sha256:../../etc/passwd"] {
            assert!(digest_hex(d).is_err(), "{d}");
        }
    }
}
