//! 'Same' convolutions (stride 1, k = 1 or 3) in NHWC as GEMMs, the layout
//! of the CPU twin `crate::backend::cpu_ref::CpuConv` / `conv_nhwc`: a k = 1
//! convolution is one GEMM of the pixels `[P, cin]` with the `[cin, cout]`
//! weights; a k = 3 one first gathers each pixel's 3x3 neighbourhood into
//! an im2col matrix `[P, 9 cin]` (kernels/lab/conv.cu), in chunks of pixels so
//! that the workspace stays bounded.

use anyhow::{ensure, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;

use crate::backend::cuda::gemm::sgemm;
use crate::backend::cuda::launch::lab as launch;
use crate::backend::cuda::Gpu;
use crate::backend::shapes::{ConvDims, GemmShape};

/// Bound on the im2col workspace of one convolution.
pub const WORKSPACE_BYTES: usize = 256 << 20;

impl ConvDims {
    /// Pixels per GEMM: as many as fit the workspace (k = 3), or all of
    /// them (k = 1, which reads x in place); never past cuBLAS's 32-bit
    /// dimensions.
    pub fn default_chunk(&self) -> usize {
        let row = self.k * self.k * self.cin;
        let cap = i32::MAX as usize / row.max(self.cout).max(1);
        let chunk = if self.k == 1 {
            self.pixels()
        } else {
            WORKSPACE_BYTES / (row.max(1) * std::mem::size_of::<f32>())
        };
        chunk.min(cap).max(1)
    }
}

/// A convolution's float32 weights: the `(k*k*cin) x cout` matrix of
/// `crate::backend::cpu_ref::CpuConv`, and the bias (none: zero).
#[derive(Clone, Copy)]
pub struct ConvWeights<'a> {
    pub wmat: &'a CudaSlice<f32>,
    pub bias: Option<&'a CudaSlice<f32>>,
}

/// `y = conv(x, wmat) (+ bias)`, every element of `y` written.
pub fn conv(
    gpu: &Gpu,
    blas: &CudaBlas,
    x: &CudaSlice<f32>,
    wt: ConvWeights<'_>,
    d: ConvDims,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    conv_with_chunk(gpu, blas, x, wt, d, y, d.default_chunk())
}

/// `conv` with at most `chunk_pixels` pixels per GEMM (tests force small
/// chunks to exercise the multi-chunk path on small images).
pub fn conv_with_chunk(
    gpu: &Gpu,
    blas: &CudaBlas,
    x: &CudaSlice<f32>,
    ConvWeights { wmat, bias }: ConvWeights<'_>,
    d: ConvDims,
    y: &mut CudaSlice<f32>,
    chunk_pixels: usize,
) -> Result<()> {
    ensure!(
        d.k == 1 || d.k == 3,
        "conv: kernel size {} (only 1 and 3 are supported)",
        d.k
    );
    ensure!(chunk_pixels > 0, "conv: a chunk of zero pixels");
    let p = d.pixels();
    let row = d.k * d.k * d.cin;
    gpu.expect_len("conv", "input", x, p * d.cin)?;
    gpu.expect_len("conv", "weights", wmat, row * d.cout)?;
    gpu.expect_len("conv", "output", y, p * d.cout)?;
    if let Some(bias) = bias {
        gpu.expect_len("conv", "bias", bias, d.cout)?;
    }
    if p * d.cout == 0 {
        return Ok(());
    }
    match bias {
        Some(bias) => broadcast_rows(gpu, y, bias, p, d.cout)?,
        // No inputs: the output is the (absent) bias alone.
        None if row == 0 => crate::backend::cuda::ops::fill(gpu, y, 0.0)?,
        None => {}
    }
    if row == 0 {
        return Ok(());
    }
    // cuBLAS, unlike cudarc's launches, does not make the context current
    // on the calling thread itself.
    gpu.context()
        .bind_to_thread()
        .context("binding the CUDA context for cuBLAS")?;
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    let chunk = chunk_pixels.min(p);
    let mut cols = if d.k == 1 {
        None
    } else {
        let len = chunk * row;
        // SAFETY: im2col writes each of the np * row elements a GEMM reads
        // before that GEMM runs (stream order).
        let ws = unsafe { gpu.stream().alloc::<f32>(len) }.with_context(|| {
            format!(
                "conv {d:?}: allocating an im2col workspace of {len} floats ({} MiB)",
                (len * 4) >> 20
            )
        })?;
        Some(ws)
    };
    let mut p0 = 0;
    while p0 < p {
        let np = chunk.min(p - p0);
        let shape = GemmShape {
            m: np,
            n: d.cout,
            k: row,
            lda: row,
            ldb: d.cout,
            ldc: d.cout,
        };
        let mut out = y.slice_mut(p0 * d.cout..(p0 + np) * d.cout);
        match cols.as_mut() {
            None => {
                let a = x.slice(p0 * d.cin..(p0 + np) * d.cin);
                sgemm(blas, shape, &a, wmat, beta, &mut out)
            }
            Some(ws) => {
                im2col(gpu, x, ws, d, p0, np)?;
                sgemm(blas, shape, ws, wmat, beta, &mut out)
            }
        }
        .with_context(|| format!("conv {d:?}, pixels {p0}..{}", p0 + np))?;
        p0 += np;
    }
    Ok(())
}

/// `ws[i, ..] = neighbourhood of pixel p0 + i`, for i < np.
fn im2col(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    ws: &mut CudaSlice<f32>,
    d: ConvDims,
    p0: usize,
    np: usize,
) -> Result<()> {
    let row = d.k * d.k * d.cin;
    let n = np * row;
    ensure!(
        ws.len() >= n && p0 + np <= d.pixels(),
        "im2col: pixels {p0}..{} of {} into a workspace of {} floats",
        p0 + np,
        d.pixels(),
        ws.len()
    );
    let p = [p0, np, d.h, d.w, d.cin, d.k].map(|v| v as u64);
    let p = (x, ws, p[0], p[1], p[2], p[3], p[4], p[5]);
    // SAFETY: the kernel writes the first np*row elements of ws (checked
    // above) and reads x only at in-image pixels of batch items below b
    // (p0 + np <= b*h*w; x length checked by the caller).
    unsafe { launch::im2col(gpu, gpu.elementwise_config(n), p) }
}

/// `y[r, ..] = bias` for each of `rows` rows of `c` (lengths checked by
/// the caller).
fn broadcast_rows(
    gpu: &Gpu,
    y: &mut CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rows: usize,
    c: usize,
) -> Result<()> {
    let n = rows * c;
    // SAFETY: y holds rows*c floats and bias c.
    unsafe {
        launch::broadcast_rows(
            gpu,
            gpu.elementwise_config(n),
            (y, bias, rows as u64, c as u64),
        )
    }
}
