//! Axial slices of a volume to and from the network's square image grid.
//!
//! A slice is an image of `ny` rows by `nx` columns (row = voxel y, column = voxel x).
//! Resizing is bilinear with half-pixel centres and edge clamping, the rule of PyTorch's
//! `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::io::volume::Volume;

/// An inclusive range of axial slice indices `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceRange {
    pub first: usize,
    pub last: usize,
}

impl SliceRange {
    /// Number of slices in the range (at least 1).
    pub fn count(&self) -> usize {
        self.last - self.first + 1
    }
}

impl Default for SliceRange {
    /// The paper's slices 75..=125 of SRI24-registered volumes.
    fn default() -> Self {
        SliceRange {
            first: 75,
            last: 125,
        }
    }
}

impl FromStr for SliceRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let expected = || {
            anyhow::anyhow!(
                "slice range {s:?}: expected FIRST:LAST, two slice indices with FIRST <= LAST (e.g. 75:125)"
            )
        };
        let (a, b) = s.trim().split_once(':').ok_or_else(expected)?;
        let first: usize = a.trim().parse().map_err(|_| expected())?;
        let last: usize = b.trim().parse().map_err(|_| expected())?;
        if first > last {
            return Err(expected());
        }
        Ok(SliceRange { first, last })
    }
}

impl fmt::Display for SliceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.first, self.last)
    }
}

/// The axial slice `z` as `ny` rows by `nx` columns: `out[r * nx + c] = vol(x = c, y = r, z)`.
///
/// # Panics
/// If `z >= nz` or the data does not match the dims (callers check the range first).
pub fn axial(vol: &Volume, z: usize) -> Vec<f32> {
    let plane = vol.dims[0] * vol.dims[1];
    assert!(z < vol.dims[2], "axial slice {z} of {} slices", vol.dims[2]);
    vol.data[plane * z..plane * (z + 1)].to_vec()
}

/// Source coordinate of destination index `dst` and its two neighbours with weights,
/// PyTorch's `area_pixel_compute_source_index` for align_corners = False, computed in f32
/// as PyTorch does on the CPU for float tensors.
fn source_taps(dst: usize, n_in: usize, n_out: usize) -> (usize, usize, f32, f32) {
    let scale = n_in as f32 / n_out as f32;
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src as usize).min(n_in - 1);
    let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
    let l1 = src - i0 as f32;
    (i0, i1, 1.0 - l1, l1)
}

/// Bilinear resize of an `h` x `w` image (row-major) to `oh` x `ow`.
///
/// Half-pixel centres (`src = (dst + 0.5) * in / out - 0.5`), negative source positions clamped
/// to 0 and the upper neighbour clamped to the last row / column, no antialiasing:
/// PyTorch `F.interpolate(mode="bilinear", align_corners=False)`.
///
/// # Panics
/// If `src.len() != h * w` or a size is zero.
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    assert!(
        h > 0 && w > 0 && oh > 0 && ow > 0,
        "empty image in a resize"
    );
    assert_eq!(
        src.len(),
        h * w,
        "image of {h} x {w} has {} values",
        src.len()
    );
    let cols: Vec<_> = (0..ow).map(|c| source_taps(c, w, ow)).collect();
    let mut out = Vec::with_capacity(oh * ow);
    for r in 0..oh {
        let (r0, r1, wr0, wr1) = source_taps(r, h, oh);
        let row0 = &src[r0 * w..(r0 + 1) * w];
        let row1 = &src[r1 * w..(r1 + 1) * w];
        out.extend(cols.iter().map(|&(c0, c1, wc0, wc1)| {
            wr0 * (wc0 * row0[c0] + wc1 * row0[c1]) + wr1 * (wc0 * row1[c0] + wc1 * row1[c1])
        }));
    }
    out
}

/// The slices of `range`, each resized to `size` x `size`: `[S, size, size]` with S = range length.
/// No normalisation here (the engine normalises each slice on the device).
pub fn to_network(vol: &Volume, range: SliceRange, size: usize) -> Result<Vec<f32>> {
    let [nx, ny, nz] = vol.dims;
    if range.last >= nz {
        bail!(
            "{}: slice range {range} is outside the volume's {nz} axial slices (0:{})",
            vol.path.display(),
            nz.saturating_sub(1)
        );
    }
    if vol.data.len() != nx * ny * nz {
        bail!(
            "{}: {} values for dims {:?}",
            vol.path.display(),
            vol.data.len(),
            vol.dims
        );
    }
    if size == 0 || nx == 0 || ny == 0 {
        bail!(
            "{}: cannot resize {nx} x {ny} slices to {size} x {size}",
            vol.path.display()
        );
    }
    let mut out = Vec::with_capacity(range.count() * size * size);
    for z in range.first..=range.last {
        out.extend(resize_bilinear(&axial(vol, z), ny, nx, size, size));
    }
    Ok(out)
}

/// Network maps `[S, size, size]` back to volume data on `dims`: each map resized to
/// `ny` x `nx` and put at slice `range.first + s`; slices outside the range are zero.
///
/// # Panics
/// If `maps.len() != range.count() * size * size` or the range does not fit `dims`.
pub fn from_network(maps: &[f32], size: usize, dims: [usize; 3], range: SliceRange) -> Vec<f32> {
    let [nx, ny, nz] = dims;
    assert!(range.last < nz, "slice range {range} outside {nz} slices");
    assert_eq!(
        maps.len(),
        range.count() * size * size,
        "{} maps of {size} x {size} expected",
        range.count()
    );
    let plane = nx * ny;
    let mut out = vec![0.0; plane * nz];
    for (s, map) in maps.chunks_exact(size * size).enumerate() {
        let z = range.first + s;
        out[plane * z..plane * (z + 1)].copy_from_slice(&resize_bilinear(map, size, size, ny, nx));
    }
    out
}

/// Voxel position (x, y) under the centre of network pixel (`row`, `col`), the inverse of the
/// resize's half-pixel mapping, clamped to the slice (`0..=nx-1`, `0..=ny-1`).
pub fn network_to_voxel(row: usize, col: usize, size: usize, nx: usize, ny: usize) -> (f64, f64) {
    let back = |i: usize, n: usize| {
        let v = (i as f64 + 0.5) * n as f64 / size as f64 - 0.5;
        v.clamp(0.0, n.saturating_sub(1) as f64)
    };
    (back(col, nx), back(row, ny))
}
