//! Per-slice normalisation and anomaly maps on the GPU (kernels/post.cu)
//! against their CPU twins in `fcd::post` and the numpy fixtures.
//!
//! Everything is compared bit for bit: the kernels round every float32 and
//! float64 operation explicitly (no FMA contraction), in the CPU's order, and
//! the only reductions are min, max and integer histogram counts, which do not
//! depend on the order of summation. Histogram matching truncates to grey
//! levels, so any rounding difference would show as a whole-level jump rather
//! than as noise a tolerance could absorb.
//!
//! `gpu_*` tests are `#[gpu_test]`s (see `tests/common`): ignored where the build found no
//! CUDA driver, failing, never passing, where a driver is present but no GPU is usable.

mod common;

use common::*;

use std::path::PathBuf;

use fcd::backend::cuda::{self, CudaSlice, Gpu};
use fcd::io::npy::read_array;
use fcd::post::{anomaly_map_batch, normalize_batch};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// (H, W) pairs: a single column, odd sizes, and the model's full slice.
const SIZES: [(usize, usize); 4] = [(1, 5), (17, 23), (61, 47), (256, 256)];
const BATCHES: [usize; 2] = [1, 3];

fn fixture(name: &str) -> Vec<f32> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let (_, data) = read_array(&path).unwrap_or_else(|e| panic!("{e:#}"));
    // The fixtures are float32, so narrowing back is exact.
    data.into_iter().map(|v| v as f32).collect()
}

fn fixture_shape(name: &str) -> Vec<usize> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    read_array(&path).unwrap_or_else(|e| panic!("{e:#}")).0
}

/// A slice like an MRI: a zero background around a body whose intensities
/// take either a few grey levels (flat CDF runs) or a continuum.
fn mri_like(rng: &mut ChaCha8Rng, hw: usize, levels: Option<u32>) -> Vec<f32> {
    let scale = rng.random_range(1.0f32..2000.0);
    (0..hw)
        .map(|_| {
            if rng.random_range(0.0f32..1.0) < 0.4 {
                return 0.0;
            }
            match levels {
                Some(l) => scale * rng.random_range(1..=l) as f32 / l as f32,
                None => scale * rng.random_range(0.0f32..1.0),
            }
        })
        .collect()
}

/// A pseudo-healthy image: x0 with noise and a rescaled intensity range, so
/// that histogram matching has something to undo.
fn healed_from(rng: &mut ChaCha8Rng, x0: &[f32]) -> Vec<f32> {
    let gain = rng.random_range(0.5f32..1.5);
    x0.iter()
        .map(|&v| {
            if v == 0.0 {
                0.0
            } else {
                gain * v + 30.0 * rng.sample::<f32, _>(StandardNormal)
            }
        })
        .collect()
}

fn nan_buffer(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.stream().clone_htod(&vec![f32::NAN; n]).unwrap()
}

fn download(gpu: &Gpu, buf: &CudaSlice<f32>) -> Vec<f32> {
    let out = gpu.stream().clone_dtoh(buf).unwrap();
    gpu.synchronize().unwrap();
    out
}

fn gpu_normalize(gpu: &Gpu, x: &[f32], b: usize, hw: usize) -> anyhow::Result<Vec<f32>> {
    let x_dev = gpu.stream().clone_htod(x).unwrap();
    let mut y = nan_buffer(gpu, x.len());
    cuda::post::normalize(gpu, &x_dev, &mut y, b, hw)?;
    Ok(download(gpu, &y))
}

/// The maps and the differences they normalise.
fn gpu_anomaly(
    gpu: &Gpu,
    x0: &[f32],
    xhat: &[f32],
    b: usize,
    hw: usize,
    hm: bool,
) -> (Vec<f32>, Vec<f32>) {
    let x0_dev = gpu.stream().clone_htod(x0).unwrap();
    let xhat_dev = gpu.stream().clone_htod(xhat).unwrap();
    let mut out = nan_buffer(gpu, x0.len());
    let mut diff = nan_buffer(gpu, x0.len());
    cuda::post::anomaly(gpu, &x0_dev, &xhat_dev, (&mut out, &mut diff), b, hw, hm)
        .unwrap_or_else(|e| panic!("{e:#}"));
    (download(gpu, &out), download(gpu, &diff))
}

/// Bit equality (see the module note), after checking the output was fully
/// written (the buffer started as NaN and no input here yields NaN).
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| v.is_nan()) {
        panic!("{what}: element {i} not written (NaN)");
    }
    let differing: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = differing.first() {
        let worst = differing
            .iter()
            .map(|&j| (got[j] - want[j]).abs())
            .fold(0.0f32, f32::max);
        panic!(
            "{what}: {} of {} elements differ (max |diff| {worst:e}); first at {i}: gpu {} cpu {}",
            differing.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

#[gpu_test]
fn gpu_normalize_matches_cpu() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0));
    for (h, w) in SIZES {
        let hw = h * w;
        for b in BATCHES {
            let mut x = Vec::with_capacity(b * hw);
            for s in 0..b {
                let levels = if s % 2 == 0 { Some(5) } else { None };
                let mut slice = mri_like(&mut rng, hw, levels);
                // A 1x5 slice may come out constant; keep it valid.
                slice[0] = -1.0;
                x.extend(slice);
            }
            let want = normalize_batch(&x, hw).unwrap();
            let got = gpu_normalize(&gpu, &x, b, hw).unwrap_or_else(|e| panic!("{e:#}"));
            assert_bits(&format!("normalize {b}x{h}x{w}"), &got, &want);
        }
    }
}

#[gpu_test]
fn gpu_normalize_errors_match_cpu() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0));
    let hw = 37 * 41;
    let good = |rng: &mut ChaCha8Rng| mri_like(rng, hw, None);

    // Slice 1 constant, slice 2 non-finite: the first bad slice is named.
    let mut x = good(&mut rng);
    x.extend(vec![3.25f32; hw]);
    let mut bad = good(&mut rng);
    bad[700] = f32::INFINITY;
    x.extend(bad);
    let cases: Vec<(&str, Vec<f32>, usize)> = {
        let constant = x.clone();
        // Non-finite values in two different threads' strides: the lowest
        // index wins, whichever thread sees its own first.
        let mut nan = good(&mut rng);
        nan.extend(good(&mut rng));
        nan[hw + 1000] = f32::NEG_INFINITY;
        nan[hw + 513] = f32::NAN;
        nan[hw + 1200] = f32::NAN;
        let mut zero = vec![0.0f32; hw];
        zero.extend(good(&mut rng));
        vec![
            ("constant", constant, 3),
            ("nan", nan, 2),
            ("zeros", zero, 2),
        ]
    };
    for (label, x, b) in cases {
        let want = normalize_batch(&x, hw).unwrap_err();
        let got = gpu_normalize(&gpu, &x, b, hw).unwrap_err();
        println!("{label}: {got:#}");
        assert_eq!(format!("{got:#}"), format!("{want:#}"), "{label}");
        assert_eq!(format!("{got}"), format!("{want}"), "{label}");
    }
}

#[gpu_test]
fn gpu_anomaly_matches_cpu() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0));
    for (h, w) in SIZES {
        let hw = h * w;
        for b in BATCHES {
            let mut x0 = Vec::with_capacity(b * hw);
            let mut xhat = Vec::with_capacity(b * hw);
            for s in 0..b {
                let levels = [Some(4), None, Some(40)][s % 3];
                let a = mri_like(&mut rng, hw, levels);
                let mut healed = healed_from(&mut rng, &a);
                if b == 3 && s == 2 && hw > 5 {
                    // A constant pseudo-healthy slice: norm01 maps it to zeros.
                    healed.fill(7.0);
                }
                x0.extend(a);
                xhat.extend(healed);
            }
            for hm in [false, true] {
                let want = anomaly_map_batch(&x0, &xhat, hw, hm).unwrap();
                let got = gpu_anomaly(&gpu, &x0, &xhat, b, hw, hm);
                assert_bits(
                    &format!("anomaly {b}x{h}x{w} hist_match={hm}"),
                    &got.0,
                    &want.0,
                );
                let what = format!("difference {b}x{h}x{w} hist_match={hm}");
                assert_bits(&what, &got.1, &want.1);
            }
        }
    }
}

#[gpu_test]
fn gpu_anomaly_matches_fixtures() {
    let gpu = gpu();
    let shape = fixture_shape("post_x0.npy");
    let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let hw = h * w;
    let x0 = fixture("post_x0.npy");
    let xhat = fixture("post_xhat.npy");
    let b = x0.len() / hw;
    for (hm, name) in [(true, "anomaly_hm.npy"), (false, "anomaly_nohm.npy")] {
        let got = gpu_anomaly(&gpu, &x0, &xhat, b, hw, hm).0;
        let cpu = anomaly_map_batch(&x0, &xhat, hw, hm).unwrap().0;
        assert_bits(&format!("{name} (vs CPU)"), &got, &cpu);
        assert_bits(&format!("{name} (vs numpy)"), &got, &fixture(name));
    }
}

#[gpu_test]
fn gpu_post_rejects_bad_lengths() {
    let gpu = gpu();
    let x = gpu.stream().clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
    let mut y = nan_buffer(&gpu, 3);
    let err = cuda::post::normalize(&gpu, &x, &mut y, 2, 2).unwrap_err();
    assert!(format!("{err:#}").contains("normalize: x has 3 elements, expected 4"));
    let mut d = nan_buffer(&gpu, 3);
    let err = cuda::post::anomaly(&gpu, &x, &x, (&mut y, &mut d), 1, 0, true).unwrap_err();
    assert!(format!("{err:#}").contains("slices of 0 pixels"));
    let mut short = nan_buffer(&gpu, 2);
    let err = cuda::post::anomaly(&gpu, &x, &x, (&mut y, &mut short), 1, 3, true).unwrap_err();
    assert!(format!("{err:#}").contains("anomaly: diff has 2 elements, expected 3"));
}
