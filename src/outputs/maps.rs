//! The maps, overlays and montage of one detection, in the input's form.

use super::{montage, overlay};
use crate::engine::{Detection, VolumeDetection};
use crate::inputs::{Origin, Prepared};
use crate::io::atomic::Staged;
use crate::io::{npy, volume};
use crate::slices;
use anyhow::Result;
use serde_json::json;

/// `.npy` bytes of one slice's anomaly map on the network's `size` x `size` grid, `(H, W)`
/// float32 (`fcd eval --save-maps`, a file per slice).
pub fn slice_map_npy(map: &[f32], size: usize) -> Result<Vec<u8>> {
    npy::encode_f32(&[size, size], map)
}

/// What [`write`] wrote, for summary.json: the files by role, and the peaks.
pub(super) struct Written {
    pub(super) files: serde_json::Map<String, serde_json::Value>,
    pub(super) peaks: Vec<serde_json::Value>,
}

/// The slices a montage may show and the peaks on their grid.
type Shown = (Vec<montage::Slice>, Vec<montage::Peak>);

/// Writes the maps in the input's form: volumes on its grid with an overlay per slice, or
/// `.npy` arrays (with an overlay for a PNG slice); a montage for a volume or a PNG slice.
pub(super) fn write(staged: &mut Staged, inputs: &Prepared, det: Detection) -> Result<Written> {
    let size = det.anomaly.shape[1];
    let s = inputs.slices();
    let mut files = serde_json::Map::new();
    let (peaks, shown): (Vec<serde_json::Value>, Option<Shown>) = match &inputs.origin {
        Origin::Volume {
            flair,
            lesion,
            range,
        } => {
            let vd = VolumeDetection::new(inputs, det)?;
            staged.write(
                "anomaly.nii.gz",
                &volume::encode_like(flair, &vd.anomaly.data)?,
            )?;
            staged.write(
                "pseudo_healthy.nii.gz",
                &volume::encode_like(flair, &vd.pseudo_healthy.data)?,
            )?;
            let [nx, ny, _] = flair.dims;
            let plane = nx * ny;
            let mut shown = Vec::with_capacity(s);
            for z in range.first..=range.last {
                let lesion = lesion.as_ref().map(|l| &l[z * plane..(z + 1) * plane]);
                let slice = shown_slice(
                    &slices::axial(flair, z),
                    &slices::axial(&vd.anomaly, z),
                    lesion,
                    (ny, nx),
                    Some(z),
                )?;
                staged.write(
                    &format!("overlays/slice_{z:03}.png"),
                    &overlay::png(&slice.overlay)?,
                )?;
                shown.push(slice);
            }
            let marks = vd
                .peaks
                .iter()
                .map(|p| montage::Peak {
                    slice: p.slice - range.first,
                    x: p.voxel_x.round() as u32,
                    y: p.voxel_y.round() as u32,
                })
                .collect();
            files.insert("anomaly".into(), json!("anomaly.nii.gz"));
            files.insert("pseudo_healthy".into(), json!("pseudo_healthy.nii.gz"));
            files.insert(
                "overlays".into(),
                json!("overlays/slice_ZZZ.png (the input's grid)"),
            );
            let peaks = vd
                .peaks
                .iter()
                .map(|p| {
                    json!({"slice": p.slice, "voxel_x": p.voxel_x, "voxel_y": p.voxel_y,
                           "world_mm": p.world_mm, "score": p.score, "strength": p.strength})
                })
                .collect();
            (peaks, Some((shown, marks)))
        }
        Origin::Slices | Origin::Png { .. } => {
            staged.write(
                "pseudo_healthy.npy",
                &npy::encode_f32(&[s, 1, size, size], &det.pseudo_healthy.data)?,
            )?;
            staged.write(
                "anomaly.npy",
                &npy::encode_f32(&[s, size, size], &det.anomaly.data)?,
            )?;
            files.insert("pseudo_healthy".into(), json!("pseudo_healthy.npy"));
            files.insert("anomaly".into(), json!("anomaly.npy"));
            let shown = if let Origin::Png {
                height,
                width,
                flair,
                lesion,
            } = &inputs.origin
            {
                let (h, w) = (*height, *width);
                let anomaly = slices::resize_bilinear(&det.anomaly.data, size, size, h, w);
                let slice = shown_slice(flair, &anomaly, lesion.as_deref(), (h, w), None)?;
                staged.write("overlay.png", &overlay::png(&slice.overlay)?)?;
                let marks = det
                    .peaks
                    .iter()
                    .map(|p| {
                        let (x, y) = slices::network_to_voxel(p.row, p.col, size, w, h);
                        montage::Peak {
                            slice: 0,
                            x: x.round() as u32,
                            y: y.round() as u32,
                        }
                    })
                    .collect();
                files.insert("overlay".into(), json!("overlay.png (the PNG's size)"));
                Some((vec![slice], marks))
            } else {
                None
            };
            let peaks = det
                .peaks
                .iter()
                .map(|p| {
                    json!({"slice": p.slice, "row": p.row, "col": p.col, "score": p.score,
                           "strength": p.strength})
                })
                .collect();
            (peaks, shown)
        }
    };
    if let Some((tiles, marks)) = shown {
        let png = overlay::png(&montage::montage(&tiles, &marks)?)?;
        staged.write("montage.png", &png)?;
        files.insert(
            "montage".into(),
            json!(
                "montage.png (overlays of the slices of the strongest peaks and the largest \
                 lesions, the peaks numbered by their rank in peaks)"
            ),
        );
    }
    Ok(Written { files, peaks })
}

/// One slice at the input's resolution (`(h, w)`, row-major) ready for the montage, its
/// overlay made of the FLAIR, the anomaly map and the lesion on that grid.
fn shown_slice(
    flair: &[f32],
    anomaly: &[f32],
    lesion: Option<&[bool]>,
    (h, w): (usize, usize),
    label: Option<usize>,
) -> Result<montage::Slice> {
    Ok(montage::Slice {
        overlay: overlay::overlay(flair, anomaly, lesion, h, w)?,
        label,
        lesion_pixels: lesion.map_or(0, |l| l.iter().filter(|&&v| v).count()),
    })
}
