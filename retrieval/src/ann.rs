//! Approximate nearest neighbours: an HNSW graph (Malkov and Yashunin, 2016) over the dense
//! vectors, through the `hnsw_rs` crate, for indexes of at least [`THRESHOLD`] chunks, where
//! checking every row costs milliseconds a query. It is built after the vectors, dumped beside
//! them (`dense/hnsw.hnsw.graph`, `dense/hnsw.hnsw.data`) and reloaded when the index opens.
//!
//! The distance is `1 − a·b` on unit vectors, written here (`Cosine`) so that a dot product
//! a rounding above 1 is not an error (the crate's `DistDot` asserts it is not).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::Hnsw;
use hnsw_rs::hnswio::HnswIo;
use serde::{Deserialize, Serialize};

use crate::dense::{dot, Vectors};

/// Chunks from which an index gets an HNSW graph.
pub const THRESHOLD: usize = 50_000;
/// The dump's base name in `dense/`.
const BASENAME: &str = "hnsw";

/// How the graph was built, and how wide a search is (kept in the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnnSpec {
    /// Neighbours a node keeps per layer (HNSW's M).
    pub m: usize,
    /// Candidates considered when inserting a node.
    pub ef_construction: usize,
    /// Candidates considered when searching (at least the k asked for). 256: at a million
    /// vectors, recall@10 86% against 74% at 128 for 0.2 ms more at the median (BENCHMARKS.md).
    pub ef_search: usize,
}

impl Default for AnnSpec {
    fn default() -> Self {
        Self { m: 24, ef_construction: 200, ef_search: 256 }
    }
}

/// `1 − a·b`, at least 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cosine;

impl Distance<f32> for Cosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

pub struct Ann {
    graph: Hnsw<'static, f32, Cosine>,
    pub spec: AnnSpec,
}

impl Ann {
    /// A graph over every row of `v` (data ids are row numbers), built on rayon's threads.
    pub fn build(v: &Vectors, spec: AnnSpec) -> Self {
        let layers = 16;
        let graph = Hnsw::<f32, Cosine>::new(spec.m, v.len().max(1), layers, spec.ef_construction, Cosine);
        let rows: Vec<(&[f32], usize)> = (0..v.len()).map(|i| (v.row(i), i)).collect();
        graph.parallel_insert_slice(&rows);
        let mut graph = graph;
        graph.set_searching_mode(true);
        Self { graph, spec }
    }

    /// Rows near `q`, best first, with their dot products.
    pub fn search(&self, q: &[f32], k: usize) -> Vec<(usize, f32)> {
        if k == 0 {
            return Vec::new();
        }
        let ef = self.spec.ef_search.max(k);
        let mut out: Vec<(usize, f32)> = self.graph.search(q, k, ef).into_iter().map(|n| (n.d_id, 1.0 - n.distance)).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// Writes the graph into `dir` (its files replaced whole: written under a temporary name
    /// first).
    pub fn dump(&self, dir: &Path) -> Result<()> {
        let tmp = format!("{BASENAME}-tmp{}", std::process::id());
        for ext in ["hnsw.graph", "hnsw.data"] {
            let _ = std::fs::remove_file(dir.join(format!("{tmp}.{ext}")));
        }
        let used = self.graph.file_dump(dir, &tmp).map_err(|e| anyhow!("writing the HNSW graph into {}: {e}", dir.display()))?;
        for ext in ["hnsw.graph", "hnsw.data"] {
            let (from, to) = (dir.join(format!("{used}.{ext}")), dir.join(format!("{BASENAME}.{ext}")));
            std::fs::rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        }
        Ok(())
    }

    /// The graph dumped in `dir`, which must hold `rows` points. The crate's reader panics on
    /// some damaged files; that is caught and reported as damage.
    pub fn load(dir: &Path, spec: AnnSpec, rows: usize) -> Result<Self> {
        let hint = "\n  hint: the index is damaged or incomplete; rebuild it with `kiln index build`";
        for ext in ["hnsw.graph", "hnsw.data"] {
            let p = dir.join(format!("{BASENAME}.{ext}"));
            if !p.is_file() {
                bail!("{}: missing (the index lists an HNSW graph){hint}", p.display());
            }
        }
        // The loaded graph borrows its reader for as long as it lives; the reader (a few paths
        // and options) is leaked, once per opened index.
        let dir_owned = dir.to_path_buf();
        let loaded = std::panic::catch_unwind(move || {
            let io: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(&dir_owned, BASENAME)));
            io.load_hnsw::<f32, Cosine>()
        });
        let mut graph = match loaded {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => bail!("{}: the HNSW graph cannot be read: {e}{hint}", dir.display()),
            Err(_) => bail!("{}: the HNSW graph cannot be read (its reader failed){hint}", dir.display()),
        };
        if graph.get_nb_point() != rows {
            bail!("{}: the HNSW graph holds {} points, the index {rows} chunks{hint}", dir.display(), graph.get_nb_point());
        }
        graph.set_searching_mode(true);
        Ok(Self { graph, spec })
    }
}
