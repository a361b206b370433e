//! Go's build cache shared through hoard: the real `go` toolchain with
//! `GOCACHEPROG="hoard gocacheprog …"`, and the helper's protocol driven line by line.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::goproxy::go_binary;
use common::Hoard;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A program of several packages (standard library only).
fn program(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("go.mod"), "module example.com/app\n\ngo 1.22\n").unwrap();
    let mut imports = String::new();
    let mut calls = String::new();
    for i in 0..6 {
        let p = dir.join(format!("p{i}"));
        std::fs::create_dir_all(&p).unwrap();
        let mut src = format!(
            "package p{i}\n\nimport (\n\t\"fmt\"\n\t\"strings\"\n)\n\nfunc F() string {{ return strings.Repeat(fmt.Sprint({i}), 2) }}\n"
        );
        for j in 0..40 {
            src.push_str(&format!(
                "\nfunc G{j}(x int) int {{ if x > {j} {{ return x * {j} }}; return x + {i} }}\n"
            ));
        }
        std::fs::write(p.join("p.go"), src).unwrap();
        imports.push_str(&format!("\t\"example.com/app/p{i}\"\n"));
        calls.push_str(&format!("p{i}.F(), "));
    }
    std::fs::write(
        dir.join("main.go"),
        format!("package main\n\nimport (\n\t\"fmt\"\n{imports})\n\nfunc main() {{ fmt.Println({calls}) }}\n"),
    )
    .unwrap();
}

/// `go` for one "machine": its own GOCACHE and helper directory, the cache behind hoard.
fn go_on(machine: &Path, dir: &Path, url: &str) -> Command {
    let prog = format!(
        "{} gocacheprog --url {url} --dir {} --verbose",
        env!("CARGO_BIN_EXE_hoard"),
        machine.join("prog").display()
    );
    let mut c = Command::new(go_binary());
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", machine)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", machine.join("gocache"))
        .env("GOCACHEPROG", prog)
        .env("GOPATH", machine.join("gopath"))
        .env("CGO_ENABLED", "0");
    c
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("running go");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The helper's summary line: (local hits, hits from hoard, misses).
fn summary(out: &str) -> (u64, u64, u64) {
    let line = out
        .lines()
        .rfind(|l| l.starts_with("hoard gocacheprog:") && l.contains("misses"))
        .unwrap_or_else(|| panic!("no summary line in:\n{out}"));
    let n = |what: &str| -> u64 {
        let i = line.find(what).unwrap();
        line[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .trim_start_matches(',')
            .parse()
            .unwrap()
    };
    (n("local hits"), n("hits from hoard"), n("misses"))
}

/// Packages of the program that `go build -x` compiled.
fn compiled(out: &str) -> usize {
    out.lines()
        .filter(|l| {
            l.contains("/compile ") && (l.contains("-p example.com/app") || l.contains("-p main "))
        })
        .count()
}

#[test]
fn a_second_machine_builds_from_the_first_ones_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_suite_env(&tmp.path().join("data"), &[], &[]);
    let url = format!("http://{}", h.addr);
    let m1 = tmp.path().join("m1");
    let src = tmp.path().join("src");
    program(&src);
    let (ok, out) = run(go_on(&m1, &src, &url).args([
        "build",
        "-x",
        "-o",
        m1.join("app").to_str().unwrap(),
        ".",
    ]));
    assert!(ok, "first build:\n{out}");
    assert_eq!(compiled(&out), 7, "the first machine compiles everything");
    let (_, remote, misses) = summary(&out);
    assert_eq!(remote, 0);
    assert!(misses > 0);
    let (ok, run_out) = run(&mut Command::new(m1.join("app")));
    assert!(ok && run_out.starts_with("00 11 22"), "{run_out}");

    // Another machine: empty GOCACHE, empty helper directory.
    let m2 = tmp.path().join("m2");
    let (ok, out) = run(go_on(&m2, &src, &url).args([
        "build",
        "-x",
        "-o",
        m2.join("app").to_str().unwrap(),
        ".",
    ]));
    assert!(ok, "second build:\n{out}");
    assert_eq!(compiled(&out), 0, "the second machine compiled:\n{out}");
    // Hits from hoard: asked for, or prefetched as the first machine's puts followed one
    // another and then found in the local tier.
    let (local, remote, _) = summary(&out);
    assert!(
        remote >= 1 && local + remote > 7,
        "local {local}, from hoard {remote}"
    );
    let (ok, run_out) = run(&mut Command::new(m2.join("app")));
    assert!(ok && run_out.starts_with("00 11 22"), "{run_out}");

    // Again on the second machine: its own disk tier answers.
    let (ok, out) =
        run(go_on(&m2, &src, &url).args(["build", "-o", m2.join("app").to_str().unwrap(), "."]));
    assert!(ok, "{out}");
    let (local, remote, _) = summary(&out);
    assert!(local > 7 && remote == 0, "local {local}, remote {remote}");

    // The entries are refs under the lifecycle: readable, not writable, over /v2/.
    let r = h.req("GET", "/v2/gocache/default/tags/list").send();
    assert_eq!(r.status, 200);
    assert!(r.json()["tags"].as_array().unwrap().len() > 7);
    let r = h.req("POST", "/v2/gocache/default/blobs/uploads/").send();
    assert_eq!(r.status, 403);
}

#[test]
fn hoard_stopped_or_never_there_is_a_miss_not_a_failed_build() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    program(&src);
    // Nobody listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let m = tmp.path().join("m-dead");
    let (ok, out) =
        run(go_on(&m, &src, &dead).args(["build", "-o", m.join("app").to_str().unwrap(), "."]));
    assert!(ok, "build with hoard unreachable:\n{out}");
    assert_eq!(
        out.matches("is unreachable").count(),
        1,
        "one warning, not one per request:\n{out}"
    );

    // Stopped while a build runs.
    let mut h = Hoard::start_suite_env(&tmp.path().join("data"), &[], &[]);
    let url = format!("http://{}", h.addr);
    let m = tmp.path().join("m-stop");
    let child = go_on(&m, &src, &url)
        .args(["build", "-a", "-o", m.join("app").to_str().unwrap(), "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    h.kill9();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "build with hoard killed mid-way:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The helper driven by hand, as `go` drives it.
struct Helper {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

impl Helper {
    fn start(url: &str, dir: &Path) -> Helper {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hoard"))
            .args(["gocacheprog", "--url", url, "--dir", dir.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Helper { child, stdin, out }
    }

    fn send(&mut self, req: serde_json::Value, body: Option<&[u8]>) {
        writeln!(self.stdin, "{req}").unwrap();
        if let Some(b) = body {
            writeln!(self.stdin, "\"{}\"", B64.encode(b)).unwrap();
        }
        self.stdin.flush().unwrap();
    }

    fn recv(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn close(mut self) {
        self.send(serde_json::json!({"ID": 999, "Command": "close"}), None);
        let r = self.recv();
        assert_eq!(r["ID"], 999);
        assert!(self.child.wait().unwrap().success());
    }
}

fn id(n: u8) -> [u8; 32] {
    [n; 32]
}

fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).into()
}

#[test]
fn the_protocol_line_by_line_with_a_server_clock_two_hours_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::start_suite_env(&tmp.path().join("data"), &["--clock-offset", "+2h"], &[]);
    let url = format!("http://{}", h.addr);
    let mut a = Helper::start(&url, &tmp.path().join("a"));
    let caps = a.recv();
    assert_eq!(caps["ID"], 0, "capabilities come first, with ID 0");
    assert_eq!(
        caps["KnownCommands"],
        serde_json::json!(["get", "put", "close"])
    );

    let body = b"compiled output".to_vec();
    let before = std::time::SystemTime::now();
    // Pipelined: a get of an unknown action, a put, a put with a lying output id, all at once.
    a.send(
        serde_json::json!({"ID": 1, "Command": "get", "ActionID": B64.encode(id(1))}),
        None,
    );
    a.send(
        serde_json::json!({"ID": 2, "Command": "put", "ActionID": B64.encode(id(2)),
                           "OutputID": B64.encode(sha(&body)), "BodySize": body.len()}),
        Some(&body),
    );
    a.send(
        serde_json::json!({"ID": 3, "Command": "put", "ActionID": B64.encode(id(3)),
                           "OutputID": B64.encode(id(9)), "BodySize": body.len()}),
        Some(&body),
    );
    let mut got = std::collections::HashMap::new();
    for _ in 0..3 {
        let r = a.recv();
        got.insert(r["ID"].as_i64().unwrap(), r);
    }
    assert_eq!(got[&1]["Miss"], true);
    let disk = got[&2]["DiskPath"].as_str().unwrap();
    assert_eq!(std::fs::read(disk).unwrap(), body);
    assert!(
        got[&3]["Err"].as_str().unwrap().contains("OutputID"),
        "{}",
        got[&3]
    );
    a.close(); // flushes the upload

    // Another machine gets it from hoard; the time is in its own clock, not the server's.
    let mut b = Helper::start(&url, &tmp.path().join("b"));
    b.recv();
    b.send(
        serde_json::json!({"ID": 7, "Command": "get", "ActionID": B64.encode(id(2))}),
        None,
    );
    let r = b.recv();
    assert_eq!(r["ID"], 7);
    assert!(r["Miss"].is_null(), "{r}");
    assert_eq!(r["OutputID"], B64.encode(sha(&body)));
    assert_eq!(r["Size"], body.len());
    assert_eq!(
        std::fs::read(r["DiskPath"].as_str().unwrap()).unwrap(),
        body
    );
    let t = r["Time"].as_str().unwrap();
    let secs = rfc3339_secs(t);
    let before_s = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        secs >= before_s - 5 && secs <= now_s,
        "Time {t} should be when the put happened, in this machine's clock"
    );
    b.close();

    // The server side refuses what does not add up.
    let r = h
        .req(
            "PUT",
            &format!(
                "/gocache/default/action/{}?output={}",
                "ab".repeat(32),
                "cd".repeat(32)
            ),
        )
        .body(b"x".to_vec())
        .send();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = h
        .req(
            "GET",
            &format!("/gocache/default/action/{}", "ef".repeat(32)),
        )
        .send();
    assert_eq!(r.status, 404);
    let r = h.req("GET", "/gocache/default/action/xyz").send();
    assert_eq!(r.status, 400);
}

fn rfc3339_secs(t: &str) -> i64 {
    // YYYY-MM-DDTHH:MM:SS(.fff)Z
    let (date, time) = t.split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let hms: Vec<i64> = time
        .trim_end_matches('Z')
        .split('.')
        .next()
        .unwrap()
        .split(':')
        .map(|x| x.parse().unwrap())
        .collect();
    let (y, m, day) = (d[0], d[1], d[2]);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2]
}
