//! The evaluation job as a library call: every case of a dataset through
//! [`pipeline::detect`], per-slice metrics recorded as they finish, and the set's summary
//! (SPEC 8, [`crate::metrics`]).
//!
//! Slices and masks:
//! - A PNG case is one slice. T1w and FLAIR must have the same size; both are resized to the
//!   config's `image_size` with [`slices::resize_bilinear`] when they differ from it.
//! - A NIfTI case is the axial slice range of the subject ([`slices::to_network`]); T1w, FLAIR
//!   and the mask must share one voxel grid.
//! - A mask is `roi > 0`. Resizing it resamples the 0/1 image bilinearly and keeps pixels
//!   `>= 0.5`, so a lesion keeps its area and shape rather than growing or shrinking by the
//!   interpolation's blur.
//! - A slice the normalisation of SPEC 2 rejects (constant, non-finite), a T1w / FLAIR / mask
//!   grid mismatch, a missing modality, an unreadable file or a patient's mask with no pixel
//!   `> 0` makes its whole case bad: it is reported ("skipped <id>: <reason>" on stderr and in
//!   metrics.json) and skipped.
//!
//! Reproducibility and resumption: the initial noise of each slice comes from
//! [`pipeline::seeded_noise`] seeded by the FNV-1a hash of the seed and the slice id
//! ([`slice_seed`]), so a slice's result does not depend on the batch it ran in or on which
//! run did it. Every finished slice is appended to `records.jsonl` (flushed per batch); a
//! rerun reads it and runs only the slices not recorded yet. The records hold integer counts
//! only (overlaps and predicted areas at the threshold and at `k / 100`, squared peak distances),
//! so metrics.json computed from them after a resume is exactly what [`metrics::evaluate`]
//! gives on the anomaly maps. `run.json` pins the inputs (content hashes of the config and
//! checkpoints, the dataset path) and settings that records depend on; a rerun with different
//! ones is refused.

use crate::backend::Backend;
use crate::config::Config;
use crate::io::atomic::write_atomic;
use crate::io::dataset::{self, Case, CaseKind, Problem};
use crate::io::{npy, png, volume};
use crate::metrics::{self, Evaluation};
use crate::model::{Net, NetKind};
use crate::pipeline;
use crate::post;
use crate::precision::Precision;
use crate::slices::{self, SliceRange};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Output file names inside the output directory.
pub const RUN_FILE: &str = "run.json";
pub const RECORDS_FILE: &str = "records.jsonl";
pub const SLICES_FILE: &str = "slices.csv";
pub const METRICS_FILE: &str = "metrics.json";
pub const MAPS_DIR: &str = "maps";

/// Header of slices.csv.
pub const CSV_HEADER: &str =
    "id,lesion,dice,nearest_1,nearest_5,nearest_10,recalled_1,recalled_5,recalled_10";

/// Thresholds of the best-threshold search: `k / 100` for these `k` (as in [`metrics`]).
const THRESHOLD_STEPS: usize = 101;

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
    /// Slices per call of the sampler (does not change results); None: as
    /// many as fit the GPU's free memory (`pipeline::auto_batch`), or
    /// `DEFAULT_BATCH` where the backend has no memory budget.
    pub batch: Option<usize>,
    /// Arithmetic of the networks (changes results: part of the resume key).
    pub precision: Precision,
}

/// Slices per sampler call on a backend without a memory budget (the CPU).
pub const DEFAULT_BATCH: usize = 8;

/// One evaluation run.
pub struct Job<'a> {
    pub cfg: &'a Config,
    pub config: &'a Path,
    pub unet: &'a Path,
    pub classifier: &'a Path,
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

/// One slice's results as stored in records.jsonl: integers and booleans only, so that
/// reading them back loses nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    /// Mask pixels (`> 0`) at network resolution; 0 for a healthy slice.
    pub lesion_pixels: usize,
    /// `|A >= threshold|` and `|(A >= threshold) ∩ M|`.
    pub predicted: usize,
    pub overlap: usize,
    /// The greedy peaks, (row, col).
    pub peaks: Vec<(usize, usize)>,
    /// Squared distance from the nearest of the first 1, 5, 10 peaks to the lesion.
    pub nearest_sq: [Option<usize>; 3],
    /// Recalled at 1, 5, 10 (lesion slices only).
    pub recalled: [Option<bool>; 3],
    /// `|A >= k/100|` and `|(A >= k/100) ∩ M|` for `k = 0..=100` (lesion slices only: healthy
    /// slices take no part in Dice).
    pub predicted_at: Vec<usize>,
    pub overlap_at: Vec<usize>,
}

impl Row {
    /// Evaluates one `size x size` anomaly map against its mask.
    pub fn new(
        id: &str,
        a: &[f32],
        mask: &[bool],
        size: usize,
        threshold: f64,
        radius: f64,
    ) -> Row {
        let rec = metrics::slice_record(a, mask, size, size, threshold, radius);
        let lesion = rec.lesion_pixels > 0;
        let (predicted, overlap) = counts(a, mask, threshold);
        let (predicted_at, overlap_at) = if lesion {
            (0..THRESHOLD_STEPS)
                .map(|k| counts(a, mask, k as f64 / 100.0))
                .unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        // Distances are square roots of integers; squaring and rounding recovers them exactly.
        let sq = |d: Option<f64>| d.map(|d| (d * d).round() as usize);
        Row {
            id: id.to_string(),
            lesion_pixels: rec.lesion_pixels,
            predicted,
            overlap,
            peaks: rec.peaks,
            nearest_sq: [
                sq(rec.distance_at_1),
                sq(rec.distance_at_5),
                sq(rec.distance_at_10),
            ],
            recalled: [rec.recalled_at_1, rec.recalled_at_5, rec.recalled_at_10],
            predicted_at,
            overlap_at,
        }
    }

    /// Dice at the run's threshold, `None` for a healthy slice ([`metrics::dice`]'s formula).
    pub fn dice(&self) -> Option<f64> {
        (self.lesion_pixels > 0).then(|| dice(self.overlap, self.predicted, self.lesion_pixels))
    }

    fn check(&self) -> Result<()> {
        let n = if self.lesion_pixels > 0 {
            THRESHOLD_STEPS
        } else {
            0
        };
        ensure!(
            self.predicted_at.len() == n && self.overlap_at.len() == n,
            "record {} holds {} and {} threshold counts, expected {n}",
            self.id,
            self.predicted_at.len(),
            self.overlap_at.len()
        );
        Ok(())
    }

    fn csv_line(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_default();
        let mut cells = vec![
            csv_field(&self.id),
            self.lesion_pixels.to_string(),
            opt(self.dice().map(|d| d.to_string())),
        ];
        cells.extend(
            self.nearest_sq
                .iter()
                .map(|d| opt(d.map(|d| (d as f64).sqrt().to_string()))),
        );
        cells.extend(
            self.recalled
                .iter()
                .map(|r| opt(r.map(|r| u8::from(r).to_string()))),
        );
        cells.join(",")
    }
}

/// `|A >= th|` and `|(A >= th) ∩ M|`, comparing in float64 as [`metrics::dice`] does.
fn counts(a: &[f32], mask: &[bool], th: f64) -> (usize, usize) {
    let (mut pred, mut both) = (0, 0);
    for (&v, &m) in a.iter().zip(mask) {
        let p = f64::from(v) >= th;
        pred += usize::from(p);
        both += usize::from(p && m);
    }
    (pred, both)
}

fn dice(both: usize, pred: usize, truth: usize) -> f64 {
    if pred + truth == 0 {
        return 1.0;
    }
    2.0 * both as f64 / (pred + truth) as f64
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The summary of recorded slices, in the given order; equal to what [`metrics::evaluate`]
/// computes from the maps in that order.
pub fn summarize(rows: &[&Row], threshold: f64, radius: f64) -> Evaluation {
    let lesion: Vec<&Row> = rows
        .iter()
        .copied()
        .filter(|r| r.lesion_pixels > 0)
        .collect();
    let rate = |i: usize| mean(rows.iter().filter_map(|r| r.recalled[i]).map(f64::from));
    let mut best: Option<(f64, f64)> = None;
    for k in 0..THRESHOLD_STEPS {
        let th = k as f64 / 100.0;
        let d = mean(
            lesion
                .iter()
                .map(|r| dice(r.overlap_at[k], r.predicted_at[k], r.lesion_pixels)),
        );
        if let Some(d) = d {
            // Strict `>`: ties keep the smaller threshold, as in metrics::evaluate.
            if best.is_none_or(|(_, bd)| d > bd) {
                best = Some((th, d));
            }
        }
    }
    Evaluation {
        n_slices: rows.len(),
        n_lesion_slices: lesion.len(),
        threshold,
        dice_at_threshold: mean(rows.iter().filter_map(|r| r.dice())),
        best_threshold: best.map(|b| b.0),
        dice_best: best.map(|b| b.1),
        radius,
        r_at_1: rate(0),
        r_at_5: rate(1),
        r_at_10: rate(2),
    }
}

/// Sequential mean, the summation order of [`metrics::evaluate`].
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// 64-bit FNV-1a, fed incrementally.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The noise seed of slice `id`: FNV-1a over the run's seed (8 bytes, little-endian) followed
/// by the id's UTF-8 bytes.
pub fn slice_seed(seed: u64, id: &str) -> u64 {
    let mut h = Fnv1a::new();
    h.update(&seed.to_le_bytes());
    h.update(id.as_bytes());
    h.0
}

/// The id of axial slice `z` of NIfTI case `case`.
pub fn slice_id(case: &str, z: usize) -> String {
    format!("{case}_z{z:03}")
}

/// The slice ids a case yields when it is good.
pub fn case_slice_ids(case: &Case, range: SliceRange) -> Vec<String> {
    match case.kind {
        CaseKind::PngSlice => vec![case.id.clone()],
        CaseKind::NiftiSubject => (range.first..=range.last)
            .map(|z| slice_id(&case.id, z))
            .collect(),
    }
}

fn file_hash(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Fnv1a::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:016x}", h.0))
}

fn abs(p: &Path) -> String {
    fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// The part of run.json a resumed run must match, passed through JSON text once so that it
/// compares equal to the same key read back from the file.
fn run_key(job: &Job) -> Result<Value> {
    let s = &job.settings;
    let key = json!({
        "config_fnv1a": file_hash(job.config)?,
        "unet_fnv1a": file_hash(job.unet)?,
        "classifier_fnv1a": file_hash(job.classifier)?,
        "data": abs(job.data),
        "image_size": job.cfg.unet.image_size,
        "steps": s.steps,
        "guidance": s.guidance,
        "hist_match": s.hist_match,
        "threshold": s.threshold,
        "radius": s.radius,
        "seed": s.seed,
        "slices": format!("{}:{}", s.slices.first, s.slices.last),
    });
    // fp32 runs keep the key they had before precisions existed.
    let mut key = key;
    if s.precision != Precision::Fp32 {
        key["precision"] = json!(s.precision.label());
    }
    Ok(serde_json::from_str(&key.to_string())?)
}

/// Records of an earlier run in `out`: checks its run.json against `key` and reads
/// records.jsonl. Returns the rows and the length of the file's complete lines (a run killed
/// while appending can leave a partial last line, which is dropped).
fn earlier_records(out: &Path, key: &Value) -> Result<(Vec<Row>, Option<u64>)> {
    let run_path = out.join(RUN_FILE);
    let rec_path = out.join(RECORDS_FILE);
    if !run_path.exists() {
        ensure!(
            !rec_path.exists(),
            "{} exists but {} does not: use a new --out or --restart",
            rec_path.display(),
            run_path.display()
        );
        return Ok((Vec::new(), None));
    }
    let text =
        fs::read_to_string(&run_path).with_context(|| format!("reading {}", run_path.display()))?;
    let run: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON (use --restart)", run_path.display()))?;
    let old = &run["key"];
    if old != key {
        let differ: Vec<String> = key
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| old.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k} {} (now {v})",
                    old.get(k.as_str()).unwrap_or(&Value::Null)
                )
            })
            .collect();
        bail!(
            "{} was started with other inputs or settings ({}): use a new --out, or --restart to discard its results",
            out.display(),
            differ.join(", ")
        );
    }
    if !rec_path.exists() {
        return Ok((Vec::new(), None));
    }
    let bytes = fs::read(&rec_path).with_context(|| format!("reading {}", rec_path.display()))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..complete])
        .with_context(|| format!("{}: not UTF-8 text", rec_path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(line)
            .map_err(anyhow::Error::from)
            .and_then(|r: Row| r.check().map(|()| r))
            .with_context(|| {
                format!(
                    "{} line {}: not a slice record (delete the line, or use --restart)",
                    rec_path.display(),
                    i + 1
                )
            })?;
        rows.push(row);
    }
    let truncate = (complete < bytes.len()).then_some(complete as u64);
    Ok((rows, truncate))
}

/// One slice ready for the sampler: raw values at network size and its mask.
struct Prepared {
    id: String,
    flair: Vec<f32>,
    t1: Vec<f32>,
    mask: Vec<bool>,
}

/// Checks that a slice can be normalised (SPEC 2), naming where it came from.
fn check_slice(v: &[f32], what: impl FnOnce() -> String) -> Result<()> {
    post::normalize_slice(v).with_context(what)?;
    Ok(())
}

fn fit(v: Vec<f32>, h: usize, w: usize, size: usize) -> Vec<f32> {
    if (h, w) == (size, size) {
        v
    } else {
        slices::resize_bilinear(&v, h, w, size, size)
    }
}

/// `roi > 0`, resized to `size x size` (bilinear on 0/1, kept where `>= 0.5`).
fn mask_at(roi: &[f32], h: usize, w: usize, size: usize) -> Vec<bool> {
    let bin: Vec<f32> = roi.iter().map(|&v| f32::from(u8::from(v > 0.0))).collect();
    fit(bin, h, w, size).iter().map(|&v| v >= 0.5).collect()
}

fn prepare_png(case: &Case, size: usize) -> Result<Prepared> {
    let (h, w, t1) = png::read_gray(&case.t1)?;
    let (fh, fw, flair) = png::read_gray(&case.flair)?;
    ensure!(
        (h, w) == (fh, fw),
        "T1w {} ({h} x {w}) and FLAIR {} ({fh} x {fw}) are not on the same grid",
        case.t1.display(),
        case.flair.display()
    );
    let mask = match &case.roi {
        None => vec![false; size * size],
        Some(roi) => {
            let (rh, rw, r) = png::read_gray(roi)?;
            ensure!(
                (rh, rw) == (h, w),
                "mask {} ({rh} x {rw}) and FLAIR {} ({h} x {w}) are not on the same grid",
                roi.display(),
                case.flair.display()
            );
            let lesion = r.iter().filter(|&&v| v > 0.0).count();
            ensure!(
                lesion > 0,
                "empty mask: {} has no pixel > 0 (a healthy control has no roi file)",
                roi.display()
            );
            let m = mask_at(&r, h, w, size);
            ensure!(
                m.contains(&true),
                "the lesion of {lesion} pixels in {} vanishes when resized from {h} x {w} to {size} x {size}",
                roi.display()
            );
            m
        }
    };
    let (t1, flair) = (fit(t1, h, w, size), fit(flair, h, w, size));
    check_slice(&flair, || case.flair.display().to_string())?;
    check_slice(&t1, || case.t1.display().to_string())?;
    Ok(Prepared {
        id: case.id.clone(),
        flair,
        t1,
        mask,
    })
}

/// The slices of a NIfTI case that `wanted` selects; every slice of the range is checked so
/// that a case is good or bad as a whole.
fn prepare_nifti(
    case: &Case,
    size: usize,
    range: SliceRange,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<Prepared>> {
    let t1 = volume::read_volume(&case.t1)?;
    let flair = volume::read_volume(&case.flair)?;
    volume::same_grid(&t1, &flair)?;
    let mask = match &case.roi {
        None => None,
        Some(path) => {
            let roi = volume::read_volume(path)?;
            volume::same_grid(&flair, &roi)?;
            ensure!(
                roi.data.iter().any(|&v| v > 0.0),
                "empty mask: {} has no voxel > 0 (a healthy control has no roi file)",
                path.display()
            );
            let bin = roi
                .data
                .iter()
                .map(|&v| f32::from(u8::from(v > 0.0)))
                .collect();
            let m = slices::to_network(&volume::Volume { data: bin, ..roi }, range, size)?;
            Some(m.iter().map(|&v| v >= 0.5).collect::<Vec<bool>>())
        }
    };
    let f = slices::to_network(&flair, range, size)?;
    let t = slices::to_network(&t1, range, size)?;
    let hw = size * size;
    let mut out = Vec::new();
    for (i, z) in (range.first..=range.last).enumerate() {
        let part = i * hw..(i + 1) * hw;
        check_slice(&f[part.clone()], || {
            format!("{}: axial slice z = {z}", case.flair.display())
        })?;
        check_slice(&t[part.clone()], || {
            format!("{}: axial slice z = {z}", case.t1.display())
        })?;
        let id = slice_id(&case.id, z);
        if wanted(&id) {
            out.push(Prepared {
                id,
                flair: f[part.clone()].to_vec(),
                t1: t[part.clone()].to_vec(),
                mask: match &mask {
                    Some(m) => m[part].to_vec(),
                    None => vec![false; hw],
                },
            });
        }
    }
    Ok(out)
}

fn prepare(
    case: &Case,
    size: usize,
    range: SliceRange,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<Prepared>> {
    match case.kind {
        CaseKind::PngSlice => Ok(vec![prepare_png(case, size)?]),
        CaseKind::NiftiSubject => prepare_nifti(case, size, range, wanted),
    }
}

fn remove_outputs(out: &Path) -> Result<()> {
    for name in [RUN_FILE, RECORDS_FILE, SLICES_FILE, METRICS_FILE] {
        let p = out.join(name);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", p.display()))
            }
            _ => {}
        }
    }
    let maps = out.join(MAPS_DIR);
    if maps.is_dir() {
        fs::remove_dir_all(&maps).with_context(|| format!("removing {}", maps.display()))?;
    }
    Ok(())
}

fn csv_text<'a>(rows: impl Iterator<Item = &'a Row>) -> String {
    let mut text = format!("{CSV_HEADER}\n");
    for r in rows {
        text.push_str(&r.csv_line());
        text.push('\n');
    }
    text
}

/// Appends finished slices to records.jsonl and slices.csv, each flushed and synced per batch.
struct Sink {
    records: File,
    csv: File,
    records_path: PathBuf,
    csv_path: PathBuf,
    maps: Option<PathBuf>,
}

impl Sink {
    fn append(&mut self, rows: &[Row], maps: &[&[f32]], size: usize) -> Result<()> {
        if let Some(dir) = &self.maps {
            for (r, a) in rows.iter().zip(maps) {
                npy::write_f32(&dir.join(format!("{}.npy", r.id)), &[size, size], a)?;
            }
        }
        let mut lines = String::new();
        let mut csv = String::new();
        for r in rows {
            lines.push_str(&serde_json::to_string(r)?);
            lines.push('\n');
            csv.push_str(&r.csv_line());
            csv.push('\n');
        }
        for (f, text, path) in [
            (&mut self.records, &lines, &self.records_path),
            (&mut self.csv, &csv, &self.csv_path),
        ] {
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_data())
                .with_context(|| format!("appending to {}", path.display()))?;
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Runs the evaluation on `backend` (named `device` in run.json) and writes its outputs.
pub fn run<B: Backend>(backend: &B, device: &str, job: &Job) -> Result<Report> {
    let s = &job.settings;
    ensure!(s.batch != Some(0), "--batch must be at least 1");
    let size = job.cfg.unet.image_size;
    let ds = dataset::discover(job.data)?;
    let key = run_key(job)?;
    let (old_rows, truncate) = if job.restart {
        (Vec::new(), None)
    } else {
        earlier_records(job.out, &key)?
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

    // Load the networks before touching the output, so a bad checkpoint leaves it as it was.
    let nets = if todo > 0 {
        let unet = pipeline::load_net(backend, &job.cfg.unet, NetKind::Unet, job.unet)?;
        let cls = pipeline::load_net(
            backend,
            &job.cfg.classifier,
            NetKind::Classifier,
            job.classifier,
        )?;
        Some((unet, cls))
    } else {
        None
    };
    let batch = match (s.batch, &nets) {
        (Some(b), _) => b,
        (None, Some((unet, cls))) => match backend.free_bytes()? {
            Some(free) => pipeline::auto_batch(&unet.spec, &cls.spec, free),
            None => DEFAULT_BATCH,
        },
        (None, None) => DEFAULT_BATCH,
    };

    let out = job.out;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if job.restart {
        remove_outputs(out)?;
    }
    let run_json = json!({
        "fcd_version": env!("CARGO_PKG_VERSION"),
        "key": key,
        "paths": {
            "config": abs(job.config), "unet": abs(job.unet),
            "classifier": abs(job.classifier), "data": abs(job.data),
        },
        "device": device,
        "batch": batch,
    });
    write_atomic(
        &out.join(RUN_FILE),
        serde_json::to_string_pretty(&run_json)?.as_bytes(),
    )?;
    let records_path = out.join(RECORDS_FILE);
    if let Some(len) = truncate {
        let f = OpenOptions::new()
            .write(true)
            .open(&records_path)
            .with_context(|| format!("opening {}", records_path.display()))?;
        f.set_len(len).with_context(|| {
            format!(
                "dropping the partial last line of {}",
                records_path.display()
            )
        })?;
    }
    let csv_path = out.join(SLICES_FILE);
    write_atomic(&csv_path, csv_text(rows.values()).as_bytes())?;
    let maps = job.save_maps.then(|| out.join(MAPS_DIR));
    if let Some(dir) = &maps {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut sink = Sink {
        records: open_append(&records_path)?,
        csv: open_append(&csv_path)?,
        records_path,
        csv_path,
        maps,
    };

    let mut bad: Vec<Problem> = ds.problems.clone();
    for p in &ds.problems {
        eprintln!("skipped {}: {}", p.id, p.reason);
    }
    let bar = ProgressBar::new(todo as u64);
    bar.set_style(ProgressStyle::with_template(
        "[{bar:40}] {pos}/{len} slices, {elapsed} (eta {eta})",
    )?);
    let mut evaluated = 0;
    let mut pending: Vec<Prepared> = Vec::new();
    let mut flush = |batch: Vec<Prepared>, rows: &mut BTreeMap<String, Row>| -> Result<()> {
        let (unet, cls) = nets
            .as_ref()
            .context("internal: slices to evaluate but no networks loaded")?;
        let new = run_batch(backend, job, unet, cls, &batch)?;
        let maps: Vec<&[f32]> = new.1.chunks_exact(size * size).collect();
        sink.append(&new.0, &maps, size)?;
        bar.inc(batch.len() as u64);
        evaluated += batch.len();
        for r in new.0 {
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
    let all: Vec<&Row> = rows.values().collect();
    let evaluation = summarize(&all, s.threshold, s.radius);
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
fn run_batch<B: Backend>(
    backend: &B,
    job: &Job,
    unet: &Net<B>,
    cls: &Net<B>,
    batch: &[Prepared],
) -> Result<(Vec<Row>, Vec<f32>)> {
    let s = &job.settings;
    let size = job.cfg.unet.image_size;
    let shape = vec![batch.len(), size, size, 1];
    let gather = |f: fn(&Prepared) -> &[f32]| batch.iter().flat_map(f).copied().collect();
    let flair = Tensor::new(shape.clone(), gather(|p| &p.flair))?;
    let t1 = Tensor::new(shape.clone(), gather(|p| &p.t1))?;
    let noise: Vec<f32> = batch
        .iter()
        .flat_map(|p| pipeline::seeded_noise(&[1, size, size, 1], slice_seed(s.seed, &p.id)).data)
        .collect();
    let noise = Tensor::new(shape, noise)?;
    let det = pipeline::detect(
        backend,
        job.cfg,
        unet,
        cls,
        &flair,
        &t1,
        &noise,
        s.steps,
        s.guidance as f32,
        s.hist_match,
        |_, _| {},
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_from_counts_equals_metrics_evaluate() {
        let (h, w) = (16, 16);
        let mut maps = Vec::new();
        let mut masks = Vec::new();
        for s in 0..5u32 {
            let a: Vec<f32> = (0..h * w)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761u32.wrapping_add(s)) % 1000) as f32 / 999.0
                })
                .collect();
            let m: Vec<bool> = (0..h * w)
                .map(|i| s != 2 && (i / w) % 5 == s as usize && i % w < 9)
                .collect();
            maps.push(a);
            masks.push(m);
        }
        let maps_ref: Vec<&[f32]> = maps.iter().map(|m| m.as_slice()).collect();
        let masks_ref: Vec<&[bool]> = masks.iter().map(|m| m.as_slice()).collect();
        let (want, recs) = metrics::evaluate(&maps_ref, &masks_ref, h, w, 0.4, 3.0);
        let rows: Vec<Row> = (0..5)
            .map(|i| Row::new(&format!("s{i}"), &maps[i], &masks[i], h, 0.4, 3.0))
            .collect();
        let back: Vec<Row> = rows
            .iter()
            .map(|r| serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap())
            .collect();
        assert_eq!(back, rows);
        let refs: Vec<&Row> = back.iter().collect();
        assert_eq!(summarize(&refs, 0.4, 3.0), want);
        for (r, rec) in back.iter().zip(&recs) {
            assert_eq!(r.dice(), rec.dice);
            let d = r.nearest_sq.map(|d| d.map(|d| (d as f64).sqrt()));
            assert_eq!(
                d,
                [rec.distance_at_1, rec.distance_at_5, rec.distance_at_10]
            );
        }
    }

    #[test]
    fn slice_seeds_are_stable_and_distinct() {
        assert_eq!(slice_seed(0, "a"), slice_seed(0, "a"));
        assert_ne!(slice_seed(0, "a"), slice_seed(1, "a"));
        assert_ne!(slice_seed(0, "a"), slice_seed(0, "b"));
        // FNV-1a 64 of the empty input is its offset basis.
        let mut h = Fnv1a::new();
        h.update(b"");
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        h.update(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn csv_cells_of_healthy_and_lesion_rows() {
        let a: Vec<f32> = (0..64).map(|i| if i == 9 { 1.0 } else { 0.0 }).collect();
        let healthy = Row::new("h,1", &a, &[false; 64], 8, 0.4, 10.0);
        assert_eq!(healthy.csv_line(), "\"h,1\",0,,,,,,,");
        let mut m = [false; 64];
        m[9] = true;
        let lesion = Row::new("l", &a, &m, 8, 0.4, 10.0);
        assert_eq!(lesion.csv_line(), "l,1,1,0,0,0,1,1,1");
    }
}
