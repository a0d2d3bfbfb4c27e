//! Kiln evals: a small `Task` trait and the tasks that implement it (`tasks/`, with the registry
//! of their names), the energy meters, and the report plots.
//!
//! Tasks talk to a model only through [`Scorer`] (log-probabilities and greedy generation), so
//! the maths is testable with a hand-made scorer and any backend can serve.

pub mod energy;
pub mod report;
pub mod scorer;
pub mod tasks;

use std::collections::BTreeMap;

pub use scorer::{KernelScorer, ModelScorer, Scorer};
pub use tasks::{parse_task, TASKS};

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
    /// The data files the task reads (checked by [`check_files`] before any training).
    fn files(&self) -> Vec<&std::path::Path> {
        Vec::new()
    }
    /// Gives a task that retrieves passages its index, opened and ready to answer (`kiln eval
    /// --retrieval`, the recipe's `[retrieval]`); returns whether the task uses one.
    fn set_retrieval(&mut self, _index: &std::sync::Arc<kiln_retrieval::Index>) -> bool {
        false
    }
    /// Gives a task that fuses sparse and dense rankings itself the fusion to use (`kiln eval
    /// --fusion`, the recipe's `[retrieval] fusion`); returns whether the task fuses.
    fn set_fusion(&mut self, _fusion: kiln_retrieval::Fusion) -> bool {
        false
    }
    /// Gives a task that puts passages into a prompt its token budget (the recipe's
    /// `[retrieval] budget`); returns whether the task uses one.
    fn set_budget(&mut self, _tokens: usize) -> bool {
        false
    }
}

/// Every file `task` reads is a regular file: checked before a run trains, so that a wrong path
/// fails in seconds, not after the training it would have reported on.
pub fn check_files(task: &dyn Task) -> Result<(), EvalError> {
    for f in task.files() {
        if !std::fs::metadata(f).is_ok_and(|m| m.is_file()) {
            return Err(EvalError::Data(format!(
                "task '{}': {} is not a readable file\n  hint: task files are under the data root (--data-root or KILN_DATA)",
                task.name(),
                f.display()
            )));
        }
    }
    Ok(())
}

/// One task's result as reports keep it: its metrics (null where not finite), how many items,
/// and what scoring them cost.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskEntry {
    #[serde(flatten)]
    pub metrics: BTreeMap<String, Option<f64>>,
    pub n: usize,
    pub seconds: f64,
    pub joules: f64,
    pub joules_per_item: f64,
    pub energy_method: String,
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<serde_json::Value>,
}

/// Task entries by task name.
pub type Evals = BTreeMap<String, TaskEntry>;

/// Runs each task, measuring its energy separately. `on_done` sees each task's name and entry as
/// it finishes (for printing).
pub fn run_tasks(
    tasks: &[Box<dyn Task>],
    lm: &mut dyn Scorer,
    meters: &mut energy::Meters,
    mut on_done: impl FnMut(&str, &TaskEntry),
) -> Result<Evals, EvalError> {
    let mut all = Evals::new();
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
        let entry = TaskEntry {
            metrics: r.metrics.iter().map(|(k, v)| (k.clone(), Some(*v).filter(|v| v.is_finite()))).collect(),
            n: r.n,
            seconds: t0.elapsed().as_secs_f64(),
            joules,
            joules_per_item: joules / r.n.max(1) as f64,
            energy_method: meters.method().as_str().into(),
            notes: r.notes,
            samples: r.samples,
        };
        on_done(&t.name(), &entry);
        all.insert(t.name(), entry);
    }
    Ok(all)
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
    fn greedy(&mut self, prompt: &[u32], max_tokens: usize, stop: &[u32]) -> Vec<u32> {
        self.bar.inc(1);
        self.inner.greedy(prompt, max_tokens, stop)
    }
    fn greedy_batch(&mut self, prompts: &[Vec<u32>], max_tokens: usize, stop: &[u32]) -> Vec<Vec<u32>> {
        self.bar.inc(prompts.len() as u64);
        self.inner.greedy_batch(prompts, max_tokens, stop)
    }
    fn embed(&mut self, seqs: &[Vec<u32>]) -> Option<Vec<f32>> {
        self.bar.inc(1);
        self.inner.embed(seqs)
    }
}

/// A number with `d` decimals, or `n/a`.
pub fn fmt_num(v: Option<f64>, d: usize) -> String {
    v.filter(|x| x.is_finite()).map(|x| format!("{x:.d$}")).unwrap_or_else(|| "n/a".into())
}

/// One line for a task's result: its metrics, items, time and energy.
pub fn summary_line(name: &str, v: &TaskEntry) -> String {
    let metrics: Vec<String> = v.metrics.iter().map(|(k, x)| format!("{k} {:.4}", x.unwrap_or(f64::NAN))).collect();
    let notes: String = v.notes.iter().map(|n| format!("; {n}")).collect();
    format!("{name:<10} {}  ({} items, {:.1} s, {:.1} J {}{notes})", metrics.join("  "), v.n, v.seconds, v.joules, v.energy_method)
}

/// A Markdown section for task results: a table, then notes and samples.
pub fn evals_markdown(ev: &Evals) -> String {
    let f = fmt_num;
    let mut md = String::from("\n## Evals\n\n| task | metrics | items | seconds | joules (per item) |\n|---|---|---|---|---|\n");
    for (name, v) in ev {
        let m: Vec<String> = v.metrics.iter().map(|(k, x)| format!("{k} {}", f(*x, 4))).collect();
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} ({}, {}) |\n",
            m.join(", "),
            v.n,
            f(Some(v.seconds), 1),
            f(Some(v.joules), 1),
            f(Some(v.joules_per_item), 3),
            v.energy_method
        ));
    }
    for (name, v) in ev {
        for n in &v.notes {
            md.push_str(&format!("\n- {name}: {n}"));
        }
        for s in &v.samples {
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
