//! The AVX2 + FMA forms of the slice primitives (see `slice`).

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
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
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
pub(super) fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
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
