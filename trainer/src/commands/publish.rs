//! `kiln publish`: upload a run's model (exported first when it has not been) or an export folder
//! to the Hugging Face Hub in one commit. The token is never printed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use kiln_trainer::export::ExportOptions;
use kiln_trainer::hub;

use super::export::{export_model, store_dtype, DEFAULT_SHARD_MB};

#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(a: Args) -> Result<()> {
    hub::check_repo_id(&a.repo)?;
    let _tmp;
    let folder = match export_folder(&a.model) {
        Some(f) => f,
        None => {
            let out = if a.model.join("plan.toml").is_file() {
                a.model.join("hf")
            } else {
                _tmp = tempfile::tempdir()?;
                _tmp.path().join("hf")
            };
            let o = ExportOptions { dtype: store_dtype(&a.dtype)?, max_shard_bytes: DEFAULT_SHARD_MB * 1_000_000, license: a.license.clone() };
            export_model(&a.model, &out, &o, false)?;
            out
        }
    };
    let files = hub::upload_list(&folder)?;
    let total: u64 = files.iter().map(|f| f.1).sum();
    let name = std::fs::canonicalize(&a.model).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string())).unwrap_or_default();
    let message = a.message.unwrap_or_else(|| format!("Upload {name} (trained with Kiln {})", env!("CARGO_PKG_VERSION")));
    let token = hub::find_token();
    let (repo, revision) = (&a.repo, &a.revision);
    if a.dry_run {
        println!("dry run: would upload {} files ({:.1} MB) from {} to hf://{repo}@{revision}{} in one commit \"{message}\":", files.len(), total as f64 / 1e6, folder.display(), if a.private { " (private)" } else { "" });
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
    let o = hub::PublishOptions { repo, private: a.private, revision: Some(revision), message };
    let url = hub::publish(&folder, &token, &o)?;
    println!("published: {url}");
    Ok(())
}

/// An export folder goes up as it is, and so does a run's existing export (`RUN_DIR/hf`); `None`:
/// export first.
fn export_folder(model: &Path) -> Option<PathBuf> {
    // A model (config and tokenizer) or a LoRA adapter, each with its card.
    let is_export = |d: &Path| d.join("README.md").is_file() && (d.join("adapter_config.json").is_file() || ["config.json", "tokenizer_config.json"].iter().all(|f| d.join(f).is_file()));
    if is_export(model) {
        return Some(model.to_path_buf());
    }
    if model.join("plan.toml").is_file() && is_export(&model.join("hf")) {
        println!("using the existing export {}", model.join("hf").display());
        return Some(model.join("hf"));
    }
    None
}
