//! Launchers for `kernels/igemm2.cu`: version 2 of the 16-bit convolution,
//! a preparation pass that writes the transformed input once as 16-bit
//! NHWC, then a prologue-free implicit GEMM fed by cp.async, with a choice
//! of N tile and split-K. Same operands and result as [`super::igemm::conv`];
//! CPU twin: `crate::backend::compose_conv_fused`.

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::igemm::{check_operands, kernel_suffix, Arith, FusedDims, Operands, PackedWeights, BM};
use super::launch;
use super::Gpu;

const BK: usize = 32;
const THREADS: u32 = 256;
/// Pipeline depth and shared row (BK + 8 halves) of the kernels.
const STAGES: usize = 3;
const SROW: usize = 40;

/// A version-2 launch: the GEMM's N tile (128, 64 or 32 output channels)
/// and the number of K splits (1: the epilogue runs in the GEMM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiling {
    pub bn: usize,
    pub splits: usize,
}

impl Tiling {
    pub const N_TILES: [usize; 3] = [128, 64, 32];

    /// Dynamic shared memory of one block: STAGES slots of A and B.
    fn shared_bytes(self) -> usize {
        STAGES * (BM + self.bn) * SROW * 2
    }
}

/// Whether version 2 takes a convolution: 16-bit weights, input channels
/// in whole K tiles, a concatenation split on 4 channels (the preparation
/// pass reads float4).
pub fn takes(w: &PackedWeights, cin: usize, c1: Option<usize>) -> bool {
    matches!(w.kind, Arith::Half(_))
        && cin.is_multiple_of(BK)
        && c1.is_none_or(|c1| c1.is_multiple_of(4))
}

/// The K splits that `t` asks for, cut so that none is empty: (splits,
/// K tiles per split).
fn split_k(kp: usize, splits: usize) -> (usize, usize) {
    let tiles = kp / BK;
    let per = tiles.div_ceil(splits.clamp(1, tiles.max(1)));
    (tiles.div_ceil(per.max(1)).max(1), per.max(1))
}

/// `y = conv(resample(silu?(a x + s)), w) + bias + bvec + res` as
/// [`super::igemm::conv`] computes it, by the preparation pass and the
/// GEMM with tiling `t`.
pub fn conv(
    gpu: &Gpu,
    op: &Operands<'_>,
    w: &PackedWeights,
    d: FusedDims,
    t: Tiling,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    check_operands(gpu, "conv_v2", op, w, d, y)?;
    let c1 = op.x2.map(|(_, c1)| c1);
    ensure!(
        takes(w, d.cin, c1),
        "conv_v2: needs 16-bit weights and input channels in multiples of {BK}, got {:?} and {} \
         (split at {c1:?})",
        w.kind,
        d.cin
    );
    ensure!(
        Tiling::N_TILES.contains(&t.bn) && t.splits >= 1,
        "conv_v2: no kernel for N tile {} and {} splits",
        t.bn,
        t.splits
    );
    let Arith::Half(half) = w.kind else {
        unreachable!("takes() admits 16-bit weights only")
    };
    let wt = w.half_buf().context("conv_v2: 16-bit weights")?;
    let m = d.b * d.h * d.w;
    if m * d.cout == 0 {
        return Ok(());
    }
    let int = |v: usize| v as i32;
    let flag = |v: bool| i32::from(v);

    let mut xp = unsafe { gpu.stream().alloc::<u16>(m * d.cin) }
        .with_context(|| format!("conv_v2: allocating the prepared input of {d:?}"))?;
    let rs = kernel_suffix(d.resample);
    let (x2, c1) = op.x2.unwrap_or((op.x, d.cin));
    let p = (
        op.x,
        op.affine.unwrap_or(op.x),
        &mut xp,
        int(d.b),
        int(d.h),
        int(d.w),
        int(d.cin),
        flag(op.affine.is_some()),
        flag(op.silu),
        x2,
        int(c1),
    );
    let name = format!("conv_prep_{}_{rs}", half.suffix());
    // SAFETY (allocation): conv_prep writes all m * cin values before the
    // GEMM reads them. (Launch): the sources' lengths are checked above
    // against the grid the kernel walks; cin and c1 are multiples of 4.
    unsafe { launch::conv_prep(gpu, &name, gpu.elementwise_config(m * d.cin / 4), p) }?;

    let (splits, per) = split_k(w.kp, t.splits);
    ensure!(
        d.cout.div_ceil(t.bn) <= 65535 && splits <= 65535,
        "conv_v2: {} output channels in {} splits exceed the grid",
        d.cout,
        splits
    );
    let cfg = LaunchConfig {
        grid_dim: (
            m.div_ceil(BM) as u32,
            d.cout.div_ceil(t.bn) as u32,
            splits as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: t.shared_bytes() as u32,
    };
    let suffix = if splits > 1 { "_part" } else { "" };
    let name = format!("igemm2_{}_n{}{suffix}", half.suffix(), t.bn);
    let gemm = |out: &mut CudaSlice<f32>| {
        let p = (
            &xp,
            wt,
            op.bias,
            op.bvec.unwrap_or(op.x),
            op.res.unwrap_or(op.x),
            out,
            int(d.b),
            int(d.h),
            int(d.w),
            int(d.cin),
            int(d.cout),
            int(d.k),
            int(w.kp),
            flag(op.bvec.is_some()),
            flag(op.res.is_some()),
            int(per),
        );
        // SAFETY: xp holds m * cin prepared values, wt cout * kp, out m *
        // cout per split (checked above or allocated so); the kernel reads
        // K tiles [z * per, min((z + 1) * per, kp / BK)) of split z.
        unsafe { launch::igemm2(gpu, &name, cfg, p) }
    };
    if splits == 1 {
        return gemm(y);
    }
    let mut part = unsafe { gpu.stream().alloc::<f32>(splits * m * d.cout) }
        .with_context(|| format!("conv_v2: allocating {splits} partial sums of {d:?}"))?;
    // SAFETY (allocation): each split writes its m * cout sums before the
    // reduction reads them.
    gemm(&mut part)?;
    let p = (
        &part,
        op.bias,
        op.bvec.unwrap_or(op.x),
        op.res.unwrap_or(op.x),
        y,
        (m * d.cout) as u64,
        int(d.cout),
        int(d.h * d.w),
        int(splits),
        flag(op.bvec.is_some()),
        flag(op.res.is_some()),
    );
    // SAFETY: part holds splits * m * cout sums, y m * cout (checked).
    unsafe { launch::igemm2_reduce(gpu, gpu.elementwise_config(m * d.cout), p) }
}

#[cfg(test)]
mod tests {
    use super::split_k;

    #[test]
    fn no_split_is_empty() {
        for kp in [32, 64, 96, 9 * 32, 9 * 768] {
            for want in 1..=8 {
                let (splits, per) = split_k(kp, want);
                let tiles = kp / 32;
                assert!(splits <= want && per * splits >= tiles, "{kp} {want}");
                assert!((splits - 1) * per < tiles, "{kp} {want}: an empty split");
            }
        }
    }
}
