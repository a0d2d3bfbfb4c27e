//! Tokenization into cached binary shards.
//!
//! The token stream is every document in source order, each followed by EOS. It is written
//! once to `<cache>/tokens/<key>/` (`tokens.bin`: u16 little-endian when the vocabulary fits,
//! else u32; `docs.bin`: u64 start offset of each document; `meta.json`) under a key that hashes
//! the sources' contents, the tokenizer and the format settings. A later run with the same key
//! reads the shards and tokenizes nothing. The tokenizer a run trains (char, BPE) is cached the
//! same way, under a key of the sources and the `[tokenizer]` section.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_models::Tokenizer;
use kiln_recipes::{DataSection, TokenizerKind, TokenizerSection};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::corpus::read_documents;
use super::sources::{resolve, sha256_file, Dirs};

/// A source resolved to a local file, with its content hash.
#[derive(Debug, Clone, Serialize)]
pub struct SourceFile {
    pub source: String,
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardMeta {
    pub key: String,
    pub dtype: String,
    pub n_tokens: usize,
    pub n_docs: usize,
    /// UTF-8 bytes of all documents (for bits per byte).
    pub n_bytes: usize,
}

/// The tokenized corpus.
pub struct TokenStream {
    pub tokens: Vec<u32>,
    /// Start offset of each document in `tokens`.
    pub doc_starts: Vec<u64>,
    pub meta: ShardMeta,
}

pub fn resolve_sources(data: &DataSection, dirs: &Dirs) -> Result<Vec<SourceFile>> {
    let mut pins = data.sha256.iter();
    data.sources
        .iter()
        .map(|s| {
            let pin = if kiln_recipes::is_download(s) { pins.next().map(String::as_str) } else { None };
            let path = resolve(s, pin, dirs)?;
            let sha256 = sha256_file(&path)?;
            Ok(SourceFile { source: s.clone(), path, sha256 })
        })
        .collect()
}

fn hash_parts(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..12])
}

fn load_docs(files: &[SourceFile], data: &DataSection) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for f in files {
        docs.extend(read_documents(&f.path, data.format, &data.text_field)?);
    }
    Ok(docs)
}

/// Builds (or loads from the cache) the run's tokenizer.
pub fn tokenizer_for(
    section: &TokenizerSection,
    files: &[SourceFile],
    data: &DataSection,
    dirs: &Dirs,
) -> Result<Tokenizer> {
    let src_hashes: Vec<&str> = files.iter().map(|f| f.sha256.as_str()).collect();
    let section_toml = toml::to_string(section)?;
    let fmt = format!("{:?}/{}", data.format, data.text_field);
    let key = hash_parts(&[&src_hashes.join(","), &section_toml, &fmt]);
    let cached = dirs.cache.join("tokenizers").join(&key).join("tokenizer.json");
    match section.kind {
        TokenizerKind::Byte => return Ok(Tokenizer::byte_level()?),
        TokenizerKind::File => {
            let rel = section.path.as_deref().unwrap_or_default();
            let p = dirs.under_root(rel, "tokenizer.path")?;
            // GPT-2's original files: encoder.json with vocab.bpe beside it.
            if p.file_name().is_some_and(|n| n == "encoder.json") {
                return Ok(Tokenizer::gpt2_from_files(&p, &p.with_file_name("vocab.bpe"))?);
            }
            return Ok(Tokenizer::load(&p)?);
        }
        TokenizerKind::Char | TokenizerKind::Bpe => {}
    }
    if cached.is_file() {
        if let Ok(t) = Tokenizer::load(&cached) {
            tracing::info!("tokenizer: reused cached {}", cached.display());
            return Ok(t);
        }
    }
    let docs = load_docs(files, data)?;
    let tok = match section.kind {
        TokenizerKind::Char => Tokenizer::train_char(docs.iter().map(String::as_str))?,
        _ => {
            tracing::info!("training a BPE tokenizer with {} tokens", section.vocab_size);
            Tokenizer::train_bpe(docs.iter().map(String::as_str), section.vocab_size, std::io::IsTerminal::is_terminal(&std::io::stderr()))?
        }
    };
    let dir = cached.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("tokenizer.json.tmp-{}", std::process::id()));
    tok.save(&tmp)?;
    std::fs::rename(&tmp, &cached)?;
    Ok(tok)
}

/// Splits a long document at line ends into pieces of about `n` bytes, for batched encoding.
fn pieces(doc: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = doc;
    while rest.len() > n {
        let cut = rest[n..].find('\n').map(|i| n + i + 1).unwrap_or(rest.len());
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Tokenizes the sources (or reads the cached shards).
pub fn token_stream(files: &[SourceFile], data: &DataSection, tok: &Tokenizer, dirs: &Dirs) -> Result<TokenStream> {
    let src_hashes: Vec<&str> = files.iter().map(|f| f.sha256.as_str()).collect();
    let tok_json = tok.to_json()?;
    let fmt = format!("{:?}/{}", data.format, data.text_field);
    let key = hash_parts(&[&src_hashes.join(","), &tok_json, &fmt]);
    let dir = dirs.cache.join("tokens").join(&key);
    if let Ok(s) = read_shards(&dir) {
        tracing::info!("data: reused cached token shards {} ({} tokens); nothing to tokenize", dir.display(), s.meta.n_tokens);
        return Ok(s);
    }
    let docs = load_docs(files, data)?;
    let n_bytes: usize = docs.iter().map(String::len).sum();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ProgressBar::new(n_bytes as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("tokenizing {bar:40} {bytes}/{total_bytes} {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    tracing::info!("data: tokenizing {} documents ({} bytes)", docs.len(), n_bytes);
    let mut tokens: Vec<u32> = Vec::with_capacity(n_bytes / 2);
    let mut doc_starts = Vec::with_capacity(docs.len());
    for d in &docs {
        doc_starts.push(tokens.len() as u64);
        for piece in pieces(d, 1 << 16) {
            tokens.extend(tok.encode(piece)?);
            bar.inc(piece.len() as u64);
        }
        tokens.push(tok.eos_id);
    }
    bar.finish_and_clear();
    let meta = ShardMeta {
        key,
        dtype: if tok.vocab_size() <= u16::MAX as usize + 1 { "u16" } else { "u32" }.into(),
        n_tokens: tokens.len(),
        n_docs: docs.len(),
        n_bytes,
    };
    write_shards(&dir, &tokens, &doc_starts, &meta)?;
    Ok(TokenStream { tokens, doc_starts, meta })
}

/// Writes the shards under a temporary name and renames them into the cache. A failed write
/// (a full disk) removes its temporary folder and names it in the error.
fn write_shards(dir: &Path, tokens: &[u32], doc_starts: &[u64], meta: &ShardMeta) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating the token cache {}", parent.display()))?;
    let tmp = parent.join(format!(".{}.tmp-{}", meta.key, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = fill_shards(&tmp, tokens, doc_starts, meta);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("writing token shards to {} (KILN_CACHE)\n  hint: free space there, or point KILN_CACHE at a disk with room", tmp.display()));
    }
    match std::fs::rename(&tmp, dir) {
        // Another process (a second data-parallel worker on this machine) moved its identical
        // shards in first.
        Err(_) if dir.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        r => r.with_context(|| format!("moving shards into {}", dir.display())),
    }
}

fn fill_shards(tmp: &Path, tokens: &[u32], doc_starts: &[u64], meta: &ShardMeta) -> Result<()> {
    std::fs::create_dir_all(tmp)?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(tmp.join("tokens.bin"))?);
    for &t in tokens {
        if meta.dtype == "u16" {
            w.write_all(&(t as u16).to_le_bytes())?;
        } else {
            w.write_all(&t.to_le_bytes())?;
        }
    }
    w.flush()?;
    let docs: Vec<u8> = doc_starts.iter().flat_map(|d| d.to_le_bytes()).collect();
    std::fs::write(tmp.join("docs.bin"), docs)?;
    std::fs::write(tmp.join("meta.json"), serde_json::to_string_pretty(meta)?)?;
    Ok(())
}

fn read_shards(dir: &Path) -> Result<TokenStream> {
    let meta: ShardMeta = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)?;
    let raw = std::fs::read(dir.join("tokens.bin"))?;
    let tokens: Vec<u32> = match meta.dtype.as_str() {
        "u16" => raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
        "u32" => raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        other => bail!("unknown shard dtype {other}"),
    };
    if tokens.len() != meta.n_tokens {
        bail!("{}: {} tokens, meta says {}", dir.display(), tokens.len(), meta.n_tokens);
    }
    let doc_starts = std::fs::read(dir.join("docs.bin"))?
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok(TokenStream { tokens, doc_starts, meta })
}
