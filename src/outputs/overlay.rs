//! Overlays: the anomaly map in a jet colour map over the FLAIR slice.

use anyhow::{bail, Context, Result};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

/// Colour of the lesion mask's outline: pure green.
pub const OUTLINE: [u8; 3] = [0, 255, 0];

/// Maximum opacity of the colour map, reached at anomaly 1; the FLAIR stays visible under it.
const MAX_ALPHA: f32 = 0.6;

/// The common piecewise-linear jet colour map of `v` clamped to [0, 1] (NaN counts as 0):
/// 0 is dark blue, 0.25 blue-cyan, 0.5 green-yellow-ish (0.5, 1, 0.5), 0.75 yellow-orange,
/// 1 dark red. Channel c rises and falls as `clamp(1.5 - |4v - k|, 0, 1)` with k = 3, 2, 1
/// for red, green, blue.
pub fn jet(v: f32) -> [u8; 3] {
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    let channel = |k: f32| ((1.5 - (4.0 * v - k).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// The `h` x `w` overlay of row-major inputs.
///
/// Grey level = min-max normalised FLAIR * 255 (a constant or non-finite slice is black).
/// Each pixel blends grey and `jet(anomaly)` with colour weight `clamp(anomaly, 0, 1) * 0.6`,
/// so a zero anomaly leaves the FLAIR untouched. With a mask, its outline (mask pixels with a
/// 4-neighbour outside the mask or outside the image) is drawn in [`OUTLINE`].
pub fn overlay(
    flair: &[f32],
    anomaly: &[f32],
    mask: Option<&[bool]>,
    h: usize,
    w: usize,
) -> Result<RgbImage> {
    let n = h * w;
    if h == 0 || w == 0 {
        bail!("overlay of an empty {h} x {w} image");
    }
    if flair.len() != n || anomaly.len() != n || mask.is_some_and(|m| m.len() != n) {
        bail!(
            "overlay of {h} x {w}: FLAIR has {} values, anomaly {}, mask {}",
            flair.len(),
            anomaly.len(),
            mask.map_or("none".to_string(), |m| m.len().to_string())
        );
    }
    let finite = flair.iter().copied().filter(|v| v.is_finite());
    let lo = finite.clone().fold(f32::INFINITY, f32::min);
    let hi = finite.fold(f32::NEG_INFINITY, f32::max);
    let range = hi - lo;
    let grey = |v: f32| {
        if range > 0.0 && v.is_finite() {
            (v - lo) / range * 255.0
        } else {
            0.0
        }
    };
    let inside = |r: isize, c: isize| {
        r >= 0
            && c >= 0
            && (r as usize) < h
            && (c as usize) < w
            && mask.is_some_and(|m| m[r as usize * w + c as usize])
    };
    let mut rgb = Vec::with_capacity(3 * n);
    for i in 0..n {
        let (r, c) = ((i / w) as isize, (i % w) as isize);
        let outline = inside(r, c)
            && !(inside(r - 1, c) && inside(r + 1, c) && inside(r, c - 1) && inside(r, c + 1));
        if outline {
            rgb.extend_from_slice(&OUTLINE);
            continue;
        }
        let g = grey(flair[i]);
        let a = if anomaly[i].is_nan() {
            0.0
        } else {
            anomaly[i].clamp(0.0, 1.0) * MAX_ALPHA
        };
        let colour = jet(anomaly[i]);
        for k in colour {
            rgb.push(((1.0 - a) * g + a * k as f32).round().clamp(0.0, 255.0) as u8);
        }
    }
    RgbImage::from_raw(w as u32, h as u32, rgb)
        .with_context(|| format!("an overlay of {h} x {w} pixels is too large"))
}

/// PNG bytes of an RGB image.
pub fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("encoding a {} x {} PNG", img.height(), img.width()))?;
    Ok(png)
}
