//! Times the fused CPU kernels alone (forward + backward, no optimizer) on the bench-cpu shape,
//! for profiling: `cargo run --release -p kiln-models --example kernel_step [STEPS] [THREADS] [baseline]`
//! (`baseline`: the elementwise loops without their AVX-512 build).

use std::time::Instant;

use kiln_models::cpu_kernels::{BatchRef, Dims, Kernels};

fn main() {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let baseline = args.next().is_some_and(|s| s == "baseline");
    let dims = Dims { vocab: 69, d: 128, ffn: 384, heads: 4, kv_heads: 4, head_dim: 32, layers: 4, eps: 1e-5, tied: false };
    let (b, t) = (12, 64);
    let mut state = 12345u64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let len = Kernels::new(dims, vec![], vec![], 1).layout.len;
    let w: Vec<f32> = (0..len).map(|_| rnd() * 0.04).collect();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for pos in 0..t {
        for j in 0..32 {
            let a = pos as f64 / 10000f64.powf((2 * (j % 16)) as f64 / 32.0);
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let inputs: Vec<i64> = (0..b * t).map(|i| ((i * 7) % 69) as i64).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 1) % 69) as i64).collect();
    let mask = vec![1.0f32; b * t];
    let batch = BatchRef { inputs: &inputs, targets: &targets, mask: &mask, b, t, starts: None };
    let kern = Kernels::new(dims, cos, sin, threads);
    let kern = if baseline { kern.baseline() } else { kern };
    let mut g = vec![0.0f32; len];
    let mut times = Vec::new();
    let mut fwd = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        let p = kern.loss_and_grads(&w, &batch, Some(&mut g));
        times.push(t0.elapsed().as_secs_f64());
        fwd.push(p.forward_s);
    }
    times.sort_by(f64::total_cmp);
    fwd.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "median {:.2} ms (forward {:.2} ms), {:.0} tokens/s, {} threads",
        med * 1e3,
        fwd[fwd.len() / 2] * 1e3,
        (b * t) as f64 / med,
        threads
    );
}
