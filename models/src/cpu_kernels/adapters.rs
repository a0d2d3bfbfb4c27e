//! LoRA adapters in the kernels: their flat buffer, and the two halves of an adapted projection.
//!
//! An adapted projection computes `y = x·W + s·(x·Aᵀ)·Bᵀ`, with `W` `[in, out]` frozen and `A`
//! `[r, in]`, `B` `[out, r]` trained (PEFT's layouts, `lora_params.rs`). The adapters have a
//! flat buffer of their own (their gradients and AdamW moments one each of the same layout):
//! layer by layer, each adapted projection's `A` then `B`, in [`TARGETS`]' order. The base's
//! weight gradients are not computed at all while adapters train (`model.rs` skips them).
//!
//! Forward, with `u = x·Aᵀ` `[N, r]`: `y += s·u·Bᵀ`. Backward, from `dy` `[N, out]`:
//!
//! ```text
//! u  = x·Aᵀ          (computed again: r is small, so this is cheaper than keeping it)
//! dB += s·dyᵀ·u      [out, r]
//! du  = s·dy·B       [N, r]
//! dA += duᵀ·x        [r, in]
//! dx += du·A         [N, in]   (the adapter's share of the input's gradient)
//! ```
//!
//! Under LoRA dropout (`lora_dropout.rs`) the adapter reads `x' = x ⊙ mask` in place of `x`
//! in both passes, and `dx += (du·A) ⊙ mask`; the mask is made again in the backward.
//!
//! Shapes: N = rows, r = rank, D = hidden, Q = H·Hd, KV = K·Hd, F = SwiGLU hidden.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::layout::{Dims, Slot};
use super::ops::{mm, rm};
use crate::llama::Llama;
use crate::lora::{module_path, Adapter, LoraSpec, Pair, TARGETS};
use crate::lora_dropout::Dropout;
use crate::lora_params::{burn_name, is_adapter};
use crate::params::{visit_named, VisitNamed};
use crate::ModelError;

/// The projections by their index in [`TARGETS`].
pub(super) const Q: usize = 0;
pub(super) const K: usize = 1;
pub(super) const V: usize = 2;
pub(super) const O: usize = 3;
pub(super) const GATE: usize = 4;
pub(super) const UP: usize = 5;
pub(super) const DOWN: usize = 6;

/// Where one adapted projection's `A` `[r, in]` and `B` `[out, r]` start in the flat buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct PairAt {
    a: usize,
    b: usize,
    d_in: usize,
    d_out: usize,
}

/// The flat layout of an adapter's parameters.
#[derive(Debug, Clone)]
pub struct AdapterLayout {
    pub rank: usize,
    /// `s` of `s·(x·Aᵀ)·Bᵀ`.
    pub scale: f32,
    /// Per layer, per projection of [`TARGETS`]: where its pair sits, if adapted.
    layers: Vec<[Option<PairAt>; 7]>,
    pub len: usize,
    /// The pairs' tensors by their Burn names (`lora.layers.0.self_attn.q_proj.lora_A.weight`).
    pub slots: Vec<Slot>,
}

/// `(in, out)` of projection `m` ([`TARGETS`]' index).
fn dims_of(dims: &Dims, m: usize) -> (usize, usize) {
    let (d, f, q, kv) = (dims.d, dims.ffn, dims.q(), dims.kv());
    [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)][m]
}

impl AdapterLayout {
    pub fn new(dims: &Dims, spec: &LoraSpec) -> Self {
        let r = spec.rank;
        let (mut len, mut slots, mut layers) = (0, Vec::new(), Vec::with_capacity(dims.layers));
        for i in 0..dims.layers {
            let mut at = [None; 7];
            for (m, name) in TARGETS.iter().enumerate() {
                if !spec.targets.iter().any(|t| t == name) {
                    continue;
                }
                let (d_in, d_out) = dims_of(dims, m);
                let path = module_path(i, name);
                let p = PairAt { a: len, b: len + r * d_in, d_in, d_out };
                slots.push(Slot { name: burn_name(&path, "lora_A"), shape: vec![r, d_in], off: p.a, ld: d_in, col: 0 });
                slots.push(Slot { name: burn_name(&path, "lora_B"), shape: vec![d_out, r], off: p.b, ld: r, col: 0 });
                len = p.b + d_out * r;
                at[m] = Some(p);
            }
            layers.push(at);
        }
        Self { rank: r, scale: spec.scaling() as f32, layers, len, slots }
    }

    /// The buffer cut as the base's ([`super::Layout::regions`]): an empty embedding region, each
    /// layer's adapters, an empty head region.
    pub(super) fn regions(&self) -> Vec<Range<usize>> {
        let mut out = vec![0..0];
        let mut start = 0;
        for at in &self.layers {
            let end = at.iter().flatten().map(|p| p.b + p.d_out * self.rank).max().unwrap_or(start);
            out.push(start..end);
            start = end;
        }
        out.push(self.len..self.len);
        out
    }

    /// The adapter whose flat weights are `w`, in PEFT's terms, made with `spec` for `base`.
    pub fn to_adapter(&self, w: &[f32], spec: LoraSpec, base: String) -> Adapter {
        let r = self.rank;
        let mut pairs = BTreeMap::new();
        for (i, at) in self.layers.iter().enumerate() {
            for (m, p) in at.iter().enumerate() {
                let Some(p) = p else { continue };
                let (a, b) = (w[p.a..p.a + r * p.d_in].to_vec(), w[p.b..p.b + p.d_out * r].to_vec());
                pairs.insert(module_path(i, TARGETS[m]), Pair { d_in: p.d_in, d_out: p.d_out, a, b });
            }
        }
        Adapter { spec, base, pairs }
    }

    /// The adapters of `model` (`model.lora`) in this layout.
    pub fn weights<B: Backend>(&self, model: &Llama<B>) -> Result<Vec<f32>, ModelError> {
        struct Collect<'a> {
            layout: &'a AdapterLayout,
            flat: Vec<f32>,
            seen: usize,
            err: Option<ModelError>,
        }
        impl<B: Backend> VisitNamed<B> for Collect<'_> {
            fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
                if !is_adapter(name) || self.err.is_some() {
                    return;
                }
                let Some(s) = self.layout.slots.iter().find(|s| s.name == name) else {
                    self.err = Some(ModelError::Config(format!("adapter tensor '{name}' is not in the recipe's LoRA layout")));
                    return;
                };
                let values: Vec<f32> = param.val().into_data().convert::<f32>().to_vec().unwrap_or_default();
                if param.shape().to_vec() != s.shape {
                    self.err = Some(ModelError::Shape { name: name.into(), got: param.shape().to_vec(), expected: s.shape.clone() });
                    return;
                }
                s.put(&mut self.flat, &values);
                self.seen += 1;
            }
        }
        let mut c = Collect { layout: self, flat: vec![0.0; self.len], seen: 0, err: None };
        visit_named(model, &mut c);
        if let Some(e) = c.err {
            return Err(e);
        }
        if c.seen != self.slots.len() {
            return Err(ModelError::Config(format!("the model has {} adapter tensors, the kernels' LoRA layout {}", c.seen, self.slots.len())));
        }
        Ok(c.flat)
    }
}

/// An adapter's layout with its current weights, as the passes read them, and the training
/// pass's dropout.
#[derive(Clone, Copy)]
pub struct Adapt<'a> {
    pub layout: &'a AdapterLayout,
    pub w: &'a [f32],
    pub drop: Option<Dropout>,
    /// The micro-batch row of this thread's first row (its dropout masks' rows start there).
    pub(super) row0: usize,
}

/// A thread's scratch for the adapters: `u = x'·Aᵀ` and its gradient `[N, r]`, and under
/// dropout the dropped input `x'` and the mask `[N, In]`.
pub(super) struct AdScratch {
    pub u: Vec<f32>,
    pub du: Vec<f32>,
    pub xm: Vec<f32>,
    pub mk: Vec<f32>,
}

impl AdScratch {
    /// Scratch for `n` rows of inputs at most `widest` wide (empty without adapters).
    pub(super) fn new(pool: &mut super::pool::Pool, ad: Option<Adapt>, n: usize, widest: usize) -> Self {
        let nr = ad.map_or(0, |a| n * a.layout.rank);
        let nx = if ad.is_some_and(|a| a.drop.is_some()) { n * widest } else { 0 };
        Self { u: pool.any(nr), du: pool.any(nr), xm: pool.any(nx), mk: pool.any(nx) }
    }
    pub(super) fn recycle(self, pool: &mut super::pool::Pool) {
        pool.put([self.u, self.du, self.xm, self.mk]);
    }
}

impl<'a> Adapt<'a> {
    /// The adapters `w` of `layout`, without dropout (inference, evaluation).
    pub fn new(layout: &'a AdapterLayout, w: &'a [f32]) -> Self {
        Self { layout, w, drop: None, row0: 0 }
    }

    /// The same adapters, dropping as `drop` says (a training pass).
    pub fn dropping(self, drop: Option<Dropout>) -> Self {
        Self { drop, ..self }
    }

    /// For a thread whose rows start at row `row0` of the micro-batch.
    pub(super) fn from_row(self, row0: usize) -> Self {
        Self { row0, ..self }
    }

    fn pair(&self, l: usize, m: usize) -> Option<PairAt> {
        self.layout.layers[l][m]
    }

    /// `y[N, out] (row stride ld) += s·(x'·Aᵀ)·Bᵀ` for projection `m` of layer `l`, if adapted;
    /// `x` is `[N, in]` (`x'` is `x`, or `x ⊙ mask` under dropout).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(&self, l: usize, m: usize, n: usize, x: &[f32], y: &mut [f32], ld: usize, sc: &mut AdScratch) {
        let Some(p) = self.pair(l, m) else { return };
        let (r, w) = (self.layout.rank, self.w);
        let AdScratch { u, xm, .. } = sc;
        let x = match self.drop {
            Some(d) => {
                d.apply(l, m, self.row0, n, p.d_in, x, xm); // x' [N, in]
                &xm[..]
            }
            None => x,
        };
        mm(n, r, p.d_in, u, r, false, 1.0, rm(x, p.d_in), rm(&w[p.a..], p.d_in).t()); // u = x'·Aᵀ [N, r]
        mm(n, p.d_out, r, y, ld, true, self.layout.scale, rm(u, r), rm(&w[p.b..], r).t()); // y += s·u·Bᵀ
    }

    /// The backward pass of [`Adapt::forward`] from `dy` (`[N, out]`, row stride `ld`): adds
    /// `dA` and `dB` into `g` (the layer's region of the adapter gradients, which starts at
    /// flat index `o`) and the adapter's share of the input's gradient into `dx` `[N, in]`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(&self, l: usize, m: usize, n: usize, x: &[f32], dy: &[f32], ld: usize, dx: &mut [f32], g: &mut [f32], o: usize, sc: &mut AdScratch) {
        let Some(p) = self.pair(l, m) else { return };
        let (r, s, w) = (self.layout.rank, self.layout.scale, self.w);
        let AdScratch { u, du, xm, mk } = sc;
        let x = match self.drop {
            Some(d) => {
                d.mask(l, m, self.row0, n, p.d_in, mk); // mask [N, in]
                for ((o, &v), &k) in xm.iter_mut().zip(&x[..n * p.d_in]).zip(mk.iter()) {
                    *o = v * k; // x' [N, in]
                }
                &xm[..]
            }
            None => x,
        };
        mm(n, r, p.d_in, u, r, false, 1.0, rm(x, p.d_in), rm(&w[p.a..], p.d_in).t()); // u = x'·Aᵀ [N, r]
        mm(p.d_out, r, n, &mut g[p.b - o..], r, true, s, rm(dy, ld).t(), rm(u, r)); // dB [out, r] += s·dyᵀ·u
        mm(n, r, p.d_out, du, r, false, s, rm(dy, ld), rm(&w[p.b..], r)); // du [N, r] = s·dy·B
        mm(r, p.d_in, n, &mut g[p.a - o..], p.d_in, true, 1.0, rm(du, r).t(), rm(x, p.d_in)); // dA [r, in] += duᵀ·x'
        if self.drop.is_none() {
            mm(n, p.d_in, r, dx, p.d_in, true, 1.0, rm(du, r), rm(&w[p.a..], p.d_in)); // dx [N, in] += du·A
            return;
        }
        mm(n, p.d_in, r, xm, p.d_in, false, 1.0, rm(du, r), rm(&w[p.a..], p.d_in)); // du·A [N, in]
        for ((d, &v), &k) in dx[..n * p.d_in].iter_mut().zip(xm.iter()).zip(mk.iter()) {
            *d += v * k; // dx += (du·A) ⊙ mask
        }
    }
}
