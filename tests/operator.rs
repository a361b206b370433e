//! Operator traps, against the real binary: files stay the data directory owner's when root runs
//! the tools on a service's directory; tools refuse a directory that holds no store; a start that
//! cannot listen leaves the store clean; downtime is information, not a clock step; each
//! subcommand's help lists only its own flags; the start-up log and the status page name the
//! settings; the access log and refusals are logged.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const K: usize = 1024;
const NOBODY: u32 = 65534;

/// Every file and directory under `dir` with an owner other than `uid`.
fn not_owned_by(dir: &Path, uid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let m = std::fs::symlink_metadata(&p).expect("stat");
        if m.uid() != uid {
            out.push(format!("{} (uid {})", p.display(), m.uid()));
        }
        if m.is_dir() {
            out.extend(not_owned_by(&p, uid));
        }
    }
    out
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn root_running_the_tools_on_a_service_owned_store_keeps_every_file_the_services() {
    require_tool("setpriv", "apt-get install util-linux");
    assert_eq!(
        effective_uid(),
        0,
        "this test runs hoard as an unprivileged user and the tools as root: run the suite as \
         root (the README's test command does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    let as_nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let d = data.to_str().unwrap();

    // The service, unprivileged, fills its store.
    let mut h = Hoard::start_via(&as_nobody, &data, &[]);
    push_image(&h, "svc", "v1", None, &[bytes(1, 300 * K)]);
    assert!(h.stop().success());
    assert_eq!(not_owned_by(&data, NOBODY), Vec::<String>::new());

    // Root runs the tools offline on it: they work as the directory's owner.
    let out = hoard_cmd(&["verify", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out));
    let out = hoard_cmd(&["verify", "--repair", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out));
    let out = hoard_cmd(&["gc", "--once", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        not_owned_by(&data, NOBODY),
        Vec::<String>::new(),
        "root's tools left files the service cannot open"
    );

    // The service starts again, cleanly, and everything pulls.
    let h = Hoard::start_via(&as_nobody, &data, &[]);
    assert!(pull(&h, "svc", "v1"));
    let log = h.log();
    assert!(!log.contains("ermission denied"), "{log}");
    assert!(!log.contains("unclean shutdown"), "{log}");
    drop(h);

    // Someone who may not write there gets an error that names the file.
    let out = Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65533", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_hoard"))
        .args(["verify", "--data-dir", d])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let lock = data.join("LOCK");
    assert!(
        text(&out).contains(&format!("{}: Permission denied", lock.display())),
        "{}",
        text(&out)
    );
}

fn effective_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn tools_refuse_a_directory_that_holds_no_store_and_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = tmp.path().join("missing");
    for dir in [&empty, &missing] {
        let d = dir.to_str().unwrap();
        for args in [
            vec!["verify", "--data-dir", d],
            vec!["verify", "--repair", "--data-dir", d],
            vec!["gc", "--once", "--data-dir", d],
        ] {
            let out = hoard_cmd(&args);
            assert!(!out.status.success(), "{args:?} succeeded on {d}");
            assert!(
                text(&out).contains("holds no hoard store"),
                "{args:?}: {}",
                text(&out)
            );
        }
    }
    assert_eq!(count_files(&empty), 0);
    assert!(!missing.exists());
}

#[test]
fn a_start_that_cannot_listen_leaves_the_store_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut h = Hoard::start_on(&data, &[]);
    push_image(&h, "app", "v1", None, &[bytes(2, 100 * K)]);
    assert!(h.stop().success());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    for listen in [port.as_str(), "not-an-address"] {
        let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
            .args([
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                listen,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            text(&out).contains(&format!("cannot listen on {listen}")),
            "{}",
            text(&out)
        );
        assert!(data.join("index").join("clean").exists(), "{}", text(&out));
    }
    let h = Hoard::start_on(&data, &[]);
    assert!(pull(&h, "app", "v1"));
    assert!(!h.log().contains("unclean shutdown"), "{}", h.log());
}

#[test]
fn downtime_is_logged_as_information_and_only_a_step_while_running_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut h = Hoard::start_on(&data, &[]);
    push_image(&h, "app", "v1", None, &[bytes(3, 10 * K)]);
    assert!(h.stop().success());
    // As if stopped for ten minutes: the wall clock is ahead of the last cache time journaled.
    let mut h = Hoard::start_on(&data, &["--clock-offset", "+10m"]);
    for _ in 0..5 {
        assert!(pull(&h, "app", "v1"));
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = h.log();
    assert!(log.contains("moved on while hoard was stopped"), "{log}");
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.contains("stepped"),
        "downtime reported as a clock step:\n{log}"
    );
    assert!(h.stop().success());
}

#[test]
fn each_subcommand_help_lists_only_its_own_flags() {
    let help = |sub: &str| {
        let out = hoard_cmd(&[sub, "--help"]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let serve = help("serve");
    for f in [
        "--listen",
        "--durability",
        "--max-size",
        "--data-dir",
        "--max-transfers",
    ] {
        assert!(serve.contains(f), "serve --help lacks {f}:\n{serve}");
    }
    let gc = help("gc");
    for f in [
        "--once",
        "--data-dir",
        "--max-size",
        "--ttl",
        "--orphan-grace",
    ] {
        assert!(gc.contains(f), "gc --help lacks {f}:\n{gc}");
    }
    let verify = help("verify");
    for f in ["--repair", "--data-dir", "--store-path"] {
        assert!(verify.contains(f), "verify --help lacks {f}:\n{verify}");
    }
    for f in [
        "--listen",
        "--durability",
        "--sync-interval",
        "--upload-timeout",
        "--shutdown-timeout",
        "--max-transfers",
        "--access-log",
        "--gc-interval",
    ] {
        assert!(!gc.contains(f), "gc --help lists {f}:\n{gc}");
        assert!(!verify.contains(f), "verify --help lists {f}:\n{verify}");
    }
    for f in ["--max-size", "--ttl", "--orphan-grace"] {
        assert!(!verify.contains(f), "verify --help lists {f}:\n{verify}");
    }
}

#[test]
fn start_up_log_and_status_page_name_the_data_dir_store_durability_and_limits() {
    let h = Hoard::start(&["--max-size", "1GiB", "--ttl", "14d"]);
    let abs = std::fs::canonicalize(&h.data).unwrap();
    let abs = abs.display().to_string();
    let log = h.log();
    let page = status_page(&h);
    for want in [
        abs.as_str(),
        "durability",
        "group (fsync every 1s)",
        "1.0 GiB",
        "14d",
        "max_transfers",
    ] {
        assert!(log.contains(want), "start-up log lacks {want:?}:\n{log}");
        assert!(page.contains(want), "status page lacks {want:?}:\n{page}");
    }
    assert!(page.contains(&format!("data_dir: {abs}\n")), "{page}");
    assert!(page.contains("store: disk\n"), "{page}");
}

#[test]
fn a_direct_io_switch_point_under_one_mebibyte_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--direct-io-above",
            "512KiB",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("direct_io_above must be at least 1MiB"),
        "{}",
        text(&out)
    );
    assert!(!tmp.path().join("data").exists());
}

#[test]
fn every_request_gets_an_access_log_line_and_refusals_say_why() {
    let h = Hoard::start(&["--max-size", "1MiB"]);
    let d = push_blob(&h, "logs", &bytes(4, 1000));
    let r = h
        .req("GET", &format!("/v2/logs/blobs/{d}?secret=hunter2"))
        .send();
    assert_eq!(r.status, 200);
    // Refusals: a body over the store's bound (507), a manifest over the size limit (413), a
    // manifest that is not JSON (400).
    let big = bytes(5, 2 << 20);
    let r = h
        .req(
            "POST",
            &format!("/v2/logs/blobs/uploads/?digest={}", sha256(&big)),
        )
        .body(big)
        .send();
    assert_eq!(r.status, 507, "{}", r.text());
    let r = h
        .req("PUT", "/v2/logs/manifests/huge")
        .header("Content-Type", OCI_MANIFEST)
        .header("Content-Length", "5000000")
        .send();
    assert_eq!(r.status, 413);
    let r = put_manifest(&h, "logs", "bad", OCI_MANIFEST, b"not json");
    assert_eq!(r.status, 400);
    wait_until(
        "the access log lines are written",
        Duration::from_secs(10),
        || h.log().contains("path=/v2/logs/manifests/bad"),
    );
    let log = h.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("path=/v2/logs/blobs/{d}")) && l.contains("method=GET"))
        .unwrap_or_else(|| panic!("no access log line for the pull:\n{log}"));
    for want in [
        "status=200",
        "bytes_out=1000",
        "ms=",
        "peer=127.0.0.1:",
        "complete=true",
    ] {
        assert!(line.contains(want), "{want} missing from {line}");
    }
    assert!(
        !log.contains("hunter2"),
        "the query string reached the log:\n{log}"
    );
    for want in ["status=507", "status=413", "status=400"] {
        assert!(log.contains(want), "{want} not in the access log:\n{log}");
    }
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    for (status, reason) in [
        ("status=507", "no room for"),
        ("status=413", "byte limit"),
        ("status=400", "MANIFEST_INVALID"),
    ] {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains(status) && l.contains(reason)),
            "no refusal line with {status} and {reason:?}:\n{log}"
        );
    }

    // And off with a setting.
    let quiet = Hoard::start(&["--access-log", "false"]);
    quiet.req("GET", "/v2/").send();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!quiet.log().contains("hoard::access"), "{}", quiet.log());
}

#[test]
fn the_health_subcommand_answers_for_a_serving_daemon_only() {
    let h = Hoard::start(&[]);
    let addr = h.addr.to_string();
    let out = hoard_cmd(&["health", "--listen", &addr]);
    assert!(out.status.success(), "{}", text(&out));
    let wildcard = format!("0.0.0.0:{}", h.port());
    let out = hoard_cmd(&["health", "--listen", &wildcard]);
    assert!(out.status.success(), "{}", text(&out));
    drop(h);
    let out = hoard_cmd(&["health", "--listen", &addr]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach the daemon"),
        "{}",
        text(&out)
    );
}
