//! `hoard gocacheprog`: Go's GOCACHEPROG protocol on stdin/stdout, in front of a local disk
//! tier and a hoard server.
//!
//! `go` starts the helper and writes newline-delimited JSON requests (`get`, `put`, `close`);
//! a `put` with a body is followed by one line holding the body as a JSON string of base64. The
//! helper first announces what it knows (`ID` 0, `KnownCommands`), then answers each request by
//! `ID` as soon as it is done, in any order. A hit names a local file (`DiskPath`) holding the
//! output, valid until `close`.
//!
//! Local tier (`--dir`):
//! ```text
//! <dir>/o/<output hex>   outputs, the files `DiskPath` names
//! <dir>/a/<action hex>   "<output hex> <size> <unix ms>\n"
//! <dir>/tmp/             outputs being written (renamed into place when complete)
//! <dir>/trim.txt         when the tier was last trimmed
//! ```
//! A get answers from the local tier, else fetches the entry from hoard in one round trip
//! (output bytes and id together) into it. A put is written locally and answered at once, then
//! uploaded in the background (a bounded queue, flushed on `close`). Any server error, an
//! unreachable hoard or a timeout is a miss, never a failed build; after a connection failure
//! the server is left alone for a while rather than costing every request a timeout.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

#[derive(Clone, Debug, clap::Args)]
pub struct ProgArgs {
    /// The hoard server, e.g. http://hoard:5000.
    #[arg(long, env = "HOARD_GOCACHE_URL")]
    pub url: String,
    /// The local disk tier (default: $XDG_CACHE_HOME/hoard-gocacheprog or
    /// ~/.cache/hoard-gocacheprog).
    #[arg(long, env = "HOARD_GOCACHE_DIR")]
    pub dir: Option<PathBuf>,
    /// A hoard token (when the server has `[auth]`), sent as `Authorization: Bearer`.
    #[arg(long, env = "HOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Entries are shared within a namespace (e.g. one per toolchain or per team).
    #[arg(long, env = "HOARD_GOCACHE_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// A request to hoard that takes longer is a miss.
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
    /// Uploads running at once.
    #[arg(long, default_value_t = 4)]
    pub uploads: usize,
    /// Puts waiting for upload; past it a put is kept locally only.
    #[arg(long, default_value_t = 4096)]
    pub queue: usize,
    /// How long `close` waits for queued uploads.
    #[arg(long, default_value = "120s", value_parser = crate::config::parse_duration)]
    pub flush_timeout: Duration,
    /// One summary line on stderr at close (hits, misses, uploads).
    #[arg(long, short)]
    pub verbose: bool,
    /// The local tier's bound: at most once an hour, at close, outputs unused the longest go
    /// until it holds 80% of this (an output used in the last hour has a fresh mtime).
    #[arg(long, default_value = "10GiB", value_parser = crate::config::parse_size)]
    pub max_size: u64,
}

#[derive(Deserialize, Debug)]
struct Request {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "Command")]
    command: String,
    #[serde(rename = "ActionID", default)]
    action_id: Option<String>,
    #[serde(rename = "OutputID", default)]
    output_id: Option<String>,
    /// The name of `OutputID` before Go 1.24.
    #[serde(rename = "ObjectID", default)]
    object_id: Option<String>,
    #[serde(rename = "BodySize", default)]
    body_size: i64,
}

#[derive(Serialize, Default, Debug)]
struct Response {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "Err", skip_serializing_if = "String::is_empty")]
    err: String,
    #[serde(rename = "KnownCommands", skip_serializing_if = "Option::is_none")]
    known_commands: Option<Vec<&'static str>>,
    #[serde(rename = "Miss", skip_serializing_if = "std::ops::Not::not")]
    miss: bool,
    #[serde(rename = "OutputID", skip_serializing_if = "Option::is_none")]
    output_id: Option<String>,
    #[serde(rename = "Size", skip_serializing_if = "is_zero")]
    size: i64,
    #[serde(rename = "Time", skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(rename = "DiskPath", skip_serializing_if = "Option::is_none")]
    disk_path: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A local entry: which output an action produced, its size, when it was put (local ms).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    output: [u8; 32],
    size: u64,
    time_ms: i64,
}

struct Upload {
    action: [u8; 32],
    output: [u8; 32],
    path: PathBuf,
}

#[derive(Default)]
struct Counts {
    local_hits: AtomicU64,
    remote_hits: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    uploaded: AtomicU64,
    upload_failed: AtomicU64,
    dropped: AtomicU64,
    prefetched: AtomicU64,
}

/// Entries a helper process prefetches at most (hints can lead past what this build needs).
const PREFETCH_MAX: u64 = 20_000;
/// Prefetches running at once.
const PREFETCH_PARALLEL: usize = 8;

type Flight = Arc<tokio::sync::OnceCell<bool>>;

struct Helper {
    dir: PathBuf,
    base: String,
    authorization: Option<http::HeaderValue>,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// Unix ms until which the server is not asked (after a connection failure).
    down_until: AtomicI64,
    /// Warned once about an unreachable server.
    warned: AtomicI64,
    seq: AtomicU64,
    counts: Counts,
    /// Sent with puts: the server learns which entries follow which (see `Hoard-Next`).
    session: String,
    /// Fetches running, by action: a get waits for a prefetch of its entry instead of asking
    /// again.
    inflight: std::sync::Mutex<HashMap<[u8; 32], Flight>>,
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    /// Entries this process wrote into the local tier (fetched or put): answered without
    /// reading their files again.
    mine: std::sync::Mutex<HashMap<[u8; 32], Entry>>,
    /// Actions a hint already named: looked for on disk once, not once per hint.
    hinted: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
}

/// A fetched output up to this size is hashed and written on the blocking pool, off the
/// thread that answers `go`.
const WHOLE_MAX: u64 = 64 << 20;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn hex(b: &[u8]) -> String {
    crate::digest::hex_encode(b)
}

fn id32(b64: &Option<String>) -> Option<[u8; 32]> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.as_deref()?)
        .ok()?;
    raw.try_into().ok()
}

/// Go's `time.Time` in JSON: RFC 3339 with a fraction.
fn go_time(ms: i64) -> String {
    let base = crate::clock::rfc3339(ms);
    let frac = ms.rem_euclid(1000);
    match base.strip_suffix('Z') {
        Some(b) => format!("{b}.{frac:03}Z"),
        None => base,
    }
}

/// Runs the helper until `go` sends `close` (or closes stdin).
pub fn run(args: ProgArgs) -> anyhow::Result<()> {
    // One thread: a remote hit is a handful of steps (request in, HTTP round trip, file
    // written, answer out) and `go` asks a few at a time; hopping between worker threads cost
    // more than the steps themselves.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(main(args))
}

fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("hoard-gocacheprog");
    }
    match std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache/hoard-gocacheprog"),
        None => std::env::temp_dir().join("hoard-gocacheprog"),
    }
}

async fn main(args: ProgArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    // Flat directories: a directory made per entry cost more than the rest of a remote hit.
    for sub in ["o", "a", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.join(sub).display()))?;
    }
    let base = format!(
        "{}/gocache/{}",
        args.url.trim_end_matches('/'),
        args.namespace
    );
    let helper = Arc::new(Helper {
        dir,
        base,
        authorization: crate::http::bearer(args.token.as_deref()),
        http: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(crate::gomod::upstream::connector(Duration::from_secs(2))),
        timeout: args.timeout,
        down_until: AtomicI64::new(0),
        warned: AtomicI64::new(0),
        seq: AtomicU64::new(0),
        counts: Counts::default(),
        session: {
            let mut b = [0u8; 12];
            let _ = getrandom::getrandom(&mut b);
            hex(&b)
        },
        inflight: std::sync::Mutex::new(HashMap::new()),
        prefetch_slots: Arc::new(tokio::sync::Semaphore::new(PREFETCH_PARALLEL)),
        mine: std::sync::Mutex::new(HashMap::new()),
        hinted: std::sync::Mutex::new(std::collections::HashSet::new()),
    });

    // Replies are written whole, as soon as ready, straight to the pipe; requests come in
    // through a reader thread. (tokio's stdin and stdout would hand every read and write to
    // its blocking pool, a hop each way per request.)
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<String>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut l = String::new();
            match std::io::BufRead::read_line(&mut stdin, &mut l) {
                Ok(0) => return,
                Ok(_) => {
                    if line_tx.send(Ok(l)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = line_tx.send(Err(e));
                    return;
                }
            }
        }
    });
    let send = move |r: Response| {
        let mut line = serde_json::to_vec(&r).unwrap_or_default();
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&line).and_then(|()| out.flush());
    };
    send(Response {
        id: 0,
        known_commands: Some(vec!["get", "put", "close"]),
        ..Response::default()
    });

    let (up_tx, up_rx) = tokio::sync::mpsc::channel::<Upload>(args.queue.max(1));
    let up_rx = Arc::new(tokio::sync::Mutex::new(up_rx));
    let mut uploaders = Vec::new();
    for _ in 0..args.uploads.max(1) {
        let (h, rx) = (helper.clone(), up_rx.clone());
        uploaders.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(u) = next else { return };
                h.upload(u).await;
            }
        }));
    }

    let mut tasks = tokio::task::JoinSet::new();
    let mut close_id = None;
    loop {
        let Some(line) = lines.recv().await.transpose()? else {
            break;
        };
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => anyhow::bail!("hoard gocacheprog: unreadable request from go: {e}"),
        };
        let mut body = None;
        if req.body_size > 0 {
            // `go` ends each request with an empty line; the body is the next line with text.
            let line = loop {
                match lines.recv().await.transpose()? {
                    None => {
                        anyhow::bail!("hoard gocacheprog: go closed its pipe before a put's body")
                    }
                    Some(l) if l.trim().is_empty() => {}
                    Some(l) => break l,
                }
            };
            let b64: String = serde_json::from_str(line.trim_end())
                .map_err(|e| anyhow::anyhow!("hoard gocacheprog: unreadable body line: {e}"))?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| anyhow::anyhow!("hoard gocacheprog: body is not base64: {e}"))?;
            body = Some(Bytes::from(raw));
        }
        match req.command.as_str() {
            "close" => {
                close_id = Some(req.id);
                break;
            }
            "get" => {
                let h = helper.clone();
                tasks.spawn(async move { send(h.get(&req).await) });
            }
            "put" => {
                let (h, up_tx) = (helper.clone(), up_tx.clone());
                tasks.spawn(async move {
                    let (resp, upload) = h.put(&req, body.unwrap_or_default()).await;
                    send(resp);
                    if let Some(u) = upload {
                        if up_tx.try_send(u).is_err() {
                            h.counts.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            other => send(Response {
                id: req.id,
                err: format!("unknown command {other:?}"),
                ..Response::default()
            }),
        }
        while tasks.try_join_next().is_some() {}
    }
    // Answer everything asked, then flush the uploads, then answer close.
    while tasks.join_next().await.is_some() {}
    drop(up_tx);
    let flushed = tokio::time::timeout(args.flush_timeout, async {
        for u in uploaders {
            let _ = u.await;
        }
    })
    .await;
    let c = &helper.counts;
    if flushed.is_err() {
        eprintln!(
            "hoard gocacheprog: uploads still running after {:?} at close; the rest stay local",
            args.flush_timeout
        );
    }
    let trimmed = trim(&helper.dir, args.max_size);
    if args.verbose {
        if let Some((n, freed)) = trimmed {
            eprintln!("hoard gocacheprog: trimmed the local tier: {n} outputs, {freed} bytes");
        }
        eprintln!(
            "hoard gocacheprog: {} local hits, {} hits from hoard, {} misses, {} puts ({} uploaded, {} failed, {} not queued), {} prefetched",
            c.local_hits.load(Ordering::Relaxed),
            c.remote_hits.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
            c.puts.load(Ordering::Relaxed),
            c.uploaded.load(Ordering::Relaxed),
            c.upload_failed.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
            c.prefetched.load(Ordering::Relaxed),
        );
    }
    // Prefetches still running stop with the process: their partial files go with them.
    let mine = format!("{}-", std::process::id());
    for f in std::fs::read_dir(helper.dir.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if f.file_name().to_string_lossy().starts_with(&mine) {
            let _ = std::fs::remove_file(f.path());
        }
    }
    if let Some(id) = close_id {
        send(Response {
            id,
            ..Response::default()
        });
    }
    Ok(())
}

/// Marks an output used: its mtime moves to now, at most once an hour (as Go's own cache does),
/// so trimming keeps what builds use.
fn touch(path: &Path) {
    let old = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(3600));
    if old {
        if let Ok(f) = std::fs::File::options().write(true).open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }
}

/// Keeps the local tier under `max`: at most once an hour (`trim.txt` holds when it last ran),
/// removes the least recently used outputs until it holds 80% of `max`. Entries whose output
/// went are misses from then on. Returns (outputs removed, bytes freed) when it ran.
fn trim(dir: &Path, max: u64) -> Option<(usize, u64)> {
    let stamp = dir.join("trim.txt");
    let recent = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(3600));
    if recent {
        return None;
    }
    let _ = std::fs::write(&stamp, now_ms().to_string());
    let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    for f in std::fs::read_dir(dir.join("o")).ok()?.flatten() {
        if let Ok(m) = f.metadata() {
            files.push((m.modified().unwrap_or(UNIX_EPOCH), m.len(), f.path()));
        }
    }
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    if total <= max {
        return Some((0, 0));
    }
    files.sort();
    let (mut n, mut freed) = (0, 0);
    for (_, len, path) in files {
        if total <= max / 10 * 8 {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            freed += len;
            n += 1;
        }
    }
    Some((n, freed))
}

impl Helper {
    fn output_path(&self, o: &[u8; 32]) -> PathBuf {
        self.dir.join("o").join(hex(o))
    }

    fn action_path(&self, a: &[u8; 32]) -> PathBuf {
        self.dir.join("a").join(hex(a))
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// The local entry for `a`, if its output file is there whole.
    fn local(&self, a: &[u8; 32]) -> Option<(Entry, PathBuf)> {
        if let Some(e) = self.mine.lock().ok().and_then(|m| m.get(a).copied()) {
            return Some((e, self.output_path(&e.output)));
        }
        let text = std::fs::read_to_string(self.action_path(a)).ok()?;
        let mut f = text.split_whitespace();
        let output = crate::digest::hex32(f.next()?)?;
        let size: u64 = f.next()?.parse().ok()?;
        let time_ms: i64 = f.next()?.parse().ok()?;
        let path = self.output_path(&output);
        let meta = std::fs::metadata(&path).ok()?;
        (meta.len() == size).then_some((
            Entry {
                output,
                size,
                time_ms,
            },
            path,
        ))
    }

    /// Writes `data` to `path` through a temporary file (a reader never sees it half-written).
    fn write_atomic(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        self.write_at(&self.tmp_path(), path, data)
    }

    fn write_at(&self, tmp: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(data)?;
        drop(f);
        std::fs::rename(tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(tmp);
        })
    }

    /// An entry is one short line written with one `write`: a reader that catches it half
    /// written finds it unparsable, a miss.
    fn record(&self, a: &[u8; 32], e: &Entry) -> std::io::Result<()> {
        let line = format!("{} {} {}\n", hex(&e.output), e.size, e.time_ms);
        std::fs::write(self.action_path(a), line)?;
        if let Ok(mut m) = self.mine.lock() {
            m.insert(*a, *e);
        }
        Ok(())
    }

    fn hit(id: i64, e: &Entry, path: &Path) -> Response {
        Response {
            id,
            output_id: Some(base64::engine::general_purpose::STANDARD.encode(e.output)),
            size: e.size as i64,
            time: Some(go_time(e.time_ms)),
            disk_path: Some(path.to_string_lossy().into_owned()),
            ..Response::default()
        }
    }

    fn miss(&self, id: i64) -> Response {
        self.counts.misses.fetch_add(1, Ordering::Relaxed);
        Response {
            id,
            miss: true,
            ..Response::default()
        }
    }

    async fn get(self: &Arc<Self>, req: &Request) -> Response {
        let Some(a) = id32(&req.action_id) else {
            return Response {
                id: req.id,
                err: "get without a 32-byte ActionID".into(),
                ..Response::default()
            };
        };
        if let Some((e, path)) = self.local(&a) {
            self.counts.local_hits.fetch_add(1, Ordering::Relaxed);
            touch(&path);
            return Self::hit(req.id, &e, &path);
        }
        if self.fetch_shared(a).await {
            if let Some((e, path)) = self.local(&a) {
                self.counts.remote_hits.fetch_add(1, Ordering::Relaxed);
                return Self::hit(req.id, &e, &path);
            }
        }
        self.miss(req.id)
    }

    /// Fetches `a` into the local tier, once however many ask (a get waits for a prefetch
    /// of the same entry); then prefetches what the server says followed it. True when it is
    /// there now.
    async fn fetch_shared(self: &Arc<Self>, a: [u8; 32]) -> bool {
        let flight = match self.inflight.lock() {
            Ok(mut m) => m.entry(a).or_default().clone(),
            Err(_) => return false,
        };
        self.run_flight(a, flight).await
    }

    async fn run_flight(self: &Arc<Self>, a: [u8; 32], flight: Flight) -> bool {
        let me = self.clone();
        let got = *flight
            .get_or_init(|| async move {
                if me.local(&a).is_some() {
                    return true;
                }
                match me.fetch(&a).await {
                    Some((_, _, next)) => {
                        me.prefetch(next);
                        true
                    }
                    None => false,
                }
            })
            .await;
        if let Ok(mut m) = self.inflight.lock() {
            if m.get(&a).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                m.remove(&a);
            }
        }
        got
    }

    /// Fetches in the background the entries a build will likely ask for next.
    fn prefetch(self: &Arc<Self>, next: Vec<[u8; 32]>) {
        for a in next {
            if self.counts.prefetched.load(Ordering::Relaxed) >= PREFETCH_MAX || !self.server_ok() {
                return;
            }
            let fresh = self.hinted.lock().is_ok_and(|mut h| h.insert(a));
            if !fresh || std::fs::metadata(self.action_path(&a)).is_ok() {
                continue;
            }
            // Registered now, so neither another hint nor a get starts a second fetch of it.
            let flight = match self.inflight.lock() {
                Ok(mut m) if !m.contains_key(&a) => {
                    let f = Flight::default();
                    m.insert(a, f.clone());
                    f
                }
                _ => continue,
            };
            self.counts.prefetched.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            tokio::spawn(async move {
                let Ok(_slot) = me.prefetch_slots.clone().acquire_owned().await else {
                    return;
                };
                me.run_flight(a, flight).await;
            });
        }
    }

    fn server_ok(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) <= now_ms()
    }

    /// A connection-level failure: the server is left alone for a while, and the user hears
    /// about it once.
    fn server_failed(&self, why: &str) {
        self.down_until.store(now_ms() + 30_000, Ordering::Relaxed);
        if self.warned.swap(1, Ordering::Relaxed) == 0 {
            eprintln!(
                "hoard gocacheprog: {} is unreachable ({why}); building with the local cache only",
                self.base
            );
        }
    }

    /// The entry for `a` from the server, written into the local tier.
    async fn fetch(self: &Arc<Self>, a: &[u8; 32]) -> Option<(Entry, PathBuf, Vec<[u8; 32]>)> {
        if !self.server_ok() {
            return None;
        }
        let url = format!("{}/action/{}", self.base, hex(a));
        let mut req = hyper::Request::get(&url);
        if let Some(a) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, a.clone());
        }
        let req = req.body(Full::new(Bytes::new())).ok()?;
        let sent = Instant::now();
        let resp = match tokio::time::timeout(self.timeout, self.http.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.server_failed(&e.to_string());
                return None;
            }
            Err(_) => {
                self.server_failed("timed out");
                return None;
            }
        };
        let local_now = now_ms();
        if resp.status() != http::StatusCode::OK {
            return None;
        }
        let h = resp.headers();
        let num =
            |k: &http::header::HeaderName| -> Option<i64> { h.get(k)?.to_str().ok()?.parse().ok() };
        let next: Vec<[u8; 32]> = h
            .get(super::NEXT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').filter_map(crate::digest::hex32).collect())
            .unwrap_or_default();
        let output = crate::digest::hex32(h.get(super::OUTPUT_ID)?.to_str().ok()?)?;
        let size: u64 = h
            .get(http::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        let time = match (num(&super::TIME), num(&super::NOW)) {
            // The put's time in the server's clock, carried into ours by the difference of
            // the two clocks now, and never later than our now (clock-skew-ttl §3.8).
            (Some(t), Some(server_now)) => (t - (server_now - local_now)).min(local_now),
            _ => local_now,
        };
        let path = self.output_path(&output);
        let tmp = self.tmp_path();
        let mut body = resp.into_body();
        let timeout = self.timeout.saturating_sub(sent.elapsed());
        let e = Entry {
            output,
            size,
            time_ms: time,
        };
        if size <= WHOLE_MAX {
            // Received here, hashed and written on the blocking pool.
            let data = tokio::time::timeout(timeout, body.collect())
                .await
                .ok()?
                .ok()?
                .to_bytes();
            if data.len() as u64 != size {
                return None;
            }
            let (me, a, path2) = (self.clone(), *a, path.clone());
            let stored = tokio::task::spawn_blocking(move || {
                if Sha256::digest(&data).as_slice() != output {
                    return false;
                }
                me.write_at(&tmp, &path2, &data).is_ok() && me.record(&a, &e).is_ok()
            })
            .await
            .unwrap_or(false);
            return stored.then_some((e, path, next));
        }
        let mut file = std::fs::File::create(&tmp).ok()?;
        let mut hash = Sha256::new();
        let mut n: u64 = 0;
        let ok = loop {
            let left = self.timeout.saturating_sub(sent.elapsed());
            match tokio::time::timeout(left, body.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        hash.update(&d);
                        n += d.len() as u64;
                        if file.write_all(&d).is_err() {
                            break false;
                        }
                    }
                }
                Ok(None) => break true,
                _ => break false,
            }
        };
        drop(file);
        let good = ok && n == size && hash.finalize().as_slice() == output;
        if !good {
            let _ = std::fs::remove_file(&tmp);
            return None;
        }
        if std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return None;
        }
        self.record(a, &e).ok()?;
        Some((e, path, next))
    }

    async fn put(&self, req: &Request, body: Bytes) -> (Response, Option<Upload>) {
        self.counts.puts.fetch_add(1, Ordering::Relaxed);
        let err = |m: String| {
            (
                Response {
                    id: req.id,
                    err: m,
                    ..Response::default()
                },
                None,
            )
        };
        let (Some(a), Some(o)) = (
            id32(&req.action_id),
            id32(&req.output_id).or_else(|| id32(&req.object_id)),
        ) else {
            return err("put without a 32-byte ActionID and OutputID".into());
        };
        if body.len() as i64 != req.body_size {
            return err(format!(
                "put body is {} bytes, BodySize says {}",
                body.len(),
                req.body_size
            ));
        }
        if Sha256::digest(&body).as_slice() != o {
            return err("put body does not hash to its OutputID".into());
        }
        let path = self.output_path(&o);
        let have = std::fs::metadata(&path).is_ok_and(|m| m.len() == body.len() as u64);
        if !have {
            if let Err(e) = self.write_atomic(&path, &body) {
                return err(format!("writing {}: {e}", path.display()));
            }
        }
        let e = Entry {
            output: o,
            size: body.len() as u64,
            time_ms: now_ms(),
        };
        if let Err(e) = self.record(&a, &e) {
            return err(format!("writing the entry: {e}"));
        }
        let upload = Upload {
            action: a,
            output: o,
            path: path.clone(),
        };
        (Self::hit(req.id, &e, &path), Some(upload))
    }

    async fn upload(&self, u: Upload) {
        if !self.server_ok() {
            self.counts.upload_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(data) = std::fs::read(&u.path) else {
            self.counts.upload_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let url = format!(
            "{}/action/{}?output={}",
            self.base,
            hex(&u.action),
            hex(&u.output)
        );
        let mut req = hyper::Request::put(&url)
            .header(http::header::CONTENT_LENGTH, data.len())
            .header(super::SESSION, &self.session);
        if let Some(a) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, a.clone());
        }
        let req = req.body(Full::new(Bytes::from(data)));
        let Ok(req) = req else { return };
        let ok = match tokio::time::timeout(self.timeout, self.http.request(req)).await {
            Ok(Ok(r)) => {
                let ok = r.status().is_success();
                let _ = r.into_body().collect().await;
                ok
            }
            Ok(Err(e)) => {
                self.server_failed(&e.to_string());
                false
            }
            Err(_) => {
                self.server_failed("timed out");
                false
            }
        };
        let c = if ok {
            &self.counts.uploaded
        } else {
            &self.counts.upload_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ids() {
        assert_eq!(go_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        let a = [7u8; 32];
        assert_eq!(crate::digest::hex32(&hex(&a)), Some(a));
        assert_eq!(crate::digest::hex32("zz"), None);
        let b64 = Some(base64::engine::general_purpose::STANDARD.encode(a));
        assert_eq!(id32(&b64), Some(a));
        assert_eq!(id32(&Some("AAAA".into())), None);
        assert_eq!(id32(&None), None);
    }

    #[test]
    fn trimming_removes_the_least_recently_used_outputs_once_an_hour() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("o")).unwrap();
        for i in 0..10u64 {
            let p = d.join(format!("o/{i}"));
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000 + i))
                .unwrap();
        }
        // 10,000 bytes against a bound of 5,000: down to 4,000, the oldest first.
        assert_eq!(trim(d, 5000), Some((6, 6000)));
        for i in 0..10u64 {
            assert_eq!(d.join(format!("o/{i}")).exists(), i >= 6, "{i}");
        }
        // Not again within the hour.
        assert_eq!(trim(d, 1), None);
    }

    #[test]
    fn responses_leave_empty_fields_out() {
        let r = serde_json::to_string(&Response {
            id: 3,
            miss: true,
            ..Response::default()
        })
        .unwrap();
        assert_eq!(r, r#"{"ID":3,"Miss":true}"#);
        let r = serde_json::to_string(&Response {
            id: 0,
            known_commands: Some(vec!["get", "put", "close"]),
            ..Response::default()
        })
        .unwrap();
        assert_eq!(r, r#"{"ID":0,"KnownCommands":["get","put","close"]}"#);
    }
}
