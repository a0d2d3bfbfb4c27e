//! Data-parallel training, one process per device (as torchrun does), over Burn's own collective
//! machinery: `burn-collective`'s global orchestrator (`kiln coordinator`) and
//! `GradientsParams::all_reduce`.
//!
//! Each step, every worker draws the same `nodes x grad_accum` micro-batches from the (identical,
//! seeded) loader and trains on its own `grad_accum` of them; gradients are averaged across
//! workers before clipping and AdamW, so every worker takes the same step and the models stay
//! identical. N workers with `batch_size = b` and `grad_accum = k` therefore train exactly as one
//! process with `batch_size = b` and `grad_accum = N*k`: the global batch is `N*k*b` sequences,
//! and the learning rate is the one tuned for that global batch (scale it yourself when you
//! change N, e.g. linearly or by sqrt(N)).
//!
//! Burn's collective layer has no timeouts (connecting retries forever; a dead peer panics in
//! its ring), so Kiln adds a watchdog: a deadline to join and a deadline per collective step. On
//! expiry it prints which rank waited on what, and exits with status 3; checkpoints are written
//! atomically by rank 0, so the last one stays intact.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

/// This process's place in a data-parallel run.
#[derive(Debug, Clone)]
pub struct DistOptions {
    pub nodes: usize,
    pub rank: usize,
    /// `HOST:PORT` of `kiln coordinator`.
    pub coordinator: String,
    /// `HOST:PORT` where this worker serves its tensors to the others.
    pub node_addr: String,
    pub connect_timeout: Duration,
    pub step_timeout: Duration,
}

/// A joined worker. Collective calls go through [`Dist::all_reduce_grads`] and
/// [`Dist::mean`], each under the step watchdog.
pub struct Dist {
    pub rank: usize,
    pub nodes: usize,
    watchdog: Watchdog,
}

const LOST: &str = "a worker died or lost its connection; the last checkpoint (written by rank 0) is intact, and `kiln resume RUN_DIR` continues from it on one process";

fn ws(addr: &str) -> String {
    if addr.starts_with("ws://") { addr.to_string() } else { format!("ws://{addr}") }
}

fn port_of(addr: &str) -> Result<u16> {
    addr.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).with_context(|| format!("'{addr}': expected HOST:PORT"))
}

/// `kiln coordinator --listen HOST:PORT`: runs burn-collective's global orchestrator until
/// interrupted.
pub fn run_coordinator(listen: &str) -> Result<()> {
    let port = port_of(listen)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the coordinator's runtime")?;
    eprintln!("kiln coordinator listening on port {port} (workers: --coordinator {listen}); Ctrl-C stops it");
    rt.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// A panic's message (`panic!` payloads are a `String` or a `&str`).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Deadlines for blocking collective calls: a thread that exits the process with a clear message
/// when a call outlives its deadline (the call itself cannot be cancelled).
struct Watchdog {
    /// Milliseconds since `t0` at which the current call expires; 0 when none is running.
    deadline_ms: Arc<AtomicU64>,
    what: Arc<std::sync::Mutex<String>>,
    t0: Instant,
}

impl Watchdog {
    fn new(rank: usize) -> Self {
        let deadline_ms = Arc::new(AtomicU64::new(0));
        let what = Arc::new(std::sync::Mutex::new(String::new()));
        let t0 = Instant::now();
        let (d, w) = (deadline_ms.clone(), what.clone());
        std::thread::Builder::new()
            .name("kiln-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let due = d.load(Ordering::SeqCst);
                if due != 0 && t0.elapsed().as_millis() as u64 > due {
                    let what = w.lock().map(|s| s.clone()).unwrap_or_default();
                    eprintln!("error: rank {rank}: {what}\n  hint: {LOST}");
                    // No exit handlers: another thread may hold a lock they need.
                    // SAFETY: _exit ends the process at once; nothing is left half-written (checkpoints are atomic).
                    unsafe { libc::_exit(3) };
                }
            })
            .ok();
        Self { deadline_ms, what, t0 }
    }

    /// Runs `f` under a deadline, described by `what` if it expires. A panic inside `f` (Burn's
    /// collective code panics when a peer disappears) becomes an error.
    fn guard<T>(&self, timeout: Duration, what: String, f: impl FnOnce() -> T) -> Result<T> {
        if let Ok(mut w) = self.what.lock() {
            *w = what.clone();
        }
        self.deadline_ms.store(self.t0.elapsed().as_millis() as u64 + timeout.as_millis() as u64, Ordering::SeqCst);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        self.deadline_ms.store(0, Ordering::SeqCst);
        r.map_err(|p| anyhow::anyhow!("{what} failed: the collective layer panicked ({}); a peer probably died", panic_text(p.as_ref())))
    }
}

impl Dist {
    /// Registers with the coordinator; returns when all `nodes` workers have joined.
    pub fn join<B: Backend>(o: &DistOptions, device: &B::Device) -> Result<Self> {
        if o.nodes < 2 {
            bail!("--nodes {}: data-parallel training needs at least 2 workers (leave --nodes out for one process)", o.nodes);
        }
        if o.rank >= o.nodes {
            bail!("--node-rank {} must be below --nodes {}", o.rank, o.nodes);
        }
        let config = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(o.nodes as u32)
            .with_global_address(burn_communication::Address::from_str(&ws(&o.coordinator)).map_err(anyhow::Error::msg)?)
            .with_node_address(burn_communication::Address::from_str(&ws(&o.node_addr)).map_err(anyhow::Error::msg)?)
            .with_data_service_port(port_of(&o.node_addr)?)
            // Ring fails on one-element tensors (the loss) in 0.21; a binary tree works for any size.
            .with_global_all_reduce_strategy(burn_collective::AllReduceStrategy::Tree(2));
        let watchdog = Watchdog::new(o.rank);
        // Burn's collective tasks panic when a peer disappears (upstream has no error path there).
        // Say so in one line; the step that waited on them then fails with a clear error.
        let rank = o.rank;
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("main") {
                return default_hook(info);
            }
            let at = info.location().map(|l| format!(" ({}:{})", l.file(), l.line())).unwrap_or_default();
            eprintln!("warning: rank {rank}: a collective background task failed: {}{at}", panic_text(info.payload()));
        }));
        tracing::info!("rank {}/{}: joining through the coordinator at {}", o.rank, o.nodes, o.coordinator);
        let what = format!(
            "could not join the data-parallel run within {} s (coordinator {}, {} workers expected)",
            o.connect_timeout.as_secs(),
            o.coordinator,
            o.nodes
        );
        watchdog
            .guard(o.connect_timeout, what.clone(), || burn_collective::register::<B>(PeerId(o.rank as u32), device.clone(), config))?
            .map_err(|e| anyhow::anyhow!("{what}: {e:?}"))?;
        tracing::info!("rank {}/{}: all workers joined", o.rank, o.nodes);
        Ok(Self { rank: o.rank, nodes: o.nodes, watchdog })
    }

    /// Averages gradients across workers (in parameter-id order, the same in every process since
    /// ids derive from parameter names).
    pub fn all_reduce_grads<B: Backend>(&self, grads: GradientsParams, step: usize, timeout: Duration) -> Result<GradientsParams> {
        let what = format!("step {step}: no answer from the other workers within {} s while averaging gradients", timeout.as_secs());
        self.watchdog
            .guard(timeout, what, || grads.all_reduce::<B>(PeerId(self.rank as u32), ReduceOperation::Mean))?
            .map_err(|e| anyhow::anyhow!("step {step}: averaging gradients across workers failed: {e:?}\n  hint: {LOST}"))
    }

    /// The mean of a scalar across workers (the step's loss).
    pub fn mean<B: Backend>(&self, x: f64, device: &B::Device, step: usize, timeout: Duration) -> Result<f64> {
        use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};
        let t = Tensor::<B, 1>::from_floats([x as f32], device).into_primitive().tensor();
        let what = format!("step {step}: no answer from the other workers within {} s while averaging the loss", timeout.as_secs());
        let out = self
            .watchdog
            .guard(timeout, what, || burn_collective::all_reduce::<B>(PeerId(self.rank as u32), t, ReduceOperation::Mean))?
            .map_err(|e| anyhow::anyhow!("step {step}: averaging the loss across workers failed: {e:?}\n  hint: {LOST}"))?;
        Ok(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(out)).into_scalar().elem::<f64>())
    }

    pub fn finish<B: Backend>(&self) {
        let _ = self.watchdog.guard(Duration::from_secs(30), "leaving the collective".into(), || burn_collective::finish_collective::<B>(PeerId(self.rank as u32)));
    }
}
