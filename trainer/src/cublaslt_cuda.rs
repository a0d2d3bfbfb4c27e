//! cuBLASLt GEMMs on Burn's CUDA backend (`train.cublaslt`): the kernel behind
//! `kiln_models::linear`'s op, one `cublasLtMatmul` a GEMM, bf16, f16 or f32 inputs with f32
//! accumulation (`CUBLAS_COMPUTE_32F`), transposes as flags. The argument mapping (row-major to
//! column-major, leading dimensions) is `cublaslt.rs`'s, tested on the CPU.
//!
//! cuBLASLt is loaded at run time (cudarc's dynamic loading): nothing is needed to build, and
//! [`available`] says whether a machine has the library before any step. A GEMM is queued on
//! Burn's fusion stream like Kiln's other kernels (`fusion_op.rs`). CubeCL's CUDA stream is
//! private to cubecl-cuda, so the op orders itself by synchronising: CubeCL's stream before the
//! call (every kernel that wrote the inputs has finished), Kiln's own stream after it (the output
//! is written before CubeCL's next kernel reads it). Correct, at the cost of two host round trips
//! a GEMM; a cubecl-cuda patched to expose its stream would remove them. The fusion thread is not
//! CubeCL's, so the op makes the device's primary context (CubeCL's) current first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::BoolElement;
use cubecl::cuda::CudaRuntime;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext};

use crate::cublaslt::{row_major, LtCall};
use crate::fusion_op::{queue_typed, Cube, Gpu};

type G<BT> = Gpu<CudaRuntime, f32, i32, BT>;
type Inner<BT> = Cube<CudaRuntime, f32, i32, BT>;

/// cuBLASLt's workspace: 32 MiB, what cuBLAS itself takes on Hopper.
const WORKSPACE: usize = 32 << 20;

/// One device's cuBLASLt state.
struct Lt {
    ctx: Arc<CudaContext>,
    handle: sys::cublasLtHandle_t,
    stream: drv_sys::CUstream,
    workspace: drv_sys::CUdeviceptr,
}

// SAFETY: the handle, stream and workspace are used only while the table's lock is held.
unsafe impl Send for Lt {}

fn table() -> &'static Mutex<HashMap<usize, Lt>> {
    static T: OnceLock<Mutex<HashMap<usize, Lt>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Opens cuBLASLt on CUDA device `index`: the library, the primary context, a handle, a stream and
/// the workspace.
fn open(index: usize) -> Result<Lt, String> {
    // SAFETY: only tries to load the library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcublasLt was not found (it comes with the CUDA toolkit's cuBLAS; put the folder holding libcublasLt.so on LD_LIBRARY_PATH)".into());
    }
    let ctx = CudaContext::new(index).map_err(|e| format!("CUDA device {index}: {e:?}"))?;
    ctx.bind_to_thread().map_err(|e| format!("CUDA device {index}: {e:?}"))?;
    let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
    let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| format!("a CUDA stream: {e:?}"))?;
    // SAFETY: a plain device allocation in the context bound above; freed never (one a device).
    let workspace = unsafe { drv::malloc_sync(WORKSPACE) }.map_err(|e| format!("cuBLASLt's workspace: {e:?}"))?;
    Ok(Lt { ctx, handle, stream, workspace })
}

/// Runs `f` with device `index`'s cuBLASLt state (opened on first use), its context current.
fn with_lt<T>(index: usize, f: impl FnOnce(&Lt) -> Result<T, String>) -> Result<T, String> {
    let mut t = table().lock().map_err(|_| "cuBLASLt's state was poisoned by an earlier panic".to_string())?;
    if !t.contains_key(&index) {
        let opened = open(index)?;
        t.insert(index, opened);
    }
    let lt = &t[&index];
    lt.ctx.bind_to_thread().map_err(|e| format!("CUDA device {index}: {e:?}"))?;
    f(lt)
}

/// Whether cuBLASLt works on CUDA device `index` (the library loads, a handle and a workspace are
/// made); the error says why not.
pub fn available(index: usize) -> Result<(), String> {
    with_lt(index, |_| Ok(()))
}

/// cuBLASLt's type for a tensor's dtype, where it has one Kiln uses.
fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        _ => None,
    }
}

/// One `cublasLtMatmul`: `D = op(first) · op(second)` column-major as `call` describes it, the
/// operands of type `ty`, D of type `ty` too, accumulated in f32, on `lt`'s stream.
///
/// # Safety
/// `first`, `second` and `d` point at device memory of `lt`'s device holding the matrices `call`
/// describes (with its leading dimensions), and nothing else writes them until the stream is done.
unsafe fn matmul(lt: &Lt, call: &LtCall, first: u64, second: u64, d: u64, ty: sys::cudaDataType) -> Result<(), String> {
    fn err(what: &'static str) -> impl Fn(lt::CublasError) -> String {
        move |e| format!("{what}: {e:?}")
    }
    let (ar, ac) = if call.transa { (call.k, call.m) } else { (call.m, call.k) };
    let (br, bc) = if call.transb { (call.n, call.k) } else { (call.k, call.n) };
    let la = lt::create_matrix_layout(ty, ar as u64, ac as u64, call.lda as i64).map_err(err("layout A"))?;
    let lb = lt::create_matrix_layout(ty, br as u64, bc as u64, call.ldb as i64).map_err(err("layout B"))?;
    let ld = lt::create_matrix_layout(ty, call.m as u64, call.n as u64, call.ldc as i64).map_err(err("layout D"))?;
    let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F).map_err(err("matmul desc"))?;
    let pref = lt::create_matmul_pref().map_err(err("preference"))?;
    let run = || -> Result<(), String> {
        for (attr, flag) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, call.transa),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, call.transb),
        ] {
            let op = flag as i32; // CUBLAS_OP_T = 1, CUBLAS_OP_N = 0
            lt::set_matmul_desc_attribute(desc, attr, (&op) as *const i32 as *const _, std::mem::size_of::<i32>()).map_err(err("transpose"))?;
        }
        let size = WORKSPACE;
        lt::set_matmul_pref_attribute(pref, sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&size) as *const usize as *const _, std::mem::size_of::<usize>())
            .map_err(err("workspace size"))?;
        // The heuristic assumes 256-byte-aligned operands unless told otherwise; a tensor that is
        // a row slice of a larger buffer may start less aligned.
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        for (attr, ptr) in [(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, first), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, second), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d)] {
            let align: u32 = 1 << ptr.trailing_zeros().min(8);
            lt::set_matmul_pref_attribute(pref, attr, (&align) as *const u32 as *const _, std::mem::size_of::<u32>()).map_err(err("alignment"))?;
        }
        let heuristic = lt::get_matmul_algo_heuristic(lt.handle, desc, la, lb, ld, ld, pref).map_err(err("no algorithm for this GEMM"))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        lt::matmul(
            lt.handle,
            desc,
            (&alpha) as *const f32 as *const _,
            (&beta) as *const f32 as *const _,
            first as *const _,
            la,
            second as *const _,
            lb,
            d as *const _,
            ld,
            d as *mut _,
            ld,
            &heuristic.algo,
            lt.workspace as *mut _,
            WORKSPACE,
            lt.stream as _,
        )
        .map_err(err("cublasLtMatmul"))?;
        drv::stream::synchronize(lt.stream).map_err(|e| format!("the GEMM's stream: {e:?}"))
    };
    let result = run();
    let _ = lt::destroy_matmul_pref(pref);
    let _ = lt::destroy_matmul_desc(desc);
    for l in [la, lb, ld] {
        let _ = lt::destroy_matrix_layout(l);
    }
    result
}

/// `op(a) · op(b)` through cuBLASLt: `a: [M, K]` (stored `[K, M]` when `trans_a`), `b: [K, N]`
/// (stored `[N, K]` when `trans_b`); `[M, N]` in the inputs' type. Registered as
/// `kiln_models::linear::GemmKernel` of Burn's `Cuda` (f32, bf16 and f16 tensors).
pub fn gemm<BT: BoolElement>(a: FloatTensor<G<BT>>, b: FloatTensor<G<BT>>, trans_a: bool, trans_b: bool) -> FloatTensor<G<BT>> {
    let ([a0, a1], [b0, b1]) = (a.shape.dims::<2>(), b.shape.dims::<2>());
    let (m, k) = if trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if trans_b { (b1, b0) } else { (b0, b1) };
    // A caller's mistake, caught here rather than as an out-of-bounds read on the GPU.
    assert_eq!(k, kb, "GEMM of [{m}, {k}] by [{kb}, {n}] (transposes {trans_a}, {trans_b}): the inner sizes differ");
    assert_eq!(a.dtype, b.dtype, "GEMM of {:?} by {:?}: one type for both operands", a.dtype, b.dtype);
    let dtype = a.dtype;
    let [out] = queue_typed::<CudaRuntime, f32, i32, BT, _, 1>("kiln_cublaslt_gemm", vec![a, b], [(Shape::new([m, n]), dtype)], (trans_a, trans_b, m, n, k), |desc, &(ta, tb, m, n, k), handles| {
        let ([a, b], [out]) = desc.as_fixed::<2, 1>();
        let [a, b] = [a, b].map(|t| into_contiguous(handles.get_float_tensor::<Inner<BT>>(t)));
        let d = empty_device_contiguous_dtype(a.client.clone(), a.device.clone(), Shape::new([m, n]), a.dtype);
        let ty = data_type(a.dtype);
        let result = match ty {
            _ if m == 0 || n == 0 || k == 0 => Ok(()),
            None => Err(format!("cuBLASLt GEMM of {:?} tensors; Kiln's op passes f32, bf16 or f16 only", a.dtype)),
            Some(ty) => {
                let res = |t: &burn_cubecl::tensor::CubeTensor<CudaRuntime>| t.client.get_resource(t.handle.clone()).map_err(|e| format!("a GEMM operand's device memory: {e:?}"));
                let call = row_major(m, n, k, ta, tb);
                (|| {
                    let (ra, rb, rd) = (res(&a)?, res(&b)?, res(&d)?);
                    cubecl::future::block_on(a.client.sync()).map_err(|e| format!("CubeCL's stream: {e:?}"))?;
                    // cuBLASLt's first operand is B's buffer, its second A's (cublaslt.rs).
                    let (pa, pb, pd) = (ra.resource().ptr, rb.resource().ptr, rd.resource().ptr);
                    // SAFETY: the three pointers are live CubeCL allocations on this device (the
                    // resources held until the stream is synchronised), contiguous, of the shapes
                    // `call` was mapped from; CubeCL's stream was synchronised, so nothing else
                    // writes them while the GEMM runs.
                    with_lt(a.device.index, |lt| unsafe { matmul(lt, &call, pb, pa, pd, ty) })
                })()
            }
        };
        // A device-side failure cannot be returned through the fusion stream; Kiln's panic hook
        // ends the run with this message (and `available` was checked before the first step).
        if let Err(e) = result {
            panic!("cuBLASLt GEMM [{m}, {k}] x [{k}, {n}] failed: {e}");
        }
        let d = if k == 0 { Inner::<BT>::float_zeros(Shape::new([m, n]), &a.device, a.dtype.into()) } else { d };
        handles.register_float_tensor::<Inner<BT>>(&out.id, d);
    });
    out
}

/// Registers [`gemm`] as the GEMM of Burn's `Cuda` inner backend (`kiln_models::linear`).
pub fn register<BT: BoolElement>() {
    kiln_models::registry::register(kiln_models::linear::GemmKernel::<G<BT>> { gemm: gemm::<BT> });
}
