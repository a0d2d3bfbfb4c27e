//! Flash attention's two passes as tiled kernels (the op and its fallbacks:
//! `kiln_models::attention`): causal, scale `s = 1/√Hd`, for `q, k, v, o: [B, H, T, Hd]` in f32,
//! f16 or bf16, with f32 arithmetic in shared memory. No `[T, T]` tensor is ever written. Keys and
//! values may have fewer heads than queries (grouped-query attention, `k, v: [B, K, T, Hd]`, `K`
//! dividing `H`): query head `h` reads kv head `h / (H/K)` in place, and a dK/dV cube walks its kv
//! head's `H/K` query heads in turn, so dK and dV come out summed over the group.
//!
//! A cube of [`UNITS`] units takes a tile of `b` query rows (or, for dK and dV, `b` key rows) of
//! one batch-and-head, and walks the tiles of the other side in shared memory, skipping the
//! tiles the causal mask hides entirely:
//!
//! ```text
//! forward   (cube: query tile i)   for key tiles j ≤ i:
//!             S = s·Q_i K_jᵀ (masked)     m' = max(m, rowmax S)      P = exp(S − m')
//!             l = l·e^(m−m') + rowsum P   O = O·e^(m−m') + P V_j     m = m'
//!           O = O / l,   L = m + ln l                                 (L: [B, H, T], f32)
//! delta     D = rowsum(dO ∘ O)                                        (one unit a row)
//! dK, dV    (cube: key tile j)     for query tiles i ≥ j:
//!             P = exp(s·Q_i K_jᵀ − L_i) (masked)   dP = dO_i V_jᵀ   dS = P ∘ (dP − D_i) · s
//!             dV_j += Pᵀ dO_i                      dK_j += dSᵀ Q_i
//! dQ        (cube: query tile i)   for key tiles j ≤ i:   dQ_i += dS K_j   (dS as above)
//! ```
//!
//! dQ has a kernel of its own, recomputing `P` and `dS`, so that no two cubes add into one row
//! (no atomics, which wgpu lacks for floats; the result is deterministic).
//!
//! In a tile's row loops a cube's units split the `b × b` scores (`unit + k·UNITS`) and then the
//! rows' head dimensions (`upr = UNITS / b` units a row, dimension `sub + k·upr`). Shared rows are
//! padded by one float so that units reading different rows hit different banks. The tile size
//! `b` is the largest of 64, 32, 16 and 8 whose backward fits the device's shared memory
//! ([`tile`]); every `b` is the same code (the tests run several).
//!
//! Where the device has tensor cores for the tensors' type (f16, bf16) and the head dim is a
//! multiple of 16, [`forward`] and [`backward`] run `attention_mma.rs`'s kernels instead, the same
//! passes with the `T × T × Hd` products on tensor cores ([`set_tensor_cores`] turns that off).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{bf16, f16, DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime};
use cubecl::prelude::*;

use std::sync::atomic::{AtomicBool, Ordering};

use super::{attention_mma, elementwise_grid, empty_like};
use crate::fusion_op::{queue_typed, Cube, Gpu};

type B<R, BT> = Gpu<R, f32, i32, BT>;
type Inner<R, BT> = Cube<R, f32, i32, BT>;

/// Units of every attention cube.
pub const UNITS: usize = 256;

/// Shared memory (bytes) the largest kernel (dK, dV) holds for head dim `hd` and tile `b`: four
/// `[b, hd + 1]` tiles, two `[b, b + 1]` and two `[b]`.
pub fn shared_bytes(hd: usize, b: usize) -> usize {
    4 * (4 * b * (hd + 1) + 2 * b * (b + 1) + 2 * b)
}

/// The tile for head dim `hd` on a device with `smem` bytes of shared memory a cube: the largest
/// of 64, 32, 16, 8 that fits (at most 100 KiB, so that two cubes share a Hopper SM), else 8.
pub fn tile(hd: usize, smem: usize) -> usize {
    let budget = smem.min(100 * 1024);
    [64, 32, 16, 8].into_iter().find(|&b| shared_bytes(hd, b) <= budget).unwrap_or(8)
}

/// `tile[r·(hd+1) + j] = src[base + (first + r)·hd + j] · mul` for the tile's `rows` rows, 0 past
/// row `t`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile<F: Float>(src: &Array<F>, tile: &mut SharedMemory<f32>, base: usize, first: usize, t: usize, mul: f32, #[comptime] rows: usize, #[comptime] hd: usize) {
    let mut e = UNIT_POS_X as usize;
    while e < comptime!(rows * hd) {
        let r = e / hd;
        let j = e % hd;
        let pos = first + r;
        let mut val = 0.0f32;
        if pos < t {
            val = f32::cast_from(src[base + pos * hd + j]) * mul;
        }
        tile[r * comptime!(hd + 1) + j] = val;
        e += UNITS;
    }
}

/// `dst[r] = src[base + first + r]` for the tile's `b` rows (units 0..b), 0 past row `t`.
#[cube]
fn load_rows(src: &Array<f32>, dst: &mut SharedMemory<f32>, base: usize, first: usize, t: usize, #[comptime] b: usize) {
    let u = UNIT_POS_X as usize;
    if u < b {
        let mut val = 0.0f32;
        if first + u < t {
            val = src[base + first + u];
        }
        dst[u] = val;
    }
}

/// The key tiles query tile `qb` sees under the causal mask: those up to its last row below `t`.
#[cube]
pub(super) fn causal_tiles(qb: usize, t: usize, #[comptime] b: usize) -> usize {
    let mut end = (qb + 1) * b;
    if end > t {
        end = t;
    }
    (end + b - 1) / b
}

/// `P = exp(s·q_r·k_c − L_r)` and `dS = P·(dO_r·v_c − D_r)·s` for every entry `(r, c)` of a
/// query tile `qb` against key tile `kb` (0 where the key follows the query or the query is
/// past `t`), into `ps` (when `keep_p`) and `dss`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn grad_scores(
    qs: &SharedMemory<f32>,
    dos: &SharedMemory<f32>,
    ks: &SharedMemory<f32>,
    vs: &SharedMemory<f32>,
    ls: &SharedMemory<f32>,
    ds: &SharedMemory<f32>,
    ps: &mut SharedMemory<f32>,
    dss: &mut SharedMemory<f32>,
    qb: usize,
    kb: usize,
    t: usize,
    scale: f32,
    #[comptime] b: usize,
    #[comptime] hd: usize,
    #[comptime] keep_p: bool,
) {
    let hs = comptime!(hd + 1);
    let pstride = comptime!(b + 1);
    let mut e = UNIT_POS_X as usize;
    while e < comptime!(b * b) {
        let r = e / b;
        let c = e % b;
        let qpos = qb * b + r;
        let kpos = kb * b + c;
        let mut p = 0.0f32;
        let mut dsv = 0.0f32;
        if kpos <= qpos && qpos < t {
            let mut s = 0.0f32;
            let mut dp = 0.0f32;
            for j in 0..hd {
                s += qs[r * hs + j] * ks[c * hs + j];
                dp += dos[r * hs + j] * vs[c * hs + j];
            }
            p = f32::exp(s * scale - ls[r]);
            dsv = p * (dp - ds[r]) * scale;
        }
        if keep_p {
            ps[r * pstride + c] = p;
        }
        dss[r * pstride + c] = dsv;
        e += UNITS;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_kernel<F: Float>(q: &Array<F>, k: &Array<F>, v: &Array<F>, o: &mut Array<F>, lse: &mut Array<f32>, t: u32, group: u32, scale: f32, #[comptime] hd: usize, #[comptime] b: usize) {
    let t = t as usize;
    let qb = CUBE_POS_X as usize;
    let bh = CUBE_POS_Y as usize;
    let base = bh * t * hd;
    let kv_base = (bh / group as usize) * t * hd;
    let upr = comptime!(UNITS / b);
    let dpu = comptime!(hd.div_ceil(UNITS / b));
    let hs = comptime!(hd + 1);
    let pstride = comptime!(b + 1);
    let unit = UNIT_POS_X as usize;
    let r = unit / upr;
    let sub = unit % upr;
    let row = qb * b + r;
    let mut qs = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut ks = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut vs = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut ps = SharedMemory::<f32>::new(comptime!(b * (b + 1)));
    let mut ms = SharedMemory::<f32>::new(b);
    // The scale folded into Q once.
    load_tile::<F>(q, &mut qs, base, qb * b, t, scale, b, hd);
    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    let mut acc = Array::<f32>::new(dpu);
    #[unroll]
    for dd in 0..dpu {
        acc[dd] = 0.0;
    }
    let blocks = causal_tiles(qb, t, b);
    let mut kb: usize = 0;
    while kb < blocks {
        sync_cube();
        load_tile::<F>(k, &mut ks, kv_base, kb * b, t, 1.0, b, hd);
        load_tile::<F>(v, &mut vs, kv_base, kb * b, t, 1.0, b, hd);
        sync_cube();
        // S for the whole tile.
        let mut e = unit;
        while e < comptime!(b * b) {
            let rr = e / b;
            let c = e % b;
            let mut s = 0.0f32;
            for j in 0..hd {
                s += qs[rr * hs + j] * ks[c * hs + j];
            }
            let key = kb * b + c;
            if key > qb * b + rr || key >= t {
                s = f32::new(-3.0e38);
            }
            ps[rr * pstride + c] = s;
            e += UNITS;
        }
        sync_cube();
        // Each row's new maximum (every unit of the row finds it; one publishes it).
        let mut mb = m;
        for c in 0..b {
            mb = f32::max(mb, ps[r * pstride + c]);
        }
        let alpha = f32::exp(m - mb);
        if sub == 0 {
            ms[r] = mb;
        }
        sync_cube();
        let mut e = unit;
        while e < comptime!(b * b) {
            let rr = e / b;
            let c = e % b;
            ps[rr * pstride + c] = f32::exp(ps[rr * pstride + c] - ms[rr]);
            e += UNITS;
        }
        sync_cube();
        let mut sum = 0.0f32;
        for c in 0..b {
            sum += ps[r * pstride + c];
        }
        l = l * alpha + sum;
        #[unroll]
        for dd in 0..dpu {
            let j = sub + dd * upr;
            if j < hd {
                let mut a = acc[dd] * alpha;
                for c in 0..b {
                    a += ps[r * pstride + c] * vs[c * hs + j];
                }
                acc[dd] = a;
            }
        }
        m = mb;
        kb += 1;
    }
    if row < t {
        #[unroll]
        for dd in 0..dpu {
            let j = sub + dd * upr;
            if j < hd {
                o[base + row * hd + j] = F::cast_from(acc[dd] / l);
            }
        }
        if sub == 0 {
            lse[bh * t + row] = m + f32::ln(l);
        }
    }
}

#[cube(launch_unchecked)]
pub(crate) fn delta_kernel<F: Float>(o: &Array<F>, d_o: &Array<F>, delta: &mut Array<f32>, hd: u32) {
    let row = ABSOLUTE_POS;
    if row < delta.len() {
        let hd = hd as usize;
        let mut s = 0.0f32;
        let mut j: usize = 0;
        while j < hd {
            s += f32::cast_from(o[row * hd + j]) * f32::cast_from(d_o[row * hd + j]);
            j += 1;
        }
        delta[row] = s;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_kv_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    dk: &mut Array<F>,
    dv: &mut Array<F>,
    t: u32,
    group: u32,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] b: usize,
) {
    let t = t as usize;
    let group = group as usize;
    let kb = CUBE_POS_X as usize;
    let bk = CUBE_POS_Y as usize; // batch and kv head
    let kv_base = bk * t * hd;
    let upk = comptime!(UNITS / b);
    let dpu = comptime!(hd.div_ceil(UNITS / b));
    let hs = comptime!(hd + 1);
    let pstride = comptime!(b + 1);
    let unit = UNIT_POS_X as usize;
    let c = unit / upk;
    let sub = unit % upk;
    let key = kb * b + c;
    let mut ks = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut vs = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut qs = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut dos = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut ps = SharedMemory::<f32>::new(comptime!(b * (b + 1)));
    let mut dss = SharedMemory::<f32>::new(comptime!(b * (b + 1)));
    let mut ls = SharedMemory::<f32>::new(b);
    let mut ds = SharedMemory::<f32>::new(b);
    load_tile::<F>(k, &mut ks, kv_base, kb * b, t, 1.0, b, hd);
    load_tile::<F>(v, &mut vs, kv_base, kb * b, t, 1.0, b, hd);
    let mut acc_k = Array::<f32>::new(dpu);
    let mut acc_v = Array::<f32>::new(dpu);
    #[unroll]
    for dd in 0..dpu {
        acc_k[dd] = 0.0;
        acc_v[dd] = 0.0;
    }
    // The kv head's query heads in turn, and causally the query tiles from this key tile's
    // first row on.
    let blocks = (t + b - 1) / b;
    let mut gi: usize = 0;
    while gi < group {
        let bh = bk * group + gi;
        let base = bh * t * hd;
        let mut qb = kb;
        while qb < blocks {
            sync_cube();
            load_tile::<F>(q, &mut qs, base, qb * b, t, 1.0, b, hd);
            load_tile::<F>(d_o, &mut dos, base, qb * b, t, 1.0, b, hd);
            load_rows(lse, &mut ls, bh * t, qb * b, t, b);
            load_rows(delta, &mut ds, bh * t, qb * b, t, b);
            sync_cube();
            grad_scores(&qs, &dos, &ks, &vs, &ls, &ds, &mut ps, &mut dss, qb, kb, t, scale, b, hd, true);
            sync_cube();
            #[unroll]
            for dd in 0..dpu {
                let j = sub + dd * upk;
                if j < hd {
                    let mut a = acc_v[dd];
                    let mut g = acc_k[dd];
                    for r in 0..b {
                        a += ps[r * pstride + c] * dos[r * hs + j];
                        g += dss[r * pstride + c] * qs[r * hs + j];
                    }
                    acc_v[dd] = a;
                    acc_k[dd] = g;
                }
            }
            qb += 1;
        }
        gi += 1;
    }
    if key < t {
        #[unroll]
        for dd in 0..dpu {
            let j = sub + dd * upk;
            if j < hd {
                dk[kv_base + key * hd + j] = F::cast_from(acc_k[dd]);
                dv[kv_base + key * hd + j] = F::cast_from(acc_v[dd]);
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_q_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    dq: &mut Array<F>,
    t: u32,
    group: u32,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] b: usize,
) {
    let t = t as usize;
    let qb = CUBE_POS_X as usize;
    let bh = CUBE_POS_Y as usize;
    let base = bh * t * hd;
    let kv_base = (bh / group as usize) * t * hd;
    let upr = comptime!(UNITS / b);
    let dpu = comptime!(hd.div_ceil(UNITS / b));
    let hs = comptime!(hd + 1);
    let pstride = comptime!(b + 1);
    let unit = UNIT_POS_X as usize;
    let r = unit / upr;
    let sub = unit % upr;
    let row = qb * b + r;
    let mut qs = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut dos = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut ks = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut vs = SharedMemory::<f32>::new(comptime!(b * (hd + 1)));
    let mut dss = SharedMemory::<f32>::new(comptime!(b * (b + 1)));
    // P is not kept here (keep_p = false never writes it).
    let mut unused = SharedMemory::<f32>::new(comptime!(1usize));
    let mut ls = SharedMemory::<f32>::new(b);
    let mut ds = SharedMemory::<f32>::new(b);
    load_tile::<F>(q, &mut qs, base, qb * b, t, 1.0, b, hd);
    load_tile::<F>(d_o, &mut dos, base, qb * b, t, 1.0, b, hd);
    load_rows(lse, &mut ls, bh * t, qb * b, t, b);
    load_rows(delta, &mut ds, bh * t, qb * b, t, b);
    let mut acc = Array::<f32>::new(dpu);
    #[unroll]
    for dd in 0..dpu {
        acc[dd] = 0.0;
    }
    let blocks = causal_tiles(qb, t, b);
    let mut kb: usize = 0;
    while kb < blocks {
        sync_cube();
        load_tile::<F>(k, &mut ks, kv_base, kb * b, t, 1.0, b, hd);
        load_tile::<F>(v, &mut vs, kv_base, kb * b, t, 1.0, b, hd);
        sync_cube();
        grad_scores(&qs, &dos, &ks, &vs, &ls, &ds, &mut unused, &mut dss, qb, kb, t, scale, b, hd, false);
        sync_cube();
        #[unroll]
        for dd in 0..dpu {
            let j = sub + dd * upr;
            if j < hd {
                let mut g = acc[dd];
                for c in 0..b {
                    g += dss[r * pstride + c] * ks[c * hs + j];
                }
                acc[dd] = g;
            }
        }
        kb += 1;
    }
    if row < t {
        #[unroll]
        for dd in 0..dpu {
            let j = sub + dd * upr;
            if j < hd {
                dq[base + row * hd + j] = F::cast_from(acc[dd]);
            }
        }
    }
}

/// A new contiguous tensor of `dtype` on `like`'s device.
pub(super) fn empty_dtype<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// The grid of the tiled kernels: one cube per tile of `b` rows and batch-and-head.
fn tile_grid(bh: usize, t: usize, b: usize) -> (CubeCount, CubeDim) {
    (CubeCount::Static(t.div_ceil(b) as u32, bh as u32, 1), CubeDim::new_1d(UNITS as u32))
}

/// Launches `$kernel::launch_unchecked::<F, R>` with `F` the element type of `$dtype`.
macro_rules! launch_float {
    ($kernel:ident, $dtype:expr, $($arg:expr),+ $(,)?) => {
        match $dtype {
            DType::F32 => $kernel::launch_unchecked::<f32, R>($($arg),+),
            DType::F16 => $kernel::launch_unchecked::<f16, R>($($arg),+),
            DType::BF16 => $kernel::launch_unchecked::<bf16, R>($($arg),+),
            other => unreachable!("flash attention on {other:?} (kiln_models::attention::flash_kernels admits f32, f16, bf16)"),
        }
    };
}

/// What both backward launches (this file's and `attention_mma.rs`'s) start with: the gradients'
/// buffers (dq shaped as q, dk and dv as k), the rows' `D = rowsum(dO ∘ O)` `[B, H, T]` (its kernel
/// launched), the query heads a kv head serves, and the scale.
pub(super) struct BackwardStart<R: CubeRuntime> {
    pub dq: CubeTensor<R>,
    pub dk: CubeTensor<R>,
    pub dv: CubeTensor<R>,
    pub delta: CubeTensor<R>,
    pub group: u32,
    pub scale: f32,
}

/// Allocates the backward's outputs for contiguous `q: [B, H, T, Hd]`, `k: [B, K, T, Hd]` and
/// launches the delta kernel over `o` and `d_o` (q's shape and type).
pub(super) fn backward_start<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>, o: CubeTensor<R>, d_o: &CubeTensor<R>) -> BackwardStart<R> {
    let [bb, h, t, hd] = q.meta.shape().dims::<4>();
    let kv = k.meta.shape().dims::<4>()[1];
    let dq = empty_dtype(q, q.meta.shape().clone(), q.dtype);
    let [dk, dv] = [0; 2].map(|_| empty_dtype(q, k.meta.shape().clone(), q.dtype));
    let delta = empty_like(q, Shape::new([bb, h, t]));
    let (count, dim) = elementwise_grid(&q.client, bb * h * t);
    // SAFETY: o and dO hold bb·h·t·hd elements of q's type and delta bb·h·t; a unit reads and
    // writes only its row, when below bb·h·t.
    unsafe {
        launch_float!(delta_kernel, q.dtype, &q.client, count, dim, o.into_array_arg(), d_o.clone().into_array_arg(), delta.clone().into_array_arg(), hd as u32);
    }
    BackwardStart { dq, dk, dv, delta, group: (h / kv) as u32, scale: 1.0 / (hd as f32).sqrt() }
}

/// Whether a call may take the tensor-core kernels (`attention_mma.rs`) where they apply: true
/// unless [`set_tensor_cores`] turned them off.
static TENSOR_CORES: AtomicBool = AtomicBool::new(true);
/// Whether the last call took them.
static TOOK_TENSOR_CORES: AtomicBool = AtomicBool::new(false);

/// Lets the flash kernels' calls take the tensor-core kernels where the device, type and head
/// dim allow (`on`, the default), or keeps them on the FMA kernels of this file (`kiln
/// bench-attention` times both).
pub fn set_tensor_cores(on: bool) {
    TENSOR_CORES.store(on, Ordering::Relaxed);
}

/// Whether the last forward or backward ran on the tensor-core kernels.
pub fn took_tensor_cores() -> bool {
    TOOK_TENSOR_CORES.load(Ordering::Relaxed)
}

/// Whether a call with tile `forced` (0: the device's choice) on `x` takes the tensor-core
/// kernels, recorded for [`took_tensor_cores`].
fn tensor_cores<R: CubeRuntime>(x: &CubeTensor<R>, hd: usize, forced: usize) -> bool {
    let allowed = TENSOR_CORES.load(Ordering::Relaxed);
    let take = forced == 0 && allowed && attention_mma::supported(&x.client, x.dtype, hd);
    // Said once a run, so that a run's log shows which kernels its attention took.
    static SAID: AtomicBool = AtomicBool::new(false);
    if forced == 0 && !SAID.swap(true, Ordering::Relaxed) {
        match (take, allowed) {
            (true, _) => tracing::info!("flash attention on tensor cores ({:?}, head dim {hd}: cube_kernels/attention_mma.rs)", x.dtype),
            (false, false) => tracing::info!("flash attention on the FMA kernels (tensor cores turned off)"),
            (false, true) => tracing::info!("flash attention on the FMA kernels ({:?}, head dim {hd}; tensor cores need f16/bf16, a head dim a multiple of 16 and cooperative matrices on the device)", x.dtype),
        }
    }
    TOOK_TENSOR_CORES.store(take, Ordering::Relaxed);
    take
}

/// The tile for `x`'s head dim on its device, or `forced` when non-zero (tests).
fn pick_tile<R: CubeRuntime>(x: &CubeTensor<R>, hd: usize, forced: usize) -> usize {
    if forced > 0 {
        return forced;
    }
    tile(hd, x.client.properties().hardware.max_shared_memory_size)
}

/// `(q, k, v) -> (o [B, H, T, Hd], lse [B, H, T])` as one kernel: the tensor-core kernel where
/// it applies (`attention_mma.rs`), else this file's with the tile by [`tile`].
pub fn forward<R: CubeRuntime, BT: BoolElement>(q: FloatTensor<B<R, BT>>, k: FloatTensor<B<R, BT>>, v: FloatTensor<B<R, BT>>) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    forward_tiled::<R, BT>(q, k, v, 0)
}

/// [`forward`] with tile `b` (0: the device's choice); `b` divides [`UNITS`].
pub fn forward_tiled<R: CubeRuntime, BT: BoolElement>(q: FloatTensor<B<R, BT>>, k: FloatTensor<B<R, BT>>, v: FloatTensor<B<R, BT>>, b: usize) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    let shape = q.shape.clone();
    let [bb, h, t, _] = shape.dims::<4>();
    let outputs = [(shape, q.dtype), (Shape::new([bb, h, t]), DType::F32)];
    let [o, lse] = queue_typed::<R, f32, i32, BT, _, 2>("kiln_flash_attention", vec![q, k, v], outputs, b, |desc, forced, handles| {
        let ([q, k, v], [o_out, lse_out]) = desc.as_fixed::<3, 2>();
        let [q, k, v] = [q, k, v].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let [bb, h, t, hd] = q.meta.shape().dims::<4>();
        if tensor_cores(&q, hd, *forced) {
            let (o, lse) = attention_mma::launch_forward(&q, k, v);
            handles.register_float_tensor::<Inner<R, BT>>(&o_out.id, o);
            handles.register_float_tensor::<Inner<R, BT>>(&lse_out.id, lse);
            return;
        }
        let b = pick_tile(&q, hd, *forced);
        let o = empty_dtype(&q, q.meta.shape().clone(), q.dtype);
        let lse = empty_like(&q, Shape::new([bb, h, t]));
        let (count, dim) = tile_grid(bb * h, t, b);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = (h / k.meta.shape().dims::<4>()[1]) as u32;
        let client = q.client.clone();
        // SAFETY: q and o hold bb·h·t·hd elements of q's type, k and v bb·(h/group)·t·hd (checked
        // by the op's shapes and allocated here), lse bb·h·t; cube (x, y) reads rows of query head
        // y and its kv head only, every index is checked against t, and it writes only its tile's
        // rows below t.
        unsafe {
            launch_float!(forward_kernel, q.dtype, &client, count, dim, q.clone().into_array_arg(), k.into_array_arg(), v.into_array_arg(), o.clone().into_array_arg(), lse.clone().into_array_arg(), t as u32, group, scale, hd, b);
        }
        handles.register_float_tensor::<Inner<R, BT>>(&o_out.id, o);
        handles.register_float_tensor::<Inner<R, BT>>(&lse_out.id, lse);
    });
    (o, lse)
}

/// `(q, k, v, o, lse, dO) -> (dq, dk, dv)`: the rows' `D = rowsum(dO ∘ O)`, then the dK/dV and
/// dQ kernels: the tensor-core ones where they apply (`attention_mma.rs`), else this file's with
/// the tile by [`tile`].
#[allow(clippy::type_complexity)]
pub fn backward<R: CubeRuntime, BT: BoolElement>(
    q: FloatTensor<B<R, BT>>,
    k: FloatTensor<B<R, BT>>,
    v: FloatTensor<B<R, BT>>,
    o: FloatTensor<B<R, BT>>,
    lse: FloatTensor<B<R, BT>>,
    d_o: FloatTensor<B<R, BT>>,
) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    backward_tiled::<R, BT>(q, k, v, o, lse, d_o, 0)
}

/// [`backward`] with tile `b` (0: the device's choice); `b` divides [`UNITS`].
#[allow(clippy::type_complexity)]
pub fn backward_tiled<R: CubeRuntime, BT: BoolElement>(
    q: FloatTensor<B<R, BT>>,
    k: FloatTensor<B<R, BT>>,
    v: FloatTensor<B<R, BT>>,
    o: FloatTensor<B<R, BT>>,
    lse: FloatTensor<B<R, BT>>,
    d_o: FloatTensor<B<R, BT>>,
    b: usize,
) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    let outputs = [(q.shape.clone(), q.dtype), (k.shape.clone(), k.dtype), (v.shape.clone(), v.dtype)];
    let [dq, dk, dv] = queue_typed::<R, f32, i32, BT, _, 3>("kiln_flash_attention_backward", vec![q, k, v, o, lse, d_o], outputs, b, |desc, forced, handles| {
        let ([q, k, v, o, lse, d_o], [dq_out, dk_out, dv_out]) = desc.as_fixed::<6, 3>();
        let [q, k, v, o, lse, d_o] = [q, k, v, o, lse, d_o].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let [bb, h, t, hd] = q.meta.shape().dims::<4>();
        if tensor_cores(&q, hd, *forced) {
            let (dq, dk, dv) = attention_mma::launch_backward(q, k, v, o, lse, d_o);
            handles.register_float_tensor::<Inner<R, BT>>(&dq_out.id, dq);
            handles.register_float_tensor::<Inner<R, BT>>(&dk_out.id, dk);
            handles.register_float_tensor::<Inner<R, BT>>(&dv_out.id, dv);
            return;
        }
        let b = pick_tile(&q, hd, *forced);
        let (client, dtype) = (q.client.clone(), q.dtype);
        let BackwardStart { dq, dk, dv, delta, group, scale } = backward_start(&q, &k, o, &d_o);
        let (count, dim) = tile_grid(bb * h, t, b);
        let (count_kv, dim_kv) = tile_grid(bb * (h / group as usize), t, b);
        // SAFETY: q, dO and dq hold bb·h·t·hd elements of q's type, k, v, dk and dv
        // bb·(h/group)·t·hd (checked by the op's shapes and allocated here), lse and delta
        // bb·h·t; a tiled cube reads rows of its query head and kv head (a dK/dV cube: its kv
        // head's group of query heads), checked against t, and writes only its tile's rows below t.
        unsafe {
            launch_float!(
                backward_kv_kernel,
                dtype,
                &client,
                count_kv,
                dim_kv,
                q.clone().into_array_arg(),
                k.clone().into_array_arg(),
                v.clone().into_array_arg(),
                d_o.clone().into_array_arg(),
                lse.clone().into_array_arg(),
                delta.clone().into_array_arg(),
                dk.clone().into_array_arg(),
                dv.clone().into_array_arg(),
                t as u32,
                group,
                scale,
                hd,
                b,
            );
            launch_float!(
                backward_q_kernel,
                dtype,
                &client,
                count,
                dim,
                q.into_array_arg(),
                k.into_array_arg(),
                v.into_array_arg(),
                d_o.into_array_arg(),
                lse.into_array_arg(),
                delta.into_array_arg(),
                dq.clone().into_array_arg(),
                t as u32,
                group,
                scale,
                hd,
                b,
            );
        }
        handles.register_float_tensor::<Inner<R, BT>>(&dq_out.id, dq);
        handles.register_float_tensor::<Inner<R, BT>>(&dk_out.id, dk);
        handles.register_float_tensor::<Inner<R, BT>>(&dv_out.id, dv);
    });
    (dq, dk, dv)
}
