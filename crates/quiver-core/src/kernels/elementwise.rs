//! Elementwise kernels: the SiLU-gated product and its gradient,
//! RMSNorm's backward, and the `y += x`, `y += c x` and dot-product
//! loops the other kernels share.

use super::{par_rows, slice, Shared, FLAT_ROW};

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
