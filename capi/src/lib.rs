//! The C ABI of the fcd engine: an opaque engine handle, detection into caller-owned float
//! buffers, and the last error of the calling thread as a string. `include/fcd.h` is
//! generated from these files by cbindgen (capi/header).
//!
//! No panic crosses the boundary: every entry point runs under [`status::call`], which turns
//! errors and panics into an [`FcdStatus`] and a message for [`fcd_last_error`].

mod status;

use fcd::engine::{DetectOptions, Device, Engine};
use fcd::precision::Precision;
use fcd::tensor::Tensor;
use status::{call, invalid, Failure};
use std::ffi::{c_char, CStr};
use std::ptr;
use std::sync::{Mutex, PoisonError};

pub use status::{fcd_last_error, FcdStatus};

/// An engine: the config and both networks, loaded once on a device. Any thread may use a
/// handle; calls on one handle run one at a time.
pub struct FcdEngine {
    engine: Mutex<Engine>,
    /// The config's `image_size`, read without the lock: sizes are checked before a call
    /// waits for the engine or reads a caller's buffer.
    image_size: usize,
}

/// The most values one input buffer may hold: 2^30, 4 GiB of float32. Checked from the sizes
/// before a buffer is read, as a bound on what one call allocates.
const MAX_VALUES: usize = 1 << 30;

/// Loads an engine. `config`: the diffusion YAML; `unet`: the UNet checkpoint; `classifier`:
/// its checkpoint, or NULL for the config's `ckpt_path`; `device`: "auto", "cpu" or "cuda"
/// (NULL: "auto"); `precision`: "fp32", "tf32", "bf16" or "fp16" (NULL: "fp32").
///
/// Returns NULL on failure, with the reason in `fcd_last_error()`. Free the engine with
/// `fcd_engine_free`.
///
/// # Safety
/// Each string is NULL (where allowed) or a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn fcd_engine_new(
    config: *const c_char,
    unet: *const c_char,
    classifier: *const c_char,
    device: *const c_char,
    precision: *const c_char,
) -> *mut FcdEngine {
    let mut engine = ptr::null_mut();
    call(|| {
        let config = text(config, "config")?.ok_or_else(|| invalid("config is NULL"))?;
        let unet = text(unet, "unet")?.ok_or_else(|| invalid("unet is NULL"))?;
        let device: Device = text(device, "device")?
            .unwrap_or("auto")
            .parse()
            .map_err(bad)?;
        let precision: Precision = text(precision, "precision")?
            .unwrap_or("fp32")
            .parse()
            .map_err(bad)?;
        let builder = Engine::builder(config)
            .unet(unet)
            .device(device)
            .precision(precision);
        let builder = match text(classifier, "classifier")? {
            Some(c) => builder.classifier(c),
            None => builder,
        };
        let built = builder.build()?;
        let loaded = FcdEngine {
            image_size: built.config().unet.image_size,
            engine: Mutex::new(built),
        };
        engine = Box::into_raw(Box::new(loaded));
        Ok(())
    });
    engine
}

/// The side of the square slices the engine's networks take (the config's `image_size`), 0
/// for a NULL engine.
///
/// # Safety
/// `engine` is NULL or a live handle from `fcd_engine_new`.
#[no_mangle]
pub unsafe extern "C" fn fcd_engine_image_size(engine: *const FcdEngine) -> usize {
    let mut size = 0;
    call(|| {
        let engine = engine.as_ref().ok_or_else(|| invalid("engine is NULL"))?;
        size = engine.image_size;
        Ok(())
    });
    size
}

/// Detection on `slices` slices of `height` x `width` (the engine's image size), FLAIR and T1
/// raw intensities, each slice normalised on its own. Other sizes, or more than 2^30 values,
/// are refused before any buffer is read.
///
/// `seed` seeds the initial noise; `steps` is the noise level N (0: the config's);
/// `guidance` the classifier scale (NaN: the config's); `hist_match` histogram-matches the
/// pseudo-healthy FLAIR before the difference. Writes `slices * height * width` floats to
/// each output: the pseudo-healthy FLAIR in [-1, 1] and the anomaly maps in [0, 1], the
/// same values as `fcd detect`'s pseudo_healthy.npy and anomaly.npy. On failure the outputs
/// are left as they were.
///
/// # Safety
/// `engine` is NULL or a live handle; the four arrays are NULL or hold
/// `slices * height * width` floats each.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // the C signature the header documents
pub unsafe extern "C" fn fcd_detect(
    engine: *mut FcdEngine,
    flair: *const f32,
    t1: *const f32,
    slices: usize,
    height: usize,
    width: usize,
    seed: u64,
    steps: usize,
    guidance: f64,
    hist_match: bool,
    out_pseudo_healthy: *mut f32,
    out_anomaly: *mut f32,
) -> FcdStatus {
    call(|| {
        let engine = engine.as_ref().ok_or_else(|| invalid("engine is NULL"))?;
        let size = engine.image_size;
        if (height, width) != (size, size) {
            return Err(invalid(format!(
                "slices of {height} x {width}: the engine takes {size} x {size}"
            )));
        }
        let n = slices
            .checked_mul(height)
            .and_then(|n| n.checked_mul(width))
            .filter(|&n| n > 0 && n <= MAX_VALUES)
            .ok_or_else(|| {
                invalid(format!(
                    "{slices} slices of {height} x {width}: not a positive size of at most \
                     {MAX_VALUES} values"
                ))
            })?;
        let input = |p: *const f32, what: &str| -> Result<Tensor, Failure> {
            if p.is_null() {
                return Err(invalid(format!("{what} is NULL")));
            }
            let data = std::slice::from_raw_parts(p, n).to_vec();
            Ok(Tensor::new(vec![slices, height, width, 1], data)?)
        };
        let (flair, t1) = (input(flair, "flair")?, input(t1, "t1")?);
        let outputs = [
            (out_pseudo_healthy, "out_pseudo_healthy"),
            (out_anomaly, "out_anomaly"),
        ];
        if let Some((_, what)) = outputs.iter().find(|(p, _)| p.is_null()) {
            return Err(invalid(format!("{what} is NULL")));
        }
        let options = DetectOptions {
            steps: (steps > 0).then_some(steps),
            guidance: (!guidance.is_nan()).then_some(guidance),
            seed,
            hist_match,
            ..Default::default()
        };
        let det = lock(engine).detect(flair, t1, options)?;
        let results = [&det.pseudo_healthy.data, &det.anomaly.data];
        for ((out, _), values) in outputs.into_iter().zip(results) {
            std::slice::from_raw_parts_mut(out, n).copy_from_slice(values);
        }
        Ok(())
    })
}

/// Frees an engine from `fcd_engine_new`; NULL is ignored.
///
/// # Safety
/// `engine` is NULL or a live handle, not used again.
#[no_mangle]
pub unsafe extern "C" fn fcd_engine_free(engine: *mut FcdEngine) {
    call(|| {
        if !engine.is_null() {
            drop(Box::from_raw(engine));
        }
        Ok(())
    });
}

/// A panic in an earlier call poisons the lock but leaves the engine usable: the sampler's
/// per-call device state is released by its drop guards while the panic unwinds.
fn lock(engine: &FcdEngine) -> std::sync::MutexGuard<'_, Engine> {
    engine.engine.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The UTF-8 string at `p`, `None` for NULL.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p)
        .to_str()
        .map(Some)
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// A refused argument, with the engine's message.
fn bad(e: anyhow::Error) -> Failure {
    invalid(format!("{e:#}"))
}
