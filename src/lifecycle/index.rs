//! The index: which blobs the store holds (size, times), which repositories see them, manifests
//! with the children they pin, and tags. Held in memory, changed only through journaled `Op`s,
//! so a restart replays the journal instead of scanning the blob tree.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use crate::clock::Millis;
use crate::digest::{Digest, DigestMap, DigestSet};
use crate::error::{Error, ErrorKind, Result};

use super::journal::Journal;
pub use super::journal::{ManifestMeta, Op, Stamp};

#[derive(Clone, Debug, PartialEq)]
pub struct BlobMeta {
    pub size: u64,
    pub added: Millis,
    /// Last push, mount, HEAD or read (cache time).
    pub access: Stamp,
}

#[derive(Default, Debug)]
pub struct Repo {
    /// Blobs pushed or mounted here: what `GET /v2/<repo>/blobs/<digest>` may serve.
    pub blobs: DigestSet,
    pub manifests: DigestMap<ManifestMeta>,
    /// Sorted, as tag listing wants them.
    pub tags: BTreeMap<String, Digest>,
}

impl Repo {
    /// Holds nothing: neither tags, manifests nor blobs (a name kept only so it stays known).
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty() && self.manifests.is_empty() && self.tags.is_empty()
    }

    /// A manifest of this repository that lists `d` as a child, described for an error
    /// message ("manifest sha256:… (tags: a, b)"); the smallest digest when several do.
    pub fn holder_of(&self, d: &Digest) -> Option<String> {
        let holder = self
            .manifests
            .iter()
            .filter(|(_, m)| m.children.contains(d))
            .map(|(md, _)| *md)
            .min()?;
        let tags: Vec<&str> = self
            .tags
            .iter()
            .filter(|(_, t)| **t == holder)
            .map(|(name, _)| name.as_str())
            .collect();
        Some(if tags.is_empty() {
            format!("manifest {holder} (untagged)")
        } else {
            format!("manifest {holder} (tags: {})", tags.join(", "))
        })
    }
}

#[derive(Default, Debug)]
pub struct State {
    pub blobs: DigestMap<BlobMeta>,
    pub repos: BTreeMap<String, Repo>,
    /// `BlobAdded` records (sequence number, digest), in order, that no `SyncPoint` covers yet:
    /// after an unclean stop these name the blobs whose bytes may not have reached the disk.
    /// (Removed blobs are skipped when read, not searched for when removed.)
    pub unsynced: VecDeque<(u64, Digest)>,
    /// Reference counts: for each digest, how many stored manifests (in any repository) list it
    /// as a child, plus one per repository holding it as a manifest. A blob at zero is reachable
    /// from no root; it lives only through its orphan grace period.
    pub refs: DigestMap<u32>,
    /// Stored blobs whose reference count is zero (what the orphan collector looks at). Not
    /// kept during replay (most blobs pass through it there); rebuilt once at the end.
    pub unreferenced: DigestSet,
    replaying: bool,
    /// Sum of stored blob sizes.
    pub total: u64,
    /// The latest cache time any record carries: where a restarted daemon's cache clock resumes.
    pub clock_floor: Millis,
}

impl State {
    /// Applies the record with sequence number `seq`.
    pub fn apply(&mut self, seq: u64, op: Op) {
        match op {
            Op::BlobAdded { digest, size, at } => {
                self.clock_floor = self.clock_floor.max(at);
                if let std::collections::hash_map::Entry::Vacant(e) = self.blobs.entry(digest) {
                    e.insert(BlobMeta {
                        size,
                        added: at,
                        access: Stamp::new(at),
                    });
                    self.total += size;
                    if !self.replaying && !self.refs.contains_key(&digest) {
                        self.unreferenced.insert(digest);
                    }
                }
                self.unsynced.push_back((seq, digest));
            }
            Op::BlobRemoved { digest } => {
                if let Some(m) = self.blobs.remove(&digest) {
                    self.total -= m.size;
                }
                self.unreferenced.remove(&digest);
            }
            Op::BlobTouched { digest, at } => {
                self.clock_floor = self.clock_floor.max(at);
                if let Some(m) = self.blobs.get(&digest) {
                    m.access.set_at_least(at);
                }
            }
            Op::ManifestTouched { repo, digest, at } => {
                self.clock_floor = self.clock_floor.max(at);
                if let Some(m) = self.repos.get(&repo).and_then(|r| r.manifests.get(&digest)) {
                    m.access.set_at_least(at);
                }
            }
            Op::ClockMark { at } => self.clock_floor = self.clock_floor.max(at),
            Op::Link { repo, digest } => {
                self.repos.entry(repo).or_default().blobs.insert(digest);
            }
            Op::Links { repo, digests } => {
                let r = self.repos.entry(repo).or_default();
                r.blobs.reserve(digests.len());
                r.blobs.extend(digests);
            }
            Op::Unlink { repo, digest } => {
                self.with_repo(&repo, |r| {
                    r.blobs.remove(&digest);
                });
            }
            Op::ManifestPut { repo, digest, meta } => {
                self.clock_floor = self.clock_floor.max(meta.pushed);
                self.add_refs(digest, &meta.children);
                let r = self.repos.entry(repo).or_default();
                // The child manifests it lists are reached now (see `ManifestMeta::rooted`).
                for c in &meta.children {
                    if let Some(child) = r.manifests.get_mut(c) {
                        child.rooted = true;
                    }
                }
                let old = r.manifests.insert(digest, meta);
                if let Some(old) = old {
                    // Same bytes stored again: count the refs once. A push is a new claim:
                    // it is rooted again only once a tag or an index reaches it again.
                    self.drop_refs(digest, &old.children);
                }
            }
            Op::ManifestDeleted { repo, digest } => {
                let mut gone = None;
                self.with_repo(&repo, |r| {
                    gone = r.manifests.remove(&digest);
                    r.tags.retain(|_, d| *d != digest);
                });
                if let Some(old) = gone {
                    self.drop_refs(digest, &old.children);
                }
            }
            Op::TagSet {
                repo,
                tag,
                digest,
                at,
            } => {
                self.clock_floor = self.clock_floor.max(at);
                let r = self.repos.entry(repo).or_default();
                if let Some(m) = r.manifests.get_mut(&digest) {
                    m.access.set_at_least(at);
                    m.rooted = true;
                }
                r.tags.insert(tag, digest);
            }
            Op::TagDeleted { repo, tag } => {
                self.with_repo(&repo, |r| {
                    r.tags.remove(&tag);
                });
            }
            Op::SyncPoint { upto } => {
                while self.unsynced.front().is_some_and(|(seq, _)| *seq < upto) {
                    self.unsynced.pop_front();
                }
            }
        }
    }

    fn add_refs(&mut self, manifest: Digest, children: &[Digest]) {
        for d in std::iter::once(&manifest).chain(children) {
            let n = self.refs.entry(*d).or_insert(0);
            *n += 1;
            if *n == 1 && !self.replaying {
                self.unreferenced.remove(d);
            }
        }
    }

    fn drop_refs(&mut self, manifest: Digest, children: &[Digest]) {
        for d in std::iter::once(&manifest).chain(children) {
            if let Some(n) = self.refs.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(d);
                    if !self.replaying && self.blobs.contains_key(d) {
                        self.unreferenced.insert(*d);
                    }
                }
            }
        }
    }

    /// Blobs still stored whose `BlobAdded` no `SyncPoint` covers.
    pub fn unsynced_set(&self) -> DigestSet {
        self.unsynced
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| self.blobs.contains_key(d))
            .collect()
    }

    /// Ends replay: derives what replay skipped.
    fn finish_replay(&mut self) {
        self.replaying = false;
        let unreferenced: DigestSet = self
            .blobs
            .keys()
            .filter(|d| !self.refs.contains_key(*d))
            .copied()
            .collect();
        self.unreferenced = unreferenced;
    }

    /// Applies `f` to a repository. A repository emptied by deletes, TTL or eviction stays
    /// known (as in distribution, whose repository directories outlive their content): its tag
    /// list answers `{"tags":[]}` whichever route emptied it, while the catalog lists only
    /// repositories that hold something. Only a name never pushed is `NAME_UNKNOWN`.
    fn with_repo(&mut self, repo: &str, f: impl FnOnce(&mut Repo)) {
        if let Some(r) = self.repos.get_mut(repo) {
            f(r);
        }
    }

    /// The smallest sequence of ops that rebuilds this state (the compacted journal): synced
    /// blobs, a `SyncPoint` vouching for them, blobs not yet synced, then repositories.
    pub fn snapshot_ops(&self) -> impl Iterator<Item = Op> + '_ {
        let added = |(d, m): (&Digest, &BlobMeta)| Op::BlobAdded {
            digest: *d,
            size: m.size,
            at: m.added,
        };
        let touched = self
            .blobs
            .iter()
            .filter(|(_, m)| m.access.get() > m.added)
            .map(|(d, m)| Op::BlobTouched {
                digest: *d,
                at: m.access.get(),
            });
        // Usually small (what the last group commit did not cover): one copy per filter.
        let unsynced_set = self.unsynced_set();
        let upto = (self.blobs.len() - unsynced_set.len()) as u64;
        let other = unsynced_set.clone();
        let synced = self
            .blobs
            .iter()
            .filter(move |(d, _)| !other.contains(*d))
            .map(added);
        let unsynced = self
            .blobs
            .iter()
            .filter(move |(d, _)| unsynced_set.contains(*d))
            .map(added);
        let blobs = synced
            .chain(std::iter::once(Op::SyncPoint { upto }))
            .chain(unsynced)
            .chain(touched);
        let repos = self.repos.iter().flat_map(|(name, r)| {
            // Links in batches: one record (and one repository lookup at replay) per 8192.
            let all: Vec<Digest> = r.blobs.iter().copied().collect();
            let mut links = all
                .chunks(8192)
                .map(|c| Op::Links {
                    repo: name.clone(),
                    digests: c.to_vec(),
                })
                .collect::<Vec<_>>();
            if links.is_empty() {
                // No links: an empty batch keeps the name known across compaction.
                links.push(Op::Links {
                    repo: name.clone(),
                    digests: Vec::new(),
                });
            }
            let manifests = r.manifests.iter().map(move |(d, m)| Op::ManifestPut {
                repo: name.clone(),
                digest: *d,
                meta: m.clone(),
            });
            let tags = r.tags.iter().map(move |(t, d)| Op::TagSet {
                repo: name.clone(),
                tag: t.clone(),
                digest: *d,
                at: 0,
            });
            let touched = r
                .manifests
                .iter()
                .filter(|(_, m)| m.access.get() > m.pushed)
                .map(move |(d, m)| Op::ManifestTouched {
                    repo: name.clone(),
                    digest: *d,
                    at: m.access.get(),
                });
            links
                .into_iter()
                .chain(manifests)
                .chain(tags)
                .chain(touched)
        });
        blobs.chain(repos).chain(std::iter::once(Op::ClockMark {
            at: self.clock_floor,
        }))
    }
}

/// The state plus its journal. Every change goes through [`Index::commit`], which journals
/// before it applies, under one lock, so the journal's order is the state's order.
pub struct Index {
    state: RwLock<State>,
    journal: Mutex<Journal>,
    /// Access records waiting for the next flush (reads queue them; the group commit writes them).
    touches: Mutex<Vec<Op>>,
    /// Minimum gap between two journaled accesses of one entry (ms).
    debounce: std::sync::atomic::AtomicI64,
    /// When the last completed sync point began; every completion is announced through it to the
    /// writers waiting in [`Index::wait_durable_within`].
    covered: tokio::sync::watch::Sender<Instant>,
    /// Acknowledged writes that no completed sync point covers yet.
    acks: Mutex<Unacked>,
    /// Writes that waited for the disk in [`Index::wait_durable_within`] (the status page's).
    held_for_disk: std::sync::atomic::AtomicU64,
    /// The journal's length right after the last `SyncPoint` appended, and whether that record
    /// is durable too: while nothing is journaled after it, a group commit has nothing to do (an
    /// idle daemon neither appends nor fsyncs every second).
    last_point: Mutex<Option<(u64, bool)>>,
}

/// The oldest acknowledgements that no completed sync point covers yet: of writes acknowledged
/// before the running round began (that round covers them), and of later ones.
#[derive(Default)]
struct Unacked {
    in_round: Option<Instant>,
    after: Option<Instant>,
}

impl Unacked {
    fn oldest(&self) -> Option<Instant> {
        match (self.in_round, self.after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// How long a writer waits for a group commit that is behind before it gives up with an error:
/// a disk that completes no fsync for this long is failing, not slow.
const SYNC_STALL: Duration = Duration::from_secs(60);

/// Default for [`Index::set_debounce`]: last access is exact in memory, and journaled at most
/// once a minute per entry, so a hot HEAD path costs no write and a restart loses at most a minute
/// of recency.
pub const ACCESS_DEBOUNCE: Millis = 60_000;

/// Journal size at which a running daemon compacts it.
const COMPACT_AT: u64 = 256 << 20;

impl Index {
    /// Replays the journal in `dir`. `sync_each` makes every commit fsync the journal.
    pub fn open(dir: &Path, sync_each: bool) -> Result<(Index, u64)> {
        let mut state = State {
            replaying: true,
            ..State::default()
        };
        // Size the big tables once from the journal's size (a compacted journal spends about
        // 100 bytes per blob) instead of rehashing them a dozen times while replaying.
        let estimate = std::fs::metadata(dir.join("journal")).map_or(0, |m| m.len()) / 100;
        let estimate = usize::try_from(estimate).unwrap_or(0).min(1 << 26);
        state.blobs.reserve(estimate);
        state.refs.reserve(estimate);
        let (journal, n) = Journal::open(dir, sync_each, |seq, op| state.apply(seq, op))?;
        state.finish_replay();
        Ok((
            Index {
                state: RwLock::new(state),
                journal: Mutex::new(journal),
                touches: Mutex::new(Vec::new()),
                debounce: ACCESS_DEBOUNCE.into(),
                covered: tokio::sync::watch::Sender::new(Instant::now()),
                acks: Mutex::new(Unacked::default()),
                held_for_disk: 0.into(),
                last_point: Mutex::new(None),
            },
            n,
        ))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        // A poisoned lock means a panic mid-apply; the state is still the journal's prefix.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Journals `ops`, then applies them. Nothing is applied if the journal write fails.
    pub fn commit(&self, ops: Vec<Op>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut state = self.write();
        let mut journal = self.journal();
        let seq = journal.next_seq();
        journal.append(&ops)?;
        for (i, op) in ops.into_iter().enumerate() {
            state.apply(seq + i as u64, op);
        }
        Ok(())
    }

    /// Checks a precondition against the current state and commits the ops it returns, all under
    /// the write lock, so nothing can change in between (e.g. "every child still exists").
    pub fn commit_if(&self, f: impl FnOnce(&State) -> Result<Vec<Op>>) -> Result<()> {
        let mut state = self.write();
        let ops = f(&state)?;
        if ops.is_empty() {
            return Ok(());
        }
        let mut journal = self.journal();
        let seq = journal.next_seq();
        journal.append(&ops)?;
        for (i, op) in ops.into_iter().enumerate() {
            state.apply(seq + i as u64, op);
        }
        Ok(())
    }

    /// The group-commit point. Every blob journaled before `upto` was committed to the store
    /// before its record was written, so once `sync_blobs` returns they are all durable; then the
    /// journal is fsynced and a `SyncPoint { upto }` vouches for exactly those records (blobs
    /// committed meanwhile stay unsynced until the next round). Compacts a grown journal.
    pub fn sync_point(&self, sync_blobs: impl FnOnce() -> Result<()>) -> Result<()> {
        let began = Instant::now();
        let (upto, handle) = {
            let journal = self.journal();
            (journal.next_seq(), journal.sync_handle()?)
        };
        // Whatever was acknowledged until now (including by a round that failed) is this
        // round's to cover: its records precede `upto`.
        {
            let mut acks = self.acks();
            acks.in_round = acks.oldest();
            acks.after = None;
        }
        {
            let mut last = self.last_point.lock().unwrap_or_else(|e| e.into_inner());
            match *last {
                // Nothing journaled since the last sync point, which is durable: all is.
                Some((len, true)) if len == upto => {
                    self.round_done(began);
                    return Ok(());
                }
                // Only the last sync point's own record is not yet durable.
                Some((len, false)) if len == upto => {
                    handle.sync()?;
                    *last = Some((len, true));
                    self.round_done(began);
                    return Ok(());
                }
                _ => {}
            }
        }
        sync_blobs()?;
        // Outside the locks: behind a large write-back the device can take a second to flush,
        // and requests must not wait for it. The SyncPoint record itself becomes durable with
        // the next sync; until then a crash merely re-verifies a little more.
        handle.sync()?;
        let mut state = self.write();
        let mut journal = self.journal();
        let seq = journal.next_seq();
        journal.append(&[Op::SyncPoint { upto }])?;
        state.apply(seq, Op::SyncPoint { upto });
        let mut durable = false;
        if journal.file_len() > COMPACT_AT {
            let n = journal.rewrite(state.snapshot_ops())?;
            let renumbered = renumber_unsynced(&state);
            state.unsynced = renumbered;
            tracing::info!(records = n, "compacted the index journal");
            // The compacted journal was fsynced before it replaced the old one.
            durable = true;
        }
        *self.last_point.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((journal.next_seq(), durable));
        self.round_done(began);
        Ok(())
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, Unacked> {
        self.acks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sync point that began at `began` completed: what was acknowledged before it is durable.
    fn round_done(&self, began: Instant) {
        self.acks().in_round = None;
        self.covered.send_replace(began);
    }

    /// How long ago the last completed sync point began, and how many writes have waited for
    /// the disk so far.
    pub fn sync_lag(&self) -> (Duration, u64) {
        (
            self.covered.borrow().elapsed(),
            self.held_for_disk
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Called before a write is acknowledged: returns at once unless an earlier acknowledged
    /// write has waited more than `bound` for a sync point to cover it, that is, unless the disk
    /// is behind the writes; then this write waits for the group commit to catch up instead of
    /// widening what a power loss could take. After a minute of waiting it is refused as
    /// unavailable (the write itself is stored, and a retry finds it).
    pub async fn wait_durable_within(&self, bound: Duration) -> Result<()> {
        let behind = || self.acks().oldest().is_some_and(|t| t.elapsed() > bound);
        if behind() {
            self.held_for_disk
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut rx = self.covered.subscribe();
            // Only a completed sync point can clear the backlog, and each one is announced.
            let caught_up = async move {
                // A closed channel cannot happen while `self` lives; either way, no wait.
                let _ = rx.wait_for(|_| !behind()).await;
            };
            if tokio::time::timeout(SYNC_STALL, caught_up).await.is_err() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the disk has not caught up with acknowledged writes for {} s; \
                         the write is stored but not yet durable",
                        SYNC_STALL.as_secs()
                    ),
                ));
            }
        }
        let mut acks = self.acks();
        acks.after = acks.after.or(Some(Instant::now()));
        Ok(())
    }

    /// Rewrites the journal as the compacted state (start-up and clean shutdown).
    pub fn compact(&self) -> Result<u64> {
        let mut state = self.write();
        let mut journal = self.journal();
        let n = journal.rewrite(state.snapshot_ops())?;
        state.unsynced = renumber_unsynced(&state);
        Ok(n)
    }

    /// Makes every journaled record durable now.
    pub fn sync_journal(&self) -> Result<()> {
        let handle = self.journal().sync_handle()?;
        handle.sync()
    }

    /// Blobs no `SyncPoint` vouches for (re-verified after an unclean stop).
    pub fn unsynced(&self) -> Vec<Digest> {
        self.read().unsynced_set().into_iter().collect()
    }

    /// Size of a stored blob.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        self.read().blobs.get(d).map(|m| m.size)
    }

    pub fn set_debounce(&self, ms: Millis) {
        self.debounce
            .store(ms.max(0), std::sync::atomic::Ordering::Relaxed);
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Op>> {
        self.touches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a read of blob `d` at `now` (the caller holds `state` for reading).
    pub fn touch_blob(&self, state: &State, d: &Digest, now: Millis) {
        let debounce = self.debounce.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = state.blobs.get(d) {
            if m.access.touch(now, debounce) {
                self.pending().push(Op::BlobTouched {
                    digest: *d,
                    at: now,
                });
            }
        }
    }

    /// Records a read of manifest `d` in `repo` at `now`: this is what keeps a tag young.
    pub fn touch_manifest(&self, state: &State, repo: &str, d: &Digest, now: Millis) {
        let debounce = self.debounce.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = state.repos.get(repo).and_then(|r| r.manifests.get(d)) {
            if m.access.touch(now, debounce) {
                self.pending().push(Op::ManifestTouched {
                    repo: repo.to_owned(),
                    digest: *d,
                    at: now,
                });
            }
        }
    }

    /// Journals the queued access records, and a `ClockMark` when cache time moved on.
    /// Returns the access records it journaled (a shared bucket ships them to the collector).
    pub fn flush_touches(&self, now: Millis) -> Result<Vec<Op>> {
        let mut ops = std::mem::take(&mut *self.pending());
        let touched = ops.clone();
        let floor = self.read().clock_floor;
        if now.saturating_sub(floor) >= 10_000 {
            ops.push(Op::ClockMark { at: now });
        }
        if ops.is_empty() {
            return Ok(touched);
        }
        self.commit(ops)?;
        Ok(touched)
    }
}

/// After a rewrite the unsynced blobs follow the synced ones and the `SyncPoint`, in the same
/// iteration order `snapshot_ops` used; their new sequence numbers are past the point.
fn renumber_unsynced(state: &State) -> VecDeque<(u64, Digest)> {
    let set = state.unsynced_set();
    let upto = (state.blobs.len() - set.len()) as u64;
    state
        .blobs
        .keys()
        .filter(|d| set.contains(*d))
        .enumerate()
        .map(|(i, d)| (upto + 1 + i as u64, *d))
        .collect()
}

impl Index {
    /// Drops blobs found corrupt and everything that would dangle without them: links, manifests
    /// listing them (and manifests listing those), and tags on such manifests (invariant 1).
    pub fn drop_blobs(&self, bad: &HashSet<Digest>) -> Result<Vec<String>> {
        if bad.is_empty() {
            return Ok(Vec::new());
        }
        let mut report = Vec::new();
        self.commit_if(|state| {
            let (ops, r) = plan_drop_blobs(state, bad);
            report = r;
            Ok(ops)
        })?;
        Ok(report)
    }
}

/// The records `Index::drop_blobs` commits, and the manifests they remove ("repo@digest").
pub fn plan_drop_blobs(state: &State, bad: &HashSet<Digest>) -> (Vec<Op>, Vec<String>) {
    let mut report = Vec::new();
    let mut gone: HashSet<Digest> = bad.clone();
    let mut ops = Vec::new();
    for d in bad {
        if state.blobs.contains_key(d) {
            ops.push(Op::BlobRemoved { digest: *d });
        }
    }
    // Cascade to manifests until nothing more falls.
    let mut dead_manifests: HashSet<(String, Digest)> = HashSet::new();
    loop {
        let mut changed = false;
        for (name, repo) in &state.repos {
            for (md, meta) in &repo.manifests {
                let key = (name.clone(), *md);
                if dead_manifests.contains(&key) {
                    continue;
                }
                if gone.contains(md) || meta.children.iter().any(|c| gone.contains(c)) {
                    dead_manifests.insert(key);
                    gone.insert(*md);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (name, repo) in &state.repos {
        for d in repo.blobs.iter().filter(|d| gone.contains(d)) {
            ops.push(Op::Unlink {
                repo: name.clone(),
                digest: *d,
            });
        }
    }
    for (name, md) in dead_manifests {
        report.push(format!("{name}@{md}"));
        ops.push(Op::ManifestDeleted {
            repo: name,
            digest: md,
        });
    }
    (ops, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_wait_only_while_the_group_commit_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        let index = std::sync::Arc::new(Index::open(dir.path(), false).unwrap().0);
        let bound = Duration::from_millis(200);
        let generous = Duration::from_secs(10);
        let write = |index: &std::sync::Arc<Index>| {
            let index = index.clone();
            tokio::spawn(async move { index.wait_durable_within(bound).await })
        };
        let sync_point = |index: &std::sync::Arc<Index>| {
            let index = index.clone();
            tokio::task::spawn_blocking(move || index.sync_point(|| Ok(())))
        };

        // Nothing unsynced: acknowledged at once, twice (the first is younger than the bound).
        for _ in 0..2 {
            tokio::time::timeout(generous, write(&index))
                .await
                .expect("nothing is behind: no wait")
                .unwrap()
                .unwrap();
        }
        // The first acknowledgement is now older than the bound and no sync point has covered
        // it: the disk is behind, and the next write waits...
        std::thread::sleep(bound + Duration::from_millis(50));
        let waiter = write(&index);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "acknowledged while the sync is behind"
        );
        assert_eq!(index.sync_lag().1, 1, "the held write is counted");

        // ...until a sync point completes, which lets it through.
        sync_point(&index).await.unwrap().unwrap();
        tokio::time::timeout(generous, waiter)
            .await
            .expect("a completed sync point must release waiting writes")
            .unwrap()
            .unwrap();
        // A sync point covers only what was acknowledged before it began: the released write
        // needs the next one, and once that is done nothing is behind however long it waits.
        sync_point(&index).await.unwrap().unwrap();
        std::thread::sleep(bound + Duration::from_millis(50));
        tokio::time::timeout(generous, write(&index))
            .await
            .expect("everything acknowledged is covered: no wait")
            .unwrap()
            .unwrap();
        assert_eq!(index.sync_lag().1, 1);
    }

    #[test]
    fn an_idle_group_commit_neither_appends_nor_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), false).unwrap().0;
        let journal_len = || std::fs::metadata(dir.path().join("journal")).unwrap().len();
        let add = |n: u8| {
            index
                .commit_if(|_| {
                    Ok(vec![Op::BlobAdded {
                        digest: Digest::sha256_of(&[n]),
                        size: 1,
                        at: 0,
                    }])
                })
                .unwrap()
        };
        let blobs_synced = std::cell::Cell::new(0);
        let round = || {
            index
                .sync_point(|| {
                    blobs_synced.set(blobs_synced.get() + 1);
                    Ok(())
                })
                .unwrap()
        };
        add(1);
        round();
        let after_first = journal_len();
        assert_eq!(blobs_synced.get(), 1);
        // Nothing new: no record, no store sync, however many rounds.
        for _ in 0..3 {
            round();
        }
        assert_eq!(journal_len(), after_first);
        assert_eq!(blobs_synced.get(), 1);
        assert!(index.unsynced().is_empty());
        // Something new: a full round again, which vouches for it.
        add(2);
        assert_eq!(index.unsynced().len(), 1);
        round();
        assert!(journal_len() > after_first);
        assert_eq!(blobs_synced.get(), 2);
        assert!(index.unsynced().is_empty());
    }
}
