//! Row-major matmuls as cuBLASLt's column-major calls (issue 17: linear layers through
//! cuBLASLt). The argument mapping only, with a CPU emulation of what cuBLASLt computes from it;
//! the CUDA op that hands these arguments to `cublasLtMatmul` (through cudarc) reads them from
//! here, so a mistake in a transpose flag or a leading dimension shows up in these tests, on
//! any machine, not as wrong gradients on a GPU.
//!
//! Burn's tensors are row-major: `X[r, c]` sits at `x[r·c_len + c]`. Read column-major with
//! leading dimension `c_len`, the same buffer is `Xᵀ`. So the row-major product
//! `C[m, n] = op(A)[m, k] · op(B)[k, n]` is, column-major, `Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ`: cuBLASLt
//! gets B's buffer as its first operand and A's as its second, with `m` and `n` swapped and each
//! operand's transpose flag as the row-major one:
//!
//! ```text
//! row-major               cuBLASLt (column-major)
//! C[m, n] = A · B         m' = n, n' = m, k' = k
//! A stored [m, k] (N)     second operand, transb = false, ldb = k   ([k, m] stored: true, ldb = m)
//! B stored [k, n] (N)     first operand,  transa = false, lda = n   ([n, k] stored: true, lda = k)
//! C stored [m, n]         ldc = n
//! ```
//!
//! A linear layer `Y[N, O] = X[N, I] · W[I, O]` (W as `llama.rs` holds it) then needs three
//! calls: the forward, `dX = dY · Wᵀ` (W transposed by a flag, never copied) and
//! `dW = Xᵀ · dY` (X transposed by a flag), each with f32 accumulation.

/// The arguments of one `cublasLtMatmul` (as cudarc's `MatmulConfig` names them) and which
/// row-major buffer is its first operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtCall {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// A row-major product `C[m, n] = op(A)[m, k] · op(B)[k, n]`, where `trans_a` means A is stored
/// `[k, m]` (and `trans_b`, B stored `[n, k]`). cuBLASLt's first operand is B's buffer, its
/// second A's.
pub fn row_major(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> LtCall {
    LtCall {
        transa: trans_b,
        transb: trans_a,
        m: n,
        n: m,
        k,
        lda: if trans_b { k } else { n }, // B's stored row length
        ldb: if trans_a { m } else { k }, // A's stored row length
        ldc: n,
    }
}

/// The three calls of a linear layer `Y[rows, out] = X[rows, inp] · W[inp, out]`.
pub struct LinearCalls {
    /// `Y = X · W`: first operand W, second X.
    pub forward: LtCall,
    /// `dX[rows, inp] = dY · Wᵀ`: first operand W (transposed), second dY.
    pub grad_input: LtCall,
    /// `dW[inp, out] = Xᵀ · dY`: first operand dY, second X (transposed).
    pub grad_weight: LtCall,
}

pub fn linear(rows: usize, inp: usize, out: usize) -> LinearCalls {
    LinearCalls {
        forward: row_major(rows, out, inp, false, false),
        grad_input: row_major(rows, inp, out, false, true),
        grad_weight: row_major(inp, out, rows, true, false),
    }
}

/// What cuBLASLt computes for `call`, on the CPU: `C = alpha · op(A) · op(B) + beta · C`, all
/// column-major (`a` is the first operand's buffer, `b` the second's), accumulated in f64. The
/// emulation the tests run the mapping through.
pub fn emulate(call: &LtCall, alpha: f32, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
    let LtCall { transa, transb, m, n, k, lda, ldb, ldc } = *call;
    // Column-major element (r, col) of a matrix with leading dimension ld: x[r + col·ld].
    let at = |i: usize, p: usize| if transa { a[p + i * lda] } else { a[i + p * lda] }; // op(A)[i, p]
    let bt = |p: usize, j: usize| if transb { b[j + p * ldb] } else { b[p + j * ldb] }; // op(B)[p, j]
    for j in 0..n {
        for i in 0..m {
            let dot: f64 = (0..k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
            let o = &mut c[i + j * ldc];
            *o = (alpha as f64 * dot + beta as f64 * *o as f64) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row-major `x[r, c]` of a `rows × cols` matrix from a formula.
    fn matrix(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 7.0).collect()
    }

    /// Row-major `C = op(A) · op(B)` by the definition.
    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// Every transpose combination on non-square shapes (so that a swapped dimension or leading
    /// dimension reads out of place or out of bounds): the mapped call, emulated column-major
    /// over the row-major buffers, gives the row-major product; beta accumulates.
    #[test]
    fn row_major_products_map_to_column_major_calls() {
        let (m, n, k) = (5, 3, 4);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = matrix(m, k, 1); // stored [m, k], or [k, m] when ta (same length)
            let b = matrix(k, n, 2);
            let call = row_major(m, n, k, ta, tb);
            let mut c = vec![0.0f32; m * n];
            emulate(&call, 1.0, &b, &a, 0.0, &mut c); // first operand B, second A
            assert_eq!(c, naive(m, n, k, &a, ta, &b, tb), "trans_a {ta}, trans_b {tb}: {call:?}");
            let mut acc = c.clone();
            emulate(&call, 2.0, &b, &a, 1.0, &mut acc);
            assert!(acc.iter().zip(&c).all(|(x, y)| (x - 3.0 * y).abs() < 1e-5), "beta 1 accumulates");
        }
    }

    /// A linear layer's three calls against its definition: `Y = X·W`, `dX = dY·Wᵀ`,
    /// `dW = Xᵀ·dY`, with rows, inputs and outputs all different.
    #[test]
    fn a_linear_layers_forward_and_backward_calls() {
        let (rows, inp, out) = (6, 4, 3);
        let (x, w, dy) = (matrix(rows, inp, 3), matrix(inp, out, 4), matrix(rows, out, 5));
        let calls = linear(rows, inp, out);
        let mut y = vec![0.0f32; rows * out];
        emulate(&calls.forward, 1.0, &w, &x, 0.0, &mut y);
        assert_eq!(y, naive(rows, out, inp, &x, false, &w, false));
        let mut dx = vec![0.0f32; rows * inp];
        emulate(&calls.grad_input, 1.0, &w, &dy, 0.0, &mut dx);
        let wt: Vec<f32> = (0..out * inp).map(|i| w[(i % inp) * out + i / inp]).collect(); // Wᵀ [out, inp]
        assert_eq!(dx, naive(rows, inp, out, &dy, false, &wt, false));
        let mut dw = vec![0.0f32; inp * out];
        emulate(&calls.grad_weight, 1.0, &dy, &x, 0.0, &mut dw);
        let xt: Vec<f32> = (0..inp * rows).map(|i| x[(i % rows) * inp + i / rows]).collect(); // Xᵀ [inp, rows]
        assert_eq!(dw, naive(inp, out, rows, &xt, false, &dy, false));
        // The leading dimensions are the stored row lengths: W [inp, out] read transposed has
        // ld out; X [rows, inp] read transposed has ld inp.
        assert_eq!((calls.grad_input.transa, calls.grad_input.lda), (true, out));
        assert_eq!((calls.grad_weight.transb, calls.grad_weight.ldb), (true, inp));
    }
}
