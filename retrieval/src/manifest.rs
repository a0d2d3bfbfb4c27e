//! An index's manifest, `kiln-index.json`: what built the index (Kiln's version, the chunking,
//! the splitter), what it holds (each corpus file with its sha256, the documents and chunks),
//! and its format's version. Opening an index checks it: a missing, damaged or newer-format
//! manifest, or one whose counts disagree with the index, is an error with a hint, never a
//! silent wrong answer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkSpec;

/// The manifest's file name in an index folder.
pub const FILE: &str = "kiln-index.json";

/// The format this Kiln writes. Format 1 (BM25 only, chunk numbers not indexed) is still read.
pub const FORMAT: u32 = 2;
/// The oldest format this Kiln reads.
pub const OLDEST: u32 = 1;

/// An index's dense side: the model that embedded its chunks and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseInfo {
    /// The embedding model as it was given (`--embed`): queries are embedded with it too.
    pub model: String,
    /// The vectors' width.
    pub dim: usize,
    /// How token states become one vector.
    pub pooling: String,
    pub query_prefix: String,
    pub passage_prefix: String,
    /// The model's embedding of `dense::PROBE`: a model given at query time must embed it
    /// alike (cosine at least `dense::SAME_MODEL_COSINE`).
    pub fingerprint: Vec<f32>,
    /// The HNSW graph's settings, when the index has one (`ann.rs`).
    pub ann: Option<crate::ann::AnnSpec>,
}

/// One corpus file as it was indexed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusFile {
    /// As given (absolute when it was).
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub documents: usize,
    pub chunks: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub kiln_version: String,
    /// The retriever queries use unless told otherwise: `bm25`, `dense` or `hybrid` (dense and
    /// hybrid indexes hold the BM25 index too).
    pub kind: String,
    pub chunking: ChunkSpec,
    /// What counted tokens when chunking (`words`, or `tokenizer:<sha256 prefix>`).
    pub splitter: String,
    pub corpora: Vec<CorpusFile>,
    /// Distinct documents and chunks in the index.
    pub documents: usize,
    pub chunks: usize,
    /// The dense side (`dense/`), for `dense` and `hybrid` indexes.
    #[serde(default)]
    pub dense: Option<DenseInfo>,
}

impl Manifest {
    pub fn new(kind: &str, chunking: ChunkSpec, splitter: String) -> Self {
        Self { format: FORMAT, kiln_version: env!("CARGO_PKG_VERSION").into(), kind: kind.into(), chunking, splitter, corpora: Vec::new(), documents: 0, chunks: 0, dense: None }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// The manifest of the index at `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        if !dir.is_dir() {
            bail!("index {}: no such folder\n  hint: build one with `kiln index build CORPUS --out {}`", dir.display(), dir.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("index {}: no readable {FILE}; it is not a Kiln index\n  hint: build one with `kiln index build CORPUS --out DIR`", dir.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: damaged (not JSON)\n  hint: rebuild the index with `kiln index build`", path.display()))?;
        let format = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0);
        if format > FORMAT as u64 {
            bail!("{}: index format {format}, newer than this Kiln's ({FORMAT}; it was written by Kiln {})\n  hint: use a newer kiln, or rebuild the index", path.display(), v.get("kiln_version").and_then(|s| s.as_str()).unwrap_or("?"));
        }
        if format < OLDEST as u64 {
            bail!("{}: index format {format}, older than this Kiln reads ({OLDEST} to {FORMAT})\n  hint: rebuild the index with `kiln index build`", path.display());
        }
        let m: Manifest = serde_json::from_value(v).with_context(|| format!("{}: damaged (a field is missing or of the wrong type)\n  hint: rebuild the index with `kiln index build`", path.display()))?;
        Ok(m)
    }

    /// Writes the manifest into `dir`, atomically (a temporary file renamed over the old one).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(format!(".{FILE}.tmp-{}", std::process::id()));
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Adding to this index with `spec` and `splitter` must chunk as it was built.
    pub fn check_chunking(&self, spec: ChunkSpec, splitter: &str, dir: &Path) -> Result<()> {
        if spec != self.chunking {
            bail!(
                "index {}: built with chunks of {} tokens overlapping {}, not {} and {}\n  hint: add with --chunk-tokens {} --overlap {} (or leave them out), or build a new index",
                dir.display(), self.chunking.tokens, self.chunking.overlap, spec.tokens, spec.overlap, self.chunking.tokens, self.chunking.overlap
            );
        }
        if splitter != self.splitter {
            bail!(
                "index {}: its chunks count tokens with {}, not {splitter}\n  hint: pass the same --tokenizer as when it was built (or none, for `words`)",
                dir.display(), self.splitter
            );
        }
        Ok(())
    }
}
