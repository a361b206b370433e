//! Several hoard replicas on one bucket. The bucket is the only shared state: blobs, and refs as
//! small objects changed only by conditional requests. A replica's index is a cache of the
//! bucket: filled on demand (a miss reads through to S3), revalidated by re-listing the bucket,
//! and told of deletions by the collector's announcements. Owns this layout under the prefix:
//!
//! ```text
//! repos/<repo>/_tags/<tag>              {"digest","size","media_type"}; If-Match / If-None-Match
//! repos/<repo>/_manifests/<alg>/<hex>   a manifest's record: media type, size, subject, children
//! repos/<repo>/_links/<alg>/<hex>       {"size"}: the blob is visible in <repo> (pushed, mounted)
//! catalog/<repo>                        the repository exists
//! claims/<ms>-<rand>                    digests a push is about to reference (see below)
//! doomed/<ms>-<rand>                    what a collection will delete: pending, then done
//! access/<replica>/<ms>-<rand>          batched last-access records
//! access-compacted/<ms>-<rand>          access records the collector folded together
//! replicas/<replica>                    heartbeat: this replica is alive
//! lease/gc                              which replica collects garbage, until when
//! ```
//! (`_` cannot begin a repository path component, so `/_` always ends the repository name.)
//!
//! **Invariant 1 across replicas: the claim handshake.** A replica pushing a manifest first
//! writes a claim naming the manifest and everything it references, then reads the collector's
//! pending announcements (`doomed/`) and waits out any that name what it needs, then checks
//! that each referenced blob is in the bucket, and only then writes the manifest's record and
//! tags, and removes its claim. The collector (one replica, holding `lease/gc`) deletes nothing
//! it did not first announce in `doomed/`. After announcing it waits `delete_delay` (while other
//! replicas are alive: they stop offering that content and ship their recent reads), then
//! re-lists the bucket, plans again and lists the claims: it deletes only what both plans
//! remove and no live claim names; a blob written again since the announcement stays too. It
//! deletes records, then blobs, then their links, and only then marks the announcement done.
//! A push either committed before the re-listing (the second plan sees it), or holds its claim
//! when the collector lists claims, or wrote its claim after that, and then the announcement is
//! already there for it to see and wait out: no order lets a manifest be committed over a blob
//! that is then deleted, whatever the replicas' clocks say. A claim must lead to its commit
//! within half of `CLAIM_WINDOW` (the pusher's monotonic clock) or the push starts over: the
//! collector removes claims older than that window.
//!
//! Ages come from the S3 service's clock (object last-modified times, and the cache clock that
//! follows the service's `Date` headers), never from one replica's own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::clock::{Millis, SharedClock};
use crate::digest::{Digest, DigestMap, DigestSet};
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::index::{Index, ManifestMeta, Op, Stamp};
use crate::store::s3::{Bucket, Cond, LeaseState, Listed};

/// A listed last-modified time has one-second resolution and the service clock's offset is
/// known to about a second: a listing moves an access time the cache recorded itself only when
/// it is later by more than this (a push through another replica since), else the listing's
/// coarser time would reorder reads made within the same second.
const LISTED_TIME_SLACK_MS: Millis = 2_000;

/// A pusher must commit within half of this after writing its claim; the collector removes
/// claims older than it.
pub const CLAIM_WINDOW: Duration = Duration::from_secs(600);

/// A finished announcement stays this long, so every replica hears what went.
const DONE_KEPT_MS: Millis = 10 * 60_000;

/// A link object whose blob is gone is removed by the collector once it is this old (a younger
/// one may belong to an upload whose blob listing raced it).
const DANGLING_LINK_MS: Millis = 10 * 60_000;

/// How long a tag write keeps retrying races lost to other writers of the same tag.
const TAG_RACE_BUDGET: Duration = Duration::from_secs(20);

/// Requests in flight at once when a replica fetches many small objects.
const FETCH_PARALLEL: usize = 16;

/// Manifest bytes kept in memory (immutable by digest): a pull by tag then costs one request.
const MANIFEST_CACHE_BYTES: usize = 32 << 20;

/// How a replica paces its work with the bucket.
#[derive(Clone, Debug)]
pub struct Timing {
    /// A full re-listing of the bucket (reads never wait for it; it catches other replicas'
    /// changes for listings, sizes and the collector's plan).
    pub refresh: Duration,
    /// How long the collector waits between announcing deletions and carrying them out, while
    /// other replicas are alive.
    pub delete_delay: Duration,
    /// How often announcements are read and reads are shipped.
    pub poll: Duration,
    /// Length of the collector's lease.
    pub lease_ms: i64,
    /// How often a replica says it is alive.
    pub heartbeat: Duration,
    /// The longest a request already sent can still take effect (every retry at its full
    /// timeout): a delete a collector issued is over by then, whatever became of the collector.
    pub in_flight: Duration,
}

impl Timing {
    pub fn new(
        refresh: Duration,
        delete_delay: Duration,
        lease: Duration,
        in_flight: Duration,
    ) -> Timing {
        Timing {
            refresh,
            delete_delay,
            poll: (delete_delay / 3).clamp(Duration::from_millis(200), Duration::from_secs(2)),
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(30_000),
            heartbeat: (lease / 3).clamp(Duration::from_secs(1), Duration::from_secs(10)),
            in_flight,
        }
    }
}

/// A tag object's ETag, the digest it held, and when that was learned.
type SeenTag = (String, Digest, Instant);

/// A tag as read: its value, its ETag, and when the read returned.
type ReadTag = (TagValue, String, Instant);

/// A full listing of the bucket a collector plans on.
pub struct Listing {
    /// When it began.
    pub began: Instant,
    /// Each blob's last-modified time as listed.
    pub blobs: DigestMap<Millis>,
}

/// See `Shared::applied`.
#[derive(Default)]
struct Applied {
    full: Option<Instant>,
    repos: HashMap<String, Instant>,
}

/// What a tag object holds: enough to answer a HEAD by tag without another request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TagValue {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// Random per write: two writes of the same value still differ in ETag, so a conditional
    /// delete by the collector never removes a tag pushed again since it was read.
    #[serde(default)]
    pub write: String,
}

impl TagValue {
    pub fn new(digest: Digest, size: u64, media_type: String) -> TagValue {
        TagValue {
            digest,
            size,
            media_type,
            write: String::new(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ManifestRecord {
    size: u64,
    media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<String>,
    #[serde(default)]
    children: Vec<Digest>,
}

#[derive(Serialize, Deserialize)]
struct LinkObject {
    size: u64,
}

#[derive(Serialize, Deserialize)]
struct ClaimObject {
    replica: String,
    digests: Vec<Digest>,
}

/// A collection's announcement. Pending: what it will delete; done: what it deleted.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct DoomRecord {
    holder: String,
    /// Service time of the announcement.
    at: Millis,
    done: bool,
    manifests: Vec<(String, Digest)>,
    blobs: Vec<Digest>,
}

#[derive(Default, Serialize, Deserialize)]
struct AccessBatch {
    #[serde(default)]
    blobs: Vec<(Digest, Millis)>,
    #[serde(default)]
    manifests: Vec<(String, Digest, Millis)>,
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    replica: String,
}

/// Something the cache holds, for "changed here since the listing began".
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Key {
    Blob(Digest),
    Link(String, Digest),
    Manifest(String, Digest),
    Tag(String, String),
}

/// What a key under `repos/` is.
#[derive(Debug, PartialEq)]
enum Entry {
    Tag(String),
    Manifest(Digest),
    Link(Digest),
}

fn parse_repo_key(rest: &str) -> Option<(&str, Entry)> {
    let i = rest.find("/_")?;
    let (repo, tail) = (&rest[..i], &rest[i + 2..]);
    let entry = if let Some(t) = tail.strip_prefix("tags/") {
        Entry::Tag(t.to_owned())
    } else if let Some(d) = tail.strip_prefix("manifests/") {
        Entry::Manifest(digest_at(d)?)
    } else if let Some(d) = tail.strip_prefix("links/") {
        Entry::Link(digest_at(d)?)
    } else {
        return None;
    };
    (!repo.is_empty()).then_some((repo, entry))
}

/// `<alg>/<hex>` as a digest.
fn digest_at(s: &str) -> Option<Digest> {
    let (alg, hex) = s.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

/// `blobs/<alg>/<xx>/<hex>` as a digest.
fn blob_digest(key: &str) -> Option<Digest> {
    let mut parts = key.strip_prefix("blobs/")?.split('/');
    let (alg, _, hex) = (parts.next()?, parts.next()?, parts.next()?);
    format!("{alg}:{hex}").parse().ok()
}

fn tag_key(repo: &str, tag: &str) -> String {
    format!("repos/{repo}/_tags/{tag}")
}
fn manifest_key(repo: &str, d: &Digest) -> String {
    format!(
        "repos/{repo}/_manifests/{}/{}",
        d.algorithm().name(),
        d.hex()
    )
}
fn link_key(repo: &str, d: &Digest) -> String {
    format!("repos/{repo}/_links/{}/{}", d.algorithm().name(), d.hex())
}
fn blob_key(d: &Digest) -> String {
    let hex = d.hex();
    format!("blobs/{}/{}/{hex}", d.algorithm().name(), &hex[..2])
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::internal(format!("object {key} in the bucket is not readable: {e}")))
}

/// The collector's pending and finished announcements, as this replica last read them.
#[derive(Default)]
struct Doomed {
    records: HashMap<String, DoomRecord>,
    /// The ETag each record was read at: it is read again only when rewritten (done).
    etags: HashMap<String, String>,
    /// Finished announcements whose deletions this replica's cache has applied.
    applied: HashSet<String>,
    /// What pending announcements name.
    blobs: DigestSet,
    manifests: HashSet<(String, Digest)>,
}

impl Doomed {
    fn rebuild(&mut self) {
        self.blobs.clear();
        self.manifests.clear();
        for r in self.records.values().filter(|r| !r.done) {
            self.blobs.extend(r.blobs.iter().copied());
            self.manifests.extend(r.manifests.iter().cloned());
        }
    }
}

/// Counters for the status page.
#[derive(Default)]
pub struct SharedStats {
    pub refreshes: AtomicU64,
    pub last_refresh_ms: AtomicU64,
    pub last_refresh_objects: AtomicU64,
    pub live_replicas: AtomicU64,
    pub rescued: AtomicU64,
    pub waited_for_collection: AtomicU64,
    /// Tag writes that lost a race to another write (read again and retried).
    pub tag_races: AtomicU64,
    pub refreshing: AtomicBool,
}

/// What a collection in the bucket removed.
#[derive(Default, Debug)]
pub struct Carried {
    pub tags: HashSet<(String, String)>,
    pub manifests: HashSet<(String, Digest)>,
    pub blobs: DigestSet,
}

/// A claim written by a push: its commit must come within half the claim window; the pusher
/// removes it once committed (or failed).
pub struct Claim {
    at: Instant,
    key: String,
}

impl Claim {
    pub fn fresh(&self) -> bool {
        self.at.elapsed() < CLAIM_WINDOW / 2
    }
}

pub struct Shared {
    pub bucket: Arc<Bucket>,
    index: Arc<Index>,
    clock: SharedClock,
    /// This replica's name (in leases, claims, heartbeats).
    pub me: String,
    pub timing: Timing,
    /// Each tag object's ETag as last seen, with the digest it held then (conditional deletes
    /// use them; a listing re-reads a tag whose ETag or cached digest differs).
    /// Also when it was learned: this replica's own write, or the start of the read that saw
    /// it (an older read never replaces what a newer one or a write taught).
    etags: Mutex<HashMap<(String, String), SeenTag>>,
    /// Repositories whose catalog entry is known to exist.
    known_repos: Mutex<HashSet<String>>,
    /// Cache entries changed here, and when: a listing that began before must not undo them.
    recent: Mutex<HashMap<Key, Instant>>,
    doomed: RwLock<Doomed>,
    /// Reads to ship to the bucket (already debounced by the index).
    access: Mutex<AccessBatch>,
    /// Access objects the collector has folded into its cache.
    merged: Mutex<HashSet<String>>,
    /// Claim objects read (immutable), by key.
    claims: Mutex<HashMap<String, Vec<Digest>>>,
    gc_etag: Mutex<Option<String>>,
    gc_held: AtomicBool,
    gc_renewed: Mutex<Option<i64>>,
    /// When this replica last took the lease (it has held it since, while `gc_held`).
    gc_since: Mutex<Option<Instant>>,
    /// Service time the lease last written runs out (measured from before the request).
    gc_expires: std::sync::atomic::AtomicI64,
    /// Announcements this replica's collector is carrying out now.
    active: Mutex<HashMap<String, Option<Instant>>>,
    /// Each blob's last-modified time as the last full listing saw it: a blob whose object
    /// changed since (pushed again) is spared by a collection planned on that listing.
    /// When the newest listing applied began, for the whole bucket and per repository: a
    /// listing older than one already applied does not undo what the newer one brought in.
    applied: Mutex<Applied>,
    /// Who held the collector's lease when last seen, for the status page.
    pub gc_holder: Mutex<Option<String>>,
    manifests: Mutex<lru::LruCache<Digest, Bytes>>,
    manifest_bytes: AtomicU64,
    pub stats: SharedStats,
    /// Test hook (`HOARD_TEST_PAUSE=point=ms,…`): waits at named points, so tests can line up
    /// a race on purpose.
    pauses: HashMap<String, u64>,
}

impl Shared {
    pub fn new(
        bucket: Arc<Bucket>,
        index: Arc<Index>,
        clock: SharedClock,
        me: String,
        timing: Timing,
    ) -> Shared {
        let pauses = std::env::var("HOARD_TEST_PAUSE")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim().to_owned(), v.trim().parse().ok()?))
            })
            .collect();
        Shared {
            bucket,
            index,
            clock,
            me,
            timing,
            etags: Mutex::new(HashMap::new()),
            known_repos: Mutex::new(HashSet::new()),
            recent: Mutex::new(HashMap::new()),
            doomed: RwLock::new(Doomed::default()),
            access: Mutex::new(AccessBatch::default()),
            merged: Mutex::new(HashSet::new()),
            claims: Mutex::new(HashMap::new()),
            gc_etag: Mutex::new(None),
            gc_held: AtomicBool::new(false),
            gc_renewed: Mutex::new(None),
            gc_since: Mutex::new(None),
            gc_expires: std::sync::atomic::AtomicI64::new(0),
            active: Mutex::new(HashMap::new()),
            applied: Mutex::new(Applied::default()),
            gc_holder: Mutex::new(None),
            manifests: Mutex::new(lru::LruCache::unbounded()),
            manifest_bytes: AtomicU64::new(0),
            stats: SharedStats::default(),
            pauses,
        }
    }

    /// Runs `f(self)` on the S3 runtime (from async code).
    async fn on_s3<T, Fut>(self: &Arc<Self>, f: impl FnOnce(Arc<Shared>) -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let fut = f(self.clone());
        self.bucket.run(fut).await?
    }

    /// Runs `f(self)` on the S3 runtime and waits for it (from a blocking thread).
    pub fn block<T, Fut>(self: &Arc<Self>, f: impl FnOnce(Arc<Shared>) -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let fut = f(self.clone());
        self.bucket.wait_on(fut)?
    }

    fn key(&self, rest: &str) -> String {
        self.bucket.key(rest)
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// The time a collector judges ages by: cache time, but never ahead of the service's clock
    /// as last measured (a cache clock that started from a fast machine clock before S3
    /// answered catches up only gradually, and a clock ahead makes everything look older:
    /// claims, grace, TTLs). `None` until the service's clock has been read at all.
    pub fn collector_now(&self) -> Option<Millis> {
        (self.bucket.clock.samples() > 0).then(|| self.now().min(self.service_now()))
    }

    /// The S3 service's time as this replica reads it now: its wall clock plus the offset last
    /// measured. Unlike cache time it follows a suspend or a pause at once.
    fn service_now(&self) -> Millis {
        crate::clock::Clock::now_ms(&*self.bucket.clock)
    }

    /// The test hook's pause at `point`, if one is set.
    pub async fn pause(&self, point: &str) {
        if let Some(ms) = self.pauses.get(point) {
            tracing::info!(point, ms, "test hook: pausing");
            tokio::time::sleep(Duration::from_millis(*ms)).await;
        }
    }

    fn mark(&self, keys: impl IntoIterator<Item = Key>) {
        let now = Instant::now();
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            r.insert(k, now);
        }
    }

    fn recent_since(&self, t: Instant) -> HashSet<Key> {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        // Nothing older than a listing that could still be running matters.
        let keep = self.timing.refresh * 4 + Duration::from_secs(60);
        r.retain(|_, at| at.elapsed() < keep);
        r.iter()
            .filter(|(_, at)| **at >= t)
            .map(|(k, _)| k.clone())
            .collect()
    }

    // ----- what the collector has announced ------------------------------------------------

    /// True while a pending announcement names blob `d`: it is about to go, so it is offered
    /// to no one (a HEAD is a miss, a mount does not happen).
    pub fn doomed_blob(&self, d: &Digest) -> bool {
        let g = self.doomed.read().unwrap_or_else(|p| p.into_inner());
        g.blobs.contains(d)
    }

    /// Whether blob `d` is named by a pending announcement, read fresh from the bucket when
    /// this replica's copy says so (it may be a poll behind a collection that spared it).
    pub async fn still_doomed(self: &Arc<Self>, d: &Digest) -> Result<bool> {
        if !self.doomed_blob(d) {
            return Ok(false);
        }
        self.poll_doomed().await?;
        Ok(self.doomed_blob(d))
    }

    /// True while a pending announcement names manifest `d` of `repo` (or its bytes), read
    /// fresh when this replica's copy says so: a HEAD by digest is then a miss, so a client
    /// checking before it pushes an index pushes the manifest again.
    pub async fn still_doomed_manifest(self: &Arc<Self>, repo: &str, d: &Digest) -> Result<bool> {
        let doomed = |s: &Self| {
            let g = s.doomed.read().unwrap_or_else(|p| p.into_inner());
            g.manifests.contains(&(repo.to_owned(), *d)) || g.blobs.contains(d)
        };
        if !doomed(self) {
            return Ok(false);
        }
        self.poll_doomed().await?;
        Ok(doomed(self))
    }

    /// Pending announcements now.
    pub fn pending_collections(&self) -> usize {
        let g = self.doomed.read().unwrap_or_else(|p| p.into_inner());
        g.records.values().filter(|r| !r.done).count()
    }

    /// Reads `doomed/` (new announcements, finished ones) and applies finished deletions to
    /// the cache.
    pub async fn poll_doomed(self: &Arc<Self>) -> Result<()> {
        self.on_s3(|s| async move { s.poll_doomed_().await }).await
    }

    async fn poll_doomed_(self: &Arc<Self>) -> Result<()> {
        let listed = self.bucket.list_objects("doomed/").await?;
        let known: HashMap<String, String> = {
            let g = self.doomed.read().unwrap_or_else(|p| p.into_inner());
            g.etags.clone()
        };
        let mut fetched = Vec::new();
        for l in &listed {
            // Read when new or rewritten (a pending record is rewritten in place when done).
            if known.get(&l.key) != Some(&l.etag) {
                if let Some(f) = self.bucket.fetch(&self.key(&l.key)).await? {
                    match parse::<DoomRecord>(&l.key, &f.body) {
                        Ok(r) => fetched.push((l.key.clone(), r, f.etag)),
                        Err(e) => tracing::warn!(error = %e, "skipping an unreadable announcement"),
                    }
                }
            }
        }
        let listed: HashSet<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        let mut apply = Vec::new();
        {
            let mut g = self.doomed.write().unwrap_or_else(|p| p.into_inner());
            g.records.retain(|k, _| listed.contains(k.as_str()));
            g.etags.retain(|k, _| listed.contains(k.as_str()));
            let Doomed {
                records, applied, ..
            } = &mut *g;
            applied.retain(|k| records.contains_key(k));
            for (k, r, etag) in fetched {
                g.etags.insert(k.clone(), etag);
                g.records.insert(k, r);
            }
            for (k, r) in &g.records {
                if r.done && !g.applied.contains(k) {
                    apply.push((k.clone(), r.clone()));
                }
            }
            g.rebuild();
        }
        for (k, r) in apply {
            if r.holder != self.me {
                self.forget(&r.manifests, &r.blobs)?;
            }
            let mut g = self.doomed.write().unwrap_or_else(|p| p.into_inner());
            g.applied.insert(k);
        }
        Ok(())
    }

    /// Drops deleted content from the cache (what a finished collection removed, or what S3
    /// turned out not to hold).
    pub fn forget(&self, manifests: &[(String, Digest)], blobs: &[Digest]) -> Result<()> {
        if manifests.is_empty() && blobs.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let since = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        let recent = self.recent_since(since);
        self.index.commit_if(|st| {
            let mut ops = Vec::new();
            for (repo, d) in manifests {
                if recent.contains(&Key::Manifest(repo.clone(), *d)) {
                    continue;
                }
                if st
                    .repos
                    .get(repo)
                    .is_some_and(|r| r.manifests.contains_key(d))
                {
                    ops.push(Op::ManifestDeleted {
                        repo: repo.clone(),
                        digest: *d,
                    });
                }
            }
            for d in blobs {
                if recent.contains(&Key::Blob(*d)) || !st.blobs.contains_key(d) {
                    continue;
                }
                for (name, r) in &st.repos {
                    if r.blobs.contains(d) {
                        ops.push(Op::Unlink {
                            repo: name.clone(),
                            digest: *d,
                        });
                    }
                }
                ops.push(Op::BlobRemoved { digest: *d });
            }
            Ok(ops)
        })
    }

    /// Waits while a pending announcement names any of `blobs` or `manifests` (read fresh from
    /// the bucket), so a push never commits over content a collection is removing. `Ok(true)`
    /// when it waited (the caller checks again what it needs).
    pub async fn await_clear(
        self: &Arc<Self>,
        blobs: &[Digest],
        manifests: &[(String, Digest)],
    ) -> Result<bool> {
        let (blobs, manifests) = (blobs.to_vec(), manifests.to_vec());
        self.on_s3(move |s| async move {
            let began = Instant::now();
            let limit = s.timing.delete_delay + Duration::from_secs(120);
            let mut waited = false;
            loop {
                s.poll_doomed_().await?;
                let blocked = {
                    let g = s.doomed.read().unwrap_or_else(|p| p.into_inner());
                    blobs.iter().any(|d| g.blobs.contains(d))
                        || manifests.iter().any(|m| g.manifests.contains(m))
                };
                if !blocked {
                    return Ok(waited);
                }
                if !waited {
                    s.stats
                        .waited_for_collection
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "a push needs content a garbage collection has announced; waiting for it"
                    );
                }
                waited = true;
                if began.elapsed() > limit {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "a garbage collection is removing content this push needs and has not \
                         finished; retry shortly",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await
    }

    // ----- reading through ----------------------------------------------------------------

    /// Whether blob `d` is visible in `repo` in the bucket: its link and the blob itself. A hit
    /// is added to the cache. `Some(size)` when it is.
    pub async fn find_link(self: &Arc<Self>, repo: &str, d: Digest) -> Result<Option<u64>> {
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            let key = s.key(&link_key(&repo, &d));
            let Some(f) = s.bucket.fetch(&key).await? else {
                return Ok(None);
            };
            let size = parse::<LinkObject>(&key, &f.body)?.size;
            // The link alone is not enough: a collection that stopped half way can leave one
            // behind its blob.
            let Some((_, modified)) = s.bucket.stat(&s.key(&blob_key(&d))).await? else {
                return Ok(None);
            };
            let now = s.now();
            s.mark([Key::Blob(d), Key::Link(repo.clone(), d)]);
            s.index.commit_if(|st| {
                let mut ops = Vec::new();
                if !st.blobs.contains_key(&d) {
                    ops.push(Op::BlobAdded {
                        digest: d,
                        size,
                        at: modified.min(now),
                    });
                }
                if !st.repos.get(&repo).is_some_and(|r| r.blobs.contains(&d)) {
                    ops.push(Op::Link {
                        repo: repo.clone(),
                        digest: d,
                    });
                }
                Ok(ops)
            })?;
            Ok(Some(size))
        })
        .await
    }

    /// Whether blob `d` exists in the bucket at all (a mount with no source repository).
    pub async fn blob_exists(self: &Arc<Self>, d: Digest) -> Result<Option<u64>> {
        self.on_s3(move |s| async move {
            Ok(s.bucket.stat(&s.key(&blob_key(&d))).await?.map(|(n, _)| n))
        })
        .await
    }

    /// The tag as the bucket has it now (one request). The cache follows: a tag gone is
    /// dropped, a moved tag is moved when its manifest is cached.
    pub async fn get_tag(self: &Arc<Self>, repo: &str, tag: &str) -> Result<Option<TagValue>> {
        let (repo, tag) = (repo.to_owned(), tag.to_owned());
        self.on_s3(move |s| async move {
            let key = s.key(&tag_key(&repo, &tag));
            let asked = Instant::now();
            let got = s.bucket.fetch(&key).await?;
            let k = (repo.clone(), tag.clone());
            let value = match got {
                None => {
                    s.learn_etag(k, None, asked);
                    None
                }
                Some(f) => {
                    let v: TagValue = parse(&key, &f.body)?;
                    s.learn_etag(k, Some((f.etag, v.digest)), asked);
                    Some(v)
                }
            };
            if let Some(v) = &value {
                let cached = s
                    .index
                    .read()
                    .repos
                    .get(&repo)
                    .is_some_and(|r| r.manifests.contains_key(&v.digest));
                if !cached {
                    // Cached in the background (the answer needs only the tag): the next
                    // pull, or one while S3 is unreachable, finds the manifest here.
                    let (s2, repo2, tag2, d) = (s.clone(), repo.clone(), tag.clone(), v.digest);
                    tokio::spawn(async move {
                        if let Ok(Some(_)) = s2.get_manifest(&repo2, d).await {
                            // Only if the bucket's tag, as last seen, still names it.
                            let latest = s2
                                .etags
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(&(repo2.clone(), tag2.clone()))
                                .map(|(_, d, _)| *d);
                            let _ = s2.index.commit_if(|st| {
                                let r = st.repos.get(&repo2);
                                let set = latest == Some(d)
                                    && r.is_some_and(|r| {
                                        r.manifests.contains_key(&d)
                                            && r.tags.get(&tag2) != Some(&d)
                                    });
                                Ok(if set {
                                    vec![Op::TagSet {
                                        repo: repo2.clone(),
                                        tag: tag2.clone(),
                                        digest: d,
                                        at: 0,
                                    }]
                                } else {
                                    vec![]
                                })
                            });
                        }
                    });
                }
            }
            s.mark([Key::Tag(repo.clone(), tag.clone())]);
            s.index.commit_if(|st| {
                let r = st.repos.get(&repo);
                let cur = r.and_then(|r| r.tags.get(&tag));
                Ok(match &value {
                    None if cur.is_some() => vec![Op::TagDeleted {
                        repo: repo.clone(),
                        tag: tag.clone(),
                    }],
                    Some(v)
                        if cur != Some(&v.digest)
                            && r.is_some_and(|r| r.manifests.contains_key(&v.digest)) =>
                    {
                        vec![Op::TagSet {
                            repo: repo.clone(),
                            tag: tag.clone(),
                            digest: v.digest,
                            at: 0,
                        }]
                    }
                    _ => vec![],
                })
            })?;
            Ok(value)
        })
        .await
    }

    /// Manifest `d` of `repo` from its record in the bucket, added to the cache.
    pub async fn get_manifest(
        self: &Arc<Self>,
        repo: &str,
        d: Digest,
    ) -> Result<Option<ManifestMeta>> {
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            let Some(meta) = s.fetch_record(&repo, d).await? else {
                return Ok(None);
            };
            let now = s.now();
            s.mark([Key::Manifest(repo.clone(), d), Key::Blob(d)]);
            s.index.commit_if(|st| {
                let mut ops = Vec::new();
                if !st.blobs.contains_key(&d) {
                    ops.push(Op::BlobAdded {
                        digest: d,
                        size: meta.size,
                        at: meta.pushed.min(now),
                    });
                }
                if !st
                    .repos
                    .get(&repo)
                    .is_some_and(|r| r.manifests.contains_key(&d))
                {
                    ops.push(Op::ManifestPut {
                        repo: repo.clone(),
                        digest: d,
                        meta: meta.clone(),
                    });
                }
                Ok(ops)
            })?;
            Ok(Some(meta))
        })
        .await
    }

    /// Which of `repo`'s manifests `ds` have no record in the bucket now (read fresh, not
    /// from the cache).
    pub async fn missing_records(
        self: &Arc<Self>,
        repo: &str,
        ds: Vec<Digest>,
    ) -> Result<Vec<Digest>> {
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            let found = s
                .each(ds, |s, d| {
                    let repo = repo.clone();
                    async move {
                        Ok(s.bucket
                            .head(&s.key(&manifest_key(&repo, &d)))
                            .await?
                            .is_some())
                    }
                })
                .await?;
            Ok(found
                .into_iter()
                .filter(|(_, there)| !there)
                .map(|(d, _)| d)
                .collect())
        })
        .await
    }

    async fn fetch_record(&self, repo: &str, d: Digest) -> Result<Option<ManifestMeta>> {
        let key = self.key(&manifest_key(repo, &d));
        let Some(f) = self.bucket.fetch(&key).await? else {
            return Ok(None);
        };
        let r: ManifestRecord = parse(&key, &f.body)?;
        let pushed = f.modified.min(self.now());
        Ok(Some(ManifestMeta {
            size: r.size,
            media_type: r.media_type,
            pushed,
            subject: r.subject,
            artifact_type: r.artifact_type,
            annotations: r.annotations,
            children: r.children,
            access: Stamp::new(pushed),
            rooted: false,
        }))
    }

    /// Whether `repo` was ever pushed to (its catalog entry).
    pub async fn repo_known(self: &Arc<Self>, repo: &str) -> Result<bool> {
        if self
            .known_repos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(repo)
        {
            return Ok(true);
        }
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            let found = s
                .bucket
                .stat(&s.key(&format!("catalog/{repo}")))
                .await?
                .is_some();
            if found {
                s.known_repos
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(repo);
            }
            Ok(found)
        })
        .await
    }

    /// Every repository's name (the catalog entries).
    pub async fn catalog(self: &Arc<Self>) -> Result<Vec<String>> {
        self.on_s3(|s| async move {
            let listed = s.bucket.list_objects("catalog/").await?;
            Ok(listed
                .into_iter()
                .filter_map(|l| l.key.strip_prefix("catalog/").map(str::to_owned))
                .collect())
        })
        .await
    }

    /// Cached bytes of manifest `d`.
    pub fn cached_manifest(&self, d: &Digest) -> Option<Bytes> {
        let mut c = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        c.get(d).cloned()
    }

    pub fn cache_manifest(&self, d: Digest, bytes: Bytes) {
        let mut c = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        if c.contains(&d) {
            return;
        }
        let mut total = self.manifest_bytes.load(Ordering::Relaxed) + bytes.len() as u64;
        c.put(d, bytes);
        while total > MANIFEST_CACHE_BYTES as u64 {
            match c.pop_lru() {
                Some((_, b)) => total -= b.len() as u64,
                None => break,
            }
        }
        self.manifest_bytes.store(total, Ordering::Relaxed);
    }

    // ----- writing ------------------------------------------------------------------------

    async fn ensure_repo_(&self, repo: &str) -> Result<()> {
        let known = self
            .known_repos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(repo);
        if !known {
            self.bucket
                .put(
                    &self.key(&format!("catalog/{repo}")),
                    Bytes::new(),
                    Cond::None,
                )
                .await?;
            self.known_repos
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(repo.to_owned());
        }
        Ok(())
    }

    /// Makes blob `d` visible in `repo` for every replica (the blob is already in the bucket).
    pub async fn put_link(self: &Arc<Self>, repo: &str, d: Digest, size: u64) -> Result<()> {
        let repo = repo.to_owned();
        self.mark([Key::Blob(d), Key::Link(repo.clone(), d)]);
        self.on_s3(move |s| async move {
            s.ensure_repo_(&repo).await?;
            s.bucket
                .put(
                    &s.key(&link_key(&repo, &d)),
                    json(&LinkObject { size }),
                    Cond::None,
                )
                .await?;
            s.mark([Key::Blob(d), Key::Link(repo, d)]);
            Ok(())
        })
        .await
    }

    /// Removes `d` from `repo`'s view in the bucket.
    pub async fn delete_link(self: &Arc<Self>, repo: &str, d: Digest) -> Result<()> {
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            s.bucket.delete_key(&s.key(&link_key(&repo, &d))).await?;
            s.mark([Key::Link(repo, d)]);
            Ok(())
        })
        .await
    }

    /// The first step of a push that references `digests`: the claim (see the module notes).
    pub async fn claim(self: &Arc<Self>, digests: Vec<Digest>) -> Result<Claim> {
        self.on_s3(move |s| async move {
            let key = s.key(&format!(
                "claims/{:013}-{}",
                s.now().max(0),
                random_suffix()
            ));
            let body = json(&ClaimObject {
                replica: s.me.clone(),
                digests,
            });
            let at = Instant::now();
            s.bucket.put(&key, body, Cond::None).await?;
            Ok(Claim { at, key })
        })
        .await
    }

    /// Removes a claim whose push committed or gave up (in the background; a claim left behind
    /// only delays collection of what it names until the collector removes it).
    pub fn release(self: &Arc<Self>, claim: Claim) {
        let b = self.bucket.clone();
        let key = claim.key;
        self.bucket.rt_spawn(async move {
            if let Err(e) = b.delete_key(&key).await {
                tracing::debug!(key = %key, error = %e, "removing a claim failed; the collector will");
            }
        });
    }

    /// Checks that every blob in `digests` is in the bucket now; those that are not are dropped
    /// from the cache and returned.
    pub async fn missing_blobs(self: &Arc<Self>, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        self.on_s3(move |s| async move {
            let found = s
                .each(digests, |s, d| async move {
                    Ok(s.bucket.stat(&s.key(&blob_key(&d))).await?.is_some())
                })
                .await?;
            let missing: Vec<Digest> = found
                .into_iter()
                .filter(|(_, there)| !there)
                .map(|(d, _)| d)
                .collect();
            s.forget(&[], &missing)?;
            Ok(missing)
        })
        .await
    }

    /// After a push committed: its record and its children's links are still there (a client's
    /// DELETE racing the push may have removed one: it is written again), and so is its claim.
    /// `Ok(false)` when the claim is gone (a push stalled past the claim window): the caller
    /// must treat the push as failed if, after any collection in progress, a child is missing.
    pub async fn confirm_commit(
        self: &Arc<Self>,
        claim: &Claim,
        repo: &str,
        d: Digest,
        meta: &ManifestMeta,
        children: Vec<(Digest, u64)>,
    ) -> Result<bool> {
        let (repo, claim_key) = (repo.to_owned(), claim.key.clone());
        let record = json(&ManifestRecord {
            size: meta.size,
            media_type: meta.media_type.clone(),
            subject: meta.subject,
            artifact_type: meta.artifact_type.clone(),
            annotations: meta.annotations.clone(),
            children: meta.children.clone(),
        });
        self.on_s3(move |s| async move {
            let rkey = s.key(&manifest_key(&repo, &d));
            if s.bucket.stat(&rkey).await?.is_none() {
                tracing::info!(repo = %repo, digest = %d, "a delete raced this push; its record is written again");
                s.bucket.put(&rkey, record, Cond::None).await?;
            }
            let r2 = repo.clone();
            s.each(children, move |s, (c, size)| {
                let repo = r2.clone();
                async move {
                    let key = s.key(&link_key(&repo, &c));
                    if s.bucket.stat(&key).await?.is_none() {
                        s.bucket.put(&key, json(&LinkObject { size }), Cond::None).await?;
                    }
                    Ok(())
                }
            })
            .await?;
            Ok(s.bucket.stat(&claim_key).await?.is_some())
        })
        .await
    }

    /// Undoes a push that must not stand: its tags (each only if still this push's), then its
    /// record.
    pub async fn undo_push(
        self: &Arc<Self>,
        repo: &str,
        d: Digest,
        tags: Vec<String>,
    ) -> Result<()> {
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            // Each tag read fresh: one that still names `d` goes before the record does (a
            // tag left over a missing record would be worse than no tag).
            for t in tags {
                let key = s.key(&tag_key(&repo, &t));
                let mut cleared = false;
                for _ in 0..16 {
                    let Some(f) = s.bucket.fetch(&key).await? else {
                        cleared = true;
                        break;
                    };
                    if parse::<TagValue>(&key, &f.body)?.digest != d {
                        cleared = true;
                        break;
                    }
                    match s.bucket.delete_if(&key, &f.etag).await {
                        Ok(()) => {
                            s.etags
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&(repo.clone(), t.clone()));
                            s.mark([Key::Tag(repo.clone(), t.clone())]);
                            cleared = true;
                            break;
                        }
                        Err(e) if e.kind == ErrorKind::Conflict => continue,
                        Err(e) => return Err(e),
                    }
                }
                if !cleared {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "tag {repo}:{t} kept changing while a failed push was undone; retry"
                        ),
                    ));
                }
            }
            s.bucket
                .delete_key(&s.key(&manifest_key(&repo, &d)))
                .await?;
            s.mark([Key::Manifest(repo.clone(), d)]);
            Ok(())
        })
        .await
    }

    /// Whether a tag of `repo`, as last read from the bucket, names `d`.
    pub fn tagged(&self, repo: &str, d: &Digest) -> bool {
        let e = self.etags.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().any(|((r, _), (_, td, _))| r == repo && td == d)
    }

    /// Writes manifest `d`'s record in `repo` (after the claim handshake).
    pub async fn put_record(
        self: &Arc<Self>,
        repo: &str,
        d: Digest,
        meta: &ManifestMeta,
    ) -> Result<()> {
        let body = json(&ManifestRecord {
            size: meta.size,
            media_type: meta.media_type.clone(),
            subject: meta.subject,
            artifact_type: meta.artifact_type.clone(),
            annotations: meta.annotations.clone(),
            children: meta.children.clone(),
        });
        let repo = repo.to_owned();
        self.mark([Key::Manifest(repo.clone(), d)]);
        self.on_s3(move |s| async move {
            s.ensure_repo_(&repo).await?;
            s.bucket
                .put(&s.key(&manifest_key(&repo, &d)), body, Cond::None)
                .await?;
            s.mark([Key::Manifest(repo, d)]);
            Ok(())
        })
        .await
    }

    /// Points `tag` at `value`: read, then written only if unchanged since read (a lost race is
    /// read again and retried, never a silent overwrite of something not seen).
    pub async fn set_tag(self: &Arc<Self>, repo: &str, tag: &str, value: TagValue) -> Result<()> {
        let (repo, tag) = (repo.to_owned(), tag.to_owned());
        self.mark([Key::Tag(repo.clone(), tag.clone())]);
        self.on_s3(move |s| async move {
            let key = s.key(&tag_key(&repo, &tag));
            let mut value = value;
            value.write = format!("{}-{}", s.now(), random_suffix());
            let body = json(&value);
            // Many builders may move one cache tag at once: each lost race is read again and
            // retried, backing off, for up to TAG_RACE_BUDGET.
            let began = Instant::now();
            let mut pause = 5u64;
            while began.elapsed() < TAG_RACE_BUDGET {
                let cond = match s.bucket.fetch(&key).await? {
                    Some(f) => Cond::Match(f.etag),
                    None => Cond::Create,
                };
                match s.bucket.put(&key, body.clone(), cond).await {
                    Ok(etag) => {
                        s.etags.lock().unwrap_or_else(|p| p.into_inner()).insert(
                            (repo.clone(), tag.clone()),
                            (etag, value.digest, Instant::now()),
                        );
                        s.mark([Key::Tag(repo.clone(), tag.clone())]);
                        return Ok(());
                    }
                    // 412 (changed, or created meanwhile); 409 (a concurrent conditional
                    // write); 404 (deleted between the read and an If-Match write, on services
                    // that say so rather than 412): all a lost race, read again.
                    Err(e) if e.kind == ErrorKind::Conflict || e.is_not_found() => {
                        s.stats.tag_races.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(pause + rand_ms(pause * 3))).await;
                        pause = (pause * 2).min(200);
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(Error::new(
                ErrorKind::Unavailable,
                format!("tag {repo}:{tag} kept changing under this push; retry"),
            ))
        })
        .await
    }

    /// Deletes `tag` (a client's DELETE): whatever it points at now, or with `only`, only while
    /// it still points at that manifest (a delete by digest must not take a tag another push
    /// has just moved on). `Ok(false)`: no such tag, or it names another manifest.
    pub async fn delete_tag(
        self: &Arc<Self>,
        repo: &str,
        tag: &str,
        only: Option<Digest>,
    ) -> Result<bool> {
        let (repo, tag) = (repo.to_owned(), tag.to_owned());
        self.on_s3(move |s| async move {
            let key = s.key(&tag_key(&repo, &tag));
            for _ in 0..16 {
                let Some(f) = s.bucket.fetch(&key).await? else {
                    return Ok(false);
                };
                if let Some(d) = only {
                    if parse::<TagValue>(&key, &f.body)?.digest != d {
                        s.mark([Key::Tag(repo.clone(), tag.clone())]);
                        return Ok(false);
                    }
                }
                match s.bucket.delete_if(&key, &f.etag).await {
                    Ok(()) => {
                        s.etags
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&(repo.clone(), tag.clone()));
                        s.mark([Key::Tag(repo.clone(), tag.clone())]);
                        return Ok(true);
                    }
                    Err(e) if e.kind == ErrorKind::Conflict => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(Error::new(
                ErrorKind::Unavailable,
                format!("tag {repo}:{tag} kept changing; retry"),
            ))
        })
        .await
    }

    /// Deletes manifest `d`'s record in `repo`.
    pub async fn delete_record(self: &Arc<Self>, repo: &str, d: Digest) -> Result<()> {
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            s.bucket
                .delete_key(&s.key(&manifest_key(&repo, &d)))
                .await?;
            s.mark([Key::Manifest(repo, d)]);
            Ok(())
        })
        .await
    }

    /// Carries out repair records in the bucket (verify --repair): links for stored children,
    /// tags and manifests that would dangle removed, links and blobs of what is gone.
    pub async fn apply_in_bucket(self: &Arc<Self>, ops: Vec<Op>) -> Result<()> {
        self.on_s3(move |s| async move {
            for op in ops {
                match op {
                    Op::Link { repo, digest } => {
                        let size = s.index.blob_size(&digest).unwrap_or(0);
                        s.ensure_repo_(&repo).await?;
                        s.bucket
                            .put(
                                &s.key(&link_key(&repo, &digest)),
                                json(&LinkObject { size }),
                                Cond::None,
                            )
                            .await?;
                    }
                    Op::TagDeleted { repo, tag } => {
                        s.bucket.delete_key(&s.key(&tag_key(&repo, &tag))).await?;
                    }
                    Op::ManifestDeleted { repo, digest } => {
                        let tags: Vec<String> = {
                            let st = s.index.read();
                            st.repos.get(&repo).map_or(Vec::new(), |r| {
                                r.tags
                                    .iter()
                                    .filter(|(_, d)| **d == digest)
                                    .map(|(t, _)| t.clone())
                                    .collect()
                            })
                        };
                        for t in tags {
                            s.bucket.delete_key(&s.key(&tag_key(&repo, &t))).await?;
                        }
                        s.bucket
                            .delete_key(&s.key(&manifest_key(&repo, &digest)))
                            .await?;
                    }
                    Op::Unlink { repo, digest } => {
                        s.bucket
                            .delete_key(&s.key(&link_key(&repo, &digest)))
                            .await?;
                    }
                    Op::BlobRemoved { digest } => {
                        s.bucket.delete_key(&s.key(&blob_key(&digest))).await?;
                    }
                    _ => {}
                }
            }
            Ok(())
        })
        .await
    }

    // ----- last access --------------------------------------------------------------------

    /// Queues access records (the index's debounced touches) for the bucket.
    pub fn queue_access(&self, ops: &[Op]) {
        let mut q = self.access.lock().unwrap_or_else(|p| p.into_inner());
        for op in ops {
            match op {
                Op::BlobTouched { digest, at } => q.blobs.push((*digest, *at)),
                Op::ManifestTouched { repo, digest, at } => {
                    q.manifests.push((repo.clone(), *digest, *at))
                }
                _ => {}
            }
        }
    }

    /// A read of a manifest the cache does not hold yet (a pull by tag answered from the tag).
    pub fn note_manifest_read(&self, repo: &str, d: Digest, at: Millis) {
        let mut q = self.access.lock().unwrap_or_else(|p| p.into_inner());
        if q.manifests.len() < 100_000 {
            q.manifests.push((repo.to_owned(), d, at));
        }
    }

    /// Ships queued access records as one object.
    pub async fn flush_access(self: &Arc<Self>) -> Result<()> {
        let batch = std::mem::take(&mut *self.access.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.blobs.is_empty() && batch.manifests.is_empty() {
            return Ok(());
        }
        let body = json(&batch);
        let r = self
            .on_s3(move |s| async move {
                let key = s.key(&format!(
                    "access/{}/{:013}-{}",
                    replica_key(&s.me),
                    s.now().max(0),
                    random_suffix()
                ));
                s.bucket.put(&key, body, Cond::None).await.map(|_| ())
            })
            .await;
        if r.is_err() {
            // Kept for the next round (S3 may be back by then).
            let mut q = self.access.lock().unwrap_or_else(|p| p.into_inner());
            if q.blobs.len() + q.manifests.len() < 100_000 {
                q.blobs.extend(batch.blobs);
                q.manifests.extend(batch.manifests);
            }
        }
        r
    }

    /// Folds every replica's access records into this cache (the collector, before it plans).
    async fn merge_access_(self: &Arc<Self>) -> Result<()> {
        let mut listed = self.bucket.list_objects("access-compacted/").await?;
        listed.extend(self.bucket.list_objects("access/").await?);
        let fresh: Vec<String> = {
            let m = self.merged.lock().unwrap_or_else(|p| p.into_inner());
            listed
                .iter()
                .filter(|l| !m.contains(&l.key))
                .map(|l| l.key.clone())
                .collect()
        };
        let got = self
            .each(fresh, |s, k| async move {
                Ok(s.bucket.fetch(&s.key(&k)).await?.map(|f| f.body))
            })
            .await?;
        let mut ops = Vec::new();
        for (k, body) in &got {
            let Some(body) = body else { continue };
            let b: AccessBatch = match serde_json::from_slice(body) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "skipping an unreadable access record");
                    continue;
                }
            };
            let now = self.now();
            for (d, at) in b.blobs {
                ops.push(Op::BlobTouched {
                    digest: d,
                    at: at.min(now),
                });
            }
            for (repo, d, at) in b.manifests {
                ops.push(Op::ManifestTouched {
                    repo,
                    digest: d,
                    at: at.min(now),
                });
            }
        }
        self.index.commit(ops)?;
        {
            let mut m = self.merged.lock().unwrap_or_else(|p| p.into_inner());
            let present: HashSet<&str> = listed.iter().map(|l| l.key.as_str()).collect();
            m.retain(|k| present.contains(k.as_str()));
            m.extend(got.into_iter().map(|(k, _)| k));
        }
        // Many small records: fold them into one (written before the parts go).
        if listed.len() > 256 {
            self.compact_access(&listed).await?;
        }
        Ok(())
    }

    async fn compact_access(self: &Arc<Self>, listed: &[Listed]) -> Result<()> {
        let mut batch = AccessBatch::default();
        {
            let st = self.index.read();
            for (d, m) in &st.blobs {
                if m.access.get() > m.added {
                    batch.blobs.push((*d, m.access.get()));
                }
            }
            for (name, r) in &st.repos {
                for (d, m) in &r.manifests {
                    if m.access.get() > m.pushed {
                        batch.manifests.push((name.clone(), *d, m.access.get()));
                    }
                }
            }
        }
        let key = format!(
            "access-compacted/{:013}-{}",
            self.now().max(0),
            random_suffix()
        );
        self.bucket
            .put(&self.key(&key), json(&batch), Cond::None)
            .await?;
        let old: Vec<String> = listed.iter().map(|l| self.key(&l.key)).collect();
        self.bucket.delete_keys(&old).await?;
        let mut m = self.merged.lock().unwrap_or_else(|p| p.into_inner());
        m.clear();
        m.insert(key);
        Ok(())
    }

    // ----- liveness and the collector's lease ----------------------------------------------

    /// Says this replica is alive and takes or renews the collector's lease.
    pub async fn heartbeat(self: &Arc<Self>) -> Result<()> {
        self.on_s3(|s| async move {
            let key = s.key(&format!("replicas/{}", replica_key(&s.me)));
            s.bucket
                .put(
                    &key,
                    json(&Heartbeat {
                        replica: s.me.clone(),
                    }),
                    Cond::None,
                )
                .await?;
            let lease = s.key("lease/gc");
            // Both measured before the request: a renewal that takes long must not look
            // fresher than the lease it wrote. Neither stands still while the machine is
            // suspended: boot time, and the service's clock (this machine's wall clock plus
            // the measured offset, not the rate-limited cache clock).
            let (asked, asked_boot, asked_at) =
                (Instant::now(), crate::clock::boot_ms(), s.service_now());
            match s
                .bucket
                .hold_lease_at(&lease, &s.me, s.timing.lease_ms, &s.gc_etag)
                .await
            {
                Ok(LeaseState::Held) => {
                    *s.gc_renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked_boot);
                    s.gc_expires
                        .store(asked_at + s.timing.lease_ms, Ordering::SeqCst);
                    if !s.gc_held.swap(true, Ordering::SeqCst) {
                        *s.gc_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked);
                        tracing::info!(replica = %s.me, "took the garbage collector's lease");
                    }
                    *s.gc_holder.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.me.clone());
                }
                Ok(LeaseState::Busy { holder, .. }) => {
                    if s.gc_held.swap(false, Ordering::SeqCst) {
                        tracing::warn!(holder = %holder, "lost the garbage collector's lease");
                    }
                    *s.gc_holder.lock().unwrap_or_else(|p| p.into_inner()) = Some(holder);
                }
                Err(e) => return Err(e),
            }
            // Who else is alive (for the status page; the collector asks again before it
            // decides how long to wait).
            if let Err(e) = s.others_alive().await {
                tracing::debug!(error = %e, "listing replicas failed");
            }
            Ok(())
        })
        .await
    }

    /// Whether this replica may collect now: it holds the lease and renewed it recently enough
    /// that no other replica can have taken it.
    pub fn holds_gc(&self) -> bool {
        if !self.gc_held.load(Ordering::SeqCst) {
            return false;
        }
        let renewed = *self.gc_renewed.lock().unwrap_or_else(|p| p.into_inner());
        let limit = self.timing.lease_ms * 2 / 3;
        // Two clocks, neither of which stands still while the machine is suspended or its
        // process paused: boot time since the renewal was asked for, and the service's clock
        // against the lease's expiry (a wall clock stepped back is caught by the first).
        let left = self.gc_expires.load(Ordering::SeqCst) - self.service_now();
        let fresh = renewed.is_some_and(|t| crate::clock::boot_ms() - t < limit)
            && left > self.timing.lease_ms / 3;
        if !fresh {
            self.gc_held.store(false, Ordering::SeqCst);
            tracing::warn!(
                "the garbage collector's lease was not renewed in time; collection stops"
            );
        }
        fresh
    }

    /// A clean stop: the lease and heartbeat go, so another replica takes over at once.
    pub async fn leave(self: &Arc<Self>) {
        let r = self
            .on_s3(|s| async move {
                let _ = s.flush_access().await;
                if s.gc_held.swap(false, Ordering::SeqCst) {
                    s.bucket
                        .release_lease_at(&s.key("lease/gc"), &s.gc_etag)
                        .await;
                }
                s.bucket
                    .delete_key(&s.key(&format!("replicas/{}", replica_key(&s.me))))
                    .await
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "leaving the bucket cleanly failed");
        }
    }

    /// Other replicas that said they are alive lately.
    async fn others_alive(&self) -> Result<u64> {
        let listed = self.bucket.list_objects("replicas/").await?;
        let now = self.now();
        let window = i64::try_from(self.timing.heartbeat.as_millis() * 3).unwrap_or(30_000) + 5_000;
        let mine = format!("replicas/{}", replica_key(&self.me));
        let n = listed
            .iter()
            .filter(|l| l.key != mine && now - l.modified <= window)
            .count() as u64;
        self.stats.live_replicas.store(n + 1, Ordering::Relaxed);
        Ok(n)
    }

    // ----- revalidation --------------------------------------------------------------------

    /// Re-lists the bucket and brings the cache in line with it (what other replicas pushed,
    /// deleted, moved). Returns how many cache records changed.
    pub async fn refresh(self: &Arc<Self>) -> Result<usize> {
        self.on_s3(|s| async move { s.refresh_().await.map(|(n, _)| n) })
            .await
    }

    /// Also returns each listed blob's last-modified time: a collection planned on this listing
    /// spares a blob whose object is not the one listed any more.
    async fn refresh_(self: &Arc<Self>) -> Result<(usize, Listing)> {
        let started = Instant::now();
        self.stats.refreshing.store(true, Ordering::Relaxed);
        // Records before blobs: whatever a listed link names was in the bucket before it.
        let r = async {
            let repos = self.bucket.list_objects("repos/").await?;
            let blobs = self.bucket.list_objects("blobs/").await?;
            let objects = repos.len() + blobs.len();
            let blobs: DigestMap<(u64, Millis)> = blobs
                .into_iter()
                .filter_map(|l| Some((blob_digest(&l.key)?, (l.size, l.modified))))
                .collect();
            let listed: DigestMap<Millis> = blobs.iter().map(|(d, (_, m))| (*d, *m)).collect();
            let n = self
                .reconcile(None, started, group_repos(&repos, None), Some(blobs))
                .await?;
            if self.gc_held.load(Ordering::SeqCst) {
                self.remove_dangling_links(&repos).await?;
            }
            Ok::<_, Error>((n, objects, listed))
        }
        .await;
        self.stats.refreshing.store(false, Ordering::Relaxed);
        let (n, objects, listed) = r?;
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_refresh_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.stats
            .last_refresh_objects
            .store(objects as u64, Ordering::Relaxed);
        if n > 0 {
            tracing::debug!(changes = n, objects, "cache revalidated from the bucket");
        }
        Ok((
            n,
            Listing {
                began: started,
                blobs: listed,
            },
        ))
    }

    /// Re-lists one repository (before answering its tag list or referrers, or deleting in it).
    pub async fn refresh_repo(self: &Arc<Self>, repo: &str) -> Result<()> {
        let repo = repo.to_owned();
        self.on_s3(move |s| async move {
            let started = Instant::now();
            let listed = s.bucket.list_objects(&format!("repos/{repo}/_")).await?;
            s.reconcile(
                Some(&repo),
                started,
                group_repos(&listed, Some(&repo)),
                None,
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Brings the cache in line with a listing of `repos/` (one repository's, or all) and, for
    /// a full refresh, of `blobs/`. Entries this replica changed since `started` are left alone.
    async fn reconcile(
        self: &Arc<Self>,
        scope: Option<&str>,
        started: Instant,
        repos: BTreeMap<String, RepoList>,
        blobs: Option<DigestMap<(u64, Millis)>>,
    ) -> Result<usize> {
        // Each tag's ETag as listed: a tag read after the listing whose ETag is another was
        // written after the listing began, and is learned as of its read (a plan made on this
        // listing never deletes a tag by an ETag the listing did not show).
        let listed_etags: HashMap<(String, String), String> = repos
            .iter()
            .flat_map(|(repo, l)| {
                l.tags
                    .iter()
                    .map(move |(t, li)| ((repo.clone(), t.clone()), li.etag.clone()))
            })
            .collect();
        // What the listing names that the cache cannot fill in by itself.
        let mut need_records = Vec::new();
        let mut need_tags = Vec::new();
        let mut need_links = Vec::new();
        {
            let st = self.index.read();
            let etags = self.etags.lock().unwrap_or_else(|p| p.into_inner());
            for (repo, l) in &repos {
                let r = st.repos.get(repo);
                for d in l.manifests.keys() {
                    if !r.is_some_and(|r| r.manifests.contains_key(d)) {
                        need_records.push((repo.clone(), *d));
                    }
                }
                for (t, li) in &l.tags {
                    // Read again unless the ETag is the one last seen and the cache holds the
                    // digest it had then.
                    let seen = etags.get(&(repo.clone(), t.clone()));
                    let in_cache = r.and_then(|r| r.tags.get(t));
                    let current =
                        seen.is_some_and(|(e, d, _)| *e == li.etag && in_cache == Some(d));
                    if !current {
                        need_tags.push((repo.clone(), t.clone()));
                    }
                }
                if blobs.is_none() {
                    for d in l.links.keys() {
                        if !st.blobs.contains_key(d) {
                            need_links.push((repo.clone(), *d));
                        }
                    }
                }
            }
        }
        let mut records: HashMap<(String, Digest), Option<ManifestMeta>> = self
            .each(need_records, |s, (repo, d)| async move {
                s.fetch_record(&repo, d).await
            })
            .await?
            .into_iter()
            .collect();
        let tags: HashMap<(String, String), Option<ReadTag>> = self
            .each(need_tags, |s, (repo, tag)| async move {
                let key = s.key(&tag_key(&repo, &tag));
                match s.bucket.fetch(&key).await? {
                    Some(f) => Ok(Some((
                        parse::<TagValue>(&key, &f.body)?,
                        f.etag,
                        Instant::now(),
                    ))),
                    None => Ok(None),
                }
            })
            .await?
            .into_iter()
            .collect();
        // A tag whose manifest this listing did not show (pushed while it ran) or the cache
        // lacks: the record is read too, so no listed tag is left out of the cache (a plan that
        // missed a tag could collect what it reaches).
        let extra: Vec<(String, Digest)> = {
            let st = self.index.read();
            tags.iter()
                .filter_map(|((repo, _), v)| Some((repo.clone(), v.as_ref()?.0.digest)))
                .filter(|(repo, d)| {
                    !records.contains_key(&(repo.clone(), *d))
                        && !st
                            .repos
                            .get(repo)
                            .is_some_and(|r| r.manifests.contains_key(d))
                })
                .collect::<HashSet<_>>()
                .into_iter()
                .collect()
        };
        let extra: Vec<(String, Digest)> = self
            .each(extra, |s, (repo, d)| async move {
                s.fetch_record(&repo, d).await
            })
            .await?
            .into_iter()
            .filter_map(|(k, meta)| {
                let meta = meta?;
                records.insert(k.clone(), Some(meta));
                Some(k)
            })
            .collect();
        let link_sizes: DigestMap<u64> = self
            .each(need_links, |s, (repo, d)| async move {
                let key = s.key(&link_key(&repo, &d));
                match s.bucket.fetch(&key).await? {
                    Some(f) => Ok(Some(parse::<LinkObject>(&key, &f.body)?.size)),
                    None => Ok(None),
                }
            })
            .await?
            .into_iter()
            .filter_map(|((_, d), size)| Some((d, size?)))
            .collect();

        let now = self.now();
        let recent = self.recent_since(started);
        let mut changed = 0;
        // Held to the commit: listings are applied in the order they began, per repository.
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if applied.full.is_some_and(|t| t > started) {
            return Ok(0);
        }
        let stale: HashSet<String> = applied
            .repos
            .iter()
            .filter(|(_, t)| **t > started)
            .map(|(r, _)| r.clone())
            .collect();
        if scope.is_some_and(|r| stale.contains(r)) {
            return Ok(0);
        }
        let repos: BTreeMap<String, RepoList> = repos
            .into_iter()
            .filter(|(r, _)| !stale.contains(r))
            .collect();
        self.index.commit_if(|st| {
            let mut adds = Vec::new();
            let mut tag_removes = Vec::new();
            let mut manifest_removes = Vec::new();
            let mut unlinks: HashSet<(String, Digest)> = HashSet::new();
            let mut blob_removes = Vec::new();
            let mut added_blobs = DigestSet::default();
            let mut gone_blobs = DigestSet::default();
            if let Some(b) = &blobs {
                for (d, (size, modified)) in b {
                    if let Some(m) = st.blobs.get(d) {
                        // Written again (a push of a blob already there) since seen.
                        let at = (*modified).min(now);
                        if at > m.access.get() + LISTED_TIME_SLACK_MS {
                            adds.push(Op::BlobTouched { digest: *d, at });
                        }
                        continue;
                    }
                    if !recent.contains(&Key::Blob(*d)) {
                        adds.push(Op::BlobAdded {
                            digest: *d,
                            size: *size,
                            at: (*modified).min(now),
                        });
                        added_blobs.insert(*d);
                    }
                }
                for d in st.blobs.keys() {
                    if !b.contains_key(d) && !recent.contains(&Key::Blob(*d)) {
                        gone_blobs.insert(*d);
                    }
                }
            }
            let size_of = |d: &Digest| -> Option<u64> {
                if gone_blobs.contains(d) {
                    return None;
                }
                blobs
                    .as_ref()
                    .and_then(|b| b.get(d).map(|x| x.0))
                    .or_else(|| st.blobs.get(d).map(|m| m.size))
                    .or_else(|| link_sizes.get(d).copied())
            };
            // Records read for tags that name them (see `extra` above).
            for (repo, d) in &extra {
                let r = st.repos.get(repo);
                if r.is_some_and(|r| r.manifests.contains_key(d))
                    || recent.contains(&Key::Manifest(repo.clone(), *d))
                    || gone_blobs.contains(d)
                {
                    continue;
                }
                let Some(Some(meta)) = records.get(&(repo.clone(), *d)) else {
                    continue;
                };
                if repos.get(repo).is_some_and(|l| l.manifests.contains_key(d)) {
                    continue; // added with the listed manifests
                }
                if !st.blobs.contains_key(d) && added_blobs.insert(*d) {
                    adds.push(Op::BlobAdded {
                        digest: *d,
                        size: meta.size,
                        at: meta.pushed,
                    });
                }
                adds.push(Op::ManifestPut {
                    repo: repo.clone(),
                    digest: *d,
                    meta: meta.clone(),
                });
            }
            for (repo, l) in &repos {
                let r = st.repos.get(repo);
                for (d, li) in &l.links {
                    if recent.contains(&Key::Link(repo.clone(), *d)) {
                        continue;
                    }
                    // A link whose blob is gone is not offered (the collector removes it).
                    let Some(size) = size_of(d) else { continue };
                    if !st.blobs.contains_key(d) && added_blobs.insert(*d) {
                        adds.push(Op::BlobAdded {
                            digest: *d,
                            size,
                            at: li.modified.min(now),
                        });
                    }
                    if !r.is_some_and(|r| r.blobs.contains(d)) {
                        adds.push(Op::Link {
                            repo: repo.clone(),
                            digest: *d,
                        });
                    }
                }
                for (d, li) in &l.manifests {
                    if let Some(m) = r.and_then(|r| r.manifests.get(d)) {
                        // Pushed again (through any replica) since the cache saw it: as young
                        // as that push, and, as a push here would make it, a new claim that
                        // keeps its orphan grace until a tag or an index reaches it again (an
                        // index's child manifests are pushed just before the index).
                        let at = li.modified.min(now);
                        if at > m.pushed + LISTED_TIME_SLACK_MS
                            && !recent.contains(&Key::Manifest(repo.clone(), *d))
                        {
                            let mut meta = m.clone();
                            meta.pushed = at;
                            // (One a tag names now stays rooted: it is superseded once the tag
                            // moves on.)
                            meta.rooted = r.is_some_and(|r| r.tags.values().any(|t| t == d));
                            meta.access.set_at_least(at);
                            adds.push(Op::ManifestPut {
                                repo: repo.clone(),
                                digest: *d,
                                meta,
                            });
                            continue;
                        }
                        if at > m.access.get() + LISTED_TIME_SLACK_MS {
                            adds.push(Op::ManifestTouched {
                                repo: repo.clone(),
                                digest: *d,
                                at,
                            });
                        }
                        continue;
                    }
                    if recent.contains(&Key::Manifest(repo.clone(), *d)) {
                        continue;
                    }
                    let Some(Some(meta)) = records.get(&(repo.clone(), *d)) else {
                        continue;
                    };
                    if gone_blobs.contains(d) {
                        continue;
                    }
                    if !st.blobs.contains_key(d) && added_blobs.insert(*d) {
                        adds.push(Op::BlobAdded {
                            digest: *d,
                            size: meta.size,
                            at: li.modified.min(now),
                        });
                    }
                    adds.push(Op::ManifestPut {
                        repo: repo.clone(),
                        digest: *d,
                        meta: meta.clone(),
                    });
                }
                for t in l.tags.keys() {
                    if recent.contains(&Key::Tag(repo.clone(), t.clone())) {
                        continue;
                    }
                    let Some(Some((v, _, _))) = tags.get(&(repo.clone(), t.clone())) else {
                        continue;
                    };
                    let there = r.is_some_and(|r| r.manifests.contains_key(&v.digest))
                        || records
                            .get(&(repo.clone(), v.digest))
                            .is_some_and(|m| m.is_some());
                    if there && r.and_then(|r| r.tags.get(t)) != Some(&v.digest) {
                        adds.push(Op::TagSet {
                            repo: repo.clone(),
                            tag: t.clone(),
                            digest: v.digest,
                            at: 0,
                        });
                    }
                }
            }
            // What the cache holds and the bucket no longer does.
            for (name, r) in &st.repos {
                if scope.is_some_and(|s| s != name) || stale.contains(name) {
                    continue;
                }
                let listed = repos.get(name);
                for t in r.tags.keys() {
                    let there = listed.is_some_and(|l| l.tags.contains_key(t));
                    if !there && !recent.contains(&Key::Tag(name.clone(), t.clone())) {
                        tag_removes.push(Op::TagDeleted {
                            repo: name.clone(),
                            tag: t.clone(),
                        });
                    }
                }
                for d in r.manifests.keys() {
                    let there = listed.is_some_and(|l| l.manifests.contains_key(d));
                    if !there && !recent.contains(&Key::Manifest(name.clone(), *d)) {
                        manifest_removes.push(Op::ManifestDeleted {
                            repo: name.clone(),
                            digest: *d,
                        });
                    }
                }
                for d in &r.blobs {
                    let there = listed.is_some_and(|l| l.links.contains_key(d));
                    if (!there || gone_blobs.contains(d))
                        && !recent.contains(&Key::Link(name.clone(), *d))
                    {
                        unlinks.insert((name.clone(), *d));
                    }
                }
            }
            for d in &gone_blobs {
                blob_removes.push(Op::BlobRemoved { digest: *d });
            }
            let mut ops = adds;
            ops.extend(tag_removes);
            ops.extend(manifest_removes);
            ops.extend(
                unlinks
                    .into_iter()
                    .map(|(repo, digest)| Op::Unlink { repo, digest }),
            );
            ops.extend(blob_removes);
            changed = ops.len();
            Ok(ops)
        })?;
        match scope {
            None => {
                applied.full = Some(started);
                applied.repos.retain(|_, t| *t > started);
            }
            Some(r) => {
                let t = applied.repos.entry(r.to_owned()).or_insert(started);
                *t = (*t).max(started);
            }
        }
        drop(applied);
        for (k, v) in tags {
            let asked = match &v {
                Some((_, etag, read)) if listed_etags.get(&k) != Some(etag) => *read,
                _ => started,
            };
            self.learn_etag(k, v.map(|(v, etag, _)| (etag, v.digest)), asked);
        }
        Ok(changed)
    }

    /// The collector removes link objects whose blob is gone (a collection that stopped half
    /// way leaves them), once they are old enough not to be an upload racing the listing.
    async fn remove_dangling_links(self: &Arc<Self>, repos: &[Listed]) -> Result<()> {
        let now = self.now();
        let dangling: Vec<String> = {
            let st = self.index.read();
            repos
                .iter()
                .filter(|l| now - l.modified > DANGLING_LINK_MS)
                .filter(|l| {
                    l.key
                        .strip_prefix("repos/")
                        .and_then(parse_repo_key)
                        .is_some_and(
                            |(_, e)| matches!(e, Entry::Link(d) if !st.blobs.contains_key(&d)),
                        )
                })
                .map(|l| self.key(&l.key))
                .collect()
        };
        if !dangling.is_empty() {
            tracing::info!(
                links = dangling.len(),
                "removing links to blobs that are gone"
            );
            self.bucket.delete_keys(&dangling).await?;
        }
        Ok(())
    }

    /// Runs `f` over `items`, `FETCH_PARALLEL` at a time.
    async fn each<I, T, F, Fut>(self: &Arc<Self>, items: Vec<I>, f: F) -> Result<Vec<(I, T)>>
    where
        I: Clone + Send + 'static,
        T: Send + 'static,
        F: Fn(Arc<Shared>, I) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let mut out = Vec::with_capacity(items.len());
        let mut set = tokio::task::JoinSet::new();
        let mut it = items.into_iter();
        loop {
            while set.len() < FETCH_PARALLEL {
                let Some(i) = it.next() else { break };
                let fut = f(self.clone(), i.clone());
                set.spawn(async move { (i, fut.await) });
            }
            match set.join_next().await {
                Some(Ok((i, r))) => out.push((i, r?)),
                Some(Err(e)) => return Err(Error::internal(format!("S3 task failed: {e}"))),
                None => return Ok(out),
            }
        }
    }

    // ----- the collector ------------------------------------------------------------------

    /// Before a plan: the cache revalidated and every replica's reads folded in. Returns each
    /// blob's last-modified time as listed (what a sweep of this plan compares with).
    pub async fn prepare_collection(self: &Arc<Self>) -> Result<Listing> {
        self.on_s3(|s| async move {
            let (_, listed) = s.refresh_().await?;
            s.merge_access_().await?;
            Ok(listed)
        })
        .await
    }

    /// Each tag's ETag as the plan saw it: taken while the plan's state is still held, and only
    /// where the ETag last read belongs to the digest that state has (else `None`: the tag
    /// changed under the plan).
    /// `listed`: when the listing the plan was made on began (an ETag learned after it, from
    /// a push here or a read of a tag pushed again, is not the one the plan saw).
    pub fn tag_etags(
        &self,
        state: &crate::lifecycle::index::State,
        tags: &[(String, String)],
        listed: Instant,
    ) -> Vec<Option<String>> {
        let e = self.etags.lock().unwrap_or_else(|p| p.into_inner());
        tags.iter()
            .map(|(repo, tag)| {
                let planned = state.repos.get(repo).and_then(|r| r.tags.get(tag))?;
                match e.get(&(repo.clone(), tag.clone())) {
                    Some((etag, d, learned))
                        if d == planned && !etag.is_empty() && *learned <= listed =>
                    {
                        Some(etag.clone())
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Records what a read that began at `asked` saw of a tag (`None`: no such tag), unless
    /// something newer was learned meanwhile; the same ETag again keeps its first time.
    fn learn_etag(&self, k: (String, String), seen: Option<(String, Digest)>, asked: Instant) {
        let mut e = self.etags.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((etag, d, learned)) = e.get(&k) {
            if *learned > asked {
                return;
            }
            if seen.as_ref().is_some_and(|(se, sd)| se == etag && sd == d) {
                return;
            }
        }
        match seen {
            Some((etag, d)) => {
                e.insert(k, (etag, d, asked));
            }
            None => {
                e.remove(&k);
            }
        }
    }

    /// The first step of carrying out a plan: its tags, each deleted only if unchanged since
    /// the plan read it (`If-Match` on the ETag the plan saw). `intact` is false when one was
    /// pushed again meanwhile (what it reaches is then planned anew, not deleted now).
    pub async fn delete_tags(
        self: &Arc<Self>,
        tags: Vec<((String, String), Option<String>)>,
    ) -> Result<(HashSet<(String, String)>, bool)> {
        self.on_s3(move |s| async move {
            let mut done = HashSet::new();
            let mut intact = true;
            for ((repo, tag), etag) in tags {
                if !s.holds_gc() {
                    return Ok((done, false));
                }
                let Some(etag) = etag else {
                    intact = false;
                    continue;
                };
                match s
                    .bucket
                    .delete_if(&s.key(&tag_key(&repo, &tag)), &etag)
                    .await
                {
                    Ok(()) => {
                        s.etags
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&(repo.clone(), tag.clone()));
                        s.mark([Key::Tag(repo.clone(), tag.clone())]);
                        done.insert((repo, tag));
                    }
                    // Pushed again since the plan: it stays.
                    Err(e) if e.kind == ErrorKind::Conflict => intact = false,
                    Err(e) => return Err(e),
                }
            }
            Ok((done, intact))
        })
        .await
    }

    /// Announces what a collection will delete (`doomed/`, pending); from now on this replica
    /// offers none of it, and the others stop within a `poll`. Returns the announcement's key
    /// and time (service clock).
    pub async fn announce(
        self: &Arc<Self>,
        manifests: Vec<(String, Digest)>,
        blobs: Vec<Digest>,
    ) -> Result<(String, Millis)> {
        self.on_s3(move |s| async move {
            let at = s.now();
            let key = format!("doomed/{:013}-{}", at.max(0), random_suffix());
            let record = DoomRecord {
                holder: s.me.clone(),
                at,
                done: false,
                manifests,
                blobs,
            };
            // Active before it exists: `close_abandoned` never closes it under the sweep.
            s.active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), None);
            if let Err(e) = s.bucket.put(&s.key(&key), json(&record), Cond::None).await {
                s.active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                return Err(e);
            }
            let mut g = s.doomed.write().unwrap_or_else(|p| p.into_inner());
            g.records.insert(key.clone(), record);
            g.rebuild();
            Ok((key, at))
        })
        .await
    }

    /// After an announcement: while other replicas are alive, `delete_delay` for them to hear
    /// it and ship the reads that may spare some of it.
    pub async fn settle(self: &Arc<Self>) -> Result<()> {
        self.on_s3(|s| async move {
            if s.others_alive().await? > 0 {
                tokio::time::sleep(s.timing.delete_delay).await;
            }
            s.pause("gc-after-announce").await;
            Ok(())
        })
        .await
    }

    /// Deletes what an announcement named and the re-check kept (records, then blobs, then
    /// their links; a blob written again since the announcement stays), then marks the
    /// announcement done with what went, so every replica's cache drops exactly that.
    /// `listed`: each blob's last-modified time in the listing the second plan was made on.
    pub async fn sweep(
        self: &Arc<Self>,
        key: String,
        manifests: Vec<(String, Digest)>,
        blobs: Vec<Digest>,
        announced: Millis,
        listed: DigestMap<Millis>,
    ) -> Result<Carried> {
        self.on_s3(move |s| async move {
            let c = match s.sweep_(&manifests, &blobs, &listed).await {
                Ok(c) => c,
                Err(e) => {
                    // Failed half way: deletes may still be in flight, so the announcement
                    // stays pending until no request of this sweep can land any more.
                    s.active
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, Some(Instant::now() + s.timing.in_flight));
                    return Err(e);
                }
            };
            let record = DoomRecord {
                holder: s.me.clone(),
                at: announced,
                done: true,
                manifests: c.manifests.iter().cloned().collect(),
                blobs: c.blobs.iter().copied().collect(),
            };
            let closed = s.bucket.put(&s.key(&key), json(&record), Cond::None).await;
            // Every delete is over: from now on `close_abandoned` may close it (it does when
            // the record above was not written).
            s.active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            closed?;
            let mut g = s.doomed.write().unwrap_or_else(|p| p.into_inner());
            g.records.insert(key.clone(), record);
            g.applied.insert(key);
            g.rebuild();
            Ok(c)
        })
        .await
    }

    async fn sweep_(
        self: &Arc<Self>,
        manifests: &[(String, Digest)],
        blobs: &[Digest],
        listed: &DigestMap<Millis>,
    ) -> Result<Carried> {
        let mut done = Carried::default();
        let lost = || {
            Error::new(
                ErrorKind::Unavailable,
                "the collector's lease was lost mid-sweep",
            )
        };
        if !self.holds_gc() {
            return Err(lost());
        }
        let keys: Vec<String> = manifests
            .iter()
            .map(|(repo, d)| self.key(&manifest_key(repo, d)))
            .collect();
        self.bucket.delete_keys(&keys).await?;
        done.manifests.extend(manifests.iter().cloned());
        let links: DigestMap<Vec<String>> = {
            let st = self.index.read();
            let mut m: DigestMap<Vec<String>> = DigestMap::default();
            for (name, r) in &st.repos {
                for d in blobs {
                    if r.blobs.contains(d) {
                        m.entry(*d).or_default().push(name.clone());
                    }
                }
            }
            m
        };
        let listed = listed.clone();
        let gone = self
            .each(blobs.to_vec(), move |s, d| {
                let seen = listed.get(&d).copied();
                async move {
                    let key = s.key(&blob_key(&d));
                    if let Some((_, modified)) = s.bucket.stat(&key).await? {
                        // Pushed again since the listing the plan was made on (its object is not
                        // the one listed): it stays. Compared in whole seconds: a HEAD's
                        // Last-Modified has no more, while some services list milliseconds.
                        if seen.map(|t| t.div_euclid(1000)) != Some(modified.div_euclid(1000)) {
                            return Ok(false);
                        }
                        if !s.holds_gc() {
                            return Err(Error::new(
                                ErrorKind::Unavailable,
                                "the collector's lease was lost mid-sweep",
                            ));
                        }
                        s.bucket.delete_key(&key).await?;
                    }
                    Ok(true)
                }
            })
            .await?;
        let mut link_keys = Vec::new();
        for (d, went) in gone {
            if went {
                for repo in links.get(&d).into_iter().flatten() {
                    link_keys.push(self.key(&link_key(repo, &d)));
                }
                done.blobs.insert(d);
            } else {
                self.stats.rescued.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !self.holds_gc() {
            return Err(lost());
        }
        self.bucket.delete_keys(&link_keys).await?;
        Ok(done)
    }

    /// Counts content a collection spared at its re-check.
    pub fn note_spared(&self, n: usize) {
        if n > 0 {
            self.stats.rescued.fetch_add(n as u64, Ordering::Relaxed);
            tracing::info!(
                spared = n,
                "a collection spared content pushed, claimed or read since it was planned"
            );
        }
    }

    /// Every digest a live claim names: pushes between their claim and their commit.
    pub async fn claimed(self: &Arc<Self>) -> Result<DigestSet> {
        self.on_s3(|s| async move { s.claimed_().await }).await
    }

    async fn claimed_(self: &Arc<Self>) -> Result<DigestSet> {
        let listed = self.bucket.list_objects("claims/").await?;
        let fresh: Vec<String> = {
            let c = self.claims.lock().unwrap_or_else(|p| p.into_inner());
            listed
                .iter()
                .filter(|l| !c.contains_key(&l.key))
                .map(|l| l.key.clone())
                .collect()
        };
        let got = self
            .each(fresh, |s, k| async move {
                let key = s.key(&k);
                match s.bucket.fetch(&key).await? {
                    Some(f) => Ok(parse::<ClaimObject>(&key, &f.body)?.digests),
                    None => Ok(Vec::new()),
                }
            })
            .await?;
        let mut c = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        let present: HashSet<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        c.retain(|k, _| present.contains(k.as_str()));
        c.extend(got);
        Ok(c.values().flatten().copied().collect())
    }

    /// Removes claims older than the claim window (their pushes committed or gave up long ago;
    /// a pusher removes its own claim once committed) and finished announcements everyone has
    /// had time to hear.
    pub async fn tidy(self: &Arc<Self>, planned_at: Millis) -> Result<()> {
        self.on_s3(move |s| async move { s.tidy_(planned_at).await })
            .await
    }

    async fn tidy_(self: &Arc<Self>, planned_at: Millis) -> Result<()> {
        let window = i64::try_from(CLAIM_WINDOW.as_millis()).unwrap_or(600_000);
        let old_claims: Vec<String> = self
            .bucket
            .list_objects("claims/")
            .await?
            .into_iter()
            .filter(|l| l.modified < planned_at - window)
            .map(|l| self.key(&l.key))
            .collect();
        self.bucket.delete_keys(&old_claims).await?;
        let now = self.now();
        let old_done: Vec<String> = {
            let g = self.doomed.read().unwrap_or_else(|p| p.into_inner());
            g.records
                .iter()
                .filter(|(_, r)| r.done && now - r.at > DONE_KEPT_MS)
                .map(|(k, _)| self.key(k))
                .collect()
        };
        self.bucket.delete_keys(&old_done).await?;
        Ok(())
    }

    /// Announcements left pending and never finished (their collector died, lost its lease,
    /// or failed half way): once no delete of theirs can still be in flight, the current
    /// collector closes them (deleting nothing; every replica re-lists).
    pub async fn close_abandoned(self: &Arc<Self>) -> Result<()> {
        self.on_s3(|s| async move {
            s.poll_doomed_().await?;
            let Some(now) = s.collector_now() else {
                return Ok(());
            };
            let limit = s.timing.lease_ms * 2;
            // Another holder's deletes are over once this replica has held the lease for as
            // long as a request sent before it took over can still land.
            let others_over = s.holds_gc()
                && s
                    .gc_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some_and(|t| t.elapsed() >= s.timing.in_flight);
            let active = s.active.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let closable = |k: &String| match active.get(k) {
                None => true,
                Some(None) => false,
                Some(Some(after)) => Instant::now() >= *after,
            };
            let stale: Vec<(String, DoomRecord)> = {
                let g = s.doomed.read().unwrap_or_else(|p| p.into_inner());
                g.records
                    .iter()
                    .filter(|(k, r)| !r.done && closable(k))
                    // This replica's own: one whose sweep failed, once its requests are over,
                    // or one left by an earlier run (the data directory's lock says that run
                    // is over, and its requests with it). Another's: past its holder's lease.
                    .filter(|(_, r)| r.holder == s.me || (others_over && now - r.at > limit))
                    .map(|(k, r)| (k.clone(), r.clone()))
                    .collect()
            };
            for (k, mut r) in stale {
                if r.holder != s.me && !s.holds_gc() {
                    continue;
                }
                tracing::warn!(announcement = %k, holder = %r.holder, "closing a collection that was never finished");
                r.done = true;
                r.manifests.clear();
                r.blobs.clear();
                s.bucket.put(&s.key(&k), json(&r), Cond::None).await?;
                s.active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&k);
            }
            s.poll_doomed_().await
        })
        .await
    }
}

/// Writes an image into `bucket` object by object, as pushes through replicas would leave it
/// (blobs, links, the manifest's bytes and record, its tag, the catalog entry), without a
/// replica: how `hoard bench-fill-s3` builds a large bucket quickly.
pub async fn seed_image(
    bucket: &Bucket,
    repo: &str,
    tag: &str,
    layers: Vec<Bytes>,
) -> Result<usize> {
    let mut descriptors = Vec::new();
    let mut children = Vec::new();
    let mut writes = 0;
    for data in layers {
        let d = Digest::of(crate::digest::Algorithm::Sha256, &data);
        let size = data.len() as u64;
        bucket
            .put(&bucket.key(&blob_key(&d)), data, Cond::None)
            .await?;
        bucket
            .put(
                &bucket.key(&link_key(repo, &d)),
                json(&LinkObject { size }),
                Cond::None,
            )
            .await?;
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d.to_string(),
            "size": size,
        }));
        children.push(d);
        writes += 2;
    }
    let media_type = "application/vnd.oci.image.manifest.v1+json";
    let manifest = Bytes::from(
        serde_json::json!({"schemaVersion": 2, "mediaType": media_type, "layers": descriptors})
            .to_string(),
    );
    let md = Digest::of(crate::digest::Algorithm::Sha256, &manifest);
    let size = manifest.len() as u64;
    bucket
        .put(&bucket.key(&blob_key(&md)), manifest, Cond::None)
        .await?;
    bucket
        .put(
            &bucket.key(&link_key(repo, &md)),
            json(&LinkObject { size }),
            Cond::None,
        )
        .await?;
    let record = ManifestRecord {
        size,
        media_type: media_type.into(),
        subject: None,
        artifact_type: None,
        annotations: None,
        children,
    };
    bucket
        .put(
            &bucket.key(&manifest_key(repo, &md)),
            json(&record),
            Cond::None,
        )
        .await?;
    let mut tag_value = TagValue::new(md, size, media_type.into());
    tag_value.write = random_suffix();
    bucket
        .put(
            &bucket.key(&tag_key(repo, tag)),
            json(&tag_value),
            Cond::None,
        )
        .await?;
    bucket
        .put(
            &bucket.key(&format!("catalog/{repo}")),
            Bytes::new(),
            Cond::None,
        )
        .await?;
    Ok(writes + 5)
}

/// `repos/` listing entries grouped by repository (only `only`'s, when given).
#[derive(Default)]
struct RepoList {
    links: DigestMap<Listed>,
    manifests: DigestMap<Listed>,
    tags: HashMap<String, Listed>,
}

fn group_repos(listed: &[Listed], only: Option<&str>) -> BTreeMap<String, RepoList> {
    let mut out: BTreeMap<String, RepoList> = BTreeMap::new();
    for l in listed {
        let Some((repo, entry)) = l.key.strip_prefix("repos/").and_then(parse_repo_key) else {
            continue;
        };
        if only.is_some_and(|o| o != repo) {
            continue;
        }
        let r = out.entry(repo.to_owned()).or_default();
        match entry {
            Entry::Tag(t) => {
                r.tags.insert(t, l.clone());
            }
            Entry::Manifest(d) => {
                r.manifests.insert(d, l.clone());
            }
            Entry::Link(d) => {
                r.links.insert(d, l.clone());
            }
        }
    }
    out
}

/// A replica's name as one key segment.
fn replica_key(me: &str) -> String {
    me.replace('/', "_")
}

fn rand_ms(max: u64) -> u64 {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    u64::from(u16::from_le_bytes(b)) % max.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_keys_parse_from_the_first_underscore_component() {
        let d = Digest::sha256_of(b"x");
        let hex = d.hex();
        assert_eq!(
            parse_repo_key("team/app/_tags/v1"),
            Some(("team/app", Entry::Tag("v1".into())))
        );
        assert_eq!(
            parse_repo_key(&format!("a/manifests/_manifests/sha256/{hex}")),
            Some(("a/manifests", Entry::Manifest(d)))
        );
        assert_eq!(
            parse_repo_key(&format!("x/_links/sha256/{hex}")),
            Some(("x", Entry::Link(d)))
        );
        assert_eq!(parse_repo_key("x/_links/sha256/nothex"), None);
        assert_eq!(parse_repo_key("x/_other/y"), None);
        assert_eq!(parse_repo_key("_tags/v1"), None);
        assert_eq!(blob_digest(&blob_key(&d)), Some(d));
        assert_eq!(
            link_key("a/b", &d),
            format!("repos/a/b/_links/sha256/{hex}")
        );
    }
}
