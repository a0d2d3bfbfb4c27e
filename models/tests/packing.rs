//! Packing: a row holding several examples (a block-diagonal causal mask, RoPE positions
//! restarting per example) gives the same loss and the same gradients as the examples each in
//! a padded row of its own, on the CPU kernels, on Burn's graph, and through the fused attention
//! op; and the two engines agree.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::cpu_kernels::{BatchRef, Kernels};
use kiln_models::init::RandomInit;
use kiln_models::llama::Packed;
use kiln_models::{presets, Llama};

type B = Autodiff<Flex>;

/// Rows of `(inputs, targets, mask, starts)`, `b` rows of `t`.
struct Rows {
    inputs: Vec<i64>,
    targets: Vec<i64>,
    mask: Vec<f32>,
    starts: Vec<u32>,
    b: usize,
    t: usize,
}

/// Three examples (token ids and which targets carry loss).
fn examples() -> Vec<(Vec<i64>, Vec<f32>)> {
    vec![
        (vec![3, 14, 15, 9, 26, 5, 35], vec![0., 0., 0., 1., 1., 1.]),
        (vec![8, 9, 7, 9], vec![1., 1., 1.]),
        (vec![2, 7, 18, 28, 18], vec![0., 1., 0., 1.]),
    ]
}

/// `rows` of example indices, each row their concatenation, padded to the longest.
fn layout(rows: &[&[usize]]) -> Rows {
    let ex = examples();
    let t = rows.iter().map(|r| r.iter().map(|&i| ex[i].0.len() - 1).sum::<usize>()).max().unwrap();
    let mut o = Rows { inputs: vec![], targets: vec![], mask: vec![], starts: vec![], b: rows.len(), t };
    for r in rows {
        let mut at = 0;
        for &i in r.iter() {
            let (ids, m) = &ex[i];
            let n = ids.len() - 1;
            o.inputs.extend(&ids[..n]);
            o.targets.extend(&ids[1..]);
            o.mask.extend(m);
            o.starts.extend(std::iter::repeat_n(at as u32, n));
            at += n;
        }
        o.inputs.extend(std::iter::repeat_n(0, t - at));
        o.targets.extend(std::iter::repeat_n(0, t - at));
        o.mask.extend(std::iter::repeat_n(0.0, t - at));
        o.starts.extend((at..t).map(|p| p as u32));
    }
    o
}

fn model<Bk: burn::tensor::backend::Backend>() -> (Llama<Bk>, kiln_models::LlamaConfig) {
    let mut cfg = presets::preset("tiny", 40).unwrap();
    cfg.max_position_embeddings = 16;
    let m = Llama::<Bk>::build(&cfg, &mut RandomInit::new(7, cfg.num_hidden_layers), &Default::default()).unwrap();
    (m, cfg)
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn kernels_packed_rows_equal_one_example_a_row() {
    let (m, cfg) = model::<Flex>();
    let k = Kernels::for_model(&m, &cfg, 2);
    let mut w = vec![0.0; k.layout.len];
    k.layout.weights_into(&m, &mut w).unwrap();
    let run = |r: &Rows, packed: bool| {
        let mut g = vec![0.0; k.layout.len];
        let batch = BatchRef { inputs: &r.inputs, targets: &r.targets, mask: &r.mask, b: r.b, t: r.t, starts: packed.then_some(&r.starts[..]) };
        (k.loss_and_grads(&w, &batch, Some(&mut g)).loss, g)
    };
    let (lp, gp) = run(&layout(&[&[0, 1], &[2]]), true);
    let (ls, gs) = run(&layout(&[&[0], &[1], &[2]]), false);
    println!("packed {lp} single {ls}, gradients {:.1e}", rel(&gp, &gs));
    assert!((lp - ls).abs() < 1e-6 * ls.abs(), "{lp} vs {ls}");
    assert!(rel(&gp, &gs) < 1e-5, "gradients differ: {}", rel(&gp, &gs));
    // Without the mask the packed row is a different computation: the test can fail.
    let (lu, _) = run(&layout(&[&[0, 1], &[2]]), false);
    assert!((lu - ls).abs() > 1e-4, "the packing made no difference, so the test shows nothing");
}

/// Loss and the gradients of every parameter (flattened, in a fixed order) on Burn's graph.
fn graph(r: &Rows, packed: bool, fused: bool) -> (f64, Vec<f32>) {
    kiln_models::register_fused_ops::<Flex, NoCheckpointing>();
    let (mut m, _) = model::<B>();
    m.fused_attention = fused;
    let device = Default::default();
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(r.inputs.clone(), [r.b, r.t]), &device);
    let logits = if packed { m.forward_packed(x, &Packed::from_starts(&r.starts, r.b, r.t, &device)) } else { m.forward(x) };
    let n: f32 = r.mask.iter().sum();
    let v = logits.dims()[2];
    let y = Tensor::<B, 2, Int>::from_data(TensorData::new(r.targets.clone(), [r.b * r.t, 1]), &device);
    let wts = Tensor::<B, 2>::from_data(TensorData::new(r.mask.iter().map(|x| x / n).collect::<Vec<_>>(), [r.b * r.t, 1]), &device);
    let loss = kiln_models::loss::cross_entropy(logits.reshape([r.b * r.t, v]), y, wts, false);
    let l: f64 = loss.clone().into_scalar() as f64;
    let g = loss.backward();
    let grads: Vec<f32> = kiln_models::checkpoint::burn_tensors(&m)
        .iter()
        .map(|(name, _, _)| name.clone())
        .flat_map(|name| grad_of(&m, &name, &g))
        .collect();
    (l, grads)
}

fn grad_of(m: &Llama<B>, name: &str, g: &<B as burn::tensor::backend::AutodiffBackend>::Gradients) -> Vec<f32> {
    let l0 = &m.model.layers[0];
    let t: Tensor<Flex, 2> = match name {
        "model.embed_tokens.weight" => m.model.embed_tokens.val().grad(g).unwrap(),
        "model.layers.0.self_attn.q_proj.weight" => l0.self_attn.q_proj.val().grad(g).unwrap(),
        "model.layers.0.self_attn.k_proj.weight" => l0.self_attn.k_proj.val().grad(g).unwrap(),
        "model.layers.0.mlp.down_proj.weight" => l0.mlp.down_proj.val().grad(g).unwrap(),
        _ => return Vec::new(),
    };
    t.into_data().to_vec().unwrap()
}

#[test]
fn graph_packed_rows_equal_one_example_a_row_with_and_without_the_fused_op() {
    let single = layout(&[&[0], &[1], &[2]]);
    let packed = layout(&[&[0, 1], &[2]]);
    let (ls, gs) = graph(&single, false, false);
    assert!(!gs.is_empty());
    for fused in [false, true] {
        let (lp, gp) = graph(&packed, true, fused);
        println!("fused {fused}: packed {lp} single {ls}, gradients {:.1e}", rel(&gp, &gs));
        assert!((lp - ls).abs() < 1e-5 * ls.abs(), "fused {fused}: {lp} vs {ls}");
        assert!(rel(&gp, &gs) < 1e-4, "fused {fused}: gradients differ by {}", rel(&gp, &gs));
    }
    // And the CPU kernels' loss on the same packed batch.
    let (m, cfg) = model::<Flex>();
    let k = Kernels::for_model(&m, &cfg, 1);
    let mut w = vec![0.0; k.layout.len];
    k.layout.weights_into(&m, &mut w).unwrap();
    let batch = BatchRef { inputs: &packed.inputs, targets: &packed.targets, mask: &packed.mask, b: packed.b, t: packed.t, starts: Some(&packed.starts) };
    let lk = k.loss_and_grads(&w, &batch, None).loss;
    assert!((lk - ls).abs() < 1e-4 * ls.abs(), "kernels {lk} vs graph {ls}");
}
