//! The tensor-core convolution (`Backend::conv_fused`, `conv`, `conv_bwd` on
//! a `Cuda` backend: bf16 / fp16 operands, or 3xTF32 in the fp32 mode)
//! against its CPU twin, `compose_conv_fused` on the `Cpu` backend, on fresh
//! random inputs.
//!
//! The twin is fed what the kernel multiplies: the transformed activation
//! (GroupNorm, SiLU, resampling in float32) and the weights, each rounded
//! once to the 16-bit type. What remains is float32 summation order and the
//! rare element whose rounding flips by one unit because the kernel applies
//! GroupNorm as `a x + s` rather than `(x - mean) rstd gamma + beta`.

mod common;

use fcd::backend::cpu::Cpu;
use fcd::backend::cuda::backend::Cuda;
use fcd::backend::{Backend, ConvPost, ConvPre, Norm, Resample};
use fcd::precision::{Half, Precision};
use fcd::tensor::{rel_l2, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// Relative L2 bound against the rounded twin. A fragment-layout or
/// indexing error gives O(1); summation order gives ~1e-7; a one-unit
/// rounding flip (probability ~2^-16 per element at bf16) adds ~1e-5 at most
/// on these sizes. Measured on the GPU: not yet (see benches/NOTES.md).
const TOL: f64 = 1e-4;

fn gpu(p: Precision) -> Option<Cuda> {
    if let Some(reason) = fcd::backend::cuda::unavailable_reason() {
        println!("skipped: {reason}");
        return None;
    }
    Some(Cuda::with_precision(0, p).expect("a usable GPU"))
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// `t` as the kernel's operand type holds it (float32 itself for 3xTF32).
fn round(t: &Tensor, half: Option<Half>) -> Tensor {
    let data = t
        .data
        .iter()
        .map(|&v| match half {
            Some(Half::Bf16) => half::bf16::from_f32(v).to_f32(),
            Some(Half::Fp16) => half::f16::from_f32(v).to_f32(),
            None => v,
        })
        .collect();
    Tensor::new(t.shape.clone(), data).unwrap()
}

struct Case {
    b: usize,
    /// Source grid.
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    resample: Resample,
    /// GroupNorm in the prologue: (with scale/shift, SiLU).
    norm: Option<(bool, bool)>,
    bcast: bool,
    residual: bool,
    /// The GPU reads the input as the concatenation of its first `c1`
    /// channels and the rest, from two tensors.
    concat: Option<usize>,
}

fn out_hw(c: &Case) -> (usize, usize) {
    match c.resample {
        Resample::None => (c.h, c.w),
        Resample::Up => (2 * c.h, 2 * c.w),
        Resample::Down => (c.h / 2, c.w / 2),
    }
}

fn run_case(g: &Cuda, half: Option<Half>, c: &Case, rng: &mut ChaCha8Rng) -> f64 {
    let x = random(rng, &[c.b, c.h, c.w, c.cin], 0.5, 2.0);
    let w = random(rng, &[c.cout, c.cin, c.k, c.k], 0.0, 0.1);
    let bias = random(rng, &[c.cout], 0.0, 0.5);
    let gamma = random(rng, &[c.cin], 1.0, 0.3);
    let beta = random(rng, &[c.cin], 0.0, 0.3);
    let ss = random(rng, &[c.b, 1, 1, 2 * c.cin], 0.0, 0.5);
    let (ho, wo) = out_hw(c);
    let e = random(rng, &[c.b, 1, 1, c.cout], 0.0, 1.0);
    let res = random(rng, &[c.b, ho, wo, c.cout], 0.0, 1.0);

    // CPU twin on the rounded operands.
    let mut a = x.clone();
    if let Some((with_ss, silu)) = c.norm {
        a = Cpu
            .group_norm(&x, &gamma, &beta, with_ss.then_some(&ss), silu)
            .unwrap();
    }
    a = match c.resample {
        Resample::None => a,
        Resample::Up => Cpu.upsample2(&a).unwrap(),
        Resample::Down => Cpu.avg_pool2(&a).unwrap(),
    };
    let cw = Cpu.prepare_conv(&round(&w, half), &bias).unwrap();
    let post_cpu = ConvPost {
        bcast: c.bcast.then_some(&e),
        residual: c.residual.then_some(&res),
    };
    let want = Cpu
        .conv_fused(&round(&a, half), &cw, &ConvPre::default(), &post_cpu)
        .unwrap();

    let up = |t: &Tensor| g.upload(t).unwrap();
    let (xg, gg, bg, sg, eg, rg) = (up(&x), up(&gamma), up(&beta), up(&ss), up(&e), up(&res));
    let halves = c.concat.map(|c1| {
        let (mut a, mut b2) = (Vec::new(), Vec::new());
        for px in x.data.chunks(c.cin) {
            a.extend_from_slice(&px[..c1]);
            b2.extend_from_slice(&px[c1..]);
        }
        let shape = |ch| vec![c.b, c.h, c.w, ch];
        (
            up(&Tensor::new(shape(c1), a).unwrap()),
            up(&Tensor::new(shape(c.cin - c1), b2).unwrap()),
        )
    });
    let gw = g.prepare_conv(&w, &bias).unwrap();
    let pre = ConvPre {
        skip: halves.as_ref().map(|h| &h.1),
        norm: c.norm.map(|(with_ss, silu)| Norm {
            gamma: &gg,
            beta: &bg,
            ss: with_ss.then_some(&sg),
            silu,
        }),
        resample: c.resample,
    };
    let post = ConvPost {
        bcast: c.bcast.then_some(&eg),
        residual: c.residual.then_some(&rg),
    };
    g.set_poison(true);
    let input = halves.as_ref().map_or(&xg, |h| &h.0);
    let got = g
        .download(&g.conv_fused(input, &gw, &pre, &post).unwrap())
        .unwrap();
    assert_eq!(got.shape, want.shape);
    for (i, v) in got.data.iter().enumerate() {
        assert!(v.is_finite(), "element {i} is {v} (never written?)");
    }
    rel_l2(&got.data, &want.data)
}

fn cases() -> Vec<Case> {
    let base = Case {
        b: 2,
        h: 9,
        w: 7,
        cin: 64,
        cout: 96,
        k: 3,
        resample: Resample::None,
        norm: Some((true, true)),
        bcast: true,
        residual: true,
        concat: None,
    };
    vec![
        // ResBlock out_layers: GN + scale/shift + SiLU, residual; odd grid.
        Case { ..base },
        // in_layers with the embedding as a per-sample bias, many M tiles.
        Case {
            b: 3,
            h: 33,
            w: 31,
            cin: 96,
            cout: 192,
            norm: Some((false, true)),
            residual: false,
            ..base
        },
        // Up and down ResBlocks.
        Case {
            h: 4,
            w: 3,
            cin: 64,
            cout: 64,
            resample: Resample::Up,
            norm: Some((false, true)),
            bcast: false,
            residual: false,
            ..base
        },
        Case {
            h: 12,
            w: 20,
            cin: 96,
            cout: 96,
            resample: Resample::Down,
            norm: Some((false, true)),
            bcast: false,
            residual: false,
            ..base
        },
        // Attention's qkv (GN without SiLU), a 1x1 skip with residual.
        Case {
            h: 16,
            w: 16,
            cin: 192,
            cout: 576,
            k: 1,
            norm: Some((false, false)),
            bcast: false,
            residual: false,
            ..base
        },
        Case {
            h: 5,
            w: 11,
            cin: 192,
            cout: 96,
            k: 1,
            norm: None,
            bcast: false,
            ..base
        },
        // The scalar path: the input conv (2 channels) and cin = 40.
        Case {
            b: 3,
            h: 13,
            w: 10,
            cin: 2,
            cout: 96,
            norm: None,
            bcast: false,
            residual: false,
            ..base
        },
        Case {
            h: 6,
            w: 5,
            cin: 40,
            cout: 20,
            k: 1,
            norm: None,
            bcast: false,
            ..base
        },
        // A linear layer: [B,1,1,C].
        Case {
            b: 5,
            h: 1,
            w: 1,
            cin: 384,
            cout: 768,
            k: 1,
            norm: None,
            bcast: false,
            residual: false,
            ..base
        },
        // An output block's first ResBlock: [h, skip] read from two
        // tensors by the GroupNorm statistics and the conv, and its 1x1
        // projection of the same pair with the residual.
        Case {
            h: 10,
            w: 9,
            cin: 192,
            cout: 96,
            norm: Some((false, true)),
            residual: false,
            concat: Some(96),
            ..base
        },
        Case {
            h: 7,
            w: 12,
            cin: 288,
            cout: 192,
            k: 1,
            norm: None,
            bcast: false,
            concat: Some(192),
            ..base
        },
        // A split off the K tile: the backend falls back to the composed ops.
        Case {
            h: 5,
            w: 5,
            cin: 96,
            cout: 32,
            norm: Some((true, true)),
            concat: Some(40),
            ..base
        },
        // More K tiles than one block row of N; cout = 1 (the output conv).
        Case {
            b: 1,
            h: 17,
            w: 19,
            cin: 256,
            cout: 1,
            norm: Some((false, true)),
            bcast: false,
            residual: false,
            ..base
        },
    ]
}

fn check_all(p: Precision, salt: u64, tol: f64) {
    let Some(g) = gpu(p) else { return };
    let half = p.half();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(salt));
    for (i, c) in cases().iter().enumerate() {
        let e = run_case(&g, half, c, &mut rng);
        println!(
            "{p} case {i} (b {} {}x{} {}->{} k{} {:?} norm {:?} concat {:?}): rel-L2 {e:.3e}",
            c.b, c.h, c.w, c.cin, c.cout, c.k, c.resample, c.norm, c.concat
        );
        assert!(e <= tol, "{p} case {i}: rel-L2 {e} > {tol}");
    }
}

#[test]
#[cfg_attr(
    not(fcd_cuda_driver),
    ignore = "needs a CUDA GPU: built without a CUDA driver; run with --include-ignored on a GPU machine"
)]
fn gpu_igemm_bf16_matches_rounded_twin() {
    check_all(Precision::Bf16, 1, TOL);
}

#[test]
#[cfg_attr(
    not(fcd_cuda_driver),
    ignore = "needs a CUDA GPU: built without a CUDA driver; run with --include-ignored on a GPU machine"
)]
fn gpu_igemm_fp16_matches_rounded_twin() {
    check_all(Precision::Fp16, 2, TOL);
}

/// The fp32 mode's 3xTF32 products against the unrounded float32 twin.
/// Each product keeps big*big + big*small + small*big of the TF32 splits:
/// the dropped small*small and the rounding of the small parts are ~2^-22
/// relative per product, ~3e-7 rel-L2 over random-sign sums; the CPU's own
/// float32 sums add ~1e-7. The bound leaves 10x; plain TF32 would give ~1e-3.
const TOL_TF32X3: f64 = 3e-6;

#[test]
#[cfg_attr(
    not(fcd_cuda_driver),
    ignore = "needs a CUDA GPU: built without a CUDA driver; run with --include-ignored on a GPU machine"
)]
fn gpu_igemm_tf32x3_matches_float32_twin() {
    check_all(Precision::Fp32, 4, TOL_TF32X3);
}

/// The backward-data product runs the same kernel on the flipped,
/// transposed weights.
#[test]
#[cfg_attr(
    not(fcd_cuda_driver),
    ignore = "needs a CUDA GPU: built without a CUDA driver; run with --include-ignored on a GPU machine"
)]
fn gpu_igemm_conv_bwd_matches_rounded_twin() {
    for p in Precision::ALL {
        let Some(g) = gpu(p) else { return };
        let half = p.half();
        let tol = if half.is_some() { TOL } else { TOL_TF32X3 };
        let mut rng = ChaCha8Rng::seed_from_u64(common::seed(3));
        for (b, h, w, cin, cout, k) in [
            (2, 9, 7, 64, 96, 3),
            (3, 4, 4, 32, 2, 3),
            (2, 5, 3, 128, 64, 1),
        ] {
            let wt = random(&mut rng, &[cout, cin, k, k], 0.0, 0.1);
            let bias = random(&mut rng, &[cout], 0.0, 0.5);
            let dy = random(&mut rng, &[b, h, w, cout], 0.0, 1.0);
            let cw = Cpu.prepare_conv(&round(&wt, half), &bias).unwrap();
            let want = Cpu.conv_bwd(&round(&dy, half), &cw).unwrap();
            let gw = g.prepare_conv(&wt, &bias).unwrap();
            g.set_poison(true);
            let got = g
                .download(&g.conv_bwd(&g.upload(&dy).unwrap(), &gw).unwrap())
                .unwrap();
            assert_eq!(got.shape, want.shape);
            assert!(got.data.iter().all(|v| v.is_finite()), "unwritten elements");
            let e = rel_l2(&got.data, &want.data);
            println!("{p} conv_bwd {b}x{h}x{w} {cout}->{cin} k{k}: rel-L2 {e:.3e}");
            assert!(e <= tol, "{p}: rel-L2 {e} > {tol}");
        }
    }
}
