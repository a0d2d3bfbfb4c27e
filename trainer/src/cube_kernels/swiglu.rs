//! SwiGLU's two passes as element-wise kernels (the formulas: `kiln_models::swiglu`):
//!
//! ```text
//! forward:   h = g·σ(g)·u
//! backward:  dg = dh·u·(σ + g·σ·(1 − σ)),  du = dh·g·σ      one unit an element, both outputs
//! ```

use burn::tensor::ops::FloatTensor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeRuntime};
use cubecl::prelude::*;

use super::{elementwise_grid, empty_like};
use crate::fusion_op::{queue_n, Cube, Gpu};

type B<R, BT> = Gpu<R, f32, i32, BT>;
type Inner<R, BT> = Cube<R, f32, i32, BT>;

#[cube(launch_unchecked)]
pub(crate) fn forward_kernel(g: &Array<f32>, u: &Array<f32>, h: &mut Array<f32>) {
    let i = ABSOLUTE_POS;
    if i < h.len() {
        let gi = g[i];
        let s = 1.0 / (1.0 + f32::exp(-gi));
        h[i] = gi * s * u[i];
    }
}

#[cube(launch_unchecked)]
pub(crate) fn backward_kernel(g: &Array<f32>, u: &Array<f32>, dh: &Array<f32>, dg: &mut Array<f32>, du: &mut Array<f32>) {
    let i = ABSOLUTE_POS;
    if i < dg.len() {
        let gi = g[i];
        let s = 1.0 / (1.0 + f32::exp(-gi));
        let d = dh[i];
        dg[i] = d * u[i] * (s + gi * s * (1.0 - s));
        du[i] = d * gi * s;
    }
}

/// `(g, u) -> h = silu(g)·u` as one kernel.
pub fn forward<R: CubeRuntime, BT: BoolElement>(g: FloatTensor<B<R, BT>>, u: FloatTensor<B<R, BT>>) -> FloatTensor<B<R, BT>> {
    let shape = g.shape.clone();
    let [h] = queue_n::<R, f32, i32, BT, _, 1>("kiln_swiglu", vec![g, u], [shape], (), |desc, (), handles| {
        let ([g, u], [h_out]) = desc.as_fixed::<2, 1>();
        let [g, u] = [g, u].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let n = g.meta.num_elements();
        let h = empty_like(&g, g.meta.shape().clone());
        let (count, dim) = elementwise_grid(&g.client, n);
        // SAFETY: g, u and h hold n f32 values each (one shape, h allocated here); a unit
        // touches index i only when i < n.
        unsafe {
            forward_kernel::launch_unchecked::<R>(&g.client, count, dim, g.clone().into_array_arg(), u.into_array_arg(), h.clone().into_array_arg());
        }
        handles.register_float_tensor::<Inner<R, BT>>(&h_out.id, h);
    });
    h
}

/// `(g, u, dh) -> (dg, du)` as one kernel.
pub fn backward<R: CubeRuntime, BT: BoolElement>(
    g: FloatTensor<B<R, BT>>,
    u: FloatTensor<B<R, BT>>,
    dh: FloatTensor<B<R, BT>>,
) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    let shape = g.shape.clone();
    let [dg, du] = queue_n::<R, f32, i32, BT, _, 2>("kiln_swiglu_backward", vec![g, u, dh], [shape.clone(), shape], (), |desc, (), handles| {
        let ([g, u, dh], [dg_out, du_out]) = desc.as_fixed::<3, 2>();
        let [g, u, dh] = [g, u, dh].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let n = g.meta.num_elements();
        let (dg, du) = (empty_like(&g, g.meta.shape().clone()), empty_like(&g, g.meta.shape().clone()));
        let (count, dim) = elementwise_grid(&g.client, n);
        // SAFETY: as the forward: five tensors of n f32 values, index i < n only.
        unsafe {
            backward_kernel::launch_unchecked::<R>(&g.client, count, dim, g.clone().into_array_arg(), u.into_array_arg(), dh.into_array_arg(), dg.clone().into_array_arg(), du.clone().into_array_arg());
        }
        handles.register_float_tensor::<Inner<R, BT>>(&dg_out.id, dg);
        handles.register_float_tensor::<Inner<R, BT>>(&du_out.id, du);
    });
    (dg, du)
}
