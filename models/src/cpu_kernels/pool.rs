//! Reused activation buffers, one pool per thread.

/// Reused activation buffers, so that a step allocates (and page-faults) nothing after the first.
#[derive(Default)]
pub(super) struct Pool(Vec<Vec<f32>>);

impl Pool {
    /// A zeroed buffer of `n` values: the smallest free one that fits, else a new one.
    pub(super) fn zeros(&mut self, n: usize) -> Vec<f32> {
        let mut v = self.any(n);
        v.fill(0.0);
        v
    }
    /// A buffer of `n` values whose contents are left over from earlier use: for outputs that
    /// are written in full before they are read.
    pub(super) fn any(&mut self, n: usize) -> Vec<f32> {
        let best = (0..self.0.len()).filter(|&i| self.0[i].capacity() >= n).min_by_key(|&i| self.0[i].capacity());
        let mut v = best.map(|i| self.0.swap_remove(i)).unwrap_or_default();
        if v.len() > n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        v
    }
    pub(super) fn copy(&mut self, src: &[f32]) -> Vec<f32> {
        let mut v = self.any(src.len());
        v.copy_from_slice(src);
        v
    }
    pub(super) fn put(&mut self, bufs: impl IntoIterator<Item = Vec<f32>>) {
        self.0.extend(bufs);
    }
}
