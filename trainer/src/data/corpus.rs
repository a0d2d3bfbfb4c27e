//! Documents from files: plain text (one file is one document) or JSONL (one line is one
//! document, its text in a named field).

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_recipes::DataFormat;

/// Reads the documents of one file.
pub fn read_documents(path: &Path, format: DataFormat, text_field: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))?;
    let jsonl = match format {
        DataFormat::Jsonl => true,
        DataFormat::Text => false,
        DataFormat::Auto => path.extension().is_some_and(|e| e == "jsonl"),
    };
    if !jsonl {
        return Ok(vec![text]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not valid JSON\n  hint: JSONL has one JSON object per line", at()))?;
        match v.get(text_field) {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(other) => bail!("{}: field '{text_field}' is {}, not a string", at(), kind(other)),
            None => {
                let keys: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
                bail!(
                    "{}: no '{text_field}' field (this line has: {})\n  hint: set data.text_field to the field that holds the text",
                    at(),
                    if keys.is_empty() { "no fields".into() } else { keys.join(", ") }
                );
            }
        }
    }
    Ok(docs)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_documents_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n").unwrap();
        assert_eq!(read_documents(&p, DataFormat::Auto, "text").unwrap(), vec!["one", "two"]);
        std::fs::write(&p, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
        let e = format!("{:#}", read_documents(&p, DataFormat::Auto, "text").unwrap_err());
        assert!(e.contains("d.jsonl:2") && e.contains("no 'text' field") && e.contains("body"), "{e}");
        std::fs::write(&p, "{\"text\": \"one\"}\n{\"text\": 5}\n").unwrap();
        let e = format!("{:#}", read_documents(&p, DataFormat::Auto, "text").unwrap_err());
        assert!(e.contains("d.jsonl:2") && e.contains("a number"), "{e}");
        std::fs::write(&p, "{\"text\": \"one\"\n").unwrap();
        let e = format!("{:#}", read_documents(&p, DataFormat::Auto, "text").unwrap_err());
        assert!(e.contains("d.jsonl:1") && e.contains("not valid JSON"), "{e}");
        let t = dir.path().join("plain.txt");
        std::fs::write(&t, "a\nb\n").unwrap();
        assert_eq!(read_documents(&t, DataFormat::Auto, "text").unwrap(), vec!["a\nb\n"]);
    }
}
