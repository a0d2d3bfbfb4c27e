//! SQuAD v1.1 reading comprehension, chat-formatted: the passage and the question in one user
//! turn ("Answer the question with a short phrase from the passage."), a greedy reply through
//! the model's chat template, then SQuAD's exact match and F1 over the gold answers, and the
//! share of replies that ended with the end-of-turn token (format).
//!
//! `squad-rc:N@A`: N questions spread evenly over the questions of articles A and after, by order
//! of appearance (`squad-rc:200@38`: the last 10 of the 48 dev articles, which
//! `recipes/sft/smollm2-squad.toml` does not train on).

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_models::chat::Message;

use super::chat::{read_jsonl, replies, spread, template};
use super::squad::score;
use crate::{EvalError, Scorer, Task, TaskResult};

pub const QA: &str = "squad11_dev/squad11_dev_qa.jsonl";
pub const PARAGRAPHS: &str = "squad11_dev/squad11_dev_paragraphs.jsonl";
/// The instruction before the passage; the fine-tuning recipe trains with the same words.
pub const INSTRUCTION: &str = "Answer the question with a short phrase from the passage.";

/// The questions of articles `from_article` and after (by order of appearance), and how many
/// articles there are; no such question is an error naming `path`.
pub fn held_out<'q>(qas: &'q [serde_json::Value], from_article: usize, path: &std::path::Path) -> Result<(Vec<&'q serde_json::Value>, usize), EvalError> {
    articles(qas, from_article, usize::MAX, path)
}

/// The questions of articles `from_article` up to (not including) `to_article`, by order of
/// appearance, and how many articles there are; no such question is an error naming `path`.
pub fn articles<'q>(qas: &'q [serde_json::Value], from_article: usize, to_article: usize, path: &std::path::Path) -> Result<(Vec<&'q serde_json::Value>, usize), EvalError> {
    let mut titles: Vec<&str> = Vec::new();
    let mut held = Vec::new();
    for q in qas {
        let t = q["title"].as_str().unwrap_or("");
        if !titles.contains(&t) {
            titles.push(t);
        }
        if titles.len() > from_article && titles.len() <= to_article {
            held.push(q);
        }
    }
    if held.is_empty() {
        let to = if to_article == usize::MAX { "on".to_string() } else { format!("to {to_article}") };
        return Err(EvalError::Data(format!("{}: no questions from article {from_article} {to} ({} articles)", path.display(), titles.len())));
    }
    Ok((held, titles.len()))
}

pub struct SquadRc {
    pub qa: PathBuf,
    pub paragraphs: PathBuf,
    pub n: usize,
    pub from_article: usize,
    pub max_answer_tokens: usize,
}

/// The user turn for a passage and a question.
pub fn user_turn(passage: &str, question: &str) -> String {
    format!("{INSTRUCTION}\n\nPassage: {passage}\n\nQuestion: {question}")
}

impl Task for SquadRc {
    fn files(&self) -> Vec<&std::path::Path> {
        vec![self.qa.as_path(), self.paragraphs.as_path()]
    }
    fn name(&self) -> String {
        "squad-rc".into()
    }
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let paras: HashMap<String, String> = read_jsonl(&self.paragraphs)?
            .into_iter()
            .filter_map(|p| Some((p["doc_id"].as_str()?.to_string(), p["text"].as_str()?.to_string())))
            .collect();
        let qas = read_jsonl(&self.qa)?;
        let (held, articles) = held_out(&qas, self.from_article, &self.qa)?;
        let chat = template(lm)?;
        let (mut em, mut f1, mut ended, mut r) = (0.0, 0.0, 0usize, TaskResult::default());
        let picked = spread(held.len(), self.n);
        let mut items = Vec::with_capacity(picked.len());
        for &i in &picked {
            let q = held[i];
            let question = q["question"].as_str().unwrap_or("");
            let doc = q["doc_id"].as_str().unwrap_or("");
            let passage = paras.get(doc).ok_or_else(|| EvalError::Data(format!("{}: no paragraph '{doc}'", self.paragraphs.display())))?;
            let golds: Vec<String> = q["answers"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
            items.push((question, vec![Message::new("user", &user_turn(passage, question))], golds));
        }
        let conversations: Vec<Vec<Message>> = items.iter().map(|it| it.1.clone()).collect();
        let answers = replies(lm, &chat, &conversations, self.max_answer_tokens)?;
        for ((question, _, golds), (answer, done)) in items.iter().zip(answers) {
            let (e, f) = score(&answer, golds);
            em += e;
            f1 += f;
            ended += done as usize;
            if r.samples.len() < 5 {
                r.samples.push(serde_json::json!({"question": question, "answer": answer, "gold": golds}));
            }
        }
        let n = picked.len() as f64;
        r.n = picked.len();
        r.metrics.insert("em".into(), em / n);
        r.metrics.insert("f1".into(), f1 / n);
        r.metrics.insert("format".into(), ended as f64 / n);
        r.notes.push(format!("passage given, chat template, greedy; {} questions spread over articles {}..{}", picked.len(), self.from_article, articles));
        Ok(r)
    }
}
