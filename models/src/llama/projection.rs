//! The decoder's projections: `x @ w` in the compute precision (through `linear.rs`'s op), each
//! plus its LoRA adapter where it has one, and projections of one input joined into one matmul
//! (`train.fused_proj`).
//!
//! Shapes as in `llama.rs`; `In`/`Out` are a projection's sizes, `r` an adapter's rank.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::Llama;
use crate::linear::matmul;

impl<B: Backend> Llama<B> {
    /// Projection `m` (`lora::TARGETS`' index: q k v o gate up down) of layer `l`: `x @ w`,
    /// plus the adapter's `s·(x'·Aᵀ)·Bᵀ` where one adapts it (`x'` is `x`, or `x ⊙ mask` under
    /// LoRA dropout): `x: [B, T, In]`, `w: [In, Out]`, `A: [r, In]`, `B: [Out, r]`.
    pub(super) fn proj(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, l: usize, m: usize) -> Tensor<B, 3> {
        let y = self.mm(x.clone(), w); // [B, T, Out]
        match self.adapter(x, l, m) {
            Some(a) => y + a,
            None => y,
        }
    }

    /// Whether projection `m` of layer `l` has an adapter.
    pub(super) fn adapted(&self, l: usize, m: usize) -> bool {
        self.lora.as_ref().is_some_and(|lo| lo.layers[l].pairs()[m].1.is_some())
    }

    /// The adapter's `s·(x'·Aᵀ)·Bᵀ` of projection `m` of layer `l`, where it has one.
    fn adapter(&self, x: Tensor<B, 3>, l: usize, m: usize) -> Option<Tensor<B, 3>> {
        let (lora, p) = self.lora.as_ref().and_then(|lo| lo.layers[l].pairs()[m].1.map(|p| (lo, p)))?;
        let u = self.mm(lora.input(x, l, m), p.lora_A.val().transpose()); // [B, T, r]
        Some(self.mm(u, p.lora_B.val().transpose()) * lora.scale()) // [B, T, Out]
    }

    /// Projections `ms` of layer `l` over the same input: with `fused_proj`, one matmul of the
    /// weights side by side (`x @ [w_1 | w_2 | ..]`, `[B, T, ΣOut]`) split into its parts, each
    /// part plus its adapter; else one [`Self::proj`] each. One GEMM instead of N each way (and
    /// under mixed precision one weight cast), for a copy of the weights into the joined one.
    pub(super) fn projs<const N: usize>(&self, x: Tensor<B, 3>, ws: [Tensor<B, 2>; N], l: usize, ms: [usize; N]) -> [Tensor<B, 3>; N] {
        if !self.fused_proj {
            let mut ws = ws.into_iter();
            return ms.map(|m| match ws.next() {
                Some(w) => self.proj(x.clone(), w, l, m),
                None => unreachable!("one weight a projection"),
            });
        }
        let widths = ws.each_ref().map(|w| w.dims()[1]);
        let y = self.mm_joined(x.clone(), ws); // [B, T, ΣOut]
        let mut start = 0;
        std::array::from_fn(|i| {
            let part = y.clone().narrow(2, start, widths[i]); // [B, T, Out_i]
            start += widths[i];
            match self.adapter(x.clone(), l, ms[i]) {
                Some(a) => part + a,
                None => part,
            }
        })
    }

    /// `x @ [w_1 | w_2 | ..]`: the projections of one input as one matmul, `[B, T, ΣOut]`.
    pub(super) fn mm_joined<const N: usize>(&self, x: Tensor<B, 3>, ws: [Tensor<B, 2>; N]) -> Tensor<B, 3> {
        self.mm(x, Tensor::cat(Vec::from(ws), 1))
    }

    /// `x @ w` for `x: [B, T, In]`, `w: [In, Out]`, in the compute precision; the result is f32.
    /// One 2-D matmul over all `B·T` rows: a batched `[B, T, In] @ [1, In, Out]` would make the
    /// weight's gradient `B` matmuls of depth `T` into a `[B, In, Out]` tensor, then a sum over `B`.
    pub(super) fn mm(&self, x: Tensor<B, 3>, w: Tensor<B, 2>) -> Tensor<B, 3> {
        let [b, t, d_in] = x.dims();
        let d_out = w.dims()[1];
        match self.compute {
            // A base stored in half precision (lora_params::store_base) computes in f32.
            None if w.dtype() != DType::F32 => matmul(x.reshape([b * t, d_in]), w.cast(DType::F32), self.cublaslt).reshape([b, t, d_out]),
            None => matmul(x.reshape([b * t, d_in]), w, self.cublaslt).reshape([b, t, d_out]),
            // Cast before flattening and after unflattening, so that Burn's fusion can merge the
            // casts with the element-wise ops around them.
            Some(dt) => matmul(x.cast(dt).reshape([b * t, d_in]), w.cast(dt), self.cublaslt).reshape([b, t, d_out]).cast(DType::F32),
        }
    }
}
