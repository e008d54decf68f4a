//! Attention's input gradient as cuBLAS batched SGEMMs over the
//! materialised `t x t` weights (kernels/softmax.cu for the two row-wise
//! steps), per head and over the batch: the form of the CPU twin
//! (`crate::backend::cpu_ref`, attention.rs `backward`), in float32. The fast
//! backends use it in place of the SIMT kernels of `attention.rs`, which
//! work one query row per block.

use anyhow::{ensure, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::attention::AttnDims;
use super::gemm::{sgemm_batched, BatchedGemm};
use super::{launch, Gpu};

/// Bound on the two `t x t` workspaces together; larger batches run in chunks.
const WORKSPACE_BYTES: usize = 512 << 20;

/// Row-wise kernels' block size.
const THREADS: u32 = 256;

/// Channel offsets of head `h`'s q, k, v in a `3c` row, as kernels/attention.cu's head_of.
fn offsets(h: usize, d: usize, c: usize, legacy: bool) -> (usize, usize, usize) {
    if legacy {
        (3 * h * d, 3 * h * d + d, 3 * h * d + 2 * d)
    } else {
        (h * d, c + h * d, 2 * c + h * d)
    }
}

/// `dqkv` = gradient of multi-head attention on `qkv` (`[b, t, 3c]`) given
/// the output gradient `dout` (`[b, t, c]`); every element written.
pub fn attention_bwd(
    gpu: &Gpu,
    blas: &CudaBlas,
    qkv: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    dqkv: &mut CudaSlice<f32>,
    dims: AttnDims,
) -> Result<()> {
    let op = "attention_bwd";
    let d = dims.head_dim(op)?;
    dims.expect_lens(gpu, op, qkv, ("dout", dout))?;
    gpu.expect_len(op, "dqkv", dqkv, qkv.len())?;
    let AttnDims {
        b,
        t,
        c,
        heads,
        legacy,
    } = dims;
    if b * t == 0 {
        return Ok(());
    }
    ensure!(
        u32::try_from(t).is_ok(),
        "{op}: {t} tokens exceed the kernels' 32-bit rows"
    );
    let tt = t * t;
    let chunk = (WORKSPACE_BYTES / (2 * tt * 4)).clamp(1, b);
    // SAFETY (both): every element is written (the logits GEMM, the dP GEMM)
    // before anything reads it, in stream order.
    let mut w = unsafe { gpu.stream().alloc::<f32>(chunk * tt) }
        .with_context(|| format!("{op}: allocating {chunk} x {t} x {t} attention weights"))?;
    let mut dw = unsafe { gpu.stream().alloc::<f32>(chunk * tt) }
        .with_context(|| format!("{op}: allocating {chunk} x {t} x {t} weight gradients"))?;
    // cuBLAS does not make the context current on the calling thread itself.
    gpu.context()
        .bind_to_thread()
        .context("binding the CUDA context for cuBLAS")?;
    let scale = (d as f32).sqrt().recip();
    let (row3, row1) = (t * 3 * c, t * c);
    for b0 in (0..b).step_by(chunk) {
        let nb = chunk.min(b - b0);
        for h in 0..heads {
            let (qo, ko, vo) = offsets(h, d, c, legacy);
            let at = |base: usize, off: usize| base * b0 + off;
            let gemm = |m, n, k, trans_a, trans_b, lda, ldb, ldc, sa, sb, sc, alpha| BatchedGemm {
                m,
                n,
                k,
                trans_a,
                trans_b,
                lda,
                ldb,
                ldc,
                batch: nb,
                stride_a: sa,
                stride_b: sb,
                stride_c: sc,
                alpha,
                beta: 0.0,
            };
            let q = qkv.slice(at(row3, qo)..);
            let k = qkv.slice(at(row3, ko)..);
            let v = qkv.slice(at(row3, vo)..);
            let da = dout.slice(at(row1, h * d)..);
            // W = softmax(Q K^T / sqrt(d))
            let s = gemm(t, t, d, false, true, 3 * c, 3 * c, t, row3, row3, tt, scale);
            sgemm_batched(blas, s, &q, &k, &mut w).context("attention logits")?;
            softmax_rows(gpu, &mut w, nb * t, t)?;
            // dV = W^T dA
            let s = gemm(t, d, t, true, false, t, c, 3 * c, tt, row1, row3, 1.0);
            sgemm_batched(blas, s, &w, &da, &mut dqkv.slice_mut(at(row3, vo)..))
                .context("attention dV")?;
            // dW = dA V^T, then dS = W (dW - rowsum(W dW)) in place
            let s = gemm(t, t, d, false, true, c, 3 * c, t, row1, row3, tt, 1.0);
            sgemm_batched(blas, s, &da, &v, &mut dw).context("attention dW")?;
            softmax_bwd_rows(gpu, &w, &mut dw, nb * t, t)?;
            // dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)
            let s = gemm(
                t,
                d,
                t,
                false,
                false,
                t,
                3 * c,
                3 * c,
                tt,
                row3,
                row3,
                scale,
            );
            sgemm_batched(blas, s, &dw, &k, &mut dqkv.slice_mut(at(row3, qo)..))
                .context("attention dQ")?;
            let s = gemm(t, d, t, true, false, t, 3 * c, 3 * c, tt, row3, row3, scale);
            sgemm_batched(blas, s, &dw, &q, &mut dqkv.slice_mut(at(row3, ko)..))
                .context("attention dK")?;
        }
    }
    Ok(())
}

fn rows_config(kernel: &str, len: usize, n_rows: usize, t: usize) -> Result<LaunchConfig> {
    ensure!(
        len >= n_rows * t && u32::try_from(n_rows).is_ok(),
        "{kernel}: {n_rows} rows of {t} in a workspace of {len}"
    );
    Ok(LaunchConfig {
        grid_dim: (n_rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `w[r, :] = softmax(w[r, :])` for `n_rows` rows of `t`.
fn softmax_rows(gpu: &Gpu, w: &mut CudaSlice<f32>, n_rows: usize, t: usize) -> Result<()> {
    let cfg = rows_config("softmax_rows", w.len(), n_rows, t)?;
    // SAFETY: block r touches row r < n_rows of t elements, inside w
    // (checked).
    unsafe { launch::softmax_rows(gpu, cfg, (w, t as u32)) }
}

/// `dw[r, :] = w (dw - sum(w dw))` for `n_rows` rows of `t`.
fn softmax_bwd_rows(
    gpu: &Gpu,
    w: &CudaSlice<f32>,
    dw: &mut CudaSlice<f32>,
    n_rows: usize,
    t: usize,
) -> Result<()> {
    let cfg = rows_config("softmax_bwd_rows", w.len().min(dw.len()), n_rows, t)?;
    // SAFETY: block r touches row r < n_rows of t elements of both, inside
    // them (checked).
    unsafe { launch::softmax_bwd_rows(gpu, cfg, (w, dw, t as u32)) }
}
