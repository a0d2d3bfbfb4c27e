//! `kiln generate`: continue prompts with a KV cache. On the CPU the fused kernels generate many
//! prompts at once (continuous batching); elsewhere Burn's model, one prompt after the other.
//! `--chat` renders each prompt as a user turn through the model's chat template.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use kiln_models::chat::{stop_ids, ChatTemplate, Message};
use kiln_models::generate::SampleOptions;
use kiln_recipes::{DeviceSpec, Precision};
use kiln_trainer::engine::{generator, EngineKind};

use super::{resolve_device, Sampling};

#[derive(clap::Args)]
pub struct Args {
    /// A run (its final/ model, else its newest checkpoint), a model folder, a .gguf file, or hf://org/model.
    model: PathBuf,
    /// A prompt to continue; repeat the flag for several (generated together).
    #[arg(long)]
    prompt: Vec<String>,
    /// A file of prompts, one a line (blank lines skipped), after any --prompt.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Each prompt is a user message, rendered by the model's chat template; generation stops at
    /// the end of the assistant's turn.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before each prompt.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[command(flatten)]
    sampling: Sampling,
    /// The most sequences generated at once (CPU kernels).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// text: each prompt and its continuation; json: one {"prompt", "completion", "tokens"} a line.
    #[arg(long, default_value = "text")]
    format: String,
    /// Compute device: auto, cpu, ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    device: Option<DeviceSpec>,
}

pub fn run(a: Args) -> Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(f) = &a.prompts {
        let text = std::fs::read_to_string(f).with_context(|| format!("--prompts {}: cannot read it", f.display()))?;
        prompts.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    if prompts.is_empty() {
        prompts.push(String::new());
    }
    let json = match a.format.as_str() {
        "text" => false,
        "json" => true,
        other => bail!("--format {other}: expected text or json"),
    };
    if a.system.is_some() && !a.chat {
        bail!("--system applies to chat prompts\n  hint: add --chat");
    }
    let be = resolve_device(a.device.unwrap_or(DeviceSpec::Auto))?;
    let engine = EngineKind::choose(&be, Precision::F32, true);
    let threads = kiln_trainer::plan::threads();
    let dir = kiln_trainer::run_dir::model_dir(&a.model)?;
    kiln_trainer::with_backend!(be, B, device, {
        let (m, cfg, tok) = kiln_models::checkpoint::load::<<B as AutodiffBackend>::InnerBackend>(&dir, &device)?;
        let (ids, stop) = if a.chat {
            let chat = ChatTemplate::new(&tok, None)?;
            let ids = prompts
                .iter()
                .map(|p| {
                    let mut msgs: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
                    msgs.push(Message::new("user", p));
                    chat.prompt_ids(&tok, &msgs)
                })
                .collect::<Result<Vec<_>, _>>()?;
            (ids, stop_ids(&tok))
        } else {
            let ids = prompts
                .iter()
                .map(|p| {
                    let mut ids = vec![tok.bos_id];
                    ids.extend(tok.encode(p)?);
                    Ok(ids)
                })
                .collect::<Result<Vec<_>>>()?;
            (ids, vec![tok.eos_id])
        };
        let o = SampleOptions { max_tokens: a.max_tokens, temperature: a.temperature, top_k: a.sampling.top_k, top_p: a.sampling.top_p, seed: a.sampling.seed, stop: stop.clone() };
        let gen = generator(&m, &cfg, engine, threads, &device)?;
        // One prompt as text streams to the terminal; several are printed in order at the end.
        let stream = prompts.len() == 1 && !json;
        let mut stdout = std::io::stdout();
        if stream {
            print!("{}", if a.chat { "" } else { prompts[0].as_str() });
        }
        let (mut shown, mut so_far) = (0usize, Vec::new());
        let t0 = Instant::now();
        let outs = gen.run(&ids, &o, a.batch, &mut |_, t| {
            if stream && !stop.contains(&t) {
                so_far.push(t);
                if let Ok(text) = tok.decode(&so_far) {
                    if !text.ends_with('\u{fffd}') && text.len() >= shown {
                        let _ = stdout.write_all(text[shown..].as_bytes()).and_then(|_| stdout.flush());
                        shown = text.len();
                    }
                }
            }
            true
        });
        let secs = t0.elapsed().as_secs_f64();
        let new_tokens: usize = outs.iter().map(Vec::len).sum();
        let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
        for (p, out) in prompts.iter().zip(&outs) {
            let body: Vec<u32> = out.iter().copied().filter(|t| !stop.contains(t)).collect();
            let text = tok.decode(&body)?;
            if json {
                println!("{}", serde_json::json!({"prompt": p, "completion": text, "tokens": out.len()}));
            } else if stream {
                println!("{}", text.get(shown..).unwrap_or(""));
            } else {
                println!("{}{}\n", if a.chat { String::new() } else { p.clone() }, text);
            }
        }
        eprintln!(
            "{} prompt(s), {prompt_tokens} prompt tokens, {new_tokens} new tokens in {secs:.2} s ({:.1} new tokens/s; {})",
            prompts.len(),
            new_tokens as f64 / secs.max(1e-9),
            if gen.batched() { format!("CPU kernels, {threads} threads, up to {} sequences at once", a.batch.max(1)) } else { format!("Burn on {}, one sequence at a time", be.backend()) },
        );
    });
    Ok(())
}
