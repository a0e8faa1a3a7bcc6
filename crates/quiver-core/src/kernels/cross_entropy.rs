//! The cross-entropy's softmax over the vocabulary: per-row
//! log-sum-exp and the gradient `softmax - onehot`.

use super::{par_rows, slice, Shared};

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
