//! containerd's content store API (`containerd.services.content.v1.Content`, with Leases and
//! Introspection) over hoard's one store, so `ctr content …` and a containerd using hoard as its
//! `proxy_plugins` content store see the blobs the registry serves.
//!
//! **Views.** containerd's garbage collector lists its content store and deletes every blob its
//! own database does not name. Pointed at a shared store it would delete the registry's blobs
//! and every other node's. So a content client never deletes bytes: it works in a *view*, the
//! one its listener is configured with (`grpc_view`; one per node, typically) unless it names
//! another in the `hoard-view` metadata, split by the
//! `containerd-namespace` it sends. A view holds a blob through a ref in the internal repository
//! `containerd/<view>/content/<namespace>` (tag: the digest's hex; the blob's labels and times
//! in the ref's annotations), so what a view holds is a root of the lifecycle like any tag.
//! `List` shows the view's holds, `Delete` drops them, and bytes go only when the lifecycle finds
//! nothing — a tag, another view, a lease — that still reaches them.
//!
//! `Info` and `Read` see every blob in the store (content is addressed by digest: a layer pushed
//! through `/v2/` is there for containerd without a pull). A blob a view looks up with `Info`
//! becomes held by it (containerd records what it found in its own database and releases it
//! later through `Delete`). Requests without a namespace (containerd's collector walks without
//! one) list and delete across all namespaces of the view; writes without one go to `default`.

pub mod filters;
pub mod leases;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use prost_types::Timestamp;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Front;
use crate::clock::Millis;
use crate::digest::Digest;
use crate::error::{Error, ErrorKind, Result, What};
use crate::names::{Reference, RepoName, Tag};
use crate::proto::content as api;
use crate::registry::refs::FileRef;
use crate::registry::{blocking, Registry};
use crate::store::Expect;

use crate::registry::uploads::ingest::{self, Ingests};
use filters::{Fields, Filters};

pub const NAMESPACE_HEADER: &str = "containerd-namespace";
pub const LEASE_HEADER: &str = "containerd-lease";
/// A client may name its view (containerd does not: it gets its listener's).
pub const VIEW_HEADER: &str = "hoard-view";
const DEFAULT_NAMESPACE: &str = "default";

const HOLD_TYPE: &str = "application/vnd.hoard.containerd.content.v1";
const LABELS: &str = "org.hoard.content.labels";
const CREATED: &str = "org.hoard.content.created";
const UPDATED: &str = "org.hoard.content.updated";
/// containerd's limit on one label (key and value together).
const MAX_LABEL: usize = 4096;
/// Bytes per `Read` message.
const READ_CHUNK: usize = 1 << 20;
/// Infos per `List` message.
const LIST_BATCH: usize = 256;
/// Blobs up to this size are kept in memory once written or read (manifests, configs, indexes,
/// small layers: what containerd reads again and again)...
const SMALL_BLOB: u64 = 64 << 10;
/// ...up to this many bytes in all, least recently used out first...
const SMALL_CACHE: usize = 32 << 20;
/// ...counting each entry's bookkeeping (key, node, handle) as this much besides its bytes.
const SMALL_ENTRY: usize = 128;

/// Small blobs' bytes by digest, each verified against its digest before it is kept (hashed as
/// it was ingested, or hashed again when read from the store). Content-addressed bytes never
/// change, so an entry is right for as long as the blob is stored; a read looks here only after
/// the index said it is (and, on a shared bucket, no collection has announced it).
struct SmallBlobs {
    lru: lru::LruCache<Digest, Bytes>,
    bytes: usize,
}

impl SmallBlobs {
    fn get(&mut self, d: &Digest) -> Option<Bytes> {
        self.lru.get(d).cloned()
    }

    fn put(&mut self, d: Digest, b: Bytes) {
        if b.len() as u64 > SMALL_BLOB {
            return;
        }
        self.bytes += b.len() + SMALL_ENTRY;
        if let Some(old) = self.lru.put(d, b) {
            self.bytes -= old.len() + SMALL_ENTRY;
        }
        while self.bytes > SMALL_CACHE {
            match self.lru.pop_lru() {
                Some((_, b)) => self.bytes -= b.len() + SMALL_ENTRY,
                None => break,
            }
        }
    }
}

/// The content API's state: the registry it shares blobs with, the ingests, per-ref locks.
pub struct Content {
    pub reg: Arc<Registry>,
    /// Read-modify-write of one ref (labels, a lease's resources) happens under its stripe.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// The lifecycle's clock-skew tolerance (lease expiry waits this much longer).
    pub skew: Millis,
    /// Each lease manifest's id and expiry, by the manifest's digest (immutable): the expiry
    /// sweep reads a lease's manifest once per change, not every few seconds.
    pub(crate) expiries: std::sync::Mutex<HashMap<Digest, (String, Option<Millis>)>>,
    /// Small blobs served from memory: a read of one costs no trip to the blocking pool.
    small: std::sync::Mutex<SmallBlobs>,
}

/// Where a request works: its listener's view, the namespace and lease it names.
#[derive(Clone, Debug)]
pub struct Scope {
    pub view: String,
    pub namespace: Option<String>,
    pub lease: Option<String>,
}

impl Scope {
    /// Reads the containerd headers of a request made on a listener of `view`.
    pub fn of<T>(view: &str, req: &Request<T>) -> Result<Scope> {
        let header = |name: &str| -> Result<Option<String>> {
            match req.metadata().get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(|s| Some(s.to_owned()))
                    .map_err(|_| Error::invalid(What::Parameter, format!("{name} is not text"))),
            }
        };
        let namespace = header(NAMESPACE_HEADER)?.filter(|n| !n.is_empty());
        if let Some(n) = &namespace {
            check_identifier("namespace", n)?;
        }
        let lease = header(LEASE_HEADER)?.filter(|l| !l.is_empty());
        let view = match header(VIEW_HEADER)?.filter(|v| !v.is_empty()) {
            Some(v) => {
                check_identifier("view", &v)?;
                v
            }
            None => view.to_owned(),
        };
        Ok(Scope {
            view,
            namespace,
            lease,
        })
    }

    /// The scope of a request on a listener of `view`, once the caller may act there (a
    /// request without a namespace may act on every namespace of the view).
    pub fn checked<T>(
        view: &str,
        gate: &crate::grpc::Gate,
        req: &Request<T>,
        action: u8,
    ) -> std::result::Result<Scope, Status> {
        let scope = Scope::of(view, req).map_err(status)?;
        let whole_view = scope.namespace.is_none();
        gate.check_scope(
            req,
            Front::Content,
            Some(scope.auth_name()),
            whole_view,
            action,
        )?;
        Ok(scope)
    }

    /// The namespace writes go to.
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// The auth scope name: `<view>/<namespace>`, or `<view>/` (a prefix: every namespace)
    /// without a namespace.
    pub fn auth_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}", self.view),
            None => format!("{}/", self.view),
        }
    }
}

/// A namespace or view name: containerd's identifier rule, lower case (it becomes part of a
/// repository name).
pub fn check_identifier(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 76
        && s.split(['.', '_', '-']).all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            What::Name,
            format!(
                "{what} {:?} is not valid here: lower-case letters and digits joined by '.', '_' \
                 or '-', at most 76 characters",
                crate::digest::truncate(s, 100)
            ),
        ))
    }
}

/// What a view holds of one blob.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    pub digest: Digest,
    pub size: u64,
    pub created: Millis,
    pub updated: Millis,
    pub labels: BTreeMap<String, String>,
}

impl Hold {
    fn info(&self) -> api::Info {
        api::Info {
            digest: self.digest.to_string(),
            size: self.size as i64,
            created_at: Some(timestamp(self.created)),
            updated_at: Some(timestamp(self.updated)),
            labels: self.labels.clone().into_iter().collect(),
        }
    }

    fn of(f: FileRef) -> Hold {
        let time = |k: &str| {
            f.annotation(k)
                .and_then(|v| v.parse::<Millis>().ok())
                .unwrap_or(0)
        };
        let labels = f
            .annotation(LABELS)
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        Hold {
            digest: f.digest,
            size: f.size,
            created: time(CREATED),
            updated: time(UPDATED),
            labels,
        }
    }

    fn file(&self) -> Result<FileRef> {
        let mut a = serde_json::Map::new();
        let labels =
            serde_json::to_string(&self.labels).map_err(|e| Error::internal(e.to_string()))?;
        a.insert(LABELS.into(), labels.into());
        a.insert(CREATED.into(), self.created.to_string().into());
        a.insert(UPDATED.into(), self.updated.to_string().into());
        Ok(FileRef {
            digest: self.digest,
            size: self.size,
            annotations: a,
        })
    }
}

impl Fields for Hold {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "digest" => Some(self.digest.to_string()),
            [f] if f == "size" => Some(self.size.to_string()),
            [f] if f == "labels" => (!self.labels.is_empty()).then(String::new),
            [f, k] if f == "labels" => self.labels.get(k).cloned(),
            _ => None,
        }
    }
}

impl Fields for ingest::State {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "ref" => Some(self.meta.reference.clone()),
            [f] if f == "expected" => self.meta.expected.clone(),
            _ => None,
        }
    }
}

pub fn timestamp(ms: Millis) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn content_repo(view: &str, namespace: &str) -> Result<RepoName> {
    RepoName::parse(&format!("containerd/{view}/content/{namespace}"))
}

fn tag_of(d: &Digest) -> Result<Tag> {
    if d.algorithm() != crate::digest::Algorithm::Sha256 {
        return Err(Error::invalid_digest(format!(
            "{d}: the content API keeps sha256 digests only"
        )));
    }
    Tag::parse(&d.hex())
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() || k.len() + v.len() > MAX_LABEL {
            return Err(Error::invalid(
                What::Parameter,
                format!(
                    "label {:?}: key and value must be 1 to {MAX_LABEL} bytes together",
                    crate::digest::truncate(k, 100)
                ),
            ));
        }
    }
    Ok(())
}

/// An internal error's details go to the log; the client hears its kind.
pub fn status(e: Error) -> Status {
    use tonic::Code;
    let code = match e.kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::InvalidArgument(_) => Code::InvalidArgument,
        ErrorKind::DigestMismatch | ErrorKind::SizeMismatch => Code::FailedPrecondition,
        ErrorKind::Conflict | ErrorKind::InUse => Code::FailedPrecondition,
        ErrorKind::Exhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => {
            tracing::error!(error = %e.message, "content API: internal error");
            return Status::internal("internal error (the hoard log has the details)");
        }
    };
    Status::new(code, e.message)
}

impl Content {
    pub fn new(reg: Arc<Registry>, skew: Millis) -> Content {
        Content {
            reg,
            stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            skew,
            expiries: Default::default(),
            small: std::sync::Mutex::new(SmallBlobs {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    fn small_get(&self, d: &Digest) -> Option<Bytes> {
        self.small.lock().unwrap_or_else(|e| e.into_inner()).get(d)
    }

    fn small_put(&self, d: Digest, b: Bytes) {
        self.small
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(d, b)
    }

    /// The ingests (the registry's upload-session module keeps them).
    pub fn ingests(&self) -> Result<&Ingests> {
        self.reg.uploads.ingests()
    }

    pub(crate) async fn stripe(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let h = crate::digest::Digest::sha256_of(key.as_bytes());
        self.stripes[h.bytes()[0] as usize % self.stripes.len()]
            .lock()
            .await
    }

    /// Namespaces of `view` that hold content now.
    pub fn namespaces(&self, view: &str, kind: &str) -> Vec<String> {
        let prefix = format!("containerd/{view}/{kind}/");
        let state = self.reg.index.read();
        state
            .repos
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, r)| !r.tags.is_empty())
            .map(|(k, _)| k[prefix.len()..].to_owned())
            .filter(|ns| !ns.contains('/'))
            .collect()
    }

    /// The repositories a request reads: its namespace's, or every namespace's of the view.
    fn repos_of(&self, scope: &Scope) -> Result<Vec<RepoName>> {
        match &scope.namespace {
            Some(ns) => Ok(vec![content_repo(&scope.view, ns)?]),
            None => self
                .namespaces(&scope.view, "content")
                .iter()
                .map(|ns| content_repo(&scope.view, ns))
                .collect(),
        }
    }

    async fn hold_in(&self, repo: &RepoName, d: &Digest) -> Result<Option<Hold>> {
        if d.algorithm() != crate::digest::Algorithm::Sha256 {
            return Ok(None);
        }
        let tag = tag_of(d)?;
        Ok(self.reg.file_ref(repo, &tag).await?.map(Hold::of))
    }

    /// Size of `d` if the store has it (on a shared bucket, wherever it was written).
    pub(crate) async fn stored_size(&self, d: &Digest) -> Result<Option<u64>> {
        if let Some(n) = self.reg.index.blob_size(d) {
            return Ok(Some(n));
        }
        match &self.reg.shared {
            Some(s) => s.blob_exists(*d).await,
            None => Ok(None),
        }
    }

    /// Makes `repo` hold `hold.digest` with `hold`'s labels and times. `NotFound` when the
    /// blob is not stored (any more).
    async fn put_hold(&self, repo: &RepoName, hold: &Hold) -> Result<()> {
        let _pin = self.reg.life.pins.pin(hold.digest);
        if !self.reg.mount(repo, &hold.digest, None).await? {
            return Err(Error::not_found(format!(
                "content {} not found",
                hold.digest
            )));
        }
        self.reg
            .set_file_ref(
                repo,
                &tag_of(&hold.digest)?,
                HOLD_TYPE,
                "application/octet-stream",
                hold.file()?,
            )
            .await?;
        Ok(())
    }

    /// Drops `repo`'s hold on `d`; `false` if it had none. Bytes are the lifecycle's to judge.
    async fn drop_hold(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        if d.algorithm() != crate::digest::Algorithm::Sha256 {
            return Ok(false);
        }
        let tag = tag_of(d)?;
        match self.reg.delete_manifest(repo, &Reference::Tag(tag)).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        }
        // The link goes too, unless a manifest of the repository (a newer hold) still needs it.
        match self.reg.delete_blob(repo, d).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() || e.kind == ErrorKind::InUse => {}
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    /// `Info`: the view's hold, or the store's blob (which the view then holds).
    pub async fn info(&self, scope: &Scope, d: &Digest) -> Result<Hold> {
        for repo in self.repos_of(scope)? {
            if let Some(h) = self.hold_in(&repo, d).await? {
                return Ok(h);
            }
        }
        let Some(size) = self.stored_size(d).await? else {
            return Err(Error::not_found(format!("content {d} not found")));
        };
        let now = self.reg.clock.now_ms();
        let hold = Hold {
            digest: *d,
            size,
            created: now,
            updated: now,
            labels: BTreeMap::new(),
        };
        if d.algorithm() != crate::digest::Algorithm::Sha256 {
            // (Views hold sha256 content only: a sha512 blob is seen, not held.)
            return Ok(hold);
        }
        let repo = content_repo(&scope.view, scope.ns())?;
        let _g = self.stripe(&format!("{repo}@{d}")).await;
        if let Some(h) = self.hold_in(&repo, d).await? {
            return Ok(h);
        }
        self.put_hold(&repo, &hold).await?;
        Ok(hold)
    }

    /// `Update`: labels only (`labels`, `labels.<key>`; an empty mask means all of them).
    pub async fn update(
        &self,
        scope: &Scope,
        d: &Digest,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Hold> {
        check_labels(&labels)?;
        for p in paths {
            if p != "labels" && !p.starts_with("labels.") {
                return Err(Error::invalid(
                    What::Parameter,
                    format!("cannot update {p:?} field on content info: only labels may change"),
                ));
            }
        }
        // The hold as it is (made if the view had only looked the blob up so far).
        let current = self.info(scope, d).await?;
        let repo = content_repo(&scope.view, scope.ns())?;
        let _g = self.stripe(&format!("{repo}@{d}")).await;
        let mut hold = self.hold_in(&repo, d).await?.unwrap_or(current);
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            hold.labels = labels;
        } else {
            for p in paths {
                let key = &p["labels.".len()..];
                match labels.get(key) {
                    Some(v) => hold.labels.insert(key.to_owned(), v.clone()),
                    None => hold.labels.remove(key),
                };
            }
        }
        check_labels(&hold.labels)?;
        hold.updated = self.reg.clock.now_ms().max(hold.created);
        self.put_hold(&repo, &hold).await?;
        Ok(hold)
    }

    /// `List`: what the view holds, filtered.
    pub async fn list(&self, scope: &Scope, filters: &Filters) -> Result<Vec<Hold>> {
        let mut seen = HashMap::new();
        for repo in self.repos_of(scope)? {
            let tags: Vec<String> = {
                let state = self.reg.index.read();
                state
                    .repos
                    .get(repo.as_str())
                    .map(|r| r.tags.keys().cloned().collect())
                    .unwrap_or_default()
            };
            for t in tags {
                let Ok(tag) = Tag::parse(&t) else { continue };
                let Some(f) = self.reg.file_ref(&repo, &tag).await? else {
                    continue;
                };
                let h = Hold::of(f);
                if filters.matches(&h) {
                    seen.entry(h.digest).or_insert(h);
                }
            }
        }
        let mut out: Vec<Hold> = seen.into_values().collect();
        out.sort_by_key(|h| h.digest);
        Ok(out)
    }

    /// `Delete`: drops the view's hold (in every namespace of the view without a namespace).
    pub async fn delete(&self, scope: &Scope, d: &Digest) -> Result<()> {
        let mut dropped = false;
        for repo in self.repos_of(scope)? {
            let _g = self.stripe(&format!("{repo}@{d}")).await;
            dropped |= self.drop_hold(&repo, d).await?;
        }
        if dropped {
            Ok(())
        } else {
            Err(Error::not_found(format!("content {d} not found")))
        }
    }

    /// After a commit (or a write of content already stored): the view holds `d`, with the
    /// commit's labels, and so does the request's lease.
    async fn committed(
        &self,
        scope: &Scope,
        d: Digest,
        size: u64,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let repo = content_repo(&scope.view, scope.ns())?;
        {
            let _g = self.stripe(&format!("{repo}@{d}")).await;
            let now = self.reg.clock.now_ms();
            let hold = match self.hold_in(&repo, &d).await? {
                Some(mut h) if !labels.is_empty() => {
                    h.labels = labels;
                    h.updated = now;
                    h
                }
                Some(h) => h,
                None => Hold {
                    digest: d,
                    size,
                    created: now,
                    updated: now,
                    labels,
                },
            };
            self.put_hold(&repo, &hold).await?;
        }
        if let Some(lease) = &scope.lease {
            self.lease_add(scope, lease, leases::Resource::content(d))
                .await?;
        }
        Ok(())
    }
}

/// The gRPC service: one per listener, each with its view.
pub struct ContentService {
    pub core: Arc<Content>,
    pub view: String,
    pub gate: crate::grpc::Gate,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<T, Status>> + Send>>;

impl ContentService {
    fn scope<T>(&self, req: &Request<T>, action: u8) -> std::result::Result<Scope, Status> {
        Scope::checked(&self.view, &self.gate, req, action)
    }
}

fn digest_arg(s: &str) -> std::result::Result<Digest, Status> {
    parse_digest(s).map_err(status)
}

#[tonic::async_trait]
impl api::content_server::Content for ContentService {
    async fn info(
        &self,
        req: Request<api::InfoRequest>,
    ) -> std::result::Result<Response<api::InfoResponse>, Status> {
        let scope = self.scope(&req, crate::auth::READ)?;
        let d = digest_arg(&req.get_ref().digest)?;
        let h = match self.core.info(&scope, &d).await {
            Ok(h) => {
                crate::metrics::hit("content");
                h
            }
            Err(e) => {
                if e.is_not_found() {
                    crate::metrics::miss("content");
                }
                return Err(status(e));
            }
        };
        Ok(Response::new(api::InfoResponse {
            info: Some(h.info()),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateRequest>,
    ) -> std::result::Result<Response<api::UpdateResponse>, Status> {
        let scope = self.scope(&req, crate::auth::WRITE)?;
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("info is required"))?;
        let d = digest_arg(&info.digest)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let labels = info.labels.into_iter().collect();
        let h = self
            .core
            .update(&scope, &d, labels, &paths)
            .await
            .map_err(status)?;
        Ok(Response::new(api::UpdateResponse {
            info: Some(h.info()),
        }))
    }

    type ListStream = Stream<api::ListContentResponse>;

    async fn list(
        &self,
        req: Request<api::ListContentRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        let scope = self.scope(&req, crate::auth::READ)?;
        let filters = Filters::parse(&req.get_ref().filters).map_err(status)?;
        let holds = self.core.list(&scope, &filters).await.map_err(status)?;
        let batches: Vec<std::result::Result<api::ListContentResponse, Status>> = holds
            .chunks(LIST_BATCH)
            .map(|c| {
                Ok(api::ListContentResponse {
                    info: c.iter().map(Hold::info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn delete(
        &self,
        req: Request<api::DeleteContentRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let scope = self.scope(&req, crate::auth::DELETE)?;
        let d = digest_arg(&req.get_ref().digest)?;
        self.core.delete(&scope, &d).await.map_err(status)?;
        Ok(Response::new(()))
    }

    type ReadStream = Stream<api::ReadContentResponse>;

    async fn read(
        &self,
        req: Request<api::ReadContentRequest>,
    ) -> std::result::Result<Response<Self::ReadStream>, Status> {
        let _scope = self.scope(&req, crate::auth::READ)?;
        let r = req.into_inner();
        let d = digest_arg(&r.digest)?;
        let size = self
            .core
            .stored_size(&d)
            .await
            .map_err(status)?
            .ok_or_else(|| {
                crate::metrics::miss("content");
                Status::not_found(format!("content {d} not found"))
            })?;
        crate::metrics::hit("content");
        let offset = r.offset.max(0) as u64;
        if offset > size {
            return Err(Status::out_of_range(format!(
                "read past object length {size} bytes"
            )));
        }
        let len = if r.size <= 0 || offset + r.size as u64 > size {
            size - offset
        } else {
            r.size as u64
        };
        {
            let state = self.core.reg.index.read();
            self.core
                .reg
                .index
                .touch_blob(&state, &d, self.core.reg.clock.now_ms());
        }
        let once = |data: Bytes| -> Response<Self::ReadStream> {
            let msg = api::ReadContentResponse {
                offset: offset as i64,
                data,
            };
            Response::new(Box::pin(tokio_stream::once(Ok(msg))))
        };
        let (from, to) = (offset as usize, (offset + len) as usize);
        let doomed = self
            .core
            .reg
            .shared
            .as_ref()
            .is_some_and(|s| s.doomed_blob(&d));
        if size <= SMALL_BLOB && !doomed {
            if let Some(b) = self.core.small_get(&d).filter(|b| b.len() as u64 == size) {
                return Ok(once(b.slice(from..to)));
            }
        }
        let permit = self.core.reg.transfer().await.map_err(status)?;
        let store = self.core.reg.store.clone();
        let small = size <= SMALL_BLOB;
        if small || len <= READ_CHUNK as u64 {
            // One message, read in one step on the blocking pool: a small blob whole and
            // verified (then kept for the next read), anything else just the range.
            let (at, want) = if small { (0, size) } else { (offset, len) };
            let data = blocking(move || {
                let _permit = permit;
                let mut r = store.open_at(&d, at)?;
                let mut buf = vec![0u8; want as usize];
                std::io::Read::read_exact(&mut r, &mut buf)
                    .map_err(|e| Error::io(format!("reading {d}"), e))?;
                if small && Digest::of(d.algorithm(), &buf) != d {
                    tracing::error!(digest = %d, "stored blob does not match its digest: run `hoard admin verify --repair`");
                    return Err(Error::internal(format!(
                        "stored blob {d} does not match its digest"
                    )));
                }
                Ok::<_, Error>(Bytes::from(buf))
            })
            .await
            .map_err(status)?;
            if !small {
                return Ok(once(data));
            }
            if !doomed {
                self.core.small_put(d, data.clone());
            }
            return Ok(once(data.slice(from..to)));
        }
        let reader = blocking(move || store.open_at(&d, offset))
            .await
            .map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut reader = reader;
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let want = ((end - at) as usize).min(READ_CHUNK);
                let mut buf = vec![0u8; want];
                if let Err(e) = std::io::Read::read_exact(&mut reader, &mut buf) {
                    let _ = tx.blocking_send(Err(status(Error::io(format!("reading {d}"), e))));
                    return;
                }
                let msg = api::ReadContentResponse {
                    offset: at as i64,
                    data: Bytes::from(buf),
                };
                if tx.blocking_send(Ok(msg)).is_err() {
                    return;
                }
                at += want as u64;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        req: Request<api::StatusRequest>,
    ) -> std::result::Result<Response<api::StatusResponse>, Status> {
        let scope = self.scope(&req, crate::auth::READ)?;
        let reference = req.into_inner().r#ref;
        let core = self.core.clone();
        let ns = scope.ns().to_owned();
        let view = scope.view.clone();
        let found = blocking(move || core.ingests()?.list(&view, Some(&ns)))
            .await
            .map_err(status)?
            .into_iter()
            .find(|s| s.meta.reference == reference)
            .ok_or_else(|| Status::not_found(format!("ref {reference} not found")))?;
        Ok(Response::new(api::StatusResponse {
            status: Some(status_of(&found)),
        }))
    }

    async fn list_statuses(
        &self,
        req: Request<api::ListStatusesRequest>,
    ) -> std::result::Result<Response<api::ListStatusesResponse>, Status> {
        let scope = self.scope(&req, crate::auth::READ)?;
        let filters = Filters::parse(&req.get_ref().filters).map_err(status)?;
        let core = self.core.clone();
        let view = scope.view.clone();
        let ns = scope.namespace.clone();
        let all = blocking(move || core.ingests()?.list(&view, ns.as_deref()))
            .await
            .map_err(status)?;
        Ok(Response::new(api::ListStatusesResponse {
            statuses: all
                .iter()
                .filter(|s| filters.matches(*s))
                .map(status_of)
                .collect(),
        }))
    }

    type WriteStream = Stream<api::WriteContentResponse>;

    async fn write(
        &self,
        req: Request<Streaming<api::WriteContentRequest>>,
    ) -> std::result::Result<Response<Self::WriteStream>, Status> {
        let scope = self.scope(&req, crate::auth::WRITE)?;
        if let Some(lease) = &scope.lease {
            // Writing under a lease that does not exist is refused before any byte.
            self.core.lease_check(&scope, lease).await.map_err(status)?;
        }
        let mut input = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let core = self.core.clone();
        tokio::spawn(async move {
            if let Err(e) = write_stream(&core, &scope, &mut input, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn abort(
        &self,
        req: Request<api::AbortRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let scope = self.scope(&req, crate::auth::WRITE)?;
        let reference = req.into_inner().r#ref;
        let core = self.core.clone();
        blocking(move || core.ingests()?.abort(&scope.view, scope.ns(), &reference))
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }
}

fn status_of(s: &ingest::State) -> api::Status {
    api::Status {
        started_at: Some(timestamp(s.meta.started)),
        updated_at: Some(timestamp(s.updated)),
        r#ref: s.meta.reference.clone(),
        offset: s.offset as i64,
        total: s.meta.total as i64,
        expected: s.meta.expected.clone().unwrap_or_default(),
    }
}

type Tx = tokio::sync::mpsc::Sender<std::result::Result<api::WriteContentResponse, Status>>;

/// One `Write` stream, with containerd's rules: the first message names the ref, one stream per
/// ref, `expected` already stored → `AlreadyExists`, writes at the current offset (0 restarts),
/// `COMMIT` checks size and digest and ends the stream; the client hanging up leaves the ingest
/// to resume.
async fn write_stream(
    core: &Arc<Content>,
    scope: &Scope,
    input: &mut Streaming<api::WriteContentRequest>,
    tx: &Tx,
) -> std::result::Result<(), Status> {
    let Some(first) = input.message().await? else {
        return Ok(());
    };
    if first.r#ref.is_empty() {
        return Err(Status::invalid_argument(
            "first message must have a reference",
        ));
    }
    let reference = first.r#ref.clone();
    let mut held = {
        let core = core.clone();
        let (view, ns, r) = (scope.view.clone(), scope.ns().to_owned(), reference.clone());
        blocking(move || core.ingests()?.lock(&view, &ns, &r))
            .await
            .map_err(status)?
    };
    if held.is_none() {
        let now = core.reg.clock.now_ms();
        let meta = ingest::Meta {
            view: scope.view.clone(),
            namespace: scope.ns().to_owned(),
            reference: reference.clone(),
            started: now,
            total: 0,
            expected: None,
        };
        core.ingests().map_err(status)?.create(&mut held, meta);
    }
    let r = write_loop(core, scope, input, tx, first, &mut held).await;
    // Not committed (the client hung up, or a message was refused): what was written stays,
    // resumable by the next stream on this ref, also after a restart.
    if held.is_some() {
        if let Err(e) = blocking(move || held.release()).await {
            tracing::warn!(error = %e, "cannot keep an ingest for resuming");
        }
    }
    r
}

async fn write_loop(
    core: &Arc<Content>,
    scope: &Scope,
    input: &mut Streaming<api::WriteContentRequest>,
    tx: &Tx,
    first: api::WriteContentRequest,
    held: &mut ingest::Held,
) -> std::result::Result<(), Status> {
    let mut msg = Some(first);
    loop {
        let req = match msg.take() {
            Some(m) => m,
            None => match input.message().await {
                Ok(Some(m)) => m,
                // The client hung up (or the stream broke): the ingest stays, resumable.
                Ok(None) | Err(_) => return Ok(()),
            },
        };
        let open = held
            .as_mut()
            .ok_or_else(|| Status::internal("ingest vanished"))?;
        let mut meta_changed = false;
        if req.total > 0 && req.total as u64 != open.meta.total {
            open.meta.total = req.total as u64;
            meta_changed = true;
        }
        if !req.expected.is_empty() {
            let d = digest_arg(&req.expected)?;
            // Kept from here until the view holds it (a collection in between must not take it).
            let _pin = core.reg.life.pins.pin(d);
            if open.meta.expected.as_deref() != Some(req.expected.as_str()) {
                open.meta.expected = Some(req.expected.clone());
                meta_changed = true;
            }
            if let Some(size) = core.stored_size(&d).await.map_err(status)? {
                // Stored already: the view holds it now, the ingest goes.
                if let Some(open) = held.take() {
                    blocking(move || open.remove()).await;
                }
                core.committed(scope, d, size, req.labels.into_iter().collect())
                    .await
                    .map_err(status)?;
                return Err(Status::already_exists(format!(
                    "blob with expected digest {d} exists"
                )));
            }
        }
        if meta_changed {
            open.save_meta().map_err(status)?;
        }
        let action = api::WriteAction::try_from(req.action).unwrap_or(api::WriteAction::Write);
        match action {
            api::WriteAction::Stat => {}
            api::WriteAction::Write | api::WriteAction::Commit => {
                if req.offset > 0 && req.offset as u64 != open.offset() {
                    return Err(Status::out_of_range(format!(
                        "write @{} must occur at current offset {}",
                        req.offset,
                        open.offset()
                    )));
                }
                let restart = req.offset == 0 && open.offset() > 0;
                if restart || !req.data.is_empty() {
                    let data = req.data.clone();
                    let now = core.reg.clock.now_ms();
                    let mut o = held
                        .take()
                        .ok_or_else(|| Status::internal("ingest vanished"))?;
                    let (o, r) = blocking(move || {
                        let r = (|| {
                            if restart {
                                o.truncate(now)?;
                            }
                            o.append(&data, now)
                        })();
                        (o, r)
                    })
                    .await;
                    **held = Some(o);
                    r.map_err(status)?;
                }
            }
        }
        let open = held
            .as_mut()
            .ok_or_else(|| Status::internal("ingest vanished"))?;
        let mut reply = api::WriteContentResponse {
            action: action as i32,
            started_at: Some(timestamp(open.meta.started)),
            updated_at: Some(timestamp(open.updated)),
            offset: open.offset() as i64,
            total: open.meta.total as i64,
            digest: open.digest().to_string(),
        };
        if action == api::WriteAction::Commit {
            let size = open.offset();
            let hashed = open.digest();
            let total = if req.total > 0 {
                req.total as u64
            } else {
                open.meta.total
            };
            if total > 0 && total != size {
                return Err(Status::failed_precondition(format!(
                    "unexpected commit size {size}, expected {total}"
                )));
            }
            let expected = match open.meta.expected.as_deref() {
                Some(e) => digest_arg(e)?,
                None => hashed,
            };
            if expected != hashed {
                return Err(Status::failed_precondition(format!(
                    "unexpected commit digest {hashed}, expected {expected}"
                )));
            }
            let repo = content_repo(&scope.view, scope.ns()).map_err(status)?;
            // Pinned from the commit until the view holds it: nothing references it in between.
            let _pin = core.reg.life.pins.pin(expected);
            if core.stored_size(&expected).await.map_err(status)?.is_some() {
                // Stored meanwhile (or the client named no digest): containerd answers
                // AlreadyExists; the view holds it and the ingest goes.
                if let Some(open) = held.take() {
                    blocking(move || open.remove()).await;
                }
                core.committed(scope, expected, size, req.labels.into_iter().collect())
                    .await
                    .map_err(status)?;
                return Err(Status::already_exists(format!("content {expected}")));
            }
            let mut open = held
                .take()
                .ok_or_else(|| Status::internal("ingest vanished"))?;
            let payload = open.payload();
            let r = match &payload {
                // Small: one store write, no ingest file was ever made.
                ingest::Payload::Memory(bytes) => {
                    let r = core.reg.put_bytes(&repo, expected, bytes.clone()).await;
                    if r.is_ok() {
                        // A copy: the ingest's buffer may have grown past its length.
                        core.small_put(expected, Bytes::copy_from_slice(bytes));
                    }
                    r.map(|()| size)
                }
                ingest::Payload::File(path) => {
                    core.reg
                        .commit_file(
                            &repo,
                            path.clone(),
                            hashed,
                            size,
                            Expect {
                                digest: expected,
                                size: Some(size),
                            },
                        )
                        .await
                }
            };
            if let Err(e) = r {
                // The store could not take it for now (full, S3 unreachable, an I/O error): the
                // ingest stays at its offset and the client commits again when it can. (An
                // in-memory ingest goes to its files when the stream ends; if even that fails,
                // the client's next STAT says offset 0.) Anything else ends the ingest.
                let transient = matches!(
                    e.kind,
                    ErrorKind::Unavailable | ErrorKind::Exhausted | ErrorKind::Internal
                );
                let (open, kept) = blocking(move || {
                    let kept = transient && open.restore(payload);
                    (open, kept)
                })
                .await;
                if kept {
                    **held = Some(open);
                } else {
                    blocking(move || open.remove()).await;
                }
                return Err(status(e));
            }
            blocking(move || open.remove()).await;
            core.committed(scope, expected, size, req.labels.into_iter().collect())
                .await
                .map_err(status)?;
            reply.digest = expected.to_string();
            let _ = tx.send(Ok(reply)).await;
            return Ok(());
        }
        if tx.send(Ok(reply)).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_blobs_stay_within_their_byte_bound_least_recently_used_out_first() {
        let mut c = SmallBlobs {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
        };
        let blob = |i: u32| Bytes::from(vec![i as u8; SMALL_BLOB as usize - SMALL_ENTRY]);
        let d = |i: u32| Digest::sha256_of(&i.to_le_bytes());
        let fit = (SMALL_CACHE / SMALL_BLOB as usize) as u32;
        for i in 0..fit {
            c.put(d(i), blob(i));
        }
        assert_eq!(c.bytes, SMALL_CACHE);
        // The first is used again; the next put pushes out the second, not the first.
        assert!(c.get(&d(0)).is_some());
        c.put(d(fit), blob(fit));
        assert_eq!(c.bytes, SMALL_CACHE);
        assert!(c.get(&d(0)).is_some());
        assert!(c.get(&d(1)).is_none());
        // The same blob again counts once; one over the size limit is not kept.
        c.put(d(0), blob(0));
        assert_eq!(c.bytes, SMALL_CACHE);
        c.put(d(fit + 1), Bytes::from(vec![0; SMALL_BLOB as usize + 1]));
        assert!(c.get(&d(fit + 1)).is_none());
        assert_eq!(c.bytes, SMALL_CACHE);
    }
}
