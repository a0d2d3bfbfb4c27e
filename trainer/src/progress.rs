//! What a run shows while it trains: a progress bar on a terminal, log lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    tty: bool,
    steps: usize,
    log_every: usize,
}

impl Progress {
    /// A bar for `steps` steps, at `pos`. On a GPU the first step compiles kernels: the bar says
    /// so, or the run looks hung.
    pub fn new(steps: usize, pos: usize, log_every: usize, gpu: bool) -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if tty { ProgressBar::new(steps as u64) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(pos as u64);
        if gpu {
            let msg = "first step: compiling GPU kernels and autotuning matmuls and reductions (minutes on a GPU Kiln has not run on; cached for later runs)";
            bar.set_message(msg);
            bar.enable_steady_tick(std::time::Duration::from_millis(500));
            if !tty {
                tracing::info!("{msg}");
            }
        }
        Self { bar, tty, steps, log_every: log_every.max(1) }
    }

    pub fn step(&self, step: usize, loss: f64, lr: f64, grad_norm: f64, tps: f64) {
        self.bar.set_position(step as u64);
        self.bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        if !self.tty && (step % self.log_every == 0 || step == 1) {
            tracing::info!("step {step}/{} loss {loss:.4} lr {lr:.2e} grad_norm {grad_norm:.3} {tps:.0} tok/s", self.steps);
        }
    }

    pub fn eval(&self, step: usize, val_loss: f64, val_bpb: f64) {
        self.bar.println(format!("step {step}: val_loss {val_loss:.4} val_bpb {val_bpb:.4}"));
        if !self.tty {
            tracing::info!("step {step}: val_loss {val_loss:.4} val_bpb {val_bpb:.4}");
        }
    }

    /// Leaves the bar where it is (the run stopped early).
    pub fn abandon(&self) {
        self.bar.abandon();
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
