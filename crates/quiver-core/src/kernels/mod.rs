//! Fused CPU kernels for the elementwise parts of a forward and backward
//! pass: SiLU-gated products (the MLP), the scaled causal softmax of
//! attention, and the cross-entropy's softmax over the vocabulary.
//!
//! candle runs these as chains of separate ops, each a full pass over
//! memory with a scalar `exp` per element; on a CPU these passes cost a
//! large share of a step once the matmuls are fast. Each kernel here is
//! one pass (two for a softmax row) with an 8-lane AVX2 + FMA `exp` where
//! the CPU has it, the portable scalar loop elsewhere, and work split over
//! candle's thread pool (the one its matmuls use) when a tensor is large
//! enough to pay for it. [`crate::ops`] wraps them as differentiable ops
//! and tests them against the plain compositions.
//!
//! One file per op family: `elementwise` (the SiLU-gated product, RMSNorm's
//! backward, `add_into`, `axpy`, `dot`), `attention`, `cross_entropy`,
//! `dropout`, `lora` (the fused down-projection), `routing` (the routed
//! layer's inner loops), the quantized decoding kernels [`q4`] and [`q8`],
//! and [`gemm`]; `slice` dispatches the shared slice primitives to `simd`
//! (AVX2 + FMA) or the portable loops. The kernels are re-exported here:
//! callers name them `kernels::silu_mul` and so on.

mod attention;
mod cross_entropy;
mod dropout;
mod elementwise;
pub mod gemm;
mod lora;
pub mod q4;
pub mod q8;
pub(crate) mod routing;
#[cfg(target_arch = "x86_64")]
mod simd;
mod slice;
#[cfg(test)]
mod tests;

pub use attention::{attend_one_query, causal_softmax, softmax_backward};
pub use cross_entropy::{logsumexp_rows, softmax_minus_onehot};
pub use dropout::{dropout, dropout_keeps, dropout_threshold};
pub use elementwise::{add_into, axpy, dot, rms_norm_backward, silu_mul, silu_mul_backward};
pub use lora::{lora_down, lora_down_backward, LoraDown};

use std::ops::Range;

/// Below this many elements a kernel runs on the calling thread: waking
/// the pool costs more than the work.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Whether the 8-lane kernels can run (checked once, then cached by std).
#[inline]
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw pointer that may cross threads: every user writes only the rows
/// of the range it was handed, so writes never overlap.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: see the type's documentation; each range is written by one thread.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// # Safety
    /// `rows` times `cols` must lie inside the buffer, and no other thread
    /// may touch those rows while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, rows: &Range<usize>, cols: usize) -> &mut [f32] {
        // SAFETY: guaranteed by the caller.
        unsafe { self.span(rows.start * cols, rows.len() * cols) }
    }

    /// # Safety
    /// `lo..lo + len` must lie inside the buffer, and no other thread may
    /// touch it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn span(&self, lo: usize, len: usize) -> &mut [f32] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(lo), len) }
    }
}

/// Calls `f` on ranges of rows covering `0..n_rows`, in parallel when the
/// work is large: on rayon's pool, the one the matrix products run on
/// (candle's elementwise ops use a second pool, whose idle workers spin
/// and take cores from the products that run right after a kernel).
fn par_rows(n_rows: usize, cols: usize, f: impl Fn(Range<usize>) + Sync) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    if n_rows < 2 || n_rows * cols < PAR_MIN_ELEMS || threads < 2 {
        f(0..n_rows);
        return;
    }
    // A few pieces per thread evens out the tail.
    let per = n_rows.div_ceil(threads * 4).max(1);
    (0..n_rows.div_ceil(per))
        .into_par_iter()
        .for_each(|c| f(c * per..((c + 1) * per).min(n_rows)));
}

/// [`par_rows`] on candle's spinning pool, for the per-token work of
/// decoding (one-query attention, quantized matrix-vector products):
/// hundreds of short calls per token, where waking rayon's sleeping
/// workers would cost more than the work.
fn par_rows_decode(n_rows: usize, cols: usize, f: impl Fn(Range<usize>) + Sync) {
    if n_rows < 2 || n_rows * cols < PAR_MIN_ELEMS {
        f(0..n_rows);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n_rows, f);
}

/// Hints the cache lines of the `len` bytes at `at` into L1, for loops
/// whose next reads the hardware prefetcher cannot guess (a new row, a
/// jump between streams). A hint: an address past the data is harmless
/// (no fault, no read), so callers may look ahead past their slices.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(at: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: SSE is part of x86-64; prefetching never faults and the
        // pointer is not dereferenced.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                at.wrapping_add(off) as *const i8,
            )
        };
        off += 64;
    }
}

/// How far ahead of the block being read the quantized decoding kernels
/// ask for their weights: 1280 bytes (8 pairs of Q4_1 blocks). Decoding
/// streams every weight from memory once per token; with the hint the Q4_1
/// generation benchmark went from 94-100 to 108-119 tokens/s on the 2-core
/// development VM (640 and 2560 bytes ahead: less).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 1280;

/// Splits a flat elementwise job into rows of this length for [`par_rows`].
const FLAT_ROW: usize = 1024;
