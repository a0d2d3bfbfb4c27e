//! RMSNorm's two passes as kernels (the formulas: `kiln_models::norm`): one cube a row.
//!
//! ```text
//! forward:   r_i = 1 / √(mean_j x_ij² + ε),  y_ij = x_ij · r_i · w_j       one cube a row
//! backward:  dx_ij = r_i · (dy_ij·w_j − x_ij·r_i · mean_j(dy_ij·w_j·x_ij·r_i))   one cube a row
//!            dw_j = Σ_i dy_ij · x_ij · r_i: partial sums over chunks of rows (one unit a
//!            column and chunk), then their sum
//! ```

use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeRuntime};
use cubecl::prelude::*;

use super::{cube_sum, elementwise_grid, empty_like, row_grid, ROW_UNITS};
use crate::fusion_op::{queue_n, Cube, Gpu};

type B<R, BT> = Gpu<R, f32, i32, BT>;
type Inner<R, BT> = Cube<R, f32, i32, BT>;

/// Rows a unit of the weight-gradient kernel sums.
pub(crate) const CHUNK: usize = 64;

#[cube(launch_unchecked)]
pub(crate) fn forward_kernel(x: &Array<f32>, w: &Array<f32>, y: &mut Array<f32>, r: &mut Array<f32>, rows: u32, d: u32, eps: f32, #[comptime] units: usize) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let d = d as usize;
    let base = row * d;
    let mut acc = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < d {
        let v = x[base + j];
        acc += v * v;
        j += units;
    }
    let total = cube_sum(acc, units);
    let rr = 1.0 / f32::sqrt(total / f32::cast_from(d) + eps);
    let mut j = UNIT_POS_X as usize;
    while j < d {
        y[base + j] = x[base + j] * rr * w[j];
        j += units;
    }
    if UNIT_POS_X == 0 {
        r[row] = rr;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_kernel(x: &Array<f32>, w: &Array<f32>, r: &Array<f32>, dy: &Array<f32>, dx: &mut Array<f32>, rows: u32, d: u32, #[comptime] units: usize) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let d = d as usize;
    let base = row * d;
    let rr = r[row];
    let mut acc = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < d {
        acc += dy[base + j] * w[j] * x[base + j];
        j += units;
    }
    // mean_j(g · x̂) with g = dy·w and x̂ = x·r.
    let mean = cube_sum(acc, units) * rr / f32::cast_from(d);
    let mut j = UNIT_POS_X as usize;
    while j < d {
        dx[base + j] = rr * (dy[base + j] * w[j] - x[base + j] * rr * mean);
        j += units;
    }
}

#[cube(launch_unchecked)]
pub(crate) fn weight_grad_kernel(x: &Array<f32>, r: &Array<f32>, dy: &Array<f32>, partial: &mut Array<f32>, rows: u32, d: u32, #[comptime] chunk: usize) {
    let d = d as usize;
    let rows = rows as usize;
    let pos = ABSOLUTE_POS;
    let chunks = rows.div_ceil(chunk);
    if pos < chunks * d {
        let c = pos / d;
        let j = pos % d;
        let start = c * chunk;
        let mut end = start + chunk;
        if end > rows {
            end = rows;
        }
        let mut acc = 0.0f32;
        let mut i = start;
        while i < end {
            acc += dy[i * d + j] * x[i * d + j] * r[i];
            i += 1;
        }
        partial[pos] = acc;
    }
}

/// `(x [N, D], w [D], eps) -> (y [N, D], r [N, 1])` as one kernel.
pub fn forward<R: CubeRuntime, BT: BoolElement>(x: FloatTensor<B<R, BT>>, w: FloatTensor<B<R, BT>>, eps: f32) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    let shape = x.shape.clone();
    let rows = shape.dims::<2>()[0];
    let [y, r] = queue_n::<R, f32, i32, BT, _, 2>("kiln_rms_norm", vec![x, w], [shape, Shape::new([rows, 1])], eps, |desc, eps, handles| {
        let ([x, w], [y_out, r_out]) = desc.as_fixed::<2, 2>();
        let [x, w] = [x, w].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let [n, d] = x.meta.shape().dims::<2>();
        let (y, r) = (empty_like(&x, x.meta.shape().clone()), empty_like(&x, Shape::new([n, 1])));
        let (count, dim) = row_grid(n);
        // SAFETY: x and y hold n·d f32 values, w holds d, r holds n (allocated here or checked
        // by the op's shapes); a cube touches only its row, and cubes past n return at once.
        unsafe {
            forward_kernel::launch_unchecked::<R>(&x.client, count, dim, x.clone().into_array_arg(), w.into_array_arg(), y.clone().into_array_arg(), r.clone().into_array_arg(), n as u32, d as u32, *eps, ROW_UNITS);
        }
        handles.register_float_tensor::<Inner<R, BT>>(&y_out.id, y);
        handles.register_float_tensor::<Inner<R, BT>>(&r_out.id, r);
    });
    (y, r)
}

/// `(x [N, D], w [D], r [N, 1], dy [N, D]) -> (dx [N, D], dw [D])`: the row kernel, the partial
/// sums of `dw` and their sum.
pub fn backward<R: CubeRuntime, BT: BoolElement>(
    x: FloatTensor<B<R, BT>>,
    w: FloatTensor<B<R, BT>>,
    r: FloatTensor<B<R, BT>>,
    dy: FloatTensor<B<R, BT>>,
) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    let shape = x.shape.clone();
    let d = shape.dims::<2>()[1];
    let [dx, dw] = queue_n::<R, f32, i32, BT, _, 2>("kiln_rms_norm_backward", vec![x, w, r, dy], [shape, Shape::new([d])], (), |desc, (), handles| {
        let ([x, w, r, dy], [dx_out, dw_out]) = desc.as_fixed::<4, 2>();
        let [x, w, r, dy] = [x, w, r, dy].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let [n, d] = x.meta.shape().dims::<2>();
        let client = x.client.clone();
        let dx = empty_like(&x, x.meta.shape().clone());
        let (count, dim) = row_grid(n);
        let chunks = n.div_ceil(CHUNK);
        let partial = empty_like(&x, Shape::new([chunks, d]));
        let (count_w, dim_w) = elementwise_grid(&client, chunks * d);
        // SAFETY: x, dy and dx hold n·d f32 values, w holds d, r holds n and partial
        // chunks·d; a row cube touches only its row, and the weight kernel's unit `pos` only
        // index pos of partial and rows of its chunk, when pos < chunks·d.
        unsafe {
            backward_kernel::launch_unchecked::<R>(&client, count, dim, x.clone().into_array_arg(), w.into_array_arg(), r.clone().into_array_arg(), dy.clone().into_array_arg(), dx.clone().into_array_arg(), n as u32, d as u32, ROW_UNITS);
            weight_grad_kernel::launch_unchecked::<R>(&client, count_w, dim_w, x.into_array_arg(), r.into_array_arg(), dy.into_array_arg(), partial.clone().into_array_arg(), n as u32, d as u32, CHUNK);
        }
        let dw = Inner::<R, BT>::float_reshape(Inner::<R, BT>::float_sum_dim(partial, 0), Shape::new([d])); // [chunks, D] -> [D]
        handles.register_float_tensor::<Inner<R, BT>>(&dx_out.id, dx);
        handles.register_float_tensor::<Inner<R, BT>>(&dw_out.id, dw);
    });
    (dx, dw)
}
