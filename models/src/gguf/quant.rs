//! ggml tensor types to f32. Block formats (ggml-common.h):
//! - F32, F16, BF16: one value per 4 or 2 bytes, little-endian.
//! - Q8_0: blocks of 32, `f16 d` then 32 `i8` codes: `x = d·q`.
//! - Q4_0: blocks of 32, `f16 d` then 16 bytes of 4-bit codes: `x = d·(q − 8)`.
//! - Q4_1: blocks of 32, `f16 d`, `f16 m` then 16 bytes of 4-bit codes: `x = d·q + m`.
//!
//! In both 4-bit formats byte `j` holds element `j` in its low nibble and element `j + 16` in its
//! high nibble.

use crate::checkpoint::f16_to_f32;

/// What [`dequantize`] reads, for error hints.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0 and Q4_1";

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const BF16: u32 = 30;
const BLOCK: usize = 32;

/// The name of a ggml type id (ggml.h's `ggml_type`), for messages.
pub fn type_name(t: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
        "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",
    ];
    NAMES.get(t as usize).map(|s| s.to_string()).unwrap_or_else(|| format!("type {t}"))
}

/// (elements, bytes) per block of a type Kiln reads.
fn block(t: u32) -> Option<(usize, usize)> {
    match t {
        F32 => Some((1, 4)),
        F16 | BF16 => Some((1, 2)),
        Q8_0 => Some((BLOCK, 2 + BLOCK)),
        Q4_0 => Some((BLOCK, 2 + BLOCK / 2)),
        Q4_1 => Some((BLOCK, 4 + BLOCK / 2)),
        _ => None,
    }
}

/// Bytes that `n` elements of type `t` take. An unsupported type is an error naming it.
pub fn byte_size(t: u32, n: usize) -> Result<usize, String> {
    let (per, bytes) = block(t).ok_or_else(|| format!("{} is not supported (Kiln reads {SUPPORTED})", type_name(t)))?;
    if n % per != 0 {
        return Err(format!("{n} elements are not a whole number of {} blocks of {per}", type_name(t)));
    }
    (n / per).checked_mul(bytes).ok_or_else(|| format!("{n} elements overflow"))
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// `n` values of type `t` from `raw`, which holds exactly [`byte_size`]`(t, n)` bytes.
pub fn dequantize(t: u32, raw: &[u8], n: usize) -> Result<Vec<f32>, String> {
    if byte_size(t, n)? != raw.len() {
        return Err(format!("{} bytes for {n} {} values", raw.len(), type_name(t)));
    }
    let mut out = Vec::with_capacity(n);
    match t {
        F32 => out.extend(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        F16 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        BF16 => out.extend(raw.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))),
        Q8_0 => {
            for b in raw.chunks_exact(2 + BLOCK) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        Q4_0 | Q4_1 => {
            let header = if t == Q4_0 { 2 } else { 4 };
            for b in raw.chunks_exact(header + BLOCK / 2) {
                let d = f16_at(b, 0);
                // Q4_0 centres its codes on 8; Q4_1 adds a per-block minimum instead.
                let (sub, m) = if t == Q4_0 { (8.0, 0.0) } else { (0.0, f16_at(b, 2)) };
                let qs = &b[header..];
                out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as f32 - sub) + m));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as f32 - sub) + m));
            }
        }
        _ => unreachable!("byte_size accepted only the types above"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 bits of a few exact values.
    const H_HALF: [u8; 2] = [0x00, 0x38]; // 0.5
    const H_TWO: [u8; 2] = [0x00, 0x40]; // 2.0
    const H_NEG1: [u8; 2] = [0x00, 0xbc]; // -1.0

    #[test]
    fn q8_0_block() {
        let mut b = H_HALF.to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(Q8_0, &b, 32).unwrap();
        assert_eq!(v[0], -8.0);
        assert_eq!(v[16], 0.0);
        assert_eq!(v[31], 7.5);
    }

    #[test]
    fn q4_0_block_nibble_order() {
        // Byte j: low nibble = element j, high nibble = element j + 16.
        let mut b = H_TWO.to_vec();
        b.extend((0..16).map(|j| (j as u8) | ((15 - j as u8) << 4)));
        let v = dequantize(Q4_0, &b, 32).unwrap();
        assert_eq!(v[0], 2.0 * (0.0 - 8.0));
        assert_eq!(v[15], 2.0 * (15.0 - 8.0));
        assert_eq!(v[16], 2.0 * (15.0 - 8.0));
        assert_eq!(v[31], 2.0 * (0.0 - 8.0));
    }

    #[test]
    fn q4_1_block_scale_and_minimum() {
        let mut b = H_HALF.to_vec();
        b.extend(H_NEG1);
        b.extend((0..16).map(|j| (j as u8) | (3 << 4)));
        let v = dequantize(Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], 0.5 * j as f32 - 1.0);
            assert_eq!(v[16 + j], 0.5 * 3.0 - 1.0);
        }
        // Two blocks read independently.
        let two = [b.clone(), b].concat();
        assert_eq!(dequantize(Q4_1, &two, 64).unwrap()[32..], v[..]);
    }

    #[test]
    fn plain_floats() {
        assert_eq!(dequantize(F16, &[0x00, 0x3c, 0x00, 0xc0], 2).unwrap(), vec![1.0, -2.0]);
        assert_eq!(dequantize(BF16, &[0x80, 0x3f, 0x40, 0xc0], 2).unwrap(), vec![1.0, -3.0]);
        assert_eq!(dequantize(F32, &1.25f32.to_le_bytes(), 1).unwrap(), vec![1.25]);
    }

    #[test]
    fn unsupported_and_partial_blocks_are_errors() {
        let e = byte_size(14, 256).unwrap_err();
        assert!(e.contains("Q6_K") && e.contains("Q4_1"), "{e}");
        assert!(byte_size(Q4_1, 33).unwrap_err().contains("blocks of 32"));
        assert!(dequantize(Q8_0, &[0; 33], 32).is_err());
    }
}
