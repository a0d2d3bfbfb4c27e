//! Recipe errors: every one names the file, the key path (or the `--set` argument) and a hint.

use std::fmt;
use std::path::PathBuf;

use crate::Source;

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{}: cannot read recipe: {message}\n  hint: check the path; recipes live under recipes/", file.display())]
    Io { file: PathBuf, message: String },

    #[error("{}{}: TOML syntax error: {message}", file.display(), at_line(*line))]
    Syntax { file: PathBuf, message: String, line: Option<usize> },

    #[error("{}: bad --set '{set}': {message}", file.display())]
    Override { file: PathBuf, set: String, message: String },

    #[error("{}{}: key '{key}': {message}{}", file.display(), at_line(*line), hint_text(hint))]
    Key { file: PathBuf, key: String, line: Option<usize>, message: String, hint: Option<String> },

    #[error("{}{}: key '{key}': {message}\n  hint: README.md's recipe reference gives every key's meaning and range", file.display(), at_line(*line))]
    Invalid { file: PathBuf, key: String, line: Option<usize>, message: String },
}

impl RecipeError {
    /// The offending key path, where there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            RecipeError::Key { key, .. } | RecipeError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

fn hint_text(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default()
}

struct Path<'a>(&'a serde_path_to_error::Path);

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.to_string();
        f.write_str(if s == "." { "" } else { &s })
    }
}

/// Turns a serde error (with its path) into a `RecipeError::Key`, finding the nearest valid key
/// for an unknown one.
pub(crate) fn from_serde(
    src: &Source,
    overrides: &[String],
    e: serde_path_to_error::Error<toml::de::Error>,
) -> RecipeError {
    let parent = Path(e.path()).to_string();
    let message = e.inner().message().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let bad = rest.split('`').next().unwrap_or_default().to_string();
        // The path already ends with the unknown key: its section is everything before it.
        let parent = match parent.strip_suffix(&bad) {
            Some(p) => p.trim_end_matches('.').to_string(),
            None => parent.clone(),
        };
        let join = |k: &str| if parent.is_empty() { k.to_string() } else { format!("{parent}.{k}") };
        let expected = backticked(rest.split_once("expected").map(|x| x.1).unwrap_or_default());
        let nearest = expected
            .iter()
            .map(|k| (strsim::damerau_levenshtein(&bad, k), k))
            .min()
            .filter(|(d, k)| *d <= 3.max(k.len() / 3))
            .map(|(_, k)| k.clone());
        let key = join(&bad);
        let hint = match nearest {
            Some(n) => format!("did you mean '{}'? valid keys here: {}", join(&n), expected.join(", ")),
            None => format!("valid keys here: {}", expected.join(", ")),
        };
        return RecipeError::Key {
            file: src.path.clone(),
            line: find_key_line(&src.text, &key),
            hint: Some(hint + &from_set(overrides, &key)),
            key,
            message: "unknown key".into(),
        };
    }
    let key = if parent.is_empty() { "<top level>".to_string() } else { parent };
    RecipeError::Key {
        file: src.path.clone(),
        line: find_key_line(&src.text, &key),
        hint: Some(format!("see the recipe reference in README.md{}", from_set(overrides, &key))),
        key,
        message,
    }
}

fn from_set(overrides: &[String], key: &str) -> String {
    match overrides.iter().find(|o| o.split('=').next().map(str::trim) == Some(key)) {
        Some(o) => format!(" (the value came from --set {o})"),
        None => String::new(),
    }
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// Finds the line where `section.key` is set in the recipe text (1-based), if it is there.
pub(crate) fn find_key_line(text: &str, key_path: &str) -> Option<usize> {
    let (section, key) = match key_path.rsplit_once('.') {
        Some((s, k)) => (s, k),
        None => ("", key_path),
    };
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        let Some((k, _)) = t.split_once('=') else { continue };
        if current == section && k.trim() == key {
            return Some(i + 1);
        }
    }
    None
}
