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
        // The chat formats are SFT's (data/conversations.rs); the recipe refuses them here.
        _ => true,
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

    /// 500 damaged JSONL files (cut, a byte replaced, a line doubled): each is read or refused
    /// with the file and line named, never a panic.
    #[test]
    fn damaged_jsonl_never_panics() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let good = "{\"text\": \"one\", \"id\": 1}\n{\"text\": \"two \\u00e9\", \"meta\": {\"a\": [1, 2]}}\n\n{\"text\": \"three\"}\n";
        let config = Config { cases: 500, failure_persistence: Some(Box::new(FileFailurePersistence::Off)), ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[3; 32]));
        runner
            .run(&(any::<usize>(), any::<u8>(), 0u8..3), |(at, byte, how)| {
                let mut b = good.as_bytes().to_vec();
                let at = at % b.len();
                match how {
                    0 => b.truncate(at),
                    1 => b[at] = byte,
                    _ => b.extend_from_slice(&good.as_bytes()[at..]),
                }
                std::fs::write(&p, &b).unwrap();
                if let Err(e) = read_documents(&p, DataFormat::Jsonl, "text") {
                    let e = format!("{e:#}");
                    assert!(e.contains("d.jsonl"), "{e}");
                }
                Ok(())
            })
            .unwrap();
    }
}
