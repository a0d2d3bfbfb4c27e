//! Kiln models: what a checkpoint *is*. The Llama decoder, its named sizes, tokenizers,
//! Hugging Face-layout checkpoints, initialisation and generation.

pub mod attention;
pub mod checkpoint;
pub mod cpu_kernels;
pub mod generate;
pub mod init;
pub mod llama;
pub mod loss;
pub mod presets;
pub mod registry;
pub mod tokenizer;

pub use llama::{Llama, LlamaConfig};
pub use tokenizer::Tokenizer;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("checkpoint {}: {message}\n  hint: {hint}", path.display())]
    Checkpoint { path: PathBuf, message: String, hint: String },
    #[error("weights: missing tensor '{0}'")]
    MissingTensor(String),
    #[error("weights: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape { name: String, got: Vec<usize>, expected: Vec<usize> },
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        ModelError::Io { path: path.into(), message: message.to_string() }
    }
}
