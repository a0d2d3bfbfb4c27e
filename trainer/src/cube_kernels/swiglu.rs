//! SwiGLU's two passes as element-wise kernels (the formulas: `kiln_models::swiglu`):
//!
//! ```text
//! forward:   h = g·σ(g)·u
//! backward:  dg = dh·u·(σ + g·σ·(1 − σ)),  du = dh·g·σ      one unit an element, both outputs
//! ```
//!
//! and the same on the joined `y = [g | u]` (`[N, 2F]`, the joined gate/up matmul's output): the
//! unit of `h[i, j]` reads `y[i, j]` and `y[i, F + j]` and writes `dy` at both.

use burn::tensor::ops::FloatTensor;
use burn::tensor::Shape;
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

#[cube(launch_unchecked)]
pub(crate) fn joined_forward_kernel(y: &Array<f32>, h: &mut Array<f32>, f: u32) {
    let i = ABSOLUTE_POS;
    if i < h.len() {
        let f = f as usize;
        let at = (i / f) * 2 * f + i % f;
        let gi = y[at];
        let s = 1.0 / (1.0 + f32::exp(-gi));
        h[i] = gi * s * y[at + f];
    }
}

#[cube(launch_unchecked)]
pub(crate) fn joined_backward_kernel(y: &Array<f32>, dh: &Array<f32>, dy: &mut Array<f32>, f: u32) {
    let i = ABSOLUTE_POS;
    if i < dh.len() {
        let f = f as usize;
        let at = (i / f) * 2 * f + i % f;
        let gi = y[at];
        let s = 1.0 / (1.0 + f32::exp(-gi));
        let d = dh[i];
        dy[at] = d * y[at + f] * (s + gi * s * (1.0 - s));
        dy[at + f] = d * gi * s;
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

/// `y = [g | u] [N, 2F] -> h [N, F]` as one kernel.
pub fn joined_forward<R: CubeRuntime, BT: BoolElement>(y: FloatTensor<B<R, BT>>) -> FloatTensor<B<R, BT>> {
    let [n, w] = y.shape.dims::<2>();
    let [h] = queue_n::<R, f32, i32, BT, _, 1>("kiln_swiglu_joined", vec![y], [Shape::new([n, w / 2])], (), |desc, (), handles| {
        let ([y], [h_out]) = desc.as_fixed::<1, 1>();
        let y = into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(y));
        let [n, w] = y.meta.shape().dims::<2>();
        let h = empty_like(&y, Shape::new([n, w / 2]));
        let (count, dim) = elementwise_grid(&y.client, n * (w / 2));
        // SAFETY: y holds n·2F f32 values and h n·F (allocated here); unit i < n·F reads
        // y[row·2F + col] and y[row·2F + F + col], both within its row.
        unsafe {
            joined_forward_kernel::launch_unchecked::<R>(&y.client, count, dim, y.clone().into_array_arg(), h.clone().into_array_arg(), (w / 2) as u32);
        }
        handles.register_float_tensor::<Inner<R, BT>>(&h_out.id, h);
    });
    h
}

/// `(y [N, 2F], dh [N, F]) -> dy = [dg | du] [N, 2F]` as one kernel.
pub fn joined_backward<R: CubeRuntime, BT: BoolElement>(y: FloatTensor<B<R, BT>>, dh: FloatTensor<B<R, BT>>) -> FloatTensor<B<R, BT>> {
    let shape = y.shape.clone();
    let [dy] = queue_n::<R, f32, i32, BT, _, 1>("kiln_swiglu_joined_backward", vec![y, dh], [shape], (), |desc, (), handles| {
        let ([y, dh], [dy_out]) = desc.as_fixed::<2, 1>();
        let [y, dh] = [y, dh].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let [n, w] = y.meta.shape().dims::<2>();
        let dy = empty_like(&y, y.meta.shape().clone());
        let (count, dim) = elementwise_grid(&y.client, n * (w / 2));
        // SAFETY: y and dy hold n·2F f32 values, dh n·F; unit i < n·F writes dy at its row's
        // two columns only.
        unsafe {
            joined_backward_kernel::launch_unchecked::<R>(&y.client, count, dim, y.clone().into_array_arg(), dh.into_array_arg(), dy.clone().into_array_arg(), (w / 2) as u32);
        }
        handles.register_float_tensor::<Inner<R, BT>>(&dy_out.id, dy);
    });
    dy
}
