//! Content digests: one `Digest` type parsed at the edge (`sha256:` or `sha512:` with lowercase
//! hex), `Copy` after, plus the streaming `Hasher` every write path verifies with.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::error::{Error, Result};

/// The hash algorithms the OCI distribution spec names as registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// A validated digest. The raw bytes are kept, so equality and hashing never depend on the
/// spelling the client used.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Digest {
    Sha256([u8; 32]),
    Sha512([u8; 64]),
}

/// A digest is already a uniform hash: its first 8 bytes are all a hash table needs.
impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let b = self.bytes();
        state.write_u64(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]));
    }
}

/// The hasher for digest-keyed tables (the index holds millions). Digests are chosen by clients,
/// who could grind contents until many digests share low bits, so the bits are mixed with a
/// per-process random key they cannot know; still one multiply instead of SipHash's rounds.
#[derive(Clone, Copy)]
pub struct BuildDigestHasher {
    k0: u64,
    k1: u64,
}

impl Default for BuildDigestHasher {
    fn default() -> BuildDigestHasher {
        static KEYS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
        let (k0, k1) = *KEYS.get_or_init(|| {
            let mut raw = [0u8; 16];
            if getrandom::getrandom(&mut raw).is_err() {
                // No entropy source: fall back to the process id and the time.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                raw[..8].copy_from_slice(&t.to_le_bytes());
                raw[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
            }
            let mut a = [0u8; 8];
            let mut b = [0u8; 8];
            a.copy_from_slice(&raw[..8]);
            b.copy_from_slice(&raw[8..]);
            (u64::from_le_bytes(a), u64::from_le_bytes(b) | 1)
        });
        BuildDigestHasher { k0, k1 }
    }
}

impl std::hash::BuildHasher for BuildDigestHasher {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher {
            state: self.k0,
            k1: self.k1,
        }
    }
}

pub struct DigestHasher {
    state: u64,
    k1: u64,
}

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        let x = (self.state ^ (self.state >> 29)).wrapping_mul(self.k1);
        x ^ (x >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.state = (self.state ^ v)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(23);
    }
}

pub type DigestMap<V> = std::collections::HashMap<Digest, V, BuildDigestHasher>;
pub type DigestSet = std::collections::HashSet<Digest, BuildDigestHasher>;

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Digest::Sha256(_) => Algorithm::Sha256,
            Digest::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Digest::Sha256(b) => b,
            Digest::Sha512(b) => b,
        }
    }

    pub fn hex(&self) -> String {
        hex_encode(self.bytes())
    }

    /// Digest of a byte slice held in memory (manifests, small test blobs).
    pub fn of(alg: Algorithm, data: &[u8]) -> Digest {
        let mut h = alg.hasher();
        h.update(data);
        h.finish()
    }

    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, data)
    }

    /// Rebuilds a digest from its algorithm and raw bytes (the journal's encoding).
    pub fn from_raw(alg: Algorithm, raw: &[u8]) -> Option<Digest> {
        match alg {
            Algorithm::Sha256 => raw.try_into().ok().map(Digest::Sha256),
            Algorithm::Sha512 => raw.try_into().ok().map(Digest::Sha512),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm().name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = Error;

    /// Accepts exactly `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`.
    fn from_str(s: &str) -> Result<Digest> {
        let invalid = || Error::invalid_digest(format!("invalid digest {:?}", truncate(s, 200)));
        let (alg, hex) = s.split_once(':').ok_or_else(invalid)?;
        let alg = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => {
                return Err(Error::invalid_digest(format!(
                    "unsupported digest algorithm {:?}: use sha256 or sha512",
                    truncate(alg, 40)
                )))
            }
        };
        if hex.len() != alg.hex_len() {
            return Err(invalid());
        }
        let raw = hex_decode_lower(hex).ok_or_else(invalid)?;
        Digest::from_raw(alg, &raw).ok_or_else(invalid)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental hasher for either algorithm; `Clone` so an upload session can keep its state
/// between chunks without re-reading what was written.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::Sha256(h.finalize().into()),
            Hasher::Sha512(h) => Digest::Sha512(h.finalize().into()),
        }
    }
}

pub fn hex_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Decodes lowercase hex only: upper-case digests are not canonical and distribution-spec's
/// grammar rejects them.
fn hex_decode_lower(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// 64 lowercase hex digits as 32 bytes (output and action ids, token hashes).
pub fn hex32(s: &str) -> Option<[u8; 32]> {
    hex_decode_lower(s)?.try_into().ok()
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_algorithms() {
        let d = Digest::sha256_of(b"");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        let d512 = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(d512.to_string().parse::<Digest>().unwrap(), d512);
        assert_eq!(d512.to_string().len(), 7 + 128);
    }

    #[test]
    fn rejects_malformed() {
        let good = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        for bad in [
            String::new(),
            "sha256".into(),
            format!("sha256:{}", &good[1..]),
            format!("sha256:{}0", good),
            format!("sha256:{}", good.to_uppercase()),
            format!("md5:{good}"),
            format!("SHA256:{good}"),
            format!("sha256:{}g", &good[1..]),
            format!("sha512:{good}"),
            format!("sha256:{good}\n"),
            "sha256:../../etc/passwd".into(),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "accepted {bad:?}");
        }
    }
}
