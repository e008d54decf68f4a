//! `Backend` on one CUDA device: tensors are float32 buffers on the Gpu's
//! stream. Convolutions run on the implicit-GEMM tensor-core kernels
//! (kernels/igemm.cu: 3xTF32 in fp32, bf16 / fp16 operands otherwise) with
//! their producers' GroupNorm, SiLU and resampling fused in, attention on
//! the flash kernels (kernels/flash.cu); the reference backend
//! (`Cuda::reference`) keeps the simple path, im2col + cuBLAS SGEMM
//! (kernels/conv.cu), SIMT attention and one kernel per op. The
//! CPU backend (`crate::backend::cpu`) is the reference every op is tested
//! against; its shape checks and error messages are repeated here.

use std::cell::{Cell, Ref, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{ensure, Context, Result};
use cudarc::cublas::sys::cublasMath_t;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use cudarc::driver::{CudaGraph, CudaSlice};

use super::conv::ConvDims;
use super::igemm::{self, Arith, FusedDims, PackedWeights};
use super::{attention, attention_gemm, conv, ddim, flash, norm, ops, post, Gpu};
use crate::backend::cpu::Cpu;
use crate::backend::{compose_conv_fused, nhwc, same_shape, Backend, ConvPost, ConvPre, Resample};
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

/// A convolution's weights on the device, in the layout of
/// `crate::backend::cpu::CpuConv`: `fwd` (k*k*cin) x cout, `bwd` (the
/// flipped, transposed kernel) (k*k*cout) x cin; plus both repacked for the
/// tensor-core kernels (absent on the reference backend).
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

impl crate::backend::Shaped for GpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

pub struct Cuda {
    gpu: Gpu,
    blas: CudaBlas,
    precision: Precision,
    /// The simple kernels only: im2col + SGEMM convolutions, unfused ops,
    /// SIMT attention; the oracle the fast path is tested against.
    reference: bool,
    poison: AtomicBool,
    /// `repeat`'s recordings by key, whether it records at all, and how
    /// many recorded steps it has launched.
    recordings: RefCell<HashMap<usize, Recording>>,
    graphs: Cell<bool>,
    graph_launches: Cell<usize>,
    /// Label vectors already on the device: a recorded step must not copy
    /// from the host, and the sampler's labels are the same every step.
    labels: RefCell<HashMap<Vec<u32>, CudaSlice<u32>>>,
}

/// Where `repeat` stands for one key.
enum Recording {
    /// Run once directly (which also loads every kernel it needs).
    Seen,
    /// Captured: replayed from now on.
    Graph(CudaGraph),
    /// Capture failed: run directly from now on.
    Direct,
}

/// Distinct label vectors kept on the device before the cache starts over.
const LABEL_CACHE: usize = 64;

/// GroupNorm's operands checked as the CPU backend checks them; (b, hw, c).
fn gn_dims(
    x: &GpuTensor,
    gamma: &GpuTensor,
    beta: &GpuTensor,
    ss: Option<&GpuTensor>,
) -> Result<(usize, usize, usize)> {
    const GROUPS: usize = 32;
    let (b, h, w, c) = nhwc(x)?;
    ensure!(
        c % GROUPS == 0,
        "group_norm: {c} channels are not a multiple of {GROUPS}"
    );
    ensure!(
        gamma.buf.len() == c && beta.buf.len() == c,
        "group_norm: affine of {} / {} for {c} channels",
        gamma.buf.len(),
        beta.buf.len()
    );
    if let Some(ss) = ss {
        ensure!(
            ss.shape == [b, 1, 1, 2 * c],
            "group_norm: scale/shift {:?} for x {:?}",
            ss.shape,
            x.shape
        );
    }
    Ok((b, h * w, c))
}

impl Cuda {
    /// Opens device `ordinal` (see `Gpu::new`) and a cuBLAS handle on its
    /// stream, in the float32 parity mode.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Cuda::with_precision(ordinal, Precision::Fp32)
    }

    /// `new` in a given precision mode; convolutions prepared by this
    /// backend carry the weights that mode needs.
    pub fn with_precision(ordinal: usize, precision: Precision) -> Result<Cuda> {
        Cuda::open(ordinal, precision, false)
    }

    /// float32 on the simple kernels only (im2col + cuBLAS SGEMM
    /// convolutions, one op per kernel, SIMT attention): the reference the
    /// fast kernels are checked against on the GPU.
    pub fn reference(ordinal: usize) -> Result<Cuda> {
        Cuda::open(ordinal, Precision::Fp32, true)
    }

    fn open(ordinal: usize, precision: Precision, reference: bool) -> Result<Cuda> {
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
            reference,
            poison: AtomicBool::new(false),
            recordings: RefCell::new(HashMap::new()),
            graphs: Cell::new(true),
            graph_launches: Cell::new(0),
            labels: RefCell::new(HashMap::new()),
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
        self.graphs.set(on);
        self.end_repeats();
    }

    /// How many recorded steps `repeat` has launched so far.
    pub fn graph_launches(&self) -> usize {
        self.graph_launches.get()
    }

    /// Debug aid: when on, every output buffer is filled with NaN before its
    /// kernel runs, so that an element a kernel fails to write shows up as
    /// NaN instead of as whatever the allocator handed out.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// An output tensor, uninitialised: the op that asks for it writes every
    /// element.
    fn output(&self, op: &str, shape: Vec<usize>) -> Result<GpuTensor> {
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
        if self.poison.load(Ordering::Relaxed) {
            ops::fill(&self.gpu, &mut buf, f32::NAN)?;
        }
        Ok(GpuTensor { buf, shape })
    }

    /// One tensor-core convolution with its prologue and epilogue.
    fn conv_packed(
        &self,
        x: &GpuTensor,
        c: &GpuConv,
        w: &PackedWeights,
        pre: &ConvPre<'_, GpuTensor>,
        post: &ConvPost<'_, GpuTensor>,
    ) -> Result<GpuTensor> {
        let (b, sh, sw, c1) = nhwc(x)?;
        let cin = match pre.skip {
            None => c1,
            Some(s) => {
                let (b2, h2, w2, c2) = nhwc(s)?;
                ensure!(
                    (b2, h2, w2) == (b, sh, sw),
                    "concat: shapes {:?} and {:?} differ outside channels",
                    x.shape,
                    s.shape
                );
                c1 + c2
            }
        };
        ensure!(
            cin == c.cin,
            "conv: input has {cin} channels, the weights expect {}",
            c.cin
        );
        let (h, w_) = match pre.resample {
            Resample::None => (sh, sw),
            Resample::Up => (2 * sh, 2 * sw),
            Resample::Down => {
                ensure!(
                    sh.is_multiple_of(2) && sw.is_multiple_of(2),
                    "avg_pool2: odd spatial size {sh} x {sw}"
                );
                (sh / 2, sw / 2)
            }
        };
        let out_shape = vec![b, h, w_, c.cout];
        if let Some(e) = post.bcast {
            ensure!(
                e.shape == [b, 1, 1, c.cout],
                "add: cannot broadcast {:?} onto {:?}",
                e.shape,
                out_shape
            );
        }
        if let Some(r) = post.residual {
            ensure!(
                r.shape == out_shape,
                "add: shapes {:?} and {:?} differ",
                out_shape,
                r.shape
            );
        }
        let affine = match &pre.norm {
            None => None,
            Some(n) => {
                let src = match pre.skip {
                    None => {
                        gn_dims(x, n.gamma, n.beta, n.ss)?;
                        norm::Source::One(&x.buf)
                    }
                    Some(s) => norm::Source::Concat(&x.buf, &s.buf, c1),
                };
                let mut a = self.output("group_norm_affine", vec![b, 1, 1, 2 * cin])?;
                norm::group_norm_affine(
                    &self.gpu,
                    src,
                    b,
                    sh * sw,
                    cin,
                    &n.gamma.buf,
                    &n.beta.buf,
                    n.ss.map(|s| &s.buf),
                    &mut a.buf,
                )?;
                Some(a)
            }
        };
        let mut y = self.output("conv", out_shape)?;
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
        igemm::conv(&self.gpu, &op, w, d, &mut y.buf)?;
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
                matches!(
                    self.gpu.stream().capture_status(),
                    Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
                ),
                "{op}: new labels while recording a CUDA graph"
            );
            let dev = self.upload_indices(op, v)?;
            let mut cache = self.labels.borrow_mut();
            // Recorded graphs read cached buffers: never free one under them.
            if cache.len() >= LABEL_CACHE && self.recordings.borrow().is_empty() {
                cache.clear();
            }
            cache.insert(key.clone(), dev);
        }
        Ok(Ref::map(self.labels.borrow(), |m| &m[&key]))
    }

    fn launch(&self, g: &CudaGraph) -> Result<()> {
        g.launch().context("launching a recorded sampler step")?;
        self.graph_launches.set(self.graph_launches.get() + 1);
        Ok(())
    }

    /// Captures `body` as a CUDA graph and uploads it (nothing runs yet).
    /// On any failure the stream is left out of capture mode, so that the
    /// caller can run `body` directly.
    fn record(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        let stream = self.gpu.stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("beginning a CUDA graph capture")?;
        let ran = body();
        // cudarc keeps errors raised in drops (a free refused by an
        // invalidated capture) and returns them from the next call, which
        // would make end_capture fail before it ends the capture.
        let dropped = self.gpu.context().check_err();
        // Allocations the step makes and frees are graph-owned; auto-free
        // covers any the capture would otherwise leave live between launches.
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        if graph.is_err() {
            self.abandon_capture();
        }
        ran.context("recording the step")?;
        dropped.context("a buffer freed while recording")?;
        let graph = graph
            .context("ending the CUDA graph capture")?
            .context("the captured step is empty")?;
        graph.upload().context("uploading the recorded step")?;
        Ok(graph)
    }

    /// Ends a capture that `end_capture` could not, dropping its graph.
    fn abandon_capture(&self) {
        let stream = self.gpu.stream();
        if matches!(
            stream.capture_status(),
            Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        ) {
            return;
        }
        // SAFETY: this Gpu's live stream, capturing (checked above); a graph
        // it returns is ours to destroy and is not used afterwards.
        unsafe {
            if let Ok(g) = cudarc::driver::result::stream::end_capture(stream.cu_stream()) {
                if !g.is_null() {
                    let _ = cudarc::driver::result::graph::destroy(g);
                }
            }
        }
        let _ = self.gpu.context().check_err();
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

    fn upload_f32(&self, what: &str, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.gpu.stream().clone_htod(v).with_context(|| {
            format!(
                "uploading {what} ({} floats, {} MiB) to {}",
                v.len(),
                (v.len() * 4) >> 20,
                self.gpu.name()
            )
        })
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
            buf: self.upload_f32(&what, &t.data)?,
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
        // The CPU backend checks the shapes and lays the matrices out; the
        // device gets exactly those matrices.
        let c = Cpu.prepare_conv(w, bias)?;
        let what = |m: &str| {
            format!(
                "{m} of a {}x{} convolution {} -> {}",
                c.k, c.k, c.cin, c.cout
            )
        };
        let fwd = self.upload_f32(&what("weights"), &c.fwd)?;
        let bwd = self.upload_f32(&what("backward weights"), &c.bwd)?;
        let packed = if self.reference {
            None
        } else {
            let arith = Arith::for_precision(self.precision);
            let kk = c.k * c.k;
            Some(PackedConv {
                fwd: igemm::pack_weights(&self.gpu, arith, &fwd, kk * c.cin, c.cout)
                    .with_context(|| what("packing the weights"))?,
                bwd: igemm::pack_weights(&self.gpu, arith, &bwd, kk * c.cout, c.cin)
                    .with_context(|| what("packing the backward weights"))?,
                zero_bias: self.upload_f32(&what("zero bias"), &vec![0.0; c.cin])?,
            })
        };
        Ok(GpuConv {
            k: c.k,
            cin: c.cin,
            cout: c.cout,
            fwd,
            bwd,
            bias: self.upload_f32(&what("bias"), &c.bias)?,
            packed,
        })
    }

    fn conv(&self, x: &GpuTensor, c: &GpuConv) -> Result<GpuTensor> {
        let (b, h, w, cin) = nhwc(x)?;
        ensure!(
            cin == c.cin,
            "conv: input has {cin} channels, the weights expect {}",
            c.cin
        );
        if let Some(p) = &c.packed {
            return self.conv_packed(x, c, &p.fwd, &ConvPre::default(), &ConvPost::default());
        }
        let mut y = self.output("conv", vec![b, h, w, c.cout])?;
        let d = ConvDims {
            b,
            h,
            w,
            cin,
            cout: c.cout,
            k: c.k,
        };
        conv::conv(
            &self.gpu,
            &self.blas,
            &x.buf,
            &c.fwd,
            Some(&c.bias),
            d,
            &mut y.buf,
        )?;
        Ok(y)
    }

    fn conv_fused(
        &self,
        x: &GpuTensor,
        c: &GpuConv,
        pre: &ConvPre<'_, GpuTensor>,
        post: &ConvPost<'_, GpuTensor>,
    ) -> Result<GpuTensor> {
        let c1 = pre.skip.map(|_| x.shape.last().copied().unwrap_or(0));
        match &c.packed {
            Some(p) if igemm::fuses(&p.fwd, c.cin, pre.resample, c1) => {
                self.conv_packed(x, c, &p.fwd, pre, post)
            }
            _ => compose_conv_fused(self, x, c, pre, post),
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
        let (b, hw, c) = gn_dims(x, gamma, beta, ss)?;
        let mut y = self.output("group_norm", x.shape.clone())?;
        norm::group_norm(
            &self.gpu,
            &x.buf,
            &mut y.buf,
            b,
            hw,
            c,
            &gamma.buf,
            &beta.buf,
            ss.map(|s| &s.buf),
            silu,
        )?;
        Ok(y)
    }

    fn silu(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let mut y = self.output("silu", x.shape.clone())?;
        ops::silu(&self.gpu, &x.buf, &mut y.buf)?;
        Ok(y)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        if a.shape == b.shape {
            let mut y = self.output("add", a.shape.clone())?;
            ops::add(&self.gpu, &a.buf, &b.buf, &mut y.buf)?;
            return Ok(y);
        }
        let (n, h, w, c) = nhwc(a)?;
        ensure!(
            b.shape == [n, 1, 1, c],
            "add: cannot broadcast {:?} onto {:?}",
            b.shape,
            a.shape
        );
        let mut y = self.output("add", a.shape.clone())?;
        ops::add_bcast(&self.gpu, &a.buf, &b.buf, &mut y.buf, [n, h * w, c])?;
        Ok(y)
    }

    fn avg_pool2(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(x)?;
        ensure!(
            h % 2 == 0 && w % 2 == 0,
            "avg_pool2: odd spatial size {h} x {w}"
        );
        let mut y = self.output("avg_pool2", vec![b, h / 2, w / 2, c])?;
        ops::avg_pool2(&self.gpu, &x.buf, &mut y.buf, [b, h, w, c])?;
        Ok(y)
    }

    fn upsample2(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(x)?;
        let mut y = self.output("upsample2", vec![b, 2 * h, 2 * w, c])?;
        ops::upsample2(&self.gpu, &x.buf, &mut y.buf, [b, h, w, c])?;
        Ok(y)
    }

    fn concat(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        let (n, h, w, ca) = nhwc(a)?;
        let (n2, h2, w2, cb) = nhwc(b)?;
        ensure!(
            (n, h, w) == (n2, h2, w2),
            "concat: shapes {:?} and {:?} differ outside channels",
            a.shape,
            b.shape
        );
        let mut y = self.output("concat", vec![n, h, w, ca + cb])?;
        ops::concat(&self.gpu, &a.buf, &b.buf, &mut y.buf, [n * h * w, ca, cb])?;
        Ok(y)
    }

    fn timestep_embedding(&self, ts: &[usize], dim: usize) -> Result<GpuTensor> {
        ensure!(
            dim >= 2 && dim.is_multiple_of(2),
            "timestep embedding of odd width {dim}"
        );
        let ts_dev = self.upload_indices("timestep_embedding", ts)?;
        let mut y = self.output("timestep_embedding", vec![ts.len(), 1, 1, dim])?;
        ops::timestep_embedding(&self.gpu, &ts_dev, &mut y.buf, dim / 2)?;
        Ok(y)
    }

    fn add_rows(&self, x: &GpuTensor, table: &GpuTensor, rows: &[usize]) -> Result<GpuTensor> {
        let (b, h, w, dim) = nhwc(x)?;
        ensure!(
            h * w == 1,
            "add_rows: x {:?} is not one vector per batch item",
            x.shape
        );
        ensure!(
            table.shape.len() == 2 && table.shape[1] == dim,
            "add_rows: table {:?} for width {dim}",
            table.shape
        );
        ensure!(
            rows.len() == b,
            "add_rows: {} rows for a batch of {b}",
            rows.len()
        );
        for &r in rows {
            ensure!(
                r < table.shape[0],
                "label {r} is out of range: the embedding has {} classes",
                table.shape[0]
            );
        }
        let rows_dev = self.upload_indices("add_rows", rows)?;
        let mut y = self.output("add_rows", x.shape.clone())?;
        ops::add_rows(&self.gpu, &x.buf, &table.buf, &rows_dev, &mut y.buf, dim)?;
        Ok(y)
    }

    fn attention(&self, qkv: &GpuTensor, heads: usize, legacy: bool) -> Result<GpuTensor> {
        let (b, h, w, c3) = nhwc(qkv)?;
        ensure!(
            heads > 0 && c3 % (3 * heads) == 0,
            "attention: {c3} qkv channels for {heads} heads"
        );
        let c = c3 / 3;
        let mut y = self.output("attention", vec![b, h, w, c])?;
        match self.precision.half() {
            Some(half) => flash::attention_fast(
                &self.gpu,
                half,
                &qkv.buf,
                &mut y.buf,
                b,
                h * w,
                c,
                heads,
                legacy,
            )?,
            None if self.reference => {
                attention::attention(&self.gpu, &qkv.buf, &mut y.buf, b, h * w, c, heads, legacy)?
            }
            None => flash::attention_tf32x3(
                &self.gpu,
                &qkv.buf,
                &mut y.buf,
                b,
                h * w,
                c,
                heads,
                legacy,
            )?,
        }
        Ok(y)
    }

    fn prepend_mean(&self, x: &GpuTensor, pos: &GpuTensor) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(x)?;
        let t = h * w;
        ensure!(
            pos.shape == [t + 1, c],
            "positional embedding {:?} for {} tokens of {c} channels",
            pos.shape,
            t + 1
        );
        let mut y = self.output("prepend_mean", vec![b, 1, t + 1, c])?;
        ops::prepend_mean(&self.gpu, &x.buf, &pos.buf, &mut y.buf, [b, t, c])?;
        Ok(y)
    }

    fn token0(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(x)?;
        let mut y = self.output("token0", vec![b, 1, 1, c])?;
        ops::token0(&self.gpu, &x.buf, &mut y.buf, [b, h * w, c])?;
        Ok(y)
    }

    fn conv_bwd(&self, dy: &GpuTensor, c: &GpuConv) -> Result<GpuTensor> {
        let (b, h, w, co) = nhwc(dy)?;
        ensure!(
            co == c.cout,
            "conv_bwd: gradient has {co} channels, the weights give {}",
            c.cout
        );
        if let Some(p) = &c.packed {
            let mut dx = self.output("conv_bwd", vec![b, h, w, c.cin])?;
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
                bias: &p.zero_bias,
                bvec: None,
                res: None,
            };
            igemm::conv(&self.gpu, &op, &p.bwd, d, &mut dx.buf)?;
            return Ok(dx);
        }
        let mut dx = self.output("conv_bwd", vec![b, h, w, c.cin])?;
        let d = ConvDims {
            b,
            h,
            w,
            cin: c.cout,
            cout: c.cin,
            k: c.k,
        };
        conv::conv(&self.gpu, &self.blas, &dy.buf, &c.bwd, None, d, &mut dx.buf)?;
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
        same_shape(x, dy, "group_norm_bwd")?;
        let (b, hw, c) = gn_dims(x, gamma, beta, ss)?;
        let mut dx = self.output("group_norm_bwd", x.shape.clone())?;
        norm::group_norm_bwd(
            &self.gpu,
            &x.buf,
            &dy.buf,
            &mut dx.buf,
            b,
            hw,
            c,
            &gamma.buf,
            &beta.buf,
            ss.map(|s| &s.buf),
            silu,
        )?;
        Ok(dx)
    }

    fn avg_pool2_bwd(&self, dy: &GpuTensor) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(dy)?;
        let mut dx = self.output("avg_pool2_bwd", vec![b, 2 * h, 2 * w, c])?;
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
        let (b, h, w, c3) = nhwc(qkv)?;
        ensure!(
            heads > 0 && c3 % (3 * heads) == 0,
            "attention_bwd: {c3} qkv channels for {heads} heads"
        );
        let c = c3 / 3;
        ensure!(
            dout.shape == [b, h, w, c],
            "attention_bwd: gradient {:?} for qkv {:?}",
            dout.shape,
            qkv.shape
        );
        let mut dqkv = self.output("attention_bwd", qkv.shape.clone())?;
        if !self.reference {
            attention_gemm::attention_bwd(
                &self.gpu,
                &self.blas,
                &qkv.buf,
                &dout.buf,
                &mut dqkv.buf,
                b,
                h * w,
                c,
                heads,
                legacy,
            )?;
            return Ok(dqkv);
        }
        attention::attention_bwd(
            &self.gpu,
            &qkv.buf,
            &dout.buf,
            &mut dqkv.buf,
            b,
            h * w,
            c,
            heads,
            legacy,
        )?;
        Ok(dqkv)
    }

    fn prepend_mean_bwd(&self, dtok: &GpuTensor, hw: (usize, usize)) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(dtok)?;
        let t1 = h * w;
        let t = hw.0 * hw.1;
        ensure!(
            t1 == t + 1,
            "prepend_mean_bwd: {t1} tokens for {} x {}",
            hw.0,
            hw.1
        );
        let mut dx = self.output("prepend_mean_bwd", vec![b, hw.0, hw.1, c])?;
        ops::prepend_mean_bwd(&self.gpu, &dtok.buf, &mut dx.buf, [b, t, c])?;
        Ok(dx)
    }

    fn token0_bwd(&self, d0: &GpuTensor, tokens: usize) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(d0)?;
        ensure!(
            h * w == 1,
            "token0_bwd: gradient {:?} is not one vector per batch item",
            d0.shape
        );
        ensure!(tokens > 0, "token0_bwd: a sequence of no tokens");
        let mut d = self.output("token0_bwd", vec![b, 1, tokens, c])?;
        ops::token0_bwd(&self.gpu, &d0.buf, &mut d.buf, [b, tokens, c])?;
        Ok(d)
    }

    fn log_softmax_grad(&self, logits: &GpuTensor, y: &[usize]) -> Result<GpuTensor> {
        let (b, h, w, k) = nhwc(logits)?;
        ensure!(
            h * w == 1,
            "log_softmax_grad: logits {:?} are not one vector per batch item",
            logits.shape
        );
        ensure!(
            y.len() == b,
            "log_softmax_grad: {} labels for a batch of {b}",
            y.len()
        );
        for &label in y {
            ensure!(
                label < k,
                "label {label} is out of range for {k} classifier outputs"
            );
        }
        let labels = self.cached_labels("log_softmax_grad", y)?;
        let mut g = self.output("log_softmax_grad", logits.shape.clone())?;
        ops::log_softmax_grad(&self.gpu, &logits.buf, &labels, &mut g.buf, k)?;
        Ok(g)
    }

    fn duplicate(&self, t: &GpuTensor) -> Result<GpuTensor> {
        let mut out = self.output("duplicate", t.shape.clone())?;
        self.copy_into(&mut out, t)?;
        Ok(out)
    }

    fn copy_into(&self, dst: &mut GpuTensor, src: &GpuTensor) -> Result<()> {
        same_shape(dst, src, "copy_into")?;
        self.gpu
            .stream()
            .memcpy_dtod(&src.buf, &mut dst.buf)
            .with_context(|| format!("copying a tensor of shape {:?}", src.shape))
    }

    /// The first call runs `body` directly, the second captures it as a
    /// CUDA graph and launches that, later ones launch the graph: one launch
    /// instead of hundreds per network pass, with no allocation or host
    /// work. A capture that fails (an op the graph cannot hold) falls back
    /// to direct runs, with a warning. The reference backend and poisoned
    /// outputs run directly.
    fn repeat(&self, key: usize, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        // Without stream-ordered allocation every allocation would break the
        // capture.
        if self.reference
            || !self.graphs.get()
            || self.poison.load(Ordering::Relaxed)
            || !self.gpu.context().has_async_alloc()
        {
            return body();
        }
        let state = self.recordings.borrow_mut().remove(&key);
        let (result, next) = match state {
            None => (body(), Recording::Seen),
            Some(Recording::Direct) => (body(), Recording::Direct),
            Some(Recording::Graph(g)) => (self.launch(&g), Recording::Graph(g)),
            // The direct run's memory goes back to the pool before the
            // graph's own pool takes its working set.
            Some(Recording::Seen) => {
                match self.gpu.synchronize().and_then(|()| self.record(body)) {
                    Ok(g) => (self.launch(&g), Recording::Graph(g)),
                    Err(e) => {
                        eprintln!(
                            "fcd: warning: recording sampler step {key} as a CUDA graph failed \
                         ({e:#}); running it kernel by kernel"
                        );
                        (body(), Recording::Direct)
                    }
                }
            }
        };
        self.recordings.borrow_mut().insert(key, next);
        result
    }

    fn end_repeats(&self) {
        let mut recordings = self.recordings.borrow_mut();
        if recordings
            .values()
            .any(|r| matches!(r, Recording::Graph(_)))
        {
            // Graphs are destroyed only once their last launch is done;
            // a fault it hit is reported by the caller's next sync.
            let _ = self.gpu.synchronize();
        }
        recordings.clear();
    }

    fn ddim_invert(&self, x: &mut GpuTensor, eps: &GpuTensor, c: DdimCoefs) -> Result<()> {
        same_shape(x, eps, "ddim_invert")?;
        ddim::invert_step(&self.gpu, &mut x.buf, &eps.buf, c)
    }

    fn ddim_denoise(&self, x: &mut GpuTensor, eps: &GpuTensor, c: DdimCoefs) -> Result<()> {
        same_shape(x, eps, "ddim_denoise")?;
        ddim::denoise_step(&self.gpu, &mut x.buf, &eps.buf, c)
    }

    fn axpy(&self, x: &mut GpuTensor, s: f32, g: &GpuTensor) -> Result<()> {
        same_shape(x, g, "axpy")?;
        ops::axpy(&self.gpu, &mut x.buf, s, &g.buf)
    }

    fn axpby(&self, a: f32, x: &GpuTensor, b: f32, y: &GpuTensor) -> Result<GpuTensor> {
        same_shape(x, y, "axpby")?;
        let mut out = self.output("axpby", x.shape.clone())?;
        ops::axpby(&self.gpu, a, &x.buf, b, &y.buf, &mut out.buf)?;
        Ok(out)
    }

    fn normalize(&self, raw: &GpuTensor) -> Result<GpuTensor> {
        let (b, h, w, c) = nhwc(raw)?;
        ensure!(c == 1, "normalize: slices have one channel, got {c}");
        let mut y = self.output("normalize", raw.shape.clone())?;
        post::normalize(&self.gpu, &raw.buf, &mut y.buf, b, h * w)?;
        Ok(y)
    }

    fn anomaly(&self, x0: &GpuTensor, xhat: &GpuTensor, hist_match: bool) -> Result<GpuTensor> {
        same_shape(x0, xhat, "anomaly")?;
        let (b, h, w, c) = nhwc(x0)?;
        ensure!(c == 1, "anomaly: slices have one channel, got {c}");
        let mut y = self.output("anomaly", x0.shape.clone())?;
        post::anomaly(
            &self.gpu,
            &x0.buf,
            &xhat.buf,
            &mut y.buf,
            b,
            h * w,
            hist_match,
        )?;
        Ok(y)
    }
}
