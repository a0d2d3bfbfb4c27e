//! Choosing the compute device: `cpu` (flex), `ndarray`, `wgpu[:N]`, `cuda[:N]`, or `auto`.
//!
//! `auto` picks CUDA when the driver loads and reports a device, else a hardware wgpu adapter,
//! else the CPU. A software adapter (lavapipe, llvmpipe, SwiftShader, any CPU-type adapter)
//! never wins over the CPU backend: it trains about 20 times slower. Probing never panics: the
//! CUDA driver is opened with `dlopen` and asked for its device count, and wgpu adapters are
//! listed before Burn is asked for one.

use anyhow::{bail, Result};
use kiln_recipes::DeviceSpec;

/// A resolved device. `name` is what the logs, the manifest and the report call it.
#[derive(Debug, Clone, PartialEq)]
pub enum Device {
    Flex,
    NdArray,
    /// The `index`-th adapter of its kind (`kind` as wgpu reports it).
    #[cfg(feature = "wgpu")]
    Wgpu { kind: WgpuKind, index: usize, name: String },
    #[cfg(feature = "cuda")]
    Cuda { index: usize, name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgpuKind {
    Discrete,
    Integrated,
    Virtual,
    Cpu,
    Other,
}

impl Device {
    /// The backend's short name: `flex`, `ndarray`, `wgpu`, `cuda`.
    pub fn backend(&self) -> &'static str {
        match self {
            Device::Flex => "flex",
            Device::NdArray => "ndarray",
            #[cfg(feature = "wgpu")]
            Device::Wgpu { .. } => "wgpu",
            #[cfg(feature = "cuda")]
            Device::Cuda { .. } => "cuda",
        }
    }
    /// A description for logs and reports: the backend and, on a GPU, the adapter's name.
    pub fn describe(&self) -> String {
        match self {
            #[cfg(feature = "wgpu")]
            Device::Wgpu { name, kind, .. } => format!("wgpu ({name}, {kind:?})"),
            #[cfg(feature = "cuda")]
            Device::Cuda { index, name } => format!("cuda:{index} ({name})"),
            other => other.backend().to_string(),
        }
    }
    /// The device's name, for the MFU table (`None` on the CPU).
    pub fn gpu_name(&self) -> Option<&str> {
        match self {
            #[cfg(feature = "wgpu")]
            Device::Wgpu { name, .. } => Some(name),
            #[cfg(feature = "cuda")]
            Device::Cuda { name, .. } => Some(name),
            _ => None,
        }
    }
    #[cfg(feature = "wgpu")]
    pub fn wgpu_device(kind: WgpuKind, index: usize) -> burn::backend::wgpu::WgpuDevice {
        use burn::backend::wgpu::WgpuDevice as W;
        match kind {
            WgpuKind::Discrete => W::DiscreteGpu(index),
            WgpuKind::Integrated => W::IntegratedGpu(index),
            WgpuKind::Virtual => W::VirtualGpu(index),
            WgpuKind::Cpu => W::Cpu,
            WgpuKind::Other => W::DefaultDevice,
        }
    }
}

/// Resolves `--device` / `train.device` (parsed by the recipe schema) against this machine.
pub fn resolve(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Flex),
        DeviceSpec::NdArray => {
            tracing::warn!("ndarray's own ops are not bit-reproducible: with train.cpu_kernels = false or mixed precision, a resumed run will not match an uninterrupted one exactly");
            Ok(Device::NdArray)
        }
        DeviceSpec::Auto => Ok(auto()),
        DeviceSpec::Wgpu(i) => wgpu_device(i),
        DeviceSpec::Cuda(i) => cuda_device(i.unwrap_or(0)),
    }
}

/// `auto`: CUDA, else a hardware wgpu adapter, else the CPU; the choice is logged.
pub fn auto() -> Device {
    #[cfg(feature = "cuda")]
    match cuda_probe() {
        Ok(names) if !names.is_empty() => {
            let d = Device::Cuda { index: 0, name: names[0].clone() };
            tracing::info!("device auto: {} (CUDA driver found, {} device(s))", d.describe(), names.len());
            return d;
        }
        Ok(_) => tracing::info!("device auto: the CUDA driver reports no device"),
        Err(why) => tracing::info!("device auto: no CUDA ({why})"),
    }
    #[cfg(feature = "wgpu")]
    {
        let adapters = wgpu_adapters();
        if let Some(a) = adapters.iter().find(|a| !a.software) {
            let d = Device::Wgpu { kind: a.kind, index: a.index_of_kind, name: a.name.clone() };
            tracing::info!("device auto: {} (hardware wgpu adapter)", d.describe());
            return d;
        }
        if let Some(a) = adapters.first() {
            tracing::info!("device auto: cpu (flex); the only wgpu adapter, {}, is a software renderer, about 20x slower than the CPU backend", a.name);
            return Device::Flex;
        }
    }
    tracing::info!("device auto: cpu (flex)");
    Device::Flex
}

// ---------------------------------------------------------------------------------------------
// wgpu

#[cfg(feature = "wgpu")]
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub kind: WgpuKind,
    /// Its index among adapters of the same kind (how Burn's `WgpuDevice` numbers them).
    pub index_of_kind: usize,
    /// lavapipe, llvmpipe, SwiftShader, or any CPU-type adapter.
    pub software: bool,
    pub backend: String,
}

/// The adapters Burn's wgpu backend can use (the platform's default graphics API: Vulkan on Linux).
#[cfg(feature = "wgpu")]
pub fn wgpu_adapters() -> Vec<Adapter> {
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    let backend = AutoGraphicsApi::backend();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let list = futures_executor::block_on(instance.enumerate_adapters(backend.into()));
    let mut counts = std::collections::HashMap::new();
    list.into_iter()
        .map(|a| {
            let info = a.get_info();
            let kind = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => WgpuKind::Discrete,
                wgpu::DeviceType::IntegratedGpu => WgpuKind::Integrated,
                wgpu::DeviceType::VirtualGpu => WgpuKind::Virtual,
                wgpu::DeviceType::Cpu => WgpuKind::Cpu,
                wgpu::DeviceType::Other => WgpuKind::Other,
            };
            let n = counts.entry(kind).or_insert(0usize);
            let index_of_kind = *n;
            *n += 1;
            let lower = info.name.to_lowercase();
            let software = kind == WgpuKind::Cpu || ["llvmpipe", "lavapipe", "swiftshader", "softpipe"].iter().any(|s| lower.contains(s));
            Adapter { name: info.name, kind, index_of_kind, software, backend: format!("{:?}", info.backend) }
        })
        .collect()
}

#[cfg(feature = "wgpu")]
fn wgpu_device(index: Option<usize>) -> Result<Device> {
    let adapters = wgpu_adapters();
    if adapters.is_empty() {
        bail!("device wgpu: no wgpu adapter found\n  hint: install a Vulkan driver (on Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1), or use --device cpu");
    }
    // `wgpu` alone: the first hardware adapter, else the first of any kind.
    let a = match index {
        Some(i) => adapters.get(i).cloned().ok_or_else(|| {
            anyhow::anyhow!("device wgpu:{i}: there are {} adapters: {}", adapters.len(), adapters.iter().enumerate().map(|(i, a)| format!("{i}: {}", a.name)).collect::<Vec<_>>().join(", "))
        })?,
        None => adapters.iter().find(|a| !a.software).unwrap_or(&adapters[0]).clone(),
    };
    if a.software {
        tracing::warn!("wgpu adapter {} is a software renderer: expect training about 20x slower than --device cpu", a.name);
    }
    Ok(Device::Wgpu { kind: a.kind, index: a.index_of_kind, name: a.name })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_index: Option<usize>) -> Result<Device> {
    bail!("device wgpu: this kiln was built without the wgpu feature\n  hint: cargo build --release --features wgpu")
}

// ---------------------------------------------------------------------------------------------
// GPU kernel caches

/// Burn's GPU backends (CubeCL) compile every kernel at run time and autotune matmuls and
/// reductions on first use. On a new GPU that is minutes (an H200 spent over five minutes before
/// its first bench-gpu steps; with the autotune results cached, the first step still took 27 s of
/// compilation). CubeCL can keep both, but by default it keeps no compiled kernels and puts the
/// autotune results under whatever Cargo project the working directory is in. Kiln keeps both
/// under `cache_root/cubecl/<device name>` (one folder per GPU model, so that code compiled for
/// one architecture is never loaded on another), so later runs on that GPU skip both.
///
/// A `cubecl.toml` or `burn.toml` in the working directory or above is the user's own CubeCL
/// configuration: it is left to apply untouched (and `None` is returned). Call this before the
/// first GPU tensor is made: CubeCL reads its configuration once per process. Returns the folder.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn configure_kernel_cache(dev: &Device, cache_root: &std::path::Path) -> Option<std::path::PathBuf> {
    use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    let name = match dev {
        #[cfg(feature = "wgpu")]
        Device::Wgpu { name, .. } => format!("wgpu-{name}"),
        #[cfg(feature = "cuda")]
        Device::Cuda { name, .. } => format!("cuda-{name}"),
        _ => return None,
    };
    if let Some(own) = cubecl_config_file() {
        tracing::info!("GPU kernel caches: as {} says", own.display());
        return None;
    }
    let folder: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    let root = cache_root.join("cubecl").join(folder);
    let mut cfg = CubeClRuntimeConfig::default().override_from_env(); // CUBECL_* variables still apply
    cfg.compilation.cache = Some(CacheConfig::File(root.clone()));
    cfg.autotune.cache = CacheConfig::File(root.clone());
    // Set it only if CubeCL has not read its configuration yet (it reads it once).
    let mut slot = CubeClRuntimeConfig::storage().lock();
    if slot.is_some() {
        return None;
    }
    *slot = Some(std::sync::Arc::new(cfg));
    Some(root)
}

/// The first `cubecl.toml`, `CubeCL.toml`, `burn.toml` or `Burn.toml` in the working directory or
/// above: where CubeCL would read its configuration from.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn cubecl_config_file() -> Option<std::path::PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        for n in ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"] {
            if dir.join(n).is_file() {
                return Some(dir.join(n));
            }
        }
        if !dir.pop() {
            return None;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA

/// The CUDA devices' names, by asking the driver (`libcuda.so.1`, loaded at run time), or why
/// there are none. Burn's CUDA backend also needs NVRTC (`libnvrtc.so`) at run time.
#[cfg(feature = "cuda")]
pub fn cuda_probe() -> std::result::Result<Vec<String>, String> {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type Count = unsafe extern "C" fn(*mut i32) -> i32;
    type Get = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type Name = unsafe extern "C" fn(*mut std::os::raw::c_char, i32, i32) -> i32;
    let names = if cfg!(windows) { &["nvcuda.dll"][..] } else { &["libcuda.so.1", "libcuda.so"][..] };
    // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what the CUDA
    // backend does too; the symbols are called with their documented C signatures.
    unsafe {
        let lib = names
            .iter()
            .find_map(|n| libloading::Library::new(n).ok())
            .ok_or_else(|| "no NVIDIA driver library (libcuda.so.1)".to_string())?;
        let init: libloading::Symbol<Init> = lib.get(b"cuInit\0").map_err(|e| e.to_string())?;
        let count: libloading::Symbol<Count> = lib.get(b"cuDeviceGetCount\0").map_err(|e| e.to_string())?;
        let get: libloading::Symbol<Get> = lib.get(b"cuDeviceGet\0").map_err(|e| e.to_string())?;
        let name: libloading::Symbol<Name> = lib.get(b"cuDeviceGetName\0").map_err(|e| e.to_string())?;
        let r = init(0);
        if r != 0 {
            return Err(format!("cuInit failed with CUDA error {r}"));
        }
        let mut n = 0i32;
        if count(&mut n) != 0 {
            return Err("cuDeviceGetCount failed".into());
        }
        let mut out = Vec::new();
        for i in 0..n {
            let mut dev = 0i32;
            let mut buf = [0 as std::os::raw::c_char; 256];
            let label = if get(&mut dev, i) == 0 && name(buf.as_mut_ptr(), 256, dev) == 0 {
                std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
            } else {
                format!("CUDA device {i}")
            };
            out.push(label);
        }
        // Keep the library loaded for the process: the backend will use it.
        std::mem::forget(lib);
        if !out.is_empty() {
            cuda_compiler_check()?;
        }
        Ok(out)
    }
}

/// Burn's CUDA backend compiles its kernels at run time with NVRTC, against CUDA's headers
/// (`$CUDA_PATH/include`, else `/usr/local/cuda/include`); without either it would panic at the
/// first kernel. Checked here so that `cuda` fails with a hint and `auto` moves on.
#[cfg(feature = "cuda")]
fn cuda_compiler_check() -> std::result::Result<(), String> {
    let nvrtc = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11"];
    // SAFETY: loading NVRTC only runs its initialisers; the handle is dropped (the backend loads it again).
    let found = nvrtc.iter().any(|n| unsafe { libloading::Library::new(n) }.is_ok());
    if !cfg!(windows) && !found {
        return Err("the driver is there but NVRTC is not (no libnvrtc.so on the library path); Burn's CUDA backend compiles its kernels with it at run time\n  hint: install CUDA's nvrtc (e.g. the cuda-nvrtc package, or pip's nvidia-cuda-nvrtc) and add its lib folder to LD_LIBRARY_PATH".into());
    }
    match cubecl::cuda::install::cuda_path() {
        Some(p) if p.join("include").is_dir() => Ok(()),
        Some(p) => Err(format!("no CUDA headers in {}/include; Burn's CUDA backend compiles its kernels against them\n  hint: point CUDA_PATH at a CUDA installation with include/", p.display())),
        None => Err("no CUDA headers (CUDA_PATH is unset and there is no /usr/local/cuda or /opt/cuda); Burn's CUDA backend compiles its kernels against them at run time\n  hint: install CUDA's headers and NVRTC (the toolkit, or cuda-nvrtc and cuda-cudart-dev) and set CUDA_PATH".into()),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device> {
    match cuda_probe() {
        Ok(names) if index < names.len() => Ok(Device::Cuda { index, name: names[index].clone() }),
        Ok(names) => bail!("device cuda:{index}: the driver reports {} CUDA device(s)", names.len()),
        Err(why) if why.contains("hint:") => bail!("device cuda:{index}: {why}"),
        Err(why) => bail!("device cuda:{index}: {why}\n  hint: install the NVIDIA driver (Kiln needs no CUDA toolkit to build; to run, the driver, NVRTC and CUDA's headers), or use --device cpu"),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_index: usize) -> Result<Device> {
    bail!("device cuda: this kiln was built without the cuda feature\n  hint: cargo build --release --features cuda")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        let r = |s: &str| resolve(s.parse().unwrap()).unwrap();
        assert_eq!(r("cpu"), Device::Flex);
        assert_eq!(r("flex"), Device::Flex);
        assert_eq!(r("ndarray"), Device::NdArray);
    }

    #[test]
    fn auto_never_picks_a_software_adapter() {
        let d = auto();
        #[cfg(feature = "wgpu")]
        if let Device::Wgpu { name, kind, .. } = &d {
            assert_ne!(*kind, WgpuKind::Cpu, "{name}");
            let l = name.to_lowercase();
            assert!(!l.contains("llvmpipe") && !l.contains("lavapipe"), "{name}");
        }
        println!("auto picked {}", d.describe());
    }
}
