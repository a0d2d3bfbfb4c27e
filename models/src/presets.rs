//! Named model sizes. The vocabulary comes from the tokenizer, so a preset fixes the rest.

use crate::LlamaConfig;

/// Names accepted by [`preset`].
pub const NAMES: [&str; 4] = ["tiny", "bench-cpu", "small", "bench-gpu"];

/// The configuration of a named size, for a given vocabulary.
pub fn preset(name: &str, vocab_size: usize) -> Option<LlamaConfig> {
    // (d_model, layers, heads, kv heads, SwiGLU hidden, context)
    let (d, l, h, kv, f, ctx) = match name {
        // For tests: GQA with 4 query heads sharing 2 kv heads.
        "tiny" => (32, 2, 4, 2, 96, 32),
        // ../shared/bench/README.md: the CPU benchmark model.
        "bench-cpu" => (128, 4, 4, 4, 384, 64),
        // A larger CPU model, still minutes per thousand steps on a laptop.
        "small" => (384, 6, 6, 6, 1024, 256),
        // ../shared/bench/README.md: GPT-2-small shaped, for GPUs.
        "bench-gpu" => (768, 12, 12, 12, 2048, 1024),
        _ => return None,
    };
    Some(LlamaConfig {
        vocab_size,
        hidden_size: d,
        intermediate_size: f,
        num_hidden_layers: l,
        num_attention_heads: h,
        num_key_value_heads: kv,
        max_position_embeddings: ctx,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_cpu_matches_the_reference_parameter_count() {
        // ../shared/bench/README.md: 869,760 parameters with the 65-character vocabulary.
        assert_eq!(super::preset("bench-cpu", 65).unwrap().num_params(), 869_760);
        for n in super::NAMES {
            super::preset(n, 100).unwrap().check().unwrap();
        }
        assert!(super::preset("nope", 10).is_none());
    }
}
