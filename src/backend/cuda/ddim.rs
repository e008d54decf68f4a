//! Launchers for `kernels/ddim.cu`; CPU twins in `crate::ddim`.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::Gpu;
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
    ensure!(
        x.len() == eps.len(),
        "{kernel}: x has {} elements but eps has {}",
        x.len(),
        eps.len()
    );
    gpu.check_stream(x, "x")?;
    gpu.check_stream(eps, "eps")?;
    if x.is_empty() {
        return Ok(());
    }
    let func = gpu.function("ddim", kernel)?;
    let n = x.len() as u64;
    let cfg = gpu.elementwise_config(x.len());
    let mut args = gpu.stream().launch_builder(&func);
    args.arg(x)
        .arg(eps)
        .arg(&c.sqrt_a)
        .arg(&c.sqrt_1ma)
        .arg(&c.sqrt_a_next)
        .arg(&c.sqrt_1ma_next)
        .arg(&n);
    // SAFETY: the arguments match the kernel's signature (float*, const
    // float*, four floats, unsigned long long), both buffers hold n floats
    // on this Gpu's stream, and the kernel touches indices below n only.
    unsafe { args.launch(cfg) }.with_context(|| format!("launching {kernel} on {n} elements"))?;
    Ok(())
}
