//! Cache-mount snapshots: any directory (GOMODCACHE, GOCACHE, npm, cargo, …) saved as
//! content-defined chunks and restored elsewhere. `client` is `hoard snapshot save|restore`;
//! this is the server side at `/snapshots/`:
//!
//! - `POST /snapshots/<key>/_missing` (a JSON list of chunk digests): which are not stored
//!   (the others are linked into the key's repository now).
//! - `PUT /snapshots/<key>/_chunks/<digest>` / `GET …`: one chunk (zstd), verified by digest.
//! - `PUT /snapshots/<key>` (the zstd index): commits the snapshot; every chunk must be stored.
//!   Until this answers nothing of the new snapshot is visible, and then all of it is.
//! - `GET /snapshots/<key>`, `GET /snapshots/?prefix=<p>` (the newest key starting with `p`):
//!   the index, its key in `Hoard-Snapshot-Key`.
//! - `GET /snapshots/<key>/_tar` and `PUT /snapshots/<key>/_tar`: the tree as a tar stream,
//!   for a build step with only `curl` and `tar`.
//!
//! Layout, in the repository `snapshots/<key>`: tag `snapshot` → an OCI index whose entries
//! are the index blob and image manifests listing the chunk blobs as layers (so chunks are
//! reachable from the tag, shared between keys, and collected once no snapshot lists them);
//! tag `latest` → an OCI image with the tree as one tar layer, built after each save, so a
//! Dockerfile seeds a cache mount with `from=hoard:5000/snapshots/<key>:latest`.

pub mod client;
pub mod format;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use sha2::{Digest as _, Sha256};

use crate::clock::Millis;
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, Result, What};
use crate::http::{channel_body, empty, full, stream_blob, Body};
use crate::names::{Reference, RepoName, Tag};
use crate::registry::manifests::{PutManifest, OCI_INDEX, OCI_MANIFEST};
use crate::registry::{blocking, pump, Registry};
use crate::store::{BlobWriter, Expect};
use format::{Chunk, Index, Kind, Node};

pub const KEY_HEADER: HeaderName = HeaderName::from_static("hoard-snapshot-key");
const SNAPSHOT_TAG: &str = "snapshot";
const IMAGE_TAG: &str = "latest";
const ARTIFACT_TYPE: &str = "application/vnd.hoard.snapshot.v1";
/// Chunks listed per manifest (well under the manifest size limit).
const CHUNKS_PER_MANIFEST: usize = 8192;
const EMPTY_CONFIG: &[u8] = b"{}";
const SAVED_KEY: &str = "dev.hoard.snapshot.saved";
const FROM_KEY: &str = "dev.hoard.snapshot.from";

pub struct Snapshots {
    reg: Arc<Registry>,
    /// Image builds per key: one at a time, and another round if a save landed meanwhile.
    building: std::sync::Mutex<HashMap<String, bool>>,
    tmp: std::path::PathBuf,
}

#[derive(Debug, PartialEq)]
enum Route {
    Newest(String),
    Snapshot(String),
    Missing(String),
    Chunk(String, Digest),
    Tar(String),
}

fn parse_route(path: &str, query: Option<&str>) -> Result<Route> {
    let rest = path.strip_prefix("/snapshots/").unwrap_or("");
    if rest.is_empty() {
        let prefix = query
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("prefix="))
            .map(crate::oci::percent_decode)
            .ok_or_else(|| Error::not_found("GET /snapshots/<key> or /snapshots/?prefix=<p>"))?;
        return Ok(Route::Newest(prefix));
    }
    let key_of = |k: &str| -> Result<String> {
        format::check_key(k)?;
        Ok(k.to_owned())
    };
    if let Some(k) = rest.strip_suffix("/_missing") {
        return Ok(Route::Missing(key_of(k)?));
    }
    if let Some(k) = rest.strip_suffix("/_tar") {
        return Ok(Route::Tar(key_of(k)?));
    }
    if let Some((k, d)) = rest.rsplit_once("/_chunks/") {
        let d: Digest = d.parse()?;
        return Ok(Route::Chunk(key_of(k)?, d));
    }
    Ok(Route::Snapshot(key_of(rest)?))
}

fn bad(m: impl Into<String>) -> Error {
    Error::invalid(What::Parameter, m)
}

impl Snapshots {
    pub fn new(reg: Arc<Registry>, tmp: std::path::PathBuf) -> Result<Snapshots> {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        Ok(Snapshots {
            reg,
            building: std::sync::Mutex::new(HashMap::new()),
            tmp,
        })
    }

    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = crate::oci::percent_decode(req.uri().path());
        let head = req.method() == Method::HEAD;
        let r = match parse_route(&path, req.uri().query()) {
            Ok(route) => self.dispatch(route, req).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(r) => r,
            Err(e) => {
                let r = crate::http::error_text(&e, head, StatusCode::SERVICE_UNAVAILABLE);
                if r.status() != StatusCode::NOT_FOUND {
                    tracing::info!(path = %path, status = r.status().as_u16(), reason = %e.message, "snapshot request refused");
                }
                r
            }
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        route: Route,
        req: Request<Incoming>,
    ) -> Result<Response<Body>> {
        let m = req.method().clone();
        match (route, &m) {
            (Route::Newest(p), &Method::GET) => {
                let key = self.newest(&p).await?.ok_or_else(|| {
                    Error::not_found(format!("no snapshot key starts with {p:?}"))
                })?;
                self.get_index(&key).await
            }
            (Route::Snapshot(k), &Method::GET) => self.get_index(&k).await,
            (Route::Snapshot(k), &Method::PUT) => {
                let body = read_limited(req, format::MAX_INDEX).await?;
                let index = Index::decode(&body).map_err(bad)?;
                let out = self.commit(&k, &index, body).await?;
                Ok(json(StatusCode::CREATED, out))
            }
            (Route::Missing(k), &Method::POST) => {
                let body = read_limited(req, 16 << 20).await?;
                let list: Vec<String> = serde_json::from_slice(&body)
                    .map_err(|e| bad(format!("expected a JSON list of digests: {e}")))?;
                let repo = format::check_key(&k)?;
                let mut missing = Vec::new();
                for d in list {
                    let dg: Digest = d.parse()?;
                    if !self.link(&repo, &dg).await? {
                        missing.push(d);
                    }
                }
                Ok(json(StatusCode::OK, serde_json::json!(missing)))
            }
            (Route::Chunk(k, d), &Method::GET | &Method::HEAD) => {
                let repo = format::check_key(&k)?;
                let size = self.reg.stat_blob(&repo, &d, false).await?;
                let mut resp = if m == Method::HEAD {
                    Response::new(empty())
                } else {
                    let permit = self.reg.transfer().await?;
                    let r = self.reg.open_blob(&repo, &d, 0).await?;
                    Response::new(
                        stream_blob(r, size, Some(permit))
                            .await
                            .map_err(|e| Error::io(format!("reading {d}"), e))?,
                    )
                };
                resp.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(size));
                Ok(resp)
            }
            (Route::Chunk(k, d), &Method::PUT) => {
                let repo = format::check_key(&k)?;
                let size = content_length(&req)?;
                let _permit = self.reg.transfer().await?;
                let mut w = self.reg.new_writer(Algorithm::Sha256)?;
                w.named(&d);
                w.reserve(size)?;
                let (w, res) = pump(w, req.into_body(), self.reg.body_timeout).await;
                res?;
                self.reg
                    .commit_upload(
                        &repo,
                        w,
                        Expect {
                            digest: d,
                            size: Some(size),
                        },
                    )
                    .await?;
                let mut r = Response::new(empty());
                *r.status_mut() = StatusCode::CREATED;
                Ok(r)
            }
            (Route::Tar(k), &Method::GET) => self.get_tar(&k).await,
            (Route::Tar(k), &Method::PUT) => {
                let out = self.put_tar(&k, req).await?;
                Ok(json(StatusCode::CREATED, out))
            }
            _ => {
                let mut r = Response::new(full(format!("method {m} is not allowed here\n")));
                *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                Ok(r)
            }
        }
    }

    /// Links an already stored blob into `repo`; `false` when it is not stored.
    async fn link(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        match self.reg.stat_blob(repo, d, true).await {
            Ok(_) => return Ok(true),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        // Shared between snapshots, never taken from elsewhere: a chunk already in another
        // snapshot's repository is linked from there; a digest seen only in an image
        // repository is "missing" (its bytes are uploaded), so naming a digest is never a way
        // to read what is stored outside the snapshots.
        let source = {
            let state = self.reg.index.read();
            state
                .repos
                .iter()
                .find(|(name, r)| name.as_str().starts_with("snapshots/") && r.blobs.contains(d))
                .map(|(name, _)| name.clone())
        };
        match source.and_then(|n| RepoName::parse(&n).ok()) {
            Some(from) => self.reg.mount(repo, d, Some(&from)).await,
            None => Ok(false),
        }
    }

    /// The key (under `prefix`) whose snapshot was saved last.
    async fn newest(&self, prefix: &str) -> Result<Option<String>> {
        let from = format!("snapshots/{prefix}");
        let candidates: Vec<String> = {
            let state = self.reg.index.read();
            state
                .repos
                .range(from.clone()..)
                .take_while(|(name, _)| name.starts_with(&from))
                .filter(|(_, r)| r.tags.contains_key(SNAPSHOT_TAG))
                .map(|(name, _)| name["snapshots/".len()..].to_owned())
                .take(10_000)
                .collect()
        };
        let mut best: Option<(Millis, String)> = None;
        for key in candidates {
            if let Ok(Some((_, saved, _))) = self.current(&key).await {
                if best.as_ref().is_none_or(|(t, _)| saved > *t) {
                    best = Some((saved, key));
                }
            }
        }
        Ok(best.map(|(_, k)| k))
    }

    /// The committed snapshot of `key`: its top manifest, when it was saved, its index blob.
    async fn current(&self, key: &str) -> Result<Option<(Digest, Millis, Digest)>> {
        let repo = format::check_key(key)?;
        let reference = Reference::Tag(Tag::parse(SNAPSHOT_TAG)?);
        let (top, _, bytes) = match self.reg.get_manifest(&repo, &reference).await {
            Ok(v) => v,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("snapshot manifest {top}: {e}")))?;
        let saved = v["annotations"][SAVED_KEY]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let index = v["manifests"][0]["digest"]
            .as_str()
            .ok_or_else(|| Error::internal(format!("snapshot manifest {top} has no index")))?
            .parse()?;
        Ok(Some((top, saved, index)))
    }

    async fn load(&self, key: &str) -> Result<(Digest, Index, Bytes)> {
        let (top, _, index) = self
            .current(key)
            .await?
            .ok_or_else(|| Error::not_found(format!("no snapshot {key:?}")))?;
        let bytes = self.reg.read_small(&index, format::MAX_INDEX).await?;
        let parsed = Index::decode(&bytes).map_err(Error::internal)?;
        Ok((top, parsed, bytes))
    }

    async fn get_index(&self, key: &str) -> Result<Response<Body>> {
        let (_, _, bytes) = self.load(key).await?;
        let mut r = Response::new(full(bytes.clone()));
        let h = r.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(format::INDEX_MEDIA_TYPE),
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        if let Ok(v) = HeaderValue::from_str(key) {
            h.insert(KEY_HEADER, v);
        }
        Ok(r)
    }

    /// Makes `index` the snapshot of `key`: every chunk must be stored; the tag moves last.
    async fn commit(
        self: &Arc<Self>,
        key: &str,
        index: &Index,
        encoded: Bytes,
    ) -> Result<serde_json::Value> {
        index.check().map_err(bad)?;
        let repo = format::check_key(key)?;
        let blobs = index.blobs();
        let mut sizes = HashMap::new();
        for b in &blobs {
            let d: Digest = b.parse()?;
            if !self.link(&repo, &d).await? {
                return Err(bad(format!(
                    "chunk {d} is not stored: upload it (PUT /snapshots/{key}/_chunks/{d}) before the index"
                )));
            }
            sizes.insert(d, self.reg.stat_blob(&repo, &d, true).await?);
        }
        let index_digest = Digest::sha256_of(&encoded);
        self.reg
            .put_bytes(&repo, index_digest, encoded.clone())
            .await?;
        let config = Digest::sha256_of(EMPTY_CONFIG);
        self.reg
            .put_bytes(&repo, config, Bytes::from_static(EMPTY_CONFIG))
            .await?;
        let mut entries = vec![serde_json::json!({
            "mediaType": format::INDEX_MEDIA_TYPE,
            "digest": index_digest.to_string(),
            "size": encoded.len(),
        })];
        let digests: Vec<Digest> = sizes
            .keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for group in digests.chunks(CHUNKS_PER_MANIFEST) {
            let layers: Vec<serde_json::Value> = group
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "mediaType": format::CHUNK_MEDIA_TYPE,
                        "digest": d.to_string(),
                        "size": sizes[d],
                    })
                })
                .collect();
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": ARTIFACT_TYPE,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.to_string(), "size": EMPTY_CONFIG.len()},
                "layers": layers,
            });
            let body =
                Bytes::from(serde_json::to_vec(&m).map_err(|e| Error::internal(e.to_string()))?);
            let d = Digest::sha256_of(&body);
            let len = body.len();
            self.reg
                .put_manifest(PutManifest {
                    repo: &repo,
                    reference: &Reference::Digest(d),
                    content_type: Some(OCI_MANIFEST),
                    body,
                    extra_tags: &[],
                })
                .await?;
            entries.push(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": len}));
        }
        let saved = self.reg.clock.now_ms();
        let top = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": ARTIFACT_TYPE,
            "manifests": entries,
            "annotations": {
                SAVED_KEY: saved.to_string(),
                "dev.hoard.snapshot.files": index.files().to_string(),
                "dev.hoard.snapshot.bytes": index.bytes().to_string(),
            },
        });
        let body =
            Bytes::from(serde_json::to_vec(&top).map_err(|e| Error::internal(e.to_string()))?);
        self.reg
            .put_manifest(PutManifest {
                repo: &repo,
                reference: &Reference::Tag(Tag::parse(SNAPSHOT_TAG)?),
                content_type: Some(OCI_INDEX),
                body,
                extra_tags: &[],
            })
            .await?;
        tracing::info!(
            key,
            files = index.files(),
            bytes = index.bytes(),
            chunks = digests.len(),
            "snapshot saved"
        );
        self.spawn_image(key.to_owned());
        Ok(serde_json::json!({
            "key": key,
            "files": index.files(),
            "bytes": index.bytes(),
            "chunks": digests.len(),
        }))
    }

    /// Builds the OCI image form of `key` in the background (again if a save lands meanwhile).
    fn spawn_image(self: &Arc<Self>, key: String) {
        {
            let Ok(mut b) = self.building.lock() else {
                return;
            };
            if let Some(again) = b.get_mut(&key) {
                *again = true;
                return;
            }
            b.insert(key.clone(), false);
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.build_image(&key).await {
                    tracing::warn!(key = %key, error = %e, "cannot build the snapshot's image form");
                }
                let Ok(mut b) = me.building.lock() else {
                    return;
                };
                match b.get_mut(&key) {
                    Some(again) if *again => *again = false,
                    _ => {
                        b.remove(&key);
                        return;
                    }
                }
            }
        });
    }

    /// Tag `latest`: an OCI image whose one layer is the tree as a tar.
    async fn build_image(&self, key: &str) -> Result<()> {
        let repo = format::check_key(key)?;
        let (top, index, _) = self.load(key).await?;
        let (reg, idx) = (self.reg.clone(), index.clone());
        let w = self.reg.new_writer(Algorithm::Sha256)?;
        let sink = blocking(move || -> Result<Sink> {
            let store = reg.store.clone();
            let sink = Sink {
                w,
                hash: Sha256::new(),
                n: 0,
            };
            format::write_tar(&idx, sink, |c| read_chunk(&*store, c))
                .map_err(|e| Error::internal(format!("writing the tar: {e}")))
        })
        .await?;
        let (n, layer) = (
            sink.n,
            Digest::from_raw(Algorithm::Sha256, &sink.hash.finalize())
                .ok_or_else(|| Error::internal("digest"))?,
        );
        self.reg
            .commit_upload(
                &repo,
                sink.w,
                Expect {
                    digest: layer,
                    size: Some(n),
                },
            )
            .await?;
        let config = serde_json::json!({
            "architecture": go_arch(),
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.to_string()]},
            "config": {},
        });
        let config =
            Bytes::from(serde_json::to_vec(&config).map_err(|e| Error::internal(e.to_string()))?);
        let config_digest = Digest::sha256_of(&config);
        let config_len = config.len();
        self.reg.put_bytes(&repo, config_digest, config).await?;
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.to_string(), "size": n}],
            "annotations": {FROM_KEY: top.to_string()},
        });
        let body = Bytes::from(serde_json::to_vec(&m).map_err(|e| Error::internal(e.to_string()))?);
        self.reg
            .put_manifest(PutManifest {
                repo: &repo,
                reference: &Reference::Tag(Tag::parse(IMAGE_TAG)?),
                content_type: Some(OCI_MANIFEST),
                body,
                extra_tags: &[],
            })
            .await?;
        tracing::info!(key, layer = %layer, size = n, "snapshot image form built");
        Ok(())
    }

    async fn get_tar(&self, key: &str) -> Result<Response<Body>> {
        let (_, index, _) = self.load(key).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let store = self.reg.store.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let out = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(256 << 10),
            };
            let r = format::write_tar(&index, out, |c| read_chunk(&*store, c))
                .and_then(|mut w| w.flush());
            if let Err(e) = r {
                tracing::warn!(key = %key, error = %e, "snapshot tar cut off");
                let _ = tx.blocking_send(Err(e));
            }
        });
        let mut r = Response::new(channel_body(rx));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
        Ok(r)
    }

    /// A save from a tar stream: spooled to a temporary file, chunked and stored here.
    async fn put_tar(
        self: &Arc<Self>,
        key: &str,
        req: Request<Incoming>,
    ) -> Result<serde_json::Value> {
        let repo = format::check_key(key)?;
        let tmp = self.tmp.join(format!(
            "tar-{}-{}",
            std::process::id(),
            self.reg.clock.now_ms()
        ));
        let _cleanup = RemoveOnDrop(tmp.clone());
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let mut body = req.into_body();
        loop {
            let frame = match tokio::time::timeout(self.reg.body_timeout, body.frame()).await {
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(e))) => {
                    return Err(Error::conflict(format!("upload interrupted: {e}")))
                }
                Ok(None) => break,
                Err(_) => return Err(Error::conflict("upload body stalled")),
            };
            if let Ok(d) = frame.into_data() {
                tokio::io::AsyncWriteExt::write_all(&mut file, &d)
                    .await
                    .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
            }
        }
        drop(file);
        let (reg, path) = (self.reg.clone(), tmp.clone());
        let handle = tokio::runtime::Handle::current();
        let index = blocking(move || -> Result<Index> {
            let f =
                std::fs::File::open(&path).map_err(|e| Error::io("opening the spooled tar", e))?;
            let mut archive = tar::Archive::new(std::io::BufReader::new(f));
            let mut nodes: Vec<Node> = Vec::new();
            let entries = archive
                .entries()
                .map_err(|e| bad(format!("not a tar stream: {e}")))?;
            for entry in entries {
                let mut e = entry.map_err(|e| bad(format!("not a tar stream: {e}")))?;
                let raw = e
                    .path()
                    .map_err(|e| bad(format!("tar entry path: {e}")))?
                    .to_string_lossy()
                    .into_owned();
                let p = raw
                    .trim_start_matches("./")
                    .trim_end_matches('/')
                    .to_owned();
                if p.is_empty() || p == "." {
                    continue;
                }
                format::check_path(&p).map_err(|why| bad(format!("tar entry {raw:?}: {why}")))?;
                let h = e.header();
                let mode = h.mode().unwrap_or(0o644) & 0o7777;
                let mtime_ns = h.mtime().unwrap_or(0) as i64 * 1_000_000_000;
                let kind = h.entry_type();
                let node = if kind.is_dir() {
                    Node {
                        path: p,
                        kind: Kind::Dir,
                        mode,
                        mtime_ns,
                        size: 0,
                        sha256: None,
                        chunks: vec![],
                        target: None,
                    }
                } else if kind.is_symlink() {
                    let target = e
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|t| t.to_string_lossy().into_owned())
                        .ok_or_else(|| bad(format!("symlink {p:?} without a target")))?;
                    Node {
                        path: p,
                        kind: Kind::Symlink,
                        mode,
                        mtime_ns,
                        size: 0,
                        sha256: None,
                        chunks: vec![],
                        target: Some(target),
                    }
                } else if kind.is_file() {
                    let (sha, size, chunks) = chunk_stream(&mut e, |data, sha256| {
                        let stored = compress(data)?;
                        let d = Digest::sha256_of(&stored);
                        handle.block_on(reg.put_bytes(&repo, d, Bytes::from(stored)))?;
                        Ok(Chunk {
                            blob: d.to_string(),
                            size: data.len() as u64,
                            sha256,
                        })
                    })?;
                    Node {
                        path: p,
                        kind: Kind::File,
                        mode,
                        mtime_ns,
                        size,
                        sha256: Some(sha),
                        chunks,
                        target: None,
                    }
                } else {
                    // Devices, FIFOs, hard links: not something a cache directory needs.
                    continue;
                };
                nodes.push(node);
            }
            nodes.sort_by(|a, b| a.path.cmp(&b.path));
            nodes.dedup_by(|a, b| a.path == b.path);
            Ok(Index { version: 1, nodes })
        })
        .await?;
        let encoded = Bytes::from(index.encode().map_err(|e| Error::internal(e.to_string()))?);
        self.commit(key, &index, encoded).await
    }
}

/// Chunks a stream with FastCDC and hands each chunk's bytes and SHA-256 (hex) to `store`,
/// which stores it (compressed) and returns its index entry. Returns the whole stream's SHA-256,
/// its length and its chunks.
pub fn chunk_stream<R: Read>(
    r: R,
    mut store: impl FnMut(&[u8], String) -> Result<Chunk>,
) -> Result<(String, u64, Vec<Chunk>)> {
    let mut whole = Sha256::new();
    let mut size = 0u64;
    let mut chunks = Vec::new();
    let cdc = fastcdc::v2020::StreamCDC::new(
        r,
        format::MIN_CHUNK as usize,
        format::AVG_CHUNK as usize,
        format::MAX_CHUNK as usize,
    );
    for c in cdc {
        let c = c.map_err(|e| Error::internal(format!("reading for chunking: {e}")))?;
        whole.update(&c.data);
        size += c.data.len() as u64;
        let sha = crate::digest::hex_encode(&Sha256::digest(&c.data));
        chunks.push(store(&c.data, sha)?);
    }
    Ok((crate::digest::hex_encode(&whole.finalize()), size, chunks))
}

/// A chunk's stored form: its zstd compression.
pub fn compress(data: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(data, format::ZSTD_LEVEL)
        .map_err(|e| Error::internal(format!("zstd: {e}")))
}

fn read_chunk(store: &dyn crate::store::BlobStore, c: &Chunk) -> std::io::Result<Vec<u8>> {
    let d: Digest = c
        .blob
        .parse()
        .map_err(|e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e.message))?;
    let mut r = store
        .open(&d)
        .map_err(|e| std::io::Error::other(e.message))?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)?;
    format::open_chunk(c, &buf)
}

/// The architecture name Go and OCI use for this machine.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

struct Sink {
    w: Box<dyn BlobWriter>,
    hash: Sha256,
    n: u64,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w
            .write(buf)
            .map_err(|e| std::io::Error::other(e.message))?;
        self.hash.update(buf);
        self.n += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends what is written as chunks of a response body (blocking: run on a blocking thread).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 256 << 10 {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let b = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(256 << 10),
        ));
        self.tx
            .blocking_send(Ok(b))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn content_length(req: &Request<Incoming>) -> Result<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("Content-Length is required"))
}

async fn read_limited(req: Request<Incoming>, max: u64) -> Result<Bytes> {
    let mut body = req.into_body();
    let mut out = Vec::new();
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| Error::conflict(format!("upload interrupted: {e}")))?;
        if let Ok(d) = f.into_data() {
            out.extend_from_slice(&d);
            if out.len() as u64 > max {
                return Err(Error::exhausted(format!("body over the {max} byte limit")));
            }
        }
    }
    Ok(Bytes::from(out))
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(&v).unwrap_or_default();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            parse_route("/snapshots/gomod", None).unwrap(),
            Route::Snapshot("gomod".into())
        );
        assert_eq!(
            parse_route("/snapshots/ci/gomod/_missing", None).unwrap(),
            Route::Missing("ci/gomod".into())
        );
        assert_eq!(
            parse_route(&format!("/snapshots/k/_chunks/{d}"), None).unwrap(),
            Route::Chunk("k".into(), d)
        );
        assert_eq!(
            parse_route("/snapshots/k/_tar", None).unwrap(),
            Route::Tar("k".into())
        );
        assert_eq!(
            parse_route("/snapshots/", Some("prefix=go")).unwrap(),
            Route::Newest("go".into())
        );
        assert!(parse_route("/snapshots/Bad", None).is_err());
        assert!(parse_route("/snapshots/../x", None).is_err());
    }

    #[test]
    fn chunks_a_stream_and_tars_it_back() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut stored = HashMap::new();
        let (sha, size, chunks) = chunk_stream(&data[..], |raw, sha256| {
            let bytes = compress(raw)?;
            let d = Digest::sha256_of(&bytes);
            stored.insert(d.to_string(), bytes);
            Ok(Chunk {
                blob: d.to_string(),
                size: raw.len() as u64,
                sha256,
            })
        })
        .unwrap();
        assert_eq!(size, data.len() as u64);
        assert!(chunks.len() > 2, "{}", chunks.len());
        assert_eq!(sha, crate::digest::hex_encode(&Sha256::digest(&data)));
        let index = Index {
            version: 1,
            nodes: vec![Node {
                path: "f".into(),
                kind: Kind::File,
                mode: 0o644,
                mtime_ns: 0,
                size,
                sha256: Some(sha),
                chunks,
                target: None,
            }],
        };
        index.check().unwrap();
        let tar = format::write_tar(&index, Vec::new(), |c| {
            format::open_chunk(c, &stored[&c.blob])
        })
        .unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        let mut back = Vec::new();
        e.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }
}
