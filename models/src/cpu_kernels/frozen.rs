//! The weights the passes read: the flat f32 buffer, or, for a frozen LoRA base, the same
//! layout in a half type, bf16 or f16 (half the memory), decoded a layer (or a slice of the
//! vocabulary) at a time.
//!
//! bf16 is the top half of an f32, so decoding is exact and cheap (a shift); f16 decodes exactly
//! too (every f16 is an f32). The base is rounded once, when it is stored. Only a frozen base
//! may be in a half type: nothing writes to it.

use super::layout::{LayerAt, Layout};

/// Vocabulary rows decoded at a time for the head (about 1.2M values for SmolLM2's width).
const HEAD_CHUNK: usize = 2048;

/// The model's weights in the flat layout.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    /// The bits of a half type ([`Half::encode`]), for a frozen base.
    Half(&'a [u16], Half),
}

/// The half types a frozen base may be held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

impl Half {
    /// `x` rounded to this type's bits (to nearest even; f16 saturates to ±inf beyond 65,504).
    pub fn encode(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => crate::checkpoint::f32_to_bf16(x),
            Half::F16 => half::f16::from_f32(x).to_bits(),
        }
    }

    /// The f32 of this type's bits (exact).
    #[inline(always)]
    pub fn decode(self, b: u16) -> f32 {
        match self {
            Half::Bf16 => bf16_to_f32(b),
            Half::F16 => half::f16::from_bits(b).to_f32(),
        }
    }

    /// `out` extended by the f32s of `src` (the type's match taken once, not per value).
    #[inline(always)]
    pub fn decode_into(self, src: &[u16], out: &mut Vec<f32>) {
        match self {
            Half::Bf16 => out.extend(src.iter().map(|&b| bf16_to_f32(b))),
            Half::F16 => out.extend(src.iter().map(|&b| half::f16::from_bits(b).to_f32())),
        }
    }
}

impl<'a> Weights<'a> {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Half(w, _) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` values from flat index `off`, as f32: borrowed, or decoded into `buf`.
    #[inline(always)]
    pub(super) fn span<'b>(&'b self, off: usize, n: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        match self {
            Weights::F32(w) => &w[off..off + n],
            Weights::Half(w, h) => {
                buf.clear();
                h.decode_into(&w[off..off + n], buf);
                buf
            }
        }
    }

    /// Layer `l`'s weights and where they sit in the returned slice: the whole f32 buffer with
    /// `at` as it is, or the layer's region decoded into `buf` with `at` counted from its start.
    #[inline(always)]
    pub(super) fn layer<'b>(&'b self, layout: &Layout, l: usize, buf: &'b mut Vec<f32>) -> (&'b [f32], LayerAt) {
        let at = layout.layers[l];
        match self {
            Weights::F32(w) => (w, at),
            Weights::Half(..) => {
                let end = layout.layers.get(l + 1).map_or(layout.norm, |next| next.ln1);
                let o = at.ln1;
                let rel = LayerAt { ln1: 0, wqkv: at.wqkv - o, wo: at.wo - o, ln2: at.ln2 - o, wgu: at.wgu - o, wd: at.wd - o };
                (self.span(o, end - o, buf), rel)
            }
        }
    }

    /// Whether the head must go through [`Weights::head_chunks`] (a half type) rather than one
    /// matmul.
    pub(super) fn chunked(&self) -> bool {
        matches!(self, Weights::Half(..))
    }

    /// The head's vocabulary rows `c0..c1` as `[c1 − c0, D]` (the tied embedding's rows, or the
    /// untied head's columns), decoded into `buf`; with them the logits of those columns are
    /// `h·chunkᵀ` and their share of the head's input gradient `dl·chunk`.
    pub(super) fn head_chunk<'b>(&self, layout: &Layout, c0: usize, c1: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let (d, v) = (layout.dims.d, layout.dims.vocab);
        buf.clear();
        match (self, layout.head) {
            (Weights::F32(_), _) => unreachable!("an f32 head is one matmul"),
            (Weights::Half(w, kind), None) => kind.decode_into(&w[layout.embed + c0 * d..layout.embed + c1 * d], buf),
            (Weights::Half(w, kind), Some(h)) => {
                // Head [D, V]: column c is vocabulary row c.
                buf.resize((c1 - c0) * d, 0.0);
                for k in 0..d {
                    for (j, c) in (c0..c1).enumerate() {
                        buf[j * d + k] = kind.decode(w[h + k * v + c]);
                    }
                }
            }
        }
        buf
    }

    /// The vocabulary cut into the chunks [`Weights::head_chunk`] decodes.
    pub(super) fn head_chunks(v: usize) -> impl Iterator<Item = (usize, usize)> {
        (0..v).step_by(HEAD_CHUNK).map(move |c0| (c0, (c0 + HEAD_CHUNK).min(v)))
    }
}
