//! Kiln evals: a small `Task` trait and the tasks that implement it. Adding a task is one file
//! under `tasks/` plus one line in [`parse_task`].
//!
//! Tasks talk to a model only through [`Scorer`] (log-probabilities and greedy generation), so
//! the maths is testable with a hand-made scorer and any backend can serve.

pub mod energy;
pub mod report;
pub mod scorer;
pub mod tasks;

use std::collections::BTreeMap;

pub use scorer::{ModelScorer, Scorer};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Data(String),
    #[error("task spec '{spec}': {message}\n  hint: {hint}")]
    Spec { spec: String, message: String, hint: String },
}

/// A task's metrics, by name (`acc`, `acc_norm`, `bpb`, `em`, `f1`, ...), plus notes for the report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TaskResult {
    pub metrics: BTreeMap<String, f64>,
    /// Items scored.
    pub n: usize,
    /// Context for a reader, e.g. "chance is 25%".
    pub notes: Vec<String>,
    /// Example outputs, for the report.
    pub samples: Vec<serde_json::Value>,
}

/// One evaluation task.
pub trait Task {
    /// `bpb`, `hellaswag`, `squad`, ...
    fn name(&self) -> String;
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError>;
}

/// Parses `name[:arg]`, as `kiln eval --task` and the recipe's `[eval]` take them:
/// `bpb:FILE[@FROM]`, `hellaswag[:N]`, `squad[:N]`. Relative files are under `data_root`.
pub fn parse_task(spec: &str, data_root: &std::path::Path) -> Result<Box<dyn Task>, EvalError> {
    let (name, arg) = match spec.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (spec, None),
    };
    let count = |default: Option<usize>| -> Result<Option<usize>, EvalError> {
        match arg {
            None | Some("all") => Ok(default),
            Some(a) => a.parse().map(Some).map_err(|_| EvalError::Spec {
                spec: spec.into(),
                message: format!("'{a}' is not a number of items"),
                hint: format!("{name}:500 scores the first 500 items, {name}:all every one"),
            }),
        }
    };
    Ok(match name {
        "bpb" => {
            let file = arg.ok_or_else(|| EvalError::Spec {
                spec: spec.into(),
                message: "bpb needs a file".into(),
                hint: "bpb:tinyshakespeare/input.txt (text or JSONL, under the data root)".into(),
            })?;
            let (file, from) = match file.rsplit_once('@') {
                Some((f, x)) => {
                    let from: f64 = x.parse().ok().filter(|v| (0.0..1.0).contains(v)).ok_or_else(|| EvalError::Spec {
                        spec: spec.into(),
                        message: format!("'@{x}' is not a fraction in [0, 1)"),
                        hint: "bpb:FILE@0.9 scores the last 10% of FILE (Kiln's validation split)".into(),
                    })?;
                    (f, from)
                }
                None => (file, 0.0),
            };
            let mut t = tasks::bpb::Bpb::new(data_root.join(file));
            t.from = from;
            Box::new(t)
        }
        "hellaswag" => Box::new(tasks::hellaswag::HellaSwag::new(data_root.join(tasks::hellaswag::DEFAULT_PATH), count(None)?)),
        "squad" => Box::new(tasks::squad::Squad::new(data_root.join(tasks::squad::DEFAULT_PATH), count(Some(200))?)),
        other => {
            return Err(EvalError::Spec {
                spec: spec.into(),
                message: format!("unknown task '{other}'"),
                hint: "tasks: bpb:FILE, hellaswag[:N], squad[:N]".into(),
            })
        }
    })
}
