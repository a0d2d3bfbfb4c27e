//! Packing: several examples in one row of the batch. An example of `n` tokens takes `n − 1`
//! positions (its inputs, with its targets and loss mask beside them), so a row holds examples
//! whose positions sum to at most the context. Best-fit decreasing: the longest example first,
//! each into the row it fills most tightly. Attention stays inside each example and positions
//! restart at each: every position carries the index of its example's first position
//! (`Batch::starts`), which both engines read as a block-diagonal causal mask and RoPE offset.

use super::loader::Batch;
use super::sft::Example;

/// Rows of example indices: best-fit decreasing into rows of `capacity` positions.
pub fn best_fit_decreasing(examples: &[Example], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let len = |i: usize| examples[i].ids.len() - 1;
    // Longest first; ties by index, so the packing is the same on every run.
    order.sort_by(|&a, &b| len(b).cmp(&len(a)).then(a.cmp(&b)));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new(); // (free positions, examples)
    for i in order {
        let n = len(i);
        let best = rows.iter_mut().filter(|(free, _)| *free >= n).min_by_key(|(free, _)| *free);
        match best {
            Some((free, row)) => {
                *free -= n;
                row.push(i);
            }
            None => rows.push((capacity.saturating_sub(n), vec![i])),
        }
    }
    rows.into_iter().map(|(_, r)| r).collect()
}

/// A batch of rows, each the concatenation of its examples, right-padded to the longest row.
/// `starts[p]` is where position `p`'s example begins in its row (a padding position starts at
/// itself: it attends to itself alone, and carries no loss).
pub fn packed_batch(examples: &[Example], rows: &[&[usize]], pad: u32) -> Batch {
    let width = |r: &[usize]| r.iter().map(|&i| examples[i].ids.len() - 1).sum::<usize>();
    let t = rows.iter().map(|r| width(r)).max().unwrap_or(1).max(1);
    let b = rows.len();
    let (mut inputs, mut targets, mut mask, mut starts) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    let mut tokens = 0;
    for row in rows {
        let mut at = 0;
        for &i in row.iter() {
            let e = &examples[i];
            let n = e.ids.len() - 1;
            inputs.extend(e.ids[..n].iter().map(|&x| x as i64));
            targets.extend(e.ids[1..].iter().map(|&x| x as i64));
            mask.extend(e.loss_mask[1..].iter().map(|&m| m as u8 as f32));
            starts.extend(std::iter::repeat_n(at as u32, n));
            at += n;
        }
        tokens += at;
        inputs.extend(std::iter::repeat_n(pad as i64, t - at));
        targets.extend(std::iter::repeat_n(pad as i64, t - at));
        mask.extend(std::iter::repeat_n(0.0, t - at));
        starts.extend((at..t).map(|p| p as u32));
    }
    Batch { inputs, targets, mask, batch: b, context: t, tokens, starts: Some(starts), pairs: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize) -> Example {
        Example { ids: (0..n as u32).collect(), loss_mask: vec![true; n] }
    }

    #[test]
    fn best_fit_decreasing_fills_rows_tightly() {
        // Positions 7, 5, 4, 3, 2, 1 into rows of 8: [7, 1], [5, 3], [4, 2].
        let exs: Vec<Example> = [5, 8, 2, 6, 4, 3].iter().map(|&n| ex(n)).collect();
        let rows = best_fit_decreasing(&exs, 8);
        let widths: Vec<Vec<usize>> = rows.iter().map(|r| r.iter().map(|&i| exs[i].ids.len() - 1).collect()).collect();
        assert_eq!(widths, vec![vec![7, 1], vec![5, 3], vec![4, 2]]);
        let mut all: Vec<usize> = rows.concat();
        all.sort();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn packed_rows_restart_positions_and_pad() {
        let exs = vec![ex(3), ex(4), ex(2)];
        let rows: Vec<&[usize]> = vec![&[0, 1], &[2]];
        let b = packed_batch(&exs, &rows, 99);
        assert_eq!((b.batch, b.context, b.tokens), (2, 5, 6));
        assert_eq!(b.starts.as_deref(), Some(&[0, 0, 2, 2, 2, 0, 1, 2, 3, 4][..]));
        assert_eq!(b.inputs, vec![0, 1, 0, 1, 2, 0, 99, 99, 99, 99]);
        assert_eq!(b.targets, vec![1, 2, 1, 2, 3, 1, 99, 99, 99, 99]);
        assert_eq!(b.mask, vec![1., 1., 1., 1., 1., 1., 0., 0., 0., 0.]);
    }
}
