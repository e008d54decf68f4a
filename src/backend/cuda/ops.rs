//! Launchers for `kernels/ops.cu`: the elementwise and data-movement ops of
//! the Backend trait. CPU twins in `crate::backend::cpu`. Each launcher
//! checks that every buffer has the length its dimensions imply and lives on
//! the Gpu's stream, and writes every element of its output.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::Gpu;

const MODULE: &str = "ops";

/// Fails unless `buf` holds `len` elements on the Gpu's stream.
pub(super) fn expect_len<T>(
    gpu: &Gpu,
    op: &str,
    what: &str,
    buf: &CudaSlice<T>,
    len: usize,
) -> Result<()> {
    ensure!(
        buf.len() == len,
        "{op}: {what} has {} elements, expected {len}",
        buf.len()
    );
    gpu.check_stream(buf, &format!("{op}: {what}"))
}

/// Launches a prepared argument list.
///
/// # Safety
/// The arguments must match the kernel's parameters in number, order and
/// type, and every buffer must be large enough for the indices the kernel
/// reaches under `cfg`.
pub(super) unsafe fn launch(
    mut args: LaunchArgs<'_>,
    cfg: LaunchConfig,
    kernel: &str,
    n: usize,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { args.launch(cfg) }.with_context(|| format!("launching {kernel} on {n} elements"))?;
    Ok(())
}

/// `y[..] = v` (debug poisoning of fresh outputs).
pub fn fill(gpu: &Gpu, y: &mut CudaSlice<f32>, v: f32) -> Result<()> {
    let n = y.len();
    expect_len(gpu, "fill", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "fill")?;
    let n64 = n as u64;
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(y).arg(&v).arg(&n64);
    // SAFETY: (float*, float, u64) as declared; y holds n floats.
    unsafe { launch(args, gpu.elementwise_config(n), "fill", n) }
}

/// `y = x * sigmoid(x)`.
pub fn silu(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
    let n = x.len();
    expect_len(gpu, "silu", "x", x, n)?;
    expect_len(gpu, "silu", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "silu")?;
    let n64 = n as u64;
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(x).arg(y).arg(&n64);
    // SAFETY: (const float*, float*, u64); both buffers hold n floats.
    unsafe { launch(args, gpu.elementwise_config(n), "silu", n) }
}

/// `y = a + b`, all of one length.
pub fn add(
    gpu: &Gpu,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = a.len();
    expect_len(gpu, "add", "a", a, n)?;
    expect_len(gpu, "add", "b", b, n)?;
    expect_len(gpu, "add", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "add")?;
    let n64 = n as u64;
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(a).arg(b).arg(y).arg(&n64);
    // SAFETY: (const float*, const float*, float*, u64); all hold n floats.
    unsafe { launch(args, gpu.elementwise_config(n), "add", n) }
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
    expect_len(gpu, "add", "a", a, n)?;
    expect_len(gpu, "add", "broadcast operand", v, batch * c)?;
    expect_len(gpu, "add", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "add_bcast")?;
    let (n64, hwc, c64) = (n as u64, (hw * c) as u64, c as u64);
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(a).arg(v).arg(y).arg(&n64).arg(&hwc).arg(&c64);
    // SAFETY: (const float*, const float*, float*, u64 x3); a and y hold n
    // floats, v batch*c, and (i / (hw*c))*c + i % c < batch*c for i < n.
    unsafe { launch(args, gpu.elementwise_config(n), "add_bcast", n) }
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
    expect_len(gpu, "avg_pool2", "x", x, b * h * w * c)?;
    expect_len(gpu, "avg_pool2", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "avg_pool2")?;
    let dims = [b as u64, ho as u64, wo as u64, c as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(x).arg(y);
    for d in &dims {
        args.arg(d);
    }
    // SAFETY: (const float*, float*, u64 x4); y holds b*ho*wo*c floats and
    // x the 4x as many the taps of those outputs read.
    unsafe { launch(args, gpu.elementwise_config(n), "avg_pool2", n) }
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
    expect_len(gpu, op, "input", x, b * h * w * c)?;
    expect_len(gpu, op, "output", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "upsample2")?;
    let dims = [b as u64, h as u64, w as u64, c as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(x).arg(y);
    for d in &dims {
        args.arg(d);
    }
    args.arg(&scale);
    // SAFETY: (const float*, float*, u64 x4, float); y holds 4*b*h*w*c
    // floats and each reads the source pixel (yo/2, xo/2) inside x.
    unsafe { launch(args, gpu.elementwise_config(n), op, n) }
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
    expect_len(gpu, "concat", "a", a, pixels * ca)?;
    expect_len(gpu, "concat", "b", b, pixels * cb)?;
    expect_len(gpu, "concat", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "concat")?;
    let dims = [pixels as u64, ca as u64, cb as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(a)
        .arg(b)
        .arg(y)
        .arg(&dims[0])
        .arg(&dims[1])
        .arg(&dims[2]);
    // SAFETY: (const float*, const float*, float*, u64 x3); lengths checked
    // above for the pixel-major layout the kernel indexes.
    unsafe { launch(args, gpu.elementwise_config(n), "concat", n) }
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
    expect_len(gpu, "add_rows", "x", x, b * dim)?;
    expect_len(gpu, "add_rows", "table", table, k * dim)?;
    expect_len(gpu, "add_rows", "rows", rows, b)?;
    expect_len(gpu, "add_rows", "y", y, b * dim)?;
    let n = b * dim;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "add_rows")?;
    let dims = [b as u64, dim as u64, k as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(x)
        .arg(table)
        .arg(rows)
        .arg(y)
        .arg(&dims[0])
        .arg(&dims[1])
        .arg(&dims[2]);
    // SAFETY: (const float*, const float*, const unsigned*, float*, u64 x3);
    // the kernel reads table only at rows below k.
    unsafe { launch(args, gpu.elementwise_config(n), "add_rows", n) }
}

/// `y` `[b, 2 half]`: the sinusoidal embedding of timesteps `ts` `[b]`.
pub fn timestep_embedding(
    gpu: &Gpu,
    ts: &CudaSlice<u32>,
    y: &mut CudaSlice<f32>,
    half: usize,
) -> Result<()> {
    let b = ts.len();
    expect_len(gpu, "timestep_embedding", "ts", ts, b)?;
    expect_len(gpu, "timestep_embedding", "y", y, b * 2 * half)?;
    let n = b * 2 * half;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "timestep_embedding")?;
    let dims = [b as u64, half as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(ts).arg(y).arg(&dims[0]).arg(&dims[1]);
    // SAFETY: (const unsigned*, float*, u64 x2); ts holds b entries and y
    // b * 2 * half, checked above.
    unsafe { launch(args, gpu.elementwise_config(n), "timestep_embedding", n) }
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
    expect_len(gpu, "prepend_mean", "x", x, b * t * c)?;
    expect_len(gpu, "prepend_mean", "pos", pos, (t + 1) * c)?;
    expect_len(gpu, "prepend_mean", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "prepend_mean")?;
    let dims = [b as u64, t as u64, c as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(x)
        .arg(pos)
        .arg(y)
        .arg(&dims[0])
        .arg(&dims[1])
        .arg(&dims[2]);
    // SAFETY: (const float*, const float*, float*, u64 x3); lengths checked
    // above for the [b, t(+1), c] layouts the kernel indexes.
    unsafe { launch(args, gpu.elementwise_config(n), "prepend_mean", n) }
}

/// Gradient of `prepend_mean`: `dtok` `[b, t+1, c]` -> `dx` `[b, t, c]`.
pub fn prepend_mean_bwd(
    gpu: &Gpu,
    dtok: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    [b, t, c]: [usize; 3],
) -> Result<()> {
    let n = b * t * c;
    expect_len(gpu, "prepend_mean_bwd", "dtok", dtok, b * (t + 1) * c)?;
    expect_len(gpu, "prepend_mean_bwd", "dx", dx, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "prepend_mean_bwd")?;
    let dims = [b as u64, t as u64, c as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(dtok)
        .arg(dx)
        .arg(&dims[0])
        .arg(&dims[1])
        .arg(&dims[2]);
    // SAFETY: (const float*, float*, u64 x3); lengths checked above.
    unsafe { launch(args, gpu.elementwise_config(n), "prepend_mean_bwd", n) }
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
    expect_len(gpu, "token0", "x", x, b * t * c)?;
    expect_len(gpu, "token0", "y", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "token0")?;
    let dims = [b as u64, t as u64, c as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(x).arg(y).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]);
    // SAFETY: (const float*, float*, u64 x3); lengths checked above.
    unsafe { launch(args, gpu.elementwise_config(n), "token0", n) }
}

/// Gradient of `token0`: `d0` `[b, c]` -> `d` `[b, t, c]`.
pub fn token0_bwd(
    gpu: &Gpu,
    d0: &CudaSlice<f32>,
    d: &mut CudaSlice<f32>,
    [b, t, c]: [usize; 3],
) -> Result<()> {
    let n = b * t * c;
    expect_len(gpu, "token0_bwd", "d0", d0, b * c)?;
    expect_len(gpu, "token0_bwd", "d", d, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "token0_bwd")?;
    let dims = [b as u64, t as u64, c as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(d0)
        .arg(d)
        .arg(&dims[0])
        .arg(&dims[1])
        .arg(&dims[2]);
    // SAFETY: (const float*, float*, u64 x3); lengths checked above.
    unsafe { launch(args, gpu.elementwise_config(n), "token0_bwd", n) }
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
    expect_len(gpu, "log_softmax_grad", "logits", logits, b * k)?;
    expect_len(gpu, "log_softmax_grad", "labels", labels, b)?;
    expect_len(gpu, "log_softmax_grad", "g", g, b * k)?;
    if b * k == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "log_softmax_grad")?;
    let dims = [b as u64, k as u64];
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(logits)
        .arg(labels)
        .arg(g)
        .arg(&dims[0])
        .arg(&dims[1]);
    // SAFETY: (const float*, const unsigned*, float*, u64 x2); one thread
    // per row r < b touches r*k .. r*k+k only.
    unsafe { launch(args, gpu.elementwise_config(b), "log_softmax_grad", b) }
}

/// `x += s * g`, the product rounded first.
pub fn axpy(gpu: &Gpu, x: &mut CudaSlice<f32>, s: f32, g: &CudaSlice<f32>) -> Result<()> {
    let n = x.len();
    expect_len(gpu, "axpy", "x", x, n)?;
    expect_len(gpu, "axpy", "g", g, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "axpy")?;
    let n64 = n as u64;
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(x).arg(&s).arg(g).arg(&n64);
    // SAFETY: (float*, float, const float*, u64); both hold n floats.
    unsafe { launch(args, gpu.elementwise_config(n), "axpy", n) }
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
    expect_len(gpu, "axpby", "x", x, n)?;
    expect_len(gpu, "axpby", "y", y, n)?;
    expect_len(gpu, "axpby", "out", out, n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, "axpby")?;
    let n64 = n as u64;
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(&a).arg(x).arg(&b).arg(y).arg(out).arg(&n64);
    // SAFETY: (float, const float*, float, const float*, float*, u64); all
    // buffers hold n floats.
    unsafe { launch(args, gpu.elementwise_config(n), "axpby", n) }
}
