//! Row-major SGEMM through cuBLAS, which is column-major: a row-major
//! `C = A B` is the column-major `C^T = B^T A^T`, and a row-major matrix read
//! column-major is its transpose, so the call swaps A and B and m and n and
//! transposes nothing.
//!
//! The handle stays in cuBLAS's default math mode: pure FP32 (no TF32 tensor
//! cores), which is what keeps the convolutions within float32 rounding of the
//! CPU reference.

use anyhow::{ensure, Context, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use crate::backend::shapes::GemmShape;

fn int(v: usize, what: &str, s: &GemmShape) -> Result<i32> {
    i32::try_from(v)
        .with_context(|| format!("sgemm {s:?}: {what} = {v} exceeds cuBLAS's 32-bit range"))
}

/// `c = a @ b + beta * c` in row-major order (beta 0: c is not read, so it
/// may hold anything, NaN included). The reference backend's convolutions.
#[cfg(feature = "lab")]
pub fn sgemm<A, B, C>(
    blas: &CudaBlas,
    s: GemmShape,
    a: &A,
    b: &B,
    beta: f32,
    c: &mut C,
) -> Result<()>
where
    A: DevicePtr<f32>,
    B: DevicePtr<f32>,
    C: DevicePtrMut<f32>,
{
    if s.m == 0 || s.n == 0 {
        return Ok(());
    }
    ensure!(
        s.k > 0,
        "sgemm {s:?}: an empty inner dimension (the caller fills the output)"
    );
    ensure!(
        s.lda >= s.k && s.ldb >= s.n && s.ldc >= s.n,
        "sgemm {s:?}: a row stride is shorter than its row"
    );
    ensure!(
        a.len() >= (s.m - 1) * s.lda + s.k,
        "sgemm {s:?}: lhs has only {} elements",
        a.len()
    );
    ensure!(
        b.len() >= (s.k - 1) * s.ldb + s.n,
        "sgemm {s:?}: rhs has only {} elements",
        b.len()
    );
    ensure!(
        c.len() >= (s.m - 1) * s.ldc + s.n,
        "sgemm {s:?}: output has only {} elements",
        c.len()
    );
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: int(s.n, "n", &s)?,
        n: int(s.m, "m", &s)?,
        k: int(s.k, "k", &s)?,
        alpha: 1.0f32,
        lda: int(s.ldb, "ldb", &s)?,
        ldb: int(s.lda, "lda", &s)?,
        beta,
        ldc: int(s.ldc, "ldc", &s)?,
    };
    // SAFETY: the lengths checked above cover every element cuBLAS reads or
    // writes for this (swapped, column-major) configuration, and all three
    // buffers are used on the handle's stream.
    unsafe { blas.gemm(cfg, b, a, c) }.with_context(|| format!("cuBLAS sgemm {s:?}"))?;
    Ok(())
}

/// `c[i] = alpha op(a[i]) op(b[i]) + beta c[i]` for `batch` row-major
/// matrices `stride_*` elements apart: `op(a)` is `m x k` (stored `k x m`
/// when `trans_a`), `op(b)` is `k x n` (stored `n x k` when `trans_b`), and
/// `c` is `m x n`, each with its own row stride.
#[derive(Clone, Copy, Debug)]
pub struct BatchedGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl BatchedGemm {
    /// Elements one stored operand spans: `rows` rows of `cols` at stride `ld`.
    fn span(rows: usize, cols: usize, ld: usize) -> usize {
        (rows - 1) * ld + cols
    }
}

/// The batched `sgemm`: the same swap into cuBLAS's column-major order, with
/// each operand's transposition carried over.
pub fn sgemm_batched<A, B, C>(
    blas: &CudaBlas,
    s: BatchedGemm,
    a: &A,
    b: &B,
    c: &mut C,
) -> Result<()>
where
    A: DevicePtr<f32>,
    B: DevicePtr<f32>,
    C: DevicePtrMut<f32>,
{
    if s.m == 0 || s.n == 0 || s.batch == 0 {
        return Ok(());
    }
    ensure!(s.k > 0, "sgemm_batched {s:?}: an empty inner dimension");
    let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
    let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
    ensure!(
        s.lda >= ac && s.ldb >= bc && s.ldc >= s.n,
        "sgemm_batched {s:?}: a row stride is shorter than its row"
    );
    let last = s.batch - 1;
    ensure!(
        a.len() >= last * s.stride_a + BatchedGemm::span(ar, ac, s.lda)
            && b.len() >= last * s.stride_b + BatchedGemm::span(br, bc, s.ldb)
            && c.len() >= last * s.stride_c + BatchedGemm::span(s.m, s.n, s.ldc),
        "sgemm_batched {s:?}: operands of {}, {} and {} elements are too short",
        a.len(),
        b.len(),
        c.len()
    );
    let dummy = GemmShape {
        m: s.m,
        n: s.n,
        k: s.k,
        lda: s.lda,
        ldb: s.ldb,
        ldc: s.ldc,
    };
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let long = |v: usize, what: &str| {
        i64::try_from(v).with_context(|| format!("sgemm_batched {s:?}: {what} = {v}"))
    };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(s.trans_b),
            transb: op(s.trans_a),
            m: int(s.n, "n", &dummy)?,
            n: int(s.m, "m", &dummy)?,
            k: int(s.k, "k", &dummy)?,
            alpha: s.alpha,
            lda: int(s.ldb, "ldb", &dummy)?,
            ldb: int(s.lda, "lda", &dummy)?,
            beta: s.beta,
            ldc: int(s.ldc, "ldc", &dummy)?,
        },
        batch_size: int(s.batch, "batch", &dummy)?,
        stride_a: long(s.stride_b, "stride_b")?,
        stride_b: long(s.stride_a, "stride_a")?,
        stride_c: long(s.stride_c, "stride_c")?,
    };
    // SAFETY: the lengths checked above cover every element cuBLAS reads or
    // writes for this (swapped, column-major) configuration, on the handle's
    // stream.
    unsafe { blas.gemm_strided_batched(cfg, b, a, c) }
        .with_context(|| format!("cuBLAS sgemm_batched {s:?}"))?;
    Ok(())
}
