//! Post-processing of SPEC sections 2 and 7: per-slice normalisation, histogram matching and
//! anomaly maps.
//!
//! Every function works on one slice (a flat `H*W` buffer); the `*_batch` helpers loop over a
//! stack of slices. Arithmetic follows the numpy float32 expressions of the published code
//! operation by operation, because the histogram matching truncates to integers and a single
//! rounding difference there moves a pixel by a whole grey level.

use anyhow::{bail, Result};

/// Min-max normalisation of one slice to [-1, 1]: `((v - min) / (max - min) - 0.5) * 2`,
/// evaluated in float32 in that order (as numpy does on a float32 array).
///
/// A constant slice has no defined normalisation and any NaN or infinity would poison the
/// min and max, so both are errors rather than silent garbage.
pub fn normalize_slice(v: &[f32]) -> Result<Vec<f32>> {
    if v.is_empty() {
        bail!("empty slice: cannot normalise");
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("non-finite value at index {i} ({}): cannot normalise", v[i]);
    }
    let (min, max) = min_max(v);
    if min == max {
        bail!("constant slice (min = max = {min}): cannot normalise");
    }
    let range = max - min;
    Ok(v.iter().map(|&x| ((x - min) / range - 0.5) * 2.0).collect())
}

/// [`normalize_slice`] over a stack of slices of `hw` pixels each; errors name the slice.
pub fn normalize_batch(v: &[f32], hw: usize) -> Result<Vec<f32>> {
    check_stack(v.len(), hw)?;
    let mut out = Vec::with_capacity(v.len());
    for (i, slice) in v.chunks_exact(hw).enumerate() {
        let n = normalize_slice(slice).map_err(|e| e.context(format!("slice {i}")))?;
        out.extend_from_slice(&n);
    }
    Ok(out)
}

/// Min-max normalisation to [0, 1]: `(v - min) / (max - min)` in float32, as numpy computes it.
///
/// A constant input maps to all zeros (numpy would produce NaN from 0/0; zeros keep a flat
/// anomaly map meaning "no anomaly"). Inputs are expected to be finite: NaN is ignored when
/// taking the min and max and propagates to its own pixel only.
pub fn norm01(v: &[f32]) -> Vec<f32> {
    if v.is_empty() {
        return Vec::new();
    }
    let (min, max) = min_max(v);
    if min == max {
        return vec![0.0; v.len()];
    }
    let range = max - min;
    v.iter().map(|&x| (x - min) / range).collect()
}

/// Grey levels 0..=255 of a slice: `trunc(norm01(v) * 255)`, the float32 product truncated
/// like numpy's `astype(int)`.
fn grey_levels(v: &[f32]) -> Vec<u8> {
    // norm01 lies in [0, 1] (x - min <= max - min survives rounding), so the product is in
    // [0, 255] and the saturating cast only ever truncates.
    norm01(v).iter().map(|&x| (x * 255.0) as u8).collect()
}

/// Cumulative histogram of grey levels divided by its last value, as float32 (the published
/// code's `(cumsum / cumsum[-1]).astype(float32)`), widened back to float64 as `numpy.interp`
/// does with its inputs. Dividing in float64 and rounding once to float32 gives the same value
/// as dividing the float32 counts (the fixtures' form): counts below 2^24 are exact, and double
/// rounding of a quotient from 53 to 24 bits is innocuous.
fn cdf(levels: &[u8]) -> [f64; 256] {
    let mut hist = [0u64; 256];
    for &k in levels {
        hist[k as usize] += 1;
    }
    let total = levels.len() as f64;
    let mut out = [0f64; 256];
    let mut acc = 0u64;
    for (o, &h) in out.iter_mut().zip(&hist) {
        acc += h;
        *o = ((acc as f64 / total) as f32) as f64;
    }
    out
}

/// `numpy.interp(x, xp, fp)` for one point, with numpy's default `left = fp[0]` and
/// `right = fp[-1]`, for a non-decreasing `xp` of at least two points.
///
/// numpy's binary search returns the index `j` with `xp[j] <= x < xp[j + 1]`; for a
/// non-decreasing `xp` (flat runs included) that is the last index whose value is `<= x`,
/// whatever guess the search starts from. So on a flat run numpy interpolates from the right
/// end of the run, and `x` equal to the final value returns `fp[-1]`.
fn interp(x: f64, xp: &[f64], fp: &[f64]) -> f64 {
    let n = xp.len();
    if x.is_nan() {
        return x;
    }
    if x > xp[n - 1] {
        return fp[n - 1];
    }
    if x < xp[0] {
        return fp[0];
    }
    let j = xp.partition_point(|&v| v <= x) - 1;
    if j == n - 1 || xp[j] == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
    slope * (x - xp[j]) + fp[j]
}

/// Histogram matching of SPEC 7: maps the grey levels of `src_img` so that their histogram
/// follows that of `ref_img`, and returns the matched image normalised to [0, 1].
///
/// `src = trunc(norm01(src_img) * 255)`, likewise `ref`; 256-bin CDFs in float32;
/// `lut[k] = trunc(interp(cdf_src[k], cdf_ref, 0..=255))`; result `norm01(lut[src])`.
/// The two slices may differ in size. An empty reference has no CDF: the result is all zeros.
pub fn histogram_match(src_img: &[f32], ref_img: &[f32]) -> Vec<f32> {
    if ref_img.is_empty() {
        return vec![0.0; src_img.len()];
    }
    let src = grey_levels(src_img);
    let cdf_src = cdf(&src);
    let cdf_ref = cdf(&grey_levels(ref_img));
    let levels: Vec<f64> = (0..256).map(f64::from).collect();
    let mut lut = [0u8; 256];
    for (l, &c) in lut.iter_mut().zip(&cdf_src) {
        // numpy's astype(uint8) truncates; the value is within [0, 255].
        *l = interp(c, &cdf_ref, &levels) as u8;
    }
    let matched: Vec<f32> = src.iter().map(|&k| f32::from(lut[k as usize])).collect();
    norm01(&matched)
}

/// Anomaly map of SPEC 7: `A = norm01(|norm01(x0) - norm01(x_hat)|)`, where `x_hat` is the
/// pseudo-healthy `xhat`, histogram-matched to `x0` first when `hist_match` is set.
///
/// Panics if the two slices differ in length: callers pair slices of one stack.
pub fn anomaly_map(x0: &[f32], xhat: &[f32], hist_match: bool) -> Vec<f32> {
    norm01(&difference(x0, xhat, hist_match))
}

/// The anomaly map before its last normalisation: `|norm01(x0) - norm01(x_hat)|`, how far
/// the pseudo-healthy slice moved each pixel, as a fraction of the slice's intensity range.
/// Unlike the map, it compares across slices.
///
/// Panics if the two slices differ in length: callers pair slices of one stack.
pub fn difference(x0: &[f32], xhat: &[f32], hist_match: bool) -> Vec<f32> {
    assert_eq!(
        x0.len(),
        xhat.len(),
        "anomaly_map of slices of different sizes"
    );
    let healed = if hist_match {
        norm01(&histogram_match(xhat, x0))
    } else {
        norm01(xhat)
    };
    norm01(x0)
        .iter()
        .zip(&healed)
        .map(|(a, b)| (a - b).abs())
        .collect()
}

/// [`anomaly_map`] over stacks of slices of `hw` pixels each, and the [`difference`]s the
/// maps normalise: `(maps, differences)`.
pub fn anomaly_map_batch(
    x0: &[f32],
    xhat: &[f32],
    hw: usize,
    hist_match: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_stack(x0.len(), hw)?;
    if x0.len() != xhat.len() {
        bail!(
            "anomaly maps: original has {} values, pseudo-healthy image {}",
            x0.len(),
            xhat.len()
        );
    }
    let (mut maps, mut differences) = (Vec::with_capacity(x0.len()), Vec::with_capacity(x0.len()));
    for (a, b) in x0.chunks_exact(hw).zip(xhat.chunks_exact(hw)) {
        let d = difference(a, b, hist_match);
        maps.extend(norm01(&d));
        differences.extend(d);
    }
    Ok((maps, differences))
}

fn check_stack(len: usize, hw: usize) -> Result<()> {
    if hw == 0 || !len.is_multiple_of(hw) {
        bail!("{len} values do not form slices of {hw} pixels");
    }
    Ok(())
}

fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}
