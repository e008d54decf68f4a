//! The evaluation job as a library call: every case of a dataset through the
//! [`Engine`], per-slice metrics recorded as they finish ([`rows`], [`ledger`]), and the
//! set's summary ([`metrics::summarize`], SPEC 8).
//!
//! Cases are prepared by [`crate::inputs`], as `fcd detect` prepares its inputs: a PNG case
//! is one slice, a NIfTI case the axial slice range of the subject, with the same grid checks
//! and mask rule. A case that cannot be prepared (a grid mismatch, a slice the normalisation
//! of SPEC 2 rejects, a missing modality, an unreadable file, an empty mask) is bad as a
//! whole: it is reported ("skipped <id>: <reason>" on stderr and in metrics.json) and skipped.
//!
//! Reproducibility and resumption: the initial noise of each slice comes from
//! [`crate::engine::seeded_noise`] seeded by the FNV-1a hash of the seed and the slice id
//! ([`rows::slice_seed`]), so a slice's result does not depend on the batch it ran in or on which
//! run did it. Every finished slice is appended to `records.jsonl` (flushed per batch); a
//! rerun reads it and runs only the slices not recorded yet. The records hold integer counts
//! only (overlaps and predicted areas at the threshold and at `k / 100`, squared peak distances),
//! so metrics.json computed from them after a resume is exactly what [`metrics::evaluate`]
//! gives on the anomaly maps. `run.json` pins the inputs (content hashes of the config and
//! checkpoints, the dataset path) and settings that records depend on; a rerun with different
//! ones is refused.

mod ledger;
pub mod rows;

use crate::engine::{seeded_noise, DetectOptions, Engine, Weights};
use crate::inputs::{self, Prepared};
use crate::io::atomic::write_atomic;
use crate::io::dataset::{self, Case, Problem};
use crate::metrics::{self, Evaluation};
use crate::precision::Precision;
use crate::slices::SliceRange;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ledger::{abs, Sink};
use rows::{case_slice_ids, csv_text, slice_id, slice_seed, Row};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Output file names inside the output directory.
pub const RUN_FILE: &str = "run.json";
pub const RECORDS_FILE: &str = "records.jsonl";
pub const SLICES_FILE: &str = "slices.csv";
pub const METRICS_FILE: &str = "metrics.json";
pub const MAPS_DIR: &str = "maps";

/// What the results depend on, besides the inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Noise level N.
    pub steps: usize,
    /// Classifier guidance scale s.
    pub guidance: f64,
    pub hist_match: bool,
    /// Dice threshold on the anomaly map.
    pub threshold: f64,
    /// Peak suppression and recall radius in pixels.
    pub radius: f64,
    pub seed: u64,
    /// Axial slices of NIfTI cases.
    pub slices: SliceRange,
    /// Slices per call of the sampler (does not change results); None: the engine's
    /// [`Engine::auto_batch`], or `DEFAULT_BATCH` where the backend has no memory budget.
    pub batch: Option<usize>,
}

/// Slices per sampler call on a backend without a memory budget (the CPU).
pub const DEFAULT_BATCH: usize = 8;

/// One evaluation run.
pub struct Job<'a> {
    pub data: &'a Path,
    pub out: &'a Path,
    pub settings: Settings,
    /// Discard earlier records in `out` instead of resuming.
    pub restart: bool,
    /// Also write each slice's anomaly map to `out/maps/<id>.npy`.
    pub save_maps: bool,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// Slices run through the sampler by this run.
    pub evaluated: usize,
    /// Slices whose records came from earlier runs.
    pub earlier: usize,
    pub bad_cases: Vec<Problem>,
    pub evaluation: Evaluation,
}

/// The files an evaluation's results depend on.
struct ModelFiles<'a> {
    config: &'a Path,
    unet: &'a Path,
    classifier: &'a Path,
    image_size: usize,
    precision: Precision,
}

impl<'a> ModelFiles<'a> {
    fn of(engine: &'a Engine) -> Result<Self> {
        let file = |w: &'a Weights| match w {
            Weights::File(p) => Ok(p.as_path()),
            Weights::Random(_) => bail!("an evaluation needs checkpoints, not random weights"),
        };
        Ok(ModelFiles {
            config: engine.config_path(),
            unet: file(engine.unet_weights())?,
            classifier: file(engine.classifier_weights())?,
            image_size: engine.config().unet.image_size,
            precision: engine.precision(),
        })
    }
}

/// One slice ready for the sampler: raw values at network size and its mask.
struct Slice {
    id: String,
    flair: Vec<f32>,
    t1: Vec<f32>,
    mask: Vec<bool>,
}

/// The slices of `case` that `wanted` selects; every slice of the case is checked so that a
/// case is good or bad as a whole.
fn prepare(
    case: &Case,
    size: usize,
    range: SliceRange,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<Slice>> {
    let p: Prepared = inputs::read(&case.flair, &case.t1, case.roi.as_deref(), range, size)?;
    let hw = size * size;
    let ids: Vec<String> = match p.origin {
        inputs::Origin::Volume { range, .. } => (range.first..=range.last)
            .map(|z| slice_id(&case.id, z))
            .collect(),
        _ => vec![case.id.clone()],
    };
    Ok(ids
        .into_iter()
        .enumerate()
        .filter(|(_, id)| wanted(id))
        .map(|(i, id)| {
            let part = i * hw..(i + 1) * hw;
            Slice {
                id,
                flair: p.flair.data[part.clone()].to_vec(),
                t1: p.t1.data[part.clone()].to_vec(),
                mask: match &p.mask {
                    Some(m) => m[part].to_vec(),
                    None => vec![false; hw],
                },
            }
        })
        .collect())
}

/// Runs the evaluation on `engine` and writes its outputs.
pub fn run(engine: &Engine, job: &Job) -> Result<Report> {
    let s = &job.settings;
    let files = ModelFiles::of(engine)?;
    let size = files.image_size;
    let ds = dataset::discover(job.data)?;
    let key = ledger::run_key(&files, job)?;
    let (old_rows, truncate) = if job.restart {
        (Vec::new(), None)
    } else {
        ledger::earlier_records(job.out, &key)?
    };

    let expected: BTreeSet<String> = ds
        .cases
        .iter()
        .flat_map(|c| case_slice_ids(c, s.slices))
        .collect();
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut stale = 0;
    for r in old_rows {
        if expected.contains(&r.id) {
            rows.insert(r.id.clone(), r);
        } else {
            stale += 1;
        }
    }
    if stale > 0 {
        eprintln!(
            "note: {stale} records of slices no longer in {} are left out of the metrics",
            job.data.display()
        );
    }
    let earlier = rows.len();
    let todo = expected.len() - earlier;
    let batch = match s.batch {
        Some(0) => bail!("--batch must be at least 1"),
        Some(b) => b,
        None => engine.auto_batch()?.unwrap_or(DEFAULT_BATCH),
    };

    let out = job.out;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if job.restart {
        ledger::remove_outputs(out)?;
    }
    let run_json = json!({
        "fcd_version": env!("CARGO_PKG_VERSION"),
        "key": key,
        "paths": {
            "config": abs(files.config), "unet": abs(files.unet),
            "classifier": abs(files.classifier), "data": abs(job.data),
        },
        "device": engine.device(),
        "batch": batch,
    });
    write_atomic(
        &out.join(RUN_FILE),
        serde_json::to_string_pretty(&run_json)?.as_bytes(),
    )?;
    let mut sink = Sink::open(out, truncate, rows.values(), job.save_maps)?;

    let mut bad: Vec<Problem> = ds.problems.clone();
    for p in &ds.problems {
        eprintln!("skipped {}: {}", p.id, p.reason);
    }
    let bar = ProgressBar::new(todo as u64);
    bar.set_style(ProgressStyle::with_template(
        "[{bar:40}] {pos}/{len} slices, {elapsed} (eta {eta})",
    )?);
    let mut evaluated = 0;
    let mut pending: Vec<Slice> = Vec::new();
    let mut flush = |batch: Vec<Slice>, rows: &mut BTreeMap<String, Row>| -> Result<()> {
        let (new, maps) = run_batch(engine, s, size, &batch)?;
        let maps: Vec<&[f32]> = maps.chunks_exact(size * size).collect();
        sink.append(&new, &maps, size)?;
        bar.inc(batch.len() as u64);
        evaluated += batch.len();
        for r in new {
            rows.insert(r.id.clone(), r);
        }
        Ok(())
    };
    for case in &ds.cases {
        let ids = case_slice_ids(case, s.slices);
        let missing = ids.iter().filter(|id| !rows.contains_key(*id)).count();
        if missing == 0 {
            continue;
        }
        match prepare(case, size, s.slices, |id| !rows.contains_key(id)) {
            Ok(slices) => pending.extend(slices),
            Err(e) => {
                let reason = format!("{e:#}");
                bar.suspend(|| eprintln!("skipped {}: {reason}", case.id));
                bar.set_length(bar.length().unwrap_or(0).saturating_sub(missing as u64));
                bad.push(Problem {
                    id: case.id.clone(),
                    reason,
                });
            }
        }
        while pending.len() >= batch {
            let rest = pending.split_off(batch);
            flush(std::mem::replace(&mut pending, rest), &mut rows)?;
        }
    }
    if !pending.is_empty() {
        flush(pending, &mut rows)?;
    }
    bar.finish_and_clear();

    bad.sort_by(|a, b| a.id.cmp(&b.id));
    let evaluation = metrics::summarize(rows.values().map(|r| &r.counts), s.threshold, s.radius);
    write_atomic(&out.join(SLICES_FILE), csv_text(rows.values()).as_bytes())?;
    let mut metrics = serde_json::to_value(&evaluation)?;
    metrics["n_bad_cases"] = json!(bad.len());
    metrics["bad_cases"] = bad
        .iter()
        .map(|p| json!({"id": p.id, "reason": p.reason}))
        .collect();
    write_atomic(
        &out.join(METRICS_FILE),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    Ok(Report {
        evaluated,
        earlier,
        bad_cases: bad,
        evaluation,
    })
}

/// Samples one batch; returns its rows and its anomaly maps (`[B, size, size]`).
fn run_batch(
    engine: &Engine,
    s: &Settings,
    size: usize,
    batch: &[Slice],
) -> Result<(Vec<Row>, Vec<f32>)> {
    let shape = vec![batch.len(), size, size, 1];
    let gather = |f: fn(&Slice) -> &[f32]| batch.iter().flat_map(f).copied().collect();
    let noise: Vec<f32> = batch
        .iter()
        .flat_map(|p| seeded_noise(&[1, size, size, 1], slice_seed(s.seed, &p.id)).data)
        .collect();
    let prepared = Prepared {
        origin: inputs::Origin::Slices,
        flair: Tensor::new(shape.clone(), gather(|p| &p.flair))?,
        t1: Tensor::new(shape.clone(), gather(|p| &p.t1))?,
        mask: None,
    };
    let det = engine
        .detect_prepared(
            &prepared,
            DetectOptions {
                steps: Some(s.steps),
                guidance: Some(s.guidance),
                noise: Some(Tensor::new(shape, noise)?),
                hist_match: s.hist_match,
                batch: Some(batch.len()),
                ..Default::default()
            },
        )
        .with_context(|| {
            format!(
                "sampling slices {}..{}",
                batch[0].id,
                batch[batch.len() - 1].id
            )
        })?;
    let maps = det.anomaly.data;
    let rows = batch
        .iter()
        .zip(maps.chunks_exact(size * size))
        .map(|(p, a)| Row::new(&p.id, a, &p.mask, size, s.threshold, s.radius))
        .collect();
    Ok((rows, maps))
}
