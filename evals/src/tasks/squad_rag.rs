//! SQuAD v1.1 open-book, with retrieval: each question answered from passages in one user turn
//! (`kiln_retrieval::prompt`: numbered passages, then the question, within a token budget),
//! greedy through the model's chat template, scored with SQuAD's EM and F1.
//!
//! `squad-rag[:N[@ARTICLE]][:MODE]`, N questions spread over the articles from ARTICLE on (as
//! `squad-rc`), MODE one of:
//! - `closed`: no passage (closed book, the same prompt without passages);
//! - `gold`: the question's own paragraph only (the ceiling of retrieval);
//! - `topK` (default `top3`): the K best passages of the retrieval index (`kiln eval --retrieval
//!   INDEX`, or the recipe's `[retrieval] index`). The retrieval is scored too: recall@1, @5 and
//!   @20 and MRR@20 of the gold `doc_id` among the index's 20 best, and the latency of a query
//!   (p50 and p99, in ms).
//!
//! The harness measures each task's energy, so `squad-rag:200@38:closed`, `...:gold` and
//! `...:top3` side by side give the quality and the joules per answered question of each.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use kiln_models::chat::Message;
use kiln_retrieval::prompt::{assemble, Assembly};
use kiln_retrieval::{Hit, Index, Retriever, Splitter};

use super::chat::{read_jsonl, replies, spread, template};
use super::squad::score;
use crate::{EvalError, Scorer, Task, TaskResult};

/// The prompt around the passages; RAFT training (`kiln_retrieval::raft`) uses the same words.
pub const PROMPT: &str = "Answer the question with a short phrase from the passages.\n\n{passages}\n\nQuestion: {question}";
/// Closed book: the same request without passages.
pub const CLOSED: &str = "Answer the question with a short phrase.\n\nQuestion: {question}";

/// How a question gets its passages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed,
    Gold,
    Top(usize),
}

pub struct SquadRag {
    pub qa: PathBuf,
    pub paragraphs: PathBuf,
    pub n: usize,
    pub from_article: usize,
    pub mode: Mode,
    /// The retrieval index (`Mode::Top`).
    pub index: Option<std::sync::Arc<Index>>,
    /// Tokens the user turn may take.
    pub budget: usize,
    pub max_answer_tokens: usize,
}

impl SquadRag {
    pub fn parse_mode(s: &str) -> Option<Mode> {
        match s {
            "closed" => Some(Mode::Closed),
            "gold" => Some(Mode::Gold),
            _ => s.strip_prefix("top").and_then(|k| k.parse().ok()).filter(|&k| k > 0).map(Mode::Top),
        }
    }
}

/// The p-th percentile (0..=100) of `v` (sorted here), nearest rank.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

impl Task for SquadRag {
    fn files(&self) -> Vec<&std::path::Path> {
        vec![self.qa.as_path(), self.paragraphs.as_path()]
    }
    fn name(&self) -> String {
        "squad-rag".into()
    }
    fn set_retrieval(&mut self, index: &std::sync::Arc<Index>) -> bool {
        self.index = Some(index.clone());
        true
    }
    fn set_budget(&mut self, tokens: usize) -> bool {
        self.budget = tokens;
        true
    }
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let data = |e: anyhow::Error| EvalError::Data(format!("{e:#}"));
        let index = match (self.mode, &self.index) {
            (Mode::Top(_), Some(index)) => Some(index.clone()),
            (Mode::Top(k), None) => {
                return Err(EvalError::Data(format!(
                    "squad-rag:...:top{k} retrieves its passages: pass --retrieval INDEX (or set [retrieval] index)\n  hint: kiln index build {} --out squad-index",
                    self.paragraphs.display()
                )))
            }
            _ => None,
        };
        let paras: HashMap<String, (String, Option<String>)> = read_jsonl(&self.paragraphs)?
            .into_iter()
            .filter_map(|p| Some((p["doc_id"].as_str()?.to_string(), (p["text"].as_str()?.to_string(), p["title"].as_str().map(str::to_string)))))
            .collect();
        let qas = read_jsonl(&self.qa)?;
        let (held, articles) = super::squad_rc::held_out(&qas, self.from_article, &self.qa)?;
        let splitter = Splitter::model(lm.tokenizer().clone()).map_err(data)?;
        let chat = template(lm)?;
        let picked = spread(held.len(), self.n);
        let mut items = Vec::with_capacity(picked.len());
        let (mut found, mut rr, mut latency) = ([0usize; 3], 0.0, Vec::new());
        let mut cut = 0usize;
        for &i in &picked {
            let q = held[i];
            let question = q["question"].as_str().unwrap_or("");
            let doc = q["doc_id"].as_str().unwrap_or("");
            let golds: Vec<String> = q["answers"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
            let passages: Vec<Hit> = match self.mode {
                Mode::Closed => Vec::new(),
                Mode::Gold => {
                    let (text, title) = paras.get(doc).ok_or_else(|| EvalError::Data(format!("{}: no paragraph '{doc}'", self.paragraphs.display())))?;
                    vec![Hit { doc_id: doc.into(), chunk: 0, score: 0.0, title: title.clone(), text: text.clone(), start: 0, end: text.len() }]
                }
                Mode::Top(k) => {
                    let Some(index) = &index else { unreachable!("opened above") };
                    let t0 = Instant::now();
                    let hits = index.retrieve(question, k.max(20)).map_err(data)?;
                    latency.push(t0.elapsed().as_secs_f64() * 1e3);
                    if let Some(rank) = hits.iter().position(|h| h.doc_id == doc) {
                        rr += 1.0 / (rank + 1) as f64;
                        for (j, at) in [1, 5, 20].into_iter().enumerate() {
                            found[j] += usize::from(rank < at);
                        }
                    }
                    hits.into_iter().take(k).collect()
                }
            };
            let user = if self.mode == Mode::Closed {
                CLOSED.replace("{question}", question)
            } else {
                let p = assemble(question, &passages, &Assembly { passage: kiln_retrieval::prompt::PASSAGE_TEMPLATE, prompt: PROMPT, budget: self.budget }, &splitter).map_err(data)?;
                cut += usize::from(p.sources.len() < passages.len() || p.sources.iter().any(|s| s.cut));
                p.text
            };
            items.push((question, vec![Message::new("user", &user)], golds, passages.first().map(|h| h.doc_id.clone())));
        }
        let conversations: Vec<Vec<Message>> = items.iter().map(|it| it.1.clone()).collect();
        let answers = replies(lm, &chat, &conversations, self.max_answer_tokens)?;
        let (mut em, mut f1, mut ended, mut r) = (0.0, 0.0, 0usize, TaskResult::default());
        for ((question, _, golds, first), (answer, done)) in items.iter().zip(answers) {
            let (e, f) = score(&answer, golds);
            em += e;
            f1 += f;
            ended += done as usize;
            if r.samples.len() < 5 {
                r.samples.push(serde_json::json!({"question": question, "answer": answer, "gold": golds, "first_passage": first}));
            }
        }
        let n = picked.len() as f64;
        r.n = picked.len();
        r.metrics.insert("em".into(), em / n);
        r.metrics.insert("f1".into(), f1 / n);
        r.metrics.insert("format".into(), ended as f64 / n);
        let mode = match self.mode {
            Mode::Closed => "closed book".to_string(),
            Mode::Gold => "the gold passage".to_string(),
            Mode::Top(k) => {
                for (j, at) in [1, 5, 20].into_iter().enumerate() {
                    r.metrics.insert(format!("recall@{at}"), found[j] as f64 / n);
                }
                r.metrics.insert("mrr@20".into(), rr / n);
                r.metrics.insert("query_ms_p50".into(), percentile(&mut latency, 50.0));
                r.metrics.insert("query_ms_p99".into(), percentile(&mut latency, 99.0));
                format!("the top {k} passages of {} ({})", self.index.as_ref().map_or(String::new(), |p| p.dir.display().to_string()), index.as_ref().map_or("", |i| i.kind().name()))
            }
        };
        r.notes.push(format!("{mode}, chat template, greedy; {} questions spread over articles {}..{}; user turn within {} tokens ({} prompts cut)", picked.len(), self.from_article, articles, self.budget, cut));
        Ok(r)
    }
}
