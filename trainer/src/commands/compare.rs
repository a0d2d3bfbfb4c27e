//! `kiln compare`: runs side by side, quality against energy.

use std::path::{Path, PathBuf};

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[arg(required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// Where to write the SVG.
    #[arg(long, default_value = "compare.svg")]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let runs: Vec<&Path> = a.runs.iter().map(PathBuf::as_path).collect();
    print!("{}", kiln_trainer::report::compare(&runs, &a.out)?);
    println!("\nwrote {}", a.out.display());
    Ok(())
}
