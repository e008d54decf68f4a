//! Detection results mapped back from the network's grid onto the input volume's.

use super::Detection;
use crate::inputs::{Origin, Prepared};
use crate::io::volume::{self, Volume};
use crate::slices::{self, SliceRange};
use anyhow::{bail, Result};

/// A peak at its place in the volume.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VolumePeak {
    /// Axial slice index `z`.
    pub slice: usize,
    /// Voxel position under the peak's network pixel (fractional: the network grid is
    /// coarser or finer than the volume's).
    pub voxel_x: f64,
    pub voxel_y: f64,
    /// World coordinates in mm, through the volume's affine.
    pub world_mm: [f64; 3],
    pub score: f32,
    pub strength: f32,
}

/// [`Detection`] on the grid of the input volume.
#[derive(Clone, Debug)]
pub struct VolumeDetection {
    /// Anomaly maps resized back, zero outside the slice range, with the FLAIR's affine.
    pub anomaly: Volume,
    /// The pseudo-healthy FLAIR resized back and mapped to each slice's intensity range
    /// (the inverse of the slice normalisation); zero outside the range.
    pub pseudo_healthy: Volume,
    pub peaks: Vec<VolumePeak>,
    pub range: SliceRange,
    /// The results on the network's grid.
    pub network: Detection,
}

impl VolumeDetection {
    /// Maps `det` back onto the volume `inputs` came from.
    pub fn new(inputs: &Prepared, det: Detection) -> Result<VolumeDetection> {
        let Origin::Volume { flair, range, .. } = &inputs.origin else {
            bail!("internal: volume results asked for slices that did not come from a volume");
        };
        let range = *range;
        let size = det.anomaly.shape[1];
        let hw = size * size;
        let mut ph = det.pseudo_healthy.data.clone();
        for (p, raw) in ph.chunks_mut(hw).zip(inputs.flair.data.chunks(hw)) {
            let (lo, hi) = raw
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            p.iter_mut()
                .for_each(|v| *v = (*v / 2.0 + 0.5) * (hi - lo) + lo);
        }
        let on_grid = |maps: &[f32]| Volume {
            dims: flair.dims,
            data: slices::from_network(maps, size, flair.dims, range),
            affine: flair.affine,
            path: flair.path.clone(),
        };
        let [nx, ny, _] = flair.dims;
        let peaks = det
            .peaks
            .iter()
            .map(|p| {
                let z = range.first + p.slice;
                let (x, y) = slices::network_to_voxel(p.row, p.col, size, nx, ny);
                VolumePeak {
                    slice: z,
                    voxel_x: x,
                    voxel_y: y,
                    world_mm: volume::world(&flair.affine, [x, y, z as f64]),
                    score: p.score,
                    strength: p.strength,
                }
            })
            .collect();
        Ok(VolumeDetection {
            anomaly: on_grid(&det.anomaly.data),
            pseudo_healthy: on_grid(&ph),
            peaks,
            range,
            network: det,
        })
    }
}
