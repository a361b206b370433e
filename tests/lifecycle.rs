//! The lifecycle against the real binary: the size bound evicts least recently pulled cache
//! manifests whole while shared layers stay, hard-limit and disk-full refusals, TTL with a
//! wall clock stepped across restarts, orphan grace with an export in progress, gc and verify
//! commands, and a kill -9 loop.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const K: usize = 1024;

#[test]
fn size_bound_evicts_least_recently_pulled_cache_manifests_whole_and_keeps_shared_layers() {
    // 3 MiB bound: high mark 2.7 MiB, low 2.4 MiB. Each image adds 512 KiB of its own.
    let h = Hoard::start(&[
        "--max-size",
        "3MiB",
        "--orphan-grace",
        "1h",
        "--gc-interval",
        "1h",
    ]);
    let base = bytes(1, 256 * K);
    let mut images = Vec::new();
    for i in 0..4u64 {
        let unique = [bytes(100 + i, 256 * K), bytes(200 + i, 256 * K)];
        images.push(push_image(
            &h,
            "app",
            &format!("cache-{i}"),
            Some(&base),
            &unique,
        ));
    }
    // Pull order sets recency: cache-2 is the least recently pulled, then cache-0.
    for i in [2, 0, 3, 1] {
        assert!(pull(&h, "app", &format!("cache-{i}")));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Image 4 crosses the high mark: the pass the upload wakes evicts cache-2.
    let unique = [bytes(104, 256 * K), bytes(204, 256 * K)];
    images.push(push_image(&h, "app", "cache-4", Some(&base), &unique));
    wait_until("cache-2 is evicted", Duration::from_secs(10), || {
        h.req("HEAD", "/v2/app/manifests/cache-2").send().status == 404
    });
    let unique = [bytes(105, 256 * K), bytes(205, 256 * K)];
    images.push(push_image(&h, "app", "cache-5", Some(&base), &unique));
    wait_until("cache-0 is evicted", Duration::from_secs(10), || {
        h.req("HEAD", "/v2/app/manifests/cache-0").send().status == 404
    });
    // Gone whole: manifest and every blob of its own. (On a shared bucket the collector
    // deletes the tag first and the rest a moment later, after its announcement.)
    for i in [0, 2] {
        let img = &images[i];
        wait_until(
            "the evicted manifest is gone",
            Duration::from_secs(10),
            || {
                h.req("GET", &format!("/v2/app/manifests/{}", img.manifest))
                    .send()
                    .status
                    == 404
            },
        );
        for d in &img.blobs[..1]
            .iter()
            .chain(&img.blobs[2..])
            .collect::<Vec<_>>()
        {
            // The collector deletes records, then blobs, then links: the manifest can be gone
            // a moment before its layers are.
            wait_until(
                &format!("{} of {} is gone", d, img.tag),
                Duration::from_secs(10),
                || blob_status(&h, "app", d) == 404,
            );
        }
    }
    // The shared base layer stays; every remaining tag pulls completely.
    assert_eq!(blob_status(&h, "app", &sha256(&base)), 206);
    for i in [1, 3, 4, 5] {
        assert!(
            pull(&h, "app", &format!("cache-{i}")),
            "cache-{i} must remain"
        );
    }
    let page = status_page(&h);
    assert!(
        page.contains("evictions reason=size repository=app tags=2 manifests=2"),
        "{page}"
    );
    assert!(h.log().contains("evicted"), "eviction is logged");
}

#[test]
fn a_write_that_cannot_fit_is_refused_with_507_naming_the_limit_and_harms_nothing() {
    let h = Hoard::start(&["--max-size", "1MiB", "--orphan-grace", "1h"]);
    let img = push_image(&h, "app", "keep", None, &[bytes(7, 300 * K)]);
    // Monolithic upload announcing 2 MiB: refused before a byte is stored.
    let big = bytes(8, 2 << 20);
    let r = h
        .req(
            "POST",
            &format!("/v2/app/blobs/uploads/?digest={}", sha256(&big)),
        )
        .header("Content-Type", "application/octet-stream")
        .body(big.clone())
        .send();
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.code(), "DENIED");
    assert!(r.text().contains("max_size"), "{}", r.text());
    // Chunked: the PATCH that would cross the bound is refused, and the session goes with its
    // data and reservation (a client retries with a new one).
    let r = h.req("POST", "/v2/app/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    let r = h
        .req("PATCH", &loc)
        .header("Content-Range", "0-99")
        .body(bytes(9, 100))
        .send();
    assert_eq!(r.status, 202);
    let r = h
        .req("PATCH", &loc)
        .header("Content-Range", &format!("100-{}", 100 + (2 << 20) - 1))
        .body(bytes(10, 2 << 20))
        .send();
    assert_eq!(r.status, 507, "{}", r.text());
    let r = h.req("GET", &loc).send();
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    assert!(status_page(&h).contains("uploads in progress: 0 (0 bytes reserved)"));
    // Nothing else harmed: the existing tag pulls, tmp/ holds nothing.
    assert!(pull(&h, "app", "keep"));
    assert_eq!(h.leftover_uploads(), 0);
    assert_eq!(
        h.req("HEAD", &format!("/v2/app/manifests/{}", img.manifest))
            .send()
            .status,
        200
    );
}

/// Mounts a small tmpfs (the test runs as root, as the README's test command does).
struct Tmpfs(std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            st.success(),
            "cannot mount a tmpfs for the disk-full test: run the suite as root (the README's test command does)"
        );
        Tmpfs(dir.path().to_path_buf(), dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_evicts_then_refuses_cleanly() {
    if disk_store_only("a_full_disk_evicts_then_refuses_cleanly") {
        return;
    }
    let fs = Tmpfs::new("48m");
    let data = fs.0.join("data");
    let mut h = Hoard::start_on(&data, &["--orphan-grace", "1h"]);
    // No max_size: the filesystem is the bound. 12 images × 8 MiB on 48 MiB.
    for i in 0..12u64 {
        push_image(
            &h,
            "app",
            &format!("v{i}"),
            None,
            &[bytes(300 + i, 8 << 20)],
        );
    }
    assert!(!pull(&h, "app", "v0"), "oldest evicted to make room");
    for i in 9..12 {
        assert!(pull(&h, "app", &format!("v{i}")));
    }
    // Larger than the whole filesystem: refused, with the reason.
    let big = bytes(400, 64 << 20);
    let r = h
        .req(
            "POST",
            &format!("/v2/app/blobs/uploads/?digest={}", sha256(&big)),
        )
        .body(big)
        .send();
    assert_eq!(r.status, 507, "{}", r.text());
    assert!(r.text().contains("filesystem"), "{}", r.text());
    // The OS's own ENOSPC mid-write: an upload whose space was checked at its start, then the
    // disk fills behind hoard's back while its body streams.
    let blob = bytes(401, 16 << 20);
    let filler = fs.0.join("filler");
    refused_when_disk_fills_mid_upload(&h, &blob, &filler);
    assert_eq!(leftover_uploads(&data), 0, "no partial upload left");
    assert_eq!(
        h.req("HEAD", &format!("/v2/app/blobs/{}", sha256(&blob)))
            .send()
            .status,
        404
    );
    let _ = std::fs::remove_file(&filler);
    for i in 9..12 {
        assert!(
            pull(&h, "app", &format!("v{i}")),
            "acknowledged tags survive a full disk"
        );
    }
    assert!(h.stop().success());
    let h = Hoard::start_on(&data, &[]);
    for i in 9..12 {
        assert!(pull(&h, "app", &format!("v{i}")));
    }
}

/// Starts a monolithic upload of `blob`, fills the filesystem with `filler` after its first MiB,
/// and expects 507 `DENIED` "storage is full" as soon as the write fails.
fn refused_when_disk_fills_mid_upload(h: &Hoard, blob: &[u8], filler: &std::path::Path) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    write!(
        s,
        "POST /v2/app/blobs/uploads/?digest={} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        sha256(blob),
        blob.len()
    )
    .unwrap();
    s.write_all(&blob[..1 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=100"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    // The rest from another thread: hoard answers as soon as the write fails.
    let mut w = s.try_clone().unwrap();
    let rest = blob[1 << 20..].to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&rest);
    });
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.code(), "DENIED");
    assert!(r.text().contains("storage is full"), "{}", r.text());
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let mut tail = Vec::new();
    let _ = s.read_to_end(&mut tail);
}

/// The same with the upload past `--direct-io-above`: the ENOSPC comes from the I/O thread's
/// O_DIRECT write and reaches the client the same way, leaving nothing behind.
#[test]
fn a_disk_filling_during_a_direct_write_is_refused_cleanly() {
    if disk_store_only("a_disk_filling_during_a_direct_write_is_refused_cleanly") {
        return;
    }
    let fs = Tmpfs::new("40m");
    let data = fs.0.join("data");
    let h = Hoard::start_on(&data, &["--direct-io-above", "1MiB"]);
    let kept = bytes(403, 3 << 20);
    let dk = push_blob(&h, "app", &kept);
    let blob = bytes(402, 24 << 20);
    let filler = fs.0.join("filler");
    refused_when_disk_fills_mid_upload(&h, &blob, &filler);
    let deadline = Instant::now() + Duration::from_secs(10);
    while leftover_uploads(&data) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(leftover_uploads(&data), 0, "no partial upload left");
    let head = |d: &str| h.req("HEAD", &format!("/v2/app/blobs/{d}")).send().status;
    assert_eq!(head(&sha256(&blob)), 404);
    assert_eq!(
        h.req("GET", &format!("/v2/app/blobs/{dk}")).send().body,
        kept
    );
    // Room again: the same upload goes through whole.
    std::fs::remove_file(&filler).unwrap();
    let d = push_blob(&h, "app", &blob);
    assert!(h.req("GET", &format!("/v2/app/blobs/{d}")).send().body == blob);
}

#[test]
fn ttl_survives_wall_clock_steps_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = [
        "--ttl",
        "1h",
        "--clock-skew-tolerance",
        "1m",
        "--gc-interval",
        "1s",
    ];
    let mut h = Hoard::start_on(&data, &args);
    for i in 0..5u64 {
        push_image(&h, "app", &format!("t{i}"), None, &[bytes(500 + i, 4 * K)]);
    }
    assert!(h.stop().success());
    // Restarted with the wall clock 3 hours ahead (past ttl + tolerance for every tag), then
    // 3 hours behind: no panic, no mass eviction, everything still pulls.
    for offset in ["+3h", "-3h", "+26h"] {
        let mut cmd_args: Vec<&str> = args.to_vec();
        cmd_args.extend(["--clock-offset", offset]);
        let mut h = Hoard::start_on(&data, &cmd_args);
        std::thread::sleep(Duration::from_millis(1500));
        let r = h.req("POST", "/admin/gc").send();
        assert_eq!(r.status, 200);
        assert!(
            r.text().contains("removed 0 tags"),
            "offset {offset}: {}",
            r.text()
        );
        for i in 0..5 {
            assert!(
                pull(&h, "app", &format!("t{i}")),
                "t{i} after a {offset} step"
            );
        }
        // New pushes work and are stamped by cache time, not the stepped wall clock.
        push_image(
            &h,
            "app",
            &format!("new{}", offset.len()),
            None,
            &[bytes(600, 4 * K)],
        );
        assert!(!h.log().contains("panicked"));
        assert!(h.stop().success(), "offset {offset}");
    }
    // Positive control: TTL does expire things as real time passes.
    let h = Hoard::start(&[
        "--ttl",
        "2s",
        "--clock-skew-tolerance",
        "0s",
        "--gc-interval",
        "500ms",
    ]);
    push_image(&h, "app", "short", None, &[bytes(700, 4 * K)]);
    // Polled through the tag list: a HEAD of the manifest would refresh it. The emptied
    // repository stays known: its list is empty, as after deleting its tags.
    wait_until("the tag expires", Duration::from_secs(15), || {
        let r = h.req("GET", "/v2/app/tags/list").send();
        r.status == 200 && r.json()["tags"].as_array().is_some_and(|t| t.is_empty())
    });
    // Counted by the pass that removed it (on S3 its deletes may still be finishing).
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let page = status_page(&h);
        if page.contains("evictions reason=ttl repository=app tags=1") {
            break;
        }
        assert!(Instant::now() < end, "{page}\n{}", h.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn orphan_grace_keeps_an_export_in_progress_and_collects_an_abandoned_one() {
    let h = Hoard::start(&["--orphan-grace", "3s", "--gc-interval", "300ms"]);
    // Export in progress: layers pushed, manifest comes later but within the grace.
    let layer = bytes(800, 8 * K);
    let ld = push_blob(&h, "app", &layer);
    let cfg = b"{}".to_vec();
    let cd = push_blob(&h, "app", &cfg);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(blob_status(&h, "app", &ld), 206);
    let body = image_manifest((&cd, cfg.len(), CACHE_CONFIG), &[(ld.clone(), layer.len())]);
    assert_eq!(
        put_manifest(&h, "app", "cache", OCI_MANIFEST, &body).status,
        201
    );
    // Abandoned export: blobs nothing will reference.
    let lost = push_blob(&h, "app", &bytes(801, 8 * K));
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        blob_status(&h, "app", &lost),
        404,
        "collected after the grace"
    );
    assert!(pull(&h, "app", "cache"), "referenced blobs stay");
    // A new export re-uses a layer of a manifest that just lost its tag: its HEAD claims it.
    assert_eq!(
        h.req("DELETE", "/v2/app/manifests/cache").send().status,
        202
    );
    assert_eq!(
        h.req("HEAD", &format!("/v2/app/blobs/{ld}")).send().status,
        200
    );
    std::thread::sleep(Duration::from_millis(1000));
    let cfg2 = b"{\"v\":2}".to_vec();
    let cd2 = push_blob(&h, "app", &cfg2);
    let body2 = image_manifest(
        (&cd2, cfg2.len(), CACHE_CONFIG),
        &[(ld.clone(), layer.len())],
    );
    assert_eq!(
        put_manifest(&h, "app", "cache", OCI_MANIFEST, &body2).status,
        201
    );
    std::thread::sleep(Duration::from_millis(4000));
    assert!(pull(&h, "app", "cache"));
    assert!(status_page(&h).contains("evictions reason=orphan repository=app"));
}

#[test]
fn gc_once_and_verify_offline_and_against_a_running_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let mut h = Hoard::start_on(&data, &["--orphan-grace", "1s"]);
    let keep = push_image(&h, "app", "keep", None, &[bytes(900, 16 * K)]);
    let stray = push_blob(&h, "app", &bytes(901, 16 * K));
    std::thread::sleep(Duration::from_millis(1500));
    // Against the running daemon (it holds the data directory): it runs the pass.
    let out = hoard_cmd(&["gc", "--once", "--data-dir", d, "--orphan-grace", "1s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reason=orphan repository=app"), "{text}");
    assert_eq!(blob_status(&h, "app", &stray), 404);
    let out = hoard_cmd(&["verify", "--data-dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(h.stop().success());

    // Offline: corrupt a layer; verify reports it and fails; --repair quarantines it and drops
    // the manifest that would dangle; the store then verifies clean and starts.
    let layer = &keep.blobs[1];
    let hex = layer.trim_start_matches("sha256:");
    corrupt_blob(&data, hex, b"rotten");
    let out = hoard_cmd(&["verify", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("corrupt {layer}")));
    let out = hoard_cmd(&["verify", "--repair", "--data-dir", d]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("dropped manifest app@"));
    assert!(is_quarantined(&data, hex));
    let out = hoard_cmd(&["verify", "--data-dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = hoard_cmd(&["gc", "--once", "--data-dir", d]);
    assert!(out.status.success());
    let h = Hoard::start_on(&data, &[]);
    assert!(
        !pull(&h, "app", "keep"),
        "the tag went with its corrupt layer, not left dangling"
    );
}

/// Pulls a tag whole: `Ok(false)` if the tag is gone, `Err` naming what does not pull.
fn try_pull(h: &Hoard, repo: &str, tag: &str) -> Result<bool, String> {
    let r = h
        .req("GET", &format!("/v2/{repo}/manifests/{tag}"))
        .header("Accept", OCI_MANIFEST)
        .send();
    if r.status == 404 {
        return Ok(false);
    }
    if r.status != 200 {
        return Err(format!("manifest: {} {}", r.status, r.text()));
    }
    let m = r.json();
    let mut digests = vec![m["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned()];
    for l in m["layers"].as_array().into_iter().flatten() {
        digests.push(l["digest"].as_str().unwrap_or_default().to_owned());
    }
    for d in digests {
        let b = h.req("GET", &format!("/v2/{repo}/blobs/{d}")).send();
        if b.status != 200 || sha256(&b.body) != d {
            return Err(format!("{d}: {}", b.status));
        }
    }
    Ok(true)
}

/// Pushes images in a loop from several threads; returns what was acknowledged.
fn churn(
    addr: std::net::SocketAddr,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(String, String)> {
    let req = Hoard::try_req_at(addr);
    let ok = |r: std::io::Result<Resp>| r.is_ok_and(|r| r.status == 201);
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let layer = bytes(seed * 1_000_000 + i, 64 * K + (i as usize % 7) * 1000);
        let ld = sha256(&layer);
        if !ok(req(
            "POST",
            &format!("/v2/crash/blobs/uploads/?digest={ld}"),
            &[],
            layer.clone(),
        )) {
            break;
        }
        let cfg = format!("{{\"seed\":{seed},\"i\":{i}}}").into_bytes();
        let cd = sha256(&cfg);
        if !ok(req(
            "POST",
            &format!("/v2/crash/blobs/uploads/?digest={cd}"),
            &[],
            cfg.clone(),
        )) {
            break;
        }
        let body = image_manifest((&cd, cfg.len(), CACHE_CONFIG), &[(ld, layer.len())]);
        let tag = format!("s{seed}-{i}");
        let r = req(
            "PUT",
            &format!("/v2/crash/manifests/{tag}"),
            &[("Content-Type", OCI_MANIFEST)],
            body.clone(),
        );
        if !ok(r) {
            break;
        }
        acked.push((tag, sha256(&body)));
    }
    acked
}

#[test]
fn kill9_in_a_loop_loses_nothing_acknowledged() {
    let iterations: usize = std::env::var("HOARD_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    // Two stores: one without a size bound, where nothing acknowledged may ever go missing, and
    // one under constant size pressure, so eviction passes are in flight when the process dies
    // (acknowledged tags may be evicted there, but nothing may dangle or fail verification).
    let mut acked: [Vec<(String, String)>; 2] = [Vec::new(), Vec::new()];
    let mut checked = 0usize;
    for it in 0..iterations {
        let pressure = it % 2;
        let data = tmp.path().join(format!("data{pressure}"));
        let mut args = vec!["--gc-interval", "200ms", "--orphan-grace", "1s"];
        if pressure == 1 {
            args.extend(["--max-size", "3MiB"]);
        }
        let mut h = Hoard::start_on(&data, &args);
        let mut lost = Vec::new();
        for (tag, digest) in &acked[pressure] {
            let r = h.req("HEAD", &format!("/v2/crash/manifests/{tag}")).send();
            if r.status == 404 {
                lost.push(tag.clone());
                continue;
            }
            assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
            match try_pull(&h, "crash", tag) {
                Ok(true) => checked += 1,
                // Under pressure the collector may evict it between the HEAD and the pull (on
                // a bucket its tag goes a moment before its blobs): then it is gone, not torn.
                Ok(false) | Err(_)
                    if pressure == 1
                        && h.req("HEAD", &format!("/v2/crash/manifests/{tag}"))
                            .send()
                            .status
                            == 404 =>
                {
                    lost.push(tag.clone())
                }
                Ok(false) => panic!("iteration {it}: {tag} vanished between HEAD and GET"),
                Err(e) => panic!("iteration {it}: {tag} does not pull (invariant 1): {e}"),
            }
        }
        if pressure == 0 {
            assert!(
                lost.is_empty(),
                "iteration {it}: acknowledged tags lost: {lost:?}"
            );
        }
        acked[pressure].retain(|(t, _)| !lost.contains(t));
        let r = h.req("POST", "/admin/verify").send();
        assert_eq!(r.status, 200, "iteration {it}: {}", r.text());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let stop = stop.clone();
                let addr = h.addr;
                let seed = (it * 10 + w) as u64;
                std::thread::spawn(move || churn(addr, seed, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + (it as u64 * 137) % 500));
        h.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in workers {
            acked[pressure].extend(w.join().unwrap());
        }
    }
    for pressure in 0..2 {
        let data = tmp.path().join(format!("data{pressure}"));
        let h = Hoard::start_on(&data, &[]);
        let r = h.req("POST", "/admin/verify").send();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    eprintln!(
        "crash loop: {iterations} kill -9 iterations, {checked} acknowledged tags re-pulled whole, 0 lost"
    );
}

/// One builder exporting its cache the way BuildKit's `--cache-to type=registry,mode=max` does,
/// again and again: HEAD every blob, upload the missing ones, then PUT the manifest on the same
/// moving tag. Returns every status it saw and the manifests it pushed, in order.
fn rebuild_loop(
    addr: std::net::SocketAddr,
    client: u64,
    repo: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<(String, u16)>, Vec<String>) {
    let req = Hoard::req_at(addr);
    let mut seen = Vec::new();
    let mut pushed = Vec::new();
    // Shared by every builder, stable for this one, new on every build.
    let base = bytes(1, 192 * K);
    let stable = bytes(1000 + client, 128 * K);
    let mut build = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        build += 1;
        let fresh = bytes(
            client * 1_000_000 + build,
            384 * K + (build as usize % 5) * 1000,
        );
        let config = format!("{{\"client\":{client},\"build\":{build}}}").into_bytes();
        let mut layers = Vec::new();
        for blob in [&base, &stable, &fresh, &config] {
            let d = sha256(blob);
            let head = req("HEAD", &format!("/v2/{repo}/blobs/{d}"), &[], Vec::new());
            seen.push(("HEAD blob".to_owned(), head.status));
            if head.status == 404 {
                let r = req(
                    "POST",
                    &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                    &[],
                    blob.to_vec(),
                );
                seen.push(("push blob".to_owned(), r.status));
            }
            layers.push((d, blob.len()));
        }
        let (cd, clen) = layers.pop().unwrap();
        let body = image_manifest((&cd, clen, CACHE_CONFIG), &layers);
        let r = req(
            "PUT",
            &format!("/v2/{repo}/manifests/cache"),
            &[("Content-Type", OCI_MANIFEST)],
            body.clone(),
        );
        seen.push(("PUT manifest".to_owned(), r.status));
        if r.status == 201 {
            pushed.push(sha256(&body));
        }
    }
    (seen, pushed)
}

#[test]
fn re_pushed_cache_tags_under_a_tight_bound_never_fail_and_the_latest_pull_whole() {
    // Six builders, two per cache tag, each export about 0.7 MiB (0.4 MiB of it new on every
    // build), under a bound of about eleven exports: the store turns over many times a minute.
    let h = Hoard::start(&[
        "--max-size",
        "8MiB",
        "--orphan-grace",
        "1h",
        "--gc-interval",
        "1s",
    ]);
    let secs: u64 = std::env::var("HOARD_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..6u64)
        .map(|c| {
            let (addr, stop) = (h.addr, stop.clone());
            std::thread::spawn(move || rebuild_loop(addr, c, format!("farm/app{}", c % 3), stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut requests = 0;
    let mut builds = 0;
    for c in clients {
        let (seen, pushed) = c.join().unwrap();
        requests += seen.len();
        builds += pushed.len();
        let failed: Vec<_> = seen
            .iter()
            .filter(|(what, s)| *s >= 500 || (what != "HEAD blob" && *s >= 400))
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} requests failed, e.g. {:?}; status page:\n{}",
            failed.len(),
            seen.len(),
            &failed[..failed.len().min(5)],
            status_page(&h)
        );
    }
    let page = status_page(&h);
    assert!(builds > 60, "only {builds} builds in {secs} s:\n{page}");
    assert!(
        page.contains("evictions reason=size repository=farm/app"),
        "the bound was never reached, so nothing was tested:\n{page}"
    );
    // Every cache tag is there and its latest export pulls completely.
    for r in 0..3 {
        let repo = format!("farm/app{r}");
        let head = h.req("HEAD", &format!("/v2/{repo}/manifests/cache")).send();
        assert_eq!(head.status, 200, "{repo}:cache was evicted:\n{page}");
        pull_all(&h, &repo, "cache", "the churn");
    }
    assert_invariant_1(&h, "the churn");
    eprintln!("{requests} requests, {builds} builds, 0 failed");
}
