//! The embedded kernel images, and the DDIM kernels against their CPU twins.
//!
//! `gpu_*` tests are `#[gpu_test]`s (see `tests/common`): ignored where the build found no
//! CUDA driver, failing, never passing, where a driver is present but no GPU is usable.

mod common;

use common::*;

use fcd::backend::cuda::kernels::{self, ImageKind};
use fcd::backend::cuda::{self, Gpu};
use fcd::config::Schedule;
use fcd::ddim::{alphas_cumprod, DdimCoefs};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

const LENGTHS: [usize; 5] = [1, 7, 1000, 65537, (1 << 20) + 3];

#[test]
fn embedded_kernels_cover_every_source() {
    let required = std::env::var("FCD_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    if let Some(reason) = kernels::missing_reason() {
        assert!(
            !required,
            "FCD_REQUIRE_KERNELS=1 but this build embedded no kernels: {reason}"
        );
        println!("no kernels embedded (allowed without FCD_REQUIRE_KERNELS=1): {reason}");
        return;
    }
    assert!(kernels::nvrtc_version().is_some());

    // The tests build the library with the lab, whose kernels are in kernels/lab/.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut sources: Vec<String> = [dir.clone(), dir.join("lab")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .map(|p| p.file_stem().unwrap().to_str().unwrap().to_owned())
        .collect();
    sources.sort();
    assert_eq!(kernels::modules(), sources);

    for module in kernels::modules() {
        for kind in [ImageKind::Sm80, ImageKind::Sm90, ImageKind::Ptx80] {
            let image = kernels::image(module, kind)
                .unwrap_or_else(|| panic!("{module}: no {} image", kind.label()));
            if kind.is_cubin() {
                assert!(
                    image.bytes.starts_with(b"\x7fELF"),
                    "{module} {}: not an ELF file",
                    kind.label()
                );
            } else {
                let ptx = std::str::from_utf8(image.bytes).expect("PTX is text");
                assert!(ptx.contains(".target sm_80"), "{module}: PTX target");
            }
        }
    }
    let ptx = std::str::from_utf8(kernels::image("ddim", ImageKind::Ptx80).unwrap().bytes).unwrap();
    for name in ["ddim_invert_step", "ddim_denoise_step"] {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "{name} missing from PTX"
        );
    }
    // The kernels round every operation on purpose (bit parity with the CPU).
    assert!(
        !ptx.contains("fma."),
        "ddim PTX contains a fused multiply-add"
    );
}

/// The step's own coefficients (`DdimCoefs::inversion` or `::denoising`) at
/// both ends of the schedule and between; t = 0 is where `a` (inversion) or
/// `a'` (denoising) is exactly 1.
fn coefficient_sets(at: fn(&[f32], usize) -> DdimCoefs) -> Vec<(String, DdimCoefs)> {
    let abar = alphas_cumprod(&Schedule {
        timesteps: 1000,
        linear_start: 0.0015,
        linear_end: 0.0155,
    });
    [0, 1, 50, 99, 999]
        .into_iter()
        .map(|t| (format!("t={t}"), at(&abar, t)))
        .collect()
}

/// x spread past [-1, 1] so both clamps bite; eps standard normal.
fn inputs(rng: &mut ChaCha8Rng, n: usize) -> (Vec<f32>, Vec<f32>) {
    let x = (0..n)
        .map(|_| 1.5 * rng.sample::<f32, _>(StandardNormal))
        .collect();
    let eps = (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    (x, eps)
}

type CpuStep = fn(&mut [f32], &[f32], DdimCoefs);
type GpuStep =
    fn(&Gpu, &mut cuda::CudaSlice<f32>, &cuda::CudaSlice<f32>, DdimCoefs) -> anyhow::Result<()>;

/// Runs `gpu_step` on a copy of (x, eps) and returns what came back, read
/// into a NaN-filled buffer so that an element never copied shows.
fn run_on_gpu(gpu: &Gpu, gpu_step: GpuStep, x: &[f32], eps: &[f32], c: DdimCoefs) -> Vec<f32> {
    let stream = gpu.stream();
    let mut x_dev = stream.clone_htod(x).unwrap();
    let eps_dev = stream.clone_htod(eps).unwrap();
    gpu_step(gpu, &mut x_dev, &eps_dev, c).unwrap();
    let mut out = vec![f32::NAN; x.len()];
    stream.memcpy_dtoh(&x_dev, &mut out).unwrap();
    gpu.synchronize().unwrap();
    out
}

/// Expected: bit-identical (both sides round each IEEE operation to nearest,
/// in the same order, with no FMA); the contract is max |diff| <= 1e-6.
fn compare_with_cpu(
    step: &str,
    at: fn(&[f32], usize) -> DdimCoefs,
    cpu_step: CpuStep,
    gpu_step: GpuStep,
) {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0));
    let mut worst = 0.0f32;
    let mut differing_bits = 0usize;
    for (label, c) in coefficient_sets(at) {
        for n in LENGTHS {
            let (x, eps) = inputs(&mut rng, n);
            let mut want = x.clone();
            cpu_step(&mut want, &eps, c);
            let got = run_on_gpu(&gpu, gpu_step, &x, &eps, c);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(g.is_finite(), "{step} {label} n={n}: element {i} is {g}");
                let diff = (g - w).abs();
                assert!(
                    diff <= 1e-6,
                    "{step} {label} n={n}: element {i}: gpu {g} cpu {w} (x {} eps {})",
                    x[i],
                    eps[i]
                );
                worst = worst.max(diff);
                differing_bits += usize::from(g.to_bits() != w.to_bits());
            }
        }
    }
    println!("{step}: max |gpu - cpu| = {worst:e}, {differing_bits} elements not bit-identical");
    assert_eq!(
        differing_bits, 0,
        "{step}: expected bit parity with the CPU twin"
    );
}

#[gpu_test]
fn gpu_ddim_invert_matches_cpu() {
    compare_with_cpu(
        "invert_step",
        DdimCoefs::inversion,
        fcd::ddim::invert_step,
        cuda::ddim::invert_step,
    );
}

#[gpu_test]
fn gpu_ddim_denoise_matches_cpu() {
    compare_with_cpu(
        "denoise_step",
        DdimCoefs::denoising,
        fcd::ddim::denoise_step,
        cuda::ddim::denoise_step,
    );
}

/// A NaN from a broken network must survive the clamps on both sides.
#[gpu_test]
fn gpu_ddim_propagates_nan_like_cpu() {
    let gpu = gpu();
    let abar = alphas_cumprod(&Schedule {
        timesteps: 1000,
        linear_start: 0.0015,
        linear_end: 0.0155,
    });
    let x = vec![0.5, f32::NAN, -3.0, 0.25, f32::INFINITY];
    let eps = vec![f32::NAN, 0.1, 0.2, 0.3, -0.4];
    for (step, cpu_step, gpu_step) in [
        (
            "invert_step",
            fcd::ddim::invert_step as CpuStep,
            cuda::ddim::invert_step as GpuStep,
        ),
        (
            "denoise_step",
            fcd::ddim::denoise_step,
            cuda::ddim::denoise_step,
        ),
    ] {
        let c = DdimCoefs::denoising(&abar, 40);
        let mut want = x.clone();
        cpu_step(&mut want, &eps, c);
        let got = run_on_gpu(&gpu, gpu_step, &x, &eps, c);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.is_nan(),
                w.is_nan(),
                "{step} element {i}: gpu {g} cpu {w}"
            );
            if !w.is_nan() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{step} element {i}: gpu {g} cpu {w}"
                );
            }
        }
    }
}

#[gpu_test]
fn gpu_ddim_rejects_mismatched_lengths() {
    let gpu = gpu();
    let stream = gpu.stream();
    let mut x = stream.clone_htod(&vec![0.0f32; 8]).unwrap();
    let eps = stream.clone_htod(&vec![0.0f32; 7]).unwrap();
    let c = DdimCoefs::new(0.9, 0.8);
    let err = cuda::ddim::denoise_step(&gpu, &mut x, &eps, c).unwrap_err();
    assert!(
        err.to_string().contains("eps has 7 elements, expected 8"),
        "{err}"
    );
}
