//! `fcd inspect`: what a checkpoint holds, and whether it fits a config.

use anyhow::{bail, Result};
use clap::ValueEnum;
use fcd::config::{Config, NetConfig};
use fcd::io::checkpoint;
use fcd::model::{weights, NetKind, NetSpec};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Which {
    Unet,
    Classifier,
}

pub fn run(file: &Path, config: Option<&Path>, which: Option<Which>) -> Result<()> {
    let loaded = checkpoint::load_with_dtypes(file)?;
    let mut params = 0usize;
    println!("{}: {} tensors", file.display(), loaded.tensors.len());
    for (k, t) in &loaded.tensors {
        params += t.len();
        let dtype = loaded.dtypes.get(k).copied().unwrap_or("?");
        println!("  {k}\t{:?}\t{dtype}", t.shape);
    }
    println!("{params} parameters");
    let Some(config) = config else { return Ok(()) };
    let which = which.unwrap_or_else(|| {
        let unet_like = loaded.tensors.keys().any(|k| {
            k.starts_with("model.") || k.starts_with("output_blocks.") || k == "label_emb.weight"
        });
        if unet_like {
            Which::Unet
        } else {
            Which::Classifier
        }
    });
    let cfg: NetConfig = Config::load_net(config, which == Which::Unet)?;
    let kind = if which == Which::Unet {
        NetKind::Unet
    } else {
        NetKind::Classifier
    };
    let spec = NetSpec::build(&cfg, kind);
    let tensors = if kind == NetKind::Unet {
        weights::strip_model_prefix(loaded.tensors)
    } else {
        loaded.tensors
    };
    let report = weights::check(&spec, &tensors);
    let name = if kind == NetKind::Unet {
        "UNet"
    } else {
        "classifier"
    };
    if report.is_ok() {
        println!(
            "matches the {name} of {}: {} tensors",
            config.display(),
            spec.expected_tensors().len()
        );
        return Ok(());
    }
    for line in report.lines() {
        println!("  {line}");
    }
    bail!(
        "{}: does not match the {name} of {} ({} missing, {} misshaped, {} unexpected)",
        file.display(),
        config.display(),
        report.missing.len(),
        report.misshaped.len(),
        report.unexpected.len()
    )
}
