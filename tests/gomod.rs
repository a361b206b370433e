//! The caching module proxy with the real `go` toolchain: fixture modules served by an upstream
//! proxy on loopback, `go` pointed at hoard's `/gomod/`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::goproxy::{self, escape, go, Fault, Upstream};
use common::Hoard;

/// The fixture: several modules and versions, one with upper case in its path, and an app that
/// needs them.
fn fixture(root: &Path) {
    goproxy::write_module(
        root,
        "example.com/hello",
        "v1.0.0",
        &[
            ("go.mod", "module example.com/hello\n\ngo 1.22\n"),
            (
                "hello.go",
                "package hello\n\nfunc Hello() string { return \"hello v1.0.0\" }\n",
            ),
        ],
    );
    goproxy::write_module(
        root,
        "example.com/hello",
        "v1.1.0",
        &[
            ("go.mod", "module example.com/hello\n\ngo 1.22\n"),
            (
                "hello.go",
                "package hello\n\nfunc Hello() string { return \"hello v1.1.0\" }\n",
            ),
            ("LICENSE", "Public domain.\n"),
        ],
    );
    goproxy::write_module(
        root,
        "example.com/greet",
        "v1.0.0",
        &[
            (
                "go.mod",
                "module example.com/greet\n\ngo 1.22\n\nrequire example.com/hello v1.0.0\n",
            ),
            (
                "greet.go",
                "package greet\n\nimport \"example.com/hello\"\n\nfunc Greet() string { return hello.Hello() + \", greeted\" }\n",
            ),
        ],
    );
    goproxy::write_module(
        root,
        "example.com/Upper/Case",
        "v0.1.0",
        &[
            ("go.mod", "module example.com/Upper/Case\n\ngo 1.22\n"),
            ("case.go", "package Case\n\nconst Name = \"upper\"\n"),
            ("sub/sub.go", "package sub\n\nconst X = 1\n"),
        ],
    );
    goproxy::write_module(
        root,
        "example.com/bad",
        "v1.0.0",
        &[
            ("go.mod", "module example.com/bad\n\ngo 1.22\n"),
            ("bad.go", "package bad\n\nconst Y = 2\n"),
        ],
    );
}

/// The app that needs the fixture modules.
fn app(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("go.mod"),
        "module example.com/app\n\ngo 1.22\n\nrequire (\n\texample.com/Upper/Case v0.1.0\n\texample.com/greet v1.0.0\n\texample.com/hello v1.1.0\n)\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("main.go"),
        "package main\n\nimport (\n\t\"fmt\"\n\n\tCase \"example.com/Upper/Case\"\n\t\"example.com/greet\"\n)\n\nfunc main() { fmt.Println(greet.Greet(), Case.Name) }\n",
    )
    .unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    up: Upstream,
    hoard: Hoard,
}

fn setup(extra_env: &[(&str, &str)]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("upstream");
    fixture(&root);
    let up = Upstream::start(&root);
    let mut env: Vec<(String, String)> = vec![
        ("HOARD_GOMOD_UPSTREAMS".into(), up.url()),
        ("HOARD_GOMOD_REFRESH".into(), "1s".into()),
        ("HOARD_GOMOD_TIMEOUT".into(), "5s".into()),
    ];
    for (k, v) in extra_env {
        env.push((k.to_string(), v.to_string()));
    }
    let hoard = Hoard::start_suite_env(&tmp.path().join("data"), &[], &env);
    ready(&hoard);
    Setup {
        root,
        up,
        hoard,
        _tmp: tmp,
    }
}

impl Setup {
    fn proxy(&self) -> String {
        self.hoard.url("/gomod")
    }

    fn home(&self, name: &str) -> PathBuf {
        let p = self._tmp.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// On a bucket, writes wait for its probe: so does the test.
fn ready(h: &Hoard) {
    common::wait_until("hoard ready", Duration::from_secs(20), || {
        h.req("GET", "/readyz").send().status == 200
    });
}

fn run(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().expect("running go");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The `h1:` hash hoard recorded for a kept zip (from its manifest's annotation).
fn kept_h1(h: &Hoard, module: &str, version: &str) -> Option<String> {
    let repo = hoard::gomod::names::ModPath::from_escaped(&escape(module))
        .unwrap()
        .repo()
        .unwrap();
    let r = h
        .req("GET", &format!("/v2/{repo}/manifests/{version}.zip"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send();
    if r.status != 200 {
        return None;
    }
    r.json()["layers"][0]["annotations"]["dev.hoard.gomod.h1"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn go_builds_through_hoard_then_downloads_with_the_upstream_stopped() {
    let mut s = setup(&[]);
    let home = s.home("machine1");
    let dir = home.join("app");
    app(&dir);
    let (ok, out) = run(go(&home, &dir, &s.proxy()).args(["build", "-o", "app", "."]));
    assert!(
        ok,
        "go build through hoard failed:\n{out}\n{}",
        s.hoard.log()
    );
    let (ok, out) = run(std::process::Command::new(dir.join("app")).current_dir(&dir));
    assert!(ok && out.contains("hello v1.1.0, greeted upper"), "{out}");

    // go.sum holds what go computed itself: hoard's own hash of every kept zip agrees.
    let sum = std::fs::read_to_string(dir.join("go.sum")).unwrap();
    let mut zips = 0;
    for line in sum.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() == 3 && !f[1].ends_with("/go.mod") {
            assert_eq!(
                kept_h1(&s.hoard, f[0], f[1]).as_deref(),
                Some(f[2]),
                "hoard's h1 for {} {}",
                f[0],
                f[1]
            );
            zips += 1;
        }
    }
    assert_eq!(zips, 3, "go.sum:\n{sum}");
    // greet asks for hello v1.0.0, but v1.1.0 is selected: that zip is never fetched.
    assert_eq!(s.up.hits("/example.com/hello/@v/v1.0.0.zip"), 0);
    let upper_zip = format!("/{}/@v/v0.1.0.zip", escape("example.com/Upper/Case"));
    assert_eq!(s.up.hits(&upper_zip), 1, "{:?}", s.up.all_hits());

    // A second machine: everything from hoard, nothing new upstream for .mod and .zip.
    let before = s.up.hits(&upper_zip);
    let home2 = s.home("machine2");
    let dir2 = home2.join("app");
    app(&dir2);
    std::fs::copy(dir.join("go.sum"), dir2.join("go.sum")).unwrap();
    let (ok, out) = run(go(&home2, &dir2, &s.proxy()).args(["mod", "download", "-x"]));
    assert!(ok, "second machine:\n{out}");
    assert_eq!(s.up.hits(&upper_zip), before);

    // The upstream goes away: every version seen still downloads with a known go.sum, and
    // listing versions answers what was last seen.
    s.up.stop();
    std::thread::sleep(Duration::from_millis(1100)); // past refresh: list and .info are due
    let home3 = s.home("machine3");
    let dir3 = home3.join("app");
    app(&dir3);
    std::fs::copy(dir.join("go.sum"), dir3.join("go.sum")).unwrap();
    let (ok, out) = run(go(&home3, &dir3, &s.proxy()).args(["mod", "download"]));
    assert!(ok, "with the upstream stopped:\n{out}\n{}", s.hoard.log());
    let (ok, out) = run(go(&home3, &dir3, &s.proxy()).args(["build", "-o", "app", "."]));
    assert!(ok, "build with the upstream stopped:\n{out}");
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/hello/@v/list")
        .send();
    // Never fetched before the stop: list is a miss that fails upstream (502), not a 404.
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("example.com/hello/@v/list"),
        "{}",
        r.text()
    );
    // A file never seen, with the upstream down: a clear error naming the upstream.
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/hello/@v/v9.9.9.info")
        .send();
    assert_eq!(r.status, 502);
    assert!(r.text().contains(&s.up.url()), "{}", r.text());

    s.up.restart();
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/hello/@v/list")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "v1.0.0\nv1.1.0\n");
    s.up.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/hello/@v/list")
        .send();
    assert_eq!(
        r.status,
        200,
        "stale list when the upstream is down: {}",
        r.text()
    );
    assert_eq!(r.text(), "v1.0.0\nv1.1.0\n");
}

#[test]
fn a_corrupt_or_truncated_zip_is_refused_never_kept_and_the_next_good_fetch_works() {
    let s = setup(&[]);
    let path = "/example.com/bad/@v/v1.0.0.zip";
    let good = std::fs::read(s.root.join("example.com/bad/@v/v1.0.0.zip")).unwrap();
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 3;
    for b in &mut corrupt[mid..mid + 8] {
        *b ^= 0x5a;
    }
    let cases: Vec<(&str, Fault)> = vec![
        ("corrupt", Fault::Body(corrupt)),
        ("truncated", Fault::Body(good[..good.len() / 2].to_vec())),
        ("cut off", Fault::Cut(good.len() / 2)),
        (
            "not a zip",
            Fault::Body(b"<html>proxy error</html>".to_vec()),
        ),
        (
            "another module's zip",
            Fault::Body(goproxy::module_zip(
                "example.com/other",
                "v1.0.0",
                &[("go.mod", "module example.com/other\n")],
            )),
        ),
        ("server error", Fault::Status(500)),
    ];
    for (what, fault) in cases {
        s.up.fault(path, fault);
        let home = s.home(&format!("m-{}", what.replace(' ', "-")));
        let (ok, out) = run(go(&home, &home, &s.proxy()).args([
            "mod",
            "download",
            "-json",
            "example.com/bad@v1.0.0",
        ]));
        assert!(!ok, "{what}: go accepted it:\n{out}");
        assert!(
            out.contains("502") && out.contains("example.com/bad"),
            "{what}: the builder sees why:\n{out}"
        );
        assert_eq!(
            kept_h1(&s.hoard, "example.com/bad", "v1.0.0"),
            None,
            "{what} was kept"
        );
        let r = s.hoard.req("GET", &format!("/gomod{path}")).send();
        assert_eq!(r.status, 502, "{what}: {}", r.text());
    }
    s.up.clear_fault(path);
    let home = s.home("m-good");
    let (ok, out) = run(go(&home, &home, &s.proxy()).args([
        "mod",
        "download",
        "-json",
        "example.com/bad@v1.0.0",
    ]));
    assert!(ok, "the good zip after the broken ones:\n{out}");
    assert!(kept_h1(&s.hoard, "example.com/bad", "v1.0.0").is_some());
    let r = s.hoard.req("GET", &format!("/gomod{path}")).send();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, good);
    assert_eq!(r.header("content-type"), Some("application/zip"));
}

#[test]
fn thirty_two_concurrent_requests_for_one_version_fetch_it_once() {
    let s = Arc::new(setup(&[]));
    let path = "/example.com/hello/@v/v1.1.0.zip";
    // Slow enough upstream that all 32 ask while the first fetch runs.
    s.up.delay(path, Duration::from_millis(700));
    let want = std::fs::read(s.root.join("example.com/hello/@v/v1.1.0.zip")).unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(32));
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = s.hoard.req("GET", &format!("/gomod{path}")).send();
                (r.status, r.body)
            })
        })
        .collect();
    for t in threads {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200);
        assert!(body == want, "a client got other bytes");
    }
    assert_eq!(s.up.hits(path), 1, "one upstream fetch for 32 clients");
    // The same for a small file.
    let mpath = "/example.com/hello/@v/v1.1.0.mod";
    s.up.delay(mpath, Duration::from_millis(700));
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.hoard.req("GET", &format!("/gomod{mpath}")).send().status)
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(s.up.hits(mpath), 1);
}

#[test]
fn the_checksum_database_refuses_a_mismatching_zip_and_is_proxied() {
    let s = setup(&[]);
    // A lookup whose record disagrees with what the upstream serves (a tampered module).
    let lookup = |m: &str, v: &str, zip_h1: &str, mod_h1: &str| {
        format!("123\n{m} {v} {zip_h1}\n{m} {v}/go.mod {mod_h1}\n\ngo.sum database tree\n1\nAAAA\n")
    };
    let h1_of = |home: &Path, m: &str, v: &str| -> (String, String) {
        // Ask go itself (no checksum database in the way).
        let (ok, out) =
            run(go(home, home, &s.proxy()).args(["mod", "download", "-json", &format!("{m}@{v}")]));
        assert!(ok, "{out}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        (
            j["Sum"].as_str().unwrap().to_owned(),
            j["GoModSum"].as_str().unwrap().to_owned(),
        )
    };
    // Without records, hoard keeps what passes the zip checks; go reports the hashes.
    let (zip_h1, mod_h1) = h1_of(&s.home("a"), "example.com/hello", "v1.0.0");
    // A version whose record matches is kept...
    let m = "example.com/greet";
    s.up.fault(
        "/sumdb/sum.golang.org/lookup/example.com/greet@v1.0.0",
        Fault::Body(
            lookup(
                m,
                "v1.0.0",
                "h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                &mod_h1,
            )
            .into_bytes(),
        ),
    );
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/greet/@v/v1.0.0.zip")
        .send();
    assert_eq!(
        r.status,
        502,
        "a zip the checksum database disagrees with: {}",
        r.text()
    );
    assert!(r.text().contains("checksum mismatch"), "{}", r.text());
    assert!(r.text().contains("sum.golang.org"), "{}", r.text());
    assert_eq!(kept_h1(&s.hoard, m, "v1.0.0"), None);
    // ...and hello's own record, matching, lets it be kept (it already is: a re-fetch of a new
    // version with a matching record).
    let _ = zip_h1;
    s.up.fault(
        "/sumdb/sum.golang.org/lookup/example.com/hello@v1.1.0",
        Fault::Body(
            lookup(
                "example.com/hello",
                "v1.1.0",
                "h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "h1:x",
            )
            .into_bytes(),
        ),
    );
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/hello/@v/v1.1.0.mod")
        .send();
    assert_eq!(
        r.status,
        502,
        "a go.mod the checksum database disagrees with: {}",
        r.text()
    );

    // The checksum database through hoard: supported, lookups and tiles kept.
    std::fs::create_dir_all(s.root.join("sumdb/sum.golang.org/tile/8/0")).unwrap();
    std::fs::write(s.root.join("sumdb/sum.golang.org/supported"), "").unwrap();
    std::fs::write(
        s.root.join("sumdb/sum.golang.org/tile/8/0/000"),
        vec![7u8; 8192],
    )
    .unwrap();
    let r = s
        .hoard
        .req("GET", "/gomod/sumdb/sum.golang.org/supported")
        .send();
    assert_eq!(r.status, 200);
    let r = s
        .hoard
        .req("GET", "/gomod/sumdb/sum.golang.org/tile/8/0/000")
        .send();
    assert_eq!((r.status, r.body.len()), (200, 8192));
    let hits = s.up.hits("/sumdb/sum.golang.org/tile/8/0/000");
    let r = s
        .hoard
        .req("GET", "/gomod/sumdb/sum.golang.org/tile/8/0/000")
        .send();
    assert_eq!(r.status, 200);
    assert_eq!(
        s.up.hits("/sumdb/sum.golang.org/tile/8/0/000"),
        hits,
        "a full tile is kept"
    );
    let r = s
        .hoard
        .req(
            "GET",
            "/gomod/sumdb/sum.golang.org/lookup/example.com/none@v1.0.0",
        )
        .send();
    assert_eq!(r.status, 404);
}

#[test]
fn upstreams_fall_through_as_goproxy_lists_do() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("upstream");
    fixture(&root);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let up = Upstream::start(&root);
    let none = Upstream::start(&empty); // answers 404 for everything
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap()) // closed when l drops: refused
    };
    let file = "/gomod/example.com/hello/@v/v1.0.0.mod";
    let cases = [
        (
            format!("{},{}", none.url(), up.url()),
            200,
            "404 moves on past a comma",
        ),
        (
            format!("{dead},{}", up.url()),
            502,
            "an error stops at a comma",
        ),
        (
            format!("{dead}|{}", up.url()),
            200,
            "any error moves on past a pipe",
        ),
        (none.url(), 404, "404 everywhere is a miss"),
    ];
    for (i, (list, want, what)) in cases.iter().enumerate() {
        let h = Hoard::start_suite_env(
            &tmp.path().join(format!("data{i}")),
            &[],
            &[
                ("HOARD_GOMOD_UPSTREAMS".into(), list.clone()),
                ("HOARD_GOMOD_TIMEOUT".into(), "3s".into()),
            ],
        );
        ready(&h);
        let r = h.req("GET", file).send();
        assert_eq!(r.status, *want, "{what}: {}", r.text());
    }
}

#[test]
fn bad_paths_are_refused_and_module_repositories_are_read_only_over_v2() {
    let s = setup(&[]);
    for (path, want) in [
        ("/gomod/example.com/../etc/@v/list", 400),
        ("/gomod/Example.com/x/@v/list", 400),
        ("/gomod/example.com/x/@v/v1.0.0.exe", 404),
        ("/gomod/example.com/x/@v/master.zip", 404),
        ("/gomod/nodot/x/@v/list", 400),
        ("/gomod/sumdb/sum.golang.org/../../x", 400),
        ("/gomod/example.com/x", 404),
    ] {
        let r = s.hoard.req("GET", path).send();
        assert_eq!(r.status, want, "{path}: {}", r.text());
    }
    assert_eq!(s.up.total_hits(), 0, "nothing invalid reached the upstream");
    let r = s
        .hoard
        .req("PUT", "/gomod/example.com/hello/@v/v1.0.0.zip")
        .body("x")
        .send();
    assert_eq!(r.status, 405);
    // Kept files are readable over /v2/ but nobody writes or deletes them there.
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/hello/@v/v1.0.0.zip")
        .send();
    assert_eq!(r.status, 200);
    let r = s
        .hoard
        .req("DELETE", "/v2/gomod/example.com/hello/manifests/v1.0.0.zip")
        .send();
    assert_eq!(r.status, 403, "{}", r.text());
    let r = s
        .hoard
        .req("POST", "/v2/gomod/example.com/hello/blobs/uploads/")
        .send();
    assert_eq!(r.status, 403);
    let r = s
        .hoard
        .req("GET", "/gomod/example.com/hello/@v/v1.0.0.zip")
        .send();
    assert_eq!(r.status, 200);
}

#[test]
fn kept_files_expire_by_ttl_like_tags_and_come_back_from_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("upstream");
    fixture(&root);
    let up = Upstream::start(&root);
    let h = Hoard::start_suite_env(
        &tmp.path().join("data"),
        &[
            "--ttl",
            "1s",
            "--clock-skew-tolerance",
            "1s",
            "--orphan-grace",
            "1s",
        ],
        &[("HOARD_GOMOD_UPSTREAMS".into(), up.url())],
    );
    ready(&h);
    let path = "/example.com/hello/@v/v1.0.0.zip";
    let first = h.req("GET", &format!("/gomod{path}")).send();
    assert_eq!(first.status, 200);
    assert!(kept_h1(&h, "example.com/hello", "v1.0.0").is_some());
    std::thread::sleep(Duration::from_millis(3000));
    let r = h.req("POST", "/admin/gc").send();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        kept_h1(&h, "example.com/hello", "v1.0.0"),
        None,
        "expired: {}",
        r.text()
    );
    common::assert_invariant_1(&h, "a module file expired");
    let again = h.req("GET", &format!("/gomod{path}")).send();
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body);
    assert_eq!(up.hits(path), 2, "fetched again after it expired");
}
