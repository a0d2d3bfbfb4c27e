//! `kiln tokenizer train`: train a tokenizer on text files.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kiln_models::Tokenizer;

#[derive(clap::Subcommand)]
pub enum Args {
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

pub fn run(a: Args) -> Result<()> {
    let Args::Train { input, vocab_size, kind, out } = a;
    let texts: Vec<String> = input.iter().map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))).collect::<Result<_>>()?;
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
