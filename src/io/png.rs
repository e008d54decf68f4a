//! Grey-level PNG slices (the published dataset layout stores each slice as a PNG).

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageReader};

/// Reads a PNG as one grey value per pixel: `(h, w, values)`, row-major.
///
/// 8- and 16-bit grey (with or without alpha) keep their stored values (0..=255 or 0..=65535,
/// no rescaling); RGB(A) becomes luma `0.299 R + 0.587 G + 0.114 B` on the same scale. Alpha is
/// ignored.
pub fn read_gray(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let img = ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a readable PNG image", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let luma = |p: &[f32]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    let values: Vec<f32> = match img {
        DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().map(f32::from).collect(),
        DynamicImage::ImageLuma16(b) => b.into_raw().into_iter().map(f32::from).collect(),
        DynamicImage::ImageLumaA8(b) => b.into_raw().chunks_exact(2).map(|p| p[0] as f32).collect(),
        DynamicImage::ImageLumaA16(b) => {
            b.into_raw().chunks_exact(2).map(|p| p[0] as f32).collect()
        }
        DynamicImage::ImageRgb8(b) => rgb_luma(&b.into_raw(), 3, luma),
        DynamicImage::ImageRgba8(b) => rgb_luma(&b.into_raw(), 4, luma),
        DynamicImage::ImageRgb16(b) => rgb_luma(&b.into_raw(), 3, luma),
        DynamicImage::ImageRgba16(b) => rgb_luma(&b.into_raw(), 4, luma),
        other => bail!(
            "{}: unsupported pixel format {:?}",
            path.display(),
            other.color()
        ),
    };
    Ok((h, w, values))
}

fn rgb_luma<T: Copy + Into<f32>>(
    raw: &[T],
    channels: usize,
    luma: impl Fn(&[f32]) -> f32,
) -> Vec<f32> {
    raw.chunks_exact(channels)
        .map(|p| luma(&[p[0].into(), p[1].into(), p[2].into()]))
        .collect()
}
