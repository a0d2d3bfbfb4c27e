//! What a task needs from a model: token log-probabilities and greedy generation.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_models::cpu_kernels::Kernels;
use kiln_models::generate::{generate, generate_batch, SampleOptions};
use kiln_models::{Llama, LlamaConfig, ModelError, Tokenizer};

pub trait Scorer {
    fn tokenizer(&self) -> &Tokenizer;
    /// The longest sequence one forward pass takes.
    fn context(&self) -> usize;
    /// For each sequence (at most `context + 1` tokens): `log p(t[i] | t[..i])` for `i` in `1..len`.
    fn logprobs(&mut self, seqs: &[Vec<u32>]) -> Vec<Vec<f64>>;
    /// Greedy continuation of `prompt`, at most `max_tokens`, stopping after any of `stop`.
    fn greedy(&mut self, prompt: &[u32], max_tokens: usize, stop: &[u32]) -> Vec<u32>;
    /// [`Scorer::greedy`] for many prompts, batched where the scorer can batch.
    fn greedy_batch(&mut self, prompts: &[Vec<u32>], max_tokens: usize, stop: &[u32]) -> Vec<Vec<u32>> {
        prompts.iter().map(|p| self.greedy(p, max_tokens, stop)).collect()
    }
    /// Unit-length sentence embeddings `[N, D]` of `seqs` (`kiln_models::embed`), where the
    /// scorer can make them.
    fn embed(&mut self, _seqs: &[Vec<u32>]) -> Option<Vec<f32>> {
        None
    }
}

/// How many sequences [`KernelScorer`] generates at once.
pub const GENERATION_BATCH: usize = 16;

/// A Kiln model as a [`Scorer`], on any backend (no autodiff needed).
pub struct ModelScorer<'a, B: Backend> {
    pub model: &'a Llama<B>,
    pub tok: &'a Tokenizer,
    pub context: usize,
    pub device: B::Device,
}

impl<B: Backend> Scorer for ModelScorer<'_, B> {
    fn tokenizer(&self) -> &Tokenizer {
        self.tok
    }
    fn context(&self) -> usize {
        self.context
    }
    fn logprobs(&mut self, seqs: &[Vec<u32>]) -> Vec<Vec<f64>> {
        if seqs.is_empty() {
            return Vec::new();
        }
        let (ids, b, t) = padded(seqs, self.context);
        // The next token at every position (0 where there is none; those are not read).
        let mut next = vec![0i64; b * t];
        for (r, s) in seqs.iter().enumerate() {
            for i in 1..s.len().min(t + 1) {
                next[r * t + i - 1] = s[i] as i64;
            }
        }
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &self.device); // [B, T]
        let y = Tensor::<B, 3, Int>::from_data(TensorData::new(next, [b, t, 1]), &self.device); // [B, T, 1]
        // Picked on the device: only [B, T] numbers come back to the host, not [B, T, V].
        let lp = kiln_models::loss::target_logprobs(self.model.forward(x), y); // [B, T, 1]
        let all: Vec<f32> = lp.into_data().convert::<f32>().to_vec().unwrap_or_default();
        seqs.iter()
            .enumerate()
            .map(|(r, s)| (1..s.len().min(t + 1)).map(|i| all[r * t + i - 1] as f64).collect())
            .collect()
    }
    fn greedy(&mut self, prompt: &[u32], max_tokens: usize, stop: &[u32]) -> Vec<u32> {
        let o = SampleOptions { max_tokens, temperature: 0.0, stop: stop.to_vec(), ..Default::default() };
        generate(self.model, self.context, prompt, &o, &self.device)
    }
    fn embed(&mut self, seqs: &[Vec<u32>]) -> Option<Vec<f32>> {
        Some(kiln_models::embed::encode_burn(self.model, &self.device, seqs, self.context))
    }
}

/// Token ids padded on the right to the longest input (at most `context`): `([B·T], B, T)`.
/// Causal attention keeps the padding from affecting earlier positions.
fn padded(seqs: &[Vec<u32>], context: usize) -> (Vec<i64>, usize, usize) {
    let t = seqs.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0).clamp(1, context);
    let b = seqs.len();
    let mut ids = vec![0i64; b * t];
    for (r, s) in seqs.iter().enumerate() {
        for (i, &x) in s.iter().take(t).enumerate() {
            ids[r * t + i] = x as i64;
        }
    }
    (ids, b, t)
}

/// A [`ModelScorer`] whose log-probabilities and generations come from the fused CPU kernels
/// (`kiln_models::cpu_kernels`): for the CPU backends at f32. Generation is batched,
/// [`GENERATION_BATCH`] sequences at a time.
pub struct KernelScorer<'a, B: Backend> {
    pub inner: ModelScorer<'a, B>,
    kern: Kernels,
    w: Vec<f32>,
}

impl<'a, B: Backend> KernelScorer<'a, B> {
    pub fn new(inner: ModelScorer<'a, B>, cfg: &LlamaConfig, threads: usize) -> Result<Self, ModelError> {
        let kern = Kernels::for_model(inner.model, cfg, threads);
        let w = kern.layout.weights(inner.model)?;
        Ok(Self { inner, kern, w })
    }
}

impl<B: Backend> Scorer for KernelScorer<'_, B> {
    fn tokenizer(&self) -> &Tokenizer {
        self.inner.tok
    }
    fn context(&self) -> usize {
        self.inner.context
    }
    fn logprobs(&mut self, seqs: &[Vec<u32>]) -> Vec<Vec<f64>> {
        if seqs.is_empty() {
            return Vec::new();
        }
        let (ids, b, t) = padded(seqs, self.inner.context);
        let logits = self.kern.logits(&self.w, &ids, b, t); // [B·T, V]
        let v = self.kern.layout.dims.vocab;
        seqs.iter()
            .enumerate()
            .map(|(r, s)| {
                (1..s.len().min(t + 1))
                    .map(|i| {
                        let row = &logits[(r * t + i - 1) * v..(r * t + i) * v];
                        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                        row[s[i] as usize] as f64 - lse
                    })
                    .collect()
            })
            .collect()
    }
    fn greedy(&mut self, prompt: &[u32], max_tokens: usize, stop: &[u32]) -> Vec<u32> {
        self.greedy_batch(&[prompt.to_vec()], max_tokens, stop).pop().unwrap_or_default()
    }
    fn greedy_batch(&mut self, prompts: &[Vec<u32>], max_tokens: usize, stop: &[u32]) -> Vec<Vec<u32>> {
        let o = SampleOptions { max_tokens, temperature: 0.0, stop: stop.to_vec(), ..Default::default() };
        generate_batch(&self.kern, &self.w, self.inner.context, prompts, &o, GENERATION_BATCH, &mut |_, _| true)
    }
    fn embed(&mut self, seqs: &[Vec<u32>]) -> Option<Vec<f32>> {
        Some(kiln_models::embed::encode_kernels(&self.kern, kiln_models::cpu_kernels::Weights::F32(&self.w), seqs, self.inner.context))
    }
}
