//! What measures the product but is not it, built with the `lab` feature (the tests turn it
//! on): the kernel tournament, the CUDA reference backend used as the GPU oracle, the
//! kernels' twin checks and the knobs tests turn. Nothing here runs in a default build.

pub mod cuda_ref;
pub mod knobs;
pub mod layers;
pub mod tournament;
pub mod twin;
