//! Bounded, seeded fuzzing of recipe loading: 2,000 mutated recipes (random `--set` values of
//! every type at every key, and damaged recipe text) through `Recipe::parse`. No input may
//! panic, and what is accepted must be in range: every accepted recipe passes `validate` and
//! survives its own `plan.toml` round trip.

use kiln_recipes::{Recipe, Source};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};

/// Every key a recipe has, and some it does not.
const KEYS: &[&str] = &[
    "name", "stage", "init", "model.preset", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.ffn_hidden", "model.context", "model.rope_theta", "model.norm_eps", "model.tie_embeddings", "tokenizer.kind",
    "tokenizer.vocab_size", "tokenizer.path", "data.sources", "data.sha256", "data.format", "data.text_field",
    "data.val_fraction", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.beta1",
    "optim.beta2", "optim.eps", "optim.grad_clip", "optim.fused", "train.steps", "train.batch_size", "train.grad_accum",
    "train.seed", "train.device", "train.precision", "train.cpu_kernels", "train.fused_attention", "train.flash_attention", "train.fused_loss",
    "train.fused_norm", "train.fused_swiglu", "train.fused_proj", "train.cublaslt", "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.max_energy_j", "train.target_val_loss", "eval.tasks", "eval.every", "eval.prompts", "eval.sample_tokens",
    "energy.meter", "energy.watts_per_core", "energy.idle_watts", "energy.grid_gco2_per_kwh", "energy.powercap_root",
    "train", "model", "optim.lrr", "bogus", "a.b.c", "",
];

/// TOML values of every kind, the extremes included.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        prop::sample::select(vec![0i64, 1, -1, 2, 7, 64, 4096, i64::MAX, i64::MIN]).prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:e}")),
        prop::sample::select(vec!["nan", "inf", "-inf", "0.0", "-0.0", "1e308", "1e-320", "0.5", "1.5", "9e18"]).prop_map(str::to_string),
        prop::sample::select(vec!["true", "false", "[]", "[1, 2]", "[\"x\"]", "{}", "{ a = 1 }", "\"\"", "\"auto\"", "\"cuda:+1\"", "\"wgpu:1\"", "\"bf16-mixed\"", "\"a\\nb\"", "\"a\\u0000b\""]).prop_map(str::to_string),
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        "[ -~]{0,8}",
    ]
}

/// A recipe text: a shipped one, or nothing.
fn base() -> impl Strategy<Value = String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut texts = vec![String::new()];
    for sub in ["pretrain", "finetune", "sft"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap().flatten() {
            texts.push(std::fs::read_to_string(e.path()).unwrap());
        }
    }
    prop::sample::select(texts)
}

/// Damage to recipe text: a cut, a byte replaced, or a line duplicated.
fn damaged(text: String, at: usize, byte: u8, how: u8) -> String {
    let mut b = text.into_bytes();
    let at = if b.is_empty() { 0 } else { at % b.len() };
    match how % 3 {
        0 => b.truncate(at),
        1 if !b.is_empty() => b[at] = byte,
        _ => {
            let line: Vec<u8> = b[at..].iter().take_while(|&&c| c != b'\n').copied().chain([b'\n']).collect();
            b.splice(at..at, line);
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// What an accepted recipe must satisfy.
fn check_accepted(r: &Recipe) {
    assert_eq!(r.validate(), Ok(()));
    let again = Recipe::parse(&Source { path: "plan.toml".into(), text: r.to_toml() }, &[]).expect("an accepted recipe's plan.toml parses");
    assert_eq!(&again, r);
}

fn runner(cases: u32) -> TestRunner {
    let config = Config { cases, failure_persistence: Some(Box::new(FileFailurePersistence::Off)), ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]))
}

#[test]
fn mutated_overrides_never_panic_and_accepted_values_are_in_range() {
    let sets = prop::collection::vec((prop::sample::select(KEYS), value()), 1..4);
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner(1500)
        .run(&(base(), sets), |(text, sets)| {
            let sets: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
            match Recipe::parse(&Source { path: "fuzz.toml".into(), text }, &sets) {
                Ok(r) => {
                    check_accepted(&r);
                    accepted.set(accepted.get() + 1);
                }
                Err(e) => {
                    assert!(e.to_string().contains("fuzz.toml"), "the error names no file: {e}");
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    println!("{accepted} accepted, {refused} refused");
    assert!(accepted > 50 && refused > 500, "{accepted} accepted, {refused} refused: the mutations hit too little");
}

#[test]
fn damaged_recipe_text_never_panics() {
    runner(500)
        .run(&(base(), any::<usize>(), any::<u8>(), any::<u8>()), |(text, at, byte, how)| {
            if let Ok(r) = Recipe::parse(&Source { path: "fuzz.toml".into(), text: damaged(text, at, byte, how) }, &[]) {
                check_accepted(&r);
            }
            Ok(())
        })
        .unwrap();
}
