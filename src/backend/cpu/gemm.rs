//! A safe row-major wrapper over the `gemm` crate.

/// `c = a @ b (+ c when accumulate)`, with `a` (m x k, row stride `lda`),
/// `b` (k x n, row stride `ldb`), `c` (m x n, row stride `ldc`).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= (m - 1) * lda + k || k == 0,
        "matmul: lhs too short"
    );
    assert!(
        b.len() >= (k.max(1) - 1) * ldb + n || k == 0,
        "matmul: rhs too short"
    );
    assert!(c.len() >= (m - 1) * ldc + n, "matmul: dst too short");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above bound every element the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `c = a @ b^T (+ c)`, `b` given as (n x k) row-major.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k, "matmul_bt: lhs too short");
    assert!(b.len() >= (n - 1) * ldb + k, "matmul_bt: rhs too short");
    assert!(c.len() >= (m - 1) * ldc + n, "matmul_bt: dst too short");
    // SAFETY: as in `matmul`; b^T is read with column stride ldb, row stride 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            ldb as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `c = a^T @ b (+ c)`, `a` given as (k x m) row-major.
#[allow(clippy::too_many_arguments)]
pub fn matmul_at(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(a.len() >= (k - 1) * lda + m, "matmul_at: lhs too short");
    assert!(b.len() >= (k - 1) * ldb + n, "matmul_at: rhs too short");
    assert!(c.len() >= (m - 1) * ldc + n, "matmul_at: dst too short");
    // SAFETY: as in `matmul`; a^T is read with column stride lda, row stride 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            lda as isize,
            1,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
