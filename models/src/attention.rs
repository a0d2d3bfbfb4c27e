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
//!
//! **Flash attention** (`train.flash_attention`): a backend may register both passes as tiled
//! kernels ([`AttentionKernels`]: `trainer/src/cube_kernels/attention.rs` for wgpu and CUDA). The
//! forward then also returns the rows' log-sum-exp `L = m + ln Σ exp(S − m)` `[B, H, T]`, and the
//! backward recomputes `P = exp(S − L)` a tile at a time, so no `[B, H, T, T]` tensor exists in
//! either pass. They take causal attention without a packing mask, in f32, f16 or bf16 (f32
//! accumulation), head dims up to [`FLASH_MAX_HEAD_DIM`]; anything else takes the path above.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor};
use burn::tensor::{Bool, DType, Tensor, TensorPrimitive};

/// Causal attention over `q: [B, H, T, Hd]` and `k, v: [B, K, T, Hd]` (grouped-query attention:
/// `K` divides `H`, and query head `h` reads kv head `h / (H / K)`), or with `hide: [B, H, T, T]`
/// (packed rows), attention where `hide` is false. The last argument asks for the flash kernels
/// where the backend has them; they read each kv head in place for its query heads, where the
/// other paths repeat it ([`repeat_kv`]).
pub type AttentionFn<B> = fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4, Bool>>, bool) -> Tensor<B, 4>;

/// The largest head dimension the flash kernels take.
pub const FLASH_MAX_HEAD_DIM: usize = 128;

/// Flash attention's two passes as kernels of backend `B`: causal, scale `1/√Hd`, `q: [B, H, T,
/// Hd]`, `k, v: [B, K, T, Hd]` with `K` dividing `H`, of one float type.
pub struct AttentionKernels<B: Backend> {
    /// `(q, k, v) -> (o [B, H, T, Hd], lse [B, H, T] f32)`.
    #[allow(clippy::type_complexity)]
    pub forward: fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>),
    /// `(q, k, v, o, lse, dO) -> (dq, dk, dv)`, each shaped as its input (dk and dv summed over
    /// each kv head's query heads).
    #[allow(clippy::type_complexity)]
    pub backward: fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
}

impl<B: Backend> Clone for AttentionKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for AttentionKernels<B> {}

/// The flash kernels registered for `B`, if they take `q` (see the module docs).
pub fn flash_kernels<B: Backend>(q: &Tensor<B, 4>) -> Option<AttentionKernels<B>> {
    let ok = matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) && q.dims()[3] <= FLASH_MAX_HEAD_DIM;
    ok.then(crate::registry::registered::<AttentionKernels<B>>).flatten()
}

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

/// `softmax(Q Kᵀ / √Hd + causal mask) V` with the backward pass above; with `flash`, by the
/// backend's flash kernels where they take the call.
pub fn causal_attention<B: Backend, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 4>, // [B, H, T, Hd]
    k: Tensor<Autodiff<B, C>, 4>, // [B, K, T, Hd]
    v: Tensor<Autodiff<B, C>, 4>, // [B, K, T, Hd]
    hide: Option<Tensor<Autodiff<B, C>, 4, Bool>>, // [B, H, T, T], packed rows
    flash: bool,
) -> Tensor<Autodiff<B, C>, 4> {
    #[derive(Debug)]
    struct CausalAttention;

    impl<B: Backend> Backward<B, 3> for CausalAttention {
        // q, k and v (kv heads not repeated), the output, the mask and (flash) the
        // log-sum-exp, on the inner backend.
        type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, Option<BoolTensor<B>>, Option<FloatTensor<B>>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (q, k, v, o, hide, lse) = ops.state;
            let d_o = grads.consume::<B>(&ops.node);
            let t = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
            let hide = hide.map(Tensor::<B, 4, Bool>::from_primitive);
            let kernels = lse.as_ref().and(crate::registry::registered::<AttentionKernels<B>>());
            let (dq, dk, dv) = match (kernels, lse) {
                (Some(kern), Some(lse)) => {
                    let d_o = t(d_o).cast(t(q.clone()).dtype()).into_primitive().tensor();
                    let (dq, dk, dv) = (kern.backward)(q, k, v, o, lse, d_o);
                    (t(dq), t(dk), t(dv))
                }
                _ => {
                    let group = t(q.clone()).dims()[1] / t(k.clone()).dims()[1];
                    let (dq, dk, dv) = attention_backward(t(q), repeat_kv(t(k), group), repeat_kv(t(v), group), t(o), t(d_o), hide);
                    (dq, fold_kv(dk, group), fold_kv(dv, group))
                }
            };
            let [nq, nk, nv] = ops.parents;
            for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, g.into_primitive().tensor());
                }
            }
        }
    }

    let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: hide.is_none() };
    let group = q.dims()[1] / k.dims()[1];
    // Burn's attention takes as many kv heads as query heads.
    let repeat = |x: FloatTensor<B>| repeat_kv(Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x)), group).into_primitive().tensor();
    let kernels = (flash && hide.is_none()).then(|| flash_kernels(&q.clone().inner())).flatten();
    let (q, k, v) = (q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor());
    let hide: Option<BoolTensor<B>> = hide.map(|h| h.into_primitive());
    let prep = CausalAttention.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful();
    let out = match (prep, kernels) {
        (OpsKind::Tracked(prep), Some(kern)) => {
            let (o, lse) = (kern.forward)(q.primitive.clone(), k.primitive.clone(), v.primitive.clone());
            prep.finish((q.primitive, k.primitive, v.primitive, o.clone(), None, Some(lse)), o)
        }
        (OpsKind::Tracked(prep), None) => {
            let o = B::attention(q.primitive.clone(), repeat(k.primitive.clone()), repeat(v.primitive.clone()), hide.clone(), None, opts);
            prep.finish((q.primitive, k.primitive, v.primitive, o.clone(), hide, None), o)
        }
        (OpsKind::UnTracked(prep), Some(kern)) => prep.finish((kern.forward)(q.primitive, k.primitive, v.primitive).0),
        (OpsKind::UnTracked(prep), None) => prep.finish(B::attention(q.primitive, repeat(k.primitive), repeat(v.primitive), hide, None, opts)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `[B, K, T, Hd]` -> `[B, K·n, T, Hd]`, each kv head repeated for its `n` query heads
/// (Hugging Face's `repeat_kv`).
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, k, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2).repeat_dim(2, n).reshape([b, k * n, t, hd])
}

/// `[B, K·n, T, Hd]` -> `[B, K, T, Hd]`: the gradient of [`repeat_kv`], each kv head's `n`
/// query heads summed.
pub fn fold_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, kn, t, hd] = x.dims();
    x.reshape([b, kn / n, n, t, hd]).sum_dim(2).reshape([b, kn / n, t, hd])
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
