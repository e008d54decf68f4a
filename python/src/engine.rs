//! `fcd.Engine`: the engine behind a mutex, run with the GIL released.

use crate::args;
use crate::arrays;
use crate::results::{Detection, ToSave, VolumeDetection};
use crate::{engine_error, error};
use fcd::config::MAX_TIMESTEPS;
use fcd::engine::{self as eng, DetectOptions, Device, Progress};
use fcd::outputs::{Noise, Run};
use fcd::precision::Precision;
use fcd::slices::SliceRange;
use pyo3::prelude::*;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

/// The fcd engine: the diffusion config and both networks, loaded once on a device.
///
/// ``config``: the diffusion YAML; ``unet``: the UNet checkpoint (.pt or .safetensors);
/// ``classifier``: its checkpoint (default: the config's ``ckpt_path``, next to the config);
/// ``device``: "auto" (the default: the GPU when one is usable), "cpu" or "cuda";
/// ``precision``: "fp32" (the default, the parity mode), or "tf32", "bf16" / "fp16" on a
/// GPU's tensor cores.
///
/// The GIL is released while the engine loads and runs; calls on one engine from several
/// threads run one at a time (a waiting call still answers Ctrl-C). A call from inside the
/// ``progress`` callback of a call on the same engine raises ``FcdError`` ("the engine is
/// busy"). Every bad argument raises ``fcd.FcdError``.
#[pyclass(module = "fcd", frozen)]
pub struct Engine {
    engine: Mutex<eng::Engine>,
    /// The thread whose call holds the engine (0: none): a call from that thread is one
    /// made from inside its own progress callback, which would wait on itself forever.
    owner: AtomicU64,
    device: String,
    image_size: usize,
}

/// A number per thread, from 1.
fn this_thread() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.with(|id| *id)
}

/// The largest batch a call may ask for (the engine bounds memory; this bounds the number).
const MAX_BATCH: usize = 1 << 20;

/// The per-call settings both detect methods share (see `DetectOptions`).
struct Settings {
    steps: Option<usize>,
    guidance: Option<f64>,
    seed: u64,
    hist_match: bool,
    batch: Option<usize>,
}

impl Settings {
    /// The settings from the keyword arguments; None (or absent) is the default of each.
    fn new(
        steps: Option<&Bound<'_, PyAny>>,
        guidance: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        hist_match: Option<&Bound<'_, PyAny>>,
        batch: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Settings> {
        Ok(Settings {
            steps: args::optional(steps, |o| args::count(o, "steps", 1, MAX_TIMESTEPS))?,
            guidance: args::optional(guidance, |o| args::real(o, "guidance"))?,
            seed: args::optional(seed, |o| args::int(o, "seed", 0, u64::MAX))?.unwrap_or(0),
            hist_match: args::optional(hist_match, |o| args::flag(o, "hist_match"))?
                .unwrap_or(true),
            batch: args::optional(batch, |o| args::count(o, "batch", 1, MAX_BATCH))?,
        })
    }

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
    #[pyo3(signature = (config, unet, classifier=None, device=None, precision=None))]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        unet: &Bound<'_, PyAny>,
        classifier: Option<&Bound<'_, PyAny>>,
        device: Option<&Bound<'_, PyAny>>,
        precision: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let config = args::path(config, "config")?;
        let unet = args::path(unet, "unet")?;
        let classifier = args::optional(classifier, |o| args::path(o, "classifier"))?;
        let device: Device = match args::optional(device, |o| args::string(o, "device"))? {
            Some(d) => d.parse().map_err(engine_error)?,
            None => Device::Auto,
        };
        let precision: Precision =
            match args::optional(precision, |o| args::string(o, "precision"))? {
                Some(p) => p.parse().map_err(engine_error)?,
                None => Precision::Fp32,
            };
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
            owner: AtomicU64::new(0),
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
    /// scale (default: the config's); ``seed``: of the initial noise (default 0), unless
    /// ``noise`` (the FLAIR's shape) is given; ``hist_match``: histogram-match the
    /// pseudo-healthy FLAIR before the difference (default True); ``batch``: slices per
    /// sampler run (results do not depend on it); ``progress``: called as
    /// ``progress(done, total)`` after every sampler step, an exception it raises stops the
    /// run and is raised here. None is the default of every option.
    #[pyo3(signature = (
        flair, t1, *, steps=None, guidance=None, seed=None, noise=None, hist_match=None,
        batch=None, progress=None
    ))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn detect(
        &self,
        py: Python<'_>,
        flair: &Bound<'_, PyAny>,
        t1: &Bound<'_, PyAny>,
        steps: Option<&Bound<'_, PyAny>>,
        guidance: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        noise: Option<&Bound<'_, PyAny>>,
        hist_match: Option<&Bound<'_, PyAny>>,
        batch: Option<&Bound<'_, PyAny>>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Detection> {
        let settings = Settings::new(steps, guidance, seed, hist_match, batch)?;
        let size = self.image_size;
        let flair = arrays::slices(flair, "flair", size)?;
        let t1 = arrays::slices(t1, "t1", size)?;
        if flair.shape != t1.shape {
            return Err(error(format!(
                "flair and t1 differ in shape: {:?} and {:?} slices x height x width",
                &flair.shape[..3],
                &t1.shape[..3]
            )));
        }
        let noise = args::optional(noise, |n| arrays::slices(n, "noise", size))?;
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
    /// ``noise`` shaped (number of slices, image_size, image_size); ``slices`` defaults to
    /// (75, 125), the paper's.
    ///
    /// Returns the maps on the input's grid and the peaks in voxel and world coordinates.
    #[pyo3(signature = (
        flair, t1, *, slices=None, mask=None, affine=None, steps=None, guidance=None,
        seed=None, noise=None, hist_match=None, batch=None, progress=None
    ))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn detect_volume(
        &self,
        py: Python<'_>,
        flair: &Bound<'_, PyAny>,
        t1: &Bound<'_, PyAny>,
        slices: Option<&Bound<'_, PyAny>>,
        mask: Option<&Bound<'_, PyAny>>,
        affine: Option<&Bound<'_, PyAny>>,
        steps: Option<&Bound<'_, PyAny>>,
        guidance: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        noise: Option<&Bound<'_, PyAny>>,
        hist_match: Option<&Bound<'_, PyAny>>,
        batch: Option<&Bound<'_, PyAny>>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<VolumeDetection> {
        let settings = Settings::new(steps, guidance, seed, hist_match, batch)?;
        let range = args::optional(slices, slice_range)?.unwrap_or_default();
        let affine = match args::optional(affine, arrays::affine)? {
            Some(a) => a,
            None => std::array::from_fn(|i| std::array::from_fn(|j| f64::from(u8::from(i == j)))),
        };
        let flair = arrays::volume(flair, "flair", affine)?;
        let t1 = arrays::volume(t1, "t1", affine)?;
        let mask = args::optional(mask, |m| arrays::mask(m, affine))?;
        let noise = args::optional(noise, |n| arrays::slices(n, "noise", self.image_size))?;
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

/// `(first, last)`, inclusive, of a volume's axial slices.
fn slice_range(obj: &Bound<'_, PyAny>) -> PyResult<SliceRange> {
    let bad = || error("slices: expected (first, last), two ints with first <= last");
    let (first, last): (Bound<'_, PyAny>, Bound<'_, PyAny>) = obj.extract().map_err(|_| bad())?;
    let max = u32::MAX as usize;
    let first = args::count(&first, "slices[0]", 0, max)?;
    let last = args::count(&last, "slices[1]", 0, max)?;
    if first > last {
        return Err(error(format!(
            "slices ({first}, {last}): expected (first, last) with first <= last"
        )));
    }
    Ok(SliceRange { first, last })
}

/// Clears the engine's owner when the call ends, however it ends.
struct Owning<'a>(&'a AtomicU64);

impl Drop for Owning<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

impl Engine {
    /// Runs `call` on the engine with the GIL released. After every sampler step the GIL is
    /// taken back to check for signals (Ctrl-C) and call `progress`; an exception from either
    /// stops the run and is returned. Another thread's call on this engine is waited for
    /// (checking for signals meanwhile); a call from inside this thread's own running call
    /// is refused.
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
        if let Some(p) = progress.as_ref().filter(|p| !p.is_none()) {
            if !p.is_callable() {
                return Err(error(format!(
                    "progress: expected a callable, got a {}",
                    p.get_type().name()?
                )));
            }
        }
        let me = this_thread();
        if self.owner.load(Ordering::SeqCst) == me {
            return Err(error(
                "the engine is busy: it is running the call whose progress callback made this \
                 one; call it again once that call has returned",
            ));
        }
        let progress = progress.filter(|p| !p.is_none()).map(Bound::unbind);
        py.detach(move || {
            let engine = self.wait()?;
            self.owner.store(me, Ordering::SeqCst);
            let _owning = Owning(&self.owner);
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

    /// The engine, once no other thread's call holds it; a signal (Ctrl-C) meanwhile stops
    /// the wait with its exception. A panic in an earlier call poisons the lock but leaves
    /// the engine usable (its per-call state is released by drop guards).
    fn wait(&self) -> PyResult<MutexGuard<'_, eng::Engine>> {
        loop {
            match self.engine.try_lock() {
                Ok(engine) => return Ok(engine),
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) => {
                    Python::attach(|py| py.check_signals())?;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}
