//! A run's directory: its plan and manifest, the metrics log, and the checkpoints.
//!
//! ```text
//! runs/<name>-<timestamp>/
//!   plan.toml          the resolved recipe (overrides applied)
//!   manifest.json      Kiln version, git commit, recipe hash, data hashes, backend, threads, host
//!   metrics.jsonl      one line per step, one per evaluation
//!   checkpoints/step-NNNNNNN/   model (HF layout) + optimizer.safetensors + state.json
//!   final/             HF-layout weights, config.json, tokenizer.json
//!   report.json, report.md, report.svg
//! ```
//!
//! Checkpoints are written under a temporary name and renamed into place; an existing one is
//! never overwritten, and only complete ones (with `state.json`) are ever read.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_models::checkpoint::{self, write_atomically, TensorList};
use kiln_recipes::{Recipe, Source};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::loader::LoaderPos;
use crate::data::sources::Dirs;
use crate::plan::Plan;

pub const CHECKPOINT_FORMAT: u32 = 1;

/// Saved in each checkpoint beside the weights and the optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    pub step: usize,
    pub tokens: u64,
    pub loader: LoaderPos,
    pub optimizer_steps: u64,
    pub wall_s: f64,
    pub train_s: f64,
    /// Training joules so far (all earlier sessions of this run), and how they were measured.
    #[serde(default)]
    pub joules: f64,
    #[serde(default)]
    pub energy_method: String,
}

impl TrainState {
    pub fn fresh() -> Self {
        Self { format_version: CHECKPOINT_FORMAT, step: 0, tokens: 0, loader: LoaderPos::default(), optimizer_steps: 0, wall_s: 0.0, train_s: 0.0, joules: 0.0, energy_method: String::new() }
    }
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `runs_dir/<name>-<timestamp>` (with `-2`, `-3`, ... when taken: each name is
    /// claimed by an atomic `create_dir`, so two runs started together never share one), with
    /// `plan.toml` and `manifest.json`.
    pub fn create(plan: &Plan, runs_dir: &Path, dirs: &Dirs) -> Result<Self> {
        let path = claim(runs_dir, &format!("{}-{}", plan.recipe.name, timestamp()))?;
        std::fs::create_dir(path.join("checkpoints")).with_context(|| format!("creating {}", path.display()))?;
        let text = plan.recipe.to_toml();
        std::fs::write(path.join("plan.toml"), &text)?;
        let manifest = json!({
            "kiln_version": env!("CARGO_PKG_VERSION"),
            "git_commit": option_env!("KILN_GIT_COMMIT"),
            "recipe_sha256": sha256_hex(&text),
            "data": plan.data.sources.iter().map(|s| json!({"source": s.source, "path": s.path, "sha256": s.sha256})).collect::<Vec<_>>(),
            "data_root": dirs.data_root,
            "tokenizer_sha256": sha256_hex(&plan.tok.to_json()?),
            "init": plan.init_dir,
            "backend": plan.device.describe(),
            "threads": plan.threads,
            "host": host(),
            "created": timestamp(),
        });
        std::fs::write(path.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
        Ok(Self { path })
    }

    /// An existing run directory (it has a `plan.toml`).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("plan.toml").is_file() {
            bail!("{}: not a Kiln run directory (no plan.toml)", path.display());
        }
        Ok(Self { path: path.to_path_buf() })
    }

    /// The run's plan, as resolved when it started.
    pub fn recipe(&self) -> Result<Recipe> {
        load_plan(&self.path)
    }

    /// The data root the run was started with (from its manifest).
    pub fn recorded_data_root(&self) -> Option<PathBuf> {
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(self.path.join("manifest.json")).ok()?).ok()?;
        m.get("data_root")?.as_str().map(PathBuf::from)
    }

    pub fn name(&self) -> Option<String> {
        self.path.file_name().map(|n| n.to_string_lossy().to_string())
    }

    fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.path.join("checkpoints").join(format!("step-{step:07}"))
    }

    /// The newest complete checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Option<(usize, PathBuf)> {
        latest_checkpoint(&self.path)
    }

    /// Writes `checkpoints/step-NNNNNNN` (model or adapters, optimizer moments, state) and keeps
    /// the newest `keep`. A checkpoint that exists already is kept as it is.
    pub fn save_checkpoint(&self, weights: Weights, plan: &Plan, optimizer: &TensorList, state: &TrainState, keep: usize) -> Result<PathBuf> {
        let dir = self.checkpoint_dir(state.step);
        if dir.exists() {
            return Ok(dir);
        }
        write_atomically(&dir, |tmp| {
            match weights {
                Weights::Full(list) => checkpoint::write_weight_files(tmp, list, &plan.model, &plan.tok)?,
                Weights::Adapter(a) => a.write_files(tmp)?,
            }
            checkpoint::write_safetensors_streamed(&tmp.join("optimizer.safetensors"), optimizer, &[])?;
            let s = serde_json::to_string_pretty(state).map_err(|e| kiln_models::ModelError::io(tmp, e))?;
            std::fs::write(tmp.join("state.json"), s).map_err(|e| kiln_models::ModelError::io(tmp.join("state.json"), e))
        })
        .with_context(|| {
            format!("writing checkpoint {}\n  note: with train.keep_checkpoints = {keep}, the disk needs room for {} checkpoints while a new one is written", dir.display(), keep + 1)
        })?;
        let all = checkpoints(&self.path);
        if all.len() > keep {
            for (_, old) in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(old);
            }
        }
        Ok(dir)
    }

    /// Removes temporary folders left by a checkpoint or `final/` write that was killed half-way.
    pub fn remove_partial_checkpoints(&self) {
        for (dir, prefix) in [(self.path.join("checkpoints"), ".step-"), (self.path.clone(), ".final.tmp-")] {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with(prefix) && name.contains(".tmp-") {
                    tracing::info!("removing the partial write {}", e.path().display());
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Appends to `metrics.jsonl`.
    pub fn metrics(&self) -> Result<Metrics> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(self.path.join("metrics.jsonl"))?;
        Ok(Metrics(f))
    }

    /// Drops metric lines after `step`, so that a resumed run has no duplicates.
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let p = self.path.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&p) else { return Ok(()) };
        let kept: String = text
            .lines()
            .filter(|l| serde_json::from_str::<StepOf>(l).is_ok_and(|v| v.step <= step))
            .map(|l| format!("{l}\n"))
            .collect();
        let tmp = self.path.join("metrics.jsonl.tmp");
        std::fs::write(&tmp, kept)?;
        std::fs::rename(tmp, p)?;
        Ok(())
    }
}

/// Creates `runs_dir/base`, or `base-2`, `base-3`, ... when taken, with `create_dir`, which fails
/// when the folder exists: each name goes to exactly one caller, however many start together.
fn claim(runs_dir: &Path, base: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;
    for i in 1..10_000 {
        let dir = if i == 1 { runs_dir.join(base) } else { runs_dir.join(format!("{base}-{i}")) };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("{}: 10,000 runs named {base} already", runs_dir.display())
}

/// The step every metrics line carries.
#[derive(Deserialize)]
struct StepOf {
    step: usize,
}

/// `metrics.jsonl`, flushed line by line.
pub struct Metrics(std::fs::File);

impl Metrics {
    pub fn log(&mut self, line: &impl Serialize) -> Result<()> {
        writeln!(self.0, "{}", serde_json::to_string(line)?)?;
        Ok(())
    }
}

/// What a checkpoint holds of the model.
pub enum Weights<'a> {
    /// Every weight, in Kiln's checkpoint layout (`model.safetensors`, config and tokenizer).
    Full(TensorList<'a>),
    /// LoRA: the adapters only, in PEFT's format (`adapter_config.json`,
    /// `adapter_model.safetensors`); the base is the run's `init`.
    Adapter(kiln_models::lora::Adapter),
}

/// A run's `checkpoints/step-NNNNNNN` folders (partial ones included), sorted by step.
fn checkpoints(run: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(run.join("checkpoints")) else { return Vec::new() };
    let mut all: Vec<(usize, PathBuf)> = rd
        .flatten()
        .filter_map(|e| Some((e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()?, e.path())))
        .collect();
    all.sort();
    all
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(run: &Path) -> Option<(usize, PathBuf)> {
    checkpoints(run).into_iter().rev().find(|(_, p)| p.join("state.json").is_file())
}

/// A run directory's final/ model, else its newest checkpoint; a model folder, a .gguf file or
/// a LoRA adapter folder itself; or `hf://org/model`, downloaded.
pub fn model_dir(p: &Path) -> Result<PathBuf> {
    let s = p.to_string_lossy();
    if s.starts_with("hf://") {
        return crate::hub::download_model(&s, &Dirs::from_env(None).cache);
    }
    if kiln_models::lora::is_adapter_dir(p) {
        return with_local_base(p);
    }
    if p.join("config.json").is_file() || (kiln_models::checkpoint::is_gguf(p) && p.is_file()) {
        return Ok(p.to_path_buf());
    }
    if kiln_models::lora::is_adapter_dir(&p.join("final")) {
        return with_local_base(&p.join("final"));
    }
    if p.join("final").join("config.json").is_file() {
        return Ok(p.join("final"));
    }
    if let Some((_, ck)) = latest_checkpoint(p) {
        return Ok(ck);
    }
    bail!("{}: no model here (expected final/, checkpoints/step-*/, a folder with config.json or adapter_config.json, or a .gguf file)", p.display())
}

/// Whether `s` reads as a Hub model id, `org/name`.
fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| !part.is_empty() && !part.starts_with('.') && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    matches!(s.split('/').collect::<Vec<_>>().as_slice(), [org, name] if ok(org) && ok(name))
}

/// An adapter folder as a model. When its `base_model_name_or_path` is a Hub id (as PEFT and
/// LoRA runs from `hf://` write it) and no local path, the base is fetched (or found in the
/// cache) and the model is a view of the adapter in the cache, `<cache>/adapters/<hash>/`, whose
/// `adapter_config.json` names the fetched base; the adapter folder itself is left as it is.
fn with_local_base(dir: &Path) -> Result<PathBuf> {
    use kiln_models::lora::{local_base, Adapter, CONFIG};
    let adapter = Adapter::read_dir(dir)?;
    if local_base(dir, &adapter).is_some() || !is_hub_id(&adapter.base) {
        return Ok(dir.to_path_buf());
    }
    let cache = Dirs::from_env(None).cache;
    let base = crate::hub::download_model(&format!("hf://{}", adapter.base), &cache)
        .with_context(|| format!("{}: its base model \"{}\" is a Hub id, and fetching it failed", dir.display(), adapter.base))?;
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    let src = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let key = kiln_retrieval::corpus::sha256_hex(format!("{}\n{}", src.display(), base.display()).as_bytes());
    let view = cache.join("adapters").join(&key[..16]);
    std::fs::create_dir_all(&view).with_context(|| format!("creating {}", view.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let (name, from) = (entry.file_name(), entry.path());
        if !from.is_file() || name == CONFIG {
            continue;
        }
        let to = view.join(&name);
        let tmp = view.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        std::fs::copy(&from, &tmp).and_then(|_| std::fs::rename(&tmp, &to)).with_context(|| format!("copying {} into {}", from.display(), view.display()))?;
    }
    let cfg_path = dir.join(CONFIG);
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?).with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    cfg["base_model_name_or_path"] = serde_json::Value::String(base.display().to_string());
    std::fs::write(view.join(CONFIG), serde_json::to_string_pretty(&cfg)?)?;
    tracing::info!("{}: base model {} from the Hub cache ({})", dir.display(), adapter.base, base.display());
    Ok(view)
}

/// Reads a run directory's plan.
pub fn load_plan(run: &Path) -> Result<Recipe> {
    let path = run.join("plan.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: not a Kiln run directory (no plan.toml)", run.display()))?;
    Ok(Recipe::parse(&Source { path, text }, &[])?)
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_starts_get_their_own_directories() {
        let root = tempfile::tempdir().unwrap();
        let runs = root.path().join("runs");
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..20).map(|_| s.spawn(|| claim(&runs, "same-20261128-000000").unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let unique: std::collections::BTreeSet<_> = dirs.iter().collect();
        assert_eq!(unique.len(), 20, "{dirs:?}");
        assert!(dirs.iter().all(|d| d.is_dir()));
    }
}
