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
    pub repo: RepoName,
    /// Created with the first byte, so a session that never receives data costs no file.
    pub writer: Option<Box<dyn BlobWriter>>,
    pub started: Millis,
    pub touched: Millis,
}

impl Session {
    pub fn offset(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.written())
    }
}

pub type SessionRef = Arc<tokio::sync::Mutex<Session>>;

pub struct Uploads {
    sessions: Mutex<HashMap<String, SessionRef>>,
    clock: SharedClock,
}

impl Uploads {
    pub fn new(clock: SharedClock) -> Uploads {
        Uploads {
            sessions: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionRef>> {
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
            repo,
            writer: None,
            started: now,
            touched: now,
        };
        self.map()
            .insert(id.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        id
    }

    /// The session `id`, if it exists and belongs to `repo`.
    pub fn get(&self, repo: &RepoName, id: &str) -> Result<SessionRef> {
        let s = self.map().get(id).cloned();
        match s {
            Some(s) => {
                let ok = s.try_lock().map(|g| g.repo == *repo).unwrap_or(true);
                if ok {
                    Ok(s)
                } else {
                    Err(Error::not_found(format!(
                        "upload {id} is not in repository {repo}"
                    )))
                }
            }
            None => Err(Error::not_found(format!(
                "upload {id} is unknown: it finished, was cancelled, or expired"
            ))),
        }
    }

    /// Forgets a session; dropping its writer removes any partial data.
    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    pub fn touch(&self, s: &mut Session) {
        s.touched = self.clock.now_ms();
    }

    /// Drops sessions idle for longer than `idle_ms` (by this daemon's clock; a clock that steps
    /// back makes sessions look younger, never expires them early). Returns how many went.
    pub fn expire(&self, idle_ms: i64) -> usize {
        let now = self.clock.now_ms();
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, s| match s.try_lock() {
            Ok(g) => now.saturating_sub(g.touched) <= idle_ms,
            // In use right now: not idle.
            Err(_) => true,
        });
        before - map.len()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
