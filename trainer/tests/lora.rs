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
