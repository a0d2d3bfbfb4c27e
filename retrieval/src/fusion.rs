//! Fusing a sparse (BM25) and a dense ranking of the same query into one, two ways:
//! - **convex** (the default): each ranking's scores min-max normalised over its own list to
//!   [0, 1] (a passage missing from a list gets 0 there), then `(1 − w)·bm25 + w·dense`.
//!   Bruch, Gai and Ingber ("An Analysis of Fusion Functions for Hybrid Retrieval", TOIS 2023)
//!   find it beats reciprocal rank when `w` is tuned on a few hundred questions;
//! - **rrf**: reciprocal-rank fusion (Cormack, Clarke and Büttcher, 2009), each passage scoring
//!   `Σ weight / (c + rank)` over the rankings it appears in (ranks from 1, `c` = 60 as in the
//!   paper), which needs no calibration between the retrievers' scores. Weights `(1 − w, w)`;
//!   `w` = 0.5 ranks as the paper's unweighted sum.
//!
//! A passage is its `(doc_id, chunk)`; it keeps the text of its first appearance, and its
//! score becomes the fused score. Ties keep the order of first appearance (rankings in order,
//! then rank).

use std::collections::HashMap;

use anyhow::{bail, Result};

use crate::retriever::Hit;

/// The paper's constant.
pub const RRF_C: f64 = 60.0;

/// The dense ranking's weight in a convex fusion unless told otherwise: chosen on validation
/// questions from SQuAD's training articles, never the held-out ones (BENCHMARKS.md, "Hybrid
/// fusion"); 0.4 had the best MRR@20 there, and 0.1 to 0.5 all beat BM25 alone.
pub const DEFAULT_DENSE_WEIGHT: f64 = 0.4;

/// How a hybrid index fuses its two rankings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    Convex,
    Rrf,
}

/// A fusion method and the dense ranking's weight `w` in [0, 1] (BM25's is `1 − w`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fusion {
    pub method: Method,
    pub dense_weight: f64,
}

impl Default for Fusion {
    fn default() -> Self {
        Self { method: Method::Convex, dense_weight: DEFAULT_DENSE_WEIGHT }
    }
}

impl Fusion {
    /// `convex` or `rrf`, with `dense_weight` (default: 0.4 for convex, 0.5 for rrf).
    pub fn parse(method: &str, dense_weight: Option<f64>) -> Result<Self> {
        let (method, default) = match method {
            "convex" => (Method::Convex, DEFAULT_DENSE_WEIGHT),
            "rrf" => (Method::Rrf, 0.5),
            _ => bail!("fusion '{method}': convex (min-max normalised scores, weighted) or rrf (reciprocal rank)"),
        };
        let w = dense_weight.unwrap_or(default);
        if !(0.0..=1.0).contains(&w) {
            bail!("dense weight {w}: a share in [0, 1] (BM25 gets 1 minus it)");
        }
        Ok(Self { method, dense_weight: w })
    }

    pub fn name(&self) -> String {
        let m = match self.method {
            Method::Convex => "convex",
            Method::Rrf => "rrf",
        };
        format!("{m}, dense weight {}", self.dense_weight)
    }

    /// The fused ranking of a query's BM25 and dense hits (each best first), cut to `k`.
    pub fn fuse(&self, sparse: &[Hit], dense: &[Hit], k: usize) -> Vec<Hit> {
        let w = self.dense_weight;
        match self.method {
            Method::Convex => convex(&[(sparse, 1.0 - w), (dense, w)], k),
            Method::Rrf => weighted_rrf(&[(sparse, 1.0 - w), (dense, w)], k, RRF_C),
        }
    }
}

/// Unweighted reciprocal-rank fusion of `rankings`, cut to `k`.
pub fn rrf(rankings: &[Vec<Hit>], k: usize, c: f64) -> Vec<Hit> {
    let weighted: Vec<(&[Hit], f64)> = rankings.iter().map(|r| (r.as_slice(), 1.0)).collect();
    weighted_rrf(&weighted, k, c)
}

/// Reciprocal-rank fusion, each ranking's terms times its weight, cut to `k`.
pub fn weighted_rrf(rankings: &[(&[Hit], f64)], k: usize, c: f64) -> Vec<Hit> {
    let terms = rankings.iter().map(|&(r, w)| (r, (0..r.len()).map(|i| w / (c + (i + 1) as f64)).collect())).collect();
    accumulate(terms, k)
}

/// Convex fusion: each ranking's scores min-max normalised over the ranking (all equal: 1),
/// times its weight, summed; a passage a ranking lacks adds 0 for it.
pub fn convex(rankings: &[(&[Hit], f64)], k: usize) -> Vec<Hit> {
    let terms = rankings
        .iter()
        .map(|&(r, w)| {
            let (lo, hi) = r.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), h| (lo.min(h.score as f64), hi.max(h.score as f64)));
            let norm = |s: f32| if hi > lo { (s as f64 - lo) / (hi - lo) } else { 1.0 };
            (r, r.iter().map(|h| w * norm(h.score)).collect())
        })
        .collect();
    accumulate(terms, k)
}

/// Sums each passage's terms over the rankings (`terms[i].1[r]` for the hit at rank `r` of
/// ranking `i`), sorts best first (stable: first appearance breaks ties) and keeps `k`.
fn accumulate(terms: Vec<(&[Hit], Vec<f64>)>, k: usize) -> Vec<Hit> {
    let mut fused: Vec<(f64, Hit)> = Vec::new();
    let mut at: HashMap<(&str, u32), usize> = HashMap::new();
    for (ranking, add) in &terms {
        for (hit, &add) in ranking.iter().zip(add) {
            match at.get(&(hit.doc_id.as_str(), hit.chunk)) {
                Some(&i) => fused[i].0 += add,
                None => {
                    at.insert((hit.doc_id.as_str(), hit.chunk), fused.len());
                    fused.push((add, hit.clone()));
                }
            }
        }
    }
    fused.sort_by(|a, b| b.0.total_cmp(&a.0));
    fused
        .into_iter()
        .take(k)
        .map(|(s, mut h)| {
            h.score = s as f32;
            h
        })
        .collect()
}
