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
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

use crate::optim::{AdamWFn, AdamWScalars, SquaredNormFn};

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel(
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
    let cube_dim = CubeDim::new(&client, n);
    let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
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

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;
/// Kiln's GPU inner backends: Burn's `Wgpu` and `Cuda` are `Gpu<runtime, f32, i32, _>`.
type Gpu<R, F, I, BT> = Fusion<Cube<R, F, I, BT>>;
/// The fusion stream's tensor handles on runtime `R` (`FusionCubeRuntime` is that of every `Cube`).
type Handles<R> = HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>;

/// A custom op of the fusion stream: when the stream executes it, `run` gets the op's description
/// (its input and output tensors), the op's scalars `S` and the handles, and registers every
/// output.
struct CustomOp<R: CubeRuntime, S> {
    desc: CustomOpIr,
    scalars: S,
    run: fn(&CustomOpIr, &S, &mut Handles<R>),
}

impl<R: CubeRuntime, S> core::fmt::Debug for CustomOp<R, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "CustomOp({})", self.desc.id)
    }
}

impl<R: CubeRuntime, S: Send + Sync + 'static> Operation<FusionCubeRuntime<R>> for CustomOp<R, S> {
    fn execute(&self, handles: &mut Handles<R>) {
        (self.run)(&self.desc, &self.scalars, handles)
    }
}

/// Queues `run` on the fusion stream as op `id` over `inputs` (at least one), with one new f32
/// tensor of each shape in `outputs`; returns those outputs.
fn queue<R, F, I, BT, S>(
    id: &'static str,
    inputs: Vec<FloatTensor<Gpu<R, F, I, BT>>>,
    outputs: Vec<Shape>,
    scalars: S,
    run: fn(&CustomOpIr, &S, &mut Handles<R>),
) -> Vec<FloatTensor<Gpu<R, F, I, BT>>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
    S: Send + Sync + 'static,
{
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs: Vec<TensorIr> = outputs.into_iter().map(|s| TensorIr::uninit(client.create_empty_handle(), s, DType::F32)).collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(id, &inputs, &outputs);
    let op = CustomOp::<R, S> { desc: desc.clone(), scalars, run };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// A fusion primitive as a `[N]` tensor.
fn float<R, F, I, BT>(t: FloatTensor<Gpu<R, F, I, BT>>) -> Tensor<Gpu<R, F, I, BT>, 1>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    Tensor::from_primitive(TensorPrimitive::Float(t))
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
    let outs = queue::<R, F, I, BT, _>("kiln_adamw", inputs, vec![shape; 3], s, |desc, s, handles| {
        let ([p, g, m, v, scale], outs) = desc.as_fixed::<5, 3>();
        let inputs = [p, g, m, v, scale].map(|t| handles.get_float_tensor::<Cube<R, F, I, BT>>(t));
        for (out, t) in outs.iter().zip(launch(inputs, s)) {
            handles.register_float_tensor::<Cube<R, F, I, BT>>(&out.id, t);
        }
    });
    match <[_; 3]>::try_from(outs) {
        Ok(o) => o.map(float),
        Err(o) => unreachable!("the op declares 3 outputs, fusion returned {}", o.len()),
    }
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
    let mut outs = queue::<R, F, I, BT, _>("kiln_squared_norm", grads, vec![Shape::new([1])], (), |desc, (), handles| {
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
    match outs.pop() {
        Some(t) if outs.is_empty() => float(t),
        _ => unreachable!("the op declares 1 output"),
    }
}

/// Registers the kernel as the AdamW update of `Fusion<CubeBackend<R, ..>>` (Burn's `Wgpu` and
/// `Cuda` with fusion, the inner backends of training), and the one-op squared gradient norm.
pub fn register<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    let f: AdamWFn<Gpu<R, F, I, BT>> = adamw::<R, F, I, BT>;
    kiln_models::registry::register(f);
    let n: SquaredNormFn<Gpu<R, F, I, BT>> = squared_norm::<R, F, I, BT>;
    kiln_models::registry::register(n);
}
