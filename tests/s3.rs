//! hoard on S3 and on the tiered store, against a real S3-protocol server on loopback that each
//! test starts for itself (so it can stop, freeze and restart it): readiness, credentials, the
//! service unreachable and back, S3 requests per pushed and pulled blob, single-flight fills of
//! the disk tier, multipart uploads, and ages measured in the S3 service's clock.

mod common;

use std::time::{Duration, Instant};

use common::s3::{store_env, S3Server};
use common::*;

const K: usize = 1024;

fn env(
    kind: StoreKind,
    s3: &S3Server,
    bucket: &str,
    more: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut e = store_env(kind, s3, bucket);
    let leaf = if kind == StoreKind::Tiered {
        "HOARD_STORE_SLOW_"
    } else {
        "HOARD_STORE_"
    };
    for (k, v) in more {
        let name = if k.starts_with("FAST_") {
            format!("HOARD_STORE_{k}")
        } else {
            format!("{leaf}{k}")
        };
        e.push((name, v.to_string()));
    }
    e
}

fn readyz(h: &Hoard) -> (u16, String) {
    let r = h.req("GET", "/readyz").send();
    (r.status, r.text())
}

fn wait_ready(h: &Hoard, want: u16, within: Duration) -> String {
    let end = Instant::now() + within;
    loop {
        let (status, text) = readyz(h);
        if status == want {
            return text;
        }
        assert!(
            Instant::now() < end,
            "/readyz still {status} ({text}) after {within:?}; log:\n{}",
            h.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pushes `data` monolithically; the status and body text.
/// Starts an upload of `data` to `repo` the way BuildKit finishes one (`PUT ?digest=` with the
/// body) and sends only its first `sent` bytes; the connection stays open while it is held.
fn named_put_cut_short(h: &Hoard, repo: &str, data: &[u8], sent: usize) -> std::net::TcpStream {
    use std::io::Write;
    let loc = start_upload(h, repo);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    write!(
        s,
        "PUT {loc}{sep}digest={} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        sha256(data),
        data.len()
    )
    .unwrap();
    s.write_all(&data[..sent]).unwrap();
    s
}

fn push_mono(h: &Hoard, repo: &str, data: &[u8]) -> (u16, String) {
    let r = h
        .req(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={}", sha256(data)),
        )
        .body(data.to_vec())
        .send();
    (r.status, r.text())
}

#[test]
fn a_missing_bucket_is_named_at_start_and_readiness_follows_it_without_a_restart() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_env(
        &tmp.path().join("d"),
        &[],
        &env(StoreKind::S3, &s3, "not-made-yet", &[("RETRIES", "1")]),
    );
    wait_until("/readyz to say why", Duration::from_secs(10), || {
        readyz(&h).1.contains("does not exist")
    });
    let text = wait_ready(&h, 503, Duration::from_secs(1));
    assert!(text.contains("bucket not-made-yet"), "{text}");
    assert!(text.contains(&s3.endpoint()), "names the endpoint: {text}");
    assert!(text.contains("does not exist"), "{text}");
    wait_until(
        "the start-up error in the log",
        Duration::from_secs(5),
        || h.log().contains("S3 bucket unreachable") && h.log().contains("not-made-yet"),
    );
    // A push meanwhile: a clear 503 with the OCI error body, nothing stored.
    let data = bytes(1, 4 * K);
    let (status, body) = push_mono(&h, "app", &data);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"UNAVAILABLE\""), "{body}");
    let status = blob_status(&h, "app", &sha256(&data));
    assert!(status == 404 || status == 503, "nothing stored: {status}");
    // The operator creates the bucket: ready within a check, no restart.
    s3.create_bucket("not-made-yet");
    wait_ready(&h, 200, Duration::from_secs(5));
    let (status, body) = push_mono(&h, "app", &data);
    assert_eq!(status, 201, "{body}");
    assert_eq!(blob_status(&h, "app", &sha256(&data)), 206);
}

#[test]
fn wrong_credentials_are_named_at_start_and_readyz_says_not_ready() {
    // The server checks signatures after its first request (which creates the bucket); no key
    // is known to it, so hoard's is refused.
    let s3 = S3Server::start_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]);
    s3.create_bucket("locked");
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_env(
        &tmp.path().join("d"),
        &[],
        &env(StoreKind::S3, &s3, "locked", &[("RETRIES", "1")]),
    );
    wait_until("/readyz to say why", Duration::from_secs(10), || {
        readyz(&h).1.contains("credentials")
    });
    let text = wait_ready(&h, 503, Duration::from_secs(1));
    assert!(text.contains("bucket locked"), "{text}");
    assert!(text.contains("credentials"), "says what to check: {text}");
    let (status, body) = push_mono(&h, "app", &bytes(2, 100));
    assert_eq!(status, 503, "{body}");
}

#[test]
fn s3_requests_per_pushed_and_pulled_blob() {
    let s3 = S3Server::start();
    s3.create_bucket("count");
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_env(
        &tmp.path().join("d"),
        &[],
        &env(StoreKind::S3, &s3, "count", &[]),
    );
    wait_ready(&h, 200, Duration::from_secs(10));
    let mut pushed = Vec::new();
    for i in 0..5 {
        let data = bytes(10 + i, 4 * K);
        let before = h.s3_settled();
        let (status, body) = push_mono(&h, "app", &data);
        assert_eq!(status, 201, "{body}");
        let n = h.s3_requests() - before;
        assert!(n <= 3, "a small blob push took {n} S3 requests");
        pushed.push(data);
    }
    for data in &pushed {
        let before = h.s3_settled();
        let r = h
            .req("GET", &format!("/v2/app/blobs/{}", sha256(data)))
            .send();
        assert_eq!(r.status, 200);
        assert!(r.body == *data);
        assert_eq!(h.s3_requests() - before, 1, "one GET per pulled blob");
    }
    // A ranged pull is one ranged GET too.
    let before = h.s3_settled();
    let r = h
        .req("GET", &format!("/v2/app/blobs/{}", sha256(&pushed[0])))
        .header("Range", "bytes=100-199")
        .send();
    assert_eq!(r.status, 206);
    assert!(r.body == pushed[0][100..200]);
    assert_eq!(h.s3_requests() - before, 1);
    // HEAD is answered from the index.
    let before = h.s3_settled();
    let r = h
        .req("HEAD", &format!("/v2/app/blobs/{}", sha256(&pushed[1])))
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(h.s3_requests() - before, 0);
}

#[test]
fn tiered_hits_cost_no_s3_request_and_concurrent_misses_share_one_fetch() {
    let s3 = S3Server::start();
    s3.create_bucket("tier");
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("d");
    let e = env(StoreKind::Tiered, &s3, "tier", &[]);
    let mut h = Hoard::start_env(&data_dir, &[], &e);
    wait_ready(&h, 200, Duration::from_secs(10));
    let layer = bytes(20, 3 << 20);
    let img = push_image(&h, "app", "v1", None, std::slice::from_ref(&layer));
    // Pushed through this replica: in the disk tier already, blob pulls cost nothing in S3;
    // a pull by tag costs the one request that reads the tag (another replica may have moved
    // it), and the manifest comes from memory.
    let before = h.s3_settled();
    for _ in 0..2 {
        assert!(pull(&h, "app", "v1"));
    }
    assert_eq!(
        h.s3_requests() - before,
        2,
        "two pulls by tag: one tag read each, nothing else"
    );
    let before = h.s3_settled();
    for b in &img.blobs {
        let r = h.req("GET", &format!("/v2/app/blobs/{b}")).send();
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        h.s3_requests() - before,
        0,
        "tiered blob hits sent S3 requests"
    );
    assert!(h.stop().success());

    // The disk tier emptied (a new machine, or evicted): 8 pulls at once cost one GET.
    std::fs::remove_dir_all(data_dir.join("fast")).unwrap();
    let h = Hoard::start_env(&data_dir, &[], &e);
    wait_ready(&h, 200, Duration::from_secs(10));
    let d = img.blobs[1].clone();
    let gets_before = get_objects(&h);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let f = Hoard::req_at(h.addr);
            let path = format!("/v2/app/blobs/{d}");
            std::thread::spawn(move || f("GET", &path, &[], Vec::new()))
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == layer, "bytes differ");
    }
    assert_eq!(
        get_objects(&h) - gets_before,
        1,
        "8 concurrent misses fetched more than once"
    );
    assert_eq!(h.status_number("fast tier").max(1), 1);
    // And the next pull is a hit.
    let before = h.s3_settled();
    assert_eq!(
        h.req("GET", &format!("/v2/app/blobs/{d}"))
            .send()
            .body
            .len(),
        layer.len()
    );
    assert_eq!(h.s3_requests() - before, 0);
}

fn get_objects(h: &Hoard) -> u64 {
    h.s3_kind("GetObject", "blob")
}

#[test]
fn the_disk_tier_evicts_by_its_own_bound_and_s3_keeps_everything() {
    let s3 = S3Server::start();
    s3.create_bucket("small-tier");
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_env(
        &tmp.path().join("d"),
        &[],
        &env(
            StoreKind::Tiered,
            &s3,
            "small-tier",
            &[("FAST_MAX_SIZE", "8MiB")],
        ),
    );
    let blobs: Vec<Vec<u8>> = (0..6).map(|i| bytes(30 + i, 3 << 20)).collect();
    for b in &blobs {
        assert_eq!(push_mono(&h, "app", b).0, 201);
    }
    let page = status_page(&h);
    assert!(
        page.contains("evicted 4") || page.contains("evicted 5"),
        "{page}"
    );
    assert_eq!(
        s3.list("small-tier", "hoard/blobs/").len(),
        6,
        "S3 keeps every blob"
    );
    for b in &blobs {
        let r = h.req("GET", &format!("/v2/app/blobs/{}", sha256(b))).send();
        assert_eq!(r.status, 200);
        assert!(r.body == *b);
    }
    assert!(
        count_files(&tmp.path().join("d/fast/blobs")) <= 2,
        "the disk tier stays within its bound"
    );
}

#[test]
fn multipart_uploads_stream_in_parts_and_a_wrong_digest_leaves_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("parts");
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_env(
        &tmp.path().join("d"),
        &[],
        &env(
            StoreKind::S3,
            &s3,
            "parts",
            &[("PART_SIZE", "5MiB"), ("PARALLEL_PARTS", "3")],
        ),
    );
    // 23 MiB in uneven chunks: five parts, the last one short.
    let data = bytes(40, (23 << 20) + 777);
    let loc = start_upload(&h, "big");
    let mut loc = loc;
    let mut at = 0;
    for (i, n) in [(1 << 20) + 3, 7 << 20, 9 << 20, 1].into_iter().enumerate() {
        let r = h
            .req("PATCH", &loc)
            .header("Content-Range", &format!("{at}-{}", at + n - 1))
            .body(data[at..at + n].to_vec())
            .send();
        assert_eq!(r.status, 202, "chunk {i}: {}", r.text());
        loc = r.header("location").unwrap().to_owned();
        at += n;
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = h
        .req("PUT", &format!("{loc}{sep}digest={}", sha256(&data)))
        .body(data[at..].to_vec())
        .send();
    assert_eq!(r.status, 201, "{}\n{}", r.text(), h.log());
    assert!(
        h.status_number("s3 requests UploadPart") >= 5,
        "{}",
        status_page(&h)
    );
    let got = h
        .req("GET", &format!("/v2/big/blobs/{}", sha256(&data)))
        .send();
    assert!(got.body == data, "bytes differ");
    assert_eq!(s3.list("parts", "hoard/uploads/").len(), 0);
    assert_eq!(s3.multipart_uploads("parts"), 0);
    // That one was copied to its digest's key once the digest was known.
    assert_eq!(h.status_number("s3 requests CopyObject"), 1);

    // Named up front (POST, then PUT ?digest= with the whole body, as BuildKit pushes): the
    // parts go straight to the blob's key, and no copy follows.
    let named = bytes(42, (17 << 20) + 5);
    let loc = start_upload(&h, "big");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = h
        .req("PUT", &format!("{loc}{sep}digest={}", sha256(&named)))
        .body(named.clone())
        .send();
    assert_eq!(r.status, 201, "{}\n{}", r.text(), h.log());
    assert_eq!(h.status_number("s3 requests CopyObject"), 1, "no copy");
    let got = h
        .req("GET", &format!("/v2/big/blobs/{}", sha256(&named)))
        .send();
    assert!(got.body == named, "bytes differ");
    // Ranged pulls stream from S3 as they arrive, cut exactly at the range's end.
    for (range, want) in [
        ("bytes=1000-5000999", &named[1000..5_001_000]),
        ("bytes=-300000", &named[named.len() - 300_000..]),
        ("bytes=9000000-", &named[9_000_000..]),
    ] {
        let r = h
            .req("GET", &format!("/v2/big/blobs/{}", sha256(&named)))
            .header("Range", range)
            .send();
        assert_eq!(r.status, 206, "{range}");
        assert!(r.body == want, "{range}: {} bytes differ", r.body.len());
    }
    assert!(s3.list("parts", "hoard/uploads/").is_empty());
    assert_eq!(s3.multipart_uploads("parts"), 0);

    // The wrong digest for 12 MiB: refused, no object and no multipart upload left.
    let other = bytes(41, 12 << 20);
    let r = h
        .req(
            "POST",
            &format!(
                "/v2/big/blobs/uploads/?digest={}",
                sha256(b"something else")
            ),
        )
        .body(other.clone())
        .send();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "DIGEST_INVALID");
    wait_until("the aborted upload to go", Duration::from_secs(5), || {
        s3.multipart_uploads("parts") == 0 && s3.list("parts", "hoard/uploads/").is_empty()
    });
    // Its parts went to the named digest's key: nothing was completed there.
    assert_eq!(s3.list("parts", "hoard/blobs/").len(), 2);
    assert_eq!(
        blob_status(&h, "big", &sha256(b"something else")),
        404,
        "a blob refused for its digest is not there"
    );

    // A client cut off while its named blob streams: the multipart upload is aborted.
    let cut = bytes(43, 14 << 20);
    {
        let _s = named_put_cut_short(&h, "big", &cut, 11 << 20);
        wait_until(
            "its multipart upload to begin",
            Duration::from_secs(10),
            || s3.multipart_uploads("parts") > 0,
        );
    }
    wait_until(
        "the cut upload to be aborted",
        Duration::from_secs(10),
        || s3.multipart_uploads("parts") == 0,
    );
    assert_eq!(blob_status(&h, "big", &sha256(&cut)), 404);
    assert_eq!(s3.list("parts", "hoard/blobs/").len(), 2);
}

#[test]
fn s3_frozen_then_back_gives_503_then_recovers_and_the_disk_tier_keeps_serving() {
    let mut s3 = S3Server::start();
    s3.create_bucket("flaky");
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("d");
    let h = Hoard::start_env(
        &data_dir,
        &[],
        &env(
            StoreKind::Tiered,
            &s3,
            "flaky",
            &[("TIMEOUT", "1s"), ("RETRIES", "2")],
        ),
    );
    wait_ready(&h, 200, Duration::from_secs(10));
    let kept = push_image(&h, "app", "v1", None, &[bytes(50, 64 * K)]);

    // Frozen: connections open, nothing answered.
    s3.freeze();
    assert!(pull(&h, "app", "v1"), "the disk tier serves what it holds");
    let fresh = bytes(51, 32 * K);
    let t = Instant::now();
    let (status, body) = push_mono(&h, "app", &fresh);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"UNAVAILABLE\""), "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "bounded retries, took {:?}",
        t.elapsed()
    );
    let status = blob_status(&h, "app", &sha256(&fresh));
    assert!(
        status == 404 || status == 503,
        "nothing half-written visible: {status}"
    );
    wait_ready(&h, 503, Duration::from_secs(30));
    s3.thaw();
    wait_ready(&h, 200, Duration::from_secs(30));
    assert_eq!(push_mono(&h, "app", &fresh).0, 201);

    // Gone (connection refused), then a new server on the same address: the bucket is new
    // and empty, so blobs the disk tier does not hold are misses, never failures.
    s3.stop();
    wait_ready(&h, 503, Duration::from_secs(30));
    let (status, body) = push_mono(&h, "app", &bytes(52, 100));
    assert_eq!(status, 503, "{body}");
    assert!(pull(&h, "app", "v1"), "the disk tier still serves");
    s3.restart();
    s3.create_bucket("flaky");
    wait_ready(&h, 200, Duration::from_secs(30));
    assert_eq!(push_mono(&h, "app", &bytes(53, 100)).0, 201);
    // The replica's cache follows the (now empty) bucket: what went with it is a miss.
    let listed = h.status_number("bucket re-listings");
    wait_until(
        "the replica re-lists the bucket",
        Duration::from_secs(30),
        || h.status_number("bucket re-listings") > listed,
    );
    let r = h.req("GET", "/v2/app/manifests/v1").send();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(blob_status(&h, "app", &kept.blobs[1]), 404);
}

/// A replica whose clock is two hours off ages nothing by it: cache time is the S3 service's.
#[test]
fn a_clock_two_hours_off_ages_by_the_s3_service_clock() {
    let s3 = S3Server::start();
    for (offset, bucket) in [("+2h", "ahead"), ("-2h", "behind")] {
        s3.create_bucket(bucket);
        let tmp = tempfile::tempdir().unwrap();
        let mut e = env(StoreKind::S3, &s3, bucket, &[]);
        e.push(("HOARD_CLOCK_OFFSET".into(), offset.into()));
        let h = Hoard::start_env(
            &tmp.path().join("d"),
            &[
                "--ttl",
                "1h",
                "--clock-skew-tolerance",
                "1m",
                "--gc-interval",
                "200ms",
            ],
            &e,
        );
        wait_ready(&h, 200, Duration::from_secs(10));
        push_image(&h, "app", "fresh", None, &[bytes(60, 4 * K)]);
        std::thread::sleep(Duration::from_secs(1));
        let r = h.req("POST", "/admin/gc").send();
        assert_eq!(r.status, 200);
        assert!(pull(&h, "app", "fresh"), "{offset}: a fresh tag expired");
        let page = status_page(&h);
        let shown: i64 = page
            .lines()
            .find_map(|l| l.strip_prefix("s3 clock offset: "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("the S3 clock offset on the status page");
        let want = if offset.starts_with('+') {
            -7_200_000
        } else {
            7_200_000
        };
        assert!(
            (shown - want).abs() < 5_000,
            "{offset}: offset shown {shown}\n{page}"
        );
        // Cache time is the service's time, not this machine's skewed one.
        let cache = page
            .lines()
            .find_map(|l| l.strip_prefix("cache time: "))
            .expect("cache time on the status page")
            .to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // To the minute, allowing two minutes either way.
        let near = (0..=4).any(|i| {
            let t = rfc3339_secs(now - 120 + i * 60);
            cache.get(..16) == t.get(..16)
        });
        assert!(
            near,
            "{offset}: cache time {cache} is not the service's time"
        );
        wait_until("the skew warning", Duration::from_secs(15), || {
            h.log().contains("clock is off from the S3 service")
        });
    }
}

fn rfc3339_secs(secs: u64) -> String {
    hoard::clock::rfc3339(secs as i64 * 1000)
}

/// This version has one writer per bucket: a second hoard on the same bucket and prefix waits,
/// not ready and refusing writes, until the first lets go; a restart after kill -9 takes its own
/// lease back at once.
#[test]
fn kill9_mid_multipart_push_loses_nothing_acknowledged_and_leaves_nothing_behind() {
    let s3 = S3Server::start();
    s3.create_bucket("crash");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let e = env(StoreKind::S3, &s3, "crash", &[("PART_SIZE", "5MiB")]);
    let args = ["--upload-timeout", "1s"];
    let mut h = Hoard::start_env(&dir, &args, &e);
    wait_ready(&h, 200, Duration::from_secs(10));
    let acked = push_image(&h, "app", "v1", None, &[bytes(80, 12 << 20)]);
    // 20 MiB announced, 15 sent (three parts in flight or done), then the process dies.
    let big = bytes(81, 20 << 20);
    let loc = start_upload(&h, "app");
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    use std::io::Write;
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    s.write_all(&big[..15 << 20]).unwrap();
    wait_until(
        "a multipart upload to begin",
        Duration::from_secs(10),
        || s3.multipart_uploads("crash") > 0,
    );
    h.kill9();
    drop(s);
    std::thread::sleep(Duration::from_millis(1500));
    let h = Hoard::start_env(&dir, &args, &e);
    wait_ready(&h, 200, Duration::from_secs(10));
    wait_until(
        "the crashed upload to be cleared",
        Duration::from_secs(10),
        || s3.multipart_uploads("crash") == 0 && s3.list("crash", "hoard/uploads/").is_empty(),
    );
    assert!(pull(&h, "app", "v1"), "an acknowledged image was lost");
    assert_eq!(blob_status(&h, "app", &sha256(&big)), 404);
    let _ = acked;

    // The same for a blob named up front, whose parts go to its own key under blobs/.
    let named = bytes(82, 20 << 20);
    let s = named_put_cut_short(&h, "app", &named, 15 << 20);
    wait_until(
        "a multipart upload to begin",
        Duration::from_secs(10),
        || s3.multipart_uploads("crash") > 0,
    );
    let mut h = h;
    h.kill9();
    drop(s);
    std::thread::sleep(Duration::from_millis(1500));
    let h = Hoard::start_env(&dir, &args, &e);
    wait_ready(&h, 200, Duration::from_secs(10));
    wait_until(
        "the crashed upload to be cleared",
        Duration::from_secs(10),
        || s3.multipart_uploads("crash") == 0,
    );
    assert_eq!(blob_status(&h, "app", &sha256(&named)), 404);
    assert!(pull(&h, "app", "v1"), "an acknowledged image was lost");
    let r = h.req("POST", "/admin/verify").send();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A pull whose S3 body stops arriving mid-way is cut (the client sees a short body and retries)
/// instead of hanging; the same pull succeeds once S3 answers again.
#[test]
fn a_pull_whose_s3_body_stalls_is_cut_not_hung() {
    use std::io::{Read, Write};
    let s3 = S3Server::start();
    s3.create_bucket("stall");
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_env(
        &tmp.path().join("d"),
        &[],
        &env(StoreKind::S3, &s3, "stall", &[("TIMEOUT", "1s")]),
    );
    wait_ready(&h, 200, Duration::from_secs(10));
    let data = bytes(60, 96 << 20);
    let (status, body) = push_mono(&h, "app", &data);
    assert_eq!(status, 201, "{body}");
    let d = sha256(&data);

    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /v2/app/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < 1 << 20 {
        got += s.read(&mut buf).unwrap();
    }
    // The client pauses, the pipe behind it fills, and S3 hangs.
    std::thread::sleep(Duration::from_millis(500));
    s3.freeze();
    let t = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let waited = t.elapsed();
    s3.thaw();
    assert!(
        got < data.len(),
        "the whole blob came through S3 before it froze"
    );
    assert!(
        waited < Duration::from_secs(20),
        "the stalled pull was cut after {waited:?}"
    );
    assert!(
        h.log().contains("S3 broke off a body"),
        "the log says why:\n{}",
        h.log()
    );
    let r = h.req("GET", &format!("/v2/app/blobs/{d}")).send();
    assert_eq!(r.status, 200);
    assert!(r.body == data, "the pull after S3 is back is whole");
}

/// containerd's content API on S3: a commit the store cannot take (S3 cuts every write)
/// answers Unavailable and keeps the ingest where it was, in memory or in files; with S3 back,
/// the client's next stream finds its offset and commits the same bytes.
#[test]
fn a_content_commit_s3_cannot_take_keeps_the_ingest_for_a_retry() {
    use hoard::proto::content as api;
    use hoard::proto::content::content_client::ContentClient;

    let s3 = S3Server::start();
    s3.create_bucket("ingests");
    let proxy = common::proxy::Proxy::start(s3.addr());
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("d");
    let mut e = common::s3::store_env_at(StoreKind::S3, &proxy.endpoint(), "ingests");
    e.push(("HOARD_STORE_TIMEOUT".into(), "1s".into()));
    e.push(("HOARD_STORE_RETRIES".into(), "2".into()));
    let h = Hoard::start_env(&data_dir, &[], &e);
    wait_ready(&h, 200, Duration::from_secs(10));
    // One written and committed in a single stream (its commit is from memory), one written
    // by a stream that ended (in files by then), one past the in-memory size (in files).
    let blobs = [
        ("whole", bytes(62, 16 * K)),
        ("small", bytes(60, 100 * K)),
        ("large", bytes(61, 3 * K * K)),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let msg = |action: api::WriteAction, r: &str, offset: usize, data: &[u8], expected: &str| {
        api::WriteContentRequest {
            action: action as i32,
            r#ref: r.into(),
            offset: offset as i64,
            total: 0,
            expected: expected.into(),
            data: data.to_vec().into(),
            labels: Default::default(),
        }
    };
    // One Write stream: its replies and how it ended.
    let stream = |msgs: Vec<api::WriteContentRequest>| {
        let data_dir = data_dir.clone();
        async move {
            let ch = hoard::grpc::connect_socket(&data_dir.join("hoard.sock"))
                .await
                .unwrap();
            let mut r = tonic::Request::new(tokio_stream::iter(msgs));
            r.metadata_mut()
                .insert("containerd-namespace", "ci".parse().unwrap());
            let mut out = Vec::new();
            let mut s = match ContentClient::new(ch).write(r).await {
                Ok(s) => s.into_inner(),
                Err(e) => return (out, Err(e)),
            };
            loop {
                match s.message().await {
                    Ok(Some(m)) => out.push(m),
                    Ok(None) => return (out, Ok(())),
                    Err(e) => return (out, Err(e)),
                }
            }
        }
    };
    for (name, data) in &blobs[1..] {
        let d = sha256(data);
        rt.block_on(async {
            let (replies, end) =
                stream(vec![msg(api::WriteAction::Write, name, 0, data, &d)]).await;
            end.unwrap();
            assert_eq!(replies.last().unwrap().offset as usize, data.len());
        });
    }
    proxy.cut_writes(true);
    for (i, (name, data)) in blobs.iter().enumerate() {
        let d = sha256(data);
        let t = Instant::now();
        let commit = if i == 0 {
            msg(api::WriteAction::Commit, name, 0, data, &d)
        } else {
            msg(api::WriteAction::Commit, name, data.len(), b"", &d)
        };
        let (_, end) = rt.block_on(stream(vec![commit]));
        let e = end.expect_err("a commit S3 cannot take");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{name}: {e:?}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "bounded retries, took {:?}",
            t.elapsed()
        );
    }
    proxy.cut_writes(false);
    for (name, data) in &blobs {
        let d = sha256(data);
        rt.block_on(async {
            // The ingest is where the client left it: STAT, then COMMIT.
            let (replies, end) = stream(vec![msg(api::WriteAction::Stat, name, 0, b"", &d)]).await;
            end.unwrap();
            assert_eq!(
                replies[0].offset as usize,
                data.len(),
                "{name} kept its bytes"
            );
            assert_eq!(replies[0].digest, d);
            let (replies, end) = stream(vec![msg(
                api::WriteAction::Commit,
                name,
                data.len(),
                b"",
                &d,
            )])
            .await;
            end.unwrap_or_else(|e| panic!("{name} commits once S3 is back: {e:?}"));
            assert_eq!(replies.last().unwrap().digest, d);
            // And reads back whole.
            let ch = hoard::grpc::connect_socket(&data_dir.join("hoard.sock"))
                .await
                .unwrap();
            let mut s = ContentClient::new(ch)
                .read(api::ReadContentRequest {
                    digest: d.clone(),
                    offset: 0,
                    size: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut got = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                got.extend_from_slice(&m.data);
            }
            assert!(got == *data, "{name} reads back as written");
        });
        assert_eq!(
            s3.list(
                "ingests",
                &format!("hoard/blobs/sha256/{}/{}", &d[7..9], &d[7..])
            )
            .len(),
            1,
            "{name} is in the bucket"
        );
    }
}
