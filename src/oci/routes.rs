//! The `/v2/` route table as a pure function: repository names contain slashes, so the trailing
//! segments are matched from the right and the rest is validated as a name.

use crate::error::Result;
use crate::names::RepoName;

#[derive(Debug, PartialEq)]
pub enum Route<'a> {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>` (the reference is parsed by the handler)
    Manifest(RepoName, &'a str),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, &'a str),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(RepoName, &'a str),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepoName, &'a str),
}

impl Route<'_> {
    /// The repository the route names, if any.
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(n)
            | Route::Manifest(n, _)
            | Route::Blob(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Referrers(n, _) => Some(n),
        }
    }
}

/// Parses the path after `/v2/`. `Ok(None)` means no such endpoint (404); `Err` means the
/// endpoint matched but the repository name is invalid.
pub fn parse(rest: &str) -> Result<Option<Route<'_>>> {
    if rest.is_empty() {
        return Ok(Some(Route::Base));
    }
    if rest == "_catalog" {
        return Ok(Some(Route::Catalog));
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name_of = |k: usize| -> Result<RepoName> {
        // The name is everything before the last k segments.
        let cut = segs[..n - k].iter().map(|s| s.len() + 1).sum::<usize>() - 1;
        RepoName::parse(&rest[..cut])
    };
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        return Ok(Some(Route::Tags(name_of(2)?)));
    }
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        let name = name_of(3)?;
        return Ok(Some(if segs[n - 1].is_empty() {
            Route::UploadStart(name)
        } else {
            Route::Upload(name, segs[n - 1])
        }));
    }
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Ok(Some(Route::UploadStart(name_of(2)?)));
    }
    if n >= 3 && !segs[n - 1].is_empty() {
        let last = segs[n - 1];
        match segs[n - 2] {
            "manifests" => return Ok(Some(Route::Manifest(name_of(2)?, last))),
            "blobs" => return Ok(Some(Route::Blob(name_of(2)?, last))),
            "referrers" => return Ok(Some(Route::Referrers(name_of(2)?, last))),
            _ => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, Option<Route>)> = vec![
            ("", Some(Route::Base)),
            ("_catalog", Some(Route::Catalog)),
            ("a/tags/list", Some(Route::Tags(name("a")))),
            ("a/b/c/tags/list", Some(Route::Tags(name("a/b/c")))),
            (
                "a/manifests/latest",
                Some(Route::Manifest(name("a"), "latest")),
            ),
            (
                "x/blobs/sha256:00",
                Some(Route::Blob(name("x"), "sha256:00")),
            ),
            ("x/y/blobs/uploads/", Some(Route::UploadStart(name("x/y")))),
            ("x/y/blobs/uploads", Some(Route::UploadStart(name("x/y")))),
            ("x/blobs/uploads/abc", Some(Route::Upload(name("x"), "abc"))),
            // Names may contain the keywords themselves.
            (
                "blobs/uploads/blobs/d",
                Some(Route::Blob(name("blobs/uploads"), "d")),
            ),
            (
                "manifests/manifests/t",
                Some(Route::Manifest(name("manifests"), "t")),
            ),
            (
                "r/referrers/sha256:1",
                Some(Route::Referrers(name("r"), "sha256:1")),
            ),
            ("a/manifests/", None),
            ("a/unknown/x", None),
            ("tags/list", None),
        ];
        for (path, want) in cases {
            assert_eq!(parse(path).unwrap(), want, "{path}");
        }
        for bad in [
            "../x/tags/list",
            "A/manifests/t",
            "a//b/blobs/d",
            "/a/blobs/d",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
