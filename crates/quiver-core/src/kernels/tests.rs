use super::routing::{lift, project, Kernels};
use super::*;

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    // A deterministic spread over [-12, 12] with some exact zeros.
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            if i % 17 == 0 {
                0.0
            } else {
                (h % 24_000) as f32 / 1000.0 - 12.0
            }
        })
        .collect()
}

#[test]
fn exp_matches_libm_over_the_range_and_handles_specials() {
    let x: Vec<f32> = (-870..=883).map(|i| i as f32 * 0.1 + 0.0123).collect();
    let mut y = vec![0f32; x.len()];
    let sum = slice::exp_affine(&x, 1.0, 0.0, &mut y);
    for (&a, &b) in x.iter().zip(&y) {
        assert!(close(b, a.exp(), 1e-6), "exp({a}) = {b}, libm {}", a.exp());
    }
    assert!(sum.is_infinite(), "the sum of these overflows f32");
    let x: Vec<f32> = (-200..=200).map(|i| i as f32 * 0.1 + 0.0123).collect();
    let sum = slice::exp_affine(&x, 0.5, 1.0, &mut vec![0f32; x.len()]);
    let want: f64 = x.iter().map(|v| (0.5 * *v as f64 - 1.0).exp()).sum();
    assert!(((sum as f64 - want) / want).abs() < 1e-5);
    // Odd lengths exercise the tail; NaN propagates; -inf underflows.
    let mut y = [0f32; 3];
    slice::exp_affine(&[f32::NAN, f32::NEG_INFINITY, 1.0], 1.0, 0.0, &mut y);
    assert!(y[0].is_nan());
    assert!(y[1] < 1e-37);
    assert!(close(y[2], std::f32::consts::E, 1e-6));
    assert!(slice::max(&[1.0, f32::NAN, 3.0]).is_nan());
    for n in [0, 5, 8, 37] {
        let v = values(n, 1);
        let want = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert_eq!(slice::max(&v), want, "max of {n} values");
    }
}

#[test]
fn silu_mul_and_its_gradient_match_the_formulas() {
    for n in [1, 7, 8, 9, 1000, 40_000] {
        let (g, u, dy) = (values(n, 3), values(n, 5), values(n, 7));
        let mut y = vec![0f32; n];
        silu_mul(&g, &u, &mut y);
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        silu_mul_backward(&g, &u, &dy, &mut dg, &mut du);
        for i in 0..n {
            let (gv, uv, yv) = (g[i] as f64, u[i] as f64, dy[i] as f64);
            let s = 1.0 / (1.0 + (-gv).exp());
            assert!(close(y[i], (gv * s * uv) as f32, 1e-5), "y[{i}]");
            let want_dg = yv * uv * s * (1.0 + gv * (1.0 - s));
            assert!(close(dg[i], want_dg as f32, 1e-5), "dg[{i}]");
            assert!(close(du[i], (yv * gv * s) as f32, 1e-5), "du[{i}]");
        }
    }
}

#[test]
fn causal_softmax_masks_scales_and_normalises() {
    let (seq, offset, scale) = (5, 3, 0.7f32);
    let cols = offset + seq;
    for groups in [1, 200] {
        let x = values(groups * seq * cols, 11);
        let mut y = vec![f32::NAN; x.len()];
        causal_softmax(&x, &mut y, cols, seq, offset, scale);
        for r in 0..groups * seq {
            let valid = offset + r % seq + 1;
            let row = &x[r * cols..(r + 1) * cols];
            let m = row[..valid].iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let z: f64 = row[..valid]
                .iter()
                .map(|&v| (scale as f64 * (v as f64 - m)).exp())
                .sum();
            for j in 0..cols {
                let got = y[r * cols + j];
                if j < valid {
                    let want = (scale as f64 * (row[j] as f64 - m)).exp() / z;
                    assert!(close(got, want as f32, 1e-5), "row {r} col {j}");
                } else {
                    assert_eq!(got, 0.0, "row {r} col {j} is masked");
                }
            }
        }
    }
}

#[test]
fn logsumexp_and_cross_entropy_gradient_match_f64() {
    let (n, cols) = (40, 1001);
    let x = values(n * cols, 13);
    let targets: Vec<u32> = (0..n as u32).map(|i| i * 37 % cols as u32).collect();
    let lse = logsumexp_rows(&x, cols);
    let mut dx = vec![0f32; x.len()];
    softmax_minus_onehot(&x, &lse, &targets, 0.5, &mut dx, cols);
    for r in 0..n {
        let row = &x[r * cols..(r + 1) * cols];
        let want: f64 = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!(close(lse[r], want as f32, 1e-6), "lse row {r}");
        for j in 0..cols {
            let p = (row[j] as f64 - want).exp();
            let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
            let w = 0.5 * (p - onehot);
            assert!((dx[r * cols + j] as f64 - w).abs() < 1e-6, "dx {r},{j}");
        }
    }
}

/// Dropout keeps about `1 - p` of the values, scaled by `1 / (1 - p)`,
/// with the mask of [`dropout_keeps`] (vectorised = scalar), the same
/// in place, and a different mask for another seed.
#[test]
fn dropout_keeps_the_expected_share_with_its_own_mask() {
    let n = 200_003;
    let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32).collect();
    for p in [0.05f32, 0.3] {
        let mut y = vec![0f32; n];
        dropout(Some(&x), &mut y, 77, p);
        let t = dropout_threshold(p);
        let mut kept = 0;
        for i in 0..n {
            if dropout_keeps(77, i, t) {
                kept += 1;
                assert!((y[i] - x[i] / (1.0 - p)).abs() < 1e-5, "p = {p}, {i}");
            } else {
                assert_eq!(y[i], 0.0, "p = {p}, {i}");
            }
        }
        let share = kept as f64 / n as f64;
        assert!(
            (share - (1.0 - p as f64)).abs() < 0.005,
            "p = {p}: kept {share}"
        );
        let mut z = x.clone();
        dropout(None, &mut z, 77, p);
        assert_eq!(y, z);
        let mut other = vec![0f32; n];
        dropout(Some(&x), &mut other, 78, p);
        let same = (0..n)
            .filter(|&i| (other[i] == 0.0) == (y[i] == 0.0))
            .count();
        assert!(
            same < n - n / 50,
            "p = {p}: seeds 77 and 78 agree on {same} of {n}"
        );
    }
}

/// The LoRA down-projection kernels equal the plain formulas with the
/// mask of [`dropout_keeps`], on a size that splits over the pool.
#[test]
fn lora_down_and_its_backward_match_the_formulas() {
    let (rows, inp, r) = (400, 96, 3);
    let x = crate::testutil::uniform_values(rows * inp, 5);
    let a = crate::testutil::uniform_values(r * inp, 6);
    let dz = crate::testutil::uniform_values(rows * r, 7);
    for seed in [None, Some(1234u32)] {
        let p = 0.25f32;
        let t = dropout_threshold(p);
        let m = |i: usize| match seed {
            Some(s) if !dropout_keeps(s, i, t) => 0.0,
            Some(_) => 1.0 / (1.0 - p),
            None => 1.0,
        };
        let shape = LoraDown {
            rows,
            inp,
            r,
            seed,
            p,
        };
        let mut z = vec![0f32; rows * r];
        lora_down(shape, &x, &a, &mut z);
        let mut dx = vec![0.5f32; rows * inp];
        let da = lora_down_backward(shape, &x, &a, &dz, Some(&mut dx));
        for q in 0..rows {
            for j in 0..r {
                let want: f32 = (0..inp)
                    .map(|i| x[q * inp + i] * m(q * inp + i) * a[j * inp + i])
                    .sum();
                assert!((z[q * r + j] - want).abs() < 1e-4, "{seed:?} z[{q},{j}]");
            }
            for i in 0..inp {
                let want: f32 = 0.5
                    + m(q * inp + i) * (0..r).map(|j| dz[q * r + j] * a[j * inp + i]).sum::<f32>();
                assert!(
                    (dx[q * inp + i] - want).abs() < 1e-4,
                    "{seed:?} dx[{q},{i}]"
                );
            }
        }
        for j in 0..r {
            for i in 0..inp {
                let want: f32 = (0..rows)
                    .map(|q| dz[q * r + j] * x[q * inp + i] * m(q * inp + i))
                    .sum();
                assert!(
                    (da[j * inp + i] - want).abs() < 1e-3,
                    "{seed:?} dA[{j},{i}]"
                );
            }
        }
    }
}

#[test]
fn softmax_backward_matches_the_formula() {
    let (rows, cols, scale) = (6, 13, 0.3f32);
    let x = values(rows * cols, 17);
    let dy = values(rows * cols, 19);
    let mut y = vec![0f32; x.len()];
    causal_softmax(&x, &mut y, cols, 3, 2, scale);
    let mut dx = vec![0f32; x.len()];
    softmax_backward(&y, &dy, &mut dx, cols, scale);
    for r in 0..rows {
        let (yr, gr) = (&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
        let d: f64 = yr
            .iter()
            .zip(gr)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        for j in 0..cols {
            let want = scale as f64 * yr[j] as f64 * (gr[j] as f64 - d);
            assert!((dx[r * cols + j] as f64 - want).abs() < 1e-5);
        }
    }
}

#[test]
fn dot_and_axpy_match_naive_loops() {
    let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
    let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!((dot(&a, &b) - naive).abs() < 1e-5);
    let mut y = b.clone();
    axpy(2.0, &a, &mut y);
    assert!((y[5] - (b[5] + 2.0 * a[5])).abs() < 1e-7);
}

#[test]
fn project_and_lift_match_naive_loops_for_any_rank() {
    let portable = Kernels { project, lift };
    for k in [portable, Kernels::detect()] {
        for (r, inp, out) in [(1, 5, 3), (3, 17, 9), (4, 576, 192), (5, 33, 40), (9, 8, 7)] {
            let a: Vec<f32> = (0..r * inp).map(|i| (i as f32 * 0.7).sin()).collect();
            let x: Vec<f32> = (0..inp).map(|i| (i as f32 * 0.3).cos()).collect();
            let bt: Vec<f32> = (0..r * out).map(|i| (i as f32 * 0.2).sin()).collect();
            let mut z = vec![0f32; r];
            (k.project)(&a, inp, &x, &mut z);
            for j in 0..r {
                let want: f32 = (0..inp).map(|i| a[j * inp + i] * x[i]).sum();
                assert!((z[j] - want).abs() < 1e-3, "r={r} j={j}");
            }
            let mut y: Vec<f32> = (0..out).map(|i| i as f32).collect();
            (k.lift)(&z, &bt, out, &mut y);
            for o in 0..out {
                let want = o as f32 + (0..r).map(|j| z[j] * bt[j * out + o]).sum::<f32>();
                assert!((y[o] - want).abs() < 1e-3, "r={r} o={o}");
            }
        }
    }
}
