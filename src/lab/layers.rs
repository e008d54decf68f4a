//! The walk over a network's layers that gives the shapes of its work: every convolution
//! (and the backward-data product the classifier's input gradient runs through it), every
//! attention layer and GroupNorm input, in order, repeats included. The tournament times
//! these shapes; nothing here knows a backend.

use std::collections::BTreeSet;

use crate::backend::Resample;
use crate::model::spec::{Layer, NetKind, NetSpec};

/// What feeds a convolution's prologue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pre {
    Raw,
    /// GroupNorm (attention's qkv).
    Norm,
    /// GroupNorm and SiLU (ResBlocks, the UNet's head).
    NormSilu,
}

/// One convolution of a network at batch 1 (the output grid h x w), and
/// whether it is a backward-data product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConvLayer {
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub resample: u8,
    pub pre: Pre,
    pub bwd: bool,
}

impl ConvLayer {
    pub fn resample(&self) -> Resample {
        match self.resample {
            1 => Resample::Up,
            2 => Resample::Down,
            _ => Resample::None,
        }
    }

    pub fn flops(&self, b: usize) -> f64 {
        2.0 * (b * self.h * self.w * self.cout * self.k * self.k * self.cin) as f64
    }
}

/// The layers of one network, in order, repeats included.
#[derive(Default)]
pub struct Layers {
    pub convs: Vec<ConvLayer>,
    /// `(side, ch, heads)`.
    pub attention: Vec<(usize, usize, usize)>,
    /// GroupNorm inputs `(side, ch)`.
    pub norms: Vec<(usize, usize)>,
}

/// Every convolution of `spec` (with `bwd`, each followed by the
/// backward-data product the classifier's input gradient runs through
/// it), attention layer and GroupNorm input.
pub fn layers(spec: &NetSpec, bwd: bool) -> Layers {
    let mut out = Layers::default();
    let mut side = spec.image_size;
    let conv = |out: &mut Layers, k, cin, cout, side, resample: Resample, pre| {
        let code = match resample {
            Resample::None => 0,
            Resample::Up => 1,
            Resample::Down => 2,
        };
        let l = ConvLayer {
            k,
            cin,
            cout,
            h: side,
            w: side,
            resample: code,
            pre,
            bwd: false,
        };
        out.convs.push(l);
        if bwd {
            out.convs.push(ConvLayer {
                cin: cout,
                cout: cin,
                resample: 0,
                pre: Pre::Raw,
                bwd: true,
                ..l
            });
        }
    };
    for l in spec
        .input_blocks
        .iter()
        .flatten()
        .chain(&spec.middle)
        .chain(spec.output_blocks.iter().flatten())
    {
        match *l {
            Layer::Conv { cin, cout, .. } => {
                conv(&mut out, 3, cin, cout, side, Resample::None, Pre::Raw)
            }
            Layer::Res {
                cin,
                cout,
                resample,
                ..
            } => {
                out.norms.push((side, cin));
                match resample {
                    Resample::Down => side /= 2,
                    Resample::Up => side *= 2,
                    Resample::None => {}
                }
                out.norms.push((side, cout));
                conv(&mut out, 3, cin, cout, side, resample, Pre::NormSilu);
                conv(&mut out, 3, cout, cout, side, Resample::None, Pre::NormSilu);
                if cin != cout {
                    conv(&mut out, 1, cin, cout, side, resample, Pre::Raw);
                }
            }
            Layer::Attn { ch, heads, .. } => {
                out.norms.push((side, ch));
                out.attention.push((side, ch, heads));
                conv(&mut out, 1, ch, 3 * ch, side, Resample::None, Pre::Norm);
                conv(&mut out, 1, ch, ch, side, Resample::None, Pre::Raw);
            }
        }
    }
    if spec.kind == NetKind::Unet {
        out.norms.push((side, spec.head_ch));
        let (cin, cout) = (spec.head_ch, spec.out_channels);
        conv(&mut out, 3, cin, cout, side, Resample::None, Pre::NormSilu);
    }
    out
}

/// The distinct members of `v`, in order.
pub fn distinct<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut seen = BTreeSet::new();
    v.iter()
        .filter(|x| seen.insert((*x).clone()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    /// The layers the tournament times are the networks' own: their
    /// products add up to `NetSpec::forward_flops`, counted independently.
    #[test]
    fn the_layers_are_the_networks_work() {
        let cfg = Config::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/published/config_t1_cond_multiclass_cg.yaml"),
        )
        .unwrap();
        for (kind, net) in [
            (NetKind::Unet, &cfg.unet),
            (NetKind::Classifier, &cfg.classifier),
        ] {
            let spec = NetSpec::build(net, kind);
            let l = layers(&spec, kind == NetKind::Classifier);
            let fwd: f64 = l.convs.iter().filter(|c| !c.bwd).map(|c| c.flops(1)).sum();
            let bwd: f64 = l.convs.iter().filter(|c| c.bwd).map(|c| c.flops(1)).sum();
            let attn: f64 = l
                .attention
                .iter()
                .map(|&(side, ch, _)| 4.0 * (side * side * side * side * ch) as f64)
                .sum();
            let want = spec.forward_flops();
            assert!(
                ((fwd + attn) / want - 1.0).abs() < 1e-12,
                "{kind:?}: {} vs {want}",
                fwd + attn
            );
            if kind == NetKind::Classifier {
                assert_eq!(bwd, fwd, "every forward conv has its backward-data product");
            }
            let shapes = distinct(&l.convs);
            assert!(shapes.len() < l.convs.len(), "{kind:?}: repeats merged");
            assert!(shapes.iter().any(|c| c.resample == 2));
            println!(
                "{kind:?}: {} convolutions, {} distinct",
                l.convs.len(),
                shapes.len()
            );
        }
    }
}
