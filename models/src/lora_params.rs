//! LoRA adapters as parameters of the Burn model ([`crate::Llama::lora`]), for training them on
//! Burn's graph and on the CPU kernels. An adapted projection computes
//! `y = x·W + s·(x·Aᵀ)·Bᵀ` (`W` `[in, out]` as `llama.rs` holds it; `A` `[r, in]` and `B`
//! `[out, r]` in PEFT's layouts, so an adapter moves to and from PEFT's files unchanged).
//!
//! The parameters' names follow the module path: `lora.layers.{i}.self_attn.q_proj.lora_A.weight`
//! is PEFT's `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`. Every name
//! starting `lora.` belongs to an adapter ([`is_adapter`]); code that reads or writes the base
//! model's weights skips them (`params::visit_base`).

#![allow(non_snake_case)]

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::llama::param_id;
use crate::lora::{module_path, Adapter, LoraSpec, Pair, TARGETS};
use crate::lora_dropout::Dropout;
use crate::ModelError;

/// The prefix of every adapter parameter's name.
pub const PREFIX: &str = "lora.";

/// Whether the parameter called `name` is an adapter's.
pub fn is_adapter(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// One adapted projection.
#[derive(Module, Debug)]
pub struct LoraPair<B: Backend> {
    pub lora_A: Param<Tensor<B, 2>>, // [r, in]
    pub lora_B: Param<Tensor<B, 2>>, // [out, r]
}

#[derive(Module, Debug)]
pub struct LoraAttention<B: Backend> {
    pub q_proj: Option<LoraPair<B>>,
    pub k_proj: Option<LoraPair<B>>,
    pub v_proj: Option<LoraPair<B>>,
    pub o_proj: Option<LoraPair<B>>,
}

#[derive(Module, Debug)]
pub struct LoraMlp<B: Backend> {
    pub gate_proj: Option<LoraPair<B>>,
    pub up_proj: Option<LoraPair<B>>,
    pub down_proj: Option<LoraPair<B>>,
}

#[derive(Module, Debug)]
pub struct LoraLayer<B: Backend> {
    pub self_attn: LoraAttention<B>,
    pub mlp: LoraMlp<B>,
}

/// Every layer's adapters, with the spec they were made with.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub layers: Vec<LoraLayer<B>>,
    #[module(skip)]
    pub spec: LoraSpec,
    /// The run's seed, from which dropout masks derive (`lora_dropout.rs`).
    #[module(skip)]
    pub seed: u64,
    /// The dropout of the pass under way: set by the trainer for each training micro-batch
    /// when `spec.dropout` > 0, and `None` otherwise (evaluation, generation).
    #[module(skip)]
    pub dropout: Option<Dropout>,
}

/// The Burn name of module `path`'s `A` (`which` = "lora_A") or `B` ("lora_B").
pub fn burn_name(path: &str, which: &str) -> String {
    format!("{PREFIX}{}.{which}.weight", path.strip_prefix("model.").unwrap_or(path))
}

impl<B: Backend> Lora<B> {
    /// The adapter's pairs as parameters (those of `n_layers` layers; `adapter.check` has
    /// matched them to the base). Trainable: they require gradients.
    pub fn build(adapter: &Adapter, n_layers: usize, device: &B::Device) -> Result<Self, ModelError> {
        let r = adapter.spec.rank;
        let pair = |i: usize, m: &str| -> Option<LoraPair<B>> {
            let path = module_path(i, m);
            let p = adapter.pairs.get(&path)?;
            let param = |which: &str, v: &[f32], shape: [usize; 2]| {
                let t = Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), shape), device).require_grad();
                Param::initialized(param_id(&burn_name(&path, which)), t)
            };
            Some(LoraPair { lora_A: param("lora_A", &p.a, [r, p.d_in]), lora_B: param("lora_B", &p.b, [p.d_out, r]) })
        };
        let layers = (0..n_layers)
            .map(|i| LoraLayer {
                self_attn: LoraAttention { q_proj: pair(i, "q_proj"), k_proj: pair(i, "k_proj"), v_proj: pair(i, "v_proj"), o_proj: pair(i, "o_proj") },
                mlp: LoraMlp { gate_proj: pair(i, "gate_proj"), up_proj: pair(i, "up_proj"), down_proj: pair(i, "down_proj") },
            })
            .collect::<Vec<_>>();
        let built: usize = layers.iter().map(|l| l.pairs().iter().filter(|p| p.1.is_some()).count()).sum();
        if built != adapter.pairs.len() {
            return Err(ModelError::Config(format!("LoRA: {} of the adapter's {} projections fit a model of {n_layers} layers", built, adapter.pairs.len())));
        }
        Ok(Self { layers, spec: adapter.spec.clone(), seed: 0, dropout: None })
    }

    /// The adapter's current values, for `base` (its `base_model_name_or_path`).
    pub fn to_adapter(&self, base: String) -> Adapter {
        let host = |t: &Param<Tensor<B, 2>>| t.val().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        let mut pairs = BTreeMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (m, p) in l.pairs() {
                if let Some(p) = p {
                    let [_, d_in] = p.lora_A.dims();
                    let [d_out, _] = p.lora_B.dims();
                    pairs.insert(module_path(i, m), Pair { d_in, d_out, a: host(&p.lora_A), b: host(&p.lora_B) });
                }
            }
        }
        Adapter { spec: self.spec.clone(), base, pairs }
    }

    /// The factor `s` of `s·(x·Aᵀ)·Bᵀ`.
    pub fn scale(&self) -> f64 {
        self.spec.scaling()
    }

    /// What projection `m` ([`TARGETS`]' index) of layer `l` feeds its adapter: `x`
    /// `[B, T, In]`, or `x ⊙ mask` while a training pass drops (`lora_dropout.rs`; the mask is
    /// made on the host, as the CPU kernels make it, and is a constant of the graph).
    pub fn input(&self, x: Tensor<B, 3>, l: usize, m: usize) -> Tensor<B, 3> {
        let Some(d) = self.dropout else { return x };
        let [b, t, c] = x.dims();
        let mut mask = vec![0.0f32; b * t * c];
        d.mask(l, m, 0, b * t, c, &mut mask);
        let mask = Tensor::<B, 3>::from_data(TensorData::new(mask, [b, t, c]), &x.device());
        x * mask // [B, T, In]
    }

    /// Sets the dropout of the next training pass: micro-batch `micro` of optimizer step `step`
    /// (nothing when the spec has none).
    pub fn drop_for(&mut self, step: u64, micro: usize) {
        self.dropout = Dropout::new(self.spec.dropout, self.seed, step, micro);
    }
}

/// The base's matrices (embedding, projections, head) cast to `dtype` for storage (a frozen LoRA
/// base in bf16: half the memory); norms and adapters stay as they are. The forward pass casts
/// them back to its compute type as it reads them (`Llama::mm`).
pub fn store_base<B: Backend>(model: crate::Llama<B>, dtype: burn::tensor::DType) -> crate::Llama<B> {
    struct Cast(burn::tensor::DType);
    impl<B: Backend> crate::params::MapNamed<B> for Cast {
        fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if is_adapter(name) || D != 2 {
                return param;
            }
            let dt = self.0;
            param.map(|t| t.cast(dt))
        }
    }
    crate::params::map_named(model, &mut Cast(dtype))
}

/// Each adapter parameter's name and element count (what a LoRA run's optimizer state covers).
pub fn param_sizes<B: Backend>(model: &crate::Llama<B>) -> std::collections::HashMap<String, usize> {
    struct Sizes(std::collections::HashMap<String, usize>);
    impl<B: Backend> crate::params::VisitNamed<B> for Sizes {
        fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
            if is_adapter(name) {
                self.0.insert(name.to_string(), param.shape().num_elements());
            }
        }
    }
    let mut s = Sizes(Default::default());
    crate::params::visit_named(model, &mut s);
    s.0
}

impl<B: Backend> LoraLayer<B> {
    /// The layer's pairs by target name, in [`TARGETS`]' order.
    pub fn pairs(&self) -> [(&'static str, Option<&LoraPair<B>>); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        let all = [a.q_proj.as_ref(), a.k_proj.as_ref(), a.v_proj.as_ref(), a.o_proj.as_ref(), m.gate_proj.as_ref(), m.up_proj.as_ref(), m.down_proj.as_ref()];
        let mut i = 0;
        all.map(|p| {
            i += 1;
            (TARGETS[i - 1], p)
        })
    }
}
