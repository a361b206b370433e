//! `hoard verify`: re-hash every blob the index knows, find files it does not know, check per
//! repository that every tag's manifest and everything it reaches is stored and visible there,
//! and (with repair) quarantine corrupt blobs, drop every manifest and tag that would dangle
//! without them and re-link stored blobs a repository lost sight of, so the store passes again
//! (invariants 1 and 2).

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::digest::Digest;
use crate::error::Result;
use crate::lifecycle::gc::Lifecycle;
use crate::lifecycle::index::{Op, State};

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
    /// Pointers in a repository that lead nowhere there (invariant 1), one line each.
    pub dangling: Vec<String>,
    /// Manifests dropped because a blob they list was corrupt or missing (repair only).
    pub dropped_manifests: Vec<String>,
    pub repaired: bool,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.missing.is_empty()
            && self.strays == 0
            && self.dangling.is_empty()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "checked {} blobs ({} bytes): {} corrupt, {} missing, {} unknown files, {} dangling",
            self.checked,
            self.bytes,
            self.corrupt.len(),
            self.missing.len(),
            self.strays,
            self.dangling.len()
        );
        for d in &self.corrupt {
            let _ = writeln!(s, "corrupt {d}");
        }
        for d in &self.missing {
            let _ = writeln!(s, "missing {d}");
        }
        for m in &self.dangling {
            let _ = writeln!(s, "dangling {m}");
        }
        for m in &self.dropped_manifests {
            let _ = writeln!(s, "dropped manifest {m}");
        }
        if self.repaired {
            let _ = writeln!(
                s,
                "repaired: corrupt blobs moved to quarantine/, manifests and tags that would dangle dropped, \
                 stored blobs re-linked where a manifest needs them, unknown files removed"
            );
        } else if !self.is_clean() {
            let _ = writeln!(s, "run with --repair to fix");
        }
        s
    }
}

/// Blocking: reads every blob once.
pub fn verify(life: &Lifecycle, repair: bool) -> Result<VerifyReport> {
    if let Some(s) = life.shared.get() {
        // The cache follows the bucket first, so what other replicas wrote is checked too.
        s.block(|s| async move { s.refresh().await.map(|_| ()) })?;
    }
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
    if let (Some(s), false) = (life.shared.get(), report.missing.is_empty()) {
        // On a shared bucket the collector may have removed them while this ran (the cache
        // hears of it with the announcement): missing only if the bucket, listed again, still
        // names them.
        s.block(|s| async move { s.refresh().await.map(|_| ()) })?;
        report.missing.retain(|d| {
            life.index.blob_size(d).is_some()
                && matches!(life.store.open(d), Err(e) if e.is_not_found())
        });
    }
    let strays = life.count_strays()?;
    report.strays = strays;
    let (dangling, mend) = reachability(&life.index.read());
    report.dangling = dangling;
    if repair && !report.is_clean() {
        // Stored but no longer visible where a manifest needs it: linking it back restores the
        // pull without dropping anything. A tag on no manifest of its repository goes.
        if let Some(s) = life.shared.get() {
            let ops = mend.clone();
            s.block(move |s| async move { s.apply_in_bucket(ops).await })?;
        }
        life.index.commit(mend)?;
        for d in &report.corrupt {
            life.store.quarantine(d)?;
            tracing::warn!(digest = %d, "corrupt blob moved to quarantine/");
        }
        let mut bad: HashSet<Digest> = report
            .corrupt
            .iter()
            .chain(&report.missing)
            .copied()
            .collect();
        // A child the index holds no bytes for: whatever lists it goes, as for a missing blob.
        bad.extend(unstored_children(&life.index.read()));
        report.dropped_manifests = match life.shared.get() {
            None => life.index.drop_blobs(&bad)?,
            Some(s) => {
                // In the bucket first (every replica's truth), then this cache.
                let (ops, dropped) =
                    crate::lifecycle::index::plan_drop_blobs(&life.index.read(), &bad);
                let o = ops.clone();
                s.block(move |s| async move { s.apply_in_bucket(o).await })?;
                life.index.commit(ops)?;
                dropped
            }
        };
        life.index.sync_journal()?;
        life.sweep_files()?;
        report.repaired = true;
    }
    Ok(report)
}

/// Invariant 1 per repository: every tag names a manifest of the repository, and every manifest's
/// own bytes and every child it lists are stored and visible in that repository (what a pull
/// through that repository needs). Returns one line per broken pointer, and the records that
/// mend those that need no bytes: links for stored children, deletes for tags on nothing.
fn reachability(state: &State) -> (Vec<String>, Vec<Op>) {
    let mut lines = Vec::new();
    let mut relink = Vec::new();
    let mut mend = Vec::new();
    for (name, r) in &state.repos {
        for (tag, md) in &r.tags {
            if !r.manifests.contains_key(md) {
                lines.push(format!(
                    "repository={name} tag={tag}: manifest {md} is not in the repository"
                ));
                mend.push(Op::TagDeleted {
                    repo: name.clone(),
                    tag: tag.clone(),
                });
            }
        }
        for (md, m) in &r.manifests {
            if !state.blobs.contains_key(md) {
                lines.push(format!(
                    "repository={name} manifest={md}: its bytes are not stored"
                ));
            }
            for c in &m.children {
                if !state.blobs.contains_key(c) {
                    lines.push(format!(
                        "repository={name} manifest={md}: child {c} is not stored"
                    ));
                } else if !r.blobs.contains(c) && !r.manifests.contains_key(c) {
                    lines.push(format!(
                        "repository={name} manifest={md}: child {c} is stored but not visible \
                         in the repository"
                    ));
                    relink.push((name.clone(), *c));
                }
            }
        }
    }
    relink.sort();
    relink.dedup();
    mend.extend(
        relink
            .into_iter()
            .map(|(repo, digest)| Op::Link { repo, digest }),
    );
    (lines, mend)
}

/// Children some manifest lists that the index holds no bytes for.
fn unstored_children(state: &State) -> HashSet<Digest> {
    state
        .repos
        .values()
        .flat_map(|r| r.manifests.iter())
        .flat_map(|(md, m)| std::iter::once(md).chain(&m.children))
        .filter(|d| !state.blobs.contains_key(*d))
        .copied()
        .collect()
}
