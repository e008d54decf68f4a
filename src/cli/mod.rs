//! The `fcd` command line: a contract scripts rely on.

mod bench;
mod detect;
mod eval;
mod inspect;

use anyhow::{Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use fcd::engine::{Device, Engine, EngineBuilder};
use fcd::precision::Precision;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "fcd",
    version,
    about = "Focal cortical dysplasia detection by classifier-guided diffusion"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Pseudo-healthy FLAIR and anomaly maps for co-registered FLAIR and T1 slices.
    Detect(detect::DetectArgs),
    /// Evaluate on a dataset (PNG slices or NIfTI subjects): per-slice CSV and metrics.json; resumable.
    Eval(eval::EvalArgs),
    /// List a checkpoint's tensors and check them against a config's network.
    Inspect {
        /// A .pt (torch.save) or .safetensors file.
        file: PathBuf,
        /// A diffusion config (both networks) or a classifier config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Which network of the config the file holds (default: guessed from its keys).
        #[arg(long, value_enum)]
        net: Option<inspect::Which>,
    },
    /// Throughput of the guided sampler: slices/s, TFLOP/s, fraction of the floor.
    Bench(bench::BenchArgs),
}

pub(crate) fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Detect(args) => detect::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Inspect { file, config, net } => inspect::run(&file, config.as_deref(), net),
    }
}

/// The parser of an option that takes one of the library's named choices (`--device`,
/// `--precision`): the help lists their labels, and the library's `FromStr` makes the value.
fn choice<T>(all: &[T], label: fn(T) -> &'static str) -> impl TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = anyhow::Error> + Copy + Send + Sync + 'static,
{
    PossibleValuesParser::new(all.iter().map(|&v| label(v))).try_map(|s| s.parse::<T>())
}

/// A progress bar on stderr (hidden where stderr is not a terminal) drawn by `template`.
fn progress_bar(template: &str) -> Result<indicatif::ProgressBar> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(template)?);
    Ok(bar)
}

/// The config and the two checkpoints, as every command that runs the networks takes them.
#[derive(clap::Args)]
pub(crate) struct ModelArgs {
    /// The diffusion YAML config (unet_config and classifier_config).
    #[arg(long)]
    config: PathBuf,
    /// UNet checkpoint (.pt or .safetensors).
    // Optional only where a command says so (`fcd eval --anomaly-map flair`).
    #[arg(long, required = true)]
    unet: Option<PathBuf>,
    /// Classifier checkpoint (default: the config's classifier ckpt_path).
    #[arg(long)]
    classifier: Option<PathBuf>,
}

impl ModelArgs {
    /// The engine these files describe, on `device` in `precision`.
    fn engine(&self, device: Device, precision: Precision) -> Result<EngineBuilder> {
        let unet = self
            .unet
            .as_ref()
            .context("--unet is needed to run the networks")?;
        let b = Engine::builder(&self.config)
            .unet(unet)
            .device(device)
            .precision(precision);
        Ok(match &self.classifier {
            Some(c) => b.classifier(c),
            None => b,
        })
    }
}
