//! `kiln publish` against a loopback server that answers the Hub's API as huggingface.co does
//! (repo creation, preupload, commit), pointed at by `HF_ENDPOINT`: the right requests with the
//! right files and an `Authorization` header; a clear error on 401 naming where the token came
//! from; a 503 retried into success; the token in no output; `--dry-run` makes no request.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const TOKEN: &str = "hf_kilnTestSecret0123456789";

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

type Rule = Box<dyn Fn(&Req, usize) -> Option<(u16, String)> + Send>;

/// Records every request; `rule(req, n)` (n = earlier requests to the same path) may answer it,
/// else the default Hub answers apply.
fn serve(rule: Rule) -> (String, Arc<Mutex<Vec<Req>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::<Req>::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            if r.read_line(&mut first).is_err() || first.is_empty() {
                continue;
            }
            let mut headers = HashMap::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) <= 2 {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let n: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0u8; n];
            let _ = r.read_exact(&mut body);
            let mut parts = first.split_whitespace();
            let req = Req {
                method: parts.next().unwrap_or("").into(),
                path: parts.next().unwrap_or("").split('?').next().unwrap_or("").into(),
                headers,
                body,
            };
            let seen = log2.lock().unwrap().iter().filter(|q| q.path == req.path).count();
            log2.lock().unwrap().push(req.clone());
            let (status, body) = rule(&req, seen).unwrap_or_else(|| default_answer(&req));
            let reason = match status {
                200 => "OK",
                401 => "Unauthorized",
                503 => "Service Unavailable",
                _ => "Error",
            };
            let resp = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
            let _ = s.flush();
        }
    });
    (format!("http://{addr}"), log)
}

fn default_answer(req: &Req) -> (u16, String) {
    if req.path == "/api/repos/create" {
        (200, r#"{"url":"https://hub.test/kiln-user/tiny"}"#.into())
    } else if req.path.contains("/preupload/") {
        // Every file inline ("regular"), as the Hub answers for small files.
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let files: Vec<_> = v["files"]
            .as_array()
            .map(|a| a.iter().map(|f| serde_json::json!({"path": f["path"], "uploadMode": "regular"})).collect())
            .unwrap_or_default();
        (200, serde_json::json!({ "files": files }).to_string())
    } else if req.path.contains("/commit/") {
        (200, r#"{"commitUrl":"https://hub.test/kiln-user/tiny/commit/abc123","commitOid":"abc123"}"#.into())
    } else {
        (404, r#"{"error":"not found"}"#.into())
    }
}

/// A tiny model folder (a bare model, no card: publish exports it first).
fn model_folder(dir: &Path) -> PathBuf {
    use burn::backend::Flex;
    let local = dir.join("m");
    let tok = kiln_models::Tokenizer::train_char(["abcdefgh "].into_iter()).unwrap();
    let cfg = kiln_models::presets::preset("tiny", tok.vocab_size()).unwrap();
    let m = kiln_models::Llama::<Flex>::build(&cfg, &mut kiln_models::init::RandomInit::new(3, 2), &Default::default()).unwrap();
    kiln_models::checkpoint::save_dir(&local, &m, &cfg, &tok).unwrap();
    local
}

fn publish(endpoint: &str, home: &Path, token_env: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("publish").args(args).env("HF_ENDPOINT", endpoint).env("HF_HOME", home).env("RUST_LOG", "debug").env_remove("HF_TOKEN_PATH");
    match token_env {
        Some(t) => c.env("HF_TOKEN", t),
        None => c.env_remove("HF_TOKEN"),
    };
    c.output().unwrap()
}

fn all_output(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The commit's NDJSON lines: path -> decoded content.
fn committed_files(body: &[u8]) -> HashMap<String, Vec<u8>> {
    use base64::Engine;
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["key"] == "file")
        .map(|v| {
            let b = base64::engine::general_purpose::STANDARD.decode(v["value"]["content"].as_str().unwrap()).unwrap();
            (v["value"]["path"].as_str().unwrap().to_string(), b)
        })
        .collect()
}

#[test]
fn publish_creates_the_repo_and_commits_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_folder(dir.path());
    let (endpoint, log) = serve(Box::new(|_, _| None));
    let o = publish(&endpoint, dir.path(), Some(TOKEN), &[model.to_str().unwrap(), "--repo", "kiln-user/tiny", "--private", "--message", "first upload"]);
    let out = all_output(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("published: https://hub.test/kiln-user/tiny/commit/abc123"), "{out}");
    assert!(!out.contains(TOKEN), "the token was printed:\n{out}");
    let reqs = log.lock().unwrap().clone();
    let auth = format!("Bearer {TOKEN}");
    let create = reqs.iter().find(|r| r.path == "/api/repos/create").expect("no repo creation");
    assert_eq!(create.method, "POST");
    assert_eq!(create.headers.get("authorization"), Some(&auth));
    let v: serde_json::Value = serde_json::from_slice(&create.body).unwrap();
    assert_eq!((v["name"].as_str(), v["organization"].as_str(), v["private"].as_bool()), (Some("tiny"), Some("kiln-user"), Some(true)));
    let commits: Vec<_> = reqs.iter().filter(|r| r.path == "/api/models/kiln-user/tiny/commit/main").collect();
    assert_eq!(commits.len(), 1, "one commit");
    assert_eq!(commits[0].headers.get("authorization"), Some(&auth));
    let header = String::from_utf8_lossy(&commits[0].body).lines().next().unwrap().to_string();
    assert!(header.contains("first upload"), "{header}");
    let files = committed_files(&commits[0].body);
    for f in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"] {
        assert!(files.contains_key(f), "{f} not committed: {:?}", files.keys().collect::<Vec<_>>());
    }
    // What went up is the export, byte for byte a loadable model.
    let cfg: serde_json::Value = serde_json::from_slice(&files["config.json"]).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(&files["tokenizer.json"], &std::fs::read(model.join("tokenizer.json")).unwrap());
    for r in &reqs {
        assert!(!String::from_utf8_lossy(&r.body).contains(TOKEN), "the token went into a request body ({})", r.path);
    }
}

#[test]
fn publish_retries_a_503_then_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_folder(dir.path());
    let (endpoint, log) = serve(Box::new(|r, n| (r.path.contains("/commit/") && n == 0).then(|| (503, r#"{"error":"busy"}"#.to_string()))));
    let o = publish(&endpoint, dir.path(), Some(TOKEN), &[model.to_str().unwrap(), "--repo", "kiln-user/tiny"]);
    assert!(o.status.success(), "{}", all_output(&o));
    let commits = log.lock().unwrap().iter().filter(|r| r.path.contains("/commit/")).count();
    assert_eq!(commits, 2, "the 503 was not retried once");
}

#[test]
fn publish_401_names_the_token_source_and_never_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_folder(dir.path());
    // The server echoes the Authorization header back, as a careless proxy might.
    let (endpoint, _log) = serve(Box::new(|r, _| {
        Some((401, serde_json::json!({"error": format!("Invalid credentials in {}", r.headers.get("authorization").cloned().unwrap_or_default())}).to_string()))
    }));
    let o = publish(&endpoint, dir.path(), Some(TOKEN), &[model.to_str().unwrap(), "--repo", "kiln-user/tiny"]);
    let out = all_output(&o);
    assert!(!o.status.success());
    assert!(out.contains("401") && out.contains("HF_TOKEN") && out.contains("hint:"), "{out}");
    assert!(!out.contains(TOKEN), "the token was printed:\n{out}");
    assert!(!out.contains("panicked"), "{out}");

    // The token from the token file: the error names the file.
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let o = publish(&endpoint, dir.path(), None, &[model.to_str().unwrap(), "--repo", "kiln-user/tiny"]);
    let out = all_output(&o);
    assert!(!o.status.success());
    assert!(out.contains("401") && out.contains(&dir.path().join("token").display().to_string()), "{out}");
    assert!(!out.contains(TOKEN), "the token was printed:\n{out}");
}

#[test]
fn dry_run_and_missing_token() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_folder(dir.path());
    let (endpoint, log) = serve(Box::new(|_, _| None));
    let o = publish(&endpoint, dir.path(), Some(TOKEN), &[model.to_str().unwrap(), "--repo", "kiln-user/tiny", "--dry-run"]);
    let out = all_output(&o);
    assert!(o.status.success(), "{out}");
    for want in ["dry run", "model.safetensors", "README.md", "kiln-user/tiny", "HF_TOKEN"] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    assert!(!out.contains(TOKEN));
    assert!(log.lock().unwrap().is_empty(), "--dry-run contacted the server");

    // No token anywhere: a clear error before any request.
    let o = publish(&endpoint, dir.path(), None, &[model.to_str().unwrap(), "--repo", "kiln-user/tiny"]);
    let out = all_output(&o);
    assert!(!o.status.success() && out.contains("no Hugging Face token") && out.contains("HF_TOKEN"), "{out}");
    assert!(log.lock().unwrap().is_empty());
    // A malformed repo id.
    let o = publish(&endpoint, dir.path(), Some(TOKEN), &[model.to_str().unwrap(), "--repo", "just-a-name"]);
    assert!(!o.status.success() && all_output(&o).contains("USER/NAME"), "{}", all_output(&o));
}
