//! The model set up for a plan before training: the vocabulary padded for aligned matmuls
//! (`train.pad_vocab`), and the compute settings (precision, the fused ops and their kernels) read
//! from the recipe's `train` section.

use burn::tensor::backend::AutodiffBackend;
use kiln_models::Llama;

use crate::engine::EngineKind;
use crate::optim::AdamW;
use crate::plan::{compute_dtype, Plan};

/// `train.pad_vocab` on Burn's graph: the model's embedding and head, and their moments, padded
/// (`kiln_models::vocab_pad`).
pub(crate) fn pad_vocab<B: AutodiffBackend>(model: Llama<B>, opt: &mut AdamW<B::InnerBackend>, plan: &Plan, device: &B::Device) -> Llama<B> {
    let multiple = plan.vocab_multiple();
    if plan.engine == EngineKind::CpuKernels && plan.recipe.train.pad_vocab.is_some_and(|m| m > 1) {
        tracing::warn!("train.pad_vocab applies to Burn's graph only; the fused CPU kernels take any vocabulary");
    }
    let model = model.pad_vocab(multiple);
    let pad = model.vocab_pad();
    opt.pad_vocab(pad, device);
    if let Some(p) = pad {
        tracing::info!("vocabulary padded from {} to {} tokens for aligned matmuls (train.pad_vocab); the logits, loss, checkpoints and exports keep {}", p.vocab, p.padded, p.vocab);
    }
    model
}

/// The model's compute settings from the plan: precision, and the fused attention and loss ops
/// where Burn's graph trains (the kernels have their own).
pub(crate) fn configure<B: AutodiffBackend>(model: &mut Llama<B>, plan: &Plan) {
    let t = &plan.recipe.train;
    let graph = plan.engine == EngineKind::Graph;
    model.compute = compute_dtype(plan.precision);
    if model.compute.is_some() {
        tracing::info!("precision {}: matmuls and attention in half precision, master weights and AdamW in f32", plan.precision);
    }
    model.fused_attention = t.fused_attention && graph;
    if model.fused_attention {
        match kiln_models::attention::registered::<B>() {
            Some(_) => tracing::info!("attention trained as one fused op (train.fused_attention): probabilities recomputed in the backward pass"),
            None => tracing::warn!("train.fused_attention: no fused attention op for this backend; using Burn's decomposed attention"),
        }
    }
    model.flash_attention = t.flash_attention && model.fused_attention;
    if model.flash_attention {
        match kiln_models::registry::registered::<kiln_models::attention::AttentionKernels<B::InnerBackend>>() {
            Some(_) => tracing::info!("attention by Kiln's flash kernels (train.flash_attention): causal rows, head dims up to {}; packed rows keep the fused op's path", kiln_models::attention::FLASH_MAX_HEAD_DIM),
            None => tracing::warn!("train.flash_attention: no flash-attention kernels for this backend (wgpu and CUDA have them); using the fused op's path"),
        }
    } else if t.flash_attention {
        tracing::warn!("train.flash_attention applies to the fused attention op on Burn's graph (train.fused_attention; kernels on wgpu and CUDA); ignored");
    }
    model.fused_loss = t.fused_loss && graph;
    if model.fused_loss && kiln_models::loss::registered::<B>().is_none() {
        tracing::warn!("train.fused_loss: no fused cross-entropy op for this backend; using Burn's log_softmax");
    }
    model.fused_norm = t.fused_norm && graph;
    if model.fused_norm && kiln_models::registry::registered::<kiln_models::norm::RmsNormFn<B>>().is_none() {
        tracing::warn!("train.fused_norm: no fused RMSNorm op for this backend; using Burn's ops");
    }
    model.fused_proj = t.fused_proj && graph;
    model.cublaslt = t.cublaslt && graph && kiln_models::linear::has_kernel::<B::InnerBackend>();
    if model.cublaslt {
        tracing::info!("linear layers through cuBLASLt (train.cublaslt): forward and both backward GEMMs, transposes as flags");
    }
    model.fused_swiglu = t.fused_swiglu && graph;
    if model.fused_swiglu && kiln_models::registry::registered::<kiln_models::swiglu::SwigluFn<B>>().is_none() {
        tracing::warn!("train.fused_swiglu: no fused SwiGLU op for this backend; using Burn's ops");
    }
    if !graph {
        tracing::info!("forward and backward by Kiln's fused CPU kernels on {} threads (train.cpu_kernels)", plan.threads);
        if t.gradient_checkpointing {
            tracing::info!("gradient checkpointing (train.gradient_checkpointing): each layer's forward runs again in the backward pass");
        }
    } else if t.gradient_checkpointing {
        tracing::warn!("train.gradient_checkpointing applies to the fused CPU kernels only; Burn's graph keeps its activations");
    }
    match &plan.recipe.retriever {
        Some(r) if r.gradient_cache && !graph => tracing::info!("gradient cache (retriever.gradient_cache): the embeddings first, then each side forward again for its backward pass"),
        Some(r) if r.gradient_cache => tracing::warn!("retriever.gradient_cache applies to the fused CPU kernels only; Burn's graph keeps both sides' activations"),
        _ => {}
    }
}
