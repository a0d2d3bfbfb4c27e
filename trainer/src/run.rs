//! A run: its directory, resumable state, metrics log, checkpoints, the loop, and the report.
//!
//! ```text
//! runs/<name>-<timestamp>/
//!   plan.toml          the resolved recipe (overrides applied)
//!   manifest.json      Kiln version, git commit, recipe hash, data hashes, backend, threads, host
//!   metrics.jsonl      one line per step, one per evaluation
//!   checkpoints/step-NNNNNNN/   model (HF layout) + optimizer.safetensors + state.json
//!   final/             HF-layout weights, config.json, tokenizer.json
//!   report.json
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_models::checkpoint::{self, read_safetensors, write_atomically, write_safetensors};
use kiln_models::init::RandomInit;
use kiln_models::presets;
use kiln_models::{Llama, LlamaConfig, Tokenizer};
use kiln_recipes::{Recipe, Source};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::loader::{validation_batches, Batch, Loader, LoaderPos};
use crate::data::shards::{resolve_sources, token_stream, tokenizer_for, SourceFile};
use crate::data::sources::Dirs;
use crate::optim::{learning_rate, AdamW};
use crate::train_step::{eval_loss, train_step_synced, CpuKernels};
use kiln_evals::energy::Meters;

pub const CHECKPOINT_FORMAT: u32 = 1;

/// Everything a run needs that comes from resolving the recipe against data and presets.
pub struct Prepared {
    pub recipe: Recipe,
    pub cfg: LlamaConfig,
    pub tok: Tokenizer,
    pub sources: Vec<SourceFile>,
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    /// UTF-8 bytes per token in the corpus (EOS excluded), for bits per byte.
    pub bytes_per_token: f64,
    /// The data root, for eval task files.
    pub data_root: PathBuf,
    /// The model folder the weights start from (`init`), if any.
    pub init_dir: Option<PathBuf>,
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

/// Resolves sources, builds the tokenizer, tokenizes (or reuses shards), splits train/val.
pub fn prepare(recipe: &Recipe, dirs: &Dirs) -> Result<Prepared> {
    if recipe.stage != kiln_recipes::Stage::Pretrain {
        bail!("stage = \"sft\" is not implemented yet in this version of Kiln\n  hint: use stage = \"pretrain\"");
    }
    // With `init`, the model's own config and tokenizer come with its weights.
    let init_dir = match &recipe.init {
        Some(init) => Some(model_dir(Path::new(init)).with_context(|| format!("init = \"{init}\""))?),
        None => None,
    };
    let sources = resolve_sources(&recipe.data, dirs)?;
    let (tok, cfg) = match &init_dir {
        Some(dir) => {
            let tok = Tokenizer::load(&dir.join(checkpoint::TOKENIZER))?;
            let mut cfg = checkpoint::read_config(&dir.join(checkpoint::CONFIG))?;
            if let Some(ctx) = recipe.model.context {
                cfg.max_position_embeddings = ctx;
            }
            tracing::info!("init: {} ({} parameters); [model] and [tokenizer] come from it (model.context may shorten the context)", dir.display(), cfg.num_params());
            (tok, cfg)
        }
        None => {
            let tok = tokenizer_for(&recipe.tokenizer, &sources, &recipe.data, dirs)?;
            let cfg = model_config(recipe, &tok)?;
            (tok, cfg)
        }
    };
    let stream = token_stream(&sources, &recipe.data, &tok, dirs)?;
    let n = stream.tokens.len();
    let n_val = ((n as f64) * recipe.data.val_fraction).round() as usize;
    let ctx = cfg.max_position_embeddings;
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
    Ok(Prepared {
        recipe: recipe.clone(),
        cfg,
        tok,
        sources,
        train,
        val,
        bytes_per_token: stream.meta.n_bytes as f64 / text_tokens as f64,
        data_root: dirs.data_root.clone(),
        init_dir,
    })
}

/// What `kiln recipe check` prints beside the plan.
pub fn summary(p: &Prepared) -> String {
    let r = &p.recipe;
    let t = &r.train;
    let ctx = p.cfg.max_position_embeddings;
    let per_step = t.batch_size * t.grad_accum * ctx;
    let params = p.cfg.num_params();
    // f32 weights + grads + 2 Adam moments, plus activations (~ 34·d floats per token per layer,
    // and 5·heads·T more where Burn's decomposed attention keeps its [B, H, T, T] tensors).
    let state = params * 4 * 4;
    let attn = if t.fused_attention { 0 } else { 5 * p.cfg.num_attention_heads * ctx };
    let act_per_tok = (34 * p.cfg.hidden_size + attn) * p.cfg.num_hidden_layers + 2 * p.cfg.vocab_size;
    let act = t.batch_size * ctx * act_per_tok * 4;
    format!(
        "model: {} layers, d_model {}, {} heads ({} kv), SwiGLU {}, context {}, vocab {}\nparameters: {}\ntokens per step: {} ({} x {} x {} accum)\ntotal tokens: {}\ndata: {} train tokens, {} validation tokens\nmemory estimate: {:.1} MiB (weights, grads and AdamW state {:.1} MiB; activations {:.1} MiB)",
        p.cfg.num_hidden_layers, p.cfg.hidden_size, p.cfg.num_attention_heads, p.cfg.num_key_value_heads,
        p.cfg.intermediate_size, ctx, p.cfg.vocab_size, params, per_step, t.batch_size, ctx, t.grad_accum,
        per_step * t.steps, p.train.len(), p.val.len(),
        (state + act) as f64 / 1048576.0, state as f64 / 1048576.0, act as f64 / 1048576.0
    )
}

/// Saved in each checkpoint beside the weights and the optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    pub step: usize,
    pub tokens: u64,
    pub loader: LoaderPos,
    pub optimizer_steps: u64,
    pub wall_s: f64,
    pub train_s: f64,
    /// Training joules so far (all earlier sessions of this run), and how they were measured.
    #[serde(default)]
    pub joules: f64,
    #[serde(default)]
    pub energy_method: String,
}

/// Where the run lives and how it reports.
pub struct RunCtx<'a> {
    pub dir: PathBuf,
    /// The resolved device (reports name it with `describe()`; MFU looks its name up).
    pub device: crate::device::Device,
    /// Data-parallel training: this worker's place (joined at the start of training).
    pub dist: Option<crate::dist::DistOptions>,
    pub stop: &'a AtomicBool,
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Creates `runs_dir/<name>-<timestamp>` with `plan.toml` and `manifest.json`.
pub fn create_run_dir(p: &Prepared, runs_dir: &Path, dirs: &Dirs, backend: &str) -> Result<PathBuf> {
    let base = format!("{}-{}", p.recipe.name, timestamp());
    let mut dir = runs_dir.join(&base);
    let mut i = 2;
    while dir.exists() {
        dir = runs_dir.join(format!("{base}-{i}"));
        i += 1;
    }
    std::fs::create_dir_all(dir.join("checkpoints")).with_context(|| format!("creating {}", dir.display()))?;
    let plan = p.recipe.to_toml();
    std::fs::write(dir.join("plan.toml"), &plan)?;
    let manifest = json!({
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "git_commit": option_env!("KILN_GIT_COMMIT"),
        "recipe_sha256": sha256_hex(&plan),
        "data": p.sources.iter().map(|s| json!({"source": s.source, "path": s.path, "sha256": s.sha256})).collect::<Vec<_>>(),
        "data_root": dirs.data_root,
        "tokenizer_sha256": sha256_hex(&p.tok.to_json()?),
        "init": p.init_dir,
        "backend": backend,
        "threads": threads(),
        "host": host(),
        "created": timestamp(),
    });
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
    Ok(dir)
}

fn checkpoint_dir(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:07}"))
}

/// The run's `checkpoints/step-NNNNNNN` folders (partial ones included), sorted by step.
fn checkpoints(run: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(run.join("checkpoints")) else { return Vec::new() };
    let mut all: Vec<(usize, PathBuf)> = rd
        .flatten()
        .filter_map(|e| Some((e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()?, e.path())))
        .collect();
    all.sort();
    all
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(run: &Path) -> Option<(usize, PathBuf)> {
    checkpoints(run).into_iter().rev().find(|(_, p)| p.join("state.json").is_file())
}

fn save_checkpoint<B: AutodiffBackend>(
    run: &Path,
    model: &Llama<B>,
    p: &Prepared,
    opt: &AdamW<B::InnerBackend>,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(run, state.step);
    if dir.exists() {
        return Ok(dir);
    }
    write_atomically(&dir, |tmp| {
        checkpoint::write_model_files(tmp, model, &p.cfg, &p.tok)?;
        write_safetensors(&tmp.join("optimizer.safetensors"), &opt.to_host(), &[])?;
        let s = serde_json::to_string_pretty(state).map_err(|e| kiln_models::ModelError::io(tmp, e))?;
        std::fs::write(tmp.join("state.json"), s).map_err(|e| kiln_models::ModelError::io(tmp.join("state.json"), e))
    })?;
    // Keep the last `keep` checkpoints.
    let all = checkpoints(run);
    if all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(dir)
}

/// Removes temporary folders left by a checkpoint write that was killed half-way.
fn remove_partial_checkpoints(run: &Path) {
    let Ok(rd) = std::fs::read_dir(run.join("checkpoints")) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".step-") && name.contains(".tmp-") {
            tracing::info!("removing the partial checkpoint {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Appends JSON lines to `metrics.jsonl`, flushed line by line.
struct Metrics(std::fs::File);

impl Metrics {
    fn open(run: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(run.join("metrics.jsonl"))?;
        Ok(Self(f))
    }
    fn log(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.0, "{v}")?;
        Ok(())
    }
}

/// Drops metric lines after `step`, so that a resumed run has no duplicates.
fn truncate_metrics(run: &Path, step: usize) -> Result<()> {
    let p = run.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let tmp = run.join("metrics.jsonl.tmp");
    std::fs::write(&tmp, kept.iter().map(|l| format!("{l}\n")).collect::<String>())?;
    std::fs::rename(tmp, p)?;
    Ok(())
}

/// How a call to [`train`] ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Finished,
    Stopped { step: usize },
}

/// Starts a fresh run. Returns the run directory.
pub fn start<B: AutodiffBackend>(p: &Prepared, ctx: &RunCtx, device: &B::Device) -> Result<Outcome> {
    let model = match &p.init_dir {
        Some(dir) => Llama::<B>::build(&p.cfg, &mut checkpoint::SafetensorsSource::open_dir(dir)?, device)?,
        None => Llama::<B>::build(&p.cfg, &mut RandomInit::new(p.recipe.train.seed, p.cfg.num_hidden_layers), device)?,
    };
    let opt = AdamW::new(p.recipe.optim.clone());
    let state = TrainState { format_version: CHECKPOINT_FORMAT, step: 0, tokens: 0, loader: LoaderPos::default(), optimizer_steps: 0, wall_s: 0.0, train_s: 0.0, joules: 0.0, energy_method: String::new() };
    train(p, ctx, model, opt, state, device)
}

/// Continues a run from its newest checkpoint.
pub fn resume<B: AutodiffBackend>(p: &Prepared, ctx: &RunCtx, device: &B::Device) -> Result<Outcome> {
    let (step, ck) = latest_checkpoint(&ctx.dir)
        .with_context(|| format!("{}: no complete checkpoint under checkpoints/ to resume from", ctx.dir.display()))?;
    let state: TrainState = serde_json::from_str(&std::fs::read_to_string(ck.join("state.json"))?)
        .with_context(|| format!("{}: state.json is damaged", ck.display()))?;
    if state.format_version != CHECKPOINT_FORMAT {
        bail!("{}: checkpoint format {} (this Kiln reads {CHECKPOINT_FORMAT})", ck.display(), state.format_version);
    }
    let (model, cfg, _) = checkpoint::load_dir::<B>(&ck, device)?;
    if cfg != p.cfg {
        bail!("{}: the checkpoint's model config differs from plan.toml's", ck.display());
    }
    let mut opt = AdamW::new(p.recipe.optim.clone());
    let sizes = checkpoint::param_sizes(&model);
    opt.load_host(read_safetensors(&ck.join("optimizer.safetensors"))?, &sizes, device)
        .with_context(|| format!("{}: optimizer.safetensors", ck.display()))?;
    opt.t = state.optimizer_steps;
    truncate_metrics(&ctx.dir, step)?;
    remove_partial_checkpoints(&ctx.dir);
    tracing::info!("resuming {} from step {step}", ctx.dir.display());
    train(p, ctx, model, opt, state, device)
}

/// The compute type of `train.precision` (`None`: f32).
pub fn compute_dtype(precision: &str) -> Option<burn::tensor::DType> {
    match precision {
        "bf16-mixed" => Some(burn::tensor::DType::BF16),
        "f16-mixed" => Some(burn::tensor::DType::F16),
        _ => None,
    }
}

/// Whether backend `B` can compute in `train.precision` on `device`, as the backend itself says
/// (`Backend::supports_dtype`): ndarray has no half types, wgpu's shaders (WGSL) have no bf16 and
/// have f16 only on adapters with the shader-f16 feature. Asked before training, so that an
/// unsupported type is an error with a hint instead of a panic in a kernel compiler (on wgpu that
/// panic is on the device thread and left the process hanging). `dev` is the device `device` is.
pub fn check_precision<B: burn::tensor::backend::Backend>(precision: &str, device: &B::Device, dev: &crate::device::Device) -> Result<()> {
    let Some(dt) = compute_dtype(precision) else { return Ok(()) };
    if B::supports_dtype(device, dt) {
        return Ok(());
    }
    let others: Vec<&str> = ["bf16-mixed", "f16-mixed"]
        .into_iter()
        .filter(|p| *p != precision && compute_dtype(p).is_some_and(|d| B::supports_dtype(device, d)))
        .chain(["f32"])
        .collect();
    bail!(
        "train.precision = \"{precision}\": {} cannot compute in {dt:?}\n  hint: --set train.precision={} (supported on this device){}",
        dev.describe(),
        others.join(" or --set train.precision="),
        match dev.backend() {
            "ndarray" => "; on the CPU, --device cpu (flex) computes in both half types",
            "wgpu" if dt == burn::tensor::DType::BF16 => "; bf16-mixed needs CUDA or --device cpu",
            _ => "",
        }
    )
}

fn train<B: AutodiffBackend>(
    p: &Prepared,
    ctx: &RunCtx,
    mut model: Llama<B>,
    mut opt: AdamW<B::InnerBackend>,
    mut state: TrainState,
    device: &B::Device,
) -> Result<Outcome> {
    let r = &p.recipe;
    let t = &r.train;
    let context = p.cfg.max_position_embeddings;
    let mut loader = Loader::new(p.train.clone(), context, t.batch_size, t.seed, state.loader);
    let val: Vec<Batch> = validation_batches(&p.val, context, t.batch_size, t.eval_batches);
    let mut metrics = Metrics::open(&ctx.dir)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if tty { ProgressBar::new(t.steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(state.step as u64);
    let e = &r.energy;
    let gpu = crate::perf::gpu_info(&ctx.device);
    let (mut meters, notes) = Meters::choose(&e.meter, Path::new(&e.powercap_root), e.watts_per_core, e.idle_watts, gpu.as_ref())
        .map_err(|m| anyhow::anyhow!("energy.meter: {m}"))?;
    for n in notes {
        tracing::warn!("{n}");
    }
    let method = meters.method().as_str().to_string();
    if !state.energy_method.is_empty() && state.energy_method != method {
        tracing::warn!("this run measured energy by '{}' before and by '{method}' now", state.energy_method);
    }
    let joules0 = state.joules;
    let tasks = recipe_tasks(r, &p.data_root)?;
    let mut eval_j = 0.0; // this session's task-eval joules, kept out of the training figure
    let mut meter_s = 0.0;
    let mut components = Vec::new();
    let mut stop_reason = "steps";
    let mut target_hit: Option<serde_json::Value> = None;
    let started = Instant::now();
    let wall0 = state.wall_s;
    let mut last_val: Option<(usize, f64, f64)> = None;
    let keep_going = || !ctx.stop.load(Ordering::SeqCst);
    // Data parallelism: join the other workers; rank 0 alone writes checkpoints and reports.
    let dist = match &ctx.dist {
        Some(o) => {
            if t.max_energy_j.is_some() {
                bail!("train.max_energy_j is not supported with --nodes: each worker meters its own energy, so they could stop at different steps");
            }
            Some((crate::dist::Dist::join::<B::InnerBackend>(o, device)?, o.step_timeout))
        }
        None => None,
    };
    let (nodes, rank) = dist.as_ref().map_or((1, 0), |(d, _)| (d.nodes, d.rank));
    let main = rank == 0;
    let precision = t.precision.as_str();
    model.compute = compute_dtype(precision);
    if model.compute.is_some() {
        tracing::info!("precision {precision}: matmuls and attention in half precision, master weights and AdamW in f32");
    }
    let on_cpu = matches!(ctx.device, crate::device::Device::Flex | crate::device::Device::NdArray);
    let kernels = (t.cpu_kernels && on_cpu && model.compute.is_none()).then(|| CpuKernels::new(&model, &p.cfg, threads()));
    model.fused_attention = t.fused_attention && kernels.is_none();
    if model.fused_attention {
        match kiln_models::attention::registered::<B>() {
            Some(_) => tracing::info!("attention trained as one fused op (train.fused_attention): probabilities recomputed in the backward pass"),
            None => tracing::warn!("train.fused_attention: no fused attention op for this backend; using Burn's decomposed attention"),
        }
    }
    model.fused_loss = t.fused_loss && kernels.is_none();
    if model.fused_loss && kiln_models::loss::registered::<B>().is_none() {
        tracing::warn!("train.fused_loss: no fused cross-entropy op for this backend; using Burn's log_softmax");
    }
    if kernels.is_some() {
        tracing::info!("forward and backward by Kiln's fused CPU kernels on {} threads (train.cpu_kernels)", threads());
    }
    let kernels = kernels.as_ref();
    let backend = match kernels {
        Some(_) => format!("{} (fused CPU kernels)", ctx.device.describe()),
        None => ctx.device.describe(),
    };
    let flops_tok = crate::perf::flops_per_token(&p.cfg, context);
    let peak = crate::perf::peak_flops(ctx.device.gpu_name(), precision);
    let mut peak_mem: Option<(&str, u64)> = None;
    // This session's per-step tokens/s, for the steady-state figure in the report.
    let mut step_tps: Vec<f64> = Vec::new();
    let mut first_step_s: Option<f64> = None;
    if ctx.device.gpu_name().is_some() {
        // The first step compiles (and autotunes) every kernel it uses: say so, or it looks hung.
        let msg = "first step: compiling GPU kernels (minutes on a new GPU; cached for later runs)";
        bar.set_message(msg);
        bar.enable_steady_tick(std::time::Duration::from_millis(500));
        if !tty {
            tracing::info!("{msg}");
        }
    }

    while state.step < t.steps {
        if !keep_going() {
            state.wall_s = wall0 + started.elapsed().as_secs_f64();
            bar.abandon();
            if !main {
                eprintln!("rank {rank}: stopped at step {}", state.step);
                return Ok(Outcome::Stopped { step: state.step });
            }
            let ck = save_checkpoint(&ctx.dir, &model, p, &opt, &state, t.keep_checkpoints)?;
            eprintln!("stopped at step {}; checkpoint {}\nresume with: kiln resume {}", state.step, ck.display(), ctx.dir.display());
            return Ok(Outcome::Stopped { step: state.step });
        }
        let step = state.step + 1;
        let lr = learning_rate(&r.optim, step, t.steps);
        // Every worker draws the step's nodes x grad_accum micro-batches and trains on its own share.
        let all: Vec<Batch> = (0..t.grad_accum * nodes).map(|_| loader.next_batch()).collect();
        let micro = &all[rank * t.grad_accum..(rank + 1) * t.grad_accum];
        let t0 = Instant::now();
        let (m, mut out) = match &dist {
            None => train_step_synced(model, &mut opt, micro, lr, device, None, kernels)?,
            Some((d, timeout)) => {
                let mut hook = |g, l| -> Result<_> {
                    Ok((d.all_reduce_grads::<B::InnerBackend>(g, step, *timeout)?, d.mean::<B::InnerBackend>(l, device, step, *timeout)?))
                };
                train_step_synced(model, &mut opt, micro, lr, device, Some(&mut hook), kernels)?
            }
        };
        out.tokens *= nodes;
        model = m;
        let dt = t0.elapsed().as_secs_f64();
        if !out.loss.is_finite() {
            bar.abandon();
            let last = latest_checkpoint(&ctx.dir).map(|(_, p)| p.display().to_string()).unwrap_or_else(|| "none yet".into());
            bail!(
                "loss is {} at step {step}; training stopped\n  last good checkpoint: {last}\n  hint: lower optim.lr or raise optim.warmup_steps",
                out.loss
            );
        }
        state.step = step;
        state.tokens += out.tokens as u64;
        state.train_s += dt;
        state.loader = loader.pos;
        state.optimizer_steps = opt.t;
        let tm = Instant::now();
        let (j, comps, errors) = meters.read();
        meter_s += tm.elapsed().as_secs_f64();
        for err in errors {
            tracing::warn!("energy: {err}");
        }
        components = comps;
        state.joules = joules0 + j - eval_j;
        state.energy_method = method.clone();
        let wall = wall0 + started.elapsed().as_secs_f64();
        if let Some((kind, b)) = crate::perf::peak_memory(&ctx.device) {
            peak_mem = Some((kind, peak_mem.map_or(b, |(_, m)| m.max(b))));
        }
        let tps = out.tokens as f64 / dt;
        step_tps.push(tps);
        first_step_s.get_or_insert(dt);
        metrics.log(json!({
            "step": step, "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
            "tokens": state.tokens, "tokens_per_s": tps, "mfu": crate::perf::mfu(flops_tok, tps, peak), "wall_s": wall,
            "joules": state.joules, "energy_method": method,
            "forward_s": out.forward_s, "backward_s": out.backward_s, "optim_s": out.optim_s,
            "peak_mem_bytes": peak_mem.map(|m| m.1), "mem_kind": peak_mem.map(|m| m.0),
        }))?;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", out.loss, lr));
        if !tty && (step % t.log_every.max(1) == 0 || step == 1) {
            tracing::info!("step {step}/{} loss {:.4} lr {:.2e} grad_norm {:.3} {tps:.0} tok/s", t.steps, out.loss, lr, out.grad_norm);
        }
        if (t.eval_every > 0 && step % t.eval_every == 0) || step == t.steps {
            let vl = eval_loss(&model, &val, device, kernels);
            let bpb = vl / std::f64::consts::LN_2 / p.bytes_per_token;
            metrics.log(json!({"step": step, "kind": "eval", "val_loss": vl, "val_bpb": bpb}))?;
            bar.println(format!("step {step}: val_loss {vl:.4} val_bpb {bpb:.4}"));
            if !tty {
                tracing::info!("step {step}: val_loss {vl:.4} val_bpb {bpb:.4}");
            }
            last_val = Some((step, vl, bpb));
            if t.target_val_loss.is_some_and(|target| vl <= target) {
                target_hit = Some(json!({"step": step, "val_loss": vl, "tokens": state.tokens,
                    "wall_s": wall0 + started.elapsed().as_secs_f64(), "joules": state.joules}));
                stop_reason = "target_val_loss";
            }
        }
        if main && r.eval.every > 0 && step % r.eval.every == 0 && step != t.steps && !tasks.is_empty() {
            let (j0, _, _) = meters.read();
            let evals = run_recipe_tasks(&model, p, &tasks, &mut meters, device, kernels.is_some())?;
            eval_j += meters.read().0 - j0;
            metrics.log(json!({"step": step, "kind": "tasks", "joules": state.joules, "tokens": state.tokens, "evals": evals}))?;
        }
        if stop_reason == "steps" && t.max_energy_j.is_some_and(|m| state.joules >= m) {
            stop_reason = "max_energy_j";
        }
        if stop_reason != "steps" {
            tracing::info!("stopping at step {step}: {stop_reason} reached");
            state.wall_s = wall0 + started.elapsed().as_secs_f64();
            if main {
                save_checkpoint(&ctx.dir, &model, p, &opt, &state, t.keep_checkpoints)?;
            }
            break;
        }
        if main && ((t.checkpoint_every > 0 && step % t.checkpoint_every == 0) || step == t.steps) {
            state.wall_s = wall0 + started.elapsed().as_secs_f64();
            save_checkpoint(&ctx.dir, &model, p, &opt, &state, t.keep_checkpoints)?;
        }
    }
    bar.finish_and_clear();
    state.wall_s = wall0 + started.elapsed().as_secs_f64();
    if let Some((d, _)) = &dist {
        d.finish::<B::InnerBackend>();
        if !main {
            println!("rank {rank}: finished {} steps; rank 0 writes the model and the report", state.step);
            return Ok(Outcome::Finished);
        }
    }
    let (val_loss, val_bpb) = match last_val {
        Some((s, vl, bpb)) if s == state.step => (vl, bpb),
        _ => {
            let vl = eval_loss(&model, &val, device, kernels);
            (vl, vl / std::f64::consts::LN_2 / p.bytes_per_token)
        }
    };
    let final_dir = ctx.dir.join("final");
    if !final_dir.exists() {
        checkpoint::save_dir(&final_dir, &model, &p.cfg, &p.tok)?;
    }
    let evals = if tasks.is_empty() { json!({}) } else { run_recipe_tasks(&model, p, &tasks, &mut meters, device, kernels.is_some())? };
    let mean_tps = state.tokens as f64 / state.train_s.max(1e-9);
    let steady_tps = steady_tokens_per_s(&step_tps);
    let steady_mfu = steady_tps.and_then(|s| crate::perf::mfu(flops_tok, s, peak));
    let report = json!({
        "run": ctx.dir.file_name().map(|n| n.to_string_lossy().to_string()),
        "quality": {"val_loss": val_loss, "val_bpb": val_bpb},
        "throughput": {
            "tokens_per_s": mean_tps,
            "flops_per_token": flops_tok,
            "mfu": crate::perf::mfu(flops_tok, mean_tps, peak),
            "steady_tokens_per_s": steady_tps,
            "steady_mfu": steady_mfu,
            "first_step_s": first_step_s,
            "precision": precision,
            "tokens": state.tokens,
            "wall_s": state.wall_s,
            "train_s": state.train_s,
        },
        "energy": {
            "joules": state.joules,
            "kwh": state.joules / 3.6e6,
            "method": state.energy_method,
            "coverage": components.iter().map(|c| c.coverage.clone()).collect::<Vec<_>>().join("+"),
            "components": components,
            "j_per_token": state.joules / (state.tokens.max(1) as f64),
            "j_per_param": state.joules / p.cfg.num_params() as f64,
            "gco2e": state.joules / 3.6e6 * e.grid_gco2_per_kwh,
            "grid_gco2_per_kwh": e.grid_gco2_per_kwh,
            "meter_overhead_s": meter_s,
            "note": "this session's components; joules include earlier sessions of a resumed run",
        },
        "memory": {"peak_bytes": peak_mem.map(|m| m.1), "kind": peak_mem.map(|m| m.0)},
        "params": p.cfg.num_params(),
        "steps": state.step,
        "stop_reason": stop_reason,
        "evals": evals,
        "target": t.target_val_loss.map(|tv| json!({"val_loss": tv, "reached": target_hit})),
        "backend": backend,
        "threads": threads(),
        "workers": nodes,
    });
    std::fs::write(ctx.dir.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    write_report_card(&ctx.dir, r, &p.cfg, &report)?;
    println!(
        "\n== Kiln report: {} ==\nmodel       {} parameters ({} layers, d_model {})\nsteps       {} ({} tokens)\nval loss    {:.4}\nval bpb     {:.4}\nthroughput  {:.0} tokens/s on {} ({} threads){}\nwall time   {:.1} s\nenergy      {:.1} J ({}; {:.2e} J/token, {:.2e} gCO2e)\nfinal model {}",
        r.name, p.cfg.num_params(), p.cfg.num_hidden_layers, p.cfg.hidden_size, state.step, state.tokens, val_loss, val_bpb,
        mean_tps, backend, threads(), steady_line(steady_tps, first_step_s, steady_mfu), state.wall_s,
        state.joules, state.energy_method, state.joules / (state.tokens.max(1) as f64), state.joules / 3.6e6 * e.grid_gco2_per_kwh,
        final_dir.display()
    );
    Ok(Outcome::Finished)
}

/// Steady-state tokens/s: the median over this session's steps from the 4th on, leaving out the
/// first steps, where a GPU backend compiles and autotunes its kernels (27 s to minutes on an
/// H200, against 0.15 s for a later step). `None` with fewer than 4 steps.
pub fn steady_tokens_per_s(step_tps: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = step_tps.iter().skip(3).copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// The report's second throughput line, when the first step was much slower than the rest.
fn steady_line(steady: Option<f64>, first_s: Option<f64>, mfu: Option<f64>) -> String {
    match (steady, first_s) {
        (Some(s), Some(f)) => {
            let mfu = mfu.map(|m| format!(", MFU {:.1}%", m * 100.0)).unwrap_or_default();
            format!("\nsteady      {s:.0} tokens/s from step 4 on{mfu} (step 1 took {f:.1} s)")
        }
        _ => String::new(),
    }
}

/// The recipe's `[eval]` tasks, plus the samples task when it lists prompts.
fn recipe_tasks(r: &Recipe, data_root: &Path) -> Result<Vec<Box<dyn kiln_evals::Task>>> {
    let mut v: Vec<Box<dyn kiln_evals::Task>> =
        r.eval.tasks.iter().map(|t| kiln_evals::parse_task(t, data_root)).collect::<Result<_, _>>()?;
    if !r.eval.prompts.is_empty() {
        let max_tokens = if r.eval.sample_tokens == 0 { 200 } else { r.eval.sample_tokens };
        v.push(Box::new(kiln_evals::tasks::samples::Samples { prompts: r.eval.prompts.clone(), max_tokens }));
    }
    Ok(v)
}

/// Runs eval tasks on the current weights (without autodiff), each with its own energy figure.
fn run_recipe_tasks<B: AutodiffBackend>(
    model: &Llama<B>,
    p: &Prepared,
    tasks: &[Box<dyn kiln_evals::Task>],
    meters: &mut Meters,
    device: &B::Device,
    cpu_kernels: bool,
) -> Result<serde_json::Value> {
    let inner: Llama<B::InnerBackend> = burn::module::AutodiffModule::valid(model);
    let lm = kiln_evals::ModelScorer::<B::InnerBackend> { model: &inner, tok: &p.tok, context: p.cfg.max_position_embeddings, device: device.clone() };
    with_scorer(lm, &p.cfg, cpu_kernels, |lm| {
        Ok(kiln_evals::run_tasks(tasks, lm, meters, |n, v| tracing::info!("eval {}", kiln_evals::summary_line(n, v)))?)
    })
}

/// Runs `f` on a scorer for `lm`'s model: log-probabilities from the fused CPU kernels when
/// `cpu_kernels` (the CPU backends at f32), else from Burn's forward pass.
pub fn with_scorer<B: burn::tensor::backend::Backend, R>(
    lm: kiln_evals::ModelScorer<'_, B>,
    cfg: &LlamaConfig,
    cpu_kernels: bool,
    f: impl FnOnce(&mut dyn kiln_evals::Scorer) -> Result<R>,
) -> Result<R> {
    if cpu_kernels {
        f(&mut kiln_evals::KernelScorer::new(lm, cfg, threads())?)
    } else {
        let mut lm = lm;
        f(&mut lm)
    }
}

/// `report.md` and `report.svg` (loss against cumulative joules, evaluations marked).
pub fn write_report_card(run: &Path, r: &Recipe, cfg: &LlamaConfig, rep: &serde_json::Value) -> Result<()> {
    use kiln_evals::report::{loss_vs_energy_svg, Point};
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut joules_at = std::collections::HashMap::new();
    let mut train = Vec::new();
    for v in lines.iter().filter(|v| v.get("kind").is_none()) {
        if let (Some(s), Some(j), Some(l)) = (v["step"].as_u64(), v["joules"].as_f64(), v["loss"].as_f64()) {
            joules_at.insert(s, j);
            train.push(Point { joules: j, loss: l });
        }
    }
    let val: Vec<Point> = lines
        .iter()
        .filter(|v| v.get("kind").is_some())
        .filter_map(|v| Some(Point { joules: *joules_at.get(&v["step"].as_u64()?)?, loss: v["val_loss"].as_f64()? }))
        .collect();
    let e = &rep["energy"];
    let method = e["method"].as_str().unwrap_or("?");
    let svg_ok = match loss_vs_energy_svg(&run.join("report.svg"), &format!("{}: loss against energy", r.name), &train, &val, method) {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!("report.svg: {err}");
            false
        }
    };
    let c = cfg;
    let q = &rep["quality"];
    let t = &rep["throughput"];
    let f = kiln_evals::fmt_num;
    let mut md = format!(
        concat!(
            "# Kiln report: {name}\n\n",
            "Run `{run}`, backend {backend}, {threads} threads, Kiln {ver}.\n\n",
            "## Model\n\n",
            "| parameters | layers | d_model | heads (kv) | SwiGLU | context | vocabulary |\n|---|---|---|---|---|---|---|\n",
            "| {params} | {l} | {d} | {h} ({kv}) | {ff} | {ctx} | {v} |\n\n",
            "## Training\n\n",
            "| steps | tokens | tokens/s | wall time | stopped by |\n|---|---|---|---|---|\n",
            "| {steps} | {tokens} | {tps} | {wall} s | {stop} |\n\n",
            "## Quality\n\n",
            "| validation loss | bits per byte |\n|---|---|\n| {vl} | {bpb} |\n\n",
            "## Energy\n\n",
            "| joules | kWh | method | coverage | J/token | J/parameter | gCO2e (at {grid} g/kWh) |\n|---|---|---|---|---|---|---|\n",
            "| {j} | {kwh} | {method} | {cov} | {jt} | {jp} | {co2} |\n",
        ),
        name = r.name,
        run = run.display(),
        backend = rep["backend"].as_str().unwrap_or("?"),
        threads = rep["threads"],
        ver = env!("CARGO_PKG_VERSION"),
        params = c.num_params(),
        l = c.num_hidden_layers,
        d = c.hidden_size,
        h = c.num_attention_heads,
        kv = c.num_key_value_heads,
        ff = c.intermediate_size,
        ctx = c.max_position_embeddings,
        v = c.vocab_size,
        steps = rep["steps"],
        tokens = t["tokens"],
        tps = f(&t["tokens_per_s"], 0),
        wall = f(&t["wall_s"], 1),
        stop = rep["stop_reason"].as_str().unwrap_or("steps"),
        vl = f(&q["val_loss"], 4),
        bpb = f(&q["val_bpb"], 4),
        grid = f(&e["grid_gco2_per_kwh"], 0),
        j = f(&e["joules"], 1),
        kwh = f(&e["kwh"], 6),
        cov = e["coverage"].as_str().unwrap_or("?"),
        method = method,
        jt = f(&e["j_per_token"], 5),
        jp = f(&e["j_per_param"], 6),
        co2 = f(&e["gco2e"], 3),
    );
    if method == "estimate" {
        md.push_str("\nThe energy is an **estimate** (process CPU time x watts per busy core): no hardware counter was readable.\n");
    }
    if let Some(hit) = rep["target"]["reached"].as_object() {
        md.push_str(&format!(
            "\nReached the target validation loss {} at step {} after {} s and {} J.\n",
            f(&rep["target"]["val_loss"], 3), hit["step"], f(&hit["wall_s"], 1), f(&hit["joules"], 1)
        ));
    }
    if let Some(ev) = rep["evals"].as_object().filter(|o| !o.is_empty()) {
        md.push_str(&kiln_evals::evals_markdown(ev));
    }
    if svg_ok {
        md.push_str("\n![loss against cumulative energy](report.svg)\n");
    }
    std::fs::write(run.join("report.md"), md)?;
    Ok(())
}

/// A run directory's final/ model, else its newest checkpoint; or a model folder itself.
pub fn model_dir(p: &Path) -> Result<PathBuf> {
    let s = p.to_string_lossy();
    if s.starts_with("hf://") {
        let uri = crate::data::sources::HfUri::parse(&s)?;
        if uri.dataset || !uri.path.is_empty() {
            bail!("{s}: expected a model, hf://<org>/<name>[@rev]");
        }
        let cache = Dirs::from_env(None).cache;
        let get = |f: &str| crate::hub::download(&crate::data::sources::HfUri { path: f.into(), ..uri.clone() }, &cache);
        get("config.json")?;
        get("tokenizer.json")?;
        // Optional: carries a chat template through fine-tuning and export.
        if let Err(e) = get("tokenizer_config.json") {
            tracing::debug!("{s}: no tokenizer_config.json ({e:#})");
        }
        // One file, else the shards an index names (hf-hub puts them all in one snapshot folder).
        let weights = match get(checkpoint::WEIGHTS) {
            Ok(w) => w,
            Err(single) => {
                let index = get(checkpoint::INDEX).map_err(|_| single.context(format!("{s}: neither {} nor {} could be fetched", checkpoint::WEIGHTS, checkpoint::INDEX)))?;
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
                    .with_context(|| format!("{s}: {} is not valid JSON", checkpoint::INDEX))?;
                let shards: std::collections::BTreeSet<String> = v["weight_map"]
                    .as_object()
                    .with_context(|| format!("{s}: {} has no weight_map", checkpoint::INDEX))?
                    .values()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect();
                for shard in &shards {
                    get(shard)?;
                }
                index
            }
        };
        return weights.parent().map(Path::to_path_buf).context("no download folder");
    }
    if p.join("config.json").is_file() {
        return Ok(p.to_path_buf());
    }
    if p.join("final").join("config.json").is_file() {
        return Ok(p.join("final"));
    }
    if let Some((_, ck)) = latest_checkpoint(p) {
        return Ok(ck);
    }
    bail!("{}: no model here (expected final/, checkpoints/step-*/ or a folder with config.json)", p.display())
}

/// Reads a run directory's plan.
pub fn load_plan(run: &Path) -> Result<Recipe> {
    let path = run.join("plan.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: not a Kiln run directory (no plan.toml)", run.display()))?;
    Ok(Recipe::parse(&Source { path, text }, &[])?)
}

/// The data root a run was started with (from its manifest).
pub fn recorded_data_root(run: &Path) -> Option<PathBuf> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).ok()?).ok()?;
    m.get("data_root")?.as_str().map(PathBuf::from)
}
