//! A Llama-architecture GGUF file as a Kiln model: `llama.*` metadata to [`LlamaConfig`], tensor
//! names to Hugging Face names (with llama.cpp's Q/K row permutation undone), `tokenizer.ggml.*`
//! to a Hugging Face byte-level BPE, and `tokenizer.chat_template` to the tokenizer's template.
//!
//! The tokenizer is built the way `transformers` builds it from the same file
//! (`integrations/gguf`): the vocabulary and merges as given (tokens outside the byte-level
//! alphabet re-spelled byte by byte), a GPT-2 byte-level pre-tokenizer (or the split regex the
//! `tokenizer.ggml.pre` name stands for), control tokens added as special tokens and
//! user-defined ones as plain added tokens.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use burn::tensor::backend::Backend;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use super::{GgufFile, Value};
use crate::llama::{Llama, LlamaConfig, WeightSource};
use crate::tokenizer::Tokenizer;
use crate::ModelError;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const CONTROL: i128 = 3;
const USER_DEFINED: i128 = 4;

/// Llama 3's split regex, which these `tokenizer.ggml.pre` names stand for.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PRE: [&str; 6] = ["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"];

/// Loads a Llama-architecture GGUF file: the model (weights de-quantized to f32), its config and
/// its tokenizer (with the chat template).
pub fn load<B: Backend>(path: &Path, device: &B::Device) -> Result<(Llama<B>, LlamaConfig, Tokenizer), ModelError> {
    let file = GgufFile::open(path)?;
    let cfg = config(&file)?;
    let tok = tokenizer(&file)?;
    let mut src = GgufSource::new(file);
    let model = Llama::build(&cfg, &mut src, device).map_err(|e| checkpoint_err(path, e.to_string(), "the tensors do not match the llama.* metadata"))?;
    let unused = src.unused();
    if !unused.is_empty() {
        return Err(checkpoint_err(path, format!("tensors Kiln's Llama has no place for: {}", unused.join(", ")), "Kiln imports plain Llama-architecture models (no biases, no RoPE frequency factors)"));
    }
    Ok((model, cfg, tok))
}

/// The file's weights de-quantized to f32 under their Hugging Face names, in Hugging Face's
/// layout (`[out, in]`, Q/K rows un-permuted), with its config and tokenizer: for export, without
/// building a model on a backend.
pub fn hf_tensors(path: &Path) -> Result<(LlamaConfig, Tokenizer, Vec<crate::checkpoint::HostTensor>), ModelError> {
    let file = GgufFile::open(path)?;
    let (cfg, tok) = (config(&file)?, tokenizer(&file)?);
    let (v, d, f, hd) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut want: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![v, d])];
    for i in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        want.extend([
            (p("input_layernorm"), vec![d]),
            (p("self_attn.q_proj"), vec![q, d]),
            (p("self_attn.k_proj"), vec![kv, d]),
            (p("self_attn.v_proj"), vec![kv, d]),
            (p("self_attn.o_proj"), vec![d, q]),
            (p("post_attention_layernorm"), vec![d]),
            (p("mlp.gate_proj"), vec![f, d]),
            (p("mlp.up_proj"), vec![f, d]),
            (p("mlp.down_proj"), vec![d, f]),
        ]);
    }
    want.push(("model.norm.weight".into(), vec![d]));
    if !cfg.tie_word_embeddings {
        want.push(("lm_head.weight".into(), vec![v, d]));
    }
    let mut src = GgufSource::new(file);
    let mut out = Vec::with_capacity(want.len());
    for (name, shape) in want {
        let values = src.get(&name, &shape).map_err(|e| checkpoint_err(path, e.to_string(), "the tensors do not match the llama.* metadata"))?;
        out.push((name, shape, values));
    }
    let unused = src.unused();
    if !unused.is_empty() {
        return Err(checkpoint_err(path, format!("tensors Kiln's Llama has no place for: {}", unused.join(", ")), "Kiln imports plain Llama-architecture models (no biases, no RoPE frequency factors)"));
    }
    Ok((cfg, tok, out))
}

/// The config and tokenizer alone (no weights de-quantized), for planning a run.
pub fn read_meta(path: &Path) -> Result<(LlamaConfig, Tokenizer), ModelError> {
    let file = GgufFile::open(path)?;
    Ok((config(&file)?, tokenizer(&file)?))
}

fn checkpoint_err(path: &Path, message: String, hint: &str) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), message, hint: hint.into() }
}

/// `llama.*` metadata to a Hugging Face Llama config.
pub fn config(f: &GgufFile) -> Result<LlamaConfig, ModelError> {
    let bad = |m: String| checkpoint_err(&f.path, m, "Kiln imports Llama-architecture GGUF files (general.architecture = llama)");
    let arch = f.get("general.architecture")?.as_str().unwrap_or("");
    if arch != "llama" {
        return Err(bad(format!("general.architecture is '{arch}'")));
    }
    let int = |k: &str| -> Result<usize, ModelError> {
        let v = f.get(k)?;
        v.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| bad(format!("{k} = {v:?} is not a non-negative integer")))
    };
    let opt_int = |k: &str| if f.meta.contains_key(k) { int(k).map(Some) } else { Ok(None) };
    let float = |k: &str, default: f64| f.meta.get(k).map_or(Ok(default), |v| v.as_f64().ok_or_else(|| bad(format!("{k} = {v:?} is not a number"))));
    if opt_int("llama.expert_count")?.unwrap_or(0) > 0 {
        return Err(bad("a mixture-of-experts model (llama.expert_count > 0)".into()));
    }
    if let Some(s) = f.meta.get("llama.rope.scaling.type").and_then(Value::as_str) {
        if s != "none" {
            return Err(bad(format!("RoPE scaling '{s}' is not supported")));
        }
    }
    let heads = int("llama.attention.head_count")?;
    let n_tokens = f.meta.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|a| a.len());
    let vocab = match opt_int("llama.vocab_size")? {
        Some(v) => v,
        None => n_tokens.ok_or_else(|| bad("neither llama.vocab_size nor tokenizer.ggml.tokens is present".into()))?,
    };
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: int("llama.embedding_length")?,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: int("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: opt_int("llama.attention.head_count_kv")?.unwrap_or(heads),
        max_position_embeddings: int("llama.context_length")?,
        rope_theta: float("llama.rope.freq_base", 10000.0)?,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        tie_word_embeddings: f.tensor("output.weight").is_none(),
        bos_token_id: opt_int("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
        eos_token_id: opt_int("tokenizer.ggml.eos_token_id")?.map(|x| x as u32),
        pad_token_id: opt_int("tokenizer.ggml.padding_token_id")?.map(|x| x as u32),
    };
    cfg.check().map_err(|e| bad(e.to_string()))?;
    for k in ["llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"] {
        if let Some(d) = opt_int(k)? {
            if d != cfg.head_dim() {
                return Err(bad(format!("{k} = {d}, but embedding_length / head_count = {}; Kiln's Llama rotates and attends over the whole head", cfg.head_dim())));
            }
        }
    }
    Ok(cfg)
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the rest move to 256+.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

/// `tokenizer.ggml.*` to a Hugging Face tokenizer, with the file's special-token ids and chat template.
pub fn tokenizer(f: &GgufFile) -> Result<Tokenizer, ModelError> {
    let bad = |m: String| checkpoint_err(&f.path, m, "Kiln reads GGUF tokenizers of type gpt2 (byte-level BPE); for others, import the Hugging Face folder instead");
    let model = f.get("tokenizer.ggml.model")?.as_str().unwrap_or("");
    if model != "gpt2" {
        return Err(bad(format!("tokenizer.ggml.model is '{model}'")));
    }
    let strings = |k: &str| -> Result<Vec<String>, ModelError> {
        let a = f.get(k)?.as_array().ok_or_else(|| bad(format!("{k} is not an array")))?;
        a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(format!("{k} holds a non-string")))).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i128> = match f.meta.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| if let Value::Int(i) = v { *i } else { 1 }).collect(),
        None => vec![1; tokens.len()],
    };
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab: ahash::AHashMap<String, u32> = ahash::AHashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let t = if spelled(t) { t.clone() } else { t.bytes().map(|b| spelling[b as usize]).collect() };
        vocab.insert(t, i as u32);
    }
    let mut merges = Vec::new();
    for (i, m) in strings("tokenizer.ggml.merges")?.into_iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| bad(format!("tokenizer.ggml.merges[{i}] = '{m}' is not two tokens separated by a space")))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| bad(format!("the vocabulary and merges do not form a BPE: {e}")))?;
    let mut t = HfTokenizer::new(bpe);
    let pre = f.meta.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    if LLAMA3_PRE.contains(&pre) {
        let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false).map_err(|e| bad(e.to_string()))?;
        t.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
    } else {
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    }
    t.with_decoder(Some(ByteLevelDecoder::default()));
    let added = |kind: i128, special: bool| -> Vec<AddedToken> {
        tokens.iter().zip(&types).filter(|(tok, &ty)| ty == kind && spelled(tok)).map(|(tok, _)| AddedToken::from(tok.clone(), special).normalized(false)).collect()
    };
    t.add_special_tokens(&added(CONTROL, true));
    t.add_tokens(&added(USER_DEFINED, false));
    let id = |k: &str| f.meta.get(k).and_then(Value::as_u64).map(|x| x as u32).filter(|&x| (x as usize) < tokens.len());
    let template = f.meta.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
    Tokenizer::from_parts(t, id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id"), id("tokenizer.ggml.padding_token_id"), template)
}

/// Hugging Face tensor name to GGUF tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// Undoes llama.cpp's `permute` of Q and K rows: within each head, llama.cpp stores row
/// `i·2 + j` for Hugging Face's row `j·(hd/2) + i` (the two RoPE halves interleaved).
/// `w` is `[heads·hd, cols]`, row-major.
pub fn unpermute_rows(w: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    let half = hd / 2;
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + i * 2 + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Weights from a GGUF file, by Hugging Face name, de-quantized on request.
pub struct GgufSource {
    file: GgufFile,
    heads: HashMap<&'static str, usize>,
    taken: HashSet<String>,
}

impl GgufSource {
    pub fn new(file: GgufFile) -> Self {
        let get = |k: &str| file.meta.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
        let q = get("llama.attention.head_count");
        let kv = file.meta.get("llama.attention.head_count_kv").and_then(Value::as_u64).map_or(q, |x| x as usize);
        let heads = HashMap::from([("attn_q", q), ("attn_k", kv)]);
        Self { file, heads, taken: HashSet::new() }
    }

    /// GGUF tensors no [`WeightSource::get`] asked for.
    pub fn unused(&self) -> Vec<String> {
        self.file.tensors.iter().filter(|t| !self.taken.contains(&t.name)).map(|t| t.name.clone()).collect()
    }
}

impl WeightSource for GgufSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let g = gguf_name(name).ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        let t = self.file.tensor(&g).ok_or_else(|| ModelError::MissingTensor(format!("{name} (GGUF {g})")))?.clone();
        let hf_shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        if hf_shape != shape {
            return Err(ModelError::Shape { name: g, got: hf_shape, expected: shape.to_vec() });
        }
        let v = self.file.tensor_f32(&t)?;
        self.taken.insert(g.clone());
        let kind = g.rsplit('.').nth(1).unwrap_or("");
        match self.heads.get(kind) {
            Some(&heads) if heads > 0 && shape[0] % heads == 0 && (shape[0] / heads) % 2 == 0 => Ok(unpermute_rows(&v, heads, shape[0] / heads, shape[1])),
            Some(_) => Err(ModelError::Shape { name: g, got: shape.to_vec(), expected: vec![] }),
            None => Ok(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols).
        let (heads, hd, cols) = (3, 4, 2);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0.0; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = (h * hd + j * hd / 2 + i) * cols; // [h, j, i]
                    let dst = (h * hd + i * 2 + j) * cols; // [h, i, j]
                    permuted[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(permuted, hf);
        assert_eq!(unpermute_rows(&permuted, heads, hd, cols), hf);
    }

    #[test]
    fn names_map_both_ways_that_kiln_asks() {
        assert_eq!(gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(), Some("blk.12.attn_output.weight"));
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(), Some("blk.0.ffn_norm.weight"));
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.q_proj.bias"), None);
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t.iter().collect::<HashSet<_>>().len(), 256);
    }
}
