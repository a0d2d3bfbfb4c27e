//! `kiln data preview`: what training will see, after the chat template, truncation and loss
//! masks: the rendered examples with the loss-bearing spans marked, or one JSON object a line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Result;
use kiln_recipes::{DeviceSpec, Recipe};
use kiln_trainer::data::sources::Dirs;
use kiln_trainer::plan::{Corpus, Plan};

use super::Common;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::Subcommand)]
pub enum Args {
    /// Print the first N training examples as the model sees them. Text marks the tokens that
    /// carry loss (green on a terminal, else between ⟦ and ⟧); json prints
    /// {"text", "input_ids", "loss_mask"} a line.
    Preview {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 3)]
        n: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        common: Common,
    },
}

pub fn run(a: Args) -> Result<()> {
    let Args::Preview { recipe, sets, n, format, common } = a;
    let r = Recipe::load(&recipe, &sets)?;
    // Preview needs no accelerator: the data, tokenizer and template are the same on every device.
    let device = kiln_trainer::device::resolve(common.device.unwrap_or(DeviceSpec::Cpu))?;
    let plan = Plan::resolve(r, &Dirs::from_env(common.data_root), device)?;
    let tok = &plan.tok;
    let examples: Vec<(Vec<u32>, Vec<bool>)> = match &plan.data.corpus {
        Corpus::Examples(d) => d.train.iter().take(n).map(|e| (e.ids.clone(), e.loss_mask.clone())).collect(),
        // The retriever stage: the query, then its passage (marked).
        Corpus::Pairs(d) => d.train.iter().take(n).map(|p| ([p.query.clone(), p.passage.clone()].concat(), [vec![false; p.query.len()], vec![true; p.passage.len()]].concat())).collect(),
        Corpus::Tokens { train, .. } => {
            let ctx = plan.model.max_position_embeddings;
            train.chunks(ctx).take(n).map(|w| (w.to_vec(), vec![true; w.len()])).collect()
        }
    };
    let mut out = std::io::stdout().lock();
    let color = out.is_terminal();
    eprintln!("{}", plan.summary());
    for (i, (ids, mask)) in examples.iter().enumerate() {
        match format {
            Format::Json => {
                let line = serde_json::json!({"text": tok.decode_all(ids)?, "input_ids": ids, "loss_mask": mask.iter().map(|&m| m as u8).collect::<Vec<_>>()});
                writeln!(out, "{line}")?;
            }
            Format::Text => {
                writeln!(out, "── example {i}: {} tokens, {} carry loss ──", ids.len(), mask.iter().filter(|&&m| m).count())?;
                // Runs of tokens with the same mask, decoded together.
                let mut start = 0;
                while start < ids.len() {
                    let lossy = mask[start];
                    let end = (start..ids.len()).find(|&j| mask[j] != lossy).unwrap_or(ids.len());
                    let text = tok.decode_all(&ids[start..end])?;
                    let (open, close) = match (lossy, color) {
                        (false, _) => ("", ""),
                        (true, true) => ("\x1b[32m", "\x1b[0m"),
                        (true, false) => ("⟦", "⟧"),
                    };
                    write!(out, "{open}{text}{close}")?;
                    start = end;
                }
                writeln!(out)?;
            }
        }
    }
    Ok(())
}
