//! Reciprocal-rank fusion (Cormack, Clarke and Büttcher, 2009): each passage scores
//! `Σ 1 / (c + rank)` over the rankings it appears in (ranks from 1; `c` = 60 as in the paper),
//! which needs no calibration between the retrievers' scores.

use std::collections::HashMap;

use crate::retriever::Hit;

/// The paper's constant.
pub const RRF_C: f64 = 60.0;

/// The fused ranking of `rankings` (each best first), cut to `k`. A passage is its
/// `(doc_id, chunk)`; it keeps the text of its first appearance, and its score becomes the
/// fused score. Ties keep the order of first appearance (rankings in order, then rank).
pub fn rrf(rankings: &[Vec<Hit>], k: usize, c: f64) -> Vec<Hit> {
    let mut fused: Vec<(f64, Hit)> = Vec::new();
    let mut at: HashMap<(String, u32), usize> = HashMap::new();
    for ranking in rankings {
        for (r, hit) in ranking.iter().enumerate() {
            let add = 1.0 / (c + (r + 1) as f64);
            match at.get(&(hit.doc_id.clone(), hit.chunk)) {
                Some(&i) => fused[i].0 += add,
                None => {
                    at.insert((hit.doc_id.clone(), hit.chunk), fused.len());
                    fused.push((add, hit.clone()));
                }
            }
        }
    }
    // A stable sort keeps first appearance among equal scores.
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
