//! Launchers for `kernels/groupnorm.cu`: GroupNorm (32 groups, eps 1e-5)
//! with optional scale/shift and SiLU on NHWC `[b, hw, c]`, and its input
//! gradient. CPU twins in `crate::backend::cpu_ref` (`norm.rs`).

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{launch, Gpu};
use crate::backend::shapes::GROUPS;
use crate::backend::Norm;

/// A GroupNorm's sizes: `[b, hw, c]` (NHWC with `hw` pixels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormDims {
    pub b: usize,
    pub hw: usize,
    pub c: usize,
}

/// GroupNorm's parameters on the device: gamma, beta, the optional `[b, 2c]`
/// scale/shift (scale first) and SiLU.
pub type NormParams<'a> = Norm<'a, CudaSlice<f32>>;

/// Checked sizes of one GroupNorm call, in the kernels' integer types.
struct Sizes {
    /// (sample, group) pairs.
    groups: u32,
    b: u32,
    hw: u64,
    c: u32,
    /// Elements of x.
    n: usize,
}

/// What GroupNorm's statistics read: one tensor, or the channel
/// concatenation `[first, second]` of two, read in place (`c1` channels from
/// the first, the rest from the second).
#[derive(Clone, Copy)]
pub enum Source<'a> {
    One(&'a CudaSlice<f32>),
    Concat(&'a CudaSlice<f32>, &'a CudaSlice<f32>, usize),
}

impl<'a> Source<'a> {
    /// (first, second, c1) as the statistics kernels take them; a single
    /// tensor stands in for the unread second one.
    fn parts(self, c: usize) -> (&'a CudaSlice<f32>, &'a CudaSlice<f32>, usize) {
        match self {
            Source::One(x) => (x, x, c),
            Source::Concat(a, b, c1) => (a, b, c1),
        }
    }
}

/// Checks the input and parameters of one call.
fn check(gpu: &Gpu, op: &str, x: Source<'_>, dims: NormDims, p: &NormParams<'_>) -> Result<Sizes> {
    let NormDims { b, hw, c } = dims;
    ensure!(
        c > 0 && c.is_multiple_of(GROUPS),
        "{op}: {c} channels are not a positive multiple of {GROUPS}"
    );
    let n = b
        .checked_mul(hw)
        .and_then(|v| v.checked_mul(c))
        .with_context(|| format!("{op}: size {b} x {hw} x {c} overflows"))?;
    match x {
        Source::One(x) => gpu.expect_len(op, "x", x, n)?,
        Source::Concat(first, second, c1) => {
            ensure!(
                c1 > 0 && c1 < c,
                "{op}: a concatenation split at channel {c1} of {c}"
            );
            gpu.expect_len(op, "x", first, n / c * c1)?;
            gpu.expect_len(op, "x (second half)", second, n / c * (c - c1))?;
        }
    }
    gpu.expect_len(op, "gamma", p.gamma, c)?;
    gpu.expect_len(op, "beta", p.beta, c)?;
    if let Some(ss) = p.ss {
        gpu.expect_len(op, "scale/shift", ss, 2 * b * c)?;
    }
    let groups = b
        .checked_mul(GROUPS)
        .and_then(|v| u32::try_from(v).ok())
        .with_context(|| format!("{op}: batch {b} too large"))?;
    Ok(Sizes {
        groups,
        b: u32::try_from(b).context("batch size")?,
        hw: hw as u64,
        c: u32::try_from(c).with_context(|| format!("{op}: {c} channels"))?,
        n,
    })
}

/// Threads of a `gn_stats_partial` block at most; with the shared memory
/// below this lets several blocks share an SM.
const STATS_MAX_THREADS: usize = 256;
/// Floats per tile of `gn_stats_partial`: a tile is swept twice (sum, then
/// squared deviations), and at 16 KiB the second sweep finds it in L1.
const STATS_TILE_FLOATS: usize = 4096;
/// `gn_stats_partial` blocks wanted per SM over the whole batch: enough for
/// every SM to have work and to even out the tail, few enough that the
/// partials stay small and `gn_stats_combine` merges at most a few hundred
/// runs per group.
const STATS_BLOCKS_PER_SM: usize = 4;
/// Threads of a `gn_stats_combine` / `gn_bwd_combine` block (one warp per
/// (sample, group)).
const COMBINE_THREADS: u32 = 256;
/// Dynamic shared memory a block may use without opting in.
const MAX_DYNAMIC_SHARED: usize = 48 * 1024;

/// Launch shape of the split statistics reduction (see `gn_stats_partial`
/// in kernels/groupnorm.cu for what each field means to the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatsPlan {
    /// Threads along channels, a multiple of 32 and at most `c`.
    cw: u32,
    /// `rows_par * cw`: pixel rows read side by side times `cw`.
    threads: u32,
    /// Pixels per tile.
    tile: u32,
    /// Pixels per run (a whole number of tiles); one block per run.
    span: u64,
    /// Runs per sample: `ceil(hw / span)`, every one non-empty.
    runs: u32,
    /// Dynamic shared memory of a block in bytes.
    shared: u32,
}

impl StatsPlan {
    /// `b`, `hw` and `c` are positive, `c` a multiple of 32; `sms` is the
    /// GPU's multiprocessor count, so runs differ between GPUs (each one's
    /// result is deterministic).
    fn new(op: &str, sms: u32, b: usize, hw: usize, c: usize) -> Result<StatsPlan> {
        ensure!(
            b > 0 && hw > 0 && c > 0 && c.is_multiple_of(GROUPS),
            "{op}: no statistics of {b} x {hw} x {c}: empty, or channels not a multiple of {GROUPS}"
        );
        // Fewest passes over the channels at <= 256 threads each, spread
        // evenly: 288 channels run as 2 x 160 threads, not 256 + 32.
        let passes = c.div_ceil(STATS_MAX_THREADS);
        let cw = c.div_ceil(passes).next_multiple_of(32);
        let rows_par = (STATS_MAX_THREADS / cw).max(1);
        let threads = rows_par * cw;
        // Tiles are a whole number of parallel rows, so no thread idles but
        // in a sample's last tile.
        let tile = (STATS_TILE_FLOATS / c / rows_par).max(1) * rows_par;
        let tiles = hw.div_ceil(tile);
        let wanted = (sms as usize * STATS_BLOCKS_PER_SM).div_ceil(b);
        let runs = tiles.min(wanted).max(1);
        let tiles_per_run = tiles.div_ceil(runs);
        let span = tiles_per_run * tile;
        let runs = hw.div_ceil(span);
        // gn_stats_partial's rows of channel partials, 32 groups of cg | 1
        // slots each, then one slot per thread.
        let shared =
            (rows_par * GROUPS * ((c / GROUPS) | 1) + threads) * std::mem::size_of::<f64>();
        ensure!(
            shared <= MAX_DYNAMIC_SHARED,
            "{op}: statistics of {b} x {hw} x {c} need {shared} bytes of shared memory \
             (at most {MAX_DYNAMIC_SHARED}); too many channels"
        );
        let narrow = |v: usize, what: &str| {
            u32::try_from(v).with_context(|| {
                format!("{op}: statistics of {b} x {hw} x {c}: {what} {v} exceeds u32")
            })
        };
        Ok(StatsPlan {
            cw: narrow(cw, "channel threads")?,
            threads: narrow(threads, "threads")?,
            tile: narrow(tile, "tile")?,
            span: span as u64,
            runs: narrow(runs, "runs")?,
            shared: narrow(shared, "shared bytes")?,
        })
    }
}

impl StatsPlan {
    /// Dynamic shared memory of a `gn_bwd_partial` block in bytes: the
    /// statistics' layout twice (channel partials and per-warp shares of
    /// both gradient sums), checked against the limit.
    fn bwd_shared(&self, op: &str, c: usize) -> Result<u32> {
        let shared = 2 * self.shared as usize;
        ensure!(
            shared <= MAX_DYNAMIC_SHARED,
            "{op}: the gradient sums of {c} channels need {shared} bytes of shared memory \
             (at most {MAX_DYNAMIC_SHARED}); too many channels"
        );
        Ok(shared as u32)
    }
}

/// Launch shape of the split reductions of `b x hw x c`, and the grid-row
/// limit they share.
fn plan_for(gpu: &Gpu, op: &str, sz: &Sizes) -> Result<StatsPlan> {
    let (b, hw, c) = (sz.b as usize, sz.hw as usize, sz.c as usize);
    ensure!(
        sz.b <= 65_535,
        "{op}: batch {b} exceeds the 65535 grid rows of the statistics"
    );
    StatsPlan::new(op, gpu.sm_count(), b, hw, c)
}

/// One split reduction of the statistics or the gradient sums: `partial`
/// runs a block per (run, sample) with `shared` bytes, writing a pair per
/// (sample, run, group) into its buffer, then `combine` a warp per
/// (sample, group), merging that buffer into the returned pairs.
fn split_reduce(
    gpu: &Gpu,
    op: &str,
    sz: &Sizes,
    plan: &StatsPlan,
    shared: u32,
    partial: impl FnOnce(LaunchConfig, &mut CudaSlice<f64>) -> Result<()>,
    combine: impl FnOnce(LaunchConfig, &CudaSlice<f64>, &mut CudaSlice<f64>) -> Result<()>,
) -> Result<CudaSlice<f64>> {
    let part_len = sz.b as usize * plan.runs as usize * GROUPS * 2;
    // SAFETY (both): `partial` writes every element of `part` before
    // `combine`, stream-ordered after it, reads them, and `combine` every
    // element of `pairs` before any reader; no zeroing needed (a memset
    // would be one more launch per GroupNorm).
    let mut part = unsafe { gpu.stream().alloc::<f64>(part_len) }
        .with_context(|| format!("{op}: allocating {part_len} partial sums"))?;
    let mut pairs = unsafe { gpu.stream().alloc::<f64>(2 * sz.groups as usize) }
        .with_context(|| format!("{op}: allocating {} group sums", sz.groups))?;
    partial(
        LaunchConfig {
            grid_dim: (plan.runs, sz.b, 1),
            block_dim: (plan.threads, 1, 1),
            shared_mem_bytes: shared,
        },
        &mut part,
    )?;
    let warps_per_block = COMBINE_THREADS / 32;
    combine(
        LaunchConfig {
            grid_dim: (sz.groups.div_ceil(warps_per_block), 1, 1),
            block_dim: (COMBINE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        &part,
        &mut pairs,
    )?;
    Ok(pairs)
}

/// Per (sample, group) mean and 1/sigma, as `b * 32` (mean, inv) pairs, by
/// the plan `plan_for` gave. Needs `b * hw > 0` (callers return early on
/// empty inputs); `op` names the caller in errors.
fn stats(
    gpu: &Gpu,
    op: &str,
    src: Source<'_>,
    sz: &Sizes,
    plan: &StatsPlan,
) -> Result<CudaSlice<f64>> {
    let (x, x2, c1) = src.parts(sz.c as usize);
    let c1 = c1 as u32;
    let cg = sz.c / GROUPS as u32;
    let partial = |cfg, part: &mut CudaSlice<f64>| {
        let p = (x, part, sz.hw, sz.c, plan.cw, plan.tile, plan.span, x2, c1);
        // SAFETY: x and x2 hold b * hw * c1 and b * hw * (c - c1) floats
        // (x2 unread when c1 = c), part b * runs * 32 * 2 doubles. StatsPlan
        // gives the layout the kernel assumes: threads a multiple of cw, cw
        // a multiple of 32 and <= c, shared = (threads / cw * 32 * (c / 32 |
        // 1) + threads) doubles, runs = ceil(hw / span) so block (run, bi)
        // reads pixels below hw of sample bi only and writes part entries of
        // (bi, run) only.
        unsafe { launch::gn_stats_partial(gpu, cfg, p) }
    };
    let combine = |cfg, part: &CudaSlice<f64>, stats: &mut CudaSlice<f64>| {
        let p = (
            x, part, stats, sz.b, plan.runs, sz.hw, cg, plan.span, x2, c1,
        );
        // SAFETY: x, x2 and part as above, stats holds 2 * b * 32 doubles;
        // warp w < b * 32 reads the runs of (w / 32, w % 32) and
        // x[w / 32, 0, (w % 32) * cg] (hw > 0), and writes
        // stats[2 w ..= 2 w + 1]; the warps past b * 32 (the last block's
        // tail) return at once.
        unsafe { launch::gn_stats_combine(gpu, cfg, p) }
    };
    split_reduce(gpu, op, sz, plan, plan.shared, partial, combine)
}

/// `y = silu?((GN(x) * gamma + beta) * (1 + scale) + shift)`; see
/// `Backend::group_norm`.
pub fn group_norm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    dims: NormDims,
    p: NormParams<'_>,
) -> Result<()> {
    let op = "group_norm";
    let sz = check(gpu, op, Source::One(x), dims, &p)?;
    gpu.expect_len(op, "y", y, sz.n)?;
    if sz.n == 0 {
        return Ok(());
    }
    let stats = stats(gpu, op, Source::One(x), &sz, &plan_for(gpu, op, &sz)?)?;
    let (ss, has_ss) = scale_shift(&p);
    let params = (
        x,
        y,
        &stats,
        p.gamma,
        p.beta,
        ss,
        has_ss,
        i32::from(p.silu),
        sz.hw,
        sz.c,
        sz.n as u64,
    );
    // SAFETY: x and y hold n = b * hw * c floats, stats 2 * b * 32 doubles,
    // gamma and beta c floats, ss 2 * b * c floats when has_ss (else
    // unread); the kernel touches indices below those bounds.
    unsafe { launch::gn_apply(gpu, gpu.elementwise_config(sz.n), params) }
}

/// The kernels' (ss, has_ss): without a scale/shift they never read `ss`,
/// and gamma stands in so that the argument is a valid device pointer.
fn scale_shift<'a>(p: &NormParams<'a>) -> (&'a CudaSlice<f32>, i32) {
    (p.ss.unwrap_or(p.gamma), i32::from(p.ss.is_some()))
}

/// GroupNorm (+ optional scale/shift) of `x` folded into a per-(sample,
/// channel) affine map `y = a * x + s` for a convolution's prologue to
/// apply (which also applies the SiLU, so `p.silu` is not read here): `out`
/// is `[b, 2, c]` (`a` then `s`), with `m`, `r` the mean and 1/sigma of the
/// channel's group, `a = r gamma (1 + scale)` and
/// `s = (beta - m r gamma) (1 + scale) + shift` (scale = shift = 0 without
/// `ss`), taken in double and rounded once. CPU twin:
/// `crate::backend::cpu_ref::group_norm_affine`.
pub fn group_norm_affine(
    gpu: &Gpu,
    x: Source<'_>,
    dims: NormDims,
    p: NormParams<'_>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = "group_norm_affine";
    let sz = check(gpu, op, x, dims, &p)?;
    let NormDims { b, hw, c } = dims;
    gpu.expect_len(op, "out", out, 2 * b * c)?;
    if b == 0 {
        return Ok(());
    }
    ensure!(
        hw > 0,
        "{op}: {b} x {hw} x {c} has no pixels, so no statistics"
    );
    let stats = stats(gpu, op, x, &sz, &plan_for(gpu, op, &sz)?)?;
    let (ss, has_ss) = scale_shift(&p);
    let params = (
        &stats,
        p.gamma,
        p.beta,
        ss,
        has_ss,
        out,
        sz.c,
        (b * c) as u64,
    );
    // SAFETY: stats holds 2 * b * 32 doubles, gamma and beta c floats, ss
    // and out 2 * b * c floats (ss unread without has_ss); thread i < b * c
    // reads and writes indices below those bounds only.
    unsafe { launch::gn_affine(gpu, gpu.elementwise_config(b * c), params) }
}

/// Input gradient of `group_norm` (same arguments; `dy` and `dx` are
/// `[b, hw, c]`).
pub fn group_norm_bwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dims: NormDims,
    p: NormParams<'_>,
) -> Result<()> {
    let op = "group_norm_bwd";
    let sz = check(gpu, op, Source::One(x), dims, &p)?;
    gpu.expect_len(op, "dy", dy, sz.n)?;
    gpu.expect_len(op, "dx", dx, sz.n)?;
    if sz.n == 0 {
        return Ok(());
    }
    let plan = plan_for(gpu, op, &sz)?;
    let bwd_shared = plan.bwd_shared(op, dims.c)?;
    let stats = stats(gpu, op, Source::One(x), &sz, &plan)?;
    let (ss, has_ss) = scale_shift(&p);
    let silu = i32::from(p.silu);
    let (gamma, beta) = (p.gamma, p.beta);
    let partial = |cfg, part: &mut CudaSlice<f64>| {
        let params = (
            x, dy, &stats, gamma, beta, ss, has_ss, silu, part, sz.hw, sz.c, plan.cw, plan.span,
        );
        // SAFETY: x and dy hold b * hw * c floats, stats 2 * b * 32 doubles,
        // gamma and beta c floats, ss 2 * b * c floats when has_ss (else
        // unread), part b * runs * 32 * 2 doubles. StatsPlan gives the
        // layout the kernel assumes (threads a multiple of cw, cw a multiple
        // of 32 and <= c, runs = ceil(hw / span)) and bwd_shared its
        // 2 * (threads / cw * 32 * (c / 32 | 1) + threads) doubles; block
        // (run, bi) reads pixels below hw of sample bi only and writes part
        // entries of (bi, run) only.
        unsafe { launch::gn_bwd_partial(gpu, cfg, params) }
    };
    let combine = |cfg, part: &CudaSlice<f64>, sums: &mut CudaSlice<f64>| {
        // SAFETY: part as above, sums holds 2 * b * 32 doubles; warp
        // w < b * 32 reads the runs of (w / 32, w % 32) and writes
        // sums[2 w ..= 2 w + 1]; the warps past b * 32 (the last block's
        // tail) return at once.
        unsafe { launch::gn_bwd_combine(gpu, cfg, (part, sums, sz.b, plan.runs)) }
    };
    let sums = split_reduce(gpu, op, &sz, &plan, bwd_shared, partial, combine)?;
    let params = (
        x,
        dy,
        dx,
        &stats,
        &sums,
        gamma,
        beta,
        ss,
        has_ss,
        silu,
        sz.hw,
        sz.c,
        sz.n as u64,
    );
    // SAFETY: x, dy and dx hold count = b * hw * c floats, the rest as
    // above.
    unsafe { launch::gn_bwd_apply(gpu, gpu.elementwise_config(sz.n), params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes of the networks and the edges: odd pixel counts, one pixel,
    /// channel counts that do and do not divide 256.
    const CHANNELS: [usize; 12] = [32, 64, 96, 128, 160, 192, 256, 288, 320, 640, 1024, 1536];
    const PIXELS: [usize; 9] = [1, 7, 64, 127, 561, 4096, 16384, 32761, 65536];

    fn plan(sms: u32, b: usize, hw: usize, c: usize) -> StatsPlan {
        StatsPlan::new("test", sms, b, hw, c).unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[test]
    fn stats_plan_fits_the_kernel() {
        for sms in [1, 108, 132] {
            for b in [1, 3, 8, 64] {
                for hw in PIXELS {
                    for c in CHANNELS {
                        let p = plan(sms, b, hw, c);
                        let label = format!("sms={sms} b={b} hw={hw} c={c}: {p:?}");
                        let (cw, threads, tile) =
                            (p.cw as usize, p.threads as usize, p.tile as usize);
                        assert!(cw.is_multiple_of(32) && cw <= c, "{label}");
                        assert!(
                            threads.is_multiple_of(cw) && threads <= STATS_MAX_THREADS,
                            "{label}"
                        );
                        let rows_par = threads / cw;
                        assert!(tile.is_multiple_of(rows_par), "{label}");
                        let span = p.span as usize;
                        assert!(span.is_multiple_of(tile), "{label}");
                        let runs = p.runs as usize;
                        // Every run non-empty, together exactly the sample.
                        assert!((runs - 1) * span < hw && runs * span >= hw, "{label}");
                        let slots = rows_par * GROUPS * ((c / GROUPS) | 1);
                        assert_eq!(p.shared as usize, (slots + threads) * 8, "{label}");
                        assert!(p.shared as usize <= MAX_DYNAMIC_SHARED, "{label}");
                        let bwd = p.bwd_shared("test", c).unwrap_or_else(|e| panic!("{e:#}"));
                        assert_eq!(bwd as usize, 2 * (slots + threads) * 8, "{label}");
                        // Enough blocks to fill the GPU where there are
                        // tiles enough (the rounding of runs loses < half).
                        let tiles = hw.div_ceil(tile);
                        let want = (b * tiles).min(STATS_BLOCKS_PER_SM * sms as usize);
                        assert!(2 * b * runs >= want, "{label}");
                        // Few runs: the partials stay small.
                        assert!(
                            runs <= (STATS_BLOCKS_PER_SM * sms as usize).div_ceil(b),
                            "{label}"
                        );
                    }
                }
            }
        }
        assert!(StatsPlan::new("test", 132, 1, 0, 32).is_err());
        assert!(StatsPlan::new("test", 132, 1, 4, 48).is_err());
        let err = StatsPlan::new("test", 132, 1, 4, 8192)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shared memory"), "{err}");
        // Statistics fit, the backward's doubled partials do not.
        let err = plan(132, 1, 4, 4096)
            .bwd_shared("test", 4096)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gradient sums"), "{err}");
    }

    /// The `(mean, M2)` state of Chan's merge, as gn_chan_merge.
    fn merge(s: &mut (f64, f64, f64), nb: f64, mb: f64, m2b: f64) {
        if nb == 0.0 {
            return;
        }
        if s.0 == 0.0 {
            *s = (nb, mb, m2b);
            return;
        }
        let tot = s.0 + nb;
        let d = mb - s.1;
        s.1 += d * (nb / tot);
        s.2 += m2b + d * d * (s.0 * (nb / tot));
        s.0 = tot;
    }

    /// The statistics' input on the host, as `Source`.
    #[derive(Clone, Copy)]
    enum Src<'a> {
        One(&'a [f32]),
        Concat(&'a [f32], &'a [f32], usize),
    }

    /// gn_group_total replayed: per group, every warp's strided share of
    /// the channel partials `chan` ([rows_par][32 (cg | 1)]), then the
    /// shares in warp order.
    fn group_total(chan: &[f64], threads: usize, rows_par: usize, cg: usize) -> Vec<f64> {
        let nw = threads / 32;
        let gs = cg | 1;
        let row = GROUPS * gs;
        let mut red = vec![f64::NAN; threads];
        for t in 0..threads {
            let (g, w) = (t % 32, t / 32);
            let mut s = 0.0;
            let mut j = w;
            while j < rows_par * cg {
                let (r, k) = (j / cg, j % cg);
                s += chan[r * row + g * gs + k];
                j += nw;
            }
            red[w * 32 + g] = s;
        }
        (0..32)
            .map(|g| (0..nw).map(|i| red[i * 32 + g]).fold(0.0, |a, v| a + v))
            .collect()
    }

    /// gn_stats_partial and gn_stats_combine replayed on the CPU, thread by
    /// thread and phase by phase, with the kernels' index arithmetic (gn_at
    /// for the two-source read): checks that the plan makes every element
    /// read exactly once per sweep, the second tensor of a single source
    /// never, and every shared slot written before it is read. Returns
    /// (mean, rstd).
    fn emulate(p: &StatsPlan, b: usize, hw: usize, c: usize, src: Src<'_>) -> Vec<(f64, f64)> {
        // (x, x2, c1) as Source::parts passes them to the kernels.
        let (x, x2, c1) = match src {
            Src::One(x) => (x, x, c),
            Src::Concat(x, x2, c1) => (x, x2, c1),
        };
        let halves = [x, x2];
        // gn_at: (half, index) of channel ch of pixel pix (over the batch).
        let gn_at = |pix: usize, ch: usize| {
            if ch < c1 {
                (0, pix * c1 + ch)
            } else {
                (1, pix * (c - c1) + (ch - c1))
            }
        };
        let value = |pix: usize, ch: usize| {
            let (h, i) = gn_at(pix, ch);
            halves[h][i]
        };
        let (cw, threads, tile, span, runs) = (
            p.cw as usize,
            p.threads as usize,
            p.tile as usize,
            p.span as usize,
            p.runs as usize,
        );
        let rows_par = threads / cw;
        let cg = c / GROUPS;
        let gs = cg | 1;
        let row = GROUPS * gs;
        let slot = |ch: usize| ch / cg * gs + ch % cg;
        let mut visits = [vec![0u8; x.len()], vec![0u8; x2.len()]];
        let group_total = |chan: &[f64]| group_total(chan, threads, rows_par, cg);
        let mut part = vec![f64::NAN; b * runs * GROUPS * 2];
        for bi in 0..b {
            for run in 0..runs {
                let p_begin = run * span;
                let p_end = hw.min(p_begin + span);
                let mut state = vec![(0.0, 0.0, 0.0); GROUPS];
                let pivot: Vec<f64> = (0..GROUPS).map(|g| value(bi * hw, g * cg) as f64).collect();
                let mut p0 = p_begin;
                while p0 < p_end {
                    let rows = tile.min(p_end - p0);
                    let pix = |r: usize| bi * hw + p0 + r;
                    let mut chan = vec![f64::NAN; rows_par * row];
                    for t in 0..threads {
                        let (ch0, r0) = (t % cw, t / cw);
                        for ch in (ch0..c).step_by(cw) {
                            let mut s = 0.0;
                            for r in (r0..rows).step_by(rows_par) {
                                let (h, i) = gn_at(pix(r), ch);
                                s += halves[h][i] as f64 - pivot[ch / cg];
                                visits[h][i] += 1;
                            }
                            chan[r0 * row + slot(ch)] = s;
                        }
                    }
                    let n_tile = (rows * cg) as f64;
                    let gmean: Vec<f64> = group_total(&chan).iter().map(|s| s / n_tile).collect();
                    let mut chan = vec![f64::NAN; rows_par * row];
                    for t in 0..threads {
                        let (ch0, r0) = (t % cw, t / cw);
                        for ch in (ch0..c).step_by(cw) {
                            let mut q = 0.0;
                            for r in (r0..rows).step_by(rows_par) {
                                let d =
                                    (value(pix(r), ch) as f64 - pivot[ch / cg]) - gmean[ch / cg];
                                q += d * d;
                            }
                            chan[r0 * row + slot(ch)] = q;
                        }
                    }
                    let m2 = group_total(&chan);
                    for g in 0..GROUPS {
                        merge(&mut state[g], n_tile, gmean[g], m2[g]);
                    }
                    p0 += tile;
                }
                for (g, s) in state.iter().enumerate() {
                    let o = 2 * ((bi * runs + run) * GROUPS + g);
                    part[o] = s.1;
                    part[o + 1] = s.2;
                }
            }
        }
        assert!(
            visits[0].iter().all(|&v| v == 1),
            "an element of x not read exactly once"
        );
        // x2 is x itself for a single source, and then never read.
        let second = u8::from(matches!(src, Src::Concat(..)));
        assert!(
            visits[1].iter().all(|&v| v == second),
            "an element of x2 not read exactly {second} times"
        );
        let mut out = Vec::new();
        for bi in 0..b {
            for g in 0..GROUPS {
                let mut lanes = vec![(0.0, 0.0, 0.0); 32];
                for (lane, st) in lanes.iter_mut().enumerate() {
                    for k in (lane..runs).step_by(32) {
                        let p0 = k * span;
                        let nk = ((hw.min(p0 + span) - p0) * cg) as f64;
                        let o = 2 * ((bi * runs + k) * GROUPS + g);
                        merge(st, nk, part[o], part[o + 1]);
                    }
                }
                let mut off = 16;
                while off > 0 {
                    let prev = lanes.clone();
                    for lane in 0..32 - off {
                        let (nb, mb, m2b) = prev[lane + off];
                        merge(&mut lanes[lane], nb, mb, m2b);
                    }
                    off /= 2;
                }
                let (n, mean, m2) = lanes[0];
                assert!(n == (hw * cg) as f64, "count {n} for {hw} x {cg}");
                let pivot = value(bi * hw, g * cg) as f64;
                out.push((pivot + mean, 1.0 / (m2 / n + 1e-5).sqrt()));
            }
        }
        out
    }

    /// Neumaier-compensated sum: exact to about one rounding, whatever the
    /// order, so it judges the split reduction without sharing its errors.
    fn compensated(values: impl Iterator<Item = f64>) -> f64 {
        let (mut s, mut comp) = (0f64, 0f64);
        for v in values {
            let t = s + v;
            comp += if s.abs() >= v.abs() {
                (s - t) + v
            } else {
                (v - t) + s
            };
            s = t;
        }
        s + comp
    }

    /// (mean, 1/sigma) per (sample, group) as the CPU's stats_exact (mean,
    /// then the variance around it), with compensated sums.
    fn reference(b: usize, hw: usize, c: usize, x: &[f32]) -> Vec<(f64, f64)> {
        let cg = c / GROUPS;
        let mut out = Vec::new();
        for bi in 0..b {
            for g in 0..GROUPS {
                let group = || {
                    (0..hw).flat_map(move |p| {
                        (0..cg).map(move |k| x[(bi * hw + p) * c + g * cg + k] as f64)
                    })
                };
                let n = (hw * cg) as f64;
                let mean = compensated(group()) / n;
                let m2 = compensated(group().map(|v| (v - mean) * (v - mean)));
                out.push((mean, 1.0 / (m2 / n + 1e-5).sqrt()));
            }
        }
        out
    }

    #[test]
    fn split_statistics_are_exact() {
        use rand::rngs::ChaCha8Rng;
        use rand::{RngExt, SeedableRng};
        use rand_distr::StandardNormal;
        let mut rng = ChaCha8Rng::seed_from_u64(0x5ca7);
        // Small SM counts force runs of several tiles, whose merges the
        // H100's many runs would rarely exercise at these sizes.
        for (sms, b, hw, c, mean, std) in [
            (132, 1, 1, 32, 0.7, 1.3),
            (132, 3, 7, 96, 0.7, 1.3),
            (132, 3, 561, 192, 0.7, 1.3),
            (132, 1, 64, 1536, 0.7, 1.3),
            (132, 2, 130, 288, 0.7, 1.3),
            (4, 3, 561, 32, 0.7, 1.3),
            (4, 1, 2000, 96, 0.7, 1.3),
            (2, 2, 300, 1536, 0.7, 1.3),
            (1, 3, 4097, 64, 100.0, 0.01),
            (132, 3, 561, 96, 100.0, 0.01),
            (3, 1, 1000, 192, 1e4, 0.01),
        ] {
            let p = plan(sms, b, hw, c);
            let x: Vec<f32> = (0..b * hw * c)
                .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
                .collect();
            let got = emulate(&p, b, hw, c, Src::One(&x));
            let want = reference(b, hw, c, &x);
            let label = format!("sms={sms} b={b} hw={hw} c={c} mean={mean} {p:?}");
            assert_close(&label, &got, &want, std);
        }
    }

    /// Measured: <= 3e-16 of the mean (or of sigma where the mean is near
    /// 0) and of 1/sigma, at mean / sigma up to 1e6; the uncompensated
    /// two-pass sums of the CPU twin are off by up to 7e-14 here. Bound
    /// 4e-15.
    fn assert_close(label: &str, got: &[(f64, f64)], want: &[(f64, f64)], std: f32) {
        assert_eq!(got.len(), want.len(), "{label}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let mean_err = (g.0 - w.0).abs() / w.0.abs().max(std as f64);
            let rstd_err = (g.1 - w.1).abs() / w.1;
            assert!(
                mean_err <= 4e-15,
                "{label} group {i}: mean {} vs {}",
                g.0,
                w.0
            );
            assert!(
                rstd_err <= 4e-15,
                "{label} group {i}: rstd {} vs {}",
                g.1,
                w.1
            );
        }
    }

    /// The concatenation [x, x2] read in place (gn_at) gives the statistics
    /// of the materialised concatenation, bit for bit those of the
    /// single-tensor kernels on it (same elements, same sums, same order).
    #[test]
    fn concat_statistics_match_one_tensor() {
        use rand::rngs::ChaCha8Rng;
        use rand::{RngExt, SeedableRng};
        use rand_distr::StandardNormal;
        let mut rng = ChaCha8Rng::seed_from_u64(0xc0ca7);
        for (sms, b, hw, c, c1, mean, std) in [
            (132, 3, 7, 96, 64, 0.7, 1.3),
            (4, 1, 2000, 96, 64, 0.7, 1.3),
            (132, 3, 561, 192, 96, 0.7, 1.3),
            (3, 1, 1000, 192, 96, 1e4, 0.01),
            (132, 1, 64, 1536, 768, 0.7, 1.3),
            (2, 2, 300, 1536, 768, 0.7, 1.3),
            // A split inside a group (cg = 2: group 1 is channel 2 of x and
            // channel 0 of x2), and one pixel.
            (1, 3, 4097, 64, 3, 100.0, 0.01),
            (132, 2, 130, 64, 3, 0.7, 1.3),
            (132, 1, 1, 64, 3, 0.7, 1.3),
        ] {
            let p = plan(sms, b, hw, c);
            let cat: Vec<f32> = (0..b * hw * c)
                .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
                .collect();
            let x: Vec<f32> = cat.chunks(c).flat_map(|px| &px[..c1]).copied().collect();
            let x2: Vec<f32> = cat.chunks(c).flat_map(|px| &px[c1..]).copied().collect();
            let got = emulate(&p, b, hw, c, Src::Concat(&x, &x2, c1));
            let one = emulate(&p, b, hw, c, Src::One(&cat));
            let label = format!("sms={sms} b={b} hw={hw} c={c} = {c1} + {} {p:?}", c - c1);
            for (i, (g, o)) in got.iter().zip(&one).enumerate() {
                assert!(
                    g.0.to_bits() == o.0.to_bits() && g.1.to_bits() == o.1.to_bits(),
                    "{label} group {i}: {g:?} from two tensors, {o:?} from one"
                );
            }
            assert_close(&label, &got, &reference(b, hw, c, &cat), std);
        }
    }

    /// What the backward's group sums read, on the host: x and dy
    /// `[b, hw, c]`, the forward's (mean, 1/sigma) per (sample, group),
    /// gamma, beta, the optional `[b, 2c]` scale/shift and SiLU.
    struct BwdIn<'a> {
        x: &'a [f32],
        dy: &'a [f32],
        stats: &'a [(f64, f64)],
        gamma: &'a [f32],
        beta: &'a [f32],
        ss: Option<&'a [f32]>,
        silu: bool,
    }

    /// gn_dxhat on the host (Rust's exp for CUDA's, both within an ulp) at
    /// element `i`, channel `ch`; `s` is the sample's `[2c]` scale/shift.
    fn dxhat(a: &BwdIn<'_>, s: Option<&[f32]>, xhat: f64, i: usize, ch: usize) -> f64 {
        let c = a.gamma.len();
        let (gamma, beta) = (a.gamma[ch], a.beta[ch]);
        let mut g = a.dy[i] as f64;
        let mut z = xhat * gamma as f64 + beta as f64;
        let mut mul = 1.0;
        if let Some(s) = s {
            mul = 1.0 + s[ch] as f64;
            z = z * mul + s[c + ch] as f64;
        }
        if a.silu {
            let sg = 1.0 / (1.0 + (-z).exp());
            g *= sg * (1.0 + z * (1.0 - sg));
        }
        g * mul * gamma as f64
    }

    /// gn_bwd_partial and gn_bwd_combine replayed on the CPU, thread by
    /// thread, with the kernels' index arithmetic: checks that the plan
    /// makes every element of x and dy read exactly once and every shared
    /// slot written before it is read (NaN poison otherwise). Returns
    /// (s1, s2) per (sample, group).
    fn emulate_bwd(p: &StatsPlan, b: usize, hw: usize, c: usize, a: &BwdIn<'_>) -> Vec<(f64, f64)> {
        let (cw, threads, span, runs) = (
            p.cw as usize,
            p.threads as usize,
            p.span as usize,
            p.runs as usize,
        );
        let rows_par = threads / cw;
        let cg = c / GROUPS;
        let gs = cg | 1;
        let row = GROUPS * gs;
        let slot = |ch: usize| ch / cg * gs + ch % cg;
        // x[i] and dy[i] are read together: one count for both.
        let mut visits = vec![0u8; a.x.len()];
        let mut part = vec![f64::NAN; b * runs * GROUPS * 2];
        for bi in 0..b {
            let s = a.ss.map(|ss| &ss[bi * 2 * c..(bi + 1) * 2 * c]);
            for run in 0..runs {
                let p_begin = run * span;
                let p_end = hw.min(p_begin + span);
                let pix0 = bi * hw;
                let mut chan1 = vec![f64::NAN; rows_par * row];
                let mut chan2 = vec![f64::NAN; rows_par * row];
                for t in 0..threads {
                    let (ch0, r0) = (t % cw, t / cw);
                    for ch in (ch0..c).step_by(cw) {
                        let (mean, inv) = a.stats[bi * GROUPS + ch / cg];
                        let (mut s1, mut s2) = (0.0, 0.0);
                        let mut px = p_begin + r0;
                        while px < p_end {
                            let i = (pix0 + px) * c + ch;
                            visits[i] += 1;
                            let xhat = (a.x[i] as f64 - mean) * inv;
                            let d = dxhat(a, s, xhat, i, ch);
                            s1 += d;
                            s2 += d * xhat;
                            px += rows_par;
                        }
                        let o = r0 * row + slot(ch);
                        chan1[o] = s1;
                        chan2[o] = s2;
                    }
                }
                let t1 = group_total(&chan1, threads, rows_par, cg);
                let t2 = group_total(&chan2, threads, rows_par, cg);
                for g in 0..GROUPS {
                    let o = 2 * ((bi * runs + run) * GROUPS + g);
                    part[o] = t1[g];
                    part[o + 1] = t2[g];
                }
            }
        }
        assert!(
            visits.iter().all(|&v| v == 1),
            "an element of x / dy not read exactly once"
        );
        let mut out = Vec::new();
        for bi in 0..b {
            for g in 0..GROUPS {
                let mut lanes = vec![(0.0, 0.0); 32];
                for (lane, st) in lanes.iter_mut().enumerate() {
                    for k in (lane..runs).step_by(32) {
                        let o = 2 * ((bi * runs + k) * GROUPS + g);
                        st.0 += part[o];
                        st.1 += part[o + 1];
                    }
                }
                // warp_sum_d: __shfl_down_sync, lanes past the end keep
                // their own value (never read by lane 0's tree).
                let mut off = 16;
                while off > 0 {
                    let prev = lanes.clone();
                    for lane in 0..32 - off {
                        lanes[lane].0 += prev[lane + off].0;
                        lanes[lane].1 += prev[lane + off].1;
                    }
                    off /= 2;
                }
                out.push(lanes[0]);
            }
        }
        out
    }

    /// (s1, s2) per (sample, group) with compensated sums in the CPU twin's
    /// order, and the sums of their terms' magnitudes (the scale of an
    /// order's rounding errors, s1 and s2 themselves cancelling to ~0).
    fn reference_bwd(b: usize, hw: usize, c: usize, a: &BwdIn<'_>) -> Vec<[f64; 4]> {
        let cg = c / GROUPS;
        let mut out = Vec::new();
        for bi in 0..b {
            let s = a.ss.map(|ss| &ss[bi * 2 * c..(bi + 1) * 2 * c]);
            for g in 0..GROUPS {
                let (mean, inv) = a.stats[bi * GROUPS + g];
                let terms: Vec<(f64, f64)> = (0..hw)
                    .flat_map(|p| {
                        (0..cg).map(move |k| ((bi * hw + p) * c + g * cg + k, g * cg + k))
                    })
                    .map(|(i, ch)| {
                        let xhat = (a.x[i] as f64 - mean) * inv;
                        let d = dxhat(a, s, xhat, i, ch);
                        (d, d * xhat)
                    })
                    .collect();
                out.push([
                    compensated(terms.iter().map(|t| t.0)),
                    compensated(terms.iter().map(|t| t.1)),
                    terms.iter().map(|t| t.0.abs()).sum(),
                    terms.iter().map(|t| t.1.abs()).sum(),
                ]);
            }
        }
        out
    }

    #[test]
    fn split_gradient_sums_are_exact() {
        use rand::rngs::ChaCha8Rng;
        use rand::{RngExt, SeedableRng};
        use rand_distr::StandardNormal;
        let mut rng = ChaCha8Rng::seed_from_u64(0xb4c4);
        let mut normals = |n: usize, mean: f32, std: f32| -> Vec<f32> {
            (0..n)
                .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
                .collect()
        };
        // The networks' shapes on an H100 (132 SMs), and few SMs for runs
        // of many tiles.
        let mut shapes = Vec::new();
        for b in [1, 3] {
            for hw in [1, 7, 33 * 17, 181 * 181] {
                for c in [32, 96, 192, 1536] {
                    // 151M elements would take ~2 GiB here; b = 1 covers it.
                    if b * hw * c <= 60_000_000 {
                        shapes.push((132, b, hw, c));
                    }
                }
            }
        }
        shapes.extend([
            (4, 3, 561, 32),
            (4, 1, 2000, 96),
            (2, 2, 300, 1536),
            (1, 3, 4097, 64),
        ]);
        let mut worst = 0f64;
        for (sms, b, hw, c) in shapes {
            let p = plan(sms, b, hw, c);
            let n = b * hw * c;
            let variants: &[(bool, bool)] = if n > 4_000_000 {
                &[(true, true)]
            } else {
                &[(false, false), (false, true), (true, false), (true, true)]
            };
            let x = normals(n, 0.7, 1.3);
            let stats = reference(b, hw, c, &x);
            for &(with_ss, silu) in variants {
                let dy = normals(n, 0.0, 1.0);
                let gamma = normals(c, 1.0, 0.2);
                let beta = normals(c, 0.0, 0.3);
                let ss = normals(2 * b * c, 0.0, 0.3);
                let a = BwdIn {
                    x: &x,
                    dy: &dy,
                    stats: &stats,
                    gamma: &gamma,
                    beta: &beta,
                    ss: with_ss.then_some(&ss[..]),
                    silu,
                };
                let got = emulate_bwd(&p, b, hw, c, &a);
                let want = reference_bwd(b, hw, c, &a);
                let label = format!("sms={sms} b={b} hw={hw} c={c} ss={with_ss} silu={silu} {p:?}");
                assert_eq!(got.len(), want.len(), "{label}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // 0 / 0 where every term is 0 (one element per group:
                    // xhat = 0).
                    let err = |got: f64, want: f64, mag: f64| {
                        let d = (got - want).abs();
                        if d == 0.0 {
                            0.0
                        } else {
                            d / mag
                        }
                    };
                    let e1 = err(g.0, w[0], w[2]);
                    let e2 = err(g.1, w[1], w[3]);
                    worst = worst.max(e1).max(e2);
                    assert!(
                        e1 <= 1e-15 && e2 <= 1e-15,
                        "{label} group {i}: ({}, {}) vs ({}, {}), errors {e1:e} {e2:e} of the \
                         terms' magnitudes",
                        g.0,
                        g.1,
                        w[0],
                        w[1]
                    );
                }
            }
        }
        println!("gradient sums: worst error {worst:e} of the terms' magnitudes");
    }
}
