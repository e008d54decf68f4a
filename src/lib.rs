//! fcd: focal cortical dysplasia detection by classifier-guided diffusion.

pub mod backend;
mod choice;
pub mod config;
pub mod ddim;
mod digits;
pub mod engine;
pub mod eval;
pub mod inputs;
pub mod io;
#[cfg(feature = "lab")]
pub mod lab;
pub mod metrics;
pub mod model;
pub mod montage;
pub mod overlay;
pub mod post;
pub mod precision;
pub mod sampler;
pub mod slices;
pub mod tensor;
