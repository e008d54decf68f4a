//! The kernel tournament (`fcd bench --kernels`): every convolution kernel
//! version on every distinct layer shape of the two networks, and the
//! attention and GroupNorm kernels on theirs, each first checked against its
//! CPU twin on a small case of the same channels, then timed with CUDA
//! events at the run's batch. The report names each shape's winner in the
//! table format of `dispatch` (its `winners`), so that
//! `FCD_KERNEL_TABLE=report.json` runs the engine on them.
//!
//! Timing: the op as the network calls it on the `Cuda` backend (for a
//! convolution with GroupNorm in its prologue, the statistics pass is
//! included, the same for every version), after `WARMUP` untimed calls,
//! `reps` calls each between two events, the median; the input rotates over
//! enough buffers to exceed the L2 cache. The UNet's output blocks read
//! `[h, skip]` from two tensors; here the input is one tensor of the same
//! channels (the same GEMM; only the gather's pointer choice differs).

use anyhow::{Context, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;
use serde_json::{json, Value};

use std::collections::BTreeSet;

use super::layers::{distinct, layers, ConvLayer, Layers, Pre};
use super::twin::{self, ConvCase};
use crate::backend::cpu_ref::CpuRef;
use crate::backend::cuda::backend::{Cuda, GpuTensor};
use crate::backend::cuda::dispatch::{resample_label, ConvKernel, ConvShape};
use crate::backend::cuda::igemm::FusedDims;
use crate::backend::cuda::{ops, Gpu};
use crate::backend::{Backend, ConvPost, ConvPre, Norm, Resample};
use crate::config::Config;
use crate::model::spec::{NetKind, NetSpec};
use crate::precision::Precision;
use crate::tensor::rel_l2;

const WARMUP: usize = 3;
/// Bytes of input the timed calls rotate over: above the H100's 50 MB and
/// the H200's 60 MB of L2, so each call reads its input from memory, as in
/// the network.
const ROTATE_BYTES: usize = 128 << 20;

/// What runs and how long.
pub struct Options {
    pub ordinal: usize,
    pub batch: usize,
    /// Timed calls per kernel and shape (the median is reported).
    pub reps: usize,
    pub precisions: Vec<Precision>,
}

/// The median of `reps` event-timed calls of `f(i)` (i counts calls, for
/// rotating inputs), in milliseconds.
fn time(gpu: &Gpu, reps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..WARMUP {
        f(i)?;
    }
    let mut marks = Vec::with_capacity(reps);
    for i in 0..reps {
        let ev = || {
            gpu.stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        };
        let start = ev().context("recording an event")?;
        f(WARMUP + i)?;
        marks.push((start, ev().context("recording an event")?));
    }
    let mut ms = marks
        .iter()
        .map(|(a, b)| a.elapsed_ms(b).map(f64::from))
        .collect::<std::result::Result<Vec<_>, _>>()
        .context("reading event times")?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// `count` device tensors of `shape`, each filled with its own constant
/// (the kernels' speed does not depend on the values).
fn inputs(g: &Cuda, shape: &[usize], count: usize) -> Result<Vec<GpuTensor>> {
    let n: usize = shape.iter().product();
    (0..count)
        .map(|i| {
            let mut buf = g
                .gpu()
                .stream()
                .alloc_zeros::<f32>(n)
                .with_context(|| format!("allocating a timing input of shape {shape:?}"))?;
            ops::fill(g.gpu(), &mut buf, 0.25 + 0.125 * i as f32)?;
            Ok(GpuTensor {
                buf,
                shape: shape.to_vec(),
            })
        })
        .collect()
}

fn rotation(shape: &[usize]) -> usize {
    let bytes = 4 * shape.iter().product::<usize>();
    ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(2, 8)
}

/// The dense bf16 matrix rate of the device: cuBLAS on 8192^3, TFLOP/s.
fn bf16_rate(g: &Cuda, reps: usize) -> Result<f64> {
    const N: usize = 8192;
    let s = g.gpu().stream();
    let a = s.alloc_zeros::<half::bf16>(N * N)?;
    let b = s.alloc_zeros::<half::bf16>(N * N)?;
    let mut c = s.alloc_zeros::<half::bf16>(N * N)?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: N as i32,
        n: N as i32,
        k: N as i32,
        alpha: half::bf16::ONE,
        lda: N as i32,
        ldb: N as i32,
        beta: half::bf16::ZERO,
        ldc: N as i32,
    };
    let ms = time(g.gpu(), reps, |_| {
        // SAFETY: a, b, c hold N x N values each, as cfg says.
        unsafe { g.blas().gemm(cfg, &a, &b, &mut c) }.context("cuBLAS bf16 GEMM")
    })?;
    Ok(2.0 * (N as f64).powi(3) / (ms * 1e-3) / 1e12)
}

/// The small case a kernel is checked on before it is timed: the layer's
/// channels on a grid of at most 8 x 8 (even, for up-sampling).
fn small_case(l: &ConvLayer) -> ConvCase {
    let side = l.h.min(8);
    let src = match l.resample() {
        Resample::None => side,
        Resample::Up => side.div_ceil(2),
        Resample::Down => 2 * side,
    };
    ConvCase {
        b: 2,
        h: src,
        w: src,
        cin: l.cin,
        cout: l.cout,
        k: l.k,
        resample: l.resample(),
        norm: match l.pre {
            Pre::Raw => None,
            Pre::Norm => Some((false, false)),
            Pre::NormSilu => Some((false, true)),
        },
        bcast: l.pre == Pre::NormSilu,
        residual: l.pre != Pre::NormSilu,
        concat: None,
    }
}

/// One convolution layer with each of `kernels`: checked against the twin
/// (one trial: the same operands for every kernel), then timed; one row
/// per kernel.
fn conv_entries(
    g: &Cuda,
    opts: &Options,
    net: &str,
    l: &ConvLayer,
    kernels: &[ConvKernel],
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Value>> {
    enum Trial {
        Fwd(Box<twin::ConvTrial>),
        Bwd(twin::ConvBwdTrial),
    }
    let p = g.precision();
    let tol = twin::tolerance(p);
    let trial = if l.bwd {
        let dims = (2, l.h.min(8), l.w.min(8), l.cout, l.cin, l.k);
        Trial::Bwd(twin::ConvBwdTrial::new(dims, p, rng)?)
    } else {
        Trial::Fwd(Box::new(twin::ConvTrial::new(&small_case(l), p, rng)?))
    };

    // The timed operands, at the run's batch.
    let d = fused_dims(l, opts.batch);
    let (sh, sw) = d.source_hw();
    let shape = if l.bwd {
        [d.b, d.h, d.w, l.cin]
    } else {
        [d.b, sh, sw, l.cin]
    };
    let xs = inputs(g, &shape, rotation(&shape))?;
    // conv_bwd maps the layer's cin-channel gradients to cout: weights of a
    // cout -> cin convolution, run transposed.
    let (wo, wi) = if l.bwd {
        (l.cin, l.cout)
    } else {
        (l.cout, l.cin)
    };
    let w = twin::random(rng, &[wo, wi, l.k, l.k], 0.0, 0.1);
    let gw = g.prepare_conv(&w, &twin::random(rng, &[wo], 0.0, 0.1))?;
    let gamma = g.upload(&twin::random(rng, &[l.cin], 1.0, 0.1))?;
    let beta = g.upload(&twin::random(rng, &[l.cin], 0.0, 0.1))?;
    let pre = ConvPre {
        skip: None,
        norm: (l.pre != Pre::Raw).then_some(Norm {
            gamma: &gamma,
            beta: &beta,
            ss: None,
            silu: l.pre == Pre::NormSilu,
        }),
        resample: l.resample(),
    };

    let mut rows = Vec::new();
    for &k in kernels {
        g.force_conv_kernel(Some(k));
        let mut row = json!({
            "net": net, "pass": if l.bwd { "backward-data" } else { "forward" },
            "precision": p.label(), "kernel": k.label(),
            "k": l.k, "cin": l.cin, "cout": l.cout, "h": l.h, "w": l.w,
            "resample": resample_label(l.resample()), "batch": opts.batch,
            "tolerance": tol,
        });
        let error = match &trial {
            Trial::Fwd(t) => t.error(g),
            Trial::Bwd(t) => t.error(g),
        };
        match error {
            Ok(e) => {
                row["rel_l2"] = json!(e);
                row["valid"] = json!(e <= tol);
            }
            Err(e) => {
                row["valid"] = json!(false);
                row["error"] = json!(format!("{e:#}"));
            }
        }
        if row["valid"] == json!(true) {
            let ms = time(g.gpu(), opts.reps, |i| {
                let x = &xs[i % xs.len()];
                if l.bwd {
                    g.conv_bwd(x, &gw).map(drop)
                } else {
                    g.conv_fused(x, &gw, &pre, &ConvPost::default()).map(drop)
                }
            })?;
            row["ms"] = json!(ms);
            row["tflops"] = json!(l.flops(opts.batch) / (ms * 1e-3) / 1e12);
        }
        rows.push(row);
    }
    g.force_conv_kernel(None);
    Ok(rows)
}

/// Attention at `(side, ch, heads)`: checked at t = min(side^2, 64) and
/// timed at the run's batch.
fn attention_entry(
    g: &Cuda,
    opts: &Options,
    net: &str,
    (side, ch, heads): (usize, usize, usize),
    legacy: bool,
    rng: &mut ChaCha8Rng,
) -> Result<Value> {
    let p = g.precision();
    let small = side.min(8);
    let qkv = twin::random(rng, &[2, small, small, 3 * ch], 0.0, 1.0);
    let want = CpuRef.attention(&qkv, heads, legacy)?;
    let got = g.download(&g.attention(&g.upload(&qkv)?, heads, legacy)?)?;
    let error = rel_l2(&got.data, &want.data);
    let tol = twin::attention_tolerance(p);
    let mut row = json!({
        "net": net, "op": "attention", "precision": p.label(), "t": side * side, "ch": ch,
        "heads": heads, "batch": opts.batch, "rel_l2": error, "tolerance": tol,
        "valid": error <= tol,
    });
    if error <= tol {
        let shape = [opts.batch, side, side, 3 * ch];
        let xs = inputs(g, &shape, rotation(&shape))?;
        let ms = time(g.gpu(), opts.reps, |i| {
            g.attention(&xs[i % xs.len()], heads, legacy).map(drop)
        })?;
        let t = (side * side) as f64;
        row["ms"] = json!(ms);
        row["tflops"] = json!(4.0 * opts.batch as f64 * t * t * ch as f64 / (ms * 1e-3) / 1e12);
    }
    Ok(row)
}

/// GroupNorm (statistics and apply, with SiLU) at `(side, ch)`.
fn norm_entry(
    g: &Cuda,
    opts: &Options,
    net: &str,
    (side, ch): (usize, usize),
    rng: &mut ChaCha8Rng,
) -> Result<Value> {
    let small = side.min(8);
    let x = twin::random(rng, &[2, small, small, ch], 0.5, 2.0);
    let gamma = twin::random(rng, &[ch], 1.0, 0.3);
    let beta = twin::random(rng, &[ch], 0.0, 0.3);
    let want = CpuRef.group_norm(&x, &gamma, &beta, None, true)?;
    let (gg, bg) = (g.upload(&gamma)?, g.upload(&beta)?);
    let got = g.download(&g.group_norm(&g.upload(&x)?, &gg, &bg, None, true)?)?;
    let error = rel_l2(&got.data, &want.data);
    let tol = twin::NORM_TOLERANCE;
    let mut row = json!({
        "net": net, "op": "group_norm", "precision": g.precision().label(), "side": side,
        "ch": ch, "batch": opts.batch, "rel_l2": error, "tolerance": tol, "valid": error <= tol,
    });
    if error <= tol {
        let shape = [opts.batch, side, side, ch];
        let xs = inputs(g, &shape, rotation(&shape))?;
        let ms = time(g.gpu(), opts.reps, |i| {
            g.group_norm(&xs[i % xs.len()], &gg, &bg, None, true)
                .map(drop)
        })?;
        row["ms"] = json!(ms);
        // Read once for the statistics, once to apply, written once.
        row["gb_per_s"] = json!(12.0 * (opts.batch * side * side * ch) as f64 / (ms * 1e-3) / 1e9);
    }
    Ok(row)
}

/// The report so far.
fn report(
    gpu: &str,
    opts: &Options,
    bf16_tflops: Option<f64>,
    convs: &[Value],
    others: &[Value],
    winners: &[Value],
) -> Value {
    let with_fraction = |rows: &[Value]| -> Vec<Value> {
        rows.iter()
            .cloned()
            .map(|mut row| {
                if let (Some(t), Some(rate)) = (row["tflops"].as_f64(), bf16_tflops) {
                    row["fraction_of_bf16_rate"] = json!(t / rate);
                }
                row
            })
            .collect()
    };
    json!({
        "gpu": gpu,
        "batch": opts.batch,
        "reps": opts.reps,
        "bf16_gemm_tflops": bf16_tflops,
        "convolutions": with_fraction(convs),
        "attention_and_norm": with_fraction(others),
        "winners": winners,
    })
}

/// One network's layer shapes, as the tournament takes them.
pub struct NetLayers {
    /// "unet" or "classifier", in the report.
    pub name: &'static str,
    /// The head order of its attention layers.
    pub legacy_attention: bool,
    pub layers: Layers,
}

impl NetLayers {
    /// Both networks of `cfg`: the UNet's forward, the classifier's forward and input
    /// gradient.
    pub fn of_config(cfg: &Config) -> [NetLayers; 2] {
        let unet = NetSpec::build(&cfg.unet, NetKind::Unet);
        let cls = NetSpec::build(&cfg.classifier, NetKind::Classifier);
        [
            NetLayers {
                name: "unet",
                legacy_attention: unet.legacy_attention,
                layers: layers(&unet, false),
            },
            NetLayers {
                name: "classifier",
                legacy_attention: cls.legacy_attention,
                layers: layers(&cls, true),
            },
        ]
    }
}

/// The tensor-core kernels' dimensions of layer `l` at batch `b`.
fn fused_dims(l: &ConvLayer, b: usize) -> FusedDims {
    FusedDims {
        b,
        h: l.h,
        w: l.w,
        cin: l.cin,
        cout: l.cout,
        k: l.k,
        resample: l.resample(),
    }
}

/// Runs the tournament on the layers of `nets`; the report as JSON, also handed to `save`
/// after each precision, so that a run stopped part-way leaves what it measured.
pub fn run(
    nets: &[NetLayers],
    opts: &Options,
    mut save: impl FnMut(&Value) -> Result<()>,
) -> Result<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(20261202);
    let mut convs = Vec::new();
    let mut others = Vec::new();
    let mut winners = Vec::new();
    let mut bf16_tflops = None;
    let mut gpu_name = String::new();
    for &p in &opts.precisions {
        let g = Cuda::with_precision(opts.ordinal, p)?;
        gpu_name = g.gpu().name().to_string();
        if bf16_tflops.is_none() {
            bf16_tflops = Some(bf16_rate(&g, opts.reps)?);
        }
        let kernels = if p.half().is_some() {
            ConvKernel::candidates()
        } else {
            vec![ConvKernel::V1]
        };
        let mut seen = BTreeSet::new();
        for n in nets {
            let (net, l) = (n.name, &n.layers);
            for l in distinct(&l.convs) {
                let key = ConvShape::new(p, &fused_dims(&l, opts.batch));
                let rows = conv_entries(&g, opts, net, &l, &kernels, &mut rng)
                    .with_context(|| format!("{net} {l:?}"))?;
                let mut best: Option<(f64, ConvKernel)> = None;
                for (row, &k) in rows.iter().zip(&kernels) {
                    if let Some(ms) = row["ms"].as_f64() {
                        if best.is_none_or(|(b, _)| ms < b) {
                            best = Some((ms, k));
                        }
                    }
                }
                convs.extend(rows);
                if let Some((_, k)) = best {
                    if seen.insert(key.clone()) {
                        let mut w = serde_json::to_value(&key)?;
                        w["kernel"] = json!(k.label());
                        // fp16 runs the same kernels on the other 16-bit
                        // type, so it is not timed: it takes bf16's winners.
                        if p == Precision::Bf16 {
                            let mut f = w.clone();
                            f["precision"] = json!(Precision::Fp16.label());
                            f["from"] = json!(p.label());
                            winners.push(f);
                        }
                        winners.push(w);
                    }
                }
            }
            for a in distinct(&l.attention) {
                others.push(attention_entry(
                    &g,
                    opts,
                    net,
                    a,
                    n.legacy_attention,
                    &mut rng,
                )?);
            }
            for n in distinct(&l.norms) {
                others.push(norm_entry(&g, opts, net, n, &mut rng)?);
            }
        }
        save(&report(
            &gpu_name,
            opts,
            bf16_tflops,
            &convs,
            &others,
            &winners,
        ))?;
    }
    Ok(report(
        &gpu_name,
        opts,
        bf16_tflops,
        &convs,
        &others,
        &winners,
    ))
}
