//! The CUDA backend's own ops (everything but GroupNorm, attention and the
//! post-processing, which tests/cuda_norm_attention.rs and tests/cuda_post.rs
//! cover) against the CPU backend, through the Backend trait, on fresh random
//! inputs at odd and even shapes.
//!
//! The backend runs with output poisoning on: every output buffer is filled
//! with NaN before its kernel, so an element a kernel misses shows up as NaN
//! (the inputs are finite, so the CPU results never are).
//!
//! `gpu_*` tests are `#[gpu_test]`s (see `tests/common`): ignored where the build found no
//! CUDA driver, failing, never passing, where a driver is present but no GPU is usable.

mod common;

use common::*;

use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::cuda::backend::{Cuda, GpuTensor};
use fcd::backend::cuda::ops;
use fcd::backend::shapes::ConvDims;
use fcd::backend::Backend;
use fcd::ddim::DdimCoefs;
use fcd::lab::cuda_ref::conv::{conv_with_chunk, ConvWeights};
use fcd::lab::cuda_ref::CudaRef;
use fcd::precision::Precision;
use fcd::tensor::{rel_l2, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// float32 unit roundoff, 2^-24.
const U: f64 = 5.960_464_477_539_063e-8;

/// The CUDA backend in fp32 with every output poisoned with NaN before its kernel runs.
fn poisoned() -> Cuda {
    let g = cuda(Precision::Fp32);
    g.set_poison(true);
    g
}

/// A seeded generator (see `common::seed`).
fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(common::seed(0))
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| scale * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

fn up(g: &Cuda, t: &Tensor) -> GpuTensor {
    g.upload(t).unwrap()
}

fn down(g: &Cuda, t: &GpuTensor) -> Tensor {
    g.download(t).unwrap()
}

/// Distance in units in the last place (both finite).
fn ulps(a: f32, b: f32) -> u64 {
    fn key(v: f32) -> i64 {
        let i = v.to_bits() as i32;
        i64::from(if i < 0 { i32::MIN - i } else { i })
    }
    (key(a) - key(b)).unsigned_abs()
}

enum Tol {
    /// Bit-identical: the kernel does the CPU's IEEE operations in its order.
    Bits,
    /// Per element within `ulps`, or within `abs` where both are tiny.
    Close { ulps: u64, abs: f32 },
    /// Relative L2 distance over the tensor.
    RelL2(f64),
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: Tol) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            !g.is_nan() || w.is_nan(),
            "{what}: element {i} is NaN (never written?); cpu {w}"
        );
    }
    match tol {
        Tol::Bits => {
            for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits(),
                    "{what}: element {i}: gpu {g:e} cpu {w:e} (bit parity expected)"
                );
            }
        }
        Tol::Close { ulps: max, abs } => {
            let mut worst = 0;
            for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
                let d = ulps(g, w);
                assert!(
                    d <= max || (g - w).abs() <= abs,
                    "{what}: element {i}: gpu {g:e} cpu {w:e} ({d} ulp, allowed {max})"
                );
                worst = worst.max(d);
            }
            println!("{what}: max {worst} ulp");
        }
        Tol::RelL2(t) => {
            let r = rel_l2(&got.data, &want.data);
            let max_abs = got
                .data
                .iter()
                .zip(&want.data)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            println!("{what}: rel-L2 {r:.2e} (allowed {t:.2e}), max |diff| {max_abs:.2e}");
            assert!(r <= t, "{what}: rel-L2 {r:e} > {t:e}");
        }
    }
}

/// Both sides accumulate the K products of each output in float32 (FMA
/// chains over blocks of K, in different orders), an error of about
/// u * sqrt(K / 6) relative each (random-walk rounding of the partial sums);
/// 4 u sqrt(K) leaves about 4x margin over the two combined.
fn conv_tol(k_terms: usize) -> f64 {
    (4.0 * U * (k_terms as f64).sqrt()).max(1e-6)
}

/// (b, h, w, cin, cout, k)
const CONV_SHAPES: [(usize, usize, usize, usize, usize, usize); 11] = [
    (1, 1, 1, 1, 1, 3),
    (2, 3, 3, 2, 5, 3),
    (3, 7, 7, 5, 2, 3),
    (1, 16, 16, 32, 32, 3),
    (2, 33, 17, 96, 32, 3),
    (1, 33, 17, 32, 96, 3),
    (1, 16, 16, 1, 96, 3),
    (2, 7, 7, 5, 96, 1),
    (3, 1, 1, 96, 5, 1),
    (1, 33, 17, 96, 96, 1),
    (3, 1, 1, 1, 1, 1),
];

fn conv_weights(rng: &mut ChaCha8Rng, cin: usize, cout: usize, k: usize) -> (Tensor, Tensor) {
    let w = randn(rng, &[cout, cin, k, k], 1.0 / ((k * k * cin) as f32).sqrt());
    let bias = randn(rng, &[cout], 0.1);
    (w, bias)
}

#[gpu_test]
fn gpu_conv_matches_cpu() {
    let g = poisoned();
    let mut rng = rng();
    for (b, h, w, cin, cout, k) in CONV_SHAPES {
        let (wt, bias) = conv_weights(&mut rng, cin, cout, k);
        let cc = CpuRef.prepare_conv(&wt, &bias).unwrap();
        let gc = g.prepare_conv(&wt, &bias).unwrap();
        let x = randn(&mut rng, &[b, h, w, cin], 1.0);
        let dy = randn(&mut rng, &[b, h, w, cout], 1.0);
        let label = format!("{k}x{k} conv {b}x{h}x{w} {cin}->{cout}");
        check(
            &label,
            &down(&g, &g.conv(&up(&g, &x), &gc).unwrap()),
            &CpuRef.conv(&x, &cc).unwrap(),
            Tol::RelL2(conv_tol(k * k * cin)),
        );
        check(
            &format!("{label} backward"),
            &down(&g, &g.conv_bwd(&up(&g, &dy), &gc).unwrap()),
            &CpuRef.conv_bwd(&dy, &cc).unwrap(),
            Tol::RelL2(conv_tol(k * k * cout)),
        );
    }
}

/// Many small chunks (1 pixel, a prime number of pixels, a last partial
/// chunk) into NaN-filled outputs: the GEMMs must cover every pixel, and with
/// no bias (beta = 0) overwrite the NaN rather than add to it.
#[gpu_test]
fn gpu_conv_chunks_cover_the_image() {
    let g = poisoned();
    // The float32 matrices of the reference backend, which runs this chunked product.
    let r = CudaRef::new(0).unwrap();
    let mut rng = rng();
    for (b, h, w, cin, cout, k) in [(2, 7, 5, 5, 3, 3), (2, 7, 5, 6, 4, 1), (1, 3, 3, 32, 32, 3)] {
        let (wt, bias) = conv_weights(&mut rng, cin, cout, k);
        let cc = CpuRef.prepare_conv(&wt, &bias).unwrap();
        let gc = r.prepare_conv(&wt, &bias).unwrap();
        let x = randn(&mut rng, &[b, h, w, cin], 1.0);
        let dy = randn(&mut rng, &[b, h, w, cout], 1.0);
        let want_y = CpuRef.conv(&x, &cc).unwrap();
        let want_dx = CpuRef.conv_bwd(&dy, &cc).unwrap();
        let (xg, dyg) = (up(&g, &x), up(&g, &dy));
        let p = b * h * w;
        for chunk in [1, 7, 16, p - 1, p, p + 5] {
            let label = format!("{k}x{k} conv {b}x{h}x{w} {cin}->{cout}, chunks of {chunk}");
            let fwd = ConvDims {
                b,
                h,
                w,
                cin,
                cout,
                k,
            };
            let mut y = g
                .gpu()
                .stream()
                .clone_htod(&vec![f32::NAN; p * cout])
                .unwrap();
            conv_with_chunk(
                g.gpu(),
                g.blas(),
                &xg.buf,
                ConvWeights {
                    wmat: &gc.fwd,
                    bias: Some(&gc.bias),
                },
                fwd,
                &mut y,
                chunk,
            )
            .unwrap();
            let y = down(
                &g,
                &GpuTensor {
                    buf: y,
                    shape: want_y.shape.clone(),
                },
            );
            check(&label, &y, &want_y, Tol::RelL2(conv_tol(k * k * cin)));

            let bwd = ConvDims {
                cin: cout,
                cout: cin,
                ..fwd
            };
            let mut dx = g
                .gpu()
                .stream()
                .clone_htod(&vec![f32::NAN; p * cin])
                .unwrap();
            conv_with_chunk(
                g.gpu(),
                g.blas(),
                &dyg.buf,
                ConvWeights {
                    wmat: &gc.bwd,
                    bias: None,
                },
                bwd,
                &mut dx,
                chunk,
            )
            .unwrap();
            let dx = down(
                &g,
                &GpuTensor {
                    buf: dx,
                    shape: want_dx.shape.clone(),
                },
            );
            check(
                &format!("{label} backward"),
                &dx,
                &want_dx,
                Tol::RelL2(conv_tol(k * k * cout)),
            );
        }
    }
}

/// NHWC shapes for the elementwise ops, odd ones included.
const SHAPES: [[usize; 4]; 6] = [
    [1, 1, 1, 1],
    [2, 3, 5, 7],
    [3, 8, 6, 32],
    [1, 16, 16, 96],
    [2, 33, 17, 5],
    [4, 2, 2, 64],
];

/// silu: CUDA's expf and the host's expf each err by up to ~2 ulp, which
/// 1 + e, the reciprocal and the product carry through, each adding at most
/// half an ulp; 4 ulp bounds the difference. Everything else in this test is
/// the CPU's own sequence of correctly rounded float operations (intrinsics
/// forbid FMA contraction), so bit parity is expected.
#[gpu_test]
fn gpu_elementwise_ops_match_cpu() {
    let g = poisoned();
    let mut rng = rng();
    for shape in SHAPES {
        let [b, h, w, c] = shape;
        let s = format!("{shape:?}");
        let x = randn(&mut rng, &shape, 2.0);
        let y = randn(&mut rng, &shape, 1.0);
        let v = randn(&mut rng, &[b, 1, 1, c], 1.0);
        let (xg, yg) = (up(&g, &x), up(&g, &y));

        check(
            &format!("silu {s}"),
            &down(&g, &g.silu(&xg).unwrap()),
            &CpuRef.silu(&x).unwrap(),
            Tol::Close { ulps: 4, abs: 0.0 },
        );
        check(
            &format!("add {s}"),
            &down(&g, &g.add(&xg, &yg).unwrap()),
            &CpuRef.add(&x, &y).unwrap(),
            Tol::Bits,
        );
        check(
            &format!("add broadcast {s}"),
            &down(&g, &g.add(&xg, &up(&g, &v)).unwrap()),
            &CpuRef.add(&x, &v).unwrap(),
            Tol::Bits,
        );
        check(
            &format!("upsample2 {s}"),
            &down(&g, &g.upsample2(&xg).unwrap()),
            &CpuRef.upsample2(&x).unwrap(),
            Tol::Bits,
        );
        check(
            &format!("avg_pool2_bwd {s}"),
            &down(&g, &g.avg_pool2_bwd(&xg).unwrap()),
            &CpuRef.avg_pool2_bwd(&x).unwrap(),
            Tol::Bits,
        );
        let even = randn(&mut rng, &[b, 2 * h, 2 * w, c], 1.0);
        check(
            &format!("avg_pool2 {:?}", even.shape),
            &down(&g, &g.avg_pool2(&up(&g, &even)).unwrap()),
            &CpuRef.avg_pool2(&even).unwrap(),
            Tol::Bits,
        );
        for cb in [1, 3, 32] {
            let other = randn(&mut rng, &[b, h, w, cb], 1.0);
            check(
                &format!("concat {s} + {cb}"),
                &down(&g, &g.concat(&xg, &up(&g, &other)).unwrap()),
                &CpuRef.concat(&x, &other).unwrap(),
                Tol::Bits,
            );
        }
        let (a, bb) = (rng.random_range(0.0f32..1.0), rng.random_range(0.0f32..1.0));
        check(
            &format!("axpby {s}"),
            &down(&g, &g.axpby(a, &xg, bb, &yg).unwrap()),
            &CpuRef.axpby(a, &x, bb, &y).unwrap(),
            Tol::Bits,
        );
        let step = rng.random_range(-3.0f32..3.0);
        let mut xa = xg.clone();
        g.axpy(&mut xa, step, &yg).unwrap();
        let mut want = x.clone();
        CpuRef.axpy(&mut want, step, &y).unwrap();
        check(&format!("axpy {s}"), &down(&g, &xa), &want, Tol::Bits);

        let coefs = DdimCoefs::new(0.9, 0.7);
        let mut xd = xg.clone();
        g.ddim_denoise(&mut xd, &yg, coefs).unwrap();
        let mut want = x.clone();
        CpuRef.ddim_denoise(&mut want, &y, coefs).unwrap();
        check(
            &format!("ddim_denoise {s}"),
            &down(&g, &xd),
            &want,
            Tol::Bits,
        );
        let mut xi = xg.clone();
        g.ddim_invert(&mut xi, &yg, coefs).unwrap();
        let mut want = x.clone();
        CpuRef.ddim_invert(&mut want, &y, coefs).unwrap();
        check(
            &format!("ddim_invert {s}"),
            &down(&g, &xi),
            &want,
            Tol::Bits,
        );

        // The non-finite flag: a clean tensor leaves it 0, then the first of two bad
        // ones (a NaN, then an infinity, at random places) is the stage it keeps.
        let n = x.len();
        let mut bad = [x.clone(), x.clone()];
        bad[0].data[rng.random_range(0..n)] = f32::NAN;
        bad[1].data[rng.random_range(0..n)] = f32::INFINITY;
        let (mut fg, mut fc) = (up(&g, &Tensor::zeros(&[1])), Tensor::zeros(&[1]));
        for (stage, t) in [(3, &x), (9, &bad[0]), (11, &bad[1])] {
            g.flag_non_finite(&up(&g, t), &mut fg, stage).unwrap();
            CpuRef.flag_non_finite(t, &mut fc, stage).unwrap();
            check(
                &format!("flag_non_finite {s} stage {stage}"),
                &down(&g, &fg),
                &fc,
                Tol::Bits,
            );
        }
        assert_eq!(fc.data[0], 9.0, "{s}");
    }
}

/// The token ops: copies, sums of two rounded floats, and a mean summed in
/// double in token order on both sides, so bit parity is expected.
#[gpu_test]
fn gpu_token_ops_match_cpu() {
    let g = poisoned();
    let mut rng = rng();
    for [b, h, w, c] in [
        [1, 1, 1, 1],
        [2, 1, 1, 3],
        [3, 5, 7, 32],
        [2, 8, 8, 96],
        [1, 32, 32, 64],
        [2, 3, 1, 5],
    ] {
        let t = h * w;
        let s = format!("{b}x{h}x{w}x{c}");
        let x = randn(&mut rng, &[b, h, w, c], 1.0);
        let pos = randn(&mut rng, &[t + 1, c], 0.5);
        check(
            &format!("prepend_mean {s}"),
            &down(&g, &g.prepend_mean(&up(&g, &x), &up(&g, &pos)).unwrap()),
            &CpuRef.prepend_mean(&x, &pos).unwrap(),
            Tol::Bits,
        );
        let dtok = randn(&mut rng, &[b, 1, t + 1, c], 1.0);
        check(
            &format!("prepend_mean_bwd {s}"),
            &down(&g, &g.prepend_mean_bwd(&up(&g, &dtok), (h, w)).unwrap()),
            &CpuRef.prepend_mean_bwd(&dtok, (h, w)).unwrap(),
            Tol::Bits,
        );
        check(
            &format!("token0 {s}"),
            &down(&g, &g.token0(&up(&g, &dtok)).unwrap()),
            &CpuRef.token0(&dtok).unwrap(),
            Tol::Bits,
        );
        let d0 = randn(&mut rng, &[b, 1, 1, c], 1.0);
        check(
            &format!("token0_bwd {s}"),
            &down(&g, &g.token0_bwd(&up(&g, &d0), t + 1).unwrap()),
            &CpuRef.token0_bwd(&d0, t + 1).unwrap(),
            Tol::Bits,
        );
        let classes = rng.random_range(1..12usize);
        let table = randn(&mut rng, &[classes, c], 1.0);
        let rows: Vec<usize> = (0..b).map(|_| rng.random_range(0..classes)).collect();
        check(
            &format!("add_rows {s}, {classes} rows"),
            &down(
                &g,
                &g.add_rows(&up(&g, &d0), &up(&g, &table), &rows).unwrap(),
            ),
            &CpuRef.add_rows(&d0, &table, &rows).unwrap(),
            Tol::Bits,
        );
    }
}

/// Both sides compute in double (exp, the sum in class order, the division,
/// 1 - p) and round once to float; CUDA's and the host's double exp differ
/// by at most an ulp of double, which moves the float result by at most one
/// ulp where it lands next to a rounding boundary.
#[gpu_test]
fn gpu_timestep_embedding_matches_cpu() {
    let g = poisoned();
    let mut rng = rng();
    for (b, dim) in [(1, 2), (3, 32), (2, 96), (5, 128)] {
        let ts: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000usize)).collect();
        // Both sides evaluate exp, cos and sin in float64 and round once to
        // float32: the float64 libraries differ by at most an ulp of float64,
        // which survives the rounding only at a float32 rounding boundary.
        check(
            &format!("timestep_embedding {ts:?} x {dim}"),
            &down(&g, &g.timestep_embedding(&ts, dim).unwrap()),
            &CpuRef.timestep_embedding(&ts, dim).unwrap(),
            Tol::Close { ulps: 1, abs: 0.0 },
        );
    }
}

#[gpu_test]
fn gpu_log_softmax_grad_matches_cpu() {
    let g = poisoned();
    let mut rng = rng();
    for (b, k) in [(1, 1), (1, 2), (5, 3), (16, 16), (7, 2), (300, 5)] {
        let logits = randn(&mut rng, &[b, 1, 1, k], 3.0);
        let labels: Vec<usize> = (0..b).map(|_| rng.random_range(0..k)).collect();
        check(
            &format!("log_softmax_grad {b}x{k}"),
            &down(&g, &g.log_softmax_grad(&up(&g, &logits), &labels).unwrap()),
            &CpuRef.log_softmax_grad(&logits, &labels).unwrap(),
            Tol::Close { ulps: 1, abs: 0.0 },
        );
    }
}

#[gpu_test]
fn gpu_ops_reject_bad_shapes_like_cpu() {
    let g = poisoned();
    let t = |shape: &[usize]| up(&g, &Tensor::zeros(shape));
    let err = |r: anyhow::Result<GpuTensor>| format!("{:#}", r.expect_err("an error"));
    assert!(err(g.add(&t(&[2, 3, 3, 4]), &t(&[2, 1, 1, 5]))).contains("cannot broadcast"));
    assert!(err(g.avg_pool2(&t(&[1, 3, 4, 2]))).contains("odd spatial size 3 x 4"));
    assert!(err(g.concat(&t(&[1, 3, 4, 2]), &t(&[1, 3, 5, 2]))).contains("differ outside channels"));
    assert!(
        err(g.silu(&t(&[4, 2])).and_then(|y| g.avg_pool2(&y))).contains("expected an NHWC tensor")
    );
    let (w, bias) = (Tensor::zeros(&[4, 3, 3, 3]), Tensor::zeros(&[4]));
    let conv = g.prepare_conv(&w, &bias).unwrap();
    assert!(err(g.conv(&t(&[1, 5, 5, 2]), &conv))
        .contains("input has 2 channels, the weights expect 3"));
    assert!(g
        .prepare_conv(&Tensor::zeros(&[4, 3, 5, 5]), &bias)
        .is_err());
    assert!(err(g.add_rows(&t(&[2, 1, 1, 4]), &t(&[3, 4]), &[0, 3]))
        .contains("label 3 is out of range"));
    assert!(err(g.log_softmax_grad(&t(&[2, 1, 1, 4]), &[4, 0])).contains("label 4 is out of range"));
    assert!(err(g.prepend_mean_bwd(&t(&[1, 1, 5, 2]), (2, 3))).contains("5 tokens for 2 x 3"));

    let stream = g.gpu().stream();
    let a = stream.clone_htod(&[0f32; 8]).unwrap();
    let b = stream.clone_htod(&[0f32; 7]).unwrap();
    let mut y = stream.clone_htod(&[0f32; 8]).unwrap();
    let e = ops::add(g.gpu(), &a, &b, &mut y).unwrap_err();
    assert!(
        e.to_string().contains("b has 7 elements, expected 8"),
        "{e}"
    );
}
