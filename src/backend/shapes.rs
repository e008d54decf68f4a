//! One shape check per `Backend` operation, used by both backends so that
//! they accept the same operands and refuse the others with the same
//! sentence. Each takes its operands' shapes and returns the output's.

use super::{Backend, ConvPost, ConvPre, Resample};
use anyhow::{bail, ensure, Result};

/// GroupNorm's group count (the networks' only one).
pub const GROUPS: usize = 32;

/// Shape of a row-major `c (m x n, row stride ldc) = a (m x k, lda) @ b (k x
/// n, ldb)`, strides of the operands as stored (a transposed operand's
/// rows are its stored rows).
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl GemmShape {
    /// Every operand stored densely, untransposed.
    pub fn packed(m: usize, n: usize, k: usize) -> GemmShape {
        GemmShape {
            m,
            n,
            k,
            lda: k,
            ldb: n,
            ldc: n,
        }
    }
}

/// A 'same' convolution's sizes: input `[b, h, w, cin]`, output
/// `[b, h, w, cout]`, weights `(k*k*cin) x cout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
}

impl ConvDims {
    pub fn pixels(&self) -> usize {
        self.b * self.h * self.w
    }
}

/// `(B, H, W, C)` of an NHWC shape.
pub fn nhwc(s: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match s[..] {
        [b, h, w, c] => Ok((b, h, w, c)),
        _ => bail!("expected an NHWC tensor, got shape {s:?}"),
    }
}

/// Operands of one shape (`op` names the operation).
pub fn same(op: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    ensure!(a == b, "{op}: shapes {a:?} and {b:?} differ");
    Ok(a.to_vec())
}

/// `(B, C)` of a `[B,1,1,C]` vector per batch item.
fn vectors(op: &str, what: &str, s: &[usize]) -> Result<(usize, usize)> {
    let (b, h, w, c) = nhwc(s)?;
    ensure!(
        h * w == 1,
        "{op}: {what} {s:?} is not one vector per batch item"
    );
    Ok((b, c))
}

/// `(cout, cin, k)` of a convolution weight (out, in, k, k), (out, in, 1)
/// or (out, in) with k 1 or 3, and its bias (out).
pub fn conv_weights(w: &[usize], bias: &[usize]) -> Result<(usize, usize, usize)> {
    let (cout, cin, k) = match w[..] {
        [o, i, kh, kw] if kh == kw && (kh == 1 || kh == 3) => (o, i, kh),
        [o, i, 1] | [o, i] => (o, i, 1),
        _ => bail!("convolution weight of shape {w:?} is not (out, in, 3, 3), (out, in, 1, 1), (out, in, 1) or (out, in)"),
    };
    ensure!(
        bias == [cout],
        "convolution bias of shape {bias:?} for {cout} outputs"
    );
    Ok((cout, cin, k))
}

pub fn conv(x: &[usize], cin: usize, cout: usize) -> Result<Vec<usize>> {
    let (b, h, w, c) = nhwc(x)?;
    ensure!(
        c == cin,
        "conv: input has {c} channels, the weights expect {cin}"
    );
    Ok(vec![b, h, w, cout])
}

pub fn conv_bwd(dy: &[usize], cin: usize, cout: usize) -> Result<Vec<usize>> {
    let (b, h, w, c) = nhwc(dy)?;
    ensure!(
        c == cout,
        "conv_bwd: gradient has {c} channels, the weights give {cout}"
    );
    Ok(vec![b, h, w, cin])
}

/// `conv_fused`'s operands, checked in the order its composition runs.
pub fn conv_fused<B: Backend + ?Sized>(
    be: &B,
    x: &B::T,
    (cin, cout): (usize, usize),
    pre: &ConvPre<'_, B::T>,
    post: &ConvPost<'_, B::T>,
) -> Result<Vec<usize>> {
    let mut a = be.dims(x).to_vec();
    if let Some(skip) = pre.skip {
        a = concat(&a, be.dims(skip))?;
    }
    if let Some(n) = &pre.norm {
        group_norm(
            &a,
            be.dims(n.gamma),
            be.dims(n.beta),
            n.ss.map(|s| be.dims(s)),
        )?;
    }
    a = match pre.resample {
        Resample::None => a,
        Resample::Down => avg_pool2(&a)?,
        Resample::Up => upsample2(&a)?,
    };
    let mut y = conv(&a, cin, cout)?;
    if let Some(e) = post.bcast {
        y = add(&y, be.dims(e))?;
    }
    if let Some(r) = post.residual {
        y = add(&y, be.dims(r))?;
    }
    Ok(y)
}

/// GroupNorm of `x` with affine `gamma`, `beta` (C each) and an optional
/// scale/shift `ss` `[B,1,1,2C]`.
pub fn group_norm(
    x: &[usize],
    gamma: &[usize],
    beta: &[usize],
    ss: Option<&[usize]>,
) -> Result<Vec<usize>> {
    let (b, _, _, c) = nhwc(x)?;
    ensure!(
        c % GROUPS == 0,
        "group_norm: {c} channels are not a multiple of {GROUPS}"
    );
    let (ng, nb): (usize, usize) = (gamma.iter().product(), beta.iter().product());
    ensure!(
        ng == c && nb == c,
        "group_norm: affine of {ng} / {nb} for {c} channels"
    );
    if let Some(ss) = ss {
        ensure!(
            ss == [b, 1, 1, 2 * c],
            "group_norm: scale/shift {ss:?} for x {x:?}"
        );
    }
    Ok(x.to_vec())
}

/// `a + b`, `b` of `a`'s shape or `[B,1,1,C]`.
pub fn add(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    if a == b {
        return Ok(a.to_vec());
    }
    let (n, _, _, c) = nhwc(a)?;
    ensure!(b == [n, 1, 1, c], "add: cannot broadcast {b:?} onto {a:?}");
    Ok(a.to_vec())
}

pub fn avg_pool2(x: &[usize]) -> Result<Vec<usize>> {
    let (b, h, w, c) = nhwc(x)?;
    ensure!(
        h % 2 == 0 && w % 2 == 0,
        "avg_pool2: odd spatial size {h} x {w}"
    );
    Ok(vec![b, h / 2, w / 2, c])
}

/// `upsample2`, and `avg_pool2_bwd` (the same shapes).
pub fn upsample2(x: &[usize]) -> Result<Vec<usize>> {
    let (b, h, w, c) = nhwc(x)?;
    Ok(vec![b, 2 * h, 2 * w, c])
}

pub fn concat(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let (n, h, w, ca) = nhwc(a)?;
    let (n2, h2, w2, cb) = nhwc(b)?;
    ensure!(
        (n, h, w) == (n2, h2, w2),
        "concat: shapes {a:?} and {b:?} differ outside channels"
    );
    Ok(vec![n, h, w, ca + cb])
}

pub fn timestep_embedding(batch: usize, dim: usize) -> Result<Vec<usize>> {
    ensure!(
        dim >= 2 && dim.is_multiple_of(2),
        "timestep embedding of odd width {dim}"
    );
    Ok(vec![batch, 1, 1, dim])
}

/// `x` `[B,1,1,D]`, `table` `[K,D]`, one row below K per batch item.
pub fn add_rows(x: &[usize], table: &[usize], rows: &[usize]) -> Result<Vec<usize>> {
    let (b, dim) = vectors("add_rows", "x", x)?;
    let &[k, d] = table else {
        bail!("add_rows: table {table:?} for width {dim}");
    };
    ensure!(d == dim, "add_rows: table {table:?} for width {dim}");
    ensure!(
        rows.len() == b,
        "add_rows: {} rows for a batch of {b}",
        rows.len()
    );
    for &r in rows {
        ensure!(
            r < k,
            "label {r} is out of range: the embedding has {k} classes"
        );
    }
    Ok(x.to_vec())
}

/// `(B, H, W, C)` of attention on `qkv` `[B,H,W,3C]` over `heads` heads.
fn attention_dims(op: &str, qkv: &[usize], heads: usize) -> Result<(usize, usize, usize, usize)> {
    let (b, h, w, c3) = nhwc(qkv)?;
    ensure!(
        heads > 0 && c3 % (3 * heads) == 0,
        "{op}: {c3} qkv channels for {heads} heads"
    );
    Ok((b, h, w, c3 / 3))
}

pub fn attention(qkv: &[usize], heads: usize) -> Result<Vec<usize>> {
    let (b, h, w, c) = attention_dims("attention", qkv, heads)?;
    Ok(vec![b, h, w, c])
}

/// `dout` of `attention`'s output shape; the gradient has `qkv`'s.
pub fn attention_bwd(qkv: &[usize], dout: &[usize], heads: usize) -> Result<Vec<usize>> {
    let (b, h, w, c) = attention_dims("attention_bwd", qkv, heads)?;
    ensure!(
        dout == [b, h, w, c],
        "attention_bwd: gradient {dout:?} for qkv {qkv:?}"
    );
    Ok(qkv.to_vec())
}

/// `x` `[B,H,W,C]`, `pos` `[H W + 1, C]`; gives `[B,1,H W + 1,C]`.
pub fn prepend_mean(x: &[usize], pos: &[usize]) -> Result<Vec<usize>> {
    let (b, h, w, c) = nhwc(x)?;
    let t = h * w;
    ensure!(
        pos == [t + 1, c],
        "positional embedding {pos:?} for {} tokens of {c} channels",
        t + 1
    );
    Ok(vec![b, 1, t + 1, c])
}

/// `dtok` `[B,1,T+1,C]` for `x` of spatial shape `hw` (T pixels).
pub fn prepend_mean_bwd(dtok: &[usize], hw: (usize, usize)) -> Result<Vec<usize>> {
    let (b, h, w, c) = nhwc(dtok)?;
    let t1 = h * w;
    ensure!(
        t1 == hw.0 * hw.1 + 1,
        "prepend_mean_bwd: {t1} tokens for {} x {}",
        hw.0,
        hw.1
    );
    Ok(vec![b, hw.0, hw.1, c])
}

pub fn token0(x: &[usize]) -> Result<Vec<usize>> {
    let (b, h, w, c) = nhwc(x)?;
    ensure!(h * w > 0, "token0: a sequence of no tokens");
    Ok(vec![b, 1, 1, c])
}

pub fn token0_bwd(d0: &[usize], tokens: usize) -> Result<Vec<usize>> {
    let (b, c) = vectors("token0_bwd", "gradient", d0)?;
    ensure!(tokens > 0, "token0_bwd: a sequence of no tokens");
    Ok(vec![b, 1, tokens, c])
}

/// Logits `[B,1,1,K]` and one label below K per batch item.
pub fn log_softmax_grad(logits: &[usize], y: &[usize]) -> Result<Vec<usize>> {
    let (b, k) = vectors("log_softmax_grad", "logits", logits)?;
    ensure!(
        y.len() == b,
        "log_softmax_grad: {} labels for a batch of {b}",
        y.len()
    );
    for &label in y {
        ensure!(
            label < k,
            "label {label} is out of range for {k} classifier outputs"
        );
    }
    Ok(logits.to_vec())
}

/// A batch of one-channel slices `[B,H,W,1]`.
fn slices(op: &str, s: &[usize]) -> Result<Vec<usize>> {
    let (_, _, _, c) = nhwc(s)?;
    ensure!(c == 1, "{op}: slices have one channel, got {c}");
    Ok(s.to_vec())
}

pub fn normalize(raw: &[usize]) -> Result<Vec<usize>> {
    slices("normalize", raw)
}

pub fn anomaly(x0: &[usize], xhat: &[usize]) -> Result<Vec<usize>> {
    same("anomaly", x0, xhat)?;
    slices("anomaly", x0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.expect_err("refused"))
    }

    #[test]
    fn attention_refuses_no_heads() {
        let e = err(attention(&[1, 1, 4, 48], 0));
        assert!(e.contains("48 qkv channels for 0 heads"), "{e}");
        let e = err(attention_bwd(&[1, 1, 4, 48], &[1, 1, 4, 16], 0));
        assert!(
            e.contains("attention_bwd: 48 qkv channels for 0 heads"),
            "{e}"
        );
        assert_eq!(attention(&[2, 4, 4, 48], 2).unwrap(), [2, 4, 4, 16]);
    }

    #[test]
    fn vectors_are_one_per_batch_item() {
        let e = err(token0_bwd(&[2, 2, 1, 8], 3));
        assert!(e.contains("not one vector per batch item"), "{e}");
        let e = err(log_softmax_grad(&[2, 1, 1, 4], &[0, 4]));
        assert!(e.contains("label 4 is out of range for 4"), "{e}");
        assert_eq!(token0_bwd(&[2, 1, 1, 8], 3).unwrap(), [2, 1, 3, 8]);
    }
}
