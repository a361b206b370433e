//! Real clients against the real daemon: skopeo (copy in and back, byte-identical), buildah
//! (`bud --layers --cache-to/--cache-from`, full cache hit on a wiped builder), and containerd's
//! `ctr images pull/push --plain-http` through a private containerd. A missing tool fails the
//! test with the package to install.

mod common;

use std::process::Command;

use common::*;

#[test]
fn skopeo_copies_an_image_in_and_back_byte_identical() {
    let skopeo = require_tool("skopeo", "install it with `apt-get install skopeo`");
    let h = Hoard::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (dm, manifest) = make_oci_layout(tmp.path());
    let src = format!("oci:{}:v1", tmp.path().join("layout").display());
    let dst = format!("docker://127.0.0.1:{}/team/app:v1", h.port());
    run_ok(Command::new(&skopeo).args(["copy", "--dest-tls-verify=false", &src, &dst]));
    // The pushed manifest is the original, byte for byte.
    let r = h
        .req("GET", "/v2/team/app/manifests/v1")
        .header("Accept", OCI_MANIFEST)
        .send();
    assert_eq!(r.body, manifest);
    assert_eq!(r.header("docker-content-digest"), Some(dm.as_str()));
    // And back out into a fresh layout.
    let back = format!("oci:{}:v1", tmp.path().join("back").display());
    run_ok(Command::new(&skopeo).args(["copy", "--src-tls-verify=false", &dst, &back]));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("back/index.json")).unwrap())
            .unwrap();
    assert_eq!(index["manifests"][0]["digest"], dm.as_str());
    for entry in std::fs::read_dir(tmp.path().join("layout/blobs/sha256"))
        .unwrap()
        .flatten()
    {
        let a = std::fs::read(entry.path()).unwrap();
        let b =
            std::fs::read(tmp.path().join("back/blobs/sha256").join(entry.file_name())).unwrap();
        assert!(a == b, "blob {:?} differs", entry.file_name());
    }
    // skopeo inspect and list-tags read it too.
    let tags = run_ok(Command::new(&skopeo).args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://127.0.0.1:{}/team/app", h.port()),
    ]));
    assert!(tags.contains("\"v1\""), "{tags}");
}

#[test]
fn buildah_layer_cache_round_trips_with_a_full_hit_after_wiping_local_storage() {
    let buildah = require_tool("buildah", "install it with `apt-get install buildah`");
    let h = Hoard::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("a"), bytes(1, 300_000)).unwrap();
    std::fs::write(ctx.join("b"), bytes(2, 1000)).unwrap();
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM scratch\nCOPY a /a\nCOPY b /b\n",
    )
    .unwrap();
    let cache = format!("127.0.0.1:{}/cache/app", h.port());
    let build = |store: &str| {
        let root = tmp.path().join(store);
        run_ok(
            Command::new(&buildah)
                .arg("--storage-driver")
                .arg("vfs")
                .arg("--root")
                .arg(root.join("root"))
                .arg("--runroot")
                .arg(root.join("run"))
                .args([
                    "bud",
                    "--layers",
                    "--tls-verify=false",
                    "--cache-to",
                    &cache,
                    "--cache-from",
                    &cache,
                    "-t",
                    "out",
                    "-f",
                ])
                .arg(ctx.join("Containerfile"))
                .arg(&ctx),
        )
    };
    let first = build("builder1");
    assert!(first.contains("Pushing cache"), "{first}");
    let tags = h.req("GET", "/v2/cache/app/tags/list").send().json();
    assert_eq!(
        tags["tags"].as_array().unwrap().len(),
        2,
        "one cache tag per layer: {tags}"
    );
    // A new builder with empty local storage: both steps come from hoard.
    let second = build("builder2");
    assert_eq!(
        second.matches("Cache pulled from remote").count(),
        2,
        "{second}"
    );
    let id = |s: &str| s.lines().last().unwrap_or("").trim().to_owned();
    assert_eq!(id(&first), id(&second), "same image from cache");
}

#[test]
fn containerd_pulls_and_pushes_through_a_private_containerd() {
    let skopeo = require_tool("skopeo", "install it with `apt-get install skopeo`");
    let h = Hoard::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (dm, _) = make_oci_layout(tmp.path());
    let reference = format!("127.0.0.1:{}/base/img:v1", h.port());
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", tmp.path().join("layout").display()),
        &format!("docker://{reference}"),
    ]));
    let ctd = Containerd::start(&tmp.path().join("ctd"));
    let ctr_cmd = || ctd.ctr();
    run_ok(ctr_cmd().args(["images", "pull", "--plain-http", &reference]));
    let pushed = format!("127.0.0.1:{}/pushed/img:v2", h.port());
    run_ok(ctr_cmd().args(["images", "tag", &reference, &pushed]));
    run_ok(ctr_cmd().args(["images", "push", "--plain-http", &pushed]));
    let r = h.req("HEAD", "/v2/pushed/img/manifests/v2").send();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-content-digest"), Some(dm.as_str()));
}
