//! `kiln bench-gemm`: a linear layer's three GEMMs at a step's shapes, timed on a device through
//! Burn's matmul and, where the backend has one (cuBLASLt on CUDA, `train.cublaslt`), through
//! Kiln's GEMM op, with the largest difference between the two. For issue 17's GEMM
//! efficiency figure (`scripts/gpu-checks` puts `torch.matmul` beside it) and as a parity check
//! of the cuBLASLt op on the device itself.
//!
//! For a layer `Y[rows, out] = X[rows, in] · W[in, out]` the three products of a training step:
//!
//! ```text
//! forward       X · W        [rows, in] x [in, out]
//! grad_input    dY · Wᵀ      [rows, out] x [out, in]    (W transposed)
//! grad_weight   Xᵀ · dY      [in, rows] x [rows, out]   (X transposed)
//! ```
//!
//! Burn's side is what its autodiff runs: `matmul` of the transposed views.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, ElementConversion, Tensor};
use serde::Serialize;

/// One GEMM's figures.
#[derive(Debug, Clone, Serialize)]
pub struct GemmRow {
    /// `forward`, `grad_input` or `grad_weight`.
    pub gemm: &'static str,
    /// The layer: `[rows, in, out]`.
    pub layer: [usize; 3],
    pub dtype: String,
    /// Mean seconds a call over the timed calls, and TFLOP/s (2·rows·in·out FLOPs a call).
    pub burn_s: f64,
    pub burn_tflops: f64,
    /// The backend's own GEMM (cuBLASLt), where it has one.
    pub kernel_s: Option<f64>,
    pub kernel_tflops: Option<f64>,
    /// max |kernel − burn| / max |burn| over the output.
    pub kernel_rel_diff: Option<f64>,
}

/// Times `f` (`iters` calls after 2 untimed ones), synchronising the device around them; mean
/// seconds a call. (`attention_bench` times with it too.)
pub(crate) fn time<B: Backend, T>(device: &B::Device, iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
    let start = Instant::now();
    // Every output stays live until the sync, so none of the calls can be elided or its memory
    // recycled by the fusion layer before it is timed.
    let mut keep = Vec::with_capacity(iters);
    for _ in 0..iters {
        keep.push(f()?);
    }
    B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
    Ok(start.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// The three GEMMs of each layer `[rows, in, out]` in `dtype`, `iters` timed calls each; with
/// `kernel` (the backend's GEMM works here) through it too.
pub fn run<B: Backend>(device: &B::Device, layers: &[[usize; 3]], dtype: DType, iters: usize, kernel: bool) -> Result<Vec<GemmRow>> {
    let kernel = kernel && kiln_models::linear::has_kernel::<B>();
    let mut rows = Vec::new();
    for &[n, i, o] in layers {
        let make = |shape: [usize; 2]| Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let (x, w, dy) = (make([n, i]), make([i, o]), make([n, o]));
        // (name, A as stored, B as stored, trans_a, trans_b)
        let gemms = [("forward", x.clone(), w.clone(), false, false), ("grad_input", dy.clone(), w, false, true), ("grad_weight", x, dy, true, false)];
        for (name, a, b, ta, tb) in gemms {
            let burn = || {
                let a = if ta { a.clone().transpose() } else { a.clone() };
                let b = if tb { b.clone().transpose() } else { b.clone() };
                a.matmul(b)
            };
            let flops = 2.0 * (n * i * o) as f64;
            let burn_s = time::<B, _>(device, iters, || Ok(burn()))?;
            let (mut kernel_s, mut kernel_rel_diff) = (None, None);
            if kernel {
                let own = || kiln_models::linear::gemm(a.clone(), b.clone(), ta, tb);
                kernel_s = Some(time::<B, _>(device, iters, || Ok(own()))?);
                let (want, got) = (burn().cast(DType::F32), own().cast(DType::F32));
                let scale = want.clone().abs().max().into_scalar().elem::<f64>().max(f64::MIN_POSITIVE);
                kernel_rel_diff = Some((got - want).abs().max().into_scalar().elem::<f64>() / scale);
            }
            rows.push(GemmRow {
                gemm: name,
                layer: [n, i, o],
                dtype: format!("{dtype:?}").to_lowercase(),
                burn_s,
                burn_tflops: flops / burn_s / 1e12,
                kernel_s,
                kernel_tflops: kernel_s.map(|s| flops / s / 1e12),
                kernel_rel_diff,
            });
        }
    }
    Ok(rows)
}
