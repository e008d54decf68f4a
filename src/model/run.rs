//! The two networks run on any backend: the UNet forward, and the
//! classifier's forward with the input gradient of its log-probability.

use super::spec::{Layer, NetKind, NetSpec, Resample};
use super::weights::Bound;
use crate::backend::{Backend, ConvPost, ConvPre, Norm};
use anyhow::{ensure, Result};

/// A layer's output, and what it keeps for the backward pass when asked.
type Step<T> = (T, Option<Saved<T>>);

/// A network bound to a backend.
pub struct Net<B: Backend> {
    pub spec: NetSpec,
    pub w: Bound<B>,
}

/// What a ResBlock or AttentionBlock keeps for the backward pass.
enum Saved<T> {
    Conv,
    Res { x: T, h1: T, e: T },
    Attn { x: T, qkv: T },
}

impl<B: Backend> Net<B> {
    /// `SiLU(emb)`, the input of every ResBlock's `emb_layers`, for
    /// timesteps `ts` (and labels `y` when the network has classes).
    pub fn embed(&self, b: &B, ts: &[usize], y: Option<&[usize]>) -> Result<B::T> {
        let sin = b.timestep_embedding(ts, self.spec.model_channels)?;
        let h = b.silu(&b.conv(&sin, self.w.conv("time_embed.0"))?)?;
        let mut emb = b.conv(&h, self.w.conv("time_embed.2"))?;
        if self.spec.num_classes.is_some() {
            let y = y.ok_or_else(|| {
                anyhow::anyhow!("the UNet has num_classes set: labels are required")
            })?;
            emb = b.add_rows(&emb, self.w.vec("label_emb.weight"), y)?;
        }
        b.silu(&emb)
    }

    fn norm<'a>(&'a self, name: &str, ss: Option<&'a B::T>, silu: bool) -> Norm<'a, B::T> {
        Norm {
            gamma: self.w.vec(&format!("{name}.weight")),
            beta: self.w.vec(&format!("{name}.bias")),
            ss,
            silu,
        }
    }

    fn gn(&self, b: &B, x: &B::T, name: &str, ss: Option<&B::T>, silu: bool) -> Result<B::T> {
        b.group_norm(
            x,
            self.w.vec(&format!("{name}.weight")),
            self.w.vec(&format!("{name}.bias")),
            ss,
            silu,
        )
    }

    fn gn_bwd(
        &self,
        b: &B,
        x: &B::T,
        name: &str,
        ss: Option<&B::T>,
        silu: bool,
        dy: &B::T,
    ) -> Result<B::T> {
        b.group_norm_bwd(
            x,
            self.w.vec(&format!("{name}.weight")),
            self.w.vec(&format!("{name}.bias")),
            ss,
            silu,
            dy,
        )
    }

    /// One layer on `x`, or on the concatenation `[x, skip]` (an output
    /// block's first layer), which a ResBlock that projects its residual
    /// reads in place and every other layer gets materialised.
    fn layer(
        &self,
        b: &B,
        l: &Layer,
        x: B::T,
        skip: Option<B::T>,
        semb: &B::T,
        keep: bool,
    ) -> Result<Step<B::T>> {
        let (x, skip) = match (skip, l) {
            (Some(s), Layer::Res { cin, cout, .. }) if cin != cout && !keep => (x, Some(s)),
            (Some(s), _) => (b.concat(&x, &s)?, None),
            (None, _) => (x, None),
        };
        let skip = skip.as_ref();
        match l {
            Layer::Conv { name, .. } => {
                Ok((b.conv(&x, self.w.conv(name))?, keep.then_some(Saved::Conv)))
            }
            Layer::Res {
                name,
                cin,
                cout,
                resample,
            } => {
                let e = b.conv(semb, self.w.conv(&format!("{name}.emb_layers.1")))?;
                // Without scale/shift the embedding is added to h1 before
                // the second GroupNorm, as a per-sample bias.
                let h1 = b.conv_fused(
                    &x,
                    self.w.conv(&format!("{name}.in_layers.2")),
                    &ConvPre {
                        skip,
                        norm: Some(self.norm(&format!("{name}.in_layers.0"), None, true)),
                        resample: *resample,
                    },
                    &ConvPost {
                        bcast: (!self.spec.scale_shift).then_some(&e),
                        residual: None,
                    },
                )?;
                let skip_conv =
                    (cin != cout).then(|| self.w.conv(&format!("{name}.skip_connection")));
                let skip = match (skip_conv, resample) {
                    (Some(sc), _) => Some(b.conv_fused(
                        &x,
                        sc,
                        &ConvPre {
                            skip,
                            norm: None,
                            resample: *resample,
                        },
                        &ConvPost::default(),
                    )?),
                    (None, Resample::None) => None,
                    (None, Resample::Down) => Some(b.avg_pool2(&x)?),
                    (None, Resample::Up) => Some(b.upsample2(&x)?),
                };
                let ss = self.spec.scale_shift.then_some(&e);
                let out = b.conv_fused(
                    &h1,
                    self.w.conv(&format!("{name}.out_layers.3")),
                    &ConvPre {
                        skip: None,
                        norm: Some(self.norm(&format!("{name}.out_layers.0"), ss, true)),
                        resample: Resample::None,
                    },
                    &ConvPost {
                        bcast: None,
                        residual: Some(skip.as_ref().unwrap_or(&x)),
                    },
                )?;
                Ok((out, keep.then_some(Saved::Res { x, h1, e })))
            }
            Layer::Attn { name, heads, .. } => {
                let qkv = b.conv_fused(
                    &x,
                    self.w.conv(&format!("{name}.qkv")),
                    &ConvPre {
                        skip: None,
                        norm: Some(self.norm(&format!("{name}.norm"), None, false)),
                        resample: Resample::None,
                    },
                    &ConvPost::default(),
                )?;
                let a = b.attention(&qkv, *heads, self.spec.legacy_attention)?;
                let out = b.conv_fused(
                    &a,
                    self.w.conv(&format!("{name}.proj_out")),
                    &ConvPre::default(),
                    &ConvPost {
                        bcast: None,
                        residual: Some(&x),
                    },
                )?;
                Ok((out, keep.then(|| Saved::Attn { x, qkv })))
            }
        }
    }

    fn layer_bwd(&self, b: &B, l: &Layer, saved: &Saved<B::T>, dout: B::T) -> Result<B::T> {
        match (l, saved) {
            (Layer::Conv { name, .. }, Saved::Conv) => b.conv_bwd(&dout, self.w.conv(name)),
            (
                Layer::Res {
                    name,
                    cin,
                    cout,
                    resample,
                },
                Saved::Res { x, h1, e },
            ) => {
                let mut dxs = if cin != cout {
                    b.conv_bwd(&dout, self.w.conv(&format!("{name}.skip_connection")))?
                } else {
                    b.duplicate(&dout)?
                };
                let dh2 = b.conv_bwd(&dout, self.w.conv(&format!("{name}.out_layers.3")))?;
                let ss = self.spec.scale_shift.then_some(e);
                let dh1 = self.gn_bwd(b, h1, &format!("{name}.out_layers.0"), ss, true, &dh2)?;
                let mut da = b.conv_bwd(&dh1, self.w.conv(&format!("{name}.in_layers.2")))?;
                match resample {
                    Resample::None => {}
                    Resample::Down => {
                        da = b.avg_pool2_bwd(&da)?;
                        dxs = b.avg_pool2_bwd(&dxs)?;
                    }
                    Resample::Up => anyhow::bail!("{name}: the input gradient through an up-sampling block is not needed and not implemented"),
                }
                let dx = self.gn_bwd(b, x, &format!("{name}.in_layers.0"), None, true, &da)?;
                b.add(&dx, &dxs)
            }
            (Layer::Attn { name, heads, .. }, Saved::Attn { x, qkv }) => {
                let da = b.conv_bwd(&dout, self.w.conv(&format!("{name}.proj_out")))?;
                let dqkv = b.attention_bwd(qkv, &da, *heads, self.spec.legacy_attention)?;
                let dn = b.conv_bwd(&dqkv, self.w.conv(&format!("{name}.qkv")))?;
                let dx = self.gn_bwd(b, x, &format!("{name}.norm"), None, false, &dn)?;
                b.add(&dx, &dout)
            }
            _ => unreachable!("the tape is built from the same layer list"),
        }
    }

    fn check_input(&self, b: &B, x: &B::T, ts: &[usize]) -> Result<()> {
        let d = b.dims(x);
        let s = self.spec.image_size;
        ensure!(
            d.len() == 4 && d[1] == s && d[2] == s && d[3] == self.spec.in_channels,
            "input of shape {d:?} (NHWC) does not fit the network: {s} x {s} with {} channels",
            self.spec.in_channels
        );
        ensure!(
            ts.len() == d[0],
            "{} timesteps for a batch of {}",
            ts.len(),
            d[0]
        );
        Ok(())
    }

    /// UNet: predicted noise `[B,H,W,out]` for input `[B,H,W,in]`.
    pub fn unet(&self, b: &B, x: &B::T, ts: &[usize], y: &[usize]) -> Result<B::T> {
        ensure!(self.spec.kind == NetKind::Unet, "not a UNet");
        self.check_input(b, x, ts)?;
        let semb = self.embed(b, ts, Some(y))?;
        self.unet_embedded(b, x, &semb)
    }

    /// `unet` with the embedding (`embed`) already made.
    pub fn unet_embedded(&self, b: &B, x: &B::T, semb: &B::T) -> Result<B::T> {
        ensure!(self.spec.kind == NetKind::Unet, "not a UNet");
        let d = b.dims(x);
        self.check_input(b, x, &vec![0; d.first().copied().unwrap_or(0)])?;
        let mut h = b.duplicate(x)?;
        let mut skips = Vec::with_capacity(self.spec.input_blocks.len());
        for block in &self.spec.input_blocks {
            for l in block {
                h = self.layer(b, l, h, None, semb, false)?.0;
            }
            skips.push(b.duplicate(&h)?);
        }
        for l in &self.spec.middle {
            h = self.layer(b, l, h, None, semb, false)?.0;
        }
        for block in &self.spec.output_blocks {
            let mut skip = Some(skips.pop().expect("one skip per output block"));
            for l in block {
                h = self.layer(b, l, h, skip.take(), semb, false)?.0;
            }
        }
        b.conv_fused(
            &h,
            self.w.conv("out.2"),
            &ConvPre {
                skip: None,
                norm: Some(self.norm("out.0", None, true)),
                resample: Resample::None,
            },
            &ConvPost::default(),
        )
    }

    /// Classifier: logits `[B,1,1,K]` and `d/dx sum_b log_softmax(logits_b)[y_b]`.
    pub fn classifier_grad(
        &self,
        b: &B,
        x: &B::T,
        ts: &[usize],
        y: &[usize],
    ) -> Result<(B::T, B::T)> {
        ensure!(self.spec.kind == NetKind::Classifier, "not a classifier");
        self.check_input(b, x, ts)?;
        let semb = self.embed(b, ts, None)?;
        self.classifier_grad_embedded(b, x, &semb, y)
    }

    /// `classifier_grad` with the embedding (`embed`) already made.
    pub fn classifier_grad_embedded(
        &self,
        b: &B,
        x: &B::T,
        semb: &B::T,
        y: &[usize],
    ) -> Result<(B::T, B::T)> {
        ensure!(self.spec.kind == NetKind::Classifier, "not a classifier");
        let d = b.dims(x);
        self.check_input(b, x, &vec![0; d.first().copied().unwrap_or(0)])?;
        let layers: Vec<&Layer> = self
            .spec
            .input_blocks
            .iter()
            .flatten()
            .chain(&self.spec.middle)
            .collect();
        let mut tape = Vec::with_capacity(layers.len());
        let mut h = b.duplicate(x)?;
        for l in &layers {
            let (out, saved) = self.layer(b, l, h, None, semb, true)?;
            tape.push(saved.expect("kept"));
            h = out;
        }
        // Head: GN, SiLU, attention pool, logits of token 0.
        let hw = (self.spec.pool_side, self.spec.pool_side);
        let n = self.gn(b, &h, "out.0", None, true)?;
        let tok = b.prepend_mean(&n, self.w.vec("out.2.positional_embedding"))?;
        let qkv = b.conv(&tok, self.w.conv("out.2.qkv_proj"))?;
        let a = b.attention(&qkv, self.spec.pool_heads, false)?;
        let logits = b.conv(&b.token0(&a)?, self.w.conv("out.2.c_proj"))?;

        let dlogits = b.log_softmax_grad(&logits, y)?;
        let da = b.token0_bwd(
            &b.conv_bwd(&dlogits, self.w.conv("out.2.c_proj"))?,
            hw.0 * hw.1 + 1,
        )?;
        let dqkv = b.attention_bwd(&qkv, &da, self.spec.pool_heads, false)?;
        let dn = b.prepend_mean_bwd(&b.conv_bwd(&dqkv, self.w.conv("out.2.qkv_proj"))?, hw)?;
        let mut g = self.gn_bwd(b, &h, "out.0", None, true, &dn)?;
        for (l, saved) in layers.iter().zip(&tape).rev() {
            g = self.layer_bwd(b, l, saved, g)?;
        }
        Ok((logits, g))
    }
}
