//! Launchers for `kernels/igemm.cu`: the tensor-core implicit-GEMM 'same'
//! convolution, with GroupNorm apply, SiLU and 2x resampling fused into its
//! operand load and bias, per-sample bias and residual into its store; bf16
//! or fp16 operands, or float32 operands split into three TF32 products
//! (the fp32 mode) or rounded to one (the tf32 mode). CPU twin: `crate::backend::compose_conv_fused`.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::launch::{self, KernelArg};
use super::Gpu;
use crate::backend::Resample;
use crate::precision::{Half, Precision};

/// The kernels' M and N tiles and block size.
pub(super) const BM: usize = 128;
const BN: usize = 128;
const THREADS: u32 = 256;

/// The operand arithmetic of a packed convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    /// One 16-bit product per tile.
    Half(Half),
    /// float32 operands, three TF32 products per tile (the fp32 mode).
    Tf32x3,
    /// float32 operands rounded to TF32, one product per tile (the tf32 mode).
    Tf32,
}

impl Arith {
    /// The packing a precision mode's convolutions use.
    pub fn for_precision(p: Precision) -> Arith {
        match (p.half(), p) {
            (Some(h), _) => Arith::Half(h),
            (None, Precision::Tf32) => Arith::Tf32,
            (None, _) => Arith::Tf32x3,
        }
    }

    /// The kernel family's K tile: packed rows are padded to a multiple of
    /// it, and an input whose channels are a multiple of it takes the
    /// vectorised path.
    pub(super) fn bk(self) -> usize {
        match self {
            Arith::Half(_) => 32,
            Arith::Tf32x3 | Arith::Tf32 => 16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Arith::Half(h) => h.suffix(),
            Arith::Tf32x3 => "tf32x3",
            Arith::Tf32 => "tf32",
        }
    }
}

/// The packed weight buffer: 16-bit values, or float32.
#[derive(Debug)]
pub(crate) enum PackedBuf {
    Half(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

/// The kernels take either buffer as `const void* wt`.
impl KernelArg for &PackedBuf {
    fn check(&self, gpu: &Gpu, kernel: &str, param: &str) -> Result<()> {
        match self {
            PackedBuf::Half(b) => (&b).check(gpu, kernel, param),
            PackedBuf::F32(b) => (&b).check(gpu, kernel, param),
        }
    }

    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        match **self {
            PackedBuf::Half(ref b) => args.arg(b),
            PackedBuf::F32(ref b) => args.arg(b),
        };
    }
}

/// Convolution weights for the implicit-GEMM kernels, `[cout][kp]` with the
/// `k*k*cin` products of one output channel contiguous and zero-padded to
/// `kp`; rounded to the 16-bit type in the bf16 / fp16 modes.
#[derive(Debug)]
pub struct PackedWeights {
    pub kind: Arith,
    pub kp: usize,
    pub cout: usize,
    buf: PackedBuf,
}

impl PackedWeights {
    /// The 16-bit weights; None for the float32 packings.
    pub(super) fn half_buf(&self) -> Option<&CudaSlice<u16>> {
        match &self.buf {
            PackedBuf::Half(b) => Some(b),
            PackedBuf::F32(_) => None,
        }
    }
}

/// Repacks the float32 `(kk x cout)` matrix of `crate::backend::cpu_ref::CpuConv`.
pub fn pack_weights(
    gpu: &Gpu,
    kind: Arith,
    w: &CudaSlice<f32>,
    kk: usize,
    cout: usize,
) -> Result<PackedWeights> {
    gpu.expect_len("pack_weights", "weights", w, kk * cout)?;
    let kp = kk.div_ceil(kind.bk()).max(1) * kind.bk();
    let n = cout * kp;
    let what = || format!("allocating {n} packed weights for a {kk} x {cout} convolution");
    let cfg = gpu.elementwise_config(n);
    let [kk, cout64, kp64] = [kk, cout, kp].map(|v| v as u64);
    // SAFETY (allocations): the kernel writes all n elements before anything
    // reads them. (Launches): w holds kk*cout floats (checked) and the
    // output cout*kp elements; the kernel reads w only at j < kk.
    let buf = match kind {
        Arith::Half(h) => {
            let mut b = unsafe { gpu.stream().alloc::<u16>(n) }.with_context(what)?;
            if n > 0 {
                let name = format!("pack_weights_{}", h.suffix());
                let p = (w, &mut b, kk, cout64, kp64);
                unsafe { launch::pack_weights_16(gpu, &name, cfg, p) }?;
            }
            PackedBuf::Half(b)
        }
        Arith::Tf32x3 | Arith::Tf32 => {
            let mut b = unsafe { gpu.stream().alloc::<f32>(n) }.with_context(what)?;
            if n > 0 {
                unsafe { launch::pack_weights_f32(gpu, cfg, (w, &mut b, kk, cout64, kp64)) }?;
            }
            PackedBuf::F32(b)
        }
    };
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

/// The resampling part of the convolution kernels' names (`RS_SAME`,
/// `RS_UP`, `RS_DOWN` in `kernels/common/conv_prologue.cuh`).
pub(super) fn kernel_suffix(r: Resample) -> &'static str {
    match r {
        Resample::None => "same",
        Resample::Up => "up",
        Resample::Down => "down",
    }
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
    check_operands(gpu, "conv", op, w, d, y)?;
    let bk = w.kind.bk();
    let c1 = op.x2.map(|(_, c1)| c1);
    ensure!(
        fuses(w, d.cin, d.resample, c1),
        "conv: resampling or a concatenation in the prologue needs channels in multiples \
         of {bk}, got {} (split at {c1:?})",
        d.cin
    );
    let m = d.b * d.h * d.w;
    if m * d.cout == 0 {
        return Ok(());
    }
    // Whole K tiles of one tap take the float4 path.
    let vec = d.cin.is_multiple_of(bk);
    let rs = kernel_suffix(d.resample);
    let name = format!(
        "igemm_{}_{rs}_{}",
        w.kind.name(),
        if vec { "v" } else { "s" }
    );
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
    let int = |v: usize| v as i32;
    let flag = |v: bool| i32::from(v);
    let (x2, c1) = op.x2.unwrap_or((op.x, d.cin));
    // Absent optional operands are flagged 0 and never read; x stands in as
    // a valid pointer.
    let p = (
        op.x,
        &w.buf,
        op.bias,
        op.affine.unwrap_or(op.x),
        op.bvec.unwrap_or(op.x),
        op.res.unwrap_or(op.x),
        y,
        int(d.b),
        int(d.h),
        int(d.w),
        int(d.cin),
        int(d.cout),
        int(d.k),
        int(w.kp),
        flag(op.affine.is_some()),
        flag(op.silu),
        flag(op.bvec.is_some()),
        flag(op.res.is_some()),
        x2,
        int(c1),
    );
    // SAFETY: every buffer's length is checked above against the sizes the
    // kernel indexes with; the float4 path needs cin % bk == 0 and 16-byte
    // aligned buffers (cudarc allocations are).
    unsafe { launch::igemm(gpu, &name, cfg, p) }
}

/// The one shape check of both convolution versions (`igemm::conv`,
/// `igemm2::conv`): the kernel size, the packing and the length of every
/// operand against `d`, and the kernels' 32-bit indices.
pub(super) fn check_operands(
    gpu: &Gpu,
    op_name: &str,
    op: &Operands<'_>,
    w: &PackedWeights,
    d: FusedDims,
    y: &CudaSlice<f32>,
) -> Result<()> {
    ensure!(
        d.k == 1 || d.k == 3,
        "{op_name}: kernel size {} (only 1 and 3 are supported)",
        d.k
    );
    if d.resample == Resample::Up {
        ensure!(
            d.h.is_multiple_of(2) && d.w.is_multiple_of(2),
            "{op_name}: an up-sampled output of odd size {} x {}",
            d.h,
            d.w
        );
    }
    let kk = d.k * d.k * d.cin;
    let bk = w.kind.bk();
    ensure!(
        w.cout == d.cout && w.kp == kk.div_ceil(bk).max(1) * bk,
        "{op_name}: packed weights [{}][{}] for {} -> {} channels, k = {}",
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
        "{op_name}: sizes {d:?} exceed the kernel's 32-bit indices"
    );
    let pixels = d.b * sh * sw;
    match op.x2 {
        None => gpu.expect_len(op_name, "input", op.x, pixels * d.cin)?,
        Some((x2, c1)) => {
            ensure!(
                c1 > 0 && c1 < d.cin,
                "{op_name}: a concatenation split at {c1} of {} channels",
                d.cin
            );
            gpu.expect_len(op_name, "input", op.x, pixels * c1)?;
            gpu.expect_len(op_name, "second input", x2, pixels * (d.cin - c1))?;
        }
    }
    gpu.expect_len(op_name, "output", y, m * d.cout)?;
    gpu.expect_len(op_name, "bias", op.bias, d.cout)?;
    if let Some(a) = op.affine {
        gpu.expect_len(op_name, "affine", a, 2 * d.b * d.cin)?;
    }
    if let Some(v) = op.bvec {
        gpu.expect_len(op_name, "per-sample bias", v, d.b * d.cout)?;
    }
    if let Some(r) = op.res {
        gpu.expect_len(op_name, "residual", r, m * d.cout)?;
    }
    Ok(())
}
