//! The primitives: attention, RoPE, RMSNorm, SwiGLU (each with its backward), reductions in a
//! fixed order, a vectorisable `exp`, and the strided matmul over `gemm`. All `inline(always)`,
//! so that the AVX-512 build of [`super::model`] compiles them again with its features.
//!
//! Shapes: N = rows, T = context, D = hidden, H = heads, Hd = head dim, Q = H·Hd, KV = K·Hd.

use super::layout::Dims;
use super::model::Rope;
use super::pool::Pool;

/// Causal attention for every sequence and head: `P = softmax(Q·K^T·scale)`, `Y = P·V`.
///
/// With `starts` (packed rows), query `i` sees keys `starts[i]..=i` only: the probabilities of
/// earlier keys are 0, so the backward pass, which multiplies by them, needs no mask of its own.
/// `p` is `[T, T]` scratch: the probabilities are not kept, [`attention_backward`] computes them
/// again (the same operations, so the same values), which saves `[B, H, T, T]` floats per layer
/// for a few percent more arithmetic.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn attention_forward(dm: &Dims, qkv: &[f32], p: &mut [f32], y: &mut [f32], b: usize, t: usize, starts: Option<&[u32]>, scale: f32) {
    let (hd, q, ld) = (dm.head_dim, dm.q(), dm.qkv());
    for at in heads(dm, b, t) {
        let ps = &mut p[..t * t]; // [T, T]
        probs(hd, ld, &qkv[at.q..], &qkv[at.k..], ps, t, starts.map(|s| &s[at.s * t..(at.s + 1) * t]), scale);
        let vs = &qkv[at.v..];
        for (r0, r1) in causal_blocks(t) {
            mm(r1 - r0, hd, r1, &mut y[(at.s * t + r0) * q + at.h * hd..], q, false, 1.0, rm(&ps[r0 * t..], t), rm(vs, ld)); // Y = P·V
        }
    }
}

/// One head's causal attention probabilities, `[T, T]` into `ps`, from its q and k columns
/// (`[T, Hd]` each, row stride `ld`); with `starts` (this sequence's), query `i` sees keys
/// `starts[i]..=i`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn probs(hd: usize, ld: usize, qs: &[f32], ks: &[f32], ps: &mut [f32], t: usize, starts: Option<&[u32]>, scale: f32) {
    for (r0, r1) in causal_blocks(t) {
        // Scores of query rows r0..r1 against the keys they may see, 0..r1.
        mm(r1 - r0, r1, hd, &mut ps[r0 * t..], t, false, scale, rm(&qs[r0 * ld..], ld), rm(ks, ld).t());
    }
    for i in 0..t {
        let first = starts.map_or(0, |s| s[i] as usize);
        let row = &mut ps[i * t..(i + 1) * t];
        let (seen, future) = row.split_at_mut(i + 1);
        let (other, seen) = seen.split_at_mut(first);
        let mx = max(seen);
        seen.iter_mut().for_each(|x| *x = exp(*x - mx));
        let inv = 1.0 / sum(seen);
        seen.iter_mut().for_each(|x| *x *= inv);
        other.iter_mut().for_each(|x| *x = 0.0);
        future.iter_mut().for_each(|x| *x = 0.0);
    }
}

/// One (sequence, head) of causal attention: where its q, k and v columns start in the packed
/// `[N, Q + 2KV]` matrix (k and v are those of the kv head its query head shares).
struct HeadAt {
    s: usize,
    h: usize,
    q: usize,
    k: usize,
    v: usize,
}

/// Every (sequence, head) of a batch of `b` sequences of `t` tokens.
#[inline(always)]
fn heads(dm: &Dims, b: usize, t: usize) -> impl Iterator<Item = HeadAt> {
    let (hd, q, kv, ld, heads) = (dm.head_dim, dm.q(), dm.kv(), dm.qkv(), dm.heads);
    let group = dm.heads / dm.kv_heads;
    (0..b).flat_map(move |s| {
        (0..heads).map(move |h| {
            let (rows, kh) = (s * t * ld, h / group);
            HeadAt { s, h, q: rows + h * hd, k: rows + q + kh * hd, v: rows + q + kv + kh * hd }
        })
    })
}

/// Gradients of [`attention_forward`] with respect to q, k and v, into `dqkv` (zeroed by the
/// caller; k and v accumulate over the query heads that share them). `p` and `dp` are `[T, T]`
/// scratch; each head's probabilities are computed again into `p`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn attention_backward(dm: &Dims, qkv: &[f32], dy: &[f32], dqkv: &mut [f32], p: &mut [f32], dp: &mut [f32], b: usize, t: usize, starts: Option<&[u32]>, scale: f32) {
    let (hd, q, ld) = (dm.head_dim, dm.q(), dm.qkv());
    for at in heads(dm, b, t) {
        let (qs, ks, vs) = (&qkv[at.q..], &qkv[at.k..], &qkv[at.v..]);
        probs(hd, ld, qs, ks, &mut p[..t * t], t, starts.map(|s| &s[at.s * t..(at.s + 1) * t]), scale);
        let ps = &p[..t * t];
        let dys = &dy[at.s * t * q + at.h * hd..]; // [T, Hd], row stride Q
        for (r0, r1) in causal_blocks(t) {
            let (m, drow) = (r1 - r0, &dys[r0 * q..]);
            mm(m, r1, hd, &mut dp[r0 * t..], t, false, 1.0, rm(drow, q), rm(vs, ld).t()); // dP = dY·V^T
            mm(r1, hd, m, &mut dqkv[at.v..], ld, true, 1.0, rm(&ps[r0 * t..], t).t(), rm(drow, q)); // dV += P^T·dY
            for i in r0..r1 {
                let pr = &ps[i * t..i * t + i + 1];
                let dr = &mut dp[i * t..(i + 1) * t];
                let pd = dot(pr, &dr[..=i]);
                for (x, &pv) in dr[..=i].iter_mut().zip(pr) {
                    *x = pv * (*x - pd) * scale;
                }
                dr[i + 1..].iter_mut().for_each(|x| *x = 0.0);
            }
            mm(m, hd, r1, &mut dqkv[at.q + r0 * ld..], ld, false, 1.0, rm(&dp[r0 * t..], t), rm(ks, ld)); // dQ = dS·K
            mm(r1, hd, m, &mut dqkv[at.k..], ld, true, 1.0, rm(&dp[r0 * t..], t).t(), rm(&qs[r0 * ld..], ld)); // dK += dS^T·Q
        }
    }
}

/// Query-row blocks `(r0, r1)` of causal attention: block rows see keys `0..r1` only, so the
/// matmuls skip most of the masked upper triangle (one block up to 64 positions).
pub(super) fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    const BLOCK: usize = 64;
    (0..t).step_by(BLOCK).map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

/// Rotates the first `heads` head-sized column blocks of every row (q then k heads) by the
/// position's angle (row `i` is position `i % t`, counted from `starts[i]` in a packed row);
/// `inverse` rotates back (the backward pass).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn rope_rows(x: &mut [f32], ld: usize, heads: usize, hd: usize, t: usize, starts: Option<&[u32]>, rope: &Rope, inverse: bool) {
    for (i, row) in x.chunks_exact_mut(ld).enumerate() {
        let pos = i % t - starts.map_or(0, |s| s[i] as usize);
        rope_row(row, heads, hd, pos, rope, inverse);
    }
}

/// [`rope_rows`] for one row at position `pos`.
#[inline(always)]
pub(super) fn rope_row(row: &mut [f32], heads: usize, hd: usize, pos: usize, rope: &Rope, inverse: bool) {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
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

/// `out = x / rms(x) · w` per row of `d`; returns `1 / rms` per row.
#[inline(always)]
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: usize, out: &mut [f32], pool: &mut Pool) -> Vec<f32> {
    let mut r = pool.any(x.len() / d);
    for (xr, ri) in x.chunks_exact(d).zip(r.iter_mut()) {
        *ri = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
    }
    rms_apply(x, &r, w, d, out);
    r
}

/// `out = x · r · w` per row of `d`, with `r` the `1 / rms` per row [`rms_norm`] returned: its
/// output again, bit for bit (the backward pass recomputes normed inputs instead of keeping them).
#[inline(always)]
pub(super) fn rms_apply(x: &[f32], r: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    for ((xr, or), &inv) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(r) {
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

/// Backward of [`rms_norm`]: adds d/dx into `dx` and d/dw into `dw`.
#[inline(always)]
pub(super) fn rms_norm_backward(dy: &[f32], x: &[f32], r: &[f32], w: &[f32], d: usize, dx: &mut [f32], dw: &mut [f32]) {
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
pub(super) fn swiglu(g: &[f32], u: &[f32], sig: &mut [f32], a: &mut [f32]) {
    for (((&gv, &uv), s), av) in g.iter().zip(u).zip(sig.iter_mut()).zip(a.iter_mut()) {
        *s = 1.0 / (1.0 + exp(-gv));
        *av = gv * *s * uv;
    }
}

/// [`swiglu`] on every row of `gu` (`[N, 2F]`: gate then up) into `sig` and `a` (`[N, F]`).
#[inline(always)]
pub(super) fn swiglu_rows(gu: &[f32], f: usize, sig: &mut [f32], a: &mut [f32]) {
    for ((row, s), av) in gu.chunks_exact(2 * f).zip(sig.chunks_exact_mut(f)).zip(a.chunks_exact_mut(f)) {
        let (g, u) = row.split_at(f);
        swiglu(g, u, s, av);
    }
}

#[inline(always)]
pub(super) fn swiglu_backward(g: &[f32], u: &[f32], sig: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let (gv, s) = (g[i], sig[i]);
        du[i] = da[i] * gv * s;
        dg[i] = da[i] * u[i] * s * (1.0 + gv * (1.0 - s));
    }
}

/// `Σ a·b`, in 8 independent partial sums so that the loop vectorises (a fixed order, so the
/// result is deterministic).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) fn sum(a: &[f32]) -> f32 {
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
pub(super) fn max(a: &[f32]) -> f32 {
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
pub(super) fn add_into(dst: &mut [f32], src: &[f32]) {
    for (a, &b) in dst.iter_mut().zip(src) {
        *a += b;
    }
}

/// `e^x` to about 2 ulp, branch-free so that loops over it vectorise (Cephes' `expf`).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
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
pub(super) struct View<'a> {
    s: &'a [f32],
    rs: usize,
    cs: usize,
}

/// Row-major view with `ld` columns per row.
pub(super) fn rm(s: &[f32], ld: usize) -> View<'_> {
    View { s, rs: ld, cs: 1 }
}

impl View<'_> {
    pub(super) fn t(self) -> Self {
        View { s: self.s, rs: self.cs, cs: self.rs }
    }
    fn check(&self, rows: usize, cols: usize) {
        assert!(rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.s.len(), "matrix view out of bounds");
    }
}

/// `dst[m, n] (row stride ld) = (acc ? dst : 0) + scale · a[m, k] · b[k, n]`, single-threaded.
#[allow(clippy::too_many_arguments)]
pub(super) fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], ld: usize, acc: bool, scale: f32, a: View, b: View) {
    mm_on(1, m, n, k, dst, ld, acc, scale, a, b)
}

/// [`mm`] on up to `threads` of rayon's threads (gemm splits the work; inference, where one
/// matmul has the whole batch).
#[allow(clippy::too_many_arguments)]
pub(super) fn mm_on(threads: usize, m: usize, n: usize, k: usize, dst: &mut [f32], ld: usize, acc: bool, scale: f32, a: View, b: View) {
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
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
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
