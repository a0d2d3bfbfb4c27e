//! Bounded, seeded fuzzing of the model-file loaders: 600 damaged `config.json`,
//! `tokenizer.json` and `model.safetensors` files (cuts, replaced bytes, a header's fields set to
//! values of every kind). A loader returns a model or an error naming the file; it never panics,
//! and a config it accepts passes `LlamaConfig::check`.

use kiln_models::checkpoint::{self, hf_config_json, read_config, read_safetensors, write_safetensors};
use kiln_models::presets::preset;
use kiln_models::Tokenizer;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};

fn runner(cases: u32) -> TestRunner {
    let config = Config { cases, failure_persistence: Some(Box::new(FileFailurePersistence::Off)), ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[11; 32]))
}

/// The three files of a valid tiny model, as bytes.
fn originals() -> [(&'static str, Vec<u8>); 3] {
    let dir = tempfile::tempdir().unwrap();
    let cfg = preset("tiny", 260).unwrap();
    let tok = Tokenizer::byte_level().unwrap();
    tok.save(&dir.path().join("tokenizer.json")).unwrap();
    let w = dir.path().join("model.safetensors");
    write_safetensors(&w, &[("model.norm.weight".into(), vec![32], vec![1.0; 32]), ("lm_head.weight".into(), vec![4, 8], vec![0.5; 32])], &[]).unwrap();
    [
        ("config.json", serde_json::to_vec_pretty(&hf_config_json(&cfg)).unwrap()),
        ("tokenizer.json", std::fs::read(dir.path().join("tokenizer.json")).unwrap()),
        ("model.safetensors", std::fs::read(w).unwrap()),
    ]
}

/// JSON values of every kind, the extremes included.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        any::<i64>().prop_map(|v| json!(v)),
        any::<u64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        prop::sample::select(vec![json!(0), json!(1), json!(-1), json!(1e12), json!("1e5"), json!(true), json!(null), json!([]), json!([1, 2]), json!({}), json!("llama")]),
    ]
}

/// One damage: `kind` picks the file, then a cut, a replaced byte, or (for the JSON files) a
/// top-level field set to `value`.
fn damage(files: &[(&'static str, Vec<u8>); 3], kind: u8, at: usize, byte: u8, value: serde_json::Value) -> (&'static str, Vec<u8>) {
    let (name, orig) = &files[kind as usize % 3];
    let mut b = orig.clone();
    let at = at % b.len();
    match (kind / 3) % 3 {
        0 => b.truncate(at),
        1 => b[at] = byte,
        _ => {
            let mut v: serde_json::Value = match serde_json::from_slice(&b) {
                Ok(v) => v,
                Err(_) => {
                    // The safetensors header is JSON behind an 8-byte length.
                    b[8 + at % 16] = byte;
                    return (name, b);
                }
            };
            if let Some(o) = v.as_object_mut() {
                let keys: Vec<String> = o.keys().cloned().collect();
                o.insert(keys[at % keys.len()].clone(), value);
            }
            b = serde_json::to_vec(&v).unwrap();
        }
    }
    (name, b)
}

#[test]
fn damaged_model_files_never_panic() {
    let files = originals();
    let dir = tempfile::tempdir().unwrap();
    let (ok, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner(600)
        .run(&(any::<u8>(), any::<usize>(), any::<u8>(), json_value()), |(kind, at, byte, value)| {
            let (name, bytes) = damage(&files, kind, at, byte, value);
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            let result = match name {
                "config.json" => read_config(&p).map(|c| assert_eq!(c.check().ok(), Some(()))),
                "tokenizer.json" => Tokenizer::load(&p).map(|_| ()),
                _ => read_safetensors(&p).map(|_| ()),
            };
            match result {
                Ok(()) => ok.set(ok.get() + 1),
                Err(e) => {
                    assert!(e.to_string().contains(name) || e.to_string().contains("tokenizer"), "the error names no file: {e}");
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    println!("{} loaded, {} refused", ok.get(), refused.get());
    assert!(refused.get() > 200, "the damage hit too little: {} refused", refused.get());
}

/// A FIFO or a link to a device in a model folder is refused at once instead of read forever.
#[cfg(unix)]
#[test]
fn special_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.json");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let e = read_config(&fifo).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let zero = dir.path().join("tokenizer.json");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let e = Tokenizer::load(&zero).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    assert!(checkpoint::SafetensorsSource::open_dir(dir.path()).is_err());
}
