//! The retriever stage's data: (query, passage) pairs from any conversation format (the first
//! user turn is the query, the last assistant turn its passage: with `format = "fields"`,
//! `user_template` and `assistant_template` render them), prefixed as dense retrieval embeds them
//! (`kiln_retrieval::dense`), tokenized, cut to `retriever.query_tokens` and the context, and
//! batched N pairs at a time: each query's passage is the positive, the batch's other passages
//! its negatives (`kiln_models::contrastive`).

use anyhow::{bail, Result};
use kiln_models::chat::Message;
use kiln_models::contrastive::{Pairs, Rows};
use kiln_models::Tokenizer;
use kiln_retrieval::dense::{passage_text, query_text};
use serde::{Deserialize, Serialize};

use super::loader::{Batch, Epochs, LoaderPos};

/// One tokenized pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub query: Vec<u32>,
    pub passage: Vec<u32>,
    /// Which passage it is (a hash of its tokens): pairs sharing one are not each other's
    /// negatives.
    pub group: u64,
}

/// What became of the records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    pub records: usize,
    pub pairs: usize,
    /// Distinct passages among the pairs.
    pub passages: usize,
    pub query_tokens: usize,
    pub passage_tokens: usize,
    pub queries_cut: usize,
    pub passages_cut: usize,
}

#[derive(Debug, Clone)]
pub struct PairData {
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
    pub stats: PairStats,
    /// The softmax temperature.
    pub tau: f32,
}

fn group_of(ids: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in ids {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Conversations to pairs, tokenized and cut; the last `val_fraction` held out.
pub fn pairs(convs: &[Vec<Message>], tok: &Tokenizer, query_tokens: usize, passage_tokens: usize, val_fraction: f64, tau: f32) -> Result<PairData> {
    let mut stats = PairStats { records: convs.len(), ..Default::default() };
    let mut all = Vec::with_capacity(convs.len());
    for (i, c) in convs.iter().enumerate() {
        let (Some(q), Some(p)) = (c.iter().find(|m| m.role == "user"), c.iter().rev().find(|m| m.role == "assistant")) else {
            bail!("record {}: a retriever pair needs a user turn (the query) and an assistant turn (its passage)\n  hint: with format = \"fields\", user_template renders the query and assistant_template the passage", i + 1);
        };
        if q.content.trim().is_empty() || p.content.trim().is_empty() {
            bail!("record {}: an empty {}\n  hint: check data.user_template and data.assistant_template against the records' fields", i + 1, if q.content.trim().is_empty() { "query" } else { "passage" });
        }
        let mut query = tok.encode(&query_text(&q.content))?;
        let mut passage = tok.encode(&passage_text(None, &p.content))?;
        if query.len() > query_tokens {
            query.truncate(query_tokens);
            stats.queries_cut += 1;
        }
        if passage.len() > passage_tokens {
            passage.truncate(passage_tokens);
            stats.passages_cut += 1;
        }
        stats.query_tokens += query.len();
        stats.passage_tokens += passage.len();
        let group = group_of(&passage);
        all.push(Pair { query, passage, group });
    }
    stats.pairs = all.len();
    let mut groups: Vec<u64> = all.iter().map(|p| p.group).collect();
    groups.sort_unstable();
    groups.dedup();
    stats.passages = groups.len();
    let n_val = ((all.len() as f64) * val_fraction).round() as usize;
    if all.len() < 4 || n_val < 2 || all.len() - n_val < 2 {
        bail!(
            "data: {} pairs cannot be split with val_fraction {} into at least 2 training and 2 validation pairs (in-batch negatives need two)\n  hint: add data or change data.val_fraction",
            all.len(), val_fraction
        );
    }
    let val = all.split_off(all.len() - n_val);
    Ok(PairData { train: all, val, stats, tau })
}

/// A batch of `pairs`: both sides right-padded with `pad`.
pub fn pair_batch(pairs: &[&Pair], pad: u32, tau: f32) -> Batch {
    let queries = Rows::new(&pairs.iter().map(|p| p.query.as_slice()).collect::<Vec<_>>(), pad);
    let passages = Rows::new(&pairs.iter().map(|p| p.passage.as_slice()).collect::<Vec<_>>(), pad);
    let tokens = queries.tokens() + passages.tokens();
    let (b, t) = (pairs.len(), queries.t.max(passages.t));
    let contrast = Pairs { queries, passages, groups: pairs.iter().map(|p| p.group).collect(), tau };
    Batch { inputs: Vec::new(), targets: Vec::new(), mask: Vec::new(), batch: b, context: t, tokens, starts: None, pairs: Some(contrast) }
}

/// Shuffled epochs over the pairs, `batch` at a time; `(epoch, index)` is all its state.
pub struct PairLoader {
    pairs: Vec<Pair>,
    batch: usize,
    pad: u32,
    tau: f32,
    pub epochs: Epochs,
}

impl PairLoader {
    pub fn new(pairs: Vec<Pair>, batch: usize, seed: u64, pad: u32, tau: f32, pos: LoaderPos) -> Self {
        let epochs = Epochs::new(pairs.len(), seed, pos);
        Self { pairs, batch, pad, tau, epochs }
    }

    pub fn next_batch(&mut self) -> Batch {
        let picked = self.epochs.take(self.batch);
        pair_batch(&picked.iter().map(|&i| &self.pairs[i]).collect::<Vec<_>>(), self.pad, self.tau)
    }

    /// The pairs in order, batched: the first `n` batches (validation).
    pub fn in_order(&self, n: usize) -> Vec<Batch> {
        let all: Vec<&Pair> = self.pairs.iter().collect();
        all.chunks(self.batch).filter(|c| c.len() >= 2).take(n.max(1)).map(|c| pair_batch(c, self.pad, self.tau)).collect()
    }
}
