//! The data pipeline. Pretraining: sources -> documents -> tokenizer -> cached token shards ->
//! windows. SFT: sources -> records -> conversations -> chat template and loss masks -> padded
//! batches.

pub mod conversations;
pub mod corpus;
pub mod loader;
pub mod packing;
pub mod pairs;
pub mod raft;
pub mod records;
pub mod sft;
pub mod shards;
pub mod sources;
