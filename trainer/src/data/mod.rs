//! The data pipeline: sources -> documents -> tokenizer -> cached token shards -> batches.

pub mod corpus;
pub mod loader;
pub mod shards;
pub mod sources;
