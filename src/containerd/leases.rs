//! containerd's leases (`containerd.services.leases.v1.Leases`): a lease holds the content it
//! lists (and what is written under it, via the `containerd-lease` header) for as long as it
//! lives. A lease is refs in `containerd/<view>/leases/<namespace>`: tag `<key>` (the first 16
//! hex digits of its id's sha256) carries its id, labels, creation time and the resources that
//! are not stored content (snapshots, ingests, content not written yet) in its annotations, and
//! one tag `<key>-<digest hex>` per stored blob it holds, so the lifecycle treats leased content
//! as reached from a root, like a tag's, and adding a blob to a lease costs one small ref.
//!
//! `containerd.io/gc.expire` is an absolute time the *client* computed; hoard removes the lease
//! once its own cache clock is past that time plus the clock-skew tolerance, so a client whose
//! clock runs ahead cannot make hoard drop content early by more than the tolerance allows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::filters::{Fields, Filters};
use super::{check_labels, status, timestamp, Content, Scope};
use crate::clock::Millis;
use crate::digest::Digest;
use crate::error::{Error, Result, What};
use crate::names::{Reference, RepoName, Tag};
use crate::proto::leases as api;
use crate::registry::refs::FileRef;

const LEASE_TYPE: &str = "application/vnd.hoard.containerd.lease.v1";
const ID: &str = "org.hoard.lease.id";
const LABELS: &str = "org.hoard.lease.labels";
const CREATED: &str = "org.hoard.lease.created";
const RESOURCES: &str = "org.hoard.lease.resources";
pub const EXPIRE_LABEL: &str = "containerd.io/gc.expire";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Resource {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Resource {
    pub fn content(d: Digest) -> Resource {
        Resource {
            id: d.to_string(),
            kind: "content".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub id: String,
    pub created: Millis,
    pub labels: BTreeMap<String, String>,
    pub resources: Vec<Resource>,
}

impl Lease {
    fn api(&self) -> api::Lease {
        api::Lease {
            id: self.id.clone(),
            created_at: Some(timestamp(self.created)),
            labels: self.labels.clone().into_iter().collect(),
        }
    }

    /// When the lease expires by its label (client time), if it says.
    pub fn expires(&self) -> Option<Millis> {
        self.labels.get(EXPIRE_LABEL).and_then(|t| parse_rfc3339(t))
    }
}

impl Fields for Lease {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.id.clone()),
            [f] if f == "labels" => (!self.labels.is_empty()).then(String::new),
            [f, k] if f == "labels" => self.labels.get(k).cloned(),
            _ => None,
        }
    }
}

pub fn lease_repo(view: &str, namespace: &str) -> Result<RepoName> {
    RepoName::parse(&format!("containerd/{view}/leases/{namespace}"))
}

fn random_id(now: Millis) -> String {
    let mut raw = [0u8; 8];
    if getrandom::getrandom(&mut raw).is_err() {
        raw = now.to_le_bytes();
    }
    format!("{}-{}", now, crate::digest::hex_encode(&raw))
}

/// The tags of one lease: `<key>` for the lease itself, `<key>-<digest hex>` per content it holds.
fn lease_key(id: &str) -> Result<String> {
    if id.is_empty() || id.len() > 256 {
        return Err(Error::invalid(
            What::Parameter,
            "a lease id must be 1 to 256 bytes",
        ));
    }
    Ok(Digest::sha256_of(id.as_bytes()).hex()[..16].to_owned())
}

fn content_tag(key: &str, d: &Digest) -> Result<Tag> {
    Tag::parse(&format!("{key}-{}", d.hex()))
}

/// Whether a tag of a leases repository is a lease's own (`<key>`), not one of the content
/// refs it holds (`<key>-<digest hex>`).
fn is_lease_tag(t: &str) -> bool {
    !t.contains('-')
}

impl Content {
    /// Tags of `repo` starting with `prefix`, with the manifests they name.
    fn tags_from(&self, repo: &RepoName, prefix: &str) -> Vec<(String, Digest)> {
        let state = self.reg.index.read();
        state
            .repos
            .get(repo.as_str())
            .map(|r| {
                r.tags
                    .range(prefix.to_owned()..)
                    .take_while(|(t, _)| t.starts_with(prefix))
                    .map(|(t, d)| (t.clone(), *d))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn lease_read(&self, repo: &RepoName, id: &str) -> Result<Option<Lease>> {
        let key = lease_key(id)?;
        let Some((a, _)) = self.reg.files_ref(repo, &Tag::parse(&key)?).await? else {
            return Ok(None);
        };
        Ok(Some(self.lease_of(repo, &key, &a)))
    }

    /// Writes the lease itself (id, labels, time, resources other than stored content).
    async fn lease_write(&self, repo: &RepoName, lease: &Lease) -> Result<()> {
        let others: Vec<&Resource> = lease
            .resources
            .iter()
            .filter(|r| r.kind != "content")
            .collect();
        let mut a = serde_json::Map::new();
        let json = |v: &dyn erased::Json| v.json();
        a.insert(ID.into(), lease.id.clone().into());
        a.insert(CREATED.into(), lease.created.to_string().into());
        a.insert(LABELS.into(), json(&lease.labels)?.into());
        a.insert(RESOURCES.into(), json(&others)?.into());
        self.reg
            .set_files_ref(
                repo,
                &Tag::parse(&lease_key(&lease.id)?)?,
                LEASE_TYPE,
                "application/octet-stream",
                &[],
                a,
            )
            .await?;
        Ok(())
    }

    /// Whether lease `id` exists in `repo` (its own tag only: cheap).
    async fn lease_exists(&self, repo: &RepoName, key: &str) -> Result<bool> {
        match self
            .reg
            .resolve_manifest(repo, &Reference::Tag(Tag::parse(key)?))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `NotFound` unless lease `id` exists in the request's namespace.
    pub async fn lease_check(&self, scope: &Scope, id: &str) -> Result<()> {
        let repo = lease_repo(&scope.view, scope.ns())?;
        if self.lease_exists(&repo, &lease_key(id)?).await? {
            Ok(())
        } else {
            Err(Error::not_found(format!("lease {id:?} not found")))
        }
    }

    /// The lease `id` of the request's namespace; `NotFound` if there is none.
    pub async fn lease_get(&self, scope: &Scope, id: &str) -> Result<Lease> {
        let repo = lease_repo(&scope.view, scope.ns())?;
        self.lease_read(&repo, id)
            .await?
            .ok_or_else(|| Error::not_found(format!("lease {id:?} not found")))
    }

    /// Creates a lease; `Ok(None)` if one with that id exists.
    pub async fn lease_create(
        &self,
        scope: &Scope,
        id: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Option<Lease>> {
        check_labels(&labels)?;
        let now = self.reg.clock.now_ms();
        let id = id.unwrap_or_else(|| random_id(now));
        let repo = lease_repo(&scope.view, scope.ns())?;
        let _g = self.stripe(&format!("{repo}#{id}")).await;
        if self.lease_read(&repo, &id).await?.is_some() {
            return Ok(None);
        }
        let lease = Lease {
            id,
            created: now,
            labels,
            resources: Vec::new(),
        };
        self.lease_write(&repo, &lease).await?;
        Ok(Some(lease))
    }

    pub async fn lease_delete(&self, scope: &Scope, id: &str) -> Result<()> {
        let repo = lease_repo(&scope.view, scope.ns())?;
        let _g = self.stripe(&format!("{repo}#{id}")).await;
        self.remove_lease(&repo, id).await
    }

    /// Drops what the lease holds, then the lease.
    async fn remove_lease(&self, repo: &RepoName, id: &str) -> Result<()> {
        let key = lease_key(id)?;
        let meta = Tag::parse(&key)?;
        if self.reg.files_ref(repo, &meta).await?.is_none() {
            return Err(Error::not_found(format!("lease {id:?} not found")));
        }
        for (t, _) in self.tags_from(repo, &format!("{key}-")) {
            match self
                .reg
                .delete_manifest(repo, &Reference::Tag(Tag::parse(&t)?))
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        self.reg
            .delete_manifest(repo, &Reference::Tag(meta))
            .await
            .map_err(|e| {
                if e.is_not_found() {
                    Error::not_found(format!("lease {id:?} not found"))
                } else {
                    e
                }
            })
    }

    pub async fn lease_list(&self, scope: &Scope, filters: &Filters) -> Result<Vec<Lease>> {
        let repo = lease_repo(&scope.view, scope.ns())?;
        self.leases_in(&repo, filters).await
    }

    /// The leases of `repo`, read without refreshing their last access (listing leases is not
    /// using them).
    async fn leases_in(&self, repo: &RepoName, filters: &Filters) -> Result<Vec<Lease>> {
        let mut out = Vec::new();
        for (key, manifest) in self.tags_from(repo, "") {
            if !is_lease_tag(&key) {
                continue;
            }
            let Some(a) = self.quiet_annotations(&manifest).await? else {
                continue;
            };
            let l = self.lease_of(repo, &key, &a);
            if filters.matches(&l) {
                out.push(l);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// A lease manifest's annotations, read without counting as use; `None` if it is gone
    /// meanwhile (deleted, expired) or unreadable.
    async fn quiet_annotations(
        &self,
        manifest: &Digest,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        let bytes = match self.reg.read_small(manifest, 1 << 20).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        #[derive(serde::Deserialize)]
        struct Meta {
            #[serde(default)]
            annotations: serde_json::Map<String, serde_json::Value>,
        }
        Ok(serde_json::from_slice::<Meta>(&bytes)
            .ok()
            .map(|m| m.annotations))
    }

    /// A lease from its own ref's annotations and its content refs.
    fn lease_of(
        &self,
        repo: &RepoName,
        key: &str,
        a: &serde_json::Map<String, serde_json::Value>,
    ) -> Lease {
        let s = |k: &str| a.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        let mut resources: Vec<Resource> = serde_json::from_str(s(RESOURCES)).unwrap_or_default();
        for (t, _) in self.tags_from(repo, &format!("{key}-")) {
            if let Some(hex) = t.strip_prefix(&format!("{key}-")) {
                resources.push(Resource {
                    id: format!("sha256:{hex}"),
                    kind: "content".into(),
                });
            }
        }
        resources.sort();
        Lease {
            id: s(ID).to_owned(),
            created: s(CREATED).parse().unwrap_or(0),
            labels: serde_json::from_str(s(LABELS)).unwrap_or_default(),
            resources,
        }
    }

    /// Adds `r` to lease `id` (nothing if it is there already). Stored content becomes a ref of
    /// its own; content not stored (yet) and other resources are listed with the lease.
    pub async fn lease_add(&self, scope: &Scope, id: &str, r: Resource) -> Result<()> {
        let repo = lease_repo(&scope.view, scope.ns())?;
        let _g = self.stripe(&format!("{repo}#{id}")).await;
        let key = lease_key(id)?;
        if !self.lease_exists(&repo, &key).await? {
            return Err(Error::not_found(format!("lease {id:?} not found")));
        }
        if r.kind == "content" {
            let d: Digest = r.id.parse()?;
            let _pin = self.reg.life.pins.pin(d);
            if self.reg.mount(&repo, &d, None).await? {
                if let Some(size) = self.stored_size(&d).await? {
                    let tag = content_tag(&key, &d)?;
                    if self.reg.file_ref(&repo, &tag).await?.is_none() {
                        self.reg
                            .set_file_ref(
                                &repo,
                                &tag,
                                LEASE_TYPE,
                                "application/octet-stream",
                                FileRef {
                                    digest: d,
                                    size,
                                    annotations: Default::default(),
                                },
                            )
                            .await?;
                    }
                    return Ok(());
                }
            }
        }
        let Some((a, _)) = self.reg.files_ref(&repo, &Tag::parse(&key)?).await? else {
            return Err(Error::not_found(format!("lease {id:?} not found")));
        };
        let mut others: Vec<Resource> = a
            .get(RESOURCES)
            .and_then(|v| v.as_str())
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if others.contains(&r) {
            return Ok(());
        }
        others.push(r);
        others.sort();
        let mut lease = self
            .lease_read(&repo, id)
            .await?
            .ok_or_else(|| Error::not_found(format!("lease {id:?} not found")))?;
        lease.resources = others;
        self.lease_write(&repo, &lease).await
    }

    pub async fn lease_remove(&self, scope: &Scope, id: &str, r: &Resource) -> Result<()> {
        let repo = lease_repo(&scope.view, scope.ns())?;
        let _g = self.stripe(&format!("{repo}#{id}")).await;
        let key = lease_key(id)?;
        let mut lease = self
            .lease_read(&repo, id)
            .await?
            .ok_or_else(|| Error::not_found(format!("lease {id:?} not found")))?;
        if r.kind == "content" {
            if let Ok(d) = r.id.parse::<Digest>() {
                match self
                    .reg
                    .delete_manifest(&repo, &Reference::Tag(content_tag(&key, &d)?))
                    .await
                {
                    Ok(()) => return Ok(()),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let before = lease.resources.len();
        lease.resources.retain(|x| x != r);
        if lease.resources.len() != before {
            self.lease_write(&repo, &lease).await?;
        }
        Ok(())
    }

    /// Removes every lease whose `containerd.io/gc.expire` lies further in the past than the
    /// skew tolerance, by the cache clock. Returns how many went. A lease's manifest is read
    /// only when it is new or changed (its digest is remembered with what it said).
    pub async fn expire_leases(&self) -> Result<usize> {
        // Every lease's own ref: (repository, key, manifest).
        let metas: Vec<(String, String, Digest)> = {
            let state = self.reg.index.read();
            state
                .repos
                .range("containerd/".to_owned()..)
                .take_while(|(k, _)| k.starts_with("containerd/"))
                .filter(|(k, _)| k.contains("/leases/"))
                .flat_map(|(k, r)| {
                    r.tags
                        .iter()
                        .filter(|(t, _)| is_lease_tag(t))
                        .map(move |(t, d)| (k.clone(), t.clone(), *d))
                })
                .collect()
        };
        let known: Vec<Option<(String, Option<Millis>)>> = {
            let cache = self.expiries.lock().unwrap_or_else(|e| e.into_inner());
            metas
                .iter()
                .map(|(_, _, d)| cache.get(d).cloned())
                .collect()
        };
        let mut seen = HashMap::with_capacity(metas.len());
        let now = self.reg.clock.now_ms();
        let mut due = Vec::new();
        for ((name, key, manifest), known) in metas.into_iter().zip(known) {
            let (id, exp) = match known {
                Some(k) => k,
                None => {
                    let repo = RepoName::parse(&name)?;
                    let Some(a) = self.quiet_annotations(&manifest).await? else {
                        continue;
                    };
                    let l = self.lease_of(&repo, &key, &a);
                    (l.id.clone(), l.expires())
                }
            };
            if let Some(exp) = exp {
                if now > exp.saturating_add(self.skew) {
                    due.push((name.clone(), key.clone(), manifest, id.clone()));
                }
            }
            seen.insert(manifest, (id, exp));
        }
        // What is not a lease's manifest any more is forgotten.
        *self.expiries.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        let mut n = 0;
        for (name, key, manifest, id) in due {
            let repo = RepoName::parse(&name)?;
            let _g = self.stripe(&format!("{repo}#{id}")).await;
            // Only the lease that was judged: one deleted and made again meanwhile is new.
            let same = self
                .reg
                .index
                .read()
                .repos
                .get(&name)
                .and_then(|r| r.tags.get(&key))
                == Some(&manifest);
            if !same {
                continue;
            }
            match self.remove_lease(&repo, &id).await {
                Ok(()) => {
                    tracing::info!(repository = %repo, lease = %id, "lease expired");
                    n += 1;
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// JSON text of a value, for an annotation.
mod erased {
    use crate::error::{Error, Result};
    pub trait Json {
        fn json(&self) -> Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Result<String> {
            serde_json::to_string(self).map_err(|e| Error::internal(e.to_string()))
        }
    }
}

/// Parses an RFC 3339 time (`2026-12-06T10:00:00Z`, `…T10:00:00.123+01:00`) to milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        let frac = s.get(start..i)?;
        if frac.is_empty() {
            return None;
        }
        let first3: String = frac.chars().chain("000".chars()).take(3).collect();
        ms = first3.parse().ok()?;
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let v = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *c == b'-' {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    // Days from the civil date (proleptic Gregorian).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    Some(secs * 1000 + ms)
}

/// The gRPC service, one per listener.
pub struct LeasesService {
    pub core: Arc<Content>,
    pub view: String,
    pub gate: crate::grpc::Gate,
}

impl LeasesService {
    fn scope<T>(&self, req: &Request<T>, action: u8) -> std::result::Result<Scope, Status> {
        Scope::checked(&self.view, &self.gate, req, action)
    }
}

fn resource_arg(r: Option<api::Resource>) -> std::result::Result<Resource, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("resource is required"))?;
    if r.id.is_empty() || r.r#type.is_empty() {
        return Err(Status::invalid_argument(
            "resource id and type are required",
        ));
    }
    if r.r#type == "content" {
        r.id.parse::<Digest>().map_err(status)?;
    }
    Ok(Resource {
        id: r.id,
        kind: r.r#type,
    })
}

#[tonic::async_trait]
impl api::leases_server::Leases for LeasesService {
    async fn create(
        &self,
        req: Request<api::CreateRequest>,
    ) -> std::result::Result<Response<api::CreateResponse>, Status> {
        let scope = self.scope(&req, crate::auth::WRITE)?;
        let r = req.into_inner();
        let id = (!r.id.is_empty()).then_some(r.id);
        let wanted = id.clone();
        match self
            .core
            .lease_create(&scope, id, r.labels.into_iter().collect())
            .await
            .map_err(status)?
        {
            Some(l) => Ok(Response::new(api::CreateResponse {
                lease: Some(l.api()),
            })),
            None => Err(Status::already_exists(format!(
                "lease {:?}: already exists",
                wanted.unwrap_or_default()
            ))),
        }
    }

    async fn delete(
        &self,
        req: Request<api::DeleteRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let scope = self.scope(&req, crate::auth::DELETE)?;
        self.core
            .lease_delete(&scope, &req.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn list(
        &self,
        req: Request<api::ListRequest>,
    ) -> std::result::Result<Response<api::ListResponse>, Status> {
        let scope = self.scope(&req, crate::auth::READ)?;
        let filters = Filters::parse(&req.get_ref().filters).map_err(status)?;
        let leases = self
            .core
            .lease_list(&scope, &filters)
            .await
            .map_err(status)?;
        Ok(Response::new(api::ListResponse {
            leases: leases.iter().map(Lease::api).collect(),
        }))
    }

    async fn add_resource(
        &self,
        req: Request<api::AddResourceRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let scope = self.scope(&req, crate::auth::WRITE)?;
        let r = req.into_inner();
        let res = resource_arg(r.resource)?;
        self.core
            .lease_add(&scope, &r.id, res)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn delete_resource(
        &self,
        req: Request<api::DeleteResourceRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let scope = self.scope(&req, crate::auth::WRITE)?;
        let r = req.into_inner();
        let res = resource_arg(r.resource)?;
        self.core
            .lease_remove(&scope, &r.id, &res)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn list_resources(
        &self,
        req: Request<api::ListResourcesRequest>,
    ) -> std::result::Result<Response<api::ListResourcesResponse>, Status> {
        let scope = self.scope(&req, crate::auth::READ)?;
        let l = self
            .core
            .lease_get(&scope, &req.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(api::ListResourcesResponse {
            resources: l
                .resources
                .into_iter()
                .map(|r| api::Resource {
                    id: r.id,
                    r#type: r.kind,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-12-06T10:00:00Z"),
            Some(1_796_551_200_000)
        );
        assert_eq!(
            parse_rfc3339("2026-12-06T10:00:00.123456789-00:30"),
            Some(1_796_551_200_000 + 1_800_000 + 123)
        );
        assert_eq!(parse_rfc3339("2026-13-06T10:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2026-12-06T10:00:00"), None);
    }
}
