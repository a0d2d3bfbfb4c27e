//! LoRA adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`, as
//! `PeftModel.from_pretrained(base, dir)` loads them and `PeftModel.save_pretrained` writes them.
//!
//! An adapted projection `y = x·Wᵀ` (Hugging Face's `[out, in]` weight) becomes
//! `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with `A` `[r, in]`, `B` `[out, r]` and `s = alpha / r`
//! (`alpha / √r` with rsLoRA). A fresh adapter has `A` Kaiming-uniform, as PEFT draws it
//! (`U(−1/√in, 1/√in)`), and `B = 0`, so it starts as the base model exactly.
//!
//! Tensor names are PEFT's: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`;
//! names with only `base_model.` or no prefix (transformers' own adapter saving) are read too.
//! [`Merged`] is a [`WeightSource`] that adds `s·B·A` to the base's weights as they load, for
//! evaluating, chatting with or exporting a merged model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::checkpoint::{read_safetensors, write_safetensors_streamed, TensorList};
use crate::llama::{LlamaConfig, WeightSource};
use crate::ModelError;

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";

/// The projections an adapter may target, by PEFT's module names.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Rank, scale and targets of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// A subset of [`TARGETS`], in [`TARGETS`]' order.
    pub targets: Vec<String>,
    /// rsLoRA: scale by `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
}

impl LoraSpec {
    /// `targets` may hold module names of [`TARGETS`] or `"all-linear"`.
    pub fn new(rank: usize, alpha: f64, dropout: f64, targets: &[String]) -> Result<Self, ModelError> {
        let bad = |m: String| Err(ModelError::Config(format!("LoRA: {m}")));
        if rank == 0 {
            return bad("rank must be at least 1".into());
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return bad(format!("alpha must be a positive number, not {alpha}"));
        }
        if !(0.0..1.0).contains(&dropout) {
            return bad(format!("dropout must be in [0, 1), not {dropout}"));
        }
        if targets.is_empty() {
            return bad(format!("no targets; name some of {} or \"all-linear\"", TARGETS.join(", ")));
        }
        let all = targets.iter().any(|t| t == "all-linear");
        for t in targets {
            if t != "all-linear" && !TARGETS.contains(&t.as_str()) {
                return bad(format!("unknown target '{t}'; the targets are {} or \"all-linear\"", TARGETS.join(", ")));
            }
        }
        let targets = TARGETS.iter().filter(|m| all || targets.iter().any(|t| t == *m)).map(|m| m.to_string()).collect();
        Ok(Self { rank, alpha, dropout, targets, rslora: false })
    }

    /// The trainable parameters of this spec's adapters on `cfg`: `r·(in + out)` per adapted
    /// projection.
    pub fn params(&self, cfg: &LlamaConfig) -> usize {
        let per_layer: usize = self.targets.iter().filter_map(|t| module_dims(cfg, t)).map(|(i, o)| self.rank * (i + o)).sum();
        per_layer * cfg.num_hidden_layers
    }

    /// The factor `s` of `s·B·A`.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// `(in, out)` of a target projection of `cfg`.
pub fn module_dims(cfg: &LlamaConfig, target: &str) -> Option<(usize, usize)> {
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.num_key_value_heads * cfg.head_dim());
    Some(match target {
        "q_proj" => (d, q),
        "k_proj" | "v_proj" => (d, kv),
        "o_proj" => (q, d),
        "gate_proj" | "up_proj" => (d, f),
        "down_proj" => (f, d),
        _ => return None,
    })
}

/// The Hugging Face module path of target `m` in layer `i`: `model.layers.{i}.self_attn.q_proj`.
pub fn module_path(i: usize, m: &str) -> String {
    let block = if matches!(m, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("model.layers.{i}.{block}.{m}")
}

/// One adapted projection: `A` `[r, in]` and `B` `[out, r]`, row-major (PEFT's layouts).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub d_in: usize,
    pub d_out: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// An adapter: its spec, the base it was made for, and one [`Pair`] per adapted projection,
/// keyed by module path ([`module_path`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub spec: LoraSpec,
    /// `base_model_name_or_path`: a folder, a .gguf file or a Hub id.
    pub base: String,
    pub pairs: BTreeMap<String, Pair>,
}

impl Adapter {
    /// A fresh adapter for `cfg`: `A` Kaiming-uniform (PEFT's `kaiming_uniform_(a=√5)`, that is
    /// `U(−1/√in, 1/√in)`) from Kiln's seeded RNG, `B = 0`.
    pub fn init(spec: LoraSpec, base: String, cfg: &LlamaConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for i in 0..cfg.num_hidden_layers {
            for m in &spec.targets {
                let Some((d_in, d_out)) = module_dims(cfg, m) else { continue };
                let bound = 1.0 / (d_in as f32).sqrt();
                let a = (0..spec.rank * d_in).map(|_| rng.random_range(-bound..bound)).collect();
                pairs.insert(module_path(i, m), Pair { d_in, d_out, a, b: vec![0.0; d_out * spec.rank] });
            }
        }
        Self { spec, base, pairs }
    }

    /// `s·B·A`, `[out, in]`, for module `path`, if it is adapted.
    pub fn delta(&self, path: &str) -> Option<Vec<f32>> {
        let p = self.pairs.get(path)?;
        let (r, s) = (self.spec.rank, self.spec.scaling() as f32);
        let mut out = vec![0.0f32; p.d_out * p.d_in];
        for o in 0..p.d_out {
            let row = &mut out[o * p.d_in..(o + 1) * p.d_in];
            for k in 0..r {
                let bk = s * p.b[o * r + k];
                if bk != 0.0 {
                    row.iter_mut().zip(&p.a[k * p.d_in..(k + 1) * p.d_in]).for_each(|(y, &a)| *y += bk * a);
                }
            }
        }
        Some(out)
    }

    /// Whether this adapter fits `cfg`: every pair a projection of one of its layers, with its
    /// shapes. The error names the tensor and says what differs.
    pub fn check(&self, cfg: &LlamaConfig, dir: &Path) -> Result<(), ModelError> {
        let mismatch = |message: String| ModelError::Checkpoint {
            path: dir.join(WEIGHTS),
            message,
            hint: format!("this adapter was made for another base model ({}); load it on that one", if self.base.is_empty() { "not named" } else { &self.base }),
        };
        for (path, p) in &self.pairs {
            let (layer, m) = parse_path(path).ok_or_else(|| mismatch(format!("'{path}' is not a projection Kiln adapts")))?;
            if layer >= cfg.num_hidden_layers {
                return Err(mismatch(format!("'{path}': the base model has {} layers", cfg.num_hidden_layers)));
            }
            let Some((d_in, d_out)) = module_dims(cfg, m) else { return Err(mismatch(format!("'{path}' is not a projection Kiln adapts"))) };
            if (p.d_in, p.d_out) != (d_in, d_out) {
                return Err(mismatch(format!("'{path}' adapts a [{}, {}] weight ([out, in]); the base's is [{d_out}, {d_in}]", p.d_out, p.d_in)));
            }
        }
        Ok(())
    }

    /// Reads an adapter folder. Refuses what Kiln cannot apply exactly: another `peft_type`,
    /// DoRA, biases, `rank_pattern`/`alpha_pattern`, `modules_to_save`, `fan_in_fan_out`.
    pub fn read_dir(dir: &Path) -> Result<Self, ModelError> {
        let cfg_path = dir.join(CONFIG);
        let bytes = crate::read_regular(&cfg_path, 1 << 20)?;
        let c: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| ModelError::io(&cfg_path, format!("not valid JSON: {e}")))?;
        let refuse = |message: String, hint: &str| ModelError::Checkpoint { path: cfg_path.clone(), message, hint: hint.into() };
        match c.get("peft_type").and_then(|v| v.as_str()) {
            Some("LORA") => {}
            Some(t) => return Err(refuse(format!("peft_type is \"{t}\""), "Kiln reads LoRA adapters (peft_type \"LORA\") only")),
            None => return Err(refuse("no \"peft_type\"".into(), "an adapter_config.json written by PEFT has \"peft_type\": \"LORA\"")),
        }
        let truthy = |k: &str| c.get(k).is_some_and(|v| v.as_bool() == Some(true));
        let nonempty = |k: &str| c.get(k).is_some_and(|v| !(v.is_null() || v.as_object().is_some_and(|o| o.is_empty()) || v.as_array().is_some_and(|a| a.is_empty())));
        for (key, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out"), ("lora_bias", "LoRA biases")] {
            if truthy(key) {
                return Err(refuse(format!("{what} (\"{key}\": true) is not supported"), "train the adapter as plain LoRA"));
            }
        }
        for key in ["rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layer_replication", "alora_invocation_tokens"] {
            if nonempty(key) {
                return Err(refuse(format!("\"{key}\" is set; Kiln applies one rank and alpha to whole layers' projections"), "train the adapter without it"));
            }
        }
        if c.get("bias").and_then(|v| v.as_str()).is_some_and(|b| b != "none") {
            return Err(refuse("\"bias\" is not \"none\"".into(), "train the adapter with bias = \"none\""));
        }
        let num = |k: &str| c.get(k).and_then(|v| v.as_f64());
        let rank = c.get("r").and_then(|v| v.as_u64()).ok_or_else(|| refuse("\"r\" is missing or not a whole number".into(), "PEFT writes the rank as \"r\", e.g. 16"))? as usize;
        let alpha = num("lora_alpha").ok_or_else(|| refuse("no \"lora_alpha\"".into(), "PEFT writes \"lora_alpha\""))?;
        let dropout = num("lora_dropout").unwrap_or(0.0);
        let targets: Vec<String> = match c.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            Some(serde_json::Value::String(s)) if s == "all-linear" => vec![s.clone()],
            _ => return Err(refuse("\"target_modules\" is not a list of module names".into(), "list the projections, e.g. [\"q_proj\", \"v_proj\"]")),
        };
        let mut spec = LoraSpec::new(rank, alpha, dropout, &targets).map_err(|e| refuse(e.to_string(), "fix adapter_config.json"))?;
        spec.rslora = truthy("use_rslora");
        let base = c.get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or_default().to_string();

        let wpath = dir.join(WEIGHTS);
        let tensors = read_safetensors(&wpath)?;
        let bad = |message: String| ModelError::Checkpoint { path: wpath.clone(), message, hint: "the adapter's weights do not match its adapter_config.json".into() };
        let mut a_b: BTreeMap<String, (Option<(Vec<usize>, Vec<f32>)>, Option<(Vec<usize>, Vec<f32>)>)> = BTreeMap::new();
        for (name, t) in tensors {
            if name.contains("lora_magnitude_vector") {
                return Err(refuse(format!("'{name}' is a DoRA magnitude"), "Kiln reads plain LoRA adapters"));
            }
            let bare = name.strip_prefix("base_model.model.").or_else(|| name.strip_prefix("base_model.")).unwrap_or(&name);
            let (module, which) = if let Some(m) = bare.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = bare.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                return Err(bad(format!("'{name}' is neither a lora_A nor a lora_B weight")));
            };
            let module = if module.starts_with("layers.") { format!("model.{module}") } else { module.to_string() };
            let e = a_b.entry(module).or_default();
            if which == 0 {
                e.0 = Some(t);
            } else {
                e.1 = Some(t);
            }
        }
        let mut pairs = BTreeMap::new();
        for (module, (a, b)) in a_b {
            let (Some((sa, a)), Some((sb, b))) = (a, b) else { return Err(bad(format!("'{module}' has only one of lora_A and lora_B"))) };
            let (&[ra, d_in], &[d_out, rb]) = (sa.as_slice(), sb.as_slice()) else {
                return Err(bad(format!("'{module}': lora_A is {sa:?} and lora_B {sb:?}; they must be [r, in] and [out, r]")));
            };
            if ra != spec.rank || rb != spec.rank {
                return Err(bad(format!("'{module}': lora_A is {sa:?} and lora_B {sb:?}, but r is {}", spec.rank)));
            }
            let Some((_, m)) = parse_path(&module) else { return Err(bad(format!("'{module}' is not a projection Kiln adapts"))) };
            if !spec.targets.iter().any(|t| t == m) {
                return Err(bad(format!("'{module}' is not among target_modules {:?}", spec.targets)));
            }
            pairs.insert(module, Pair { d_in, d_out, a, b });
        }
        if pairs.is_empty() {
            return Err(bad("no lora_A/lora_B tensors".into()));
        }
        Ok(Self { spec, base, pairs })
    }

    /// Writes `adapter_config.json` (the keys every PEFT version from 0.13 reads) and
    /// `adapter_model.safetensors` (PEFT's names) into an existing folder.
    pub fn write_files(&self, dir: &Path) -> Result<(), ModelError> {
        let s = &self.spec;
        let config = json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": s.alpha,
            "lora_dropout": s.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": s.rank,
            "rank_pattern": {},
            "revision": null,
            "target_modules": s.targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": s.rslora,
        });
        let text = serde_json::to_string_pretty(&config).map_err(|e| ModelError::io(dir.join(CONFIG), e))?;
        std::fs::write(dir.join(CONFIG), text).map_err(|e| ModelError::io(dir.join(CONFIG), e))?;
        let entries: Vec<(&String, &Pair)> = self.pairs.iter().collect();
        let mut specs = Vec::new();
        for (path, p) in &entries {
            specs.push((format!("base_model.model.{path}.lora_A.weight"), vec![s.rank, p.d_in]));
            specs.push((format!("base_model.model.{path}.lora_B.weight"), vec![p.d_out, s.rank]));
        }
        let list = TensorList { specs, values: Box::new(|i| if i % 2 == 0 { entries[i / 2].1.a.clone() } else { entries[i / 2].1.b.clone() }) };
        write_safetensors_streamed(&dir.join(WEIGHTS), &list, &[])
    }

    /// [`Adapter::write_files`] into a new folder, atomically.
    pub fn save_dir(&self, dir: &Path) -> Result<(), ModelError> {
        crate::checkpoint::write_atomically(dir, |tmp| self.write_files(tmp))
    }
}

/// `(layer, module)` of `model.layers.{i}.{self_attn|mlp}.{module}`.
fn parse_path(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let (block, m) = rest.split_once('.')?;
    let ok = match block {
        "self_attn" => matches!(m, "q_proj" | "k_proj" | "v_proj" | "o_proj"),
        "mlp" => matches!(m, "gate_proj" | "up_proj" | "down_proj"),
        _ => false,
    };
    ok.then_some((i.parse().ok()?, m))
}

/// Whether `dir` holds an adapter: an `adapter_config.json` and no `config.json` (a full model
/// folder that also ships an adapter's config loads as the full model).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG).is_file() && !dir.join(crate::checkpoint::CONFIG).is_file()
}

/// The base model an adapter folder names, as a local path: absolute, or relative to the
/// adapter folder, or to the working directory. `None` where it names none that exists here
/// (a Hub id, for instance).
pub fn local_base(dir: &Path, adapter: &Adapter) -> Option<PathBuf> {
    if adapter.base.is_empty() {
        return None;
    }
    let b = Path::new(&adapter.base);
    [dir.join(b), b.to_path_buf()].into_iter().find(|p| p.exists())
}

/// The base's weights with `s·B·A` added to every adapted projection as it loads.
pub struct Merged {
    pub inner: Box<dyn WeightSource>,
    pub adapter: Adapter,
}

impl WeightSource for Merged {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let mut w = self.inner.get(name, shape)?; // [out, in]
        let Some(module) = name.strip_suffix(".weight") else { return Ok(w) };
        let Some(p) = self.adapter.pairs.get(module) else { return Ok(w) };
        if p.d_out * p.d_in != w.len() {
            return Err(ModelError::Shape { name: format!("{module} (the adapter's)"), got: vec![p.d_out, p.d_in], expected: shape.to_vec() });
        }
        if let Some(delta) = self.adapter.delta(module) {
            w.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
        }
        Ok(w)
    }
}

/// The base model of the adapter in `dir` ([`local_base`]), or an error saying what to do.
pub fn base_of(dir: &Path, adapter: &Adapter) -> Result<PathBuf, ModelError> {
    if let Some(b) = local_base(dir, adapter).filter(|b| is_adapter_dir(b)) {
        return Err(ModelError::Checkpoint {
            path: dir.join(CONFIG),
            message: format!("its base model {} is itself an adapter", b.display()),
            hint: "name the base model the adapters were trained on; to stack adapters, export the first one merged (`kiln export ADAPTER --merge`) and name that".into(),
        });
    }
    local_base(dir, adapter).ok_or_else(|| ModelError::Checkpoint {
        path: dir.join(CONFIG),
        message: match adapter.base.as_str() {
            "" => "names no base model (\"base_model_name_or_path\" is empty)".into(),
            b => format!("its base model \"{b}\" is not a model folder or .gguf file here"),
        },
        hint: "set \"base_model_name_or_path\" to the base model's folder or .gguf file (absolute, or relative to the adapter folder)".into(),
    })
}

/// Loads the adapter in `dir` merged into its base model (`s·B·A` added to each adapted
/// projection), with the base's config and tokenizer.
pub fn load<B: burn::tensor::backend::Backend>(dir: &Path, device: &B::Device) -> Result<(crate::Llama<B>, LlamaConfig, crate::Tokenizer), ModelError> {
    let (mut src, cfg, tok) = merged_source(dir)?;
    let model = crate::Llama::build(&cfg, &mut src, device)?;
    Ok((model, cfg, tok))
}

/// The weights of the adapter in `dir` merged into its base, checked against the base's config
/// (which comes with its tokenizer).
pub fn merged_source(dir: &Path) -> Result<(Merged, LlamaConfig, crate::Tokenizer), ModelError> {
    let adapter = Adapter::read_dir(dir)?;
    let base = base_of(dir, &adapter)?;
    let (cfg, tok) = crate::checkpoint::read_meta(&base)?;
    adapter.check(&cfg, dir)?;
    Ok((Merged { inner: crate::checkpoint::weight_source(&base)?, adapter }, cfg, tok))
}

/// The adapter in `dir` merged into its base, as Hugging Face tensors (`[out, in]`, sorted by
/// name), with the base's config and tokenizer and the base's path (`kiln export --merge`).
pub fn merged_hf_tensors(dir: &Path) -> Result<(LlamaConfig, crate::Tokenizer, Vec<crate::checkpoint::HostTensor>, PathBuf), ModelError> {
    use crate::checkpoint::{is_gguf, read_config, SafetensorsSource};
    let adapter = Adapter::read_dir(dir)?;
    let base = base_of(dir, &adapter)?;
    let (cfg, tok, mut tensors) = if is_gguf(&base) {
        crate::gguf::hf_tensors(&base)?
    } else {
        (read_config(&base.join(crate::checkpoint::CONFIG))?, crate::Tokenizer::load(&base.join(crate::checkpoint::TOKENIZER))?, SafetensorsSource::open_dir(&base)?.into_tensors())
    };
    adapter.check(&cfg, dir)?;
    let mut merged = 0;
    for (name, shape, values) in tensors.iter_mut() {
        let Some(delta) = name.strip_suffix(".weight").and_then(|m| adapter.delta(m)) else { continue };
        if delta.len() != values.len() {
            return Err(ModelError::Shape { name: name.clone(), got: shape.clone(), expected: vec![delta.len()] });
        }
        values.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
        merged += 1;
    }
    if merged != adapter.pairs.len() {
        return Err(ModelError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("{} of the adapter's {} projections found in the base's weights", merged, adapter.pairs.len()),
            hint: "the base model's weights are not named as a Llama's".into(),
        });
    }
    Ok((cfg, tok, tensors, base))
}
