//! Detection metrics of SPEC section 8 on anomaly maps.
//!
//! Our definitions where SPEC and the paper are silent (documented as ours):
//! - Dice is computed on lesion slices only (mask with at least one pixel `> 0`);
//!   `P = A >= th` with `A` widened from float32 to float64, `M = mask > 0`,
//!   `2|P∩M| / (|P| + |M|)`; the reported value is the mean over lesion slices.
//! - The best threshold is searched over `k / 100`, `k = 0..=100`, maximising the mean
//!   lesion-slice Dice; ties go to the smallest threshold.
//! - Peaks are taken greedily: the arg-max of `A` (ties: first in row-major order), then every
//!   pixel within Euclidean distance `<= radius` of it is suppressed, until `k` peaks are taken
//!   or nothing is left.
//! - A lesion slice is recalled at `k` when one of its first `k` peaks lies within Euclidean
//!   distance `<= radius` of a lesion pixel; `R@k` = recalled lesion slices / lesion slices.

use serde::{Deserialize, Serialize};

/// Number of peaks kept per slice: enough for R@10.
pub const MAX_PEAKS: usize = 10;

/// `mask > 0` for a uint8 mask.
pub fn mask_from_u8(mask: &[u8]) -> Vec<bool> {
    mask.iter().map(|&m| m > 0).collect()
}

/// `mask > 0` for a float mask (NaN counts as background).
pub fn mask_from_f32(mask: &[f32]) -> Vec<bool> {
    mask.iter().map(|&m| m > 0.0).collect()
}

/// Dice of `A >= th` against `mask`. Two empty sets agree perfectly: 1.0.
pub fn dice(a: &[f32], mask: &[bool], th: f64) -> f64 {
    assert_eq!(
        a.len(),
        mask.len(),
        "dice of a map and a mask of different sizes"
    );
    let (pred, both) = counts(a, mask, th);
    dice_of_counts(both, pred, mask.iter().filter(|&&m| m).count())
}

/// `|A >= th|` and `|(A >= th) ∩ M|`, comparing in float64.
fn counts(a: &[f32], mask: &[bool], th: f64) -> (usize, usize) {
    let (mut pred, mut both) = (0, 0);
    for (&v, &m) in a.iter().zip(mask) {
        let p = f64::from(v) >= th;
        pred += usize::from(p);
        both += usize::from(p && m);
    }
    (pred, both)
}

/// `2|P∩M| / (|P| + |M|)`; two empty sets agree perfectly: 1.0.
fn dice_of_counts(both: usize, pred: usize, truth: usize) -> f64 {
    if pred + truth == 0 {
        return 1.0;
    }
    2.0 * both as f64 / (pred + truth) as f64
}

/// The first `k` greedy peaks of an `h x w` map, as (row, col).
pub fn peaks(a: &[f32], h: usize, w: usize, k: usize, radius: f64) -> Vec<(usize, usize)> {
    assert_eq!(
        a.len(),
        h * w,
        "peaks: map of {} values is not {h} x {w}",
        a.len()
    );
    let mut alive = vec![true; a.len()];
    let mut out = Vec::with_capacity(k);
    while out.len() < k {
        // Strict `>` keeps the first maximum in row-major order, like numpy's argmax.
        let mut best: Option<usize> = None;
        for (i, (&v, &ok)) in a.iter().zip(&alive).enumerate() {
            if ok && best.is_none_or(|b| v > a[b]) {
                best = Some(i);
            }
        }
        let Some(b) = best else { break };
        let (r, c) = (b / w, b % w);
        out.push((r, c));
        for (i, ok) in alive.iter_mut().enumerate() {
            if *ok && within(sq_distance((r, c), (i / w, i % w)), radius) {
                *ok = false;
            }
        }
    }
    out
}

/// Euclidean distance from `p` to the nearest pixel of `mask` (an `h x w` grid of width `w`),
/// or `None` when the mask is empty.
pub fn nearest_peak_distance(p: (usize, usize), mask: &[bool], w: usize) -> Option<f64> {
    nearest_sq_distance(p, mask, w).map(|d2| (d2 as f64).sqrt())
}

fn nearest_sq_distance(p: (usize, usize), mask: &[bool], w: usize) -> Option<usize> {
    mask.iter()
        .enumerate()
        .filter(|(_, &m)| m)
        .map(|(i, _)| sq_distance(p, (i / w, i % w)))
        .min()
}

fn sq_distance(p: (usize, usize), q: (usize, usize)) -> usize {
    let dr = p.0.abs_diff(q.0);
    let dc = p.1.abs_diff(q.1);
    dr * dr + dc * dc
}

/// `distance <= radius`, decided on squares so that integer distances and radii compare
/// exactly (the reference compares `dr^2 + dc^2 <= radius^2`).
fn within(sq_distance: usize, radius: f64) -> bool {
    sq_distance as f64 <= radius * radius
}

/// One slice's results, for the per-slice CSV. Healthy slices (empty mask) have no Dice and no
/// distances.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SliceRecord {
    /// Pixels with `mask > 0`.
    pub lesion_pixels: usize,
    /// Dice at the evaluation threshold (lesion slices only).
    pub dice: Option<f64>,
    /// The first [`MAX_PEAKS`] peaks, (row, col).
    pub peaks: Vec<(usize, usize)>,
    /// Smallest lesion distance among the first 1, 5 and 10 peaks.
    pub distance_at_1: Option<f64>,
    pub distance_at_5: Option<f64>,
    pub distance_at_10: Option<f64>,
    /// Recalled at 1, 5 and 10 (lesion slices only).
    pub recalled_at_1: Option<bool>,
    pub recalled_at_5: Option<bool>,
    pub recalled_at_10: Option<bool>,
}

/// Evaluates one `h x w` slice at `threshold`, with `radius` for peak suppression and recall.
pub fn slice_record(
    a: &[f32],
    mask: &[bool],
    h: usize,
    w: usize,
    threshold: f64,
    radius: f64,
) -> SliceRecord {
    assert_eq!(
        mask.len(),
        h * w,
        "mask of {} values is not {h} x {w}",
        mask.len()
    );
    let lesion_pixels = mask.iter().filter(|&&m| m).count();
    let peaks = peaks(a, h, w, MAX_PEAKS, radius);
    let lesion = lesion_pixels > 0;
    // Squared distance from each peak to the nearest lesion pixel (lesion slices only).
    let sq: Vec<usize> = peaks
        .iter()
        .filter_map(|&p| nearest_sq_distance(p, mask, w))
        .collect();
    let nearest = |k: usize| sq.iter().take(k).min().copied();
    let distance = |k: usize| nearest(k).map(|d2| (d2 as f64).sqrt());
    let recalled = |k: usize| lesion.then(|| nearest(k).is_some_and(|d2| within(d2, radius)));
    SliceRecord {
        lesion_pixels,
        dice: lesion.then(|| dice(a, mask, threshold)),
        peaks,
        distance_at_1: distance(1),
        distance_at_5: distance(5),
        distance_at_10: distance(10),
        recalled_at_1: recalled(1),
        recalled_at_5: recalled(5),
        recalled_at_10: recalled(10),
    }
}

/// The summary of an evaluated set. Rates and Dice are `None` when the set has no lesion slice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    pub n_slices: usize,
    pub n_lesion_slices: usize,
    pub threshold: f64,
    pub dice_at_threshold: Option<f64>,
    pub best_threshold: Option<f64>,
    pub dice_best: Option<f64>,
    pub radius: f64,
    pub r_at_1: Option<f64>,
    pub r_at_5: Option<f64>,
    pub r_at_10: Option<f64>,
}

/// Per-slice records and the summary of a set of `h x w` anomaly maps and masks.
pub fn evaluate(
    maps: &[&[f32]],
    masks: &[&[bool]],
    h: usize,
    w: usize,
    threshold: f64,
    radius: f64,
) -> (Evaluation, Vec<SliceRecord>) {
    assert_eq!(
        maps.len(),
        masks.len(),
        "evaluate: {} maps but {} masks",
        maps.len(),
        masks.len()
    );
    let records: Vec<SliceRecord> = maps
        .iter()
        .zip(masks)
        .map(|(a, m)| slice_record(a, m, h, w, threshold, radius))
        .collect();
    let counts: Vec<SliceCounts> = records
        .iter()
        .zip(maps.iter().zip(masks))
        .map(|(rec, (a, m))| SliceCounts::from_record(rec.clone(), a, m, threshold))
        .collect();
    let eval = summarize(counts.iter(), threshold, radius);
    (eval, records)
}

/// Thresholds of the best-threshold search: `k / 100` for `k` below this.
const THRESHOLD_STEPS: usize = 101;

/// One slice's results as integers and booleans, from which [`summarize`] computes a set's
/// metrics exactly: counts survive storage (an evaluation's records) where maps do not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SliceCounts {
    /// Mask pixels; 0 for a healthy slice.
    pub lesion_pixels: usize,
    /// `|A >= threshold|` and `|(A >= threshold) ∩ M|`.
    pub predicted: usize,
    pub overlap: usize,
    /// The greedy peaks, (row, col).
    pub peaks: Vec<(usize, usize)>,
    /// Squared distance from the nearest of the first 1, 5, 10 peaks to the lesion.
    pub nearest_sq: [Option<usize>; 3],
    /// Recalled at 1, 5, 10 (lesion slices only).
    pub recalled: [Option<bool>; 3],
    /// `|A >= k/100|` and `|(A >= k/100) ∩ M|` for `k = 0..=100` (lesion slices only:
    /// healthy slices take no part in Dice).
    pub predicted_at: Vec<usize>,
    pub overlap_at: Vec<usize>,
}

impl SliceCounts {
    /// Evaluates one `h x w` anomaly map against its mask.
    pub fn new(a: &[f32], mask: &[bool], h: usize, w: usize, threshold: f64, radius: f64) -> Self {
        Self::from_record(
            slice_record(a, mask, h, w, threshold, radius),
            a,
            mask,
            threshold,
        )
    }

    /// The counts of map `a` and its `mask`, whose record `rec` is at hand.
    fn from_record(rec: SliceRecord, a: &[f32], mask: &[bool], threshold: f64) -> Self {
        let lesion = rec.lesion_pixels > 0;
        let (predicted, overlap) = counts(a, mask, threshold);
        let (predicted_at, overlap_at) = if lesion {
            (0..THRESHOLD_STEPS)
                .map(|k| counts(a, mask, k as f64 / 100.0))
                .unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        // Distances are square roots of integers; squaring and rounding recovers them exactly.
        let sq = |d: Option<f64>| d.map(|d| (d * d).round() as usize);
        SliceCounts {
            lesion_pixels: rec.lesion_pixels,
            predicted,
            overlap,
            peaks: rec.peaks,
            nearest_sq: [
                sq(rec.distance_at_1),
                sq(rec.distance_at_5),
                sq(rec.distance_at_10),
            ],
            recalled: [rec.recalled_at_1, rec.recalled_at_5, rec.recalled_at_10],
            predicted_at,
            overlap_at,
        }
    }

    /// Dice at the threshold, `None` for a healthy slice.
    pub fn dice(&self) -> Option<f64> {
        (self.lesion_pixels > 0)
            .then(|| dice_of_counts(self.overlap, self.predicted, self.lesion_pixels))
    }

    /// Checks the lengths a stored record must have.
    pub fn check(&self) -> Result<(), String> {
        let n = if self.lesion_pixels > 0 {
            THRESHOLD_STEPS
        } else {
            0
        };
        if self.predicted_at.len() == n && self.overlap_at.len() == n {
            Ok(())
        } else {
            Err(format!(
                "{} and {} threshold counts, expected {n}",
                self.predicted_at.len(),
                self.overlap_at.len()
            ))
        }
    }
}

/// The metrics of a set of slices, in the given order (the order of the means' sums).
pub fn summarize<'a>(
    slices: impl Iterator<Item = &'a SliceCounts> + Clone,
    threshold: f64,
    radius: f64,
) -> Evaluation {
    let lesion = slices.clone().filter(|c| c.lesion_pixels > 0);
    let rate = |i: usize| mean(slices.clone().filter_map(|c| c.recalled[i]).map(f64::from));
    let mut best: Option<(f64, f64)> = None;
    for k in 0..THRESHOLD_STEPS {
        let th = k as f64 / 100.0;
        let d = mean(
            lesion
                .clone()
                .map(|c| dice_of_counts(c.overlap_at[k], c.predicted_at[k], c.lesion_pixels)),
        );
        if let Some(d) = d {
            // Strict `>` leaves ties with the smaller threshold found first.
            if best.is_none_or(|(_, bd)| d > bd) {
                best = Some((th, d));
            }
        }
    }
    Evaluation {
        n_slices: slices.clone().count(),
        n_lesion_slices: lesion.count(),
        threshold,
        dice_at_threshold: mean(slices.clone().filter_map(|c| c.dice())),
        best_threshold: best.map(|b| b.0),
        dice_best: best.map(|b| b.1),
        radius,
        r_at_1: rate(0),
        r_at_5: rate(1),
        r_at_10: rate(2),
    }
}

/// Mean in summation order (the reference sums the few per-slice values the same way), or
/// `None` for no values.
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Peak signal-to-noise ratio in dB of `test` against `reference`, the
/// peak being the reference's range (max - min), so that it reads the same
/// for maps in [0, 1] and in other units. Infinite when the two are equal;
/// None when the lengths differ, they are empty, or the reference is constant.
pub fn psnr(reference: &[f32], test: &[f32]) -> Option<f64> {
    if reference.len() != test.len() || reference.is_empty() {
        return None;
    }
    let (lo, hi) = reference
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v as f64), hi.max(v as f64))
        });
    let range = hi - lo;
    if range.is_nan() || range <= 0.0 {
        return None;
    }
    let mse = reference
        .iter()
        .zip(test)
        .map(|(&r, &t)| (r as f64 - t as f64).powi(2))
        .sum::<f64>()
        / reference.len() as f64;
    Some(10.0 * (range * range / mse).log10())
}

#[cfg(test)]
mod psnr_tests {
    use super::psnr;

    #[test]
    fn psnr_of_a_known_error() {
        // Range 1, every element off by 0.01: MSE 1e-4, PSNR 40 dB.
        let r: Vec<f32> = (0..101).map(|i| i as f32 / 100.0).collect();
        let t: Vec<f32> = r.iter().map(|v| v + 0.01).collect();
        let p = psnr(&r, &t).unwrap();
        assert!((p - 40.0).abs() < 1e-4, "{p}");
        assert_eq!(psnr(&r, &r), Some(f64::INFINITY));
        assert_eq!(psnr(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(psnr(&r, &t[1..]), None);
    }
}
