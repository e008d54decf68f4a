//! The small set of tensor operations both networks and the sampler need,
//! implemented once per device. Activations are NHWC; a token sequence is
//! stored as `[B, 1, T, C]` and a vector per batch item as `[B, 1, 1, C]`.

pub mod cpu_ref;
pub mod cuda;
pub mod shapes;

use crate::ddim::DdimCoefs;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// The 2x resampling a ResBlock applies between its first GroupNorm and conv.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    None,
    /// 2x2 average pooling.
    Down,
    /// Nearest 2x up-sampling.
    Up,
}

/// GroupNorm arguments as `Backend::group_norm` takes them.
#[derive(Clone, Copy)]
pub struct Norm<'a, T> {
    pub gamma: &'a T,
    pub beta: &'a T,
    pub ss: Option<&'a T>,
    pub silu: bool,
}

/// What a fused convolution does to its input before the product: the
/// input is `[x, skip]` (channel concatenation) when `skip` is given, then
/// normalised, then resampled.
pub struct ConvPre<'a, T> {
    pub skip: Option<&'a T>,
    pub norm: Option<Norm<'a, T>>,
    pub resample: Resample,
}

/// What a fused convolution adds to its product (after the bias).
pub struct ConvPost<'a, T> {
    /// `[B,1,1,cout]`, broadcast over the pixels.
    pub bcast: Option<&'a T>,
    /// The output's shape.
    pub residual: Option<&'a T>,
}

impl<T> Default for ConvPre<'_, T> {
    fn default() -> Self {
        ConvPre {
            skip: None,
            norm: None,
            resample: Resample::None,
        }
    }
}

impl<T> Default for ConvPost<'_, T> {
    fn default() -> Self {
        ConvPost {
            bcast: None,
            residual: None,
        }
    }
}

/// What `Backend::anomaly` makes of a batch: the anomaly maps `[B,H,W,1]` in [0, 1], and
/// the differences they normalise (`crate::post::difference`), which compare across slices.
pub struct Anomaly<T> {
    pub map: T,
    pub difference: T,
}

/// The largest stage `Backend::flag_non_finite` takes: its flag is a float32 tensor,
/// exact for integers up to 2^24.
pub const MAX_FLAG: u32 = 1 << 24;

/// `stage` as the flag's value.
pub fn flag_value(stage: u32) -> Result<f32> {
    ensure!(
        (1..=MAX_FLAG).contains(&stage),
        "flag_non_finite: stage {stage} is not in 1..={MAX_FLAG}"
    );
    Ok(stage as f32)
}

/// `conv(resample(norm([x, skip]))) + bcast + residual`, one op at a time:
/// the CPU backend's path, the reference GPU backend's, and the CPU twin of
/// the fused kernels.
pub fn compose_conv_fused<B: Backend + ?Sized>(
    b: &B,
    x: &B::T,
    c: &B::Conv,
    pre: &ConvPre<'_, B::T>,
    post: &ConvPost<'_, B::T>,
) -> Result<B::T> {
    let joined;
    let mut a = x;
    if let Some(skip) = pre.skip {
        joined = b.concat(x, skip)?;
        a = &joined;
    }
    let normed;
    if let Some(n) = &pre.norm {
        normed = b.group_norm(a, n.gamma, n.beta, n.ss, n.silu)?;
        a = &normed;
    }
    let resampled;
    match pre.resample {
        Resample::None => {}
        Resample::Down => {
            resampled = b.avg_pool2(a)?;
            a = &resampled;
        }
        Resample::Up => {
            resampled = b.upsample2(a)?;
            a = &resampled;
        }
    }
    let mut y = b.conv(a, c)?;
    if let Some(e) = post.bcast {
        y = b.add(&y, e)?;
    }
    if let Some(r) = post.residual {
        y = b.add(&y, r)?;
    }
    Ok(y)
}

pub trait Backend {
    /// A tensor living on the device.
    type T: Clone;
    /// A convolution (or linear layer) prepared once at load time, in the
    /// forward form and in the flipped / transposed form its backward needs.
    type Conv;

    fn name(&self) -> &'static str;
    /// Device memory free for activations, where the backend has a budget
    /// (the GPU); None for host memory.
    fn free_bytes(&self) -> Result<Option<usize>> {
        Ok(None)
    }
    fn dims<'a>(&self, t: &'a Self::T) -> &'a [usize];
    fn upload(&self, t: &Tensor) -> Result<Self::T>;
    fn download(&self, t: &Self::T) -> Result<Tensor>;
    /// `w` is (out, in, k, k), (out, in, 1) or (out, in); `bias` is (out).
    fn prepare_conv(&self, w: &Tensor, bias: &Tensor) -> Result<Self::Conv>;

    // Forward.
    /// 'same' convolution, stride 1 (3x3 or 1x1); a linear layer on `[B,1,1,C]`.
    fn conv(&self, x: &Self::T, c: &Self::Conv) -> Result<Self::T>;
    /// GroupNorm (32 groups, eps 1e-5, affine), then `* (1 + scale) + shift`
    /// when `ss` (`[B,1,1,2C]`, scale first) is given, then SiLU when `silu`.
    fn group_norm(
        &self,
        x: &Self::T,
        gamma: &Self::T,
        beta: &Self::T,
        ss: Option<&Self::T>,
        silu: bool,
    ) -> Result<Self::T>;
    /// `conv(resample(norm([x, skip]))) + bcast + residual` (see
    /// `compose_conv_fused`, which backends without a fused kernel run).
    fn conv_fused(
        &self,
        x: &Self::T,
        c: &Self::Conv,
        pre: &ConvPre<'_, Self::T>,
        post: &ConvPost<'_, Self::T>,
    ) -> Result<Self::T> {
        compose_conv_fused(self, x, c, pre, post)
    }
    fn silu(&self, x: &Self::T) -> Result<Self::T>;
    /// `a + b`, where `b` is `a`'s shape or `[B,1,1,C]` (broadcast over H, W).
    fn add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    fn avg_pool2(&self, x: &Self::T) -> Result<Self::T>;
    fn upsample2(&self, x: &Self::T) -> Result<Self::T>;
    /// Channel concatenation `[a, b]`.
    fn concat(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// Sinusoidal timestep embedding `[cos(t f_i).., sin(t f_i)..]` with
    /// `f_i = exp(-ln(10000) i / (dim/2))`, `[B,1,1,dim]`, computed in float64
    /// and rounded once.
    fn timestep_embedding(&self, ts: &[usize], dim: usize) -> Result<Self::T>;
    /// `x[b] += table[rows[b]]` for `x` `[B,1,1,D]`, `table` `[K,D]`.
    fn add_rows(&self, x: &Self::T, table: &Self::T, rows: &[usize]) -> Result<Self::T>;
    /// Multi-head attention on `qkv` `[B,1,T,3C]` (or `[B,H,W,3C]`), giving `[.., C]`.
    /// `legacy`: per head q, k, v are consecutive; else q, k, v are the thirds.
    fn attention(&self, qkv: &Self::T, heads: usize, legacy: bool) -> Result<Self::T>;
    /// `[B,H,W,C]` -> `[B,1,T+1,C]`: the spatial mean as token 0, then the
    /// tokens, plus `pos` `[T+1, C]`.
    fn prepend_mean(&self, x: &Self::T, pos: &Self::T) -> Result<Self::T>;
    /// `[B,1,T,C]` -> `[B,1,1,C]`, token 0.
    fn token0(&self, x: &Self::T) -> Result<Self::T>;

    // Input gradients (backward-data); `x` arguments are forward inputs.
    fn conv_bwd(&self, dy: &Self::T, c: &Self::Conv) -> Result<Self::T>;
    fn group_norm_bwd(
        &self,
        x: &Self::T,
        gamma: &Self::T,
        beta: &Self::T,
        ss: Option<&Self::T>,
        silu: bool,
        dy: &Self::T,
    ) -> Result<Self::T>;
    fn avg_pool2_bwd(&self, dy: &Self::T) -> Result<Self::T>;
    fn attention_bwd(
        &self,
        qkv: &Self::T,
        dout: &Self::T,
        heads: usize,
        legacy: bool,
    ) -> Result<Self::T>;
    /// Gradient of `prepend_mean` with respect to `x` of spatial shape `hw`.
    fn prepend_mean_bwd(&self, dtok: &Self::T, hw: (usize, usize)) -> Result<Self::T>;
    /// Gradient of `token0` for `tokens` tokens.
    fn token0_bwd(&self, d0: &Self::T, tokens: usize) -> Result<Self::T>;
    /// `d/dlogits sum_b log_softmax(logits_b)[y_b]` for logits `[B,1,1,K]`.
    fn log_softmax_grad(&self, logits: &Self::T, y: &[usize]) -> Result<Self::T>;

    // Sampler.
    /// A copy of `t` in a new buffer (an error, not a panic, when the
    /// device is out of memory).
    fn duplicate(&self, t: &Self::T) -> Result<Self::T>;
    /// `dst = src` (same shape), into `dst`'s existing buffer.
    fn copy_into(&self, dst: &mut Self::T, src: &Self::T) -> Result<()>;
    /// Runs `body`, which does the same device work on the same long-lived
    /// buffers at every call with this `key` (per-step values reach it
    /// through those buffers). A backend may record it at one call and
    /// replay the recording at the next ones; the recordings are dropped by
    /// `end_repeats`, before the buffers they name are.
    fn repeat(&self, key: usize, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let _ = key;
        body()
    }
    /// Forgets every recording `repeat` made.
    fn end_repeats(&self) {}
    /// Sets `flag` (shape `[1]`, 0 until set) to `stage` (1 ..= [`MAX_FLAG`]) if it is
    /// still 0 and `t` holds a non-finite value, without a copy off the device: a run
    /// flags many tensors and reads the flag, the first bad stage, once.
    fn flag_non_finite(&self, t: &Self::T, flag: &mut Self::T, stage: u32) -> Result<()>;
    fn ddim_invert(&self, x: &mut Self::T, eps: &Self::T, c: DdimCoefs) -> Result<()>;
    fn ddim_denoise(&self, x: &mut Self::T, eps: &Self::T, c: DdimCoefs) -> Result<()>;
    /// `x += s * g`.
    fn axpy(&self, x: &mut Self::T, s: f32, g: &Self::T) -> Result<()>;
    /// `a * x + b * y`, each product rounded before the sum (no FMA), as
    /// PyTorch's `add_noise` computes it.
    fn axpby(&self, a: f32, x: &Self::T, b: f32, y: &Self::T) -> Result<Self::T>;

    // Pre- and post-processing, per slice of `[B,H,W,1]` (SPEC sections 2, 7).
    /// Min-max normalisation of each slice to [-1, 1]; an error names the
    /// first constant or non-finite slice.
    fn normalize(&self, raw: &Self::T) -> Result<Self::T>;
    /// Anomaly maps `[B,H,W,1]` of FLAIR `x0` and pseudo-healthy `xhat`,
    /// histogram-matched first when `hist_match`, with their differences.
    fn anomaly(&self, x0: &Self::T, xhat: &Self::T, hist_match: bool) -> Result<Anomaly<Self::T>>;
}
