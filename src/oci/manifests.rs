//! `PUT`/`GET`/`HEAD`/`DELETE /v2/<name>/manifests/<reference>`.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, ETAG, LOCATION};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::errors::{Code, OciError};
use super::{empty_response, header, query, HandlerResult, CONTENT_DIGEST};
use crate::error::{Error, ErrorKind};
use crate::http::{empty, full};
use crate::names::{Reference, RepoName, Tag};
use crate::registry::manifests::{PutManifest, MAX_MANIFEST};
use crate::registry::Registry;

const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
/// One per tag a push by digest set through `?tag=` (OCI Distribution 1.1.1): how a client
/// learns the registry honoured the parameters rather than ignoring them.
const OCI_TAG: HeaderName = HeaderName::from_static("oci-tag");

fn parse_reference(r: &str) -> Result<Reference, OciError> {
    Reference::parse(r).map_err(|e| OciError::from_error(e, Code::ManifestUnknown))
}

fn too_large() -> OciError {
    OciError::new(
        Code::SizeInvalid,
        format!("manifest is over the {MAX_MANIFEST} byte limit"),
    )
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// Gathers a manifest body of at most `MAX_MANIFEST` bytes; a body silent for `idle` is cut off.
async fn read_manifest_body(
    mut body: Incoming,
    idle: std::time::Duration,
) -> Result<Bytes, OciError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => {
                return Err(OciError::new(
                    Code::ManifestInvalid,
                    format!("manifest upload interrupted: {e}"),
                ))
            }
            Err(_) => {
                return Err(OciError::new(
                    Code::ManifestInvalid,
                    "manifest body stalled: nothing arrived for body_timeout",
                ))
            }
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_MANIFEST {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
}

pub async fn put(
    reg: &Registry,
    name: &RepoName,
    r: &str,
    req: Request<Incoming>,
) -> HandlerResult {
    let reference = parse_reference(r)?;
    let mut extra_tags = Vec::new();
    for (k, v) in query(&req) {
        if k == "tag" {
            extra_tags
                .push(Tag::parse(&v).map_err(|e| OciError::from_error(e, Code::ManifestInvalid))?);
        }
    }
    let announced = header(&req, CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > MAX_MANIFEST) {
        return Err(too_large());
    }
    // Manifest bodies are gathered in memory: they share a byte budget, so stalled pushes of
    // large manifests cannot add up to more than it.
    let _budget = reg
        .manifest_budget(announced.unwrap_or(MAX_MANIFEST))
        .await
        .map_err(|e| OciError::from_error(e, Code::ManifestInvalid))?;
    let content_type = header(&req, CONTENT_TYPE).map(str::to_owned);
    let body = read_manifest_body(req.into_body(), reg.body_timeout).await?;
    let stored = reg
        .put_manifest(PutManifest {
            repo: name,
            reference: &reference,
            content_type: content_type.as_deref(),
            body,
            extra_tags: &extra_tags,
        })
        .await
        .map_err(|e| OciError::from_error(e, Code::ManifestBlobUnknown))?;
    let mut headers = vec![
        (LOCATION, format!("/v2/{name}/manifests/{}", stored.digest)),
        (CONTENT_DIGEST, stored.digest.to_string()),
    ];
    if let Some(s) = stored.subject {
        headers.push((OCI_SUBJECT, s.to_string()));
    }
    for t in &extra_tags {
        headers.push((OCI_TAG, t.to_string()));
    }
    Ok(empty_response(StatusCode::CREATED, &headers))
}

pub async fn get(
    reg: &Registry,
    name: &RepoName,
    r: &str,
    req: &Request<Incoming>,
) -> HandlerResult {
    let reference = parse_reference(r)?;
    let missing = |e: Error| OciError::from_error(e, Code::ManifestUnknown);
    let (digest, meta, body) = if req.method() == Method::HEAD {
        if !reg
            .manifest_offered(name, &reference)
            .await
            .map_err(missing)?
        {
            return Err(missing(Error::not_found(format!(
                "manifest {reference} is being removed from {name}"
            ))));
        }
        let (d, m) = reg
            .resolve_manifest(name, &reference)
            .await
            .map_err(missing)?;
        (d, m, None)
    } else {
        let (d, m, b) = reg.get_manifest(name, &reference).await.map_err(missing)?;
        if b.len() as u64 != m.size {
            return Err(OciError::from_error(
                Error::new(
                    ErrorKind::Internal,
                    format!("stored manifest {d} has the wrong size"),
                ),
                Code::ManifestUnknown,
            ));
        }
        (d, m, Some(b))
    };
    let mut resp = Response::new(match body {
        Some(b) => full(b),
        None => empty(),
    });
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&meta.media_type) {
        h.insert(CONTENT_TYPE, v);
    }
    h.insert(CONTENT_LENGTH, HeaderValue::from(meta.size));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(CONTENT_DIGEST, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(ETAG, v);
    }
    Ok(resp)
}

pub async fn delete(reg: &Registry, name: &RepoName, r: &str) -> HandlerResult {
    let reference = parse_reference(r)?;
    reg.delete_manifest(name, &reference)
        .await
        .map_err(|e| OciError::from_error(e, Code::ManifestUnknown))?;
    Ok(empty_response(StatusCode::ACCEPTED, &[]))
}
