//! `kiln export`: a run's model in the Hugging Face layout, ready for `from_pretrained` and the Hub:
//! weights (f32 or bf16, sharded above a size), `config.json`, `generation_config.json`,
//! `tokenizer.json`, `tokenizer_config.json` and a `README.md` model card whose front matter carries
//! the run's eval results (`model-index`) and its energy (`co2_eq_emissions`).

use std::path::Path;

use anyhow::{Context, Result};
use kiln_models::checkpoint::{self, hf_config_json, read_config, write_atomically, write_weights, SafetensorsSource, StoreDtype};
use kiln_models::Tokenizer;
use serde_json::{json, Value};

use crate::report::Report;

pub struct ExportOptions {
    pub dtype: StoreDtype,
    pub max_shard_bytes: usize,
    pub license: String,
}

fn q(s: &str) -> String {
    // A JSON string is a valid YAML double-quoted scalar.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Writes `out` from the model folder `model` (a run's final/ or a checkpoint), a GGUF file
/// (de-quantized to f32), or a LoRA adapter folder (merged into its base). `run` is the run directory, when there is one, for the model card.
/// `out` must not exist.
pub fn export(model: &Path, run: Option<&Path>, out: &Path, o: &ExportOptions) -> Result<()> {
    let (cfg, tok, tensors, files) = if kiln_models::lora::is_adapter_dir(model) {
        // A LoRA adapter: its base with the adapter merged in.
        kiln_models::lora::merged_hf_tensors(model)?
    } else if checkpoint::is_gguf(model) {
        let (c, t, ts) = kiln_models::gguf::hf_tensors(model)?;
        (c, t, ts, model.to_path_buf())
    } else {
        (read_config(&model.join(checkpoint::CONFIG))?, Tokenizer::load(&model.join(checkpoint::TOKENIZER))?, SafetensorsSource::open_dir(model)?.into_tensors(), model.to_path_buf())
    };
    let report = run.and_then(|r| crate::report::Report::load(r).ok());
    let manifest = run.and_then(|r| read_json(&r.join("manifest.json")));
    let plan = run.and_then(|r| std::fs::read_to_string(r.join("plan.toml")).ok());
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    write_atomically(out, |tmp| {
        let io = |p: &Path, e: std::io::Error| kiln_models::ModelError::io(p, e);
        let js = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
        write_weights(tmp, &tensors, o.dtype, o.max_shard_bytes)?;
        let mut c = hf_config_json(&cfg);
        c["torch_dtype"] = o.dtype.torch_name().into();
        c["dtype"] = o.dtype.torch_name().into();
        std::fs::write(tmp.join("config.json"), js(&c)).map_err(|e| io(tmp, e))?;
        let gen = json!({
            "_from_model_config": true,
            "bos_token_id": tok.bos_id, "eos_token_id": eos_ids(&tok), "pad_token_id": tok.pad_id,
            "do_sample": true, "temperature": 0.8,
        });
        std::fs::write(tmp.join("generation_config.json"), js(&gen)).map_err(|e| io(tmp, e))?;
        tok.save(&tmp.join("tokenizer.json"))?;
        let t = |id: u32| tok.id_to_token(id).unwrap_or_default();
        let tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": t(tok.bos_id), "eos_token": t(tok.eos_id), "pad_token": t(tok.pad_id),
            "model_max_length": cfg.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        });
        let mut tc = tc;
        if let Some(t) = tok.chat_template.clone().or_else(|| chat_template(&files, manifest.as_ref())) {
            tc["chat_template"] = t.into();
        }
        std::fs::write(tmp.join("tokenizer_config.json"), js(&tc)).map_err(|e| io(tmp, e))?;
        let card = model_card(&name, Some(&cfg), o, report.as_ref(), manifest.as_ref(), plan.as_deref());
        std::fs::write(tmp.join("README.md"), card).map_err(|e| io(tmp, e))
    })
    .with_context(|| format!("exporting to {}", out.display()))
}

/// Writes `out` from the LoRA adapter folder `adapter` (a LoRA run's final/ or checkpoint): the
/// adapter in PEFT's format, as `PeftModel.from_pretrained(base, out)` loads it, and a model card
/// naming its base model (`base_model`) with the run's scores and energy. `out` must not exist.
pub fn export_adapter(adapter: &Path, run: Option<&Path>, out: &Path, o: &ExportOptions) -> Result<()> {
    let a = kiln_models::lora::Adapter::read_dir(adapter)?;
    let report = run.and_then(|r| crate::report::Report::load(r).ok());
    let manifest = run.and_then(|r| read_json(&r.join("manifest.json")));
    let plan = run.and_then(|r| std::fs::read_to_string(r.join("plan.toml")).ok());
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
    write_atomically(out, |tmp| {
        a.write_files(tmp)?;
        let full = model_card(&name, None, o, report.as_ref(), manifest.as_ref(), plan.as_deref());
        let card = adapter_card(&name, &a, &full);
        std::fs::write(tmp.join("README.md"), card).map_err(|e| kiln_models::ModelError::io(tmp, e))
    })
    .with_context(|| format!("exporting to {}", out.display()))
}

/// The model card of an adapter: `library_name: peft`, `base_model`, how to load it, the spec,
/// then the full card's scores, energy and recipe sections (`full`).
fn adapter_card(name: &str, a: &kiln_models::lora::Adapter, full: &str) -> String {
    let s = &a.spec;
    let base = &a.base;
    // The full card's front matter, with peft as the library and the base named.
    let front = full.split("\n---\n").next().unwrap_or("---").replacen("library_name: transformers", "library_name: peft", 1);
    let mut y = format!("{front}\nbase_model: {}\n---\n\n", q(base));
    y = y.replacen("tags:\n- kiln\n", "tags:\n- kiln\n- lora\n- peft\n", 1).replacen("training_type: pre-training", "training_type: fine-tuning", 1);
    y += &format!(
        "# {name}\n\nA LoRA adapter for [{base}]({base}) trained with [Kiln](https://github.com/) (Rust, Burn). It loads in PEFT:\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\nbase = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"{name}\")\n```\n\n"
    );
    y += &format!(
        "## Adapter\n\nRank {}, alpha {} (scale {:.4}{}), on {}: {} projections, {} parameters.\n\n",
        s.rank, s.alpha, s.scaling(), if s.rslora { ", rsLoRA" } else { "" }, s.targets.join(", "), a.pairs.len(),
        a.pairs.values().map(|p| p.a.len() + p.b.len()).sum::<usize>()
    );
    if let Some(i) = full.find("## Training") {
        y += &full[i..];
    }
    y
}

/// `generation_config.json`'s EOS: the tokenizer's, or with a chat template's end-of-turn token
/// too, the list of them (what `generate` stops at).
fn eos_ids(tok: &Tokenizer) -> Value {
    let ids = kiln_models::chat::stop_ids(tok);
    if tok.chat_template.is_some() && ids.len() > 1 {
        json!(ids)
    } else {
        json!(tok.eos_id)
    }
}

/// The chat template an instruction-tuned model came with: from the model folder's own
/// `tokenizer_config.json`, else from the folder the run started from (`init`), so that a
/// fine-tuned chat model keeps its template through export.
fn chat_template(model: &Path, manifest: Option<&Value>) -> Option<String> {
    let from = |dir: &Path| read_json(&dir.join("tokenizer_config.json"))?["chat_template"].as_str().map(str::to_string);
    from(model).or_else(|| from(Path::new(manifest?["init"].as_str()?)))
}

fn model_card(name: &str, cfg: Option<&kiln_models::LlamaConfig>, o: &ExportOptions, rep: Option<&Report>, man: Option<&Value>, plan: Option<&str>) -> String {
    let mut y = String::from("---\n");
    y += &format!("license: {}\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- kiln\n- llama\n", q(&o.license));
    let datasets: Vec<String> = man
        .and_then(|m| m["data"].as_array())
        .map(|a| a.iter().filter_map(|d| d["source"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if !datasets.is_empty() {
        y += "datasets:\n";
        for d in &datasets {
            y += &format!("- {}\n", q(d.trim_start_matches("hf://datasets/")));
        }
    }
    if let Some(r) = rep {
        let mut metrics = vec![
            ("val_loss".to_string(), "validation loss".to_string(), r.quality.val_loss),
            ("val_bpb".to_string(), "validation bits per byte".to_string(), r.quality.val_bpb),
        ];
        for (task, m) in &r.evals {
            for (k, v) in &m.metrics {
                if let (true, Some(v)) = (["acc", "acc_norm", "bpb", "perplexity", "em", "f1"].contains(&k.as_str()), v) {
                    metrics.push((format!("{task}_{k}"), format!("{task} {k}"), *v));
                }
            }
        }
        metrics.retain(|m| m.2.is_finite());
        if !metrics.is_empty() {
            y += &format!("model-index:\n- name: {}\n  results:\n  - task:\n      type: text-generation\n      name: Text Generation\n", q(name));
            let ds = datasets.first().cloned().unwrap_or_else(|| "training data".into());
            y += &format!("    dataset:\n      name: {}\n      type: {}\n    metrics:\n", q(&ds), q(&ds));
            for (k, label, v) in metrics {
                y += &format!("    - type: {}\n      name: {}\n      value: {v}\n", q(&k), q(&label));
            }
        }
        let e = &r.energy;
        let hw = format!("{} ({} backend, {} threads)", man.and_then(|m| m["host"].as_str()).unwrap_or("unknown host"), r.backend, r.threads);
        y += &format!(
            "co2_eq_emissions:\n  emissions: {}\n  source: {}\n  training_type: pre-training\n  hardware_used: {}\n",
            e.gco2e,
            q(&format!("Kiln energy meter ({}, {}), {:.0} J at {} gCO2e/kWh", e.method, e.coverage, e.joules, e.grid_gco2_per_kwh)),
            q(&hw)
        );
    }
    y += "---\n\n";
    y += &format!("# {name}\n\nA Llama-style decoder trained with [Kiln](https://github.com/) (Rust, Burn). It loads in `transformers` as `LlamaForCausalLM`:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained(\"{name}\")\ntokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n```\n\n");
    if let Some(cfg) = cfg {
        y += &format!(
            "## Model\n\n{} parameters: {} layers, hidden size {}, {} attention heads ({} key/value heads), SwiGLU {}, context {}, vocabulary {}. Weights in {}.\n\n",
            cfg.num_params(), cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings, cfg.vocab_size, o.dtype.torch_name()
        );
    }
    if let Some(r) = rep {
        let t = &r.throughput;
        y += &format!(
            "## Training\n\n{} steps, {} tokens, {:.0} s of wall time on {} ({} threads). Stopped by: {}.\n\n",
            r.steps, t.tokens, t.wall_s, r.backend, r.threads, r.stop_reason
        );
        y += &format!("## Scores\n\nValidation loss {:.4} nats/token, {:.4} bits per byte.\n\n", r.quality.val_loss, r.quality.val_bpb);
        if !r.evals.is_empty() {
            y += &kiln_evals::evals_markdown(&r.evals);
            y += "\n";
        }
        let e = &r.energy;
        y += &format!(
            "## Energy\n\n{:.1} J ({:.6} kWh), {:.3e} J per token, {:.3} gCO2e. Method: **{}** ({}).\n\n",
            e.joules, e.kwh, e.j_per_token, e.gco2e, e.method, e.coverage
        );
    }
    if let Some(p) = plan {
        y += &format!("## Recipe\n\n```toml\n{p}```\n");
    }
    y
}
