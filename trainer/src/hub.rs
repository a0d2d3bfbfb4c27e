//! Fetching from the Hugging Face Hub through hf-hub (its cache, `HF_ENDPOINT`, `HF_TOKEN`).
//!
//! hf-hub 1.0 ignores `HF_HUB_OFFLINE`, so Kiln maps `HF_HUB_OFFLINE=1` to cache-only lookups.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::{HFClient, HFRepositorySync, RepoType};

/// A parsed `hf://` URI: `hf://[datasets/]<org>/<name>[@rev][/path]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HfUri {
    pub dataset: bool,
    pub org: String,
    pub name: String,
    pub revision: Option<String>,
    pub path: String,
}

impl HfUri {
    pub fn parse(uri: &str) -> Result<Self> {
        let rest = uri.strip_prefix("hf://").with_context(|| format!("'{uri}' does not start with hf://"))?;
        let (dataset, rest) = match rest.strip_prefix("datasets/") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let mut parts = rest.splitn(3, '/');
        let org = parts.next().unwrap_or_default();
        let name_rev = parts.next().unwrap_or_default();
        let path = parts.next().unwrap_or_default().to_string();
        if org.is_empty() || name_rev.is_empty() {
            bail!("'{uri}': expected hf://[datasets/]<org>/<name>[@rev][/path]");
        }
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) => (n.to_string(), Some(r.to_string())),
            None => (name_rev.to_string(), None),
        };
        Ok(Self { dataset, org: org.into(), name, revision, path })
    }
}


fn offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes"))
}

/// Downloads one file of a Hub repository (or finds it in the hf-hub cache under `cache/hf`,
/// unless `HF_HUB_CACHE` or `HF_HOME` say otherwise). Returns its local path.
pub fn download(uri: &HfUri, cache: &Path) -> Result<PathBuf> {
    let mut builder = HFClient::builder();
    if std::env::var_os("HF_HUB_CACHE").is_none() && std::env::var_os("HF_HOME").is_none() {
        builder = builder.cache_dir(cache.join("hf"));
    }
    let client = builder.build_sync().context("starting the Hugging Face Hub client")?;
    let offline = offline();
    let what = format!(
        "hf://{}{}/{}{}/{}",
        if uri.dataset { "datasets/" } else { "" },
        uri.org,
        uri.name,
        uri.revision.as_deref().map(|r| format!("@{r}")).unwrap_or_default(),
        uri.path
    );
    tracing::info!("{what}: {}", if offline { "looking in the local cache only (HF_HUB_OFFLINE=1)" } else { "fetching (or reusing the cache)" });
    let got = if uri.dataset {
        fetch(client.dataset(&uri.org, &uri.name), uri, offline)
    } else {
        fetch(client.model(&uri.org, &uri.name), uri, offline)
    };
    got.with_context(|| {
            if offline {
                format!("{what}: not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading\n  hint: run once online, or unset HF_HUB_OFFLINE")
            } else {
                format!("{what}: download failed\n  hint: check the name, HF_ENDPOINT, and HF_TOKEN for private repos")
            }
        })
}

/// Downloads a model, `hf://<org>/<name>[@rev]`: `config.json`, `tokenizer.json`,
/// `tokenizer_config.json` when there is one, and `model.safetensors` (or the index and every
/// shard it names). Returns the snapshot folder that holds them.
pub fn download_model(spec: &str, cache: &Path) -> Result<PathBuf> {
    use kiln_models::checkpoint::{INDEX, WEIGHTS};
    let uri = HfUri::parse(spec)?;
    if uri.dataset || !uri.path.is_empty() {
        bail!("{spec}: expected a model, hf://<org>/<name>[@rev]");
    }
    let get = |f: &str| download(&HfUri { path: f.into(), ..uri.clone() }, cache);
    get("config.json")?;
    get("tokenizer.json")?;
    // Optional: carries a chat template through fine-tuning and export.
    if let Err(e) = get("tokenizer_config.json") {
        tracing::debug!("{spec}: no tokenizer_config.json ({e:#})");
    }
    // One file, else the shards an index names (hf-hub puts them all in one snapshot folder).
    let weights = match get(WEIGHTS) {
        Ok(w) => w,
        Err(single) => {
            let index = get(INDEX).map_err(|_| single.context(format!("{spec}: neither {WEIGHTS} nor {INDEX} could be fetched")))?;
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
                .with_context(|| format!("{spec}: {INDEX} is not valid JSON"))?;
            let shards: std::collections::BTreeSet<String> = v["weight_map"]
                .as_object()
                .with_context(|| format!("{spec}: {INDEX} has no weight_map"))?
                .values()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            for shard in &shards {
                get(shard)?;
            }
            index
        }
    };
    weights.parent().map(Path::to_path_buf).context("no download folder")
}

fn fetch<T: RepoType>(repo: HFRepositorySync<T>, uri: &HfUri, offline: bool) -> hf_hub::HFResult<PathBuf> {
    repo.download_file()
        .filename(uri.path.clone())
        .maybe_revision(uri.revision.clone())
        .local_files_only(offline)
        .progress(hf_hub::progress::Progress::new(Bar::new(&uri.path)))
        .send()
}

// ---------------------------------------------------------------------------------------------
// Publishing

/// The Hugging Face token and where it came from, as the Hub's own tools look for it: `HF_TOKEN`,
/// then the file `HF_TOKEN_PATH` names, then `$HF_HOME/token` (`~/.cache/huggingface/token`).
/// `source` names the place, never the token.
pub struct Token {
    pub secret: String,
    pub source: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(from {})", self.source)
    }
}

pub fn find_token() -> Option<Token> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.trim().is_empty() {
            return Some(Token { secret: t.trim().to_string(), source: "the HF_TOKEN environment variable".into() });
        }
    }
    let mut files = Vec::new();
    if let Some(p) = std::env::var_os("HF_TOKEN_PATH") {
        files.push(PathBuf::from(p));
    }
    files.push(hf_hub::hf_home().join("token"));
    files.into_iter().find_map(|p| {
        let t = std::fs::read_to_string(&p).ok()?;
        let t = t.trim();
        (!t.is_empty()).then(|| Token { secret: t.to_string(), source: format!("the token file {}", p.display()) })
    })
}

pub struct PublishOptions<'a> {
    /// `user/name` or `org/name`.
    pub repo: &'a str,
    pub private: bool,
    pub revision: Option<&'a str>,
    pub message: String,
}

/// Checks `user/name`: one slash, letters, digits, `-`, `_`, `.`.
pub fn check_repo_id(repo: &str) -> Result<()> {
    let ok_part = |p: &str| !p.is_empty() && p.len() <= 96 && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    match repo.split_once('/') {
        Some((a, b)) if ok_part(a) && ok_part(b) && !b.contains('/') => Ok(()),
        _ => anyhow::bail!("--repo {repo:?}: expected USER/NAME or ORG/NAME (letters, digits, '-', '_', '.')"),
    }
}

/// The files `publish` uploads, relative to `folder`, with sizes (hidden files left out).
pub fn upload_list(folder: &Path) -> Result<Vec<(String, u64)>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if e.file_type()?.is_dir() {
                walk(base, &p, out)?;
            } else {
                let rel = p.strip_prefix(base).unwrap_or(&p).to_string_lossy().replace('\\', "/");
                out.push((rel, e.metadata()?.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(folder, folder, &mut out).with_context(|| format!("listing {}", folder.display()))?;
    out.sort();
    Ok(out)
}

/// Replaces the token wherever it appears (a server may echo it back in an error body).
fn scrub(s: &str, token: &str) -> String {
    if token.len() >= 4 { s.replace(token, "hf_***") } else { s.to_string() }
}

fn explain(e: hf_hub::HFError, what: &str, token: &Token, repo: &str) -> anyhow::Error {
    use hf_hub::HFError;
    match &e {
        HFError::AuthRequired { .. } => anyhow::anyhow!(
            "{what}: the Hub answered 401 Unauthorized: it did not accept the token from {}\n  hint: create a token with write access at https://huggingface.co/settings/tokens and put it in HF_TOKEN (or log in with `hf auth login`)",
            token.source
        ),
        HFError::Forbidden { .. } => anyhow::anyhow!(
            "{what}: the Hub answered 403 Forbidden: the token from {} may not write to {repo}\n  hint: use a token with write access to that user or organisation",
            token.source
        ),
        _ => anyhow::anyhow!(
            "{what}: {}\n  hint: check HF_ENDPOINT and the network; transient errors (5xx, 429, timeouts) were already retried with backoff",
            scrub(&format!("{e}"), &token.secret)
        ),
    }
}

/// Draws hf-hub's upload and download events as an indicatif bar (hidden when stderr is not a terminal).
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new(label: &str) -> Self {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(label.to_string());
        Self(b)
    }
}

impl hf_hub::progress::ProgressHandler for Bar {
    fn on_progress(&self, event: &hf_hub::progress::ProgressEvent) {
        use hf_hub::progress::{DownloadEvent as D, ProgressEvent as P, UploadEvent as U};
        match event {
            P::Upload(U::Start { total_bytes, .. }) | P::Download(D::Start { total_bytes, .. }) => self.0.set_length(*total_bytes),
            P::Upload(U::Progress { bytes_completed, .. }) | P::Download(D::AggregateProgress { bytes_completed, .. }) => {
                self.0.set_position(*bytes_completed)
            }
            P::Download(D::Progress { files }) => {
                let done: u64 = files.iter().map(|f| f.bytes_completed).sum();
                self.0.set_position(done.max(self.0.position()));
            }
            P::Upload(U::Committing) => self.0.set_message("committing"),
            P::Upload(U::Complete) | P::Download(D::Complete) => self.0.finish_and_clear(),
        }
    }
}

/// Creates `repo` if it is missing and uploads `folder` in one commit through hf-hub's upload API
/// (small files inline, large ones through the Hub's LFS/xet path). hf-hub retries transient
/// errors with exponential backoff. Returns the commit URL (or the repository URL).
pub fn publish(folder: &Path, token: &Token, o: &PublishOptions) -> Result<String> {
    check_repo_id(o.repo)?;
    let client = HFClient::builder()
        .token(token.secret.clone())
        .build_sync()
        .map_err(|e| anyhow::anyhow!("starting the Hugging Face Hub client: {}", scrub(&e.to_string(), &token.secret)))?;
    let url = client
        .create_repository()
        .repo_id(o.repo)
        .repo_type(hf_hub::RepoTypeModel)
        .private(o.private)
        .exist_ok(true)
        .send()
        .map_err(|e| explain(e, &format!("creating the repository {}", o.repo), token, o.repo))?;
    tracing::info!("repository {} ready", url.url);
    let (owner, name) = o.repo.split_once('/').unwrap_or(("", o.repo));
    let bar = Bar::new(&format!("uploading to {}", o.repo));
    let info = client
        .model(owner, name)
        .upload_folder()
        .folder_path(folder.to_path_buf())
        .maybe_revision(o.revision.map(str::to_string))
        .commit_message(o.message.clone())
        .ignore_patterns(vec![".*".to_string(), "**/.*".to_string()])
        .progress(hf_hub::progress::Progress::new(bar))
        .send()
        .map_err(|e| explain(e, &format!("uploading {} to {}", folder.display(), o.repo), token, o.repo))?;
    Ok(info.commit_url.unwrap_or(url.url))
}
