//! `fcd.Engine`: the engine behind a mutex, run with the GIL released.

use crate::arrays;
use crate::results::{Detection, ToSave, VolumeDetection};
use crate::{engine_error, error};
use fcd::engine::{self as eng, DetectOptions, Device, Progress};
use fcd::outputs::{Noise, Run};
use fcd::precision::Precision;
use fcd::slices::SliceRange;
use pyo3::prelude::*;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

/// The fcd engine: the diffusion config and both networks, loaded once on a device.
///
/// ``config``: the diffusion YAML; ``unet``: the UNet checkpoint (.pt or .safetensors);
/// ``classifier``: its checkpoint (default: the config's ``ckpt_path``, next to the config);
/// ``device``: "auto" (the GPU when one is usable), "cpu" or "cuda"; ``precision``: "fp32"
/// (the parity mode), or "tf32", "bf16" / "fp16" on a GPU's tensor cores.
///
/// The GIL is released while the engine loads and runs; calls on one engine from several
/// threads run one at a time. Errors raise ``fcd.FcdError``.
#[pyclass(module = "fcd", frozen)]
pub struct Engine {
    engine: Mutex<eng::Engine>,
    device: String,
    image_size: usize,
}

/// The per-call settings both detect methods share (see `DetectOptions`).
struct Settings {
    steps: Option<usize>,
    guidance: Option<f64>,
    seed: u64,
    hist_match: bool,
    batch: Option<usize>,
}

impl Settings {
    /// What summary.json records of a call on `engine` with these settings.
    fn run(&self, engine: &Engine, noise_given: bool) -> Run {
        Run {
            files: Vec::new(),
            noise: if noise_given {
                Noise::Given
            } else {
                Noise::Seed(self.seed)
            },
            device: engine.device.clone(),
            timings_s: Vec::new(),
            started: None,
        }
    }

    fn options<'a>(
        self,
        noise: Option<fcd::tensor::Tensor>,
        progress: &'a mut dyn FnMut(Progress) -> anyhow::Result<()>,
    ) -> DetectOptions<'a> {
        DetectOptions {
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            noise,
            hist_match: self.hist_match,
            batch: self.batch,
            progress: Some(progress),
            ..Default::default()
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (config, unet, classifier=None, device="auto", precision="fp32"))]
    fn new(
        py: Python<'_>,
        config: PathBuf,
        unet: PathBuf,
        classifier: Option<PathBuf>,
        device: &str,
        precision: &str,
    ) -> PyResult<Self> {
        let device: Device = device.parse().map_err(engine_error)?;
        let precision: Precision = precision.parse().map_err(engine_error)?;
        let builder = eng::Engine::builder(config)
            .unet(unet)
            .device(device)
            .precision(precision);
        let builder = match classifier {
            Some(c) => builder.classifier(c),
            None => builder,
        };
        let engine = py.detach(|| builder.build()).map_err(engine_error)?;
        Ok(Engine {
            device: engine.device(),
            image_size: engine.config().unet.image_size,
            engine: Mutex::new(engine),
        })
    }

    /// Where the networks run: "cpu", or "cuda:0 (GPU name)".
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    /// The side of the square slices the networks take (the config's image_size).
    #[getter]
    fn image_size(&self) -> usize {
        self.image_size
    }

    fn __repr__(&self) -> String {
        format!(
            "Engine(device={:?}, image_size={})",
            self.device, self.image_size
        )
    }

    /// Detection on slices: ``flair`` and ``t1`` shaped (H, W), (B, H, W) or (B, 1, H, W)
    /// with H = W = ``image_size``, float32 or float64 raw intensities (each slice is
    /// normalised on its own).
    ///
    /// ``steps``: the noise level N (default: the config's); ``guidance``: the classifier
    /// scale (default: the config's); ``seed``: of the initial noise, unless ``noise`` (the
    /// FLAIR's shape) is given; ``hist_match``: histogram-match the pseudo-healthy FLAIR
    /// before the difference; ``batch``: slices per sampler run (results do not depend on
    /// it); ``progress``: called as ``progress(done, total)`` after every sampler step, an
    /// exception it raises stops the run and is raised here.
    #[pyo3(signature = (
        flair, t1, *, steps=None, guidance=None, seed=0, noise=None, hist_match=true,
        batch=None, progress=None
    ))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn detect(
        &self,
        py: Python<'_>,
        flair: &Bound<'_, PyAny>,
        t1: &Bound<'_, PyAny>,
        steps: Option<usize>,
        guidance: Option<f64>,
        seed: u64,
        noise: Option<&Bound<'_, PyAny>>,
        hist_match: bool,
        batch: Option<usize>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Detection> {
        let (flair, t1) = (arrays::slices(flair, "flair")?, arrays::slices(t1, "t1")?);
        if flair.shape != t1.shape {
            return Err(error(format!(
                "flair and t1 differ in shape: {:?} and {:?} slices x height x width",
                &flair.shape[..3],
                &t1.shape[..3]
            )));
        }
        let noise = noise.map(|n| arrays::slices(n, "noise")).transpose()?;
        let settings = Settings {
            steps,
            guidance,
            seed,
            hist_match,
            batch,
        };
        let run = settings.run(self, noise.is_some());
        let (inputs, det) = self.run(py, progress, move |engine, report| {
            let inputs = engine.prepare_slices(flair, t1)?;
            let det = engine.detect_prepared(&inputs, settings.options(noise, report))?;
            Ok((inputs, det))
        })?;
        Detection::new(py, det, Some(ToSave::new(inputs, run)))
    }

    /// Detection on the axial slices ``slices`` = (first, last), inclusive, of co-registered
    /// volumes: ``flair`` and ``t1`` float32 or float64 arrays (x, y, z) as nibabel gives
    /// them (``img.get_fdata()``), ``mask`` an optional lesion mask on the same grid (> 0 is
    /// lesion; checked as ``fcd detect`` checks it), ``affine`` the voxel-to-world matrix
    /// (``img.affine``; default: the identity). The other options are ``detect``'s, with
    /// ``noise`` shaped (number of slices, image_size, image_size).
    ///
    /// Returns the maps on the input's grid and the peaks in voxel and world coordinates.
    #[pyo3(signature = (
        flair, t1, *, slices=(75, 125), mask=None, affine=None, steps=None, guidance=None,
        seed=0, noise=None, hist_match=true, batch=None, progress=None
    ))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn detect_volume(
        &self,
        py: Python<'_>,
        flair: &Bound<'_, PyAny>,
        t1: &Bound<'_, PyAny>,
        slices: (usize, usize),
        mask: Option<&Bound<'_, PyAny>>,
        affine: Option<&Bound<'_, PyAny>>,
        steps: Option<usize>,
        guidance: Option<f64>,
        seed: u64,
        noise: Option<&Bound<'_, PyAny>>,
        hist_match: bool,
        batch: Option<usize>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<VolumeDetection> {
        let (first, last) = slices;
        if first > last {
            return Err(error(format!(
                "slices ({first}, {last}): expected (first, last) with first <= last"
            )));
        }
        let range = SliceRange { first, last };
        let affine = match affine {
            Some(a) => arrays::affine(a)?,
            None => std::array::from_fn(|i| std::array::from_fn(|j| f64::from(u8::from(i == j)))),
        };
        let flair = arrays::volume(flair, "flair", affine)?;
        let t1 = arrays::volume(t1, "t1", affine)?;
        let mask = mask.map(|m| arrays::mask(m, affine)).transpose()?;
        let noise = noise.map(|n| arrays::slices(n, "noise")).transpose()?;
        let settings = Settings {
            steps,
            guidance,
            seed,
            hist_match,
            batch,
        };
        let run = settings.run(self, noise.is_some());
        let (inputs, vd) = self.run(py, progress, move |engine, report| {
            let inputs = engine.prepare_volumes(flair, &t1, mask.as_ref(), range)?;
            let det = engine.detect_prepared(&inputs, settings.options(noise, report))?;
            let vd = eng::VolumeDetection::new(&inputs, det)?;
            Ok((inputs, vd))
        })?;
        VolumeDetection::new(py, vd, ToSave::new(inputs, run))
    }
}

impl Engine {
    /// Runs `call` on the engine with the GIL released. After every sampler step the GIL is
    /// taken back to check for signals (Ctrl-C) and call `progress`; an exception from either
    /// stops the run and is returned.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        progress: Option<Bound<'_, PyAny>>,
        call: impl FnOnce(
                &eng::Engine,
                &mut dyn FnMut(Progress) -> anyhow::Result<()>,
            ) -> anyhow::Result<T>
            + Send,
    ) -> PyResult<T> {
        if let Some(p) = &progress {
            if !p.is_callable() {
                return Err(error(format!(
                    "progress: expected a callable, got a {}",
                    p.get_type().name()?
                )));
            }
        }
        let progress = progress.map(Bound::unbind);
        py.detach(move || {
            let engine = self.engine.lock().unwrap_or_else(PoisonError::into_inner);
            let mut raised = None;
            let mut report = |p: Progress| {
                let outcome = Python::attach(|py| {
                    py.check_signals()?;
                    match &progress {
                        Some(f) => f.call1(py, (p.done, p.total)).map(drop),
                        None => Ok(()),
                    }
                });
                outcome.map_err(|e| {
                    raised = Some(e);
                    anyhow::anyhow!("stopped by the progress callback")
                })
            };
            let result = panic::catch_unwind(AssertUnwindSafe(|| call(&engine, &mut report)));
            match (result, raised) {
                (_, Some(e)) => Err(e),
                (Ok(result), None) => result.map_err(engine_error),
                (Err(payload), None) => Err(error(format!(
                    "internal error in fcd (a panic): {}",
                    panic_message(payload.as_ref())
                ))),
            }
        })
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}
