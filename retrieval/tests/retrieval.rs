//! The retrieval library: chunk offsets, an index's round trip on disk, incremental adds, the
//! manifest's checks, reciprocal-rank fusion, prompt assembly within a budget, RAFT examples.

use std::path::{Path, PathBuf};

use kiln_retrieval::chunk::{chunk_document, sentence_starts};
use kiln_retrieval::fusion::{convex, rrf, weighted_rrf, Fusion, Method, RRF_C};
use kiln_retrieval::prompt::{assemble, Assembly};
use kiln_retrieval::raft::{example, Fallback, Qa, RaftSpec};
use kiln_retrieval::{ChunkSpec, Document, Hit, Index, Retriever, Splitter};

fn doc(id: &str, text: &str) -> Document {
    Document { id: id.into(), title: Some(format!("About {id}")), text: text.into() }
}

fn jsonl(path: &Path, docs: &[(&str, &str)]) {
    let lines: String = docs.iter().map(|(id, t)| format!("{}\n", serde_json::json!({"doc_id": id, "title": id, "text": t}))).collect();
    std::fs::write(path, lines).unwrap();
}

const ANIMALS: &[(&str, &str)] = &[
    ("cats", "Cats purr when they are content. A cat sleeps for most of the day."),
    ("dogs", "Dogs bark at strangers. The dog is a loyal companion and likes long walks."),
    ("owls", "Owls hunt at night. An owl can turn its head almost all the way round."),
];

#[test]
fn chunks_cover_their_offsets_end_on_sentences_and_overlap() {
    let text = "The first sentence is here. The second one follows it! Is this the third? \
                \"Quoted ends.\" Then a very long sentence without any stop that goes on and on for quite a few words indeed";
    let d = doc("d", text);
    for (tokens, overlap) in [(12, 0), (12, 4), (7, 3), (1000, 10), (3, 1)] {
        let spec = ChunkSpec::new(tokens, overlap).unwrap();
        let chunks = chunk_document(&d, spec, &Splitter::Words).unwrap();
        assert!(!chunks.is_empty());
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.text, &text[c.start..c.end], "chunk {i} of {tokens}/{overlap}");
            assert_eq!(c.chunk as usize, i);
            assert_eq!(c.doc_id, "d");
            assert!(Splitter::Words.count(&c.text).unwrap() <= tokens, "chunk {i} is longer than {tokens} tokens: {:?}", c.text);
        }
        // Everything is covered, in order, each chunk starting no earlier than the last.
        assert_eq!(chunks[0].start, 0);
        assert_eq!(chunks.last().unwrap().end, text.len());
        for w in chunks.windows(2) {
            let gap = text.get(w[0].end..w[1].start.max(w[0].end)).unwrap_or("");
            assert!(w[1].start > w[0].start && gap.trim().is_empty(), "{tokens}/{overlap}: gap or no progress between {:?} and {:?}", w[0], w[1]);
            if overlap == 0 {
                assert!(w[1].start >= w[0].end);
            }
        }
    }
    // With room for two sentences, chunks end where sentences do.
    let starts = sentence_starts(text);
    let chunks = chunk_document(&d, ChunkSpec::new(14, 0).unwrap(), &Splitter::Words).unwrap();
    let ends_on_sentence = |c: &kiln_retrieval::Chunk| c.end == text.len() || starts.iter().any(|&s| s > c.end && text[c.end..s].trim().is_empty());
    assert!(ends_on_sentence(&chunks[0]) && ends_on_sentence(&chunks[1]), "{chunks:?}");
    assert_eq!(chunks[0].text, "The first sentence is here. The second one follows it!");
    // Overlap shares the previous chunk's last sentence when it fits.
    let chunks = chunk_document(&d, ChunkSpec::new(14, 7).unwrap(), &Splitter::Words).unwrap();
    assert!(chunks[1].text.starts_with("The second one follows it!"), "{:?}", chunks[1].text);
    // Multi-byte text keeps char boundaries.
    let u = doc("u", "Zoë’s café serves crème brûlée. Ça va très bien! 東京は大きい。 Next.");
    for c in chunk_document(&u, ChunkSpec::new(4, 1).unwrap(), &Splitter::Words).unwrap() {
        assert_eq!(c.text, &u.text[c.start..c.end]);
    }
    assert!(chunk_document(&doc("e", "   "), ChunkSpec::default(), &Splitter::Words).unwrap().is_empty());
    assert!(ChunkSpec::new(8, 8).is_err() && ChunkSpec::new(0, 0).is_err());
}

#[test]
fn an_index_persists_adds_incrementally_and_replaces_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.jsonl");
    jsonl(&a, ANIMALS);
    let out = tmp.path().join("idx");
    let (index, added) = Index::build(&out, &[a.clone()], ChunkSpec::default(), &Splitter::Words, 1).unwrap();
    assert_eq!((added.files, added.documents, added.chunks), (1, 3, 3));
    let top = index.retrieve("which animal hunts at night?", 2).unwrap();
    assert_eq!(top[0].doc_id, "owls");
    assert_eq!(top[0].title.as_deref(), Some("owls"));
    assert_eq!(top[0].text, ANIMALS[2].1);
    assert!(top[0].score > top[1].score);
    drop(index);

    // Reopened from disk: the same answers.
    let mut index = Index::open(&out).unwrap();
    assert_eq!(index.retrieve("which animal hunts at night?", 2).unwrap(), top);
    assert_eq!((index.manifest.documents, index.manifest.chunks), (3, 3));

    // Incremental: a new file adds; the same file again is skipped; a document again replaces.
    let b = tmp.path().join("b.jsonl");
    jsonl(&b, &[("bees", "Bees make honey and dance to tell where flowers are."), ("cats", "Cats chase mice and hunt birds at dawn.")]);
    let added = index.add(&[b.clone(), a.clone()], &Splitter::Words, 1).unwrap();
    assert_eq!((added.files, added.unchanged, added.documents, added.replaced), (1, 1, 2, 1));
    let index = Index::open(&out).unwrap();
    assert_eq!((index.manifest.documents, index.manifest.chunks, index.manifest.corpora.len()), (4, 4, 2));
    assert_eq!(index.retrieve("honey", 1).unwrap()[0].doc_id, "bees");
    let cats = index.retrieve("cats", 5).unwrap();
    assert!(cats.iter().any(|h| h.text.contains("mice")) && !cats.iter().any(|h| h.text.contains("purr")), "the old cats document was not replaced: {cats:?}");

    // Building over an existing index is refused, and leaves it as it was.
    let e = Index::build(&out, &[a.clone()], ChunkSpec::default(), &Splitter::Words, 1).err().unwrap().to_string();
    assert!(e.contains("exists") && e.contains("kiln index add"), "{e}");
    assert_eq!(Index::open(&out).unwrap().manifest.chunks, 4);
    // A failed build leaves nothing behind.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"doc_id\": \"x\", \"text\": \"fine\"}\n{\"id\": 3}\n").unwrap();
    let e = Index::build(&tmp.path().join("idx2"), &[bad], ChunkSpec::default(), &Splitter::Words, 1).err().unwrap().to_string();
    assert!(e.contains("bad.jsonl:2") && e.contains("\"text\""), "{e}");
    let left: Vec<PathBuf> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_string_lossy().contains("idx2")).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_damaged_or_mismatched_index_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.jsonl");
    jsonl(&a, ANIMALS);
    let out = tmp.path().join("idx");
    Index::build(&out, &[a.clone()], ChunkSpec::new(64, 8).unwrap(), &Splitter::Words, 1).unwrap();
    let manifest = out.join("kiln-index.json");
    let good = std::fs::read_to_string(&manifest).unwrap();
    let err = |dir: &Path| Index::open(dir).err().map(|e| format!("{e:#}")).unwrap_or_else(|| panic!("{} opened", dir.display()));

    // Adding with other chunking or another splitter.
    let mut index = Index::open(&out).unwrap();
    index.manifest.chunking = ChunkSpec::new(32, 8).unwrap();
    let e = index.manifest.check_chunking(ChunkSpec::new(64, 8).unwrap(), "words", &out).err().unwrap().to_string();
    assert!(e.contains("32") && e.contains("hint"), "{e}");
    let mut index = Index::open(&out).unwrap();
    let tok = kiln_models::Tokenizer::byte_level().unwrap();
    let e = index.add(&[a.clone()], &Splitter::model(tok).unwrap(), 1).err().unwrap().to_string();
    assert!(e.contains("words") && e.contains("--tokenizer"), "{e}");

    // A newer format, a damaged manifest, counts that disagree, a missing BM25 index.
    std::fs::write(&manifest, good.replace("\"format\": 2", "\"format\": 99")).unwrap();
    let e = err(&out);
    assert!(e.contains("format 99") && e.contains("newer"), "{e}");
    std::fs::write(&manifest, &good[..good.len() / 2]).unwrap();
    let e = err(&out);
    assert!(e.contains("damaged") && e.contains("kiln index build"), "{e}");
    std::fs::write(&manifest, good.replace("\"chunks\": 3", "\"chunks\": 7")).unwrap();
    let e = err(&out);
    assert!(e.contains("7 chunks") && e.contains("holds 3"), "{e}");
    std::fs::write(&manifest, &good).unwrap();
    Index::open(&out).unwrap();
    let meta = out.join("bm25/meta.json");
    std::fs::write(&meta, "{ not json").unwrap();
    let e = err(&out);
    assert!(e.contains("BM25 index") && e.contains("rebuild"), "{e}");
    let e = err(&tmp.path().join("nowhere"));
    assert!(e.contains("no such folder") && e.contains("kiln index build"), "{e}");
    let e = err(tmp.path());
    assert!(e.contains("not a Kiln index"), "{e}");
}

fn hit(doc: &str, chunk: u32) -> Hit {
    Hit { doc_id: doc.into(), chunk, score: 0.0, title: None, text: format!("{doc} {chunk}"), start: 0, end: 0 }
}

#[test]
fn reciprocal_rank_fusion_sums_reciprocal_ranks() {
    let a = vec![hit("x", 0), hit("y", 0), hit("z", 0)];
    let b = vec![hit("y", 0), hit("w", 0), hit("x", 1)];
    let fused = rrf(&[a, b], 10, RRF_C);
    let ids: Vec<(String, u32)> = fused.iter().map(|h| (h.doc_id.clone(), h.chunk)).collect();
    // y: 1/62 + 1/61; x#0: 1/61; w: 1/62; z: 1/63; x#1: 1/63 (ties keep first appearance).
    assert_eq!(ids, vec![("y".into(), 0), ("x".into(), 0), ("w".into(), 0), ("z".into(), 0), ("x".into(), 1)]);
    let want = 1.0 / 62.0 + 1.0 / 61.0;
    assert!((fused[0].score as f64 - want).abs() < 1e-7, "{} vs {want}", fused[0].score);
    assert!((fused[1].score as f64 - 1.0 / 61.0).abs() < 1e-7);
    assert_eq!(rrf(&[vec![hit("a", 0), hit("b", 0)]], 1, RRF_C).len(), 1);
    assert!(rrf(&[], 5, RRF_C).is_empty());
    // Weighted: the second ranking counts three times the first.
    let (a, b) = (vec![hit("x", 0), hit("y", 0)], vec![hit("y", 0), hit("x", 0)]);
    let w = weighted_rrf(&[(&a, 0.25), (&b, 0.75)], 10, RRF_C);
    assert_eq!(w[0].doc_id, "y");
    assert!((w[0].score as f64 - (0.25 / 62.0 + 0.75 / 61.0)).abs() < 1e-7);
    // Fusion's rrf at dense weight 0.5 ranks as the unweighted sum.
    let f = Fusion::parse("rrf", None).unwrap();
    assert_eq!(f, Fusion { method: Method::Rrf, dense_weight: 0.5 });
    let ids = |h: &[Hit]| h.iter().map(|h| h.doc_id.clone()).collect::<Vec<_>>();
    let (s, d) = (vec![hit("x", 0), hit("y", 0), hit("z", 0)], vec![hit("y", 0), hit("w", 0), hit("x", 0)]);
    assert_eq!(ids(&f.fuse(&s, &d, 10)), ids(&rrf(&[s.clone(), d.clone()], 10, RRF_C)));
}

fn scored(doc: &str, score: f32) -> Hit {
    Hit { score, ..hit(doc, 0) }
}

#[test]
fn convex_fusion_weighs_min_max_normalised_scores() {
    // BM25 scores 10, 6, 2 normalise to 1, 0.5, 0; cosines 0.9, 0.8, 0.4 to 1, 0.8, 0.
    let sparse = vec![scored("a", 10.0), scored("b", 6.0), scored("c", 2.0)];
    let dense = vec![scored("c", 0.9), scored("b", 0.8), scored("d", 0.4)];
    let fused = convex(&[(&sparse, 0.7), (&dense, 0.3)], 10);
    let got: Vec<(&str, f64)> = fused.iter().map(|h| (h.doc_id.as_str(), h.score as f64)).collect();
    // a: 0.7; b: 0.35 + 0.24 = 0.59; c: 0 + 0.3; d: 0 (each missing side adds 0).
    let want = [("a", 0.7), ("b", 0.59), ("c", 0.3), ("d", 0.0)];
    assert_eq!(got.len(), want.len());
    for ((g, gs), (w, ws)) in got.iter().zip(want) {
        assert_eq!(*g, w);
        assert!((gs - ws).abs() < 1e-6, "{g}: {gs} vs {ws}");
    }
    // The weights decide: all dense puts c first (then a, absent from the dense list, ties at 0
    // with d, its last, and comes first by first appearance); all BM25 keeps BM25's order.
    let ids = |h: Vec<Hit>| h.into_iter().map(|h| h.doc_id).collect::<Vec<_>>();
    assert_eq!(ids(Fusion { method: Method::Convex, dense_weight: 1.0 }.fuse(&sparse, &dense, 3)), ["c", "b", "a"]);
    assert_eq!(ids(Fusion { method: Method::Convex, dense_weight: 0.0 }.fuse(&sparse, &dense, 3)), ["a", "b", "c"]);
    // Equal scores normalise to 1 (no division by zero); an empty side adds nothing.
    let flat = convex(&[(&[scored("p", 3.0), scored("q", 3.0)][..], 1.0), (&[][..], 1.0)], 5);
    assert!(flat.iter().all(|h| (h.score - 1.0).abs() < 1e-6), "{flat:?}");
    assert_eq!(ids(flat), ["p", "q"]);
    assert_eq!(Fusion::default().method, Method::Convex);
    for (m, w) in [("max", None), ("convex", Some(1.5)), ("rrf", Some(-0.1)), ("convex", Some(f64::NAN))] {
        assert!(Fusion::parse(m, w).is_err(), "{m} {w:?}");
    }
}

#[test]
fn prompts_fit_the_budget_and_never_cut_the_question() {
    let s = Splitter::Words;
    let long = "word ".repeat(200);
    let hits: Vec<Hit> = (0..4).map(|i| Hit { doc_id: format!("d{i}"), chunk: 0, score: 1.0, title: Some(format!("T{i}")), text: format!("passage {i} {}", "text ".repeat(30)), start: 0, end: 0 }).collect();
    let question = "What is the passage about, exactly, and why?";
    for budget in [10, 40, 50, 100, 150, 1000] {
        let a = Assembly { budget, ..Assembly::default() };
        let p = assemble(question, &hits, &a, &s).unwrap();
        assert!(p.text.ends_with(&format!("Question: {question}")), "{budget}: the question was cut: {}", p.text);
        if !p.sources.is_empty() {
            assert!(p.tokens <= budget, "{budget}: {} tokens", p.tokens);
        }
        assert_eq!(p.tokens, s.count(&p.text).unwrap());
        // Passages in rank order, only the last one cut.
        for (i, src) in p.sources.iter().enumerate() {
            assert_eq!(src.n, i + 1);
            assert_eq!(src.doc_id, format!("d{i}"));
            assert!(!src.cut || i + 1 == p.sources.len());
        }
        if budget == 1000 {
            assert_eq!(p.sources.len(), 4);
            assert!(p.sources.iter().all(|s| !s.cut));
        }
        if budget == 50 {
            assert!(p.sources.len() == 1 && p.sources[0].cut, "{:?}", p.sources);
        }
    }
    // Too small for anything but the question: the question alone.
    let p = assemble(question, &hits, &Assembly { budget: 3, ..Assembly::default() }, &s).unwrap();
    assert!(p.sources.is_empty() && p.text.contains(question));
    // A question holding a placeholder stays as written.
    let p = assemble("what does {passages} mean?", &hits[..1], &Assembly::default(), &s).unwrap();
    assert!(p.text.ends_with("Question: what does {passages} mean?"));
    let _ = long;
}

/// A retriever over fixed passages, best first, whatever the query.
struct Fixed(Vec<Hit>);
impl Retriever for Fixed {
    fn retrieve(&self, _q: &str, k: usize) -> anyhow::Result<Vec<Hit>> {
        Ok(self.0.iter().take(k).cloned().collect())
    }
    fn kind(&self) -> &'static str {
        "fixed"
    }
}

#[test]
fn raft_keeps_the_gold_passage_at_rate_p_among_allowed_distractors() {
    let pool: Vec<Hit> = ["gold", "a", "held-out", "b", "c", "d", "e"].iter().map(|d| hit(d, 0)).collect();
    let retriever = Fixed(pool);
    let allowed = |d: &str| d != "held-out";
    let spec = RaftSpec { k: 4, p_gold: 0.7, pool: 20, seed: 9 };
    let gold = hit("gold", 0);
    let (mut kept, n) = (0, 2000);
    let mut first_positions = std::collections::HashSet::new();
    for i in 0..n {
        let qa = Qa { id: format!("q{i}"), question: "?".into(), answers: vec!["yes".into()], doc_id: "gold".into() };
        let ex = example(&qa, &gold, &retriever, &allowed, &spec, None).unwrap();
        assert_eq!(ex.passages.len(), 4);
        assert!(ex.passages.iter().all(|h| h.doc_id != "held-out"), "a held-out passage leaked in");
        let golds = ex.passages.iter().filter(|h| h.doc_id == "gold").count();
        assert_eq!(golds, usize::from(ex.gold));
        kept += golds;
        first_positions.insert(ex.passages[0].doc_id.clone());
        // The same example again: the same draw.
        assert_eq!(example(&qa, &gold, &retriever, &allowed, &spec, None).unwrap(), ex);
        assert_eq!(ex.answer, "yes");
    }
    let rate = kept as f64 / n as f64;
    assert!((rate - 0.7).abs() < 0.04, "gold kept at {rate}");
    assert!(first_positions.len() > 2, "passages are not shuffled: {first_positions:?}");
    // P = 1 always keeps it, P = 0 never.
    for (p, want) in [(1.0, true), (0.0, false)] {
        let qa = Qa { id: "z".into(), question: "?".into(), answers: vec![], doc_id: "gold".into() };
        assert_eq!(example(&qa, &gold, &retriever, &allowed, &RaftSpec { p_gold: p, ..spec }, None).unwrap().gold, want);
    }
    // A retriever that finds only one other document: random allowed documents fill the rest,
    // never the gold one twice, a held-out one or a repeat; without a fallback the example is short.
    let sparse = Fixed(vec![hit("gold", 0), hit("a", 0)]);
    let docs: Vec<String> = ["a", "b", "c", "d", "e", "gold", "held-out"].iter().map(|d| d.to_string()).collect();
    let first_chunk = |d: &str| Ok(Some(hit(d, 0)));
    let fallback = Fallback { docs: &docs, first_chunk: &first_chunk };
    let mut drawn = std::collections::HashSet::new();
    for i in 0..200 {
        let qa = Qa { id: format!("f{i}"), question: "?".into(), answers: vec![], doc_id: "gold".into() };
        let short = example(&qa, &gold, &sparse, &allowed, &spec, None).unwrap();
        assert_eq!(short.passages.len(), 1 + usize::from(short.gold));
        let ex = example(&qa, &gold, &sparse, &allowed, &spec, Some(&fallback)).unwrap();
        assert_eq!((ex.passages.len(), ex.gold), (4, short.gold), "{ex:?}");
        let mut ids: Vec<&str> = ex.passages.iter().map(|h| h.doc_id.as_str()).collect();
        assert!(ids.contains(&"a") && !ids.contains(&"held-out"), "{ids:?}");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4, "a repeat: {ex:?}");
        drawn.extend(ex.passages.iter().map(|h| h.doc_id.clone()));
        assert_eq!(example(&qa, &gold, &sparse, &allowed, &spec, Some(&fallback)).unwrap(), ex);
    }
    assert_eq!(drawn.len(), 6, "every allowed document is drawn sometimes: {drawn:?}");
}
