//! Training-loop tests on the Flex CPU backend: overfitting one batch, and optimizer state that
//! follows its parameters through a save and load.

use burn::backend::{Autodiff, Flex};
use kiln_models::init::RandomInit;
use kiln_models::presets::preset;
use kiln_models::Llama;
use kiln_recipes::OptimSection;
use kiln_trainer::data::loader::Batch;
use kiln_trainer::optim::AdamW;
use kiln_trainer::engine::graph_step as train_step;

type B = Autodiff<Flex>;

fn batch() -> Batch {
    let (b, t) = (2, 16);
    let seq: Vec<i64> = (0..(b * t + 1) as i64).map(|i| (i * 7 + 3) % 20).collect();
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b {
        inputs.extend(&seq[r * t..r * t + t]);
        targets.extend(&seq[r * t + 1..r * t + t + 1]);
    }
    Batch { inputs, targets, mask: vec![1.0; b * t], batch: b, context: t, tokens: b * t, starts: None, pairs: None }
}

fn tiny() -> Llama<B> {
    let cfg = preset("tiny", 24).unwrap();
    Llama::build(&cfg, &mut RandomInit::new(1, cfg.num_hidden_layers), &Default::default()).unwrap()
}

#[test]
fn overfits_one_batch() {
    let mut model = tiny();
    let cfg = OptimSection { lr: 1e-2, warmup_steps: 0, weight_decay: 0.0, ..Default::default() };
    let mut opt = AdamW::new(cfg);
    let b = batch();
    let mut first = 0.0;
    let mut last = 0.0;
    for i in 0..200 {
        let (m, out) = train_step(model, &mut opt, std::slice::from_ref(&b), 1e-2, &Default::default());
        model = m;
        if i == 0 {
            first = out.loss;
        }
        last = out.loss;
    }
    println!("loss {first:.3} -> {last:.4}");
    assert!(first > 2.5, "{first}");
    assert!(last < 0.05, "one batch should be memorised: loss {last}");
}

#[test]
fn gradient_accumulation_matches_one_big_batch_direction() {
    // Two micro-batches of the same batch give the same loss as one.
    let cfg = OptimSection { warmup_steps: 0, ..Default::default() };
    let b = batch();
    let (_, one) = train_step(tiny(), &mut AdamW::new(cfg.clone()), std::slice::from_ref(&b), 1e-3, &Default::default());
    let (_, two) = train_step(tiny(), &mut AdamW::new(cfg), &[b.clone(), b], 1e-3, &Default::default());
    assert!((one.loss - two.loss).abs() < 1e-6);
    assert!((one.grad_norm - two.grad_norm).abs() / one.grad_norm < 1e-4, "{} vs {}", one.grad_norm, two.grad_norm);
    assert_eq!(two.tokens, 2 * one.tokens);
}

#[test]
fn optimizer_state_restores_to_the_right_parameters() {
    let cfg = OptimSection { warmup_steps: 0, ..Default::default() };
    let b = batch();
    let mut model = tiny();
    let mut opt = AdamW::new(cfg.clone());
    for _ in 0..3 {
        model = train_step(model, &mut opt, std::slice::from_ref(&b), 1e-3, &Default::default()).0;
    }
    let saved = opt.to_host();
    // Every parameter has both moments, sized like the parameter it belongs to.
    let params = kiln_models::checkpoint::hf_tensors(&model);
    assert_eq!(saved.len(), 2 * params.len());
    for (name, _, values) in &params {
        let m = saved.iter().find(|t| &t.0 == &format!("{name}.exp_avg")).unwrap();
        assert_eq!(m.2.len(), values.len(), "{name}");
    }
    // Round trip through a file, into a fresh optimizer: identical next step.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("opt.safetensors");
    kiln_models::checkpoint::write_safetensors(&p, &saved, &[]).unwrap();
    let mut restored = AdamW::new(cfg);
    let sizes = kiln_models::checkpoint::param_sizes(&model);
    restored.load_host(kiln_models::checkpoint::read_safetensors(&p).unwrap(), &sizes, &Default::default()).unwrap();
    restored.t = opt.t;
    let model_dir = dir.path().join("m");
    let tok = kiln_models::Tokenizer::train_char(["abcdefgh"].into_iter()).unwrap(); // within the 24-token vocabulary
    let mcfg = preset("tiny", 24).unwrap();
    kiln_models::checkpoint::save_dir(&model_dir, &model, &mcfg, &tok).unwrap();
    let (reloaded, _, _) = kiln_models::checkpoint::load_dir::<B>(&model_dir, &Default::default()).unwrap();
    let (a, oa) = train_step(model, &mut opt, std::slice::from_ref(&b), 1e-3, &Default::default());
    let (r, or) = train_step(reloaded, &mut restored, std::slice::from_ref(&b), 1e-3, &Default::default());
    assert_eq!(oa.loss, or.loss);
    assert_eq!(kiln_models::checkpoint::hf_tensors(&a), kiln_models::checkpoint::hf_tensors(&r));
    // State that does not fit the model is refused, not silently accepted (as Burn's would be).
    let load = |t| AdamW::<Flex>::new(OptimSection::default()).load_host(t, &sizes, &Default::default());
    let mut renamed = kiln_models::checkpoint::read_safetensors(&p).unwrap();
    for s in ["exp_avg", "exp_avg_sq"] {
        let v = renamed.remove(&format!("model.norm.weight.{s}")).unwrap();
        renamed.insert(format!("model.normx.weight.{s}"), v);
    }
    let e = load(renamed).unwrap_err().to_string();
    assert!(e.contains("model.normx.weight"), "{e}");
    let mut swapped = kiln_models::checkpoint::read_safetensors(&p).unwrap();
    for s in ["exp_avg", "exp_avg_sq"] {
        let q = swapped.remove(&format!("model.layers.0.self_attn.q_proj.weight.{s}")).unwrap();
        let k = swapped.remove(&format!("model.layers.0.self_attn.k_proj.weight.{s}")).unwrap();
        swapped.insert(format!("model.layers.0.self_attn.q_proj.weight.{s}"), k);
        swapped.insert(format!("model.layers.0.self_attn.k_proj.weight.{s}"), q);
    }
    let e = load(swapped).unwrap_err().to_string();
    assert!(e.contains("values; the parameter has"), "{e}");
}

#[test]
fn mixed_precision_tracks_f32() {
    // bf16 and f16 matmuls/attention with f32 master weights, on the CPU backend: the loss curve
    // follows f32's (the GPU check of the issue runs this over 200 steps on CUDA).
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    kiln_models::register_fused_ops::<burn::backend::Flex, NoCheckpointing>();
    let run_with = |dt: Option<burn::tensor::DType>, fused: bool| {
        let mut model = tiny();
        model.compute = dt;
        (model.fused_attention, model.fused_loss, model.fused_norm, model.fused_swiglu) = (fused, fused, fused, fused);
        let mut opt = AdamW::new(OptimSection { lr: 3e-3, warmup_steps: 0, ..Default::default() });
        let mut losses = Vec::new();
        for _ in 0..60 {
            let (m, out) = train_step(model, &mut opt, std::slice::from_ref(&batch()), 3e-3, &Default::default());
            model = m;
            losses.push(out.loss);
        }
        assert_eq!(model.compute, dt, "the optimizer step dropped the compute type");
        losses
    };
    let run = |dt| run_with(dt, false);
    let f32 = run(None);
    for dt in [burn::tensor::DType::BF16, burn::tensor::DType::F16] {
        // train.fused_attention and fused_loss in half precision: the attention op's backward runs in bf16/f16 too.
        let fused = run_with(Some(dt), true);
        let half = run(Some(dt));
        let tail = |v: &[f64]| v[v.len() - 20..].iter().sum::<f64>() / 20.0;
        println!("{dt:?} fused attention and loss: mean of the last 20 {:.4} vs decomposed {:.4}", tail(&fused), tail(&half));
        assert!((tail(&fused) - tail(&half)).abs() < 0.02, "{dt:?}: fused {:.4} vs {:.4}", tail(&fused), tail(&half));
        assert_ne!(half[0], f32[0], "{dt:?}: the same loss bit for bit: did it run in half precision?");
        println!("{dt:?}: first loss {:.5} vs {:.5}; mean of the last 20 {:.4} vs f32 {:.4}", half[0], f32[0], tail(&half), tail(&f32));
        assert!((tail(&half) - tail(&f32)).abs() < 0.05, "{dt:?}: {:.4} vs {:.4}", tail(&half), tail(&f32));
    }
}

#[test]
fn cpu_kernels_train_like_burn() {
    // Ten AdamW steps (clip active, weight decay on, two micro-batches) on both paths: the losses,
    // gradient norms, weights and optimizer state agree within float rounding.
    use kiln_trainer::engine::{Engine, EngineKind};
    let cfg = OptimSection { lr: 3e-3, warmup_steps: 0, grad_clip: 0.5, ..Default::default() };
    let model_cfg = preset("tiny", 24).unwrap();
    let mut burn = tiny();
    let mut ob = AdamW::new(cfg.clone());
    let mut fused = Engine::new(EngineKind::CpuKernels, tiny(), AdamW::new(cfg), &model_cfg, 2, false, false);
    let mut b2 = batch();
    b2.mask[3] = 0.0;
    b2.inputs.reverse();
    let micro = [batch(), b2];
    for step in 0..10 {
        let (m, a) = train_step(burn, &mut ob, &micro, 3e-3, &Default::default());
        burn = m;
        let b = fused.step(&micro, 3e-3, &Default::default(), None).unwrap();
        assert!((a.loss - b.loss).abs() < 1e-4 * a.loss, "step {step}: loss {} vs {}", a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-3 * a.grad_norm, "step {step}: norm {} vs {}", a.grad_norm, b.grad_norm);
        assert_eq!(a.tokens, b.tokens);
    }
    let (wb, wf) = (kiln_models::checkpoint::burn_tensors(&burn), kiln_models::checkpoint::burn_tensors(fused.model()));
    for ((nb, _, vb), (nf, _, vf)) in wb.iter().zip(&wf) {
        assert_eq!(nb, nf);
        let diff = vb.iter().zip(vf).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff < 1e-4, "{nb}: weights differ by {diff}");
    }
    // The optimizer state is saved under the same names with the same sizes.
    let (sb, sf) = (ob.to_host(), fused.optimizer_state());
    assert_eq!(sb.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(), sf.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>());
    assert_eq!(fused.optimizer_steps(), 10);
}

#[test]
fn gradient_checkpointing_and_the_emptied_model_change_no_bit() {
    // The kernels engine with and without gradient checkpointing: the same losses, norms and
    // weights, bit for bit. Its Burn model is emptied after the first step and filled on request
    // (between steps here, which must change nothing either); the weights written for a
    // checkpoint equal the filled model's.
    use kiln_trainer::engine::{Engine, EngineKind};
    let cfg = OptimSection { lr: 3e-3, warmup_steps: 0, grad_clip: 0.5, ..Default::default() };
    let model_cfg = preset("tiny", 24).unwrap();
    let engine = |on| Engine::<B>::new(EngineKind::CpuKernels, tiny(), AdamW::new(cfg.clone()), &model_cfg, 2, on, false);
    let (mut plain, mut ckpt) = (engine(false), engine(true));
    let mut b2 = batch();
    b2.mask[3] = 0.0;
    let micro = [batch(), b2];
    for step in 0..6 {
        let a = plain.step(&micro, 3e-3, &Default::default(), None).unwrap();
        let b = ckpt.step(&micro, 3e-3, &Default::default(), None).unwrap();
        assert_eq!((a.loss.to_bits(), a.grad_norm.to_bits()), (b.loss.to_bits(), b.grad_norm.to_bits()), "step {step}");
        if step == 2 {
            let _ = ckpt.model();
        }
    }
    let filled = kiln_models::checkpoint::burn_tensors(ckpt.model());
    assert_eq!(filled, kiln_models::checkpoint::burn_tensors(plain.model()));
    let list = ckpt.weights();
    assert_eq!(list.specs.len(), filled.len());
    for (i, (name, shape)) in list.specs.iter().enumerate() {
        let Some((_, s, v)) = filled.iter().find(|t| &t.0 == name) else { panic!("{name} is not a parameter") };
        assert_eq!((shape, &(list.values)(i)), (s, v), "{name}");
    }
    let moments = ckpt.optimizer_tensors();
    assert_eq!(moments.specs.len(), 2 * filled.len());
    // Asking for the model before any step, and on Burn's graph, hands it over as it is.
    let mut fresh = engine(true);
    let before = kiln_models::checkpoint::burn_tensors(fresh.model());
    assert_eq!(before, kiln_models::checkpoint::burn_tensors(&tiny()));
    let mut graph = Engine::<B>::new(EngineKind::Graph, tiny(), AdamW::new(cfg.clone()), &model_cfg, 2, false, false);
    let _ = graph.model();
    graph.step(&micro, 3e-3, &Default::default(), None).unwrap();
    assert_eq!(kiln_models::checkpoint::burn_tensors(graph.model()).len(), filled.len());
}

#[test]
fn fused_ops_train_like_burn() {
    // train.fused_attention, fused_loss, fused_norm, fused_swiglu, fused_proj and the linear op
    // of train.cublaslt (Burn's matmul inside it on flex) on Burn's graph: ten AdamW steps with two
    // micro-batches (one with a masked token) give the decomposed ops' losses, gradient norms and
    // weights within float rounding, each op alone and all together.
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    kiln_models::register_fused_ops::<burn::backend::Flex, NoCheckpointing>();
    for on in 0..7 {
        // One op at a time (attention, loss, norm, SwiGLU, the joined projections, the linear
        // op), then all six.
        let flags: [bool; 6] = std::array::from_fn(|i| on == i || on == 6);
        fused_trains_like_burn(flags);
    }
}

fn fused_trains_like_burn(flags: [bool; 6]) {
    let cfg = OptimSection { lr: 3e-3, warmup_steps: 0, grad_clip: 0.5, ..Default::default() };
    let (mut plain, mut fused) = (tiny(), tiny());
    let [attn, loss, norm, swiglu, proj, linear] = flags;
    (fused.fused_attention, fused.fused_loss, fused.fused_norm, fused.fused_swiglu, fused.fused_proj, fused.cublaslt) = (attn, loss, norm, swiglu, proj, linear);
    let (mut op, mut of) = (AdamW::new(cfg.clone()), AdamW::new(cfg));
    let mut b2 = batch();
    b2.mask[3] = 0.0;
    b2.inputs.reverse();
    let micro = [batch(), b2];
    for step in 0..10 {
        let (m, a) = train_step(plain, &mut op, &micro, 3e-3, &Default::default());
        plain = m;
        let (m, b) = train_step(fused, &mut of, &micro, 3e-3, &Default::default());
        fused = m;
        assert_eq!([fused.fused_attention, fused.fused_loss, fused.fused_norm, fused.fused_swiglu, fused.fused_proj, fused.cublaslt], flags, "the flags survive a step");
        let what = format!("fused attention, loss, norm, SwiGLU, projections, linear {flags:?}, step {step}");
        assert!((a.loss - b.loss).abs() < 1e-5 * a.loss, "{what}: loss {} vs {}", a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm, "{what}: norm {} vs {}", a.grad_norm, b.grad_norm);
    }
    let (wp, wf) = (kiln_models::checkpoint::burn_tensors(&plain), kiln_models::checkpoint::burn_tensors(&fused));
    for ((np, _, vp), (_, _, vf)) in wp.iter().zip(&wf) {
        let diff = vp.iter().zip(vf).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff < 1e-5, "fused {flags:?}: {np}: weights differ by {diff}");
    }
}
