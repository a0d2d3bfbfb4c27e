//! The tasks' maths, on hand-made scorers whose answers are known.

use kiln_evals::tasks::{bpb, hellaswag};
use kiln_evals::{Scorer, Task};
use kiln_models::Tokenizer;

/// A scorer whose log-probabilities follow a rule of (previous token, token).
struct Rule {
    tok: Tokenizer,
    ctx: usize,
    rule: fn(&Tokenizer, u32, u32) -> f64,
    calls: usize,
}

impl Scorer for Rule {
    fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }
    fn context(&self) -> usize {
        self.ctx
    }
    fn logprobs(&mut self, seqs: &[Vec<u32>]) -> Vec<Vec<f64>> {
        self.calls += 1;
        seqs.iter()
            .map(|s| {
                assert!(s.len() <= self.ctx + 1, "a window longer than the context");
                s.windows(2).map(|w| (self.rule)(&self.tok, w[0], w[1])).collect()
            })
            .collect()
    }
    fn greedy(&mut self, _p: &[u32], _m: usize, _s: &[u32]) -> Vec<u32> {
        Vec::new()
    }
}

fn id(t: &Tokenizer, s: &str) -> u32 {
    t.encode(s).unwrap()[0]
}

#[test]
fn bpb_hand_computed() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.txt");
    std::fs::write(&f, "aab").unwrap();
    // p = 1/2 when a token repeats the previous one, else 1/8:
    // BOS->a 1/8, a->a 1/2, a->b 1/8: 7 bits over 3 bytes.
    let rule = |_: &Tokenizer, prev: u32, next: u32| if prev == next { 0.5f64.ln() } else { 0.125f64.ln() };
    let mut lm = Rule { tok: Tokenizer::train_char(["ab"].into_iter()).unwrap(), ctx: 8, rule, calls: 0 };
    let r = bpb::Bpb::new(f).run(&mut lm).unwrap();
    assert!((r.metrics["bpb"] - 7.0 / 3.0).abs() < 1e-12, "{:?}", r.metrics);
    assert!((r.metrics["perplexity"] - 2f64.powf(7.0 / 3.0)).abs() < 1e-9);
    assert_eq!(r.metrics["tokens"], 3.0);
    // From half-way: "xaab" -> "ab" (x is unknown: UNK), BOS->a 1/8, a->b 1/8: 6 bits over 2 bytes.
    std::fs::write(dir.path().join("u.txt"), "xaab").unwrap();
    let mut half = bpb::Bpb::new(dir.path().join("u.txt"));
    half.from = 0.5;
    let r = half.run(&mut lm).unwrap();
    assert!((r.metrics["bpb"] - 3.0).abs() < 1e-12, "{:?}", r.metrics);
}

#[test]
fn sliding_window_scores_every_token_once() {
    let rule = |_: &Tokenizer, _: u32, _: u32| -(4f64.ln());
    let tok = Tokenizer::train_char(["abcdefghij"].into_iter()).unwrap();
    let ids = tok.encode("abcdefghijabcdefghijabcdefg").unwrap(); // 27 tokens
    for (ctx, stride) in [(4, 1), (4, 2), (4, 4), (5, 3), (64, 0)] {
        let mut lm = Rule { tok: tok.clone(), ctx, rule, calls: 0 };
        let (nll, n) = bpb::sliding_nll(&mut lm, 0, &ids, stride);
        assert_eq!(n, 27, "ctx {ctx} stride {stride}");
        assert!((nll - 27.0 * 4f64.ln()).abs() < 1e-9);
    }
}

#[test]
fn hellaswag_scoring_on_a_hand_made_fixture() {
    // Every token costs 1 nat, a space 3, a 'z' 5: short endings win on the sum,
    // long z-free endings win per byte.
    fn rule(t: &Tokenizer, _prev: u32, next: u32) -> f64 {
        if next == id(t, " ") {
            -3.0
        } else if next == id(t, "z") {
            -5.0
        } else {
            -1.0
        }
    }
    let text = "Ctx: one\n0\nab\nabababab\nzz\nzzz\nCtx: two\n1\nab\nabababab\nzz\nzzz\nCtx: three\n2\nzz\nzzz\na\nabababab\n";
    let items = hellaswag::parse(text, "fixture").unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[1].label, 1);
    assert_eq!(items[2].endings[3], "abababab");
    let mut lm = Rule { tok: Tokenizer::train_char(["Ctx: onetwhrab z"].into_iter()).unwrap(), ctx: 64, rule, calls: 0 };
    let (acc, acc_norm, preds) = hellaswag::evaluate(&mut lm, &items).unwrap();
    assert_eq!(preds, vec![(0, 1), (0, 1), (2, 3)]);
    assert!((acc - 2.0 / 3.0).abs() < 1e-12);
    assert!((acc_norm - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(lm.calls, 3, "one batched call per item");
    assert!(hellaswag::parse("a\nb\nc\n", "bad").is_err());
    let e = hellaswag::parse("ctx\n7\na\nb\nc\nd\n", "bad.txt").unwrap_err().to_string();
    assert!(e.contains("bad.txt:2"), "{e}");
}

#[test]
fn hellaswag_real_file_parses() {
    let Some(root) = kiln_models::skip::data_root() else {
        return;
    };
    let items = hellaswag::load(&std::path::Path::new(&root).join(hellaswag::DEFAULT_PATH)).unwrap();
    assert_eq!(items.len(), 10_042);
    assert!(items.iter().all(|i| i.label < 4 && i.endings.iter().all(|e| !e.is_empty())));
    assert!(items[0].context.contains(':'));
}

#[test]
fn task_specs() {
    let root = std::path::Path::new("/data");
    assert_eq!(kiln_evals::parse_task("hellaswag:500", root).unwrap().name(), "hellaswag");
    assert_eq!(kiln_evals::parse_task("squad", root).unwrap().name(), "squad");
    assert_eq!(kiln_evals::parse_task("bpb:x.txt", root).unwrap().name(), "bpb");
    assert_eq!(kiln_evals::parse_task("bpb:x.txt@0.9", root).unwrap().name(), "bpb");
    for bad in ["bpb", "hellaswag:many", "mmlu", "bpb:x.txt@1.5"] {
        let e = kiln_evals::parse_task(bad, root).err().unwrap().to_string();
        assert!(e.contains("hint"), "{e}");
    }
}

/// A chat model that replies with a fixed text (and the end-of-turn token, unless `ramble`),
/// recording the prompts it was given.
struct Replier {
    tok: Tokenizer,
    reply: fn(&str) -> String,
    ramble: bool,
    prompts: Vec<String>,
    /// The size of each `greedy_batch` call.
    batches: Vec<usize>,
}

impl Scorer for Replier {
    fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }
    fn context(&self) -> usize {
        4096
    }
    fn logprobs(&mut self, _: &[Vec<u32>]) -> Vec<Vec<f64>> {
        Vec::new()
    }
    fn greedy(&mut self, p: &[u32], max: usize, stop: &[u32]) -> Vec<u32> {
        let prompt = self.tok.decode_all(p).unwrap();
        let mut out = self.tok.encode(&(self.reply)(&prompt)).unwrap();
        if !self.ramble {
            out.push(stop[0]);
        }
        self.prompts.push(prompt);
        out.truncate(max);
        out
    }
    fn greedy_batch(&mut self, prompts: &[Vec<u32>], max: usize, stop: &[u32]) -> Vec<Vec<u32>> {
        self.batches.push(prompts.len());
        prompts.iter().map(|p| self.greedy(p, max, stop)).collect()
    }
}

#[test]
fn generating_tasks_hand_the_scorer_one_batch() {
    // GSM8K from a file of 5 questions, through run_tasks (and its progress wrapper): one batch of
    // 5 prompts reaches the scorer, so a batching scorer can generate them together.
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("gsm8k")).unwrap();
    let lines: String = (0..5).map(|i| format!("{}\n", serde_json::json!({"question": format!("What is {i} plus 1?"), "answer": format!("It is {}.\n#### {}", i + 1, i + 1)}))).collect();
    std::fs::write(d.path().join("gsm8k/test.jsonl"), lines).unwrap();
    let task = kiln_evals::parse_task("gsm8k:5", d.path()).unwrap();
    let mut lm = Replier { tok: chat_tok(), reply: |p| if p.contains("What is 2 plus") { "3".into() } else { "7".into() }, ramble: false, prompts: Vec::new(), batches: Vec::new() };
    let mut meters = kiln_evals::energy::Meters::new(vec![Box::new(kiln_evals::energy::Estimate::new(10.0, 0.0))]);
    let evals = kiln_evals::run_tasks(&[task], &mut lm, &mut meters, |_, _| {}).unwrap();
    assert_eq!(lm.batches, vec![5]);
    assert_eq!(evals["gsm8k"].metrics["em"], Some(0.2), "{:?}", evals["gsm8k"].metrics);
}

fn chat_tok() -> Tokenizer {
    let mut t = Tokenizer::byte_level().unwrap();
    t.add_special_tokens(&kiln_models::chat::CHATML_TOKENS);
    t
}

#[test]
fn squad_rc_scores_replies_to_the_passage_and_question() {
    let Some(data) = kiln_models::skip::data_root() else { return };
    // The gold answer sits after "Question: " in no reply; answer "Denver Broncos" everywhere.
    let task = kiln_evals::parse_task("squad-rc:10@0", &data).unwrap();
    let mut lm = Replier { tok: chat_tok(), reply: |_| "Denver Broncos".into(), ramble: false, prompts: Vec::new(), batches: Vec::new() };
    let r = task.run(&mut lm).unwrap();
    assert_eq!(r.n, 10);
    assert_eq!(r.metrics["format"], 1.0);
    // The first question (index 0) of Super Bowl 50 is "Which NFL team represented the AFC at Super Bowl 50?".
    assert!(r.metrics["em"] > 0.0 && r.metrics["em"] < 1.0, "{:?}", r.metrics);
    let p = &lm.prompts[0];
    assert!(p.starts_with("<|im_start|>user\nAnswer the question with a short phrase from the passage.\n\nPassage: Super Bowl 50 was"), "{p}");
    assert!(p.ends_with("Question: Which NFL team represented the AFC at Super Bowl 50?<|im_end|>\n<|im_start|>assistant\n"), "{p}");
    let mut rambler = Replier { tok: chat_tok(), reply: |_| "Denver Broncos".into(), ramble: true, prompts: Vec::new(), batches: Vec::new() };
    assert_eq!(task.run(&mut rambler).unwrap().metrics["format"], 0.0);
    let e = kiln_evals::parse_task("squad-rc:x@1", &data).err().unwrap().to_string();
    assert!(e.contains("'x' is not a number"), "{e}");
}

#[test]
fn gsm8k_matches_the_last_number() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("gsm8k")).unwrap();
    let items = "{\"question\": \"2 + 3?\", \"answer\": \"2 + 3 = <<2+3=5>>5\\n#### 5\"}\n{\"question\": \"1,000 + 1?\", \"answer\": \"#### 1,001\"}\n";
    std::fs::write(dir.path().join("gsm8k/test.jsonl"), items).unwrap();
    let task = kiln_evals::parse_task("gsm8k:all", dir.path()).unwrap();
    let mut lm = Replier { tok: chat_tok(), reply: |p| if p.contains("2 + 3") { "2 plus 3 makes 5.".into() } else { "It is 1,002.".into() }, ramble: false, prompts: Vec::new(), batches: Vec::new() };
    let r = task.run(&mut lm).unwrap();
    assert_eq!((r.n, r.metrics["em"], r.metrics["format"]), (2, 0.5, 1.0));
}

/// Open book with retrieval: closed book, the gold passage, and BM25's top 3 from an index of
/// SQuAD dev's paragraphs, each with the prompt it should have; the retrieval's own scores.
#[test]
fn squad_rag_answers_from_no_passage_the_gold_passage_or_the_index() {
    let Some(data) = kiln_models::skip::data_root() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("squad-index");
    let paragraphs = data.join(kiln_evals::tasks::squad_rc::PARAGRAPHS);
    kiln_retrieval::Index::build(&index, &[paragraphs], kiln_retrieval::ChunkSpec::default(), &kiln_retrieval::Splitter::Words, 1).unwrap();
    let replier = || Replier { tok: chat_tok(), reply: |_| "Denver Broncos".into(), ramble: false, prompts: Vec::new(), batches: Vec::new() };
    let question = "Question: Which NFL team represented the AFC at Super Bowl 50?<|im_end|>\n<|im_start|>assistant\n";

    let closed = kiln_evals::parse_task("squad-rag:10@0:closed", &data).unwrap();
    let mut lm = replier();
    let r = closed.run(&mut lm).unwrap();
    assert_eq!(r.n, 10);
    assert!(lm.prompts[0].starts_with("<|im_start|>user\nAnswer the question with a short phrase.\n\nQuestion: ") && lm.prompts[0].ends_with(question), "{}", lm.prompts[0]);
    assert!(!r.metrics.contains_key("recall@1"));

    let gold = kiln_evals::parse_task("squad-rag:10@0:gold", &data).unwrap();
    let mut lm = replier();
    let r = gold.run(&mut lm).unwrap();
    assert!(lm.prompts[0].starts_with("<|im_start|>user\nAnswer the question with a short phrase from the passages.\n\n[1] Super Bowl 50\nSuper Bowl 50 was"), "{}", lm.prompts[0]);
    assert!(lm.prompts[0].ends_with(question) && !lm.prompts[0].contains("[2]"));
    assert!(r.metrics["em"] > 0.0 && r.metrics["em"] < 1.0, "{:?}", r.metrics);

    let mut top = kiln_evals::parse_task("squad-rag:10@0", &data).unwrap();
    let e = top.run(&mut replier()).err().unwrap().to_string();
    assert!(e.contains("--retrieval") && e.contains("kiln index build"), "{e}");
    let opened = std::sync::Arc::new(kiln_retrieval::Index::open(&index).unwrap());
    assert!(top.set_retrieval(&opened));
    let mut lm = replier();
    let r = top.run(&mut lm).unwrap();
    let m = &r.metrics;
    assert!(m["recall@1"] <= m["recall@5"] && m["recall@5"] <= m["recall@20"] && m["recall@20"] > 0.5, "{m:?}");
    assert!(m["mrr@20"] >= m["recall@1"] && m["mrr@20"] <= m["recall@20"], "{m:?}");
    assert!(m["query_ms_p50"] > 0.0 && m["query_ms_p99"] >= m["query_ms_p50"], "{m:?}");
    // The byte-level test tokenizer makes SQuAD's paragraphs long: the user turn keeps within
    // the 1,024-token budget by cutting passages (at most 3, the first always there).
    let tok = chat_tok();
    for p in &lm.prompts {
        let user = p.strip_prefix("<|im_start|>user\n").unwrap().split("<|im_end|>").next().unwrap();
        assert!(tok.encode(user).unwrap().len() <= 1024, "{p}");
        assert!(p.contains("\n\n[1] ") && !p.contains("[4] "), "{p}");
    }
    assert!(lm.prompts.iter().any(|p| p.contains("\n\n[2] ")), "no prompt has a second passage");
    assert!(lm.prompts[0].ends_with(question));

    for bad in ["squad-rag:10@0:top0", "squad-rag:10@0:best", "squad-rag:x@0", "squad-rag:10@0:top3:more"] {
        let e = kiln_evals::parse_task(bad, &data).err().unwrap().to_string();
        assert!(e.contains("not understood") && e.contains("hint"), "{bad}: {e}");
    }
    assert!(!kiln_evals::parse_task("squad-rc:10@0", &data).unwrap().set_retrieval(&opened), "squad-rc retrieves nothing");
}

/// A scorer that embeds a sequence as its hashed token bigrams, unit length: a lexical "dense"
/// retriever, enough to rank SQuAD paragraphs far better than chance.
struct Hasher {
    tok: Tokenizer,
}

impl Scorer for Hasher {
    fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }
    fn context(&self) -> usize {
        4096
    }
    fn logprobs(&mut self, _: &[Vec<u32>]) -> Vec<Vec<f64>> {
        Vec::new()
    }
    fn greedy(&mut self, _: &[u32], _: usize, _: &[u32]) -> Vec<u32> {
        Vec::new()
    }
    fn greedy_batch(&mut self, p: &[Vec<u32>], _: usize, _: &[u32]) -> Vec<Vec<u32>> {
        vec![Vec::new(); p.len()]
    }
    fn embed(&mut self, seqs: &[Vec<u32>]) -> Option<Vec<f32>> {
        const D: usize = 256;
        let mut out = vec![0f32; seqs.len() * D];
        for (s, row) in seqs.iter().zip(out.chunks_mut(D)) {
            for w in s.windows(2) {
                row[(w[0] as usize * 31 + w[1] as usize) % D] += 1.0;
            }
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            row.iter_mut().for_each(|x| *x /= n);
        }
        Some(out)
    }
}

/// squad-retrieval over an article range, with its fusion set and a sweep: the questions and
/// paragraphs are those articles' only; all-BM25 and all-dense convex fusions reproduce the
/// two rankings' recall; the sweep reports both fusions at nine weights.
#[test]
fn squad_retrieval_scores_an_article_range_and_sweeps_fusion_weights() {
    let Some(data) = kiln_models::skip::data_root() else { return };
    let qa = data.join(kiln_evals::tasks::squad_rc::QA);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&qa).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut titles: Vec<String> = Vec::new();
    for q in &rows {
        let t = q["title"].as_str().unwrap().to_string();
        if !titles.contains(&t) {
            titles.push(t);
        }
    }
    let want_questions = rows.iter().filter(|q| titles[1..3].contains(&q["title"].as_str().unwrap().to_string())).count();
    let paragraphs = std::fs::read_to_string(data.join(kiln_evals::tasks::squad_rc::PARAGRAPHS)).unwrap();
    let want_passages = paragraphs.lines().filter(|l| titles[1..3].iter().any(|t| l.contains(&format!("\"title\": {}", serde_json::json!(t))))).count();

    let task = kiln_evals::parse_task("squad-retrieval:all@1-3:held:sweep", &data).unwrap();
    let r = task.run(&mut Hasher { tok: chat_tok() }).unwrap();
    let m = &r.metrics;
    assert_eq!((r.n, m["questions"] as usize, m["passages"] as usize), (want_questions, want_questions, want_passages));
    assert!(m["dense_recall@20"] > 0.3 && m["bm25_recall@20"] > 0.5, "{m:?}");
    for method in ["convex", "rrf"] {
        for w in 1..=9 {
            for at in ["recall@1", "recall@5", "recall@20", "mrr@20"] {
                assert!(m.contains_key(&format!("sweep_{method}_w0.{w}_{at}")), "{method} {w} {at}: {:?}", m.keys());
            }
        }
    }
    // The hybrid is the default fusion's: the sweep's convex at 0.4.
    assert_eq!(m["hybrid_mrr@20"], m["sweep_convex_w0.4_mrr@20"]);
    assert!(r.notes.iter().any(|n| n.contains("articles 1 to 3") && n.contains("convex, dense weight 0.4")), "{:?}", r.notes);
    assert!(r.notes.iter().any(|n| n.starts_with("sweep: the best MRR@20")), "{:?}", r.notes);

    for (w, like) in [(0.0, "bm25"), (1.0, "dense")] {
        let mut t = kiln_evals::parse_task("squad-retrieval:60@1-3", &data).unwrap();
        assert!(t.set_fusion(kiln_retrieval::Fusion { method: kiln_retrieval::fusion::Method::Convex, dense_weight: w }));
        let r = t.run(&mut Hasher { tok: chat_tok() }).unwrap();
        assert_eq!(r.n, 60);
        for at in ["recall@1", "recall@5", "recall@20", "mrr@20"] {
            assert_eq!(r.metrics[&format!("hybrid_{at}")], r.metrics[&format!("{like}_{at}")], "weight {w}: {at}");
        }
        assert!(!r.metrics.contains_key("sweep_rrf_w0.5_mrr@20"));
    }
    for bad in ["squad-retrieval:all@3-1", "squad-retrieval:all@1-x", "squad-retrieval:all@1:held:held", "squad-retrieval:all@1:sweep:sweep", "squad-retrieval:all@1:best"] {
        let e = kiln_evals::parse_task(bad, &data).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("accepted {bad}"));
        assert!(e.contains("not understood") && e.contains("hint"), "{bad}: {e}");
    }
    assert!(!kiln_evals::parse_task("squad-rc:10@1", &data).unwrap().set_fusion(kiln_retrieval::Fusion::default()), "squad-rc fuses nothing");
}
