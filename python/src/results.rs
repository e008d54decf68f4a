//! What detection returns to Python: numpy maps, peaks, and the settings used.

use crate::arrays::{c_array, volume_array};
use crate::{engine_error, error};
use fcd::inputs::Prepared;
use fcd::outputs::{self, Run};
use numpy::{PyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// What `save` writes from: the inputs as the engine prepared them, the detection on the
/// network's grid, and what summary.json records of the call.
pub struct Saved {
    inputs: Prepared,
    detection: fcd::engine::Detection,
    run: Run,
}

/// A `Saved` waiting for its detection.
pub struct ToSave {
    inputs: Prepared,
    run: Run,
}

impl ToSave {
    pub fn new(inputs: Prepared, run: Run) -> ToSave {
        ToSave { inputs, run }
    }

    fn with(self, detection: fcd::engine::Detection) -> Arc<Saved> {
        Arc::new(Saved {
            inputs: self.inputs,
            detection,
            run: self.run,
        })
    }
}

/// Writes the files of `fcd detect` for `saved` into `dir`, with the GIL released.
fn save(py: Python<'_>, saved: &Saved, dir: PathBuf) -> PyResult<()> {
    py.detach(|| outputs::save(&dir, &saved.inputs, saved.detection.clone(), &saved.run))
        .map_err(engine_error)
}

/// Detection on slices: `pseudo_healthy` (B, 1, H, W) float32 in [-1, 1] and `anomaly`
/// (B, H, W) float32 in [0, 1], as `fcd detect` writes them to pseudo_healthy.npy and
/// anomaly.npy; `peaks`, strongest first; the noise level `steps`, the `guidance` scale and
/// the slices per sampler run `batch` that were used.
#[pyclass(module = "fcd", frozen)]
pub struct Detection {
    #[pyo3(get)]
    pseudo_healthy: Py<PyArrayDyn<f32>>,
    #[pyo3(get)]
    anomaly: Py<PyArrayDyn<f32>>,
    #[pyo3(get)]
    peaks: Vec<Peak>,
    #[pyo3(get)]
    steps: usize,
    #[pyo3(get)]
    guidance: f64,
    #[pyo3(get)]
    batch: usize,
    /// None for the network-grid results inside a `VolumeDetection`, which saves them.
    saved: Option<Arc<Saved>>,
}

impl Detection {
    pub fn new(
        py: Python<'_>,
        det: fcd::engine::Detection,
        saved: Option<ToSave>,
    ) -> PyResult<Self> {
        let [s, h, w, _] = *det.pseudo_healthy.shape.as_slice() else {
            return Err(error(
                "internal: pseudo-healthy slices are not [S, H, W, 1]",
            ));
        };
        let saved = saved.map(|p| p.with(det.clone()));
        Ok(Detection {
            pseudo_healthy: c_array(py, &[s, 1, h, w], det.pseudo_healthy.data)?,
            anomaly: c_array(py, &det.anomaly.shape, det.anomaly.data)?,
            peaks: det.peaks.iter().map(Peak::from).collect(),
            steps: det.steps,
            guidance: det.guidance,
            batch: det.batch,
            saved,
        })
    }
}

#[pymethods]
impl Detection {
    /// Writes the files ``fcd detect`` writes for these slices into the folder ``dir``
    /// (``pseudo_healthy.npy``, ``anomaly.npy`` and ``summary.json``), all at once: a
    /// failure leaves nothing there.
    fn save(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        match &self.saved {
            Some(s) => save(py, s, dir),
            None => Err(error(
                "these are a VolumeDetection's network-grid results: save the VolumeDetection",
            )),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Detection(slices={}, steps={}, guidance={:?}, batch={}, peaks={})",
            self.anomaly.bind(py).shape()[0],
            self.steps,
            self.guidance,
            self.batch,
            self.peaks.len()
        )
    }
}

/// A local maximum of an anomaly map: `score` at (`row`, `col`) of slice `slice`.
#[pyclass(module = "fcd", frozen, get_all)]
#[derive(Clone)]
pub struct Peak {
    slice: usize,
    row: usize,
    col: usize,
    score: f32,
    strength: f32,
}

impl From<&fcd::engine::Peak> for Peak {
    fn from(p: &fcd::engine::Peak) -> Self {
        Peak {
            slice: p.slice,
            row: p.row,
            col: p.col,
            score: p.score,
            strength: p.strength,
        }
    }
}

#[pymethods]
impl Peak {
    fn __repr__(&self) -> String {
        format!(
            "Peak(slice={}, row={}, col={}, score={}, strength={})",
            self.slice, self.row, self.col, self.score, self.strength
        )
    }
}

/// Detection on volumes: `anomaly` and `pseudo_healthy` (x, y, z) float32 on the input's
/// grid (zero outside the slices; the pseudo-healthy FLAIR in each slice's intensity range),
/// `peaks` in voxel and world coordinates, the axial `slices` (first, last), the settings
/// used, and `network`, the results on the network's grid.
#[pyclass(module = "fcd", frozen)]
pub struct VolumeDetection {
    #[pyo3(get)]
    anomaly: Py<PyArrayDyn<f32>>,
    #[pyo3(get)]
    pseudo_healthy: Py<PyArrayDyn<f32>>,
    #[pyo3(get)]
    peaks: Vec<VolumePeak>,
    #[pyo3(get)]
    slices: (usize, usize),
    #[pyo3(get)]
    steps: usize,
    #[pyo3(get)]
    guidance: f64,
    #[pyo3(get)]
    batch: usize,
    #[pyo3(get)]
    network: Py<Detection>,
    saved: Arc<Saved>,
}

impl VolumeDetection {
    pub fn new(py: Python<'_>, vd: fcd::engine::VolumeDetection, saved: ToSave) -> PyResult<Self> {
        let (steps, guidance, batch) = (vd.network.steps, vd.network.guidance, vd.network.batch);
        let saved = saved.with(vd.network.clone());
        Ok(VolumeDetection {
            anomaly: volume_array(py, vd.anomaly)?,
            pseudo_healthy: volume_array(py, vd.pseudo_healthy)?,
            peaks: vd.peaks.iter().map(VolumePeak::from).collect(),
            slices: (vd.range.first, vd.range.last),
            steps,
            guidance,
            batch,
            network: Py::new(py, Detection::new(py, vd.network, None)?)?,
            saved,
        })
    }
}

#[pymethods]
impl VolumeDetection {
    /// Writes the files ``fcd detect`` writes for a volume into the folder ``dir``
    /// (``anomaly.nii.gz`` and ``pseudo_healthy.nii.gz`` on the input's grid, the overlays,
    /// ``montage.png`` and ``summary.json``), all at once: a failure leaves nothing there.
    fn save(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        save(py, &self.saved, dir)
    }

    fn __repr__(&self) -> String {
        format!(
            "VolumeDetection(slices={:?}, steps={}, guidance={:?}, batch={}, peaks={})",
            self.slices,
            self.steps,
            self.guidance,
            self.batch,
            self.peaks.len()
        )
    }
}

/// A peak in the volume: axial slice `slice` (z), the fractional voxel position
/// (`voxel_x`, `voxel_y`) under the network pixel, `world_mm` through the affine, `score`.
#[pyclass(module = "fcd", frozen, get_all)]
#[derive(Clone)]
pub struct VolumePeak {
    slice: usize,
    voxel_x: f64,
    voxel_y: f64,
    world_mm: (f64, f64, f64),
    score: f32,
    strength: f32,
}

impl From<&fcd::engine::VolumePeak> for VolumePeak {
    fn from(p: &fcd::engine::VolumePeak) -> Self {
        let [x, y, z] = p.world_mm;
        VolumePeak {
            slice: p.slice,
            voxel_x: p.voxel_x,
            voxel_y: p.voxel_y,
            world_mm: (x, y, z),
            score: p.score,
            strength: p.strength,
        }
    }
}

#[pymethods]
impl VolumePeak {
    fn __repr__(&self) -> String {
        format!(
            "VolumePeak(slice={}, voxel_x={}, voxel_y={}, world_mm={:?}, score={}, strength={})",
            self.slice, self.voxel_x, self.voxel_y, self.world_mm, self.score, self.strength
        )
    }
}
