//! Upload sessions: the one place that tracks a blob upload between requests — its repository,
//! the writer holding the bytes and hash state so far, and when it was last used (idle sessions
//! expire by the daemon's clock). OCI chunked uploads use it today; containerd's `Write` will too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

use crate::clock::{Millis, SharedClock};
use crate::error::{Error, Result};
use crate::names::RepoName;
use crate::store::chunk::ChunkBuf;
use crate::store::BlobWriter;

pub struct Session {
    /// Created with the first byte, so a session that never receives data costs no file.
    pub writer: Option<Box<dyn BlobWriter>>,
    pub started: Millis,
    pub touched: Millis,
    /// Finished, cancelled or expired while a request waited for it: that request answers
    /// "unknown upload" instead of working on a session nobody can reach any more.
    closed: bool,
}

impl Session {
    pub fn offset(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.written())
    }
}

pub type SessionRef = Arc<tokio::sync::Mutex<Session>>;
/// A session held by one request; others wait for it (requests on one upload run in order).
pub type Held = tokio::sync::OwnedMutexGuard<Session>;

/// The repository lives beside the session, not inside its lock, so a session busy with a
/// long PATCH still answers only in its own repository.
struct Entry {
    repo: RepoName,
    session: SessionRef,
}

pub struct Uploads {
    sessions: Mutex<HashMap<String, Entry>>,
    clock: SharedClock,
}

impl Uploads {
    pub fn new(clock: SharedClock) -> Uploads {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn start(&self, repo: RepoName) -> String {
        let mut raw = [0u8; 16];
        if getrandom::getrandom(&mut raw).is_err() {
            raw = (self.clock.now_ms() as u128 ^ (self.map().len() as u128) << 64).to_le_bytes();
        }
        // UUID-shaped, as clients that log or parse it expect.
        let h = crate::digest::hex_encode(&raw);
        let id = format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        );
        let now = self.clock.now_ms();
        let session = Session {
            writer: None,
            started: now,
            touched: now,
            closed: false,
        };
        let entry = Entry {
            repo,
            session: Arc::new(tokio::sync::Mutex::new(session)),
        };
        self.map().insert(id.clone(), entry);
        id
    }

    /// Waits for session `id` of `repo` and holds it. An id started in another repository is
    /// unknown here, busy or not: nobody can finish or cancel someone else's upload.
    pub async fn hold(&self, repo: &RepoName, id: &str) -> Result<Held> {
        let s = match self.map().get(id) {
            Some(e) if e.repo == *repo => e.session.clone(),
            _ => return Err(unknown(id)),
        };
        let held = s.lock_owned().await;
        if held.closed {
            return Err(unknown(id));
        }
        Ok(held)
    }

    /// Ends a held session: it is forgotten, and dropping its writer (if the caller has not
    /// taken it) removes any partial data.
    pub fn close(&self, id: &str, held: &mut Held) {
        held.closed = true;
        held.writer = None;
        self.map().remove(id);
    }

    pub fn touch(&self, s: &mut Session) {
        s.touched = self.clock.now_ms();
    }

    /// Drops sessions idle for longer than `idle_ms` (by this daemon's clock; a clock that steps
    /// back makes sessions look younger, never expires them early). Returns how many went.
    pub fn expire(&self, idle_ms: i64) -> usize {
        let now = self.clock.now_ms();
        // Writers are dropped (their files removed) after the map is let go.
        let mut dropped = Vec::new();
        self.map().retain(|_, e| match e.session.try_lock() {
            Ok(mut g) => {
                let keep = now.saturating_sub(g.touched) <= idle_ms;
                if !keep {
                    g.closed = true;
                    dropped.push(g.writer.take());
                }
                keep
            }
            // In use right now: not idle.
            Err(_) => true,
        });
        dropped.len()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unknown(id: &str) -> Error {
    Error::not_found(format!(
        "upload {id} is unknown in this repository: it finished, was cancelled, expired, or \
         was started in another repository"
    ))
}

/// Bodies up to this size are gathered in memory and written with one blocking call.
const SMALL_BODY: usize = 1 << 20;

/// Streams a request body into `writer` on the blocking pool, receiving and writing in parallel.
/// Returns the writer back with the outcome: on error (client cut off, disk full) the caller
/// decides whether to drop the upload.
pub async fn pump<B>(
    mut writer: Box<dyn BlobWriter>,
    mut body: B,
) -> (Box<dyn BlobWriter>, Result<()>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let cut_off = |e: &dyn std::fmt::Display| Error::conflict(format!("upload interrupted: {e}"));
    // Small bodies: gather, then write once.
    let mut head: Vec<Bytes> = Vec::new();
    let mut head_len = 0usize;
    let mut ended = false;
    while head_len < SMALL_BODY {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    head_len += data.len();
                    head.push(data);
                }
            }
            Some(Err(e)) => return (writer, Err(cut_off(&e))),
            None => {
                ended = true;
                break;
            }
        }
    }
    if ended {
        return blocking(move || {
            let mut res = Ok(());
            for chunk in head {
                res = writer.write_owned(chunk);
                if res.is_err() {
                    break;
                }
            }
            (writer, res)
        })
        .await;
    }
    // Large bodies: a bounded channel to one blocking writer, so the network and the disk (and
    // the hash) overlap while memory stays bounded. Frames go on as they come until the writer's
    // I/O thread takes over; past that each is copied into a pooled, block-aligned buffer and let go
    // (see `store::chunk`), and full buffers go on.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUED_CHUNKS);
    let mut fwd = Forward {
        aligned_from: writer.aligned_from(),
        offset: writer.written(),
        buf: None,
        tx,
    };
    let task = tokio::task::spawn_blocking(move || {
        let mut res = Ok(());
        while let Some(chunk) = rx.blocking_recv() {
            if res.is_ok() {
                res = writer.write_owned(chunk);
            }
        }
        (writer, res)
    });
    let mut recv: Result<()> = Ok(());
    let mut open = true;
    for chunk in head {
        open = open && fwd.send(chunk).await;
    }
    while open {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    // The writer stopped early (write error): stop sending, report its error.
                    open = fwd.send(data).await;
                }
            }
            Some(Err(e)) => {
                recv = Err(cut_off(&e));
                break;
            }
            None => {
                fwd.flush().await;
                break;
            }
        }
    }
    drop(fwd);
    match task.await {
        Ok((w, res)) => (w, res.and(recv)),
        Err(e) => panic_to_writer(e),
    }
}

/// Chunks queued for the writer: received frames (at most the HTTP layer's read buffer) or
/// full 512 KiB upload buffers.
const QUEUED_CHUNKS: usize = 2;

/// The network side of a streamed upload: passes received bytes to the writer.
struct Forward {
    aligned_from: Option<u64>,
    /// Upload offset of the next byte received.
    offset: u64,
    /// The aligned buffer being filled, once past `aligned_from`.
    buf: Option<ChunkBuf>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl Forward {
    /// False once the writer has stopped.
    async fn send(&mut self, mut data: Bytes) -> bool {
        let before = match self.aligned_from {
            Some(at) => at.saturating_sub(self.offset).min(data.len() as u64) as usize,
            None => data.len(),
        };
        self.offset += data.len() as u64;
        if before > 0 {
            let head = data.split_to(before);
            if self.tx.send(head).await.is_err() {
                return false;
            }
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            let buf = self.buf.get_or_insert_with(ChunkBuf::new);
            let n = buf.fill(rest);
            rest = &rest[n..];
            if buf.is_full() {
                if let Some(full) = self.buf.take() {
                    if self.tx.send(full.into_bytes()).await.is_err() {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Sends what is buffered at the end of the body.
    async fn flush(&mut self) {
        if let Some(last) = self.buf.take().filter(|b| !b.is_empty()) {
            let _ = self.tx.send(last.into_bytes()).await;
        }
    }
}

/// A panicked writer task leaves no writer to hand back; there is nothing sane to continue with.
fn panic_to_writer(e: tokio::task::JoinError) -> ! {
    std::panic::resume_unwind(e.into_panic())
}

/// Runs blocking store work on the blocking pool.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
