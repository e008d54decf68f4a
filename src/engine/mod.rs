//! The engine: the config and both networks loaded once on a device, and detection on
//! slices or volumes with per-call options. `fcd detect`, `fcd eval` and `fcd bench` run on
//! it, and so do the embeddings.
//!
//! An [`Engine`] is `Send` but not `Sync`: move it to the thread that uses it, or put it
//! behind a `Mutex` to share it. The CUDA backend keeps per-engine state (its stream, CUDA
//! graph recordings) that one call at a time may use.
//!
//! ```
//! use fcd::{DetectOptions, Device, Engine};
//! use fcd::tensor::Tensor;
//!
//! let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
//! // The classifier defaults to the config's `ckpt_path`, next to the config.
//! let engine = Engine::builder(format!("{fixtures}/config_small.yaml"))
//!     .unet(format!("{fixtures}/unet.pt"))
//!     .device(Device::Cpu)
//!     .build()?;
//! let size = engine.config().unet.image_size;
//! let ramp = |k: usize| {
//!     let data = (0..size * size).map(|i| ((i * k) % 97) as f32).collect();
//!     Tensor::new(vec![1, size, size, 1], data)
//! };
//! let options = DetectOptions { steps: Some(2), seed: 7, ..Default::default() };
//! let det = engine.detect(ramp(3)?, ramp(5)?, options)?;
//! assert_eq!(det.anomaly.shape, [1, size, size]);
//! assert!(det.anomaly.data.iter().all(|v| (0.0..=1.0).contains(v)));
//! assert!(!det.peaks.is_empty());
//! # anyhow::Ok(())
//! ```

/// Runs `$body` with `$l` bound to the loaded networks, whichever the backend.
macro_rules! on_nets {
    ($nets:expr, $l:ident => $body:expr) => {
        match $nets {
            Nets::Cpu(boxed) => {
                let $l: &Loaded<CpuRef> = boxed;
                $body
            }
            Nets::Cuda(boxed) => {
                let $l: &Loaded<Cuda> = boxed;
                $body
            }
        }
    };
}

mod bench;
mod detect;
mod volume;

pub use bench::{BenchRun, BenchSetup};
pub use detect::{
    seeded_noise, DetectOptions, Detection, Peak, PeakOptions, Progress, MAX_AUTO_BATCH,
};
pub use volume::{VolumeDetection, VolumePeak};

use crate::backend::cpu_ref::CpuRef;
use crate::backend::cuda::{self, backend::Cuda};
use crate::backend::Backend;
use crate::config::{Config, NetConfig};
use crate::inputs::{self, Prepared};
use crate::io::volume::Volume;
use crate::model::{self, Net, NetKind};
use crate::precision::Precision;
use crate::slices::SliceRange;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where the networks run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    pub const ALL: [Device; 3] = [Device::Auto, Device::Cpu, Device::Cuda];

    pub fn label(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// `"auto"`, `"cpu"` or `"cuda"`, as `--device` takes them.
impl std::str::FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        crate::choice::parse(s, "device", &Device::ALL, |d| d.label())
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Where a network's weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Weights {
    /// A checkpoint: `torch.save` (`.pt`) or `.safetensors`.
    File(PathBuf),
    /// Random weights from a seed (benchmarks without checkpoints).
    Random(u64),
}

/// Builds an [`Engine`]; see [`Engine::builder`].
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    config: PathBuf,
    unet: Option<Weights>,
    classifier: Option<Weights>,
    device: Device,
    gpu: usize,
    precision: Precision,
}

impl EngineBuilder {
    /// The UNet checkpoint (required unless [`EngineBuilder::unet_weights`] says otherwise).
    pub fn unet(self, path: impl Into<PathBuf>) -> Self {
        self.unet_weights(Weights::File(path.into()))
    }

    pub fn unet_weights(mut self, w: Weights) -> Self {
        self.unet = Some(w);
        self
    }

    /// The classifier checkpoint (default: the config's classifier `ckpt_path`, a relative
    /// one taken from the config file's folder).
    pub fn classifier(self, path: impl Into<PathBuf>) -> Self {
        self.classifier_weights(Weights::File(path.into()))
    }

    pub fn classifier_weights(mut self, w: Weights) -> Self {
        self.classifier = Some(w);
        self
    }

    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Which GPU (CUDA ordinal, default 0) `Device::Cuda` and `Device::Auto` use: one engine per
    /// GPU spreads work over a node's devices.
    pub fn gpu(mut self, ordinal: usize) -> Self {
        self.gpu = ordinal;
        self
    }

    /// `fp32` (the default, the parity mode), or `bf16` / `fp16` on a GPU's tensor cores.
    pub fn precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Reads the config, picks the backend and loads both networks on it.
    pub fn build(self) -> Result<Engine> {
        let cfg = Config::load(&self.config)?;
        let unet = self.unet.clone().with_context(|| {
            format!(
                "no UNet checkpoint given for {} (--unet)",
                self.config.display()
            )
        })?;
        let classifier = match self.classifier.clone() {
            Some(w) => w,
            None => Weights::File(default_classifier(&cfg, &self.config)?),
        };
        let weights = [
            (&cfg.unet, NetKind::Unet, &unet),
            (&cfg.classifier, NetKind::Classifier, &classifier),
        ];
        let (nets, device) = match pick(self.device, self.gpu, self.precision)? {
            Picked::Cpu => (Nets::Cpu(Box::new(Loaded::new(CpuRef, weights)?)), None),
            Picked::Cuda(g) => {
                let name = g.gpu().name().to_string();
                let gpu = (self.gpu, name);
                (Nets::Cuda(Box::new(Loaded::new(*g, weights)?)), Some(gpu))
            }
        };
        Ok(Engine {
            cfg,
            config_path: self.config,
            unet,
            classifier,
            precision: self.precision,
            gpu: device,
            nets,
        })
    }
}

/// The config and both networks, loaded once on one backend.
pub struct Engine {
    cfg: Config,
    config_path: PathBuf,
    unet: Weights,
    classifier: Weights,
    precision: Precision,
    /// The GPU's ordinal and name, `None` on the CPU.
    gpu: Option<(usize, String)>,
    nets: Nets,
}

// The embeddings move an engine to the thread that runs it.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Engine>();
};

impl Engine {
    /// An engine for the diffusion config at `config` (the published YAML layout).
    pub fn builder(config: impl Into<PathBuf>) -> EngineBuilder {
        EngineBuilder {
            config: config.into(),
            unet: None,
            classifier: None,
            device: Device::Auto,
            gpu: 0,
            precision: Precision::Fp32,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The config file this engine was built from.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn unet_weights(&self) -> &Weights {
        &self.unet
    }

    pub fn classifier_weights(&self) -> &Weights {
        &self.classifier
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The backend, for summaries: "cpu", or "cuda:0 (NVIDIA H200)" with ", precision bf16"
    /// appended in the tensor-core modes.
    pub fn device(&self) -> String {
        match &self.gpu {
            None => "cpu".to_string(),
            Some((i, name)) if self.precision == Precision::Fp32 => format!("cuda:{i} ({name})"),
            Some((i, name)) => format!("cuda:{i} ({name}), precision {}", self.precision),
        }
    }

    /// The GPU's name, `None` on the CPU.
    pub fn gpu(&self) -> Option<&str> {
        self.gpu.as_ref().map(|(_, name)| name.as_str())
    }

    /// The slices one sampler run should take: on a GPU as many as fit 80% of its free
    /// memory (at most [`MAX_AUTO_BATCH`]); `None` on the CPU, which has no such budget.
    pub fn auto_batch(&self) -> Result<Option<usize>> {
        on_nets!(&self.nets, l => l.auto_batch())
    }

    /// The noise level and guidance a call with these options uses: the given ones, else the
    /// config's `noise_level` and `guide_w`; an error when they are out of range.
    pub fn resolve(&self, steps: Option<usize>, guidance: Option<f64>) -> Result<(usize, f64)> {
        detect::resolve(&self.cfg, steps, guidance)
    }

    /// Detection on slices given as arrays: `flair` and `t1` shaped `[S, H, W, 1]`, `[S, H, W]`
    /// or `[H, W]` with `H = W =` the config's `image_size`, raw intensities (each slice is
    /// normalised to [-1, 1] on its own).
    pub fn detect(&self, flair: Tensor, t1: Tensor, options: DetectOptions) -> Result<Detection> {
        self.detect_prepared(&self.prepare_slices(flair, t1)?, options)
    }

    /// The inputs of [`Engine::detect`], checked and ready (what [`crate::outputs`] needs
    /// besides the detection).
    pub fn prepare_slices(&self, flair: Tensor, t1: Tensor) -> Result<Prepared> {
        inputs::from_slices(
            (as_slices(flair, "FLAIR")?, "FLAIR"),
            (as_slices(t1, "T1")?, "T1"),
            self.cfg.unet.image_size,
        )
    }

    /// The inputs of [`Engine::detect_volume`], checked and ready.
    pub fn prepare_volumes(
        &self,
        flair: Volume,
        t1: &Volume,
        mask: Option<&Volume>,
        range: SliceRange,
    ) -> Result<Prepared> {
        inputs::from_volumes(flair, t1, mask, range, self.cfg.unet.image_size)
    }

    /// Detection on slices that [`crate::inputs`] prepared.
    pub fn detect_prepared(&self, inputs: &Prepared, options: DetectOptions) -> Result<Detection> {
        on_nets!(&self.nets, l => detect::run(l, &self.cfg, inputs, options))
    }

    /// Detection on the axial slices `range` of co-registered volumes (as read by
    /// [`crate::io::volume::read_volume`]), with the maps on the FLAIR's grid. The optional
    /// mask is checked as `fcd detect` checks it ([`crate::inputs`]).
    ///
    /// ```
    /// # use fcd::engine::{DetectOptions, Device, Engine};
    /// # let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    /// # let engine = Engine::builder(format!("{fixtures}/config_small.yaml"))
    /// #     .unet(format!("{fixtures}/unet.pt"))
    /// #     .device(Device::Cpu)
    /// #     .build()?;
    /// use fcd::io::volume::Volume;
    ///
    /// let dims = [40, 36, 6];
    /// let mut affine = [[0.0; 4]; 4];
    /// (0..4).for_each(|i| affine[i][i] = 1.0);
    /// let volume = |k: f32| Volume {
    ///     dims,
    ///     data: (0..40 * 36 * 6).map(|i| (i as f32 * k) % 13.0).collect(),
    ///     affine,
    ///     path: "synthetic".into(),
    /// };
    /// let options = DetectOptions { steps: Some(1), ..Default::default() };
    /// let out = engine.detect_volume(volume(1.0), &volume(3.0), None, "2:3".parse()?, options)?;
    /// assert_eq!(out.anomaly.dims, dims);
    /// assert!(out.peaks.iter().all(|p| (2..=3).contains(&p.slice)));
    /// # anyhow::Ok(())
    /// ```
    pub fn detect_volume(
        &self,
        flair: Volume,
        t1: &Volume,
        mask: Option<&Volume>,
        range: SliceRange,
        options: DetectOptions,
    ) -> Result<VolumeDetection> {
        let prepared = self.prepare_volumes(flair, t1, mask, range)?;
        let det = self.detect_prepared(&prepared, options)?;
        VolumeDetection::new(&prepared, det)
    }

    /// Times the guided sampler (see [`BenchSetup`]).
    pub fn bench(&self, setup: &BenchSetup) -> Result<BenchRun> {
        on_nets!(&self.nets, l => bench::run(l, &self.cfg, setup))
    }
}

/// `[S, H, W, 1]` from the accepted array shapes.
fn as_slices(t: Tensor, what: &str) -> Result<Tensor> {
    let shape = match *t.shape.as_slice() {
        [h, w] => vec![1, h, w, 1],
        [s, h, w] => vec![s, h, w, 1],
        [s, h, w, 1] => vec![s, h, w, 1],
        _ => bail!(
            "{what}: an array of shape {:?}; expected (H, W), (B, H, W) or (B, H, W, 1)",
            t.shape
        ),
    };
    Tensor::new(shape, t.data)
}

/// The config's classifier `ckpt_path`, a relative one taken from the config file's folder.
fn default_classifier(cfg: &Config, config_file: &Path) -> Result<PathBuf> {
    match &cfg.classifier.ckpt_path {
        Some(p) if Path::new(p).is_absolute() => Ok(PathBuf::from(p)),
        Some(p) => Ok(config_file.parent().unwrap_or(Path::new(".")).join(p)),
        None => bail!(
            "no classifier checkpoint given and {} has no classifier ckpt_path",
            config_file.display()
        ),
    }
}

/// How many GPUs the driver reports; an error saying why when none is usable.
pub fn gpu_count() -> Result<usize> {
    if let Some(reason) = cuda::unavailable_reason() {
        bail!("no GPU is usable: {reason}");
    }
    let count = cuda::CudaContext::device_count().context("counting CUDA devices")?;
    Ok(usize::try_from(count).unwrap_or(0))
}

enum Picked {
    Cpu,
    Cuda(Box<Cuda>),
}

/// The backend `device` selects: the GPU for `Cuda` (an error saying why when none is
/// usable), the CPU for `Cpu`, and for `Auto` the GPU when one is usable. The CPU is the
/// float32 reference: other precisions need the GPU.
fn pick(device: Device, ordinal: usize, precision: Precision) -> Result<Picked> {
    let gpu = |why: &str| -> Result<Picked> {
        Ok(Picked::Cuda(Box::new(
            Cuda::with_precision(ordinal, precision).context(why.to_string())?,
        )))
    };
    let cpu = || {
        if precision != Precision::Fp32 {
            bail!(
                "--precision {precision} runs on tensor cores, which need a GPU, and {}; the CPU \
                 backend computes in fp32 only",
                if device == Device::Cpu {
                    "--device cpu was asked for".to_string()
                } else {
                    format!(
                        "no GPU is usable ({})",
                        cuda::unavailable_reason().unwrap_or_default()
                    )
                }
            );
        }
        Ok(Picked::Cpu)
    };
    match device {
        Device::Cpu => cpu(),
        Device::Cuda => gpu("--device cuda"),
        Device::Auto if cuda::cuda_available() => {
            gpu("--device auto found a GPU but could not use it (--device cpu runs on the CPU)")
        }
        Device::Auto => cpu(),
    }
}

/// Both networks on one backend.
struct Loaded<B: Backend> {
    unet: Net<B>,
    classifier: Net<B>,
    backend: B,
}

impl<B: Backend> Loaded<B> {
    fn new(backend: B, weights: [(&NetConfig, NetKind, &Weights); 2]) -> Result<Self> {
        let load = |(cfg, kind, w): (&NetConfig, NetKind, &Weights)| match w {
            Weights::File(path) => model::load_net(&backend, cfg, kind, path),
            Weights::Random(seed) => model::random_net(&backend, cfg, kind, *seed),
        };
        let [unet, classifier] = weights;
        Ok(Loaded {
            unet: load(unet)?,
            classifier: load(classifier)?,
            backend,
        })
    }

    fn auto_batch(&self) -> Result<Option<usize>> {
        Ok(self
            .backend
            .free_bytes()?
            .map(|free| detect::auto_batch(&self.unet.spec, &self.classifier.spec, free)))
    }
}

enum Nets {
    Cpu(Box<Loaded<CpuRef>>),
    Cuda(Box<Loaded<Cuda>>),
}
