//! `--device auto|cpu|cuda` and `--precision`: one place that picks the
//! backend a job runs on.

use super::Device;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::{self, backend::Cuda};
use crate::backend::Backend;
use crate::precision::Precision;
use anyhow::{bail, Context, Result};

/// Work that runs on whichever backend `--device` selects.
pub trait OnBackend {
    type Output;
    /// `device` names the backend for summaries ("cpu", "cuda:0 (NVIDIA H100 ...)",
    /// with ", precision bf16" appended in the tensor-core modes).
    fn run<B: Backend>(self, backend: &B, device: &str) -> Result<Self::Output>;
}

/// Runs `job` on the GPU for `cuda` (an error saying why when none is
/// usable), on the CPU for `cpu`, and for `auto` on the GPU when one is
/// usable. The CPU is the float32 reference: other precisions need the GPU.
pub fn run_on<J: OnBackend>(device: Device, precision: Precision, job: J) -> Result<J::Output> {
    let gpu = |why: &str| -> Result<(Cuda, String)> {
        let g = Cuda::with_precision(0, precision).context(why.to_string())?;
        let mut name = format!("cuda:0 ({})", g.gpu().name());
        if precision != Precision::Fp32 {
            name.push_str(&format!(", precision {precision}"));
        }
        Ok((g, name))
    };
    let on_cpu = |job: J| {
        if precision != Precision::Fp32 {
            bail!(
                "--precision {precision} runs on a GPU's tensor cores, and {}; the CPU backend \
                 computes in fp32 only",
                if device == Device::Cpu {
                    "--device cpu was asked for".to_string()
                } else {
                    format!(
                        "no GPU is usable ({})",
                        cuda::unavailable_reason().unwrap_or_default()
                    )
                }
            );
        }
        job.run(&Cpu, "cpu")
    };
    match device {
        Device::Cpu => on_cpu(job),
        Device::Cuda => {
            let (g, name) = gpu("--device cuda")?;
            job.run(&g, &name)
        }
        Device::Auto if cuda::cuda_available() => {
            let (g, name) = gpu(
                "--device auto found a GPU but could not use it (--device cpu runs on the CPU)",
            )?;
            job.run(&g, &name)
        }
        Device::Auto => on_cpu(job),
    }
}
