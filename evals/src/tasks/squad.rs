//! SQuAD v1.1, closed book: greedy generation after `Question: ...\nAnswer:`, then exact match
//! and F1 with the official answer normalisation (lower case, no punctuation, no articles,
//! collapsed whitespace), each the maximum over the gold answers.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::{EvalError, Scorer, Task, TaskResult};

pub const DEFAULT_PATH: &str = "squad11_dev/squad11_dev_qa.jsonl";

/// The official SQuAD normalisation.
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn exact_match(pred: &str, gold: &str) -> f64 {
    (normalize(pred) == normalize(gold)) as u8 as f64
}

/// Token-level F1 of the normalised strings.
pub fn f1(pred: &str, gold: &str) -> f64 {
    let p = normalize(pred);
    let g = normalize(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return (pt == gt) as u8 as f64;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Best EM and F1 of `pred` over the gold answers.
pub fn score(pred: &str, golds: &[String]) -> (f64, f64) {
    golds.iter().fold((0.0, 0.0), |(em, f), g| (em.max(exact_match(pred, g)), f.max(f1(pred, g))))
}

pub struct Squad {
    pub path: PathBuf,
    pub limit: Option<usize>,
    pub max_answer_tokens: usize,
}

impl Squad {
    pub fn new(path: PathBuf, limit: Option<usize>) -> Self {
        Self { path, limit, max_answer_tokens: 24 }
    }
}

impl Task for Squad {
    fn files(&self) -> Vec<&std::path::Path> {
        vec![self.path.as_path()]
    }
    fn name(&self) -> String {
        "squad".into()
    }
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| EvalError::Data(format!("{}: {e}", self.path.display())))?;
        let mut items = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if self.limit.is_some_and(|l| items.len() >= l) {
                break;
            }
            let at = || format!("{}:{}", self.path.display(), i + 1);
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| EvalError::Data(format!("{}: {e}", at())))?;
            let q = v["question"].as_str().ok_or_else(|| EvalError::Data(format!("{}: no 'question'", at())))?.to_string();
            let golds: Vec<String> = v["answers"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let tok = lm.tokenizer();
            let mut prompt = vec![tok.bos_id];
            prompt.extend(tok.encode(&format!("Question: {q}\nAnswer:")).map_err(|e| EvalError::Data(e.to_string()))?);
            items.push((q, golds, prompt));
        }
        let prompts: Vec<Vec<u32>> = items.iter().map(|it| it.2.clone()).collect();
        let eos = lm.tokenizer().eos_id;
        let outs = lm.greedy_batch(&prompts, self.max_answer_tokens, &[eos]);
        let (mut em, mut f, n) = (0.0, 0.0, items.len());
        let mut r = TaskResult::default();
        for ((q, golds, _), out) in items.iter().zip(outs) {
            let answer = lm.tokenizer().decode(&out).map_err(|e| EvalError::Data(e.to_string()))?;
            let answer = answer.lines().next().unwrap_or("").trim().to_string();
            let (e1, f1) = score(&answer, golds);
            em += e1;
            f += f1;
            if r.samples.len() < 5 {
                r.samples.push(serde_json::json!({"question": q, "answer": answer, "gold": golds}));
            }
        }
        r.n = n;
        r.metrics.insert("em".into(), em / n.max(1) as f64);
        r.metrics.insert("f1".into(), f / n.max(1) as f64);
        r.notes.push("closed book: no passage in the prompt".into());
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_normalisation_and_scores() {
        assert_eq!(normalize("The  Denver Broncos!"), "denver broncos");
        assert_eq!(normalize("a cat, an owl & THE dog."), "cat owl dog");
        assert_eq!(exact_match("the Denver Broncos", "Denver Broncos"), 1.0);
        assert_eq!(exact_match("Broncos", "Denver Broncos"), 0.0);
        // pred "denver broncos team" vs gold "denver broncos": p = 2/3, r = 1, F1 = 0.8
        assert!((f1("Denver Broncos team", "the Denver Broncos") - 0.8).abs() < 1e-12);
        assert_eq!(f1("Carolina", "Denver Broncos"), 0.0);
        assert_eq!(f1("", ""), 1.0);
        let golds = vec!["Santa Clara, California".to_string(), "Levi's Stadium".to_string()];
        let (em, f) = score("Levi's Stadium", &golds);
        assert_eq!((em, f), (1.0, 1.0));
        let (em, f) = score("in Santa Clara", &golds);
        assert_eq!(em, 0.0);
        // "in santa clara" vs "santa clara california": 2 shared, p = 2/3, r = 2/3
        assert!((f - 2.0 / 3.0).abs() < 1e-12, "{f}");
    }
}
