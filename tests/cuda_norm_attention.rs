//! GroupNorm and attention kernels (forward and input gradient) against
//! their CPU twins, the `Cpu` backend, on fresh random inputs.
//!
//! `gpu_*` tests need a CUDA device; without one they print
//! "skipped: <reason>" and return.

mod common;

use fcd::backend::cpu::Cpu;
use fcd::backend::Backend;
use fcd::cuda::{self, CudaSlice, Gpu};
use fcd::tensor::{rel_l2, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

fn gpu_or_skip() -> Option<Gpu> {
    if let Some(reason) = cuda::unavailable_reason() {
        println!("skipped: {reason}");
        return None;
    }
    let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e:#}"));
    println!("device: {} ({})", gpu.name(), gpu.image_kind().label());
    Some(gpu)
}

fn normals(rng: &mut ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn up(gpu: &Gpu, v: &[f32]) -> CudaSlice<f32> {
    gpu.stream().clone_htod(v).unwrap()
}

/// An output buffer filled with NaN, so that an element never written shows.
fn poisoned(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.stream().clone_htod(&vec![f32::NAN; n]).unwrap()
}

fn down(gpu: &Gpu, buf: &CudaSlice<f32>) -> Vec<f32> {
    let mut out = vec![f32::NAN; buf.len()];
    gpu.stream().memcpy_dtoh(buf, &mut out).unwrap();
    gpu.synchronize().unwrap();
    out
}

/// Asserts every element was written (no NaN poison left, the CPU result
/// being finite) and the relative L2 distance is within `tol`; returns it.
fn compare(label: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(w.is_finite(), "{label}: CPU element {i} is {w}");
        assert!(g.is_finite(), "{label}: element {i} is {g} (cpu {w})");
    }
    let rel = rel_l2(got, want);
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        rel <= tol,
        "{label}: rel-L2 {rel:e} > {tol:e} (max |diff| {max_abs:e})"
    );
    rel
}

#[test]
#[cfg_attr(
    not(fcd_cuda_driver),
    ignore = "needs a CUDA GPU: built without a CUDA driver; run with --include-ignored on a GPU machine"
)]
fn gpu_group_norm_matches_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0x6e));
    let (mut worst_fwd, mut worst_bwd) = (0f64, 0f64);
    for b in [1, 3] {
        for hw in [1, 7, 64, 33 * 17] {
            for c in [32, 64, 96, 192] {
                for (with_ss, silu) in [(false, false), (false, true), (true, false), (true, true)]
                {
                    let label = format!("b={b} hw={hw} c={c} ss={with_ss} silu={silu}");
                    let n = b * hw * c;
                    // An offset mean so that the two-pass variance matters.
                    let x = normals(&mut rng, n, 0.7, 1.3);
                    let gamma = normals(&mut rng, c, 1.0, 0.2);
                    let beta = normals(&mut rng, c, 0.0, 0.3);
                    let ss = normals(&mut rng, 2 * b * c, 0.0, 0.3);
                    let dy = normals(&mut rng, n, 0.0, 1.0);

                    let shape = vec![b, hw, 1, c];
                    let xt = Tensor::new(shape.clone(), x.clone()).unwrap();
                    let gt = Tensor::new(vec![c], gamma.clone()).unwrap();
                    let bt = Tensor::new(vec![c], beta.clone()).unwrap();
                    let sst = Tensor::new(vec![b, 1, 1, 2 * c], ss.clone()).unwrap();
                    let dyt = Tensor::new(shape, dy.clone()).unwrap();
                    let sst = with_ss.then_some(&sst);
                    let want_y = Cpu.group_norm(&xt, &gt, &bt, sst, silu).unwrap();
                    let want_dx = Cpu.group_norm_bwd(&xt, &gt, &bt, sst, silu, &dyt).unwrap();

                    let xd = up(&gpu, &x);
                    let gd = up(&gpu, &gamma);
                    let bd = up(&gpu, &beta);
                    let ssd = up(&gpu, &ss);
                    let dyd = up(&gpu, &dy);
                    let ssd = with_ss.then_some(&ssd);
                    let mut y = poisoned(&gpu, n);
                    cuda::norm::group_norm(&gpu, &xd, &mut y, b, hw, c, &gd, &bd, ssd, silu)
                        .unwrap();
                    let mut dx = poisoned(&gpu, n);
                    cuda::norm::group_norm_bwd(
                        &gpu, &xd, &dyd, &mut dx, b, hw, c, &gd, &bd, ssd, silu,
                    )
                    .unwrap();

                    // Both sides take mean and 1/sigma in double (differing
                    // only in summation order, ~1e-16) and round the same f32
                    // operations without FMA; only expf against Rust's exp in
                    // SiLU differs (<= 2 ulp). Expected ~1e-8; bound 1e-6.
                    worst_fwd = worst_fwd.max(compare(
                        &format!("group_norm {label}"),
                        &down(&gpu, &y),
                        &want_y.data,
                        1e-6,
                    ));
                    // All in double on both sides, one final rounding to f32;
                    // the cancellation in dxhat - s1/n - xhat s2/n acts on
                    // double rounding errors only. Expected ~1e-8; bound 1e-6.
                    worst_bwd = worst_bwd.max(compare(
                        &format!("group_norm_bwd {label}"),
                        &down(&gpu, &dx),
                        &want_dx.data,
                        1e-6,
                    ));
                }
            }
        }
    }
    println!("group_norm: worst rel-L2 {worst_fwd:e}; group_norm_bwd: worst rel-L2 {worst_bwd:e}");
}

#[test]
#[cfg_attr(
    not(fcd_cuda_driver),
    ignore = "needs a CUDA GPU: built without a CUDA driver; run with --include-ignored on a GPU machine"
)]
fn gpu_attention_matches_cpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xa7));
    let (mut worst_fwd, mut worst_bwd) = (0f64, 0f64);
    for b in [1, 2] {
        for t in [1, 5, 64, 65, 257] {
            for (c, heads) in [(32, 1), (64, 2), (96, 2), (128, 2), (192, 8)] {
                for legacy in [true, false] {
                    let label = format!("b={b} t={t} c={c} heads={heads} legacy={legacy}");
                    // std 1.5 makes logits of std ~2: peaked but not one-hot.
                    let qkv = normals(&mut rng, b * t * 3 * c, 0.0, 1.5);
                    let dout = normals(&mut rng, b * t * c, 0.0, 1.0);
                    let qkvt = Tensor::new(vec![b, 1, t, 3 * c], qkv.clone()).unwrap();
                    let doutt = Tensor::new(vec![b, 1, t, c], dout.clone()).unwrap();
                    let want_out = Cpu.attention(&qkvt, heads, legacy).unwrap();
                    let want_dqkv = Cpu.attention_bwd(&qkvt, &doutt, heads, legacy).unwrap();

                    let qkvd = up(&gpu, &qkv);
                    let doutd = up(&gpu, &dout);
                    let mut out = poisoned(&gpu, b * t * c);
                    cuda::attention::attention(&gpu, &qkvd, &mut out, b, t, c, heads, legacy)
                        .unwrap();
                    let mut dqkv = poisoned(&gpu, b * t * 3 * c);
                    cuda::attention::attention_bwd(
                        &gpu, &qkvd, &doutd, &mut dqkv, b, t, c, heads, legacy,
                    )
                    .unwrap();

                    // Logits and the output sum are f32 dot products in a
                    // different order than the CPU's gemm (~1e-7 relative
                    // each), expf vs exp <= 2 ulp; the softmax sum is double
                    // on both. Expected ~1e-6; bound 1e-5.
                    worst_fwd = worst_fwd.max(compare(
                        &format!("attention {label}"),
                        &down(&gpu, &out),
                        &want_out.data,
                        1e-5,
                    ));
                    // As the forward, plus dS = W (dW - D) cancels where
                    // dW ~ D, magnifying those f32 differences. Expected a
                    // few 1e-6; bound 1e-4.
                    worst_bwd = worst_bwd.max(compare(
                        &format!("attention_bwd {label}"),
                        &down(&gpu, &dqkv),
                        &want_dqkv.data,
                        1e-4,
                    ));
                }
            }
        }
    }
    println!("attention: worst rel-L2 {worst_fwd:e}; attention_bwd: worst rel-L2 {worst_bwd:e}");
}

#[test]
#[cfg_attr(
    not(fcd_cuda_driver),
    ignore = "needs a CUDA GPU: built without a CUDA driver; run with --include-ignored on a GPU machine"
)]
fn gpu_norm_attention_reject_bad_sizes() {
    let Some(gpu) = gpu_or_skip() else { return };
    let x = up(&gpu, &[0.0; 2 * 48]);
    let g = up(&gpu, &[1.0; 48]);
    let mut y = poisoned(&gpu, 2 * 48);
    let err = cuda::norm::group_norm(&gpu, &x, &mut y, 1, 2, 48, &g, &g, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a positive multiple of 32"), "{err}");

    let x = up(&gpu, &[0.0; 64]);
    let g = up(&gpu, &[1.0; 32]);
    let ss = up(&gpu, &[0.0; 32]);
    let err = cuda::norm::group_norm(&gpu, &x, &mut y, 1, 2, 32, &g, &g, Some(&ss), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("scale/shift has 32 elements"), "{err}");

    let qkv = up(&gpu, &[0.0; 3 * 5 * 64]);
    let mut out = poisoned(&gpu, 5 * 64);
    let err = cuda::attention::attention(&gpu, &qkv, &mut out, 1, 5, 64, 3, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 heads do not divide 64"), "{err}");
    let mut short = poisoned(&gpu, 5 * 64 - 1);
    let err = cuda::attention::attention(&gpu, &qkv, &mut short, 1, 5, 64, 2, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected b * t * c = 320"), "{err}");
}
