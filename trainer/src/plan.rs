//! The plan: a recipe (with its `--set` overrides) and the command line, resolved once into
//! typed values. The model's sizes come from the preset (or the `init` model), the vocabulary
//! from the tokenizer, the eval tasks from the evals registry, the engine from the device and the
//! precision. Everything after this reads the plan; nothing parses a recipe string again.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::DType;
use kiln_models::lora::LoraSpec;
use kiln_models::{checkpoint, presets, LlamaConfig, Tokenizer};
use kiln_recipes::{Precision, Recipe, Stage};

use crate::data::sft::{self, SftData};
use crate::data::shards::{resolve_sources, token_stream, tokenizer_for, SourceFile};
use crate::data::sources::Dirs;
use crate::device::Device;
use crate::engine::EngineKind;

/// The training data, tokenized and split.
pub struct TrainData {
    pub sources: Vec<SourceFile>,
    pub corpus: Corpus,
    /// UTF-8 bytes per token in the corpus (EOS excluded), for bits per byte.
    pub bytes_per_token: f64,
}

/// Pretraining's token stream, SFT's examples, or the retriever stage's pairs.
pub enum Corpus {
    Tokens { train: Vec<u32>, val: Vec<u32> },
    Examples(SftData),
    Pairs(crate::data::pairs::PairData),
}

impl TrainData {
    /// Training and validation tokens.
    pub fn sizes(&self) -> (usize, usize) {
        match &self.corpus {
            Corpus::Tokens { train, val } => (train.len(), val.len()),
            Corpus::Examples(d) => (d.train.iter().map(|e| e.ids.len()).sum(), d.val.iter().map(|e| e.ids.len()).sum()),
            Corpus::Pairs(d) => {
                let n = |v: &[crate::data::pairs::Pair]| v.iter().map(|p| p.query.len() + p.passage.len()).sum();
                (n(&d.train), n(&d.val))
            }
        }
    }
}

/// Everything a run needs, resolved.
pub struct Plan {
    /// The recipe as resolved (overrides applied): the run's `plan.toml`.
    pub recipe: Recipe,
    pub model: LlamaConfig,
    pub tok: Tokenizer,
    pub data: TrainData,
    /// The data root, for eval task files.
    pub data_root: PathBuf,
    /// The model folder the weights start from (`init`), if any.
    pub init_dir: Option<PathBuf>,
    /// The `init` model's vocabulary; the plan's is larger where SFT added special tokens.
    pub init_vocab: usize,
    /// The `[eval]` tasks (and the samples task when it lists prompts), parsed.
    pub tasks: Vec<Box<dyn kiln_evals::Task>>,
    pub device: Device,
    pub precision: Precision,
    pub engine: EngineKind,
    /// CPU threads (the kernels' shards; `RAYON_NUM_THREADS`).
    pub threads: usize,
    /// `[lora]`: the adapters to train on the frozen `init` model.
    pub lora: Option<LoraSpec>,
}

impl Plan {
    /// Resolves `recipe` for `device`: reads or downloads the data, builds the tokenizer (or takes
    /// the `init` model's), tokenizes (or reuses the cached shards), splits train and validation,
    /// and parses the eval tasks, all before any run directory exists.
    pub fn resolve(recipe: Recipe, dirs: &Dirs, device: Device) -> Result<Plan> {
        if recipe.stage != Stage::Pretrain && recipe.init.is_none() {
            let stage = if recipe.stage == Stage::Sft { "sft" } else { "retriever" };
            bail!("stage = \"{stage}\" fine-tunes a model: set init\n  hint: init = \"runs/<dir>\", a Hugging Face folder, \"hf://org/model\" or a .gguf file");
        }
        let tasks = recipe_tasks(&recipe, dirs)?;
        // With `init`, the model's own config and tokenizer come with its weights.
        let init_dir = match &recipe.init {
            Some(init) => {
                // A relative path that is not here may be under the data root (a shipped model file).
                let p = Path::new(init);
                let under_root = dirs.data_root.join(p);
                let p = if !init.starts_with("hf://") && p.is_relative() && !p.exists() && under_root.exists() { under_root.as_path() } else { p };
                Some(crate::run_dir::model_dir(p).with_context(|| format!("init = \"{init}\""))?)
            }
            None => None,
        };
        let sources = resolve_sources(&recipe.data, dirs)?;
        let (mut tok, mut model) = match &init_dir {
            Some(dir) => {
                let (mut cfg, tok) = checkpoint::read_meta(dir)?;
                if let Some(ctx) = recipe.model.context {
                    cfg.max_position_embeddings = ctx;
                    cfg.check().map_err(|e| anyhow::anyhow!("model.context = {ctx}: {e}"))?;
                }
                tracing::info!("init: {} ({} parameters); [model] and [tokenizer] come from it (model.context may shorten the context)", dir.display(), cfg.num_params());
                (tok, cfg)
            }
            None => {
                let tok = tokenizer_for(&recipe.tokenizer, &sources, &recipe.data, dirs)?;
                let cfg = model_config(&recipe, &tok)?;
                (tok, cfg)
            }
        };
        let init_vocab = model.vocab_size;
        let data = match recipe.stage {
            Stage::Pretrain => split(&recipe, sources, &tok, dirs, model.max_position_embeddings)?,
            Stage::Sft => {
                let (data, added) = sft_data(&recipe, sources, &mut tok, dirs, model.max_position_embeddings)?;
                // New special tokens (the template's markers) become new embedding rows.
                model.vocab_size = model.vocab_size.max(tok.vocab_size());
                if added > 0 {
                    tracing::info!("added {added} special token(s) for the chat template; the embedding grows to {} rows", model.vocab_size);
                }
                data
            }
            Stage::Retriever => pair_data(&recipe, sources, &tok, dirs, model.max_position_embeddings)?,
        };
        let lora = match &recipe.lora {
            Some(l) => {
                let mut spec = LoraSpec::new(l.rank, l.alpha, l.dropout, &l.targets).map_err(|e| anyhow::anyhow!("[lora]: {e}"))?;
                spec.rslora = l.rslora;
                if model.vocab_size > init_vocab {
                    bail!(
                        "[lora]: the chat template adds {} token(s) the base model's vocabulary lacks, and LoRA keeps the embedding frozen, so they could not be learned\n  hint: use the model's own template (data.chat_template = \"model\"), or fine-tune the whole model (remove [lora])",
                        model.vocab_size - init_vocab
                    );
                }
                Some(spec)
            }
            None => None,
        };
        let t = &recipe.train;
        let engine = EngineKind::choose(&device, t.precision, t.cpu_kernels);
        if t.cublaslt {
            check_cublaslt(&device)?;
        }
        Ok(Plan { precision: t.precision, engine, model, tok, data, data_root: dirs.data_root.clone(), init_dir, init_vocab, tasks, device, threads: threads(), lora, recipe })
    }

    /// What `kiln recipe check` and `kiln run` print: sizes, tokens and a memory estimate.
    pub fn summary(&self) -> String {
        let t = &self.recipe.train;
        let c = &self.model;
        let ctx = c.max_position_embeddings;
        let per_step = t.batch_size as f64 * t.grad_accum as f64 * ctx as f64;
        let (state, act) = self.memory_estimate();
        let mib = |b: f64| b / 1048576.0;
        format!(
            "model: {} layers, d_model {}, {} heads ({} kv), SwiGLU {}, context {}, vocab {}\nparameters: {}\ntokens per step: {per_step} ({} x {} x {} accum)\ntotal tokens: {}\ndata: {} train tokens, {} validation tokens\nmemory estimate: {:.1} MiB (weights, grads and AdamW state {:.1} MiB; activations {:.1} MiB)",
            c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, ctx, c.vocab_size, c.num_params(), t.batch_size, ctx, t.grad_accum,
            per_step * t.steps as f64, self.data.sizes().0, self.data.sizes().1,
            mib(state + act), mib(state), mib(act)
        ) + &self.lora_summary() + &self.sft_summary() + &self.pairs_summary()
    }

    /// The retriever stage: pairs, passages, what was cut.
    fn pairs_summary(&self) -> String {
        let Corpus::Pairs(d) = &self.data.corpus else { return String::new() };
        let s = &d.stats;
        format!(
            "\nretriever: {} records -> {} pairs ({} train, {} validation) over {} distinct passages; {} queries cut at {} tokens, {} passages cut at the context; mean {:.1} query and {:.1} passage tokens; temperature {}, {} pairs a batch (each batch's other passages are the negatives)",
            s.records, s.pairs, d.train.len(), d.val.len(), s.passages, s.queries_cut, self.recipe.retriever.clone().unwrap_or_default().query_tokens, s.passages_cut,
            s.query_tokens as f64 / s.pairs.max(1) as f64, s.passage_tokens as f64 / s.pairs.max(1) as f64, d.tau, self.recipe.train.batch_size
        )
    }

    /// LoRA: the adapters and how much of the model they train.
    fn lora_summary(&self) -> String {
        let Some(l) = &self.lora else { return String::new() };
        let n = l.params(&self.model);
        format!(
            "\nlora: rank {}, alpha {} (scale {:.4}{}) on {}: {n} trainable parameters ({:.2}% of the model's {}); the base is frozen, in {}",
            l.rank, l.alpha, l.scaling(), if l.rslora { ", rsLoRA" } else { "" }, l.targets.join(" "),
            100.0 * n as f64 / self.model.num_params() as f64, self.model.num_params(),
            self.recipe.lora.as_ref().map_or("f32", |l| l.base_dtype.as_str())
        )
    }

    /// SFT: what became of the records (dropped, truncated) and the share of loss tokens.
    fn sft_summary(&self) -> String {
        let Corpus::Examples(d) = &self.data.corpus else { return String::new() };
        let s = &d.stats;
        format!(
            "\nsft: {} records -> {} examples ({} train, {} validation); {} dropped as longer than the context, {} truncated ({} tokens cut), {} with no loss tokens dropped; {} tokens, {} carry loss ({:.1}%)\nsft batches: {} training rows ({}); {:.1}% of batch positions are padding",
            s.records, s.examples, d.train.len(), d.val.len(), s.dropped_overlong, s.truncated, s.truncated_tokens, s.dropped_no_loss,
            s.tokens, s.loss_tokens, 100.0 * s.loss_tokens as f64 / s.tokens.max(1) as f64,
            s.rows, if self.recipe.data.packing { "examples packed, best-fit decreasing" } else { "one example a row" }, 100.0 * s.padding_share
        )
    }

    /// Bytes of f32 weights, gradients and both AdamW moments (under LoRA, the adapters' only),
    /// and of activations (~ 34·d floats
    /// per token per layer, d under gradient checkpointing, 5·heads·T more where Burn's decomposed attention keeps its
    /// `[B, H, T, T]` tensors, and the logits). In f64: absurd sizes must not overflow.
    pub fn memory_estimate(&self) -> (f64, f64) {
        let (t, c) = (&self.recipe.train, &self.model);
        let ctx = c.max_position_embeddings as f64;
        // Weights, gradients and both moments; under LoRA the base has weights only.
        let base_bytes = if self.recipe.lora.as_ref().is_some_and(|l| l.base_dtype != "f32") { 2.0 } else { 4.0 };
        let state = match &self.lora {
            Some(l) => c.num_params() as f64 * base_bytes + (4 * l.params(c)) as f64 * 4.0,
            None => c.num_params() as f64 * 4.0 * 4.0,
        };
        let attn = if t.fused_attention { 0.0 } else { 5.0 * c.num_attention_heads as f64 * ctx };
        let (d, layers) = (c.hidden_size as f64, c.num_hidden_layers as f64);
        let per_layer = 34.0 * d + attn;
        // Gradient checkpointing in the kernels keeps each layer's input, and one layer's values
        // at a time.
        let stack = if t.gradient_checkpointing && self.engine == EngineKind::CpuKernels { d * layers + per_layer } else { per_layer * layers };
        // A retriever runs no head, and keeps both sides' activations (one side's, the
        // passages', as a gradient cache).
        let (tokens, act_per_tok) = if self.recipe.stage == Stage::Retriever {
            let r = self.recipe.retriever.clone().unwrap_or_default();
            let q = if r.gradient_cache && self.engine == EngineKind::CpuKernels { 0.0 } else { r.query_tokens.min(ctx as usize) as f64 };
            (ctx + q, stack)
        } else {
            (ctx, stack + 2.0 * c.vocab_size as f64)
        };
        (state, t.batch_size as f64 * tokens * act_per_tok * 4.0)
    }

    /// The multiple `train.pad_vocab` pads the vocabulary to on Burn's graph: the recipe's, else
    /// 128 on a GPU backend and 64 on the CPU; 1 (none) on the fused CPU kernels.
    pub fn vocab_multiple(&self) -> usize {
        match self.recipe.train.pad_vocab {
            _ if self.engine == EngineKind::CpuKernels => 1,
            Some(m) => m,
            None if self.device.gpu_name().is_some() => 128,
            None => 64,
        }
    }

    /// Refuses a run whose memory estimate exceeds the memory it would run in: this machine's on
    /// the CPU backends, a CUDA GPU's through NVML (a wgpu adapter's is not known before its
    /// backend starts).
    pub fn check_memory(&self) -> Result<()> {
        let (state, act) = self.memory_estimate();
        let Some(have) = crate::perf::memory_capacity(&self.device) else { return Ok(()) };
        let (need, have) = (state + act, have as f64);
        if need > have {
            let whose = match self.device.gpu_name() {
                Some(_) => format!("{}'s", self.device.describe()),
                None => "this machine's".into(),
            };
            bail!(
                "the memory estimate, {:.1} GiB, exceeds {whose} {:.1} GiB\n  hint: lower train.batch_size, model.context or the model's size (train.grad_accum keeps the tokens per step)",
                need / 1073741824.0,
                have / 1073741824.0
            );
        }
        Ok(())
    }

    /// The device and engine, as reports name them.
    pub fn backend(&self) -> String {
        match self.engine {
            EngineKind::CpuKernels => format!("{} (fused CPU kernels)", self.device.describe()),
            EngineKind::Graph => self.device.describe(),
        }
    }
}

/// Tokenizes the sources and splits off the last `val_fraction` of the tokens for validation.
fn split(recipe: &Recipe, sources: Vec<SourceFile>, tok: &Tokenizer, dirs: &Dirs, ctx: usize) -> Result<TrainData> {
    let stream = token_stream(&sources, &recipe.data, tok, dirs)?;
    let n = stream.tokens.len();
    let n_val = ((n as f64) * recipe.data.val_fraction).round() as usize;
    if n_val < ctx + 1 || n - n_val < ctx + 1 {
        bail!(
            "data: {n} tokens is too little for context {ctx} with val_fraction {} (each split needs at least {} tokens)\n  hint: add data, lower model.context or change data.val_fraction",
            recipe.data.val_fraction,
            ctx + 1
        );
    }
    let mut train = stream.tokens;
    let val = train.split_off(n - n_val);
    let text_tokens = (stream.meta.n_tokens - stream.meta.n_docs).max(1);
    Ok(TrainData { sources, corpus: Corpus::Tokens { train, val }, bytes_per_token: stream.meta.n_bytes as f64 / text_tokens as f64 })
}

/// SFT's examples: conversations from the sources, rendered by the chat template (whose missing
/// special tokens are added to `tok`; returns how many), with their loss masks.
fn sft_data(recipe: &Recipe, sources: Vec<SourceFile>, tok: &mut Tokenizer, dirs: &Dirs, ctx: usize) -> Result<(TrainData, usize)> {
    let data = &recipe.data;
    let mut chat = sft::chat_template(data, tok, dirs)?;
    let mut added = 0;
    if chat.source == kiln_models::chat::CHATML {
        added = tok.add_special_tokens(&kiln_models::chat::CHATML_TOKENS);
        chat = kiln_models::chat::ChatTemplate::new(tok, Some(kiln_models::chat::CHATML))?;
    }
    // The template trained with is the one the model is exported and chatted with.
    tok.chat_template = Some(chat.source.clone());
    let files: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
    let mut raft = match recipe.retrieval.as_ref().and_then(|r| r.raft_p.map(|p| (r, p))) {
        Some((r, p)) => Some(crate::data::raft::Raft::new(r, p, dirs, tok, recipe.train.seed).context("[retrieval]")?),
        None => None,
    };
    let convs = sft::conversations(data, &files, dirs, raft.as_mut())?;
    if let Some(r) = &raft {
        let (kept, all) = r.kept.get();
        tracing::info!("retrieval: RAFT passages for {all} examples ({} each, gold passage in {kept}, raft_p {:.2}) from {}", r.spec.k, r.spec.p_gold, r.index.dir.display());
    }
    let mut d = sft::examples(&convs, &chat, tok, data, ctx)?;
    let t = &recipe.train;
    let loader = sft::ExampleLoader::new(d.train.clone(), data.packing, ctx, t.batch_size, t.seed, tok.pad_id, Default::default());
    (d.stats.rows, d.stats.padding_share) = (loader.rows(), loader.padding_share());
    let bytes: usize = convs.iter().flatten().map(|m| m.content.len()).sum();
    let bytes_per_token = bytes as f64 / d.stats.tokens.max(1) as f64;
    Ok((TrainData { sources, corpus: Corpus::Examples(d), bytes_per_token }, added))
}

/// The retriever stage's pairs: the records' conversations (as SFT reads them), each its first
/// user turn (the query) and last assistant turn (the passage), tokenized and cut.
fn pair_data(recipe: &Recipe, sources: Vec<SourceFile>, tok: &Tokenizer, dirs: &Dirs, ctx: usize) -> Result<TrainData> {
    let data = &recipe.data;
    let files: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
    let convs = sft::conversations(data, &files, dirs, None)?;
    let r = recipe.retriever.clone().unwrap_or_default();
    let d = crate::data::pairs::pairs(&convs, tok, r.query_tokens, ctx, data.val_fraction, r.temperature as f32)?;
    let bytes: usize = convs.iter().flatten().map(|m| m.content.len()).sum();
    let bytes_per_token = bytes as f64 / (d.stats.query_tokens + d.stats.passage_tokens).max(1) as f64;
    Ok(TrainData { sources, corpus: Corpus::Pairs(d), bytes_per_token })
}

/// The model configuration: the preset with the recipe's overrides and the tokenizer's vocabulary.
pub fn model_config(recipe: &Recipe, tok: &Tokenizer) -> Result<LlamaConfig> {
    let m = &recipe.model;
    let mut c = presets::preset(&m.preset, tok.vocab_size()).with_context(|| {
        format!("model.preset: unknown preset '{}'\n  hint: one of {}", m.preset, presets::NAMES.join(", "))
    })?;
    if let Some(v) = m.d_model { c.hidden_size = v; }
    if let Some(v) = m.n_layers { c.num_hidden_layers = v; }
    if let Some(v) = m.n_heads { c.num_attention_heads = v; }
    if let Some(v) = m.n_kv_heads { c.num_key_value_heads = v; }
    if m.n_heads.is_some() && m.n_kv_heads.is_none() { c.num_key_value_heads = c.num_attention_heads; }
    if let Some(v) = m.ffn_hidden { c.intermediate_size = v; }
    if let Some(v) = m.context { c.max_position_embeddings = v; }
    if let Some(v) = m.rope_theta { c.rope_theta = v; }
    if let Some(v) = m.norm_eps { c.rms_norm_eps = v; }
    if let Some(v) = m.tie_embeddings { c.tie_word_embeddings = v; }
    c.bos_token_id = Some(tok.bos_id);
    c.eos_token_id = Some(tok.eos_id);
    c.pad_token_id = Some(tok.pad_id);
    c.check().map_err(|e| anyhow::anyhow!("[model]: {e}"))?;
    Ok(c)
}

/// The recipe's `[retrieval] fusion` and `dense_weight`.
fn recipe_fusion(ret: &kiln_recipes::RetrievalSection) -> Result<kiln_retrieval::Fusion> {
    kiln_retrieval::Fusion::parse(&ret.fusion, ret.dense_weight).context("retrieval.fusion")
}

/// The recipe's `[eval]` tasks, parsed by the evals registry, plus the samples task when it
/// lists prompts.
fn recipe_tasks(r: &Recipe, dirs: &Dirs) -> Result<Vec<Box<dyn kiln_evals::Task>>> {
    let mut v = Vec::new();
    let fusion = r.retrieval.as_ref().map(recipe_fusion).transpose()?;
    let index = match &r.retrieval {
        Some(ret) if !r.eval.tasks.is_empty() => {
            let dir = crate::data::raft::index_dir(ret, dirs).context("[retrieval]")?;
            let kind = kiln_retrieval::Kind::parse(&ret.kind).context("retrieval.kind")?;
            let mut index = crate::embedder::open_index(&dir, Some(kind), None, false, None).context("[retrieval]")?;
            index.set_fusion(fusion.unwrap_or_default());
            Some(std::sync::Arc::new(index))
        }
        _ => None,
    };
    for (i, spec) in r.eval.tasks.iter().enumerate() {
        let mut task = kiln_evals::parse_task(spec, &dirs.data_root).with_context(|| format!("eval.tasks[{i}]"))?;
        if let Some(index) = &index {
            task.set_retrieval(index);
        }
        if let (Some(ret), Some(fusion)) = (&r.retrieval, fusion) {
            task.set_fusion(fusion);
            task.set_budget(ret.budget);
        }
        kiln_evals::check_files(task.as_ref()).with_context(|| format!("eval.tasks[{i}] = \"{spec}\""))?;
        v.push(task);
    }
    if !r.eval.prompts.is_empty() {
        let max_tokens = if r.eval.sample_tokens == 0 { 200 } else { r.eval.sample_tokens };
        v.push(Box::new(kiln_evals::tasks::samples::Samples { prompts: r.eval.prompts.clone(), max_tokens }));
    }
    Ok(v)
}

/// CPU threads: `RAYON_NUM_THREADS`, else every core.
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// `train.cublaslt`: on a CUDA device the machine must have libcublasLt (checked by opening it);
/// other devices train with Burn's matmul, with a warning.
fn check_cublaslt(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda { index, .. } => crate::cublaslt_cuda::available(*index).map_err(|e| anyhow::anyhow!("train.cublaslt on {}: {e}\n  hint: --set train.cublaslt=false trains with Burn's matmul", device.describe())),
        _ => {
            tracing::warn!("train.cublaslt applies to CUDA devices; {} trains with Burn's matmul", device.describe());
            Ok(())
        }
    }
}

/// The compute type of a precision (`None`: f32).
pub fn compute_dtype(p: Precision) -> Option<DType> {
    match p {
        Precision::Bf16Mixed => Some(DType::BF16),
        Precision::F16Mixed => Some(DType::F16),
        Precision::F32 => None,
    }
}

/// Whether backend `B` can compute in `precision` on `device`, as the backend itself says
/// (`Backend::supports_dtype`): ndarray has no half types, wgpu's shaders (WGSL) have no bf16 and
/// have f16 only on adapters with the shader-f16 feature. Asked before training, so that an
/// unsupported type is an error with a hint instead of a panic in a kernel compiler (on wgpu that
/// panic is on the device thread and left the process hanging). `dev` is the device `device` is.
pub fn check_precision<B: burn::tensor::backend::Backend>(precision: Precision, device: &B::Device, dev: &Device) -> Result<()> {
    let Some(dt) = compute_dtype(precision) else { return Ok(()) };
    if B::supports_dtype(device, dt) {
        return Ok(());
    }
    let others: Vec<&str> = Precision::ALL
        .into_iter()
        .filter(|p| *p != precision && compute_dtype(*p).is_some_and(|d| B::supports_dtype(device, d)))
        .map(Precision::as_str)
        .chain(["f32"])
        .collect();
    bail!(
        "train.precision = \"{precision}\": {} cannot compute in {dt:?}\n  hint: --set train.precision={} (supported on this device){}",
        dev.describe(),
        others.join(" or --set train.precision="),
        match dev.backend() {
            "ndarray" => "; on the CPU, --device cpu (flex) computes in both half types",
            "wgpu" if dt == DType::BF16 => "; bf16-mixed needs CUDA or --device cpu",
            _ => "",
        }
    )
}
