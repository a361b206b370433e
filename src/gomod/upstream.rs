//! The upstream module proxies a miss is fetched from, tried in order with Go's fall-through
//! rules: after an entry followed by `,` only a 404 or 410 moves on to the next; after one
//! followed by `|` any error does (a timeout, a refused connection, a 5xx, a zip that fails its
//! checks).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One upstream proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    /// Base URL without a trailing slash, e.g. `https://proxy.golang.org`.
    pub base: String,
    /// Followed by `|`: any error moves on to the next.
    pub on_any_error: bool,
}

/// Parses a GOPROXY-style list (`a,b|c`). `direct` is refused (hoard does not run version
/// control tools) and `off` ends the list.
pub fn parse_list(s: &str) -> Result<Vec<Upstream>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut push =
        |cur: &mut String, any: bool| -> Result<bool, String> {
            let e = cur.trim().trim_end_matches('/').to_owned();
            cur.clear();
            if e.is_empty() {
                return Ok(true);
            }
            match e.as_str() {
                "off" => return Ok(false),
                "direct" => return Err(
                    "gomod upstream \"direct\" is not supported: hoard fetches only from module \
                     proxies (list one, e.g. https://proxy.golang.org)"
                        .into(),
                ),
                _ => {}
            }
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "gomod upstream {e:?} is not an http:// or https:// URL"
                ));
            }
            if e.parse::<http::Uri>().is_err() {
                return Err(format!("gomod upstream {e:?} is not a valid URL"));
            }
            out.push(Upstream {
                base: e,
                on_any_error: any,
            });
            Ok(true)
        };
    for c in s.chars() {
        match c {
            ',' | '|' => {
                if !push(&mut cur, c == '|')? {
                    return Ok(out);
                }
            }
            _ => cur.push(c),
        }
    }
    push(&mut cur, false)?;
    Ok(out)
}

/// An HTTP and HTTPS connector (the system's CA certificates) that gives up connecting after
/// `timeout`.
pub fn connector(timeout: Duration) -> hyper_rustls::HttpsConnector<HttpConnector> {
    use hyper_rustls::ConfigBuilderExt as _;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => match b.clone().with_native_roots() {
            Ok(b) => b.with_no_client_auth(),
            Err(e) => {
                tracing::warn!(error = %e, "no CA certificates found: https URLs will fail (install ca-certificates)");
                b.with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "TLS set-up failed: only http:// URLs will work");
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Why one upstream did not give the file.
#[derive(Clone, Debug)]
pub enum Attempt {
    /// 404 or 410: the next upstream is asked.
    NotFound(String),
    /// Anything else.
    Failed(String),
}

pub type Response = hyper::Response<hyper::body::Incoming>;

pub struct HttpClient {
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// For connecting, for the response head, and between body chunks.
    pub timeout: Duration,
}

impl HttpClient {
    pub fn new(timeout: Duration) -> HttpClient {
        let connector = connector(timeout);
        HttpClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    /// GETs `url`, following up to 5 redirects; a 200 is returned, a 404/410 is `NotFound`,
    /// anything else (or no answer within the timeout) `Failed`.
    pub async fn get(&self, url: &str) -> Result<Response, Attempt> {
        let mut url = url.to_owned();
        for _ in 0..6 {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| Attempt::Failed(format!("{url}: invalid URL: {e}")))?;
            let req = hyper::Request::get(uri.clone())
                .header(
                    http::header::USER_AGENT,
                    concat!("hoard/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::new())
                .map_err(|e| Attempt::Failed(format!("{url}: {e}")))?;
            let resp = match tokio::time::timeout(self.timeout, self.http.request(req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    return Err(Attempt::Failed(format!(
                        "{url}: {}",
                        crate::error::chain(&e)
                    )))
                }
                Err(_) => {
                    return Err(Attempt::Failed(format!(
                        "{url}: no answer within {:?}",
                        self.timeout
                    )))
                }
            };
            let status = resp.status();
            if status.is_redirection() {
                let Some(loc) = resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                else {
                    return Err(Attempt::Failed(format!("{url}: {status} without Location")));
                };
                url = resolve(&uri, loc);
                continue;
            }
            if status == http::StatusCode::OK {
                return Ok(resp);
            }
            let text = self.small_text(resp).await;
            let msg = format!("{url}: {status}{text}");
            return Err(
                if status == http::StatusCode::NOT_FOUND || status == http::StatusCode::GONE {
                    Attempt::NotFound(msg)
                } else {
                    Attempt::Failed(msg)
                },
            );
        }
        Err(Attempt::Failed(format!("{url}: too many redirects")))
    }

    /// The start of an error body, for the message (`": <text>"`, or nothing).
    async fn small_text(&self, resp: Response) -> String {
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while buf.len() < 512 {
            match tokio::time::timeout(Duration::from_secs(2), body.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                _ => break,
            }
        }
        let s = String::from_utf8_lossy(&buf[..buf.len().min(512)]);
        let s = s.trim();
        if s.is_empty() {
            String::new()
        } else {
            format!(": {}", s.replace('\n', " "))
        }
    }

    /// Reads a whole body of at most `max` bytes.
    pub async fn read_body(&self, url: &str, resp: Response, max: u64) -> Result<Bytes, Attempt> {
        let mut out = Vec::new();
        self.each_chunk(url, resp, max, |c| {
            out.extend_from_slice(&c);
            Ok(())
        })
        .await?;
        Ok(Bytes::from(out))
    }

    /// Passes a body's chunks to `f`; fails past `max` bytes or when a chunk takes longer
    /// than the timeout.
    pub async fn each_chunk(
        &self,
        url: &str,
        resp: Response,
        max: u64,
        mut f: impl FnMut(Bytes) -> Result<(), String>,
    ) -> Result<u64, Attempt> {
        let declared = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(Attempt::Failed(format!(
                "{url}: {} bytes, over the {max} byte limit",
                declared.unwrap_or(0)
            )));
        }
        let mut body = resp.into_body();
        let mut n: u64 = 0;
        loop {
            let frame = match tokio::time::timeout(self.timeout, body.frame()).await {
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(e))) => {
                    return Err(Attempt::Failed(format!(
                        "{url}: the body broke off after {n} bytes: {}",
                        crate::error::chain(&e)
                    )))
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(Attempt::Failed(format!(
                        "{url}: the body stalled after {n} bytes"
                    )))
                }
            };
            if let Ok(data) = frame.into_data() {
                n += data.len() as u64;
                if n > max {
                    return Err(Attempt::Failed(format!("{url}: over the {max} byte limit")));
                }
                f(data).map_err(|e| Attempt::Failed(format!("{url}: {e}")))?;
            }
        }
        if declared.is_some_and(|d| d != n) {
            return Err(Attempt::Failed(format!(
                "{url}: the body is {n} bytes, not the {} its Content-Length says",
                declared.unwrap_or(0)
            )));
        }
        Ok(n)
    }
}

/// A `Location` against the URL it came from.
fn resolve(base: &http::Uri, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_owned();
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let auth = base.authority().map(|a| a.as_str()).unwrap_or("");
    if loc.starts_with('/') {
        format!("{scheme}://{auth}{loc}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{scheme}://{auth}{dir}{loc}")
    }
}

/// Go's fall-through over the upstreams: each failed attempt is recorded, and says whether the
/// next upstream is asked.
pub struct Tries {
    pub last: Attempt,
}

impl Default for Tries {
    fn default() -> Tries {
        Tries {
            last: Attempt::NotFound("no upstream module proxy is configured".into()),
        }
    }
}

impl Tries {
    /// Records why `up` failed; `false` when the list ends here.
    pub fn go_on(&mut self, up: &Upstream, a: Attempt) -> bool {
        let on = match &a {
            Attempt::NotFound(_) => true,
            Attempt::Failed(m) => {
                tracing::info!(upstream = %up.base, reason = %m, "gomod upstream failed");
                up.on_any_error
            }
        };
        self.last = a;
        on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_goproxy_lists() {
        let l = parse_list("https://a.example/,http://b.example|https://c.example").unwrap();
        assert_eq!(
            l,
            vec![
                Upstream {
                    base: "https://a.example".into(),
                    on_any_error: false
                },
                Upstream {
                    base: "http://b.example".into(),
                    on_any_error: true
                },
                Upstream {
                    base: "https://c.example".into(),
                    on_any_error: false
                },
            ]
        );
        assert_eq!(
            parse_list("https://a.example,off,https://b").unwrap().len(),
            1
        );
        assert!(parse_list("direct").is_err());
        assert!(parse_list("ftp://x").is_err());
        assert!(parse_list("").unwrap().is_empty());
    }

    #[test]
    fn resolves_redirects() {
        let u: http::Uri = "https://p.example/a/b/c.zip".parse().unwrap();
        assert_eq!(resolve(&u, "/x/y"), "https://p.example/x/y");
        assert_eq!(resolve(&u, "d.zip"), "https://p.example/a/b/d.zip");
        assert_eq!(resolve(&u, "http://o/z"), "http://o/z");
    }
}
