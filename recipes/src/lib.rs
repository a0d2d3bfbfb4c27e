//! Kiln recipes: the schema of a recipe file, loading, `--set` overrides and validation.
//!
//! A recipe is TOML with one section per component. Every field has a default here, so a
//! recipe lists only what differs. Unknown keys are errors (`deny_unknown_fields`), reported
//! with the file, the key path, the line and the nearest valid key.
//!
//! This crate depends on nothing else in the workspace. Resolving a recipe into a runnable
//! plan (the model preset's sizes, the tokenizer's vocabulary) happens in the trainer.

use std::fmt;
use std::path::{Path, PathBuf};

mod error;
mod schema;
mod validate;
mod values;

pub use error::RecipeError;
pub use schema::*;
pub use values::{DeviceSpec, Meter, Precision};

/// The recipe's sections (tables).
const SECTIONS: [&str; 8] = ["model", "tokenizer", "data", "optim", "train", "eval", "energy", "lora"];

impl fmt::Display for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match toml::to_string_pretty(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(fmt::Error),
        }
    }
}

/// Where a recipe came from, for error messages.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}
impl Recipe {
    /// Reads, overrides, deserializes and validates a recipe file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Io {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(&Source { path: path.to_path_buf(), text }, overrides)
    }

    /// Parses recipe text (with `--set key=value` overrides) into a validated recipe.
    pub fn parse(src: &Source, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let mut value: toml::Table = toml::from_str(&src.text).map_err(|e| RecipeError::Syntax {
            file: src.path.clone(),
            message: e.message().to_string(),
            line: e.span().map(|s| line_of(&src.text, s.start)),
        })?;
        for o in overrides {
            apply_override(&mut value, o).map_err(|message| RecipeError::Override {
                file: src.path.clone(),
                set: o.clone(),
                message,
            })?;
        }
        // A section given as a value (`train = [1, 2]`) would deserialize field by field in order.
        for (k, v) in &value {
            if SECTIONS.contains(&k.as_str()) && !v.is_table() {
                return Err(RecipeError::Key {
                    file: src.path.clone(),
                    line: error::find_key_line(&src.text, k),
                    key: k.clone(),
                    message: format!("expected a section ([{k}] with its keys), got a {}", v.type_str()),
                    hint: Some(format!("write [{k}] on a line of its own, then key = value lines")),
                });
            }
        }
        let recipe: Recipe = serde_path_to_error::deserialize(toml::Value::Table(value))
            .map_err(|e| error::from_serde(src, overrides, e))?;
        recipe.validate().map_err(|(key, message)| RecipeError::Invalid {
            file: src.path.clone(),
            line: error::find_key_line(&src.text, &key),
            key,
            message,
        })?;
        Ok(recipe)
    }

    /// The recipe as TOML (every field, defaults included): a run's `plan.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// A source that is downloaded (and so needs a sha256 pin): `https://` or `http://`.
pub fn is_download(source: &str) -> bool {
    source.starts_with("https://") || source.starts_with("http://")
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

/// Applies `a.b.c=value`. The value is parsed as a TOML value; if that fails it is a string.
fn apply_override(root: &mut toml::Table, set: &str) -> Result<(), String> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| "expected key=value, for example --set train.steps=500".to_string())?;
    let key = key.trim();
    let raw = raw.trim();
    if key.is_empty() {
        return Err("empty key".into());
    }
    let value = parse_value(raw);
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        let entry = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("'{p}' is a value, not a section"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests;
