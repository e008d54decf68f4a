//! Launchers for `kernels/attention.cu`: multi-head attention on `qkv`
//! `[b, t, 3c]` giving `[b, t, c]`, and its input gradient computed with
//! recomputation (O(t) extra memory per row, no t x t matrix). CPU twins in
//! `crate::backend::cpu` (`attention.rs`).

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::Gpu;

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

/// Checked sizes of one attention call, in the kernels' integer types.
struct Dims {
    blocks: u32,
    b: u32,
    t: u32,
    c: u32,
    heads: u32,
    legacy: i32,
    /// d^(-1/4), computed as the CPU twin does.
    scale: f32,
}

#[allow(clippy::too_many_arguments)]
fn check(
    gpu: &Gpu,
    op: &str,
    qkv: &CudaSlice<f32>,
    out_len: usize,
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    legacy: bool,
    rows_of_shared: usize,
) -> Result<Option<Dims>> {
    ensure!(
        heads > 0 && c > 0 && c.is_multiple_of(heads),
        "{op}: {heads} heads do not divide {c} channels"
    );
    let n = b
        .checked_mul(t)
        .and_then(|v| v.checked_mul(3 * c))
        .with_context(|| format!("{op}: size {b} x {t} x 3*{c} overflows"))?;
    ensure!(
        qkv.len() == n,
        "{op}: qkv has {} elements, expected b * t * 3c = {b} * {t} * {} = {n}",
        qkv.len(),
        3 * c
    );
    ensure!(
        out_len == n / 3,
        "{op}: output / gradient has {out_len} elements, expected b * t * c = {}",
        n / 3
    );
    gpu.check_stream(qkv, "qkv")?;
    if n == 0 {
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
    let d = c / heads;
    Ok(Some(Dims {
        blocks,
        b: u32::try_from(b).context("batch size")?,
        t: u32::try_from(t).context("token count")?,
        // The kernels form channel offsets up to 3c in 32 bits.
        c: u32::try_from(c)
            .ok()
            .filter(|v| v.checked_mul(3).is_some())
            .with_context(|| format!("{op}: {c} channels"))?,
        heads: u32::try_from(heads).context("head count")?,
        legacy: i32::from(legacy),
        scale: (d as f32).sqrt().sqrt().recip(),
    }))
}

fn config(d: &Dims, rows_of_shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (d.blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared_bytes(rows_of_shared as usize, d.t as usize) as u32,
    }
}

/// `out[b, i, head h] = sum_j softmax_j((q_i s) . (k_j s)) v_j`; see
/// `Backend::attention`. `legacy`: per head q, k, v are consecutive; else
/// q, k, v are the thirds of the 3c channels.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    qkv: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    legacy: bool,
) -> Result<()> {
    let op = "attention";
    gpu.check_stream(out, "out")?;
    let Some(dims) = check(gpu, op, qkv, out.len(), b, t, c, heads, legacy, 1)? else {
        return Ok(());
    };
    let func = gpu.function("attention", "attn_fwd")?;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(qkv)
        .arg(out)
        .arg(&dims.b)
        .arg(&dims.t)
        .arg(&dims.c)
        .arg(&dims.heads)
        .arg(&dims.legacy)
        .arg(&dims.scale);
    // SAFETY: the arguments match attn_fwd(const float* qkv, float* out,
    // unsigned b, unsigned t, unsigned c, unsigned heads, int legacy, float
    // s); qkv holds b * t * 3c floats and out b * t * c, both on this Gpu's
    // stream; the grid is b * heads * t blocks of a multiple of 32 threads
    // with t floats of dynamic shared memory, as the kernel expects.
    unsafe { args.launch(config(&dims, 1)) }
        .with_context(|| format!("launching attn_fwd on {b} x {t} tokens x {c} ({heads} heads)"))?;
    Ok(())
}

/// Input gradient of `attention`: `dout` is `[b, t, c]`, `dqkv` `[b, t, 3c]`
/// (every element written).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    gpu: &Gpu,
    qkv: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    dqkv: &mut CudaSlice<f32>,
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    legacy: bool,
) -> Result<()> {
    let op = "attention_bwd";
    ensure!(
        dqkv.len() == qkv.len(),
        "{op}: dqkv has {} elements but qkv has {}",
        dqkv.len(),
        qkv.len()
    );
    gpu.check_stream(dout, "dout")?;
    gpu.check_stream(dqkv, "dqkv")?;
    let Some(dims) = check(gpu, op, qkv, dout.len(), b, t, c, heads, legacy, 2)? else {
        return Ok(());
    };
    // Per (batch, head, query row): max logit, 1 / sum of exponentials, and
    // D_i = sum_j W_ij (dA_i . v_j).
    let mut rowstats = gpu
        .stream()
        .alloc_zeros::<f32>(3 * dims.blocks as usize)
        .context("allocating attention row statistics")?;

    let func = gpu.function("attention", "attn_bwd_rows")?;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(qkv)
        .arg(dout)
        .arg(&mut *dqkv)
        .arg(&mut rowstats)
        .arg(&dims.b)
        .arg(&dims.t)
        .arg(&dims.c)
        .arg(&dims.heads)
        .arg(&dims.legacy)
        .arg(&dims.scale);
    // SAFETY: the arguments match attn_bwd_rows(const float* qkv, const
    // float* dout, float* dqkv, float* rowstats, unsigned b, unsigned t,
    // unsigned c, unsigned heads, int legacy, float s); qkv and dqkv hold
    // b * t * 3c floats, dout b * t * c, rowstats 3 * b * heads * t, all on
    // this Gpu's stream; the grid is b * heads * t blocks of a multiple of 32
    // threads with 2t floats of dynamic shared memory. Each block writes only
    // the q channels of its own (batch, token, head) and its rowstats triple.
    unsafe { args.launch(config(&dims, 2)) }.with_context(|| {
        format!("launching attn_bwd_rows on {b} x {t} tokens x {c} ({heads} heads)")
    })?;

    let func = gpu.function("attention", "attn_bwd_cols")?;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(qkv)
        .arg(dout)
        .arg(&rowstats)
        .arg(dqkv)
        .arg(&dims.b)
        .arg(&dims.t)
        .arg(&dims.c)
        .arg(&dims.heads)
        .arg(&dims.legacy)
        .arg(&dims.scale);
    // SAFETY: the arguments match attn_bwd_cols(const float* qkv, const
    // float* dout, const float* rowstats, float* dqkv, unsigned b, unsigned
    // t, unsigned c, unsigned heads, int legacy, float s); sizes as above;
    // stream order puts it after attn_bwd_rows, whose rowstats it reads.
    // Each block writes only the k and v channels of its own (batch, token,
    // head).
    unsafe { args.launch(config(&dims, 2)) }.with_context(|| {
        format!("launching attn_bwd_cols on {b} x {t} tokens x {c} ({heads} heads)")
    })?;
    Ok(())
}
