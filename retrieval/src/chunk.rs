//! Chunking: each document cut into passages of at most `tokens` tokens that end on sentence
//! boundaries where one is in reach, consecutive passages sharing about `overlap` tokens (whole
//! sentences where possible). Each chunk keeps its document's id and its byte offsets in the
//! document's text, so that an answer can cite exactly what it read: `text == doc.text[start..end]`.
//!
//! Tokens are the [`Splitter`]'s: a model's tokenizer (`tokenizer.json`), or `words` (runs of
//! letters and digits, and each other visible character alone), which needs no model.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::corpus::Document;

/// How long chunks are and how much consecutive chunks share, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpec {
    pub tokens: usize,
    pub overlap: usize,
}

impl ChunkSpec {
    pub fn new(tokens: usize, overlap: usize) -> Result<Self> {
        if tokens == 0 {
            bail!("--chunk-tokens must be at least 1");
        }
        if overlap >= tokens {
            bail!("--overlap ({overlap}) must be less than --chunk-tokens ({tokens}): each chunk must move on");
        }
        Ok(Self { tokens, overlap })
    }
}

impl Default for ChunkSpec {
    fn default() -> Self {
        Self { tokens: 256, overlap: 32 }
    }
}

/// What counts as a token when chunking.
pub enum Splitter {
    /// Runs of alphanumeric characters, and every other non-space character on its own.
    Words,
    /// A model's tokenizer, with the name the manifest records (`tokenizer:<sha256 prefix>`).
    Model(Box<kiln_models::Tokenizer>, String),
}

impl Splitter {
    /// A model's tokenizer; its name is the hash of its serialized form.
    pub fn model(tok: kiln_models::Tokenizer) -> Result<Self> {
        use sha2::{Digest, Sha256};
        let json = tok.to_json()?;
        let name = format!("tokenizer:{}", &hex::encode(Sha256::digest(json.as_bytes()))[..16]);
        Ok(Splitter::Model(Box::new(tok), name))
    }

    /// The name the manifest records.
    pub fn name(&self) -> String {
        match self {
            Splitter::Words => "words".into(),
            Splitter::Model(_, n) => n.clone(),
        }
    }

    /// Each token's byte range in `text`, in order.
    pub fn spans(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        match self {
            Splitter::Words => Ok(word_spans(text)),
            Splitter::Model(t, _) => {
                let (_, offsets) = t.encode_with_offsets(text)?;
                // Byte-level BPE can give a token an empty or repeated range; keep those that
                // cover text, in order.
                let mut out: Vec<(usize, usize)> = Vec::with_capacity(offsets.len());
                for (s, e) in offsets {
                    if e > s && out.last().is_none_or(|&(_, pe)| s >= pe) {
                        out.push((s, e));
                    }
                }
                Ok(out)
            }
        }
    }

    /// How many tokens `text` has.
    pub fn count(&self, text: &str) -> Result<usize> {
        match self {
            Splitter::Words => Ok(word_spans(text).len()),
            Splitter::Model(t, _) => Ok(t.encode(text)?.len()),
        }
    }
}

/// [`Splitter::Words`]' spans.
fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut run: Option<usize> = None;
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() {
            run.get_or_insert(i);
            continue;
        }
        if let Some(s) = run.take() {
            out.push((s, i));
        }
        if !c.is_whitespace() {
            out.push((i, i + c.len_utf8()));
        }
    }
    if let Some(s) = run {
        out.push((s, text.len()));
    }
    out
}

/// Byte positions where a sentence begins: the text's first visible character, and the first
/// visible character after `.`, `!` or `?` (and any closing quotes or brackets) and whitespace,
/// or after a blank line.
pub fn sentence_starts(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut ended = true; // at the start, or after an end of sentence and whitespace
    let mut closing = false; // after . ! ? and maybe closing marks, before whitespace
    let mut newlines = 0;
    let mut space = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if closing {
                ended = true;
                closing = false;
            }
            if c == '\n' {
                newlines += 1;
                if newlines >= 2 {
                    ended = true;
                }
            }
            space = true;
            continue;
        }
        if ended && (space || out.is_empty()) {
            out.push(i);
        }
        ended = false;
        space = false;
        newlines = 0;
        closing = matches!(c, '.' | '!' | '?' | '。') || (closing && matches!(c, '"' | '\'' | ')' | ']' | '”' | '’'));
    }
    out
}

/// One passage of a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub doc_id: String,
    /// Its place among its document's chunks, from 0.
    pub chunk: u32,
    /// Byte offsets in the document's text: `text == doc.text[start..end]`.
    pub start: usize,
    pub end: usize,
    pub title: Option<String>,
    pub text: String,
}

/// `doc` cut by `spec`, counting tokens with `splitter`. An empty document gives no chunks.
pub fn chunk_document(doc: &Document, spec: ChunkSpec, splitter: &Splitter) -> Result<Vec<Chunk>> {
    let spans = splitter.spans(&doc.text)?;
    let n = spans.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    // The token index each sentence starts at (strictly increasing, 0 first).
    let mut starts: Vec<usize> = vec![0];
    for pos in sentence_starts(&doc.text) {
        let t = spans.partition_point(|&(s, _)| s < pos);
        if t < n && t > *starts.last().unwrap_or(&0) {
            starts.push(t);
        }
    }
    let is_start = |t: usize| starts.binary_search(&t).is_ok();
    let mut out = Vec::new();
    let mut a = 0;
    loop {
        let limit = (a + spec.tokens).min(n);
        // End at the last sentence start in (a, limit], or at the limit if none (or at the end).
        let b = if limit == n {
            n
        } else {
            let i = starts.partition_point(|&s| s <= limit);
            match starts[..i].last() {
                Some(&s) if s > a => s,
                _ => limit,
            }
        };
        let (start, end) = (spans[a].0, spans[b - 1].1);
        out.push(Chunk { doc_id: doc.id.clone(), chunk: out.len() as u32, start, end, title: doc.title.clone(), text: doc.text[start..end].to_string() });
        if b == n {
            break;
        }
        // The next chunk starts at the first sentence start within `overlap` tokens before b;
        // failing that, `overlap` tokens back if b cut a sentence, else at b.
        let back = b.saturating_sub(spec.overlap);
        let i = starts.partition_point(|&s| s < back);
        let next = match starts.get(i) {
            Some(&s) if s < b && spec.overlap > 0 => s,
            _ if !is_start(b) => back,
            _ => b,
        };
        a = if next > a { next } else { b };
    }
    Ok(out)
}
