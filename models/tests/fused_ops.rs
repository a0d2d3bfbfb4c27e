//! The RMSNorm and SwiGLU ops (models/src/norm.rs, swiglu.rs) against Burn's composition on
//! Autodiff<Flex>: the output and the gradients of every input, untracked use, the registry's
//! choice, and a model trained through them.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};
use kiln_models::{norm, swiglu};

type B = Autodiff<Flex>;

fn random<const D: usize>(shape: [usize; D], sd: f64, offset: f32, seed: u64) -> Tensor<Flex, D> {
    let device = Default::default();
    <Flex as burn::tensor::backend::Backend>::seed(&device, seed);
    Tensor::<Flex, D>::random(shape, Distribution::Normal(0.0, sd), &device) + offset
}

/// The largest difference between `a` and `b`, relative to `b`'s largest value (at least 1).
fn rel<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar().max(1.0);
    (a - b).abs().max().into_scalar() / scale
}

/// `sum(f(x, w) · probe)` and its gradients: a loss that weighs every output differently.
fn norm_grads(x: &Tensor<Flex, 3>, w: &Tensor<Flex, 1>, probe: &Tensor<Flex, 3>, fused: bool) -> (Tensor<Flex, 3>, Tensor<Flex, 3>, Tensor<Flex, 1>) {
    let xa = Tensor::<B, 3>::from_inner(x.clone()).require_grad();
    let wa = Tensor::<B, 1>::from_inner(w.clone()).require_grad();
    let y = if fused { norm::fused_rms_norm::<Flex, NoCheckpointing>(xa.clone(), wa.clone(), 1e-5) } else { norm::decomposed(xa.clone(), wa.clone(), 1e-5) };
    let g = (y.clone() * Tensor::from_inner(probe.clone())).sum().backward();
    (y.inner(), xa.grad(&g).unwrap(), wa.grad(&g).unwrap())
}

#[test]
fn fused_rms_norm_matches_burns_ops() {
    // (shape, spread, offset): small rows, rows wider than a kernel's cube, large values.
    for (shape, sd, offset) in [([2, 3, 8], 1.0, 0.0), ([3, 7, 300], 2.0, 0.5), ([1, 4, 64], 0.01, 40.0)] {
        let x = random(shape, sd, offset, shape[2] as u64);
        let w = random([shape[2]], 0.5, 1.0, 5);
        let probe = random(shape, 1.0, 0.0, 6);
        let (yf, dxf, dwf) = norm_grads(&x, &w, &probe, true);
        let (yd, dxd, dwd) = norm_grads(&x, &w, &probe, false);
        let (ey, ex, ew) = (rel(yf, yd), rel(dxf.clone(), dxd), rel(dwf.clone(), dwd));
        println!("{shape:?}: output {ey:.1e}, dx {ex:.1e}, dw {ew:.1e}");
        assert!(ey < 1e-5 && ex < 1e-5 && ew < 1e-5, "{shape:?}: output {ey}, dx {ex}, dw {ew}");
        assert!(dxf.abs().max().into_scalar() > 0.0 && dwf.abs().max().into_scalar() > 0.0, "a gradient is all zeros");
    }
}

fn swiglu_grads(g: &Tensor<Flex, 3>, u: &Tensor<Flex, 3>, probe: &Tensor<Flex, 3>, fused: bool) -> [Tensor<Flex, 3>; 3] {
    let ga = Tensor::<B, 3>::from_inner(g.clone()).require_grad();
    let ua = Tensor::<B, 3>::from_inner(u.clone()).require_grad();
    let h = if fused { swiglu::fused_swiglu::<Flex, NoCheckpointing>(ga.clone(), ua.clone()) } else { swiglu::decomposed(ga.clone(), ua.clone()) };
    let grads = (h.clone() * Tensor::from_inner(probe.clone())).sum().backward();
    [h.inner(), ga.grad(&grads).unwrap(), ua.grad(&grads).unwrap()]
}

#[test]
fn fused_swiglu_matches_burns_ops() {
    // Gates far into both tails of the sigmoid, and near zero.
    for (sd, offset) in [(1.0, 0.0), (8.0, 0.0), (0.1, -3.0)] {
        let shape = [2, 5, 77];
        let (g, u, probe) = (random(shape, sd, offset, 1), random(shape, 1.0, 0.0, 2), random(shape, 1.0, 0.0, 3));
        let f = swiglu_grads(&g, &u, &probe, true);
        let d = swiglu_grads(&g, &u, &probe, false);
        for (name, (a, b)) in ["output", "dg", "du"].iter().zip(f.into_iter().zip(d)) {
            let e = rel(a, b);
            assert!(e < 1e-5, "gate spread {sd} offset {offset}: {name} differs by {e}");
        }
    }
}

#[test]
fn forward_only_and_the_registry() {
    let x = random([2, 3, 16], 1.0, 0.0, 8);
    let w = random([16], 0.5, 1.0, 9);
    let want = norm::decomposed(x.clone(), w.clone(), 1e-6);
    assert!(rel(norm::forward_only(x.clone(), w.clone(), 1e-6), want.clone()) < 1e-5);
    let untracked = norm::fused_rms_norm::<Flex, NoCheckpointing>(Tensor::from_inner(x.clone()), Tensor::from_inner(w.clone()), 1e-6);
    assert!(rel(untracked.inner(), want.clone()) < 1e-5);
    let (g, u) = (random([2, 3, 16], 2.0, 0.0, 10), random([2, 3, 16], 1.0, 0.0, 11));
    let untracked = swiglu::fused_swiglu::<Flex, NoCheckpointing>(Tensor::from_inner(g.clone()), Tensor::from_inner(u.clone()));
    assert!(rel(untracked.inner(), swiglu::decomposed(g.clone(), u.clone())) < 1e-5);

    // Registered: `fused = true` goes through the op; `false` is always Burn's composition.
    kiln_models::register_fused_ops::<Flex, NoCheckpointing>();
    assert!(kiln_models::registry::registered::<norm::RmsNormFn<B>>().is_some());
    assert!(kiln_models::registry::registered::<swiglu::SwigluFn<Flex>>().is_some());
    assert!(kiln_models::registry::registered::<norm::RmsNormFn<Autodiff<Flex, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>>>().is_none());
    assert!(rel(norm::rms_norm(x.clone(), w.clone(), 1e-6, true), want.clone()) < 1e-5);
    assert_eq!(norm::rms_norm(x, w, 1e-6, false).into_data(), want.into_data());
    assert!(rel(swiglu::swiglu(g.clone(), u.clone(), true), swiglu::decomposed(g.clone(), u.clone())) < 1e-5);
}

/// The linear op (models/src/linear.rs: one GEMM a product, transposes as flags; Burn's matmul
/// where no backend GEMM is registered) against Burn's matmul: the product and both gradients,
/// and the GEMM's four transpose combinations.
#[test]
fn fused_matmul_matches_burns_matmul() {
    use kiln_models::linear;
    let (m, k, n) = (13, 7, 5);
    let a = random([m, k], 1.0, 0.0, 20);
    let b = random([k, n], 1.0, 0.0, 21);
    let probe = random([m, n], 1.0, 0.0, 22);
    let grads = |fused: bool| {
        let (aa, ba) = (Tensor::<B, 2>::from_inner(a.clone()).require_grad(), Tensor::<B, 2>::from_inner(b.clone()).require_grad());
        let y = if fused { linear::fused_matmul::<Flex, NoCheckpointing>(aa.clone(), ba.clone()) } else { aa.clone().matmul(ba.clone()) };
        let g = (y.clone() * Tensor::from_inner(probe.clone())).sum().backward();
        (y.inner(), aa.grad(&g).unwrap(), ba.grad(&g).unwrap())
    };
    let ((yf, daf, dbf), (yd, dad, dbd)) = (grads(true), grads(false));
    let (ey, ea, eb) = (rel(yf, yd), rel(daf, dad), rel(dbf, dbd));
    assert!(ey < 1e-6 && ea < 1e-6 && eb < 1e-6, "product {ey}, da {ea}, db {eb}");
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let sa = if ta { a.clone().transpose() } else { a.clone() }; // stored [K, M] when ta
        let sb = if tb { b.clone().transpose() } else { b.clone() }; // stored [N, K] when tb
        let got = linear::gemm(sa, sb, ta, tb);
        assert_eq!(got.dims(), [m, n]);
        assert!(rel(got, a.clone().matmul(b.clone())) < 1e-6, "gemm with transposes ({ta}, {tb})");
    }
    kiln_models::register_fused_ops::<Flex, NoCheckpointing>();
    assert!(!linear::has_kernel::<Flex>(), "flex has no GEMM kernel of its own");
    assert!(rel(linear::matmul(a.clone(), b.clone(), true), a.clone().matmul(b.clone())) < 1e-6);
}

/// RoPE on the joined q/k/v projection (models/src/rope.rs) against `rope` on q and k apart,
/// differentiated by autodiff: output and gradient, with tables shared by the batch and with a
/// row of its own each (packed rows' positions), GQA (3 query heads, 1 key/value head).
#[test]
fn joined_rope_matches_rope_on_each_head() {
    use kiln_models::rope::{joined_rope, rope, rope_tables};
    let (b, t, h, k, hd) = (2, 5, 3, 1, 8);
    let device = Default::default();
    let (cos, sin) = rope_tables::<B>(16, hd, 10000.0, &device);
    let shared = (cos.clone().narrow(0, 0, t).unsqueeze::<4>(), sin.clone().narrow(0, 0, t).unsqueeze::<4>()); // [1, 1, T, Hd]
    let own = (Tensor::cat(vec![cos.clone().narrow(0, 0, t), cos.narrow(0, 3, t)], 0).reshape([b, 1, t, hd]), Tensor::cat(vec![sin.clone().narrow(0, 0, t), sin.narrow(0, 3, t)], 0).reshape([b, 1, t, hd]));
    let y = random([b, t, (h + 2 * k) * hd], 1.0, 0.0, 9);
    let probe = random([b, t, (h + 2 * k) * hd], 1.0, 0.0, 10);
    for (name, (cos, sin)) in [("shared tables", shared), ("a row each", own)] {
        let grads = |fused: bool| {
            let ya = Tensor::<B, 3>::from_inner(y.clone()).require_grad();
            let out = if fused {
                joined_rope::<Flex, NoCheckpointing>(ya.clone(), cos.clone(), sin.clone(), h + k)
            } else {
                let heads = ya.clone().reshape([b, t, h + 2 * k, hd]).swap_dims(1, 2); // [B, NH, T, Hd]
                let q = rope(heads.clone().narrow(1, 0, h), &cos, &sin);
                let kk = rope(heads.clone().narrow(1, h, k), &cos, &sin);
                Tensor::cat(vec![q, kk, heads.narrow(1, h + k, k)], 1).swap_dims(1, 2).reshape([b, t, (h + 2 * k) * hd])
            };
            let g = (out.clone() * Tensor::from_inner(probe.clone())).sum().backward();
            (out.inner(), ya.grad(&g).unwrap())
        };
        let ((of, gf), (od, gd)) = (grads(true), grads(false));
        let (eo, eg) = (rel(of.clone(), od), rel(gf, gd));
        println!("joined RoPE, {name}: output {eo:.1e}, gradient {eg:.1e}");
        assert!(eo < 1e-6 && eg < 1e-6, "joined RoPE, {name}: output {eo}, gradient {eg}");
        // v's heads pass through untouched.
        let v_part = |x: Tensor<Flex, 3>| x.reshape([b, t, h + 2 * k, hd]).narrow(2, h + k, k);
        assert_eq!(rel(v_part(of), v_part(y.clone())), 0.0);
    }
}

/// SwiGLU on the joined `[g | u]` (models/src/swiglu.rs) against SwiGLU on its halves: output
/// and gradient, gates deep in both tails of the sigmoid.
#[test]
fn joined_swiglu_matches_swiglu_on_its_halves() {
    let (b, t, f) = (2, 3, 11);
    let y = random([b, t, 2 * f], 6.0, 0.0, 21);
    let probe = random([b, t, f], 1.0, 0.0, 22);
    let grads = |joined: bool| {
        let ya = Tensor::<B, 3>::from_inner(y.clone()).require_grad();
        let h = if joined {
            swiglu::fused_swiglu_joined::<Flex, NoCheckpointing>(ya.clone())
        } else {
            swiglu::decomposed(ya.clone().narrow(2, 0, f), ya.clone().narrow(2, f, f))
        };
        let g = (h.clone() * Tensor::from_inner(probe.clone())).sum().backward();
        (h.inner(), ya.grad(&g).unwrap())
    };
    let ((hj, gj), (hd, gd)) = (grads(true), grads(false));
    let (eh, eg) = (rel(hj, hd), rel(gj, gd));
    println!("joined SwiGLU: output {eh:.1e}, gradient {eg:.1e}");
    assert!(eh < 1e-6 && eg < 1e-5, "joined SwiGLU: output {eh}, gradient {eg}");
}
