//! Arrow prototypes (METHOD.md section 2): per expert and per LoRA-wrapped
//! layer, the top right singular vector of `dW = B A` (unit norm,
//! `in`-dimensional), computed exactly from the thin factors without ever
//! forming the `out x in` matrix `dW`.
//!
//! With `A^T = Q_A R_A` and `B = Q_B R_B` (thin QR), `dW = Q_B (R_B R_A^T)
//! Q_A^T`, so the SVD of the `r x r` core `C = R_B R_A^T = U S V^T` gives
//! `dW`'s right singular vectors as `Q_A V`. Two ways to get the factors:
//!
//! * [`SvdMethod::CholeskyQr`] (the default): `R` from the Cholesky factor
//!   of the Gram matrix (`A A^T = R_A^T R_A`), `Q_A = A^T R_A^{-1}` applied
//!   to one vector only. `O(r^2 (in + out))`, no `in x r` temporaries; its
//!   error grows with `cond(A)^2`, so ill-conditioned factors fall back to
//!   plain QR.
//! * [`SvdMethod::Qr`]: Householder QR of `A^T` and `B`.
//!
//! Everything runs in f64. Singular vectors are defined up to sign; the
//! router uses `|<x, v>|`, and we fix the sign so that the largest entry is
//! positive, which makes files reproducible.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use faer::Mat;

use crate::error::{Error, Result};
use crate::expert::Expert;

/// How the small SVD's factors are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SvdMethod {
    /// Cholesky-QR of the Gram matrices, with a fallback to [`SvdMethod::Qr`]
    /// when a factor is rank-deficient or ill-conditioned.
    CholeskyQr,
    /// Householder QR of `A^T` and `B`.
    Qr,
}

/// Beyond this estimated `cond(A)^2` (or `cond(B)^2`), Cholesky-QR would
/// lose more than ~1e-8 of relative accuracy in f64: use plain QR.
const MAX_GRAM_CONDITION: f64 = 1e8;

/// The top singular triple of `B A` that Arrow needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TopSingular {
    /// Unit right singular vector (`in`), or zeros when `B A = 0`.
    pub vector: Vec<f64>,
    /// Largest singular value of `B A` (without the LoRA scale).
    pub value: f64,
    /// The method that produced it (after any fallback).
    pub method: SvdMethod,
}

/// Row-major `rows x cols` f32 data as an f64 faer matrix.
fn to_mat(data: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j] as f64)
}

/// The top right singular vector of `B A` from `A` (`r x in`, row-major)
/// and `B` (`out x r`, row-major).
pub fn top_right_singular(
    a: &[f32],
    b: &[f32],
    r: usize,
    inp: usize,
    out: usize,
    method: SvdMethod,
) -> Result<TopSingular> {
    if a.len() != r * inp || b.len() != out * r || r == 0 {
        return Err(Error::InvalidArgument(format!(
            "LoRA factors have {} and {} values, expected A {r}x{inp} and B {out}x{r}",
            a.len(),
            b.len()
        )));
    }
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(
            "LoRA factors contain NaN or infinite values".into(),
        ));
    }
    let am = to_mat(a, r, inp);
    let bm = to_mat(b, out, r);
    if method == SvdMethod::CholeskyQr {
        if let Some(t) = cholesky_qr_top(&am, &bm) {
            return Ok(t);
        }
    }
    qr_top(&am, &bm)
}

/// Lower Cholesky factor of the Gram matrix `g` (`r x r`), or `None` when
/// `g` is too ill-conditioned for Cholesky-QR to be accurate. `cond(g)`
/// is computed exactly: `g` is only `r x r`.
fn gram_cholesky(g: &Mat<f64>) -> Option<Mat<f64>> {
    let s = g.singular_values().ok()?;
    let max = s.iter().cloned().fold(0.0, f64::max);
    let min = s.iter().cloned().fold(f64::INFINITY, f64::min);
    if max <= 0.0 || min <= 0.0 || max / min > MAX_GRAM_CONDITION || max.is_nan() {
        return None;
    }
    let llt = g.llt(faer::Side::Lower).ok()?;
    Some(llt.L().to_owned())
}

fn cholesky_qr_top(a: &Mat<f64>, b: &Mat<f64>) -> Option<TopSingular> {
    let r = a.nrows();
    let ga = a * a.transpose(); // A A^T = R_A^T R_A, R_A = L_A^T
    let gb = b.transpose() * b; // B^T B = R_B^T R_B, R_B = L_B^T
    let la = gram_cholesky(&ga)?;
    let lb = gram_cholesky(&gb)?;
    // C = R_B R_A^T = L_B^T L_A.
    let core = lb.transpose() * &la;
    let (value, v0) = top_of_core(&core)?;
    if value == 0.0 {
        return Some(zero(a.ncols(), SvdMethod::CholeskyQr));
    }
    // Q_A v0 = A^T R_A^{-1} v0 = A^T L_A^{-T} v0: back substitution on L_A^T.
    let mut y = v0;
    for i in (0..r).rev() {
        let mut s = y[i];
        for j in i + 1..r {
            s -= la[(j, i)] * y[j];
        }
        y[i] = s / la[(i, i)];
    }
    let v: Vec<f64> = (0..a.ncols())
        .map(|k| (0..r).map(|i| a[(i, k)] * y[i]).sum())
        .collect();
    Some(finish(v, value, SvdMethod::CholeskyQr))
}

fn qr_top(a: &Mat<f64>, b: &Mat<f64>) -> Result<TopSingular> {
    let at = a.transpose().to_owned();
    let qa = at.qr();
    let q_a = qa.compute_thin_Q(); // in x r'
    let r_a = qa.thin_R().to_owned(); // r' x r
    let r_b = b.qr().thin_R().to_owned(); // r'' x r
    let core = &r_b * r_a.transpose(); // r'' x r'
    let Some((value, v0)) = top_of_core(&core) else {
        return Err(Error::InvalidArgument(
            "the SVD of a LoRA expert's core matrix did not converge".into(),
        ));
    };
    if value == 0.0 {
        return Ok(zero(a.ncols(), SvdMethod::Qr));
    }
    let v: Vec<f64> = (0..q_a.nrows())
        .map(|k| (0..q_a.ncols()).map(|i| q_a[(k, i)] * v0[i]).sum())
        .collect();
    Ok(finish(v, value, SvdMethod::Qr))
}

/// Largest singular value of the small core and its right singular vector.
fn top_of_core(core: &Mat<f64>) -> Option<(f64, Vec<f64>)> {
    let svd = core.svd().ok()?;
    let s = svd.S().column_vector();
    let v = svd.V();
    // faer sorts singular values in decreasing order; do not rely on it.
    let best = (0..s.nrows()).max_by(|&i, &j| s[i].total_cmp(&s[j]))?;
    let col: Vec<f64> = (0..v.nrows()).map(|i| v[(i, best)]).collect();
    Some((s[best], col))
}

fn zero(inp: usize, method: SvdMethod) -> TopSingular {
    TopSingular {
        vector: vec![0.0; inp],
        value: 0.0,
        method,
    }
}

/// Normalises (rounding may leave `|v|` slightly off 1) and fixes the sign.
fn finish(mut v: Vec<f64>, value: f64, method: SvdMethod) -> TopSingular {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let big = v
        .iter()
        .cloned()
        .max_by(|x, y| x.abs().total_cmp(&y.abs()))
        .unwrap_or(0.0);
    let sign = if big < 0.0 { -1.0 } else { 1.0 };
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x *= sign / norm);
    }
    TopSingular {
        vector: v,
        value,
        method,
    }
}

/// Per-layer prototype matrices of a set of experts: for every wrapped
/// module, row `e` belongs to `experts[e]`.
///
/// # Shapes
/// * `layers[module]`: `(n_experts, in)`, f32, on the CPU.
#[derive(Debug, Clone)]
pub struct Prototypes {
    pub experts: Vec<String>,
    pub layers: BTreeMap<String, Tensor>,
}

impl Prototypes {
    /// Builds the matrices from per-expert vectors (`per_expert[e][module]`).
    pub fn from_rows(
        experts: Vec<String>,
        per_expert: &[BTreeMap<String, Vec<f32>>],
    ) -> Result<Self> {
        let Some(first) = per_expert.first() else {
            return Err(Error::InvalidArgument("no experts to route between".into()));
        };
        let mut layers = BTreeMap::new();
        for (module, row) in first {
            let inp = row.len();
            let mut data = Vec::with_capacity(per_expert.len() * inp);
            for (e, rows) in per_expert.iter().enumerate() {
                let v = rows.get(module).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "expert `{}` has no prototype for module `{module}`",
                        experts[e]
                    ))
                })?;
                if v.len() != inp {
                    return Err(Error::InvalidArgument(format!(
                        "expert `{}`: prototype for `{module}` has {} values, expected {inp}",
                        experts[e],
                        v.len()
                    )));
                }
                data.extend_from_slice(v);
            }
            layers.insert(
                module.clone(),
                Tensor::from_vec(data, (per_expert.len(), inp), &Device::Cpu)?,
            );
        }
        Ok(Self { experts, layers })
    }

    /// The prototype matrix of `module`, `(n_experts, in)`.
    pub fn layer(&self, module: &str) -> Result<&Tensor> {
        self.layers
            .get(module)
            .ok_or_else(|| Error::InvalidArgument(format!("no prototypes for module `{module}`")))
    }
}

/// `(A, B)` of one module as row-major f32 vectors with their dims.
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    inp: usize,
    out: usize,
}

fn factors_f32(a: &Tensor, b: &Tensor) -> Result<Factors> {
    let (r, inp) = a.dims2()?;
    let (out, _) = b.dims2()?;
    Ok(Factors {
        a: a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        b: b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        r,
        inp,
        out,
    })
}

/// Arrow prototypes of one expert: module name -> unit vector (`in`).
pub fn expert_arrow_prototypes(
    expert: &Expert,
    method: SvdMethod,
) -> Result<BTreeMap<String, Vec<f32>>> {
    let mut out = BTreeMap::new();
    for (module, (a, b)) in &expert.weights {
        let f = factors_f32(a, b)?;
        let top = top_right_singular(&f.a, &f.b, f.r, f.inp, f.out, method).map_err(|e| {
            Error::InvalidArgument(format!("expert `{}`, module `{module}`: {e}", expert.name))
        })?;
        out.insert(
            module.clone(),
            top.vector.iter().map(|&x| x as f32).collect(),
        );
    }
    Ok(out)
}

/// Arrow prototypes of every expert, in the order given.
pub fn arrow_prototypes(experts: &[Expert], method: SvdMethod) -> Result<Prototypes> {
    let rows = experts
        .iter()
        .map(|e| expert_arrow_prototypes(e, method))
        .collect::<Result<Vec<_>>>()?;
    Prototypes::from_rows(experts.iter().map(|e| e.name.clone()).collect(), &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn randn(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(1e-7);
                let u2: f32 = rng.random::<f32>();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    }

    /// Dense SVD of `B A`: the obviously correct answer.
    fn dense_top(a: &[f32], b: &[f32], r: usize, inp: usize, out: usize) -> (f64, Vec<f64>) {
        let am = to_mat(a, r, inp);
        let bm = to_mat(b, out, r);
        let dw = &bm * &am;
        let svd = dw.svd().unwrap();
        let s = svd.S().column_vector();
        let v = svd.V();
        (s[0], (0..inp).map(|i| v[(i, 0)]).collect())
    }

    fn align(a: &[f64], b: &[f64]) -> f64 {
        // 1 - |cos|: zero when equal up to sign.
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        1.0 - dot.abs()
    }

    #[test]
    fn both_methods_match_dense_svd() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(r, inp, out) in &[(4, 32, 24), (1, 9, 5), (8, 40, 64), (3, 3, 3)] {
            let a = randn(&mut rng, r * inp);
            let b = randn(&mut rng, out * r);
            let (s, v) = dense_top(&a, &b, r, inp, out);
            for m in [SvdMethod::CholeskyQr, SvdMethod::Qr] {
                let t = top_right_singular(&a, &b, r, inp, out, m).unwrap();
                assert_eq!(t.method, m);
                assert!((t.value - s).abs() < 1e-9 * s, "{m:?} {} vs {s}", t.value);
                assert!(align(&t.vector, &v) < 1e-10, "{m:?} r={r}");
                let n: f64 = t.vector.iter().map(|x| x * x).sum();
                assert!((n - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn ill_conditioned_factors_fall_back_to_qr() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (r, inp, out) = (4, 16, 12);
        let mut a = randn(&mut rng, r * inp);
        // Row 3 = row 2 + 1e-7 noise: A is numerically rank 3.
        for k in 0..inp {
            a[3 * inp + k] = a[2 * inp + k] + 1e-7 * a[k];
        }
        let b = randn(&mut rng, out * r);
        let t = top_right_singular(&a, &b, r, inp, out, SvdMethod::CholeskyQr).unwrap();
        assert_eq!(t.method, SvdMethod::Qr);
        let (s, v) = dense_top(&a, &b, r, inp, out);
        assert!((t.value - s).abs() < 1e-6 * s);
        assert!(align(&t.vector, &v) < 1e-8);
        // An exactly rank-deficient B (one zero column) works too.
        let mut b2 = b.clone();
        for o in 0..out {
            b2[o * r + 1] = 0.0;
        }
        let t = top_right_singular(&a, &b2, r, inp, out, SvdMethod::CholeskyQr).unwrap();
        let (s, v) = dense_top(&a, &b2, r, inp, out);
        assert!((t.value - s).abs() < 1e-6 * s);
        assert!(align(&t.vector, &v) < 1e-8);
    }

    #[test]
    fn zero_delta_gives_zero_prototype_and_sign_is_fixed() {
        let a = vec![1.0f32; 2 * 5];
        let b = vec![0.0f32; 3 * 2];
        for m in [SvdMethod::CholeskyQr, SvdMethod::Qr] {
            let t = top_right_singular(&a, &b, 2, 5, 3, m).unwrap();
            assert_eq!(t.value, 0.0);
            assert!(t.vector.iter().all(|&x| x == 0.0));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a = randn(&mut rng, 2 * 6);
        let b = randn(&mut rng, 4 * 2);
        let t = top_right_singular(&a, &b, 2, 6, 4, SvdMethod::Qr).unwrap();
        let big = t
            .vector
            .iter()
            .cloned()
            .max_by(|x, y| x.abs().total_cmp(&y.abs()))
            .unwrap();
        assert!(big > 0.0);
        let neg_b: Vec<f32> = b.iter().map(|x| -x).collect();
        let t2 = top_right_singular(&a, &neg_b, 2, 6, 4, SvdMethod::CholeskyQr).unwrap();
        for (x, y) in t.vector.iter().zip(&t2.vector) {
            assert!((x - y).abs() < 1e-10);
        }
    }

    #[test]
    fn bad_factors_are_one_sentence_errors() {
        let e = top_right_singular(&[1.0; 3], &[1.0; 4], 2, 2, 2, SvdMethod::Qr).unwrap_err();
        assert!(e.to_string().contains("expected A 2x2"), "{e}");
        let e = top_right_singular(&[f32::NAN; 4], &[1.0; 4], 2, 2, 2, SvdMethod::Qr).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
    }
}
