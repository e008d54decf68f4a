//! The published YAML configs, read as they are.
//!
//! Two layouts exist: the diffusion config (`model.params` holds the schedule,
//! `unet_config.params` and `classifier_config.params`) and the classifier
//! training config (`model.params` is the classifier itself).

use anyhow::{anyhow, bail, Context, Result};
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
    /// cannot build a network at all, with a sentence naming the field. Every
    /// size is bounded here, before anything is allocated from it.
    pub fn validate(&self, what: &str) -> Result<()> {
        if !self.resblock_updown {
            bail!("{what}.resblock_updown: false (conv / pool resampling layers) is not supported; the published models use true");
        }
        self.validate_sizes(what)?;
        self.validate_channels(what)?;
        self.validate_heads(what)?;
        if let Some(p) = &self.pool {
            if p != "attention" {
                bail!("{what}.pool: {p} is not supported (only pool: attention)");
            }
        }
        Ok(())
    }

    fn validate_sizes(&self, what: &str) -> Result<()> {
        let (size, levels) = (self.image_size, self.channel_mult.len());
        if !IMAGE_SIZES.contains(&size) {
            bail!("{what}.image_size: {size} is outside {IMAGE_SIZES:?}");
        }
        if !(1..=MAX_LEVELS).contains(&levels) {
            bail!("{what}.channel_mult: {levels} levels, expected 1..={MAX_LEVELS}");
        }
        let ds_final = 1usize << (levels - 1);
        if !size.is_multiple_of(ds_final) {
            bail!("{what}.image_size: {size} is not divisible by the final downsampling factor {ds_final} ({levels} levels of channel_mult)");
        }
        if !(1..=MAX_RES_BLOCKS).contains(&self.num_res_blocks) {
            bail!(
                "{what}.num_res_blocks: {} is outside 1..={MAX_RES_BLOCKS}",
                self.num_res_blocks
            );
        }
        for (key, n) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if !(1..=MAX_CHANNELS).contains(&n) {
                bail!("{what}.{key}: {n} is outside 1..={MAX_CHANNELS}");
            }
        }
        if let Some(k) = self.num_classes {
            if !(1..=MAX_CHANNELS).contains(&k) {
                bail!("{what}.num_classes: {k} is outside 1..={MAX_CHANNELS}");
            }
        }
        Ok(())
    }

    /// GroupNorm splits every level's channels into 32 groups, and the timestep
    /// embedding halves model_channels.
    fn validate_channels(&self, what: &str) -> Result<()> {
        let mc = self.model_channels;
        if mc == 0 || !mc.is_multiple_of(32) || mc > MAX_CHANNELS {
            bail!("{what}.model_channels: {mc} is not a multiple of the 32 GroupNorm groups in 32..={MAX_CHANNELS}");
        }
        for &m in &self.channel_mult {
            let ch = m.checked_mul(mc).filter(|&c| c <= MAX_CHANNELS);
            if m == 0 || ch.is_none() {
                bail!("{what}.channel_mult: {m} gives model_channels {mc} x {m} channels, outside 32..={MAX_CHANNELS}");
            }
        }
        Ok(())
    }

    /// Every attention layer (its levels, the middle block and the pool) must
    /// split its channels into whole heads.
    fn validate_heads(&self, what: &str) -> Result<()> {
        if self.num_head_channels == 0 || self.num_head_channels < -1 {
            bail!(
                "{what}.num_head_channels: {} must be -1 (use num_heads) or positive",
                self.num_head_channels
            );
        }
        if self.num_head_channels == -1 && self.num_heads == 0 {
            bail!("{what}.num_heads: 0, expected at least 1");
        }
        let last = self.channel_mult.len() - 1;
        let attended = self.channel_mult.iter().enumerate().filter(|&(level, _)| {
            level == last || self.attention_resolutions.contains(&(1usize << level))
        });
        for (_, &m) in attended {
            let ch = m * self.model_channels;
            let (key, per) = if self.num_head_channels > 0 {
                ("num_head_channels", self.num_head_channels as usize)
            } else {
                ("num_heads", self.num_heads)
            };
            if per > ch || !ch.is_multiple_of(per) {
                bail!(
                    "{what}.{key}: {per} does not divide the {ch} channels of an attention layer"
                );
            }
        }
        Ok(())
    }
}

/// Network input sides this engine accepts: large enough for the published
/// 4-level networks at the bottom, small enough that a slice stack fits memory.
pub const IMAGE_SIZES: std::ops::RangeInclusive<usize> = 8..=1024;
/// Levels of `channel_mult` (the deepest level is image_size / 2^(levels-1)).
pub const MAX_LEVELS: usize = 8;
/// Channels of any layer (and in/out channels, classes).
pub const MAX_CHANNELS: usize = 4096;
pub const MAX_RES_BLOCKS: usize = 8;
/// Diffusion timesteps: the schedule is computed in full.
pub const MAX_TIMESTEPS: usize = 100_000;
/// The largest guidance scale (published: 5): far beyond it the guided step overflows
/// float32, which the sampler's clipping would hide.
pub const MAX_GUIDANCE: f64 = 1000.0;
/// A config is a few kilobytes; the limits keep a hostile one from costing time.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Nesting of YAML collections (the published configs use 5).
pub const MAX_YAML_DEPTH: usize = 64;

fn get<'a>(v: &'a serde_yaml_ng::Value, path: &[&str]) -> Option<&'a serde_yaml_ng::Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn net(v: &serde_yaml_ng::Value, file: &Path, path: &[&str]) -> Result<NetConfig> {
    let key = path.join(".");
    let node = get(v, path).with_context(|| format!("{}: no `{key}` section", file.display()))?;
    serde_yaml_ng::from_value(node.clone()).map_err(|e| {
        // serde names a missing field but not the field of a wrongly typed value.
        match mistyped_field(node) {
            Some(field) => anyhow!("{}: {key}.{field}: {e}", file.display()),
            None => anyhow!("{}: {key}: {e}", file.display()),
        }
    })
}

/// The first field of a `NetConfig` mapping whose value has the wrong type.
fn mistyped_field(node: &serde_yaml_ng::Value) -> Option<String> {
    use serde_yaml_ng::from_value as de;
    let map = node.as_mapping()?;
    map.iter().find_map(|(k, v)| {
        let key = k.as_str()?;
        let v = v.clone();
        let ok = match key {
            "image_size" | "in_channels" | "out_channels" | "model_channels" | "num_res_blocks"
            | "num_heads" => de::<usize>(v).is_ok(),
            "num_classes" => de::<Option<usize>>(v).is_ok(),
            "num_head_channels" => de::<i64>(v).is_ok(),
            "attention_resolutions" | "channel_mult" => de::<Vec<usize>>(v).is_ok(),
            "use_scale_shift_norm" | "resblock_updown" | "use_new_attention_order" => {
                de::<bool>(v).is_ok()
            }
            "pool" | "ckpt_path" => de::<Option<String>>(v).is_ok(),
            _ => true,
        };
        (!ok).then(|| key.to_string())
    })
}

/// A number at `path` (absent: `default`); any other value is an error naming the key,
/// never the default in disguise.
fn f64_at(v: &serde_yaml_ng::Value, file: &Path, path: &[&str], default: f64) -> Result<f64> {
    match get(v, path) {
        None => Ok(default),
        Some(x) => x.as_f64().with_context(|| {
            format!(
                "{}: {}: {} is not a number",
                file.display(),
                path.join("."),
                describe(x)
            )
        }),
    }
}

/// A value as the config's author wrote it, not as the YAML parser's debug structures.
fn describe(x: &serde_yaml_ng::Value) -> String {
    use serde_yaml_ng::Value;
    match x {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// A finite number at `path` (absent: `default`).
fn finite_at(v: &serde_yaml_ng::Value, file: &Path, path: &[&str], default: f64) -> Result<f64> {
    let x = f64_at(v, file, path, default)?;
    if !x.is_finite() {
        bail!("{}: {}: {x} is not finite", file.display(), path.join("."));
    }
    Ok(x)
}

/// A whole number in `range` at `path` (absent: `default`).
fn count_at(
    v: &serde_yaml_ng::Value,
    file: &Path,
    path: &[&str],
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize> {
    let x = f64_at(v, file, path, default as f64)?;
    let (lo, hi) = (*range.start() as f64, *range.end() as f64);
    if x.fract() != 0.0 || !(lo..=hi).contains(&x) {
        bail!(
            "{}: {}: {x} is not a whole number in {range:?}",
            file.display(),
            path.join(".")
        );
    }
    Ok(x as usize)
}

/// Reads a YAML config, refusing one too large or too deeply nested before the
/// parser sees it (a deep YAML nest takes the parser seconds per ten thousand levels).
fn read_yaml(file: &Path) -> Result<serde_yaml_ng::Value> {
    use std::io::Read;
    let f =
        std::fs::File::open(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "{}: larger than {MAX_CONFIG_BYTES} bytes, not a config",
            file.display()
        );
    }
    parse_yaml(&text, file)
}

fn parse_yaml(text: &str, file: &Path) -> Result<serde_yaml_ng::Value> {
    let depth = nesting_bound(text);
    if depth > MAX_YAML_DEPTH {
        bail!(
            "{}: YAML nested {depth} levels deep, at most {MAX_YAML_DEPTH}",
            file.display()
        );
    }
    serde_yaml_ng::from_str(text).map_err(|e| anyhow!("{}: not valid YAML: {e}", file.display()))
}

/// An upper bound on the nesting of YAML collections: open flow brackets plus,
/// per line, the block sequence markers and indentation steps before the content
/// (each nesting level needs at least one of them).
fn nesting_bound(text: &str) -> usize {
    let (mut flow, mut deepest) = (0usize, 0usize);
    for line in text.lines() {
        let body = line.trim_start_matches([' ', '\t', '-']);
        let block = line.len() - body.len();
        for c in body.chars() {
            match c {
                '[' | '{' => flow += 1,
                ']' | '}' => flow = flow.saturating_sub(1),
                '#' => break,
                _ => {}
            }
            deepest = deepest.max(flow + block / 2);
        }
        deepest = deepest.max(flow + block / 2);
    }
    deepest
}

impl Config {
    pub fn load(file: &Path) -> Result<Self> {
        Self::from_value(&read_yaml(file)?, file)
    }

    /// Parse a diffusion config (with `unet_config` and `classifier_config`).
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        Self::from_value(&parse_yaml(text, file)?, file)
    }

    fn from_value(v: &serde_yaml_ng::Value, file: &Path) -> Result<Self> {
        let unet = net(v, file, &["model", "params", "unet_config", "params"])?;
        let classifier = net(v, file, &["model", "params", "classifier_config", "params"])?;
        unet.validate(&format!("{}: unet_config", file.display()))?;
        classifier.validate(&format!("{}: classifier_config", file.display()))?;
        if classifier.pool.is_none() {
            bail!("{}: classifier_config has no `pool`", file.display());
        }
        if classifier.image_size != unet.image_size {
            bail!(
                "{}: classifier_config.image_size: {} differs from the UNet's {}",
                file.display(),
                classifier.image_size,
                unet.image_size
            );
        }
        let c = Self {
            unet,
            classifier,
            schedule: schedule(v, file)?,
            defaults: defaults(v, file)?,
        };
        c.check_noise_level(file)
    }

    fn check_noise_level(self, file: &Path) -> Result<Self> {
        let (n, t) = (self.defaults.noise_level, self.schedule.timesteps);
        if !(1..=t).contains(&n) {
            bail!(
                "{}: tester.params.noise_level: {n} must be in 1..=timesteps {t}",
                file.display()
            );
        }
        Ok(self)
    }

    /// One network of either layout: the UNet or the classifier of a diffusion config, or
    /// the classifier of a classifier training config. The layout is told by its keys, so
    /// an error is the one of the layout the file has.
    pub fn load_net(file: &Path, unet: bool) -> Result<NetConfig> {
        let v = read_yaml(file)?;
        let diffusion = get(&v, &["model", "params", "unet_config"]).is_some()
            || get(&v, &["model", "params", "classifier_config"]).is_some();
        if unet || diffusion {
            let c = Self::from_value(&v, file)?;
            return Ok(if unet { c.unet } else { c.classifier });
        }
        classifier_config(&v, file)
    }
}

fn classifier_config(v: &serde_yaml_ng::Value, file: &Path) -> Result<NetConfig> {
    let c = net(v, file, &["model", "params"])?;
    c.validate(&format!("{}: model", file.display()))?;
    Ok(c)
}

fn schedule(v: &serde_yaml_ng::Value, file: &Path) -> Result<Schedule> {
    fn at(k: &'static str) -> [&'static str; 3] {
        ["model", "params", k]
    }
    let s = Schedule {
        timesteps: count_at(v, file, &at("timesteps"), 1000, 1..=MAX_TIMESTEPS)?,
        linear_start: finite_at(v, file, &at("linear_start"), 0.0015)?,
        linear_end: finite_at(v, file, &at("linear_end"), 0.0155)?,
    };
    // Betas are interpolated between the two and must stay probabilities.
    for (key, x) in [
        ("linear_start", s.linear_start),
        ("linear_end", s.linear_end),
    ] {
        if !(x > 0.0 && x < 1.0) {
            bail!(
                "{}: model.params.{key}: {x} is outside (0, 1)",
                file.display()
            );
        }
    }
    if s.linear_start > s.linear_end {
        bail!(
            "{}: model.params.linear_start: {} is above linear_end {}",
            file.display(),
            s.linear_start,
            s.linear_end
        );
    }
    Ok(s)
}

fn defaults(v: &serde_yaml_ng::Value, file: &Path) -> Result<SamplerDefaults> {
    fn at(k: &'static str) -> [&'static str; 3] {
        ["tester", "params", k]
    }
    let d = SamplerDefaults {
        noise_level: count_at(v, file, &at("noise_level"), 100, 0..=MAX_TIMESTEPS)?,
        guidance: finite_at(v, file, &at("guide_w"), 5.0)?,
        threshold: finite_at(v, file, &at("th"), 0.4)?,
    };
    if d.guidance.abs() > MAX_GUIDANCE {
        bail!(
            "{}: tester.params.guide_w: {} is outside -{MAX_GUIDANCE}..={MAX_GUIDANCE}",
            file.display(),
            d.guidance
        );
    }
    Ok(d)
}
