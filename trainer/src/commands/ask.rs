//! `kiln ask MODEL --index INDEX "question"`: retrieve the question's best passages, put them
//! and the question in one user turn within the token budget (passages cut, never the
//! question), answer greedily through the model's chat template, and list the sources.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use kiln_models::chat::{stop_ids, ChatTemplate, Message};
use kiln_models::generate::SampleOptions;
use kiln_recipes::{DeviceSpec, Precision};
use kiln_retrieval::prompt::{assemble, Assembly, PASSAGE_TEMPLATE, PROMPT_TEMPLATE};
use kiln_retrieval::{Retriever, Splitter};
use kiln_trainer::engine::{generator, EngineKind};

use super::chat::Session;
use super::resolve_device;

#[derive(clap::Args)]
pub struct Args {
    /// A run (its final/ model, else its newest checkpoint), a model folder, an adapter folder, a .gguf file, or hf://org/model.
    model: PathBuf,
    /// The retrieval index (`kiln index build`).
    #[arg(long)]
    index: PathBuf,
    question: String,
    /// Passages to retrieve.
    #[arg(long, default_value_t = 3)]
    k: usize,
    /// Retrieve as bm25, dense or hybrid instead of the index's own kind.
    #[arg(long)]
    kind: Option<String>,
    /// The model that embeds the question for a dense or hybrid index (default: the one the
    /// index was built with).
    #[arg(long)]
    embed: Option<PathBuf>,
    #[command(flatten)]
    fusion: super::FusionArgs,
    /// Tokens the user turn (passages and question) may take.
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    /// The most tokens the answer may have.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Print the prompt the model is given.
    #[arg(long)]
    show_prompt: bool,
    /// Compute device: auto, cpu, ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    device: Option<DeviceSpec>,
}

pub fn run(a: Args) -> Result<()> {
    let kind = a.kind.as_deref().map(kiln_retrieval::Kind::parse).transpose()?;
    let mut index = kiln_trainer::embedder::open_index(&a.index, kind, a.embed.as_deref(), false, None)?;
    index.set_fusion(a.fusion.fusion()?);
    let hits = index.retrieve(&a.question, a.k)?;
    let be = resolve_device(a.device.unwrap_or(DeviceSpec::Auto))?;
    let engine = EngineKind::choose(&be, Precision::F32, true);
    let dir = kiln_trainer::run_dir::model_dir(&a.model)?;
    kiln_trainer::with_backend!(be, B, device, {
        type I = <B as AutodiffBackend>::InnerBackend;
        let (m, cfg, tok) = kiln_models::checkpoint::load::<I>(&dir, &device)?;
        let splitter = Splitter::model(tok.clone())?;
        let prompt = assemble(&a.question, &hits, &Assembly { passage: PASSAGE_TEMPLATE, prompt: PROMPT_TEMPLATE, budget: a.budget }, &splitter)?;
        if a.show_prompt {
            eprintln!("--- prompt ({} tokens) ---\n{}\n---", prompt.tokens, prompt.text);
        }
        let chat = ChatTemplate::new(&tok, None)?;
        let options = SampleOptions { max_tokens: a.max_tokens, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, stop: stop_ids(&tok) };
        let gen = generator(&m, &cfg, engine, kiln_trainer::plan::threads(), &device)?;
        let mut s = Session::<I> { gen, tok: &tok, chat, options };
        s.reply(&[Message::new("user", &prompt.text)], &mut std::io::stdout())?;
        println!("\nsources:");
        for src in &prompt.sources {
            let h = hits.iter().find(|h| h.doc_id == src.doc_id && h.chunk == src.chunk);
            let (start, end) = h.map_or((0, 0), |h| (h.start, h.end));
            let title = src.title.as_deref().map(|t| format!(" \"{t}\"")).unwrap_or_default();
            println!("  [{}] {}{title}, chunk {}, bytes {start}..{end}{}", src.n, src.doc_id, src.chunk, if src.cut { " (cut to fit)" } else { "" });
        }
        if prompt.sources.is_empty() {
            println!("  (none: {})", if hits.is_empty() { "no passage matched the question" } else { "the budget holds only the question" });
        }
    });
    Ok(())
}
