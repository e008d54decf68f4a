//! Attention's input gradient in the GEMM form the fast backends use
//! (`fcd::backend::cuda::attention_gemm`: cuBLAS batched SGEMMs over the materialised
//! weights) against the CPU twin on fresh random inputs.

mod common;

use common::*;

use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::Backend;
use fcd::precision::Precision;
use fcd::tensor::{rel_l2, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

fn normals(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| std * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

#[gpu_test]
fn gpu_attention_bwd_gemm_matches_cpu() {
    let g = cuda(Precision::Fp32);
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xa9));
    let mut worst = 0f64;
    // The classifier's shapes (T = 1024 at d = 64, the 65-token pool with
    // two heads) and odd ones.
    for (b, t, c, heads) in [
        (1, 1, 32, 1),
        (2, 5, 64, 2),
        (3, 65, 128, 2),
        (2, 257, 96, 2),
        (2, 1024, 64, 1),
        (1, 256, 192, 8),
    ] {
        for legacy in [true, false] {
            let qkv =
                Tensor::new(vec![b, 1, t, 3 * c], normals(&mut rng, b * t * 3 * c, 1.5)).unwrap();
            let dout = Tensor::new(vec![b, 1, t, c], normals(&mut rng, b * t * c, 1.0)).unwrap();
            let want = CpuRef.attention_bwd(&qkv, &dout, heads, legacy).unwrap();
            g.set_poison(true);
            let got = g
                .download(
                    &g.attention_bwd(
                        &g.upload(&qkv).unwrap(),
                        &g.upload(&dout).unwrap(),
                        heads,
                        legacy,
                    )
                    .unwrap(),
                )
                .unwrap();
            assert!(
                got.data.iter().all(|v| v.is_finite()),
                "b={b} t={t} c={c}: unwritten or non-finite elements"
            );
            let e = rel_l2(&got.data, &want.data);
            println!("attention_bwd gemm b={b} t={t} c={c} heads={heads} legacy={legacy}: rel-L2 {e:.3e}");
            // As the SIMT kernels' test (tests/cuda_norm_attention.rs): f32
            // products in another order (~1e-7 each), float instead of
            // double row sums, and dS = W (dW - D) cancelling where dW ~ D.
            // Expected a few 1e-6; bound 1e-4.
            assert!(
                e <= 1e-4,
                "b={b} t={t} c={c} heads={heads} legacy={legacy}: {e}"
            );
            worst = worst.max(e);
        }
    }
    println!("attention_bwd gemm: worst rel-L2 {worst:e}");
}
