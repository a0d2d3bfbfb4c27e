//! The retriever's contrastive loss on the kernels (`crate::contrastive`: InfoNCE with in-batch
//! negatives over unit-length mean-pooled embeddings), forward and backward.
//!
//! The loss sits on the final hidden states, not on logits: both sides (queries `[Bq, Tq]`,
//! passages `[Bp, Tp]`) run forward without the head, their mean-pooled embeddings `[N, D]` meet
//! on the host (`scores_loss`), and the embeddings' gradient goes back to every token's hidden
//! state (`pool_backward`), where the backward pass starts. Two ways, the same gradients bit for
//! bit (the same operations in the same order):
//! - **single pass** (the default): each side's forward keeps its activations (each layer's
//!   values, or its input alone under gradient checkpointing) until the backward pass: one
//!   forward and one backward, as autodiff does;
//! - **gradient cache** ([`Kernels::gradient_cache`]): the forwards keep nothing, and each side
//!   runs forward again, kept, just before its backward: a second forward for the memory of one
//!   side's activations at a time instead of both (large batches).

use rayon::prelude::*;

use super::model::{shard_forward, shard_given, Acts, Keep, Rope};
use super::sink::Sink;
use super::{Kernels, Pass, Share, Weights};
use super::Adapt;
use crate::contrastive::{pool_backward, scores_loss, Pairs, Rows};
use crate::embed::mean_pool_host;

/// One side's forward pass: its final hidden states `[B·T, D]` and, when kept, each thread's
/// activations for the backward pass.
struct Side {
    hidden: Vec<f32>,
    kept: Option<Vec<Acts>>,
}


impl Kernels {
    /// The contrastive loss of `pairs` and, when `grads` is given, its gradient with respect to
    /// every parameter, or with `ad` every adapter (written there, or added with `accumulate`).
    pub fn contrastive(&self, w: Weights, ad: Option<Adapt>, pairs: &Pairs, grads: Option<&mut [f32]>, accumulate: bool) -> Pass {
        let t0 = std::time::Instant::now();
        let d = self.layout.dims.d;
        let (q, p) = (&pairs.queries, &pairs.passages);
        let keep = match grads {
            Some(_) if !self.gradient_cache => self.keep(),
            _ => Keep::Nothing,
        };
        let sq = self.side(w, ad, q, keep);
        let sp = self.side(w, ad, p, keep);
        let eq = mean_pool_host(&sq.hidden, &q.lens, q.t, d); // [N, D]
        let ep = mean_pool_host(&sp.hidden, &p.lens, p.t, d); // [N, D]
        let (loss, deq, dep) = scores_loss(&eq, &ep, pairs, d);
        let forward_s = t0.elapsed().as_secs_f64();
        if let Some(g) = grads {
            let dhq = pool_backward(&sq.hidden, &q.lens, q.t, d, &deq); // [Bq·Tq, D]
            self.hidden_grads(w, ad, q, sq.kept, &dhq, g, accumulate);
            let dhp = pool_backward(&sp.hidden, &p.lens, p.t, d, &dep); // [Bp·Tp, D]
            self.hidden_grads(w, ad, p, sp.kept, &dhp, g, true);
        }
        Pass { loss, forward_s }
    }

    /// The forward pass of `rows` without the head, split across the threads (each share's
    /// adapter dropout rows its own), its activations kept as `keep` says.
    fn side(&self, w: Weights, ad: Option<Adapt>, rows: &Rows, keep: Keep) -> Side {
        let t = rows.t;
        self.check(w, ad, rows.ids.iter(), t);
        let rope = Rope { cos: &self.cos, sin: &self.sin };
        let bounds = self.bounds(rows.b);
        let parts: Vec<(Vec<f32>, Option<Acts>)> = (0..bounds.len())
            .into_par_iter()
            .map(|i| {
                let share = Share::new(bounds[i], t);
                let batch = share.batch(&rows.ids);
                let mut pool = self.pool(i);
                let ad = ad.map(|a| a.from_row(share.r.start));
                let mut acts = shard_forward(&self.layout, w, ad, &rope, &batch, keep, &mut pool, self.wide);
                let hidden = acts.take_hidden(); // [b·T, D]
                if keep == Keep::Nothing {
                    acts.recycle(&mut pool);
                    return (hidden, None);
                }
                (hidden, Some(acts))
            })
            .collect();
        let mut hidden = Vec::with_capacity(rows.b * t * self.layout.dims.d);
        let mut kept = Vec::with_capacity(parts.len());
        for (h, acts) in parts {
            hidden.extend_from_slice(&h);
            kept.extend(acts);
        }
        Side { hidden, kept: (keep != Keep::Nothing).then_some(kept) }
    }

    /// The gradient of `rows` whose final hidden states' gradient is `dh` (`[B·T, D]`), into
    /// `out` (every parameter's, or with `ad` every adapter's), added with `accumulate`: from
    /// the activations `kept` by [`Kernels::side`], or else after a forward pass again.
    #[allow(clippy::too_many_arguments)]
    fn hidden_grads(&self, w: Weights, ad: Option<Adapt>, rows: &Rows, kept: Option<Vec<Acts>>, dh: &[f32], out: &mut [f32], accumulate: bool) {
        let t = rows.t;
        let d = self.layout.dims.d;
        assert_eq!(dh.len(), rows.b * t * d);
        let rope = Rope { cos: &self.cos, sin: &self.sin };
        let bounds = self.bounds(rows.b);
        let kept: Vec<Option<Acts>> = match kept {
            Some(k) => k.into_iter().map(Some).collect(),
            None => bounds.iter().map(|_| None).collect(),
        };
        assert_eq!(kept.len(), bounds.len(), "activations kept for another split of the batch");
        let regions = match ad {
            Some(a) => a.layout.regions(),
            None => self.layout.regions(),
        };
        assert_eq!(out.len(), regions.last().map_or(0, |r| r.end), "the gradient buffer does not fit the layout");
        if !accumulate {
            out.fill(0.0);
        }
        let sink = Sink::new(out, regions);
        let keep = self.keep();
        let done: Vec<()> = kept
            .into_par_iter()
            .enumerate()
            .map(|(i, acts)| {
                let share = Share::new(bounds[i], t);
                let batch = share.batch(&rows.ids);
                let mut pool = self.pool(i);
                let ad = ad.map(|a| a.from_row(share.r.start));
                let dh = &dh[share.r.start * d..share.r.end * d]; // [b·T, D]
                shard_given(&self.layout, w, ad, &rope, &batch, acts, dh, sink.writer(i), keep, &mut pool, self.wide)
            })
            .collect();
        debug_assert_eq!(done.len(), bounds.len());
    }
}
