//! SQuAD v1.1 retrieval: does a question find its own paragraph? Three retrievers over the same
//! paragraphs, side by side: dense (the model under evaluation embeds the paragraphs and the
//! questions, `kiln_models::embed`, as `kiln index build --kind dense` would), BM25 (tantivy, as
//! `kiln index build`), and the two fused as a hybrid index fuses them (`kiln_retrieval::fusion`:
//! convex by default, or what `--fusion` / `[retrieval] fusion` set). Each reports recall@1, @5
//! and @20 and MRR@20 against the question's gold `doc_id`.
//!
//! `squad-retrieval[:N|all[@FROM[-TO]]][:held|all][:sweep]`: N questions (default all) spread
//! over the articles from FROM (default 38, the articles a `groups = [0, 38]` recipe never trains
//! on) up to TO (default: the last), searched among those articles' paragraphs (`held`, the
//! default) or all of SQuAD dev's. A paragraph is one passage (BM25 chunks of up to 1024 words
//! keep each whole), and the dense side embeds at most 512 of its tokens.
//!
//! `sweep` also scores both fusions at dense weights 0.1 to 0.9 (`sweep_convex_w0.3_recall@1`,
//! ...), for choosing the weight on validation articles (say `@28-38`, inside a recipe's
//! training range), never on the held-out ones it is then reported on.

use std::collections::HashSet;
use std::path::PathBuf;

use kiln_retrieval::dense::{passage_text, query_text, Vectors};
use kiln_retrieval::fusion::{Fusion, Method};
use kiln_retrieval::index::HYBRID_DEPTH;
use kiln_retrieval::{ChunkSpec, Hit, Index, Retriever, Splitter};

use super::chat::{read_jsonl, spread};
use crate::{EvalError, Scorer, Task, TaskResult};

/// Tokens of a text the dense side embeds.
const EMBED_TOKENS: usize = 512;
/// The deepest rank scored.
const DEPTH: usize = 20;

pub struct SquadRetrieval {
    pub qa: PathBuf,
    pub paragraphs: PathBuf,
    pub n: usize,
    pub from_article: usize,
    /// Articles before this one (by order of appearance); `usize::MAX`: to the end.
    pub to_article: usize,
    /// Search all of SQuAD dev's paragraphs, not only the held-out articles'.
    pub all_paragraphs: bool,
    /// How the hybrid fuses BM25's and the dense ranking.
    pub fusion: Fusion,
    /// Also score both fusions over a grid of dense weights.
    pub sweep: bool,
}

/// The dense weights a sweep scores.
const SWEEP: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// Both fusions at every weight of [`SWEEP`], each with its metrics' prefix.
fn sweep_grid() -> Vec<(String, Fusion)> {
    [(Method::Convex, "convex"), (Method::Rrf, "rrf")]
        .into_iter()
        .flat_map(|(method, m)| SWEEP.map(|w| (format!("sweep_{m}_w{w}"), Fusion { method, dense_weight: w })))
        .collect()
}

/// Recall@1/5/20 and reciprocal rank, summed over questions.
#[derive(Default)]
struct Tally {
    found: [usize; 3],
    rr: f64,
}

impl Tally {
    fn add(&mut self, hits: &[String], gold: &str) {
        if let Some(rank) = hits.iter().position(|h| h == gold) {
            self.rr += 1.0 / (rank + 1) as f64;
            for (j, at) in [1, 5, 20].into_iter().enumerate() {
                self.found[j] += usize::from(rank < at);
            }
        }
    }

    fn report(&self, name: &str, n: usize, r: &mut TaskResult) {
        for (j, at) in [1, 5, 20].into_iter().enumerate() {
            r.metrics.insert(format!("{name}_recall@{at}"), self.found[j] as f64 / n.max(1) as f64);
        }
        r.metrics.insert(format!("{name}_mrr@20"), self.rr / n.max(1) as f64);
    }
}

impl Task for SquadRetrieval {
    fn files(&self) -> Vec<&std::path::Path> {
        vec![self.qa.as_path(), self.paragraphs.as_path()]
    }

    fn name(&self) -> String {
        "squad-retrieval".into()
    }

    fn set_fusion(&mut self, fusion: Fusion) -> bool {
        self.fusion = fusion;
        true
    }

    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let data = |e: anyhow::Error| EvalError::Data(format!("{e:#}"));
        let qas = read_jsonl(&self.qa)?;
        let (held, _) = super::squad_rc::articles(&qas, self.from_article, self.to_article, &self.qa)?;
        let titles: HashSet<&str> = held.iter().filter_map(|q| q["title"].as_str()).collect();
        let paras: Vec<serde_json::Value> = read_jsonl(&self.paragraphs)?.into_iter().filter(|p| self.all_paragraphs || p["title"].as_str().is_some_and(|t| titles.contains(t))).collect();
        if paras.is_empty() {
            return Err(EvalError::Data(format!("{}: no paragraphs of the questions' articles", self.paragraphs.display())));
        }
        let picked = spread(held.len(), self.n);
        let questions: Vec<(&str, &str)> = picked.iter().map(|&i| (held[i]["question"].as_str().unwrap_or(""), held[i]["doc_id"].as_str().unwrap_or(""))).collect();

        // Dense: the paragraphs and questions embedded by the model under evaluation.
        let tok = lm.tokenizer().clone();
        let encode = |text: String| -> Result<Vec<u32>, EvalError> {
            let mut ids = tok.encode(&text).map_err(|e| EvalError::Data(e.to_string()))?;
            ids.truncate(EMBED_TOKENS);
            Ok(ids)
        };
        let mut seqs = Vec::with_capacity(paras.len());
        let mut keys = Vec::with_capacity(paras.len());
        for p in &paras {
            seqs.push(encode(passage_text(p["title"].as_str(), p["text"].as_str().unwrap_or("")))?);
            keys.push((p["doc_id"].as_str().unwrap_or("").to_string(), 0));
        }
        let t0 = std::time::Instant::now();
        let Some(data_rows) = lm.embed(&seqs) else {
            return Err(EvalError::Data("squad-retrieval embeds with the model, and this scorer cannot embed".into()));
        };
        let embed_s = t0.elapsed().as_secs_f64();
        let dim = data_rows.len() / seqs.len().max(1);
        let vectors = Vectors { dim, keys, data: data_rows };
        let qseqs: Vec<Vec<u32>> = questions.iter().map(|(q, _)| encode(query_text(q))).collect::<Result<_, _>>()?;
        let qvecs = lm.embed(&qseqs).unwrap_or_default();

        // BM25 over the same paragraphs, one chunk each, in a temporary index.
        let tmp = std::env::temp_dir().join(format!("kiln-squad-retrieval-{}-{}", std::process::id(), t0.elapsed().as_nanos()));
        let bm25 = (|| -> anyhow::Result<Index> {
            std::fs::create_dir_all(&tmp)?;
            let corpus = tmp.join("paragraphs.jsonl");
            let lines: String = paras.iter().map(|p| format!("{p}\n")).collect();
            std::fs::write(&corpus, lines)?;
            Ok(Index::build(&tmp.join("index"), &[corpus], ChunkSpec::new(1024, 0)?, &Splitter::Words, 1)?.0)
        })();
        let result = (|| -> Result<TaskResult, EvalError> {
            let bm25 = bm25.map_err(data)?;
            let (mut dense, mut sparse, mut hybrid) = (Tally::default(), Tally::default(), Tally::default());
            let grid = if self.sweep { sweep_grid() } else { Vec::new() };
            let mut swept: Vec<Tally> = grid.iter().map(|_| Tally::default()).collect();
            let mut r = TaskResult::default();
            let ids = |h: &[Hit]| h.iter().map(|x| x.doc_id.clone()).collect::<Vec<_>>();
            for (i, (q, gold)) in questions.iter().enumerate() {
                // Both rankings as deep as a hybrid index fuses them; each scored to DEPTH.
                let dq: Vec<Hit> = vectors
                    .search_exact(&qvecs[i * dim..(i + 1) * dim], HYBRID_DEPTH)
                    .into_iter()
                    .map(|(row, score)| Hit { doc_id: vectors.keys[row].0.clone(), chunk: 0, score, title: None, text: String::new(), start: 0, end: 0 })
                    .collect();
                let sq = bm25.retrieve(q, HYBRID_DEPTH).map_err(data)?;
                let hq = self.fusion.fuse(&sq, &dq, DEPTH);
                dense.add(&ids(&dq[..dq.len().min(DEPTH)]), gold);
                sparse.add(&ids(&sq[..sq.len().min(DEPTH)]), gold);
                hybrid.add(&ids(&hq), gold);
                for ((_, f), t) in grid.iter().zip(&mut swept) {
                    t.add(&ids(&f.fuse(&sq, &dq, DEPTH)), gold);
                }
                if r.samples.len() < 3 {
                    r.samples.push(serde_json::json!({"question": q, "gold": gold, "dense": ids(&dq[..dq.len().min(3)]), "bm25": ids(&sq[..sq.len().min(3)]), "hybrid": ids(&hq[..hq.len().min(3)])}));
                }
            }
            let n = questions.len();
            dense.report("dense", n, &mut r);
            sparse.report("bm25", n, &mut r);
            hybrid.report("hybrid", n, &mut r);
            if let Some(((best, _), t)) = grid.iter().zip(&swept).max_by(|a, b| a.1.rr.total_cmp(&b.1.rr)) {
                r.notes.push(format!("sweep: the best MRR@20 is {best} ({:.3}; recall@1 {:.1})", t.rr / n.max(1) as f64, 100.0 * t.found[0] as f64 / n.max(1) as f64));
            }
            for ((name, _), t) in grid.iter().zip(&swept) {
                t.report(name, n, &mut r);
            }
            r.metrics.insert("questions".into(), n as f64);
            r.metrics.insert("passages".into(), paras.len() as f64);
            r.metrics.insert("embed_passages_s".into(), embed_s);
            r.n = n;
            r.notes.push(format!(
                "{n} questions of articles {}, among {} paragraphs ({}): dense R@1/5/20 {:.1}/{:.1}/{:.1}, bm25 {:.1}/{:.1}/{:.1}, hybrid ({}) {:.1}/{:.1}/{:.1}",
                if self.to_article == usize::MAX { format!("{} on", self.from_article) } else { format!("{} to {}", self.from_article, self.to_article) },
                paras.len(), if self.all_paragraphs { "all of SQuAD dev" } else { "those articles'" },
                100.0 * r.metrics["dense_recall@1"], 100.0 * r.metrics["dense_recall@5"], 100.0 * r.metrics["dense_recall@20"],
                100.0 * r.metrics["bm25_recall@1"], 100.0 * r.metrics["bm25_recall@5"], 100.0 * r.metrics["bm25_recall@20"],
                self.fusion.name(),
                100.0 * r.metrics["hybrid_recall@1"], 100.0 * r.metrics["hybrid_recall@5"], 100.0 * r.metrics["hybrid_recall@20"]
            ));
            Ok(r)
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }
}
