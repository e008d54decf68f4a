//! The arithmetic a run uses for its matrix products. GroupNorm statistics,
//! softmax and the sampler state stay float32 in every mode.

use std::fmt;

/// `fp32`: plain float32 everywhere, the parity mode checked against the CPU
/// reference. `tf32`: the convolutions as one TF32 product (10 fraction bits
/// per operand, float32 accumulation), like PyTorch's default float32
/// convolutions; attention as in fp32. `bf16` / `fp16`: convolution and
/// attention products on tensor cores with 16-bit operands and float32
/// accumulation; activations stored between kernels stay float32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    #[default]
    Fp32,
    Tf32,
    Bf16,
    Fp16,
}

/// The 16-bit operand type of a tensor-core mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    Bf16,
    Fp16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Tf32,
        Precision::Bf16,
        Precision::Fp16,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// The 16-bit tensor-core operand type, or None for the float32 modes.
    pub fn half(self) -> Option<Half> {
        match self {
            Precision::Fp32 | Precision::Tf32 => None,
            Precision::Bf16 => Some(Half::Bf16),
            Precision::Fp16 => Some(Half::Fp16),
        }
    }
}

impl Half {
    /// Suffix of the kernels instantiated for this type (`igemm_bf16`, ...).
    pub fn suffix(self) -> &'static str {
        match self {
            Half::Bf16 => "bf16",
            Half::Fp16 => "f16",
        }
    }
}

/// `"fp32"`, `"tf32"`, `"bf16"` or `"fp16"`, as `--precision` takes them.
impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        crate::choice::parse(s, "precision", &Precision::ALL, |p| p.label())
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
