//! Compiles every `kernels/*.cu` (and, with the `lab` feature, `kernels/lab/*.cu`) with
//! NVRTC into CUBIN for sm_80 and sm_90 and PTX for compute_80, with `kernels/common/` (the
//! shared `.cuh` headers) on the include path, and generates `$OUT_DIR/kernels.rs`, which
//! embeds them (`src/backend/cuda/kernels.rs` includes it).
//!
//! NVRTC is loaded at build time by cudarc (dynamic loading), so the build
//! needs `libnvrtc.so.12` on `LD_LIBRARY_PATH` and the CUDA headers (see
//! `.ci/env.sh`). Without NVRTC the build still succeeds, warns, and the
//! library reports that it has no kernels; `FCD_REQUIRE_KERNELS=1` (CI) makes
//! that fatal. A kernel that fails to compile always fails the build.

use std::env;
use std::ffi::{c_char, c_int, CStr};
use std::fmt::Write as _;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;

use cudarc::nvrtc::{result, sys};

/// One compilation target: NVRTC's `--gpu-architecture`, the name of the
/// `ImageKind` variant in `src/backend/cuda/kernels.rs`, and whether the output is
/// CUBIN (else PTX).
struct Target {
    arch: &'static str,
    kind: &'static str,
    cubin: bool,
}

const TARGETS: [Target; 3] = [
    Target {
        arch: "sm_80",
        kind: "Sm80",
        cubin: true,
    },
    Target {
        arch: "sm_90",
        kind: "Sm90",
        cubin: true,
    },
    Target {
        arch: "compute_80",
        kind: "Ptx80",
        cubin: false,
    },
];

const ENV_VARS: [&str; 5] = [
    "FCD_CUDA_INCLUDE",
    "FCD_REQUIRE_KERNELS",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
];

const HOWTO: &str = "to embed CUDA kernels, install NVIDIA's wheels (`python3 -m venv .venv && \
.venv/bin/pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12`), \
then `source .ci/env.sh` and rebuild";

struct Kernel {
    stem: String,
    path: PathBuf,
    source: String,
}

struct Compiled {
    stem: String,
    target: &'static Target,
    file: String,
}

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest.join("kernels");
    // The shared headers every kernel may include ("tensor_core.cuh", ...).
    let common_dir = kernel_dir.join("common");
    println!("cargo:rerun-if-changed={}", kernel_dir.display());
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = env::var("FCD_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    remove_old_images(&out_dir);
    mark_cuda_driver();

    // The lab's kernels (the CUDA reference backend's) only in a build with the lab.
    let lab = env::var_os("CARGO_FEATURE_LAB").is_some();
    let lab_dir = kernel_dir.join("lab");
    println!("cargo:rerun-if-changed={}", lab_dir.display());
    let kernels = match read_kernels(&kernel_dir).and_then(|mut k| {
        if lab {
            k.extend(read_kernels(&lab_dir)?);
            k.sort_by(|a, b| a.stem.cmp(&b.stem));
            if let Some(w) = k.windows(2).find(|w| w[0].stem == w[1].stem) {
                return Err(format!(
                    "kernel modules {} and {} share a name",
                    w[0].path.display(),
                    w[1].path.display()
                ));
            }
        }
        Ok(k)
    }) {
        Ok(k) => k,
        Err(e) => fail(&e),
    };
    for k in &kernels {
        println!("cargo:rerun-if-changed={}", k.path.display());
    }
    // Named one by one as the kernels are: a directory entry alone is only
    // as reliable as cargo's scan of it.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    match read_headers(&common_dir) {
        Ok(headers) => {
            for h in headers {
                println!("cargo:rerun-if-changed={}", h.display());
            }
        }
        Err(e) => fail(&e),
    }

    let generated = match nvrtc_version() {
        Err(reason) => {
            if require {
                fail(&format!(
                    "FCD_REQUIRE_KERNELS=1 but NVRTC is unavailable: {reason}\n{HOWTO}"
                ));
            }
            println!("cargo:warning=fcd: building without CUDA kernels: {reason}");
            println!("cargo:warning=fcd: {HOWTO}");
            generate(None, &format!("{reason}; {HOWTO}"), &[])
        }
        Ok(version) => {
            // The project's headers first, so that no CUDA header can shadow them.
            let mut includes = vec![common_dir.clone()];
            includes.extend(include_dirs(&manifest));
            match compile_all(&kernels, &includes, &out_dir) {
                Ok(compiled) => generate(Some(&version), "", &compiled),
                Err(log) => fail(&log),
            }
        }
    };
    let dest = out_dir.join("kernels.rs");
    if let Err(e) = fs::write(&dest, generated) {
        fail(&format!("cannot write {}: {e}", dest.display()));
    }
}

/// Images of an earlier run (other kernels, or NVRTC since removed) would
/// linger in OUT_DIR and mislead whoever looks there.
fn remove_old_images(out_dir: &Path) {
    let Ok(entries) = fs::read_dir(out_dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.extension().is_some_and(|x| x == "cubin" || x == "ptx") {
            let _ = fs::remove_file(path);
        }
    }
}

/// Prints the message whole (NVRTC logs span many lines) and stops the build.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// The `.cuh` headers of `kernels/common/`: included by kernels, never
/// compiled on their own (`read_kernels` takes only `kernels/*.cu`).
fn read_headers(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut headers = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "cuh") {
            headers.push(path);
        }
    }
    headers.sort();
    Ok(headers)
}

/// The top-level `kernels/*.cu` files, one module each; subfolders and other
/// extensions (the headers of `kernels/common/`) are not kernels.
fn read_kernels(dir: &Path) -> Result<Vec<Kernel>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut kernels = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .path();
        if path.extension().is_none_or(|ext| ext != "cu") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        // The stem becomes a module name and part of an OUT_DIR file name.
        if stem.is_empty() || !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "kernel file {} must be named [A-Za-z0-9_]+.cu",
                path.display()
            ));
        }
        let source = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        kernels.push(Kernel { stem, path, source });
    }
    kernels.sort_by(|a, b| a.stem.cmp(&b.stem));
    Ok(kernels)
}

/// Header folders, from the first source that has any: `FCD_CUDA_INCLUDE`,
/// the project's `.venv` wheels, a CUDA toolkit. Sources are not mixed, so
/// that headers of two CUDA versions never meet.
fn include_dirs(manifest: &Path) -> Vec<PathBuf> {
    if let Some(list) = env::var_os("FCD_CUDA_INCLUDE") {
        return env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
    }
    let mut wheels = Vec::new();
    if let Ok(entries) = fs::read_dir(manifest.join(".venv/lib")) {
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for py in pythons {
            for pkg in ["cuda_runtime", "cuda_nvrtc", "cuda_nvcc"] {
                let dir = py.join("site-packages/nvidia").join(pkg).join("include");
                if dir.is_dir() {
                    wheels.push(dir);
                }
            }
        }
    }
    if !wheels.is_empty() {
        return wheels;
    }
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env::var_os(v).map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")]);
    roots
        .map(|r| r.join("include"))
        .find(|d| d.join("cuda_runtime.h").is_file())
        .into_iter()
        .collect()
}

/// Loads libnvrtc the way cudarc will, but without its panic, and returns
/// its version.
fn nvrtc_version() -> Result<String, String> {
    let candidates = cudarc::get_lib_name_candidates("nvrtc");
    let mut why = String::new();
    let mut found = false;
    for name in &candidates {
        // SAFETY: loading libnvrtc runs only its initialisers, which have no
        // preconditions; the handle is dropped at once, cudarc loads its own.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => {
                found = true;
                break;
            }
            // dlerror's text for the name the wheels and toolkits install.
            Err(e) if name == "libnvrtc.so.12" || why.is_empty() => {
                why =
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
            }
            Err(_) => {}
        }
    }
    if !found {
        return Err(format!("libnvrtc could not be loaded ({why})"));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // cudarc panics on a missing symbol; a libnvrtc too old for it counts as none.
    // SAFETY: both pointers are to live locals.
    let status = panic::catch_unwind(AssertUnwindSafe(|| unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    }))
    .map_err(|_| "libnvrtc lacks nvrtcVersion".to_owned())?;
    status
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e}"))?;
    Ok(format!("{major}.{minor}"))
}

/// Compiles every (kernel, target) pair on all cores; on failure returns
/// every failing pair's NVRTC log.
fn compile_all(
    kernels: &[Kernel],
    includes: &[PathBuf],
    out_dir: &Path,
) -> Result<Vec<Compiled>, String> {
    let jobs: Vec<(&Kernel, &'static Target)> = kernels
        .iter()
        .flat_map(|k| TARGETS.iter().map(move |t| (k, t)))
        .collect();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(jobs.len()));
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(kernel, target)) = jobs.get(i) else {
                    break;
                };
                let outcome =
                    panic::catch_unwind(AssertUnwindSafe(|| compile(kernel, target, includes)))
                        .unwrap_or_else(|_| {
                            Err("NVRTC panicked (see the message above)".to_owned())
                        });
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((i, outcome));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(i, _)| *i);

    let mut compiled = Vec::new();
    let mut errors = String::new();
    for (i, outcome) in results {
        let (kernel, target) = jobs[i];
        match outcome {
            Ok(bytes) => {
                let ext = if target.cubin { "cubin" } else { "ptx" };
                let file = format!("{}.{}.{ext}", kernel.stem, target.arch);
                let path = out_dir.join(&file);
                fs::write(&path, bytes)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                compiled.push(Compiled {
                    stem: kernel.stem.clone(),
                    target,
                    file,
                });
            }
            Err(log) => {
                let _ = writeln!(
                    errors,
                    "NVRTC failed on {} for {}:\n{log}\n",
                    kernel.path.display(),
                    target.arch
                );
            }
        }
    }
    if errors.is_empty() {
        return Ok(compiled);
    }
    let searched: Vec<String> = includes.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "{errors}include paths: [{}] (set FCD_CUDA_INCLUDE, colon separated, to override)",
        searched.join(", ")
    ))
}

/// Frees the NVRTC program however compilation ends.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from create_program and is destroyed once.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn compile(kernel: &Kernel, target: &Target, includes: &[PathBuf]) -> Result<Vec<u8>, String> {
    let src = std::ffi::CString::new(kernel.source.as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", kernel.path.display()))?;
    let name = std::ffi::CString::new(format!("{}.cu", kernel.stem)).expect("stem is alphanumeric");
    let prog = Program(
        result::create_program(&src, Some(&name))
            .map_err(|e| format!("nvrtcCreateProgram: {e}"))?,
    );

    let mut options = vec![
        format!("--gpu-architecture={}", target.arch),
        "--std=c++17".to_owned(),
        // Line tables cost nothing at run time and let compute-sanitizer
        // and profilers point at source lines.
        "--generate-line-info".to_owned(),
    ];
    options.extend(
        includes
            .iter()
            .map(|p| format!("--include-path={}", p.display())),
    );

    // SAFETY: `prog` is a live program; src and name outlive it.
    let compiled = unsafe { result::compile_program(prog.0, &options) };
    if let Err(e) = compiled {
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|raw| c_chars_to_string(&raw))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        return Err(format!("{e}; options {options:?}\n{log}"));
    }
    if target.cubin {
        let mut size = 0usize;
        // SAFETY: `prog` compiled for a real architecture, so it holds a
        // CUBIN of `size` bytes, which nvrtcGetCUBIN copies into the buffer.
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
            .result()
            .map_err(|e| format!("nvrtcGetCUBINSize: {e}"))?;
        let mut cubin = vec![0u8; size];
        unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| format!("nvrtcGetCUBIN: {e}"))?;
        Ok(cubin)
    } else {
        // SAFETY: `prog` compiled successfully.
        let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| format!("nvrtcGetPTX: {e}"))?;
        Ok(c_chars_to_string(&ptx).into_bytes())
    }
}

/// NVRTC's NUL-terminated text as a string, without the NUL.
fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// The Rust source `src/backend/cuda/kernels.rs` includes: the NVRTC version, why
/// kernels are missing (empty when present), and one entry per image.
fn generate(version: Option<&str>, missing: &str, compiled: &[Compiled]) -> String {
    let mut s = String::from("// Generated by build.rs; do not edit.\n");
    let _ = writeln!(
        s,
        "pub(crate) const NVRTC_VERSION: Option<&str> = {version:?};"
    );
    let _ = writeln!(s, "pub(crate) const MISSING_REASON: &str = {missing:?};");
    s.push_str("pub(crate) const IMAGES: &[KernelImage] = &[\n");
    for c in compiled {
        let _ = writeln!(
            s,
            "    KernelImage {{ module: {:?}, kind: ImageKind::{}, bytes: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}\")) }},",
            c.stem, c.target.kind, c.file
        );
    }
    s.push_str("];\n");
    s
}

/// Sets the cfg `fcd_cuda_driver` when this machine has a CUDA driver: GPU
/// tests are `#[ignore]`d (reported as ignored, not passed) where it has none,
/// and run with `--include-ignored` on the GPU machine that receives them.
fn mark_cuda_driver() {
    println!("cargo:rustc-check-cfg=cfg(fcd_cuda_driver)");
    println!("cargo:rerun-if-env-changed=FCD_GPU_TESTS");
    // SAFETY: loading libcuda runs only its initialisers.
    let found = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"]
        .iter()
        .any(|n| unsafe { libloading::Library::new(*n) }.is_ok());
    if found || env::var("FCD_GPU_TESTS").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-cfg=fcd_cuda_driver");
    }
}
