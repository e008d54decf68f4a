//! The dimensions of a multi-head attention call, shared by the flash kernels
//! (`flash.rs`) and the input gradient through explicit weights
//! (`attention_gemm.rs`).

use anyhow::{ensure, Context, Result};
use cudarc::driver::CudaSlice;

use super::Gpu;

/// One multi-head attention call: `qkv` `[b, t, 3c]` -> `[b, t, c]` over
/// `heads` heads of `d = c / heads` channels. `legacy`: per head q, k, v
/// are consecutive; else q, k, v are the thirds of the 3c channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub heads: usize,
    pub legacy: bool,
}

impl AttnDims {
    /// `d = c / heads`, once `heads` is known to divide `c`.
    pub(crate) fn head_dim(&self, op: &str) -> Result<usize> {
        let (c, heads) = (self.c, self.heads);
        ensure!(
            heads > 0 && c > 0 && c.is_multiple_of(heads),
            "{op}: {heads} heads do not divide {c} channels"
        );
        Ok(c / heads)
    }

    /// Fails unless `qkv` is `[b, t, 3c]` and `out` (named `what`: the
    /// output, or the output's gradient) `[b, t, c]`.
    pub(crate) fn expect_lens(
        &self,
        gpu: &Gpu,
        op: &str,
        qkv: &CudaSlice<f32>,
        (what, out): (&str, &CudaSlice<f32>),
    ) -> Result<()> {
        let AttnDims { b, t, c, .. } = *self;
        let n = b
            .checked_mul(t)
            .and_then(|v| v.checked_mul(3 * c))
            .with_context(|| format!("{op}: size {b} x {t} x 3*{c} overflows"))?;
        gpu.expect_len(op, "qkv", qkv, n)?;
        gpu.expect_len(op, what, out, n / 3)
    }
}
