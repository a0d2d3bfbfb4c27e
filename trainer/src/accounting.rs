//! What a run's steps cost: energy from the meters (with evaluation's share kept out of the
//! training figure) and throughput (tokens/s, MFU, first-step time, peak memory). The training
//! loop reports each step here; the report reads the totals.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use kiln_evals::energy::{Component, Meters};
use kiln_recipes::EnergySection;

use crate::device::Device;
use crate::report;
use crate::run_dir::TrainState;

/// The energy meters, and the joules of this session and the earlier ones.
pub struct EnergyLedger {
    pub meters: Meters,
    /// How the joules were measured (`counter`, `polled`, `estimate`).
    pub method: String,
    /// Training joules of earlier sessions of this run.
    joules0: f64,
    /// This session's task-eval joules, kept out of the training figure.
    eval_j: f64,
    /// Seconds spent reading the meters.
    meter_s: f64,
    components: Vec<Component>,
}

impl EnergyLedger {
    /// The meters `e.meter` names (`auto`: what this machine can read), continuing `state`'s total.
    pub fn open(e: &EnergySection, device: &Device, state: &TrainState) -> Result<Self> {
        let gpu = crate::perf::gpu_info(device);
        let (meters, notes) = Meters::choose(e.meter, Path::new(&e.powercap_root), e.watts_per_core, e.idle_watts, gpu.as_ref())
            .map_err(|m| anyhow::anyhow!("energy.meter: {m}"))?;
        for n in notes {
            tracing::warn!("{n}");
        }
        let method = meters.method().as_str().to_string();
        if !state.energy_method.is_empty() && state.energy_method != method {
            tracing::warn!("this run measured energy by '{}' before and by '{method}' now", state.energy_method);
        }
        Ok(Self { meters, method, joules0: state.joules, eval_j: 0.0, meter_s: 0.0, components: Vec::new() })
    }

    /// Reads the meters after a step: the run's training joules so far, all sessions.
    pub fn training_joules(&mut self) -> f64 {
        let tm = Instant::now();
        let (j, comps, errors) = self.meters.read();
        self.meter_s += tm.elapsed().as_secs_f64();
        for err in errors {
            tracing::warn!("energy: {err}");
        }
        self.components = comps;
        self.joules0 + j - self.eval_j
    }

    /// Runs `f` (evaluation during training) and keeps its joules out of the training figure.
    pub fn excluding<R>(&mut self, f: impl FnOnce(&mut Meters) -> R) -> R {
        let (j0, _, _) = self.meters.read();
        let r = f(&mut self.meters);
        self.eval_j += self.meters.read().0 - j0;
        r
    }

    /// The report's energy section for `state` (its joules and tokens), `params` parameters.
    pub fn report(&self, state: &TrainState, params: usize, grid_gco2_per_kwh: f64) -> report::Energy {
        let j = state.joules;
        report::Energy {
            joules: j,
            kwh: j / 3.6e6,
            method: state.energy_method.clone(),
            coverage: self.components.iter().map(|c| c.coverage.clone()).collect::<Vec<_>>().join("+"),
            components: self.components.clone(),
            j_per_token: j / (state.tokens.max(1) as f64),
            j_per_param: j / params as f64,
            gco2e: j / 3.6e6 * grid_gco2_per_kwh,
            grid_gco2_per_kwh,
            meter_overhead_s: self.meter_s,
            note: "this session's components; joules include earlier sessions of a resumed run".into(),
        }
    }
}

/// Tokens/s per step, MFU against the device's peak, and peak memory.
pub struct Speed {
    flops_per_token: f64,
    peak_flops: Option<f64>,
    /// This session's per-step tokens/s, for the steady-state figure.
    step_tps: Vec<f64>,
    pub first_step_s: Option<f64>,
    pub peak_mem: Option<(&'static str, u64)>,
}

impl Speed {
    pub fn new(flops_per_token: f64, peak_flops: Option<f64>) -> Self {
        Self { flops_per_token, peak_flops, step_tps: Vec::new(), first_step_s: None, peak_mem: None }
    }

    /// Records a step of `tokens` in `dt` seconds; returns its tokens/s.
    pub fn record(&mut self, tokens: usize, dt: f64, device: &Device) -> f64 {
        if let Some((kind, b)) = crate::perf::peak_memory(device) {
            self.peak_mem = Some((kind, self.peak_mem.map_or(b, |(_, m)| m.max(b))));
        }
        let tps = tokens as f64 / dt;
        self.step_tps.push(tps);
        self.first_step_s.get_or_insert(dt);
        tps
    }

    /// The last step's tokens/s.
    pub fn last(&self) -> f64 {
        self.step_tps.last().copied().unwrap_or(0.0)
    }

    pub fn mfu(&self, tokens_per_s: f64) -> Option<f64> {
        crate::perf::mfu(self.flops_per_token, tokens_per_s, self.peak_flops)
    }

    /// The report's throughput section.
    pub fn report(&self, state: &TrainState, precision: &str) -> report::Throughput {
        let mean = state.tokens as f64 / state.train_s.max(1e-9);
        let steady = steady_tokens_per_s(&self.step_tps);
        report::Throughput {
            tokens_per_s: mean,
            flops_per_token: self.flops_per_token,
            mfu: self.mfu(mean),
            steady_tokens_per_s: steady,
            steady_mfu: steady.and_then(|s| self.mfu(s)),
            first_step_s: self.first_step_s,
            precision: precision.to_string(),
            tokens: state.tokens,
            wall_s: state.wall_s,
            train_s: state.train_s,
        }
    }
}

/// Steady-state tokens/s: the median over this session's steps from the 4th on, leaving out the
/// first steps, where a GPU backend compiles and autotunes its kernels (27 s to minutes on an
/// H200, against 0.15 s for a later step). `None` with fewer than 4 steps.
pub fn steady_tokens_per_s(step_tps: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = step_tps.iter().skip(3).copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}
