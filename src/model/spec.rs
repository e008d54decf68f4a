//! The two networks described once, from the config, as data: the layers,
//! their channel counts and the state-dict names and shapes of their weights.

use crate::config::NetConfig;

pub use crate::backend::Resample;

#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// A 3x3 convolution (`input_blocks.0.0`).
    Conv {
        name: String,
        cin: usize,
        cout: usize,
    },
    Res {
        name: String,
        cin: usize,
        cout: usize,
        resample: Resample,
    },
    Attn {
        name: String,
        ch: usize,
        heads: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetKind {
    Unet,
    Classifier,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NetSpec {
    pub kind: NetKind,
    pub image_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    pub emb_dim: usize,
    pub num_classes: Option<usize>,
    pub scale_shift: bool,
    /// Head order of the AttentionBlocks (AttentionPool2d is always "new").
    pub legacy_attention: bool,
    pub input_blocks: Vec<Vec<Layer>>,
    pub middle: Vec<Layer>,
    /// UNet only; each block starts on `concat([h, skip])`.
    pub output_blocks: Vec<Vec<Layer>>,
    /// Channels entering the head.
    pub head_ch: usize,
    /// Classifier only: heads of the attention pool and its spatial side.
    pub pool_heads: usize,
    pub pool_side: usize,
}

impl NetSpec {
    pub fn build(cfg: &NetConfig, kind: NetKind) -> Self {
        let mc = cfg.model_channels;
        let attn = |ds: usize| cfg.attention_resolutions.contains(&ds);
        let mut input_blocks = vec![vec![Layer::Conv {
            name: "input_blocks.0.0".into(),
            cin: cfg.in_channels,
            cout: mc,
        }]];
        let mut skips = vec![mc];
        let (mut ch, mut ds) = (mc, 1usize);
        let last = cfg.channel_mult.len() - 1;
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let i = input_blocks.len();
                let mut block = vec![Layer::Res {
                    name: format!("input_blocks.{i}.0"),
                    cin: ch,
                    cout: mult * mc,
                    resample: Resample::None,
                }];
                ch = mult * mc;
                if attn(ds) {
                    block.push(Layer::Attn {
                        name: format!("input_blocks.{i}.1"),
                        ch,
                        heads: cfg.heads(ch),
                    });
                }
                input_blocks.push(block);
                skips.push(ch);
            }
            if level != last {
                let i = input_blocks.len();
                input_blocks.push(vec![Layer::Res {
                    name: format!("input_blocks.{i}.0"),
                    cin: ch,
                    cout: ch,
                    resample: Resample::Down,
                }]);
                skips.push(ch);
                ds *= 2;
            }
        }
        let middle = vec![
            Layer::Res {
                name: "middle_block.0".into(),
                cin: ch,
                cout: ch,
                resample: Resample::None,
            },
            Layer::Attn {
                name: "middle_block.1".into(),
                ch,
                heads: cfg.heads(ch),
            },
            Layer::Res {
                name: "middle_block.2".into(),
                cin: ch,
                cout: ch,
                resample: Resample::None,
            },
        ];
        let mut output_blocks = Vec::new();
        if kind == NetKind::Unet {
            for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
                for i in 0..=cfg.num_res_blocks {
                    let n = output_blocks.len();
                    let skip = skips.pop().expect("one skip per input block");
                    let mut block = vec![Layer::Res {
                        name: format!("output_blocks.{n}.0"),
                        cin: ch + skip,
                        cout: mc * mult,
                        resample: Resample::None,
                    }];
                    ch = mc * mult;
                    if attn(ds) {
                        block.push(Layer::Attn {
                            name: format!("output_blocks.{n}.1"),
                            ch,
                            heads: cfg.heads(ch),
                        });
                    }
                    if level > 0 && i == cfg.num_res_blocks {
                        let j = block.len();
                        block.push(Layer::Res {
                            name: format!("output_blocks.{n}.{j}"),
                            cin: ch,
                            cout: ch,
                            resample: Resample::Up,
                        });
                        ds /= 2;
                    }
                    output_blocks.push(block);
                }
            }
        }
        let pool_heads = if cfg.num_head_channels > 0 {
            ch / cfg.num_head_channels as usize
        } else {
            cfg.num_heads
        };
        Self {
            kind,
            image_size: cfg.image_size,
            in_channels: cfg.in_channels,
            out_channels: cfg.out_channels,
            model_channels: mc,
            emb_dim: 4 * mc,
            num_classes: if kind == NetKind::Unet {
                cfg.num_classes
            } else {
                None
            },
            scale_shift: cfg.use_scale_shift_norm,
            legacy_attention: !cfg.use_new_attention_order,
            input_blocks,
            middle,
            output_blocks,
            head_ch: ch,
            pool_heads,
            pool_side: cfg.image_size / ds,
        }
    }

    /// Every state-dict entry the network needs, with its shape, in order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut put = |name: String, shape: Vec<usize>| out.push((name, shape));
        let (mc, e) = (self.model_channels, self.emb_dim);
        put("time_embed.0.weight".into(), vec![e, mc]);
        put("time_embed.0.bias".into(), vec![e]);
        put("time_embed.2.weight".into(), vec![e, e]);
        put("time_embed.2.bias".into(), vec![e]);
        if let Some(k) = self.num_classes {
            put("label_emb.weight".into(), vec![k, e]);
        }
        let layers = self
            .input_blocks
            .iter()
            .flatten()
            .chain(&self.middle)
            .chain(self.output_blocks.iter().flatten());
        for layer in layers {
            match layer {
                Layer::Conv { name, cin, cout } => {
                    put(format!("{name}.weight"), vec![*cout, *cin, 3, 3]);
                    put(format!("{name}.bias"), vec![*cout]);
                }
                Layer::Res {
                    name, cin, cout, ..
                } => {
                    let (ci, co) = (*cin, *cout);
                    put(format!("{name}.in_layers.0.weight"), vec![ci]);
                    put(format!("{name}.in_layers.0.bias"), vec![ci]);
                    put(format!("{name}.in_layers.2.weight"), vec![co, ci, 3, 3]);
                    put(format!("{name}.in_layers.2.bias"), vec![co]);
                    let ew = if self.scale_shift { 2 * co } else { co };
                    put(format!("{name}.emb_layers.1.weight"), vec![ew, e]);
                    put(format!("{name}.emb_layers.1.bias"), vec![ew]);
                    put(format!("{name}.out_layers.0.weight"), vec![co]);
                    put(format!("{name}.out_layers.0.bias"), vec![co]);
                    put(format!("{name}.out_layers.3.weight"), vec![co, co, 3, 3]);
                    put(format!("{name}.out_layers.3.bias"), vec![co]);
                    if ci != co {
                        put(format!("{name}.skip_connection.weight"), vec![co, ci, 1, 1]);
                        put(format!("{name}.skip_connection.bias"), vec![co]);
                    }
                }
                Layer::Attn { name, ch, .. } => {
                    put(format!("{name}.norm.weight"), vec![*ch]);
                    put(format!("{name}.norm.bias"), vec![*ch]);
                    put(format!("{name}.qkv.weight"), vec![3 * ch, *ch, 1]);
                    put(format!("{name}.qkv.bias"), vec![3 * ch]);
                    put(format!("{name}.proj_out.weight"), vec![*ch, *ch, 1]);
                    put(format!("{name}.proj_out.bias"), vec![*ch]);
                }
            }
        }
        let ch = self.head_ch;
        put("out.0.weight".into(), vec![ch]);
        put("out.0.bias".into(), vec![ch]);
        match self.kind {
            NetKind::Unet => {
                put("out.2.weight".into(), vec![self.out_channels, ch, 3, 3]);
                put("out.2.bias".into(), vec![self.out_channels]);
            }
            NetKind::Classifier => {
                let t = self.pool_side * self.pool_side + 1;
                put("out.2.positional_embedding".into(), vec![ch, t]);
                put("out.2.qkv_proj.weight".into(), vec![3 * ch, ch, 1]);
                put("out.2.qkv_proj.bias".into(), vec![3 * ch]);
                put("out.2.c_proj.weight".into(), vec![self.out_channels, ch, 1]);
                put("out.2.c_proj.bias".into(), vec![self.out_channels]);
            }
        }
        out
    }

    /// An upper bound on the float32 activation bytes one slice keeps alive
    /// at the peak of a forward with its backward tape: every layer's input,
    /// first product and output (the classifier keeps about that much; the
    /// UNet's skips are less), plus eight tensors of the largest layer as the
    /// working set (concatenations, attention's qkv, fused-op scratch).
    pub fn activation_bytes(&self) -> f64 {
        let mut side = self.image_size as f64;
        let mut kept = 0f64;
        let mut largest = 0f64;
        for l in self
            .input_blocks
            .iter()
            .flatten()
            .chain(&self.middle)
            .chain(self.output_blocks.iter().flatten())
        {
            let ch = match l {
                Layer::Conv { cout, .. } => *cout,
                Layer::Res {
                    cin,
                    cout,
                    resample,
                    ..
                } => {
                    match resample {
                        Resample::Down => side /= 2.0,
                        Resample::Up => side *= 2.0,
                        Resample::None => {}
                    }
                    *cin.max(cout)
                }
                Layer::Attn { ch, .. } => 3 * ch,
            };
            let bytes = 4.0 * side * side * ch as f64;
            kept += 3.0 * bytes;
            largest = largest.max(bytes);
        }
        kept + 8.0 * largest
    }

    /// Multiply-accumulates x 2 of one forward at batch 1 (convolutions,
    /// linear layers and attention; normalisation is not counted).
    pub fn forward_flops(&self) -> f64 {
        let mut flops = 0f64;
        let mut side = self.image_size as f64;
        let conv = |side: f64, cin: usize, cout: usize, k: usize| {
            2.0 * side * side * (cin * cout * k * k) as f64
        };
        let mut layer = |l: &Layer, side: &mut f64| match l {
            Layer::Conv { cin, cout, .. } => flops += conv(*side, *cin, *cout, 3),
            Layer::Res {
                cin,
                cout,
                resample,
                ..
            } => {
                match resample {
                    Resample::Down => *side /= 2.0,
                    Resample::Up => *side *= 2.0,
                    Resample::None => {}
                }
                flops += conv(*side, *cin, *cout, 3) + conv(*side, *cout, *cout, 3);
                if cin != cout {
                    flops += conv(*side, *cin, *cout, 1);
                }
            }
            Layer::Attn { ch, .. } => {
                let t = *side * *side;
                flops += conv(*side, *ch, 4 * ch, 1) + 4.0 * t * t * *ch as f64;
            }
        };
        for l in self
            .input_blocks
            .iter()
            .flatten()
            .chain(&self.middle)
            .chain(self.output_blocks.iter().flatten())
        {
            layer(l, &mut side);
        }
        if self.kind == NetKind::Unet {
            flops += conv(side, self.head_ch, self.out_channels, 3);
        }
        flops
    }
}
