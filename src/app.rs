//! Wiring: opens the data directory (lock, store, index, crash recovery), starts the background
//! work (group commit, upload expiry) and the HTTP server, and shuts all of it down in order.

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use hyper::Response;

use crate::clock::{CacheClock, Clock, SharedClock};
use crate::config::Config;
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::http::{full, Body, Handler};
use crate::lifecycle::gc::{human, Lifecycle};
use crate::lifecycle::index::Index;
use crate::lifecycle::shared::Shared;
use crate::registry::{blocking, Registry};
use crate::store::disk::{DiskStore, Durability};
use crate::store::s3::{Bucket, LeaseState, Probe, S3Store};
use crate::store::tiered::TieredStore;
use crate::store::BlobStore;

pub struct App {
    pub config: Config,
    pub registry: Arc<Registry>,
    /// The caching module proxy at `/gomod/`.
    pub gomod: Arc<crate::gomod::GoProxy>,
    /// Cache-mount snapshots at `/snapshots/`.
    pub snapshots: Arc<crate::snapshot::Snapshots>,
    /// The Go build cache's prefetch hints.
    pub gocache_hints: crate::gocache::Hints,
    /// Tokens and scopes; `None` when no token is configured (everything allowed).
    pub auth: Option<crate::auth::Auth>,
    pub index: Arc<Index>,
    pub store: Arc<dyn BlobStore>,
    /// Woken when the disk store wants its group commit early (never, for other stores).
    sync_wanted: Arc<tokio::sync::Notify>,
    /// The S3 bucket behind the store, if any.
    pub bucket: Option<Arc<Bucket>>,
    /// Set by the background probe of the bucket; `/readyz` answers from it.
    pub ready: Arc<Readiness>,
    /// The disk tier of a tiered store.
    pub tiered: Option<Arc<TieredStore>>,
    /// The bucket shared with other replicas (S3 and tiered stores): the index is its cache.
    pub shared: Option<Arc<Shared>>,
    /// True once blobs a crash left in the store without an index record are removed (at
    /// once for a disk store; for S3 by a walk of the bucket in the background).
    pub swept: tokio::sync::watch::Sender<bool>,
    pub life: Arc<Lifecycle>,
    pub clock: Arc<CacheClock>,
    /// The previous run stopped without closing the index (crash, kill -9, power loss).
    pub was_unclean: bool,
    data_dir: PathBuf,
    /// Held for the daemon's life: a second hoard on the same directory would corrupt it.
    _lock: fs::File,
}

impl App {
    /// Opens everything under the configured data directory. After an unclean stop, blobs that
    /// no group commit vouched for are re-hashed before anything is served; corrupt ones are
    /// removed with whatever would dangle without them.
    /// `clock_offset_ms` skews the wall clock (the `HOARD_CLOCK_OFFSET` test hook).
    pub fn open(config: Config, clock_offset_ms: i64) -> Result<App> {
        let (root, disk) = config.disk();
        fs::create_dir_all(&root)
            .map_err(|e| Error::io(format!("creating data directory {}", root.display()), e))?;
        let lock = lock_dir(&root)?;
        let index_dir = root.join("index");
        let clean_marker = index_dir.join("clean");
        let was_clean = clean_marker.exists();
        let (store, sync_wanted, bucket, tiered): (Arc<dyn BlobStore>, _, _, _) =
            match &config.store {
                StoreConfig::Disk(_) => {
                    let d = DiskStore::open(&root, disk.durability, disk.direct_io_above())?;
                    let wanted = d.sync_wanted();
                    (Arc::new(d), wanted, None, None)
                }
                StoreConfig::S3(s3) => {
                    let b = Arc::new(Bucket::new(s3, local_clock(clock_offset_ms))?);
                    let store = Arc::new(S3Store::new(b.clone()));
                    (store, Default::default(), Some(b), None)
                }
                StoreConfig::Tiered { fast, slow } => {
                    let b = Arc::new(Bucket::new(slow, local_clock(clock_offset_ms))?);
                    let path = fast.path.clone().unwrap_or_else(|| root.join("fast"));
                    let d = DiskStore::open(&path, Durability::Group, disk.direct_io_above())?;
                    let t = Arc::new(TieredStore::new(
                        d,
                        S3Store::new(b.clone()),
                        fast.max_size.0,
                        !was_clean,
                    )?);
                    (
                        t.clone() as Arc<dyn BlobStore>,
                        Default::default(),
                        Some(b),
                        Some(t),
                    )
                }
            };
        let started = std::time::Instant::now();
        let (index, records) = Index::open(&index_dir, disk.durability == Durability::Sync)?;
        let index = Arc::new(index);
        if let Some(ttl) = config.ttl {
            // Reads are recorded (and, on a shared bucket, shipped to the collector) at most
            // once per debounce: a quarter of the TTL at most, so a tag read steadily never
            // looks idle for long against it.
            let quarter = i64::try_from(ttl.0.as_millis() / 4).unwrap_or(i64::MAX);
            index.set_debounce(quarter.clamp(1_000, crate::lifecycle::index::ACCESS_DEBOUNCE));
        }
        if was_clean {
            fs::remove_file(&clean_marker)
                .map_err(|e| Error::io(format!("removing {}", clean_marker.display()), e))?;
        }
        {
            let s = index.read();
            tracing::info!(
                records,
                blobs = s.blobs.len(),
                repositories = s.repos.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "index loaded"
            );
        }
        let was_unclean = !was_clean && records > 0;
        if was_unclean && !store.durable_on_commit() {
            recover(&*store, &index)?;
        }
        let floor = index.read().clock_floor;
        let me = replica_id(&root)?;
        let clock = Arc::new(match &bucket {
            None => CacheClock::system(clock_offset_ms, floor),
            Some(b) => {
                // One clock for every replica of the bucket: the S3 service's. Its offset is
                // measured before cache time starts (and kept up to date by every answer), so
                // a machine whose clock is hours off ages nothing by it.
                let s3 = config.store.s3().cloned();
                match b.probe_within(Duration::from_secs(3)) {
                    Ok(p) => {
                        let single = s3.as_ref().is_some_and(|c| c.single_writer);
                        allow_writes(b, &p, single)?;
                        if b.single_writer() {
                            match b.lease_blocking(&me) {
                                Ok(msg) => tracing::info!("{msg}"),
                                Err(e) => {
                                    tracing::warn!(error = %e.message, "no writer lease yet; retrying")
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, "cannot reach S3 at start; cache time follows this machine's clock until it answers")
                    }
                }
                CacheClock::new(
                    b.clock.clone() as SharedClock,
                    Arc::new(crate::clock::MonoClock::new()),
                    floor,
                )
            }
        });
        let life = Arc::new(Lifecycle::new(
            index.clone(),
            store.clone() as Arc<dyn BlobStore>,
            clock.clone() as SharedClock,
            config.policy(),
            bucket.is_none().then(|| root.clone()),
        ));
        let shared = match (&bucket, config.store.s3()) {
            (Some(b), Some(s3)) => {
                let s = Arc::new(Shared::new(
                    b.clone(),
                    index.clone(),
                    clock.clone() as SharedClock,
                    me,
                    s3.timing(),
                ));
                let _ = life.shared.set(s.clone());
                if b.writable() {
                    // Alive and, if free, the collector's lease before the first request: a
                    // write that needs room right away can be given it.
                    if let Err(e) = s.block(|s| async move { s.heartbeat().await }) {
                        tracing::warn!(error = %e.message, "the first heartbeat to the bucket failed");
                    }
                }
                Some(s)
            }
            _ => None,
        };
        if was_unclean && bucket.is_none() {
            // Files renamed but never journaled, or journaled gone but not yet unlinked.
            life.sweep_files()?;
        }
        let mut registry = Registry::new(life.clone()).with_max_transfers(config.max_transfers);
        registry.body_timeout = config.body_timeout.0;
        if disk.durability == Durability::Group && !store.durable_on_commit() {
            // A sync point normally lands within one interval (plus its own fsync); twice that
            // means the disk is behind the writes, and new ones wait rather than pile up.
            registry.unsynced_bound = Some(disk.sync_interval.0 * 2);
        }
        let registry = Arc::new(registry);
        let gomod = Arc::new(crate::gomod::GoProxy::new(
            registry.clone(),
            &config.gomod,
            root.join("gomod-tmp"),
        )?);
        let snapshots = Arc::new(crate::snapshot::Snapshots::new(
            registry.clone(),
            root.join("snapshot-tmp"),
        )?);
        let auth = crate::auth::Auth::from_config(&config.auth)
            .map_err(|e| Error::invalid(crate::error::What::Parameter, format!("[auth]: {e}")))?;
        Ok(App {
            config,
            registry,
            gomod,
            snapshots,
            gocache_hints: crate::gocache::Hints::default(),
            auth,
            index,
            store,
            sync_wanted,
            ready: Arc::new(Readiness::new(bucket.is_none())),
            // On a bucket, what a crash left unrecorded is an orphan for the collector.
            swept: tokio::sync::watch::Sender::new(true),
            bucket,
            tiered,
            shared,
            life,
            clock,
            was_unclean,
            data_dir: root,
            _lock: lock,
        })
    }

    /// Final group commit, compacted journal, clean marker: the next start replays quickly and
    /// skips re-verification.
    pub fn close(&self) -> Result<()> {
        let store = self.store.clone();
        self.index.flush_touches(self.clock.now_ms())?;
        self.index.sync_point(|| store.sync())?;
        let n = self.index.compact()?;
        let marker = self.data_dir.join("index").join("clean");
        fs::write(&marker, b"")
            .map_err(|e| Error::io(format!("writing {}", marker.display()), e))?;
        crate::lifecycle::journal::sync_dir(&self.data_dir.join("index"))?;
        if let Some(s) = &self.shared {
            let s2 = s.clone();
            let _ = s.bucket.wait_on(async move { s2.leave().await });
        }
        if let Some(b) = &self.bucket {
            if b.single_writer() {
                let b2 = b.clone();
                let _ = b.wait_on(async move { b2.release_lease().await });
            }
        }
        tracing::info!(records = n, "index compacted; clean shutdown");
        Ok(())
    }

    /// The group-commit tick: queued access records, then the sync point.
    pub fn group_commit(&self) -> Result<()> {
        let touched = self.index.flush_touches(self.clock.now_ms())?;
        if let Some(s) = &self.shared {
            s.queue_access(&touched);
        }
        let store = self.store.clone();
        self.index.sync_point(|| store.sync())
    }

    /// On a shared bucket, why this replica does not collect now (another holds the lease).
    pub fn not_collector(&self) -> Option<String> {
        let s = self.shared.as_ref()?;
        if s.holds_gc() {
            return None;
        }
        let holder = s
            .gc_holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "no replica yet".into());
        Some(format!(
            "this replica does not collect garbage: the collector's lease of the bucket is held \
             by {holder}, which runs the passes (ask it: POST /admin/gc)\n"
        ))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What this daemon runs with, for the start-up log and the status page.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let c = &self.config;
        let (_, disk) = c.disk();
        let abs = fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        let p = &self.life.policy;
        vec![
            ("data_dir", abs.display().to_string()),
            (
                "store",
                match &c.store {
                    StoreConfig::Disk(_) => "disk".into(),
                    StoreConfig::S3(s3) => format!("s3 ({})", s3.describe()),
                    StoreConfig::Tiered { fast, slow } => format!(
                        "tiered (disk tier of {} in front of s3, {})",
                        human(fast.max_size.0),
                        slow.describe()
                    ),
                },
            ),
            (
                "durability",
                match disk.durability {
                    _ if self.store.durable_on_commit() => "in S3 before each answer".into(),
                    Durability::Sync => "sync (every blob fsynced before its answer)".into(),
                    Durability::Group => format!(
                        "group (fsync every {})",
                        crate::config::show_duration(disk.sync_interval.0)
                    ),
                },
            ),
            ("max_size", p.max_size.map_or("unbounded".into(), human)),
            (
                "watermarks",
                format!(
                    "{:.0}% / {:.0}%",
                    c.high_watermark.0 * 100.0,
                    c.low_watermark.0 * 100.0
                ),
            ),
            (
                "ttl",
                c.ttl
                    .map_or("none".into(), |t| crate::config::show_duration(t.0)),
            ),
            (
                "clock_skew_tolerance",
                crate::config::show_duration(c.clock_skew_tolerance.0),
            ),
            (
                "orphan_grace",
                crate::config::show_duration(c.orphan_grace.0),
            ),
            (
                "upload_timeout",
                crate::config::show_duration(c.upload_timeout.0),
            ),
            ("max_transfers", c.max_transfers.to_string()),
            (
                "body_timeout",
                crate::config::show_duration(c.body_timeout.0),
            ),
            (
                "send_timeout",
                crate::config::show_duration(c.send_timeout.0),
            ),
            ("access_log", c.access_log.to_string()),
        ]
    }
}

/// This hoard's name in the bucket's writer lease, kept in the data directory so a restart
/// (after a crash too) takes its own lease back at once instead of waiting for it to expire.
pub fn replica_id(root: &Path) -> Result<String> {
    let path = root.join("replica-id");
    match fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    }
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let id = format!(
        "{host}/{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    );
    fs::write(&path, format!("{id}\n"))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(id)
}

/// This machine's wall clock, skewed by the test hook.
fn local_clock(offset_ms: i64) -> SharedClock {
    if offset_ms == 0 {
        Arc::new(crate::clock::SystemClock)
    } else {
        Arc::new(crate::clock::OffsetClock(offset_ms))
    }
}

/// Whether the daemon can do its job: the store reachable. `None` is ready; otherwise why not.
pub struct Readiness(std::sync::Mutex<Option<String>>);

impl Readiness {
    fn new(ready: bool) -> Readiness {
        Readiness(std::sync::Mutex::new(
            (!ready).then(|| "the S3 bucket has not been reached yet".to_owned()),
        ))
    }
    pub fn why_not(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set(&self, why_not: Option<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = why_not;
    }
}

/// Stops writing before an unrenewed writer lease could expire (another hoard may then take it).
fn lease_timeout(bucket: &Bucket, renewed: tokio::time::Instant) {
    let limit = Duration::from_millis((crate::store::s3::LEASE_MS / 3 * 2) as u64);
    if bucket.writable() && renewed.elapsed() > limit {
        tracing::error!(bucket = %bucket.describe, "the writer lease could not be renewed; writes stop until it is");
        bucket.drop_lease();
    }
}

/// What the probe of the bucket allows. A service that honours conditional writes is shared
/// by any number of replicas. One that ignores them is refused, naming what is missing, unless
/// the operator said it is used by one hoard alone (`single_writer`): then conditions are not
/// sent and a writer lease (the best such a service allows) keeps a second hoard out.
pub fn allow_writes(b: &Bucket, p: &Probe, single_writer: bool) -> Result<()> {
    if p.conditional_writes {
        if !p.conditional_deletes {
            tracing::warn!(
                bucket = %b.describe,
                "this S3 service ignores If-Match on DeleteObject: a tag deletion compares the \
                 tag's ETag just before deleting it, so a push landing in between can still be \
                 undone by a client's DELETE or an expiry (the service's own conditional \
                 deletes would rule that out)"
            );
        }
        b.set_conditions(true);
        b.set_writable(true);
        return Ok(());
    }
    if !single_writer {
        b.set_writable(false);
        return Err(Error::new(
            crate::error::ErrorKind::Unavailable,
            format!(
                "{}: this S3 service ignores conditional writes (If-None-Match: * and If-Match \
                 on PutObject: it overwrote an object both forbade), which hoard needs to share \
                 a bucket between replicas without losing updates. Use a service that honours \
                 them (AWS S3, MinIO, Ceph RGW and Cloudflare R2 do), or, to run exactly one \
                 hoard on this bucket, set store.single_writer = true \
                 (HOARD_STORE_SINGLE_WRITER=true)",
                b.describe
            ),
        ));
    }
    b.set_conditions(false);
    tracing::warn!(
        bucket = %b.describe,
        "SINGLE WRITER: this S3 service ignores conditional writes; hoard runs as the bucket's \
         only writer (store.single_writer = true). A second hoard on this bucket and prefix \
         can lose tag updates and delete blobs the other still needs: do not start one"
    );
    Ok(())
}

/// How often the bucket is checked while it is reachable (while it is not: every second).
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// Checks the bucket until it answers (credentials, the bucket itself, conditional writes), then
/// keeps checking it, so `/readyz` follows S3 going away and coming back without a restart; says
/// this replica is alive and holds or renews the collector's lease.
async fn watch_bucket(app: Arc<App>, bucket: Arc<Bucket>) {
    let tolerance =
        i64::try_from(app.config.clock_skew_tolerance.0.as_millis()).unwrap_or(i64::MAX);
    let single = app.config.store.s3().is_some_and(|c| c.single_writer);
    // The start-up probe may have settled it already.
    let mut probed = bucket.writable();
    let mut first = true;
    let mut warned_skew = false;
    let me = match replica_id(&app.data_dir) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "no replica id; this hoard cannot use the bucket");
            app.ready.set(Some(e.message));
            return;
        }
    };
    let period = app
        .shared
        .as_ref()
        .map_or(PROBE_EVERY, |s| s.timing.heartbeat.min(PROBE_EVERY));
    let mut renewed = tokio::time::Instant::now();
    let mut busy_logged = false;
    // Uploads a crashed run (or a failed abort) left in the bucket: cleared at start, then
    // hourly, so a bucket without a lifecycle rule for them does not keep paying for them.
    let mut swept_uploads: Option<std::time::Instant> = None;
    loop {
        let was_ready = app.ready.why_not().is_none();
        let b = bucket.clone();
        let full = !probed;
        let checked = bucket
            .run(async move {
                if full {
                    b.probe().await.map(Some)
                } else {
                    b.check().await.map(|()| None)
                }
            })
            .await
            .and_then(|r| r);
        match checked {
            Ok(p) => {
                if let Some(p) = p {
                    tracing::info!(
                        bucket = %bucket.describe,
                        conditional_writes = p.conditional_writes,
                        conditional_deletes = p.conditional_deletes,
                        clock_offset_ms = bucket.clock.offset_ms(),
                        "S3 bucket reachable"
                    );
                    if let Err(e) = allow_writes(&bucket, &p, single) {
                        tracing::error!("{}", e.message);
                        app.ready.set(Some(e.message));
                        tokio::time::sleep(PROBE_EVERY).await;
                        continue;
                    }
                    probed = true;
                } else if !was_ready && !first {
                    tracing::info!(bucket = %bucket.describe, "S3 bucket reachable again");
                }
                first = false;
                if swept_uploads.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                    let (b, age) = (bucket.clone(), app.config.upload_timeout.0);
                    match bucket
                        .run(async move { b.sweep_uploads(age).await })
                        .await
                        .and_then(|r| r)
                    {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(removed = n, "removed uploads a previous run left in S3")
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot clear old uploads in S3"),
                    }
                    swept_uploads = Some(std::time::Instant::now());
                }
                if single {
                    let b = bucket.clone();
                    let who = me.clone();
                    match bucket
                        .run(async move { b.hold_lease(&who).await })
                        .await
                        .and_then(|r| r)
                    {
                        Ok(LeaseState::Held) => {
                            renewed = tokio::time::Instant::now();
                            if busy_logged {
                                tracing::info!(bucket = %bucket.describe, "took the bucket's writer lease");
                                busy_logged = false;
                            }
                            app.ready.set(None);
                        }
                        Ok(LeaseState::Busy { holder, expires }) => {
                            bucket.drop_lease();
                            let why = format!(
                                "{} is in use by another hoard ({holder}), whose writer lease runs \
                                 until {}; a single-writer bucket has one hoard at a time",
                                bucket.describe,
                                crate::clock::rfc3339(expires)
                            );
                            if !busy_logged {
                                tracing::warn!("{why}");
                                busy_logged = true;
                            }
                            app.ready.set(Some(why));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e.message, "renewing the writer lease failed");
                            lease_timeout(&bucket, renewed);
                        }
                    }
                } else {
                    if !was_ready {
                        tracing::info!(bucket = %bucket.describe, "ready");
                    }
                    app.ready.set(None);
                }
                if let Some(s) = &app.shared {
                    if let Err(e) = s.heartbeat().await {
                        tracing::warn!(error = %e.message, "the heartbeat to the bucket failed");
                    }
                }
                let off = bucket.clock.offset_ms();
                if off.abs() > tolerance && !warned_skew {
                    tracing::warn!(
                        clock_offset_ms = off,
                        "this machine's clock is off from the S3 service's by more than \
                         clock_skew_tolerance; hoard ages everything by the S3 service's clock"
                    );
                    warned_skew = true;
                }
                tokio::time::sleep(period).await;
            }
            Err(e) => {
                if was_ready || first {
                    tracing::error!(error = %e.message, "S3 bucket unreachable; not ready (retrying)");
                }
                first = false;
                app.ready.set(Some(e.message));
                if single {
                    lease_timeout(&bucket, renewed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Keeps a replica's cache in line with a shared bucket: re-lists it every `refresh`, reads the
/// collector's announcements and ships reads every `poll`.
async fn follow_bucket(app: Arc<App>, s: Arc<Shared>) {
    let refresh = {
        let s = s.clone();
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                if app.ready.why_not().is_none() {
                    if let Err(e) = s.refresh().await {
                        tracing::warn!(error = %e.message, "re-listing the bucket failed; will retry");
                    }
                    tokio::time::sleep(s.timing.refresh).await;
                } else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        })
    };
    // Announcements an earlier run of this replica left pending (a crash mid-collection).
    let mut last_tidy: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(s.timing.poll).await;
        if app.ready.why_not().is_some() {
            continue;
        }
        if let Err(e) = s.poll_doomed().await {
            tracing::debug!(error = %e.message, "reading the collector's announcements failed");
        }
        if let Err(e) = s.flush_access().await {
            tracing::debug!(error = %e.message, "shipping access records failed; kept for the next round");
        }
        if last_tidy.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            last_tidy = Some(tokio::time::Instant::now());
            if let Err(e) = s.close_abandoned().await {
                tracing::debug!(error = %e.message, "closing abandoned collections failed");
            }
        }
        if refresh.is_finished() {
            return;
        }
    }
}

/// Where a running daemon writes its address, so `hoard gc --once` and `hoard verify` pointed at
/// the same data directory can ask it instead of opening the store twice.
pub const SERVING_FILE: &str = "serving";

fn lock_dir(root: &Path) -> Result<fs::File> {
    let path = root.join("LOCK");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        Error::new(
            crate::error::ErrorKind::Conflict,
            format!(
                "another hoard process is using {}; stop it or choose another --data-dir",
                root.display()
            ),
        )
    })?;
    Ok(f)
}

fn recover(store: &dyn BlobStore, index: &Index) -> Result<()> {
    let suspects = index.unsynced();
    tracing::warn!(
        blobs = suspects.len(),
        "unclean shutdown: re-verifying blobs written since the last sync point"
    );
    let mut bad = HashSet::new();
    for d in &suspects {
        match crate::store::verify(store, d) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                tracing::warn!(digest = %d, "blob is corrupt or missing after the crash; removing it");
                store.delete(d)?;
                bad.insert(*d);
            }
        }
    }
    for m in index.drop_blobs(&bad)? {
        tracing::warn!(manifest = %m, "removed a manifest whose blobs were lost in the crash");
    }
    index.sync_point(|| store.sync())
}

/// Runs the daemon on `listener` (bound, non-blocking) until SIGINT/SIGTERM.
pub async fn serve(
    config: Config,
    clock_offset_ms: i64,
    listener: std::net::TcpListener,
) -> anyhow::Result<()> {
    let grace = config.shutdown_timeout.0;
    let upload_timeout = config.upload_timeout.0;
    let sync_interval = config.disk().1.sync_interval.0;
    let gc_interval = config.gc_interval.0;
    // Bound by the caller before the store is opened: a start that cannot serve fails before
    // it touches the store, so the store stays marked clean and the next start skips crash
    // recovery.
    // TLS files too are read before the store is opened.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = Arc::new(crate::tls::Tls::load(cert, key).map_err(anyhow::Error::msg)?);
            let reloading = tls.clone();
            tokio::spawn(async move {
                let Ok(mut hup) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match reloading.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate and key read again"),
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: TLS reload failed; the certificate in use stays")
                        }
                    }
                }
            });
            Some(tls)
        }
        _ => None,
    };
    let grpc_tcp = match &config.grpc_listen {
        // Checked before the store is opened, like every reason not to start.
        Some(_) if !config.auth.enabled() => anyhow::bail!(
            "grpc_listen needs [auth] tokens: over TCP every call must carry one (the admin \
             API can evict everything); without tokens use the unix socket"
        ),
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen for gRPC on {addr}: {e}"))?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local: SocketAddr = listener.local_addr()?;
    let app = {
        let config = config.clone();
        blocking(move || App::open(config, clock_offset_ms)).await?
    };
    let app = Arc::new(app);
    let serving = app.data_dir.join(SERVING_FILE);
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    if let Err(e) = fs::write(&serving, format!("{scheme}://{local}\n")) {
        tracing::warn!(error = %e, "cannot write {}", serving.display());
    }
    let settings: Vec<String> = app
        .settings()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!("settings: {}", settings.join(", "));
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let content = {
        app.registry
            .uploads
            .open_ingests(app.data_dir.join("ingest"), app.life.clone())?;
        Arc::new(crate::containerd::Content::new(
            app.registry.clone(),
            app.life.policy.clock_skew_tolerance,
        ))
    };
    let content_upkeep = {
        let content = content.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                if let Err(e) = content.expire_leases().await {
                    tracing::warn!(error = %e, "lease expiry failed; will retry");
                }
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc_tasks = crate::grpc::serve(&app, &content, tls.clone(), grpc_tcp, stop_rx.clone())?;
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    tracing::info!("listening on {scheme}://{local}");

    let group_commit = {
        let app = app.clone();
        let wanted = app.sync_wanted.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sync_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = wanted.notified() => {}
                }
                let app = app.clone();
                if let Err(e) = blocking(move || app.group_commit()).await {
                    tracing::error!(error = %e, "group commit failed; will retry");
                }
            }
        })
    };
    let lifecycle = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(gc_interval) => {}
                    _ = app.life.wake.notified() => {}
                }
                match timed_pass(app.life.clone()).await {
                    Ok(r) => tracing::debug!(
                        removed = r.victims.len(),
                        freed = r.freed,
                        "lifecycle pass"
                    ),
                    Err(e) => tracing::error!(error = %e, "lifecycle pass failed; will retry"),
                }
            }
        })
    };
    let watcher = app
        .bucket
        .clone()
        .map(|b| tokio::spawn(watch_bucket(app.clone(), b)));
    let follower = app
        .shared
        .clone()
        .map(|s| tokio::spawn(follow_bucket(app.clone(), s)));
    if !*app.swept.borrow() {
        // After an unclean stop: objects committed to S3 whose record the crash took (their
        // uploads were never acknowledged). Walking the bucket takes a while, so it runs
        // beside serving; pins keep uploads in flight out of it.
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                let life = app.life.clone();
                match blocking(move || life.sweep_files()).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot walk the bucket for objects a crash left; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
            app.swept.send_replace(true);
        });
    }
    let sampler = tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            crate::metrics::sample(now);
        }
    });
    let expiry = {
        let reg = app.registry.clone();
        let period = (upload_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut last_ingest_sweep: Option<std::time::Instant> = None;
            loop {
                tick.tick().await;
                let n = reg.uploads.expire(upload_timeout.as_millis() as i64);
                if n > 0 {
                    tracing::info!(sessions = n, "expired idle upload sessions");
                }
                // containerd's ingests: idle for a day (a client may resume one after a long
                // stop); their directory is read at most hourly.
                if last_ingest_sweep.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                    last_ingest_sweep = Some(std::time::Instant::now());
                    let reg = reg.clone();
                    let n = blocking(move || reg.uploads.expire_ingests(INGEST_IDLE_MS)).await;
                    if n > 0 {
                        tracing::info!(ingests = n, "removed content ingests idle for a day");
                    }
                }
            }
        })
    };

    let handler: Handler = {
        let app = app.clone();
        Arc::new(move |req| {
            let app = app.clone();
            Box::pin(async move { route(&app, req).await })
        })
    };
    let limits = crate::http::ConnLimits {
        send_timeout: app.config.send_timeout.0,
        header_timeout: app.config.body_timeout.0,
        access_log: app.config.access_log,
    };
    let mut http_stop = stop_rx.clone();
    let stopped = async move {
        let _ = http_stop.wait_for(|s| *s).await;
    };
    crate::http::serve(listener, handler, stopped, grace, limits, tls).await;
    for t in grpc_tasks {
        if tokio::time::timeout(grace, t).await.is_err() {
            tracing::warn!("gRPC calls still running after the shutdown timeout; stopping anyway");
        }
    }
    content_upkeep.abort();
    group_commit.abort();
    sampler.abort();
    lifecycle.abort();
    expiry.abort();
    if let Some(w) = watcher {
        w.abort();
    }
    if let Some(f) = follower {
        f.abort();
    }
    let _ = fs::remove_file(&serving);
    let closing = app.clone();
    blocking(move || closing.close()).await?;
    Ok(())
}

async fn route(app: &Arc<App>, req: hyper::Request<hyper::body::Incoming>) -> Response<Body> {
    if req.uri().path() == "/token" {
        return token_endpoint(app, req).await;
    }
    let req = match &app.auth {
        Some(auth) => match authorize(auth, req) {
            Ok(req) => req,
            Err(refused) => return refused,
        },
        None => req,
    };
    let path = req.uri().path();
    if path == "/v2" || path.starts_with("/v2/") {
        let mut req = req;
        if req.uri().path() == "/v2" {
            // Some clients ping /v2 without the slash.
            *req.uri_mut() = http::Uri::from_static("/v2/");
        }
        return crate::oci::handle(app.registry.clone(), req).await;
    }
    if path.starts_with("/snapshots/") {
        return app.snapshots.handle(req).await;
    }
    if path.starts_with("/gocache/") {
        return crate::gocache::handle(&app.registry, &app.gocache_hints, req).await;
    }
    if path.starts_with("/gomod/") {
        return app.gomod.handle(req).await;
    }
    if path.starts_with("/admin/") {
        return admin(app, req).await;
    }
    let wants_html = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match app.ready.why_not() {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics_text(app));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/status.json" => {
            let mut r = text(StatusCode::OK, status_json(app));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        // Browsers get the page; everything else (curl, scripts, the tests) the text.
        "/" if wants_html => {
            let mut r = text(StatusCode::OK, STATUS_HTML.into());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r.headers_mut().insert(
                "content-security-policy",
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                ),
            );
            r
        }
        "/" => text(StatusCode::OK, status_page(app)),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Checks a request against the tokens before any front end sees it: the request back (a
/// cross-repository mount from a repository the caller may not read becomes a plain upload),
/// or the refusal to send.
#[allow(clippy::result_large_err)]
fn authorize(
    auth: &crate::auth::Auth,
    mut req: hyper::Request<hyper::body::Incoming>,
) -> std::result::Result<hyper::Request<hyper::body::Incoming>, Response<Body>> {
    use crate::auth::{Need, Verdict, Who};
    let Some(need) = crate::auth::need_of(req.method(), req.uri().path(), req.uri().query()) else {
        return Ok(req);
    };
    let header = |n: http::header::HeaderName| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let host = header(http::header::HOST).unwrap_or_else(|| "localhost".into());
    let secure = req.extensions().get::<crate::http::Secure>().is_some();
    let is_head = req.method() == http::Method::HEAD;
    let refuse = |status: StatusCode, need: Option<&Need>, why: String, insufficient: bool| {
        let oci = need.is_none_or(|n| n.oci);
        let mut r = if oci {
            let code = if status == StatusCode::FORBIDDEN {
                crate::oci::errors::Code::Denied
            } else {
                crate::oci::errors::Code::Unauthorized
            };
            let mut r = crate::oci::error_response(
                &crate::oci::errors::OciError::new(code, why).with_status(status),
                is_head,
            );
            r.headers_mut().insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            r
        } else {
            text(status, format!("{why}\n"))
        };
        if status == StatusCode::UNAUTHORIZED {
            if let Ok(v) = HeaderValue::from_str(&auth.challenge(need, &host, secure, insufficient))
            {
                r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
            }
        }
        r
    };
    let who = match auth.identify(header(http::header::AUTHORIZATION).as_deref()) {
        Ok(w) => w,
        Err(why) => {
            tracing::info!(method = %req.method(), path = %req.uri().path(), reason = %why, "refused: bad credentials");
            return Err(refuse(StatusCode::UNAUTHORIZED, need.as_ref(), why, false));
        }
    };
    let Some(need) = need else {
        // The /v2/ ping: any identity but no identity.
        return match who {
            Who::Anonymous => Err(refuse(
                StatusCode::UNAUTHORIZED,
                None,
                "authentication required".into(),
                false,
            )),
            _ => Ok(req),
        };
    };
    match auth.check(&who, &need) {
        Verdict::Allow => {}
        Verdict::Challenge { why, insufficient } => {
            tracing::info!(method = %req.method(), path = %req.uri().path(), token = %auth.name_of(&who), reason = %why, "refused");
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                Some(&need),
                why,
                insufficient,
            ));
        }
        Verdict::Deny { why } => {
            tracing::info!(method = %req.method(), path = %req.uri().path(), token = %auth.name_of(&who), reason = %why, "refused");
            return Err(refuse(StatusCode::FORBIDDEN, Some(&need), why, false));
        }
    }
    // A mount reads the repository it comes from; one without `from` (any repository) or
    // from one the caller may not read becomes a plain upload. Keys as the front end decodes
    // them.
    if need.oci && req.method() == http::Method::POST {
        let pairs = crate::oci::query(&req);
        if pairs.iter().any(|(k, _)| k == "mount") {
            let readable = crate::oci::query_one(&pairs, "from").is_some_and(|from| {
                let (front, name) = crate::auth::front_of_repo(from);
                let read = Need {
                    front,
                    name: Some(name),
                    action: crate::auth::READ,
                    oci: true,
                    prefix_query: false,
                };
                matches!(auth.check(&who, &read), Verdict::Allow)
            });
            if !readable {
                let kept: Vec<&str> = req
                    .uri()
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .filter(|kv| {
                        let k = kv.split_once('=').map_or(*kv, |(k, _)| k);
                        let k = crate::oci::percent_decode(&k.replace('+', " "));
                        !kv.is_empty() && k != "mount" && k != "from"
                    })
                    .collect();
                let pq = if kept.is_empty() {
                    req.uri().path().to_owned()
                } else {
                    format!("{}?{}", req.uri().path(), kept.join("&"))
                };
                if let Ok(uri) = pq.parse() {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
    Ok(req)
}

/// `/token`: distribution's token endpoint (`GET` with Basic credentials or none) and the
/// OAuth2 password grant (`POST`, form-encoded), as registry clients use them.
async fn token_endpoint(
    app: &Arc<App>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Response<Body> {
    use http_body_util::BodyExt as _;
    let Some(auth) = &app.auth else {
        return text(
            StatusCode::NOT_FOUND,
            "no tokens are configured: every request is allowed without one\n".into(),
        );
    };
    let json = |status: StatusCode, body: String| {
        let mut r = Response::new(full(body));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    let refuse = |why: String| {
        tracing::info!(reason = %why, "token refused");
        let mut r = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": why}], "error": "invalid_grant"}).to_string(),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", auth.service)) {
            r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
        r
    };
    match *req.method() {
        http::Method::GET => {
            let pairs = crate::oci::form_pairs(req.uri().query().unwrap_or(""));
            let scopes: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k == "scope")
                .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let authz = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match auth.identify(authz) {
                // A token from /token does not buy another: it would outlive its own expiry.
                Ok(crate::auth::Who::Signed(_)) => {
                    refuse("present a configured token (Basic), not one from /token".into())
                }
                Ok(who) => json(StatusCode::OK, auth.issue(&who, &scopes)),
                Err(why) => refuse(why),
            }
        }
        http::Method::POST => {
            let body = match http_body_util::Limited::new(req.into_body(), 64 << 10)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "invalid_request", "error_description": e.to_string()}).to_string(),
                    )
                }
            };
            let pairs = crate::oci::form_pairs(&String::from_utf8_lossy(&body));
            let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let scopes: Vec<String> = get("scope")
                .unwrap_or_default()
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            let secret = match get("grant_type").as_deref() {
                Some("password") => get("password"),
                Some("refresh_token") => get("refresh_token"),
                _ => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "unsupported_grant_type"}).to_string(),
                    )
                }
            };
            let Some(secret) = secret else {
                return refuse("no password in the grant".into());
            };
            let who = match auth.identify(Some(&format!("Bearer {secret}"))) {
                Ok(w @ crate::auth::Who::Token(_)) => w,
                _ => return refuse("unknown token".into()),
            };
            json(StatusCode::OK, auth.issue(&who, &scopes))
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Operator endpoints (the same trust level as the registry's DELETE): `POST /admin/gc` runs a
/// lifecycle pass now, `POST /admin/verify[?repair=true]` re-hashes every blob.
async fn admin(app: &Arc<App>, req: hyper::Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != http::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
    }
    let repair = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "repair=true" || kv == "repair=1")
    });
    match req.uri().path() {
        "/admin/gc" => match crate::admin::gc(app).await {
            Ok(r) => text(StatusCode::OK, r.text),
            Err(e) if e.kind == crate::error::ErrorKind::Conflict => {
                text(StatusCode::CONFLICT, e.message)
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/admin/verify" => match crate::admin::verify(app, repair).await {
            Ok(r) => {
                let status = if r.clean || r.repaired {
                    StatusCode::OK
                } else {
                    StatusCode::CONFLICT
                };
                text(status, r.text)
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// A pass's result as text: one line per reason and repository, then the total.
pub(crate) async fn timed_pass(life: Arc<Lifecycle>) -> Result<crate::lifecycle::gc::Report> {
    let started = std::time::Instant::now();
    let pass = blocking(move || life.pass(None)).await;
    crate::metrics::gc_pass(started.elapsed());
    pass
}

pub fn render_pass(r: &crate::lifecycle::gc::Report) -> String {
    let mut s = String::new();
    for ((reason, repo), t) in &r.tallies {
        s.push_str(&format!(
            "evicted reason={} repository={repo} tags={} manifests={} blobs={} bytes={}\n",
            reason.as_str(),
            t.tags,
            t.manifests,
            t.blobs,
            t.bytes
        ));
    }
    let t = r.total();
    s.push_str(&format!(
        "gc: removed {} tags, {} manifests, {} blobs, freed {} bytes\n",
        t.tags, t.manifests, t.blobs, r.freed
    ));
    s
}

/// A content ingest nobody wrote to for this long is removed.
const INGEST_IDLE_MS: i64 = 24 * 3600 * 1000;

const STATUS_HTML: &str = include_str!("status.html");

/// What the index holds, for the status page, its JSON and `/metrics`.
pub(crate) struct Counts {
    pub bytes: u64,
    pub repositories: usize,
    pub manifests: usize,
    pub tags: usize,
    pub blobs: usize,
    pub unreferenced: usize,
}

pub(crate) fn counts(app: &App) -> Counts {
    let s = app.index.read();
    Counts {
        bytes: s.total,
        repositories: s.repos.len(),
        manifests: s.repos.values().map(|r| r.manifests.len()).sum(),
        tags: s.repos.values().map(|r| r.tags.len()).sum(),
        blobs: s.blobs.len(),
        unreferenced: s.unreferenced.len(),
    }
}

/// `/status.json`: what the status page shows.
fn status_json(app: &App) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let c = counts(app);
    let (store, top_size) = {
        let s = app.index.read();
        let mut sizes: Vec<(String, u64)> = s
            .repos
            .iter()
            .map(|(name, r)| {
                let bytes = r
                    .blobs
                    .iter()
                    .filter_map(|d| s.blobs.get(d).map(|b| b.size))
                    .sum::<u64>();
                (name.to_string(), bytes)
            })
            .filter(|(_, b)| *b > 0)
            .collect();
        sizes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        sizes.truncate(10);
        (
            serde_json::json!({
                "bytes": c.bytes,
                "limit": app.config.max_size.map(|m| m.0).unwrap_or(0),
                "blobs": c.blobs,
                "manifests": c.manifests,
                "tags": c.tags,
                "repositories": c.repositories,
                "uploads": app.registry.uploads.len(),
            }),
            sizes,
        )
    };
    let fronts: Vec<serde_json::Value> = crate::metrics::hits_and_misses()
        .into_iter()
        .map(|(f, h, m)| serde_json::json!({"front": f, "hits": h, "misses": m}))
        .collect();
    let history: Vec<serde_json::Value> = crate::metrics::history(now)
        .into_iter()
        .map(|(t, row)| {
            serde_json::json!({
                "at": t,
                "fronts": row.into_iter().map(|(f, h, m)| serde_json::json!({"front": f, "hits": h, "misses": m})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let evictions: Vec<serde_json::Value> = app
        .life
        .recent()
        .into_iter()
        .take(20)
        .map(|(at, reason, repo, t)| {
            serde_json::json!({"at": at, "reason": reason.as_str(), "repository": repo,
                               "tags": t.tags, "manifests": t.manifests, "blobs": t.blobs, "bytes": t.bytes})
        })
        .collect();
    let mut config: Vec<(String, String)> = app
        .settings()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    config.push((
        "auth".into(),
        match &app.auth {
            Some(_) => "tokens required (per-front-end scopes)".into(),
            None => "off: every request is allowed".into(),
        },
    ));
    config.push((
        "tls".into(),
        if app.config.tls_cert.is_some() {
            "on"
        } else {
            "off"
        }
        .into(),
    ));
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": app.ready.why_not().is_none(),
        "not_ready": app.ready.why_not(),
        "store": store,
        "fronts": fronts,
        "history": history,
        "top_size": top_size.into_iter().map(|(r, b)| serde_json::json!({"repository": r, "bytes": b})).collect::<Vec<_>>(),
        "top_pulls": crate::metrics::top_pulls(10).into_iter().map(|(r, n)| serde_json::json!({"repository": r, "pulls": n})).collect::<Vec<_>>(),
        "evictions": evictions,
        "config": config,
    })
    .to_string()
}

/// `/metrics`: the counters the HTTP layer keeps, with the state's numbers set now.
fn metrics_text(app: &App) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let m = crate::metrics::get();
    let kind = |k: &'static str| crate::metrics::KindLabel { kind: k };
    {
        let s = app.index.read();
        m.store_bytes.set(s.total as i64);
        m.objects
            .get_or_create(&kind("repositories"))
            .set(s.repos.len() as i64);
        m.objects
            .get_or_create(&kind("manifests"))
            .set(s.repos.values().map(|r| r.manifests.len()).sum::<usize>() as i64);
        m.objects
            .get_or_create(&kind("tags"))
            .set(s.repos.values().map(|r| r.tags.len()).sum::<usize>() as i64);
        m.objects
            .get_or_create(&kind("blobs"))
            .set(s.blobs.len() as i64);
        m.objects
            .get_or_create(&kind("unreferenced_blobs"))
            .set(s.unreferenced.len() as i64);
    }
    m.store_limit_bytes
        .set(app.config.max_size.map(|s| s.0 as i64).unwrap_or(0));
    m.uploads.set(app.registry.uploads.len() as i64);
    m.upload_bytes_reserved.set(app.life.reserved() as i64);
    m.transfers.set(app.registry.transfers_in_progress() as i64);
    m.ready.set(i64::from(app.ready.why_not().is_none()));
    let mut by_reason: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for ((reason, _repo), t) in app.life.totals() {
        let e = by_reason.entry(reason.as_str().to_owned()).or_default();
        e.0 += t.tags;
        e.1 += t.bytes;
    }
    for (reason, (n, bytes)) in by_reason {
        let l = crate::metrics::ReasonLabel { reason };
        crate::metrics::set_counter(&m.evictions.get_or_create(&l), n);
        crate::metrics::set_counter(&m.evicted_bytes.get_or_create(&l), bytes);
    }
    if let Some(b) = &app.bucket {
        for (op, n) in b.counters.by_operation() {
            let l = crate::metrics::OpLabel {
                operation: op.to_string(),
            };
            crate::metrics::set_counter(&m.s3_requests.get_or_create(&l), n);
        }
        crate::metrics::set_counter(&m.s3_errors, b.counters.failures.load(Relaxed));
        m.s3_clock_offset_seconds
            .set(b.clock.offset_ms() as f64 / 1000.0);
    }
    crate::metrics::render()
}

fn status_page(app: &App) -> String {
    let Counts {
        bytes,
        repositories: repos,
        manifests,
        tags,
        blobs,
        unreferenced,
    } = counts(app);
    let (lag, held) = app.index.sync_lag();
    let mut out = format!(
        "hoard {}\nrepositories: {}\nmanifests: {manifests}\ntags: {tags}\nblobs: {} ({bytes} bytes, {})\n\
         unreferenced blobs: {unreferenced}\nuploads in progress: {} ({} bytes reserved)\n\
         transfers in progress: {}\n\
         cache time: {}\n\
         last group commit: began {} ms ago ({} writes have waited for the disk)\n",
        env!("CARGO_PKG_VERSION"),
        repos,
        blobs,
        human(bytes),
        app.registry.uploads.len(),
        app.life.reserved(),
        app.registry.transfers_in_progress(),
        crate::clock::rfc3339(app.clock.now_ms()),
        lag.as_millis(),
        held,
    );
    if let Some(why) = app.ready.why_not() {
        out.push_str(&format!("ready: no ({why})\n"));
    } else {
        out.push_str("ready: yes\n");
    }
    if let Some(b) = &app.bucket {
        out.push_str(&format!(
            "s3 requests: {} ({} answered 5xx)\ns3 clock offset: {} ms ({} samples)\n",
            b.counters
                .requests
                .load(std::sync::atomic::Ordering::Relaxed),
            b.counters
                .failures
                .load(std::sync::atomic::Ordering::Relaxed),
            b.clock.offset_ms(),
            b.clock.samples(),
        ));
        for (op, n) in b.counters.by_operation() {
            out.push_str(&format!("s3 requests {op}: {n}\n"));
        }
        for (kind, n) in b.counters.by_kind() {
            out.push_str(&format!("s3 kind {kind}: {n}\n"));
        }
    }
    if let Some(sh) = &app.shared {
        use std::sync::atomic::Ordering::Relaxed;
        let holder = sh
            .gc_holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "unknown yet".into());
        out.push_str(&format!(
            "replica: {}\nreplicas alive: {}\ncollector: {}\nconditional writes: {}\n\
             bucket re-listings: {} (last took {} ms over {} objects)\n\
             collections pending: {}\ncollected content spared: {}\n\
             pushes that waited for a collection: {}\n\
             tag writes retried after a lost race: {}\n",
            sh.me,
            sh.stats.live_replicas.load(Relaxed).max(1),
            if sh.holds_gc() {
                "this replica".to_owned()
            } else {
                holder
            },
            if sh.bucket.single_writer() {
                "ignored by the service (single writer)"
            } else {
                "honoured"
            },
            sh.stats.refreshes.load(Relaxed),
            sh.stats.last_refresh_ms.load(Relaxed),
            sh.stats.last_refresh_objects.load(Relaxed),
            sh.pending_collections(),
            sh.stats.rescued.load(Relaxed),
            sh.stats.waited_for_collection.load(Relaxed),
            sh.stats.tag_races.load(Relaxed),
        ));
    }
    if let Some(t) = &app.tiered {
        let st = t.stats();
        let (bytes, n) = t.held();
        out.push_str(&format!(
            "fast tier: {n} blobs ({bytes} bytes), hits {}, misses {}, evicted {}\n",
            st.hits.load(std::sync::atomic::Ordering::Relaxed),
            st.misses.load(std::sync::atomic::Ordering::Relaxed),
            st.evicted.load(std::sync::atomic::Ordering::Relaxed),
        ));
    }
    for (key, value) in app.settings() {
        out.push_str(&format!("{key}: {value}\n"));
    }
    for ((reason, repo), t) in app.life.totals() {
        out.push_str(&format!(
            "evictions reason={} repository={repo} tags={} manifests={} blobs={} bytes={}\n",
            reason.as_str(),
            t.tags,
            t.manifests,
            t.blobs,
            t.bytes
        ));
    }
    out
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops hoard");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}
