//! The CPU reference backend: plain loops and a GEMM crate, float32 with float64
//! accumulation for statistics and softmax sums. Every CUDA kernel is checked
//! against these functions.

mod attention;
mod conv;
mod gemm;
mod norm;

pub use conv::CpuConv;
pub use norm::group_norm_affine;

use super::shapes::{self, nhwc, ConvDims};
use super::{flag_value, Anomaly, Backend};
use crate::ddim::{self, DdimCoefs};
use crate::post;
use crate::tensor::Tensor;
use anyhow::Result;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuRef;

fn gn_args<'a>(
    x: &Tensor,
    gamma: &'a Tensor,
    beta: &'a Tensor,
    ss: Option<&'a Tensor>,
    silu: bool,
) -> Result<norm::GnArgs<'a>> {
    shapes::group_norm(
        &x.shape,
        &gamma.shape,
        &beta.shape,
        ss.map(|s| &s.shape[..]),
    )?;
    let (_, h, w, c) = nhwc(&x.shape)?;
    Ok(norm::GnArgs {
        hw: h * w,
        c,
        gamma: &gamma.data,
        beta: &beta.data,
        ss: ss.map(|s| &s.data[..]),
        silu,
    })
}

impl Backend for CpuRef {
    type T = Tensor;
    type Conv = CpuConv;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn dims<'a>(&self, t: &'a Tensor) -> &'a [usize] {
        &t.shape
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn prepare_conv(&self, w: &Tensor, bias: &Tensor) -> Result<CpuConv> {
        let (cout, cin, k) = shapes::conv_weights(&w.shape, &bias.shape)?;
        Ok(CpuConv::new(&w.data, cout, cin, k, &bias.data))
    }

    fn conv(&self, x: &Tensor, c: &CpuConv) -> Result<Tensor> {
        let shape = shapes::conv(&x.shape, c.cin, c.cout)?;
        let (b, h, w, cin) = nhwc(&x.shape)?;
        let d = ConvDims {
            b,
            h,
            w,
            cin,
            cout: c.cout,
            k: c.k,
        };
        let y = conv::conv_nhwc(&x.data, d, &c.fwd, Some(&c.bias));
        Tensor::new(shape, y)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        ss: Option<&Tensor>,
        silu: bool,
    ) -> Result<Tensor> {
        let a = gn_args(x, gamma, beta, ss, silu)?;
        Tensor::new(x.shape.clone(), norm::forward(&x.data, x.shape[0], &a))
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::new(
            x.shape.clone(),
            x.data.iter().map(|&z| z * norm::sigmoid(z)).collect(),
        )
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        shapes::add(&a.shape, &b.shape)?;
        if a.shape == b.shape {
            return Tensor::new(
                a.shape.clone(),
                a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect(),
            );
        }
        let (_, h, w, c) = nhwc(&a.shape)?;
        let mut out = a.data.clone();
        for (i, px) in out.chunks_mut(c).enumerate() {
            let bi = i / (h * w);
            for (o, &v) in px.iter_mut().zip(&b.data[bi * c..(bi + 1) * c]) {
                *o += v;
            }
        }
        Tensor::new(a.shape.clone(), out)
    }

    fn avg_pool2(&self, x: &Tensor) -> Result<Tensor> {
        let shape = shapes::avg_pool2(&x.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let (ho, wo) = (h / 2, w / 2);
        let mut y = vec![0f32; b * ho * wo * c];
        for bi in 0..b {
            for yy in 0..ho {
                for xx in 0..wo {
                    let o = ((bi * ho + yy) * wo + xx) * c;
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let s = ((bi * h + 2 * yy + dy) * w + 2 * xx + dx) * c;
                        for ch in 0..c {
                            y[o + ch] += x.data[s + ch];
                        }
                    }
                    y[o..o + c].iter_mut().for_each(|v| *v *= 0.25);
                }
            }
        }
        Tensor::new(shape, y)
    }

    fn upsample2(&self, x: &Tensor) -> Result<Tensor> {
        let shape = shapes::upsample2(&x.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let (ho, wo) = (2 * h, 2 * w);
        let mut y = vec![0f32; b * ho * wo * c];
        for bi in 0..b {
            for yy in 0..ho {
                for xx in 0..wo {
                    let o = ((bi * ho + yy) * wo + xx) * c;
                    let s = ((bi * h + yy / 2) * w + xx / 2) * c;
                    y[o..o + c].copy_from_slice(&x.data[s..s + c]);
                }
            }
        }
        Tensor::new(shape, y)
    }

    fn concat(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let shape = shapes::concat(&a.shape, &b.shape)?;
        let (ca, cb) = (a.shape[3], b.shape[3]);
        let mut y = Vec::with_capacity(a.len() + b.len());
        for (pa, pb) in a.data.chunks(ca).zip(b.data.chunks(cb)) {
            y.extend_from_slice(pa);
            y.extend_from_slice(pb);
        }
        Tensor::new(shape, y)
    }

    fn timestep_embedding(&self, ts: &[usize], dim: usize) -> Result<Tensor> {
        let shape = shapes::timestep_embedding(ts.len(), dim)?;
        let half = dim / 2;
        let mut data = Vec::with_capacity(ts.len() * dim);
        for &t in ts {
            let args: Vec<f64> = (0..half)
                .map(|i| t as f64 * (-(10000f64.ln()) * i as f64 / half as f64).exp())
                .collect();
            data.extend(args.iter().map(|a| a.cos() as f32));
            data.extend(args.iter().map(|a| a.sin() as f32));
        }
        Tensor::new(shape, data)
    }

    fn add_rows(&self, x: &Tensor, table: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let shape = shapes::add_rows(&x.shape, &table.shape, rows)?;
        let dim = table.shape[1];
        let mut y = x.data.clone();
        for (bi, &r) in rows.iter().enumerate() {
            for (o, &v) in y[bi * dim..(bi + 1) * dim]
                .iter_mut()
                .zip(&table.data[r * dim..(r + 1) * dim])
            {
                *o += v;
            }
        }
        Tensor::new(shape, y)
    }

    fn attention(&self, qkv: &Tensor, heads: usize, legacy: bool) -> Result<Tensor> {
        let shape = shapes::attention(&qkv.shape, heads)?;
        let (b, h, w, c) = nhwc(&shape)?;
        Tensor::new(
            shape,
            attention::forward(&qkv.data, b, h * w, c, heads, legacy),
        )
    }

    fn prepend_mean(&self, x: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let shape = shapes::prepend_mean(&x.shape, &pos.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let t = h * w;
        let mut y = vec![0f32; b * (t + 1) * c];
        for bi in 0..b {
            let src = &x.data[bi * t * c..(bi + 1) * t * c];
            let dst = &mut y[bi * (t + 1) * c..(bi + 1) * (t + 1) * c];
            for ch in 0..c {
                let s: f64 = (0..t).map(|i| src[i * c + ch] as f64).sum();
                dst[ch] = (s / t as f64) as f32;
            }
            dst[c..].copy_from_slice(src);
            for (o, &p) in dst.iter_mut().zip(&pos.data) {
                *o += p;
            }
        }
        Tensor::new(shape, y)
    }

    fn token0(&self, x: &Tensor) -> Result<Tensor> {
        let shape = shapes::token0(&x.shape)?;
        let (b, h, w, c) = nhwc(&x.shape)?;
        let t = h * w;
        let mut y = Vec::with_capacity(b * c);
        for bi in 0..b {
            y.extend_from_slice(&x.data[bi * t * c..bi * t * c + c]);
        }
        Tensor::new(shape, y)
    }

    fn conv_bwd(&self, dy: &Tensor, c: &CpuConv) -> Result<Tensor> {
        let shape = shapes::conv_bwd(&dy.shape, c.cin, c.cout)?;
        let (b, h, w, co) = nhwc(&dy.shape)?;
        let d = ConvDims {
            b,
            h,
            w,
            cin: co,
            cout: c.cin,
            k: c.k,
        };
        let dx = conv::conv_nhwc(&dy.data, d, &c.bwd, None);
        Tensor::new(shape, dx)
    }

    fn group_norm_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        ss: Option<&Tensor>,
        silu: bool,
        dy: &Tensor,
    ) -> Result<Tensor> {
        shapes::same("group_norm_bwd", &x.shape, &dy.shape)?;
        let a = gn_args(x, gamma, beta, ss, silu)?;
        Tensor::new(x.shape.clone(), norm::backward(&x.data, &dy.data, &a))
    }

    fn avg_pool2_bwd(&self, dy: &Tensor) -> Result<Tensor> {
        let g = self.upsample2(dy)?;
        Tensor::new(g.shape, g.data.into_iter().map(|v| v * 0.25).collect())
    }

    fn attention_bwd(
        &self,
        qkv: &Tensor,
        dout: &Tensor,
        heads: usize,
        legacy: bool,
    ) -> Result<Tensor> {
        let shape = shapes::attention_bwd(&qkv.shape, &dout.shape, heads)?;
        let (b, h, w, c) = nhwc(&dout.shape)?;
        Tensor::new(
            shape,
            attention::backward(&qkv.data, &dout.data, b, h * w, c, heads, legacy),
        )
    }

    fn prepend_mean_bwd(&self, dtok: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
        let shape = shapes::prepend_mean_bwd(&dtok.shape, hw)?;
        let (b, _, _, c) = nhwc(&shape)?;
        let t = hw.0 * hw.1;
        let t1 = t + 1;
        let mut dx = vec![0f32; b * t * c];
        for bi in 0..b {
            let src = &dtok.data[bi * t1 * c..(bi + 1) * t1 * c];
            for i in 0..t {
                for ch in 0..c {
                    dx[(bi * t + i) * c + ch] = src[(i + 1) * c + ch] + src[ch] / t as f32;
                }
            }
        }
        Tensor::new(shape, dx)
    }

    fn token0_bwd(&self, d0: &Tensor, tokens: usize) -> Result<Tensor> {
        let shape = shapes::token0_bwd(&d0.shape, tokens)?;
        let (b, _, _, c) = nhwc(&d0.shape)?;
        let mut d = vec![0f32; b * tokens * c];
        for bi in 0..b {
            d[bi * tokens * c..bi * tokens * c + c].copy_from_slice(&d0.data[bi * c..(bi + 1) * c]);
        }
        Tensor::new(shape, d)
    }

    fn log_softmax_grad(&self, logits: &Tensor, y: &[usize]) -> Result<Tensor> {
        let shape = shapes::log_softmax_grad(&logits.shape, y)?;
        let (b, _, _, k) = nhwc(&shape)?;
        let mut g = vec![0f32; b * k];
        for bi in 0..b {
            let row = &logits.data[bi * k..(bi + 1) * k];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            for j in 0..k {
                let p = (row[j] as f64 - m).exp() / z;
                g[bi * k + j] = ((if j == y[bi] { 1.0 } else { 0.0 }) - p) as f32;
            }
        }
        Tensor::new(shape, g)
    }

    fn duplicate(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn copy_into(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        shapes::same("copy_into", &dst.shape, &src.shape)?;
        dst.data.copy_from_slice(&src.data);
        Ok(())
    }

    fn flag_non_finite(&self, t: &Tensor, flag: &mut Tensor, stage: u32) -> Result<()> {
        shapes::same("flag_non_finite", &flag.shape, &[1])?;
        let value = flag_value(stage)?;
        if flag.data[0] == 0.0 && t.first_non_finite().is_some() {
            flag.data[0] = value;
        }
        Ok(())
    }

    fn ddim_invert(&self, x: &mut Tensor, eps: &Tensor, c: DdimCoefs) -> Result<()> {
        shapes::same("ddim_invert", &x.shape, &eps.shape)?;
        ddim::invert_step(&mut x.data, &eps.data, c);
        Ok(())
    }

    fn ddim_denoise(&self, x: &mut Tensor, eps: &Tensor, c: DdimCoefs) -> Result<()> {
        shapes::same("ddim_denoise", &x.shape, &eps.shape)?;
        ddim::denoise_step(&mut x.data, &eps.data, c);
        Ok(())
    }

    fn axpy(&self, x: &mut Tensor, s: f32, g: &Tensor) -> Result<()> {
        shapes::same("axpy", &x.shape, &g.shape)?;
        x.data
            .iter_mut()
            .zip(&g.data)
            .for_each(|(x, &g)| *x += s * g);
        Ok(())
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        shapes::same("axpby", &x.shape, &y.shape)?;
        Tensor::new(
            x.shape.clone(),
            x.data
                .iter()
                .zip(&y.data)
                .map(|(&x, &y)| a * x + b * y)
                .collect(),
        )
    }

    fn normalize(&self, raw: &Tensor) -> Result<Tensor> {
        let shape = shapes::normalize(&raw.shape)?;
        let (_, h, w, _) = nhwc(&shape)?;
        Tensor::new(shape, post::normalize_batch(&raw.data, h * w)?)
    }

    fn anomaly(&self, x0: &Tensor, xhat: &Tensor, hist_match: bool) -> Result<Anomaly<Tensor>> {
        let shape = shapes::anomaly(&x0.shape, &xhat.shape)?;
        let (_, h, w, _) = nhwc(&shape)?;
        let (map, difference) = post::anomaly_map_batch(&x0.data, &xhat.data, h * w, hist_match)?;
        Ok(Anomaly {
            map: Tensor::new(shape.clone(), map)?,
            difference: Tensor::new(shape, difference)?,
        })
    }
}
