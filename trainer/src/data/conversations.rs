//! Records to conversations, by format: chat (`messages`), ShareGPT (`conversations`), Alpaca
//! (`instruction`, `input`, `output`), prompt/completion, and `fields` (any record through two
//! Jinja templates, optionally joined with a second file). A malformed record names its file,
//! line and field.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use kiln_models::chat::Message;
use kiln_recipes::{DataFormat, DataSection};
use serde_json::Value;

use super::records::{field_names, key_of, kind, Record};

/// Tells a file's format from its first record's fields.
pub fn detect(first: &Record) -> Result<DataFormat> {
    let has = |k: &str| first.value.get(k).is_some();
    Ok(if has("messages") {
        DataFormat::Chat
    } else if has("conversations") {
        DataFormat::Sharegpt
    } else if has("instruction") && has("output") {
        DataFormat::Alpaca
    } else if has("prompt") && has("completion") {
        DataFormat::PromptCompletion
    } else {
        bail!(
            "{}: cannot tell the format from the fields ({})\n  hint: set data.format: \"chat\" (messages), \"sharegpt\" (conversations), \"alpaca\" (instruction, input, output), \"prompt_completion\", or \"fields\" with user_template and assistant_template",
            first.at,
            field_names(&first.value)
        )
    })
}

/// Turns records into conversations.
pub struct Converter<'a> {
    pub format: DataFormat,
    pub data: &'a DataSection,
    pub join: Option<HashMap<String, Value>>,
    templates: Option<minijinja::Environment<'static>>,
    /// RAFT: each record's `{{ passages }}` (`raft.rs`).
    raft: Option<&'a super::raft::Raft>,
}

fn text<'v>(r: &Record, v: &'v Value, field: &str) -> Result<&'v str> {
    match v.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("{}: field '{field}' is a {}, not a string", r.at, kind(other)),
        None => bail!("{}: no '{field}' field (this record has: {})", r.at, field_names(v)),
    }
}

/// A message's content: a string, or a list of parts whose `text` parts are joined.
fn content(r: &Record, m: &Value, field: &str, i: usize) -> Result<String> {
    match m.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) if parts.iter().all(|p| p.get("text").is_some_and(Value::is_string)) => {
            Ok(parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""))
        }
        Some(other) => bail!("{}: message {i}: '{field}' is a {}, not a string", r.at, kind(other)),
        None => bail!("{}: message {i} has no '{field}' (it has: {})", r.at, field_names(m)),
    }
}

fn messages(r: &Record, list_field: &str, role_field: &str, content_field: &str, sharegpt: bool) -> Result<Vec<Message>> {
    let Some(list) = r.value.get(list_field) else {
        bail!("{}: no '{list_field}' field (this record has: {})", r.at, field_names(&r.value));
    };
    let Value::Array(list) = list else {
        bail!("{}: '{list_field}' is a {}, not a list of messages", r.at, kind(list));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = match m.get(role_field) {
            Some(Value::String(s)) => s.as_str(),
            _ => bail!("{}: message {i} has no string '{role_field}' (it has: {})", r.at, field_names(m)),
        };
        let role = if sharegpt {
            match role {
                "human" | "user" => "user",
                "gpt" | "assistant" | "model" => "assistant",
                "system" => "system",
                other => bail!("{}: message {i}: '{role_field}' is '{other}'\n  hint: ShareGPT roles are human, gpt and system", r.at),
            }
        } else {
            role
        };
        out.push(Message::new(role, &content(r, m, content_field, i)?));
    }
    Ok(out)
}

/// JSON to a template value (objects keep their key order).
fn jinja(v: &Value) -> minijinja::Value {
    match v {
        Value::Null => minijinja::Value::from(()),
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => n.as_i64().map(minijinja::Value::from).unwrap_or_else(|| n.as_f64().unwrap_or(f64::NAN).into()),
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => a.iter().map(jinja).collect::<Vec<_>>().into(),
        Value::Object(o) => minijinja::Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), jinja(v)))),
    }
}

impl<'a> Converter<'a> {
    pub fn new(format: DataFormat, data: &'a DataSection, join: Option<HashMap<String, Value>>, raft: Option<&'a super::raft::Raft>) -> Result<Self> {
        let templates = if format == DataFormat::Fields {
            let mut env = minijinja::Environment::new();
            env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
            env.add_template_owned("user", data.user_template.clone()).context("data.user_template is not a valid Jinja template")?;
            env.add_template_owned("assistant", data.assistant_template.clone()).context("data.assistant_template is not a valid Jinja template")?;
            Some(env)
        } else {
            None
        };
        Ok(Self { format, data, join, templates, raft })
    }

    /// One record's conversation, with `data.system` put first where it has no system message.
    pub fn convert(&self, r: &Record) -> Result<Vec<Message>> {
        let v = &r.value;
        let mut msgs = match self.format {
            DataFormat::Chat => messages(r, "messages", "role", "content", false)?,
            DataFormat::Sharegpt => messages(r, "conversations", "from", "value", true)?,
            DataFormat::Alpaca => {
                let input = match v.get("input") {
                    None | Some(Value::Null) => "",
                    Some(_) => text(r, v, "input")?,
                };
                let instruction = text(r, v, "instruction")?;
                let user = if input.trim().is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
                vec![Message::new("user", &user), Message::new("assistant", text(r, v, "output")?)]
            }
            DataFormat::PromptCompletion => vec![Message::new("user", text(r, v, "prompt")?), Message::new("assistant", text(r, v, "completion")?)],
            DataFormat::Fields => self.fields(r)?,
            other => bail!("data.format {other:?} is not a conversation format"),
        };
        if msgs.is_empty() {
            bail!("{}: the conversation has no messages", r.at);
        }
        if !self.data.system.is_empty() && msgs[0].role != "system" {
            msgs.insert(0, Message::new("system", &self.data.system));
        }
        Ok(msgs)
    }

    fn fields(&self, r: &Record) -> Result<Vec<Message>> {
        let env = self.templates.as_ref().context("no templates")?;
        let mut ctx = jinja(&r.value);
        if let Some(table) = &self.join {
            let k = key_of(r, &self.data.join_key).context("data.join_key")?;
            let Some(joined) = table.get(&k) else {
                bail!("{}: '{}' = '{k}' is not in the data.join file", r.at, self.data.join_key);
            };
            let mut pairs: Vec<(String, minijinja::Value)> = r.value.as_object().map(|o| o.iter().map(|(k, v)| (k.clone(), jinja(v))).collect()).unwrap_or_default();
            pairs.push(("join".into(), jinja(joined)));
            if let Some(raft) = self.raft {
                // The user turn without passages, to know what the passages may take.
                let mut bare = pairs.clone();
                bare.push(("passages".into(), "".into()));
                let fixed = raft.splitter.count(&self.render(env, "user", &minijinja::Value::from_pairs(bare), r)?)?;
                pairs.push(("passages".into(), raft.passages(&r.at, &r.value, &k, joined, fixed)?.into()));
            }
            ctx = minijinja::Value::from_pairs(pairs);
        }
        Ok(vec![Message::new("user", &self.render(env, "user", &ctx, r)?), Message::new("assistant", &self.render(env, "assistant", &ctx, r)?)])
    }

    fn render(&self, env: &minijinja::Environment<'static>, name: &str, ctx: &minijinja::Value, r: &Record) -> Result<String> {
        let t = env.get_template(name)?;
        t.render(ctx).map_err(|e| anyhow::anyhow!("{}: data.{name}_template: {e}\n  hint: the record has: {}", r.at, field_names(&r.value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::{read_records, select_groups};
    use crate::data::sft;
    use crate::data::sources::Dirs;

    fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn convert(path: &std::path::Path, data: &DataSection) -> Result<Vec<Vec<Message>>> {
        let dirs = Dirs { data_root: path.parent().unwrap().to_path_buf(), cache: path.parent().unwrap().join("cache") };
        sft::conversations(data, &[path.to_path_buf()], &dirs, None)
    }

    fn sft_data() -> DataSection {
        DataSection { format: DataFormat::Auto, ..Default::default() }
    }

    #[test]
    fn every_format_becomes_the_same_conversation() {
        let d = tempfile::tempdir().unwrap();
        let want = vec![Message::new("user", "Hi"), Message::new("assistant", "Hello")];
        let files = [
            write(d.path(), "chat.jsonl", r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#),
            write(d.path(), "parts.jsonl", r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}, {"role": "assistant", "content": "Hello"}]}"#),
            write(d.path(), "share.jsonl", r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#),
            write(d.path(), "alpaca.json", r#"[{"instruction": "Hi", "input": "", "output": "Hello"}]"#),
            write(d.path(), "alpaca.jsonl", r#"{"instruction": "Hi", "output": "Hello"}"#),
            write(d.path(), "pc.jsonl", r#"{"prompt": "Hi", "completion": "Hello"}"#),
        ];
        for f in &files {
            assert_eq!(convert(f, &sft_data()).unwrap(), vec![want.clone()], "{}", f.display());
        }
        let alpaca_input = write(d.path(), "a2.jsonl", r#"{"instruction": "Add", "input": "2 and 2", "output": "4"}"#);
        assert_eq!(convert(&alpaca_input, &sft_data()).unwrap()[0][0].content, "Add\n\n2 and 2");
        let with_system = DataSection { system: "Be brief.".into(), ..sft_data() };
        let c = convert(&files[0], &with_system).unwrap();
        assert_eq!((c[0][0].role.as_str(), c[0].len()), ("system", 3));
    }

    #[test]
    fn fields_with_a_join_and_groups() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "paras.jsonl", "{\"doc_id\": \"A#0\", \"text\": \"Paris is in France.\"}\n{\"doc_id\": \"B#0\", \"text\": \"Rome is in Italy.\"}\n");
        let qa = write(d.path(), "qa.jsonl", "{\"question\": \"Where is Paris?\", \"answers\": [\"France\", \"in France\"], \"doc_id\": \"A#0\", \"title\": \"A\"}\n{\"question\": \"Where is Rome?\", \"answers\": [\"Italy\"], \"doc_id\": \"B#0\", \"title\": \"B\"}\n");
        let data = DataSection {
            format: DataFormat::Fields,
            user_template: "Passage: {{ join.text }}\nQuestion: {{ question }}".into(),
            assistant_template: "{{ answers[0] }}".into(),
            join: Some("paras.jsonl".into()),
            join_key: "doc_id".into(),
            group_by: Some("title".into()),
            groups: Some([1, 2]),
            ..Default::default()
        };
        let c = convert(&qa, &data).unwrap();
        assert_eq!(c, vec![vec![Message::new("user", "Passage: Rome is in Italy.\nQuestion: Where is Rome?"), Message::new("assistant", "Italy")]]);
        let recs = read_records(&qa).unwrap();
        let e = select_groups(recs, "title", [0, 5]).unwrap_err().to_string();
        assert!(e.contains("2 distinct 'title' groups"), "{e}");
        let bad = DataSection { assistant_template: "{{ answer }}".into(), ..data };
        let e = format!("{:#}", convert(&qa, &bad).unwrap_err());
        assert!(e.contains("qa.jsonl:2") && e.contains("assistant_template") && e.contains("answers"), "{e}");
    }

    #[test]
    fn malformed_records_name_file_line_and_field() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            ("a.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n{\"messages\": [{\"role\": \"user\"}]}\n", vec!["a.jsonl:2", "message 0", "'content'"]),
            ("b.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\nnot json\n", vec!["b.jsonl:2", "not valid JSON"]),
            ("c.jsonl", "{\"conversations\": [{\"from\": \"robot\", \"value\": \"x\"}]}\n", vec!["c.jsonl:1", "'robot'", "human, gpt"]),
            ("d.jsonl", "{\"instruction\": \"x\", \"output\": 3}\n", vec!["d.jsonl:1", "'output'", "number"]),
            ("e.jsonl", "{\"text\": \"x\"}\n", vec!["e.jsonl:1", "cannot tell the format", "text"]),
            ("f.json", "{\"instruction\": \"x\"}", vec!["f.json", "not an array"]),
            ("g.jsonl", "[1, 2]\n", vec!["g.jsonl:1", "array, not an object"]),
            ("h.jsonl", "{\"messages\": \"hi\"}\n", vec!["h.jsonl:1", "'messages' is a string"]),
            ("i.jsonl", "{\"messages\": []}\n", vec!["i.jsonl:1", "no messages"]),
        ];
        for (name, text, wants) in cases {
            let p = write(d.path(), name, text);
            let e = format!("{:#}", convert(&p, &sft_data()).unwrap_err());
            for w in wants {
                assert!(e.contains(w), "{name}: {e}");
            }
        }
        let p = write(d.path(), "j.parquet", "not parquet");
        let e = format!("{:#}", convert(&p, &sft_data()).unwrap_err());
        assert!(e.contains("j.parquet") && e.contains("Parquet"), "{e}");
    }

    #[test]
    fn parquet_rows_are_records() {
        use parquet::data_type::ByteArrayType;
        use parquet::file::writer::SerializedFileWriter;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pc.parquet");
        let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type("message m { REQUIRED BYTE_ARRAY prompt (UTF8); REQUIRED BYTE_ARRAY completion (UTF8); }").unwrap());
        let mut w = SerializedFileWriter::new(std::fs::File::create(&p).unwrap(), schema, Default::default()).unwrap();
        let mut rg = w.next_row_group().unwrap();
        for col in [["Hi", "Yo"], ["Hello", "Hey"]] {
            let mut c = rg.next_column().unwrap().unwrap();
            let vals: Vec<parquet::data_type::ByteArray> = col.iter().map(|s| (*s).into()).collect();
            c.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
            c.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
        let c = convert(&p, &sft_data()).unwrap();
        assert_eq!(c[1], vec![Message::new("user", "Yo"), Message::new("assistant", "Hey")]);
    }
}
