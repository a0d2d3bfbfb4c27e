//! Sentence embeddings from a decoder: the final norm's output (`Llama::hidden`), averaged over
//! each sequence's tokens and scaled to unit length, so that a dot product is the cosine
//! similarity. Dense retrieval indexes passages with them and the retriever stage trains them.
//!
//! The same pooling runs on Burn's graph ([`mean_pool`], differentiable) and on the host after
//! the CPU kernels' forward pass ([`mean_pool_host`]); `models/tests/cpu_kernels.rs` holds the
//! two engines' embeddings together.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::cpu_kernels::{Kernels, Weights};
use crate::{Llama, LlamaConfig, ModelError};

/// Tokens one forward pass of [`Encoder::encode`] takes at most (sequences × padded length).
pub const BATCH_TOKENS: usize = 8192;

/// Mean of `h` over the positions where `mask` is 1, scaled to unit length:
/// `h: [B, T, D]`, `mask: [B, T]` (1 for a token, 0 for padding) -> `[B, D]`.
pub fn mean_pool<B: Backend>(h: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let [b, t, d] = h.dims();
    let m = mask.reshape([b, t, 1]); // [B, T, 1]
    let count = m.clone().sum_dim(1).clamp_min(1.0); // [B, 1, 1]
    let mean = (h * m).sum_dim(1) / count; // [B, 1, D]
    let norm = mean.clone().square().sum_dim(2).sqrt().clamp_min(1e-12); // [B, 1, 1]
    (mean / norm).reshape([b, d]) // [B, D]
}

/// [`mean_pool`] on the host: `h` is `[B·T, D]` (rows of `t` positions), `lens[i]` the tokens
/// of sequence `i`. Returns `[B, D]`.
pub fn mean_pool_host(h: &[f32], lens: &[usize], t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; lens.len() * d];
    for (i, &n) in lens.iter().enumerate() {
        let o = &mut out[i * d..(i + 1) * d];
        for p in 0..n.min(t) {
            let row = &h[(i * t + p) * d..(i * t + p + 1) * d];
            o.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
        }
        let inv = 1.0 / n.clamp(1, t) as f32;
        o.iter_mut().for_each(|a| *a *= inv);
        let norm = o.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        o.iter_mut().for_each(|a| *a /= norm);
    }
    out
}

/// A model ready to embed: on the CPU kernels where they were asked for, else on Burn's model
/// (any backend).
pub struct Encoder<B: Backend> {
    model: Llama<B>,
    device: B::Device,
    /// The longest sequence it embeds (longer ones are cut there).
    pub context: usize,
    /// The embeddings' width (the model's hidden size).
    pub dim: usize,
    kernels: Option<(Kernels, Vec<f32>)>,
}

impl<B: Backend> Encoder<B> {
    /// Embedding on Burn's model.
    pub fn burn(model: Llama<B>, cfg: &LlamaConfig, context: usize, device: &B::Device) -> Self {
        let context = context.clamp(1, cfg.max_position_embeddings);
        Self { model, device: device.clone(), context, dim: cfg.hidden_size, kernels: None }
    }

    /// Embedding on the CPU kernels, with the weights copied into their layout.
    pub fn kernels(model: Llama<B>, cfg: &LlamaConfig, context: usize, threads: usize, device: &B::Device) -> Result<Self, ModelError> {
        let k = Kernels::for_model(&model, cfg, threads);
        let w = k.layout.weights(&model)?;
        let mut e = Self::burn(model, cfg, context, device);
        e.kernels = Some((k, w));
        Ok(e)
    }

    /// Unit-length embeddings `[N, D]` of `seqs` (token ids, each cut to `context`).
    pub fn encode(&self, seqs: &[Vec<u32>]) -> Vec<f32> {
        match &self.kernels {
            Some((k, w)) => encode_kernels(k, Weights::F32(w), seqs, self.context),
            None => encode_burn(&self.model, &self.device, seqs, self.context),
        }
    }
}

/// [`Encoder::encode`] on Burn's model.
pub fn encode_burn<B: Backend>(model: &Llama<B>, device: &B::Device, seqs: &[Vec<u32>], context: usize) -> Vec<f32> {
    let d = model.model.norm.val().dims()[0];
    batched(seqs, context, d, &mut |ids, lens, b, t| {
        let mask: Vec<f32> = lens.iter().flat_map(|&n| (0..t).map(move |p| if p < n { 1.0 } else { 0.0 })).collect();
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [b, t]), device); // [B, T]
        let m = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, t]), device); // [B, T]
        let e = mean_pool(model.hidden(x), m); // [B, D]
        e.into_data().convert::<f32>().to_vec().unwrap_or_default()
    })
}

/// [`Encoder::encode`] on the CPU kernels, with the weights `w` in their layout.
pub fn encode_kernels(k: &Kernels, w: Weights, seqs: &[Vec<u32>], context: usize) -> Vec<f32> {
    let d = k.layout.dims.d;
    batched(seqs, context, d, &mut |ids, lens, b, t| {
        let h = k.hidden_with(w, None, ids, b, t); // [B·T, D]
        mean_pool_host(&h, lens, t, d)
    })
}

/// `seqs` (each cut to `context`) in batches of similar length, at most [`BATCH_TOKENS`] padded
/// tokens a pass, padding on the right (where causal attention keeps it from the real tokens);
/// `pooled(ids [B, T], lens, B, T)` gives each batch's `[B, D]`, put back in `seqs`' order.
fn batched(seqs: &[Vec<u32>], context: usize, d: usize, pooled: &mut dyn FnMut(&[i64], &[usize], usize, usize) -> Vec<f32>) -> Vec<f32> {
    {
        let mut out = vec![0.0f32; seqs.len() * d];
        let len = |i: usize| seqs[i].len().clamp(1, context);
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(len(i)));
        let mut at = 0;
        while at < order.len() {
            // Longest first: the batch's padded length is its first sequence's.
            let t = len(order[at]);
            let b = (BATCH_TOKENS / t).clamp(1, order.len() - at);
            let group = &order[at..at + b];
            let lens: Vec<usize> = group.iter().map(|&i| seqs[i].len().min(t)).collect();
            let mut ids = vec![0i64; b * t]; // [B, T]
            for (r, &i) in group.iter().enumerate() {
                for (p, &tok) in seqs[i].iter().take(t).enumerate() {
                    ids[r * t + p] = tok as i64;
                }
            }
            let pooled = pooled(&ids, &lens, b, t); // [B, D]
            for (r, &i) in group.iter().enumerate() {
                out[i * d..(i + 1) * d].copy_from_slice(&pooled[r * d..(r + 1) * d]);
            }
            at += b;
        }
        out
    }
}
