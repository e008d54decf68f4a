//! A subject at a glance: the overlays of a few slices side by side, at the input's
//! resolution, with the strongest peaks ringed and numbered by rank and each tile's slice
//! index in its corner.

use super::digits;
use anyhow::{bail, ensure, Result};
use image::{GenericImage, RgbImage};

/// The most tiles of a montage.
pub const MAX_TILES: usize = 12;

/// Tiles kept for the slices with the largest lesions, whatever the peaks.
const LESION_TILES: usize = 4;

/// Black margin around and between tiles, in pixels.
pub const GAP: u32 = 4;

/// Marker colours by rank (1 = strongest); ranks past the list take its last colour.
/// None of them is the mask outline's green or jet's hot end.
const RANK_COLOURS: [[u8; 3]; 4] = [
    [255, 255, 255],
    [255, 0, 255],
    [0, 255, 255],
    [255, 160, 220],
];

/// One slice that may be shown.
pub struct Slice {
    /// The overlay at the input's resolution (all slices of a montage are one size).
    pub overlay: RgbImage,
    /// The slice index written on the tile (none for a lone PNG slice).
    pub label: Option<usize>,
    /// Lesion pixels on the input's grid.
    pub lesion_pixels: usize,
}

/// A peak on the input's grid: its slice (an index into the montage's slices) and pixel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    pub slice: usize,
    pub x: u32,
    pub y: u32,
}

/// The colour of the marker of the peak of `rank` (1 = strongest).
pub fn rank_colour(rank: usize) -> [u8; 3] {
    RANK_COLOURS[rank.clamp(1, RANK_COLOURS.len()) - 1]
}

/// The slices a montage shows, in slice order: the `LESION_TILES` with the most lesion
/// pixels, then those of the peaks by rank, then the rest of the lesion slices by size,
/// [`MAX_TILES`] at most. `peaks` are slice indices in rank order.
pub fn pick(peaks: &[usize], lesion_pixels: &[usize]) -> Vec<usize> {
    let mut lesion: Vec<usize> = (0..lesion_pixels.len())
        .filter(|&i| lesion_pixels[i] > 0)
        .collect();
    // Stable: equal lesions keep slice order.
    lesion.sort_by_key(|&i| std::cmp::Reverse(lesion_pixels[i]));
    let first = LESION_TILES.min(lesion.len());
    let mut chosen: Vec<usize> = Vec::with_capacity(MAX_TILES);
    for i in lesion[..first].iter().chain(peaks).chain(&lesion[first..]) {
        if chosen.len() == MAX_TILES {
            break;
        }
        if !chosen.contains(i) {
            chosen.push(*i);
        }
    }
    chosen.sort_unstable();
    chosen
}

/// Columns and rows of the grid of `n >= 1` tiles: as square as it gets, wider than tall.
pub fn grid(n: usize) -> (usize, usize) {
    let mut cols = 1;
    while cols * cols < n {
        cols += 1;
    }
    (cols, n.div_ceil(cols))
}

/// The montage of the slices [`pick`] chooses, each peak marked on its tile with its rank
/// (its place in `peaks` plus one). Tiles run left to right, then down, [`GAP`] apart.
pub fn montage(slices: &[Slice], peaks: &[Peak]) -> Result<RgbImage> {
    let Some(first) = slices.first() else {
        bail!("a montage of no slices");
    };
    let (w, h) = first.overlay.dimensions();
    ensure!(
        slices.iter().all(|s| s.overlay.dimensions() == (w, h)),
        "a montage of slices of different sizes"
    );
    if let Some(p) = peaks
        .iter()
        .find(|p| p.slice >= slices.len() || p.x >= w || p.y >= h)
    {
        bail!(
            "a peak at ({}, {}) of slice {} is outside the {} slices of {w} x {h}",
            p.x,
            p.y,
            p.slice,
            slices.len()
        );
    }
    let lesions: Vec<usize> = slices.iter().map(|s| s.lesion_pixels).collect();
    let ranked: Vec<usize> = peaks.iter().map(|p| p.slice).collect();
    let mut shown = pick(&ranked, &lesions);
    if shown.is_empty() {
        // No peak and no lesion: the first slice still shows what was looked at.
        shown.push(0);
    }
    let (cols, rows) = grid(shown.len());
    let mut out = RgbImage::new(cols as u32 * (w + GAP) + GAP, rows as u32 * (h + GAP) + GAP);
    let style = Style::for_tile(w, h);
    for (k, &i) in shown.iter().enumerate() {
        let mut tile = slices[i].overlay.clone();
        // Weakest first, so that a stronger peak's marker lies on top.
        for (rank, p) in peaks.iter().enumerate().rev() {
            if p.slice == i {
                style.mark(&mut tile, p.x, p.y, rank + 1);
            }
        }
        if let Some(label) = slices[i].label {
            style.label(&mut tile, label);
        }
        let (c, r) = ((k % cols) as u32, (k / cols) as u32);
        out.copy_from(&tile, GAP + c * (w + GAP), GAP + r * (h + GAP))?;
    }
    Ok(out)
}

/// Marker and text sizes, grown with the tile so that they read the same at any resolution.
struct Style {
    /// Ring radius in pixels.
    radius: i64,
    /// Font pixel size.
    scale: u32,
}

impl Style {
    fn for_tile(w: u32, h: u32) -> Style {
        let side = w.min(h);
        Style {
            radius: i64::from((side / 30).max(3)),
            scale: (side / 80).max(1),
        }
    }

    /// A ring around (`x`, `y`), a dot on it, and `rank` beside it, in the rank's colour;
    /// the number in a black halo, to the upper right unless that leaves the tile.
    fn mark(&self, tile: &mut RgbImage, x: u32, y: u32, rank: usize) {
        let colour = rank_colour(rank);
        let (x, y, r) = (i64::from(x), i64::from(y), self.radius);
        for dy in -r..=r {
            for dx in -r..=r {
                let d = ((dx * dx + dy * dy) as f64).sqrt();
                if (d - r as f64).abs() < 0.5 || (dx, dy) == (0, 0) {
                    digits::fill(tile, x + dx, y + dy, 1, 1, colour);
                }
            }
        }
        let (tw, th) = digits::size(rank, self.scale);
        let (tw, th) = (i64::from(tw), i64::from(th));
        let tx = if x + r + 1 + tw <= i64::from(tile.width()) {
            x + r + 1
        } else {
            x - r - 1 - tw
        };
        let ty = if y - r - th >= 0 {
            y - r - th
        } else {
            y + r + 1
        };
        let s = i64::from(self.scale);
        for (dx, dy) in [
            (-s, 0),
            (s, 0),
            (0, -s),
            (0, s),
            (s, s),
            (-s, -s),
            (s, -s),
            (-s, s),
        ] {
            digits::draw(tile, rank, tx + dx, ty + dy, self.scale, [0; 3]);
        }
        digits::draw(tile, rank, tx, ty, self.scale, colour);
    }

    /// The slice index in white on a black box in the top-left corner: unlike a rank, it
    /// sits on a box.
    fn label(&self, tile: &mut RgbImage, slice: usize) {
        let (tw, th) = digits::size(slice, self.scale);
        let s = i64::from(self.scale);
        digits::fill(
            tile,
            0,
            0,
            i64::from(tw) + 2 * s,
            i64::from(th) + 2 * s,
            [0; 3],
        );
        digits::draw(tile, slice, s, s, self.scale, [255; 3]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::overlay::{self, OUTLINE};

    /// A grey overlay of `w` x `h`.
    fn grey(w: u32, h: u32) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([100; 3]))
    }

    fn slices(n: usize, w: u32, h: u32) -> Vec<Slice> {
        (0..n)
            .map(|i| Slice {
                overlay: grey(w, h),
                label: Some(70 + i),
                lesion_pixels: 0,
            })
            .collect()
    }

    /// One peak on each of the first `n` slices.
    fn one_peak_each(n: usize) -> Vec<Peak> {
        (0..n)
            .map(|slice| Peak {
                slice,
                x: 20,
                y: 20,
            })
            .collect()
    }

    #[test]
    fn the_grid_is_about_square() {
        assert_eq!(grid(1), (1, 1));
        assert_eq!(grid(2), (2, 1));
        assert_eq!(grid(4), (2, 2));
        assert_eq!(grid(5), (3, 2));
        assert_eq!(grid(10), (4, 3));
        assert_eq!(grid(12), (4, 3));
    }

    #[test]
    fn a_montage_holds_one_tile_per_chosen_slice_up_to_twelve() {
        let (w, h) = (50, 60);
        for (n, cols, rows) in [(1, 1, 1), (3, 2, 2), (12, 4, 3), (20, 4, 3)] {
            let m = montage(&slices(n, w, h), &one_peak_each(n)).unwrap();
            assert_eq!(
                m.dimensions(),
                (cols * (w + GAP) + GAP, rows * (h + GAP) + GAP),
                "{n} slices"
            );
        }
    }

    #[test]
    fn slices_come_from_the_largest_lesions_then_the_peaks_in_slice_order() {
        // Peaks by rank on slices 9, 2, 9, 5; lesions largest on 6, then 1.
        let mut lesion = vec![0; 20];
        lesion[6] = 40;
        lesion[1] = 30;
        assert_eq!(pick(&[9, 2, 9, 5], &lesion), [1, 2, 5, 6, 9]);
        // Six lesion slices: four come first, the peaks fill the tiles up to twelve, and
        // the two smallest lesions are left out.
        let lesion: Vec<usize> = (0..20).map(|i| if i < 6 { 10 + i } else { 0 }).collect();
        let peaks: Vec<usize> = (8..20).collect();
        assert_eq!(
            pick(&peaks, &lesion),
            [2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15]
        );
    }

    #[test]
    fn peaks_are_marked_at_their_pixel_in_their_rank_colour() {
        let (w, h) = (60, 50);
        let s = slices(3, w, h);
        // Rank 1 on slice 2, rank 2 on slice 0; slice 1 has no peak and is not shown.
        let peaks = [
            Peak {
                slice: 2,
                x: 30,
                y: 25,
            },
            Peak {
                slice: 0,
                x: 10,
                y: 40,
            },
        ];
        let m = montage(&s, &peaks).unwrap();
        assert_eq!(m.dimensions(), (2 * (w + GAP) + GAP, h + 2 * GAP));
        // Slice 0 is the first tile, slice 2 the second.
        let at = |tile: u32, x: u32, y: u32| m.get_pixel(GAP + tile * (w + GAP) + x, GAP + y).0;
        assert_eq!(at(0, 10, 40), rank_colour(2));
        assert_eq!(at(1, 30, 25), rank_colour(1));
        assert_ne!(rank_colour(1), rank_colour(2));
        // The ring passes through the pixels at its radius and leaves the rest grey.
        let r = Style::for_tile(w, h).radius as u32;
        assert_eq!(at(1, 30 + r, 25), rank_colour(1));
        assert_eq!(at(1, 30, 25 - r), rank_colour(1));
        assert_eq!(at(1, 31, 25), [100; 3]);
        // The slice index in the top-left corner: white font pixels on a black box.
        assert_eq!(at(0, 0, 0), [0; 3]);
        let tile0: Vec<[u8; 3]> = (0..12)
            .flat_map(|y| (0..16).map(move |x| (x, y)))
            .map(|(x, y)| at(0, x, y))
            .collect();
        assert!(tile0.contains(&[255; 3]), "no label on the first tile");
    }

    #[test]
    fn the_lesion_outline_stays_on_its_tile() {
        let (w, h) = (40usize, 30usize);
        let flair: Vec<f32> = (0..w * h).map(|i| (i % w) as f32).collect();
        let mut mask = vec![false; w * h];
        for y in 10..20 {
            for x in 5..15 {
                mask[y * w + x] = true;
            }
        }
        let o = overlay::overlay(&flair, &vec![0.0; w * h], Some(&mask), h, w).unwrap();
        let s = [Slice {
            overlay: o,
            label: None,
            lesion_pixels: 100,
        }];
        let m = montage(&s, &[]).unwrap();
        let at = |x: u32, y: u32| m.get_pixel(GAP + x, GAP + y).0;
        assert_eq!(at(5, 10), OUTLINE);
        assert_eq!(at(14, 19), OUTLINE);
        assert_eq!(at(10, 10), OUTLINE);
        assert_ne!(at(10, 15), OUTLINE, "inside the lesion");
        assert_ne!(at(4, 15), OUTLINE, "outside the lesion");
        // No label, so no black box in the corner: the FLAIR's grey of column 3.
        assert_eq!(at(3, 3), [20; 3]);
    }

    #[test]
    fn with_no_peak_and_no_lesion_the_first_slice_is_shown() {
        let m = montage(&slices(3, 20, 10), &[]).unwrap();
        assert_eq!(m.dimensions(), (20 + 2 * GAP, 10 + 2 * GAP));
        assert_eq!(m.get_pixel(GAP + 19, GAP + 9).0, [100; 3]);
    }

    #[test]
    fn peaks_outside_the_slices_are_refused() {
        let s = slices(2, 20, 20);
        let bad = [Peak {
            slice: 0,
            x: 20,
            y: 3,
        }];
        assert!(montage(&s, &bad).is_err());
        let bad = [Peak {
            slice: 2,
            x: 1,
            y: 1,
        }];
        assert!(montage(&s, &bad).is_err());
        assert!(montage(&[], &[]).is_err());
    }
}
