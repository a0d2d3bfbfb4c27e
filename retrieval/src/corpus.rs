//! Corpora as documents `{id, title, text}`: JSONL (one object a line, the shape of SQuAD's
//! paragraphs file: `doc_id` or `id`, optional `title`, `text`), a JSON array of such objects,
//! Parquet with the same columns (Hugging Face datasets' format, read row by row), or any other
//! file as plain text: one document whose id is the file's path. A folder is read file by file
//! (sorted, hidden files skipped). A record that does not fit names its file and line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One document of a corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The source document's id: the record's `doc_id` or `id`, or a text file's path.
    pub id: String,
    pub title: Option<String>,
    pub text: String,
}

/// The files a corpus argument names: the file itself, or a folder's files (recursively,
/// sorted, hidden ones skipped).
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).with_context(|| format!("corpus {}: cannot be read\n  hint: name a .jsonl, .json, .parquet or text file, or a folder of them", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir).with_context(|| format!("reading folder {}", dir.display()))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("corpus {}: the folder holds no files", path.display());
    }
    Ok(out)
}

/// The documents of one corpus file (told by its extension).
pub fn read_documents(path: &Path) -> Result<Vec<Document>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let docs = match ext.as_str() {
        "jsonl" => read_jsonl(path)?,
        "json" => read_json_array(path)?,
        "parquet" => read_parquet(path)?,
        _ => {
            let text = std::fs::read_to_string(path).with_context(|| format!("corpus {}: not UTF-8 text\n  hint: corpora are .jsonl, .json or .parquet records, or text files", path.display()))?;
            vec![Document { id: path.display().to_string(), title: None, text }]
        }
    };
    let mut seen = std::collections::HashSet::new();
    for d in &docs {
        if !seen.insert(d.id.as_str()) {
            bail!("corpus {}: the id \"{}\" appears twice\n  hint: each document needs its own doc_id", path.display(), d.id);
        }
    }
    Ok(docs)
}

/// A record as a document; `at` names it for messages.
fn document(v: &Value, at: &str) -> Result<Document> {
    let Some(obj) = v.as_object() else { bail!("{at}: a JSON {}, not an object\n  hint: each record is {{\"doc_id\": ..., \"title\": ..., \"text\": ...}}", kind(v)) };
    let id = match obj.get("doc_id").or_else(|| obj.get("id")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => bail!("{at}: \"doc_id\" is a JSON {}, not a string", kind(other)),
        None => bail!("{at}: no \"doc_id\" or \"id\" field (it has {})\n  hint: retrieval cites each passage by its document's id", fields(obj)),
    };
    let text = match obj.get("text") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => bail!("{at}: \"text\" is a JSON {}, not a string", kind(other)),
        None => bail!("{at}: no \"text\" field (it has {})", fields(obj)),
    };
    let title = match obj.get("title") {
        Some(Value::String(s)) => Some(s.clone()),
        None | Some(Value::Null) => None,
        Some(other) => bail!("{at}: \"title\" is a JSON {}, not a string", kind(other)),
    };
    Ok(Document { id, title, text })
}

fn read_jsonl(path: &Path) -> Result<Vec<Document>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{at}: not valid JSON\n  hint: JSONL has one JSON object per line"))?;
        out.push(document(&v, &at)?);
    }
    Ok(out)
}

fn read_json_array(path: &Path) -> Result<Vec<Document>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Value::Array(items) = v else { bail!("{}: a JSON {}, not an array of documents", path.display(), kind(&v)) };
    items.iter().enumerate().map(|(i, v)| document(v, &format!("{}: record {i}", path.display()))).collect()
}

fn read_parquet(path: &Path) -> Result<Vec<Document>> {
    use parquet::file::reader::SerializedFileReader;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let at = format!("{}: row {i}", path.display());
        let row = row.with_context(|| format!("{at}: cannot be read"))?;
        out.push(document(&row.to_json_value(), &at)?);
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn fields(obj: &serde_json::Map<String, Value>) -> String {
    let names: Vec<&str> = obj.keys().map(String::as_str).collect();
    if names.is_empty() {
        "no fields".into()
    } else {
        names.join(", ")
    }
}

/// The sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// The sha256 of a file's bytes, hex (the manifest's record of what was indexed).
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
