//! The Go build cache's server side (`/gocache/<namespace>/…`) and its GOCACHEPROG helper
//! (`prog`). An action entry (action id → output id, size, time) is a file ref: tag `<action
//! hex>` in repository `gocache/<namespace>`, its layer the output blob (whose digest is the
//! output id: `go` names an output by its SHA-256), the time of the put in the layer's
//! annotations. So entries live under the lifecycle like image tags, and outputs are shared
//! blobs.
//!
//! - `GET /gocache/<ns>/action/<hex>`: the output's bytes in one round trip, with
//!   `Go-Output-Id` and `Go-Time` (milliseconds, hoard's cache clock); `404` on a miss.
//! - `PUT /gocache/<ns>/action/<hex>?output=<hex>` with the output's bytes: verified against the
//!   output id, stored, then the entry is pointed at it (`201`).
//!
//! Every answer carries `Hoard-Now` (milliseconds, the cache clock) so a client can carry times
//! into its own clock.

pub mod prog;

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::digest::{Algorithm, Digest};
use crate::error::{Error, Result, What};
use crate::http::{empty, full, Body};
use crate::names::{RepoName, Tag};
use crate::registry::refs::FileRef;
use crate::registry::{pump, Registry};
use crate::store::Expect;

pub const OUTPUT_ID: HeaderName = HeaderName::from_static("go-output-id");
pub const TIME: HeaderName = HeaderName::from_static("go-time");
pub const NOW: HeaderName = HeaderName::from_static("hoard-now");
/// On a put: the helper process it came from. On a hit: entries that helper put after this
/// one, which the next build will likely ask for next (a helper prefetches them).
pub const SESSION: HeaderName = HeaderName::from_static("hoard-session");
pub const NEXT: HeaderName = HeaderName::from_static("hoard-next");
/// Entries named in one `Hoard-Next`.
const NEXT_MAX: usize = 64;

/// The order entries were put in, per helper session: a hint for prefetching, kept in memory
/// only (a restart or another replica starts without it; nothing depends on it).
pub struct Hints {
    /// (repository, action) → actions put right after it in some session.
    next: std::sync::Mutex<lru::LruCache<(String, String), Vec<String>>>,
    /// session → the last action it put.
    last: std::sync::Mutex<lru::LruCache<String, String>>,
}

impl Default for Hints {
    fn default() -> Hints {
        let n = |k: usize| std::num::NonZeroUsize::new(k).unwrap_or(std::num::NonZeroUsize::MIN);
        Hints {
            next: std::sync::Mutex::new(lru::LruCache::new(n(500_000))),
            last: std::sync::Mutex::new(lru::LruCache::new(n(10_000))),
        }
    }
}

impl Hints {
    fn put(&self, repo: &str, session: &str, action: &str) {
        let prev = self
            .last
            .lock()
            .ok()
            .and_then(|mut l| l.put(session.to_owned(), action.to_owned()));
        if let (Some(prev), Ok(mut next)) = (prev, self.next.lock()) {
            let e = next.get_or_insert_mut((repo.to_owned(), prev), Vec::new);
            if !e.iter().any(|a| a == action) {
                if e.len() >= 4 {
                    e.remove(0);
                }
                e.push(action.to_owned());
            }
        }
    }

    /// Up to `NEXT_MAX` actions reachable from `action` through what followed what.
    fn after(&self, repo: &str, action: &str) -> Vec<String> {
        let Ok(mut next) = self.next.lock() else {
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        let mut queue = std::collections::VecDeque::from([action.to_owned()]);
        let mut seen = std::collections::HashSet::from([action.to_owned()]);
        while let Some(a) = queue.pop_front() {
            if out.len() >= NEXT_MAX {
                break;
            }
            if let Some(list) = next.peek(&(repo.to_owned(), a)) {
                for b in list {
                    if seen.insert(b.clone()) && out.len() < NEXT_MAX {
                        out.push(b.clone());
                        queue.push_back(b.clone());
                    }
                }
            }
        }
        let _ = next.get(&(repo.to_owned(), action.to_owned()));
        out
    }
}
const ARTIFACT_TYPE: &str = "application/vnd.hoard.gocache.v1";
const TIME_KEY: &str = "dev.hoard.gocache.time";
/// The largest output accepted (a linked binary of a big program is a few hundred MB).
const MAX_OUTPUT: u64 = 4 << 30;

/// `/gocache/<ns>/action/<hex>`, parsed at the edge.
#[derive(Debug, PartialEq)]
struct Route {
    repo: RepoName,
    action: Tag,
}

fn parse_route(path: &str) -> Result<Route> {
    let rest = path.strip_prefix("/gocache/").unwrap_or("");
    let (ns, action) = rest
        .split_once("/action/")
        .ok_or_else(|| Error::not_found("no such endpoint (/gocache/<namespace>/action/<id>)"))?;
    if ns.is_empty() || ns.len() > 64 || ns.contains('/') {
        return Err(Error::invalid(
            What::Name,
            format!("invalid namespace {ns:?}: one path element of at most 64 characters"),
        ));
    }
    let repo = RepoName::parse(&format!("gocache/{ns}"))?;
    let action = hex_id(action, "action id")?;
    Ok(Route {
        repo,
        action: Tag::parse(&action)?,
    })
}

/// A 32-byte id as 64 lower-case hex digits.
fn hex_id(s: &str, what: &str) -> Result<String> {
    if s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        Ok(s.to_owned())
    } else {
        Err(Error::invalid(
            What::Parameter,
            format!(
                "invalid {what} {:?}: 64 lower-case hex digits",
                crate::digest::truncate(s, 80)
            ),
        ))
    }
}

pub async fn handle(reg: &Arc<Registry>, hints: &Hints, req: Request<Incoming>) -> Response<Body> {
    let now = reg.clock.now_ms();
    let path = req.uri().path().to_owned();
    let head = req.method() == Method::HEAD;
    let r = match parse_route(req.uri().path()) {
        Ok(route) => match *req.method() {
            Method::GET | Method::HEAD => get(reg, hints, &route, head).await,
            Method::PUT => put(reg, hints, &route, req).await,
            _ => {
                let mut r = Response::new(full("use GET, HEAD or PUT on an action\n"));
                *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                return r;
            }
        },
        Err(e) => Err(e),
    };
    let mut resp = match r {
        Ok(r) => r,
        Err(e) => {
            let r = crate::http::error_text(&e, head, StatusCode::SERVICE_UNAVAILABLE);
            if r.status() != StatusCode::NOT_FOUND {
                tracing::info!(path = %path, status = r.status().as_u16(), reason = %e.message, "gocache request refused");
            }
            r
        }
    };
    resp.headers_mut().insert(NOW, HeaderValue::from(now));
    resp
}

async fn get(
    reg: &Arc<Registry>,
    hints: &Hints,
    route: &Route,
    head: bool,
) -> Result<Response<Body>> {
    let f = reg
        .file_ref(&route.repo, &route.action)
        .await?
        .ok_or_else(|| Error::not_found("no such action"))?;
    let time: i64 = f
        .annotation(TIME_KEY)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let mut resp = if head {
        Response::new(empty())
    } else {
        match reg.file_body(&route.repo, &f).await {
            Ok(body) => Response::new(body),
            // The entry's output went with a collection just now: a miss.
            Err(e) if e.is_not_found() => return Err(Error::not_found("no such action")),
            Err(e) => return Err(e),
        }
    };
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from(f.size));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&f.digest.hex()) {
        h.insert(OUTPUT_ID, v);
    }
    h.insert(TIME, HeaderValue::from(time));
    let next = hints.after(route.repo.as_str(), route.action.as_str());
    if !next.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&next.join(",")) {
            h.insert(NEXT, v);
        }
    }
    Ok(resp)
}

async fn put(
    reg: &Arc<Registry>,
    hints: &Hints,
    route: &Route,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let session = req
        .headers()
        .get(SESSION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map(str::to_owned);
    let output = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("output="))
        .ok_or_else(|| Error::invalid(What::Parameter, "missing ?output=<output id>"))?;
    let output = hex_id(output, "output id")?;
    let digest: Digest = format!("sha256:{output}").parse()?;
    let size: u64 = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::invalid(What::Parameter, "a put needs Content-Length"))?;
    if size > MAX_OUTPUT {
        return Err(Error::exhausted(format!(
            "an output of {size} bytes is over the {MAX_OUTPUT} byte limit"
        )));
    }
    let _permit = reg.transfer().await?;
    // Held until the entry names the output (see `set_file_ref`).
    let _pin = reg.life.pins.pin(digest);
    let mut writer = reg.new_writer(Algorithm::Sha256)?;
    writer.named(&digest);
    writer.reserve(size)?;
    let (writer, res) = pump(writer, req.into_body(), reg.body_timeout).await;
    res?;
    reg.commit_upload(
        &route.repo,
        writer,
        Expect {
            digest,
            size: Some(size),
        },
    )
    .await?;
    let mut ann = serde_json::Map::new();
    ann.insert(TIME_KEY.into(), reg.clock.now_ms().to_string().into());
    reg.set_file_ref(
        &route.repo,
        &route.action,
        ARTIFACT_TYPE,
        "application/octet-stream",
        FileRef {
            digest,
            size,
            annotations: ann,
        },
    )
    .await?;
    if let Some(s) = session {
        hints.put(route.repo.as_str(), &s, route.action.as_str());
    }
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_follow_the_order_of_puts() {
        let h = Hints::default();
        for a in ["a", "b", "c", "d"] {
            h.put("r", "s1", a);
        }
        h.put("r", "s2", "x");
        h.put("r", "s2", "c");
        assert_eq!(h.after("r", "a"), ["b", "c", "d"]);
        assert_eq!(h.after("r", "x"), ["c", "d"]);
        assert!(h.after("other", "a").is_empty());
    }

    #[test]
    fn routes() {
        let a = "ab".repeat(32);
        let r = parse_route(&format!("/gocache/default/action/{a}")).unwrap();
        assert_eq!(r.repo.as_str(), "gocache/default");
        assert_eq!(r.action.as_str(), a);
        for bad in [
            format!("/gocache//action/{a}"),
            format!("/gocache/a/b/action/{a}"),
            format!("/gocache/UP/action/{a}"),
            "/gocache/default/action/abc".to_owned(),
            format!("/gocache/default/action/{}", "AB".repeat(32)),
        ] {
            assert!(parse_route(&bad).is_err(), "{bad}");
        }
        assert!(parse_route("/gocache/default/other")
            .unwrap_err()
            .is_not_found());
    }
}
