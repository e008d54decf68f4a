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
//!
//! Beyond one engine: [`run`] spreads batches over several engines (one worker thread each,
//! sampling.rs), and a [`Shard`] of a job runs only the cases the shard owns, with its own
//! ledger under `out/shards/`; [`merge`] turns the finished shards into the slices.csv and
//! metrics.json one process would have written, and [`status`] says how far each got.

mod ledger;
mod merge;
pub mod rows;
mod sampling;
mod shard;

pub use merge::{merge, status, Merged, ShardStatus};
pub use shard::{Shard, SHARDS_DIR};

use crate::engine::{Engine, Weights};
use crate::io::absolute;
use crate::io::atomic;
use crate::io::dataset::{self, Case, Problem};
use crate::io::lock::FolderLock;
use crate::metrics::{self, Evaluation};
use crate::precision::Precision;
use crate::slices::SliceRange;
use anyhow::{bail, Context, Result};
use ledger::Sink;
use rows::{case_slice_ids, Row};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Output file names inside the output directory.
pub const RUN_FILE: &str = "run.json";
pub const RECORDS_FILE: &str = "records.jsonl";
pub const SLICES_FILE: &str = "slices.csv";
pub const METRICS_FILE: &str = "metrics.json";
pub const MAPS_DIR: &str = "maps";
/// The lock file of a ledger's folder (one writer per folder, `crate::io::lock`).
pub const LOCK_FILE: &str = ".fcd.lock";

/// What the results depend on, besides the inputs and the anomaly maps' source.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Dice threshold on the anomaly map.
    pub threshold: f64,
    /// Peak suppression and recall radius in pixels.
    pub radius: f64,
    /// Axial slices of NIfTI cases.
    pub slices: SliceRange,
    /// Slices per batch (does not change results); None: the engines'
    /// [`Engine::auto_batch`], or `DEFAULT_BATCH` where no backend has a memory budget.
    pub batch: Option<usize>,
}

/// The guided sampler's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Noise level N.
    pub steps: usize,
    /// Classifier guidance scale s.
    pub guidance: f64,
    pub hist_match: bool,
    pub seed: u64,
}

/// Where an evaluation's anomaly maps come from.
pub enum Maps<'a> {
    /// The classifier-guided diffusion model: one sampling worker per engine (they must all
    /// hold the same model).
    Diffusion {
        engines: &'a mut [Engine],
        sampling: Sampling,
    },
    /// The naive baseline: the FLAIR itself, `norm01(x0)` (the normalised slice min-max
    /// scaled to [0, 1]) on the network's `image_size` grid; no network runs. `config` is
    /// the config that size came from.
    Flair { config: &'a Path, image_size: usize },
}

impl Maps<'_> {
    /// The config and the side of the network's grid.
    fn grid(&self) -> Result<(&Path, usize)> {
        match self {
            Maps::Diffusion { engines, .. } => {
                let files = ModelFiles::of(engines)?;
                Ok((files.config, files.image_size))
            }
            Maps::Flair { config, image_size } => Ok((config, *image_size)),
        }
    }
}

/// Slices per batch where no backend has a memory budget (the CPU, the FLAIR baseline).
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
    /// Run only this shard's cases, with the ledger in `out/shards/K-of-N`.
    pub shard: Option<Shard>,
    /// Told how the run goes, from the sampling threads too.
    pub events: &'a (dyn Fn(Event) + Sync),
}

impl Job<'_> {
    /// The folder of this job's ledger and results.
    pub fn dir(&self) -> PathBuf {
        match self.shard {
            Some(shard) => shard.dir(self.out),
            None => self.out.to_path_buf(),
        }
    }
}

/// What a run tells its caller as it goes (the command line draws a progress bar).
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// This run will evaluate `slices` slices (those not recorded by earlier runs).
    Start { slices: usize },
    /// A case that cannot be evaluated, why, and how many of the slices announced by
    /// `Start` it takes away (0 for a case found bad before the start).
    Skipped {
        case: &'a str,
        reason: &'a str,
        slices: usize,
    },
    /// `slices` more slices were evaluated and recorded.
    Done { slices: usize },
    /// Something the user should know that does not stop the run.
    Note(&'a str),
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// Slices evaluated by this run.
    pub evaluated: usize,
    /// Slices whose records came from earlier runs.
    pub earlier: usize,
    pub bad_cases: Vec<Problem>,
    pub evaluation: Evaluation,
}

/// The files the diffusion model's results depend on.
struct ModelFiles<'a> {
    config: &'a Path,
    unet: &'a Path,
    classifier: &'a Path,
    image_size: usize,
    precision: Precision,
}

impl<'a> ModelFiles<'a> {
    /// The files of the model `engines` hold (the first engine's: they all hold one model).
    fn of(engines: &'a [Engine]) -> Result<Self> {
        let engine = engines.first().context("an evaluation needs an engine")?;
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

/// Runs the evaluation with anomaly maps from `maps` and writes its outputs.
pub fn run(mut maps: Maps, job: &Job) -> Result<Report> {
    let s = &job.settings;
    let (config, size) = maps.grid()?;
    let mut ds = dataset::discover(job.data)?;
    if let Some(shard) = job.shard {
        ds.cases.retain(|c| shard.owns(&c.id));
        ds.problems.retain(|p| shard.owns(&p.id));
    }
    let dir = job.dir();
    // Held to the end: no other process reads or writes this ledger meanwhile.
    let _lock = FolderLock::acquire(&dir.join(LOCK_FILE), &dir)?;
    for line in atomic::recover(&dir)? {
        (job.events)(Event::Note(&line));
    }
    let key = ledger::run_key(&maps, job)?;
    let (mut rows, truncate) = earlier_rows(job, &dir, &ds.cases, &key)?;
    let earlier = rows.len();
    let batch = match (s.batch, &maps) {
        (Some(0), _) => bail!("--batch must be at least 1"),
        (Some(b), _) => b,
        (None, Maps::Diffusion { engines, .. }) => engines
            .iter()
            .map(Engine::auto_batch)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(DEFAULT_BATCH),
        (None, Maps::Flair { .. }) => DEFAULT_BATCH,
    };
    let mut run_json = json!({
        "fcd_version": env!("CARGO_PKG_VERSION"),
        "key": key,
        "batch": batch,
    });
    let mut paths = json!({"config": absolute(config), "data": absolute(job.data)});
    let device = match &maps {
        Maps::Diffusion { engines, .. } => {
            let files = ModelFiles::of(engines)?;
            paths["unet"] = json!(absolute(files.unet));
            paths["classifier"] = json!(absolute(files.classifier));
            let devices: Vec<String> = engines.iter().map(Engine::device).collect();
            devices.join(", ")
        }
        // The baseline's few operations per slice run on the CPU.
        Maps::Flair { .. } => "cpu".to_string(),
    };
    run_json["paths"] = paths;
    run_json["device"] = json!(device);
    if let Some(shard) = job.shard {
        run_json["shard"] = json!(shard.to_string());
    }
    let mut sink = Sink::start(job, &dir, &run_json, truncate, rows.values())?;
    for p in &ds.problems {
        (job.events)(Event::Skipped {
            case: &p.id,
            reason: &p.reason,
            slices: 0,
        });
    }
    let sampled = sampling::sample(&mut maps, job, size, batch, &ds.cases, &rows, &mut sink)?;
    let evaluated = sampled.rows.len();
    rows.extend(sampled.rows.into_iter().map(|r| (r.id.clone(), r)));
    let mut bad = ds.problems;
    bad.extend(sampled.bad);
    bad.sort_by(|a, b| a.id.cmp(&b.id));
    let evaluation = metrics::summarize(rows.values().map(|r| &r.counts), s.threshold, s.radius);
    ledger::finish(&dir, &key, rows.values(), &evaluation, &bad)?;
    // metrics.json records the bad cases, but metrics of no slice are no result. A shard
    // may own only bad cases: the merge reports on the whole run.
    if rows.is_empty() && job.shard.is_none() {
        bail!(
            "{}: every case was skipped ({} bad cases, listed in {}); nothing was evaluated",
            job.data.display(),
            bad.len(),
            dir.join(METRICS_FILE).display()
        );
    }
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
    dir: &Path,
    cases: &[Case],
    key: &serde_json::Value,
) -> Result<(BTreeMap<String, Row>, Option<u64>)> {
    if job.restart {
        return Ok((BTreeMap::new(), None));
    }
    let (old_rows, truncate) = ledger::earlier_records(dir, key)?;
    let expected = expected_ids(cases, job.settings.slices);
    let (kept, stale): (Vec<Row>, Vec<Row>) =
        old_rows.into_iter().partition(|r| expected.contains(&r.id));
    if !stale.is_empty() {
        let note = format!(
            "{} records of slices no longer in {} are left out of the metrics",
            stale.len(),
            job.data.display()
        );
        (job.events)(Event::Note(&note));
    }
    Ok((
        kept.into_iter().map(|r| (r.id.clone(), r)).collect(),
        truncate,
    ))
}

/// The slice ids of `cases` when every case is good.
fn expected_ids(cases: &[Case], range: SliceRange) -> BTreeSet<String> {
    cases
        .iter()
        .flat_map(|c| case_slice_ids(c, range))
        .collect()
}
