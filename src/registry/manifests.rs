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
        self.check_children(req.repo, &children)?;
        self.put_bytes(req.repo, digest, body.clone()).await?;

        let now = self.clock.now_ms();
        let mut tags: Vec<&Tag> = req.extra_tags.iter().collect();
        if let Reference::Tag(t) = req.reference {
            tags.push(t);
        }
        let repo = req.repo.to_string();
        self.index.commit_if(|state| {
            let r = state.repos.get(&repo);
            let mut kept = Vec::with_capacity(children.len());
            for c in &children {
                let present = state.blobs.contains_key(&c.digest)
                    && r.is_some_and(|r| {
                        r.blobs.contains(&c.digest) || r.manifests.contains_key(&c.digest)
                    });
                if present {
                    if !kept.contains(&c.digest) {
                        kept.push(c.digest);
                    }
                } else if c.required {
                    return Err(blob_unknown(&c.digest));
                }
            }
            let meta = ManifestMeta {
                size: body.len() as u64,
                media_type: media_type.clone(),
                pushed: now,
                subject,
                artifact_type: artifact_type.clone(),
                annotations: annotations.clone(),
                children: kept,
                access: crate::lifecycle::index::Stamp::new(now),
                rooted: false,
            };
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
        self.settle().await?;
        tracing::debug!(repo = %req.repo, digest = %digest, reference = %req.reference, "manifest stored");
        Ok(Stored { digest, subject })
    }

    fn check_children(&self, repo: &RepoName, children: &[Child]) -> Result<()> {
        let state = self.index.read();
        let r = state.repos.get(repo.as_str());
        for c in children {
            let size = state.blobs.get(&c.digest).map(|b| b.size);
            let visible = r.is_some_and(|r| {
                r.blobs.contains(&c.digest) || r.manifests.contains_key(&c.digest)
            });
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

    /// Resolves a tag or digest in `repo` to the manifest's digest and metadata.
    pub fn resolve_manifest(
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
        let (digest, meta) = self.resolve_manifest(repo, reference)?;
        let bytes = self.read_small(&digest, MAX_MANIFEST as u64 + 1).await?;
        Ok((digest, meta, bytes))
    }

    /// By tag: removes the tag only. By digest: removes the manifest and every tag on it.
    pub fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let name = repo.to_string();
        self.index.commit_if(|state| {
            let unknown =
                || Error::not_found(format!("manifest {reference} is not in repository {repo}"));
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
                    // An index of this repository lists it: deleting it would break that
                    // index's pull for this platform. (A referrer's subject may go: the
                    // referrers API allows a subject that is gone.)
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
        })
    }

    /// Tags of `repo` in lexical order after `last`, at most `n`; `None` if the repository is
    /// unknown.
    pub fn tags(
        &self,
        repo: &RepoName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<(Vec<String>, bool)> {
        let state = self.index.read();
        let r = state
            .repos
            .get(repo.as_str())
            .ok_or_else(|| Error::not_found(format!("repository {repo} is not known")))?;
        Ok(paginate(r.tags.keys().map(String::as_str), n, last))
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`.
    pub fn referrers(
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

fn blob_unknown(d: &Digest) -> Error {
    Error::not_found(format!(
        "manifest references {d}, which is stored in this repository neither as a manifest nor \
         as a blob: push it first"
    ))
}
