//! The step engines: one model and its optimizer, trained a step at a time, either by Burn's
//! autodiff graph (every backend) or by Kiln's fused CPU kernels (the CPU backends at f32). The
//! training loop calls [`Engine::step`] and [`Engine::eval_loss`] and does not know which runs.
//!
//! Which engine serves a run is decided once, by [`EngineKind::choose`], from the device, the
//! precision and `train.cpu_kernels`; the same choice serves training, validation and `kiln eval`
//! ([`with_scorer`]).

mod graph;
mod kernels;

use anyhow::Result;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use kiln_models::checkpoint::{HostTensor, TensorList};
use kiln_models::{Llama, LlamaConfig};
use kiln_recipes::Precision;

use crate::data::loader::Batch;
use crate::device::Device;
use crate::optim::AdamW;

pub use graph::masked_cross_entropy;

/// Which engine computes forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Burn's autodiff graph, op by op (the GPUs; the CPU in half precision or with
    /// `train.cpu_kernels = false`).
    Graph,
    /// Kiln's fused CPU kernels (`kiln_models::cpu_kernels`).
    CpuKernels,
}

impl EngineKind {
    /// The kernels where they apply (a CPU backend, f32) and are wanted, else Burn's graph.
    pub fn choose(device: &Device, precision: Precision, cpu_kernels: bool) -> Self {
        let on_cpu = matches!(device, Device::Flex | Device::NdArray);
        if cpu_kernels && on_cpu && precision == Precision::F32 {
            EngineKind::CpuKernels
        } else {
            EngineKind::Graph
        }
    }
}

/// What one optimizer step did.
pub struct StepOutput {
    pub loss: f64,
    pub grad_norm: f64,
    /// Input tokens in this step, padding left out.
    pub tokens: usize,
    /// Seconds in the forward pass (with the loss), the backward pass, and clip + AdamW.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optim_s: f64,
}

/// Averages a step's gradients and loss with other workers (data parallelism), between the
/// backward passes and the update.
pub type SyncHook<'a> = &'a mut dyn FnMut(GradientsParams, f64) -> Result<(GradientsParams, f64)>;

enum Kind {
    Graph,
    Kernels(Box<kernels::Kernels>),
}

/// A model and its optimizer, trained by one engine.
pub struct Engine<B: AutodiffBackend> {
    /// `None` only inside a step (Burn's update consumes the model and returns the next).
    model: Option<Llama<B>>,
    opt: AdamW<B::InnerBackend>,
    kind: Kind,
    /// The device of the last step (the kernels fill their emptied Burn model on it).
    device: Option<B::Device>,
}

impl<B: AutodiffBackend> Engine<B> {
    /// An engine of `kind` for `model` (sizes from `cfg`) and `opt` (fresh, or restored from a
    /// checkpoint), the kernels on `threads` threads, with gradient checkpointing or not, and
    /// the retriever's loss as a gradient cache or not.
    pub fn new(kind: EngineKind, model: Llama<B>, opt: AdamW<B::InnerBackend>, cfg: &LlamaConfig, threads: usize, checkpointing: bool, gradient_cache: bool) -> Self {
        let kind = match kind {
            EngineKind::Graph => Kind::Graph,
            EngineKind::CpuKernels => Kind::Kernels(Box::new(kernels::Kernels::new(&model, cfg, threads, checkpointing, gradient_cache))),
        };
        Self { model: Some(model), opt, kind, device: None }
    }

    pub fn kind(&self) -> EngineKind {
        match self.kind {
            Kind::Graph => EngineKind::Graph,
            Kind::Kernels(_) => EngineKind::CpuKernels,
        }
    }

    /// One optimizer step over `micro` (gradients averaged over the micro-batches), with the
    /// gradients passed through `sync` before the clip and the update.
    pub fn step(&mut self, micro: &[Batch], lr: f64, device: &B::Device, sync: Option<SyncHook>) -> Result<StepOutput> {
        let model = self.model.take().ok_or_else(|| anyhow::anyhow!("the engine lost its model in an earlier failed step"))?;
        self.device = Some(device.clone());
        let (model, out) = match &mut self.kind {
            Kind::Graph => graph::step(model, &mut self.opt, micro, lr, device, sync)?,
            Kind::Kernels(k) => k.step(model, &mut self.opt, micro, lr, device, sync)?,
        };
        self.model = Some(model);
        Ok(out)
    }

    /// Mean validation loss (nats per token) over fixed batches, without autodiff.
    pub fn eval_loss(&self, batches: &[Batch], device: &B::Device) -> f64 {
        let model = self.model_ref();
        if let Kind::Kernels(k) = &self.kind {
            match k.eval_loss(model, batches) {
                Ok(v) => return v,
                Err(e) => tracing::warn!("validation through the CPU kernels failed ({e}); using Burn's forward pass"),
            }
        }
        graph::eval_loss(model, batches, device)
    }

    /// The model with its current weights (the kernels fill the parameters they had emptied;
    /// the next step empties them again).
    pub fn model(&mut self) -> &Llama<B> {
        if let (Kind::Kernels(k), Some(device)) = (&mut self.kind, &self.device) {
            if let Some(m) = self.model.take() {
                self.model = Some(k.fill(m, device));
            }
        }
        self.model_ref()
    }

    fn model_ref(&self) -> &Llama<B> {
        match &self.model {
            Some(m) => m,
            None => unreachable!("the model is only taken inside `step` and `model`"),
        }
    }

    /// The weights by name in Burn's layout, each read when it is written (checkpoints).
    pub fn weights(&self) -> TensorList<'_> {
        match &self.kind {
            Kind::Kernels(k) => k.weights().unwrap_or_else(|| TensorList::model(self.model_ref())),
            Kind::Graph => TensorList::model(self.model_ref()),
        }
    }

    /// LoRA: the adapters' current values, made for `base` (their `base_model_name_or_path`);
    /// `None` for a model without adapters.
    pub fn adapter(&self, base: String) -> Option<kiln_models::lora::Adapter> {
        let lora = self.model_ref().lora.as_ref()?;
        match &self.kind {
            Kind::Kernels(k) => k.adapter(base.clone(), &lora.spec).or_else(|| Some(lora.to_adapter(base))),
            Kind::Graph => Some(lora.to_adapter(base)),
        }
    }

    /// Frees what only training needs (the kernels' gradients, AdamW moments and activation
    /// buffers), after the last checkpoint; the model stays.
    pub fn finish_training(&mut self) {
        if let Kind::Kernels(k) = &mut self.kind {
            k.finish_training();
        }
    }

    /// Optimizer steps taken so far.
    pub fn optimizer_steps(&self) -> u64 {
        self.opt.t
    }

    /// The AdamW moments as host tensors (`<name>.exp_avg`, `<name>.exp_avg_sq`, sorted by name),
    /// wherever the engine keeps them.
    pub fn optimizer_state(&self) -> Vec<HostTensor> {
        match &self.kind {
            Kind::Kernels(k) if k.has_moments() => k.moments_to_host(),
            _ => self.opt.to_host(),
        }
    }

    /// [`Engine::optimizer_state`], each tensor read when it is written (checkpoints).
    pub fn optimizer_tensors(&self) -> TensorList<'_> {
        match &self.kind {
            Kind::Kernels(k) if k.has_moments() => k.moments(),
            _ => TensorList::from_host(self.opt.to_host()),
        }
    }
}

/// One step on Burn's graph outside an [`Engine`], for tests and tools that hold the model and
/// the optimizer themselves.
pub fn graph_step<B: AutodiffBackend>(model: Llama<B>, opt: &mut AdamW<B::InnerBackend>, micro: &[Batch], lr: f64, device: &B::Device) -> (Llama<B>, StepOutput) {
    match graph::step(model, opt, micro, lr, device, None) {
        Ok(r) => r,
        Err(_) => unreachable!("a step without a sync hook cannot fail"),
    }
}

/// The step's input tokens, padding left out.
fn real_tokens(micro: &[Batch]) -> usize {
    micro.iter().map(|b| b.tokens).sum()
}

/// Runs `f` on a scorer for `lm`'s model: log-probabilities from the fused CPU kernels under
/// [`EngineKind::CpuKernels`], else from Burn's forward pass.
pub fn with_scorer<B: Backend, R>(
    lm: kiln_evals::ModelScorer<'_, B>,
    cfg: &LlamaConfig,
    kind: EngineKind,
    threads: usize,
    f: impl FnOnce(&mut dyn kiln_evals::Scorer) -> Result<R>,
) -> Result<R> {
    match kind {
        EngineKind::CpuKernels => f(&mut kiln_evals::KernelScorer::new(lm, cfg, threads)?),
        EngineKind::Graph => {
            let mut lm = lm;
            f(&mut lm)
        }
    }
}

/// A generator for `model`: batched on the fused CPU kernels under [`EngineKind::CpuKernels`],
/// else on Burn's model.
pub fn generator<'a, B: Backend>(model: &'a Llama<B>, cfg: &LlamaConfig, kind: EngineKind, threads: usize, device: &B::Device) -> Result<kiln_models::generate::Generator<'a, B>> {
    Ok(match kind {
        EngineKind::CpuKernels => kiln_models::generate::Generator::kernels(model, cfg, threads, device)?,
        EngineKind::Graph => kiln_models::generate::Generator::burn(model, cfg.max_position_embeddings, device),
    })
}
