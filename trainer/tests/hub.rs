//! `hf://datasets/...` sources through hf-hub, against a loopback server that speaks the Hub's
//! resolve protocol: the first use downloads, the second is served from the cache, and
//! `HF_HUB_OFFLINE=1` works from the cache alone. (One test in its own process: it sets env vars.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_trainer::data::sources::{resolve, Dirs};

const BODY: &[u8] = b"First Citizen:\nBefore we proceed any further, hear me speak.\n";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Counts GET requests; answers HEAD and GET for the files it holds (URL path -> body), 404 for
/// anything else.
fn serve(files: std::collections::HashMap<String, Vec<u8>>) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (gets, all) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (g, a) = (gets.clone(), all.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            if r.read_line(&mut first).is_err() {
                continue;
            }
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            a.fetch_add(1, Ordering::SeqCst);
            let mut parts = first.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let body = files.get(path);
            let ok = body.is_some();
            let resp = if !ok {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-Error-Code: EntryNotFound\r\nConnection: close\r\n\r\n".to_string()
            } else {
                if method == "GET" {
                    g.fetch_add(1, Ordering::SeqCst);
                }
                let b = body.map(Vec::as_slice).unwrap_or_default();
                let etag = format!("etag-{}", b.len());
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                    b.len()
                )
            };
            let _ = s.write_all(resp.as_bytes());
            if let (Some(b), "GET") = (body, method) {
                let _ = s.write_all(b);
            }
            let _ = s.flush();
            let mut sink = [0u8; 1];
            let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(10)));
            let _ = s.read(&mut sink);
        }
    });
    (format!("http://{addr}"), gets, all)
}

#[test]
fn hf_dataset_source_downloads_once_then_uses_the_cache_and_works_offline() {
    // A tiny model, as an HF-layout folder, served as hf://kiln-test/tiny.
    let model_dir = tempfile::tempdir().unwrap();
    let local = model_dir.path().join("m");
    {
        use burn::backend::Flex;
        let tok = kiln_models::Tokenizer::train_char(["abcdefgh "].into_iter()).unwrap();
        let cfg = kiln_models::presets::preset("tiny", tok.vocab_size()).unwrap();
        let m = kiln_models::Llama::<Flex>::build(&cfg, &mut kiln_models::init::RandomInit::new(3, 2), &Default::default()).unwrap();
        kiln_models::checkpoint::save_dir(&local, &m, &cfg, &tok).unwrap();
    }
    let mut files = std::collections::HashMap::new();
    files.insert("/datasets/kiln-test/shakespeare/resolve/main/train/input.txt".to_string(), BODY.to_vec());
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        files.insert(format!("/kiln-test/tiny/resolve/main/{f}"), std::fs::read(local.join(f)).unwrap());
    }
    // The same model with its weights in three shards and an index, as hf://kiln-test/tiny-sharded.
    {
        let tensors = kiln_models::checkpoint::SafetensorsSource::open_dir(&local).unwrap().into_tensors();
        let sharded = model_dir.path().join("sharded");
        std::fs::create_dir_all(&sharded).unwrap();
        kiln_models::checkpoint::write_weights(&sharded, &tensors, kiln_models::checkpoint::StoreDtype::F32, 40_000).unwrap();
        let mut n = 0;
        for e in std::fs::read_dir(&sharded).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            n += name.starts_with("model-") as usize;
            files.insert(format!("/kiln-test/tiny-sharded/resolve/main/{name}"), std::fs::read(sharded.join(&name)).unwrap());
        }
        assert!(n >= 2, "{n} shards");
        for f in ["config.json", "tokenizer.json"] {
            files.insert(format!("/kiln-test/tiny-sharded/resolve/main/{f}"), std::fs::read(local.join(f)).unwrap());
        }
    }
    let (endpoint, gets, all) = serve(files);
    let cache = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    // SAFETY: this test binary has a single test; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("HF_ENDPOINT", &endpoint);
        std::env::remove_var("HF_HUB_CACHE");
        std::env::remove_var("HF_HOME");
        std::env::set_var("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1");
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    let dirs = Dirs { data_root: root.path().into(), cache: cache.path().into() };
    let src = "hf://datasets/kiln-test/shakespeare/train/input.txt";

    let p = resolve(src, None, &dirs).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), BODY);
    assert!(p.starts_with(cache.path()), "{} is not in the Kiln cache", p.display());
    assert_eq!(gets.load(Ordering::SeqCst), 1);

    // Second use: no second download.
    let p2 = resolve(src, None, &dirs).unwrap();
    assert_eq!(std::fs::read(&p2).unwrap(), BODY);
    assert_eq!(gets.load(Ordering::SeqCst), 1, "downloaded twice");

    // Offline: no request at all, served from the cache.
    let before = all.load(Ordering::SeqCst);
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    let p3 = resolve(src, None, &dirs).unwrap();
    assert_eq!(std::fs::read(&p3).unwrap(), BODY);
    assert_eq!(all.load(Ordering::SeqCst), before, "HF_HUB_OFFLINE=1 still made requests");

    // Offline and not cached: a clear error.
    let e = format!("{:#}", resolve("hf://datasets/kiln-test/other/x.txt", None, &dirs).unwrap_err());
    assert!(e.contains("HF_HUB_OFFLINE=1") && e.contains("not in the local cache"), "{e}");
    unsafe { std::env::remove_var("HF_HUB_OFFLINE") };

    // Online, a missing file: an error naming the source.
    let e = format!("{:#}", resolve("hf://datasets/kiln-test/shakespeare/missing.txt", None, &dirs).unwrap_err());
    assert!(e.contains("hf://datasets/kiln-test/shakespeare/missing.txt"), "{e}");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "the data root was written");

    // hf://<org>/<model> in the CLI: the same greedy text as the local folder.
    let gen = |m: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["generate", m, "--prompt", "abc", "--max-tokens", "12", "--temperature", "0"])
            .env("KILN_CACHE", cache.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    let want = gen(local.to_str().unwrap());
    assert_eq!(gen("hf://kiln-test/tiny"), want);
    assert_eq!(gen("hf://kiln-test/tiny-sharded"), want, "the sharded Hub model differs");

    // An adapter whose base is the Hub id "kiln-test/tiny", as PEFT writes it: the base is
    // fetched, and the adapted model generates as the same adapter on the local folder does.
    let cfg = kiln_models::checkpoint::read_config(&local.join("config.json")).unwrap();
    let spec = kiln_models::lora::LoraSpec::new(2, 4.0, 0.0, &["all-linear".to_string()]).unwrap();
    let mut adapter = kiln_models::lora::Adapter::init(spec, "kiln-test/tiny".into(), &cfg, 7);
    for (i, p) in adapter.pairs.values_mut().enumerate() {
        p.b.iter_mut().enumerate().for_each(|(j, b)| *b = (((i * 31 + j * 7) % 13) as f32 - 6.0) * 0.05);
    }
    let hub_adapter = model_dir.path().join("hub-adapter");
    adapter.save_dir(&hub_adapter).unwrap();
    let config_before = std::fs::read(hub_adapter.join("adapter_config.json")).unwrap();
    let mut local_adapter = adapter.clone();
    local_adapter.base = local.display().to_string();
    let local_adapter_dir = model_dir.path().join("local-adapter");
    local_adapter.save_dir(&local_adapter_dir).unwrap();
    let adapted = gen(local_adapter_dir.to_str().unwrap());
    assert_ne!(adapted, want, "the adapter changes nothing");
    assert_eq!(gen(hub_adapter.to_str().unwrap()), adapted);
    assert_eq!(std::fs::read(hub_adapter.join("adapter_config.json")).unwrap(), config_before, "the adapter folder was changed");
    assert!(cache.path().join("adapters").is_dir());
}
