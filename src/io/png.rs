//! Grey-level PNG slices (the published dataset layout stores each slice as a PNG).

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use image::{DynamicImage, ImageReader, Limits};

/// The largest PNG side read, in pixels. Decoding is refused from the header alone beyond
/// it: a few hundred kilobytes of PNG can otherwise claim gigabytes of pixels.
pub const MAX_PNG_SIDE: u32 = 8192;

/// What the decoder may allocate: an 8192 x 8192 RGBA image of 16-bit channels, with room.
const MAX_PNG_ALLOC: u64 = 1 << 30;

/// Reads a PNG as one grey value per pixel: `(h, w, values)`, row-major.
///
/// 8- and 16-bit grey (with or without alpha) keep their stored values (0..=255 or 0..=65535,
/// no rescaling); RGB(A) becomes luma `0.299 R + 0.587 G + 0.114 B` on the same scale. Alpha is
/// ignored. Images wider or taller than [`MAX_PNG_SIDE`] are refused before decoding.
pub fn read_gray(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    // The image crate's errors repeat their cause in their source chain: print Display once.
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        anyhow!(
            "{}: {what}: {}",
            path.display(),
            plain_chunk_names(&e.to_string())
        )
    };
    let open = || -> Result<ImageReader<_>> {
        ImageReader::open(path)
            .map_err(|e| fail("cannot open", &e))?
            .with_guessed_format()
            .map_err(|e| fail("cannot read", &e))
    };
    // The header alone says the size: refuse a huge image before decoding anything.
    let (w, h) = open()?
        .into_dimensions()
        .map_err(|e| fail("not a readable PNG image", &e))?;
    ensure!(
        w <= MAX_PNG_SIDE && h <= MAX_PNG_SIDE,
        "{}: {w} x {h} pixels, more than the {MAX_PNG_SIDE} x {MAX_PNG_SIDE} read",
        path.display()
    );
    let mut reader = open()?;
    // A backstop for decoders whose header check misses some allocation.
    reader.limits(png_limits());
    let img = reader
        .decode()
        .map_err(|e| fail("not a readable PNG image", &e))?;
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

/// The png crate names a chunk by its Debug form (`ChunkType { type: IHDR, critical: true,
/// ... }`); a reader of the error wants only `IHDR`.
fn plain_chunk_names(text: &str) -> String {
    const DEBUG: &str = "ChunkType { type: ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(DEBUG) {
        out.push_str(&rest[..at]);
        let body = &rest[at + DEBUG.len()..];
        let Some(end) = body.find('}') else {
            rest = body;
            break;
        };
        out.push_str(body.split(',').next().unwrap_or("").trim());
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out
}

fn png_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_PNG_SIDE);
    limits.max_image_height = Some(MAX_PNG_SIDE);
    limits.max_alloc = Some(MAX_PNG_ALLOC);
    limits
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

#[cfg(test)]
mod tests {
    #[test]
    fn chunk_types_are_named_plainly() {
        let debug = "CRC error: expected 0x1 have 0x2 while decoding ChunkType { type: IHDR, \
                     critical: true, private: false, reserved: false, safecopy: false } chunk.";
        assert_eq!(
            super::plain_chunk_names(debug),
            "CRC error: expected 0x1 have 0x2 while decoding IHDR chunk."
        );
        assert_eq!(super::plain_chunk_names("no chunk"), "no chunk");
    }
}
