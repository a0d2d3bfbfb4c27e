//! The fused causal attention op (models/src/attention.rs) against Burn's decomposed attention
//! on Autodiff<Flex>: outputs and the gradients of q, k and v.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use kiln_models::attention::causal_attention;

type B = Autodiff<Flex>;

fn max_abs_diff(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn fused_attention_matches_the_decomposed_one() {
    let device = Default::default();
    for (b, h, t, hd) in [(2, 3, 17, 8), (1, 2, 1, 4), (1, 1, 64, 16)] {
        let r = |seed| {
            <Flex as burn::tensor::backend::Backend>::seed(&device, seed);
            Tensor::<Flex, 4>::random([b, h, t, hd], Distribution::Normal(0.0, 1.0), &device)
        };
        let (q0, k0, v0, w) = (r(1), r(2), r(3), r(4));
        let run = |fused: bool| {
            let q = Tensor::<B, 4>::from_inner(q0.clone()).require_grad();
            let k = Tensor::<B, 4>::from_inner(k0.clone()).require_grad();
            let v = Tensor::<B, 4>::from_inner(v0.clone()).require_grad();
            let o = if fused {
                causal_attention::<Flex, NoCheckpointing>(q.clone(), k.clone(), v.clone(), None, true)
            } else {
                let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
                attention(q.clone(), k.clone(), v.clone(), None, None, opts)
            };
            // A loss that weighs every output differently, so that every gradient path counts.
            let loss = (o.clone() * Tensor::<B, 4>::from_inner(w.clone())).sum();
            let g = loss.backward();
            (o.inner(), q.grad(&g).unwrap(), k.grad(&g).unwrap(), v.grad(&g).unwrap())
        };
        let (of, qf, kf, vf) = run(true);
        let (on, qn, kn, vn) = run(false);
        let scale = qn.clone().abs().max().into_scalar().max(1.0);
        for (what, x, y) in [("output", of, on), ("dq", qf, qn), ("dk", kf, kn), ("dv", vf, vn)] {
            let e = max_abs_diff(x, y);
            assert!(e < 1e-5 * scale, "{what} differs by {e} at B={b} H={h} T={t} Hd={hd}");
        }
    }
}

/// Grouped-query attention: the op takes k and v with K < H heads (each read by H/K query heads)
/// and gives their gradients summed over each group, as Burn's attention does on the heads
/// repeated by `repeat_kv`.
#[test]
fn fused_attention_takes_fewer_kv_heads() {
    use kiln_models::attention::repeat_kv;
    let device = Default::default();
    for (b, h, kv, t, hd) in [(2, 6, 2, 13, 8), (1, 3, 1, 9, 4)] {
        let r = |seed, heads| {
            <Flex as burn::tensor::backend::Backend>::seed(&device, seed);
            Tensor::<Flex, 4>::random([b, heads, t, hd], Distribution::Normal(0.0, 1.0), &device)
        };
        let (q0, k0, v0, w) = (r(1, h), r(2, kv), r(3, kv), r(4, h));
        let run = |fused: bool| {
            let q = Tensor::<B, 4>::from_inner(q0.clone()).require_grad();
            let k = Tensor::<B, 4>::from_inner(k0.clone()).require_grad();
            let v = Tensor::<B, 4>::from_inner(v0.clone()).require_grad();
            let o = if fused {
                causal_attention::<Flex, NoCheckpointing>(q.clone(), k.clone(), v.clone(), None, true)
            } else {
                let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
                attention(q.clone(), repeat_kv(k.clone(), h / kv), repeat_kv(v.clone(), h / kv), None, None, opts)
            };
            let g = (o.clone() * Tensor::<B, 4>::from_inner(w.clone())).sum().backward();
            (o.inner(), q.grad(&g).unwrap(), k.grad(&g).unwrap(), v.grad(&g).unwrap())
        };
        let (of, qf, kf, vf) = run(true);
        let (on, qn, kn, vn) = run(false);
        assert_eq!(kf.dims(), [b, kv, t, hd]);
        let scale = kn.clone().abs().max().into_scalar().max(1.0);
        for (what, x, y) in [("output", of, on), ("dq", qf, qn), ("dk", kf, kn), ("dv", vf, vn)] {
            let e = max_abs_diff(x, y);
            assert!(e < 1e-5 * scale, "{what} differs by {e} at B={b} H={h} K={kv} T={t} Hd={hd}");
        }
    }
}
