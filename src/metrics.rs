//! Prometheus metrics at `/metrics`: what the HTTP layer counts as requests pass (requests by
//! front end, route and status; latency; bytes; hits and misses), and what the daemon's state
//! says at scrape time (store size and counts, evictions by reason, uploads, S3 requests and
//! clock offset, lifecycle passes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub front: &'static str,
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontLabel {
    pub front: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Hits and misses by front end at one moment: (wall-clock ms, [(front, hits, misses)]).
pub type Sample = (i64, Vec<(&'static str, u64, u64)>);

pub struct Metrics {
    /// Manifest pulls by repository since start (bounded; the least recently pulled go).
    pulls: std::sync::Mutex<lru::LruCache<String, u64>>,
    /// Hit and miss totals by front end, sampled once a minute for the last hour.
    history: std::sync::Mutex<std::collections::VecDeque<Sample>>,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<FrontLabel, Histogram>,
    bytes_in: Family<FrontLabel, Counter>,
    bytes_out: Family<FrontLabel, Counter>,
    hits: Family<FrontLabel, Counter>,
    misses: Family<FrontLabel, Counter>,
    refusals: Family<FrontLabel, Counter>,
    pub gc_runs: Counter,
    gc_seconds: Histogram,
    // Set at scrape time from the daemon's state.
    pub store_bytes: Gauge,
    pub store_limit_bytes: Gauge,
    pub objects: Family<KindLabel, Gauge>,
    pub uploads: Gauge,
    pub upload_bytes_reserved: Gauge,
    pub transfers: Gauge,
    pub evictions: Family<ReasonLabel, Counter>,
    pub evicted_bytes: Family<ReasonLabel, Counter>,
    pub s3_requests: Family<OpLabel, Counter>,
    pub s3_errors: Counter,
    pub s3_clock_offset_seconds: Gauge<f64, AtomicU64>,
    pub ready: Gauge,
}

fn build() -> Metrics {
    let mut registry = Registry::with_prefix("hoard");
    let requests = Family::<RequestLabels, Counter>::default();
    registry.register(
        "http_requests",
        "HTTP requests answered, by front end, route, method and status",
        requests.clone(),
    );
    let duration = Family::<FrontLabel, Histogram>::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.0005, 2.0, 17))
    });
    registry.register(
        "http_request_duration_seconds",
        "From the request head to the last byte of the answer, by front end",
        duration.clone(),
    );
    let bytes_in = Family::<FrontLabel, Counter>::default();
    registry.register(
        "http_received_bytes",
        "Request body bytes announced, by front end",
        bytes_in.clone(),
    );
    let bytes_out = Family::<FrontLabel, Counter>::default();
    registry.register(
        "http_sent_bytes",
        "Response body bytes sent, by front end",
        bytes_out.clone(),
    );
    let hits = Family::<FrontLabel, Counter>::default();
    registry.register(
        "cache_hits",
        "Reads answered from what hoard holds, by front end",
        hits.clone(),
    );
    let misses = Family::<FrontLabel, Counter>::default();
    registry.register(
        "cache_misses",
        "Reads of something hoard did not hold (gomod: fetched upstream), by front end",
        misses.clone(),
    );
    let refusals = Family::<FrontLabel, Counter>::default();
    registry.register(
        "auth_refusals",
        "Requests refused for missing or insufficient credentials, by front end",
        refusals.clone(),
    );
    let gc_runs = Counter::default();
    registry.register("gc_runs", "Lifecycle passes run", gc_runs.clone());
    let gc_seconds = Histogram::new(exponential_buckets(0.001, 4.0, 10));
    registry.register(
        "gc_duration_seconds",
        "How long lifecycle passes took",
        gc_seconds.clone(),
    );
    let store_bytes = Gauge::default();
    registry.register(
        "store_bytes",
        "Bytes of blobs stored (what the size bound counts)",
        store_bytes.clone(),
    );
    let store_limit_bytes = Gauge::default();
    registry.register(
        "store_limit_bytes",
        "The size bound (max_size); 0 when unbounded",
        store_limit_bytes.clone(),
    );
    let objects = Family::<KindLabel, Gauge>::default();
    registry.register(
        "objects",
        "Objects held, by kind (repositories, manifests, tags, blobs, unreferenced blobs)",
        objects.clone(),
    );
    let uploads = Gauge::default();
    registry.register("upload_sessions", "Upload sessions open", uploads.clone());
    let upload_bytes_reserved = Gauge::default();
    registry.register(
        "upload_reserved_bytes",
        "Bytes reserved by uploads in progress",
        upload_bytes_reserved.clone(),
    );
    let transfers = Gauge::default();
    registry.register(
        "transfers_in_progress",
        "Blob transfers running (bounded by max_transfers)",
        transfers.clone(),
    );
    let evictions = Family::<ReasonLabel, Counter>::default();
    registry.register(
        "evictions",
        "Roots (tags and other refs) removed by the lifecycle, by reason",
        evictions.clone(),
    );
    let evicted_bytes = Family::<ReasonLabel, Counter>::default();
    registry.register(
        "evicted_bytes",
        "Bytes freed by the lifecycle, by reason",
        evicted_bytes.clone(),
    );
    let s3_requests = Family::<OpLabel, Counter>::default();
    registry.register(
        "s3_requests",
        "Requests sent to S3, by operation",
        s3_requests.clone(),
    );
    let s3_errors = Counter::default();
    registry.register(
        "s3_errors",
        "S3 requests answered 5xx or not at all",
        s3_errors.clone(),
    );
    let s3_clock_offset_seconds = Gauge::<f64, AtomicU64>::default();
    registry.register(
        "s3_clock_offset_seconds",
        "S3's clock minus this machine's, as measured from its Date headers",
        s3_clock_offset_seconds.clone(),
    );
    let ready = Gauge::default();
    registry.register(
        "ready",
        "1 when the store is reachable (as /readyz)",
        ready.clone(),
    );
    Metrics {
        pulls: std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(10_000).unwrap_or(std::num::NonZeroUsize::MIN),
        )),
        history: std::sync::Mutex::new(std::collections::VecDeque::new()),
        registry,
        requests,
        duration,
        bytes_in,
        bytes_out,
        hits,
        misses,
        refusals,
        gc_runs,
        gc_seconds,
        store_bytes,
        store_limit_bytes,
        objects,
        uploads,
        upload_bytes_reserved,
        transfers,
        evictions,
        evicted_bytes,
        s3_requests,
        s3_errors,
        s3_clock_offset_seconds,
        ready,
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(build)
}

/// Front end and route of a path, for labels (a fixed, small set).
pub fn classify(path: &str) -> (&'static str, &'static str) {
    if path == "/v2" || path == "/v2/" {
        return ("oci", "base");
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        let route = if rest == "_catalog" {
            "catalog"
        } else if rest.contains("/blobs/uploads") {
            "uploads"
        } else if rest.contains("/blobs/") {
            "blobs"
        } else if rest.contains("/manifests/") {
            "manifests"
        } else if rest.contains("/tags/") {
            "tags"
        } else if rest.contains("/referrers/") {
            "referrers"
        } else {
            "other"
        };
        let front = if rest.starts_with("snapshots/") {
            "snapshot"
        } else if rest.starts_with("gomod/") {
            "gomod"
        } else if rest.starts_with("gocache/") {
            "gocache"
        } else {
            "oci"
        };
        return (front, route);
    }
    if let Some(rest) = path.strip_prefix("/gomod/") {
        let route = if rest.starts_with("sumdb/") {
            "sumdb"
        } else if rest.ends_with("/@latest") {
            "latest"
        } else if rest.ends_with("/@v/list") {
            "list"
        } else if rest.ends_with(".info") {
            "info"
        } else if rest.ends_with(".mod") {
            "mod"
        } else if rest.ends_with(".zip") {
            "zip"
        } else {
            "other"
        };
        return ("gomod", route);
    }
    if path.starts_with("/gocache/") {
        return ("gocache", "action");
    }
    if let Some(rest) = path.strip_prefix("/snapshots/") {
        let route = if rest.is_empty() {
            "newest"
        } else if rest.ends_with("/_missing") {
            "missing"
        } else if rest.contains("/_chunks/") {
            "chunks"
        } else if rest.ends_with("/_tar") {
            "tar"
        } else {
            "index"
        };
        return ("snapshot", route);
    }
    if path.starts_with("/admin/") {
        return ("admin", "admin");
    }
    match path {
        "/token" => ("auth", "token"),
        "/metrics" => ("operator", "metrics"),
        "/healthz" | "/readyz" => ("operator", "health"),
        "/" | "/status" | "/status.txt" | "/status.json" => ("operator", "status"),
        _ => ("other", "other"),
    }
}

fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        _ => "other",
    }
}

pub fn hit(front: &'static str) {
    get().hits.get_or_create(&FrontLabel { front }).inc();
}

/// A request refused for its credentials outside HTTP (gRPC over TCP).
pub fn refused(front: &'static str) {
    get().refusals.get_or_create(&FrontLabel { front }).inc();
}

pub fn miss(front: &'static str) {
    get().misses.get_or_create(&FrontLabel { front }).inc();
}

/// One answered request (called when its body is done or dropped).
pub fn request(
    method: &http::Method,
    path: &str,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    took: Duration,
) {
    let m = get();
    let (front, route) = classify(path);
    m.requests
        .get_or_create(&RequestLabels {
            front,
            route,
            method: method_label(method),
            status,
        })
        .inc();
    let f = FrontLabel { front };
    m.duration.get_or_create(&f).observe(took.as_secs_f64());
    m.bytes_in.get_or_create(&f).inc_by(bytes_in);
    m.bytes_out.get_or_create(&f).inc_by(bytes_out);
    if status == 401 || status == 403 {
        m.refusals.get_or_create(&f).inc();
    }
    // Reads of held things: hits and misses by status (gomod counts its own: a 200 there may
    // have been fetched upstream).
    let read = matches!(*method, http::Method::GET | http::Method::HEAD);
    let counted = matches!(
        (front, route),
        ("oci", "blobs" | "manifests")
            | ("gocache", "action")
            | ("snapshot", "index" | "newest" | "manifests" | "blobs")
    );
    if front == "oci" && route == "manifests" && *method == http::Method::GET && status == 200 {
        if let Some(repo) = path
            .strip_prefix("/v2/")
            .and_then(|r| r.rsplit_once("/manifests/"))
            .map(|(repo, _)| repo)
        {
            if let Ok(mut p) = m.pulls.lock() {
                *p.get_or_insert_mut(repo.to_owned(), || 0) += 1;
            }
        }
    }
    if read && counted {
        match status {
            200..=299 | 304 => m.hits.get_or_create(&f).inc(),
            404 => m.misses.get_or_create(&f).inc(),
            _ => 0,
        };
    }
}

pub fn gc_pass(took: Duration) {
    let m = get();
    m.gc_runs.inc();
    m.gc_seconds.observe(took.as_secs_f64());
}

/// Sets a counter to a total kept elsewhere.
pub fn set_counter(c: &Counter, v: u64) {
    c.inner().store(v, Ordering::Relaxed);
}

/// The text exposition.
pub fn render() -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &get().registry);
    out
}

/// The repositories pulled most since start: (repository, manifest pulls).
pub fn top_pulls(n: usize) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = match get().pulls.lock() {
        Ok(p) => p.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        Err(_) => Vec::new(),
    };
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// Records the hit and miss totals now (once a minute; an hour is kept).
pub fn sample(now_ms: i64) {
    let row = hits_and_misses();
    if let Ok(mut h) = get().history.lock() {
        h.push_back((now_ms, row));
        while h.len() > 61 {
            h.pop_front();
        }
    }
}

/// Hits and misses per front end in each minute of the last hour (differences of the
/// samples, the last one up to now): (minute's end ms, [(front, hits, misses)]).
pub fn history(now_ms: i64) -> Vec<Sample> {
    let mut rows: Vec<Sample> = match get().history.lock() {
        Ok(h) => h.iter().cloned().collect(),
        Err(_) => Vec::new(),
    };
    rows.push((now_ms, hits_and_misses()));
    rows.windows(2)
        .map(|w| {
            let (prev, cur) = (&w[0].1, &w[1].1);
            let d = cur
                .iter()
                .map(|(f, h, m)| {
                    let (ph, pm) = prev
                        .iter()
                        .find(|(pf, _, _)| pf == f)
                        .map(|(_, h, m)| (*h, *m))
                        .unwrap_or((0, 0));
                    (*f, h.saturating_sub(ph), m.saturating_sub(pm))
                })
                .collect();
            (w[1].0, d)
        })
        .collect()
}

/// The hit and miss totals by front end (for the status page).
pub fn hits_and_misses() -> Vec<(&'static str, u64, u64)> {
    let m = get();
    ["oci", "gomod", "gocache", "snapshot", "content"]
        .into_iter()
        .map(|front| {
            let f = FrontLabel { front };
            (
                front,
                m.hits.get_or_create(&f).get(),
                m.misses.get_or_create(&f).get(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_classify_into_a_small_set() {
        assert_eq!(classify("/v2/a/b/blobs/uploads/x"), ("oci", "uploads"));
        assert_eq!(classify("/v2/a/blobs/sha256:00"), ("oci", "blobs"));
        assert_eq!(
            classify("/v2/snapshots/k/manifests/latest"),
            ("snapshot", "manifests")
        );
        assert_eq!(classify("/gomod/x.com/m/@v/v1.0.0.zip"), ("gomod", "zip"));
        assert_eq!(classify("/gocache/ns/action/ab"), ("gocache", "action"));
        assert_eq!(
            classify("/snapshots/ci/k/_chunks/sha256:00"),
            ("snapshot", "chunks")
        );
        assert_eq!(classify("/nope"), ("other", "other"));
    }

    #[test]
    fn the_text_has_the_families() {
        request(
            &http::Method::GET,
            "/v2/a/blobs/sha256:00",
            200,
            0,
            10,
            Duration::from_millis(3),
        );
        let t = render();
        assert!(t.contains("hoard_http_requests_total{front=\"oci\",route=\"blobs\",method=\"GET\",status=\"200\"}"), "{t}");
        assert!(t.contains("hoard_cache_hits_total{front=\"oci\"}"), "{t}");
        assert!(
            t.contains("hoard_http_request_duration_seconds_bucket"),
            "{t}"
        );
    }
}
