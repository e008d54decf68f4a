//! Input preparation, one path for `fcd detect`, `fcd eval` and the engine's volume calls:
//! reading the FLAIR, T1 and lesion-mask files, checking that they share a grid, taking
//! axial slices, resizing them to the network's grid, the lesion-mask rule, and checking
//! that every slice can be normalised (SPEC 2) before any network runs.
//!
//! The format is told by the file name: NIfTI (`.nii`, `.nii.gz`), PNG (`.png`), else `.npy`.
//! - NIfTI: 3-D volumes on one voxel grid; the axial slices of a [`SliceRange`].
//! - PNG: one slice; FLAIR, T1 and mask of one size.
//! - `.npy`: slices at the network's size already; no mask.
//!
//! Slices that are not `size x size` are resized bilinearly with half-pixel centres
//! ([`slices::resize_bilinear`]).
//!
//! The mask rule: a lesion pixel is `roi > 0`. The 0/1 image is resized like the slices and
//! kept where `>= 0.5`, so a lesion keeps its area and shape rather than growing or shrinking
//! by the interpolation's blur. A mask with no pixel `> 0` is refused (a healthy subject has
//! no mask), and so is a PNG mask whose lesion vanishes at the network's size. A NIfTI mask
//! may be empty inside the slice range: those slices are lesion-free.

use crate::io::volume::{self, Volume};
use crate::io::{npy, png};
use crate::metrics;
use crate::post;
use crate::slices::{self, SliceRange};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// Image formats, told by file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nifti,
    Png,
    Npy,
}

impl Format {
    pub fn of(path: &Path) -> Format {
        let s = path.to_string_lossy().to_lowercase();
        if s.ends_with(".nii") || s.ends_with(".nii.gz") {
            Format::Nifti
        } else if s.ends_with(".png") {
            Format::Png
        } else {
            Format::Npy
        }
    }
}

/// Where prepared slices came from: what results are mapped back onto, and what the
/// overlays show at the input's resolution.
#[derive(Clone, Debug)]
pub enum Origin {
    /// `.npy` slices (or arrays) at the network's size.
    Slices,
    /// One PNG slice of this size: the FLAIR's grey values and the lesion (`mask > 0`),
    /// row-major.
    Png {
        height: usize,
        width: usize,
        flair: Vec<f32>,
        lesion: Option<Vec<bool>>,
    },
    /// The axial slices `range` of volumes on the grid of `flair`, with the lesion
    /// (`mask > 0`) on that grid, in the volume's voxel order.
    Volume {
        flair: Box<Volume>,
        lesion: Option<Vec<bool>>,
        range: SliceRange,
    },
}

/// Slices ready for the networks.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub origin: Origin,
    /// `[S, size, size, 1]` raw intensities (normalised on the device).
    pub flair: Tensor,
    pub t1: Tensor,
    /// `S * size * size` lesion pixels, when a mask was given.
    pub mask: Option<Vec<bool>>,
}

impl Prepared {
    pub fn slices(&self) -> usize {
        self.flair.shape[0]
    }
}

/// Reads FLAIR, T1 and the optional mask, all in one format, and prepares them for a network
/// of `size x size`; `range` selects the axial slices of volumes.
pub fn read(
    flair: &Path,
    t1: &Path,
    mask: Option<&Path>,
    range: SliceRange,
    size: usize,
) -> Result<Prepared> {
    let format = Format::of(flair);
    ensure!(
        Format::of(t1) == format && mask.is_none_or(|m| Format::of(m) == format),
        "FLAIR {}, T1 {}{} are not in the same format",
        flair.display(),
        t1.display(),
        mask.map(|m| format!(" and mask {}", m.display()))
            .unwrap_or_default()
    );
    match format {
        Format::Nifti => {
            let f = volume::read_volume(flair)?;
            let t = volume::read_volume(t1)?;
            let m = mask.map(volume::read_volume).transpose()?;
            from_volumes(f, &t, m.as_ref(), range, size)
        }
        Format::Png => read_png(flair, t1, mask, size),
        Format::Npy => {
            ensure!(mask.is_none(), "a mask needs NIfTI or PNG input");
            let f = npy::read_slices(flair)?;
            let t = npy::read_slices(t1)?;
            ensure!(
                (f.b, f.h, f.w) == (t.b, t.h, t.w),
                "FLAIR {} ({} slices of {} x {}) and T1 {} ({} slices of {} x {}) are not on \
                 the same grid",
                flair.display(),
                f.b,
                f.h,
                f.w,
                t1.display(),
                t.b,
                t.h,
                t.w
            );
            let shape = vec![f.b, f.h, f.w, 1];
            let (fd, td) = (f.data, t.data);
            from_slices(
                (
                    Tensor::new(shape.clone(), fd)?,
                    &flair.display().to_string(),
                ),
                (Tensor::new(shape, td)?, &t1.display().to_string()),
                size,
            )
        }
    }
}

/// Checks slices given as arrays (`[S, H, W, 1]`, each named for messages): one shape, the
/// network's size, and every slice normalisable.
pub fn from_slices(
    (flair, flair_name): (Tensor, &str),
    (t1, t1_name): (Tensor, &str),
    size: usize,
) -> Result<Prepared> {
    for (t, name) in [(&flair, flair_name), (&t1, t1_name)] {
        ensure!(
            t.shape.len() == 4 && t.shape[3] == 1 && t.shape[0] >= 1,
            "{name}: slices of shape {:?}, expected [slices, height, width, 1]",
            t.shape
        );
        ensure!(
            t.shape[1] == size && t.shape[2] == size,
            "{name}: slices of {} x {}, but the config's image_size is {size} (resample the \
             input first)",
            t.shape[1],
            t.shape[2]
        );
    }
    ensure!(
        flair.shape == t1.shape,
        "FLAIR {flair_name} ({} slices) and T1 {t1_name} ({} slices) differ in number",
        flair.shape[0],
        t1.shape[0]
    );
    for (t, name) in [(&flair, flair_name), (&t1, t1_name)] {
        for (i, sl) in t.data.chunks(size * size).enumerate() {
            normalisable(sl).with_context(|| format!("{name}: slice {i}"))?;
        }
    }
    Ok(Prepared {
        origin: Origin::Slices,
        flair,
        t1,
        mask: None,
    })
}

/// Checks initial noise for slices of `shape`, named `what` in messages.
pub fn check_noise(noise: &Tensor, shape: &[usize], what: &str) -> Result<()> {
    ensure!(
        noise.shape == shape,
        "{what}: noise of shape {:?} for slices of shape {shape:?}",
        noise.shape
    );
    if let Some(i) = noise.data.iter().position(|v| !v.is_finite()) {
        bail!("{what}: non-finite noise value at index {i}");
    }
    Ok(())
}

/// Initial noise from an `.npy` file, checked against slices of `shape` (`[S, H, W, 1]`).
pub fn read_noise(path: &Path, shape: &[usize]) -> Result<Tensor> {
    let n = npy::read_slices(path)?;
    let noise = Tensor::new(vec![n.b, n.h, n.w, 1], n.data)?;
    check_noise(&noise, shape, &path.display().to_string())?;
    Ok(noise)
}

/// The axial slices `range` of co-registered volumes, at the network's size.
pub fn from_volumes(
    flair: Volume,
    t1: &Volume,
    mask: Option<&Volume>,
    range: SliceRange,
    size: usize,
) -> Result<Prepared> {
    volume::same_grid(&flair, t1)?;
    let (lesion, mask) = match mask {
        None => (None, None),
        Some(m) => {
            volume::same_grid(&flair, m)?;
            let lesion = metrics::mask_from_f32(&m.data);
            ensure!(
                lesion.contains(&true),
                "{}: empty mask, no voxel > 0 (a healthy subject has no mask)",
                m.path.display()
            );
            let bin = Volume {
                data: binarise(&lesion),
                ..m.clone()
            };
            let kept = kept(&slices::to_network(&bin, range, size)?);
            (Some(lesion), Some(kept))
        }
    };
    let fd = slices::to_network(&flair, range, size)?;
    let td = slices::to_network(t1, range, size)?;
    for (data, vol) in [(&fd, &flair), (&td, t1)] {
        for (i, sl) in data.chunks(size * size).enumerate() {
            normalisable(sl).with_context(|| {
                format!("{}: axial slice {}", vol.path.display(), range.first + i)
            })?;
        }
    }
    let shape = vec![range.count(), size, size, 1];
    Ok(Prepared {
        origin: Origin::Volume {
            flair: Box::new(flair),
            lesion,
            range,
        },
        flair: Tensor::new(shape.clone(), fd)?,
        t1: Tensor::new(shape, td)?,
        mask,
    })
}

fn read_png(flair: &Path, t1: &Path, mask: Option<&Path>, size: usize) -> Result<Prepared> {
    let (h, w, fd) = png::read_gray(flair)?;
    let (th, tw, td) = png::read_gray(t1)?;
    ensure!(
        (th, tw) == (h, w),
        "FLAIR {} ({h} x {w}) and T1 {} ({th} x {tw}) are not on the same grid",
        flair.display(),
        t1.display()
    );
    let (lesion, mask) = match mask {
        None => (None, None),
        Some(path) => {
            let (mh, mw, roi) = png::read_gray(path)?;
            ensure!(
                (mh, mw) == (h, w),
                "mask {} ({mh} x {mw}) and FLAIR {} ({h} x {w}) are not on the same grid",
                path.display(),
                flair.display()
            );
            let lesion = metrics::mask_from_f32(&roi);
            let pixels = lesion.iter().filter(|&&l| l).count();
            ensure!(
                pixels > 0,
                "{}: empty mask, no pixel > 0 (a healthy subject has no mask)",
                path.display()
            );
            let m = kept(&fit(binarise(&lesion), h, w, size));
            ensure!(
                m.contains(&true),
                "{}: the lesion of {pixels} pixels vanishes when resized from {h} x {w} to \
                 {size} x {size}",
                path.display()
            );
            (Some(lesion), Some(m))
        }
    };
    let raw = fd.clone();
    let (fd, td) = (fit(fd, h, w, size), fit(td, h, w, size));
    for (data, path) in [(&fd, flair), (&td, t1)] {
        normalisable(data).with_context(|| path.display().to_string())?;
    }
    let shape = vec![1, size, size, 1];
    Ok(Prepared {
        origin: Origin::Png {
            height: h,
            width: w,
            flair: raw,
            lesion,
        },
        flair: Tensor::new(shape.clone(), fd)?,
        t1: Tensor::new(shape, td)?,
        mask,
    })
}

/// Checks that a slice normalises to finite values: finite, not constant, and with a range
/// (max - min) that float32 can hold (values of +-3e38 overflow it to infinity).
fn normalisable(slice: &[f32]) -> Result<()> {
    let n = post::normalize_slice(slice)?;
    if n.iter().any(|v| !v.is_finite()) {
        let (lo, hi) = slice
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        bail!("values from {lo} to {hi}: the range overflows float32, cannot normalise");
    }
    Ok(())
}

/// `h x w` values at `size x size` (unchanged when they are that size already).
fn fit(v: Vec<f32>, h: usize, w: usize, size: usize) -> Vec<f32> {
    if (h, w) == (size, size) {
        v
    } else {
        slices::resize_bilinear(&v, h, w, size, size)
    }
}

/// The lesion as a 0/1 image, to resize like the slices.
fn binarise(lesion: &[bool]) -> Vec<f32> {
    lesion.iter().map(|&l| f32::from(u8::from(l))).collect()
}

/// The lesion kept on the network's grid: the resized 0/1 image `>= 0.5`.
fn kept(resized: &[f32]) -> Vec<bool> {
    resized.iter().map(|&v| v >= 0.5).collect()
}
