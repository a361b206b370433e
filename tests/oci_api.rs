//! Every OCI Distribution endpoint and error case against the real binary over real sockets.

mod common;

use std::io::Read;

use common::*;

#[test]
fn base_endpoint_and_health() {
    let h = Hoard::start(&[]);
    let r = h.req("GET", "/v2/").send();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert_eq!(h.req("GET", "/healthz").send().status, 200);
    assert_eq!(h.req("GET", "/v2").send().status, 200);
    assert_eq!(h.req("GET", "/nope").send().status, 404);
    let page = h.req("GET", "/").send();
    assert!(page.text().contains("repositories: 0"), "{}", page.text());
}

#[test]
fn monolithic_post_put_and_chunked_uploads_store_exact_bytes() {
    let h = Hoard::start(&[]);
    // POST ?digest= with the body: one request.
    let a = bytes(1, 1000);
    let da = sha256(&a);
    let r = h
        .req("POST", &format!("/v2/r/blobs/uploads/?digest={da}"))
        .body(a.clone())
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("docker-content-digest"), Some(da.as_str()));
    let loc = r.header("location").unwrap().to_owned();
    assert_eq!(h.req("GET", &loc).send().body, a);

    // POST + PUT with body (BuildKit's way).
    let b = bytes(2, 70_000);
    let db = push_blob(&h, "r", &b);
    let got = h.req("GET", &format!("/v2/r/blobs/{db}")).send();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, b);
    assert_eq!(got.header("content-length"), Some("70000"));
    assert_eq!(got.header("docker-content-digest"), Some(db.as_str()));

    // Chunked: PATCH x3 with Content-Range, then PUT without a body.
    let c = bytes(3, 3 * 1024 * 1024 + 17);
    let dc = sha256(&c);
    let r = h.req("POST", "/v2/r/blobs/uploads/").send();
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), Some("0-0"));
    assert!(r.header("docker-upload-uuid").is_some());
    let mut loc = r.header("location").unwrap().to_owned();
    let mut off = 0;
    for chunk in c.chunks(1_200_000) {
        let r = h
            .req("PATCH", &loc)
            .header("Content-Type", "application/octet-stream")
            .header(
                "Content-Range",
                &format!("{}-{}", off, off + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send();
        assert_eq!(r.status, 202, "{}", r.text());
        off += chunk.len();
        assert_eq!(r.header("range").unwrap(), format!("0-{}", off - 1));
        loc = r.header("location").unwrap().to_owned();
        // Status query agrees.
        let s = h.req("GET", &loc).send();
        assert_eq!(s.status, 204);
        assert_eq!(s.header("range").unwrap(), format!("0-{}", off - 1));
    }
    let r = h.req("PUT", &format!("{loc}?digest={dc}")).send();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(h.req("GET", &format!("/v2/r/blobs/{dc}")).send().body, c);

    // Streamed PATCH without Content-Range, then PUT with a final chunk.
    let d = bytes(4, 5000);
    let dd = sha256(&d);
    let r = h.req("POST", "/v2/r/blobs/uploads").send();
    let loc = r.header("location").unwrap().to_owned();
    let r = h.req("PATCH", &loc).body(d[..3000].to_vec()).send();
    assert_eq!(r.status, 202);
    let r = h
        .req("PUT", &format!("{loc}?digest={dd}"))
        .body(d[3000..].to_vec())
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(h.req("GET", &format!("/v2/r/blobs/{dd}")).send().body, d);
}

#[test]
fn sha512_blobs_are_stored_under_sha512() {
    let h = Hoard::start(&[]);
    let data = bytes(5, 4096);
    let d = sha512(&data);
    let r = h.req("POST", "/v2/x/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    // Chunked first (hashed as sha256 while streaming), then finished as sha512.
    assert_eq!(
        h.req("PATCH", &loc)
            .body(data[..100].to_vec())
            .send()
            .status,
        202
    );
    let r = h
        .req("PUT", &format!("{loc}?digest={d}"))
        .body(data[100..].to_vec())
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    let got = h.req("GET", &format!("/v2/x/blobs/{d}")).send();
    assert_eq!(got.body, data);
    assert_eq!(got.header("docker-content-digest"), Some(d.as_str()));
    // Monolithic sha512 too.
    let e = bytes(6, 10);
    let de = sha512(&e);
    let r = h
        .req("POST", &format!("/v2/x/blobs/uploads/?digest={de}"))
        .body(e.clone())
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        h.req("HEAD", &format!("/v2/x/blobs/{de}")).send().status,
        200
    );
}

#[test]
fn head_get_ranges_and_delete() {
    let h = Hoard::start(&[]);
    let data = bytes(7, 2 * 1024 * 1024);
    let d = push_blob(&h, "a/b", &data);
    let head = h.req("HEAD", &format!("/v2/a/b/blobs/{d}")).send();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("2097152"));
    assert_eq!(head.header("accept-ranges"), Some("bytes"));
    assert_eq!(head.header("docker-content-digest"), Some(d.as_str()));

    let r = h
        .req("GET", &format!("/v2/a/b/blobs/{d}"))
        .header("Range", "bytes=1000-")
        .send();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[1000..]);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 1000-2097151/2097152")
    );
    let r = h
        .req("GET", &format!("/v2/a/b/blobs/{d}"))
        .header("Range", "bytes=10-19")
        .send();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[10..20]);
    assert_eq!(r.header("content-length"), Some("10"));
    let r = h
        .req("GET", &format!("/v2/a/b/blobs/{d}"))
        .header("Range", "bytes=5000000-")
        .send();
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */2097152"));
    // A range that ends before it starts is refused too, not answered with the whole blob.
    let r = h
        .req("GET", &format!("/v2/a/b/blobs/{d}"))
        .header("Range", "bytes=500-0")
        .send();
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */2097152"));
    // A suffix and a range running past the end are cut to the blob.
    let r = h
        .req("GET", &format!("/v2/a/b/blobs/{d}"))
        .header("Range", "bytes=-500")
        .send();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[data.len() - 500..]);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 2096652-2097151/2097152")
    );
    let r = h
        .req("GET", &format!("/v2/a/b/blobs/{d}"))
        .header("Range", "bytes=2097000-9999999")
        .send();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[2097000..]);
    assert_eq!(
        r.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        r.body.len()
    );

    // Not visible in another repository until mounted.
    assert_eq!(
        h.req("HEAD", &format!("/v2/other/blobs/{d}")).send().status,
        404
    );
    let miss = h.req("GET", &format!("/v2/other/blobs/{d}")).send();
    assert_eq!(miss.code(), "BLOB_UNKNOWN");
    // HEAD errors carry no body.
    let r = h.req("HEAD", &format!("/v2/other/blobs/{d}")).send();
    assert!(r.body.is_empty());

    assert_eq!(
        h.req("DELETE", &format!("/v2/a/b/blobs/{d}")).send().status,
        202
    );
    assert_eq!(
        h.req("HEAD", &format!("/v2/a/b/blobs/{d}")).send().status,
        404
    );
    assert_eq!(
        h.req("DELETE", &format!("/v2/a/b/blobs/{d}")).send().status,
        404
    );
}

#[test]
fn cross_repository_mounts() {
    let h = Hoard::start(&[]);
    let data = bytes(8, 100);
    let d = push_blob(&h, "src", &data);
    let r = h
        .req(
            "POST",
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=src"),
        )
        .send();
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location").unwrap(), format!("/v2/dst/blobs/{d}"));
    assert_eq!(
        h.req("GET", &format!("/v2/dst/blobs/{d}")).send().body,
        data
    );
    // from a repository that does not have it: a normal upload session.
    let r = h
        .req(
            "POST",
            &format!("/v2/dst2/blobs/uploads/?mount={d}&from=nothere"),
        )
        .send();
    assert_eq!(r.status, 202);
    assert!(r.header("location").unwrap().contains("/blobs/uploads/"));
    // mount without from: found anywhere.
    let r = h
        .req("POST", &format!("/v2/dst3/blobs/uploads/?mount={d}"))
        .send();
    assert_eq!(r.status, 201);
    // Unknown digest: session.
    let r = h
        .req(
            "POST",
            &format!("/v2/dst3/blobs/uploads/?mount={}&from=src", sha256(b"zz")),
        )
        .send();
    assert_eq!(r.status, 202);
    // Malformed mount digest.
    let r = h
        .req("POST", "/v2/dst3/blobs/uploads/?mount=sha256:xyz&from=src")
        .send();
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "DIGEST_INVALID");
}

#[test]
fn malformed_and_wrong_digests_store_nothing() {
    let h = Hoard::start(&[]);
    let data = bytes(9, 1000);
    for bad in [
        "sha256:abc",
        "md5:0123",
        "sha256:ZZ",
        "SHA256:00",
        "nodigest",
    ] {
        let r = h.req("GET", &format!("/v2/r/blobs/{bad}")).send();
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.code(), "DIGEST_INVALID");
        let r = h
            .req("POST", &format!("/v2/r/blobs/uploads/?digest={bad}"))
            .body(data.clone())
            .send();
        assert_eq!(r.status, 400, "{bad}");
    }
    // Right shape, wrong content: monolithic, POST+PUT and chunked.
    let wrong = sha256(b"something else");
    let r = h
        .req("POST", &format!("/v2/r/blobs/uploads/?digest={wrong}"))
        .body(data.clone())
        .send();
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "DIGEST_INVALID");
    let r = h.req("POST", "/v2/r/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    let r = h
        .req("PUT", &format!("{loc}?digest={wrong}"))
        .body(data.clone())
        .send();
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "DIGEST_INVALID");
    // The failed session is gone.
    assert_eq!(h.req("GET", &loc).send().status, 404);
    // PUT without digest.
    let r = h.req("POST", "/v2/r/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    let r = h.req("PUT", &loc).body(data.clone()).send();
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "DIGEST_INVALID");
    assert_eq!(
        h.req("HEAD", &format!("/v2/r/blobs/{wrong}")).send().status,
        404
    );
    assert_eq!(
        h.req("HEAD", &format!("/v2/r/blobs/{}", sha256(&data)))
            .send()
            .status,
        404
    );
    assert_eq!(h.stored_blobs(), 0);
    assert_eq!(h.leftover_uploads(), 0);
}

#[test]
fn size_mismatch_out_of_order_and_unknown_uploads() {
    let h = Hoard::start(&[]);
    let data = bytes(10, 3000);
    let r = h.req("POST", "/v2/r/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    let r = h
        .req("PATCH", &loc)
        .header("Content-Range", "0-999")
        .body(data[..1000].to_vec())
        .send();
    assert_eq!(r.status, 202);
    // Out of order: skipping ahead and going back both 416; the session survives.
    let r = h
        .req("PATCH", &loc)
        .header("Content-Range", "2000-2999")
        .body(data[2000..].to_vec())
        .send();
    assert_eq!(r.status, 416, "{}", r.text());
    let r = h
        .req("PATCH", &loc)
        .header("Content-Range", "0-999")
        .body(data[..1000].to_vec())
        .send();
    assert_eq!(r.status, 416);
    let s = h.req("GET", &loc).send();
    assert_eq!(s.status, 204);
    assert_eq!(s.header("range"), Some("0-999"));
    // Content-Range promising more than the body holds: size error, session dropped.
    let r = h
        .req("PATCH", &loc)
        .header("Content-Range", "1000-2999")
        .body(data[1000..1500].to_vec())
        .send();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "SIZE_INVALID");
    assert_eq!(h.req("GET", &loc).send().status, 404);
    // Unknown upload ids.
    for (m, path) in [
        ("PATCH", "/v2/r/blobs/uploads/not-a-session"),
        ("PUT", "/v2/r/blobs/uploads/not-a-session?digest=sha256:0000000000000000000000000000000000000000000000000000000000000000"),
        ("GET", "/v2/r/blobs/uploads/not-a-session"),
        ("DELETE", "/v2/r/blobs/uploads/not-a-session"),
    ] {
        let r = h.req(m, path).body(b"x".to_vec()).send();
        assert_eq!(r.status, 404, "{m}");
        assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    }
    // A session belongs to its repository.
    let r = h.req("POST", "/v2/r/blobs/uploads/").send();
    let id = r.header("docker-upload-uuid").unwrap().to_owned();
    assert_eq!(
        h.req("GET", &format!("/v2/other/blobs/uploads/{id}"))
            .send()
            .status,
        404
    );
    // Cancel.
    assert_eq!(
        h.req("DELETE", &format!("/v2/r/blobs/uploads/{id}"))
            .send()
            .status,
        204
    );
    assert_eq!(
        h.req("GET", &format!("/v2/r/blobs/uploads/{id}"))
            .send()
            .status,
        404
    );
    assert_eq!(h.leftover_uploads(), 0);
}

#[test]
fn an_upload_id_answers_only_in_its_own_repository_busy_or_not() {
    use std::io::Write;
    let h = Hoard::start(&[]);
    let data = bytes(13, 2 << 20);
    let d = sha256(&data);
    let r = h.req("POST", "/v2/owner/blobs/uploads/").send();
    let id = r.header("docker-upload-uuid").unwrap().to_owned();
    let own = format!("/v2/owner/blobs/uploads/{id}");
    let theirs = format!("/v2/thief/blobs/uploads/{id}");
    let try_all = |when: &str| {
        for (m, path) in [
            ("PUT", format!("{theirs}?digest={d}")),
            ("PATCH", theirs.clone()),
            ("GET", theirs.clone()),
            ("DELETE", theirs.clone()),
        ] {
            let r = h.req(m, &path).body(b"x".to_vec()).send();
            assert_eq!(
                r.status,
                404,
                "{m} from another repository {when}: {}",
                r.text()
            );
            assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
        }
    };
    try_all("while idle");
    // A PATCH in flight: half its body sent, the rest held back.
    let mut patch = std::net::TcpStream::connect(h.addr).unwrap();
    write!(
        patch,
        "PATCH {own} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    )
    .unwrap();
    patch.write_all(&data[..1 << 20]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    try_all("while a PATCH is in flight");
    patch.write_all(&data[1 << 20..]).unwrap();
    let resp = read_response(&mut patch, false);
    assert_eq!(resp.status, 202, "{}", resp.text());
    assert_eq!(
        resp.header("range"),
        Some(&*format!("0-{}", data.len() - 1))
    );
    try_all("after the PATCH");
    // The owner's upload was untouched: it completes, in its own repository only.
    let r = h.req("PUT", &format!("{own}?digest={d}")).send();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        h.req("HEAD", &format!("/v2/owner/blobs/{d}")).send().status,
        200
    );
    assert_eq!(
        h.req("HEAD", &format!("/v2/thief/blobs/{d}")).send().status,
        404
    );
    // A finished id is unknown everywhere, and a second PUT of it cannot store anything.
    let r = h.req("PUT", &format!("{own}?digest={d}")).send();
    assert_eq!(r.status, 404);
}

#[test]
fn client_cut_off_mid_upload_leaves_nothing() {
    let h = Hoard::start(&[]);
    let data = bytes(11, 3 << 20);
    let d = sha256(&data);
    // Monolithic PUT announcing 3 MiB but sending 1 MiB, then hanging up.
    let r = h.req("POST", "/v2/r/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    h.req("PUT", &format!("{loc}?digest={d}"))
        .body(data[..1 << 20].to_vec())
        .send_cut(data.len());
    // PATCH cut off too.
    let r = h.req("POST", "/v2/r/blobs/uploads/").send();
    let loc2 = r.header("location").unwrap().to_owned();
    h.req("PATCH", &loc2)
        .body(data[..1 << 20].to_vec())
        .send_cut(data.len());
    // POST ?digest= cut off.
    h.req("POST", &format!("/v2/r/blobs/uploads/?digest={d}"))
        .body(data[..5000].to_vec())
        .send_cut(data.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.leftover_uploads() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(h.leftover_uploads(), 0, "tmp/ not cleaned");
    assert_eq!(
        h.req("HEAD", &format!("/v2/r/blobs/{d}")).send().status,
        404
    );
    assert_eq!(h.req("GET", &loc).send().status, 404);
    assert_eq!(h.req("GET", &loc2).send().status, 404);
    assert_eq!(h.stored_blobs(), 0);
    // The daemon is fine afterwards.
    let d2 = push_blob(&h, "r", &data);
    assert_eq!(d2, d);
}

#[test]
fn two_clients_pushing_the_same_blob_at_once_both_succeed() {
    let h = Hoard::start(&[]);
    let data = std::sync::Arc::new(bytes(12, 8 << 20));
    let d = sha256(&data);
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let data = data.clone();
            let addr = h.addr;
            std::thread::spawn(move || {
                let h2 = common::Hoard::req_at(addr);
                let repo = if i % 2 == 0 { "same" } else { "other" };
                h2("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], vec![])
                    .header("location")
                    .map(|l| l.to_owned())
                    .map(|loc| {
                        h2(
                            "PUT",
                            &format!("{loc}?digest={}", sha256(&data)),
                            &[],
                            data.to_vec(),
                        )
                        .status
                    })
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Some(201));
    }
    assert_eq!(h.stored_blobs(), 1, "one copy of the bytes");
    for repo in ["same", "other"] {
        let r = h.req("GET", &format!("/v2/{repo}/blobs/{d}")).send();
        assert_eq!(r.body.len(), data.len());
        assert!(r.body == *data);
    }
}

#[test]
fn repository_names_are_validated() {
    let h = Hoard::start(&[]);
    let d = sha256(b"x");
    let long = "a".repeat(256);
    for bad in [
        "UPPER/x",
        "a/../b",
        "..%2Fetc",
        "a//b",
        "a__-b",
        "-a",
        long.as_str(),
        "a/%2e%2e/b",
    ] {
        let r = h.req("GET", &format!("/v2/{bad}/blobs/{d}")).send();
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.code(), "NAME_INVALID", "{bad}");
        let r = h.req("POST", &format!("/v2/{bad}/blobs/uploads/")).send();
        assert_eq!(r.status, 400, "{bad}");
    }
    // Nothing was created outside the data directory's blob tree.
    assert_eq!(
        h.req("GET", "/v2/_catalog").send().json()["repositories"],
        serde_json::json!([])
    );
    let ok = "a".repeat(255);
    assert_eq!(
        h.req("POST", &format!("/v2/{ok}/blobs/uploads/"))
            .send()
            .status,
        202
    );
}

#[test]
fn manifests_by_tag_and_digest() {
    let h = Hoard::start(&[]);
    let cfg = br#"{"architecture":"amd64","os":"linux"}"#;
    let dc = push_blob(&h, "app", cfg);
    let layer = bytes(13, 5000);
    let dl = push_blob(&h, "app", &layer);
    let m = image_manifest(
        (&dc, cfg.len(), "application/vnd.oci.image.config.v1+json"),
        &[(dl.clone(), layer.len())],
    );
    let dm = sha256(&m);
    let r = put_manifest(&h, "app", "v1", OCI_MANIFEST, &m);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("docker-content-digest"), Some(dm.as_str()));
    assert_eq!(
        r.header("location").unwrap(),
        format!("/v2/app/manifests/{dm}")
    );
    for reference in ["v1", dm.as_str()] {
        let g = h
            .req("GET", &format!("/v2/app/manifests/{reference}"))
            .header("Accept", OCI_MANIFEST)
            .send();
        assert_eq!(g.status, 200);
        assert_eq!(g.body, m, "bytes stored exactly");
        assert_eq!(g.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(g.header("docker-content-digest"), Some(dm.as_str()));
        assert_eq!(g.header("content-length").unwrap(), m.len().to_string());
        let hd = h
            .req("HEAD", &format!("/v2/app/manifests/{reference}"))
            .send();
        assert_eq!(hd.status, 200);
        assert_eq!(hd.header("docker-content-digest"), Some(dm.as_str()));
        assert_eq!(hd.header("content-length").unwrap(), m.len().to_string());
        assert_eq!(hd.header("content-type"), Some(OCI_MANIFEST));
    }
    // Also readable through the blobs endpoint (clients fall back to it).
    assert_eq!(h.req("GET", &format!("/v2/app/blobs/{dm}")).send().body, m);
    // Put by digest, with OCI 1.1 ?tag= parameters.
    let r = put_manifest(&h, "app", &format!("{dm}?tag=t1&tag=t2"), OCI_MANIFEST, &m);
    assert_eq!(r.status, 201, "{}", r.text());
    // One OCI-Tag header per tag set, so a client knows the parameters were honoured.
    let mut set: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("oci-tag"))
        .map(|(_, v)| v.as_str())
        .collect();
    set.sort_unstable();
    assert_eq!(set, ["t1", "t2"]);
    let tags = h.req("GET", "/v2/app/tags/list").send().json();
    assert_eq!(
        tags,
        serde_json::json!({"name": "app", "tags": ["t1", "t2", "v1"]})
    );
    // Wrong digest in the URL.
    let r = put_manifest(&h, "app", &sha256(b"nope"), OCI_MANIFEST, &m);
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "DIGEST_INVALID");
    // Delete a tag: only the tag goes.
    assert_eq!(h.req("DELETE", "/v2/app/manifests/v1").send().status, 202);
    assert_eq!(h.req("GET", "/v2/app/manifests/v1").send().status, 404);
    assert_eq!(
        h.req("GET", &format!("/v2/app/manifests/{dm}"))
            .send()
            .status,
        200
    );
    assert_eq!(h.req("GET", "/v2/app/manifests/t1").send().status, 200);
    // Delete by digest: manifest and its tags go.
    assert_eq!(
        h.req("DELETE", &format!("/v2/app/manifests/{dm}"))
            .send()
            .status,
        202
    );
    let r = h.req("GET", &format!("/v2/app/manifests/{dm}")).send();
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "MANIFEST_UNKNOWN");
    assert_eq!(h.req("GET", "/v2/app/manifests/t1").send().status, 404);
    assert_eq!(h.req("DELETE", "/v2/app/manifests/t1").send().status, 404);
    // Unknown repository, invalid tag.
    assert_eq!(
        h.req("GET", "/v2/nothing/manifests/latest").send().code(),
        "MANIFEST_UNKNOWN"
    );
    assert_eq!(h.req("GET", "/v2/app/manifests/-bad").send().status, 400);
}

#[test]
fn manifest_validation_errors() {
    let h = Hoard::start(&[]);
    let cfg = b"{}";
    let dc = push_blob(&h, "v", cfg);
    let missing = sha256(b"never pushed");
    // A layer that was never pushed.
    let m = image_manifest(
        (&dc, 2, "application/vnd.oci.image.config.v1+json"),
        &[(missing.clone(), 12)],
    );
    let r = put_manifest(&h, "v", "t", OCI_MANIFEST, &m);
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN");
    // ...unless it is a non-distributable layer with urls.
    let m2 = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    "digest": missing, "size": 12, "urls": ["https://example.invalid/layer"]}]
    })).unwrap();
    assert_eq!(
        put_manifest(&h, "v", "foreign", OCI_MANIFEST, &m2).status,
        201
    );
    // Invalid JSON, wrong schema, bad descriptor digest, wrong declared size, type mismatch.
    let r = put_manifest(&h, "v", "t", OCI_MANIFEST, b"{not json");
    assert_eq!((r.status, r.code().as_str()), (400, "MANIFEST_INVALID"));
    let r = put_manifest(&h, "v", "t", OCI_MANIFEST, br#"{"schemaVersion":1}"#);
    assert_eq!((r.status, r.code().as_str()), (400, "MANIFEST_INVALID"));
    let bad = image_manifest((&dc, 2, "x"), &[("sha256:1234".into(), 1)]);
    assert_eq!(
        put_manifest(&h, "v", "t", OCI_MANIFEST, &bad).code(),
        "MANIFEST_INVALID"
    );
    let wrong_size = image_manifest((&dc, 3, "application/vnd.oci.image.config.v1+json"), &[]);
    assert_eq!(
        put_manifest(&h, "v", "t", OCI_MANIFEST, &wrong_size).code(),
        "MANIFEST_INVALID"
    );
    let ok = image_manifest((&dc, 2, "application/vnd.oci.image.config.v1+json"), &[]);
    assert_eq!(
        put_manifest(&h, "v", "t", OCI_INDEX, &ok).code(),
        "MANIFEST_INVALID"
    );
    // 5 MiB manifest: 413, nothing stored.
    let mut big = b"{\"schemaVersion\":2,\"annotations\":{\"x\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 5 << 20));
    big.extend_from_slice(b"\"}}");
    let r = put_manifest(&h, "v", "big", OCI_MANIFEST, &big);
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "SIZE_INVALID");
    assert_eq!(h.req("GET", "/v2/v/manifests/big").send().status, 404);
    assert_eq!(
        h.req("GET", "/v2/v/tags/list").send().json()["tags"],
        serde_json::json!(["foreign"])
    );
}

#[test]
fn every_manifest_shape_buildkit_and_images_use() {
    let h = Hoard::start(&[]);
    let layer = bytes(14, 3000);
    let dl = push_blob(&h, "c", &layer);
    let zst = bytes(15, 2000);
    let dz = push_blob(&h, "c", &zst);
    let cc = br#"{"layers":[],"records":[]}"#;
    let dcc = push_blob(&h, "c", cc);
    let cachecfg = "application/vnd.buildkit.cacheconfig.v0";
    // Index whose entries are layers plus the cache config (BuildKit image-manifest=false).
    for (mt, layer_mt) in [
        (OCI_INDEX, "application/vnd.oci.image.layer.v1.tar+gzip"),
        (
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    ] {
        let idx = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": mt,
            "manifests": [
                {"mediaType": layer_mt, "digest": dl, "size": layer.len()},
                {"mediaType": cachecfg, "digest": dcc, "size": cc.len()},
            ]
        }))
        .unwrap();
        let r = put_manifest(&h, "c", "cache", mt, &idx);
        assert_eq!(r.status, 201, "{mt}: {}", r.text());
        let g = h.req("GET", "/v2/c/manifests/cache").send();
        assert_eq!(g.header("content-type"), Some(mt));
        assert_eq!(g.body, idx);
    }
    // Image manifest with a cache config and a zstd layer.
    let m = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": cachecfg, "digest": dcc, "size": cc.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": dz, "size": zst.len()}]
    })).unwrap();
    assert_eq!(put_manifest(&h, "c", "zstd", OCI_MANIFEST, &m).status, 201);
    // Docker schema 2 image and a multi-arch index of two images.
    let dcfg = push_blob(&h, "c", b"{\"os\":\"linux\"}");
    let dm = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": dcfg, "size": 14},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": dl, "size": layer.len()}]
    })).unwrap();
    let r = put_manifest(
        &h,
        "c",
        "docker",
        "application/vnd.docker.distribution.manifest.v2+json",
        &dm,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let amd64 = serde_json::json!({"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": sha256(&dm), "size": dm.len(), "platform": {"os": "linux", "architecture": "amd64"}});
    // A child that is stored neither as a manifest nor as a blob here: refused, whatever the
    // media type its descriptor claims, so the tag could not point at content that is not here.
    for missing_type in [
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
        OCI_INDEX,
    ] {
        let sparse = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [amd64, {"mediaType": missing_type, "digest": sha256(b"arm64 not pushed"), "size": 16, "platform": {"os": "linux", "architecture": "arm64"}}]
        })).unwrap();
        let r = put_manifest(&h, "c", "multi", OCI_INDEX, &sparse);
        assert_eq!(r.status, 400, "{missing_type}: {}", r.text());
        assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN", "{missing_type}");
        assert!(
            r.text().contains(&sha256(b"arm64 not pushed")),
            "{}",
            r.text()
        );
    }
    // A manifest pushed to another repository is not this repository's.
    let only_amd64 = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [amd64]
    }))
    .unwrap();
    assert_eq!(
        put_manifest(&h, "elsewhere", "multi", OCI_INDEX, &only_amd64).code(),
        "MANIFEST_BLOB_UNKNOWN"
    );
    assert_eq!(
        put_manifest(&h, "c", "multi", OCI_INDEX, &only_amd64).status,
        201
    );
    assert_eq!(
        h.req("GET", "/v2/c/tags/list").send().json()["tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| *t == "multi")
            .count(),
        1
    );
    // A missing layer entry in a cache index is refused.
    let broken = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(b"gone"), "size": 4}]
    })).unwrap();
    assert_eq!(
        put_manifest(&h, "c", "broken", OCI_INDEX, &broken).code(),
        "MANIFEST_BLOB_UNKNOWN"
    );
}

#[test]
fn referrers_and_subject() {
    let h = Hoard::start(&[]);
    let empty = b"{}";
    let de = push_blob(&h, "s", empty);
    let base = image_manifest((&de, 2, "application/vnd.oci.image.config.v1+json"), &[]);
    let db = sha256(&base);
    assert_eq!(
        put_manifest(&h, "s", "base", OCI_MANIFEST, &base).status,
        201
    );
    let mk = |at: &str, n: u8| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": de, "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": db, "size": base.len()},
            "annotations": {"n": n.to_string()}
        }))
        .unwrap()
    };
    let sig = mk("application/vnd.example.sig", 1);
    let sbom = mk("application/vnd.example.sbom", 2);
    let r = put_manifest(&h, "s", &sha256(&sig), OCI_MANIFEST, &sig);
    assert_eq!(r.status, 201);
    assert_eq!(r.header("oci-subject"), Some(db.as_str()));
    assert_eq!(
        put_manifest(&h, "s", &sha256(&sbom), OCI_MANIFEST, &sbom).status,
        201
    );
    let r = h.req("GET", &format!("/v2/s/referrers/{db}")).send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    let j = r.json();
    assert_eq!(j["schemaVersion"], 2);
    assert_eq!(j["manifests"].as_array().unwrap().len(), 2);
    let r = h
        .req(
            "GET",
            &format!("/v2/s/referrers/{db}?artifactType=application/vnd.example.sbom"),
        )
        .send();
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let j = r.json();
    assert_eq!(j["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(j["manifests"][0]["digest"], sha256(&sbom));
    assert_eq!(j["manifests"][0]["annotations"]["n"], "2");
    assert_eq!(
        j["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    // Subject that does not exist yet: accepted; no referrers for unknown digests.
    let r = h
        .req("GET", &format!("/v2/s/referrers/{}", sha256(b"none")))
        .send();
    assert_eq!(r.json()["manifests"], serde_json::json!([]));
    assert_eq!(
        h.req("GET", "/v2/s/referrers/sha256:bad").send().status,
        400
    );
}

#[test]
fn tag_and_catalog_pagination() {
    let h = Hoard::start(&[]);
    let de = push_blob(&h, "p", b"{}");
    let m = image_manifest((&de, 2, "application/vnd.oci.image.config.v1+json"), &[]);
    for t in ["d", "a", "c", "b", "e"] {
        assert_eq!(put_manifest(&h, "p", t, OCI_MANIFEST, &m).status, 201);
    }
    let r = h.req("GET", "/v2/p/tags/list?n=2").send();
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/p/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let r = h.req("GET", "/v2/p/tags/list?n=2&last=b").send();
    assert_eq!(r.json()["tags"], serde_json::json!(["c", "d"]));
    let r = h.req("GET", "/v2/p/tags/list?n=2&last=d").send();
    assert_eq!(r.json()["tags"], serde_json::json!(["e"]));
    assert!(r.header("link").is_none());
    assert_eq!(
        h.req("GET", "/v2/p/tags/list?n=0").send().json()["tags"],
        serde_json::json!([])
    );
    assert_eq!(h.req("GET", "/v2/p/tags/list?n=x").send().status, 400);
    let r = h.req("GET", "/v2/unknown/tags/list").send();
    assert_eq!((r.status, r.code().as_str()), (404, "NAME_UNKNOWN"));
    for repo in ["q/one", "q/two", "z"] {
        push_blob(&h, repo, b"x");
    }
    let r = h.req("GET", "/v2/_catalog?n=2").send();
    assert_eq!(r.json()["repositories"], serde_json::json!(["p", "q/one"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/_catalog?n=2&last=q/one>; rel=\"next\"")
    );
    let r = h.req("GET", "/v2/_catalog?last=q/one").send();
    assert_eq!(r.json()["repositories"], serde_json::json!(["q/two", "z"]));
}

#[test]
fn tls_client_hello_gets_an_http_answer() {
    let h = Hoard::start(&[]);
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    use std::io::Write;
    // The start of a TLS 1.2 ClientHello record.
    s.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ])
    .unwrap();
    let mut buf = Vec::new();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    // And plain HTTP keeps working.
    assert_eq!(h.req("GET", "/v2/").send().status, 200);
}

#[test]
fn unsupported_methods_get_405() {
    let h = Hoard::start(&[]);
    let r = h
        .req("PATCH", "/v2/r/manifests/x")
        .body(b"{}".to_vec())
        .send();
    assert_eq!((r.status, r.code().as_str()), (405, "UNSUPPORTED"));
    assert_eq!(h.req("DELETE", "/v2/r/tags/list").send().status, 405);
}

/// `O_DIRECT` as /proc shows it in an open file's flags (octal).
#[cfg(target_arch = "x86_64")]
const O_DIRECT: u32 = 0o40000;
/// `O_DIRECT` on aarch64.
#[cfg(not(target_arch = "x86_64"))]
const O_DIRECT: u32 = 0o200000;

/// The open-file flags of every upload file the daemon holds open (from /proc).
/// Starts an upload in `repo` and sends `data` in PATCHes of `chunk` bytes with `Content-Range`;
/// returns the session's location, for the final PUT.
fn patch_in_chunks(h: &Hoard, repo: &str, data: &[u8], chunk: usize) -> String {
    patch_from(h, start_upload(h, repo), data, 0, chunk)
}

/// PATCHes `data[from..]` to the session at `loc` in pieces of `chunk`; the next location.
fn patch_from(h: &Hoard, mut loc: String, data: &[u8], from: usize, chunk: usize) -> String {
    let mut off = from;
    for piece in data[from..].chunks(chunk) {
        let r = h
            .req("PATCH", &loc)
            .header(
                "Content-Range",
                &format!("{}-{}", off, off + piece.len() - 1),
            )
            .body(piece.to_vec())
            .send();
        assert_eq!(r.status, 202, "{}", r.text());
        off += piece.len();
        loc = r.header("location").unwrap().to_owned();
    }
    loc
}

/// PATCHes `data[from..to]`, pausing after `pause` bytes to run `during` while the request is
/// in flight (the upload's I/O thread is then at work); the next location and what `during` saw.
fn patch_pausing<T>(
    h: &Hoard,
    loc: &str,
    data: &[u8],
    (from, to, pause): (usize, usize, usize),
    during: impl FnOnce() -> T,
) -> (String, T) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Range: {from}-{}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        to - 1,
        to - from
    )
    .unwrap();
    s.write_all(&data[from..from + pause]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let seen = during();
    s.write_all(&data[from + pause..to]).unwrap();
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 202, "{}", r.text());
    (r.header("location").unwrap().to_owned(), seen)
}

fn upload_file_flags(h: &Hoard) -> Vec<u32> {
    let pid = h.child.id();
    let tmp = std::fs::canonicalize(h.data.join("tmp")).unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.starts_with(&tmp) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        out.push(flags);
    }
    out
}

/// Past `--direct-io-above` an upload's bytes bypass the page cache through aligned buffers on
/// the upload's I/O thread; whatever the chunking, the stored bytes are exactly the client's.
#[test]
fn uploads_past_direct_io_above_store_exact_bytes() {
    if disk_store_only("uploads_past_direct_io_above_store_exact_bytes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let mut h = Hoard::start_on(&data, &["--direct-io-above", "1MiB"]);
    let mut stored: Vec<(String, Vec<u8>)> = Vec::new();

    // Monolithic, crossing the switch point mid-body with an unaligned tail.
    let a = bytes(60, (5 << 20) + 123);
    stored.push((push_blob(&h, "big", &a), a));

    // Chunked in odd sizes: the switch falls inside a PATCH, later PATCHes continue directly.
    let c = bytes(61, (6 << 20) + 7);
    let dc = sha256(&c);
    let loc = start_upload(&h, "big");
    // While a PATCH past the switch point streams, the upload's I/O thread holds the file in
    // O_DIRECT mode.
    let first = (3 << 20) + 5;
    let (loc, flags) = patch_pausing(&h, &loc, &c, (0, first, (2 << 20) + 3), || {
        upload_file_flags(&h)
    });
    assert_eq!(flags.len(), 1, "one open upload file expected: {flags:?}");
    assert!(
        flags[0] & O_DIRECT != 0,
        "upload past direct_io_above is not written with O_DIRECT: flags {:o}",
        flags[0]
    );
    // Between requests the session holds its file, buffered, and no thread; later PATCHes
    // start the thread again at an unaligned offset.
    let idle = upload_file_flags(&h);
    assert_eq!(idle.len(), 1, "{idle:?}");
    assert_eq!(
        idle[0] & O_DIRECT,
        0,
        "idle upload file still direct: {:o}",
        idle[0]
    );
    assert!(!thread_names(&h).iter().any(|n| n == "hoard-upload-io"));
    let loc = patch_from(&h, loc, &c, first, 700_001);
    let r = h.req("PUT", &format!("{loc}?digest={dc}")).send();
    assert_eq!(r.status, 201, "{}", r.text());
    stored.push((dc, c));
    assert!(upload_file_flags(&h).is_empty(), "upload file left open");

    // sha512 named up front, and sha512 named only at the end of a chunked upload (hashed
    // again from the file the I/O thread wrote).
    let e = bytes(62, (3 << 20) + 1);
    let de = sha512(&e);
    let r = h
        .req("POST", &format!("/v2/big/blobs/uploads/?digest={de}"))
        .body(e.clone())
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    stored.push((de, e));
    let f = bytes(63, 4 << 20);
    let df = sha512(&f);
    let loc = start_upload(&h, "big");
    let r = h.req("PATCH", &loc).body(f.clone()).send();
    assert_eq!(r.status, 202, "{}", r.text());
    let r = h.req("PUT", &format!("{loc}?digest={df}")).send();
    assert_eq!(r.status, 201, "{}", r.text());
    stored.push((df, f));

    // A wrong digest and a client cut off past the switch point: nothing stored or left over.
    let g = bytes(64, 4 << 20);
    let wrong = sha256(b"something else");
    let r = h
        .req("POST", &format!("/v2/big/blobs/uploads/?digest={wrong}"))
        .body(g.clone())
        .send();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "DIGEST_INVALID");
    h.req(
        "POST",
        &format!("/v2/big/blobs/uploads/?digest={}", sha256(&g)),
    )
    .body(g[..3 << 20].to_vec())
    .send_cut(g.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.leftover_uploads() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(h.leftover_uploads(), 0, "tmp/ not cleaned");
    for d in [wrong, sha256(&g)] {
        assert_eq!(
            h.req("HEAD", &format!("/v2/big/blobs/{d}")).send().status,
            404
        );
    }

    let check = |h: &Hoard, stored: &[(String, Vec<u8>)]| {
        for (d, b) in stored {
            let r = h.req("GET", &format!("/v2/big/blobs/{d}")).send();
            assert_eq!(r.status, 200, "{d}");
            assert!(r.body == *b, "{d}: bytes differ");
        }
    };
    check(&h, &stored);
    assert!(h.stop().success());

    // With durability = "sync" too, and across a kill -9 right after the acknowledgement.
    let mut h = Hoard::start_on(
        &data,
        &["--direct-io-above", "1MiB", "--durability", "sync"],
    );
    check(&h, &stored);
    let s = bytes(65, (2 << 20) + 4095);
    stored.push((push_blob(&h, "big", &s), s));
    h.kill9();
    let h = Hoard::start_on(&data, &[]);
    check(&h, &stored);
    let r = h.req("POST", "/admin/verify").send();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Past 32 MiB an upload gets its own I/O thread, which writes through the page cache unless
/// `direct_io_above` says otherwise; with `durability = "sync"` a helper thread flushes what it
/// wrote as the upload goes.
#[test]
fn large_uploads_write_through_the_page_cache_and_store_exact_bytes() {
    if disk_store_only("large_uploads_write_through_the_page_cache_and_store_exact_bytes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let mut stored: Vec<(String, Vec<u8>)> = Vec::new();
    // A chunked upload left idle past the hand-over, then finished; returns the upload file's
    // open flags while it was idle and whether a write-behind thread was running then.
    let chunked_past_handover = |h: &Hoard, seed: u64, stored: &mut Vec<(String, Vec<u8>)>| {
        let c = bytes(seed, (34 << 20) + 5);
        let dc = sha256(&c);
        // The last PATCH pauses past the first MiB: smaller bodies are gathered, then written
        // in one step.
        let head = (32 << 20) + 1;
        let loc = patch_in_chunks(h, "large", &c[..head], 3_000_001);
        // While the last PATCH streams: the I/O thread's handle, and the write-behind
        // thread's when there is one.
        let (loc, (flags, flusher)) = patch_pausing(h, &loc, &c, (head, c.len(), 3 << 19), || {
            let flusher = thread_names(h).iter().any(|n| n == "hoard-upload-fl");
            (upload_file_flags(h), flusher)
        });
        assert!(!flags.is_empty(), "no open upload file");
        assert_eq!(flags.len(), 1 + usize::from(flusher), "{flags:?}");
        let r = h.req("PUT", &format!("{loc}?digest={dc}")).send();
        assert_eq!(r.status, 201, "{}", r.text());
        stored.push((dc, c));
        assert!(upload_file_flags(h).is_empty(), "upload file left open");
        (flags.iter().fold(0, |a, f| a | f), flusher)
    };
    let check = |h: &Hoard, stored: &[(String, Vec<u8>)]| {
        for (d, b) in stored {
            let r = h.req("GET", &format!("/v2/large/blobs/{d}")).send();
            assert_eq!(r.status, 200, "{d}");
            assert!(r.body == *b, "{d}: bytes differ");
        }
    };

    let mut h = Hoard::start_on(&data, &[]);
    let a = bytes(70, (40 << 20) + 123);
    stored.push((push_blob(&h, "large", &a), a));
    let (flags, flusher) = chunked_past_handover(&h, 71, &mut stored);
    assert_eq!(
        flags & O_DIRECT,
        0,
        "written through the page cache: flags {flags:o}"
    );
    assert!(!flusher, "group commit flushes; no write-behind expected");
    check(&h, &stored);
    assert!(h.stop().success());

    let h = Hoard::start_on(&data, &["--durability", "sync"]);
    let (flags, flusher) = chunked_past_handover(&h, 72, &mut stored);
    assert_eq!(
        flags & O_DIRECT,
        0,
        "written through the page cache: flags {flags:o}"
    );
    assert!(
        flusher,
        "a synced upload flushes as it goes: no write-behind thread"
    );
    let b = bytes(73, (33 << 20) + 4097);
    stored.push((push_blob(&h, "large", &b), b));
    check(&h, &stored);
    let r = h.req("POST", "/admin/verify").send();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn restart_keeps_tags_and_blobs_and_sigterm_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let mut h = Hoard::start_on(&data, &[]);
    let layer = bytes(16, 10_000);
    let dl = push_blob(&h, "keep", &layer);
    let dc = push_blob(&h, "keep", b"{}");
    let m = image_manifest(
        (&dc, 2, "application/vnd.oci.image.config.v1+json"),
        &[(dl.clone(), layer.len())],
    );
    assert_eq!(put_manifest(&h, "keep", "v1", OCI_MANIFEST, &m).status, 201);
    let status = h.stop();
    assert!(status.success(), "exit status {status:?}\n{}", h.log());
    assert!(data.join("index/clean").exists());
    let h = Hoard::start_on(&data, &[]);
    assert_eq!(h.req("GET", "/v2/keep/manifests/v1").send().body, m);
    assert_eq!(
        h.req("GET", &format!("/v2/keep/blobs/{dl}")).send().body,
        layer
    );
    assert!(!h.log().contains("unclean"), "{}", h.log());
}

#[test]
fn kill9_loses_nothing_acknowledged_and_reverifies() {
    if disk_store_only("kill9_loses_nothing_acknowledged_and_reverifies") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let mut h = Hoard::start_on(&data, &["--sync-interval", "1h"]);
    let mut pushed = Vec::new();
    for i in 0..20 {
        let b = bytes(100 + i, 1000 + i as usize);
        pushed.push((push_blob(&h, "crash", &b), b));
    }
    h.kill9();
    // Corrupt one blob as a power loss might (renamed, but its data never reached the disk).
    let (bad, _) = &pushed[3];
    let hex = bad.strip_prefix("sha256:").unwrap();
    std::fs::write(data.join("blobs/sha256").join(&hex[..2]).join(hex), b"torn").unwrap();
    let h = Hoard::start_on(&data, &[]);
    assert!(h.log().contains("unclean shutdown"), "{}", h.log());
    for (i, (d, b)) in pushed.iter().enumerate() {
        let r = h.req("GET", &format!("/v2/crash/blobs/{d}")).send();
        if i == 3 {
            assert_eq!(r.status, 404, "a corrupt blob must not be served");
        } else {
            assert_eq!(r.status, 200);
            assert_eq!(&r.body, b);
        }
    }
}

#[test]
fn config_file_env_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hoard.toml");
    std::fs::write(
        &cfg,
        "log_format = \"json\"\nupload_timeout = \"2s\"\n[store.disk]\ndurability = \"sync\"\n",
    )
    .unwrap();
    let h = Hoard::start(&["--config", cfg.to_str().unwrap()]);
    assert!(
        h.log().contains("\"message\":\"listening on http://"),
        "json log lines: {}",
        h.log()
    );
    push_blob(&h, "j", b"sync durability");
    // Idle sessions expire by the configured timeout.
    let r = h.req("POST", "/v2/j/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    std::thread::sleep(std::time::Duration::from_millis(4500));
    assert_eq!(h.req("GET", &loc).send().status, 404);
    // Unknown keys are refused with a clear message.
    std::fs::write(&cfg, "lisen = \"x\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second daemon on the same data directory is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            h.data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another hoard process"));
}
