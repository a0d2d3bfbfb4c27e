//! `kiln recipe check`: validate a recipe and print the resolved plan.

use std::path::PathBuf;

use anyhow::Result;
use kiln_recipes::Recipe;
use kiln_trainer::data::sources::Dirs;
use kiln_trainer::plan::Plan;

use super::{resolve_device, Common};

#[derive(clap::Subcommand)]
pub enum Args {
    /// Validate a recipe and print the resolved plan, parameter count, tokens and memory estimate.
    Check {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
}

pub fn run(a: Args) -> Result<()> {
    let Args::Check { recipe, sets, common } = a;
    let r = Recipe::load(&recipe, &sets)?;
    let device = resolve_device(common.device.unwrap_or(r.train.device))?;
    let plan = Plan::resolve(r, &Dirs::from_env(common.data_root), device)?;
    println!("# resolved plan for {}\n{}", recipe.display(), plan.recipe.to_toml());
    println!("{}", plan.summary());
    if let Err(e) = plan.check_memory() {
        println!("warning: {e}");
    }
    println!("engine: {}", plan.backend());
    println!("recipe OK");
    Ok(())
}
