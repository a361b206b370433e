//! Shared by the black-box tests: start the real `hoard` binary on port 0 with a temporary data
//! directory, and talk to it with a small HTTP/1.1 client over real sockets (small enough to
//! also send what well-behaved clients never do: cut bodies, TLS bytes, lying headers).

#![allow(dead_code)]

pub mod goproxy;
pub mod proxy;
pub mod s3;
pub use s3::{on_disk, store_kind, StoreKind};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Hoard {
    pub addr: SocketAddr,
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Hoard {
    /// Starts hoard on a fresh temporary data directory.
    pub fn start(extra: &[&str]) -> Hoard {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut h = Hoard::start_on(&data, extra);
        h._tmp = Some(tmp);
        h
    }

    /// Starts hoard on `data` (kept by the caller, for restart tests).
    pub fn start_on(data: &Path, extra: &[&str]) -> Hoard {
        Hoard::start_via(&[], data, extra)
    }

    /// Starts hoard through a wrapper command (e.g. `setpriv --reuid …` to run it as another
    /// user).
    pub fn start_via(wrapper: &[&str], data: &Path, extra: &[&str]) -> Hoard {
        let env = suite_store_env(data, extra);
        Hoard::start_full(wrapper, data, extra, &env)
    }

    /// Starts hoard on `data` on the suite's store, with these variables added.
    pub fn start_suite_env(data: &Path, extra: &[&str], env: &[(String, String)]) -> Hoard {
        let mut all = suite_store_env(data, extra);
        all.extend(env.iter().cloned());
        Hoard::start_full(&[], data, extra, &all)
    }

    /// Starts hoard on `data` with this environment (a store of the test's own choosing).
    pub fn start_env(data: &Path, extra: &[&str], env: &[(String, String)]) -> Hoard {
        Hoard::start_full(&[], data, extra, env)
    }

    fn start_full(
        wrapper: &[&str],
        data: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Hoard {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_hoard"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_hoard")),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HOARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting the hoard binary");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    {
                        let mut l = log.lock().unwrap();
                        l.push_str(&line);
                        l.push('\n');
                    }
                    let found = line
                        .find("listening on http://")
                        .map(|i| i + 20)
                        .or_else(|| line.find("listening on https://").map(|i| i + 21));
                    if let Some(i) = found {
                        let addr: String = line[i..]
                            .chars()
                            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                            .collect();
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr);
                        }
                    }
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("hoard did not start; log:\n{}", log.lock().unwrap());
            }
        };
        Hoard {
            addr,
            child,
            log,
            data: data.to_path_buf(),
            _tmp: None,
        }
    }

    /// Blobs the store holds: files on disk, objects in the bucket.
    pub fn stored_blobs(&self) -> usize {
        // (The suite's store; tests of their own S3 server count in their bucket.)
        match store_kind() {
            StoreKind::Disk => count_files(&self.data.join("blobs")),
            _ => s3::shared()
                .list(&s3::bucket_for(&self.data), "hoard/blobs/")
                .len(),
        }
    }

    /// What uploads in progress (or abandoned) hold: files in tmp/ (the disk tier's too) and,
    /// on S3, temporary objects and open multipart uploads.
    pub fn leftover_uploads(&self) -> usize {
        leftover_uploads(&self.data)
    }

    /// A number the status page shows after `key: ` (0 when it shows none).
    pub fn status_number(&self, key: &str) -> u64 {
        let page = status_page(self);
        page.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// S3 requests sent so far on clients' behalf: requests on blobs, uploads, tags, manifest
    /// records, links, catalog entries and claims, except listings (of objects or of multipart
    /// uploads: the hourly sweep of abandoned uploads lists both; the background's
    /// heartbeats, lease renewals, announcements, access records and re-listings are left out,
    /// so a count taken around a client's request is that request's alone).
    pub fn s3_requests(&self) -> u64 {
        const CLIENT: [&str; 7] = [
            "blob", "upload", "tag", "record", "link", "catalog", "claim",
        ];
        let page = status_page(self);
        page.lines()
            .filter_map(|l| l.strip_prefix("s3 kind "))
            .filter_map(|l| {
                let (what, n) = l.split_once(": ")?;
                let (op, kind) = what.split_once(' ')?;
                (!op.starts_with("List") && CLIENT.contains(&kind))
                    .then(|| n.trim().parse::<u64>().ok())?
            })
            .sum()
    }

    /// `s3_requests` once it held still for 300 ms: what a push left to do in the background
    /// (its access record, a link) is done before a measured step starts.
    pub fn s3_settled(&self) -> u64 {
        let mut last = self.s3_requests();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.s3_requests();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    /// S3 requests of one operation on one kind of object (`"GetObject"`, `"tag"`).
    pub fn s3_kind(&self, op: &str, kind: &str) -> u64 {
        self.status_number(&format!("s3 kind {op} {kind}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A line of the daemon's /proc status ("VmRSS", "Threads"), as its first number.
    pub fn proc_status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("reading the daemon's /proc status");
        s.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc status"))
    }

    /// How many of the daemon's threads carry this name.
    pub fn threads_named(&self, name: &str) -> usize {
        thread_names(self).iter().filter(|n| *n == name).count()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        wait_timeout(&mut self.child, Duration::from_secs(30))
            .expect("hoard did not stop on SIGTERM")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A request helper usable from other threads (only the address is needed).
    pub fn req_at(addr: SocketAddr) -> impl Fn(&str, &str, &[(&str, &str)], Vec<u8>) -> Resp {
        let f = Hoard::try_req_at(addr);
        move |method, path, headers, body| f(method, path, headers, body).expect("request failed")
    }

    /// Like `req_at`, returning an error when the daemon is gone.
    #[allow(clippy::type_complexity)]
    pub fn try_req_at(
        addr: SocketAddr,
    ) -> impl Fn(&str, &str, &[(&str, &str)], Vec<u8>) -> std::io::Result<Resp> {
        move |method, path, headers, body| {
            let mut r = Req {
                addr,
                method: method.into(),
                path: path.into(),
                headers: Vec::new(),
                body,
            };
            for (k, v) in headers {
                r = r.header(k, v);
            }
            r.try_send()
        }
    }

    pub fn req(&self, method: &str, path: &str) -> Req {
        Req {
            addr: self.addr,
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
}

impl Drop for Hoard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what the daemon said last.
            let log = self.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("hoard::access"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- the last lines hoard logged (requests left out):\n{}",
                tail.join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + t;
    while Instant::now() < end {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub struct Req {
    addr: SocketAddr,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The first OCI error code in the body.
    pub fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Req {
    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Req {
        self.body = b.into();
        self
    }

    fn head_bytes(&self, content_length: Option<usize>) -> Vec<u8> {
        let mut s = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            self.method, self.path, self.addr
        );
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(n) = content_length {
            s.push_str(&format!("Content-Length: {n}\r\n"));
        }
        s.push_str("Connection: close\r\n\r\n");
        s.into_bytes()
    }

    pub fn send(self) -> Resp {
        self.try_send().expect("request failed")
    }

    /// Like `send`, but a refused connection or one cut before a response (a killed daemon)
    /// is an error instead of a panic.
    pub fn try_send(self) -> std::io::Result<Resp> {
        let mut stream = TcpStream::connect(self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let has_len = self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        let bodiless =
            self.body.is_empty() && matches!(self.method.as_str(), "GET" | "HEAD" | "DELETE");
        let len = (!has_len && !bodiless).then_some(self.body.len());
        stream.write_all(&self.head_bytes(len))?;
        // A server may answer (413, 507) before reading the whole body and close: write the
        // body from another thread while this one reads the answer, as real clients do.
        let mut w = stream.try_clone()?;
        let body = self.body;
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&body);
        });
        let resp = try_read_response(&mut stream, self.method == "HEAD");
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = writer.join();
        resp
    }

    /// Announces `announced` bytes, sends only the body given, then closes the connection.
    pub fn send_cut(self, announced: usize) {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream.write_all(&self.head_bytes(Some(announced))).unwrap();
        stream.write_all(&self.body).unwrap();
        stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(stream);
    }
}

pub fn read_response(stream: &mut impl Read, is_head: bool) -> Resp {
    try_read_response(stream, is_head).expect("reading the response")
}

pub fn try_read_response(stream: &mut impl Read, is_head: bool) -> std::io::Result<Resp> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header {h:?}")))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if is_head {
        return Ok(resp);
    }
    if let Some(n) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; n];
        r.read_exact(&mut body)?;
        resp.body = body;
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

pub fn sha256(data: &[u8]) -> String {
    hoard::digest::Digest::sha256_of(data).to_string()
}

pub fn sha512(data: &[u8]) -> String {
    hoard::digest::Digest::of(hoard::digest::Algorithm::Sha512, data).to_string()
}

/// Deterministic pseudo-random bytes (so blobs are distinct and incompressible).
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Starts an upload session in `repo`; its location.
pub fn start_upload(h: &Hoard, repo: &str) -> String {
    let r = h.req("POST", &format!("/v2/{repo}/blobs/uploads/")).send();
    assert_eq!(r.status, 202, "{}", r.text());
    r.header("location").expect("location").to_owned()
}

/// Pushes a blob with POST + PUT (what BuildKit does) and asserts 201.
pub fn push_blob(h: &Hoard, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let r = h.req("POST", &format!("/v2/{repo}/blobs/uploads/")).send();
    assert_eq!(r.status, 202, "{}", r.text());
    let loc = r.header("location").unwrap().to_owned();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = h
        .req("PUT", &format!("{loc}{sep}digest={d}"))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    d
}

pub fn put_manifest(h: &Hoard, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Resp {
    h.req("PUT", &format!("/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", media_type)
        .body(body.to_vec())
        .send()
}

/// Files under `dir` (recursively).
pub fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Fails with an install hint when a peer tool is missing: a missing peer is a failure, never a skip.
pub fn require_tool(tool: &str, hint: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{tool}` is not installed; {hint} (the README's test command installs it)");
}

pub fn image_manifest(config: (&str, usize, &str), layers: &[(String, usize)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, n)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": config.2, "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .unwrap()
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub const CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";

/// A BuildKit-style cache image: a shared base layer, unique layers, a cache config.
pub struct Image {
    pub tag: String,
    pub manifest: String,
    pub blobs: Vec<String>,
}

pub fn push_image(
    h: &Hoard,
    repo: &str,
    tag: &str,
    base: Option<&[u8]>,
    unique: &[Vec<u8>],
) -> Image {
    let mut layers = Vec::new();
    let mut blobs = Vec::new();
    if let Some(b) = base {
        layers.push((push_blob(h, repo, b), b.len()));
    }
    for u in unique {
        layers.push((push_blob(h, repo, u), u.len()));
    }
    let config = format!("{{\"layers\":{},\"tag\":\"{tag}\"}}", layers.len());
    let cd = push_blob(h, repo, config.as_bytes());
    let body = image_manifest((&cd, config.len(), CACHE_CONFIG), &layers);
    let r = put_manifest(h, repo, tag, OCI_MANIFEST, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    blobs.push(cd);
    blobs.extend(layers.into_iter().map(|(d, _)| d));
    Image {
        tag: tag.into(),
        manifest: sha256(&body),
        blobs,
    }
}

/// Pulls a tag completely, checking every digest; false if the tag is gone.
pub fn pull(h: &Hoard, repo: &str, tag: &str) -> bool {
    let r = h
        .req("GET", &format!("/v2/{repo}/manifests/{tag}"))
        .header("Accept", OCI_MANIFEST)
        .send();
    if r.status == 404 {
        return false;
    }
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
    for l in m["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_owned());
    }
    for d in digests {
        let b = h.req("GET", &format!("/v2/{repo}/blobs/{d}")).send();
        assert_eq!(
            b.status, 200,
            "{repo}:{tag} lists {d}, which does not pull (invariant 1)"
        );
        assert_eq!(sha256(&b.body), d);
    }
    true
}

pub fn blob_status(h: &Hoard, repo: &str, d: &str) -> u16 {
    // GET (a pull claims nothing; a HEAD would restart the blob's orphan grace).
    h.req("GET", &format!("/v2/{repo}/blobs/{d}"))
        .header("Range", "bytes=0-0")
        .send()
        .status
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn status_page(h: &Hoard) -> String {
    h.req("GET", "/").send().text()
}

pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

fn is_manifest_type(mt: &str) -> bool {
    MANIFEST_TYPES.split(',').any(|t| t.trim() == mt)
}

/// Pulls `reference` of `repo` the way a client does: the manifest, then (recursively) every
/// child manifest and every blob it lists, each checked against its digest.
pub fn pull_all(h: &Hoard, repo: &str, reference: &str, after: &str) {
    let r = h
        .req("GET", &format!("/v2/{repo}/manifests/{reference}"))
        .header("Accept", MANIFEST_TYPES)
        .send();
    assert_eq!(
        r.status,
        200,
        "after {after}: {repo}:{reference} does not pull: {}",
        r.text()
    );
    let m = r.json();
    let mut blobs = Vec::new();
    if let Some(c) = m.get("config") {
        blobs.push(c.clone());
    }
    for key in ["layers", "blobs"] {
        blobs.extend(m[key].as_array().into_iter().flatten().cloned());
    }
    for child in m["manifests"].as_array().into_iter().flatten() {
        let d = child["digest"].as_str().unwrap_or_default();
        if child["mediaType"].as_str().is_some_and(is_manifest_type) {
            pull_all(h, repo, d, after);
        } else {
            // A BuildKit cache index lists its layers and cache config here.
            blobs.push(child.clone());
        }
    }
    for b in blobs {
        if b["urls"].as_array().is_some_and(|u| !u.is_empty()) {
            continue;
        }
        let d = b["digest"].as_str().unwrap_or_default();
        let got = h.req("GET", &format!("/v2/{repo}/blobs/{d}")).send();
        assert_eq!(
            got.status, 200,
            "after {after}: {repo}:{reference} lists {d}, which does not pull (invariant 1)"
        );
        let actual = if d.starts_with("sha512:") {
            sha512(&got.body)
        } else {
            sha256(&got.body)
        };
        assert_eq!(
            actual, d,
            "after {after}: {repo} serves wrong bytes for {d}"
        );
    }
}

/// Invariant 1 as clients see it: every tag of every repository pulls completely, and the
/// daemon's own verification (which also checks what no tag reaches) finds nothing dangling.
/// Returns how many tags were pulled.
pub fn assert_invariant_1(h: &Hoard, after: &str) -> usize {
    let cat = h.req("GET", "/v2/_catalog").send();
    assert_eq!(cat.status, 200, "{}", cat.text());
    let mut tags = 0;
    for repo in cat.json()["repositories"].as_array().into_iter().flatten() {
        let repo = repo.as_str().unwrap_or_default();
        let list = h.req("GET", &format!("/v2/{repo}/tags/list")).send();
        assert_eq!(list.status, 200, "after {after}: {repo}: {}", list.text());
        for t in list.json()["tags"].as_array().into_iter().flatten() {
            pull_all(h, repo, t.as_str().unwrap_or_default(), after);
            tags += 1;
        }
    }
    let v = h.req("POST", "/admin/verify").send();
    assert_eq!(v.status, 200, "after {after}: verify: {}", v.text());
    assert!(
        v.text().contains(" 0 dangling"),
        "after {after}: {}",
        v.text()
    );
    tags
}

/// Runs a hoard tool subcommand (gc, verify…) to completion.
pub fn hoard_cmd(args: &[&str]) -> std::process::Output {
    // A tool pointed at a data directory gets that directory's store, as the daemon did.
    let store = args
        .iter()
        .position(|a| *a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(|d| suite_store_env(Path::new(d), args))
        .unwrap_or_default();
    Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args(args)
        .envs(store)
        .env("HOARD_LOG", "warn")
        .output()
        .expect("running hoard")
}

/// Names of the daemon's threads (as the kernel keeps them: at most 15 bytes).
pub fn thread_names(h: &Hoard) -> Vec<String> {
    let pid = h.child.id();
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("reading the daemon's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// What puts a daemon on the suite's store: nothing for disk; for S3 and tiered, the shared S3
/// server and this data directory's bucket (created here). A test that names its own store
/// (`--config`, `HOARD_STORE_*` of its own) is left alone.
fn suite_store_env(data: &Path, extra: &[&str]) -> Vec<(String, String)> {
    let kind = store_kind();
    if kind == StoreKind::Disk || extra.contains(&"--config") {
        return Vec::new();
    }
    let server = s3::shared();
    let bucket = s3::bucket_for(data);
    server.create_bucket(&bucket);
    s3::store_env(kind, server, &bucket)
}

/// For a test of the disk store's own files (torn writes, fsync, O_DIRECT): on another store
/// it says so and returns true, and the test ends there (it ran in the disk pass).
pub fn disk_store_only(what: &str) -> bool {
    if on_disk() {
        return false;
    }
    eprintln!("{what}: a test of the disk store's files; it runs in the disk pass");
    true
}

/// `Hoard::leftover_uploads` for a data directory.
pub fn leftover_uploads(data: &Path) -> usize {
    let local = count_files(&data.join("tmp")) + count_files(&data.join("fast/tmp"));
    if on_disk() {
        return local;
    }
    let server = s3::shared();
    let bucket = s3::bucket_for(data);
    local + server.list(&bucket, "hoard/uploads/").len() + server.multipart_uploads(&bucket)
}

/// Overwrites a stored blob's bytes behind hoard's back (bit rot, a torn write): its file on
/// disk (the disk tier's too) and, on S3, its object.
pub fn corrupt_blob(data: &Path, hex: &str, with: &[u8]) {
    let mut done = false;
    for root in [data.to_path_buf(), data.join("fast")] {
        let path = root.join("blobs/sha256").join(&hex[..2]).join(hex);
        if path.is_file() {
            std::fs::write(&path, with).unwrap();
            done = true;
        }
    }
    if !on_disk() {
        let key = format!("hoard/blobs/sha256/{}/{hex}", &hex[..2]);
        s3::shared().put_signed(&s3::bucket_for(data), &key, with);
        done = true;
    }
    assert!(done, "blob {hex} is not stored under {}", data.display());
}

/// Whether the store set blob `hex` aside as corrupt (a file on disk, an object in S3).
pub fn is_quarantined(data: &Path, hex: &str) -> bool {
    if on_disk() {
        return data
            .join("quarantine")
            .join(format!("sha256-{hex}"))
            .exists();
    }
    let key = format!("hoard/quarantine/sha256-{hex}");
    s3::shared()
        .list(&s3::bucket_for(data), &key)
        .iter()
        .any(|(k, _)| *k == key)
}

/// Runs a command that must succeed; its output.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// An OCI image layout with one gzip layer, written by hand.
pub fn make_oci_layout(dir: &Path) -> (String, Vec<u8>) {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("hello.txt"), bytes(77, 200_000)).unwrap();
    let tgz = dir.join("layer.tgz");
    run_ok(
        Command::new("tar")
            .arg("czf")
            .arg(&tgz)
            .arg("-C")
            .arg(&ctx)
            .arg("hello.txt"),
    );
    let layer = std::fs::read(&tgz).unwrap();
    let blobs = dir.join("layout/blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha256(data);
        std::fs::write(blobs.join(d.strip_prefix("sha256:").unwrap()), data).unwrap();
        d
    };
    let dl = put(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(&std::fs::read(ctx.join("hello.txt")).map(|_| {
            let out = Command::new("gzip").arg("-dc").arg(&tgz).output().unwrap();
            out.stdout
        }).unwrap())]},
        "config": {}
    }))
    .unwrap();
    let dc = put(&config);
    let manifest = image_manifest(
        (
            &dc,
            config.len(),
            "application/vnd.oci.image.config.v1+json",
        ),
        &[(dl, layer.len())],
    );
    let dm = put(&manifest);
    std::fs::write(
        dir.join("layout/oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": dm, "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "v1"}}]
    });
    std::fs::write(dir.join("layout/index.json"), index.to_string()).unwrap();
    (dm, manifest)
}

/// A certificate for 127.0.0.1 and localhost signed by a CA of its own, made with openssl:
/// (the CA's certificate, the server's certificate, its key).
pub fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = require_tool("openssl", "install it with `apt-get install openssl`");
    let p = |ext: &str| dir.join(format!("{name}.{ext}"));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_ok(
        Command::new(&openssl)
            .args([
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} CA"),
            ])
            .args(ec)
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.crt")),
    );
    run_ok(
        Command::new(&openssl)
            .args(["req", "-new", "-subj", &format!("/CN={name}")])
            .args(ec)
            .arg("-keyout")
            .arg(p("key"))
            .arg("-out")
            .arg(p("csr")),
    );
    std::fs::write(
        p("ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(
        Command::new(&openssl)
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(p("csr"))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext"))
            .arg("-out")
            .arg(p("crt")),
    );
    (p("ca.crt"), p("crt"), p("key"))
}

/// A private containerd (its own root, state and socket; no CRI), killed when dropped.
pub struct Containerd {
    child: Child,
    pub sock: PathBuf,
    ctr: PathBuf,
}

impl Containerd {
    pub fn start(d: &Path) -> Containerd {
        let containerd = require_tool("containerd", "install it with `apt-get install containerd`");
        let ctr = require_tool("ctr", "install it with `apt-get install containerd`");
        std::fs::create_dir_all(d).unwrap();
        let sock = d.join("c.sock");
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.devmapper\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = sock.display()
            ),
        )
        .unwrap();
        let child = Command::new(&containerd)
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Containerd { child, sock, ctr }
    }

    /// `ctr` on this containerd, in namespace hoardtest.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("--address")
            .arg(&self.sock)
            .args(["--namespace", "hoardtest"]);
        c
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
