use super::*;
use crate::kernels::q4::quantize_row;

use crate::testutil::uniform_values as values;

/// The plain reference of row `t` of the product, output `r`: the
/// dequantized weights times the 8-bit activations, in f64.
fn reference(q: &Q8Matrix, wd: &[f32], x: &[f32], t: usize, r: usize) -> f64 {
    let cols = q.cols();
    let xr = quantize_row(&x[t * cols..(t + 1) * cols]);
    (0..cols)
        .map(|c| wd[r * cols + c] as f64 * xr.q[c] as f64 * xr.d[c / BLOCK] as f64)
        .sum()
}

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
                let want = reference(&q, &wd, &x, t, r);
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

/// The tiled product (two or more rows) on every kernel this CPU has
/// equals the plain reference: the dequantized weights times the 8-bit
/// activations, for odd row counts and padded weight groups; the SIMD
/// kernels agree with each other to the last bit (same integer sums,
/// same float operations).
#[test]
fn tiled_product_equals_the_reference_on_every_kernel() {
    let kernels = [DotKernel::Avx2, DotKernel::AvxVnni, DotKernel::Avx512Vnni];
    let have: Vec<DotKernel> = kernels.into_iter().filter(|k| k.available()).collect();
    for k in kernels.iter().filter(|k| !have.contains(k)) {
        eprintln!(
            "tiled Q8_0 product: this CPU lacks {}, not tested here",
            k.name()
        );
    }
    for (rows, cols, n) in [(9, 64, 2), (37, 96, 5), (8, 576, 33)] {
        let w = values(rows * cols, 4);
        let x: Vec<f32> = values(n * cols, 5).iter().map(|v| v * 3.0).collect();
        let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
        let wd = q.dequantize();
        let mut outs = Vec::new();
        for &k in have.iter().chain([&DotKernel::Portable]) {
            let mut y = vec![f32::NAN; n * rows];
            q.matmul_with(k, &x, n, &mut y);
            for t in 0..n {
                for r in 0..rows {
                    let want = reference(&q, &wd, &x, t, r);
                    let got = y[t * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{} ({rows}x{cols}, {n} rows): row {t} out {r}: {got} vs {want}",
                        k.name()
                    );
                }
            }
            if k != DotKernel::Portable {
                outs.push((k, y));
            }
        }
        for (k, y) in &outs[1.min(outs.len())..] {
            assert_eq!(y, &outs[0].1, "{} vs {}", k.name(), outs[0].0.name());
        }
    }
}

/// A kernel the CPU lacks is never run: `matmul_with` falls back to the
/// detected one and gives its numbers.
#[test]
fn a_missing_kernel_falls_back_to_the_detected_one() {
    let (rows, cols, n) = (12, 64, 4);
    let w = values(rows * cols, 6);
    let x = values(n * cols, 7);
    let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
    let mut want = vec![0f32; n * rows];
    q.matmul(&x, n, &mut want);
    for k in [DotKernel::Avx2, DotKernel::AvxVnni, DotKernel::Avx512Vnni] {
        let mut y = vec![0f32; n * rows];
        q.matmul_with(k, &x, n, &mut y);
        if !k.available() {
            assert_eq!(
                y,
                want,
                "{} is missing here: the detected kernel's numbers",
                k.name()
            );
        }
    }
    assert!(DotKernel::detect().available());
}
