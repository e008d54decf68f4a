//! Shared helpers of the integration tests: fixtures, comparisons, and the GPU of the GPU
//! tests.
#![allow(dead_code)]

#[allow(unused_imports)] // by the files without GPU tests
pub use fcd_gpu_test::gpu_test;

use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::cuda::backend::Cuda;
use fcd::backend::cuda::{kernels, Gpu};
use fcd::backend::Backend;
use fcd::config::Config;
use fcd::ddim::DdimCoefs;
use fcd::io::npy;
use fcd::model::load_net;
use fcd::model::{Net, NetKind};
use fcd::precision::Precision;
use fcd::sampler::Sampler;
use fcd::tensor::Tensor;
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("manifest.json")).unwrap()).unwrap()
}

/// The float32 noise floor (rel-L2 of PyTorch float32 vs float64) of a fixture output.
pub fn floor(name: &str) -> f64 {
    manifest()["floors"][name]["rel_l2"].as_f64().unwrap()
}

/// Any numeric .npy as (shape, f64 values).
pub fn array(name: &str) -> (Vec<usize>, Vec<f64>) {
    npy::read_array(&fixture(name)).unwrap()
}

/// An NCHW float array of the fixtures as an NHWC tensor.
pub fn nhwc(name: &str) -> Tensor {
    let (shape, v) = array(name);
    let [b, c, h, w] = shape[..] else {
        panic!("{name}: not NCHW: {shape:?}")
    };
    let mut data = vec![0f32; v.len()];
    for bi in 0..b {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    data[((bi * h + y) * w + x) * c + ch] =
                        v[((bi * c + ch) * h + y) * w + x] as f32;
                }
            }
        }
    }
    Tensor::new(vec![b, h, w, c], data).unwrap()
}

/// Relative L2 distance of `a` to the float64 reference `r`, in float64.
pub fn rel(a: &[f32], r: &[f64]) -> f64 {
    assert_eq!(a.len(), r.len());
    let num: f64 = a.iter().zip(r).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = r.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

pub fn config() -> Config {
    Config::load(&fixture("config_small.yaml")).unwrap()
}

pub fn nets(cfg: &Config) -> (Net<CpuRef>, Net<CpuRef>) {
    let unet = load_net(&CpuRef, &cfg.unet, NetKind::Unet, &fixture("unet.pt")).unwrap();
    let cls = load_net(
        &CpuRef,
        &cfg.classifier,
        NetKind::Classifier,
        &fixture("classifier.pt"),
    )
    .unwrap();
    (unet, cls)
}

pub fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// A fresh seed per run (or `FCD_TEST_SEED`), printed so a failure can be replayed.
pub fn seed(salt: u64) -> u64 {
    let seed = std::env::var("FCD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                ^ salt
        });
    println!("seed {seed} (set FCD_TEST_SEED to replay)");
    seed
}

/// One inversion step of the sampler at `t` on state `x` (`[B,H,W,1]`) with condition
/// `cond` (SPEC 6 step 2), op by op: what `Sampler::run` does at each step.
pub fn inversion_step<B: Backend>(
    s: &Sampler<B>,
    x: &mut B::T,
    cond: &B::T,
    t: usize,
) -> anyhow::Result<()> {
    let b = s.backend;
    let y = vec![0; b.dims(x)[0]];
    let eps = s.unet.unet(b, &b.concat(x, cond)?, &vec![t; y.len()], &y)?;
    b.ddim_invert(x, &eps, DdimCoefs::inversion(&s.abar, t))
}

/// One guided denoising step at `t` (SPEC 6 step 3), op by op.
pub fn guided_step<B: Backend>(
    s: &Sampler<B>,
    x: &mut B::T,
    cond: &B::T,
    t: usize,
) -> anyhow::Result<()> {
    let b = s.backend;
    let y = vec![0; b.dims(x)[0]];
    let ts = vec![t; y.len()];
    let eps = s.unet.unet(b, &b.concat(x, cond)?, &ts, &y)?;
    b.ddim_denoise(x, &eps, DdimCoefs::denoising(&s.abar, t))?;
    let (_, g) = s.classifier.classifier_grad(b, x, &ts, &y)?;
    b.axpy(x, s.guidance, &g)
}

/// The GPU of a `#[gpu_test]`, device 0, described on stdout. The test fails here, saying
/// why, when no GPU is usable (no driver, no device, a binary built without kernels): a GPU
/// test never passes without running.
pub fn gpu() -> Gpu {
    if let Some(reason) = fcd::backend::cuda::unavailable_reason() {
        panic!("a GPU test without a usable GPU: {reason}");
    }
    let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e:#}"));
    let (major, minor) = gpu.compute_capability();
    println!(
        "device: {} (sm_{major}{minor}, {}), NVRTC {}",
        gpu.name(),
        gpu.image_kind().label(),
        kernels::nvrtc_version().unwrap_or("?")
    );
    gpu
}

/// The CUDA backend of a `#[gpu_test]` on [`gpu`]'s device, in precision `p`.
pub fn cuda(p: Precision) -> Cuda {
    drop(gpu());
    Cuda::with_precision(0, p).unwrap_or_else(|e| panic!("{e:#}"))
}
