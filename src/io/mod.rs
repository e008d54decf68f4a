//! Reading and writing files: checkpoints (torch.save zip / safetensors), .npy arrays, atomic writes.

pub mod atomic;
pub mod checkpoint;
pub mod dataset;
pub mod npy;
pub mod pickle;
pub mod png;
pub mod volume;
