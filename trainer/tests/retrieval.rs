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
    assert!(e.contains("dense") && e.contains("bm25"), "{e}");
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
