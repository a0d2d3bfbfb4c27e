//! The vocabulary padded to a multiple of 64 or 128 for aligned matmuls (`train.pad_vocab`).
//!
//! GPT-2's 50,257 tokens are odd: the head's matmul `[N, D]·[D, V]` then runs with vector width 1
//! on a GPU, and nanoGPT gained about a quarter of its step by padding to 50,304. Here the
//! embedding `[V, D]` and the head `[D, V]` of a model in training hold `Vp ≥ V` rows and
//! columns, the extra ones zero; everything outside the model keeps the true size `V`:
//! - the logits are the first `V` columns of the head's output (`Llama::forward` narrows them),
//!   so the loss, sampling and evals never see a padded column, and the padded weights get a
//!   zero gradient (the narrow's backward) and stay zero under AdamW;
//! - checkpoints, exports and optimizer state are written at the true size
//!   (`params::visit_base` narrows the two parameters, [`VocabPad::unpad_flat`] the moments) and
//!   padded again when loaded;
//! - throughput counts the true model's FLOPs (`LlamaConfig` is unchanged).

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::llama::Llama;

/// The embedding's Hugging Face name: `[V, D]`, padded by rows.
pub const EMBED: &str = "model.embed_tokens.weight";
/// The head's: `[D, V]` in Burn's layout, padded by columns.
pub const HEAD: &str = "lm_head.weight";

/// A vocabulary of `vocab` tokens held as `padded` rows (embedding) and columns (head) of width
/// `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabPad {
    pub vocab: usize,
    pub padded: usize,
    pub d: usize,
}

impl VocabPad {
    /// The padding of `vocab` to a multiple of `multiple`; `None` where there is none to add
    /// (`multiple` 0 or 1, or `vocab` already a multiple).
    pub fn new(vocab: usize, multiple: usize, d: usize) -> Option<Self> {
        let padded = vocab.div_ceil(multiple.max(1)) * multiple.max(1);
        (padded > vocab).then_some(Self { vocab, padded, d })
    }

    /// Whether parameter `name` is one of the two padded ones.
    pub fn pads(name: &str) -> bool {
        name == EMBED || name == HEAD
    }

    /// The values of parameter `name` (flattened, row-major in Burn's layout) at the padded
    /// size: zero rows appended to the embedding, zero columns to each of the head's rows.
    /// Other parameters, and values already padded, are returned as they are.
    pub fn pad_flat(&self, name: &str, values: Vec<f32>) -> Vec<f32> {
        let (v, vp, d) = (self.vocab, self.padded, self.d);
        match name {
            _ if values.len() != v * d => values,
            EMBED => {
                let mut out = values;
                out.resize(vp * d, 0.0); // [Vp, D]
                out
            }
            HEAD => {
                let mut out = vec![0.0f32; d * vp]; // [D, Vp]
                for (row, src) in out.chunks_exact_mut(vp).zip(values.chunks_exact(v)) {
                    row[..v].copy_from_slice(src);
                }
                out
            }
            _ => values,
        }
    }

    /// The inverse of [`VocabPad::pad_flat`]: the true-size values of a padded parameter.
    pub fn unpad_flat(&self, name: &str, values: Vec<f32>) -> Vec<f32> {
        let (v, vp, d) = (self.vocab, self.padded, self.d);
        match name {
            _ if values.len() != vp * d => values,
            EMBED => {
                let mut out = values;
                out.truncate(v * d); // [V, D]
                out
            }
            HEAD => values.chunks_exact(vp).flat_map(|row| row[..v].iter().copied()).collect(), // [D, V]
            _ => values,
        }
    }

    /// A padded parameter's tensor narrowed to its true size (`D` is 2 for both).
    pub fn narrow<B: Backend, const D: usize>(&self, name: &str, t: Tensor<B, D>) -> Tensor<B, D> {
        match name {
            EMBED if t.dims()[0] == self.padded => t.narrow(0, 0, self.vocab),
            HEAD if D == 2 && t.dims()[1] == self.padded => t.narrow(1, 0, self.vocab),
            _ => t,
        }
    }
}

impl<B: Backend> Llama<B> {
    /// The model with its embedding and head padded to a multiple of `multiple` tokens (zero
    /// rows and columns, trainable as the true ones are, never read: see the module docs). A
    /// model already padded, or whose vocabulary is a multiple, is returned unchanged.
    pub fn pad_vocab(mut self, multiple: usize) -> Self {
        let [v, d] = self.model.embed_tokens.dims();
        if v != self.vocab {
            return self; // already padded
        }
        let Some(pad) = VocabPad::new(v, multiple, d) else { return self };
        let extra = pad.padded - pad.vocab;
        self.model.embed_tokens = grow(self.model.embed_tokens, 0, extra); // [Vp, D]
        self.lm_head = self.lm_head.map(|h| grow(h, 1, extra)); // [D, Vp]
        self
    }

    /// How the vocabulary is padded, if it is.
    pub fn vocab_pad(&self) -> Option<VocabPad> {
        let [vp, d] = self.model.embed_tokens.dims();
        (vp > self.vocab).then_some(VocabPad { vocab: self.vocab, padded: vp, d })
    }
}

/// `p` with `extra` zero rows (`dim` 0) or columns (`dim` 1) appended, as a leaf parameter with
/// the same id and the same `require_grad` (a frozen base stays frozen), in its dtype.
fn grow<B: Backend>(p: Param<Tensor<B, 2>>, dim: usize, extra: usize) -> Param<Tensor<B, 2>> {
    p.map(|t| {
        let trains = t.is_require_grad();
        let [r, c] = t.dims();
        let shape = if dim == 0 { [extra, c] } else { [r, extra] };
        let zeros = Tensor::<B, 2>::zeros(shape, (&t.device(), t.dtype()));
        // A leaf again (`detach`): the padded tensor is the parameter, not a function of it.
        Tensor::cat(vec![t, zeros], dim).detach().set_require_grad(trains)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_padding_round_trips_and_places_the_zeros() {
        let p = VocabPad::new(3, 4, 2).unwrap();
        assert_eq!((p.vocab, p.padded), (3, 4));
        assert_eq!(VocabPad::new(64, 64, 2), None);
        assert_eq!(VocabPad::new(65, 1, 2), None);
        assert_eq!(VocabPad::new(50257, 64, 8).unwrap().padded, 50304);
        let embed = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [3, 2]
        assert_eq!(p.pad_flat(EMBED, embed.clone()), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]);
        let head = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
        assert_eq!(p.pad_flat(HEAD, head.clone()), vec![1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0]);
        assert_eq!(p.unpad_flat(EMBED, p.pad_flat(EMBED, embed.clone())), embed);
        assert_eq!(p.unpad_flat(HEAD, p.pad_flat(HEAD, head.clone())), head);
        // Other parameters pass through; padded values are not padded twice.
        assert_eq!(p.pad_flat("model.norm.weight", vec![1.0; 6]), vec![1.0; 6]);
        assert_eq!(p.pad_flat(EMBED, vec![0.0; 8]).len(), 8);
    }
}
