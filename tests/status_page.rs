//! The status page in a real headless browser (Debian's chromium): it loads, renders without a
//! single console message, and shows the numbers `/metrics` gives; a screenshot is kept in
//! target/test-artifacts/. And `/metrics` itself: the families operators scrape.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const K: usize = 1024;

/// `name{labels} value` from a Prometheus text page.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// (the DOM after scripts ran, what chromium logged)
fn chromium(
    url: &str,
    profile: &std::path::Path,
    screenshot: Option<&std::path::Path>,
) -> (String, String) {
    let chromium = require_tool(
        "chromium",
        "install it with `apt-get install chromium` (scripts/test-all.sh does)",
    );
    let mut c = Command::new(chromium);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--window-size=1280,1100",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(p) => c.arg(format!("--screenshot={}", p.display())),
        None => c.arg("--dump-dom"),
    };
    let out = c.arg(url).output().expect("running chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    rest[start..end].to_owned()
}

#[test]
fn the_status_page_renders_in_a_browser_with_the_numbers_metrics_gives() {
    let h = Hoard::start(&["--max-size", "1MiB", "--orphan-grace", "1h"]);
    // Something to show: two repositories, pulls, misses, and an eviction by size.
    let old = push_image(&h, "team/old", "v1", None, &[bytes(1, 400 * K)]);
    let _ = old;
    let new = push_image(&h, "team/app", "v1", None, &[bytes(2, 300 * K)]);
    for _ in 0..3 {
        assert!(pull(&h, "team/app", "v1"));
    }
    assert_eq!(
        h.req("GET", "/v2/team/app/manifests/nope").send().status,
        404
    );
    let _ = push_image(&h, "team/app", "v2", None, &[bytes(3, 400 * K)]);
    wait_until("an eviction by size", Duration::from_secs(20), || {
        status_page(&h).contains("evictions reason=size")
    });
    let _ = new;

    let tmp = tempfile::tempdir().unwrap();
    let (dom, log) = chromium(&h.url("/"), &tmp.path().join("profile"), None);
    assert!(
        dom.contains("data-loaded=\"yes\""),
        "the page's data never loaded:\n{dom}"
    );
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(
        console.is_empty(),
        "console messages:\n{}",
        console.join("\n")
    );

    // The same numbers /metrics gives (nothing changed in between).
    let m = h.req("GET", "/metrics").send().text();
    let bytes_shown: f64 = text_of(&dom, "store-bytes").parse().unwrap();
    assert_eq!(bytes_shown, metric(&m, "hoard_store_bytes "));
    for kind in ["blobs", "manifests", "tags", "repositories"] {
        let shown: f64 = text_of(&dom, &format!("count-{kind}")).parse().unwrap();
        assert_eq!(
            shown,
            metric(&m, &format!("hoard_objects{{kind=\"{kind}\"}} ")),
            "{kind}"
        );
    }
    assert_eq!(text_of(&dom, "store-limit"), "1.0 MiB");
    assert!(dom.contains("team/app"), "top repositories:\n{dom}");
    assert!(dom.contains(">size<"), "the eviction's reason:\n{dom}");
    // Hits and misses as /metrics counts them.
    let hits = metric(&m, "hoard_cache_hits_total{front=\"oci\"} ");
    let misses = metric(&m, "hoard_cache_misses_total{front=\"oci\"} ");
    assert!(hits >= 3.0 && misses >= 1.0, "{m}");
    let row = dom.find(">oci<").expect("an oci row");
    let row = &dom[row..row + 400];
    assert!(row.contains(&format!(">{}<", hits as u64)), "{row}");
    assert!(row.contains(&format!(">{}<", misses as u64)), "{row}");

    // A screenshot for people to look at.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&h.url("/"), &tmp.path().join("profile2"), Some(&shot));
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

#[test]
fn metrics_count_requests_bytes_hits_and_state() {
    let h = Hoard::start(&[]);
    let img = push_image(&h, "m/app", "v1", None, &[bytes(4, 50 * K)]);
    assert!(pull(&h, "m/app", "v1"));
    assert_eq!(
        h.req("HEAD", "/v2/m/app/manifests/absent").send().status,
        404
    );
    assert_eq!(h.req("POST", "/admin/gc").send().status, 200);
    let r = h.req("GET", "/metrics").send();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let m = r.text();
    assert!(metric(&m, "hoard_http_requests_total{front=\"oci\",route=\"manifests\",method=\"PUT\",status=\"201\"} ") >= 1.0);
    assert!(metric(&m, "hoard_http_requests_total{front=\"oci\",route=\"manifests\",method=\"HEAD\",status=\"404\"} ") >= 1.0);
    assert!(metric(&m, "hoard_http_received_bytes_total{front=\"oci\"} ") >= (50 * K) as f64);
    assert!(metric(&m, "hoard_http_sent_bytes_total{front=\"oci\"} ") >= (50 * K) as f64);
    assert!(metric(&m, "hoard_cache_hits_total{front=\"oci\"} ") >= 3.0);
    assert!(metric(&m, "hoard_cache_misses_total{front=\"oci\"} ") >= 1.0);
    assert!(metric(&m, "hoard_gc_runs_total ") >= 1.0);
    // The layers, the config and the manifest itself.
    assert_eq!(
        metric(&m, "hoard_objects{kind=\"blobs\"} "),
        (img.blobs.len() + 1) as f64
    );
    assert_eq!(metric(&m, "hoard_objects{kind=\"tags\"} "), 1.0);
    assert_eq!(metric(&m, "hoard_ready "), 1.0);
    assert!(
        m.contains("hoard_http_request_duration_seconds_bucket{le="),
        "{m}"
    );
    // The page's data for scripts.
    let j = h.req("GET", "/status.json").send().json();
    assert_eq!(j["store"]["tags"], 1);
    assert_eq!(j["top_pulls"][0]["repository"], "m/app");
}
