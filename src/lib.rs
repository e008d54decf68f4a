//! fcd: focal cortical dysplasia detection by classifier-guided diffusion.
//!
//! [`Engine`] is the front door: it loads a config and both networks once, on the CPU or a
//! GPU, and runs detection on slices or volumes; [`outputs`] writes what `fcd detect`
//! writes. The layers below it, one way down: [`engine`] -> [`sampler`] ->
//! [`model`] / [`inputs`] -> [`backend`] -> [`io`]. The command line is the `fcd` binary's,
//! not this library's.

pub mod backend;
mod choice;
pub mod config;
pub mod ddim;
pub mod engine;
pub mod eval;
pub mod inputs;
pub mod io;
#[cfg(feature = "lab")]
pub mod lab;
pub mod metrics;
pub mod model;
pub mod outputs;
pub mod post;
pub mod precision;
pub mod sampler;
pub mod slices;
pub mod tensor;

pub use engine::{
    DetectOptions, Detection, Device, Engine, EngineBuilder, Peak, PeakOptions, Progress,
    VolumeDetection, VolumePeak, Weights,
};
pub use precision::Precision;
