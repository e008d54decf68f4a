//! The published YAML configs, read as they are.
//!
//! Two layouts exist: the diffusion config (`model.params` holds the schedule,
//! `unet_config.params` and `classifier_config.params`) and the classifier
//! training config (`model.params` is the classifier itself).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Architecture parameters shared by the UNet and the classifier (an
/// OpenAI guided-diffusion `UNetModel` / `EncoderUNetModel`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct NetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    pub attention_resolutions: Vec<usize>,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    #[serde(default = "one")]
    pub num_heads: usize,
    #[serde(default = "minus_one")]
    pub num_head_channels: i64,
    #[serde(default)]
    pub use_scale_shift_norm: bool,
    #[serde(default)]
    pub resblock_updown: bool,
    #[serde(default)]
    pub use_new_attention_order: bool,
    #[serde(default)]
    pub num_classes: Option<usize>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub ckpt_path: Option<String>,
}

fn one() -> usize {
    1
}
fn minus_one() -> i64 {
    -1
}

/// The noise schedule of SPEC section 5.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub timesteps: usize,
    pub linear_start: f64,
    pub linear_end: f64,
}

/// Sampler settings the diffusion config's `tester` block carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerDefaults {
    pub noise_level: usize,
    pub guidance: f64,
    pub threshold: f64,
}

/// A whole diffusion config: both networks, the schedule and the defaults.
#[derive(Clone, Debug)]
pub struct Config {
    pub unet: NetConfig,
    pub classifier: NetConfig,
    pub schedule: Schedule,
    pub defaults: SamplerDefaults,
}

impl NetConfig {
    /// Heads of an AttentionBlock with `ch` channels.
    pub fn heads(&self, ch: usize) -> usize {
        if self.num_head_channels > 0 {
            ch / self.num_head_channels as usize
        } else {
            self.num_heads
        }
    }

    /// Refuse configurations this engine does not implement, and ones that
    /// cannot build a network at all, with a sentence naming the field.
    pub fn validate(&self, what: &str) -> Result<()> {
        if !self.resblock_updown {
            bail!("{what}: resblock_updown: false (conv / pool resampling layers) is not supported; the published models use true");
        }
        if self.channel_mult.is_empty() || self.num_res_blocks == 0 {
            bail!("{what}: channel_mult and num_res_blocks must be non-empty / positive");
        }
        for &m in &self.channel_mult {
            if m == 0 || !(m * self.model_channels).is_multiple_of(32) {
                bail!("{what}: channels {} (model_channels {} x mult {m}) are not a multiple of the 32 GroupNorm groups", m * self.model_channels, self.model_channels);
            }
        }
        if !self.model_channels.is_multiple_of(2) {
            bail!(
                "{what}: model_channels {} must be even (timestep embedding)",
                self.model_channels
            );
        }
        let ds_final = 1usize << (self.channel_mult.len() - 1);
        if !self.image_size.is_multiple_of(ds_final) {
            bail!("{what}: image_size {} is not divisible by the final downsampling factor {ds_final}", self.image_size);
        }
        if let Some(p) = &self.pool {
            if p != "attention" {
                bail!("{what}: pool: {p} is not supported (only pool: attention)");
            }
        }
        Ok(())
    }
}

fn get<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a serde_yaml::Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn net(v: &serde_yaml::Value, file: &Path, path: &[&str]) -> Result<NetConfig> {
    let node = get(v, path)
        .with_context(|| format!("{}: no `{}` section", file.display(), path.join(".")))?;
    serde_yaml::from_value(node.clone())
        .with_context(|| format!("{}: bad `{}`", file.display(), path.join(".")))
}

fn f64_at(v: &serde_yaml::Value, path: &[&str], default: f64) -> f64 {
    get(v, path).and_then(|x| x.as_f64()).unwrap_or(default)
}

impl Config {
    pub fn load(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("{}: cannot read", file.display()))?;
        Self::parse(&text, file)
    }

    /// Parse a diffusion config (with `unet_config` and `classifier_config`).
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let v: serde_yaml::Value = serde_yaml::from_str(text)
            .with_context(|| format!("{}: not valid YAML", file.display()))?;
        let unet = net(&v, file, &["model", "params", "unet_config", "params"])?;
        let classifier = net(
            &v,
            file,
            &["model", "params", "classifier_config", "params"],
        )?;
        unet.validate(&format!("{}: unet_config", file.display()))?;
        classifier.validate(&format!("{}: classifier_config", file.display()))?;
        if classifier.pool.is_none() {
            bail!("{}: classifier_config has no `pool`", file.display());
        }
        fn at(k: &'static str) -> [&'static str; 3] {
            ["model", "params", k]
        }
        let schedule = Schedule {
            timesteps: f64_at(&v, &at("timesteps"), 1000.0) as usize,
            linear_start: f64_at(&v, &at("linear_start"), 0.0015),
            linear_end: f64_at(&v, &at("linear_end"), 0.0155),
        };
        let defaults = SamplerDefaults {
            noise_level: f64_at(&v, &["tester", "params", "noise_level"], 100.0) as usize,
            guidance: f64_at(&v, &["tester", "params", "guide_w"], 5.0),
            threshold: f64_at(&v, &["tester", "params", "th"], 0.4),
        };
        if schedule.timesteps == 0 || defaults.noise_level > schedule.timesteps {
            bail!(
                "{}: noise_level {} must be in 1..=timesteps {}",
                file.display(),
                defaults.noise_level,
                schedule.timesteps
            );
        }
        Ok(Self {
            unet,
            classifier,
            schedule,
            defaults,
        })
    }

    /// The classifier of a classifier training config (`model.params`).
    pub fn load_classifier(file: &Path) -> Result<NetConfig> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("{}: cannot read", file.display()))?;
        let v: serde_yaml::Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{}: not valid YAML", file.display()))?;
        let c = net(&v, file, &["model", "params"])?;
        c.validate(&format!("{}: model", file.display()))?;
        Ok(c)
    }
}
