//! The caching GOPROXY front end (`/gomod/…`): `@v/list`, `.info`, `.mod`, `.zip`, `@latest` and
//! the checksum database (`/gomod/sumdb/<name>/…`), served from hoard's store; a miss is fetched
//! once from the configured upstream proxies (concurrent requests for one file share the fetch),
//! checked, kept, then served to everyone who asked.
//!
//! Every file kept is a ref: a tag in an internal repository (see `names`) on a one-layer OCI
//! manifest whose layer is the file, so module files live under the same lifecycle as image tags
//! (size bound, TTL, reachability, a shared bucket). `.mod` and `.zip` never change once kept.
//! `list`, `@latest`, `.info`, `supported` and checksum lookups are refreshed from upstream once
//! they are older than `refresh` (a version's `.info` in the background, served at once) and
//! served as they were when every upstream fails. A `.zip` is a zip of `<module>@<version>/`
//! within Go's limits, its `h1:` hash (and a `.mod`'s) matching the checksum database where the
//! database knows the module; anything else is refused with the reason and never kept.

pub mod names;
pub mod upstream;
pub mod zipcheck;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::config::GomodConfig;
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, ErrorKind, Result};
use crate::http::{empty, full, Body};
use crate::names::{RepoName, Tag};
use crate::registry::refs::FileRef;
use crate::registry::{blocking, Registry};
use crate::store::Expect;
use names::{ModPath, Version};
use upstream::{Attempt, HttpClient, Upstream};

const ARTIFACT_TYPE: &str = "application/vnd.hoard.gomod.v1";
/// Caps on what upstreams may send for the small files.
const MAX_LIST: u64 = 4 << 20;
const MAX_INFO: u64 = 64 << 10;
const MAX_SUMDB: u64 = 4 << 20;

/// One file of the proxy protocol.
#[derive(Clone, Debug, PartialEq)]
enum File {
    List,
    Latest,
    Info(Version),
    Mod(Version),
    Zip(Version),
    /// `.info` of a query that is not a canonical version (`master`, `v1.2`): passed on.
    Query(String),
}

impl File {
    fn url_suffix(&self) -> String {
        match self {
            File::List => "@v/list".into(),
            File::Latest => "@latest".into(),
            File::Info(v) => format!("@v/{}.info", escape(v.as_str())),
            File::Mod(v) => format!("@v/{}.mod", escape(v.as_str())),
            File::Zip(v) => format!("@v/{}.zip", escape(v.as_str())),
            File::Query(q) => format!("@v/{q}.info"),
        }
    }

    fn content_type(&self) -> &'static str {
        match self {
            File::Latest | File::Info(_) | File::Query(_) => "application/json",
            File::Zip(_) => "application/zip",
            File::List | File::Mod(_) => "text/plain; charset=utf-8",
        }
    }

    /// Changes upstream over time: refreshed after `refresh`, served stale when upstream fails.
    fn mutable(&self) -> bool {
        !matches!(self, File::Mod(_) | File::Zip(_))
    }
}

/// Upper case as `!` + lower case (a version's pre-release may hold upper case).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('!');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// What a request names, parsed at the edge.
#[derive(Debug, PartialEq)]
enum Route {
    Module(ModPath, File),
    /// `/sumdb/<name>/<rest>`.
    Sumdb(String, String),
}

fn parse_route(rest: &str) -> Result<Route> {
    let invalid = |m: String| Error::invalid(crate::error::What::Name, m);
    if let Some(s) = rest.strip_prefix("sumdb/") {
        let (name, tail) = s
            .split_once('/')
            .ok_or_else(|| invalid(format!("no checksum database file in {rest:?}")))?;
        names::check_sumdb_name(name)?;
        names::check_sumdb_path(tail)?;
        return Ok(Route::Sumdb(name.to_owned(), tail.to_owned()));
    }
    if let Some(m) = rest.strip_suffix("/@latest") {
        return Ok(Route::Module(ModPath::from_escaped(m)?, File::Latest));
    }
    let (m, file) = rest.rsplit_once("/@v/").ok_or_else(|| {
        Error::not_found(format!(
            "{rest:?} is not a module proxy path (<module>/@v/<file> or <module>/@latest)"
        ))
    })?;
    let module = ModPath::from_escaped(m)?;
    if file == "list" {
        return Ok(Route::Module(module, File::List));
    }
    let (ver, ext) = file
        .rsplit_once('.')
        .ok_or_else(|| Error::not_found(format!("no such proxy file {file:?}")))?;
    if ver.is_empty() || ver.contains('/') {
        return Err(invalid(format!("invalid version {ver:?}")));
    }
    let canonical = Version::from_escaped(ver);
    let f = match (ext, canonical) {
        ("info", Some(v)) => File::Info(v),
        ("info", None) => {
            if !ver
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-._~!+".contains(&c))
            {
                return Err(invalid(format!("invalid version query {ver:?}")));
            }
            File::Query(ver.to_owned())
        }
        ("mod", Some(v)) => File::Mod(v),
        ("zip", Some(v)) => File::Zip(v),
        ("mod" | "zip", None) => {
            return Err(Error::not_found(format!(
                "{ver:?} is not a canonical version: .mod and .zip exist only for those"
            )))
        }
        _ => return Err(Error::not_found(format!("no such proxy file {file:?}"))),
    };
    Ok(Route::Module(module, f))
}

/// A kept file: the layer blob its tag's manifest names.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry {
    digest: Digest,
    size: u64,
}

/// Where a kept file lives and how it is refreshed.
struct Slot {
    repo: RepoName,
    tag: Tag,
    /// Path after an upstream's base URL.
    url_path: String,
    content_type: &'static str,
    mutable: bool,
    /// Refreshed in the background while the kept copy is served.
    background: bool,
    /// Checks the fetched bytes before they are kept (zip, JSON, sums).
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    Plain(u64),
    Info,
    Mod(ModPath, Version),
    Zip(ModPath, Version),
}

/// The outcome of one fetch, shared by every request that waited for it.
type Flight = Arc<tokio::sync::OnceCell<std::result::Result<Entry, Attempt>>>;

pub struct GoProxy {
    reg: Arc<Registry>,
    upstreams: Vec<Upstream>,
    client: HttpClient,
    refresh: Duration,
    sumdb: Option<String>,
    nosumdb: Vec<String>,
    /// When each mutable file was last fetched by this replica (a restart fetches once again).
    fetched: Mutex<lru::LruCache<String, Instant>>,
    flights: Mutex<HashMap<String, Flight>>,
    tmp: PathBuf,
    seq: AtomicU64,
    /// Upstream fetches started (for tests and the status page).
    pub fetches: AtomicU64,
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

impl GoProxy {
    /// `tmp` holds zips while they are checked; emptied here.
    pub fn new(reg: Arc<Registry>, cfg: &GomodConfig, tmp: PathBuf) -> Result<GoProxy> {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let upstreams = upstream::parse_list(&cfg.upstreams.join(","))
            .map_err(|e| Error::invalid(crate::error::What::Parameter, e))?;
        Ok(GoProxy {
            reg,
            upstreams,
            client: HttpClient::new(cfg.timeout.0),
            refresh: cfg.refresh.0,
            sumdb: (cfg.sumdb != "off" && !cfg.sumdb.is_empty()).then(|| cfg.sumdb.clone()),
            nosumdb: cfg.nosumdb.clone(),
            fetched: Mutex::new(lru::LruCache::new(nz(100_000))),
            flights: Mutex::new(HashMap::new()),
            tmp,
            seq: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        })
    }

    /// Handles a request whose path starts with `/gomod/`.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        if !(req.method() == Method::GET || head) {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "the module proxy is read-only: use GET\n".into(),
            );
        }
        let path = crate::oci::percent_decode(req.uri().path());
        let rest = path.strip_prefix("/gomod/").unwrap_or("");
        let r = match parse_route(rest) {
            Ok(route) => self.serve(route, head).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(resp) => resp,
            Err(e) => {
                let r = crate::http::error_text(&e, head, StatusCode::BAD_GATEWAY);
                if r.status() != StatusCode::NOT_FOUND {
                    tracing::info!(path = %path, status = r.status().as_u16(), reason = %e.message, "gomod request refused");
                }
                r
            }
        }
    }

    async fn serve(self: &Arc<Self>, route: Route, head: bool) -> Result<Response<Body>> {
        let slot = match route {
            Route::Module(m, File::Query(q)) => {
                // Not kept: a branch or partial version changes meaning over time.
                let url_path = format!("{}/{}", m.escaped, File::Query(q).url_suffix());
                let body = self.fetch_small(&url_path, MAX_INFO).await?;
                check_info(&body).map_err(|e| Error::new(ErrorKind::Unavailable, e))?;
                return Ok(bytes_response(body, "application/json", head));
            }
            Route::Module(m, f) => self.module_slot(m, f)?,
            Route::Sumdb(name, rest) => self.sumdb_slot(&name, &rest)?,
        };
        let entry = self.load(&slot).await?;
        match self.respond(&slot, entry, head).await {
            // The kept bytes went with a collection between the lookup and the read (the tag
            // with them): look again, which fetches upstream, rather than tell go "not found".
            Err(e) if e.is_not_found() => {
                let entry = self.load(&slot).await?;
                self.respond(&slot, entry, head).await
            }
            r => r,
        }
    }

    fn module_slot(&self, m: ModPath, f: File) -> Result<Slot> {
        let repo = m.repo()?;
        let too_long = || {
            Error::not_found(format!(
                "version of {} too long for the proxy to keep",
                m.path
            ))
        };
        let tag = match &f {
            File::List => Tag::parse("list")?,
            File::Latest => Tag::parse("latest")?,
            File::Info(v) => v.tag("info").ok_or_else(too_long)?,
            File::Mod(v) => v.tag("mod").ok_or_else(too_long)?,
            File::Zip(v) => v.tag("zip").ok_or_else(too_long)?,
            File::Query(_) => return Err(Error::internal("queries are not kept")),
        };
        let kind = match &f {
            File::List => Kind::Plain(MAX_LIST),
            File::Latest | File::Info(_) => Kind::Info,
            File::Mod(v) => Kind::Mod(m.clone(), v.clone()),
            File::Zip(v) => Kind::Zip(m.clone(), v.clone()),
            File::Query(_) => Kind::Info,
        };
        Ok(Slot {
            url_path: format!("{}/{}", m.escaped, f.url_suffix()),
            content_type: f.content_type(),
            mutable: f.mutable(),
            background: matches!(f, File::Info(_)),
            repo,
            tag,
            kind,
        })
    }

    fn sumdb_slot(&self, name: &str, rest: &str) -> Result<Slot> {
        let repo = RepoName::parse(&format!("gomod/sumdb/{name}"))
            .or_else(|_| names::hashed("gomod/sumdb/hashed", name))?;
        let h: String = Sha256::digest(rest.as_bytes())
            .iter()
            .take(30)
            .map(|b| format!("{b:02x}"))
            .collect();
        let (tag, mutable) = if rest == "supported" {
            ("supported".to_owned(), true)
        } else if rest.starts_with("lookup/") {
            (format!("lookup-{h}"), true)
        } else {
            // Full tiles never change; a partial one (`.p/<n>`) grows into a full one.
            (format!("tile-{h}"), rest.contains(".p/"))
        };
        Ok(Slot {
            repo,
            tag: Tag::parse(&tag)?,
            url_path: format!("sumdb/{name}/{rest}"),
            content_type: "text/plain; charset=utf-8",
            mutable,
            background: false,
            kind: Kind::Plain(MAX_SUMDB),
        })
    }

    /// The kept entry for `slot`, fetched first if missing or due for a refresh.
    async fn load(self: &Arc<Self>, slot: &Slot) -> Result<Entry> {
        let key = format!("{}:{}", slot.repo, slot.tag);
        let kept = self.kept(slot).await?;
        if kept.is_some() {
            crate::metrics::hit("gomod");
        } else {
            crate::metrics::miss("gomod");
        }
        let due = slot.mutable
            && self
                .fetched
                .lock()
                .map(|mut f| f.get(&key).is_none_or(|t| t.elapsed() >= self.refresh))
                .unwrap_or(true);
        match kept {
            Some(e) if !due => return Ok(e),
            Some(e) if slot.background => {
                let me = self.clone();
                let slot = slot.clone_slot();
                tokio::spawn(async move {
                    let _ = me.fetch_once(&slot, Some(e)).await;
                });
                return Ok(e);
            }
            _ => {}
        }
        match self.fetch_once(slot, kept).await {
            Ok(e) => Ok(e),
            Err(a) => match (kept, a) {
                (Some(e), a) => {
                    tracing::info!(file = %slot.url_path, reason = ?a, "every upstream failed: serving the kept copy");
                    // Asked again after `refresh`, not by every request meanwhile: an upstream
                    // that hangs would otherwise cost each of them the whole timeout.
                    if let Ok(mut f) = self.fetched.lock() {
                        f.put(key, Instant::now());
                    }
                    Ok(e)
                }
                (None, Attempt::NotFound(m)) => Err(Error::not_found(format!("not found: {m}"))),
                (None, Attempt::Failed(m)) => Err(Error::new(ErrorKind::Unavailable, m)),
            },
        }
    }

    /// The entry a slot's tag points at now, if any.
    async fn kept(&self, slot: &Slot) -> Result<Option<Entry>> {
        match self.reg.file_ref(&slot.repo, &slot.tag).await {
            Ok(f) => Ok(f.map(|f| Entry {
                digest: f.digest,
                size: f.size,
            })),
            Err(e) if e.kind == ErrorKind::Unavailable => {
                tracing::info!(file = %slot.url_path, reason = %e.message, "the store is unreachable: fetching upstream");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches `slot` upstream and keeps it; concurrent callers share one fetch.
    async fn fetch_once(
        self: &Arc<Self>,
        slot: &Slot,
        kept: Option<Entry>,
    ) -> std::result::Result<Entry, Attempt> {
        let key = format!("{}:{}", slot.repo, slot.tag);
        let flight = {
            let mut f = self
                .flights
                .lock()
                .map_err(|_| Attempt::Failed("internal: flights lock".into()))?;
            f.entry(key.clone()).or_default().clone()
        };
        let me = self.clone();
        let s = slot.clone_slot();
        let out = flight
            .get_or_init(|| async move {
                // Run apart from the request: a client that goes away does not cancel the
                // fetch the others wait for.
                let task = tokio::spawn(async move { me.fetch_and_keep(&s, kept).await });
                match task.await {
                    Ok(r) => r,
                    Err(e) => Err(Attempt::Failed(format!("internal: fetch task: {e}"))),
                }
            })
            .await
            .clone();
        if let Ok(mut f) = self.flights.lock() {
            if f.get(&key).is_some_and(|x| Arc::ptr_eq(x, &flight)) {
                f.remove(&key);
            }
        }
        out
    }

    async fn fetch_and_keep(
        &self,
        slot: &Slot,
        kept: Option<Entry>,
    ) -> std::result::Result<Entry, Attempt> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let entry = match &slot.kind {
            Kind::Zip(m, v) => self.fetch_zip(slot, m, v).await?,
            kind => {
                let max = match kind {
                    Kind::Plain(max) => *max,
                    Kind::Info => MAX_INFO,
                    _ => zipcheck::MAX_GO_MOD,
                };
                let (body, from) = self.fetch_small_from(&slot.url_path, max, kind).await?;
                if let Kind::Mod(m, v) = kind {
                    self.check_sums(
                        m,
                        v,
                        &format!("{}/go.mod", v.as_str()),
                        &zipcheck::mod_h1(&body),
                    )
                    .await
                    .map_err(|e| Attempt::Failed(format!("{from}: {e}")))?;
                }
                let d = Digest::sha256_of(&body);
                let e = Entry {
                    digest: d,
                    size: body.len() as u64,
                };
                if kept != Some(e) {
                    // Held until the tag names it (see `set_file_ref`).
                    let _pin = self.reg.life.pins.pin(d);
                    self.reg.put_bytes(&slot.repo, d, body).await.map_err(|e| {
                        Attempt::Failed(format!("keeping {}: {}", slot.url_path, e.message))
                    })?;
                    self.tag(slot, e, &from, None).await?;
                }
                e
            }
        };
        if let Ok(mut f) = self.fetched.lock() {
            f.put(format!("{}:{}", slot.repo, slot.tag), Instant::now());
        }
        Ok(entry)
    }

    /// A small file from the first upstream that has it, checked for its kind.
    async fn fetch_small_from(
        &self,
        url_path: &str,
        max: u64,
        kind: &Kind,
    ) -> std::result::Result<(Bytes, String), Attempt> {
        let mut tries = upstream::Tries::default();
        for up in &self.upstreams {
            match self.small_from(up, url_path, max, kind).await {
                Ok(v) => return Ok(v),
                Err(a) => {
                    if !tries.go_on(up, a) {
                        break;
                    }
                }
            }
        }
        Err(tries.last)
    }

    async fn small_from(
        &self,
        up: &Upstream,
        url_path: &str,
        max: u64,
        kind: &Kind,
    ) -> std::result::Result<(Bytes, String), Attempt> {
        let url = format!("{}/{url_path}", up.base);
        let resp = self.client.get(&url).await?;
        let body = self.client.read_body(&url, resp, max).await?;
        if let Kind::Info = kind {
            check_info(&body).map_err(|e| Attempt::Failed(format!("{url}: {e}")))?;
        }
        Ok((body, url))
    }

    async fn fetch_small(&self, url_path: &str, max: u64) -> Result<Bytes> {
        match self
            .fetch_small_from(url_path, max, &Kind::Plain(max))
            .await
        {
            Ok((b, _)) => Ok(b),
            Err(Attempt::NotFound(m)) => Err(Error::not_found(format!("not found: {m}"))),
            Err(Attempt::Failed(m)) => Err(Error::new(ErrorKind::Unavailable, m)),
        }
    }

    /// Streams a zip to a temporary file, checks it, then stores it as a blob of the module's
    /// repository and tags it.
    async fn fetch_zip(
        &self,
        slot: &Slot,
        m: &ModPath,
        v: &Version,
    ) -> std::result::Result<Entry, Attempt> {
        let mut tries = upstream::Tries::default();
        let mut got = None;
        for up in &self.upstreams {
            match self.zip_from(up, slot, m, v).await {
                Ok(x) => {
                    got = Some(x);
                    break;
                }
                Err(a) => {
                    if !tries.go_on(up, a) {
                        break;
                    }
                }
            }
        }
        let Some((tmp, digest, size, h1, from)) = got else {
            return Err(tries.last);
        };
        let entry = Entry { digest, size };
        let keep = async {
            let mut w = self.reg.new_writer(Algorithm::Sha256)?;
            w.named(&digest);
            w.reserve(size)?;
            let path = tmp.0.clone();
            let w = blocking(move || -> Result<_> {
                let mut f = std::fs::File::open(&path)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f
                        .read(&mut buf)
                        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                    if n == 0 {
                        break;
                    }
                    w.write(&buf[..n])?;
                }
                Ok(w)
            })
            .await?;
            self.reg
                .commit_upload(
                    &slot.repo,
                    w,
                    Expect {
                        digest,
                        size: Some(size),
                    },
                )
                .await
        };
        let _pin = self.reg.life.pins.pin(digest);
        keep.await
            .map_err(|e| Attempt::Failed(format!("keeping {}: {}", slot.url_path, e.message)))?;
        drop(tmp);
        self.tag(slot, entry, &from, Some(&h1)).await?;
        tracing::info!(module = %m.path, version = %v.as_str(), size, %h1, "kept a module zip");
        Ok(entry)
    }

    /// One upstream's zip: streamed to a temporary file while hashed, then checked.
    async fn zip_from(
        &self,
        up: &Upstream,
        slot: &Slot,
        m: &ModPath,
        v: &Version,
    ) -> std::result::Result<(TempFile, Digest, u64, String, String), Attempt> {
        let url = format!("{}/{}", up.base, slot.url_path);
        let resp = self.client.get(&url).await?;
        let tmp = TempFile::new(&self.tmp, self.seq.fetch_add(1, Ordering::Relaxed))
            .map_err(|e| Attempt::Failed(format!("internal: temporary file: {e}")))?;
        let mut file = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&tmp.0)
            .map_err(|e| Attempt::Failed(format!("internal: temporary file: {e}")))?;
        let mut hash = Sha256::new();
        let size = self
            .client
            .each_chunk(&url, resp, zipcheck::MAX_ZIP, |c| {
                hash.update(&c);
                file.write_all(&c)
                    .map_err(|e| format!("writing a temporary file: {e}"))
            })
            .await?;
        let digest = Digest::from_raw(Algorithm::Sha256, &hash.finalize())
            .ok_or_else(|| Attempt::Failed("internal: digest".into()))?;
        let (path, version) = (m.path.clone(), v.as_str().to_owned());
        let h1 = blocking(move || {
            use std::io::Seek;
            file.rewind().map_err(|e| e.to_string())?;
            zipcheck::check(std::io::BufReader::new(file), &path, &version)
        })
        .await
        .map_err(|e| Attempt::Failed(format!("{url}: refused: {e}")))?;
        self.check_sums(m, v, v.as_str(), &h1)
            .await
            .map_err(|e| Attempt::Failed(format!("{url}: refused: {e}")))?;
        Ok((tmp, digest, size, h1, url))
    }

    /// Points the slot's tag at a one-layer manifest of `e`.
    async fn tag(
        &self,
        slot: &Slot,
        e: Entry,
        from: &str,
        h1: Option<&str>,
    ) -> std::result::Result<(), Attempt> {
        let mut ann = serde_json::Map::new();
        ann.insert("dev.hoard.gomod.file".into(), slot.url_path.clone().into());
        ann.insert("dev.hoard.gomod.upstream".into(), from.into());
        if let Some(h) = h1 {
            ann.insert("dev.hoard.gomod.h1".into(), h.into());
        }
        let file = FileRef {
            digest: e.digest,
            size: e.size,
            annotations: ann,
        };
        self.reg
            .set_file_ref(
                &slot.repo,
                &slot.tag,
                ARTIFACT_TYPE,
                slot.content_type,
                file,
            )
            .await
            .map_err(|e| Attempt::Failed(format!("keeping {}: {}", slot.url_path, e.message)))?;
        Ok(())
    }

    /// Compares a computed hash with the checksum database's record of `key` (`<version>` or
    /// `<version>/go.mod`). A database that does not know the module (a private one), or that
    /// cannot be reached, leaves the check to `go` itself.
    async fn check_sums(
        &self,
        m: &ModPath,
        v: &Version,
        key: &str,
        h1: &str,
    ) -> std::result::Result<(), String> {
        let Some(db) = &self.sumdb else {
            return Ok(());
        };
        if self.nosumdb.iter().any(|p| path_matches(p, &m.path)) {
            return Ok(());
        }
        let url_path = format!("sumdb/{db}/lookup/{}@{}", m.escaped, escape(v.as_str()));
        let body = match self
            .fetch_small_from(&url_path, MAX_SUMDB, &Kind::Plain(MAX_SUMDB))
            .await
        {
            Ok((b, _)) => b,
            Err(Attempt::NotFound(_)) => return Ok(()),
            Err(Attempt::Failed(why)) => {
                tracing::warn!(module = %m.path, version = %v.as_str(), reason = %why, "checksum database unreachable: kept without its check");
                return Ok(());
            }
        };
        let text = String::from_utf8_lossy(&body);
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() == 3 && f[0] == m.path && f[1] == key && f[2].starts_with("h1:") {
                if f[2] != h1 {
                    return Err(format!(
                        "checksum mismatch for {}@{key}: the upstream file hashes to {h1}, the checksum database {db} records {}",
                        m.path, f[2]
                    ));
                }
                return Ok(());
            }
        }
        Ok(())
    }

    async fn respond(&self, slot: &Slot, e: Entry, head: bool) -> Result<Response<Body>> {
        let mut resp = if head {
            Response::new(empty())
        } else {
            let f = FileRef {
                digest: e.digest,
                size: e.size,
                annotations: Default::default(),
            };
            Response::new(self.reg.file_body(&slot.repo, &f).await?)
        };
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(slot.content_type));
        h.insert(CONTENT_LENGTH, HeaderValue::from(e.size));
        if !slot.mutable {
            h.insert(
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            );
        }
        Ok(resp)
    }
}

impl Slot {
    fn clone_slot(&self) -> Slot {
        Slot {
            repo: self.repo.clone(),
            tag: self.tag.clone(),
            url_path: self.url_path.clone(),
            content_type: self.content_type,
            mutable: self.mutable,
            background: self.background,
            kind: self.kind.clone(),
        }
    }
}

/// An `.info` or `@latest` body: JSON with a `Version` string.
fn check_info(body: &[u8]) -> std::result::Result<(), String> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(rename = "Version")]
        version: String,
    }
    match serde_json::from_slice::<Info>(body) {
        Ok(i) if !i.version.is_empty() => Ok(()),
        _ => Err("not a version's JSON description (no \"Version\")".into()),
    }
}

/// GONOSUMDB-style: the pattern matches a prefix of the path element by element, `*` within
/// an element matching any run of characters.
fn path_matches(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
    let elems: Vec<&str> = path.split('/').collect();
    pat.len() <= elems.len() && pat.iter().zip(&elems).all(|(p, e)| glob(p, e))
}

fn glob(p: &str, s: &str) -> bool {
    match p.split_once('*') {
        None => p == s,
        Some((pre, rest)) => {
            s.starts_with(pre)
                && (0..=s.len() - pre.len())
                    .any(|i| s.is_char_boundary(pre.len() + i) && glob(rest, &s[pre.len() + i..]))
        }
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

fn bytes_response(b: Bytes, content_type: &'static str, head: bool) -> Response<Body> {
    let len = b.len();
    let mut r = Response::new(if head { empty() } else { full(b) });
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// A file under the proxy's temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &std::path::Path, n: u64) -> std::io::Result<TempFile> {
        let p = dir.join(format!("zip-{}-{n}", std::process::id()));
        std::fs::File::create(&p)?;
        Ok(TempFile(p))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = parse_route("github.com/!burnt!sushi/toml/@v/v1.2.0.zip").unwrap();
        match r {
            Route::Module(m, File::Zip(v)) => {
                assert_eq!(m.path, "github.com/BurntSushi/toml");
                assert_eq!(v.as_str(), "v1.2.0");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_route("example.com/m/@v/list").unwrap(),
            Route::Module(_, File::List)
        ));
        assert!(matches!(
            parse_route("example.com/m/@latest").unwrap(),
            Route::Module(_, File::Latest)
        ));
        assert!(matches!(
            parse_route("example.com/m/@v/master.info").unwrap(),
            Route::Module(_, File::Query(_))
        ));
        assert!(matches!(
            parse_route("sumdb/sum.golang.org/supported").unwrap(),
            Route::Sumdb(_, _)
        ));
        assert!(parse_route("example.com/m/@v/master.zip")
            .unwrap_err()
            .is_not_found());
        assert!(parse_route("example.com/m/@v/v1.0.0.tar")
            .unwrap_err()
            .is_not_found());
        for bad in [
            "example.com/../m/@v/list",
            "Example.com/m/@v/list",
            "example.com/m/@v/x%y.info",
            "sumdb/../x/supported",
            "sumdb/sum.golang.org/../../etc",
        ] {
            let e = parse_route(bad).unwrap_err();
            assert!(!e.is_not_found(), "{bad}: {e}");
        }
    }

    #[test]
    fn nosumdb_patterns() {
        assert!(path_matches("corp.example.com", "corp.example.com/x/y"));
        assert!(path_matches("*.corp.example", "git.corp.example/x"));
        assert!(!path_matches("corp.example.com", "corp.example.company/x"));
        assert!(!path_matches("a.com/b", "a.com"));
    }

    #[test]
    fn escapes_versions() {
        assert_eq!(escape("v1.0.0-RC1"), "v1.0.0-!r!c1");
    }
}
