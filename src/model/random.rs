//! Random weights for a network description: for full-size benchmarks and
//! GPU-versus-CPU checks where no trained checkpoint is at hand. Every
//! parameter is random, the ones PyTorch initialises to zero too, scaled so
//! activations stay of order one through the depth of the network.

use super::spec::NetSpec;
use crate::tensor::Tensor;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::collections::BTreeMap;

pub fn random_weights(spec: &NetSpec, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for (name, shape) in spec.expected_tensors() {
        let n: usize = shape.iter().product();
        let norm_affine = shape.len() == 1
            && (name.contains("layers.0.")
                || name.contains(".norm.")
                || name.starts_with("out.0."));
        let data: Vec<f32> = if norm_affine && name.ends_with("weight") {
            (0..n)
                .map(|_| 1.0 + rng.random_range(-0.3f32..0.3))
                .collect()
        } else if shape.len() == 1 {
            (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
        } else if name.ends_with("positional_embedding") || name.starts_with("label_emb") {
            (0..n)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    0.5 * z
                })
                .collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let gain = if name.contains("emb_layers") {
                0.5
            } else {
                1.0
            };
            let s = gain / (fan_in as f32).sqrt();
            (0..n)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    s * z
                })
                .collect()
        };
        out.insert(name, Tensor { shape, data });
    }
    out
}
