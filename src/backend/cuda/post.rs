//! Launchers for `kernels/post.cu`: per-slice normalisation and anomaly maps
//! (SPEC sections 2 and 7). CPU twins in `crate::post`; the results are
//! bit-identical to them, and so are the errors.

use anyhow::{anyhow, ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{launch, Gpu};

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
    let n = stack_len("normalize", b, hw)?;
    gpu.expect_len("normalize", "x", x, n)?;
    gpu.expect_len("normalize", "y", y, n)?;
    if b == 0 {
        return Ok(());
    }
    let mut status = gpu
        .stream()
        .alloc_zeros::<u32>(b * STATUS_WORDS)
        .context("allocating the normalisation status")?;
    // SAFETY: x and y hold b * hw floats and status 4 * b words; block i
    // touches slice i and status words 4i .. 4i + 3 only.
    unsafe { launch::post_normalize(gpu, slice_config(b)?, (x, y, &mut status, hw as u64)) }?;
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
/// histogram-matched first when `hist_match`, into `out`, and the difference
/// it normalises into `diff`.
pub fn anomaly(
    gpu: &Gpu,
    x0: &CudaSlice<f32>,
    xhat: &CudaSlice<f32>,
    (out, diff): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
    b: usize,
    hw: usize,
    hist_match: bool,
) -> Result<()> {
    let n = stack_len("anomaly", b, hw)?;
    gpu.expect_len("anomaly", "x0", x0, n)?;
    gpu.expect_len("anomaly", "xhat", xhat, n)?;
    gpu.expect_len("anomaly", "out", out, n)?;
    gpu.expect_len("anomaly", "diff", diff, n)?;
    if b == 0 {
        return Ok(());
    }
    let p = (x0, xhat, out, diff, hw as u64, i32::from(hist_match));
    // SAFETY: the four buffers hold b * hw floats and block i touches slice
    // i only.
    unsafe { launch::post_anomaly(gpu, slice_config(b)?, p) }
}

/// The length of `b` slices of `hw > 0` pixels.
fn stack_len(op: &str, b: usize, hw: usize) -> Result<usize> {
    ensure!(hw > 0, "{op}: slices of 0 pixels");
    b.checked_mul(hw)
        .with_context(|| format!("{op}: {b} slices of {hw} pixels overflow"))
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
