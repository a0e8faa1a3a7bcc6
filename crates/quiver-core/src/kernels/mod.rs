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

/// `y = silu(g) * u = g * sigmoid(g) * u`, elementwise.
pub fn silu_mul(g: &[f32], u: &[f32], y: &mut [f32]) {
    assert!(
        g.len() == u.len() && g.len() == y.len(),
        "silu_mul: lengths"
    );
    let n = g.len();
    let out = Shared(y.as_mut_ptr());
    par_rows(n.div_ceil(FLAT_ROW), FLAT_ROW, |rows| {
        let (lo, hi) = (rows.start * FLAT_ROW, (rows.end * FLAT_ROW).min(n));
        // SAFETY: lo..hi is this call's own part of `y`.
        let y = unsafe { out.span(lo, hi - lo) };
        slice::silu_mul(&g[lo..hi], &u[lo..hi], y);
    });
}

/// Gradients of [`silu_mul`]: `dg = dy * u * s * (1 + g (1 - s))` and
/// `du = dy * g * s`, with `s = sigmoid(g)`.
pub fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g.len();
    assert!(
        u.len() == n && dy.len() == n && dg.len() == n && du.len() == n,
        "silu_mul_backward: lengths"
    );
    let (pg, pu) = (Shared(dg.as_mut_ptr()), Shared(du.as_mut_ptr()));
    par_rows(n.div_ceil(FLAT_ROW), FLAT_ROW, |rows| {
        let (lo, hi) = (rows.start * FLAT_ROW, (rows.end * FLAT_ROW).min(n));
        // SAFETY: lo..hi is this call's own part of `dg` and `du`.
        let (dg, du) = unsafe { (pg.span(lo, hi - lo), pu.span(lo, hi - lo)) };
        slice::silu_mul_backward(&g[lo..hi], &u[lo..hi], &dy[lo..hi], dg, du);
    });
}

/// Softmax of `scale * x` over each row of `cols` values, causally masked:
/// rows come in groups of `seq` queries (row `r` is query `r % seq`), and
/// query `i` sees keys `0..=offset + i` (`offset` keys were cached before
/// the first query); masked entries of `y` are 0.
pub fn causal_softmax(
    x: &[f32],
    y: &mut [f32],
    cols: usize,
    seq: usize,
    offset: usize,
    scale: f32,
) {
    assert!(
        x.len() == y.len() && cols > 0 && seq > 0,
        "causal_softmax: shapes"
    );
    assert!(x.len().is_multiple_of(cols), "causal_softmax: ragged rows");
    let out = Shared(y.as_mut_ptr());
    par_rows(x.len() / cols, cols, |rows| {
        // SAFETY: each range of rows is written by one call only.
        let y = unsafe { out.rows(&rows, cols) };
        for (k, r) in rows.enumerate() {
            let valid = (offset + r % seq + 1).min(cols);
            let (xr, yr) = (
                &x[r * cols..r * cols + valid],
                &mut y[k * cols..(k + 1) * cols],
            );
            let m = scale * slice::max(xr);
            let sum = slice::exp_affine(xr, scale, m, &mut yr[..valid]);
            slice::scale(&mut yr[..valid], 1.0 / sum);
            yr[valid..].fill(0.0);
        }
    });
}

/// Attention of one query per head over cached keys and values, as in
/// token-by-token decoding (no mask: the query is the last position).
///
/// For each of `heads` query heads `h` (of `head_dim` values each, in `q`
/// and in `out`), keys and values come from KV head `h / (heads / kv_heads)`
/// of `k` and `v`, laid out `(kv_heads, capacity, head_dim)` of which the
/// first `len` positions are used: `out_h = sum_j softmax_j(scale q_h .
/// k_j) v_j`. Small matmuls through a general GEMM cost more in dispatch
/// than in arithmetic at these sizes.
#[allow(clippy::too_many_arguments)]
pub fn attend_one_query(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    scale: f32,
) {
    let hd = head_dim;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads) && len > 0 && len <= capacity,
        "attend_one_query: heads or length"
    );
    assert!(
        q.len() == heads * hd && out.len() == heads * hd,
        "attend_one_query: q/out"
    );
    assert!(
        k.len() >= kv_heads * capacity * hd && v.len() >= kv_heads * capacity * hd,
        "attend_one_query: k/v"
    );
    let rep = heads / kv_heads;
    let dst = Shared(out.as_mut_ptr());
    par_rows_decode(heads, 2 * len * hd, |range| {
        let (mut s, mut p) = (vec![0f32; len], vec![0f32; len]);
        for h in range {
            let g = h / rep;
            let (kg, vg) = (&k[g * capacity * hd..], &v[g * capacity * hd..]);
            let qh = &q[h * hd..(h + 1) * hd];
            for (j, sj) in s.iter_mut().enumerate() {
                *sj = slice::dot(qh, &kg[j * hd..(j + 1) * hd]);
            }
            let m = scale * slice::max(&s);
            let sum = slice::exp_affine(&s, scale, m, &mut p);
            // SAFETY: head h's outputs are written by this call only.
            let oh = unsafe { dst.span(h * hd, hd) };
            oh.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                slice::axpy(pj / sum, &vg[j * hd..(j + 1) * hd], oh);
            }
        }
    });
}

/// Backward of a softmax of `scale * x` over rows of `cols`:
/// `dx = scale * y * (dy - <dy, y>)` (masked entries have `y = 0`).
pub fn softmax_backward(y: &[f32], dy: &[f32], dx: &mut [f32], cols: usize, scale: f32) {
    assert!(y.len() == dy.len() && y.len() == dx.len() && cols > 0 && y.len().is_multiple_of(cols));
    let out = Shared(dx.as_mut_ptr());
    par_rows(y.len() / cols, cols, |rows| {
        // SAFETY: each range of rows is written by one call only.
        let dx = unsafe { out.rows(&rows, cols) };
        for (k, r) in rows.enumerate() {
            let (yr, gr) = (&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
            let d = slice::dot(yr, gr);
            for ((o, &yv), &gv) in dx[k * cols..(k + 1) * cols].iter_mut().zip(yr).zip(gr) {
                *o = scale * yv * (gv - d);
            }
        }
    });
}

/// Backward of RMSNorm `y = x r w`, `r = 1 / sqrt(mean(x^2) + eps)`, over
/// rows of `w.len()` values: `dx = r (g w) - x r^3 mean(g w x)`, one pass
/// per row after two dot products (candle's composition is nine ops).
pub fn rms_norm_backward(x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32], eps: f32) {
    let cols = w.len();
    assert!(
        cols > 0 && x.len().is_multiple_of(cols) && g.len() == x.len() && dx.len() == x.len(),
        "rms_norm_backward: lengths"
    );
    let out = Shared(dx.as_mut_ptr());
    par_rows(x.len() / cols, cols, |rows| {
        // SAFETY: each range of rows is written by one call only.
        let dx = unsafe { out.rows(&rows, cols) };
        for (k, r) in rows.enumerate() {
            let (xr, gr) = (&x[r * cols..(r + 1) * cols], &g[r * cols..(r + 1) * cols]);
            let d = &mut dx[k * cols..(k + 1) * cols];
            // d = g w first, so <g w, x> is one more dot product.
            for ((o, &gv), &wv) in d.iter_mut().zip(gr).zip(w) {
                *o = gv * wv;
            }
            let inv = 1.0 / (slice::dot(xr, xr) / cols as f32 + eps).sqrt();
            let c = slice::dot(d, xr) / cols as f32 * inv * inv * inv;
            for (o, &xv) in d.iter_mut().zip(xr) {
                *o = inv * *o - c * xv;
            }
        }
    });
}

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
struct Mask {
    seed: u32,
    threshold: u32,
    inv_keep: f32,
}

impl Mask {
    fn new(seed: u32, p: f32) -> Self {
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
fn dropout_piece(x: Option<&[f32]>, y: &mut [f32], first: usize, m: Mask) {
    let mut at = 0;
    while at < y.len() {
        let i = first + at;
        let len = ((y.len() - at) as u64).min((i as u64 | 0xffff_ffff) + 1 - i as u64) as usize;
        let (xs, ys) = (x.map(|x| &x[at..at + len]), &mut y[at..at + len]);
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { dropout_span_avx2(xs, ys, i, m) };
            at += len;
            continue;
        }
        dropout_span(xs, ys, i, m);
        at += len;
    }
}

/// The shape of a LoRA's down-projection `z = dropout(x) a^T`: `x` is
/// `rows x inp`, `a` is `r x inp`, `z` is `rows x r`.
#[derive(Clone, Copy, Debug)]
pub struct LoraDown {
    pub rows: usize,
    pub inp: usize,
    pub r: usize,
    /// The dropout mask's seed ([`dropout`], over `x`'s flat indices);
    /// `None`: no dropout.
    pub seed: Option<u32>,
    /// Drop probability.
    pub p: f32,
}

impl LoraDown {
    fn check(&self, x: &[f32], a: &[f32], z: &[f32]) {
        assert!(
            x.len() == self.rows * self.inp
                && a.len() == self.r * self.inp
                && z.len() == self.rows * self.r,
            "lora_down: shapes"
        );
    }

    /// Row `t` of `dropout(x)` into `buf` (or `x`'s own row without dropout).
    fn row<'a>(&self, x: &'a [f32], t: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let xr = &x[t * self.inp..(t + 1) * self.inp];
        match self.seed {
            Some(s) => {
                dropout_piece(Some(xr), buf, t * self.inp, Mask::new(s, self.p));
                buf
            }
            None => xr,
        }
    }
}

/// `z = dropout(x) a^T` without the dropped input as a buffer: each row is
/// dropped into a scratch row and projected on the `r` rows of `a`.
pub fn lora_down(shape: LoraDown, x: &[f32], a: &[f32], z: &mut [f32]) {
    shape.check(x, a, z);
    let (inp, r) = (shape.inp, shape.r);
    let out = Shared(z.as_mut_ptr());
    par_rows(shape.rows, inp, |range| {
        // SAFETY: each range of rows is written by one call only.
        let z = unsafe { out.rows(&range, r) };
        let mut buf = vec![0f32; inp];
        for (k, t) in range.enumerate() {
            let row = shape.row(x, t, &mut buf);
            for j in 0..r {
                z[k * r + j] = dot(row, &a[j * inp..(j + 1) * inp]);
            }
        }
    });
}

/// The backward of [`lora_down`] from `dz` (`rows x r`): returns
/// `dA = dz^T dropout(x)` (`r x inp`) and adds `dropout(dz a)` (the input's
/// gradient, with the same mask) into `dx` when given.
pub fn lora_down_backward(
    shape: LoraDown,
    x: &[f32],
    a: &[f32],
    dz: &[f32],
    dx: Option<&mut [f32]>,
) -> Vec<f32> {
    shape.check(x, a, dz);
    let (inp, r) = (shape.inp, shape.r);
    // Each piece's partial dA, summed in row order at the end so the result
    // does not depend on which thread ran which piece.
    let parts = std::sync::Mutex::new(Vec::<(usize, Vec<f32>)>::new());
    let dx = dx.map(|d| {
        assert_eq!(d.len(), x.len(), "lora_down_backward: dx shape");
        Shared(d.as_mut_ptr())
    });
    let mask = shape.seed.map(|s| Mask::new(s, shape.p));
    par_rows(shape.rows, inp * 2, |range| {
        let mut local = vec![0f32; r * inp];
        let (mut buf, mut tmp) = (vec![0f32; inp], vec![0f32; inp]);
        for t in range.clone() {
            let g = &dz[t * r..(t + 1) * r];
            let row = shape.row(x, t, &mut buf);
            for j in 0..r {
                axpy(g[j], row, &mut local[j * inp..(j + 1) * inp]);
            }
            if let Some(dx) = &dx {
                tmp.fill(0.0);
                for j in 0..r {
                    axpy(g[j], &a[j * inp..(j + 1) * inp], &mut tmp);
                }
                if let Some(m) = mask {
                    dropout_piece(None, &mut tmp, t * inp, m);
                }
                // SAFETY: row t belongs to this call's range only.
                let d = unsafe { dx.span(t * inp, inp) };
                for (o, &v) in d.iter_mut().zip(&tmp) {
                    *o += v;
                }
            }
        }
        parts
            .lock()
            .expect("lora_down_backward: poisoned")
            .push((range.start, local));
    });
    let mut parts = parts.into_inner().expect("lora_down_backward: poisoned");
    parts.sort_by_key(|(start, _)| *start);
    let mut da = vec![0f32; r * inp];
    for (_, part) in &parts {
        for (o, v) in da.iter_mut().zip(part) {
            *o += v;
        }
    }
    da
}

/// `log(sum(exp(x)))` of each row of `cols` values.
pub fn logsumexp_rows(x: &[f32], cols: usize) -> Vec<f32> {
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "logsumexp_rows: ragged rows"
    );
    let n = x.len() / cols;
    let mut lse = vec![0f32; n];
    let out = Shared(lse.as_mut_ptr());
    // One scratch row per call: `exp_affine` needs somewhere to write.
    par_rows(n, cols, |rows| {
        // SAFETY: each range of rows is written by one call only.
        let lse = unsafe { out.rows(&rows, 1) };
        let mut scratch = vec![0f32; cols];
        for (k, r) in rows.enumerate() {
            let xr = &x[r * cols..(r + 1) * cols];
            let m = slice::max(xr);
            lse[k] = m + slice::exp_affine(xr, 1.0, m, &mut scratch).ln();
        }
    });
    lse
}

/// The cross-entropy's gradient: `dx = g * (exp(x - lse) - onehot(target))`
/// for each row of `cols` values.
pub fn softmax_minus_onehot(
    x: &[f32],
    lse: &[f32],
    targets: &[u32],
    g: f32,
    dx: &mut [f32],
    cols: usize,
) {
    let n = lse.len();
    assert!(x.len() == n * cols && dx.len() == x.len() && targets.len() == n);
    let out = Shared(dx.as_mut_ptr());
    par_rows(n, cols, |rows| {
        // SAFETY: each range of rows is written by one call only.
        let dx = unsafe { out.rows(&rows, cols) };
        for (k, r) in rows.enumerate() {
            let d = &mut dx[k * cols..(k + 1) * cols];
            slice::exp_affine(&x[r * cols..(r + 1) * cols], 1.0, lse[r], d);
            if let Some(t) = d.get_mut(targets[r] as usize) {
                *t -= 1.0;
            }
            slice::scale(d, g);
        }
    });
}

/// `y += x`, elementwise, on the pool when large.
pub fn add_into(y: &mut [f32], x: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_into: lengths");
    let n = y.len();
    let out = Shared(y.as_mut_ptr());
    par_rows(n.div_ceil(FLAT_ROW), FLAT_ROW, |rows| {
        let (lo, hi) = (rows.start * FLAT_ROW, (rows.end * FLAT_ROW).min(n));
        // SAFETY: lo..hi is this call's own part of `y`.
        let y = unsafe { out.span(lo, hi - lo) };
        for (o, &v) in y.iter_mut().zip(&x[lo..hi]) {
            *o += v;
        }
    });
}

/// `y += c * x`.
#[inline(always)]
pub fn axpy(c: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += c * v;
    }
}

/// Dot product with eight independent accumulators, so the compiler can
/// vectorise it without reassociating a single sum.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Slice primitives, dispatched to AVX2 + FMA or the portable loops.
mod slice {
    use super::avx2;
    pub use super::{axpy, dot};

    /// `y = exp(scale * x - m)`; returns `sum(y)`.
    pub fn exp_affine(x: &[f32], scale: f32, m: f32, y: &mut [f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { super::simd::exp_affine(x, scale, m, y) };
        }
        let mut sum = 0f32;
        for (o, &v) in y.iter_mut().zip(x) {
            *o = (scale * v - m).exp();
            sum += *o;
        }
        sum
    }

    /// The largest value (NaN if any value is NaN; -inf when empty).
    pub fn max(x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: as for `exp_affine`.
            return unsafe { super::simd::max(x) };
        }
        x.iter().fold(f32::NEG_INFINITY, |m, &v| {
            if v.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(v)
            }
        })
    }

    pub fn scale(y: &mut [f32], c: f32) {
        y.iter_mut().for_each(|v| *v *= c);
    }

    pub fn silu_mul(g: &[f32], u: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: as for `exp_affine`.
            return unsafe { super::simd::silu_mul(g, u, y) };
        }
        for ((o, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
            *o = gv / (1.0 + (-gv).exp()) * uv;
        }
    }

    pub fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: as for `exp_affine`.
            return unsafe { super::simd::silu_mul_backward(g, u, dy, dg, du) };
        }
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + (-g[i]).exp());
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            du[i] = dy[i] * g[i] * s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// `exp` of 8 lanes: Cody-Waite range reduction to `r` in
    /// `[-ln2/2, ln2/2]`, Cephes' degree-6 polynomial, then `2^n` by the
    /// exponent bits. Relative error about 2e-7; inputs are clamped to
    /// `[-87.3, 88.37]` (so `exp(-inf)` is 1e-38, not 0, and large inputs
    /// give 2.4e38, not inf); NaN stays NaN.
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        // `min`/`max` return their second operand when either is NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(88.376_26), x);
        let x = _mm256_max_ps(_mm256_set1_ps(-87.3), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }

    /// The first `n` (< 8) values of `x` in a lane buffer, the rest `fill`.
    fn tail(x: &[f32], fill: f32) -> [f32; 8] {
        let mut b = [fill; 8];
        b[..x.len()].copy_from_slice(x);
        b
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let mut l = [0f32; 8];
        // SAFETY: `l` holds 8 values.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
        (l[0] + l[4]) + (l[1] + l[5]) + ((l[2] + l[6]) + (l[3] + l[7]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_affine(x: &[f32], scale: f32, m: f32, y: &mut [f32]) -> f32 {
        assert_eq!(x.len(), y.len());
        let (sv, mv) = (_mm256_set1_ps(scale), _mm256_set1_ps(m));
        let n8 = x.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= len of both slices.
            unsafe {
                let v = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), sv, mv));
                _mm256_storeu_ps(y.as_mut_ptr().add(i), v);
                acc = _mm256_add_ps(acc, v);
            }
        }
        let mut sum = hsum(acc);
        if n8 < x.len() {
            let b = tail(&x[n8..], 0.0);
            let mut o = [0f32; 8];
            // SAFETY: both buffers hold 8 values.
            unsafe {
                let v = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(b.as_ptr()), sv, mv));
                _mm256_storeu_ps(o.as_mut_ptr(), v);
            }
            let rest = x.len() - n8;
            y[n8..].copy_from_slice(&o[..rest]);
            sum += o[..rest].iter().sum::<f32>();
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn max(x: &[f32]) -> f32 {
        let n8 = x.len() / 8 * 8;
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut nan = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= len.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            m = _mm256_max_ps(m, v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        let mut l = [0f32; 8];
        let mut bad = [0f32; 8];
        // SAFETY: both buffers hold 8 values.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), m);
            _mm256_storeu_ps(bad.as_mut_ptr(), nan);
        }
        if bad.iter().any(|b| b.to_bits() != 0) || x[n8..].iter().any(|v| v.is_nan()) {
            return f32::NAN;
        }
        l.iter()
            .chain(&x[n8..])
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }

    /// `1 / (1 + exp(-g))` of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn sigmoid8(g: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_div_ps(one, _mm256_add_ps(one, e))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul(g: &[f32], u: &[f32], y: &mut [f32]) {
        assert!(g.len() == u.len() && g.len() == y.len());
        let n8 = g.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= len of all three slices.
            unsafe {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let uv = _mm256_loadu_ps(u.as_ptr().add(i));
                let v = _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), uv);
                _mm256_storeu_ps(y.as_mut_ptr().add(i), v);
            }
        }
        if n8 < g.len() {
            let (gb, ub) = (tail(&g[n8..], 0.0), tail(&u[n8..], 0.0));
            let mut o = [0f32; 8];
            // SAFETY: all buffers hold 8 values.
            unsafe {
                let gv = _mm256_loadu_ps(gb.as_ptr());
                let v = _mm256_mul_ps(
                    _mm256_mul_ps(gv, sigmoid8(gv)),
                    _mm256_loadu_ps(ub.as_ptr()),
                );
                _mm256_storeu_ps(o.as_mut_ptr(), v);
            }
            let rest = g.len() - n8;
            y[n8..].copy_from_slice(&o[..rest]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul_backward(
        g: &[f32],
        u: &[f32],
        dy: &[f32],
        dg: &mut [f32],
        du: &mut [f32],
    ) {
        let n = g.len();
        assert!(u.len() == n && dy.len() == n && dg.len() == n && du.len() == n);
        let one = _mm256_set1_ps(1.0);
        // dg = dy u s (1 + g (1 - s)), du = dy g s
        let lanes = |gv: __m256, uv: __m256, yv: __m256| {
            let s = sigmoid8(gv);
            let gs = _mm256_mul_ps(gv, s);
            let du = _mm256_mul_ps(yv, gs);
            // s (1 + g (1 - s)) = s + g s - g s^2 = s + gs (1 - s)
            let ds = _mm256_fmadd_ps(gs, _mm256_sub_ps(one, s), s);
            let dg = _mm256_mul_ps(_mm256_mul_ps(yv, uv), ds);
            (dg, du)
        };
        let n8 = n / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= len of all five slices.
            unsafe {
                let (a, b) = lanes(
                    _mm256_loadu_ps(g.as_ptr().add(i)),
                    _mm256_loadu_ps(u.as_ptr().add(i)),
                    _mm256_loadu_ps(dy.as_ptr().add(i)),
                );
                _mm256_storeu_ps(dg.as_mut_ptr().add(i), a);
                _mm256_storeu_ps(du.as_mut_ptr().add(i), b);
            }
        }
        if n8 < n {
            let (gb, ub, yb) = (
                tail(&g[n8..], 0.0),
                tail(&u[n8..], 0.0),
                tail(&dy[n8..], 0.0),
            );
            let (mut oa, mut ob) = ([0f32; 8], [0f32; 8]);
            // SAFETY: all buffers hold 8 values.
            unsafe {
                let (a, b) = lanes(
                    _mm256_loadu_ps(gb.as_ptr()),
                    _mm256_loadu_ps(ub.as_ptr()),
                    _mm256_loadu_ps(yb.as_ptr()),
                );
                _mm256_storeu_ps(oa.as_mut_ptr(), a);
                _mm256_storeu_ps(ob.as_mut_ptr(), b);
            }
            let rest = n - n8;
            dg[n8..].copy_from_slice(&oa[..rest]);
            du[n8..].copy_from_slice(&ob[..rest]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A deterministic spread over [-12, 12] with some exact zeros.
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                if i % 17 == 0 {
                    0.0
                } else {
                    (h % 24_000) as f32 / 1000.0 - 12.0
                }
            })
            .collect()
    }

    #[test]
    fn exp_matches_libm_over_the_range_and_handles_specials() {
        let x: Vec<f32> = (-870..=883).map(|i| i as f32 * 0.1 + 0.0123).collect();
        let mut y = vec![0f32; x.len()];
        let sum = slice::exp_affine(&x, 1.0, 0.0, &mut y);
        for (&a, &b) in x.iter().zip(&y) {
            assert!(close(b, a.exp(), 1e-6), "exp({a}) = {b}, libm {}", a.exp());
        }
        assert!(sum.is_infinite(), "the sum of these overflows f32");
        let x: Vec<f32> = (-200..=200).map(|i| i as f32 * 0.1 + 0.0123).collect();
        let sum = slice::exp_affine(&x, 0.5, 1.0, &mut vec![0f32; x.len()]);
        let want: f64 = x.iter().map(|v| (0.5 * *v as f64 - 1.0).exp()).sum();
        assert!(((sum as f64 - want) / want).abs() < 1e-5);
        // Odd lengths exercise the tail; NaN propagates; -inf underflows.
        let mut y = [0f32; 3];
        slice::exp_affine(&[f32::NAN, f32::NEG_INFINITY, 1.0], 1.0, 0.0, &mut y);
        assert!(y[0].is_nan());
        assert!(y[1] < 1e-37);
        assert!(close(y[2], std::f32::consts::E, 1e-6));
        assert!(slice::max(&[1.0, f32::NAN, 3.0]).is_nan());
        for n in [0, 5, 8, 37] {
            let v = values(n, 1);
            let want = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(slice::max(&v), want, "max of {n} values");
        }
    }

    #[test]
    fn silu_mul_and_its_gradient_match_the_formulas() {
        for n in [1, 7, 8, 9, 1000, 40_000] {
            let (g, u, dy) = (values(n, 3), values(n, 5), values(n, 7));
            let mut y = vec![0f32; n];
            silu_mul(&g, &u, &mut y);
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            silu_mul_backward(&g, &u, &dy, &mut dg, &mut du);
            for i in 0..n {
                let (gv, uv, yv) = (g[i] as f64, u[i] as f64, dy[i] as f64);
                let s = 1.0 / (1.0 + (-gv).exp());
                assert!(close(y[i], (gv * s * uv) as f32, 1e-5), "y[{i}]");
                let want_dg = yv * uv * s * (1.0 + gv * (1.0 - s));
                assert!(close(dg[i], want_dg as f32, 1e-5), "dg[{i}]");
                assert!(close(du[i], (yv * gv * s) as f32, 1e-5), "du[{i}]");
            }
        }
    }

    #[test]
    fn causal_softmax_masks_scales_and_normalises() {
        let (seq, offset, scale) = (5, 3, 0.7f32);
        let cols = offset + seq;
        for groups in [1, 200] {
            let x = values(groups * seq * cols, 11);
            let mut y = vec![f32::NAN; x.len()];
            causal_softmax(&x, &mut y, cols, seq, offset, scale);
            for r in 0..groups * seq {
                let valid = offset + r % seq + 1;
                let row = &x[r * cols..(r + 1) * cols];
                let m = row[..valid].iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let z: f64 = row[..valid]
                    .iter()
                    .map(|&v| (scale as f64 * (v as f64 - m)).exp())
                    .sum();
                for j in 0..cols {
                    let got = y[r * cols + j];
                    if j < valid {
                        let want = (scale as f64 * (row[j] as f64 - m)).exp() / z;
                        assert!(close(got, want as f32, 1e-5), "row {r} col {j}");
                    } else {
                        assert_eq!(got, 0.0, "row {r} col {j} is masked");
                    }
                }
            }
        }
    }

    #[test]
    fn logsumexp_and_cross_entropy_gradient_match_f64() {
        let (n, cols) = (40, 1001);
        let x = values(n * cols, 13);
        let targets: Vec<u32> = (0..n as u32).map(|i| i * 37 % cols as u32).collect();
        let lse = logsumexp_rows(&x, cols);
        let mut dx = vec![0f32; x.len()];
        softmax_minus_onehot(&x, &lse, &targets, 0.5, &mut dx, cols);
        for r in 0..n {
            let row = &x[r * cols..(r + 1) * cols];
            let want: f64 = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            assert!(close(lse[r], want as f32, 1e-6), "lse row {r}");
            for j in 0..cols {
                let p = (row[j] as f64 - want).exp();
                let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
                let w = 0.5 * (p - onehot);
                assert!((dx[r * cols + j] as f64 - w).abs() < 1e-6, "dx {r},{j}");
            }
        }
    }

    /// Dropout keeps about `1 - p` of the values, scaled by `1 / (1 - p)`,
    /// with the mask of [`dropout_keeps`] (vectorised = scalar), the same
    /// in place, and a different mask for another seed.
    #[test]
    fn dropout_keeps_the_expected_share_with_its_own_mask() {
        let n = 200_003;
        let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32).collect();
        for p in [0.05f32, 0.3] {
            let mut y = vec![0f32; n];
            dropout(Some(&x), &mut y, 77, p);
            let t = dropout_threshold(p);
            let mut kept = 0;
            for i in 0..n {
                if dropout_keeps(77, i, t) {
                    kept += 1;
                    assert!((y[i] - x[i] / (1.0 - p)).abs() < 1e-5, "p = {p}, {i}");
                } else {
                    assert_eq!(y[i], 0.0, "p = {p}, {i}");
                }
            }
            let share = kept as f64 / n as f64;
            assert!(
                (share - (1.0 - p as f64)).abs() < 0.005,
                "p = {p}: kept {share}"
            );
            let mut z = x.clone();
            dropout(None, &mut z, 77, p);
            assert_eq!(y, z);
            let mut other = vec![0f32; n];
            dropout(Some(&x), &mut other, 78, p);
            let same = (0..n)
                .filter(|&i| (other[i] == 0.0) == (y[i] == 0.0))
                .count();
            assert!(
                same < n - n / 50,
                "p = {p}: seeds 77 and 78 agree on {same} of {n}"
            );
        }
    }

    /// The LoRA down-projection kernels equal the plain formulas with the
    /// mask of [`dropout_keeps`], on a size that splits over the pool.
    #[test]
    fn lora_down_and_its_backward_match_the_formulas() {
        let (rows, inp, r) = (400, 96, 3);
        let x = crate::testutil::uniform_values(rows * inp, 5);
        let a = crate::testutil::uniform_values(r * inp, 6);
        let dz = crate::testutil::uniform_values(rows * r, 7);
        for seed in [None, Some(1234u32)] {
            let p = 0.25f32;
            let t = dropout_threshold(p);
            let m = |i: usize| match seed {
                Some(s) if !dropout_keeps(s, i, t) => 0.0,
                Some(_) => 1.0 / (1.0 - p),
                None => 1.0,
            };
            let shape = LoraDown {
                rows,
                inp,
                r,
                seed,
                p,
            };
            let mut z = vec![0f32; rows * r];
            lora_down(shape, &x, &a, &mut z);
            let mut dx = vec![0.5f32; rows * inp];
            let da = lora_down_backward(shape, &x, &a, &dz, Some(&mut dx));
            for q in 0..rows {
                for j in 0..r {
                    let want: f32 = (0..inp)
                        .map(|i| x[q * inp + i] * m(q * inp + i) * a[j * inp + i])
                        .sum();
                    assert!((z[q * r + j] - want).abs() < 1e-4, "{seed:?} z[{q},{j}]");
                }
                for i in 0..inp {
                    let want: f32 = 0.5
                        + m(q * inp + i)
                            * (0..r).map(|j| dz[q * r + j] * a[j * inp + i]).sum::<f32>();
                    assert!(
                        (dx[q * inp + i] - want).abs() < 1e-4,
                        "{seed:?} dx[{q},{i}]"
                    );
                }
            }
            for j in 0..r {
                for i in 0..inp {
                    let want: f32 = (0..rows)
                        .map(|q| dz[q * r + j] * x[q * inp + i] * m(q * inp + i))
                        .sum();
                    assert!(
                        (da[j * inp + i] - want).abs() < 1e-3,
                        "{seed:?} dA[{j},{i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_backward_matches_the_formula() {
        let (rows, cols, scale) = (6, 13, 0.3f32);
        let x = values(rows * cols, 17);
        let dy = values(rows * cols, 19);
        let mut y = vec![0f32; x.len()];
        causal_softmax(&x, &mut y, cols, 3, 2, scale);
        let mut dx = vec![0f32; x.len()];
        softmax_backward(&y, &dy, &mut dx, cols, scale);
        for r in 0..rows {
            let (yr, gr) = (&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
            let d: f64 = yr
                .iter()
                .zip(gr)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            for j in 0..cols {
                let want = scale as f64 * yr[j] as f64 * (gr[j] as f64 - d);
                assert!((dx[r * cols + j] as f64 - want).abs() < 1e-5);
            }
        }
    }
}

/// 4-bit weights for decoding: the Q4_1 scheme of GGML (blocks of 32
/// weights, each with a scale `d` and a minimum `m`, values `d * q + m`
/// with `q` in `0..16`), with f32 scales kept apart from the packed
/// nibbles, and a matrix-vector product against activations quantized to
/// 8 bits per block on the fly.
///
/// Q4_1 is what SmolLM2's GGUF file stores: quantizing its dequantized
/// weights again finds the same blocks' minimum and maximum, so decoding
/// runs on the file's own 4-bit weights. (candle has no SIMD kernel for
/// Q4_1, and re-quantizing them to its Q4_0 visibly hurt the text.) The
/// unsigned nibbles go straight into `maddubs` against the signed
/// activations, the minimum's share is one product per block with the
/// activations' f32 block sum, four weight rows share every activation
/// load, and the rows are split over candle's (spinning) thread pool.
pub mod q4 {
    use super::{avx2, par_rows_decode, Shared};

    /// Nearest integer, ties to even, by the 1.5 * 2^23 trick: exact for
    /// |v| <= 2^22 and without a libm call per value.
    pub(super) fn round_even(v: f32) -> f32 {
        (v + 12_582_912.0) - 12_582_912.0
    }

    /// The little-endian f16 at byte `pos` of `data`, as f32.
    pub(super) fn f16_at(data: &[u8], pos: usize) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([data[pos], data[pos + 1]])).to_f32()
    }

    /// The quantized kernels also convert f16 scales (F16C).
    pub(super) fn avx2_f16c() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            avx2() && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Weights per block.
    pub const BLOCK: usize = 32;

    /// A `(rows, cols)` matrix in 4-bit blocks along `cols` (GGUF's Q4_1
    /// values: per block of 32 weights an f16 step `d`, an f16 minimum `m`
    /// and 4-bit `q`, weight = `d q + m`), laid out for decoding.
    ///
    /// Decoding reads every weight once per token, so the kernel is bound
    /// by memory traffic; the layout makes it one sequential stream per
    /// thread. Rows go in groups of 4 (padded with zero rows), each group
    /// contiguous; within a group, per pair of blocks `(2p, 2p + 1)`
    /// ([`PAIR_BYTES`]): the 4 rows' 32 bytes of nibbles (block `2p`'s 16
    /// bytes, then `2p + 1`'s; byte `j` of a block holds weight `j` in its
    /// low nibble and weight `j + 16` in its high one), then the 8 f16
    /// steps block by block (block `2p`'s for rows 0-3, then `2p + 1`'s),
    /// then the 8 f16 minimums in the same order. An odd last
    /// block follows the pairs ([`TAIL_BYTES`]): the 4 rows' 16 bytes,
    /// their steps, their minimums.
    #[derive(Debug, Clone)]
    pub struct Q4Matrix {
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    }

    /// Bytes of one pair of blocks of one group of 4 rows.
    const PAIR_BYTES: usize = 4 * 32 + 2 * 16;
    /// Bytes of an odd last block of one group of 4 rows.
    const TAIL_BYTES: usize = 4 * 16 + 2 * 8;

    /// Where block `b` of row `r` lives: byte offsets of its 16 nibble
    /// bytes, its f16 step and its f16 minimum.
    #[derive(Debug, Clone, Copy)]
    struct BlockAt {
        q: usize,
        d: usize,
        m: usize,
    }

    /// One row of activations in 8-bit blocks.
    pub(super) struct Q8Row {
        /// Per block: `i8` values, 32 each.
        pub(super) q: Vec<i8>,
        /// Per block: the scale.
        pub(super) d: Vec<f32>,
        /// Per block: the sum of the f32 activations (the weights'
        /// minimum multiplies it).
        sum: Vec<f32>,
        /// Per pair of blocks `(2p, 2p + 1)`, 64 values: their first
        /// halves side by side, then their second halves, which is how a
        /// 32-byte load of the two blocks' nibbles splits (see `dot4`).
        pairs: Vec<i8>,
        /// Per pair of blocks: block `2p`'s scale 4 times, then `2p + 1`'s.
        pair_d: Vec<f32>,
        /// Per pair of blocks: block `2p`'s sum 4 times, then `2p + 1`'s.
        pair_sum: Vec<f32>,
    }

    /// Bytes of one group of 4 rows of `nb` blocks each.
    fn group_bytes(nb: usize) -> usize {
        nb / 2 * PAIR_BYTES + nb % 2 * TAIL_BYTES
    }

    /// Where block `b` of row `r` lives, for rows of `nb` blocks (see
    /// [`Q4Matrix`] for the layout).
    fn block_at(nb: usize, r: usize, b: usize) -> BlockAt {
        let (g, i) = (r / 4, r % 4);
        let group = g * group_bytes(nb);
        if b < nb / 2 * 2 {
            let (p, h) = (b / 2, b % 2);
            let base = group + p * PAIR_BYTES;
            BlockAt {
                q: base + i * 32 + h * 16,
                d: base + 128 + h * 8 + i * 2,
                m: base + 144 + h * 8 + i * 2,
            }
        } else {
            let base = group + nb / 2 * PAIR_BYTES;
            BlockAt {
                q: base + i * 16,
                d: base + 64 + i * 2,
                m: base + 72 + i * 2,
            }
        }
    }

    /// Quantizes up to 4 rows (`w`, `nb` blocks each) into one group's bytes.
    fn quantize_group(w: &[f32], nb: usize, out: &mut [u8]) {
        for (blk, block) in w.chunks_exact(BLOCK).enumerate() {
            let at = block_at(nb, blk / nb, blk % nb);
            let lo = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let hi = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            // The grid is the one stored (f16 step and minimum), so every
            // weight is within half a stored step of its value.
            let d16 = half::f16::from_f32((hi - lo) / 15.0);
            let m16 = half::f16::from_f32(lo);
            let (d, mn) = (d16.to_f32(), m16.to_f32());
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            // Round half up (as ggml), without a libm call per weight.
            let q = |v: f32| (((v - mn) * id + 0.5) as i32).clamp(0, 15) as u8;
            for j in 0..16 {
                out[at.q + j] = q(block[j]) | (q(block[j + 16]) << 4);
            }
            out[at.d..at.d + 2].copy_from_slice(&d16.to_bits().to_le_bytes());
            out[at.m..at.m + 2].copy_from_slice(&m16.to_bits().to_le_bytes());
        }
    }

    /// Fills `data` (groups of 4 rows of `row_len` f32 weights, `gb` bytes
    /// each) on all threads: `fill(rows, group)` quantizes up to 4 rows of
    /// `w` into one group's bytes. Groups are independent.
    pub(super) fn quantize_groups(
        w: &[f32],
        row_len: usize,
        gb: usize,
        data: &mut [u8],
        fill: impl Fn(&[f32], &mut [u8]) + Sync,
    ) {
        let rows = w.len() / row_len;
        let threads = candle_core::utils::get_num_threads().max(1);
        let per = rows.div_ceil(4).div_ceil(threads).max(1);
        let fill = &fill;
        std::thread::scope(|s| {
            for (c, chunk) in data.chunks_mut(per * gb).enumerate() {
                s.spawn(move || {
                    for (g, group) in chunk.chunks_mut(gb).enumerate() {
                        let r0 = (c * per + g) * 4;
                        let r1 = (r0 + 4).min(rows);
                        fill(&w[r0 * row_len..r1 * row_len], group);
                    }
                });
            }
        });
    }

    /// `y = x W^T` for a matrix of `rows` rows in groups of 4 (`gb` bytes
    /// each) and `n` rows of `x` of `cols` values: the activations are
    /// quantized once, groups are split between threads, and
    /// `dot(g, x, acc)` gives group `g`'s 4 dot products with one row.
    pub(super) fn grouped_matmul(
        rows: usize,
        cols: usize,
        gb: usize,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        dot: impl Fn(usize, &Q8Row, &mut [f32; 4]) + Sync,
    ) {
        assert!(
            x.len() == n * cols && y.len() == n * rows,
            "quantized matmul: shapes"
        );
        let xq: Vec<Q8Row> = x.chunks_exact(cols).map(quantize_row).collect();
        let out = Shared(y.as_mut_ptr());
        par_rows_decode(rows.div_ceil(4), gb, |range| {
            let (r0, r1) = (range.start * 4, (range.end * 4).min(rows));
            for (t, xr) in xq.iter().enumerate() {
                // SAFETY: token t's outputs r0..r1 belong to this call.
                let yt = unsafe { out.span(t * rows + r0, r1 - r0) };
                for g in range.clone() {
                    let mut acc = [0f32; 4];
                    dot(g, xr, &mut acc);
                    let r = g * 4;
                    let m = (rows - r).min(4);
                    yt[r - r0..r - r0 + m].copy_from_slice(&acc[..m]);
                }
            }
        });
    }

    impl Q4Matrix {
        /// Quantizes a row-major `(rows, cols)` matrix; `None` unless `cols`
        /// is a multiple of [`BLOCK`].
        pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
            if cols == 0 || !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
                return None;
            }
            let nb = cols / BLOCK;
            let gb = group_bytes(nb);
            let mut data = vec![0u8; rows.div_ceil(4) * gb];
            quantize_groups(w, cols, gb, &mut data, |w, group| {
                quantize_group(w, nb, group)
            });
            Some(Self { rows, cols, data })
        }

        pub fn rows(&self) -> usize {
            self.rows
        }

        pub fn cols(&self) -> usize {
            self.cols
        }

        fn nb(&self) -> usize {
            self.cols / BLOCK
        }

        /// Bytes of one group of 4 rows.
        fn group_bytes(&self) -> usize {
            group_bytes(self.nb())
        }

        fn at(&self, r: usize, b: usize) -> BlockAt {
            block_at(self.nb(), r, b)
        }

        fn f16_at(&self, pos: usize) -> f32 {
            f16_at(&self.data, pos)
        }

        /// Block `blk`'s step (blocks numbered row-major, `cols / 32` per row).
        #[cfg(test)]
        fn scale(&self, blk: usize) -> f32 {
            self.f16_at(self.at(blk / self.nb(), blk % self.nb()).d)
        }

        /// Block `blk`'s minimum.
        #[cfg(test)]
        fn min(&self, blk: usize) -> f32 {
            self.f16_at(self.at(blk / self.nb(), blk % self.nb()).m)
        }

        /// The weights as stored, back in f32 (row-major).
        pub fn dequantize(&self) -> Vec<f32> {
            let nb = self.nb();
            let mut out = Vec::with_capacity(self.rows * self.cols);
            for blk in 0..self.rows * nb {
                let at = self.at(blk / nb, blk % nb);
                let (d, m) = (self.f16_at(at.d), self.f16_at(at.m));
                let q = &self.data[at.q..at.q + 16];
                out.extend(q.iter().map(|b| d * (b & 15) as f32 + m));
                out.extend(q.iter().map(|b| d * (b >> 4) as f32 + m));
            }
            out
        }

        /// `y = x W^T` for `n` rows of `x` (`n x cols`), `y` is `n x rows`.
        pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
            let gb = self.group_bytes();
            grouped_matmul(self.rows, self.cols, gb, x, n, y, |g, xr, acc| {
                self.dot_group(g, xr, acc)
            });
        }

        /// Dot products of group `g`'s 4 rows with one activation row.
        fn dot_group(&self, g: usize, x: &Q8Row, acc: &mut [f32; 4]) {
            #[cfg(target_arch = "x86_64")]
            if avx2_f16c() {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above);
                // group g exists (padded to 4 rows).
                unsafe { simd::dot4(self, g, x, acc) };
                return;
            }
            for (i, a) in acc.iter_mut().enumerate() {
                *a = self.dot_row_scalar(g * 4 + i, x);
            }
        }

        fn dot_row_scalar(&self, r: usize, x: &Q8Row) -> f32 {
            let mut sum = 0f32;
            for b in 0..self.nb() {
                let at = self.at(r, b);
                let q = &self.data[at.q..at.q + 16];
                let xq = &x.q[b * BLOCK..(b + 1) * BLOCK];
                let mut s = 0i32;
                for j in 0..16 {
                    s += (q[j] & 15) as i32 * xq[j] as i32 + (q[j] >> 4) as i32 * xq[j + 16] as i32;
                }
                sum += self.f16_at(at.d) * x.d[b] * s as f32 + self.f16_at(at.m) * x.sum[b];
            }
            sum
        }
    }

    /// 8-bit blocks of one activation row: `d = max|x| / 127`.
    pub(super) fn quantize_row(x: &[f32]) -> Q8Row {
        let nb = x.len() / BLOCK;
        let mut r = Q8Row {
            q: vec![0; nb * BLOCK],
            d: vec![0.0; nb],
            sum: vec![0.0; nb],
            pairs: vec![0; nb / 2 * 2 * BLOCK],
            pair_d: vec![0.0; nb / 2 * 8],
            pair_sum: vec![0.0; nb / 2 * 8],
        };
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 (checked above); the buffers have
            // the sizes set above.
            unsafe { simd::quantize_blocks(&x[..nb * BLOCK], &mut r.q, &mut r.d, &mut r.sum) };
        } else {
            quantize_blocks(x, &mut r);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize_blocks(x, &mut r);
        let half = BLOCK / 2;
        for p in 0..nb / 2 {
            let (a, b) = (2 * p * BLOCK, (2 * p + 1) * BLOCK);
            let out = &mut r.pairs[p * 2 * BLOCK..(p + 1) * 2 * BLOCK];
            out[..half].copy_from_slice(&r.q[a..a + half]);
            out[half..BLOCK].copy_from_slice(&r.q[b..b + half]);
            out[BLOCK..BLOCK + half].copy_from_slice(&r.q[a + half..a + BLOCK]);
            out[BLOCK + half..].copy_from_slice(&r.q[b + half..b + BLOCK]);
            for (j, blk) in [2 * p, 2 * p + 1].into_iter().enumerate() {
                r.pair_d[p * 8 + j * 4..p * 8 + j * 4 + 4].fill(r.d[blk]);
                r.pair_sum[p * 8 + j * 4..p * 8 + j * 4 + 4].fill(r.sum[blk]);
            }
        }
        r
    }

    /// The portable form of [`simd::quantize_blocks`]: the same values and
    /// steps; the sums may differ in their last bits (order of addition).
    fn quantize_blocks(x: &[f32], r: &mut Q8Row) {
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / 127.0;
            let id = if s != 0.0 { 1.0 / s } else { 0.0 };
            for (q, &v) in r.q[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(block) {
                *q = round_even(v * id) as i8;
            }
            r.d[b] = s;
            r.sum[b] = block.iter().sum();
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod simd {
        use super::{Q4Matrix, Q8Row, BLOCK, PAIR_BYTES};
        use crate::kernels::{prefetch, PREFETCH_AHEAD};
        use std::arch::x86_64::*;

        /// [`super::quantize_blocks`] on 32 values at a time: the same
        /// maximum, step and rounding (to nearest, ties to even), so the
        /// same 8-bit values.
        #[target_feature(enable = "avx2")]
        pub(super) fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32]) {
            let nb = x.len() / BLOCK;
            assert!(q.len() >= nb * BLOCK && d.len() >= nb && sum.len() >= nb);
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for b in 0..nb {
                // SAFETY: block b of x and of q holds 32 values (asserted).
                unsafe {
                    let at = x.as_ptr().add(b * BLOCK);
                    let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(at.add(o)));
                    let m = _mm256_max_ps(
                        _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                        _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
                    );
                    let t = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                    let t = _mm_max_ps(t, _mm_movehl_ps(t, t));
                    let amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
                    let s = amax / 127.0;
                    let id = _mm256_set1_ps(if s != 0.0 { 1.0 / s } else { 0.0 });
                    let r = v.map(|v| {
                        _mm256_cvtps_epi32(_mm256_round_ps::<
                            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                        >(_mm256_mul_ps(v, id)))
                    });
                    let packed = _mm256_packs_epi16(
                        _mm256_packs_epi32(r[0], r[1]),
                        _mm256_packs_epi32(r[2], r[3]),
                    );
                    let packed = _mm256_permutevar8x32_epi32(packed, order);
                    _mm256_storeu_si256(q.as_mut_ptr().add(b * BLOCK) as *mut __m256i, packed);
                    let t = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
                    let t = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
                    let t = _mm_add_ps(t, _mm_movehl_ps(t, t));
                    sum[b] = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
                    d[b] = s;
                }
            }
        }

        /// The 4 rows of group `g`; see [`Q4Matrix::dot_row_scalar`] for
        /// the sum and [`Q4Matrix`] for the layout, read front to back.
        ///
        /// Blocks go two at a time: one 32-byte load holds both blocks'
        /// nibbles of a row, its low nibbles are the first halves of the
        /// two blocks and its high nibbles the second halves, matched by
        /// [`Q8Row::pairs`]; per row, the two integer products add up in
        /// 16-bit lanes (block `2p` in the low 128 bits, `2p + 1` in the
        /// high), at most 2 * 2 * 15 * 127 = 7620 each. Three horizontal
        /// adds across the 4 rows (at most 4 * 7620 = 30480, still 16-bit)
        /// and one pairwise widening leave each block's 4 row sums in one
        /// vector, lanes ordered as the stored steps and minimums (block by
        /// block), so one conversion and two multiply-adds per pair scale
        /// them and add the minimums' terms.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) fn dot4(w: &Q4Matrix, g: usize, x: &Q8Row, out: &mut [f32; 4]) {
            let nb = w.nb();
            let gb = w.group_bytes();
            assert!((g + 1) * gb <= w.data.len() && x.q.len() >= nb * BLOCK);
            assert!(x.pairs.len() >= nb / 2 * 2 * BLOCK && x.pair_d.len() >= nb / 2 * 8);
            assert!(x.sum.len() >= nb && x.pair_sum.len() >= nb / 2 * 8);
            let base = w.data.as_ptr().wrapping_add(g * gb);
            let low = _mm256_set1_epi8(15);
            let low128 = _mm_set1_epi8(15);
            let ones = _mm256_set1_epi16(1);
            // Lanes i and 4 + i: row i, blocks 2p and 2p + 1.
            let mut acc = _mm256_setzero_ps();
            for p in 0..nb / 2 {
                // SAFETY: pair p of the activations holds 64 bytes, 8 scales
                // and 8 sums, and pair p of group g PAIR_BYTES bytes (all
                // asserted above).
                unsafe {
                    let at = base.add(p * PAIR_BYTES);
                    prefetch(at.wrapping_add(PREFETCH_AHEAD), PAIR_BYTES);
                    let xlo = _mm256_loadu_si256(x.pairs.as_ptr().add(p * 64) as *const __m256i);
                    let xhi =
                        _mm256_loadu_si256(x.pairs.as_ptr().add(p * 64 + 32) as *const __m256i);
                    let row = |i: usize| {
                        let bytes = _mm256_loadu_si256(at.add(i * 32) as *const __m256i);
                        let lo = _mm256_and_si256(bytes, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low);
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, xlo),
                            _mm256_maddubs_epi16(hi, xhi),
                        )
                    };
                    let h = _mm256_hadd_epi16(
                        _mm256_hadd_epi16(row(0), row(1)),
                        _mm256_hadd_epi16(row(2), row(3)),
                    );
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(h, ones));
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(at.add(128) as *const __m128i));
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(at.add(144) as *const __m128i));
                    let dx = _mm256_loadu_ps(x.pair_d.as_ptr().add(p * 8));
                    let sx = _mm256_loadu_ps(x.pair_sum.as_ptr().add(p * 8));
                    acc = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, dx), acc);
                    acc = _mm256_fmadd_ps(mw, sx, acc);
                }
            }
            let mut l = [0f32; 8];
            // SAFETY: `l` holds 8 values.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
            let mut tail = [0f32; 4];
            if nb % 2 == 1 {
                // The last block alone.
                let b = nb - 1;
                // SAFETY: block b of the activations holds 32 bytes; the
                // group's tail TAIL_BYTES (asserted above, within gb).
                unsafe {
                    let at = base.add(nb / 2 * PAIR_BYTES);
                    let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK) as *const __m256i);
                    let dx = x.d[b];
                    for (i, tail) in tail.iter_mut().enumerate() {
                        let bytes = _mm_loadu_si128(at.add(i * 16) as *const __m128i);
                        let lo = _mm_and_si128(bytes, low128);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low128);
                        let q = _mm256_set_m128i(hi, lo);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
                        let f16 = |off: usize| {
                            half::f16::from_bits((at.add(off) as *const u16).read_unaligned())
                                .to_f32()
                        };
                        let mut t = [0i32; 8];
                        _mm256_storeu_si256(t.as_mut_ptr() as *mut __m256i, p);
                        let sum: i32 = t.iter().sum();
                        *tail = f16(64 + i * 2) * dx * sum as f32 + f16(72 + i * 2) * x.sum[b];
                    }
                }
            }
            for i in 0..4 {
                out[i] = (l[i] + l[4 + i]) + tail[i];
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        use crate::testutil::uniform_values as values;

        #[test]
        fn quantization_stays_within_half_a_step_and_is_idempotent() {
            let (rows, cols) = (7, 96);
            let w = values(rows * cols, 1);
            let q = Q4Matrix::quantize(&w, rows, cols).unwrap();
            let back = q.dequantize();
            for (b, (wb, qb)) in w.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let d = q.scale(b);
                for (a, c) in wb.iter().zip(qb) {
                    // Half a step, plus the f16 rounding of the minimum
                    // at the block's ends.
                    let tol = d * 0.5 + 4.9e-4 * a.abs() + 1e-6;
                    assert!((a - c).abs() <= tol, "block {b}: {a} vs {c}");
                }
            }
            // Weights that are already 4-bit (a Q4_1 GGUF file's, dequantized)
            // come back as they were.
            let again = Q4Matrix::quantize(&back, rows, cols).unwrap().dequantize();
            for (a, c) in back.iter().zip(&again) {
                assert!((a - c).abs() <= 1e-6 * (1.0 + a.abs()), "{a} vs {c}");
            }
            assert!(
                Q4Matrix::quantize(&w, rows * 2, cols / 2).is_none(),
                "48 columns: not whole blocks"
            );
        }

        /// The kernel computes exactly `sum((W - m) * dequantized x) +
        /// m * sum(x)` per block (`W - m` is `d q`): compare with that in
        /// f64, for row counts that exercise both the 4-row SIMD path and
        /// the leftover rows.
        /// The portable loop (CPUs without AVX2/F16C) and the kernel agree.
        /// The vectorised activation quantizer gives the portable loop's
        /// 8-bit values and steps exactly (ties to even included: values
        /// that land on half steps), and its sums to rounding.
        #[test]
        fn activation_quantizer_equals_the_portable_loop() {
            let mut x: Vec<f32> = values(6 * BLOCK, 7).iter().map(|v| v * 3.0).collect();
            // A block of exact half steps (max 127 -> step 1), an all-zero
            // block, and one with a single nonzero value.
            for (j, v) in x[..BLOCK].iter_mut().enumerate() {
                *v = if j == 0 { 127.0 } else { j as f32 - 15.5 };
            }
            x[BLOCK..2 * BLOCK].fill(0.0);
            x[2 * BLOCK..3 * BLOCK].fill(0.0);
            x[2 * BLOCK + 5] = -0.25;
            let fast = quantize_row(&x);
            let mut slow = quantize_row(&x);
            quantize_blocks(&x, &mut slow);
            assert_eq!(fast.q, slow.q);
            assert_eq!(fast.d, slow.d);
            for (a, b) in fast.sum.iter().zip(&slow.sum) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
            assert_eq!(&fast.q[1..4], &[-14, -14, -12]);
            assert_eq!(fast.q[2 * BLOCK + 5], -127);
            // Pairs and their per-lane scales and sums follow the blocks.
            assert_eq!(&fast.pairs[..16], &fast.q[..16]);
            assert_eq!(&fast.pairs[16..32], &fast.q[BLOCK..BLOCK + 16]);
            assert_eq!(&fast.pairs[32..48], &fast.q[16..32]);
            assert_eq!(
                fast.pair_d[8..16],
                [
                    fast.d[2], fast.d[2], fast.d[2], fast.d[2], fast.d[3], fast.d[3], fast.d[3],
                    fast.d[3]
                ]
            );
            assert_eq!(fast.pair_sum[4], fast.sum[1]);
        }

        #[test]
        fn scalar_rows_equal_the_kernel() {
            for (rows, cols) in [(8, 576), (5, 160), (4, 32)] {
                let q = Q4Matrix::quantize(&values(rows * cols, 5), rows, cols).unwrap();
                let x = quantize_row(&values(cols, 6));
                for g in 0..rows.div_ceil(4) {
                    let mut acc = [0f32; 4];
                    q.dot_group(g, &x, &mut acc);
                    for (i, a) in acc.iter().enumerate().take(rows - g * 4) {
                        let s = q.dot_row_scalar(g * 4 + i, &x);
                        assert!((a - s).abs() <= 1e-4 * (1.0 + s.abs()), "{a} vs {s}");
                    }
                }
            }
        }

        #[test]
        fn matmul_equals_the_dequantized_product() {
            // Even and odd block counts (576 / 32 = 18; 160 / 32 = 5).
            for (rows, cols, n) in [(9, 64, 1), (4, 576, 3), (13, 160, 8), (8, 96, 2)] {
                let w = values(rows * cols, 2);
                let x: Vec<f32> = values(n * cols, 3).iter().map(|v| v * 7.0).collect();
                let q = Q4Matrix::quantize(&w, rows, cols).unwrap();
                let wd = q.dequantize();
                let mut y = vec![0f32; n * rows];
                q.matmul(&x, n, &mut y);
                let (mut err, mut norm) = (0f64, 0f64);
                for t in 0..n {
                    let xr = quantize_row(&x[t * cols..(t + 1) * cols]);
                    let xd: Vec<f64> =
                        xr.q.iter()
                            .enumerate()
                            .map(|(i, &v)| v as f64 * xr.d[i / BLOCK] as f64)
                            .collect();
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| {
                                let m = q.min((r * cols + c) / BLOCK) as f64;
                                (wd[r * cols + c] as f64 - m) * xd[c] + m * x[t * cols + c] as f64
                            })
                            .sum();
                        let got = y[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{rows}x{cols} t{t} r{r}: {got} vs {want}"
                        );
                        let exact: f64 = (0..cols)
                            .map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64)
                            .sum();
                        err += (got - exact).powi(2);
                        norm += exact.powi(2);
                    }
                }
                // And close to the unquantized product overall (4 bits on
                // uniform weights: about 10% relative error).
                let rel = (err / norm).sqrt();
                assert!(rel < 0.2, "{rows}x{cols}: relative error {rel}");
            }
        }
    }
}

/// Quiver's Q8_0 kernel (`--quantize q8_0`): 8-bit weights in blocks of 32
/// with one f16 step each (GGUF's Q8_0 values), in the same one-stream
/// layout as [`q4`], against the same 8-bit activations.
pub mod q8 {
    use super::q4::{avx2_f16c, f16_at, grouped_matmul, quantize_groups, round_even, Q8Row, BLOCK};

    /// Bytes of one block of one group of 4 rows: the 4 rows' 32 weights,
    /// then their 4 f16 steps.
    const BLOCK_BYTES: usize = 4 * 32 + 4 * 2;

    /// A `(rows, cols)` matrix in 8-bit blocks along `cols`: weight = `d q`
    /// with `q` in -127..=127. Rows go in groups of 4 (padded with zero
    /// rows), each group contiguous, block after block ([`BLOCK_BYTES`]).
    #[derive(Debug, Clone)]
    pub struct Q8Matrix {
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    }

    impl Q8Matrix {
        /// Quantizes a row-major `(rows, cols)` matrix; `None` unless `cols`
        /// is a multiple of [`BLOCK`].
        pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
            if cols == 0 || !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
                return None;
            }
            let nb = cols / BLOCK;
            let gb = nb * BLOCK_BYTES;
            let mut data = vec![0u8; rows.div_ceil(4) * gb];
            quantize_groups(w, cols, gb, &mut data, |w, group| {
                for (i, row) in w.chunks_exact(cols).enumerate() {
                    for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                        let at = b * BLOCK_BYTES;
                        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let d16 = half::f16::from_f32(amax / 127.0);
                        let d = d16.to_f32();
                        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                        for (j, &v) in block.iter().enumerate() {
                            let q = round_even(v * id).clamp(-127.0, 127.0) as i8;
                            group[at + i * 32 + j] = q as u8;
                        }
                        let dpos = at + 128 + i * 2;
                        group[dpos..dpos + 2].copy_from_slice(&d16.to_bits().to_le_bytes());
                    }
                }
            });
            Some(Self { rows, cols, data })
        }

        pub fn rows(&self) -> usize {
            self.rows
        }

        pub fn cols(&self) -> usize {
            self.cols
        }

        fn nb(&self) -> usize {
            self.cols / BLOCK
        }

        /// Offsets of row `r`'s block `b`: its 32 weights and its f16 step.
        fn at(&self, r: usize, b: usize) -> (usize, usize) {
            let base = (r / 4) * self.nb() * BLOCK_BYTES + b * BLOCK_BYTES;
            (base + (r % 4) * 32, base + 128 + (r % 4) * 2)
        }

        fn step(&self, pos: usize) -> f32 {
            f16_at(&self.data, pos)
        }

        /// The weights as stored, back in f32 (row-major).
        pub fn dequantize(&self) -> Vec<f32> {
            let mut out = Vec::with_capacity(self.rows * self.cols);
            for r in 0..self.rows {
                for b in 0..self.nb() {
                    let (q, d) = self.at(r, b);
                    let d = self.step(d);
                    out.extend(self.data[q..q + 32].iter().map(|&v| d * (v as i8) as f32));
                }
            }
            out
        }

        /// `y = x W^T` for `n` rows of `x` (`n x cols`), `y` is `n x rows`.
        pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
            let gb = self.nb() * BLOCK_BYTES;
            grouped_matmul(self.rows, self.cols, gb, x, n, y, |g, xr, acc| {
                self.dot_group(g, xr, acc)
            });
        }

        fn dot_group(&self, g: usize, x: &Q8Row, acc: &mut [f32; 4]) {
            #[cfg(target_arch = "x86_64")]
            if avx2_f16c() {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above);
                // group g exists (padded to 4 rows).
                unsafe { simd::dot4(self, g, x, acc) };
                return;
            }
            for (i, a) in acc.iter_mut().enumerate() {
                *a = self.dot_row_scalar(g * 4 + i, x);
            }
        }

        fn dot_row_scalar(&self, r: usize, x: &Q8Row) -> f32 {
            let mut sum = 0f32;
            for b in 0..self.nb() {
                let (q, d) = self.at(r, b);
                let s: i32 = self.data[q..q + 32]
                    .iter()
                    .zip(&x.q[b * BLOCK..(b + 1) * BLOCK])
                    .map(|(&w, &v)| (w as i8) as i32 * v as i32)
                    .sum();
                sum += self.step(d) * x.d[b] * s as f32;
            }
            sum
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod simd {
        use super::{Q8Matrix, Q8Row, BLOCK, BLOCK_BYTES};
        use crate::kernels::{prefetch, PREFETCH_AHEAD};
        use std::arch::x86_64::*;

        /// The 4 rows of group `g`, block by block: `maddubs` of |w| with
        /// x carrying w's sign (at most 2 * 127 * 127 per 16-bit lane), the 4
        /// rows' f16 steps converted in one F16C instruction.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) fn dot4(w: &Q8Matrix, g: usize, x: &Q8Row, out: &mut [f32; 4]) {
            let nb = w.nb();
            assert!((g + 1) * nb * BLOCK_BYTES <= w.data.len() && x.q.len() >= nb * BLOCK);
            assert!(x.d.len() >= nb);
            let base = w.data.as_ptr().wrapping_add(g * nb * BLOCK_BYTES);
            let ones = _mm256_set1_epi16(1);
            let lane = [
                _mm256_set1_epi32(0),
                _mm256_set1_epi32(1),
                _mm256_set1_epi32(2),
                _mm256_set1_epi32(3),
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..nb {
                // SAFETY: block b of group g holds BLOCK_BYTES bytes and
                // block b of the activations 32 values (asserted above).
                unsafe {
                    let at = base.add(b * BLOCK_BYTES);
                    prefetch(at.wrapping_add(PREFETCH_AHEAD), BLOCK_BYTES);
                    let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK) as *const __m256i);
                    let d4 = _mm_cvtph_ps(_mm_loadl_epi64(at.add(128) as *const __m128i));
                    let d = _mm256_castps128_ps256(_mm_mul_ps(d4, _mm_set1_ps(x.d[b])));
                    for i in 0..4 {
                        let wv = _mm256_loadu_si256(at.add(i * 32) as *const __m256i);
                        let p16 =
                            _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
                        let p32 = _mm256_madd_epi16(p16, ones);
                        let di = _mm256_permutevar8x32_ps(d, lane[i]);
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), di, acc[i]);
                    }
                }
            }
            for i in 0..4 {
                let mut l = [0f32; 8];
                // SAFETY: `l` holds 8 values.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc[i]) };
                out[i] = (l[0] + l[4]) + (l[1] + l[5]) + ((l[2] + l[6]) + (l[3] + l[7]));
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::kernels::q4::quantize_row;

        use crate::testutil::uniform_values as values;

        /// Within half a step of the input, and 8-bit values come back
        /// as they were.
        #[test]
        fn quantization_is_close_and_idempotent() {
            let (rows, cols) = (6, 96);
            let w = values(rows * cols, 1);
            let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
            let back = q.dequantize();
            for (wb, qb) in w.chunks(BLOCK).zip(back.chunks(BLOCK)) {
                let amax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, c) in wb.iter().zip(qb) {
                    assert!((a - c).abs() <= amax / 127.0 * 0.51 + 1e-6, "{a} vs {c}");
                }
            }
            let again = Q8Matrix::quantize(&back, rows, cols).unwrap().dequantize();
            assert_eq!(back, again);
            assert!(Q8Matrix::quantize(&w, rows * 2, cols / 2).is_none());
        }

        /// The kernel (and the portable loop) compute exactly the
        /// dequantized weights times the 8-bit activations, for row counts
        /// that leave padded groups.
        #[test]
        fn matmul_equals_the_dequantized_product() {
            for (rows, cols, n) in [(9, 64, 1), (4, 576, 3), (13, 160, 2)] {
                let w = values(rows * cols, 2);
                let x: Vec<f32> = values(n * cols, 3).iter().map(|v| v * 7.0).collect();
                let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
                let wd = q.dequantize();
                let mut y = vec![0f32; n * rows];
                q.matmul(&x, n, &mut y);
                for t in 0..n {
                    let xr = quantize_row(&x[t * cols..(t + 1) * cols]);
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| {
                                wd[r * cols + c] as f64 * xr.q[c] as f64 * xr.d[c / BLOCK] as f64
                            })
                            .sum();
                        let got = y[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{got} vs {want}"
                        );
                        let scalar = q.dot_row_scalar(r, &xr) as f64;
                        assert!((scalar - want).abs() <= 1e-4 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }
}

/// f32 matrix products through the `gemm` crate (the one candle's CPU
/// matmul runs on), for the training fast path: a new product is written
/// without zero-filling its buffer first (candle zero-fills every matmul
/// output), and a product can accumulate into an existing buffer
/// (`dst += beta a b`), which spares the separate add pass and its output.
pub mod gemm {
    use gemm::Parallelism;

    /// A row-major matrix, or the transpose of one, as an operand.
    #[derive(Clone, Copy)]
    pub struct Mat<'a> {
        data: &'a [f32],
        rows: usize,
        cols: usize,
        rs: isize,
        cs: isize,
    }

    impl<'a> Mat<'a> {
        /// `data` holds `rows x cols` values, row-major.
        pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
            assert_eq!(data.len(), rows * cols, "gemm: a {rows} x {cols} matrix");
            Self {
                data,
                rows,
                cols,
                rs: cols as isize,
                cs: 1,
            }
        }

        /// The transpose, `(cols, rows)`, without moving data.
        pub fn t(self) -> Self {
            Self {
                rows: self.cols,
                cols: self.rows,
                rs: self.cs,
                cs: self.rs,
                ..self
            }
        }
    }

    fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
        let threads = candle_core::utils::get_num_threads();
        if threads > 1 && m * n * k >= 1 << 15 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        }
    }

    /// # Safety
    /// `dst` must hold `a.rows * b.cols` values (initialised when `acc`).
    unsafe fn run(dst: *mut f32, acc: bool, a: Mat, b: Mat, beta: f32) {
        assert_eq!(a.cols, b.rows, "gemm: inner dimensions");
        let (m, n, k) = (a.rows, b.cols, a.cols);
        // SAFETY: the operands' strides stay inside their slices (checked
        // at construction) and `dst` is `m x n` row-major (the caller).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                n as isize,
                acc,
                a.data.as_ptr(),
                a.cs,
                a.rs,
                b.data.as_ptr(),
                b.cs,
                b.rs,
                1.0,
                beta,
                false,
                false,
                false,
                parallelism(m, n, k),
            )
        }
    }

    /// `beta a b`, `(a.rows, b.cols)` row-major, in a new buffer.
    pub fn matmul(a: Mat, b: Mat, beta: f32) -> Vec<f32> {
        let len = a.rows * b.cols;
        if a.cols == 0 || len == 0 {
            return vec![0.0; len];
        }
        let mut out = Vec::with_capacity(len);
        // SAFETY: the buffer has room for `len` values, gemm writes every
        // one of them (it reads none: `acc` is false), then they count.
        unsafe {
            run(
                out.spare_capacity_mut().as_mut_ptr().cast(),
                false,
                a,
                b,
                beta,
            );
            out.set_len(len);
        }
        out
    }

    /// `dst += beta a b`, `dst` being `(a.rows, b.cols)` row-major.
    pub fn matmul_acc(dst: &mut [f32], a: Mat, b: Mat, beta: f32) {
        assert_eq!(dst.len(), a.rows * b.cols, "gemm: destination size");
        if a.cols == 0 || dst.is_empty() {
            return;
        }
        // SAFETY: `dst` has the size checked above and is initialised.
        unsafe { run(dst.as_mut_ptr(), true, a, b, beta) }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
            (0..m * n)
                .map(|ij| (0..k).map(|l| a[ij / n * k + l] * b[l * n + ij % n]).sum())
                .collect()
        }

        /// Every transpose combination, overwrite and accumulate, against
        /// the triple loop (shapes large enough to use the thread pool).
        #[test]
        fn products_equal_the_triple_loop() {
            let (m, k, n) = (37, 53, 41);
            let a = crate::testutil::uniform_values(m * k, 1);
            let b = crate::testutil::uniform_values(k * n, 2);
            let at: Vec<f32> = (0..k * m).map(|i| a[i % m * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[i % k * n + i / k]).collect();
            let want = naive(&a, &b, m, k, n);
            let ops = [
                (Mat::new(&a, m, k), Mat::new(&b, k, n)),
                (Mat::new(&at, k, m).t(), Mat::new(&b, k, n)),
                (Mat::new(&a, m, k), Mat::new(&bt, n, k).t()),
                (Mat::new(&at, k, m).t(), Mat::new(&bt, n, k).t()),
            ];
            for (i, (x, y)) in ops.into_iter().enumerate() {
                let got = matmul(x, y, 0.5);
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - 0.5 * w).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "case {i}: {d}");
                let mut acc = vec![1f32; m * n];
                matmul_acc(&mut acc, x, y, 2.0);
                let d = acc
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - 1.0 - 2.0 * w).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "case {i}, accumulated: {d}");
            }
            assert_eq!(
                matmul(Mat::new(&[], 3, 0), Mat::new(&[], 0, 2), 1.0),
                vec![0.0; 6]
            );
        }
    }
}
