//! LoRA runs: the frozen base with its adapters (fresh, continued from an adapter folder, or
//! restored from a checkpoint), held in the recipe's `lora.base_dtype`, and the base the
//! adapters name in their `adapter_config.json`.

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use kiln_models::checkpoint;
use kiln_models::Llama;

use crate::plan::Plan;

/// LoRA: the `init` model, frozen (no gradients), with adapters: `resume`'s (an adapter and the
/// checkpoint it was read from), else those of an adapter folder named as `init` (continued
/// training, on that adapter's base), else fresh ones (`A` Kaiming-uniform from the run's seed,
/// `B = 0`, so that step 0 is the base model exactly).
pub fn lora_model<B: AutodiffBackend>(plan: &Plan, resume: Option<(kiln_models::lora::Adapter, std::path::PathBuf)>, device: &B::Device) -> Result<Llama<B>> {
    use kiln_models::lora::{self, Adapter};
    let (Some(init), Some(spec)) = (&plan.init_dir, &plan.lora) else { bail!("LoRA trains adapters on a base model: set init") };
    let continued = match lora::is_adapter_dir(init) {
        true => Some((Adapter::read_dir(init)?, init.clone())),
        false => None,
    };
    let base = match &continued {
        Some((a, dir)) => lora::base_of(dir, a)?,
        None => init.clone(),
    };
    let (adapter, from) = match resume.or(continued) {
        Some((a, dir)) => {
            if a.spec != *spec {
                bail!(
                    "{}: the adapter has rank {}, alpha {}, targets {:?}{}; the recipe's [lora] asks for rank {}, alpha {}, targets {:?}{}\n  hint: make [lora] match the adapter to continue training it",
                    dir.display(), a.spec.rank, a.spec.alpha, a.spec.targets, if a.spec.rslora { ", rsLoRA" } else { "" },
                    spec.rank, spec.alpha, spec.targets, if spec.rslora { ", rsLoRA" } else { "" }
                );
            }
            (a, dir)
        }
        None => (Adapter::init(spec.clone(), adapter_base(plan), &plan.model, plan.recipe.train.seed), init.clone()),
    };
    adapter.check(&plan.model, &from)?;
    let model = Llama::<B>::build(&plan.model, &mut *checkpoint::weight_source(&base)?, device)?;
    let mut model = burn::module::Module::no_grad(model);
    if let Some(dt) = base_dtype(plan) {
        check_base_dtype::<B>(&model, dt, device)?;
        model = kiln_models::lora_params::store_base(model, dt);
    }
    let mut lora = kiln_models::lora_params::Lora::build(&adapter, plan.model.num_hidden_layers, device)?;
    lora.seed = plan.recipe.train.seed;
    model.lora = Some(lora);
    Ok(model)
}

/// What a run's adapters name as their base (`base_model_name_or_path`): the Hub id of an
/// `hf://` init, else the base model's absolute path (an adapter folder as init: its base).
pub fn adapter_base(plan: &Plan) -> String {
    let init = plan.recipe.init.as_deref().unwrap_or_default();
    if let Some(id) = init.strip_prefix("hf://") {
        return id.split('@').next().unwrap_or(id).to_string();
    }
    let Some(dir) = &plan.init_dir else { return String::new() };
    let base = match kiln_models::lora::Adapter::read_dir(dir) {
        Ok(a) if kiln_models::lora::is_adapter_dir(dir) => kiln_models::lora::base_of(dir, &a).unwrap_or_else(|_| dir.clone()),
        _ => dir.clone(),
    };
    std::fs::canonicalize(&base).unwrap_or(base).display().to_string()
}

/// The half type the recipe holds the frozen base in (`lora.base_dtype`), if any.
fn base_dtype(plan: &Plan) -> Option<DType> {
    match plan.recipe.lora.as_ref()?.base_dtype.as_str() {
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        _ => None,
    }
}

/// Whether the base can be held in `dt` on `device`: the backend must store the type (wgpu has
/// no bf16), and for f16 every weight must be within its range (±65,504), or the base would
/// hold infinities.
fn check_base_dtype<B: AutodiffBackend>(model: &Llama<B>, dt: DType, device: &B::Device) -> Result<()> {
    let name = if dt == DType::BF16 { "bf16" } else { "f16" };
    if !B::supports_dtype(device, dt) {
        bail!("lora.base_dtype = \"{name}\": this device cannot hold {name} tensors\n  hint: --set lora.base_dtype={} (or f32)", if dt == DType::BF16 { "f16" } else { "bf16" });
    }
    if dt != DType::F16 {
        return Ok(());
    }
    use burn::tensor::ElementConversion;
    struct Range(Option<(String, f32)>);
    impl<B: burn::tensor::backend::Backend> kiln_models::params::VisitNamed<B> for Range {
        fn visit<const D: usize>(&mut self, name: &str, param: &burn::module::Param<burn::tensor::Tensor<B, D>>) {
            if self.0.is_some() || D != 2 || kiln_models::lora_params::is_adapter(name) {
                return;
            }
            let big = param.val().abs().max().into_scalar().elem::<f32>();
            if !(big <= 65504.0) {
                self.0 = Some((name.to_string(), big));
            }
        }
    }
    let mut r = Range(None);
    kiln_models::params::visit_named(model, &mut r);
    match r.0 {
        Some((name, big)) => bail!("lora.base_dtype = \"f16\": the base's '{name}' holds {big}, beyond f16's range (65504)\n  hint: --set lora.base_dtype=bf16 (bf16 has f32's range)"),
        None => Ok(()),
    }
}
