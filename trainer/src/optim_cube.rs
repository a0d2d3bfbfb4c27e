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
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
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

/// The update as a custom op of the fusion stream: `(p, g, m, v, scale) -> (p', m', v')`.
fn adamw<R, F, I, BT>(
    p: Tensor<Fusion<CubeBackend<R, F, I, BT>>, 1>,
    g: Tensor<Fusion<CubeBackend<R, F, I, BT>>, 1>,
    m: Tensor<Fusion<CubeBackend<R, F, I, BT>>, 1>,
    v: Tensor<Fusion<CubeBackend<R, F, I, BT>>, 1>,
    scale: Tensor<Fusion<CubeBackend<R, F, I, BT>>, 1>,
    s: AdamWScalars,
) -> [Tensor<Fusion<CubeBackend<R, F, I, BT>>, 1>; 3]
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;

    #[derive(Debug)]
    struct AdamWOp<R, F, I, BT> {
        desc: CustomOpIr,
        s: AdamWScalars,
        _b: core::marker::PhantomData<(R, F, I, BT)>,
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
        Operation<<B<R, F, I, BT> as FusionBackend>::FusionRuntime> for AdamWOp<R, F, I, BT>
    {
        fn execute(
            &self,
            handles: &mut HandleContainer<<<B<R, F, I, BT> as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ([p, g, m, v, scale], [p_out, m_out, v_out]) = self.desc.as_fixed();
            let inputs = [p, g, m, v, scale].map(|t| handles.get_float_tensor::<B<R, F, I, BT>>(t));
            let [po, mo, vo] = launch(inputs, &self.s);
            handles.register_float_tensor::<B<R, F, I, BT>>(&p_out.id, po);
            handles.register_float_tensor::<B<R, F, I, BT>>(&m_out.id, mo);
            handles.register_float_tensor::<B<R, F, I, BT>>(&v_out.id, vo);
        }
    }

    let [p, g, m, v, scale] = [p, g, m, v, scale].map(|t| t.into_primitive().tensor());
    let client = p.client.clone();
    let streams = OperationStreams::with_inputs([&p, &g, &m, &v, &scale]);
    let out = || TensorIr::uninit(client.create_empty_handle(), p.shape.clone(), DType::F32);
    let outputs = [out(), out(), out()];
    let inputs = [p, g, m, v, scale].map(|t| t.into_ir());
    let desc = CustomOpIr::new("kiln_adamw", &inputs, &outputs);
    let op = AdamWOp::<R, F, I, BT> { desc: desc.clone(), s, _b: core::marker::PhantomData };
    let outs: [_; 3] = match client.register(streams, OperationIr::Custom(desc), op).try_into() {
        Ok(o) => o,
        Err(o) => unreachable!("the op declares 3 outputs, fusion returned {}", o.len()),
    };
    outs.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// The sum of the squares of every gradient, `[1]`, as one custom op of the fusion stream: inside
/// it, `sum(g²)` of each gradient and the total run directly on the CubeCL backend (about 2 kernels
/// a gradient), instead of 3 fusion ops a gradient (square, sum, add to the running total).
fn squared_norm<R, F, I, BT>(grads: Vec<FloatTensor<Fusion<CubeBackend<R, F, I, BT>>>>) -> Tensor<Fusion<CubeBackend<R, F, I, BT>>, 1>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;

    #[derive(Debug)]
    struct SquaredNormOp<R, F, I, BT> {
        desc: CustomOpIr,
        _b: core::marker::PhantomData<(R, F, I, BT)>,
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
        Operation<<B<R, F, I, BT> as FusionBackend>::FusionRuntime> for SquaredNormOp<R, F, I, BT>
    {
        fn execute(
            &self,
            handles: &mut HandleContainer<<<B<R, F, I, BT> as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let sums: Vec<_> = self
                .desc
                .inputs
                .iter()
                .map(|t| {
                    let g = handles.get_float_tensor::<B<R, F, I, BT>>(t);
                    let g = <B<R, F, I, BT> as FloatTensorOps<_>>::float_reshape(g.clone(), Shape::new([g.meta.num_elements()])); // [N]
                    <B<R, F, I, BT> as FloatTensorOps<_>>::float_sum(<B<R, F, I, BT> as FloatTensorOps<_>>::float_mul(g.clone(), g)) // [1]
                })
                .collect();
            let all = <B<R, F, I, BT> as FloatTensorOps<_>>::float_cat(sums, 0); // [P]
            let total = <B<R, F, I, BT> as FloatTensorOps<_>>::float_sum(all); // [1]
            handles.register_float_tensor::<B<R, F, I, BT>>(&self.desc.outputs[0].id, total);
        }
    }

    let client = grads[0].client.clone();
    let streams = OperationStreams::with_inputs(grads.iter());
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([1]), DType::F32);
    let inputs: Vec<TensorIr> = grads.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new("kiln_squared_norm", &inputs, &[out]);
    let op = SquaredNormOp::<R, F, I, BT> { desc: desc.clone(), _b: core::marker::PhantomData };
    let mut outs = client.register(streams, OperationIr::Custom(desc), op);
    match outs.pop() {
        Some(t) if outs.is_empty() => Tensor::from_primitive(TensorPrimitive::Float(t)),
        _ => unreachable!("the op declares 1 output"),
    }
}

/// Registers the kernel as the AdamW update of `Fusion<CubeBackend<R, ..>>` (Burn's `Wgpu` and
/// `Cuda` with fusion, the inner backends of training), and the one-op squared gradient norm.
pub fn register<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    let f: AdamWFn<Fusion<CubeBackend<R, F, I, BT>>> = adamw::<R, F, I, BT>;
    kiln_models::registry::register(f);
    let n: SquaredNormFn<Fusion<CubeBackend<R, F, I, BT>>> = squared_norm::<R, F, I, BT>;
    kiln_models::registry::register(n);
}
