//! A Kiln model as dense retrieval's [`Embedder`]: texts tokenized by the model's tokenizer,
//! cut at [`EMBED_CONTEXT`] tokens, and embedded by `kiln_models::embed::Encoder` (mean-pooled,
//! unit-length final hidden states) on the CPU kernels where the device is the CPU, else on
//! Burn's model. Also where an index is opened with the model it needs ([`open_index`]).

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use kiln_models::embed::Encoder;
use kiln_models::Tokenizer;
use kiln_recipes::{DeviceSpec, Precision};
use kiln_retrieval::{Embedder, Index, Kind};

use crate::device::Device;
use crate::engine::EngineKind;

/// The most tokens of a text that are embedded.
pub const EMBED_CONTEXT: usize = 512;

pub struct ModelEmbedder<B: Backend> {
    enc: Mutex<Encoder<B>>,
    tok: Tokenizer,
    name: String,
    dim: usize,
}

impl<B: Backend> Embedder for ModelEmbedder<B> {
    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<f32>> {
        let mut seqs = Vec::with_capacity(texts.len());
        for t in texts {
            let mut ids = self.tok.encode(t)?;
            ids.truncate(EMBED_CONTEXT);
            if ids.is_empty() {
                ids.push(self.tok.eos_id);
            }
            seqs.push(ids);
        }
        let enc = self.enc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(enc.encode(&seqs))
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// `model` (a run, a model or adapter folder, a .gguf file, or hf://org/model) loaded to embed
/// texts on `device` (the CPU kernels on the CPU).
pub fn load(model: &Path, device: &Device) -> Result<Arc<dyn Embedder>> {
    let dir = crate::run_dir::model_dir(model)?;
    let engine = EngineKind::choose(device, Precision::F32, true);
    let name = model.display().to_string();
    let threads = crate::plan::threads();
    crate::with_backend!(device, B, d, {
        type I = <B as AutodiffBackend>::InnerBackend;
        let (m, cfg, tok) = kiln_models::checkpoint::load::<I>(&dir, &d).with_context(|| format!("loading the embedding model {name}"))?;
        let context = EMBED_CONTEXT.min(cfg.max_position_embeddings);
        let enc = match engine {
            EngineKind::CpuKernels => Encoder::kernels(m, &cfg, context, threads, &d)?,
            EngineKind::Graph => Encoder::burn(m, &cfg, context, &d),
        };
        let dim = enc.dim;
        Ok(Arc::new(ModelEmbedder::<I> { enc: Mutex::new(enc), tok, name, dim }))
    })
}

/// The index at `dir`, answering as `kind` (else its own kind), with its embedding model
/// attached when it needs one: `embed`, else the model the manifest names. `exact`: dense
/// search checks every vector even where there is an HNSW graph.
pub fn open_index(dir: &Path, kind: Option<Kind>, embed: Option<&Path>, exact: bool, device: Option<DeviceSpec>) -> Result<Index> {
    let mut index = Index::open(dir)?;
    if let Some(k) = kind {
        index.set_kind(k, exact)?;
    } else if exact {
        index.set_kind(index.kind(), exact)?;
    }
    if index.kind() != Kind::Bm25 {
        let model = match (embed, index.embedding_model()) {
            (Some(m), _) => m.to_path_buf(),
            (None, Some(m)) => std::path::PathBuf::from(m),
            (None, None) => unreachable!("a dense index has a model"),
        };
        let device = crate::device::resolve(device.unwrap_or(DeviceSpec::Cpu))?;
        let e = load(&model, &device).with_context(|| format!("index {}: its queries are embedded by {}\n  hint: pass --embed MODEL if the model moved", dir.display(), model.display()))?;
        index.attach(e)?;
    }
    Ok(index)
}
