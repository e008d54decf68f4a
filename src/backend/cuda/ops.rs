//! Launchers for `kernels/ops.cu`: the elementwise and data-movement ops of
//! the Backend trait. CPU twins in `crate::backend::cpu_ref`. Each launcher
//! checks that every buffer has the length its dimensions imply, and writes
//! every element of its output.

use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;

use super::{launch, Gpu};

/// `y[..] = v` (debug poisoning of fresh outputs).
pub fn fill(gpu: &Gpu, y: &mut CudaSlice<f32>, v: f32) -> Result<()> {
    let n = y.len();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: y holds n floats.
    unsafe { launch::fill(gpu, gpu.elementwise_config(n), (y, v, n as u64)) }
}

/// `y = x * sigmoid(x)`.
pub fn silu(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
    let n = x.len();
    gpu.expect_len("silu", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: both buffers hold n floats.
    unsafe { launch::silu(gpu, gpu.elementwise_config(n), (x, y, n as u64)) }
}

/// `y = a + b`, all of one length.
pub fn add(
    gpu: &Gpu,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = a.len();
    gpu.expect_len("add", "b", b, n)?;
    gpu.expect_len("add", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: all three buffers hold n floats.
    unsafe { launch::add(gpu, gpu.elementwise_config(n), (a, b, y, n as u64)) }
}

/// `y = a + v` with `a` `[batch, hw, c]` and `v` `[batch, c]` broadcast over hw.
pub fn add_bcast(
    gpu: &Gpu,
    a: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    [batch, hw, c]: [usize; 3],
) -> Result<()> {
    let n = batch * hw * c;
    gpu.expect_len("add", "a", a, n)?;
    gpu.expect_len("add", "broadcast operand", v, batch * c)?;
    gpu.expect_len("add", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let p = (a, v, y, n as u64, (hw * c) as u64, c as u64);
    // SAFETY: a and y hold n floats, v batch*c, and (i / (hw*c))*c + i % c <
    // batch*c for i < n.
    unsafe { launch::add_bcast(gpu, gpu.elementwise_config(n), p) }
}

/// 2x2 mean pooling of `x` `[b, h, w, c]` (h, w even) into `y` `[b, h/2, w/2, c]`.
pub fn avg_pool2(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    [b, h, w, c]: [usize; 4],
) -> Result<()> {
    ensure!(
        h % 2 == 0 && w % 2 == 0,
        "avg_pool2: odd spatial size {h} x {w}"
    );
    let (ho, wo) = (h / 2, w / 2);
    let n = b * ho * wo * c;
    gpu.expect_len("avg_pool2", "x", x, b * h * w * c)?;
    gpu.expect_len("avg_pool2", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let [b, ho, wo, c] = [b, ho, wo, c].map(|v| v as u64);
    // SAFETY: y holds b*ho*wo*c floats and x the 4x as many the taps of
    // those outputs read.
    unsafe { launch::avg_pool2(gpu, gpu.elementwise_config(n), (x, y, b, ho, wo, c)) }
}

/// Nearest-neighbour upsampling `x` `[b, h, w, c]` -> `y` `[b, 2h, 2w, c]`.
pub fn upsample2(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    dims: [usize; 4],
) -> Result<()> {
    upsample2_scaled(gpu, "upsample2", x, y, dims, 1.0)
}

/// Gradient of `avg_pool2`: `dy` `[b, h, w, c]` -> `dx` `[b, 2h, 2w, c]`,
/// a quarter of dy at each of the four taps.
pub fn avg_pool2_bwd(
    gpu: &Gpu,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dims: [usize; 4],
) -> Result<()> {
    upsample2_scaled(gpu, "avg_pool2_bwd", dy, dx, dims, 0.25)
}

fn upsample2_scaled(
    gpu: &Gpu,
    op: &str,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    [b, h, w, c]: [usize; 4],
    scale: f32,
) -> Result<()> {
    let n = b * 4 * h * w * c;
    gpu.expect_len(op, "input", x, b * h * w * c)?;
    gpu.expect_len(op, "output", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let [b, h, w, c] = [b, h, w, c].map(|v| v as u64);
    // SAFETY: y holds 4*b*h*w*c floats and each reads the source pixel
    // (yo/2, xo/2) inside x.
    unsafe { launch::upsample2(gpu, gpu.elementwise_config(n), (x, y, b, h, w, c, scale)) }
}

/// Channel concatenation of `a` `[pixels, ca]` and `b` `[pixels, cb]`.
pub fn concat(
    gpu: &Gpu,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    [pixels, ca, cb]: [usize; 3],
) -> Result<()> {
    let n = pixels * (ca + cb);
    gpu.expect_len("concat", "a", a, pixels * ca)?;
    gpu.expect_len("concat", "b", b, pixels * cb)?;
    gpu.expect_len("concat", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let [pixels, ca, cb] = [pixels, ca, cb].map(|v| v as u64);
    // SAFETY: lengths checked above for the pixel-major layout the kernel
    // indexes.
    unsafe { launch::concat(gpu, gpu.elementwise_config(n), (a, b, y, pixels, ca, cb)) }
}

/// `y[i] = x[i] + table[rows[i]]` for `x` `[b, dim]`, `table` `[k, dim]`;
/// `rows` must already be checked against k (an unchecked one gives NaN).
pub fn add_rows(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    table: &CudaSlice<f32>,
    rows: &CudaSlice<u32>,
    y: &mut CudaSlice<f32>,
    dim: usize,
) -> Result<()> {
    ensure!(dim > 0, "add_rows: zero-width rows");
    let b = rows.len();
    let k = table.len() / dim;
    gpu.expect_len("add_rows", "x", x, b * dim)?;
    gpu.expect_len("add_rows", "table", table, k * dim)?;
    gpu.expect_len("add_rows", "y", y, b * dim)?;
    let n = b * dim;
    if n == 0 {
        return Ok(());
    }
    let p = (x, table, rows, y, b as u64, dim as u64, k as u64);
    // SAFETY: the kernel reads table only at rows below k.
    unsafe { launch::add_rows(gpu, gpu.elementwise_config(n), p) }
}

/// `y` `[b, 2 half]`: the sinusoidal embedding of timesteps `ts` `[b]`.
pub fn timestep_embedding(
    gpu: &Gpu,
    ts: &CudaSlice<u32>,
    y: &mut CudaSlice<f32>,
    half: usize,
) -> Result<()> {
    let b = ts.len();
    let n = b * 2 * half;
    gpu.expect_len("timestep_embedding", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let p = (ts, y, b as u64, half as u64);
    // SAFETY: ts holds b entries and y b * 2 * half.
    unsafe { launch::timestep_embedding(gpu, gpu.elementwise_config(n), p) }
}

/// `x` `[b, t, c]` -> `y` `[b, t+1, c]`: the token mean first, plus `pos` `[t+1, c]`.
pub fn prepend_mean(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    pos: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    [b, t, c]: [usize; 3],
) -> Result<()> {
    let n = b * (t + 1) * c;
    gpu.expect_len("prepend_mean", "x", x, b * t * c)?;
    gpu.expect_len("prepend_mean", "pos", pos, (t + 1) * c)?;
    gpu.expect_len("prepend_mean", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let [b, t, c] = [b, t, c].map(|v| v as u64);
    // SAFETY: lengths checked above for the [b, t(+1), c] layouts the kernel
    // indexes.
    unsafe { launch::prepend_mean(gpu, gpu.elementwise_config(n), (x, pos, y, b, t, c)) }
}

/// Gradient of `prepend_mean`: `dtok` `[b, t+1, c]` -> `dx` `[b, t, c]`.
pub fn prepend_mean_bwd(
    gpu: &Gpu,
    dtok: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    [b, t, c]: [usize; 3],
) -> Result<()> {
    let n = b * t * c;
    gpu.expect_len("prepend_mean_bwd", "dtok", dtok, b * (t + 1) * c)?;
    gpu.expect_len("prepend_mean_bwd", "dx", dx, n)?;
    if n == 0 {
        return Ok(());
    }
    let [b, t, c] = [b, t, c].map(|v| v as u64);
    // SAFETY: lengths checked above.
    unsafe { launch::prepend_mean_bwd(gpu, gpu.elementwise_config(n), (dtok, dx, b, t, c)) }
}

/// `x` `[b, t, c]` -> `y` `[b, c]`, token 0.
pub fn token0(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    [b, t, c]: [usize; 3],
) -> Result<()> {
    ensure!(t > 0, "token0: a sequence of no tokens");
    let n = b * c;
    gpu.expect_len("token0", "x", x, b * t * c)?;
    gpu.expect_len("token0", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let [b, t, c] = [b, t, c].map(|v| v as u64);
    // SAFETY: lengths checked above.
    unsafe { launch::token0(gpu, gpu.elementwise_config(n), (x, y, b, t, c)) }
}

/// Gradient of `token0`: `d0` `[b, c]` -> `d` `[b, t, c]`.
pub fn token0_bwd(
    gpu: &Gpu,
    d0: &CudaSlice<f32>,
    d: &mut CudaSlice<f32>,
    [b, t, c]: [usize; 3],
) -> Result<()> {
    let n = b * t * c;
    gpu.expect_len("token0_bwd", "d0", d0, b * c)?;
    gpu.expect_len("token0_bwd", "d", d, n)?;
    if n == 0 {
        return Ok(());
    }
    let [b, t, c] = [b, t, c].map(|v| v as u64);
    // SAFETY: lengths checked above.
    unsafe { launch::token0_bwd(gpu, gpu.elementwise_config(n), (d0, d, b, t, c)) }
}

/// `g = onehot(labels) - softmax(logits)` per row of `k`; `labels` must
/// already be checked against k (an unchecked one gives a NaN row).
pub fn log_softmax_grad(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    labels: &CudaSlice<u32>,
    g: &mut CudaSlice<f32>,
    k: usize,
) -> Result<()> {
    let b = labels.len();
    gpu.expect_len("log_softmax_grad", "logits", logits, b * k)?;
    gpu.expect_len("log_softmax_grad", "g", g, b * k)?;
    if b * k == 0 {
        return Ok(());
    }
    let p = (logits, labels, g, b as u64, k as u64);
    // SAFETY: one thread per row r < b touches r*k .. r*k+k only.
    unsafe { launch::log_softmax_grad(gpu, gpu.elementwise_config(b), p) }
}

/// `x += s * g`, the product rounded first.
pub fn axpy(gpu: &Gpu, x: &mut CudaSlice<f32>, s: f32, g: &CudaSlice<f32>) -> Result<()> {
    let n = x.len();
    gpu.expect_len("axpy", "g", g, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: both buffers hold n floats.
    unsafe { launch::axpy(gpu, gpu.elementwise_config(n), (x, s, g, n as u64)) }
}

/// `flag[0] = stage` if it is still 0 and `x` holds a non-finite value; CPU twin
/// `CpuRef::flag_non_finite`.
pub fn flag_non_finite(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    flag: &mut CudaSlice<f32>,
    stage: f32,
) -> Result<()> {
    gpu.expect_len("flag_non_finite", "flag", flag, 1)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: x holds n floats and flag one; only flag[0] is written.
    unsafe { launch::flag_non_finite(gpu, gpu.elementwise_config(n), (x, flag, stage, n as u64)) }
}

/// `out = a * x + b * y`, each product rounded before the sum.
pub fn axpby(
    gpu: &Gpu,
    a: f32,
    x: &CudaSlice<f32>,
    b: f32,
    y: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = x.len();
    gpu.expect_len("axpby", "y", y, n)?;
    gpu.expect_len("axpby", "out", out, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: all three buffers hold n floats.
    unsafe { launch::axpby(gpu, gpu.elementwise_config(n), (a, x, b, y, out, n as u64)) }
}
