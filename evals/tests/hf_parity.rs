//! Eval parity with `transformers`: on the tiny Llama that transformers made
//! (models/tests/fixtures/hf-tiny-llama, scripts/make_hf_fixture.py), Kiln's hellaswag scorer gives
//! the per-ending log-likelihoods transformers computed, so Kiln's numbers compare with published ones.

use std::path::Path;

use burn::backend::Flex;
use kiln_evals::scorer::{KernelScorer, ModelScorer, Scorer};
use kiln_evals::tasks::hellaswag::{self, Item};

#[test]
fn hellaswag_logliks_match_transformers() {
    let fix = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures");
    let device = Default::default();
    let (model, cfg, tok) = kiln_models::checkpoint::load_dir::<Flex>(&fix.join("hf-tiny-llama"), &device).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fix.join("hf_tiny_llama_hellaswag.json")).unwrap()).unwrap();
    // The items themselves come from the data root (the fixture holds only their hashes).
    let Some(data) = kiln_models::skip::data_root() else {
        return;
    };
    let path = Path::new(&data).join(hellaswag::DEFAULT_PATH);
    let items: Vec<Item> = hellaswag::load(&path).unwrap().into_iter().take(3).collect();
    let lm = ModelScorer { model: &model, tok: &tok, context: cfg.max_position_embeddings, device };
    // Burn's forward pass, then the fused CPU kernels' (KernelScorer), both against transformers.
    let mut kern = KernelScorer::new(ModelScorer { device: Default::default(), ..lm }, &cfg, 2).unwrap();
    let mut lm = ModelScorer { model: &model, tok: &tok, context: cfg.max_position_embeddings, device: Default::default() };
    check(&mut lm, &items, &want);
    check(&mut kern, &items, &want);
}

fn check(lm: &mut dyn Scorer, items: &[Item], want: &serde_json::Value) {
    let mut worst = 0f64;
    for (it, w) in items.iter().zip(want["items"].as_array().unwrap()) {
        use sha2::Digest;
        assert_eq!(hex::encode(sha2::Sha256::digest(it.context.as_bytes())), w["context_sha256"].as_str().unwrap(), "not the fixture's item");
        assert_eq!(it.label as u64, w["label"].as_u64().unwrap());
        let got = hellaswag::score_item(lm, it).unwrap();
        for ((ll, _bytes), w) in got.iter().zip(w["loglik"].as_array().unwrap()) {
            let w = w.as_f64().unwrap();
            let rel = (ll - w).abs() / w.abs();
            println!("kiln {ll:.5}  transformers {w:.5}  rel {rel:.1e}");
            worst = worst.max(rel);
        }
    }
    assert!(worst < 1e-4, "worst relative difference {worst:.2e}");
}
