//! Inference on the flat weights with a KV cache: one step runs any mix of prompts (many tokens
//! each) and running generations (one token each) through the model together, so a batch of
//! generations reads each weight matrix once a step (every token of the step is a row of the
//! same matmul) and a finished sequence's place goes to the next prompt at once (continuous
//! batching, in `generate::generate_batch`).
//!
//! The maths is `model.rs`'s forward pass, each position at its sequence's own offset: RoPE at
//! `cached + j`, and attention over the cached keys plus the step's earlier ones.
//!
//! Shapes: N = tokens of the step, R = entries (sequences) of the step, L = a sequence's
//! positions after the step, D = hidden, H = heads, K = kv heads, Hd = head dim, Q = H·Hd,
//! KV = K·Hd, F = SwiGLU hidden, V = vocabulary.

use rayon::prelude::*;

use super::model::Rope;
use super::ops::*;
use super::pool::Pool;
use super::Kernels;

/// One sequence's keys (after RoPE) and values, per layer `[L, KV]` each.
#[derive(Debug, Clone, Default)]
pub struct KvRow {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvRow {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets every position (the buffers are kept for the next sequence).
    pub fn clear(&mut self) {
        self.k.iter_mut().chain(self.v.iter_mut()).for_each(Vec::clear);
        self.len = 0;
    }
}

impl Kernels {
    /// Runs each entry `(row, tokens)` of `feed` through the model after the positions
    /// `caches[row]` already holds, appending the tokens' keys and values there. Returns the
    /// logits of each entry's last token, `[R, V]` in `feed`'s order. Rows must be distinct and
    /// every entry non-empty; positions must stay within the RoPE tables (the model's context).
    pub fn decode(&self, w: &[f32], caches: &mut [KvRow], feed: &[(usize, &[u32])]) -> Vec<f32> {
        let layout = &self.layout;
        let dm = &layout.dims;
        let (d, f, hd, v, q, kv, qkv) = (dm.d, dm.ffn, dm.head_dim, dm.vocab, dm.q(), dm.kv(), dm.qkv());
        let th = self.threads;
        assert_eq!(w.len(), layout.len);
        let mut seen = vec![false; caches.len()];
        for &(r, toks) in feed {
            assert!(r < caches.len() && !std::mem::replace(&mut seen[r], true), "decode: row {r} missing or repeated");
            assert!(!toks.is_empty(), "decode: an entry without tokens");
            assert!((caches[r].len + toks.len()) * hd <= self.cos.len(), "decode: positions beyond the context");
            assert!(toks.iter().all(|&t| (t as usize) < v), "decode: a token id outside the vocabulary of {v}");
            let c = &mut caches[r];
            if c.k.len() != dm.layers {
                (c.k, c.v) = (vec![Vec::new(); dm.layers], vec![Vec::new(); dm.layers]);
            }
        }
        // Where each entry's tokens start among the step's N rows.
        let offs: Vec<usize> = feed.iter().scan(0, |n, e| Some(std::mem::replace(n, *n + e.1.len()))).collect();
        let n: usize = feed.iter().map(|e| e.1.len()).sum();
        let rope = Rope { cos: &self.cos, sin: &self.sin };
        let scale = 1.0 / (hd as f32).sqrt();
        let group = dm.heads / dm.kv_heads;
        let mut pool = Pool::default();

        let mut x = vec![0.0f32; n * d]; // [N, D]
        for (i, &tok) in feed.iter().flat_map(|e| e.1).enumerate() {
            let e = layout.embed + tok as usize * d;
            x[i * d..(i + 1) * d].copy_from_slice(&w[e..e + d]);
        }
        let (mut hn, mut qkv_b, mut y) = (vec![0.0f32; n * d], vec![0.0f32; n * qkv], vec![0.0f32; n * q]);
        let (mut gu, mut sig, mut a) = (vec![0.0f32; n * 2 * f], vec![0.0f32; n * f], vec![0.0f32; n * f]);
        for (li, at) in layout.layers.iter().enumerate() {
            let r = rms_norm(&x, &w[at.ln1..at.ln1 + d], dm.eps, d, &mut hn, &mut pool);
            pool.put([r]);
            mm_on(th, n, qkv, d, &mut qkv_b, qkv, false, 1.0, rm(&hn, d), rm(&w[at.wqkv..], qkv)); // [N, Q+2KV]
            for (e, &(row, toks)) in feed.iter().enumerate() {
                let c = &mut caches[row];
                for j in 0..toks.len() {
                    let t = &mut qkv_b[(offs[e] + j) * qkv..(offs[e] + j + 1) * qkv];
                    rope_row(t, dm.heads + dm.kv_heads, hd, c.len + j, &rope, false);
                    c.k[li].extend_from_slice(&t[q..q + kv]); // [L, KV]
                    c.v[li].extend_from_slice(&t[q + kv..]); // [L, KV]
                }
            }
            // Attention, entries in parallel: each writes its own rows of y.
            let mut parts: Vec<&mut [f32]> = Vec::with_capacity(feed.len());
            let mut rest = y.as_mut_slice();
            for &(_, toks) in feed {
                let (head, tail) = rest.split_at_mut(toks.len() * q);
                parts.push(head);
                rest = tail;
            }
            let (caches_r, qkv_r) = (&*caches, &qkv_b);
            parts.into_par_iter().zip(feed.par_iter().zip(offs.par_iter())).for_each(|(ys, (&(row, toks), &off))| {
                let c = &caches_r[row];
                let (m, l) = (toks.len(), c.len + toks.len());
                let (ks, vs) = (&c.k[li], &c.v[li]);
                let mut s = vec![0.0f32; m * l]; // [M, L] scores, then probabilities
                if m == 1 {
                    // One new token (decoding): dot products, cheaper than a matmul call per head.
                    for h in 0..dm.heads {
                        let kh = h / group;
                        let qh = &qkv_r[off * qkv + h * hd..][..hd];
                        for (j, sj) in s.iter_mut().enumerate() {
                            *sj = dot(qh, &ks[j * kv + kh * hd..][..hd]) * scale;
                        }
                        let mx = max(&s);
                        s.iter_mut().for_each(|x| *x = exp(*x - mx));
                        let inv = 1.0 / sum(&s);
                        let yh = &mut ys[h * hd..(h + 1) * hd];
                        yh.fill(0.0);
                        for (j, &pj) in s.iter().enumerate() {
                            let (pj, vj) = (pj * inv, &vs[j * kv + kh * hd..][..hd]);
                            yh.iter_mut().zip(vj).for_each(|(o, &v)| *o += pj * v);
                        }
                    }
                    return;
                }
                for h in 0..dm.heads {
                    let kh = h / group;
                    mm(m, l, hd, &mut s, l, false, scale, rm(&qkv_r[off * qkv + h * hd..], qkv), rm(&ks[kh * hd..], kv).t());
                    for j in 0..m {
                        // Query j (position c.len + j) sees keys 0..=c.len + j.
                        let (seen, future) = s[j * l..(j + 1) * l].split_at_mut(c.len + j + 1);
                        let mx = max(seen);
                        seen.iter_mut().for_each(|x| *x = exp(*x - mx));
                        let inv = 1.0 / sum(seen);
                        seen.iter_mut().for_each(|x| *x *= inv);
                        future.iter_mut().for_each(|x| *x = 0.0);
                    }
                    mm(m, hd, l, &mut ys[h * hd..], q, false, 1.0, rm(&s, l), rm(&vs[kh * hd..], kv)); // [M, Hd] of [M, Q]
                }
            });
            mm_on(th, n, d, q, &mut x, d, true, 1.0, rm(&y, q), rm(&w[at.wo..], d)); // x += y·Wo
            let r = rms_norm(&x, &w[at.ln2..at.ln2 + d], dm.eps, d, &mut hn, &mut pool);
            pool.put([r]);
            mm_on(th, n, 2 * f, d, &mut gu, 2 * f, false, 1.0, rm(&hn, d), rm(&w[at.wgu..], 2 * f)); // [N, 2F]
            for i in 0..n {
                let (g, u) = gu[i * 2 * f..(i + 1) * 2 * f].split_at(f);
                swiglu(g, u, &mut sig[i * f..(i + 1) * f], &mut a[i * f..(i + 1) * f]);
            }
            mm_on(th, n, d, f, &mut x, d, true, 1.0, rm(&a, f), rm(&w[at.wd..], d)); // x += a·Wd
        }
        for &(row, toks) in feed {
            caches[row].len += toks.len();
        }
        // The head, on each entry's last position only.
        let rows = feed.len();
        let mut last = vec![0.0f32; rows * d]; // [R, D]
        for (e, &(_, toks)) in feed.iter().enumerate() {
            let i = offs[e] + toks.len() - 1;
            last[e * d..(e + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
        }
        let mut hl = vec![0.0f32; rows * d];
        let r = rms_norm(&last, &w[layout.norm..layout.norm + d], dm.eps, d, &mut hl, &mut pool);
        pool.put([r]);
        let mut logits = vec![0.0f32; rows * v]; // [R, V]
        match layout.head {
            Some(hw) => mm_on(th, rows, v, d, &mut logits, v, false, 1.0, rm(&hl, d), rm(&w[hw..], v)),
            None => mm_on(th, rows, v, d, &mut logits, v, false, 1.0, rm(&hl, d), rm(&w[layout.embed..], d).t()),
        }
        logits
    }
}
