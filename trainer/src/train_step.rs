//! One training step, written out: for each micro-batch forward, masked loss, backward and
//! gradient accumulation; then global-norm clip and the AdamW step.

use std::time::Instant;

use std::collections::HashMap;
use std::sync::Mutex;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use kiln_models::cpu_kernels::{BatchRef, Kernels};
use kiln_models::llama::param_id;
use kiln_models::{Llama, LlamaConfig};

use crate::data::loader::Batch;
use crate::optim::{AdamW, PathStack};

/// Mean cross-entropy over the tokens where `mask` is 1. Returns a `[1]` tensor.
pub fn masked_cross_entropy<B: Backend>(model: &Llama<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
    let (b, t) = (batch.batch, batch.context);
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs.clone(), [b, t]), device); // [B, T]
    let y = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), [b * t, 1]), device); // [B*T, 1]
    let n: f32 = batch.mask.iter().sum::<f32>().max(1.0);
    let w: Vec<f32> = batch.mask.iter().map(|m| m / n).collect();
    let w = Tensor::<B, 2>::from_data(TensorData::new(w, [b * t, 1]), device); // [B*T, 1]: mask / n
    let logits = model.forward(x); // [B, T, V]
    let v = logits.dims()[2];
    kiln_models::loss::cross_entropy(logits.reshape([b * t, v]), y, w, model.fused_loss) // [1]
}

/// The fused CPU path (`models/src/cpu_kernels.rs`): the same model, loss, gradients and AdamW
/// update as Burn's autodiff graph and [`AdamW::step`], computed by hand-written kernels on host
/// buffers. Built once per run; used on the CPU backends at f32 precision (`train.cpu_kernels`).
pub struct CpuKernels {
    kern: Kernels,
    /// Parameter name -> index into `kern.layout.slots`.
    index: HashMap<String, usize>,
    /// Flat weights, gradients and a second gradient buffer (accumulation), reused every step.
    bufs: Mutex<[Vec<f32>; 3]>,
}

impl CpuKernels {
    pub fn new<B: Backend>(model: &Llama<B>, cfg: &LlamaConfig, threads: usize) -> Self {
        let kern = Kernels::for_model(model, cfg, threads);
        let index = kern.layout.slots.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { kern, index, bufs: Mutex::new(Default::default()) }
    }

    /// One optimizer step: forward and backward over `micro` (gradients averaged), the optional
    /// data-parallel `sync`, then global-norm clip and AdamW on the flat buffers.
    pub fn step<B: AutodiffBackend>(
        &self,
        model: Llama<B>,
        opt: &mut AdamW<B::InnerBackend>,
        micro: &[Batch],
        lr: f64,
        device: &B::Device,
        sync: Option<SyncHook>,
    ) -> anyhow::Result<(Llama<B>, StepOutput)> {
        let layout = &self.kern.layout;
        let mut guard = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let [w, total, g] = &mut *guard;
        w.resize(layout.len, 0.0);
        total.resize(layout.len, 0.0);
        let t0 = Instant::now();
        layout.weights_into(&model, w)?;
        let (mut loss, mut forward_s) = (0.0, 0.0);
        for (i, b) in micro.iter().enumerate() {
            let batch = BatchRef { inputs: &b.inputs, targets: &b.targets, mask: &b.mask, b: b.batch, t: b.context };
            let out = if i == 0 {
                &mut *total
            } else {
                g.resize(layout.len, 0.0);
                &mut *g
            };
            let pass = self.kern.loss_and_grads(w, &batch, Some(out));
            loss += pass.loss;
            forward_s += pass.forward_s;
            if i > 0 {
                total.iter_mut().zip(g.iter()).for_each(|(a, b)| *a += b);
            }
        }
        let k = micro.len() as f32;
        if micro.len() > 1 {
            total.iter_mut().for_each(|x| *x /= k);
        }
        loss /= k as f64;
        let backward_s = t0.elapsed().as_secs_f64() - forward_s;
        let t0 = Instant::now();
        if let Some(sync) = sync {
            let (grads, l) = sync(self.to_params::<B::InnerBackend>(total, device), loss)?;
            loss = l;
            self.from_params::<B::InnerBackend>(grads, total)?;
        }
        let grad_norm = opt.step_flat(layout, w, total, lr);
        let model = model.map(&mut WriteWeights::<B> { kern: self, w, device, path: PathStack(Vec::new()) });
        let optim_s = t0.elapsed().as_secs_f64();
        Ok((model, StepOutput { loss, grad_norm, tokens: loss_tokens(micro), forward_s, backward_s, optim_s }))
    }

    /// Flat gradients as Burn gradients, keyed by parameter id.
    fn to_params<I: Backend>(&self, flat: &[f32], device: &I::Device) -> GradientsParams {
        let layout = &self.kern.layout;
        let mut grads = GradientsParams::new();
        for s in &layout.slots {
            let data = TensorData::new(layout.get(flat, s), s.shape.clone());
            let id = param_id(&s.name);
            match s.shape.len() {
                1 => grads.register(id, Tensor::<I, 1>::from_data(data, device)),
                _ => grads.register(id, Tensor::<I, 2>::from_data(data, device)),
            }
        }
        grads
    }

    fn from_params<I: Backend>(&self, mut grads: GradientsParams, flat: &mut [f32]) -> anyhow::Result<()> {
        let layout = &self.kern.layout;
        for s in &layout.slots {
            let id = param_id(&s.name);
            let data = match s.shape.len() {
                1 => grads.remove::<I, 1>(id).map(|t| t.into_data()),
                _ => grads.remove::<I, 2>(id).map(|t| t.into_data()),
            };
            let data = data.ok_or_else(|| anyhow::anyhow!("averaged gradients lack '{}'", s.name))?;
            let values = data.convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("gradient of '{}': {e:?}", s.name))?;
            layout.put(flat, s, &values);
        }
        Ok(())
    }

    /// Mean validation loss (nats per token) over fixed batches.
    fn eval_loss<B: Backend>(&self, model: &Llama<B>, batches: &[Batch]) -> anyhow::Result<f64> {
        let w = self.kern.layout.weights(model)?;
        let (mut sum, mut n) = (0.0, 0.0);
        for b in batches {
            let batch = BatchRef { inputs: &b.inputs, targets: &b.targets, mask: &b.mask, b: b.batch, t: b.context };
            let weight: f64 = b.mask.iter().map(|&m| m as f64).sum();
            sum += self.kern.loss_and_grads(&w, &batch, None).loss * weight;
            n += weight;
        }
        Ok(sum / f64::max(n, 1.0))
    }
}

/// Replaces every parameter's value with its values from the flat weights.
struct WriteWeights<'a, B: AutodiffBackend> {
    kern: &'a CpuKernels,
    w: &'a [f32],
    device: &'a B::Device,
    path: PathStack,
}

impl<B: AutodiffBackend> ModuleMapper<B> for WriteWeights<'_, B> {
    fn enter_module(&mut self, name: &str, _c: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _n: &str, _c: &str) {
        self.path.0.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.name();
        let Some(&i) = self.kern.index.get(&name) else {
            return param;
        };
        let layout = &self.kern.kern.layout;
        let s = &layout.slots[i];
        let (id, tensor, mapper) = param.consume();
        let data = TensorData::new(layout.get(self.w, s), tensor.shape());
        let inner = Tensor::<B::InnerBackend, D>::from_data(data, self.device);
        Param::from_mapped_value(id, Tensor::from_inner(inner).require_grad(), mapper)
    }
}

/// Loss-bearing tokens in a step's micro-batches.
fn loss_tokens(micro: &[Batch]) -> usize {
    micro.iter().map(|b| b.mask.iter().filter(|&&m| m > 0.0).count()).sum()
}

pub struct StepOutput {
    pub loss: f64,
    pub grad_norm: f64,
    /// Loss-bearing tokens in this step.
    pub tokens: usize,
    /// Seconds in the forward pass (with the loss), the backward pass, and clip + AdamW.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optim_s: f64,
}

/// One optimizer step over `micro` batches (gradient accumulation when more than one).
pub fn train_step<B: AutodiffBackend>(
    model: Llama<B>,
    opt: &mut AdamW<B::InnerBackend>,
    micro: &[Batch],
    lr: f64,
    device: &B::Device,
) -> (Llama<B>, StepOutput) {
    match train_step_synced(model, opt, micro, lr, device, None, None) {
        Ok(r) => r,
        Err(_) => unreachable!("a step without a sync hook cannot fail"),
    }
}

/// Averages a step's gradients and loss with other workers (data parallelism).
pub type SyncHook<'a> = &'a mut dyn FnMut(GradientsParams, f64) -> anyhow::Result<(GradientsParams, f64)>;

/// [`train_step`], with the gradients (and the loss, for logging) passed through `sync` between
/// the backward passes and clipping + AdamW, and the forward and backward passes computed by
/// `kernels` when given.
pub fn train_step_synced<B: AutodiffBackend>(
    model: Llama<B>,
    opt: &mut AdamW<B::InnerBackend>,
    micro: &[Batch],
    lr: f64,
    device: &B::Device,
    sync: Option<SyncHook>,
    kernels: Option<&CpuKernels>,
) -> anyhow::Result<(Llama<B>, StepOutput)> {
    if let Some(kern) = kernels {
        return kern.step(model, opt, micro, lr, device, sync);
    }
    let tokens = loss_tokens(micro);
    let k = micro.len() as f64;
    let mut acc = GradientsAccumulator::<Llama<B>>::new();
    // The loss stays on the device until the step is queued (see `perf::step_sync`); data
    // parallelism reads it once, after the backward passes, to average it.
    let early = crate::perf::step_sync();
    let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut single: Option<GradientsParams> = None;
    let (mut forward_s, mut backward_s) = (0.0, 0.0);
    for batch in micro {
        let t0 = Instant::now();
        let loss = masked_cross_entropy(&model, batch, device);
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

/// Mean validation loss (nats per token) over fixed batches, without autodiff; by `kernels`
/// when given.
pub fn eval_loss<B: AutodiffBackend>(model: &Llama<B>, batches: &[Batch], device: &B::Device, kernels: Option<&CpuKernels>) -> f64 {
    if let Some(k) = kernels {
        match k.eval_loss(model, batches) {
            Ok(v) => return v,
            Err(e) => tracing::warn!("validation through the CPU kernels failed ({e}); using Burn's forward pass"),
        }
    }
    let inner: Llama<B::InnerBackend> = model.valid();
    let mut sum = 0.0;
    let mut n = 0.0;
    for b in batches {
        let w: f64 = b.mask.iter().map(|&m| m as f64).sum();
        let l = masked_cross_entropy(&inner, b, device).into_scalar().elem::<f64>();
        sum += l * w;
        n += w;
    }
    sum / n.max(1.0)
}
