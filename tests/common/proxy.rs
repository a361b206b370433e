//! A TCP proxy in front of the S3 server, for faults the server itself cannot show: a service
//! that ignores conditional writes (the proxy drops `If-Match` / `If-None-Match` from requests,
//! as some S3-compatible services effectively do), and S3 going away and coming back with its
//! data intact (connections cut and refused, then served again on the same address), and S3
//! that answers reads but cuts every write.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Proxy {
    pub port: u16,
    strip: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    writes_cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let p = Proxy {
            port,
            strip: Arc::new(AtomicBool::new(false)),
            down: Arc::new(AtomicBool::new(false)),
            writes_cut: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (strip, down, conns) = (p.strip.clone(), p.down.clone(), p.conns.clone());
        let writes_cut = p.writes_cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if down.load(Ordering::SeqCst) {
                    // Gone: the connection is dropped before a byte is answered.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                {
                    let mut c = conns.lock().unwrap();
                    c.retain(|s| s.peer_addr().is_ok());
                    if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                        c.push(a);
                        c.push(b);
                    }
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (strip, writes_cut) = (strip.clone(), writes_cut.clone());
                std::thread::spawn(move || forward_requests(client, server, &strip, &writes_cut));
                std::thread::spawn(move || {
                    let (mut from, mut to) = (s2, c2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
        });
        p
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops conditional headers from every request from now on.
    pub fn strip_conditions(&self, on: bool) {
        self.strip.store(on, Ordering::SeqCst);
    }

    /// S3 unreachable: open connections are cut, new ones dropped at once.
    pub fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Reads still answered; every `PUT` and `POST` from now on has its connection cut before
    /// a byte of it reaches S3.
    pub fn cut_writes(&self, on: bool) {
        self.writes_cut.store(on, Ordering::SeqCst);
    }

    pub fn come_back(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Copies HTTP/1.1 requests from `client` to `server`, head by head (dropping conditional
/// headers when asked), bodies by their length or their chunks.
fn forward_requests(
    client: TcpStream,
    mut server: TcpStream,
    strip: &AtomicBool,
    writes_cut: &AtomicBool,
) {
    let mut r = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut length = 0u64;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = server.shutdown(Shutdown::Write);
                    return;
                }
                Ok(_) => {}
            }
            if head.is_empty()
                && writes_cut.load(Ordering::SeqCst)
                && (line.starts_with("PUT ") || line.starts_with("POST "))
            {
                let _ = r.get_ref().shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
            let lower = line.to_ascii_lowercase();
            if strip.load(Ordering::SeqCst)
                && (lower.starts_with("if-match:") || lower.starts_with("if-none-match:"))
            {
                continue;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            let end = line == "\r\n";
            head.extend_from_slice(line.as_bytes());
            if end {
                break;
            }
        }
        if server.write_all(&head).is_err() {
            return;
        }
        let ok = if chunked {
            copy_chunks(&mut r, &mut server)
        } else {
            std::io::copy(&mut (&mut r).take(length), &mut server).is_ok()
        };
        if !ok {
            return;
        }
    }
}

fn copy_chunks(r: &mut BufReader<TcpStream>, w: &mut TcpStream) -> bool {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || w.write_all(line.as_bytes()).is_err() {
            return false;
        }
        let size =
            u64::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t).unwrap_or(0) == 0 || w.write_all(t.as_bytes()).is_err() {
                    return false;
                }
                if t == "\r\n" {
                    return true;
                }
            }
        }
        if std::io::copy(&mut r.take(size + 2), w).is_err() {
            return false;
        }
    }
}
