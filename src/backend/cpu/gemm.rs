//! A safe row-major wrapper over the `gemm` crate.

/// A row-major matrix operand: its data, and its row and column strides.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl Operand<'_> {
    /// Enough elements for `rows` x `cols` at these strides.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || self.data.len() > (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// `c = a @ b (+ c when accumulate)`: `a` m x k, `b` k x n, `c` m x n with
/// row stride `ldc`.
#[allow(clippy::too_many_arguments)]
fn gemm_core(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "matmul: dst too short");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(a.fits(m, k), "matmul: lhs too short");
    assert!(b.fits(k, n), "matmul: rhs too short");
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
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `c = a @ b (+ c)`, `a` (m x k, row stride `lda`), `b` (k x n, row stride `ldb`).
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
    gemm_core(
        m,
        n,
        k,
        Operand {
            data: a,
            rs: lda,
            cs: 1,
        },
        Operand {
            data: b,
            rs: ldb,
            cs: 1,
        },
        c,
        ldc,
        accumulate,
    )
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
    gemm_core(
        m,
        n,
        k,
        Operand {
            data: a,
            rs: lda,
            cs: 1,
        },
        Operand {
            data: b,
            rs: 1,
            cs: ldb,
        },
        c,
        ldc,
        accumulate,
    )
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
    gemm_core(
        m,
        n,
        k,
        Operand {
            data: a,
            rs: 1,
            cs: lda,
        },
        Operand {
            data: b,
            rs: ldb,
            cs: 1,
        },
        c,
        ldc,
        accumulate,
    )
}
