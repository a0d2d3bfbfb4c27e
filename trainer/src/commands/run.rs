//! `kiln run`: train from a recipe, alone or as one worker of a data-parallel run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln_recipes::Recipe;
use kiln_trainer::data::sources::Dirs;
use kiln_trainer::dist::DistOptions;
use kiln_trainer::plan::Plan;
use kiln_trainer::run_dir::RunDir;
use kiln_trainer::trainer::Trainer;

use super::{finish, install_signal_handler, training_device, Common, STOP};

#[derive(clap::Args)]
pub struct Args {
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
    fn options(&self) -> Result<Option<DistOptions>> {
        let Some(nodes) = self.nodes else { return Ok(None) };
        let need = |v: &Option<String>, flag: &str| v.clone().with_context(|| format!("--nodes needs {flag}"));
        Ok(Some(DistOptions {
            nodes,
            rank: self.node_rank.context("--nodes needs --node-rank")?,
            coordinator: need(&self.coordinator, "--coordinator HOST:PORT")?,
            node_addr: need(&self.node_addr, "--node-addr HOST:PORT")?,
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout_s),
            step_timeout: std::time::Duration::from_secs(self.step_timeout_s),
        }))
    }
}

pub fn run(a: Args) -> Result<()> {
    let r = Recipe::load(&a.recipe, &a.sets)?;
    let dist = a.dist.options()?;
    let dirs = Dirs::from_env(a.common.data_root);
    let device = training_device(a.common.device.unwrap_or(r.train.device), r.train.precision)?;
    let plan = Plan::resolve(r, &dirs, device)?;
    plan.check_memory()?;
    // Only rank 0 of a data-parallel run keeps a run directory; the others work in a scratch one.
    let _scratch;
    let runs_dir = match &dist {
        Some(o) if o.rank > 0 => {
            _scratch = tempfile::tempdir()?;
            _scratch.path().to_path_buf()
        }
        _ => a.runs_dir,
    };
    let run = RunDir::create(&plan, &runs_dir, &dirs)?;
    tracing::info!("run directory: {}", run.path.display());
    println!("{}", plan.summary());
    install_signal_handler();
    let outcome = kiln_trainer::with_backend!(plan.device, B, d, { Trainer::<B>::start(&plan, &run, dist.as_ref(), &d)?.run(&STOP)? });
    finish(outcome)
}
