//! The tensor-core attention forward (`cuda::flash::attention_fast`, bf16 and
//! fp16 operands) against its CPU twin, the `CpuRef` backend's attention, on
//! fresh random inputs.
//!
//! The kernel rounds q, k and v to the 16-bit type as they are (the scale is
//! folded into the logits, `(q16 . k16) / sqrt(d)`), so the CPU twin is run on
//! qkv pre-rounded the same way (round to nearest even, the `half` crate);
//! the CPU's `(q16 s) . (k16 s)` with s = d^(-1/4) differs from that only by
//! float32 rounding. What remains is the rounding of the softmax weights P to
//! 16 bits before the P.V product, and float32 accumulation order.
//!
//! The fp32 mode's kernel (`cuda::flash::attention_tf32x3`, float32 operands
//! split into 3xTF32 products) is compared with the CPU twin on the same,
//! unrounded, input, and with a float64 attention computed here (the
//! fixtures' parity is against PyTorch float64); see `TF32X3_TOL`.
//!
//! `gpu_*` tests are `#[gpu_test]`s (see `tests/common`): ignored where the build found no
//! CUDA driver, failing, never passing, where a driver is present but no GPU is usable.

mod common;

use common::*;

use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::cuda::attention::AttnDims;
use fcd::backend::cuda::{self, CudaSlice, Gpu};
use fcd::backend::Backend;
use fcd::precision::Half;
use fcd::tensor::{rel_l2, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// Unit roundoff u of round to nearest: 2^-8 for bf16 (8 significant bits),
/// 2^-11 for fp16 (11 bits); |relative error| <= u for every normal value.
fn unit_roundoff(half: Half) -> f64 {
    match half {
        Half::Bf16 => 2f64.powi(-8),
        Half::Fp16 => 2f64.powi(-11),
    }
}

/// Tolerance on the rel-L2 distance to the CPU twin.
///
/// Derivation. With p_ij the unnormalised weights and e_ij the relative
/// error of rounding them to 16 bits, the kernel computes (its row sum adds
/// the rounded p too) A_i = sum_j p_ij (1 + e_ij) v_j / sum_j p_ij (1 + e_ij),
/// so to first order dA_i = sum_j W_ij e_ij (v_j - A_i). Round to nearest
/// makes e uniform within half an ulp; over the mantissas of a binade
/// (log-uniform) its RMS is sigma = 2u * sqrt(E[1/m^2] / 12) with
/// E[1/m^2] = 3 / (8 ln 2) = 0.541 for m in [1, 2), so sigma = 0.425 u:
/// 2^-9.2 = 1.7e-3 (bf16), 2^-12.2 = 2.1e-4 (fp16). (The 2^-9 / 2^-12 often
/// quoted are these RMS values; the worst case per element is u.) For
/// independent e, E|dA_i|^2 = sigma^2 sum_j W_ij^2 |v_j - A_i|^2, and for v
/// independent of W with zero mean |A_i|^2 ~ sum_j W_ij^2 |v_j|^2, so the
/// rel-L2 is ~ sigma sqrt(1 + sum_j W_ij^2) ~ sigma; smaller where one key
/// dominates, as the row maximum's own p = exp2(0) = 1 is exact (t = 1 gives
/// ~0). The other differences (float32 accumulation order in the mma,
/// exp2f against exp, d^-1/2 against (d^-1/4)^2 in float32) are ~1e-6
/// relative, far below. The worst-case (not statistical) bound is useless:
/// u sum_j W_ij |v_j - A_i| / |A_i| grows like sqrt(t) when the weights are
/// spread and A_i averages out. Bound: 2u = 4.7 sigma, i.e. 7.8e-3 (bf16)
/// and 9.8e-4 (fp16): room for the model's slack on small cases, while a
/// wrong fragment mapping, a missed rescale or truncating instead of
/// rounding shows up at 1e-2 .. 1.
fn tolerance(half: Half) -> f64 {
    2.0 * unit_roundoff(half)
}

/// The predicted rel-L2, sigma = 0.425 u (see `tolerance`).
fn sigma(half: Half) -> f64 {
    0.425 * unit_roundoff(half)
}

/// Tolerance on the rel-L2 distance of `attention_tf32x3` to the CPU twin
/// (and to float64), both on unrounded float32 input.
///
/// Derivation. With u = 2^-24 (float32's unit roundoff): the split x =
/// tf32(x) + tf32(x - tf32(x)) + r leaves |r| <= 2^-22 |x|, and the three
/// products drop small x small and the r terms, <= ~2^-21 |x y| per product
/// (8u), random in sign, so over a d-term dot or a t-term weighted sum they
/// average to ~u relative, below the float32 roundings both implementations
/// share: the logit x = S log2(e) carries ~u |x| (a few u for |x| ~ 1 at
/// std 1, ~13u at std 3 where |S| ~ 9), which moves the output by
/// ~ln2 sum_j W_ij dx_ij (v_j - A_i), and the float32 sums over t keys
/// (every group of three mma is added to the running sum with a correctly
/// rounded float32 add, so no truncation bias builds up). The kernel's
/// lane-level emulation (mma accumulation modelled as round to nearest,
/// round toward zero, or a truncating tensor-core model; exp2f with its
/// 2 ulp) puts it at rel-L2 1.8e-7 (RMS) / 4.9e-7 (max) from float64 at
/// std 1 and 4.1e-7 / 7.9e-7 at std 3, over t <= 1000, d 24..64; t = 4096:
/// 4.5e-7 / 7.6e-7; the CPU twin's own float32 error is 2.6e-7 / 4.3e-7
/// and 6.2e-7 / 1.1e-6; the two differ by at most 5.0e-7 (std 1) and
/// 1.4e-6 (std 3). Bound: 4e-6, ~3x the largest of these (room for what
/// the models miss: the real tensor cores' accumulation, the CPU gemm's
/// summation order at t = 4096), while a single TF32 product (4e-4 ..
/// 1e-3), a dropped cross term (2e-4), mma chains accumulated on the
/// tensor cores with truncation (~1e-5 at t = 1000) or any fragment
/// mix-up (1e-2 .. 1) fail it.
const TF32X3_TOL: f64 = 4e-6;

/// The predicted rel-L2 scale of `attention_tf32x3`, for the report.
const TF32X3_SIGMA: f64 = 5e-7;

/// The operands of the kernel under test.
#[derive(Clone, Copy)]
enum Kind {
    Half(Half),
    Tf32x3,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Half(half) => label(half),
            Kind::Tf32x3 => "tf32x3",
        }
    }

    fn tolerance(self) -> f64 {
        match self {
            Kind::Half(half) => tolerance(half),
            Kind::Tf32x3 => TF32X3_TOL,
        }
    }

    fn sigma(self) -> f64 {
        match self {
            Kind::Half(half) => sigma(half),
            Kind::Tf32x3 => TF32X3_SIGMA,
        }
    }

    /// What the CPU twin is given: the input as the kernel rounds it.
    fn round(self, x: f32) -> f32 {
        match self {
            Kind::Half(half) => round16(half, x),
            Kind::Tf32x3 => x,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        self,
        gpu: &Gpu,
        qkv: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        b: usize,
        t: usize,
        c: usize,
        heads: usize,
        legacy: bool,
    ) -> anyhow::Result<()> {
        match self {
            Kind::Half(half) => cuda::flash::attention_fast(
                gpu,
                half,
                qkv,
                out,
                AttnDims {
                    b,
                    t,
                    c,
                    heads,
                    legacy,
                },
            ),
            Kind::Tf32x3 => cuda::flash::attention_tf32x3(
                gpu,
                qkv,
                out,
                AttnDims {
                    b,
                    t,
                    c,
                    heads,
                    legacy,
                },
            ),
        }
    }
}

/// Float64 attention of `qkv` `[b, t, 3c]` (the model of PyTorch's float64
/// the fixtures hold): S = q k^T / sqrt(d), exact softmax, W v.
fn attention_f64(
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    legacy: bool,
) -> Vec<f64> {
    let d = c / heads;
    let mut out = vec![0f64; b * t * c];
    let x = |bi: usize, i: usize, ch: usize| f64::from(qkv[(bi * t + i) * 3 * c + ch]);
    let scale = 1.0 / (d as f64).sqrt();
    let mut w = vec![0f64; t];
    for bi in 0..b {
        for h in 0..heads {
            let (qo, ko, vo) = if legacy {
                (h * 3 * d, h * 3 * d + d, h * 3 * d + 2 * d)
            } else {
                (h * d, c + h * d, 2 * c + h * d)
            };
            for i in 0..t {
                let mut m = f64::NEG_INFINITY;
                for (j, wj) in w.iter_mut().enumerate() {
                    let s: f64 = (0..d).map(|e| x(bi, i, qo + e) * x(bi, j, ko + e)).sum();
                    *wj = s * scale;
                    m = m.max(*wj);
                }
                let mut sum = 0f64;
                for wj in w.iter_mut() {
                    *wj = (*wj - m).exp();
                    sum += *wj;
                }
                let o = &mut out[(bi * t + i) * c + h * d..][..d];
                for (j, &wj) in w.iter().enumerate() {
                    for (e, oe) in o.iter_mut().enumerate() {
                        *oe += wj / sum * x(bi, j, vo + e);
                    }
                }
            }
        }
    }
    out
}

/// The host float64 reference itself, against the CPU twin (no GPU needed):
/// they agree to float32 level, and the head orders are told apart.
#[test]
fn f64_reference_matches_cpu_twin() {
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xf1aa));
    for (b, t, d, heads, legacy) in [(2, 65, 24, 3, true), (1, 33, 64, 2, false)] {
        let c = d * heads;
        let qkv = normals(&mut rng, b * t * 3 * c, 2.0);
        let exact = attention_f64(&qkv, b, t, c, heads, legacy);
        let qkvt = Tensor::new(vec![b, 1, t, 3 * c], qkv.clone()).unwrap();
        let cpu = CpuRef.attention(&qkvt, heads, legacy).unwrap();
        let r = rel_l2_f64(&cpu.data, &exact);
        assert!(r < 2e-6, "b={b} t={t} d={d} legacy={legacy}: {r:e}");
        let other = attention_f64(&qkv, b, t, c, heads, !legacy);
        assert!(rel_l2_f64(&cpu.data, &other) > 0.1);
    }
}

fn rel_l2_f64(a: &[f32], r: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(r)
        .map(|(&x, &y)| (f64::from(x) - y).powi(2))
        .sum();
    let den: f64 = r.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn round16(kind: Half, x: f32) -> f32 {
    match kind {
        Half::Bf16 => half::bf16::from_f32(x).to_f32(),
        Half::Fp16 => half::f16::from_f32(x).to_f32(),
    }
}

fn label(half: Half) -> &'static str {
    match half {
        Half::Bf16 => "bf16",
        Half::Fp16 => "fp16",
    }
}

fn normals(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| std * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn up(gpu: &Gpu, v: &[f32]) -> CudaSlice<f32> {
    gpu.stream().clone_htod(v).unwrap()
}

/// An output buffer filled with NaN, so that an element never written shows.
fn poisoned(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.stream().clone_htod(&vec![f32::NAN; n]).unwrap()
}

fn down(gpu: &Gpu, buf: &CudaSlice<f32>) -> Vec<f32> {
    let mut out = vec![f32::NAN; buf.len()];
    gpu.stream().memcpy_dtoh(buf, &mut out).unwrap();
    gpu.synchronize().unwrap();
    out
}

/// One case: shape, head order, operand type and input spread.
struct Case {
    kind: Kind,
    std: f32,
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
    legacy: bool,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "{} std={} b={} t={} d={} heads={} legacy={}",
            self.kind.label(),
            self.std,
            self.b,
            self.t,
            self.d,
            self.heads,
            self.legacy
        )
    }
}

/// Runs one case; asserts every element is written and finite and the
/// rel-L2 to the CPU twin within the kind's tolerance; returns the rel-L2.
fn run_case(gpu: &Gpu, rng: &mut ChaCha8Rng, k: &Case) -> f64 {
    run_case_full(gpu, rng, k).0
}

/// The rel-L2 to the CPU twin, the input, the GPU's and the CPU's output.
type Full = (f64, Vec<f32>, Vec<f32>, Vec<f32>);

/// `run_case`, also returning the input and both outputs.
fn run_case_full(gpu: &Gpu, rng: &mut ChaCha8Rng, k: &Case) -> Full {
    let label = k.label();
    let c = k.d * k.heads;
    let qkv = normals(rng, k.b * k.t * 3 * c, k.std);
    // Every qkv channel is a q, k or v channel of some head.
    let rounded: Vec<f32> = qkv.iter().map(|&x| k.kind.round(x)).collect();
    let qkvt = Tensor::new(vec![k.b, 1, k.t, 3 * c], rounded).unwrap();
    let want = CpuRef.attention(&qkvt, k.heads, k.legacy).unwrap();

    // The GPU gets the unrounded input: its own rounding must match.
    let qkvd = up(gpu, &qkv);
    let mut out = poisoned(gpu, k.b * k.t * c);
    k.kind
        .run(gpu, &qkvd, &mut out, k.b, k.t, c, k.heads, k.legacy)
        .unwrap_or_else(|e| panic!("{label}: {e:#}"));
    let got = down(gpu, &out);

    assert_eq!(got.len(), want.data.len(), "{label}: length");
    for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
        assert!(w.is_finite(), "{label}: CPU element {i} is {w}");
        assert!(g.is_finite(), "{label}: element {i} is {g} (cpu {w})");
    }
    let rel = rel_l2(&got, &want.data);
    let max_abs = got
        .iter()
        .zip(&want.data)
        .map(|(&g, &w)| (g - w).abs())
        .fold(0f32, f32::max);
    let tol = k.kind.tolerance();
    assert!(
        rel <= tol,
        "{label}: rel-L2 {rel:e} > {tol:e} (max |diff| {max_abs:e})"
    );
    (rel, qkv, got, want.data)
}

/// Worst and mean rel-L2 of a group of cases, for the --nocapture report.
#[derive(Default)]
struct Stats {
    worst: f64,
    worst_case: String,
    sum: f64,
    n: usize,
}

impl Stats {
    fn add(&mut self, rel: f64, case: &Case) {
        if rel >= self.worst {
            self.worst = rel;
            self.worst_case = case.label();
        }
        self.sum += rel;
        self.n += 1;
    }

    fn report(&self, group: &str, kind: Kind) {
        println!(
            "{group}: {} cases, mean rel-L2 {:.3e} ({:.2} sigma), worst {:.3e} ({:.2} sigma, \
             tolerance {:.3e}) at {}",
            self.n,
            self.sum / self.n.max(1) as f64,
            self.sum / self.n.max(1) as f64 / kind.sigma(),
            self.worst,
            self.worst / kind.sigma(),
            kind.tolerance(),
            self.worst_case
        );
    }
}

/// Heads per head dim: c stays near 64..128 channels.
fn heads_for(d: usize) -> usize {
    if d <= 24 {
        3
    } else {
        2
    }
}

#[gpu_test]
fn gpu_flash_attention_matches_cpu() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xf1a5));
    for half in [Half::Bf16, Half::Fp16] {
        // std 1: logits of std ~1 (spread weights, the largest P rounding
        // error); std 3: logits of std ~9 (peaky weights).
        for std in [1.0f32, 3.0] {
            let mut stats = Stats::default();
            let mut by_t: Vec<(usize, Stats)> = Vec::new();
            for t in [1, 17, 65, 256, 1000, 1024] {
                let mut st = Stats::default();
                for d in [24, 32, 48, 64] {
                    for legacy in [true, false] {
                        for b in [1, 3] {
                            let case = Case {
                                kind: Kind::Half(half),
                                std,
                                b,
                                t,
                                d,
                                heads: heads_for(d),
                                legacy,
                            };
                            let rel = run_case(&gpu, &mut rng, &case);
                            stats.add(rel, &case);
                            st.add(rel, &case);
                        }
                    }
                }
                by_t.push((t, st));
            }
            let group = format!("flash {} std={std}", label(half));
            stats.report(&group, Kind::Half(half));
            for (t, st) in &by_t {
                st.report(&format!("  {group} t={t}"), Kind::Half(half));
            }
        }
    }
}

/// Head dims other than the network's (the d <= 64 kernel's smallest
/// padding, and the d <= 128 kernel), the largest token count, and a wide
/// grid (b = 64, 16 heads).
#[gpu_test]
fn gpu_flash_attention_other_shapes() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xf1a6));
    for half in [Half::Bf16, Half::Fp16] {
        let mut stats = Stats::default();
        let mut cases = Vec::new();
        for d in [8, 16, 40, 72, 80, 96, 128] {
            for t in [63, 300] {
                cases.push((2, t, d, 2, d % 16 == 0));
            }
        }
        cases.push((1, 4096, 64, 2, false));
        cases.push((1, 4095, 24, 1, true));
        cases.push((64, 64, 32, 16, false));
        cases.push((5, 129, 48, 16, true));
        for (b, t, d, heads, legacy) in cases {
            for std in [1.0f32, 3.0] {
                let case = Case {
                    kind: Kind::Half(half),
                    std,
                    b,
                    t,
                    d,
                    heads,
                    legacy,
                };
                let rel = run_case(&gpu, &mut rng, &case);
                stats.add(rel, &case);
            }
        }
        stats.report(
            &format!("flash {} other shapes", label(half)),
            Kind::Half(half),
        );
    }
}

/// The GPU's distance to float64 and the SIMT float32 kernel
/// (`fcd::lab::cuda_ref::attention::attention`, the fp32 mode's oracle), within
/// `TF32X3_TOL` like the distance to the CPU twin; returns (GPU to float64,
/// CPU twin to float64), None when `f64_ref` is false.
fn tf32x3_extra_checks(
    gpu: &Gpu,
    k: &Case,
    qkv: &[f32],
    got: &[f32],
    cpu: &[f32],
    f64_ref: bool,
) -> Option<(f64, f64)> {
    let label = k.label();
    let c = k.d * k.heads;
    let qkvd = up(gpu, qkv);
    let mut simt = poisoned(gpu, k.b * k.t * c);
    fcd::lab::cuda_ref::attention::attention(
        gpu,
        &qkvd,
        &mut simt,
        AttnDims {
            b: k.b,
            t: k.t,
            c,
            heads: k.heads,
            legacy: k.legacy,
        },
    )
    .unwrap_or_else(|e| panic!("{label}: oracle: {e:#}"));
    let simt = down(gpu, &simt);
    let r = rel_l2(got, &simt);
    assert!(
        r <= TF32X3_TOL,
        "{label}: rel-L2 to the SIMT kernel {r:e} > {TF32X3_TOL:e}"
    );
    if !f64_ref {
        return None;
    }
    let exact = attention_f64(qkv, k.b, k.t, c, k.heads, k.legacy);
    let r = rel_l2_f64(got, &exact);
    let rc = rel_l2_f64(cpu, &exact);
    assert!(
        r <= TF32X3_TOL,
        "{label}: rel-L2 to float64 {r:e} > {TF32X3_TOL:e} (CPU twin's {rc:e})"
    );
    Some((r, rc))
}

/// The fp32 mode's kernel against the CPU twin, the SIMT kernel and (b = 1
/// cases) float64 over the network's head dims, odd and even t, both head
/// orders; NaN-poisoned outputs.
#[gpu_test]
fn gpu_flash_tf32x3_matches_cpu() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xf1a8));
    let kind = Kind::Tf32x3;
    for std in [1.0f32, 3.0] {
        let mut stats = Stats::default();
        let mut exact = Stats::default();
        let mut cpu_exact = Stats::default();
        for t in [1, 17, 65, 256, 1000, 1024] {
            let mut st = Stats::default();
            for d in [24, 32, 48, 64] {
                for legacy in [true, false] {
                    for b in [1, 3] {
                        let case = Case {
                            kind,
                            std,
                            b,
                            t,
                            d,
                            heads: heads_for(d),
                            legacy,
                        };
                        let (rel, qkv, got, cpu) = run_case_full(&gpu, &mut rng, &case);
                        stats.add(rel, &case);
                        st.add(rel, &case);
                        if let Some((r, rc)) =
                            tf32x3_extra_checks(&gpu, &case, &qkv, &got, &cpu, b == 1)
                        {
                            exact.add(r, &case);
                            cpu_exact.add(rc, &case);
                        }
                    }
                }
            }
            st.report(&format!("  flash tf32x3 std={std} t={t}, to CPU"), kind);
        }
        stats.report(&format!("flash tf32x3 std={std}, to CPU"), kind);
        exact.report(&format!("flash tf32x3 std={std}, to float64"), kind);
        cpu_exact.report(&format!("CPU twin std={std}, to float64"), kind);
    }
}

/// The fp32 mode's kernel on the other head dims (the d <= 128 kernel, key
/// tiles of 32), the largest token counts and wide grids.
#[gpu_test]
fn gpu_flash_tf32x3_other_shapes() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xf1a9));
    let kind = Kind::Tf32x3;
    let mut stats = Stats::default();
    let mut exact = Stats::default();
    let mut cases = Vec::new();
    for d in [8, 16, 40, 72, 80, 96, 104, 128] {
        for t in [1, 31, 63, 300] {
            cases.push((2, t, d, 2, d % 16 == 0));
        }
    }
    cases.push((1, 4096, 64, 2, false));
    cases.push((1, 4095, 24, 1, true));
    cases.push((1, 4095, 128, 1, false));
    cases.push((64, 64, 32, 16, false));
    cases.push((5, 129, 48, 16, true));
    for (b, t, d, heads, legacy) in cases {
        for std in [1.0f32, 3.0] {
            let case = Case {
                kind,
                std,
                b,
                t,
                d,
                heads,
                legacy,
            };
            let (rel, qkv, got, cpu) = run_case_full(&gpu, &mut rng, &case);
            stats.add(rel, &case);
            // float64 on the host where it stays cheap.
            let f64_ref = b * t * t * d * heads <= 1 << 30;
            if let Some((r, _)) = tf32x3_extra_checks(&gpu, &case, &qkv, &got, &cpu, f64_ref) {
                exact.add(r, &case);
            }
        }
    }
    stats.report("flash tf32x3 other shapes, to CPU", kind);
    exact.report("flash tf32x3 other shapes, to float64", kind);
}

#[gpu_test]
fn gpu_flash_tf32x3_rejects_bad_sizes() {
    let gpu = gpu();
    let qkv = up(&gpu, &[0.0; 3 * 5 * 40]);
    let mut out = poisoned(&gpu, 5 * 40);
    let err = cuda::flash::attention_tf32x3(
        &gpu,
        &qkv,
        &mut out,
        AttnDims {
            b: 1,
            t: 5,
            c: 40,
            heads: 2,
            legacy: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("attention_tf32x3: head dim d = 20"), "{err}");
    let err = cuda::flash::attention_tf32x3(
        &gpu,
        &qkv,
        &mut out,
        AttnDims {
            b: 1,
            t: 5,
            c: 40,
            heads: 3,
            legacy: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 heads do not divide 40"), "{err}");
    let mut short = poisoned(&gpu, 5 * 40 - 1);
    let err = cuda::flash::attention_tf32x3(
        &gpu,
        &qkv,
        &mut short,
        AttnDims {
            b: 1,
            t: 5,
            c: 40,
            heads: 5,
            legacy: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("out has 199 elements, expected 200"), "{err}");
    let err = cuda::flash::attention_tf32x3(
        &gpu,
        &qkv,
        &mut out,
        AttnDims {
            b: 1,
            t: 6,
            c: 40,
            heads: 5,
            legacy: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("qkv has 600 elements, expected 720"), "{err}");
}

#[gpu_test]
fn gpu_flash_attention_rejects_bad_sizes() {
    let gpu = gpu();
    // c = 40 over 2 heads: d = 20, not a multiple of 8.
    let qkv = up(&gpu, &[0.0; 3 * 5 * 40]);
    let mut out = poisoned(&gpu, 5 * 40);
    let err = cuda::flash::attention_fast(
        &gpu,
        Half::Bf16,
        &qkv,
        &mut out,
        AttnDims {
            b: 1,
            t: 5,
            c: 40,
            heads: 2,
            legacy: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("head dim d = 20"), "{err}");
    let err = cuda::flash::attention_fast(
        &gpu,
        Half::Fp16,
        &qkv,
        &mut out,
        AttnDims {
            b: 1,
            t: 5,
            c: 40,
            heads: 3,
            legacy: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 heads do not divide 40"), "{err}");
    let mut short = poisoned(&gpu, 5 * 40 - 1);
    let err = cuda::flash::attention_fast(
        &gpu,
        Half::Fp16,
        &qkv,
        &mut short,
        AttnDims {
            b: 1,
            t: 5,
            c: 40,
            heads: 5,
            legacy: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("out has 199 elements, expected 200"), "{err}");
    let err = cuda::flash::attention_fast(
        &gpu,
        Half::Fp16,
        &qkv,
        &mut out,
        AttnDims {
            b: 1,
            t: 6,
            c: 40,
            heads: 5,
            legacy: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("qkv has 600 elements, expected 720"), "{err}");
}

/// Times the network's attention shapes (UNet: 8 heads, d = 24 at 32 x 32
/// and d = 48 at 16 x 16; classifier: d = 64): the SIMT float32 kernel, the
/// 3xTF32 one and the 16-bit ones.
/// Prints only; correctness is the other tests' business.
#[gpu_test]
fn gpu_flash_attention_timing() {
    let gpu = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(common::seed(0xf1a7));
    const REPS: u32 = 20;
    for (b, t, c, heads) in [(8, 1024, 192, 8), (8, 256, 384, 8), (8, 1024, 64, 1)] {
        let qkv = up(&gpu, &normals(&mut rng, b * t * 3 * c, 1.0));
        let mut out = poisoned(&gpu, b * t * c);
        let mut time = |f: &mut dyn FnMut(&mut CudaSlice<f32>)| {
            f(&mut out);
            gpu.synchronize().unwrap();
            let t0 = std::time::Instant::now();
            for _ in 0..REPS {
                f(&mut out);
            }
            gpu.synchronize().unwrap();
            t0.elapsed().as_secs_f64() * 1e3 / f64::from(REPS)
        };
        let fp32 = time(&mut |o| {
            fcd::lab::cuda_ref::attention::attention(
                &gpu,
                &qkv,
                o,
                AttnDims {
                    b,
                    t,
                    c,
                    heads,
                    legacy: false,
                },
            )
            .unwrap()
        });
        let bf16 = time(&mut |o| {
            cuda::flash::attention_fast(
                &gpu,
                Half::Bf16,
                &qkv,
                o,
                AttnDims {
                    b,
                    t,
                    c,
                    heads,
                    legacy: false,
                },
            )
            .unwrap()
        });
        let fp16 = time(&mut |o| {
            cuda::flash::attention_fast(
                &gpu,
                Half::Fp16,
                &qkv,
                o,
                AttnDims {
                    b,
                    t,
                    c,
                    heads,
                    legacy: false,
                },
            )
            .unwrap()
        });
        let tf32x3 = time(&mut |o| {
            cuda::flash::attention_tf32x3(
                &gpu,
                &qkv,
                o,
                AttnDims {
                    b,
                    t,
                    c,
                    heads,
                    legacy: false,
                },
            )
            .unwrap()
        });
        println!(
            "timing b={b} t={t} c={c} heads={heads} (d={}): fp32 SIMT {fp32:.3} ms, \
             fp32 tf32x3 {tf32x3:.3} ms, bf16 {bf16:.3} ms, fp16 {fp16:.3} ms",
            c / heads
        );
    }
}
