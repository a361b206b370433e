//! hoard's operator API (`hoard.v1.Admin`): stats, refs, a lifecycle pass now, verification and
//! eviction. The gRPC service, `hoard admin …` (its client over the socket) and the HTTP
//! `POST /admin/gc` and `/admin/verify` all answer from the functions here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::auth::Front;
use crate::error::{Error, ErrorKind, Result};
use crate::names::{Reference, RepoName, Tag};
use crate::proto::admin as api;
use crate::registry::blocking;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub fn stats(app: &App, prefix: &str) -> api::StatsResponse {
    let c = crate::app::counts(app);
    let pulls: std::collections::HashMap<String, u64> =
        crate::metrics::top_pulls(usize::MAX).into_iter().collect();
    let repos = {
        let s = app.index.read();
        s.repos
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(name, r)| api::RepositoryStats {
                name: name.clone(),
                bytes: r
                    .blobs
                    .iter()
                    .filter_map(|d| s.blobs.get(d).map(|b| b.size))
                    .sum(),
                tags: r.tags.len() as u64,
                manifests: r.manifests.len() as u64,
                blobs: r.blobs.len() as u64,
                pulls: pulls.get(name).copied().unwrap_or(0),
            })
            .collect()
    };
    api::StatsResponse {
        bytes: c.bytes,
        max_bytes: app.life.policy.max_size.unwrap_or(0),
        blobs: c.blobs as u64,
        manifests: c.manifests as u64,
        tags: c.tags as u64,
        repositories: c.repositories as u64,
        unreferenced: c.unreferenced as u64,
        uploads: app.registry.uploads.len() as u64,
        front_ends: crate::metrics::hits_and_misses()
            .into_iter()
            .map(|(f, h, m)| api::FrontEndStats {
                front_end: f.into(),
                hits: h,
                misses: m,
            })
            .collect(),
        repositories_stats: repos,
    }
}

pub fn list_refs(app: &App, prefix: &str, page_size: u32, token: &str) -> api::ListRefsResponse {
    let n = match page_size as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let after = token.split_once('\t');
    let s = app.index.read();
    let mut refs = Vec::new();
    let mut next = String::new();
    'outer: for (name, r) in s
        .repos
        .range(prefix.to_owned()..)
        .take_while(|(k, _)| k.starts_with(prefix))
    {
        if let Some((ar, _)) = after {
            if name.as_str() < ar {
                continue;
            }
        }
        for (tag, d) in &r.tags {
            if let Some((ar, at)) = after {
                if name.as_str() == ar && tag.as_str() <= at {
                    continue;
                }
            }
            if refs.len() == n {
                if let Some(last) = refs.last() {
                    let last: &api::Ref = last;
                    next = format!("{}\t{}", last.repository, last.tag);
                }
                break 'outer;
            }
            let m = r.manifests.get(d);
            refs.push(api::Ref {
                repository: name.clone(),
                tag: tag.clone(),
                digest: d.to_string(),
                size: m.map_or(0, |m| m.size),
                media_type: m.map(|m| m.media_type.clone()).unwrap_or_default(),
                last_access_ms: m.map_or(0, |m| m.access.get()),
            });
        }
    }
    api::ListRefsResponse {
        refs,
        next_page_token: next,
    }
}

fn gc_response(r: &crate::lifecycle::gc::Report, took: std::time::Duration) -> api::GcResponse {
    api::GcResponse {
        evictions: r
            .tallies
            .iter()
            .map(|((reason, repo), t)| api::Eviction {
                reason: reason.as_str().into(),
                repository: repo.clone(),
                tags: t.tags,
                manifests: t.manifests,
                blobs: t.blobs,
                bytes: t.bytes,
            })
            .collect(),
        freed_bytes: r.freed,
        duration_ms: took.as_millis() as u64,
        text: crate::app::render_pass(r),
    }
}

/// A lifecycle pass now. `Conflict` on a replica that does not collect for its bucket.
pub async fn gc(app: &Arc<App>) -> Result<api::GcResponse> {
    if let Some(why) = app.not_collector() {
        return Err(Error::conflict(why));
    }
    let started = std::time::Instant::now();
    let r = crate::app::timed_pass(app.life.clone()).await?;
    Ok(gc_response(&r, started.elapsed()))
}

pub async fn verify(app: &Arc<App>, repair: bool) -> Result<api::VerifyResponse> {
    // Unknown objects a crash left count as strays until the start-up walk removed them.
    let mut swept = app.swept.subscribe();
    let _ = swept.wait_for(|done| *done).await;
    let life = app.life.clone();
    let r = blocking(move || crate::lifecycle::verify::verify(&life, repair)).await?;
    Ok(api::VerifyResponse {
        clean: r.is_clean(),
        repaired: r.repaired,
        checked: r.checked,
        bytes: r.bytes,
        corrupt: r.corrupt.iter().map(|d| d.to_string()).collect(),
        missing: r.missing.iter().map(|d| d.to_string()).collect(),
        strays: r.strays,
        dangling: r.dangling.clone(),
        text: r.render(),
    })
}

/// Removes the refs `target` names ("repo:tag", or a repository prefix ending in '*'), then runs
/// a pass so what they alone reached goes now; reports what that pass removed.
pub async fn evict(app: &Arc<App>, target: &str) -> Result<api::EvictResponse> {
    let mut refs: Vec<(RepoName, Tag)> = Vec::new();
    if let Some(prefix) = target.strip_suffix('*') {
        let s = app.index.read();
        for (name, r) in s
            .repos
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            let repo = RepoName::parse(name)?;
            for t in r.tags.keys() {
                refs.push((repo.clone(), Tag::parse(t)?));
            }
        }
    } else {
        let (repo, tag) = target.rsplit_once(':').ok_or_else(|| {
            Error::invalid(
                crate::error::What::Parameter,
                format!("{target:?}: name a ref as repository:tag, or a prefix ending in '*'"),
            )
        })?;
        refs.push((RepoName::parse(repo)?, Tag::parse(tag)?));
    }
    let mut removed = 0u64;
    for (repo, tag) in &refs {
        match app
            .registry
            .delete_manifest(repo, &Reference::Tag(tag.clone()))
            .await
        {
            Ok(()) => removed += 1,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    if removed == 0 {
        return Err(Error::not_found(format!("no ref matches {target:?}")));
    }
    let mut text = format!("evicted {removed} refs\n");
    let (manifests, blobs, freed) = match gc(app).await {
        Ok(r) => {
            text.push_str(&r.text);
            let t = r
                .evictions
                .iter()
                .fold((0, 0), |(m, b), e| (m + e.manifests, b + e.blobs));
            (t.0, t.1, r.freed_bytes)
        }
        // Another replica collects: it removes the bytes on its next pass.
        Err(e) if e.kind == ErrorKind::Conflict => {
            text.push_str(&format!("{}\n", e.message));
            (0, 0, 0)
        }
        Err(e) => return Err(e),
    };
    Ok(api::EvictResponse {
        tags: removed,
        manifests,
        blobs,
        freed_bytes: freed,
        text,
    })
}

pub struct AdminService {
    pub app: Arc<App>,
    pub gate: crate::grpc::Gate,
}

fn err(e: Error) -> Status {
    if e.kind == ErrorKind::Conflict {
        return Status::failed_precondition(e.message);
    }
    crate::containerd::status(e)
}

#[tonic::async_trait]
impl api::admin_server::Admin for AdminService {
    async fn stats(
        &self,
        req: Request<api::StatsRequest>,
    ) -> std::result::Result<Response<api::StatsResponse>, Status> {
        self.gate
            .check(&req, Front::Admin, None, crate::auth::READ)?;
        // A walk of the whole index: on the blocking pool.
        let (app, prefix) = (self.app.clone(), req.into_inner().prefix);
        Ok(Response::new(blocking(move || stats(&app, &prefix)).await))
    }

    async fn list_refs(
        &self,
        req: Request<api::ListRefsRequest>,
    ) -> std::result::Result<Response<api::ListRefsResponse>, Status> {
        self.gate
            .check(&req, Front::Admin, None, crate::auth::READ)?;
        let (app, r) = (self.app.clone(), req.into_inner());
        Ok(Response::new(
            blocking(move || list_refs(&app, &r.prefix, r.page_size, &r.page_token)).await,
        ))
    }

    async fn gc(
        &self,
        req: Request<api::GcRequest>,
    ) -> std::result::Result<Response<api::GcResponse>, Status> {
        self.gate
            .check(&req, Front::Admin, None, crate::auth::WRITE)?;
        gc(&self.app).await.map(Response::new).map_err(err)
    }

    async fn verify(
        &self,
        req: Request<api::VerifyRequest>,
    ) -> std::result::Result<Response<api::VerifyResponse>, Status> {
        self.gate
            .check(&req, Front::Admin, None, crate::auth::WRITE)?;
        verify(&self.app, req.get_ref().repair)
            .await
            .map(Response::new)
            .map_err(err)
    }

    async fn evict(
        &self,
        req: Request<api::EvictRequest>,
    ) -> std::result::Result<Response<api::EvictResponse>, Status> {
        self.gate
            .check(&req, Front::Admin, None, crate::auth::DELETE)?;
        evict(&self.app, &req.get_ref().target)
            .await
            .map(Response::new)
            .map_err(err)
    }
}

/// What `hoard admin` asks.
pub enum Command {
    Stats { prefix: String },
    Refs { prefix: String, limit: usize },
    Gc,
    Verify { repair: bool },
    Evict { target: String },
}

/// `hoard admin …`: calls the service over the socket and prints the answer (JSON with
/// `json`). Returns whether the answer was a success (verify: clean).
pub async fn run(socket: &std::path::Path, cmd: Command, json: bool) -> anyhow::Result<bool> {
    let ch = crate::grpc::connect_socket(socket).await?;
    let mut c = api::admin_client::AdminClient::new(ch);
    let show = |v: &dyn erased_json::Show, text: String| {
        if json {
            println!("{}", v.json());
        } else {
            print!("{text}");
        }
    };
    let status = |e: Status| anyhow::anyhow!("{}: {}", e.code(), e.message());
    match cmd {
        Command::Stats { prefix } => {
            let r = c
                .stats(api::StatsRequest { prefix })
                .await
                .map_err(status)?
                .into_inner();
            let mut t = format!(
                "stored {} bytes{} in {} blobs ({} unreferenced); {} repositories, {} manifests, \
                 {} tags; {} uploads in progress\n",
                r.bytes,
                if r.max_bytes > 0 {
                    format!(" of {}", r.max_bytes)
                } else {
                    String::new()
                },
                r.blobs,
                r.unreferenced,
                r.repositories,
                r.manifests,
                r.tags,
                r.uploads
            );
            for f in &r.front_ends {
                t.push_str(&format!(
                    "{:<9} hits {:>8}  misses {:>8}\n",
                    f.front_end, f.hits, f.misses
                ));
            }
            for s in &r.repositories_stats {
                t.push_str(&format!(
                    "{:>14} bytes  {:>5} tags  {:>5} manifests  {:>6} blobs  {:>6} pulls  {}\n",
                    s.bytes, s.tags, s.manifests, s.blobs, s.pulls, s.name
                ));
            }
            show(&r, t);
        }
        Command::Refs { prefix, limit } => {
            let mut token = String::new();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_refs(api::ListRefsRequest {
                        prefix: prefix.clone(),
                        page_size: 500,
                        page_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(r.refs);
                if r.next_page_token.is_empty() || (limit > 0 && all.len() >= limit) {
                    break;
                }
                token = r.next_page_token;
            }
            if limit > 0 {
                all.truncate(limit);
            }
            let t: String = all
                .iter()
                .map(|r| format!("{}:{}\t{}\t{}\n", r.repository, r.tag, r.digest, r.size))
                .collect();
            let resp = api::ListRefsResponse {
                refs: all,
                next_page_token: String::new(),
            };
            show(&resp, t);
        }
        Command::Gc => {
            let r = c.gc(api::GcRequest {}).await.map_err(status)?.into_inner();
            show(&r, r.text.clone());
        }
        Command::Verify { repair } => {
            let r = c
                .verify(api::VerifyRequest { repair })
                .await
                .map_err(status)?
                .into_inner();
            show(&r, r.text.clone());
            return Ok(r.clean || r.repaired);
        }
        Command::Evict { target } => {
            let r = c
                .evict(api::EvictRequest { target })
                .await
                .map_err(status)?
                .into_inner();
            show(&r, r.text.clone());
        }
    }
    Ok(true)
}

mod erased_json {
    pub trait Show {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Show for T {
        fn json(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_default()
        }
    }
}
