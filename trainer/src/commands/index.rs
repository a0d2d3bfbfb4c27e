//! `kiln index build | add | query`: retrieval indexes over a corpus (kiln-retrieval).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_recipes::DeviceSpec;
use kiln_retrieval::{ChunkSpec, Hit, Index, Kind, Retriever, Splitter};
use kiln_trainer::embedder::open_index;

#[derive(clap::Subcommand)]
pub enum Args {
    /// Index a corpus: JSONL ({"doc_id" or "id", "title", "text"} a line), a JSON array of those,
    /// Parquet with those columns, text files, or folders of them.
    Build {
        #[arg(required = true, num_args = 1..)]
        corpus: Vec<PathBuf>,
        /// The index folder to create (it must not exist).
        #[arg(long)]
        out: PathBuf,
        /// bm25, dense (embeddings of --embed's model) or hybrid (both, fused by reciprocal rank).
        /// Dense and hybrid indexes keep the BM25 index too.
        #[arg(long, default_value = "bm25")]
        kind: String,
        /// The model that embeds the chunks (and, later, the queries): a run, a model folder, a
        /// .gguf file or hf://org/model. Needed for dense and hybrid.
        #[arg(long)]
        embed: Option<PathBuf>,
        /// Where the embedding model runs: cpu (the default), wgpu[:N], cuda[:N], auto.
        #[arg(long)]
        device: Option<DeviceSpec>,
        /// Count chunk tokens with this tokenizer.json (or a model folder's); default: words.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Tokens per chunk.
        #[arg(long, default_value_t = ChunkSpec::default().tokens)]
        chunk_tokens: usize,
        /// Tokens shared by consecutive chunks of a document.
        #[arg(long, default_value_t = ChunkSpec::default().overlap)]
        overlap: usize,
    },
    /// Add documents to an index (chunked as it was built). Files already indexed with the same
    /// bytes are skipped; a document whose id is in the index replaces it.
    Add {
        index: PathBuf,
        #[arg(required = true, num_args = 1..)]
        corpus: Vec<PathBuf>,
        /// The tokenizer the index was built with, if any.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The embedding model of a dense or hybrid index, if it moved (default: the manifest's).
        #[arg(long)]
        embed: Option<PathBuf>,
        #[arg(long)]
        device: Option<DeviceSpec>,
    },
    /// Search an index: one question, or many with --queries.
    Query {
        index: PathBuf,
        question: Option<String>,
        /// A file of questions: one a line, or JSONL with a "question" field.
        #[arg(long, conflicts_with = "question")]
        queries: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        k: usize,
        /// text, or json (one object a query: {"query", "results": [{"doc_id", "chunk", "score", "text"}]}).
        #[arg(long, default_value = "text")]
        format: String,
        /// Answer as bm25, dense or hybrid instead of the index's own kind.
        #[arg(long)]
        kind: Option<String>,
        /// The model that embeds queries (default: the one the index was built with).
        #[arg(long)]
        embed: Option<PathBuf>,
        /// Dense search checks every vector, even where the index has an HNSW graph.
        #[arg(long)]
        exact: bool,
        #[command(flatten)]
        fusion: super::FusionArgs,
        #[arg(long)]
        device: Option<DeviceSpec>,
    },
}

pub fn run(a: Args) -> Result<()> {
    let threads = kiln_trainer::plan::threads();
    match a {
        Args::Build { corpus, out, kind, embed, device, tokenizer, chunk_tokens, overlap } => {
            let kind = Kind::parse(&kind)?;
            let embedder = match (kind, &embed) {
                (Kind::Bm25, Some(_)) => bail!("--embed: a bm25 index embeds nothing\n  hint: --kind dense or --kind hybrid"),
                (Kind::Bm25, None) => None,
                (_, None) => bail!("--kind {}: the chunks are embedded by a model: give --embed MODEL (a run, a model folder, a .gguf file or hf://org/model)", kind.name()),
                (_, Some(m)) => {
                    let be = kiln_trainer::device::resolve(device.unwrap_or(DeviceSpec::Cpu))?;
                    let shown = if m.exists() { std::fs::canonicalize(m).unwrap_or_else(|_| m.clone()) } else { m.clone() };
                    Some((kiln_trainer::embedder::load(m, &be)?, shown.display().to_string()))
                }
            };
            let spec = ChunkSpec::new(chunk_tokens, overlap)?;
            let splitter = splitter(tokenizer.as_deref())?;
            let t0 = std::time::Instant::now();
            let (index, added) = Index::build_with(&out, &corpus, spec, &splitter, threads, kind, embedder)?;
            let graph = if index.ann().is_some() { ", with an HNSW graph" } else { "" };
            println!(
                "built {} ({}{graph}): {} documents from {} files, {} chunks of at most {} tokens ({}, overlap {}), in {:.1} s",
                index.dir.display(), kind.name(), added.documents, added.files, added.chunks, spec.tokens, splitter.name(), spec.overlap, t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Args::Add { index, corpus, tokenizer, embed, device } => {
            let mut idx = open_index(&index, None, embed.as_deref(), false, device)?;
            let splitter = splitter(tokenizer.as_deref())?;
            let added = idx.add(&corpus, &splitter, threads)?;
            println!(
                "{}: added {} documents ({} replaced) from {} files, {} chunks; {} files unchanged; the index holds {} documents, {} chunks",
                index.display(), added.documents, added.replaced, added.files, added.chunks, added.unchanged, idx.manifest.documents, idx.manifest.chunks
            );
            Ok(())
        }
        Args::Query { index, question, queries, k, format, kind, embed, exact, fusion, device } => {
            if !["text", "json"].contains(&format.as_str()) {
                bail!("--format {format}: text or json");
            }
            let kind = kind.as_deref().map(Kind::parse).transpose()?;
            let mut idx = open_index(&index, kind, embed.as_deref(), exact, device)?;
            idx.set_fusion(fusion.fusion()?);
            let questions = match (question, queries) {
                (Some(q), None) => vec![q],
                (None, Some(file)) => read_queries(&file)?,
                _ => bail!("give a question, or --queries FILE"),
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut ms = Vec::with_capacity(questions.len());
            for q in &questions {
                let t0 = std::time::Instant::now();
                let hits = idx.retrieve(q, k)?;
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
                print_hits(&mut out, q, &hits, &format)?;
            }
            out.flush()?;
            if questions.len() > 1 {
                ms.sort_by(f64::total_cmp);
                let at = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
                eprintln!("{} queries, k {k}, {}: {:.3} ms mean, p50 {:.3} ms, p99 {:.3} ms ({} chunks)", ms.len(), idx.kind().name(), ms.iter().sum::<f64>() / ms.len() as f64, at(0.5), at(0.99), idx.manifest.chunks);
            }
            Ok(())
        }
    }
}

/// The chunking splitter: a tokenizer.json (or a folder holding one), else words.
fn splitter(tokenizer: Option<&Path>) -> Result<Splitter> {
    let Some(path) = tokenizer else { return Ok(Splitter::Words) };
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    Splitter::model(kiln_models::Tokenizer::load(&file)?)
}

/// Questions from a file: JSONL records with a "question" field, or one question a line.
fn read_queries(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
            match v.get("question").and_then(|q| q.as_str()) {
                Some(q) => out.push(q.to_string()),
                None => bail!("{}:{}: no \"question\" string field\n  hint: a queries file holds one question a line, or JSONL records with \"question\"", path.display(), i + 1),
            }
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        bail!("{}: no questions", path.display());
    }
    Ok(out)
}

fn print_hits(out: &mut impl Write, query: &str, hits: &[Hit], format: &str) -> Result<()> {
    if format == "json" {
        let results: Vec<serde_json::Value> = hits.iter().map(|h| serde_json::json!({"doc_id": h.doc_id, "chunk": h.chunk, "score": h.score, "text": h.text})).collect();
        writeln!(out, "{}", serde_json::json!({"query": query, "results": results}))?;
        return Ok(());
    }
    writeln!(out, "query: {query}")?;
    for (i, h) in hits.iter().enumerate() {
        let text: String = h.text.chars().take(200).collect();
        let more = if text.len() < h.text.len() { "…" } else { "" };
        writeln!(out, "{:>3}. {:.3}  {} #{}  {text}{more}", i + 1, h.score, h.doc_id, h.chunk)?;
    }
    if hits.is_empty() {
        writeln!(out, "     (no passage shares a word with the query)")?;
    }
    Ok(())
}
