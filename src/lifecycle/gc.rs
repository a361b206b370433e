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

#[derive(Debug, Default)]
pub struct Report {
    pub tallies: BTreeMap<(Reason, String), Tally>,
    /// Blob files to unlink once the records are durable.
    pub victims: Vec<Digest>,
    pub freed: u64,
}

impl Report {
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

    /// Evicts roots, least recently used first, until stored bytes plus `reserved` fit `target`.
    fn shrink(&mut self, target: u64, reserved: u64) {
        let used = |p: &Plan| (p.state.total - p.report.freed).saturating_add(reserved);
        if used(self) <= target {
            return;
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
    /// Wakes the background pass when an upload pushed usage over the high watermark.
    pub wake: tokio::sync::Notify,
}

/// Uploads reserve space in steps of this much when they do not announce their size.
const RESERVE_STEP: u64 = 64 << 20;

/// Space a full filesystem keeps free for the journal and small writes.
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
            wake: tokio::sync::Notify::new(),
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
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now_ms();
        let reserved = self.reserved();
        let mut report = Report::default();
        let policy = &self.policy;
        let low = self.low_mark();
        let high = self.high_mark();
        self.index.commit_if(|state| {
            let mut plan = Plan::new(state, policy, now);
            if let Some(ttl) = policy.ttl {
                plan.expire(ttl);
            }
            plan.collect_orphans();
            let mut target = ceiling;
            if let (Some(low), Some(high)) = (low, high) {
                if state.total.saturating_add(reserved) > high {
                    target = Some(target.map_or(low, |t| t.min(low)));
                }
            }
            if let Some(t) = target {
                plan.shrink(t, reserved);
            }
            let (ops, r) = plan.into_ops();
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
        for ((reason, repo), t) in &report.tallies {
            totals.entry((*reason, repo.clone())).or_default().add(t);
            tracing::info!(
                reason = reason.as_str(),
                repository = %repo,
                tags = t.tags,
                manifests = t.manifests,
                blobs = t.blobs,
                bytes = t.bytes,
                "evicted"
            );
        }
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
        for attempt in 0..2 {
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
            if attempt == 0 {
                let mut ceiling = u64::MAX;
                if let Some(m) = self.policy.max_size.filter(|_| over_max) {
                    let low = self.low_mark().unwrap_or(m);
                    ceiling = low.min(m.saturating_sub(n));
                }
                if disk_short > 0 {
                    ceiling = ceiling.min(used.saturating_sub(disk_short));
                }
                self.pass(Some(ceiling))?;
                continue;
            }
            let used_s = human(self.index.read().total);
            return Err(match self.policy.max_size {
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
            });
        }
        Err(Error::internal("reservation loop ended"))
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
                (n + DISK_HEADROOM).saturating_sub(avail)
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

    /// Removes files in the store that the index does not know (left by a crash between a
    /// rename and its record, or between a record and an unlink). Blocking; walks the store.
    pub fn sweep_files(&self) -> Result<u64> {
        let mut strays = Vec::new();
        self.store.walk(&mut |d, _| strays.push(d))?;
        let mut removed = 0;
        for chunk in strays.chunks(1024) {
            let state = self.index.read();
            let pins = self.pins.map();
            for d in chunk {
                if state.blobs.contains_key(d) || pins.contains_key(d) {
                    continue;
                }
                self.store.delete(d)?;
                removed += 1;
            }
        }
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
    fn ensure(&mut self, upto: u64) -> Result<()> {
        if upto <= self.held {
            return Ok(());
        }
        let step = (upto - self.held).max(RESERVE_STEP.min(upto.saturating_mul(2)));
        self.life.reserve(step)?;
        self.held += step;
        Ok(())
    }
}

impl BlobWriter for ReservedWriter {
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        let inner = self
            .inner
            .as_mut()
            .ok_or_else(|| Error::internal("write after commit"))?;
        let upto = inner.written() + buf.len() as u64;
        self.ensure(upto)?;
        let inner = self
            .inner
            .as_mut()
            .ok_or_else(|| Error::internal("write after commit"))?;
        inner.write(buf)
    }

    fn written(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.written())
    }

    fn reserve(&mut self, total: u64) -> Result<()> {
        self.ensure(total)
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
