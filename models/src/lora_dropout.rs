//! LoRA dropout (PEFT's `lora_dropout`): while adapters train, an adapted projection's adapter
//! reads `x ⊙ mask` instead of `x`, so `y = x·W + s·((x ⊙ mask)·Aᵀ)·Bᵀ`; the frozen `x·W`
//! sees all of `x`. Each value of the mask is 0 with probability `p`, else `1 / (1 − p)`.
//!
//! The mask is a counter hash, not a random stream: its value at (micro-batch, layer,
//! projection, row, column) depends on those numbers and the run's seed only. Burn's graph
//! (`lora_params.rs`) and the CPU kernels (`cpu_kernels/adapters.rs`, whose threads each hold
//! some rows) therefore drop the same values, the kernels' backward regenerates the mask
//! instead of keeping it, and a resumed run drops what the uninterrupted one would have.
//!
//! Each 64-bit hash gives four 16-bit draws, so `p` counts in steps of 1/65,536; the scale
//! uses that `p` exactly, so the mask's mean is 1.

/// One micro-batch's dropout: the rate and the key its masks derive from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Draws below this (of 65,536) are dropped.
    threshold: u32,
    /// `1 / (1 − p)`, the value of a kept position.
    keep: f32,
    key: u64,
}

/// splitmix64's finaliser: a bijective mix of 64 bits.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    /// The dropout of micro-batch `micro` of optimizer step `step` (counted from 0, as the
    /// optimizer's own count) in a run seeded `seed`; `None` when `p` rounds to 0.
    pub fn new(p: f64, seed: u64, step: u64, micro: usize) -> Option<Self> {
        let threshold = (p.clamp(0.0, 1.0) * 65536.0).round().min(65535.0) as u32;
        if threshold == 0 {
            return None;
        }
        let keep = (65536.0 / (65536 - threshold) as f64) as f32;
        Some(Self { threshold, keep, key: mix(mix(mix(seed) ^ step) ^ micro as u64) })
    }

    /// The mask of projection `m` (its index in `lora::TARGETS`) of layer `l`, for rows
    /// `row0..row0 + rows` of the micro-batch (row = sequence · T + position), `cols` wide:
    /// `out` `[rows, cols]` is filled with 0 or `1 / (1 − p)`.
    pub fn mask(&self, l: usize, m: usize, row0: usize, rows: usize, cols: usize, out: &mut [f32]) {
        let site = mix(self.key ^ ((l as u64) << 8 | m as u64));
        for (i, row) in out[..rows * cols].chunks_exact_mut(cols).enumerate() {
            let rk = mix(site ^ ((row0 + i) as u64) << 20);
            for (c, four) in row.chunks_mut(4).enumerate() {
                let h = mix(rk.wrapping_add(c as u64));
                for (j, v) in four.iter_mut().enumerate() {
                    let draw = (h >> (16 * j)) as u32 & 0xFFFF;
                    *v = if draw < self.threshold { 0.0 } else { self.keep };
                }
            }
        }
    }

    /// `out = x ⊙ mask` for `x` `[rows, cols]` (the adapter's input), with the mask's arguments
    /// as in [`Dropout::mask`].
    pub fn apply(&self, l: usize, m: usize, row0: usize, rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
        self.mask(l, m, row0, rows, cols, out);
        for (o, &v) in out[..rows * cols].iter_mut().zip(&x[..rows * cols]) {
            *o *= v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_at_the_rate_with_mean_one_and_depends_on_every_coordinate() {
        let d = Dropout::new(0.1, 7, 3, 0).unwrap();
        let (rows, cols) = (64, 577);
        let mut a = vec![0.0; rows * cols];
        d.mask(2, 4, 0, rows, cols, &mut a);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped {dropped}");
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        // Rows 10.. of the whole are rows 0.. of a shard starting at row 10.
        let mut b = vec![0.0; (rows - 10) * cols];
        d.mask(2, 4, 10, rows - 10, cols, &mut b);
        assert_eq!(&a[10 * cols..], &b[..]);
        // Another layer, projection, micro-batch, step or seed: another mask.
        for other in [Dropout::new(0.1, 7, 3, 1), Dropout::new(0.1, 7, 4, 0), Dropout::new(0.1, 8, 3, 0)] {
            let mut c = vec![0.0; rows * cols];
            other.unwrap().mask(2, 4, 0, rows, cols, &mut c);
            assert_ne!(a, c);
        }
        let mut c = vec![0.0; rows * cols];
        d.mask(2, 5, 0, rows, cols, &mut c);
        assert_ne!(a, c);
        d.mask(3, 4, 0, rows, cols, &mut c);
        assert_ne!(a, c);
        assert!(Dropout::new(0.0, 7, 3, 0).is_none());
    }
}
