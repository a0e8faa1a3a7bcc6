//! Slice primitives, dispatched to AVX2 + FMA or the portable loops.

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
