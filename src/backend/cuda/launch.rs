//! The kernels' parameter lists, each written once, as in kernels/*.cu, and
//! the typed launchers generated from them. A launcher checks that every
//! buffer it passes lives on the Gpu's stream, loads the kernel and
//! launches it; the calling launcher answers for the sizes (the `# Safety`
//! of each generated function).
//!
//! An entry `name in "module": (params);` gives `unsafe fn name(gpu, cfg,
//! (params))`, the launcher of `extern "C"` kernel `name` of
//! `kernels/<module>.cu`; `family[kernel] in "module": (params);` gives
//! `unsafe fn family(gpu, kernel, cfg, (params))` for the kernels of one
//! parameter list whose name the caller picks at run time (template
//! instantiations). The parameters travel as one tuple, in the kernel's
//! order, so that no launcher has the long argument list of its kernel.

use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::Gpu;

/// One kernel parameter as cudarc's launch builder takes it: a device
/// buffer by reference (so that cudarc sees which buffers a launch uses), a
/// scalar by the address of its value.
pub(super) trait KernelArg {
    /// Fails when a buffer lives on another stream than the Gpu's (see the
    /// note of `super`); scalars always pass.
    fn check(&self, _gpu: &Gpu, _kernel: &str, _param: &str) -> Result<()> {
        Ok(())
    }

    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>);
}

macro_rules! scalar_args {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
                args.arg(&*self);
            }
        }
    )*};
}

scalar_args!(f32, i32, u32, u64);

impl<T> KernelArg for &CudaSlice<T> {
    fn check(&self, gpu: &Gpu, kernel: &str, param: &str) -> Result<()> {
        gpu.check_stream(self, kernel, param)
    }

    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        args.arg(&**self);
    }
}

impl<T> KernelArg for &mut CudaSlice<T> {
    fn check(&self, gpu: &Gpu, kernel: &str, param: &str) -> Result<()> {
        gpu.check_stream(self, kernel, param)
    }

    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        args.arg(&mut **self);
    }
}

/// Checks, loads and launches `kernel` of `module` with `params`.
///
/// # Safety
/// `params` must match the kernel's parameters in number, order and type,
/// and every buffer must hold the elements the kernel reaches under `cfg`.
unsafe fn launch(
    gpu: &Gpu,
    module: &str,
    kernel: &str,
    cfg: LaunchConfig,
    params: &mut [(&str, &mut dyn KernelArg)],
) -> Result<()> {
    for (name, p) in params.iter() {
        p.check(gpu, kernel, name)?;
    }
    let func = gpu.function(module, kernel)?;
    // Above 48 KiB a kernel must opt in to its dynamic shared memory.
    if cfg.shared_mem_bytes > 48 * 1024 {
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )
        .with_context(|| {
            format!("{kernel}: {} bytes of shared memory", cfg.shared_mem_bytes)
        })?;
    }
    let mut args = gpu.stream().launch_builder(&func);
    for (_, p) in params.iter_mut() {
        p.push(&mut args);
    }
    // SAFETY: forwarded from the caller.
    unsafe { args.launch(cfg) }.with_context(|| {
        format!(
            "launching {kernel}: {:?} blocks of {:?} threads, {} bytes of shared memory",
            cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes
        )
    })?;
    Ok(())
}

macro_rules! kernels {
    ($($name:ident $([$kernel:ident])? in $module:literal: ($($param:ident: $ty:ty),* $(,)?);)*) => {$(
        /// Launches the kernel of this parameter list (see the module note)
        /// with `params` in the kernel's order.
        ///
        /// # Safety
        /// Every buffer must hold the elements the kernel reaches under
        /// `cfg` with these parameters.
        pub(crate) unsafe fn $name(
            gpu: &Gpu,
            $($kernel: &str,)?
            cfg: LaunchConfig,
            ($(mut $param,)*): ($($ty,)*),
        ) -> Result<()> {
            let kernel = kernels!(@kernel $name $($kernel)?);
            // SAFETY: the parameters are the kernel's; sizes are the caller's.
            unsafe {
                launch(gpu, $module, kernel, cfg, &mut [$((stringify!($param), &mut $param)),*])
            }
        }
    )*};
    (@kernel $name:ident) => { stringify!($name) };
    (@kernel $name:ident $kernel:ident) => { $kernel };
}

/// The table as data, for the test that holds it to the `.cu` parameter lists: (launcher,
/// whether a family, module, [(parameter, Rust type)]).
#[cfg(test)]
type TableEntry = (
    &'static str,
    bool,
    &'static str,
    &'static [(&'static str, &'static str)],
);

macro_rules! kernel_table {
    ($($name:ident $([$kernel:ident])? in $module:literal: ($($param:ident: $ty:ty),* $(,)?);)*) => {
        #[cfg(test)]
        pub(super) const TABLE: &[TableEntry] = &[$((
            stringify!($name),
            kernel_table!(@family $($kernel)?),
            $module,
            &[$((stringify!($param), stringify!($ty))),*],
        )),*];
    };
    (@family) => { false };
    (@family $kernel:ident) => { true };
}

/// Both the launchers and their table from one list.
macro_rules! declare_kernels {
    ($($list:tt)*) => {
        kernels! { $($list)* }
        kernel_table! { $($list)* }
    };
}

declare_kernels! {
    fill in "ops": (y: &mut CudaSlice<f32>, v: f32, n: u64);
    silu in "ops": (x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: u64);
    add in "ops": (a: &CudaSlice<f32>, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: u64);
    add_bcast in "ops": (
        a: &CudaSlice<f32>, v: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: u64, hwc: u64, c: u64,
    );
    avg_pool2 in "ops": (x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, b: u64, ho: u64, wo: u64, c: u64);
    upsample2 in "ops": (
        x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, b: u64, h: u64, w: u64, c: u64, scale: f32,
    );
    concat in "ops": (
        a: &CudaSlice<f32>, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>, pixels: u64, ca: u64, cb: u64,
    );
    timestep_embedding in "ops": (ts: &CudaSlice<u32>, y: &mut CudaSlice<f32>, b: u64, half: u64);
    add_rows in "ops": (
        x: &CudaSlice<f32>, table: &CudaSlice<f32>, rows: &CudaSlice<u32>, y: &mut CudaSlice<f32>,
        b: u64, dim: u64, k: u64,
    );
    prepend_mean in "ops": (
        x: &CudaSlice<f32>, pos: &CudaSlice<f32>, y: &mut CudaSlice<f32>, b: u64, t: u64, c: u64,
    );
    prepend_mean_bwd in "ops": (dtok: &CudaSlice<f32>, dx: &mut CudaSlice<f32>, b: u64, t: u64, c: u64);
    token0 in "ops": (x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, b: u64, t: u64, c: u64);
    token0_bwd in "ops": (d0: &CudaSlice<f32>, d: &mut CudaSlice<f32>, b: u64, t: u64, c: u64);
    log_softmax_grad in "ops": (
        logits: &CudaSlice<f32>, labels: &CudaSlice<u32>, g: &mut CudaSlice<f32>, b: u64, k: u64,
    );
    axpy in "ops": (x: &mut CudaSlice<f32>, s: f32, g: &CudaSlice<f32>, n: u64);
    flag_non_finite in "ops": (x: &CudaSlice<f32>, flag: &mut CudaSlice<f32>, stage: f32, n: u64);
    axpby in "ops": (
        a: f32, x: &CudaSlice<f32>, b: f32, y: &CudaSlice<f32>, out: &mut CudaSlice<f32>, n: u64,
    );

    // ddim_invert_step, ddim_denoise_step.
    ddim_step[kernel] in "ddim": (
        x: &mut CudaSlice<f32>, eps: &CudaSlice<f32>, sqrt_a: f32, sqrt_1ma: f32,
        sqrt_a_next: f32, sqrt_1ma_next: f32, n: u64,
    );

    post_normalize in "post": (
        x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, status: &mut CudaSlice<u32>, hw: u64,
    );
    post_anomaly in "post": (
        x0: &CudaSlice<f32>, xhat: &CudaSlice<f32>, out: &mut CudaSlice<f32>,
        diff: &mut CudaSlice<f32>, hw: u64, hist_match: i32,
    );

    softmax_rows in "softmax": (s: &mut CudaSlice<f32>, t: u32);
    softmax_bwd_rows in "softmax": (p: &CudaSlice<f32>, dp: &mut CudaSlice<f32>, t: u32);

    // attn_flash_{bf16,f16,tf32x3} and their _d128 variants.
    attn_flash[kernel] in "flash": (
        qkv: &CudaSlice<f32>, out: &mut CudaSlice<f32>, t: u32, c: u32, d: u32, legacy: i32,
        scale_log2: f32,
    );

    gn_stats_partial in "groupnorm": (
        x: &CudaSlice<f32>, part: &mut CudaSlice<f64>, hw: u64, c: u32, cw: u32, tile: u32,
        span: u64, x2: &CudaSlice<f32>, c1: u32,
    );
    gn_stats_combine in "groupnorm": (
        x: &CudaSlice<f32>, part: &CudaSlice<f64>, stats: &mut CudaSlice<f64>, b: u32, runs: u32,
        hw: u64, cg: u32, span: u64, x2: &CudaSlice<f32>, c1: u32,
    );
    gn_affine in "groupnorm": (
        stats: &CudaSlice<f64>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, ss: &CudaSlice<f32>,
        has_ss: i32, out: &mut CudaSlice<f32>, c: u32, n: u64,
    );
    gn_apply in "groupnorm": (
        x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, stats: &CudaSlice<f64>,
        gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, ss: &CudaSlice<f32>, has_ss: i32, silu: i32,
        hw: u64, c: u32, n: u64,
    );
    gn_bwd_partial in "groupnorm": (
        x: &CudaSlice<f32>, dy: &CudaSlice<f32>, stats: &CudaSlice<f64>, gamma: &CudaSlice<f32>,
        beta: &CudaSlice<f32>, ss: &CudaSlice<f32>, has_ss: i32, silu: i32,
        part: &mut CudaSlice<f64>, hw: u64, c: u32, cw: u32, span: u64,
    );
    gn_bwd_combine in "groupnorm": (part: &CudaSlice<f64>, sums: &mut CudaSlice<f64>, b: u32, runs: u32);
    gn_bwd_apply in "groupnorm": (
        x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>, stats: &CudaSlice<f64>,
        sums: &CudaSlice<f64>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>,
        ss: &CudaSlice<f32>, has_ss: i32, silu: i32, hw: u64, c: u32, count: u64,
    );

    // pack_weights_bf16, pack_weights_f16.
    pack_weights_16[kernel] in "igemm": (
        w: &CudaSlice<f32>, w16: &mut CudaSlice<u16>, kk: u64, cout: u64, kp: u64,
    );
    pack_weights_f32 in "igemm": (
        w: &CudaSlice<f32>, w32: &mut CudaSlice<f32>, kk: u64, cout: u64, kp: u64,
    );
    // conv_prep_{bf16,f16}_{same,up,down}: the PREP_KERNEL list.
    conv_prep[kernel] in "igemm2": (
        x: &CudaSlice<f32>, affine: &CudaSlice<f32>, out: &mut CudaSlice<u16>, b: i32, h: i32,
        w: i32, cin: i32, has_affine: i32, silu: i32, x2: &CudaSlice<f32>, c1: i32,
    );
    // igemm2_{bf16,f16}_n{128,64,32}[_part]: the IGEMM2_KERNEL list.
    igemm2[kernel] in "igemm2": (
        xp: &CudaSlice<u16>, wt: &CudaSlice<u16>, bias: &CudaSlice<f32>, bvec: &CudaSlice<f32>,
        res: &CudaSlice<f32>, y: &mut CudaSlice<f32>, b: i32, h: i32, w: i32, cin: i32,
        cout: i32, k: i32, kp: i32, has_bvec: i32, has_res: i32, tiles_per_split: i32,
    );
    igemm2_reduce in "igemm2": (
        part: &CudaSlice<f32>, bias: &CudaSlice<f32>, bvec: &CudaSlice<f32>,
        res: &CudaSlice<f32>, y: &mut CudaSlice<f32>, mn: u64, cout: i32, hw: i32, splits: i32,
        has_bvec: i32, has_res: i32,
    );
    // igemm_{bf16,f16,tf32x3,tf32}_{same,up,down}_{v,s}: the IGEMM_KERNEL list.
    igemm[kernel] in "igemm": (
        x: &CudaSlice<f32>, wt: &super::igemm::PackedBuf, bias: &CudaSlice<f32>,
        affine: &CudaSlice<f32>, bvec: &CudaSlice<f32>, res: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>, b: i32, h: i32, w: i32, cin: i32, cout: i32, k: i32, kp: i32,
        has_affine: i32, silu: i32, has_bvec: i32, has_res: i32, x2: &CudaSlice<f32>, c1: i32,
    );
}

/// The launchers of the lab's kernels (`kernels/lab/`, compiled only with the `lab` feature),
/// which the CUDA reference backend runs.
#[cfg(feature = "lab")]
pub(crate) mod lab {
    #[cfg(test)]
    use super::TableEntry;
    use super::{launch, Gpu};
    use anyhow::Result;
    use cudarc::driver::{CudaSlice, LaunchConfig};

    declare_kernels! {
        im2col in "conv": (
            x: &CudaSlice<f32>, cols: &mut CudaSlice<f32>, p0: u64, np: u64, h: u64, w: u64, cin: u64,
            k: u64,
        );
        broadcast_rows in "conv": (y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: u64, c: u64);

        attn_fwd in "attention": (
            qkv: &CudaSlice<f32>, out: &mut CudaSlice<f32>, b: u32, t: u32, c: u32, heads: u32,
            legacy: i32, s: f32,
        );
        attn_bwd_rows in "attention": (
            qkv: &CudaSlice<f32>, dout: &CudaSlice<f32>, dqkv: &mut CudaSlice<f32>,
            rowstats: &mut CudaSlice<f32>, b: u32, t: u32, c: u32, heads: u32, legacy: i32, s: f32,
        );
        attn_bwd_cols in "attention": (
            qkv: &CudaSlice<f32>, dout: &CudaSlice<f32>, rowstats: &CudaSlice<f32>,
            dqkv: &mut CudaSlice<f32>, b: u32, t: u32, c: u32, heads: u32, legacy: i32, s: f32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::TABLE;
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    /// The Rust type a kernel parameter of C type `c` takes in the table.
    fn rust_type(c: &str) -> String {
        let c = c.replace("__restrict__", "");
        let words: Vec<&str> = c.split_whitespace().collect();
        let c = words
            .join(" ")
            .replace(" *", "*")
            .replace("unsigned int", "unsigned");
        let elem = |t: &str| match t {
            "float" => "f32",
            "double" => "f64",
            "unsigned" => "u32",
            "unsigned short" => "u16",
            other => panic!("no Rust element type for C `{other}`"),
        };
        match c.as_str() {
            "const void*" => "&super::igemm::PackedBuf".to_string(),
            "float" => "f32".to_string(),
            "int" => "i32".to_string(),
            "unsigned" => "u32".to_string(),
            "unsigned long long" => "u64".to_string(),
            p if p.starts_with("const ") && p.ends_with('*') => {
                format!("&CudaSlice<{}>", elem(&p[6..p.len() - 1]))
            }
            p if p.ends_with('*') => format!("&mutCudaSlice<{}>", elem(&p[..p.len() - 1])),
            other => panic!("no Rust type for C `{other}`"),
        }
    }

    /// `(name, type)` of a C parameter list.
    fn params(list: &str) -> Vec<(String, String)> {
        list.split(',')
            .map(|p| {
                let p = p.trim();
                let at = p
                    .rfind(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                    .unwrap()
                    + 1;
                (p[at..].to_string(), rust_type(&p[..at]))
            })
            .collect()
    }

    /// Every `extern "C"` kernel of a `.cu` source with its parameters; a kernel declared by a
    /// `#define` is expanded for each use of the macro.
    fn kernels(src: &str) -> BTreeMap<String, Vec<(String, String)>> {
        let src = src.replace("\\\n", " ");
        let mut out = BTreeMap::new();
        for (at, _) in src.match_indices("extern \"C\" __global__ void") {
            let rest = &src[at..];
            let open = rest.find('(').unwrap();
            let mut head = &rest[..open];
            let mut body = &rest[open..];
            if head.trim_end().ends_with("__launch_bounds__") {
                let close = body.find(')').unwrap();
                body = &body[close + 1..];
                let open = body.find('(').unwrap();
                head = &body[..open];
                body = &body[open..];
            }
            let name = head.split_whitespace().last().unwrap().to_string();
            let list = params(&body[1..body.find(')').unwrap()]);
            let define = src[..at].rfind("#define ").map(|d| &src[d + 8..at]);
            match define
                .and_then(|d| d.split_once('('))
                .filter(|(m, _)| !m.contains('\n'))
            {
                Some((mac, _)) if name == "NAME" => {
                    for (use_at, _) in src.match_indices(&format!("{mac}(")) {
                        let arg = &src[use_at + mac.len() + 1..];
                        let kernel = arg[..arg.find(',').unwrap()].trim();
                        if kernel != "NAME" {
                            out.insert(kernel.to_string(), list.clone());
                        }
                    }
                }
                _ => {
                    out.insert(name, list);
                }
            }
        }
        out
    }

    /// `(module, its folder)` of the `.cu` files of `dir`.
    fn modules(dir: &Path) -> Vec<(String, PathBuf)> {
        let mut modules: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".cu")?.to_string();
                Some((name, dir.to_path_buf()))
            })
            .collect();
        modules.sort();
        modules
    }

    #[test]
    fn the_table_matches_every_kernel_of_the_cu_sources() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut modules = modules(&dir);
        let mut all: Vec<&'static super::TableEntry> = TABLE.iter().collect();
        #[cfg(feature = "lab")]
        {
            modules.extend(self::modules(&dir.join("lab")));
            all.extend(super::lab::TABLE);
        }
        let table = |m: &str| {
            all.iter()
                .copied()
                .filter(move |e| e.2 == m)
                .collect::<Vec<_>>()
        };
        let as_strings = |ps: &[(&str, &str)]| -> Vec<(String, String)> {
            ps.iter()
                .map(|(n, t)| (n.to_string(), t.replace(' ', "")))
                .collect()
        };
        let mut covered = 0;
        for (m, dir) in &modules {
            let src = std::fs::read_to_string(dir.join(format!("{m}.cu"))).unwrap();
            let found = kernels(&src);
            assert!(!found.is_empty(), "{m}.cu: no kernels found");
            for (kernel, ps) in &found {
                let fits = table(m)
                    .iter()
                    .any(|e| (e.0 == kernel || e.1) && as_strings(e.3) == *ps);
                assert!(
                    fits,
                    "{m}.cu: kernel {kernel}{ps:?} has no entry in the launch table with its parameters"
                );
                covered += 1;
            }
            for e in table(m).iter().filter(|e| !e.1) {
                assert!(
                    found.contains_key(e.0),
                    "launch table: no kernel {} in {m}.cu",
                    e.0
                );
            }
            for e in table(m).iter().filter(|e| e.1) {
                assert!(
                    found.values().any(|ps| as_strings(e.3) == *ps),
                    "launch table: family {} fits no kernel of {m}.cu",
                    e.0
                );
            }
        }
        assert!(all.iter().all(|e| modules.iter().any(|(m, _)| m == e.2)));
        assert!(covered >= 40, "only {covered} kernels found");
    }
}
