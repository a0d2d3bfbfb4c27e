//! Tokenizers: character-level, byte-level and BPE, behind one type.
//!
//! All of them are Hugging Face `tokenizers` underneath, so every one saves as a standard
//! `tokenizer.json` that `transformers` loads. Special tokens: `<|bos|>`, `<|eos|>`, `<|pad|>`
//! (plus `<|unk|>` for character level, where a character unseen in training maps to it).
//! Byte-level and BPE tokenizers cover every input through their 256 byte symbols.
//! A loaded `tokenizer.json` keeps its own special tokens where it has them (GPT-2's
//! `<|endoftext|>` serves as BOS and EOS).

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::ModelError;

pub const BOS: &str = "<|bos|>";
pub const EOS: &str = "<|eos|>";
pub const PAD: &str = "<|pad|>";
pub const UNK: &str = "<|unk|>";
/// Beside `tokenizer.json`: special tokens and the chat template.
pub const CONFIG_FILE: &str = "tokenizer_config.json";

/// Names other tokenizers use for the same roles, looked up when a `tokenizer.json` is loaded.
const EOS_NAMES: [&str; 4] = [EOS, "<|endoftext|>", "</s>", "<eos>"];
const BOS_NAMES: [&str; 5] = [BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"];
const PAD_NAMES: [&str; 3] = [PAD, "<pad>", "<|padding|>"];

#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    /// The model's Jinja chat template (`tokenizer_config.json`'s `chat_template`, or GGUF's
    /// `tokenizer.chat_template`); `None` where the model has none (chat.rs then uses ChatML).
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab={}, bos={}, eos={})", self.vocab_size(), self.bos_id, self.eos_id)
    }
}

fn specials(names: &[&str]) -> Vec<AddedToken> {
    names.iter().map(|n| AddedToken::from(n.to_string(), true)).collect()
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// One token per distinct character of `texts` (sorted), plus `<|unk|>` for unseen ones.
    pub fn train_char<'a>(texts: impl Iterator<Item = &'a str>) -> Result<Self, ModelError> {
        let mut chars: Vec<char> = texts.flat_map(|t| t.chars()).collect::<HashSet<_>>().into_iter().collect();
        chars.sort_unstable();
        let mut vocab: Vec<(String, u32)> = chars.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        // The unknown token must live in the model's own vocabulary.
        vocab.push((UNK.to_string(), chars.len() as u32));
        // A BPE model with no merges is exactly a character-level model.
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<ahash::AHashMap<_, _>>(), vec![])
            .unk_token(UNK.into())
            .build()
            .map_err(tok_err)?;
        let mut t = HfTokenizer::new(bpe);
        t.with_decoder(Some(Fuse::new()));
        t.add_special_tokens(&specials(&[UNK, BOS, EOS, PAD]));
        Self::from_hf(t)
    }

    /// The 256 bytes, GPT-2 style (byte-level pre-tokenizer and decoder), no merges.
    pub fn byte_level() -> Result<Self, ModelError> {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let vocab = alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect::<ahash::AHashMap<_, _>>();
        let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().map_err(tok_err)?;
        let mut t = HfTokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        t.add_special_tokens(&specials(&[BOS, EOS, PAD]));
        Self::from_hf(t)
    }

    /// Byte-level BPE trained on `texts`, with `vocab_size` tokens in all (special tokens included).
    pub fn train_bpe<'a>(texts: impl Iterator<Item = &'a str> + Send, vocab_size: usize, progress: bool) -> Result<Self, ModelError> {
        let mut t = HfTokenizer::new(BPE::default());
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(progress)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(specials(&[BOS, EOS, PAD]))
            .build()
            .into();
        t.train(&mut trainer, texts).map_err(tok_err)?;
        Self::from_hf(t)
    }

    /// GPT-2's byte-level BPE from `encoder.json` and `vocab.bpe`.
    pub fn gpt2_from_files(encoder: &Path, merges: &Path) -> Result<Self, ModelError> {
        let ctx = |e: tokenizers::Error| ModelError::Tokenizer(format!("{} / {}: {e}", encoder.display(), merges.display()));
        let bpe = BPE::from_file(&encoder.to_string_lossy(), &merges.to_string_lossy()).build().map_err(ctx)?;
        let mut t = HfTokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        t.add_special_tokens(&specials(&["<|endoftext|>"]));
        Self::from_hf(t)
    }

    /// Loads a `tokenizer.json`. A file that does not parse is an error naming the file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = crate::read_regular(path, 1 << 30)?;
        let invalid = |e: &dyn std::fmt::Display| {
            ModelError::Tokenizer(format!(
                "{}: not a valid tokenizer.json ({e}); hint: re-create it with `kiln tokenizer train` or copy it from the model it belongs to",
                path.display()
            ))
        };
        // JSON first: `tokenizers` panics on some damaged files (a truncated decoder section).
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| invalid(&e))?;
        let parsed = std::panic::catch_unwind(|| HfTokenizer::from_bytes(&bytes)).map_err(|_| invalid(&"the tokenizers library could not read it"))?;
        let t = parsed.map_err(|e| invalid(&e))?;
        let mut tok = Self::from_hf(t)?;
        let config = path.with_file_name(CONFIG_FILE);
        if config.is_file() {
            tok.apply_config(&config)?;
        }
        Ok(tok)
    }

    /// Takes the special tokens and chat template of a `tokenizer_config.json`.
    fn apply_config(&mut self, path: &Path) -> Result<(), ModelError> {
        let bytes = crate::read_regular(path, 64 << 20)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ModelError::Tokenizer(format!("{}: not valid JSON ({e}); hint: fix or delete it (Kiln then uses tokenizer.json's own special tokens)", path.display())))?;
        // A special token is a string or an AddedToken object with "content".
        let token = |k: &str| v.get(k).and_then(|t| t.as_str().or_else(|| t.get("content").and_then(|c| c.as_str())));
        let id = |k: &str| token(k).and_then(|t| self.inner.token_to_id(t));
        if let Some(e) = id("eos_token") {
            self.eos_id = e;
        }
        if let Some(b) = id("bos_token") {
            self.bos_id = b;
        }
        self.pad_id = id("pad_token").unwrap_or(self.pad_id);
        // A template is a string, or a list of {"name", "template"} (the "default" one is used).
        self.chat_template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or(list.first())
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(())
    }

    /// Writes `tokenizer.json`, and beside it `tokenizer_config.json` (the special tokens and the
    /// chat template, as `transformers` reads them).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        self.inner
            .save(path, false)
            .map_err(|e| ModelError::io(path, e))?;
        let name = |id: u32| self.inner.id_to_token(id).map_or(serde_json::Value::Null, serde_json::Value::String);
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "pad_token": name(self.pad_id),
            "add_bos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(t) = &self.chat_template {
            config["chat_template"] = t.clone().into();
        }
        let config_path = path.with_file_name(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&config).map_err(|e| ModelError::io(&config_path, e))?;
        std::fs::write(&config_path, text).map_err(|e| ModelError::io(&config_path, e))
    }

    fn from_hf(mut inner: HfTokenizer) -> Result<Self, ModelError> {
        let find = |t: &HfTokenizer, names: &[&str]| names.iter().find_map(|n| t.token_to_id(n));
        if find(&inner, &EOS_NAMES).is_none() {
            inner.add_special_tokens(&specials(&[EOS]));
        }
        let eos_id = find(&inner, &EOS_NAMES).ok_or_else(|| tok_err("could not add an EOS token"))?;
        let bos_id = find(&inner, &BOS_NAMES).unwrap_or(eos_id);
        let pad_id = find(&inner, &PAD_NAMES).unwrap_or(eos_id);
        Ok(Self { inner, bos_id, eos_id, pad_id, chat_template: None })
    }

    /// A tokenizer with explicit special-token ids (a GGUF file's); those not given are looked
    /// up by name as for a loaded `tokenizer.json`.
    pub fn from_parts(inner: HfTokenizer, bos: Option<u32>, eos: Option<u32>, pad: Option<u32>, chat_template: Option<String>) -> Result<Self, ModelError> {
        let mut t = Self::from_hf(inner)?;
        t.eos_id = eos.unwrap_or(t.eos_id);
        t.bos_id = bos.unwrap_or(t.bos_id);
        t.pad_id = pad.unwrap_or(t.eos_id);
        t.chat_template = chat_template;
        Ok(t)
    }

    /// Adds special tokens the vocabulary lacks (a chat template's markers). Returns how many
    /// were new: the model's embedding must grow by as many rows.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> usize {
        let new: Vec<&str> = tokens.iter().copied().filter(|t| self.inner.token_to_id(t).is_none()).collect();
        self.inner.add_special_tokens(&specials(&new));
        new.len()
    }

    /// The id of a token written out (`<|im_end|>`), special tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text` with each token's byte range in `text`. Special tokens written in the
    /// text (`<|im_start|>`) become their ids, as `transformers` does.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>), ModelError> {
        let e = self.inner.encode(text, false).map_err(tok_err)?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// Vocabulary size, added tokens included: the model's embedding rows.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self.inner.encode_fast(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Text of `ids` with special tokens written out (`<|im_start|>`), as the model sees them.
    pub fn decode_all(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The text of a token id (special tokens included).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The serialized `tokenizer.json`, for hashing (the data cache key).
    pub fn to_json(&self) -> Result<String, ModelError> {
        self.inner.to_string(false).map_err(tok_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_level_round_trips_and_maps_unseen_to_unk() {
        let t = Tokenizer::train_char(["hello world\n"].into_iter()).unwrap();
        assert_eq!(t.vocab_size(), 9 + 4); // h e l o space w r d newline, and 4 specials
        let ids = t.encode("hello\nworld").unwrap();
        assert_eq!(ids.len(), 11);
        assert_eq!(t.decode(&ids).unwrap(), "hello\nworld");
        let unk = t.inner.token_to_id(UNK).unwrap();
        assert_eq!(t.encode("hé").unwrap(), vec![t.encode("h").unwrap()[0], unk]);
        assert_ne!(t.eos_id, t.bos_id);
    }

    #[test]
    fn byte_level_covers_any_text() {
        let t = Tokenizer::byte_level().unwrap();
        assert_eq!(t.vocab_size(), 259);
        let s = "naïve – 東京 🎉";
        let ids = t.encode(s).unwrap();
        assert_eq!(ids.len(), s.len());
        assert_eq!(t.decode(&ids).unwrap(), s);
    }

    #[test]
    fn bpe_trains_to_size_saves_and_loads() {
        let text = "the cat sat on the mat. the dog sat on the log. ".repeat(50);
        let t = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, false).unwrap();
        assert!(t.vocab_size() <= 300 && t.vocab_size() > 259, "{}", t.vocab_size());
        let ids = t.encode("the cat sat").unwrap();
        assert!(ids.len() < "the cat sat".len());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        t.save(&p).unwrap();
        let back = Tokenizer::load(&p).unwrap();
        assert_eq!(back.encode("the cat sat, 東京").unwrap(), t.encode("the cat sat, 東京").unwrap());
        assert_eq!((back.bos_id, back.eos_id), (t.bos_id, t.eos_id));
    }

    #[test]
    fn corrupt_tokenizer_json_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, "{\"model\": {\"type\": \"BPE\", \"vocab\": ").unwrap();
        let e = Tokenizer::load(&p).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("not a valid"), "{e}");
        let e = Tokenizer::load(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert!(e.contains("missing.json"), "{e}");
    }
}
