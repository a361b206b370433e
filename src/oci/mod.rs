//! The OCI Distribution API v1.1 front end (`/v2/…`): routing, request parsing at the edge and
//! mapping service results to the spec's statuses, headers and error bodies.

mod blobs;
pub mod errors;
mod listing;
mod manifests;
pub mod routes;
mod uploads;

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::http::{empty, full, Body};
use crate::registry::Registry;
use errors::{Code, OciError};
use routes::Route;

pub const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
pub const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

pub type HandlerResult = Result<Response<Body>, OciError>;

/// Handles a request whose path starts with `/v2/`.
pub async fn handle(reg: Arc<Registry>, req: Request<Incoming>) -> Response<Body> {
    let is_head = req.method() == Method::HEAD;
    let method = req.method().clone();
    let path = percent_decode(req.uri().path());
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    let result =
        match routes::parse(rest) {
            Ok(Some(route)) => dispatch(&reg, route, req).await,
            Ok(None) => Err(OciError::new(Code::NameUnknown, "no such endpoint")
                .with_status(StatusCode::NOT_FOUND)),
            Err(e) => Err(OciError::from_error(e, Code::NameUnknown)),
        };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            // A miss is an answer, not a refusal; everything else is logged with its reason.
            if e.status != StatusCode::NOT_FOUND {
                tracing::info!(
                    method = %method,
                    path = %path,
                    status = e.status.as_u16(),
                    code = e.code.wire().0,
                    reason = %e.message,
                    "request refused"
                );
            }
            error_response(&e, is_head)
        }
    };
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// Repositories written only by hoard's own front ends (the module proxy's files, the Go build
/// cache's entries, snapshots): readable here, never written or deleted through `/v2/`.
const RESERVED: &[&str] = &["gomod/", "gocache/", "snapshots/"];

async fn dispatch(reg: &Registry, route: Route<'_>, req: Request<Incoming>) -> HandlerResult {
    let method = req.method().clone();
    if !matches!(method, Method::GET | Method::HEAD) {
        if let Some(name) = route.name() {
            if RESERVED.iter().any(|p| name.as_str().starts_with(p)) {
                return Err(OciError::new(
                    Code::Denied,
                    format!(
                        "repository {name} is written by hoard's own front ends only: read-only through /v2/"
                    ),
                ));
            }
        }
    }
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => Ok(json_response(StatusCode::OK, "{}")),
        (Route::Catalog, Method::GET) => listing::catalog(reg, &req).await,
        (Route::Tags(name), Method::GET) => listing::tags(reg, &name, &req).await,
        (Route::Referrers(name, d), Method::GET) => listing::referrers(reg, &name, d, &req).await,
        (Route::Blob(name, d), Method::GET | Method::HEAD) => blobs::get(reg, &name, d, &req).await,
        (Route::Blob(name, d), Method::DELETE) => blobs::delete(reg, &name, d).await,
        (Route::UploadStart(name), Method::POST) => uploads::start(reg, &name, req).await,
        (Route::Upload(name, id), Method::PATCH) => uploads::patch(reg, &name, id, req).await,
        (Route::Upload(name, id), Method::PUT) => uploads::put(reg, &name, id, req).await,
        (Route::Upload(name, id), Method::GET) => uploads::status(reg, &name, id).await,
        (Route::Upload(name, id), Method::DELETE) => uploads::cancel(reg, &name, id).await,
        (Route::Manifest(name, r), Method::GET | Method::HEAD) => {
            manifests::get(reg, &name, r, &req).await
        }
        (Route::Manifest(name, r), Method::PUT) => manifests::put(reg, &name, r, req).await,
        (Route::Manifest(name, r), Method::DELETE) => manifests::delete(reg, &name, r).await,
        (_, m) => Err(OciError::new(
            Code::Unsupported,
            format!("method {m} is not supported on this endpoint"),
        )),
    }
}

pub fn error_response(e: &OciError, is_head: bool) -> Response<Body> {
    let body = e.body();
    let len = body.len();
    let mut resp = Response::new(if is_head { empty() } else { full(body) });
    *resp.status_mut() = e.status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        // Busy, not broken: clients that honour it (and BuildKit, which retries any 5xx with
        // backoff) come back shortly.
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

pub fn json_response(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let body = body.into();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An empty response with a status and headers (201/202/204 answers).
pub fn empty_response(status: StatusCode, headers: &[(HeaderName, String)]) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from(0));
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(k.clone(), v);
        }
    }
    resp
}

/// Decoded `key=value` pairs of the request's query, in order.
pub fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_pairs(req.uri().query().unwrap_or(""))
}

/// Query or form text as decoded pairs (`+` is a space, `%XX` a byte).
pub fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

pub fn query_one<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn header(req: &Request<Incoming>, name: impl http::header::AsHeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("sha256%3Aab"), "sha256:ab");
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
