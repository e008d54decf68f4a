//! Launchers for `kernels/igemm.cu`: the tensor-core implicit-GEMM 'same'
//! convolution, with GroupNorm apply, SiLU and 2x resampling fused into its
//! operand load and bias, per-sample bias and residual into its store; bf16
//! or fp16 operands, or float32 operands split into three TF32 products
//! (the fp32 mode). CPU twin: `crate::backend::compose_conv_fused`.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::ops::{expect_len, launch};
use super::Gpu;
use crate::backend::Resample;
use crate::precision::{Half, Precision};

/// The kernels' M and N tiles and block size.
const BM: usize = 128;
const BN: usize = 128;
const THREADS: u32 = 256;

/// The operand arithmetic of a packed convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    /// One 16-bit product per tile.
    Half(Half),
    /// float32 operands, three TF32 products per tile.
    Tf32x3,
}

impl Arith {
    /// The packing a precision mode's convolutions use.
    pub fn for_precision(p: Precision) -> Arith {
        match p.half() {
            Some(h) => Arith::Half(h),
            None => Arith::Tf32x3,
        }
    }

    /// The kernel family's K tile: packed rows are padded to a multiple of
    /// it, and an input whose channels are a multiple of it takes the
    /// vectorised path.
    fn bk(self) -> usize {
        match self {
            Arith::Half(_) => 32,
            Arith::Tf32x3 => 16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Arith::Half(h) => h.suffix(),
            Arith::Tf32x3 => "tf32x3",
        }
    }
}

/// The packed weight buffer: 16-bit values, or float32.
#[derive(Debug)]
enum Buf {
    Half(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

/// Convolution weights for the implicit-GEMM kernels, `[cout][kp]` with the
/// `k*k*cin` products of one output channel contiguous and zero-padded to
/// `kp`; rounded to the 16-bit type in the bf16 / fp16 modes.
#[derive(Debug)]
pub struct PackedWeights {
    pub kind: Arith,
    pub kp: usize,
    pub cout: usize,
    buf: Buf,
}

/// Repacks the float32 `(kk x cout)` matrix of `crate::backend::cpu::CpuConv`.
pub fn pack_weights(
    gpu: &Gpu,
    kind: Arith,
    w: &CudaSlice<f32>,
    kk: usize,
    cout: usize,
) -> Result<PackedWeights> {
    expect_len(gpu, "pack_weights", "weights", w, kk * cout)?;
    let kp = kk.div_ceil(kind.bk()).max(1) * kind.bk();
    let n = cout * kp;
    let what = || format!("allocating {n} packed weights for a {kk} x {cout} convolution");
    let dims = [kk as u64, cout as u64, kp as u64];
    let f = gpu.function(
        "igemm",
        &format!("pack_weights_{}", kind.name().replace("tf32x3", "f32")),
    )?;
    let mut args = gpu.stream().launch_builder(&f);
    args.arg(w);
    // SAFETY (both allocations): the kernel writes all n elements before
    // anything reads them.
    let mut buf = match kind {
        Arith::Half(_) => Buf::Half(unsafe { gpu.stream().alloc::<u16>(n) }.with_context(what)?),
        Arith::Tf32x3 => Buf::F32(unsafe { gpu.stream().alloc::<f32>(n) }.with_context(what)?),
    };
    match &mut buf {
        Buf::Half(b) => args.arg(b),
        Buf::F32(b) => args.arg(b),
    };
    for d in &dims {
        args.arg(d);
    }
    if n > 0 {
        // SAFETY: (const float*, T*, u64 kk, u64 cout, u64 kp) with T the
        // buffer's element type; w holds kk*cout floats (checked) and the
        // output cout*kp elements; the kernel reads w only at j < kk.
        unsafe { launch(args, gpu.elementwise_config(n), "pack_weights", n) }?;
    }
    Ok(PackedWeights {
        kind,
        kp,
        cout,
        buf,
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
    /// The second half of a channel concatenation `[x, x2]`, and the
    /// channels of `x`.
    pub x2: Option<(&'a CudaSlice<f32>, usize)>,
    /// `[b][2][cin]`: y = a x + s per (sample, channel) before SiLU.
    pub affine: Option<&'a CudaSlice<f32>>,
    pub silu: bool,
    pub bias: &'a CudaSlice<f32>,
    /// `[b][cout]`.
    pub bvec: Option<&'a CudaSlice<f32>>,
    /// `[b*h*w][cout]`.
    pub res: Option<&'a CudaSlice<f32>>,
}

/// Whether `conv` takes resampling `r` in its prologue for `cin` channels,
/// and a concatenation split at `c1` (`Some`) in its operand load.
pub fn fuses(w: &PackedWeights, cin: usize, r: Resample, c1: Option<usize>) -> bool {
    let bk = w.kind.bk();
    (r == Resample::None || cin.is_multiple_of(bk))
        && c1.is_none_or(|c1| c1 > 0 && c1 < cin && c1.is_multiple_of(bk) && cin.is_multiple_of(bk))
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
    let bk = w.kind.bk();
    ensure!(
        w.cout == d.cout && w.kp == kk.div_ceil(bk).max(1) * bk,
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
        fits(m + BM) && fits(d.b * sh * sw) && fits(w.kp) && fits(d.cin) && fits(d.cout),
        "conv: sizes {d:?} exceed the kernel's 32-bit indices"
    );
    let c1 = op.x2.map(|(_, c1)| c1);
    ensure!(
        fuses(w, d.cin, d.resample, c1),
        "conv: resampling or a concatenation in the prologue needs channels in multiples \
         of {bk}, got {} (split at {c1:?})",
        d.cin
    );
    let pixels = d.b * sh * sw;
    match op.x2 {
        None => expect_len(gpu, "conv", "input", op.x, pixels * d.cin)?,
        Some((x2, c1)) => {
            expect_len(gpu, "conv", "input", op.x, pixels * c1)?;
            expect_len(gpu, "conv", "second input", x2, pixels * (d.cin - c1))?;
        }
    }
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
    match &w.buf {
        Buf::Half(b) => gpu.check_stream(b, "weights")?,
        Buf::F32(b) => gpu.check_stream(b, "weights")?,
    }
    if m * d.cout == 0 {
        return Ok(());
    }
    // Whole K tiles of one tap take the float4 path.
    let vec = d.cin.is_multiple_of(bk);
    let rs = match d.resample {
        Resample::None => "same",
        Resample::Up => "up",
        Resample::Down => "down",
    };
    let name = format!(
        "igemm_{}_{rs}_{}",
        w.kind.name(),
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
    args.arg(op.x);
    match &w.buf {
        Buf::Half(b) => args.arg(b),
        Buf::F32(b) => args.arg(b),
    };
    args.arg(op.bias)
        .arg(op.affine.unwrap_or(op.x))
        .arg(op.bvec.unwrap_or(op.x))
        .arg(op.res.unwrap_or(op.x))
        .arg(y);
    for v in &ints {
        args.arg(v);
    }
    let (x2, c1) = op.x2.unwrap_or((op.x, d.cin));
    let c1 = c1 as i32;
    args.arg(x2).arg(&c1);
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
    // res, y, 11 ints, x2, c1); every buffer's length is checked above against the
    // sizes the kernel indexes with, on this Gpu's stream; absent operands
    // are flagged 0 and not read; the float4 path needs cin % bk == 0 and
    // 16-byte aligned buffers (cudarc allocations are).
    unsafe { launch(args, cfg, &name, m * d.cout) }
}
