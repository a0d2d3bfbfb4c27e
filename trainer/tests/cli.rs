//! End-to-end tests of the `kiln` binary: exact resume after SIGKILL and SIGTERM, the token
//! cache, and clear errors (never a panic) on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        // A small corpus of our own (tests use no file outside the repository but via KILN_DATA).
        let text: String = (0..400)
            .map(|i| format!("Line {i}: the quick brown fox {} over the lazy dog.\n", ["jumps", "leaps", "runs"][i % 3]))
            .collect();
        std::fs::write(data.join("corpus.txt"), text).unwrap();
        Self { dir }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn write(&self, p: &str, s: &str) -> PathBuf {
        let path = self.path(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, s).unwrap();
        path
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KILN);
        c.args(args)
            .env("KILN_DATA", self.path("data"))
            .env("KILN_CACHE", self.path("cache"))
            .env("RAYON_NUM_THREADS", "2")
            .env("RUST_LOG", "info")
            .current_dir(self.dir.path());
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
}

const TINY: &str = r#"
name = "tiny"
[model]
preset = "tiny"
[data]
sources = ["corpus.txt"]
[train]
device = "cpu"
steps = 400
batch_size = 4
eval_every = 50
eval_batches = 2
checkpoint_every = 7
keep_checkpoints = 3
log_every = 100
"#;

fn only_run(runs: &Path) -> PathBuf {
    let mut d: Vec<_> = std::fs::read_dir(runs).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(d.len(), 1, "{d:?}");
    d.pop().unwrap()
}

/// (kind, step, loss-or-val_loss) of every metrics line, as the exact JSON text of the number.
fn losses(run: &Path) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let key = if v.get("kind").is_some() { "val_loss" } else { "loss" };
            (v["step"].as_u64().unwrap(), format!("{key}={}", v[key]))
        })
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn assert_clean_error(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(!e.contains("panicked"), "panic instead of an error: {e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}:\n{e}");
    }
}

fn wait_for_steps(run_parent: &Path, n: usize, child: &mut std::process::Child) {
    let t0 = Instant::now();
    loop {
        let done = std::fs::read_dir(run_parent)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| std::fs::read_to_string(e.ok()?.path().join("metrics.jsonl")).ok())
            .map(|t| t.lines().filter(|l| !l.contains("eval")).count())
            .unwrap_or(0);
        if done >= n {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("run exited early: {s}");
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "timed out waiting for step {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn resume_after_sigkill_and_sigterm_is_bit_exact() {
    let env = Env::new();
    let recipe = env.write("tiny.toml", TINY);
    let r = recipe.to_str().unwrap();

    let o = env.run(&["run", r, "--runs-dir", "full"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let full = only_run(&env.path("full"));
    let want = losses(&full);
    assert_eq!(want.iter().filter(|l| l.1.starts_with("loss")).count(), 400);
    assert_eq!(want.iter().filter(|l| l.1.starts_with("val_loss")).count(), 8);
    for f in ["plan.toml", "manifest.json", "report.json", "report.md", "report.svg", "final/model.safetensors", "final/config.json", "final/tokenizer.json"] {
        assert!(full.join(f).is_file(), "{f} missing");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(full.join("report.json")).unwrap()).unwrap();
    assert!(report["quality"]["val_loss"].as_f64().unwrap() > 0.0);
    assert!(report["throughput"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    // Every key README's report.json schema documents is there, with its type.
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let schema = readme.split("### report.json schema").nth(1).unwrap().split("\n\n").nth(1).unwrap();
    let mut checked = 0;
    for row in schema.lines().skip(2) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (key, ty) = (cells[1].trim_matches('`'), cells[2]);
        let v = key.split('.').fold(&report, |v, k| &v[k]);
        let ok = match ty {
            "number" => v.is_number(),
            "integer" => v.is_u64(),
            "string" => v.is_string(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            "object or null" => v.is_object() || v.is_null(),
            "number or null" => v.is_number() || v.is_null(),
            "integer or null" => v.is_u64() || v.is_null(),
            "string or null" => v.is_string() || v.is_null(),
            other => panic!("unknown type {other} for {key}"),
        };
        assert!(ok, "report.json key {key}: expected {ty}, got {v}");
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
    let e = &report["energy"];
    assert!(e["joules"].as_f64().unwrap() > 0.0, "{e}");
    assert!(["counter", "estimate"].contains(&e["method"].as_str().unwrap()), "{e}");
    let card = std::fs::read_to_string(full.join("report.md")).unwrap();
    assert!(card.contains("## Energy") && card.contains("report.svg"), "{card}");
    // keep_checkpoints = 3
    assert_eq!(std::fs::read_dir(full.join("checkpoints")).unwrap().count(), 3);

    // SIGKILL at a step that varies from run to run, then resume.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as usize;
    let kill_at = 10 + nanos % 240;
    let mut child = env.cmd(&["run", r, "--runs-dir", "killed"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_steps(&env.path("killed"), kill_at, &mut child);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = only_run(&env.path("killed"));
    assert!(!killed.join("report.json").exists(), "the run finished before the kill at step {kill_at}");
    let o = env.run(&["resume", killed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&killed), want, "killed at step {kill_at}");
    // Later runs on the same data tokenize nothing.
    assert!(stderr(&o).contains("reused cached token shards"), "{}", stderr(&o));

    // SIGTERM: a checkpoint at the current step, a clean exit, then resume.
    let mut child = env.cmd(&["run", r, "--runs-dir", "termed"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_steps(&env.path("termed"), 100, &mut child);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let e = stderr(&out);
    assert!(e.contains("resume with: kiln resume"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(out.status.code(), Some(130));
    let termed = only_run(&env.path("termed"));
    let stopped_at = losses(&termed).iter().filter(|l| l.1.starts_with("loss")).count();
    assert!(stopped_at < 400, "finished before SIGTERM");
    assert!(termed.join(format!("checkpoints/step-{stopped_at:07}/state.json")).is_file(), "no checkpoint at step {stopped_at}");
    let o = env.run(&["resume", termed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&termed), want);

    // generate from the finished run: greedy is deterministic.
    let g = |seed: &str| env.run(&["generate", full.to_str().unwrap(), "--prompt", "Line", "--max-tokens", "30", "--temperature", "0", "--seed", seed]);
    let (a, b) = (g("1"), g("2"));
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stdout).starts_with("Line"));
}

#[test]
fn bad_inputs_give_clear_errors() {
    let env = Env::new();
    let misspelt = env.write("bad1.toml", "[optim]\nlearning_rate = 0.1\n");
    let o = env.run(&["run", misspelt.to_str().unwrap()]);
    assert_clean_error(&o, &["bad1.toml:2", "optim.learning_rate", "unknown key", "valid keys here"]);

    let wrong_type = env.write("bad2.toml", "[train]\nsteps = \"lots\"\n");
    assert_clean_error(&env.run(&["recipe", "check", wrong_type.to_str().unwrap()]), &["bad2.toml", "train.steps", "invalid type"]);

    let negative = env.write("bad3.toml", "[optim]\nlr = -1e-3\n");
    assert_clean_error(&env.run(&["run", negative.to_str().unwrap()]), &["optim.lr", "positive"]);

    let ok = env.write("ok.toml", TINY);
    assert_clean_error(&env.run(&["run", ok.to_str().unwrap(), "--set", "train.stepss=3"]), &["train.stepss", "did you mean 'train.steps'"]);

    let missing = env.write("bad4.toml", "[data]\nsources = [\"nope/missing.txt\"]\n");
    assert_clean_error(&env.run(&["run", missing.to_str().unwrap()]), &["missing.txt", "KILN_DATA"]);

    env.write("data/docs.jsonl", "{\"text\": \"hello there\"}\n{\"body\": \"no text\"}\n");
    let jsonl = env.write("bad5.toml", "[model]\npreset = \"tiny\"\n[data]\nsources = [\"docs.jsonl\"]\n");
    assert_clean_error(&env.run(&["run", jsonl.to_str().unwrap()]), &["docs.jsonl:2", "no 'text' field", "data.text_field"]);

    env.write("data/broken/tokenizer.json", "{\"version\": \"1.0\", \"model\": ");
    let tok = env.write("bad6.toml", "[tokenizer]\nkind = \"file\"\npath = \"broken/tokenizer.json\"\n[data]\nsources = [\"corpus.txt\"]\n");
    assert_clean_error(&env.run(&["run", tok.to_str().unwrap()]), &["broken/tokenizer.json", "not a valid tokenizer.json"]);

    // A truncated checkpoint: generation refuses it with the file named.
    let small = env.write("small.toml", &TINY.replace("steps = 400", "steps = 2"));
    let o = env.run(&["run", small.to_str().unwrap(), "--runs-dir", "r"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = only_run(&env.path("r"));
    let w = run.join("final/model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    assert_clean_error(&env.run(&["generate", run.to_str().unwrap(), "--max-tokens", "5"]), &["model.safetensors", "truncated or corrupt"]);

    assert_clean_error(&env.run(&["resume", env.path("nowhere").to_str().unwrap()]), &["not a Kiln run directory"]);

    // A precision the backend cannot compute in (ndarray has no half types): an error naming what
    // works there, before any run directory is made (it was a panic in the first forward pass).
    let o = env.run(&["run", ok.to_str().unwrap(), "--device", "ndarray", "--set", "train.precision=bf16-mixed", "--runs-dir", "half"]);
    assert_clean_error(&o, &["train.precision = \"bf16-mixed\"", "ndarray cannot compute in BF16", "--set train.precision=f32", "--device cpu (flex)"]);
    assert!(!stderr(&o).contains("f16-mixed or"), "ndarray has no f16 either: {}", stderr(&o));
    assert!(!env.path("half").exists(), "a run directory was made for a run that cannot start");
}

/// Issue 13's hostile inputs: each stops with an error naming the key or file, before any run
/// directory is made (so before any training step), and nothing panics or hangs.
#[test]
fn hostile_inputs_fail_before_training() {
    let env = Env::new();
    let ok = env.write("ok.toml", TINY);
    let refuse = |sets: &[&str], needles: &[&str]| {
        let mut args = vec!["run", ok.to_str().unwrap(), "--runs-dir", "hostile"];
        for s in sets {
            args.extend(["--set", s]);
        }
        assert_clean_error(&env.run(&args), needles);
        assert!(!env.path("hostile").exists(), "{sets:?}: a run directory was made");
    };
    refuse(&["data.sources=[\"/etc/passwd\"]"], &["data.sources", "not a path under the data root"]);
    refuse(&["data.sources=[\"../outside.txt\"]"], &["data.sources", "not a path under the data root"]);
    refuse(&["eval.tasks=[\"bpb:nope.txt\"]"], &["eval.tasks[0]", "nope.txt", "not a readable file"]);
    refuse(&["eval.tasks=[\"hellaswag:abc\"]"], &["eval.tasks[0]", "'abc' is not a number"]);
    refuse(&["model.context=1"], &["model.context", "at least 2"]);
    refuse(&["model.d_model=65536"], &["memory estimate", "exceeds this machine", "train.batch_size"]);
    refuse(&["name=\"a\\nb\""], &["key 'name'"]);
    refuse(&["train=[1, 2]"], &["train", "expected a section"]);
    refuse(&["optim.lr=9e18"], &["optim.lr", "up to"]);
    #[cfg(unix)]
    {
        assert!(Command::new("mkfifo").arg(env.path("data/fifo.json")).status().unwrap().success());
        refuse(&["tokenizer.kind=\"file\"", "tokenizer.path=\"fifo.json\""], &["tokenizer.path", "not a regular file"]);
    }
    // A model folder whose config.json has no heads, or whose tokenizer outgrows its vocabulary.
    let small = env.write("small.toml", &TINY.replace("steps = 400", "steps = 2"));
    assert!(env.run(&["run", small.to_str().unwrap(), "--runs-dir", "r"]).status.success());
    let model = only_run(&env.path("r")).join("final");
    let cfg_text = std::fs::read_to_string(model.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    cfg["num_attention_heads"] = 0.into();
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    refuse(&[&format!("init=\"{}\"", model.display())], &["config.json", "num_attention_heads"]);
    assert_clean_error(&env.run(&["generate", model.to_str().unwrap(), "--max-tokens", "3"]), &["config.json", "num_attention_heads"]);
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    cfg["vocab_size"] = 5.into();
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    assert_clean_error(&env.run(&["eval", model.to_str().unwrap(), "--task", "bpb:corpus.txt"]), &["tokenizer", "more than the model's vocabulary of 5"]);
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    cfg["bos_token_id"] = 1_000_000_000_000u64.into();
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    assert_clean_error(&env.run(&["generate", model.to_str().unwrap()]), &["bos_token_id", "token id"]);
}

/// Twenty runs of one recipe started together get twenty run directories (the name is claimed
/// with an atomic create_dir; a check-then-create let two runs share one, about once in 30 pairs),
/// each with its own metrics and report.
#[test]
fn twenty_concurrent_starts_get_twenty_directories() {
    let env = Env::new();
    let r = env.write("c.toml", &TINY.replace("steps = 400", "steps = 1").replace("eval_every = 50", "eval_every = 0"));
    // Tokenize once, so that the twenty start together instead of racing on the token cache.
    assert!(env.run(&["recipe", "check", r.to_str().unwrap()]).status.success());
    let children: Vec<_> = (0..20).map(|_| env.cmd(&["run", r.to_str().unwrap(), "--runs-dir", "many"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(env.path("many")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 20, "{dirs:?}");
    for d in &dirs {
        let steps = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().filter(|l| !l.contains("\"kind\"")).count();
        assert_eq!(steps, 1, "{}: metrics.jsonl holds {steps} step lines", d.display());
        assert!(d.join("report.json").is_file(), "{}", d.display());
    }
}

/// Several first runs at once (data-parallel workers on one machine) with an empty token cache:
/// each tokenizes, and the ones that lose the race to move their shards into the cache use the
/// winner's instead of failing ("Directory not empty" stopped a worker about once in 75 runs).
#[test]
fn concurrent_first_runs_share_the_token_cache() {
    let env = Env::new();
    let recipe = env.write("c.toml", &TINY.replace("steps = 400", "steps = 1"));
    let kids: Vec<_> = (0..4)
        .map(|i| {
            env.cmd(&["run", recipe.to_str().unwrap(), "--runs-dir", &format!("c{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for k in kids {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "a concurrent first run failed:\n{}", stderr(&o));
    }
    let entries: Vec<_> = std::fs::read_dir(env.path("cache/tokens")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(entries.len(), 1, "one cache entry, no temporary folders left: {entries:?}");
}

/// Every shipped recipe resolves completely (preset, tokenizer, data) against the shared data.
#[test]
fn shipped_recipes_resolve_against_the_data_root() {
    let Some(data) = kiln_models::skip::data_root() else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let mut n = 0;
    for dir in ["pretrain", "finetune", "sft", "rag", "retriever"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let mut args = vec!["recipe".to_string(), "check".into(), p.to_str().unwrap().into()];
            // No Hub here: an hf:// model to start from is replaced by the local transformers-made fixture.
            if std::fs::read_to_string(&p).unwrap().contains("init = \"hf://") {
                args.extend(["--set".into(), format!("init={}", fixture_model().display())]);
            }
            let o = Command::new(KILN).args(&args).env("KILN_DATA", &data).env("KILN_CACHE", cache.path()).output().unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
            assert!(out.contains("parameters:") && out.contains("recipe OK"), "{out}");
            n += 1;
        }
    }
    assert!(n >= 2);
}

#[test]
fn nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint() {
    let env = Env::new();
    // The largest learning rate a recipe takes, with no clipping: within a few steps the gradient
    // norm is NaN while the loss is still finite (issue 13's case).
    let r = env.write("nan.toml", &TINY.replace("[train]", "[optim]\nlr = 1e3\nmin_lr = 1e3\nwarmup_steps = 0\ngrad_clip = 0.0\n[train]").replace("checkpoint_every = 7", "checkpoint_every = 1"));
    let o = env.run(&["run", r.to_str().unwrap(), "--runs-dir", "r"]);
    assert_clean_error(&o, &["loss is", "training stopped", "last good checkpoint", "optim.lr"]);
    let run = only_run(&env.path("r"));
    assert!(!run.join("final").exists());
    let e = stderr(&o);
    let last = run.join("checkpoints");
    assert!(std::fs::read_dir(&last).unwrap().count() >= 1, "{e}");
    // The checkpoint it names is truly good: resume loads it (weights and moments finite) and
    // stops at the same step for the same reason.
    let o2 = env.run(&["resume", run.to_str().unwrap()]);
    let e2 = stderr(&o2);
    assert!(e2.contains("resuming") && e2.contains("training stopped") && !e2.contains("non-finite"), "{e2}");
    let step = |e: &str| e.split(" at step ").nth(1).and_then(|x| x.split(';').next()).map(str::to_string);
    assert_eq!(step(&e), step(&e2), "{e}\n---\n{e2}");
}

#[test]
fn stopping_rules_energy_budget_and_quality_target() {
    let env = Env::new();
    let r = env.write("t.toml", TINY);
    let report = |dir: &str| -> serde_json::Value {
        let run = only_run(&env.path(dir));
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap()
    };
    let o = env.run(&["run", r.to_str().unwrap(), "--runs-dir", "target", "--set", "train.target_val_loss=3.0", "--set", "train.eval_every=5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rep = report("target");
    assert_eq!(rep["stop_reason"], "target_val_loss");
    let hit = &rep["target"]["reached"];
    assert!(hit["val_loss"].as_f64().unwrap() <= 3.0);
    assert!(hit["joules"].as_f64().unwrap() > 0.0 && hit["wall_s"].as_f64().unwrap() > 0.0);
    assert!(rep["steps"].as_u64().unwrap() < 400 && rep["steps"].as_u64().unwrap() % 5 == 0);

    let o = env.run(&["run", r.to_str().unwrap(), "--runs-dir", "budget", "--set", "train.max_energy_j=0.5", "--set", "energy.meter=estimate"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rep = report("budget");
    assert_eq!(rep["stop_reason"], "max_energy_j");
    let j = rep["energy"]["joules"].as_f64().unwrap();
    assert!(j >= 0.5, "{j}");
    assert!(rep["steps"].as_u64().unwrap() < 400);
    assert_eq!(rep["energy"]["method"], "estimate");
    assert_eq!(rep["energy"]["components"][0]["coverage"], "process-cpu-estimate");
    assert!(env.path("budget").read_dir().unwrap().next().unwrap().unwrap().path().join("final/model.safetensors").is_file());

    // compare: a table row per run, the Pareto front marked, an SVG.
    let (a, b) = (only_run(&env.path("target")), only_run(&env.path("budget")));
    let o = env.run(&["compare", a.to_str().unwrap(), b.to_str().unwrap(), "--out", "cmp.svg"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert_eq!(table.lines().filter(|l| l.starts_with("| tiny-")).count(), 2, "{table}");
    assert!(table.contains("| yes |"), "{table}");
    assert!(std::fs::read_to_string(env.path("cmp.svg")).unwrap().contains("Pareto front"));
    assert_clean_error(&env.run(&["compare", env.path("data").to_str().unwrap()]), &["no report.json"]);
}

#[test]
fn recipe_evals_run_during_and_after_training() {
    let env = Env::new();
    let recipe = format!("{TINY}\n[eval]\ntasks = [\"bpb:corpus.txt@0.9\"]\nevery = 100\nprompts = [\"Line 3\"]\nsample_tokens = 20\n");
    let r = env.write("e.toml", &recipe);
    let o = env.run(&["run", r.to_str().unwrap(), "--runs-dir", "r"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = only_run(&env.path("r"));
    let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    let bpb = rep["evals"]["bpb"]["bpb"].as_f64().unwrap();
    assert!(bpb > 0.0 && bpb < 8.0, "{bpb}");
    assert!(rep["evals"]["bpb"]["joules"].as_f64().unwrap() > 0.0);
    assert_eq!(rep["evals"]["samples"]["samples"][0]["prompt"], "Line 3");
    // Every 100 steps: 3 milestones before the end (100, 200, 300), each with the joules spent to reach it.
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let milestones: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["kind"] == "tasks").collect();
    assert_eq!(milestones.len(), 3);
    assert!(milestones[0]["joules"].as_f64().unwrap() < milestones[2]["joules"].as_f64().unwrap());
    let card = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(card.contains("## Evals") && card.contains("| bpb |"), "{card}");
    // The training energy excludes the task evals.
    let train_j = rep["energy"]["joules"].as_f64().unwrap();
    let last_step_j = text.lines().rev().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|v| v.get("kind").is_none()).unwrap()["joules"].as_f64().unwrap();
    assert_eq!(train_j, last_step_j);
}

#[test]
fn export_round_trips_and_shards() {
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};
    let env = Env::new();
    let r = env.write("t.toml", &TINY.replace("steps = 400", "steps = 3"));
    assert!(env.run(&["run", r.to_str().unwrap(), "--runs-dir", "r"]).status.success());
    let run = only_run(&env.path("r"));
    let out = |name: &str, extra: &[&str]| {
        let mut args = vec!["export", run.to_str().unwrap(), "--out", name];
        args.extend(extra);
        let o = env.run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        env.path(name)
    };
    let f32_dir = out("hf32", &[]);
    let bf16_dir = out("hf16", &["--dtype", "bf16", "--max-shard-mb", "0"]); // 0 -> 1 MB: still one shard
    let logits = |dir: &Path| -> Vec<f32> {
        let (m, _, _) = kiln_models::checkpoint::load_dir::<Flex>(dir, &Default::default()).unwrap();
        let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 5, 6], [1, 6]), &Default::default());
        m.forward(x).into_data().to_vec().unwrap()
    };
    let want = logits(&run.join("final"));
    assert_eq!(logits(&f32_dir), want, "f32 export must be bit-identical");
    let got = logits(&bf16_dir);
    let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err / max_ref < 2e-2, "bf16 drifted: {err} / {max_ref}");
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"] {
        assert!(f32_dir.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bf16_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let card = std::fs::read_to_string(f32_dir.join("README.md")).unwrap();
    for k in ["library_name: transformers", "model-index:", "co2_eq_emissions:", "emissions:", "training_type: pre-training", "## Recipe"] {
        assert!(card.contains(k), "model card lacks {k}:\n{card}");
    }
    // Sharding: the weights exceed 1 MB only for bigger models, so split the tiny one by hand.
    let tensors = kiln_models::checkpoint::SafetensorsSource::open_dir(&f32_dir).unwrap().into_tensors();
    let sharded = env.path("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    kiln_models::checkpoint::write_weights(&sharded, &tensors, kiln_models::checkpoint::StoreDtype::F32, 20_000).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(f32_dir.join(f), sharded.join(f)).unwrap();
    }
    let shards = std::fs::read_dir(&sharded).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-")).count();
    assert!(shards >= 3, "{shards}");
    assert!(sharded.join("model.safetensors.index.json").is_file());
    assert_eq!(logits(&sharded), want);
    // Never overwrites.
    assert_clean_error(&env.run(&["export", run.to_str().unwrap(), "--out", "hf32"]), &["already exists"]);
}

#[test]
fn init_continues_from_a_trained_model() {
    let env = Env::new();
    let a = env.write("a.toml", &TINY.replace("steps = 400", "steps = 150"));
    assert!(env.run(&["run", a.to_str().unwrap(), "--runs-dir", "a"]).status.success());
    let run_a = only_run(&env.path("a"));
    let first_loss = |run: &Path| losses(run).iter().find(|l| l.1.starts_with("loss=")).unwrap().1[5..].parse::<f64>().unwrap();
    let last_loss = |run: &Path| losses(run).iter().rev().find(|l| l.1.starts_with("loss=")).unwrap().1[5..].parse::<f64>().unwrap();
    // B starts from A's final model (by run directory); its tokenizer and config come from A.
    let b = env.write("b.toml", &format!("init = {:?}\n{}", run_a.to_str().unwrap(), TINY.replace("steps = 400", "steps = 3").replace("preset = \"tiny\"", "preset = \"bench-cpu\"")));
    let o = env.run(&["run", b.to_str().unwrap(), "--runs-dir", "b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run_b = only_run(&env.path("b"));
    let (a0, a1, b0) = (first_loss(&run_a), last_loss(&run_a), first_loss(&run_b));
    assert!(b0 < a0 - 1.0 && (b0 - a1).abs() < 0.5, "fresh {a0:.3}, trained {a1:.3}, continued {b0:.3}");
    let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_b.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["params"], serde_json::json!(27616), "the tiny model from A, not bench-cpu from B's [model]");
    assert_clean_error(&env.run(&["run", env.write("c.toml", "init = \"nowhere/at/all\"\n").to_str().unwrap()]), &["init = \"nowhere/at/all\"", "no model here"]);
}

/// Python with torch, transformers, or why not.
fn python_with_transformers() -> Result<String, String> {
    kiln_models::skip::python_with("torch, transformers")
}

#[test]
fn transformers_loads_a_kiln_export() {
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};
    let py = match python_with_transformers() {
        Ok(p) => p,
        Err(why) => {
            kiln_models::skip::skip("python", &format!("transformers_loads_a_kiln_export: {why}; `pip install torch transformers` to run it"));
            return;
        }
    };
    let env = Env::new();
    // A trained Kiln model (logits far from uniform) with GQA and its own char tokenizer.
    let r = env.write("t.toml", &TINY.replace("steps = 400", "steps = 200"));
    assert!(env.run(&["run", r.to_str().unwrap(), "--runs-dir", "r"]).status.success());
    let run = only_run(&env.path("r"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hf_check.py");
    let (_, _, tok) = kiln_models::checkpoint::load_dir::<Flex>(&run.join("final"), &Default::default()).unwrap();
    let text = "Line 7: the quick brown fox";
    let ids: Vec<i64> = std::iter::once(tok.bos_id as i64).chain(tok.encode(text).unwrap().iter().map(|&i| i as i64)).collect();
    for (name, dtype) in [("hf32", "f32"), ("hf16", "bf16")] {
        let o = env.run(&["export", run.to_str().unwrap(), "--out", name, "--dtype", dtype]);
        assert!(o.status.success(), "{}", stderr(&o));
        let dir = env.path(name);
        // Kiln's logits from the exported folder (bf16 weights widen exactly to f32).
        let (m, _, _) = kiln_models::checkpoint::load_dir::<Flex>(&dir, &Default::default()).unwrap();
        let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &Default::default());
        let want: Vec<f32> = m.forward(x).into_data().to_vec().unwrap();
        let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let o = Command::new(&py)
            .arg(&script)
            .args([dir.to_str().unwrap(), "--ids", &ids_arg, "--text", text])
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got["model_class"], "LlamaForCausalLM");
        let enc: Vec<u32> = serde_json::from_value(got["encode"].clone()).unwrap();
        assert_eq!(enc, tok.encode(text).unwrap(), "AutoTokenizer encodes differently");
        let got: Vec<f32> = got["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let rel = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / max_ref;
        println!("{dtype}: max |transformers - kiln| / max |kiln| = {rel:.2e} (max |logit| {max_ref:.2})");
        assert!(rel < 1e-4, "{dtype}: relative error {rel}");
    }
}

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/hf-tiny-llama")
}

#[test]
fn shipped_finetune_recipe_lowers_the_loss_of_an_imported_model() {
    let Some(data) = kiln_models::skip::data_root() else {
        return;
    };
    let env = Env::new();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/finetune/shakespeare-smollm2.toml");
    // The fixture, as an instruction-tuned model would come: with a chat template.
    let chat = env.path("chat-model");
    std::fs::create_dir_all(&chat).unwrap();
    for e in std::fs::read_dir(fixture_model()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), chat.join(e.file_name())).unwrap();
    }
    let template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}";
    let mut tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(chat.join("tokenizer_config.json")).unwrap()).unwrap();
    tc["chat_template"] = template.into();
    std::fs::write(chat.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let init = format!("init={}", chat.display());
    let o = env
        .cmd(&[
            "run", recipe.to_str().unwrap(), "--runs-dir", "ft", "--set", &init,
            "--set", "train.steps=60", "--set", "train.eval_every=30", "--set", "model.context=128",
            "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=5", "--set", "eval.tasks=[]",
        ])
        .env("KILN_DATA", data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let run = only_run(&env.path("ft"));
    let val: Vec<f64> = losses(&run).iter().filter(|l| l.1.starts_with("val_loss=")).map(|l| l.1[9..].parse().unwrap()).collect();
    let train: Vec<f64> = losses(&run).iter().filter(|l| l.1.starts_with("loss=")).map(|l| l.1[5..].parse().unwrap()).collect();
    let (first, last) = (train[..5].iter().sum::<f64>() / 5.0, train[train.len() - 5..].iter().sum::<f64>() / 5.0);
    println!("train loss {first:.3} -> {last:.3}, val {val:?}");
    assert!(last < first - 0.5, "the loss did not fall: {first:.3} -> {last:.3}");
    assert!(val.windows(2).all(|w| w[1] < w[0]), "validation loss did not fall: {val:?}");
    // The fine-tuned model is the fixture's architecture and tokenizer, in the HF layout.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap()).unwrap();
    assert_eq!((cfg["hidden_size"].as_u64(), cfg["num_key_value_heads"].as_u64(), cfg["tie_word_embeddings"].as_bool()), (Some(64), Some(2), Some(true)));
    // Exported, it keeps the chat template it was imported with.
    let o = env.run(&["export", run.to_str().unwrap(), "--out", "hf"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(env.path("hf/tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["chat_template"], template);
}

/// `train.pad_vocab` through a run on Burn's graph: the log says so, the checkpoint's weights
/// and AdamW moments have the true vocabulary, and a resume from a mid-run checkpoint (the
/// moments padded again) repeats the losses bit for bit.
#[test]
fn a_padded_vocabulary_checkpoints_at_its_true_size_and_resumes_exactly() {
    let env = Env::new();
    let recipe = env.write("tiny.toml", TINY);
    let r = recipe.to_str().unwrap();
    let sets = ["train.cpu_kernels=false", "train.pad_vocab=64", "train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=5", "train.eval_every=4"];
    let mut args = vec!["run", r, "--runs-dir", "full"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let o = env.run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("vocabulary padded from"), "{}", stderr(&o));
    let full = only_run(&env.path("full"));
    let want = losses(&full);
    assert_eq!(want.iter().filter(|l| l.1.starts_with("loss")).count(), 8);

    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(full.join("final/config.json")).unwrap()).unwrap();
    let (v, d) = (cfg["vocab_size"].as_u64().unwrap() as usize, cfg["hidden_size"].as_u64().unwrap() as usize);
    assert!(v % 64 != 0, "the tokenizer's {v} tokens need no padding: the test checks nothing");
    let ck = full.join("checkpoints/step-0000004");
    let w = kiln_models::checkpoint::read_safetensors(&ck.join("model.safetensors")).unwrap();
    assert_eq!(w["model.embed_tokens.weight"].0, vec![v, d]);
    let m = kiln_models::checkpoint::read_safetensors(&ck.join("optimizer.safetensors")).unwrap();
    assert_eq!(m["model.embed_tokens.weight.exp_avg"].1.len(), v * d);
    let f = kiln_models::checkpoint::read_safetensors(&full.join("final/model.safetensors")).unwrap();
    assert_eq!(f["model.embed_tokens.weight"].0, vec![v, d]);

    let again = env.path("again");
    assert!(Command::new("cp").args(["-r", full.to_str().unwrap(), again.to_str().unwrap()]).status().unwrap().success());
    std::fs::remove_dir_all(again.join("final")).unwrap();
    std::fs::remove_dir_all(again.join("checkpoints/step-0000008")).unwrap();
    let o = env.run(&["resume", again.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&again), want);
}

/// `kiln bench-gemm` on the CPU: one JSON line a GEMM (a layer's forward, grad-input and
/// grad-weight), Burn's figures only (cuBLASLt is a CUDA kernel), and clear errors for bad flags.
/// With `train.cublaslt` asked for on the CPU, a run warns and trains with Burn's matmul.
#[test]
fn bench_gemm_reports_each_gemm_and_refuses_bad_flags() {
    let env = Env::new();
    let o = env.run(&["bench-gemm", "--device", "cpu", "--dtype", "f32", "--iters", "2", "--layer", "64,32,48", "--layer", "8,16,8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6, "three GEMMs a layer");
    let names: Vec<&str> = rows.iter().map(|r| r["gemm"].as_str().unwrap()).collect();
    assert_eq!(names[..3], ["forward", "grad_input", "grad_weight"]);
    assert_eq!(rows[0]["layer"], serde_json::json!([64, 32, 48]));
    for r in &rows {
        assert!(r["burn_tflops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["kernel_tflops"].is_null() && r["kernel_rel_diff"].is_null(), "the CPU has no GEMM kernel of its own: {r}");
    }
    assert_clean_error(&env.run(&["bench-gemm", "--device", "cpu", "--layer", "64,32"]), &["--layer", "ROWS,IN,OUT"]);
    assert_clean_error(&env.run(&["bench-gemm", "--device", "cpu", "--layer", "64,0,8"]), &["--layer", "positive"]);
    assert_clean_error(&env.run(&["bench-gemm", "--device", "cpu", "--dtype", "f8", "--layer", "4,4,4"]), &["--dtype f8", "f32, bf16 or f16"]);

    let recipe = env.write("tiny.toml", TINY);
    let o = env.run(&["run", recipe.to_str().unwrap(), "--device", "cpu", "--set", "train.steps=1", "--set", "train.cublaslt=true", "--runs-dir", env.path("runs").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("train.cublaslt applies to CUDA devices"), "{}", stderr(&o));
}

#[test]
fn bench_attention_reports_each_path_and_refuses_bad_flags() {
    let env = Env::new();
    let o = env.run(&["bench-attention", "--device", "cpu", "--dtype", "f32", "--iters", "2", "--shape", "2,3,40,16", "--shape", "1,2,8,8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "the CPU has the recomputing path alone: {rows:?}");
    assert_eq!(rows[0]["shape"], serde_json::json!([2, 3, 40, 16]));
    for r in &rows {
        assert_eq!(r["path"], "recompute");
        assert!(r["tflops"].as_f64().unwrap() > 0.0 && r["rel_diff"].is_null(), "{r}");
    }
    assert!(stderr(&o).contains("no flash-attention kernels"), "{}", stderr(&o));
    // On wgpu the flash kernels run too, checked against the recomputing path.
    #[cfg(feature = "wgpu")]
    if kiln_trainer::device::wgpu_adapters().is_empty() {
        kiln_models::skip::skip("wgpu", "no wgpu adapter on this machine (install mesa-vulkan-drivers for lavapipe); bench-attention's flash row not checked");
    } else {
        let o = env.run(&["bench-attention", "--device", "wgpu", "--dtype", "f32", "--iters", "1", "--shape", "1,2,70,32"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[1]["path"], "flash");
        let diff = rows[1]["rel_diff"].as_f64().unwrap();
        assert!(diff < 1e-4, "flash against the recomputing path on wgpu: {diff}");
    }
    assert_clean_error(&env.run(&["bench-attention", "--device", "cpu", "--shape", "2,3,40"]), &["--shape", "BATCH,HEADS,T,HEAD_DIM"]);
    assert_clean_error(&env.run(&["bench-attention", "--device", "cpu", "--shape", "2,0,40,16"]), &["--shape", "positive"]);
    assert_clean_error(&env.run(&["bench-attention", "--device", "cpu", "--dtype", "f8", "--shape", "1,1,4,4"]), &["--dtype f8", "f32, bf16 or f16"]);

    let recipe = env.write("tiny.toml", TINY);
    let o = env.run(&["run", recipe.to_str().unwrap(), "--device", "cpu", "--set", "train.steps=1", "--set", "train.flash_attention=true", "--runs-dir", env.path("runs").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("train.flash_attention applies to the fused attention op"), "{}", stderr(&o));
}
