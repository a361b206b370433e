//! The S3 blob store (AWS S3 or any S3-compatible service). Owns this layout under the bucket's
//! key prefix:
//!
//! ```text
//! blobs/sha256/ab/ab12…ef     one object per blob, named by its digest (as on disk)
//! uploads/<random>            multipart uploads in progress, copied to blobs/ when verified
//! quarantine/sha256-ab12…ef   blobs found corrupt, kept for inspection, never served
//! probe/<random>              the start-up check of conditional writes (removed again)
//! ```
//! The SDK is async and the store traits are blocking (they run on the blocking pool, where the
//! disk store does its I/O): every S3 call runs as a task on the runtime, and the blocking side
//! only waits on a channel — bytes stream through bounded channels both ways, so neither side
//! holds more than a few parts. A blob up to one part goes up in one `PutObject` straight to its
//! key once its digest is checked; a larger one streams as a multipart upload with parallel
//! parts while it is hashed, to a temporary key that is copied to its digest's key after the
//! digest matched. Either way the object is in S3 before the commit returns.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};

use crate::config::S3Config;
use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, ErrorKind, Result};

use super::{BlobRead, BlobStore, BlobWriter, Expect};

/// S3 requests sent (every attempt), by operation, and answers that were 5xx: for the status
/// page, the tests and the benchmark.
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    by_operation: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Requests by operation and by what they touch ("GetObject tag", "ListObjectsV2
    /// announcement"): what a client's request costs, apart from the background's.
    by_kind: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counters {
    /// Requests per operation name (`PutObject`, `GetObject`, …).
    pub fn by_kind(&self) -> Vec<(String, u64)> {
        let m = self.by_kind.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    pub fn by_operation(&self) -> Vec<(String, u64)> {
        let m = self.by_operation.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// The S3 service's clock as seen in its `Date` headers: offset (service minus this machine's)
/// in ms. As a `Clock` it reads the service's time: this machine's clock plus the offset.
pub struct ServiceClock {
    /// This machine's wall clock (with the test hook's skew).
    local: crate::clock::SharedClock,
    offset_ms: AtomicI64,
    seen: AtomicU64,
}

impl crate::clock::Clock for ServiceClock {
    fn now_ms(&self) -> crate::clock::Millis {
        self.local.now_ms().saturating_add(self.offset_ms())
    }
}

impl ServiceClock {
    pub fn new(local: crate::clock::SharedClock) -> ServiceClock {
        ServiceClock {
            local,
            offset_ms: AtomicI64::new(0),
            seen: AtomicU64::new(0),
        }
    }

    /// Service time minus local time; 0 until a response was seen.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }
    pub fn samples(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
    fn observe(&self, date: &str) {
        let Some(service) = parse_http_date(date) else {
            return;
        };
        let local = self.local.now_ms();
        // A `Date` has one-second resolution and is stamped while the answer is made: it lags
        // the true time by up to a second, so the offset is kept to whole seconds.
        let off = service + 500 - local;
        // Readings scatter by up to a second (the header's resolution, network time): only a
        // real change moves the offset, so cache time does not jitter with every answer.
        let cur = self.offset_ms.load(Ordering::Relaxed);
        if self.seen.fetch_add(1, Ordering::Relaxed) == 0 || (off - cur).abs() > 1500 {
            self.offset_ms.store(off, Ordering::Relaxed);
        }
    }
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to Unix milliseconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut it = s.split_whitespace();
    let _weekday = it.next()?;
    let day: i64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + m) * 60_000 + sec * 1000)
}

/// Counts requests and reads the service's `Date` off every answer.
#[derive(Debug)]
struct Watch {
    counters: Arc<Counters>,
    clock: Arc<ServiceClock>,
    /// `/<bucket>/<prefix>` or `/<prefix>` (path-style or not): stripped before classifying.
    roots: [String; 2],
}

/// What a request's key (or a listing's prefix) is, in the layouts of store/s3.rs and
/// lifecycle/shared.rs.
fn kind_of(rest: &str) -> &'static str {
    let rest = rest.trim_start_matches('/');
    if rest.starts_with("blobs/") {
        "blob"
    } else if rest.starts_with("uploads/") {
        "upload"
    } else if rest.starts_with("repos/") {
        if rest.contains("/_tags/") {
            "tag"
        } else if rest.contains("/_manifests/") {
            "record"
        } else if rest.contains("/_links/") {
            "link"
        } else {
            "repository"
        }
    } else if rest.starts_with("catalog/") {
        "catalog"
    } else if rest.starts_with("claims/") {
        "claim"
    } else if rest.starts_with("doomed/") {
        "announcement"
    } else if rest.starts_with("access") {
        "access"
    } else if rest.starts_with("replicas/") {
        "heartbeat"
    } else if rest.starts_with("lease/") {
        "lease"
    } else if rest.starts_with("probe/") {
        "probe"
    } else if rest.starts_with("quarantine/") {
        "quarantine"
    } else {
        "other"
    }
}

impl Watch {
    fn kind(&self, uri: &str) -> &'static str {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let path = path
            .find("://")
            .and_then(|i| path[i + 3..].find('/').map(|j| &path[i + 3 + j..]))
            .unwrap_or(path);
        let listed = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("prefix="))
            .map(|p| p.replace("%2F", "/"));
        let key = match &listed {
            Some(p) => format!("/{}", p),
            None => path.to_owned(),
        };
        let rest = if listed.is_some() {
            key.strip_prefix(&self.roots[1]).unwrap_or(&key).to_owned()
        } else {
            key.strip_prefix(&self.roots[0])
                .or_else(|| key.strip_prefix(&self.roots[1]))
                .unwrap_or(&key)
                .to_owned()
        };
        kind_of(&rest)
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counters")
    }
}
impl std::fmt::Debug for ServiceClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceClock")
    }
}

impl aws_sdk_s3::config::Intercept for Watch {
    fn name(&self) -> &'static str {
        "hoard-watch"
    }
    fn read_before_transmit(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_s3::error::BoxError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let op = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map_or("unknown", |m| m.name());
        let mut m = self
            .counters
            .by_operation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(op.to_owned()).or_insert(0) += 1;
        drop(m);
        let kind = self.kind(ctx.request().uri());
        let mut k = self
            .counters
            .by_kind
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *k.entry(format!("{op} {kind}")).or_insert(0) += 1;
        Ok(())
    }
    fn read_after_transmit(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_s3::error::BoxError> {
        let r = ctx.response();
        if let Some(date) = r.headers().get("date") {
            self.clock.observe(date);
        }
        if r.status().is_server_error() {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Signs a `PutObject` with a payload hash known beforehand (a blob's own sha256 digest, when
/// its bytes are the whole body), so the SDK does not hash the body a second time.
#[derive(Debug)]
struct PayloadHash(String);

impl aws_sdk_s3::config::Intercept for PayloadHash {
    fn name(&self) -> &'static str {
        "hoard-payload-hash"
    }
    fn modify_before_signing(
        &self,
        _ctx: &mut aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_s3::error::BoxError> {
        cfg.interceptor_state()
            .store_put(aws_runtime::auth::PayloadSigningOverride::Precomputed(
                self.0.clone(),
            ));
        Ok(())
    }
}

/// The runtime S3 requests run on: its own, so that they progress whatever the server's
/// worker threads are doing (a request handler waiting for a lock held across an S3 call must
/// not starve the call it waits for).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            // Allowed from async code too (a plain drop is not).
            rt.shutdown_background();
        }
    }
}

/// One bucket (and key prefix) and the client that reaches it.
pub struct Bucket {
    client: aws_sdk_s3::Client,
    pub name: String,
    prefix: String,
    rt: tokio::runtime::Handle,
    _runtime: OwnRuntime,
    part_size: usize,
    parallel: usize,
    /// "bucket hoard at http://…", for messages.
    pub describe: String,
    pub counters: Arc<Counters>,
    pub clock: Arc<ServiceClock>,
    /// Writes and deletes are allowed: the start-up probe passed (and, on a service without
    /// conditional writes run by one hoard alone, the writer lease is held).
    writable: std::sync::atomic::AtomicBool,
    lease_etag: Mutex<Option<String>>,
    /// The service honours `If-None-Match` / `If-Match` on writes (what the probe found); when
    /// it does not (a single-writer bucket), conditions are not sent.
    conditions: std::sync::atomic::AtomicBool,
    /// The service honours `If-Match` on `DeleteObject`; without it a conditional delete
    /// compares the ETag itself first (a narrow race remains, logged at start).
    delete_conditions: std::sync::atomic::AtomicBool,
}

/// What the start-up probe found.
#[derive(Clone, Debug)]
pub struct Probe {
    /// `If-None-Match: *` and `If-Match` on `PutObject` are honoured (a lost race is a 412).
    pub conditional_writes: bool,
    /// `If-Match` on `DeleteObject` is honoured.
    pub conditional_deletes: bool,
}

impl Bucket {
    /// Builds the client; touches the network only on the first request (so a start with S3
    /// down still serves, not ready).
    /// `local`: this machine's wall clock, which the service's `Date` headers are compared with.
    pub fn new(cfg: &S3Config, local: crate::clock::SharedClock) -> Result<Bucket> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("starting the S3 runtime: {e}")))?;
        let rt = runtime.handle().clone();
        let counters = Arc::new(Counters::default());
        let clock = Arc::new(ServiceClock::new(local));
        let sdk = {
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).region(
                aws_config::meta::region::RegionProviderChain::first_try(
                    cfg.region.clone().map(Region::new),
                )
                .or_default_provider()
                .or_else(Region::new("us-east-1")),
            );
            if let (Some(ak), Some(sk)) = (&cfg.access_key_id, &cfg.secret_access_key) {
                loader = loader.credentials_provider(Credentials::new(
                    ak.clone(),
                    sk.clone(),
                    None,
                    None,
                    "hoard configuration",
                ));
            }
            // Loading reads the environment and profile files only: no request is sent.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            rt.spawn(async move {
                let _ = tx.send(loader.load().await);
            });
            rx.recv()
                .map_err(|_| Error::internal("loading the AWS configuration was cancelled"))?
        };
        let retry = aws_sdk_s3::config::retry::RetryConfig::standard()
            .with_max_attempts(cfg.retries)
            .with_initial_backoff(Duration::from_millis(100))
            .with_max_backoff(Duration::from_secs(2));
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3).min(cfg.timeout.0))
            .operation_attempt_timeout(cfg.timeout.0)
            .build();
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(retry)
            .timeout_config(timeouts)
            .interceptor(Watch {
                counters: counters.clone(),
                clock: clock.clone(),
                roots: [
                    format!("/{}/{}", cfg.bucket, cfg.prefix),
                    format!("/{}", cfg.prefix),
                ],
            });
        if let Some(e) = &cfg.endpoint {
            b = b.endpoint_url(e.clone());
        }
        Ok(Bucket {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            name: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            rt,
            _runtime: OwnRuntime(Some(runtime)),
            part_size: cfg.part_size.0 as usize,
            parallel: cfg.parallel_parts,
            describe: cfg.describe(),
            counters,
            clock,
            writable: std::sync::atomic::AtomicBool::new(false),
            lease_etag: Mutex::new(None),
            conditions: std::sync::atomic::AtomicBool::new(true),
            delete_conditions: std::sync::atomic::AtomicBool::new(true),
        })
    }

    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn blob_key(&self, d: &Digest) -> String {
        let hex = d.hex();
        self.key(&format!(
            "blobs/{}/{}/{hex}",
            d.algorithm().name(),
            &hex[..2]
        ))
    }

    /// From a blocking thread: one `HeadBucket` bounded by `within`, which also measures the
    /// service's clock. `Err` when the bucket did not answer in time.
    pub fn check_within(self: &Arc<Self>, within: Duration) -> Result<()> {
        let b = self.clone();
        self.wait(async move {
            match tokio::time::timeout(within, b.check()).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("{}: no answer within {within:?}", b.describe),
                )),
            }
        })?
    }

    /// From a blocking thread: the start-up probe (the bucket, credentials, conditional
    /// writes) bounded by `within`.
    pub fn probe_within(self: &Arc<Self>, within: Duration) -> Result<Probe> {
        let b = self.clone();
        self.wait(async move {
            match tokio::time::timeout(within, b.probe()).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("{}: no answer within {within:?}", b.describe),
                )),
            }
        })?
    }

    /// True on a service without conditional writes run by one hoard alone.
    pub fn single_writer(&self) -> bool {
        !self.conditions.load(Ordering::Relaxed)
    }

    /// Starts `fut` on the S3 runtime without waiting for it.
    pub fn rt_spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.rt.spawn(fut);
    }

    /// `wait` for callers outside this module (blocking threads only).
    pub fn wait_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        self.wait(fut)
    }

    /// Runs `fut` on the S3 runtime, awaited from any other runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        self.rt
            .spawn(fut)
            .await
            .map_err(|_| Error::new(ErrorKind::Unavailable, "S3 request was cancelled"))
    }

    /// Runs `fut` on the S3 runtime and waits for it from this (blocking) thread.
    fn wait<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::new(ErrorKind::Unavailable, "S3 request was cancelled"))
    }

    /// Checks the bucket is there and reachable with these credentials, then whether it honours
    /// conditional writes. Errors name the bucket and endpoint.
    /// The bucket answers with these credentials (one `HeadBucket`). Errors name the bucket
    /// and the endpoint, and say what is wrong.
    pub async fn check(&self) -> Result<()> {
        match self.client.head_bucket().bucket(&self.name).send().await {
            Ok(_) => {}
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let why = match status {
                    Some(404) => "the bucket does not exist".to_owned(),
                    Some(403) | Some(401) => {
                        "access denied: check the credentials (access_key_id / \
                         secret_access_key, or the AWS credential chain)"
                            .to_owned()
                    }
                    Some(s) => format!("HEAD bucket answered {s}"),
                    None => format!("cannot reach the service: {}", detail(&e)),
                };
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("{}: {why}", self.describe),
                ));
            }
        }
        Ok(())
    }

    pub async fn probe(&self) -> Result<Probe> {
        self.check().await?;
        let key = self.key(&format!("probe/{}", random_name()));
        let put = |cond: Cond| self.put_with(&key, Bytes::from_static(b"probe"), cond, true, None);
        put(Cond::Create).await.map_err(|e| {
            Error::new(
                e.kind,
                format!("{}: writing a probe object: {}", self.describe, e.message),
            )
        })?;
        let second = put(Cond::Create).await;
        let wrong_etag = put(Cond::Match("\"00000000000000000000000000000000\"".into())).await;
        let wrong_delete = self
            .client
            .delete_object()
            .bucket(&self.name)
            .key(&key)
            .if_match("\"00000000000000000000000000000000\"")
            .send()
            .await
            .map(|_| String::new())
            .map_err(|e| s3_error(&key, e));
        let _ = self.delete_key(&key).await;
        let refused = |r: &Result<String>| matches!(r, Err(e) if e.kind == ErrorKind::Conflict);
        let p = Probe {
            conditional_writes: refused(&second) && refused(&wrong_etag),
            conditional_deletes: refused(&wrong_delete),
        };
        self.delete_conditions
            .store(p.conditional_deletes, Ordering::Relaxed);
        Ok(p)
    }

    /// Writes a small object. `Conflict` when the condition does not hold. On a service that
    /// ignores conditions (a single-writer bucket) none are sent.
    pub async fn put(&self, key: &str, body: Bytes, cond: Cond) -> Result<String> {
        let honour = self.conditions.load(Ordering::Relaxed);
        self.put_with(key, body, cond, honour, None).await
    }

    /// Writes a blob whose sha256 is `sha256_hex` (its digest): the signature takes the hash
    /// as it is instead of hashing the body again.
    pub async fn put_hashed(&self, key: &str, body: Bytes, sha256_hex: String) -> Result<String> {
        self.put_with(key, body, Cond::None, false, Some(sha256_hex))
            .await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        cond: Cond,
        honour: bool,
        sha256_hex: Option<String>,
    ) -> Result<String> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body));
        req = match cond {
            _ if !honour => req,
            Cond::None => req,
            Cond::Create => req.if_none_match("*"),
            Cond::Match(etag) => req.if_match(etag),
        };
        let out = match sha256_hex {
            Some(h) => req.customize().interceptor(PayloadHash(h)).send().await,
            None => req.send().await,
        }
        .map_err(|e| s3_error(key, e))?;
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    /// A small object's bytes and ETag; `NotFound` when absent.
    pub async fn get_small(&self, key: &str) -> Result<(Bytes, String)> {
        let out = self
            .client
            .get_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error(key, e))?;
        let etag = out.e_tag().unwrap_or_default().to_owned();
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| unavailable(key, e))?
            .into_bytes();
        Ok((body, etag))
    }

    /// What a plain client does with a large object: a multipart upload of `body` in
    /// `part_size` parts, `parallel_parts` in flight (benchmarks compare hoard with this).
    pub async fn put_multipart(self: &Arc<Self>, key: &str, body: Bytes) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
        let task = tokio::spawn(upload_parts(self.clone(), key.to_owned(), rx));
        let mut at = 0;
        while at < body.len() {
            let end = (at + self.part_size).min(body.len());
            if tx.send(Msg::Part(body.slice(at..end))).await.is_err() {
                break;
            }
            at = end;
        }
        let _ = tx.send(Msg::Finish).await;
        task.await
            .map_err(|e| Error::internal(format!("S3 upload task failed: {e}")))?
    }

    /// Streams an object's body and counts its bytes without keeping them.
    pub async fn get_streamed(&self, key: &str) -> Result<u64> {
        let mut out = self
            .client
            .get_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error(key, e))?;
        let mut n = 0u64;
        while let Some(chunk) = out.body.next().await {
            n += chunk.map_err(|e| unavailable(key, e))?.len() as u64;
        }
        Ok(n)
    }

    pub async fn delete_key(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error(key, e))?;
        Ok(())
    }

    /// Size of an object, `None` when absent.
    pub async fn head(&self, key: &str) -> Result<Option<u64>> {
        match self
            .client
            .head_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Ok(Some(o.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => match s3_error(key, e) {
                e if e.is_not_found() => Ok(None),
                e => Err(e),
            },
        }
    }

    /// An object's size and last-modified time (service ms); `None` when absent.
    pub async fn stat(&self, key: &str) -> Result<Option<(u64, i64)>> {
        match self
            .client
            .head_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Ok(Some((
                o.content_length().unwrap_or(0).max(0) as u64,
                o.last_modified().map_or(0, millis),
            ))),
            Err(e) => match s3_error(key, e) {
                e if e.is_not_found() => Ok(None),
                e => Err(e),
            },
        }
    }

    /// A small object's bytes, ETag and last-modified time (service ms); `None` when absent.
    pub async fn fetch(&self, key: &str) -> Result<Option<Fetched>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) => {
                return match s3_error(key, e) {
                    e if e.is_not_found() => Ok(None),
                    e => Err(e),
                }
            }
        };
        let etag = out.e_tag().unwrap_or_default().to_owned();
        let modified = out.last_modified().map_or(0, millis);
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| unavailable(key, e))?
            .into_bytes();
        Ok(Some(Fetched {
            body,
            etag,
            modified,
        }))
    }

    /// Every object under `under` (after the prefix), with ETag and last-modified time.
    pub async fn list_objects(&self, under: &str) -> Result<Vec<Listed>> {
        let full = self.key(under);
        let mut token = None;
        let mut out_all = Vec::new();
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.name)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| s3_error(&full, e))?;
            for o in out.contents() {
                if let Some(k) = o.key() {
                    out_all.push(Listed {
                        key: k.strip_prefix(&self.prefix).unwrap_or(k).to_owned(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        etag: o.e_tag().unwrap_or_default().to_owned(),
                        modified: o.last_modified().map_or(0, millis),
                    });
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(out_all),
            }
        }
    }

    /// Deletes `key` if its ETag is still `etag` (`Conflict` when it changed); a key already
    /// gone is not an error. Without conditions (a single-writer bucket) it simply deletes.
    pub async fn delete_if(&self, key: &str, etag: &str) -> Result<()> {
        if etag.is_empty() {
            return Err(Error::conflict(format!("{key}: no ETag to delete it by")));
        }
        let mut req = self.client.delete_object().bucket(&self.name).key(key);
        if !self.conditions.load(Ordering::Relaxed) {
            // A single-writer bucket: no other writer to race.
        } else if self.delete_conditions.load(Ordering::Relaxed) {
            req = req.if_match(etag);
        } else {
            // The service ignores the condition: compare first (a write in between this and
            // the delete is lost, which a service with conditional deletes rules out).
            match self.fetch(key).await? {
                None => return Ok(()),
                Some(f) if f.etag != etag => {
                    return Err(Error::conflict(format!("{key} changed since it was read")))
                }
                Some(_) => {}
            }
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e) => match s3_error(key, e) {
                e if e.is_not_found() => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Deletes many keys, a thousand per request.
    pub async fn delete_keys(&self, keys: &[String]) -> Result<()> {
        for chunk in keys.chunks(1000) {
            let objects: Vec<aws_sdk_s3::types::ObjectIdentifier> = chunk
                .iter()
                .filter_map(|k| {
                    aws_sdk_s3::types::ObjectIdentifier::builder()
                        .key(k)
                        .build()
                        .ok()
                })
                .collect();
            let delete = aws_sdk_s3::types::Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| Error::internal(format!("building a delete request: {e}")))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.name)
                .delete(delete)
                .send()
                .await
                .map_err(|e| s3_error(&chunk[0], e))?;
            if let Some(e) = out.errors().first() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "S3 could not delete {}: {}",
                        e.key().unwrap_or("?"),
                        e.message().unwrap_or("error")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether conditional writes are sent (see `set_conditions`).
    pub fn conditions(&self) -> bool {
        self.conditions.load(Ordering::Relaxed)
    }

    /// Stops sending conditions (a service that ignores them, run by one hoard alone).
    pub fn set_conditions(&self, on: bool) {
        self.conditions.store(on, Ordering::Relaxed);
    }

    /// Allows (or stops) writes: the probe passed.
    pub fn set_writable(&self, on: bool) {
        self.writable.store(on, Ordering::SeqCst);
    }

    /// Keys (after the prefix) and sizes under `under`, in key order.
    pub async fn list(&self, under: &str, f: &mut (dyn FnMut(&str, u64) + Send)) -> Result<()> {
        self.list_dated(under, &mut |k, size, _| f(k, size)).await
    }

    /// `list` with each object's last-modified time (service seconds since the epoch).
    async fn list_dated(
        &self,
        under: &str,
        f: &mut (dyn FnMut(&str, u64, i64) + Send),
    ) -> Result<()> {
        let full = self.key(under);
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.name)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| s3_error(&full, e))?;
            for o in out.contents() {
                if let Some(k) = o.key() {
                    let rest = k.strip_prefix(&self.prefix).unwrap_or(k);
                    let modified = o.last_modified().map_or(0, |t| t.secs());
                    f(rest, o.size().unwrap_or(0).max(0) as u64, modified);
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(()),
            }
        }
    }

    /// Copies `from` to `to` inside the bucket (server side).
    async fn copy(&self, from: &str, to: &str, size: u64) -> Result<()> {
        const COPY_LIMIT: u64 = 5 << 30;
        let source = format!("{}/{}", self.name, from);
        if size <= COPY_LIMIT {
            self.client
                .copy_object()
                .bucket(&self.name)
                .key(to)
                .copy_source(source)
                .send()
                .await
                .map_err(|e| s3_error(to, e))?;
            return Ok(());
        }
        // Past CopyObject's limit: a multipart copy in part-sized ranges.
        let id = self.create_multipart(to).await?;
        let range = self.part_size.max(512 << 20) as u64;
        let mut parts = Vec::new();
        let mut start = 0u64;
        let mut n = 1;
        let result: Result<()> = async {
            while start < size {
                let end = (start + range).min(size) - 1;
                let out = self
                    .client
                    .upload_part_copy()
                    .bucket(&self.name)
                    .key(to)
                    .upload_id(&id)
                    .part_number(n)
                    .copy_source(&source)
                    .copy_source_range(format!("bytes={start}-{end}"))
                    .send()
                    .await
                    .map_err(|e| s3_error(to, e))?;
                let etag = out
                    .copy_part_result()
                    .and_then(|r| r.e_tag())
                    .unwrap_or_default();
                parts.push(CompletedPart::builder().part_number(n).e_tag(etag).build());
                n += 1;
                start = end + 1;
            }
            self.complete(to, &id, parts).await
        }
        .await;
        if result.is_err() {
            self.abort(to, &id).await;
        }
        result
    }

    async fn create_multipart(&self, key: &str) -> Result<String> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error(key, e))?;
        out.upload_id()
            .map(str::to_owned)
            .ok_or_else(|| Error::internal(format!("S3 gave no upload id for {key}")))
    }

    async fn complete(&self, key: &str, id: &str, mut parts: Vec<CompletedPart>) -> Result<()> {
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error(key, e))?;
        Ok(())
    }

    async fn abort(&self, key: &str, id: &str) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(id)
            .send()
            .await
        {
            tracing::warn!(key, error = %detail(&e), "aborting a multipart upload failed (a bucket lifecycle rule for incomplete uploads cleans it)");
        }
    }

    /// Removes what uploads a crashed run left: multipart uploads (under `uploads/`, and under
    /// `blobs/` for blobs named up front) and temporary objects under `uploads/` begun more
    /// than `older_than` ago by the S3 service's clock (younger ones may be another replica's,
    /// still streaming).
    pub async fn sweep_uploads(&self, older_than: Duration) -> Result<u64> {
        let now_s = crate::clock::Clock::now_ms(&*self.clock) / 1000;
        let cutoff = now_s - older_than.as_secs() as i64;
        let mut n = 0;
        for under in [self.key("uploads/"), self.key("blobs/")] {
            let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
            loop {
                let out = self
                    .client
                    .list_multipart_uploads()
                    .bucket(&self.name)
                    .prefix(&under)
                    .set_key_marker(key_marker.take())
                    .set_upload_id_marker(id_marker.take())
                    .send()
                    .await
                    .map_err(|e| s3_error(&under, e))?;
                for u in out.uploads() {
                    let old = u.initiated().is_some_and(|t| t.secs() < cutoff);
                    if let (Some(k), Some(id), true) = (u.key(), u.upload_id(), old) {
                        self.abort(k, id).await;
                        n += 1;
                    }
                }
                if out.is_truncated() != Some(true) {
                    break;
                }
                key_marker = out.next_key_marker().map(str::to_owned);
                id_marker = out.next_upload_id_marker().map(str::to_owned);
                if key_marker.is_none() {
                    break;
                }
            }
        }
        let mut old = Vec::new();
        self.list_dated("uploads/", &mut |k, _, modified| {
            if modified < cutoff {
                old.push(k.to_owned());
            }
        })
        .await?;
        for k in old {
            self.delete_key(&self.key(&k)).await?;
            n += 1;
        }
        Ok(n)
    }
}

/// The writer lease: one hoard at a time writes to a bucket (and prefix). This version keeps
/// its index of the bucket on local disk, so a second writer would not see the first one's
/// records (and its crash sweep would take the other's blobs for strays): a second hoard on
/// the same bucket waits, not ready, until the lease is free or has expired.
///
/// The lease is one small object, `lease/writer`, holding who has it and until when, in the S3
/// service's clock (`Date` headers), so no replica's own clock matters. It is created with
/// `If-None-Match: *`, renewed and released with `If-Match` on the ETag last written: a lost
/// race is a 412, never two holders.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    /// Service time (ms since the epoch) after which the lease is free.
    pub expires: i64,
}

/// How long a lease lasts unless renewed; renewed every `PROBE_EVERY` (10 s).
pub const LEASE_MS: i64 = 30_000;
/// Slack on top of an expiry before another hoard takes the lease: both read the same service
/// clock, so this covers only the `Date` header's resolution and network time.
pub const LEASE_SLACK_MS: i64 = 5_000;

/// What an attempt to take or keep the lease found.
#[derive(Debug)]
pub enum LeaseState {
    Held,
    /// Someone else holds it, until `expires` (service time).
    Busy {
        holder: String,
        expires: i64,
    },
}

impl Bucket {
    fn lease_key(&self) -> String {
        self.key("lease/writer")
    }

    /// Takes, renews or confirms the writer lease for `me`.
    pub async fn hold_lease(&self, me: &str) -> Result<LeaseState> {
        let key = self.lease_key();
        let state = self
            .hold_lease_at(&key, me, LEASE_MS, &self.lease_etag)
            .await?;
        self.writable
            .store(matches!(state, LeaseState::Held), Ordering::SeqCst);
        Ok(state)
    }

    /// Takes, renews or confirms the lease object at `key` for `me`, for `ms` of the service's
    /// time; `etag` keeps the ETag of the last record written (renewals and release check it).
    pub async fn hold_lease_at(
        &self,
        key: &str,
        me: &str,
        ms: i64,
        etag: &Mutex<Option<String>>,
    ) -> Result<LeaseState> {
        let now = crate::clock::Clock::now_ms(&*self.clock);
        let mine = LeaseRecord {
            holder: me.to_owned(),
            expires: now + ms,
        };
        let body = Bytes::from(serde_json::to_vec(&mine).unwrap_or_default());
        let cond = match self.get_small(key).await {
            Ok((bytes, tag)) => match serde_json::from_slice::<LeaseRecord>(&bytes) {
                Ok(cur) if cur.holder != me && now <= cur.expires + LEASE_SLACK_MS => {
                    return Ok(LeaseState::Busy {
                        holder: cur.holder,
                        expires: cur.expires,
                    })
                }
                // Ours (renewal), expired, or unreadable: replaced, if unchanged since read.
                _ => Cond::Match(tag),
            },
            Err(e) if e.is_not_found() => Cond::Create,
            Err(e) => return Err(e),
        };
        match self.put(key, body, cond).await {
            Ok(tag) => {
                *etag.lock().unwrap_or_else(|p| p.into_inner()) = Some(tag);
                Ok(LeaseState::Held)
            }
            // Another hoard got there first: read again next round.
            Err(e) if e.kind == ErrorKind::Conflict => Ok(LeaseState::Busy {
                holder: "another hoard (it just took the lease)".into(),
                expires: now + ms,
            }),
            Err(e) => Err(e),
        }
    }

    /// Gives up the lease at `key` if it is still the one last written (`etag`).
    pub async fn release_lease_at(&self, key: &str, etag: &Mutex<Option<String>>) {
        let tag = etag.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tag) = tag {
            if let Err(e) = self.delete_if(key, &tag).await {
                tracing::warn!(key, error = %e, "releasing a lease failed; it expires by itself");
            }
        }
    }

    /// From a blocking thread (start-up, offline tools): takes the lease once; `Err` names
    /// the holder when another hoard has it.
    pub fn lease_blocking(self: &Arc<Self>, me: &str) -> Result<String> {
        let b = self.clone();
        let who = me.to_owned();
        match self.wait(async move { b.hold_lease(&who).await })?? {
            LeaseState::Held => Ok(format!(
                "holding the writer lease of {} as {me}",
                self.describe
            )),
            LeaseState::Busy { holder, expires } => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{} is in use by another hoard ({holder}) until {}; this version has one \
                     writer per bucket and prefix",
                    self.describe,
                    crate::clock::rfc3339(expires)
                ),
            )),
        }
    }

    /// Gives the lease up (a clean stop), so the next hoard need not wait for it to expire.
    pub async fn release_lease(&self) {
        self.writable.store(false, Ordering::SeqCst);
        let key = self.lease_key();
        self.release_lease_at(&key, &self.lease_etag).await;
    }

    /// Stops writing at once (the lease could not be renewed in time).
    pub fn drop_lease(&self) {
        self.writable.store(false, Ordering::SeqCst);
    }

    /// Whether this hoard may write (holds the lease).
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    fn must_write(&self) -> Result<()> {
        if self.writable() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "this hoard does not hold the writer lease of {} (another hoard writes to it, or \
                 S3 is unreachable); retry shortly",
                self.describe
            ),
        ))
    }
}

/// One object of a listing; `key` is after the bucket's prefix.
#[derive(Clone, Debug)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: String,
    /// Last modified, in the S3 service's clock (ms since the epoch).
    pub modified: i64,
}

/// A small object read whole.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub body: Bytes,
    pub etag: String,
    pub modified: i64,
}

fn millis(t: &aws_sdk_s3::primitives::DateTime) -> i64 {
    t.secs()
        .saturating_mul(1000)
        .saturating_add(i64::from(t.subsec_nanos() / 1_000_000))
}

/// The condition of a write.
#[derive(Clone, Debug)]
pub enum Cond {
    None,
    /// `If-None-Match: *`: only if no object has this key.
    Create,
    /// `If-Match: <etag>`: only if the object is unchanged since it was read.
    Match(String),
}

fn random_name() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn detail<E: std::error::Error>(e: &E) -> String {
    crate::error::chain(e)
}

fn unavailable(key: &str, e: impl std::error::Error) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("S3 is unavailable ({key}): {}", detail(&e)),
    )
}

/// An SDK failure as hoard's kinds: absent → `NotFound`, a failed condition → `Conflict`,
/// everything else (unreachable, 5xx after retries, throttling, access) → `Unavailable`.
fn s3_error<E, R>(key: &str, e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + RawStatus,
{
    let code = match &e {
        SdkError::ServiceError(s) => s.err().code().map(str::to_owned),
        _ => None,
    };
    let status = match code.as_deref() {
        Some("NoSuchKey" | "NotFound" | "NoSuchUpload") => Some(404),
        Some("PreconditionFailed" | "ConditionalRequestConflict") => Some(412),
        // A missing bucket is the operator's problem, not a miss.
        Some(_) => None,
        // HEAD answers carry no error code: the status says it.
        None => e.raw_response().map(RawStatus::status_code),
    };
    match status {
        Some(404) => Error::not_found(format!("{key} is not in S3")),
        Some(412) | Some(409) => {
            Error::conflict(format!("S3 refused a conditional write of {key}"))
        }
        _ => {
            let msg = match &e {
                SdkError::ServiceError(s) => format!(
                    "{} {}{}",
                    s.raw().status_code(),
                    s.err().code().unwrap_or("error"),
                    s.err()
                        .message()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
                other => detail(other),
            };
            Error::new(
                ErrorKind::Unavailable,
                format!("S3 is unavailable ({key}): {msg}"),
            )
        }
    }
}

/// The HTTP status of a raw response (the SDK's error carries one).
trait RawStatus {
    fn status_code(&self) -> u16;
}

impl RawStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

pub struct S3Store {
    bucket: Arc<Bucket>,
}

impl S3Store {
    pub fn new(bucket: Arc<Bucket>) -> S3Store {
        S3Store { bucket }
    }
    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }
}

impl BlobStore for S3Store {
    fn begin(&self, alg: Algorithm) -> Result<Box<dyn BlobWriter>> {
        self.bucket.must_write()?;
        Ok(Box::new(S3Writer {
            bucket: self.bucket.clone(),
            hasher: alg.hasher(),
            written: 0,
            buf: BytesMut::new(),
            multipart: None,
            named: None,
        }))
    }

    fn open(&self, d: &Digest) -> Result<Box<dyn BlobRead>> {
        self.open_at(d, 0)
    }

    fn open_at(&self, d: &Digest, start: u64) -> Result<Box<dyn BlobRead>> {
        let key = self.bucket.blob_key(d);
        let (size, rx) = start_get(&self.bucket, &key, start)?;
        Ok(Box::new(S3Read {
            bucket: self.bucket.clone(),
            key,
            size,
            pos: start,
            rx: Mutex::new(Some(rx)),
            cur: Bytes::new(),
        }))
    }

    fn delete(&self, d: &Digest) -> Result<()> {
        self.bucket.must_write()?;
        let b = self.bucket.clone();
        let key = b.blob_key(d);
        self.bucket.wait(async move { b.delete_key(&key).await })?
    }

    fn walk(&self, f: &mut dyn FnMut(Digest, u64)) -> Result<()> {
        let b = self.bucket.clone();
        let found = self.bucket.wait(async move {
            let mut v = Vec::new();
            b.list("blobs/", &mut |k, size| v.push((k.to_owned(), size)))
                .await
                .map(|()| v)
        })??;
        for (k, size) in found {
            // blobs/<alg>/<xx>/<hex>
            let mut parts = k.split('/').skip(1);
            if let (Some(alg), Some(_), Some(hex)) = (parts.next(), parts.next(), parts.next()) {
                if let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() {
                    f(d, size);
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn quarantine(&self, d: &Digest) -> Result<()> {
        self.bucket.must_write()?;
        let b = self.bucket.clone();
        let from = b.blob_key(d);
        let to = b.key(&format!("quarantine/{}-{}", d.algorithm().name(), d.hex()));
        self.bucket.wait(async move {
            let size = b.head(&from).await?.unwrap_or(0);
            b.copy(&from, &to, size).await?;
            b.delete_key(&from).await
        })?
    }

    fn durable_on_commit(&self) -> bool {
        true
    }
}

/// Starts a GET of `key` from `start` and waits for its headers: the object's size and a
/// channel its bytes arrive on.
fn start_get(
    bucket: &Arc<Bucket>,
    key: &str,
    start: u64,
) -> Result<(u64, tokio::sync::mpsc::Receiver<io::Result<Bytes>>)> {
    // Room for about a MiB of the SDK's chunks: S3 keeps sending while the client is slow
    // for a moment, and the other way round.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let b = bucket.clone();
    let k = key.to_owned();
    let head = bucket.wait(async move {
        let mut req = b.client.get_object().bucket(&b.name).key(&k);
        if start > 0 {
            req = req.range(format!("bytes={start}-"));
        }
        let out = match req.send().await {
            Ok(o) => o,
            Err(e) => {
                let err = s3_error(&k, e);
                // A range past the end is an empty read of a blob that exists.
                return Err(err);
            }
        };
        let size = match out.content_range() {
            Some(r) => r
                .rsplit('/')
                .next()
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0),
            None => out.content_length().unwrap_or(0).max(0) as u64,
        };
        let mut body = out.body;
        tokio::spawn(async move {
            loop {
                // A body that stops arriving is cut by the SDK's stalled-stream protection
                // (nothing for 5 s): the client sees its pull fail instead of hanging.
                match body.next().await {
                    Some(Ok(chunk)) => {
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(key = %k, error = %detail(&e), "S3 broke off a body; the pull is cut");
                        let _ = tx.send(Err(io::Error::other(detail(&e)))).await;
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(size)
    })??;
    Ok((head, rx))
}

pub struct S3Read {
    bucket: Arc<Bucket>,
    key: String,
    size: u64,
    pos: u64,
    /// `None` after a seek: the next read starts a GET from `pos`.
    rx: Mutex<Option<tokio::sync::mpsc::Receiver<io::Result<Bytes>>>>,
    cur: Bytes,
}

impl BlobRead for S3Read {
    fn size(&self) -> u64 {
        self.size
    }

    fn chunks(&mut self) -> Option<crate::store::Chunks> {
        // Only a GET already streaming from the current position with nothing buffered:
        // otherwise the bytes are read with `read`.
        if !self.cur.is_empty() {
            return None;
        }
        self.rx.get_mut().ok()?.take()
    }
}

impl Read for S3Read {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || self.pos >= self.size {
            return Ok(0);
        }
        while self.cur.is_empty() {
            let rx = self
                .rx
                .get_mut()
                .map_err(|_| io::Error::other("reader poisoned"))?;
            if rx.is_none() {
                let (_, fresh) = start_get(&self.bucket, &self.key, self.pos)
                    .map_err(|e| io::Error::other(e.message))?;
                *rx = Some(fresh);
            }
            let Some(chan) = rx.as_mut() else {
                continue;
            };
            match chan.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "S3 ended {} at {} of {} bytes",
                            self.key, self.pos, self.size
                        ),
                    ))
                }
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for S3Read {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => self.size as i128 + d as i128,
        };
        if target < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start",
            ));
        }
        let target = target as u64;
        if target != self.pos {
            self.pos = target;
            self.cur = Bytes::new();
            if let Ok(rx) = self.rx.get_mut() {
                *rx = None;
            }
        }
        Ok(self.pos)
    }
}

/// What the writer sends its upload task: parts, then `Finish`. A channel that closes without
/// `Finish` (the upload was discarded) aborts the multipart upload.
enum Msg {
    Part(Bytes),
    Finish,
}

struct Multipart {
    parts: tokio::sync::mpsc::Sender<Msg>,
    done: std::sync::mpsc::Receiver<Result<()>>,
    key: String,
}

pub struct S3Writer {
    bucket: Arc<Bucket>,
    hasher: Hasher,
    written: u64,
    /// The part being filled.
    buf: BytesMut,
    multipart: Option<Multipart>,
    /// The digest the client named up front, when the multipart upload goes straight to its
    /// key (set only before the upload starts, and only for this writer's hash algorithm).
    named: Option<Digest>,
}

impl S3Writer {
    /// Hands the filled part to the upload task (starting it with the first part); waits
    /// while `parallel_parts` are already in flight.
    fn send_part(&mut self) -> Result<()> {
        let part = self.buf.split().freeze();
        if self.multipart.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
            // Named up front: the parts go to the blob's own key, where nothing is visible
            // until the upload is completed after the digest matched. Otherwise to a
            // temporary key, copied to the digest's key once that is known.
            let key = match &self.named {
                Some(d) => self.bucket.blob_key(d),
                None => self.bucket.key(&format!("uploads/{}", random_name())),
            };
            let b = self.bucket.clone();
            let k = key.clone();
            self.bucket.rt.spawn(async move {
                let _ = done_tx.send(upload_parts(b, k, rx).await);
            });
            self.multipart = Some(Multipart {
                parts: tx,
                done: done_rx,
                key,
            });
        }
        let Some(m) = &self.multipart else {
            return Err(Error::internal("multipart upload missing"));
        };
        if m.parts.blocking_send(Msg::Part(part)).is_err() {
            // The upload task ended early: it failed; its error is waiting.
            let m = self.multipart.take();
            return Err(match m.map(|m| m.done.recv()) {
                Some(Ok(Err(e))) => e,
                _ => Error::new(ErrorKind::Unavailable, "S3 upload stopped"),
            });
        }
        Ok(())
    }
}

/// Creates a multipart upload at `key` and uploads the parts arriving on `rx`, a few at once;
/// completes it on `Finish`. On any failure, or a channel closed without `Finish`, the upload is
/// aborted.
async fn upload_parts(
    b: Arc<Bucket>,
    key: String,
    mut rx: tokio::sync::mpsc::Receiver<Msg>,
) -> Result<()> {
    let id = b.create_multipart(&key).await?;
    let mut running = tokio::task::JoinSet::new();
    let mut parts = Vec::new();
    let mut n = 0i32;
    let result: Result<()> = async {
        loop {
            let body = match rx.recv().await {
                Some(Msg::Part(body)) => body,
                Some(Msg::Finish) => break,
                None => return Err(Error::new(ErrorKind::Unavailable, "upload discarded")),
            };
            while running.len() >= b.parallel {
                if let Some(r) = running.join_next().await {
                    parts.push(joined(r)?);
                }
            }
            n += 1;
            let (b2, k, id2) = (b.clone(), key.clone(), id.clone());
            running.spawn(async move {
                let len = body.len() as i64;
                let out = b2
                    .client
                    .upload_part()
                    .bucket(&b2.name)
                    .key(&k)
                    .upload_id(&id2)
                    .part_number(n)
                    .content_length(len)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map_err(|e| s3_error(&k, e))?;
                Ok(CompletedPart::builder()
                    .part_number(n)
                    .e_tag(out.e_tag().unwrap_or_default())
                    .build())
            });
        }
        while let Some(r) = running.join_next().await {
            parts.push(joined(r)?);
        }
        b.complete(&key, &id, std::mem::take(&mut parts)).await
    }
    .await;
    if result.is_err() {
        running.abort_all();
        b.abort(&key, &id).await;
    }
    result
}

fn joined(
    r: std::result::Result<Result<CompletedPart>, tokio::task::JoinError>,
) -> Result<CompletedPart> {
    r.map_err(|e| Error::internal(format!("S3 part upload task failed: {e}")))?
}

impl BlobWriter for S3Writer {
    fn write(&mut self, mut buf: &[u8]) -> Result<()> {
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        while !buf.is_empty() {
            let room = self.bucket.part_size - self.buf.len();
            let n = room.min(buf.len());
            if self.buf.capacity() == 0 {
                self.buf.reserve(self.bucket.part_size.min(1 << 20));
            }
            self.buf.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            // A full part is sent only once more bytes follow: a blob of exactly one part goes
            // up in one PUT.
            if self.buf.len() == self.bucket.part_size && !buf.is_empty() {
                self.send_part()?;
            }
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.written
    }

    fn named(&mut self, digest: &Digest) {
        if self.multipart.is_none() && digest.algorithm() == self.hasher.algorithm() {
            self.named = Some(*digest);
        }
    }

    fn commit(mut self: Box<Self>, expect: Expect) -> Result<u64> {
        let alg = expect.digest.algorithm();
        let hasher = std::mem::replace(&mut self.hasher, alg.hasher());
        let size = self.written;
        // Hashed as the upload began (sha256) but named with another algorithm at the end: the
        // bytes are hashed again, in memory or as they stand in S3.
        let rehash_in_s3 = hasher.algorithm() != alg && self.multipart.is_some();
        let got = if hasher.algorithm() == alg {
            hasher.finish()
        } else if !rehash_in_s3 {
            let mut h = alg.hasher();
            h.update(&self.buf);
            h.finish()
        } else {
            // Placeholder; checked after the upload completes below.
            expect.digest
        };
        // Parts sent to the key of a digest the client named, but committed under another: the
        // bytes cannot be moved there (and must never complete under the first name).
        let misnamed = self.multipart.is_some() && self.named.is_some_and(|n| n != expect.digest);
        let mismatch = if got != expect.digest || misnamed {
            Some(Error::new(
                ErrorKind::DigestMismatch,
                format!("uploaded content hashes to {got}, not {}", expect.digest),
            ))
        } else if expect.size.is_some_and(|s| s != size) {
            Some(Error::new(
                ErrorKind::SizeMismatch,
                format!(
                    "uploaded {size} bytes, but {} were declared",
                    expect.size.unwrap_or(0)
                ),
            ))
        } else {
            None
        };
        if let Some(e) = mismatch {
            return Err(e); // Drop aborts the multipart upload.
        }
        self.bucket.must_write()?;
        let b = self.bucket.clone();
        let key = b.blob_key(&expect.digest);
        match self.multipart.take() {
            None => {
                let body = self.buf.split().freeze();
                // Unconditional: the same bytes under their name, and a fresh last-modified time
                // is what tells a collector about to delete this blob that it was pushed again.
                // A sha256 blob's digest is the body's hash the signature needs.
                let hashed = (alg == Algorithm::Sha256).then(|| expect.digest.hex().to_owned());
                self.bucket.wait(async move {
                    match hashed {
                        Some(h) => b.put_hashed(&key, body, h).await.map(|_| ()),
                        None => b.put(&key, body, Cond::None).await.map(|_| ()),
                    }
                })??;
            }
            Some(m) => {
                let last = self.buf.split().freeze();
                let sent = (last.is_empty() || m.parts.blocking_send(Msg::Part(last)).is_ok())
                    && m.parts.blocking_send(Msg::Finish).is_ok();
                if !sent {
                    return Err(match m.done.recv() {
                        Ok(Err(e)) => e,
                        _ => Error::new(ErrorKind::Unavailable, "S3 upload stopped"),
                    });
                }
                drop(m.parts);
                match m.done.recv() {
                    Ok(r) => r?,
                    Err(_) => return Err(Error::new(ErrorKind::Unavailable, "S3 upload stopped")),
                }
                if self.named.is_some() {
                    // Completed at the blob's own key: that was the commit. (S3 dates such an
                    // object from when the upload began: a new object all the same, whose time
                    // differs from one a collector listed before; the registry ships the push's
                    // own time as an access record.)
                    return Ok(size);
                }
                let tmp = m.key;
                if rehash_in_s3 {
                    let got = rehash(&self.bucket, &tmp, alg, size)?;
                    if got != expect.digest {
                        let b2 = b.clone();
                        let t2 = tmp.clone();
                        let _ = self.bucket.wait(async move { b2.delete_key(&t2).await });
                        return Err(Error::new(
                            ErrorKind::DigestMismatch,
                            format!("uploaded content hashes to {got}, not {}", expect.digest),
                        ));
                    }
                }
                self.bucket.wait(async move {
                    let copied = b.copy(&tmp, &key, size).await;
                    if let Err(e) = b.delete_key(&tmp).await {
                        tracing::warn!(key = %tmp, error = %e, "removing an upload's temporary object failed");
                    }
                    copied?;
                    match b.head(&key).await? {
                        Some(s) if s == size => Ok(()),
                        other => Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("S3 holds {key} with size {other:?} after the copy, not {size}"),
                        )),
                    }
                })??;
            }
        }
        Ok(size)
    }
}

/// Hashes the object at `key` with `alg`, streaming it.
fn rehash(bucket: &Arc<Bucket>, key: &str, alg: Algorithm, size: u64) -> Result<Digest> {
    let (_, rx) = start_get(bucket, key, 0)?;
    let mut r = S3Read {
        bucket: bucket.clone(),
        key: key.to_owned(),
        size,
        pos: 0,
        rx: Mutex::new(Some(rx)),
        cur: Bytes::new(),
    };
    let mut h = alg.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("reading {key}: {e}")))?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // A discarded upload: closing the channel without `Finish` makes its task abort the
        // multipart upload (nothing under uploads/ stays behind).
        self.multipart.take();
    }
}
