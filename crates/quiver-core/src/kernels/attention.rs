//! Attention's softmax: the scaled causal softmax of a forward pass, its
//! backward, and one-query attention over cached keys and values for
//! decoding.

use super::{par_rows, par_rows_decode, slice, Shared};

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
