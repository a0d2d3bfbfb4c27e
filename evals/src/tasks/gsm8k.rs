//! GSM8K, chat-formatted: the question as the user turn, a greedy reply through the model's chat
//! template, and exact match of the reply's last number against the number after `####` in the
//! reference; also the share of replies that ended with the end-of-turn token (format).

use std::path::PathBuf;

use kiln_models::chat::Message;

use super::chat::{read_jsonl, replies, template};
use crate::{EvalError, Scorer, Task, TaskResult};

pub const DEFAULT_PATH: &str = "gsm8k/test.jsonl";

pub struct Gsm8k {
    pub path: PathBuf,
    pub n: usize,
    pub max_tokens: usize,
}

/// The last number in `text` (commas and a trailing period dropped), as written.
pub fn last_number(text: &str) -> Option<String> {
    let cleaned = text.replace(',', "");
    let mut last = None;
    let mut cur = String::new();
    for c in cleaned.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || (c == '.' && !cur.is_empty()) || (c == '-' && cur.is_empty()) {
            cur.push(c);
        } else {
            let n = cur.trim_end_matches('.').trim_start_matches('-');
            if !n.is_empty() {
                last = Some(cur.trim_end_matches('.').to_string());
            }
            cur.clear();
        }
    }
    last
}

/// Numbers compare by value (`18` = `18.0`).
fn same_number(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() < 1e-9,
        _ => a == b,
    }
}

impl Task for Gsm8k {
    fn files(&self) -> Vec<&std::path::Path> {
        vec![self.path.as_path()]
    }
    fn name(&self) -> String {
        "gsm8k".into()
    }
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let items = read_jsonl(&self.path)?;
        let chat = template(lm)?;
        let (mut right, mut ended, mut r) = (0usize, 0usize, TaskResult::default());
        let items = &items[..self.n.min(items.len())];
        let mut qs = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let q = it["question"].as_str().ok_or_else(|| EvalError::Data(format!("{}:{}: no 'question'", self.path.display(), i + 1)))?;
            let gold = it["answer"].as_str().and_then(|a| a.rsplit("####").next()).map(|g| g.trim().replace(',', "")).unwrap_or_default();
            qs.push((q, gold));
        }
        let conversations: Vec<Vec<Message>> = qs.iter().map(|(q, _)| vec![Message::new("user", q)]).collect();
        let answers = replies(lm, &chat, &conversations, self.max_tokens)?;
        for ((q, gold), (answer, done)) in qs.iter().zip(answers) {
            let ok = last_number(&answer).is_some_and(|p| same_number(&p, gold));
            right += ok as usize;
            ended += done as usize;
            if r.samples.len() < 3 {
                r.samples.push(serde_json::json!({"question": q, "answer": answer, "gold": gold, "correct": ok}));
            }
        }
        let n = items.len().max(1) as f64;
        r.n = items.len();
        r.metrics.insert("em".into(), right as f64 / n);
        r.metrics.insert("format".into(), ended as f64 / n);
        r.notes.push(format!("chat template, greedy, at most {} tokens; exact match on the reply's last number", self.max_tokens));
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_number_reads_the_final_answer() {
        assert_eq!(last_number("She has 3 apples, then 1,200 more. The answer is 1,203.").as_deref(), Some("1203"));
        assert_eq!(last_number("It costs $-4.50 in total").as_deref(), Some("-4.50"));
        assert_eq!(last_number("no digits"), None);
        assert!(same_number("18.0", "18") && !same_number("17", "18"));
    }
}
