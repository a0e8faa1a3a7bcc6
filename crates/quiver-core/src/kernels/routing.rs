//! The inner loops of the routed LoRA layer's CPU path
//! ([`crate::routing::router`]): AVX2 + FMA where the CPU has them, the
//! portable loops beside them.

use super::{axpy, dot};

/// The two inner loops of the CPU path: `z = A x` and `y += B z`.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub(crate) project: fn(&[f32], usize, &[f32], &mut [f32]),
    pub(crate) lift: fn(&[f32], &[f32], usize, &mut [f32]),
}

impl Kernels {
    /// AVX2 + FMA where the CPU has them (the default x86-64 target only
    /// assumes 4-lane SSE, and the portable loops do not fuse), else the
    /// portable loops.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Self {
                project: simd::project_entry,
                lift: simd::lift_entry,
            };
        }
        Self { project, lift }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// [`super::project`] with AVX2 + FMA.
    pub(super) fn project_entry(a: &[f32], inp: usize, x: &[f32], z: &mut [f32]) {
        // SAFETY: only reachable through `Kernels::detect`, after checking
        // that the CPU has AVX2 and FMA.
        unsafe { project(a, inp, x, z) }
    }

    /// [`super::lift`] with AVX2 + FMA.
    pub(super) fn lift_entry(z: &[f32], bt: &[f32], out: usize, y: &mut [f32]) {
        // SAFETY: as for `project_entry`.
        unsafe { lift(z, bt, out, y) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn project(a: &[f32], inp: usize, x: &[f32], z: &mut [f32]) {
        let r = z.len();
        assert!(a.len() >= r * inp && x.len() >= inp, "project: bad lengths");
        let n8 = inp / 8 * 8;
        let mut j = 0;
        while j + 4 <= r {
            let mut acc = [_mm256_setzero_ps(); 4];
            for i in (0..n8).step_by(8) {
                // SAFETY: i + 8 <= inp, and rows j..j+4 of `a` and `x` hold
                // `inp` values each (asserted above).
                unsafe {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                    for (q, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_loadu_ps(a.as_ptr().add((j + q) * inp + i));
                        *acc = _mm256_fmadd_ps(av, xv, *acc);
                    }
                }
            }
            for (q, acc) in acc.iter().enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds 8 values.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *acc) };
                let row = &a[(j + q) * inp..(j + q + 1) * inp];
                let tail: f32 = row[n8..].iter().zip(&x[n8..inp]).map(|(a, b)| a * b).sum();
                z[j + q] = super::hsum8(&lanes) + tail;
            }
            j += 4;
        }
        for (q, zq) in z.iter_mut().enumerate().skip(j) {
            *zq = super::dot(&a[q * inp..(q + 1) * inp], &x[..inp]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn lift(z: &[f32], bt: &[f32], out: usize, y: &mut [f32]) {
        let r = z.len();
        assert!(bt.len() >= r * out && y.len() >= out, "lift: bad lengths");
        let n8 = out / 8 * 8;
        let mut j = 0;
        while j + 4 <= r {
            let zv = [
                _mm256_set1_ps(z[j]),
                _mm256_set1_ps(z[j + 1]),
                _mm256_set1_ps(z[j + 2]),
                _mm256_set1_ps(z[j + 3]),
            ];
            for i in (0..n8).step_by(8) {
                // SAFETY: i + 8 <= out, `y` holds `out` values and rows
                // j..j+4 of `bt` hold `out` values each (asserted above).
                unsafe {
                    let mut yv = _mm256_loadu_ps(y.as_ptr().add(i));
                    for (q, zq) in zv.iter().enumerate() {
                        let bv = _mm256_loadu_ps(bt.as_ptr().add((j + q) * out + i));
                        yv = _mm256_fmadd_ps(bv, *zq, yv);
                    }
                    _mm256_storeu_ps(y.as_mut_ptr().add(i), yv);
                }
            }
            for i in n8..out {
                y[i] += (0..4)
                    .map(|q| z[j + q] * bt[(j + q) * out + i])
                    .sum::<f32>();
            }
            j += 4;
        }
        for (q, &zq) in z.iter().enumerate().skip(j) {
            super::axpy(zq, &bt[q * out..(q + 1) * out], &mut y[..out]);
        }
    }
}

/// `z = A x` for `A` (`r x inp`, row-major): four rows per pass over `x`,
/// each with eight independent partial sums, so the loop vectorises
/// without reassociating a single sum.
#[inline(always)]
pub(crate) fn project(a: &[f32], inp: usize, x: &[f32], z: &mut [f32]) {
    let r = z.len();
    let mut j = 0;
    while j + 4 <= r {
        let rows = [
            &a[j * inp..(j + 1) * inp],
            &a[(j + 1) * inp..(j + 2) * inp],
            &a[(j + 2) * inp..(j + 3) * inp],
            &a[(j + 3) * inp..(j + 4) * inp],
        ];
        let (mut c0, mut c1, mut c2, mut c3) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
        let n8 = inp / 8 * 8;
        for i in (0..n8).step_by(8) {
            let xs: &[f32; 8] = x[i..i + 8].try_into().expect("8 values");
            let r0: &[f32; 8] = rows[0][i..i + 8].try_into().expect("8 values");
            let r1: &[f32; 8] = rows[1][i..i + 8].try_into().expect("8 values");
            let r2: &[f32; 8] = rows[2][i..i + 8].try_into().expect("8 values");
            let r3: &[f32; 8] = rows[3][i..i + 8].try_into().expect("8 values");
            for l in 0..8 {
                c0[l] += r0[l] * xs[l];
            }
            for l in 0..8 {
                c1[l] += r1[l] * xs[l];
            }
            for l in 0..8 {
                c2[l] += r2[l] * xs[l];
            }
            for l in 0..8 {
                c3[l] += r3[l] * xs[l];
            }
        }
        for (q, (acc, row)) in [c0, c1, c2, c3].iter().zip(&rows).enumerate() {
            let tail: f32 = row[n8..].iter().zip(&x[n8..]).map(|(a, b)| a * b).sum();
            z[j + q] = hsum8(acc) + tail;
        }
        j += 4;
    }
    for (q, zq) in z.iter_mut().enumerate().skip(j) {
        *zq = dot(&a[q * inp..(q + 1) * inp], x);
    }
}

/// Sum of eight lanes, pairwise.
#[inline(always)]
fn hsum8(v: &[f32; 8]) -> f32 {
    ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
}

/// `y += B z` with `B^T` (`r x out`, row-major): one pass over `y` per
/// four rows.
#[inline(always)]
pub(crate) fn lift(z: &[f32], bt: &[f32], out: usize, y: &mut [f32]) {
    let r = z.len();
    let mut j = 0;
    while j + 4 <= r {
        let (b0, b1, b2, b3) = (
            &bt[j * out..(j + 1) * out],
            &bt[(j + 1) * out..(j + 2) * out],
            &bt[(j + 2) * out..(j + 3) * out],
            &bt[(j + 3) * out..(j + 4) * out],
        );
        let (z0, z1, z2, z3) = (z[j], z[j + 1], z[j + 2], z[j + 3]);
        for ((((yi, p0), p1), p2), p3) in y.iter_mut().zip(b0).zip(b1).zip(b2).zip(b3) {
            *yi += z0 * p0 + z1 * p1 + z2 * p2 + z3 * p3;
        }
        j += 4;
    }
    for (q, &zq) in z.iter().enumerate().skip(j) {
        axpy(zq, &bt[q * out..(q + 1) * out], y);
    }
}
