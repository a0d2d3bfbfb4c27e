//! The model's maths on one thread's sequences: [`forward`] (activations kept for the backward
//! pass), [`cross_entropy`] (the loss, and its gradient in place of the logits), and [`backward`]
//! (every parameter's gradient), mirror images section by section, as llm.c's `gpt2_forward`
//! and `gpt2_backward`.
//!
//! Shapes: N = rows (sequences × T) of one thread, T = context, D = hidden, H = heads,
//! K = kv heads, Hd = head dim, Q = H·Hd, KV = K·Hd, F = SwiGLU hidden, V = vocabulary.

use super::layout::Layout;
use super::ops::*;
use super::pool::Pool;
use super::BatchRef;

/// RoPE tables, `[T, Hd]` each (the half-split convention of `llama.rs`).
pub(super) struct Rope<'a> {
    pub(super) cos: &'a [f32],
    pub(super) sin: &'a [f32],
}

/// What the backward pass keeps from one layer's forward pass. What is cheap to compute again
/// is not kept: the normed inputs (from x and 1/rms), sigmoid(gate) and silu(gate)·up (from the
/// projections), and the attention probabilities (`[B, H, T, T]`, from q and k). The backward
/// pass recomputes them with the same operations, so the gradients are the same, bit for bit.
struct LayerActs {
    x: Vec<f32>,   // [N, D] layer input
    r1: Vec<f32>,  // [N] 1 / rms of x
    qkv: Vec<f32>, // [N, Q + 2KV] after RoPE
    y: Vec<f32>,   // [N, Q] attention output
    x2: Vec<f32>,  // [N, D] residual after attention
    r2: Vec<f32>,  // [N]
    gu: Vec<f32>,  // [N, 2F] gate and up projections
}

pub(super) struct Acts {
    layers: Vec<LayerActs>,
    xf: Vec<f32>,     // [N, D] final residual
    rf: Vec<f32>,     // [N]
    hf: Vec<f32>,     // [N, D] final normed
    /// The rows the head ran on, where not all: those whose target carries loss (SFT, where
    /// the prompt's rows carry none and the head is a fifth of the model's FLOPs).
    rows: Option<Vec<usize>>,
    hsel: Vec<f32>,   // [M, D] those rows of hf
    pub(super) logits: Vec<f32>, // [M, V] (M = N without `rows`)
}

impl Acts {
    pub(super) fn recycle(self, pool: &mut Pool) {
        for l in self.layers {
            pool.put([l.x, l.r1, l.qkv, l.y, l.x2, l.r2, l.gu]);
        }
        pool.put([self.xf, self.rf, self.hf, self.hsel, self.logits]);
    }
}

/// The sizes both passes index by (the names of the shapes in the comments).
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
/// them when pretraining).
pub(super) fn forward(layout: &Layout, w: &[f32], rope: &Rope, batch: &BatchRef, pool: &mut Pool, all_logits: bool) -> Acts {
    let dm = &layout.dims;
    let Sizes { d, f, hd, v, q, qkv, b, t, n, scale } = Sizes::of(layout, batch);

    // Embedding lookup: x[i] = E[token_i].
    let mut x = pool.any(n * d); // [N, D]
    for (i, &tok) in batch.inputs.iter().enumerate() {
        let e = layout.embed + tok as usize * d;
        x[i * d..(i + 1) * d].copy_from_slice(&w[e..e + d]);
    }
    let mut layers = Vec::with_capacity(dm.layers);
    // Scratch, not kept: the normed inputs, the attention probabilities of one head, the SwiGLU.
    let (mut hn, mut p) = (pool.any(n * d), pool.any(t * t)); // [N, D], [T, T]
    let (mut sig, mut a) = (pool.any(n * f), pool.any(n * f)); // [N, F] each
    for at in &layout.layers {
        let r1 = rms_norm(&x, &w[at.ln1..at.ln1 + d], dm.eps, d, &mut hn, pool); // [N, D]
        let mut qkv_b = pool.any(n * qkv);
        mm(n, qkv, d, &mut qkv_b, qkv, false, 1.0, rm(&hn, d), rm(&w[at.wqkv..], qkv)); // [N, Q+2KV]
        rope_rows(&mut qkv_b, qkv, dm.heads + dm.kv_heads, hd, t, batch.starts, rope, false);
        let mut y = pool.any(n * q);
        attention_forward(dm, &qkv_b, &mut p, &mut y, b, t, batch.starts, scale);
        let mut x2 = pool.copy(&x);
        mm(n, d, q, &mut x2, d, true, 1.0, rm(&y, q), rm(&w[at.wo..], d)); // [N, D] = x + y·Wo
        let r2 = rms_norm(&x2, &w[at.ln2..at.ln2 + d], dm.eps, d, &mut hn, pool);
        let mut gu = pool.any(n * 2 * f);
        mm(n, 2 * f, d, &mut gu, 2 * f, false, 1.0, rm(&hn, d), rm(&w[at.wgu..], 2 * f)); // [N, 2F]
        swiglu_rows(&gu, f, &mut sig, &mut a);
        let mut x3 = pool.copy(&x2);
        mm(n, d, f, &mut x3, d, true, 1.0, rm(&a, f), rm(&w[at.wd..], d)); // [N, D] = x2 + a·Wd
        layers.push(LayerActs { x, r1, qkv: qkv_b, y, x2, r2, gu });
        x = x3;
    }
    pool.put([hn, p, sig, a]);
    let mut hf = pool.any(n * d);
    let rf = rms_norm(&x, &w[layout.norm..layout.norm + d], dm.eps, d, &mut hf, pool);
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
    if m > 0 {
        match layout.head {
            Some(h) => mm(m, v, d, &mut logits, v, false, 1.0, rm(h_in, d), rm(&w[h..], v)), // [M, V]
            None => mm(m, v, d, &mut logits, v, false, 1.0, rm(h_in, d), rm(&w[layout.embed..], d).t()), // [M, V]
        }
    }
    Acts { layers, xf: x, rf, hf, rows, hsel, logits }
}

/// Forward, loss and (optionally) backward for one thread's sequences. Returns the sum of
/// `mask · nll` over its rows and the seconds spent up to the loss; gradients are of the mean
/// over all `n_loss` masked tokens.
#[allow(clippy::too_many_arguments)]
pub(super) fn shard(layout: &Layout, w: &[f32], rope: &Rope, batch: &BatchRef, n_loss: f32, grads: Option<&mut [f32]>, pool: &mut Pool, wide: bool) -> (f64, f64) {
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
    let mut acts = forward(layout, w, rope, batch, pool, false);
    let loss = cross_entropy(&mut acts.logits, acts.rows.as_deref(), batch, n_loss, layout.dims.vocab);
    let forward_s = t0.elapsed().as_secs_f64();
    if let Some(g) = grads {
        backward(layout, w, rope, batch, &acts, g, pool);
    }
    acts.recycle(pool);
    (loss, forward_s)
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
/// [`cross_entropy`] has turned into d loss / d logits: [`forward`]'s sections in reverse.
#[inline(always)]
fn backward(layout: &Layout, w: &[f32], rope: &Rope, batch: &BatchRef, acts: &Acts, g: &mut [f32], pool: &mut Pool) {
    let dm = &layout.dims;
    let Sizes { d, f, hd, v, q, qkv, b, t, n, scale } = Sizes::of(layout, batch);
    let dl = &acts.logits; // [M, V]

    // Output head (or tied embedding) and the final norm; with `rows`, the head's input and
    // output are those rows only, and the others get no gradient from it.
    let (m, h_in) = match &acts.rows {
        Some(r) => (r.len(), &acts.hsel),
        None => (n, &acts.hf),
    };
    let mut dsel = pool.any(m * d); // [M, D]
    if m > 0 {
        match layout.head {
            Some(h) => {
                mm(d, v, m, &mut g[h..], v, true, 1.0, rm(h_in, d).t(), rm(dl, v)); // dHead [D, V] += h^T·dl
                mm(m, d, v, &mut dsel, d, false, 1.0, rm(dl, v), rm(&w[h..], v).t()); // [M, D] = dl·Head^T
            }
            None => {
                mm(v, d, m, &mut g[layout.embed..], d, true, 1.0, rm(dl, v).t(), rm(h_in, d)); // dE [V, D] += dl^T·h
                mm(m, d, v, &mut dsel, d, false, 1.0, rm(dl, v), rm(&w[layout.embed..], d)); // [M, D] = dl·E
            }
        }
    }
    let dh = match &acts.rows {
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
    let mut dx = pool.zeros(n * d); // [N, D] gradient of the residual stream
    rms_norm_backward(&dh, &acts.xf, &acts.rf, &w[layout.norm..layout.norm + d], d, &mut dx, &mut g[layout.norm..layout.norm + d]);

    let mut da = pool.any(n * f);
    let mut dgu = pool.any(n * 2 * f);
    let mut dhn = pool.any(n * d);
    let mut dy = pool.any(n * q);
    let mut dqkv = pool.any(n * qkv);
    let (mut p, mut dp) = (pool.any(t * t), pool.any(t * t));
    // Recomputed per layer: the normed inputs, sigmoid(gate) and silu(gate)·up.
    let (mut hn, mut sig, mut a) = (pool.any(n * d), pool.any(n * f), pool.any(n * f));
    for (at, la) in layout.layers.iter().zip(acts.layers.iter()).rev() {
        // MLP: x3 = x2 + a·Wd, a = silu(g)·u, [g u] = hn2·Wgu, hn2 = norm(x2).
        swiglu_rows(&la.gu, f, &mut sig, &mut a);
        mm(f, d, n, &mut g[at.wd..], d, true, 1.0, rm(&a, f).t(), rm(&dx, d)); // dWd [F, D] += a^T·dx
        mm(n, f, d, &mut da, f, false, 1.0, rm(&dx, d), rm(&w[at.wd..], d).t()); // da [N, F] = dx·Wd^T
        for i in 0..n {
            let (gg, uu) = la.gu[i * 2 * f..(i + 1) * 2 * f].split_at(f);
            let (dg, du) = dgu[i * 2 * f..(i + 1) * 2 * f].split_at_mut(f);
            swiglu_backward(gg, uu, &sig[i * f..(i + 1) * f], &da[i * f..(i + 1) * f], dg, du);
        }
        rms_apply(&la.x2, &la.r2, &w[at.ln2..at.ln2 + d], d, &mut hn); // hn2
        mm(d, 2 * f, n, &mut g[at.wgu..], 2 * f, true, 1.0, rm(&hn, d).t(), rm(&dgu, 2 * f)); // dWgu [D, 2F]
        mm(n, d, 2 * f, &mut dhn, d, false, 1.0, rm(&dgu, 2 * f), rm(&w[at.wgu..], 2 * f).t()); // dhn2 [N, D]
        // dx now holds d/dx2 (the residual path); the norm adds its share.
        rms_norm_backward(&dhn, &la.x2, &la.r2, &w[at.ln2..at.ln2 + d], d, &mut dx, &mut g[at.ln2..at.ln2 + d]);

        // Attention: x2 = x + y·Wo.
        mm(q, d, n, &mut g[at.wo..], d, true, 1.0, rm(&la.y, q).t(), rm(&dx, d)); // dWo [Q, D] += y^T·dx2
        mm(n, q, d, &mut dy, q, false, 1.0, rm(&dx, d), rm(&w[at.wo..], d).t()); // dy [N, Q]
        dqkv.iter_mut().for_each(|x| *x = 0.0);
        attention_backward(dm, &la.qkv, &dy, &mut dqkv, &mut p, &mut dp, b, t, batch.starts, scale);
        rope_rows(&mut dqkv, qkv, dm.heads + dm.kv_heads, hd, t, batch.starts, rope, true);
        rms_apply(&la.x, &la.r1, &w[at.ln1..at.ln1 + d], d, &mut hn); // hn1
        mm(d, qkv, n, &mut g[at.wqkv..], qkv, true, 1.0, rm(&hn, d).t(), rm(&dqkv, qkv)); // dWqkv [D, Q+2KV]
        mm(n, d, qkv, &mut dhn, d, false, 1.0, rm(&dqkv, qkv), rm(&w[at.wqkv..], qkv).t()); // dhn1 [N, D]
        rms_norm_backward(&dhn, &la.x, &la.r1, &w[at.ln1..at.ln1 + d], d, &mut dx, &mut g[at.ln1..at.ln1 + d]);
    }
    pool.put([p, hn, sig, a]);
    // Embedding: dE[token_i] += dx[i].
    for (i, &tok) in batch.inputs.iter().enumerate() {
        let e = layout.embed + tok as usize * d;
        add_into(&mut g[e..e + d], &dx[i * d..(i + 1) * d]);
    }
    pool.put([dh, dx, da, dgu, dhn, dy, dqkv, dp]);
}
