//! Random initialisation, GPT-2 style: every matrix normal(0, 0.02), the residual output
//! projections (`o_proj`, `down_proj`) scaled by 1/sqrt(2·layers), norms at 1.
//! Drawn from Kiln's own seeded RNG, never the backend's, so it is the same on every backend.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::llama::WeightSource;
use crate::ModelError;

pub struct RandomInit {
    rng: ChaCha8Rng,
    std: f64,
    residual_std: f64,
}

impl RandomInit {
    pub fn new(seed: u64, n_layers: usize) -> Self {
        let std = 0.02;
        Self { rng: ChaCha8Rng::seed_from_u64(seed), std, residual_std: std / (2.0 * n_layers as f64).sqrt() }
    }
}

impl WeightSource for RandomInit {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let n: usize = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(vec![1.0; n]);
        }
        let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            self.residual_std
        } else {
            self.std
        };
        let dist = Normal::new(0.0f32, std as f32).map_err(|e| ModelError::Config(e.to_string()))?;
        Ok((0..n).map(|_| dist.sample(&mut self.rng)).collect())
    }
}

/// Weights from `inner`, whose vocabulary has `from` rows, for a model with more: the embedding
/// (and an untied head) gain rows at the mean of the existing ones, so that new special tokens
/// start as an average token rather than noise (what `transformers`' `resize_token_embeddings`
/// does with `mean_resizing`).
pub struct GrowVocab {
    pub inner: Box<dyn WeightSource>,
    pub from: usize,
}

impl WeightSource for GrowVocab {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let vocab_rows = matches!(name, "model.embed_tokens.weight" | "lm_head.weight");
        if !vocab_rows || shape[0] <= self.from {
            return self.inner.get(name, shape);
        }
        let d = shape[1];
        let mut v = self.inner.get(name, &[self.from, d])?; // [from, d]
        let mut mean = vec![0.0f64; d];
        for row in v.chunks_exact(d) {
            mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / self.from as f64) as f32).collect();
        for _ in self.from..shape[0] {
            v.extend_from_slice(&mean);
        }
        Ok(v) // [rows, d]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl WeightSource for Fixed {
        fn get(&mut self, _: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
            Ok((0..shape.iter().product::<usize>()).map(|i| i as f32).collect())
        }
    }

    #[test]
    fn grown_rows_are_the_mean_row() {
        let mut g = GrowVocab { inner: Box::new(Fixed), from: 3 };
        let v = g.get("model.embed_tokens.weight", &[5, 2]).unwrap();
        assert_eq!(v, vec![0., 1., 2., 3., 4., 5., 2., 3., 2., 3.]);
        assert_eq!(g.get("model.norm.weight", &[2]).unwrap(), vec![0., 1.]);
    }
}
