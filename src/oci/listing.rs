//! Read-only listings: `GET /v2/<name>/tags/list`, `GET /v2/_catalog` (both paginated with
//! `n`/`last` and a `Link` header) and `GET /v2/<name>/referrers/<digest>`.

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, LINK};
use http::StatusCode;
use hyper::body::Incoming;
use hyper::Request;

use super::errors::{Code, OciError};
use super::{json_response, query, query_one, HandlerResult};
use crate::digest::Digest;
use crate::error::Error;
use crate::names::RepoName;
use crate::registry::manifests::OCI_INDEX;
use crate::registry::Registry;

const FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

fn page_params(req: &Request<Incoming>) -> Result<(Option<usize>, Option<String>), OciError> {
    let q = query(req);
    let n = match query_one(&q, "n") {
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            OciError::new(
                Code::BlobUploadInvalid,
                format!("n must be a non-negative integer, not {v:?}"),
            )
            .with_status(StatusCode::BAD_REQUEST)
        })?),
        None => None,
    };
    Ok((n, query_one(&q, "last").map(str::to_owned)))
}

fn with_link(
    mut resp: hyper::Response<crate::http::Body>,
    path: &str,
    n: Option<usize>,
    page: &[String],
    more: bool,
) -> hyper::Response<crate::http::Body> {
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        let link = format!("<{path}?n={n}&last={last}>; rel=\"next\"");
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(LINK, v);
        }
    }
    resp
}

pub async fn tags(reg: &Registry, name: &RepoName, req: &Request<Incoming>) -> HandlerResult {
    let (n, last) = page_params(req)?;
    let (page, more) = reg
        .tags(name, n, last.as_deref())
        .await
        .map_err(|e| OciError::from_error(e, Code::NameUnknown))?;
    let body = serde_json::json!({ "name": name.as_str(), "tags": page }).to_string();
    Ok(with_link(
        json_response(StatusCode::OK, body),
        &format!("/v2/{name}/tags/list"),
        n,
        &page,
        more,
    ))
}

pub async fn catalog(reg: &Registry, req: &Request<Incoming>) -> HandlerResult {
    let (n, last) = page_params(req)?;
    let (page, more) = reg
        .catalog(n, last.as_deref())
        .await
        .map_err(|e| OciError::from_error(e, Code::NameUnknown))?;
    let body = serde_json::json!({ "repositories": page }).to_string();
    Ok(with_link(
        json_response(StatusCode::OK, body),
        "/v2/_catalog",
        n,
        &page,
        more,
    ))
}

pub async fn referrers(
    reg: &Registry,
    name: &RepoName,
    d: &str,
    req: &Request<Incoming>,
) -> HandlerResult {
    let subject: Digest = d
        .parse()
        .map_err(|e: Error| OciError::from_error(e, Code::DigestInvalid))?;
    let q = query(req);
    let filter = query_one(&q, "artifactType");
    let manifests = reg
        .referrers(name, &subject, filter)
        .await
        .map_err(|e| OciError::from_error(e, Code::NameUnknown))?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    })
    .to_string();
    let mut resp = json_response(StatusCode::OK, body);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    if filter.is_some() {
        h.insert(FILTERS_APPLIED, HeaderValue::from_static("artifactType"));
    }
    Ok(resp)
}
