//! The registry service: blobs as seen by repositories, uploads, manifests, tags and referrers,
//! over the blob store and the index. Protocol-free: the OCI front end maps its results to HTTP.

pub mod manifests;
pub mod refs;
pub mod uploads;

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;

use crate::clock::SharedClock;
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::gc::Lifecycle;
use crate::lifecycle::index::{Index, Op};
use crate::lifecycle::shared::Shared;
use crate::names::RepoName;
use crate::store::{BlobRead, BlobStore, BlobWriter, Expect};

pub use uploads::{blocking, pump, Uploads};

pub struct Registry {
    pub store: Arc<dyn BlobStore>,
    pub index: Arc<Index>,
    /// Cache time (the lifecycle's clock): every stamp the index keeps comes from it.
    pub clock: SharedClock,
    pub uploads: Uploads,
    pub life: Arc<Lifecycle>,
    /// With group commit: the longest an acknowledged write may wait for its sync point before
    /// new writes wait for the disk instead (`None` when every write is synced before its answer).
    pub unsynced_bound: Option<std::time::Duration>,
    /// One permit per blob transfer in progress (a pull's body, an upload's body).
    transfers: Arc<tokio::sync::Semaphore>,
    max_transfers: usize,
    /// A request body silent this long is cut off.
    pub body_timeout: std::time::Duration,
    /// Bytes of manifest bodies being received (they are gathered in memory), in KiB permits.
    manifest_bytes: Arc<tokio::sync::Semaphore>,
    /// On a bucket shared by several replicas: the bucket is the truth and the index a cache of
    /// it; misses read through, writes go to the bucket before the cache.
    pub shared: Option<Arc<Shared>>,
    /// File refs' manifests, parsed: manifest digest → the file (see `refs`).
    file_refs: std::sync::Mutex<lru::LruCache<Digest, refs::FileRef>>,
}

/// How long a transfer waits for a slot before it is answered 503.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Manifest bodies in flight at once, in bytes: 16 of the largest allowed.
const MANIFEST_BUDGET_KIB: usize = 16 * (manifests::MAX_MANIFEST >> 10);

/// Held while a blob transfer runs; dropping it lets the next one in.
pub type TransferPermit = tokio::sync::OwnedSemaphorePermit;

/// Defaults for a registry built without a configuration (unit tests, tools).
const DEFAULT_MAX_TRANSFERS: usize = 1024;
const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a blob read starts and how much it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub len: u64,
}

impl Registry {
    pub fn new(life: Arc<Lifecycle>) -> Registry {
        let shared = life.shared.get().cloned();
        Registry {
            store: life.store.clone(),
            index: life.index.clone(),
            uploads: Uploads::new(life.clock.clone()),
            clock: life.clock.clone(),
            life,
            unsynced_bound: None,
            transfers: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_TRANSFERS)),
            max_transfers: DEFAULT_MAX_TRANSFERS,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            manifest_bytes: Arc::new(tokio::sync::Semaphore::new(MANIFEST_BUDGET_KIB)),
            shared,
            // About a KiB an entry with its annotations: 20,000 hot refs (a few dozen builds'
            // GOCACHEPROG entries) in ~20 MiB; a miss reads the manifest again.
            file_refs: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(20_000).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    /// Room for a manifest body of `bytes` being received; past the budget, a wait of up to
    /// `SLOT_WAIT`, then `Unavailable` (503).
    pub async fn manifest_budget(&self, bytes: usize) -> Result<TransferPermit> {
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let room = self.manifest_bytes.clone().acquire_many_owned(kib);
        match tokio::time::timeout(SLOT_WAIT, room).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Error::new(
                ErrorKind::Unavailable,
                "too many manifest bodies are being received; retry shortly",
            )),
        }
    }

    /// Sets how many blob transfers may run at once.
    pub fn with_max_transfers(mut self, n: usize) -> Registry {
        self.transfers = Arc::new(tokio::sync::Semaphore::new(n));
        self.max_transfers = n;
        self
    }

    /// A permit for one blob transfer. While `max_transfers` are running a request waits up to
    /// `SLOT_WAIT` for one to end (a request waiting costs a small future, no buffer), then gets
    /// `Unavailable` (503 + Retry-After). BuildKit retries a 5xx only three times, backing off 1,
    /// 2 and 4 s, so the wait here stretches what a busy moment may take before a build fails.
    pub async fn transfer(&self) -> Result<TransferPermit> {
        let slot = self.transfers.clone().acquire_owned();
        match tokio::time::timeout(SLOT_WAIT, slot).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{} blob transfers are in progress (max_transfers); retry shortly",
                    self.max_transfers
                ),
            )),
        }
    }

    /// Blob transfers running now.
    pub fn transfers_in_progress(&self) -> usize {
        self.max_transfers - self.transfers.available_permits()
    }

    /// Holds an acknowledgement back while the group commit is too far behind (see
    /// [`Index::wait_durable_within`]); immediate whenever the disk keeps up.
    async fn settle(&self) -> Result<()> {
        match self.unsynced_bound {
            Some(bound) => self.index.wait_durable_within(bound).await,
            None => Ok(()),
        }
    }

    /// Size of `d` as `repo` sees it: pushed or mounted there, or one of its manifests. With
    /// `claim`, stamps the blob as about to be referenced (orphan grace restarts). On a shared
    /// bucket a miss reads through: another replica may have pushed it a moment ago.
    pub async fn stat_blob(&self, repo: &RepoName, d: &Digest, claim: bool) -> Result<u64> {
        if let (true, Some(s)) = (claim, &self.shared) {
            // A HEAD asks "may I reference this?": not while a collection is removing it (the
            // client uploads it again instead). Reads serve whatever is still there.
            if s.still_doomed(d).await? {
                return Err(blob_not_in(repo, d));
            }
        }
        match self.stat_cached(repo, d, claim) {
            Err(e) if e.is_not_found() => {}
            r => return r,
        }
        let Some(s) = &self.shared else {
            return Err(blob_not_in(repo, d));
        };
        match s.find_link(repo.as_str(), *d).await? {
            Some(size) => {
                if claim {
                    let state = self.index.read();
                    self.index.touch_blob(&state, d, self.clock.now_ms());
                }
                Ok(size)
            }
            None => Err(blob_not_in(repo, d)),
        }
    }

    /// `stat_blob` from the index alone.
    fn stat_cached(&self, repo: &RepoName, d: &Digest, claim: bool) -> Result<u64> {
        let state = self.index.read();
        let visible = state
            .repos
            .get(repo.as_str())
            .is_some_and(|r| r.blobs.contains(d) || r.manifests.contains_key(d));
        match state.blobs.get(d) {
            Some(meta) if visible => {
                if claim {
                    self.index.touch_blob(&state, d, self.clock.now_ms());
                }
                Ok(meta.size)
            }
            _ => Err(blob_not_in(repo, d)),
        }
    }

    /// Opens `d` for reading from `span.start`.
    pub async fn open_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        start: u64,
    ) -> Result<Box<dyn BlobRead>> {
        self.stat_blob(repo, d, false).await?;
        let store = self.store.clone();
        let d = *d;
        let r = blocking(move || store.open_at(&d, start)).await;
        if let (Err(e), Some(s)) = (&r, &self.shared) {
            if e.is_not_found() {
                // Collected through another replica: the cache learns it now.
                s.forget(&[], &[d])?;
            }
        }
        r
    }

    /// Reads a whole small blob (manifests, configs) into memory.
    pub async fn read_small(&self, d: &Digest, max: u64) -> Result<Bytes> {
        let store = self.store.clone();
        let d = *d;
        blocking(move || {
            let r = store.open(&d)?;
            let mut buf = Vec::with_capacity(r.size().min(max) as usize);
            r.take(max)
                .read_to_end(&mut buf)
                .map_err(|e| Error::io(format!("reading {d}"), e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// Removes `d` from `repo`'s view; the bytes stay while anything else still uses them.
    /// Refused while a manifest of `repo` lists it (its tags would point at a layer that 404s)
    /// or while it is a manifest of `repo` (deleted through `/manifests/` instead).
    pub async fn delete_blob(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        let Some(s) = &self.shared else {
            return self
                .index
                .commit_if(|state| plan_delete_blob(state, repo, d));
        };
        // Judged on the repository as the bucket has it now.
        s.refresh_repo(repo.as_str()).await?;
        let ops = plan_delete_blob(&self.index.read(), repo, d)?;
        let size = self.index.blob_size(d).unwrap_or(0);
        s.delete_link(repo.as_str(), *d).await?;
        self.index.commit(ops)?;
        // A manifest pushed meanwhile may list it: then the link goes back and the delete is
        // refused, as it would have been a moment later.
        s.refresh_repo(repo.as_str()).await?;
        let holder = {
            let state = self.index.read();
            state.repos.get(repo.as_str()).and_then(|r| r.holder_of(d))
        };
        if let Some(holder) = holder {
            s.put_link(repo.as_str(), *d, size).await?;
            s.refresh_repo(repo.as_str()).await?;
            return Err(Error::in_use(format!(
                "blob {d} is still used by {holder} in repository {repo}; delete that manifest \
                 first"
            )));
        }
        Ok(())
    }

    /// Cross-repository mount: links `d` into `repo` if `from` has it (or, with no `from`, if any
    /// repository has it). `Ok(false)` means the client must upload it.
    pub async fn mount(
        &self,
        repo: &RepoName,
        d: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        let Some(s) = &self.shared else {
            return self.mount_cached(repo, d, from);
        };
        if s.still_doomed(d).await? {
            return Ok(false);
        }
        let size = match from {
            Some(f) => match self.stat_blob(f, d, false).await {
                Ok(n) => Some(n),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            },
            None => match self.index.blob_size(d) {
                Some(n) => Some(n),
                None => s.blob_exists(*d).await?,
            },
        };
        let Some(size) = size else {
            return Ok(false);
        };
        s.put_link(repo.as_str(), *d, size).await?;
        let now = self.clock.now_ms();
        self.index.commit_if(|state| {
            let mut ops = Vec::new();
            if state.blobs.contains_key(d) {
                self.index.touch_blob(state, d, now);
            } else {
                ops.push(Op::BlobAdded {
                    digest: *d,
                    size,
                    at: now,
                });
            }
            ops.extend(link_ops(state, repo, *d));
            Ok(ops)
        })?;
        Ok(true)
    }

    fn mount_cached(&self, repo: &RepoName, d: &Digest, from: Option<&RepoName>) -> Result<bool> {
        let mut mounted = false;
        let now = self.clock.now_ms();
        self.index.commit_if(|state| {
            if !state.blobs.contains_key(d) {
                return Ok(vec![]);
            }
            let source_has = match from {
                Some(from) => state
                    .repos
                    .get(from.as_str())
                    .is_some_and(|r| r.blobs.contains(d) || r.manifests.contains_key(d)),
                None => true,
            };
            if !source_has {
                return Ok(vec![]);
            }
            mounted = true;
            self.index.touch_blob(state, d, now);
            Ok(link_ops(state, repo, *d))
        })?;
        Ok(mounted)
    }

    /// Commits an upload's bytes as blob `expect.digest` and makes it visible in `repo`.
    pub async fn commit_upload(
        &self,
        repo: &RepoName,
        writer: Box<dyn BlobWriter>,
        expect: Expect,
    ) -> Result<u64> {
        self.commit_with(repo, expect, move || writer.commit(expect))
            .await
    }

    /// Commits bytes a client streamed into the file at `path` (hashed as they came: `hashed`,
    /// `size`) as blob `expect.digest`, visible in `repo`: the content API's ingests.
    pub async fn commit_file(
        &self,
        repo: &RepoName,
        path: std::path::PathBuf,
        hashed: Digest,
        size: u64,
        expect: Expect,
    ) -> Result<u64> {
        let store = self.store.clone();
        self.commit_with(repo, expect, move || {
            store.adopt(&path, hashed, size, expect)
        })
        .await
    }

    /// The commit of an upload: `commit` makes the bytes the blob (blocking), then it is
    /// recorded and linked into `repo`.
    async fn commit_with(
        &self,
        repo: &RepoName,
        expect: Expect,
        commit: impl FnOnce() -> Result<u64> + Send + 'static,
    ) -> Result<u64> {
        // Pinned from before the rename until the record: a concurrent pass must not unlink
        // the new file as the remains of an evicted one.
        let _pin = self.life.pins.pin(expect.digest);
        if let Some(s) = &self.shared {
            if s.doomed_blob(&expect.digest) {
                // Written now, it could be removed by the collection that announced it.
                s.await_clear(&[expect.digest], &[]).await?;
            }
        }
        let size = blocking(commit).await?;
        if let Some(s) = &self.shared {
            s.put_link(repo.as_str(), expect.digest, size).await?;
            if s.doomed_blob(&expect.digest) {
                // Announced while it was stored: once that collection is over, the blob must
                // still be there before this upload is acknowledged.
                s.await_clear(&[expect.digest], &[]).await?;
                if s.blob_exists(expect.digest).await?.is_none() {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "blob {} was collected while it was being stored; upload it again",
                            expect.digest
                        ),
                    ));
                }
            }
        }
        self.record_blob(repo, expect.digest, size)?;
        if let Some(s) = &self.shared {
            // Pushed now, whatever last-modified time S3 gives the object (a multipart upload's
            // is when it began): the collector hears of it with the next shipped reads.
            s.queue_access(&[Op::BlobTouched {
                digest: expect.digest,
                at: self.clock.now_ms(),
            }]);
        }
        self.settle().await?;
        tracing::debug!(repo = %repo, digest = %expect.digest, size, "blob committed");
        Ok(size)
    }

    /// Journals a blob the store just committed and links it into `repo`.
    fn record_blob(&self, repo: &RepoName, d: Digest, size: u64) -> Result<()> {
        let at = self.clock.now_ms();
        self.index.commit_if(|state| {
            let mut ops = Vec::with_capacity(2);
            if state.blobs.contains_key(&d) {
                // Pushed again: claimed anew (an export in progress).
                self.index.touch_blob(state, &d, at);
            } else {
                ops.push(Op::BlobAdded {
                    digest: d,
                    size,
                    at,
                });
            }
            ops.extend(link_ops(state, repo, d));
            Ok(ops)
        })
    }

    /// Stores bytes held in memory as a blob (manifests), skipping the write if already stored.
    pub async fn put_bytes(&self, repo: &RepoName, d: Digest, data: Bytes) -> Result<()> {
        let _pin = self.life.pins.pin(d);
        // On a shared bucket the cache may be behind a collection: the bytes are written again.
        if self.shared.is_none() && self.index.blob_size(&d).is_some() {
            return self.record_blob(repo, d, data.len() as u64);
        }
        let size = Some(data.len() as u64);
        let life = self.life.clone();
        let writer_result = blocking(move || {
            let mut w = life.reserved_writer(life.store.begin(d.algorithm())?);
            // Exactly its own size: a stream's step-wise reservation (a MiB or more) would
            // refuse small manifests long before the store is full.
            w.reserve(data.len() as u64)?;
            w.write(&data)?;
            w.commit(Expect { digest: d, size })
        })
        .await?;
        if let Some(s) = &self.shared {
            s.put_link(repo.as_str(), d, writer_result).await?;
        }
        self.record_blob(repo, d, writer_result)
    }

    /// A new upload, its bytes reserved against the size bound as they arrive.
    pub fn new_writer(&self, alg: Algorithm) -> Result<Box<dyn BlobWriter>> {
        Ok(self.life.reserved_writer(self.store.begin(alg)?))
    }

    pub async fn catalog(
        &self,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<(Vec<String>, bool)> {
        let Some(s) = &self.shared else {
            let state = self.index.read();
            let names = state
                .repos
                .iter()
                .filter(|(_, r)| !r.is_empty())
                .map(|(k, _)| k.as_str());
            return Ok(paginate(names, n, last));
        };
        // Every repository the bucket knows, less those the cache knows to be empty.
        let mut names = s.catalog().await?;
        let state = self.index.read();
        names.extend(
            state
                .repos
                .iter()
                .filter(|(_, r)| !r.is_empty())
                .map(|(k, _)| k.clone()),
        );
        names.sort();
        names.dedup();
        names.retain(|name| state.repos.get(name).is_none_or(|r| !r.is_empty()));
        Ok(paginate(names.iter().map(String::as_str), n, last))
    }
}

fn blob_not_in(repo: &RepoName, d: &Digest) -> Error {
    Error::not_found(format!("blob {d} is not in repository {repo}"))
}

/// The records deleting blob `d` from `repo`'s view takes, or why it may not go.
fn plan_delete_blob(
    state: &crate::lifecycle::index::State,
    repo: &RepoName,
    d: &Digest,
) -> Result<Vec<Op>> {
    let r = state.repos.get(repo.as_str());
    if let Some(r) = r {
        if r.manifests.contains_key(d) {
            return Err(Error::in_use(format!(
                "{d} is a manifest in repository {repo}: delete it with \
                 DELETE /v2/{repo}/manifests/{d}"
            )));
        }
        if let Some(holder) = r.holder_of(d) {
            return Err(Error::in_use(format!(
                "blob {d} is still used by {holder} in repository {repo}; delete that \
                 manifest first"
            )));
        }
    }
    if !r.is_some_and(|r| r.blobs.contains(d)) {
        return Err(blob_not_in(repo, d));
    }
    Ok(vec![Op::Unlink {
        repo: repo.to_string(),
        digest: *d,
    }])
}

fn link_ops(state: &crate::lifecycle::index::State, repo: &RepoName, d: Digest) -> Vec<Op> {
    let linked = state
        .repos
        .get(repo.as_str())
        .is_some_and(|r| r.blobs.contains(&d));
    if linked {
        vec![]
    } else {
        vec![Op::Link {
            repo: repo.to_string(),
            digest: d,
        }]
    }
}

/// Sorted names after `last`, at most `n`; the flag says whether more follow.
pub fn paginate<'a>(
    sorted: impl Iterator<Item = &'a str>,
    n: Option<usize>,
    last: Option<&str>,
) -> (Vec<String>, bool) {
    let mut it = sorted.filter(|s| last.is_none_or(|l| *s > l));
    let limit = n.unwrap_or(usize::MAX);
    let page: Vec<String> = it.by_ref().take(limit).map(str::to_owned).collect();
    let more = n.is_some() && it.next().is_some();
    (page, more)
}

impl Error {
    pub fn is_client_mismatch(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::DigestMismatch | ErrorKind::SizeMismatch
        )
    }
}
