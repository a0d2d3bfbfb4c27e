//! The decoder of `llama.rs`, forward and backward written out for the CPU (llm.c style).
//!
//! Burn 0.21 runs a training step on `flex` as some 600 small ops, each with its own layout copy
//! and bookkeeping, on one core at a time (BENCHMARKS.md: a third of the time is matmul). This
//! file computes the same model, loss and gradients in a handful of loops and large matmuls
//! (the `gemm` crate, which `flex` uses too), with the batch split across threads: each thread
//! runs the whole forward and backward on its own sequences and the gradients are summed region
//! by region as the backward passes finish them (`sink.rs`), in a fixed order, so a step is
//! bit-reproducible for a given thread count.
//!
//! All parameters live in one flat `f32` buffer (gradients in another of the same layout).
//! Linear weights are `[in, out]` as in `llama.rs`; q/k/v are packed side by side into one
//! `[D, Q + 2·KV]` matrix and gate/up into one `[D, 2F]`, so each is one matmul.
//!
//! Shapes: N = rows (sequences × T) of one thread, T = context, D = hidden, H = heads,
//! K = kv heads, Hd = head dim, Q = H·Hd, KV = K·Hd, F = SwiGLU hidden, V = vocabulary.
//!
//! Parity with the Burn model (logits, loss and every gradient) is tested in
//! `models/tests/cpu_kernels.rs`.
//!
//! The parts: `layout.rs` (the flat buffer and its named slots), `adapters.rs` (LoRA adapters'
//! buffer and their forward and backward), `pool.rs` (per-thread buffers),
//! `model.rs` (forward, loss, backward), `ops.rs` (the primitives), `sink.rs` (the threads'
//! gradients into one buffer), `decode.rs` (inference with a KV cache, for generation),
//! `contrastive.rs` (the retriever's loss on the final hidden states). This
//! file splits a batch across threads.

use burn::tensor::backend::Backend;
use rayon::prelude::*;

use crate::llama::{Llama, LlamaConfig};

mod adapters;
mod contrastive;
mod decode;
mod frozen;
mod layout;
mod model;
mod ops;
mod pool;
mod sink;

pub use adapters::{Adapt, AdapterLayout};
pub use decode::KvRow;
pub use frozen::{bf16_to_f32, Half, Weights};
pub use layout::{rope_tables, Dims, Layout, Slot};
use model::{forward, shard, Acts, Keep, Rope};
use pool::Pool;
use sink::Sink;

/// One batch: `b` rows of `t` tokens, row-major.
pub struct BatchRef<'a> {
    pub inputs: &'a [i64],
    pub targets: &'a [i64],
    pub mask: &'a [f32],
    pub b: usize,
    pub t: usize,
    /// Packed rows: for each position, where its example begins in the row (`[B·T]`). Attention
    /// then sees only keys from there on, and RoPE counts positions from there. `None`: each row
    /// is one sequence.
    pub starts: Option<&'a [u32]>,
}

/// What [`Kernels::loss_and_grads`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Mean masked cross-entropy (nats per token).
    pub loss: f64,
    /// Seconds the slowest thread spent in the forward pass and loss.
    pub forward_s: f64,
}

/// The kernels for one model shape, with their RoPE tables, thread count and buffers.
pub struct Kernels {
    pub layout: Layout,
    cos: Vec<f32>, // [max T, Hd]
    sin: Vec<f32>, // [max T, Hd]
    threads: usize,
    pools: Vec<std::sync::Mutex<Pool>>,
    /// Use the AVX-512 build of the elementwise loops where the CPU has it.
    wide: bool,
    /// Keep only each layer's input for the backward pass (see [`Kernels::checkpointing`]).
    checkpointing: bool,
    /// The retriever's loss forwards twice rather than keep both sides' activations (see
    /// [`Kernels::gradient_cache`]).
    gradient_cache: bool,
}

impl Kernels {
    /// `cos`/`sin` are the model's RoPE tables (see [`rope_tables`]).
    pub fn new(dims: Dims, cos: Vec<f32>, sin: Vec<f32>, threads: usize) -> Self {
        let threads = threads.max(1);
        let pools = (0..threads).map(|_| Default::default()).collect();
        Self { layout: Layout::new(dims), cos, sin, threads, pools, wide: true, checkpointing: false, gradient_cache: false }
    }

    /// Kernels for `model` (its RoPE tables), with sizes from `cfg`.
    pub fn for_model<B: Backend>(model: &Llama<B>, cfg: &LlamaConfig, threads: usize) -> Self {
        let (cos, sin) = rope_tables(model);
        Self::new(Dims::from_config(cfg), cos, sin, threads)
    }

    /// The same kernels with the elementwise loops in their baseline build only (a test checks
    /// that both builds agree bit for bit).
    pub fn baseline(mut self) -> Self {
        self.wide = false;
        self
    }

    /// Gradient checkpointing: the forward pass keeps only each layer's input, and the backward
    /// pass runs each layer's forward again from it (without the down projection): some 12
    /// times less activation memory for about a fifth more work (SmolLM2 SFT: 15% fewer
    /// tokens/s), and the same gradients, bit for bit (the same operations).
    pub fn checkpointing(mut self, on: bool) -> Self {
        self.checkpointing = on;
        self
    }

    /// The retriever's contrastive loss (`contrastive.rs`) as a gradient cache: the embeddings
    /// come from forward passes that keep no activations, and each side (queries, then
    /// passages) runs forward again, kept, just before its backward pass. Two forwards and a
    /// backward instead of one of each, for the activations of one side at a time instead of
    /// both; the same gradients, bit for bit.
    pub fn gradient_cache(mut self, on: bool) -> Self {
        self.gradient_cache = on;
        self
    }

    /// What a forward pass keeps for the backward pass.
    fn keep(&self) -> Keep {
        if self.checkpointing {
            Keep::Inputs
        } else {
            Keep::All
        }
    }

    /// Mean masked cross-entropy of `batch` and, when `grads` is given, its gradient with
    /// respect to every parameter (written into `grads`, which has `layout.len` values). The
    /// batch is split across the threads by sequence; shard gradients are summed in a fixed order
    /// (`sink.rs`).
    pub fn loss_and_grads(&self, w: &[f32], batch: &BatchRef, grads: Option<&mut [f32]>) -> Pass {
        self.pass(Weights::F32(w), None, batch, grads, false)
    }

    /// [`Kernels::loss_and_grads`], adding the gradient to what `grads` holds (gradient
    /// accumulation without a second full-size buffer).
    pub fn add_loss_grads(&self, w: &[f32], batch: &BatchRef, grads: &mut [f32]) -> Pass {
        self.pass(Weights::F32(w), None, batch, Some(grads), true)
    }

    /// LoRA: the loss of the weights `w` with the adapters `ad` on top and, when `grads` is
    /// given (`ad.layout.len` values), the adapters' gradient, written there or, with
    /// `accumulate`, added to what it holds. The base is frozen: its gradients are not computed,
    /// and it may be held in bf16 ([`Weights::Half`]).
    pub fn adapter_loss_and_grads(&self, w: Weights, ad: Adapt, batch: &BatchRef, grads: Option<&mut [f32]>, accumulate: bool) -> Pass {
        self.pass(w, Some(ad), batch, grads, accumulate)
    }

    fn pass(&self, w: Weights, ad: Option<Adapt>, batch: &BatchRef, grads: Option<&mut [f32]>, accumulate: bool) -> Pass {
        let layout = &self.layout;
        self.check(w, ad, batch.inputs.iter().chain(batch.targets.iter()), batch.t);
        if let Some(s) = batch.starts {
            assert!(s.len() == batch.inputs.len() && s.iter().enumerate().all(|(p, &st)| st as usize <= p % batch.t), "starts must give, for each position, an earlier position of its row");
        }
        let n_loss: f32 = batch.mask.iter().sum::<f32>().max(1.0);
        let bounds = self.bounds(batch.b);
        let shards = bounds.len();
        let rope = Rope { cos: &self.cos, sin: &self.sin };
        let keep = self.keep();
        let run = |i: usize, grads| {
            let (s0, s1) = bounds[i];
            let rows = s0 * batch.t..s1 * batch.t;
            let part = BatchRef {
                inputs: &batch.inputs[rows.clone()],
                targets: &batch.targets[rows.clone()],
                mask: &batch.mask[rows.clone()],
                b: s1 - s0,
                t: batch.t,
                starts: batch.starts.map(|s| &s[rows.clone()]),
            };
            let mut pool = self.pool(i);
            let ad = ad.map(|a| a.from_row(rows.start)); // its dropout masks' rows
            shard(layout, w, ad, &rope, &part, n_loss, grads, keep, &mut pool, self.wide)
        };
        let Some(out) = grads else {
            // Forward only.
            let results: Vec<(f64, f64)> = (0..shards).into_par_iter().map(|i| run(i, None)).collect();
            return pass(&results, n_loss);
        };
        let regions = match ad {
            Some(a) => a.layout.regions(),
            None => layout.regions(),
        };
        assert_eq!(out.len(), regions.last().map_or(0, |r| r.end), "the gradient buffer does not fit the layout");
        if !accumulate {
            out.fill(0.0);
        }
        // Shards run on rayon's pool (long-lived threads, so gemm's per-thread packing buffers
        // are reused); `collect` keeps shard order.
        let sink = Sink::new(out, regions);
        let results: Vec<(f64, f64)> = (0..shards).into_par_iter().map(|i| run(i, Some(sink.writer(i)))).collect();
        pass(&results, n_loss)
    }

    /// The invariants the kernels index by: weights of this layout (and adapters of a layout
    /// for its layers), a context within the RoPE tables, token ids within the vocabulary (the
    /// trainer's data guarantees them).
    fn check<'a>(&self, w: Weights, ad: Option<Adapt>, tokens: impl Iterator<Item = &'a i64>, t: usize) {
        assert_eq!(w.len(), self.layout.len);
        assert!(!w.chunked() || ad.is_some(), "a bf16 base is frozen: it trains adapters only");
        if let Some(a) = ad {
            assert_eq!(a.w.len(), a.layout.len, "adapter weights do not fit their layout");
            assert_eq!(a.layout.regions().len(), self.layout.regions().len(), "the adapters are for another number of layers");
        }
        assert!(t * self.layout.dims.head_dim <= self.cos.len(), "context {t} is longer than the RoPE tables");
        let vocab = self.layout.dims.vocab;
        for &tok in tokens {
            assert!(tok >= 0 && (tok as usize) < vocab, "token id {tok} outside the vocabulary of {vocab}");
        }
    }

    /// Returns the threads' activation buffers to the allocator (they are made again when
    /// needed).
    pub fn free_buffers(&self) {
        for i in 0..self.pools.len() {
            *self.pool(i) = Pool::default();
        }
    }

    /// Thread `i`'s buffers.
    fn pool(&self, i: usize) -> std::sync::MutexGuard<'_, Pool> {
        self.pools[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sequence ranges, one per thread: as even as possible, the first taking the remainder.
    fn bounds(&self, b: usize) -> Vec<(usize, usize)> {
        let shards = self.threads.clamp(1, b.max(1));
        let (q, r) = (b / shards, b % shards);
        (0..shards)
            .map(|i| {
                let start = i * q + i.min(r);
                (start, start + q + usize::from(i < r))
            })
            .collect()
    }

    /// Logits `[B·T, V]` of `b` sequences of `t` tokens (forward only: evaluation, tests).
    pub fn logits(&self, w: &[f32], inputs: &[i64], b: usize, t: usize) -> Vec<f32> {
        self.logits_with(Weights::F32(w), None, inputs, b, t)
    }

    /// [`Kernels::logits`] with LoRA adapters on top of `w` (which may then be bf16).
    pub fn logits_with(&self, w: Weights, ad: Option<Adapt>, inputs: &[i64], b: usize, t: usize) -> Vec<f32> {
        self.forward_only(w, ad, inputs, b, t, true, |acts| std::mem::take(&mut acts.logits))
    }

    /// The final norm's output `[B·T, D]` of `b` sequences of `t` tokens (the head is not run):
    /// what sentence embeddings pool (`embed.rs`). `ad`: LoRA adapters on top of `w`.
    pub fn hidden_with(&self, w: Weights, ad: Option<Adapt>, inputs: &[i64], b: usize, t: usize) -> Vec<f32> {
        self.forward_only(w, ad, inputs, b, t, false, Acts::take_hidden)
    }

    /// A forward pass without loss or kept activations over `b` sequences of `t` tokens, split
    /// across the threads (each share's adapter dropout rows its own); `take` keeps a share's
    /// output (rows in order), and the shares are concatenated. `logits`: run the head on every
    /// row (else on none: no target carries loss).
    #[allow(clippy::too_many_arguments)]
    fn forward_only(&self, w: Weights, ad: Option<Adapt>, inputs: &[i64], b: usize, t: usize, logits: bool, take: impl Fn(&mut Acts) -> Vec<f32> + Sync) -> Vec<f32> {
        self.check(w, ad, inputs.iter(), t);
        let rope = Rope { cos: &self.cos, sin: &self.sin };
        let bounds = self.bounds(b);
        let parts: Vec<Vec<f32>> = (0..bounds.len())
            .into_par_iter()
            .map(|i| {
                let share = Share::new(bounds[i], t);
                let batch = share.batch(inputs);
                let mut pool = self.pool(i);
                let ad = ad.map(|a| a.from_row(share.r.start));
                let mut acts = forward(&self.layout, w, ad, &rope, &batch, &mut pool, logits, Keep::Nothing);
                let out = take(&mut acts);
                acts.recycle(&mut pool);
                out
            })
            .collect();
        parts.concat()
    }
}

/// One thread's share of a forward pass without loss (the head runs on every row or on none):
/// sequences `s0..s1` of `t` tokens, token rows `r`, and their batch with no targets.
struct Share {
    r: std::ops::Range<usize>,
    b: usize,
    t: usize,
    zeros: Vec<i64>,
    mask: Vec<f32>,
}

impl Share {
    fn new((s0, s1): (usize, usize), t: usize) -> Self {
        let r = s0 * t..s1 * t;
        Self { zeros: vec![0; r.len()], mask: vec![0.0; r.len()], b: s1 - s0, t, r }
    }

    /// The share's rows of `ids` (`[B·T]`, all the sequences) as a batch.
    fn batch<'a>(&'a self, ids: &'a [i64]) -> BatchRef<'a> {
        BatchRef { inputs: &ids[self.r.clone()], targets: &self.zeros, mask: &self.mask, b: self.b, t: self.t, starts: None }
    }
}

fn pass(results: &[(f64, f64)], n_loss: f32) -> Pass {
    let loss: f64 = results.iter().map(|r| r.0).sum();
    let forward_s = results.iter().fold(0.0f64, |m, r| m.max(r.1));
    Pass { loss: loss / n_loss as f64, forward_s }
}
