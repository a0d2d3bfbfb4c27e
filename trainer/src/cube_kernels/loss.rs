//! The cross-entropy's two passes as kernels (the formulas: `kiln_models::loss`), reading the
//! logits `[N, V]` once each way:
//!
//! ```text
//! forward:   m_i = max_j x_ij,  lse_i = m_i + ln Σ_j exp(x_ij − m_i)        one cube a row
//!            term_i = w_i · (lse_i − x_i,y_i),  loss = Σ_i term_i
//! backward:  dx_ij = g·w_i · (exp(x_ij − lse_i) − [j = y_i])                one unit an element
//! ```
//!
//! A target outside `[0, V)` (never written by Kiln's data, whose masked tokens keep a real id and
//! weight 0) reads as the logit 0 and gets no one-hot term, rather than reading out of bounds.

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeRuntime};
use cubecl::prelude::*;

use super::{cube_max, cube_sum, elementwise_grid, empty_like, row_grid, ROW_UNITS};
use crate::fusion_op::{queue_n, Cube, Gpu};

type B<R, BT> = Gpu<R, f32, i32, BT>;
type Inner<R, BT> = Cube<R, f32, i32, BT>;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_kernel(x: &Array<f32>, y: &Array<i32>, w: &Array<f32>, lse: &mut Array<f32>, term: &mut Array<f32>, rows: u32, v: u32, #[comptime] units: usize) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let vv = v as usize;
    let base = row * vv;
    let mut m = f32::new(-3.0e38);
    let mut j = UNIT_POS_X as usize;
    while j < vv {
        m = f32::max(m, x[base + j]);
        j += units;
    }
    let m = cube_max(m, units);
    let mut s = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < vv {
        s += f32::exp(x[base + j] - m);
        j += units;
    }
    let l = m + f32::ln(cube_sum(s, units));
    if UNIT_POS_X == 0 {
        let t = y[row];
        let mut picked = 0.0f32;
        if t >= 0 && u32::cast_from(t) < v {
            picked = x[base + u32::cast_from(t) as usize];
        }
        lse[row] = l;
        term[row] = w[row] * (l - picked);
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_kernel(x: &Array<f32>, y: &Array<i32>, lse: &Array<f32>, w: &Array<f32>, g: &Array<f32>, dx: &mut Array<f32>, v: u32) {
    let pos = ABSOLUTE_POS;
    if pos < dx.len() {
        let vv = v as usize;
        let i = pos / vv;
        let j = pos % vv;
        let coef = w[i] * g[0];
        let mut val = f32::exp(x[pos] - lse[i]) * coef;
        let t = y[i];
        if t >= 0 && u32::cast_from(t) as usize == j {
            val -= coef;
        }
        dx[pos] = val;
    }
}

/// `(x [N, V], y [N, 1], w [N, 1]) -> (loss [1], lse [N, 1])`: the row kernel and the terms' sum.
pub fn forward<R: CubeRuntime, BT: BoolElement>(x: FloatTensor<B<R, BT>>, y: IntTensor<B<R, BT>>, w: FloatTensor<B<R, BT>>) -> (FloatTensor<B<R, BT>>, FloatTensor<B<R, BT>>) {
    let rows = x.shape.dims::<2>()[0];
    let [loss, lse] = queue_n::<R, f32, i32, BT, _, 2>("kiln_cross_entropy", vec![x, y, w], [Shape::new([1]), Shape::new([rows, 1])], (), |desc, (), handles| {
        let ([x, y, w], [loss_out, lse_out]) = desc.as_fixed::<3, 2>();
        let x = into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(x));
        let y = into_contiguous(handles.get_int_tensor::<Inner<R, BT>>(y));
        let w = into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(w));
        let [n, v] = x.meta.shape().dims::<2>();
        let (lse, term) = (empty_like(&x, Shape::new([n, 1])), empty_like(&x, Shape::new([n])));
        let (count, dim) = row_grid(n);
        // SAFETY: x holds n·v f32 values, y n i32 targets, w, lse and term n values each; a
        // cube reads only its row (a target outside [0, v) is not read), and cubes past n return.
        unsafe {
            forward_kernel::launch_unchecked::<R>(&x.client, count, dim, x.clone().into_array_arg(), y.into_array_arg(), w.into_array_arg(), lse.clone().into_array_arg(), term.clone().into_array_arg(), n as u32, v as u32, ROW_UNITS);
        }
        let loss = Inner::<R, BT>::float_reshape(Inner::<R, BT>::float_sum(term), Shape::new([1])); // [1]
        handles.register_float_tensor::<Inner<R, BT>>(&loss_out.id, loss);
        handles.register_float_tensor::<Inner<R, BT>>(&lse_out.id, lse);
    });
    (loss, lse)
}

/// `(x [N, V], y [N, 1], lse [N, 1], w [N, 1], g [1]) -> dx [N, V]` as one kernel.
pub fn backward<R: CubeRuntime, BT: BoolElement>(
    x: FloatTensor<B<R, BT>>,
    y: IntTensor<B<R, BT>>,
    lse: FloatTensor<B<R, BT>>,
    w: FloatTensor<B<R, BT>>,
    g: FloatTensor<B<R, BT>>,
) -> FloatTensor<B<R, BT>> {
    let shape = x.shape.clone();
    let [dx] = queue_n::<R, f32, i32, BT, _, 1>("kiln_cross_entropy_backward", vec![x, y, lse, w, g], [shape], (), |desc, (), handles| {
        let ([x, y, lse, w, g], [dx_out]) = desc.as_fixed::<5, 1>();
        let x = into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(x));
        let y = into_contiguous(handles.get_int_tensor::<Inner<R, BT>>(y));
        let [lse, w, g] = [lse, w, g].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let [n, v] = x.meta.shape().dims::<2>();
        let dx = empty_like(&x, x.meta.shape().clone());
        let client = x.client.clone();
        let (count, dim) = elementwise_grid(&client, n * v);
        // SAFETY: x and dx hold n·v f32 values, y n i32 targets, lse and w n values, g one; a
        // unit touches index pos of x and dx and row pos / v of the rest, when pos < n·v.
        unsafe {
            backward_kernel::launch_unchecked::<R>(&client, count, dim, x.into_array_arg(), y.into_array_arg(), lse.into_array_arg(), w.into_array_arg(), g.into_array_arg(), dx.clone().into_array_arg(), v as u32);
        }
        handles.register_float_tensor::<Inner<R, BT>>(&dx_out.id, dx);
    });
    dx
}
