//! The flat layout of the parameters: one `f32` buffer, each named parameter a [`Slot`] in it.
//!
//! Linear weights are `[in, out]` as in `llama.rs`; q/k/v are packed side by side into one
//! `[D, Q + 2·KV]` matrix and gate/up into one `[D, 2F]`, so each is one matmul.

use burn::tensor::backend::Backend;

use crate::llama::{Llama, LlamaConfig};
use crate::ModelError;

/// The sizes the kernels need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub vocab: usize,
    pub d: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub eps: f32,
    pub tied: bool,
}

impl Dims {
    pub fn from_config(c: &LlamaConfig) -> Self {
        Self {
            vocab: c.vocab_size,
            d: c.hidden_size,
            ffn: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            layers: c.num_hidden_layers,
            eps: c.rms_norm_eps as f32,
            tied: c.tie_word_embeddings,
        }
    }
    pub(super) fn q(&self) -> usize {
        self.heads * self.head_dim
    }
    pub(super) fn kv(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub(super) fn qkv(&self) -> usize {
        self.q() + 2 * self.kv()
    }
}

/// Offsets of one layer's parameters in the flat buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerAt {
    pub(super) ln1: usize,  // [D]
    pub(super) wqkv: usize, // [D, Q + 2KV]
    pub(super) wo: usize,   // [Q, D]
    pub(super) ln2: usize,  // [D]
    pub(super) wgu: usize,  // [D, 2F]
    pub(super) wd: usize,   // [F, D]
}

/// Where one named parameter sits in the flat buffer: `cols` columns starting at column `col`
/// of a row-major matrix with `ld` columns (a plain tensor is `col = 0`, `ld = cols`).
#[derive(Debug, Clone)]
pub struct Slot {
    /// Hugging Face name, as `llama.rs` derives parameter ids from it.
    pub name: String,
    /// Burn shape (`[in, out]` for linear weights).
    pub shape: Vec<usize>,
    pub(super) off: usize,
    pub(super) ld: usize,
    pub(super) col: usize,
}

/// The flat layout of all parameters.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dims: Dims,
    pub(super) embed: usize, // [V, D]
    pub(super) layers: Vec<LayerAt>,
    pub(super) norm: usize,         // [D]
    pub(super) head: Option<usize>, // [D, V], None when tied
    pub len: usize,
    pub slots: Vec<Slot>,
}

impl Layout {
    pub fn new(dims: Dims) -> Self {
        let Dims { vocab: v, d, ffn: f, .. } = dims;
        let (q, kv, qkv) = (dims.q(), dims.kv(), dims.qkv());
        let mut len = 0;
        let mut take = |n: usize| {
            len += n;
            len - n
        };
        let mut slots = Vec::new();
        let mut slot = |name: String, shape: Vec<usize>, off: usize, ld: usize, col: usize| {
            slots.push(Slot { name, shape, off, ld, col })
        };
        let embed = take(v * d);
        slot("model.embed_tokens.weight".into(), vec![v, d], embed, d, 0);
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let at = LayerAt {
                ln1: take(d),
                wqkv: take(d * qkv),
                wo: take(q * d),
                ln2: take(d),
                wgu: take(d * 2 * f),
                wd: take(f * d),
            };
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            slot(p("input_layernorm"), vec![d], at.ln1, d, 0);
            slot(p("self_attn.q_proj"), vec![d, q], at.wqkv, qkv, 0);
            slot(p("self_attn.k_proj"), vec![d, kv], at.wqkv, qkv, q);
            slot(p("self_attn.v_proj"), vec![d, kv], at.wqkv, qkv, q + kv);
            slot(p("self_attn.o_proj"), vec![q, d], at.wo, d, 0);
            slot(p("post_attention_layernorm"), vec![d], at.ln2, d, 0);
            slot(p("mlp.gate_proj"), vec![d, f], at.wgu, 2 * f, 0);
            slot(p("mlp.up_proj"), vec![d, f], at.wgu, 2 * f, f);
            slot(p("mlp.down_proj"), vec![f, d], at.wd, d, 0);
            layers.push(at);
        }
        let norm = take(d);
        slot("model.norm.weight".into(), vec![d], norm, d, 0);
        let head = if dims.tied {
            None
        } else {
            let h = take(d * v);
            slot("lm_head.weight".into(), vec![d, v], h, v, 0);
            Some(h)
        };
        Self { dims, embed, layers, norm, head, len, slots }
    }

    /// The flat buffer cut where the backward pass finishes gradients, in its order of
    /// addresses: the embedding, each layer, then the final norm with the head (contiguous,
    /// covering the whole buffer).
    pub(super) fn regions(&self) -> Vec<std::ops::Range<usize>> {
        let mut cuts = vec![self.embed];
        cuts.extend(self.layers.iter().map(|at| at.ln1));
        cuts.push(self.norm);
        cuts.push(self.len);
        cuts.windows(2).map(|c| c[0]..c[1]).collect()
    }

    /// Copies a parameter's values (row-major, its Burn shape) into the flat buffer.
    pub fn put(&self, flat: &mut [f32], s: &Slot, values: &[f32]) {
        s.put(flat, values)
    }

    /// The model's parameters in this layout, its LoRA adapters (if any) merged in
    /// (`W + (s·B·A)ᵀ`): what inference (evaluation, generation) runs on.
    pub fn weights<B: Backend>(&self, model: &Llama<B>) -> Result<Vec<f32>, ModelError> {
        let mut flat = vec![0.0f32; self.len];
        self.weights_into(model, &mut flat)?;
        if let Some(lora) = &model.lora {
            let adapter = lora.to_adapter(String::new());
            for s in &self.slots {
                let Some(delta) = s.name.strip_suffix(".weight").and_then(|m| adapter.delta(m)) else { continue };
                let (d_in, d_out) = rows_cols(&s.shape);
                let mut w = s.get(&flat); // [in, out]
                for (i, row) in w.chunks_exact_mut(d_out).enumerate() {
                    row.iter_mut().enumerate().for_each(|(o, x)| *x += delta[o * d_in + i]); // delta [out, in]
                }
                s.put(&mut flat, &w);
            }
        }
        Ok(flat)
    }

    /// The base model's parameters (adapters aside, as training reads them) into an existing
    /// buffer of `len` values.
    pub fn weights_into<B: Backend>(&self, model: &Llama<B>, flat: &mut [f32]) -> Result<(), ModelError> {
        let tensors = crate::checkpoint::burn_tensors(model);
        if tensors.len() != self.slots.len() {
            return Err(ModelError::Config(format!("the model has {} parameters, the kernels' layout {}", tensors.len(), self.slots.len())));
        }
        for (name, shape, values) in tensors {
            let s = self.slots.iter().find(|s| s.name == name).ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            if s.shape != shape {
                return Err(ModelError::Shape { name, got: shape, expected: s.shape.clone() });
            }
            self.put(flat, s, &values);
        }
        Ok(())
    }

    /// The flat index ranges holding a parameter, one per row.
    pub fn rows(&self, s: &Slot) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        s.rows()
    }

    /// A parameter's values (row-major, its Burn shape) from the flat buffer.
    pub fn get(&self, flat: &[f32], s: &Slot) -> Vec<f32> {
        s.get(flat)
    }
}

impl Slot {
    /// Copies the parameter's values (row-major, its Burn shape) into the flat buffer.
    pub fn put(&self, flat: &mut [f32], values: &[f32]) {
        let (rows, cols) = rows_cols(&self.shape);
        assert_eq!(values.len(), rows * cols, "{}: wrong number of values", self.name);
        for r in 0..rows {
            let at = self.off + r * self.ld + self.col;
            flat[at..at + cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
        }
    }

    /// The flat index ranges holding the parameter, one per row.
    pub fn rows(&self) -> impl Iterator<Item = std::ops::Range<usize>> {
        let (rows, cols) = rows_cols(&self.shape);
        let (off, ld, col) = (self.off, self.ld, self.col);
        (0..rows).map(move |r| off + r * ld + col..off + r * ld + col + cols)
    }

    /// The parameter's values (row-major, its Burn shape) from the flat buffer.
    pub fn get(&self, flat: &[f32]) -> Vec<f32> {
        let (rows, cols) = rows_cols(&self.shape);
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let at = self.off + r * self.ld + self.col;
            out.extend_from_slice(&flat[at..at + cols]);
        }
        out
    }
}

/// The model's RoPE tables (`cos`, `sin`), `[max_position_embeddings, Hd]` each, on the host.
pub fn rope_tables<B: Backend>(model: &Llama<B>) -> (Vec<f32>, Vec<f32>) {
    let host = |t: &burn::tensor::Tensor<B, 2>| t.to_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    (host(&model.cos), host(&model.sin))
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => unreachable!("parameters are rank 1 or 2"),
    }
}
