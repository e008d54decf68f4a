//! Checking a state dict against a network description and binding it to a
//! backend (weights uploaded and repacked once).

use super::spec::NetSpec;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};

/// What differs between a state dict and the network a config describes.
#[derive(Debug, Default, PartialEq)]
pub struct KeyReport {
    pub missing: Vec<(String, Vec<usize>)>,
    pub unexpected: Vec<(String, Vec<usize>)>,
    /// (key, expected shape, found shape)
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl KeyReport {
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.misshaped.is_empty()
    }

    /// One line per problem.
    pub fn lines(&self) -> Vec<String> {
        let mut v = Vec::new();
        v.extend(
            self.missing
                .iter()
                .map(|(k, s)| format!("missing key `{k}` (expected shape {s:?})")),
        );
        v.extend(
            self.misshaped
                .iter()
                .map(|(k, e, f)| format!("key `{k}` has shape {f:?}, expected {e:?}")),
        );
        v.extend(
            self.unexpected
                .iter()
                .map(|(k, s)| format!("unexpected key `{k}` (shape {s:?})")),
        );
        v
    }
}

/// The UNet of a training checkpoint lives under `model.`: when any key has
/// that prefix, keep only those keys (the wrapper may hold schedule buffers
/// beside it) and strip it.
pub fn strip_model_prefix(mut tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    if tensors.keys().any(|k| k.starts_with("model.")) {
        tensors = tensors
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("model.").map(|s| (s.to_string(), v)))
            .collect();
    }
    tensors
}

pub fn check(spec: &NetSpec, tensors: &BTreeMap<String, Tensor>) -> KeyReport {
    let mut r = KeyReport::default();
    let expected = spec.expected_tensors();
    let names: std::collections::HashSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    for (k, shape) in &expected {
        match tensors.get(k) {
            None => r.missing.push((k.clone(), shape.clone())),
            Some(t) if &t.shape != shape => {
                r.misshaped
                    .push((k.clone(), shape.clone(), t.shape.clone()))
            }
            Some(_) => {}
        }
    }
    for (k, t) in tensors {
        if !names.contains(k.as_str()) {
            r.unexpected.push((k.clone(), t.shape.clone()));
        }
    }
    r
}

/// A network's weights on a backend: convolutions and linear layers prepared,
/// the rest (norm affines, embeddings) as plain tensors.
pub struct Bound<B: Backend> {
    pub convs: HashMap<String, B::Conv>,
    pub vecs: HashMap<String, B::T>,
}

impl<B: Backend> Bound<B> {
    pub fn conv(&self, name: &str) -> &B::Conv {
        &self.convs[name]
    }
    pub fn vec(&self, name: &str) -> &B::T {
        &self.vecs[name]
    }
}

/// Checks `tensors` against `spec` (every problem listed, `what` naming the
/// file) and binds them to the backend.
pub fn bind<B: Backend>(
    backend: &B,
    spec: &NetSpec,
    tensors: &BTreeMap<String, Tensor>,
    what: &str,
) -> Result<Bound<B>> {
    let report = check(spec, tensors);
    if !report.is_ok() {
        let lines = report.lines();
        let shown: Vec<&str> = lines.iter().take(8).map(|s| s.as_str()).collect();
        let more = if lines.len() > 8 {
            format!(" (and {} more)", lines.len() - 8)
        } else {
            String::new()
        };
        bail!(
            "{what}: the checkpoint does not match the network of the config: {}{more}",
            shown.join("; ")
        );
    }
    check_values(tensors, what)?;
    let mut convs = HashMap::new();
    let mut vecs = HashMap::new();
    for (k, shape) in spec.expected_tensors() {
        let Some(name) = k.strip_suffix(".weight") else {
            if !k.ends_with(".bias") {
                // Positional embedding (C, T+1): stored token-major for NHWC.
                let t = &tensors[&k];
                let (c, n) = (shape[0], shape[1]);
                let mut data = vec![0f32; c * n];
                for ch in 0..c {
                    for i in 0..n {
                        data[i * c + ch] = t.data[ch * n + i];
                    }
                }
                vecs.insert(k.clone(), backend.upload(&Tensor::new(vec![n, c], data)?)?);
            }
            continue;
        };
        let w = &tensors[&k];
        let is_conv_or_linear = shape.len() >= 2 && !name.ends_with("label_emb");
        if is_conv_or_linear {
            let bias = &tensors[&format!("{name}.bias")];
            let c = backend
                .prepare_conv(w, bias)
                .with_context(|| format!("{what}: `{k}`"))?;
            convs.insert(name.to_string(), c);
        } else {
            vecs.insert(k.clone(), backend.upload(w)?);
            if let Some(b) = tensors.get(&format!("{name}.bias")) {
                vecs.insert(format!("{name}.bias"), backend.upload(b)?);
            }
        }
    }
    Ok(Bound { convs, vecs })
}

/// The largest weight magnitude loaded: weights of these networks are of order 1 (the
/// fixtures' largest is 2.1). One near float32's limit overflows inside the network, where
/// GroupNorm turns an infinite variance into zeros and the DDIM update clips a huge noise
/// prediction, so the result would look plausible (found with a bias of 3e38).
pub const MAX_WEIGHT: f32 = 1e6;

/// A NaN, infinite or implausibly large weight is refused at load, naming the tensor: a NaN
/// makes every output NaN, and a huge one a meaningless result (see [`MAX_WEIGHT`]).
fn check_values(tensors: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
    for (k, t) in tensors {
        let Some(i) = t
            .data
            .iter()
            .position(|v| !v.is_finite() || v.abs() > MAX_WEIGHT)
        else {
            continue;
        };
        let v = t.data[i];
        let why = if v.is_finite() {
            format!("a value {v:e} beyond the {MAX_WEIGHT:e} a weight may have")
        } else {
            format!("a non-finite value {v}")
        };
        bail!(
            "{what}: tensor `{k}` (shape {:?}) has {why} at index {i}",
            t.shape
        );
    }
    Ok(())
}
