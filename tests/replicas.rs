//! Several hoard replicas on one bucket of a real S3-protocol server: read-after-write across
//! replicas, concurrent tag updates, the collector racing pushes on purpose (both orders of the
//! claim handshake), the collector's lease moving when its holder dies, replicas whose clocks
//! are hours apart, a replica killed mid-push, S3 going away and coming back, a service that
//! ignores conditional writes, and a replica started fresh on a bucket of many blobs.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::s3::{store_env_at, S3Server};
use common::*;

const K: usize = 1024;

/// Timings for tests: replicas re-list every 2 s, the collector waits 1 s between announcing
/// and deleting, and its lease lasts 6 s.
const QUICK: &[(&str, &str)] = &[
    ("REFRESH_INTERVAL", "2s"),
    ("DELETE_DELAY", "1s"),
    ("GC_LEASE", "6s"),
];

/// Environment for a replica of `kind` on `bucket` at `endpoint`, with QUICK timings, `leaf`
/// S3 keys and other variables.
fn replica_env(
    kind: StoreKind,
    endpoint: &str,
    bucket: &str,
    leaf: &[(&str, &str)],
    other: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut e = store_env_at(kind, endpoint, bucket);
    let prefix = if kind == StoreKind::Tiered {
        "HOARD_STORE_SLOW_"
    } else {
        "HOARD_STORE_"
    };
    for (k, v) in QUICK.iter().chain(leaf) {
        e.push((format!("{prefix}{k}"), v.to_string()));
    }
    for (k, v) in other {
        e.push((k.to_string(), v.to_string()));
    }
    e
}

fn start(dir: &Path, name: &str, flags: &[&str], env: &[(String, String)]) -> Hoard {
    let h = Hoard::start_env(&dir.join(name), flags, env);
    wait_ready(&h);
    h
}

fn wait_ready(h: &Hoard) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let r = h.req("GET", "/readyz").send();
        if r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < end,
            "not ready: {}\nlog:\n{}",
            r.text(),
            h.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a status page line says after `key: `.
fn status_line(h: &Hoard, key: &str) -> String {
    status_page(h)
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": ").map(str::to_owned))
        .unwrap_or_default()
}

fn wait_collector(h: &Hoard) {
    wait_until(
        "the replica to hold the collector's lease",
        Duration::from_secs(30),
        || status_line(h, "collector") == "this replica",
    );
}

fn head_digest(h: &Hoard, repo: &str, reference: &str) -> Option<String> {
    let r = h
        .req("HEAD", &format!("/v2/{repo}/manifests/{reference}"))
        .header("Accept", MANIFEST_TYPES)
        .send();
    match r.status {
        200 => r.header("docker-content-digest").map(str::to_owned),
        404 => None,
        s => panic!("HEAD {repo}:{reference} answered {s}"),
    }
}

/// A manifest naming a config and layers that are already pushed (no pushes of its own).
fn manifest_of(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
    let layers: Vec<(String, usize)> = layers.iter().map(|l| (sha256(l), l.len())).collect();
    image_manifest((&sha256(config), config.len(), CACHE_CONFIG), &layers)
}

#[test]
fn a_push_through_one_replica_is_pulled_through_another_at_once() {
    let s3 = S3Server::start();
    s3.create_bucket("farm");
    let tmp = tempfile::tempdir().unwrap();
    let a = start(
        tmp.path(),
        "a",
        &[],
        &replica_env(StoreKind::S3, &s3.endpoint(), "farm", &[], &[]),
    );
    let b = start(
        tmp.path(),
        "b",
        &[],
        &replica_env(StoreKind::Tiered, &s3.endpoint(), "farm", &[], &[]),
    );

    // A blob through A: B sees it at once (its cache never heard of it).
    let layer = bytes(1, 300 * K);
    let d = push_blob(&a, "app", &layer);
    let r = b.req("HEAD", &format!("/v2/app/blobs/{d}")).send();
    assert_eq!(r.status, 200);
    let r = b.req("GET", &format!("/v2/app/blobs/{d}")).send();
    assert!(r.status == 200 && r.body == layer);
    assert_eq!(
        blob_status(&b, "other", &d),
        404,
        "visible only where pushed"
    );

    // An image through A pulls whole through B.
    let base = bytes(2, 64 * K);
    let v1 = push_image(&a, "app", "v1", Some(&base), &[bytes(3, 32 * K)]);
    assert!(pull(&b, "app", "v1"));
    pull_all(&b, "app", &v1.manifest, "a push through the other replica");

    // A HEAD by tag on a replica costs one S3 request: the tag, read fresh.
    let before = b.s3_requests();
    assert_eq!(head_digest(&b, "app", "v1").as_deref(), Some(&*v1.manifest));
    assert!(
        b.s3_requests() - before <= 1,
        "a HEAD by tag took more than one S3 request"
    );

    // The tag moved through B: A answers with the new manifest at once.
    let v1b = push_image(&b, "app", "v1", Some(&base), &[bytes(4, 32 * K)]);
    assert_eq!(
        head_digest(&a, "app", "v1").as_deref(),
        Some(&*v1b.manifest)
    );
    assert!(pull(&a, "app", "v1"));
    // The earlier manifest stays pullable by digest through either.
    pull_all(&b, "app", &v1.manifest, "the tag moved");

    // Listings: tags, catalog, referrers.
    push_image(&b, "team/svc", "main", None, &[bytes(5, 8 * K)]);
    let tags = a.req("GET", "/v2/app/tags/list").send().json();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    let cat = a.req("GET", "/v2/_catalog").send().json();
    assert_eq!(cat["repositories"], serde_json::json!(["app", "team/svc"]));
    let cfg = br#"{"artifact":true}"#;
    push_blob(&a, "app", cfg);
    let referrer = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.example.sbom", "digest": sha256(cfg), "size": cfg.len()},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": v1b.manifest, "size": 1},
    }))
    .unwrap();
    let r = put_manifest(&a, "app", &sha256(&referrer), OCI_MANIFEST, &referrer);
    assert_eq!(r.status, 201, "{}", r.text());
    let refs = b
        .req("GET", &format!("/v2/app/referrers/{}", v1b.manifest))
        .send()
        .json();
    assert_eq!(refs["manifests"][0]["digest"], sha256(&referrer));

    // A mount through B of a blob pushed through A, seen through A.
    let r = b
        .req(
            "POST",
            &format!("/v2/team/svc/blobs/uploads/?mount={d}&from=app"),
        )
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(blob_status(&a, "team/svc", &d), 206);

    // A tag deleted through A is gone through B at once.
    let r = a.req("DELETE", "/v2/app/manifests/v1").send();
    assert_eq!(r.status, 202);
    assert_eq!(head_digest(&b, "app", "v1"), None);
    let tags = b.req("GET", "/v2/app/tags/list").send().json();
    assert_eq!(tags["tags"], serde_json::json!([]));
    assert_invariant_1(&a, "pushes through two replicas");
    assert_invariant_1(&b, "pushes through two replicas");
}

#[test]
fn sixteen_tag_updates_at_once_from_two_replicas_lose_none() {
    let s3 = S3Server::start();
    s3.create_bucket("race");
    let tmp = tempfile::tempdir().unwrap();
    let env = replica_env(StoreKind::S3, &s3.endpoint(), "race", &[], &[]);
    let a = start(tmp.path(), "a", &[], &env);
    let b = start(tmp.path(), "b", &[], &env);
    let addrs = [a.addr, b.addr];
    let pushed: Arc<Mutex<Vec<String>>> = Arc::default();
    let last: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec![String::new(); 16]));
    let threads: Vec<_> = (0..16usize)
        .map(|i| {
            let (addr, pushed, last) = (addrs[i % 2], pushed.clone(), last.clone());
            std::thread::spawn(move || {
                let f = Hoard::req_at(addr);
                for round in 0..4u64 {
                    let layer = bytes(10_000 + i as u64 * 100 + round, 2 * K);
                    let config = format!("{{\"writer\":{i},\"round\":{round}}}");
                    for data in [&layer[..], config.as_bytes()] {
                        let r = f(
                            "POST",
                            &format!("/v2/app/blobs/uploads/?digest={}", sha256(data)),
                            &[],
                            data.to_vec(),
                        );
                        assert_eq!(r.status, 201, "{}", r.text());
                    }
                    let body = manifest_of(config.as_bytes(), &[&layer]);
                    let d = sha256(&body);
                    // Its own tag, and one tag every writer moves at the same moment.
                    for tag in [format!("t{i}"), "shared".to_owned()] {
                        let r = f(
                            "PUT",
                            &format!("/v2/app/manifests/{tag}"),
                            &[("Content-Type", OCI_MANIFEST)],
                            body.clone(),
                        );
                        assert_eq!(r.status, 201, "{}", r.text());
                    }
                    pushed.lock().unwrap().push(d.clone());
                    last.lock().unwrap()[i] = d;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let last = last.lock().unwrap().clone();
    let pushed = pushed.lock().unwrap().clone();
    for h in [&a, &b] {
        for (i, want) in last.iter().enumerate() {
            assert_eq!(
                head_digest(h, "app", &format!("t{i}")).as_deref(),
                Some(want.as_str()),
                "t{i} lost its last update"
            );
            pull_all(h, "app", &format!("t{i}"), "concurrent tag updates");
        }
    }
    let shared_a = head_digest(&a, "app", "shared").unwrap();
    assert_eq!(head_digest(&b, "app", "shared").unwrap(), shared_a);
    assert!(
        pushed.contains(&shared_a),
        "shared points at a pushed manifest"
    );
    assert_eq!(s3.list("race", "hoard/repos/app/_tags/").len(), 17);
    let races: u64 = [&a, &b]
        .iter()
        .map(|h| h.status_number("tag writes retried after a lost race"))
        .sum();
    eprintln!("tag writes retried after a lost race: {races}");
    assert_invariant_1(&a, "concurrent tag updates");
}

#[test]
fn the_collector_racing_pushes_on_purpose_never_leaves_a_tag_dangling() {
    let s3 = S3Server::start();
    s3.create_bucket("gcrace");
    let tmp = tempfile::tempdir().unwrap();
    let quick_gc = ["--orphan-grace", "1s", "--gc-interval", "300ms"];
    let endpoint = s3.endpoint();
    // The collector pauses 5 s after announcing (on top of the 1 s delay), so pushes can
    // meet its announcement; C pauses 12 s between checking the bucket and committing, so a
    // collection plans while C's claim is live.
    let a = start(
        tmp.path(),
        "a",
        &quick_gc,
        &replica_env(
            StoreKind::S3,
            &endpoint,
            "gcrace",
            &[],
            &[("HOARD_TEST_PAUSE", "gc-after-announce=5000")],
        ),
    );
    wait_collector(&a);
    let b = start(
        tmp.path(),
        "b",
        &quick_gc,
        &replica_env(StoreKind::S3, &endpoint, "gcrace", &[], &[]),
    );
    let c = start(
        tmp.path(),
        "c",
        &quick_gc,
        &replica_env(
            StoreKind::S3,
            &endpoint,
            "gcrace",
            &[],
            &[("HOARD_TEST_PAUSE", "push-before-commit=12000")],
        ),
    );
    let a_id = status_line(&a, "replica");
    assert_eq!(status_line(&b, "collector"), a_id);

    // 1. The announcement first: B pushes layers, they become orphans, the collector announces
    //    them; then B pushes the manifest that needs them. B's push claims them, sees the
    //    announcement and waits it out; the collector, listing claims, spares them.
    let layer = bytes(100, 32 * K);
    let config = br#"{"race":"announcement first"}"#;
    push_blob(&b, "race", &layer);
    push_blob(&b, "race", config);
    wait_until(
        "the collector to announce the orphaned layers",
        Duration::from_secs(20),
        || a.status_number("collections pending") > 0,
    );
    let body = manifest_of(config, &[&layer]);
    let r = put_manifest(&b, "race", "r1", OCI_MANIFEST, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(b.status_number("pushes that waited for a collection") >= 1);
    for h in [&a, &b, &c] {
        assert!(pull(h, "race", "r1"), "r1 dangles");
    }
    // (The layer at least: the config, pushed a moment later, may have been a pass younger.)
    assert!(a.status_number("collected content spared") >= 1);

    // 2. The claim first: C checks the bucket, then holds its claim 12 s before committing;
    //    meanwhile its layers become orphans and the collector plans them. It must spare them.
    let spared_before = a.status_number("collected content spared");
    let layer2 = bytes(101, 32 * K);
    let config2 = br#"{"race":"claim first"}"#;
    push_blob(&c, "race", &layer2);
    push_blob(&c, "race", config2);
    let body2 = manifest_of(config2, &[&layer2]);
    let r = put_manifest(&c, "race", "r2", OCI_MANIFEST, &body2);
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        a.status_number("collected content spared") > spared_before,
        "the collector never met C's claim:\n{}",
        status_page(&a)
    );
    for h in [&a, &b, &c] {
        assert!(pull(h, "race", "r2"), "r2 dangles");
    }

    // 3. What nothing claims does go, and every replica hears of it.
    let lost = bytes(102, 16 * K);
    let lost_d = push_blob(&b, "race", &lost);
    wait_until(
        "the orphan to be collected",
        Duration::from_secs(30),
        || blob_status(&b, "race", &lost_d) == 404,
    );
    assert!(!s3
        .list("gcrace", "hoard/blobs/")
        .iter()
        .any(|(k, _)| k.ends_with(lost_d.trim_start_matches("sha256:"))));

    // 4. An index pushed over a child manifest the collector announced (with its layer): the
    //    index's claim names the child, and the child's layer stays with it.
    let layer3 = bytes(103, 16 * K);
    let config3 = br#"{"race":"index"}"#;
    push_blob(&b, "race", &layer3);
    push_blob(&b, "race", config3);
    let child = manifest_of(config3, &[&layer3]);
    let child_d = sha256(&child);
    let r = put_manifest(&b, "race", &child_d, OCI_MANIFEST, &child);
    assert_eq!(r.status, 201, "{}", r.text());
    // While announced, a HEAD by digest (a client asking whether it may reference it) is a
    // miss on every replica, so a client pushing an index pushes the child again first.
    wait_until(
        "the announced child to be a miss for HEAD",
        Duration::from_secs(20),
        || {
            c.req("HEAD", &format!("/v2/race/manifests/{child_d}"))
                .send()
                .status
                == 404
        },
    );
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child_d, "size": child.len()}],
    }))
    .unwrap();
    let r = put_manifest(&b, "race", "idx", OCI_INDEX, &index);
    assert_eq!(r.status, 201, "{}", r.text());
    for h in [&a, &b, &c] {
        pull_all(h, "race", "idx", "an index pushed over an announced child");
    }

    // 5. A stream of pushes reusing orphans while the collector runs: every tag pulls whole.
    let mut kept = Vec::new();
    for i in 0..12u64 {
        let l = bytes(200 + i, 8 * K);
        let cfg = format!("{{\"stream\":{i}}}");
        push_blob(&b, "stream", &l);
        push_blob(&b, "stream", cfg.as_bytes());
        std::thread::sleep(Duration::from_millis(300 * (i % 5)));
        let body = manifest_of(cfg.as_bytes(), &[&l]);
        let r = put_manifest(&b, "stream", &format!("s{i}"), OCI_MANIFEST, &body);
        // Refused (the layer went before the claim) or kept whole: never a dangling tag.
        assert!(
            r.status == 201 || r.code() == "MANIFEST_BLOB_UNKNOWN",
            "{}",
            r.text()
        );
        if r.status == 201 {
            kept.push(format!("s{i}"));
        }
    }
    for t in &kept {
        for h in [&a, &b] {
            assert!(pull(h, "stream", t), "stream:{t} dangles");
        }
    }
    assert_invariant_1(&a, "collections racing pushes");
    assert_invariant_1(&b, "collections racing pushes");
}

#[test]
fn the_collectors_lease_moves_when_its_holder_dies() {
    let s3 = S3Server::start();
    s3.create_bucket("lease");
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--orphan-grace", "1s", "--gc-interval", "300ms"];
    let env = replica_env(StoreKind::S3, &s3.endpoint(), "lease", &[], &[]);
    let mut a = start(tmp.path(), "a", &flags, &env);
    wait_collector(&a);
    let b = start(tmp.path(), "b", &flags, &env);
    let a_id = status_line(&a, "replica");
    wait_until("B to name the collector", Duration::from_secs(20), || {
        status_line(&b, "collector") == a_id
    });
    wait_until("B to see A alive", Duration::from_secs(20), || {
        status_line(&b, "replicas alive") == "2"
    });
    let r = b.req("POST", "/admin/gc").send();
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains(&a_id),
        "names the collector: {}",
        r.text()
    );

    // The holder dies without a word: B takes the lease once it expires (S3 clock).
    a.kill9();
    let killed = Instant::now();
    wait_collector(&b);
    eprintln!(
        "the lease moved {:?} after the holder died",
        killed.elapsed()
    );
    let orphan = bytes(1, 8 * K);
    let d = push_blob(&b, "app", &orphan);
    wait_until("B to collect an orphan", Duration::from_secs(30), || {
        blob_status(&b, "app", &d) == 404
    });

    // A comes back: B keeps the lease, and A says who has it.
    let a = start(tmp.path(), "a", &flags, &env);
    let b_id = status_line(&b, "replica");
    wait_until("A to name the collector", Duration::from_secs(20), || {
        status_line(&a, "collector") == b_id
    });
    assert_eq!(status_line(&b, "collector"), "this replica");
}

#[test]
fn replicas_hours_apart_age_everything_by_the_s3_clock() {
    let s3 = S3Server::start();
    s3.create_bucket("skew");
    let tmp = tempfile::tempdir().unwrap();
    let ttl = [
        "--ttl",
        "12s",
        "--clock-skew-tolerance",
        "0s",
        "--gc-interval",
        "300ms",
    ];
    let env = |offset: &str| {
        replica_env(
            StoreKind::S3,
            &s3.endpoint(),
            "skew",
            &[],
            &[("HOARD_CLOCK_OFFSET", offset)],
        )
    };
    // The collector's clock is two hours ahead; the pushing replica's two hours behind.
    let ahead = start(tmp.path(), "ahead", &ttl, &env("+2h"));
    wait_collector(&ahead);
    let behind = start(tmp.path(), "behind", &ttl, &env("-2h"));
    let right = start(tmp.path(), "right", &ttl, &env("0s"));
    for (h, want) in [(&ahead, -7_200_000i64), (&behind, 7_200_000)] {
        let shown: i64 = status_line(h, "s3 clock offset")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("the S3 clock offset on the status page");
        assert!(
            (shown - want).abs() < 5_000,
            "offset shown {shown}, want {want}"
        );
        wait_until("the skew warning", Duration::from_secs(15), || {
            h.log().contains("clock is off from the S3 service's")
        });
    }
    let pushed = Instant::now();
    push_image(&behind, "app", "cold", None, &[bytes(1, 4 * K)]);
    push_image(&right, "app", "hot", None, &[bytes(2, 4 * K)]);
    // Well inside the TTL, with every pass of the collector run: nothing expired (by the
    // collector's clock the cold push is four hours old).
    while pushed.elapsed() < Duration::from_secs(6) {
        assert!(pull(&behind, "app", "hot"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(pull(&right, "app", "cold"), "a fresh tag expired early");
    // Past the TTL: the cold tag goes; the hot one, read through the replica behind, stays.
    let mut cold_gone = false;
    while pushed.elapsed() < Duration::from_secs(60) && !cold_gone {
        assert!(
            pull(&behind, "app", "hot"),
            "a tag read every second expired"
        );
        // (A tag list reads nothing: a HEAD here would keep the tag young.)
        let tags = right.req("GET", "/v2/app/tags/list").send().json();
        cold_gone = !tags["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "cold"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(cold_gone, "the cold tag never expired");
    assert!(
        pushed.elapsed() >= Duration::from_secs(12),
        "expired before its TTL"
    );
    assert!(pull(&ahead, "app", "hot"));
    assert_invariant_1(&right, "TTL across skewed replicas");
}

#[test]
fn a_replica_killed_mid_push_loses_nothing_acknowledged() {
    let s3 = S3Server::start();
    s3.create_bucket("kill");
    let tmp = tempfile::tempdir().unwrap();
    let env = replica_env(
        StoreKind::S3,
        &s3.endpoint(),
        "kill",
        &[("PART_SIZE", "5MiB")],
        &[],
    );
    let mut a = start(tmp.path(), "a", &[], &env);
    let b = start(tmp.path(), "b", &[], &env);
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let threads: Vec<_> = (0..3u64)
        .map(|w| {
            let (addr, acked) = (a.addr, acked.clone());
            std::thread::spawn(move || {
                let f = Hoard::try_req_at(addr);
                for i in 0.. {
                    // Every third image has a layer past the part size: a multipart upload.
                    let n = if i % 3 == 0 { 6 << 20 } else { 16 * K };
                    let layer = bytes(w * 1000 + i, n);
                    let config = format!("{{\"w\":{w},\"i\":{i}}}");
                    let mut ok = true;
                    for data in [&layer[..], config.as_bytes()] {
                        let r = f(
                            "POST",
                            &format!("/v2/app/blobs/uploads/?digest={}", sha256(data)),
                            &[],
                            data.to_vec(),
                        );
                        ok &= r.is_ok_and(|r| r.status == 201);
                    }
                    if !ok {
                        return;
                    }
                    let body = manifest_of(config.as_bytes(), &[&layer]);
                    let tag = format!("w{w}-{i}");
                    match f(
                        "PUT",
                        &format!("/v2/app/manifests/{tag}"),
                        &[("Content-Type", OCI_MANIFEST)],
                        body.clone(),
                    ) {
                        Ok(r) if r.status == 201 => {
                            acked.lock().unwrap().push((tag, sha256(&body)))
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    wait_until("a few pushes", Duration::from_secs(60), || {
        acked.lock().unwrap().len() >= 6
    });
    a.kill9();
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 6);
    // Everything acknowledged through the dead replica pulls whole through the other.
    for (tag, d) in &acked {
        assert_eq!(head_digest(&b, "app", tag).as_deref(), Some(d.as_str()));
        assert!(pull(&b, "app", tag), "{tag} lost with the replica");
    }
    // And through the dead one restarted.
    let a = start(tmp.path(), "a", &[], &env);
    for (tag, _) in &acked {
        assert!(pull(&a, "app", tag));
    }
    assert_invariant_1(&b, "a replica killed mid-push");
}

#[test]
fn s3_gone_and_back_mid_run_answers_503_then_recovers_without_a_restart() {
    let s3 = S3Server::start();
    s3.create_bucket("flaky");
    let proxy = Proxy::start(s3.addr());
    let tmp = tempfile::tempdir().unwrap();
    let leaf = [("TIMEOUT", "1s"), ("RETRIES", "2")];
    let a = start(
        tmp.path(),
        "a",
        &[],
        &replica_env(StoreKind::S3, &proxy.endpoint(), "flaky", &leaf, &[]),
    );
    let b = start(
        tmp.path(),
        "b",
        &[],
        &replica_env(StoreKind::Tiered, &proxy.endpoint(), "flaky", &leaf, &[]),
    );
    push_image(&a, "app", "v1", None, &[bytes(1, 64 * K)]);
    assert!(pull(&b, "app", "v1"), "B's disk tier fills");

    proxy.go_down();
    let fresh = bytes(2, 16 * K);
    let r = a
        .req(
            "POST",
            &format!("/v2/app/blobs/uploads/?digest={}", sha256(&fresh)),
        )
        .body(fresh.clone())
        .send();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), "UNAVAILABLE");
    assert!(
        pull(&b, "app", "v1"),
        "the disk tier keeps serving what it holds"
    );
    for h in [&a, &b] {
        wait_until("not ready", Duration::from_secs(30), || {
            h.req("GET", "/readyz").send().status == 503
        });
    }

    proxy.come_back();
    wait_ready(&a);
    wait_ready(&b);
    let r = a
        .req(
            "POST",
            &format!("/v2/app/blobs/uploads/?digest={}", sha256(&fresh)),
        )
        .body(fresh.clone())
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    push_image(&b, "app", "v2", None, &[bytes(3, 16 * K)]);
    assert!(pull(&a, "app", "v2"));
    assert_invariant_1(&a, "S3 gone and back");
}

#[test]
fn a_service_that_ignores_conditional_writes_is_refused_unless_single_writer() {
    let s3 = S3Server::start();
    s3.create_bucket("nocond");
    let proxy = Proxy::start(s3.addr());
    proxy.strip_conditions(true);
    let tmp = tempfile::tempdir().unwrap();
    let env = replica_env(StoreKind::S3, &proxy.endpoint(), "nocond", &[], &[]);

    // Refused at start, naming what is missing and the way out.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("refused"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("running hoard");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ignores conditional writes"), "{err}");
    assert!(err.contains("If-None-Match"), "{err}");
    assert!(err.contains("single_writer"), "{err}");

    // Told it runs alone: it does, loudly, and a second one is kept out by the writer lease.
    let mut single = env.clone();
    single.push(("HOARD_STORE_SINGLE_WRITER".into(), "true".into()));
    let mut one = start(tmp.path(), "one", &[], &single);
    assert!(one.log().contains("SINGLE WRITER"), "{}", one.log());
    assert_eq!(
        status_line(&one, "conditional writes"),
        "ignored by the service (single writer)"
    );
    push_image(&one, "app", "v1", None, &[bytes(1, 4 * K)]);
    assert!(pull(&one, "app", "v1"));
    let two = Hoard::start_env(&tmp.path().join("two"), &[], &single);
    wait_until(
        "the second to say who holds the bucket",
        Duration::from_secs(20),
        || {
            let r = two.req("GET", "/readyz").send();
            r.status == 503 && r.text().contains("in use by another hoard")
        },
    );
    // A clean stop hands the bucket over at once.
    assert!(one.stop().success());
    wait_ready(&two);
    assert!(pull(&two, "app", "v1"));
}

#[test]
fn a_fresh_replica_on_a_bucket_of_many_blobs_serves_at_once() {
    let s3 = S3Server::start();
    s3.create_bucket("big");
    let blobs = 4000;
    let fill = std::process::Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args([
            "bench-fill-s3",
            "--endpoint",
            &s3.endpoint(),
            "--bucket",
            "big",
        ])
        .args(["--prefix", "hoard/", "--blobs", &blobs.to_string()])
        .args(["--per-manifest", "100"])
        .output()
        .expect("running hoard bench-fill-s3");
    assert!(
        fill.status.success(),
        "{}",
        String::from_utf8_lossy(&fill.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let env = replica_env(StoreKind::S3, &s3.endpoint(), "big", &[], &[]);
    // A new machine: nothing cached. It serves before it has listed the bucket.
    let began = Instant::now();
    let h = start(tmp.path(), "fresh", &[], &env);
    pull_all(&h, "fill/r0", "t7", "a fresh start");
    eprintln!(
        "a fresh replica on {blobs} blobs served a pull {:?} after it was started",
        began.elapsed()
    );
    wait_until("the first re-listing", Duration::from_secs(120), || {
        h.status_number("bucket re-listings") >= 1
    });
    // 4000 layers, 40 manifests' bytes.
    assert_eq!(h.status_number("blobs"), blobs + 40);
    assert_eq!(h.status_number("tags"), 40);
    // Restarted, it starts from its cache (no listing first) and serves at once again.
    let mut h = h;
    assert!(h.stop().success());
    let h = start(tmp.path(), "fresh", &[], &env);
    assert_eq!(h.status_number("tags"), 40);
    pull_all(&h, "fill/r0", "t39", "a restart");
}

#[test]
fn a_tag_pushed_again_while_the_collector_expires_it_stays() {
    let s3 = S3Server::start();
    s3.create_bucket("again");
    let tmp = tempfile::tempdir().unwrap();
    let ttl = [
        "--ttl",
        "6s",
        "--clock-skew-tolerance",
        "0s",
        "--gc-interval",
        "300ms",
    ];
    // The collector pauses 4 s between its plan and its first delete.
    let a = start(
        tmp.path(),
        "a",
        &ttl,
        &replica_env(
            StoreKind::S3,
            &s3.endpoint(),
            "again",
            &[],
            &[("HOARD_TEST_PAUSE", "gc-after-plan=4000")],
        ),
    );
    wait_collector(&a);
    let b = start(
        tmp.path(),
        "b",
        &ttl,
        &replica_env(StoreKind::S3, &s3.endpoint(), "again", &[], &[]),
    );
    let layer = bytes(1, 8 * K);
    let config = br#"{"again":1}"#;
    push_blob(&b, "app", &layer);
    push_blob(&b, "app", config);
    let body = manifest_of(config, &[&layer]);
    assert_eq!(
        put_manifest(&b, "app", "cache", OCI_MANIFEST, &body).status,
        201
    );
    // Idle past its TTL: the collector plans its expiry and pauses before deleting it...
    let paused = a.log().matches("gc-after-plan").count();
    wait_until(
        "the collector to plan the expiry",
        Duration::from_secs(30),
        || a.log().matches("gc-after-plan").count() > paused,
    );
    // ...while a build exports the very same cache again (same bytes, same digest).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        put_manifest(&b, "app", "cache", OCI_MANIFEST, &body).status,
        201
    );
    // The collector's delete is conditional on the tag it read; the new write differs. (Checked
    // after the collector's delete and well inside the TTL the re-push started again.)
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        head_digest(&b, "app", "cache").as_deref(),
        Some(&*sha256(&body)),
        "a tag pushed again was deleted by the collector"
    );
    pull_all(&a, "app", "cache", "a re-push during an expiry");
}

#[test]
fn a_blob_delete_racing_a_push_never_breaks_the_pushed_tag() {
    let s3 = S3Server::start();
    s3.create_bucket("delrace");
    let tmp = tempfile::tempdir().unwrap();
    let env = replica_env(StoreKind::S3, &s3.endpoint(), "delrace", &[], &[]);
    let a = start(tmp.path(), "a", &[], &env);
    let b = start(tmp.path(), "b", &[], &env);
    let config = br#"{"delete":"race"}"#;
    push_blob(&b, "app", config);
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..16u64 {
        let layer = bytes(500 + i, 4 * K);
        let d = push_blob(&b, "app", &layer);
        let body = manifest_of(config, &[&layer]);
        let tag = format!("t{i}");
        let (pa, pb) = (a.addr, b.addr);
        let pusher = std::thread::spawn(move || {
            let f = Hoard::req_at(pb);
            f(
                "PUT",
                &format!("/v2/app/manifests/{tag}"),
                &[("Content-Type", OCI_MANIFEST)],
                body,
            )
            .status
        });
        let deleter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(i % 4 * 5));
            Hoard::req_at(pa)("DELETE", &format!("/v2/app/blobs/{d}"), &[], Vec::new()).status
        });
        let (put, del) = (pusher.join().unwrap(), deleter.join().unwrap());
        *outcomes.entry((put, del)).or_insert(0) += 1;
        if put == 201 {
            for h in [&a, &b] {
                assert!(
                    pull(h, "app", &format!("t{i}")),
                    "t{i} dangles (delete {del})"
                );
            }
        }
    }
    eprintln!("(manifest PUT, blob DELETE) outcomes: {outcomes:?}");
    assert_invariant_1(&a, "deletes racing pushes");
    assert_invariant_1(&b, "deletes racing pushes");
}

/// A DELETE by digest removes the tags that named that manifest when it was asked for, and no
/// tag another push has moved to something else meanwhile.
#[test]
fn a_delete_by_digest_leaves_a_tag_moved_on_meanwhile() {
    let s3 = S3Server::start();
    s3.create_bucket("delmove");
    let tmp = tempfile::tempdir().unwrap();
    let env = replica_env(StoreKind::S3, &s3.endpoint(), "delmove", &[], &[]);
    let slow_env = replica_env(
        StoreKind::S3,
        &s3.endpoint(),
        "delmove",
        &[],
        &[("HOARD_TEST_PAUSE", "delete-before-tags=3000")],
    );
    let a = start(tmp.path(), "a", &[], &slow_env);
    let b = start(tmp.path(), "b", &[], &env);
    let config = br#"{"delete":"moved"}"#;
    let (old_layer, new_layer) = (bytes(600, 4 * K), bytes(601, 4 * K));
    for l in [&old_layer, &new_layer] {
        push_blob(&b, "app", l);
    }
    push_blob(&b, "app", config);
    let old = manifest_of(config, &[&old_layer]);
    let new = manifest_of(config, &[&new_layer]);
    for t in ["latest", "stable"] {
        assert_eq!(put_manifest(&b, "app", t, OCI_MANIFEST, &old).status, 201);
    }
    let old_d = sha256(&old);
    let pa = a.addr;
    let deleter = std::thread::spawn(move || {
        Hoard::req_at(pa)(
            "DELETE",
            &format!("/v2/app/manifests/{old_d}"),
            &[],
            Vec::new(),
        )
        .status
    });
    wait_until(
        "the delete to pause before its tags",
        Duration::from_secs(10),
        || a.log().contains("delete-before-tags"),
    );
    // Moved while the delete is under way: it must stay.
    assert_eq!(
        put_manifest(&b, "app", "latest", OCI_MANIFEST, &new).status,
        201
    );
    assert_eq!(deleter.join().unwrap(), 202);
    for h in [&a, &b] {
        assert_eq!(
            head_digest(h, "app", "latest"),
            Some(sha256(&new)),
            "the moved tag survived"
        );
        assert!(pull(h, "app", "latest"));
        assert_eq!(head_digest(h, "app", "stable"), None, "the old tag went");
    }
    assert_invariant_1(&a, "a delete by digest racing a tag move");
    assert_invariant_1(&b, "a delete by digest racing a tag move");
}
