use super::*;

fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    (0..m * n)
        .map(|ij| (0..k).map(|l| a[ij / n * k + l] * b[l * n + ij % n]).sum())
        .collect()
}

/// Every transpose combination, overwrite and accumulate, against
/// the triple loop (shapes large enough to use the thread pool).
#[test]
fn products_equal_the_triple_loop() {
    let (m, k, n) = (37, 53, 41);
    let a = crate::testutil::uniform_values(m * k, 1);
    let b = crate::testutil::uniform_values(k * n, 2);
    let at: Vec<f32> = (0..k * m).map(|i| a[i % m * k + i / m]).collect();
    let bt: Vec<f32> = (0..n * k).map(|i| b[i % k * n + i / k]).collect();
    let want = naive(&a, &b, m, k, n);
    let ops = [
        (Mat::new(&a, m, k), Mat::new(&b, k, n)),
        (Mat::new(&at, k, m).t(), Mat::new(&b, k, n)),
        (Mat::new(&a, m, k), Mat::new(&bt, n, k).t()),
        (Mat::new(&at, k, m).t(), Mat::new(&bt, n, k).t()),
    ];
    for (i, (x, y)) in ops.into_iter().enumerate() {
        let got = matmul(x, y, 0.5);
        let d = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - 0.5 * w).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "case {i}: {d}");
        let mut acc = vec![1f32; m * n];
        matmul_acc(&mut acc, x, y, 2.0);
        let d = acc
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - 1.0 - 2.0 * w).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "case {i}, accumulated: {d}");
    }
    assert_eq!(
        matmul(Mat::new(&[], 3, 0), Mat::new(&[], 0, 2), 1.0),
        vec![0.0; 6]
    );
}
