//! Grey-level PNG slices (the published dataset layout stores each slice as a PNG).

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use image::{ColorType, ImageDecoder, ImageReader, Limits};

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
    let mut decoder = ImageReader::open(path)
        .map_err(|e| fail("cannot open", &e))?
        .with_guessed_format()
        .map_err(|e| fail("cannot read", &e))?
        .into_decoder()
        .map_err(|e| fail("not a readable PNG image", &e))?;
    // The header alone says the size: refuse a huge image before decoding anything.
    let (w, h) = decoder.dimensions();
    ensure!(
        w <= MAX_PNG_SIDE && h <= MAX_PNG_SIDE,
        "{}: {w} x {h} pixels, more than the {MAX_PNG_SIDE} x {MAX_PNG_SIDE} read",
        path.display()
    );
    // A backstop for decoders whose header check misses some allocation.
    decoder
        .set_limits(png_limits())
        .map_err(|e| fail("not a readable PNG image", &e))?;
    let color = decoder.color_type();
    let Some(grey) = grey_of(color) else {
        bail!("{}: unsupported pixel format {color:?}", path.display());
    };
    let pixels = w as usize * h as usize;
    let stored = color.bytes_per_pixel() as usize;
    // The pixels are decoded into the tail of the buffer the grey values fill from its
    // head: pixel i's value never overwrites a byte of a pixel after it, and the decoded
    // image and a float32 copy of it are not held side by side.
    let mut values = vec![0f32; pixels.max((pixels * stored).div_ceil(4))];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
    let from = bytes.len() - pixels * stored;
    decoder
        .read_image(&mut bytes[from..])
        .map_err(|e| fail("not a readable PNG image", &e))?;
    for i in 0..pixels {
        let at = from + i * stored;
        let v = grey(&bytes[at..at + stored]);
        bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    values.truncate(pixels);
    values.shrink_to_fit();
    Ok((h as usize, w as usize, values))
}

/// The grey value, as [`read_gray`] defines it, of one decoded pixel of `color` (channels
/// in native byte order); None for a colour type it does not read.
fn grey_of(color: ColorType) -> Option<fn(&[u8]) -> f32> {
    fn c16(p: &[u8], k: usize) -> f32 {
        f32::from(u16::from_ne_bytes([p[2 * k], p[2 * k + 1]]))
    }
    fn luma(r: f32, g: f32, b: f32) -> f32 {
        0.299 * r + 0.587 * g + 0.114 * b
    }
    Some(match color {
        ColorType::L8 | ColorType::La8 => |p| f32::from(p[0]),
        ColorType::L16 | ColorType::La16 => |p| c16(p, 0),
        ColorType::Rgb8 | ColorType::Rgba8 => {
            |p| luma(f32::from(p[0]), f32::from(p[1]), f32::from(p[2]))
        }
        ColorType::Rgb16 | ColorType::Rgba16 => |p| luma(c16(p, 0), c16(p, 1), c16(p, 2)),
        _ => return None,
    })
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
