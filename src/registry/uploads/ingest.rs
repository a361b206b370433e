//! Ingests: containerd's uploads (see the module above). Unlike an OCI upload (named by hoard), an ingest
//! is named by the client (containerd's `ref`) and must be resumable by offset after a cut
//! stream and after a hoard restart. Its first MiB is kept in memory while a stream writes it
//! (most blobs — manifests, configs, small layers — are committed from there in one store
//! write, with no file created and removed per ingest); past that, or when the stream ends
//! without a commit, it lives in files:
//!
//! ```text
//! ingest/<key>.meta   JSON: view, namespace, ref, started, total, expected
//! ingest/<key>.data   the bytes received so far
//! ```
//! (`key`: sha256 of view, namespace and ref.) One stream at a time holds an ingest (`lock`); a
//! second gets `Unavailable`, as containerd's own store answers. Bytes are hashed as they
//! arrive; after a restart the hash state is rebuilt by reading `.data` once. A commit from
//! files hands `.data` to the blob store (a disk store renames it into place: no second copy).
//! A crash loses at most an in-memory ingest's bytes (under 1 MiB), which the client's next
//! STAT shows as offset 0. Space is reserved against the size bound as bytes arrive.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::clock::{Millis, SharedClock};
use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::gc::Lifecycle;

/// Space is reserved in steps of this much (or what one write needs, if more).
const RESERVE_STEP: u64 = 8 << 20;
/// An ingest stays in memory up to this size while a stream holds it.
pub const IN_MEMORY: u64 = 1 << 20;

/// What an ingest is, as `.meta` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub view: String,
    pub namespace: String,
    pub reference: String,
    /// Cache time of the stream that began it.
    pub started: Millis,
    /// The size the client announced (0: none).
    pub total: u64,
    /// The digest the client announced, if any.
    pub expected: Option<String>,
}

/// An ingest's state as `Status` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub meta: Meta,
    pub offset: u64,
    pub updated: Millis,
}

enum Bytes {
    Memory(Vec<u8>),
    File(File),
}

/// An ingest held by one stream: its bytes, hash state and reservation.
pub struct Open {
    pub meta: Meta,
    key: String,
    dir: PathBuf,
    bytes: Bytes,
    hasher: Hasher,
    offset: u64,
    pub updated: Millis,
    reserved: u64,
    life: Arc<Lifecycle>,
    live: Arc<Mutex<HashMap<String, State>>>,
}

/// How a committed ingest's bytes reach the store.
pub enum Payload {
    Memory(bytes::Bytes),
    File(PathBuf),
}

impl Open {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The digest of the bytes so far.
    pub fn digest(&self) -> Digest {
        self.hasher.clone().finish()
    }

    pub fn state(&self) -> State {
        State {
            meta: self.meta.clone(),
            offset: self.offset,
            updated: self.updated,
        }
    }

    fn publish(&self) {
        if let Ok(mut l) = self.live.lock() {
            l.insert(self.key.clone(), self.state());
        }
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join(format!("{}.meta", self.key))
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join(format!("{}.data", self.key))
    }

    /// Moves an in-memory ingest to its files (blocking).
    pub fn spill(&mut self) -> Result<()> {
        if let Bytes::Memory(buf) = &self.bytes {
            let path = self.data_path();
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
            f.write_all(buf)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            write_meta(&self.meta_path(), &self.meta)?;
            self.bytes = Bytes::File(f);
        }
        Ok(())
    }

    /// Appends `data` (blocking).
    pub fn append(&mut self, data: &[u8], now: Millis) -> Result<()> {
        let upto = self.offset + data.len() as u64;
        if upto > self.reserved {
            // In memory, exactly what arrived (small blobs are many: a step each would promise
            // far more room than they take); in files, a step at a time.
            let step = if upto <= IN_MEMORY { 0 } else { RESERVE_STEP };
            let want = (upto - self.reserved).max(step);
            self.life.reserve(want)?;
            self.reserved += want;
        }
        if upto > IN_MEMORY {
            self.spill()?;
        }
        match &mut self.bytes {
            Bytes::Memory(buf) => buf.extend_from_slice(data),
            Bytes::File(f) => {
                if let Err(e) = f.write_all(data) {
                    // A short write (the disk filled) is taken back, so the file keeps exactly
                    // the bytes hashed so far and the client can resume at `offset`.
                    use std::io::Seek;
                    let offset = self.offset;
                    let _ = f
                        .set_len(offset)
                        .and_then(|()| f.seek(std::io::SeekFrom::Start(offset)));
                    return Err(Error::io(format!("writing ingest {}", self.key), e));
                }
            }
        }
        self.hasher.update(data);
        self.offset = upto;
        self.updated = now;
        self.publish();
        Ok(())
    }

    /// Drops every byte: the ingest starts again at offset 0 (blocking).
    pub fn truncate(&mut self, now: Millis) -> Result<()> {
        match &mut self.bytes {
            Bytes::Memory(buf) => buf.clear(),
            Bytes::File(f) => {
                use std::io::Seek;
                f.set_len(0)
                    .and_then(|()| f.seek(std::io::SeekFrom::Start(0)))
                    .map_err(|e| Error::io(format!("truncating ingest {}", self.key), e))?;
            }
        }
        self.hasher = Algorithm::Sha256.hasher();
        self.offset = 0;
        self.updated = now;
        self.publish();
        Ok(())
    }

    /// Records announced facts (`total`, `expected`) so a resumed stream knows them.
    pub fn save_meta(&self) -> Result<()> {
        self.publish();
        match self.bytes {
            Bytes::Memory(_) => Ok(()),
            Bytes::File(_) => write_meta(&self.meta_path(), &self.meta),
        }
    }

    /// The bytes, for the commit; the ingest's files go once the store has them (`remove`).
    pub fn payload(&mut self) -> Payload {
        match &mut self.bytes {
            Bytes::Memory(buf) => Payload::Memory(bytes::Bytes::from(std::mem::take(buf))),
            Bytes::File(_) => Payload::File(self.data_path()),
        }
    }

    /// A commit the store could not take (full, S3 unreachable): the bytes `payload` gave
    /// come back, and the ingest stays resumable for a commit retried later. False when they
    /// are gone (a file the store took before failing): the ingest cannot be kept (blocking).
    pub fn restore(&mut self, payload: Payload) -> bool {
        match payload {
            Payload::Memory(b) => {
                self.bytes = Bytes::Memory(Vec::from(b));
                true
            }
            Payload::File(path) => path.exists(),
        }
    }

    /// The ingest is over (committed or aborted): its files are removed (blocking).
    pub fn remove(mut self) {
        if let Bytes::File(_) = self.bytes {
            let _ = fs::remove_file(self.data_path());
            let _ = fs::remove_file(self.meta_path());
        }
        self.bytes = Bytes::Memory(Vec::new());
        if let Ok(mut l) = self.live.lock() {
            l.remove(&self.key);
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.life.release(self.reserved);
    }
}

/// A stream's hold on one ingest; `None` inside until the ingest exists. Dropped empty (the
/// ingest committed, aborted or left in its files), it takes its lock slot out of the map while
/// it still holds it, so the map keeps only ingests in use.
pub struct Held {
    guard: tokio::sync::OwnedMutexGuard<Option<Open>>,
    slots: Arc<Mutex<Slots>>,
    slot: Arc<tokio::sync::Mutex<Option<Open>>>,
    key: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.guard.is_none() {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if slots
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
            {
                slots.remove(&self.key);
            }
        }
    }
}

impl std::ops::Deref for Held {
    type Target = Option<Open>;
    fn deref(&self) -> &Option<Open> {
        &self.guard
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Option<Open> {
        &mut self.guard
    }
}

impl Held {
    /// The stream ended without a commit: an in-memory ingest goes to its files so it can be
    /// resumed by a later stream, or after a restart (blocking).
    pub fn release(mut self) -> Result<()> {
        let spilled = match self.guard.as_mut() {
            Some(open) => open.spill(),
            None => Ok(()),
        };
        if let Some(open) = self.guard.as_ref() {
            if let Ok(mut l) = open.live.lock() {
                l.remove(&open.key);
            }
        }
        // The ingest (now in files) is loaded again by the next stream.
        *self.guard = None;
        spilled
    }
}

pub struct Ingests {
    dir: PathBuf,
    clock: SharedClock,
    life: Arc<Lifecycle>,
    /// One lock per ingest key that a stream holds.
    locks: Arc<Mutex<Slots>>,
    /// Ingests streams hold now, as their last write left them.
    live: Arc<Mutex<HashMap<String, State>>>,
}

type Slots = HashMap<String, Arc<tokio::sync::Mutex<Option<Open>>>>;

/// The key naming an ingest: view, namespace and the client's ref.
pub fn key(view: &str, namespace: &str, reference: &str) -> String {
    let d = Digest::sha256_of(format!("{view}\0{namespace}\0{reference}").as_bytes());
    crate::digest::hex_encode(d.bytes())
}

impl Ingests {
    pub fn open(dir: PathBuf, clock: SharedClock, life: Arc<Lifecycle>) -> Result<Ingests> {
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Ingests {
            dir,
            clock,
            life,
            locks: Arc::new(Mutex::new(HashMap::new())),
            live: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn locks(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the ingest `reference` for one stream, loading it from its files if it has some
    /// (blocking). `Unavailable` while another stream holds it.
    pub fn lock(&self, view: &str, namespace: &str, reference: &str) -> Result<Held> {
        self.lock_key(key(view, namespace, reference), reference, true)
    }

    fn lock_key(&self, k: String, reference: &str, load: bool) -> Result<Held> {
        let busy = || {
            Error::new(
                ErrorKind::Unavailable,
                format!("ref {reference} locked: another stream is writing it"),
            )
        };
        let (slot, guard) = loop {
            let slot = self.locks().entry(k.clone()).or_default().clone();
            let guard = slot.clone().try_lock_owned().map_err(|_| busy())?;
            // A holder that finished may have taken this slot out of the map meanwhile: then
            // the map's slot (or a new one) is the lock, not this one.
            if self.locks().get(&k).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                break (slot, guard);
            }
        };
        let mut held = Held {
            guard,
            slots: self.locks.clone(),
            slot,
            key: k.clone(),
        };
        if load && held.guard.is_none() {
            *held.guard = self.load(&k)?;
        }
        if let Some(open) = held.guard.as_ref() {
            open.publish();
        }
        Ok(held)
    }

    /// Starts ingest `meta.reference` in a held slot, in memory.
    pub fn create(&self, held: &mut Held, meta: Meta) {
        let key = key(&meta.view, &meta.namespace, &meta.reference);
        let open = Open {
            updated: meta.started,
            meta,
            key,
            dir: self.dir.clone(),
            bytes: Bytes::Memory(Vec::new()),
            hasher: Algorithm::Sha256.hasher(),
            offset: 0,
            reserved: 0,
            life: self.life.clone(),
            live: self.live.clone(),
        };
        open.publish();
        **held = Some(open);
    }

    /// An ingest found in files: its hash state rebuilt from its bytes.
    fn load(&self, key: &str) -> Result<Option<Open>> {
        let meta_path = self.dir.join(format!("{key}.meta"));
        let meta = match read_meta(&meta_path) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(ingest = %key, error = %e, "unreadable ingest removed");
                let _ = fs::remove_file(&meta_path);
                let _ = fs::remove_file(self.dir.join(format!("{key}.data")));
                return Ok(None);
            }
        };
        let path = self.dir.join(format!("{key}.data"));
        // Read to its end: the cursor is where the next bytes go.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut hasher = Algorithm::Sha256.hasher();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        self.life.reserve(offset)?;
        Ok(Some(Open {
            updated: modified_ms(&path).unwrap_or(meta.started),
            meta,
            key: key.to_owned(),
            dir: self.dir.clone(),
            bytes: Bytes::File(file),
            hasher,
            offset,
            reserved: offset,
            life: self.life.clone(),
            live: self.live.clone(),
        }))
    }

    /// Every ingest of `view` (and `namespace`, if given): those streams hold now and those in
    /// files (blocking).
    pub fn list(&self, view: &str, namespace: Option<&str>) -> Result<Vec<State>> {
        let mut found: HashMap<String, State> = HashMap::new();
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("listing {}", self.dir.display()), e))?;
        for e in entries.flatten() {
            let path = e.path();
            let Some(key) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".meta"))
                .map(str::to_owned)
            else {
                continue;
            };
            let Ok(Some(meta)) = read_meta(&path) else {
                continue;
            };
            let data = self.dir.join(format!("{key}.data"));
            let (offset, updated) = match fs::metadata(&data) {
                Ok(m) => (m.len(), modified_ms(&data).unwrap_or(meta.started)),
                Err(_) => (0, meta.started),
            };
            found.insert(
                key,
                State {
                    meta,
                    offset,
                    updated,
                },
            );
        }
        if let Ok(l) = self.live.lock() {
            for (k, s) in l.iter() {
                found.insert(k.clone(), s.clone());
            }
        }
        let mut out: Vec<State> = found
            .into_values()
            .filter(|s| s.meta.view == view && namespace.is_none_or(|n| n == s.meta.namespace))
            .collect();
        out.sort_by(|a, b| a.meta.reference.cmp(&b.meta.reference));
        Ok(out)
    }

    /// Removes ingest `reference` (blocking). `NotFound` if there is none; `Unavailable` while
    /// a stream writes it.
    pub fn abort(&self, view: &str, namespace: &str, reference: &str) -> Result<()> {
        let k = key(view, namespace, reference);
        if self.remove_files(&k, reference)? {
            Ok(())
        } else {
            Err(Error::not_found(format!("no ingest {reference}")))
        }
    }

    /// Removes an ingest's files under its lock, without reading them (an abort or an expiry
    /// must work on a full store and cost nothing per byte). `false` if it had none.
    fn remove_files(&self, k: &str, reference: &str) -> Result<bool> {
        let _held = self.lock_key(k.to_owned(), reference, false)?;
        self.remove_locked(k)
    }

    /// Removes an ingest's files; the caller holds its lock.
    fn remove_locked(&self, k: &str) -> Result<bool> {
        let meta = self.dir.join(format!("{k}.meta"));
        let data = self.dir.join(format!("{k}.data"));
        let had = meta.exists() || data.exists();
        for p in [meta, data] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", p.display()), e)),
            }
        }
        Ok(had)
    }

    /// Removes ingests untouched for `idle_ms` (blocking). Returns how many. A file's time is
    /// the wall clock's, so an ingest must look idle by both the wall clock and the cache clock:
    /// a wall clock stepped back or forward cannot make one expire early.
    pub fn expire(&self, idle_ms: Millis) -> usize {
        let now = self.clock.now_ms();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as Millis);
        let mut n = 0;
        for s in self.list_all() {
            if now.saturating_sub(s.updated) <= idle_ms || wall.saturating_sub(s.updated) <= idle_ms
            {
                continue;
            }
            // Only when no stream holds it, and judged again under the lock (a stream may have
            // written to it since the listing).
            // (A `.data` without `.meta` is listed by its key.)
            let k = if s.meta.view.is_empty() && s.meta.started == 0 {
                s.meta.reference.clone()
            } else {
                key(&s.meta.view, &s.meta.namespace, &s.meta.reference)
            };
            let Ok(_held) = self.lock_key(k.clone(), &s.meta.reference, false) else {
                continue;
            };
            let data = self.dir.join(format!("{k}.data"));
            let updated = modified_ms(&data).unwrap_or(s.meta.started);
            if now.saturating_sub(updated) <= idle_ms || wall.saturating_sub(updated) <= idle_ms {
                continue;
            }
            if let Ok(true) = self.remove_locked(&k) {
                n += 1;
            }
        }
        n
    }

    fn list_all(&self) -> Vec<State> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            // Bytes whose `.meta` was never written (a spill cut short): nothing can resume
            // them; they go once they are as old as an idle ingest.
            if path.extension().is_some_and(|x| x == "data")
                && !path.with_extension("meta").exists()
            {
                if let Some(key) = path.file_stem().and_then(|k| k.to_str()) {
                    out.push(State {
                        updated: modified_ms(&path).unwrap_or(0),
                        offset: 0,
                        meta: Meta {
                            view: String::new(),
                            namespace: String::new(),
                            reference: key.to_owned(),
                            started: 0,
                            total: 0,
                            expected: None,
                        },
                    });
                }
                continue;
            }
            if path.extension().is_some_and(|x| x == "meta") {
                if let Ok(Some(meta)) = read_meta(&path) {
                    let data = path.with_extension("data");
                    out.push(State {
                        updated: modified_ms(&data).unwrap_or(meta.started),
                        offset: 0,
                        meta,
                    });
                }
            }
        }
        out
    }
}

fn write_meta(path: &Path, meta: &Meta) -> Result<()> {
    let body = serde_json::to_vec(meta).map_err(|e| Error::internal(e.to_string()))?;
    // Written in place: a torn file after a crash is unreadable and the ingest is dropped
    // (its client starts again), which costs less than a rename per ingest.
    fs::write(path, body).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn read_meta(path: &Path) -> Result<Option<Meta>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::internal(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

fn modified_ms(path: &Path) -> Option<Millis> {
    let t = fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::lifecycle::gc::Policy;
    use crate::lifecycle::index::Index;
    use crate::store::disk::{DiskStore, Durability};

    const DAY: Millis = 24 * 3600 * 1000;

    fn ingests(dir: &Path, clock: Arc<ManualClock>) -> Ingests {
        let store = Arc::new(
            DiskStore::open(
                &dir.join("store"),
                Durability::Group,
                crate::store::disk::NO_DIRECT_IO,
            )
            .unwrap(),
        );
        let (index, _) = Index::open(&dir.join("index"), false).unwrap();
        let life = Arc::new(Lifecycle::new(
            Arc::new(index),
            store,
            clock.clone(),
            Policy::default(),
            None,
        ));
        Ingests::open(dir.join("ingest"), clock, life).unwrap()
    }

    fn meta(reference: &str, now: Millis) -> Meta {
        Meta {
            view: "v".into(),
            namespace: "ns".into(),
            reference: reference.into(),
            started: now,
            total: 0,
            expected: None,
        }
    }

    #[test]
    fn small_ingests_stay_in_memory_until_their_stream_ends_then_resume_from_files() {
        let tmp = tempfile::tempdir().unwrap();
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let clock = ManualClock::new(now);
        let i = ingests(tmp.path(), clock.clone());
        let mut held = i.lock("v", "ns", "r").unwrap();
        i.create(&mut held, meta("r", now));
        held.as_mut().unwrap().append(b"hello ", now).unwrap();
        // In memory: no file yet, but listed while its stream holds it.
        assert_eq!(
            std::fs::read_dir(tmp.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(i.list("v", Some("ns")).unwrap()[0].offset, 6);
        // A second stream on the same ref is refused.
        assert_eq!(
            i.lock("v", "ns", "r").err().map(|e| e.kind),
            Some(ErrorKind::Unavailable)
        );
        held.release().unwrap();
        // Another process (a restart) finds it in its files, hash state and all.
        let again = ingests(tmp.path(), clock);
        let mut held = again.lock("v", "ns", "r").unwrap();
        let open = held.as_mut().unwrap();
        assert_eq!(open.offset(), 6);
        open.append(b"world", now).unwrap();
        assert_eq!(open.digest(), Digest::sha256_of(b"hello world"));
        // Past 1 MiB it goes to its files while the stream lasts.
        open.append(&vec![7u8; 2 << 20], now).unwrap();
        assert!(matches!(open.payload(), Payload::File(_)));
    }

    #[test]
    fn idle_ingests_expire_by_both_clocks_and_stray_bytes_go_too() {
        let tmp = tempfile::tempdir().unwrap();
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let clock = ManualClock::new(now);
        let i = ingests(tmp.path(), clock.clone());
        let mut held = i.lock("v", "ns", "idle").unwrap();
        i.create(&mut held, meta("idle", now));
        held.as_mut().unwrap().append(b"x", now).unwrap();
        held.release().unwrap();
        // A `.data` a cut spill left without its `.meta`.
        std::fs::write(tmp.path().join("ingest").join("f00d.data"), b"stray").unwrap();
        // The cache clock a day and more on, the wall clock (the files' times) not: kept.
        clock.set(now + 2 * DAY);
        assert_eq!(i.expire(DAY), 0);
        assert_eq!(i.list("v", None).unwrap().len(), 1);
        // Both clocks past a day (the files' times set back): removed, the stray bytes too.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        for e in std::fs::read_dir(tmp.path().join("ingest")).unwrap() {
            let f = std::fs::File::options()
                .write(true)
                .open(e.unwrap().path())
                .unwrap();
            f.set_modified(old).unwrap();
        }
        assert_eq!(i.expire(DAY), 2);
        assert!(i.list("v", None).unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(tmp.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn abort_removes_without_reading_and_unknown_refs_are_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let i = ingests(tmp.path(), ManualClock::new(now));
        let mut held = i.lock("v", "ns", "a").unwrap();
        i.create(&mut held, meta("a", now));
        held.as_mut().unwrap().append(b"abc", now).unwrap();
        // Held by a stream: an abort must wait its turn.
        assert_eq!(
            i.abort("v", "ns", "a").err().map(|e| e.kind),
            Some(ErrorKind::Unavailable)
        );
        held.release().unwrap();
        i.abort("v", "ns", "a").unwrap();
        assert!(i.abort("v", "ns", "a").unwrap_err().is_not_found());
        assert!(i.list("v", None).unwrap().is_empty());
    }
}
