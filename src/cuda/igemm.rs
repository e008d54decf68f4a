//! Launchers for `kernels/igemm.cu`: the tensor-core implicit-GEMM 'same'
//! convolution of the bf16 / fp16 modes, with GroupNorm apply, SiLU and 2x
//! resampling fused into its operand load and bias, per-sample bias and
//! residual into its store. CPU twin: `crate::backend::compose_conv_fused`.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::ops::{expect_len, launch};
use super::Gpu;
use crate::backend::Resample;
use crate::precision::Half;

/// The kernels' K tile: packed weight rows are padded to a multiple of it.
const BK: usize = 32;
/// The kernels' M and N tiles and block size.
const BM: usize = 128;
const BN: usize = 128;
const THREADS: u32 = 256;

/// Convolution weights rounded to a 16-bit type, `[cout][kp]` with the
/// `k*k*cin` products of one output channel contiguous and zero-padded to `kp`.
#[derive(Debug)]
pub struct PackedWeights {
    pub half: Half,
    pub kp: usize,
    pub cout: usize,
    pub w: CudaSlice<u16>,
}

/// Repacks the float32 `(kk x cout)` matrix of `crate::backend::cpu::CpuConv`.
pub fn pack_weights(
    gpu: &Gpu,
    half: Half,
    w: &CudaSlice<f32>,
    kk: usize,
    cout: usize,
) -> Result<PackedWeights> {
    expect_len(gpu, "pack_weights", "weights", w, kk * cout)?;
    let kp = kk.div_ceil(BK).max(1) * BK;
    let n = cout * kp;
    // SAFETY: the kernel writes all n elements before anything reads them.
    let mut out = unsafe { gpu.stream().alloc::<u16>(n) }.with_context(|| {
        format!("allocating {n} 16-bit weights for a {kk} x {cout} convolution")
    })?;
    if n > 0 {
        let f = gpu.function("igemm", &format!("pack_weights_{}", half.suffix()))?;
        let dims = [kk as u64, cout as u64, kp as u64];
        let mut args = gpu.stream().launch_builder(&f);
        args.arg(w).arg(&mut out);
        for d in &dims {
            args.arg(d);
        }
        // SAFETY: (const float*, unsigned short*, u64 kk, u64 cout, u64 kp);
        // w holds kk*cout floats (checked) and out cout*kp elements; the
        // kernel reads w only at j < kk.
        unsafe { launch(args, gpu.elementwise_config(n), "pack_weights", n) }?;
    }
    Ok(PackedWeights {
        half,
        kp,
        cout,
        w: out,
    })
}

/// A fused convolution's sizes: output `[b, h, w, cout]`, source of `cin`
/// channels on the grid `resample` implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedDims {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub resample: Resample,
}

impl FusedDims {
    /// `(h, w)` of the source the prologue reads.
    pub fn source_hw(&self) -> (usize, usize) {
        match self.resample {
            Resample::None => (self.h, self.w),
            Resample::Up => (self.h / 2, self.w / 2),
            Resample::Down => (self.h * 2, self.w * 2),
        }
    }
}

/// The fused convolution's float32 operands.
pub struct Operands<'a> {
    pub x: &'a CudaSlice<f32>,
    /// `[b][2][cin]`: y = a x + s per (sample, channel) before SiLU.
    pub affine: Option<&'a CudaSlice<f32>>,
    pub silu: bool,
    pub bias: &'a CudaSlice<f32>,
    /// `[b][cout]`.
    pub bvec: Option<&'a CudaSlice<f32>>,
    /// `[b*h*w][cout]`.
    pub res: Option<&'a CudaSlice<f32>>,
}

/// `y = conv(resample(silu?(a x + s)), w) + bias + bvec + res`, every
/// element of `y` written.
pub fn conv(
    gpu: &Gpu,
    op: &Operands<'_>,
    w: &PackedWeights,
    d: FusedDims,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    ensure!(
        d.k == 1 || d.k == 3,
        "conv: kernel size {} (only 1 and 3 are supported)",
        d.k
    );
    if d.resample == Resample::Up {
        ensure!(
            d.h.is_multiple_of(2) && d.w.is_multiple_of(2),
            "conv: an up-sampled output of odd size {} x {}",
            d.h,
            d.w
        );
    }
    let kk = d.k * d.k * d.cin;
    ensure!(
        w.cout == d.cout && w.kp == kk.div_ceil(BK).max(1) * BK,
        "conv: packed weights [{}][{}] for {} -> {} channels, k = {}",
        w.cout,
        w.kp,
        d.cin,
        d.cout,
        d.k
    );
    let (sh, sw) = d.source_hw();
    let m = d.b * d.h * d.w;
    let fits = |v: usize| i32::try_from(v).is_ok();
    ensure!(
        fits(m) && fits(d.b * sh * sw) && fits(w.kp) && fits(d.cin) && fits(d.cout),
        "conv: sizes {d:?} exceed the kernel's 32-bit indices"
    );
    expect_len(gpu, "conv", "input", op.x, d.b * sh * sw * d.cin)?;
    expect_len(gpu, "conv", "output", y, m * d.cout)?;
    expect_len(gpu, "conv", "bias", op.bias, d.cout)?;
    if let Some(a) = op.affine {
        expect_len(gpu, "conv", "affine", a, 2 * d.b * d.cin)?;
    }
    if let Some(v) = op.bvec {
        expect_len(gpu, "conv", "per-sample bias", v, d.b * d.cout)?;
    }
    if let Some(r) = op.res {
        expect_len(gpu, "conv", "residual", r, m * d.cout)?;
    }
    gpu.check_stream(&w.w, "weights")?;
    if m * d.cout == 0 {
        return Ok(());
    }
    // Whole 32-channel tiles of one tap take the float4 path.
    let vec = d.cin.is_multiple_of(BK);
    let rs = match d.resample {
        Resample::None => "same",
        Resample::Up => "up",
        Resample::Down => "down",
    };
    let name = format!(
        "igemm_{}_{rs}_{}",
        w.half.suffix(),
        if vec { "v" } else { "s" }
    );
    let f = gpu.function("igemm", &name)?;
    // Absent optional operands are never read; x stands in as a valid pointer.
    let ints = [
        d.b,
        d.h,
        d.w,
        d.cin,
        d.cout,
        d.k,
        w.kp,
        usize::from(op.affine.is_some()),
        usize::from(op.silu),
        usize::from(op.bvec.is_some()),
        usize::from(op.res.is_some()),
    ]
    .map(|v| v as i32);
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(op.x)
        .arg(&w.w)
        .arg(op.bias)
        .arg(op.affine.unwrap_or(op.x))
        .arg(op.bvec.unwrap_or(op.x))
        .arg(op.res.unwrap_or(op.x))
        .arg(y);
    for v in &ints {
        args.arg(v);
    }
    ensure!(
        d.cout.div_ceil(BN) <= 65535,
        "conv: {} output channels exceed the grid",
        d.cout
    );
    let cfg = LaunchConfig {
        grid_dim: (m.div_ceil(BM) as u32, d.cout.div_ceil(BN) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's (x, wt, bias, affine, bvec,
    // res, y, 11 ints); every buffer's length is checked above against the
    // sizes the kernel indexes with, on this Gpu's stream; absent operands
    // are flagged 0 and not read; the float4 path needs cin % 32 == 0 and
    // 16-byte aligned buffers (cudarc allocations are).
    unsafe { launch(args, cfg, &name, m * d.cout) }
}
