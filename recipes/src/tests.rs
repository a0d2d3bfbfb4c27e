use super::*;

fn parse(text: &str, sets: &[&str]) -> Result<Recipe, RecipeError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Recipe::parse(&Source { path: "test.toml".into(), text: text.into() }, &sets)
}

#[test]
fn empty_recipe_is_all_defaults() {
    assert_eq!(parse("", &[]).unwrap(), Recipe::default());
}

#[test]
fn misspelt_key_names_file_key_line_and_nearest() {
    let e = parse("name = \"x\"\n[optim]\nlrr = 0.1\n", &[]).unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.key(), Some("optim.lrr"), "{msg}");
    assert!(msg.contains("test.toml:3"), "{msg}");
    assert!(msg.contains("did you mean 'optim.lr'"), "{msg}");
}

#[test]
fn misspelt_section_is_caught() {
    let e = parse("[trian]\nsteps = 3\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("trian"));
    assert!(e.to_string().contains("did you mean 'train'"), "{e}");
}

#[test]
fn wrong_type_names_key() {
    let e = parse("[train]\nsteps = \"many\"\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("train.steps"), "{e}");
    assert!(e.to_string().contains("invalid type"), "{e}");
    assert!(e.to_string().contains("test.toml:2"), "{e}");
}

#[test]
fn negative_learning_rate_is_rejected() {
    let e = parse("[optim]\nlr = -0.001\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("optim.lr"));
    assert!(e.to_string().contains("positive"), "{e}");
}

#[test]
fn set_overrides_and_is_checked() {
    let r = parse("[train]\nsteps = 10\n", &["train.steps=500", "optim.lr=3e-4", "name=abc"]).unwrap();
    assert_eq!(r.train.steps, 500);
    assert_eq!(r.optim.lr, 3e-4);
    assert_eq!(r.name, "abc");
    let e = parse("", &["train.stepz=5"]).unwrap_err();
    assert_eq!(e.key(), Some("train.stepz"));
    assert!(e.to_string().contains("--set train.stepz=5"), "{e}");
    let e = parse("", &["optim.lr=-1"]).unwrap_err();
    assert_eq!(e.key(), Some("optim.lr"));
    assert!(parse("", &["nokey"]).is_err());
}

#[test]
fn https_sources_need_pins() {
    let e = parse("[data]\nsources = [\"https://example.com/a.txt\"]\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("data.sha256"));
}

#[test]
fn every_shipped_recipe_parses_and_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["pretrain", "finetune", "sft", "rag", "retriever"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else { continue };
        for f in rd {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
    }
    assert!(n >= 1, "no recipes found");
}

#[test]
fn round_trips_through_toml() {
    let r = parse("[train]\nsteps = 7\n", &[]).unwrap();
    let again = parse(&r.to_toml(), &[]).unwrap();
    assert_eq!(r, again);
}

/// Every schema field (a `pub` field of a section struct in schema.rs) is in README's recipe reference.
#[test]
fn readme_documents_every_field() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(root.join("src/schema.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
    let sections = [
        ("Recipe", ""),
        ("ModelSection", "model."),
        ("TokenizerSection", "tokenizer."),
        ("DataSection", "data."),
        ("OptimSection", "optim."),
        ("TrainSection", "train."),
        ("EnergySection", "energy."),
        ("EvalSection", "eval."),
        ("LoraSection", "lora."),
        ("RetrievalSection", "retrieval."),
        ("RetrieverSection", "retriever."),
    ];
    let mut current: Option<&str> = None;
    let mut checked = 0;
    let mut prev_doc = false;
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("pub struct ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            current = sections.iter().find(|(s, _)| *s == name).map(|(_, p)| *p);
            continue;
        }
        if t == "}" {
            current = None;
        }
        if let (Some(prefix), Some(field)) = (current, t.strip_prefix("pub ")) {
            let name = field.split(':').next().unwrap().trim();
            let key = format!("`{prefix}{name}`");
            if !["model", "tokenizer", "data", "optim", "train", "eval", "energy", "lora", "retrieval", "retriever"].contains(&name) {
                assert!(readme.contains(&key), "README's recipe reference lacks {key}");
                assert!(prev_doc, "{key} has no doc comment in the schema");
                checked += 1;
            }
        }
        prev_doc = t.starts_with("///");
    }
    assert!(checked >= 30, "only {checked} fields found");
}

/// Values that used to pass silently: each is refused, naming its key.
#[test]
fn out_of_range_values_name_their_key() {
    for (text, key) in [
        ("[model]\nnorm_eps = nan\n", "model.norm_eps"),
        ("[model]\nrope_theta = inf\n", "model.rope_theta"),
        ("[model]\nrope_theta = -1.0\n", "model.rope_theta"),
        ("[model]\nnorm_eps = 0.0\n", "model.norm_eps"),
        ("[model]\ncontext = 1\n", "model.context"),
        ("[model]\nd_model = 9223372036854775807\n", "model.d_model"),
        ("[optim]\neps = inf\n", "optim.eps"),
        ("[optim]\nweight_decay = inf\n", "optim.weight_decay"),
        ("[optim]\ngrad_clip = inf\n", "optim.grad_clip"),
        ("[optim]\nlr = 9e18\nmin_lr = 0.0\n", "optim.lr"),
        ("[train]\nbatch_size = 9223372036854775807\n", "train.batch_size"),
        ("[train]\ngrad_accum = 9223372036854775807\n", "train.grad_accum"),
        ("[train]\neval_batches = 9223372036854775807\n", "train.eval_batches"),
        ("name = \"a\\nb\"\n", "name"),
        ("name = \"a\\u0000b\"\n", "name"),
        ("train = [1, 2]\n", "train"),
        ("[train]\ndevice = \"cuda:+1\"\n", "train.device"),
        ("[train]\nprecision = \"bf17\"\n", "train.precision"),
        ("[energy]\nmeter = \"joulemeter\"\n", "energy.meter"),
        ("[retrieval]\ncorpus = \"c.jsonl\"\nfusion = \"max\"\n", "retrieval.fusion"),
        ("[retrieval]\ncorpus = \"c.jsonl\"\ndense_weight = 1.5\n", "retrieval.dense_weight"),
        ("[retrieval]\ncorpus = \"c.jsonl\"\ndense_weight = nan\n", "retrieval.dense_weight"),
    ] {
        let e = parse(text, &[]).err().unwrap_or_else(|| panic!("accepted: {text}"));
        assert_eq!(e.key(), Some(key), "{text}: {e}");
    }
    let long = format!("name = \"{}\"\n", "x".repeat(4000));
    assert_eq!(parse(&long, &[]).unwrap_err().key(), Some("name"));
}
