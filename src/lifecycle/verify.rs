//! `hoard verify`: re-hash every blob the index knows, find files it does not know, and (with
//! repair) quarantine corrupt blobs and drop every manifest and tag that would dangle without
//! them, so the store passes again (invariants 1 and 2).

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::digest::Digest;
use crate::error::Result;
use crate::lifecycle::gc::Lifecycle;

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    /// Stored bytes that no longer hash to their name (or have the wrong size).
    pub corrupt: Vec<Digest>,
    /// In the index, but the file is gone.
    pub missing: Vec<Digest>,
    /// Files the index does not know (crash leftovers); removed with repair.
    pub strays: u64,
    /// Manifests dropped because a blob they list was corrupt or missing (repair only).
    pub dropped_manifests: Vec<String>,
    pub repaired: bool,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.strays == 0
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "checked {} blobs ({} bytes): {} corrupt, {} missing, {} unknown files",
            self.checked,
            self.bytes,
            self.corrupt.len(),
            self.missing.len(),
            self.strays
        );
        for d in &self.corrupt {
            let _ = writeln!(s, "corrupt {d}");
        }
        for d in &self.missing {
            let _ = writeln!(s, "missing {d}");
        }
        for m in &self.dropped_manifests {
            let _ = writeln!(s, "dropped manifest {m}");
        }
        if self.repaired {
            let _ = writeln!(
                s,
                "repaired: corrupt blobs moved to quarantine/, dangling manifests and tags dropped, unknown files removed"
            );
        } else if !self.is_clean() {
            let _ = writeln!(s, "run with --repair to fix");
        }
        s
    }
}

/// Blocking: reads every blob once.
pub fn verify(life: &Lifecycle, repair: bool) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let blobs: Vec<(Digest, u64)> = life
        .index
        .read()
        .blobs
        .iter()
        .map(|(d, m)| (*d, m.size))
        .collect();
    for (d, size) in blobs {
        report.checked += 1;
        report.bytes += size;
        match life.store.open(&d) {
            Ok(r) if r.size() != size => report.corrupt.push(d),
            Ok(_) => match crate::store::verify(&*life.store, &d) {
                Ok(true) => {}
                Ok(false) => report.corrupt.push(d),
                Err(e) if e.kind == crate::error::ErrorKind::NotFound => report.missing.push(d),
                Err(e) => return Err(e),
            },
            Err(e) if e.kind == crate::error::ErrorKind::NotFound => {
                // Evicted while we looked is not damage.
                if life.index.blob_size(&d).is_some() {
                    report.missing.push(d);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let strays = life.count_strays()?;
    report.strays = strays;
    if repair && !report.is_clean() {
        for d in &report.corrupt {
            life.store.quarantine(d)?;
            tracing::warn!(digest = %d, "corrupt blob moved to quarantine/");
        }
        let bad: HashSet<Digest> = report
            .corrupt
            .iter()
            .chain(&report.missing)
            .copied()
            .collect();
        report.dropped_manifests = life.index.drop_blobs(&bad)?;
        life.index.sync_journal()?;
        life.sweep_files()?;
        report.repaired = true;
    }
    Ok(report)
}
