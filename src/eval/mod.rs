//! The evaluation job as a library call: every case of a dataset through the
//! [`Engine`], per-slice metrics recorded as they finish ([`rows`], the ledger), and the
//! set's summary ([`metrics::summarize`], SPEC 8).
//!
//! Cases are prepared by [`crate::inputs`], as `fcd detect` prepares its inputs: a PNG case
//! is one slice, a NIfTI case the axial slice range of the subject, with the same grid checks
//! and mask rule. A case that cannot be prepared (a grid mismatch, a slice the normalisation
//! of SPEC 2 rejects, a missing modality, an unreadable file, an empty mask) is bad as a
//! whole: it is reported (`skipped <id>: <reason>` on stderr and in metrics.json) and skipped.
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
use crate::io::dataset::{self, Case, Problem};
use crate::metrics::{self, Evaluation};
use crate::precision::Precision;
use crate::slices::SliceRange;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ledger::{abs, Sink};
use rows::{case_slice_ids, slice_id, slice_seed, Row};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
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
    let ds = dataset::discover(job.data)?;
    let key = ledger::run_key(&files, job)?;
    let (mut rows, truncate) = earlier_rows(job, &ds.cases, &key)?;
    let earlier = rows.len();
    let batch = match s.batch {
        Some(0) => bail!("--batch must be at least 1"),
        Some(b) => b,
        None => engine.auto_batch()?.unwrap_or(DEFAULT_BATCH),
    };
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
    let mut sink = Sink::start(job, &run_json, truncate, rows.values())?;
    let mut bad: Vec<Problem> = ds.problems.clone();
    for p in &ds.problems {
        eprintln!("skipped {}: {}", p.id, p.reason);
    }
    let mut runner = Runner {
        engine,
        settings: s,
        size: files.image_size,
        sink: &mut sink,
        evaluated: 0,
    };
    runner.all_cases(&ds.cases, batch, &mut rows, &mut bad)?;
    let evaluated = runner.evaluated;
    bad.sort_by(|a, b| a.id.cmp(&b.id));
    let evaluation = metrics::summarize(rows.values().map(|r| &r.counts), s.threshold, s.radius);
    ledger::finish(job.out, rows.values(), &evaluation, &bad)?;
    Ok(Report {
        evaluated,
        earlier,
        bad_cases: bad,
        evaluation,
    })
}

/// The records of an earlier run that this run keeps (by slice id), and the length to cut
/// records.jsonl to.
fn earlier_rows(
    job: &Job,
    cases: &[Case],
    key: &serde_json::Value,
) -> Result<(BTreeMap<String, Row>, Option<u64>)> {
    if job.restart {
        return Ok((BTreeMap::new(), None));
    }
    let (old_rows, truncate) = ledger::earlier_records(job.out, key)?;
    let expected: BTreeSet<String> = cases
        .iter()
        .flat_map(|c| case_slice_ids(c, job.settings.slices))
        .collect();
    let (kept, stale): (Vec<Row>, Vec<Row>) =
        old_rows.into_iter().partition(|r| expected.contains(&r.id));
    if !stale.is_empty() {
        eprintln!(
            "note: {} records of slices no longer in {} are left out of the metrics",
            stale.len(),
            job.data.display()
        );
    }
    Ok((
        kept.into_iter().map(|r| (r.id.clone(), r)).collect(),
        truncate,
    ))
}

/// The sampling part of a run: slices in batches through the engine, rows to the ledger.
struct Runner<'a> {
    engine: &'a Engine,
    settings: &'a Settings,
    size: usize,
    sink: &'a mut Sink,
    evaluated: usize,
}

impl Runner<'_> {
    /// Evaluates every slice of `cases` not in `rows` yet, `batch` at a time; a case that
    /// cannot be prepared joins `bad`.
    fn all_cases(
        &mut self,
        cases: &[Case],
        batch: usize,
        rows: &mut BTreeMap<String, Row>,
        bad: &mut Vec<Problem>,
    ) -> Result<()> {
        let s = self.settings;
        let todo: usize = cases
            .iter()
            .flat_map(|c| case_slice_ids(c, s.slices))
            .filter(|id| !rows.contains_key(id))
            .count();
        let bar = ProgressBar::new(todo as u64);
        bar.set_style(ProgressStyle::with_template(
            "[{bar:40}] {pos}/{len} slices, {elapsed} (eta {eta})",
        )?);
        let mut pending: Vec<Slice> = Vec::new();
        for case in cases {
            let ids = case_slice_ids(case, s.slices);
            let missing = ids.iter().filter(|id| !rows.contains_key(*id)).count();
            if missing == 0 {
                continue;
            }
            match prepare(case, self.size, s.slices, |id| !rows.contains_key(id)) {
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
                self.flush(&std::mem::replace(&mut pending, rest), rows, &bar)?;
            }
        }
        if !pending.is_empty() {
            self.flush(&pending, rows, &bar)?;
        }
        bar.finish_and_clear();
        Ok(())
    }

    fn flush(
        &mut self,
        batch: &[Slice],
        rows: &mut BTreeMap<String, Row>,
        bar: &ProgressBar,
    ) -> Result<()> {
        let size = self.size;
        let (new, maps) = run_batch(self.engine, self.settings, size, batch)?;
        let maps: Vec<&[f32]> = maps.chunks_exact(size * size).collect();
        self.sink.append(&new, &maps, size)?;
        bar.inc(batch.len() as u64);
        self.evaluated += batch.len();
        rows.extend(new.into_iter().map(|r| (r.id.clone(), r)));
        Ok(())
    }
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
