//! The training loop: step, evaluate, checkpoint, finish. [`Trainer::run`] is the whole loop on
//! one screen; each phase is a method below it. The step itself belongs to the engine
//! (`engine/`); energy, throughput and progress are reported around it (`accounting.rs`,
//! `progress.rs`), and data parallelism hooks into it as a gradient sync.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use kiln_models::checkpoint::{self, read_safetensors};
use kiln_models::init::{GrowVocab, RandomInit};
use kiln_models::Llama;
use serde::Serialize;

use crate::accounting::{EnergyLedger, Speed};
use crate::data::loader::{validation_batches, Batch, Batches, Loader};
use crate::data::pairs::PairLoader;
use crate::data::sft::ExampleLoader;
use crate::dist::{Dist, DistOptions};
use crate::engine::{Engine, EngineKind, StepOutput};
use crate::optim::{learning_rate, AdamW};
use crate::plan::{Corpus, Plan};
use crate::progress::Progress;
use crate::report::{self, Reached, Report};
use crate::run_dir::{RunDir, TrainState, Weights, CHECKPOINT_FORMAT};

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Finished,
    Stopped { step: usize },
}

/// What stopped the loop before `train.steps`, if anything.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Steps,
    TargetValLoss,
    MaxEnergy,
}

impl Stop {
    fn as_str(self) -> &'static str {
        match self {
            Stop::Steps => "steps",
            Stop::TargetValLoss => "target_val_loss",
            Stop::MaxEnergy => "max_energy_j",
        }
    }
}

pub struct Trainer<'a, B: AutodiffBackend> {
    plan: &'a Plan,
    run: &'a RunDir,
    device: B::Device,
    engine: Engine<B>,
    state: TrainState,
    loader: Batches,
    val: Vec<Batch>,
    metrics: crate::run_dir::Metrics,
    energy: EnergyLedger,
    speed: Speed,
    progress: Progress,
    /// Data parallelism: this worker's place, and how long a collective step may wait.
    dist: Option<(Dist, Duration)>,
    stop: Stop,
    reached: Option<Reached>,
    last_val: Option<(usize, f64, f64)>,
    started: Instant,
    wall0: f64,
}

impl<'a, B: AutodiffBackend> Trainer<'a, B> {
    /// The loop. Ctrl-C (`interrupt`) writes a checkpoint after the current step and returns.
    pub fn run(mut self, interrupt: &AtomicBool) -> Result<Outcome> {
        let plan = self.plan;
        let t = &plan.recipe.train;
        while self.state.step < t.steps {
            if interrupt.load(Ordering::SeqCst) {
                return self.interrupted();
            }
            let step = self.state.step + 1;
            let lr = learning_rate(&plan.recipe.optim, step, t.steps);
            let out = self.step(step, lr)?;
            self.log_step(step, lr, &out)?;
            if (t.eval_every > 0 && step % t.eval_every == 0) || step == t.steps {
                self.validate(step)?;
            }
            let e = &plan.recipe.eval;
            if self.is_main() && e.every > 0 && step % e.every == 0 && step != t.steps && !plan.tasks.is_empty() {
                self.tasks_during_training(step)?;
            }
            if self.stop == Stop::Steps && t.max_energy_j.is_some_and(|m| self.state.joules >= m) {
                self.stop = Stop::MaxEnergy;
            }
            if self.stop != Stop::Steps {
                tracing::info!("stopping at step {step}: {} reached", self.stop.as_str());
                self.checkpoint_if_main()?;
                break;
            }
            if (t.checkpoint_every > 0 && step % t.checkpoint_every == 0) || step == t.steps {
                self.checkpoint_if_main()?;
            }
        }
        self.finish()
    }

    /// A fresh run: random weights (or the `init` model's), fresh AdamW; under LoRA, the frozen
    /// `init` model with fresh adapters (or, where `init` is an adapter folder, that adapter on
    /// its base).
    pub fn start(plan: &'a Plan, run: &'a RunDir, dist: Option<&DistOptions>, device: &B::Device) -> Result<Self> {
        let model = match (&plan.init_dir, &plan.lora) {
            (Some(_), Some(_)) => crate::lora::lora_model(plan, None, device)?,
            (Some(dir), None) => Llama::<B>::build(&plan.model, &mut GrowVocab { inner: checkpoint::weight_source(dir)?, from: plan.init_vocab }, device)?,
            (None, _) => Llama::<B>::build(&plan.model, &mut RandomInit::new(plan.recipe.train.seed, plan.model.num_hidden_layers), device)?,
        };
        Self::new(plan, run, model, AdamW::new(plan.recipe.optim.clone()), TrainState::fresh(), dist, device)
    }

    /// Continues `run` from its newest complete checkpoint.
    pub fn resume(plan: &'a Plan, run: &'a RunDir, device: &B::Device) -> Result<Self> {
        let (step, ck) = run
            .latest_checkpoint()
            .with_context(|| format!("{}: no complete checkpoint under checkpoints/ to resume from", run.path.display()))?;
        let state: TrainState = serde_json::from_str(&std::fs::read_to_string(ck.join("state.json"))?)
            .with_context(|| format!("{}: state.json is damaged", ck.display()))?;
        if state.format_version != CHECKPOINT_FORMAT {
            bail!("{}: checkpoint format {} (this Kiln reads {CHECKPOINT_FORMAT})", ck.display(), state.format_version);
        }
        let (model, trained) = match &plan.lora {
            // LoRA: the frozen base again, and the checkpoint's adapters.
            Some(_) => {
                let adapter = kiln_models::lora::Adapter::read_dir(&ck)?;
                let model = crate::lora::lora_model(plan, Some((adapter, ck.clone())), device)?;
                let sizes = kiln_models::lora_params::param_sizes(&model);
                (model, sizes)
            }
            None => {
                let (model, cfg, _) = checkpoint::load_dir::<B>(&ck, device)?;
                if cfg != plan.model {
                    bail!("{}: the checkpoint's model config differs from plan.toml's", ck.display());
                }
                let sizes = checkpoint::param_sizes(&model);
                (model, sizes)
            }
        };
        let mut opt = AdamW::new(plan.recipe.optim.clone());
        opt.load_host(read_safetensors(&ck.join("optimizer.safetensors"))?, &trained, device)
            .with_context(|| format!("{}: optimizer.safetensors", ck.display()))?;
        opt.t = state.optimizer_steps;
        run.truncate_metrics(step)?;
        run.remove_partial_checkpoints();
        tracing::info!("resuming {} from step {step}", run.path.display());
        Self::new(plan, run, model, opt, state, None, device)
    }

    fn new(plan: &'a Plan, run: &'a RunDir, mut model: Llama<B>, mut opt: AdamW<B::InnerBackend>, state: TrainState, dist: Option<&DistOptions>, device: &B::Device) -> Result<Self> {
        let t = &plan.recipe.train;
        let context = plan.model.max_position_embeddings;
        let (loader, val) = match &plan.data.corpus {
            Corpus::Tokens { train, val } => {
                (Batches::Windows(Loader::new(train.clone(), context, t.batch_size, t.seed, state.loader)), validation_batches(val, context, t.batch_size, t.eval_batches))
            }
            Corpus::Examples(d) => {
                let pad = plan.tok.pad_id;
                let packed = plan.recipe.data.packing;
                let val = ExampleLoader::new(d.val.clone(), packed, context, t.batch_size, t.seed, pad, Default::default()).in_order(t.eval_batches);
                (Batches::Examples(ExampleLoader::new(d.train.clone(), packed, context, t.batch_size, t.seed, pad, state.loader)), val)
            }
            Corpus::Pairs(d) => {
                let pad = plan.tok.pad_id;
                let val = PairLoader::new(d.val.clone(), t.batch_size, t.seed, pad, d.tau, Default::default()).in_order(t.eval_batches);
                (Batches::Pairs(PairLoader::new(d.train.clone(), t.batch_size, t.seed, pad, d.tau, state.loader)), val)
            }
        };
        let metrics = run.metrics()?;
        let progress = Progress::new(t.steps, state.step, t.log_every, plan.device.gpu_name().is_some());
        let energy = EnergyLedger::open(&plan.recipe.energy, &plan.device, &state)?;
        // Data parallelism: join the other workers; rank 0 alone writes checkpoints and reports.
        let dist = match dist {
            Some(_) if t.max_energy_j.is_some() => {
                bail!("train.max_energy_j is not supported with --nodes: each worker meters its own energy, so they could stop at different steps")
            }
            Some(o) => Some((Dist::join::<B::InnerBackend>(o, device)?, o.step_timeout)),
            None => None,
        };
        crate::model_setup::configure(&mut model, plan);
        let model = crate::model_setup::pad_vocab(model, &mut opt, plan, device);
        let cache = plan.recipe.retriever.as_ref().is_some_and(|r| r.gradient_cache);
        let engine = Engine::new(plan.engine, model, opt, &plan.model, plan.threads, plan.recipe.train.gradient_checkpointing, cache);
        let speed = Speed::new(plan.model.flops_per_token(), crate::perf::peak_flops(plan.device.gpu_name(), plan.precision));
        let wall0 = state.wall_s;
        Ok(Self { plan, run, device: device.clone(), engine, state, loader, val, metrics, energy, speed, progress, dist, stop: Stop::Steps, reached: None, last_val: None, started: Instant::now(), wall0 })
    }

    fn is_main(&self) -> bool {
        self.dist.as_ref().is_none_or(|(d, _)| d.rank == 0)
    }

    fn wall(&self) -> f64 {
        self.wall0 + self.started.elapsed().as_secs_f64()
    }

    /// One optimizer step. Every worker draws the step's `nodes × grad_accum` micro-batches and
    /// trains on its own share; the engine syncs the gradients before the update.
    fn step(&mut self, step: usize, lr: f64) -> Result<StepOutput> {
        let t = &self.plan.recipe.train;
        let (nodes, rank) = self.dist.as_ref().map_or((1, 0), |(d, _)| (d.nodes, d.rank));
        let all: Vec<Batch> = (0..t.grad_accum * nodes).map(|_| self.loader.next_batch()).collect();
        let micro = &all[rank * t.grad_accum..(rank + 1) * t.grad_accum];
        let t0 = Instant::now();
        let device = &self.device;
        let mut out = match &self.dist {
            None => self.engine.step(micro, lr, device, None)?,
            Some((d, timeout)) => {
                let mut hook = |g, l| -> Result<_> {
                    Ok((d.all_reduce_grads::<B::InnerBackend>(g, step, *timeout)?, d.mean::<B::InnerBackend>(l, device, step, *timeout)?))
                };
                self.engine.step(micro, lr, device, Some(&mut hook))?
            }
        };
        out.tokens *= nodes;
        let dt = t0.elapsed().as_secs_f64();
        // A non-finite loss or gradient norm stops the run here: no checkpoint, no final/ (the CPU
        // kernels skip such an update; on Burn's graph it is dropped with the process).
        if !(out.loss.is_finite() && out.grad_norm.is_finite()) {
            self.progress.abandon();
            let last = self.run.latest_checkpoint().map(|(_, p)| p.display().to_string()).unwrap_or_else(|| "none yet".into());
            bail!(
                "loss is {}, gradient norm {} at step {step}; training stopped\n  last good checkpoint: {last}\n  hint: lower optim.lr, raise optim.warmup_steps or set optim.grad_clip",
                out.loss,
                out.grad_norm
            );
        }
        self.state.step = step;
        self.state.tokens += out.tokens as u64;
        self.state.train_s += dt;
        self.state.loader = self.loader.pos();
        self.state.optimizer_steps = self.engine.optimizer_steps();
        self.state.joules = self.energy.training_joules();
        self.state.energy_method = self.energy.method.clone();
        let first = self.speed.first_step_s.is_none();
        let tps = self.speed.record(out.tokens, dt, &self.plan.device);
        // A GPU's first step compiles every kernel it launches and autotunes the matmuls and
        // reductions (the progress bar says so before it); say how long that took.
        if first && self.plan.device.gpu_name().is_some() {
            tracing::info!("step {step} took {dt:.1} s, compiling and autotuning its GPU kernels included (cached in $KILN_CACHE/cubecl for later runs); the next steps run at steady speed");
        }
        self.progress.step(step, out.loss, lr, out.grad_norm, tps);
        Ok(out)
    }

    /// The step's line in `metrics.jsonl`.
    fn log_step(&mut self, step: usize, lr: f64, out: &StepOutput) -> Result<()> {
        let last_tps = self.speed.last();
        let line = StepLine {
            step,
            loss: out.loss,
            lr,
            grad_norm: out.grad_norm,
            tokens: self.state.tokens,
            tokens_per_s: last_tps,
            mfu: self.speed.mfu(last_tps),
            wall_s: self.wall(),
            joules: self.state.joules,
            energy_method: &self.energy.method,
            forward_s: out.forward_s,
            backward_s: out.backward_s,
            optim_s: out.optim_s,
            peak_mem_bytes: self.speed.peak_mem.map(|m| m.1),
            mem_kind: self.speed.peak_mem.map(|m| m.0),
        };
        self.metrics.log(&line)
    }

    /// Validation loss and bits per byte; checks `train.target_val_loss`.
    fn validate(&mut self, step: usize) -> Result<()> {
        let vl = self.engine.eval_loss(&self.val, &self.device);
        let bpb = vl / std::f64::consts::LN_2 / self.plan.data.bytes_per_token;
        self.metrics.log(&EvalLine { step, kind: "eval", val_loss: vl, val_bpb: bpb })?;
        self.progress.eval(step, vl, bpb);
        self.last_val = Some((step, vl, bpb));
        if self.plan.recipe.train.target_val_loss.is_some_and(|target| vl <= target) {
            self.reached = Some(Reached { step, val_loss: vl, tokens: self.state.tokens, wall_s: self.wall(), joules: self.state.joules });
            self.stop = Stop::TargetValLoss;
        }
        Ok(())
    }

    /// The recipe's eval tasks mid-run (`eval.every`); their joules are not training's.
    fn tasks_during_training(&mut self, step: usize) -> Result<()> {
        let (plan, kind, device) = (self.plan, self.engine.kind(), &self.device);
        let model = self.engine.model();
        let evals = self.energy.excluding(|meters| run_tasks(plan, model, meters, device, kind))?;
        self.metrics.log(&TasksLine { step, kind: "tasks", joules: self.state.joules, tokens: self.state.tokens, evals })
    }

    fn checkpoint_if_main(&mut self) -> Result<Option<std::path::PathBuf>> {
        self.state.wall_s = self.wall();
        if !self.is_main() {
            return Ok(None);
        }
        let keep = self.plan.recipe.train.keep_checkpoints;
        let weights = match self.engine.adapter(crate::lora::adapter_base(self.plan)) {
            Some(a) => Weights::Adapter(a),
            None => Weights::Full(self.engine.weights()),
        };
        Ok(Some(self.run.save_checkpoint(weights, self.plan, &self.engine.optimizer_tensors(), &self.state, keep)?))
    }

    /// Ctrl-C: a checkpoint after the current step, and how to resume.
    fn interrupted(mut self) -> Result<Outcome> {
        self.progress.abandon();
        let step = self.state.step;
        match self.checkpoint_if_main()? {
            Some(ck) => eprintln!("stopped at step {step}; checkpoint {}\nresume with: kiln resume {}", ck.display(), self.run.path.display()),
            None => eprintln!("rank {}: stopped at step {step}", self.dist.as_ref().map_or(0, |(d, _)| d.rank)),
        }
        Ok(Outcome::Stopped { step })
    }

    /// After the last step: the final validation, `final/`, the eval tasks and the report.
    fn finish(mut self) -> Result<Outcome> {
        self.progress.finish();
        self.state.wall_s = self.wall();
        if let Some((d, _)) = &self.dist {
            d.finish::<B::InnerBackend>();
            if d.rank != 0 {
                println!("rank {}: finished {} steps; rank 0 writes the model and the report", d.rank, self.state.step);
                return Ok(Outcome::Finished);
            }
        }
        let (val_loss, val_bpb) = match self.last_val {
            Some((s, vl, bpb)) if s == self.state.step => (vl, bpb),
            _ => {
                let vl = self.engine.eval_loss(&self.val, &self.device);
                (vl, vl / std::f64::consts::LN_2 / self.plan.data.bytes_per_token)
            }
        };
        let final_dir = self.run.path.join("final");
        if !final_dir.exists() {
            match self.engine.adapter(crate::lora::adapter_base(self.plan)) {
                Some(a) => a.save_dir(&final_dir)?,
                None => checkpoint::save_weights_dir(&final_dir, self.engine.weights(), &self.plan.model, &self.plan.tok)?,
            }
        }
        // Training is over (its last checkpoint is written): the gradients and AdamW moments go
        // before the eval tasks need memory of their own.
        self.engine.finish_training();
        let evals = if self.plan.tasks.is_empty() {
            Default::default()
        } else {
            let kind = self.engine.kind();
            run_tasks(self.plan, self.engine.model(), &mut self.energy.meters, &self.device, kind)?
        };
        let report = self.report(report::Quality { val_loss, val_bpb }, evals);
        report.write(&self.run.path, &self.plan.recipe.name, &self.plan.model)?;
        println!("{}", summary(self.plan, &report, &final_dir));
        Ok(Outcome::Finished)
    }

    fn report(&self, quality: report::Quality, evals: kiln_evals::Evals) -> Report {
        let (plan, state) = (self.plan, &self.state);
        let params = plan.model.num_params();
        Report {
            run: self.run.name(),
            quality,
            throughput: self.speed.report(state, plan.precision.as_str()),
            energy: self.energy.report(state, params, plan.recipe.energy.grid_gco2_per_kwh),
            memory: report::Memory { peak_bytes: self.speed.peak_mem.map(|m| m.1), kind: self.speed.peak_mem.map(|m| m.0.to_string()) },
            params,
            steps: state.step,
            stop_reason: self.stop.as_str().into(),
            evals,
            target: plan.recipe.train.target_val_loss.map(|val_loss| report::Target { val_loss, reached: self.reached.clone() }),
            backend: plan.backend(),
            threads: plan.threads,
            workers: self.dist.as_ref().map_or(1, |(d, _)| d.nodes),
            sft: match &plan.data.corpus {
                crate::plan::Corpus::Examples(d) => Some(d.stats.clone()),
                crate::plan::Corpus::Tokens { .. } | crate::plan::Corpus::Pairs(_) => None,
            },
        }
    }
}

/// Runs the plan's eval tasks on the current weights (without autodiff), each with its own
/// energy figure.
fn run_tasks<B: AutodiffBackend>(plan: &Plan, model: &Llama<B>, meters: &mut kiln_evals::energy::Meters, device: &B::Device, kind: EngineKind) -> Result<kiln_evals::Evals> {
    let inner: Llama<B::InnerBackend> = model.valid();
    let lm = kiln_evals::ModelScorer::<B::InnerBackend> { model: &inner, tok: &plan.tok, context: plan.model.max_position_embeddings, device: device.clone() };
    crate::engine::with_scorer(lm, &plan.model, kind, plan.threads, |lm| {
        Ok(kiln_evals::run_tasks(&plan.tasks, lm, meters, |n, v| tracing::info!("eval {}", kiln_evals::summary_line(n, v)))?)
    })
}

/// The report printed at the end of `kiln run`.
fn summary(plan: &Plan, r: &Report, final_dir: &std::path::Path) -> String {
    let (c, t, e) = (&plan.model, &r.throughput, &r.energy);
    let steady = match (t.steady_tokens_per_s, t.first_step_s) {
        (Some(s), Some(f)) => {
            let mfu = t.steady_mfu.map(|m| format!(", MFU {:.1}%", m * 100.0)).unwrap_or_default();
            format!("\nsteady      {s:.0} tokens/s from step 4 on{mfu} (step 1 took {f:.1} s)")
        }
        _ => String::new(),
    };
    format!(
        "\n== Kiln report: {} ==\nmodel       {} parameters ({} layers, d_model {})\nsteps       {} ({} tokens)\nval loss    {:.4}\nval bpb     {:.4}\nthroughput  {:.0} tokens/s on {} ({} threads){steady}\nwall time   {:.1} s\nenergy      {:.1} J ({}; {:.2e} J/token, {:.2e} gCO2e)\nfinal model {}",
        plan.recipe.name, c.num_params(), c.num_hidden_layers, c.hidden_size, r.steps, t.tokens, r.quality.val_loss, r.quality.val_bpb,
        t.tokens_per_s, r.backend, r.threads, t.wall_s, e.joules, e.method, e.j_per_token, e.gco2e, final_dir.display()
    )
}

/// A step's line in `metrics.jsonl`.
#[derive(Serialize)]
struct StepLine<'a> {
    step: usize,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens: u64,
    tokens_per_s: f64,
    mfu: Option<f64>,
    wall_s: f64,
    joules: f64,
    energy_method: &'a str,
    forward_s: f64,
    backward_s: f64,
    optim_s: f64,
    peak_mem_bytes: Option<u64>,
    mem_kind: Option<&'static str>,
}

/// A validation line in `metrics.jsonl`.
#[derive(Serialize)]
struct EvalLine {
    step: usize,
    kind: &'static str,
    val_loss: f64,
    val_bpb: f64,
}

/// The eval tasks' line in `metrics.jsonl` (`eval.every`).
#[derive(Serialize)]
struct TasksLine {
    step: usize,
    kind: &'static str,
    joules: f64,
    tokens: u64,
    evals: kiln_evals::Evals,
}
