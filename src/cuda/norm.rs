//! Launchers for `kernels/groupnorm.cu`: GroupNorm (32 groups, eps 1e-5)
//! with optional scale/shift and SiLU on NHWC `[b, hw, c]`, and its input
//! gradient. CPU twins in `crate::backend::cpu` (`norm.rs`).

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::Gpu;

const GROUPS: usize = 32;
/// Threads of the per-(sample, group) reduction blocks; a multiple of 32,
/// which the kernels' warp reductions rely on.
const REDUCE_THREADS: u32 = 256;

/// Checked sizes of one GroupNorm call, in the kernels' integer types.
struct Dims {
    blocks: u32,
    b: u32,
    hw: u64,
    c: u32,
    n: usize,
}

#[allow(clippy::too_many_arguments)]
fn check(
    gpu: &Gpu,
    op: &str,
    x: &CudaSlice<f32>,
    b: usize,
    hw: usize,
    c: usize,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    ss: Option<&CudaSlice<f32>>,
) -> Result<Dims> {
    ensure!(
        c > 0 && c.is_multiple_of(GROUPS),
        "{op}: {c} channels are not a positive multiple of {GROUPS}"
    );
    let n = b
        .checked_mul(hw)
        .and_then(|v| v.checked_mul(c))
        .with_context(|| format!("{op}: size {b} x {hw} x {c} overflows"))?;
    ensure!(
        x.len() == n,
        "{op}: x has {} elements, expected b * hw * c = {b} * {hw} * {c} = {n}",
        x.len()
    );
    ensure!(
        gamma.len() == c && beta.len() == c,
        "{op}: gamma / beta have {} / {} elements for {c} channels",
        gamma.len(),
        beta.len()
    );
    gpu.check_stream(x, "x")?;
    gpu.check_stream(gamma, "gamma")?;
    gpu.check_stream(beta, "beta")?;
    if let Some(ss) = ss {
        ensure!(
            ss.len() == 2 * b * c,
            "{op}: scale/shift has {} elements, expected [b, 2c] = {}",
            ss.len(),
            2 * b * c
        );
        gpu.check_stream(ss, "ss")?;
    }
    let blocks = b
        .checked_mul(GROUPS)
        .and_then(|v| u32::try_from(v).ok())
        .with_context(|| format!("{op}: batch {b} too large"))?;
    Ok(Dims {
        blocks,
        b: u32::try_from(b).context("batch size")?,
        hw: hw as u64,
        c: u32::try_from(c).with_context(|| format!("{op}: {c} channels"))?,
        n,
    })
}

fn reduce_config(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Per (sample, group) mean and 1/sigma, as `b * 32` (mean, inv) pairs.
fn stats(gpu: &Gpu, x: &CudaSlice<f32>, dims: &Dims) -> Result<CudaSlice<f64>> {
    let mut stats = gpu
        .stream()
        .alloc_zeros::<f64>(2 * dims.blocks as usize)
        .context("allocating GroupNorm statistics")?;
    let func = gpu.function("groupnorm", "gn_stats")?;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(x)
        .arg(&mut stats)
        .arg(&dims.b)
        .arg(&dims.hw)
        .arg(&dims.c);
    // SAFETY: the arguments match gn_stats(const float*, double*, unsigned,
    // unsigned long long, unsigned); x holds b * hw * c floats and stats
    // 2 * b * 32 doubles, all on this Gpu's stream; block blk < b * 32 reads
    // sample blk / 32 only and writes stats[2 blk ..= 2 blk + 1].
    unsafe { args.launch(reduce_config(dims.blocks)) }
        .with_context(|| format!("launching gn_stats on {} groups", dims.blocks))?;
    Ok(stats)
}

/// `y = silu?((GN(x) * gamma + beta) * (1 + scale) + shift)`; see
/// `Backend::group_norm`. `ss` is `[b, 2c]`, scale first.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    b: usize,
    hw: usize,
    c: usize,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    ss: Option<&CudaSlice<f32>>,
    silu: bool,
) -> Result<()> {
    let dims = check(gpu, "group_norm", x, b, hw, c, gamma, beta, ss)?;
    ensure!(
        y.len() == dims.n,
        "group_norm: y has {} elements but x has {}",
        y.len(),
        dims.n
    );
    gpu.check_stream(y, "y")?;
    if dims.n == 0 {
        return Ok(());
    }
    let stats = stats(gpu, x, &dims)?;
    let func = gpu.function("groupnorm", "gn_apply")?;
    // Without a scale/shift the kernel never reads `ss`; gamma stands in so
    // that the argument is a valid device pointer.
    let ss_buf = ss.unwrap_or(gamma);
    let has_ss = i32::from(ss.is_some());
    let silu = i32::from(silu);
    let n = dims.n as u64;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(x)
        .arg(y)
        .arg(&stats)
        .arg(gamma)
        .arg(beta)
        .arg(ss_buf)
        .arg(&has_ss)
        .arg(&silu)
        .arg(&dims.hw)
        .arg(&dims.c)
        .arg(&n);
    // SAFETY: the arguments match gn_apply(const float* x, float* y, const
    // double* stats, const float* gamma, const float* beta, const float* ss,
    // int, int, unsigned long long hw, unsigned c, unsigned long long n);
    // x and y hold n = b * hw * c floats, stats 2 * b * 32 doubles, gamma
    // and beta c floats, ss 2 * b * c floats when has_ss (else unread), all
    // on this Gpu's stream; the kernel touches indices below those bounds.
    unsafe { args.launch(gpu.elementwise_config(dims.n)) }
        .with_context(|| format!("launching gn_apply on {b} x {hw} x {c}"))?;
    Ok(())
}

/// Input gradient of `group_norm` (same arguments; `dy` and `dx` are
/// `[b, hw, c]`).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_bwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    b: usize,
    hw: usize,
    c: usize,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    ss: Option<&CudaSlice<f32>>,
    silu: bool,
) -> Result<()> {
    let dims = check(gpu, "group_norm_bwd", x, b, hw, c, gamma, beta, ss)?;
    ensure!(
        dy.len() == dims.n && dx.len() == dims.n,
        "group_norm_bwd: dy / dx have {} / {} elements but x has {}",
        dy.len(),
        dx.len(),
        dims.n
    );
    gpu.check_stream(dy, "dy")?;
    gpu.check_stream(dx, "dx")?;
    if dims.n == 0 {
        return Ok(());
    }
    let stats = stats(gpu, x, &dims)?;
    let mut sums = gpu
        .stream()
        .alloc_zeros::<f64>(2 * dims.blocks as usize)
        .context("allocating GroupNorm gradient sums")?;
    let ss_buf = ss.unwrap_or(gamma);
    let has_ss = i32::from(ss.is_some());
    let silu = i32::from(silu);

    let func = gpu.function("groupnorm", "gn_bwd_sums")?;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(x)
        .arg(dy)
        .arg(&stats)
        .arg(gamma)
        .arg(beta)
        .arg(ss_buf)
        .arg(&has_ss)
        .arg(&silu)
        .arg(&mut sums)
        .arg(&dims.b)
        .arg(&dims.hw)
        .arg(&dims.c);
    // SAFETY: the arguments match gn_bwd_sums(const float* x, const float*
    // dy, const double* stats, const float* gamma, const float* beta, const
    // float* ss, int, int, double* sums, unsigned b, unsigned long long hw,
    // unsigned c); sizes as in group_norm plus sums of 2 * b * 32 doubles,
    // all on this Gpu's stream; block blk writes sums[2 blk ..= 2 blk + 1].
    unsafe { args.launch(reduce_config(dims.blocks)) }
        .with_context(|| format!("launching gn_bwd_sums on {} groups", dims.blocks))?;

    let func = gpu.function("groupnorm", "gn_bwd_apply")?;
    let n = dims.n as u64;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(x)
        .arg(dy)
        .arg(dx)
        .arg(&stats)
        .arg(&sums)
        .arg(gamma)
        .arg(beta)
        .arg(ss_buf)
        .arg(&has_ss)
        .arg(&silu)
        .arg(&dims.hw)
        .arg(&dims.c)
        .arg(&n);
    // SAFETY: the arguments match gn_bwd_apply(const float* x, const float*
    // dy, float* dx, const double* stats, const double* sums, const float*
    // gamma, const float* beta, const float* ss, int, int, unsigned long long
    // hw, unsigned c, unsigned long long count); x, dy and dx hold count =
    // b * hw * c floats, the rest as above, all on this Gpu's stream.
    unsafe { args.launch(gpu.elementwise_config(dims.n)) }
        .with_context(|| format!("launching gn_bwd_apply on {b} x {hw} x {c}"))?;
    Ok(())
}
