//! f32 matrix products through the `gemm` crate (the one candle's CPU
//! matmul runs on), for the training fast path: a new product is written
//! without zero-filling its buffer first (candle zero-fills every matmul
//! output), and a product can accumulate into an existing buffer
//! (`dst += beta a b`), which spares the separate add pass and its output.

use gemm::Parallelism;

/// A row-major matrix, or the transpose of one, as an operand.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Mat<'a> {
    /// `data` holds `rows x cols` values, row-major.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "gemm: a {rows} x {cols} matrix");
        Self {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose, `(cols, rows)`, without moving data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 && m * n * k >= 1 << 15 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// # Safety
/// `dst` must hold `a.rows * b.cols` values (initialised when `acc`).
unsafe fn run(dst: *mut f32, acc: bool, a: Mat, b: Mat, beta: f32) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    // SAFETY: the operands' strides stay inside their slices (checked
    // at construction) and `dst` is `m x n` row-major (the caller).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            acc,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism(m, n, k),
        )
    }
}

/// `beta a b`, `(a.rows, b.cols)` row-major, in a new buffer.
pub fn matmul(a: Mat, b: Mat, beta: f32) -> Vec<f32> {
    let len = a.rows * b.cols;
    if a.cols == 0 || len == 0 {
        return vec![0.0; len];
    }
    let mut out = Vec::with_capacity(len);
    // SAFETY: the buffer has room for `len` values, gemm writes every
    // one of them (it reads none: `acc` is false), then they count.
    unsafe {
        run(
            out.spare_capacity_mut().as_mut_ptr().cast(),
            false,
            a,
            b,
            beta,
        );
        out.set_len(len);
    }
    out
}

/// `dst += beta a b`, `dst` being `(a.rows, b.cols)` row-major.
pub fn matmul_acc(dst: &mut [f32], a: Mat, b: Mat, beta: f32) {
    assert_eq!(dst.len(), a.rows * b.cols, "gemm: destination size");
    if a.cols == 0 || dst.is_empty() {
        return;
    }
    // SAFETY: `dst` has the size checked above and is initialised.
    unsafe { run(dst.as_mut_ptr(), true, a, b, beta) }
}

#[cfg(test)]
mod tests;
