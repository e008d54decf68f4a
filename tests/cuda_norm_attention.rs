//! GroupNorm and attention kernels (forward and input gradient) against
//! their CPU twins, the `CpuRef` backend, on fresh random inputs.
//!
//! `gpu_*` tests are `#[gpu_test]`s (see `tests/common`): ignored where the build found no
//! CUDA driver, failing, never passing, where a driver is present but no GPU is usable.

mod common;

use common::*;

use fcd::backend::cpu_ref::{self, CpuRef};
use fcd::backend::cuda::attention::AttnDims;
use fcd::backend::cuda::norm::{NormDims, NormParams, Source};
use fcd::backend::cuda::{self, CudaSlice, Gpu};
use fcd::backend::Backend;
use fcd::tensor::{rel_l2, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

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

/// One GroupNorm test shape and its data's mean and spread.
struct GnCase {
    b: usize,
    hw: usize,
    c: usize,
    mean: f32,
    std: f32,
}

impl GnCase {
    fn new((b, hw, c): (usize, usize, usize), (mean, std): (f32, f32)) -> GnCase {
        GnCase {
            b,
            hw,
            c,
            mean,
            std,
        }
    }

    fn label(&self) -> String {
        let GnCase { b, hw, c, .. } = self;
        format!("b={b} hw={hw} c={c} x~N({}, {})", self.mean, self.std)
    }
}

/// Odd pixel counts and a single pixel; channel counts that do and do not
/// divide the split reductions' 256 threads (96 channels run as 2 rows x
/// 96 threads, 1536 as 6 sweeps of 256); data whose mean dwarfs its spread; and sizes
/// where, at b = 3, each block of the statistics merges several tiles on a
/// GPU of fewer than ~190 SMs (an H100 has 132).
fn gn_cases() -> Vec<GnCase> {
    let mut cases = Vec::new();
    for b in [1, 3] {
        for hw in [1, 7, 64, 33 * 17] {
            for c in [32, 64, 96, 192, 1536] {
                // An offset mean so that the two-pass variance matters.
                cases.push(GnCase::new((b, hw, c), (0.7, 1.3)));
            }
        }
        // Mean / sigma = 1e4: a one-pass sum of squares in double would
        // keep ~8 of the variance's 16 digits.
        for (hw, c) in [(7, 96), (33 * 17, 32), (33 * 17, 1536)] {
            cases.push(GnCase::new((b, hw, c), (100.0, 0.01)));
        }
    }
    // The classifier's first level (181 x 181): at b = 1 the split
    // reductions of the statistics and of the backward's group sums run
    // hundreds of short runs per sample.
    for c in [32, 96, 192, 1536] {
        cases.push(GnCase::new((1, 181 * 181, c), (0.7, 1.3)));
    }
    for c in [32, 96, 192] {
        cases.push(GnCase::new((3, 181 * 181, c), (0.7, 1.3)));
    }
    cases
}

/// (scale/shift, SiLU) variants; the largest cases take one to keep the
/// CPU reference quick.
fn gn_variants(n: usize) -> &'static [(bool, bool)] {
    if n > 4_000_000 {
        &[(true, true)]
    } else {
        &[(false, false), (false, true), (true, false), (true, true)]
    }
}

#[gpu_test]
fn gpu_group_norm_matches_cpu() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0x6e));
    let (mut worst_fwd, mut worst_bwd) = (0f64, 0f64);
    for case in gn_cases() {
        let GnCase { b, hw, c, .. } = case;
        let n = b * hw * c;
        for &(with_ss, silu) in gn_variants(n) {
            let label = format!("{} ss={with_ss} silu={silu}", case.label());
            let x = normals(&mut rng, n, case.mean, case.std);
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
            let want_y = CpuRef.group_norm(&xt, &gt, &bt, sst, silu).unwrap();
            let want_dx = CpuRef
                .group_norm_bwd(&xt, &gt, &bt, sst, silu, &dyt)
                .unwrap();

            let xd = up(&gpu, &x);
            let gd = up(&gpu, &gamma);
            let bd = up(&gpu, &beta);
            let ssd = up(&gpu, &ss);
            let dyd = up(&gpu, &dy);
            let ssd = with_ss.then_some(&ssd);
            let mut y = poisoned(&gpu, n);
            cuda::norm::group_norm(
                &gpu,
                &xd,
                &mut y,
                NormDims { b, hw, c },
                NormParams {
                    gamma: &gd,
                    beta: &bd,
                    ss: ssd,
                    silu,
                },
            )
            .unwrap();
            let mut dx = poisoned(&gpu, n);
            cuda::norm::group_norm_bwd(
                &gpu,
                &xd,
                &dyd,
                &mut dx,
                NormDims { b, hw, c },
                NormParams {
                    gamma: &gd,
                    beta: &bd,
                    ss: ssd,
                    silu,
                },
            )
            .unwrap();

            // Both sides take mean and 1/sigma in double (the GPU by a
            // split two-pass reduction merged with Chan's formula, the CPU
            // by plain two-pass sums; they differ by <= ~1e-13 relative,
            // even at mean / sigma = 1e4) and round the same f32 operations
            // without FMA; only expf against Rust's exp in SiLU differs
            // (<= 2 ulp). Expected ~1e-8; bound 1e-6.
            worst_fwd = worst_fwd.max(compare(
                &format!("group_norm {label}"),
                &down(&gpu, &y),
                &want_y.data,
                1e-6,
            ));
            // All in double on both sides, one final rounding to f32; the
            // cancellation in dxhat - s1/n - xhat s2/n acts on double
            // rounding errors only. Expected ~1e-8; bound 1e-6.
            worst_bwd = worst_bwd.max(compare(
                &format!("group_norm_bwd {label}"),
                &down(&gpu, &dx),
                &want_dx.data,
                1e-6,
            ));
        }
    }
    println!("group_norm: worst rel-L2 {worst_fwd:e}; group_norm_bwd: worst rel-L2 {worst_bwd:e}");
}

#[gpu_test]
fn gpu_group_norm_affine_matches_cpu() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0x6f));
    let mut worst = 0f64;
    for case in gn_cases() {
        let GnCase { b, hw, c, .. } = case;
        for with_ss in [false, true] {
            let label = format!("group_norm_affine {} ss={with_ss}", case.label());
            let x = normals(&mut rng, b * hw * c, case.mean, case.std);
            let gamma = normals(&mut rng, c, 1.0, 0.2);
            let beta = normals(&mut rng, c, 0.0, 0.3);
            let ss = normals(&mut rng, 2 * b * c, 0.0, 0.3);
            let want =
                cpu_ref::group_norm_affine(&x, b, hw, c, &gamma, &beta, with_ss.then_some(&ss[..]));

            let xd = up(&gpu, &x);
            let gd = up(&gpu, &gamma);
            let bd = up(&gpu, &beta);
            let ssd = up(&gpu, &ss);
            let mut out = poisoned(&gpu, 2 * b * c);
            cuda::norm::group_norm_affine(
                &gpu,
                Source::One(&xd),
                NormDims { b, hw, c },
                NormParams {
                    gamma: &gd,
                    beta: &bd,
                    ss: with_ss.then_some(&ssd),
                    silu: false,
                },
                &mut out,
            )
            .unwrap();

            // The same double operations in the same order on both sides,
            // one rounding to f32 each; the statistics feeding them differ
            // by <= ~1e-13 relative (summation order), so a and s round to
            // the same float except where their exact values lie within
            // ~1e-13 of a rounding boundary, and then by 1 ulp (6e-8).
            // Expected 0 or a few 1e-9; bound 1e-7.
            worst = worst.max(compare(&label, &down(&gpu, &out), &want, 1e-7));

            // The same tensor as the concatenation of its first c1 channels
            // and the rest, read in place (a UNet output block's input):
            // the same sums in the same order, so the same bound.
            let c1 = c - 32;
            if c1 > 0 {
                let (mut x1, mut x2) = (Vec::new(), Vec::new());
                for px in x.chunks(c) {
                    x1.extend_from_slice(&px[..c1]);
                    x2.extend_from_slice(&px[c1..]);
                }
                let (x1d, x2d) = (up(&gpu, &x1), up(&gpu, &x2));
                let mut out = poisoned(&gpu, 2 * b * c);
                cuda::norm::group_norm_affine(
                    &gpu,
                    Source::Concat(&x1d, &x2d, c1),
                    NormDims { b, hw, c },
                    NormParams {
                        gamma: &gd,
                        beta: &bd,
                        ss: with_ss.then_some(&ssd),
                        silu: false,
                    },
                    &mut out,
                )
                .unwrap();
                let label = format!("{label} concat at {c1}");
                worst = worst.max(compare(&label, &down(&gpu, &out), &want, 1e-7));
            }
        }
    }
    println!("group_norm_affine: worst rel-L2 {worst:e}");
}

/// The CPU twin of the folded GroupNorm affine map (what a fused
/// convolution prologue applies) reproduces the CPU GroupNorm: a * x + s in
/// double, then the optional SiLU, against `CpuRef::group_norm`.
#[test]
fn group_norm_affine_twin_matches_group_norm() {
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0x70));
    let mut worst = 0f64;
    for b in [1, 3] {
        for hw in [7, 64, 33 * 17] {
            for c in [32, 96, 192, 1536] {
                for (with_ss, silu) in [(false, false), (false, true), (true, false), (true, true)]
                {
                    let label = format!("b={b} hw={hw} c={c} ss={with_ss} silu={silu}");
                    let n = b * hw * c;
                    let x = normals(&mut rng, n, 0.7, 1.3);
                    let gamma = normals(&mut rng, c, 1.0, 0.2);
                    let beta = normals(&mut rng, c, 0.0, 0.3);
                    let ss = normals(&mut rng, 2 * b * c, 0.0, 0.3);
                    let xt = Tensor::new(vec![b, hw, 1, c], x.clone()).unwrap();
                    let gt = Tensor::new(vec![c], gamma.clone()).unwrap();
                    let bt = Tensor::new(vec![c], beta.clone()).unwrap();
                    let sst = Tensor::new(vec![b, 1, 1, 2 * c], ss.clone()).unwrap();
                    let want = CpuRef
                        .group_norm(&xt, &gt, &bt, with_ss.then_some(&sst), silu)
                        .unwrap();

                    let map = cpu_ref::group_norm_affine(
                        &x,
                        b,
                        hw,
                        c,
                        &gamma,
                        &beta,
                        with_ss.then_some(&ss[..]),
                    );
                    assert_eq!(map.len(), 2 * b * c, "{label}: map length");
                    let got: Vec<f32> = x
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let (bi, ch) = (i / (hw * c), i % c);
                            let a = map[bi * 2 * c + ch] as f64;
                            let s = map[bi * 2 * c + c + ch] as f64;
                            let z = a * v as f64 + s;
                            (if silu { z / (1.0 + (-z).exp()) } else { z }) as f32
                        })
                        .collect();
                    // a and s are rounded to f32 once (2^-24 relative each)
                    // and a x, s are of the order of y for this data (mean /
                    // sigma ~ 0.5), while group_norm rounds ~4 f32
                    // operations per element. Expected ~1e-7; bound 1e-6.
                    // (With mean / sigma = M, the rounding of a and s costs
                    // ~M 2^-24 relative: the folded map is for activations,
                    // not for data far from zero mean.)
                    worst = worst.max(compare(&label, &got, &want.data, 1e-6));
                }
            }
        }
    }
    println!("group_norm_affine twin vs group_norm: worst rel-L2 {worst:e}");
}

#[gpu_test]
fn gpu_attention_matches_cpu() {
    let gpu = gpu();
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
                    let want_out = CpuRef.attention(&qkvt, heads, legacy).unwrap();
                    let want_dqkv = CpuRef.attention_bwd(&qkvt, &doutt, heads, legacy).unwrap();

                    let qkvd = up(&gpu, &qkv);
                    let doutd = up(&gpu, &dout);
                    let mut out = poisoned(&gpu, b * t * c);
                    fcd::lab::cuda_ref::attention::attention(
                        &gpu,
                        &qkvd,
                        &mut out,
                        AttnDims {
                            b,
                            t,
                            c,
                            heads,
                            legacy,
                        },
                    )
                    .unwrap();
                    let mut dqkv = poisoned(&gpu, b * t * 3 * c);
                    fcd::lab::cuda_ref::attention::attention_bwd(
                        &gpu,
                        &qkvd,
                        &doutd,
                        &mut dqkv,
                        AttnDims {
                            b,
                            t,
                            c,
                            heads,
                            legacy,
                        },
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

#[gpu_test]
fn gpu_norm_attention_reject_bad_sizes() {
    let gpu = gpu();
    let x = up(&gpu, &[0.0; 2 * 48]);
    let g = up(&gpu, &[1.0; 48]);
    let mut y = poisoned(&gpu, 2 * 48);
    let err = cuda::norm::group_norm(
        &gpu,
        &x,
        &mut y,
        NormDims { b: 1, hw: 2, c: 48 },
        NormParams {
            gamma: &g,
            beta: &g,
            ss: None,
            silu: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a positive multiple of 32"), "{err}");

    let x = up(&gpu, &[0.0; 64]);
    let g = up(&gpu, &[1.0; 32]);
    let ss = up(&gpu, &[0.0; 32]);
    let err = cuda::norm::group_norm(
        &gpu,
        &x,
        &mut y,
        NormDims { b: 1, hw: 2, c: 32 },
        NormParams {
            gamma: &g,
            beta: &g,
            ss: Some(&ss),
            silu: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("scale/shift has 32 elements"), "{err}");

    let x = up(&gpu, &[0.0; 2 * 64]);
    let g = up(&gpu, &[1.0; 64]);
    let mut short = poisoned(&gpu, 2 * 2 * 64 - 1);
    let err = cuda::norm::group_norm_affine(
        &gpu,
        Source::One(&x),
        NormDims { b: 2, hw: 1, c: 64 },
        NormParams {
            gamma: &g,
            beta: &g,
            ss: None,
            silu: false,
        },
        &mut short,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("out has 255 elements, expected 256"), "{err}");

    let qkv = up(&gpu, &[0.0; 3 * 5 * 64]);
    let mut out = poisoned(&gpu, 5 * 64);
    let err = fcd::lab::cuda_ref::attention::attention(
        &gpu,
        &qkv,
        &mut out,
        AttnDims {
            b: 1,
            t: 5,
            c: 64,
            heads: 3,
            legacy: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 heads do not divide 64"), "{err}");
    let mut short = poisoned(&gpu, 5 * 64 - 1);
    let err = fcd::lab::cuda_ref::attention::attention(
        &gpu,
        &qkv,
        &mut short,
        AttnDims {
            b: 1,
            t: 5,
            c: 64,
            heads: 2,
            legacy: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("out has 319 elements, expected 320"), "{err}");
}
