//! Module paths and versions as the GOPROXY protocol carries them (upper case escaped as `!` and
//! the lower-case letter), validated before anything else sees them, and the repository and tag
//! each proxy file is kept under.
//!
//! Every file the proxy keeps is a ref in an internal repository: `gomod/<escaped path>` when the
//! escaped path is a valid repository name (most are: `gomod/golang.org/x/text`), otherwise
//! `gomod/hashed/<40 hex of its SHA-256>` (paths with `!`, `~` or other characters a repository
//! name cannot hold). A module path's first element always holds a dot, so neither `hashed` nor
//! `sumdb` can be one. Tags: `v1.2.3.mod`, `v1.2.3.zip`, `v1.2.3.info` (`+` written `_`, which a Go
//! version never holds), `list`, `latest`.

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result, What};
use crate::names::{RepoName, Tag};

/// Longest module path accepted (Go has no fixed limit; no real path comes near it).
const MAX_PATH: usize = 1024;

fn bad(what: &str, s: &str, why: &str) -> Error {
    Error::invalid(
        What::Name,
        format!(
            "invalid {what} {:?}: {why}",
            crate::digest::truncate(s, 200)
        ),
    )
}

/// A module path, held both as Go writes it and escaped as the protocol carries it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModPath {
    pub path: String,
    pub escaped: String,
}

impl ModPath {
    /// Parses a path as it appears in a proxy URL (escaped).
    pub fn from_escaped(escaped: &str) -> Result<ModPath> {
        let path = unescape(escaped).ok_or_else(|| {
            bad(
                "module path",
                escaped,
                "upper-case letters must be escaped as '!' and the lower-case letter",
            )
        })?;
        check_path(&path).map_err(|why| bad("module path", &path, why))?;
        Ok(ModPath {
            path,
            escaped: escaped.to_owned(),
        })
    }

    /// The internal repository this module's files are kept in.
    pub fn repo(&self) -> Result<RepoName> {
        RepoName::parse(&format!("gomod/{}", self.escaped))
            .or_else(|_| hashed("gomod/hashed", &self.escaped))
    }
}

/// `gomod/<kind>/<40 hex>`: always a valid repository name.
pub fn hashed(prefix: &str, s: &str) -> Result<RepoName> {
    let h = Sha256::digest(s.as_bytes());
    let hex: String = h.iter().take(20).map(|b| format!("{b:02x}")).collect();
    RepoName::parse(&format!("{prefix}/{hex}"))
}

/// Go's module path rules (`module.CheckPath`): slash-separated elements of ASCII letters,
/// digits and `-._~`, none empty, none starting or ending with a dot; the first holds a dot and
/// does not start with a dash.
fn check_path(p: &str) -> std::result::Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty");
    }
    if p.len() > MAX_PATH {
        return Err("too long");
    }
    for (i, elem) in p.split('/').enumerate() {
        if elem.is_empty() {
            return Err("empty path element (leading, trailing or double slash)");
        }
        if elem.starts_with('.') || elem.ends_with('.') {
            return Err("a path element may not start or end with a dot");
        }
        if !elem
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c))
        {
            return Err("only ASCII letters, digits and - . _ ~ are allowed");
        }
        if i == 0 {
            if !elem.contains('.') {
                return Err("the first path element must hold a dot (a domain name)");
            }
            if elem.starts_with('-') {
                return Err("the first path element may not start with a dash");
            }
        }
    }
    Ok(())
}

/// `!x` → `X`; `None` for an upper-case letter or a `!` not followed by a lower-case letter.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut bang = false;
    for c in s.chars() {
        if bang {
            if !c.is_ascii_lowercase() {
                return None;
            }
            out.push(c.to_ascii_uppercase());
            bang = false;
        } else if c == '!' {
            bang = true;
        } else if c.is_ascii_uppercase() {
            return None;
        } else {
            out.push(c);
        }
    }
    (!bang).then_some(out)
}

/// A canonical semantic version as Go writes module versions: `vMAJOR.MINOR.PATCH`, an optional
/// pre-release, and at most the build suffix `+incompatible`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version(String);

impl Version {
    /// From its escaped form in a URL. `None` when it is not canonical (a query such as
    /// `master` or `v1.2`, which the proxy passes on without keeping).
    pub fn from_escaped(escaped: &str) -> Option<Version> {
        let v = unescape(escaped)?;
        is_canonical(&v).then_some(Version(v))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tag a file of this version is kept under (`None` past the tag length limit: such a
    /// version is passed on, not kept).
    pub fn tag(&self, ext: &str) -> Option<Tag> {
        Tag::parse(&format!("{}.{ext}", self.0.replace('+', "_"))).ok()
    }
}

fn is_canonical(v: &str) -> bool {
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let (rest, build) = match rest.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (rest, None),
    };
    if build.is_some_and(|b| b != "incompatible") {
        return false;
    }
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let nums: Vec<&str> = core.split('.').collect();
    if nums.len() != 3 || !nums.iter().all(|n| numeric_ok(n)) {
        return false;
    }
    match pre {
        None => true,
        Some(p) => p.split('.').all(|id| {
            !id.is_empty()
                && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && (!id.bytes().all(|c| c.is_ascii_digit()) || numeric_ok(id))
        }),
    }
}

fn numeric_ok(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) && (n == "0" || !n.starts_with('0'))
}

/// A checksum database name as `go` writes it in `/sumdb/<name>/…` (a host name).
pub fn check_sumdb_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.contains('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !name.starts_with('.')
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(bad("checksum database name", name, "not a host name"))
    }
}

/// The part of a checksum database URL after `/sumdb/<name>/`: `supported`, `lookup/<mod>@<v>`
/// or `tile/…`. Refuses anything else, and any `..`.
pub fn check_sumdb_path(rest: &str) -> Result<()> {
    let ok = (rest == "supported" || rest.starts_with("lookup/") || rest.starts_with("tile/"))
        && rest.len() <= MAX_PATH
        && rest
            .split('/')
            .all(|e| !e.is_empty() && e != "." && e != "..")
        && rest
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~!@+/".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(bad("checksum database path", rest, "not a lookup or tile"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_unescape_and_validate() {
        let p = ModPath::from_escaped("github.com/!burnt!sushi/toml").unwrap();
        assert_eq!(p.path, "github.com/BurntSushi/toml");
        assert!(p.repo().unwrap().as_str().starts_with("gomod/hashed/"));
        let p = ModPath::from_escaped("golang.org/x/text").unwrap();
        assert_eq!(p.repo().unwrap().as_str(), "gomod/golang.org/x/text");
        for bad in [
            "",
            "github.com/Foo/bar",
            "github.com/!/x",
            "github.com/!",
            "nodot/x",
            "example.com/../x",
            "example.com//x",
            "example.com/x/",
            "/example.com/x",
            "example.com/.hidden",
            "example.com/a b",
            "example.com/a\\b",
            "-x.com/a",
        ] {
            assert!(ModPath::from_escaped(bad).is_err(), "{bad:?} accepted");
        }
        // Distinct modules never share a repository.
        let a = ModPath::from_escaped("example.com/!a")
            .unwrap()
            .repo()
            .unwrap();
        let b = ModPath::from_escaped("example.com/a")
            .unwrap()
            .repo()
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(
            hashed("gomod/sumdb", "x").unwrap().as_str().len(),
            "gomod/sumdb/".len() + 40
        );
    }

    #[test]
    fn versions() {
        for good in [
            "v1.2.3",
            "v0.0.0-20191109021931-daa7c04131f5",
            "v2.0.0+incompatible",
            "v1.0.0-rc.1",
            "v1.0.0-!r!c1",
        ] {
            assert!(Version::from_escaped(good).is_some(), "{good}");
        }
        for bad in [
            "master",
            "v1.2",
            "1.2.3",
            "v01.2.3",
            "v1.2.3+meta",
            "v1.2.3-",
            "v1.2.3-01",
            "v1.2.3-RC",
        ] {
            assert!(Version::from_escaped(bad).is_none(), "{bad}");
        }
        let v = Version::from_escaped("v2.0.0+incompatible").unwrap();
        assert_eq!(v.tag("zip").unwrap().as_str(), "v2.0.0_incompatible.zip");
        let v = Version::from_escaped("v1.0.0-!r!c1").unwrap();
        assert_eq!(v.as_str(), "v1.0.0-RC1");
    }

    #[test]
    fn sumdb_paths() {
        assert!(check_sumdb_name("sum.golang.org").is_ok());
        assert!(check_sumdb_name("../x").is_err());
        assert!(check_sumdb_path("supported").is_ok());
        assert!(check_sumdb_path("lookup/golang.org/x/text@v0.3.0").is_ok());
        assert!(check_sumdb_path("tile/8/0/x001/234.p/5").is_ok());
        assert!(check_sumdb_path("tile/../../x").is_err());
        assert!(check_sumdb_path("other").is_err());
    }
}
