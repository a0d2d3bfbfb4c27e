//! GGUF in: llama.cpp's single-file model format (version 2 and 3), read with bounds checks.
//!
//! A file is a header (magic `GGUF`, version, tensor and metadata counts), typed metadata
//! (`llama.*` sizes, `tokenizer.ggml.*`, `tokenizer.chat_template`), tensor descriptions (name,
//! dims innermost first, ggml type, offset) and the aligned tensor data. This file reads that
//! structure; `quant.rs` turns a tensor's blocks into f32 and `llama.rs` maps a Llama-architecture
//! file onto Kiln's decoder, tokenizer and chat template.
//!
//! Why not a crate: `ggus` 0.5 (the lightest reader on crates.io) slices the tensor data without
//! checking its length, so a truncated download panics instead of failing; `candle-core`'s reader
//! brings all of candle. Every count and offset here is checked against the file's length first.

pub mod llama;
pub mod quant;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::ModelError;

pub use llama::{hf_tensors, load, read_meta, GgufSource};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting allowed for arrays of arrays (no real file goes past 2).
const MAX_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description: `dims` innermost first (ggml's `ne`), so a Hugging Face `[out, in]`
/// weight has `dims = [in, out]`.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    /// Byte offset within the data section.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file, its bytes held in memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub meta: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

/// Cursor over the file's bytes that fails, never panics, at the end.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| format!("the file ends at byte {} inside the header (wanted {n} more bytes at {})", self.b.len(), self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// A count that must fit in what is left, at `min_size` bytes an item at least.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > left {
            return Err(format!("{what} count {n} is more than the {left} bytes left in the file can hold"));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.count(1, "string length")?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|e| format!("a string at byte {} is not UTF-8 ({e})", self.pos - n))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        let le = |s: &[u8]| {
            let mut a = [0u8; 8];
            a[..s.len()].copy_from_slice(s);
            u64::from_le_bytes(a)
        };
        Ok(match ty {
            0 => Value::Int(self.take(1)?[0] as i128),
            1 => Value::Int(self.take(1)?[0] as i8 as i128),
            2 => Value::Int(le(self.take(2)?) as u16 as i128),
            3 => Value::Int(le(self.take(2)?) as u16 as i16 as i128),
            4 => Value::Int(self.u32()? as i128),
            5 => Value::Int(self.u32()? as i32 as i128),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
                }
                let item = self.u32()?;
                let n = self.count(1, "array")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(self.u64()? as i128),
            11 => Value::Int(self.u64()? as i64 as i128),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

impl GgufFile {
    /// Reads and parses `path`: header, metadata and tensor descriptions. Tensor data is checked
    /// to lie inside the file, and is de-quantized only when asked for ([`GgufFile::tensor_f32`]).
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bytes = crate::read_regular(path, 1 << 40)?;
        Self::parse(path, bytes)
    }

    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, ModelError> {
        let bad = |m: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            message: m,
            hint: "the file is not a complete GGUF file; download it again, or convert the model with llama.cpp's convert_hf_to_gguf.py".into(),
        };
        let mut r = Reader { b: &bytes, pos: 0 };
        if r.take(4).map_err(&bad)? != MAGIC {
            return Err(bad("not a GGUF file (it does not start with the bytes GGUF)".into()));
        }
        let version = r.u32().map_err(&bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version}; Kiln reads versions 2 and 3")));
        }
        let n_tensors = r.count(24, "tensor").map_err(&bad)?;
        let n_meta = r.count(12, "metadata").map_err(&bad)?;
        let mut meta = HashMap::new();
        for _ in 0..n_meta {
            let key = r.string().map_err(&bad)?;
            let ty = r.u32().map_err(&bad)?;
            let v = r.value(ty, 0).map_err(|e| bad(format!("metadata '{key}': {e}")))?;
            if meta.insert(key.clone(), v).is_some() {
                return Err(bad(format!("metadata key '{key}' appears twice")));
            }
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string().map_err(&bad)?;
            let n_dims = r.u32().map_err(&bad)? as usize;
            if n_dims > 4 {
                return Err(bad(format!("tensor '{name}' has {n_dims} dimensions (GGUF allows at most 4)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(usize::try_from(r.u64().map_err(&bad)?).map_err(|e| bad(format!("tensor '{name}': {e}")))?);
            }
            let ggml_type = r.u32().map_err(&bad)?;
            let offset = usize::try_from(r.u64().map_err(&bad)?).map_err(|e| bad(format!("tensor '{name}': {e}")))?;
            let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("tensor '{name}': dims {dims:?} overflow")))?;
            let n_bytes = quant::byte_size(ggml_type, n).map_err(|e| bad(format!("tensor '{name}': {e}")))?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset, n_bytes });
        }
        let align = match meta.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| bad(format!("general.alignment {v:?} is not a power of two")))?,
        } as usize;
        let data_start = r.pos.div_ceil(align) * align;
        let data_len = bytes.len().saturating_sub(data_start);
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(bad(format!("tensor '{}' appears twice", t.name)));
            }
            if t.offset % align != 0 || t.offset.checked_add(t.n_bytes).is_none_or(|end| end > data_len) {
                return Err(bad(format!(
                    "tensor '{}' ({} bytes at offset {}) lies outside the {data_len} bytes of tensor data, or is misaligned",
                    t.name, t.n_bytes, t.offset
                )));
            }
        }
        Ok(Self { path: path.to_path_buf(), version, meta, tensors, bytes, data_start })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's values as f32, in its stored (row-major, innermost-first) order.
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<Vec<f32>, ModelError> {
        let start = self.data_start + t.offset;
        let raw = &self.bytes[start..start + t.n_bytes];
        let v = quant::dequantize(t.ggml_type, raw, t.n_elements()).map_err(|m| ModelError::Checkpoint {
            path: self.path.clone(),
            message: format!("tensor '{}': {m}", t.name),
            hint: format!("Kiln de-quantizes {}; re-quantize the model to one of them with llama.cpp's llama-quantize", quant::SUPPORTED),
        })?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(ModelError::Checkpoint {
                path: self.path.clone(),
                message: format!("tensor '{}' holds a non-finite value at index {i}", t.name),
                hint: "the file is damaged; download it again".into(),
            });
        }
        Ok(v)
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value, ModelError> {
        self.meta.get(key).ok_or_else(|| ModelError::Checkpoint {
            path: self.path.clone(),
            message: format!("metadata key '{key}' is missing"),
            hint: "Kiln reads Llama-architecture GGUF files as llama.cpp's converter writes them".into(),
        })
    }
}
