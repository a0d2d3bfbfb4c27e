//! What the chat tasks share: a reply through the model's chat template (its own, else
//! ChatML), greedy, stopped at the end-of-turn token, and whether it stopped there within the
//! limit (format adherence).

use kiln_models::chat::{stop_ids, ChatTemplate, Message};

use crate::{EvalError, Scorer};

/// A greedy reply to each conversation (generated as one batch), and whether it ended with an
/// end-of-turn token within `max_tokens`.
pub fn replies(lm: &mut dyn Scorer, chat: &ChatTemplate, conversations: &[Vec<Message>], max_tokens: usize) -> Result<Vec<(String, bool)>, EvalError> {
    let tok = lm.tokenizer();
    let prompts = conversations.iter().map(|m| chat.prompt_ids(tok, m)).collect::<Result<Vec<_>, _>>().map_err(|e| EvalError::Data(e.to_string()))?;
    let stops = stop_ids(tok);
    let outs = lm.greedy_batch(&prompts, max_tokens, &stops);
    outs.into_iter()
        .map(|mut out| {
            let ended = out.last().is_some_and(|t| stops.contains(t));
            if ended {
                out.pop();
            }
            let text = lm.tokenizer().decode(&out).map_err(|e| EvalError::Data(e.to_string()))?;
            Ok((text.trim().to_string(), ended))
        })
        .collect()
}

/// The model's chat template, or ChatML.
pub fn template(lm: &dyn Scorer) -> Result<ChatTemplate, EvalError> {
    ChatTemplate::new(lm.tokenizer(), None).map_err(|e| EvalError::Data(e.to_string()))
}

/// `n` indices spread evenly over `0..len` (all of them when `n >= len`).
pub fn spread(len: usize, n: usize) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    (0..n).map(|i| i * len / n).collect()
}

/// A JSONL file's records, each as a JSON value, with an error naming the line.
pub fn read_jsonl(path: &std::path::Path) -> Result<Vec<serde_json::Value>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Data(format!("{}: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| EvalError::Data(format!("{}:{}: {e}", path.display(), i + 1))))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread_is_even_and_bounded() {
        assert_eq!(super::spread(10, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(super::spread(3, 5), vec![0, 1, 2]);
    }
}
