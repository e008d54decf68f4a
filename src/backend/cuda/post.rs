//! Launchers for `kernels/post.cu`: per-slice normalisation and anomaly maps
//! (SPEC sections 2 and 7). CPU twins in `crate::post`; the results are
//! bit-identical to them, and so are the errors.

use anyhow::{anyhow, ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::Gpu;

/// Threads per block (one block per slice); `POST_THREADS` in the kernel.
const THREADS: u32 = 512;

/// Words per slice in the normalisation status buffer.
const STATUS_WORDS: usize = 4;

/// `crate::post::normalize_batch` on `b` slices of `hw` pixels: each slice to
/// [-1, 1]. Fails like the CPU twin, naming the first constant or non-finite
/// slice (reading the per-slice status back synchronises the stream once).
pub fn normalize(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    b: usize,
    hw: usize,
) -> Result<()> {
    check_stack("normalize", "x", x.len(), b, hw)?;
    check_stack("normalize", "y", y.len(), b, hw)?;
    gpu.check_stream(x, "x")?;
    gpu.check_stream(y, "y")?;
    if b == 0 {
        return Ok(());
    }
    let mut status = gpu
        .stream()
        .alloc_zeros::<u32>(b * STATUS_WORDS)
        .context("allocating the normalisation status")?;
    let func = gpu.function("post", "post_normalize")?;
    let hw64 = hw as u64;
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(x).arg(&mut *y).arg(&mut status).arg(&hw64);
    // SAFETY: the arguments match post_normalize(const float*, float*,
    // unsigned*, unsigned long long); x and y hold b * hw floats and status
    // 4 * b words, all on this Gpu's stream; block i touches slice i and
    // status words 4i .. 4i + 3 only.
    unsafe { args.launch(slice_config(b)?) }
        .with_context(|| format!("launching post_normalize on {b} slices of {hw} pixels"))?;
    let status = gpu
        .stream()
        .clone_dtoh(&status)
        .context("reading the normalisation status back")?;
    gpu.synchronize()?;
    for (i, s) in status.chunks_exact(STATUS_WORDS).enumerate() {
        let value = f32::from_bits(s[1]);
        // The same messages as crate::post::normalize_slice, with its context.
        let err = match s[0] {
            0 => continue,
            1 => anyhow!("constant slice (min = max = {value}): cannot normalise"),
            2 => {
                let index = u64::from(s[2]) | (u64::from(s[3]) << 32);
                anyhow!("non-finite value at index {index} ({value}): cannot normalise")
            }
            code => anyhow!("post_normalize reported unknown status {code}"),
        };
        return Err(err.context(format!("slice {i}")));
    }
    Ok(())
}

/// `crate::post::anomaly_map_batch` on `b` slices of `hw` pixels: the anomaly
/// map of each FLAIR slice of `x0` against its pseudo-healthy slice of `xhat`,
/// histogram-matched first when `hist_match`.
pub fn anomaly(
    gpu: &Gpu,
    x0: &CudaSlice<f32>,
    xhat: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    b: usize,
    hw: usize,
    hist_match: bool,
) -> Result<()> {
    check_stack("anomaly", "x0", x0.len(), b, hw)?;
    check_stack("anomaly", "xhat", xhat.len(), b, hw)?;
    check_stack("anomaly", "out", out.len(), b, hw)?;
    gpu.check_stream(x0, "x0")?;
    gpu.check_stream(xhat, "xhat")?;
    gpu.check_stream(out, "out")?;
    if b == 0 {
        return Ok(());
    }
    let func = gpu.function("post", "post_anomaly")?;
    let hw64 = hw as u64;
    let flag = i32::from(hist_match);
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(x0).arg(xhat).arg(&mut *out).arg(&hw64).arg(&flag);
    // SAFETY: the arguments match post_anomaly(const float*, const float*,
    // float*, unsigned long long, int); the three buffers hold b * hw floats
    // on this Gpu's stream and block i touches slice i only.
    unsafe { args.launch(slice_config(b)?) }
        .with_context(|| format!("launching post_anomaly on {b} slices of {hw} pixels"))?;
    Ok(())
}

/// `len` must be `b` slices of `hw > 0` pixels.
fn check_stack(op: &str, what: &str, len: usize, b: usize, hw: usize) -> Result<()> {
    ensure!(hw > 0, "{op}: slices of 0 pixels");
    ensure!(
        b.checked_mul(hw) == Some(len),
        "{op}: {what} has {len} values, expected {b} slices of {hw} pixels"
    );
    Ok(())
}

fn slice_config(b: usize) -> Result<LaunchConfig> {
    let blocks =
        u32::try_from(b).with_context(|| format!("{b} slices are too many for one launch"))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}
