//! Quiver's Q8_0 kernel (`--quantize q8_0`): 8-bit weights in blocks of 32
//! with one f16 step each (GGUF's Q8_0 values), in the same one-stream
//! layout as [`q4`](super::q4), against the same 8-bit activations.
//!
//! One activation row (decoding) goes through [`Q8Matrix::matmul`]'s
//! row-by-row product, bound by reading the weights. Two rows or more
//! (prefill, batched scoring with `--quantize-rows`) take the tiled product:
//! each weight block, loaded once, meets two activation rows, and the 8-bit
//! products are summed by the widest instruction the CPU has
//! ([`DotKernel`]): AVX512-VNNI's or AVX-VNNI's `vpdpbusd`, else AVX2's
//! `vpmaddubsw` + `vpmaddwd`. Every kernel computes the same integer sums,
//! so they agree to the last bit; [`Q8Matrix::dot_row_scalar`] is the plain
//! reference they are tested against.

use super::q4::{avx2_f16c, f16_at, grouped_matmul, quantize_groups, round_even, Q8Row, BLOCK};
use super::{par_rows, Shared};

/// The 8-bit dot-product instructions the tiled Q8_0 product runs on,
/// detected at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotKernel {
    /// Plain loops: no SIMD 8-bit products on this CPU (or not x86-64).
    Portable,
    /// AVX2: `vpmaddubsw` (pairs of 8-bit products into 16 bits) and
    /// `vpmaddwd` (into 32 bits), with FMA and F16C.
    Avx2,
    /// AVX-VNNI (256-bit `vpdpbusd`: four 8-bit products into 32 bits).
    AvxVnni,
    /// AVX512-VNNI with AVX512VL (the same `vpdpbusd` on 256-bit registers).
    Avx512Vnni,
}

impl DotKernel {
    /// The widest kernel this CPU runs.
    pub fn detect() -> Self {
        [DotKernel::Avx512Vnni, DotKernel::AvxVnni, DotKernel::Avx2]
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(DotKernel::Portable)
    }

    /// Whether this CPU has `self`'s instructions (always true of
    /// [`DotKernel::Portable`]).
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                DotKernel::Portable => true,
                DotKernel::Avx2 => avx2_f16c(),
                DotKernel::AvxVnni => avx2_f16c() && has!("avxvnni"),
                DotKernel::Avx512Vnni => {
                    avx2_f16c() && has!("avx512f") && has!("avx512vl") && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == DotKernel::Portable
        }
    }

    /// The instruction set, for messages (`AVX512-VNNI`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DotKernel::Portable => "portable loops",
            DotKernel::Avx2 => "AVX2",
            DotKernel::AvxVnni => "AVX-VNNI",
            DotKernel::Avx512Vnni => "AVX512-VNNI",
        }
    }
}

/// Weight groups (of 4 rows) a thread keeps in L1 while every activation
/// row passes: 8 groups of SmolLM2's 1536-wide rows are 52 KB of 8-bit
/// weights, most of them still in L1/L2 on the next pass.
const TILE_GROUPS: usize = 8;

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

    /// `y = x W^T` for `n` rows of `x` (`n x cols`), `y` is `n x rows`:
    /// the activations quantized to 8 bits per block of 32, then the
    /// tiled product on the CPU's widest [`DotKernel`] when `n >= 2`.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_with(DotKernel::detect(), x, n, y)
    }

    /// [`Q8Matrix::matmul`] on a given kernel (for tests and benchmarks);
    /// one the CPU lacks falls back to the detected one.
    pub fn matmul_with(&self, kernel: DotKernel, x: &[f32], n: usize, y: &mut [f32]) {
        let kernel = if kernel.available() {
            kernel
        } else {
            DotKernel::detect()
        };
        if n >= 2 && kernel != DotKernel::Portable {
            return self.matmul_tiled(kernel, x, n, y);
        }
        let gb = self.nb() * BLOCK_BYTES;
        grouped_matmul(self.rows, self.cols, gb, x, n, y, |g, xr, acc| {
            self.dot_group(g, xr, acc)
        });
    }

    /// The tiled product: threads take ranges of weight groups; per
    /// [`TILE_GROUPS`] groups every pair of activation rows passes.
    fn matmul_tiled(&self, kernel: DotKernel, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(
            x.len() == n * cols && y.len() == n * rows,
            "quantized matmul: shapes"
        );
        let xq: Vec<Q8Row> = x.chunks_exact(cols).map(super::q4::quantize_row).collect();
        let out = Shared(y.as_mut_ptr());
        par_rows(rows.div_ceil(4), n * cols, |range| {
            let mut g0 = range.start;
            while g0 < range.end {
                let g1 = (g0 + TILE_GROUPS).min(range.end);
                for t in (0..n).step_by(2) {
                    // An odd last row is computed twice; the copy is dropped.
                    let (xa, xb) = (&xq[t], &xq[(t + 1).min(n - 1)]);
                    for g in g0..g1 {
                        let mut acc = [[0f32; 4]; 2];
                        self.dot_group2(kernel, g, xa, xb, &mut acc);
                        let r = g * 4;
                        let m = (rows - r).min(4);
                        for (i, tt) in [t, t + 1].into_iter().enumerate().filter(|&(_, tt)| tt < n)
                        {
                            // SAFETY: row tt's outputs r..r + m belong to this
                            // range of groups, which only this call writes.
                            let yt = unsafe { out.span(tt * rows + r, m) };
                            yt.copy_from_slice(&acc[i][..m]);
                        }
                    }
                }
                g0 = g1;
            }
        });
    }

    /// Group `g`'s 4 dot products with two activation rows.
    fn dot_group2(
        &self,
        kernel: DotKernel,
        g: usize,
        xa: &Q8Row,
        xb: &Q8Row,
        acc: &mut [[f32; 4]; 2],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `kernel` is available on this CPU (checked by
            // matmul_with); group g exists (padded to 4 rows).
            match kernel {
                DotKernel::Avx512Vnni => {
                    return unsafe { simd::dot4x2_avx512vnni(self, g, xa, xb, acc) }
                }
                DotKernel::AvxVnni => return unsafe { simd::dot4x2_avxvnni(self, g, xa, xb, acc) },
                DotKernel::Avx2 => return unsafe { simd::dot4x2_avx2(self, g, xa, xb, acc) },
                DotKernel::Portable => {}
            }
        }
        let _ = kernel;
        for (a, x) in acc.iter_mut().zip([xa, xb]) {
            for (i, v) in a.iter_mut().enumerate() {
                *v = self.dot_row_scalar(g * 4 + i, x);
            }
        }
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

/// The tiled kernel for one instruction set: `|a, s| pair` sums the 8-bit
/// products of `a` (|w|, unsigned) and `s` (x with w's sign) four at a
/// time into 32-bit lanes. Per block, the 4 rows' weights are loaded once
/// for both activation rows; the 4 rows' lane sums are folded by two
/// rounds of `vphaddd` into one register (each half a partial sum of the 4
/// rows) and scaled by the 4 rows' f16 steps times the activation's step.
#[cfg(target_arch = "x86_64")]
macro_rules! dot4x2 {
    ($(#[$doc:meta])* $name:ident, $features:literal, |$a:ident, $s:ident| $pair:expr) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub(super) fn $name(w: &Q8Matrix, g: usize, xa: &Q8Row, xb: &Q8Row, out: &mut [[f32; 4]; 2]) {
            let nb = w.nb();
            assert!((g + 1) * nb * BLOCK_BYTES <= w.data.len());
            for x in [xa, xb] {
                assert!(x.q.len() >= nb * BLOCK && x.d.len() >= nb);
            }
            let base = w.data.as_ptr().wrapping_add(g * nb * BLOCK_BYTES);
            let mut acc = [_mm256_setzero_ps(); 2];
            for b in 0..nb {
                // SAFETY: block b of group g holds BLOCK_BYTES bytes and
                // block b of each activation row 32 values (asserted above).
                unsafe {
                    let at = base.add(b * BLOCK_BYTES);
                    let dw = _mm_cvtph_ps(_mm_loadl_epi64(at.add(128) as *const __m128i));
                    let wv: [__m256i; 4] =
                        std::array::from_fn(|i| _mm256_loadu_si256(at.add(i * 32) as *const __m256i));
                    let aw: [__m256i; 4] = std::array::from_fn(|i| _mm256_abs_epi8(wv[i]));
                    for (j, x) in [xa, xb].into_iter().enumerate() {
                        let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK) as *const __m256i);
                        let p: [__m256i; 4] = std::array::from_fn(|i| {
                            let $a = aw[i];
                            let $s = _mm256_sign_epi8(xv, wv[i]);
                            $pair
                        });
                        let h = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(p[0], p[1]),
                            _mm256_hadd_epi32(p[2], p[3]),
                        );
                        let d = _mm_mul_ps(dw, _mm_set1_ps(x.d[b]));
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_set_m128(d, d), acc[j]);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                // SAFETY: `o` holds 4 values.
                unsafe { _mm_storeu_ps(o.as_mut_ptr(), s) };
            }
        }
    };
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

    dot4x2!(
        /// AVX2: 16-bit pair sums (at most 2 * 127 * 127), then 32-bit.
        dot4x2_avx2, "avx2,fma,f16c",
        |a, s| _mm256_madd_epi16(_mm256_maddubs_epi16(a, s), _mm256_set1_epi16(1))
    );
    dot4x2!(
        /// AVX-VNNI: four products straight into each 32-bit lane.
        dot4x2_avxvnni, "avx2,fma,f16c,avxvnni",
        |a, s| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, s)
    );
    dot4x2!(
        /// AVX512-VNNI on 256-bit registers (AVX512VL).
        dot4x2_avx512vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        |a, s| _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, s)
    );
}

#[cfg(test)]
mod tests;
