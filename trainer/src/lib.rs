//! kiln-trainer: where recipes, data, models and the training loop are wired together. The
//! `kiln` binary (`main.rs`, `commands/`) is a thin CLI over this library.
//!
//! - `plan.rs`: a recipe and the command line, resolved once into a typed [`plan::Plan`].
//! - `engine/`: the step engines (Burn's autodiff graph, the fused CPU kernels) behind one type.
//! - `trainer.rs`: the loop (step, evaluate, checkpoint, finish); `accounting.rs` and
//!   `progress.rs` report around each step.
//! - `run_dir.rs`, `report.rs`: the run directory (checkpoints, metrics, manifest) and the typed
//!   report (report.json/md/svg, compare).
//! - `optim.rs`, `optim_cube.rs`: AdamW (one formula) and the schedule; the fused GPU update.
//! - `cublaslt.rs`: row-major matmuls as cuBLASLt's column-major arguments, with a CPU emulation.
//! - `lora.rs`: a LoRA run's frozen base and adapters.
//! - `data/`, `hub.rs`, `export.rs`, `dist.rs`, `device.rs`, `perf.rs`: data sources and shards,
//!   the Hugging Face Hub, export, data parallelism, devices, throughput.

pub mod accounting;
pub mod attention_bench;
pub mod cublaslt;
#[cfg(feature = "cuda")]
pub mod cublaslt_cuda;
pub mod data;
pub mod device;
pub mod embedder;
pub mod dist;
pub mod engine;
pub mod export;
pub mod gemm_bench;
pub mod hub;
pub mod lora;
pub mod model_setup;
pub mod optim;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod optim_cube;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube_kernels;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) mod fusion_op;
pub mod perf;
pub mod plan;
pub mod progress;
pub mod report;
pub mod run_dir;
pub mod trainer;

/// Runs `$body` with `$B` bound to the autodiff backend for the resolved device `$dev`
/// (a [`device::Device`]), and `$d` to Burn's device value. The CPU default is flex: on Burn's
/// graph ndarray is about 11% faster on bench-cpu, but its parallel reductions make two identical
/// runs differ in the last bits, which breaks exact resume; flex is bit-reproducible at a fixed
/// thread count (BENCHMARKS.md). With the fused CPU kernels (the default at f32) training is
/// reproducible on both.
#[macro_export]
macro_rules! with_backend {
    ($dev:expr, $B:ident, $d:ident, $body:block) => {
        match &$dev {
            $crate::device::Device::Flex => {
                type $B = burn::backend::Autodiff<burn::backend::Flex>;
                let $d: burn::tensor::Device<$B> = Default::default();
                $body
            }
            $crate::device::Device::NdArray => {
                type $B = burn::backend::Autodiff<burn::backend::NdArray>;
                let $d: burn::tensor::Device<$B> = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::device::Device::Wgpu { kind, index, .. } => {
                type $B = burn::backend::Autodiff<burn::backend::Wgpu>;
                let $d: burn::tensor::Device<$B> = $crate::device::Device::wgpu_device(*kind, *index);
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::device::Device::Cuda { index, .. } => {
                type $B = burn::backend::Autodiff<burn::backend::Cuda>;
                let $d: burn::tensor::Device<$B> = burn::backend::cuda::CudaDevice { index: *index };
                $body
            }
        }
    };
}

/// The fused attention, cross-entropy, RMSNorm and SwiGLU ops (`train.fused_attention`,
/// `fused_loss`, `fused_norm`, `fused_swiglu`; models/src/attention.rs, loss.rs, norm.rs,
/// swiglu.rs) for every autodiff backend [`with_backend!`] builds, and for the GPU ones the
/// one-kernel AdamW and the ops' passes as CubeCL kernels.
pub fn register_fused_ops() {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use kiln_models::register_fused_ops;
    #[cfg(feature = "flex")]
    register_fused_ops::<burn::backend::Flex, NoCheckpointing>();
    #[cfg(feature = "ndarray")]
    register_fused_ops::<burn::backend::NdArray, NoCheckpointing>();
    #[cfg(feature = "wgpu")]
    register_fused_ops::<burn::backend::Wgpu, NoCheckpointing>();
    #[cfg(feature = "cuda")]
    register_fused_ops::<burn::backend::Cuda, NoCheckpointing>();
    // The one-kernel AdamW (`optim.fused`) for the inner backends of training: Burn's `Wgpu` and
    // `Cuda` are `Fusion<CubeBackend<runtime, f32, i32, bool element>>`.
    #[cfg(feature = "wgpu")]
    optim_cube::register::<cubecl::wgpu::WgpuRuntime, f32, i32, u32>();
    #[cfg(feature = "cuda")]
    optim_cube::register::<cubecl::cuda::CudaRuntime, f32, i32, u8>();
    // The fused ops' passes as CubeCL kernels (`train.fused_norm`, `fused_swiglu`, `fused_loss`).
    #[cfg(feature = "wgpu")]
    cube_kernels::register::<cubecl::wgpu::WgpuRuntime, u32>();
    #[cfg(feature = "cuda")]
    cube_kernels::register::<cubecl::cuda::CudaRuntime, u8>();
    // Linear layers' GEMMs through cuBLASLt on CUDA (`train.cublaslt`).
    #[cfg(feature = "cuda")]
    cublaslt_cuda::register::<u8>();
}
