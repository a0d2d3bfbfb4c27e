//! `kiln`: the command line. The backend is chosen once, here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use clap::{Parser, Subcommand};
use kiln_models::generate::{generate, SampleOptions};
use kiln_models::Tokenizer;
use kiln_recipes::Recipe;
use kiln_trainer::data::sources::Dirs;
use kiln_trainer::device::{self, Device};
use kiln_trainer::run::{self, Outcome, RunCtx};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Train small language models end to end, and account for the energy they cost.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Compute device: auto (CUDA, else a hardware wgpu adapter, else the CPU), cpu (flex), ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    device: Option<String>,
    /// Read-only data root (default: $KILN_DATA, else ./data).
    #[arg(long)]
    data_root: Option<PathBuf>,
}

/// Data-parallel training: one `kiln run` per device, all with the same recipe.
#[derive(clap::Args)]
struct DistArgs {
    /// Number of workers (processes) in the data-parallel run.
    #[arg(long)]
    nodes: Option<usize>,
    /// This worker's rank, 0..nodes; rank 0 writes checkpoints and reports.
    #[arg(long, requires = "nodes")]
    node_rank: Option<usize>,
    /// HOST:PORT of `kiln coordinator`.
    #[arg(long, requires = "nodes")]
    coordinator: Option<String>,
    /// HOST:PORT where this worker serves tensors to the others (reachable from them).
    #[arg(long, requires = "nodes")]
    node_addr: Option<String>,
    /// Seconds to wait for all workers to join.
    #[arg(long, default_value_t = 120)]
    connect_timeout_s: u64,
    /// Seconds a collective step may wait on the others before the worker gives up.
    #[arg(long, default_value_t = 600)]
    step_timeout_s: u64,
}

impl DistArgs {
    fn options(&self) -> Result<Option<kiln_trainer::dist::DistOptions>> {
        let Some(nodes) = self.nodes else { return Ok(None) };
        let need = |v: &Option<String>, flag: &str| v.clone().with_context(|| format!("--nodes needs {flag}"));
        Ok(Some(kiln_trainer::dist::DistOptions {
            nodes,
            rank: self.node_rank.context("--nodes needs --node-rank")?,
            coordinator: need(&self.coordinator, "--coordinator HOST:PORT")?,
            node_addr: need(&self.node_addr, "--node-addr HOST:PORT")?,
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout_s),
            step_timeout: std::time::Duration::from_secs(self.step_timeout_s),
        }))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train from a recipe.
    Run {
        recipe: PathBuf,
        /// Override a recipe field, e.g. --set train.steps=500 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        common: Common,
        /// Where run directories are created.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        #[command(flatten)]
        dist: DistArgs,
    },
    /// Start the coordinator (burn-collective's global orchestrator) for data-parallel runs.
    Coordinator {
        /// HOST:PORT to listen on; workers pass the same to --coordinator.
        #[arg(long)]
        listen: String,
    },
    /// Continue a stopped run from its newest checkpoint.
    Resume {
        run_dir: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Recipe tools.
    Recipe {
        #[command(subcommand)]
        command: RecipeCommand,
    },
    /// Generate text from a run (its final/ model, else its newest checkpoint), a model folder, or hf://org/model.
    Generate {
        model: PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// 0 means greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Keep the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling threshold (1: off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Compute device: auto, cpu, ndarray, wgpu[:N], cuda[:N].
        #[arg(long)]
        device: Option<String>,
    },
    /// Evaluate a run (its final/ model, else its newest checkpoint), a model folder, or hf://org/model.
    Eval {
        model: PathBuf,
        /// bpb:FILE[@FROM], hellaswag[:N|all], squad[:N|all] (repeatable). Files are under the data root.
        #[arg(long = "task", value_name = "TASK", required = true)]
        tasks: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Compare runs: a Markdown table and an SVG of validation loss against training energy,
    /// with the Pareto front drawn.
    Compare {
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        /// Where to write the SVG.
        #[arg(long, default_value = "compare.svg")]
        out: PathBuf,
    },
    /// Write a run's model (final/, else its newest checkpoint) or a model folder in the Hugging
    /// Face layout, with a model card.
    Export {
        model: PathBuf,
        /// Output folder (default: RUN_DIR/hf). Never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
        /// f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Shard the weights above this many MB.
        #[arg(long, default_value_t = DEFAULT_SHARD_MB)]
        max_shard_mb: usize,
        /// The licence for the model card (an SPDX id or "other").
        #[arg(long, default_value = "other")]
        license: String,
    },
    /// Upload a run's model (exported first, to RUN_DIR/hf, when it has not been) or an export
    /// folder to the Hugging Face Hub, in one commit. The token comes from HF_TOKEN or the
    /// Hugging Face token file and is never printed.
    Publish {
        model: PathBuf,
        /// The Hub repository, USER/NAME or ORG/NAME; created when missing.
        #[arg(long)]
        repo: String,
        /// Create the repository as private (an existing one keeps its visibility).
        #[arg(long)]
        private: bool,
        /// The branch to commit to.
        #[arg(long, default_value = "main")]
        revision: String,
        /// The commit message.
        #[arg(long)]
        message: Option<String>,
        /// Print what would be uploaded, and where, without contacting the Hub.
        #[arg(long)]
        dry_run: bool,
        /// When exporting first: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// When exporting first: the licence for the model card.
        #[arg(long, default_value = "other")]
        license: String,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Validate a recipe and print the resolved plan, parameter count, tokens and memory estimate.
    Check {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long)]
        data_root: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a tokenizer on text files and write tokenizer.json.
    Train {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// bpe, char or byte.
        #[arg(long, default_value = "bpe")]
        kind: String,
        #[arg(long)]
        out: PathBuf,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Runs `$body` with `$B` bound to the autodiff backend for the resolved device `$dev`, and `$d`
/// to Burn's device value. The CPU default is flex: on Burn's graph ndarray is about 11% faster on
/// bench-cpu, but its parallel reductions make two identical runs differ in the last bits, which
/// breaks exact resume; flex is bit-reproducible at a fixed thread count (BENCHMARKS.md). With the
/// fused CPU kernels (the default at f32) training is reproducible on both.
macro_rules! with_backend {
    ($dev:expr, $B:ident, $d:ident, $body:block) => {
        match &$dev {
            Device::Flex => {
                type $B = Autodiff<burn::backend::Flex>;
                let $d: burn::tensor::Device<$B> = Default::default();
                $body
            }
            Device::NdArray => {
                type $B = Autodiff<burn::backend::NdArray>;
                let $d: burn::tensor::Device<$B> = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu { kind, index, .. } => {
                type $B = Autodiff<burn::backend::Wgpu>;
                let $d: burn::tensor::Device<$B> = Device::wgpu_device(*kind, *index);
                $body
            }
            #[cfg(feature = "cuda")]
            Device::Cuda { index, .. } => {
                type $B = Autodiff<burn::backend::Cuda>;
                let $d: burn::tensor::Device<$B> = burn::backend::cuda::CudaDevice { index: *index };
                $body
            }
        }
    };
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,cubecl_wgpu=warn,cubecl_runtime=warn,wgpu_core=warn,wgpu_hal=warn,naga=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    // The coordinator's tokio tasks may panic when a worker drops out; tokio contains those.
    if !matches!(cli.command, Command::Coordinator { .. }) {
        exit_on_background_panic();
    }
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A panic on a thread other than `main` ends the process (after the usual panic message). The
/// GPU backends run each device's work on a thread of their own; when that thread panicked (a
/// kernel that would not compile), the main thread waited on it forever. Checkpoints are written
/// to a temporary name and renamed, so stopping here never leaves a damaged one. A data-parallel
/// run replaces this hook with its own (dist.rs), which turns the collective layer's panics into
/// errors.
fn exit_on_background_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let thread = std::thread::current();
        if thread.name() != Some("main") {
            eprintln!("error: background thread '{}' panicked (above); stopping rather than waiting on it forever. The run's last complete checkpoint is kept", thread.name().unwrap_or("?"));
            std::process::exit(101);
        }
    }));
}

fn install_signal_handler() {
    let r = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: writing a checkpoint after this step (press again to abort)");
    });
    if let Err(e) = r {
        tracing::warn!("cannot install the Ctrl-C/SIGTERM handler: {e}");
    }
}

/// `device::resolve`, and for a GPU, CubeCL's compiled-kernel and autotune caches under
/// `$KILN_CACHE/cubecl` (see `device::configure_kernel_cache`).
fn resolve_device(spec: &str) -> Result<Device> {
    let be = device::resolve(spec)?;
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if let Some(root) = device::configure_kernel_cache(&be, &Dirs::from_env(None).cache) {
        tracing::info!("GPU kernels: compiled and autotuned on first use (minutes on a new GPU), cached in {}", root.display());
    }
    Ok(be)
}

/// `resolve_device`, then `train.precision` checked against it before anything is written.
fn training_device(spec: &str, precision: &str) -> Result<Device> {
    let be = resolve_device(spec)?;
    with_backend!(be, B, d, { run::check_precision::<B>(precision, &d, &be)? });
    Ok(be)
}

/// The fused attention and cross-entropy ops (`train.fused_attention`, `train.fused_loss`;
/// models/src/attention.rs, loss.rs) for every autodiff backend `with_backend!` builds, and the
/// one-kernel AdamW for the GPU ones.
fn register_fused_ops() {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use kiln_models::registry::register_fused_ops;
    #[cfg(feature = "flex")]
    register_fused_ops::<burn::backend::Flex, NoCheckpointing>();
    #[cfg(feature = "ndarray")]
    register_fused_ops::<burn::backend::NdArray, NoCheckpointing>();
    #[cfg(feature = "wgpu")]
    register_fused_ops::<burn::backend::Wgpu, NoCheckpointing>();
    #[cfg(feature = "cuda")]
    register_fused_ops::<burn::backend::Cuda, NoCheckpointing>();
    // The one-kernel AdamW (`optim.fused`) for the inner backends of training: Burn's `Wgpu` and
    // `Cuda` are `Fusion<CubeBackend<runtime, f32, i32, bool element>>`.
    #[cfg(feature = "wgpu")]
    kiln_trainer::optim_cube::register::<cubecl::wgpu::WgpuRuntime, f32, i32, u32>();
    #[cfg(feature = "cuda")]
    kiln_trainer::optim_cube::register::<cubecl::cuda::CudaRuntime, f32, i32, u8>();
}

fn dispatch(cli: Cli) -> Result<()> {
    register_fused_ops();
    match cli.command {
        Command::Coordinator { listen } => kiln_trainer::dist::run_coordinator(&listen),
        Command::Run { recipe, sets, common, runs_dir, dist } => {
            let r = Recipe::load(&recipe, &sets)?;
            let dist = dist.options()?;
            let dirs = Dirs::from_env(common.data_root);
            let be = training_device(common.device.as_deref().unwrap_or(&r.train.device), &r.train.precision)?;
            let p = run::prepare(&r, &dirs)?;
            // Only rank 0 of a data-parallel run keeps a run directory; the others work in a scratch one.
            let _scratch;
            let runs_dir = match &dist {
                Some(o) if o.rank > 0 => {
                    _scratch = tempfile::tempdir()?;
                    _scratch.path().to_path_buf()
                }
                _ => runs_dir,
            };
            let dir = run::create_run_dir(&p, &runs_dir, &dirs, &be.describe())?;
            tracing::info!("run directory: {}", dir.display());
            println!("{}", run::summary(&p));
            install_signal_handler();
            let ctx = RunCtx { dir, device: be.clone(), dist, stop: &STOP };
            let outcome = with_backend!(be, B, d, { run::start::<B>(&p, &ctx, &d)? });
            finish(outcome)
        }
        Command::Resume { run_dir, common } => {
            let r = run::load_plan(&run_dir)?;
            let dirs = Dirs::from_env(common.data_root.or_else(|| {
                std::env::var_os("KILN_DATA").is_none().then(|| run::recorded_data_root(&run_dir)).flatten()
            }));
            let be = training_device(common.device.as_deref().unwrap_or(&r.train.device), &r.train.precision)?;
            let p = run::prepare(&r, &dirs)?;
            install_signal_handler();
            let ctx = RunCtx { dir: run_dir, device: be.clone(), dist: None, stop: &STOP };
            let outcome = with_backend!(be, B, d, { run::resume::<B>(&p, &ctx, &d)? });
            finish(outcome)
        }
        Command::Recipe { command: RecipeCommand::Check { recipe, sets, data_root } } => {
            let r = Recipe::load(&recipe, &sets)?;
            let p = run::prepare(&r, &Dirs::from_env(data_root))?;
            println!("# resolved plan for {}\n{}", recipe.display(), r.to_toml());
            println!("{}", run::summary(&p));
            println!("recipe OK");
            Ok(())
        }
        Command::Generate { model, prompt, max_tokens, temperature, top_k, top_p, seed, device } => {
            let be = resolve_device(device.as_deref().unwrap_or("auto"))?;
            let dir = run::model_dir(&model)?;
            with_backend!(be, B, device, {
                let (m, cfg, tok) = kiln_models::checkpoint::load_dir::<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend>(&dir, &device)?;
                let mut ids = vec![tok.bos_id];
                ids.extend(tok.encode(&prompt)?);
                let o = SampleOptions { max_tokens, temperature, top_k, top_p, seed, stop: Some(tok.eos_id) };
                let out = generate(&m, cfg.max_position_embeddings, &ids, &o, &device);
                println!("{prompt}{}", tok.decode(&out)?);
            });
            Ok(())
        }
        Command::Eval { model, tasks, common } => {
            let be = resolve_device(common.device.as_deref().unwrap_or("auto"))?;
            let dir = run::model_dir(&model)?;
            let dirs = Dirs::from_env(common.data_root);
            let tasks: Vec<Box<dyn kiln_evals::Task>> =
                tasks.iter().map(|t| kiln_evals::parse_task(t, &dirs.data_root)).collect::<Result<_, _>>()?;
            let results = with_backend!(be, B, device, {
                type I = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
                let (m, cfg, tok) = kiln_models::checkpoint::load_dir::<I>(&dir, &device)?;
                let lm = kiln_evals::ModelScorer::<I> { model: &m, tok: &tok, context: cfg.max_position_embeddings, device };
                // On the CPU, log-probabilities come from the fused kernels (same numbers).
                run::with_scorer(lm, &cfg, matches!(be, Device::Flex | Device::NdArray), |lm| run_evals(&tasks, lm, &be))?
            });
            let out = serde_json::json!({"model": dir, "evals": results});
            // On a finished run, the evals also join report.json, report.md and report.svg.
            if let (Ok(text), Ok(recipe)) = (std::fs::read_to_string(model.join("report.json")), run::load_plan(&model)) {
                let mut rep: serde_json::Value = serde_json::from_str(&text).context("report.json is damaged")?;
                if let (Some(old), Some(new)) = (rep["evals"].as_object_mut(), results.as_object()) {
                    old.extend(new.clone());
                } else {
                    rep["evals"] = results.clone();
                }
                let cfg = kiln_models::checkpoint::read_config(&dir.join("config.json"))?;
                std::fs::write(model.join("report.json"), serde_json::to_string_pretty(&rep)?)?;
                run::write_report_card(&model, &recipe, &cfg, &rep)?;
                println!("updated report.json, report.md and report.svg in {}", model.display());
            }
            if model.join("plan.toml").is_file() {
                std::fs::write(model.join("eval.json"), serde_json::to_string_pretty(&out)?)?;
                let card = format!(
                    "# Kiln eval: {}

Model `{}`.
{}",
                    model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
                    dir.display(),
                    kiln_evals::evals_markdown(results.as_object().unwrap_or(&serde_json::Map::new()))
                );
                std::fs::write(model.join("eval.md"), card)?;
                println!("wrote {} and eval.md", model.join("eval.json").display());
            }
            Ok(())
        }
        Command::Compare { runs, out } => compare(&runs, &out),
        Command::Publish { model, repo, private, revision, message, dry_run, dtype, license } => {
            use kiln_trainer::hub;
            hub::check_repo_id(&repo)?;
            // An export folder goes up as it is; a run or a bare model folder is exported first.
            let is_export = |d: &Path| ["config.json", "tokenizer_config.json", "README.md"].iter().all(|f| d.join(f).is_file());
            let _tmp;
            let folder = if is_export(&model) {
                model.clone()
            } else if model.join("plan.toml").is_file() && is_export(&model.join("hf")) {
                println!("using the existing export {}", model.join("hf").display());
                model.join("hf")
            } else {
                let out = if model.join("plan.toml").is_file() {
                    model.join("hf")
                } else {
                    _tmp = tempfile::tempdir()?;
                    _tmp.path().join("hf")
                };
                let o = kiln_trainer::export::ExportOptions { dtype: store_dtype(&dtype)?, max_shard_bytes: DEFAULT_SHARD_MB * 1_000_000, license };
                export_model(&model, &out, &o)?;
                out
            };
            let files = hub::upload_list(&folder)?;
            let total: u64 = files.iter().map(|f| f.1).sum();
            let name = std::fs::canonicalize(&model).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string())).unwrap_or_default();
            let message = message.unwrap_or_else(|| format!("Upload {name} (trained with Kiln {})", env!("CARGO_PKG_VERSION")));
            let token = hub::find_token();
            if dry_run {
                println!("dry run: would upload {} files ({:.1} MB) from {} to hf://{repo}@{revision}{} in one commit \"{message}\":", files.len(), total as f64 / 1e6, folder.display(), if private { " (private)" } else { "" });
                for (f, n) in &files {
                    println!("  {f:<40} {n:>12} bytes");
                }
                match &token {
                    Some(t) => println!("token: found in {}", t.source),
                    None => println!("token: none found (set HF_TOKEN or log in); the upload itself would fail"),
                }
                return Ok(());
            }
            let Some(token) = token else {
                bail!("no Hugging Face token: set HF_TOKEN, or put a token in {} (what `hf auth login` writes)\n  hint: create one with write access at https://huggingface.co/settings/tokens; try --dry-run to see what would be uploaded", hf_hub::hf_home().join("token").display());
            };
            println!("uploading {} files ({:.1} MB) to {repo}@{revision} (token from {})", files.len(), total as f64 / 1e6, token.source);
            let o = hub::PublishOptions { repo: &repo, private, revision: Some(&revision), message };
            let url = hub::publish(&folder, &token, &o)?;
            println!("published: {url}");
            Ok(())
        }
        Command::Export { model, out, dtype, max_shard_mb, license } => {
            let dtype = store_dtype(&dtype)?;
            let out = out.unwrap_or_else(|| model.join("hf"));
            let o = kiln_trainer::export::ExportOptions { dtype, max_shard_bytes: max_shard_mb.max(1) * 1_000_000, license };
            export_model(&model, &out, &o)?;
            Ok(())
        }
        Command::Tokenizer { command: TokenizerCommand::Train { input, vocab_size, kind, out } } => {
            let texts: Vec<String> = input
                .iter()
                .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
                .collect::<Result<_>>()?;
            let tok = match kind.as_str() {
                "bpe" => Tokenizer::train_bpe(texts.iter().map(String::as_str), vocab_size, true)?,
                "char" => Tokenizer::train_char(texts.iter().map(String::as_str))?,
                "byte" => Tokenizer::byte_level()?,
                other => bail!("--kind {other}: expected bpe, char or byte"),
            };
            if out.exists() {
                bail!("{} already exists; Kiln does not overwrite it", out.display());
            }
            tok.save(&out)?;
            println!("wrote {} ({} tokens)", out.display(), tok.vocab_size());
            Ok(())
        }
    }
}

/// Runs each task with the default energy meter, printing a line per task.
fn run_evals(tasks: &[Box<dyn kiln_evals::Task>], lm: &mut dyn kiln_evals::Scorer, be: &Device) -> Result<serde_json::Value> {
    let d = kiln_recipes::EnergySection::default();
    let gpu = kiln_trainer::perf::gpu_info(be);
    let (mut meters, notes) = kiln_evals::energy::Meters::choose(&d.meter, Path::new(&d.powercap_root), d.watts_per_core, d.idle_watts, gpu.as_ref())
        .map_err(|e| anyhow::anyhow!(e))?;
    for n in notes {
        tracing::info!("{n}");
    }
    Ok(kiln_evals::run_tasks(tasks, lm, &mut meters, |name, v| println!("{}", kiln_evals::summary_line(name, v)))?)
}

fn compare(runs: &[PathBuf], out: &Path) -> Result<()> {
    use kiln_evals::report::{compare_svg, pareto_front, RunPoint};
    let mut reps = Vec::new();
    for r in runs {
        let p = r.join("report.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: no report.json (has the run finished?)", r.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: damaged", p.display()))?;
        reps.push((r.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), v));
    }
    let points: Vec<RunPoint> = reps
        .iter()
        .map(|(n, v)| RunPoint {
            label: n.clone(),
            joules: v["energy"]["joules"].as_f64().unwrap_or(f64::NAN),
            quality: v["quality"]["val_loss"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    let front = pareto_front(&points);
    println!("| run | params | steps | tokens | val loss | val bpb | joules | method | J/token | gCO2e | Pareto |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let f = kiln_evals::fmt_num;
    for (i, (n, v)) in reps.iter().enumerate() {
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v["params"], v["steps"], v["throughput"]["tokens"], f(&v["quality"]["val_loss"], 4), f(&v["quality"]["val_bpb"], 4),
            f(&v["energy"]["joules"], 1), v["energy"]["method"].as_str().unwrap_or("?"), f(&v["energy"]["j_per_token"], 5),
            f(&v["energy"]["gco2e"], 3), if front.contains(&i) { "yes" } else { "" }
        );
    }
    compare_svg(out, &points, "validation loss").map_err(|e| anyhow::anyhow!(e))?;
    println!("\nwrote {}", out.display());
    Ok(())
}

fn finish(o: Outcome) -> Result<()> {
    match o {
        Outcome::Finished => Ok(()),
        Outcome::Stopped { .. } => std::process::exit(130),
    }
}

/// Weights are sharded above this many MB by default (as `save_pretrained`'s 5 GB).
const DEFAULT_SHARD_MB: usize = 5000;

/// Exports a run (its final/ or newest checkpoint, with its report for the model card) or a
/// model folder to `out` in the Hugging Face layout.
fn export_model(model: &Path, out: &Path, o: &kiln_trainer::export::ExportOptions) -> Result<()> {
    let src = run::model_dir(model)?;
    let run = model.join("plan.toml").is_file().then_some(model);
    kiln_trainer::export::export(&src, run, out, o)?;
    println!("exported {} to {}", src.display(), out.display());
    Ok(())
}

fn store_dtype(s: &str) -> Result<kiln_models::checkpoint::StoreDtype> {
    match s {
        "f32" => Ok(kiln_models::checkpoint::StoreDtype::F32),
        "bf16" => Ok(kiln_models::checkpoint::StoreDtype::BF16),
        other => bail!("--dtype {other}: expected f32 or bf16"),
    }
}
