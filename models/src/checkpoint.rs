//! Checkpoints in Hugging Face layout: `model.safetensors` (tensor names and `[out, in]`
//! layouts of `LlamaForCausalLM`, metadata `format = pt`), `config.json` and `tokenizer.json`.
//!
//! This is the one writer of model folders: the run's `final/`, every training checkpoint's
//! weights, and `kiln export` all go through [`save_dir`] (or [`save_weights_dir`], from
//! weights that are not in a Burn model). Weights are written one tensor at a time
//! ([`write_safetensors_streamed`]), so writing never holds a second copy of the model. A
//! folder is written under a temporary name and renamed into place, and an existing folder is
//! never overwritten.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::json;

use crate::llama::{Llama, LlamaConfig, WeightSource};
use crate::params::{visit_base, VisitNamed};
use crate::tokenizer::Tokenizer;
use crate::ModelError;

pub use crate::hf_config::{hf_config_json, read_config};

pub const WEIGHTS: &str = "model.safetensors";
pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// A host-side tensor: name, shape, f32 values (row-major).
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

/// Tensors to write, each produced when its turn comes ([`write_safetensors_streamed`]), so that
/// writing a model or an optimizer's state holds one tensor's copy at a time, not the whole
/// model's twice over.
pub struct TensorList<'a> {
    /// Names and shapes, in the order they are written.
    pub specs: Vec<(String, Vec<usize>)>,
    /// The values of `specs[i]`, row-major.
    pub values: Box<dyn Fn(usize) -> Vec<f32> + 'a>,
}

impl<'a> TensorList<'a> {
    /// A list over tensors already in memory.
    pub fn from_host(tensors: Vec<HostTensor>) -> TensorList<'static> {
        let specs = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
        TensorList { specs, values: Box::new(move |i| tensors[i].2.clone()) }
    }

    /// A model's parameters (the base's, without adapters), by Hugging Face name, in Burn's
    /// layout (`[in, out]`); each is read from the backend when written.
    pub fn model<B: Backend>(model: &'a Llama<B>) -> Self {
        struct Specs(Vec<(String, Vec<usize>)>);
        impl<B: Backend> VisitNamed<B> for Specs {
            fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
                self.0.push((name.to_string(), param.shape().to_vec()));
            }
        }
        /// The values of the `want`-th parameter.
        struct Nth {
            want: usize,
            seen: usize,
            out: Vec<f32>,
        }
        impl<B: Backend> VisitNamed<B> for Nth {
            fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
                if self.seen == self.want {
                    self.out = param.val().into_data().convert::<f32>().to_vec().unwrap_or_default();
                }
                self.seen += 1;
            }
        }
        let mut specs = Specs(Vec::new());
        visit_base(model, &mut specs);
        let values = move |want| {
            let mut nth = Nth { want, seen: 0, out: Vec::new() };
            visit_base(model, &mut nth);
            nth.out
        };
        Self { specs: specs.0, values: Box::new(values) }
    }

    /// The same tensors in Hugging Face layout (linear weights `[out, in]`).
    pub fn hf_layout(self) -> Self {
        let specs = self.specs.iter().map(|(n, s)| (n.clone(), hf_shape(n, s))).collect();
        let (names, inner) = (self.specs, self.values);
        Self { specs, values: Box::new(move |i| to_hf_layout(names[i].0.clone(), names[i].1.clone(), inner(i)).2) }
    }
}

/// Collects every parameter as a host tensor, by name.
struct Collect {
    out: Vec<HostTensor>,
    hf_layout: bool,
}

impl<B: Backend> VisitNamed<B> for Collect {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let values: Vec<f32> = t.into_data().convert::<f32>().to_vec().unwrap_or_default();
        let name = name.to_string();
        self.out.push(if self.hf_layout { to_hf_layout(name, shape, values) } else { (name, shape, values) });
    }
}

/// The Hugging Face shape of a parameter of Burn shape `shape` (see [`to_hf_layout`]).
fn hf_shape(name: &str, shape: &[usize]) -> Vec<usize> {
    match shape {
        [r, c] if name != "model.embed_tokens.weight" => vec![*c, *r],
        _ => shape.to_vec(),
    }
}

/// Linear weights are held `[in, out]`; Hugging Face stores `[out, in]`.
fn to_hf_layout(name: String, shape: Vec<usize>, values: Vec<f32>) -> HostTensor {
    if shape.len() != 2 || name == "model.embed_tokens.weight" {
        return (name, shape, values);
    }
    let (r, c) = (shape[0], shape[1]);
    let mut t = vec![0.0f32; values.len()];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = values[i * c + j];
        }
    }
    (name, vec![c, r], t)
}

/// Every parameter of the base model (adapters aside), by Hugging Face name, in Hugging Face layout.
pub fn hf_tensors<B: Backend>(model: &Llama<B>) -> Vec<HostTensor> {
    let mut c = Collect { out: Vec::new(), hf_layout: true };
    visit_base(model, &mut c);
    c.out
}

/// Every parameter of the base model (adapters aside), by Hugging Face name, in Burn's layout (`[in, out]`).
pub fn burn_tensors<B: Backend>(model: &Llama<B>) -> Vec<HostTensor> {
    let mut c = Collect { out: Vec::new(), hf_layout: false };
    visit_base(model, &mut c);
    c.out
}

/// Each base parameter's Hugging Face name and element count (adapters aside), without copying weights.
pub fn param_sizes<B: Backend>(model: &Llama<B>) -> HashMap<String, usize> {
    struct Sizes(HashMap<String, usize>);
    impl<B: Backend> VisitNamed<B> for Sizes {
        fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>) {
            self.0.insert(name.to_string(), param.shape().num_elements());
        }
    }
    let mut s = Sizes(HashMap::new());
    visit_base(model, &mut s);
    s.0
}

/// The dtype weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    BF16,
}

impl StoreDtype {
    pub fn bytes(&self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::BF16 => 2,
        }
    }
    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(&self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::BF16 => "bfloat16",
        }
    }
}

/// f32 -> bf16 with round-to-nearest-even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Writes f32 tensors to a safetensors file, with `format = pt` metadata (which `transformers`
/// requires) plus any extra metadata.
pub fn write_safetensors(path: &Path, tensors: &[HostTensor], extra: &[(&str, String)]) -> Result<(), ModelError> {
    write_safetensors_as(path, tensors, StoreDtype::F32, extra)
}

/// [`write_safetensors`] in a chosen dtype.
pub fn write_safetensors_as(path: &Path, tensors: &[HostTensor], dtype: StoreDtype, extra: &[(&str, String)]) -> Result<(), ModelError> {
    // Nothing is ever saved from a diverged state: a NaN or an infinity names its tensor instead.
    if let Some((name, _, v)) = tensors.iter().find(|t| t.2.iter().any(|x| !x.is_finite())) {
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        return Err(ModelError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("'{name}' has {bad} non-finite value(s) (NaN or infinity); nothing was written"),
            hint: "the training diverged: lower optim.lr, raise optim.warmup_steps or set optim.grad_clip".into(),
        });
    }
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| match dtype {
            StoreDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            StoreDtype::BF16 => v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect(),
        })
        .collect();
    let st_dtype = match dtype {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::BF16 => Dtype::BF16,
    };
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(st_dtype, shape.clone(), b)
            .map_err(|e| ModelError::io(path.to_path_buf(), format!("tensor {name}: {e}")))?;
        views.push((name.clone(), view));
    }
    let mut meta: HashMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    meta.insert("format".into(), "pt".into());
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| ModelError::io(path, e))
}

/// Writes `tensors` as an f32 safetensors file (metadata `format = pt` plus `extra`), one
/// tensor at a time. A tensor with a NaN or an infinity stops the write with an error naming
/// it (callers write into a temporary folder, so nothing half-written is kept).
pub fn write_safetensors_streamed(path: &Path, tensors: &TensorList, extra: &[(&str, String)]) -> Result<(), ModelError> {
    use std::io::Write;
    let io = |e: std::io::Error| ModelError::io(path, e);
    let mut header = serde_json::Map::new();
    let mut meta: serde_json::Map<String, serde_json::Value> = extra.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    meta.insert("format".into(), json!("pt"));
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut at = 0usize;
    for (name, shape) in &tensors.specs {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(name.clone(), json!({ "dtype": "F32", "shape": shape, "data_offsets": [at, at + bytes] }));
        at += bytes;
    }
    let mut text = serde_json::to_string(&header).map_err(|e| ModelError::io(path, e.to_string()))?;
    // The data begins 8-byte aligned, as the safetensors crate writes it.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(text.as_bytes()).map_err(io)?;
    for (i, (name, shape)) in tensors.specs.iter().enumerate() {
        let values = (tensors.values)(i);
        if values.len() != shape.iter().product::<usize>() {
            return Err(ModelError::io(path, format!("tensor {name}: {} values for shape {shape:?}", values.len())));
        }
        let bad = values.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(ModelError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("'{name}' has {bad} non-finite value(s) (NaN or infinity); the file is incomplete and is not kept"),
                hint: "the training diverged: lower optim.lr, raise optim.warmup_steps or set optim.grad_clip".into(),
            });
        }
        for chunk in values.chunks(1 << 14) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            out.write_all(&bytes).map_err(io)?;
        }
    }
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
}

/// Reads every tensor of a safetensors file as f32. A truncated or corrupt file is an error.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, (Vec<usize>, Vec<f32>)>, ModelError> {
    let bytes = crate::read_regular(path, u64::MAX)?;
    let corrupt = |m: String| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: m,
        hint: "the file is truncated or corrupt; use an earlier checkpoint (checkpoints/step-*) or re-export it".into(),
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(format!("cannot read safetensors: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            other => return Err(corrupt(format!("tensor {name} has dtype {other:?}; expected F32, BF16 or F16"))),
        };
        if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
            return Err(corrupt(format!("tensor {name} holds {bad} (weights must be finite numbers)")));
        }
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Weights read from a safetensors file, handed out by name with a shape check.
pub struct SafetensorsSource {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl SafetensorsSource {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        Ok(Self { tensors: read_safetensors(path)? })
    }

    /// Every tensor, sorted by name.
    pub fn into_tensors(self) -> Vec<HostTensor> {
        let mut v: Vec<HostTensor> = self.tensors.into_iter().map(|(n, (s, x))| (n, s, x)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The weights of a model folder: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join(WEIGHTS);
        let index = dir.join(INDEX);
        if single.is_file() || !index.is_file() {
            return Self::open(&single);
        }
        let text = String::from_utf8(crate::read_regular(&index, 64 << 20)?).map_err(|e| ModelError::io(&index, e))?;
        let bad = |m: String| ModelError::Checkpoint { path: index.clone(), message: m, hint: "re-export the model".into() };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map = v["weight_map"].as_object().ok_or_else(|| bad("no weight_map".into()))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let mut tensors = HashMap::new();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(bad(format!("shard name '{f}' is not a plain file name")));
            }
            tensors.extend(read_safetensors(&dir.join(f))?);
        }
        for name in map.keys() {
            if !tensors.contains_key(name) {
                return Err(bad(format!("'{name}' is listed but in no shard")));
            }
        }
        Ok(Self { tensors })
    }
}

pub const INDEX: &str = "model.safetensors.index.json";

/// Writes weights as `model.safetensors`, or, when they exceed `max_shard_bytes`, as
/// `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json` (the layout
/// `transformers` writes).
pub fn write_weights(dir: &Path, tensors: &[HostTensor], dtype: StoreDtype, max_shard_bytes: usize) -> Result<(), ModelError> {
    let size = |t: &HostTensor| t.2.len() * dtype.bytes();
    let total: usize = tensors.iter().map(size).sum();
    if total <= max_shard_bytes {
        return write_safetensors_as(&dir.join(WEIGHTS), tensors, dtype, &[]);
    }
    let mut shards: Vec<Vec<HostTensor>> = vec![Vec::new()];
    let mut used = 0;
    for t in tensors {
        if used > 0 && used + size(t) > max_shard_bytes {
            shards.push(Vec::new());
            used = 0;
        }
        used += size(t);
        if let Some(last) = shards.last_mut() {
            last.push(t.clone());
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_safetensors_as(&dir.join(&file), shard, dtype, &[])?;
        for t in shard {
            weight_map.insert(t.0.clone(), file.clone().into());
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).map_err(|e| ModelError::Config(e.to_string()))?;
    std::fs::write(dir.join(INDEX), text).map_err(|e| ModelError::io(dir.join(INDEX), e))
}

impl WeightSource for SafetensorsSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (got, values) = self.tensors.remove(name).ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        if got != shape {
            return Err(ModelError::Shape { name: name.into(), got, expected: shape.to_vec() });
        }
        Ok(values)
    }
}

/// Writes `dir` as a Hugging Face model folder (weights, config, tokenizer), atomically:
/// everything goes to a temporary sibling, which is renamed to `dir` at the end.
/// Refuses to overwrite an existing `dir`.
pub fn save_dir<B: Backend>(dir: &Path, model: &Llama<B>, cfg: &LlamaConfig, tok: &Tokenizer) -> Result<(), ModelError> {
    write_atomically(dir, |tmp| write_model_files(tmp, model, cfg, tok))
}

/// [`save_dir`] from parameters in Burn's layout and names, one tensor at a time.
pub fn save_weights_dir(dir: &Path, weights: TensorList, cfg: &LlamaConfig, tok: &Tokenizer) -> Result<(), ModelError> {
    write_atomically(dir, |tmp| write_weight_files(tmp, weights, cfg, tok))
}

/// Writes `model.safetensors`, `config.json` and `tokenizer.json` into an existing folder.
pub fn write_model_files<B: Backend>(dir: &Path, model: &Llama<B>, cfg: &LlamaConfig, tok: &Tokenizer) -> Result<(), ModelError> {
    write_weight_files(dir, TensorList::model(model), cfg, tok)
}

/// [`write_model_files`] from parameters in Burn's layout and names, one tensor at a time.
pub fn write_weight_files(dir: &Path, weights: TensorList, cfg: &LlamaConfig, tok: &Tokenizer) -> Result<(), ModelError> {
    write_safetensors_streamed(&dir.join(WEIGHTS), &weights.hf_layout(), &[])?;
    let cfg_json = serde_json::to_string_pretty(&hf_config_json(cfg)).map_err(|e| ModelError::Config(e.to_string()))?;
    std::fs::write(dir.join(CONFIG), cfg_json).map_err(|e| ModelError::io(dir.join(CONFIG), e))?;
    tok.save(&dir.join(TOKENIZER))
}

/// Runs `fill` on a fresh temporary folder beside `dir`, then renames it to `dir`.
/// An existing `dir` is an error and is left untouched.
pub fn write_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<(), ModelError>) -> Result<(), ModelError> {
    if dir.exists() {
        return Err(ModelError::Checkpoint {
            path: dir.to_path_buf(),
            message: "already exists".into(),
            hint: "Kiln never overwrites a checkpoint in place; choose another folder or remove it yourself".into(),
        });
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "ckpt".into());
    let tmp: PathBuf = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |p: &Path, e: std::io::Error| ModelError::io(p, e);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Loads a model: a Hugging Face-layout folder, a GGUF file, or a LoRA adapter folder (merged
/// into the base model it names, see `lora.rs`).
pub fn load<B: Backend>(path: &Path, device: &B::Device) -> Result<(Llama<B>, LlamaConfig, Tokenizer), ModelError> {
    if crate::lora::is_adapter_dir(path) {
        return crate::lora::load(path, device);
    }
    if is_gguf(path) {
        crate::gguf::load(path, device)
    } else {
        load_dir(path, device)
    }
}

/// A model's config and tokenizer, without its weights.
pub fn read_meta(path: &Path) -> Result<(LlamaConfig, Tokenizer), ModelError> {
    if crate::lora::is_adapter_dir(path) {
        let adapter = crate::lora::Adapter::read_dir(path)?;
        return read_meta(&crate::lora::base_of(path, &adapter)?);
    }
    if is_gguf(path) {
        return crate::gguf::read_meta(path);
    }
    let tok = Tokenizer::load(&path.join(TOKENIZER))?;
    let cfg = read_config(&path.join(CONFIG))?;
    check_tokenizer(&tok, &cfg, path)?;
    Ok((cfg, tok))
}

/// A model's weights by Hugging Face name: a folder's safetensors, a GGUF file's tensors, or an
/// adapter folder's base with the adapter merged in.
pub fn weight_source(path: &Path) -> Result<Box<dyn WeightSource>, ModelError> {
    if crate::lora::is_adapter_dir(path) {
        return Ok(Box::new(crate::lora::merged_source(path)?.0));
    }
    Ok(if is_gguf(path) { Box::new(crate::gguf::GgufSource::new(crate::gguf::GgufFile::open(path)?)) } else { Box::new(SafetensorsSource::open_dir(path)?) })
}

/// Loads a Hugging Face-layout model folder.
pub fn load_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<(Llama<B>, LlamaConfig, Tokenizer), ModelError> {
    let cfg = read_config(&dir.join(CONFIG))?;
    let tok = Tokenizer::load(&dir.join(TOKENIZER))?;
    check_tokenizer(&tok, &cfg, dir)?;
    let mut src = SafetensorsSource::open_dir(dir)?;
    // A tied model reads no head: one stored with other values would be dropped without a word.
    let (head, embed) = (src.tensors.get("lm_head.weight"), src.tensors.get("model.embed_tokens.weight"));
    if let (true, Some(h), Some(e)) = (cfg.tie_word_embeddings, head, embed) {
        if h != e {
            return Err(ModelError::Checkpoint {
                path: dir.join(CONFIG),
                message: "tie_word_embeddings is true, but the weights hold an lm_head.weight that differs from the embedding".into(),
                hint: "set \"tie_word_embeddings\": false in config.json to use the stored head".into(),
            });
        }
    }
    let model = Llama::build(&cfg, &mut src, device).map_err(|e| ModelError::Checkpoint {
        path: dir.join(WEIGHTS),
        message: e.to_string(),
        hint: "the weights do not match config.json".into(),
    })?;
    Ok((model, cfg, tok))
}

/// The tokenizer's ids must all be rows of the embedding: a larger tokenizer would index past it.
pub fn check_tokenizer(tok: &Tokenizer, cfg: &LlamaConfig, dir: &Path) -> Result<(), ModelError> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(ModelError::Checkpoint {
            path: dir.join(TOKENIZER),
            message: format!("the tokenizer has {} tokens, more than the model's vocabulary of {}", tok.vocab_size(), cfg.vocab_size),
            hint: "the tokenizer and config.json come from different models; copy the tokenizer that belongs to these weights".into(),
        });
    }
    Ok(())
}
