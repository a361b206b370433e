//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`, with byte ranges.

use http::header::{
    HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    RANGE,
};
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::errors::{Code, OciError};
use super::{empty_response, error_response, header, HandlerResult, CONTENT_DIGEST};
use crate::digest::Digest;
use crate::error::Error;
use crate::http::{empty, stream_blob};
use crate::names::RepoName;
use crate::registry::Registry;

/// A parsed `Range` header against a blob of known size.
#[derive(Debug, PartialEq)]
pub enum RangeReq {
    /// No usable range: send everything (RFC 9110 says to ignore a malformed Range).
    Whole,
    /// Inclusive byte positions.
    Part(u64, u64),
    Unsatisfiable,
}

pub fn parse_range(h: Option<&str>, size: u64) -> RangeReq {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeReq::Whole;
    };
    // Multiple ranges are legal but no registry client asks for them; serve the whole blob.
    if spec.contains(',') {
        return RangeReq::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last b bytes.
        return match b.parse::<u64>() {
            Ok(0) => RangeReq::Unsatisfiable,
            Ok(_) if size == 0 => RangeReq::Unsatisfiable,
            Ok(n) => RangeReq::Part(size.saturating_sub(n), size - 1),
            Err(_) => RangeReq::Whole,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeReq::Whole;
    };
    let end = if b.is_empty() {
        None
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => Some(e),
            // A range that ends before it starts can never be served: 416, as Go's net/http
            // (every Go registry client's server side) and the OCI conformance suite expect.
            Ok(_) => return RangeReq::Unsatisfiable,
            Err(_) => return RangeReq::Whole,
        }
    };
    if start >= size {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Part(start, end.map_or(size - 1, |e| e.min(size - 1)))
}

fn parse_digest(d: &str) -> Result<Digest, OciError> {
    d.parse()
        .map_err(|e: Error| OciError::from_error(e, Code::DigestInvalid))
}

pub async fn get(
    reg: &Registry,
    name: &RepoName,
    d: &str,
    req: &Request<Incoming>,
) -> HandlerResult {
    let digest = parse_digest(d)?;
    let is_head = req.method() == Method::HEAD;
    // A HEAD is how clients ask "may I reference this?" before pushing a manifest: it claims
    // the blob for the orphan grace period. A GET is a pull and claims nothing.
    let size = reg
        .stat_blob(name, &digest, is_head)
        .await
        .map_err(|e| OciError::from_error(e, Code::BlobUnknown))?;
    let (status, start, len) = match parse_range(header(req, RANGE), size) {
        RangeReq::Whole => (StatusCode::OK, 0, size),
        RangeReq::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        RangeReq::Unsatisfiable => {
            let e = OciError::new(
                Code::BlobUploadInvalid,
                format!("the requested range cannot be served from a blob of {size} bytes"),
            )
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE);
            let mut resp = error_response(&e, is_head);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let body = if is_head {
        empty()
    } else {
        let permit = reg
            .transfer()
            .await
            .map_err(|e| OciError::from_error(e, Code::BlobUnknown))?;
        let r = reg
            .open_blob(name, &digest, start)
            .await
            .map_err(|e| OciError::from_error(e, Code::BlobUnknown))?;
        stream_blob(r, len, Some(permit)).await.map_err(|e| {
            OciError::from_error(Error::io(format!("reading {digest}"), e), Code::BlobUnknown)
        })?
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // Content-addressed: the bytes under this name never change.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=31536000"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(CONTENT_DIGEST, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", start, start + len - 1))
        {
            h.insert(CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

pub async fn delete(reg: &Registry, name: &RepoName, d: &str) -> HandlerResult {
    let digest = parse_digest(d)?;
    reg.delete_blob(name, &digest)
        .await
        .map_err(|e| OciError::from_error(e, Code::BlobUnknown))?;
    Ok(empty_response(
        StatusCode::ACCEPTED,
        &[(CONTENT_DIGEST, digest.to_string())],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeReq::*;
        assert_eq!(parse_range(None, 10), Whole);
        assert_eq!(parse_range(Some("bytes=0-"), 10), Part(0, 9));
        assert_eq!(parse_range(Some("bytes=3-5"), 10), Part(3, 5));
        assert_eq!(parse_range(Some("bytes=3-50"), 10), Part(3, 9));
        assert_eq!(parse_range(Some("bytes=-4"), 10), Part(6, 9));
        assert_eq!(parse_range(Some("bytes=-40"), 10), Part(0, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-3"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=500-0"), 2048), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=2000-5000"), 2048), Part(2000, 2047));
        assert_eq!(parse_range(Some("items=0-1"), 10), Whole);
        assert_eq!(parse_range(Some("bytes=x-"), 10), Whole);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Whole);
    }
}
