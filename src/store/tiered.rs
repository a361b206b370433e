//! The tiered store: a size-capped local disk tier in front of S3. S3 holds every blob and is
//! the only place a write counts as done (it is durable there before the commit returns); the
//! disk tier is a cache of recently used blobs with its own least-recently-used bound, and
//! evicting from it never touches S3. Owns the fast tier's directory (the disk store's layout).
//!
//! A read that misses the disk tier fetches the blob from S3 into it once, however many readers
//! miss at the same time (single flight: the first one fetches, the rest wait for it), and is
//! then served from disk. A blob pushed through this replica goes into the disk tier as it is
//! written, so pulling it back costs no S3 request.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

use crate::digest::{Algorithm, Digest};
use crate::error::{Error, ErrorKind, Result};

use super::disk::DiskStore;
use super::s3::S3Store;
use super::{BlobRead, BlobStore, BlobWriter, Expect};

#[derive(Default)]
pub struct TierStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evicted: AtomicU64,
}

/// What the fast tier holds, least recently used first out.
struct Held {
    lru: lru::LruCache<Digest, u64>,
    bytes: u64,
}

/// One fetch from S3 in progress; later readers of the same digest wait on it.
#[derive(Default)]
struct Fill {
    /// The leader's outcome: kept in the fast tier or not, or the error its fetch met (the
    /// waiters answer with it too rather than fetch the same bytes from S3 unverified).
    done: Mutex<Option<std::result::Result<bool, Error>>>,
    cv: Condvar,
}

pub struct TieredStore {
    inner: Arc<Inner>,
}

struct Inner {
    fast: DiskStore,
    slow: S3Store,
    max: u64,
    held: Mutex<Held>,
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    pub stats: TierStats,
}

impl TieredStore {
    /// `wipe`: the fast tier's files may be torn (an unclean stop; the tier is never fsynced),
    /// so it starts empty.
    pub fn new(fast: DiskStore, slow: S3Store, max: u64, wipe: bool) -> Result<TieredStore> {
        let mut held = Held {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
        };
        let mut found = Vec::new();
        fast.walk(&mut |d, size| found.push((d, size)))?;
        for (d, size) in found {
            if wipe {
                fast.delete(&d)?;
            } else {
                held.lru.put(d, size);
                held.bytes += size;
            }
        }
        let store = TieredStore {
            inner: Arc::new(Inner {
                fast,
                slow,
                max,
                held: Mutex::new(held),
                fills: Mutex::new(HashMap::new()),
                stats: TierStats::default(),
            }),
        };
        store.inner.evict()?;
        Ok(store)
    }

    pub fn stats(&self) -> &TierStats {
        &self.inner.stats
    }

    /// Bytes and blobs the fast tier holds.
    pub fn held(&self) -> (u64, usize) {
        let h = self.inner.lock();
        (h.bytes, h.lru.len())
    }

    pub fn slow(&self) -> &S3Store {
        &self.inner.slow
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, d: Digest, size: u64) -> Result<()> {
        {
            let mut h = self.lock();
            if h.lru.put(d, size).is_none() {
                h.bytes += size;
            }
        }
        self.evict()
    }

    /// Drops least recently used blobs from the fast tier until it fits (S3 keeps them).
    fn evict(&self) -> Result<()> {
        loop {
            let victim = {
                let mut h = self.lock();
                if h.bytes <= self.max {
                    return Ok(());
                }
                match h.lru.pop_lru() {
                    Some((d, size)) => {
                        h.bytes -= size;
                        d
                    }
                    None => return Ok(()),
                }
            };
            match self.fast.delete(&victim) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn forget(&self, d: &Digest) {
        let mut h = self.lock();
        if let Some(size) = h.lru.pop(d) {
            h.bytes -= size;
        }
    }

    /// The fast tier's copy of `d`, if it has one (and marks it used).
    fn fast_open(&self, d: &Digest, start: u64) -> Result<Option<Box<dyn BlobRead>>> {
        if self.lock().lru.get(d).is_none() {
            return Ok(None);
        }
        match self.fast.open_at(d, start) {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.is_not_found() => {
                self.forget(d);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Copies `d` from S3 into the fast tier, verified like any upload. `Ok(false)`: it could
    /// not be kept there (the tier is too small or its disk failed); the reader goes to S3.
    fn fetch(&self, d: &Digest) -> Result<bool> {
        let mut src = self.slow.open(d)?;
        let size = src.size();
        if size > self.max {
            return Ok(false);
        }
        let mut w = match self.fast.begin(d.algorithm()) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "fast tier cannot take a blob; serving it from S3");
                return Ok(false);
            }
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(|e| {
                Error::new(ErrorKind::Unavailable, format!("reading {d} from S3: {e}"))
            })?;
            if n == 0 {
                break;
            }
            if let Err(e) = w.write_owned(Bytes::copy_from_slice(&buf[..n])) {
                tracing::warn!(digest = %d, error = %e, "fast tier write failed; serving from S3");
                return Ok(false);
            }
        }
        match w.commit(Expect {
            digest: *d,
            size: Some(size),
        }) {
            Ok(_) => {}
            Err(e) if e.kind == ErrorKind::DigestMismatch || e.kind == ErrorKind::SizeMismatch => {
                return Err(Error::internal(format!(
                    "S3 holds {d} with bytes that do not match its digest: {}",
                    e.message
                )))
            }
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "fast tier commit failed; serving from S3");
                return Ok(false);
            }
        }
        self.insert(*d, size)?;
        Ok(true)
    }

    fn open_at(&self, d: &Digest, start: u64) -> Result<Box<dyn BlobRead>> {
        if let Some(r) = self.fast_open(d, start)? {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(r);
        }
        let (fill, leader) = {
            let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
            match fills.get(d) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Fill::default());
                    fills.insert(*d, f.clone());
                    (f, true)
                }
            }
        };
        let kept = if leader {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            let r = self.fetch(d);
            {
                let mut done = fill.done.lock().unwrap_or_else(|p| p.into_inner());
                *done = Some(r.clone());
                fill.cv.notify_all();
            }
            self.fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(d);
            r?
        } else {
            let mut done = fill.done.lock().unwrap_or_else(|p| p.into_inner());
            while done.is_none() {
                done = fill.cv.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            match done.clone() {
                Some(Err(e)) if e.kind == ErrorKind::Internal => return Err(e),
                Some(r) => r.unwrap_or(false),
                None => false,
            }
        };
        if kept {
            if let Some(r) = self.fast_open(d, start)? {
                if !leader {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(r);
            }
        }
        self.slow.open_at(d, start)
    }
}

impl BlobStore for TieredStore {
    fn begin(&self, alg: Algorithm) -> Result<Box<dyn BlobWriter>> {
        let fast = match self.inner.fast.begin(alg) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "fast tier cannot take an upload; it goes to S3 only");
                None
            }
        };
        Ok(Box::new(TieredWriter {
            inner: self.inner.clone(),
            slow: self.inner.slow.begin(alg)?,
            fast,
        }))
    }

    fn open(&self, d: &Digest) -> Result<Box<dyn BlobRead>> {
        self.inner.open_at(d, 0)
    }

    fn open_at(&self, d: &Digest, start: u64) -> Result<Box<dyn BlobRead>> {
        self.inner.open_at(d, start)
    }

    fn delete(&self, d: &Digest) -> Result<()> {
        self.inner.forget(d);
        match self.inner.fast.delete(d) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        self.inner.slow.delete(d)
    }

    fn walk(&self, f: &mut dyn FnMut(Digest, u64)) -> Result<()> {
        self.inner.slow.walk(f)
    }

    fn sync(&self) -> Result<()> {
        // S3 holds every commit already; the disk tier is a cache and is never fsynced.
        self.inner.fast.forget_unsynced();
        Ok(())
    }

    fn quarantine(&self, d: &Digest) -> Result<()> {
        self.inner.forget(d);
        let _ = self.inner.fast.delete(d);
        self.inner.slow.quarantine(d)
    }

    fn durable_on_commit(&self) -> bool {
        true
    }
}

/// Writes go to S3 (the commit point) and, as a cache, to the fast tier beside it.
struct TieredWriter {
    inner: Arc<Inner>,
    slow: Box<dyn BlobWriter>,
    /// Dropped at its first failure: the fast tier is only a cache.
    fast: Option<Box<dyn BlobWriter>>,
}

impl BlobWriter for TieredWriter {
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.slow.write(buf)?;
        if let Some(f) = &mut self.fast {
            if f.write(buf).is_err() {
                self.fast = None;
            }
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.slow.written()
    }

    fn named(&mut self, digest: &Digest) {
        self.slow.named(digest)
    }

    fn park(&mut self) -> Result<()> {
        if let Some(f) = &mut self.fast {
            if f.park().is_err() {
                self.fast = None;
            }
        }
        self.slow.park()
    }

    fn commit(self: Box<Self>, expect: Expect) -> Result<u64> {
        let TieredWriter { inner, slow, fast } = *self;
        let size = slow.commit(expect)?;
        if let Some(f) = fast {
            if size <= inner.max {
                match f.commit(expect) {
                    Ok(_) => inner.insert(expect.digest, size)?,
                    Err(e) => {
                        tracing::warn!(digest = %expect.digest, error = %e, "fast tier kept no copy")
                    }
                }
            }
        }
        Ok(size)
    }
}
