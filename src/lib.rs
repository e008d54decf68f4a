//! fcd: focal cortical dysplasia detection by classifier-guided diffusion.

pub mod config;
pub mod tensor;
pub mod ddim;
pub mod backend;
pub mod post;
pub mod metrics;
pub mod io;
pub mod model;
pub mod cuda;
pub mod sampler;
pub mod pipeline;
pub mod cli;
