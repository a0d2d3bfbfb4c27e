//! Generation on the CPU kernels (`cpu_kernels/decode.rs`, `generate::generate_batch`) against
//! the full forward pass and against Burn's model with its KV cache: the cached logits, greedy
//! tokens for a continuously batched set of prompts, and the restart when a sequence fills the
//! context.

use burn::backend::Flex;
use kiln_models::cpu_kernels::{Kernels, KvRow};
use kiln_models::generate::{generate, generate_batch, SampleOptions};
use kiln_models::init::RandomInit;
use kiln_models::Llama;

mod common;
use common::{max_rel, tiny_config as config};

type B = Flex;

fn setup(tied: bool, context: usize, threads: usize) -> (Llama<B>, Kernels, Vec<f32>) {
    let cfg = config(tied, context);
    let model = Llama::<B>::build(&cfg, &mut RandomInit::new(5, cfg.num_hidden_layers), &Default::default()).unwrap();
    let kern = Kernels::for_model(&model, &cfg, threads);
    let w = kern.layout.weights(&model).unwrap();
    (model, kern, w)
}

#[test]
fn cached_logits_equal_the_full_forward_pass() {
    for tied in [false, true] {
        let (_, kern, w) = setup(tied, 32, 2);
        let v = 37;
        let a: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 37).collect();
        let b: Vec<u32> = (0..6).map(|i| (i * 5 + 2) % 37).collect();
        let full = |s: &[u32]| {
            let ids: Vec<i64> = s.iter().map(|&t| t as i64).collect();
            kern.logits(&w, &ids, 1, s.len()) // [T, V]
        };
        let (fa, fb) = (full(&a), full(&b));
        // Step 1: a's first 7 tokens and b's first 2 together; then a's next 4 beside b one token
        // at a time, so prompts and decoding rows share steps.
        let mut caches = vec![KvRow::default(); 2];
        let l = kern.decode(&w, &mut caches, &[(0, &a[..7]), (1, &b[..2])]);
        assert!(max_rel(&l[..v], &fa[6 * v..7 * v]) < 1e-5, "tied {tied}: prefill of a");
        assert!(max_rel(&l[v..], &fb[v..2 * v]) < 1e-5, "tied {tied}: prefill of b");
        let l = kern.decode(&w, &mut caches, &[(1, &b[2..3]), (0, &a[7..])]);
        assert!(max_rel(&l[..v], &fb[2 * v..3 * v]) < 1e-5, "tied {tied}: b's third token");
        assert!(max_rel(&l[v..], &fa[10 * v..11 * v]) < 1e-5, "tied {tied}: a's rest");
        for i in 3..6 {
            let l = kern.decode(&w, &mut caches, &[(1, &b[i..i + 1])]);
            assert!(max_rel(&l, &fb[i * v..(i + 1) * v]) < 1e-5, "tied {tied}: b at {i}");
        }
        assert_eq!((caches[0].len(), caches[1].len()), (11, 6));
    }
}

#[test]
fn batched_greedy_generation_equals_burns_one_at_a_time() {
    let (model, kern, w) = setup(false, 64, 2);
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4, 5, 6, 7, 8, 9, 10], vec![11], vec![12, 13], vec![]];
    let o = SampleOptions { max_tokens: 12, temperature: 0.0, stop: vec![36], ..Default::default() };
    let mut seen = vec![0usize; prompts.len()];
    // Two places for five prompts: the later ones join as earlier ones finish.
    let outs = generate_batch(&kern, &w, 64, &prompts, &o, 2, &mut |i, _| {
        seen[i] += 1;
        true
    });
    for (i, p) in prompts.iter().enumerate() {
        let burn = generate(&model, 64, p, &o, &Default::default());
        assert_eq!(outs[i], burn, "prompt {i}");
        assert_eq!(seen[i], burn.len(), "prompt {i}: tokens streamed");
    }
    assert!(outs[0].len() > 1 && outs[4].is_empty());
}

#[test]
fn sampling_and_stopping_follow_the_options() {
    let (model, kern, w) = setup(true, 64, 1);
    let prompt = vec![vec![3u32, 1, 4, 1, 5]];
    // A batch of one samples as `generate` does (seed + 0).
    let o = SampleOptions { max_tokens: 10, temperature: 1.0, top_k: 5, seed: 9, ..Default::default() };
    let outs = generate_batch(&kern, &w, 64, &prompt, &o, 4, &mut |_, _| true);
    assert_eq!(outs[0], generate(&model, 64, &prompt[0], &o, &Default::default()));
    assert_eq!(outs[0].len(), 10);
    // The callback ends a sequence; a stop token ends it and is returned.
    let outs = generate_batch(&kern, &w, 64, &prompt, &o, 4, &mut |_, _| false);
    assert_eq!(outs[0].len(), 1);
    let stop = SampleOptions { stop: vec![outs[0][0]], ..o.clone() };
    let outs = generate_batch(&kern, &w, 64, &prompt, &stop, 4, &mut |_, _| true);
    assert_eq!(outs[0].len(), 1);
}

#[test]
fn a_full_context_restarts_as_burns_generation_does() {
    // Context 16: a 10-token prompt and 20 new tokens cross it; both engines restart their cache
    // on the last 8 tokens, so the greedy tokens agree throughout.
    let (model, kern, w) = setup(false, 16, 2);
    let prompts = vec![(0..10).map(|i| (i * 3 + 1) % 37).collect::<Vec<u32>>(), (0..20).map(|i| (i * 11 + 2) % 37).collect()];
    let o = SampleOptions { max_tokens: 20, temperature: 0.0, ..Default::default() };
    let outs = generate_batch(&kern, &w, 16, &prompts, &o, 8, &mut |_, _| true);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(outs[i].len(), 20);
        assert_eq!(outs[i], generate(&model, 16, p, &o, &Default::default()), "prompt {i}");
    }
}
