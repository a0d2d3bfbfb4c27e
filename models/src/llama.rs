//! The Llama-style decoder: RMSNorm, RoPE (half-split), SwiGLU, grouped-query attention,
//! optionally tied embeddings. Generic over `B: Backend`.
//!
//! Field names mirror Hugging Face `LlamaForCausalLM`, so the Burn module path of every
//! parameter plus `.weight` is its checkpoint name (`model.layers.0.self_attn.q_proj.weight`).
//! Linear weights are held `[in, out]` (so `x.matmul(w)` needs no transpose) and are
//! transposed to PyTorch's `[out, in]` only at the checkpoint boundary (`checkpoint.rs`).
//!
//! Shapes: B = batch, T = sequence, D = hidden, H = heads, K = kv heads, Hd = head dim,
//! F = SwiGLU hidden, V = vocabulary.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::module::{attention, embedding};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::attention::repeat_kv;
use crate::rope::{rope, rope_tables};
use crate::norm::rms_norm;
use crate::swiglu::swiglu;
use crate::ModelError;

mod projection;

/// The longest context a config may declare (RoPE tables and attention are sized by it).
pub const MAX_CONTEXT: usize = 1 << 20;
/// The most parameters a config may declare: far above what Kiln trains, far below an overflow.
pub const MAX_PARAMS: usize = 1 << 40;

/// Model hyperparameters. Field names are those of Hugging Face's Llama `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Context length the model is trained for.
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the invariants the decoder relies on.
    pub fn check(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.num_attention_heads == 0 || self.hidden_size == 0 {
            return bad(format!("hidden_size {} and num_attention_heads {} must be positive", self.hidden_size, self.num_attention_heads));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head dim {} must be even for RoPE", self.head_dim()));
        }
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.vocab_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, num_hidden_layers and intermediate_size must be positive".into());
        }
        if !(2..=MAX_CONTEXT).contains(&self.max_position_embeddings) {
            return bad(format!("max_position_embeddings {} must be between 2 and {MAX_CONTEXT}", self.max_position_embeddings));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(format!("rms_norm_eps {} must be a positive number below 1", self.rms_norm_eps));
        }
        match self.checked_params() {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            _ => bad(format!(
                "{} layers of width {} (SwiGLU {}, vocabulary {}) make more than {MAX_PARAMS} parameters",
                self.num_hidden_layers, self.hidden_size, self.intermediate_size, self.vocab_size
            )),
        }
    }

    /// Trainable parameters, or `None` where the count overflows (a config that `check` refuses).
    pub fn checked_params(&self) -> Option<usize> {
        let (d, f, v, l) = (self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers);
        let kv = self.num_key_value_heads.checked_mul(self.head_dim())?;
        let layer = [d.checked_mul(d)?.checked_mul(2)?, d.checked_mul(kv)?.checked_mul(2)?, d.checked_mul(f)?.checked_mul(3)?, d.checked_mul(2)?];
        let layer = layer.iter().try_fold(0usize, |a, &x| a.checked_add(x))?;
        let embed = v.checked_mul(d)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed.checked_add(l.checked_mul(layer)?)?.checked_add(d)?.checked_add(head)
    }

    /// Trainable parameters.
    pub fn num_params(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let kv = self.num_key_value_heads * hd;
        let layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }

    /// Training FLOPs per token: 6·params + 12·layers·d_model·context (PaLM appendix B).
    pub fn flops_per_token(&self) -> f64 {
        6.0 * self.num_params() as f64
            + 12.0 * (self.num_hidden_layers * self.hidden_size * self.max_position_embeddings) as f64
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Param<Tensor<B, 2>>, // [D, H*Hd]
    pub k_proj: Param<Tensor<B, 2>>, // [D, K*Hd]
    pub v_proj: Param<Tensor<B, 2>>, // [D, K*Hd]
    pub o_proj: Param<Tensor<B, 2>>, // [H*Hd, D]
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Param<Tensor<B, 2>>, // [D, F]
    pub up_proj: Param<Tensor<B, 2>>,   // [D, F]
    pub down_proj: Param<Tensor<B, 2>>, // [F, D]
}

#[derive(Module, Debug)]
pub struct Layer<B: Backend> {
    pub input_layernorm: Param<Tensor<B, 1>>, // [D]
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: Param<Tensor<B, 1>>, // [D]
    pub mlp: Mlp<B>,
}

#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>, // [V, D]
    pub layers: Vec<Layer<B>>,
    pub norm: Param<Tensor<B, 1>>, // [D]
}

/// The whole model, as `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub model: Decoder<B>,
    /// `[D, V]`; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// RoPE tables, `[max_position_embeddings, Hd]` each (not parameters).
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub eps: f64,
    /// Mixed precision: `Some(bf16 | f16)` runs matmuls and attention in that type while the
    /// parameters (the optimizer's master weights), norms, softmax-free reductions and the
    /// residual stream stay f32. Burn 0.21 has no autocast, so the casts are written here;
    /// they are differentiable, and gradients arrive in f32.
    #[module(skip)]
    pub compute: Option<DType>,
    /// Train attention through the custom autodiff op of `attention.rs` (fused forward, probabilities
    /// recomputed in the backward pass) when one is registered for this backend; else Burn's
    /// decomposed attention. Only the training (causal, no KV cache) path uses it.
    #[module(skip)]
    pub fused_attention: bool,
    /// Within the fused attention op, the backend's tiled flash kernels (`attention.rs`'s
    /// `AttentionKernels`) where it registers them and they take the call.
    #[module(skip)]
    pub flash_attention: bool,
    /// Compute the training loss through the cross-entropy op of `loss.rs` (no `[N, V]`
    /// log-probabilities) when one is registered for this backend; else Burn's `log_softmax`.
    /// Read by the trainer's loss, not by `forward`.
    #[module(skip)]
    pub fused_loss: bool,
    /// RMSNorm through the custom autodiff op of `norm.rs` (written-out backward pass; one kernel
    /// each way where the backend registers them) when one is registered; else Burn's ops.
    #[module(skip)]
    pub fused_norm: bool,
    /// The MLP's `silu(gate) · up` through the op of `swiglu.rs`, likewise.
    #[module(skip)]
    pub fused_swiglu: bool,
    /// Projections that share an input (q, k, v; gate, up) as one matmul of their weights side
    /// by side, split after (`projs`); else one matmul each.
    #[module(skip)]
    pub fused_proj: bool,
    /// Linear layers' matmuls through the op of `linear.rs` (the backend's own GEMM, cuBLASLt on
    /// CUDA, for the forward and both backward products) when one is registered; else Burn's.
    #[module(skip)]
    pub cublaslt: bool,
    /// LoRA adapters on some projections (`lora_params.rs`), trained while the base is frozen;
    /// `None` for a plain model.
    pub lora: Option<crate::lora_params::Lora<B>>,
    /// The vocabulary's true size. The embedding and head may hold more rows and columns
    /// (`vocab_pad.rs`), which the logits leave out.
    #[module(skip)]
    pub vocab: usize,
}

/// Where initial weights come from: a random initialiser or a checkpoint.
/// `name` is the Hugging Face tensor name; `shape` is its Hugging Face shape (`[out, in]` for
/// linear layers). The returned data is in that same layout.
pub trait WeightSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError>;
}

/// Parameter ids derived from the parameter name (FNV-1a), so that they are the same in every
/// process: optimizer state and gradient all-reduce can be keyed by them.
pub fn param_id(name: &str) -> ParamId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    ParamId::from(h)
}

fn load_vec<B: Backend>(
    src: &mut dyn WeightSource,
    name: &str,
    n: usize,
    device: &B::Device,
) -> Result<Param<Tensor<B, 1>>, ModelError> {
    let v = src.get(name, &[n])?;
    let t = Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device);
    Ok(Param::initialized(param_id(name), t.require_grad()))
}

/// Reads an `[out, in]` weight and holds it as `[in, out]`.
fn load_linear<B: Backend>(
    src: &mut dyn WeightSource,
    name: &str,
    d_in: usize,
    d_out: usize,
    device: &B::Device,
) -> Result<Param<Tensor<B, 2>>, ModelError> {
    let v = src.get(name, &[d_out, d_in])?;
    let t = Tensor::<B, 2>::from_data(TensorData::new(v, [d_out, d_in]), device).transpose(); // [in, out]
    // Materialise the transposed layout so that matmuls see a contiguous tensor.
    let t = Tensor::<B, 2>::from_data(t.into_data(), device);
    Ok(Param::initialized(param_id(name), t.require_grad()))
}

impl<B: Backend> Llama<B> {
    /// Builds the model, taking every weight from `src` by its Hugging Face name.
    pub fn build(cfg: &LlamaConfig, src: &mut dyn WeightSource, device: &B::Device) -> Result<Self, ModelError> {
        cfg.check()?;
        let (d, f, hd, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim(), cfg.vocab_size);
        let (h, k) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let emb = src.get("model.embed_tokens.weight", &[v, d])?;
        let embed_tokens = Param::initialized(
            param_id("model.embed_tokens.weight"),
            Tensor::<B, 2>::from_data(TensorData::new(emb, [v, d]), device).require_grad(),
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            layers.push(Layer {
                input_layernorm: load_vec(src, &p("input_layernorm"), d, device)?,
                self_attn: Attention {
                    q_proj: load_linear(src, &p("self_attn.q_proj"), d, h * hd, device)?,
                    k_proj: load_linear(src, &p("self_attn.k_proj"), d, k * hd, device)?,
                    v_proj: load_linear(src, &p("self_attn.v_proj"), d, k * hd, device)?,
                    o_proj: load_linear(src, &p("self_attn.o_proj"), h * hd, d, device)?,
                },
                post_attention_layernorm: load_vec(src, &p("post_attention_layernorm"), d, device)?,
                mlp: Mlp {
                    gate_proj: load_linear(src, &p("mlp.gate_proj"), d, f, device)?,
                    up_proj: load_linear(src, &p("mlp.up_proj"), d, f, device)?,
                    down_proj: load_linear(src, &p("mlp.down_proj"), f, d, device)?,
                },
            });
        }
        let norm = load_vec(src, "model.norm.weight", d, device)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(load_linear(src, "lm_head.weight", d, v, device)?)
        };
        let (cos, sin) = rope_tables::<B>(cfg.max_position_embeddings, hd, cfg.rope_theta, device);
        Ok(Self {
            model: Decoder { embed_tokens, layers, norm },
            lm_head,
            cos,
            sin,
            n_heads: h,
            n_kv_heads: k,
            eps: cfg.rms_norm_eps,
            compute: None,
            fused_attention: false,
            flash_attention: false,
            fused_loss: false,
            fused_norm: false,
            fused_swiglu: false,
            fused_proj: false,
            cublaslt: false,
            lora: None,
            vocab: v,
        })
    }

    /// Logits for a batch of token ids: `[B, T]` -> `[B, T, V]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_cached(tokens, None)
    }

    /// Logits for packed rows: several examples a row, each attending only to itself, its RoPE
    /// positions counted from its own start (see [`Packed`]). `[B, T]` -> `[B, T, V]`.
    pub fn forward_packed(&self, tokens: Tensor<B, 2, Int>, packed: &Packed<B>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let hd = self.cos.dims()[1];
        let idx = packed.positions.clone().reshape([b * t]); // [B·T]
        let cos = self.cos.clone().select(0, idx.clone()).reshape([b, 1, t, hd]); // [B, 1, T, Hd]
        let sin = self.sin.clone().select(0, idx).reshape([b, 1, t, hd]); // [B, 1, T, Hd]
        let hide = packed.hide.clone().expand([b, self.n_heads, t, t]); // [B, H, T, T]
        self.decode(tokens, &cos, &sin, None, Some(&hide))
    }

    /// Forward pass with an optional KV cache (generation). With a cache, `tokens` are the new
    /// positions only, and the cache grows by `T`.
    pub fn forward_cached(&self, tokens: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let [_b, t] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let cos = self.cos.clone().narrow(0, start, t).unsqueeze::<4>(); // [1, 1, T, Hd]
        let sin = self.sin.clone().narrow(0, start, t).unsqueeze::<4>(); // [1, 1, T, Hd]
        self.decode(tokens, &cos, &sin, cache, None)
    }

    /// The final norm's output, before the head: `[B, T]` -> `[B, T, D]` (sentence embeddings
    /// pool it, `embed.rs`).
    pub fn hidden(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let t = tokens.dims()[1];
        let cos = self.cos.clone().narrow(0, 0, t).unsqueeze::<4>(); // [1, 1, T, Hd]
        let sin = self.sin.clone().narrow(0, 0, t).unsqueeze::<4>(); // [1, 1, T, Hd]
        self.trunk(tokens, &cos, &sin, None, None)
    }

    /// The decoder stack and head, with RoPE tables already picked for each position, and for
    /// packed rows the positions each query must not see (`hide`, `[B, H, T, T]`).
    fn decode(&self, tokens: Tensor<B, 2, Int>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>, cache: Option<&mut KvCache<B>>, hide: Option<&Tensor<B, 4, Bool>>) -> Tensor<B, 3> {
        let x = self.trunk(tokens, cos, sin, cache, hide); // [B, T, D]
        let logits = match &self.lm_head {
            Some(w) => self.mm(x, w.val()), // [B, T, Vp]
            None => self.mm(x, self.model.embed_tokens.val().transpose()), // [B, T, Vp]
        };
        match logits.dims()[2] {
            vp if vp > self.vocab => logits.narrow(2, 0, self.vocab), // [B, T, V]: a padded vocabulary's true columns
            _ => logits,
        }
    }

    /// The embedding, the decoder layers and the final norm: `[B, T]` -> `[B, T, D]`.
    fn trunk(&self, tokens: Tensor<B, 2, Int>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>, mut cache: Option<&mut KvCache<B>>, hide: Option<&Tensor<B, 4, Bool>>) -> Tensor<B, 3> {
        let t = tokens.dims()[1];
        let mut x = embedding(self.model.embed_tokens.val(), tokens); // [B, T, D]
        if x.dtype() != DType::F32 {
            x = x.cast(DType::F32); // a base stored in half precision (lora_params::store_base)
        }
        for (i, layer) in self.model.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.layer(layer, i, x, cos, sin, kv, hide);
        }
        if let Some(c) = cache {
            c.pos += t;
        }
        rms_norm(x, self.model.norm.val(), self.eps, self.fused_norm) // [B, T, D]
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: &Layer<B>,
        i: usize, // the layer's index (its adapters are `self.lora`'s layer i)
        x: Tensor<B, 3>, // [B, T, D]
        cos: &Tensor<B, 4>, // [B or 1, 1, T, Hd]
        sin: &Tensor<B, 4>, // [B or 1, 1, T, Hd]
        kv: Option<&mut (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>)>,
        hide: Option<&Tensor<B, 4, Bool>>, // [B, H, T, T]
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let (h, k) = (self.n_heads, self.n_kv_heads);
        let hd = d / h;
        let a = &l.self_attn;

        let hn = rms_norm(x.clone(), l.input_layernorm.val(), self.eps, self.fused_norm); // [B, T, D]
        let ws = [a.q_proj.val(), a.k_proj.val(), a.v_proj.val()];
        let joined = self.fused_proj && (0..3).all(|m| !self.adapted(i, m));
        let (q, mut kk, mut v) = match joined.then(crate::rope::registered::<B>).flatten() {
            // One matmul, then RoPE on q's and k's heads of its output as one op (rope.rs).
            Some(turn) => {
                let y = self.mm_joined(hn, ws); // [B, T, (H + 2K)·Hd]
                let y = turn(y, cos.clone(), sin.clone(), h + k).reshape([b, t, h + 2 * k, hd]).swap_dims(1, 2); // [B, H + 2K, T, Hd]
                (y.clone().narrow(1, 0, h), y.clone().narrow(1, h, k), y.narrow(1, h + k, k)) // [B, H, T, Hd], [B, K, T, Hd] x2
            }
            None => {
                let [q, kk, v] = self.projs(hn, ws, i, [0, 1, 2]); // [B, T, H·Hd], [B, T, K·Hd] x2
                let q = rope(q.reshape([b, t, h, hd]).swap_dims(1, 2), cos, sin); // [B, H, T, Hd]
                let kk = rope(kk.reshape([b, t, k, hd]).swap_dims(1, 2), cos, sin); // [B, K, T, Hd]
                (q, kk, v.reshape([b, t, k, hd]).swap_dims(1, 2)) // .., [B, K, T, Hd]
            }
        };
        let causal = match kv {
            Some((ck, cv)) => {
                let first = ck.is_none();
                if let (Some(pk), Some(pv)) = (ck.take(), cv.take()) {
                    kk = Tensor::cat(vec![pk, kk], 2); // [B, K, S, Hd]
                    v = Tensor::cat(vec![pv, v], 2); // [B, K, S, Hd]
                }
                *ck = Some(kk.clone());
                *cv = Some(v.clone());
                // A prefill into an empty cache is causal; single new tokens see every cached key.
                first && t > 1
            }
            None => true,
        };
        // A packed batch's mask holds the causal triangle too.
        let causal = causal && hide.is_none();
        let opts = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
        let fused = (self.fused_attention && (causal || hide.is_some()) && t == kk.dims()[2]).then(crate::attention::registered::<B>).flatten();
        // The fused op takes the K kv heads as they are; Burn's attention takes H.
        let attend = |q, k, v| match fused {
            Some(f) => f(q, k, v, hide.cloned(), self.flash_attention), // q [B, H, T, Hd], k, v [B, K, S, Hd]
            None => attention(q, repeat_kv(k, h / self.n_kv_heads), repeat_kv(v, h / self.n_kv_heads), hide.cloned(), None, opts),
        };
        let y = match self.compute {
            None => attend(q, kk, v), // [B, H, T, Hd]
            Some(dt) => attend(q.cast(dt), kk.cast(dt), v.cast(dt)).cast(DType::F32),
        };
        let y = y.swap_dims(1, 2).reshape([b, t, d]); // [B, T, D]
        let x = x + self.proj(y, a.o_proj.val(), i, 3); // [B, T, D]

        let hn = rms_norm(x.clone(), l.post_attention_layernorm.val(), self.eps, self.fused_norm); // [B, T, D]
        let m = &l.mlp;
        let ws = [m.gate_proj.val(), m.up_proj.val()];
        let joined = self.fused_proj && self.fused_swiglu && !self.adapted(i, 4) && !self.adapted(i, 5);
        let h = match joined.then(crate::swiglu::registered_joined::<B>).flatten() {
            // One matmul, and SwiGLU reading both halves of its output in place (swiglu.rs).
            Some(gate_up) => gate_up(self.mm_joined(hn, ws)), // [B, T, 2F] -> [B, T, F]
            None => {
                let [gate, up] = self.projs(hn, ws, i, [4, 5]); // [B, T, F] x2
                swiglu(gate, up, self.fused_swiglu)
            }
        };
        x + self.proj(h, m.down_proj.val(), i, 6) // [B, T, D]
    }
}

/// Packed rows for [`Llama::forward_packed`]: each position's RoPE position and, per row, the
/// block-diagonal causal mask (`true` where a query must not see a key).
pub struct Packed<B: Backend> {
    pub positions: Tensor<B, 2, Int>, // [B, T]
    pub hide: Tensor<B, 4, Bool>,     // [B, 1, T, T]
}

impl<B: Backend> Packed<B> {
    /// From `starts` (`[B·T]`): where each position's example begins in its row.
    pub fn from_starts(starts: &[u32], b: usize, t: usize, device: &B::Device) -> Self {
        let positions: Vec<i64> = starts.iter().enumerate().map(|(p, &s)| (p % t) as i64 - s as i64).collect();
        let mut hide = vec![true; b * t * t];
        for r in 0..b {
            for i in 0..t {
                let first = starts[r * t + i] as usize;
                hide[(r * t + i) * t + first..(r * t + i) * t + i + 1].iter_mut().for_each(|h| *h = false);
            }
        }
        Self {
            positions: Tensor::from_data(TensorData::new(positions, [b, t]), device),
            hide: Tensor::from_data(TensorData::new(hide, [b, 1, t, t]), device),
        }
    }
}

/// Per-layer cached keys and values, `[B, K, S, Hd]` each.
pub struct KvCache<B: Backend> {
    layers: Vec<(Option<Tensor<B, 4>>, Option<Tensor<B, 4>>)>,
    pos: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(n_layers: usize) -> Self {
        Self { layers: (0..n_layers).map(|_| (None, None)).collect(), pos: 0 }
    }
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}
