//! What several of the kernel tests share: the tiny GQA model and a relative error.
#![allow(dead_code)]

use kiln_models::LlamaConfig;

/// Vocabulary 37, width 32, 2 layers, 4 heads sharing 2 kv heads, context `context`.
pub fn tiny_config(tied: bool, context: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 37,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: context,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

/// The largest absolute difference over the largest magnitude of `b`.
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
