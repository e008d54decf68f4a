//! A sharded evaluation's output folder as a whole: how far each shard got, and the merge of
//! the finished shards into the slices.csv and metrics.json one process would have written.
//!
//! The merge redoes what the end of a one-process run does on the union of the shards: the
//! rows in id order into slices.csv and [`metrics::summarize`], the bad cases sorted by id into
//! metrics.json. Shards own disjoint cases, so the union holds each slice once.

use super::ledger;
use super::rows::Row;
use super::shard::{Shard, SHARDS_DIR};
use super::{expected_ids, LOCK_FILE, RUN_FILE};
use crate::io::dataset::{self, Problem};
use crate::io::lock::FolderLock;
use crate::metrics::{self, Evaluation};
use crate::slices::SliceRange;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// How far one shard got.
#[derive(Clone, Debug)]
pub struct ShardStatus {
    pub shard: Shard,
    /// Whether a run of the shard has started (its run.json exists).
    pub started: bool,
    /// Slices recorded.
    pub done: usize,
    /// Slices of the shard's cases, less those of the bad cases known so far.
    pub expected: usize,
    /// The bad cases its finished run reported; before that, the folders the dataset's
    /// layout already rules out.
    pub bad_cases: Vec<Problem>,
    /// Its last run finished and recorded every expected slice.
    pub complete: bool,
}

/// The result of a merge, as written to the output folder.
#[derive(Clone, Debug)]
pub struct Merged {
    pub evaluation: Evaluation,
    pub bad_cases: Vec<Problem>,
}

/// A shard's status and its records.
struct Surveyed {
    status: ShardStatus,
    rows: Vec<Row>,
}

/// The shard folders under `out`, read against the dataset named in their run.json.
fn survey(out: &Path) -> Result<(Value, Vec<Surveyed>)> {
    let root = out.join(SHARDS_DIR);
    let mut found: Vec<Shard> = Vec::new();
    if root.is_dir() {
        for entry in fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))? {
            let entry = entry.with_context(|| format!("reading {}", root.display()))?;
            found.extend(Shard::from_dir_name(&entry.file_name().to_string_lossy()));
        }
    }
    found.sort();
    let Some(first) = found.first() else {
        bail!(
            "{}: no shard folders: run `fcd eval --shard K/N` (or a Slurm job array) first",
            root.display()
        );
    };
    let count = first.count;
    if let Some(other) = found.iter().find(|s| s.count != count) {
        bail!(
            "{} holds shards of {count} and of {}: one sharded run per --out",
            root.display(),
            other.count
        );
    }
    let mut key: Option<(Value, Shard)> = None;
    for &shard in &found {
        let Some(k) = ledger::recorded_key(&shard.dir(out))? else {
            continue;
        };
        match &key {
            None => key = Some((k, shard)),
            Some((first_key, first)) if *first_key != k => bail!(
                "shards {first} and {shard} were run with other inputs or settings (see their {RUN_FILE})"
            ),
            Some(_) => {}
        }
    }
    let (key, _) = key.with_context(|| format!("{}: no shard has started", root.display()))?;
    let data = key["data"]
        .as_str()
        .with_context(|| format!("{}: the run key names no dataset", root.display()))?;
    let range: SliceRange = key["slices"]
        .as_str()
        .with_context(|| format!("{}: the run key has no slice range", root.display()))?
        .parse()?;
    let ds = dataset::discover(Path::new(data))?;
    let shards = (0..count)
        .map(|index| {
            let shard = Shard { index, count };
            let dir = shard.dir(out);
            let cases: Vec<_> = ds
                .cases
                .iter()
                .filter(|c| shard.owns(&c.id))
                .cloned()
                .collect();
            let started = dir.join(RUN_FILE).exists();
            let wanted = expected_ids(&cases, range);
            let rows: Vec<Row> = if started {
                ledger::read_records(&dir)?.0
            } else {
                Vec::new()
            };
            // Records of slices no longer in the dataset are left out, as a resumed run
            // leaves them out.
            let rows: BTreeMap<String, Row> = rows
                .into_iter()
                .filter(|r| wanted.contains(&r.id))
                .map(|r| (r.id.clone(), r))
                .collect();
            let finished = if started {
                ledger::finished_bad_cases(&dir)?
            } else {
                None
            };
            let complete = finished.is_some();
            let bad_cases = finished.unwrap_or_else(|| {
                ds.problems
                    .iter()
                    .filter(|p| shard.owns(&p.id))
                    .cloned()
                    .collect()
            });
            let bad: BTreeSet<&str> = bad_cases.iter().map(|p| p.id.as_str()).collect();
            let good: Vec<_> = cases
                .into_iter()
                .filter(|c| !bad.contains(c.id.as_str()))
                .collect();
            let expected = expected_ids(&good, range).len();
            Ok(Surveyed {
                status: ShardStatus {
                    shard,
                    started,
                    done: rows.len(),
                    expected,
                    complete: complete && rows.len() >= expected,
                    bad_cases,
                },
                rows: rows.into_values().collect(),
            })
        })
        .collect::<Result<_>>()?;
    Ok((key, shards))
}

/// How far each shard of the sharded evaluation in `out` got, in shard order.
pub fn status(out: &Path) -> Result<Vec<ShardStatus>> {
    Ok(survey(out)?.1.into_iter().map(|s| s.status).collect())
}

/// Writes slices.csv and metrics.json of the sharded evaluation in `out` from its shards,
/// which must all be complete.
pub fn merge(out: &Path) -> Result<Merged> {
    // The folder's and every shard's lock, held to the end: no shard runs while its
    // records are merged, and no second merge or one-process run writes here.
    let mut locks = vec![FolderLock::acquire(&out.join(LOCK_FILE), out)?];
    let root = out.join(SHARDS_DIR);
    if root.is_dir() {
        for entry in fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))? {
            let dir = entry
                .with_context(|| format!("reading {}", root.display()))?
                .path();
            if dir.is_dir() {
                locks.push(FolderLock::acquire(&dir.join(LOCK_FILE), &dir)?);
            }
        }
    }
    ensure!(
        !out.join(RUN_FILE).exists(),
        "{} holds a one-process run ({RUN_FILE}); merging shards there would overwrite its results",
        out.display()
    );
    let (key, shards) = survey(out)?;
    let unfinished: Vec<String> = shards
        .iter()
        .map(|s| &s.status)
        .filter(|s| !s.complete)
        .map(|s| {
            if s.started {
                format!("shard {} has {} of {} slices", s.shard, s.done, s.expected)
            } else {
                format!("shard {} has not started", s.shard)
            }
        })
        .collect();
    if !unfinished.is_empty() {
        bail!(
            "cannot merge {}: {}; rerun those shards (they resume)",
            out.display(),
            unfinished.join(", ")
        );
    }
    let number = |name: &str| {
        key[name]
            .as_f64()
            .with_context(|| format!("the run key has no {name}"))
    };
    let (threshold, radius) = (number("threshold")?, number("radius")?);
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut bad_cases: Vec<Problem> = Vec::new();
    for s in shards {
        rows.extend(s.rows.into_iter().map(|r| (r.id.clone(), r)));
        bad_cases.extend(s.status.bad_cases);
    }
    bad_cases.sort_by(|a, b| a.id.cmp(&b.id));
    let evaluation = metrics::summarize(rows.values().map(|r| &r.counts), threshold, radius);
    ledger::finish(out, &key, rows.values(), &evaluation, &bad_cases)?;
    Ok(Merged {
        evaluation,
        bad_cases,
    })
}
