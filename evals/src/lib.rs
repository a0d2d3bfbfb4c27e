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

pub use scorer::{KernelScorer, ModelScorer, Scorer};

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

/// Runs each task, measuring its energy separately, and returns
/// `{task: {metric: value, ..., "n", "seconds", "joules", "joules_per_item", "energy_method", "notes", "samples"?}}`.
/// `on_done` sees each task's name and entry as it finishes (for printing).
pub fn run_tasks(
    tasks: &[Box<dyn Task>],
    lm: &mut dyn Scorer,
    meters: &mut energy::Meters,
    mut on_done: impl FnMut(&str, &serde_json::Value),
) -> Result<serde_json::Value, EvalError> {
    let mut all = serde_json::Map::new();
    for t in tasks {
        let t0 = std::time::Instant::now();
        let (j0, _, _) = meters.read();
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new_spinner()
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} batches [{elapsed_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(t.name());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        let r = t.run(&mut Ticking { inner: &mut *lm, bar: &bar });
        bar.finish_and_clear();
        let r = r?;
        let (j1, _, _) = meters.read();
        let joules = j1 - j0;
        let mut v = serde_json::to_value(&r.metrics).unwrap_or_default();
        v["n"] = r.n.into();
        v["seconds"] = t0.elapsed().as_secs_f64().into();
        v["joules"] = joules.into();
        v["joules_per_item"] = (joules / r.n.max(1) as f64).into();
        v["energy_method"] = meters.method().as_str().into();
        v["notes"] = serde_json::to_value(&r.notes).unwrap_or_default();
        if !r.samples.is_empty() {
            v["samples"] = serde_json::Value::Array(r.samples.clone());
        }
        on_done(&t.name(), &v);
        all.insert(t.name(), v);
    }
    Ok(serde_json::Value::Object(all))
}

/// A scorer that ticks a progress bar on every batch it scores or generates.
struct Ticking<'a> {
    inner: &'a mut dyn Scorer,
    bar: &'a indicatif::ProgressBar,
}

impl Scorer for Ticking<'_> {
    fn tokenizer(&self) -> &kiln_models::Tokenizer {
        self.inner.tokenizer()
    }
    fn context(&self) -> usize {
        self.inner.context()
    }
    fn logprobs(&mut self, seqs: &[Vec<u32>]) -> Vec<Vec<f64>> {
        self.bar.inc(1);
        self.inner.logprobs(seqs)
    }
    fn greedy(&mut self, prompt: &[u32], max_tokens: usize, stop: Option<u32>) -> Vec<u32> {
        self.bar.inc(1);
        self.inner.greedy(prompt, max_tokens, stop)
    }
}

/// The keys of a task entry that are not metrics.
const BOOKKEEPING: [&str; 7] = ["n", "seconds", "joules", "joules_per_item", "energy_method", "notes", "samples"];

/// A JSON number with `d` decimals, or `n/a`.
pub fn fmt_num(v: &serde_json::Value, d: usize) -> String {
    v.as_f64().map(|x| format!("{x:.d$}")).unwrap_or_else(|| "n/a".into())
}

/// One line for a task's result: its metrics, items, time and energy.
pub fn summary_line(name: &str, v: &serde_json::Value) -> String {
    let metrics: Vec<String> = v
        .as_object()
        .map(|o| o.iter().filter(|(k, _)| !BOOKKEEPING.contains(&k.as_str())).map(|(k, x)| format!("{k} {:.4}", x.as_f64().unwrap_or(f64::NAN))).collect())
        .unwrap_or_default();
    let notes: String = v["notes"].as_array().map(|a| a.iter().filter_map(|n| n.as_str()).map(|n| format!("; {n}")).collect()).unwrap_or_default();
    format!(
        "{name:<10} {}  ({} items, {:.1} s, {:.1} J {}{notes})",
        metrics.join("  "),
        v["n"],
        v["seconds"].as_f64().unwrap_or(0.0),
        v["joules"].as_f64().unwrap_or(0.0),
        v["energy_method"].as_str().unwrap_or("?")
    )
}

/// A Markdown section for task results: a table, then notes and samples.
pub fn evals_markdown(ev: &serde_json::Map<String, serde_json::Value>) -> String {
    let f = fmt_num;
    let mut md = String::from("\n## Evals\n\n| task | metrics | items | seconds | joules (per item) |\n|---|---|---|---|---|\n");
    for (name, v) in ev {
        let m: Vec<String> = v
            .as_object()
            .map(|o| o.iter().filter(|(k, _)| !BOOKKEEPING.contains(&k.as_str())).map(|(k, x)| format!("{k} {}", f(x, 4))).collect())
            .unwrap_or_default();
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} ({}, {}) |\n",
            m.join(", "),
            v["n"],
            f(&v["seconds"], 1),
            f(&v["joules"], 1),
            f(&v["joules_per_item"], 3),
            v["energy_method"].as_str().unwrap_or("?")
        ));
    }
    for (name, v) in ev {
        for n in v["notes"].as_array().into_iter().flatten().filter_map(|n| n.as_str()) {
            md.push_str(&format!("\n- {name}: {n}"));
        }
        for s in v["samples"].as_array().into_iter().flatten() {
            if let Some(p) = s["prompt"].as_str() {
                md.push_str(&format!("\n\n```text\n{p}{}\n```", s["completion"].as_str().unwrap_or("")));
            } else {
                md.push_str(&format!("\n\n```json\n{}\n```", serde_json::to_string_pretty(s).unwrap_or_default()));
            }
        }
    }
    md.push('\n');
    md
}
