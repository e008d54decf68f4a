//! Decimal numbers drawn in a 5 x 7 bitmap font, for the slice indices and peak ranks of
//! the montage. Digits are all it writes: a text-rendering crate would need a font file to
//! ship with the engine.

use image::RgbImage;

/// Glyph size in font pixels; digits are one font pixel apart.
const WIDTH: u32 = 5;
const HEIGHT: u32 = 7;

/// Rows of the glyphs 0-9, top first, the leftmost pixel in bit 4.
const GLYPHS: [[u8; HEIGHT as usize]; 10] = [
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
];

/// Width and height in image pixels of `n` written with font pixels of `scale` x `scale`.
pub fn size(n: usize, scale: u32) -> (u32, u32) {
    let digits = n.to_string().len() as u32;
    ((digits * (WIDTH + 1) - 1) * scale, HEIGHT * scale)
}

/// Writes `n` in `colour` with its top-left corner at (`x`, `y`), which may lie outside
/// the image: what falls outside is left out.
pub fn draw(img: &mut RgbImage, n: usize, x: i64, y: i64, scale: u32, colour: [u8; 3]) {
    let s = i64::from(scale);
    for (i, d) in n.to_string().bytes().enumerate() {
        let glyph = &GLYPHS[usize::from(d - b'0')];
        let left = x + i as i64 * i64::from(WIDTH + 1) * s;
        for (row, bits) in (0i64..).zip(glyph) {
            for col in 0..i64::from(WIDTH) {
                if bits >> (i64::from(WIDTH) - 1 - col) & 1 == 1 {
                    fill(img, left + col * s, y + row * s, s, s, colour);
                }
            }
        }
    }
}

/// Fills the `w` x `h` rectangle at (`x`, `y`), clipped to the image.
pub fn fill(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, colour: [u8; 3]) {
    let (iw, ih) = (i64::from(img.width()), i64::from(img.height()));
    for py in y.max(0)..(y + h).min(ih) {
        for px in x.max(0)..(x + w).min(iw) {
            img.put_pixel(px as u32, py as u32, image::Rgb(colour));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHITE: [u8; 3] = [255; 3];

    /// The image as text, `#` for white pixels, one line per row.
    fn picture(img: &RgbImage) -> Vec<String> {
        (0..img.height())
            .map(|y| {
                (0..img.width())
                    .map(|x| {
                        if img.get_pixel(x, y).0 == WHITE {
                            '#'
                        } else {
                            '.'
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn numbers_are_drawn_digit_by_digit_at_their_size() {
        assert_eq!(size(7, 1), (5, 7));
        assert_eq!(size(12, 1), (11, 7));
        assert_eq!(size(105, 2), (34, 14));
        let mut img = RgbImage::new(11, 7);
        draw(&mut img, 17, 0, 0, 1, WHITE);
        assert_eq!(
            picture(&img),
            [
                "..#...#####",
                ".##.......#",
                "..#......#.",
                "..#.....#..",
                "..#....#...",
                "..#....#...",
                ".###...#...",
            ]
        );
    }

    #[test]
    fn scaled_digits_fill_blocks_and_clip_at_the_edges() {
        let mut img = RgbImage::new(4, 4);
        // "1" at scale 2 with its corner off the image: font row 0 falls above it, font
        // columns 1 and 2 (of row 1, the flag) cover image columns 0..=2, the stem 1..=2.
        draw(&mut img, 1, -3, -2, 2, WHITE);
        assert_eq!(picture(&img), ["###.", "###.", ".##.", ".##."]);
    }
}
