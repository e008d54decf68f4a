//! The CUDA reference backend: float32 on the simple kernels only (im2col + cuBLAS SGEMM
//! convolutions, one kernel per op, SIMT attention), the GPU oracle the fast backend is
//! checked against whole (tests/cuda_model.rs). Every op it does not run its own way is the
//! fast backend's float32 op (elementwise, GroupNorm, the sampler's and post-processing
//! kernels).

pub mod attention;
pub mod conv;

use anyhow::Result;

use crate::backend::cuda::attention::AttnDims;
use crate::backend::cuda::backend::{Cuda, GpuTensor};
use crate::backend::cuda::conv_plan::F32Conv;
use crate::backend::shapes::{self, nhwc, ConvDims};
use crate::backend::{Anomaly, Backend};
use crate::ddim::DdimCoefs;
use crate::precision::Precision;
use crate::tensor::Tensor;
use conv::ConvWeights;

pub struct CudaRef {
    fast: Cuda,
}

impl CudaRef {
    /// Opens device `ordinal` (see `Cuda::new`) in float32.
    pub fn new(ordinal: usize) -> Result<CudaRef> {
        Ok(CudaRef {
            fast: Cuda::with_precision(ordinal, Precision::Fp32)?,
        })
    }

    /// `y = conv(x, w) (+ bias)` for x `[b, h, w, cin]` through a `cin -> cout` matrix.
    fn product(&self, x: &GpuTensor, w: ConvWeights<'_>, d: ConvDims) -> Result<GpuTensor> {
        let mut y = self.fast.output("conv", vec![d.b, d.h, d.w, d.cout])?;
        let g = &self.fast;
        conv::conv(g.gpu(), g.blas(), &x.buf, w, d, &mut y.buf)?;
        Ok(y)
    }

    fn dims(qkv_or_out: &[usize], heads: usize, legacy: bool) -> Result<AttnDims> {
        let (b, h, w, c) = nhwc(qkv_or_out)?;
        Ok(AttnDims {
            b,
            t: h * w,
            c,
            heads,
            legacy,
        })
    }
}

impl Backend for CudaRef {
    type T = GpuTensor;
    type Conv = F32Conv;

    fn name(&self) -> &'static str {
        "cuda-ref"
    }

    fn free_bytes(&self) -> Result<Option<usize>> {
        self.fast.free_bytes()
    }

    fn dims<'a>(&self, t: &'a GpuTensor) -> &'a [usize] {
        &t.shape
    }

    fn upload(&self, t: &Tensor) -> Result<GpuTensor> {
        self.fast.upload(t)
    }

    fn download(&self, t: &GpuTensor) -> Result<Tensor> {
        self.fast.download(t)
    }

    fn prepare_conv(&self, w: &Tensor, bias: &Tensor) -> Result<F32Conv> {
        F32Conv::upload(self.fast.gpu(), w, bias)
    }

    fn conv(&self, x: &GpuTensor, c: &F32Conv) -> Result<GpuTensor> {
        shapes::conv(&x.shape, c.cin, c.cout)?;
        let (b, h, w, cin) = nhwc(&x.shape)?;
        let d = ConvDims {
            b,
            h,
            w,
            cin,
            cout: c.cout,
            k: c.k,
        };
        let wt = ConvWeights {
            wmat: &c.fwd,
            bias: Some(&c.bias),
        };
        self.product(x, wt, d)
    }

    fn group_norm(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        ss: Option<&GpuTensor>,
        silu: bool,
    ) -> Result<GpuTensor> {
        self.fast.group_norm(x, gamma, beta, ss, silu)
    }

    fn silu(&self, x: &GpuTensor) -> Result<GpuTensor> {
        self.fast.silu(x)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.fast.add(a, b)
    }

    fn avg_pool2(&self, x: &GpuTensor) -> Result<GpuTensor> {
        self.fast.avg_pool2(x)
    }

    fn upsample2(&self, x: &GpuTensor) -> Result<GpuTensor> {
        self.fast.upsample2(x)
    }

    fn concat(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.fast.concat(a, b)
    }

    fn timestep_embedding(&self, ts: &[usize], dim: usize) -> Result<GpuTensor> {
        self.fast.timestep_embedding(ts, dim)
    }

    fn add_rows(&self, x: &GpuTensor, table: &GpuTensor, rows: &[usize]) -> Result<GpuTensor> {
        self.fast.add_rows(x, table, rows)
    }

    fn attention(&self, qkv: &GpuTensor, heads: usize, legacy: bool) -> Result<GpuTensor> {
        let shape = shapes::attention(&qkv.shape, heads)?;
        let dims = Self::dims(&shape, heads, legacy)?;
        let mut y = self.fast.output("attention", shape)?;
        attention::attention(self.fast.gpu(), &qkv.buf, &mut y.buf, dims)?;
        Ok(y)
    }

    fn prepend_mean(&self, x: &GpuTensor, pos: &GpuTensor) -> Result<GpuTensor> {
        self.fast.prepend_mean(x, pos)
    }

    fn token0(&self, x: &GpuTensor) -> Result<GpuTensor> {
        self.fast.token0(x)
    }

    fn conv_bwd(&self, dy: &GpuTensor, c: &F32Conv) -> Result<GpuTensor> {
        shapes::conv_bwd(&dy.shape, c.cin, c.cout)?;
        let (b, h, w, _) = nhwc(&dy.shape)?;
        let d = ConvDims {
            b,
            h,
            w,
            cin: c.cout,
            cout: c.cin,
            k: c.k,
        };
        let wt = ConvWeights {
            wmat: &c.bwd,
            bias: None,
        };
        self.product(dy, wt, d)
    }

    fn group_norm_bwd(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        ss: Option<&GpuTensor>,
        silu: bool,
        dy: &GpuTensor,
    ) -> Result<GpuTensor> {
        self.fast.group_norm_bwd(x, gamma, beta, ss, silu, dy)
    }

    fn avg_pool2_bwd(&self, dy: &GpuTensor) -> Result<GpuTensor> {
        self.fast.avg_pool2_bwd(dy)
    }

    fn attention_bwd(
        &self,
        qkv: &GpuTensor,
        dout: &GpuTensor,
        heads: usize,
        legacy: bool,
    ) -> Result<GpuTensor> {
        let shape = shapes::attention_bwd(&qkv.shape, &dout.shape, heads)?;
        let dims = Self::dims(&dout.shape, heads, legacy)?;
        let mut dqkv = self.fast.output("attention_bwd", shape)?;
        let g = self.fast.gpu();
        attention::attention_bwd(g, &qkv.buf, &dout.buf, &mut dqkv.buf, dims)?;
        Ok(dqkv)
    }

    fn prepend_mean_bwd(&self, dtok: &GpuTensor, hw: (usize, usize)) -> Result<GpuTensor> {
        self.fast.prepend_mean_bwd(dtok, hw)
    }

    fn token0_bwd(&self, d0: &GpuTensor, tokens: usize) -> Result<GpuTensor> {
        self.fast.token0_bwd(d0, tokens)
    }

    fn log_softmax_grad(&self, logits: &GpuTensor, y: &[usize]) -> Result<GpuTensor> {
        self.fast.log_softmax_grad(logits, y)
    }

    fn duplicate(&self, t: &GpuTensor) -> Result<GpuTensor> {
        self.fast.duplicate(t)
    }

    fn copy_into(&self, dst: &mut GpuTensor, src: &GpuTensor) -> Result<()> {
        self.fast.copy_into(dst, src)
    }

    fn flag_non_finite(&self, t: &GpuTensor, flag: &mut GpuTensor, stage: u32) -> Result<()> {
        self.fast.flag_non_finite(t, flag, stage)
    }

    fn ddim_invert(&self, x: &mut GpuTensor, eps: &GpuTensor, c: DdimCoefs) -> Result<()> {
        self.fast.ddim_invert(x, eps, c)
    }

    fn ddim_denoise(&self, x: &mut GpuTensor, eps: &GpuTensor, c: DdimCoefs) -> Result<()> {
        self.fast.ddim_denoise(x, eps, c)
    }

    fn axpy(&self, x: &mut GpuTensor, s: f32, g: &GpuTensor) -> Result<()> {
        self.fast.axpy(x, s, g)
    }

    fn axpby(&self, a: f32, x: &GpuTensor, b: f32, y: &GpuTensor) -> Result<GpuTensor> {
        self.fast.axpby(a, x, b, y)
    }

    fn normalize(&self, raw: &GpuTensor) -> Result<GpuTensor> {
        self.fast.normalize(raw)
    }

    fn anomaly(
        &self,
        x0: &GpuTensor,
        xhat: &GpuTensor,
        hist_match: bool,
    ) -> Result<Anomaly<GpuTensor>> {
        self.fast.anomaly(x0, xhat, hist_match)
    }
}
