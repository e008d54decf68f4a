//! `Backend` on one CUDA device: tensors are float32 buffers on the Gpu's
//! stream. Convolutions run on the implicit-GEMM tensor-core kernels
//! (kernels/igemm.cu: 3xTF32 in fp32, TF32 in tf32, bf16 / fp16 operands
//! otherwise) with their producers' GroupNorm, SiLU and resampling fused
//! in, or in the 16-bit modes on version 2 (kernels/igemm2.cu) where the
//! kernel table (`dispatch`) says it won; attention on the flash kernels
//! (kernels/flash.cu). The CPU reference (`crate::backend::cpu_ref`) is what
//! every op is tested against, and the lab's `CudaRef` (im2col + cuBLAS
//! SGEMM, SIMT attention, one kernel per op) the GPU oracle of the whole
//! networks; all check shapes with `crate::backend::shapes`.

use std::cell::{Ref, RefCell};
use std::collections::HashMap;
#[cfg(feature = "lab")]
use std::{
    cell::Cell,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{ensure, Context, Result};
use cudarc::cublas::sys::cublasMath_t;
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;

use super::attention::AttnDims;
use super::conv_plan::{self, GpuConv};
#[cfg(feature = "lab")]
use super::dispatch::ConvKernel;
use super::dispatch::{self, ConvShape, Table};
use super::graph::{self, Graphs};
use super::igemm::{self, Arith, FusedDims, PackedWeights};
use super::norm::{NormDims, NormParams};
use super::{attention_gemm, ddim, flash, norm, ops, post, Gpu};
use crate::backend::shapes::{self, nhwc};
use crate::backend::{
    compose_conv_fused, flag_value, Anomaly, Backend, ConvPost, ConvPre, Resample,
};
use crate::ddim::DdimCoefs;
use crate::precision::Precision;
use crate::tensor::Tensor;

/// A device tensor. Cloning copies the buffer on the stream (and, as
/// cudarc's `Clone` does, panics if the device is out of memory).
#[derive(Clone, Debug)]
pub struct GpuTensor {
    pub buf: CudaSlice<f32>,
    pub shape: Vec<usize>,
}

pub struct Cuda {
    gpu: Gpu,
    blas: CudaBlas,
    precision: Precision,
    graphs: Graphs,
    /// Label vectors already on the device: a recorded step must not copy
    /// from the host, and the sampler's labels are the same every step.
    labels: RefCell<HashMap<Vec<u32>, CudaSlice<u32>>>,
    /// Which convolution kernel runs each shape.
    table: Table,
    #[cfg(feature = "lab")]
    pub(crate) knobs: Knobs,
}

/// What the lab turns in a `Cuda` to test it (`crate::lab::knobs`).
#[cfg(feature = "lab")]
#[derive(Default)]
pub(crate) struct Knobs {
    /// Every output filled with NaN before its kernel runs.
    pub(crate) poison: AtomicBool,
    /// The convolution kernel of every shape, overriding the table.
    pub(crate) forced: Cell<Option<ConvKernel>>,
}

/// Distinct label vectors kept on the device before the cache starts over.
const LABEL_CACHE: usize = 64;

impl Cuda {
    /// Opens device `ordinal` (see `Gpu::new`) and a cuBLAS handle on its
    /// stream, in the float32 parity mode.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Cuda::with_precision(ordinal, Precision::Fp32)
    }

    /// `new` in a given precision mode; convolutions prepared by this
    /// backend carry the weights that mode needs.
    pub fn with_precision(ordinal: usize, precision: Precision) -> Result<Cuda> {
        let gpu = Gpu::new(ordinal)?;
        // SAFETY: only tries to load the library; cudarc would panic on the
        // first cuBLAS call without it.
        let present = unsafe { cudarc::cublas::sys::is_culib_present() };
        ensure!(
            present,
            "cuBLAS (libcublas.so) was not found on the library path; install the \
             nvidia-cublas-cu12 wheel or a CUDA toolkit and add its lib directory to \
             LD_LIBRARY_PATH"
        );
        let blas = CudaBlas::new(gpu.stream().clone()).context("creating a cuBLAS handle")?;
        // SAFETY: a live handle; the default math mode (no TF32) is what the
        // float32 parity with the CPU reference relies on, so it is set
        // explicitly rather than trusted.
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(
                *blas.handle(),
                cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
        }
        .result()
        .context("setting cuBLAS's math mode")?;
        Ok(Cuda {
            gpu,
            blas,
            precision,
            graphs: Graphs::new(),
            labels: RefCell::new(HashMap::new()),
            table: Table::load()?,
            #[cfg(feature = "lab")]
            knobs: Knobs::default(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether `repeat` records CUDA graphs (on by default; off runs every
    /// step kernel by kernel, the same work).
    pub fn set_graphs(&self, on: bool) {
        self.graphs.set_on(&self.gpu, on);
    }

    /// The packed convolution `d` with the table's kernel (or the lab's).
    fn run_conv(
        &self,
        op: &igemm::Operands<'_>,
        w: &PackedWeights,
        d: FusedDims,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        #[cfg(feature = "lab")]
        if let Some(k) = self.knobs.forced.get() {
            return dispatch::conv(&self.gpu, k, op, w, d, y);
        }
        let k = self.table.get(&ConvShape::new(self.precision, &d));
        dispatch::conv(&self.gpu, k, op, w, d, y)
    }

    /// Whether the lab asked for poisoned outputs.
    fn poisoned(&self) -> bool {
        #[cfg(feature = "lab")]
        return self.knobs.poison.load(Ordering::Relaxed);
        #[cfg(not(feature = "lab"))]
        false
    }

    /// How many recorded steps `repeat` has launched so far.
    pub fn graph_launches(&self) -> usize {
        self.graphs.launches()
    }

    /// An output tensor, uninitialised: the op that asks for it writes every
    /// element.
    pub(crate) fn output(&self, op: &str, shape: Vec<usize>) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        // SAFETY: every caller passes the buffer to a launcher that writes
        // all n elements before anything reads them (stream order).
        let mut buf = unsafe { self.gpu.stream().alloc::<f32>(n) }.with_context(|| {
            format!(
                "{op}: allocating an output of shape {shape:?} ({} MiB) on {}",
                (n * 4) >> 20,
                self.gpu.name()
            )
        })?;
        if self.poisoned() {
            ops::fill(&self.gpu, &mut buf, f32::NAN)?;
        }
        Ok(GpuTensor { buf, shape })
    }

    /// One tensor-core convolution with its prologue and epilogue, of
    /// operands `shapes::conv_fused` accepted.
    fn conv_packed(
        &self,
        x: &GpuTensor,
        c: &GpuConv,
        w: &PackedWeights,
        pre: &ConvPre<'_, GpuTensor>,
        post: &ConvPost<'_, GpuTensor>,
    ) -> Result<GpuTensor> {
        let (b, sh, sw, c1) = nhwc(&x.shape)?;
        let cin = c.cin;
        let (h, w_) = match pre.resample {
            Resample::None => (sh, sw),
            Resample::Up => (2 * sh, 2 * sw),
            Resample::Down => (sh / 2, sw / 2),
        };
        let affine = match &pre.norm {
            None => None,
            Some(n) => {
                let src = match pre.skip {
                    None => norm::Source::One(&x.buf),
                    Some(s) => norm::Source::Concat(&x.buf, &s.buf, c1),
                };
                let mut a = self.output("group_norm_affine", vec![b, 1, 1, 2 * cin])?;
                let p = norm_params(n.gamma, n.beta, n.ss, n.silu);
                let dims = NormDims {
                    b,
                    hw: sh * sw,
                    c: cin,
                };
                norm::group_norm_affine(&self.gpu, src, dims, p, &mut a.buf)?;
                Some(a)
            }
        };
        let mut y = self.output("conv", vec![b, h, w_, c.cout])?;
        let d = FusedDims {
            b,
            h,
            w: w_,
            cin,
            cout: c.cout,
            k: c.k,
            resample: pre.resample,
        };
        let op = igemm::Operands {
            x: &x.buf,
            x2: pre.skip.map(|s| (&s.buf, c1)),
            affine: affine.as_ref().map(|a| &a.buf),
            silu: pre.norm.as_ref().is_some_and(|n| n.silu),
            bias: &c.bias,
            bvec: post.bcast.map(|e| &e.buf),
            res: post.residual.map(|r| &r.buf),
        };
        self.run_conv(&op, w, d, &mut y.buf)?;
        Ok(y)
    }

    /// `upload_indices` through the label cache.
    fn cached_labels(&self, op: &str, v: &[usize]) -> Result<Ref<'_, CudaSlice<u32>>> {
        let key: Vec<u32> = v
            .iter()
            .map(|&i| u32::try_from(i).with_context(|| format!("{op}: label {i} out of range")))
            .collect::<Result<_>>()?;
        if !self.labels.borrow().contains_key(&key) {
            // An upload while recording would be graph-owned memory in a
            // cache that outlives the graph.
            ensure!(
                !graph::capturing(&self.gpu),
                "{op}: new labels while recording a CUDA graph"
            );
            let dev = self.upload_indices(op, v)?;
            let mut cache = self.labels.borrow_mut();
            // Recorded graphs read cached buffers: never free one under them.
            if cache.len() >= LABEL_CACHE && self.graphs.is_empty() {
                cache.clear();
            }
            cache.insert(key.clone(), dev);
        }
        Ok(Ref::map(self.labels.borrow(), |m| &m[&key]))
    }

    fn upload_indices(&self, op: &str, v: &[usize]) -> Result<CudaSlice<u32>> {
        let v: Vec<u32> = v
            .iter()
            .map(|&i| u32::try_from(i).with_context(|| format!("{op}: index {i} out of range")))
            .collect::<Result<_>>()?;
        self.gpu
            .stream()
            .clone_htod(&v)
            .with_context(|| format!("{op}: uploading {} indices", v.len()))
    }
}

/// The checked dimensions and the parameters of a GroupNorm of `x` (forward or backward).
fn norm_call<'a>(
    x: &GpuTensor,
    gamma: &'a GpuTensor,
    beta: &'a GpuTensor,
    ss: Option<&'a GpuTensor>,
    silu: bool,
) -> Result<(NormDims, NormParams<'a>)> {
    let shape = shapes::group_norm(
        &x.shape,
        &gamma.shape,
        &beta.shape,
        ss.map(|s| &s.shape[..]),
    )?;
    let (b, h, w, c) = nhwc(&shape)?;
    let dims = NormDims { b, hw: h * w, c };
    Ok((dims, norm_params(gamma, beta, ss, silu)))
}

/// The device buffers of `Backend::group_norm`'s parameters.
fn norm_params<'a>(
    gamma: &'a GpuTensor,
    beta: &'a GpuTensor,
    ss: Option<&'a GpuTensor>,
    silu: bool,
) -> NormParams<'a> {
    NormParams {
        gamma: &gamma.buf,
        beta: &beta.buf,
        ss: ss.map(|s| &s.buf),
        silu,
    }
}

impl Backend for Cuda {
    type T = GpuTensor;
    type Conv = GpuConv;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn free_bytes(&self) -> Result<Option<usize>> {
        Ok(Some(self.gpu.memory()?.0))
    }

    fn dims<'a>(&self, t: &'a GpuTensor) -> &'a [usize] {
        &t.shape
    }

    fn upload(&self, t: &Tensor) -> Result<GpuTensor> {
        let n: usize = t.shape.iter().product();
        ensure!(
            n == t.data.len(),
            "upload: shape {:?} needs {n} values, got {}",
            t.shape,
            t.data.len()
        );
        let what = format!("a tensor of shape {:?}", t.shape);
        Ok(GpuTensor {
            buf: self.gpu.upload_f32(&what, &t.data)?,
            shape: t.shape.clone(),
        })
    }

    fn download(&self, t: &GpuTensor) -> Result<Tensor> {
        let data = self
            .gpu
            .stream()
            .clone_dtoh(&t.buf)
            .with_context(|| format!("downloading a tensor of shape {:?}", t.shape))?;
        self.gpu.synchronize()?;
        Tensor::new(t.shape.clone(), data)
    }

    fn prepare_conv(&self, w: &Tensor, bias: &Tensor) -> Result<GpuConv> {
        conv_plan::prepare(&self.gpu, Arith::for_precision(self.precision), w, bias)
    }

    fn conv(&self, x: &GpuTensor, c: &GpuConv) -> Result<GpuTensor> {
        shapes::conv(&x.shape, c.cin, c.cout)?;
        self.conv_packed(x, c, &c.fwd, &ConvPre::default(), &ConvPost::default())
    }

    fn conv_fused(
        &self,
        x: &GpuTensor,
        c: &GpuConv,
        pre: &ConvPre<'_, GpuTensor>,
        post: &ConvPost<'_, GpuTensor>,
    ) -> Result<GpuTensor> {
        shapes::conv_fused(self, x, (c.cin, c.cout), pre, post)?;
        match conv_plan::fused(c, x, pre) {
            Some(w) => self.conv_packed(x, c, w, pre, post),
            None => compose_conv_fused(self, x, c, pre, post),
        }
    }

    fn group_norm(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        ss: Option<&GpuTensor>,
        silu: bool,
    ) -> Result<GpuTensor> {
        let (dims, params) = norm_call(x, gamma, beta, ss, silu)?;
        let mut y = self.output("group_norm", x.shape.clone())?;
        norm::group_norm(&self.gpu, &x.buf, &mut y.buf, dims, params)?;
        Ok(y)
    }

    fn silu(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let mut y = self.output("silu", x.shape.clone())?;
        ops::silu(&self.gpu, &x.buf, &mut y.buf)?;
        Ok(y)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::add(&a.shape, &b.shape)?;
        let mut y = self.output("add", shape)?;
        if a.shape == b.shape {
            ops::add(&self.gpu, &a.buf, &b.buf, &mut y.buf)?;
            return Ok(y);
        }
        let (n, h, w, c) = nhwc(&a.shape)?;
        ops::add_bcast(&self.gpu, &a.buf, &b.buf, &mut y.buf, [n, h * w, c])?;
        Ok(y)
    }

    fn avg_pool2(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::avg_pool2(&x.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let mut y = self.output("avg_pool2", shape)?;
        ops::avg_pool2(&self.gpu, &x.buf, &mut y.buf, [b, h, w, c])?;
        Ok(y)
    }

    fn upsample2(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::upsample2(&x.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let mut y = self.output("upsample2", shape)?;
        ops::upsample2(&self.gpu, &x.buf, &mut y.buf, [b, h, w, c])?;
        Ok(y)
    }

    fn concat(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::concat(&a.shape, &b.shape)?;
        let (n, h, w, ca) = nhwc(&a.shape)?;
        let cb = b.shape[3];
        let mut y = self.output("concat", shape)?;
        ops::concat(&self.gpu, &a.buf, &b.buf, &mut y.buf, [n * h * w, ca, cb])?;
        Ok(y)
    }

    fn timestep_embedding(&self, ts: &[usize], dim: usize) -> Result<GpuTensor> {
        let shape = shapes::timestep_embedding(ts.len(), dim)?;
        let ts_dev = self.upload_indices("timestep_embedding", ts)?;
        let mut y = self.output("timestep_embedding", shape)?;
        ops::timestep_embedding(&self.gpu, &ts_dev, &mut y.buf, dim / 2)?;
        Ok(y)
    }

    fn add_rows(&self, x: &GpuTensor, table: &GpuTensor, rows: &[usize]) -> Result<GpuTensor> {
        let shape = shapes::add_rows(&x.shape, &table.shape, rows)?;
        let dim = table.shape[1];
        let rows_dev = self.upload_indices("add_rows", rows)?;
        let mut y = self.output("add_rows", shape)?;
        ops::add_rows(&self.gpu, &x.buf, &table.buf, &rows_dev, &mut y.buf, dim)?;
        Ok(y)
    }

    fn attention(&self, qkv: &GpuTensor, heads: usize, legacy: bool) -> Result<GpuTensor> {
        let shape = shapes::attention(&qkv.shape, heads)?;
        let (b, h, w, c) = nhwc(&shape)?;
        let mut y = self.output("attention", shape)?;
        let dims = AttnDims {
            b,
            t: h * w,
            c,
            heads,
            legacy,
        };
        match self.precision.half() {
            Some(half) => flash::attention_fast(&self.gpu, half, &qkv.buf, &mut y.buf, dims)?,
            None => flash::attention_tf32x3(&self.gpu, &qkv.buf, &mut y.buf, dims)?,
        }
        Ok(y)
    }

    fn prepend_mean(&self, x: &GpuTensor, pos: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::prepend_mean(&x.shape, &pos.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let t = h * w;
        let mut y = self.output("prepend_mean", shape)?;
        ops::prepend_mean(&self.gpu, &x.buf, &pos.buf, &mut y.buf, [b, t, c])?;
        Ok(y)
    }

    fn token0(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::token0(&x.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let mut y = self.output("token0", shape)?;
        ops::token0(&self.gpu, &x.buf, &mut y.buf, [b, h * w, c])?;
        Ok(y)
    }

    fn conv_bwd(&self, dy: &GpuTensor, c: &GpuConv) -> Result<GpuTensor> {
        let shape = shapes::conv_bwd(&dy.shape, c.cin, c.cout)?;
        let (b, h, w, _) = nhwc(&dy.shape)?;
        let mut dx = self.output("conv_bwd", shape)?;
        let d = FusedDims {
            b,
            h,
            w,
            cin: c.cout,
            cout: c.cin,
            k: c.k,
            resample: Resample::None,
        };
        let op = igemm::Operands {
            x: &dy.buf,
            x2: None,
            affine: None,
            silu: false,
            bias: &c.zero_bias,
            bvec: None,
            res: None,
        };
        self.run_conv(&op, &c.bwd, d, &mut dx.buf)?;
        Ok(dx)
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
        shapes::same("group_norm_bwd", &x.shape, &dy.shape)?;
        let (dims, params) = norm_call(x, gamma, beta, ss, silu)?;
        let mut dx = self.output("group_norm_bwd", x.shape.clone())?;
        norm::group_norm_bwd(&self.gpu, &x.buf, &dy.buf, &mut dx.buf, dims, params)?;
        Ok(dx)
    }

    fn avg_pool2_bwd(&self, dy: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::upsample2(&dy.shape)?;
        let (b, h, w, c) = nhwc(&dy.shape)?;
        let mut dx = self.output("avg_pool2_bwd", shape)?;
        ops::avg_pool2_bwd(&self.gpu, &dy.buf, &mut dx.buf, [b, h, w, c])?;
        Ok(dx)
    }

    fn attention_bwd(
        &self,
        qkv: &GpuTensor,
        dout: &GpuTensor,
        heads: usize,
        legacy: bool,
    ) -> Result<GpuTensor> {
        let shape = shapes::attention_bwd(&qkv.shape, &dout.shape, heads)?;
        let (b, h, w, c) = nhwc(&dout.shape)?;
        let mut dqkv = self.output("attention_bwd", shape)?;
        let dims = AttnDims {
            b,
            t: h * w,
            c,
            heads,
            legacy,
        };
        let (qkv, dout) = (&qkv.buf, &dout.buf);
        attention_gemm::attention_bwd(&self.gpu, &self.blas, qkv, dout, &mut dqkv.buf, dims)?;
        Ok(dqkv)
    }

    fn prepend_mean_bwd(&self, dtok: &GpuTensor, hw: (usize, usize)) -> Result<GpuTensor> {
        let shape = shapes::prepend_mean_bwd(&dtok.shape, hw)?;
        let (b, _, _, c) = nhwc(&shape)?;
        let t = hw.0 * hw.1;
        let mut dx = self.output("prepend_mean_bwd", shape)?;
        ops::prepend_mean_bwd(&self.gpu, &dtok.buf, &mut dx.buf, [b, t, c])?;
        Ok(dx)
    }

    fn token0_bwd(&self, d0: &GpuTensor, tokens: usize) -> Result<GpuTensor> {
        let shape = shapes::token0_bwd(&d0.shape, tokens)?;
        let (b, _, _, c) = nhwc(&shape)?;
        let mut d = self.output("token0_bwd", shape)?;
        ops::token0_bwd(&self.gpu, &d0.buf, &mut d.buf, [b, tokens, c])?;
        Ok(d)
    }

    fn log_softmax_grad(&self, logits: &GpuTensor, y: &[usize]) -> Result<GpuTensor> {
        let shape = shapes::log_softmax_grad(&logits.shape, y)?;
        let k = shape[3];
        let labels = self.cached_labels("log_softmax_grad", y)?;
        let mut g = self.output("log_softmax_grad", shape)?;
        ops::log_softmax_grad(&self.gpu, &logits.buf, &labels, &mut g.buf, k)?;
        Ok(g)
    }

    fn duplicate(&self, t: &GpuTensor) -> Result<GpuTensor> {
        let mut out = self.output("duplicate", t.shape.clone())?;
        self.copy_into(&mut out, t)?;
        Ok(out)
    }

    fn copy_into(&self, dst: &mut GpuTensor, src: &GpuTensor) -> Result<()> {
        shapes::same("copy_into", &dst.shape, &src.shape)?;
        self.gpu
            .stream()
            .memcpy_dtod(&src.buf, &mut dst.buf)
            .with_context(|| format!("copying a tensor of shape {:?}", src.shape))
    }

    /// Recorded as a CUDA graph (see `graph`), except with poisoned outputs.
    fn repeat(&self, key: usize, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.graphs.repeat(&self.gpu, self.poisoned(), key, body)
    }

    fn end_repeats(&self) {
        self.graphs.end(&self.gpu);
    }

    fn ddim_invert(&self, x: &mut GpuTensor, eps: &GpuTensor, c: DdimCoefs) -> Result<()> {
        shapes::same("ddim_invert", &x.shape, &eps.shape)?;
        ddim::invert_step(&self.gpu, &mut x.buf, &eps.buf, c)
    }

    fn ddim_denoise(&self, x: &mut GpuTensor, eps: &GpuTensor, c: DdimCoefs) -> Result<()> {
        shapes::same("ddim_denoise", &x.shape, &eps.shape)?;
        ddim::denoise_step(&self.gpu, &mut x.buf, &eps.buf, c)
    }

    fn flag_non_finite(&self, t: &GpuTensor, flag: &mut GpuTensor, stage: u32) -> Result<()> {
        shapes::same("flag_non_finite", &flag.shape, &[1])?;
        ops::flag_non_finite(&self.gpu, &t.buf, &mut flag.buf, flag_value(stage)?)
    }

    fn axpy(&self, x: &mut GpuTensor, s: f32, g: &GpuTensor) -> Result<()> {
        shapes::same("axpy", &x.shape, &g.shape)?;
        ops::axpy(&self.gpu, &mut x.buf, s, &g.buf)
    }

    fn axpby(&self, a: f32, x: &GpuTensor, b: f32, y: &GpuTensor) -> Result<GpuTensor> {
        shapes::same("axpby", &x.shape, &y.shape)?;
        let mut out = self.output("axpby", x.shape.clone())?;
        ops::axpby(&self.gpu, a, &x.buf, b, &y.buf, &mut out.buf)?;
        Ok(out)
    }

    fn normalize(&self, raw: &GpuTensor) -> Result<GpuTensor> {
        let shape = shapes::normalize(&raw.shape)?;
        let (b, h, w, _) = nhwc(&shape)?;
        let mut y = self.output("normalize", shape)?;
        post::normalize(&self.gpu, &raw.buf, &mut y.buf, b, h * w)?;
        Ok(y)
    }

    fn anomaly(
        &self,
        x0: &GpuTensor,
        xhat: &GpuTensor,
        hist_match: bool,
    ) -> Result<Anomaly<GpuTensor>> {
        let shape = shapes::anomaly(&x0.shape, &xhat.shape)?;
        let (b, h, w, _) = nhwc(&shape)?;
        let mut map = self.output("anomaly", shape.clone())?;
        let mut difference = self.output("anomaly", shape)?;
        let outs = (&mut map.buf, &mut difference.buf);
        post::anomaly(&self.gpu, &x0.buf, &xhat.buf, outs, b, h * w, hist_match)?;
        Ok(Anomaly { map, difference })
    }
}
