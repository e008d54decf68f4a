//! Launchers for `kernels/ddim.cu`; CPU twins in `crate::ddim`.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::{launch, Gpu};
use crate::ddim::DdimCoefs;

/// `crate::ddim::invert_step` on the device, in place on `x`.
pub fn invert_step(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    eps: &CudaSlice<f32>,
    c: DdimCoefs,
) -> Result<()> {
    launch(gpu, "ddim_invert_step", x, eps, c)
}

/// `crate::ddim::denoise_step` on the device, in place on `x`.
pub fn denoise_step(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    eps: &CudaSlice<f32>,
    c: DdimCoefs,
) -> Result<()> {
    launch(gpu, "ddim_denoise_step", x, eps, c)
}

fn launch(
    gpu: &Gpu,
    kernel: &str,
    x: &mut CudaSlice<f32>,
    eps: &CudaSlice<f32>,
    c: DdimCoefs,
) -> Result<()> {
    let n = x.len();
    gpu.expect_len(kernel, "eps", eps, n)?;
    if n == 0 {
        return Ok(());
    }
    let cfg = gpu.elementwise_config(n);
    let p = (
        x,
        eps,
        c.sqrt_a,
        c.sqrt_1ma,
        c.sqrt_a_next,
        c.sqrt_1ma_next,
        n as u64,
    );
    // SAFETY: both buffers hold n floats and the kernel touches indices
    // below n only.
    unsafe { launch::ddim_step(gpu, kernel, cfg, p) }
}
