//! Custom ops of Burn's fusion stream on the CubeCL backends (wgpu, CUDA): how Kiln's own kernels
//! (`optim_cube.rs`, `cube_kernels/`) run in order with Burn's.
//!
//! Burn's `Wgpu` and `Cuda` backends record tensor ops into a fusion stream, which a device thread
//! optimizes and launches. A kernel of Kiln's is queued on that stream as one op: its inputs and
//! new outputs are described to the stream, and when the stream reaches it, `run` gets the CubeCL
//! tensors behind those inputs, launches the kernel and registers the outputs.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

pub(crate) type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;
/// Kiln's GPU inner backends: Burn's `Wgpu` and `Cuda` are `Gpu<runtime, f32, i32, _>`.
pub(crate) type Gpu<R, F, I, BT> = Fusion<Cube<R, F, I, BT>>;
/// The fusion stream's tensor handles on runtime `R` (`FusionCubeRuntime` is that of every `Cube`).
pub(crate) type Handles<R> = HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>;

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

/// Queues `run` on the fusion stream as op `id` over `inputs` (at least one; float or int
/// tensors), with one new tensor of each shape and type in `outputs`; returns those outputs.
pub(crate) fn queue_typed<R, F, I, BT, S, const N: usize>(
    id: &'static str,
    inputs: Vec<FloatTensor<Gpu<R, F, I, BT>>>,
    outputs: [(Shape, DType); N],
    scalars: S,
    run: fn(&CustomOpIr, &S, &mut Handles<R>),
) -> [FloatTensor<Gpu<R, F, I, BT>>; N]
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
    S: Send + Sync + 'static,
{
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs = outputs.map(|(s, dt)| TensorIr::uninit(client.create_empty_handle(), s, dt));
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(id, &inputs, &outputs);
    let op = CustomOp::<R, S> { desc: desc.clone(), scalars, run };
    match <[_; N]>::try_from(client.register(streams, OperationIr::Custom(desc), op)) {
        Ok(o) => o,
        Err(o) => unreachable!("op {id} declares {N} outputs, fusion returned {}", o.len()),
    }
}

/// [`queue_typed`] for an op whose `N` outputs are all f32.
pub(crate) fn queue_n<R, F, I, BT, S, const N: usize>(
    id: &'static str,
    inputs: Vec<FloatTensor<Gpu<R, F, I, BT>>>,
    outputs: [Shape; N],
    scalars: S,
    run: fn(&CustomOpIr, &S, &mut Handles<R>),
) -> [FloatTensor<Gpu<R, F, I, BT>>; N]
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
    S: Send + Sync + 'static,
{
    queue_typed::<R, F, I, BT, S, N>(id, inputs, outputs.map(|s| (s, DType::F32)), scalars, run)
}

/// A fusion primitive as a `[N]` tensor.
pub(crate) fn float<R, F, I, BT>(t: FloatTensor<Gpu<R, F, I, BT>>) -> Tensor<Gpu<R, F, I, BT>, 1>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    Tensor::from_primitive(TensorPrimitive::Float(t))
}
