//! Records from data files, each with where it came from (`file:line` or `file:row N`): JSONL
//! (one object a line), a JSON array (`.json`), or Parquet (`.parquet`, Hugging Face datasets'
//! format, read row by row). A record that does not parse names its file and line.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One record and its location, for messages.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: String,
    pub value: Value,
}

/// Reads every record of `path` (JSONL, JSON array or Parquet, told by the extension).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => read_parquet(path),
        "json" => read_json_array(path),
        _ => read_jsonl(path),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))
}

fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let value: Value = serde_json::from_str(line).with_context(|| format!("{at}: not valid JSON\n  hint: JSONL has one JSON object per line"))?;
        if !value.is_object() {
            bail!("{at}: a JSON {}, not an object\n  hint: each line must be one record, {{\"field\": ...}}", kind(&value));
        }
        out.push(Record { at, value });
    }
    Ok(out)
}

fn read_json_array(path: &Path) -> Result<Vec<Record>> {
    let text = read_text(path)?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Value::Array(items) = v else {
        bail!("{}: a JSON {}, not an array of records\n  hint: a .json file holds [{{...}}, {{...}}]; use .jsonl for one record a line", path.display(), kind(&v));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let at = format!("{}: record {i}", path.display());
            if !value.is_object() {
                bail!("{at}: a JSON {}, not an object", kind(&value));
            }
            Ok(Record { at, value })
        })
        .collect()
}

fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use parquet::file::reader::SerializedFileReader;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.with_context(|| format!("{}: row {i} cannot be read", path.display()))?;
        out.push(Record { at: format!("{}: row {i}", path.display()), value: row.to_json_value() });
    }
    Ok(out)
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A field as a string key (strings as they are, numbers written out), for joins and groups.
pub fn key_of(r: &Record, field: &str) -> Result<String> {
    match r.value.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(v) => bail!("{}: field '{field}' is a {}, not a string or number", r.at, kind(v)),
        None => bail!("{}: no '{field}' field (this record has: {})", r.at, field_names(&r.value)),
    }
}

pub fn field_names(v: &Value) -> String {
    let keys: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    if keys.is_empty() {
        "no fields".into()
    } else {
        keys.join(", ")
    }
}

/// Keeps the records of groups `from..to`, groups numbered by first appearance of `field`.
pub fn select_groups(records: Vec<Record>, field: &str, [from, to]: [usize; 2]) -> Result<Vec<Record>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for r in records {
        let k = key_of(&r, field).context("data.group_by")?;
        let n = index.len();
        let g = *index.entry(k).or_insert(n);
        if (from..to).contains(&g) {
            out.push(r);
        }
    }
    if index.len() < to {
        bail!("data.groups = [{from}, {to}], but the data has {} distinct '{field}' groups", index.len());
    }
    Ok(out)
}

/// The records of a join file by `key`.
pub fn join_table(records: Vec<Record>, key: &str) -> Result<HashMap<String, Value>> {
    let mut t = HashMap::with_capacity(records.len());
    for r in records {
        let k = key_of(&r, key).context("data.join_key")?;
        t.insert(k, r.value);
    }
    Ok(t)
}
