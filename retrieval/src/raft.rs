//! RAFT training examples (Zhang et al., 2024, "RAFT: Adapting Language Model to Domain
//! Specific RAG"): each question comes with k passages, its gold passage among hard distractors
//! (the retriever's best passages from other documents), and in a fraction `1 − P` of examples
//! the gold passage is left out, so the model learns to read the passages and to ignore noise.
//!
//! Whether an example keeps its gold passage, and the passages' order, are drawn from the
//! example's own seeded generator (the seed and the question's id), so a set of examples is the
//! same however it is cut or ordered. When the retriever finds too few distractors (a question
//! sharing no word with other documents), random allowed documents fill the k places, as the
//! RAFT paper samples its distractors.

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::retriever::{Hit, Retriever};

/// A question with its answers and the document holding them.
#[derive(Debug, Clone, PartialEq)]
pub struct Qa {
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
    pub doc_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RaftSpec {
    /// Passages per example.
    pub k: usize,
    /// The share of examples that keep their gold passage (RAFT's P).
    pub p_gold: f64,
    /// How many of the retriever's best passages distractors are drawn from (the best first).
    pub pool: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RaftExample {
    pub id: String,
    pub question: String,
    pub answer: String,
    /// In the order the prompt shows them.
    pub passages: Vec<Hit>,
    /// Whether the gold passage is among them.
    pub gold: bool,
}

/// Where distractors come from when the retriever finds fewer than needed: random documents of
/// `docs` (the allowed ones, in a fixed order), each shown as `first_chunk` gives it.
pub struct Fallback<'a> {
    pub docs: &'a [String],
    pub first_chunk: &'a dyn Fn(&str) -> Result<Option<Hit>>,
}

/// FNV-1a of a string, to seed an example's generator from its id.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The RAFT example of `qa`: `gold` is its gold passage; distractors come from `retriever`'s
/// best `spec.pool` passages for the question whose document is not the gold one and is
/// `allowed` (the training articles only, so no held-out text leaks into training), then, if
/// they are too few, from `fallback`'s documents at random.
pub fn example(qa: &Qa, gold: &Hit, retriever: &dyn Retriever, allowed: &dyn Fn(&str) -> bool, spec: &RaftSpec, fallback: Option<&Fallback>) -> Result<RaftExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ fnv(&qa.id));
    let keep_gold = rng.random_bool(spec.p_gold.clamp(0.0, 1.0));
    let want = spec.k.saturating_sub(usize::from(keep_gold));
    let mut passages: Vec<Hit> = retriever.retrieve(&qa.question, spec.pool.max(want))?.into_iter().filter(|h| h.doc_id != qa.doc_id && allowed(&h.doc_id)).take(want).collect();
    if let (true, Some(f)) = (passages.len() < want, fallback) {
        // Only a short example draws here, so every other example's draw is unchanged.
        let mut order: Vec<usize> = (0..f.docs.len()).collect();
        order.shuffle(&mut rng);
        for i in order {
            let doc = &f.docs[i];
            if passages.len() >= want {
                break;
            }
            if doc == &qa.doc_id || !allowed(doc) || passages.iter().any(|h| &h.doc_id == doc) {
                continue;
            }
            if let Some(h) = (f.first_chunk)(doc)? {
                passages.push(h);
            }
        }
    }
    if keep_gold && spec.k > 0 {
        passages.push(gold.clone());
    }
    passages.shuffle(&mut rng);
    Ok(RaftExample { id: qa.id.clone(), question: qa.question.clone(), answer: qa.answers.first().cloned().unwrap_or_default(), passages, gold: keep_gold && spec.k > 0 })
}
