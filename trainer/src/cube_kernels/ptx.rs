//! Kiln's CubeCL kernels compile for CUDA, checked without a GPU: each kernel's definition goes
//! through cubecl-cuda's compiler to CUDA C++ (what the CUDA backend generates at run time), and
//! that through NVRTC to PTX for sm_90a (H100/H200), with cubecl-cuda's own NVRTC options.
//!
//! `#[cube(launch_unchecked)]` makes a kernel's definition from a live client, so the test builds
//! each definition as the macro's `define()` does: the parameters registered in order (inputs,
//! outputs, scalars), the kernel's `expand` over them, the launch's cube size.
//!
//! NVRTC comes from the Python environment's NVIDIA wheels (torch's `nvidia-cuda-nvrtc`, and
//! `cuda_runtime.h` from the runtime wheel; wmma's `crt/mma.h` from Triton's copy of the
//! toolkit's headers), found through `KILN_PYTHON`. Without them the test skips (need `nvrtc`;
//! `.ci/run` requires it).

use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::prelude::*;
use cubecl::{Compiler, ExecutionMode};

use crate::cube_kernels::ROW_UNITS;

/// A kernel's parameters as `define()` registers them: `&Array<f32>` inputs, `&mut` outputs.
struct Params {
    b: KernelBuilder,
}

impl Params {
    fn new() -> Self {
        let mut b = KernelBuilder::default();
        b.runtime_properties(CudaRuntime::target_properties());
        AddressType::U32.register(&mut b.scope);
        Params { b }
    }
    fn input<T: CubePrimitive>(&mut self) -> <Array<T> as CubeType>::ExpandType {
        <Array<T> as LaunchArg>::expand(&ArrayCompilationArg { inplace: None }, &mut self.b)
    }
    fn output(&mut self) -> <Array<f32> as CubeType>::ExpandType {
        self.output_of::<f32>()
    }
    fn output_of<T: CubePrimitive>(&mut self) -> <Array<T> as CubeType>::ExpandType {
        <Array<T> as LaunchArg>::expand_output(&ArrayCompilationArg { inplace: None }, &mut self.b)
    }
    fn u32(&mut self) -> <u32 as CubeType>::ExpandType {
        <u32 as LaunchArg>::expand(&(), &mut self.b)
    }
    fn f32(&mut self) -> <f32 as CubeType>::ExpandType {
        <f32 as LaunchArg>::expand(&(), &mut self.b)
    }
    fn build(self, name: &str, units: u32) -> KernelDefinition {
        self.build_dim(name, CubeDim::new_1d(units))
    }
    fn build_dim(self, name: &str, dim: CubeDim) -> KernelDefinition {
        self.b.build(KernelSettings::default().cube_dim(dim).address_type(AddressType::U32).kernel_name(name))
    }
}

/// Every kernel of `cube_kernels/` and `optim_cube.rs`, defined as its launch does.
fn definitions() -> Vec<KernelDefinition> {
    use super::{loss, norm, swiglu};
    let mut defs = Vec::new();

    let mut p = Params::new();
    let (x, w, y, r, rows, d, eps) = (p.input::<f32>(), p.input::<f32>(), p.output(), p.output(), p.u32(), p.u32(), p.f32());
    norm::forward_kernel::expand(&mut p.b.scope, x, w, y, r, rows, d, eps, ROW_UNITS);
    defs.push(p.build("rms_norm_forward", ROW_UNITS as u32));

    let mut p = Params::new();
    let (x, w, r, dy, dx, rows, d) = (p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.output(), p.u32(), p.u32());
    norm::backward_kernel::expand(&mut p.b.scope, x, w, r, dy, dx, rows, d, ROW_UNITS);
    defs.push(p.build("rms_norm_backward", ROW_UNITS as u32));

    let mut p = Params::new();
    let (x, r, dy, partial, rows, d) = (p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.output(), p.u32(), p.u32());
    norm::weight_grad_kernel::expand(&mut p.b.scope, x, r, dy, partial, rows, d, norm::CHUNK);
    defs.push(p.build("rms_norm_weight_grad", 256));

    let mut p = Params::new();
    let (g, u, h) = (p.input::<f32>(), p.input::<f32>(), p.output());
    swiglu::forward_kernel::expand(&mut p.b.scope, g, u, h);
    defs.push(p.build("swiglu_forward", 256));

    let mut p = Params::new();
    let (g, u, dh, dg, du) = (p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.output(), p.output());
    swiglu::backward_kernel::expand(&mut p.b.scope, g, u, dh, dg, du);
    defs.push(p.build("swiglu_backward", 256));

    let mut p = Params::new();
    let (x, y, w, lse, term, rows, v) = (p.input::<f32>(), p.input::<i32>(), p.input::<f32>(), p.output(), p.output(), p.u32(), p.u32());
    loss::forward_kernel::expand(&mut p.b.scope, x, y, w, lse, term, rows, v, ROW_UNITS);
    defs.push(p.build("cross_entropy_forward", ROW_UNITS as u32));

    let mut p = Params::new();
    let (x, y, lse, w, g, dx, v) = (p.input::<f32>(), p.input::<i32>(), p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.output(), p.u32());
    loss::backward_kernel::expand(&mut p.b.scope, x, y, lse, w, g, dx, v);
    defs.push(p.build("cross_entropy_backward", 256));

    let mut p = Params::new();
    let (pp, g, m, v, scale) = (p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.input::<f32>());
    let (po, mo, vo) = (p.output(), p.output(), p.output());
    let (lr, shrink, b1, b2, k1, k2, e) = (p.f32(), p.f32(), p.f32(), p.f32(), p.f32(), p.f32(), p.f32());
    crate::optim_cube::adamw_kernel::expand(&mut p.b.scope, pp, g, m, v, scale, po, mo, vo, lr, shrink, b1, b2, k1, k2, e);
    defs.push(p.build("adamw", 256));

    let mut p = Params::new();
    let (y, h, f) = (p.input::<f32>(), p.output(), p.u32());
    swiglu::joined_forward_kernel::expand(&mut p.b.scope, y, h, f);
    defs.push(p.build("swiglu_joined_forward", 256));

    let mut p = Params::new();
    let (y, dh, dy, f) = (p.input::<f32>(), p.input::<f32>(), p.output(), p.u32());
    swiglu::joined_backward_kernel::expand(&mut p.b.scope, y, dh, dy, f);
    defs.push(p.build("swiglu_joined_backward", 256));

    let mut p = Params::new();
    let (y, cos, sin, out) = (p.input::<f32>(), p.input::<f32>(), p.input::<f32>(), p.output());
    let (t, nh, hd, rot, cb, sign) = (p.u32(), p.u32(), p.u32(), p.u32(), p.u32(), p.f32());
    super::rope::rope_kernel::expand(&mut p.b.scope, y, cos, sin, out, t, nh, hd, rot, cb, sign);
    defs.push(p.build("rope", 256));

    // Flash attention at bench-gpu's head dim (64) and at 128, with each one's tile for an H100
    // (`attention::tile` with 227 KiB of shared memory a block).
    defs.extend(attention_definitions::<f32>("f32"));
    defs.extend(attention_definitions::<burn::tensor::bf16>("bf16"));
    // The tensor-core kernels: bf16 at both head dims, f16 at 64.
    defs.extend(mma_definitions::<burn::tensor::bf16>("bf16", &[64, 128]));
    defs.extend(mma_definitions::<burn::tensor::f16>("f16", &[64]));
    defs
}

/// The tensor-core flash attention's three tiled kernels on element type `F` at head dims `hds`.
fn mma_definitions<F: Float + CubeElement>(ty: &str, hds: &[usize]) -> Vec<KernelDefinition> {
    use super::attention_mma::{self as a, PLANES};
    let dim = CubeDim::new_2d(32, PLANES as u32);
    let mut defs = Vec::new();
    for &hd in hds {
        let name = |k: &str| format!("flash_mma_{k}_{ty}_hd{hd}");

        let mut p = Params::new();
        let (q, k, v, o, lse, t, group, scale) = (p.input::<F>(), p.input::<F>(), p.input::<F>(), p.output_of::<F>(), p.output(), p.u32(), p.u32(), p.f32());
        a::forward_kernel::expand::<F>(&mut p.b.scope, q, k, v, o, lse, t, group, scale, hd);
        defs.push(p.build_dim(&name("forward"), dim));

        let mut p = Params::new();
        let (q, k, v, d_o, lse, delta) = (p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<f32>(), p.input::<f32>());
        let (dk, dv, t, group, scale) = (p.output_of::<F>(), p.output_of::<F>(), p.u32(), p.u32(), p.f32());
        a::backward_kv_kernel::expand::<F>(&mut p.b.scope, q, k, v, d_o, lse, delta, dk, dv, t, group, scale, hd);
        defs.push(p.build_dim(&name("backward_kv"), dim));

        let mut p = Params::new();
        let (q, k, v, d_o, lse, delta) = (p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<f32>(), p.input::<f32>());
        let (dq, t, group, scale) = (p.output_of::<F>(), p.u32(), p.u32(), p.f32());
        a::backward_q_kernel::expand::<F>(&mut p.b.scope, q, k, v, d_o, lse, delta, dq, t, group, scale, hd);
        defs.push(p.build_dim(&name("backward_q"), dim));
    }
    defs
}

/// Flash attention's four kernels on element type `F`, at head dims 64 and 128.
fn attention_definitions<F: Float + CubeElement>(ty: &str) -> Vec<KernelDefinition> {
    use super::attention::{self as a, UNITS};
    let mut defs = Vec::new();
    for hd in [64, 128] {
        let b = a::tile(hd, 227 * 1024);
        let name = |k: &str| format!("flash_{k}_{ty}_hd{hd}_b{b}");

        let mut p = Params::new();
        let (q, k, v, o, lse, t, group, scale) = (p.input::<F>(), p.input::<F>(), p.input::<F>(), p.output_of::<F>(), p.output(), p.u32(), p.u32(), p.f32());
        a::forward_kernel::expand::<F>(&mut p.b.scope, q, k, v, o, lse, t, group, scale, hd, b);
        defs.push(p.build(&name("forward"), UNITS as u32));

        let mut p = Params::new();
        let (o, d_o, delta, hdv) = (p.input::<F>(), p.input::<F>(), p.output(), p.u32());
        a::delta_kernel::expand::<F>(&mut p.b.scope, o, d_o, delta, hdv);
        defs.push(p.build(&name("delta"), 256));

        let mut p = Params::new();
        let (q, k, v, d_o, lse, delta) = (p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<f32>(), p.input::<f32>());
        let (dk, dv, t, group, scale) = (p.output_of::<F>(), p.output_of::<F>(), p.u32(), p.u32(), p.f32());
        a::backward_kv_kernel::expand::<F>(&mut p.b.scope, q, k, v, d_o, lse, delta, dk, dv, t, group, scale, hd, b);
        defs.push(p.build(&name("backward_kv"), UNITS as u32));

        let mut p = Params::new();
        let (q, k, v, d_o, lse, delta) = (p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<F>(), p.input::<f32>(), p.input::<f32>());
        let (dq, t, group, scale) = (p.output_of::<F>(), p.u32(), p.u32(), p.f32());
        a::backward_q_kernel::expand::<F>(&mut p.b.scope, q, k, v, d_o, lse, delta, dq, t, group, scale, hd, b);
        defs.push(p.build(&name("backward_q"), UNITS as u32));
    }
    defs
}

/// CUDA C++ for `def`, with the options cubecl-cuda sets for a compute-capability 9.0 device.
fn cuda_source(def: KernelDefinition) -> String {
    let mut o: <CudaCompiler as Compiler>::CompilationOptions = Default::default();
    o.warp_size = 32;
    o.supports_features.fast_math = true;
    o.supports_features.grid_constants = true;
    o.supports_features.fast_tanh = true;
    o.supports_features.clusters = true;
    o.supports_features.elect_sync = true;
    match CudaCompiler::default().compile(def, &o, ExecutionMode::Unchecked, AddressType::U32.unsigned_type()) {
        Ok(c) => c.to_string(),
        Err(e) => panic!("cubecl-cuda refused a kernel: {e:?}"),
    }
}

/// NVRTC's library and the include folders, from `KILN_PYTHON`'s NVIDIA wheels: the one holding
/// `cuda_runtime.h`, and where that lacks `crt/mma.h` (wmma's, for the tensor-core kernels; the
/// runtime wheel leaves it to nvcc's), a folder that has it (Triton, which torch brings, ships
/// the toolkit's headers).
fn nvrtc_from_python() -> Result<(String, Vec<String>), String> {
    let py = kiln_models::skip::python_with("site")?;
    let script = r#"
import glob, os, site
sites = site.getsitepackages()
roots = [os.path.join(s, "nvidia") for s in sites]
libs = [l for r in roots for l in sorted(glob.glob(os.path.join(r, "*", "lib", "libnvrtc.so*"))) if "builtins" not in l]
incs = [os.path.dirname(h) for r in roots for h in sorted(glob.glob(os.path.join(r, "*", "include", "cuda_runtime.h")))]
crt = [os.path.dirname(os.path.dirname(h)) for s in sites for pat in ("nvidia/*/include/crt/mma.h", "triton/backends/nvidia/include/crt/mma.h") for h in sorted(glob.glob(os.path.join(s, pat)))]
print(libs[0] if libs else "")
print(incs[0] if incs else "")
print(crt[0] if crt else "")
"#;
    let out = std::process::Command::new(&py).args(["-c", script]).output().map_err(|e| format!("{py}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    match (lines.next(), lines.next(), lines.next()) {
        (Some(lib), Some(inc), Some(crt)) if !lib.is_empty() && !inc.is_empty() && !crt.is_empty() => {
            let mut incs = vec![inc.to_string()];
            if crt != inc {
                incs.push(crt.to_string());
            }
            Ok((lib.to_string(), incs))
        }
        _ => Err(format!("{py}'s environment has no NVIDIA NVRTC wheel with cuda_runtime.h and crt/mma.h (pip install torch: its CUDA wheels bring NVRTC and the runtime's headers, and Triton crt/mma.h)")),
    }
}

#[test]
fn kernels_compile_to_ptx_with_nvrtc() {
    let (lib, includes) = match nvrtc_from_python() {
        Ok(found) => found,
        Err(why) => {
            kiln_models::skip::skip("nvrtc", &format!("{why}; the CubeCL kernels' CUDA compilation not checked"));
            return;
        }
    };
    // Loaded by its path first, so that cudarc's load by name (`libnvrtc.so.13`, ...) finds it.
    // SAFETY: NVRTC's library has no initialisers beyond the C runtime's.
    let _nvrtc = unsafe { libloading::Library::new(&lib) }.unwrap_or_else(|e| panic!("{lib}: {e}"));
    // SAFETY: probes cudarc's library names; the one above is already loaded.
    assert!(unsafe { cudarc::nvrtc::sys::is_culib_present() }, "cudarc does not find {lib} by name");
    let defs = definitions();
    // 11 of the fused ops and AdamW, 16 of flash attention (4 kernels, 2 head dims, 2 types), 9
    // of the tensor-core flash attention (3 kernels: bf16 at 2 head dims, f16 at 1).
    assert_eq!(defs.len(), 36);
    for def in defs {
        let name = def.options.kernel_name.clone();
        let src = cuda_source(def);
        let opts = cudarc::nvrtc::CompileOptions { arch: Some("sm_90a"), include_paths: includes.clone(), options: vec!["-lineinfo".into()], ..Default::default() };
        let ptx = match cudarc::nvrtc::compile_ptx_with_opts(&src, opts) {
            Ok(p) => p.to_src(),
            Err(e) => panic!("{name}: NVRTC: {e:?}\n{src}"),
        };
        assert!(ptx.contains(".entry") && ptx.contains(".target sm_90a"), "{name}: no kernel entry in the PTX:\n{ptx}");
        println!("{name}: {} lines of CUDA C++, {} bytes of PTX", src.lines().count(), ptx.len());
    }
}
