//! Prompt assembly: retrieved passages and the question in one user message that fits a token
//! budget. Passages go in rank order while they fit; the first that does not is cut at a token
//! boundary (when a useful part of it fits) and the rest are left out. The question is never cut:
//! with a budget too small even for it, the prompt is the question alone.
//!
//! Templates use `{name}` placeholders: a passage `{n}` (its number from 1), `{doc_id}`,
//! `{title}` (the document's title, else its id) and `{text}`; the prompt `{passages}` and
//! `{question}`.

use anyhow::Result;
use serde::Serialize;

use crate::chunk::Splitter;
use crate::retriever::Hit;

pub const PASSAGE_TEMPLATE: &str = "[{n}] {title}\n{text}";
pub const PROMPT_TEMPLATE: &str = "Answer the question with a short phrase from the passages.\n\n{passages}\n\nQuestion: {question}";

/// A cut passage keeps at least this many tokens of its text, or is left out.
const MIN_CUT_TOKENS: usize = 16;

/// Where a prompt's passages came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Source {
    pub n: usize,
    pub doc_id: String,
    pub chunk: u32,
    pub title: Option<String>,
    /// Cut to fit the budget.
    pub cut: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub text: String,
    pub sources: Vec<Source>,
    /// The prompt's tokens, by the splitter that counted them.
    pub tokens: usize,
}

/// The templates and the budget.
#[derive(Debug, Clone)]
pub struct Assembly<'a> {
    pub passage: &'a str,
    pub prompt: &'a str,
    /// Tokens the whole user message may take.
    pub budget: usize,
}

impl Default for Assembly<'_> {
    fn default() -> Self {
        Self { passage: PASSAGE_TEMPLATE, prompt: PROMPT_TEMPLATE, budget: 1024 }
    }
}

fn passage(template: &str, n: usize, hit: &Hit, text: &str) -> String {
    template.replace("{n}", &n.to_string()).replace("{doc_id}", &hit.doc_id).replace("{title}", hit.title.as_deref().unwrap_or(&hit.doc_id)).replace("{text}", text)
}

fn prompt(template: &str, passages: &[String], question: &str) -> String {
    // Placeholders are filled once each, so text holding "{question}" stays text.
    let (before, after) = template.split_once("{passages}").unwrap_or((template, ""));
    let fill = |s: &str| s.replace("{question}", question);
    format!("{}{}{}", fill(before), passages.join("\n\n"), fill(after))
}

/// The prompt for `question` with as many of `hits` (best first) as `a.budget` allows, tokens
/// counted by `splitter`.
pub fn assemble(question: &str, hits: &[Hit], a: &Assembly, splitter: &Splitter) -> Result<Prompt> {
    let mut parts: Vec<String> = Vec::new();
    let mut sources = Vec::new();
    for (i, hit) in hits.iter().enumerate() {
        let n = i + 1;
        let whole = passage(a.passage, n, hit, &hit.text);
        let mut with = parts.clone();
        with.push(whole.clone());
        if splitter.count(&prompt(a.prompt, &with, question))? <= a.budget {
            parts = with;
            sources.push(Source { n, doc_id: hit.doc_id.clone(), chunk: hit.chunk, title: hit.title.clone(), cut: false });
            continue;
        }
        // Cut this passage to the longest token prefix that fits (binary search), if a useful
        // part fits; then stop.
        let spans = splitter.spans(&hit.text)?;
        let fits = |keep: usize| -> Result<bool> {
            let mut with = parts.clone();
            let cut = spans.get(keep.wrapping_sub(1)).map_or(0, |s| s.1);
            with.push(passage(a.passage, n, hit, &hit.text[..cut]));
            Ok(splitter.count(&prompt(a.prompt, &with, question))? <= a.budget)
        };
        if MIN_CUT_TOKENS <= spans.len() && fits(MIN_CUT_TOKENS)? {
            let (mut lo, mut hi) = (MIN_CUT_TOKENS, spans.len()); // fits(lo), !fits(hi)
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if fits(mid)? {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let cut = spans[lo - 1].1;
            parts.push(passage(a.passage, n, hit, &hit.text[..cut]));
            sources.push(Source { n, doc_id: hit.doc_id.clone(), chunk: hit.chunk, title: hit.title.clone(), cut: true });
        }
        break;
    }
    let text = prompt(a.prompt, &parts, question);
    let tokens = splitter.count(&text)?;
    Ok(Prompt { text, sources, tokens })
}
