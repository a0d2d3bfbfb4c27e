//! Where the threads' gradients go. Each thread runs the backward pass on its own sequences,
//! and the step's gradient is their sum, added in a fixed order (shard 0's, then shard 1's, ...)
//! so that a step is bit-reproducible. Summing at the end would need a full-size gradient buffer
//! per thread; instead the flat buffer is cut into regions ([`Layout::regions`]: the embedding,
//! each layer, the final norm with the head) that the backward pass finishes one after another.
//!
//! - Shard 0 writes into the caller's buffer directly.
//! - Shard i > 0 writes a region into scratch and, when it has finished it ([`Grads::commit`]),
//!   waits until shards 0..i have committed that region, then adds its scratch in.
//!
//! The sums are the same additions in the same order as adding whole buffers at the end, so the
//! bits are the same; a thread holds at most the embedding's gradient and one layer's of its own.
//! Shard i waits only for shards below it, and shard 0 for none; rayon runs the left half of a
//! split first, so a waiting shard never blocks the one it waits for.
//!
//! [`Layout::regions`]: super::layout::Layout::regions

use std::ops::{Deref, DerefMut, Range};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::ops::add_into;
use super::pool::Pool;

pub(super) struct Region<'a> {
    /// How many shards have committed this region.
    turn: usize,
    /// A shard panicked before committing (the others stop waiting, and panic too).
    failed: bool,
    buf: &'a mut [f32],
}

/// The caller's gradient buffer, cut into regions.
pub(super) struct Sink<'a> {
    ranges: Vec<Range<usize>>,
    regions: Vec<(Mutex<Region<'a>>, Condvar)>,
}

impl<'a> Sink<'a> {
    /// `ranges` must cover `out` from start to end, in order.
    pub(super) fn new(out: &'a mut [f32], ranges: Vec<Range<usize>>) -> Self {
        let mut rest = out;
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let (buf, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
            regions.push((Mutex::new(Region { turn: 0, failed: false, buf }), Condvar::new()));
            rest = tail;
        }
        assert!(rest.is_empty() && ranges.first().is_none_or(|r| r.start == 0), "regions must cover the gradient buffer");
        Self { ranges, regions }
    }

    /// Shard `shard`'s handle.
    pub(super) fn writer(&self, shard: usize) -> Grads<'_, 'a> {
        Grads { sink: self, shard, scratch: (0..self.ranges.len()).map(|_| None).collect() }
    }
}

fn lock<'s, 'a>(m: &'s Mutex<Region<'a>>) -> MutexGuard<'s, Region<'a>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One shard's gradients, region by region.
pub(super) struct Grads<'s, 'a> {
    sink: &'s Sink<'a>,
    shard: usize,
    /// Shard > 0: the regions it has written and not yet committed.
    scratch: Vec<Option<Vec<f32>>>,
}

/// A region's gradients, indexed from the region's start (see [`Grads::start`]).
pub(super) enum Open<'g, 'a> {
    Direct(MutexGuard<'g, Region<'a>>),
    Scratch(&'g mut [f32]),
}

impl Deref for Open<'_, '_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Open::Direct(g) => &*g.buf,
            Open::Scratch(s) => s,
        }
    }
}

impl DerefMut for Open<'_, '_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Open::Direct(g) => &mut *g.buf,
            Open::Scratch(s) => s,
        }
    }
}

impl<'a> Grads<'_, 'a> {
    /// Where region `r` begins in the flat buffer.
    pub(super) fn start(&self, r: usize) -> usize {
        self.sink.ranges[r].start
    }

    /// Region `r`'s gradients to add to (shard 0: the sum itself; others: zeroed scratch on
    /// first use). Open one region at a time.
    pub(super) fn open(&mut self, r: usize, pool: &mut Pool) -> Open<'_, 'a> {
        if self.shard == 0 {
            return Open::Direct(lock(&self.sink.regions[r].0));
        }
        let n = self.sink.ranges[r].len();
        Open::Scratch(self.scratch[r].get_or_insert_with(|| pool.zeros(n)))
    }

    /// This shard has finished region `r`: once the shards below it have committed it, its
    /// scratch is added to the sum. Every shard commits every region once.
    pub(super) fn commit(&mut self, r: usize, pool: &mut Pool) {
        let (m, cv) = &self.sink.regions[r];
        let mut g = lock(m);
        while g.turn != self.shard {
            // A shard below panicked: stop waiting (its panic is the one to report).
            assert!(!g.failed, "another thread's backward pass failed");
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(s) = self.scratch[r].take() {
            add_into(&mut *g.buf, &s);
            pool.put([s]);
        }
        g.turn += 1;
        cv.notify_all();
    }
}

impl Drop for Grads<'_, '_> {
    /// A shard that panics releases the others from waiting on it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (m, cv) in &self.sink.regions {
                lock(m).failed = true;
                cv.notify_all();
            }
        }
    }
}
