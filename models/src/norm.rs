//! RMSNorm for training as one custom autodiff op (`train.fused_norm`).
//!
//! Burn's autodiff derives RMSNorm's backward pass from its forward (square, mean, add, sqrt,
//! divide, multiply): about a dozen tensor ops a norm each way, and two norms a layer. Written
//! out, the two passes over rows `x: [N, D]` with weight `w: [D]` are
//!
//! ```text
//! forward:   r_i = 1 / √(mean_j x_ij² + ε)                    [N, 1]
//!            y_ij = x_ij · r_i · w_j                          [N, D]
//! backward:  x̂ = x · r,   g = dy · w                          [N, D]
//!            dx_ij = r_i · (g_ij − x̂_ij · mean_j(g_ij · x̂_ij))  [N, D]
//!            dw_j = Σ_i dy_ij · x̂_ij                          [D]
//! ```
//!
//! and the op keeps `x` and `r` between them. A backend may register each pass as one kernel
//! ([`NormKernels`]: the trainer's CubeCL kernels, `trainer/src/cube_kernels/norm.rs`, for wgpu
//! and CUDA); elsewhere the passes run as the tensor ops above. Like the fused attention the op is
//! found per backend through `registry.rs`.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

/// RMSNorm over the last dimension of `x: [B, T, D]` with weight `w: [D]` and `eps`.
pub type RmsNormFn<B> = fn(Tensor<B, 3>, Tensor<B, 1>, f64) -> Tensor<B, 3>;

/// The two passes as kernels of backend `B`, for f32 rows `[N, D]`.
pub struct NormKernels<B: Backend> {
    /// `(x [N, D], w [D], eps) -> (y [N, D], r [N, 1])`.
    pub forward: fn(FloatTensor<B>, FloatTensor<B>, f32) -> (FloatTensor<B>, FloatTensor<B>),
    /// `(x [N, D], w [D], r [N, 1], dy [N, D]) -> (dx [N, D], dw [D])`.
    pub backward: fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>),
}

impl<B: Backend> Clone for NormKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for NormKernels<B> {}

/// `x · rsqrt(mean(x²) + eps) · w`: by the op registered for `B` when `fused`, else Burn's
/// composition (what the op is tested against).
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64, fused: bool) -> Tensor<B, 3> {
    match fused.then(crate::registry::registered::<RmsNormFn<B>>).flatten() {
        Some(f) => f(x, w, eps),
        None => decomposed(x, w, eps),
    }
}

/// Burn's composition, differentiated by autodiff.
pub fn decomposed<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let rms = (x.clone().square().mean_dim(2) + eps).sqrt(); // [B, T, 1]
    x / rms * w.unsqueeze::<3>() // [B, T, D]
}

/// Registers [`fused_rms_norm`] for `Autodiff<B, C>` and [`forward_only`] for `B`.
pub fn register_autodiff<B: Backend, C: CheckpointStrategy>() {
    crate::registry::register::<RmsNormFn<Autodiff<B, C>>>(fused_rms_norm::<B, C>);
    crate::registry::register::<RmsNormFn<B>>(forward_only::<B>);
}

/// The kernels registered for `B`, for f32 tensors (other types take the tensor ops).
fn kernels<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 1>) -> Option<NormKernels<B>> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    crate::registry::registered::<NormKernels<B>>()
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The forward pass on rows: `(y [N, D], r [N, 1])`.
pub fn forward<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 2>) {
    if let Some(k) = kernels(&x, &w) {
        let (y, r) = (k.forward)(prim(x), prim(w), eps as f32);
        return (tensor(y), tensor(r));
    }
    let r = (x.clone().square().mean_dim(1) + eps).sqrt().recip(); // [N, 1]
    (x * r.clone() * w.unsqueeze::<2>(), r) // [N, D], [N, 1]
}

/// The backward pass on rows: `(dx [N, D], dw [D])`.
pub fn backward<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, r: Tensor<B, 2>, dy: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 1>) {
    if let Some(k) = kernels(&x, &w).filter(|_| dy.dtype() == DType::F32) {
        let (dx, dw) = (k.backward)(prim(x), prim(w), prim(r), prim(dy));
        return (tensor(dx), tensor(dw));
    }
    let xh = x * r.clone(); // [N, D]
    let dw = (dy.clone() * xh.clone()).sum_dim(0).squeeze_dim::<1>(0); // [D]
    let g = dy * w.unsqueeze::<2>(); // [N, D]
    let mean = (g.clone() * xh.clone()).mean_dim(1); // [N, 1]
    ((g - xh * mean) * r, dw) // [N, D], [D]
}

/// The forward alone (evaluation, no autodiff): what a backend without autodiff registers.
pub fn forward_only<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    forward(x.reshape([b * t, d]), w, eps).0.reshape([b, t, d])
}

/// RMSNorm as one autodiff op, with the backward pass of the module docs; gradients flow to `x`
/// and `w`.
pub fn fused_rms_norm<B: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 3>, // [B, T, D]
    w: Tensor<Autodiff<B, C>, 1>, // [D]
    eps: f64,
) -> Tensor<Autodiff<B, C>, 3> {
    #[derive(Debug)]
    struct RmsNorm;

    impl<B: Backend> Backward<B, 2> for RmsNorm {
        // x as rows [N, D], w, r [N, 1], and x's shape [B, T, D], on the inner backend.
        type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, [usize; 3]);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (x, w, r, dims) = ops.state;
            let dy = tensor::<B, 3>(grads.consume::<B>(&ops.node)).reshape([dims[0] * dims[1], dims[2]]); // [N, D]
            let (dx, dw) = backward(tensor(x), tensor(w), tensor(r), dy);
            let [nx, nw] = ops.parents;
            if let Some(node) = nx {
                grads.register::<B>(node.id, prim(dx.reshape(dims)));
            }
            if let Some(node) = nw {
                grads.register::<B>(node.id, prim(dw));
            }
        }
    }

    let dims = x.dims();
    let rows = [dims[0] * dims[1], dims[2]];
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let out = match RmsNorm.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let xr = tensor::<B, 3>(x.primitive).reshape(rows); // [N, D]
            let (y, r) = forward(xr.clone(), tensor(w.primitive.clone()), eps);
            prep.finish((prim(xr), w.primitive, prim(r), dims), prim(y.reshape(dims)))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(forward_only(tensor::<B, 3>(x.primitive), tensor(w.primitive), eps))),
    };
    tensor(out)
}
