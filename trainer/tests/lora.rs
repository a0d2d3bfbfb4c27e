//! LoRA adapter folders through the `kiln` binary: PEFT's adapter (the committed fixture, made by
//! `scripts/make_peft_fixture.py`) is a model argument like any other for `kiln generate`, and
//! `kiln export --merge` writes its base with the adapter merged in, which loads with PEFT's
//! logits.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures")
}

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(KILN).args(args).env("KILN_CACHE", dir.join("cache")).env("RAYON_NUM_THREADS", "2").current_dir(dir).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn peft_adapter_exports_merged_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("peft-tiny-lora");
    let a = adapter.to_str().unwrap();

    // An adapter folder exports only merged, and --merge only takes adapters.
    let o = kiln(tmp.path(), &["export", a]);
    assert!(!o.status.success() && text(&o).1.contains("--merge"), "{}", text(&o).1);
    let base = fixtures().join("hf-tiny-llama");
    let o = kiln(tmp.path(), &["export", base.to_str().unwrap(), "--merge", "--out", "x"]);
    assert!(!o.status.success() && text(&o).1.contains("not a LoRA adapter folder"), "{}", text(&o).1);

    let out = tmp.path().join("merged");
    let o = kiln(tmp.path(), &["export", a, "--merge", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let (model, cfg, _) = kiln_models::checkpoint::load_dir::<Flex>(&out, &Default::default()).unwrap();
    assert_eq!(cfg.num_hidden_layers, 2);
    let mut want = kiln_models::checkpoint::read_safetensors(&fixtures().join("peft_tiny_lora_expected.safetensors")).unwrap();
    let (ishape, ids) = want.remove("input_ids").unwrap();
    let (_, want) = want.remove("logits").unwrap();
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [ishape[0], ishape[1]]), &Default::default());
    let got: Vec<f32> = model.forward(x).into_data().to_vec().unwrap();
    let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let rel = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / max_ref;
    assert!(rel < 1e-4, "merged export vs PEFT: relative error {rel}");

    // The adapter folder and the merged export generate the same text, greedily.
    let gen = |m: &str| {
        let o = kiln(tmp.path(), &["generate", m, "--prompt", "abc", "--max-tokens", "12", "--temperature", "0", "--device", "cpu"]);
        assert!(o.status.success(), "{}", text(&o).1);
        text(&o).0
    };
    let (g1, g2) = (gen(a), gen(out.to_str().unwrap()));
    assert!(!g1.trim().is_empty());
    assert_eq!(g1, g2);
}

/// `init = ADAPTER_DIR` starts fine-tuning from the adapter merged into its base: the first
/// step's loss is the same, bit for bit, as from the merged export.
#[test]
fn init_from_an_adapter_is_init_from_its_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let chat: String = (0..40).map(|i| format!("{}\n", serde_json::json!({"messages": [{"role": "user", "content": format!("{i} plus one?")}, {"role": "assistant", "content": format!("{}", i + 1)}]}))).collect();
    std::fs::write(data.join("chat.jsonl"), chat).unwrap();
    let adapter = fixtures().join("peft-tiny-lora");
    let merged = tmp.path().join("merged");
    let o = kiln(tmp.path(), &["export", adapter.to_str().unwrap(), "--merge", "--out", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let first_loss = |name: &str, init: &Path| {
        let recipe = tmp.path().join(format!("{name}.toml"));
        let body = format!(
            "name = \"{name}\"\nstage = \"sft\"\ninit = {:?}\n[data]\nsources = [\"chat.jsonl\"]\nval_fraction = 0.1\n[optim]\nlr = 1e-3\nwarmup_steps = 1\n[train]\ndevice = \"cpu\"\nsteps = 2\nbatch_size = 2\neval_every = 0\ncheckpoint_every = 0\n[eval]\ntasks = []\n",
            init.to_str().unwrap()
        );
        std::fs::write(&recipe, body).unwrap();
        let runs = tmp.path().join(format!("runs-{name}"));
        let o = Command::new(KILN)
            .args(["run", recipe.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()])
            .env("KILN_DATA", &data)
            .env("KILN_CACHE", tmp.path().join("cache"))
            .env("RAYON_NUM_THREADS", "2")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o).1);
        let run = std::fs::read_dir(&runs).unwrap().next().unwrap().unwrap().path();
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        first["loss"].as_f64().unwrap()
    };
    let (a, m) = (first_loss("from-adapter", &adapter), first_loss("from-merged", &merged));
    assert!(a.is_finite() && a > 0.0);
    assert_eq!(a.to_bits(), m.to_bits(), "{a} vs {m}");
}

/// Runs `kiln run` on `recipe` (TOML text) in `tmp` with the data in `tmp/data`; returns the
/// run directory, or the failed output.
fn run_recipe(tmp: &Path, name: &str, recipe: &str) -> Result<PathBuf, Output> {
    let path = tmp.join(format!("{name}.toml"));
    std::fs::write(&path, recipe).unwrap();
    let runs = tmp.join(format!("runs-{name}"));
    let o = Command::new(KILN)
        .args(["run", path.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()])
        .env("KILN_DATA", tmp.join("data"))
        .env("KILN_CACHE", tmp.join("cache"))
        .env("RAYON_NUM_THREADS", "2")
        .current_dir(tmp)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(o);
    }
    Ok(std::fs::read_dir(&runs).unwrap().next().unwrap().unwrap().path())
}

fn losses(run: &Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter_map(|v| v["loss"].as_f64()).collect()
}

/// A LoRA recipe on the tiny transformers model: continued pretraining on text, 4 steps,
/// checkpoints at 2 and 4.
fn lora_recipe(name: &str, kernels: bool, extra: &str) -> String {
    let base = fixtures().join("hf-tiny-llama");
    format!(
        "name = \"{name}\"\ninit = {:?}\n[model]\ncontext = 32\n[data]\nsources = [\"text.txt\"]\nval_fraction = 0.1\n[optim]\nlr = 1e-2\nwarmup_steps = 1\n[train]\ndevice = \"cpu\"\ncpu_kernels = {kernels}\nsteps = 4\nbatch_size = 3\ngrad_accum = 2\neval_every = 0\ncheckpoint_every = 2\nkeep_checkpoints = 5\n[eval]\ntasks = []\n{extra}",
        base.to_str().unwrap()
    )
}

const LORA: &str = "[lora]\nrank = 4\nalpha = 8\ntargets = [\"all-linear\"]\n";

/// `[lora]` training on both engines: step 1's loss is the base model's (bit for bit against a
/// full fine-tuning run); `final/` and every checkpoint are PEFT adapter folders holding trained
/// adapters and their moments only; the base stays frozen (the merged export's unadapted tensors
/// are the base's bits, the adapted ones the base plus `s·B·A`); Burn's graph and the kernels
/// train the same adapters; `kiln resume` continues exactly; `kiln export` writes the adapter
/// with a card naming the base.
#[test]
fn lora_trains_only_adapters_on_both_engines_and_resumes_exactly() {
    use kiln_models::lora::Adapter;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let corpus: String = (0..300).map(|i| format!("the {} cat sat on the {} mat. ", ["red", "blue", "green"][i % 3], ["big", "small"][i % 2])).collect();
    std::fs::write(data.join("text.txt"), corpus).unwrap();

    let full = run_recipe(tmp.path(), "full", &lora_recipe("full", true, "")).map_err(|o| text_of(&o)).unwrap();
    let kern = run_recipe(tmp.path(), "kern", &lora_recipe("kern", true, LORA)).map_err(|o| text_of(&o)).unwrap();
    let graph = run_recipe(tmp.path(), "graph", &lora_recipe("graph", false, LORA)).map_err(|o| text_of(&o)).unwrap();
    let (lf, lk, lg) = (losses(&full), losses(&kern), losses(&graph));
    assert_eq!(lk.len(), 4);
    assert_eq!(lf[0].to_bits(), lk[0].to_bits(), "step 1 of LoRA is the base model: {} vs {}", lf[0], lk[0]);
    assert!(lk[3] < lk[0], "LoRA did not learn: {lk:?}");
    for (a, b) in lk.iter().zip(&lg) {
        assert!((a - b).abs() < 1e-4 * a.abs(), "kernels {lk:?} vs graph {lg:?}");
    }
    // final/ and the checkpoints are adapter folders, with the adapters' moments only.
    for run in [&kern, &graph] {
        let fin = run.join("final");
        assert!(kiln_models::lora::is_adapter_dir(&fin), "{}", fin.display());
        let ck = run.join("checkpoints/step-0000002");
        assert!(kiln_models::lora::is_adapter_dir(&ck) && ck.join("state.json").is_file());
        let opt = kiln_models::checkpoint::read_safetensors(&ck.join("optimizer.safetensors")).unwrap();
        assert_eq!(opt.len(), 2 * 2 * 14, "two moments of A and B for 14 projections");
        assert!(opt.keys().all(|k| k.starts_with("lora.")), "{:?}", opt.keys().collect::<Vec<_>>());
    }
    let (ak, ag) = (Adapter::read_dir(&kern.join("final")).unwrap(), Adapter::read_dir(&graph.join("final")).unwrap());
    assert_eq!(ak.pairs.len(), 14);
    assert!(ak.pairs.values().all(|p| p.b.iter().any(|&x| x != 0.0)), "every B trained");
    for (path, p) in &ak.pairs {
        let q = &ag.pairs[path];
        let scale = p.b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let e = p.b.iter().zip(&q.b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(e < 1e-3, "{path}: B differs by {e} between the engines");
    }
    assert_eq!(Path::new(&ak.base), std::fs::canonicalize(fixtures().join("hf-tiny-llama")).unwrap());

    // Frozen base: merged = base + s·B·A, the rest the base's bits.
    let merged = tmp.path().join("merged");
    let o = kiln(tmp.path(), &["export", kern.to_str().unwrap(), "--merge", "--out", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let base = kiln_models::checkpoint::SafetensorsSource::open_dir(&fixtures().join("hf-tiny-llama")).unwrap().into_tensors();
    let got = kiln_models::checkpoint::SafetensorsSource::open_dir(&merged).unwrap().into_tensors();
    let got: std::collections::HashMap<_, _> = got.into_iter().map(|(n, _, v)| (n, v)).collect();
    for (name, _, b) in &base {
        let m = &got[name];
        match name.strip_suffix(".weight").and_then(|p| ak.delta(p)) {
            Some(delta) => {
                let e = m.iter().zip(b).zip(&delta).fold(0f32, |e, ((m, b), d)| e.max((m - (b + d)).abs()));
                assert!(e < 1e-5, "{name}: merged - base differs from s·B·A by {e}");
            }
            None => assert!(m.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} changed: the base was not frozen"),
        }
    }

    // Exact resume: from the step-2 checkpoint, steps 3 and 4 again, bit for bit.
    let again = tmp.path().join("again");
    copy_dir(&kern, &again);
    std::fs::remove_dir_all(again.join("final")).unwrap();
    std::fs::remove_dir_all(again.join("checkpoints/step-0000004")).unwrap();
    let o = Command::new(KILN).args(["resume", again.to_str().unwrap()]).env("KILN_DATA", &data).env("KILN_CACHE", tmp.path().join("cache")).env("RAYON_NUM_THREADS", "2").current_dir(tmp.path()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let la = losses(&again);
    assert_eq!(la.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lk.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{la:?} vs {lk:?}");
    let f = |r: &Path| std::fs::read(r.join("final").join("adapter_model.safetensors")).unwrap();
    assert!(f(&again) == f(&kern), "the resumed run's adapters differ");

    // kiln export: the adapter folder in PEFT's format with a card naming the base.
    let out = tmp.path().join("adapter-export");
    let o = kiln(tmp.path(), &["export", kern.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(kiln_models::lora::is_adapter_dir(&out));
    assert_eq!(Adapter::read_dir(&out).unwrap(), ak);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for want in ["library_name: peft", "base_model:", "PeftModel.from_pretrained", "Rank 4, alpha 8", "## Energy"] {
        assert!(card.contains(want), "card lacks {want}:\n{card}");
    }
    let o = kiln(tmp.path(), &["publish", kern.to_str().unwrap(), "--repo", "kiln-user/tiny-lora", "--dry-run"]);
    assert!(o.status.success() && text(&o).0.contains("adapter_model.safetensors"), "{}", text(&o).0);

    peft_loads_the_trained_adapter(&kern.join("final"), &ak, tmp.path());
}

/// PEFT (`PeftModel.from_pretrained(base, final/)`, scripts/peft_check.py) gives the logits Kiln
/// computes with the trained adapter unmerged, within 1e-4 relative.
fn peft_loads_the_trained_adapter(dir: &Path, adapter: &kiln_models::lora::Adapter, tmp: &Path) {
    let py = match kiln_models::skip::python_with("torch, transformers, peft") {
        Ok(p) => p,
        Err(why) => {
            kiln_models::skip::skip("python", &format!("PEFT parity of a trained adapter: {why}; `pip install torch transformers peft` to run it"));
            return;
        }
    };
    let base = fixtures().join("hf-tiny-llama");
    let device = Default::default();
    let (mut model, cfg, _) = kiln_models::checkpoint::load_dir::<Flex>(&base, &device).unwrap();
    model.lora = Some(kiln_models::lora_params::Lora::build(adapter, cfg.num_hidden_layers, &device).unwrap());
    let ids: Vec<i64> = (0..24).map(|i| ((i * 31 + 5) % 259) as i64).collect();
    let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 12]), &device);
    let got: Vec<f32> = model.forward(x).into_data().to_vec().unwrap();
    let rows = ids.chunks(12).map(|r| r.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")).collect::<Vec<_>>().join(";");
    let out = tmp.join("peft-trained.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/peft_check.py");
    let o = Command::new(&py).arg(&script).arg(&base).arg(dir).args(["--ids", &rows, "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "peft_check.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let (_, want) = kiln_models::checkpoint::read_safetensors(&out).unwrap().remove("logits").unwrap();
    let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let rel = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / max_ref;
    println!("trained adapter: max |kiln - peft| / max |peft| = {rel:.2e}");
    assert!(rel < 1e-4, "trained adapter through PEFT: relative error {rel}");
}

/// Clear errors before any step: `[lora]` without `init`, an adapter `init` whose spec differs
/// from `[lora]`, an adapter that does not fit the base, and a chat template that would add
/// tokens to a frozen embedding.
#[test]
fn lora_refuses_what_it_cannot_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("text.txt"), "abc abc abc ".repeat(200)).unwrap();
    let chat: String = (0..20).map(|i| format!("{}\n", serde_json::json!({"messages": [{"role": "user", "content": format!("{i}?")}, {"role": "assistant", "content": "ok"}]}))).collect();
    std::fs::write(data.join("chat.jsonl"), chat).unwrap();
    let err = |name: &str, recipe: String| text_of(&run_recipe(tmp.path(), name, &recipe).err().unwrap_or_else(|| panic!("{name} ran")));

    let no_init = lora_recipe("a", true, LORA).lines().filter(|l| !l.starts_with("init")).collect::<Vec<_>>().join("\n");
    let e = err("no-init", no_init);
    assert!(e.contains("lora") && e.contains("set init"), "{e}");

    // The PEFT fixture is rank 4, alpha 8 on all seven projections.
    let peft = fixtures().join("peft-tiny-lora");
    let other = lora_recipe("b", true, "[lora]\nrank = 8\nalpha = 16\n").replace(&format!("{:?}", fixtures().join("hf-tiny-llama").to_str().unwrap()), &format!("{:?}", peft.to_str().unwrap()));
    let e = err("other-spec", other);
    assert!(e.contains("rank 4") && e.contains("rank 8") && e.contains("hint"), "{e}");

    let sft = lora_recipe("c", true, LORA).replace("name = \"c\"", "name = \"c\"\nstage = \"sft\"").replace("text.txt", "chat.jsonl");
    let e = err("sft-new-tokens", sft);
    assert!(e.contains("frozen") && e.contains("hint"), "{e}");

    let e = err("dropout", lora_recipe("d", true, "[lora]\ndropout = 1.0\n"));
    assert!(e.contains("lora.dropout") && e.contains("[0, 1)"), "{e}");
    let e = err("dtype", lora_recipe("e", true, "[lora]\nbase_dtype = \"fp8\"\n"));
    assert!(e.contains("lora.base_dtype") && e.contains("f16"), "{e}");
}

fn text_of(o: &Output) -> String {
    let (a, b) = text(o);
    format!("{a}{b}")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// `lora.base_dtype = "bf16"`: the frozen base held in bf16 trains the same adapters on Burn's
/// graph and the CPU kernels, and (the fixture's weights being bf16 values) the same losses, bit
/// for bit, as the base held in f32.
#[test]
fn lora_on_a_bf16_base_trains_alike_on_both_engines() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let corpus: String = (0..300).map(|i| format!("a {} dog ran to the {} park. ", ["tall", "short", "old"][i % 3], ["near", "far"][i % 2])).collect();
    std::fs::write(data.join("text.txt"), corpus).unwrap();
    let half = format!("{LORA}base_dtype = \"bf16\"\n");
    let f32_run = run_recipe(tmp.path(), "f32", &lora_recipe("f32", true, LORA)).map_err(|o| text_of(&o)).unwrap();
    let kern = run_recipe(tmp.path(), "kern16", &lora_recipe("kern16", true, &half)).map_err(|o| text_of(&o)).unwrap();
    let graph = run_recipe(tmp.path(), "graph16", &lora_recipe("graph16", false, &half)).map_err(|o| text_of(&o)).unwrap();
    let (l32, lk, lg) = (losses(&f32_run), losses(&kern), losses(&graph));
    for (a, b) in lk.iter().zip(&lg) {
        assert!((a - b).abs() < 1e-4 * a.abs(), "kernels {lk:?} vs graph {lg:?}");
    }
    // The fixture was saved in bfloat16, so its weights are bf16 values already: held in bf16
    // (each layer decoded as it runs, the head a vocabulary chunk at a time) they train the
    // same adapters, bit for bit, as held in f32.
    assert_eq!(lk.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), l32.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "bf16 base {lk:?} vs f32 base {l32:?}");
    assert!(lk[3] < lk[0], "{lk:?}");
    assert!(kiln_models::lora::is_adapter_dir(&kern.join("final")));
}

/// LoRA dropout (`lora.dropout`): Burn's graph and the kernels drop the same values (one counter
/// hash), so they train alike; step 1 is still the base model (B = 0), later steps differ from
/// a run without dropout; a resumed run drops what the uninterrupted one did, bit for bit. A
/// base held in f16 trains alike on both engines too.
#[test]
fn lora_dropout_and_an_f16_base_train_alike_on_both_engines_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let corpus: String = (0..300).map(|i| format!("one {} bird sang in the {} tree. ", ["small", "loud", "grey"][i % 3], ["old", "new"][i % 2])).collect();
    std::fs::write(data.join("text.txt"), corpus).unwrap();
    let dropped = format!("{LORA}dropout = 0.25\n");
    let plain = run_recipe(tmp.path(), "plain", &lora_recipe("plain", true, LORA)).map_err(|o| text_of(&o)).unwrap();
    let kern = run_recipe(tmp.path(), "kdrop", &lora_recipe("kdrop", true, &dropped)).map_err(|o| text_of(&o)).unwrap();
    let graph = run_recipe(tmp.path(), "gdrop", &lora_recipe("gdrop", false, &dropped)).map_err(|o| text_of(&o)).unwrap();
    let (lp, lk, lg) = (losses(&plain), losses(&kern), losses(&graph));
    assert_eq!(lp[0].to_bits(), lk[0].to_bits(), "step 1 is the base model, dropout or not");
    for (a, b) in lk.iter().zip(&lg) {
        assert!((a - b).abs() < 1e-4 * a.abs(), "kernels {lk:?} vs graph {lg:?}");
    }
    assert!(lk[1..].iter().zip(&lp[1..]).all(|(a, b)| (a - b).abs() > 1e-7 * b.abs()), "dropout changed nothing: {lk:?} vs {lp:?}");
    assert!(lk[3] < lk[0], "{lk:?}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kern.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["lora_dropout"].as_f64(), Some(0.25));

    // Exact resume with dropout, on each engine.
    for run in [&kern, &graph] {
        let again = tmp.path().join(format!("again-{}", run.file_name().unwrap().to_string_lossy()));
        copy_dir(run, &again);
        std::fs::remove_dir_all(again.join("final")).unwrap();
        std::fs::remove_dir_all(again.join("checkpoints/step-0000004")).unwrap();
        let o = Command::new(KILN).args(["resume", again.to_str().unwrap()]).env("KILN_DATA", &data).env("KILN_CACHE", tmp.path().join("cache")).env("RAYON_NUM_THREADS", "2").current_dir(tmp.path()).output().unwrap();
        assert!(o.status.success(), "{}", text(&o).1);
        let (la, lr) = (losses(&again), losses(run));
        assert_eq!(la.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lr.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{la:?} vs {lr:?}");
    }

    // An f16 base: both engines, alike.
    let f16 = format!("{LORA}base_dtype = \"f16\"\n");
    let k16 = run_recipe(tmp.path(), "k16", &lora_recipe("k16", true, &f16)).map_err(|o| text_of(&o)).unwrap();
    let g16 = run_recipe(tmp.path(), "g16", &lora_recipe("g16", false, &f16)).map_err(|o| text_of(&o)).unwrap();
    let (lk16, lg16) = (losses(&k16), losses(&g16));
    for (a, b) in lk16.iter().zip(&lg16) {
        assert!((a - b).abs() < 1e-4 * a.abs(), "f16 base: kernels {lk16:?} vs graph {lg16:?}");
    }
    assert!((lk16[0] - lp[0]).abs() < 1e-2 * lp[0], "f16 rounding moved step 1 far: {} vs {}", lk16[0], lp[0]);
    assert!(lk16[3] < lk16[0], "{lk16:?}");
}
