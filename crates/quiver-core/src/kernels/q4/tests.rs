use super::*;

use crate::testutil::uniform_values as values;

#[test]
fn quantization_stays_within_half_a_step_and_is_idempotent() {
    let (rows, cols) = (7, 96);
    let w = values(rows * cols, 1);
    let q = Q4Matrix::quantize(&w, rows, cols).unwrap();
    let back = q.dequantize();
    for (b, (wb, qb)) in w.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
        let d = q.scale(b);
        for (a, c) in wb.iter().zip(qb) {
            // Half a step, plus the f16 rounding of the minimum
            // at the block's ends.
            let tol = d * 0.5 + 4.9e-4 * a.abs() + 1e-6;
            assert!((a - c).abs() <= tol, "block {b}: {a} vs {c}");
        }
    }
    // Weights that are already 4-bit (a Q4_1 GGUF file's, dequantized)
    // come back as they were.
    let again = Q4Matrix::quantize(&back, rows, cols).unwrap().dequantize();
    for (a, c) in back.iter().zip(&again) {
        assert!((a - c).abs() <= 1e-6 * (1.0 + a.abs()), "{a} vs {c}");
    }
    assert!(
        Q4Matrix::quantize(&w, rows * 2, cols / 2).is_none(),
        "48 columns: not whole blocks"
    );
}

/// The kernel computes exactly `sum((W - m) * dequantized x) +
/// m * sum(x)` per block (`W - m` is `d q`): compare with that in
/// f64, for row counts that exercise both the 4-row SIMD path and
/// the leftover rows.
/// The portable loop (CPUs without AVX2/F16C) and the kernel agree.
/// The vectorised activation quantizer gives the portable loop's
/// 8-bit values and steps exactly (ties to even included: values
/// that land on half steps), and its sums to rounding.
#[test]
fn activation_quantizer_equals_the_portable_loop() {
    let mut x: Vec<f32> = values(6 * BLOCK, 7).iter().map(|v| v * 3.0).collect();
    // A block of exact half steps (max 127 -> step 1), an all-zero
    // block, and one with a single nonzero value.
    for (j, v) in x[..BLOCK].iter_mut().enumerate() {
        *v = if j == 0 { 127.0 } else { j as f32 - 15.5 };
    }
    x[BLOCK..2 * BLOCK].fill(0.0);
    x[2 * BLOCK..3 * BLOCK].fill(0.0);
    x[2 * BLOCK + 5] = -0.25;
    let fast = quantize_row(&x);
    let mut slow = quantize_row(&x);
    quantize_blocks(&x, &mut slow);
    assert_eq!(fast.q, slow.q);
    assert_eq!(fast.d, slow.d);
    for (a, b) in fast.sum.iter().zip(&slow.sum) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    assert_eq!(&fast.q[1..4], &[-14, -14, -12]);
    assert_eq!(fast.q[2 * BLOCK + 5], -127);
    // Pairs and their per-lane scales and sums follow the blocks.
    assert_eq!(&fast.pairs[..16], &fast.q[..16]);
    assert_eq!(&fast.pairs[16..32], &fast.q[BLOCK..BLOCK + 16]);
    assert_eq!(&fast.pairs[32..48], &fast.q[16..32]);
    assert_eq!(
        fast.pair_d[8..16],
        [fast.d[2], fast.d[2], fast.d[2], fast.d[2], fast.d[3], fast.d[3], fast.d[3], fast.d[3]]
    );
    assert_eq!(fast.pair_sum[4], fast.sum[1]);
}

#[test]
fn scalar_rows_equal_the_kernel() {
    for (rows, cols) in [(8, 576), (5, 160), (4, 32)] {
        let q = Q4Matrix::quantize(&values(rows * cols, 5), rows, cols).unwrap();
        let x = quantize_row(&values(cols, 6));
        for g in 0..rows.div_ceil(4) {
            let mut acc = [0f32; 4];
            q.dot_group(g, &x, &mut acc);
            for (i, a) in acc.iter().enumerate().take(rows - g * 4) {
                let s = q.dot_row_scalar(g * 4 + i, &x);
                assert!((a - s).abs() <= 1e-4 * (1.0 + s.abs()), "{a} vs {s}");
            }
        }
    }
}

#[test]
fn matmul_equals_the_dequantized_product() {
    // Even and odd block counts (576 / 32 = 18; 160 / 32 = 5).
    for (rows, cols, n) in [(9, 64, 1), (4, 576, 3), (13, 160, 8), (8, 96, 2)] {
        let w = values(rows * cols, 2);
        let x: Vec<f32> = values(n * cols, 3).iter().map(|v| v * 7.0).collect();
        let q = Q4Matrix::quantize(&w, rows, cols).unwrap();
        let wd = q.dequantize();
        let mut y = vec![0f32; n * rows];
        q.matmul(&x, n, &mut y);
        let (mut err, mut norm) = (0f64, 0f64);
        for t in 0..n {
            let xr = quantize_row(&x[t * cols..(t + 1) * cols]);
            let xd: Vec<f64> =
                xr.q.iter()
                    .enumerate()
                    .map(|(i, &v)| v as f64 * xr.d[i / BLOCK] as f64)
                    .collect();
            for r in 0..rows {
                let want: f64 = (0..cols)
                    .map(|c| {
                        let m = q.min((r * cols + c) / BLOCK) as f64;
                        (wd[r * cols + c] as f64 - m) * xd[c] + m * x[t * cols + c] as f64
                    })
                    .sum();
                let got = y[t * rows + r] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{rows}x{cols} t{t} r{r}: {got} vs {want}"
                );
                let exact: f64 = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64)
                    .sum();
                err += (got - exact).powi(2);
                norm += exact.powi(2);
            }
        }
        // And close to the unquantized product overall (4 bits on
        // uniform weights: about 10% relative error).
        let rel = (err / norm).sqrt();
        assert!(rel < 0.2, "{rows}x{cols}: relative error {rel}");
    }
}
