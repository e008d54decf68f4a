//! How a convolution runs on the GPU. At load time: its weights uploaded
//! in the CPU backend's layout and, outside the reference backend, packed
//! for the implicit-GEMM tensor-core kernels. Per call: whether the fused
//! kernel takes the whole `conv_fused`, or the ops run one by one.

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

use super::backend::GpuTensor;
use super::igemm::{self, Arith, PackedWeights};
use super::Gpu;
use crate::backend::cpu_ref::CpuRef;
use crate::backend::{Backend, ConvPre};
use crate::tensor::Tensor;

/// A convolution's weights on the device, in the layout of
/// `crate::backend::cpu_ref::CpuConv`: `fwd` (k*k*cin) x cout, `bwd` (the
/// flipped, transposed kernel) (k*k*cout) x cin; plus both repacked for the
/// tensor-core kernels (absent on the reference backend, which runs
/// im2col + SGEMM).
#[derive(Debug)]
pub struct GpuConv {
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
    pub fwd: CudaSlice<f32>,
    pub bwd: CudaSlice<f32>,
    pub bias: CudaSlice<f32>,
    pub packed: Option<PackedConv>,
}

/// `GpuConv`'s weights rounded for the tensor-core kernels.
#[derive(Debug)]
pub struct PackedConv {
    pub fwd: PackedWeights,
    pub bwd: PackedWeights,
    /// The backward-data product has no bias: `cin` zeros.
    pub zero_bias: CudaSlice<f32>,
}

/// Uploads `w`, `bias` and, given the packing `arith`, packs them.
pub(super) fn prepare(
    gpu: &Gpu,
    arith: Option<Arith>,
    w: &Tensor,
    bias: &Tensor,
) -> Result<GpuConv> {
    // The CPU backend checks the shapes and lays the matrices out; the
    // device gets exactly those matrices.
    let c = CpuRef.prepare_conv(w, bias)?;
    let what = |m: &str| {
        format!(
            "{m} of a {}x{} convolution {} -> {}",
            c.k, c.k, c.cin, c.cout
        )
    };
    let fwd = gpu.upload_f32(&what("weights"), &c.fwd)?;
    let bwd = gpu.upload_f32(&what("backward weights"), &c.bwd)?;
    let packed = match arith {
        None => None,
        Some(arith) => {
            let kk = c.k * c.k;
            Some(PackedConv {
                fwd: igemm::pack_weights(gpu, arith, &fwd, kk * c.cin, c.cout)
                    .with_context(|| what("packing the weights"))?,
                bwd: igemm::pack_weights(gpu, arith, &bwd, kk * c.cout, c.cin)
                    .with_context(|| what("packing the backward weights"))?,
                zero_bias: gpu.upload_f32(&what("zero bias"), &vec![0.0; c.cin])?,
            })
        }
    };
    Ok(GpuConv {
        k: c.k,
        cin: c.cin,
        cout: c.cout,
        fwd,
        bwd,
        bias: gpu.upload_f32(&what("bias"), &c.bias)?,
        packed,
    })
}

/// The packed weights when the fused kernel takes `conv_fused(x, c, pre,
/// ..)` whole; None when its ops run one by one.
pub(super) fn fused<'a>(
    c: &'a GpuConv,
    x: &GpuTensor,
    pre: &ConvPre<'_, GpuTensor>,
) -> Option<&'a PackedWeights> {
    let p = c.packed.as_ref()?;
    let c1 = pre.skip.map(|_| x.shape.last().copied().unwrap_or(0));
    igemm::fuses(&p.fwd, c.cin, pre.resample, c1).then_some(&p.fwd)
}
