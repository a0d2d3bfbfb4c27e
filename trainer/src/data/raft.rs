//! A recipe's `[retrieval]` index, and RAFT examples for SFT: each record's user turn gets
//! `{{ passages }}`, its gold passage (the `data.join` record) among hard distractors that BM25
//! retrieves with the record's question from the training records' documents only, the gold
//! passage left out of a share `1 − raft_p` of the examples (`kiln_retrieval::raft`). The
//! passages are cut so that the user turn keeps within `retrieval.budget` tokens.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kiln_recipes::RetrievalSection;
use kiln_retrieval::prompt::{assemble, Assembly};
use kiln_retrieval::raft::{example, Fallback, Qa, RaftSpec};
use kiln_retrieval::{ChunkSpec, Hit, Index, Splitter};
use serde_json::Value;

use super::sources::Dirs;

/// The index a `[retrieval]` section names: `index` (absolute, or under the data root), or one
/// Kiln builds from `corpus` (under the data root) into the cache, once per corpus content and
/// chunking.
pub fn index_dir(r: &RetrievalSection, dirs: &Dirs) -> Result<PathBuf> {
    if !r.index.is_empty() {
        let p = PathBuf::from(&r.index);
        let p = if p.is_absolute() { p } else { dirs.data_root.join(p) };
        return Ok(p);
    }
    let corpus = dirs.under_root(&r.corpus, "retrieval.corpus")?;
    let sha = kiln_retrieval::corpus::file_sha256(&corpus)?;
    let spec = ChunkSpec::new(r.chunk_tokens, r.overlap).context("retrieval.chunk_tokens / retrieval.overlap")?;
    let key = format!("{sha}-{}-{}-words", spec.tokens, spec.overlap);
    let stem = corpus.file_stem().and_then(|s| s.to_str()).unwrap_or("corpus");
    let dir = dirs.cache.join("indexes").join(format!("{stem}-bm25-{}", &kiln_retrieval::corpus::sha256_hex(key.as_bytes())[..16]));
    if !dir.join(kiln_retrieval::manifest::FILE).is_file() {
        let (index, added) = Index::build(&dir, &[corpus.clone()], spec, &Splitter::Words, crate::plan::threads())?;
        tracing::info!("retrieval: indexed {} ({} documents, {} chunks) into {}", corpus.display(), added.documents, added.chunks, index.dir.display());
    }
    Ok(dir)
}

/// What RAFT needs to give each record its passages.
pub struct Raft {
    pub index: Index,
    pub spec: RaftSpec,
    pub query_field: String,
    pub budget: usize,
    pub passage_template: String,
    /// Counts the user turn's tokens (the model's tokenizer).
    pub splitter: Splitter,
    /// The documents distractors may come from: the training records' (`data.join` keys).
    pub allowed: HashSet<String>,
    /// `allowed`, sorted: random distractors when BM25 finds too few (made at the first example).
    fallback: std::cell::OnceCell<Vec<String>>,
    /// Examples that kept their gold passage, and all examples.
    pub kept: std::cell::Cell<(usize, usize)>,
}

impl Raft {
    pub fn new(r: &RetrievalSection, p: f64, dirs: &Dirs, tok: &kiln_models::Tokenizer, seed: u64) -> Result<Self> {
        // Distractors come from BM25 whatever the index's kind (RAFT's hard negatives).
        let mut index = Index::open(&index_dir(r, dirs)?).context("retrieval.index")?;
        index.set_kind(kiln_retrieval::Kind::Bm25, false)?;
        Ok(Self {
            index,
            spec: RaftSpec { k: r.k, p_gold: p, pool: r.raft_pool, seed },
            query_field: r.query_field.clone(),
            budget: r.budget,
            passage_template: r.passage_template.clone(),
            splitter: Splitter::model(tok.clone())?,
            allowed: HashSet::new(),
            fallback: Default::default(),
            kept: Default::default(),
        })
    }

    /// The passages block of one record: `at` names it (and seeds its draw), `record` holds the
    /// question, `key` is its `data.join` key and `joined` the gold document; `fixed` is the
    /// user turn's tokens without passages.
    pub fn passages(&self, at: &str, record: &Value, key: &str, joined: &Value, fixed: usize) -> Result<String> {
        let Some(question) = record.get(&self.query_field).and_then(Value::as_str) else {
            bail!("{at}: no string field '{}' to retrieve with\n  hint: set retrieval.query_field to the question's field", self.query_field);
        };
        let Some(text) = joined.get("text").and_then(Value::as_str) else {
            bail!("{at}: the data.join record '{key}' has no string 'text': RAFT's gold passage is the joined record's text");
        };
        let gold = Hit { doc_id: key.to_string(), chunk: 0, score: 0.0, title: joined.get("title").and_then(Value::as_str).map(str::to_string), text: text.to_string(), start: 0, end: text.len() };
        let qa = Qa { id: at.to_string(), question: question.to_string(), answers: Vec::new(), doc_id: key.to_string() };
        let docs = self.fallback.get_or_init(|| {
            let mut v: Vec<String> = self.allowed.iter().cloned().collect();
            v.sort();
            v
        });
        let first_chunk = |d: &str| self.index.bm25().chunk(d, 0, 0.0);
        let fallback = Fallback { docs, first_chunk: &first_chunk };
        let ex = example(&qa, &gold, &self.index, &|d: &str| self.allowed.contains(d), &self.spec, Some(&fallback))?;
        let (kept, all) = self.kept.get();
        self.kept.set((kept + usize::from(ex.gold), all + 1));
        let a = Assembly { passage: &self.passage_template, prompt: "{passages}", budget: self.budget.saturating_sub(fixed) };
        Ok(assemble("", &ex.passages, &a, &self.splitter)?.text)
    }
}
