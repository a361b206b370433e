//! Ingests: the content API's uploads. Unlike an OCI upload session (in memory, named by
//! hoard), an ingest is named by the client (containerd's `ref`) and must be resumable by
//! offset after a cut stream *and* after a hoard restart, so its bytes and facts live in files:
//!
//! ```text
//! ingest/<sha256 of view, namespace and ref>/meta   JSON: view, namespace, ref, started, total, expected
//! ingest/<…>/data                                   the bytes received so far
//! ```
//! One stream at a time holds an ingest (`lock`); a second gets `Unavailable`, as containerd's
//! own store answers. The bytes are hashed as they arrive; after a restart the hash state is
//! rebuilt by reading `data` once. A commit hands `data` to the blob store (a disk store renames
//! it into place: no second copy) and is then an ordinary verified blob. Space is reserved
//! against the size bound as bytes arrive, so a full store refuses an ingest early.

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

/// What an ingest is, as `meta` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub view: String,
    pub namespace: String,
    pub reference: String,
    /// Cache time of the first byte (or of the stream that began it).
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

/// An ingest held by one stream: its file, hash state and reservation.
pub struct Open {
    pub meta: Meta,
    dir: PathBuf,
    file: File,
    hasher: Hasher,
    offset: u64,
    pub updated: Millis,
    reserved: u64,
    life: Arc<Lifecycle>,
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

    /// Appends `data` (blocking).
    pub fn append(&mut self, data: &[u8], now: Millis) -> Result<()> {
        let upto = self.offset + data.len() as u64;
        if upto > self.reserved {
            let want = (upto - self.reserved).max(RESERVE_STEP);
            self.life.reserve(want)?;
            self.reserved += want;
        }
        self.file
            .write_all(data)
            .map_err(|e| Error::io(format!("writing {}", self.dir.display()), e))?;
        self.hasher.update(data);
        self.offset = upto;
        self.updated = now;
        Ok(())
    }

    /// Drops every byte: the ingest starts again at offset 0 (blocking).
    pub fn truncate(&mut self, now: Millis) -> Result<()> {
        self.file
            .set_len(0)
            .map_err(|e| Error::io(format!("truncating {}", self.dir.display()), e))?;
        use std::io::Seek;
        self.file
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| Error::io(format!("truncating {}", self.dir.display()), e))?;
        self.hasher = Algorithm::Sha256.hasher();
        self.offset = 0;
        self.updated = now;
        Ok(())
    }

    /// Records announced facts (`total`, `expected`) so a resumed stream knows them.
    pub fn save_meta(&self) -> Result<()> {
        write_meta(&self.dir, &self.meta)
    }

    pub fn data_path(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory is removed (after a commit took `data`, or an abort).
    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.life.release(self.reserved);
    }
}

/// A stream's hold on one ingest; `None` inside until the ingest exists.
pub type Held = tokio::sync::OwnedMutexGuard<Option<Open>>;

pub struct Ingests {
    dir: PathBuf,
    clock: SharedClock,
    life: Arc<Lifecycle>,
    /// One lock per ingest key that a stream holds or held.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Open>>>>>,
}

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
            locks: Mutex::new(HashMap::new()),
        })
    }

    fn locks(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Option<Open>>>>> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the ingest `reference` for one stream, loading it from disk if it exists there
    /// (blocking work: call from the blocking pool). `Unavailable` while another stream holds it.
    pub fn lock(&self, view: &str, namespace: &str, reference: &str) -> Result<Held> {
        let k = key(view, namespace, reference);
        let slot = self.locks().entry(k.clone()).or_default().clone();
        let mut held = slot.try_lock_owned().map_err(|_| {
            Error::new(
                ErrorKind::Unavailable,
                format!("ref {reference} locked: another stream is writing it"),
            )
        })?;
        if held.is_none() {
            *held = self.load(&self.dir.join(&k))?;
        }
        Ok(held)
    }

    /// Starts ingest `reference` in a held slot (blocking).
    pub fn create(&self, held: &mut Held, meta: Meta) -> Result<()> {
        let dir = self
            .dir
            .join(key(&meta.view, &meta.namespace, &meta.reference));
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        write_meta(&dir, &meta)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join("data"))
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        **held = Some(Open {
            updated: meta.started,
            meta,
            dir,
            file,
            hasher: Algorithm::Sha256.hasher(),
            offset: 0,
            reserved: 0,
            life: self.life.clone(),
        });
        Ok(())
    }

    /// An ingest found on disk: its hash state rebuilt from its bytes.
    fn load(&self, dir: &Path) -> Result<Option<Open>> {
        let meta = match read_meta(dir) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "unreadable ingest removed");
                let _ = fs::remove_dir_all(dir);
                return Ok(None);
            }
        };
        let path = dir.join("data");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
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
            dir: dir.to_owned(),
            file,
            hasher,
            offset,
            reserved: offset,
            life: self.life.clone(),
        }))
    }

    /// Every ingest of `view` (and `namespace`, if given), held or not (blocking).
    pub fn list(&self, view: &str, namespace: Option<&str>) -> Result<Vec<State>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => return Err(Error::io(format!("listing {}", self.dir.display()), e)),
        };
        for e in entries.flatten() {
            let dir = e.path();
            let Ok(Some(meta)) = read_meta(&dir) else {
                continue;
            };
            if meta.view != view || namespace.is_some_and(|n| n != meta.namespace) {
                continue;
            }
            let data = dir.join("data");
            let (offset, updated) = match fs::metadata(&data) {
                Ok(m) => (m.len(), modified_ms(&data).unwrap_or(meta.started)),
                Err(_) => (0, meta.started),
            };
            out.push(State {
                meta,
                offset,
                updated,
            });
        }
        out.sort_by(|a, b| a.meta.reference.cmp(&b.meta.reference));
        Ok(out)
    }

    /// Removes ingest `reference` (blocking). `NotFound` if there is none; `Unavailable` while
    /// a stream writes it.
    pub fn abort(&self, view: &str, namespace: &str, reference: &str) -> Result<()> {
        let mut held = self.lock(view, namespace, reference)?;
        match held.take() {
            Some(open) => {
                open.remove();
                Ok(())
            }
            None => Err(Error::not_found(format!("no ingest {reference}"))),
        }
    }

    /// Forgets lock slots nobody holds (their ingests stay on disk).
    pub fn trim(&self) {
        self.locks().retain(|_, slot| match slot.try_lock() {
            Ok(g) => g.is_some(),
            Err(_) => true,
        });
    }

    /// Removes ingests untouched for `idle_ms` of cache time (blocking). Returns how many.
    pub fn expire(&self, idle_ms: Millis) -> usize {
        let now = self.clock.now_ms();
        let mut n = 0;
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        for e in entries.flatten() {
            let dir = e.path();
            let Ok(Some(meta)) = read_meta(&dir) else {
                continue;
            };
            let updated = modified_ms(&dir.join("data")).unwrap_or(meta.started);
            if now.saturating_sub(updated) <= idle_ms {
                continue;
            }
            // Only when no stream holds it.
            if let Ok(mut held) = self.lock(&meta.view, &meta.namespace, &meta.reference) {
                if let Some(open) = held.take() {
                    open.remove();
                    n += 1;
                }
            }
        }
        self.trim();
        n
    }
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let body = serde_json::to_vec(meta).map_err(|e| Error::internal(e.to_string()))?;
    let tmp = dir.join("meta.new");
    fs::write(&tmp, body).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, dir.join("meta"))
        .map_err(|e| Error::io(format!("writing {}", dir.display()), e))
}

fn read_meta(dir: &Path) -> Result<Option<Meta>> {
    match fs::read(dir.join("meta")) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::internal(format!("{}: {e}", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", dir.display()), e)),
    }
}

fn modified_ms(path: &Path) -> Option<Millis> {
    let t = fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as Millis)
}
