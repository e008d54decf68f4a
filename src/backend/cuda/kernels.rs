//! The kernel images build.rs compiled with NVRTC and embedded, and the
//! choice among them for a device.

use anyhow::{bail, Result};

/// What an image holds: CUBIN for one architecture, or PTX the driver
/// compiles for the device at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageKind {
    Sm80,
    Sm90,
    Ptx80,
}

impl ImageKind {
    pub fn label(self) -> &'static str {
        match self {
            ImageKind::Sm80 => "sm_80 CUBIN",
            ImageKind::Sm90 => "sm_90 CUBIN",
            ImageKind::Ptx80 => "compute_80 PTX",
        }
    }

    pub fn is_cubin(self) -> bool {
        self != ImageKind::Ptx80
    }

    /// CUBIN runs on its own major architecture (minor equal or newer); any
    /// other device from 8.0 up gets the PTX, which needs a driver at least
    /// as new as the NVRTC that wrote it.
    pub fn for_compute_capability(major: i32, minor: i32) -> Result<ImageKind> {
        Ok(match major {
            9 => ImageKind::Sm90,
            8 => ImageKind::Sm80,
            m if m > 9 => ImageKind::Ptx80,
            _ => bail!("GPU compute capability {major}.{minor} is below 8.0; fcd's kernels need sm_80 or newer"),
        })
    }
}

/// One compiled `kernels/<module>.cu`.
#[derive(Clone, Copy, Debug)]
pub struct KernelImage {
    pub module: &'static str,
    pub kind: ImageKind,
    pub bytes: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Every embedded image; empty when the build found no NVRTC.
pub fn images() -> &'static [KernelImage] {
    IMAGES
}

/// The NVRTC version ("12.6") that compiled the images, if any did.
pub fn nvrtc_version() -> Option<&'static str> {
    NVRTC_VERSION
}

/// Why the build embedded no kernels, with how to get them.
pub fn missing_reason() -> Option<&'static str> {
    (!MISSING_REASON.is_empty()).then_some(MISSING_REASON)
}

/// The distinct module names, in build order (sorted).
pub fn modules() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = IMAGES.iter().map(|i| i.module).collect();
    names.dedup();
    names
}

pub fn image(module: &str, kind: ImageKind) -> Option<&'static KernelImage> {
    IMAGES.iter().find(|i| i.module == module && i.kind == kind)
}
