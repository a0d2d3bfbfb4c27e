//! Batches from the packed token stream.
//!
//! Each epoch cuts the training stream into windows of `context + 1` tokens (consecutive
//! windows share one token, the last target of one being the first input of the next), starting
//! at an offset drawn for that epoch, and visits them in an order shuffled from the seed and the
//! epoch. The position `(epoch, index)` is all the state there is, so a checkpoint that records it
//! resumes the exact batch sequence. Every batch carries a per-token loss mask (all ones when
//! pretraining).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One micro-batch, row-major `[batch, context]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    /// 1.0 where the target counts towards the loss.
    pub mask: Vec<f32>,
    pub batch: usize,
    pub context: usize,
    /// Input tokens that are not padding (the throughput counts these).
    pub tokens: usize,
    /// Packed rows (SFT): for each position, where its example begins in the row; attention
    /// stays inside the example and RoPE positions restart there. `None`: one sequence a row.
    pub starts: Option<Vec<u32>>,
    /// The retriever stage: (query, passage) pairs, whose loss is the contrastive one
    /// (`kiln_models::contrastive`); `inputs`, `targets` and `mask` are then empty.
    pub pairs: Option<kiln_models::contrastive::Pairs>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderPos {
    pub epoch: u64,
    pub index: u64,
}

/// The training batches: windows of the token stream (pretraining), padded examples (SFT) or
/// (query, passage) pairs (the retriever stage).
pub enum Batches {
    Windows(Loader),
    Examples(super::sft::ExampleLoader),
    Pairs(super::pairs::PairLoader),
}

impl Batches {
    pub fn next_batch(&mut self) -> Batch {
        match self {
            Batches::Windows(l) => l.next_batch(),
            Batches::Examples(l) => l.next_batch(),
            Batches::Pairs(l) => l.next_batch(),
        }
    }

    pub fn pos(&self) -> LoaderPos {
        match self {
            Batches::Windows(l) => l.pos,
            Batches::Examples(l) => l.epochs.pos,
            Batches::Pairs(l) => l.epochs.pos,
        }
    }
}

/// Shuffled epochs over `len` items (SFT rows, retriever pairs): each epoch a permutation
/// seeded by the seed and the epoch's number, so `pos` is all a resume needs.
pub struct Epochs {
    seed: u64,
    pub pos: LoaderPos,
    order: Vec<u32>,
}

impl Epochs {
    pub fn new(len: usize, seed: u64, pos: LoaderPos) -> Self {
        let mut e = Self { seed, pos, order: (0..len as u32).collect() };
        e.shuffle();
        e
    }

    /// This epoch's order of the items.
    pub fn order(&self) -> &[u32] {
        &self.order
    }

    /// Draws the current epoch's order.
    fn shuffle(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ self.pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order = (0..self.order.len() as u32).collect();
        self.order.shuffle(&mut rng);
    }

    /// The next `n` items, continuing into the next epoch where this one ends.
    pub fn take(&mut self, n: usize) -> Vec<usize> {
        let mut picked = Vec::with_capacity(n);
        for _ in 0..n {
            if self.pos.index as usize >= self.order.len() {
                self.pos = LoaderPos { epoch: self.pos.epoch + 1, index: 0 };
                self.shuffle();
            }
            picked.push(self.order[self.pos.index as usize] as usize);
            self.pos.index += 1;
        }
        picked
    }
}

pub struct Loader {
    tokens: Vec<u32>,
    context: usize,
    batch: usize,
    seed: u64,
    pub pos: LoaderPos,
    offset: usize,
    order: Vec<u32>,
}

impl Loader {
    /// `tokens` must hold at least `context + 1` tokens.
    pub fn new(tokens: Vec<u32>, context: usize, batch: usize, seed: u64, pos: LoaderPos) -> Self {
        let mut l = Self { tokens, context, batch, seed, pos, offset: 0, order: Vec::new() };
        l.start_epoch();
        l
    }

    fn start_epoch(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ self.pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let t = self.context;
        self.offset = if self.tokens.len() > 2 * (t + 1) { rng.random_range(0..t) } else { 0 };
        let n = (self.tokens.len() - self.offset - 1) / t;
        self.order = (0..n as u32).collect();
        self.order.shuffle(&mut rng);
    }

    /// Windows per epoch.
    pub fn windows(&self) -> usize {
        self.order.len()
    }

    pub fn next_batch(&mut self) -> Batch {
        let (b, t) = (self.batch, self.context);
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for _ in 0..b {
            if self.pos.index as usize >= self.order.len() {
                self.pos = LoaderPos { epoch: self.pos.epoch + 1, index: 0 };
                self.start_epoch();
            }
            let start = self.offset + self.order[self.pos.index as usize] as usize * t;
            let w = &self.tokens[start..start + t + 1];
            inputs.extend(w[..t].iter().map(|&x| x as i64));
            targets.extend(w[1..].iter().map(|&x| x as i64));
            self.pos.index += 1;
        }
        Batch { inputs, targets, mask: vec![1.0; b * t], batch: b, context: t, tokens: b * t, starts: None, pairs: None }
    }
}

/// Fixed validation batches: `n` batches of windows spread evenly over `tokens`.
pub fn validation_batches(tokens: &[u32], context: usize, batch: usize, n: usize) -> Vec<Batch> {
    let windows = n * batch;
    let span = tokens.len().saturating_sub(context + 1);
    let mut out = Vec::with_capacity(n);
    for bi in 0..n {
        let mut inputs = Vec::with_capacity(batch * context);
        let mut targets = Vec::with_capacity(batch * context);
        for r in 0..batch {
            let i = bi * batch + r;
            let start = if windows > 1 { i * span / (windows - 1) } else { 0 };
            let w = &tokens[start..start + context + 1];
            inputs.extend(w[..context].iter().map(|&x| x as i64));
            targets.extend(w[1..].iter().map(|&x| x as i64));
        }
        out.push(Batch { inputs, targets, mask: vec![1.0; batch * context], batch, context, tokens: batch * context, starts: None, pairs: None });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_resumable_and_covering() {
        let tokens: Vec<u32> = (0..1000).collect();
        let mut a = Loader::new(tokens.clone(), 8, 4, 42, LoaderPos::default());
        let first: Vec<Batch> = (0..40).map(|_| a.next_batch()).collect();
        assert!(a.pos.epoch >= 1, "40 batches of 4 windows span more than one epoch of ~124");
        // Targets are inputs shifted by one.
        assert_eq!(first[0].inputs[1..8], first[0].targets[..7]);
        // Resuming from a recorded position reproduces the rest exactly.
        let mut b = Loader::new(tokens.clone(), 8, 4, 42, LoaderPos::default());
        for _ in 0..17 {
            b.next_batch();
        }
        let mut c = Loader::new(tokens.clone(), 8, 4, 42, b.pos);
        for want in &first[17..] {
            assert_eq!(&c.next_batch(), want);
        }
        // Another seed, another order.
        let mut d = Loader::new(tokens, 8, 4, 43, LoaderPos::default());
        assert_ne!(d.next_batch(), first[0]);
    }

    #[test]
    fn validation_windows_are_in_range() {
        let tokens: Vec<u32> = (0..100).collect();
        let v = validation_batches(&tokens, 10, 3, 4);
        assert_eq!(v.len(), 4);
        assert_eq!(*v[3].targets.last().unwrap(), 99);
        assert_eq!(v[0].inputs[0], 0);
    }
}
