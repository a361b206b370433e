//! HTTP plumbing shared by the front ends: the response body type, streaming a blob from the
//! blocking pool, and the accept loop (TLS-probe answer, keep-alive, graceful shutdown).

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::registry::TransferPermit;
use crate::store::BlobRead;

pub type Body = BoxBody<Bytes, io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|n: Infallible| match n {})
        .boxed()
}

/// `Authorization: Bearer <token>` for the clients' `--token`, marked sensitive (kept out of
/// debug output).
pub fn bearer(token: Option<&str>) -> Option<http::HeaderValue> {
    let t = token.map(str::trim).filter(|t| !t.is_empty())?;
    let mut v = http::HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

pub fn empty() -> Body {
    Empty::new().map_err(|n: Infallible| match n {}).boxed()
}

/// Bodies this small are read in one blocking call and sent whole.
const SMALL_READ: u64 = 256 << 10;
/// Larger bodies stream in chunks of this size with one read ahead (and hyper queues up to two
/// before it waits for the socket): a pull holds at most about 768 KiB however large the blob
/// and however slow the client.
const READ_CHUNK: usize = 256 << 10;
/// Read buffers kept for reuse once hyper has sent them (8 MiB at most).
const POOLED_READS: usize = 32;

static READ_POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A read buffer that returns to `READ_POOL` when the last `Bytes` pointing into it is gone,
/// so steady streaming neither allocates nor zero-fills a buffer per chunk.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() == READ_CHUNK {
            let mut pool = READ_POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOLED_READS {
                pool.push(v);
            }
        }
    }
}

fn read_buffer(len: usize) -> Vec<u8> {
    let reused = READ_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut v = reused.unwrap_or_else(|| Vec::with_capacity(READ_CHUNK));
    // Only bytes never used before are zeroed.
    v.resize(len, 0);
    v
}

/// Reads the next chunk (at most `left` bytes) on the blocking pool.
fn read_step(mut r: Box<dyn BlobRead>, left: u64) -> ReadStep {
    let want = left.min(READ_CHUNK as u64) as usize;
    tokio::task::spawn_blocking(move || {
        let mut buf = read_buffer(want);
        let res = r
            .read_exact(&mut buf)
            .map(|()| Bytes::from_owner(Pooled(buf)));
        (r, res)
    })
}

/// One chunk being read on the blocking pool; the reader comes back with it.
type ReadStep = tokio::task::JoinHandle<(Box<dyn BlobRead>, io::Result<Bytes>)>;

/// A blob as a response body. The network side pulls: each chunk is read in one step on the
/// blocking pool, the next one starting when hyper takes the previous, and hyper takes chunks
/// only as the socket drains. A client that stops reading therefore holds a few buffers and no
/// thread; the transfer permit goes with the body.
struct BlobBody {
    reader: Option<Box<dyn BlobRead>>,
    /// A read in progress on the blocking pool.
    reading: Option<ReadStep>,
    /// Read before the response started (small blobs: all of it).
    ready: Option<Bytes>,
    /// Bytes not yet handed to hyper.
    remaining: u64,
    _permit: Option<TransferPermit>,
}

impl http_body::Body for BlobBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(b) = this.ready.take() {
            this.remaining = this.remaining.saturating_sub(b.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        if this.reading.is_none() {
            let Some(r) = this.reader.take() else {
                return Poll::Ready(Some(Err(io::Error::other("blob reader lost"))));
            };
            this.reading = Some(read_step(r, this.remaining));
        }
        let Some(reading) = this.reading.as_mut() else {
            return Poll::Pending;
        };
        let done = std::task::ready!(Pin::new(reading).poll(cx));
        this.reading = None;
        match done {
            Ok((r, Ok(b))) => {
                this.remaining = this.remaining.saturating_sub(b.len() as u64);
                // One chunk read ahead while this one is sent, so the disk and the network
                // overlap; a client that stops reading holds it and nothing more.
                if this.remaining > 0 {
                    this.reading = Some(read_step(r, this.remaining));
                } else {
                    this.reader = Some(r);
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Ok((_, Err(e))) => {
                this.remaining = 0;
                Poll::Ready(Some(Err(e)))
            }
            Err(e) => {
                this.remaining = 0;
                Poll::Ready(Some(Err(io::Error::other(format!(
                    "blob read failed: {e}"
                )))))
            }
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.ready.is_none()
    }
}

/// A blob whose store streams it (S3) as a response body: the store's chunks are passed on as
/// they arrive, no copy and no blocking thread; the store's fetch waits while hyper has not
/// taken them (a bounded channel), so a stalled client holds a few chunks.
struct ChunkBody {
    chunks: crate::store::Chunks,
    remaining: u64,
    _permit: Option<TransferPermit>,
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.chunks.poll_recv(cx)) {
            Some(Ok(mut b)) => {
                if b.len() as u64 > self.remaining {
                    b.truncate(self.remaining as usize);
                }
                self.remaining -= b.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Some(Err(e)) => {
                self.remaining = 0;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                let left = self.remaining;
                self.remaining = 0;
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the store ended the blob {left} bytes short"),
                ))))
            }
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
}

/// Streams `len` bytes from `r` (already positioned) as a response body, holding `permit`
/// until the body is sent or dropped.
pub async fn stream_blob(
    mut r: Box<dyn BlobRead>,
    len: u64,
    permit: Option<TransferPermit>,
) -> io::Result<Body> {
    if len > SMALL_READ {
        if let Some(chunks) = r.chunks() {
            return Ok(BoxBody::new(ChunkBody {
                chunks,
                remaining: len,
                _permit: permit,
            }));
        }
    }
    let mut body = BlobBody {
        reader: None,
        reading: None,
        ready: None,
        remaining: len,
        _permit: permit,
    };
    if len <= SMALL_READ {
        let buf = crate::registry::blocking(move || {
            let mut buf = Vec::with_capacity(len as usize);
            r.take(len).read_to_end(&mut buf)?;
            Ok::<_, io::Error>(buf)
        })
        .await?;
        if (buf.len() as u64) < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob shorter than its index entry",
            ));
        }
        body.ready = Some(Bytes::from(buf));
    } else {
        body.reader = Some(r);
    }
    Ok(BoxBody::new(body))
}

/// A plain-text error answer for the non-OCI front ends (the module proxy, the build cache,
/// snapshots): the message, and a status from the error's kind. `unavailable` is the status
/// for `Unavailable` (503 when hoard's own store cannot be reached, 502 when an upstream it
/// fetches from failed).
pub fn error_text(
    e: &crate::error::Error,
    head: bool,
    unavailable: http::StatusCode,
) -> hyper::Response<Body> {
    use crate::error::ErrorKind;
    use http::StatusCode;
    let status = match e.kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::InvalidArgument(_) | ErrorKind::DigestMismatch | ErrorKind::SizeMismatch => {
            StatusCode::BAD_REQUEST
        }
        ErrorKind::Conflict | ErrorKind::InUse => StatusCode::CONFLICT,
        ErrorKind::Exhausted => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Unavailable => unavailable,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut r = hyper::Response::new(if head {
        empty()
    } else {
        full(format!("{}\n", e.message))
    });
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A body of unknown length fed through a channel (chunked transfer): a producer on a blocking
/// thread sends with `blocking_send`; an error cuts the response off.
pub fn channel_body(rx: crate::store::Chunks) -> Body {
    BoxBody::new(ChannelBody { rx })
}

struct ChannelBody {
    rx: crate::store::Chunks,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Ok(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => Poll::Ready(None),
        }
    }
}

/// Connection limits the accept loop applies.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// A client that takes none of a response for this long is disconnected.
    pub send_timeout: Duration,
    /// A connection that sends no complete request head for this long is closed.
    pub header_timeout: Duration,
    /// One info line per request once its response is sent (or cut off).
    pub access_log: bool,
}

/// The access log line of one request, written when its response body is done or dropped, so
/// it has the bytes really sent and the whole duration. Never the query string (it may carry
/// tokens once auth lands) and never a body.
struct Logged {
    inner: Body,
    method: http::Method,
    path: String,
    status: u16,
    peer: SocketAddr,
    bytes_in: Option<u64>,
    bytes_out: u64,
    started: std::time::Instant,
    finished: bool,
    errored: bool,
    /// An access log line (always counted in the metrics).
    log: bool,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &r {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.bytes_out += d.len() as u64;
                }
            }
            Some(Err(_)) => self.errored = true,
            None => self.finished = true,
        }
        Poll::Ready(r)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        crate::metrics::request(
            &self.method,
            &self.path,
            self.status,
            self.bytes_in.unwrap_or(0),
            self.bytes_out,
            self.started.elapsed(),
        );
        if !self.log {
            return;
        }
        let complete =
            !self.errored && (self.finished || http_body::Body::is_end_stream(&self.inner));
        tracing::info!(
            target: "hoard::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            ms = self.started.elapsed().as_millis() as u64,
            peer = %self.peer,
            complete,
            "request"
        );
    }
}

/// A connection whose writes time out: while the socket will take nothing (the client reads
/// nothing), a deadline runs; any progress clears it. Reads pass through (request bodies have
/// their own idle timeout where they are consumed).
struct SendDeadline {
    io: TcpStream,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The timer runs (it is re-armed lazily: progress only records when it happened, and a
    /// timer that fires after progress moves its deadline instead of cutting the client).
    armed: bool,
    progress: tokio::time::Instant,
    peer: SocketAddr,
}

impl SendDeadline {
    fn new(io: TcpStream, limit: Duration, peer: SocketAddr) -> SendDeadline {
        SendDeadline {
            io,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            armed: false,
            progress: tokio::time::Instant::now(),
            peer,
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.progress = tokio::time::Instant::now();
            return r;
        }
        if !self.armed {
            self.armed = true;
            self.progress = tokio::time::Instant::now();
            let at = self.progress + self.limit;
            self.timer.as_mut().reset(at);
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.progress + self.limit;
            if due > tokio::time::Instant::now() {
                // Progress since the timer was set: wait from the last of it.
                self.timer.as_mut().reset(due);
                continue;
            }
            tracing::info!(peer = %self.peer, timeout = ?self.limit,
                "client stopped reading; closing its connection");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client read nothing for send_timeout",
            )));
        }
    }
}

impl tokio::io::AsyncRead for SendDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SendDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.progress(r, cx)
    }
}

pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// What a buildkitd configured with `http = true` sends first: a TLS ClientHello. It falls back
/// to plain HTTP only if the answer starts with `HTTP/`; a closed connection fails the build.
const TLS_PROBE_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: 57\r\n\r\nhoard serves plain HTTP here; this was a TLS handshake.\r\n";

/// Accepts connections until `shutdown` resolves, then stops accepting and gives in-flight
/// requests up to `grace` to finish.
/// Marks a request that came over TLS (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Secure;

pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: ConnLimits,
    tls: Option<Arc<crate::tls::Tls>>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            if tls.is_none() && is_tls_probe(&stream, limits.header_timeout).await {
                answer_tls_probe(stream).await;
                return;
            }
            let secure = tls.is_some();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let h = handler.clone();
                if secure {
                    req.extensions_mut().insert(Secure);
                }
                async move {
                    let started = std::time::Instant::now();
                    let method = req.method().clone();
                    let path = req.uri().path().to_owned();
                    let bytes_in = req
                        .headers()
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse().ok());
                    let mut line = Logged {
                        inner: empty(),
                        method,
                        path,
                        // What nginx logs for a client that went away before the answer: the
                        // line is written if this future is dropped while the handler runs.
                        status: 499,
                        peer,
                        bytes_in,
                        bytes_out: 0,
                        started,
                        finished: false,
                        errored: true,
                        log: limits.access_log,
                    };
                    let resp = h(req).await;
                    line.status = resp.status().as_u16();
                    line.errored = false;
                    Ok::<_, Infallible>(resp.map(|inner| {
                        line.inner = inner;
                        BoxBody::new(line)
                    }))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let io = SendDeadline::new(stream, limits.send_timeout, peer);
            let result = match tls {
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), service))
                        .await
                }
                Some(tls) => {
                    let accepted =
                        tokio::time::timeout(limits.header_timeout, tls.acceptor().accept(io))
                            .await;
                    let io = match accepted {
                        Ok(Ok(io)) => io,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), service))
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("stopped accepting; waiting for in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish in time; stopping anyway"
        );
    }
}

async fn is_tls_probe(stream: &TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut b)).await {
        // 0x16 = TLS handshake record; no HTTP method starts with it.
        Ok(Ok(1)) => b[0] == 0x16,
        _ => false,
    }
}

async fn answer_tls_probe(mut stream: TcpStream) {
    let _ = stream.write_all(TLS_PROBE_ANSWER).await;
    let _ = stream.shutdown().await;
    // Drain briefly so the client reads our answer instead of a reset.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        use tokio::io::AsyncReadExt;
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
