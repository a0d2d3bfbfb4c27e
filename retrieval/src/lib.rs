//! kiln-retrieval: the retrieval-augmented module's library. Corpora are read as documents
//! (`corpus.rs`), cut into chunks of about N tokens on sentence boundaries with their offsets
//! (`chunk.rs`), indexed on disk with a manifest that says what built the index (`index.rs`,
//! `manifest.rs`), and searched through one [`Retriever`] trait: BM25 through tantivy
//! (`bm25.rs`), dense retrieval over a model's embeddings with an HNSW graph for large indexes
//! (`dense.rs`, `ann.rs`), and reciprocal-rank fusion of the two (`fusion.rs`). Retrieved passages
//! become a prompt within a token budget (`prompt.rs`) and RAFT training examples (`raft.rs`).

pub mod ann;
pub mod bm25;
pub mod chunk;
pub mod corpus;
pub mod dense;
pub mod fusion;
pub mod index;
pub mod manifest;
pub mod prompt;
pub mod raft;
pub mod retriever;

pub use chunk::{Chunk, ChunkSpec, Splitter};
pub use corpus::Document;
pub use dense::Embedder;
pub use fusion::Fusion;
pub use index::{Index, Kind};
pub use retriever::{Hit, Retriever};
