//! One file per subcommand: its arguments (clap) and what it does. Shared here: the device and
//! data-root flags, data-parallel flags, Ctrl-C handling.

pub mod ask;
pub mod bench_attention;
pub mod bench_gemm;
pub mod chat;
pub mod compare;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod index;
pub mod publish;
pub mod recipe;
pub mod resume;
pub mod run;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use kiln_recipes::{DeviceSpec, Precision};
use kiln_trainer::data::sources::Dirs;
use kiln_trainer::device::{self, Device};
use kiln_trainer::trainer::Outcome;

#[derive(clap::Args, Clone)]
pub struct Common {
    /// Compute device: auto (CUDA, else a hardware wgpu adapter, else the CPU), cpu (flex), ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Read-only data root (default: $KILN_DATA, else ./data).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
}

/// Sampling flags shared by `kiln generate` and `kiln chat` (their temperature and length
/// defaults differ, so those stay with each command).
#[derive(clap::Args, Clone)]
pub struct Sampling {
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// How a hybrid index fuses BM25's and the dense ranking (`kiln index query`, `ask`, `eval`).
#[derive(clap::Args, Clone)]
pub struct FusionArgs {
    /// Hybrid fusion: convex (each ranking's scores min-max normalised, then weighted) or rrf
    /// (reciprocal rank). Also the hybrid the squad-retrieval eval reports.
    #[arg(long, default_value = "convex")]
    pub fusion: String,
    /// The dense ranking's weight in the fusion, 0 to 1 (BM25 gets 1 minus it); default 0.4 for
    /// convex (chosen on validation questions), 0.5 for rrf (the unweighted sum).
    #[arg(long)]
    pub dense_weight: Option<f64>,
}

impl FusionArgs {
    pub fn fusion(&self) -> Result<kiln_retrieval::Fusion> {
        kiln_retrieval::Fusion::parse(&self.fusion, self.dense_weight).map_err(|e| anyhow::anyhow!("--fusion/--dense-weight: {e}"))
    }
}

/// Set by Ctrl-C or SIGTERM: the training loop checkpoints after the current step and stops.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn install_signal_handler() {
    let r = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: writing a checkpoint after this step (press again to abort)");
    });
    if let Err(e) = r {
        tracing::warn!("cannot install the Ctrl-C/SIGTERM handler: {e}");
    }
}

/// A bench command's `--dtype` (f32, bf16 or f16), with its `--iters` checked (at least one).
pub fn bench_dtype(dtype: &str, iters: usize) -> Result<burn::tensor::DType> {
    use burn::tensor::DType;
    if iters == 0 {
        anyhow::bail!("--iters 0: at least one timed call is needed");
    }
    match dtype {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
    }
}

/// `device::resolve`, and for a GPU, CubeCL's compiled-kernel and autotune caches under
/// `$KILN_CACHE/cubecl` (see `device::configure_kernel_cache`).
pub fn resolve_device(spec: DeviceSpec) -> Result<Device> {
    let be = device::resolve(spec)?;
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if let Some(root) = device::configure_kernel_cache(&be, &Dirs::from_env(None).cache) {
        tracing::info!("GPU kernels: compiled and autotuned on first use (minutes on a new GPU), cached in {}", root.display());
    }
    Ok(be)
}

/// `resolve_device`, then the precision checked against it before anything is written.
pub fn training_device(spec: DeviceSpec, precision: Precision) -> Result<Device> {
    let be = resolve_device(spec)?;
    kiln_trainer::with_backend!(be, B, d, { kiln_trainer::plan::check_precision::<B>(precision, &d, &be)? });
    Ok(be)
}

/// An interrupted run exits with 130, as a shell expects after Ctrl-C.
pub fn finish(o: Outcome) -> Result<()> {
    match o {
        Outcome::Finished => Ok(()),
        Outcome::Stopped { .. } => std::process::exit(130),
    }
}
