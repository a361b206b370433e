//! `hoard snapshot save|restore`: a directory to and from a hoard server.
//!
//! Save walks the tree (never following symlinks), chunks every file, reuses the chunks the
//! key's previous snapshot already stored, asks hoard which of the rest it lacks (another key
//! may hold them), uploads only those, then commits the index: until that last request nothing
//! of the new snapshot is visible. Restore fetches the index (the key, else the newest snapshot
//! under each restore key in turn), keeps every file already present with the same content,
//! downloads the chunks of the others, checks each against the index, writes each file beside
//! its place and renames it in, then sets modes and mtimes (directories last, deepest first, so
//! read-only module directories end read-only).

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

use super::format::{self, Chunk, Index, Kind, Node};

#[derive(Clone, Debug, clap::Subcommand)]
pub enum SnapshotCmd {
    /// Save DIR as the snapshot KEY (only what hoard lacks is uploaded).
    Save {
        #[command(flatten)]
        common: Common,
        /// The directory to save.
        dir: PathBuf,
    },
    /// Restore the snapshot KEY (or the newest under a restore key) into DIR. A miss is not an
    /// error: it says so and exits 0.
    Restore {
        #[command(flatten)]
        common: Common,
        /// Prefixes tried in order when KEY has no snapshot (newest first under each).
        #[arg(long = "restore-key")]
        restore_keys: Vec<String>,
        /// The directory to restore into (created if missing; files not in the snapshot stay).
        dir: PathBuf,
    },
}

#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// The hoard server, e.g. http://hoard:5000.
    #[arg(long, env = "HOARD_URL")]
    pub url: String,
    /// The snapshot's key, e.g. gomod-linux-amd64.
    #[arg(long)]
    pub key: String,
    /// Transfers at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// A hoard token (when the server has `[auth]`), sent as `Authorization: Bearer`.
    #[arg(long, env = "HOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone)]
struct Conn {
    http: Http,
    base: String,
    authorization: Option<http::HeaderValue>,
}

impl Conn {
    fn new(url: &str, token: Option<&str>) -> Conn {
        Conn {
            http: Client::builder(TokioExecutor::new())
                .build(crate::gomod::upstream::connector(Duration::from_secs(10))),
            base: url.trim_end_matches('/').to_owned(),
            authorization: crate::http::bearer(token),
        }
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(http::StatusCode, http::HeaderMap, Bytes)> {
        let url = format!("{}{path}", self.base);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_LENGTH, body.len());
        if let Some(a) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, a.clone());
        }
        let req = req.body(Full::new(body))?;
        let resp = tokio::time::timeout(Duration::from_secs(300), self.http.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("{url}: no answer within 300 s"))?
            .map_err(|e| anyhow::anyhow!("{url}: {}", crate::error::chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// The index of `key`, `None` on a 404.
    async fn index(&self, path: &str) -> anyhow::Result<Option<(String, Index)>> {
        let (status, headers, body) = self.call(http::Method::GET, path, Bytes::new()).await?;
        if status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            anyhow::bail!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        let key = headers
            .get(super::KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let index = Index::decode(&body).map_err(anyhow::Error::msg)?;
        index.check().map_err(anyhow::Error::msg)?;
        Ok(Some((key, index)))
    }
}

/// Progress on a terminal (one line, redrawn), nothing otherwise.
struct Progress {
    tty: bool,
    last: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    fn show(&mut self, f: impl FnOnce() -> String) {
        if self.tty && self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            eprint!("\r\x1b[2K{}", f());
            let _ = std::io::stderr().flush();
        }
    }

    fn done(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
}

pub fn run(cmd: SnapshotCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        SnapshotCmd::Save { common, dir } => save(&rt, &common, &dir),
        SnapshotCmd::Restore {
            common,
            restore_keys,
            dir,
        } => restore(&rt, &common, &restore_keys, &dir),
    }
}

/// Every node under `root`, sorted by path (symlinks not followed; sockets, FIFOs and devices
/// left out).
fn walk(root: &Path) -> anyhow::Result<Vec<(Node, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?;
        for entry in rd {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                eprintln!(
                    "hoard snapshot: skipping {} (not UTF-8)",
                    entry.path().display()
                );
                continue;
            };
            let path = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(entry.path())?;
            let ft = meta.file_type();
            let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            let mode = meta.mode() & 0o7777;
            let mut node = Node {
                path: path.clone(),
                kind: Kind::File,
                mode,
                mtime_ns,
                size: 0,
                sha256: None,
                chunks: vec![],
                target: None,
            };
            if ft.is_dir() {
                node.kind = Kind::Dir;
                stack.push((entry.path(), path));
            } else if ft.is_symlink() {
                node.kind = Kind::Symlink;
                node.target = Some(
                    std::fs::read_link(entry.path())?
                        .to_string_lossy()
                        .into_owned(),
                );
            } else if ft.is_file() {
                node.size = meta.len();
            } else {
                continue;
            }
            out.push((node, entry.path()));
        }
    }
    out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    Ok(out)
}

fn save(rt: &tokio::runtime::Runtime, c: &Common, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    format::check_key(&c.key).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let conn = Conn::new(&c.url, c.token.as_deref());
    let key_path = format!("/snapshots/{}", c.key);
    // What the key's last snapshot stored: those chunks are not compressed or offered again.
    let mut known: HashMap<String, String> = HashMap::new();
    if let Some((_, prev)) = rt.block_on(conn.index(&key_path))? {
        for n in prev.nodes {
            for ch in n.chunks {
                known.insert(ch.sha256, ch.blob);
            }
        }
    }
    let nodes = walk(dir)?;
    let total_files = nodes.iter().filter(|n| n.0.kind == Kind::File).count();
    let total_bytes: u64 = nodes.iter().map(|n| n.0.size).sum();
    let mut progress = Progress::new();
    let mut pending: Vec<(String, Bytes)> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut offered: HashSet<String> = HashSet::new();
    let (mut read, mut uploaded, mut uploaded_chunks, mut files_done) = (0u64, 0u64, 0u64, 0usize);
    let mut index = Index {
        version: 1,
        nodes: Vec::with_capacity(nodes.len()),
    };
    for (mut node, path) in nodes {
        if node.kind == Kind::File {
            let f = std::fs::File::open(&path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let (sha, size, chunks) =
                super::chunk_stream(std::io::BufReader::new(f), |data, sha256| {
                    let blob = match known.get(&sha256) {
                        Some(b) => b.clone(),
                        None => {
                            let stored = super::compress(data)?;
                            let d = crate::digest::Digest::sha256_of(&stored).to_string();
                            known.insert(sha256.clone(), d.clone());
                            if offered.insert(d.clone()) {
                                pending_bytes += stored.len();
                                pending.push((d.clone(), Bytes::from(stored)));
                            }
                            d
                        }
                    };
                    Ok(Chunk {
                        blob,
                        size: data.len() as u64,
                        sha256,
                    })
                })
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))?;
            node.size = size;
            node.sha256 = Some(sha);
            node.chunks = chunks;
            read += size;
            files_done += 1;
            if pending_bytes >= 32 << 20 || pending.len() >= 512 {
                let (n, b) = rt.block_on(upload(
                    &conn,
                    &c.key,
                    std::mem::take(&mut pending),
                    c.parallel,
                ))?;
                uploaded_chunks += n;
                uploaded += b;
                pending_bytes = 0;
            }
            progress.show(|| {
                format!(
                    "saving {}: {files_done}/{total_files} files, {} of {} read, {} uploaded",
                    c.key,
                    mib(read),
                    mib(total_bytes),
                    mib(uploaded)
                )
            });
        }
        index.nodes.push(node);
    }
    let (n, b) = rt.block_on(upload(&conn, &c.key, pending, c.parallel))?;
    uploaded_chunks += n;
    uploaded += b;
    let encoded = Bytes::from(index.encode()?);
    let (status, _, body) = rt.block_on(conn.call(http::Method::PUT, &key_path, encoded))?;
    progress.done();
    if !status.is_success() {
        anyhow::bail!(
            "hoard refused the snapshot: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let stored: u64 = index
        .nodes
        .iter()
        .flat_map(|n| n.chunks.iter())
        .map(|c| c.size)
        .sum();
    eprintln!(
        "saved {}: {} files, {}; uploaded {} in {} new chunks ({:.1}% of the bytes) in {:.1} s",
        c.key,
        index.files(),
        mib(stored),
        mib(uploaded),
        uploaded_chunks,
        if stored == 0 {
            0.0
        } else {
            uploaded as f64 * 100.0 / stored as f64
        },
        started.elapsed().as_secs_f64()
    );
    // A machine-readable line for scripts and tests.
    println!(
        "{}",
        serde_json::json!({"key": c.key, "files": index.files(), "bytes": stored, "uploaded_bytes": uploaded, "uploaded_chunks": uploaded_chunks})
    );
    Ok(())
}

/// Asks hoard which of `chunks` it lacks and uploads those; (chunks, bytes) sent.
async fn upload(
    conn: &Conn,
    key: &str,
    chunks: Vec<(String, Bytes)>,
    parallel: usize,
) -> anyhow::Result<(u64, u64)> {
    if chunks.is_empty() {
        return Ok((0, 0));
    }
    let digests: Vec<&String> = chunks.iter().map(|c| &c.0).collect();
    let body = Bytes::from(serde_json::to_vec(&digests)?);
    let (status, _, resp) = conn
        .call(
            http::Method::POST,
            &format!("/snapshots/{key}/_missing"),
            body,
        )
        .await?;
    if !status.is_success() {
        anyhow::bail!("hoard: {status}: {}", String::from_utf8_lossy(&resp).trim());
    }
    let missing: HashSet<String> = serde_json::from_slice(&resp)?;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let (mut n, mut bytes) = (0u64, 0u64);
    for (d, data) in chunks {
        if !missing.contains(&d) {
            continue;
        }
        n += 1;
        bytes += data.len() as u64;
        let permit = sem.clone().acquire_owned().await?;
        let path = format!("/snapshots/{key}/_chunks/{d}");
        let c = conn.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let (status, _, body) = c.call(http::Method::PUT, &path, data).await?;
            if !status.is_success() {
                anyhow::bail!(
                    "uploading {path}: {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((n, bytes))
}

/// `path` inside `root` with no symlink among its parents (a restore never writes through one).
fn safe_parent(root: &Path, rel: &str) -> anyhow::Result<()> {
    let mut p = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        p.push(part);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                anyhow::bail!("refusing to write {rel}: {} is a symlink", p.display())
            }
            _ => {}
        }
    }
    Ok(())
}

fn set_mtime(path: &Path, ns: i64) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
    let t = Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(std::io::Error::from)
}

/// The file at `path` has exactly this content.
fn same_file(path: &Path, n: &Node) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.len() != n.size {
        return false;
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut h = Sha256::new();
    if std::io::copy(&mut f, &mut h).is_err() {
        return false;
    }
    n.sha256.as_deref() == Some(crate::digest::hex_encode(&h.finalize()).as_str())
}

/// Makes room for a node at `path`: removes what is there unless it is a directory and a
/// directory is wanted.
fn clear(path: &Path, want_dir: bool) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() && want_dir => {
            // Writable while restoring; its own mode comes back at the end.
            let mode = m.mode() & 0o7777;
            if mode & 0o700 != 0o700 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o700))?;
            }
            Ok(())
        }
        Ok(m) if m.is_dir() => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
        Ok(_) => std::fs::remove_file(path),
    }
}

/// Read-only directories (a module cache) cannot be removed until they are writable.
fn make_writable(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}

fn restore(
    rt: &tokio::runtime::Runtime,
    c: &Common,
    restore_keys: &[String],
    dir: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    format::check_key(&c.key).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let conn = Conn::new(&c.url, c.token.as_deref());
    let mut found = rt.block_on(conn.index(&format!("/snapshots/{}", c.key)))?;
    if found.is_none() {
        for p in restore_keys {
            let q = format!("/snapshots/?prefix={}", crate::digest::truncate(p, 256));
            if let Some(f) = rt.block_on(conn.index(&q))? {
                found = Some(f);
                break;
            }
        }
    }
    let Some((key, index)) = found else {
        eprintln!(
            "miss: no snapshot for key {}{}; {} left as it was",
            c.key,
            if restore_keys.is_empty() {
                String::new()
            } else {
                format!(" or restore keys {}", restore_keys.join(", "))
            },
            dir.display()
        );
        return Ok(());
    };
    let key = if key.is_empty() { c.key.clone() } else { key };
    std::fs::create_dir_all(dir)?;
    clear(dir, true)?;
    let mut fetch: Vec<&Node> = Vec::new();
    let mut kept = 0usize;
    for n in &index.nodes {
        safe_parent(dir, &n.path)?;
        let path = dir.join(&n.path);
        match n.kind {
            Kind::Dir => {
                clear(&path, true)?;
                if !path.is_dir() {
                    std::fs::create_dir(&path)?;
                }
            }
            Kind::Symlink => {
                let target = n.target.as_deref().unwrap_or_default();
                let same = std::fs::read_link(&path).is_ok_and(|t| t == Path::new(target));
                if !same {
                    clear(&path, false)?;
                    std::os::unix::fs::symlink(target, &path)?;
                }
                let _ = set_mtime(&path, n.mtime_ns);
            }
            Kind::File => {
                if same_file(&path, n) {
                    kept += 1;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(n.mode))?;
                    set_mtime(&path, n.mtime_ns)?;
                } else {
                    fetch.push(n);
                }
            }
        }
    }
    let total: u64 = fetch
        .iter()
        .map(|n| n.chunks.iter().map(|c| c.size).sum::<u64>())
        .sum();
    let downloaded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done_files = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut progress = Progress::new();
    rt.block_on(async {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(c.parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, n) in fetch.iter().enumerate() {
            let permit = sem.clone().acquire_owned().await?;
            let (node, conn) = ((*n).clone(), conn.clone());
            let (path, tmp) = (
                dir.join(&n.path),
                dir.join(format!("{}.hoard-restore-{i}", n.path)),
            );
            let (key_t, downloaded_t, done_t) =
                (key.clone(), downloaded.clone(), done_files.clone());
            tasks.spawn(async move {
                let (key, downloaded, done_files) = (key_t, downloaded_t, done_t);
                let _permit = permit;
                let mut data = Vec::with_capacity(node.size as usize);
                for ch in &node.chunks {
                    let p = format!("/snapshots/{key}/_chunks/{}", ch.blob);
                    let (status, _, body) = conn.call(http::Method::GET, &p, Bytes::new()).await?;
                    if !status.is_success() {
                        anyhow::bail!("GET {p}: {status}");
                    }
                    downloaded.fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    data.extend_from_slice(&format::open_chunk(ch, &body)?);
                }
                let whole = crate::digest::hex_encode(&Sha256::digest(&data));
                if node.sha256.as_deref() != Some(whole.as_str()) {
                    anyhow::bail!("{}: restored bytes do not match the snapshot", node.path);
                }
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    std::fs::write(&tmp, &data)?;
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(node.mode))?;
                    set_mtime(&tmp, node.mtime_ns)?;
                    if let Err(e) = clear(&path, false).and_then(|()| std::fs::rename(&tmp, &path))
                    {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e.into());
                    }
                    Ok(())
                })
                .await??;
                done_files.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            });
            while let Some(r) = tasks.try_join_next() {
                r??;
            }
            progress.show(|| {
                format!(
                    "restoring {key}: {}/{} files, {} downloaded",
                    done_files.load(std::sync::atomic::Ordering::Relaxed),
                    fetch.len(),
                    mib(downloaded.load(std::sync::atomic::Ordering::Relaxed))
                )
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    // Directories last, deepest first: their mtimes after their contents changed, and a
    // read-only one only once nothing more is written inside it.
    for n in index.nodes.iter().rev().filter(|n| n.kind == Kind::Dir) {
        let path = dir.join(&n.path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(n.mode))?;
        set_mtime(&path, n.mtime_ns)?;
    }
    progress.done();
    eprintln!(
        "restored {key}{}: {} files ({} already here); downloaded {} for {} in {:.1} s",
        if key != c.key {
            format!(" (for {})", c.key)
        } else {
            String::new()
        },
        index.files(),
        kept,
        mib(downloaded.load(std::sync::atomic::Ordering::Relaxed)),
        mib(total),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({"key": key, "files": index.files(), "kept": kept, "downloaded_bytes": downloaded.load(std::sync::atomic::Ordering::Relaxed)})
    );
    Ok(())
}
