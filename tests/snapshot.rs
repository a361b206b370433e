//! Cache-mount snapshots with the real binary: `hoard snapshot save|restore`, the tar endpoints
//! with curl-like requests, the OCI image form pulled with skopeo, and collection of chunks no
//! snapshot lists any more.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{bytes, Hoard};

/// What a tree is: per path, (kind, mode, mtime ns, content or link target).
type Tree = BTreeMap<String, (char, u32, i64, Vec<u8>)>;

fn tree(root: &Path) -> Tree {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
            let mode = m.mode() & 0o7777;
            let v = if m.file_type().is_symlink() {
                (
                    'l',
                    0,
                    mtime,
                    std::fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .as_bytes()
                        .to_vec(),
                )
            } else if m.is_dir() {
                stack.push(p.clone());
                ('d', mode, mtime, Vec::new())
            } else {
                ('f', mode, mtime, std::fs::read(&p).unwrap())
            };
            out.insert(rel, v);
        }
    }
    out
}

fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: nanos as _,
    };
    rustix::fs::utimensat(
        CWD,
        p,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// A GOMODCACHE-like tree: nested directories, a read-only module directory, executables,
/// symlinks, empty files, an empty directory, odd mtimes with nanoseconds.
fn sample(root: &Path) {
    let m = root.join("example.com/mod@v1.0.0");
    std::fs::create_dir_all(m.join("sub")).unwrap();
    std::fs::create_dir_all(root.join("cache/download/empty")).unwrap();
    std::fs::write(m.join("go.mod"), "module example.com/mod\n").unwrap();
    std::fs::write(m.join("sub/data.bin"), bytes(1, 3 << 20)).unwrap();
    std::fs::write(m.join("empty"), b"").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("example.com/mod@v1.0.0/go.mod", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/elsewhere", root.join("dangling")).unwrap();
    set_mtime(&m.join("go.mod"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("link"), 1_500_000_000, 5);
    set_mtime(&m.join("sub"), 1_400_000_000, 42);
    // Read-only, as go leaves module directories.
    std::fs::set_permissions(m.join("sub"), std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o555)).unwrap();
}

fn hoard_snapshot(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
        .arg("snapshot")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (out.status.success(), json, stderr)
}

fn start(extra: &[&str]) -> (tempfile::TempDir, Hoard, String) {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_suite_env(&tmp.path().join("data"), extra, &[]);
    common::wait_until("hoard ready", Duration::from_secs(20), || {
        h.req("GET", "/readyz").send().status == 200
    });
    let url = format!("http://{}", h.addr);
    (tmp, h, url)
}

#[test]
fn save_and_restore_keep_bytes_modes_mtimes_and_symlinks() {
    let (tmp, h, url) = start(&[]);
    let src = tmp.path().join("src");
    sample(&src);
    let (ok, out, err) = hoard_snapshot(&[
        "save",
        "--url",
        &url,
        "--key",
        "gomod",
        src.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out["files"], 4);
    assert!(err.contains("saved gomod"), "one summary line: {err}");

    let dst = tmp.path().join("dst");
    let (ok, _, err) = hoard_snapshot(&[
        "restore",
        "--url",
        &url,
        "--key",
        "gomod",
        dst.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(tree(&src), tree(&dst), "the restored tree differs");

    // Restoring again onto the same directory downloads nothing.
    let (ok, out, err) = hoard_snapshot(&[
        "restore",
        "--url",
        &url,
        "--key",
        "gomod",
        dst.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out["downloaded_bytes"], 0);
    assert_eq!(out["kept"], 4);
    assert_eq!(tree(&src), tree(&dst));

    // A miss: not an error, says so, leaves the directory alone.
    let other = tmp.path().join("other");
    let (ok, _, err) = hoard_snapshot(&[
        "restore",
        "--url",
        &url,
        "--key",
        "nothing",
        "--restore-key",
        "nope-",
        other.to_str().unwrap(),
    ]);
    assert!(ok);
    assert!(
        err.starts_with("miss: no snapshot for key nothing"),
        "{err}"
    );
    assert!(!other.exists());

    // Restore keys: the newest snapshot under the first prefix that has one.
    std::fs::write(tmp.path().join("f1"), b"").unwrap();
    let one = tmp.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::write(one.join("which"), b"older").unwrap();
    assert!(
        hoard_snapshot(&[
            "save",
            "--url",
            &url,
            "--key",
            "ci/main-1",
            one.to_str().unwrap()
        ])
        .0
    );
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(one.join("which"), b"newer").unwrap();
    assert!(
        hoard_snapshot(&[
            "save",
            "--url",
            &url,
            "--key",
            "ci/main-2",
            one.to_str().unwrap()
        ])
        .0
    );
    let got = tmp.path().join("got");
    let (ok, out, err) = hoard_snapshot(&[
        "restore",
        "--url",
        &url,
        "--key",
        "ci/branch-x",
        "--restore-key",
        "ci/none-",
        "--restore-key",
        "ci/main-",
        got.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out["key"], "ci/main-2");
    assert_eq!(std::fs::read(got.join("which")).unwrap(), b"newer");
    drop(h);
}

#[test]
fn a_save_with_five_percent_changed_files_uploads_about_five_percent_of_the_bytes() {
    let (tmp, _h, url) = start(&[]);
    let src = tmp.path().join("gocache");
    // GOCACHE-like: 256 subdirectories, 1,200 entries of 2–64 KiB (incompressible).
    let mut n = 0u64;
    for i in 0..1200u64 {
        let sub = src.join(format!("{:02x}", (i * 37) % 256));
        std::fs::create_dir_all(&sub).unwrap();
        let size = 2048 + ((i * 7919) % 62) as usize * 1024;
        std::fs::write(sub.join(format!("{i:016x}-d")), bytes(100 + i, size)).unwrap();
        n += size as u64;
    }
    let (ok, first, err) = hoard_snapshot(&[
        "save",
        "--url",
        &url,
        "--key",
        "gocache",
        src.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(first["uploaded_bytes"].as_u64().unwrap() >= n, "{first}");
    // 5% of the files: 30 new entries and 30 rewritten ones, scattered over the tree.
    let mut changed = 0u64;
    for k in 0..30u64 {
        let i = 5000 + k;
        let sub = src.join(format!("{:02x}", (k * 97) % 256));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("{i:016x}-d")), bytes(9000 + k, 40 << 10)).unwrap();
        changed += 40 << 10;
        let j = k * 40 + 3;
        let p = src
            .join(format!("{:02x}", (j * 37) % 256))
            .join(format!("{j:016x}-d"));
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        std::fs::write(&p, bytes(7000 + k, len)).unwrap();
        changed += len as u64;
    }
    let (ok, second, err) = hoard_snapshot(&[
        "save",
        "--url",
        &url,
        "--key",
        "gocache",
        src.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let up = second["uploaded_bytes"].as_u64().unwrap();
    let total = second["bytes"].as_u64().unwrap();
    let share = up as f64 / total as f64;
    eprintln!(
        "5% re-save: {up} of {total} bytes uploaded ({:.1}%; the changed files hold {:.1}%)",
        share * 100.0,
        changed as f64 * 100.0 / total as f64
    );
    assert!(
        up >= changed && up <= changed + changed / 10 + (64 << 10),
        "{second}: changed {changed}"
    );

    // Restoring onto a copy of the first state downloads only what differs.
    let dst = tmp.path().join("restore");
    assert!(
        hoard_snapshot(&[
            "restore",
            "--url",
            &url,
            "--key",
            "gocache",
            dst.to_str().unwrap()
        ])
        .0
    );
    for k in 0..30u64 {
        let i = 5000 + k;
        std::fs::remove_file(
            dst.join(format!("{:02x}", (k * 97) % 256))
                .join(format!("{i:016x}-d")),
        )
        .unwrap();
    }
    let (ok, out, err) = hoard_snapshot(&[
        "restore",
        "--url",
        &url,
        "--key",
        "gocache",
        dst.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let down = out["downloaded_bytes"].as_u64().unwrap();
    assert!(down <= (31 * (40 << 10)) as u64 && down > 0, "{out}");
    assert_eq!(tree(&src), tree(&dst));
}

#[test]
fn a_failed_save_leaves_the_previous_snapshot_whole() {
    let (tmp, h, url) = start(&[]);
    let src = tmp.path().join("src");
    sample(&src);
    assert!(hoard_snapshot(&["save", "--url", &url, "--key", "k", src.to_str().unwrap()]).0);
    let before = h.req("GET", "/snapshots/k").send();
    assert_eq!(before.status, 200);
    // An index naming a chunk nobody uploaded: refused, nothing changes.
    let mut index: serde_json::Value = {
        let mut json = Vec::new();
        use std::io::Read;
        zstd::stream::read::Decoder::new(&before.body[..])
            .unwrap()
            .read_to_end(&mut json)
            .unwrap();
        serde_json::from_slice(&json).unwrap()
    };
    let nodes = index["nodes"].as_array_mut().unwrap();
    let f = nodes
        .iter_mut()
        .find(|n| n["type"] == "file" && n["size"].as_u64().unwrap_or(0) > 0)
        .unwrap();
    f["chunks"][0]["blob"] = format!("sha256:{}", "ab".repeat(32)).into();
    let body = zstd::bulk::compress(&serde_json::to_vec(&index).unwrap(), 3).unwrap();
    let r = h.req("PUT", "/snapshots/k").body(body).send();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("is not stored"), "{}", r.text());
    let after = h.req("GET", "/snapshots/k").send();
    assert_eq!(after.body, before.body);
    // Garbage and traversal are refused the same way.
    let r = h
        .req("PUT", "/snapshots/k")
        .body(b"not zstd".to_vec())
        .send();
    assert_eq!(r.status, 400);
    let evil = serde_json::json!({"version": 1, "nodes": [{"path": "../escape", "type": "dir", "mode": 493, "mtime_ns": 0}]});
    let r = h
        .req("PUT", "/snapshots/k")
        .body(zstd::bulk::compress(&serde_json::to_vec(&evil).unwrap(), 3).unwrap())
        .send();
    assert_eq!(r.status, 400);
    let r = h.req("GET", "/snapshots/Bad%20Key").send();
    assert_eq!(r.status, 400);
    assert_eq!(h.req("GET", "/snapshots/k").send().body, before.body);
}

#[test]
fn curl_and_tar_save_and_restore_and_skopeo_pulls_the_image_form() {
    let (tmp, h, url) = start(&[]);
    let src = tmp.path().join("src");
    sample(&src);
    // Save from a build step with only tar and curl, and back.
    common::require_tool("curl", "apt-get install curl");
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let put = sh(&format!(
        "tar -C {} -c . | curl -sSf -T - {url}/snapshots/from-tar/_tar",
        src.display()
    ));
    assert!(put.contains("\"files\":4"), "{put}");
    let out = tmp.path().join("untarred");
    std::fs::create_dir_all(&out).unwrap();
    sh(&format!(
        "curl -sSf {url}/snapshots/from-tar/_tar | tar -C {} -x",
        out.display()
    ));
    assert_eq!(contents(&src), contents(&out));

    // The OCI image form, built after the save: skopeo copies it, its layer is the tree.
    let (ok, _, err) = hoard_snapshot(&[
        "save",
        "--url",
        &url,
        "--key",
        "gomod",
        src.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    common::wait_until("the image form", Duration::from_secs(30), || {
        h.req("HEAD", "/v2/snapshots/gomod/manifests/latest")
            .send()
            .status
            == 200
    });
    let skopeo = common::require_tool("skopeo", "apt-get install skopeo");
    let dir = tmp.path().join("oci");
    let st = Command::new(skopeo)
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/snapshots/gomod:latest", h.addr))
        .arg(format!("dir:{}", dir.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_owned();
    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&unpacked)
        .arg("-xf")
        .arg(dir.join(&layer))
        .status()
        .unwrap()
        .success());
    assert_eq!(contents(&src), contents(&unpacked));
}

#[test]
fn an_empty_directory_seeds_the_image_form_a_first_build_needs() {
    let (tmp, h, url) = start(&[]);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, out, err) = hoard_snapshot(&[
        "save",
        "--url",
        &url,
        "--key",
        "gomod",
        empty.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out["files"], 0);
    common::wait_until("the image form", Duration::from_secs(30), || {
        h.req("HEAD", "/v2/snapshots/gomod/manifests/latest")
            .send()
            .status
            == 200
    });
    let dst = tmp.path().join("dst");
    let (ok, out, err) = hoard_snapshot(&[
        "restore",
        "--url",
        &url,
        "--key",
        "gomod",
        dst.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out["files"], 0);
    assert!(dst.is_dir());
}

/// Paths, kinds, modes and bytes (tar keeps mtimes to the second only).
fn contents(root: &Path) -> Vec<(String, char, u32, Vec<u8>)> {
    tree(root)
        .into_iter()
        .map(|(k, (t, m, _, c))| (k, t, m, c))
        .collect()
}

#[test]
fn chunks_no_snapshot_lists_are_collected_and_the_rest_still_restores() {
    let (tmp, h, url) = start(&["--orphan-grace", "1s"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("shared"), bytes(1, 200_000)).unwrap();
    std::fs::write(src.join("old"), bytes(2, 200_000)).unwrap();
    assert!(hoard_snapshot(&["save", "--url", &url, "--key", "a", src.to_str().unwrap()]).0);
    assert!(hoard_snapshot(&["save", "--url", &url, "--key", "b", src.to_str().unwrap()]).0);
    std::fs::remove_file(src.join("old")).unwrap();
    std::fs::write(src.join("new"), bytes(3, 200_000)).unwrap();
    assert!(hoard_snapshot(&["save", "--url", &url, "--key", "a", src.to_str().unwrap()]).0);
    std::thread::sleep(Duration::from_millis(2500));
    let r = h.req("POST", "/admin/gc").send();
    assert_eq!(r.status, 200, "{}", r.text());
    // b still lists the old chunk: both keys restore whole.
    for (key, files) in [("a", ["new", "shared"]), ("b", ["old", "shared"])] {
        let dst = tmp.path().join(format!("r-{key}"));
        let (ok, _, err) = hoard_snapshot(&[
            "restore",
            "--url",
            &url,
            "--key",
            key,
            dst.to_str().unwrap(),
        ]);
        assert!(ok, "{key}: {err}");
        for f in files {
            assert!(dst.join(f).is_file(), "{key}/{f}");
        }
    }
    common::assert_invariant_1(&h, "after collecting snapshots");
}
