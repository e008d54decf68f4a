//! A safe row-major wrapper over the `gemm` crate.

use crate::backend::shapes::GemmShape;

/// A row-major matrix operand: its data, and its row and column strides.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Operand<'a> {
    /// `data` with rows `ld` apart, read as stored or transposed.
    fn new(data: &'a [f32], ld: usize, transposed: bool) -> Self {
        let (rs, cs) = if transposed { (1, ld) } else { (ld, 1) };
        Operand { data, rs, cs }
    }

    /// Enough elements for `rows` x `cols` at these strides.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || self.data.len() > (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// `c = a @ b (+ c when accumulate)`: `a` m x k, `b` k x n, `c` m x n with
/// row stride `ldc`.
fn gemm_core(s: GemmShape, a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
    let GemmShape { m, n, k, ldc, .. } = s;
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

/// `c = a @ b (+ c)`, `a` (m x k), `b` (k x n).
pub fn matmul(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    let (a, b) = (Operand::new(a, s.lda, false), Operand::new(b, s.ldb, false));
    gemm_core(s, a, b, c, accumulate)
}

/// `c = a @ b^T (+ c)`, `b` given as (n x k) row-major.
pub fn matmul_bt(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    let (a, b) = (Operand::new(a, s.lda, false), Operand::new(b, s.ldb, true));
    gemm_core(s, a, b, c, accumulate)
}

/// `c = a^T @ b (+ c)`, `a` given as (k x m) row-major.
pub fn matmul_at(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    let (a, b) = (Operand::new(a, s.lda, true), Operand::new(b, s.ldb, false));
    gemm_core(s, a, b, c, accumulate)
}
