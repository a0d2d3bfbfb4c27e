//! `kiln generate`: sample from a model with a KV cache.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use kiln_models::generate::{generate, SampleOptions};
use kiln_recipes::DeviceSpec;

use super::resolve_device;

#[derive(clap::Args)]
pub struct Args {
    model: PathBuf,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute device: auto, cpu, ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    device: Option<DeviceSpec>,
}

pub fn run(a: Args) -> Result<()> {
    let be = resolve_device(a.device.unwrap_or(DeviceSpec::Auto))?;
    let dir = kiln_trainer::run_dir::model_dir(&a.model)?;
    kiln_trainer::with_backend!(be, B, device, {
        let (m, cfg, tok) = kiln_models::checkpoint::load::<<B as AutodiffBackend>::InnerBackend>(&dir, &device)?;
        let mut ids = vec![tok.bos_id];
        ids.extend(tok.encode(&a.prompt)?);
        let o = SampleOptions { max_tokens: a.max_tokens, temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed, stop: vec![tok.eos_id] };
        let out = generate(&m, cfg.max_position_embeddings, &ids, &o, &device);
        println!("{}{}", a.prompt, tok.decode(&out)?);
    });
    Ok(())
}
