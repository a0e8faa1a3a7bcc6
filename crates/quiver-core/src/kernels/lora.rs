//! A LoRA's down-projection with dropout fused in, and its backward.

use super::dropout::{dropout_piece, Mask};
use super::{axpy, dot, par_rows, Shared};

/// The shape of a LoRA's down-projection `z = dropout(x) a^T`: `x` is
/// `rows x inp`, `a` is `r x inp`, `z` is `rows x r`.
#[derive(Clone, Copy, Debug)]
pub struct LoraDown {
    pub rows: usize,
    pub inp: usize,
    pub r: usize,
    /// The dropout mask's seed ([`dropout`](fn@super::dropout), over `x`'s flat indices);
    /// `None`: no dropout.
    pub seed: Option<u32>,
    /// Drop probability.
    pub p: f32,
}

impl LoraDown {
    fn check(&self, x: &[f32], a: &[f32], z: &[f32]) {
        assert!(
            x.len() == self.rows * self.inp
                && a.len() == self.r * self.inp
                && z.len() == self.rows * self.r,
            "lora_down: shapes"
        );
    }

    /// Row `t` of `dropout(x)` into `buf` (or `x`'s own row without dropout).
    fn row<'a>(&self, x: &'a [f32], t: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let xr = &x[t * self.inp..(t + 1) * self.inp];
        match self.seed {
            Some(s) => {
                dropout_piece(Some(xr), buf, t * self.inp, Mask::new(s, self.p));
                buf
            }
            None => xr,
        }
    }
}

/// `z = dropout(x) a^T` without the dropped input as a buffer: each row is
/// dropped into a scratch row and projected on the `r` rows of `a`.
pub fn lora_down(shape: LoraDown, x: &[f32], a: &[f32], z: &mut [f32]) {
    shape.check(x, a, z);
    let (inp, r) = (shape.inp, shape.r);
    let out = Shared(z.as_mut_ptr());
    par_rows(shape.rows, inp, |range| {
        // SAFETY: each range of rows is written by one call only.
        let z = unsafe { out.rows(&range, r) };
        let mut buf = vec![0f32; inp];
        for (k, t) in range.enumerate() {
            let row = shape.row(x, t, &mut buf);
            for j in 0..r {
                z[k * r + j] = dot(row, &a[j * inp..(j + 1) * inp]);
            }
        }
    });
}

/// The backward of [`lora_down`] from `dz` (`rows x r`): returns
/// `dA = dz^T dropout(x)` (`r x inp`) and adds `dropout(dz a)` (the input's
/// gradient, with the same mask) into `dx` when given.
pub fn lora_down_backward(
    shape: LoraDown,
    x: &[f32],
    a: &[f32],
    dz: &[f32],
    dx: Option<&mut [f32]>,
) -> Vec<f32> {
    shape.check(x, a, dz);
    let (inp, r) = (shape.inp, shape.r);
    // Each piece's partial dA, summed in row order at the end so the result
    // does not depend on which thread ran which piece.
    let parts = std::sync::Mutex::new(Vec::<(usize, Vec<f32>)>::new());
    let dx = dx.map(|d| {
        assert_eq!(d.len(), x.len(), "lora_down_backward: dx shape");
        Shared(d.as_mut_ptr())
    });
    let mask = shape.seed.map(|s| Mask::new(s, shape.p));
    par_rows(shape.rows, inp * 2, |range| {
        let mut local = vec![0f32; r * inp];
        let (mut buf, mut tmp) = (vec![0f32; inp], vec![0f32; inp]);
        for t in range.clone() {
            let g = &dz[t * r..(t + 1) * r];
            let row = shape.row(x, t, &mut buf);
            for j in 0..r {
                axpy(g[j], row, &mut local[j * inp..(j + 1) * inp]);
            }
            if let Some(dx) = &dx {
                tmp.fill(0.0);
                for j in 0..r {
                    axpy(g[j], &a[j * inp..(j + 1) * inp], &mut tmp);
                }
                if let Some(m) = mask {
                    dropout_piece(None, &mut tmp, t * inp, m);
                }
                // SAFETY: row t belongs to this call's range only.
                let d = unsafe { dx.span(t * inp, inp) };
                for (o, &v) in d.iter_mut().zip(&tmp) {
                    *o += v;
                }
            }
        }
        parts
            .lock()
            .expect("lora_down_backward: poisoned")
            .push((range.start, local));
    });
    let mut parts = parts.into_inner().expect("lora_down_backward: poisoned");
    parts.sort_by_key(|(start, _)| *start);
    let mut da = vec![0f32; r * inp];
    for (_, part) in &parts {
        for (o, v) in da.iter_mut().zip(part) {
            *o += v;
        }
    }
    da
}
