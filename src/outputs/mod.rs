//! What a detection writes, the same for every caller (the command line, the Python package,
//! the C ABI): the maps in the input's form, the overlays, the montage and `summary.json`,
//! committed together into one output folder (all or nothing, `crate::io::atomic::Staged`).
//! `inputs` reads what goes in; this module writes what comes out.
//!
//! - Volumes: `anomaly.nii.gz` and `pseudo_healthy.nii.gz` on the input's grid with its
//!   affine, `overlays/slice_ZZZ.png` per slice and `montage.png`.
//! - A PNG slice: `pseudo_healthy.npy`, `anomaly.npy`, `overlay.png` and `montage.png` at
//!   the PNG's size.
//! - `.npy` slices or arrays: `pseudo_healthy.npy` `(S, 1, H, W)` (the raw sampler output)
//!   and `anomaly.npy` `(S, H, W)` in [0, 1].

mod digits;
mod maps;
pub mod montage;
pub mod overlay;
mod summary;

pub use maps::slice_map_npy;
pub use summary::{Noise, Run};

use crate::engine::Detection;
use crate::inputs::Prepared;
use crate::io::atomic::{self, Staged};
use crate::io::lock::FolderLock;
use anyhow::{Context, Result};
use std::path::Path;

/// An output folder being written: the files go to a staging folder beside it and appear
/// under its name together, at [`Output::finish`]; dropped unfinished, nothing appears.
/// One process at a time writes a folder: another gets an error naming the holder.
pub struct Output {
    staged: Staged,
    recovered: Vec<String>,
    /// Released after the commit (declared last, dropped last).
    _lock: FolderLock,
}

impl Output {
    /// Takes the folder `dir` (its lock, `.<name>.lock` beside it), cleans up after runs on
    /// it that were killed, and prepares it; fails at once when it cannot be written, so that
    /// a caller learns it before the long part.
    pub fn create(dir: &Path) -> Result<Output> {
        let name = dir
            .file_name()
            .with_context(|| format!("{}: not a directory path", dir.display()))?;
        let lock_file = dir.with_file_name(format!(".{}.lock", name.to_string_lossy()));
        let lock = FolderLock::acquire(&lock_file, dir)?;
        let recovered = atomic::recover(dir)?;
        let staged = Staged::new(dir)
            .with_context(|| format!("{}: cannot prepare the output directory", dir.display()))?;
        Ok(Output {
            staged,
            recovered,
            _lock: lock,
        })
    }

    /// What [`Output::create`] cleaned up after killed runs, one line each.
    pub fn recovered(&self) -> &[String] {
        &self.recovered
    }

    /// Writes the maps, overlays and montage of `det` on `inputs` (which it was computed
    /// from) and `summary.json` with what `run` says of the run, then commits the folder.
    pub fn finish(mut self, inputs: &Prepared, det: Detection, run: &Run) -> Result<()> {
        let slices = inputs.slices();
        let (steps, guidance, batch, hist_match) =
            (det.steps, det.guidance, det.batch, det.hist_match);
        let written = maps::write(&mut self.staged, inputs, det)?;
        let settings = summary::Settings {
            steps,
            guidance,
            batch,
            hist_match,
        };
        let text = run.summary(inputs, slices, &settings, written)?;
        self.staged.write("summary.json", text.as_bytes())?;
        self.staged.commit()
    }
}

/// [`Output::create`] and [`Output::finish`] in one call.
pub fn save(dir: &Path, inputs: &Prepared, det: Detection, run: &Run) -> Result<()> {
    Output::create(dir)?.finish(inputs, det, run)
}
