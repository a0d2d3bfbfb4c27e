//! The CPU kernels (models/src/cpu_kernels.rs) against the Burn model they re-implement:
//! logits, masked loss and every parameter's gradient, on Autodiff<Flex>, tied and untied, GQA.

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::cpu_kernels::{rope_tables, BatchRef, Dims, Kernels, Weights};
use kiln_models::init::RandomInit;
use kiln_models::{Llama, LlamaConfig};

mod common;
use common::{max_rel, tiny_config as config_ctx};

type B = Autodiff<Flex>;

fn config(tied: bool) -> LlamaConfig {
    config_ctx(tied, 16)
}

fn check(tied: bool, threads: usize) {
    check_shape(config(tied), threads, 3, 9);
}

fn check_shape(cfg: LlamaConfig, threads: usize, b: usize, t: usize) {
    check_model(cfg, threads, b, t, false)
}

/// With `fused`, Burn's side trains attention through `kiln_models::attention` (the custom
/// autodiff op), which the kernels check the same way.
fn check_model(cfg: LlamaConfig, threads: usize, b: usize, t: usize, fused: bool) {
    let tied = cfg.tie_word_embeddings;
    let device = Default::default();
    let mut model = Llama::<B>::build(&cfg, &mut RandomInit::new(3, cfg.num_hidden_layers), &device).unwrap();
    if fused {
        kiln_models::attention::register_autodiff::<Flex, burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>();
        assert!(kiln_models::attention::registered::<B>().is_some());
        model.fused_attention = true;
    }
    let inputs: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 3) % cfg.vocab_size) as i64).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 5 + 1) % cfg.vocab_size) as i64).collect();
    let mask: Vec<f32> = (0..b * t).map(|i| if i % 4 == 1 { 0.0 } else { 1.0 }).collect();
    let n: f32 = mask.iter().sum();

    // Burn: forward, masked mean cross-entropy, backward.
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs.clone(), [b, t]), &device);
    let y = Tensor::<B, 2, Int>::from_data(TensorData::new(targets.clone(), [b * t, 1]), &device);
    let m = Tensor::<B, 2>::from_data(TensorData::new(mask.clone(), [b * t, 1]), &device);
    let out = model.forward(x); // [B, T, V]
    let burn_logits: Vec<f32> = out.clone().into_data().to_vec().unwrap();
    let nll = log_softmax(out.reshape([b * t, cfg.vocab_size]), 1).gather(1, y).neg();
    let loss = (nll * m).sum() / n;
    let burn_loss = loss.clone().into_scalar() as f64;
    let grads = loss.backward();

    // Kernels.
    let (cos, sin) = rope_tables(&model);
    let kern = Kernels::new(Dims::from_config(&cfg), cos, sin, threads);
    let layout = &kern.layout;
    let w = layout.weights(&model).unwrap();
    let k_logits = kern.logits(&w, &inputs, b, t);
    let e = max_rel(&k_logits, &burn_logits);
    assert!(e < 1e-5, "logits differ by {e}");
    let mut g = vec![0.0f32; layout.len];
    let batch = BatchRef { inputs: &inputs, targets: &targets, mask: &mask, b, t, starts: None };
    let k_loss = kern.loss_and_grads(&w, &batch, Some(&mut g)).loss;
    assert!((k_loss - burn_loss).abs() < 1e-5 * burn_loss.abs(), "loss {k_loss} vs {burn_loss}");

    let burn_grads = kiln_models::checkpoint::burn_tensors(&model);
    let mut checked = 0;
    for (name, _shape, _) in burn_grads {
        let slot = layout.slots.iter().find(|s| s.name == name).unwrap();
        let param_grad: Vec<f32> = find_grad(&model, &grads, &name);
        let e = max_rel(&layout.get(&g, slot), &param_grad);
        assert!(e < 1e-4, "gradient of {name} differs by {e} (tied {tied}, threads {threads})");
        checked += 1;
    }
    assert_eq!(checked, layout.slots.len());
}

/// The Burn gradient of the parameter called `name`.
fn find_grad(model: &Llama<B>, grads: &<B as burn::tensor::backend::AutodiffBackend>::Gradients, name: &str) -> Vec<f32> {
    try_grad(model, grads, name).unwrap_or_else(|| panic!("no gradient for {name}"))
}

/// The Burn gradient of the parameter called `name`, if it has one.
fn try_grad(model: &Llama<B>, grads: &<B as burn::tensor::backend::AutodiffBackend>::Gradients, name: &str) -> Option<Vec<f32>> {
    use burn::module::{ModuleVisitor, Param};
    struct Find<'a> {
        path: Vec<String>,
        name: &'a str,
        grads: &'a <B as burn::tensor::backend::AutodiffBackend>::Gradients,
        out: Option<Vec<f32>>,
    }
    impl ModuleVisitor<B> for Find<'_> {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if format!("{}.weight", self.path.join(".")) == self.name {
                self.out = p.val().grad(self.grads).map(|g| g.into_data().to_vec().unwrap());
            }
        }
    }
    let mut f = Find { path: Vec::new(), name, grads, out: None };
    burn::module::Module::visit(model, &mut f);
    f.out
}

#[test]
fn kernels_match_burn_untied() {
    check(false, 1);
}

#[test]
fn kernels_match_burn_tied_two_threads() {
    check(true, 2);
}

#[test]
fn kernels_match_burn_past_one_attention_block() {
    // 150 positions: causal attention in three query blocks (64, 64, 22).
    check_shape(config_ctx(false, 160), 2, 2, 150);
}

#[test]
fn thread_count_changes_nothing_but_rounding() {
    let cfg = config(false);
    let model = Llama::<Flex>::build(&cfg, &mut RandomInit::new(5, 2), &Default::default()).unwrap();
    let (cos, sin) = rope_tables(&model);
    let kern = |threads| Kernels::new(Dims::from_config(&cfg), cos.clone(), sin.clone(), threads);
    let (k1, k3) = (kern(1), kern(3));
    let w = k1.layout.weights(&model).unwrap();
    let (b, t) = (4, 16);
    let inputs: Vec<i64> = (0..b * t).map(|i| ((i * 11) % 37) as i64).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 13 + 2) % 37) as i64).collect();
    let mask = vec![1.0f32; b * t];
    let batch = BatchRef { inputs: &inputs, targets: &targets, mask: &mask, b, t, starts: None };
    let run = |k: &Kernels| {
        let mut g = vec![0.0f32; k.layout.len];
        let l = k.loss_and_grads(&w, &batch, Some(&mut g)).loss;
        (l, g)
    };
    let (l1, g1) = run(&k1);
    let (l3, g3) = run(&k3);
    assert!((l1 - l3).abs() < 1e-6, "{l1} vs {l3}");
    assert!(max_rel(&g3, &g1) < 1e-5);
    // And the same thread count twice is bit-identical.
    let (l3b, g3b) = run(&k3);
    // The baseline build of the elementwise loops gives the same bits as the AVX-512 one.
    let base = kern(3).baseline();
    let (lb, gb) = run(&base);
    assert_eq!(lb.to_bits(), l3.to_bits());
    assert!(gb.iter().zip(&g3).all(|(a, b)| a.to_bits() == b.to_bits()), "baseline and AVX-512 loops differ");
    // Forward only gives the same loss.
    assert_eq!(k3.loss_and_grads(&w, &batch, None).loss.to_bits(), l3.to_bits());
    assert_eq!(l3.to_bits(), l3b.to_bits());
    assert_eq!(g3, g3b);
    // Accumulation: a second batch's gradient added in place is the sum of the two.
    let targets2: Vec<i64> = targets.iter().map(|&x| (x + 5) % 37).collect();
    let batch2 = BatchRef { targets: &targets2, ..batch };
    let (_, g2) = run_on(&k3, &w, &batch2);
    let mut acc = g3.clone();
    k3.add_loss_grads(&w, &batch2, &mut acc);
    let sum: Vec<f32> = g3.iter().zip(&g2).map(|(a, b)| a + b).collect();
    assert!(max_rel(&acc, &sum) < 1e-5);
}

fn run_on(k: &Kernels, w: &[f32], batch: &BatchRef) -> (f64, Vec<f32>) {
    let mut g = vec![0.0f32; k.layout.len];
    let l = k.loss_and_grads(w, batch, Some(&mut g)).loss;
    (l, g)
}

/// Burn's model with the fused attention op (forward by the backend's attention, backward by
/// recomputation) gives the kernels' logits, loss and gradients, as the decomposed one does:
/// untied and tied, GQA, one and several query blocks' worth of positions.
#[test]
fn fused_attention_trains_like_the_kernels() {
    check_model(config(false), 2, 3, 9, true);
    check_model(config(true), 1, 2, 16, true);
    check_model(config_ctx(false, 80), 2, 2, 80, true);
}

/// Gradient checkpointing (each layer's forward run again in the backward pass) gives the same
/// loss and gradients, bit for bit, on one thread and on three with uneven shards (whose
/// gradients are summed region by region), tied and untied, with a masked prompt as in SFT.
#[test]
fn gradient_checkpointing_changes_no_bit() {
    for tied in [false, true] {
        let cfg = config(tied);
        let model = Llama::<Flex>::build(&cfg, &mut RandomInit::new(9, 2), &Default::default()).unwrap();
        let (cos, sin) = rope_tables(&model);
        let (b, t) = (5, 16);
        let inputs: Vec<i64> = (0..b * t).map(|i| ((i * 11 + 4) % 37) as i64).collect();
        let targets: Vec<i64> = (0..b * t).map(|i| ((i * 13 + 2) % 37) as i64).collect();
        let mask: Vec<f32> = (0..b * t).map(|i| if i % t < 6 { 0.0 } else { 1.0 }).collect();
        let batch = BatchRef { inputs: &inputs, targets: &targets, mask: &mask, b, t, starts: None };
        for threads in [1, 3] {
            let kern = |on| Kernels::new(Dims::from_config(&cfg), cos.clone(), sin.clone(), threads).checkpointing(on);
            let (plain, ckpt) = (kern(false), kern(true));
            let w = plain.layout.weights(&model).unwrap();
            let (l0, g0) = run_on(&plain, &w, &batch);
            let (l1, g1) = run_on(&ckpt, &w, &batch);
            assert_eq!(l0.to_bits(), l1.to_bits(), "tied {tied}, {threads} threads: loss");
            assert!(g0.iter().zip(&g1).all(|(a, b)| a.to_bits() == b.to_bits()), "tied {tied}, {threads} threads: gradients differ");
            assert!(g0.iter().any(|&x| x != 0.0));
            // Twice in a row (buffers reused from the pools) is the same again.
            let (l2, g2) = run_on(&ckpt, &w, &batch);
            assert_eq!(l1.to_bits(), l2.to_bits());
            assert_eq!(g1, g2);
            ckpt.free_buffers();
            assert_eq!(run_on(&ckpt, &w, &batch).1, g1);
        }
    }
}

/// A model frozen on Burn's side (no gradients for the base) with a LoRA adapter of rank 4 on
/// `targets`, `B` drawn at random (a fresh adapter's `B = 0` would hide half the maths).
fn lora_model(cfg: &LlamaConfig, targets: &[&str], rslora: bool) -> (Llama<B>, kiln_models::lora::Adapter) {
    use kiln_models::lora::{Adapter, LoraSpec};
    let device = Default::default();
    let model = Llama::<B>::build(cfg, &mut RandomInit::new(3, cfg.num_hidden_layers), &device).unwrap();
    let mut model = burn::module::Module::no_grad(model);
    let targets: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
    let mut spec = LoraSpec::new(4, 8.0, 0.0, &targets).unwrap();
    spec.rslora = rslora;
    let mut adapter = Adapter::init(spec, String::new(), cfg, 11);
    for (k, p) in adapter.pairs.values_mut().enumerate() {
        p.b.iter_mut().enumerate().for_each(|(i, x)| *x = (((i * 7 + k * 3) % 11) as f32 - 5.0) * 0.01);
    }
    model.lora = Some(kiln_models::lora_params::Lora::build(&adapter, cfg.num_hidden_layers, &device).unwrap());
    (model, adapter)
}

/// Burn's side of a check: logits, the masked mean cross-entropy and its gradients.
struct BurnPass {
    logits: Vec<f32>,
    loss: f64,
    grads: <B as burn::tensor::backend::AutodiffBackend>::Gradients,
}

fn burn_pass(model: &Llama<B>, batch: &BatchRef) -> BurnPass {
    let (b, t) = (batch.b, batch.t);
    let device = Default::default();
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs.to_vec(), [b, t]), &device);
    let y = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.to_vec(), [b * t, 1]), &device);
    let m = Tensor::<B, 2>::from_data(TensorData::new(batch.mask.to_vec(), [b * t, 1]), &device);
    let n: f32 = batch.mask.iter().sum();
    let out = model.forward(x); // [B, T, V]
    let v = out.dims()[2];
    let logits: Vec<f32> = out.clone().into_data().to_vec().unwrap();
    let loss = (log_softmax(out.reshape([b * t, v]), 1).gather(1, y).neg() * m).sum() / n;
    let value = loss.clone().into_scalar() as f64;
    BurnPass { logits, loss: value, grads: loss.backward() }
}

/// The kernels' adapter gradients (and loss) equal Burn's.
fn assert_adapter_grads(model: &Llama<B>, burn: &BurnPass, al: &kiln_models::cpu_kernels::AdapterLayout, g: &[f32], loss: f64, what: &str) {
    assert!((loss - burn.loss).abs() < 1e-5 * burn.loss.abs(), "{what}: loss {loss} vs {}", burn.loss);
    for s in &al.slots {
        let e = max_rel(&s.get(g), &find_grad(model, &burn.grads, &s.name));
        assert!(e < 1e-4, "{what}: gradient of {} differs by {e}", s.name);
    }
}

/// LoRA on both engines: the kernels' logits, loss and every adapter gradient equal Burn's
/// autodiff of `x·W + s·(x·Aᵀ)·Bᵀ` (untied and tied, GQA, one, two and three threads, all seven
/// projections and a subset, rsLoRA's scale, a masked prompt); Burn computes no gradient for
/// the frozen base; the merged weights give the unmerged logits; gradient checkpointing
/// changes no bit of the adapters' gradients either. With LoRA dropout (`lora_dropout.rs`) the
/// two engines drop the same values (the kernels' threads each make their rows' masks), so
/// loss and gradients agree again, and differ from those without dropout.
#[test]
fn lora_kernels_match_burn() {
    use kiln_models::cpu_kernels::{Adapt, AdapterLayout};
    use kiln_models::lora_dropout::Dropout;
    let cases: [(bool, usize, &[&str], bool); 3] =
        [(false, 1, &["all-linear"], false), (true, 2, &["q_proj", "v_proj", "down_proj"], false), (false, 3, &["k_proj", "o_proj", "gate_proj", "up_proj"], true)];
    for (tied, threads, targets, rslora) in cases {
        let cfg = config(tied);
        let (mut model, adapter) = lora_model(&cfg, targets, rslora);
        // Burn's side with the joined projections (train.fused_proj) in the two cases that adapt
        // some of q/k/v and gate/up but not all.
        model.fused_proj = threads > 1;
        let (b, t) = (3, 9);
        let inputs: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 3) % cfg.vocab_size) as i64).collect();
        let targets_ids: Vec<i64> = (0..b * t).map(|i| ((i * 5 + 1) % cfg.vocab_size) as i64).collect();
        let mask: Vec<f32> = (0..b * t).map(|i| if i % t < 3 { 0.0 } else { 1.0 }).collect();
        let batch = BatchRef { inputs: &inputs, targets: &targets_ids, mask: &mask, b, t, starts: None };
        let burn = burn_pass(&model, &batch);

        let (cos, sin) = rope_tables(&model);
        let dims = Dims::from_config(&cfg);
        let kern = Kernels::new(dims, cos, sin, threads);
        let mut w = vec![0.0f32; kern.layout.len];
        kern.layout.weights_into(&model, &mut w).unwrap();
        let al = AdapterLayout::new(&dims, &adapter.spec);
        let aw = al.weights(&model).unwrap();
        let ad = Adapt::new(&al, &aw);
        let k_logits = kern.logits_with(Weights::F32(&w), Some(ad), &inputs, b, t);
        let e = max_rel(&k_logits, &burn.logits);
        assert!(e < 1e-5, "{targets:?}: logits differ by {e}");
        let base_logits = kern.logits(&w, &inputs, b, t);
        assert!(max_rel(&base_logits, &burn.logits) > 1e-3, "{targets:?}: the adapter changes nothing");
        // Merged into the weights (inference), the same logits.
        let merged = kern.layout.weights(&model).unwrap();
        let e = max_rel(&kern.logits(&merged, &inputs, b, t), &k_logits);
        assert!(e < 1e-5, "{targets:?}: merged logits differ by {e}");

        let mut g = vec![0.0f32; al.len];
        let k_loss = kern.adapter_loss_and_grads(Weights::F32(&w), ad, &batch, Some(&mut g), false).loss;
        assert_adapter_grads(&model, &burn, &al, &g, k_loss, &format!("{targets:?}, threads {threads}"));
        assert_eq!(al.slots.len(), 2 * adapter.pairs.len());
        // The base is frozen: Burn tracked no gradient for it.
        for (name, _, _) in kiln_models::checkpoint::burn_tensors(&model) {
            assert!(try_grad(&model, &burn.grads, &name).is_none(), "{name} got a gradient");
        }
        // Accumulating adds; gradient checkpointing changes no bit.
        let mut acc = g.clone();
        kern.adapter_loss_and_grads(Weights::F32(&w), ad, &batch, Some(&mut acc), true);
        let twice: Vec<f32> = g.iter().map(|x| x + x).collect();
        assert!(max_rel(&acc, &twice) < 1e-5);
        let ckpt = Kernels::new(dims, rope_tables(&model).0, rope_tables(&model).1, threads).checkpointing(true);
        let mut g2 = vec![0.0f32; al.len];
        let l2 = ckpt.adapter_loss_and_grads(Weights::F32(&w), ad, &batch, Some(&mut g2), false).loss;
        assert_eq!(l2.to_bits(), k_loss.to_bits());
        assert!(g2.iter().zip(&g).all(|(a, x)| a.to_bits() == x.to_bits()), "checkpointing changed the adapters' gradients");

        // Dropout: the same masks on both engines.
        let drop = Dropout::new(0.3, 11, 2, 1);
        model.lora.as_mut().unwrap().dropout = drop;
        let burn_d = burn_pass(&model, &batch);
        let mut gd = vec![0.0f32; al.len];
        let dl = kern.adapter_loss_and_grads(Weights::F32(&w), ad.dropping(drop), &batch, Some(&mut gd), false).loss;
        assert_adapter_grads(&model, &burn_d, &al, &gd, dl, &format!("dropout, {targets:?}, threads {threads}"));
        assert!((dl - k_loss).abs() > 1e-6 * k_loss.abs() && max_rel(&gd, &g) > 1e-3, "{targets:?}: dropout changed nothing");
        let mut gd2 = vec![0.0f32; al.len];
        let dl2 = ckpt.adapter_loss_and_grads(Weights::F32(&w), ad.dropping(drop), &batch, Some(&mut gd2), false).loss;
        assert_eq!(dl2.to_bits(), dl.to_bits());
        assert!(gd2.iter().zip(&gd).all(|(a, x)| a.to_bits() == x.to_bits()), "checkpointing changed the dropped adapters' gradients");
    }
}

/// A fresh adapter (`B = 0`) is the base model exactly, on both engines: logits bit for bit.
#[test]
fn fresh_adapter_is_the_base_bit_for_bit() {
    use kiln_models::cpu_kernels::{Adapt, AdapterLayout};
    use kiln_models::lora::{Adapter, LoraSpec};
    let cfg = config(false);
    let device = Default::default();
    let mut model = Llama::<B>::build(&cfg, &mut RandomInit::new(3, cfg.num_hidden_layers), &device).unwrap();
    let (b, t) = (2, 7);
    let inputs: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 3) % cfg.vocab_size) as i64).collect();
    let x = || Tensor::<B, 2, Int>::from_data(TensorData::new(inputs.clone(), [b, t]), &device);
    let base: Vec<f32> = model.forward(x()).into_data().to_vec().unwrap();
    let spec = LoraSpec::new(8, 16.0, 0.0, &["all-linear".to_string()]).unwrap();
    let adapter = Adapter::init(spec, String::new(), &cfg, 5);
    model.lora = Some(kiln_models::lora_params::Lora::build(&adapter, cfg.num_hidden_layers, &device).unwrap());
    let adapted: Vec<f32> = model.forward(x()).into_data().to_vec().unwrap();
    assert!(base.iter().zip(&adapted).all(|(a, b)| a.to_bits() == b.to_bits()), "Burn: a fresh adapter changed the logits");
    let (cos, sin) = rope_tables(&model);
    let dims = Dims::from_config(&cfg);
    let kern = Kernels::new(dims, cos, sin, 2);
    let mut w = vec![0.0f32; kern.layout.len];
    kern.layout.weights_into(&model, &mut w).unwrap();
    let al = AdapterLayout::new(&dims, &adapter.spec);
    let aw = al.weights(&model).unwrap();
    assert!(aw.iter().any(|&v| v != 0.0), "A is drawn, not zero");
    let with = kern.logits_with(Weights::F32(&w), Some(Adapt::new(&al, &aw)), &inputs, b, t);
    let without = kern.logits(&w, &inputs, b, t);
    assert!(with.iter().zip(&without).all(|(a, b)| a.to_bits() == b.to_bits()), "kernels: a fresh adapter changed the logits");
}


/// A frozen base held in a half type, bf16 or f16: the kernels (each layer decoded as it runs,
/// the head a vocabulary chunk at a time: 4,500 entries make three chunks) give the logits, loss
/// and adapter gradients of Burn's model with the same base stored in that type
/// (`lora_params::store_base`), tied and untied; and they differ from the f32 base's only by
/// the rounding.
#[test]
fn lora_on_a_half_base_matches_burn() {
    use burn::tensor::DType;
    use kiln_models::cpu_kernels::{Adapt, AdapterLayout, Half};
    for (half, dt) in [(Half::Bf16, DType::BF16), (Half::F16, DType::F16)] {
        for tied in [false, true] {
            let mut cfg = config(tied);
            cfg.vocab_size = 4500;
            let (model, adapter) = lora_model(&cfg, &["all-linear"], false);
            let (b, t) = (2, 9);
            let inputs: Vec<i64> = (0..b * t).map(|i| ((i * 997 + 3) % cfg.vocab_size) as i64).collect();
            let targets_ids: Vec<i64> = (0..b * t).map(|i| ((i * 1231 + 1) % cfg.vocab_size) as i64).collect();
            let mask: Vec<f32> = (0..b * t).map(|i| if i % t < 2 { 0.0 } else { 1.0 }).collect();
            let batch = BatchRef { inputs: &inputs, targets: &targets_ids, mask: &mask, b, t, starts: None };
            let full_logits = burn_pass(&model, &batch).logits;
            let model = kiln_models::lora_params::store_base(model, dt);
            let burn = burn_pass(&model, &batch);
            let e = max_rel(&burn.logits, &full_logits);
            assert!(e > 0.0 && e < 2e-2, "{half:?} rounding should change the logits a little: {e}");

            let (cos, sin) = rope_tables(&model);
            let dims = Dims::from_config(&cfg);
            let kern = Kernels::new(dims, cos, sin, 2);
            let mut w = vec![0.0f32; kern.layout.len];
            kern.layout.weights_into(&model, &mut w).unwrap();
            let w16: Vec<u16> = w.iter().map(|&v| half.encode(v)).collect();
            assert!(w16.iter().zip(&w).all(|(h, f)| half.decode(*h) == *f), "the stored base is {half:?}-exact");
            let al = AdapterLayout::new(&dims, &adapter.spec);
            let aw = al.weights(&model).unwrap();
            let ad = Adapt::new(&al, &aw);
            let k_logits = kern.logits_with(Weights::Half(&w16, half), Some(ad), &inputs, b, t);
            let e = max_rel(&k_logits, &burn.logits);
            assert!(e < 1e-5, "{half:?}, tied {tied}: half-base logits differ by {e}");
            let mut g = vec![0.0f32; al.len];
            let k_loss = kern.adapter_loss_and_grads(Weights::Half(&w16, half), ad, &batch, Some(&mut g), false).loss;
            assert_adapter_grads(&model, &burn, &al, &g, k_loss, &format!("{half:?}, tied {tied}"));
            // The same weights in f32 give the same results (the decode is exact).
            let mut g32 = vec![0.0f32; al.len];
            let l32 = kern.adapter_loss_and_grads(Weights::F32(&w), ad, &batch, Some(&mut g32), false).loss;
            assert!((l32 - k_loss).abs() < 1e-6 * l32.abs());
            assert!(max_rel(&g, &g32) < 1e-5);
        }
    }
}

/// Sentence embeddings (`embed.rs`): the CPU kernels' hidden states pooled on the host against
/// Burn's model pooled on the graph, over sequences of different lengths batched together (the
/// shorter padded); each has unit length and does not depend on what it was batched with.
#[test]
fn embeddings_match_burn_and_ignore_padding() {
    use kiln_models::embed::Encoder;
    type I = Flex;
    for tied in [false, true] {
        let cfg = config(tied);
        let device = Default::default();
        let model = Llama::<I>::build(&cfg, &mut RandomInit::new(5, cfg.num_hidden_layers), &device).unwrap();
        let seqs: Vec<Vec<u32>> = (0..5).map(|s| (0..3 + 2 * s).map(|i| ((i * 11 + s * 5 + 1) % cfg.vocab_size) as u32).collect()).collect();
        let burn = Encoder::burn(model.clone(), &cfg, 16, &device);
        let kern = Encoder::kernels(model, &cfg, 16, 2, &device).unwrap();
        let (eb, ek) = (burn.encode(&seqs), kern.encode(&seqs));
        let d = cfg.hidden_size;
        assert_eq!((eb.len(), ek.len()), (5 * d, 5 * d));
        assert!(max_rel(&eb, &ek) < 1e-4, "tied {tied}: {}", max_rel(&eb, &ek));
        for (i, s) in seqs.iter().enumerate() {
            let row = &ek[i * d..(i + 1) * d];
            let norm: f32 = row.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
            // Alone, unpadded: the same vector on both engines.
            let alone_k = kern.encode(std::slice::from_ref(s));
            let alone_b = burn.encode(std::slice::from_ref(s));
            assert!(max_rel(&alone_k, row) < 1e-5 && max_rel(&alone_b, &eb[i * d..(i + 1) * d]) < 1e-5, "sequence {i} depends on its batch");
        }
        // Different texts, different vectors.
        let cos: f32 = ek[..d].iter().zip(&ek[d..2 * d]).map(|(a, b)| a * b).sum();
        assert!(cos < 0.9999, "{cos}");
    }
}

/// The retriever's contrastive loss (`contrastive.rs`) on both engines: Burn's autodiff of
/// InfoNCE over mean-pooled unit embeddings against the kernels' (embeddings first, their
/// gradient back to the hidden states on the host, then down the model from the kept
/// activations), for the whole model and for LoRA adapters with and without dropout (and
/// gradient checkpointing), on 1, 2 and 3 threads. The kernels' gradient cache (a second
/// forward instead of kept activations) gives the same gradients, bit for bit. Two pairs share
/// a passage, so neither is the other's negative.
#[test]
fn contrastive_kernels_match_burn() {
    use kiln_models::contrastive::{loss, Pairs, Rows};
    use kiln_models::cpu_kernels::{Adapt, AdapterLayout};
    use kiln_models::lora_dropout::Dropout;
    let cfg = config(false);
    let v = cfg.vocab_size as u32;
    let qs: Vec<Vec<u32>> = (0..4).map(|i| (0..2 + i).map(|j| (j * 5 + i * 3 + 1) as u32 % v).collect()).collect();
    let mut ps: Vec<Vec<u32>> = (0..4).map(|i| (0..9 - i).map(|j| (j * 7 + i * 11 + 2) as u32 % v).collect()).collect();
    ps[3] = ps[1].clone();
    let pairs = Pairs {
        queries: Rows::new(&qs.iter().map(|s| s.as_slice()).collect::<Vec<_>>(), 0),
        passages: Rows::new(&ps.iter().map(|s| s.as_slice()).collect::<Vec<_>>(), 0),
        groups: vec![10, 11, 12, 11],
        tau: 0.1,
    };
    assert_eq!(pairs.hidden_positives().iter().filter(|&&x| x < 0.0).count(), 2);
    let device = Default::default();

    // The whole model.
    let model = Llama::<B>::build(&cfg, &mut RandomInit::new(3, cfg.num_hidden_layers), &device).unwrap();
    let l = loss(&model, &pairs, &device);
    let burn_loss = l.clone().into_scalar() as f64;
    let grads = l.backward();
    assert!(burn_loss.is_finite() && burn_loss > 0.0);
    for threads in [1, 3] {
        let (cos, sin) = rope_tables(&model);
        let kern = Kernels::new(Dims::from_config(&cfg), cos, sin, threads);
        let w = kern.layout.weights(&model).unwrap();
        let mut g = vec![0.0f32; kern.layout.len];
        let pass = kern.contrastive(Weights::F32(&w), None, &pairs, Some(&mut g), false);
        assert!((pass.loss - burn_loss).abs() < 1e-5 * burn_loss, "loss {} vs {burn_loss}", pass.loss);
        for slot in &kern.layout.slots {
            let k = kern.layout.get(&g, slot);
            match try_grad(&model, &grads, &slot.name) {
                Some(b) => {
                    let e = max_rel(&k, &b);
                    assert!(e < 1e-4, "threads {threads}: gradient of {} differs by {e}", slot.name);
                }
                // The head is not used: no gradient on Burn's side, zeros on the kernels'.
                None => assert!(slot.name == "lm_head.weight" && k.iter().all(|&x| x == 0.0), "{}", slot.name),
            }
        }
        // Forward only gives the same loss; accumulating adds the same gradient again.
        assert_eq!(kern.contrastive(Weights::F32(&w), None, &pairs, None, false).loss, pass.loss);
        let mut twice = g.clone();
        kern.contrastive(Weights::F32(&w), None, &pairs, Some(&mut twice), true);
        assert!(max_rel(&twice, &g.iter().map(|x| 2.0 * x).collect::<Vec<_>>()) < 1e-6);
        let cache = Kernels::new(Dims::from_config(&cfg), rope_tables(&model).0, rope_tables(&model).1, threads).gradient_cache(true);
        let mut gc = vec![1.0f32; kern.layout.len];
        assert_eq!(cache.contrastive(Weights::F32(&w), None, &pairs, Some(&mut gc), false).loss, pass.loss);
        assert!(gc == g, "threads {threads}: the gradient cache's gradients differ");
    }

    // LoRA adapters, without and with dropout.
    for p in [0.0, 0.3] {
        let (mut model, adapter) = lora_model(&cfg, &["all-linear"], false);
        let drop = Dropout::new(p, 7, 2, 0);
        if let Some(lo) = model.lora.as_mut() {
            lo.seed = 7;
            lo.spec.dropout = p;
            lo.drop_for(2, 0);
        }
        let l = loss(&model, &pairs, &device);
        let burn_loss = l.clone().into_scalar() as f64;
        let grads = l.backward();
        let (cos, sin) = rope_tables(&model);
        let dims = Dims::from_config(&cfg);
        let kern = Kernels::new(dims, cos, sin, 2).checkpointing(p > 0.0);
        let mut w = vec![0.0f32; kern.layout.len];
        kern.layout.weights_into(&model, &mut w).unwrap();
        let al = AdapterLayout::new(&dims, &adapter.spec);
        let aw = al.weights(&model).unwrap();
        let ad = Adapt::new(&al, &aw).dropping(drop);
        let mut g = vec![0.0f32; al.len];
        let pass = kern.contrastive(Weights::F32(&w), Some(ad), &pairs, Some(&mut g), false);
        assert!((pass.loss - burn_loss).abs() < 1e-5 * burn_loss, "dropout {p}: loss {} vs {burn_loss}", pass.loss);
        let cache = Kernels::new(dims, rope_tables(&model).0, rope_tables(&model).1, 2).checkpointing(p > 0.0).gradient_cache(true);
        let mut gc = vec![0.0f32; al.len];
        cache.contrastive(Weights::F32(&w), Some(ad), &pairs, Some(&mut gc), false);
        assert!(gc == g, "dropout {p}: the gradient cache's gradients differ");
        for s in &al.slots {
            let e = max_rel(&s.get(&g), &find_grad(&model, &grads, &s.name));
            assert!(e < 1e-4, "dropout {p}: gradient of {} differs by {e}", s.name);
        }
        assert!(try_grad(&model, &grads, "model.layers.0.self_attn.q_proj.weight").is_none(), "the base is frozen");
    }
}
