//! Causal self-attention for training, as one custom autodiff op (`train.fused_attention`).
//!
//! Burn 0.21's autodiff backend trains attention by decomposing it (QKᵀ, scale, mask, max, exp,
//! sum, divide, ·V) and keeps several `[B, H, T, T]` tensors per layer alive from the forward to
//! the backward pass. This op instead runs the inner backend's `attention` forward (CubeCL's fused
//! flash attention on a GPU, where it exists; the same composition on the CPU) and keeps only q,
//! k, v and the output `[B, H, T, Hd]`. The backward pass recomputes the probabilities one layer
//! at a time (flash-attention style, without the tiling):
//!
//! ```text
//! S  = Q Kᵀ · s, causal mask      P  = softmax(S)          [B, H, T, T]
//! dV = Pᵀ dO                      dP = dO Vᵀ               [B, H, T, Hd], [B, H, T, T]
//! D  = rowsum(dO ∘ O)             dS = P ∘ (dP − D) · s    [B, H, T, 1],  [B, H, T, T]
//! dQ = dS K                       dK = dSᵀ Q               [B, H, T, Hd]
//! ```
//!
//! `Llama::layer` is generic over any backend, so the op is found through `registry.rs`: the
//! trainer registers [`causal_attention`] for the autodiff backends it builds, and a model with
//! `fused_attention` set uses it when its backend is registered.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor, TensorPrimitive};

/// Causal attention over `q, k, v: [B, H, T, Hd]` (keys and values already repeated to H heads),
/// or with `hide: [B, H, T, T]` (packed rows), attention where `hide` is false.
pub type AttentionFn<B> = fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4, Bool>>) -> Tensor<B, 4>;

/// Makes `f` the fused attention of backend `B` (idempotent).
pub fn register<B: Backend>(f: AttentionFn<B>) {
    crate::registry::register(f);
}

/// Registers [`causal_attention`] for `Autodiff<B, C>`.
pub fn register_autodiff<B: Backend, C: CheckpointStrategy>() {
    register::<Autodiff<B, C>>(causal_attention::<B, C>);
}

/// The fused attention registered for `B`, if any.
pub fn registered<B: Backend>() -> Option<AttentionFn<B>> {
    crate::registry::registered::<AttentionFn<B>>()
}

/// `softmax(Q Kᵀ / √Hd + causal mask) V` with the backward pass above.
pub fn causal_attention<B: Backend, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 4>, // [B, H, T, Hd]
    k: Tensor<Autodiff<B, C>, 4>, // [B, H, T, Hd]
    v: Tensor<Autodiff<B, C>, 4>, // [B, H, T, Hd]
    hide: Option<Tensor<Autodiff<B, C>, 4, Bool>>, // [B, H, T, T], packed rows
) -> Tensor<Autodiff<B, C>, 4> {
    #[derive(Debug)]
    struct CausalAttention;

    impl<B: Backend> Backward<B, 3> for CausalAttention {
        // q, k, v, the output and the mask, on the inner backend.
        type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, Option<BoolTensor<B>>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (q, k, v, o, hide) = ops.state;
            let d_o = grads.consume::<B>(&ops.node);
            let t = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
            let hide = hide.map(Tensor::<B, 4, Bool>::from_primitive);
            let (dq, dk, dv) = attention_backward(t(q), t(k), t(v), t(o), t(d_o), hide);
            let [nq, nk, nv] = ops.parents;
            for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, g.into_primitive().tensor());
                }
            }
        }
    }

    let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: hide.is_none() };
    let (q, k, v) = (q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor());
    let hide: Option<BoolTensor<B>> = hide.map(|h| h.into_primitive());
    let out = match CausalAttention.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let o = B::attention(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), hide.clone(), None, opts);
            prep.finish((q.primitive, k.primitive, v.primitive, o.clone(), hide), o)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::attention(q.primitive, k.primitive, v.primitive, hide, None, opts)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The gradients of causal attention with respect to q, k and v, recomputing the probabilities.
pub fn attention_backward<B: Backend>(
    q: Tensor<B, 4>,   // [B, H, T, Hd]
    k: Tensor<B, 4>,   // [B, H, T, Hd]
    v: Tensor<B, 4>,   // [B, H, T, Hd]
    o: Tensor<B, 4>,   // [B, H, T, Hd], the forward's output
    d_o: Tensor<B, 4>, // [B, H, T, Hd]
    hide: Option<Tensor<B, 4, Bool>>, // [B, H, T, T]; None: causal
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, hd] = q.dims();
    let scale = 1.0 / (hd as f64).sqrt();
    // tril_mask marks the positions above the diagonal (key after query): the ones to hide.
    let hide = hide.unwrap_or_else(|| Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &q.device()).unsqueeze::<4>().expand([b, h, t, t]));
    let s = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale; // [B, H, T, T]
    let p = softmax(s.mask_fill(hide, f32::NEG_INFINITY), 3); // [B, H, T, T]
    let dv = p.clone().swap_dims(2, 3).matmul(d_o.clone()); // [B, H, T, Hd]
    let dp = d_o.clone().matmul(v.swap_dims(2, 3)); // [B, H, T, T]
    let d = (d_o * o).sum_dim(3); // [B, H, T, 1]
    let ds = p * (dp - d) * scale; // [B, H, T, T]
    let dq = ds.clone().matmul(k); // [B, H, T, Hd]
    let dk = ds.swap_dims(2, 3).matmul(q); // [B, H, T, Hd]
    (dq, dk, dv)
}
