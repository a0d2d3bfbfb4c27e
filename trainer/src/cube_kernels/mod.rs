//! Kiln's CubeCL kernels for the fused ops of Burn's graph on wgpu and CUDA: RMSNorm
//! (`norm.rs`), SwiGLU (`swiglu.rs`) and the cross-entropy (`loss.rs`), one kernel a pass each,
//! RoPE on the joined q/k/v projection (`rope.rs`), and flash attention (`attention.rs`, tiled,
//! f32/f16/bf16, FMA arithmetic; `attention_mma.rs` on tensor cores, f16/bf16, where the device
//! has them).
//!
//! `kiln-models` defines each op's autodiff and its passes as tensor ops; a backend that has a
//! pass as one kernel registers it there ([`kiln_models::norm::NormKernels`] and the like). The
//! kernels here run as custom ops of Burn's fusion stream (`fusion_op.rs`), on f32 tensors (the
//! residual stream, the MLP's activations after the matmul's cast back, and the logits are f32
//! under every precision) and i32 targets: Burn's `Wgpu` and `Cuda` are
//! `Fusion<CubeBackend<runtime, f32, i32, _>>`. Each is tested against the tensor ops on wgpu
//! (`trainer/tests/backends.rs`).

pub mod attention;
pub mod attention_mma;
pub mod loss;
pub mod norm;
pub mod rope;
pub mod swiglu;
#[cfg(all(test, feature = "cuda"))]
mod ptx;

use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime};
use burn::tensor::{DType, Shape};
use cubecl::prelude::*;

/// Units of a cube that works on one row (a norm's row, a row of logits): a power of two.
pub(crate) const ROW_UNITS: usize = 256;

/// The sum (or with `max`, the maximum) of `v` over the cube's units, by a tree in shared
/// memory; every unit gets it. All units of the cube call it (it synchronizes them); `units` is
/// the cube's size, a power of two.
#[cube]
fn cube_reduce(v: f32, #[comptime] units: usize, #[comptime] max: bool) -> f32 {
    let mut shared = SharedMemory::<f32>::new(units);
    let t = UNIT_POS_X as usize;
    shared[t] = v;
    sync_cube();
    let mut stride = CUBE_DIM_X / 2;
    while stride > 0 {
        if UNIT_POS_X < stride {
            let other = shared[t + stride as usize];
            if max {
                shared[t] = f32::max(shared[t], other);
            } else {
                shared[t] = shared[t] + other;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    // Every unit has read the result before any may write shared memory again.
    sync_cube();
    total
}

/// The sum of `v` over the cube's units (see [`cube_reduce`]).
#[cube]
pub(crate) fn cube_sum(v: f32, #[comptime] units: usize) -> f32 {
    cube_reduce(v, units, false)
}

/// The maximum of `v` over the cube's units (see [`cube_reduce`]).
#[cube]
pub(crate) fn cube_max(v: f32, #[comptime] units: usize) -> f32 {
    cube_reduce(v, units, true)
}

/// One cube of [`ROW_UNITS`] units a row, for `rows` rows: a grid of at most 65,535 cubes a side
/// (the kernel finds its row as `CUBE_POS` and skips those past `rows`).
pub(crate) fn row_grid(rows: usize) -> (CubeCount, CubeDim) {
    let x = rows.clamp(1, 65_535);
    let y = rows.div_ceil(x).max(1);
    (CubeCount::Static(x as u32, y as u32, 1), CubeDim::new_1d(ROW_UNITS as u32))
}

/// One unit an element over `n` elements, on `client`'s device.
pub(crate) fn elementwise_grid<R: CubeRuntime>(client: &ComputeClient<R>, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, n);
    (cubecl::calculate_cube_count_elemwise(client, n, dim), dim)
}

/// A new contiguous f32 tensor on `like`'s device.
pub(crate) fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
}

/// Registers the kernels as the passes of the fused ops of `Fusion<CubeBackend<R, f32, i32, BT>>`
/// (Burn's `Wgpu` and `Cuda`).
pub fn register<R: CubeRuntime, BT: BoolElement>() {
    use kiln_models::registry::register;
    type G<R, BT> = crate::fusion_op::Gpu<R, f32, i32, BT>;
    register(kiln_models::norm::NormKernels::<G<R, BT>> { forward: norm::forward::<R, BT>, backward: norm::backward::<R, BT> });
    register(kiln_models::swiglu::SwigluKernels::<G<R, BT>> {
        forward: swiglu::forward::<R, BT>,
        backward: swiglu::backward::<R, BT>,
        joined_forward: swiglu::joined_forward::<R, BT>,
        joined_backward: swiglu::joined_backward::<R, BT>,
    });
    register(kiln_models::loss::LossKernels::<G<R, BT>> { forward: loss::forward::<R, BT>, backward: loss::backward::<R, BT> });
    register(kiln_models::rope::RopeKernels::<G<R, BT>> { rotate: rope::rotate::<R, BT> });
    register(kiln_models::attention::AttentionKernels::<G<R, BT>> { forward: attention::forward::<R, BT>, backward: attention::backward::<R, BT> });
}
