//! k-means with k-means++ initialisation and restarts, MBC step 6 of
//! METHOD.md section 1 (mttl calls scikit-learn's `KMeans(n_init=10)` on
//! the rows of the similarity matrix).
//!
//! Follows scikit-learn's Lloyd: greedy k-means++ (`2 + ln k` candidate
//! centres per step, keep the one that lowers the potential most), Lloyd
//! iterations until no label changes (at most [`MAX_ITER`]), an emptied
//! cluster takes the point farthest from its centre, and the restart with
//! the lowest inertia wins (the first on ties). One seeded stream drives all
//! restarts, so a seed fixes the result.

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Lloyd iterations per restart, as scikit-learn's `max_iter`.
pub const MAX_ITER: usize = 300;

/// The best of the restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// Cluster of each row, in `0..k`; every cluster has at least one row.
    pub labels: Vec<usize>,
    /// `k` centres, each as long as a row.
    pub centers: Vec<Vec<f64>>,
    /// Sum of squared distances of the rows to their centres.
    pub inertia: f64,
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Index drawn with probability proportional to `weights` (uniform when
/// they are all zero).
fn draw(weights: &[f64], rng: &mut impl Rng) -> usize {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return rng.random_range(0..weights.len());
    }
    let mut t = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if t < *w {
            return i;
        }
        t -= w;
    }
    // Rounding: the last point with weight.
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

/// Greedy k-means++ (scikit-learn's `_kmeans_plusplus`).
fn kmeans_plus_plus(xs: &[Vec<f64>], k: usize, rng: &mut impl Rng) -> Vec<Vec<f64>> {
    let n = xs.len();
    let trials = 2 + (k as f64).ln().floor() as usize;
    let mut centers = vec![xs[rng.random_range(0..n)].clone()];
    let mut closest: Vec<f64> = xs.iter().map(|x| sq_dist(x, &centers[0])).collect();
    while centers.len() < k {
        let mut best: Option<(f64, usize, Vec<f64>)> = None;
        for _ in 0..trials {
            let c = draw(&closest, rng);
            let next: Vec<f64> = xs
                .iter()
                .zip(&closest)
                .map(|(x, d)| d.min(sq_dist(x, &xs[c])))
                .collect();
            let potential: f64 = next.iter().sum();
            if best.as_ref().is_none_or(|(p, _, _)| potential < *p) {
                best = Some((potential, c, next));
            }
        }
        let (_, c, next) = best.expect("at least two trials");
        centers.push(xs[c].clone());
        closest = next;
    }
    centers
}

fn nearest(x: &[f64], centers: &[Vec<f64>]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (j, c) in centers.iter().enumerate() {
        let d = sq_dist(x, c);
        if d < best.1 {
            best = (j, d);
        }
    }
    best
}

/// Lloyd's iterations from `centers`.
fn lloyd(xs: &[Vec<f64>], mut centers: Vec<Vec<f64>>) -> KMeans {
    let (n, k, dim) = (xs.len(), centers.len(), xs[0].len());
    let mut labels = vec![usize::MAX; n];
    for _ in 0..MAX_ITER {
        let mut changed = false;
        let mut dists = vec![0.0; n];
        for (i, x) in xs.iter().enumerate() {
            let (j, d) = nearest(x, &centers);
            changed |= labels[i] != j;
            labels[i] = j;
            dists[i] = d;
        }
        // An empty cluster takes the point farthest from its centre among
        // clusters that can spare one (k <= n, so one always can).
        let mut sizes = vec![0usize; k];
        for &l in &labels {
            sizes[l] += 1;
        }
        for j in 0..k {
            if sizes[j] == 0 {
                let far = (0..n)
                    .filter(|&i| sizes[labels[i]] > 1)
                    .max_by(|&a, &b| dists[a].total_cmp(&dists[b]).then(b.cmp(&a)))
                    .expect("k <= n");
                sizes[labels[far]] -= 1;
                labels[far] = j;
                sizes[j] = 1;
                dists[far] = 0.0;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        centers = vec![vec![0.0; dim]; k];
        for (x, &l) in xs.iter().zip(&labels) {
            for (c, v) in centers[l].iter_mut().zip(x) {
                *c += v;
            }
        }
        for (c, &s) in centers.iter_mut().zip(&sizes) {
            for v in c.iter_mut() {
                *v /= s as f64;
            }
        }
    }
    let inertia = xs
        .iter()
        .zip(&labels)
        .map(|(x, &l)| sq_dist(x, &centers[l]))
        .sum();
    KMeans {
        labels,
        centers,
        inertia,
    }
}

/// k-means on `rows` with k-means++ initialisation, `restarts` runs from
/// one seeded stream, keeping the run with the lowest inertia.
///
/// # Shapes
/// * `rows`: `n` rows of equal length; returns `n` labels and `k` centres.
pub fn kmeans(rows: &[Vec<f32>], k: usize, restarts: usize, seed: u64) -> Result<KMeans> {
    let n = rows.len();
    if k == 0 {
        return Err(Error::invalid("k-means needs k >= 1 clusters"));
    }
    if k > n {
        return Err(Error::invalid(format!(
            "cannot make {k} clusters from {n} points: k must be at most the number of points"
        )));
    }
    let dim = rows[0].len();
    if rows.iter().any(|r| r.len() != dim) {
        return Err(Error::invalid("k-means rows must all have the same length"));
    }
    if rows.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "k-means rows contain NaN or infinite values",
        ));
    }
    let xs: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut best: Option<KMeans> = None;
    for _ in 0..restarts.max(1) {
        let run = lloyd(&xs, kmeans_plus_plus(&xs, k, &mut rng));
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    Ok(best.expect("at least one restart"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        for (cx, cy) in [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)] {
            for i in 0..5 {
                let e = i as f32 * 0.1;
                rows.push(vec![cx + e, cy - e]);
            }
        }
        rows
    }

    #[test]
    fn separates_blobs() {
        let km = kmeans(&blobs(), 3, 10, 0).unwrap();
        for g in 0..3 {
            let l = km.labels[g * 5];
            assert!(km.labels[g * 5..g * 5 + 5].iter().all(|&x| x == l));
        }
        let mut distinct = km.labels.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
        assert!(km.inertia < 1.0, "{}", km.inertia);
    }

    #[test]
    fn identical_points_still_give_k_nonempty_clusters() {
        let rows = vec![vec![1.0f32, 1.0]; 4];
        let km = kmeans(&rows, 3, 2, 0).unwrap();
        for j in 0..3 {
            assert!(km.labels.contains(&j));
        }
        assert_eq!(km.inertia, 0.0);
    }

    #[test]
    fn k_out_of_range() {
        assert!(kmeans(&blobs(), 0, 1, 0).is_err());
        let e = kmeans(&blobs(), 16, 1, 0).unwrap_err().to_string();
        assert!(e.contains("16 clusters from 15 points"), "{e}");
    }
}
