//! The training loss, masked mean cross-entropy over the vocabulary, as one custom autodiff op
//! (`train.fused_loss`).
//!
//! Over a large vocabulary (GPT-2's 50,257 tokens) the logits `[N, V]` are the largest tensor of
//! the step: 3.3 GB in f32 for N = 16 x 1024 tokens. Burn's `log_softmax` + `gather` makes its
//! autodiff graph write several tensors of that size in the forward pass (shifted logits, their
//! exponentials, kept for the backward pass, the log-probabilities) and several more in the
//! backward pass (the gather's scatter, the sum's broadcast, the exp's product, their sum). This
//! op needs one `[N, V]` pass each way beyond reading the logits:
//!
//! ```text
//! forward:   m = max_j x_ij,  lse_i = m + log Σ_j exp(x_ij − m)      [N, 1]
//!            loss = Σ_i w_i · (lse_i − x_i,y_i)                      [1]
//! backward:  dx_ij = g · w_i · (exp(x_ij − lse_i) − [j = y_i])       [N, V]
//! ```
//!
//! `w_i` is the token's weight: its mask over the number of loss-bearing tokens, so that `loss` is
//! the masked mean. The op keeps the logits (the decomposed graph keeps their exponentials, the
//! same size) and `lse`. Like the fused attention it is found per backend through `registry.rs`;
//! for a backend without autodiff (evaluation) the registered function is the forward alone,
//! which never forms the log-probabilities. A backend may register each pass as one kernel
//! ([`LossKernels`]: the trainer's CubeCL kernels, `trainer/src/cube_kernels/loss.rs`, read the
//! logits once each way); elsewhere the passes run as tensor ops.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

/// `Σ_i w_i · −log softmax(x_i)[y_i]` for logits `[N, V]`, targets `[N, 1]` and weights `[N, 1]`.
pub type CrossEntropyFn<B> = fn(Tensor<B, 2>, Tensor<B, 2, Int>, Tensor<B, 2>) -> Tensor<B, 1>;

/// The two passes as kernels of backend `B`, for f32 logits and i32 targets.
pub struct LossKernels<B: Backend> {
    /// `(x [N, V], y [N, 1], w [N, 1]) -> (loss [1], lse [N, 1])`.
    pub forward: fn(FloatTensor<B>, IntTensor<B>, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>),
    /// `(x [N, V], y [N, 1], lse [N, 1], w [N, 1], g [1]) -> dx [N, V]`.
    pub backward: fn(FloatTensor<B>, IntTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
}

impl<B: Backend> Clone for LossKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for LossKernels<B> {}

/// The kernels registered for `B`, for f32 logits and i32 targets (else the tensor ops).
fn kernels<B: Backend>(x: &Tensor<B, 2>, y: &Tensor<B, 2, Int>, w: &Tensor<B, 2>) -> Option<LossKernels<B>> {
    if x.dtype() != DType::F32 || y.dtype() != DType::I32 || w.dtype() != DType::F32 {
        return None;
    }
    crate::registry::registered::<LossKernels<B>>()
}

/// The weighted cross-entropy: by the op registered for `B` when `fused` (see the module docs),
/// else through Burn's `log_softmax` and `gather`. Returns a `[1]` tensor.
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,       // [N, V]
    targets: Tensor<B, 2, Int>, // [N, 1]
    weights: Tensor<B, 2>,      // [N, 1]
    fused: bool,
) -> Tensor<B, 1> {
    match fused.then(registered::<B>).flatten() {
        Some(f) => f(logits, targets, weights),
        None => decomposed(logits, targets, weights),
    }
}

/// Burn's composition: `log_softmax`, `gather`, weighted sum (the reference the op is tested against).
pub fn decomposed<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2, Int>, weights: Tensor<B, 2>) -> Tensor<B, 1> {
    let logp = log_softmax(logits, 1); // [N, V]
    (logp.gather(1, targets).neg() * weights).sum() // [1]
}

/// Over the last dimension of `x: [.., V]`: `logsumexp(x)` and the target's logit `x[y]`, both
/// `[.., 1]`, with the maximum subtracted before `exp`.
fn lse_and_target<B: Backend, const D: usize>(x: Tensor<B, D>, targets: Tensor<B, D, Int>) -> (Tensor<B, D>, Tensor<B, D>) {
    let last = D - 1;
    let m = x.clone().max_dim(last); // [.., 1]
    let lse = (x.clone() - m.clone()).exp().sum_dim(last).log() + m; // [.., 1]
    (lse, x.gather(last, targets)) // [.., 1], [.., 1]
}

/// `log softmax(x)[y]` over the last dimension without forming the log-probabilities:
/// `x[y] − logsumexp(x)`, for logits `[.., V]` and targets `[.., 1]`. Returns `[.., 1]`.
pub fn target_logprobs<B: Backend, const D: usize>(logits: Tensor<B, D>, targets: Tensor<B, D, Int>) -> Tensor<B, D> {
    let (lse, picked) = lse_and_target(logits, targets);
    picked - lse
}

/// The op's forward pass on any backend: the loss `[1]` and `lse` `[N, 1]`.
fn forward<B: Backend>(x: Tensor<B, 2>, targets: Tensor<B, 2, Int>, weights: Tensor<B, 2>) -> (Tensor<B, 1>, Tensor<B, 2>) {
    if let Some(k) = kernels(&x, &targets, &weights) {
        let (loss, lse) = (k.forward)(x.into_primitive().tensor(), targets.into_primitive(), weights.into_primitive().tensor());
        return (Tensor::from_primitive(TensorPrimitive::Float(loss)), Tensor::from_primitive(TensorPrimitive::Float(lse)));
    }
    let (lse, picked) = lse_and_target(x, targets); // [N, 1], [N, 1]
    (((lse.clone() - picked) * weights).sum(), lse) // [1], [N, 1]
}

/// The forward pass alone (no gradients): what a backend without autodiff registers.
pub fn forward_only<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2, Int>, weights: Tensor<B, 2>) -> Tensor<B, 1> {
    forward(logits, targets, weights).0
}

/// Registers [`fused_cross_entropy`] for `Autodiff<B, C>` and [`forward_only`] for `B`.
pub fn register_autodiff<B: Backend, C: CheckpointStrategy>() {
    crate::registry::register::<CrossEntropyFn<Autodiff<B, C>>>(fused_cross_entropy::<B, C>);
    crate::registry::register::<CrossEntropyFn<B>>(forward_only::<B>);
}

/// The cross-entropy registered for `B`, if any.
pub fn registered<B: Backend>() -> Option<CrossEntropyFn<B>> {
    crate::registry::registered::<CrossEntropyFn<B>>()
}

/// The weighted cross-entropy as one autodiff op, with the backward pass of the module docs.
/// Gradients flow to the logits only (targets and weights are data).
pub fn fused_cross_entropy<B: Backend, C: CheckpointStrategy>(
    logits: Tensor<Autodiff<B, C>, 2>,       // [N, V]
    targets: Tensor<Autodiff<B, C>, 2, Int>, // [N, 1]
    weights: Tensor<Autodiff<B, C>, 2>,      // [N, 1]
) -> Tensor<Autodiff<B, C>, 1> {
    #[derive(Debug)]
    struct CrossEntropy;

    impl<B: Backend> Backward<B, 1> for CrossEntropy {
        // The logits, targets, lse and weights, on the inner backend.
        type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (x, y, lse, w) = ops.state;
            let g = grads.consume::<B>(&ops.node); // [1]
            let [Some(node)] = ops.parents else { return };
            let f = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
            let (x, y, w) = (f(x), Tensor::<B, 2, Int>::from_primitive(y), f(w));
            if let Some(k) = kernels(&x, &y, &w) {
                let dx = (k.backward)(x.into_primitive().tensor(), y.into_primitive(), lse, w.into_primitive().tensor(), g);
                grads.register::<B>(node.id, dx);
                return;
            }
            let g = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(g)).unsqueeze::<2>(); // [1, 1]
            let coef = w * g; // [N, 1]
            let dx = (x - f(lse)).exp() * coef.clone(); // [N, V]: softmax · g · w
            let dx = dx.scatter(1, y, coef.neg(), IndexingUpdateOp::Add); // [N, V]
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }

    let (y, w) = (targets.inner(), weights.inner());
    let x = logits.into_primitive().tensor();
    let inner = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
    let out = match CrossEntropy.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (loss, lse) = forward(inner(x.primitive.clone()), y.clone(), w.clone());
            let state = (x.primitive, y.into_primitive(), lse.into_primitive().tensor(), w.into_primitive().tensor());
            prep.finish(state, loss.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(forward_only(inner(x.primitive), y, w).into_primitive().tensor()),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
