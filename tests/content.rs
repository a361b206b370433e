//! containerd's content API on hoard's gRPC socket, tried with the real `ctr`, a real
//! containerd using hoard as its `proxy_plugins` content store, and a gRPC client for what `ctr`
//! cannot send (masks, filters, cut streams, error codes, leases under a stepped clock).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use hoard::proto::content as api;
use hoard::proto::content::content_client::ContentClient;
use hoard::proto::leases as lapi;
use hoard::proto::leases::leases_client::LeasesClient;
use tonic::transport::Channel;
use tonic::Code;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn sock(h: &Hoard) -> PathBuf {
    h.data.join("hoard.sock")
}

fn ctr(h: &Hoard, ns: &str) -> Command {
    let ctr = require_tool("ctr", "install it with `apt-get install containerd`");
    let mut c = Command::new(ctr);
    c.arg("--address").arg(sock(h)).args(["--namespace", ns]);
    c
}

async fn channel(h: &Hoard) -> Channel {
    hoard::grpc::connect_socket(&sock(h)).await.unwrap()
}

/// A request with containerd's namespace (and optionally a lease or a view) in its metadata.
fn req<T>(msg: T, ns: &str, extra: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    for (k, v) in extra {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    r
}

fn write_msg(
    action: api::WriteAction,
    r: &str,
    offset: i64,
    data: &[u8],
) -> api::WriteContentRequest {
    api::WriteContentRequest {
        action: action as i32,
        r#ref: r.into(),
        offset,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

/// Sends `msgs` on one Write stream; returns the replies and how the stream ended.
async fn write(
    ch: &Channel,
    ns: &str,
    extra: &[(&'static str, &str)],
    msgs: Vec<api::WriteContentRequest>,
) -> (Vec<api::WriteContentResponse>, Result<(), tonic::Status>) {
    let mut c = ContentClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let stream = tokio_stream::iter(msgs);
    let mut out = Vec::new();
    let mut s = match c.write(req(stream, ns, extra)).await {
        Err(e) => return (out, Err(e)),
        Ok(resp) => resp.into_inner(),
    };
    loop {
        match s.message().await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, Ok(())),
            Err(e) => return (out, Err(e)),
        }
    }
}

async fn commit_blob(
    ch: &Channel,
    ns: &str,
    r: &str,
    data: &[u8],
    labels: &[(&str, &str)],
) -> String {
    let d = sha256(data);
    let mut msg = write_msg(api::WriteAction::Commit, r, 0, data);
    msg.total = data.len() as i64;
    msg.expected = d.clone();
    msg.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (replies, end) = write(ch, ns, &[], vec![msg]).await;
    end.unwrap();
    assert_eq!(replies.last().unwrap().digest, d);
    d
}

async fn info(ch: &Channel, ns: &str, d: &str) -> Result<api::Info, tonic::Status> {
    let mut c = ContentClient::new(ch.clone());
    c.info(req(api::InfoRequest { digest: d.into() }, ns, &[]))
        .await
        .map(|r| r.into_inner().info.unwrap())
}

async fn read_all(
    ch: &Channel,
    ns: &str,
    d: &str,
    offset: i64,
    size: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut c = ContentClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let mut s = c
        .read(req(
            api::ReadContentRequest {
                digest: d.into(),
                offset,
                size,
            },
            ns,
            &[],
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut at = offset.max(0);
    while let Some(m) = s.message().await? {
        assert!(m.data.len() <= 1 << 20, "a Read message over 1 MiB");
        assert_eq!(m.offset, at, "Read messages in order");
        at += m.data.len() as i64;
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

async fn list(
    ch: &Channel,
    ns: Option<&str>,
    view: Option<&str>,
    filters: &[&str],
) -> Vec<api::Info> {
    let mut c = ContentClient::new(ch.clone());
    let mut r = tonic::Request::new(api::ListContentRequest {
        filters: filters.iter().map(|s| s.to_string()).collect(),
    });
    if let Some(ns) = ns {
        r.metadata_mut()
            .insert("containerd-namespace", ns.parse().unwrap());
    }
    if let Some(v) = view {
        r.metadata_mut().insert("hoard-view", v.parse().unwrap());
    }
    let mut s = c.list(r).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        out.extend(m.info);
    }
    out
}

fn digests(infos: &[api::Info]) -> Vec<String> {
    let mut v: Vec<String> = infos.iter().map(|i| i.digest.clone()).collect();
    v.sort();
    v
}

#[test]
fn ctr_content_commands_work_on_the_socket() {
    let h = Hoard::start(&[]);
    // The socket: where the README says, mode 0660.
    let meta = std::fs::metadata(sock(&h)).expect("hoard.sock in the data directory");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // `ctr version` names the server it talks to.
    let v = run_ok(ctr(&h, "test").arg("version"));
    assert!(
        v.contains(&format!("Version:  v{}", env!("CARGO_PKG_VERSION")))
            && v.contains("Revision: hoard"),
        "{v}"
    );

    // A 256 MiB ingest from stdin, as `ctr content ingest` sends it (1 MiB writes, a lease).
    // (32 MiB in the S3 and tiered passes: their S3 server keeps objects in Python's memory.)
    let mib: u64 = if on_disk() { 256 } else { 32 };
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big).unwrap();
        for i in 0..mib {
            f.write_all(&bytes(i, 1 << 20)).unwrap();
        }
    }
    let big_digest = format!(
        "sha256:{}",
        run_ok(Command::new("sha256sum").arg(&big))
            .split_whitespace()
            .next()
            .unwrap()
    );
    run_ok(
        ctr(&h, "test")
            .args([
                "content",
                "ingest",
                "--expected-size",
                &(mib << 20).to_string(),
                "--expected-digest",
                &big_digest,
                "big-ingest",
            ])
            .stdin(std::fs::File::open(&big).unwrap()),
    );
    let small = bytes(7, 10_000);
    let small_path = tmp.path().join("small");
    std::fs::write(&small_path, &small).unwrap();
    let small_digest = sha256(&small);
    run_ok(
        ctr(&h, "test")
            .args([
                "content",
                "ingest",
                "--expected-digest",
                &small_digest,
                "small",
            ])
            .stdin(std::fs::File::open(&small_path).unwrap()),
    );
    // Again: already there, which ctr takes as success.
    run_ok(
        ctr(&h, "test")
            .args([
                "content",
                "ingest",
                "--expected-digest",
                &small_digest,
                "small",
            ])
            .stdin(std::fs::File::open(&small_path).unwrap()),
    );

    let ls = run_ok(ctr(&h, "test").args(["content", "ls"]));
    assert!(
        ls.contains(&big_digest) && ls.contains(&small_digest),
        "{ls}"
    );
    // ctr prints sizes with four significant digits.
    let mb = (mib << 20) as f64 / 1e6;
    let size = format!("{mb:.0$}MB", 4 - (mb as u64).to_string().len());
    assert!(ls.contains(&size), "{size} in {ls}");
    // Another namespace holds nothing of it.
    let other = run_ok(ctr(&h, "elsewhere").args(["content", "ls"]));
    assert!(!other.contains(&small_digest), "{other}");

    // Byte for byte back.
    let out = Command::new(require_tool("ctr", "apt-get install containerd"))
        .arg("--address")
        .arg(sock(&h))
        .args(["--namespace", "test", "content", "get", &big_digest])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        sha256(&out.stdout),
        big_digest,
        "ctr content get of the large blob"
    );

    // Labels.
    run_ok(ctr(&h, "test").args(["content", "label", &small_digest, "team=a", "keep=yes"]));
    let ls = run_ok(ctr(&h, "test").args(["content", "ls"]));
    let line = ls.lines().find(|l| l.contains(&small_digest)).unwrap();
    assert!(
        line.contains("team=a") && line.contains("keep=yes"),
        "{line}"
    );
    run_ok(ctr(&h, "test").args(["content", "label", &small_digest, "team="]));
    let ls = run_ok(ctr(&h, "test").args(["content", "ls"]));
    let line = ls.lines().find(|l| l.contains(&small_digest)).unwrap();
    assert!(
        !line.contains("team=a") && line.contains("keep=yes"),
        "{line}"
    );

    // `active` lists an ingest a cut stream left.
    let rt = rt();
    rt.block_on(async {
        let ch = channel(&h).await;
        let (_, end) = write(
            &ch,
            "test",
            &[],
            vec![write_msg(
                api::WriteAction::Write,
                "half-done",
                0,
                &bytes(9, 5000),
            )],
        )
        .await;
        end.unwrap();
    });
    let active = run_ok(ctr(&h, "test").args(["content", "active"]));
    assert!(active.contains("half-done"), "{active}");
    assert!(
        active.contains("5000") || active.contains("5.0kB") || active.contains("5kB"),
        "{active}"
    );

    // rm drops the view's hold; the bytes stay for what else holds them (nothing here: the
    // lifecycle collects them after the orphan grace).
    run_ok(ctr(&h, "test").args(["content", "rm", &small_digest]));
    let ls = run_ok(ctr(&h, "test").args(["content", "ls"]));
    assert!(!ls.contains(&small_digest), "{ls}");
    // (ctr ignores NotFound on rm; the gRPC tests check the code.) The bytes are still there
    // until the lifecycle judges them: rm never deletes bytes.
    rt.block_on(async {
        let ch = channel(&h).await;
        assert_eq!(
            read_all(&ch, "test", &small_digest, 0, 0).await.unwrap(),
            small
        );
    });

    // A blob pushed over /v2/ is Info-able and readable here; one written here mounts into a
    // repository.
    let layer = bytes(11, 70_000);
    let pushed = push_blob(&h, "team/app", &layer);
    rt.block_on(async {
        let ch = channel(&h).await;
        let i = info(&ch, "test", &pushed).await.unwrap();
        assert_eq!(i.size, 70_000);
        assert_eq!(read_all(&ch, "test", &pushed, 0, 0).await.unwrap(), layer);
    });
    let r = h
        .req(
            "POST",
            &format!("/v2/team/mounted/blobs/uploads/?mount={big_digest}&from=containerd/default/content/test"),
        )
        .send();
    assert_eq!(r.status, 201, "mount of a content-API blob: {}", r.text());
    assert_eq!(blob_status(&h, "team/mounted", &big_digest), 206);
}

#[test]
fn write_follows_containerds_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let mut h = Hoard::start_on(&data_dir, &[]);
    let rt = rt();
    let payload = bytes(21, 3 << 20);
    let digest = sha256(&payload);
    rt.block_on(async {
        let ch = channel(&h).await;
        // No ref on the first message.
        let (_, end) = write(
            &ch,
            "t",
            &[],
            vec![write_msg(api::WriteAction::Stat, "", 0, b"")],
        )
        .await;
        assert_eq!(end.unwrap_err().code(), Code::InvalidArgument);

        // STAT answers offset 0, times and total.
        let mut stat = write_msg(api::WriteAction::Stat, "r1", 0, b"");
        stat.total = payload.len() as i64;
        stat.expected = digest.clone();
        let (replies, end) = write(&ch, "t", &[], vec![stat.clone()]).await;
        end.unwrap();
        assert_eq!(replies[0].offset, 0);
        assert_eq!(replies[0].total, payload.len() as i64);
        assert!(replies[0].started_at.is_some() && replies[0].updated_at.is_some());

        // 1 MiB, then the stream is cut: resumable at 1 MiB.
        let (replies, end) = write(
            &ch,
            "t",
            &[],
            vec![write_msg(
                api::WriteAction::Write,
                "r1",
                0,
                &payload[..1 << 20],
            )],
        )
        .await;
        end.unwrap();
        assert_eq!(replies[0].offset, 1 << 20);
        assert_eq!(replies[0].digest, sha256(&payload[..1 << 20]));
        let mut c = ContentClient::new(ch.clone());
        let st = c
            .status(req(api::StatusRequest { r#ref: "r1".into() }, "t", &[]))
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(
            (st.offset, st.total, st.expected.as_str()),
            (1 << 20, 3 << 20, digest.as_str())
        );
        let e = c
            .status(req(
                api::StatusRequest {
                    r#ref: "nope".into(),
                },
                "t",
                &[],
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        // A write at the wrong offset.
        let (_, end) = write(
            &ch,
            "t",
            &[],
            vec![write_msg(api::WriteAction::Write, "r1", 5, b"xx")],
        )
        .await;
        assert_eq!(end.unwrap_err().code(), Code::OutOfRange);

        // Two writers on one ref: the second is Unavailable while the first holds it.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut c1 = ContentClient::new(ch.clone());
        tx.send(write_msg(api::WriteAction::Stat, "r1", 0, b""))
            .await
            .unwrap();
        let mut first = c1
            .write(req(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                "t",
                &[],
            ))
            .await
            .unwrap()
            .into_inner();
        let held = first.message().await.unwrap().unwrap();
        assert_eq!(held.offset, 1 << 20);
        let (_, end) = write(
            &ch,
            "t",
            &[],
            vec![write_msg(api::WriteAction::Stat, "r1", 0, b"")],
        )
        .await;
        assert_eq!(end.unwrap_err().code(), Code::Unavailable);
        // The holder goes on from its offset.
        tx.send(write_msg(
            api::WriteAction::Write,
            "r1",
            1 << 20,
            &payload[1 << 20..2 << 20],
        ))
        .await
        .unwrap();
        assert_eq!(first.message().await.unwrap().unwrap().offset, 2 << 20);
        drop(tx);
        assert!(first.message().await.unwrap().is_none());
        // A small ingest (kept in memory while its stream lasts) cut off too.
        let (_, end) = write(
            &ch,
            "t",
            &[],
            vec![write_msg(api::WriteAction::Write, "tiny", 0, b"0123456789")],
        )
        .await;
        end.unwrap();
        // Labels, set at the commit and changed after it, to be read after the restart.
        let labelled = commit_blob(&ch, "t", "labelled", b"labelled", &[("a", "1")]).await;
        ContentClient::new(ch.clone())
            .update(req(
                api::UpdateRequest {
                    info: Some(api::Info {
                        digest: labelled,
                        labels: [("b".to_string(), "2".to_string())].into(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["labels.b".into()],
                    }),
                },
                "t",
                &[],
            ))
            .await
            .unwrap();
    });

    // Across a restart: the ingest is still at 2 MiB and the hash state is right.
    h.stop();
    let mut h = Hoard::start_on(&data_dir, &[]);
    rt.block_on(async {
        let ch = channel(&h).await;
        let mut stat = write_msg(api::WriteAction::Stat, "r1", 0, b"");
        stat.expected = digest.clone();
        let (replies, end) = write(&ch, "t", &[], vec![stat]).await;
        end.unwrap();
        assert_eq!(replies[0].offset, 2 << 20, "resumed after a restart");
        assert_eq!(replies[0].digest, sha256(&payload[..2 << 20]));
        let mut tiny = write_msg(api::WriteAction::Commit, "tiny", 10, b"abc");
        tiny.expected = sha256(b"0123456789abc");
        let (replies, end) = write(&ch, "t", &[], vec![tiny]).await;
        end.unwrap();
        assert_eq!(
            replies[0].offset, 13,
            "a small ingest resumed after a restart"
        );
        let labels = info(&ch, "t", &sha256(b"labelled")).await.unwrap().labels;
        let want: HashMap<String, String> =
            [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into();
        assert_eq!(labels, want, "labels after a restart");
        // A small blob: read from the store the first time after the restart, from memory
        // the second; whole and by range either way.
        let small = sha256(b"labelled");
        for _ in 0..2 {
            assert_eq!(read_all(&ch, "t", &small, 0, 0).await.unwrap(), b"labelled");
            assert_eq!(read_all(&ch, "t", &small, 2, 3).await.unwrap(), b"bel");
            assert_eq!(read_all(&ch, "t", &small, 5, 100).await.unwrap(), b"led");
            assert_eq!(read_all(&ch, "t", &small, 8, 0).await.unwrap(), b"");
            let e = read_all(&ch, "t", &small, 9, 0).await.unwrap_err();
            assert_eq!(e.code(), Code::OutOfRange);
        }
        // A commit whose size is wrong.
        let mut bad = write_msg(api::WriteAction::Commit, "r1", 2 << 20, &payload[2 << 20..]);
        bad.total = (3 << 20) + 1;
        let (_, end) = write(&ch, "t", &[], vec![bad]).await;
        assert_eq!(end.unwrap_err().code(), Code::FailedPrecondition);
        // The bytes of that message were written: commit with the right size now.
        let mut ok = write_msg(api::WriteAction::Commit, "r1", 3 << 20, b"");
        ok.total = 3 << 20;
        ok.labels.insert("from".into(), "commit".into());
        let (replies, end) = write(&ch, "t", &[], vec![ok]).await;
        end.unwrap();
        assert_eq!(replies[0].offset, 3 << 20);
        assert_eq!(replies[0].digest, digest);
        let i = info(&ch, "t", &digest).await.unwrap();
        assert_eq!(i.size, 3 << 20);
        assert_eq!(i.labels.get("from").map(String::as_str), Some("commit"));
        assert_eq!(read_all(&ch, "t", &digest, 0, 0).await.unwrap(), payload);
        // Offset and size.
        assert_eq!(
            read_all(&ch, "t", &digest, 1000, 2 << 20).await.unwrap(),
            &payload[1000..1000 + (2 << 20)]
        );
        assert_eq!(
            read_all(&ch, "t", &digest, (3 << 20) - 10, 100)
                .await
                .unwrap(),
            &payload[(3 << 20) - 10..]
        );
        let e = read_all(&ch, "t", &digest, (3 << 20) + 1, 0)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        let missing = sha256(b"never stored");
        assert_eq!(
            read_all(&ch, "t", &missing, 0, 0).await.unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(
            info(&ch, "t", &missing).await.unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(
            info(&ch, "t", "sha256:nothex").await.unwrap_err().code(),
            Code::InvalidArgument
        );

        // An existing digest: AlreadyExists, and the view holds it.
        let mut again = write_msg(api::WriteAction::Stat, "r2", 0, b"");
        again.expected = digest.clone();
        let (_, end) = write(&ch, "other-ns", &[], vec![again]).await;
        assert_eq!(end.unwrap_err().code(), Code::AlreadyExists);
        assert!(digests(&list(&ch, Some("other-ns"), None, &[]).await).contains(&digest));

        // A digest mismatch at commit.
        let mut wrong = write_msg(api::WriteAction::Commit, "r3", 0, b"some bytes");
        wrong.expected = sha256(b"other bytes");
        let (_, end) = write(&ch, "t", &[], vec![wrong]).await;
        assert_eq!(end.unwrap_err().code(), Code::FailedPrecondition);

        // Offset 0 on a non-empty ingest starts it again.
        let (r, end) = write(
            &ch,
            "t",
            &[],
            vec![
                write_msg(api::WriteAction::Write, "r4", 0, b"first attempt"),
                write_msg(api::WriteAction::Write, "r4", 0, b"again"),
            ],
        )
        .await;
        end.unwrap();
        assert_eq!(r[1].offset, 5);
        assert_eq!(r[1].digest, sha256(b"again"));
        let mut commit = write_msg(api::WriteAction::Commit, "r4", 5, b"");
        commit.expected = sha256(b"again");
        let (_, end) = write(&ch, "t", &[], vec![commit]).await;
        end.unwrap();

        // Abort: the ingest goes; unknown refs are NotFound.
        let mut c = ContentClient::new(ch.clone());
        let (_, end) = write(
            &ch,
            "t",
            &[],
            vec![write_msg(api::WriteAction::Write, "r5", 0, b"x")],
        )
        .await;
        end.unwrap();
        c.abort(req(api::AbortRequest { r#ref: "r5".into() }, "t", &[]))
            .await
            .unwrap();
        let e = c
            .abort(req(api::AbortRequest { r#ref: "r5".into() }, "t", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let statuses = c
            .list_statuses(req(api::ListStatusesRequest { filters: vec![] }, "t", &[]))
            .await
            .unwrap()
            .into_inner()
            .statuses;
        let refs: Vec<&str> = statuses.iter().map(|s| s.r#ref.as_str()).collect();
        assert_eq!(
            refs,
            vec!["r3"],
            "only the failed commit's ingest is left: {refs:?}"
        );
        let filtered = c
            .list_statuses(req(
                api::ListStatusesRequest {
                    filters: vec!["ref==nothing".into()],
                },
                "t",
                &[],
            ))
            .await
            .unwrap()
            .into_inner()
            .statuses;
        assert!(filtered.is_empty());
    });
    assert_invariant_1(&h, "content writes");
    h.stop();
}

#[test]
fn update_masks_list_filters_views_and_leases() {
    let h = Hoard::start(&["--orphan-grace", "0s"]);
    let rt = rt();
    rt.block_on(async {
        let ch = channel(&h).await;
        let a = commit_blob(&ch, "ns1", "a", b"alpha", &[("team", "a"), ("tier", "1")]).await;
        let b = commit_blob(&ch, "ns1", "b", b"beta", &[("team", "b")]).await;
        let c = commit_blob(&ch, "ns2", "c", b"gamma", &[]).await;
        let mut cc = ContentClient::new(ch.clone());

        // Masks: one label, all labels, an immutable field.
        let update = |d: &str, labels: &[(&str, &str)], paths: &[&str]| api::UpdateRequest {
            info: Some(api::Info {
                digest: d.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        };
        let i = cc
            .update(req(
                update(&a, &[("team", "z"), ("tier", "9")], &["labels.team"]),
                "ns1",
                &[],
            ))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        let want: HashMap<String, String> = [
            ("team".to_string(), "z".to_string()),
            ("tier".into(), "1".into()),
        ]
        .into();
        assert_eq!(i.labels, want, "only labels.team changed");
        let i = cc
            .update(req(update(&a, &[], &["labels.tier"]), "ns1", &[]))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(i.labels.len(), 1, "labels.tier removed: {:?}", i.labels);
        let i = cc
            .update(req(update(&a, &[("new", "1")], &["labels"]), "ns1", &[]))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(i.labels.keys().collect::<Vec<_>>(), vec!["new"]);
        let i = cc
            .update(req(update(&a, &[("x", "y")], &[]), "ns1", &[]))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(
            i.labels.keys().collect::<Vec<_>>(),
            vec!["x"],
            "empty mask: all labels"
        );
        let e = cc
            .update(req(update(&a, &[], &["size"]), "ns1", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let long = "v".repeat(5000);
        let e = cc
            .update(req(update(&a, &[("k", long.as_str())], &[]), "ns1", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = cc
            .update(req(update(&sha256(b"absent"), &[], &[]), "ns1", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        // Labels live through the update in the index: a new channel sees them.
        assert_eq!(
            info(&ch, "ns1", &a)
                .await
                .unwrap()
                .labels
                .get("x")
                .map(String::as_str),
            Some("y")
        );

        // Filters: labels, digests, regexps; alternatives OR-ed, selectors AND-ed.
        assert_eq!(digests(&list(&ch, Some("ns1"), None, &[]).await), {
            let mut v = vec![a.clone(), b.clone()];
            v.sort();
            v
        });
        assert_eq!(
            digests(&list(&ch, Some("ns1"), None, &["labels.team==b"]).await),
            vec![b.clone()]
        );
        assert_eq!(
            digests(&list(&ch, Some("ns1"), None, &[r#"labels."x""#]).await),
            vec![a.clone()]
        );
        assert_eq!(
            digests(
                &list(
                    &ch,
                    Some("ns1"),
                    None,
                    &[&format!("digest=={a}"), "labels.team==b"]
                )
                .await
            )
            .len(),
            2
        );
        assert!(list(
            &ch,
            Some("ns1"),
            None,
            &[&format!("digest=={a},labels.team==b")]
        )
        .await
        .is_empty());
        assert_eq!(
            digests(&list(&ch, Some("ns1"), None, &[&format!("digest~=^{}", &b[..12])]).await),
            vec![b.clone()]
        );
        let e = cc
            .list(req(
                api::ListContentRequest {
                    filters: vec!["labels.x==".into()],
                },
                "ns1",
                &[],
            ))
            .await
            .err()
            .map(|e| e.code());
        assert_eq!(e, Some(Code::InvalidArgument));
        // No namespace: the whole view (what containerd's collector walks).
        assert_eq!(list(&ch, None, None, &[]).await.len(), 3);
        // Another view sees none of it; deleting there touches nothing here.
        assert!(list(&ch, None, Some("node-b"), &[]).await.is_empty());
        let mut other = tonic::Request::new(api::DeleteContentRequest { digest: c.clone() });
        other
            .metadata_mut()
            .insert("hoard-view", "node-b".parse().unwrap());
        assert_eq!(cc.delete(other).await.unwrap_err().code(), Code::NotFound);
        assert!(digests(&list(&ch, Some("ns2"), None, &[]).await).contains(&c));

        // Leases.
        let mut lc = LeasesClient::new(ch.clone());
        let l = lc
            .create(req(
                lapi::CreateRequest {
                    id: "build-1".into(),
                    labels: [("owner".to_string(), "ci".to_string())].into(),
                },
                "ns1",
                &[],
            ))
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap();
        assert_eq!(l.id, "build-1");
        assert_eq!(
            lc.create(req(
                lapi::CreateRequest {
                    id: "build-1".into(),
                    ..Default::default()
                },
                "ns1",
                &[]
            ))
            .await
            .unwrap_err()
            .code(),
            Code::AlreadyExists
        );
        let generated = lc
            .create(req(lapi::CreateRequest::default(), "ns1", &[]))
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap();
        assert!(!generated.id.is_empty());
        let listed = lc
            .list(req(
                lapi::ListRequest {
                    filters: vec!["labels.owner==ci".into()],
                },
                "ns1",
                &[],
            ))
            .await
            .unwrap()
            .into_inner()
            .leases;
        assert_eq!(
            listed.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
            vec!["build-1"]
        );
        let listed = lc
            .list(req(lapi::ListRequest { filters: vec![] }, "ns2", &[]))
            .await
            .unwrap()
            .into_inner()
            .leases;
        assert!(listed.is_empty(), "leases are per namespace");

        // Content written under the lease, and a resource added by hand.
        let leased_bytes = bytes(5, 50_000);
        let leased = sha256(&leased_bytes);
        let mut msg = write_msg(api::WriteAction::Commit, "leased", 0, &leased_bytes);
        msg.expected = leased.clone();
        let (_, end) = write(&ch, "ns1", &[("containerd-lease", "build-1")], vec![msg]).await;
        end.unwrap();
        lc.add_resource(req(
            lapi::AddResourceRequest {
                id: "build-1".into(),
                resource: Some(lapi::Resource {
                    id: b.clone(),
                    r#type: "content".into(),
                }),
            },
            "ns1",
            &[],
        ))
        .await
        .unwrap();
        lc.add_resource(req(
            lapi::AddResourceRequest {
                id: "build-1".into(),
                resource: Some(lapi::Resource {
                    id: "snap-1".into(),
                    r#type: "snapshots/overlayfs".into(),
                }),
            },
            "ns1",
            &[],
        ))
        .await
        .unwrap();
        let res = lc
            .list_resources(req(
                lapi::ListResourcesRequest {
                    id: "build-1".into(),
                },
                "ns1",
                &[],
            ))
            .await
            .unwrap()
            .into_inner()
            .resources;
        let mut ids: Vec<String> = res.iter().map(|r| r.id.clone()).collect();
        ids.sort();
        let mut want = vec![leased.clone(), b.clone(), "snap-1".to_string()];
        want.sort();
        assert_eq!(ids, want);
        // Writing under a lease that does not exist.
        let (_, end) = write(
            &ch,
            "ns1",
            &[("containerd-lease", "no-such-lease")],
            vec![write_msg(api::WriteAction::Write, "x", 0, b"x")],
        )
        .await;
        assert_eq!(end.unwrap_err().code(), Code::NotFound);

        // The view lets go of b and the leased blob: the lease keeps both through a collection.
        for d in [&b, &leased] {
            cc.delete(req(
                api::DeleteContentRequest { digest: d.clone() },
                "ns1",
                &[],
            ))
            .await
            .unwrap();
        }
        assert_eq!(
            cc.delete(req(
                api::DeleteContentRequest { digest: b.clone() },
                "ns1",
                &[]
            ))
            .await
            .unwrap_err()
            .code(),
            Code::NotFound
        );
        let gc = h.req("POST", "/admin/gc").send();
        assert_eq!(gc.status, 200, "{}", gc.text());
        assert_eq!(
            read_all(&ch, "ns2", &leased, 0, 0).await.unwrap(),
            leased_bytes
        );
        assert_eq!(read_all(&ch, "ns2", &b, 0, 0).await.unwrap(), b"beta");
        // Lease removed: nothing holds them any more, the next collection takes them.
        lc.delete(req(
            lapi::DeleteRequest {
                id: "build-1".into(),
                sync: false,
            },
            "ns1",
            &[],
        ))
        .await
        .unwrap();
        assert_eq!(
            lc.delete(req(
                lapi::DeleteRequest {
                    id: "build-1".into(),
                    sync: false
                },
                "ns1",
                &[]
            ))
            .await
            .unwrap_err()
            .code(),
            Code::NotFound
        );
        // Past the millisecond of the last read: a blob used in the very millisecond of a
        // collection is within even a zero orphan grace.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let gc = h.req("POST", "/admin/gc").send();
        assert_eq!(gc.status, 200, "{}", gc.text());
        assert_eq!(
            read_all(&ch, "ns2", &leased, 0, 0)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        // What the views still hold is untouched.
        assert_eq!(read_all(&ch, "ns2", &c, 0, 0).await.unwrap(), b"gamma");
        assert_eq!(read_all(&ch, "ns1", &a, 0, 0).await.unwrap(), b"alpha");
    });
    assert_invariant_1(&h, "leases and views");
}

#[test]
fn lease_expiry_is_judged_by_hoards_clock_with_the_skew_tolerance() {
    // hoard's clock is stepped an hour ahead of the client's. Leases carry the client's idea of
    // their end (`containerd.io/gc.expire`, absolute); hoard judges it by its own clock, with
    // the 5 minute tolerance.
    let h = Hoard::start(&["--orphan-grace", "0s", "--clock-offset", "+1h"]);
    let rt = rt();
    // hoard's time now, as it stamps a new lease (on a shared bucket: the S3 service's clock).
    let hoard_now = rt.block_on(async {
        let ch = channel(&h).await;
        LeasesClient::new(ch)
            .create(req(
                lapi::CreateRequest {
                    id: "probe".into(),
                    ..Default::default()
                },
                "probe",
                &[],
            ))
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap()
            .created_at
            .unwrap()
            .seconds
    });
    let at = |delta_s: i64| {
        run_ok(Command::new("date").args([
            "-u",
            "-d",
            &format!("@{}", hoard_now + delta_s),
            "+%Y-%m-%dT%H:%M:%SZ",
        ]))
        .trim()
        .to_string()
    };
    let leases = [
        // Past by hoard's clock, well beyond the tolerance: expires.
        ("gone", at(-30 * 60)),
        // Two minutes past by hoard's clock: within the tolerance, kept.
        ("kept", at(-2 * 60)),
        // In the future.
        ("later", at(3600)),
    ];
    let payload = |i: u64| bytes(70 + i, 40_000);
    rt.block_on(async {
        let ch = channel(&h).await;
        let mut lc = LeasesClient::new(ch.clone());
        for (i, (id, expire)) in leases.iter().enumerate() {
            lc.create(req(
                lapi::CreateRequest {
                    id: id.to_string(),
                    labels: [("containerd.io/gc.expire".to_string(), expire.clone())].into(),
                },
                "ns",
                &[],
            ))
            .await
            .unwrap();
            // Content written under each lease; the view lets go of it at once.
            let data = payload(i as u64);
            let d = sha256(&data);
            let mut msg = write_msg(api::WriteAction::Commit, id, 0, &data);
            msg.expected = d.clone();
            let (_, end) = write(&ch, "ns", &[("containerd-lease", id)], vec![msg]).await;
            end.unwrap();
            ContentClient::new(ch.clone())
                .delete(req(api::DeleteContentRequest { digest: d }, "ns", &[]))
                .await
                .unwrap();
        }
    });
    let ids = || -> Vec<String> {
        rt.block_on(async {
            let ch = channel(&h).await;
            let mut v: Vec<String> = LeasesClient::new(ch)
                .list(req(lapi::ListRequest::default(), "ns", &[]))
                .await
                .unwrap()
                .into_inner()
                .leases
                .into_iter()
                .map(|l| l.id)
                .collect();
            v.sort();
            v
        })
    };
    wait_until("the expired lease goes", Duration::from_secs(20), || {
        ids() == vec!["kept".to_string(), "later".to_string()]
    });
    assert!(h.log().contains("lease expired"), "{}", h.log());
    // Two more sweeps: the one within the tolerance stays.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(ids(), vec!["kept".to_string(), "later".to_string()]);
    assert_eq!(h.req("POST", "/admin/gc").send().status, 200);
    rt.block_on(async {
        let ch = channel(&h).await;
        assert_eq!(
            read_all(&ch, "ns", &sha256(&payload(0)), 0, 0)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound,
            "what only the expired lease held is collected"
        );
        for i in [1, 2] {
            assert_eq!(
                read_all(&ch, "ns", &sha256(&payload(i)), 0, 0)
                    .await
                    .unwrap(),
                payload(i)
            );
        }
    });
}

#[test]
fn a_small_blob_served_from_memory_is_gone_once_the_lifecycle_removes_it() {
    let h = Hoard::start(&["--orphan-grace", "0s"]);
    let rt = rt();
    let data = bytes(77, 4096);
    let d = rt.block_on(async {
        let ch = channel(&h).await;
        let d = commit_blob(&ch, "ns", "small", &data, &[]).await;
        // Read twice: the second is answered from memory.
        for _ in 0..2 {
            assert_eq!(read_all(&ch, "ns", &d, 0, 0).await.unwrap(), data);
        }
        let mut c = ContentClient::new(ch.clone());
        c.delete(req(
            api::DeleteContentRequest { digest: d.clone() },
            "ns",
            &[],
        ))
        .await
        .unwrap();
        d
    });
    // Past the millisecond of the last read (see the leases test).
    std::thread::sleep(Duration::from_millis(5));
    let gc = h.req("POST", "/admin/gc").send();
    assert_eq!(gc.status, 200, "{}", gc.text());
    rt.block_on(async {
        let ch = channel(&h).await;
        let e = read_all(&ch, "ns", &d, 0, 0).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "read after the collection: {e:?}");
        let e = info(&ch, "ns", &d).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    });
    assert_invariant_1(&h, "a small blob's collection");
}

/// A private containerd with hoard as its content store (`proxy_plugins`).
struct ProxyContainerd {
    child: std::process::Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl ProxyContainerd {
    /// Its collector does not run at start nor on deletions until the test first asks for it
    /// (`images rm --sync`): the tests say when containerd collects, so what they check before
    /// that does not depend on timing. (After it, containerd collects on its own schedule.)
    fn start(dir: &Path, hoard_sock: &Path) -> ProxyContainerd {
        let containerd = require_tool("containerd", "install it with `apt-get install containerd`");
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("c.sock");
        let _ = std::fs::remove_file(&sock);
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \
                 \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.aufs\", \
                 \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.content.v1.content\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"\"\n\
                 [proxy_plugins]\n  [proxy_plugins.hoard]\n    type = \"content\"\n    address = \"{hoard}\"\n\
                 [plugins.\"io.containerd.gc.v1.scheduler\"]\n  startup_delay = \"0s\"\n  \
                 deletion_threshold = 1000000\n  mutation_threshold = 0\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = sock.display(),
                hoard = hoard_sock.display(),
            ),
        )
        .unwrap();
        let child = Command::new(containerd)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .unwrap();
        wait_until("containerd's socket", Duration::from_secs(20), || {
            sock.exists()
        });
        ProxyContainerd {
            child,
            dir: dir.to_owned(),
            sock,
        }
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new(require_tool(
            "ctr",
            "install it with `apt-get install containerd`",
        ));
        c.arg("--address")
            .arg(&self.sock)
            .args(["--namespace", "k8s.io"]);
        c
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyContainerd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn containerd_keeps_its_content_in_hoard_and_cannot_delete_what_others_hold() {
    let h = Hoard::start(&["--orphan-grace", "0s"]);
    let tmp = tempfile::tempdir().unwrap();
    // An image in hoard's registry.
    let (manifest_digest, manifest) = make_oci_layout(tmp.path());
    let skopeo = require_tool("skopeo", "install it with `apt-get install skopeo`");
    let reference = format!("127.0.0.1:{}/app:v1", h.port());
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", tmp.path().join("layout").display()),
        &format!("docker://{reference}"),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut blobs = vec![
        manifest_digest.clone(),
        m["config"]["digest"].as_str().unwrap().to_string(),
    ];
    blobs.extend(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string()),
    );

    let mut ctd = ProxyContainerd::start(&tmp.path().join("containerd"), &sock(&h));
    run_ok(
        ctd.ctr()
            .args(["images", "pull", "--plain-http", &reference]),
    );
    // containerd's content store is hoard: the image's blobs are there and listed.
    let ls = run_ok(ctd.ctr().args(["content", "ls"]));
    for b in &blobs {
        assert!(ls.contains(b.as_str()), "containerd lists {b}: {ls}");
    }
    // Something of containerd's own, written through it into hoard.
    let own = bytes(99, 30_000);
    let own_path = tmp.path().join("own");
    std::fs::write(&own_path, &own).unwrap();
    let own_digest = sha256(&own);
    run_ok(
        ctd.ctr()
            .args(["content", "ingest", "--expected-digest", &own_digest, "own"])
            .stdin(std::fs::File::open(&own_path).unwrap()),
    );
    // `ctr content ingest` holds what it wrote only by a lease it drops on exit; containerd's
    // collector (by default it runs at every start) would rightly take the blob. A root label
    // keeps it, as a real client's would.
    run_ok(
        ctd.ctr()
            .args(["content", "label", &own_digest, "containerd.io/gc.root=1"]),
    );
    let rt = rt();
    rt.block_on(async {
        let ch = channel(&h).await;
        assert_eq!(read_all(&ch, "x", &own_digest, 0, 0).await.unwrap(), own);
    });

    // Restarted, containerd still sees everything.
    ctd.stop();
    let ctd_dir = ctd.dir.clone();
    drop(ctd);
    let ctd = ProxyContainerd::start(&ctd_dir, &sock(&h));
    let ls = run_ok(ctd.ctr().args(["content", "ls"]));
    for b in blobs.iter().chain([&own_digest]) {
        assert!(
            ls.contains(b.as_str()),
            "after a containerd restart, {b}: {ls}"
        );
    }

    // Another view holds the layer, a lease (in that view) holds the config.
    let layer = blobs[2].clone();
    let config = blobs[1].clone();
    rt.block_on(async {
        let ch = channel(&h).await;
        let node_b = [("hoard-view", "node-b")];
        let mut cc = ContentClient::new(ch.clone());
        cc.info(req(
            api::InfoRequest {
                digest: layer.clone(),
            },
            "other",
            &node_b,
        ))
        .await
        .unwrap();
        let mut lc = LeasesClient::new(ch.clone());
        lc.create(req(
            lapi::CreateRequest {
                id: "keep".into(),
                ..Default::default()
            },
            "other",
            &node_b,
        ))
        .await
        .unwrap();
        lc.add_resource(req(
            lapi::AddResourceRequest {
                id: "keep".into(),
                resource: Some(lapi::Resource {
                    id: config.clone(),
                    r#type: "content".into(),
                }),
            },
            "other",
            &node_b,
        ))
        .await
        .unwrap();
    });
    // The registry's tag goes too: only the view and the lease hold those two now.
    let del = h
        .req("DELETE", &format!("/v2/app/manifests/{manifest_digest}"))
        .send();
    assert_eq!(del.status, 202, "{}", del.text());

    // containerd removes the image and collects: it deletes every blob of hoard's it does not
    // reference any more, in its view. The lifecycle decides what actually goes.
    // `content rm` only forgets the blob in containerd's database; the collector that `images rm
    // --sync` runs is what deletes from the backing store.
    run_ok(ctd.ctr().args(["content", "rm", &own_digest]));
    run_ok(ctd.ctr().args(["images", "rm", "--sync", &reference]));
    let ls = run_ok(ctd.ctr().args(["content", "ls"]));
    for b in &blobs {
        assert!(
            !ls.contains(b.as_str()),
            "containerd's view still lists {b}: {ls}"
        );
    }
    let gc = h.req("POST", "/admin/gc").send();
    assert_eq!(gc.status, 200, "{}", gc.text());
    rt.block_on(async {
        let ch = channel(&h).await;
        // Held by the other view and by the lease: byte for byte.
        assert_eq!(
            sha256(&read_all(&ch, "x", &layer, 0, 0).await.unwrap()),
            layer
        );
        assert_eq!(
            sha256(&read_all(&ch, "x", &config, 0, 0).await.unwrap()),
            config
        );
        // Held by nothing: gone. (containerd's own blob, and the manifest.)
        assert_eq!(
            read_all(&ch, "x", &own_digest, 0, 0)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        assert_eq!(
            read_all(&ch, "x", &manifest_digest, 0, 0)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
    });
    assert_invariant_1(&h, "containerd's collection");
}

#[test]
fn containerd_cannot_delete_the_registrys_blobs() {
    let h = Hoard::start(&["--orphan-grace", "0s"]);
    let tmp = tempfile::tempdir().unwrap();
    let (_, manifest) = make_oci_layout(tmp.path());
    let skopeo = require_tool("skopeo", "install it with `apt-get install skopeo`");
    let reference = format!("127.0.0.1:{}/base:v1", h.port());
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", tmp.path().join("layout").display()),
        &format!("docker://{reference}"),
    ]));
    let ctd = ProxyContainerd::start(&tmp.path().join("containerd"), &sock(&h));
    run_ok(
        ctd.ctr()
            .args(["images", "pull", "--plain-http", &reference]),
    );
    run_ok(ctd.ctr().args(["images", "rm", "--sync", &reference]));
    // Every blob it listed, deleted by containerd's collector through the API, by hand too.
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        let _ = ctd.ctr().args(["content", "rm", d]).output();
    }
    let gc = h.req("POST", "/admin/gc").send();
    assert_eq!(gc.status, 200);
    assert_eq!(
        assert_invariant_1(&h, "containerd deleting"),
        1,
        "the registry's tag pulls whole"
    );
}

#[test]
fn admin_api_over_the_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A stale socket file from a previous run is replaced.
    {
        let _l = std::os::unix::net::UnixListener::bind(data.join("hoard.sock")).unwrap();
    }
    let h = Hoard::start_on(&data, &["--orphan-grace", "0s"]);
    push_image(&h, "team-a/app", "v1", None, &[bytes(1, 1000)]);
    push_image(&h, "team-a/app", "v2", None, &[bytes(2, 1000)]);
    push_image(&h, "team-b/app", "v1", None, &[bytes(3, 1000)]);
    let socket = sock(&h);
    let admin = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
            .arg("admin")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = admin(&["stats"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("team-a/app") && out.contains("3 tags"),
        "{out}"
    );
    let (ok, out) = admin(&["--json", "stats", "--prefix", "team-a/"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tags"], 3);
    assert_eq!(v["repositories_stats"].as_array().unwrap().len(), 1);
    assert_eq!(v["repositories_stats"][0]["tags"], 2);
    let (ok, out) = admin(&["refs"]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains("team-b/app:v1"), "{out}");
    let (ok, out) = admin(&["--json", "refs", "--prefix", "team-a/", "--limit", "1"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["refs"].as_array().unwrap().len(), 1);
    assert_eq!(v["refs"][0]["tag"], "v1");
    // Paging through the service directly: every ref once.
    let rt = rt();
    rt.block_on(async {
        let ch = channel(&h).await;
        let mut c = hoard::proto::admin::admin_client::AdminClient::new(ch);
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let r = c
                .list_refs(hoard::proto::admin::ListRefsRequest {
                    prefix: String::new(),
                    page_size: 1,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            seen.extend(
                r.refs
                    .into_iter()
                    .map(|r| format!("{}:{}", r.repository, r.tag)),
            );
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        assert_eq!(
            seen,
            vec!["team-a/app:v1", "team-a/app:v2", "team-b/app:v1"]
        );
    });
    let (ok, out) = admin(&["gc"]);
    assert!(ok && out.contains("gc: removed"), "{out}");
    let (ok, out) = admin(&["evict", "team-a/app:v1"]);
    assert!(ok, "{out}");
    assert!(out.contains("evicted 1 refs"), "{out}");
    assert!(
        out.contains("repository=team-a/app"),
        "what went and why: {out}"
    );
    assert!(!pull(&h, "team-a/app", "v1"));
    assert!(pull(&h, "team-a/app", "v2"));
    let (ok, out) = admin(&["--json", "evict", "team-*"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tags"], 2);
    assert!(v["freed_bytes"].as_u64().unwrap() > 2000, "{out}");
    let (ok, out) = admin(&["evict", "team-a/app:v1"]);
    assert!(
        !ok && out.contains("NotFound") || out.contains("no ref"),
        "{out}"
    );
    let (ok, out) = admin(&["verify"]);
    assert!(ok && out.contains("0 corrupt"), "{out}");
    // The HTTP calls answer the same.
    let r = h.req("POST", "/admin/verify").send();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("0 corrupt"), "{}", r.text());
    // Without a daemon: a clear message.
    let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args(["admin", "--socket", "/nonexistent/hoard.sock", "stats"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn grpc_over_tcp_is_refused_without_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a TCP gRPC listener with no tokens");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grpc_listen needs [auth] tokens"), "{err}");
}
