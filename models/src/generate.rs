//! Text generation with a KV cache, and sampling: temperature, top-k, top-p.
//! `temperature = 0` is greedy. Randomness comes from Kiln's seeded RNG, never the backend's.
//!
//! Two engines: [`generate`] runs Burn's model (any backend, one sequence), and
//! [`generate_batch`] the fused CPU kernels (many sequences at once, continuously batched).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cpu_kernels::{Kernels, KvRow};
use crate::llama::{KvCache, Llama};

#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub max_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1.0 disables.
    pub top_p: f32,
    pub seed: u64,
    /// Stop when one of these tokens is sampled (it is returned, as the last token).
    pub stop: Vec<u32>,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self { max_tokens: 200, temperature: 0.8, top_k: 0, top_p: 1.0, seed: 0, stop: Vec::new() }
    }
}

/// Picks the next token from a row of logits.
pub fn sample(logits: &[f32], o: &SampleOptions, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
            .0 as u32
    };
    if o.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if o.top_k > 0 {
        idx.truncate(o.top_k.max(1));
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / o.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if o.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= o.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut r = rng.random::<f32>() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// Continues `prompt` by up to `o.max_tokens` tokens. Returns only the new tokens.
pub fn generate<B: Backend>(model: &Llama<B>, context: usize, prompt: &[u32], o: &SampleOptions, device: &B::Device) -> Vec<u32> {
    generate_streaming(model, context, prompt, o, device, &mut |_| true)
}

/// [`generate`], handing each new token to `on_token` as it is chosen; `on_token` returning
/// false stops generation (an interrupted chat reply).
pub fn generate_streaming<B: Backend>(model: &Llama<B>, context: usize, prompt: &[u32], o: &SampleOptions, device: &B::Device, on_token: &mut dyn FnMut(u32) -> bool) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let n_layers = model.model.layers.len();
    let mut all: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut cache = KvCache::new(n_layers);
    let mut pending: Vec<u32> = tail(&all, context).to_vec();
    while out.len() < o.max_tokens {
        if pending.is_empty() {
            break;
        }
        if cache.len() + pending.len() > context {
            // The window is full: start a fresh cache on the last half-context of tokens.
            cache = KvCache::new(n_layers);
            pending = tail(&all, context / 2).to_vec();
        }
        let ids: Vec<i64> = pending.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device); // [1, T]
        let logits = model.forward_cached(x, Some(&mut cache)); // [1, T, V]
        let v = logits.dims()[2];
        let last = logits.narrow(1, n - 1, 1).reshape([v]); // [V]
        let row: Vec<f32> = last.into_data().convert::<f32>().to_vec().unwrap_or_default();
        let next = sample(&row, o, &mut rng);
        out.push(next);
        all.push(next);
        if !on_token(next) || o.stop.contains(&next) {
            break;
        }
        pending = vec![next];
    }
    out
}

/// Continues every prompt on the CPU kernels (`w`: the weights in `k`'s layout), up to
/// `max_batch` sequences at a time. Each step runs the newly admitted prompts and one token of
/// every running sequence through the model together; a finished sequence's place goes to the
/// next prompt (continuous batching). `on_token(prompt index, token)` sees every token as it is
/// chosen; returning false ends that sequence. Prompt `i` samples with seed `o.seed + i`, so a
/// batch of one is [`generate`]'s sequence. Returns the new tokens of each prompt, in order.
///
/// A sequence that fills `context` restarts its cache on its last half-context of tokens, as
/// [`generate`] does.
pub fn generate_batch(k: &Kernels, w: &[f32], context: usize, prompts: &[Vec<u32>], o: &SampleOptions, max_batch: usize, on_token: &mut dyn FnMut(usize, u32) -> bool) -> Vec<Vec<u32>> {
    struct Running {
        prompt: usize,
        all: Vec<u32>,
        pending: Vec<u32>,
        rng: ChaCha8Rng,
    }
    let max_batch = max_batch.max(1);
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut caches: Vec<KvRow> = vec![KvRow::default(); max_batch.min(prompts.len())];
    let mut slots: Vec<Option<Running>> = (0..caches.len()).map(|_| None).collect();
    let mut queue = (0..prompts.len()).filter(|&i| o.max_tokens > 0 && !prompts[i].is_empty());
    loop {
        for (slot, cache) in slots.iter_mut().zip(caches.iter_mut()) {
            if slot.is_none() {
                if let Some(i) = queue.next() {
                    cache.clear();
                    let pending = tail(&prompts[i], context).to_vec();
                    *slot = Some(Running { prompt: i, all: prompts[i].clone(), pending, rng: ChaCha8Rng::seed_from_u64(o.seed.wrapping_add(i as u64)) });
                }
            }
        }
        for (slot, cache) in slots.iter_mut().zip(caches.iter_mut()) {
            if let Some(r) = slot {
                if cache.len() + r.pending.len() > context {
                    // The window is full: start a fresh cache on the last half-context of tokens.
                    cache.clear();
                    r.pending = tail(&r.all, context / 2).to_vec();
                }
            }
        }
        let feed: Vec<(usize, &[u32])> = slots.iter().enumerate().filter_map(|(s, r)| r.as_ref().map(|r| (s, r.pending.as_slice()))).collect();
        if feed.is_empty() {
            break;
        }
        let logits = k.decode(w, &mut caches, &feed); // [R, V]
        let order: Vec<usize> = feed.iter().map(|e| e.0).collect();
        let v = logits.len() / order.len();
        for (e, s) in order.into_iter().enumerate() {
            let Some(r) = slots[s].as_mut() else { continue };
            let next = sample(&logits[e * v..(e + 1) * v], o, &mut r.rng);
            let out = &mut outs[r.prompt];
            out.push(next);
            r.all.push(next);
            let go_on = on_token(r.prompt, next);
            if !go_on || o.stop.contains(&next) || out.len() >= o.max_tokens {
                slots[s] = None;
            } else {
                r.pending = vec![next];
            }
        }
    }
    outs
}

/// A model ready to generate: on the fused CPU kernels (batched) where they were asked for,
/// else on Burn's model (any backend, one sequence at a time).
pub struct Generator<'a, B: Backend> {
    model: &'a Llama<B>,
    device: B::Device,
    context: usize,
    kernels: Option<(Kernels, Vec<f32>)>,
}

impl<'a, B: Backend> Generator<'a, B> {
    /// Generation on Burn's model.
    pub fn burn(model: &'a Llama<B>, context: usize, device: &B::Device) -> Self {
        Self { model, device: device.clone(), context, kernels: None }
    }
    /// Generation on the CPU kernels, with the weights copied into their layout.
    pub fn kernels(model: &'a Llama<B>, cfg: &crate::LlamaConfig, threads: usize, device: &B::Device) -> Result<Self, crate::ModelError> {
        let k = Kernels::for_model(model, cfg, threads);
        let w = k.layout.weights(model)?;
        Ok(Self { model, device: device.clone(), context: cfg.max_position_embeddings, kernels: Some((k, w)) })
    }
    /// Whether this runs on the CPU kernels.
    pub fn batched(&self) -> bool {
        self.kernels.is_some()
    }
    /// The new tokens of each prompt (see [`generate_batch`]; on Burn's model, one prompt after
    /// the other, prompt `i` with seed `o.seed + i` as there).
    pub fn run(&self, prompts: &[Vec<u32>], o: &SampleOptions, max_batch: usize, on_token: &mut dyn FnMut(usize, u32) -> bool) -> Vec<Vec<u32>> {
        match &self.kernels {
            Some((k, w)) => generate_batch(k, w, self.context, prompts, o, max_batch, on_token),
            None => prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let oi = SampleOptions { seed: o.seed.wrapping_add(i as u64), ..o.clone() };
                    generate_streaming(self.model, self.context, p, &oi, &self.device, &mut |t| on_token(i, t))
                })
                .collect(),
        }
    }
}

fn tail(v: &[u32], n: usize) -> &[u32] {
    &v[v.len().saturating_sub(n)..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let greedy = SampleOptions { temperature: 0.0, ..Default::default() };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let k1 = SampleOptions { temperature: 1.0, top_k: 1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &k1, &mut rng), 1);
        }
        // Tokens 1 and 3 hold ~90% of the mass: top_p 0.8 keeps exactly those two.
        let p = SampleOptions { temperature: 1.0, top_p: 0.8, ..Default::default() };
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0, "{seen:?}");
        assert!(seen[1] > 100 && seen[3] > 100, "{seen:?}");
    }
}
