//! The test knobs of the CUDA backend: poisoned outputs and a forced convolution kernel.

use std::sync::atomic::Ordering;

use crate::backend::cuda::backend::Cuda;
use crate::backend::cuda::dispatch::ConvKernel;

impl Cuda {
    /// When on, every output buffer is filled with NaN before its kernel runs, so that an
    /// element a kernel fails to write shows up as NaN instead of as whatever the allocator
    /// handed out; `repeat` then runs its body directly rather than through a graph.
    pub fn set_poison(&self, on: bool) {
        self.knobs.poison.store(on, Ordering::Relaxed);
    }

    /// Runs every convolution with kernel `k` (where it takes the layer; see
    /// `dispatch::conv`), or, with None, each with its table's winner.
    pub fn force_conv_kernel(&self, k: Option<ConvKernel>) {
        self.knobs.forced.set(k);
    }
}
