//! Retrieval through the `kiln` binary: `kiln index build | add | query`, `kiln ask`, RAFT
//! examples in an SFT recipe (`kiln data preview`), and `kiln eval --retrieval`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures")
}

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(KILN).args(args).env("KILN_DATA", dir.join("data")).env("KILN_CACHE", dir.join("cache")).env("RAYON_NUM_THREADS", "2").current_dir(dir).output().unwrap()
}

fn ok(o: &Output) -> (String, String) {
    let (out, err) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert!(o.status.success(), "failed:\n{out}\n{err}");
    (out, err)
}

fn fails(o: &Output) -> String {
    assert!(!o.status.success(), "should have failed:\n{}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked"), "{e}");
    e
}

const TOPICS: &[(&str, &str, &str)] = &[
    ("Rivers", "The Nile is the longest river in Africa. It flows north into the Mediterranean Sea.", "Which sea does the Nile flow into?"),
    ("Rivers", "The Amazon carries more water than any other river. Its basin covers much of Brazil.", "Which river carries the most water?"),
    ("Mountains", "Mount Everest is the highest mountain above sea level. It lies in the Himalayas.", "Where in the world does Mount Everest lie?"),
    ("Mountains", "Kilimanjaro is a dormant volcano in Tanzania. Its summit is called Uhuru Peak.", "What is the summit of Kilimanjaro called?"),
    ("Deserts", "The Sahara is the largest hot desert. Its dunes can reach 180 metres high.", "How high can the Sahara's dunes reach?"),
    ("Deserts", "The Atacama is among the driest places on Earth. Some weather stations there never saw rain.", "Which desert is among the driest places?"),
];

/// A corpus of paragraphs and questions about them, SQuAD's shape, under `dir/data`.
fn corpus(dir: &Path) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let paras: String = TOPICS.iter().enumerate().map(|(i, (t, p, _))| format!("{}\n", serde_json::json!({"doc_id": format!("{t}#{i}"), "title": t, "text": p}))).collect();
    std::fs::write(data.join("paras.jsonl"), paras).unwrap();
    let mut qa = String::new();
    for rep in 0..4 {
        for (i, (t, p, q)) in TOPICS.iter().enumerate() {
            let answer = p.split_whitespace().nth(1).unwrap();
            qa.push_str(&format!("{}\n", serde_json::json!({"id": format!("q{i}-{rep}"), "question": q, "answers": [answer], "doc_id": format!("{t}#{i}"), "title": t})));
        }
    }
    // Grouped by title in order of appearance: Rivers, Mountains, Deserts.
    let mut lines: Vec<&str> = qa.lines().collect();
    lines.sort_by_key(|l| ["Rivers", "Mountains", "Deserts"].iter().position(|t| l.contains(&format!("\"title\":\"{t}\""))).unwrap());
    std::fs::write(data.join("qa.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn index_build_add_and_query_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path());
    let d = tmp.path();
    let (out, _) = ok(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "idx", "--chunk-tokens", "64", "--overlap", "8"]));
    assert!(out.contains("6 documents") && out.contains("6 chunks"), "{out}");
    let (out, _) = ok(&kiln(d, &["index", "query", "idx", "Which sea does the Nile flow into?", "--k", "2", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["query"], "Which sea does the Nile flow into?");
    let top = &v["results"][0];
    assert_eq!(top["doc_id"], "Rivers#0");
    assert_eq!(top["chunk"], 0);
    assert!(top["score"].as_f64().unwrap() > 0.0 && top["text"].as_str().unwrap().starts_with("The Nile"));
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    // Many questions: JSONL with "question", or plain lines; latency on stderr.
    std::fs::write(d.join("q.jsonl"), "{\"question\": \"Uhuru Peak\"}\n\n{\"question\": \"dunes\"}\n").unwrap();
    let (out, err) = ok(&kiln(d, &["index", "query", "idx", "--queries", "q.jsonl", "--format", "json"]));
    let firsts: Vec<String> = out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["results"][0]["doc_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(firsts, ["Mountains#3", "Deserts#4"]);
    assert!(err.contains("2 queries") && err.contains("p99"), "{err}");
    let (out, _) = ok(&kiln(d, &["index", "query", "idx", "highest mountain"]));
    assert!(out.contains("Mountains#2 #0"), "{out}");

    // Add: a new document, and one that replaces another.
    std::fs::write(d.join("data/more.jsonl"), "{\"id\": \"Lakes#0\", \"title\": \"Lakes\", \"text\": \"Lake Baikal is the deepest lake.\"}\n{\"id\": \"Rivers#0\", \"title\": \"Rivers\", \"text\": \"The Nile delta is very fertile farmland.\"}\n").unwrap();
    let (out, _) = ok(&kiln(d, &["index", "add", "idx", "data/more.jsonl", "data/paras.jsonl"]));
    assert!(out.contains("added 2 documents (1 replaced)") && out.contains("1 files unchanged") && out.contains("holds 7 documents"), "{out}");
    let (out, _) = ok(&kiln(d, &["index", "query", "idx", "Nile", "--format", "json"]));
    assert!(out.contains("delta") && !out.contains("Mediterranean"), "{out}");

    // Refusals: an existing --out, another chunking on add, a missing index, a bad corpus line.
    assert!(fails(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "idx"])).contains("exists"));
    let e = fails(&kiln(d, &["index", "add", "idx", "data/more.jsonl", "--tokenizer", fixtures().join("hf-tiny-llama").to_str().unwrap()]));
    assert!(e.contains("words") && e.contains("--tokenizer"), "{e}");
    let e = fails(&kiln(d, &["index", "query", "nowhere", "x"]));
    assert!(e.contains("nowhere") && e.contains("kiln index build"), "{e}");
    std::fs::write(d.join("data/bad.jsonl"), "{\"doc_id\": \"a\", \"text\": 5}\n").unwrap();
    let e = fails(&kiln(d, &["index", "build", "data/bad.jsonl", "--out", "idx2"]));
    assert!(e.contains("bad.jsonl:1") && e.contains("\"text\" is a JSON number"), "{e}");
    assert!(!d.join("idx2").exists());
    let e = fails(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "idx3", "--kind", "dense"]));
    assert!(e.contains("--kind dense") && e.contains("--embed MODEL"), "{e}");
    let e = fails(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "idx3", "--kind", "sparse"]));
    assert!(e.contains("bm25, dense or hybrid"), "{e}");
    let e = fails(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "idx3", "--chunk-tokens", "8", "--overlap", "8"]));
    assert!(e.contains("--overlap"), "{e}");
}

/// An SFT recipe with `[retrieval] raft_p`: each example's user turn carries k passages, its gold
/// paragraph in some of them, distractors only from the training groups' documents.
#[test]
fn raft_examples_carry_retrieved_passages() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path());
    let d = tmp.path();
    let base = fixtures().join("hf-tiny-llama");
    let recipe = format!(
        "name = \"raft\"\nstage = \"sft\"\ninit = {:?}\n[model]\ncontext = 512\n[data]\nsources = [\"qa.jsonl\"]\nformat = \"fields\"\njoin = \"paras.jsonl\"\njoin_key = \"doc_id\"\ngroup_by = \"title\"\ngroups = [0, 2]\nuser_template = \"Answer the question with a short phrase from the passages.\\n\\n{{{{ passages }}}}\\n\\nQuestion: {{{{ question }}}}\"\nassistant_template = \"{{{{ answers[0] }}}}\"\nval_fraction = 0.05\n[retrieval]\ncorpus = \"paras.jsonl\"\nk = 2\nraft_p = 0.5\n[train]\ndevice = \"cpu\"\nsteps = 1\nbatch_size = 2\n",
        base.to_str().unwrap()
    );
    std::fs::write(d.join("raft.toml"), &recipe).unwrap();
    let (out, err) = ok(&kiln(d, &["data", "preview", "raft.toml", "--n", "16", "--format", "json"]));
    assert!(err.contains("RAFT passages for 16 examples"), "{err}");
    let (mut with_gold, mut n) = (0, 0);
    for line in out.lines() {
        let text = serde_json::from_str::<serde_json::Value>(line).unwrap()["text"].as_str().unwrap().to_string();
        assert!(text.contains("[1] ") && text.contains("[2] ") && !text.contains("[3] "), "{text}");
        assert!(!text.contains("Sahara") && !text.contains("Atacama"), "a held-out document was a distractor: {text}");
        let q = TOPICS.iter().position(|(_, _, q)| text.contains(q)).unwrap();
        with_gold += usize::from(text.matches(TOPICS[q].1).count() == 1);
        n += 1;
    }
    assert!(n >= 10, "{n} examples");
    assert!(with_gold > 0 && with_gold < n, "the gold passage should be in some examples, not all: {with_gold} of {n}");
    // A RAFT recipe must be able to place the passages.
    std::fs::write(d.join("bad.toml"), recipe.replace("{{ passages }}", "{{ question }}")).unwrap();
    let e = fails(&kiln(d, &["recipe", "check", "bad.toml"]));
    assert!(e.contains("retrieval.raft_p") && e.contains("passages"), "{e}");
}

#[test]
fn ask_answers_with_sources_and_eval_wants_a_retrieving_task() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path());
    let d = tmp.path();
    ok(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "idx"]));
    let model = fixtures().join("hf-tiny-llama");
    let m = model.to_str().unwrap();
    let (out, _) = ok(&kiln(d, &["ask", m, "--index", "idx", "Which river is the longest river?", "--k", "2", "--max-tokens", "4", "--device", "cpu"]));
    let sources = out.split("sources:").nth(1).unwrap_or_else(|| panic!("no sources: {out}"));
    assert!(sources.contains("[1] Rivers#0 \"Rivers\", chunk 0, bytes 0..83"), "{out}");
    assert_eq!(sources.matches("\n  [").count(), 2, "{out}");
    // A budget that holds only the question: no passage, and it says so.
    let (out, _) = ok(&kiln(d, &["ask", m, "--index", "idx", "Where does Mount Everest lie?", "--budget", "20", "--max-tokens", "2", "--device", "cpu"]));
    assert!(out.contains("(none: the budget holds only the question)"), "{out}");
    let e = fails(&kiln(d, &["eval", m, "--task", "squad-rc:2@0", "--retrieval", "idx", "--device", "cpu"]));
    assert!(e.contains("none of the tasks retrieves"), "{e}");
}

/// `kiln index build --kind hybrid --embed MODEL`: the chunks embedded by a model, queried as
/// dense, hybrid or BM25; the query embedded by the same model (the manifest's, or --embed),
/// another model refused; `kiln ask` retrieving densely.
#[test]
fn dense_and_hybrid_indexes_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path());
    let d = tmp.path();
    let model = fixtures().join("hf-tiny-llama");
    let m = model.to_str().unwrap();
    let (out, _) = ok(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "hy", "--kind", "hybrid", "--embed", m]));
    assert!(out.contains("(hybrid)") && out.contains("6 chunks"), "{out}");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("hy/kiln-index.json")).unwrap()).unwrap();
    assert_eq!(manifest["kind"], "hybrid");
    assert_eq!(manifest["dense"]["dim"], 64);
    assert_eq!(std::fs::metadata(d.join("hy/dense/vectors.f32")).unwrap().len(), 6 * 64 * 4);
    let q = "Which sea does the Nile flow into?";
    let query = |extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["index", "query", "hy", q, "--k", "6", "--format", "json"];
        args.extend_from_slice(extra);
        let (out, _) = ok(&kiln(d, &args));
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        v["results"].as_array().unwrap().clone()
    };
    let hybrid = query(&[]);
    let dense = query(&["--kind", "dense"]);
    let bm25 = query(&["--kind", "bm25"]);
    assert_eq!((hybrid.len(), dense.len()), (6, 6));
    assert!(dense.iter().all(|r| r["score"].as_f64().unwrap().abs() <= 1.0001), "cosines: {dense:?}");
    assert!(dense.windows(2).all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()));
    assert_eq!(bm25[0]["doc_id"], "Rivers#0");
    // Exact search is what a small index does anyway; the manifest's model and --embed agree.
    assert_eq!(query(&["--kind", "dense", "--exact"]), dense);
    assert_eq!(query(&["--kind", "dense", "--embed", m]), dense);
    // Every chunk appears once in the fused ranking.
    let mut ids: Vec<&str> = hybrid.iter().map(|r| r["doc_id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    // The fusion's weight: all BM25 keeps BM25's ranking first, all dense is the dense ranking;
    // rrf fuses the same chunks; a weight outside [0, 1] is refused.
    let order = |v: &[serde_json::Value]| v.iter().map(|r| (r["doc_id"].as_str().unwrap().to_string(), r["chunk"].as_u64().unwrap())).collect::<Vec<_>>();
    assert_eq!(order(&query(&["--dense-weight", "0"]))[..bm25.len()], order(&bm25)[..]);
    assert_eq!(order(&query(&["--fusion", "convex", "--dense-weight", "1"])), order(&dense));
    let mut rrf = order(&query(&["--fusion", "rrf"]));
    rrf.sort();
    let mut all = order(&dense);
    all.sort();
    assert_eq!(rrf, all);
    let e = fails(&kiln(d, &["index", "query", "hy", q, "--dense-weight", "1.5"]));
    assert!(e.contains("--dense-weight") && e.contains("[0, 1]"), "{e}");
    // Another model's embeddings are refused.
    let other = fixtures().join("peft-tiny-lora");
    let e = fails(&kiln(d, &["index", "query", "hy", q, "--kind", "dense", "--embed", other.to_str().unwrap()]));
    assert!(e.contains("embeds differently"), "{e}");
    let e = fails(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "x", "--embed", m]));
    assert!(e.contains("bm25 index embeds nothing"), "{e}");
    // Adding embeds the new chunks with the manifest's model.
    std::fs::write(d.join("data/more.jsonl"), "{\"doc_id\": \"Lakes#9\", \"title\": \"Lakes\", \"text\": \"Lake Baikal is the deepest lake in the world.\"}\n").unwrap();
    let (out, _) = ok(&kiln(d, &["index", "add", "hy", "data/more.jsonl"]));
    assert!(out.contains("7 chunks"), "{out}");
    assert_eq!(query(&["--kind", "dense"]).len(), 6);
    let (out, _) = ok(&kiln(d, &["ask", m, "--index", "hy", "Which lake is the deepest?", "--k", "2", "--max-tokens", "2", "--device", "cpu", "--kind", "dense"]));
    assert_eq!(out.split("sources:").nth(1).unwrap_or_else(|| panic!("{out}")).matches("\n  [").count(), 2, "{out}");
}

/// The corpus in SQuAD's layout under `data/squad11_dev/`, for the squad-retrieval task.
fn squad_layout(dir: &Path) {
    let data = dir.join("data");
    let sq = data.join("squad11_dev");
    std::fs::create_dir_all(&sq).unwrap();
    std::fs::copy(data.join("paras.jsonl"), sq.join("squad11_dev_paragraphs.jsonl")).unwrap();
    std::fs::copy(data.join("qa.jsonl"), sq.join("squad11_dev_qa.jsonl")).unwrap();
}

fn retriever_recipe(name: &str, kernels: bool, steps: usize, extra: &str) -> String {
    let base = fixtures().join("hf-tiny-llama");
    format!(
        "name = \"{name}\"\nstage = \"retriever\"\ninit = {:?}\n[model]\ncontext = 64\n[data]\nsources = [\"qa.jsonl\"]\nformat = \"fields\"\njoin = \"paras.jsonl\"\njoin_key = \"doc_id\"\nuser_template = \"{{{{ question }}}}\"\nassistant_template = \"{{{{ join.title }}}}\\n{{{{ join.text }}}}\"\nval_fraction = 0.25\n[retriever]\ntemperature = 0.1\n[lora]\nrank = 4\nalpha = 8\ntargets = [\"all-linear\"]\ndropout = 0.1\n[optim]\nlr = 5e-3\nwarmup_steps = 1\n[train]\ndevice = \"cpu\"\ncpu_kernels = {kernels}\nsteps = {steps}\nbatch_size = 6\ngrad_accum = 2\neval_every = 2\ncheckpoint_every = 2\nkeep_checkpoints = 5\n[eval]\ntasks = [\"squad-retrieval:all@1\"]\n{extra}",
        base.to_str().unwrap()
    )
}

fn run_recipe(d: &Path, name: &str, recipe: &str) -> PathBuf {
    std::fs::write(d.join(format!("{name}.toml")), recipe).unwrap();
    let runs = d.join(format!("runs-{name}"));
    ok(&kiln(d, &["run", &format!("{name}.toml"), "--runs-dir", runs.to_str().unwrap()]));
    std::fs::read_dir(&runs).unwrap().next().unwrap().unwrap().path()
}

fn metric_lines(run: &Path, key: &str) -> Vec<f64> {
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    m.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter_map(|v| v[key].as_f64()).collect()
}

/// `stage = "retriever"`: (question, paragraph) pairs from a fields recipe train LoRA adapters
/// with the contrastive loss; Burn's graph and the CPU kernels (a gradient cache) give the
/// same losses; `kiln resume` continues exactly; the run's squad-retrieval eval reports dense,
/// BM25 and hybrid recall with the trained model; the run embeds an index.
#[test]
fn a_dense_retriever_trains_alike_on_both_engines_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    corpus(tmp.path());
    squad_layout(tmp.path());
    let d = tmp.path();
    std::fs::write(d.join("preview.toml"), retriever_recipe("p", true, 4, "")).unwrap();
    let (out, err) = ok(&kiln(d, &["data", "preview", "preview.toml", "--n", "2"]));
    assert!(err.contains("retriever:") && err.contains("pairs") && err.contains("distinct passages"), "{err}");
    assert!(out.contains("query: ") && out.contains("passage: "), "{out}");

    let kern = run_recipe(d, "k", &retriever_recipe("k", true, 4, ""));
    let graph = run_recipe(d, "g", &retriever_recipe("g", false, 4, ""));
    let (lk, lg) = (metric_lines(&kern, "loss"), metric_lines(&graph, "loss"));
    assert_eq!(lk.len(), 4);
    for (a, b) in lk.iter().zip(&lg) {
        assert!(a.is_finite() && (a - b).abs() < 1e-4 * a.abs().max(1.0), "kernels {lk:?} vs graph {lg:?}");
    }
    let (vk, vg) = (metric_lines(&kern, "val_loss"), metric_lines(&graph, "val_loss"));
    assert!(!vk.is_empty() && (vk[0] - vg[0]).abs() < 1e-4 * vk[0].abs().max(1.0), "{vk:?} {vg:?}");
    assert!(kern.join("final/adapter_config.json").is_file(), "a LoRA retriever saves its adapters");

    // The eval: three retrievers side by side, each with recall and MRR.
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kern.join("report.json")).unwrap()).unwrap();
    let e = &report["evals"]["squad-retrieval"];
    for key in ["dense_recall@1", "dense_recall@20", "bm25_recall@5", "hybrid_mrr@20"] {
        let v = e[key].as_f64().unwrap_or_else(|| panic!("no {key}: {report}"));
        assert!((0.0..=1.0).contains(&v), "{key} {v}");
    }
    assert_eq!(e["dense_recall@20"].as_f64(), Some(1.0), "4 passages: every one is within 20");
    assert_eq!(e["passages"].as_f64(), Some(4.0));
    assert!(e["joules"].as_f64().is_some_and(|j| j > 0.0), "the eval's energy: {e}");

    // Resume from step 2 gives steps 3 and 4 exactly.
    let resumed = d.join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let copy = resumed.join("run");
    copy_tree(&kern, &copy);
    std::fs::remove_dir_all(copy.join("final")).unwrap();
    std::fs::remove_dir_all(copy.join("checkpoints/step-0000004")).unwrap();
    ok(&kiln(d, &["resume", copy.to_str().unwrap()]));
    let bits = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(metric_lines(&copy, "loss")), bits(lk.clone()), "resume is exact");

    // `kiln eval` on the run joins its report (an adapter run's final/ has no config.json),
    // with another fusion for the hybrid and a sweep.
    let (out, _) = ok(&kiln(d, &["eval", kern.to_str().unwrap(), "--task", "squad-retrieval:all@1:sweep", "--fusion", "rrf", "--device", "cpu"]));
    assert!(out.contains("updated report.json") && out.contains("hybrid (rrf, dense weight 0.5)"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kern.join("report.json")).unwrap()).unwrap();
    assert!(report["evals"]["squad-retrieval"]["sweep_convex_w0.4_mrr@20"].as_f64().is_some(), "{report}");

    // The trained run embeds an index; queries are embedded by the same model.
    let r = kern.to_str().unwrap();
    ok(&kiln(d, &["index", "build", "data/paras.jsonl", "--out", "ri", "--kind", "dense", "--embed", r]));
    let (out, _) = ok(&kiln(d, &["index", "query", "ri", "Which sea does the Nile flow into?", "--k", "6", "--format", "json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(out.lines().next().unwrap()).unwrap()["results"].as_array().unwrap().len(), 6);

    // What a retriever recipe refuses.
    std::fs::write(d.join("bad.toml"), retriever_recipe("b", true, 4, "").replace("batch_size = 6", "batch_size = 1")).unwrap();
    let e = fails(&kiln(d, &["recipe", "check", "bad.toml"]));
    assert!(e.contains("train.batch_size") && e.contains("negatives"), "{e}");
    std::fs::write(d.join("bad.toml"), retriever_recipe("b", true, 4, "").replace("temperature = 0.1", "temperature = 0.0")).unwrap();
    let e = fails(&kiln(d, &["recipe", "check", "bad.toml"]));
    assert!(e.contains("retriever.temperature"), "{e}");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), &p).unwrap();
        }
    }
}
