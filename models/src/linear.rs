//! A linear layer's matmul as one custom autodiff op whose three GEMMs a backend may run as its own
//! kernel (`train.cublaslt`: cuBLASLt on CUDA, `trainer/src/cublaslt_cuda.rs`).
//!
//! `Llama::mm` computes `Y[N, O] = X[N, I] · W[I, O]`. Burn's autodiff differentiates a matmul by
//! transposing its inputs (`dX = dY · Wᵀ`, `dW = Xᵀ · dY`), which on a GPU may copy them. Here the
//! three products are one call each of a GEMM with transposes as flags:
//!
//! ```text
//! forward:   Y  = gemm(X, W)                 [N, O]
//! backward:  dX = gemm(dY, W, trans_b)       [N, I]
//!            dW = gemm(X, dY, trans_a)       [I, O]
//! ```
//!
//! The op keeps X and W (as Burn's matmul does). A backend registers its GEMM as a
//! [`GemmKernel`]; elsewhere the GEMM is Burn's matmul of the transposed views, so on flex and
//! wgpu the op is Burn's matmul with its backward written out, and tested against it.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

/// `a · b` for `a: [M, K]`, `b: [K, N]`.
pub type MatmulFn<B> = fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>;

/// A backend's GEMM: `op(a) · op(b)`, where `trans_a` means `a` is stored `[K, M]` (and
/// `trans_b`, `b` stored `[N, K]`), accumulating in f32, the result in the inputs' type.
pub struct GemmKernel<B: Backend> {
    pub gemm: fn(FloatTensor<B>, FloatTensor<B>, bool, bool) -> FloatTensor<B>,
}

impl<B: Backend> Clone for GemmKernel<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for GemmKernel<B> {}

/// `a · b`: through the op registered for `B` when `fused`, else Burn's matmul.
pub fn matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>, fused: bool) -> Tensor<B, 2> {
    match fused.then(crate::registry::registered::<MatmulFn<B>>).flatten() {
        Some(f) => f(a, b),
        None => a.matmul(b),
    }
}

/// True when backend `B` (an inner backend) has its own GEMM kernel registered.
pub fn has_kernel<B: Backend>() -> bool {
    crate::registry::registered::<GemmKernel<B>>().is_some()
}

/// Registers [`fused_matmul`] for `Autodiff<B, C>` and the forward GEMM for `B`.
pub fn register_autodiff<B: Backend, C: CheckpointStrategy>() {
    crate::registry::register::<MatmulFn<Autodiff<B, C>>>(fused_matmul::<B, C>);
    crate::registry::register::<MatmulFn<B>>(|a, b| gemm(a, b, false, false));
}

/// `op(a) · op(b)` by the kernel registered for `B` (for f32, bf16 and f16), else by Burn's matmul
/// of the transposed views.
pub fn gemm<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>, trans_a: bool, trans_b: bool) -> Tensor<B, 2> {
    let typed = matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if let Some(k) = typed.then(crate::registry::registered::<GemmKernel<B>>).flatten() {
        return Tensor::from_primitive(TensorPrimitive::Float((k.gemm)(a.into_primitive().tensor(), b.into_primitive().tensor(), trans_a, trans_b)));
    }
    let a = if trans_a { a.transpose() } else { a }; // [M, K]
    let b = if trans_b { b.transpose() } else { b }; // [K, N]
    a.matmul(b) // [M, N]
}

/// `a · b` as one autodiff op, with the backward pass of the module docs; gradients flow to both.
pub fn fused_matmul<B: Backend, C: CheckpointStrategy>(
    a: Tensor<Autodiff<B, C>, 2>, // [M, K]
    b: Tensor<Autodiff<B, C>, 2>, // [K, N]
) -> Tensor<Autodiff<B, C>, 2> {
    #[derive(Debug)]
    struct Matmul;

    impl<B: Backend> Backward<B, 2> for Matmul {
        // a and b on the inner backend.
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (a, b) = ops.state;
            let t = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
            let dy = t(grads.consume::<B>(&ops.node)); // [M, N]
            let [na, nb] = ops.parents;
            if let Some(node) = na {
                let da = gemm(dy.clone(), t(b), false, true); // dY · Bᵀ: [M, K]
                grads.register::<B>(node.id, da.into_primitive().tensor());
            }
            if let Some(node) = nb {
                let db = gemm(t(a), dy, true, false); // Aᵀ · dY: [K, N]
                grads.register::<B>(node.id, db.into_primitive().tensor());
            }
        }
    }

    let t = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
    let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    let out = match Matmul.prepare::<C>([a.node.clone(), b.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = gemm(t(a.primitive.clone()), t(b.primitive.clone()), false, false);
            prep.finish((a.primitive, b.primitive), y.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(gemm(t(a.primitive), t(b.primitive), false, false).into_primitive().tensor()),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
