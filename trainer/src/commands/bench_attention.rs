//! `kiln bench-attention`: causal attention's forward and backward timed through the fused op's
//! recomputing path and, on wgpu and CUDA, Kiln's flash kernels (`train.flash_attention`), with
//! their difference (`kiln_trainer::attention_bench`). One JSON object a path and shape on stdout.

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use kiln_recipes::DeviceSpec;

use super::resolve_device;

#[derive(clap::Args)]
pub struct Args {
    /// A shape as BATCH,HEADS,T,HEAD_DIM (repeat the flag), e.g. 16,12,1024,64.
    #[arg(long = "shape", required = true, value_parser = parse_shape)]
    shapes: Vec<[usize; 4]>,
    /// Element type of q, k and v: f32, bf16 or f16 (f32 accumulation).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed calls a path (after 2 untimed ones).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Compute device: auto, cpu, ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    device: Option<DeviceSpec>,
}

fn parse_shape(s: &str) -> Result<[usize; 4], String> {
    let hint = "expected four positive sizes BATCH,HEADS,T,HEAD_DIM, e.g. 16,12,1024,64";
    let dims: Vec<usize> = s.split(',').map(|d| d.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|e| format!("{s:?}: {e} ({hint})"))?;
    match dims[..] {
        [b, h, t, d] if b > 0 && h > 0 && t > 0 && d > 0 => Ok([b, h, t, d]),
        _ => Err(format!("{s:?}: {hint}")),
    }
}

pub fn run(a: Args) -> Result<()> {
    let dtype = super::bench_dtype(&a.dtype, a.iters)?;
    let be = resolve_device(a.device.unwrap_or(DeviceSpec::Auto))?;
    // Each row printed as it is measured, so that a kernel failing on a device leaves the rows before it.
    let mut emit = |r: kiln_trainer::attention_bench::AttentionRow| -> Result<()> {
        println!("{}", serde_json::to_string(&r)?);
        Ok(())
    };
    kiln_trainer::with_backend!(be, B, device, {
        type I = <B as AutodiffBackend>::InnerBackend;
        if !kiln_trainer::attention_bench::supports::<I>(&device, dtype) {
            bail!("--dtype {}: {} cannot compute in {dtype:?}\n  hint: --dtype f32", a.dtype, be.describe());
        }
        kiln_trainer::attention_bench::run::<B>(&device, &a.shapes, dtype, a.iters, &mut emit)?
    });
    Ok(())
}
