//! GGUF import: the real SmolLM2-135M-Instruct Q4_1 file gives transformers' logits, tokens and
//! chat renderings; damaged and unsupported files are errors that name what is wrong.
//!
//! The committed fixture (`smollm2_q4_1_expected.safetensors`, made by `scripts/gguf_check.py
//! --stride 192`) holds transformers' logits on every 192nd vocabulary entry at each of 37
//! positions; the live test compares every logit, and needs Python with torch, transformers,
//! gguf and accelerate.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::chat::{stop_ids, ChatTemplate, Message};
use kiln_models::checkpoint::read_safetensors;
use kiln_models::gguf::{self, GgufFile};
use kiln_models::skip::{data_root, skip};
use kiln_models::{Llama, Tokenizer};

const PROMPT: &str = "What is the capital of France?";

fn smollm2() -> Option<PathBuf> {
    let p = data_root()?.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        skip("data", &format!("{} is missing", p.display()));
        None
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn logits(model: &Llama<Flex>, ids: &[u32]) -> Vec<f32> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &Default::default());
    model.forward(x).into_data().to_vec().unwrap() // [1, T, V]
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let max_ref = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / max_ref
}

fn greedy_reply(model: &Llama<Flex>, tok: &Tokenizer, chat: &ChatTemplate, user: &str) -> String {
    let ids = chat.prompt_ids(tok, &[Message::new("user", user)]).unwrap();
    let stops = stop_ids(tok);
    let o = kiln_models::generate::SampleOptions { max_tokens: 40, temperature: 0.0, stop: stops.clone(), ..Default::default() };
    let mut out = kiln_models::generate::generate(model, 2048, &ids, &o, &Default::default());
    if let Some(i) = out.iter().position(|t| stops.contains(t)) {
        out.truncate(i);
    }
    tok.decode(&out).unwrap()
}

#[test]
fn smollm2_q4_1_matches_the_transformers_fixture() {
    let Some(path) = smollm2() else { return };
    let (model, cfg, tok) = gguf::load::<Flex>(&path, &Default::default()).unwrap();
    assert_eq!((cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads), (30, 576, 9, 3));
    assert_eq!((cfg.vocab_size, cfg.intermediate_size, cfg.rope_theta, cfg.tie_word_embeddings), (49152, 1536, 100000.0, true));
    assert_eq!((tok.id_to_token(tok.bos_id).unwrap().as_str(), tok.id_to_token(tok.eos_id).unwrap().as_str()), ("<|im_start|>", "<|im_end|>"));

    // transformers' rendering and tokens of the same prompt.
    let chat = ChatTemplate::new(&tok, None).unwrap();
    let text = chat.render(&[Message::new("user", PROMPT)], true).unwrap();
    assert_eq!(text, format!("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"));
    let mut want = read_safetensors(&fixtures().join("smollm2_q4_1_expected.safetensors")).unwrap();
    let ids: Vec<u32> = want.remove("input_ids").unwrap().1.iter().map(|&x| x as u32).collect();
    assert_eq!(tok.encode(&text).unwrap(), ids);

    let got = logits(&model, &ids);
    let (shape, sub) = want.remove("logits_sub").unwrap();
    let (t, v) = (ids.len(), cfg.vocab_size);
    assert_eq!(shape[0], t);
    let got_sub: Vec<f32> = (0..t).flat_map(|i| (0..shape[1]).map(move |j| (i, j * 192))).map(|(i, j)| got[i * v + j]).collect();
    let rel = rel_err(&got_sub, &sub);
    println!("max |kiln - transformers| / max |transformers| = {rel:.2e} over {} logits", sub.len());
    assert!(rel < 1e-4, "relative error {rel}");
    let argmax: Vec<u32> = (0..t).map(|i| (0..v).max_by(|&a, &b| got[i * v + a].total_cmp(&got[i * v + b])).unwrap() as u32).collect();
    let want_argmax: Vec<u32> = want.remove("argmax").unwrap().1.iter().map(|&x| x as u32).collect();
    assert_eq!(argmax, want_argmax);

    assert_eq!(greedy_reply(&model, &tok, &chat, PROMPT), "The capital of France is Paris.");
}

/// Python with torch, transformers, gguf, accelerate, or why not.
fn python_with_gguf() -> Result<String, String> {
    kiln_models::skip::python_with("torch, transformers, gguf, accelerate")
}

#[test]
fn smollm2_q4_1_matches_transformers_live() {
    let Some(path) = smollm2() else { return };
    let py = match python_with_gguf() {
        Ok(p) => p,
        Err(why) => {
            skip("python", &format!("smollm2_q4_1_matches_transformers_live: {why}; `pip install torch transformers gguf accelerate` to run it"));
            return;
        }
    };
    let (model, _, tok) = gguf::load::<Flex>(&path, &Default::default()).unwrap();
    let chat = ChatTemplate::new(&tok, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chats = vec![
        vec![Message::new("user", "Hi!")],
        vec![Message::new("system", "You answer in French."), Message::new("user", "Hello"), Message::new("assistant", "Bonjour !"), Message::new("user", "Thanks")],
        vec![Message::new("user", "2+2?"), Message::new("assistant", "4"), Message::new("user", "and 3+3?"), Message::new("assistant", " 6 ")],
    ];
    let texts = ["Hello world", "  spaces\tand\nnewlines  ", "naïve café 東京 🎉 1234567", "<|im_start|>user\nx<|im_end|>"];
    std::fs::write(dir.path().join("chats.json"), serde_json::to_string(&chats).unwrap()).unwrap();
    std::fs::write(dir.path().join("texts.json"), serde_json::to_string(&texts).unwrap()).unwrap();
    let text = chat.render(&chats[1], true).unwrap();
    let ids = tok.encode(&text).unwrap();
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let out = dir.path().join("logits.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gguf_check.py");
    let o = Command::new(&py)
        .arg(&script)
        .arg(&path)
        .args(["--ids", &ids_arg, "--out", out.to_str().unwrap()])
        .arg("--chats")
        .arg(dir.path().join("chats.json"))
        .arg("--texts")
        .arg(dir.path().join("texts.json"))
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (c, pair) in chats.iter().zip(got["chat"].as_array().unwrap()) {
        assert_eq!(chat.render(c, false).unwrap(), pair[0].as_str().unwrap());
        assert_eq!(chat.render(c, true).unwrap(), pair[1].as_str().unwrap());
    }
    for (t, enc) in texts.iter().zip(got["encode"].as_array().unwrap()) {
        let enc: Vec<u32> = serde_json::from_value(enc.clone()).unwrap();
        assert_eq!(tok.encode(t).unwrap(), enc, "{t:?}");
    }
    let want = read_safetensors(&out).unwrap().remove("logits").unwrap().1;
    let rel = rel_err(&logits(&model, &ids), &want);
    println!("all {} logits: max |kiln - transformers| / max |transformers| = {rel:.2e}", want.len());
    assert!(rel < 1e-4, "relative error {rel}");
}

/// A GGUF v3 file: metadata (string values only) and f32/typed tensors.
fn write_gguf(meta: &[(&str, &str)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        b.extend(8u32.to_le_bytes());
        s(&mut b, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        let mut d = data.clone();
        d.resize(d.len().div_ceil(32) * 32, 0);
        b.extend(d);
    }
    b
}

#[test]
fn damaged_and_unsupported_files_are_clear_errors() {
    let p = Path::new("m.gguf");
    let floats: Vec<u8> = (0..64).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let good = write_gguf(&[("general.architecture", "llama")], &[("a", vec![8, 8], 0, floats.clone())]);
    let f = GgufFile::parse(p, good.clone()).unwrap();
    let t = f.tensor("a").unwrap().clone();
    assert_eq!(f.tensor_f32(&t).unwrap()[63], 63.0);

    let err = |bytes: Vec<u8>| GgufFile::parse(p, bytes).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(b"GGML".to_vec()).contains("not a GGUF file"));
    for cut in [3, 10, 30, good.len() - 1] {
        let e = err(good[..cut].to_vec());
        assert!(e.contains("m.gguf") && (e.contains("ends") || e.contains("outside") || e.contains("count")), "cut {cut}: {e}");
    }
    let q6k = write_gguf(&[], &[("w", vec![256], 14, vec![0; 210])]);
    let e = err(q6k);
    assert!(e.contains("'w'") && e.contains("Q6_K is not supported"), "{e}");
    let mut nan = floats;
    nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let f = GgufFile::parse(p, write_gguf(&[], &[("a", vec![64], 0, nan)])).unwrap();
    let e = f.tensor_f32(&f.tensors[0].clone()).unwrap_err().to_string();
    assert!(e.contains("non-finite"), "{e}");
    // A file of another architecture says which.
    let f = GgufFile::parse(p, write_gguf(&[("general.architecture", "mamba")], &[])).unwrap();
    let e = gguf::llama::config(&f).unwrap_err().to_string();
    assert!(e.contains("'mamba'"), "{e}");
}
