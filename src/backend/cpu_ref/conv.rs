//! 'Same' convolutions in NHWC by im2col over pixel chunks and a GEMM.

use super::gemm::matmul;
use crate::backend::shapes::{ConvDims, GemmShape};
use rayon::prelude::*;

/// Weights of a k x k convolution as a (k*k*cin) x cout matrix, plus the
/// matrix of its backward-data convolution: the kernel flipped and in/out
/// swapped, (k*k*cout) x cin.
#[derive(Clone, Debug)]
pub struct CpuConv {
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
    pub fwd: Vec<f32>,
    pub bwd: Vec<f32>,
    pub bias: Vec<f32>,
}

impl CpuConv {
    /// From PyTorch's (out, in, k, k) layout.
    pub fn new(w: &[f32], cout: usize, cin: usize, k: usize, bias: &[f32]) -> Self {
        let mut fwd = vec![0.0; k * k * cin * cout];
        let mut bwd = vec![0.0; k * k * cin * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let v = w[((co * cin + ci) * k + ky) * k + kx];
                        fwd[((ky * k + kx) * cin + ci) * cout + co] = v;
                        let (fy, fx) = (k - 1 - ky, k - 1 - kx);
                        bwd[((fy * k + fx) * cout + co) * cin + ci] = v;
                    }
                }
            }
        }
        Self {
            k,
            cin,
            cout,
            fwd,
            bwd,
            bias: bias.to_vec(),
        }
    }
}

/// Pixels per GEMM: bounds the im2col buffer and gives rayon work items.
const CHUNK: usize = 1024;

/// `y = conv(x, wmat) + bias` for x `[b, h, w, cin]`, `wmat` (k*k*cin x cout).
pub fn conv_nhwc(x: &[f32], d: ConvDims, wmat: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let ConvDims {
        b,
        h,
        w,
        cin,
        cout,
        k,
    } = d;
    let pixels = b * h * w;
    let mut y = vec![0.0f32; pixels * cout];
    let kk = k * k * cin;
    let pad = (k / 2) as isize;
    y.par_chunks_mut(CHUNK * cout)
        .enumerate()
        .for_each(|(ci, out)| {
            let p0 = ci * CHUNK;
            let np = out.len() / cout;
            if let Some(bias) = bias {
                for row in out.chunks_mut(cout) {
                    row.copy_from_slice(bias);
                }
            }
            if k == 1 {
                let a = &x[p0 * cin..(p0 + np) * cin];
                matmul(
                    GemmShape::packed(np, cout, cin),
                    a,
                    wmat,
                    out,
                    bias.is_some(),
                );
                return;
            }
            let mut cols = vec![0.0f32; np * kk];
            for (i, col) in cols.chunks_mut(kk).enumerate() {
                let p = p0 + i;
                let (bi, yy, xx) = (p / (h * w), (p / w) % h, p % w);
                for ky in 0..k {
                    let sy = yy as isize + ky as isize - pad;
                    for kx in 0..k {
                        let sx = xx as isize + kx as isize - pad;
                        let dst = &mut col[(ky * k + kx) * cin..(ky * k + kx + 1) * cin];
                        if sy < 0 || sy >= h as isize || sx < 0 || sx >= w as isize {
                            dst.fill(0.0);
                        } else {
                            let s = ((bi * h + sy as usize) * w + sx as usize) * cin;
                            dst.copy_from_slice(&x[s..s + cin]);
                        }
                    }
                }
            }
            matmul(
                GemmShape::packed(np, cout, kk),
                &cols,
                wmat,
                out,
                bias.is_some(),
            );
        });
    y
}
