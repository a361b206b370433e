//! Manifests and tags: parse just enough of a pushed manifest to know what it references, refuse
//! it if a referenced blob is missing (so no tag ever dangles), store its bytes exactly, and
//! answer tag lists and referrers from the index.

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;

use super::{paginate, Registry};
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, ErrorKind, Result, What};
use crate::lifecycle::index::{ManifestMeta, Op};
use crate::lifecycle::shared::TagValue;
use crate::names::{Reference, RepoName, Tag};

/// Largest manifest accepted (distribution's default; BuildKit reads at most 1 MiB anyway).
pub const MAX_MANIFEST: usize = 4 << 20;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn is_manifest_type(mt: &str) -> bool {
    matches!(mt, OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST)
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<i64>,
    #[serde(default)]
    urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Parsed {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<i64>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    /// The withdrawn OCI artifact manifest's list; harmless to understand.
    #[serde(default)]
    blobs: Option<Vec<Descriptor>>,
    #[serde(default)]
    subject: Option<Descriptor>,
    #[serde(default)]
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(What::Manifest, msg)
}

/// A referenced digest and what the manifest says of it.
struct Child {
    digest: Digest,
    size: Option<i64>,
    /// Must exist before the manifest is accepted.
    required: bool,
    /// Points at a manifest (an index's child) rather than a blob.
    manifest: bool,
}

fn parse_desc(d: &Descriptor, field: &str) -> Result<(Digest, Option<i64>)> {
    let digest: Digest = d
        .digest
        .parse()
        .map_err(|e: Error| invalid(format!("{field}: {}", e.message)))?;
    if let Some(s) = d.size {
        if s < 0 {
            return Err(invalid(format!("{field}: negative size {s}")));
        }
    }
    Ok((digest, d.size))
}

pub struct PutManifest<'a> {
    pub repo: &'a RepoName,
    pub reference: &'a Reference,
    pub content_type: Option<&'a str>,
    pub body: Bytes,
    /// OCI 1.1 `?tag=` parameters on a push by digest.
    pub extra_tags: &'a [Tag],
}

pub struct Stored {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

impl Registry {
    pub async fn put_manifest(&self, req: PutManifest<'_>) -> Result<Stored> {
        let body = req.body;
        if body.len() > MAX_MANIFEST {
            return Err(invalid(format!(
                "manifest is {} bytes, over the {} byte limit",
                body.len(),
                MAX_MANIFEST
            )));
        }
        let alg = match req.reference {
            Reference::Digest(d) => d.algorithm(),
            Reference::Tag(_) => Algorithm::Sha256,
        };
        let digest = Digest::of(alg, &body);
        if let Reference::Digest(d) = req.reference {
            if *d != digest {
                return Err(Error::new(
                    ErrorKind::DigestMismatch,
                    format!(
                        "manifest content hashes to {digest}, not to the digest in the URL ({d})"
                    ),
                ));
            }
        }
        let parsed: Parsed = serde_json::from_slice(&body)
            .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
        if parsed.schema_version != Some(2) {
            return Err(invalid(format!(
                "unsupported schemaVersion {:?}: only schema 2 manifests (OCI, Docker v2) are accepted",
                parsed.schema_version
            )));
        }
        let content_type = req
            .content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| !c.is_empty());
        if let (Some(ct), Some(mt)) = (content_type, parsed.media_type.as_deref()) {
            if ct != mt && is_manifest_type(ct) {
                return Err(invalid(format!(
                    "Content-Type {ct} does not match the manifest's mediaType {mt}"
                )));
            }
        }
        let media_type = content_type
            .filter(|c| is_manifest_type(c) || parsed.media_type.is_none())
            .or(parsed.media_type.as_deref())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                if parsed.manifests.is_some() {
                    OCI_INDEX.to_owned()
                } else {
                    OCI_MANIFEST.to_owned()
                }
            });

        let mut children = Vec::new();
        if let Some(c) = &parsed.config {
            let (digest, size) = parse_desc(c, "config")?;
            children.push(Child {
                digest,
                size,
                required: true,
                manifest: false,
            });
        }
        for (field, list) in [("layers", &parsed.layers), ("blobs", &parsed.blobs)] {
            for l in list.iter().flatten() {
                let (digest, size) = parse_desc(l, field)?;
                // Non-distributable layers are fetched from their URLs, not from a registry.
                let foreign = l.urls.as_ref().is_some_and(|u| !u.is_empty());
                children.push(Child {
                    digest,
                    size,
                    required: !foreign,
                    manifest: false,
                });
            }
        }
        for m in parsed.manifests.iter().flatten() {
            let (digest, size) = parse_desc(m, "manifests")?;
            // Every child must be here, as a manifest or as a blob: a BuildKit cache index
            // lists its layers and cache config as entries (blobs), an image index its
            // platforms' manifests. An index naming content that is not stored would give a tag
            // that cannot be pulled.
            let manifest = m.media_type.as_deref().is_some_and(is_manifest_type);
            children.push(Child {
                digest,
                size,
                required: true,
                manifest,
            });
        }
        let subject = match &parsed.subject {
            Some(s) => Some(parse_desc(s, "subject")?.0),
            None => None,
        };
        let artifact_type = parsed.artifact_type.clone().or_else(|| {
            // For an image manifest the config's media type stands in (referrers filtering).
            parsed
                .config
                .as_ref()
                .filter(|_| subject.is_some())
                .and_then(|c| c.media_type.clone())
        });
        let annotations = parsed
            .annotations
            .as_ref()
            .filter(|a| !a.is_empty())
            .and_then(|a| serde_json::to_string(a).ok());

        // Fail fast before writing bytes; checked again atomically with the commit below.
        self.check_children(req.repo, &children).await?;
        let mut tags: Vec<&Tag> = req.extra_tags.iter().collect();
        if let Reference::Tag(t) = req.reference {
            tags.push(t);
        }
        let repo = req.repo.to_string();
        // `now`: after the manifest's own bytes are stored, so that they count as claimed by
        // this push and no later (else orphan grace would shelter them once superseded).
        let meta_for = |state: &crate::lifecycle::index::State, now| -> Result<ManifestMeta> {
            let r = state.repos.get(&repo);
            let mut kept = Vec::with_capacity(children.len());
            for c in &children {
                let present =
                    state.blobs.contains_key(&c.digest) && r.is_some_and(|r| child_visible(r, c));
                if present {
                    if !kept.contains(&c.digest) {
                        kept.push(c.digest);
                    }
                } else if c.required {
                    return Err(blob_unknown(&c.digest));
                }
            }
            Ok(ManifestMeta {
                size: body.len() as u64,
                media_type: media_type.clone(),
                pushed: now,
                subject,
                artifact_type: artifact_type.clone(),
                annotations: annotations.clone(),
                children: kept,
                access: crate::lifecycle::index::Stamp::new(now),
                rooted: false,
            })
        };
        if let Some(s) = self.shared.clone() {
            // The claim handshake (lifecycle/shared.rs): claim, write, wait out announced
            // collections, check the bucket holds every child, then commit record and tags.
            let meta = meta_for(&self.index.read(), self.clock.now_ms())?;
            let mut digests = vec![digest];
            digests.extend(meta.children.iter().copied());
            let mut manifests = vec![(repo.clone(), digest)];
            manifests.extend(
                children
                    .iter()
                    .filter(|c| c.manifest)
                    .map(|c| (repo.clone(), c.digest)),
            );
            let required: Vec<Digest> = children
                .iter()
                .filter(|c| c.required)
                .map(|c| c.digest)
                .collect();
            let child_manifests: Vec<Digest> = children
                .iter()
                .filter(|c| c.manifest && c.required)
                .map(|c| c.digest)
                .collect();
            let mut attempts = 0;
            loop {
                attempts += 1;
                let claim = s.claim(digests.clone()).await?;
                let r = async {
                    self.put_bytes(req.repo, digest, body.clone()).await?;
                    let waited = s.await_clear(&digests, &manifests).await?;
                    if waited {
                        // A collection finished meanwhile: the bytes may have gone with it.
                        self.put_bytes(req.repo, digest, body.clone()).await?;
                    }
                    let missing = s.missing_blobs(required.clone()).await?;
                    if let Some(m) = missing.first() {
                        return Err(blob_unknown(m));
                    }
                    // A collection may also have removed a child manifest's record while its
                    // bytes stay (another repository holds them), one this replica may not have
                    // heard of yet: checked in the bucket, one HEAD per child manifest.
                    if !child_manifests.is_empty() {
                        let gone = s.missing_records(&repo, child_manifests.clone()).await?;
                        if let Some(m) = gone.first() {
                            return Err(blob_unknown(m));
                        }
                    }
                    s.pause("push-before-commit").await;
                    if !claim.fresh() {
                        return Ok(false);
                    }
                    s.put_record(&repo, digest, &meta).await?;
                    // A tag that fails after others were written still leaves a commit that
                    // is visible: it is confirmed below all the same, then the error returned.
                    let mut tag_failed = None;
                    for t in &tags {
                        if let Err(e) = s
                            .set_tag(
                                &repo,
                                t.as_str(),
                                TagValue::new(digest, meta.size, media_type.clone()),
                            )
                            .await
                        {
                            tag_failed = Some(e);
                            break;
                        }
                    }
                    // A DELETE racing this push, or a stall past the claim window: checked
                    // now that the commit is visible.
                    let links: Vec<(Digest, u64)> = {
                        let state = self.index.read();
                        required
                            .iter()
                            .filter_map(|c| Some((*c, state.blobs.get(c)?.size)))
                            .collect()
                    };
                    if !s
                        .confirm_commit(&claim, &repo, digest, &meta, links)
                        .await?
                    {
                        s.await_clear(&digests, &manifests).await?;
                        let mut missing = s.missing_blobs(required.clone()).await?;
                        if !child_manifests.is_empty() {
                            missing
                                .extend(s.missing_records(&repo, child_manifests.clone()).await?);
                        }
                        if let Some(m) = missing.first() {
                            let names = tags.iter().map(|t| t.to_string()).collect();
                            s.undo_push(&repo, digest, names).await?;
                            return Err(blob_unknown(m));
                        }
                    }
                    if let Some(e) = tag_failed {
                        return Err(e);
                    }
                    Ok(true)
                }
                .await;
                s.release(claim);
                match r {
                    Ok(true) => break,
                    Ok(false) if attempts < 3 => continue,
                    Ok(false) => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            "the push took too long between its claim and its commit; retry",
                        ))
                    }
                    Err(e) => return Err(e),
                }
            }
        } else {
            self.put_bytes(req.repo, digest, body.clone()).await?;
        }

        let now = self.clock.now_ms();
        self.index.commit_if(|state| {
            let meta = meta_for(state, now)?;
            let mut ops = vec![Op::ManifestPut {
                repo: repo.clone(),
                digest,
                meta,
            }];
            for t in &tags {
                ops.push(Op::TagSet {
                    repo: repo.clone(),
                    tag: t.to_string(),
                    digest,
                    at: now,
                });
            }
            Ok(ops)
        })?;
        if let Some(s) = &self.shared {
            s.cache_manifest(digest, body.clone());
        }
        self.settle().await?;
        tracing::debug!(repo = %req.repo, digest = %digest, reference = %req.reference, "manifest stored");
        Ok(Stored { digest, subject })
    }

    /// Every required child is stored and visible in `repo` (on a shared bucket, read through
    /// for what the cache lacks), and declared sizes match.
    async fn check_children(&self, repo: &RepoName, children: &[Child]) -> Result<()> {
        if let Some(s) = &self.shared {
            let unknown: Vec<&Child> = {
                let state = self.index.read();
                let r = state.repos.get(repo.as_str());
                children
                    .iter()
                    .filter(|c| {
                        !(state.blobs.contains_key(&c.digest)
                            && r.is_some_and(|r| child_visible(r, c)))
                    })
                    .collect()
            };
            for c in unknown {
                // A child manifest is visible through its record (it is pulled as a manifest);
                // anything else through its link.
                let found = if c.manifest {
                    s.get_manifest(repo.as_str(), c.digest).await?.is_some()
                } else {
                    s.find_link(repo.as_str(), c.digest).await?.is_some()
                };
                if !found && c.required {
                    return Err(blob_unknown(&c.digest));
                }
            }
        }
        let state = self.index.read();
        let r = state.repos.get(repo.as_str());
        for c in children {
            let size = state.blobs.get(&c.digest).map(|b| b.size);
            let visible = r.is_some_and(|r| child_visible(r, c));
            match size {
                Some(actual) if visible => {
                    if let Some(declared) = c.size {
                        if declared as u64 != actual {
                            return Err(invalid(format!(
                                "descriptor for {} declares size {declared}, but the stored {} is {actual} bytes",
                                c.digest,
                                if c.manifest { "manifest" } else { "blob" }
                            )));
                        }
                    }
                }
                _ if c.required => return Err(blob_unknown(&c.digest)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Resolves a tag or digest in `repo` to the manifest's digest and metadata. On a shared
    /// bucket a tag is always read from the bucket (one request: another replica may have moved
    /// it), and a digest the cache lacks is read through.
    /// Whether a manifest may be referenced now (a HEAD by digest): on a shared bucket, not
    /// while a collection is removing it from `repo` (the client pushes it again instead).
    pub async fn manifest_offered(&self, repo: &RepoName, reference: &Reference) -> Result<bool> {
        match (&self.shared, reference) {
            (Some(s), Reference::Digest(d)) => {
                Ok(!s.still_doomed_manifest(repo.as_str(), d).await?)
            }
            _ => Ok(true),
        }
    }

    pub async fn resolve_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, ManifestMeta)> {
        let unknown =
            || Error::not_found(format!("manifest {reference} is not in repository {repo}"));
        let Some(s) = &self.shared else {
            return self.resolve_cached(repo, reference);
        };
        let now = self.clock.now_ms();
        match reference {
            Reference::Tag(t) => {
                let v = match s.get_tag(repo.as_str(), t.as_str()).await {
                    Ok(v) => v.ok_or_else(unknown)?,
                    Err(e) if e.kind == ErrorKind::Unavailable => {
                        // S3 unreachable: the tag as this replica last saw it (stale beats a
                        // failed build; a disk tier may still hold the content).
                        return match self.resolve_cached(repo, reference) {
                            Ok(r) => {
                                tracing::debug!(repo = %repo, reference = %reference, "S3 unreachable: answering from the cached tag");
                                Ok(r)
                            }
                            Err(_) => Err(e),
                        };
                    }
                    Err(e) => return Err(e),
                };
                let state = self.index.read();
                let cached = state
                    .repos
                    .get(repo.as_str())
                    .and_then(|r| r.manifests.get(&v.digest));
                let meta = match cached {
                    Some(m) => {
                        self.index
                            .touch_manifest(&state, repo.as_str(), &v.digest, now);
                        m.clone()
                    }
                    None => {
                        s.note_manifest_read(repo.as_str(), v.digest, now);
                        ManifestMeta {
                            size: v.size,
                            media_type: v.media_type.clone(),
                            pushed: now,
                            access: crate::lifecycle::index::Stamp::new(now),
                            ..ManifestMeta::default()
                        }
                    }
                };
                Ok((v.digest, meta))
            }
            Reference::Digest(d) => {
                match self.resolve_cached(repo, reference) {
                    Err(e) if e.is_not_found() => {}
                    r => return r,
                }
                let meta = s
                    .get_manifest(repo.as_str(), *d)
                    .await?
                    .ok_or_else(unknown)?;
                let state = self.index.read();
                self.index.touch_manifest(&state, repo.as_str(), d, now);
                Ok((*d, meta))
            }
        }
    }

    fn resolve_cached(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, ManifestMeta)> {
        let state = self.index.read();
        let unknown =
            || Error::not_found(format!("manifest {reference} is not in repository {repo}"));
        let r = state.repos.get(repo.as_str()).ok_or_else(unknown)?;
        let digest = match reference {
            Reference::Digest(d) => *d,
            Reference::Tag(t) => *r.tags.get(t.as_str()).ok_or_else(unknown)?,
        };
        let meta = r.manifests.get(&digest).ok_or_else(unknown)?;
        // A pull by tag or digest keeps the manifest, and so its tags, young.
        self.index
            .touch_manifest(&state, repo.as_str(), &digest, self.clock.now_ms());
        Ok((digest, meta.clone()))
    }

    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, ManifestMeta, Bytes)> {
        let (digest, meta) = self.resolve_manifest(repo, reference).await?;
        if let Some(b) = self
            .shared
            .as_ref()
            .and_then(|s| s.cached_manifest(&digest))
        {
            return Ok((digest, meta, b));
        }
        let bytes = match self.read_small(&digest, MAX_MANIFEST as u64 + 1).await {
            Ok(b) => b,
            Err(e) => {
                if let (true, Some(s)) = (e.is_not_found(), &self.shared) {
                    s.forget(&[(repo.to_string(), digest)], &[digest])?;
                }
                return Err(e);
            }
        };
        if let Some(s) = &self.shared {
            s.cache_manifest(digest, bytes.clone());
        }
        Ok((digest, meta, bytes))
    }

    /// By tag: removes the tag only. By digest: removes the manifest and every tag on it.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let Some(s) = &self.shared else {
            return self
                .index
                .commit_if(|state| plan_delete_manifest(state, repo, reference));
        };
        // Judged on the repository as the bucket has it now.
        s.refresh_repo(repo.as_str()).await?;
        let ops = plan_delete_manifest(&self.index.read(), repo, reference)?;
        match reference {
            Reference::Tag(t) => {
                if !s.delete_tag(repo.as_str(), t.as_str(), None).await? {
                    return Err(Error::not_found(format!(
                        "manifest {reference} is not in repository {repo}"
                    )));
                }
            }
            Reference::Digest(d) => {
                let tags: Vec<String> = {
                    let state = self.index.read();
                    state.repos.get(repo.as_str()).map_or(Vec::new(), |r| {
                        r.tags
                            .iter()
                            .filter(|(_, t)| *t == d)
                            .map(|(name, _)| name.clone())
                            .collect()
                    })
                };
                let meta = {
                    let state = self.index.read();
                    state
                        .repos
                        .get(repo.as_str())
                        .and_then(|r| r.manifests.get(d))
                        .cloned()
                };
                s.pause("delete-before-tags").await;
                for t in tags {
                    s.delete_tag(repo.as_str(), &t, Some(*d)).await?;
                }
                s.delete_record(repo.as_str(), *d).await?;
                // A push of the same manifest may have tagged it meanwhile: then it stays (as
                // if the push came after this delete), its record written back.
                s.refresh_repo(repo.as_str()).await?;
                if let (true, Some(meta)) = (s.tagged(repo.as_str(), d), meta) {
                    s.put_record(repo.as_str(), *d, &meta).await?;
                    s.refresh_repo(repo.as_str()).await?;
                    return Ok(());
                }
            }
        }
        self.index.commit(ops)
    }

    /// Tags of `repo` in lexical order after `last`, at most `n`; `None` if the repository is
    /// unknown.
    pub async fn tags(
        &self,
        repo: &RepoName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<(Vec<String>, bool)> {
        let unknown = || Error::not_found(format!("repository {repo} is not known"));
        if let Some(s) = &self.shared {
            s.refresh_repo(repo.as_str()).await?;
            let known = self.index.read().repos.contains_key(repo.as_str());
            if !known {
                if s.repo_known(repo.as_str()).await? {
                    return Ok((Vec::new(), false));
                }
                return Err(unknown());
            }
        }
        let state = self.index.read();
        let r = state.repos.get(repo.as_str()).ok_or_else(unknown)?;
        Ok(paginate(r.tags.keys().map(String::as_str), n, last))
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<serde_json::Value>> {
        if let Some(s) = &self.shared {
            s.refresh_repo(repo.as_str()).await?;
        }
        Ok(self.referrers_cached(repo, subject, artifact_type))
    }

    fn referrers_cached(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Vec<serde_json::Value> {
        let state = self.index.read();
        let Some(r) = state.repos.get(repo.as_str()) else {
            return Vec::new();
        };
        let mut out: Vec<(&Digest, &ManifestMeta)> = r
            .manifests
            .iter()
            .filter(|(_, m)| m.subject.as_ref() == Some(subject))
            .filter(|(_, m)| artifact_type.is_none() || m.artifact_type.as_deref() == artifact_type)
            .collect();
        out.sort_by_key(|(d, _)| **d);
        out.into_iter()
            .map(|(d, m)| {
                let mut desc = serde_json::Map::new();
                desc.insert("mediaType".into(), m.media_type.clone().into());
                desc.insert("digest".into(), d.to_string().into());
                desc.insert("size".into(), m.size.into());
                if let Some(at) = &m.artifact_type {
                    desc.insert("artifactType".into(), at.clone().into());
                }
                if let Some(a) = m.annotations.as_deref().and_then(|a| {
                    serde_json::from_str::<HashMap<String, serde_json::Value>>(a).ok()
                }) {
                    desc.insert(
                        "annotations".into(),
                        serde_json::to_value(a).unwrap_or_default(),
                    );
                }
                serde_json::Value::Object(desc)
            })
            .collect()
    }
}

/// A child of a manifest is there for a reader of `r`: a child whose descriptor says it is a
/// manifest is pulled as one, so its record must be in the repository; any other (a layer, a
/// config, a BuildKit cache index's entries) as a blob, pushed, mounted or stored as a manifest.
fn child_visible(r: &crate::lifecycle::index::Repo, c: &Child) -> bool {
    r.manifests.contains_key(&c.digest) || (!c.manifest && r.blobs.contains(&c.digest))
}

fn blob_unknown(d: &Digest) -> Error {
    Error::not_found(format!(
        "manifest references {d}, which is stored in this repository neither as a manifest nor \
         as a blob: push it first"
    ))
}

/// The records deleting `reference` from `repo` takes, or why it may not go: by tag, the tag;
/// by digest, the manifest and its tags, refused while an index of the repository lists it.
fn plan_delete_manifest(
    state: &crate::lifecycle::index::State,
    repo: &RepoName,
    reference: &Reference,
) -> Result<Vec<Op>> {
    let name = repo.to_string();
    let unknown = || Error::not_found(format!("manifest {reference} is not in repository {repo}"));
    let r = state.repos.get(&name).ok_or_else(unknown)?;
    match reference {
        Reference::Tag(t) => {
            if !r.tags.contains_key(t.as_str()) {
                return Err(unknown());
            }
            Ok(vec![Op::TagDeleted {
                repo: name.clone(),
                tag: t.to_string(),
            }])
        }
        Reference::Digest(d) => {
            if !r.manifests.contains_key(d) {
                return Err(unknown());
            }
            // An index of this repository lists it: deleting it would break that index's pull
            // for this platform. (A referrer's subject may go: the referrers API allows a
            // subject that is gone.)
            if let Some(holder) = r.holder_of(d) {
                return Err(Error::in_use(format!(
                    "manifest {d} is still listed by {holder} in repository {repo}; \
                     delete that index first"
                )));
            }
            Ok(vec![Op::ManifestDeleted {
                repo: name.clone(),
                digest: *d,
            }])
        }
    }
}
