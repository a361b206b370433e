//! Where blob bytes live. One small `BlobStore` trait; the disk store is its leaf (S3 and a tiered
//! store come later and wrap or replace it). Stores know nothing of HTTP or repositories: they
//! keep verified bytes under their digest.

pub mod chunk;
pub mod disk;
mod io_thread;
pub mod s3;
pub mod tiered;

use std::io::{Read, Seek};
use std::path::Path;

use bytes::Bytes;

use crate::digest::{Algorithm, Digest};
use crate::error::{Error, ErrorKind, Result};

/// The bytes of one stored blob, positioned at its start.
pub trait BlobRead: Read + Seek + Send + Sync {
    fn size(&self) -> u64;
    /// A reader whose bytes already arrive as a stream of chunks (an S3 GET) hands the stream
    /// over, from its position on, so a response can pass the chunks on as they come instead
    /// of copying them through blocking reads. `None`: read it with `read`.
    fn chunks(&mut self) -> Option<Chunks> {
        None
    }
}

/// Chunks of a blob as they arrive; the sender stops when the receiver is dropped.
pub type Chunks = tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>;

/// An upload in progress: bytes are hashed and counted as they are written, so the commit
/// compares digests without re-reading anything. Dropping a writer discards the upload.
pub trait BlobWriter: Send {
    fn write(&mut self, buf: &[u8]) -> Result<()>;
    /// Like `write`, for bytes the caller already owns: a writer may keep them (for an I/O
    /// thread) instead of copying.
    fn write_owned(&mut self, buf: Bytes) -> Result<()> {
        self.write(&buf)
    }
    /// Bytes written so far.
    fn written(&self) -> u64;
    /// The upload offset from which this writer takes bytes best in block-aligned `ChunkBuf`s
    /// (where its I/O thread takes over); before it, and for writers without one, the caller
    /// passes bytes on as they come.
    fn aligned_from(&self) -> Option<u64> {
        None
    }
    /// Between two requests of a chunked upload: lets go of anything that costs more than the
    /// bytes and hash state (an I/O thread), to start again with the next bytes. Blocking.
    fn park(&mut self) -> Result<()> {
        Ok(())
    }
    /// The digest the client named before sending a byte (a `PUT ?digest=` or `POST ?digest=`
    /// with the body, which is how BuildKit and containerd push): a writer may stream the bytes
    /// straight to that name where nothing there is visible before its commit (S3: the multipart
    /// upload goes to the blob's own key, so no copy follows). The commit still verifies them.
    fn named(&mut self, _digest: &Digest) {}
    /// Announces that the upload will reach `total` bytes, so space can be reserved (and the
    /// upload refused) before its bytes stream. Writers without a budget accept anything.
    fn reserve(&mut self, _total: u64) -> Result<()> {
        Ok(())
    }
    /// Verifies digest and size, then makes the blob visible in one atomic step. Returns the
    /// size. A mismatch discards the upload and stores nothing.
    fn commit(self: Box<Self>, expect: Expect) -> Result<u64>;
}

/// What the client promised: the commit refuses bytes that do not match.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub digest: Digest,
    pub size: Option<u64>,
}

/// Blocking calls: the server runs them on the blocking pool.
pub trait BlobStore: Send + Sync + 'static {
    /// Starts a new upload hashed with `alg`.
    fn begin(&self, alg: Algorithm) -> Result<Box<dyn BlobWriter>>;
    fn open(&self, d: &Digest) -> Result<Box<dyn BlobRead>>;
    /// Opens `d` positioned at `start` (a ranged read fetches only from there).
    fn open_at(&self, d: &Digest, start: u64) -> Result<Box<dyn BlobRead>> {
        let mut r = self.open(d)?;
        if start > 0 {
            r.seek(std::io::SeekFrom::Start(start))
                .map_err(|e| crate::error::Error::io(format!("seeking in {d}"), e))?;
        }
        Ok(r)
    }
    fn delete(&self, d: &Digest) -> Result<()>;
    /// Calls `f` for every stored blob (verification and repair; never on a hot path).
    fn walk(&self, f: &mut dyn FnMut(Digest, u64)) -> Result<()>;
    /// Makes every blob committed so far durable (the group-commit point).
    fn sync(&self) -> Result<()>;
    /// Moves a blob found corrupt out of the way, kept for inspection but never served.
    fn quarantine(&self, d: &Digest) -> Result<()>;
    /// Makes the file at `path` (bytes a client streamed, which hashed to `hashed` and came to
    /// `size` bytes as they were written) the blob `expect.digest`, checking both first. The file
    /// is moved (a disk store renames it) or copied; it is gone or unchanged afterwards.
    fn adopt(&self, path: &Path, hashed: Digest, size: u64, expect: Expect) -> Result<u64> {
        check_adopted(hashed, size, &expect)?;
        copy_in(self, path, expect)
    }
    /// A commit is durable when it returns (S3): there is no group commit to wait for and
    /// nothing to re-verify after an unclean stop.
    fn durable_on_commit(&self) -> bool {
        false
    }
}

/// The checks a commit makes, for bytes hashed elsewhere.
pub fn check_adopted(hashed: Digest, size: u64, expect: &Expect) -> Result<()> {
    if let Some(want) = expect.size.filter(|w| *w != size) {
        return Err(Error::new(
            ErrorKind::SizeMismatch,
            format!("received {size} bytes, but {want} were declared"),
        ));
    }
    if hashed != expect.digest {
        return Err(Error::new(
            ErrorKind::DigestMismatch,
            format!(
                "the content hashes to {hashed}, not to the digest given ({})",
                expect.digest
            ),
        ));
    }
    Ok(())
}

/// Streams a file into `store` through an ordinary upload (verified again as it goes).
pub fn copy_in<S: BlobStore + ?Sized>(store: &S, path: &Path, expect: Expect) -> Result<u64> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut w = store.begin(expect.digest.algorithm())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n])?;
    }
    w.commit(expect)
}

/// Re-hashes a stored blob; `Ok(true)` when its bytes still match its name.
pub fn verify(store: &dyn BlobStore, d: &Digest) -> Result<bool> {
    let mut r = store.open(d)?;
    let mut h = d.algorithm().hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| crate::error::Error::io(format!("reading {d}"), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish() == *d)
}
