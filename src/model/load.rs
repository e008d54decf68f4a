//! Networks from checkpoints or random weights, bound to a backend.

use super::{random::random_weights, weights, Net, NetKind, NetSpec};
use crate::backend::Backend;
use crate::config::NetConfig;
use crate::io::checkpoint;
use anyhow::Result;
use std::path::Path;

/// Reads a checkpoint and binds it as the network `cfg` describes.
pub fn load_net<B: Backend>(
    backend: &B,
    cfg: &NetConfig,
    kind: NetKind,
    path: &Path,
) -> Result<Net<B>> {
    let spec = NetSpec::build(cfg, kind);
    let tensors = checkpoint::load(path)?;
    let tensors = match kind {
        NetKind::Unet => weights::strip_model_prefix(tensors),
        NetKind::Classifier => tensors,
    };
    let what = format!(
        "{} ({})",
        path.display(),
        match kind {
            NetKind::Unet => "UNet",
            NetKind::Classifier => "classifier",
        }
    );
    let w = weights::bind(backend, &spec, &tensors, &what)?;
    Ok(Net { spec, w })
}

/// The network `cfg` describes with random weights drawn from `seed` (benchmarks, demos).
pub fn random_net<B: Backend>(
    backend: &B,
    cfg: &NetConfig,
    kind: NetKind,
    seed: u64,
) -> Result<Net<B>> {
    let spec = NetSpec::build(cfg, kind);
    let w = weights::bind(
        backend,
        &spec,
        &random_weights(&spec, seed),
        "random weights",
    )?;
    Ok(Net { spec, w })
}
