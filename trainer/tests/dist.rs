//! Data-parallel training over burn-collective: two worker processes on loopback (CPU devices)
//! train exactly as one process with the same global batch, and a worker that dies makes the
//! other fail with a clear error, keeping the last checkpoint, instead of hanging.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burn::module::Module;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

const RECIPE: &str = r#"
name = "dp"
[model]
preset = "tiny"
[data]
sources = ["corpus.txt"]
[optim]
warmup_steps = 5
[train]
device = "cpu"
steps = 30
batch_size = 3
eval_every = 15
eval_batches = 2
checkpoint_every = 5
log_every = 1
"#;

/// A loopback port nobody listens on. Taken below Linux's ephemeral range (32768-60999), so that
/// no outgoing connection (the workers make many) can take it between this check and the bind of
/// the process it is meant for; distinct within this test binary, whose tests run in parallel.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1_000) as u16 * 10;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::SeqCst) % 2_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let text: String = (0..600).map(|i| format!("Line {i}: the quick brown fox {} over the lazy dog.\n", ["jumps", "leaps", "runs"][i % 3])).collect();
    std::fs::write(dir.path().join("data/corpus.txt"), text).unwrap();
    std::fs::write(dir.path().join("dp.toml"), RECIPE).unwrap();
    dir
}

fn kiln(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(KILN);
    c.args(args)
        .current_dir(dir)
        .env("KILN_DATA", dir.join("data"))
        .env("KILN_CACHE", dir.join("cache"))
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "info");
    c
}

fn worker(dir: &Path, rank: usize, coord: u16, extra: &[&str]) -> Command {
    let node = format!("127.0.0.1:{}", free_port());
    let coord = format!("127.0.0.1:{coord}");
    let mut args = vec!["run", "dp.toml", "--runs-dir", "dp", "--nodes", "2", "--coordinator", &coord, "--node-addr", &node, "--connect-timeout-s", "60"];
    let r = rank.to_string();
    args.extend(["--node-rank", &r]);
    args.extend(extra);
    let mut c = kiln(dir, &args);
    // Files, not pipes: an unread pipe would block a chatty worker.
    let log = std::fs::File::create(dir.join(format!("w{rank}.log"))).unwrap();
    c.stdout(log.try_clone().unwrap()).stderr(log);
    c
}

/// `kiln coordinator` on a free loopback port, stopped when the guard drops.
fn coordinator(dir: &Path) -> (Kill, u16) {
    let port = free_port();
    let c = kiln(dir, &["coordinator", "--listen", &format!("127.0.0.1:{port}")]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    (Kill(c), port)
}

/// Waits for worker `rank`; returns its status and its log.
fn wait_with_timeout(dir: &Path, rank: usize, mut c: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let t0 = Instant::now();
    let log = || std::fs::read_to_string(dir.join(format!("w{rank}.log"))).unwrap_or_default();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return (s, log());
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            panic!("worker {rank} hung for {limit:?}:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn only_run(p: &Path) -> PathBuf {
    let d: Vec<_> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(d.len(), 1, "{d:?}");
    d[0].clone()
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}

#[test]
fn parameter_ids_are_the_same_in_every_process() {
    // Burn sorts gradients by parameter id before reducing them: ids must not depend on the process.
    let ids = |seed| {
        use burn::backend::Flex;
        let cfg = kiln_models::presets::preset("tiny", 30).unwrap();
        let m = kiln_models::Llama::<Flex>::build(&cfg, &mut kiln_models::init::RandomInit::new(seed, 2), &Default::default()).unwrap();
        struct Ids(Vec<u64>);
        impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Ids {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<burn::tensor::Tensor<B, D>>) {
                self.0.push(p.id.val());
            }
        }
        let mut v = Ids(Vec::new());
        m.visit(&mut v);
        v.0
    };
    let a = ids(1);
    assert_eq!(a, ids(2), "ids changed with the initialisation");
    assert_eq!(a[0], kiln_models::llama::param_id("model.embed_tokens.weight").val());
    let mut sorted = a.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), a.len(), "duplicate parameter ids");
}

#[test]
fn two_workers_match_one_process_with_the_same_global_batch() {
    let dir = setup();
    let d = dir.path();
    let (_coord, port) = coordinator(d);
    let w0 = worker(d, 0, port, &[]).spawn().unwrap();
    let w1 = worker(d, 1, port, &[]).spawn().unwrap();
    let (s1, out1) = wait_with_timeout(d, 1, w1, Duration::from_secs(240));
    let (s0, out0) = wait_with_timeout(d, 0, w0, Duration::from_secs(60));
    assert!(s0.success(), "rank 0:\n{out0}");
    assert!(s1.success(), "rank 1:\n{out1}");
    assert!(out1.contains("rank 0 writes the model"), "{out1}");
    let dp = only_run(&d.join("dp"));
    assert!(dp.join("final/model.safetensors").is_file() && dp.join("report.json").is_file());
    let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dp.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["workers"], 2);

    // One process, the same global batch: 3 sequences x 2 micro-batches a step.
    let o = kiln(d, &["run", "dp.toml", "--runs-dir", "single", "--set", "train.grad_accum=2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let single = only_run(&d.join("single"));
    let (a, b) = (losses(&dp), losses(&single));
    assert_eq!(a.len(), 30);
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    println!("2 workers vs 1 process: max |loss difference| over 30 steps = {worst:.2e}; losses {:.4} -> {:.4}", a[0], a[29]);
    assert!(worst < 1e-4, "loss curves differ by {worst}:\n{a:?}\n{b:?}");
    assert!(a[29] < a[0] - 0.5, "did not train: {a:?}");
}

#[test]
fn a_dead_worker_fails_the_others_cleanly_and_keeps_the_checkpoint() {
    let dir = setup();
    let d = dir.path();
    let (_coord, port) = coordinator(d);
    let long = ["--set", "train.steps=100000", "--step-timeout-s", "10"];
    let mut w0 = worker(d, 0, port, &long).spawn().unwrap();
    let mut w1 = Kill(worker(d, 1, port, &long).spawn().unwrap());
    // Let them train past a checkpoint, then kill rank 1 without warning.
    let t0 = Instant::now();
    let logs = || (0..2).map(|r| format!("w{r}.log:\n{}", std::fs::read_to_string(d.join(format!("w{r}.log"))).unwrap_or_default())).collect::<Vec<_>>().join("\n");
    let run = loop {
        let ck = std::fs::read_dir(d.join("dp")).ok().and_then(|mut e| e.next()).map(|e| e.unwrap().path());
        if let Some(run) = ck.filter(|r| r.join("checkpoints/step-0000010").is_dir()) {
            break run;
        }
        let exited = (w0.try_wait().unwrap(), w1.0.try_wait().unwrap());
        assert!(exited == (None, None), "a worker exited before step 10 ({exited:?}):\n{}", logs());
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint at step 10 after 120 s:\n{}", logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(w1);
    let (s0, out0) = wait_with_timeout(d, 0, w0, Duration::from_secs(60));
    assert!(!s0.success(), "rank 0 went on without its peer:\n{out0}");
    assert!(out0.contains("rank 0") || out0.contains("across workers failed"), "no clear error:\n{out0}");
    assert!(!out0.contains("panicked at"), "a panic, not an error:\n{out0}");
    println!("rank 0 said: {}", out0.lines().filter(|l| l.contains("error") || l.contains("warning: rank")).collect::<Vec<_>>().join("\n  "));
    // The newest checkpoint is complete and loads.
    let newest = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.')).max().unwrap();
    let (_, _, _) = kiln_models::checkpoint::load_dir::<burn::backend::Flex>(&newest, &Default::default()).unwrap();
    assert!(newest.join("state.json").is_file());
}
