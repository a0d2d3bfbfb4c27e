//! An index folder: the manifest (`kiln-index.json`, `manifest.rs`) and the BM25 index
//! (`bm25/`, `bm25.rs`). Building writes into a temporary folder beside the target and renames
//! it into place, so a failed build leaves nothing behind and never replaces an index; adding
//! documents is one tantivy commit followed by the manifest's atomic rewrite, and the two are
//! checked against each other whenever the index is opened.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::bm25::Bm25;
use crate::chunk::{chunk_document, Chunk, ChunkSpec, Splitter};
use crate::corpus::{corpus_files, file_sha256, read_documents};
use crate::manifest::{CorpusFile, Manifest};
use crate::retriever::{Hit, Retriever};

/// An opened index.
pub struct Index {
    pub dir: PathBuf,
    pub manifest: Manifest,
    bm25: Bm25,
}

/// What [`Index::add`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Added {
    pub files: usize,
    /// Files skipped: the same path with the same bytes is in the index already.
    pub unchanged: usize,
    pub documents: usize,
    /// Documents whose id was in the index: their old chunks were replaced.
    pub replaced: usize,
    pub chunks: usize,
}

impl Index {
    /// Builds a new index at `out` from `corpora` (files or folders). `out` must not exist.
    pub fn build(out: &Path, corpora: &[PathBuf], spec: ChunkSpec, splitter: &Splitter, threads: usize) -> Result<(Self, Added)> {
        if out.exists() {
            bail!("{} exists\n  hint: `kiln index add {} CORPUS` adds documents to an index; to rebuild, remove it or pick another --out", out.display(), out.display());
        }
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("index");
        let tmp = parent.join(format!(".{name}.building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let built = (|| -> Result<Added> {
            std::fs::create_dir_all(tmp.join("bm25")).with_context(|| format!("creating {}", tmp.display()))?;
            let manifest = Manifest::new("bm25", spec, splitter.name());
            manifest.write(&tmp)?;
            let mut index = Index { dir: tmp.clone(), manifest, bm25: Bm25::create(&tmp.join("bm25"))? };
            index.add(corpora, splitter, threads)
        })();
        let added = match built {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, out).with_context(|| format!("moving the built index to {}", out.display()))?;
        Ok((Self::open(out)?, added))
    }

    /// The index at `dir`, its manifest checked against what it holds.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        if manifest.kind != "bm25" {
            bail!("index {}: of kind '{}', which this Kiln cannot read (it reads bm25)\n  hint: rebuild the index with `kiln index build`", dir.display(), manifest.kind);
        }
        let bm25 = Bm25::open(&dir.join("bm25"))?;
        if bm25.len() != manifest.chunks as u64 {
            bail!(
                "index {}: the manifest lists {} chunks, the BM25 index holds {} (an interrupted `kiln index add`?)\n  hint: rebuild the index with `kiln index build`",
                dir.display(), manifest.chunks, bm25.len()
            );
        }
        Ok(Self { dir: dir.to_path_buf(), manifest, bm25 })
    }

    /// Adds the documents of `corpora` (chunked as the index was built; `splitter` must be the
    /// one it was built with). A file already indexed with the same bytes is skipped; a document
    /// whose id is in the index replaces it.
    pub fn add(&mut self, corpora: &[PathBuf], splitter: &Splitter, threads: usize) -> Result<Added> {
        let spec = self.manifest.chunking;
        self.manifest.check_chunking(spec, &splitter.name(), &self.dir)?;
        let mut files = Vec::new();
        for c in corpora {
            files.extend(corpus_files(c)?);
        }
        let mut added = Added::default();
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut entries = Vec::new();
        let mut new_ids: HashSet<String> = HashSet::new();
        for path in files {
            let shown = path.display().to_string();
            let sha = file_sha256(&path)?;
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if self.manifest.corpora.iter().any(|c| c.path == shown && c.sha256 == sha) {
                added.unchanged += 1;
                continue;
            }
            let docs = read_documents(&path)?;
            let before = chunks.len();
            for d in &docs {
                if !new_ids.insert(d.id.clone()) {
                    bail!("{}: the document id \"{}\" is also in another file of this add\n  hint: document ids must be unique across a corpus", path.display(), d.id);
                }
                chunks.extend(chunk_document(d, spec, splitter).with_context(|| format!("{}: chunking document \"{}\"", path.display(), d.id))?);
            }
            added.files += 1;
            added.documents += docs.len();
            entries.push(CorpusFile { path: shown, sha256: sha, bytes, documents: docs.len(), chunks: chunks.len() - before });
        }
        if entries.is_empty() {
            return Ok(added);
        }
        // Documents already in the index are replaced: their old chunks go.
        let mut replace: Vec<String> = Vec::new();
        if !self.bm25.is_empty() {
            for id in &new_ids {
                if self.bm25.contains(id)? {
                    replace.push(id.clone());
                }
            }
            replace.sort();
        }
        added.replaced = replace.len();
        added.chunks = chunks.len();
        self.bm25.add(&self.dir.join("bm25"), &chunks, &replace, threads)?;
        // The manifest follows the commit; a file indexed again replaces its old entry.
        for e in entries {
            self.manifest.corpora.retain(|c| c.path != e.path);
            self.manifest.corpora.push(e);
        }
        self.manifest.chunks = self.bm25.len() as usize;
        self.manifest.documents = self.manifest.documents + added.documents - added.replaced;
        self.manifest.write(&self.dir)?;
        Ok(added)
    }

    /// The index's BM25 retriever.
    pub fn bm25(&self) -> &Bm25 {
        &self.bm25
    }
}

impl Retriever for Index {
    fn retrieve(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        self.bm25.retrieve(query, k)
    }

    fn kind(&self) -> &'static str {
        "bm25"
    }
}
