//! The schema: one struct per recipe section, every field with its default and a doc comment
//! (README's recipe reference is checked against these comments by a test).

use serde::{Deserialize, Serialize};

use crate::values::{DeviceSpec, Meter, Precision};

/// A whole recipe file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Run name: the run directory is `<runs-dir>/<name>-<timestamp>`.
    pub name: String,
    /// `"pretrain"` (next-token loss on every token) or `"sft"` (loss on the response only).
    pub stage: Stage,
    /// Weights to start from: `"runs/<dir>"`, a checkpoint folder, a `.gguf` file (llama.cpp's
    /// format; Llama architecture), or `"hf://org/model"`; a relative path not found here is looked
    /// for under the data root. Their config, tokenizer and chat template replace `[model]` and
    /// `[tokenizer]`. Empty means a fresh random initialisation (pretraining only).
    pub init: Option<String>,
    pub model: ModelSection,
    pub tokenizer: TokenizerSection,
    pub data: DataSection,
    pub optim: OptimSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub energy: EnergySection,
    /// Train LoRA adapters on a frozen base (`init`) instead of the whole model; absent means
    /// full fine-tuning.
    pub lora: Option<LoraSection>,
    /// A retrieval index for the run: its open-book evals (`squad-rag:...:topK`) retrieve from it,
    /// and with `raft_p` an SFT recipe's examples carry retrieved passages (RAFT).
    pub retrieval: Option<RetrievalSection>,
    /// `stage = "retriever"`: the contrastive objective's settings (defaults when absent).
    pub retriever: Option<RetrieverSection>,
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            name: "run".into(),
            stage: Stage::Pretrain,
            init: None,
            model: ModelSection::default(),
            tokenizer: TokenizerSection::default(),
            data: DataSection::default(),
            optim: OptimSection::default(),
            train: TrainSection::default(),
            eval: EvalSection::default(),
            energy: EnergySection::default(),
            lora: None,
            retrieval: None,
            retriever: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Pretrain,
    Sft,
    /// A dense retriever: (query, passage) pairs, contrastive loss over unit-length mean-pooled
    /// embeddings with in-batch negatives.
    Retriever,
}

/// `[model]`: a named size preset, with optional overrides of single dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Named size (see `kiln-models` presets): `bench-cpu`, `tiny`, `small`, `bench-gpu`.
    pub preset: String,
    /// Hidden size (overrides the preset).
    pub d_model: Option<usize>,
    /// Number of decoder layers (overrides the preset).
    pub n_layers: Option<usize>,
    /// Number of attention heads (overrides the preset).
    pub n_heads: Option<usize>,
    /// Number of key/value heads, for grouped-query attention (overrides the preset).
    pub n_kv_heads: Option<usize>,
    /// SwiGLU hidden size (overrides the preset).
    pub ffn_hidden: Option<usize>,
    /// Context length in tokens: the training sequence length (overrides the preset).
    pub context: Option<usize>,
    /// RoPE base frequency (overrides the preset).
    pub rope_theta: Option<f64>,
    /// RMSNorm epsilon (overrides the preset).
    pub norm_eps: Option<f64>,
    /// Share the input embedding with the output head (overrides the preset).
    pub tie_embeddings: Option<bool>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "bench-cpu".into(),
            d_model: None,
            n_layers: None,
            n_heads: None,
            n_kv_heads: None,
            ffn_hidden: None,
            context: None,
            rope_theta: None,
            norm_eps: None,
            tie_embeddings: None,
        }
    }
}

/// `[tokenizer]`: how text becomes tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// `"char"` (one token per character seen in the training data, plus UNK),
    /// `"byte"` (256 byte tokens), `"bpe"` (byte-level BPE trained on the training data),
    /// or `"file"` (load an existing `tokenizer.json` from `path`).
    pub kind: TokenizerKind,
    /// Vocabulary size for `kind = "bpe"`, special tokens included.
    pub vocab_size: usize,
    /// A `tokenizer.json` for `kind = "file"`, relative to the data root.
    pub path: Option<String>,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self { kind: TokenizerKind::Char, vocab_size: 4096, path: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    Char,
    Byte,
    Bpe,
    File,
}

/// `[data]`: where the training text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Sources: paths relative to the data root, `https://...` URLs (with `sha256`), or
    /// `hf://datasets/<org>/<name>[@rev]/<path>`.
    pub sources: Vec<String>,
    /// sha256 pins for `https://` sources, in the same order as the https sources.
    pub sha256: Vec<String>,
    /// The records' shape. Pretraining: `"auto"` (by extension: `.jsonl` is JSONL, anything else
    /// plain text), `"text"`, `"jsonl"` (the text in `text_field`). `stage = "sft"`: `"auto"`
    /// (told by each file's first record), `"chat"` (`{"messages": [{"role", "content"}]}`),
    /// `"sharegpt"` (`{"conversations": [{"from", "value"}]}`), `"alpaca"` (`instruction`,
    /// `input`, `output`), `"prompt_completion"` (`prompt`, `completion`), or `"fields"` (any
    /// record, through `user_template` and `assistant_template`). SFT files are JSONL, a JSON
    /// array (`.json`) or Parquet (`.parquet`, Hugging Face datasets' format).
    pub format: DataFormat,
    /// The JSONL field that holds a document's text.
    pub text_field: String,
    /// Fraction held out for validation, from the end: of the tokens (pretraining) or of the
    /// examples (SFT).
    pub val_fraction: f64,
    /// SFT: the chat template. `"model"` (the model's own, or ChatML where it has none),
    /// `"chatml"`, or a `.jinja` file relative to the data root.
    pub chat_template: String,
    /// SFT: which tokens carry loss: `"assistant"` (every assistant turn, its end-of-turn token
    /// included), `"last_assistant"`, or `"all"`.
    pub train_on: TrainOn,
    /// SFT: examples longer than the context are `"drop"`ped or `"truncate"`d (their end cut
    /// off); the count is reported either way.
    pub overlong: Overlong,
    /// SFT: pack several examples into each row (best-fit decreasing), attention kept inside
    /// each example and positions restarting at each; `false` gives each example a row of its
    /// own, padded to the longest in the batch.
    pub packing: bool,
    /// SFT: a system message put first in every conversation that has none (empty: none).
    pub system: String,
    /// SFT, `format = "fields"`: the user turn, a Jinja template over the record's fields
    /// (`"{{ question }}"`; with `join`, the joined record is `join`).
    pub user_template: String,
    /// SFT, `format = "fields"`: the assistant turn, a Jinja template (`"{{ answers[0] }}"`).
    pub assistant_template: String,
    /// SFT: a JSONL file (relative to the data root) whose records are looked up by `join_key`
    /// and given to the templates as `join` (SQuAD's paragraphs for its questions).
    pub join: Option<String>,
    /// SFT: the field shared by the records and the `join` file.
    pub join_key: String,
    /// SFT: keep only the records of some groups: `group_by` names a field, and `groups =
    /// [from, to]` keeps groups `from..to` by order of first appearance (SQuAD's articles).
    pub group_by: Option<String>,
    /// SFT: the half-open range of groups `group_by` keeps.
    pub groups: Option<[usize; 2]>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            sources: vec!["tinyshakespeare/input.txt".into()],
            sha256: Vec::new(),
            format: DataFormat::Auto,
            text_field: "text".into(),
            val_fraction: 0.1,
            chat_template: "model".into(),
            train_on: TrainOn::Assistant,
            overlong: Overlong::Drop,
            packing: true,
            system: String::new(),
            user_template: String::new(),
            assistant_template: String::new(),
            join: None,
            join_key: "id".into(),
            group_by: None,
            groups: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Auto,
    Text,
    Jsonl,
    Chat,
    Sharegpt,
    Alpaca,
    #[serde(rename = "prompt_completion")]
    PromptCompletion,
    Fields,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    Assistant,
    LastAssistant,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    Drop,
    Truncate,
}

/// `[optim]`: AdamW and the learning-rate schedule (linear warmup, then cosine decay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps, from 0 to `lr`.
    pub warmup_steps: usize,
    /// Decoupled weight decay (AdamW), applied to matrices only, never to norms or biases.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// AdamW epsilon, added to the root of the second moment.
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    /// On GPU backends (wgpu, CUDA), each parameter's clip-and-AdamW update as one kernel and the
    /// gradient norm as one op, instead of some 22 tensor ops a parameter; `false` uses the tensor
    /// ops. The CPU kernels have their own.
    pub fused: bool,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            fused: true,
        }
    }
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: usize,
    /// Seed for initialisation, data order and sampling.
    pub seed: u64,
    /// `"auto"` (CUDA, else a hardware wgpu adapter, else the CPU), `"cpu"` (flex), `"ndarray"`,
    /// `"wgpu[:N]"` or `"cuda[:N]"`.
    pub device: DeviceSpec,
    /// Compute precision: `"f32"`, `"bf16-mixed"` or `"f16-mixed"` (matmuls and attention in
    /// half precision; master weights, norms, loss and AdamW in f32).
    pub precision: Precision,
    /// On the CPU backends at f32, compute forward and backward with Kiln's fused CPU kernels
    /// (models/src/cpu_kernels/: the same model and gradients, several times faster) instead
    /// of Burn's op-by-op autodiff graph; `false` uses Burn's graph.
    pub cpu_kernels: bool,
    /// Train attention as one custom autodiff op on Burn's graph (the GPUs; the CPU with
    /// `cpu_kernels = false` or mixed precision): the backend's fused attention forward, and a
    /// backward pass that recomputes the probabilities instead of keeping `[B, H, T, T]` tensors
    /// per layer. Same gradients (tested); on lavapipe 43% less device memory and 28% more
    /// tokens/s at context 512; `false` keeps Burn's decomposed attention.
    pub fused_attention: bool,
    /// Within the fused attention op on wgpu and CUDA, Kiln's tiled flash-attention kernels
    /// (trainer/src/cube_kernels/attention.rs): causal, f32/f16/bf16, head dims up to 128; the
    /// forward keeps each row's log-sum-exp and the backward recomputes the probabilities a tile
    /// at a time, so neither pass writes a `[B, H, T, T]` tensor. Same gradients (tested on
    /// wgpu). Off until measured on a GPU; packed rows and other backends keep the op's path.
    pub flash_attention: bool,
    /// Compute the loss on Burn's graph as one custom autodiff op (models/src/loss.rs): the
    /// log-sum-exp and the target's logit forward, `softmax − one-hot` backward, instead of
    /// Burn's `log_softmax` and `gather`, which write several more `[tokens, vocab]` tensors each
    /// way. Same gradients (tested); `false` keeps Burn's composition.
    pub fused_loss: bool,
    /// RMSNorm on Burn's graph as one custom autodiff op (models/src/norm.rs) with a written-out
    /// backward pass; on wgpu and CUDA each pass is one CubeCL kernel. `false` keeps Burn's ops.
    pub fused_norm: bool,
    /// The MLP's `silu(gate) · up` on Burn's graph as one custom autodiff op
    /// (models/src/swiglu.rs); on wgpu and CUDA each pass is one CubeCL kernel. `false` keeps
    /// Burn's ops.
    pub fused_swiglu: bool,
    /// On Burn's graph, projections that share an input (q, k and v; the MLP's gate and up) as
    /// one matmul of their weights side by side, split after: one GEMM instead of three (two)
    /// each way, for a copy of the weights a step. Same gradients (tested); `false`: a matmul
    /// each.
    pub fused_proj: bool,
    /// On CUDA, linear layers' matmuls (forward and both backward GEMMs) through cuBLASLt, as one
    /// custom autodiff op (models/src/linear.rs, trainer/src/cublaslt_cuda.rs); checked before
    /// the run that the machine has libcublasLt. Other devices keep Burn's matmul (warned).
    pub cublaslt: bool,
    /// Gradient checkpointing in the fused CPU kernels: the forward pass keeps only each
    /// layer's input, and the backward pass runs each layer's forward again. Some 12 times less
    /// activation memory for about a fifth more compute, and the same gradients, bit for bit.
    /// Burn's graph (the GPUs, `cpu_kernels = false`) ignores it, with a warning.
    pub gradient_checkpointing: bool,
    /// On Burn's graph, hold the embedding and head padded to a multiple of this many tokens
    /// (zero rows and columns the logits leave out), for aligned matmuls on a GPU; checkpoints,
    /// exports and the loss keep the true vocabulary. Absent: 128 on a GPU backend, 64 on the
    /// CPU backends; 1 turns it off. The fused CPU kernels never pad.
    pub pad_vocab: Option<usize>,
    /// Evaluate validation loss every N steps (and at the end); 0 means only at the end.
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Write a checkpoint every N steps; 0 means only at the end.
    pub checkpoint_every: usize,
    /// Keep the last K checkpoints.
    pub keep_checkpoints: usize,
    /// Log a line every N steps when no progress bar is shown.
    pub log_every: usize,
    /// Stop once training has used this many joules; the run still writes final/ and its report.
    pub max_energy_j: Option<f64>,
    /// Stop at the first evaluation whose validation loss is at or below this.
    pub target_val_loss: Option<f64>,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 12,
            grad_accum: 1,
            seed: 1337,
            device: DeviceSpec::Auto,
            precision: Precision::F32,
            cpu_kernels: true,
            fused_attention: true,
            flash_attention: false,
            fused_loss: true,
            fused_norm: true,
            fused_swiglu: true,
            fused_proj: true,
            cublaslt: false,
            gradient_checkpointing: false,
            pad_vocab: None,
            eval_every: 250,
            eval_batches: 50,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            log_every: 50,
            max_energy_j: None,
            target_val_loss: None,
        }
    }
}

/// `[eval]`: tasks run on the trained model, as `kiln eval --task` takes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Tasks run at the end of `kiln run`: `bpb:FILE[@FROM]`, `hellaswag[:N]`, `squad[:N]`.
    pub tasks: Vec<String>,
    /// Also run them every N steps (0: only at the end).
    pub every: usize,
    /// Prompts whose greedy continuations go into the report (the samples task).
    pub prompts: Vec<String>,
    /// Tokens generated per prompt (0 means 200).
    pub sample_tokens: usize,
}

/// `[energy]`: how joules are measured, and what they cost in carbon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnergySection {
    /// `"auto"` (NVML for GPUs when present, plus RAPL counters where readable, else the CPU
    /// estimate), `"nvml"`, `"rapl"`, or `"estimate"`.
    pub meter: Meter,
    /// Watts per busy core for the estimate (default 12 W: the Green Algorithms calculator's figure).
    pub watts_per_core: f64,
    /// Constant watts (DRAM, idle draw) the estimate adds for the wall time.
    pub idle_watts: f64,
    /// Grid carbon intensity in gCO2e per kWh (default 475: the world average Green Algorithms uses).
    pub grid_gco2_per_kwh: f64,
    /// Where RAPL counters are read.
    pub powercap_root: String,
}

impl Default for EnergySection {
    fn default() -> Self {
        Self {
            meter: Meter::Auto,
            watts_per_core: 12.0,
            idle_watts: 0.0,
            grid_gco2_per_kwh: 475.0,
            powercap_root: "/sys/class/powercap".into(),
        }
    }
}

/// `[lora]`: LoRA adapters (`y = x·W + s·(x·Aᵀ)·Bᵀ`) on some projections of a frozen base model.
/// Only the adapters get gradients, AdamW moments, clipping and decay; checkpoints and `final/`
/// hold them in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// The adapters' rank r.
    pub rank: usize,
    /// The scale's numerator: the adapter adds `(alpha / rank)·B·A` (`alpha / √rank` with `rslora`).
    pub alpha: f64,
    /// Dropout on the adapters' input while training (PEFT's `lora_dropout`), in [0, 1).
    pub dropout: f64,
    /// The adapted projections: any of `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`,
    /// or `["all-linear"]` for all seven.
    pub targets: Vec<String>,
    /// rsLoRA: scale by `alpha / √rank`.
    pub rslora: bool,
    /// How the frozen base is held: `"f32"`, `"bf16"` or `"f16"` (half the memory; its weights
    /// rounded once, matmuls still in f32). The adapters and their AdamW state stay f32.
    pub base_dtype: String,
}

/// `[retriever]`: training a dense retriever (`stage = "retriever"`). Each record is a (query,
/// passage) pair: the first user turn and the last assistant turn of its conversation (with
/// `format = "fields"`, `user_template` renders the query and `assistant_template` the passage).
/// Each batch of `train.batch_size` pairs is its own set of negatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrieverSection {
    /// The softmax temperature τ of the contrastive loss over cosine similarities (0.01 to 1).
    pub temperature: f64,
    /// A query's tokens beyond this are cut (passages are cut at `model.context`).
    pub query_tokens: usize,
    /// The fused CPU kernels compute the loss as a gradient cache: the embeddings from forward
    /// passes that keep nothing, then each side forward again, kept, before its backward pass.
    /// A third more work for the activations of one side at a time (the passages') instead of
    /// both; the same gradients. For batches whose activations do not fit.
    pub gradient_cache: bool,
}

impl Default for RetrieverSection {
    fn default() -> Self {
        Self { temperature: 0.05, query_tokens: 64, gradient_cache: false }
    }
}

/// `[retrieval]`: the index a run retrieves from, how passages go into a prompt, and RAFT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalSection {
    /// An index folder made by `kiln index build` (absolute, or under the data root). Empty: Kiln
    /// indexes `corpus` itself.
    pub index: String,
    /// A corpus under the data root (JSONL `{doc_id, title, text}`, Parquet or text) that Kiln
    /// indexes with BM25 into the cache when `index` is empty (once per content and chunking).
    pub corpus: String,
    /// `bm25`, `dense` (the embeddings of the index's model) or `hybrid` (the two fused by
    /// reciprocal rank); dense and hybrid need an `index` built with `--kind dense|hybrid --embed`.
    pub kind: String,
    /// How `hybrid` fuses the two rankings: `convex` (min-max normalised scores, weighted) or
    /// `rrf` (reciprocal rank); also the hybrid the `squad-retrieval` eval reports.
    pub fusion: String,
    /// The dense ranking's weight in the fusion, 0 to 1 (BM25's is 1 minus it). Absent: 0.4 for
    /// convex (chosen on validation questions), 0.5 for rrf (the unweighted sum).
    pub dense_weight: Option<f64>,
    /// Passages per question.
    pub k: usize,
    /// Tokens the user turn (passages and question) may take; passages are cut to fit, the
    /// question never.
    pub budget: usize,
    /// How each passage is shown: `{n}` (from 1), `{doc_id}`, `{title}` (else the id), `{text}`.
    pub passage_template: String,
    /// SFT (RAFT): the share of examples whose passages include their gold passage (the
    /// `data.join` record); the rest get distractors only. Absent: no RAFT.
    pub raft_p: Option<f64>,
    /// SFT (RAFT): the record field retrieved with (the question).
    pub query_field: String,
    /// SFT (RAFT): distractors are the best of this many retrieved passages whose documents are
    /// the training records' own.
    pub raft_pool: usize,
    /// Tokens per chunk when Kiln indexes `corpus`.
    pub chunk_tokens: usize,
    /// Tokens consecutive chunks share when Kiln indexes `corpus`.
    pub overlap: usize,
}

impl Default for RetrievalSection {
    fn default() -> Self {
        Self {
            index: String::new(),
            corpus: String::new(),
            kind: "bm25".into(),
            fusion: "convex".into(),
            dense_weight: None,
            k: 3,
            budget: 1024,
            passage_template: "[{n}] {title}\n{text}".into(),
            raft_p: None,
            query_field: "question".into(),
            raft_pool: 20,
            chunk_tokens: 256,
            overlap: 32,
        }
    }
}

impl Default for LoraSection {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, dropout: 0.0, targets: vec!["all-linear".into()], rslora: false, base_dtype: "f32".into() }
    }
}

/// The projections `[lora] targets` may name.
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
