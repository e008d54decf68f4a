//! How a convolution runs on the GPU. At load time: its weights laid out as
//! the CPU reference lays them out, then packed for the implicit-GEMM
//! tensor-core kernels. Per call: whether the fused kernel takes the whole
//! `conv_fused`, or the ops run one by one.

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

use super::backend::GpuTensor;
use super::igemm::{self, Arith, PackedWeights};
use super::Gpu;
use crate::backend::cpu_ref::CpuRef;
use crate::backend::{Backend, ConvPre};
use crate::tensor::Tensor;

/// A convolution's weights on the device, packed for the tensor-core
/// kernels in the arithmetic of the backend's precision: `fwd` from the
/// `(k*k*cin) x cout` matrix of `crate::backend::cpu_ref::CpuConv`, `bwd`
/// from its flipped, transposed kernel `(k*k*cout) x cin`.
#[derive(Debug)]
pub struct GpuConv {
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
    pub fwd: PackedWeights,
    pub bwd: PackedWeights,
    pub bias: CudaSlice<f32>,
    /// The backward-data product has no bias: `cin` zeros.
    pub zero_bias: CudaSlice<f32>,
}

/// A convolution's float32 matrices on the device, as
/// `crate::backend::cpu_ref::CpuConv` lays them out: `fwd` (k*k*cin) x cout, `bwd` (the
/// flipped, transposed kernel) (k*k*cout) x cin.
#[derive(Debug)]
pub struct F32Conv {
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
    pub fwd: CudaSlice<f32>,
    pub bwd: CudaSlice<f32>,
    pub bias: CudaSlice<f32>,
}

impl F32Conv {
    /// `w` and `bias` laid out by the CPU reference (which checks their shapes), uploaded.
    pub fn upload(gpu: &Gpu, w: &Tensor, bias: &Tensor) -> Result<F32Conv> {
        let c = CpuRef.prepare_conv(w, bias)?;
        let what = |m: &str| describe(c.k, c.cin, c.cout, m);
        Ok(F32Conv {
            k: c.k,
            cin: c.cin,
            cout: c.cout,
            fwd: gpu.upload_f32(&what("weights"), &c.fwd)?,
            bwd: gpu.upload_f32(&what("backward weights"), &c.bwd)?,
            bias: gpu.upload_f32(&what("bias"), &c.bias)?,
        })
    }
}

/// `m` of a `k`x`k` convolution, for errors.
fn describe(k: usize, cin: usize, cout: usize, m: &str) -> String {
    format!("{m} of a {k}x{k} convolution {cin} -> {cout}")
}

/// Uploads `w` and `bias` and packs the weights for `arith`.
pub(super) fn prepare(gpu: &Gpu, arith: Arith, w: &Tensor, bias: &Tensor) -> Result<GpuConv> {
    let c = F32Conv::upload(gpu, w, bias)?;
    let what = |m: &str| describe(c.k, c.cin, c.cout, m);
    let kk = c.k * c.k;
    Ok(GpuConv {
        k: c.k,
        cin: c.cin,
        cout: c.cout,
        fwd: igemm::pack_weights(gpu, arith, &c.fwd, kk * c.cin, c.cout)
            .with_context(|| what("packing the weights"))?,
        bwd: igemm::pack_weights(gpu, arith, &c.bwd, kk * c.cout, c.cin)
            .with_context(|| what("packing the backward weights"))?,
        zero_bias: gpu.upload_f32(&what("zero bias"), &vec![0.0; c.cin])?,
        bias: c.bias,
    })
}

/// The packed weights when the fused kernel takes `conv_fused(x, c, pre,
/// ..)` whole; None when its ops run one by one.
pub(super) fn fused<'a>(
    c: &'a GpuConv,
    x: &GpuTensor,
    pre: &ConvPre<'_, GpuTensor>,
) -> Option<&'a PackedWeights> {
    let c1 = pre.skip.map(|_| x.shape.last().copied().unwrap_or(0));
    igemm::fuses(&c.fwd, c.cin, pre.resample, c1).then_some(&c.fwd)
}
