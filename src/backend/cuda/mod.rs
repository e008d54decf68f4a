//! The CUDA backend, run-time side: the driver, the device, the embedded
//! kernel modules, and typed launchers (one submodule per kernel family).
//!
//! cudarc loads libcuda lazily and panics when it cannot, so every entry
//! point probes the library first and turns its absence into an error.
//! All work runs on one stream per `Gpu`, which is what lets cudarc's
//! per-buffer event tracking be switched off (it would add an event record
//! to every launch and get in the way of CUDA graph capture).

pub mod backend;
mod graph;
pub mod kernels;
pub(crate) mod launch;

/// Kernel families public in a build with the lab (the kernel tests and the tournament call
/// their launchers), private to the crate otherwise.
macro_rules! kernel_families {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "lab")]
        pub mod $name;
        #[cfg(not(feature = "lab"))]
        pub(crate) mod $name;
    )*};
}

kernel_families!(
    attention,
    attention_gemm,
    conv_plan,
    ddim,
    dispatch,
    flash,
    gemm,
    igemm,
    igemm2,
    norm,
    ops,
    post
);

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::{sys::CUdevice_attribute, CudaModule, LaunchConfig};
pub use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;

use kernels::ImageKind;

/// Checks once per process that some libcuda cudarc would try can be loaded.
fn probe_driver() -> Result<()> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let mut candidates = cudarc::get_lib_name_candidates("cuda");
            candidates.extend(cudarc::get_lib_name_candidates("nvcuda"));
            let mut reason = String::new();
            for name in &candidates {
                // SAFETY: loading libcuda runs only its initialisers; cudarc
                // loads it again for itself.
                match unsafe { libloading::Library::new(name) } {
                    Ok(_) => return Ok(()),
                    Err(e) if name == "libcuda.so.1" || reason.is_empty() => {
                        reason = std::error::Error::source(&e)
                            .map_or_else(|| e.to_string(), |s| s.to_string())
                    }
                    Err(_) => {}
                }
            }
            Err(format!("no CUDA driver (libcuda.so.1) found: {reason}"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn require_kernels() -> Result<()> {
    if let Some(reason) = kernels::missing_reason() {
        bail!("this fcd binary was built without CUDA kernels: {reason}");
    }
    Ok(())
}

/// Whether `Gpu::new` can work: a driver, at least one device, and
/// embedded kernels. Never panics.
pub fn cuda_available() -> bool {
    unavailable_reason().is_none()
}

/// Why `cuda_available()` is false, as a sentence for the user.
pub fn unavailable_reason() -> Option<String> {
    let check = || -> Result<()> {
        probe_driver()?;
        require_kernels()?;
        let count = CudaContext::device_count().context("the CUDA driver failed to initialise")?;
        ensure!(count > 0, "the CUDA driver reports no devices");
        Ok(())
    };
    check().err().map(|e| format!("{e:#}"))
}

/// One device: its context, the stream all work goes to, and every embedded
/// kernel module, loaded in the image that suits the device.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    image_kind: ImageKind,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
}

impl Gpu {
    /// Opens device `ordinal` and loads every embedded module: the CUBIN of
    /// its architecture, or the PTX (also when `FCD_FORCE_PTX=1`).
    pub fn new(ordinal: usize) -> Result<Gpu> {
        probe_driver()?;
        require_kernels()?;
        let count = CudaContext::device_count().context("the CUDA driver failed to initialise")?;
        ensure!(
            ordinal < usize::try_from(count).unwrap_or(0),
            "CUDA device {ordinal} requested, but the driver reports {count} device(s)"
        );
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a context on CUDA device {ordinal}"))?;
        // SAFETY: no buffer exists yet in this context, and every buffer and
        // launch of this Gpu goes to its one stream (the launchers check), so
        // stream order alone keeps them correct.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_owned());
        let compute_capability = ctx
            .compute_capability()
            .context("querying the compute capability")?;
        let (major, minor) = compute_capability;
        let mut image_kind = ImageKind::for_compute_capability(major, minor)
            .with_context(|| format!("device {ordinal} ({name})"))?;
        // Lets a Hopper or Ampere machine exercise the PTX path that newer
        // architectures take.
        if std::env::var("FCD_FORCE_PTX").is_ok_and(|v| v == "1") {
            image_kind = ImageKind::Ptx80;
        }
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("querying the multiprocessor count")?;

        let mut modules = HashMap::new();
        for module in kernels::modules() {
            let image = kernels::image(module, image_kind).with_context(|| {
                format!("kernel module {module} has no {} image", image_kind.label())
            })?;
            let ptx = if image_kind.is_cubin() {
                Ptx::from_binary(image.bytes.to_vec())
            } else {
                let text = std::str::from_utf8(image.bytes)
                    .with_context(|| format!("PTX of {module} is not UTF-8"))?;
                Ptx::from_src(text)
            };
            let loaded = ctx.load_module(ptx).with_context(|| {
                format!(
                    "loading kernel module {module} ({}) on {name}",
                    image_kind.label()
                )
            })?;
            modules.insert(module, loaded);
        }
        Ok(Gpu {
            ctx,
            stream,
            modules,
            image_kind,
            name,
            compute_capability,
            sm_count: u32::try_from(sm_count).unwrap_or(1).max(1),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every buffer of this Gpu must be allocated on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Which embedded image the modules were loaded from.
    pub fn image_kind(&self) -> ImageKind {
        self.image_kind
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.context()
            .mem_get_info()
            .context("querying the GPU's free memory")
    }

    /// Waits for all queued work; reports asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .with_context(|| format!("synchronising {}", self.name))
    }

    /// A copy of `v` on the stream; `what` names it in errors.
    pub fn upload_f32(&self, what: &str, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(v).with_context(|| {
            format!(
                "uploading {what} ({} floats, {} MiB) to {}",
                v.len(),
                (v.len() * 4) >> 20,
                self.name
            )
        })
    }

    /// `extern "C"` kernel `name` of `kernels/<module>.cu`.
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let loaded = self
            .modules
            .get(module)
            .with_context(|| format!("no kernel module {module} is embedded"))?;
        loaded
            .load_function(name)
            .with_context(|| format!("kernel {name} not found in module {module}"))
    }

    /// Fails unless `buf` lives on this Gpu's stream (see the module note);
    /// `op` and `what` name the call and the buffer in the error.
    pub(crate) fn check_stream<T>(&self, buf: &CudaSlice<T>, op: &str, what: &str) -> Result<()> {
        ensure!(
            Arc::ptr_eq(buf.stream(), &self.stream),
            "{op}: {what} was allocated on another stream than the Gpu's (use gpu.stream())"
        );
        Ok(())
    }

    /// Fails unless `buf` holds `len` elements on this Gpu's stream: the
    /// one length check of the launchers, which tests call with wrong sizes.
    pub(crate) fn expect_len<T>(
        &self,
        op: &str,
        what: &str,
        buf: &CudaSlice<T>,
        len: usize,
    ) -> Result<()> {
        ensure!(
            buf.len() == len,
            "{op}: {what} has {} elements, expected {len}",
            buf.len()
        );
        self.check_stream(buf, op, what)
    }

    /// A grid-stride launch over `n` elements: enough 256-thread blocks to
    /// fill every SM, no more.
    pub(crate) fn elementwise_config(&self, n: usize) -> LaunchConfig {
        const THREADS: u32 = 256;
        const BLOCKS_PER_SM: u32 = 8;
        let wanted = n.div_ceil(THREADS as usize);
        let blocks = u32::try_from(wanted)
            .unwrap_or(u32::MAX)
            .min(self.sm_count * BLOCKS_PER_SM)
            .max(1);
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}
