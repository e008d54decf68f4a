//! Launcher for `kernels/flash.cu`: fused multi-head attention forward on
//! tensor cores for the fast precision modes (bf16 / fp16 operands, float32
//! accumulation and softmax: [`attention_fast`]) and for the fp32 mode
//! (float32 operands split into 3xTF32 products: [`attention_tf32x3`]).
//! Same semantics and layouts as `super::attention::attention` (the float32
//! oracle) and the CPU twin in `crate::backend::cpu_ref` (`attention.rs`): qkv
//! `[b, t, 3c]`, output `[b, t, c]`, `d = c / heads` channels per head.
//!
//! Rounding, 16-bit: q, k and v are rounded to the 16-bit type unscaled and
//! the scale is folded into the logits, `S = (q16 . k16) / sqrt(d)`; the
//! softmax weights are rounded to the 16-bit type before the product with
//! v, and normalised by the sum of the rounded weights.
//!
//! 3xTF32: nothing is rounded below float32 on purpose. Each operand x of
//! both products (q, k for `Q K^T`, the weights p and v for `P V`) is split
//! as `tf32(x) + tf32(x - tf32(x))` and each product done as three TF32
//! mma (small x big, big x small, big x big), which leaves ~2^-21 of a
//! product out; every group of three mma starts from a zero accumulator and
//! is added to the running sums with a float32 add (the tensor cores'
//! accumulation truncates, which would drift over long chains). Logits as
//! in the 16-bit kernel, `(q . k) * (log2(e) / sqrt(d))` into exp2. The
//! kernel's emulation puts it at rel-L2 ~2e-7 (spread weights) to ~6e-7
//! (peaky) from float64, as close as the CPU twin's float32.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::attention::AttnDims;
use super::{launch, Gpu};
use crate::precision::Half;

/// Query rows per block (4 warps of 16 rows).
const BLOCK_ROWS: usize = 64;
/// Threads per block: the kernel's 4 warps (`flash::THREADS`).
const THREADS: u32 = 128;
/// Largest head dim of the `attn_flash_<type>` kernels; larger ones (up to
/// `MAX_HEAD_DIM`) use `attn_flash_<type>_d128`, whose register tiles are
/// twice as wide.
const SMALL_HEAD_DIM: usize = 64;
const MAX_HEAD_DIM: usize = 128;

/// The operands of a launch: 16-bit ([`attention_fast`]) or float32 split
/// into 3xTF32 products ([`attention_tf32x3`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Operands {
    Half(Half),
    Tf32x3,
}

impl Operands {
    /// The public function's name, for error messages.
    fn op(self) -> &'static str {
        match self {
            Operands::Half(_) => "attention_fast",
            Operands::Tf32x3 => "attention_tf32x3",
        }
    }

    /// The kernel for `d <= SMALL_HEAD_DIM`; `<stem>_d128` above.
    fn stem(self) -> String {
        match self {
            Operands::Half(half) => format!("attn_flash_{}", half.suffix()),
            Operands::Tf32x3 => "attn_flash_tf32x3".to_owned(),
        }
    }
}

/// A checked attention launch: grid and kernel arguments.
#[derive(Debug, PartialEq)]
struct Plan {
    kernel: String,
    /// (ceil(t / 64), heads, b).
    grid: (u32, u32, u32),
    t: u32,
    c: u32,
    d: u32,
    legacy: i32,
    /// log2(e) / sqrt(d): turns q . k into the log2-domain logit.
    scale_log2: f32,
}

/// Validates the sizes of one call; None when there is nothing to compute.
fn plan(operands: Operands, dims: AttnDims) -> Result<Option<Plan>> {
    let op = operands.op();
    let d = dims.head_dim(op)?;
    let AttnDims { b, t, c, heads, .. } = dims;
    ensure!(
        d.is_multiple_of(8) && d <= MAX_HEAD_DIM,
        "{op}: head dim d = {d} ({c} channels / {heads} heads) is not a multiple of 8 \
         up to {MAX_HEAD_DIM}"
    );
    if b == 0 || t == 0 {
        return Ok(None);
    }
    // The kernel indexes rows (up to t + 63) and channels (up to 3c) in 32
    // bits and the grid's y and z dimensions are at most 65535.
    let t32 = u32::try_from(t)
        .ok()
        .filter(|&v| v <= u32::MAX - BLOCK_ROWS as u32)
        .with_context(|| format!("{op}: {t} tokens"))?;
    let c32 = u32::try_from(c)
        .ok()
        .filter(|v| v.checked_mul(3).is_some())
        .with_context(|| format!("{op}: {c} channels"))?;
    let heads32 = u32::try_from(heads)
        .ok()
        .filter(|&v| v <= 65535)
        .with_context(|| format!("{op}: {heads} heads (at most 65535)"))?;
    let b32 = u32::try_from(b)
        .ok()
        .filter(|&v| v <= 65535)
        .with_context(|| format!("{op}: batch {b} (at most 65535)"))?;
    let tiles = t32.div_ceil(BLOCK_ROWS as u32);
    let kernel = if d <= SMALL_HEAD_DIM {
        operands.stem()
    } else {
        format!("{}_d128", operands.stem())
    };
    Ok(Some(Plan {
        kernel,
        grid: (tiles, heads32, b32),
        t: t32,
        c: c32,
        d: d as u32,
        legacy: i32::from(dims.legacy),
        scale_log2: (std::f64::consts::LOG2_E / (d as f64).sqrt()) as f32,
    }))
}

/// Checks and launches one call of either kind.
fn run(
    gpu: &Gpu,
    operands: Operands,
    qkv: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    dims: AttnDims,
) -> Result<()> {
    let plan = plan(operands, dims)?;
    dims.expect_lens(gpu, operands.op(), qkv, ("out", out))?;
    let Some(p) = plan else {
        return Ok(());
    };
    let cfg = LaunchConfig {
        grid_dim: p.grid,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let params = (qkv, out, p.t, p.c, p.d, p.legacy, p.scale_log2);
    // SAFETY: qkv holds b * t * 3c floats and out b * t * c; the grid is
    // (ceil(t / 64), heads, b) blocks of 128 threads with static shared
    // memory only (under 48 KiB), and d = c / heads is a multiple of 8
    // within the chosen kernel's range, as the kernel requires. The kernel
    // reads and writes only rows < t, channels of head blockIdx.y < heads.
    unsafe { launch::attn_flash(gpu, &p.kernel, cfg, params) }
}

/// `out[b, i, head h] = sum_j softmax_j((q_i s) . (k_j s)) v_j` with s =
/// d^(-1/4), on tensor cores with `half` operands (see the module note for
/// where the rounding happens); see `Backend::attention`. d = c / heads
/// must be a multiple of 8, at most 128. Every element of `out` is written.
pub fn attention_fast(
    gpu: &Gpu,
    half: Half,
    qkv: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    dims: AttnDims,
) -> Result<()> {
    run(gpu, Operands::Half(half), qkv, out, dims)
}

/// The same attention as [`attention_fast`] for the fp32 mode: float32
/// operands on TF32 tensor cores, each product split into three (3xTF32,
/// see the module note), accurate to float32 level (rel-L2 ~1e-7..1e-6
/// from float64, like the CPU twin). Same layouts, head-dim limits
/// (d = c / heads a multiple of 8, at most 128) and errors; every element
/// of `out` is written.
pub fn attention_tf32x3(
    gpu: &Gpu,
    qkv: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    dims: AttnDims,
) -> Result<()> {
    run(gpu, Operands::Tf32x3, qkv, out, dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BF16: Operands = Operands::Half(Half::Bf16);
    const FP16: Operands = Operands::Half(Half::Fp16);

    fn dims(b: usize, t: usize, c: usize, heads: usize, legacy: bool) -> AttnDims {
        AttnDims {
            b,
            t,
            c,
            heads,
            legacy,
        }
    }

    fn err(r: Result<Option<Plan>>) -> String {
        format!("{:#}", r.expect_err("refused"))
    }

    #[test]
    fn plan_refuses_bad_head_dims() {
        // d = 20 and 36: not multiples of 8; 136: above 128.
        for (c, heads, d) in [(40, 2, 20), (144, 4, 36), (272, 2, 136)] {
            let e = err(plan(BF16, dims(1, 5, c, heads, false)));
            assert!(e.contains(&format!("head dim d = {d}")), "{e}");
        }
        let e = err(plan(FP16, dims(1, 5, 64, 3, true)));
        assert!(e.contains("3 heads do not divide 64"), "{e}");
        let e = err(plan(FP16, dims(1, 5, 64, 0, true)));
        assert!(e.contains("0 heads"), "{e}");
        // A bad d is refused even when there is nothing to compute.
        let e = err(plan(FP16, dims(0, 0, 40, 2, true)));
        assert!(e.contains("head dim d = 20"), "{e}");
    }

    #[test]
    fn plan_picks_kernel_and_grid() {
        let p = plan(BF16, dims(3, 1000, 8 * 48, 8, true)).unwrap().unwrap();
        assert_eq!(p.kernel, "attn_flash_bf16");
        assert_eq!(p.grid, (16, 8, 3));
        assert_eq!((p.t, p.c, p.d, p.legacy), (1000, 384, 48, 1));
        let p = plan(FP16, dims(1, 65, 2 * 128, 2, false)).unwrap().unwrap();
        assert_eq!(p.kernel, "attn_flash_f16_d128");
        assert_eq!(p.grid, (2, 2, 1));
        let p = plan(FP16, dims(1, 1, 72, 1, false)).unwrap().unwrap();
        assert_eq!(p.kernel, "attn_flash_f16_d128");
        let p = plan(FP16, dims(1, 64, 8, 1, false)).unwrap().unwrap();
        assert_eq!((p.kernel.as_str(), p.grid), ("attn_flash_f16", (1, 1, 1)));
        assert!(plan(BF16, dims(0, 17, 64, 2, false)).unwrap().is_none());
        assert!(plan(BF16, dims(2, 0, 64, 2, false)).unwrap().is_none());
        let e = err(plan(BF16, dims(70000, 17, 64, 2, false)));
        assert!(e.contains("batch 70000"), "{e}");
    }

    #[test]
    fn plan_tf32x3_kernels_and_errors() {
        let p = plan(Operands::Tf32x3, dims(3, 1000, 8 * 48, 8, true))
            .unwrap()
            .unwrap();
        assert_eq!(p.kernel, "attn_flash_tf32x3");
        assert_eq!(p.grid, (16, 8, 3));
        assert_eq!((p.t, p.c, p.d, p.legacy), (1000, 384, 48, 1));
        assert_eq!(
            p.scale_log2,
            (std::f64::consts::LOG2_E / 48f64.sqrt()) as f32
        );
        let p = plan(Operands::Tf32x3, dims(1, 1, 8, 1, false))
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.kernel.as_str(), p.grid),
            ("attn_flash_tf32x3", (1, 1, 1))
        );
        let p = plan(Operands::Tf32x3, dims(1, 4096, 2 * 72, 2, false))
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.kernel.as_str(), p.grid),
            ("attn_flash_tf32x3_d128", (64, 2, 1))
        );
        let p = plan(Operands::Tf32x3, dims(1, 65, 128, 1, false))
            .unwrap()
            .unwrap();
        assert_eq!(p.kernel, "attn_flash_tf32x3_d128");
        assert!(plan(Operands::Tf32x3, dims(0, 17, 64, 2, false))
            .unwrap()
            .is_none());
        let e = err(plan(Operands::Tf32x3, dims(1, 5, 40, 2, false)));
        assert!(e.starts_with("attention_tf32x3: head dim d = 20"), "{e}");
        let e = err(plan(Operands::Tf32x3, dims(1, 5, 272, 2, false)));
        assert!(e.contains("head dim d = 136"), "{e}");
        let e = err(plan(Operands::Tf32x3, dims(1, 5, 64, 3, true)));
        assert!(e.contains("3 heads do not divide 64"), "{e}");
    }
}
