//! RoPE on the joined q/k/v projection as one kernel (the formulas: `kiln_models::rope`): one
//! unit an element of `y: [B, T, NH, Hd]`; the first `rot` heads turn, the others are copied.
//!
//! ```text
//! out = y · cos + [−y_b, y_a] · sin · sign        sign = −1: the inverse (the backward pass)
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
#[allow(clippy::too_many_arguments, unused_assignments)]
pub(crate) fn rope_kernel(y: &Array<f32>, cos: &Array<f32>, sin: &Array<f32>, out: &mut Array<f32>, t: u32, nh: u32, hd: u32, rot: u32, cos_batch: u32, sign: f32) {
    let e = ABSOLUTE_POS;
    if e < out.len() {
        let (t, nh, hd) = (t as usize, nh as usize, hd as usize);
        let j = e % hd;
        let rest = e / hd;
        let head = rest % nh;
        let bt = rest / nh;
        if head < rot as usize {
            let half = hd / 2;
            let c = ((bt / t) % cos_batch as usize * t + bt % t) * hd + j;
            let mut other = 0.0f32;
            if j < half {
                other = -y[e + half];
            } else {
                other = y[e - half];
            }
            out[e] = y[e] * cos[c] + other * sin[c] * sign;
        } else {
            out[e] = y[e];
        }
    }
}

/// `(y [B, T, NH·Hd], cos, sin [1 or B, 1, T, Hd], rot, inverse) -> [B, T, NH·Hd]` as one kernel.
pub fn rotate<R: CubeRuntime, BT: BoolElement>(y: FloatTensor<B<R, BT>>, cos: FloatTensor<B<R, BT>>, sin: FloatTensor<B<R, BT>>, rot: usize, inverse: bool) -> FloatTensor<B<R, BT>> {
    let shape = y.shape.clone();
    let [out] = queue_n::<R, f32, i32, BT, _, 1>("kiln_rope", vec![y, cos, sin], [shape], (rot, inverse), |desc, (rot, inverse), handles| {
        let ([y, cos, sin], [out_desc]) = desc.as_fixed::<3, 1>();
        let [y, cos, sin] = [y, cos, sin].map(|t| into_contiguous(handles.get_float_tensor::<Inner<R, BT>>(t)));
        let [_, t, w] = y.meta.shape().dims::<3>();
        let [cb, _, _, hd] = cos.meta.shape().dims::<4>();
        let out = empty_like(&y, y.meta.shape().clone());
        let client = y.client.clone();
        let (count, dim) = elementwise_grid(&client, y.meta.shape().num_elements());
        let sign = if *inverse { -1.0f32 } else { 1.0 };
        // SAFETY: y and out hold B·T·NH·Hd f32 values (checked by the op's shape, allocated here),
        // cos and sin cb·T·Hd; a unit writes only its element, below out's length, and reads y
        // within its own head's Hd values and the tables at (b mod cb, t, j).
        unsafe {
            rope_kernel::launch_unchecked::<R>(&client, count, dim, y.into_array_arg(), cos.into_array_arg(), sin.into_array_arg(), out.clone().into_array_arg(), t as u32, (w / hd) as u32, hd as u32, *rot as u32, cb as u32, sign);
        }
        handles.register_float_tensor::<Inner<R, BT>>(&out_desc.id, out);
    });
    out
}
