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
