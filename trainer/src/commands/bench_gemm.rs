//! `kiln bench-gemm`: a linear layer's three GEMMs timed through Burn's matmul and, on CUDA,
//! through cuBLASLt (`train.cublaslt`), with their difference (`kiln_trainer::gemm_bench`). One
//! JSON object a GEMM on stdout.

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use kiln_recipes::DeviceSpec;

use super::resolve_device;

#[derive(clap::Args)]
pub struct Args {
    /// A layer as ROWS,IN,OUT (repeat the flag): its forward, grad-input and grad-weight GEMMs.
    #[arg(long = "layer", required = true, value_parser = parse_layer)]
    layers: Vec<[usize; 3]>,
    /// Element type of the operands: f32, bf16 or f16 (f32 accumulation).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed calls a GEMM (after 2 untimed ones).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Compute device: auto, cpu, ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    device: Option<DeviceSpec>,
}

fn parse_layer(s: &str) -> Result<[usize; 3], String> {
    let dims: Vec<usize> = s.split(',').map(|d| d.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| format!("{s:?}: {e} (expected ROWS,IN,OUT, e.g. 16384,768,2304)"))?;
    match dims[..] {
        [r, i, o] if r > 0 && i > 0 && o > 0 => Ok([r, i, o]),
        _ => Err(format!("{s:?}: expected three positive sizes ROWS,IN,OUT, e.g. 16384,768,2304")),
    }
}

pub fn run(a: Args) -> Result<()> {
    let dtype = super::bench_dtype(&a.dtype, a.iters)?;
    let be = resolve_device(a.device.unwrap_or(DeviceSpec::Auto))?;
    // cuBLASLt is loaded at run time: without it, Burn's figures alone (the reason on stderr).
    let kernel = match &be {
        #[cfg(feature = "cuda")]
        kiln_trainer::device::Device::Cuda { index, .. } => match kiln_trainer::cublaslt_cuda::available(*index) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cuBLASLt not timed: {e}");
                false
            }
        },
        _ => false,
    };
    let rows = kiln_trainer::with_backend!(be, B, device, {
        type I = <B as AutodiffBackend>::InnerBackend;
        if !kiln_trainer::attention_bench::supports::<I>(&device, dtype) {
            bail!("--dtype {}: {} cannot compute in {dtype:?}\n  hint: --dtype f32", a.dtype, be.describe());
        }
        kiln_trainer::gemm_bench::run::<I>(&device, &a.layers, dtype, a.iters, kernel)?
    });
    for r in rows {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
