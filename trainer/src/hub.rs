//! Fetching from the Hugging Face Hub through hf-hub (its cache, `HF_ENDPOINT`, `HF_TOKEN`).
//!
//! hf-hub 1.0 ignores `HF_HUB_OFFLINE`, so Kiln maps `HF_HUB_OFFLINE=1` to cache-only lookups.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hf_hub::{HFClient, HFRepositorySync, RepoType};

use crate::data::sources::HfUri;

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

fn fetch<T: RepoType>(repo: HFRepositorySync<T>, uri: &HfUri, offline: bool) -> hf_hub::HFResult<PathBuf> {
    repo.download_file()
        .filename(uri.path.clone())
        .maybe_revision(uri.revision.clone())
        .local_files_only(offline)
        .send()
}
