//! Reading and writing files: checkpoints (torch.save zip / safetensors), .npy arrays, atomic writes.

pub mod atomic;
pub mod checkpoint;
pub mod npy;
pub mod pickle;
