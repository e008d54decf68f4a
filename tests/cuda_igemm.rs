//! The tensor-core convolution (`Backend::conv_fused`, `conv`, `conv_bwd` on
//! a `Cuda` backend: bf16 / fp16 operands, one TF32 product in the tf32
//! mode, 3xTF32 in the fp32 mode), every kernel version, against its CPU
//! twin (`fcd::lab::twin`, whose note says what the twin is fed
//! and whose `tolerance` says why each bound is what it is) on fresh random
//! inputs.

mod common;

use common::*;

use fcd::backend::cuda::dispatch::ConvKernel;
use fcd::backend::Resample;
use fcd::lab::twin::{self, ConvCase as Case};
use fcd::precision::Precision;
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

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

/// Every case with every kernel version that precision `p` runs (version 2
/// in the 16-bit modes only; where it cannot take a case, version 1 runs).
fn check_all(p: Precision, salt: u64) {
    let g = cuda(p);
    let tol = twin::tolerance(p);
    let kernels = if p.half().is_some() {
        ConvKernel::candidates()
    } else {
        vec![ConvKernel::V1]
    };
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(salt));
    let trials: Vec<_> = cases()
        .iter()
        .map(|c| (*c, twin::ConvTrial::new(c, p, &mut rng).unwrap()))
        .collect();
    for k in kernels {
        g.force_conv_kernel(Some(k));
        for (i, (c, trial)) in trials.iter().enumerate() {
            let e = trial.error(&g).unwrap();
            println!(
                "{p} {} case {i} (b {} {}x{} {}->{} k{} {:?} norm {:?} concat {:?}): rel-L2 {e:.3e}",
                k.label(),
                c.b,
                c.h,
                c.w,
                c.cin,
                c.cout,
                c.k,
                c.resample,
                c.norm,
                c.concat
            );
            assert!(e <= tol, "{p} {} case {i}: rel-L2 {e} > {tol}", k.label());
        }
    }
}

#[gpu_test]
fn gpu_igemm_bf16_matches_rounded_twin() {
    check_all(Precision::Bf16, 1);
}

#[gpu_test]
fn gpu_igemm_fp16_matches_rounded_twin() {
    check_all(Precision::Fp16, 2);
}

/// The tf32 mode's single TF32 product against the twin on TF32-rounded
/// operands.
#[gpu_test]
fn gpu_igemm_tf32_matches_rounded_twin() {
    check_all(Precision::Tf32, 5);
}

/// The fp32 mode's 3xTF32 products against the unrounded float32 twin.
#[gpu_test]
fn gpu_igemm_tf32x3_matches_float32_twin() {
    check_all(Precision::Fp32, 4);
}

/// The backward-data product runs the same kernels on the flipped,
/// transposed weights.
#[gpu_test]
fn gpu_igemm_conv_bwd_matches_rounded_twin() {
    for p in Precision::ALL {
        let g = cuda(p);
        let tol = twin::tolerance(p);
        let mut rng = ChaCha8Rng::seed_from_u64(common::seed(3));
        let kernels = [ConvKernel::V1]
            .into_iter()
            .chain(p.half().map(|_| ConvKernel::parse("v2_n32_s2").unwrap()));
        for k in kernels {
            g.force_conv_kernel(Some(k));
            for dims in [
                (2, 9, 7, 64, 96, 3),
                (3, 4, 4, 32, 2, 3),
                (2, 5, 3, 128, 64, 1),
            ] {
                let e = twin::ConvBwdTrial::new(dims, p, &mut rng)
                    .and_then(|t| t.error(&g))
                    .unwrap();
                println!("{p} {} conv_bwd {dims:?}: rel-L2 {e:.3e}", k.label());
                assert!(e <= tol, "{p} {}: rel-L2 {e} > {tol}", k.label());
            }
        }
    }
}
