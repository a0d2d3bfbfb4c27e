//! The step on Burn's autodiff graph: for each micro-batch forward, masked loss, backward and
//! gradient accumulation; then the optional data-parallel sync, the global-norm clip and AdamW.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use kiln_models::llama::Packed;
use kiln_models::Llama;

use super::{real_tokens, StepOutput, SyncHook};
use crate::data::loader::Batch;
use crate::optim::AdamW;

/// Mean cross-entropy over the tokens where `mask` is 1. Returns a `[1]` tensor.
pub fn masked_cross_entropy<B: Backend>(model: &Llama<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
    let (b, t) = (batch.batch, batch.context);
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs.clone(), [b, t]), device); // [B, T]
    let y = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), [b * t, 1]), device); // [B*T, 1]
    let n: f32 = batch.mask.iter().sum::<f32>().max(1.0);
    let w: Vec<f32> = batch.mask.iter().map(|m| m / n).collect();
    let w = Tensor::<B, 2>::from_data(TensorData::new(w, [b * t, 1]), device); // [B*T, 1]: mask / n
    let logits = match &batch.starts {
        Some(starts) => model.forward_packed(x, &Packed::from_starts(starts, b, t, device)), // [B, T, V]
        None => model.forward(x), // [B, T, V]
    };
    let v = logits.dims()[2];
    kiln_models::loss::cross_entropy(logits.reshape([b * t, v]), y, w, model.fused_loss) // [1]
}

/// The batch's loss: the contrastive one for pairs (the retriever stage), else the masked
/// cross-entropy. Returns a `[1]` tensor.
pub fn batch_loss<B: Backend>(model: &Llama<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
    match &batch.pairs {
        Some(p) => kiln_models::contrastive::loss(model, p, device),
        None => masked_cross_entropy(model, batch, device),
    }
}

/// What a batch's loss weighs in a validation mean: its loss tokens, or its pairs.
pub fn loss_weight(batch: &Batch) -> f64 {
    match &batch.pairs {
        Some(p) => p.len() as f64,
        None => batch.mask.iter().map(|&m| m as f64).sum(),
    }
}

/// One optimizer step over `micro` batches (gradient accumulation when more than one).
pub(super) fn step<B: AutodiffBackend>(
    model: Llama<B>,
    opt: &mut AdamW<B::InnerBackend>,
    micro: &[Batch],
    lr: f64,
    device: &B::Device,
    sync: Option<SyncHook>,
) -> Result<(Llama<B>, StepOutput)> {
    let tokens = real_tokens(micro);
    let k = micro.len() as f64;
    let mut acc = GradientsAccumulator::<Llama<B>>::new();
    // The loss stays on the device until the step is queued (see `perf::step_sync`); data
    // parallelism reads it once, after the backward passes, to average it.
    let early = crate::perf::step_sync();
    let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut single: Option<GradientsParams> = None;
    let (mut forward_s, mut backward_s) = (0.0, 0.0);
    let mut model = model;
    for (i, batch) in micro.iter().enumerate() {
        if let Some(l) = model.lora.as_mut() {
            l.drop_for(opt.t, i); // LoRA dropout's masks for this micro-batch
        }
        let t0 = Instant::now();
        let loss = batch_loss(&model, batch, device);
        let l = loss.clone().inner(); // [1]
        if early {
            // Wait for the forward pass, so that forward_s is its device time.
            l.clone().into_scalar().elem::<f64>();
        }
        loss_sum = Some(match loss_sum.take() {
            Some(a) => a + l,
            None => l,
        });
        let t1 = Instant::now();
        let scaled = if micro.len() > 1 { loss / k } else { loss };
        let grads = scaled.backward();
        forward_s += (t1 - t0).as_secs_f64();
        backward_s += t1.elapsed().as_secs_f64();
        let gp = GradientsParams::from_grads(grads, &model);
        if micro.len() == 1 {
            single = Some(gp);
        } else {
            acc.accumulate(&model, gp);
        }
    }
    if let Some(l) = model.lora.as_mut() {
        l.dropout = None; // evaluation and generation see every value
    }
    let mut grads = single.unwrap_or_else(|| acc.grads());
    let read = |t: Option<Tensor<B::InnerBackend, 1>>| t.map_or(0.0, |t| t.into_scalar().elem::<f64>()) / k;
    let t0 = Instant::now();
    let mut loss = None;
    if let Some(sync) = sync {
        let (g, l) = sync(grads, read(loss_sum.take()))?;
        (grads, loss) = (g, Some(l));
    }
    let (model, grad_norm) = opt.step::<B, _>(model, grads, lr);
    let loss = loss.unwrap_or_else(|| read(loss_sum));
    let optim_s = t0.elapsed().as_secs_f64();
    Ok((model, StepOutput { loss, grad_norm, tokens, forward_s, backward_s, optim_s }))
}

/// Mean validation loss (nats per token) over fixed batches, without autodiff.
pub(super) fn eval_loss<B: AutodiffBackend>(model: &Llama<B>, batches: &[Batch], device: &B::Device) -> f64 {
    let inner: Llama<B::InnerBackend> = model.valid();
    let mut sum = 0.0;
    let mut n = 0.0;
    for b in batches {
        let w = loss_weight(b);
        let l = batch_loss(&inner, b, device).into_scalar().elem::<f64>();
        sum += l * w;
        n += w;
    }
    sum / n.max(1.0)
}
