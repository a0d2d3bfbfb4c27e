//! AdamW as one GPU kernel per parameter, for Burn's CubeCL backends behind fusion (wgpu, CUDA).
//!
//! Written with Burn's tensor ops ([`crate::optim`]), one parameter's update is about 19 ops
//! (moments, bias correction, decay, clip scale, reshapes), and a bench-gpu model has 111
//! parameters: some 2,000 ops a step that Burn's fusion layer records, optimizes and launches one
//! by one on the host, work that may bound a GPU step (BENCHMARKS.md, "Ops a step on the GPU
//! path"). Here the same update is one custom op for the fusion stream and one kernel:
//!
//! ```text
//! g' = g · scale                      (scale: the clip factor, [1] on the device)
//! m' = β1·m + (1 − β1)·g'             v' = β2·v + (1 − β2)·g'²
//! p' = p − shrink·p − lr · (m'·k1) / (√(v'·k2) + ε)     k1, k2: bias corrections, shrink = lr·decay
//! ```
//!
//! All tensors are `[N]` and f32 (Kiln keeps master weights and moments in f32); the optimizer
//! uses the tensor ops for any other dtype. `scale` is `[1]`.
//!
//! The clip's global gradient norm is one custom op too ([`squared_norm`]): one fusion op for all
//! gradients instead of three per gradient.

use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;

use crate::fusion_op::{float, queue_n, Cube, Gpu};
use crate::optim::{AdamWFn, AdamWScalars, SquaredNormFn};

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_kernel(
    p: &Array<f32>,
    g: &Array<f32>,
    m: &Array<f32>,
    v: &Array<f32>,
    scale: &Array<f32>,
    p_out: &mut Array<f32>,
    m_out: &mut Array<f32>,
    v_out: &mut Array<f32>,
    lr: f32,
    shrink: f32,
    b1: f32,
    b2: f32,
    k1: f32,
    k2: f32,
    eps: f32,
) {
    let i = ABSOLUTE_POS;
    if i < p.len() {
        let gi = g[i] * scale[0];
        let mi = m[i] * b1 + gi * (1.0 - b1);
        let vi = v[i] * b2 + gi * gi * (1.0 - b2);
        m_out[i] = mi;
        v_out[i] = vi;
        let update = (mi * k1) / (f32::sqrt(vi * k2) + eps);
        let pi = p[i];
        p_out[i] = pi - pi * shrink - update * lr;
    }
}

/// Launches the kernel on contiguous copies of the inputs; returns `(p', m', v')`.
fn launch<R: CubeRuntime>(inputs: [CubeTensor<R>; 5], s: &AdamWScalars) -> [CubeTensor<R>; 3] {
    let [p, g, m, v, scale] = inputs.map(into_contiguous);
    let n = p.meta.num_elements();
    let client = p.client.clone();
    let out = || empty_device_dtype(client.clone(), p.device.clone(), p.meta.shape().clone(), DType::F32);
    let (p_out, m_out, v_out) = (out(), out(), out());
    let (cube_count, cube_dim) = crate::cube_kernels::elementwise_grid(&client, n);
    // SAFETY: p, g, m, v and the three outputs hold `n` f32 values each (the optimizer calls
    // this only for f32 tensors of one parameter's size; the outputs are allocated above with p's
    // shape), `scale` holds one, and the kernel touches index `i` only when `i < n`.
    unsafe {
        adamw_kernel::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            p.into_array_arg(),
            g.into_array_arg(),
            m.into_array_arg(),
            v.into_array_arg(),
            scale.into_array_arg(),
            p_out.clone().into_array_arg(),
            m_out.clone().into_array_arg(),
            v_out.clone().into_array_arg(),
            s.lr,
            s.shrink,
            s.b1,
            s.b2,
            s.k1,
            s.k2,
            s.eps,
        );
    }
    [p_out, m_out, v_out]
}

/// The update as a custom op of the fusion stream: `(p, g, m, v, scale) -> (p', m', v')`.
fn adamw<R, F, I, BT>(
    p: Tensor<Gpu<R, F, I, BT>, 1>,
    g: Tensor<Gpu<R, F, I, BT>, 1>,
    m: Tensor<Gpu<R, F, I, BT>, 1>,
    v: Tensor<Gpu<R, F, I, BT>, 1>,
    scale: Tensor<Gpu<R, F, I, BT>, 1>,
    s: AdamWScalars,
) -> [Tensor<Gpu<R, F, I, BT>, 1>; 3]
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let shape = p.shape();
    let inputs = [p, g, m, v, scale].map(|t| t.into_primitive().tensor()).into();
    let outs = queue_n::<R, F, I, BT, _, 3>("kiln_adamw", inputs, [shape.clone(), shape.clone(), shape], s, |desc, s, handles| {
        let ([p, g, m, v, scale], outs) = desc.as_fixed::<5, 3>();
        let inputs = [p, g, m, v, scale].map(|t| handles.get_float_tensor::<Cube<R, F, I, BT>>(t));
        for (out, t) in outs.iter().zip(launch(inputs, s)) {
            handles.register_float_tensor::<Cube<R, F, I, BT>>(&out.id, t);
        }
    });
    outs.map(float)
}

/// The sum of the squares of every gradient, `[1]`, as one custom op of the fusion stream: inside
/// it, `sum(g²)` of each gradient and the total run directly on the CubeCL backend (about 2 kernels
/// a gradient), instead of 3 fusion ops a gradient (square, sum, add to the running total).
/// `grads` is not empty.
fn squared_norm<R, F, I, BT>(grads: Vec<FloatTensor<Gpu<R, F, I, BT>>>) -> Tensor<Gpu<R, F, I, BT>, 1>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [total] = queue_n::<R, F, I, BT, _, 1>("kiln_squared_norm", grads, [Shape::new([1])], (), |desc, (), handles| {
        let sums: Vec<_> = desc
            .inputs
            .iter()
            .map(|t| {
                let g = handles.get_float_tensor::<Cube<R, F, I, BT>>(t);
                // A backend's sum may keep the input's rank ([1, 1] for a matrix): make it [1].
                let s = Cube::<R, F, I, BT>::float_sum(Cube::<R, F, I, BT>::float_mul(g.clone(), g));
                Cube::<R, F, I, BT>::float_reshape(s, Shape::new([1])) // [1]
            })
            .collect();
        let total = Cube::<R, F, I, BT>::float_sum(Cube::<R, F, I, BT>::float_cat(sums, 0)); // [P] -> [1]
        handles.register_float_tensor::<Cube<R, F, I, BT>>(&desc.outputs[0].id, total);
    });
    float(total)
}

/// Registers the kernel as the AdamW update of `Fusion<CubeBackend<R, ..>>` (Burn's `Wgpu` and
/// `Cuda` with fusion, the inner backends of training), and the one-op squared gradient norm.
pub fn register<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    let f: AdamWFn<Gpu<R, F, I, BT>> = adamw::<R, F, I, BT>;
    kiln_models::registry::register(f);
    let n: SquaredNormFn<Gpu<R, F, I, BT>> = squared_norm::<R, F, I, BT>;
    kiln_models::registry::register(n);
}
