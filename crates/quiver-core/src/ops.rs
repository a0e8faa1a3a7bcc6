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

type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;
type BackwardFn3 =
    Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// The storage of a value computed outside the autograd graph, moved out of
/// its holder exactly once (by the op's forward). The graph then keeps only
/// the op's output, not a second copy of the value.
fn take_storage<S>(
    ys: &std::sync::Mutex<Option<Tensor>>,
    pick: impl Fn(&candle_core::Storage) -> Option<&S>,
) -> Result<(S, candle_core::Shape)>
where
    S: candle_core::backend::BackendStorage,
{
    let ys = ys
        .lock()
        .map_err(|_| candle_core::Error::Msg("grad-bridge: poisoned".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("grad-bridge: forward ran twice".into()))?;
    let (storage, layout) = ys.storage_and_layout();
    let s = pick(&storage).ok_or_else(|| {
        candle_core::Error::Msg("grad-bridge: the value is on another device".into())
    })?;
    Ok((s.try_clone(layout)?, layout.shape().clone()))
}

fn cpu_of(s: &candle_core::Storage) -> Option<&candle_core::CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Some(c),
        _ => None,
    }
}

fn cuda_of(s: &candle_core::Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        candle_core::Storage::Cuda(c) => Some(c),
        _ => None,
    }
}

/// Reattaches a value computed outside the autograd graph to its input:
/// forward returns the value, backward maps the output gradient to the
/// input gradient with a hand-written function. This is how the fused
/// kernels (which candle gives no backward) are used while training.
struct GradBridge {
    ys: std::sync::Mutex<Option<Tensor>>,
    bwd: BackwardFn,
}

impl candle_core::CustomOp1 for GradBridge {
    fn name(&self) -> &'static str {
        "grad-bridge"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        take_storage(&self.ys, cpu_of)
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        take_storage(&self.ys, cuda_of)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(grad)?))
    }
}

/// `ys` (computed from `xs.detach()`) with gradient `bwd(dL/dys)` flowing to `xs`.
pub fn attach_grad(
    xs: &Tensor,
    ys: Tensor,
    bwd: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let ys = ys.contiguous()?;
    xs.apply_op1_arc(std::sync::Arc::new(Box::new(GradBridge {
        ys: std::sync::Mutex::new(Some(ys)),
        bwd: Box::new(bwd),
    })))
}

/// [`GradBridge`] for a value of three inputs.
struct GradBridge3 {
    ys: std::sync::Mutex<Option<Tensor>>,
    bwd: BackwardFn3,
}

impl candle_core::CustomOp3 for GradBridge3 {
    fn name(&self) -> &'static str {
        "grad-bridge3"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        take_storage(&self.ys, cpu_of)
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        take_storage(&self.ys, cuda_of)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(grad)
    }
}

/// `ys` (computed from detached copies of `a`, `b`, `c`) with the
/// gradients `bwd(dL/dys)` flowing to the three inputs.
pub fn attach_grad3(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    ys: Tensor,
    bwd: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let ys = ys.contiguous()?;
    a.apply_op3_arc(
        b,
        c,
        std::sync::Arc::new(Box::new(GradBridge3 {
            ys: std::sync::Mutex::new(Some(ys)),
            bwd: Box::new(bwd),
        })),
    )
}

/// RMSNorm over the last dimension: `xs / sqrt(mean(xs^2) + eps) * weight`.
///
/// # Shapes
/// * `xs`: `(.., hidden)`, `weight`: `(hidden,)`
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if weight.track_op() || xs.dtype() != DType::F32 {
        return rms_norm_composed(xs, weight, eps);
    }
    let x = xs.detach().contiguous()?;
    let ys = candle_nn::ops::rms_norm(&x, weight, eps as f32)?;
    if !xs.track_op() {
        return Ok(ys);
    }
    // dx = r (g w) - x r^3 mean(g w x), r = 1 / sqrt(mean(x^2) + eps)
    let w = weight.clone();
    attach_grad(xs, ys, move |g| {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let gw = g.broadcast_mul(&w)?;
        let dot = (&gw * &x)?.mean_keepdim(D::Minus1)?;
        let coef = (dot * r.powf(3.0)?)?;
        gw.broadcast_mul(&r)? - x.broadcast_mul(&coef)?
    })
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
    let ys = candle_nn::ops::softmax_last_dim(&xs.detach().contiguous()?)?;
    if !xs.track_op() {
        return Ok(ys);
    }
    // dx = y (g - sum(g y))
    let y = ys.clone();
    attach_grad(xs, ys, move |g| {
        let dot = (g * &y)?.sum_keepdim(D::Minus1)?;
        &y * g.broadcast_sub(&dot)?
    })
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
    if tracks(&[cos, sin]) || xs.dtype() != cos.dtype() {
        return rope_composed(xs, cos, sin);
    }
    let ys = candle_nn::rotary_emb::rope(&xs.detach().contiguous()?, cos, sin)?;
    if !xs.track_op() {
        return Ok(ys);
    }
    // RoPE is a rotation: its transpose rotates by the opposite angle.
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach_grad(xs, ys, move |g| {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)
    })
}

/// Sum over rows of `-log softmax(logits)[target]`, with a backward of
/// `softmax(logits) - onehot(target)`: one fused softmax instead of the
/// five passes (and their backward) of a composed log-softmax over the
/// vocabulary, which dominate a training step's elementwise time.
///
/// # Shapes
/// * `logits`: `(n, vocab)` f32, `targets`: `(n,)` u32; returns a scalar.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let l = logits.detach().contiguous()?;
    let t = targets.unsqueeze(1)?;
    let lse = log_softmax_last_dim(&l)?;
    let nll = lse.gather(&t, 1)?.sum_all()?.neg()?;
    if !logits.track_op() {
        return Ok(nll);
    }
    attach_grad(logits, nll, move |g| {
        let p = candle_nn::ops::softmax_last_dim(&l)?;
        let minus_one = Tensor::full(-1f32, t.dims(), t.device())?.to_dtype(p.dtype())?;
        p.scatter_add(&t, &minus_one, 1)?.broadcast_mul(g)
    })
}

/// Plain differentiable cross-entropy sum, the reference for [`cross_entropy_sum`].
pub fn cross_entropy_sum_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    log_softmax_last_dim(logits)?
        .gather(&targets.unsqueeze(1)?, 1)?
        .sum_all()?
        .neg()
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

    /// Values and input gradients of every fused op with a hand-written
    /// backward equal the plain composition's.
    #[test]
    fn fused_backward_equals_composed_backward() -> Result<()> {
        let dev = Device::Cpu;
        let check = |name: &str,
                     shape: (usize, usize, usize, usize),
                     fast: &dyn Fn(&Tensor) -> Result<Tensor>,
                     slow: &dyn Fn(&Tensor) -> Result<Tensor>|
         -> Result<()> {
            let x = Var::randn(0f32, 1.0, shape, &dev)?;
            let yf = fast(x.as_tensor())?;
            let ys = slow(x.as_tensor())?;
            let probe = Tensor::randn(0f32, 1.0, yf.shape(), &dev)?;
            let dv = (&yf - &ys)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(dv < 1e-5, "{name}: value diff {dv}");
            let gf = (yf * &probe)?.sum_all()?.backward()?;
            let gs = (ys * &probe)?.sum_all()?.backward()?;
            let (gf, gs) = (
                gf.get(x.as_tensor()).unwrap(),
                gs.get(x.as_tensor()).unwrap(),
            );
            let dg = (gf - gs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(dg < 1e-4, "{name}: gradient diff {dg}");
            Ok(())
        };
        let w = Tensor::randn(1f32, 0.2, 8, &dev)?;
        check("rms_norm", (2, 3, 5, 8), &|x| rms_norm(x, &w, 1e-5), &|x| {
            rms_norm_composed(x, &w, 1e-5)
        })?;
        check("softmax", (2, 3, 5, 8), &|x| softmax_last_dim(x), &|x| {
            softmax_composed(x)
        })?;
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        check("rope", (2, 3, 5, 8), &|x| rope(x, &cos, &sin), &|x| {
            rope_composed(x, &cos, &sin)
        })?;
        let targets = Tensor::new(&[3u32, 0, 7, 7, 1, 2], &dev)?;
        check(
            "cross_entropy",
            (1, 1, 6, 8),
            &|x| cross_entropy_sum(&x.reshape((6, 8))?, &targets),
            &|x| cross_entropy_sum_composed(&x.reshape((6, 8))?, &targets),
        )?;
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
