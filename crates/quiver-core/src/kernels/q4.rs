//! 4-bit weights for decoding: the Q4_1 scheme of GGML (blocks of 32
//! weights, each with a scale `d` and a minimum `m`, values `d * q + m`
//! with `q` in `0..16`), with f32 scales kept apart from the packed
//! nibbles, and a matrix-vector product against activations quantized to
//! 8 bits per block on the fly.
//!
//! Q4_1 is what SmolLM2's GGUF file stores: quantizing its dequantized
//! weights again finds the same blocks' minimum and maximum, so decoding
//! runs on the file's own 4-bit weights. (candle has no SIMD kernel for
//! Q4_1, and re-quantizing them to its Q4_0 visibly hurt the text.) The
//! unsigned nibbles go straight into `maddubs` against the signed
//! activations, the minimum's share is one product per block with the
//! activations' f32 block sum, four weight rows share every activation
//! load, and the rows are split over candle's (spinning) thread pool.

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
                let xhi = _mm256_loadu_si256(x.pairs.as_ptr().add(p * 64 + 32) as *const __m256i);
                let row = |i: usize| {
                    let bytes = _mm256_loadu_si256(at.add(i * 32) as *const __m256i);
                    let lo = _mm256_and_si256(bytes, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low);
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi))
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
                        half::f16::from_bits((at.add(off) as *const u16).read_unaligned()).to_f32()
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
mod tests;
