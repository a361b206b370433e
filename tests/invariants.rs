//! Invariant 1 (no tag, manifest or index points at something that does not pull) against the
//! real binary: deletes that would break it are refused with the holder named, `verify` finds
//! and mends a repository that lost sight of a blob, and a walk through every route that removes
//! something (blob delete, manifest delete, tag delete, orphan collection, size eviction, TTL,
//! verify --repair) pulls every tag completely after each.

mod common;

use std::time::Duration;

use common::*;

const K: usize = 1024;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A platform image pushed by digest (as a multi-arch push does before its index).
fn push_platform(h: &Hoard, repo: &str, seed: u64, shared: &[u8]) -> (String, usize) {
    let base = push_blob(h, repo, shared);
    let own = bytes(seed, 8 * K);
    let layer = push_blob(h, repo, &own);
    let config = format!("{{\"architecture\":\"a{seed}\"}}");
    let cd = push_blob(h, repo, config.as_bytes());
    let body = image_manifest(
        (
            &cd,
            config.len(),
            "application/vnd.oci.image.config.v1+json",
        ),
        &[(base, shared.len()), (layer, own.len())],
    );
    let d = sha256(&body);
    let r = put_manifest(h, repo, &d, OCI_MANIFEST, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    (d, body.len())
}

fn push_index(h: &Hoard, repo: &str, tag: &str, children: &[(String, usize)]) -> String {
    let manifests: Vec<serde_json::Value> = children
        .iter()
        .map(|(d, n)| serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": n}))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
    }))
    .unwrap();
    let r = put_manifest(h, repo, tag, OCI_INDEX, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    sha256(&body)
}

/// A BuildKit cache export with `image-manifest=false`: an index listing layers and the cache
/// config as blobs.
fn push_cache_index(h: &Hoard, repo: &str, tag: &str, seed: u64) -> String {
    let layer = bytes(seed, 12 * K);
    let ld = push_blob(h, repo, &layer);
    let config = format!("{{\"cache\":{seed}}}");
    let cd = push_blob(h, repo, config.as_bytes());
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": layer.len()},
            {"mediaType": CACHE_CONFIG, "digest": cd, "size": config.len()},
        ],
    }))
    .unwrap();
    let r = put_manifest(h, repo, tag, OCI_INDEX, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    sha256(&body)
}

/// A signature-like referrer of `subject`.
fn push_referrer(h: &Hoard, repo: &str, subject: &str, subject_len: usize) -> String {
    let sig = b"signature".to_vec();
    let sd = push_blob(h, repo, &sig);
    let empty = push_blob(h, repo, b"{}");
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sd, "size": sig.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_len},
    }))
    .unwrap();
    let d = sha256(&body);
    let r = put_manifest(h, repo, &d, OCI_MANIFEST, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    d
}

#[test]
fn blob_delete_is_refused_while_a_manifest_of_the_repository_lists_it() {
    let h = Hoard::start(&[]);
    let img = push_image(&h, "app", "v1", None, &[bytes(1, 4 * K)]);
    let (config, layer) = (&img.blobs[0], &img.blobs[1]);
    // The same layer in a second repository, by mount: its link there is its own.
    let r = h
        .req(
            "POST",
            &format!("/v2/other/blobs/uploads/?mount={layer}&from=app"),
        )
        .send();
    assert_eq!(r.status, 201);

    for d in [layer, config] {
        let r = h.req("DELETE", &format!("/v2/app/blobs/{d}")).send();
        assert_eq!(r.status, 405, "{}", r.text());
        assert_eq!(r.code(), "UNSUPPORTED");
        let msg = r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            msg.contains(&img.manifest) && msg.contains("tags: v1"),
            "the refusal names the manifest and its tag: {msg}"
        );
    }
    // A manifest's own digest is not deleted through /blobs/ either.
    let r = h
        .req("DELETE", &format!("/v2/app/blobs/{}", img.manifest))
        .send();
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(pull(&h, "app", "v1"), "nothing was removed");
    // Nothing in `other` references it: its link there may go, and only there.
    let r = h.req("DELETE", &format!("/v2/other/blobs/{layer}")).send();
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(blob_status(&h, "other", layer), 404);
    assert!(pull(&h, "app", "v1"));

    // An untagged manifest holds its blobs too (it still GETs by digest).
    let r = h.req("DELETE", "/v2/app/manifests/v1").send();
    assert_eq!(r.status, 202);
    let r = h.req("DELETE", &format!("/v2/app/blobs/{layer}")).send();
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(r.text().contains("(untagged)"), "{}", r.text());
    // Once nothing in the repository references it, the delete is allowed.
    let r = h
        .req("DELETE", &format!("/v2/app/manifests/{}", img.manifest))
        .send();
    assert_eq!(r.status, 202);
    for d in [layer, config] {
        let r = h.req("DELETE", &format!("/v2/app/blobs/{d}")).send();
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(blob_status(&h, "app", d), 404);
    }
    assert_invariant_1(&h, "deletes");
}

#[test]
fn manifest_delete_is_refused_while_an_index_of_the_repository_lists_it() {
    let h = Hoard::start(&[]);
    let shared = bytes(10, 4 * K);
    let a = push_platform(&h, "multi", 11, &shared);
    let b = push_platform(&h, "multi", 12, &shared);
    let index = push_index(&h, "multi", "latest", &[a.clone(), b.clone()]);
    let r = h
        .req("DELETE", &format!("/v2/multi/manifests/{}", a.0))
        .send();
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(r.text().contains(&index), "names the index: {}", r.text());
    pull_all(&h, "multi", "latest", "a refused delete");
    // Index first, then its children: the order the OCI conformance suite uses.
    for d in [&index, &a.0, &b.0] {
        let r = h.req("DELETE", &format!("/v2/multi/manifests/{d}")).send();
        assert_eq!(r.status, 202, "{d}: {}", r.text());
    }
    let r = h.req("GET", "/v2/multi/tags/list").send();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tags"], serde_json::json!([]));
}

#[test]
fn verify_finds_and_mends_a_blob_its_repository_lost_sight_of() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let mut h = Hoard::start_on(&data, &[]);
    let img = push_image(&h, "app", "v1", None, &[bytes(20, 4 * K)]);
    assert!(h.stop().success());
    // What an earlier version's blob DELETE could do: the layer's link in `app` gone while
    // the tagged manifest still lists it (the bytes stay stored).
    let layer: hoard::digest::Digest = img.blobs[1].parse().unwrap();
    {
        let (mut j, _) =
            hoard::lifecycle::journal::Journal::open(&data.join("index"), true, |_, _| {}).unwrap();
        j.append(&[hoard::lifecycle::journal::Op::Unlink {
            repo: "app".into(),
            digest: layer,
        }])
        .unwrap();
    }
    let out = hoard_cmd(&["verify", "--data-dir", d]);
    if !on_disk() {
        // On a bucket the index is a cache of it: verify re-reads the bucket first, where the
        // link never went, so the cache is mended before anything is judged.
        assert!(out.status.success(), "{}", stdout(&out));
        assert!(stdout(&out).contains(" 0 dangling"), "{}", stdout(&out));
        let h = Hoard::start_on(&data, &[]);
        assert!(pull(&h, "app", "v1"), "the bucket's link serves the pull");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("0 corrupt, 0 missing"), "{text}");
    assert!(
        text.contains(&format!(
            "dangling repository=app manifest={}: child {layer} is stored but not visible",
            img.manifest
        )),
        "{text}"
    );
    let out = hoard_cmd(&["verify", "--repair", "--data-dir", d]);
    assert!(out.status.success(), "{}", stdout(&out));
    let out = hoard_cmd(&["verify", "--data-dir", d]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains(" 0 dangling"), "{}", stdout(&out));
    let h = Hoard::start_on(&data, &[]);
    assert!(
        pull(&h, "app", "v1"),
        "mended by re-linking, nothing dropped"
    );
}

/// Pushes everything the walk removes piece by piece: images sharing a base, an image in a
/// second repository through a mount, a multi-platform index, a signature, a BuildKit cache
/// index, and a blob nothing references.
fn populate(h: &Hoard) -> (Image, String) {
    let base = bytes(30, 16 * K);
    let v1 = push_image(h, "app", "v1", Some(&base), &[bytes(31, 8 * K)]);
    push_image(h, "app", "v2", Some(&base), &[bytes(32, 8 * K)]);
    let base_d = sha256(&base);
    let r = h
        .req(
            "POST",
            &format!("/v2/team/svc/blobs/uploads/?mount={base_d}&from=app"),
        )
        .send();
    assert_eq!(r.status, 201);
    push_image(h, "team/svc", "main", Some(&base), &[bytes(33, 8 * K)]);
    let a = push_platform(h, "multi", 34, &base);
    let b = push_platform(h, "multi", 35, &base);
    push_index(h, "multi", "latest", &[a, b]);
    let v1_len = h
        .req("HEAD", &format!("/v2/app/manifests/{}", v1.manifest))
        .send()
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap();
    push_referrer(h, "app", &v1.manifest, v1_len);
    push_cache_index(h, "app", "buildcache", 36);
    let loose = push_blob(h, "app", &bytes(37, 4 * K));
    (v1, loose)
}

#[test]
fn every_route_that_removes_something_keeps_invariant_1() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let quick = ["--orphan-grace", "1s", "--gc-interval", "300ms"];
    let mut h = Hoard::start_on(&data, &quick);
    let (v1, _) = populate(&h);
    assert_eq!(assert_invariant_1(&h, "the pushes"), 5);
    // Pushed just before its delete: with a 1 s orphan grace, a blob pushed before the checks
    // above may already be collected on a slow machine.
    let loose = push_blob(&h, "app", &bytes(38, 4 * K));

    // Blob delete: refused for what v1 uses, allowed for the blob nothing references.
    for b in &v1.blobs {
        assert_eq!(
            h.req("DELETE", &format!("/v2/app/blobs/{b}")).send().status,
            405
        );
    }
    assert_eq!(
        h.req("DELETE", &format!("/v2/app/blobs/{loose}"))
            .send()
            .status,
        202
    );
    assert_invariant_1(&h, "blob deletes");

    // Tag delete, then the orphan collector takes the untagged manifest and its referrer.
    assert_eq!(h.req("DELETE", "/v2/app/manifests/v1").send().status, 202);
    assert_invariant_1(&h, "a tag delete");
    // Polled on the status page: a GET of the manifest would keep it young.
    wait_until(
        "the untagged manifest is collected",
        Duration::from_secs(20),
        || status_page(&h).contains("evictions reason=orphan repository=app tags=0 manifests=2"),
    );
    let r = h
        .req("GET", &format!("/v2/app/manifests/{}", v1.manifest))
        .send();
    assert_eq!(r.status, 404);
    assert_invariant_1(&h, "orphan collection");

    // Manifest delete by digest (the index first, as its children are refused while it lists
    // them), and of a tagged manifest: its tags go with it.
    let idx = h.req("HEAD", "/v2/multi/manifests/latest").send();
    let idx = idx.header("docker-content-digest").unwrap().to_owned();
    assert_eq!(
        h.req("DELETE", &format!("/v2/multi/manifests/{idx}"))
            .send()
            .status,
        202
    );
    assert_invariant_1(&h, "an index delete");
    let v2 = h.req("HEAD", "/v2/app/manifests/v2").send();
    let v2 = v2.header("docker-content-digest").unwrap().to_owned();
    assert_eq!(
        h.req("DELETE", &format!("/v2/app/manifests/{v2}"))
            .send()
            .status,
        202
    );
    assert_invariant_1(&h, "a manifest delete");
    assert!(h.stop().success());

    // Size eviction: a bound the existing content and new pushes cannot all fit under.
    let bounded = ["--max-size", "160KiB", "--orphan-grace", "1s"];
    let h2 = Hoard::start_on(&data, &bounded);
    for i in 0..6 {
        let base = bytes(30, 16 * K);
        push_image(
            &h2,
            "app",
            &format!("new{i}"),
            Some(&base),
            &[bytes(40 + i, 24 * K)],
        );
        assert_invariant_1(&h2, &format!("size eviction, push {i}"));
    }
    assert!(
        status_page(&h2).contains("evictions reason=size"),
        "{}",
        status_page(&h2)
    );
    drop(h2);

    // TTL: everything idle expires, everything left still pulls.
    let mut h3 = Hoard::start_on(
        &data,
        &[
            "--ttl",
            "2s",
            "--clock-skew-tolerance",
            "0s",
            "--gc-interval",
            "300ms",
        ],
    );
    wait_until("tags expire", Duration::from_secs(30), || {
        status_page(&h3).contains("evictions reason=ttl")
    });
    assert_invariant_1(&h3, "TTL expiry");
    assert!(h3.stop().success());

    // verify --repair after a layer rots on disk: the tags that used it go, the rest pull.
    let mut h4 = Hoard::start_on(&data, &[]);
    let img = push_image(
        &h4,
        "app",
        "rots",
        Some(&bytes(30, 16 * K)),
        &[bytes(50, 8 * K)],
    );
    push_image(
        &h4,
        "app",
        "fine",
        Some(&bytes(30, 16 * K)),
        &[bytes(51, 8 * K)],
    );
    assert!(h4.stop().success());
    let hex = img.blobs[2].trim_start_matches("sha256:");
    corrupt_blob(&data, hex, b"rot");
    let out = hoard_cmd(&["verify", "--repair", "--data-dir", d]);
    assert!(out.status.success(), "{}", stdout(&out));
    let h5 = Hoard::start_on(&data, &[]);
    assert!(!pull(&h5, "app", "rots"));
    assert!(pull(&h5, "app", "fine"));
    assert_invariant_1(&h5, "verify --repair");
}
