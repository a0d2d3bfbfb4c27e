//! Perplexity and bits per byte of a text (or JSONL `text` field) file.
//!
//! Bits per byte is normalised by UTF-8 bytes, so models with different tokenizers compare.
//! Texts longer than the context are scored with a sliding window: windows of `context` tokens
//! every `stride` tokens, each token scored once, with as much left context as the window gives.

use std::path::PathBuf;

use crate::{EvalError, Scorer, Task, TaskResult};

pub struct Bpb {
    pub path: PathBuf,
    /// Score only from this fraction of the file on (0.9: the last 10%, Kiln's validation split).
    /// For JSONL, a fraction of the documents.
    pub from: f64,
    /// Tokens between window starts; 0 means half the context.
    pub stride: usize,
}

impl Bpb {
    pub fn new(path: PathBuf) -> Self {
        Self { path, from: 0.0, stride: 0 }
    }
}

/// Total negative log-likelihood (nats) of `tokens` after a BOS, and how many tokens were scored.
/// Windows scored per forward pass.
const BATCH: usize = 16;

pub fn sliding_nll(lm: &mut dyn Scorer, bos: u32, tokens: &[u32], stride: usize) -> (f64, usize) {
    let ctx = lm.context();
    let stride = if stride == 0 { (ctx / 2).max(1) } else { stride.min(ctx) };
    let mut seq = Vec::with_capacity(tokens.len() + 1);
    seq.push(bos);
    seq.extend_from_slice(tokens);
    // Window [begin, end] scores positions (prev_end, end]; position p is predicted from seq[..p].
    let mut windows = Vec::new();
    let (mut prev_end, mut begin) = (0, 0);
    while prev_end < seq.len() - 1 {
        let end = (begin + ctx).min(seq.len() - 1);
        windows.push((begin, end, prev_end));
        prev_end = end;
        begin += stride; // stride <= ctx, so the next window still reaches back to prev_end
    }
    let (mut nll, mut scored) = (0.0, 0usize);
    for chunk in windows.chunks(BATCH) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&(b, e, _)| seq[b..=e].to_vec()).collect();
        for (lp, &(b, e, prev)) in lm.logprobs(&seqs).iter().zip(chunk) {
            // lp[j] scores seq[b + 1 + j]
            for p in prev + 1..=e {
                nll -= lp[p - b - 1];
                scored += 1;
            }
        }
    }
    (nll, scored)
}

impl Task for Bpb {
    fn files(&self) -> Vec<&std::path::Path> {
        vec![self.path.as_path()]
    }
    fn name(&self) -> String {
        "bpb".into()
    }
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| EvalError::Data(format!("{}: {e}", self.path.display())))?;
        let docs: Vec<String> = if self.path.extension().is_some_and(|e| e == "jsonl") {
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("text")?.as_str().map(str::to_string))
                        .ok_or_else(|| EvalError::Data(format!("{}:{}: no string 'text' field", self.path.display(), i + 1)))
                })
                .collect::<Result<_, _>>()?
        } else {
            let mut cut = (text.len() as f64 * self.from) as usize;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            vec![text[cut..].to_string()]
        };
        let docs = if self.path.extension().is_some_and(|e| e == "jsonl") {
            let skip = (docs.len() as f64 * self.from) as usize;
            docs[skip..].to_vec()
        } else {
            docs
        };
        let (mut nll, mut tokens, mut bytes) = (0.0, 0usize, 0usize);
        for d in &docs {
            let ids = lm.tokenizer().encode(d).map_err(|e| EvalError::Data(e.to_string()))?;
            let bos = lm.tokenizer().bos_id;
            let (n, s) = sliding_nll(lm, bos, &ids, self.stride);
            nll += n;
            tokens += s;
            bytes += d.len();
        }
        let mut r = TaskResult { n: docs.len(), ..Default::default() };
        r.metrics.insert("bpb".into(), nll / std::f64::consts::LN_2 / bytes.max(1) as f64);
        r.metrics.insert("perplexity".into(), (nll / tokens.max(1) as f64).exp());
        r.metrics.insert("tokens".into(), tokens as f64);
        r.metrics.insert("bytes".into(), bytes as f64);
        let part = if self.from > 0.0 { format!(", from {:.0}% on", self.from * 100.0) } else { String::new() };
        r.notes.push(format!("{}{part} ({} bytes, {} tokens)", self.path.display(), bytes, tokens));
        Ok(r)
    }
}
