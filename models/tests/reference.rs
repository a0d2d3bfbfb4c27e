//! Parity with a PyTorch implementation of the same architecture (scripts/make_reference_fixture.py):
//! the same weights and input give the same logits, within 1e-4 relative error.

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::checkpoint::{read_safetensors, SafetensorsSource};
use kiln_models::{Llama, LlamaConfig};

#[test]
fn logits_match_pytorch_reference() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_reference.safetensors");
    let mut all = read_safetensors(&path).expect("fixture: run scripts/make_reference_fixture.py");
    let (ishape, ids) = all.remove("test.input_ids").unwrap();
    let (_, want) = all.remove("test.logits").unwrap();
    let cfg = LlamaConfig {
        vocab_size: 61,
        hidden_size: 32,
        intermediate_size: 80,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 24,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    };
    // Write the weights back out without the test tensors and load them the normal way.
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("model.safetensors");
    let tensors: Vec<_> = all.into_iter().map(|(n, (s, v))| (n, s, v)).collect();
    kiln_models::checkpoint::write_safetensors(&w, &tensors, &[]).unwrap();
    let device = Default::default();
    let model = Llama::<Flex>::build(&cfg, &mut SafetensorsSource::open(&w).unwrap(), &device).unwrap();
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [ishape[0], ishape[1]]), &device);
    let got: Vec<f32> = model.forward(x).into_data().to_vec().unwrap();
    assert_eq!(got.len(), want.len());
    let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let rel = max_err / max_ref;
    println!("max |kiln - torch| / max |torch| = {rel:.2e} (max |logit| {max_ref:.3})");
    assert!(rel < 1e-4, "relative error {rel}");
}
