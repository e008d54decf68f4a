//! `--device auto|cpu|cuda`: one place that picks the backend a job runs on.

use super::Device;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::cuda::{self, backend::Cuda};
use anyhow::{Context, Result};

/// Work that runs on whichever backend `--device` selects.
pub trait OnBackend {
    type Output;
    /// `device` names the backend for summaries ("cpu", "cuda:0 (NVIDIA H100 ...)").
    fn run<B: Backend>(self, backend: &B, device: &str) -> Result<Self::Output>;
}

/// Runs `job` on the GPU for `cuda` (an error saying why when none is
/// usable), on the CPU for `cpu`, and for `auto` on the GPU when one is usable.
pub fn run_on<J: OnBackend>(device: Device, job: J) -> Result<J::Output> {
    let gpu = |why: &str| -> Result<(Cuda, String)> {
        let g = Cuda::new(0).context(why.to_string())?;
        let name = format!("cuda:0 ({})", g.gpu().name());
        Ok((g, name))
    };
    match device {
        Device::Cpu => job.run(&Cpu, "cpu"),
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
        Device::Auto => job.run(&Cpu, "cpu"),
    }
}
