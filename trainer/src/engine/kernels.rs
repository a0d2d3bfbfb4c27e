//! The step by Kiln's fused CPU kernels (`kiln_models::cpu_kernels`): the same model, loss,
//! gradients and AdamW update as Burn's graph, computed by hand-written kernels on flat host
//! buffers. From the first step on, the flat weights and AdamW moments live here and nowhere
//! else: the Burn model's parameters are emptied ("hollow"), so that the model is not held
//! twice, and are filled from the flat weights when someone asks for the model (evaluation
//! tasks). Checkpoints are written from the flat buffers, one tensor at a time.
//!
//! With LoRA adapters (`model.lora`), the base's flat weights are frozen and the adapters have a
//! flat buffer of their own (`AdapterLayout`): gradients, clipping and AdamW cover the adapters
//! only.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use burn::tensor::Shape;
use kiln_models::checkpoint::{HostTensor, TensorList};
use kiln_models::lora_dropout::Dropout;
use kiln_models::cpu_kernels::{Adapt, AdapterLayout, BatchRef, Half, Kernels as Fused, Slot, Weights};
use kiln_models::llama::param_id;
use kiln_models::params::{map_named, MapNamed};
use kiln_models::{Llama, LlamaConfig};

use super::{real_tokens, StepOutput, SyncHook};
use crate::data::loader::Batch;
use crate::optim::{clip_scale, AdamW, AdamWScalars};

pub(super) struct Kernels {
    kern: Fused,
    /// Parameter name -> index into `kern.layout.slots`.
    index: HashMap<String, usize>,
    /// Flat weights (the model's, once `loaded`) and gradients (micro-batches accumulate into
    /// them), reused every step.
    w: Vec<f32>,
    total: Vec<f32>,
    loaded: bool,
    /// The Burn model's parameters are placeholders; `w` holds the weights.
    hollow: bool,
    /// AdamW's moments in the flat layout of what trains, taken from the optimizer on the first
    /// step.
    moments: Option<(Vec<f32>, Vec<f32>)>,
    /// LoRA: the adapters' layout and flat weights (the base `w` is then frozen, and `total` and
    /// the moments are the adapters').
    lora: Option<(AdapterLayout, Vec<f32>)>,
    /// LoRA with a base in a half type (`lora.base_dtype` bf16 or f16): the frozen weights are
    /// held here, in that type, and `w` stays empty.
    half: Option<Half>,
    w16: Vec<u16>,
}

fn batch_ref(b: &Batch) -> BatchRef<'_> {
    BatchRef { inputs: &b.inputs, targets: &b.targets, mask: &b.mask, b: b.batch, t: b.context, starts: b.starts.as_deref() }
}

impl Kernels {
    pub(super) fn new<B: Backend>(model: &Llama<B>, cfg: &LlamaConfig, threads: usize, checkpointing: bool, gradient_cache: bool) -> Self {
        let kern = Fused::for_model(model, cfg, threads).checkpointing(checkpointing).gradient_cache(gradient_cache);
        let index = kern.layout.slots.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let lora = model.lora.as_ref().map(|l| (AdapterLayout::new(&kern.layout.dims, &l.spec), Vec::new()));
        // A base stored in a half type (lora_params::store_base) stays so here.
        let half = match model.model.embed_tokens.val().dtype() {
            _ if lora.is_none() => None,
            burn::tensor::DType::BF16 => Some(Half::Bf16),
            burn::tensor::DType::F16 => Some(Half::F16),
            _ => None,
        };
        Self { kern, index, w: Vec::new(), total: Vec::new(), loaded: false, hollow: false, moments: None, lora, half, w16: Vec::new() }
    }

    /// The base's weights as the passes read them.
    fn base(&self) -> Weights<'_> {
        match self.half {
            Some(h) => Weights::Half(&self.w16, h),
            None => Weights::F32(&self.w),
        }
    }

    /// The slots of what trains: the adapters' under LoRA, else the model's.
    fn trained_slots(&self) -> &[Slot] {
        match &self.lora {
            Some((layout, _)) => &layout.slots,
            None => &self.kern.layout.slots,
        }
    }

    /// The adapters as the passes read them, under LoRA.
    fn adapt(&self) -> Option<Adapt<'_>> {
        self.lora.as_ref().map(|(layout, w)| Adapt::new(layout, w))
    }

    /// Forward and backward over `micro` (gradients averaged), the optional data-parallel
    /// `sync`, then global-norm clip and AdamW on the flat buffers.
    #[rustfmt::skip]
    pub(super) fn step<B: AutodiffBackend>(&mut self, model: Llama<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Batch], lr: f64, device: &B::Device, sync: Option<SyncHook>) -> Result<(Llama<B>, StepOutput)> {
        let t0 = Instant::now();
        if !self.loaded {
            self.w.resize(self.kern.layout.len, 0.0);
            self.kern.layout.weights_into(&model, &mut self.w)?;
            if let Some(h) = self.half {
                // The values are of that type already (the model holds them so): exact.
                self.w16 = self.w.iter().map(|&x| h.encode(x)).collect();
                self.w = Vec::new();
            }
            if let Some((layout, w)) = &mut self.lora {
                *w = layout.weights(&model)?;
            }
            self.loaded = true;
        }
        // LoRA dropout: the masks of each micro-batch of this step (lora_dropout.rs).
        let drop = model.lora.as_ref().map(|l| (l.spec.dropout, l.seed));
        let model = self.hollow(model, device);
        let len = self.lora.as_ref().map_or(self.kern.layout.len, |(l, _)| l.len);
        self.total.resize(len, 0.0);
        let (mut loss, mut forward_s) = (0.0, 0.0);
        let ad = self.lora.as_ref().map(|(layout, w)| Adapt::new(layout, w));
        let base = match self.half {
            Some(h) => Weights::Half(&self.w16, h),
            None => Weights::F32(&self.w),
        };
        for (i, b) in micro.iter().enumerate() {
            let pass = match (ad, &b.pairs) {
                // The retriever stage: the contrastive loss (a gradient cache, cpu_kernels).
                (Some(ad), Some(pairs)) => {
                    let ad = ad.dropping(drop.and_then(|(p, seed)| Dropout::new(p, seed, opt.t, i)));
                    self.kern.contrastive(base, Some(ad), pairs, Some(&mut self.total), i > 0)
                }
                (None, Some(pairs)) => self.kern.contrastive(Weights::F32(&self.w), None, pairs, Some(&mut self.total), i > 0),
                (Some(ad), None) => {
                    let ad = ad.dropping(drop.and_then(|(p, seed)| Dropout::new(p, seed, opt.t, i)));
                    self.kern.adapter_loss_and_grads(base, ad, &batch_ref(b), Some(&mut self.total), i > 0)
                }
                (None, None) if i == 0 => self.kern.loss_and_grads(&self.w, &batch_ref(b), Some(&mut self.total)),
                (None, None) => self.kern.add_loss_grads(&self.w, &batch_ref(b), &mut self.total),
            };
            loss += pass.loss;
            forward_s += pass.forward_s;
        }
        let k = micro.len() as f32;
        if micro.len() > 1 {
            self.total.iter_mut().for_each(|x| *x /= k);
        }
        loss /= k as f64;
        let backward_s = t0.elapsed().as_secs_f64() - forward_s;
        let t0 = Instant::now();
        if let Some(sync) = sync {
            let (grads, l) = sync(self.to_params::<B::InnerBackend>(device), loss)?;
            loss = l;
            self.from_params::<B::InnerBackend>(grads)?;
        }
        let grad_norm = self.adamw(opt, lr);
        let optim_s = t0.elapsed().as_secs_f64();
        Ok((model, StepOutput { loss, grad_norm, tokens: real_tokens(micro), forward_s, backward_s, optim_s }))
    }

    /// Clip and AdamW ([`AdamWScalars::update`]) on the flat weights and gradients; on first use
    /// the moments move from `opt` into flat buffers. Returns the gradient norm before clipping;
    /// a non-finite norm leaves everything as it was.
    fn adamw<I: Backend>(&mut self, opt: &mut AdamW<I>, lr: f64) -> f64 {
        // What trains: the adapters under LoRA, else the whole model.
        let (slots, w): (&[Slot], &mut Vec<f32>) = match &mut self.lora {
            Some((layout, w)) => (&layout.slots, w),
            None => (&self.kern.layout.slots, &mut self.w),
        };
        let len = w.len();
        let (m, v) = self.moments.get_or_insert_with(|| {
            let (mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
            for s in slots {
                if let Some((hm, hv)) = opt.take_host(&s.name) {
                    s.put(&mut m, &hm);
                    s.put(&mut v, &hv);
                }
            }
            (m, v)
        });
        let norm = global_norm(&self.total);
        if !norm.is_finite() {
            // The loop stops on it; the weights and moments stay as they were.
            return norm;
        }
        let scale = clip_scale(norm, opt.cfg.grad_clip) as f32;
        opt.t += 1;
        for s in slots {
            let a = AdamWScalars::new(&opt.cfg, opt.t, lr, s.shape.len());
            for r in s.rows() {
                let (ws, gs) = (&mut w[r.clone()], &self.total[r.clone()]);
                let (ms, vs) = (&mut m[r.clone()], &mut v[r]);
                for (((p, &gi), m), v) in ws.iter_mut().zip(gs).zip(ms.iter_mut()).zip(vs.iter_mut()) {
                    a.update(p, gi, m, v, scale);
                }
            }
        }
        norm
    }

    /// Empties the Burn model's parameters (the flat weights hold them).
    fn hollow<B: AutodiffBackend>(&mut self, model: Llama<B>, device: &B::Device) -> Llama<B> {
        if self.hollow {
            return model;
        }
        self.hollow = true;
        let model = map_named(model, &mut Hollow::<B> { index: &self.index, device });
        // The emptied tensors' memory goes back to the system: left in glibc's free lists it
        // would stay resident, since the step's buffers come from the worker threads' arenas.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        model
    }

    /// The model with its parameters filled from the flat weights, if they were emptied.
    pub(super) fn fill<B: AutodiffBackend>(&mut self, model: Llama<B>, device: &B::Device) -> Llama<B> {
        if !self.hollow {
            return model;
        }
        self.hollow = false;
        let model = map_named(model, &mut WriteWeights::<B> { slots: &self.kern.layout.slots, index: &self.index, w: self.base(), device });
        match &self.lora {
            // The adapters' parameters were left in place (they are small) but not updated.
            Some((layout, w)) => {
                let index = layout.slots.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
                map_named(model, &mut WriteWeights::<B> { slots: &layout.slots, index: &index, w: Weights::F32(w), device })
            }
            None => model,
        }
    }

    /// The adapters' current values (LoRA), for `base`; `None` before the first step (the Burn
    /// model holds them) or without adapters.
    pub(super) fn adapter(&self, base: String, spec: &kiln_models::lora::LoraSpec) -> Option<kiln_models::lora::Adapter> {
        let (layout, w) = self.lora.as_ref().filter(|_| self.loaded)?;
        Some(layout.to_adapter(w, spec.clone(), base))
    }

    /// The weights by name in Burn's layout, read from the flat buffer as they are written;
    /// `None` before the first step (the Burn model holds them).
    pub(super) fn weights(&self) -> Option<TensorList<'_>> {
        if !self.loaded {
            return None;
        }
        let layout = &self.kern.layout;
        let specs = layout.slots.iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
        Some(TensorList { specs, values: Box::new(move |i| slot_values(&layout.slots[i], self.base())) })
    }

    /// The flat moments as `<name>.exp_avg` and `<name>.exp_avg_sq`, sorted by name, read as
    /// they are written.
    pub(super) fn moments(&self) -> TensorList<'_> {
        let Some((m, v)) = &self.moments else { return TensorList::from_host(Vec::new()) };
        let mut slots: Vec<_> = self.trained_slots().iter().collect();
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        let specs = slots.iter().flat_map(|s| ["exp_avg", "exp_avg_sq"].map(|k| (format!("{}.{k}", s.name), vec![s.shape.iter().product::<usize>()]))).collect();
        TensorList { specs, values: Box::new(move |i| slots[i / 2].get(if i % 2 == 0 { m } else { v })) }
    }

    /// Frees the gradients, the moments and the kernels' activation buffers.
    pub(super) fn finish_training(&mut self) {
        self.total = Vec::new();
        self.moments = None;
        self.kern.free_buffers();
    }

    pub(super) fn has_moments(&self) -> bool {
        self.moments.is_some()
    }

    /// [`Kernels::moments`] in memory.
    pub(super) fn moments_to_host(&self) -> Vec<HostTensor> {
        let list = self.moments();
        list.specs.iter().enumerate().map(|(i, (n, s))| (n.clone(), s.clone(), (list.values)(i))).collect()
    }

    /// Flat gradients as Burn gradients, keyed by parameter id.
    fn to_params<I: Backend>(&self, device: &I::Device) -> GradientsParams {
        let mut grads = GradientsParams::new();
        for s in self.trained_slots() {
            let data = TensorData::new(s.get(&self.total), s.shape.clone());
            let id = param_id(&s.name);
            match s.shape.len() {
                1 => grads.register(id, Tensor::<I, 1>::from_data(data, device)),
                _ => grads.register(id, Tensor::<I, 2>::from_data(data, device)),
            }
        }
        grads
    }

    fn from_params<I: Backend>(&mut self, mut grads: GradientsParams) -> Result<()> {
        let slots = match &self.lora {
            Some((layout, _)) => &layout.slots,
            None => &self.kern.layout.slots,
        };
        for s in slots {
            let id = param_id(&s.name);
            let data = match s.shape.len() {
                1 => grads.remove::<I, 1>(id).map(|t| t.into_data()),
                _ => grads.remove::<I, 2>(id).map(|t| t.into_data()),
            };
            let data = data.ok_or_else(|| anyhow::anyhow!("averaged gradients lack '{}'", s.name))?;
            let values = data.convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("gradient of '{}': {e:?}", s.name))?;
            s.put(&mut self.total, &values);
        }
        Ok(())
    }

    /// Mean validation loss (nats per token) over fixed batches.
    pub(super) fn eval_loss<B: Backend>(&self, model: &Llama<B>, batches: &[Batch]) -> Result<f64> {
        let copy;
        let w = match self.loaded {
            true => self.base(),
            false => {
                copy = self.kern.layout.weights(model)?;
                Weights::F32(&copy)
            }
        };
        // Before the first step the copy has the adapters merged in (`Layout::weights`).
        let ad = self.adapt().filter(|_| self.loaded);
        let (mut sum, mut n) = (0.0, 0.0);
        for b in batches {
            let weight = super::graph::loss_weight(b);
            if let Some(pairs) = &b.pairs {
                sum += self.kern.contrastive(w, ad, pairs, None, false).loss * weight;
                n += weight;
                continue;
            }
            let pass = match ad {
                Some(ad) => self.kern.adapter_loss_and_grads(w, ad, &batch_ref(b), None, false),
                None => match w {
                    Weights::F32(w) => self.kern.loss_and_grads(w, &batch_ref(b), None),
                    Weights::Half(..) => unreachable!("a half-type base comes with adapters"),
                },
            };
            sum += pass.loss * weight;
            n += weight;
        }
        Ok(sum / f64::max(n, 1.0))
    }
}

/// The L2 norm of `g`, in eight partial f64 sums (so that the loop vectorises and the order is
/// fixed).
fn global_norm(g: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = g.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64 * x as f64).sum();
    for ch in chunks {
        for i in 0..8 {
            acc[i] += ch[i] as f64 * ch[i] as f64;
        }
    }
    (acc.iter().sum::<f64>() + tail).sqrt()
}

/// A parameter's values (its Burn shape) from the flat weights, f32 or a half type.
fn slot_values(s: &Slot, w: Weights) -> Vec<f32> {
    match w {
        Weights::F32(w) => s.get(w),
        Weights::Half(w, h) => s.rows().flat_map(|r| w[r].iter().map(move |&b| h.decode(b))).collect(),
    }
}

/// Replaces every parameter's value with its values from the flat weights.
struct WriteWeights<'a, B: AutodiffBackend> {
    slots: &'a [Slot],
    index: &'a HashMap<String, usize>,
    w: Weights<'a>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> MapNamed<B> for WriteWeights<'_, B> {
    fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(&i) = self.index.get(name) else {
            return param;
        };
        let s = &self.slots[i];
        let (id, tensor, mapper) = param.consume();
        drop(tensor);
        let data = TensorData::new(slot_values(s, self.w), s.shape.clone());
        let inner = Tensor::<B::InnerBackend, D>::from_data(data, self.device);
        Param::from_mapped_value(id, Tensor::from_inner(inner).require_grad(), mapper)
    }
}

/// Replaces every parameter the flat layout holds with a one-value placeholder.
struct Hollow<'a, B: AutodiffBackend> {
    index: &'a HashMap<String, usize>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> MapNamed<B> for Hollow<'_, B> {
    fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !self.index.contains_key(name) {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        drop(tensor);
        let inner = Tensor::<B::InnerBackend, D>::zeros(Shape::new([1; D]), self.device);
        Param::from_mapped_value(id, Tensor::from_inner(inner).require_grad(), mapper)
    }
}
