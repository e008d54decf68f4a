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
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};

/// Shape of `c (m x n, row stride ldc) = a (m x k, lda) @ b (k x n, ldb)`.
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

fn int(v: usize, what: &str, s: &GemmShape) -> Result<i32> {
    i32::try_from(v)
        .with_context(|| format!("sgemm {s:?}: {what} = {v} exceeds cuBLAS's 32-bit range"))
}

/// `c = a @ b + beta * c` in row-major order (beta 0: c is not read, so it
/// may hold anything, NaN included).
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
