//! Throughput accounting: model FLOP utilisation (MFU) against a small table of known devices
//! (FLOPs per token are `LlamaConfig::flops_per_token`), and peak memory (device memory on a GPU,
//! resident set size on the CPU).

use kiln_recipes::Precision;

use crate::device::Device;

/// Known GPUs, by a substring of the name the driver reports: (name, dense f32 FLOP/s, dense
/// bf16/f16 tensor-core FLOP/s, board power in W). From the vendors' data sheets (no sparsity).
const GPUS: &[(&str, f64, f64, f64)] = &[
    ("H200", 67e12, 989e12, 700.0),
    ("H100 PCIe", 51e12, 756e12, 350.0),
    ("H100", 67e12, 989e12, 700.0), // SXM (HBM3)
    ("A100", 19.5e12, 312e12, 400.0),
    ("L40S", 91.6e12, 362e12, 350.0),
    ("L4", 30.3e12, 121e12, 72.0),
    ("A10G", 31.2e12, 70e12, 150.0),
    ("A10", 31.2e12, 125e12, 150.0),
    ("RTX 4090", 82.6e12, 165e12, 450.0),
    ("RTX 3090", 35.6e12, 71e12, 350.0),
    ("V100", 15.7e12, 125e12, 300.0),
    ("T4", 8.1e12, 65e12, 70.0),
];

fn known_gpu(name: &str) -> Option<&'static (&'static str, f64, f64, f64)> {
    GPUS.iter().find(|g| name.contains(g.0))
}

/// The board power (TDP) of a known GPU, for the energy estimate when NVML cannot read it.
pub fn board_watts(gpu: &str) -> Option<f64> {
    known_gpu(gpu).map(|g| g.3)
}

/// The energy meters' view of the run's GPU; `None` on the CPU.
pub fn gpu_info(dev: &Device) -> Option<kiln_evals::energy::GpuInfo> {
    dev.gpu_name().map(|n| kiln_evals::energy::GpuInfo { name: n.to_string(), tdp_watts: board_watts(n) })
}

/// Peak FLOP/s for `precision` on a known GPU; `None` on the CPU or an unknown device (MFU is
/// then reported as null, not guessed).
pub fn peak_flops(gpu: Option<&str>, precision: Precision) -> Option<f64> {
    let &(_, f32_peak, half_peak, _) = known_gpu(gpu?)?;
    Some(if precision.is_half() { half_peak } else { f32_peak })
}

/// `KILN_STEP_SYNC=1`: read the loss after the forward pass and the gradient norm before the
/// update, so that `forward_s`, `backward_s` and `optim_s` are each phase's device time on a GPU.
/// By default a step reads both at its end: the GPU is never left waiting for the host mid-step,
/// and the three figures are host time (the GPU's work mostly lands in `optim_s`).
pub fn step_sync() -> bool {
    std::env::var("KILN_STEP_SYNC").is_ok_and(|v| v == "1")
}

/// Model FLOP utilisation: achieved FLOP/s over the device's peak.
pub fn mfu(flops_per_token: f64, tokens_per_s: f64, peak: Option<f64>) -> Option<f64> {
    peak.map(|p| flops_per_token * tokens_per_s / p)
}

/// The process's peak resident set size in bytes (`VmHWM`), on Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This machine's memory in bytes (`MemTotal`), on Linux.
pub fn machine_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The memory a run has room for: a CUDA GPU's (through NVML), the machine's on the CPU backends;
/// `None` where it cannot be known before the backend starts (wgpu, or no NVML).
pub fn memory_capacity(dev: &Device) -> Option<u64> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda { index, .. } => kiln_evals::energy::nvml_total_memory(*index as u32),
        Device::Flex | Device::NdArray => machine_memory_bytes(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Device memory reserved by Burn's allocator on a GPU (it keeps its pages, so this is also
/// the peak reserved, as `torch.cuda.max_memory_reserved` reports); `None` on the CPU.
pub fn device_memory_bytes(dev: &Device) -> Option<u64> {
    match dev {
        #[cfg(feature = "wgpu")]
        Device::Wgpu { kind, index, .. } => {
            use cubecl::Runtime;
            let d = Device::wgpu_device(*kind, *index);
            cubecl::wgpu::WgpuRuntime::client(&d).memory_usage().ok().map(|u| u.bytes_reserved)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda { index, .. } => {
            use cubecl::Runtime;
            let d = cubecl::cuda::CudaDevice { index: *index };
            cubecl::cuda::CudaRuntime::client(&d).memory_usage().ok().map(|u| u.bytes_reserved)
        }
        _ => None,
    }
}

/// Peak memory and what it measures: `("device", bytes)` on a GPU, `("rss", bytes)` on the CPU.
pub fn peak_memory(dev: &Device) -> Option<(&'static str, u64)> {
    match device_memory_bytes(dev) {
        Some(b) => Some(("device", b)),
        None => peak_rss_bytes().map(|b| ("rss", b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_match_the_reference_formula() {
        // bench-cpu: 869,760 parameters (torch_reference.py's count), 4 layers, d 128, context 64.
        let cfg = kiln_models::presets::preset("bench-cpu", 65).unwrap();
        assert_eq!(cfg.num_params(), 869_760);
        assert_eq!(cfg.max_position_embeddings, 64);
        assert_eq!(cfg.flops_per_token(), 6.0 * 869_760.0 + 12.0 * 4.0 * 128.0 * 64.0);
    }

    #[test]
    fn mfu_table() {
        assert_eq!(peak_flops(Some("NVIDIA H100 80GB HBM3"), Precision::Bf16Mixed), Some(989e12));
        assert_eq!(peak_flops(Some("NVIDIA H100 PCIe"), Precision::F32), Some(51e12));
        assert_eq!(peak_flops(Some("NVIDIA L4"), Precision::F32), Some(30.3e12));
        assert_eq!(peak_flops(None, Precision::F32), None);
        assert_eq!(peak_flops(Some("llvmpipe (LLVM 15.0.6, 256 bits)"), Precision::F32), None);
        let m = mfu(1e9, 100_000.0, Some(989e12)).unwrap();
        assert!((m - 1e14 / 989e12).abs() < 1e-12);
        assert!(peak_rss_bytes().unwrap() > 1_000_000);
    }
}
