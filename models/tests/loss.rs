//! The fused cross-entropy op (models/src/loss.rs) against Burn's `log_softmax` + `gather` on
//! Autodiff<Flex>: the loss, the logits' gradient, masked tokens, large logits, the forward-only
//! path, and the registry's choice.

use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use kiln_models::loss::{cross_entropy, decomposed, forward_only, fused_cross_entropy, register_autodiff, registered};

type B = Autodiff<Flex>;

/// Logits `[n, v]` (N(0, sd), plus `offset` everywhere), targets and weights (mask / count, with
/// some tokens masked out).
fn case(n: usize, v: usize, sd: f64, offset: f32, seed: u64) -> (Tensor<Flex, 2>, Tensor<Flex, 2, Int>, Tensor<Flex, 2>) {
    let device = Default::default();
    <Flex as burn::tensor::backend::Backend>::seed(&device, seed);
    let x = Tensor::<Flex, 2>::random([n, v], Distribution::Normal(0.0, sd), &device) + offset;
    let y: Vec<i64> = (0..n).map(|i| ((i * 7919 + seed as usize) % v) as i64).collect();
    let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 3 { 0.0 } else { 1.0 }).collect();
    let count: f32 = mask.iter().sum();
    let w: Vec<f32> = mask.iter().map(|m| m / count).collect();
    (
        x,
        Tensor::from_data(TensorData::new(y, [n, 1]), &device),
        Tensor::from_data(TensorData::new(w, [n, 1]), &device),
    )
}

/// The loss and the logits' gradient, through the op or through Burn's composition.
fn loss_and_grad(x: &Tensor<Flex, 2>, y: &Tensor<Flex, 2, Int>, w: &Tensor<Flex, 2>, fused: bool) -> (f32, Tensor<Flex, 2>) {
    let xa = Tensor::<B, 2>::from_inner(x.clone()).require_grad();
    let ya = Tensor::<B, 2, Int>::from_inner(y.clone());
    let wa = Tensor::<B, 2>::from_inner(w.clone());
    let loss = if fused { fused_cross_entropy::<Flex, NoCheckpointing>(xa.clone(), ya, wa) } else { decomposed(xa.clone(), ya, wa) };
    let l = loss.clone().into_scalar();
    let g = loss.backward();
    (l, xa.grad(&g).unwrap())
}

#[test]
fn fused_cross_entropy_matches_log_softmax() {
    // (tokens, vocabulary, logit spread, offset): a small case, a wide vocabulary, and logits far
    // from zero (exp would overflow without the max subtracted).
    for (n, v, sd, offset) in [(9, 7, 1.0, 0.0), (40, 5003, 3.0, 0.0), (12, 300, 5.0, 120.0)] {
        let (x, y, w) = case(n, v, sd, offset, n as u64);
        let (lf, gf) = loss_and_grad(&x, &y, &w, true);
        let (ld, gd) = loss_and_grad(&x, &y, &w, false);
        println!("N={n} V={v}: loss fused {lf} decomposed {ld}");
        assert!(lf.is_finite() && lf > 0.0, "{lf}");
        assert!((lf - ld).abs() <= 1e-5 * ld.abs().max(1.0), "N={n} V={v}: loss {lf} vs {ld}");
        let scale = gd.clone().abs().max().into_scalar();
        let e = (gf.clone() - gd).abs().max().into_scalar();
        assert!(e <= 1e-5 * scale, "N={n} V={v}: gradients differ by {e} (largest {scale})");
        // Masked tokens get no gradient at all; every other row sums to zero (softmax - one-hot).
        let row3 = gf.clone().narrow(0, 3, 1).abs().max().into_scalar();
        assert_eq!(row3, 0.0, "a masked token got a gradient");
        let rows = gf.sum_dim(1).into_data().to_vec::<f32>().unwrap();
        for (i, r) in rows.iter().enumerate() {
            assert!(r.abs() < 1e-6, "row {i} of the gradient sums to {r}");
        }
    }
}

#[test]
fn forward_only_and_the_registry() {
    let (x, y, w) = case(30, 211, 2.0, 0.0, 3);
    let reference = decomposed(x.clone(), y.clone(), w.clone()).into_scalar();
    let fwd = forward_only(x.clone(), y.clone(), w.clone()).into_scalar();
    assert!((fwd - reference).abs() < 1e-5 * reference, "{fwd} vs {reference}");
    // Untracked (no require_grad): the op still computes the same loss.
    let untracked = fused_cross_entropy::<Flex, NoCheckpointing>(Tensor::from_inner(x.clone()), Tensor::from_inner(y.clone()), Tensor::from_inner(w.clone()));
    assert!((untracked.into_scalar() - reference).abs() < 1e-5 * reference);

    // Registration picks the op for the autodiff backend and the forward for the inner one;
    // `fused = false` always takes Burn's composition.
    register_autodiff::<Flex, NoCheckpointing>();
    assert!(registered::<B>().is_some() && registered::<Flex>().is_some());
    assert!(registered::<Autodiff<Flex, BalancedCheckpointing>>().is_none(), "found for a backend nobody registered");
    let via = cross_entropy(x.clone(), y.clone(), w.clone(), true).into_scalar();
    let plain = cross_entropy(x, y, w, false).into_scalar();
    assert!((via - reference).abs() < 1e-5 * reference && plain == reference, "{via} {plain} {reference}");
}

#[test]
fn target_logprobs_match_log_softmax() {
    // [B, T, V] with the targets picked on the device, as the eval scorer does.
    let device = Default::default();
    <Flex as burn::tensor::backend::Backend>::seed(&device, 9);
    let (b, t, v) = (3, 5, 97);
    let x = Tensor::<Flex, 3>::random([b, t, v], Distribution::Normal(0.0, 4.0), &device);
    let y: Vec<i64> = (0..b * t).map(|i| ((i * 31) % v) as i64).collect();
    let yt = Tensor::<Flex, 3, Int>::from_data(TensorData::new(y.clone(), [b, t, 1]), &device);
    let got = kiln_models::loss::target_logprobs(x.clone(), yt).into_data().to_vec::<f32>().unwrap();
    let logp = burn::tensor::activation::log_softmax(x, 2).into_data().to_vec::<f32>().unwrap();
    assert_eq!(got.len(), b * t);
    for (i, (g, &yi)) in got.iter().zip(&y).enumerate() {
        let want = logp[i * v + yi as usize];
        assert!((g - want).abs() < 1e-5 * want.abs().max(1.0), "position {i}: {g} vs {want}");
        assert!(*g < 0.0);
    }
}
