//! A bounded load test on loopback: 64 clients at once mixing blob pushes, HEADs and pulls,
//! manifest puts, GOPROXY downloads and GOCACHEPROG puts and gets, against a hoard whose size
//! bound keeps eviction running the whole time. Zero errors, memory growth under a stated
//! bound, and p50/p99 latencies per kind of request printed.
//!
//! The short form runs in the test command (`HOARD_SOAK_SECS`, default 20 s). The long form:
//!   HOARD_SOAK_SECS=600 cargo test --release --test soak -- --nocapture

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use common::goproxy::{write_module, Upstream};
use common::*;

const CLIENTS: usize = 64;
/// What RSS may grow by between the end of the warm-up (a quarter of the run) and the end.
const RSS_GROWTH_BOUND_KB: u64 = 64 * 1024;
const MODULES: usize = 12;
const VERSIONS: usize = 3;

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

struct Shared {
    base: String,
    http: Http,
    /// Blobs pushed lately: (repository, digest).
    recent: Mutex<VecDeque<(String, String)>>,
    /// Latencies in microseconds, by kind of request.
    lat: Mutex<BTreeMap<&'static str, Vec<u32>>>,
    /// Answers by (kind, status).
    statuses: Mutex<BTreeMap<(&'static str, u16), u64>>,
    errors: Mutex<Vec<String>>,
    ops: AtomicU64,
}

impl Shared {
    async fn call(
        &self,
        kind: &'static str,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Option<(u16, http::HeaderMap, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).unwrap();
        let t0 = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(60), async {
            let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let b = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, String>((parts.status.as_u16(), parts.headers, b))
        })
        .await;
        let took = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
        self.ops.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok(Ok(r)) => {
                self.lat.lock().unwrap().entry(kind).or_default().push(took);
                *self
                    .statuses
                    .lock()
                    .unwrap()
                    .entry((kind, r.0))
                    .or_default() += 1;
                if r.0 >= 500 {
                    self.error(format!(
                        "{kind} {path}: {} {}",
                        r.0,
                        String::from_utf8_lossy(&r.2)
                    ));
                }
                Some(r)
            }
            Ok(Err(e)) => {
                self.error(format!("{kind} {path}: {e}"));
                None
            }
            Err(_) => {
                self.error(format!("{kind} {path}: no answer in 60 s"));
                None
            }
        }
    }

    fn error(&self, e: String) {
        let mut errs = self.errors.lock().unwrap();
        if errs.len() < 50 {
            errs.push(e);
        }
    }

    fn expect(&self, what: &str, status: u16, allowed: &[u16]) {
        if !allowed.contains(&status) {
            self.error(format!("{what}: {status}, expected one of {allowed:?}"));
        }
    }

    fn pick(&self, seed: u64) -> Option<(String, String)> {
        let r = self.recent.lock().unwrap();
        if r.is_empty() {
            return None;
        }
        r.get((seed as usize) % r.len()).cloned()
    }
}

fn digest_hex(data: &[u8]) -> String {
    sha256(data).trim_start_matches("sha256:").to_owned()
}

async fn push_blob(s: &Shared, repo: &str, data: Bytes) -> Option<String> {
    let d = sha256(&data);
    let (st, _, _) = s
        .call(
            "push",
            http::Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            &[("content-type", "application/octet-stream")],
            data,
        )
        .await?;
    s.expect("push", st, &[201]);
    (st == 201).then_some(d)
}

async fn client(s: Arc<Shared>, n: usize, until: Instant) {
    let mut i: u64 = 0;
    let repo = format!("soak/r{}", n % 8);
    while Instant::now() < until {
        i += 1;
        let seed = (n as u64) * 1_000_003 + i;
        match i % 10 {
            // An export, as BuildKit's: layers, a config, then the manifest naming them.
            0..=3 => {
                let mut layers = Vec::new();
                for l in 0..(1 + seed % 3) {
                    let size = 1024 + ((seed + l) as usize * 7919) % (96 * 1024);
                    let data = Bytes::from(bytes(seed * 4 + l, size));
                    if let Some(d) = push_blob(&s, &repo, data).await {
                        layers.push((d, size));
                    }
                }
                if layers.is_empty() {
                    continue;
                }
                let config = format!("{{\"client\":{n},\"i\":{i}}}");
                let Some(cd) = push_blob(&s, &repo, Bytes::from(config.clone())).await else {
                    continue;
                };
                let body = image_manifest((&cd, config.len(), CACHE_CONFIG), &layers);
                let tag = format!("c{n}-{}", i % 16);
                if let Some((st, _, b)) = s
                    .call(
                        "manifest put",
                        http::Method::PUT,
                        &format!("/v2/{repo}/manifests/{tag}"),
                        &[("content-type", OCI_MANIFEST)],
                        Bytes::from(body),
                    )
                    .await
                {
                    if st != 201 {
                        s.error(format!(
                            "manifest put {repo}:{tag}: {st} {}",
                            String::from_utf8_lossy(&b)
                        ));
                    }
                }
                let mut r = s.recent.lock().unwrap();
                for (d, _) in layers {
                    r.push_back((repo.clone(), d));
                }
                while r.len() > 512 {
                    r.pop_front();
                }
            }
            4 | 5 => {
                let Some((r, d)) = s.pick(seed) else { continue };
                if let Some((st, _, _)) = s
                    .call(
                        "head",
                        http::Method::HEAD,
                        &format!("/v2/{r}/blobs/{d}"),
                        &[],
                        Bytes::new(),
                    )
                    .await
                {
                    s.expect("head", st, &[200, 404]);
                }
            }
            6 | 7 => {
                let Some((r, d)) = s.pick(seed) else { continue };
                if let Some((st, _, b)) = s
                    .call(
                        "pull",
                        http::Method::GET,
                        &format!("/v2/{r}/blobs/{d}"),
                        &[],
                        Bytes::new(),
                    )
                    .await
                {
                    s.expect("pull", st, &[200, 404]);
                    if st == 200 && sha256(&b) != d {
                        s.error(format!("pull {r}@{d}: the bytes hash to {}", sha256(&b)));
                    }
                }
            }
            8 => {
                let m = seed as usize % MODULES;
                let v = (seed as usize / MODULES) % VERSIONS;
                let ext = ["mod", "info", "zip"][(seed as usize / 7) % 3];
                let path = format!("/gomod/example.com/soak/m{m}/@v/v1.0.{v}.{ext}");
                if let Some((st, _, b)) = s
                    .call("gomod", http::Method::GET, &path, &[], Bytes::new())
                    .await
                {
                    s.expect(&path, st, &[200]);
                    if st == 200 && b.is_empty() {
                        s.error(format!("{path}: empty"));
                    }
                }
            }
            _ => {
                let action = digest_hex(format!("action {n} {}", i % 64).as_bytes());
                let output = Bytes::from(bytes(seed ^ 0x5a5a, 512 + (seed as usize % (32 * 1024))));
                let o = digest_hex(&output);
                if let Some((st, _, _)) = s
                    .call(
                        "gocache put",
                        http::Method::PUT,
                        &format!("/gocache/soak/action/{action}?output={o}"),
                        &[],
                        output.clone(),
                    )
                    .await
                {
                    s.expect("gocache put", st, &[200, 201, 204]);
                }
                if let Some((st, h, b)) = s
                    .call(
                        "gocache get",
                        http::Method::GET,
                        &format!("/gocache/soak/action/{action}"),
                        &[],
                        Bytes::new(),
                    )
                    .await
                {
                    s.expect("gocache get", st, &[200, 404]);
                    // Another put of the same action may have landed in between; the bytes
                    // must match the output id the answer names.
                    if st == 200 {
                        let named = h
                            .get("go-output-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if digest_hex(&b) != named {
                            s.error(format!(
                                "gocache get {action}: bytes do not hash to {named}"
                            ));
                        }
                    }
                }
            }
        }
    }
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

#[test]
fn sixty_four_clients_mixing_every_front_end_with_eviction_running() {
    let secs: u64 = std::env::var("HOARD_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("upstream");
    for m in 0..MODULES {
        for v in 0..VERSIONS {
            let path = format!("example.com/soak/m{m}");
            let gomod = format!("module {path}\n\ngo 1.22\n");
            let src = format!(
                "package m{m}\n\nconst V = {v}\n// {}\n",
                "x".repeat(2000 * (v + 1))
            );
            write_module(
                &root,
                &path,
                &format!("v1.0.{v}"),
                &[("go.mod", &gomod), ("m.go", &src)],
            );
        }
    }
    let up = Upstream::start(&root);
    let config = tmp.path().join("hoard.toml");
    std::fs::write(
        &config,
        format!(
            "max_size = \"48MiB\"\norphan_grace = \"15s\"\naccess_log = false\n\n[gomod]\nupstreams = [\"{}\"]\nsumdb = \"off\"\n",
            up.url()
        ),
    )
    .unwrap();
    let h = Hoard::start(&["--config", config.to_str().unwrap()]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = Arc::new(Shared {
        base: h.url(""),
        http: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(CLIENTS)
            .build_http(),
        recent: Mutex::new(VecDeque::new()),
        lat: Mutex::new(BTreeMap::new()),
        statuses: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(Vec::new()),
        ops: AtomicU64::new(0),
    });
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let warm = started + Duration::from_secs(secs / 4);
    let (mut rss_warm, mut rss_max) = (0u64, 0u64);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..CLIENTS {
            tasks.push(tokio::spawn(client(s.clone(), n, until)));
        }
        let mut next_print = started + Duration::from_secs(30);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss = h.proc_status("VmRSS");
            if secs >= 60 && Instant::now() >= next_print {
                next_print += Duration::from_secs(30);
                println!(
                    "  {:>4} s: {} requests, RSS {} MiB",
                    started.elapsed().as_secs(),
                    s.ops.load(Ordering::Relaxed),
                    rss / 1024
                );
            }
            rss_max = rss_max.max(rss);
            if Instant::now() >= warm && rss_warm == 0 {
                rss_warm = rss;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let rss_end = h.proc_status("VmRSS");
    let metrics = h.req("GET", "/metrics").send().text();
    let evictions: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("hoard_evictions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();

    let ops = s.ops.load(Ordering::Relaxed);
    println!(
        "soak: {CLIENTS} clients, {elapsed:.0} s, {ops} requests ({:.0}/s), evictions {evictions}",
        ops as f64 / elapsed
    );
    println!(
        "{:<14} {:>8} {:>9} {:>9} {:>9}",
        "request", "count", "p50 ms", "p99 ms", "max ms"
    );
    let mut lat = s.lat.lock().unwrap();
    for (kind, v) in lat.iter_mut() {
        let n = v.len();
        let (p50, p99, max) = (pct(v, 0.5), pct(v, 0.99), pct(v, 1.0));
        println!("{kind:<14} {n:>8} {p50:>9.2} {p99:>9.2} {max:>9.2}");
    }
    println!("answers: {:?}", s.statuses.lock().unwrap());
    println!(
        "RSS: {} MiB after warm-up, {} MiB at the end, {} MiB at most (bound on growth: {} MiB)",
        rss_warm / 1024,
        rss_end / 1024,
        rss_max / 1024,
        RSS_GROWTH_BOUND_KB / 1024
    );
    let errors = s.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} errors, the first:\n{}",
        errors.len(),
        errors.join("\n")
    );
    for kind in [
        "push",
        "manifest put",
        "head",
        "pull",
        "gomod",
        "gocache put",
        "gocache get",
    ] {
        assert!(
            lat.get(kind).is_some_and(|v| v.len() >= 20),
            "too few {kind} requests"
        );
    }
    assert!(
        evictions > 0.0,
        "the size bound never evicted anything:\n{metrics}"
    );
    assert!(
        rss_end <= rss_warm + RSS_GROWTH_BOUND_KB,
        "RSS grew from {rss_warm} KiB to {rss_end} KiB"
    );
    // Afterwards the store is whole (Invariant 1): every tag left pulls completely.
    let left = assert_invariant_1(&h, "the soak");
    println!("after the soak: {left} tags, all whole");
}
