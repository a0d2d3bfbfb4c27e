//! The MLP's gate, `silu(g) · u`, for training as one custom autodiff op (`train.fused_swiglu`).
//!
//! Burn's autodiff keeps `sigmoid(g)`, `silu(g)` and the product's inputs, and its backward pass
//! is several element-wise ops over `[N, F]` (F the MLP width, the widest activation of a layer).
//! Written out, with `σ = sigmoid(g)`:
//!
//! ```text
//! forward:   h  = g · σ · u                          [.., F]
//! backward:  dg = dh · u · σ · (1 + g · (1 − σ))     [.., F]
//!            du = dh · g · σ                         [.., F]
//! ```
//!
//! The op keeps `g` and `u` only. A backend may register each pass as one kernel
//! ([`SwigluKernels`]: the trainer's CubeCL kernels, `trainer/src/cube_kernels/swiglu.rs`);
//! elsewhere they run as the tensor ops above.
//!
//! With the gate and up projections joined (`train.fused_proj`: one matmul, `y = [g | u]`,
//! `[B, T, 2F]`), [`fused_swiglu_joined`] reads both halves of `y` in place and writes its
//! gradient as one `[B, T, 2F]` tensor, so neither the halves' copies nor their narrows'
//! backward (a fill and a slice-assign each) exist.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

/// `silu(g) · u` for `g, u: [B, T, F]`.
pub type SwigluFn<B> = fn(Tensor<B, 3>, Tensor<B, 3>) -> Tensor<B, 3>;

/// The two passes as kernels of backend `B`, for f32 tensors of one shape.
pub struct SwigluKernels<B: Backend> {
    /// `(g, u) -> h`.
    pub forward: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
    /// `(g, u, dh) -> (dg, du)`.
    pub backward: fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>),
    /// The joined forward: `y = [g | u] [N, 2F] -> h [N, F]`.
    pub joined_forward: fn(FloatTensor<B>) -> FloatTensor<B>,
    /// The joined backward: `(y [N, 2F], dh [N, F]) -> dy = [dg | du] [N, 2F]`.
    pub joined_backward: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
}

/// `silu(g) · u` for the joined `y = [g | u]: [B, T, 2F]`.
pub type SwigluJoinedFn<B> = fn(Tensor<B, 3>) -> Tensor<B, 3>;

impl<B: Backend> Clone for SwigluKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for SwigluKernels<B> {}

/// `silu(g) · u`: by the op registered for `B` when `fused`, else Burn's composition.
pub fn swiglu<B: Backend>(g: Tensor<B, 3>, u: Tensor<B, 3>, fused: bool) -> Tensor<B, 3> {
    match fused.then(crate::registry::registered::<SwigluFn<B>>).flatten() {
        Some(f) => f(g, u),
        None => decomposed(g, u),
    }
}

/// Burn's composition, differentiated by autodiff.
pub fn decomposed<B: Backend>(g: Tensor<B, 3>, u: Tensor<B, 3>) -> Tensor<B, 3> {
    silu(g) * u
}

/// Registers [`fused_swiglu`] and [`fused_swiglu_joined`] for `Autodiff<B, C>`, and
/// [`forward`] and [`joined_forward`] for `B`.
pub fn register_autodiff<B: Backend, C: CheckpointStrategy>() {
    crate::registry::register::<SwigluFn<Autodiff<B, C>>>(fused_swiglu::<B, C>);
    crate::registry::register::<SwigluFn<B>>(forward::<B>);
    crate::registry::register::<SwigluJoinedFn<Autodiff<B, C>>>(fused_swiglu_joined::<B, C>);
    crate::registry::register::<SwigluJoinedFn<B>>(joined_forward::<B>);
}

/// The joined op registered for `B`, if any.
pub fn registered_joined<B: Backend>() -> Option<SwigluJoinedFn<B>> {
    crate::registry::registered::<SwigluJoinedFn<B>>()
}

/// The kernels registered for `B`, for f32 tensors (other types take the tensor ops).
fn kernels<B: Backend>(g: &Tensor<B, 3>, u: &Tensor<B, 3>) -> Option<SwigluKernels<B>> {
    if g.dtype() != DType::F32 || u.dtype() != DType::F32 {
        return None;
    }
    crate::registry::registered::<SwigluKernels<B>>()
}

fn prim<B: Backend>(t: Tensor<B, 3>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The forward pass: `h = silu(g) · u`.
pub fn forward<B: Backend>(g: Tensor<B, 3>, u: Tensor<B, 3>) -> Tensor<B, 3> {
    match kernels(&g, &u) {
        Some(k) => tensor((k.forward)(prim(g), prim(u))),
        None => silu(g) * u,
    }
}

/// The backward pass: `(dg, du)`.
pub fn backward<B: Backend>(g: Tensor<B, 3>, u: Tensor<B, 3>, dh: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
    if let Some(k) = kernels(&g, &u).filter(|_| dh.dtype() == DType::F32) {
        let (dg, du) = (k.backward)(prim(g), prim(u), prim(dh));
        return (tensor(dg), tensor(du));
    }
    let s = sigmoid(g.clone()); // [.., F]
    let gs = g * s.clone(); // silu(g)
    let dg = dh.clone() * u * (s.clone() + gs.clone() * (s.neg() + 1.0)); // σ·(1 + g·(1 − σ)) = σ + silu(g)·(1 − σ)
    (dg, dh * gs)
}

/// `silu(g) · u` as one autodiff op, with the backward pass of the module docs.
pub fn fused_swiglu<B: Backend, C: CheckpointStrategy>(
    g: Tensor<Autodiff<B, C>, 3>, // [B, T, F]
    u: Tensor<Autodiff<B, C>, 3>, // [B, T, F]
) -> Tensor<Autodiff<B, C>, 3> {
    #[derive(Debug)]
    struct Swiglu;

    impl<B: Backend> Backward<B, 2> for Swiglu {
        // g and u on the inner backend.
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (g, u) = ops.state;
            let dh = tensor::<B>(grads.consume::<B>(&ops.node));
            let (dg, du) = backward(tensor(g), tensor(u), dh);
            let [ng, nu] = ops.parents;
            for (node, d) in [(ng, dg), (nu, du)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, prim(d));
                }
            }
        }
    }

    let (g, u) = (g.into_primitive().tensor(), u.into_primitive().tensor());
    let out = match Swiglu.prepare::<C>([g.node.clone(), u.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let h = forward(tensor::<B>(g.primitive.clone()), tensor(u.primitive.clone()));
            prep.finish((g.primitive, u.primitive), prim(h))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(forward(tensor::<B>(g.primitive), tensor(u.primitive)))),
    };
    tensor(out)
}

/// A kernel's `[N, _]` output as a tensor.
fn rows<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The joined forward: `h = silu(y[.., :F]) · y[.., F:]` for `y: [B, T, 2F]`.
pub fn joined_forward<B: Backend>(y: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, w] = y.dims();
    let f = w / 2;
    match kernels(&y, &y) {
        Some(k) => rows::<B>((k.joined_forward)(y.reshape([b * t, w]).into_primitive().tensor())).reshape([b, t, f]),
        None => silu(y.clone().narrow(2, 0, f)) * y.narrow(2, f, f),
    }
}

/// The joined backward: `dy = [dg | du]: [B, T, 2F]` from `y` and `dh: [B, T, F]`.
pub fn joined_backward<B: Backend>(y: Tensor<B, 3>, dh: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, w] = y.dims();
    let f = w / 2;
    if let Some(k) = kernels(&y, &dh) {
        let (y, dh) = (y.reshape([b * t, w]).into_primitive().tensor(), dh.reshape([b * t, f]).into_primitive().tensor());
        return rows::<B>((k.joined_backward)(y, dh)).reshape([b, t, w]);
    }
    let (dg, du) = backward(y.clone().narrow(2, 0, f), y.narrow(2, f, f), dh);
    Tensor::cat(vec![dg, du], 2)
}

/// `silu(g) · u` on the joined `y = [g | u]` as one autodiff op; it keeps `y`.
pub fn fused_swiglu_joined<B: Backend, C: CheckpointStrategy>(
    y: Tensor<Autodiff<B, C>, 3>, // [B, T, 2F]
) -> Tensor<Autodiff<B, C>, 3> {
    #[derive(Debug)]
    struct SwigluJoined;

    impl<B: Backend> Backward<B, 1> for SwigluJoined {
        type State = FloatTensor<B>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dh = tensor::<B>(grads.consume::<B>(&ops.node));
            let dy = joined_backward(tensor(ops.state), dh);
            let [ny] = ops.parents;
            if let Some(node) = ny {
                grads.register::<B>(node.id, prim(dy));
            }
        }
    }

    let y = y.into_primitive().tensor();
    let out = match SwigluJoined.prepare::<C>([y.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let h = joined_forward(tensor::<B>(y.primitive.clone()));
            prep.finish(y.primitive, prim(h))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(joined_forward(tensor::<B>(y.primitive)))),
    };
    tensor(out)
}
