//! Backend parity: the same model on flex (CPU) and on wgpu gives the same logits (within 1e-3
//! relative) and the same losses over 3 training steps (within 1e-3). On CI, wgpu runs on Mesa's
//! lavapipe (software Vulkan, installed by .ci/run); without any adapter the test skips, saying so.

#![cfg(feature = "wgpu")]

use burn::backend::{Autodiff, Flex, Wgpu};
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::init::RandomInit;
use kiln_models::presets::preset;
use kiln_models::Llama;
use kiln_recipes::OptimSection;
use kiln_trainer::data::loader::Batch;
use kiln_trainer::device::{self, Device};
use kiln_trainer::optim::AdamW;
use kiln_trainer::engine::graph_step as train_step;

fn batch(seed: i64) -> Batch {
    let (b, t) = (2, 16);
    let seq: Vec<i64> = (0..(b * t + 1) as i64).map(|i| (i * 7 + 3 + seed) % 24).collect();
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for r in 0..b {
        inputs.extend(&seq[r * t..r * t + t]);
        targets.extend(&seq[r * t + 1..r * t + t + 1]);
    }
    Batch { inputs, targets, mask: vec![1.0; b * t], batch: b, context: t, tokens: b * t, starts: None, pairs: None }
}

/// Logits for a fixed input, then the losses of 3 AdamW steps, on backend `B`.
/// With `fused`, attention and the loss train through `kiln_models::attention` and `::loss`
/// (registered for `B` by the caller).
fn run<B: burn::tensor::backend::AutodiffBackend>(device: &B::Device, fused: bool) -> (Vec<f32>, Vec<f64>) {
    let cfg = preset("tiny", 24).unwrap();
    let mut model: Llama<B> = Llama::build(&cfg, &mut RandomInit::new(7, cfg.num_hidden_layers), device).unwrap();
    (model.fused_attention, model.fused_loss, model.fused_norm, model.fused_swiglu, model.cublaslt) = (fused, fused, fused, fused, fused);
    (model.flash_attention, model.fused_proj) = (fused, fused);
    let b = batch(0);
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(b.inputs.clone(), [b.batch, b.context]), device);
    let logits: Vec<f32> = model.forward(x).into_data().convert::<f32>().to_vec().unwrap();
    let mut opt = AdamW::new(OptimSection { lr: 3e-3, warmup_steps: 0, ..Default::default() });
    let mut losses = Vec::new();
    for step in 0..3 {
        let (m, out) = train_step(model, &mut opt, &[batch(step)], 3e-3, device);
        model = m;
        losses.push(out.loss);
    }
    (logits, losses)
}

/// True (and says so) when this machine has no wgpu adapter: the test then checks nothing; with
/// `KILN_REQUIRE=wgpu` it fails instead.
fn no_adapter(what: &str) -> bool {
    device::wgpu_adapters().is_empty()
        && kiln_models::skip::skip("wgpu", &format!("no wgpu adapter on this machine (install mesa-vulkan-drivers for lavapipe); {what} not checked"))
}

#[test]
fn flex_and_wgpu_agree_on_logits_and_training() {
    if no_adapter("flex/wgpu parity") {
        return;
    }
    let adapters = device::wgpu_adapters();
    println!("wgpu adapters: {:?}", adapters.iter().map(|a| format!("{} ({:?}{})", a.name, a.kind, if a.software { ", software" } else { "" })).collect::<Vec<_>>());
    let Device::Wgpu { kind, index, name } = device::resolve(kiln_recipes::DeviceSpec::Wgpu(None)).unwrap() else { unreachable!() };
    println!("using {name}");
    let wd = Device::wgpu_device(kind, index);
    let (lf, sf) = run::<Autodiff<Flex>>(&burn::tensor::Device::<Flex>::default(), false);
    let (lw, sw) = run::<Autodiff<Wgpu>>(&wd, false);
    let max_ref = lf.iter().fold(0f32, |m, x| m.max(x.abs()));
    let rel = lf.iter().zip(&lw).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / max_ref;
    println!("logits: max |flex - wgpu| / max |flex| = {rel:.2e}; losses flex {sf:?} wgpu {sw:?}");
    assert_eq!(lf.len(), lw.len());
    assert!(rel < 1e-3, "logits differ: {rel}");
    for (a, b) in sf.iter().zip(&sw) {
        assert!((a - b).abs() < 1e-3, "losses differ: flex {sf:?} wgpu {sw:?}");
    }
    assert!(sf[2] < sf[0], "training did not lower the loss: {sf:?}");

    // train.fused_attention and train.fused_loss on wgpu: the backend's attention forward and
    // Kiln's backward; the cross-entropy op.
    // With them RMSNorm and SwiGLU, and the CubeCL kernels of the loss, norm and SwiGLU passes.
    kiln_models::register_fused_ops::<Wgpu, burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>();
    kiln_trainer::cube_kernels::register::<burn::backend::wgpu::WgpuRuntime, u32>();
    let (lwf, swf) = run::<Autodiff<Wgpu>>(&wd, true);
    println!("fused attention, loss, norm and SwiGLU on wgpu: losses {swf:?}");
    let relf = lf.iter().zip(&lwf).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / max_ref;
    assert!(relf < 1e-3, "logits through the fused op differ: {relf}");
    for (a, b) in sf.iter().zip(&swf) {
        assert!((a - b).abs() < 1e-3, "fused attention and loss on wgpu: losses flex {sf:?} wgpu {swf:?}");
    }
}

/// The wgpu device of these tests, with the one-kernel AdamW registered for it.
fn wgpu_with_fused_adamw() -> burn::backend::wgpu::WgpuDevice {
    let Device::Wgpu { kind, index, .. } = device::resolve(kiln_recipes::DeviceSpec::Wgpu(None)).unwrap() else { unreachable!() };
    kiln_trainer::optim_cube::register::<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>();
    Device::wgpu_device(kind, index)
}

/// `optim.fused`: the one-kernel AdamW of optim_cube.rs against Burn's tensor ops, both on wgpu:
/// ten steps with the clip active and weight decay on give the same losses, gradient norms,
/// weights and moments within float rounding.
#[test]
fn one_kernel_adamw_matches_the_tensor_ops_on_wgpu() {
    if no_adapter("the one-kernel AdamW") {
        return;
    }
    let wd = wgpu_with_fused_adamw();
    assert!(kiln_trainer::optim::registered::<Wgpu>().is_some());
    let cfg = preset("tiny", 24).unwrap();
    let train = |fused: bool| {
        let mut model: Llama<Autodiff<Wgpu>> = Llama::build(&cfg, &mut RandomInit::new(7, cfg.num_hidden_layers), &wd).unwrap();
        let mut opt = AdamW::new(OptimSection { lr: 3e-3, warmup_steps: 0, grad_clip: 0.5, fused, ..Default::default() });
        let mut out = Vec::new();
        for step in 0..10 {
            let (m, o) = train_step(model, &mut opt, &[batch(step)], 3e-3, &wd);
            model = m;
            out.push((o.loss, o.grad_norm));
        }
        (out, kiln_models::checkpoint::burn_tensors(&model), opt.to_host())
    };
    let (plain, wp, mp) = train(false);
    let (kernel, wk, mk) = train(true);
    println!("losses, tensor ops {:?}\n        one kernel {:?}", plain.iter().map(|x| x.0).collect::<Vec<_>>(), kernel.iter().map(|x| x.0).collect::<Vec<_>>());
    assert!(plain.iter().any(|x| x.1 > 0.5), "the clip never acted: norms {plain:?}");
    for (step, (a, b)) in plain.iter().zip(&kernel).enumerate() {
        assert!((a.0 - b.0).abs() < 1e-4 * a.0.abs().max(1.0), "step {step}: loss {} vs {}", a.0, b.0);
        assert!((a.1 - b.1).abs() < 1e-3 * a.1.max(1e-3), "step {step}: gradient norm {} vs {}", a.1, b.1);
    }
    assert!(plain[9].0 < plain[0].0, "training did not lower the loss: {plain:?}");
    for (label, a, b) in [("weights", wp, wk), ("moments", mp, mk)] {
        assert_eq!(a.len(), b.len());
        for ((na, sa, va), (nb, sb, vb)) in a.iter().zip(&b) {
            assert_eq!((na, sa), (nb, sb));
            let scale = va.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            let diff = va.iter().zip(vb).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-4 * scale, "{label} {na}: differ by {diff} (largest value {scale})");
        }
    }
}

/// The one-kernel AdamW (optim_cube.rs) computes the host formula, `AdamWScalars::update`, element
/// for element: 1,000 values with a clip factor and weight decay, at step 3.
#[test]
fn one_kernel_adamw_is_the_host_formula() {
    if no_adapter("the one-kernel AdamW against the host formula") {
        return;
    }
    let wd = wgpu_with_fused_adamw();
    let update = kiln_trainer::optim::registered::<Wgpu>().unwrap();
    let n = 1000;
    let val = |k: usize, s: f32| (0..n).map(|i| (((i * k + 7) % 101) as f32 / 50.0 - 1.0) * s).collect::<Vec<f32>>();
    let (p, g, m, v) = (val(3, 1.0), val(5, 2.0), val(7, 0.1), val(11, 0.01).iter().map(|x| x.abs()).collect::<Vec<_>>());
    let c = OptimSection { weight_decay: 0.1, ..Default::default() };
    let s = kiln_trainer::optim::AdamWScalars::new(&c, 3, 1e-3, 2);
    let t = |x: &[f32]| Tensor::<Wgpu, 1>::from_data(TensorData::new(x.to_vec(), [x.len()]), &wd);
    let [pk, mk, vk] = update(t(&p), t(&g), t(&m), t(&v), t(&[0.5]), s).map(|x| x.into_data().to_vec::<f32>().unwrap());
    for i in 0..n {
        let (mut ph, mut mh, mut vh) = (p[i], m[i], v[i]);
        s.update(&mut ph, g[i], &mut mh, &mut vh, 0.5);
        for (what, a, b) in [("p", ph, pk[i]), ("m", mh, mk[i]), ("v", vh, vk[i])] {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-3), "{what}[{i}]: host {a} vs kernel {b}");
        }
    }
}

/// GPU kernel caches: a `kiln run` on wgpu leaves CubeCL's autotune results under
/// `$KILN_CACHE/cubecl/wgpu-<adapter>/`, and a `cubecl.toml` in the working directory takes
/// precedence (Kiln then configures nothing). On lavapipe in CI.
#[test]
fn gpu_kernel_caches_live_in_the_kiln_cache() {
    if no_adapter("kernel caches") {
        return;
    }
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let tmp = tempfile::tempdir().unwrap();
    let (work, cache, data) = (tmp.path().join("work"), tmp.path().join("cache"), tmp.path().join("data"));
    for d in [&work, &cache, &data] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(data.join("corpus.txt"), "to be or not to be, that is the question.\n".repeat(200)).unwrap();
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        "name = \"cache\"\n[model]\npreset = \"tiny\"\n[data]\nsources = [\"corpus.txt\"]\n[train]\nsteps = 1\nbatch_size = 2\neval_batches = 1\ncheckpoint_every = 0\n",
    )
    .unwrap();
    let run = |cwd: &std::path::Path, recipe: &std::path::Path| {
        std::process::Command::new(kiln)
            .args(["run", recipe.to_str().unwrap(), "--device", "wgpu", "--runs-dir", tmp.path().join("runs").to_str().unwrap()])
            .current_dir(cwd)
            .env("KILN_CACHE", &cache)
            .env("KILN_DATA", &data)
            .output()
            .unwrap()
    };
    let o = run(&work, &recipe);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "kiln run on wgpu failed:\n{err}");
    assert!(err.contains("GPU kernels: compiled and autotuned on first use"), "{err}");
    let folders: Vec<_> = std::fs::read_dir(cache.join("cubecl")).expect("no $KILN_CACHE/cubecl").flatten().map(|e| e.path()).collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    assert!(folders[0].file_name().unwrap().to_string_lossy().starts_with("wgpu-"), "{folders:?}");
    let files = walk(&folders[0].join("autotune"));
    println!("autotune cache files: {files:?}");
    assert!(!files.is_empty(), "no autotune results under {}", folders[0].display());

    // The user's cubecl.toml wins: Kiln says so and sets nothing (the run then stops early on a
    // missing data file, after choosing the device).
    std::fs::write(work.join("cubecl.toml"), "[autotune]\nlevel = \"minimal\"\n").unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, std::fs::read_to_string(&recipe).unwrap().replace("corpus.txt", "missing.txt")).unwrap();
    let o = run(&work, &bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("GPU kernel caches: as") && err.contains("cubecl.toml"), "{err}");
    assert!(!err.contains("GPU kernels: compiled and autotuned"), "{err}");
}

/// `train.precision = "bf16-mixed"` on wgpu (WGSL has no bf16): a clear error with the types
/// that work there, not a panic on CubeCL's device thread that left the process hanging. On
/// lavapipe in CI (which has shader-f16, so f16-mixed is offered).
#[test]
fn wgpu_refuses_a_precision_it_cannot_compute_in() {
    if no_adapter("the precision check") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("corpus.txt"), "to be or not to be, that is the question.\n".repeat(200)).unwrap();
    let recipe = tmp.path().join("r.toml");
    std::fs::write(&recipe, "name = \"half\"\n[model]\npreset = \"tiny\"\n[data]\nsources = [\"corpus.txt\"]\n[train]\nsteps = 1\nbatch_size = 2\nprecision = \"bf16-mixed\"\n").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", recipe.to_str().unwrap(), "--device", "wgpu", "--runs-dir", tmp.path().join("runs").to_str().unwrap()])
        .env("KILN_CACHE", tmp.path().join("cache"))
        .env("KILN_DATA", &data)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() > 120 {
            child.kill().ok();
            panic!("kiln run with bf16-mixed on wgpu still running after 120 s (hung?)");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{err}");
    assert!(!o.status.success(), "bf16-mixed on wgpu ran: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("train.precision = \"bf16-mixed\"") && err.contains("cannot compute in BF16"), "{err}");
    assert!(err.contains("--set train.precision=f32") && err.contains("needs CUDA or --device cpu"), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `train.pad_vocab` on Burn's graph: the tiny model's 24 tokens held as 64 (tied and untied
/// head, the loss fused or not) give the logits and 3 AdamW steps of the unpadded model (within
/// `tol`); the padded rows and columns stay zero; checkpoint tensors and optimizer state come out
/// at the true size with the unpadded run's values, and the state restores padded.
fn padded_trains_like_unpadded<B: burn::tensor::backend::AutodiffBackend>(device: &B::Device, fused: bool, tol: f64) {
    use kiln_models::checkpoint::{hf_tensors, param_sizes};
    for tied in [false, true] {
        let mut cfg = preset("tiny", 24).unwrap();
        cfg.tie_word_embeddings = tied;
        let build = || {
            let mut m: Llama<B> = Llama::build(&cfg, &mut RandomInit::new(7, cfg.num_hidden_layers), device).unwrap();
            (m.fused_attention, m.fused_loss, m.fused_norm, m.fused_swiglu) = (fused, fused, fused, fused);
            m
        };
        let (mut plain, mut padded) = (build(), build().pad_vocab(64));
        let pad = padded.vocab_pad();
        assert_eq!(pad.map(|p| (p.vocab, p.padded)), Some((24, 64)));
        assert_eq!(padded.model.embed_tokens.val().dims(), [64, cfg.hidden_size]);
        assert_eq!(padded.lm_head.as_ref().map(|h| h.val().dims()), (!tied).then_some([cfg.hidden_size, 64]));
        assert_eq!(build().pad_vocab(8).vocab_pad(), None, "24 is a multiple of 8");

        let b = batch(0);
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(b.inputs.clone(), [b.batch, b.context]), device);
        let (lp, lq) = (plain.forward(x.clone()), padded.forward(x));
        assert_eq!(lq.dims(), [b.batch, b.context, 24], "the logits are the true columns");
        let (lp, lq): (Vec<f32>, Vec<f32>) = (lp.into_data().convert::<f32>().to_vec().unwrap(), lq.into_data().convert::<f32>().to_vec().unwrap());
        let scale = lp.iter().fold(0f32, |m, x| m.max(x.abs()));
        let e = lp.iter().zip(&lq).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!((e as f64) < tol, "tied {tied}: logits differ by {e}");

        let ocfg = OptimSection { lr: 3e-3, warmup_steps: 0, ..Default::default() };
        let (mut op, mut oq) = (AdamW::new(ocfg.clone()), AdamW::new(ocfg.clone()));
        oq.pad_vocab(pad, device);
        for step in 0..3 {
            let (m, a) = train_step(plain, &mut op, &[batch(step)], 3e-3, device);
            plain = m;
            let (m, q) = train_step(padded, &mut oq, &[batch(step)], 3e-3, device);
            padded = m;
            assert!((a.loss - q.loss).abs() < tol * a.loss, "tied {tied}, step {step}: loss {} vs {}", a.loss, q.loss);
            assert!((a.grad_norm - q.grad_norm).abs() < tol * a.grad_norm, "tied {tied}, step {step}: gradient norm {} vs {}", a.grad_norm, q.grad_norm);
        }
        let zero = |t: Tensor<B, 2>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0);
        assert!(zero(padded.model.embed_tokens.val().narrow(0, 24, 40)), "tied {tied}: padded embedding rows moved");
        if let Some(h) = &padded.lm_head {
            assert!(zero(h.val().narrow(1, 24, 40)), "padded head columns moved");
        }
        // What checkpoints and exports write: the true sizes, the unpadded run's values.
        let close = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| ((x - y).abs() as f64) < tol.max(1e-6) * 10.0 * (1.0 + x.abs() as f64));
        let (tp, tq) = (hf_tensors(&plain), hf_tensors(&padded));
        assert_eq!(tp.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(), tq.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>());
        for (a, b) in tp.iter().zip(&tq) {
            assert!(close(&a.2, &b.2), "tied {tied}: {} differs from the unpadded run's", a.0);
        }
        assert_eq!(param_sizes(&padded), param_sizes(&plain));
        let (sp, sq) = (op.to_host(), oq.to_host());
        assert_eq!(sp.len(), sq.len());
        for (a, b) in sp.iter().zip(&sq) {
            assert!(a.0 == b.0 && a.1 == b.1 && close(&a.2, &b.2), "tied {tied}: optimizer state {} differs", a.0);
        }
        // Restored (at the true size) and padded again: the same state, one more step alike.
        let mut back = AdamW::new(ocfg);
        back.load_host(sq.iter().map(|t| (t.0.clone(), (t.1.clone(), t.2.clone()))).collect(), &param_sizes(&padded), device).unwrap();
        back.pad_vocab(pad, device);
        back.t = oq.t;
        assert!(back.to_host().iter().zip(&sq).all(|(a, b)| a.0 == b.0 && a.2 == b.2));
        let (_, q) = train_step(padded.clone(), &mut oq, &[batch(3)], 3e-3, device);
        let (_, r) = train_step(padded, &mut back, &[batch(3)], 3e-3, device);
        assert_eq!(q.loss.to_bits(), r.loss.to_bits());
        assert_eq!(oq.to_host().iter().map(|t| t.2.clone()).collect::<Vec<_>>(), back.to_host().iter().map(|t| t.2.clone()).collect::<Vec<_>>(), "tied {tied}: the restored state stepped differently");
    }
}

#[test]
fn a_padded_vocabulary_trains_like_the_true_one_on_flex() {
    kiln_models::register_fused_ops::<Flex, burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>();
    for fused in [false, true] {
        padded_trains_like_unpadded::<Autodiff<Flex>>(&Default::default(), fused, 1e-5);
    }
}

#[test]
fn a_padded_vocabulary_trains_like_the_true_one_on_wgpu() {
    if no_adapter("vocabulary padding on wgpu") {
        return;
    }
    let Device::Wgpu { kind, index, .. } = device::resolve(kiln_recipes::DeviceSpec::Wgpu(None)).unwrap() else { unreachable!() };
    let wd = Device::wgpu_device(kind, index);
    kiln_models::register_fused_ops::<Wgpu, burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>();
    // The loss kernel then reads the narrowed (strided) logits of the padded model.
    kiln_trainer::cube_kernels::register::<burn::backend::wgpu::WgpuRuntime, u32>();
    for fused in [false, true] {
        padded_trains_like_unpadded::<Autodiff<Wgpu>>(&wd, fused, 1e-4);
    }
}

/// Flex data on the wgpu device.
fn on_wgpu<const D: usize>(t: Tensor<Flex, D>, device: &burn::backend::wgpu::WgpuDevice) -> Tensor<Autodiff<Wgpu>, D> {
    Tensor::from_data(t.into_data(), device)
}

/// The largest difference between `a` and `b`, relative to `b`'s largest value (at least 1).
fn rel<const D: usize>(a: Tensor<Autodiff<Wgpu>, D>, b: Tensor<Autodiff<Wgpu>, D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar().max(1.0);
    (a - b).abs().max().into_scalar() / scale
}

/// The CubeCL kernels of the fused ops (trainer/src/cube_kernels/: RMSNorm, SwiGLU and the
/// cross-entropy, each pass one kernel) against Burn's composition, both on wgpu: the outputs and
/// the gradients of every input, on shapes wider than a kernel's cube and not multiples of it.
#[test]
fn cube_kernels_match_burns_ops_on_wgpu() {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::tensor::Distribution;
    use kiln_models::{loss, norm, swiglu};
    if no_adapter("the fused ops' CubeCL kernels") {
        return;
    }
    let wd = wgpu_with_fused_adamw();
    kiln_trainer::cube_kernels::register::<burn::backend::wgpu::WgpuRuntime, u32>();
    // Registered, so the ops below run them (f32 tensors, i32 targets), not their tensor-op passes.
    assert!(kiln_models::registry::registered::<norm::NormKernels<Wgpu>>().is_some());
    assert!(kiln_models::registry::registered::<swiglu::SwigluKernels<Wgpu>>().is_some());
    assert!(kiln_models::registry::registered::<loss::LossKernels<Wgpu>>().is_some());
    let random = |shape: Vec<usize>, sd: f64, offset: f32, seed: u64| {
        let device = Default::default();
        <Flex as burn::tensor::backend::Backend>::seed(&device, seed);
        Tensor::<Flex, 1>::random([shape.iter().product::<usize>()], Distribution::Normal(0.0, sd), &device) + offset
    };
    let tol = 1e-4;

    // RMSNorm: rows of 300 (more than a cube's 256 units) and of 64, many rows.
    for (shape, offset) in [([3, 7, 300], 0.0), ([2, 70, 64], 30.0)] {
        let x = on_wgpu(random(shape.to_vec(), 2.0, offset, 1).reshape(shape), &wd);
        let w = on_wgpu(random(vec![shape[2]], 0.5, 1.0, 2), &wd);
        let probe = on_wgpu(random(shape.to_vec(), 1.0, 0.0, 3).reshape(shape), &wd);
        let grads = |fused: bool| {
            let (xa, wa) = (x.clone().require_grad(), w.clone().require_grad());
            let y = if fused { norm::fused_rms_norm::<Wgpu, NoCheckpointing>(xa.clone(), wa.clone(), 1e-5) } else { norm::decomposed(xa.clone(), wa.clone(), 1e-5) };
            let g = (y.clone() * probe.clone()).sum().backward();
            (y, Tensor::from_inner(xa.grad(&g).unwrap()), Tensor::from_inner(wa.grad(&g).unwrap()))
        };
        let ((yf, dxf, dwf), (yd, dxd, dwd)) = (grads(true), grads(false));
        let (ey, ex, ew) = (rel(yf, yd), rel(dxf, dxd), rel::<1>(dwf, dwd));
        println!("RMSNorm {shape:?}: output {ey:.1e}, dx {ex:.1e}, dw {ew:.1e}");
        assert!(ey < tol && ex < tol && ew < tol, "RMSNorm {shape:?}: output {ey}, dx {ex}, dw {ew}");
    }

    // SwiGLU: gates deep in both tails of the sigmoid.
    let shape = [2, 5, 77];
    let g = on_wgpu(random(shape.to_vec(), 8.0, 0.0, 4).reshape(shape), &wd);
    let u = on_wgpu(random(shape.to_vec(), 1.0, 0.0, 5).reshape(shape), &wd);
    let probe = on_wgpu(random(shape.to_vec(), 1.0, 0.0, 6).reshape(shape), &wd);
    let grads = |fused: bool| {
        let (ga, ua) = (g.clone().require_grad(), u.clone().require_grad());
        let h = if fused { swiglu::fused_swiglu::<Wgpu, NoCheckpointing>(ga.clone(), ua.clone()) } else { swiglu::decomposed(ga.clone(), ua.clone()) };
        let gr = (h.clone() * probe.clone()).sum().backward();
        [h, Tensor::from_inner(ga.grad(&gr).unwrap()), Tensor::from_inner(ua.grad(&gr).unwrap())]
    };
    for (name, (a, b)) in ["output", "dg", "du"].iter().zip(grads(true).into_iter().zip(grads(false))) {
        let e = rel(a, b);
        println!("SwiGLU {name}: {e:.1e}");
        assert!(e < tol, "SwiGLU {name} differs by {e}");
    }

    // SwiGLU on the joined [g | u] (train.fused_proj): the kernels against Burn's ops on its halves.
    let (n, f) = (7, 45);
    let y = on_wgpu(random(vec![n * 2 * f], 8.0, 0.0, 13).reshape([1, n, 2 * f]), &wd);
    let probe = on_wgpu(random(vec![n * f], 1.0, 0.0, 14).reshape([1, n, f]), &wd);
    let grads = |joined: bool| {
        let ya = y.clone().require_grad();
        let h = if joined { swiglu::fused_swiglu_joined::<Wgpu, NoCheckpointing>(ya.clone()) } else { swiglu::decomposed(ya.clone().narrow(2, 0, f), ya.clone().narrow(2, f, f)) };
        let gr = (h.clone() * probe.clone()).sum().backward();
        (h, Tensor::<Autodiff<Wgpu>, 3>::from_inner(ya.grad(&gr).unwrap()))
    };
    let ((hj, gj), (hd, gd)) = (grads(true), grads(false));
    let (eh, eg) = (rel(hj, hd), rel(gj, gd));
    println!("joined SwiGLU: output {eh:.1e}, gradient {eg:.1e}");
    assert!(eh < tol && eg < tol, "joined SwiGLU: output {eh}, gradient {eg}");

    // RoPE on a joined q/k/v projection (GQA: 4 query heads, 2 key/value heads), with tables
    // shared by the batch and a row of its own each.
    let (b, t, h, k, hd) = (2, 9, 4, 2, 16);
    let (cos, sin) = kiln_models::rope::rope_tables::<Autodiff<Wgpu>>(32, hd, 10000.0, &wd);
    let y = on_wgpu(random(vec![b * t * (h + 2 * k) * hd], 1.0, 0.0, 11).reshape([b, t, (h + 2 * k) * hd]), &wd);
    let probe = on_wgpu(random(vec![b * t * (h + 2 * k) * hd], 1.0, 0.0, 12).reshape([b, t, (h + 2 * k) * hd]), &wd);
    let shared = (cos.clone().narrow(0, 0, t).unsqueeze::<4>(), sin.clone().narrow(0, 0, t).unsqueeze::<4>());
    let own = (cos.narrow(0, 2, b * t).reshape([b, 1, t, hd]), sin.narrow(0, 2, b * t).reshape([b, 1, t, hd]));
    assert!(kiln_models::registry::registered::<kiln_models::rope::RopeKernels<Wgpu>>().is_some());
    for (name, (cos, sin)) in [("shared tables", shared), ("a row each", own)] {
        let grads = |fused: bool| {
            let ya = y.clone().require_grad();
            let out = if fused { kiln_models::rope::joined_rope::<Wgpu, NoCheckpointing>(ya.clone(), cos.clone(), sin.clone(), h + k) } else { kiln_models::rope::decomposed(ya.clone(), cos.clone(), sin.clone(), h + k) };
            let g = (out.clone() * probe.clone()).sum().backward();
            (out, Tensor::<Autodiff<Wgpu>, 3>::from_inner(ya.grad(&g).unwrap()))
        };
        let ((of, gf), (od, gd)) = (grads(true), grads(false));
        let (eo, eg) = (rel(of, od), rel(gf, gd));
        println!("RoPE, {name}: output {eo:.1e}, gradient {eg:.1e}");
        assert!(eo < tol && eg < tol, "RoPE, {name}: output {eo}, gradient {eg}");
    }

    // Cross-entropy: a 5,003-wide vocabulary, masked tokens, and rows of logits far from zero.
    let (n, v) = (40, 5003);
    let offsets: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 120.0 } else { 0.0 }).collect();
    let x = on_wgpu(random(vec![n, v], 3.0, 0.0, 7).reshape([n, v]) + Tensor::<Flex, 1>::from_floats(offsets.as_slice(), &Default::default()).reshape([n, 1]), &wd);
    let y: Vec<i32> = (0..n).map(|i| ((i * 7919) % v) as i32).collect();
    let y = Tensor::<Autodiff<Wgpu>, 2, Int>::from_data(TensorData::new(y, [n, 1]), &wd);
    let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 3 { 0.0 } else { 1.0 / 32.0 }).collect();
    let w = Tensor::<Autodiff<Wgpu>, 2>::from_data(TensorData::new(mask, [n, 1]), &wd);
    let grads = |fused: bool| {
        let xa = x.clone().require_grad();
        let l = if fused { loss::fused_cross_entropy::<Wgpu, NoCheckpointing>(xa.clone(), y.clone(), w.clone()) } else { loss::decomposed(xa.clone(), y.clone(), w.clone()) };
        let g = l.clone().backward();
        (l.into_scalar(), Tensor::<Autodiff<Wgpu>, 2>::from_inner(xa.grad(&g).unwrap()))
    };
    let ((lf, gf), (ld, gd)) = (grads(true), grads(false));
    let scale = gd.clone().abs().max().into_scalar();
    let e = (gf.clone() - gd).abs().max().into_scalar() / scale;
    println!("cross-entropy: loss {lf} vs {ld}; gradient {e:.1e}");
    assert!((lf - ld).abs() <= 1e-5 * ld.abs().max(1.0), "loss {lf} vs {ld}");
    assert!(e < tol, "the logits' gradients differ by {e} (largest {scale})");
    assert_eq!(gf.narrow(0, 3, 1).abs().max().into_scalar(), 0.0, "a masked token got a gradient");
}

/// Causal attention by tensor ops on wgpu, the reference for the flash kernels: the output and
/// each row's log-sum-exp of the scaled, masked scores.
fn attention_reference(q: Tensor<Wgpu, 4>, k: Tensor<Wgpu, 4>, v: Tensor<Wgpu, 4>) -> (Tensor<Wgpu, 4>, Tensor<Wgpu, 3>) {
    use burn::tensor::Bool;
    let [b, h, t, hd] = q.dims();
    let hide = Tensor::<Wgpu, 2, Bool>::tril_mask([t, t], 0, &q.device()).unsqueeze::<4>().expand([b, h, t, t]);
    let s = (q.matmul(k.swap_dims(2, 3)) / (hd as f32).sqrt()).mask_fill(hide, -1e30); // [B, H, T, T]
    let m = s.clone().max_dim(3); // [B, H, T, 1]
    let e = (s - m.clone()).exp();
    let sum = e.clone().sum_dim(3); // [B, H, T, 1]
    let o = (e / sum.clone()).matmul(v); // [B, H, T, Hd]
    (o, (m + sum.log()).squeeze_dim::<3>(3))
}

/// `train.flash_attention`: the tiled kernels (trainer/src/cube_kernels/attention.rs) against
/// attention by tensor ops on wgpu: the output, the rows' log-sum-exp and the gradients of q, k
/// and v, for several tiles (every tile size is the same code), sequences shorter than a tile and
/// not a multiple of one, and head dims 16 to 128; then through the autodiff op, flash against
/// the op's own recomputing path.
#[test]
fn flash_attention_kernels_match_tensor_ops_on_wgpu() {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::wgpu::WgpuRuntime;
    use burn::tensor::{Distribution, TensorPrimitive};
    use kiln_models::attention::{self, AttentionKernels};
    use kiln_trainer::cube_kernels::attention::{backward_tiled, forward_tiled, tile};
    if no_adapter("flash attention's CubeCL kernels") {
        return;
    }
    let wd = wgpu_with_fused_adamw();
    kiln_trainer::cube_kernels::register::<WgpuRuntime, u32>();
    assert!(kiln_models::registry::registered::<AttentionKernels<Wgpu>>().is_some());
    // The tiles the device's shared memory allows: bench-gpu's head dim 64 on an H100 takes 64
    // rows, on lavapipe (32 KiB) 16.
    assert_eq!((tile(64, 227 * 1024), tile(128, 227 * 1024), tile(64, 32 * 1024), tile(128, 32 * 1024)), (64, 32, 16, 8));
    let random = |shape: [usize; 4], seed: u64| {
        <Wgpu as burn::tensor::backend::Backend>::seed(&wd, seed);
        Tensor::<Wgpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), &wd)
    };
    let prim = |t: Tensor<Wgpu, 4>| t.into_primitive().tensor();
    let tensor = |p| Tensor::<Wgpu, 4>::from_primitive(TensorPrimitive::Float(p));
    let rel4 = |a: Tensor<Wgpu, 4>, b: Tensor<Wgpu, 4>| rel(Tensor::from_inner(a), Tensor::from_inner(b));
    let tol = 1e-4;
    // (batch, heads, kv heads, T, head dim, tile; 0: the device's). Each (head dim, tile) is a
    // kernel compiled (slowly, on lavapipe): three of them, tiles 8, 16 and 32. Fewer kv heads
    // than heads (grouped-query attention) in two.
    for (b, h, kv, t, hd, tl) in [(1, 2, 2, 5, 64, 16), (2, 3, 3, 70, 64, 0), (2, 1, 1, 40, 128, 8), (1, 1, 1, 33, 24, 32), (2, 6, 2, 37, 64, 16), (1, 3, 1, 20, 128, 8)] {
        let (shape, kv_shape) = ([b, h, t, hd], [b, kv, t, hd]);
        // Scores well away from 0 (queries scaled up), so the softmax is far from uniform.
        let (q, k, v, d_o) = (random(shape, 1) * 3.0, random(kv_shape, 2), random(kv_shape, 3), random(shape, 4));
        // The references on the kv heads repeated, their gradients folded back.
        let g = h / kv;
        let (o_ref, lse_ref) = attention_reference(q.clone(), attention::repeat_kv(k.clone(), g), attention::repeat_kv(v.clone(), g));
        let (dq_ref, dk_ref, dv_ref) = attention::attention_backward(q.clone(), attention::repeat_kv(k.clone(), g), attention::repeat_kv(v.clone(), g), o_ref.clone(), d_o.clone(), None);
        let (dk_ref, dv_ref) = (attention::fold_kv(dk_ref, g), attention::fold_kv(dv_ref, g));
        let (o, lse) = forward_tiled::<WgpuRuntime, u32>(prim(q.clone()), prim(k.clone()), prim(v.clone()), tl);
        let lse = Tensor::<Wgpu, 3>::from_primitive(TensorPrimitive::Float(lse));
        let (dq, dk, dv) = backward_tiled::<WgpuRuntime, u32>(prim(q), prim(k), prim(v), o.clone(), lse.clone().into_primitive().tensor(), prim(d_o), tl);
        let errs = [
            rel4(tensor(o), o_ref),
            rel::<3>(Tensor::from_inner(lse), Tensor::from_inner(lse_ref)),
            rel4(tensor(dq), dq_ref),
            rel4(tensor(dk), dk_ref),
            rel4(tensor(dv), dv_ref),
        ];
        println!("flash attention {shape:?} kv heads {kv} tile {tl}: output {:.1e}, lse {:.1e}, dq {:.1e}, dk {:.1e}, dv {:.1e}", errs[0], errs[1], errs[2], errs[3], errs[4]);
        assert!(errs.iter().all(|e| *e < tol), "flash attention {shape:?} kv heads {kv} tile {tl}: {errs:?}");
    }

    // Through the autodiff op (what the model calls with train.flash_attention), with two kv
    // heads for four query heads.
    let shape = [2, 4, 45, 64];
    let kv_shape = [2, 2, 45, 64];
    let inputs: Vec<Tensor<Autodiff<Wgpu>, 4>> = (5..8).map(|s| Tensor::from_inner(random(if s == 5 { shape } else { kv_shape }, s))).collect();
    let probe = Tensor::<Autodiff<Wgpu>, 4>::from_inner(random(shape, 8));
    let grads = |flash: bool| {
        let [q, k, v] = [0, 1, 2].map(|i| inputs[i].clone().require_grad());
        let y = attention::causal_attention::<Wgpu, NoCheckpointing>(q.clone(), k.clone(), v.clone(), None, flash);
        let g = (y.clone() * probe.clone()).sum().backward();
        [y, Tensor::from_inner(q.grad(&g).unwrap()), Tensor::from_inner(k.grad(&g).unwrap()), Tensor::from_inner(v.grad(&g).unwrap())]
    };
    for (name, (a, b)) in ["output", "dq", "dk", "dv"].iter().zip(grads(true).into_iter().zip(grads(false))) {
        let e = rel(a, b);
        println!("flash attention op {name}: {e:.1e}");
        assert!(e < tol, "flash attention op {name} differs by {e}");
    }
    // What ran is this file's FMA kernels: the tensor-core ones (attention_mma.rs) need
    // cooperative matrices, which Burn's wgpu (WGSL) never reports; their shared memory fits a
    // Hopper block at both head dims.
    use kiln_trainer::cube_kernels::{attention::took_tensor_cores, attention_mma};
    let client = <WgpuRuntime as cubecl::Runtime>::client(&wd);
    assert!(!attention_mma::supported(&client, burn::tensor::DType::BF16, 64));
    assert!(!took_tensor_cores());
    assert!(attention_mma::shared_bytes(64) < attention_mma::shared_bytes(128) && attention_mma::shared_bytes(128) <= 227 * 1024);
}
