//! Which convolution kernel runs a layer: version 1 (`igemm.rs`, prologue
//! fused) or a tiling of version 2 (`igemm2.rs`), looked up by shape in the
//! table of the kernel tournament's winners (`fcd bench --kernels`).
//!
//! The table compiled in is `conv_winners.json`; `FCD_KERNEL_TABLE=FILE`
//! replaces it at run time with a tournament report (its `winners`), so
//! that one device call can run the tournament and then the engine on its
//! winners. A shape absent from the table runs version 1.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;
use serde::{Deserialize, Serialize};

use super::igemm::{self, FusedDims, Operands, PackedWeights};
use super::igemm2::{self, Tiling};
use super::Gpu;
use crate::backend::Resample;
use crate::precision::Precision;

/// A convolution kernel version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvKernel {
    V1,
    V2(Tiling),
}

impl ConvKernel {
    /// The versions the tournament runs: version 1, and version 2 in each
    /// N tile without and with split-K.
    #[cfg(feature = "lab")]
    pub fn candidates() -> Vec<ConvKernel> {
        let mut v = vec![ConvKernel::V1];
        for bn in Tiling::N_TILES {
            for splits in [1, 2, 4] {
                v.push(ConvKernel::V2(Tiling { bn, splits }));
            }
        }
        v
    }

    /// "v1", or "v2_n64_s2" (N tile 64, 2 K splits).
    #[cfg(feature = "lab")]
    pub fn label(self) -> String {
        match self {
            ConvKernel::V1 => "v1".to_string(),
            ConvKernel::V2(t) => format!("v2_n{}_s{}", t.bn, t.splits),
        }
    }

    pub fn parse(s: &str) -> Result<ConvKernel> {
        if s == "v1" {
            return Ok(ConvKernel::V1);
        }
        let t = s.strip_prefix("v2_n").and_then(|r| {
            let (bn, splits) = r.split_once("_s")?;
            Some(Tiling {
                bn: bn.parse().ok()?,
                splits: splits.parse().ok()?,
            })
        });
        match t {
            Some(t) if Tiling::N_TILES.contains(&t.bn) && (1..=64).contains(&t.splits) => {
                Ok(ConvKernel::V2(t))
            }
            _ => bail!("unknown convolution kernel {s:?} (v1, or v2_n{{128,64,32}}_s{{1..64}})"),
        }
    }
}

/// A layer shape as the table keys it. The batch is left out: the winners
/// are chosen at the tournament's batch and kept for others.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConvShape {
    pub precision: String,
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
    /// The output grid.
    pub h: usize,
    pub w: usize,
    /// "none", "up" or "down".
    pub resample: String,
}

impl ConvShape {
    pub fn new(p: Precision, d: &FusedDims) -> ConvShape {
        ConvShape {
            precision: p.label().to_string(),
            k: d.k,
            cin: d.cin,
            cout: d.cout,
            h: d.h,
            w: d.w,
            resample: resample_label(d.resample).to_string(),
        }
    }
}

pub fn resample_label(r: Resample) -> &'static str {
    match r {
        Resample::None => "none",
        Resample::Up => "up",
        Resample::Down => "down",
    }
}

/// One row of a table file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Winner {
    #[serde(flatten)]
    pub shape: ConvShape,
    pub kernel: String,
}

#[derive(Deserialize)]
struct TableFile {
    winners: Vec<Winner>,
}

/// The winners by shape.
#[derive(Clone, Debug, Default)]
pub struct Table {
    rows: HashMap<ConvShape, ConvKernel>,
}

impl Table {
    /// A table file's `winners` (a tournament report, or `conv_winners.json`).
    pub fn parse(json: &str, what: &str) -> Result<Table> {
        let f: TableFile =
            serde_json::from_str(json).with_context(|| format!("{what}: not a kernel table"))?;
        let mut rows = HashMap::new();
        for w in f.winners {
            let k = ConvKernel::parse(&w.kernel).with_context(|| what.to_string())?;
            ensure!(
                rows.insert(w.shape.clone(), k).is_none(),
                "{what}: two winners for {:?}",
                w.shape
            );
        }
        Ok(Table { rows })
    }

    /// `FCD_KERNEL_TABLE`'s file when set, else the compiled-in table.
    pub fn load() -> Result<Table> {
        match std::env::var_os("FCD_KERNEL_TABLE") {
            Some(p) => {
                let p = Path::new(&p);
                let what = format!("FCD_KERNEL_TABLE {}", p.display());
                Table::parse(
                    &std::fs::read_to_string(p).with_context(|| what.clone())?,
                    &what,
                )
            }
            None => Table::parse(include_str!("conv_winners.json"), "conv_winners.json"),
        }
    }

    pub fn get(&self, s: &ConvShape) -> ConvKernel {
        self.rows.get(s).copied().unwrap_or(ConvKernel::V1)
    }

    #[cfg(feature = "lab")]
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    #[cfg(feature = "lab")]
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Runs the convolution with kernel `k`; version 2 where it cannot take the
/// layer (float32 modes, channels off its K tile) runs version 1.
pub fn conv(
    gpu: &Gpu,
    k: ConvKernel,
    op: &Operands<'_>,
    w: &PackedWeights,
    d: FusedDims,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    match k {
        ConvKernel::V2(t) if igemm2::takes(w, d.cin, op.x2.map(|(_, c1)| c1)) => {
            igemm2::conv(gpu, op, w, d, t, y)
        }
        _ => igemm::conv(gpu, op, w, d, y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_back() {
        for k in ConvKernel::candidates() {
            assert_eq!(ConvKernel::parse(&k.label()).unwrap(), k);
        }
        for bad in ["v2_n96_s1", "v2_n64_s0", "v3", "v2_n64"] {
            assert!(ConvKernel::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_compiled_in_table_parses_and_a_file_overrides_it() {
        Table::parse(include_str!("conv_winners.json"), "conv_winners.json").unwrap();
        let json = r#"{"winners": [{"precision": "bf16", "k": 3, "cin": 128, "cout": 128,
            "h": 64, "w": 64, "resample": "none", "kernel": "v2_n64_s2"}], "other": 1}"#;
        let t = Table::parse(json, "test").unwrap();
        let d = FusedDims {
            b: 16,
            h: 64,
            w: 64,
            cin: 128,
            cout: 128,
            k: 3,
            resample: Resample::None,
        };
        let want = ConvKernel::V2(Tiling { bn: 64, splits: 2 });
        assert_eq!(t.get(&ConvShape::new(Precision::Bf16, &d)), want);
        assert_eq!(t.get(&ConvShape::new(Precision::Fp16, &d)), ConvKernel::V1);
        let twice = json.replace("}], ", "}, {\"precision\": \"bf16\", \"k\": 3, \"cin\": 128, \"cout\": 128, \"h\": 64, \"w\": 64, \"resample\": \"none\", \"kernel\": \"v1\"}], ");
        assert!(Table::parse(&twice, "test").is_err());
    }
}
