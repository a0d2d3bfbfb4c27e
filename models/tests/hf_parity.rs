//! Parity with Hugging Face `transformers`: a tiny random Llama made and saved by transformers
//! itself (`scripts/make_hf_fixture.py`: bf16 weights, tied embeddings, GQA 4/2, a config with
//! `dtype` and `rope_parameters` as transformers 5 writes them) loads in Kiln as any Hub checkpoint
//! and gives transformers' logits within 1e-4 relative error.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::checkpoint::{load_dir, read_config, read_safetensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn transformers_checkpoint_loads_with_matching_logits() {
    let dir = fixtures().join("hf-tiny-llama");
    let device = Default::default();
    let (model, cfg, tok) = load_dir::<Flex>(&dir, &device).unwrap();
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings), (4, 2, true));
    assert_eq!((tok.bos_id, tok.eos_id, tok.vocab_size()), (256, 257, 259));
    // The tokenizer made by `tokenizers` in Python encodes as Kiln's does: one id per byte.
    assert_eq!(tok.encode("Hi é").unwrap(), vec![72, 105, 32, 195, 169]);

    let mut want = read_safetensors(&fixtures().join("hf_tiny_llama_expected.safetensors")).unwrap();
    let (ishape, ids) = want.remove("input_ids").unwrap();
    let (lshape, want) = want.remove("logits").unwrap();
    assert_eq!(lshape, vec![ishape[0], ishape[1], 259]);
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [ishape[0], ishape[1]]), &device);
    let got: Vec<f32> = model.forward(x).into_data().to_vec().unwrap();
    let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let rel = max_err / max_ref;
    println!("max |kiln - transformers| / max |transformers| = {rel:.2e} (max |logit| {max_ref:.3})");
    assert!(max_ref > 1.0, "the fixture's logits are too small to test anything");
    assert!(rel < 1e-4, "relative error {rel}");
}

#[test]
fn config_spellings_and_rope_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(fixtures().join("hf-tiny-llama/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    let p = dir.path().join("config.json");
    let write = |v: &serde_json::Value| std::fs::write(&p, v.to_string()).unwrap();

    // transformers 5: `dtype` + `rope_parameters`.
    v["rope_parameters"]["rope_theta"] = 500000.0.into();
    write(&v);
    assert_eq!(read_config(&p).unwrap().rope_theta, 500000.0);
    // transformers 4: `torch_dtype` + `rope_theta`.
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    let d = o.remove("dtype").unwrap();
    o.insert("torch_dtype".into(), d);
    o.insert("rope_theta".into(), 1234.0.into());
    write(&v);
    assert_eq!(read_config(&p).unwrap().rope_theta, 1234.0);

    // What Kiln does not implement is refused, all of it named.
    v["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 1.0, "factor": 8.0});
    v["torch_dtype"] = "float8_e4m3fn".into();
    v["head_dim"] = 32.into();
    write(&v);
    let e = read_config(&p).unwrap_err().to_string();
    for want in ["rope_type \"llama3\"", "float8_e4m3fn", "head_dim 32"] {
        assert!(e.contains(want), "{e}");
    }
}
