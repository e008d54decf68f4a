//! Launchers for `kernels/lab/attention.cu`: multi-head attention on `qkv`
//! `[b, t, 3c]` giving `[b, t, c]`, and its input gradient computed with
//! recomputation (O(t) extra memory per row, no t x t matrix). CPU twins in
//! `crate::backend::cpu_ref` (`attention.rs`).

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use crate::backend::cuda::attention::AttnDims;
use crate::backend::cuda::launch::lab as launch;
use crate::backend::cuda::Gpu;

/// Threads per block: a multiple of 32 (the kernels work a warp per key or
/// query and reduce with full-warp shuffles).
const THREADS: u32 = 128;
/// Dynamic shared memory a block may ask for: the 48 KiB available without
/// opting in to more, less room for the kernels' static reduction scratch.
const MAX_SHARED_BYTES: usize = 47 * 1024;

/// Floats of padding after the per-row vectors: ptxas merges the unrolled
/// loop's remainder reads of shared memory into one wide load that can run
/// up to three floats past the last element (memcheck reports it), so the
/// allocation leaves room for it.
const SHARED_PAD: usize = 4;

fn shared_bytes(rows_of_shared: usize, t: usize) -> usize {
    (rows_of_shared * t + SHARED_PAD) * 4
}

/// Checked sizes of one launch, in the kernels' integer types.
struct Kernel {
    blocks: u32,
    b: u32,
    t: u32,
    c: u32,
    heads: u32,
    legacy: i32,
    /// d^(-1/4), computed as the CPU twin does.
    scale: f32,
}

/// Checks one call, `out` being the output or its gradient; None when
/// there is nothing to compute.
fn check(
    gpu: &Gpu,
    op: &str,
    dims: AttnDims,
    qkv: &CudaSlice<f32>,
    out: (&str, &CudaSlice<f32>),
    rows_of_shared: usize,
) -> Result<Option<Kernel>> {
    let d = dims.head_dim(op)?;
    dims.expect_lens(gpu, op, qkv, out)?;
    let AttnDims { b, t, c, heads, .. } = dims;
    if b * t == 0 {
        return Ok(None);
    }
    ensure!(
        shared_bytes(rows_of_shared, t) <= MAX_SHARED_BYTES,
        "{op}: {t} tokens need {} bytes of shared memory per block, more than {MAX_SHARED_BYTES}",
        shared_bytes(rows_of_shared, t)
    );
    let blocks = b
        .checked_mul(heads)
        .and_then(|v| v.checked_mul(t))
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v < i32::MAX as u32)
        .with_context(|| format!("{op}: {b} x {heads} heads x {t} tokens is too many blocks"))?;
    Ok(Some(Kernel {
        blocks,
        b: u32::try_from(b).context("batch size")?,
        t: u32::try_from(t).context("token count")?,
        // The kernels form channel offsets up to 3c in 32 bits.
        c: u32::try_from(c)
            .ok()
            .filter(|v| v.checked_mul(3).is_some())
            .with_context(|| format!("{op}: {c} channels"))?,
        heads: u32::try_from(heads).context("head count")?,
        legacy: i32::from(dims.legacy),
        scale: (d as f32).sqrt().sqrt().recip(),
    }))
}

fn config(k: &Kernel, rows_of_shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (k.blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared_bytes(rows_of_shared as usize, k.t as usize) as u32,
    }
}

/// `out[b, i, head h] = sum_j softmax_j((q_i s) . (k_j s)) v_j`; see
/// `Backend::attention`.
pub fn attention(
    gpu: &Gpu,
    qkv: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    dims: AttnDims,
) -> Result<()> {
    let op = "attention";
    let Some(k) = check(gpu, op, dims, qkv, ("out", out), 1)? else {
        return Ok(());
    };
    let p = (qkv, out, k.b, k.t, k.c, k.heads, k.legacy, k.scale);
    // SAFETY: qkv holds b * t * 3c floats and out b * t * c; the grid is
    // b * heads * t blocks of a multiple of 32 threads with t floats of
    // dynamic shared memory, as the kernel expects.
    unsafe { launch::attn_fwd(gpu, config(&k, 1), p) }
}

/// Input gradient of `attention`: `dout` is `[b, t, c]`, `dqkv` `[b, t, 3c]`
/// (every element written).
pub fn attention_bwd(
    gpu: &Gpu,
    qkv: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    dqkv: &mut CudaSlice<f32>,
    dims: AttnDims,
) -> Result<()> {
    let op = "attention_bwd";
    gpu.expect_len(op, "dqkv", dqkv, qkv.len())?;
    let Some(k) = check(gpu, op, dims, qkv, ("dout", dout), 2)? else {
        return Ok(());
    };
    // Per (batch, head, query row): max logit, 1 / sum of exponentials, and
    // D_i = sum_j W_ij (dA_i . v_j).
    let mut rowstats = gpu
        .stream()
        .alloc_zeros::<f32>(3 * k.blocks as usize)
        .context("allocating attention row statistics")?;
    let (b, t, c, heads, legacy, s) = (k.b, k.t, k.c, k.heads, k.legacy, k.scale);
    let p = (
        qkv,
        dout,
        &mut *dqkv,
        &mut rowstats,
        b,
        t,
        c,
        heads,
        legacy,
        s,
    );
    // SAFETY: qkv and dqkv hold b * t * 3c floats, dout b * t * c, rowstats
    // 3 * b * heads * t; the grid is b * heads * t blocks of a multiple of
    // 32 threads with 2t floats of dynamic shared memory. Each block writes
    // only the q channels of its own (batch, token, head) and its rowstats
    // triple.
    unsafe { launch::attn_bwd_rows(gpu, config(&k, 2), p) }?;
    let p = (qkv, dout, &rowstats, dqkv, b, t, c, heads, legacy, s);
    // SAFETY: sizes as above; stream order puts it after attn_bwd_rows,
    // whose rowstats it reads. Each block writes only the k and v channels
    // of its own (batch, token, head).
    unsafe { launch::attn_bwd_cols(gpu, config(&k, 2), p) }
}
