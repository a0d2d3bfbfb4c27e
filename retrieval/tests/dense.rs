//! Dense and hybrid retrieval: exact search against a sort, HNSW against exact search (recall
//! and a round trip through its files), a hybrid index built, reopened, queried and added to,
//! and the errors for a missing or different embedding model and damaged vector files.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use kiln_retrieval::ann::{Ann, AnnSpec};
use kiln_retrieval::dense::{Embedder, Vectors};
use kiln_retrieval::{ChunkSpec, Index, Kind, Retriever, Splitter};
use rand::{Rng, SeedableRng};

/// Words hashed into `dim` buckets (signed), summed, scaled to unit length: texts sharing words
/// are near. `salt` makes another "model".
struct Hashed {
    dim: usize,
    salt: u64,
}

impl Embedder for Hashed {
    fn dim(&self) -> usize {
        self.dim
    }
    fn embed(&self, texts: &[String]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for t in texts {
            let mut v = vec![0.0f32; self.dim];
            for w in t.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty() && *w != "query" && *w != "passage") {
                let mut h = self.salt ^ 0xcbf29ce484222325;
                for b in w.to_lowercase().bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x100000001b3);
                }
                v[(h % self.dim as u64) as usize] += if h >> 63 == 0 { 1.0 } else { -1.0 };
            }
            v[0] += 0.01; // never the zero vector
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(v.iter().map(|x| x / n));
        }
        Ok(out)
    }
    fn name(&self) -> String {
        format!("hashed-{}", self.salt)
    }
}

/// `n` unit vectors of width `d` around `clusters` centres.
fn clustered(n: usize, d: usize, clusters: usize, seed: u64) -> Vectors {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut gauss = move || -> f32 { (0..6).map(|_| rng.random::<f32>()).sum::<f32>() - 3.0 };
    let centres: Vec<Vec<f32>> = (0..clusters).map(|_| (0..d).map(|_| gauss()).collect()).collect();
    let mut v = Vectors::new(d);
    for i in 0..n {
        let c = &centres[i % clusters];
        let mut x: Vec<f32> = c.iter().map(|&m| m + 0.8 * gauss()).collect();
        let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        x.iter_mut().for_each(|a| *a /= norm);
        v.push(vec![(format!("d{i}"), 0)], &x);
    }
    v
}

#[test]
fn exact_search_is_a_sort_by_dot_product() {
    let v = clustered(9000, 24, 7, 1);
    let q = v.row(123).to_vec();
    let got = v.search_exact(&q, 10);
    let mut all: Vec<(usize, f32)> = (0..v.len()).map(|i| (i, kiln_retrieval::dense::dot(&q, v.row(i)))).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    assert_eq!(got, all[..10].to_vec());
    assert_eq!(got[0].0, 123);
    assert!(v.search_exact(&q, 0).is_empty());
    assert_eq!(v.search_exact(&q, 20_000).len(), 9000);
}

#[test]
fn hnsw_finds_what_exact_search_finds_and_survives_a_round_trip() {
    let v = clustered(4000, 32, 20, 2);
    let spec = AnnSpec::default();
    let ann = Ann::build(&v, spec);
    let queries = clustered(200, 32, 20, 3);
    let mut found = 0;
    for i in 0..queries.len() {
        let q = queries.row(i);
        let exact: Vec<usize> = v.search_exact(q, 10).into_iter().map(|r| r.0).collect();
        let approx = ann.search(q, 10);
        assert_eq!(approx.len(), 10);
        assert!(approx.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
        found += approx.iter().filter(|r| exact.contains(&r.0)).count();
    }
    let recall = found as f64 / (10.0 * queries.len() as f64);
    assert!(recall > 0.95, "HNSW recall@10 {recall}");

    let tmp = tempfile::tempdir().unwrap();
    ann.dump(tmp.path()).unwrap();
    let back = Ann::load(tmp.path(), spec, v.len()).unwrap();
    for i in 0..20 {
        assert_eq!(back.search(queries.row(i), 10), ann.search(queries.row(i), 10));
    }
    let e = format!("{:#}", Ann::load(tmp.path(), spec, v.len() + 1).err().unwrap());
    assert!(e.contains("4000 points") && e.contains("rebuild"), "{e}");
    // A damaged graph file is an error, never a panic that escapes.
    let graph = tmp.path().join("hnsw.hnsw.graph");
    let bytes = std::fs::read(&graph).unwrap();
    std::fs::write(&graph, &bytes[..bytes.len() / 3]).unwrap();
    let e = format!("{:#}", Ann::load(tmp.path(), spec, v.len()).err().unwrap());
    assert!(e.contains("HNSW graph cannot be read") && e.contains("rebuild"), "{e}");
}

const DOCS: &[(&str, &str)] = &[
    ("nile", "The Nile flows north through Egypt into the Mediterranean Sea."),
    ("everest", "Mount Everest rises above the Himalayas on the border of Nepal and Tibet."),
    ("sahara", "The Sahara desert has dunes that reach great heights under the sun."),
    ("amazon", "The Amazon river carries more water than any other river on Earth."),
];

fn write_docs(path: &Path, docs: &[(&str, &str)]) {
    let lines: String = docs.iter().map(|(id, t)| format!("{}\n", serde_json::json!({"doc_id": id, "title": id, "text": t}))).collect();
    std::fs::write(path, lines).unwrap();
}

#[test]
fn a_hybrid_index_persists_needs_its_model_and_adds_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("docs.jsonl");
    write_docs(&corpus, DOCS);
    let out = tmp.path().join("idx");
    let model: Arc<dyn Embedder> = Arc::new(Hashed { dim: 64, salt: 1 });
    let spec = ChunkSpec::new(64, 8).unwrap();
    let (built, added) = Index::build_with(&out, &[corpus.clone()], spec, &Splitter::Words, 1, Kind::Hybrid, Some((model.clone(), "hashed".into()))).unwrap();
    assert_eq!((added.documents, added.chunks), (4, 4));
    assert_eq!(built.kind(), Kind::Hybrid);
    assert_eq!(built.retrieve("Which river flows through Egypt?", 1).unwrap()[0].doc_id, "nile", "a built index answers at once");
    let e = format!("{:#}", Index::build_with(&tmp.path().join("x"), &[corpus.clone()], spec, &Splitter::Words, 1, Kind::Dense, None).err().unwrap());
    assert!(e.contains("--embed"), "{e}");

    // Reopened: BM25 answers without the model; dense and hybrid need it, and only it.
    let mut index = Index::open(&out).unwrap();
    assert_eq!(index.embedding_model(), Some("hashed"));
    let e = format!("{:#}", index.retrieve("Egypt Nile", 2).err().unwrap());
    assert!(e.contains("no embedding model") && e.contains("--embed hashed"), "{e}");
    let e = format!("{:#}", index.attach(Arc::new(Hashed { dim: 64, salt: 2 })).err().unwrap());
    assert!(e.contains("embeds differently") && e.contains("fingerprint"), "{e}");
    let e = format!("{:#}", index.attach(Arc::new(Hashed { dim: 32, salt: 1 })).err().unwrap());
    assert!(e.contains("width 64"), "{e}");
    index.attach(model.clone()).unwrap();
    for kind in [Kind::Dense, Kind::Hybrid, Kind::Bm25] {
        index.set_kind(kind, false).unwrap();
        let hits = index.retrieve("Which desert has high dunes?", 3).unwrap();
        assert_eq!(hits[0].doc_id, "sahara", "{kind:?}: {hits:?}");
        assert!(hits[0].text.starts_with("The Sahara"));
    }
    index.set_kind(Kind::Dense, true).unwrap();
    let exact = index.retrieve("river water", 4).unwrap();
    assert_eq!(exact.len(), 4);
    assert_eq!(exact[0].doc_id, "amazon");
    assert!(exact.windows(2).all(|w| w[0].score >= w[1].score));

    // Adding: a new document, and one that replaces its old chunks and vectors.
    let more = tmp.path().join("more.jsonl");
    write_docs(&more, &[("volga", "The Volga is the longest river in Europe and flows into the Caspian Sea."), ("nile", "The Nile delta fans out north of Cairo.")]);
    let mut without = Index::open(&out).unwrap();
    let e = format!("{:#}", without.add(&[more.clone()], &Splitter::Words, 1).err().unwrap());
    assert!(e.contains("embeds the new chunks") && e.contains("--embed"), "{e}");
    assert_eq!(Index::open(&out).unwrap().manifest.chunks, 4, "a refused add changes nothing");
    let a = index.add(&[more], &Splitter::Words, 1).unwrap();
    assert_eq!((a.documents, a.replaced), (2, 1));
    let mut index = Index::open(&out).unwrap();
    assert_eq!(index.manifest.chunks, 5);
    index.attach(model).unwrap();
    index.set_kind(Kind::Dense, false).unwrap();
    let hits = index.retrieve("Caspian Sea Volga", 1).unwrap();
    assert_eq!(hits[0].doc_id, "volga");
    let hits = index.retrieve("delta Cairo", 5).unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| h.doc_id != "nile" || h.text.contains("delta")), "the old Nile chunk is gone: {hits:?}");

    // A BM25 index cannot answer densely; damaged vector files are errors with a hint.
    let bm = tmp.path().join("bm");
    Index::build(&bm, &[corpus], spec, &Splitter::Words, 1).unwrap();
    let e = format!("{:#}", Index::open(&bm).unwrap().set_kind(Kind::Dense, false).err().unwrap());
    assert!(e.contains("no embeddings") && e.contains("--kind dense"), "{e}");
    let vectors = out.join("dense/vectors.f32");
    let bytes = std::fs::read(&vectors).unwrap();
    std::fs::write(&vectors, &bytes[..bytes.len() - 4]).unwrap();
    let e = format!("{:#}", Index::open(&out).err().unwrap());
    assert!(e.contains("vectors.f32") && e.contains("rebuild"), "{e}");
    let mut nan = bytes.clone();
    nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&vectors, &nan).unwrap();
    let e = format!("{:#}", Index::open(&out).err().unwrap());
    assert!(e.contains("non-finite"), "{e}");
}
