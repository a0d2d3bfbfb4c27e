//! Ranges and invariants that need nothing outside the recipe, one function per section. Each
//! failure is the key path and what is wrong with it; `Recipe::parse` adds the file and line.
//! What needs other crates (the model preset, the tokenizer, the eval tasks' arguments) is
//! checked when the trainer resolves its plan.

use crate::schema::*;

type Check = Result<(), (String, String)>;

/// Learning rates above this are typing errors, not settings (they diverge in any model).
const MAX_LR: f64 = 1e3;
/// Steps in one run.
const MAX_STEPS: usize = 1 << 40;
/// Sizes and counts (batch, accumulation, widths, context): far above any real run, far below an
/// overflow of the sizes computed from them. Whether a run fits the machine is the plan's check.
const MAX_COUNT: usize = 1 << 24;

fn err(key: &str, msg: impl Into<String>) -> Check {
    Err((key.to_string(), msg.into()))
}

impl Recipe {
    /// Checks every section. Returns the key path and what is wrong with it.
    pub fn validate(&self) -> Check {
        optim(&self.optim)?;
        train(&self.train)?;
        data(&self.data)?;
        sft(self.stage, &self.data)?;
        tokenizer(&self.tokenizer)?;
        model(&self.model)?;
        energy(&self.energy)?;
        if let Some(l) = &self.lora {
            lora(l, self.init.is_some())?;
        }
        if let Some(r) = &self.retrieval {
            retrieval(r, self)?;
        }
        retriever(self)?;
        name(&self.name)
    }
}

/// Whether a Jinja template reads `var` in one of its `{{ ... }}` expressions.
fn uses_variable(template: &str, var: &str) -> bool {
    template.split("{{").skip(1).filter_map(|s| s.split("}}").next()).any(|e| e.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|w| w == var))
}

fn retriever(r: &Recipe) -> Check {
    if r.retriever.is_some() && r.stage != Stage::Retriever {
        return err("retriever", "[retriever] sets up stage = \"retriever\"; this recipe's stage is another");
    }
    if r.stage != Stage::Retriever {
        return Ok(());
    }
    let s = r.retriever.clone().unwrap_or_default();
    if !(s.temperature >= 0.01 && s.temperature <= 1.0) {
        return err("retriever.temperature", format!("0.01 to 1, got {}", s.temperature));
    }
    if !(4..=4096).contains(&s.query_tokens) {
        return err("retriever.query_tokens", format!("4 to 4096 tokens, got {}", s.query_tokens));
    }
    if r.train.batch_size < 2 {
        return err("train.batch_size", "a retriever learns from in-batch negatives: at least 2 pairs a batch (16 to 64 is usual)");
    }
    Ok(())
}

fn retrieval(r: &RetrievalSection, recipe: &Recipe) -> Check {
    if !["bm25", "dense", "hybrid"].contains(&r.kind.as_str()) {
        return err("retrieval.kind", format!("\"{}\": one of \"bm25\", \"dense\", \"hybrid\"", r.kind));
    }
    if r.kind != "bm25" && r.index.is_empty() {
        return err("retrieval.kind", format!("\"{}\" retrieves by embeddings, which a corpus Kiln indexes itself lacks\n  hint: build one with `kiln index build CORPUS --out INDEX --kind {} --embed MODEL` and set index = \"INDEX\"", r.kind, r.kind));
    }
    if !["convex", "rrf"].contains(&r.fusion.as_str()) {
        return err("retrieval.fusion", format!("\"{}\": \"convex\" (min-max normalised scores, weighted) or \"rrf\" (reciprocal rank)", r.fusion));
    }
    if let Some(w) = r.dense_weight {
        if !(0.0..=1.0).contains(&w) {
            return err("retrieval.dense_weight", format!("the dense ranking's share of the fusion, 0 to 1, got {w}"));
        }
    }
    if r.index.is_empty() == r.corpus.is_empty() {
        return err("retrieval", "name one of index (a folder made by `kiln index build`) or corpus (a file under the data root Kiln indexes itself)");
    }
    if !(1..=100).contains(&r.k) {
        return err("retrieval.k", format!("passages per question, 1 to 100, got {}", r.k));
    }
    if r.budget < 16 {
        return err("retrieval.budget", format!("at least 16 tokens, got {}", r.budget));
    }
    if !r.passage_template.contains("{text}") {
        return err("retrieval.passage_template", "must show the passage's {text}");
    }
    if r.chunk_tokens == 0 || r.overlap >= r.chunk_tokens {
        return err("retrieval.overlap", format!("must be less than retrieval.chunk_tokens ({} and {})", r.overlap, r.chunk_tokens));
    }
    if let Some(p) = r.raft_p {
        if !(0.0..=1.0).contains(&p) {
            return err("retrieval.raft_p", format!("a share in [0, 1], got {p}"));
        }
        if recipe.stage != Stage::Sft || recipe.data.format != DataFormat::Fields || recipe.data.join.is_none() || !uses_variable(&recipe.data.user_template, "passages") {
            return err("retrieval.raft_p", "RAFT examples are SFT records in data.format = \"fields\" whose data.join record is the gold passage, with {{ passages }} in data.user_template");
        }
        if r.raft_pool < r.k {
            return err("retrieval.raft_pool", format!("at least retrieval.k ({}), got {}", r.k, r.raft_pool));
        }
    }
    Ok(())
}

fn lora(l: &LoraSection, has_init: bool) -> Check {
    if !has_init {
        return err("lora", "LoRA trains adapters on a base model: set init (a run, a model folder, a .gguf file or hf://org/model)");
    }
    if !(1..=4096).contains(&l.rank) {
        return err("lora.rank", format!("must be between 1 and 4096, got {}", l.rank));
    }
    if !(l.alpha.is_finite() && l.alpha > 0.0) {
        return err("lora.alpha", format!("must be a positive number, got {}", l.alpha));
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return err("lora.dropout", format!("a rate in [0, 1), got {}", l.dropout));
    }
    if !["f32", "bf16", "f16"].contains(&l.base_dtype.as_str()) {
        return err("lora.base_dtype", format!("\"f32\", \"bf16\" or \"f16\", not \"{}\"", l.base_dtype));
    }
    if l.targets.is_empty() {
        return err("lora.targets", format!("name some of {} or \"all-linear\"", LORA_TARGETS.join(", ")));
    }
    for t in &l.targets {
        if t != "all-linear" && !LORA_TARGETS.contains(&t.as_str()) {
            return err("lora.targets", format!("unknown projection \"{t}\"; the targets are {} or \"all-linear\"", LORA_TARGETS.join(", ")));
        }
    }
    Ok(())
}

fn optim(o: &OptimSection) -> Check {
    if !(o.lr.is_finite() && o.lr > 0.0 && o.lr <= MAX_LR) {
        return err("optim.lr", format!("must be a positive number up to {MAX_LR}, got {}", o.lr));
    }
    if !(o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
        return err("optim.min_lr", format!("must be between 0 and optim.lr ({}), got {}", o.lr, o.min_lr));
    }
    for (k, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return err(k, format!("must be in [0, 1), got {b}"));
        }
    }
    if !(o.eps.is_finite() && o.eps > 0.0) {
        return err("optim.eps", format!("must be a positive number, got {}", o.eps));
    }
    if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
        return err("optim.weight_decay", format!("must be a number >= 0, got {}", o.weight_decay));
    }
    if !(o.grad_clip.is_finite() && o.grad_clip >= 0.0) {
        return err("optim.grad_clip", format!("must be a number >= 0 (0 disables clipping), got {}", o.grad_clip));
    }
    Ok(())
}

fn train(t: &TrainSection) -> Check {
    for (k, v, max) in [
        ("train.steps", t.steps, MAX_STEPS),
        ("train.batch_size", t.batch_size, MAX_COUNT),
        ("train.grad_accum", t.grad_accum, MAX_COUNT),
        ("train.eval_batches", t.eval_batches, MAX_COUNT),
    ] {
        in_range(k, v, 1, max)?;
    }
    in_range("train.keep_checkpoints", t.keep_checkpoints, 1, 1000)
        .map_err(|(k, m)| (k, format!("{m} (the last checkpoint is what resume uses)")))?;
    if let Some(m) = t.pad_vocab {
        in_range("train.pad_vocab", m, 1, 1024).map_err(|(k, m)| (k, format!("{m} (1 turns padding off; 64 or 128 is usual)")))?;
    }
    for (k, v) in [("train.max_energy_j", t.max_energy_j), ("train.target_val_loss", t.target_val_loss)] {
        if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            return err(k, "must be a positive number");
        }
    }
    Ok(())
}

fn data(d: &DataSection) -> Check {
    if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
        return err("data.val_fraction", format!("must be in (0, 1), got {}", d.val_fraction));
    }
    if d.sources.is_empty() {
        return err("data.sources", "list at least one source");
    }
    let https = d.sources.iter().filter(|s| crate::is_download(s)).count();
    if https != d.sha256.len() {
        return err("data.sha256", format!("{https} https source(s) but {} sha256 pin(s): pin every download, in order", d.sha256.len()));
    }
    Ok(())
}

/// The SFT-only keys: formats that need a stage, templates that need a format.
fn sft(stage: Stage, d: &DataSection) -> Check {
    let chat_formats = [DataFormat::Chat, DataFormat::Sharegpt, DataFormat::Alpaca, DataFormat::PromptCompletion, DataFormat::Fields];
    if stage == Stage::Pretrain && chat_formats.contains(&d.format) {
        return err("data.format", format!("{:?} is a chat format, for stage = \"sft\"; pretraining reads \"text\" or \"jsonl\"", d.format).to_lowercase());
    }
    if stage == Stage::Retriever && matches!(d.format, DataFormat::Text | DataFormat::Jsonl) {
        return err("data.format", "stage = \"retriever\" reads (query, passage) pairs as conversations: \"auto\", \"chat\", \"sharegpt\", \"alpaca\", \"prompt_completion\" or \"fields\" (the first user turn is the query, the last assistant turn its passage)");
    }
    if stage == Stage::Sft && matches!(d.format, DataFormat::Text | DataFormat::Jsonl) {
        return err("data.format", "stage = \"sft\" reads conversations: \"auto\", \"chat\", \"sharegpt\", \"alpaca\", \"prompt_completion\" or \"fields\" (plain text is continued pretraining: stage = \"pretrain\" with init)");
    }
    let fields = d.format == DataFormat::Fields;
    if fields && (d.user_template.is_empty() || d.assistant_template.is_empty()) {
        return err("data.user_template", "format = \"fields\" needs user_template and assistant_template (Jinja over the record's fields, e.g. \"{{ question }}\")");
    }
    if !fields && !(d.user_template.is_empty() && d.assistant_template.is_empty()) {
        return err("data.user_template", "user_template and assistant_template apply to format = \"fields\" only");
    }
    if d.group_by.is_some() != d.groups.is_some() {
        return err("data.groups", "group_by and groups go together: group_by = \"title\", groups = [0, 38]");
    }
    if let Some([a, b]) = d.groups {
        if a >= b {
            return err("data.groups", format!("[{a}, {b}] is empty: the range is [from, to) with from < to"));
        }
    }
    Ok(())
}

fn tokenizer(t: &TokenizerSection) -> Check {
    if t.kind == TokenizerKind::Bpe && !(260..=1 << 20).contains(&t.vocab_size) {
        return err("tokenizer.vocab_size", format!("must be between 260 and 1048576 for BPE, got {}", t.vocab_size));
    }
    if t.kind == TokenizerKind::File && t.path.is_none() {
        return err("tokenizer.path", "kind = \"file\" needs path = \"<tokenizer.json>\"");
    }
    Ok(())
}

fn model(m: &ModelSection) -> Check {
    for (k, v, min) in [
        ("model.d_model", m.d_model, 1),
        ("model.n_layers", m.n_layers, 1),
        ("model.n_heads", m.n_heads, 1),
        ("model.n_kv_heads", m.n_kv_heads, 1),
        ("model.ffn_hidden", m.ffn_hidden, 1),
        ("model.context", m.context, 2),
    ] {
        if let Some(v) = v {
            in_range(k, v, min, MAX_COUNT)?;
        }
    }
    if let Some(r) = m.rope_theta.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return err("model.rope_theta", format!("must be a positive number, got {r}"));
    }
    if let Some(e) = m.norm_eps.filter(|e| !(e.is_finite() && *e > 0.0 && *e < 1.0)) {
        return err("model.norm_eps", format!("must be a positive number below 1, got {e}"));
    }
    Ok(())
}

fn name(n: &str) -> Check {
    if n.is_empty() || n.len() > 200 || n.contains(['/', '\\']) || n.chars().any(char::is_control) || n.starts_with('.') {
        return err("name", format!("must be 1 to 200 characters, without slashes or control characters and not starting with '.', got {n:?}"));
    }
    Ok(())
}

/// `v` within `min..=max`.
fn in_range(key: &str, v: usize, min: usize, max: usize) -> Check {
    if v < min {
        return err(key, format!("must be at least {min}"));
    }
    if v > max {
        return err(key, format!("must be at most {max}, got {v}"));
    }
    Ok(())
}

fn energy(e: &EnergySection) -> Check {
    for (k, v) in [("energy.watts_per_core", e.watts_per_core), ("energy.idle_watts", e.idle_watts), ("energy.grid_gco2_per_kwh", e.grid_gco2_per_kwh)] {
        if !(v.is_finite() && v >= 0.0) {
            return err(k, format!("must be a number >= 0, got {v}"));
        }
    }
    Ok(())
}
