//! `kiln eval`: score a model on tasks, each with its own energy figure. On a finished run the
//! results also join its report.

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use kiln_recipes::{DeviceSpec, EnergySection, Precision};
use kiln_trainer::data::sources::Dirs;
use kiln_trainer::device::Device;
use kiln_trainer::engine::{with_scorer, EngineKind};
use kiln_trainer::report::Report;

use super::{resolve_device, Common};

#[derive(clap::Args)]
pub struct Args {
    model: PathBuf,
    #[arg(long = "task", value_name = "TASK", required = true, help = task_help())]
    tasks: Vec<String>,
    /// The retrieval index (`kiln index build`) open-book tasks (squad-rag:...:topK) retrieve from.
    #[arg(long)]
    retrieval: Option<PathBuf>,
    /// The model that embeds queries for a dense or hybrid --retrieval index (default: the one
    /// its manifest names).
    #[arg(long, requires = "retrieval")]
    embed: Option<PathBuf>,
    #[command(flatten)]
    fusion: super::FusionArgs,
    #[command(flatten)]
    common: Common,
}

fn task_help() -> String {
    format!("{} (repeatable). Files are under the data root.", kiln_evals::tasks::usage())
}

pub fn run(a: Args) -> Result<()> {
    let be = resolve_device(a.common.device.unwrap_or(DeviceSpec::Auto))?;
    let dir = kiln_trainer::run_dir::model_dir(&a.model)?;
    let dirs = Dirs::from_env(a.common.data_root);
    let mut tasks: Vec<Box<dyn kiln_evals::Task>> = a.tasks.iter().map(|t| kiln_evals::parse_task(t, &dirs.data_root)).collect::<Result<_, _>>()?;
    let fusion = a.fusion.fusion()?;
    for t in &mut tasks {
        t.set_fusion(fusion);
    }
    if let Some(index) = &a.retrieval {
        let mut opened = kiln_trainer::embedder::open_index(index, None, a.embed.as_deref(), false, None)?;
        opened.set_fusion(fusion);
        let opened = std::sync::Arc::new(opened);
        let used = tasks.iter_mut().map(|t| t.set_retrieval(&opened)).fold(false, |a, b| a | b);
        if !used {
            anyhow::bail!("--retrieval {}: none of the tasks retrieves passages\n  hint: squad-rag:200@38:top3 answers from the index's 3 best passages", index.display());
        }
    }
    for t in &tasks {
        kiln_evals::check_files(t.as_ref())?;
    }
    // The engine `kiln run` would choose at f32: on the CPU, log-probabilities from the fused
    // kernels (the same numbers as Burn's forward pass, faster).
    let engine = EngineKind::choose(&be, Precision::F32, true);
    let threads = kiln_trainer::plan::threads();
    let (results, cfg) = kiln_trainer::with_backend!(be, B, device, {
        type I = <B as AutodiffBackend>::InnerBackend;
        let (m, cfg, tok) = kiln_models::checkpoint::load::<I>(&dir, &device)?;
        let lm = kiln_evals::ModelScorer::<I> { model: &m, tok: &tok, context: cfg.max_position_embeddings, device };
        (with_scorer(lm, &cfg, engine, threads, |lm| run_evals(&tasks, lm, &be))?, cfg)
    });
    // On a finished run, the evals also join report.json, report.md and report.svg.
    if let (true, Ok(recipe)) = (a.model.join("report.json").is_file(), kiln_trainer::run_dir::load_plan(&a.model)) {
        let mut rep = Report::load(&a.model)?;
        rep.evals.extend(results.clone());
        // The loaded model's configuration: an adapter run's final/ has no config.json.
        rep.write(&a.model, &recipe.name, &cfg)?;
        println!("updated report.json, report.md and report.svg in {}", a.model.display());
    }
    if a.model.join("plan.toml").is_file() {
        let out = serde_json::json!({"model": dir, "evals": results});
        std::fs::write(a.model.join("eval.json"), serde_json::to_string_pretty(&out)?)?;
        let name = a.model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let card = format!("# Kiln eval: {name}\n\nModel `{}`.\n{}", dir.display(), kiln_evals::evals_markdown(&results));
        std::fs::write(a.model.join("eval.md"), card)?;
        println!("wrote {} and eval.md", a.model.join("eval.json").display());
    }
    Ok(())
}

/// Runs each task with the default energy meter, printing a line per task.
fn run_evals(tasks: &[Box<dyn kiln_evals::Task>], lm: &mut dyn kiln_evals::Scorer, be: &Device) -> Result<kiln_evals::Evals> {
    let d = EnergySection::default();
    let gpu = kiln_trainer::perf::gpu_info(be);
    let (mut meters, notes) = kiln_evals::energy::Meters::choose(d.meter, Path::new(&d.powercap_root), d.watts_per_core, d.idle_watts, gpu.as_ref())
        .map_err(|e| anyhow::anyhow!(e))?;
    for n in notes {
        tracing::info!("{n}");
    }
    Ok(kiln_evals::run_tasks(tasks, lm, &mut meters, |name, v| println!("{}", kiln_evals::summary_line(name, v)))?)
}
