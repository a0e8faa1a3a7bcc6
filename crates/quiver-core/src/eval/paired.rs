//! Paired comparisons of two routes on the same items (METHOD.md section
//! 4; issue 15): the difference of their accuracies with a 95% confidence
//! interval from a paired bootstrap, and McNemar's exact test.
//!
//! Both routes answer the same items, so their scores are compared item by
//! item: resampling pairs keeps the correlation between them, which makes
//! the interval much narrower than two independent standard errors would
//! (most items are answered the same by both). With several tasks, the
//! quantity is the mean of the per-task mean differences (the tables'
//! "average" column), and the bootstrap resamples items within each task
//! (a stratified bootstrap), so every resample has each task's size.

use rand::{Rng, SeedableRng};

/// Resamples of the paired bootstrap.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// One task's paired scores: `a[i]` and `b[i]` are the two routes' scores
/// (1.0 correct, 0.0 wrong, or any per-item metric) on item `i`.
#[derive(Debug, Clone, Default)]
pub struct PairedScores {
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

impl PairedScores {
    pub fn len(&self) -> usize {
        self.a.len()
    }
    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }
    fn mean_diff(&self) -> f64 {
        let n = self.a.len().max(1) as f64;
        self.a.iter().zip(&self.b).map(|(x, y)| x - y).sum::<f64>() / n
    }
}

/// `a - b` on the same items.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairedDiff {
    /// Items compared (over all tasks).
    pub n: usize,
    /// Mean of the per-task mean differences.
    pub diff: f64,
    /// 95% paired (stratified) bootstrap percentile interval of `diff`.
    pub ci_low: f64,
    pub ci_high: f64,
    /// Items `a` got right and `b` wrong, and the reverse (0/1 scores).
    pub a_only: usize,
    pub b_only: usize,
    /// McNemar's exact two-sided p-value on the discordant items.
    pub mcnemar_p: f64,
}

impl PairedDiff {
    /// Whether the interval excludes zero.
    pub fn significant(&self) -> bool {
        self.ci_low > 0.0 || self.ci_high < 0.0
    }
}

/// Compares `a` with `b` over `tasks` (each task's two score vectors of
/// equal length). Deterministic for a given `seed`.
pub fn paired_difference(tasks: &[PairedScores], resamples: usize, seed: u64) -> PairedDiff {
    let tasks: Vec<&PairedScores> = tasks.iter().filter(|t| !t.is_empty()).collect();
    for t in &tasks {
        assert_eq!(t.a.len(), t.b.len(), "paired scores of unequal length");
    }
    let n: usize = tasks.iter().map(|t| t.len()).sum();
    let k = tasks.len().max(1) as f64;
    let diff = tasks.iter().map(|t| t.mean_diff()).sum::<f64>() / k;
    let d: Vec<Vec<f64>> = tasks
        .iter()
        .map(|t| t.a.iter().zip(&t.b).map(|(x, y)| x - y).collect())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let mut total = 0.0;
        for di in &d {
            let m = di.len();
            let s: f64 = (0..m).map(|_| di[rng.random_range(0..m)]).sum();
            total += s / m as f64;
        }
        means.push(total / k);
    }
    means.sort_by(|x, y| x.total_cmp(y));
    let (ci_low, ci_high) = if means.is_empty() {
        (diff, diff)
    } else {
        (percentile(&means, 0.025), percentile(&means, 0.975))
    };
    let (mut a_only, mut b_only) = (0usize, 0usize);
    for t in &tasks {
        for (x, y) in t.a.iter().zip(&t.b) {
            if *x > 0.5 && *y <= 0.5 {
                a_only += 1;
            } else if *y > 0.5 && *x <= 0.5 {
                b_only += 1;
            }
        }
    }
    PairedDiff {
        n,
        diff,
        ci_low,
        ci_high,
        a_only,
        b_only,
        mcnemar_p: mcnemar_exact(a_only, b_only),
    }
}

/// The `q` quantile of sorted values, the smallest value with at least a
/// fraction `q` of the values at or below it (the inverse of the empirical
/// distribution function, as numpy's `inverted_cdf`).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let rank = (q * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// McNemar's exact test: two-sided p-value of `b` successes out of `b + c`
/// discordant pairs under Binomial(b + c, 1/2).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let lo = b.min(c);
    // P(X <= lo) in log space: C(n, i) / 2^n.
    let ln2n = n as f64 * std::f64::consts::LN_2;
    let mut ln_c = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0f64;
    for i in 0..=lo {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_c - ln2n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(a: &[u8], b: &[u8]) -> PairedScores {
        PairedScores {
            a: a.iter().map(|&x| x as f64).collect(),
            b: b.iter().map(|&x| x as f64).collect(),
        }
    }

    #[test]
    fn mcnemar_matches_hand_computed_values() {
        // 2 vs 8 discordant: P(X <= 2) = (1 + 10 + 45) / 1024, doubled.
        assert!((mcnemar_exact(2, 8) - 112.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(8, 2) - 112.0 / 1024.0).abs() < 1e-12);
        // Balanced: p = 1 (capped).
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // 0 vs 6: 2 / 64.
        assert!((mcnemar_exact(0, 6) - 2.0 / 64.0).abs() < 1e-12);
        // Large n stays finite and tiny.
        let p = mcnemar_exact(100, 300);
        assert!(p > 0.0 && p < 1e-20, "{p}");
    }

    #[test]
    fn bootstrap_of_three_items_matches_the_exact_distribution() {
        // Differences (1, 0, 0): the resampled mean is k/3 with k ~ Bin(3, 1/3):
        // P(0) = 8/27, P(1/3) = 12/27, P(2/3) = 6/27, P(1) = 1/27. The 2.5%
        // quantile is 0; P(<= 2/3) = 26/27 < 0.975, so the 97.5% one is 1.
        let d = paired_difference(&[scores(&[1, 0, 1], &[0, 0, 1])], 20_000, 7);
        assert_eq!(d.n, 3);
        assert!((d.diff - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(d.ci_low, 0.0);
        assert_eq!(d.ci_high, 1.0);
        assert_eq!((d.a_only, d.b_only), (1, 0));
        assert_eq!(d.mcnemar_p, 1.0);
    }

    #[test]
    fn identical_routes_have_a_zero_interval() {
        let d = paired_difference(&[scores(&[1, 0, 1, 1], &[1, 0, 1, 1])], 1000, 1);
        assert_eq!((d.diff, d.ci_low, d.ci_high), (0.0, 0.0, 0.0));
        assert!(!d.significant());
    }

    #[test]
    fn large_sample_interval_matches_the_normal_approximation() {
        // 400 items: a right on 240, b right on 200, 60 discordant a-only and
        // 20 b-only. Paired differences: +1 x 60, -1 x 20, 0 x 320: mean 0.1,
        // sd sqrt(80/400 - 0.01) = 0.4359, se 0.02179, 95% half-width 0.0427.
        let a: Vec<u8> = (0..400)
            .map(|i| u8::from(i < 60 || (80..260).contains(&i)))
            .collect();
        let b: Vec<u8> = (0..400).map(|i| u8::from((60..260).contains(&i))).collect();
        let d = paired_difference(&[scores(&a, &b)], BOOTSTRAP_RESAMPLES, 3);
        assert!((d.diff - 0.1).abs() < 1e-12);
        assert!((d.ci_low - (0.1 - 0.0427)).abs() < 0.006, "{d:?}");
        assert!((d.ci_high - (0.1 + 0.0427)).abs() < 0.006, "{d:?}");
        assert!(d.significant());
        assert_eq!((d.a_only, d.b_only), (60, 20));
        // Exact binomial, two-sided: 2 * sum_{i<=20} C(80, i) / 2^80 = 8.5806e-6.
        assert!((d.mcnemar_p - 8.5806e-6).abs() < 1e-9, "{}", d.mcnemar_p);
    }

    #[test]
    fn tasks_are_averaged_as_the_table_averages_them() {
        // Task 1: diff +1 on 1 item; task 2: diff 0 on 3 items. The table's
        // average is the mean of task means: 0.5, not 1/4.
        let d = paired_difference(
            &[scores(&[1], &[0]), scores(&[1, 0, 1], &[1, 0, 1])],
            2000,
            5,
        );
        assert!((d.diff - 0.5).abs() < 1e-12);
        assert_eq!((d.ci_low, d.ci_high), (0.5, 0.5));
        assert_eq!(d.n, 4);
    }
}
