//! The decoder of `llama.rs`, forward and backward written out for the CPU (llm.c style).
//!
//! Burn 0.21 runs a training step on `flex` as some 600 small ops, each with its own layout copy
//! and bookkeeping, on one core at a time (BENCHMARKS.md: a third of the time is matmul). This
//! file computes the same model, loss and gradients in a handful of loops and large matmuls
//! (the `gemm` crate, which `flex` uses too), with the batch split across threads: each thread
//! runs the whole forward and backward on its own sequences and the gradients are summed at the
//! end, in a fixed order, so a step is bit-reproducible for a given thread count.
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

use burn::tensor::backend::Backend;
use rayon::prelude::*;

use crate::llama::{Llama, LlamaConfig};
use crate::ModelError;

/// The sizes the kernels need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub vocab: usize,
    pub d: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub eps: f32,
    pub tied: bool,
}

impl Dims {
    pub fn from_config(c: &LlamaConfig) -> Self {
        Self {
            vocab: c.vocab_size,
            d: c.hidden_size,
            ffn: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            layers: c.num_hidden_layers,
            eps: c.rms_norm_eps as f32,
            tied: c.tie_word_embeddings,
        }
    }
    fn q(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn qkv(&self) -> usize {
        self.q() + 2 * self.kv()
    }
}

/// Offsets of one layer's parameters in the flat buffer.
#[derive(Debug, Clone, Copy)]
struct LayerAt {
    ln1: usize,  // [D]
    wqkv: usize, // [D, Q + 2KV]
    wo: usize,   // [Q, D]
    ln2: usize,  // [D]
    wgu: usize,  // [D, 2F]
    wd: usize,   // [F, D]
}

/// Where one named parameter sits in the flat buffer: `cols` columns starting at column `col`
/// of a row-major matrix with `ld` columns (a plain tensor is `col = 0`, `ld = cols`).
#[derive(Debug, Clone)]
pub struct Slot {
    /// Hugging Face name, as `llama.rs` derives parameter ids from it.
    pub name: String,
    /// Burn shape (`[in, out]` for linear weights).
    pub shape: Vec<usize>,
    off: usize,
    ld: usize,
    col: usize,
}

/// The flat layout of all parameters.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dims: Dims,
    embed: usize, // [V, D]
    layers: Vec<LayerAt>,
    norm: usize,         // [D]
    head: Option<usize>, // [D, V], None when tied
    pub len: usize,
    pub slots: Vec<Slot>,
}

impl Layout {
    pub fn new(dims: Dims) -> Self {
        let Dims { vocab: v, d, ffn: f, .. } = dims;
        let (q, kv, qkv) = (dims.q(), dims.kv(), dims.qkv());
        let mut len = 0;
        let mut take = |n: usize| {
            len += n;
            len - n
        };
        let mut slots = Vec::new();
        let mut slot = |name: String, shape: Vec<usize>, off: usize, ld: usize, col: usize| {
            slots.push(Slot { name, shape, off, ld, col })
        };
        let embed = take(v * d);
        slot("model.embed_tokens.weight".into(), vec![v, d], embed, d, 0);
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let at = LayerAt {
                ln1: take(d),
                wqkv: take(d * qkv),
                wo: take(q * d),
                ln2: take(d),
                wgu: take(d * 2 * f),
                wd: take(f * d),
            };
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            slot(p("input_layernorm"), vec![d], at.ln1, d, 0);
            slot(p("self_attn.q_proj"), vec![d, q], at.wqkv, qkv, 0);
            slot(p("self_attn.k_proj"), vec![d, kv], at.wqkv, qkv, q);
            slot(p("self_attn.v_proj"), vec![d, kv], at.wqkv, qkv, q + kv);
            slot(p("self_attn.o_proj"), vec![q, d], at.wo, d, 0);
            slot(p("post_attention_layernorm"), vec![d], at.ln2, d, 0);
            slot(p("mlp.gate_proj"), vec![d, f], at.wgu, 2 * f, 0);
            slot(p("mlp.up_proj"), vec![d, f], at.wgu, 2 * f, f);
            slot(p("mlp.down_proj"), vec![f, d], at.wd, d, 0);
            layers.push(at);
        }
        let norm = take(d);
        slot("model.norm.weight".into(), vec![d], norm, d, 0);
        let head = if dims.tied {
            None
        } else {
            let h = take(d * v);
            slot("lm_head.weight".into(), vec![d, v], h, v, 0);
            Some(h)
        };
        Self { dims, embed, layers, norm, head, len, slots }
    }

    /// Copies a parameter's values (row-major, its Burn shape) into the flat buffer.
    pub fn put(&self, flat: &mut [f32], s: &Slot, values: &[f32]) {
        let (rows, cols) = rows_cols(&s.shape);
        assert_eq!(values.len(), rows * cols, "{}: wrong number of values", s.name);
        for r in 0..rows {
            let at = s.off + r * s.ld + s.col;
            flat[at..at + cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
        }
    }

    /// The model's parameters in this layout.
    pub fn weights<B: Backend>(&self, model: &Llama<B>) -> Result<Vec<f32>, ModelError> {
        let mut flat = vec![0.0f32; self.len];
        self.weights_into(model, &mut flat)?;
        Ok(flat)
    }

    /// [`Layout::weights`] into an existing buffer of `len` values.
    pub fn weights_into<B: Backend>(&self, model: &Llama<B>, flat: &mut [f32]) -> Result<(), ModelError> {
        let tensors = crate::checkpoint::burn_tensors(model);
        if tensors.len() != self.slots.len() {
            return Err(ModelError::Config(format!("the model has {} parameters, the kernels' layout {}", tensors.len(), self.slots.len())));
        }
        for (name, shape, values) in tensors {
            let s = self.slots.iter().find(|s| s.name == name).ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            if s.shape != shape {
                return Err(ModelError::Shape { name, got: shape, expected: s.shape.clone() });
            }
            self.put(flat, s, &values);
        }
        Ok(())
    }

    /// The flat index ranges holding a parameter, one per row.
    pub fn rows(&self, s: &Slot) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let (rows, cols) = rows_cols(&s.shape);
        let (off, ld, col) = (s.off, s.ld, s.col);
        (0..rows).map(move |r| off + r * ld + col..off + r * ld + col + cols)
    }

    /// A parameter's values (row-major, its Burn shape) from the flat buffer.
    pub fn get(&self, flat: &[f32], s: &Slot) -> Vec<f32> {
        let (rows, cols) = rows_cols(&s.shape);
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let at = s.off + r * s.ld + s.col;
            out.extend_from_slice(&flat[at..at + cols]);
        }
        out
    }
}

/// The model's RoPE tables (`cos`, `sin`), `[max_position_embeddings, Hd]` each, on the host.
pub fn rope_tables<B: Backend>(model: &Llama<B>) -> (Vec<f32>, Vec<f32>) {
    let host = |t: &burn::tensor::Tensor<B, 2>| t.to_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    (host(&model.cos), host(&model.sin))
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => unreachable!("parameters are rank 1 or 2"),
    }
}

/// One batch: `b` sequences of `t` tokens, row-major.
pub struct BatchRef<'a> {
    pub inputs: &'a [i64],
    pub targets: &'a [i64],
    pub mask: &'a [f32],
    pub b: usize,
    pub t: usize,
}

/// RoPE tables, `[T, Hd]` each (the half-split convention of `llama.rs`).
struct Rope<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
}

/// What [`Kernels::loss_and_grads`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Mean masked cross-entropy (nats per token).
    pub loss: f64,
    /// Seconds the slowest thread spent in the forward pass and loss.
    pub forward_s: f64,
}

/// Reused activation buffers, so that a step allocates (and page-faults) nothing after the first.
#[derive(Default)]
struct Pool(Vec<Vec<f32>>);

impl Pool {
    /// A zeroed buffer of `n` values: the smallest free one that fits, else a new one.
    fn zeros(&mut self, n: usize) -> Vec<f32> {
        let mut v = self.any(n);
        v.fill(0.0);
        v
    }
    /// A buffer of `n` values whose contents are left over from earlier use: for outputs that
    /// are written in full before they are read.
    fn any(&mut self, n: usize) -> Vec<f32> {
        let best = (0..self.0.len()).filter(|&i| self.0[i].capacity() >= n).min_by_key(|&i| self.0[i].capacity());
        let mut v = best.map(|i| self.0.swap_remove(i)).unwrap_or_default();
        if v.len() > n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        v
    }
    fn copy(&mut self, src: &[f32]) -> Vec<f32> {
        let mut v = self.any(src.len());
        v.copy_from_slice(src);
        v
    }
    fn put(&mut self, bufs: impl IntoIterator<Item = Vec<f32>>) {
        self.0.extend(bufs);
    }
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
}

impl Kernels {
    /// `cos`/`sin` are the model's RoPE tables (see [`rope_tables`]).
    pub fn new(dims: Dims, cos: Vec<f32>, sin: Vec<f32>, threads: usize) -> Self {
        let threads = threads.max(1);
        let pools = (0..threads).map(|_| Default::default()).collect();
        Self { layout: Layout::new(dims), cos, sin, threads, pools, wide: true }
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

    /// Mean masked cross-entropy of `batch` and, when `grads` is given, its gradient with
    /// respect to every parameter (written into `grads`, which has `layout.len` values). The
    /// batch is split across the threads by sequence; shard gradients are summed in a fixed order.
    pub fn loss_and_grads(&self, w: &[f32], batch: &BatchRef, grads: Option<&mut [f32]>) -> Pass {
        let layout = &self.layout;
        self.check(w, batch.inputs.iter().chain(batch.targets.iter()), batch.t);
        let n_loss: f32 = batch.mask.iter().sum::<f32>().max(1.0);
        let bounds = self.bounds(batch.b);
        let shards = bounds.len();
        let rope = Rope { cos: &self.cos, sin: &self.sin };
        // Shard `i` writes its gradients into `out` (shard 0: the caller's buffer).
        let run = |i: usize, out: Option<&mut [f32]>| {
            let (s0, s1) = bounds[i];
            let rows = s0 * batch.t..s1 * batch.t;
            let part = BatchRef {
                inputs: &batch.inputs[rows.clone()],
                targets: &batch.targets[rows.clone()],
                mask: &batch.mask[rows],
                b: s1 - s0,
                t: batch.t,
            };
            let mut pool = self.pool(i);
            shard(layout, w, &rope, &part, n_loss, out, &mut pool, self.wide)
        };
        let Some(out) = grads else {
            // Forward only.
            let results: Vec<(f64, f64)> = (0..shards).into_par_iter().map(|i| run(i, None)).collect();
            return pass(&results, n_loss);
        };
        assert_eq!(out.len(), layout.len);
        let mut extra: Vec<Vec<f32>> = (1..shards).map(|i| self.pool(i).zeros(layout.len)).collect();
        out.fill(0.0);
        // Shards run on rayon's pool (long-lived threads, so gemm's per-thread packing buffers
        // are reused); `collect` keeps shard order.
        let outs: Vec<&mut [f32]> = std::iter::once(&mut *out).chain(extra.iter_mut().map(|g| g.as_mut_slice())).collect();
        let results: Vec<(f64, f64)> = outs.into_par_iter().enumerate().map(|(i, g)| run(i, Some(g))).collect();
        for (i, g) in extra.into_iter().enumerate() {
            add_into(out, &g);
            self.pool(i + 1).put([g]);
        }
        pass(&results, n_loss)
    }

    /// The invariants the kernels index by: weights of this layout, a context within the RoPE
    /// tables, token ids within the vocabulary (the trainer's data guarantees all three).
    fn check<'a>(&self, w: &[f32], tokens: impl Iterator<Item = &'a i64>, t: usize) {
        assert_eq!(w.len(), self.layout.len);
        assert!(t * self.layout.dims.head_dim <= self.cos.len(), "context {t} is longer than the RoPE tables");
        let vocab = self.layout.dims.vocab;
        for &tok in tokens {
            assert!(tok >= 0 && (tok as usize) < vocab, "token id {tok} outside the vocabulary of {vocab}");
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
        self.check(w, inputs.iter(), t);
        let rope = Rope { cos: &self.cos, sin: &self.sin };
        let bounds = self.bounds(b);
        let parts: Vec<Vec<f32>> = (0..bounds.len())
            .into_par_iter()
            .map(|i| {
                let (s0, s1) = bounds[i];
                let rows = s0 * t..s1 * t;
                let (zeros, mask) = (vec![0i64; rows.len()], vec![0.0f32; rows.len()]);
                let batch = BatchRef { inputs: &inputs[rows], targets: &zeros, mask: &mask, b: s1 - s0, t };
                let mut pool = self.pool(i);
                let mut acts = forward(&self.layout, w, &rope, &batch, &mut pool);
                let out = std::mem::take(&mut acts.logits);
                acts.recycle(&mut pool);
                out
            })
            .collect();
        parts.concat()
    }
}

fn pass(results: &[(f64, f64)], n_loss: f32) -> Pass {
    let loss: f64 = results.iter().map(|r| r.0).sum();
    let forward_s = results.iter().fold(0.0f64, |m, r| m.max(r.1));
    Pass { loss: loss / n_loss as f64, forward_s }
}

/// What the backward pass needs from one layer's forward pass.
struct LayerActs {
    x: Vec<f32>,   // [N, D] layer input
    r1: Vec<f32>,  // [N] 1 / rms of x
    hn1: Vec<f32>, // [N, D] normed input
    qkv: Vec<f32>, // [N, Q + 2KV] after RoPE
    p: Vec<f32>,   // [B, H, T, T] attention probabilities
    y: Vec<f32>,   // [N, Q] attention output
    x2: Vec<f32>,  // [N, D] residual after attention
    r2: Vec<f32>,  // [N]
    hn2: Vec<f32>, // [N, D]
    gu: Vec<f32>,  // [N, 2F] gate and up projections
    sig: Vec<f32>, // [N, F] sigmoid(gate)
    a: Vec<f32>,   // [N, F] silu(gate) * up
}

struct Acts {
    layers: Vec<LayerActs>,
    xf: Vec<f32>,     // [N, D] final residual
    rf: Vec<f32>,     // [N]
    hf: Vec<f32>,     // [N, D] final normed
    logits: Vec<f32>, // [N, V]
}

impl Acts {
    fn recycle(self, pool: &mut Pool) {
        for l in self.layers {
            pool.put([l.x, l.r1, l.hn1, l.qkv, l.p, l.y, l.x2, l.r2, l.hn2, l.gu, l.sig, l.a]);
        }
        pool.put([self.xf, self.rf, self.hf, self.logits]);
    }
}

#[inline(always)]
fn forward(layout: &Layout, w: &[f32], rope: &Rope, batch: &BatchRef, pool: &mut Pool) -> Acts {
    let dm = &layout.dims;
    let (d, f, hd, v) = (dm.d, dm.ffn, dm.head_dim, dm.vocab);
    let (q, qkv) = (dm.q(), dm.qkv());
    let (b, t) = (batch.b, batch.t);
    let n = b * t;
    let scale = 1.0 / (hd as f32).sqrt();

    // Embedding lookup: x[i] = E[token_i].
    let mut x = pool.any(n * d); // [N, D]
    for (i, &tok) in batch.inputs.iter().enumerate() {
        let e = layout.embed + tok as usize * d;
        x[i * d..(i + 1) * d].copy_from_slice(&w[e..e + d]);
    }
    let mut layers = Vec::with_capacity(dm.layers);
    for at in &layout.layers {
        let mut hn1 = pool.any(n * d);
        let r1 = rms_norm(&x, &w[at.ln1..at.ln1 + d], dm.eps, d, &mut hn1, pool); // [N, D]
        let mut qkv_b = pool.any(n * qkv);
        mm(n, qkv, d, &mut qkv_b, qkv, false, 1.0, rm(&hn1, d), rm(&w[at.wqkv..], qkv)); // [N, Q+2KV]
        rope_rows(&mut qkv_b, qkv, dm.heads + dm.kv_heads, hd, t, rope, false);
        let mut p = pool.any(b * dm.heads * t * t);
        let mut y = pool.any(n * q);
        attention_forward(dm, &qkv_b, &mut p, &mut y, b, t, scale);
        let mut x2 = pool.copy(&x);
        mm(n, d, q, &mut x2, d, true, 1.0, rm(&y, q), rm(&w[at.wo..], d)); // [N, D] = x + y·Wo
        let mut hn2 = pool.any(n * d);
        let r2 = rms_norm(&x2, &w[at.ln2..at.ln2 + d], dm.eps, d, &mut hn2, pool);
        let mut gu = pool.any(n * 2 * f);
        mm(n, 2 * f, d, &mut gu, 2 * f, false, 1.0, rm(&hn2, d), rm(&w[at.wgu..], 2 * f)); // [N, 2F]
        let mut sig = pool.any(n * f);
        let mut a = pool.any(n * f);
        for i in 0..n {
            let (g, u) = gu[i * 2 * f..(i + 1) * 2 * f].split_at(f);
            swiglu(g, u, &mut sig[i * f..(i + 1) * f], &mut a[i * f..(i + 1) * f]);
        }
        let mut x3 = pool.copy(&x2);
        mm(n, d, f, &mut x3, d, true, 1.0, rm(&a, f), rm(&w[at.wd..], d)); // [N, D] = x2 + a·Wd
        layers.push(LayerActs { x, r1, hn1, qkv: qkv_b, p, y, x2, r2, hn2, gu, sig, a });
        x = x3;
    }
    let mut hf = pool.any(n * d);
    let rf = rms_norm(&x, &w[layout.norm..layout.norm + d], dm.eps, d, &mut hf, pool);
    let mut logits = pool.any(n * v);
    match layout.head {
        Some(h) => mm(n, v, d, &mut logits, v, false, 1.0, rm(&hf, d), rm(&w[h..], v)), // [N, V]
        None => mm(n, v, d, &mut logits, v, false, 1.0, rm(&hf, d), rm(&w[layout.embed..], d).t()), // [N, V]
    }
    Acts { layers, xf: x, rf, hf, logits }
}

/// Forward, loss and (optionally) backward for one thread's sequences. Returns the sum of
/// `mask · nll` over its rows and the seconds spent up to the loss; gradients are of the mean
/// over all `n_loss` masked tokens.
#[allow(clippy::too_many_arguments)]
fn shard(layout: &Layout, w: &[f32], rope: &Rope, batch: &BatchRef, n_loss: f32, grads: Option<&mut [f32]>, pool: &mut Pool, wide: bool) -> (f64, f64) {
    // The elementwise loops, compiled again with AVX-512 where the CPU has it. Rust never fuses
    // a multiply and an add on its own, and every reduction has a fixed order, so both versions
    // give bit-identical results (tested).
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide(layout: &Layout, w: &[f32], rope: &Rope, batch: &BatchRef, n_loss: f32, grads: Option<&mut [f32]>, pool: &mut Pool) -> (f64, f64) {
            shard_impl(layout, w, rope, batch, n_loss, grads, pool)
        }
        // SAFETY: the CPU supports the features `wide` is compiled for (checked just above).
        return unsafe { wide(layout, w, rope, batch, n_loss, grads, pool) };
    }
    shard_impl(layout, w, rope, batch, n_loss, grads, pool)
}

#[inline(always)]
fn shard_impl(layout: &Layout, w: &[f32], rope: &Rope, batch: &BatchRef, n_loss: f32, grads: Option<&mut [f32]>, pool: &mut Pool) -> (f64, f64) {
    let t0 = std::time::Instant::now();
    let dm = &layout.dims;
    let (d, f, hd, v) = (dm.d, dm.ffn, dm.head_dim, dm.vocab);
    let (q, qkv) = (dm.q(), dm.qkv());
    let (b, t) = (batch.b, batch.t);
    let n = b * t;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut acts = forward(layout, w, rope, batch, pool);

    // Loss, and d loss / d logits in place of the logits: (softmax - onehot) · mask / n_loss.
    let mut loss = 0.0f64;
    for i in 0..n {
        let row = &mut acts.logits[i * v..(i + 1) * v];
        let m = batch.mask[i];
        let mx = max(row);
        let target = batch.targets[i] as usize;
        let z = row[target] - mx;
        row.iter_mut().for_each(|x| *x = exp(*x - mx));
        let sum = sum(row);
        if m != 0.0 {
            loss += (m * (sum.ln() - z)) as f64; // -log softmax(target)
        }
        let k = m / (sum * n_loss);
        for x in row.iter_mut() {
            *x *= k;
        }
        row[target] -= m / n_loss;
    }
    let forward_s = t0.elapsed().as_secs_f64();
    let Some(g) = grads else {
        acts.recycle(pool);
        return (loss, forward_s);
    };
    let dl = &acts.logits; // [N, V]

    // Output head (or tied embedding) and the final norm.
    let mut dh = pool.any(n * d); // [N, D]
    match layout.head {
        Some(h) => {
            mm(d, v, n, &mut g[h..], v, true, 1.0, rm(&acts.hf, d).t(), rm(dl, v)); // dHead [D, V] += hf^T·dl
            mm(n, d, v, &mut dh, d, false, 1.0, rm(dl, v), rm(&w[h..], v).t()); // [N, D] = dl·Head^T
        }
        None => {
            mm(v, d, n, &mut g[layout.embed..], d, true, 1.0, rm(dl, v).t(), rm(&acts.hf, d)); // dE [V, D] += dl^T·hf
            mm(n, d, v, &mut dh, d, false, 1.0, rm(dl, v), rm(&w[layout.embed..], d)); // [N, D] = dl·E
        }
    }
    let mut dx = pool.zeros(n * d); // [N, D] gradient of the residual stream
    rms_norm_backward(&dh, &acts.xf, &acts.rf, &w[layout.norm..layout.norm + d], d, &mut dx, &mut g[layout.norm..layout.norm + d]);

    let mut da = pool.any(n * f);
    let mut dgu = pool.any(n * 2 * f);
    let mut dhn = pool.any(n * d);
    let mut dy = pool.any(n * q);
    let mut dqkv = pool.any(n * qkv);
    let mut dp = pool.any(t * t);
    for (at, la) in layout.layers.iter().zip(acts.layers.iter()).rev() {
        // MLP: x3 = x2 + a·Wd, a = silu(g)·u, [g u] = hn2·Wgu, hn2 = norm(x2).
        mm(f, d, n, &mut g[at.wd..], d, true, 1.0, rm(&la.a, f).t(), rm(&dx, d)); // dWd [F, D] += a^T·dx
        mm(n, f, d, &mut da, f, false, 1.0, rm(&dx, d), rm(&w[at.wd..], d).t()); // da [N, F] = dx·Wd^T
        for i in 0..n {
            let (gg, uu) = la.gu[i * 2 * f..(i + 1) * 2 * f].split_at(f);
            let (dg, du) = dgu[i * 2 * f..(i + 1) * 2 * f].split_at_mut(f);
            swiglu_backward(gg, uu, &la.sig[i * f..(i + 1) * f], &da[i * f..(i + 1) * f], dg, du);
        }
        mm(d, 2 * f, n, &mut g[at.wgu..], 2 * f, true, 1.0, rm(&la.hn2, d).t(), rm(&dgu, 2 * f)); // dWgu [D, 2F]
        mm(n, d, 2 * f, &mut dhn, d, false, 1.0, rm(&dgu, 2 * f), rm(&w[at.wgu..], 2 * f).t()); // dhn2 [N, D]
        // dx now holds d/dx2 (the residual path); the norm adds its share.
        rms_norm_backward(&dhn, &la.x2, &la.r2, &w[at.ln2..at.ln2 + d], d, &mut dx, &mut g[at.ln2..at.ln2 + d]);

        // Attention: x2 = x + y·Wo.
        mm(q, d, n, &mut g[at.wo..], d, true, 1.0, rm(&la.y, q).t(), rm(&dx, d)); // dWo [Q, D] += y^T·dx2
        mm(n, q, d, &mut dy, q, false, 1.0, rm(&dx, d), rm(&w[at.wo..], d).t()); // dy [N, Q]
        dqkv.iter_mut().for_each(|x| *x = 0.0);
        attention_backward(dm, &la.qkv, &la.p, &dy, &mut dqkv, &mut dp, b, t, scale);
        rope_rows(&mut dqkv, qkv, dm.heads + dm.kv_heads, hd, t, rope, true);
        mm(d, qkv, n, &mut g[at.wqkv..], qkv, true, 1.0, rm(&la.hn1, d).t(), rm(&dqkv, qkv)); // dWqkv [D, Q+2KV]
        mm(n, d, qkv, &mut dhn, d, false, 1.0, rm(&dqkv, qkv), rm(&w[at.wqkv..], qkv).t()); // dhn1 [N, D]
        rms_norm_backward(&dhn, &la.x, &la.r1, &w[at.ln1..at.ln1 + d], d, &mut dx, &mut g[at.ln1..at.ln1 + d]);
    }
    // Embedding: dE[token_i] += dx[i].
    for (i, &tok) in batch.inputs.iter().enumerate() {
        let e = layout.embed + tok as usize * d;
        add_into(&mut g[e..e + d], &dx[i * d..(i + 1) * d]);
    }
    pool.put([dh, dx, da, dgu, dhn, dy, dqkv, dp]);
    acts.recycle(pool);
    (loss, forward_s)
}

/// Causal attention for every sequence and head: `P = softmax(Q·K^T·scale)`, `Y = P·V`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attention_forward(dm: &Dims, qkv: &[f32], p: &mut [f32], y: &mut [f32], b: usize, t: usize, scale: f32) {
    let (hd, q, kv, ld) = (dm.head_dim, dm.q(), dm.kv(), dm.qkv());
    let group = dm.heads / dm.kv_heads;
    for s in 0..b {
        let rows = s * t * ld;
        for h in 0..dm.heads {
            let kh = h / group;
            let qs = &qkv[rows + h * hd..]; // [T, Hd], row stride Q+2KV
            let ks = &qkv[rows + q + kh * hd..];
            let vs = &qkv[rows + q + kv + kh * hd..];
            let ps = &mut p[(s * dm.heads + h) * t * t..][..t * t]; // [T, T]
            for (r0, r1) in causal_blocks(t) {
                // Scores of query rows r0..r1 against the keys they may see, 0..r1.
                mm(r1 - r0, r1, hd, &mut ps[r0 * t..], t, false, scale, rm(&qs[r0 * ld..], ld), rm(ks, ld).t());
            }
            for i in 0..t {
                let row = &mut ps[i * t..(i + 1) * t];
                let (seen, future) = row.split_at_mut(i + 1);
                let mx = max(seen);
                seen.iter_mut().for_each(|x| *x = exp(*x - mx));
                let inv = 1.0 / sum(seen);
                seen.iter_mut().for_each(|x| *x *= inv);
                future.iter_mut().for_each(|x| *x = 0.0);
            }
            for (r0, r1) in causal_blocks(t) {
                mm(r1 - r0, hd, r1, &mut y[(s * t + r0) * q + h * hd..], q, false, 1.0, rm(&ps[r0 * t..], t), rm(vs, ld)); // Y = P·V
            }
        }
    }
}

/// Gradients of [`attention_forward`] with respect to q, k and v, into `dqkv` (zeroed by the
/// caller; k and v accumulate over the query heads that share them). `dp` is `[T, T]` scratch.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attention_backward(dm: &Dims, qkv: &[f32], p: &[f32], dy: &[f32], dqkv: &mut [f32], dp: &mut [f32], b: usize, t: usize, scale: f32) {
    let (hd, q, kv, ld) = (dm.head_dim, dm.q(), dm.kv(), dm.qkv());
    let group = dm.heads / dm.kv_heads;
    for s in 0..b {
        let rows = s * t * ld;
        for h in 0..dm.heads {
            let kh = h / group;
            let qs = &qkv[rows + h * hd..];
            let ks = &qkv[rows + q + kh * hd..];
            let vs = &qkv[rows + q + kv + kh * hd..];
            let ps = &p[(s * dm.heads + h) * t * t..][..t * t];
            let dys = &dy[s * t * q + h * hd..]; // [T, Hd], row stride Q
            for (r0, r1) in causal_blocks(t) {
                let (m, drow) = (r1 - r0, &dys[r0 * q..]);
                mm(m, r1, hd, &mut dp[r0 * t..], t, false, 1.0, rm(drow, q), rm(vs, ld).t()); // dP = dY·V^T
                mm(r1, hd, m, &mut dqkv[rows + q + kv + kh * hd..], ld, true, 1.0, rm(&ps[r0 * t..], t).t(), rm(drow, q)); // dV += P^T·dY
                for i in r0..r1 {
                    let pr = &ps[i * t..i * t + i + 1];
                    let dr = &mut dp[i * t..(i + 1) * t];
                    let pd = dot(pr, &dr[..=i]);
                    for (x, &pv) in dr[..=i].iter_mut().zip(pr) {
                        *x = pv * (*x - pd) * scale;
                    }
                    dr[i + 1..].iter_mut().for_each(|x| *x = 0.0);
                }
                mm(m, hd, r1, &mut dqkv[rows + r0 * ld + h * hd..], ld, false, 1.0, rm(&dp[r0 * t..], t), rm(ks, ld)); // dQ = dS·K
                mm(r1, hd, m, &mut dqkv[rows + q + kh * hd..], ld, true, 1.0, rm(&dp[r0 * t..], t).t(), rm(&qs[r0 * ld..], ld)); // dK += dS^T·Q
            }
        }
    }
}

/// Query-row blocks `(r0, r1)` of causal attention: block rows see keys `0..r1` only, so the
/// matmuls skip most of the masked upper triangle (one block up to 64 positions).
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    const BLOCK: usize = 64;
    (0..t).step_by(BLOCK).map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

/// Rotates the first `heads` head-sized column blocks of every row (q then k heads) by the
/// position's angle (row `i` is position `i % t`); `inverse` rotates back (the backward pass).
#[inline(always)]
fn rope_rows(x: &mut [f32], ld: usize, heads: usize, hd: usize, t: usize, rope: &Rope, inverse: bool) {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    for (i, row) in x.chunks_exact_mut(ld).enumerate() {
        let pos = i % t;
        let cos = &rope.cos[pos * hd..pos * hd + half];
        let sin = &rope.sin[pos * hd..pos * hd + half];
        for h in 0..heads {
            let (a, b) = row[h * hd..(h + 1) * hd].split_at_mut(half);
            for j in 0..half {
                let (x1, x2, c, s) = (a[j], b[j], cos[j], sign * sin[j]);
                a[j] = x1 * c - x2 * s;
                b[j] = x2 * c + x1 * s;
            }
        }
    }
}

/// `out = x / rms(x) · w` per row of `d`; returns `1 / rms` per row.
#[inline(always)]
fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: usize, out: &mut [f32], pool: &mut Pool) -> Vec<f32> {
    let mut r = pool.any(x.len() / d);
    for ((xr, or), ri) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(r.iter_mut()) {
        let inv = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
        *ri = inv;
    }
    r
}

/// Backward of [`rms_norm`]: adds d/dx into `dx` and d/dw into `dw`.
#[inline(always)]
fn rms_norm_backward(dy: &[f32], x: &[f32], r: &[f32], w: &[f32], d: usize, dx: &mut [f32], dw: &mut [f32]) {
    let mut gx = vec![0.0f32; d]; // dy·x of one row
    for (i, ((dyr, xr), dxr)) in dy.chunks_exact(d).zip(x.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).enumerate() {
        let inv = r[i];
        for ((o, &g), &xv) in gx.iter_mut().zip(dyr).zip(xr) {
            *o = g * xv;
        }
        for (dwv, &v) in dw.iter_mut().zip(&gx) {
            *dwv += v * inv;
        }
        let k = dot(&gx, w) * inv * inv * inv / d as f32; // Σ dy·w·x, scaled
        for ((o, &g), (&xv, &wv)) in dxr.iter_mut().zip(dyr).zip(xr.iter().zip(w)) {
            *o += g * wv * inv - xv * k;
        }
    }
}

/// `a = silu(g)·u`, keeping `sig = sigmoid(g)`.
#[inline(always)]
fn swiglu(g: &[f32], u: &[f32], sig: &mut [f32], a: &mut [f32]) {
    for (((&gv, &uv), s), av) in g.iter().zip(u).zip(sig.iter_mut()).zip(a.iter_mut()) {
        *s = 1.0 / (1.0 + exp(-gv));
        *av = gv * *s * uv;
    }
}

#[inline(always)]
fn swiglu_backward(g: &[f32], u: &[f32], sig: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let (gv, s) = (g[i], sig[i]);
        du[i] = da[i] * gv * s;
        dg[i] = da[i] * u[i] * s * (1.0 + gv * (1.0 - s));
    }
}

/// `Σ a·b`, in 8 independent partial sums so that the loop vectorises (a fixed order, so the
/// result is deterministic).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a`, as [`dot`].
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ac = a.chunks_exact(8);
    let tail: f32 = ac.remainder().iter().sum();
    for x in ac {
        for i in 0..8 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `max a` (`-inf` when empty).
#[inline(always)]
fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let ac = a.chunks_exact(8);
    let tail = ac.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in ac {
        for i in 0..8 {
            acc[i] = acc[i].max(x[i]);
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

#[inline(always)]
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (a, &b) in dst.iter_mut().zip(src) {
        *a += b;
    }
}

/// `e^x` to about 2 ulp, branch-free so that loops over it vectorise (Cephes' `expf`).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.max(-87.0).min(88.0);
    let n = (x * std::f32::consts::LOG2_E + 12582912.0) - 12582912.0; // round to nearest
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// A strided matrix view for `gemm`: element `(i, j)` is at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View<'a> {
    s: &'a [f32],
    rs: usize,
    cs: usize,
}

/// Row-major view with `ld` columns per row.
fn rm(s: &[f32], ld: usize) -> View<'_> {
    View { s, rs: ld, cs: 1 }
}

impl View<'_> {
    fn t(self) -> Self {
        View { s: self.s, rs: self.cs, cs: self.rs }
    }
    fn check(&self, rows: usize, cols: usize) {
        assert!(rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.s.len(), "matrix view out of bounds");
    }
}

/// `dst[m, n] (row stride ld) = (acc ? dst : 0) + scale · a[m, k] · b[k, n]`, single-threaded.
#[allow(clippy::too_many_arguments)]
fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], ld: usize, acc: bool, scale: f32, a: View, b: View) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ld + n <= dst.len(), "matmul output out of bounds");
    a.check(m, k);
    b.check(k, n);
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * ld..r * ld + n].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        return;
    }
    // SAFETY: every element the call reads or writes is inside the slices (checked above), and
    // `dst` does not alias `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            acc,
            a.s.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.s.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn matmul_views_transpose() {
        // a [2, 3], b [3, 2]; a·b and (b^T·a^T)^T agree with a hand computation.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut c = [0.0; 4];
        mm(2, 2, 3, &mut c, 2, false, 1.0, rm(&a, 3), rm(&b, 2));
        assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
        let mut ct = [0.0; 4];
        mm(2, 2, 3, &mut ct, 2, false, 1.0, rm(&b, 2).t(), rm(&a, 3).t());
        assert_eq!(ct, [58.0, 139.0, 64.0, 154.0]);
        mm(2, 2, 3, &mut c, 2, true, 0.5, rm(&a, 3), rm(&b, 2));
        assert_eq!(c, [87.0, 96.0, 208.5, 231.0]);
    }
}
