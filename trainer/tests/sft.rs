//! Instruction tuning end to end through the `kiln` binary: a chat recipe on the transformers-made
//! tiny Llama (which has no chat template, so ChatML's tokens are added and the embedding grows),
//! on both engines; the Alpaca format; `kiln data preview` and `kiln chat`; bad input stopped
//! before any step.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/hf-tiny-llama")
}

/// A temporary data root with chat and Alpaca data: "What is a plus b?" answered "a+b is c.".
fn data_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut chat = String::new();
    let mut alpaca = Vec::new();
    for i in 0..80 {
        let (a, b) = (i % 9, (i * 7) % 10);
        let q = format!("What is {a} plus {b}?");
        let r = format!("{a}+{b} is {}.", a + b);
        let m = serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}, {"role": "assistant", "content": r}]});
        chat += &format!("{m}\n");
        alpaca.push(serde_json::json!({"instruction": q, "input": "", "output": r}));
    }
    std::fs::write(data.join("chat.jsonl"), chat).unwrap();
    std::fs::write(data.join("alpaca.json"), serde_json::to_string(&alpaca).unwrap()).unwrap();
    d
}

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(KILN)
        .args(args)
        .env("KILN_DATA", dir.join("data"))
        .env("KILN_CACHE", dir.join("cache"))
        .env("RAYON_NUM_THREADS", "2")
        .current_dir(dir)
        .output()
        .unwrap()
}

fn recipe(dir: &Path, name: &str, source: &str, extra: &str) -> String {
    let text = format!(
        "name = \"{name}\"\nstage = \"sft\"\ninit = {:?}\n[data]\nsources = [\"{source}\"]\nval_fraction = 0.1\n{extra}\n[optim]\nlr = 3e-3\nwarmup_steps = 2\nweight_decay = 0.0\n[train]\ndevice = \"cpu\"\nsteps = 30\nbatch_size = 4\neval_every = 15\neval_batches = 2\ncheckpoint_every = 0\n",
        fixture_model().to_str().unwrap()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn only_run(runs: &Path) -> PathBuf {
    let d: Vec<_> = std::fs::read_dir(runs).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(d.len(), 1, "{d:?}");
    d[0].clone()
}

fn train_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()).collect()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn chat_recipe_trains_on_both_engines_and_chats() {
    let d = data_dir();
    let dir = d.path();
    let r = recipe(dir, "chat", "chat.jsonl", "");
    let mut firsts = Vec::new();
    for (runs, kernels) in [("k", "true"), ("g", "false")] {
        let o = kiln(dir, &["run", &r, "--runs-dir", runs, "--set", &format!("train.cpu_kernels={kernels}")]);
        assert!(o.status.success(), "{}", err(&o));
        let run = only_run(&dir.join(runs));
        let l = train_losses(&run);
        let (first, last) = (l[..3].iter().sum::<f64>() / 3.0, l[l.len() - 3..].iter().sum::<f64>() / 3.0);
        println!("cpu_kernels={kernels}: loss {first:.3} -> {last:.3}");
        assert!(last < first * 0.5, "the loss on assistant tokens did not fall: {first:.3} -> {last:.3}");
        firsts.push(l[0]);
        // ChatML's two tokens were added: the embedding grew, and the template travels with the model.
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap()).unwrap();
        assert_eq!(cfg["vocab_size"], 261);
        let tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("final/tokenizer_config.json")).unwrap()).unwrap();
        assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
        let out = String::from_utf8_lossy(&o.stdout).to_string() + &err(&o);
        assert!(out.contains("sft: 80 records -> 80 examples (72 train, 8 validation)"), "{out}");
        assert!(out.contains("examples packed, best-fit decreasing"), "{out}");
        // The data's fate is in the report.
        let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
        let sft = &rep["sft"];
        assert_eq!((sft["records"].as_u64(), sft["examples"].as_u64(), sft["dropped_overlong"].as_u64()), (Some(80), Some(80), Some(0)), "{sft}");
        assert!(sft["loss_tokens"].as_u64().unwrap() > 0 && sft["loss_tokens"].as_u64() < sft["tokens"].as_u64(), "{sft}");
        assert!((0.0..0.5).contains(&sft["padding_share"].as_f64().unwrap()), "{sft}");
        assert!(std::fs::read_to_string(run.join("report.md")).unwrap().contains("## Instruction data"));
    }
    // The same first step (same batch, same weights) on both engines: masks and padding agree.
    assert!((firsts[0] - firsts[1]).abs() < 1e-4 * firsts[0], "first losses differ: {firsts:?}");

    // Preview: loss only on the assistant's reply and its end-of-turn token.
    let o = kiln(dir, &["data", "preview", &r, "--n", "2", "--format", "json"]);
    assert!(o.status.success(), "{}", err(&o));
    let line: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let ids: Vec<u64> = serde_json::from_value(line["input_ids"].clone()).unwrap();
    let mask: Vec<u64> = serde_json::from_value(line["loss_mask"].clone()).unwrap();
    assert_eq!(ids.len(), mask.len());
    let text = line["text"].as_str().unwrap();
    assert!(text.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is"), "{text}");
    let n_loss = mask.iter().filter(|&&m| m == 1).count();
    let reply = text.rsplit("<|im_start|>assistant\n").next().unwrap();
    // Byte-level tokens: one per byte of the reply, plus <|im_end|> (one token) and the newline.
    assert_eq!(n_loss, reply.len() - "<|im_end|>".len() + 1, "{text:?} {mask:?}");
    assert!(mask[..ids.len() - n_loss].iter().all(|&m| m == 0), "loss before the reply: {mask:?}");

    let run = only_run(&dir.join("k"));
    let o = kiln(dir, &["chat", run.to_str().unwrap(), "--prompt", "What is 2 plus 3?", "--max-tokens", "16", "--device", "cpu"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("<|im_end|>"));

    // The interactive loop: two turns (a blank line between them), a reset, a turn, then /exit.
    use std::io::Write;
    let mut child = Command::new(KILN)
        .args(["chat", run.to_str().unwrap(), "--max-tokens", "12", "--device", "cpu", "--system", "Be brief."])
        .env("KILN_CACHE", dir.join("cache"))
        .env("RAYON_NUM_THREADS", "2")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is 2 plus 3?\n\nWhat is 4 plus 4?\n/reset\nWhat is 1 plus 1?\n/exit\nnever read\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    let (out, e) = (String::from_utf8_lossy(&o.stdout).to_string(), err(&o));
    assert!(out.lines().count() >= 3, "three replies: {out:?}");
    assert_eq!(e.matches("> ").count(), 6, "a prompt before each line read (the blank one included): {e}");
    assert!(e.contains("(conversation reset)") && e.contains("/reset starts over"), "{e}");
}

#[test]
fn alpaca_recipe_runs() {
    let d = data_dir();
    let r = recipe(d.path(), "alpaca", "alpaca.json", "format = \"alpaca\"\ntrain_on = \"all\"");
    let o = kiln(d.path(), &["run", &r, "--runs-dir", "a", "--set", "train.steps=4", "--set", "train.eval_every=0"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(train_losses(&only_run(&d.path().join("a"))).len(), 4);
}

#[test]
fn bad_sft_input_stops_before_training() {
    let d = data_dir();
    let dir = d.path();
    std::fs::write(dir.join("data/broken.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (recipe(dir, "b1", "broken.jsonl", ""), vec!["broken.jsonl:2", "message 0", "'content'"]),
        (recipe(dir, "b2", "chat.jsonl", "format = \"text\""), vec!["data.format", "sft"]),
        (recipe(dir, "b3", "chat.jsonl", "chat_template = \"nope.jinja\""), vec!["data.chat_template", "nope.jinja"]),
        (recipe(dir, "b4", "chat.jsonl", "format = \"fields\"\nuser_template = \"{{ question }}\""), vec!["assistant_template"]),
    ];
    for (r, wants) in cases {
        let o = kiln(dir, &["run", &r, "--runs-dir", "bad"]);
        let e = err(&o);
        assert!(!o.status.success() && !e.contains("panicked"), "{e}");
        for w in wants {
            assert!(e.contains(w), "{r}: stderr lacks {w:?}: {e}");
        }
        assert!(!dir.join("bad").exists() || std::fs::read_dir(dir.join("bad")).unwrap().next().is_none(), "a run directory was made");
    }
    let no_init = dir.join("n.toml");
    std::fs::write(&no_init, "stage = \"sft\"\n[data]\nsources = [\"chat.jsonl\"]\n").unwrap();
    let e = err(&kiln(dir, &["run", no_init.to_str().unwrap()]));
    assert!(e.contains("set init"), "{e}");
}

/// Python with transformers, or why not.
fn python_with_transformers() -> Result<String, String> {
    kiln_models::skip::python_with("transformers")
}

/// transformers' `apply_chat_template` on an exported folder: for each conversation, the text
/// without and with the generation prompt, and the ids of the latter.
fn hf_renderings(py: &str, folder: &Path, chats: &serde_json::Value, scratch: &Path) -> serde_json::Value {
    let file = scratch.join("chats.json");
    std::fs::write(&file, chats.to_string()).unwrap();
    let code = "import json, sys\nfrom transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained(sys.argv[1])\nout = []\nfor c in json.load(open(sys.argv[2])):\n    r = [t.apply_chat_template(c, tokenize=False, add_generation_prompt=g) for g in (False, True)]\n    out.append(r + [t(r[1], add_special_tokens=False).input_ids])\nprint(json.dumps(out))\n";
    let o = Command::new(py).args(["-c", code, folder.to_str().unwrap(), file.to_str().unwrap()]).env("HF_HUB_OFFLINE", "1").env("TRANSFORMERS_VERBOSITY", "error").output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Kiln's rendering of `chats` with the template and tokenizer an export carries, against
/// transformers' on the same folder; and the export's EOS ids include the end-of-turn token.
fn check_export_template(py: &str, folder: &Path, scratch: &Path) {
    use kiln_models::chat::{ChatTemplate, Message};
    let m = |r: &str, c: &str| serde_json::json!({"role": r, "content": c});
    let chats = serde_json::json!([
        [m("system", "You answer in one word."), m("user", "Capital of France?"), m("assistant", "Paris."), m("user", "And of Italy?"), m("assistant", "Rome.")],
        [m("user", "Hi there"), m("assistant", "Hello! How can I help?"), m("user", "Tell me a joke about cats, with emoji 🐈.")],
        [m("user", "One question only")],
    ]);
    let hf = hf_renderings(py, folder, &chats, scratch);
    let tok = kiln_models::Tokenizer::load(&folder.join("tokenizer.json")).unwrap();
    let chat = ChatTemplate::new(&tok, None).unwrap();
    for (i, c) in chats.as_array().unwrap().iter().enumerate() {
        let msgs: Vec<Message> = c.as_array().unwrap().iter().map(|x| Message::new(x["role"].as_str().unwrap(), x["content"].as_str().unwrap())).collect();
        for (j, gen) in [false, true].into_iter().enumerate() {
            assert_eq!(chat.render(&msgs, gen).unwrap(), hf[i][j].as_str().unwrap(), "{}: conversation {i}, generation prompt {gen}", folder.display());
        }
        let ids: Vec<u32> = serde_json::from_value(hf[i][2].clone()).unwrap();
        assert_eq!(chat.prompt_ids(&tok, &msgs).unwrap(), ids, "{}: conversation {i}: ids", folder.display());
    }
    let gc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("generation_config.json")).unwrap()).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    // A list when the end-of-turn token differs from the tokenizer's EOS; SmolLM2's EOS is it.
    let eos = &gc["eos_token_id"];
    assert!(eos.as_array().is_some_and(|a| a.contains(&serde_json::json!(im_end))) || eos == &serde_json::json!(im_end), "{gc}");
}

#[test]
fn exported_chat_templates_render_as_transformers_does() {
    let py = match python_with_transformers() {
        Ok(p) => p,
        Err(why) => {
            kiln_models::skip::skip("python", &format!("exported_chat_templates_render_as_transformers_does: {why}; `pip install transformers` to run it"));
            return;
        }
    };
    // A Kiln SFT run whose base had no template (ChatML added), exported.
    let d = data_dir();
    let dir = d.path();
    let r = recipe(dir, "chat", "chat.jsonl", "");
    let o = kiln(dir, &["run", &r, "--runs-dir", "k", "--set", "train.steps=2", "--set", "train.eval_every=0"]);
    assert!(o.status.success(), "{}", err(&o));
    let run = only_run(&dir.join("k"));
    let o = kiln(dir, &["export", run.to_str().unwrap(), "--out", "chatml"]);
    assert!(o.status.success(), "{}", err(&o));
    check_export_template(&py, &dir.join("chatml"), dir);
    // SmolLM2's own template (from the GGUF metadata; it adds a default system message), exported.
    let Some(root) = kiln_models::skip::data_root() else { return };
    let gguf = root.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let o = kiln(dir, &["export", gguf.to_str().unwrap(), "--out", "smol", "--dtype", "bf16"]);
    assert!(o.status.success(), "{}", err(&o));
    check_export_template(&py, &dir.join("smol"), dir);
}

#[test]
fn overlong_examples_are_dropped_or_truncated_and_counted() {
    let d = data_dir();
    let dir = d.path();
    // Every fourth reply is 200 characters: past a context of 96 byte-level tokens.
    let mut lines = String::new();
    for i in 0..40 {
        let reply = if i % 4 == 0 { "long ".repeat(40) } else { format!("{i}.") };
        let m = serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": format!("Count to {i}?")}, {"role": "assistant", "content": reply}]});
        lines += &format!("{m}\n");
    }
    std::fs::write(dir.join("data/long.jsonl"), lines).unwrap();
    for (how, examples, dropped, truncated) in [("drop", 30, 10, 0), ("truncate", 40, 0, 10)] {
        let r = recipe(dir, how, "long.jsonl", &format!("overlong = \"{how}\"\n[model]\ncontext = 96"));
        let o = kiln(dir, &["run", &r, "--runs-dir", how, "--set", "train.steps=1", "--set", "train.eval_every=0"]);
        assert!(o.status.success(), "{}", err(&o));
        let rep: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(only_run(&dir.join(how)).join("report.json")).unwrap()).unwrap();
        let s = &rep["sft"];
        assert_eq!((s["examples"].as_u64(), s["dropped_overlong"].as_u64(), s["truncated"].as_u64()), (Some(examples), Some(dropped), Some(truncated)), "{how}: {s}");
        assert_eq!(s["truncated_tokens"].as_u64().unwrap() > 0, how == "truncate", "{how}: {s}");
        // The plan says so before training.
        let out = String::from_utf8_lossy(&o.stdout).to_string() + &err(&o);
        assert!(out.contains(&format!("{dropped} dropped as longer than the context, {truncated} truncated")), "{how}: {out}");
    }
}
