//! `kiln chat`: a multi-turn conversation with a model, rendered by its chat template, streamed
//! token by token, stopping at the end-of-turn token. `--prompt` answers once and exits.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use kiln_models::chat::{stop_ids, ChatTemplate, Message};
use kiln_models::generate::{Generator, SampleOptions};
use kiln_models::Tokenizer;
use kiln_recipes::{DeviceSpec, Precision};
use kiln_trainer::engine::{generator, EngineKind};

use super::{resolve_device, Sampling};

#[derive(clap::Args)]
pub struct Args {
    /// A run (its final/ model, else its newest checkpoint), a model folder, a .gguf file, or hf://org/model.
    model: PathBuf,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Answer this one message, print the reply and exit (no interactive session).
    #[arg(long)]
    prompt: Option<String>,
    /// The chat template: the model's own (default, or ChatML where it has none), "chatml", or a .jinja file.
    #[arg(long)]
    template: Option<String>,
    /// The most tokens a reply may have.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[command(flatten)]
    sampling: Sampling,
    /// Compute device: auto, cpu, ndarray, wgpu[:N], cuda[:N].
    #[arg(long)]
    device: Option<DeviceSpec>,
}

pub(super) struct Session<'a, B: Backend> {
    pub gen: Generator<'a, B>,
    pub tok: &'a Tokenizer,
    pub chat: ChatTemplate,
    pub options: SampleOptions,
}

impl<B: Backend> Session<'_, B> {
    /// The assistant's reply to `messages`, printed as it is generated.
    pub fn reply(&mut self, messages: &[Message], out: &mut impl Write) -> Result<String> {
        let prompt = self.chat.prompt_ids(self.tok, messages)?;
        let stops = self.options.stop.clone();
        let mut ids: Vec<u32> = Vec::new();
        let mut shown = 0;
        let mut failed = None;
        self.gen.run(&[prompt], &self.options, 1, &mut |_, t| {
            if stops.contains(&t) {
                return false;
            }
            ids.push(t);
            // Print what decodes completely so far (a multi-byte character may span tokens).
            match self.tok.decode(&ids) {
                Ok(text) if !text.ends_with('\u{fffd}') && text.len() >= shown => {
                    let r = out.write_all(text[shown..].as_bytes()).and_then(|_| out.flush());
                    shown = text.len();
                    r.map_err(|e| failed = Some(e)).is_ok()
                }
                _ => true,
            }
        });
        if let Some(e) = failed {
            return Err(e).context("writing the reply");
        }
        let text = self.tok.decode(&ids)?;
        out.write_all(text.get(shown..).unwrap_or("").as_bytes())?;
        writeln!(out)?;
        Ok(text)
    }
}

pub fn run(a: Args) -> Result<()> {
    let be = resolve_device(a.device.unwrap_or(DeviceSpec::Auto))?;
    let engine = EngineKind::choose(&be, Precision::F32, true);
    let dir = kiln_trainer::run_dir::model_dir(&a.model)?;
    kiln_trainer::with_backend!(be, B, device, {
        type I = <B as AutodiffBackend>::InnerBackend;
        let (m, cfg, tok) = kiln_models::checkpoint::load::<I>(&dir, &device)?;
        let source = match a.template.as_deref() {
            None => None,
            Some("chatml") => Some(kiln_models::chat::CHATML.to_string()),
            Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("--template {f}: cannot read it\n  hint: \"chatml\" or a .jinja file"))?),
        };
        let chat = ChatTemplate::new(&tok, source.as_deref())?;
        let options = SampleOptions { max_tokens: a.max_tokens, temperature: a.temperature, top_k: a.sampling.top_k, top_p: a.sampling.top_p, seed: a.sampling.seed, stop: stop_ids(&tok) };
        let gen = generator(&m, &cfg, engine, kiln_trainer::plan::threads(), &device)?;
        let mut s = Session::<I> { gen, tok: &tok, chat, options };
        let opening: Vec<Message> = a.system.iter().map(|t| Message::new("system", t)).collect();
        let mut stdout = std::io::stdout();
        if let Some(p) = &a.prompt {
            let mut msgs = opening.clone();
            msgs.push(Message::new("user", p));
            s.reply(&msgs, &mut stdout)?;
            return Ok(());
        }
        eprintln!("chatting with {} ({} parameters); /reset starts over, /exit (or Ctrl-D) ends", dir.display(), cfg.num_params());
        let mut msgs = opening.clone();
        let stdin = std::io::stdin();
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 {
                break;
            }
            match line.trim() {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    msgs = opening.clone();
                    eprintln!("(conversation reset)");
                    continue;
                }
                text => msgs.push(Message::new("user", text)),
            }
            let reply = s.reply(&msgs, &mut stdout)?;
            msgs.push(Message::new("assistant", &reply));
        }
    });
    Ok(())
}
