//! The dense retriever's training objective: InfoNCE with in-batch negatives (Karpukhin et al.,
//! 2020; Gao et al., 2021). A batch holds N (query, passage) pairs; each query's embedding is
//! scored against every passage's (`eq · epᵀ / τ`, unit vectors from `embed.rs`), and the loss is
//! the cross-entropy of picking its own passage: `mean_i −log softmax_j(s_ij)[i]`. The other
//! passages of the batch are the negatives, except those that are the same passage as the
//! query's own (several questions about one paragraph): they are left out of the softmax, so a
//! model is not taught that a passage does not answer a question it answers.
//!
//! Both engines compute it:
//! - Burn's graph: [`loss`], differentiated by autodiff.
//! - The CPU kernels (`Kernels::contrastive`): a forward pass without activations gives the
//!   embeddings; [`scores_loss`] gives the loss and its gradient with respect to them on the
//!   host; [`pool_backward`] carries that back to each token's hidden state; a second forward
//!   pass, kept for the backward, takes those hidden-state gradients down the model (the
//!   "gradient cache" of Gao et al., 2021: exact, and the memory of one sequence's activations
//!   rather than the whole batch's graph).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::embed::mean_pool;
use crate::Llama;

/// Padded token rows: `b` sequences of at most `t` tokens, right-padded.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub ids: Vec<i64>, // [B, T]
    pub lens: Vec<usize>,
    pub b: usize,
    pub t: usize,
}

impl Rows {
    /// `seqs` right-padded with `pad` to the longest.
    pub fn new(seqs: &[&[u32]], pad: u32) -> Self {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        for s in seqs {
            ids.extend(s.iter().map(|&x| x as i64));
            ids.extend(std::iter::repeat_n(pad as i64, t - s.len()));
        }
        Self { ids, lens: seqs.iter().map(|s| s.len().max(1)).collect(), b: seqs.len(), t }
    }

    /// 1 on tokens, 0 on padding: `[B, T]`.
    pub fn mask(&self) -> Vec<f32> {
        self.lens.iter().flat_map(|&n| (0..self.t).map(move |p| if p < n { 1.0 } else { 0.0 })).collect()
    }

    /// Tokens that are not padding.
    pub fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
}

/// A contrastive batch: query i's positive is passage i.
#[derive(Debug, Clone, PartialEq)]
pub struct Pairs {
    pub queries: Rows,
    pub passages: Rows,
    /// Which passage each pair's is: pairs with the same value share their passage, and are
    /// not each other's negatives.
    pub groups: Vec<u64>,
    /// The softmax temperature τ.
    pub tau: f32,
}

impl Pairs {
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Additive mask `[N, N]`: `−∞`-like where passage j is query i's own passage under another
    /// index (the same group, j ≠ i), else 0.
    pub fn hidden_positives(&self) -> Vec<f32> {
        let n = self.len();
        let mut m = vec![0.0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                if i != j && self.groups[i] == self.groups[j] {
                    m[i * n + j] = HIDE;
                }
            }
        }
        m
    }
}

/// What a left-out score becomes (its softmax weight is exactly 0 in f32).
const HIDE: f32 = -1.0e9;

/// The InfoNCE loss of `pairs` on Burn's graph: `[1]`.
pub fn loss<B: Backend>(model: &Llama<B>, pairs: &Pairs, device: &B::Device) -> Tensor<B, 1> {
    let eq = embed_rows(model, &pairs.queries, device); // [N, D]
    let ep = embed_rows(model, &pairs.passages, device); // [N, D]
    let n = pairs.len();
    let hide = Tensor::<B, 2>::from_data(TensorData::new(pairs.hidden_positives(), [n, n]), device); // [N, N]
    let s = eq.matmul(ep.transpose()) / pairs.tau as f64 + hide; // [N, N]
    let own = Tensor::<B, 2, Int>::from_data(TensorData::new((0..n as i64).collect::<Vec<_>>(), [n, 1]), device); // [N, 1]
    log_softmax(s, 1).gather(1, own).neg().mean() // [1]
}

fn embed_rows<B: Backend>(model: &Llama<B>, rows: &Rows, device: &B::Device) -> Tensor<B, 2> {
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(rows.ids.clone(), [rows.b, rows.t]), device); // [B, T]
    let m = Tensor::<B, 2>::from_data(TensorData::new(rows.mask(), [rows.b, rows.t]), device); // [B, T]
    mean_pool(model.hidden(x), m) // [B, D]
}

/// The loss from unit embeddings `eq`, `ep` (`[N, D]` each) and its gradient with respect to
/// them: `(loss, d eq, d ep)`.
pub fn scores_loss(eq: &[f32], ep: &[f32], pairs: &Pairs, d: usize) -> (f64, Vec<f32>, Vec<f32>) {
    let n = pairs.len();
    let hide = pairs.hidden_positives();
    let inv_tau = 1.0 / pairs.tau;
    // ds[i][j] = (softmax_j(s_i) − [i = j]) / N
    let mut ds = vec![0.0f32; n * n];
    let mut loss = 0.0f64;
    for i in 0..n {
        let row = &mut ds[i * n..(i + 1) * n];
        for j in 0..n {
            let dot: f32 = eq[i * d..(i + 1) * d].iter().zip(&ep[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum();
            row[j] = dot * inv_tau + hide[i * n + j];
        }
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let z: f32 = row.iter().map(|&x| (x - mx).exp()).sum();
        loss += (z.ln() + mx - row[i]) as f64;
        for x in row.iter_mut() {
            *x = (*x - mx).exp() / z / n as f32;
        }
        row[i] -= 1.0 / n as f32;
    }
    // d eq = ds · ep / τ; d ep = dsᵀ · eq / τ
    let (mut deq, mut dep) = (vec![0.0f32; n * d], vec![0.0f32; n * d]);
    for i in 0..n {
        for j in 0..n {
            let g = ds[i * n + j] * inv_tau;
            for k in 0..d {
                deq[i * d + k] += g * ep[j * d + k];
                dep[j * d + k] += g * eq[i * d + k];
            }
        }
    }
    (loss / n as f64, deq, dep)
}

/// The gradient of the hidden states `h` (`[B·T, D]`, rows of `t` positions) from `de`, that of
/// their unit-length means (`embed::mean_pool_host`): through `e = m / |m|`,
/// `dm = (de − e (e · de)) / |m|`, then `dh_p = dm / n` for each of the `n` tokens (0 on padding).
pub fn pool_backward(h: &[f32], lens: &[usize], t: usize, d: usize, de: &[f32]) -> Vec<f32> {
    let mut dh = vec![0.0f32; h.len()];
    for (i, &len) in lens.iter().enumerate() {
        let n = len.clamp(1, t);
        let mut m = vec![0.0f32; d];
        for p in 0..n {
            m.iter_mut().zip(&h[(i * t + p) * d..(i * t + p + 1) * d]).for_each(|(a, &x)| *a += x);
        }
        m.iter_mut().for_each(|a| *a /= n as f32);
        let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        let g = &de[i * d..(i + 1) * d];
        let e_dot: f32 = m.iter().zip(g).map(|(a, b)| a / norm * b).sum();
        let dm: Vec<f32> = m.iter().zip(g).map(|(a, b)| (b - a / norm * e_dot) / norm / n as f32).collect();
        for p in 0..n {
            dh[(i * t + p) * d..(i * t + p + 1) * d].copy_from_slice(&dm);
        }
    }
    dh
}
