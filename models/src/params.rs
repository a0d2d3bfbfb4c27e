//! One walk over a model's parameters with their Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`): Burn's visitor and mapper track the module path,
//! and every reader and writer of named parameters (checkpoints, the CPU kernels' layout,
//! AdamW, the kernels' write-back) goes through [`visit_named`] or [`map_named`].

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::llama::Llama;
use crate::vocab_pad::VocabPad;

/// Sees each float parameter with its Hugging Face name.
pub trait VisitNamed<B: Backend> {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>);
}

/// Replaces each float parameter, knowing its Hugging Face name.
pub trait MapNamed<B: Backend> {
    fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>>;
}

/// Visits every float parameter of `module` with its name.
pub fn visit_named<B: Backend, M: Module<B>, V: VisitNamed<B>>(module: &M, v: &mut V) {
    module.visit(&mut Named { path: Vec::new(), inner: v });
}

/// Maps every float parameter of `module`, by name.
pub fn map_named<B: Backend, M: Module<B>, V: MapNamed<B>>(module: M, v: &mut V) -> M {
    module.map(&mut Named { path: Vec::new(), inner: v })
}

/// Visits the base model's parameters only: LoRA adapters' (`lora_params.rs`) are skipped, and
/// a padded vocabulary's embedding and head are seen at their true size (`vocab_pad.rs`).
/// Checkpoints of the model, its export and the kernels' layout see the base through this.
pub fn visit_base<B: Backend, V: VisitNamed<B>>(model: &Llama<B>, v: &mut V) {
    visit_named(model, &mut Base { inner: v, pad: model.vocab_pad() });
}

struct Base<'a, V> {
    inner: &'a mut V,
    pad: Option<VocabPad>,
}

impl<B: Backend, V: VisitNamed<B>> VisitNamed<B> for Base<'_, V> {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
        match self.pad {
            _ if crate::lora_params::is_adapter(name) => {}
            Some(pad) if VocabPad::pads(name) => self.inner.visit(name, &Param::initialized(param.id, pad.narrow(name, param.val()))),
            _ => self.inner.visit(name, param),
        }
    }
}

/// The module path as Burn walks it; the parameter's name is `path.weight`.
struct Named<'a, V> {
    path: Vec<String>,
    inner: &'a mut V,
}

impl<V> Named<'_, V> {
    fn name(&self) -> String {
        format!("{}.weight", self.path.join("."))
    }
}

impl<B: Backend, V: VisitNamed<B>> ModuleVisitor<B> for Named<'_, V> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = self.name();
        self.inner.visit(&name, param);
    }
}

impl<B: Backend, V: MapNamed<B>> ModuleMapper<B> for Named<'_, V> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.name();
        self.inner.map(&name, param)
    }
}
