//! `kiln resume`: continue a stopped run from its newest checkpoint, exactly.

use std::path::PathBuf;

use anyhow::Result;
use kiln_trainer::data::sources::Dirs;
use kiln_trainer::plan::Plan;
use kiln_trainer::run_dir::RunDir;
use kiln_trainer::trainer::Trainer;

use super::{finish, install_signal_handler, training_device, Common, STOP};

#[derive(clap::Args)]
pub struct Args {
    run_dir: PathBuf,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: Args) -> Result<()> {
    let run = RunDir::open(&a.run_dir)?;
    let r = run.recipe()?;
    // The data root: --data-root, else $KILN_DATA, else the one the run started with.
    let data_root = a.common.data_root.or_else(|| std::env::var_os("KILN_DATA").is_none().then(|| run.recorded_data_root()).flatten());
    let dirs = Dirs::from_env(data_root);
    let device = training_device(a.common.device.unwrap_or(r.train.device), r.train.precision)?;
    let plan = Plan::resolve(r, &dirs, device)?;
    plan.check_memory()?;
    install_signal_handler();
    let outcome = kiln_trainer::with_backend!(plan.device, B, d, { Trainer::<B>::resume(&plan, &run, &d)?.run(&STOP)? });
    finish(outcome)
}
