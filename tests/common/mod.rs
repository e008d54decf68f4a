//! Shared helpers of the integration tests: fixtures and comparisons.
#![allow(dead_code)]

use fcd::backend::cpu_ref::CpuRef;
use fcd::config::Config;
use fcd::io::npy;
use fcd::model::load_net;
use fcd::model::{Net, NetKind};
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
