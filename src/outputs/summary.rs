//! `summary.json`: the inputs, the settings, the timings, the files and the peaks of one
//! detection.

use super::maps::Written;
use crate::inputs::{Origin, Prepared};
use crate::io::absolute;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Where the sampler's initial noise came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Noise {
    /// A standard normal from this seed.
    Seed(u64),
    /// An `.npy` file.
    File(PathBuf),
    /// An array the caller passed.
    Given,
}

/// What `summary.json` records of a run besides what the detection says of itself (its
/// settings, files and peaks).
#[derive(Clone, Debug)]
pub struct Run {
    /// The input files by role (`config`, `unet`, `classifier`, `flair`, `t1`, `mask`),
    /// recorded as absolute paths; `None` for one not given.
    pub files: Vec<(&'static str, Option<PathBuf>)>,
    pub noise: Noise,
    /// The backend, as [`crate::engine::Engine::device`] names it.
    pub device: String,
    /// Seconds by stage (`load`, `sample`, ...).
    pub timings_s: Vec<(&'static str, f64)>,
    /// When the run started: the summary adds `total`, up to its own writing.
    pub started: Option<Instant>,
}

/// The settings a detection resolved, as summary.json records them.
pub(super) struct Settings {
    pub(super) steps: usize,
    pub(super) guidance: f64,
    pub(super) batch: usize,
    pub(super) hist_match: bool,
}

impl Run {
    /// The text of summary.json for `slices` slices of `inputs`.
    pub(super) fn summary(
        &self,
        inputs: &Prepared,
        slices: usize,
        s: &Settings,
        written: Written,
    ) -> anyhow::Result<String> {
        let size = inputs.flair.shape.get(1).copied().unwrap_or(0);
        let mut files: Map<String, Value> = self
            .files
            .iter()
            .map(|(role, p)| (role.to_string(), json!(p.as_deref().map(absolute))))
            .collect();
        files.insert("slices".into(), json!(slices));
        files.insert("height".into(), json!(size));
        files.insert("width".into(), json!(size));
        let range = match &inputs.origin {
            Origin::Volume { range, .. } => Some(range.to_string()),
            _ => None,
        };
        files.insert("slice_range".into(), json!(range));
        let noise = match &self.noise {
            Noise::Seed(seed) => json!({ "seed": seed }),
            Noise::File(p) => json!({ "file": absolute(p) }),
            Noise::Given => json!("given"),
        };
        let mut timings: Map<String, Value> = self
            .timings_s
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        if let Some(t) = self.started {
            timings.insert("total".into(), json!(t.elapsed().as_secs_f64()));
        }
        let summary = json!({
            "fcd_version": env!("CARGO_PKG_VERSION"),
            "inputs": files,
            "settings": {
                "steps": s.steps, "guidance": s.guidance, "hist_match": s.hist_match,
                "noise": noise, "device": self.device, "threads": rayon::current_num_threads(),
                "batch": s.batch, "label": 0,
            },
            "timings_s": timings,
            "outputs": written.files,
            "peaks": written.peaks,
        });
        Ok(serde_json::to_string_pretty(&summary)?)
    }
}
