//! The S3 side of the black-box tests: a real S3-protocol server (moto's) on loopback, and which
//! store the suite runs hoard on (`HOARD_TEST_STORE` = disk, s3 or tiered; the README's test
//! command runs the registry and lifecycle suites once per store).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Disk,
    S3,
    Tiered,
}

/// The store this run of the suite puts hoard on.
pub fn store_kind() -> StoreKind {
    match std::env::var("HOARD_TEST_STORE").as_deref() {
        Err(_) | Ok("") | Ok("disk") => StoreKind::Disk,
        Ok("s3") => StoreKind::S3,
        Ok("tiered") => StoreKind::Tiered,
        Ok(other) => panic!("HOARD_TEST_STORE={other}: expected disk, s3 or tiered"),
    }
}

pub fn on_disk() -> bool {
    store_kind() == StoreKind::Disk
}

/// The S3 server binary: `HOARD_TEST_MOTO`, the venv the test command makes, or PATH.
fn moto_server() -> PathBuf {
    if let Ok(p) = std::env::var("HOARD_TEST_MOTO") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/venv/bin/moto_server");
    if venv.is_file() {
        return venv;
    }
    super::require_tool(
        "moto_server",
        "install an S3 server: python3 -m venv target/peers/venv && target/peers/venv/bin/pip install 'moto[server]'",
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One S3 server process on loopback, stopped when dropped.
pub struct S3Server {
    pub port: u16,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

impl S3Server {
    /// A server of this test's own (to stop, freeze or restart).
    pub fn start() -> S3Server {
        S3Server::start_env(&[])
    }

    /// With environment for the server (`INITIAL_NO_AUTH_ACTION_COUNT` makes it check
    /// signatures after that many requests).
    pub fn start_env(env: &[(&str, &str)]) -> S3Server {
        let mut s = S3Server {
            port: free_port(),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.spawn(false);
        s
    }

    fn spawn(&mut self, die_with_parent: bool) {
        let bin = moto_server();
        let mut cmd = if die_with_parent {
            // The shared server lives as long as the test process.
            let mut c = Command::new("setpriv");
            c.arg("--pdeathsig").arg("KILL").arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("starting the S3 server {}: {e}", bin.display())),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // A connection, not a request: a server counting its unauthenticated requests
            // (INITIAL_NO_AUTH_ACTION_COUNT) keeps them for the test.
            if std::net::TcpStream::connect(self.addr()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the S3 server did not come up on port {}", self.port);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn get(&self, path: &str) -> Option<super::Resp> {
        let f = super::Hoard::try_req_at(self.addr());
        f("GET", path, &[], Vec::new()).ok()
    }

    /// Creates `bucket` (a no-op when it exists).
    pub fn create_bucket(&self, bucket: &str) {
        let f = super::Hoard::req_at(self.addr());
        let r = f("PUT", &format!("/{bucket}"), &[], Vec::new());
        assert!(
            r.status == 200 || r.status == 409,
            "creating bucket {bucket}: {} {}",
            r.status,
            r.text()
        );
    }

    /// Keys and sizes under `prefix` in `bucket` (every page).
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{bucket}?list-type=2&prefix={prefix}");
            if let Some(t) = &token {
                path.push_str(&format!("&continuation-token={}", urlencode(t)));
            }
            let r = self.get(&path).expect("listing the bucket");
            assert_eq!(r.status, 200, "listing {bucket}: {}", r.text());
            let text = r.text();
            for item in text.split("<Contents>").skip(1) {
                let key = between(item, "<Key>", "</Key>").unwrap_or_default();
                let size = between(item, "<Size>", "</Size>")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                out.push((key, size));
            }
            match between(&text, "<NextContinuationToken>", "</NextContinuationToken>") {
                Some(t) if text.contains("<IsTruncated>true</IsTruncated>") => token = Some(t),
                _ => return out,
            }
        }
    }

    /// Writes an object as a client with credentials would (the server refuses anonymous
    /// overwrites of objects a signed client wrote), through the S3 server's own SDK.
    pub fn put_signed(&self, bucket: &str, key: &str, body: &[u8]) {
        let python = moto_server().with_file_name("python");
        let script = "import sys, boto3\n\
s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test')\n\
s3.put_object(Bucket=sys.argv[2], Key=sys.argv[3], Body=sys.stdin.buffer.read())\n";
        let mut child = Command::new(&python)
            .args(["-c", script, &self.endpoint(), bucket, key])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body)
            .expect("writing the object's bytes");
        let status = child.wait().expect("waiting for the S3 client");
        assert!(status.success(), "writing {bucket}/{key} failed");
    }

    /// Multipart uploads begun in `bucket` and neither completed nor aborted.
    pub fn multipart_uploads(&self, bucket: &str) -> usize {
        let r = self
            .get(&format!("/{bucket}?uploads"))
            .expect("listing multipart uploads");
        assert_eq!(r.status, 200, "listing uploads of {bucket}: {}", r.text());
        r.text().matches("<Upload>").count()
    }

    /// Freezes the server (SIGSTOP): connections open, nothing answered — S3 hanging.
    pub fn freeze(&self) {
        self.signal("STOP");
    }
    pub fn thaw(&self) {
        self.signal("CONT");
    }
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().map(|c| c.id()).expect("server running");
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Stops the server: S3 unreachable (connections refused).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (moto keeps objects in memory: the bucket comes back
    /// empty and must be created again).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(false);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn between(s: &str, a: &str, b: &str) -> Option<String> {
    let i = s.find(a)? + a.len();
    let j = s[i..].find(b)? + i;
    Some(s[i..j].replace("&amp;", "&"))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The S3 server the whole test process shares (one bucket per data directory).
pub fn shared() -> &'static S3Server {
    static SHARED: OnceLock<S3Server> = OnceLock::new();
    SHARED.get_or_init(|| {
        // Spawned from a thread that never ends, so the server dies with the test process
        // (a parent-death signal fires when the spawning thread exits).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = S3Server {
                port: free_port(),
                child: None,
                env: Vec::new(),
            };
            s.spawn(true);
            let _ = tx.send(s);
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("starting the shared S3 server")
    })
}

pub fn shared_addr() -> SocketAddr {
    shared().addr()
}

/// The bucket name a data directory gets: stable, so a restart on the same directory finds
/// its bucket again.
pub fn bucket_for(data: &Path) -> String {
    let h = super::sha256(data.to_string_lossy().as_bytes());
    format!("t-{}", &h[7..27])
}

/// Environment that puts a hoard on `kind` (the shared server, `data`'s bucket).
pub fn store_env(kind: StoreKind, server: &S3Server, bucket: &str) -> Vec<(String, String)> {
    store_env_at(kind, &server.endpoint(), bucket)
}

/// `store_env` for an S3 service at `endpoint` (a proxy in front of the server, say).
pub fn store_env_at(kind: StoreKind, endpoint: &str, bucket: &str) -> Vec<(String, String)> {
    let mut leaf = vec![
        ("BUCKET", bucket.to_owned()),
        ("PREFIX", "hoard/".to_owned()),
        ("REGION", "us-east-1".to_owned()),
        ("ENDPOINT", endpoint.to_owned()),
        ("PATH_STYLE", "true".to_owned()),
        ("ACCESS_KEY_ID", "test".to_owned()),
        ("SECRET_ACCESS_KEY", "test".to_owned()),
    ];
    let mut env = Vec::new();
    match kind {
        StoreKind::Disk => return env,
        StoreKind::S3 => {
            env.push(("HOARD_STORE_TYPE".to_owned(), "s3".to_owned()));
            for (k, v) in leaf.drain(..) {
                env.push((format!("HOARD_STORE_{k}"), v));
            }
        }
        StoreKind::Tiered => {
            env.push(("HOARD_STORE_TYPE".to_owned(), "tiered".to_owned()));
            env.push(("HOARD_STORE_FAST_MAX_SIZE".to_owned(), "256MiB".to_owned()));
            for (k, v) in leaf.drain(..) {
                env.push((format!("HOARD_STORE_SLOW_{k}"), v));
            }
        }
    }
    env
}
