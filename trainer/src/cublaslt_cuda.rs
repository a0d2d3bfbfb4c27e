//! cuBLASLt GEMMs on Burn's CUDA backend (`train.cublaslt`): the kernel behind
//! `kiln_models::linear`'s op, one `cublasLtMatmul` a GEMM, bf16, f16 or f32 inputs with f32
//! accumulation (`CUBLAS_COMPUTE_32F`), transposes as flags. The argument mapping (row-major to
//! column-major, leading dimensions) is `cublaslt.rs`'s, tested on the CPU.
//!
//! cuBLASLt is loaded at run time (cudarc's dynamic loading): nothing is needed to build, and
//! [`available`] says whether a machine has the library before any step. A GEMM is queued on
//! Burn's fusion stream like Kiln's other kernels (`fusion_op.rs`), and runs on CubeCL's own CUDA
//! stream, which the vendored cubecl-cuda hands out with each buffer's pointer
//! (`vendor/README.md`): stream order alone puts it after the kernels that wrote its inputs and
//! before those that read its output, with no host round trip. The fusion thread is not CubeCL's,
//! so the op makes the device's primary context (CubeCL's) current first.
//!
//! Each distinct GEMM (shape, transposes, type, operand alignment) asks cuBLASLt's heuristic for
//! an algorithm once; its descriptors and the algorithm are kept for the next step's same call.
//! cuBLASLt needs no autotuning, so the first step pays only the heuristic queries.

use std::collections::hash_map::Entry;
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

/// What makes two GEMMs the same to cuBLASLt's heuristic: the call, the operands' type, and the
/// alignment of the three pointers (A, B, D) in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    call: LtCall,
    ty: u32,
    align: [u32; 3],
}

/// One GEMM's descriptors and the algorithm the heuristic picked for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

/// cuBLASLt's state for one device: its context, a handle, the plans made so far, and for each
/// CUDA stream its GEMMs ran on, the workspace that stream's GEMMs share (one at a time, in
/// stream order; allocated at its first GEMM).
struct Lt {
    ctx: Arc<CudaContext>,
    handle: sys::cublasLtHandle_t,
    plans: HashMap<PlanKey, Plan>,
    workspaces: HashMap<usize, drv_sys::CUdeviceptr>,
}

// SAFETY: the handle, plans and workspaces are used only while the table's lock is held.
unsafe impl Send for Lt {}

/// The state of each device used so far.
fn table() -> &'static Mutex<HashMap<usize, Lt>> {
    static T: OnceLock<Mutex<HashMap<usize, Lt>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Opens cuBLASLt on CUDA device `index`: the library, the primary context and a handle.
fn open(index: usize) -> Result<Lt, String> {
    // SAFETY: only tries to load the library by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcublasLt was not found (it comes with the CUDA toolkit's cuBLAS; put the folder holding libcublasLt.so on LD_LIBRARY_PATH)".into());
    }
    let ctx = CudaContext::new(index).map_err(|e| format!("CUDA device {index}: {e:?}"))?;
    ctx.bind_to_thread().map_err(|e| format!("CUDA device {index}: {e:?}"))?;
    let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
    Ok(Lt { ctx, handle, plans: HashMap::new(), workspaces: HashMap::new() })
}

/// Runs `f` with device `index`'s cuBLASLt state (opened on first use), its context current.
fn with_lt<T>(index: usize, f: impl FnOnce(&mut Lt) -> Result<T, String>) -> Result<T, String> {
    let mut t = table().lock().map_err(|_| "cuBLASLt's state was poisoned by an earlier panic".to_string())?;
    let lt = match t.entry(index) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(open(index)?),
    };
    lt.ctx.bind_to_thread().map_err(|e| format!("CUDA device {index}: {e:?}"))?;
    f(lt)
}

/// Whether cuBLASLt works on CUDA device `index` (the library loads, a handle is made); the
/// error says why not.
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

fn err(what: &'static str) -> impl Fn(lt::CublasError) -> String {
    move |e| format!("{what}: {e:?}")
}

/// The largest power of two (at most 256) that divides a pointer: the alignment cuBLASLt's
/// heuristic may assume of it. It assumes 256 unless told; a tensor that is a row slice of a
/// larger buffer may start less aligned.
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// Makes the plan of GEMM `key`: its descriptors (f32 accumulation, the transposes as flags) and
/// the heuristic's first algorithm within the workspace.
fn plan(lt: &Lt, key: &PlanKey, ty: sys::cudaDataType) -> Result<Plan, String> {
    let call = &key.call;
    let (ar, ac) = if call.transa { (call.k, call.m) } else { (call.m, call.k) };
    let (br, bc) = if call.transb { (call.n, call.k) } else { (call.k, call.n) };
    let la = lt::create_matrix_layout(ty, ar as u64, ac as u64, call.lda as i64).map_err(err("layout A"))?;
    let lb = lt::create_matrix_layout(ty, br as u64, bc as u64, call.ldb as i64).map_err(err("layout B"))?;
    let ld = lt::create_matrix_layout(ty, call.m as u64, call.n as u64, call.ldc as i64).map_err(err("layout D"))?;
    let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F).map_err(err("matmul desc"))?;
    let made = Plan { desc, layouts: [la, lb, ld], algo: unsafe { std::mem::zeroed() } };
    let pref = lt::create_matmul_pref().map_err(err("preference"));
    let chosen = pref.clone().and_then(|pref| -> Result<sys::cublasLtMatmulAlgo_t, String> {
        for (attr, flag) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, call.transa),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, call.transb),
        ] {
            let op = flag as i32; // CUBLAS_OP_T = 1, CUBLAS_OP_N = 0
            // SAFETY: `desc` was created above; the attribute is an i32, passed with its size.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, (&op) as *const i32 as *const _, std::mem::size_of::<i32>()) }.map_err(err("transpose"))?;
        }
        let size = WORKSPACE;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // SAFETY: `pref` was created above; each attribute is passed with its type's size.
        unsafe { lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&size) as *const usize as *const _, std::mem::size_of::<usize>()) }.map_err(err("workspace size"))?;
        let [a, b, d] = key.align;
        for (attr, align) in [(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d)] {
            unsafe { lt::set_matmul_pref_attribute(pref, attr, (&align) as *const u32 as *const _, std::mem::size_of::<u32>()) }.map_err(err("alignment"))?;
        }
        // SAFETY: every descriptor was created above and is alive.
        let heuristic = unsafe { lt::get_matmul_algo_heuristic(lt.handle, desc, la, lb, ld, ld, pref) }.map_err(err("no algorithm for this GEMM"))?;
        Ok(heuristic.algo)
    });
    if let Ok(pref) = pref {
        // SAFETY: created above, not used after.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
    }
    match chosen {
        Ok(algo) => Ok(Plan { algo, ..made }),
        Err(e) => {
            destroy(made);
            Err(e)
        }
    }
}

fn destroy(plan: Plan) {
    // SAFETY: the plan's descriptors were created by `plan` and are not used after.
    unsafe {
        let _ = lt::destroy_matmul_desc(plan.desc);
        for l in plan.layouts {
            let _ = lt::destroy_matrix_layout(l);
        }
    }
}

/// One `cublasLtMatmul`: `D = op(first) · op(second)` column-major as `call` describes it, the
/// operands of type `ty`, D of type `ty` too, accumulated in f32, queued on `stream`.
///
/// # Safety
/// `first`, `second` and `d` point at device memory of `lt`'s device holding the matrices `call`
/// describes (with its leading dimensions), and `stream` is a stream of that device on which
/// every write of the operands was queued before.
unsafe fn matmul(lt: &mut Lt, call: &LtCall, first: u64, second: u64, d: u64, ty: sys::cudaDataType, stream: drv_sys::CUstream) -> Result<(), String> {
    let key = PlanKey { call: *call, ty: ty as u32, align: [alignment(first), alignment(second), alignment(d)] };
    if !lt.plans.contains_key(&key) {
        let made = plan(lt, &key, ty)?;
        lt.plans.insert(key, made);
        tracing::debug!("cuBLASLt: plan {} made, for {call:?} of {ty:?} (alignments {:?})", lt.plans.len(), key.align);
    }
    let workspace = match lt.workspaces.entry(stream as usize) {
        Entry::Occupied(e) => *e.get(),
        // SAFETY: a plain device allocation in the device's context (current: `with_lt`); freed
        // never (one a stream).
        Entry::Vacant(e) => *e.insert(unsafe { drv::malloc_sync(WORKSPACE) }.map_err(|e| format!("cuBLASLt's workspace: {e:?}"))?),
    };
    let p = &lt.plans[&key];
    let [la, lb, ld] = p.layouts;
    let (alpha, beta) = (1.0f32, 0.0f32);
    unsafe {
        lt::matmul(
            lt.handle,
            p.desc,
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
            &p.algo,
            workspace as *mut _,
            WORKSPACE,
            stream as _,
        )
    }
    .map_err(err("cublasLtMatmul"))
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
                    // The stream CubeCL queued the inputs' writes on (`get_resource` aligned the
                    // three buffers' streams with it); its next kernels follow the GEMM there.
                    let stream = rd.resource().stream;
                    if stream.is_null() {
                        return Err("cubecl-cuda gave no stream with the buffer (Kiln needs the vendored cubecl-cuda, vendor/README.md)".to_string());
                    }
                    // cuBLASLt's first operand is B's buffer, its second A's (cublaslt.rs).
                    let (pa, pb, pd) = (ra.resource().ptr, rb.resource().ptr, rd.resource().ptr);
                    // SAFETY: the three pointers are live CubeCL allocations on this device,
                    // contiguous, of the shapes `call` was mapped from. The GEMM is queued on
                    // CubeCL's stream after every kernel that wrote them; a buffer freed after
                    // this closure is reused only by work queued later on the same stream.
                    with_lt(a.device.index, |lt| unsafe { matmul(lt, &call, pb, pa, pd, ty, stream) })
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
