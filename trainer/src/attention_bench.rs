//! `kiln bench-attention`: causal attention's forward and backward at a step's shapes, timed on a
//! device through the fused attention op's recomputing path and, where the backend has them
//! (wgpu, CUDA), Kiln's flash kernels (`train.flash_attention`), with the largest difference
//! between each and the recomputing path: the FMA kernels (`flash`) and, where the device runs
//! them (`cube_kernels/attention_mma.rs`: CUDA, f16/bf16), the tensor-core kernels (`flash-mma`). For issue 17's attention figure (`scripts/gpu-checks` puts PyTorch's SDPA
//! beside it) and as a parity check of the flash kernels on the device itself.
//!
//! One call is what a training step runs for one layer: `O = attention(Q, K, V)` forward, then
//! the gradients of Q, K and V from `dO`. FLOPs count the causal half of the four `T × T × Hd`
//! products (`QKᵀ` and `PV` forward, and `2.5×` that backward): `3.5 · 2·B·H·T²·Hd`.

use anyhow::{anyhow, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, ElementConversion, Tensor};
use serde::Serialize;

use crate::gemm_bench::time;

/// One path's figures at one shape.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionRow {
    /// `recompute` (the fused op's backward from `[B, H, T, T]` probabilities), `flash` (the FMA
    /// kernels) or `flash-mma` (the tensor-core kernels).
    pub path: &'static str,
    /// `[batch, heads, T, head dim]`.
    pub shape: [usize; 4],
    pub dtype: String,
    /// Mean seconds a forward and backward, and TFLOP/s at the module docs' count.
    pub seconds: f64,
    pub tflops: f64,
    /// For the flash rows: max |flash − recompute| / max |recompute| over the output and the
    /// three gradients.
    pub rel_diff: Option<f64>,
}

/// The output and the gradients of q, k and v, on the inner backend.
type Outputs<B> = [Tensor<<B as AutodiffBackend>::InnerBackend, 4>; 4];

/// Forward and backward of the fused op over `q, k, v` with `dO = probe`.
fn step<B: AutodiffBackend>(inputs: &[Tensor<B::InnerBackend, 4>; 4], flash: bool) -> Result<Outputs<B>> {
    let op = kiln_models::attention::registered::<B>().ok_or_else(|| anyhow!("this backend has no fused attention op"))?;
    let [q, k, v] = [0, 1, 2].map(|i| Tensor::<B, 4>::from_inner(inputs[i].clone()).require_grad());
    let y = op(q.clone(), k.clone(), v.clone(), None, flash);
    let grads = (y.clone() * Tensor::<B, 4>::from_inner(inputs[3].clone())).sum().backward();
    let grad = |t: &Tensor<B, 4>| t.grad(&grads).ok_or_else(|| anyhow!("attention left an input without a gradient"));
    Ok([y.inner(), grad(&q)?, grad(&k)?, grad(&v)?])
}

/// Times each path at each shape `[B, H, T, Hd]` in `dtype`, `iters` timed calls each, handing
/// each row to `emit` as soon as it is measured; the flash paths only where the backend registers
/// its kernels and they take the shape and type. The FMA kernels' row comes before the first
/// call of the tensor-core kernels, so that it is out even if those fail on a device.
pub fn run<B: AutodiffBackend>(device: &B::Device, shapes: &[[usize; 4]], dtype: DType, iters: usize, emit: &mut dyn FnMut(AttentionRow) -> Result<()>) -> Result<()> {
    for &shape in shapes {
        let [b, h, t, hd] = shape;
        let flops = 3.5 * 2.0 * (b * h * t * t * hd) as f64 / 2.0;
        let make = || Tensor::<B::InnerBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let inputs = [make(), make(), make(), make()];
        let row = |path, seconds: f64, rel_diff| AttentionRow { path, shape, dtype: format!("{dtype:?}").to_lowercase(), seconds, tflops: flops / seconds / 1e12, rel_diff };
        let seconds = time::<B, _>(device, iters, || step::<B>(&inputs, false))?;
        emit(row("recompute", seconds, None))?;
        if kiln_models::attention::flash_kernels(&inputs[0]).is_none() {
            tracing::warn!("{shape:?} {dtype:?}: no flash-attention kernels for this backend, shape or type; the recomputing path alone");
            continue;
        }
        let want = step::<B>(&inputs, false)?;
        tensor_cores::set(false);
        let fma = flash::<B>(device, &inputs, &want, iters);
        tensor_cores::set(true);
        let (seconds, worst) = fma?;
        emit(row("flash", seconds, Some(worst)))?;
        // One call to see whether the tensor-core kernels take this shape here.
        step::<B>(&inputs, true)?;
        if tensor_cores::took() {
            let (seconds, worst) = flash::<B>(device, &inputs, &want, iters)?;
            emit(row("flash-mma", seconds, Some(worst)))?;
        }
    }
    Ok(())
}

/// The flash path's mean seconds and its largest relative difference from `want` (the
/// recomputing path's outputs).
fn flash<B: AutodiffBackend>(device: &B::Device, inputs: &[Tensor<B::InnerBackend, 4>; 4], want: &Outputs<B>, iters: usize) -> Result<(f64, f64)> {
    let seconds = time::<B, _>(device, iters, || step::<B>(inputs, true))?;
    let got = step::<B>(inputs, true)?;
    let mut worst = 0.0f64;
    for (w, g) in want.iter().zip(got) {
        let (w, g) = (w.clone().cast(DType::F32), g.cast(DType::F32));
        let scale = w.clone().abs().max().into_scalar().elem::<f64>().max(f64::MIN_POSITIVE);
        worst = worst.max((g - w).abs().max().into_scalar().elem::<f64>() / scale);
    }
    Ok((seconds, worst))
}

/// The flash kernels' tensor-core switch (`cube_kernels::attention`), where Kiln has CubeCL kernels.
mod tensor_cores {
    #[cfg(feature = "cube")]
    pub use crate::cube_kernels::attention::{set_tensor_cores as set, took_tensor_cores as took};
    #[cfg(not(feature = "cube"))]
    pub fn set(_on: bool) {}
    #[cfg(not(feature = "cube"))]
    pub fn took() -> bool {
        false
    }
}

/// Whether `B` computes in `dtype`.
pub fn supports<B: Backend>(device: &B::Device, dtype: DType) -> bool {
    dtype == DType::F32 || B::supports_dtype(device, dtype)
}
