//! Rotary position embeddings (RoPE, the half-split convention) and, for training, RoPE on the
//! joined q/k/v projection as one custom autodiff op (`train.fused_proj`).
//!
//! For a head vector `x = [a, b]` (halves of `Hd/2`) at position `p`, with the tables' `cos` and
//! `sin` of `p·θ^(−2i/Hd)` (each frequency twice, so `sin_{j+Hd/2} = sin_j`):
//!
//! ```text
//! rope(x)      = x · cos + [−b, a] · sin
//! rope⁻¹(dy)   = dy · cos − [−dy_b, dy_a] · sin   = rope(dy) with −sin     (the backward)
//! ```
//!
//! With the projections joined (`Llama::projs`), q, k and v leave one matmul as
//! `y: [B, T, (H + 2K)·Hd]`; [`joined_rope`] rotates its first `H + K` heads (q and k) in place and
//! leaves v, one op each way instead of the narrows, concatenations and products of [`rope`] on q
//! and k apart. A backend may register the rotation as one kernel ([`RopeKernels`]:
//! `trainer/src/cube_kernels/rope.rs` on wgpu and CUDA); elsewhere it runs as tensor ops.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

/// RoPE tables in the half-split convention: `[T, Hd]`, the frequencies repeated twice.
pub fn rope_tables<B: Backend>(max_t: usize, hd: usize, theta: f64, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(max_t * hd);
    let mut sin = Vec::with_capacity(max_t * hd);
    for pos in 0..max_t {
        for j in 0..hd {
            let inv = 1.0 / theta.powf((2 * (j % half)) as f64 / hd as f64);
            let a = pos as f64 * inv;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (Tensor::from_data(TensorData::new(cos, [max_t, hd]), device), Tensor::from_data(TensorData::new(sin, [max_t, hd]), device))
}

/// `x * cos + rotate_half(x) * sin`, with `rotate_half([a, b]) = [-b, a]` on the head dim;
/// `cos` and `sin` broadcast over the heads (and over the batch when they are `[1, 1, T, Hd]`).
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let hd = x.dims()[3];
    let a = x.clone().narrow(3, 0, hd / 2); // [B, H, T, Hd/2]
    let b = x.clone().narrow(3, hd / 2, hd / 2); // [B, H, T, Hd/2]
    let rot = Tensor::cat(vec![b.neg(), a], 3); // [B, H, T, Hd]
    x * cos.clone() + rot * sin.clone()
}

/// RoPE on the first `rot` heads of the joined projection `y: [B, T, NH·Hd]`, with
/// `cos, sin: [1 or B, 1, T, Hd]`.
pub type JoinedRopeFn<B> = fn(Tensor<B, 3>, Tensor<B, 4>, Tensor<B, 4>, usize) -> Tensor<B, 3>;

/// The rotation as one kernel of backend `B`, for f32 tensors: `(y [B, T, NH·Hd], cos, sin
/// [1 or B, 1, T, Hd], rot, inverse) -> [B, T, NH·Hd]`; `inverse` rotates by `−sin` (the backward).
pub struct RopeKernels<B: Backend> {
    pub rotate: fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize, bool) -> FloatTensor<B>,
}

impl<B: Backend> Clone for RopeKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for RopeKernels<B> {}

/// The op registered for `B` (by [`register_autodiff`]), if any.
pub fn registered<B: Backend>() -> Option<JoinedRopeFn<B>> {
    crate::registry::registered::<JoinedRopeFn<B>>()
}

/// Registers [`joined_rope`] for `Autodiff<B, C>` and [`forward`] for `B`.
pub fn register_autodiff<B: Backend, C: CheckpointStrategy>() {
    crate::registry::register::<JoinedRopeFn<Autodiff<B, C>>>(joined_rope::<B, C>);
    crate::registry::register::<JoinedRopeFn<B>>(forward::<B>);
}

fn tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// [`rope`] on the first `rot` heads of `y` by tensor ops (what the kernels are tested against).
pub fn decomposed<B: Backend>(y: Tensor<B, 3>, cos: Tensor<B, 4>, sin: Tensor<B, 4>, rot: usize) -> Tensor<B, 3> {
    let [b, t, w] = y.dims();
    let hd = cos.dims()[3];
    let nh = w / hd;
    let heads = y.reshape([b, t, nh, hd]).swap_dims(1, 2); // [B, NH, T, Hd]
    let turned = rope(heads.clone().narrow(1, 0, rot), &cos, &sin); // [B, rot, T, Hd]
    let out = match nh - rot {
        0 => turned,
        rest => Tensor::cat(vec![turned, heads.narrow(1, rot, rest)], 1), // [B, NH, T, Hd]
    };
    out.swap_dims(1, 2).reshape([b, t, w])
}

/// The rotation (or with `inverse`, its transpose) by the kernel registered for `B` where the
/// tensors are f32, else by tensor ops.
fn rotate<B: Backend>(y: Tensor<B, 3>, cos: Tensor<B, 4>, sin: Tensor<B, 4>, rot: usize, inverse: bool) -> Tensor<B, 3> {
    let f32s = [y.dtype(), cos.dtype(), sin.dtype()].iter().all(|d| *d == DType::F32);
    match f32s.then(crate::registry::registered::<RopeKernels<B>>).flatten() {
        Some(k) => tensor((k.rotate)(y.into_primitive().tensor(), cos.into_primitive().tensor(), sin.into_primitive().tensor(), rot, inverse)),
        None if inverse => decomposed(y, cos, sin.neg(), rot),
        None => decomposed(y, cos, sin, rot),
    }
}

/// The forward alone (evaluation, no autodiff): what a backend without autodiff registers.
pub fn forward<B: Backend>(y: Tensor<B, 3>, cos: Tensor<B, 4>, sin: Tensor<B, 4>, rot: usize) -> Tensor<B, 3> {
    rotate(y, cos, sin, rot, false)
}

/// RoPE on the joined projection as one autodiff op: the gradient flows to `y` (the tables are
/// constants) through the inverse rotation.
pub fn joined_rope<B: Backend, C: CheckpointStrategy>(
    y: Tensor<Autodiff<B, C>, 3>,   // [B, T, NH·Hd]
    cos: Tensor<Autodiff<B, C>, 4>, // [1 or B, 1, T, Hd]
    sin: Tensor<Autodiff<B, C>, 4>, // [1 or B, 1, T, Hd]
    rot: usize,
) -> Tensor<Autodiff<B, C>, 3> {
    #[derive(Debug)]
    struct JoinedRope;

    impl<B: Backend> Backward<B, 1> for JoinedRope {
        // cos and sin on the inner backend, and the heads rotated.
        type State = (FloatTensor<B>, FloatTensor<B>, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (cos, sin, rot) = ops.state;
            let dy = tensor::<B, 3>(grads.consume::<B>(&ops.node));
            let dx = rotate(dy, tensor(cos), tensor(sin), rot, true);
            let [ny] = ops.parents;
            if let Some(node) = ny {
                grads.register::<B>(node.id, dx.into_primitive().tensor());
            }
        }
    }

    let (cos, sin) = (cos.inner(), sin.inner());
    let y = y.into_primitive().tensor();
    let out = match JoinedRope.prepare::<C>([y.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = (cos.clone().into_primitive().tensor(), sin.clone().into_primitive().tensor(), rot);
            prep.finish(state, forward(tensor::<B, 3>(y.primitive), cos, sin, rot).into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(tensor::<B, 3>(y.primitive), cos, sin, rot).into_primitive().tensor()),
    };
    tensor(out)
}
