//! Sparse retrieval: BM25 over the chunks through tantivy's inverted index, kept on disk.
//!
//! The text is split by tantivy's `default` analyzer (runs of letters and digits, lowercased,
//! tokens over 40 bytes dropped), and a query is the same analyzer's terms joined as `SHOULD`
//! clauses, so no character of a question is query syntax. Scoring is tantivy's BM25, Okapi's
//! formula with k1 = 1.2 and b = 0.75 (fixed in tantivy). Each chunk is one tantivy document with
//! its `doc_id` (indexed whole, so a document's chunks can be replaced), chunk number, offsets,
//! title and text stored beside it. The chunk number is indexed too (from index format 2), so
//! that dense retrieval can fetch a chunk by its key.

use std::path::Path;

use anyhow::{Context, Result};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, Value, INDEXED, STORED, STRING, TEXT};
use tantivy::{IndexReader, ReloadPolicy, TantivyDocument, Term};

use crate::chunk::Chunk;
use crate::retriever::{Hit, Retriever};

/// Bytes of indexing memory per writer thread (tantivy's minimum is 15 MB).
const WRITER_BYTES_PER_THREAD: usize = 128 << 20;

struct Fields {
    doc_id: Field,
    chunk: Field,
    start: Field,
    end: Field,
    title: Field,
    text: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let f = Fields {
        doc_id: b.add_text_field("doc_id", STRING | STORED),
        chunk: b.add_u64_field("chunk", STORED | INDEXED),
        start: b.add_u64_field("start", STORED),
        end: b.add_u64_field("end", STORED),
        title: b.add_text_field("title", STORED),
        text: b.add_text_field("text", TEXT | STORED),
    };
    (b.build(), f)
}

/// A BM25 index in a folder.
pub struct Bm25 {
    index: tantivy::Index,
    reader: IndexReader,
    f: Fields,
    /// Whether chunk numbers are indexed (not in format-1 indexes).
    chunk_indexed: bool,
}

/// A tantivy error as a message naming the index, with the rebuild hint.
fn damaged(dir: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("BM25 index {}: {e}\n  hint: the index is damaged or incomplete; rebuild it with `kiln index build`", dir.display())
}

impl Bm25 {
    /// A new, empty index in `dir` (which must exist and be empty).
    pub fn create(dir: &Path) -> Result<Self> {
        let (schema, f) = schema();
        let index = tantivy::Index::create_in_dir(dir, schema).map_err(|e| damaged(dir, e))?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(|e| damaged(dir, e))?;
        Ok(Self { index, reader, f, chunk_indexed: true })
    }

    /// The index in `dir`, checked to have Kiln's schema.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = tantivy::Index::open_in_dir(dir).map_err(|e| damaged(dir, e))?;
        let (want, f) = schema();
        let have = index.schema();
        let old_chunk = tantivy::schema::FieldEntry::new_u64("chunk".into(), STORED.into());
        let chunk_indexed = have.get_field("chunk").ok().map(|id| have.get_field_entry(id)) != Some(&old_chunk);
        for (_, entry) in want.fields() {
            let found = have.get_field(entry.name()).ok().map(|id| have.get_field_entry(id));
            let same = found == Some(entry) || (entry.name() == "chunk" && found == Some(&old_chunk));
            if !same {
                return Err(damaged(dir, format!("its field '{}' is missing or of another type (not an index Kiln wrote)", entry.name())));
            }
        }
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(|e| damaged(dir, e))?;
        Ok(Self { index, reader, f, chunk_indexed })
    }

    /// Chunk `chunk` of document `doc_id`, with `score` as its score; `None` if the index does
    /// not hold it.
    pub fn chunk(&self, doc_id: &str, chunk: u32, score: f32) -> Result<Option<Hit>> {
        let searcher = self.reader.searcher();
        let by_doc: Box<dyn Query> = Box::new(TermQuery::new(Term::from_field_text(self.f.doc_id, doc_id), IndexRecordOption::Basic));
        let query: Box<dyn Query> = if self.chunk_indexed {
            let by_chunk: Box<dyn Query> = Box::new(TermQuery::new(Term::from_field_u64(self.f.chunk, chunk as u64), IndexRecordOption::Basic));
            Box::new(BooleanQuery::new(vec![(Occur::Must, by_doc), (Occur::Must, by_chunk)]))
        } else {
            by_doc
        };
        let found = searcher.search(&query, &tantivy::collector::DocSetCollector).context("looking up a chunk")?;
        for addr in found {
            let doc: TantivyDocument = searcher.doc(addr).context("reading a stored chunk")?;
            let hit = self.hit(&doc, score);
            if hit.chunk == chunk {
                return Ok(Some(hit));
            }
        }
        Ok(None)
    }

    /// Adds `chunks`, first removing every chunk of the documents in `replace` (documents added
    /// again), in one commit: the index has all of them or, if this fails, none.
    pub fn add(&mut self, dir: &Path, chunks: &[Chunk], replace: &[String], threads: usize) -> Result<()> {
        let threads = threads.clamp(1, 8);
        let mut w: tantivy::IndexWriter = self.index.writer_with_num_threads(threads, threads * WRITER_BYTES_PER_THREAD).map_err(|e| damaged(dir, e))?;
        for id in replace {
            w.delete_term(Term::from_field_text(self.f.doc_id, id));
        }
        for c in chunks {
            let mut d = TantivyDocument::default();
            d.add_text(self.f.doc_id, &c.doc_id);
            d.add_u64(self.f.chunk, c.chunk as u64);
            d.add_u64(self.f.start, c.start as u64);
            d.add_u64(self.f.end, c.end as u64);
            if let Some(t) = &c.title {
                d.add_text(self.f.title, t);
            }
            d.add_text(self.f.text, &c.text);
            w.add_document(d).map_err(|e| damaged(dir, e))?;
        }
        w.commit().map_err(|e| damaged(dir, e))?;
        w.wait_merging_threads().map_err(|e| damaged(dir, e))?;
        self.reader.reload().map_err(|e| damaged(dir, e))?;
        Ok(())
    }

    /// Chunks in the index.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a document with id `id` has chunks in the index.
    pub fn contains(&self, id: &str) -> Result<bool> {
        let q = TermQuery::new(Term::from_field_text(self.f.doc_id, id), IndexRecordOption::Basic);
        Ok(self.reader.searcher().search(&q, &tantivy::collector::Count).context("looking up a document id")? > 0)
    }

    /// The analyzer's terms of `text` (the index's tokens: lowercased runs of letters and digits).
    pub fn terms(&self, text: &str) -> Result<Vec<String>> {
        let mut analyzer = self.index.tokenizer_for_field(self.f.text).context("the text field's analyzer")?;
        let mut stream = analyzer.token_stream(text);
        let mut out = Vec::new();
        while stream.advance() {
            out.push(stream.token().text.clone());
        }
        Ok(out)
    }

    fn hit(&self, doc: &TantivyDocument, score: f32) -> Hit {
        let text = |f| doc.get_first(f).and_then(|v| v.as_str().map(str::to_string));
        let num = |f| doc.get_first(f).and_then(|v| v.as_u64()).unwrap_or(0);
        Hit {
            doc_id: text(self.f.doc_id).unwrap_or_default(),
            chunk: num(self.f.chunk) as u32,
            score,
            title: text(self.f.title),
            text: text(self.f.text).unwrap_or_default(),
            start: num(self.f.start) as usize,
            end: num(self.f.end) as usize,
        }
    }
}

impl Retriever for Bm25 {
    fn retrieve(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        let terms = self.terms(query)?;
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .iter()
            .map(|t| (Occur::Should, Box::new(TermQuery::new(Term::from_field_text(self.f.text, t), IndexRecordOption::WithFreqs)) as Box<dyn Query>))
            .collect();
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(k)).context("BM25 search")?;
        top.into_iter()
            .map(|(score, addr)| {
                let doc: TantivyDocument = searcher.doc(addr).context("reading a stored chunk")?;
                Ok(self.hit(&doc, score))
            })
            .collect()
    }

    fn kind(&self) -> &'static str {
        "bm25"
    }
}
