//! Multi-head attention over a token sequence, forward and input gradient.
//! Per (batch, head): S = (q s)(k s)^T with s = d^-1/4, W = softmax(S), A = W V.

use super::gemm::{matmul, matmul_at, matmul_bt};
use crate::backend::shapes::GemmShape;
use rayon::prelude::*;

/// Channel offsets of q, k, v of head `h` inside the 3C qkv channels, and of
/// the output inside the C output channels.
fn offsets(h: usize, d: usize, c: usize, legacy: bool) -> (usize, usize, usize, usize) {
    if legacy {
        (h * 3 * d, h * 3 * d + d, h * 3 * d + 2 * d, h * d)
    } else {
        (h * d, c + h * d, 2 * c + h * d, h * d)
    }
}

/// Gathers a (t x d) block of channels `off..off+d` from rows of width `ld`.
fn gather(src: &[f32], t: usize, ld: usize, off: usize, d: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; t * d];
    for (i, row) in out.chunks_mut(d).enumerate() {
        for (o, &v) in row.iter_mut().zip(&src[i * ld + off..i * ld + off + d]) {
            *o = v * scale;
        }
    }
    out
}

/// Row softmax in place (max-subtracted, float64 sum).
fn softmax_rows(s: &mut [f32], t: usize) {
    for row in s.chunks_mut(t) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            sum += *v as f64;
        }
        let inv = (1.0 / sum) as f32;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Softmax weights of one (batch, head), and the scaled q and k they came from.
fn weights(
    qkv: &[f32],
    t: usize,
    c: usize,
    h: usize,
    d: usize,
    legacy: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qo, ko, vo, _) = offsets(h, d, c, legacy);
    let s = (d as f32).sqrt().sqrt().recip();
    let q = gather(qkv, t, 3 * c, qo, d, s);
    let k = gather(qkv, t, 3 * c, ko, d, s);
    let v = gather(qkv, t, 3 * c, vo, d, 1.0);
    let mut w = vec![0f32; t * t];
    matmul_bt(
        GemmShape {
            ldb: d,
            ..GemmShape::packed(t, t, d)
        },
        &q,
        &k,
        &mut w,
        false,
    );
    softmax_rows(&mut w, t);
    (w, q, k, v)
}

/// `qkv` is `[b, t, 3c]`; returns `[b, t, c]`.
pub fn forward(qkv: &[f32], b: usize, t: usize, c: usize, heads: usize, legacy: bool) -> Vec<f32> {
    let d = c / heads;
    let heads_out: Vec<(usize, usize, Vec<f32>)> = (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let x = &qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c];
            let (w, _, _, v) = weights(x, t, c, h, d, legacy);
            let mut a = vec![0f32; t * d];
            matmul(GemmShape::packed(t, d, t), &w, &v, &mut a, false);
            (bi, h, a)
        })
        .collect();
    let mut out = vec![0f32; b * t * c];
    for (bi, h, a) in heads_out {
        let (_, _, _, oo) = offsets(h, d, c, legacy);
        for i in 0..t {
            let dst = (bi * t + i) * c + oo;
            out[dst..dst + d].copy_from_slice(&a[i * d..(i + 1) * d]);
        }
    }
    out
}

/// (batch, head, dq, dk, dv) of one head.
type HeadGrads = (usize, usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// Gradient with respect to `qkv` given the gradient `dout` (`[b, t, c]`).
pub fn backward(
    qkv: &[f32],
    dout: &[f32],
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    legacy: bool,
) -> Vec<f32> {
    let d = c / heads;
    let s = (d as f32).sqrt().sqrt().recip();
    let parts: Vec<HeadGrads> = (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let x = &qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c];
            let (w, q, k, v) = weights(x, t, c, h, d, legacy);
            let (_, _, _, oo) = offsets(h, d, c, legacy);
            let da = gather(&dout[bi * t * c..(bi + 1) * t * c], t, c, oo, d, 1.0);
            // dV = W^T dA ; dW = dA V^T
            let mut dv = vec![0f32; t * d];
            matmul_at(
                GemmShape {
                    lda: t,
                    ..GemmShape::packed(t, d, t)
                },
                &w,
                &da,
                &mut dv,
                false,
            );
            let mut dw = vec![0f32; t * t];
            matmul_bt(
                GemmShape {
                    ldb: d,
                    ..GemmShape::packed(t, t, d)
                },
                &da,
                &v,
                &mut dw,
                false,
            );
            // dS = W * (dW - rowsum(W * dW))
            for (wr, dr) in w.chunks(t).zip(dw.chunks_mut(t)) {
                let dot: f64 = wr
                    .iter()
                    .zip(dr.iter())
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                for (dv, &wv) in dr.iter_mut().zip(wr) {
                    *dv = wv * (*dv - dot as f32);
                }
            }
            // S = (q s)(k s)^T: dq = s dS (k s), dk = s dS^T (q s)
            let mut dq = vec![0f32; t * d];
            matmul(GemmShape::packed(t, d, t), &dw, &k, &mut dq, false);
            let mut dk = vec![0f32; t * d];
            matmul_at(
                GemmShape {
                    lda: t,
                    ..GemmShape::packed(t, d, t)
                },
                &dw,
                &q,
                &mut dk,
                false,
            );
            dq.iter_mut().for_each(|v| *v *= s);
            dk.iter_mut().for_each(|v| *v *= s);
            (bi, h, dq, dk, dv)
        })
        .collect();
    let mut dqkv = vec![0f32; b * t * 3 * c];
    for (bi, h, dq, dk, dv) in parts {
        let (qo, ko, vo, _) = offsets(h, d, c, legacy);
        for i in 0..t {
            let row = (bi * t + i) * 3 * c;
            dqkv[row + qo..row + qo + d].copy_from_slice(&dq[i * d..(i + 1) * d]);
            dqkv[row + ko..row + ko + d].copy_from_slice(&dk[i * d..(i + 1) * d]);
            dqkv[row + vo..row + vo + d].copy_from_slice(&dv[i * d..(i + 1) * d]);
        }
    }
    dqkv
}
