//! Repository names, tags and manifest references, validated by the distribution-spec grammar at
//! the edge so nothing below a handler sees a raw string (and no name can walk a path).

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result, What};

/// Longest repository name accepted (the spec's suggested limit on name + host is 255).
pub const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName> {
        let bad = |why: &str| {
            Error::invalid(
                What::Name,
                format!(
                    "invalid repository name {:?}: {why}",
                    crate::digest::truncate(s, 300)
                ),
            )
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 characters"));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(bad(
                    "each path component must be lowercase letters and digits, joined by '.', '_', '__' or dashes",
                ));
            }
        }
        Ok(RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or one or more '-'.
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Tag> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(Error::invalid(
                What::Reference,
                format!("invalid tag {:?}", crate::digest::truncate(s, 200)),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `/manifests/<reference>` names: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(Tag::parse(s)?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        for ok in [
            "a",
            "library/busybox",
            "my-org/app.cache",
            "a__b",
            "a---b/c_d/e.f",
            "0/1/2",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "A",
            "Library/x",
            "../etc",
            "a/../b",
            "a/./b",
            "a//b",
            "/a",
            "a/",
            "a___b",
            "a..b",
            "-a",
            "a-",
            "a b",
            "a%2fb",
            long.as_str(),
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags_and_references() {
        assert!(Tag::parse("latest").is_ok());
        assert!(Tag::parse("_x.Y-9").is_ok());
        assert!(Tag::parse(&"t".repeat(128)).is_ok());
        assert!(Tag::parse(&"t".repeat(129)).is_err());
        assert!(Tag::parse(".x").is_err());
        assert!(Tag::parse("-x").is_err());
        assert!(Tag::parse("a/b").is_err());
        assert!(matches!(
            Reference::parse(&Digest::sha256_of(b"x").to_string()),
            Ok(Reference::Digest(_))
        ));
        assert!(Reference::parse("sha256:abc").is_err());
    }
}
