//! LoRA adapters in PEFT's format (models/src/lora.rs): the spec, the maths of a merged
//! projection, fresh adapters that leave the base unchanged, the folder round trip, clear
//! errors for adapters that do not fit, and parity with PEFT both ways: an adapter made by PEFT
//! (the committed fixture, `scripts/make_peft_fixture.py`) loads in Kiln with PEFT's logits, and
//! an adapter written by Kiln loads in PEFT with Kiln's logits (live, with Python).

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::checkpoint::{load, load_dir, read_safetensors};
use kiln_models::lora::{module_dims, module_path, Adapter, LoraSpec, Merged, Pair};
use kiln_models::skip::skip;
use kiln_models::{Llama, LlamaConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn all() -> Vec<String> {
    vec!["all-linear".to_string()]
}

fn logits(model: &Llama<Flex>, ids: &[i64], b: usize) -> Vec<f32> {
    let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.to_vec(), [b, ids.len() / b]), &Default::default());
    model.forward(x).into_data().to_vec().unwrap()
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let max_ref = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max_ref
}

/// An adapter for `cfg` with every A and B drawn at random, so that it changes the model.
fn random_adapter(cfg: &LlamaConfig, base: &str) -> Adapter {
    let mut a = Adapter::init(LoraSpec::new(4, 8.0, 0.0, &all()).unwrap(), base.into(), cfg, 3);
    for (k, p) in a.pairs.values_mut().enumerate() {
        p.b.iter_mut().enumerate().for_each(|(i, x)| *x = (((i * 7 + k * 13) % 17) as f32 - 8.0) * 0.01);
    }
    a
}

#[test]
fn spec_targets_and_scaling() {
    let s = LoraSpec::new(16, 32.0, 0.05, &all()).unwrap();
    assert_eq!(s.targets, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    assert_eq!(s.scaling(), 2.0);
    let s = LoraSpec::new(4, 8.0, 0.0, &["v_proj".into(), "q_proj".into()]).unwrap();
    assert_eq!(s.targets, ["q_proj", "v_proj"]);
    for (r, alpha, dropout, t, want) in [
        (0, 8.0, 0.0, "q_proj", "rank"),
        (4, 0.0, 0.0, "q_proj", "alpha"),
        (4, 8.0, 1.0, "q_proj", "dropout"),
        (4, 8.0, 0.0, "qkv", "unknown target 'qkv'"),
    ] {
        let e = LoraSpec::new(r, alpha, dropout, &[t.to_string()]).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(LoraSpec::new(4, 8.0, 0.0, &[]).unwrap_err().to_string().contains("no targets"));
}

/// `x·(W + s·B·A)ᵀ` equals `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, the unmerged form PEFT computes.
#[test]
fn merged_weight_equals_the_unmerged_forward() {
    let (d_in, d_out, r) = (5, 3, 2);
    let spec = LoraSpec { rank: r, alpha: 3.0, dropout: 0.0, targets: vec!["q_proj".into()], rslora: false };
    let a: Vec<f32> = (0..r * d_in).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..d_out * r).map(|i| (i as f32 * 0.71).cos()).collect();
    let w: Vec<f32> = (0..d_out * d_in).map(|i| (i as f32 * 0.13).sin()).collect(); // [out, in]
    let x: Vec<f32> = (0..d_in).map(|i| i as f32 - 2.0).collect();
    let mut ad = Adapter { spec: spec.clone(), base: String::new(), pairs: Default::default() };
    ad.pairs.insert("model.layers.0.self_attn.q_proj".into(), Pair { d_in, d_out, a: a.clone(), b: b.clone() });
    let delta = ad.delta("model.layers.0.self_attn.q_proj").unwrap();
    let s = spec.scaling() as f32;
    for o in 0..d_out {
        let merged: f32 = (0..d_in).map(|i| x[i] * (w[o * d_in + i] + delta[o * d_in + i])).sum();
        let xa: Vec<f32> = (0..r).map(|k| (0..d_in).map(|i| x[i] * a[k * d_in + i]).sum()).collect();
        let unmerged: f32 = (0..d_in).map(|i| x[i] * w[o * d_in + i]).sum::<f32>() + s * (0..r).map(|k| xa[k] * b[o * r + k]).sum::<f32>();
        assert!((merged - unmerged).abs() < 1e-5, "row {o}: {merged} vs {unmerged}");
    }
    assert!(ad.delta("model.layers.0.self_attn.k_proj").is_none());
}

/// A fresh adapter (A Kaiming-uniform, B zero) is the base model exactly; A lies within PEFT's
/// bound, 1/√in.
#[test]
fn a_fresh_adapter_is_the_base_model() {
    let dir = fixtures().join("hf-tiny-llama");
    let (base, cfg, _) = load_dir::<Flex>(&dir, &Default::default()).unwrap();
    let ad = Adapter::init(LoraSpec::new(8, 16.0, 0.0, &all()).unwrap(), dir.display().to_string(), &cfg, 1);
    assert_eq!(ad.pairs.len(), 7 * cfg.num_hidden_layers);
    for (path, p) in &ad.pairs {
        let bound = 1.0 / (p.d_in as f32).sqrt();
        assert!(p.a.iter().all(|x| x.abs() <= bound) && p.a.iter().any(|x| x.abs() > 0.5 * bound), "{path}");
        assert!(p.b.iter().all(|&x| x == 0.0));
    }
    let mut src = Merged { inner: kiln_models::checkpoint::weight_source(&dir).unwrap(), adapter: ad };
    let merged = Llama::<Flex>::build(&cfg, &mut src, &Default::default()).unwrap();
    let ids: Vec<i64> = (0..16).map(|i| (i * 17 % 259) as i64).collect();
    assert_eq!(logits(&merged, &ids, 2), logits(&base, &ids, 2));
}

#[test]
fn adapter_folders_round_trip_with_peft_names() {
    let dir = fixtures().join("hf-tiny-llama");
    let (_, cfg, _) = load_dir::<Flex>(&dir, &Default::default()).unwrap();
    let ad = random_adapter(&cfg, "../base");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    ad.save_dir(&out).unwrap();
    assert_eq!(Adapter::read_dir(&out).unwrap(), ad);
    let t = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    let (d_in, d_out) = module_dims(&cfg, "down_proj").unwrap();
    assert_eq!(t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].0, vec![4, d_in]);
    assert_eq!(t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].0, vec![d_out, 4]);
    assert_eq!(t.len(), 2 * 7 * cfg.num_hidden_layers);
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((c["peft_type"].as_str(), c["r"].as_u64(), c["lora_alpha"].as_f64()), (Some("LORA"), Some(4), Some(8.0)));
    assert_eq!(c["base_model_name_or_path"], "../base");
    // Never overwritten in place.
    assert!(ad.save_dir(&out).unwrap_err().to_string().contains("already exists"));
}

/// Adapters Kiln cannot apply exactly, or that do not fit the base, are errors that say so.
#[test]
fn adapters_that_do_not_fit_are_clear_errors() {
    let dir = fixtures().join("hf-tiny-llama");
    let (_, cfg, _) = load_dir::<Flex>(&dir, &Default::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let save = |ad: &Adapter, name: &str| {
        let p = tmp.path().join(name);
        ad.save_dir(&p).unwrap();
        p
    };
    let edit_config = |p: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let path = p.join("adapter_config.json");
        let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut c);
        std::fs::write(&path, c.to_string()).unwrap();
    };
    let good = random_adapter(&cfg, &dir.display().to_string());

    // Another base: a layer it lacks, a projection of another shape.
    let mut deep = good.clone();
    let p = deep.pairs["model.layers.0.self_attn.q_proj"].clone();
    deep.pairs.insert(module_path(7, "q_proj"), p);
    let e = deep.check(&cfg, tmp.path()).unwrap_err().to_string();
    assert!(e.contains("model.layers.7.self_attn.q_proj") && e.contains("2 layers") && e.contains("another base model"), "{e}");
    let mut wide = good.clone();
    let p = wide.pairs.get_mut("model.layers.1.mlp.up_proj").unwrap();
    p.d_out += 1;
    p.b.extend(vec![0.0; 4]);
    let e = wide.check(&cfg, tmp.path()).unwrap_err().to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj") && e.contains("the base's is"), "{e}");
    let p = save(&wide, "wide");
    let e = load::<Flex>(&p, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("up_proj"), "{e}");

    // What Kiln cannot apply exactly.
    for (key, value, want) in [
        ("peft_type", serde_json::json!("IA3"), "peft_type is \"IA3\""),
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("rank_pattern", serde_json::json!({"q_proj": 8}), "rank_pattern"),
        ("bias", serde_json::json!("all"), "bias"),
        ("target_modules", serde_json::json!(["q_proj"]), "not among target_modules"),
        ("r", serde_json::json!(8), "but r is 8"),
    ] {
        let p = save(&good, key);
        edit_config(&p, &|c| c[key] = value.clone());
        let e = Adapter::read_dir(&p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(&p.display().to_string()), "{key}: {e}");
    }
    let p = save(&good, "nobase");
    edit_config(&p, &|c| c["base_model_name_or_path"] = "/nowhere/base".into());
    let e = load::<Flex>(&p, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("/nowhere/base") && e.contains("hint"), "{e}");
    // An adapter on an adapter: refused, not followed round in circles.
    let p = save(&good, "selfbase");
    edit_config(&p, &|c| c["base_model_name_or_path"] = ".".into());
    let e = load::<Flex>(&p, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("itself an adapter"), "{e}");
    let p = save(&good, "halfrank");
    edit_config(&p, &|c| c["r"] = 4.5.into());
    assert!(Adapter::read_dir(&p).unwrap_err().to_string().contains("whole number"));
    // A full model folder that also has an adapter_config.json is the full model.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, full.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(p.join("adapter_config.json"), full.join("adapter_config.json")).unwrap();
    assert!(!kiln_models::lora::is_adapter_dir(&full));
    load::<Flex>(&full, &Default::default()).unwrap();
    let p = tmp.path().join("empty");
    std::fs::create_dir(&p).unwrap();
    std::fs::write(p.join("adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": 4").unwrap();
    assert!(Adapter::read_dir(&p).unwrap_err().to_string().contains("not valid JSON"));
}

/// An adapter made by PEFT (the committed fixture) loads in Kiln, merged into its base (named
/// relative to the adapter folder), with the logits PEFT computed unmerged.
#[test]
fn peft_adapter_loads_with_peft_logits() {
    let dir = fixtures().join("peft-tiny-lora");
    let (model, cfg, _) = load::<Flex>(&dir, &Default::default()).unwrap();
    assert_eq!(cfg.num_hidden_layers, 2);
    let mut want = read_safetensors(&fixtures().join("peft_tiny_lora_expected.safetensors")).unwrap();
    let (ishape, ids) = want.remove("input_ids").unwrap();
    let (_, want) = want.remove("logits").unwrap();
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let got = logits(&model, &ids, ishape[0]);
    let r = rel(&got, &want);
    println!("max |kiln - peft| / max |peft| = {r:.2e}");
    assert!(r < 1e-4, "relative error {r}");
    // The adapter matters: the base alone is far from PEFT's logits.
    let (base, _, _) = load_dir::<Flex>(&fixtures().join("hf-tiny-llama"), &Default::default()).unwrap();
    assert!(rel(&logits(&base, &ids, ishape[0]), &want) > 1e-2);
}

/// Python with torch, transformers, peft, or why not.
fn python_with_peft() -> Result<String, String> {
    kiln_models::skip::python_with("torch, transformers, peft")
}

/// An adapter written by Kiln loads in PEFT (`PeftModel.from_pretrained`) and gives Kiln's
/// logits; PEFT would ignore a misnamed tensor with a warning, which the script turns into a
/// failure.
#[test]
fn kiln_adapter_loads_in_peft_with_kiln_logits() {
    let py = match python_with_peft() {
        Ok(p) => p,
        Err(why) => {
            skip("python", &format!("kiln_adapter_loads_in_peft_with_kiln_logits: {why}; `pip install torch transformers peft` to run it"));
            return;
        }
    };
    let base = fixtures().join("hf-tiny-llama");
    let (_, cfg, _) = load_dir::<Flex>(&base, &Default::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    random_adapter(&cfg, &base.display().to_string()).save_dir(&adapter).unwrap();
    let (model, _, _) = load::<Flex>(&adapter, &Default::default()).unwrap();
    let ids: Vec<i64> = (0..20).map(|i| ((i * 31 + 5) % 259) as i64).collect();
    let got = logits(&model, &ids, 2);
    let rows = ids.chunks(10).map(|r| r.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")).collect::<Vec<_>>().join(";");
    let out = tmp.path().join("peft.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/peft_check.py");
    let o = Command::new(&py).arg(&script).arg(&base).arg(&adapter).args(["--ids", &rows, "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "peft_check.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let (_, want) = read_safetensors(&out).unwrap().remove("logits").unwrap();
    let r = rel(&got, &want);
    println!("max |kiln - peft| / max |peft| = {r:.2e}");
    assert!(r < 1e-4, "relative error {r}");
    let (plain, _, _) = load_dir::<Flex>(&base, &Default::default()).unwrap();
    assert!(rel(&logits(&plain, &ids, 2), &want) > 1e-2, "the adapter changed nothing");
}
