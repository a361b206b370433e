//! Checks a module zip before the proxy keeps it (Go's module zip rules: every file under
//! `<module>@<version>/`, clean relative paths, no two names that differ only in case, size
//! limits) and computes its `h1:` hash — the hash `go.sum` and the checksum database record —
//! by inflating every file. A zip that fails any check is refused and never kept.

use std::io::{Read, Seek};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// Go's limits (`golang.org/x/mod/zip`): the zip, and the sum of its inflated files.
pub const MAX_ZIP: u64 = 500 << 20;
/// `go.mod` and `LICENSE` at the module root.
pub const MAX_GO_MOD: u64 = 16 << 20;
const MAX_LICENSE: u64 = 16 << 20;

/// Checks `zip` as the module zip of `path@version` and returns its `h1:` hash. The error says
/// what is wrong, for the builder's log.
pub fn check<R: Read + Seek>(zip: R, path: &str, version: &str) -> Result<String, String> {
    let mut archive =
        zip::ZipArchive::new(zip).map_err(|e| format!("not a readable zip file: {e}"))?;
    let prefix = format!("{path}@{version}/");
    let mut names: Vec<(String, [u8; 32])> = Vec::with_capacity(archive.len());
    let mut folded = std::collections::HashSet::new();
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let mut f = archive
            .by_index(i)
            .map_err(|e| format!("zip entry {i} is unreadable: {e}"))?;
        let name = f
            .name()
            .map_err(|e| format!("zip entry {i} has an unreadable name: {e}"))?
            .into_owned();
        let Some(rel) = name.strip_prefix(&prefix) else {
            return Err(format!(
                "file {name:?} is not under {prefix:?}: this is not the zip of {path}@{version}"
            ));
        };
        check_rel(rel).map_err(|why| format!("file {name:?}: {why}"))?;
        if !folded.insert(name.to_lowercase()) {
            return Err(format!(
                "file {name:?} appears twice (names that differ only in case collide)"
            ));
        }
        let limit = match rel {
            "go.mod" => MAX_GO_MOD,
            "LICENSE" => MAX_LICENSE,
            _ => MAX_ZIP,
        };
        let declared = f.size();
        if declared > limit || total + declared > MAX_ZIP {
            return Err(format!(
                "file {name:?} is {declared} bytes: over the module zip limits"
            ));
        }
        // The declared size may lie: read one byte past it at most.
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut n: u64 = 0;
        let mut limited = (&mut f).take(declared + 1);
        loop {
            let k = limited
                .read(&mut buf)
                .map_err(|e| format!("file {name:?} is corrupt or truncated: {e}"))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        if n != declared {
            return Err(format!(
                "file {name:?} inflates to {n} bytes, not the {declared} its header says"
            ));
        }
        total += n;
        names.push((name, h.finalize().into()));
    }
    if names.is_empty() {
        return Err("the zip holds no files".into());
    }
    Ok(h1(names))
}

/// A path inside the module: relative, clean, one line.
fn check_rel(rel: &str) -> Result<(), &'static str> {
    if rel.is_empty() {
        return Err("empty path");
    }
    if rel.contains('\\') || rel.contains('\0') || rel.contains('\n') || rel.contains('\r') {
        return Err("backslash, NUL or line break in the path");
    }
    let body = rel.strip_suffix('/').unwrap_or(rel);
    if body
        .split('/')
        .any(|e| e.is_empty() || e == "." || e == "..")
    {
        return Err("not a clean relative path");
    }
    Ok(())
}

/// `dirhash.Hash1`: SHA-256 over the sorted lines `<hex sha256>  <name>\n`, base64.
fn h1(mut files: Vec<(String, [u8; 32])>) -> String {
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, sum) in &files {
        let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
        h.update(format!("{hex}  {name}\n").as_bytes());
    }
    format!(
        "h1:{}",
        base64::engine::general_purpose::STANDARD.encode(h.finalize())
    )
}

/// The `h1:` hash of a `.mod` file, as `go.sum`'s `/go.mod` lines record it.
pub fn mod_h1(go_mod: &[u8]) -> String {
    h1(vec![("go.mod".into(), Sha256::digest(go_mod).into())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn build(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in files {
            w.start_file(
                *name,
                zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated),
            )
            .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn accepts_a_module_zip_and_hashes_it_as_go_does() {
        let z = build(&[
            ("example.com/m@v1.0.0/go.mod", b"module example.com/m\n"),
            ("example.com/m@v1.0.0/m.go", b"package m\n"),
        ]);
        let h = check(Cursor::new(&z), "example.com/m", "v1.0.0").unwrap();
        assert!(h.starts_with("h1:") && h.len() == 47, "{h}");
        // Order of entries does not matter.
        let z2 = build(&[
            ("example.com/m@v1.0.0/m.go", b"package m\n"),
            ("example.com/m@v1.0.0/go.mod", b"module example.com/m\n"),
        ]);
        assert_eq!(
            check(Cursor::new(&z2), "example.com/m", "v1.0.0").unwrap(),
            h
        );
        // The go.mod line's hash of a known file (as go.sum has it for this content).
        assert!(mod_h1(b"module example.com/m\n").starts_with("h1:"));
    }

    #[test]
    fn refuses_broken_zips() {
        let good = build(&[("example.com/m@v1.0.0/m.go", b"package m\n")]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 10].to_vec(), "truncated"),
            (b"not a zip at all".to_vec(), "garbage"),
            (
                build(&[("example.com/other@v1.0.0/m.go", b"x")]),
                "wrong prefix",
            ),
            (
                build(&[("example.com/m@v1.0.0/../evil.go", b"x")]),
                "traversal",
            ),
            (
                build(&[
                    ("example.com/m@v1.0.0/A.go", b"x"),
                    ("example.com/m@v1.0.0/a.go", b"y"),
                ]),
                "case collision",
            ),
            (build(&[]), "empty"),
        ];
        for (z, what) in cases {
            assert!(
                check(Cursor::new(&z), "example.com/m", "v1.0.0").is_err(),
                "{what} accepted"
            );
        }
        // A flipped byte inside the compressed data: the CRC or inflate fails.
        let mut bad = good.clone();
        let at = 30 + "example.com/m@v1.0.0/m.go".len() + 2;
        bad[at] ^= 0xff;
        assert!(check(Cursor::new(&bad), "example.com/m", "v1.0.0").is_err());
    }
}
