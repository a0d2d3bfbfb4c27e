//! Data sources: a path under the data root, an `https://` URL pinned by sha256, or
//! `hf://datasets/<org>/<name>[@rev]/<path>`. Each resolves to a local file. The data root is
//! only read; downloads go to the cache (`$KILN_CACHE`, default `~/.cache/kiln`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::hub::HfUri;

/// Where Kiln reads data from and writes its caches.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Read-only data root (`--data-root`, `KILN_DATA`, default `./data`).
    pub data_root: PathBuf,
    /// Downloads and token shards (`KILN_CACHE`, default `~/.cache/kiln`).
    pub cache: PathBuf,
}

impl Dirs {
    pub fn from_env(data_root: Option<PathBuf>) -> Self {
        let data_root = data_root
            .or_else(|| std::env::var_os("KILN_DATA").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("data"));
        let cache = std::env::var_os("KILN_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("kiln")
        });
        Self { data_root, cache }
    }

    /// `rel` under the data root, which is all a recipe may read there: an absolute path or a
    /// `..` that leaves the root is an error (`key` names the recipe field). The file must be a
    /// regular file (not a FIFO or a device, which would block or never end).
    pub fn under_root(&self, rel: &str, key: &str) -> Result<PathBuf> {
        use std::path::Component;
        let escapes = Path::new(rel).components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if rel.is_empty() || escapes {
            bail!("{key}: '{rel}' is not a path under the data root\n  hint: recipes read local files only under the data root ({}); give a relative path without '..'", self.data_root.display());
        }
        let p = self.data_root.join(rel);
        if p.exists() && !std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            bail!("{key}: {} is not a regular file (a FIFO, a device or a folder)\n  hint: name a file", p.display());
        }
        if !p.is_file() {
            bail!(
                "{key}: data file not found: {} ('{rel}' under data root {})\n  hint: point --data-root or KILN_DATA at the folder that holds it",
                p.display(),
                self.data_root.display()
            );
        }
        Ok(p)
    }
}

/// Resolves one source to a local file. `pin` is the sha256 for an https source.
pub fn resolve(source: &str, pin: Option<&str>, dirs: &Dirs) -> Result<PathBuf> {
    if kiln_recipes::is_download(source) {
        let pin = pin.with_context(|| format!("{source}: downloads must be pinned with a sha256 (data.sha256)"))?;
        return resolve_url(source, pin, dirs);
    }
    if source.starts_with("hf://") {
        let uri = HfUri::parse(source)?;
        if !uri.dataset {
            bail!("{source}: data sources must be datasets (hf://datasets/<org>/<name>/<path>)");
        }
        if uri.path.is_empty() {
            bail!("{source}: name a file inside the dataset (hf://datasets/<org>/<name>/<path>)");
        }
        return crate::hub::download(&uri, &dirs.cache);
    }
    dirs.under_root(source, "data.sources")
}

/// The sha256 of a file's bytes, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    kiln_retrieval::corpus::file_sha256(path)
}

/// An https file: first looked up in the data root by file name (and hash), then in the
/// download cache, else downloaded once to the cache and verified.
fn resolve_url(url: &str, pin: &str, dirs: &Dirs) -> Result<PathBuf> {
    let pin = pin.to_ascii_lowercase();
    let file_name = url.rsplit('/').next().filter(|s| !s.is_empty()).unwrap_or("download");
    let file_name: String = file_name.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect();
    let mirrored = dirs.data_root.join(&file_name);
    if mirrored.is_file() && sha256_file(&mirrored)? == pin {
        tracing::info!("{url}: using {} from the data root (sha256 matches)", mirrored.display());
        return Ok(mirrored);
    }
    let cached = dirs.cache.join("downloads").join(format!("{}-{file_name}", &pin[..16.min(pin.len())]));
    if cached.is_file() && sha256_file(&cached)? == pin {
        return Ok(cached);
    }
    std::fs::create_dir_all(cached.parent().unwrap_or(Path::new(".")))?;
    tracing::info!("downloading {url}");
    let tmp = cached.with_extension("part");
    let mut resp = ureq::get(url).call().with_context(|| format!("downloading {url}\n  hint: offline? put {file_name} in the data root"))?;
    let mut out = std::fs::File::create(&tmp)?;
    std::io::copy(&mut resp.body_mut().as_reader(), &mut out).with_context(|| format!("downloading {url}"))?;
    drop(out);
    let got = sha256_file(&tmp)?;
    if got != pin {
        let _ = std::fs::remove_file(&tmp);
        bail!("{url}: sha256 is {got}, but the recipe pins {pin}\n  hint: the file changed upstream; check it and update data.sha256");
    }
    std::fs::rename(&tmp, &cached)?;
    Ok(cached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_uris() {
        let u = HfUri::parse("hf://datasets/karpathy/tiny@v1/data/input.txt").unwrap();
        assert_eq!(u, HfUri { dataset: true, org: "karpathy".into(), name: "tiny".into(), revision: Some("v1".into()), path: "data/input.txt".into() });
        let m = HfUri::parse("hf://HuggingFaceTB/SmolLM-135M").unwrap();
        assert!(!m.dataset && m.path.is_empty() && m.revision.is_none());
        assert!(HfUri::parse("hf://onlyorg").is_err());
    }

    #[test]
    fn https_source_found_in_data_root_by_name_and_hash() {
        let root = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("input.txt"), b"hello").unwrap();
        let dirs = Dirs { data_root: root.path().into(), cache: cache.path().into() };
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let p = resolve("https://example.invalid/x/input.txt", Some(good), &dirs).unwrap();
        assert_eq!(p, root.path().join("input.txt"));
        // A wrong pin does not match the mirror, and the download (offline) fails clearly.
        let e = resolve("https://example.invalid/x/input.txt", Some(&"0".repeat(64)), &dirs).unwrap_err();
        assert!(format!("{e:#}").contains("example.invalid"), "{e:#}");
    }

    #[test]
    fn missing_file_names_path_and_hint() {
        let dirs = Dirs { data_root: "/nonexistent-root".into(), cache: "/tmp".into() };
        let e = resolve("tiny/missing.txt", None, &dirs).unwrap_err().to_string();
        assert!(e.contains("/nonexistent-root/tiny/missing.txt") && e.contains("KILN_DATA"), "{e}");
    }
}

#[cfg(test)]
mod download_tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// Serves `body` for every request on 127.0.0.1, counting requests.
    fn serve(body: &'static [u8]) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = s.write_all(body);
            }
        });
        (format!("http://{addr}/files/corpus.txt"), hits)
    }

    #[test]
    fn pinned_download_is_verified_cached_and_never_written_to_the_data_root() {
        let (url, hits) = serve(b"to be or not to be\n");
        let root = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let dirs = Dirs { data_root: root.path().into(), cache: cache.path().into() };
        let pin = hex::encode(Sha256::digest(b"to be or not to be\n"));
        let p = resolve(&url, Some(&pin), &dirs).unwrap();
        assert!(p.starts_with(cache.path()));
        assert_eq!(std::fs::read(&p).unwrap(), b"to be or not to be\n");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Second time: from the cache, no request.
        assert_eq!(resolve(&url, Some(&pin), &dirs).unwrap(), p);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "the data root was written");
        // A wrong pin: the download is refused and nothing is kept.
        let bad = "ab".repeat(32);
        let e = format!("{:#}", resolve(&url, Some(&bad), &dirs).unwrap_err());
        assert!(e.contains("sha256") && e.contains(&bad), "{e}");
        let kept: Vec<_> = std::fs::read_dir(cache.path().join("downloads")).unwrap().collect();
        assert_eq!(kept.len(), 1);
    }
}
