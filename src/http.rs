//! HTTP plumbing shared by the front ends: the response body type, streaming a blob from the
//! blocking pool, and the accept loop (TLS-probe answer, keep-alive, graceful shutdown).

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Read};
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

use crate::store::BlobRead;

pub type Body = BoxBody<Bytes, io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|n: Infallible| match n {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|n: Infallible| match n {}).boxed()
}

/// A body fed by a channel: the blocking reader sends chunks, hyper polls them.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    remaining: u64,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
}

/// Bodies this small are read in one blocking call and sent whole.
const SMALL_READ: u64 = 256 << 10;
/// Larger bodies stream in chunks of this size, at most `QUEUED_READS` read ahead: a pull
/// holds well under 2 MiB however large the blob.
const READ_CHUNK: usize = 256 << 10;
const QUEUED_READS: usize = 4;
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

/// Streams `len` bytes from `r` (already positioned) as a response body.
pub async fn stream_blob(mut r: Box<dyn BlobRead>, len: u64) -> io::Result<Body> {
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
        return Ok(full(buf));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUED_READS);
    tokio::task::spawn_blocking(move || {
        let mut left = len;
        while left > 0 {
            let want = left.min(READ_CHUNK as u64) as usize;
            let mut buf = read_buffer(want);
            let res = r
                .read_exact(&mut buf)
                .map(|()| Bytes::from_owner(Pooled(buf)));
            let failed = res.is_err();
            if tx.blocking_send(res).is_err() || failed {
                // The client went away, or the read failed and the error was passed on.
                return;
            }
            left -= want as u64;
        }
    });
    Ok(BoxBody::new(ChannelBody { rx, remaining: len }))
}

pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// What a buildkitd configured with `http = true` sends first: a TLS ClientHello. It falls back
/// to plain HTTP only if the answer starts with `HTTP/`; a closed connection fails the build.
const TLS_PROBE_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: 57\r\n\r\nhoard serves plain HTTP here; this was a TLS handshake.\r\n";

/// Accepts connections until `shutdown` resolves, then stops accepting and gives in-flight
/// requests up to `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
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
        tokio::spawn(async move {
            if is_tls_probe(&stream).await {
                answer_tls_probe(stream).await;
                return;
            }
            let service = hyper::service::service_fn(move |req| {
                let h = handler.clone();
                async move { Ok::<_, Infallible>(h(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(60))
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
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

async fn is_tls_probe(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(60), stream.peek(&mut b)).await {
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
