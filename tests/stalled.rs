//! Slow and stalled clients against the real binary: they cost a buffer each, never a thread, so
//! everyone else's pushes and pulls go on; past `max_transfers` a transfer is refused with 503 and
//! Retry-After; a body that stops arriving and a client that stops reading are cut off after
//! `body_timeout` / `send_timeout`, and what they held (upload session, reservation, transfer
//! slot) is released.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const M: usize = 1 << 20;

/// A connection that asks for a blob and never reads the answer.
fn stalled_get(h: &Hoard, repo: &str, d: &str) -> TcpStream {
    let mut s = TcpStream::connect(h.addr).expect("connect");
    write!(
        s,
        "GET /v2/{repo}/blobs/{d} HTTP/1.1\r\nHost: {}\r\n\r\n",
        h.addr
    )
    .expect("send");
    s
}

/// A PATCH that announces `announced` bytes, sends `sent`, and then sends nothing more.
fn stalled_patch(h: &Hoard, repo: &str, announced: usize, sent: usize) -> (TcpStream, String) {
    let loc = start_upload(h, repo);
    let mut s = TcpStream::connect(h.addr).expect("connect");
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {announced}\r\n\r\n",
        h.addr
    )
    .expect("send head");
    s.write_all(&bytes(sent as u64, sent)).expect("send part");
    (s, loc)
}

/// Pushes a blob in two PATCHes and a PUT, then pulls it back whole.
fn push_and_pull(h: &Hoard, repo: &str, data: &[u8]) {
    let d = sha256(data);
    let mut loc = start_upload(h, repo);
    let half = data.len() / 2;
    for (a, b) in [(0, half), (half, data.len())] {
        let r = h
            .req("PATCH", &loc)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", &format!("{a}-{}", b - 1))
            .body(data[a..b].to_vec())
            .send();
        assert_eq!(r.status, 202, "{}", r.text());
        loc = r.header("location").expect("location").to_owned();
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = h.req("PUT", &format!("{loc}{sep}digest={d}")).send();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = h.req("GET", &format!("/v2/{repo}/blobs/{d}")).send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sha256(&r.body), d);
}

#[test]
fn six_hundred_stalled_clients_cost_buffers_not_threads_while_another_pushes_and_pulls() {
    let h = Hoard::start(&[]);
    // Larger than what socket buffers absorb, so a reader that never reads really stalls.
    let big = bytes(1, 32 * M);
    let big_d = push_blob(&h, "s", &big);
    let threads_before = h.proc_status("Threads");
    let rss_before = h.proc_status("VmRSS");
    let mut stalled = Vec::new();
    for _ in 0..300 {
        stalled.push(stalled_get(&h, "s", &big_d));
    }
    let mut sessions = Vec::new();
    for i in 0..300 {
        let (s, loc) = stalled_patch(&h, &format!("up{}", i % 7), 8 * M, 2 * M);
        stalled.push(s);
        sessions.push(loc);
    }
    // Give the daemon time to take in everything the stalled clients sent.
    std::thread::sleep(Duration::from_secs(2));

    // Meanwhile another client works as usual: chunked pushes, whole pulls, an image.
    let t = std::time::Instant::now();
    for i in 0..3u64 {
        push_and_pull(&h, "normal", &bytes(100 + i, 4 * M + i as usize));
    }
    let r = h.req("GET", &format!("/v2/s/blobs/{big_d}")).send();
    assert_eq!(r.status, 200);
    assert_eq!(
        sha256(&r.body),
        big_d,
        "a whole pull beside 600 stalled clients"
    );
    push_image(
        &h,
        "normal",
        "v1",
        None,
        &[bytes(7, 2 * M), bytes(8, 300 << 10)],
    );
    assert!(pull(&h, "normal", "v1"));

    eprintln!("the other client's work took {:?}", t.elapsed());
    // Threads the blocking pool started for the burst end after their idle keep-alive; a thread
    // held per stalled client (600) never would.
    let mut threads = h.proc_status("Threads");
    wait_until(
        "the daemon's threads settle",
        Duration::from_secs(40),
        || {
            threads = h.proc_status("Threads");
            threads < 64
        },
    );
    let rss = h.proc_status("VmRSS");
    eprintln!(
        "600 stalled clients: threads {threads_before} -> {threads}, RSS {} -> {} MiB",
        rss_before / 1024,
        rss / 1024
    );
    // 300 stalled pulls may hold about 512 KiB of response each; uploads hold none.
    assert!(
        rss < 400 * 1024,
        "{} MiB resident with 600 stalled clients",
        rss / 1024
    );
    // The stalled uploads are sessions still (their bodies may yet arrive), and a status check
    // answers at once with what was acknowledged rather than waiting behind the stalled PATCH.
    let page = status_page(&h);
    assert!(page.contains("uploads in progress: 300 "), "{page}");
    let r = h.req("GET", &sessions[0]).send();
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("range"), Some("0-0"));
    // ...until their clients go: each cut-off body drops its session and its bytes.
    drop(stalled);
    wait_until(
        "the cut-off uploads are dropped",
        Duration::from_secs(30),
        || status_page(&h).contains("uploads in progress: 0 (0 bytes reserved)"),
    );
    assert_eq!(h.req("GET", &sessions[0]).send().status, 404);
    assert_eq!(h.leftover_uploads(), 0);
}

#[test]
fn past_max_transfers_a_pull_gets_503_with_retry_after_and_a_stalled_reader_is_cut_off() {
    // Past the cap a transfer waits 5 s for a slot before its 503: the stalled readers are
    // cut off later than the three refusals below take.
    let h = Hoard::start(&["--max-transfers", "2", "--send-timeout", "25s"]);
    let big = bytes(2, 32 * M);
    let big_d = push_blob(&h, "cap", &big);
    let img = push_image(&h, "cap", "t", None, &[bytes(3, 1000)]);
    let a = stalled_get(&h, "cap", &big_d);
    let b = stalled_get(&h, "cap", &big_d);
    wait_until(
        "both stalled pulls hold a transfer",
        Duration::from_secs(10),
        || blob_status(&h, "cap", &big_d) == 503,
    );
    let r = h.req("GET", &format!("/v2/cap/blobs/{big_d}")).send();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.code(), "UNAVAILABLE");
    assert!(r.text().contains("max_transfers"), "{}", r.text());
    // An upload body is a transfer too; the session survives the refusal.
    let (loc, data) = {
        let r = h.req("POST", "/v2/cap/blobs/uploads/").send();
        (r.header("location").unwrap().to_owned(), bytes(4, 1000))
    };
    let r = h.req("PATCH", &loc).body(data.clone()).send();
    assert_eq!(r.status, 503, "{}", r.text());
    // What is not a blob transfer still answers: HEAD, manifests, tags.
    assert_eq!(
        h.req("HEAD", &format!("/v2/cap/blobs/{big_d}"))
            .send()
            .status,
        200
    );
    let r = h
        .req("GET", "/v2/cap/manifests/t")
        .header("Accept", OCI_MANIFEST)
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(sha256(&r.body), img.manifest);
    // The stalled readers are disconnected after send_timeout, which frees their transfers.
    wait_until(
        "the stalled pulls are cut off",
        Duration::from_secs(30),
        || blob_status(&h, "cap", &big_d) == 206,
    );
    assert!(h.log().contains("client stopped reading"), "{}", h.log());
    let r = h.req("PATCH", &loc).body(data.clone()).send();
    assert_eq!(r.status, 202, "{}", r.text());
    let r = h
        .req("PUT", &format!("{loc}?digest={}", sha256(&data)))
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = h.req("GET", &format!("/v2/cap/blobs/{big_d}")).send();
    assert_eq!(sha256(&r.body), big_d);
    // The cut-off connections really are closed: reading them ends.
    for mut s in [a, b] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        assert!(
            total < big.len(),
            "a cut-off pull received all {total} bytes"
        );
    }
}

#[test]
fn a_body_that_stops_arriving_is_cut_off_and_its_upload_dropped() {
    let h = Hoard::start(&["--body-timeout", "2s"]);
    let tmp = h.data.join("tmp");
    // A chunk that stops halfway: the session goes with its bytes and reservation.
    let (mut s, loc) = stalled_patch(&h, "slow", 8 * M, 2 * M);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("body_timeout"), "{}", r.text());
    assert_eq!(h.req("GET", &loc).send().status, 404);
    assert_eq!(
        count_files(&tmp),
        0,
        "the stalled upload's bytes stay behind"
    );
    assert!(
        status_page(&h).contains("uploads in progress: 0 (0 bytes reserved)"),
        "{}",
        status_page(&h)
    );
    // A small stalled chunk and a stalled monolithic upload, likewise.
    let (mut s, loc) = stalled_patch(&h, "slow", 1000, 10);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(read_response(&mut s, false).status, 400);
    assert_eq!(h.req("GET", &loc).send().status, 404);
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /v2/slow/blobs/uploads/?digest={} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n",
        sha256(b"never")
    )
    .unwrap();
    s.write_all(&bytes(9, 3 * M)).unwrap();
    assert_eq!(read_response(&mut s, false).status, 400);
    // A manifest body that stops arriving.
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "PUT /v2/slow/manifests/t HTTP/1.1\r\nHost: x\r\nContent-Type: {OCI_MANIFEST}\r\n\
         Content-Length: 900\r\n\r\n{{\"schemaVersion\":"
    )
    .unwrap();
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "MANIFEST_INVALID");
    assert_eq!(count_files(&tmp), 0);
    // A client that sends slowly but steadily is not cut off: 8 pieces, 500 ms apart.
    let data = bytes(10, 2 * M);
    let r = h.req("POST", "/v2/slow/blobs/uploads/").send();
    let loc = r.header("location").unwrap().to_owned();
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    )
    .unwrap();
    for piece in data.chunks(data.len() / 8) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(read_response(&mut s, false).status, 202);
    let r = h
        .req("PUT", &format!("{loc}?digest={}", sha256(&data)))
        .send();
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn chunked_uploads_between_patches_hold_no_thread_and_store_exact_bytes() {
    let h = Hoard::start(&[]);
    // Past 32 MiB an upload writes through its own I/O thread while its body streams.
    let sessions: Vec<(String, Vec<u8>)> = (0..4u64)
        .map(|i| {
            let loc = start_upload(&h, "chunks");
            (loc, bytes(50 + i, 38 * M + 1000 + i as usize))
        })
        .collect();
    let first = 33 * M + 777;
    let mut next = Vec::new();
    for (loc, data) in &sessions {
        let r = h
            .req("PATCH", loc)
            .header("Content-Range", &format!("0-{}", first - 1))
            .body(data[..first].to_vec())
            .send();
        assert_eq!(r.status, 202, "{}", r.text());
        next.push(r.header("location").unwrap().to_owned());
    }
    // Four sessions idle between chunks, each past the I/O thread's start: none keeps one.
    assert_eq!(h.threads_named("hoard-upload-io"), 0);
    let r = h.req("GET", &next[0]).send();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("range"), Some(&*format!("0-{}", first - 1)));
    for (loc, (_, data)) in next.iter().zip(&sessions) {
        let r = h
            .req("PATCH", loc)
            .header("Content-Range", &format!("{first}-{}", data.len() - 1))
            .body(data[first..].to_vec())
            .send();
        assert_eq!(r.status, 202, "{}", r.text());
        let loc = r.header("location").unwrap().to_owned();
        let d = sha256(data);
        let r = h.req("PUT", &format!("{loc}?digest={d}")).send();
        assert_eq!(r.status, 201, "{}", r.text());
        let r = h.req("GET", &format!("/v2/chunks/blobs/{d}")).send();
        assert_eq!(sha256(&r.body), d);
    }
    assert_eq!(h.threads_named("hoard-upload-io"), 0);
}
