//! Kiln models: what a checkpoint *is*. The Llama decoder, its named sizes, tokenizers,
//! Hugging Face-layout checkpoints, initialisation and generation.

pub mod attention;
pub mod chat;
pub mod contrastive;
pub mod embed;
pub mod checkpoint;
pub mod cpu_kernels;
pub mod generate;
pub mod gguf;
pub mod hf_config;
pub mod init;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod lora_dropout;
pub mod lora_params;
pub mod loss;
pub mod norm;
pub mod params;
pub mod presets;
pub mod registry;
pub mod rope;
pub mod skip;
pub mod swiglu;
pub mod tokenizer;
pub mod vocab_pad;

pub use llama::{Llama, LlamaConfig};
pub use tokenizer::Tokenizer;

use std::path::PathBuf;

/// Registers Kiln's fused ops (attention.rs, loss.rs, norm.rs, swiglu.rs, linear.rs) for `Autodiff<B, C>`
/// (and the forward passes alone for `B`, used by evaluation), in `registry.rs`'s table.
pub fn register_fused_ops<B: burn::tensor::backend::Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>() {
    attention::register_autodiff::<B, C>();
    loss::register_autodiff::<B, C>();
    norm::register_autodiff::<B, C>();
    swiglu::register_autodiff::<B, C>();
    rope::register_autodiff::<B, C>();
    linear::register_autodiff::<B, C>();
}

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

/// Reads a whole file that must be a regular file of at most `max` bytes: a FIFO, a device or a
/// link to one (which would block, or never end) and an oversized file are errors naming it.
pub fn read_regular(path: &std::path::Path, max: u64) -> Result<Vec<u8>, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::io(path, "not a regular file (a FIFO, a device or a folder); Kiln reads model files only from regular files"));
    }
    if meta.len() > max {
        return Err(ModelError::io(path, format!("{} bytes, more than the {max} this file may have", meta.len())));
    }
    std::fs::read(path).map_err(|e| ModelError::io(path, e))
}
