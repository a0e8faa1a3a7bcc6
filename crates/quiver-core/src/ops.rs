//! Tensor ops shared by the model code, each with a differentiable
//! composition and, where candle has one, a fused kernel.
//!
//! candle 0.11's fused `rms_norm`, `softmax_last_dim` and `rope` have no
//! backward pass: used on a tensor that carries gradient they silently cut
//! the graph. Each op here picks the fused kernel only when no input tracks
//! gradient (`Tensor::track_op`), so inference is fast and training is
//! correct without the caller choosing.

use candle_core::{DType, Result, Tensor, D};

fn tracks(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// RMSNorm over the last dimension: `xs / sqrt(mean(xs^2) + eps) * weight`.
///
/// # Shapes
/// * `xs`: `(.., hidden)`, `weight`: `(hidden,)`
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if tracks(&[xs, weight]) || xs.dtype() != DType::F32 {
        rms_norm_composed(xs, weight, eps)
    } else {
        candle_nn::ops::rms_norm(&xs.contiguous()?, weight, eps as f32)
    }
}

/// Plain differentiable RMSNorm, the reference for the fused kernel.
pub fn rms_norm_composed(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let rms = (xs.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    xs.broadcast_div(&rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if tracks(&[xs]) {
        softmax_composed(xs)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// Plain differentiable softmax. The max is detached: it only stabilises
/// the exponent and its gradient contribution is zero.
pub fn softmax_composed(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Log-softmax over the last dimension (always composed: used on few rows).
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let shifted = xs.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Rotary embedding, "rotate half" layout (Hugging Face's).
///
/// # Shapes
/// * `xs`: `(b_sz, n_head, seq_len, head_dim)`
/// * `cos`, `sin`: `(seq_len, head_dim / 2)`
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if tracks(&[xs]) || xs.dtype() != cos.dtype() {
        rope_composed(xs, cos, sin)
    } else {
        candle_nn::rotary_emb::rope(&xs.contiguous()?, cos, sin)
    }
}

/// Plain differentiable rotate-half RoPE.
pub fn rope_composed(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.to_dtype(xs.dtype())?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.to_dtype(xs.dtype())?;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    #[test]
    fn fused_equals_composed() -> Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        close(
            &rms_norm(&xs, &w, 1e-5)?,
            &rms_norm_composed(&xs, &w, 1e-5)?,
            1e-5,
        );
        close(&softmax_last_dim(&xs)?, &softmax_composed(&xs)?, 1e-6);
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        close(
            &rope(&xs, &cos, &sin)?,
            &rope_composed(&xs, &cos, &sin)?,
            1e-5,
        );
        Ok(())
    }

    #[test]
    fn tracked_inputs_keep_their_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let v = Var::randn(0f32, 1.0, (2, 2, 3, 4), &dev)?;
        let w = Tensor::ones(4, DType::F32, &dev)?;
        let cos = Tensor::ones((3, 2), DType::F32, &dev)?;
        let sin = Tensor::zeros((3, 2), DType::F32, &dev)?;
        let y = softmax_last_dim(&rope(&rms_norm(v.as_tensor(), &w, 1e-5)?, &cos, &sin)?)?;
        let loss = y.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let g = grads
            .get(v.as_tensor())
            .expect("gradient reaches the input");
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(norm > 0.0);
        Ok(())
    }
}
