//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (session, monolithic `?digest=`, `?mount=`),
//! `PATCH`/`PUT`/`GET`/`DELETE /v2/<name>/blobs/uploads/<id>`.

use http::header::{HeaderName, CONTENT_LENGTH, LOCATION, RANGE};
use http::StatusCode;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::Request;

use super::errors::{Code, OciError};
use super::{empty_response, header, query, query_one, HandlerResult, CONTENT_DIGEST};
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, ErrorKind};
use crate::names::RepoName;
use crate::registry::uploads::Held;
use crate::registry::{pump, Registry};
use crate::store::{BlobWriter, Expect};

const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");

fn upload_error(e: Error) -> OciError {
    OciError::from_error(e, Code::BlobUploadUnknown)
}

fn blob_location(name: &RepoName, d: &Digest) -> String {
    format!("/v2/{name}/blobs/{d}")
}

fn session_headers(name: &RepoName, id: &str, offset: u64) -> Vec<(HeaderName, String)> {
    vec![
        (LOCATION, format!("/v2/{name}/blobs/uploads/{id}")),
        // Inclusive end of what is stored; "0-0" also for an empty upload, as distribution does.
        (RANGE, format!("0-{}", offset.saturating_sub(1))),
        (UPLOAD_UUID, id.to_owned()),
    ]
}

fn created(name: &RepoName, d: &Digest) -> HandlerResult {
    Ok(empty_response(
        StatusCode::CREATED,
        &[
            (LOCATION, blob_location(name, d)),
            (CONTENT_DIGEST, d.to_string()),
        ],
    ))
}

fn parse_digest_param(v: &str) -> Result<Digest, OciError> {
    v.parse()
        .map_err(|e: Error| OciError::from_error(e, Code::DigestInvalid))
}

/// Reserves the space a body announces with `Content-Length` before it streams, so a write that
/// cannot fit is refused up front (bodies without a length reserve as they arrive).
fn reserve_body(w: &mut dyn BlobWriter, req: &Request<Incoming>) -> Result<(), Error> {
    match header(req, CONTENT_LENGTH).map(str::parse::<u64>) {
        Some(Ok(n)) if n > 0 => w.reserve(w.written() + n),
        _ => Ok(()),
    }
}

/// True when the request carries (or may carry) a body.
fn has_body(req: &Request<Incoming>) -> bool {
    match header(req, CONTENT_LENGTH).map(str::parse::<u64>) {
        Some(Ok(n)) => n > 0,
        _ => !req.body().is_end_stream(),
    }
}

pub async fn start(reg: &Registry, name: &RepoName, req: Request<Incoming>) -> HandlerResult {
    let q = query(&req);
    if let Some(m) = query_one(&q, "mount") {
        let digest = parse_digest_param(m)?;
        let from = match query_one(&q, "from") {
            Some(f) => {
                Some(RepoName::parse(f).map_err(|e| OciError::from_error(e, Code::NameInvalid))?)
            }
            None => None,
        };
        if reg
            .mount(name, &digest, from.as_ref())
            .await
            .map_err(upload_error)?
        {
            return created(name, &digest);
        }
        // Not mountable: fall through to a normal upload session, as the spec says.
    } else if let Some(d) = query_one(&q, "digest") {
        let digest = parse_digest_param(d)?;
        // A digest with no body is a hint some clients send; only an actual body (or the empty
        // blob's own digest) makes this a one-request upload.
        if has_body(&req) || digest == Digest::of(digest.algorithm(), b"") {
            let _permit = reg.transfer().await.map_err(upload_error)?;
            let mut writer = reg.new_writer(digest.algorithm()).map_err(upload_error)?;
            writer.named(&digest);
            reserve_body(&mut *writer, &req).map_err(upload_error)?;
            let (writer, res) = pump(writer, req.into_body(), reg.body_timeout).await;
            res.map_err(upload_error)?;
            reg.commit_upload(name, writer, Expect { digest, size: None })
                .await
                .map_err(upload_error)?;
            return created(name, &digest);
        }
    }
    let id = reg.uploads.start(name.clone());
    Ok(empty_response(
        StatusCode::ACCEPTED,
        &session_headers(name, &id, 0),
    ))
}

/// `Content-Range: <start>-<end>` (the spec's form; `bytes ` prefix also accepted).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (b >= a).then_some((a, b))
}

fn range_not_satisfiable(msg: String) -> OciError {
    OciError::new(Code::BlobUploadInvalid, msg).with_status(StatusCode::RANGE_NOT_SATISFIABLE)
}

/// Appends the request body to the session. On any failure mid-body (client cut off, disk
/// full) the session is dropped with its data: nothing partial lingers in tmp/. `named`: the
/// digest a final PUT names, passed to a writer that starts with this body.
async fn append(
    reg: &Registry,
    name: &RepoName,
    id: &str,
    req: Request<Incoming>,
    session: &mut Held,
    named: Option<&Digest>,
) -> Result<(), OciError> {
    let park = named.is_none();
    let offset = session.offset();
    let expected_len = match header(&req, "content-range") {
        Some(cr) => {
            let (a, b) = parse_content_range(cr).ok_or_else(|| {
                OciError::new(
                    Code::BlobUploadInvalid,
                    format!("malformed Content-Range {cr:?}: expected <start>-<end>"),
                )
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
            })?;
            if a != offset {
                return Err(range_not_satisfiable(format!(
                    "chunk starts at {a}, but the upload has {offset} bytes: send from {offset}"
                )));
            }
            Some(b - a + 1)
        }
        None => None,
    };
    if !has_body(&req) {
        return Ok(());
    }
    // Past max_transfers the client is told to retry; the session stays as it was.
    let _permit = reg.transfer().await.map_err(upload_error)?;
    let mut writer = match session.writer.take() {
        Some(w) => w,
        None => {
            let alg = named.map_or(Algorithm::Sha256, Digest::algorithm);
            let mut w = reg.new_writer(alg).map_err(upload_error)?;
            if let Some(d) = named {
                w.named(d);
            }
            w
        }
    };
    if let Err(e) = reserve_body(&mut *writer, &req) {
        // Refused before a byte streamed. A store too full for it ends the session, so its
        // data and reservation go now rather than at upload_timeout; other refusals keep it.
        if e.kind == ErrorKind::Exhausted {
            drop(writer);
            reg.uploads.close(id, session);
        } else {
            session.writer = Some(writer);
        }
        return Err(upload_error(e));
    }
    let (writer, res) = pump(writer, req.into_body(), reg.body_timeout).await;
    let appended = writer.written() - offset;
    // Between chunks a session holds its bytes and hash state, never a thread (a writer past
    // `aligned_from` may have started one). A PUT commits right after: nothing to park.
    let may_hold_thread = writer
        .aligned_from()
        .is_some_and(|at| writer.written() > at);
    let (writer, res) = match res {
        Ok(()) if park && may_hold_thread => {
            let mut w = writer;
            crate::registry::blocking(move || {
                let r = w.park();
                (w, r)
            })
            .await
        }
        other => (writer, other),
    };
    if let Err(e) = res {
        drop(writer);
        reg.uploads.close(id, session);
        tracing::info!(upload = id, repo = %name, error = %e.message, "upload dropped");
        return Err(upload_error(e));
    }
    session.writer = Some(writer);
    if let Some(want) = expected_len {
        if appended != want {
            reg.uploads.close(id, session);
            return Err(OciError::from_error(
                Error::new(
                    ErrorKind::SizeMismatch,
                    format!("Content-Range announced {want} bytes but the body had {appended}"),
                ),
                Code::SizeInvalid,
            ));
        }
    }
    Ok(())
}

pub async fn patch(
    reg: &Registry,
    name: &RepoName,
    id: &str,
    req: Request<Incoming>,
) -> HandlerResult {
    let mut session = reg.uploads.hold(name, id).await.map_err(upload_error)?;
    append(reg, name, id, req, &mut session, None).await?;
    reg.uploads.touch(&mut session);
    Ok(empty_response(
        StatusCode::ACCEPTED,
        &session_headers(name, id, session.offset()),
    ))
}

pub async fn put(
    reg: &Registry,
    name: &RepoName,
    id: &str,
    req: Request<Incoming>,
) -> HandlerResult {
    let q = query(&req);
    let mut session = reg.uploads.hold(name, id).await.map_err(upload_error)?;
    let Some(d) = query_one(&q, "digest") else {
        return Err(OciError::new(
            Code::DigestInvalid,
            "the digest query parameter is required to finish an upload",
        ));
    };
    let digest = match parse_digest_param(d) {
        Ok(d) => d,
        Err(e) => {
            reg.uploads.close(id, &mut session);
            return Err(e);
        }
    };
    append(reg, name, id, req, &mut session, Some(&digest)).await?;
    let writer = session.writer.take();
    reg.uploads.close(id, &mut session);
    drop(session);
    let writer = match writer {
        Some(w) => w,
        None => reg.new_writer(digest.algorithm()).map_err(upload_error)?,
    };
    reg.commit_upload(name, writer, Expect { digest, size: None })
        .await
        .map_err(upload_error)?;
    created(name, &digest)
}

pub async fn status(reg: &Registry, name: &RepoName, id: &str) -> HandlerResult {
    let offset = reg.uploads.offset(name, id).map_err(upload_error)?;
    Ok(empty_response(
        StatusCode::NO_CONTENT,
        &session_headers(name, id, offset),
    ))
}

/// Waits for a request in flight on the session, then drops it with its data.
pub async fn cancel(reg: &Registry, name: &RepoName, id: &str) -> HandlerResult {
    let mut session = reg.uploads.hold(name, id).await.map_err(upload_error)?;
    reg.uploads.close(id, &mut session);
    Ok(empty_response(StatusCode::NO_CONTENT, &[]))
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-9"), Some((0, 9)));
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19)));
        assert_eq!(parse_content_range("5-4"), None);
        assert_eq!(parse_content_range("x"), None);
    }
}
