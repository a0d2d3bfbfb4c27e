//! The report: one typed [`Report`], the single source of `report.json`, `report.md`, the
//! `report.svg` plot of loss against energy, `kiln compare`'s table and the model card.

use std::path::Path;

use anyhow::{Context, Result};
use kiln_evals::energy::Component;
use kiln_evals::{fmt_num, Evals};
use kiln_models::LlamaConfig;
use serde::{Deserialize, Serialize};

/// `report.json`. README's "report.json schema" documents every key (a test checks it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub run: Option<String>,
    pub quality: Quality,
    pub throughput: Throughput,
    pub energy: Energy,
    pub memory: Memory,
    pub params: usize,
    pub steps: usize,
    pub stop_reason: String,
    pub evals: Evals,
    pub target: Option<Target>,
    pub backend: String,
    pub threads: usize,
    pub workers: usize,
    /// Instruction tuning: what became of the records (absent when pretraining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sft: Option<crate::data::sft::SftStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quality {
    pub val_loss: f64,
    pub val_bpb: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    pub tokens_per_s: f64,
    pub flops_per_token: f64,
    pub mfu: Option<f64>,
    pub steady_tokens_per_s: Option<f64>,
    pub steady_mfu: Option<f64>,
    pub first_step_s: Option<f64>,
    pub precision: String,
    pub tokens: u64,
    pub wall_s: f64,
    pub train_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Energy {
    pub joules: f64,
    pub kwh: f64,
    pub method: String,
    pub coverage: String,
    pub components: Vec<Component>,
    pub j_per_token: f64,
    pub j_per_param: f64,
    pub gco2e: f64,
    pub grid_gco2_per_kwh: f64,
    pub meter_overhead_s: f64,
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    pub peak_bytes: Option<u64>,
    pub kind: Option<String>,
}

/// `train.target_val_loss`, and where the run reached it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub val_loss: f64,
    pub reached: Option<Reached>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reached {
    pub step: usize,
    pub val_loss: f64,
    pub tokens: u64,
    pub wall_s: f64,
    pub joules: f64,
}

impl Report {
    /// Reads `run/report.json`.
    pub fn load(run: &Path) -> Result<Self> {
        let p = run.join("report.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: no report.json (has the run finished?)", run.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: damaged", p.display()))
    }

    /// Writes `report.json`, `report.md` and `report.svg` into the run directory.
    pub fn write(&self, run: &Path, name: &str, cfg: &LlamaConfig) -> Result<()> {
        std::fs::write(run.join("report.json"), serde_json::to_string_pretty(self)?)?;
        let svg = self.write_svg(run, name);
        std::fs::write(run.join("report.md"), self.markdown(run, name, cfg, svg))?;
        Ok(())
    }

    /// `report.svg`: training loss (a line) and validation loss (points) against cumulative
    /// joules, from `metrics.jsonl`. False when it could not be drawn (warned).
    fn write_svg(&self, run: &Path, name: &str) -> bool {
        use kiln_evals::report::{loss_vs_energy_svg, Point};
        #[derive(Deserialize)]
        struct Line {
            step: u64,
            kind: Option<String>,
            joules: Option<f64>,
            loss: Option<f64>,
            val_loss: Option<f64>,
        }
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        let lines: Vec<Line> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let mut joules_at = std::collections::HashMap::new();
        let mut train = Vec::new();
        for l in lines.iter().filter(|l| l.kind.is_none()) {
            if let (Some(j), Some(loss)) = (l.joules, l.loss) {
                joules_at.insert(l.step, j);
                train.push(Point { joules: j, loss });
            }
        }
        let val: Vec<Point> =
            lines.iter().filter(|l| l.kind.is_some()).filter_map(|l| Some(Point { joules: *joules_at.get(&l.step)?, loss: l.val_loss? })).collect();
        match loss_vs_energy_svg(&run.join("report.svg"), &format!("{name}: loss against energy"), &train, &val, &self.energy.method) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!("report.svg: {err}");
                false
            }
        }
    }

    /// `report.md`: the report card.
    fn markdown(&self, run: &Path, name: &str, c: &LlamaConfig, svg: bool) -> String {
        let (q, t, e) = (&self.quality, &self.throughput, &self.energy);
        let f = |x: f64, d: usize| fmt_num(Some(x), d);
        let mut md = format!(
            concat!(
                "# Kiln report: {name}\n\n",
                "Run `{run}`, backend {backend}, {threads} threads, Kiln {ver}.\n\n",
                "## Model\n\n",
                "| parameters | layers | d_model | heads (kv) | SwiGLU | context | vocabulary |\n|---|---|---|---|---|---|---|\n",
                "| {params} | {l} | {d} | {h} ({kv}) | {ff} | {ctx} | {v} |\n\n",
                "## Training\n\n",
                "| steps | tokens | tokens/s | wall time | stopped by |\n|---|---|---|---|---|\n",
                "| {steps} | {tokens} | {tps} | {wall} s | {stop} |\n\n",
                "## Quality\n\n",
                "| validation loss | bits per byte |\n|---|---|\n| {vl} | {bpb} |\n\n",
                "## Energy\n\n",
                "| joules | kWh | method | coverage | J/token | J/parameter | gCO2e (at {grid} g/kWh) |\n|---|---|---|---|---|---|---|\n",
                "| {j} | {kwh} | {method} | {cov} | {jt} | {jp} | {co2} |\n",
            ),
            name = name,
            run = run.display(),
            backend = self.backend,
            threads = self.threads,
            ver = env!("CARGO_PKG_VERSION"),
            params = c.num_params(),
            l = c.num_hidden_layers,
            d = c.hidden_size,
            h = c.num_attention_heads,
            kv = c.num_key_value_heads,
            ff = c.intermediate_size,
            ctx = c.max_position_embeddings,
            v = c.vocab_size,
            steps = self.steps,
            tokens = t.tokens,
            tps = f(t.tokens_per_s, 0),
            wall = f(t.wall_s, 1),
            stop = self.stop_reason,
            vl = f(q.val_loss, 4),
            bpb = f(q.val_bpb, 4),
            grid = f(e.grid_gco2_per_kwh, 0),
            j = f(e.joules, 1),
            kwh = f(e.kwh, 6),
            cov = e.coverage,
            method = e.method,
            jt = f(e.j_per_token, 5),
            jp = f(e.j_per_param, 6),
            co2 = f(e.gco2e, 3),
        );
        if let Some(d) = &self.sft {
            md.push_str(&format!(
                concat!(
                    "\n## Instruction data\n\n",
                    "| records | examples | dropped (too long) | truncated | dropped (no loss) | tokens | loss tokens | rows | padding |\n|---|---|---|---|---|---|---|---|---|\n",
                    "| {} | {} | {} | {} ({} tokens) | {} | {} | {} | {} | {}% |\n",
                ),
                d.records, d.examples, d.dropped_overlong, d.truncated, d.truncated_tokens, d.dropped_no_loss, d.tokens, d.loss_tokens, d.rows, f(100.0 * d.padding_share, 1)
            ));
        }
        if e.method == "estimate" {
            md.push_str("\nThe energy is an **estimate** (process CPU time x watts per busy core): no hardware counter was readable.\n");
        }
        if let Some(Target { val_loss, reached: Some(hit) }) = &self.target {
            md.push_str(&format!("\nReached the target validation loss {} at step {} after {} s and {} J.\n", f(*val_loss, 3), hit.step, f(hit.wall_s, 1), f(hit.joules, 1)));
        }
        if !self.evals.is_empty() {
            md.push_str(&kiln_evals::evals_markdown(&self.evals));
        }
        if svg {
            md.push_str("\n![loss against cumulative energy](report.svg)\n");
        }
        md
    }
}

/// `kiln compare`: a Markdown table of runs and an SVG of validation loss against training
/// energy, with the Pareto front marked.
pub fn compare(runs: &[&Path], out: &Path) -> Result<String> {
    use kiln_evals::report::{compare_svg, pareto_front, RunPoint};
    let mut reps = Vec::new();
    for r in runs {
        reps.push((r.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), Report::load(r)?));
    }
    let points: Vec<RunPoint> = reps.iter().map(|(n, v)| RunPoint { label: n.clone(), joules: v.energy.joules, quality: v.quality.val_loss }).collect();
    let front = pareto_front(&points);
    let mut table = String::from("| run | params | steps | tokens | val loss | val bpb | joules | method | J/token | gCO2e | Pareto |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    let f = |x: f64, d: usize| fmt_num(Some(x), d);
    for (i, (n, v)) in reps.iter().enumerate() {
        let (q, e) = (&v.quality, &v.energy);
        table.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            v.params, v.steps, v.throughput.tokens, f(q.val_loss, 4), f(q.val_bpb, 4), f(e.joules, 1), e.method, f(e.j_per_token, 5), f(e.gco2e, 3),
            if front.contains(&i) { "yes" } else { "" }
        ));
    }
    compare_svg(out, &points, "validation loss").map_err(|e| anyhow::anyhow!(e))?;
    Ok(table)
}
