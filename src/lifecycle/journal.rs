//! The index's write-ahead journal: an append-only file of checksummed records, replayed at start.
//!
//! Why a journal and not an embedded database: every index change must survive a process crash
//! the moment it is acknowledged, yet the default durability groups fsyncs. A `write(2)` per
//! record puts it in the page cache (a `kill -9` loses nothing); a timer fsyncs the lot and then
//! appends a `SyncPoint`, so after a power loss the records past the last `SyncPoint` name exactly
//! the blobs to re-verify. Replaying a compact binary log of a million records takes well under a
//! second, and compaction rewrites it as the smallest journal that rebuilds the same state.
//!
//! ```text
//! index/journal      [magic "HOARDJ01"] then records: [len u32 LE][crc32 u32 LE][payload len bytes]
//! index/journal.new  compaction in progress (renamed over journal, the commit point)
//! index/clean        present only after a clean shutdown
//! ```
//! A torn or corrupt tail (crash mid-append) fails its checksum and is cut off at replay.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::clock::Millis;
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"HOARDJ01";
/// Upper bound on one record, so a corrupt length cannot make replay allocate gigabytes.
const MAX_RECORD: u32 = 16 << 20;

/// One change to the index. Replaying the journal applies these in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Bytes of `digest` were committed to the blob store.
    BlobAdded {
        digest: Digest,
        size: u64,
        at: Millis,
    },
    /// Bytes of `digest` were removed from the blob store.
    BlobRemoved {
        digest: Digest,
    },
    /// `digest` became visible in `repo` (pushed or mounted there).
    Link {
        repo: String,
        digest: Digest,
    },
    Unlink {
        repo: String,
        digest: Digest,
    },
    /// Many `Link`s into one repository in one record (compacted journals).
    Links {
        repo: String,
        digests: Vec<Digest>,
    },
    /// A manifest was stored in `repo`.
    ManifestPut {
        repo: String,
        digest: Digest,
        meta: ManifestMeta,
    },
    /// A manifest left `repo`, with every tag that pointed at it.
    ManifestDeleted {
        repo: String,
        digest: Digest,
    },
    TagSet {
        repo: String,
        tag: String,
        digest: Digest,
        at: Millis,
    },
    TagDeleted {
        repo: String,
        tag: String,
    },
    /// Records `0..upto` of this journal file, and every blob they name, are on stable storage.
    SyncPoint {
        upto: u64,
    },
    /// The blob was read or its existence checked at `at` (debounced: not every access).
    BlobTouched {
        digest: Digest,
        at: Millis,
    },
    /// The manifest (and so its tags) was read at `at` (debounced).
    ManifestTouched {
        repo: String,
        digest: Digest,
        at: Millis,
    },
    /// The daemon's cache time reached `at`: where a restarted daemon's cache clock resumes.
    ClockMark {
        at: Millis,
    },
}

/// What the index keeps of a manifest: enough to answer HEAD, tag lists and referrers without
/// reading it, and the children it pins.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ManifestMeta {
    pub size: u64,
    pub media_type: String,
    pub pushed: Millis,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    /// The manifest's `annotations`, as JSON text (only referrers responses need them).
    pub annotations: Option<String>,
    /// Digests this manifest references that are stored here (config, layers, child manifests).
    pub children: Vec<Digest>,
    /// Last access, kept in memory exactly and journaled debounced (`ManifestTouched`).
    pub access: Stamp,
    /// A tag or another manifest of its repository has reached it since it was last pushed.
    /// Once nothing does any more it is *superseded* (a cache tag moved on), and goes first
    /// under size pressure; one never reached yet may be an export in progress (an index's
    /// children are pushed before the index) and keeps its orphan grace.
    pub rooted: bool,
}

/// A last-access time that readers update under the index's read lock (an atomic maximum, so a
/// hot path takes no write lock), and the last value journaled, which debounces the journal.
#[derive(Default)]
pub struct Stamp {
    access: std::sync::atomic::AtomicI64,
    noted: std::sync::atomic::AtomicI64,
}

impl Stamp {
    pub fn new(at: Millis) -> Stamp {
        Stamp {
            access: at.into(),
            noted: at.into(),
        }
    }

    pub fn get(&self) -> Millis {
        self.access.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records an access at `now`; true when the journal should hear of it (the last journaled
    /// access is older than `debounce`). Only one caller wins that, so one record is queued.
    pub fn touch(&self, now: Millis, debounce: Millis) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.access.fetch_max(now, Relaxed);
        let noted = self.noted.load(Relaxed);
        now.saturating_sub(noted) >= debounce
            && self
                .noted
                .compare_exchange(noted, now, Relaxed, Relaxed)
                .is_ok()
    }

    /// Applies a journaled access (replay, or the record a touch queued).
    pub fn set_at_least(&self, at: Millis) {
        use std::sync::atomic::Ordering::Relaxed;
        self.access.fetch_max(at, Relaxed);
        self.noted.fetch_max(at, Relaxed);
    }
}

impl Clone for Stamp {
    fn clone(&self) -> Stamp {
        use std::sync::atomic::Ordering::Relaxed;
        Stamp {
            access: self.access.load(Relaxed).into(),
            noted: self.noted.load(Relaxed).into(),
        }
    }
}

/// Access times are bookkeeping, not content: two metas with the same content are equal.
impl PartialEq for Stamp {
    fn eq(&self, _: &Stamp) -> bool {
        true
    }
}

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

pub struct Journal {
    path: PathBuf,
    file: File,
    durable_each: bool,
    /// Records in the file; the next record's sequence number.
    records: u64,
    /// Bytes of whole records (plus magic) in the file.
    len: u64,
}

/// See [`Journal::sync_handle`].
pub struct SyncHandle(File, PathBuf);

impl SyncHandle {
    /// Makes every record appended before the handle was taken durable.
    pub fn sync(&self) -> Result<()> {
        self.0
            .sync_data()
            .map_err(|e| Error::io(format!("syncing {}", self.1.display()), e))
    }
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, replaying every intact record through
    /// `apply(sequence, op)`. Returns the journal positioned for appends and the number of records.
    pub fn open(
        dir: &Path,
        durable_each: bool,
        mut apply: impl FnMut(u64, Op),
    ) -> Result<(Journal, u64)> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join("journal");
        let _ = fs::remove_file(dir.join("journal.new"));
        let mut count = 0u64;
        let mut good_len = MAGIC.len() as u64;
        match File::open(&path) {
            Ok(f) => {
                let total = f
                    .metadata()
                    .map_err(|e| {
                        Error::io(format!("reading journal metadata {}", path.display()), e)
                    })?
                    .len();
                let mut r = BufReader::with_capacity(1 << 20, f);
                let mut magic = [0u8; 8];
                if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
                    if total > 0 {
                        return Err(Error::internal(format!(
                            "{} is not a hoard journal (bad magic); refusing to overwrite it",
                            path.display()
                        )));
                    }
                } else {
                    let mut payload = Vec::with_capacity(4096);
                    loop {
                        match read_record(&mut r, &mut payload) {
                            Ok(Some((op, len))) => {
                                apply(count, op);
                                count += 1;
                                good_len += len;
                            }
                            Ok(None) => break,
                            Err(why) => {
                                tracing::warn!(
                                    offset = good_len,
                                    total,
                                    "journal tail is torn ({why}); cutting it off"
                                );
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("opening journal {}", path.display()), e)),
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening journal {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading journal metadata {}", path.display()), e))?
            .len();
        if len < MAGIC.len() as u64 {
            file.set_len(0)
                .map_err(|e| Error::io(format!("resetting journal {}", path.display()), e))?;
            file.write_all(MAGIC)
                .map_err(|e| Error::io(format!("writing journal {}", path.display()), e))?;
            good_len = MAGIC.len() as u64;
        } else if len != good_len {
            file.set_len(good_len)
                .map_err(|e| Error::io(format!("truncating torn journal {}", path.display()), e))?;
        }
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(good_len))
            .map_err(|e| Error::io(format!("seeking journal {}", path.display()), e))?;
        Ok((
            Journal {
                path,
                file,
                durable_each,
                records: count,
                len: good_len,
            },
            count,
        ))
    }

    /// Appends records with one `write(2)`; with per-write durability also fsyncs.
    pub fn append(&mut self, ops: &[Op]) -> Result<()> {
        let mut buf = Vec::with_capacity(128 * ops.len());
        for op in ops {
            encode_record(op, &mut buf);
        }
        if let Err(e) = self.file.write_all(&buf) {
            // A short write (disk full) must not leave half a record for the next append to
            // follow: cut the file back to the last whole record.
            self.undo_partial();
            return Err(Error::io(
                format!("appending to the index journal {}", self.path.display()),
                e,
            ));
        }
        self.len += buf.len() as u64;
        self.records += ops.len() as u64;
        if self.durable_each {
            self.sync()?;
        }
        Ok(())
    }

    fn undo_partial(&mut self) {
        use std::io::Seek;
        let cut = self.file.set_len(self.len);
        let seek = self.file.seek(io::SeekFrom::Start(self.len));
        if cut.is_err() || seek.is_err() {
            tracing::error!("cannot cut a partial journal record; replay will drop it");
        }
    }

    /// The sequence number the next appended record will get.
    pub fn next_seq(&self) -> u64 {
        self.records
    }

    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| {
            Error::io(
                format!("syncing the index journal {}", self.path.display()),
                e,
            )
        })
    }

    /// A second handle on the journal file, to fsync what has been appended so far without
    /// holding the journal (and so without stalling appends while the device catches up).
    pub fn sync_handle(&self) -> Result<SyncHandle> {
        let file = self.file.try_clone().map_err(|e| {
            Error::io(
                format!("opening the index journal for sync {}", self.path.display()),
                e,
            )
        })?;
        Ok(SyncHandle(file, self.path.clone()))
    }

    /// Replaces the journal with `ops` (the compacted state): written to `journal.new`, fsynced,
    /// renamed over `journal` (the commit point), directory fsynced.
    pub fn rewrite(&mut self, ops: impl Iterator<Item = Op>) -> Result<u64> {
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let tmp = dir.join("journal.new");
        let written = self.write_compacted(&tmp, ops);
        let (n, len) = match written {
            Ok(v) => v,
            Err(e) => {
                // E.g. disk full: the old journal is intact and stays in use.
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, &self.path)
            .map_err(|e| Error::io(format!("replacing journal {}", self.path.display()), e))?;
        sync_dir(&dir)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| Error::io(format!("reopening journal {}", self.path.display()), e))?;
        use std::io::Seek;
        file.seek(io::SeekFrom::End(0))
            .map_err(|e| Error::io(format!("seeking journal {}", self.path.display()), e))?;
        self.file = file;
        self.records = n;
        self.len = len;
        Ok(n)
    }

    fn write_compacted(&self, tmp: &Path, ops: impl Iterator<Item = Op>) -> Result<(u64, u64)> {
        let mut w = io::BufWriter::with_capacity(
            1 << 20,
            File::create(tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?,
        );
        let io_err = |e| Error::io(format!("writing {}", tmp.display()), e);
        w.write_all(MAGIC).map_err(io_err)?;
        let mut buf = Vec::with_capacity(4096);
        let mut n = 0;
        let mut len = MAGIC.len() as u64;
        for op in ops {
            buf.clear();
            encode_record(&op, &mut buf);
            w.write_all(&buf).map_err(io_err)?;
            n += 1;
            len += buf.len() as u64;
        }
        let file = w.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        Ok((n, len))
    }

    pub fn file_len(&self) -> u64 {
        self.len
    }
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

// ---- record encoding -------------------------------------------------------------------------

const T_BLOB_ADDED: u8 = 1;
const T_BLOB_REMOVED: u8 = 2;
const T_LINK: u8 = 3;
const T_UNLINK: u8 = 4;
const T_MANIFEST_PUT: u8 = 5;
const T_MANIFEST_DELETED: u8 = 6;
const T_TAG_SET: u8 = 7;
const T_TAG_DELETED: u8 = 8;
const T_SYNC_POINT: u8 = 9;
const T_BLOB_TOUCHED: u8 = 10;
const T_MANIFEST_TOUCHED: u8 = 11;
const T_CLOCK_MARK: u8 = 12;
const T_LINKS: u8 = 13;

fn encode_record(op: &Op, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    encode_op(op, out);
    let payload = &out[start + 8..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_op(op: &Op, o: &mut Vec<u8>) {
    match op {
        Op::BlobAdded { digest, size, at } => {
            o.push(T_BLOB_ADDED);
            put_digest(o, digest);
            o.extend_from_slice(&size.to_le_bytes());
            o.extend_from_slice(&at.to_le_bytes());
        }
        Op::BlobRemoved { digest } => {
            o.push(T_BLOB_REMOVED);
            put_digest(o, digest);
        }
        Op::Link { repo, digest } | Op::Unlink { repo, digest } => {
            o.push(if matches!(op, Op::Link { .. }) {
                T_LINK
            } else {
                T_UNLINK
            });
            put_str(o, repo);
            put_digest(o, digest);
        }
        Op::ManifestPut { repo, digest, meta } => {
            o.push(T_MANIFEST_PUT);
            put_str(o, repo);
            put_digest(o, digest);
            o.extend_from_slice(&meta.size.to_le_bytes());
            put_str(o, &meta.media_type);
            o.extend_from_slice(&meta.pushed.to_le_bytes());
            put_opt_digest(o, meta.subject.as_ref());
            put_opt_str(o, meta.artifact_type.as_deref());
            put_opt_str(o, meta.annotations.as_deref());
            o.extend_from_slice(&(meta.children.len() as u32).to_le_bytes());
            for c in &meta.children {
                put_digest(o, c);
            }
            // Flags, last: records written before there were any simply end here.
            o.push(u8::from(meta.rooted));
        }
        Op::ManifestDeleted { repo, digest } => {
            o.push(T_MANIFEST_DELETED);
            put_str(o, repo);
            put_digest(o, digest);
        }
        Op::TagSet {
            repo,
            tag,
            digest,
            at,
        } => {
            o.push(T_TAG_SET);
            put_str(o, repo);
            put_str(o, tag);
            put_digest(o, digest);
            o.extend_from_slice(&at.to_le_bytes());
        }
        Op::TagDeleted { repo, tag } => {
            o.push(T_TAG_DELETED);
            put_str(o, repo);
            put_str(o, tag);
        }
        Op::SyncPoint { upto } => {
            o.push(T_SYNC_POINT);
            o.extend_from_slice(&upto.to_le_bytes());
        }
        Op::BlobTouched { digest, at } => {
            o.push(T_BLOB_TOUCHED);
            put_digest(o, digest);
            o.extend_from_slice(&at.to_le_bytes());
        }
        Op::ManifestTouched { repo, digest, at } => {
            o.push(T_MANIFEST_TOUCHED);
            put_str(o, repo);
            put_digest(o, digest);
            o.extend_from_slice(&at.to_le_bytes());
        }
        Op::ClockMark { at } => {
            o.push(T_CLOCK_MARK);
            o.extend_from_slice(&at.to_le_bytes());
        }
        Op::Links { repo, digests } => {
            o.push(T_LINKS);
            put_str(o, repo);
            o.extend_from_slice(&(digests.len() as u32).to_le_bytes());
            for d in digests {
                put_digest(o, d);
            }
        }
    }
}

fn put_digest(o: &mut Vec<u8>, d: &Digest) {
    o.push(match d.algorithm() {
        Algorithm::Sha256 => 1,
        Algorithm::Sha512 => 2,
    });
    o.extend_from_slice(d.bytes());
}

fn put_opt_digest(o: &mut Vec<u8>, d: Option<&Digest>) {
    match d {
        Some(d) => put_digest(o, d),
        None => o.push(0),
    }
}

fn put_str(o: &mut Vec<u8>, s: &str) {
    o.extend_from_slice(&(s.len() as u32).to_le_bytes());
    o.extend_from_slice(s.as_bytes());
}

fn put_opt_str(o: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            o.push(1);
            put_str(o, s);
        }
        None => o.push(0),
    }
}

/// Reads one record; `Ok(None)` at a clean end of file, `Err` for a torn or corrupt record.
fn read_record(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
) -> std::result::Result<Option<(Op, u64)>, String> {
    let mut head = [0u8; 8];
    match read_full(r, &mut head) {
        Ok(0) => return Ok(None),
        Ok(8) => {}
        Ok(n) => return Err(format!("{n}-byte record header")),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > MAX_RECORD {
        return Err(format!("record length {len}"));
    }
    // One buffer for the whole replay: no allocation per record.
    payload.resize(len as usize, 0);
    if read_full(r, payload).map_err(|e| e.to_string())? != len as usize {
        return Err("short record".into());
    }
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let op = decode_op(payload).ok_or("undecodable record")?;
    Ok(Some((op, 8 + len as u64)))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_le_bytes)
    }
    fn digest_tagged(&mut self, tag: u8) -> Option<Digest> {
        match tag {
            1 => Digest::from_raw(Algorithm::Sha256, self.take(32)?),
            2 => Digest::from_raw(Algorithm::Sha512, self.take(64)?),
            _ => None,
        }
    }
    fn digest(&mut self) -> Option<Digest> {
        let tag = self.u8()?;
        self.digest_tagged(tag)
    }
    fn opt_digest(&mut self) -> Option<Option<Digest>> {
        match self.u8()? {
            0 => Some(None),
            tag => self.digest_tagged(tag).map(Some),
        }
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn opt_string(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => self.string().map(Some),
            _ => None,
        }
    }
}

fn decode_op(p: &[u8]) -> Option<Op> {
    let mut c = Cursor(p);
    let op = match c.u8()? {
        T_BLOB_ADDED => Op::BlobAdded {
            digest: c.digest()?,
            size: c.u64()?,
            at: c.i64()?,
        },
        T_BLOB_REMOVED => Op::BlobRemoved {
            digest: c.digest()?,
        },
        T_LINK => Op::Link {
            repo: c.string()?,
            digest: c.digest()?,
        },
        T_UNLINK => Op::Unlink {
            repo: c.string()?,
            digest: c.digest()?,
        },
        T_MANIFEST_PUT => {
            let repo = c.string()?;
            let digest = c.digest()?;
            let size = c.u64()?;
            let media_type = c.string()?;
            let pushed = c.i64()?;
            let subject = c.opt_digest()?;
            let artifact_type = c.opt_string()?;
            let annotations = c.opt_string()?;
            let n = c.u32()? as usize;
            let mut children = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                children.push(c.digest()?);
            }
            let flags = if c.0.is_empty() { 0 } else { c.u8()? };
            Op::ManifestPut {
                repo,
                digest,
                meta: ManifestMeta {
                    size,
                    media_type,
                    pushed,
                    subject,
                    artifact_type,
                    annotations,
                    children,
                    access: Stamp::new(pushed),
                    rooted: flags & 1 != 0,
                },
            }
        }
        T_MANIFEST_DELETED => Op::ManifestDeleted {
            repo: c.string()?,
            digest: c.digest()?,
        },
        T_TAG_SET => Op::TagSet {
            repo: c.string()?,
            tag: c.string()?,
            digest: c.digest()?,
            at: c.i64()?,
        },
        T_TAG_DELETED => Op::TagDeleted {
            repo: c.string()?,
            tag: c.string()?,
        },
        T_SYNC_POINT => Op::SyncPoint { upto: c.u64()? },
        T_BLOB_TOUCHED => Op::BlobTouched {
            digest: c.digest()?,
            at: c.i64()?,
        },
        T_MANIFEST_TOUCHED => Op::ManifestTouched {
            repo: c.string()?,
            digest: c.digest()?,
            at: c.i64()?,
        },
        T_CLOCK_MARK => Op::ClockMark { at: c.i64()? },
        T_LINKS => {
            let repo = c.string()?;
            let n = c.u32()? as usize;
            let mut digests = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                digests.push(c.digest()?);
            }
            Op::Links { repo, digests }
        }
        _ => return None,
    };
    if !c.0.is_empty() {
        return None;
    }
    Some(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_ops() -> Vec<Op> {
        let d = Digest::sha256_of(b"a");
        let e = Digest::of(Algorithm::Sha512, b"b");
        vec![
            Op::BlobAdded {
                digest: d,
                size: 1,
                at: -5,
            },
            Op::Link {
                repo: "x/y".into(),
                digest: d,
            },
            Op::ManifestPut {
                repo: "x/y".into(),
                digest: e,
                meta: ManifestMeta {
                    size: 10,
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                    pushed: 7,
                    subject: Some(d),
                    artifact_type: Some("a/b".into()),
                    annotations: Some("{}".into()),
                    children: vec![d, e],
                    access: Stamp::new(7),
                    rooted: true,
                },
            },
            Op::TagSet {
                repo: "x/y".into(),
                tag: "t".into(),
                digest: e,
                at: 9,
            },
            Op::TagDeleted {
                repo: "x/y".into(),
                tag: "t".into(),
            },
            Op::ManifestDeleted {
                repo: "x/y".into(),
                digest: e,
            },
            Op::Unlink {
                repo: "x/y".into(),
                digest: d,
            },
            Op::BlobRemoved { digest: d },
            Op::SyncPoint { upto: 3 },
            Op::BlobTouched { digest: d, at: 9 },
            Op::ManifestTouched {
                repo: "x/y".into(),
                digest: e,
                at: -4,
            },
            Op::ClockMark { at: 11 },
            Op::Links {
                repo: "x/y".into(),
                digests: vec![d, e],
            },
        ]
    }

    #[test]
    fn manifest_records_from_before_flags_read_as_not_rooted() {
        let ops = sample_ops();
        let Op::ManifestPut { repo, digest, meta } = ops[2].clone() else {
            panic!("sample order")
        };
        let mut payload = Vec::new();
        encode_op(
            &Op::ManifestPut {
                repo: repo.clone(),
                digest,
                meta: meta.clone(),
            },
            &mut payload,
        );
        // The same record as an earlier version wrote it: no flags byte.
        payload.pop();
        let Some(Op::ManifestPut { meta: old, .. }) = decode_op(&payload) else {
            panic!("an old manifest record must decode")
        };
        assert!(!old.rooted);
        assert_eq!(old.children, meta.children);
    }

    #[test]
    fn round_trips_and_cuts_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let ops = sample_ops();
        {
            let (mut j, n) = Journal::open(dir.path(), false, |_, _| {}).unwrap();
            assert_eq!(n, 0);
            j.append(&ops).unwrap();
        }
        // A torn append: half a record at the end.
        let path = dir.path().join("journal");
        let mut bytes = fs::read(&path).unwrap();
        let full = bytes.len();
        let mut extra = Vec::new();
        encode_record(&ops[0], &mut extra);
        bytes.extend_from_slice(&extra[..extra.len() - 3]);
        fs::write(&path, &bytes).unwrap();

        let mut seen = Vec::new();
        let (mut j, n) = Journal::open(dir.path(), false, |_, op| seen.push(op)).unwrap();
        assert_eq!(n as usize, ops.len());
        assert_eq!(seen, ops);
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, full);
        // Appends after the cut land where the torn record was.
        j.append(&ops[..1]).unwrap();
        drop(j);
        let mut again = Vec::new();
        Journal::open(dir.path(), false, |_, op| again.push(op)).unwrap();
        assert_eq!(again.len(), ops.len() + 1);
    }

    #[test]
    fn corrupt_byte_stops_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let ops = sample_ops();
        Journal::open(dir.path(), false, |_, _| {})
            .unwrap()
            .0
            .append(&ops)
            .unwrap();
        let path = dir.path().join("journal");
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let mut seen = Vec::new();
        Journal::open(dir.path(), false, |_, op| seen.push(op)).unwrap();
        assert!(seen.len() < ops.len());
        assert_eq!(seen[..], ops[..seen.len()]);
    }

    #[test]
    fn rewrite_replaces_contents() {
        let dir = tempfile::tempdir().unwrap();
        let ops = sample_ops();
        let (mut j, _) = Journal::open(dir.path(), false, |_, _| {}).unwrap();
        j.append(&ops).unwrap();
        j.rewrite(ops[..2].iter().cloned()).unwrap();
        j.append(&[Op::SyncPoint { upto: 2 }]).unwrap();
        drop(j);
        let mut seen = Vec::new();
        Journal::open(dir.path(), false, |_, op| seen.push(op)).unwrap();
        assert_eq!(
            seen,
            vec![ops[0].clone(), ops[1].clone(), Op::SyncPoint { upto: 2 }]
        );
    }
}
