//! The model's maths on one thread's sequences: [`forward`] (activations kept for the backward
//! pass), [`cross_entropy`] (the loss, and its gradient in place of the logits), and [`backward`]
//! (every parameter's gradient), mirror images section by section, as llm.c's `gpt2_forward`
//! and `gpt2_backward`.
//!
//! Shapes: N = rows (sequences × T) of one thread, T = context, D = hidden, H = heads,
//! K = kv heads, Hd = head dim, Q = H·Hd, KV = K·Hd, F = SwiGLU hidden, V = vocabulary.

use super::adapters::{AdScratch, Adapt, DOWN, GATE, K, O, Q, UP, V};
use super::frozen::Weights;
use super::layout::{LayerAt, Layout};
use super::sink::Grads;
use super::ops::*;
use super::pool::Pool;
use super::BatchRef;

/// RoPE tables, `[T, Hd]` each (the half-split convention of `llama.rs`).
pub(super) struct Rope<'a> {
    pub(super) cos: &'a [f32],
    pub(super) sin: &'a [f32],
}

/// What the backward pass reads from one layer's forward pass, besides its input. What is cheap
/// to compute again is not kept: the normed inputs (from x and 1/rms), sigmoid(gate) and
/// silu(gate)·up (from the projections), and the attention probabilities (`[B, H, T, T]`, from q
/// and k). The backward pass recomputes them with the same operations, so the gradients are the
/// same, bit for bit.
struct Saved {
    r1: Vec<f32>,  // [N] 1 / rms of x
    qkv: Vec<f32>, // [N, Q + 2KV] after RoPE
    y: Vec<f32>,   // [N, Q] attention output
    x2: Vec<f32>,  // [N, D] residual after attention
    r2: Vec<f32>,  // [N]
    gu: Vec<f32>,  // [N, 2F] gate and up projections
}

impl Saved {
    fn recycle(self, pool: &mut Pool) {
        pool.put([self.r1, self.qkv, self.y, self.x2, self.r2, self.gu]);
    }
}

struct LayerActs {
    x: Vec<f32>, // [N, D] layer input
    /// `None` under gradient checkpointing: the backward pass runs the layer again from `x`.
    saved: Option<Saved>,
}

/// What [`forward`] keeps for a backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keep {
    /// Every layer's [`Saved`] values: the fastest backward.
    All,
    /// Each layer's input only (gradient checkpointing): the backward pass runs each layer's
    /// forward again (without its down projection), about a fifth more work, for some 12
    /// times less activation memory.
    Inputs,
    /// Nothing: forward only (logits, validation).
    Nothing,
}

pub(super) struct Acts {
    layers: Vec<LayerActs>,
    xf: Vec<f32>,     // [N, D] final residual
    rf: Vec<f32>,     // [N]
    hf: Vec<f32>,     // [N, D] final normed
    /// d loss / d hf given from outside (a loss on the hidden states, `contrastive.rs`), added
    /// to the head's.
    given: Option<Vec<f32>>,
    /// The rows the head ran on, where not all: those whose target carries loss (SFT, where
    /// the prompt's rows carry none and the head is a fifth of the model's FLOPs).
    rows: Option<Vec<usize>>,
    hsel: Vec<f32>,   // [M, D] those rows of hf
    pub(super) logits: Vec<f32>, // [M, V] (M = N without `rows`)
}

impl Acts {
    pub(super) fn recycle(self, pool: &mut Pool) {
        for l in self.layers {
            pool.put([l.x]);
            if let Some(s) = l.saved {
                s.recycle(pool);
            }
        }
        pool.put([self.xf, self.rf, self.hf, self.hsel, self.logits]);
        if let Some(g) = self.given {
            pool.put([g]);
        }
    }

    /// The final norm's output `[N, D]`, taken out of the activations.
    pub(super) fn take_hidden(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.hf)
    }
}

/// Per-layer scratch of both passes, not kept: the normed inputs, one head's attention
/// probabilities, sigmoid(gate), the SwiGLU output, and an adapter's `x·Aᵀ` and its gradient.
struct Scratch {
    hn: Vec<f32>,  // [N, D]
    p: Vec<f32>,   // [T, T]
    sig: Vec<f32>, // [N, F]
    a: Vec<f32>,   // [N, F]
    ad: AdScratch, // the adapters' (empty without them)
}

impl Scratch {
    fn new(pool: &mut Pool, s: &Sizes, ad: Option<Adapt>) -> Self {
        let ad = AdScratch::new(pool, ad, s.n, s.d.max(s.q).max(s.f));
        Self { hn: pool.any(s.n * s.d), p: pool.any(s.t * s.t), sig: pool.any(s.n * s.f), a: pool.any(s.n * s.f), ad }
    }
    fn recycle(self, pool: &mut Pool) {
        pool.put([self.hn, self.p, self.sig, self.a]);
        self.ad.recycle(pool);
    }
}

/// The sizes both passes index by (the names of the shapes in the comments).
#[derive(Clone, Copy)]
struct Sizes {
    d: usize,
    f: usize,
    hd: usize,
    v: usize,
    q: usize,
    qkv: usize,
    b: usize,
    t: usize,
    n: usize,
    /// The attention scale, `1 / √Hd`.
    scale: f32,
}

impl Sizes {
    #[inline(always)]
    fn of(layout: &Layout, batch: &BatchRef) -> Self {
        let dm = &layout.dims;
        let (b, t) = (batch.b, batch.t);
        Self { d: dm.d, f: dm.ffn, hd: dm.head_dim, v: dm.vocab, q: dm.q(), qkv: dm.qkv(), b, t, n: b * t, scale: 1.0 / (dm.head_dim as f32).sqrt() }
    }
}

#[inline(always)]
/// With `all_logits` false, the head runs only on the rows whose target carries loss (all of
/// them when pretraining). `ad`: LoRA adapters on top of the weights `w`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, pool: &mut Pool, all_logits: bool, keep: Keep) -> Acts {
    let dm = &layout.dims;
    let sz = Sizes::of(layout, batch);
    let Sizes { d, v, n, .. } = sz;
    let mut dec = Vec::new(); // a bf16 base's values, decoded

    // Embedding lookup: x[i] = E[token_i].
    let mut x = pool.any(n * d); // [N, D]
    for (i, &tok) in batch.inputs.iter().enumerate() {
        let e = layout.embed + tok as usize * d;
        x[i * d..(i + 1) * d].copy_from_slice(w.span(e, d, &mut dec));
    }
    let mut layers = Vec::with_capacity(dm.layers);
    let mut sc = Scratch::new(pool, &sz, ad);
    for l in 0..layout.layers.len() {
        let (wl, at) = w.layer(layout, l, &mut dec);
        let (saved, x3) = layer(layout, l, &at, wl, ad, rope, batch, &x, &mut sc, pool, true);
        let Some(x3) = x3 else { unreachable!("`next` asks for x3") };
        match keep {
            Keep::All => layers.push(LayerActs { x, saved: Some(saved) }),
            Keep::Inputs => {
                saved.recycle(pool);
                layers.push(LayerActs { x, saved: None });
            }
            Keep::Nothing => {
                saved.recycle(pool);
                pool.put([x]);
            }
        }
        x = x3;
    }
    sc.recycle(pool);
    let mut hf = pool.any(n * d);
    let rf = rms_norm(&x, w.span(layout.norm, d, &mut dec), dm.eps, d, &mut hf, pool);
    let rows: Option<Vec<usize>> = (!all_logits && batch.mask.contains(&0.0)).then(|| (0..n).filter(|&i| batch.mask[i] != 0.0).collect());
    let mut hsel = pool.any(rows.as_ref().map_or(0, |r| r.len() * d));
    if let Some(r) = &rows {
        for (j, &i) in r.iter().enumerate() {
            hsel[j * d..(j + 1) * d].copy_from_slice(&hf[i * d..(i + 1) * d]); // [M, D]
        }
    }
    let (m, h_in) = match &rows {
        Some(r) => (r.len(), &hsel),
        None => (n, &hf),
    };
    let mut logits = pool.any(m * v);
    match w {
        _ if m == 0 => {}
        Weights::F32(w) => match layout.head {
            Some(h) => mm(m, v, d, &mut logits, v, false, 1.0, rm(h_in, d), rm(&w[h..], v)), // [M, V]
            None => mm(m, v, d, &mut logits, v, false, 1.0, rm(h_in, d), rm(&w[layout.embed..], d).t()), // [M, V]
        },
        Weights::Half(..) => {
            for (c0, c1) in Weights::head_chunks(v) {
                let chunk = w.head_chunk(layout, c0, c1, &mut dec); // [C, D]
                mm(m, c1 - c0, d, &mut logits[c0..], v, false, 1.0, rm(h_in, d), rm(chunk, d).t()); // [M, C] of [M, V]
            }
        }
    }
    Acts { layers, xf: x, rf, hf, given: None, rows, hsel, logits }
}

/// One decoder layer's forward pass: its input `x` `[N, D]` to the values the backward pass
/// reads, and, with `next`, the next residual `x3` `[N, D]` (a recomputation for the backward
/// pass needs no `x3`, which saves the down projection, a quarter of the layer's matmuls).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layer(layout: &Layout, l: usize, at: &LayerAt, w: &[f32], ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, x: &[f32], sc: &mut Scratch, pool: &mut Pool, next: bool) -> (Saved, Option<Vec<f32>>) {
    let dm = &layout.dims;
    let Sizes { d, f, hd, q, qkv, b, t, n, scale, .. } = Sizes::of(layout, batch);
    let kv = dm.kv();
    let Scratch { hn, p, sig, a, ad: asc } = sc;
    let r1 = rms_norm(x, &w[at.ln1..at.ln1 + d], dm.eps, d, hn, pool); // [N, D]
    let mut qkv_b = pool.any(n * qkv);
    mm(n, qkv, d, &mut qkv_b, qkv, false, 1.0, rm(hn, d), rm(&w[at.wqkv..], qkv)); // [N, Q+2KV]
    if let Some(ad) = ad {
        for (m, col) in [(Q, 0), (K, q), (V, q + kv)] {
            ad.forward(l, m, n, hn, &mut qkv_b[col..], qkv, asc); // + s·(hn·Aᵀ)·Bᵀ
        }
    }
    rope_rows(&mut qkv_b, qkv, dm.heads + dm.kv_heads, hd, t, batch.starts, rope, false);
    let mut y = pool.any(n * q);
    attention_forward(dm, &qkv_b, p, &mut y, b, t, batch.starts, scale);
    let mut x2 = pool.copy(x);
    mm(n, d, q, &mut x2, d, true, 1.0, rm(&y, q), rm(&w[at.wo..], d)); // [N, D] = x + y·Wo
    if let Some(ad) = ad {
        ad.forward(l, O, n, &y, &mut x2, d, asc);
    }
    let r2 = rms_norm(&x2, &w[at.ln2..at.ln2 + d], dm.eps, d, hn, pool);
    let mut gu = pool.any(n * 2 * f);
    mm(n, 2 * f, d, &mut gu, 2 * f, false, 1.0, rm(hn, d), rm(&w[at.wgu..], 2 * f)); // [N, 2F]
    if let Some(ad) = ad {
        ad.forward(l, GATE, n, hn, &mut gu, 2 * f, asc);
        ad.forward(l, UP, n, hn, &mut gu[f..], 2 * f, asc);
    }
    let x3 = next.then(|| {
        swiglu_rows(&gu, f, sig, a);
        let mut x3 = pool.copy(&x2);
        mm(n, d, f, &mut x3, d, true, 1.0, rm(a, f), rm(&w[at.wd..], d)); // [N, D] = x2 + a·Wd
        if let Some(ad) = ad {
            ad.forward(l, DOWN, n, a, &mut x3, d, asc);
        }
        x3
    });
    (Saved { r1, qkv: qkv_b, y, x2, r2, gu }, x3)
}

/// Forward, loss and (optionally) backward for one thread's sequences. Returns the sum of
/// `mask · nll` over its rows and the seconds spent up to the loss; gradients are of the mean
/// over all `n_loss` masked tokens.
#[allow(clippy::too_many_arguments)]
pub(super) fn shard(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, n_loss: f32, grads: Option<Grads>, keep: Keep, pool: &mut Pool, wide: bool) -> (f64, f64) {
    // The elementwise loops, compiled again with AVX-512 where the CPU has it. Rust never fuses
    // a multiply and an add on its own, and every reduction has a fixed order, so both versions
    // give bit-identical results (tested).
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, n_loss: f32, grads: Option<Grads>, keep: Keep, pool: &mut Pool) -> (f64, f64) {
            shard_impl(layout, w, ad, rope, batch, n_loss, grads, keep, pool)
        }
        // SAFETY: the CPU supports the features `wide` is compiled for (checked just above).
        return unsafe { wide(layout, w, ad, rope, batch, n_loss, grads, keep, pool) };
    }
    shard_impl(layout, w, ad, rope, batch, n_loss, grads, keep, pool)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn shard_impl(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, n_loss: f32, grads: Option<Grads>, keep: Keep, pool: &mut Pool) -> (f64, f64) {
    let t0 = std::time::Instant::now();
    let keep = if grads.is_some() { keep } else { Keep::Nothing };
    let mut acts = forward(layout, w, ad, rope, batch, pool, false, keep);
    let loss = cross_entropy(&mut acts.logits, acts.rows.as_deref(), batch, n_loss, layout.dims.vocab);
    let forward_s = t0.elapsed().as_secs_f64();
    if let Some(mut g) = grads {
        backward(layout, w, ad, rope, batch, &acts, &mut g, pool);
    }
    acts.recycle(pool);
    (loss, forward_s)
}

/// [`forward`] without the head (`batch.mask` is all 0) for one thread's sequences, its
/// activations kept as `keep` says, in the AVX-512 build where the CPU has it (as [`shard`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn shard_forward(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, keep: Keep, pool: &mut Pool, wide: bool) -> Acts {
    debug_assert!(batch.mask.iter().all(|&m| m == 0.0));
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, keep: Keep, pool: &mut Pool) -> Acts {
            forward(layout, w, ad, rope, batch, pool, false, keep)
        }
        // SAFETY: the CPU supports the features `wide` is compiled for (checked just above).
        return unsafe { wide(layout, w, ad, rope, batch, keep, pool) };
    }
    forward(layout, w, ad, rope, batch, pool, false, keep)
}

/// The backward pass from a gradient `dh` (`[N, D]`) of the final norm's output, for one
/// thread's sequences: from the activations of [`shard_forward`] when `kept`, else after a
/// forward pass kept as `keep` says (no head: `batch.mask` is all 0); `dh` enters where the
/// head's gradient would.
#[allow(clippy::too_many_arguments)]
pub(super) fn shard_given(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, kept: Option<Acts>, dh: &[f32], grads: Grads, keep: Keep, pool: &mut Pool, wide: bool) {
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, kept: Option<Acts>, dh: &[f32], grads: Grads, keep: Keep, pool: &mut Pool) {
            given_impl(layout, w, ad, rope, batch, kept, dh, grads, keep, pool)
        }
        // SAFETY: the CPU supports the features `wide` is compiled for (checked just above).
        return unsafe { wide(layout, w, ad, rope, batch, kept, dh, grads, keep, pool) };
    }
    given_impl(layout, w, ad, rope, batch, kept, dh, grads, keep, pool)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn given_impl(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, kept: Option<Acts>, dh: &[f32], mut g: Grads, keep: Keep, pool: &mut Pool) {
    debug_assert!(batch.mask.iter().all(|&m| m == 0.0));
    let mut acts = match kept {
        Some(acts) => acts,
        None => forward(layout, w, ad, rope, batch, pool, false, keep),
    };
    acts.given = Some(pool.copy(dh));
    backward(layout, w, ad, rope, batch, &acts, &mut g, pool);
    acts.recycle(pool);
}

/// The summed `mask · nll` over the rows of `logits` (`[M, V]`: batch rows `rows`, or all),
/// which it overwrites with d loss / d logits: `(softmax − onehot) · mask / n_loss`.
#[inline(always)]
fn cross_entropy(logits: &mut [f32], rows: Option<&[usize]>, batch: &BatchRef, n_loss: f32, v: usize) -> f64 {
    let mut loss = 0.0f64;
    for (j, row) in logits.chunks_exact_mut(v).enumerate() {
        let i = rows.map_or(j, |r| r[j]);
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
    loss
}

/// Every parameter's gradient into `g`, from the activations of [`forward`] whose logits
/// [`cross_entropy`] has turned into d loss / d logits: [`forward`]'s sections in reverse. Each
/// region of `g` (the norm with the head, each layer, the embedding) is committed when done.
///
/// With adapters (`ad`), the base is frozen: `g` is the adapters' gradient buffer (its regions
/// cut as the base's, `adapters.rs`), and the base's weight gradients are not computed.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward(layout: &Layout, w: Weights, ad: Option<Adapt>, rope: &Rope, batch: &BatchRef, acts: &Acts, g: &mut Grads, pool: &mut Pool) {
    let dm = &layout.dims;
    let sz = Sizes::of(layout, batch);
    let Sizes { d, f, hd, q, qkv, b, t, n, scale, .. } = sz;
    let kv = dm.kv();
    let frozen = ad.is_some();
    let mut dx = head_backward(layout, w, frozen, acts, g, &sz, pool); // [N, D] gradient of the residual stream

    let mut da = pool.any(n * f);
    let mut dgu = pool.any(n * 2 * f);
    let mut dhn = pool.any(n * d);
    let mut dy = pool.any(n * q);
    let mut dqkv = pool.any(n * qkv);
    let mut dp = pool.any(t * t);
    // The norms' weight gradients when the base is frozen: computed (the same loop gives the
    // input's gradient) and dropped.
    let mut dnorm = pool.any(if frozen { d } else { 0 });
    // Recomputed per layer: the normed inputs, sigmoid(gate) and silu(gate)·up (and, under
    // gradient checkpointing, the whole layer).
    let mut sc = Scratch::new(pool, &sz, ad);
    let mut dec = Vec::new(); // a bf16 base's layer, decoded
    for (l, (at, la)) in layout.layers.iter().zip(acts.layers.iter()).enumerate().rev() {
        // The layer's weights (`wa`: where they sit in `w`); `at` places its gradients.
        let (w, wa) = w.layer(layout, l, &mut dec);
        let recomputed = la.saved.is_none().then(|| {
            layer(layout, l, &wa, w, ad, rope, batch, &la.x, &mut sc, pool, false).0
        });
        let Some(sv) = la.saved.as_ref().or(recomputed.as_ref()) else { unreachable!("a layer's values are kept or recomputed") };
        let Scratch { hn, p, sig, a, ad: asc } = &mut sc;
        let o = g.start(l + 1); // where the layer's region starts in the flat buffer
        let mut gl = g.open(l + 1, pool);
        // MLP: x3 = x2 + a·Wd, a = silu(g)·u, [g u] = hn2·Wgu, hn2 = norm(x2).
        swiglu_rows(&sv.gu, f, sig, a);
        if !frozen {
            mm(f, d, n, &mut gl[at.wd - o..], d, true, 1.0, rm(a, f).t(), rm(&dx, d)); // dWd [F, D] += a^T·dx
        }
        mm(n, f, d, &mut da, f, false, 1.0, rm(&dx, d), rm(&w[wa.wd..], d).t()); // da [N, F] = dx·Wd^T
        if let Some(ad) = ad {
            ad.backward(l, DOWN, n, a, &dx, d, &mut da, &mut gl, o, asc);
        }
        for i in 0..n {
            let (gg, uu) = sv.gu[i * 2 * f..(i + 1) * 2 * f].split_at(f);
            let (dg, du) = dgu[i * 2 * f..(i + 1) * 2 * f].split_at_mut(f);
            swiglu_backward(gg, uu, &sig[i * f..(i + 1) * f], &da[i * f..(i + 1) * f], dg, du);
        }
        rms_apply(&sv.x2, &sv.r2, &w[wa.ln2..wa.ln2 + d], d, hn); // hn2
        if !frozen {
            mm(d, 2 * f, n, &mut gl[at.wgu - o..], 2 * f, true, 1.0, rm(hn, d).t(), rm(&dgu, 2 * f)); // dWgu [D, 2F]
        }
        mm(n, d, 2 * f, &mut dhn, d, false, 1.0, rm(&dgu, 2 * f), rm(&w[wa.wgu..], 2 * f).t()); // dhn2 [N, D]
        if let Some(ad) = ad {
            ad.backward(l, GATE, n, hn, &dgu, 2 * f, &mut dhn, &mut gl, o, asc);
            ad.backward(l, UP, n, hn, &dgu[f..], 2 * f, &mut dhn, &mut gl, o, asc);
        }
        // dx now holds d/dx2 (the residual path); the norm adds its share.
        let dln2 = if frozen { &mut dnorm[..] } else { &mut gl[at.ln2 - o..at.ln2 - o + d] };
        rms_norm_backward(&dhn, &sv.x2, &sv.r2, &w[wa.ln2..wa.ln2 + d], d, &mut dx, dln2);

        // Attention: x2 = x + y·Wo.
        if !frozen {
            mm(q, d, n, &mut gl[at.wo - o..], d, true, 1.0, rm(&sv.y, q).t(), rm(&dx, d)); // dWo [Q, D] += y^T·dx2
        }
        mm(n, q, d, &mut dy, q, false, 1.0, rm(&dx, d), rm(&w[wa.wo..], d).t()); // dy [N, Q]
        if let Some(ad) = ad {
            ad.backward(l, O, n, &sv.y, &dx, d, &mut dy, &mut gl, o, asc);
        }
        dqkv.iter_mut().for_each(|x| *x = 0.0);
        attention_backward(dm, &sv.qkv, &dy, &mut dqkv, p, &mut dp, b, t, batch.starts, scale);
        rope_rows(&mut dqkv, qkv, dm.heads + dm.kv_heads, hd, t, batch.starts, rope, true);
        rms_apply(&la.x, &sv.r1, &w[wa.ln1..wa.ln1 + d], d, hn); // hn1
        if !frozen {
            mm(d, qkv, n, &mut gl[at.wqkv - o..], qkv, true, 1.0, rm(hn, d).t(), rm(&dqkv, qkv)); // dWqkv [D, Q+2KV]
        }
        mm(n, d, qkv, &mut dhn, d, false, 1.0, rm(&dqkv, qkv), rm(&w[wa.wqkv..], qkv).t()); // dhn1 [N, D]
        if let Some(ad) = ad {
            for (m, col) in [(Q, 0), (K, q), (V, q + kv)] {
                ad.backward(l, m, n, hn, &dqkv[col..], qkv, &mut dhn, &mut gl, o, asc);
            }
        }
        let dln1 = if frozen { &mut dnorm[..] } else { &mut gl[..d] };
        rms_norm_backward(&dhn, &la.x, &sv.r1, &w[wa.ln1..wa.ln1 + d], d, &mut dx, dln1);
        drop(gl);
        g.commit(l + 1, pool);
        if let Some(r) = recomputed {
            r.recycle(pool);
        }
    }
    sc.recycle(pool);
    // Embedding: dE[token_i] += dx[i].
    if !frozen {
        let e0 = layout.embed - g.start(0);
        let mut ge = g.open(0, pool);
        for (i, &tok) in batch.inputs.iter().enumerate() {
            let e = e0 + tok as usize * d;
            add_into(&mut ge[e..e + d], &dx[i * d..(i + 1) * d]);
        }
        drop(ge);
        g.commit(0, pool);
    }
    pool.put([dx, da, dgu, dhn, dy, dqkv, dp, dnorm]);
}

/// The output head (or tied embedding) and the final norm, backward: their weight gradients
/// (unless `frozen`) and the residual stream's gradient `[N, D]`, which it returns. With `rows`,
/// the head's input and output are those rows only, and the others get no gradient from it.
#[inline(always)]
fn head_backward(layout: &Layout, w: Weights, frozen: bool, acts: &Acts, g: &mut Grads, sz: &Sizes, pool: &mut Pool) -> Vec<f32> {
    let Sizes { d, v, n, .. } = *sz;
    let dl = &acts.logits; // [M, V]
    let (embed, tail) = (0, layout.layers.len() + 1); // regions: embedding, layers 1..=L, norm + head
    let (m, h_in) = match &acts.rows {
        Some(r) => (r.len(), &acts.hsel),
        None => (n, &acts.hf),
    };
    let mut dsel = pool.any(m * d); // [M, D]
    let mut dec = Vec::new();
    if m > 0 && w.chunked() {
        // A half-type (frozen) head: dl·E a vocabulary chunk at a time.
        for (c0, c1) in Weights::head_chunks(v) {
            let chunk = w.head_chunk(layout, c0, c1, &mut dec); // [C, D]
            mm(m, d, c1 - c0, &mut dsel, d, c0 > 0, 1.0, rm(&dl[c0..], v), rm(chunk, d)); // [M, D] += dl[:, C]·chunk
        }
    } else if let (true, Weights::F32(w)) = (m > 0, w) {
        match layout.head {
            Some(h) => {
                if !frozen {
                    let mut gt = g.open(tail, pool);
                    mm(d, v, m, &mut gt[h - layout.norm..], v, true, 1.0, rm(h_in, d).t(), rm(dl, v)); // dHead [D, V] += h^T·dl
                }
                mm(m, d, v, &mut dsel, d, false, 1.0, rm(dl, v), rm(&w[h..], v).t()); // [M, D] = dl·Head^T
            }
            None => {
                if !frozen {
                    let e0 = layout.embed - g.start(embed);
                    let mut ge = g.open(embed, pool);
                    mm(v, d, m, &mut ge[e0..], d, true, 1.0, rm(dl, v).t(), rm(h_in, d)); // dE [V, D] += dl^T·h
                }
                mm(m, d, v, &mut dsel, d, false, 1.0, rm(dl, v), rm(&w[layout.embed..], d)); // [M, D] = dl·E
            }
        }
    }
    let mut dh = match &acts.rows {
        None => dsel,
        Some(r) => {
            let mut dh = pool.zeros(n * d); // [N, D]
            for (j, &i) in r.iter().enumerate() {
                dh[i * d..(i + 1) * d].copy_from_slice(&dsel[j * d..(j + 1) * d]);
            }
            pool.put([dsel]);
            dh
        }
    };
    if let Some(given) = &acts.given {
        add_into(&mut dh, given); // [N, D]
    }
    let mut dx = pool.zeros(n * d); // [N, D]
    let norm = w.span(layout.norm, d, &mut dec);
    if frozen {
        let mut dw = pool.any(d);
        rms_norm_backward(&dh, &acts.xf, &acts.rf, norm, d, &mut dx, &mut dw);
        pool.put([dw]);
    } else {
        let mut gt = g.open(tail, pool);
        rms_norm_backward(&dh, &acts.xf, &acts.rf, norm, d, &mut dx, &mut gt[..d]);
        drop(gt);
        g.commit(tail, pool);
    }
    pool.put([dh]);
    dx
}
