//! File refs: how hoard's own front ends (the module proxy, the Go build cache) keep a named
//! file. The name is a tag in an internal repository; the tag points at a one-layer OCI
//! manifest (empty config, an `artifactType` saying which front end wrote it) whose layer is the
//! file, with the front end's facts in the layer's annotations. So every kept file is a root of
//! the lifecycle like an image tag (size bound, TTL, reachability, a shared bucket), and nothing
//! here knows which protocol it serves.

use bytes::Bytes;
use serde::Deserialize;

use super::manifests::{PutManifest, OCI_MANIFEST};
use super::Registry;
use crate::digest::Digest;
use crate::error::{Error, ErrorKind, Result};
use crate::names::{Reference, RepoName, Tag};

const EMPTY_CONFIG: &[u8] = b"{}";
const EMPTY_CONFIG_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// The file a ref names.
#[derive(Clone, Debug, PartialEq)]
pub struct FileRef {
    pub digest: Digest,
    pub size: u64,
    pub annotations: serde_json::Map<String, serde_json::Value>,
}

impl FileRef {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).and_then(|v| v.as_str())
    }
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Layer {
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: serde_json::Map<String, serde_json::Value>,
}

/// Files up to this size are read whole in one step (one hop to the blocking pool, not two).
const SMALL_FILE: u64 = 256 << 10;

impl Registry {
    /// The bytes of a file a ref names, as a response body. (The ref was resolved in `repo`,
    /// so the blob is visible there.) `NotFound` when the blob went meanwhile.
    pub async fn file_body(&self, repo: &RepoName, f: &FileRef) -> Result<crate::http::Body> {
        if f.size <= SMALL_FILE {
            let bytes = self.read_small(&f.digest, f.size + 1).await?;
            if bytes.len() as u64 != f.size {
                return Err(Error::internal(format!(
                    "{} is {} bytes, its ref says {}",
                    f.digest,
                    bytes.len(),
                    f.size
                )));
            }
            return Ok(crate::http::full(bytes));
        }
        let permit = self.transfer().await?;
        let r = self.open_blob(repo, &f.digest, 0).await?;
        crate::http::stream_blob(r, f.size, Some(permit))
            .await
            .map_err(|e| Error::io(format!("reading {}", f.digest), e))
    }

    /// The file `repo:tag` names now (a read that keeps the ref young), `None` when there is no
    /// such ref. On a shared bucket whose S3 cannot be reached, `Unavailable`.
    pub async fn file_ref(&self, repo: &RepoName, tag: &Tag) -> Result<Option<FileRef>> {
        let reference = Reference::Tag(tag.clone());
        let digest = match self.resolve_manifest(repo, &reference).await {
            Ok((d, _)) => d,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Some(f) = self
            .file_refs
            .lock()
            .ok()
            .and_then(|mut c| c.get(&digest).cloned())
        {
            return Ok(Some(f));
        }
        let bytes = match self.get_manifest(repo, &Reference::Digest(digest)).await {
            Ok((_, _, b)) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("manifest {digest} of {repo}:{tag}: {e}")))?;
        let layer = m.layers.into_iter().next().ok_or_else(|| {
            Error::internal(format!("manifest {digest} of {repo}:{tag} has no layer"))
        })?;
        let f = FileRef {
            digest: layer.digest.parse()?,
            size: layer.size,
            annotations: layer.annotations,
        };
        if let Ok(mut c) = self.file_refs.lock() {
            c.put(digest, f.clone());
        }
        Ok(Some(f))
    }

    /// Points `repo:tag` at a one-layer manifest of `file` (already stored and visible in
    /// `repo`), replacing whatever it named.
    pub async fn set_file_ref(
        &self,
        repo: &RepoName,
        tag: &Tag,
        artifact_type: &str,
        media_type: &str,
        file: FileRef,
    ) -> Result<Digest> {
        let digest = self
            .set_files_ref(
                repo,
                tag,
                artifact_type,
                media_type,
                std::slice::from_ref(&file),
                serde_json::Map::new(),
            )
            .await?;
        if let Ok(mut c) = self.file_refs.lock() {
            c.put(digest, file);
        }
        Ok(digest)
    }

    /// Points `repo:tag` at a manifest listing `files` (each stored and visible in `repo`; their
    /// facts in each layer's annotations), with `annotations` on the manifest itself when there
    /// are any: a ref holding several files, or none but its annotations (a content lease).
    /// Replaces whatever the tag named.
    pub async fn set_files_ref(
        &self,
        repo: &RepoName,
        tag: &Tag,
        artifact_type: &str,
        media_type: &str,
        files: &[FileRef],
        annotations: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Digest> {
        let config = Digest::sha256_of(EMPTY_CONFIG);
        // All stay pinned until the manifest names them: a collection in between (the last
        // other ref naming the empty config evicted) must not take them from under it.
        let _pins: Vec<_> = std::iter::once(config)
            .chain(files.iter().map(|f| f.digest))
            .map(|d| self.life.pins.pin(d))
            .collect();
        self.put_bytes(repo, config, Bytes::from_static(EMPTY_CONFIG))
            .await?;
        let layers: Vec<serde_json::Value> = files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "mediaType": media_type,
                    "digest": f.digest.to_string(),
                    "size": f.size,
                    "annotations": f.annotations,
                })
            })
            .collect();
        let mut manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": EMPTY_CONFIG_TYPE,
                "digest": config.to_string(),
                "size": EMPTY_CONFIG.len(),
            },
            "layers": layers,
        });
        if !annotations.is_empty() {
            manifest["annotations"] = serde_json::Value::Object(annotations);
        }
        let body = Bytes::from(
            serde_json::to_vec(&manifest)
                .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?,
        );
        let reference = Reference::Tag(tag.clone());
        let stored = self
            .put_manifest(PutManifest {
                repo,
                reference: &reference,
                content_type: Some(OCI_MANIFEST),
                body,
                extra_tags: &[],
            })
            .await?;
        Ok(stored.digest)
    }

    /// The manifest-level annotations and the files of a ref `set_files_ref` wrote; `None` when
    /// there is no such ref.
    pub async fn files_ref(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<(serde_json::Map<String, serde_json::Value>, Vec<FileRef>)>> {
        #[derive(Deserialize)]
        struct Full {
            #[serde(default)]
            layers: Vec<Layer>,
            #[serde(default)]
            annotations: serde_json::Map<String, serde_json::Value>,
        }
        let bytes = match self.get_manifest(repo, &Reference::Tag(tag.clone())).await {
            Ok((_, _, b)) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let m: Full = serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("manifest of {repo}:{tag}: {e}")))?;
        let mut files = Vec::with_capacity(m.layers.len());
        for l in m.layers {
            files.push(FileRef {
                digest: l.digest.parse()?,
                size: l.size,
                annotations: l.annotations,
            });
        }
        Ok(Some((m.annotations, files)))
    }
}
