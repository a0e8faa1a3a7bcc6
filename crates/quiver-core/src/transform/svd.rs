//! Sparsification and truncated SVD of flattened experts, MBC steps 3 and 4
//! of METHOD.md section 1.
//!
//! mttl zeroes, per expert, the entries at or below the q-quantile of
//! |values| (numpy's linear-interpolation quantile) and then calls
//! scikit-learn's `TruncatedSVD(algorithm="randomized", n_iter=5,
//! n_oversamples=10)`, whose `fit_transform` returns `U_k S_k` (no
//! centring). [`truncated_svd_embed`] is that randomized SVD (Halko,
//! Martinsson and Tropp, 2011) in faer: a Gaussian sketch, power iterations
//! re-orthonormalised by QR, a QR of the projected matrix and a small SVD.
//!
//! When the sketch would have at least as many columns as there are
//! experts (N <= n_components + 10, which covers every library of a few
//! dozen experts) the range finder spans all of R^N anyway, so we skip the
//! sketch and the result is the exact thin SVD (QR of `X^T`, then the SVD
//! of the N x N factor). The expert matrix is held once, as `X^T` (`D x N`,
//! column-major, so each expert is one contiguous column), in f32 as
//! scikit-learn keeps float32 input; only the small factors are f64.

use faer::{Mat, MatRef};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Extra sketch columns, as scikit-learn's `n_oversamples`.
pub const OVERSAMPLES: usize = 10;
/// Power iterations, as scikit-learn's `TruncatedSVD(n_iter=5)`.
pub const POWER_ITERATIONS: usize = 5;

/// numpy's default (`linear`) quantile of `values`: the value at position
/// `q * (n - 1)` of the sorted values, interpolated between neighbours.
/// Reorders `values`.
pub fn quantile_in_place(values: &mut [f32], q: f64) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let (_, v_lo, upper) = values.select_nth_unstable_by(lo, f32::total_cmp);
    let v_lo = *v_lo as f64;
    let frac = pos - lo as f64;
    if frac == 0.0 || upper.is_empty() {
        return v_lo;
    }
    let v_hi = upper.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    v_lo + frac * (v_hi - v_lo)
}

/// Zeroes the entries of `v` whose |value| is at or below the q-quantile of
/// |v| (MBC step 3). Returns the threshold. `q <= 0` leaves `v` unchanged.
pub fn sparsify(v: &mut [f32], q: f64) -> f64 {
    if q <= 0.0 || v.is_empty() {
        return 0.0;
    }
    let mut abs: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let thr = quantile_in_place(&mut abs, q);
    for x in v.iter_mut() {
        if (x.abs() as f64) <= thr {
            *x = 0.0;
        }
    }
    thr
}

/// A standard normal sample (Box-Muller), so the sketch depends only on
/// `rand`'s uniform stream.
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Orthonormal basis of the columns of `m` (thin Q of its QR).
fn orthonormalize(m: MatRef<'_, f32>) -> Mat<f32> {
    m.qr().compute_thin_Q()
}

/// `U_k S_k` of the truncated SVD of `X` (`N x D`, given as `xt` = `X^T`),
/// with `k = min(n_components, N, D)`, singular values in decreasing order
/// and each column's sign fixed so its largest-|value| entry is positive
/// (scikit-learn's `svd_flip`), so the output is deterministic.
///
/// # Shapes
/// * `xt`: `(D, N)`, one column per expert.
/// * returns `(N, k)`.
pub fn truncated_svd_embed(
    xt: MatRef<'_, f32>,
    n_components: usize,
    seed: u64,
) -> Result<Mat<f64>> {
    let (d, n) = xt.shape();
    if n == 0 || d == 0 || n_components == 0 {
        return Err(Error::invalid(format!(
            "truncated SVD needs at least one expert, one parameter and one component (got {n} experts, {d} parameters, {n_components} components)"
        )));
    }
    let k = n_components.min(n).min(d);
    let sketch = k + OVERSAMPLES;
    // `q` is the range basis of `X` (`N x l`); `None` stands for I_N.
    let q = if sketch >= n {
        None
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Column-major fill: the stream maps to the same matrix every time.
        let mut omega = Mat::<f32>::zeros(d, sketch);
        for j in 0..sketch {
            for i in 0..d {
                omega[(i, j)] = normal(&mut rng);
            }
        }
        let mut y: Mat<f32> = xt.transpose() * &omega; // N x l
        drop(omega);
        for _ in 0..POWER_ITERATIONS {
            let qy = orthonormalize(y.as_ref());
            let z = orthonormalize((xt * &qy).as_ref()); // D x l
            y = xt.transpose() * &z;
        }
        Some(orthonormalize(y.as_ref()))
    };
    // B = Q^T X = R^T Qb^T with `B^T = Qb R`; only R is needed for the U
    // and S of B.
    let qr = match &q {
        None => xt.qr(),
        Some(q) => (xt * q).qr(),
    };
    let r = qr.thin_R();
    let rt = Mat::<f64>::from_fn(r.ncols(), r.nrows(), |i, j| r[(j, i)] as f64);
    let svd = rt.thin_svd().map_err(|e| {
        Error::invalid(format!(
            "the SVD of the expert matrix did not converge ({e:?})"
        ))
    })?;
    let ub = svd.U(); // l x l (or N x N on the exact path)
    let s = svd.S().column_vector();
    let u: Mat<f64> = match &q {
        None => ub.to_owned(),
        Some(q) => {
            let q = Mat::<f64>::from_fn(q.nrows(), q.ncols(), |i, j| q[(i, j)] as f64);
            &q * ub
        }
    };
    let k = k.min(u.ncols());
    let mut emb = Mat::<f64>::zeros(n, k);
    for j in 0..k {
        let col = u.col(j);
        let (mut best, mut sign) = (0.0f64, 1.0f64);
        for i in 0..n {
            if col[i].abs() > best {
                best = col[i].abs();
                sign = col[i].signum();
            }
        }
        for i in 0..n {
            emb[(i, j)] = sign * col[i] * s[j];
        }
    }
    Ok(emb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_numpy() {
        // np.quantile([1, 2, 3, 4], 0.5) == 2.5; np.quantile([3, 1, 2], 0.25) == 1.5
        assert_eq!(quantile_in_place(&mut [4.0, 1.0, 3.0, 2.0], 0.5), 2.5);
        assert_eq!(quantile_in_place(&mut [3.0, 1.0, 2.0], 0.25), 1.5);
        assert_eq!(quantile_in_place(&mut [3.0, 1.0, 2.0], 1.0), 3.0);
        assert_eq!(quantile_in_place(&mut [5.0], 0.5), 5.0);
    }

    #[test]
    fn sparsify_zeroes_at_or_below_threshold() {
        let mut v = vec![0.1, -0.4, 0.2, -0.3];
        let thr = sparsify(&mut v, 0.5); // |v| sorted 0.1 0.2 0.3 0.4 -> 0.25
        assert!((thr - 0.25).abs() < 1e-6);
        assert_eq!(v, vec![0.0, -0.4, 0.0, -0.3]);
        // Ties at the threshold are zeroed too ("at or below").
        let mut v = vec![1.0, 1.0, 1.0, 2.0];
        sparsify(&mut v, 0.5);
        assert_eq!(v, vec![0.0, 0.0, 0.0, 2.0]);
    }

    /// The Gram matrix of `U_k S_k` equals `X X^T` when k covers the rank,
    /// on both the exact and the randomized path.
    fn check_gram(n: usize, d: usize, rank: usize, n_components: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let left = Mat::<f32>::from_fn(d, rank, |_, _| normal(&mut rng));
        let right = Mat::<f32>::from_fn(rank, n, |_, _| normal(&mut rng));
        let xt: Mat<f32> = &left * &right;
        let emb = truncated_svd_embed(xt.as_ref(), n_components, 3).unwrap();
        assert_eq!(emb.nrows(), n);
        let g = &emb * emb.transpose();
        let xt64 = Mat::<f64>::from_fn(d, n, |i, j| xt[(i, j)] as f64);
        let g_ref = xt64.transpose() * &xt64;
        let scale = (0..n).map(|i| g_ref[(i, i)]).fold(0.0, f64::max);
        for i in 0..n {
            for j in 0..n {
                let err = (g[(i, j)] - g_ref[(i, j)]).abs() / scale;
                assert!(
                    err < 1e-4,
                    "gram ({i},{j}): {} vs {}",
                    g[(i, j)],
                    g_ref[(i, j)]
                );
            }
        }
    }

    #[test]
    fn exact_path_preserves_gram() {
        check_gram(12, 300, 12, 64);
    }

    #[test]
    fn fewer_parameters_than_experts() {
        check_gram(12, 5, 5, 64);
        check_gram(40, 6, 6, 20);
    }

    #[test]
    fn randomized_path_recovers_low_rank() {
        // N = 40 > k + 10 = 30: the sketch is used; rank 8 <= k, so exact.
        check_gram(40, 500, 8, 20);
    }
}
