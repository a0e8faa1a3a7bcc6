//! Inverted dropout with a counter-based mask that is recomputed, never
//! stored.

use super::{par_rows, Shared, FLAT_ROW};

/// Whether dropout with drop probability `p` keeps element `i` of the
/// tensor drawn with `seed`: a counter-based hash (murmur3's 32-bit
/// finaliser of the index mixed with the seed), so a mask is never stored:
/// the backward pass recomputes it, and threads draw their parts in any
/// order.
#[inline(always)]
pub fn dropout_keeps(seed: u32, i: usize, threshold: u32) -> bool {
    keeps(i as u32, dropout_seed(seed, i), threshold)
}

/// The seed mixed with the high half of the index (constant over any run
/// of indices that [`dropout`] handles in one piece).
#[inline(always)]
fn dropout_seed(seed: u32, i: usize) -> u32 {
    seed ^ ((i as u64 >> 32) as u32).wrapping_mul(0x85eb_ca6b)
}

#[inline(always)]
fn keeps(i: u32, seed: u32, threshold: u32) -> bool {
    let mut h = i.wrapping_mul(0x9e37_79b9) ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h >= threshold
}

/// The threshold [`dropout_keeps`] compares with for drop probability `p`.
pub fn dropout_threshold(p: f32) -> u32 {
    (p.clamp(0.0, 1.0) as f64 * u32::MAX as f64) as u32
}

/// A dropout mask: the seed of [`dropout_keeps`], its threshold and the
/// scale of kept values.
#[derive(Clone, Copy)]
pub(super) struct Mask {
    seed: u32,
    threshold: u32,
    inv_keep: f32,
}

impl Mask {
    pub(super) fn new(seed: u32, p: f32) -> Self {
        Self {
            seed,
            threshold: dropout_threshold(p),
            inv_keep: 1.0 / (1.0 - p),
        }
    }
}

/// One piece of [`dropout`]: `y[k] = src(k) * keep(first + k) / (1 - p)`.
/// Branch-free over plain `u32` arithmetic, so the compiler vectorises it.
#[inline(always)]
fn dropout_span(x: Option<&[f32]>, y: &mut [f32], first: usize, m: Mask) {
    let (base, seed) = (first as u32, dropout_seed(m.seed, first));
    let scale = |k: usize| {
        if keeps(base.wrapping_add(k as u32), seed, m.threshold) {
            m.inv_keep
        } else {
            0.0
        }
    };
    match x {
        Some(x) => {
            for (k, (o, &v)) in y.iter_mut().zip(x).enumerate() {
                *o = v * scale(k);
            }
        }
        None => {
            for (k, o) in y.iter_mut().enumerate() {
                *o *= scale(k);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dropout_span_avx2(x: Option<&[f32]>, y: &mut [f32], first: usize, m: Mask) {
    dropout_span(x, y, first, m)
}

/// Inverted dropout, `y = x * keep / (1 - p)` with the mask of
/// [`dropout_keeps`]; `x = None` applies it to `y` in place.
pub fn dropout(x: Option<&[f32]>, y: &mut [f32], seed: u32, p: f32) {
    if let Some(x) = x {
        assert_eq!(x.len(), y.len(), "dropout: lengths");
    }
    let n = y.len();
    let mask = Mask::new(seed, p);
    let out = Shared(y.as_mut_ptr());
    par_rows(n.div_ceil(FLAT_ROW), FLAT_ROW, |rows| {
        let (lo, hi) = (rows.start * FLAT_ROW, (rows.end * FLAT_ROW).min(n));
        // SAFETY: lo..hi is this call's own part of `y`.
        let y = unsafe { out.span(lo, hi - lo) };
        dropout_piece(x.map(|x| &x[lo..hi]), y, lo, mask);
    });
}

/// [`dropout`] of the elements `first..first + y.len()` of a tensor, on
/// the calling thread: split where the index crosses a multiple of 2^32
/// (where the seed's mix changes).
pub(super) fn dropout_piece(x: Option<&[f32]>, y: &mut [f32], first: usize, m: Mask) {
    let mut at = 0;
    while at < y.len() {
        let i = first + at;
        let len = ((y.len() - at) as u64).min((i as u64 | 0xffff_ffff) + 1 - i as u64) as usize;
        let (xs, ys) = (x.map(|x| &x[at..at + len]), &mut y[at..at + len]);
        #[cfg(target_arch = "x86_64")]
        if super::avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { dropout_span_avx2(xs, ys, i, m) };
            at += len;
            continue;
        }
        dropout_span(xs, ys, i, m);
        at += len;
    }
}
