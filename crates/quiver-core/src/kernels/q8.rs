//! Quiver's Q8_0 kernel (`--quantize q8_0`): 8-bit weights in blocks of 32
//! with one f16 step each (GGUF's Q8_0 values), in the same one-stream
//! layout as [`q4`](super::q4), against the same 8-bit activations.

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
                    let p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
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
mod tests;
