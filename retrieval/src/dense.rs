//! Dense retrieval's vectors: one unit-length embedding a chunk, kept beside the index in
//! `dense/vectors.f32` (`[N, D]` little-endian f32, row-major) with `dense/keys.jsonl` (row i's
//! `["doc_id", chunk]`), and searched exactly by a dot product against every row, split across
//! threads. Above a size threshold an approximate HNSW graph (`ann.rs`) answers instead.
//!
//! The embeddings come from an [`Embedder`]: a model that maps texts to unit vectors (the
//! trainer's, `kiln_models::embed`). Queries and passages get different prefixes, so that a
//! retriever trained with them (`stage = "retriever"`) can tell the two apart.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

/// What a query's text is prefixed with before it is embedded.
pub const QUERY_PREFIX: &str = "query: ";
/// What a passage's text is prefixed with before it is embedded.
pub const PASSAGE_PREFIX: &str = "passage: ";
/// The text whose embedding identifies the model that built an index (its fingerprint).
pub const PROBE: &str = "query: Which river flows through the capital, and when was its first bridge built?";
/// The least cosine between the fingerprint at build time and at query time: the same model
/// on another engine or thread count agrees to ~1e-6, another model far less.
pub const SAME_MODEL_COSINE: f32 = 0.999;

/// A model that embeds texts as unit vectors.
pub trait Embedder: Send + Sync {
    /// The vectors' width.
    fn dim(&self) -> usize;
    /// `[N, D]` unit vectors of `texts`, in order.
    fn embed(&self, texts: &[String]) -> Result<Vec<f32>>;
    /// What the model is (a path, a Hub id), for the manifest and error messages.
    fn name(&self) -> String;
}

/// A passage as the embedder sees it: its prefix, then its title's line (when it has one) and
/// its text.
pub fn passage_text(title: Option<&str>, text: &str) -> String {
    match title {
        Some(t) if !t.is_empty() => format!("{PASSAGE_PREFIX}{t}\n{text}"),
        _ => format!("{PASSAGE_PREFIX}{text}"),
    }
}

/// A query as the embedder sees it.
pub fn query_text(q: &str) -> String {
    format!("{QUERY_PREFIX}{q}")
}

/// The rows of an index's dense side, with the key of each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vectors {
    pub dim: usize,
    /// Row i's document id and chunk number.
    pub keys: Vec<(String, u32)>,
    /// `[N, D]`.
    pub data: Vec<f32>,
}

pub const VECTORS: &str = "vectors.f32";
pub const KEYS: &str = "keys.jsonl";

impl Vectors {
    pub fn new(dim: usize) -> Self {
        Self { dim, keys: Vec::new(), data: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Appends rows (`rows` is `[keys.len(), D]`).
    pub fn push(&mut self, keys: Vec<(String, u32)>, rows: &[f32]) {
        debug_assert_eq!(rows.len(), keys.len() * self.dim);
        self.keys.extend(keys);
        self.data.extend_from_slice(rows);
    }

    /// Drops the rows of the documents `ids`; returns how many went.
    pub fn remove_documents(&mut self, ids: &HashSet<String>) -> usize {
        let d = self.dim;
        let (mut keys, mut data) = (Vec::with_capacity(self.keys.len()), Vec::with_capacity(self.data.len()));
        for (i, k) in self.keys.iter().enumerate() {
            if !ids.contains(&k.0) {
                keys.push(k.clone());
                data.extend_from_slice(&self.data[i * d..(i + 1) * d]);
            }
        }
        let gone = self.keys.len() - keys.len();
        (self.keys, self.data) = (keys, data);
        gone
    }

    /// The `k` rows most similar to `q` (dot product, best first), checking every row: the
    /// rows are split across rayon's threads, each keeping its own best `k`.
    pub fn search_exact(&self, q: &[f32], k: usize) -> Vec<(usize, f32)> {
        if k == 0 || self.is_empty() {
            return Vec::new();
        }
        const ROWS: usize = 4096;
        let d = self.dim;
        let parts: Vec<Vec<(usize, f32)>> = self
            .data
            .par_chunks(ROWS * d)
            .enumerate()
            .map(|(c, block)| {
                let mut best = TopK::new(k);
                for (j, row) in block.chunks_exact(d).enumerate() {
                    best.offer(c * ROWS + j, dot(q, row));
                }
                best.into_vec()
            })
            .collect();
        let mut best = TopK::new(k);
        for (i, s) in parts.into_iter().flatten() {
            best.offer(i, s);
        }
        best.into_vec()
    }

    /// Writes `dir/vectors.f32` and `dir/keys.jsonl` (each through a temporary file renamed
    /// into place).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut bytes = Vec::with_capacity(self.data.len() * 4);
        for x in &self.data {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        atomic_write(&dir.join(VECTORS), &bytes)?;
        let mut keys = Vec::new();
        for k in &self.keys {
            serde_json::to_writer(&mut keys, &(&k.0, k.1))?;
            keys.push(b'\n');
        }
        atomic_write(&dir.join(KEYS), &keys)
    }

    /// Reads what [`Vectors::write`] wrote, checking that the two files agree with each other
    /// and with `dim` and `rows` (the manifest's).
    pub fn read(dir: &Path, dim: usize, rows: usize) -> Result<Self> {
        let hint = "\n  hint: the index is damaged or incomplete; rebuild it with `kiln index build`";
        let vpath = dir.join(VECTORS);
        let bytes = std::fs::read(&vpath).with_context(|| format!("reading {}{hint}", vpath.display()))?;
        if bytes.len() != rows * dim * 4 {
            bail!("{}: {} bytes, but the manifest says {rows} vectors of {dim} f32 ({} bytes){hint}", vpath.display(), bytes.len(), rows * dim * 4);
        }
        let data: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let kpath = dir.join(KEYS);
        let file = std::fs::File::open(&kpath).with_context(|| format!("reading {}{hint}", kpath.display()))?;
        let mut keys = Vec::with_capacity(rows);
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", kpath.display()))?;
            let k: (String, u32) = serde_json::from_str(&line).with_context(|| format!("{}:{}: not a [\"doc_id\", chunk] pair{hint}", kpath.display(), i + 1))?;
            keys.push(k);
        }
        if keys.len() != rows {
            bail!("{}: {} keys, but the manifest says {rows} vectors{hint}", kpath.display(), keys.len());
        }
        if let Some(i) = (0..rows).find(|&i| data[i * dim..(i + 1) * dim].iter().any(|x| !x.is_finite())) {
            bail!("{}: vector {i} holds a non-finite value{hint}", vpath.display());
        }
        Ok(Self { dim, keys, data })
    }
}

fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// `a · b`, in eight lanes so that the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The best `k` (index, score) pairs seen, highest score first (ties: the lower index).
struct TopK {
    k: usize,
    items: Vec<(usize, f32)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, items: Vec::with_capacity(k + 1) }
    }

    fn better(a: (usize, f32), b: (usize, f32)) -> bool {
        a.1 > b.1 || (a.1 == b.1 && a.0 < b.0)
    }

    fn offer(&mut self, i: usize, s: f32) {
        if self.items.len() == self.k {
            let worst = self.items[self.k - 1];
            if !Self::better((i, s), worst) {
                return;
            }
            self.items.pop();
        }
        let at = self.items.partition_point(|&x| Self::better(x, (i, s)));
        self.items.insert(at, (i, s));
    }

    fn into_vec(self) -> Vec<(usize, f32)> {
        self.items
    }
}

/// The embeddings of `texts` in batches of `batch`, checked: the right count and width, finite,
/// and of unit length.
pub fn embed_checked(e: &dyn Embedder, texts: &[String], batch: usize, mut progress: impl FnMut(usize)) -> Result<Vec<f32>> {
    let d = e.dim();
    let mut out = Vec::with_capacity(texts.len() * d);
    for part in texts.chunks(batch.max(1)) {
        let v = e.embed(part)?;
        if v.len() != part.len() * d {
            bail!("the embedder {} gave {} values for {} texts of width {d}", e.name(), v.len(), part.len());
        }
        for (j, row) in v.chunks_exact(d).enumerate() {
            let n = dot(row, row);
            if !n.is_finite() || (n - 1.0).abs() > 1e-3 {
                bail!("the embedder {} gave a vector of squared length {n} (not a unit vector) for text {}", e.name(), out.len() / d + j);
            }
        }
        out.extend_from_slice(&v);
        progress(out.len() / d);
    }
    Ok(out)
}
