//! `config.json`: a Kiln model's Hugging Face Llama config out, and a Llama-family config in,
//! checked field by field (what the decoder does not implement is refused, all of it listed; a
//! field of the wrong type is an error, never a silent default).

use std::path::Path;

use serde_json::json;

use crate::llama::LlamaConfig;
use crate::ModelError;

/// The Hugging Face `config.json` for a Kiln model.
pub fn hf_config_json(cfg: &LlamaConfig) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": true,
    })
}

/// Parses a Hugging Face Llama `config.json`.
pub fn read_config(path: &Path) -> Result<LlamaConfig, ModelError> {
    let text = String::from_utf8(crate::read_regular(path, 16 << 20)?).map_err(|e| ModelError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
        hint: "config.json is damaged; re-export the model".into(),
    })?;
    let bad = |m: String| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: m,
        hint: "Kiln loads Llama-family configs (model_type \"llama\")".into(),
    };
    let int = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or_else(|| bad(format!("missing or non-integer '{k}'")));
    // What Kiln's decoder does not implement is refused, all of it listed, rather than loaded wrong.
    let unsupported = unsupported(&v);
    let rope = v.get("rope_parameters").filter(|x| !x.is_null());
    if !unsupported.is_empty() {
        return Err(ModelError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("unsupported: {}", unsupported.join(", ")),
            hint: "Kiln implements the Llama architecture: RMSNorm, SwiGLU (silu), plain RoPE, no biases".into(),
        });
    }
    let heads = int("num_attention_heads")?;
    // Optional fields: absent or null is the default; present with the wrong type is an error.
    let given = |k: &str| v.get(k).filter(|x| !x.is_null());
    let num = |k: &str, x: Option<&serde_json::Value>, default: f64| match x {
        None => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| bad(format!("'{k}' must be a number, got {x}"))),
    };
    // A token id, or the first of a list of them (Llama 3 lists several end-of-turn ids).
    let tok = |k: &str| -> Result<Option<u32>, ModelError> {
        let Some(x) = given(k) else { return Ok(None) };
        let first = x.as_array().and_then(|a| a.first()).unwrap_or(x);
        match first.as_u64().filter(|&i| i <= u32::MAX as u64) {
            Some(i) => Ok(Some(i as u32)),
            None => Err(bad(format!("'{k}' must be a token id (0 to {}), got {x}", u32::MAX))),
        }
    };
    let tie = match given("tie_word_embeddings") {
        None => false,
        Some(x) => x.as_bool().ok_or_else(|| bad(format!("'tie_word_embeddings' must be true or false, got {x}")))?,
    };
    let cfg = LlamaConfig {
        vocab_size: int("vocab_size")?,
        hidden_size: int("hidden_size")?,
        intermediate_size: int("intermediate_size")?,
        num_hidden_layers: int("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: v.get("num_key_value_heads").and_then(|x| x.as_u64()).map_or(heads, |x| x as usize),
        max_position_embeddings: int("max_position_embeddings")?,
        rope_theta: num("rope_theta", given("rope_theta").or_else(|| rope.and_then(|r| r.get("rope_theta"))), 10000.0)?,
        rms_norm_eps: num("rms_norm_eps", given("rms_norm_eps"), 1e-6)?,
        tie_word_embeddings: tie,
        bos_token_id: tok("bos_token_id")?,
        eos_token_id: tok("eos_token_id")?,
        pad_token_id: tok("pad_token_id")?,
    };
    cfg.check().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

/// What a `config.json` asks for that Kiln's decoder does not implement.
fn unsupported(v: &serde_json::Value) -> Vec<String> {
    let mut unsupported = Vec::new();
    if let Some(t) = v.get("model_type").and_then(|x| x.as_str()) {
        if !["llama", "mistral", "qwen2"].contains(&t) || (t != "llama" && v.get("sliding_window").is_some_and(|x| !x.is_null())) {
            unsupported.push(format!("model_type \"{t}\""));
        }
    }
    if v.get("rope_scaling").is_some_and(|x| !x.is_null()) {
        unsupported.push(format!("rope_scaling {}", v["rope_scaling"]));
    }
    // transformers 5 writes `rope_parameters: {rope_theta, rope_type}` instead of `rope_theta`.
    let rope = v.get("rope_parameters").filter(|x| !x.is_null());
    if let Some(kind) = rope.and_then(|r| r.get("rope_type")).and_then(|x| x.as_str()).filter(|k| *k != "default") {
        unsupported.push(format!("rope_parameters.rope_type \"{kind}\""));
    }
    // Both spellings: `torch_dtype` (transformers 4) and `dtype` (transformers >= 4.56).
    let dtype = v.get("dtype").or_else(|| v.get("torch_dtype")).and_then(|x| x.as_str());
    if let Some(d) = dtype.filter(|d| !["float32", "bfloat16", "float16"].contains(d)) {
        unsupported.push(format!("dtype \"{d}\" (Kiln reads float32, bfloat16 and float16 weights)"));
    }
    let heads_for_dim = v.get("num_attention_heads").and_then(|x| x.as_u64());
    if let (Some(hd), Some(d), Some(h)) = (v.get("head_dim").and_then(|x| x.as_u64()), v.get("hidden_size").and_then(|x| x.as_u64()), heads_for_dim) {
        if h > 0 && hd * h != d {
            unsupported.push(format!("head_dim {hd} != hidden_size {d} / num_attention_heads {h}"));
        }
    }
    if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()).filter(|a| *a != "silu") {
        unsupported.push(format!("hidden_act \"{act}\""));
    }
    for k in ["attention_bias", "mlp_bias"] {
        if v.get(k).and_then(|x| x.as_bool()) == Some(true) {
            unsupported.push(format!("{k} = true"));
        }
    }
    if v.get("model_type").and_then(|x| x.as_str()) == Some("qwen2") {
        unsupported.push("qwen2 attention biases".into());
    }
    unsupported
}
