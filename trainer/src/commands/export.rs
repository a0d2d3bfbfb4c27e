//! `kiln export`: a run's model or a model folder in the Hugging Face layout, with a model card.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use kiln_models::checkpoint::StoreDtype;
use kiln_trainer::export::ExportOptions;

/// Weights are sharded above this many MB by default (as `save_pretrained`'s 5 GB).
pub const DEFAULT_SHARD_MB: usize = 5000;

#[derive(clap::Args)]
pub struct Args {
    model: PathBuf,
    /// Output folder (default: RUN_DIR/hf, or NAME-hf beside a NAME.gguf). Never overwritten.
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
    /// MODEL is a LoRA adapter folder or a LoRA run: write its base model with the adapter
    /// merged in (default output NAME-merged beside an adapter folder). Without it, a LoRA run
    /// exports its adapter folder (PEFT's format) with a model card naming the base.
    #[arg(long)]
    merge: bool,
}

pub fn run(a: Args) -> Result<()> {
    let is_run = a.model.join("plan.toml").is_file();
    let adapter = kiln_models::lora::is_adapter_dir(&kiln_trainer::run_dir::model_dir(&a.model)?);
    if adapter && !a.merge && !is_run {
        bail!("{} is a LoRA adapter folder, already in PEFT's format\n  hint: `kiln export {} --merge` writes its base model with the adapter merged in", a.model.display(), a.model.display());
    }
    if a.merge && !adapter {
        bail!("--merge: {} is not a LoRA adapter folder or a LoRA run (no adapter_config.json)", a.model.display());
    }
    let out = a.out.unwrap_or_else(|| {
        if adapter && !is_run {
            let name = a.model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
            a.model.with_file_name(format!("{name}-merged"))
        } else if kiln_models::checkpoint::is_gguf(&a.model) {
            // x.gguf -> x-hf beside it.
            a.model.with_file_name(format!("{}-hf", a.model.file_stem().unwrap_or_default().to_string_lossy()))
        } else {
            a.model.join("hf")
        }
    });
    let o = ExportOptions { dtype: store_dtype(&a.dtype)?, max_shard_bytes: a.max_shard_mb.max(1) * 1_000_000, license: a.license };
    export_model(&a.model, &out, &o, a.merge)
}

/// Exports a run (its final/ or newest checkpoint, with its report for the model card) or a
/// model folder to `out` in the Hugging Face layout; a LoRA run's adapter folder as it is (PEFT's
/// format, with a model card), or with `merge` its base with the adapter merged in.
pub fn export_model(model: &Path, out: &Path, o: &ExportOptions, merge: bool) -> Result<()> {
    let src = kiln_trainer::run_dir::model_dir(model)?;
    let run = model.join("plan.toml").is_file().then_some(model);
    if kiln_models::lora::is_adapter_dir(&src) && !merge {
        kiln_trainer::export::export_adapter(&src, run, out, o)?;
    } else {
        kiln_trainer::export::export(&src, run, out, o)?;
    }
    println!("exported {} to {}", src.display(), out.display());
    Ok(())
}

pub fn store_dtype(s: &str) -> Result<StoreDtype> {
    match s {
        "f32" => Ok(StoreDtype::F32),
        "bf16" => Ok(StoreDtype::BF16),
        other => bail!("--dtype {other}: expected f32 or bf16"),
    }
}
