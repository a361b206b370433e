//! What goes, and when: TTL expiry, the size bound (LRU down to the low watermark), orphan
//! collection, and the reservations that keep uploads inside `max_size`.
//!
//! Roots are the tags (later: every other kind of ref). A tagged manifest is one root; its last
//! access is the manifest's (pushes, tag moves, GET/HEAD by tag or digest refresh it). Everything
//! else lives because a root reaches it: an index's child manifests, a manifest's referrers, and
//! the blobs manifests list (reference counts in the index). Something no root reaches is an
//! orphan and is collected once it is older than `orphan_grace` — that window is what keeps an
//! export in progress safe: BuildKit pushes or HEADs every blob before it pushes the manifest
//! that references them, and a push, mount or HEAD stamps the blob's *claim* time.
//!
//! A pass plans under the index's write lock and commits its records in the same critical
//! section, so readers and writers see the state before or after it, never between (invariant
//! 1: a manifest is never visible while a blob it lists is gone). Records go manifests first,
//! blobs last, so any prefix of them that survives a crash is a consistent state too; the
//! journal is fsynced before any file is unlinked. Files are unlinked only while no upload of
//! the same digest is between its rename and its index record ([`Pins`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::clock::{Millis, SharedClock};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::lifecycle::index::{Index, Op, State};
use crate::store::{BlobStore, BlobWriter, Expect};

/// The lifecycle settings, as resolved from the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Hard bound on stored bytes (blobs plus uploads in progress). `None`: unbounded.
    pub max_size: Option<u64>,
    /// Above this fraction of `max_size` a pass evicts down to `low_watermark`.
    pub high_watermark: f64,
    pub low_watermark: f64,
    /// Roots not accessed for longer than this (plus the skew tolerance) expire.
    pub ttl: Option<Millis>,
    pub clock_skew_tolerance: Millis,
    /// Unreferenced blobs and manifests are safe for this long after their last claim.
    pub orphan_grace: Millis,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            max_size: None,
            high_watermark: 0.9,
            low_watermark: 0.8,
            ttl: None,
            clock_skew_tolerance: 5 * 60_000,
            orphan_grace: 3_600_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Evicted, least recently used first, to get under the size bound.
    Size,
    /// Not accessed within `ttl`.
    Ttl,
    /// Reachable from no root and past `orphan_grace`.
    Orphan,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Ttl => "ttl",
            Reason::Orphan => "orphan",
        }
    }
}

/// What one pass (or the daemon so far) removed for one reason in one repository.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub tags: u64,
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.tags += o.tags;
        self.manifests += o.manifests;
        self.blobs += o.blobs;
        self.bytes += o.bytes;
    }
}

/// Where a blob no repository links is counted.
const NO_REPO: &str = "-";

/// Evictions the status page lists.
const RECENT: usize = 50;

#[derive(Debug, Default)]
pub struct Report {
    pub tallies: BTreeMap<(Reason, String), Tally>,
    /// Blob files to unlink once the records are durable.
    pub victims: Vec<Digest>,
    pub freed: u64,
    /// Each removal with its reason and repository (what the tallies add up).
    pub items: Vec<(Reason, String, Item)>,
}

/// One thing a pass removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Tag(String),
    Manifest(Digest),
    Blob(Digest, u64),
}

impl Report {
    /// Keeps only the removals `keep` confirms (a collection on a shared bucket spares what was
    /// claimed or read since its plan) and recounts.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Item) -> bool) {
        self.items.retain(|(_, repo, item)| keep(repo, item));
        self.tallies.clear();
        self.victims.clear();
        self.freed = 0;
        for (reason, repo, item) in &self.items {
            let t = self.tallies.entry((*reason, repo.clone())).or_default();
            match item {
                Item::Tag(_) => t.tags += 1,
                Item::Manifest(_) => t.manifests += 1,
                Item::Blob(d, size) => {
                    t.blobs += 1;
                    t.bytes += size;
                    self.victims.push(*d);
                    self.freed += size;
                }
            }
        }
    }

    pub fn total(&self) -> Tally {
        let mut t = Tally::default();
        for v in self.tallies.values() {
            t.add(v);
        }
        t
    }
}

/// Per-repository facts a pass needs and the index does not keep.
struct RepoView<'a> {
    /// Tags on each manifest.
    tags: HashMap<Digest, Vec<&'a str>>,
    /// How many manifests of this repository list each manifest of it as a child.
    parents: HashMap<Digest, u32>,
    /// Manifests whose `subject` is each digest.
    referrers: HashMap<Digest, Vec<Digest>>,
}

/// One pass's plan: decisions made against `state` as it will be once `ops` are applied.
struct Plan<'a> {
    state: &'a State,
    policy: &'a Policy,
    now: Millis,
    views: HashMap<&'a str, RepoView<'a>>,
    removed_manifests: HashSet<(&'a str, Digest)>,
    removed_blobs: HashSet<Digest>,
    ref_delta: HashMap<Digest, i64>,
    manifest_ops: Vec<Op>,
    blob_ops: Vec<Op>,
    report: Report,
    /// Digests that are roots whatever the state says (what live claims on a shared bucket
    /// name): kept, with everything they reach.
    protected: Option<&'a crate::digest::DigestSet>,
}

impl<'a> Plan<'a> {
    fn new(state: &'a State, policy: &'a Policy, now: Millis) -> Plan<'a> {
        let mut views = HashMap::with_capacity(state.repos.len());
        for (name, r) in &state.repos {
            let mut v = RepoView {
                tags: HashMap::new(),
                parents: HashMap::new(),
                referrers: HashMap::new(),
            };
            for (t, d) in &r.tags {
                v.tags.entry(*d).or_default().push(t.as_str());
            }
            for (d, m) in &r.manifests {
                for c in &m.children {
                    if r.manifests.contains_key(c) {
                        *v.parents.entry(*c).or_insert(0) += 1;
                    }
                }
                if let Some(s) = m.subject {
                    v.referrers.entry(s).or_default().push(*d);
                }
            }
            views.insert(name.as_str(), v);
        }
        Plan {
            state,
            policy,
            now,
            views,
            removed_manifests: HashSet::new(),
            removed_blobs: HashSet::new(),
            ref_delta: HashMap::new(),
            manifest_ops: Vec::new(),
            blob_ops: Vec::new(),
            report: Report::default(),
            protected: None,
        }
    }

    /// Age of a stamp; a stamp in the future counts as now (clamped, never negative).
    fn age(&self, at: Millis) -> Millis {
        self.now.saturating_sub(at).max(0)
    }

    fn tally(&mut self, reason: Reason, repo: &str) -> &mut Tally {
        self.report
            .tallies
            .entry((reason, repo.to_owned()))
            .or_default()
    }

    fn live_manifest(&self, repo: &'a str, d: &Digest) -> bool {
        self.state
            .repos
            .get(repo)
            .is_some_and(|r| r.manifests.contains_key(d))
            && !self.removed_manifests.contains(&(repo, *d))
    }

    /// True when no root reaches manifest `d` of `repo` any more.
    fn unreachable(&self, repo: &'a str, d: &Digest) -> bool {
        if self.protected.is_some_and(|p| p.contains(d)) {
            return false;
        }
        let Some(v) = self.views.get(repo) else {
            return true;
        };
        let tagged = v.tags.get(d).is_some_and(|t| !t.is_empty());
        let parented = v.parents.get(d).copied().unwrap_or(0) > 0;
        let subject_alive = self
            .state
            .repos
            .get(repo)
            .and_then(|r| r.manifests.get(d))
            .and_then(|m| m.subject)
            .is_some_and(|s| self.live_manifest(repo, &s));
        !tagged && !parented && !subject_alive
    }

    /// Removes a root: its tags, then the manifest itself unless another manifest still lists it.
    fn evict_root(&mut self, repo: &'a str, d: Digest, reason: Reason) {
        let tags = self
            .views
            .get_mut(repo)
            .and_then(|v| v.tags.remove(&d))
            .unwrap_or_default();
        let n = tags.len() as u64;
        for t in tags {
            self.manifest_ops.push(Op::TagDeleted {
                repo: repo.to_owned(),
                tag: t.to_owned(),
            });
            self.report
                .items
                .push((reason, repo.to_owned(), Item::Tag(t.to_owned())));
        }
        self.tally(reason, repo).tags += n;
        if self.unreachable(repo, &d) {
            self.drop_manifest(repo, d, reason);
        }
    }

    /// Removes a manifest nothing reaches, then whatever only it reached.
    fn drop_manifest(&mut self, repo: &'a str, d: Digest, reason: Reason) {
        if !self.live_manifest(repo, &d) {
            return;
        }
        let Some(meta) = self.state.repos.get(repo).and_then(|r| r.manifests.get(&d)) else {
            return;
        };
        self.removed_manifests.insert((repo, d));
        self.manifest_ops.push(Op::ManifestDeleted {
            repo: repo.to_owned(),
            digest: d,
        });
        self.tally(reason, repo).manifests += 1;
        self.report
            .items
            .push((reason, repo.to_owned(), Item::Manifest(d)));
        let pushed = meta.pushed;
        // Its own bytes, then its children.
        self.unref(d, reason, repo, pushed);
        for c in &meta.children {
            let child_manifest = self
                .state
                .repos
                .get(repo)
                .is_some_and(|r| r.manifests.contains_key(c));
            if child_manifest {
                if let Some(n) = self.views.get_mut(repo).and_then(|v| v.parents.get_mut(c)) {
                    *n = n.saturating_sub(1);
                }
                if self.unreachable(repo, c) {
                    self.drop_manifest(repo, *c, reason);
                }
            }
            self.unref(*c, reason, repo, pushed);
        }
        // Referrers (signatures, SBOMs) go with their subject.
        let referrers = self
            .views
            .get(repo)
            .and_then(|v| v.referrers.get(&d))
            .cloned()
            .unwrap_or_default();
        for r in referrers {
            if self.unreachable(repo, &r) {
                self.drop_manifest(repo, r, reason);
            }
        }
    }

    /// One reference to `d` went away with a manifest pushed at `since`. The blob goes when
    /// nothing else references it, unless someone claimed it (pushed, mounted, HEADed it) after
    /// that manifest was pushed and within the grace period: a newer export is about to use it.
    fn unref(&mut self, d: Digest, reason: Reason, repo: &'a str, since: Millis) {
        *self.ref_delta.entry(d).or_insert(0) -= 1;
        if self.refs(&d) > 0 {
            return;
        }
        let Some(meta) = self.state.blobs.get(&d) else {
            return;
        };
        let claim = meta.access.get();
        if claim > since && self.age(claim) <= self.policy.orphan_grace {
            return;
        }
        self.drop_blob(d, reason, repo);
    }

    fn refs(&self, d: &Digest) -> i64 {
        i64::from(self.state.refs.get(d).copied().unwrap_or(0))
            + self.ref_delta.get(d).copied().unwrap_or(0)
    }

    fn drop_blob(&mut self, d: Digest, reason: Reason, repo: &str) {
        if self.protected.is_some_and(|p| p.contains(&d)) {
            return;
        }
        let Some(meta) = self.state.blobs.get(&d) else {
            return;
        };
        if !self.removed_blobs.insert(d) {
            return;
        }
        for (name, r) in &self.state.repos {
            if r.blobs.contains(&d) {
                self.blob_ops.push(Op::Unlink {
                    repo: name.clone(),
                    digest: d,
                });
            }
        }
        self.blob_ops.push(Op::BlobRemoved { digest: d });
        self.report.victims.push(d);
        self.report.freed += meta.size;
        let size = meta.size;
        let t = self.tally(reason, repo);
        t.blobs += 1;
        t.bytes += size;
        self.report
            .items
            .push((reason, repo.to_owned(), Item::Blob(d, size)));
    }

    /// Tagged manifests, least recently used first.
    fn roots(&self) -> Vec<(Millis, &'a str, Digest)> {
        let mut roots = Vec::new();
        for (name, r) in &self.state.repos {
            let Some(v) = self.views.get(name.as_str()) else {
                continue;
            };
            for d in v.tags.keys() {
                if let Some(m) = r.manifests.get(d) {
                    roots.push((m.access.get().min(self.now), name.as_str(), *d));
                }
            }
        }
        roots.sort();
        roots
    }

    fn expire(&mut self, ttl: Millis) {
        let limit = ttl.saturating_add(self.policy.clock_skew_tolerance);
        for (at, repo, d) in self.roots() {
            if self.age(at) <= limit {
                break;
            }
            self.evict_root(repo, d, Reason::Ttl);
        }
    }

    fn collect_orphans(&mut self) {
        let grace = self.policy.orphan_grace;
        let mut manifests = Vec::new();
        for (name, r) in &self.state.repos {
            for (d, m) in &r.manifests {
                if self.age(m.access.get()) > grace && self.unreachable(name.as_str(), d) {
                    manifests.push((name.as_str(), *d));
                }
            }
        }
        for (repo, d) in manifests {
            self.drop_manifest(repo, d, Reason::Orphan);
        }
        let mut blobs: Vec<Digest> = Vec::new();
        for d in &self.state.unreferenced {
            if let Some(m) = self.state.blobs.get(d) {
                if self.age(m.access.get()) > grace {
                    blobs.push(*d);
                }
            }
        }
        for d in blobs {
            let repo = self
                .state
                .repos
                .iter()
                .find(|(_, r)| r.blobs.contains(&d))
                .map_or(NO_REPO, |(n, _)| n.as_str());
            self.drop_blob(d, Reason::Orphan, repo);
        }
    }

    /// Manifests that a tag or an index reached since their last push and nothing reaches now
    /// (a cache tag moved on to a newer export), least recently used first.
    fn superseded(&self) -> Vec<(Millis, &'a str, Digest)> {
        let mut out = Vec::new();
        for (name, r) in &self.state.repos {
            for (d, m) in &r.manifests {
                if m.rooted && self.unreachable(name.as_str(), d) {
                    out.push((m.access.get().min(self.now), name.as_str(), *d));
                }
            }
        }
        out.sort();
        out
    }

    /// Until stored bytes plus `reserved` fit `target`: first superseded manifests with what only
    /// they reach (orphan grace does not shelter a manifest whose tag moved on; it shelters only
    /// blobs an export in progress claimed, see `unref`), then roots, least recently used first.
    /// Without this order a cache whose tags are re-pushed on every build fills with superseded
    /// manifests and evicts every live tag instead.
    fn shrink(&mut self, target: u64, reserved: u64) {
        let used = |p: &Plan| (p.state.total - p.report.freed).saturating_add(reserved);
        if used(self) <= target {
            return;
        }
        for (_, repo, d) in self.superseded() {
            self.drop_manifest(repo, d, Reason::Size);
            if used(self) <= target {
                return;
            }
        }
        for (_, repo, d) in self.roots() {
            if self.removed_manifests.contains(&(repo, d)) {
                continue;
            }
            self.evict_root(repo, d, Reason::Size);
            if used(self) <= target {
                break;
            }
        }
    }

    fn into_ops(mut self) -> (Vec<Op>, Report) {
        let mut ops = std::mem::take(&mut self.manifest_ops);
        ops.append(&mut self.blob_ops);
        (ops, self.report)
    }
}

/// A plan's records as what a shared bucket deletes: tags, manifests, blobs (links go with
/// their blobs).
#[allow(clippy::type_complexity)]
fn split(ops: Vec<Op>) -> (Vec<(String, String)>, Vec<(String, Digest)>, Vec<Digest>) {
    let (mut tags, mut manifests, mut blobs) = (Vec::new(), Vec::new(), Vec::new());
    for op in ops {
        match op {
            Op::TagDeleted { repo, tag } => tags.push((repo, tag)),
            Op::ManifestDeleted { repo, digest } => manifests.push((repo, digest)),
            Op::BlobRemoved { digest } => blobs.push(digest),
            _ => {}
        }
    }
    (tags, manifests, blobs)
}

/// Digests between their rename into the store and their index record. A pass never unlinks a
/// pinned digest's file: the file may already be the new upload's.
#[derive(Default)]
pub struct Pins(Mutex<HashMap<Digest, u32>>);

pub struct Pin<'a> {
    pins: &'a Pins,
    digest: Digest,
}

impl Pins {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is pinned now.
    pub fn snapshot(&self) -> crate::digest::DigestSet {
        self.map().keys().copied().collect()
    }

    pub fn pin(&self, d: Digest) -> Pin<'_> {
        *self.map().entry(d).or_insert(0) += 1;
        Pin {
            pins: self,
            digest: d,
        }
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut m = self.pins.map();
        if let Some(n) = m.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.digest);
            }
        }
    }
}

/// The lifecycle service: runs passes, tracks reservations, keeps eviction counters.
pub struct Lifecycle {
    pub index: Arc<Index>,
    pub store: Arc<dyn BlobStore>,
    pub clock: SharedClock,
    pub policy: Policy,
    pub pins: Pins,
    /// Bytes promised to uploads in progress.
    reserved: AtomicU64,
    /// Where the blobs live, for free-space checks.
    data_dir: Option<PathBuf>,
    /// One pass at a time.
    running: Mutex<()>,
    totals: Mutex<BTreeMap<(Reason, String), Tally>>,
    /// The last evictions (wall-clock ms, reason, repository, what), newest last.
    recent: Mutex<std::collections::VecDeque<(i64, Reason, String, Tally)>>,
    /// Wakes the background pass when an upload pushed usage over the high watermark.
    pub wake: tokio::sync::Notify,
    /// Set when the store is a bucket shared with other replicas: passes run only in the
    /// replica holding the collector's lease, and carry out their plan in the bucket.
    pub shared: std::sync::OnceLock<Arc<crate::lifecycle::shared::Shared>>,
}

/// On a shared bucket, how long an upload waits for the collector to make room.
const SHARED_ROOM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Uploads reserve space in steps of this much when they do not announce their size.
const RESERVE_STEP: u64 = 64 << 20;

/// Space kept free on the filesystem for the journal and small writes (at most 2% of it).
const DISK_HEADROOM: u64 = 64 << 20;

impl Lifecycle {
    pub fn new(
        index: Arc<Index>,
        store: Arc<dyn BlobStore>,
        clock: SharedClock,
        policy: Policy,
        data_dir: Option<PathBuf>,
    ) -> Lifecycle {
        Lifecycle {
            index,
            store,
            clock,
            policy,
            pins: Pins::default(),
            reserved: AtomicU64::new(0),
            data_dir,
            running: Mutex::new(()),
            totals: Mutex::new(BTreeMap::new()),
            recent: Mutex::new(std::collections::VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            shared: std::sync::OnceLock::new(),
        }
    }

    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    fn high_mark(&self) -> Option<u64> {
        self.policy
            .max_size
            .map(|m| (m as f64 * self.policy.high_watermark) as u64)
    }

    fn low_mark(&self) -> Option<u64> {
        self.policy
            .max_size
            .map(|m| (m as f64 * self.policy.low_watermark) as u64)
    }

    /// One pass: TTL, orphans, then the size bound: over the high watermark, evict down to the
    /// low one; with a `ceiling` (a reservation waiting on this pass), also down to that many
    /// bytes stored plus reserved. Blocking; one pass runs at a time.
    pub fn pass(&self, ceiling: Option<u64>) -> Result<Report> {
        if let Some(s) = self.shared.get() {
            return self.shared_pass(s, ceiling);
        }
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now_ms();
        let reserved = self.reserved();
        let mut report = Report::default();
        self.index.commit_if(|state| {
            // A blob someone is writing or linking right now (a file ref between its bytes and
            // its manifest) is not collected under them. Read under the index's lock: a pin
            // taken before its blob was recorded is seen by every plan that sees the blob (a
            // snapshot taken before the lock missed pins taken just after it: a soak saw 2 in
            // 3,784 Go cache puts lose their output that way).
            let pinned = self.pins.snapshot();
            let (ops, r) = self.plan(state, now, ceiling, reserved, Some(&pinned));
            report = r;
            Ok(ops)
        })?;
        if report.victims.is_empty() && report.tallies.is_empty() {
            return Ok(report);
        }
        // Records first, durably; then the files.
        self.index.sync_journal()?;
        self.unlink(&report.victims);
        self.count(&report);
        Ok(report)
    }

    /// What a pass at `now` would remove from `state`, as records and a report.
    fn plan(
        &self,
        state: &State,
        now: Millis,
        ceiling: Option<u64>,
        reserved: u64,
        protected: Option<&crate::digest::DigestSet>,
    ) -> (Vec<Op>, Report) {
        let policy = &self.policy;
        let mut plan = Plan::new(state, policy, now);
        plan.protected = protected;
        if let Some(ttl) = policy.ttl {
            plan.expire(ttl);
        }
        plan.collect_orphans();
        let mut target = ceiling;
        if let (Some(low), Some(high)) = (self.low_mark(), self.high_mark()) {
            if state.total.saturating_add(reserved) > high {
                target = Some(target.map_or(low, |t| t.min(low)));
            }
        }
        if let Some(t) = target {
            plan.shrink(t, reserved);
        }
        plan.into_ops()
    }

    /// A pass over a bucket other replicas share: only in the replica holding the collector's
    /// lease (elsewhere it does nothing). The cache is revalidated and every replica's reads
    /// merged, then planned as on disk; the plan is carried out in the bucket through the
    /// announcement and claim handshake (lifecycle/shared.rs): tags first, each only if
    /// unchanged; then the announcement, the wait, a second listing and plan, and the claims;
    /// only what both plans remove and no claim names goes. The cache then follows the bucket.
    fn shared_pass(
        &self,
        s: &Arc<crate::lifecycle::shared::Shared>,
        ceiling: Option<u64>,
    ) -> Result<Report> {
        // A pass already running is not waited for (it takes a settle and two listings): an
        // upload that asked for room retries while it frees what it can.
        let _one = match self.running.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(Report::default()),
        };
        if !s.holds_gc() {
            return Ok(Report::default());
        }
        let began = std::time::Instant::now();
        let listing = s.block(|s| async move { s.prepare_collection().await })?;
        let Some(planned_at) = s.collector_now() else {
            return Ok(Report::default());
        };
        let (ops, mut report, etags) = {
            let state = self.index.read();
            let (ops, report) = self.plan(&state, planned_at, ceiling, self.reserved(), None);
            let (tags, _, _) = split(ops.clone());
            let etags = s.tag_etags(&state, &tags, listing.began);
            (ops, report, etags)
        };
        if ops.is_empty() {
            return Ok(report);
        }
        let (tags, manifests, blobs) = split(ops);
        let tags: Vec<_> = tags.into_iter().zip(etags).collect();
        s.block(|s| async move {
            s.pause("gc-after-plan").await;
            Ok(())
        })?;
        // A tag pushed again meanwhile stays; what it reaches is kept by the second plan below.
        let (tags_done, _) = s.block(move |s| async move { s.delete_tags(tags).await })?;
        let mut done = crate::lifecycle::shared::Carried {
            tags: tags_done,
            ..Default::default()
        };
        if !(manifests.is_empty() && blobs.is_empty()) {
            let (m, b) = (manifests.clone(), blobs.clone());
            let (key, announced) = s.block(move |s| async move { s.announce(m, b).await })?;
            let swept =
                self.recheck_and_sweep(s, ceiling, began, &key, announced, manifests, blobs);
            match swept {
                Ok(c) => {
                    done.manifests = c.manifests;
                    done.blobs = c.blobs;
                }
                // The announcement stays pending (deletes may still be in flight); the collector
                // closes it once that cannot be so any more (`close_abandoned`).
                Err(e) => return Err(e),
            }
        }
        report.retain(|repo, item| match item {
            Item::Tag(t) => done.tags.contains(&(repo.to_owned(), t.clone())),
            Item::Manifest(d) => done.manifests.contains(&(repo.to_owned(), *d)),
            Item::Blob(d, _) => done.blobs.contains(d),
        });
        s.block(move |s| async move {
            s.refresh().await?;
            s.tidy(planned_at).await
        })?;
        self.count(&report);
        Ok(report)
    }

    /// The announced part of a shared pass: after the wait, the bucket is listed and planned
    /// again; what the second plan keeps, or a live claim names, is spared.
    #[allow(clippy::too_many_arguments)]
    fn recheck_and_sweep(
        &self,
        s: &Arc<crate::lifecycle::shared::Shared>,
        ceiling: Option<u64>,
        began: std::time::Instant,
        key: &str,
        announced: Millis,
        manifests: Vec<(String, Digest)>,
        blobs: Vec<Digest>,
    ) -> Result<crate::lifecycle::shared::Carried> {
        let key = key.to_owned();
        // Nothing is deleted before the sweep: until then, calling the collection off (or an
        // error) closes the announcement at once.
        let call_off = |why: &str| {
            tracing::warn!(announcement = %key, "calling off a collection ({why})");
            let k = key.clone();
            s.block(move |s| async move {
                s.sweep(k, Vec::new(), Vec::new(), announced, Default::default())
                    .await
            })
        };
        let prepared = (|| {
            s.block(|s| async move { s.settle().await })?;
            if !s.holds_gc() || began.elapsed() > crate::lifecycle::shared::CLAIM_WINDOW / 2 {
                return Ok(None);
            }
            // Claims first, then the listing: a push whose claim is gone by now committed
            // before the listing begins, so the second plan sees its manifest.
            let claimed = s.block(|s| async move { s.claimed().await })?;
            let listed = s.block(|s| async move { s.prepare_collection().await })?;
            Ok(Some((claimed, listed)))
        })();
        let (claimed, listed) = match prepared {
            Ok(Some(c)) => c,
            Ok(None) => return call_off("the lease was lost, or the pass took too long"),
            Err(e) => {
                let _ = call_off("S3 failed before anything was deleted");
                return Err(e);
            }
        };
        let (ops, _) = {
            let state = self.index.read();
            // What live claims name is a root here: kept with everything it reaches (a push
            // of an index keeps its child manifests' layers too).
            self.plan(
                &state,
                s.collector_now().unwrap_or(0),
                ceiling,
                self.reserved(),
                Some(&claimed),
            )
        };
        let (_, again_m, again_b) = split(ops);
        let again_m: HashSet<(String, Digest)> = again_m.into_iter().collect();
        let again_b: HashSet<Digest> = again_b.into_iter().collect();
        let total = manifests.len() + blobs.len();
        let manifests: Vec<(String, Digest)> = manifests
            .into_iter()
            .filter(|m| again_m.contains(m) && !claimed.contains(&m.1))
            .collect();
        let blobs: Vec<Digest> = blobs
            .into_iter()
            .filter(|d| again_b.contains(d) && !claimed.contains(d))
            .collect();
        s.note_spared(total - manifests.len() - blobs.len());
        s.block(move |s| async move {
            s.sweep(key, manifests, blobs, announced, listed.blobs)
                .await
        })
    }

    fn unlink(&self, victims: &[Digest]) {
        for chunk in victims.chunks(256) {
            let state = self.index.read();
            let pins = self.pins.map();
            for d in chunk {
                if state.blobs.contains_key(d) || pins.contains_key(d) {
                    // Pushed again since the plan: the file is the new copy.
                    continue;
                }
                if let Err(e) = self.store.delete(d) {
                    tracing::warn!(digest = %d, error = %e, "cannot remove an evicted blob file");
                }
            }
        }
    }

    fn count(&self, report: &Report) {
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        for ((reason, repo), t) in &report.tallies {
            totals.entry((*reason, repo.clone())).or_default().add(t);
            recent.push_back((now, *reason, repo.clone(), *t));
            while recent.len() > RECENT {
                recent.pop_front();
            }
            tracing::info!(
                reason = %reason.as_str(),
                repository = %repo,
                tags = t.tags,
                manifests = t.manifests,
                blobs = t.blobs,
                bytes = t.bytes,
                "evicted"
            );
        }
    }

    /// The last evictions, newest first: (wall-clock ms, reason, repository, what went).
    pub fn recent(&self) -> Vec<(i64, Reason, String, Tally)> {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().rev().cloned().collect()
    }

    /// Evictions since start, by reason and repository.
    pub fn totals(&self) -> BTreeMap<(Reason, String), Tally> {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reserves `n` bytes for an upload. Over the high watermark this wakes the background pass;
    /// if the bytes would break `max_size` (or not fit on the disk) it evicts synchronously, and
    /// if they still do not fit it refuses with an error naming the limit. Blocking.
    pub fn reserve(&self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // Larger than the bound itself: evicting everything would not help, so evict nothing.
        if let Some(m) = self.policy.max_size {
            if n.saturating_add(self.reserved()) > m {
                return Err(Error::exhausted(format!(
                    "no room for {} more bytes: max_size is {} ({} already promised to uploads \
                     in progress); raise max_size",
                    n,
                    human(m),
                    human(self.reserved())
                )));
            }
        }
        // Evict, then retry: twice, since uploads running beside this one reserve and release
        // while the pass runs; a pass that frees nothing ends the attempts. On a shared bucket
        // a pass spares what pushes in flight claim (and frees it only once they commit), and
        // a replica without the collector's lease frees nothing itself: there the upload waits
        // up to `SHARED_ROOM_WAIT` for room, retrying, before it is refused.
        let shared = self.shared.get().is_some();
        let began = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            if shared && attempt == 2 && began.elapsed() < SHARED_ROOM_WAIT {
                std::thread::sleep(std::time::Duration::from_millis(250));
                attempt = 1;
            }
            if attempt > 2 {
                break;
            }
            let used = self.index.read().total + self.reserved();
            let over_max = self.policy.max_size.is_some_and(|m| used + n > m);
            let disk_short = self.disk_shortfall(n);
            if !over_max && disk_short == 0 {
                self.reserved.fetch_add(n, Ordering::Relaxed);
                if self.high_mark().is_some_and(|h| used + n > h) {
                    self.wake.notify_one();
                }
                return Ok(());
            }
            if attempt < 2 {
                let mut ceiling = u64::MAX;
                if let Some(m) = self.policy.max_size.filter(|_| over_max) {
                    let low = self.low_mark().unwrap_or(m);
                    ceiling = low.min(m.saturating_sub(n));
                }
                if disk_short > 0 {
                    if disk_short > self.index.read().total {
                        // Even an empty cache would not make room: keep what is here.
                        break;
                    }
                    ceiling = ceiling.min(used.saturating_sub(disk_short));
                }
                let r = self.pass(Some(ceiling))?;
                if attempt == 0 || !r.victims.is_empty() || shared {
                    attempt += 1;
                    continue;
                }
            }
            if shared && began.elapsed() < SHARED_ROOM_WAIT {
                attempt = 2;
                continue;
            }
            return Err(self.refusal(n, over_max, disk_short));
        }
        let short = self.disk_shortfall(n);
        Err(self.refusal(n, false, short))
    }

    fn refusal(&self, n: u64, over_max: bool, disk_short: u64) -> Error {
        {
            let used_s = human(self.index.read().total);
            match self.policy.max_size {
                Some(m) if over_max => Error::exhausted(format!(
                    "no room for {} more bytes: max_size is {} and {used_s} is held by blobs \
                     that tags still reach or that are within orphan_grace, plus {} by uploads \
                     in progress; raise max_size or delete tags",
                    n,
                    human(m),
                    human(self.reserved())
                )),
                _ => Error::exhausted(format!(
                    "no room for {} more bytes: the filesystem holding the data directory is \
                     full ({} short) and nothing more may be evicted",
                    n,
                    human(disk_short)
                )),
            }
        }
    }

    pub fn release(&self, n: u64) {
        let _ = self
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(n))
            });
    }

    /// Bytes the filesystem lacks to take `n` more (keeping a little headroom); 0 if it fits or
    /// free space cannot be read.
    fn disk_shortfall(&self, n: u64) -> u64 {
        let Some(dir) = &self.data_dir else { return 0 };
        match rustix::fs::statvfs(dir) {
            Ok(s) => {
                let avail = s.f_bavail.saturating_mul(s.f_frsize);
                let size = s.f_blocks.saturating_mul(s.f_frsize);
                let headroom = DISK_HEADROOM.min(size / 50);
                (n + headroom).saturating_sub(avail)
            }
            Err(_) => 0,
        }
    }

    /// Wraps a writer so that its bytes are reserved before they are written.
    pub fn reserved_writer(self: &Arc<Self>, inner: Box<dyn BlobWriter>) -> Box<dyn BlobWriter> {
        Box::new(ReservedWriter {
            inner: Some(inner),
            life: self.clone(),
            held: 0,
        })
    }

    /// Blob files the index does not know, walked while no pass runs (a pass journals a blob
    /// gone before it unlinks the file; a walk between the two would see a stray that is not).
    /// Digests of uploads between their rename and their record are not strays either.
    fn with_strays<T>(&self, f: impl FnOnce(&[Digest]) -> Result<T>) -> Result<T> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut files = Vec::new();
        self.store.walk(&mut |d, _| files.push(d))?;
        let strays: Vec<Digest> = {
            let state = self.index.read();
            let pins = self.pins.map();
            files
                .into_iter()
                .filter(|d| !state.blobs.contains_key(d) && !pins.contains_key(d))
                .collect()
        };
        f(&strays)
    }

    /// How many blob files the index does not know. (On a shared bucket, other replicas'
    /// uploads in flight are not strays: there, unreferenced blobs are the collector's orphans.)
    pub fn count_strays(&self) -> Result<u64> {
        if self.shared.get().is_some() {
            return Ok(0);
        }
        self.with_strays(|s| Ok(s.len() as u64))
    }

    /// Removes files in the store that the index does not know (left by a crash between a
    /// rename and its record, or between a record and an unlink). Blocking; walks the store.
    pub fn sweep_files(&self) -> Result<u64> {
        if self.shared.get().is_some() {
            return Ok(0);
        }
        let removed = self.with_strays(|strays| {
            let mut removed = 0;
            for chunk in strays.chunks(1024) {
                let state = self.index.read();
                let pins = self.pins.map();
                for d in chunk {
                    // Re-checked under the locks: pushed again since the walk.
                    if state.blobs.contains_key(d) || pins.contains_key(d) {
                        continue;
                    }
                    self.store.delete(d)?;
                    removed += 1;
                }
            }
            Ok(removed)
        })?;
        if removed > 0 {
            tracing::info!(files = removed, "removed blob files the index did not know");
        }
        Ok(removed)
    }
}

/// A writer whose bytes are reserved against `max_size` (and the disk) before they are written.
/// Dropping it, committed or not, returns the reservation: a committed blob is counted by the
/// index from then on.
struct ReservedWriter {
    inner: Option<Box<dyn BlobWriter>>,
    life: Arc<Lifecycle>,
    held: u64,
}

impl ReservedWriter {
    /// Makes sure `upto` bytes are reserved; `exact` when the size was announced, otherwise
    /// reserves ahead (growing with the upload, capped) so a stream does not reserve per frame.
    fn ensure(&mut self, upto: u64, exact: bool) -> Result<()> {
        if upto <= self.held {
            return Ok(());
        }
        let need = upto - self.held;
        let step = if exact {
            need
        } else {
            let cap = self
                .life
                .policy
                .max_size
                .map_or(RESERVE_STEP, |m| (m / 16).clamp(1, RESERVE_STEP));
            need.max(self.held.clamp(1 << 20, RESERVE_STEP).min(cap))
        };
        self.life.reserve(step)?;
        self.held += step;
        Ok(())
    }
}

impl ReservedWriter {
    /// The inner writer, once room for `n` more bytes is reserved.
    fn room_for(&mut self, n: usize) -> Result<&mut Box<dyn BlobWriter>> {
        let upto = self.written() + n as u64;
        self.ensure(upto, false)?;
        self.inner
            .as_mut()
            .ok_or_else(|| Error::internal("write after commit"))
    }
}

impl BlobWriter for ReservedWriter {
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.room_for(buf.len())?.write(buf)
    }

    fn write_owned(&mut self, buf: Bytes) -> Result<()> {
        self.room_for(buf.len())?.write_owned(buf)
    }

    fn written(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.written())
    }

    fn aligned_from(&self) -> Option<u64> {
        self.inner.as_ref().and_then(|w| w.aligned_from())
    }

    fn park(&mut self) -> Result<()> {
        match self.inner.as_mut() {
            Some(w) => w.park(),
            None => Ok(()),
        }
    }

    fn reserve(&mut self, total: u64) -> Result<()> {
        self.ensure(total, true)
    }

    fn named(&mut self, digest: &Digest) {
        if let Some(w) = self.inner.as_mut() {
            w.named(digest)
        }
    }

    fn commit(mut self: Box<Self>, expect: Expect) -> Result<u64> {
        let inner = self
            .inner
            .take()
            .ok_or_else(|| Error::internal("commit twice"))?;
        inner.commit(expect)
    }
}

impl Drop for ReservedWriter {
    fn drop(&mut self) {
        self.life.release(self.held);
    }
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{CacheClock, Clock, ManualClock};
    use crate::digest::Algorithm;
    use crate::lifecycle::index::{ManifestMeta, Stamp};
    use crate::store::disk::{DiskStore, Durability};

    const MIN: i64 = 60_000;
    const H: i64 = 60 * MIN;

    struct World {
        _tmp: tempfile::TempDir,
        wall: Arc<ManualClock>,
        mono: Arc<ManualClock>,
        clock: Arc<CacheClock>,
        life: Lifecycle,
    }

    fn world(policy: Policy) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(
            DiskStore::open(
                tmp.path(),
                Durability::Group,
                crate::store::disk::NO_DIRECT_IO,
            )
            .unwrap(),
        );
        let (index, _) = Index::open(&tmp.path().join("index"), false).unwrap();
        let wall = ManualClock::new(100 * H);
        let mono = ManualClock::new(0);
        let clock = Arc::new(CacheClock::new(wall.clone(), mono.clone(), 0));
        let life = Lifecycle::new(Arc::new(index), store, clock.clone(), policy, None);
        World {
            _tmp: tmp,
            wall,
            mono,
            clock,
            life,
        }
    }

    fn d(s: &str) -> Digest {
        Digest::of(Algorithm::Sha256, s.as_bytes())
    }

    impl World {
        fn now(&self) -> Millis {
            self.clock.now_ms()
        }
        /// Real time passes: both clocks move.
        fn wait(&self, ms: i64) {
            self.wall.advance(ms);
            self.mono.advance(ms);
            self.clock.now_ms();
        }
        fn blob(&self, repo: &str, name: &str, size: u64) -> Digest {
            let at = self.now();
            let digest = d(name);
            self.life
                .index
                .commit(vec![
                    Op::BlobAdded { digest, size, at },
                    Op::Link {
                        repo: repo.into(),
                        digest,
                    },
                ])
                .unwrap();
            digest
        }
        fn image(&self, repo: &str, tag: &str, layers: &[Digest]) -> Digest {
            self.image_as(repo, tag, &format!("manifest {repo}:{tag}"), layers)
        }
        /// A tagged manifest whose bytes are `name` (re-pushes of a tag need new bytes).
        fn image_as(&self, repo: &str, tag: &str, name: &str, layers: &[Digest]) -> Digest {
            let at = self.now();
            let md = self.blob(repo, name, 10);
            self.life
                .index
                .commit(vec![
                    Op::ManifestPut {
                        repo: repo.into(),
                        digest: md,
                        meta: ManifestMeta {
                            size: 10,
                            pushed: at,
                            children: layers.to_vec(),
                            access: Stamp::new(at),
                            ..ManifestMeta::default()
                        },
                    },
                    Op::TagSet {
                        repo: repo.into(),
                        tag: tag.into(),
                        digest: md,
                        at,
                    },
                ])
                .unwrap();
            md
        }
        fn pull(&self, repo: &str, tag: &str) {
            let s = self.life.index.read();
            let md = s.repos[repo].tags[tag];
            self.life.index.touch_manifest(&s, repo, &md, self.now());
        }
        fn has_tag(&self, repo: &str, tag: &str) -> bool {
            let s = self.life.index.read();
            s.repos.get(repo).is_some_and(|r| r.tags.contains_key(tag))
        }
        fn has_blob(&self, x: &Digest) -> bool {
            self.life.index.read().blobs.contains_key(x)
        }
        /// Invariant 1: every tag reaches a manifest whose bytes and children are all stored.
        fn check_invariant(&self) {
            let s = self.life.index.read();
            for (name, r) in &s.repos {
                for (t, md) in &r.tags {
                    assert!(r.manifests.contains_key(md), "{name}:{t} dangles");
                }
                for (md, m) in &r.manifests {
                    assert!(s.blobs.contains_key(md), "{name}@{md} bytes gone");
                    for c in &m.children {
                        assert!(s.blobs.contains_key(c), "{name}@{md} child {c} gone");
                    }
                }
            }
            let total: u64 = s.blobs.values().map(|b| b.size).sum();
            assert_eq!(total, s.total);
        }
    }

    #[test]
    fn size_pressure_evicts_least_recently_pulled_roots_whole_and_keeps_shared_layers() {
        let w = world(Policy {
            max_size: Some(850),
            orphan_grace: H,
            ..Policy::default()
        });
        let base = w.blob("app", "base", 200);
        let mut uniq = Vec::new();
        for i in 0..4 {
            let l = w.blob("app", &format!("layer {i}"), 100);
            w.image("app", &format!("v{i}"), &[base, l]);
            uniq.push(l);
            w.wait(1000);
        }
        // Pull order makes v1 the least recently used, then v3.
        for t in ["v1", "v3", "v0", "v2"] {
            w.wait(1000);
            w.pull("app", t);
        }
        assert_eq!(w.life.index.read().total, 200 + 4 * 110);
        // Nothing to do under the high watermark (765).
        let r = w.life.pass(None).unwrap();
        assert!(r.tallies.is_empty());
        for i in 4..6 {
            let l = w.blob("app", &format!("layer {i}"), 100);
            w.image("app", &format!("v{i}"), &[base, l]);
            uniq.push(l);
        }
        // 860 > 765: evict down to 680.
        let r = w.life.pass(None).unwrap();
        w.check_invariant();
        assert!(!w.has_tag("app", "v1") && !w.has_tag("app", "v3"));
        assert!(w.has_tag("app", "v0") && w.has_tag("app", "v2") && w.has_tag("app", "v5"));
        assert!(!w.has_blob(&uniq[1]) && !w.has_blob(&uniq[3]));
        assert!(w.has_blob(&base), "a layer other tags use stays");
        assert!(w.life.index.read().total <= 680);
        let t = r.tallies[&(Reason::Size, "app".to_string())];
        assert_eq!((t.tags, t.manifests, t.blobs), (2, 2, 4));
    }

    #[test]
    fn a_pinned_blob_survives_the_eviction_of_the_last_root_naming_it() {
        // A file ref between its bytes and its manifest holds pins on both: the pass that
        // evicts the only other ref naming the shared config must leave it.
        let w = world(Policy {
            max_size: Some(300),
            orphan_grace: H,
            ..Policy::default()
        });
        let config = w.blob("gomod/a", "empty config", 2);
        let file = w.blob("gomod/a", "file", 200);
        w.image("gomod/a", "v1", &[config, file]);
        w.wait(1000);
        let pin = w.life.pins.pin(config);
        let big = w.blob("other", "big", 200);
        w.image("other", "v1", &[big]);
        let r = w.life.pass(None).unwrap();
        w.check_invariant();
        assert!(!w.has_tag("gomod/a", "v1"), "the older root went: {r:?}");
        assert!(!w.has_blob(&file));
        assert!(w.has_blob(&config), "the pinned config stays");
        drop(pin);
    }

    #[test]
    fn size_pressure_takes_superseded_manifests_before_any_tag_but_spares_an_export_in_progress() {
        let w = world(Policy {
            max_size: Some(1000),
            orphan_grace: H,
            ..Policy::default()
        });
        // Another repository's cache, pulled long ago: the least recently used tag.
        let other = w.blob("other", "other layer", 100);
        w.image("other", "cache", &[other]);
        w.wait(1000);
        // A cache tag re-pushed four times, each export with a layer of its own and a shared
        // base: three superseded manifests within orphan_grace, one live.
        let base = w.blob("app", "base", 100);
        let mut layers = Vec::new();
        let mut manifests = Vec::new();
        for i in 0..4 {
            let l = w.blob("app", &format!("gen {i}"), 150);
            manifests.push(w.image_as("app", "cache", &format!("export {i}"), &[base, l]));
            layers.push(l);
            w.wait(1000);
        }
        // An index's child pushed by digest a moment ago, its index not yet: never reached.
        let child_layer = w.blob("app", "child layer", 100);
        let child = w.blob("app", "child manifest", 10);
        let at = w.now();
        w.life
            .index
            .commit(vec![Op::ManifestPut {
                repo: "app".into(),
                digest: child,
                meta: ManifestMeta {
                    size: 10,
                    pushed: at,
                    children: vec![child_layer],
                    access: Stamp::new(at),
                    ..ManifestMeta::default()
                },
            }])
            .unwrap();
        // 100+10 + 100 + 4*(150+10) + 100+10 = 960: over the high mark (900); evict to 800.
        assert_eq!(w.life.index.read().total, 960);
        let r = w.life.pass(None).unwrap();
        w.check_invariant();
        assert!(
            w.has_tag("app", "cache") && w.has_tag("other", "cache"),
            "{r:?}"
        );
        assert!(w.has_blob(&layers[3]) && w.has_blob(&base));
        // The oldest superseded generations went first, with their own layers only.
        assert!(!w.has_blob(&manifests[0]) && !w.has_blob(&layers[0]));
        assert!(w.life.index.read().total <= 800);
        // The export in progress kept its grace.
        assert!(w.has_blob(&child) && w.has_blob(&child_layer));
        // Still over: the rest of the superseded content goes before any tag does.
        w.life.reserve(400).unwrap();
        w.check_invariant();
        for i in 0..3 {
            assert!(
                !w.has_blob(&manifests[i]) && !w.has_blob(&layers[i]),
                "gen {i}"
            );
        }
        assert!(w.has_tag("app", "cache") && w.has_tag("other", "cache"));
        assert!(w.has_blob(&child));
        w.life.release(400);
    }

    #[test]
    fn ttl_expires_only_past_ttl_plus_tolerance() {
        let w = world(Policy {
            ttl: Some(H),
            clock_skew_tolerance: 5 * MIN,
            ..Policy::default()
        });
        let l = w.blob("app", "l", 10);
        w.image("app", "old", &[l]);
        w.wait(H + 4 * MIN);
        w.life.pass(None).unwrap();
        assert!(w.has_tag("app", "old"), "within ttl + tolerance");
        w.wait(2 * MIN);
        let r = w.life.pass(None).unwrap();
        assert!(!w.has_tag("app", "old"));
        assert!(!w.has_blob(&l));
        assert_eq!(r.tallies[&(Reason::Ttl, "app".to_string())].tags, 1);
        w.check_invariant();
    }

    #[test]
    fn wall_clock_steps_cause_no_mass_eviction() {
        let w = world(Policy {
            ttl: Some(2 * H),
            clock_skew_tolerance: 5 * MIN,
            ..Policy::default()
        });
        for i in 0..50 {
            let l = w.blob("app", &format!("l{i}"), 10);
            w.image("app", &format!("t{i}"), &[l]);
            w.wait(MIN);
        }
        // The wall clock jumps 5 hours ahead: more than ttl + tolerance for every tag.
        w.wall.advance(5 * H);
        for _ in 0..10 {
            w.mono.advance(1000);
            w.wall.advance(1000);
            let r = w.life.pass(None).unwrap();
            assert!(r.tallies.is_empty(), "mass eviction after a forward step");
        }
        // And back by 8 hours: no panic, nothing expires, new stamps never precede old ones.
        w.wall.advance(-8 * H);
        let before = w.now();
        w.wait(1000);
        assert!(w.now() >= before);
        let r = w.life.pass(None).unwrap();
        assert!(r.tallies.is_empty());
        assert_eq!(w.life.index.read().repos["app"].tags.len(), 50);
        w.check_invariant();
    }

    #[test]
    fn future_stamps_are_clamped() {
        let w = world(Policy {
            ttl: Some(H),
            clock_skew_tolerance: 0,
            ..Policy::default()
        });
        let l = w.blob("app", "l", 10);
        let md = w.image("app", "t", &[l]);
        // A stamp far in the future (e.g. a journal from a machine whose clock ran ahead).
        let far = w.now() + 1000 * H;
        w.life
            .index
            .commit(vec![Op::ManifestTouched {
                repo: "app".into(),
                digest: md,
                at: far,
            }])
            .unwrap();
        w.life.pass(None).unwrap();
        assert!(w.has_tag("app", "t"), "clamped to now: age 0, not negative");
    }

    #[test]
    fn orphans_wait_for_their_grace_and_claims_protect_an_export_in_progress() {
        let w = world(Policy {
            orphan_grace: H,
            ..Policy::default()
        });
        // An export in progress: blobs pushed, manifest not yet.
        let a = w.blob("app", "a", 10);
        w.wait(59 * MIN);
        w.life.pass(None).unwrap();
        assert!(w.has_blob(&a));
        w.wait(2 * MIN);
        let r = w.life.pass(None).unwrap();
        assert!(
            !w.has_blob(&a),
            "abandoned upload collected after the grace"
        );
        assert_eq!(r.tallies[&(Reason::Orphan, "app".to_string())].blobs, 1);

        // The old cache manifest loses its tag while a new export HEADs its layer.
        let l = w.blob("app", "l", 10);
        w.image("app", "cache", &[l]);
        w.wait(2 * H);
        {
            let s = w.life.index.read();
            w.life.index.touch_blob(&s, &l, w.now());
        }
        w.life
            .index
            .commit(vec![Op::TagDeleted {
                repo: "app".into(),
                tag: "cache".into(),
            }])
            .unwrap();
        w.life.pass(None).unwrap();
        assert!(
            w.has_blob(&l),
            "claimed after the old manifest: the new export needs it"
        );
        assert!(w.life.index.read().repos["app"].manifests.is_empty());
        w.check_invariant();
    }

    #[test]
    fn index_children_and_referrers_go_with_their_root() {
        let w = world(Policy {
            ttl: Some(H),
            clock_skew_tolerance: 0,
            orphan_grace: MIN,
            ..Policy::default()
        });
        let l = w.blob("app", "l", 10);
        let child = w.image("app", "child-tag", &[l]);
        // Untag the child: only the index reaches it now.
        w.life
            .index
            .commit(vec![Op::TagDeleted {
                repo: "app".into(),
                tag: "child-tag".into(),
            }])
            .unwrap();
        let idx = w.image("app", "multi", &[child]);
        let sig = w.blob("app", "sig", 5);
        let at = w.now();
        w.life
            .index
            .commit(vec![Op::ManifestPut {
                repo: "app".into(),
                digest: sig,
                meta: ManifestMeta {
                    size: 5,
                    pushed: at,
                    subject: Some(idx),
                    access: Stamp::new(at),
                    ..ManifestMeta::default()
                },
            }])
            .unwrap();
        w.wait(30 * MIN);
        w.life.pass(None).unwrap();
        assert_eq!(w.life.index.read().repos["app"].manifests.len(), 3);
        w.wait(31 * MIN);
        w.life.pass(None).unwrap();
        assert!(w.life.index.read().repos["app"].is_empty());
        assert_eq!(w.life.index.read().total, 0);
    }

    #[test]
    fn reservations_evict_or_refuse_with_the_limit_named() {
        let w = world(Policy {
            max_size: Some(1000),
            orphan_grace: 0,
            ..Policy::default()
        });
        let l = w.blob("app", "l", 500);
        w.image("app", "t", &[l]);
        w.wait(1000);
        // Fits after evicting the tag.
        w.life.reserve(700).unwrap();
        assert!(!w.has_tag("app", "t"));
        assert_eq!(w.life.reserved(), 700);
        let e = w.life.reserve(400).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Exhausted);
        assert!(e.message.contains("max_size"), "{}", e.message);
        w.life.release(700);
        assert_eq!(w.life.reserved(), 0);
    }
}
