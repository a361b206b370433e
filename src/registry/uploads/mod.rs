//! Upload sessions: the one place that tracks an upload between requests — who names it, its
//! bytes and hash state so far, the size and digest it promised, when it started and was last
//! used, and when it expires (by the daemon's clock). Two kinds share it:
//!
//! - OCI uploads (here): named by hoard (a UUID per `POST`), bytes in the store's own writer
//!   (its I/O thread and direct I/O for large layers), kept in memory: a registry client whose
//!   session is gone starts a new one, as distribution-spec allows.
//! - containerd ingests (`ingest`): named by the client's `ref`, resumable by offset after a cut
//!   stream and after a restart, so kept in files past their first MiB or when their stream ends.
//!
//! Both reserve their bytes against the size bound as they arrive, verify size and digest at
//! the commit, and expire when idle (`expire`, `expire_ingests`).

pub mod ingest;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The offset last answered to the client, readable while a request holds the session.
    acked: Arc<AtomicU64>,
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
    acked: Arc<AtomicU64>,
}

pub struct Uploads {
    sessions: Mutex<HashMap<String, Entry>>,
    clock: SharedClock,
    /// containerd's ingests, once the daemon opened their directory.
    ingests: std::sync::OnceLock<ingest::Ingests>,
}

impl Uploads {
    pub fn new(clock: SharedClock) -> Uploads {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            clock,
            ingests: std::sync::OnceLock::new(),
        }
    }

    /// Opens the ingests kept under `dir` (the daemon does, before serving the content API).
    pub fn open_ingests(
        &self,
        dir: std::path::PathBuf,
        life: Arc<crate::lifecycle::gc::Lifecycle>,
    ) -> Result<()> {
        let i = ingest::Ingests::open(dir, self.clock.clone(), life)?;
        let _ = self.ingests.set(i);
        Ok(())
    }

    /// containerd's ingests; `Unavailable` before `open_ingests`.
    pub fn ingests(&self) -> Result<&ingest::Ingests> {
        self.ingests.get().ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::Unavailable,
                "content ingests are not open yet",
            )
        })
    }

    /// Removes ingests idle for longer than `idle_ms` (blocking: it reads their directory).
    pub fn expire_ingests(&self, idle_ms: i64) -> usize {
        self.ingests.get().map_or(0, |i| i.expire(idle_ms))
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
        let acked = Arc::new(AtomicU64::new(0));
        let session = Session {
            writer: None,
            started: now,
            touched: now,
            closed: false,
            acked: acked.clone(),
        };
        tracing::debug!(upload = %id, repo = %repo, "upload session started");
        let entry = Entry {
            repo,
            session: Arc::new(tokio::sync::Mutex::new(session)),
            acked,
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

    /// Marks a session used now, with its current offset answered to the client.
    pub fn touch(&self, s: &mut Session) {
        s.touched = self.clock.now_ms();
        s.acked.store(s.offset(), Ordering::Relaxed);
    }

    /// The offset of session `id` of `repo` as last answered, without waiting for a request in
    /// flight on it (a status check must not queue behind a PATCH that may be stalled).
    pub fn offset(&self, repo: &RepoName, id: &str) -> Result<u64> {
        match self.map().get(id) {
            Some(e) if e.repo == *repo => Ok(e.acked.load(Ordering::Relaxed)),
            _ => Err(unknown(id)),
        }
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
/// Received bytes queued while a write step runs; past this the body is not read until the step
/// ends (the client's sends then wait in its socket, not in hoard's memory).
const QUEUE_AHEAD: usize = 1 << 20;

type Step = tokio::task::JoinHandle<(Box<dyn BlobWriter>, Result<()>)>;

/// Streams a request body into `writer`. The network side stays async: frames are received
/// here, and the disk work (hashing, writing) runs in bounded steps on the blocking pool, one at
/// a time, each taking what arrived while the previous one ran. A stalled client therefore holds
/// no thread, and a body silent for `idle` is cut off. Returns the writer back with the outcome:
/// on error (client cut off or stalled, disk full) the caller decides whether to drop the upload.
pub async fn pump<B>(
    writer: Box<dyn BlobWriter>,
    mut body: B,
    idle: std::time::Duration,
) -> (Box<dyn BlobWriter>, Result<()>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let cut_off = |e: &dyn std::fmt::Display| Error::conflict(format!("upload interrupted: {e}"));
    let stalled = || {
        Error::conflict(format!(
            "upload body stalled: nothing arrived for {} s (body_timeout)",
            idle.as_secs_f64()
        ))
    };
    // Re-armed lazily: each frame only records when it came, and the deadline, when it fires,
    // moves to `idle` after the last frame unless the body really went quiet.
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    let mut last = tokio::time::Instant::now();
    // Small bodies: gather, then write once.
    let mut head: Vec<Bytes> = Vec::new();
    let mut head_len = 0usize;
    let mut ended = false;
    while head_len < SMALL_BODY {
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        head_len += data.len();
                        head.push(data);
                    }
                    last = tokio::time::Instant::now();
                }
                Some(Err(e)) => return (writer, Err(cut_off(&e))),
                None => {
                    ended = true;
                    break;
                }
            },
            () = &mut deadline => {
                if last + idle > tokio::time::Instant::now() {
                    deadline.as_mut().reset(last + idle);
                } else {
                    return (writer, Err(stalled()));
                }
            }
        }
    }
    if ended {
        return write_step(writer, head).await;
    }
    // Large bodies: frames go on as they come until the writer's I/O thread takes over; past
    // that each is copied into a pooled, block-aligned buffer (see `store::chunk`) and let go.
    let mut fwd = Forward {
        aligned_from: writer.aligned_from(),
        offset: writer.written(),
        buf: None,
        queue: Vec::new(),
        queued: 0,
    };
    for chunk in head {
        fwd.push(chunk);
    }
    let mut state = Disk::Idle(writer);
    let mut recv: Result<()> = Ok(());
    loop {
        state = match state {
            Disk::Idle(w) if fwd.queued > 0 => {
                let batch = std::mem::take(&mut fwd.queue);
                fwd.queued = 0;
                Disk::Busy(tokio::task::spawn_blocking(move || write_all(w, batch)))
            }
            s => s,
        };
        if ended || recv.is_err() || fwd.queued >= QUEUE_AHEAD {
            // Finishing, failed, or far enough ahead: wait for the disk. An idle writer here has
            // nothing queued (it would be busy otherwise), so the body is done or has failed.
            match state {
                Disk::Busy(h) => {
                    let (w, res) = join(h).await;
                    if res.is_err() {
                        return (w, res);
                    }
                    state = Disk::Idle(w);
                    // The body was not read while the disk caught up: that wait is not silence.
                    last = tokio::time::Instant::now();
                    continue;
                }
                Disk::Idle(w) => return (w, recv),
            }
        }
        tokio::select! {
            biased;
            done = async {
                match &mut state {
                    Disk::Busy(h) => join(h).await,
                    Disk::Idle(_) => std::future::pending().await,
                }
            } => {
                let (w, res) = done;
                if res.is_err() {
                    return (w, res);
                }
                state = Disk::Idle(w);
            }
            frame = body.frame() => {
                match frame {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            fwd.push(data);
                        }
                    }
                    Some(Err(e)) => recv = Err(cut_off(&e)),
                    None => {
                        fwd.finish();
                        ended = true;
                    }
                }
                last = tokio::time::Instant::now();
            }
            () = &mut deadline => {
                if last + idle > tokio::time::Instant::now() {
                    deadline.as_mut().reset(last + idle);
                } else {
                    recv = Err(stalled());
                }
            }
        }
    }
}

/// The writer of a streamed upload: waiting for bytes, or in a write step on the blocking pool.
enum Disk {
    Idle(Box<dyn BlobWriter>),
    Busy(Step),
}

fn write_all(mut w: Box<dyn BlobWriter>, batch: Vec<Bytes>) -> (Box<dyn BlobWriter>, Result<()>) {
    let mut res = Ok(());
    for chunk in batch {
        res = w.write_owned(chunk);
        if res.is_err() {
            break;
        }
    }
    (w, res)
}

async fn write_step(
    w: Box<dyn BlobWriter>,
    batch: Vec<Bytes>,
) -> (Box<dyn BlobWriter>, Result<()>) {
    join(tokio::task::spawn_blocking(move || write_all(w, batch))).await
}

async fn join<T>(h: impl std::future::Future<Output = Result<T, tokio::task::JoinError>>) -> T {
    match h.await {
        Ok(v) => v,
        Err(e) => panic_to_writer(e),
    }
}

/// The network side of a streamed upload: queues received bytes for the next write step.
struct Forward {
    aligned_from: Option<u64>,
    /// Upload offset of the next byte received.
    offset: u64,
    /// The aligned buffer being filled, once past `aligned_from`.
    buf: Option<ChunkBuf>,
    queue: Vec<Bytes>,
    queued: usize,
}

impl Forward {
    fn push(&mut self, mut data: Bytes) {
        let before = match self.aligned_from {
            Some(at) => at.saturating_sub(self.offset).min(data.len() as u64) as usize,
            None => data.len(),
        };
        self.offset += data.len() as u64;
        if before > 0 {
            let head = data.split_to(before);
            self.queued += head.len();
            self.queue.push(head);
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            let buf = self.buf.get_or_insert_with(ChunkBuf::new);
            let n = buf.fill(rest);
            rest = &rest[n..];
            if buf.is_full() {
                if let Some(full) = self.buf.take() {
                    let b = full.into_bytes();
                    self.queued += b.len();
                    self.queue.push(b);
                }
            }
        }
    }

    /// Queues what is buffered at the end of the body.
    fn finish(&mut self) {
        if let Some(last) = self.buf.take().filter(|b| !b.is_empty()) {
            let b = last.into_bytes();
            self.queued += b.len();
            self.queue.push(b);
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
