//! Flash attention on tensor cores: `attention.rs`'s passes and contract (causal, scale
//! `s = 1/√Hd`, `q, k, v, o: [B, H, T, Hd]`, the rows' log-sum-exp `L: [B, H, T]` f32) with every
//! `T × T × Hd` product as warp-level 16×16×16 matrix products (CubeCL's `cmma`: f16 or bf16
//! operands, f32 accumulators). Used where the device has them for the tensors' type (CUDA:
//! every GPU since Volta) and the head dim is a multiple of 16 up to 128 ([`supported`]);
//! elsewhere `attention.rs`'s kernels, whose arithmetic is plain FMAs, run.
//!
//! A cube is [`PLANES`] planes (warps) of 32 units; each plane owns 16 rows of the cube's tile of
//! [`TILE`] rows and walks the other side's tiles of [`TILE`] rows, which the whole cube loads
//! into shared memory:
//!
//! ```text
//! forward   (cube: query tile i; plane: 16 of its rows)
//!   pass 1  for key tiles j ≤ i:  S = Q Kⱼᵀ (mma)   m, l: running row max and Σ exp(s·S − m)
//!           L = m + ln l                                                   (written: L)
//!   pass 2  for key tiles j ≤ i:  S = Q Kⱼᵀ (mma)   P = exp(s·S − L) (bf16)   O += P Vⱼ (mma)
//! dK, dV    (cube: key tile j; plane: 16 of its keys)   for query tiles i ≥ j:
//!           Sᵀ = Kⱼ Qᵢᵀ, dPᵀ = Vⱼ dOᵢᵀ (mma)   Pᵀ = exp(s·Sᵀ − Lᵢ)   dSᵀ = Pᵀ ∘ (dPᵀ − Dᵢ) · s
//!           dVⱼ += Pᵀ dOᵢ,  dKⱼ += dSᵀ Qᵢ (mma)
//! dQ        (cube: query tile i)   for key tiles j ≤ i:   dQᵢ += dS Kⱼ (mma), dS as above
//! ```
//!
//! The forward computes `S` twice instead of rescaling `O` whenever a row's maximum grows: with
//! the exact `L` known, `P` is final and `O`, `dQ`, `dK` and `dV` all stay in the planes'
//! accumulators from the first tile to the last, never round-tripping through shared memory.
//! `D = rowsum(dO ∘ O)` is `attention.rs`'s kernel. Grouped-query attention as there: query head
//! `h` reads kv head `h / (H/K)` in place, and a dK/dV cube walks its kv head's query heads.
//!
//! In the element-wise steps (the masks, the exponentials, the row statistics) unit `u` of a
//! plane takes row `u / 2` of the plane's 16 and every other column from `u % 2`; the two units
//! of a row combine their partial maximum and sum by one shuffle. Score rows in shared memory are
//! padded by 4 floats (operand rows by 8 halves), which wmma's strides allow, against bank
//! conflicts. Tile rows past `T` load as zeros and are masked; nothing past row `T` is written.
//!
//! Not tested here: no device Kiln's CI has (lavapipe) has cooperative matrices. The kernels
//! compile to PTX in `ptx.rs`, and `kiln bench-attention` compares them with the recomputing
//! path on the device (`scripts/gpu-checks` part 8).

use burn::tensor::{bf16, f16, DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::features::MmaConfig;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;

use super::attention::{backward_start, causal_tiles, empty_dtype, BackwardStart};
use super::empty_like;

/// Planes (warps of 32 units) in a cube.
pub const PLANES: usize = 4;
/// Rows of a cube's tile, and of each tile it walks: 16 a plane.
pub const TILE: usize = 16 * PLANES;
/// Row stride of the f32 score buffers (a plane's 16 rows of [`TILE`] columns).
const SLD: usize = TILE + 4;
/// Row stride of the half-precision probability buffers.
const PLD: usize = TILE + 8;

/// Whether the tensor-core kernels take tensors of `dtype` with head dim `hd` on `client`'s
/// device: f16 or bf16, `hd` a multiple of 16 up to 128, 32-unit planes, and 16×16×16 products
/// of that type into f32.
pub fn supported<R: Runtime>(client: &ComputeClient<R>, dtype: DType, hd: usize) -> bool {
    let kind = match dtype {
        DType::F16 => FloatKind::F16,
        DType::BF16 => FloatKind::BF16,
        _ => return false,
    };
    let hw = &client.properties().hardware;
    let config = MmaConfig { a_type: ElemType::Float(kind).into(), b_type: ElemType::Float(kind).into(), cd_type: ElemType::Float(FloatKind::F32).into(), m: 16, n: 16, k: 16 };
    hd % 16 == 0 && hd <= 128 && hw.plane_size_min == 32 && hw.plane_size_max == 32 && shared_bytes(hd) <= hw.max_shared_memory_size && client.features().matmul.cmma.contains(&config)
}

/// Shared memory (bytes) the largest kernel (dK, dV) holds at head dim `hd` and 2-byte operands:
/// four `[TILE, hd]` operand tiles, the planes' scratch (`scratch_len`) and two half-precision
/// `[16, PLD]` buffers a plane, and two `[TILE]` rows of statistics.
pub fn shared_bytes(hd: usize) -> usize {
    2 * 4 * TILE * hd + 4 * PLANES * scratch_len(hd) + 2 * 2 * PLANES * 16 * PLD + 4 * 2 * TILE
}

/// A plane's f32 scratch: two `[16, SLD]` score buffers, which at the end hold its `[16, hd + 4]`
/// accumulator rows on their way out.
const fn scratch_len(hd: usize) -> usize {
    let scores = 2 * 16 * SLD;
    let out = 16 * (hd + 4);
    if scores > out {
        scores
    } else {
        out
    }
}

/// `dst[r·hd + j] = src[base + (first + r)·hd + j]` for the tile's [`TILE`] rows, 0 past row `t`;
/// all units of the cube take part.
#[cube]
fn load_tile<F: Float>(src: &Array<F>, dst: &mut SharedMemory<F>, base: usize, first: usize, t: usize, #[comptime] hd: usize) {
    let mut e = UNIT_POS as usize;
    while e < comptime!(TILE * hd) {
        let pos = first + e / hd;
        let mut val = F::new(0.0);
        if pos < t {
            val = src[base + pos * hd + e % hd];
        }
        dst[e] = val;
        e += comptime!(32 * PLANES);
    }
}

/// `dst[r] = src[base + first + r]` for the tile's [`TILE`] rows, 0 past row `t`.
#[cube]
fn load_stats(src: &Array<f32>, dst: &mut SharedMemory<f32>, base: usize, first: usize, t: usize) {
    let u = UNIT_POS as usize;
    if u < TILE {
        let mut val = 0.0f32;
        if first + u < t {
            val = src[base + first + u];
        }
        dst[u] = val;
    }
}

/// One plane: `out[r·SLD + c] = Σ_j a[(row + r)·hd + j] · b[c·hd + j]` for its 16 rows `r` and
/// the [`TILE`] rows `c` of `b` (`A Bᵀ`), f32, into `out` from `at`.
#[cube]
fn plane_abt<F: Float>(a: &SharedMemory<F>, row: usize, b: &SharedMemory<F>, out: &mut SharedMemory<f32>, at: usize, #[comptime] hd: usize) {
    #[unroll]
    for nb in 0..comptime!(TILE / 16) {
        let acc = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, 16usize, 16usize, 16usize, cmma::MatrixLayout::Undefined, 0.0);
        #[unroll]
        for kk in 0..comptime!(hd / 16) {
            // A: 16 rows of a, row-major. B = bᵀ's [16 dims, 16 rows]: b's rows read column-major.
            let ma = cmma::Matrix::<F>::from_slice(cmma::MatrixIdent::A, 16usize, 16usize, 16usize, cmma::MatrixLayout::RowMajor, &a.slice(row * hd + kk * 16, comptime!(TILE * hd)), comptime!(hd as u32));
            let mb = cmma::Matrix::<F>::from_slice(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, cmma::MatrixLayout::ColMajor, &b.slice(nb * 16 * hd + kk * 16, comptime!(TILE * hd)), comptime!(hd as u32));
            cmma::execute::<F, F, f32, f32>(&ma, &mb, &acc, &acc);
        }
        cmma::store(&mut out.slice_mut(at + nb * 16, at + 16 * SLD), &acc, comptime!(SLD as u32), cmma::MatrixLayout::RowMajor);
    }
}

/// One plane: `acc[nb] += p[16, TILE] · b[TILE, hd]`'s column block `nb` (16 wide), with `p` the
/// plane's half-precision rows in `ps` from `at` (stride [`PLD`]) and `b` row-major.
#[cube]
fn plane_ab<F: Float>(ps: &SharedMemory<F>, at: usize, b: &SharedMemory<F>, acc: &Sequence<cmma::Matrix<f32>>, #[comptime] hd: usize) {
    #[unroll]
    for kc in 0..comptime!(TILE / 16) {
        let ma = cmma::Matrix::<F>::from_slice(cmma::MatrixIdent::A, 16usize, 16usize, 16usize, cmma::MatrixLayout::RowMajor, &ps.slice(at + kc * 16, at + 16 * PLD), comptime!(PLD as u32));
        #[unroll]
        for nb in 0..comptime!(hd / 16) {
            let mb = cmma::Matrix::<F>::from_slice(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, cmma::MatrixLayout::RowMajor, &b.slice(kc * 16 * hd + nb * 16, comptime!(TILE * hd)), comptime!(hd as u32));
            cmma::execute::<F, F, f32, f32>(&ma, &mb, acc.index(nb), acc.index(nb));
        }
    }
}

/// `hd / 16` accumulators of 16×16, zero.
#[cube]
fn zeros(#[comptime] hd: usize) -> Sequence<cmma::Matrix<f32>> {
    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(hd / 16) {
        acc.push(cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, 16usize, 16usize, 16usize, cmma::MatrixLayout::Undefined, 0.0));
    }
    acc
}

/// One plane writes its accumulators `acc` (16 rows of `hd`) to `out` rows `first..first + 16`
/// (below `t`) from `base`, through its scratch from `at`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_rows<F: Float>(acc: &Sequence<cmma::Matrix<f32>>, scratch: &mut SharedMemory<f32>, at: usize, out: &mut Array<F>, base: usize, first: usize, t: usize, #[comptime] hd: usize) {
    let ld = comptime!(hd + 4);
    #[unroll]
    for nb in 0..comptime!(hd / 16) {
        cmma::store(&mut scratch.slice_mut(at + nb * 16, at + 16 * ld), acc.index(nb), comptime!(ld as u32), cmma::MatrixLayout::RowMajor);
    }
    sync_plane();
    let lane = UNIT_POS_X as usize;
    let mut e = lane;
    while e < comptime!(16 * hd) {
        let r = e / hd;
        let j = e % hd;
        if first + r < t {
            out[base + (first + r) * hd + j] = F::cast_from(scratch[at + r * ld + j]);
        }
        e += 32;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_kernel<F: Float>(q: &Array<F>, k: &Array<F>, v: &Array<F>, o: &mut Array<F>, lse: &mut Array<f32>, t: u32, group: u32, scale: f32, #[comptime] hd: usize) {
    let t = t as usize;
    let qb = CUBE_POS_X as usize;
    let bh = CUBE_POS_Y as usize;
    let base = bh * t * hd;
    let kv_base = (bh / group as usize) * t * hd;
    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let r = lane / 2;
    let half = lane % 2;
    let row = qb * TILE + plane * 16 + r; // this unit's query
    let mut qs = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut ks = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut vs = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut scratch = SharedMemory::<f32>::new(comptime!(PLANES * scratch_len(hd)));
    let mut ps = SharedMemory::<F>::new(comptime!(PLANES * 16 * PLD));
    let at = plane * comptime!(scratch_len(hd));
    let pat = plane * comptime!(16 * PLD);
    load_tile::<F>(q, &mut qs, base, qb * TILE, t, hd);
    let blocks = causal_tiles(qb, t, TILE);

    // Pass 1: each row's maximum m and Σ exp(s·S − m), the two units of a row alike.
    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    let mut kb: usize = 0;
    while kb < blocks {
        sync_cube();
        load_tile::<F>(k, &mut ks, kv_base, kb * TILE, t, hd);
        sync_cube();
        plane_abt::<F>(&qs, plane * 16, &ks, &mut scratch, at, hd);
        sync_plane();
        let mut mb = m;
        for i in 0..comptime!(TILE / 2) {
            let c = half + 2 * i;
            let key = kb * TILE + c;
            if key <= row && key < t {
                mb = f32::max(mb, scratch[at + r * SLD + c] * scale);
            }
        }
        mb = f32::max(mb, plane_shuffle_xor(mb, 1));
        let mut sum = 0.0f32;
        for i in 0..comptime!(TILE / 2) {
            let c = half + 2 * i;
            let key = kb * TILE + c;
            if key <= row && key < t {
                sum += f32::exp(scratch[at + r * SLD + c] * scale - mb);
            }
        }
        sum += plane_shuffle_xor(sum, 1);
        l = l * f32::exp(m - mb) + sum;
        m = mb;
        kb += 1;
    }
    let big_l = m + f32::ln(l);
    if half == 0 && row < t {
        lse[bh * t + row] = big_l;
    }

    // Pass 2: P = exp(s·S − L), final, and O += P V in the plane's accumulators.
    let acc = zeros(hd);
    let mut kb: usize = 0;
    while kb < blocks {
        sync_cube();
        load_tile::<F>(k, &mut ks, kv_base, kb * TILE, t, hd);
        load_tile::<F>(v, &mut vs, kv_base, kb * TILE, t, hd);
        sync_cube();
        plane_abt::<F>(&qs, plane * 16, &ks, &mut scratch, at, hd);
        sync_plane();
        for i in 0..comptime!(TILE / 2) {
            let c = half + 2 * i;
            let key = kb * TILE + c;
            let mut p = 0.0f32;
            if key <= row && key < t {
                p = f32::exp(scratch[at + r * SLD + c] * scale - big_l);
            }
            ps[pat + r * PLD + c] = F::cast_from(p);
        }
        sync_plane();
        plane_ab::<F>(&ps, pat, &vs, &acc, hd);
        kb += 1;
    }
    sync_plane();
    write_rows::<F>(&acc, &mut scratch, at, o, base, qb * TILE + plane * 16, t, hd);
}

/// The element-wise step of both backward kernels for one plane: from the scores `S` (at `at`)
/// and `dP` (at `at + 16·SLD`) of its 16 rows against a tile's columns, `P = exp(s·S − L)` and
/// `dS = P ∘ (dP − D) · s` in half precision into `pts` (when `keep_p`) and `dss` (from `pat`), 0 where the
/// causal mask hides the pair or the query is past `t`. `row_pos` and `col_pos` are the
/// positions of the plane's first row and the tile's first column. `L` and `D` (in `ls`, `ds`
/// for the queries' tile) belong to the queries: the columns' when `transposed` (the rows are
/// keys), else the rows', the plane's first at index `stat_row`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn grad_step<F: Float>(
    scratch: &SharedMemory<f32>,
    at: usize,
    ls: &SharedMemory<f32>,
    ds: &SharedMemory<f32>,
    pts: &mut SharedMemory<F>,
    dss: &mut SharedMemory<F>,
    pat: usize,
    row_pos: usize,
    col_pos: usize,
    stat_row: usize,
    t: usize,
    scale: f32,
    #[comptime] transposed: bool,
    #[comptime] keep_p: bool,
) {
    let lane = UNIT_POS_X as usize;
    let r = lane / 2;
    let half = lane % 2;
    for i in 0..comptime!(TILE / 2) {
        let c = half + 2 * i;
        let rp = row_pos + r;
        let cp = col_pos + c;
        let mut stat = stat_row + r;
        let mut keep = cp <= rp && rp < t;
        if transposed {
            // Rows are keys, columns queries: the key must not follow the query.
            stat = c;
            keep = rp <= cp && cp < t;
        }
        let mut p = 0.0f32;
        let mut dsv = 0.0f32;
        if keep {
            p = f32::exp(scratch[at + r * SLD + c] * scale - ls[stat]);
            dsv = p * (scratch[at + comptime!(16 * SLD) + r * SLD + c] - ds[stat]) * scale;
        }
        if keep_p {
            pts[pat + r * PLD + c] = F::cast_from(p);
        }
        dss[pat + r * PLD + c] = F::cast_from(dsv);
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
) {
    let t = t as usize;
    let group = group as usize;
    let kb = CUBE_POS_X as usize;
    let bk = CUBE_POS_Y as usize; // batch and kv head
    let kv_base = bk * t * hd;
    let plane = UNIT_POS_Y as usize;
    let mut ks = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut vs = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut qs = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut dos = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut scratch = SharedMemory::<f32>::new(comptime!(PLANES * scratch_len(hd)));
    let mut pts = SharedMemory::<F>::new(comptime!(PLANES * 16 * PLD));
    let mut dss = SharedMemory::<F>::new(comptime!(PLANES * 16 * PLD));
    let mut ls = SharedMemory::<f32>::new(TILE);
    let mut ds = SharedMemory::<f32>::new(TILE);
    let at = plane * comptime!(scratch_len(hd));
    let pat = plane * comptime!(16 * PLD);
    load_tile::<F>(k, &mut ks, kv_base, kb * TILE, t, hd);
    load_tile::<F>(v, &mut vs, kv_base, kb * TILE, t, hd);
    let acc_k = zeros(hd);
    let acc_v = zeros(hd);
    // The kv head's query heads in turn, and causally the query tiles from this key tile's
    // first row on.
    let blocks = (t + TILE - 1) / TILE;
    let mut gi: usize = 0;
    while gi < group {
        let bh = bk * group + gi;
        let base = bh * t * hd;
        let mut qb = kb;
        while qb < blocks {
            sync_cube();
            load_tile::<F>(q, &mut qs, base, qb * TILE, t, hd);
            load_tile::<F>(d_o, &mut dos, base, qb * TILE, t, hd);
            load_stats(lse, &mut ls, bh * t, qb * TILE, t);
            load_stats(delta, &mut ds, bh * t, qb * TILE, t);
            sync_cube();
            // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for the plane's 16 keys.
            plane_abt::<F>(&ks, plane * 16, &qs, &mut scratch, at, hd);
            plane_abt::<F>(&vs, plane * 16, &dos, &mut scratch, at + comptime!(16 * SLD), hd);
            sync_plane();
            grad_step::<F>(&scratch, at, &ls, &ds, &mut pts, &mut dss, pat, kb * TILE + plane * 16, qb * TILE, 0, t, scale, true, true);
            sync_plane();
            plane_ab::<F>(&pts, pat, &dos, &acc_v, hd);
            plane_ab::<F>(&dss, pat, &qs, &acc_k, hd);
            qb += 1;
        }
        gi += 1;
    }
    sync_plane();
    let first = kb * TILE + plane * 16;
    write_rows::<F>(&acc_k, &mut scratch, at, dk, kv_base, first, t, hd);
    sync_plane();
    write_rows::<F>(&acc_v, &mut scratch, at, dv, kv_base, first, t, hd);
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
) {
    let t = t as usize;
    let qb = CUBE_POS_X as usize;
    let bh = CUBE_POS_Y as usize;
    let base = bh * t * hd;
    let kv_base = (bh / group as usize) * t * hd;
    let plane = UNIT_POS_Y as usize;
    let mut qs = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut dos = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut ks = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut vs = SharedMemory::<F>::new(comptime!(TILE * hd));
    let mut scratch = SharedMemory::<f32>::new(comptime!(PLANES * scratch_len(hd)));
    // P is not kept here (keep_p = false never writes it).
    let mut unused = SharedMemory::<F>::new(comptime!(1usize));
    let mut dss = SharedMemory::<F>::new(comptime!(PLANES * 16 * PLD));
    let mut ls = SharedMemory::<f32>::new(TILE);
    let mut ds = SharedMemory::<f32>::new(TILE);
    let at = plane * comptime!(scratch_len(hd));
    let pat = plane * comptime!(16 * PLD);
    load_tile::<F>(q, &mut qs, base, qb * TILE, t, hd);
    load_tile::<F>(d_o, &mut dos, base, qb * TILE, t, hd);
    load_stats(lse, &mut ls, bh * t, qb * TILE, t);
    load_stats(delta, &mut ds, bh * t, qb * TILE, t);
    let acc = zeros(hd);
    let blocks = causal_tiles(qb, t, TILE);
    let mut kb: usize = 0;
    while kb < blocks {
        sync_cube();
        load_tile::<F>(k, &mut ks, kv_base, kb * TILE, t, hd);
        load_tile::<F>(v, &mut vs, kv_base, kb * TILE, t, hd);
        sync_cube();
        // S = Q Kᵀ and dP = dO Vᵀ for the plane's 16 queries.
        plane_abt::<F>(&qs, plane * 16, &ks, &mut scratch, at, hd);
        plane_abt::<F>(&dos, plane * 16, &vs, &mut scratch, at + comptime!(16 * SLD), hd);
        sync_plane();
        grad_step::<F>(&scratch, at, &ls, &ds, &mut unused, &mut dss, pat, qb * TILE + plane * 16, kb * TILE, plane * 16, t, scale, false, false);
        sync_plane();
        plane_ab::<F>(&dss, pat, &ks, &acc, hd);
        kb += 1;
    }
    sync_plane();
    write_rows::<F>(&acc, &mut scratch, at, dq, base, qb * TILE + plane * 16, t, hd);
}

/// The grid: one cube of [`PLANES`] planes per tile of [`TILE`] rows and batch-and-head.
fn grid(bh: usize, t: usize) -> (CubeCount, CubeDim) {
    (CubeCount::Static(t.div_ceil(TILE) as u32, bh as u32, 1), CubeDim::new_2d(32, PLANES as u32))
}

/// Launches `$kernel::launch_unchecked::<F, R>` with `F` the half type of `$dtype`.
macro_rules! launch_half {
    ($kernel:ident, $dtype:expr, $($arg:expr),+ $(,)?) => {
        match $dtype {
            DType::F16 => $kernel::launch_unchecked::<f16, R>($($arg),+),
            DType::BF16 => $kernel::launch_unchecked::<bf16, R>($($arg),+),
            other => unreachable!("tensor-core flash attention on {other:?} (`supported` admits f16 and bf16)"),
        }
    };
}

/// Launches the forward on contiguous `q, k, v` (checked by [`supported`]): `(o, lse)`.
pub(crate) fn launch_forward<R: CubeRuntime>(q: &CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let [bb, h, t, hd] = q.meta.shape().dims::<4>();
    let group = (h / k.meta.shape().dims::<4>()[1]) as u32;
    let o = empty_dtype(q, q.meta.shape().clone(), q.dtype);
    let lse = empty_like(q, Shape::new([bb, h, t]));
    let (count, dim) = grid(bb * h, t);
    let scale = 1.0 / (hd as f32).sqrt();
    // SAFETY: q and o hold bb·h·t·hd elements of q's type, k and v bb·(h/group)·t·hd, lse bb·h·t;
    // cube (x, y) reads rows of query head y and its kv head only (tile rows past t load as
    // zeros), and writes only its tile's rows below t.
    unsafe {
        launch_half!(forward_kernel, q.dtype, &q.client, count, dim, q.clone().into_array_arg(), k.into_array_arg(), v.into_array_arg(), o.clone().into_array_arg(), lse.clone().into_array_arg(), t as u32, group, scale, hd);
    }
    (o, lse)
}

/// Launches the backward on contiguous tensors (checked by [`supported`]): `(dq, dk, dv)`.
#[allow(clippy::type_complexity)]
pub(crate) fn launch_backward<R: CubeRuntime>(q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, o: CubeTensor<R>, lse: CubeTensor<R>, d_o: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let [bb, h, t, hd] = q.meta.shape().dims::<4>();
    let (client, dtype) = (q.client.clone(), q.dtype);
    let BackwardStart { dq, dk, dv, delta, group, scale } = backward_start(&q, &k, o, &d_o);
    let (count, dim) = grid(bb * h, t);
    let (count_kv, dim_kv) = grid(bb * (h / group as usize), t);
    // SAFETY: as in `launch_forward` (dk and dv shaped as k); a dK/dV cube reads its kv head's
    // group of query heads, and each tiled cube writes only its tile's rows below t.
    unsafe {
        launch_half!(
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
        );
        launch_half!(backward_q_kernel, dtype, &client, count, dim, q.into_array_arg(), k.into_array_arg(), v.into_array_arg(), d_o.into_array_arg(), lse.into_array_arg(), delta.into_array_arg(), dq.clone().into_array_arg(), t as u32, group, scale, hd);
    }
    (dq, dk, dv)
}
