//! Model tests on the Flex CPU backend: save/load round trip, KV cache, GQA, bad checkpoints.

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::checkpoint::{load_dir, save_dir, WEIGHTS};
use kiln_models::generate::{generate, SampleOptions};
use kiln_models::init::RandomInit;
use kiln_models::presets::preset;
use kiln_models::{Llama, Tokenizer};

type B = Flex;

fn tiny() -> (Llama<B>, kiln_models::LlamaConfig, Tokenizer) {
    let tok = Tokenizer::train_char(["abcdefghij klmnop\n"].into_iter()).unwrap();
    let cfg = preset("tiny", tok.vocab_size()).unwrap();
    let model = Llama::<B>::build(&cfg, &mut RandomInit::new(7, cfg.num_hidden_layers), &Default::default()).unwrap();
    (model, cfg, tok)
}

fn tokens(ids: &[i64], b: usize) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [b, ids.len() / b]), &Default::default())
}

fn values(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn save_then_load_gives_identical_logits() {
    let (model, cfg, tok) = tiny();
    let x = tokens(&[1, 2, 3, 4, 5, 6, 7, 8], 2);
    let before = values(model.forward(x.clone()));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("final");
    save_dir(&out, &model, &cfg, &tok).unwrap();
    let (back, cfg2, tok2) = load_dir::<B>(&out, &Default::default()).unwrap();
    assert_eq!(cfg, cfg2);
    assert_eq!(tok2.vocab_size(), tok.vocab_size());
    assert_eq!(before, values(back.forward(x)));
    // Never overwritten in place.
    let err = save_dir(&out, &model, &cfg, &tok).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn hf_names_and_layouts() {
    let (model, cfg, _) = tiny();
    let t = kiln_models::checkpoint::hf_tensors(&model);
    let find = |n: &str| t.iter().find(|x| x.0 == n).unwrap_or_else(|| panic!("{n} missing")).1.clone();
    let hd = cfg.head_dim();
    assert_eq!(find("model.embed_tokens.weight"), vec![cfg.vocab_size, cfg.hidden_size]);
    assert_eq!(find("model.layers.1.self_attn.k_proj.weight"), vec![cfg.num_key_value_heads * hd, cfg.hidden_size]);
    assert_eq!(find("model.layers.0.mlp.down_proj.weight"), vec![cfg.hidden_size, cfg.intermediate_size]);
    assert_eq!(find("lm_head.weight"), vec![cfg.vocab_size, cfg.hidden_size]);
    assert_eq!(find("model.norm.weight"), vec![cfg.hidden_size]);
    assert_eq!(t.len(), 2 + 9 * cfg.num_hidden_layers + 1);
    let n: usize = t.iter().map(|x| x.2.len()).sum();
    assert_eq!(n, cfg.num_params());
}

#[test]
fn kv_cache_matches_full_forward() {
    let (model, _, _) = tiny();
    let ids = [3i64, 1, 4, 1, 5, 9, 2, 6];
    let full = values(model.forward(tokens(&ids, 1)));
    let v = full.len() / ids.len();
    let mut cache = kiln_models::llama::KvCache::new(2);
    let a = values(model.forward_cached(tokens(&ids[..5], 1), Some(&mut cache)));
    let mut got = a;
    for &t in &ids[5..] {
        got.extend(values(model.forward_cached(tokens(&[t], 1), Some(&mut cache))));
    }
    assert_eq!(got.len(), full.len());
    let max_ref = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = got.iter().zip(&full).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_err / max_ref < 1e-5, "cache drifted: {max_err} / {max_ref} (v={v})");
}

#[test]
fn greedy_generation_is_deterministic_and_bounded() {
    let (model, cfg, _) = tiny();
    let o = SampleOptions { max_tokens: 40, temperature: 0.0, ..Default::default() };
    let a = generate(&model, cfg.max_position_embeddings, &[1, 2, 3], &o, &Default::default());
    let b = generate(&model, cfg.max_position_embeddings, &[1, 2, 3], &o, &Default::default());
    assert_eq!(a.len(), 40); // longer than the 32-token context: the window slides
    assert_eq!(a, b);
    assert!(a.iter().all(|&t| (t as usize) < cfg.vocab_size));
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let (model, cfg, tok) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ck");
    save_dir(&out, &model, &cfg, &tok).unwrap();
    let w = out.join(WEIGHTS);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_dir::<B>(&out, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("truncated or corrupt"), "{err}");
    std::fs::write(&w, b"").unwrap();
    assert!(load_dir::<B>(&out, &Default::default()).is_err());
}

#[test]
fn gpt2_tokenizer_from_the_data_root() {
    let Some(root) = kiln_models::skip::data_root() else {
        return;
    };
    let dir = std::path::Path::new(&root).join("gpt2_tokenizer");
    let t = Tokenizer::gpt2_from_files(&dir.join("encoder.json"), &dir.join("vocab.bpe")).unwrap();
    assert_eq!(t.vocab_size(), 50257);
    assert_eq!(t.eos_id, 50256);
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    // Saved as tokenizer.json, it loads back the same.
    let tmp = tempfile::tempdir().unwrap();
    t.save(&tmp.path().join("tokenizer.json")).unwrap();
    let back = Tokenizer::load(&tmp.path().join("tokenizer.json")).unwrap();
    assert_eq!(back.encode(" naïve café").unwrap(), t.encode(" naïve café").unwrap());
    assert_eq!(back.eos_id, 50256);
}

#[test]
fn unsupported_configs_are_refused_with_a_list() {
    let (model, cfg, tok) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    save_dir(&out, &model, &cfg, &tok).unwrap();
    let p = out.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    v["hidden_act"] = "gelu".into();
    v["attention_bias"] = true.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_dir::<B>(&out, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("rope_scaling") && e.contains("yarn") && e.contains("gelu") && e.contains("attention_bias"), "{e}");
}

/// The streamed safetensors writer (checkpoints, `final/`) writes what the safetensors crate
/// reads back, in Hugging Face layout, equal to the eager writer's tensors; a non-finite value
/// stops it with an error naming the tensor.
#[test]
fn streamed_safetensors_read_back_equal() {
    use kiln_models::checkpoint::{hf_tensors, read_safetensors, write_safetensors_streamed, TensorList};
    let (model, _, _) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write_safetensors_streamed(&path, &TensorList::model(&model).hf_layout(), &[("kiln", "1".into())]).unwrap();
    let back = read_safetensors(&path).unwrap();
    let eager = hf_tensors(&model);
    assert_eq!(back.len(), eager.len());
    for (name, shape, values) in &eager {
        let (s, v) = &back[name];
        assert_eq!((s, v), (shape, values), "{name}");
    }
    let bytes = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header % 8, 0);
    let meta: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    assert_eq!(meta["__metadata__"]["format"], "pt");
    assert_eq!(meta["__metadata__"]["kiln"], "1");

    let bad = TensorList::from_host(vec![("a".into(), vec![2], vec![1.0, 2.0]), ("b".into(), vec![3], vec![0.0, f32::NAN, 1.0])]);
    let e = write_safetensors_streamed(&dir.path().join("bad.safetensors"), &bad, &[]).unwrap_err().to_string();
    assert!(e.contains("'b'") && e.contains("non-finite"), "{e}");
}
