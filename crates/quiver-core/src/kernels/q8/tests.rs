use super::*;
use crate::kernels::q4::quantize_row;

use crate::testutil::uniform_values as values;

/// Within half a step of the input, and 8-bit values come back
/// as they were.
#[test]
fn quantization_is_close_and_idempotent() {
    let (rows, cols) = (6, 96);
    let w = values(rows * cols, 1);
    let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
    let back = q.dequantize();
    for (wb, qb) in w.chunks(BLOCK).zip(back.chunks(BLOCK)) {
        let amax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, c) in wb.iter().zip(qb) {
            assert!((a - c).abs() <= amax / 127.0 * 0.51 + 1e-6, "{a} vs {c}");
        }
    }
    let again = Q8Matrix::quantize(&back, rows, cols).unwrap().dequantize();
    assert_eq!(back, again);
    assert!(Q8Matrix::quantize(&w, rows * 2, cols / 2).is_none());
}

/// The kernel (and the portable loop) compute exactly the
/// dequantized weights times the 8-bit activations, for row counts
/// that leave padded groups.
#[test]
fn matmul_equals_the_dequantized_product() {
    for (rows, cols, n) in [(9, 64, 1), (4, 576, 3), (13, 160, 2)] {
        let w = values(rows * cols, 2);
        let x: Vec<f32> = values(n * cols, 3).iter().map(|v| v * 7.0).collect();
        let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
        let wd = q.dequantize();
        let mut y = vec![0f32; n * rows];
        q.matmul(&x, n, &mut y);
        for t in 0..n {
            let xr = quantize_row(&x[t * cols..(t + 1) * cols]);
            for r in 0..rows {
                let want: f64 = (0..cols)
                    .map(|c| wd[r * cols + c] as f64 * xr.q[c] as f64 * xr.d[c / BLOCK] as f64)
                    .sum();
                let got = y[t * rows + r] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
                let scalar = q.dot_row_scalar(r, &xr) as f64;
                assert!((scalar - want).abs() <= 1e-4 * (1.0 + want.abs()));
            }
        }
    }
}
