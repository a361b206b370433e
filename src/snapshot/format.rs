//! The snapshot index: every directory, file and symlink of a saved tree with its mode and
//! mtime, and each file as content-defined chunks. A chunk is stored as a blob of its zstd
//! compression; the index names the blob and the chunk's own size and SHA-256, so a restore
//! checks every byte it writes and a save reuses what earlier snapshots stored.
//!
//! Files are chunked one by one (never across file boundaries): a tree in which 5% of the files
//! are new or changed — scattered, as new GOCACHE entries are — uploads about 5% of its bytes.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// FastCDC bounds: files under `MIN_CHUNK` are one chunk.
pub const MIN_CHUNK: u32 = 64 << 10;
pub const AVG_CHUNK: u32 = 256 << 10;
pub const MAX_CHUNK: u32 = 1 << 20;
/// zstd level for chunks: fast, and most of what higher levels give on source and objects.
pub const ZSTD_LEVEL: i32 = 3;
/// An index (compressed) of more than this is refused.
pub const MAX_INDEX: u64 = 256 << 20;

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.hoard.snapshot.index.v1+json+zstd";
pub const CHUNK_MEDIA_TYPE: &str = "application/vnd.hoard.snapshot.chunk.v1+zstd";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The stored blob: `sha256:` of the compressed bytes.
    pub blob: String,
    /// Uncompressed length.
    pub size: u64,
    /// SHA-256 (hex) of the uncompressed bytes.
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Relative, `/`-separated, clean.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// SHA-256 (hex) of the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<Chunk>,
    /// A symlink's target, as it was (never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub version: u32,
    pub nodes: Vec<Node>,
}

impl Index {
    /// Checks what a restore relies on: clean relative paths, sorted and unique, no node below
    /// a symlink (a restore never writes through one), chunks adding up to each file's size.
    pub fn check(&self) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!("unknown snapshot index version {}", self.version));
        }
        let mut links: Vec<&str> = Vec::new();
        let mut prev: Option<&str> = None;
        for n in &self.nodes {
            check_path(&n.path).map_err(|why| format!("path {:?}: {why}", n.path))?;
            if let Some(p) = prev {
                if p >= n.path.as_str() {
                    return Err(format!("paths not sorted and unique at {:?}", n.path));
                }
            }
            prev = Some(&n.path);
            if links
                .iter()
                .any(|l| n.path.starts_with(l) && n.path.as_bytes().get(l.len()) == Some(&b'/'))
            {
                return Err(format!("{:?} lies below a symlink", n.path));
            }
            match n.kind {
                Kind::Symlink => {
                    if n.target
                        .as_deref()
                        .is_none_or(|t| t.is_empty() || t.contains('\0'))
                    {
                        return Err(format!("symlink {:?} has no target", n.path));
                    }
                    links.push(&n.path);
                }
                Kind::File => {
                    let sum: u64 = n.chunks.iter().map(|c| c.size).sum();
                    if sum != n.size {
                        return Err(format!(
                            "{:?}: chunks add up to {sum} bytes, not {}",
                            n.path, n.size
                        ));
                    }
                    if n.sha256.as_deref().is_none_or(|h| !is_hex64(h)) {
                        return Err(format!("{:?} has no sha256", n.path));
                    }
                    for c in &n.chunks {
                        if !is_hex64(&c.sha256) || c.blob.parse::<crate::digest::Digest>().is_err()
                        {
                            return Err(format!("{:?}: a chunk is malformed", n.path));
                        }
                    }
                }
                Kind::Dir => {}
            }
        }
        Ok(())
    }

    /// Every chunk blob, once.
    pub fn blobs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter().map(|c| c.blob.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.size).sum()
    }

    pub fn files(&self) -> usize {
        self.nodes.iter().filter(|n| n.kind == Kind::File).count()
    }

    pub fn encode(&self) -> std::io::Result<Vec<u8>> {
        let json = serde_json::to_vec(self)?;
        zstd::bulk::compress(&json, ZSTD_LEVEL)
    }

    pub fn decode(bytes: &[u8]) -> Result<Index, String> {
        let mut json = Vec::new();
        zstd::stream::read::Decoder::new(bytes)
            .and_then(|d| d.take(MAX_INDEX * 8).read_to_end(&mut json))
            .map_err(|e| format!("snapshot index is not zstd: {e}"))?;
        serde_json::from_slice(&json).map_err(|e| format!("snapshot index is not valid: {e}"))
    }
}

pub fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// A clean relative path: no leading `/`, no empty, `.` or `..` element, no NUL.
pub fn check_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() || p.starts_with('/') || p.contains('\0') {
        return Err("not a relative path");
    }
    if p.split('/').any(|e| e.is_empty() || e == "." || e == "..") {
        return Err("not a clean path");
    }
    Ok(())
}

/// A snapshot key: the repository `snapshots/<key>` must be a valid name.
pub fn check_key(key: &str) -> crate::error::Result<crate::names::RepoName> {
    crate::names::RepoName::parse(&format!("snapshots/{key}")).map_err(|_| {
        crate::error::Error::invalid(
            crate::error::What::Name,
            format!(
                "invalid snapshot key {key:?}: lower-case letters and digits joined by '.', '_', \
                 '-' or '/' (e.g. gomod-linux-amd64)"
            ),
        )
    })
}

/// Writes the tree as a tar stream (directories, files, symlinks; modes and mtimes; owner 0),
/// reading each file's chunks with `chunk` (which returns the uncompressed bytes).
pub fn write_tar<W: Write>(
    index: &Index,
    out: W,
    mut chunk: impl FnMut(&Chunk) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<W> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    for n in &index.nodes {
        let mut h = tar::Header::new_gnu();
        h.set_mode(n.mode & 0o7777);
        h.set_mtime(n.mtime_ns.div_euclid(1_000_000_000).max(0) as u64);
        h.set_uid(0);
        h.set_gid(0);
        match n.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{}/", n.path), std::io::empty())?;
            }
            Kind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &n.path, n.target.as_deref().unwrap_or(""))?;
            }
            Kind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(n.size);
                let reader = ChunkReader {
                    chunks: n.chunks.iter(),
                    cur: std::io::Cursor::new(Vec::new()),
                    fetch: &mut chunk,
                };
                b.append_data(&mut h, &n.path, reader)?;
            }
        }
    }
    b.into_inner()
}

struct ChunkReader<'a, I: Iterator<Item = &'a Chunk>, F: FnMut(&Chunk) -> std::io::Result<Vec<u8>>>
{
    chunks: I,
    cur: std::io::Cursor<Vec<u8>>,
    fetch: &'a mut F,
}

impl<'a, I, F> Read for ChunkReader<'a, I, F>
where
    I: Iterator<Item = &'a Chunk>,
    F: FnMut(&Chunk) -> std::io::Result<Vec<u8>>,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.cur.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match self.chunks.next() {
                Some(c) => self.cur = std::io::Cursor::new((self.fetch)(c)?),
                None => return Ok(0),
            }
        }
    }
}

/// Decompresses a stored chunk and checks it against the index.
pub fn open_chunk(c: &Chunk, stored: &[u8]) -> std::io::Result<Vec<u8>> {
    use sha2::Digest as _;
    let mut out = Vec::with_capacity(c.size as usize);
    zstd::stream::read::Decoder::new(stored)?
        .take(c.size + 1)
        .read_to_end(&mut out)?;
    let ok = out.len() as u64 == c.size
        && crate::digest::hex_encode(&sha2::Sha256::digest(&out)) == c.sha256;
    if ok {
        Ok(out)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("chunk {} does not match the snapshot index", c.blob),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> Node {
        Node {
            path: path.into(),
            kind: Kind::File,
            mode: 0o644,
            mtime_ns: 0,
            size: 0,
            sha256: Some("0".repeat(64)),
            chunks: vec![],
            target: None,
        }
    }

    #[test]
    fn index_checks() {
        let mut i = Index {
            version: 1,
            nodes: vec![file("a"), file("b/c")],
        };
        assert!(i.check().is_ok());
        for bad in ["../x", "/abs", "a//b", "a/./b", ""] {
            i.nodes = vec![file(bad)];
            assert!(i.check().is_err(), "{bad:?}");
        }
        i.nodes = vec![file("b"), file("a")];
        assert!(i.check().is_err(), "unsorted");
        let mut link = file("l");
        link.kind = Kind::Symlink;
        link.target = Some("/etc".into());
        i.nodes = vec![link.clone(), file("l/passwd")];
        assert!(i.check().is_err(), "below a symlink");
        i.nodes = vec![link, file("l2")];
        assert!(i.check().is_ok());
        let mut f = file("x");
        f.size = 3;
        i.nodes = vec![f];
        assert!(i.check().is_err(), "sizes");
        let enc = Index {
            version: 1,
            nodes: vec![file("a")],
        }
        .encode()
        .unwrap();
        assert_eq!(Index::decode(&enc).unwrap().nodes.len(), 1);
        assert!(check_key("gomod-linux").is_ok());
        assert!(check_key("Bad Key").is_err());
    }
}
