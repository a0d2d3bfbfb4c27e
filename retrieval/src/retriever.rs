//! The one interface every retriever gives: the `k` best passages for a query, best first.

use anyhow::Result;
use serde::Serialize;

/// A retrieved passage: which document and chunk, its score under the retriever that found it,
/// and its text with its offsets in the document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub doc_id: String,
    pub chunk: u32,
    pub score: f32,
    pub title: Option<String>,
    pub text: String,
    pub start: usize,
    pub end: usize,
}

pub trait Retriever: Send + Sync {
    /// The `k` best passages for `query`, best first (fewer if the index has fewer).
    fn retrieve(&self, query: &str, k: usize) -> Result<Vec<Hit>>;

    /// What kind of retriever this is (`bm25`, `dense`, `hybrid`), for reports.
    fn kind(&self) -> &'static str;
}
