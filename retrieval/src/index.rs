//! An index folder: the manifest (`kiln-index.json`, `manifest.rs`), the BM25 index
//! (`bm25/`, `bm25.rs`) and, for `dense` and `hybrid` indexes, the chunks' embeddings
//! (`dense/`, `dense.rs`, with an HNSW graph from `ann::THRESHOLD` chunks, `ann.rs`). The
//! index is one [`Retriever`] of its kind: BM25, dense, or the two fused (`fusion.rs`: a convex
//! combination of normalised scores by default, or reciprocal rank). Building writes into a
//! temporary folder beside the target and renames it into place, so a failed build leaves
//! nothing behind and never replaces an index; adding documents is one tantivy commit followed
//! by the manifest's atomic rewrite, and the two are checked against each other whenever the
//! index is opened.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::ann::{Ann, AnnSpec};
use crate::bm25::Bm25;
use crate::chunk::{chunk_document, Chunk, ChunkSpec, Splitter};
use crate::corpus::{corpus_files, file_sha256, read_documents};
use crate::dense::{dot, embed_checked, passage_text, query_text, Embedder, Vectors, PASSAGE_PREFIX, PROBE, QUERY_PREFIX, SAME_MODEL_COSINE};
use crate::fusion::Fusion;
use crate::manifest::{CorpusFile, DenseInfo, Manifest};
use crate::retriever::{Hit, Retriever};

/// Which retriever an index answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bm25,
    Dense,
    Hybrid,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bm25" => Ok(Kind::Bm25),
            "dense" => Ok(Kind::Dense),
            "hybrid" => Ok(Kind::Hybrid),
            _ => bail!("retrieval kind '{s}': bm25, dense or hybrid"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Bm25 => "bm25",
            Kind::Dense => "dense",
            Kind::Hybrid => "hybrid",
        }
    }
}

/// Passages each ranking gives the hybrid's fusion (at least the k asked for).
pub const HYBRID_DEPTH: usize = 50;
/// Chunks embedded at a time while building.
const EMBED_BATCH: usize = 256;

/// An opened index.
pub struct Index {
    pub dir: PathBuf,
    pub manifest: Manifest,
    bm25: Bm25,
    /// What queries are answered with (the manifest's kind unless [`Index::set_kind`] changed it).
    kind: Kind,
    dense: Option<DenseSide>,
    /// How a hybrid query fuses BM25's and the dense ranking.
    fusion: Fusion,
}

/// The dense side of an opened index.
struct DenseSide {
    vectors: Vectors,
    ann: Option<Ann>,
    /// The model that embeds queries; `None` until [`Index::attach`].
    embedder: Option<Arc<dyn Embedder>>,
    /// Search every vector even where there is an HNSW graph.
    exact: bool,
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
    /// Builds a new BM25 index at `out` from `corpora` (files or folders). `out` must not exist.
    pub fn build(out: &Path, corpora: &[PathBuf], spec: ChunkSpec, splitter: &Splitter, threads: usize) -> Result<(Self, Added)> {
        Self::build_with(out, corpora, spec, splitter, threads, Kind::Bm25, None)
    }

    /// Builds a new index of `kind` at `out`; `dense` and `hybrid` embed every chunk with
    /// `embedder` (given as `model` in the manifest).
    pub fn build_with(out: &Path, corpora: &[PathBuf], spec: ChunkSpec, splitter: &Splitter, threads: usize, kind: Kind, embedder: Option<(Arc<dyn Embedder>, String)>) -> Result<(Self, Added)> {
        if kind != Kind::Bm25 && embedder.is_none() {
            bail!("a {} index embeds its chunks: give the embedding model (--embed MODEL)", kind.name());
        }
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
            let mut manifest = Manifest::new(kind.name(), spec, splitter.name());
            let mut dense = None;
            if let (Kind::Dense | Kind::Hybrid, Some((e, model))) = (kind, &embedder) {
                let fingerprint = embed_checked(e.as_ref(), &[PROBE.to_string()], 1, |_| {})?;
                manifest.dense = Some(DenseInfo {
                    model: model.clone(),
                    dim: e.dim(),
                    pooling: "mean over tokens of the final norm's output, unit length".into(),
                    query_prefix: QUERY_PREFIX.into(),
                    passage_prefix: PASSAGE_PREFIX.into(),
                    fingerprint,
                    ann: None,
                });
                dense = Some(DenseSide { vectors: Vectors::new(e.dim()), ann: None, embedder: Some(e.clone()), exact: false });
            }
            manifest.write(&tmp)?;
            let mut index = Index { dir: tmp.clone(), manifest, bm25: Bm25::create(&tmp.join("bm25"))?, kind, dense, fusion: Fusion::default() };
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
        let mut index = Self::open(out)?;
        if let (Some(side), Some((e, _))) = (index.dense.as_mut(), embedder) {
            side.embedder = Some(e); // the model that built it: ready to answer
        }
        Ok((index, added))
    }

    /// The index at `dir`, its manifest checked against what it holds. A dense or hybrid index
    /// answers queries once its embedding model is attached ([`Index::attach`]).
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let kind = Kind::parse(&manifest.kind).map_err(|_| anyhow::anyhow!("index {}: of kind '{}', which this Kiln cannot read (it reads bm25, dense and hybrid)\n  hint: rebuild the index with `kiln index build`", dir.display(), manifest.kind))?;
        if kind != Kind::Bm25 && manifest.dense.is_none() {
            bail!("index {}: of kind {} but its manifest has no dense side\n  hint: rebuild the index with `kiln index build`", dir.display(), manifest.kind);
        }
        let bm25 = Bm25::open(&dir.join("bm25"))?;
        if bm25.len() != manifest.chunks as u64 {
            bail!(
                "index {}: the manifest lists {} chunks, the BM25 index holds {} (an interrupted `kiln index add`?)\n  hint: rebuild the index with `kiln index build`",
                dir.display(), manifest.chunks, bm25.len()
            );
        }
        let dense = match &manifest.dense {
            None => None,
            Some(info) => {
                let vectors = Vectors::read(&dir.join("dense"), info.dim, manifest.chunks)?;
                let ann = match info.ann {
                    Some(spec) => Some(Ann::load(&dir.join("dense"), spec, manifest.chunks)?),
                    None => None,
                };
                Some(DenseSide { vectors, ann, embedder: None, exact: false })
            }
        };
        Ok(Self { dir: dir.to_path_buf(), manifest, bm25, kind, dense, fusion: Fusion::default() })
    }

    /// What queries are answered with.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Answers queries with `kind` instead of the index's own (dense and hybrid need the dense
    /// side); `exact` makes dense search check every vector even where there is a graph.
    pub fn set_kind(&mut self, kind: Kind, exact: bool) -> Result<()> {
        if kind != Kind::Bm25 && self.dense.is_none() {
            bail!("index {}: a BM25 index has no embeddings, so it cannot answer as {}\n  hint: build a dense or hybrid index with `kiln index build --kind {} --embed MODEL`", self.dir.display(), kind.name(), kind.name());
        }
        if let Some(d) = &mut self.dense {
            d.exact = exact;
        }
        self.kind = kind;
        Ok(())
    }

    /// How hybrid queries fuse the two rankings (default: [`Fusion::default`]).
    pub fn set_fusion(&mut self, fusion: Fusion) {
        self.fusion = fusion;
    }

    /// The embedding model this dense or hybrid index was built with (the manifest's `model`).
    pub fn embedding_model(&self) -> Option<&str> {
        self.manifest.dense.as_ref().map(|d| d.model.as_str())
    }

    /// Gives the index the model that embeds queries (and the chunks `add` brings). It must be
    /// the model that built the index: its embedding of a fixed probe text must match the one
    /// the manifest keeps.
    pub fn attach(&mut self, embedder: Arc<dyn Embedder>) -> Result<()> {
        let (Some(info), Some(side)) = (&self.manifest.dense, &mut self.dense) else {
            return Ok(()); // BM25 needs no model
        };
        if embedder.dim() != info.dim {
            bail!(
                "index {}: built with embeddings of width {} ({}), but {} gives {}\n  hint: query with the model the index was built with",
                self.dir.display(), info.dim, info.model, embedder.name(), embedder.dim()
            );
        }
        let probe = embed_checked(embedder.as_ref(), &[PROBE.to_string()], 1, |_| {})?;
        let cos = dot(&probe, &info.fingerprint);
        if cos < SAME_MODEL_COSINE {
            bail!(
                "index {}: built with the embeddings of {}, and {} embeds differently (its fingerprint's cosine is {cos:.4}, not at least {SAME_MODEL_COSINE})\n  hint: query with the model the index was built with, or rebuild the index with this one",
                self.dir.display(), info.model, embedder.name()
            );
        }
        side.embedder = Some(embedder);
        Ok(())
    }

    /// Dense retrieval: the `k` chunks whose embeddings are nearest the query's.
    fn dense_hits(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        let Some(side) = &self.dense else { bail!("index {}: has no embeddings", self.dir.display()) };
        let Some(e) = &side.embedder else {
            bail!(
                "index {}: dense retrieval embeds the query, but no embedding model is attached\n  hint: pass --embed {} (the model it was built with)",
                self.dir.display(), self.embedding_model().unwrap_or("MODEL")
            )
        };
        let q = embed_checked(e.as_ref(), &[query_text(query)], 1, |_| {})?;
        let rows = match (&side.ann, side.exact) {
            (Some(ann), false) => ann.search(&q, k),
            _ => side.vectors.search_exact(&q, k),
        };
        let mut hits = Vec::with_capacity(rows.len());
        for (row, score) in rows {
            let (doc, chunk) = &side.vectors.keys[row];
            match self.bm25.chunk(doc, *chunk, score)? {
                Some(h) => hits.push(h),
                None => bail!("index {}: the embeddings list chunk {chunk} of \"{doc}\", which the BM25 index lacks\n  hint: rebuild the index with `kiln index build`", self.dir.display()),
            }
        }
        Ok(hits)
    }

    /// The HNSW graph's settings, if the index has one.
    pub fn ann(&self) -> Option<AnnSpec> {
        self.dense.as_ref().and_then(|d| d.ann.as_ref().map(|a| a.spec))
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
        // The chunks' embeddings first (the slow part: nothing is written if it fails).
        let mut vectors = None;
        if let Some(side) = &self.dense {
            let Some(e) = &side.embedder else {
                bail!("index {}: adding to a {} index embeds the new chunks\n  hint: pass --embed {} (the model it was built with)", self.dir.display(), self.manifest.kind, self.embedding_model().unwrap_or("MODEL"));
            };
            let texts: Vec<String> = chunks.iter().map(|c| passage_text(c.title.as_deref(), &c.text)).collect();
            let t0 = std::time::Instant::now();
            let rows = embed_checked(e.as_ref(), &texts, EMBED_BATCH, |n| {
                if n % (EMBED_BATCH * 8) == 0 || n == texts.len() {
                    eprintln!("embedded {n} of {} chunks ({:.0} s)", texts.len(), t0.elapsed().as_secs_f64());
                }
            })?;
            let mut v = side.vectors.clone();
            v.remove_documents(&replace.iter().cloned().collect());
            v.push(chunks.iter().map(|c| (c.doc_id.clone(), c.chunk)).collect(), &rows);
            vectors = Some(v);
        }
        self.bm25.add(&self.dir.join("bm25"), &chunks, &replace, threads)?;
        if let (Some(v), Some(side), Some(info)) = (vectors, self.dense.as_mut(), self.manifest.dense.as_mut()) {
            let dir = self.dir.join("dense");
            v.write(&dir)?;
            // The graph is built again whole: hnsw_rs removes no points.
            let ann = (v.len() >= crate::ann::THRESHOLD).then(|| Ann::build(&v, info.ann.unwrap_or_default()));
            if let Some(a) = &ann {
                a.dump(&dir)?;
            }
            info.ann = ann.as_ref().map(|a| a.spec);
            side.vectors = v;
            side.ann = ann;
        }
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
        match self.kind {
            Kind::Bm25 => self.bm25.retrieve(query, k),
            Kind::Dense => self.dense_hits(query, k),
            Kind::Hybrid => {
                let depth = k.max(HYBRID_DEPTH);
                Ok(self.fusion.fuse(&self.bm25.retrieve(query, depth)?, &self.dense_hits(query, depth)?, k))
            }
        }
    }

    fn kind(&self) -> &'static str {
        self.kind.name()
    }
}
