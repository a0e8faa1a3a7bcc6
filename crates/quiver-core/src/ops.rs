//! Tensor ops shared by the model code, each with a differentiable
//! composition and, where candle has one, a fused kernel.
//!
//! candle 0.11's fused `rms_norm`, `softmax_last_dim` and `rope` have no
//! backward pass: used on a tensor that carries gradient they silently cut
//! the graph. Each op here picks the fused kernel only when no input tracks
//! gradient (`Tensor::track_op`), so inference is fast and training is
//! correct without the caller choosing.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::kernels;

fn tracks(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Whether every tensor is f32 on the CPU, where [`kernels`] apply.
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The values of a contiguous f32 tensor's CPU storage (from
/// `Tensor::storage_and_layout`), for code that runs its own loops over them.
pub(crate) fn cpu_f32_slice<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Result<&'a [f32]> {
    let candle_core::Storage::Cpu(c) = storage else {
        candle_core::bail!("a CPU kernel got a tensor on another device");
    };
    storage_f32(c, layout)
}

/// Calls `f` with the values of an f32 CPU tensor, row-major.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    Ok(f(cpu_f32_slice(&storage, layout)?))
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

/// The `(rows, cols)` matrix view of a contiguous f32 CPU tensor's values
/// with `cols` its last dimension, for [`kernels::gemm`].
fn with_matrix<R>(t: &Tensor, f: impl FnOnce(kernels::gemm::Mat) -> R) -> Result<R> {
    let cols = t.dim(D::Minus1)?;
    let rows = t.elem_count() / cols.max(1);
    with_cpu_f32(t, |v| f(kernels::gemm::Mat::new(v, rows, cols)))
}

/// `xs @ w^T` for `xs` of any rank >= 2 and a 2-D `w` of shape `(out, in)`.
///
/// Outside the autograd graph (neither operand tracked), with both
/// contiguous f32 on the CPU, the product goes to [`linear_product`],
/// which writes it straight into a new buffer: candle's matmul zero-fills
/// its output first (2.7% of a scoring forward on SmolLM2). Same `gemm`
/// crate underneath.
pub fn matmul_t(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !xs.track_op()
        && !w.track_op()
        && xs.is_contiguous()
        && w.is_contiguous()
        && cpu_f32(&[xs, w])
    {
        return linear_product(xs, w, true);
    }
    let dims = xs.dims();
    let in_dim = dims[dims.len() - 1];
    let rows = xs.elem_count() / in_dim.max(1);
    let out = w.dims()[0];
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = out;
    xs.reshape((rows, in_dim))?
        .matmul(&w.t()?)?
        .reshape(out_dims)
}

/// `xs @ w^T` (`w`: `(out, in)`), or `xs @ w` with `transpose: false`
/// (`w`: `(in, out)`), for inputs that carry no gradient: on the CPU in
/// f32 written straight into a new buffer ([`kernels::gemm::matmul`]),
/// elsewhere candle's matmul.
///
/// # Shapes
/// * `xs`: `(.., in)`; returns `(.., out)`.
pub fn linear_product(xs: &Tensor, w: &Tensor, transpose: bool) -> Result<Tensor> {
    if !cpu_f32(&[xs, w]) {
        let w = if transpose { w.clone() } else { w.t()? };
        return matmul_t(xs, &w);
    }
    let out = w.dim(if transpose { 0 } else { 1 })?;
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = out;
    let y = with_matrix(xs, |x| {
        with_matrix(w, |wm| {
            let wm = if transpose { wm.t() } else { wm };
            kernels::gemm::matmul(x, wm, 1.0)
        })
    })??;
    Tensor::from_vec(y, dims, &Device::Cpu)
}

/// `dst + beta * xs @ w^T` (or `@ w` with `transpose: false`), as
/// [`linear_product`]; on the CPU in f32 accumulated into `dst`'s own
/// buffer, which the caller must not share with any other tensor.
pub fn add_linear_product(
    dst: Tensor,
    xs: &Tensor,
    w: &Tensor,
    transpose: bool,
    beta: f64,
) -> Result<Tensor> {
    if !cpu_f32(&[&dst, xs, w]) || !dst.is_contiguous() {
        return dst + (linear_product(xs, w, transpose)? * beta)?;
    }
    let (xs, w) = (xs.contiguous()?, w.contiguous()?);
    dst.inplace_op3(
        &xs,
        &w,
        &AddProduct {
            transpose,
            beta: beta as f32,
        },
    )?;
    Ok(dst)
}

/// `dst + src`; on the CPU in f32 added into `dst`'s own buffer, which the
/// caller must not share with any other tensor.
pub fn add_into(dst: Tensor, src: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[&dst, src]) || !dst.is_contiguous() || dst.shape() != src.shape() {
        return dst + src;
    }
    dst.inplace_op2(&src.contiguous()?, &AddInto)?;
    Ok(dst)
}

/// A LoRA's down-projection with dropout on its input,
/// `z = dropout(x) a^T` ([`dropout`]'s mask for `seed`, drop probability
/// `p`; `seed: None` for none). On the CPU in f32 one pass
/// ([`kernels::lora_down`]) that never holds the dropped input.
///
/// # Shapes
/// * `xs`: `(.., inp)`, `a`: `(r, inp)`; returns `(.., r)`.
pub fn lora_down(xs: &Tensor, a: &Tensor, seed: Option<u32>, p: f32) -> Result<Tensor> {
    if !cpu_f32(&[xs, a]) {
        let xd = match seed {
            Some(s) => dropout(xs, s, p)?,
            None => xs.clone(),
        };
        return linear_product(&xd, a, true);
    }
    let (r, inp) = a.dims2()?;
    let rows = xs.elem_count() / inp.max(1);
    let shape = kernels::LoraDown {
        rows,
        inp,
        r,
        seed,
        p,
    };
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = r;
    let z = with_cpu_f32(xs, |x| {
        with_cpu_f32(a, |av| {
            let mut z = vec![0f32; rows * r];
            kernels::lora_down(shape, x, av, &mut z);
            z
        })
    })??;
    Tensor::from_vec(z, dims, &Device::Cpu)
}

/// The backward of [`lora_down`] from `dz`: `dA = dz^T dropout(x)`, and
/// `dx + dropout(dz a)` when `dx` (the input's gradient so far) is given,
/// summed into `dx`'s own buffer on the CPU (the caller must not share it).
pub fn lora_down_backward(
    xs: &Tensor,
    a: &Tensor,
    dz: &Tensor,
    seed: Option<u32>,
    p: f32,
    dx: Option<Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (r, inp) = a.dims2()?;
    let rows = xs.elem_count() / inp.max(1);
    let dz = dz.reshape((rows, r))?;
    let cpu = cpu_f32(&[xs, a, &dz])
        && dx
            .as_ref()
            .is_none_or(|d| cpu_f32(&[d]) && d.is_contiguous());
    if !cpu {
        let xd = match seed {
            Some(s) => dropout(&xs.reshape((rows, inp))?, s, p)?,
            None => xs.reshape((rows, inp))?,
        };
        let da = dz.t()?.matmul(&xd)?;
        let dx = match dx {
            Some(acc) => {
                let part = dz.matmul(a)?;
                let part = match seed {
                    Some(s) => dropout(&part, s, p)?,
                    None => part,
                };
                Some((acc + part.reshape(xs.shape())?)?)
            }
            None => None,
        };
        return Ok((da, dx));
    }
    let op = LoraDownBackward {
        shape: kernels::LoraDown {
            rows,
            inp,
            r,
            seed,
            p,
        },
        a: a.flatten_all()?.to_vec1::<f32>()?,
        da: std::sync::Mutex::new(None),
    };
    let (xs, dz) = (xs.contiguous()?, dz.contiguous()?);
    let da = match &dx {
        Some(d) => {
            d.inplace_op3(&xs, &dz, &op)?;
            op.da
                .lock()
                .map_err(|_| candle_core::Error::Msg("lora-down-backward: poisoned".into()))?
                .take()
                .ok_or_else(|| candle_core::Error::Msg("lora-down-backward: no dA".into()))?
        }
        None => with_cpu_f32(&xs, |x| {
            with_cpu_f32(&dz, |g| {
                kernels::lora_down_backward(op.shape, x, &op.a, g, None)
            })
        })??,
    };
    Ok((Tensor::from_vec(da, (r, inp), &Device::Cpu)?, dx))
}

/// [`lora_down_backward`] summing into the input gradient in place.
struct LoraDownBackward {
    shape: kernels::LoraDown,
    a: Vec<f32>,
    da: std::sync::Mutex<Option<Vec<f32>>>,
}

impl candle_core::InplaceOp3 for LoraDownBackward {
    fn name(&self) -> &'static str {
        "lora-down-backward"
    }

    fn cpu_fwd(
        &self,
        dx: &mut candle_core::CpuStorage,
        dl: &candle_core::Layout,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        dz: &candle_core::CpuStorage,
        zl: &candle_core::Layout,
    ) -> Result<()> {
        let (x, g) = (storage_f32(xs, xl)?, storage_f32(dz, zl)?);
        let dx = cpu_f32_slice_mut(dx, dl)?;
        if dx.len() != x.len() {
            candle_core::bail!(
                "lora-down-backward: dx has {} values, x {}",
                dx.len(),
                x.len()
            );
        }
        let da = kernels::lora_down_backward(self.shape, x, &self.a, g, Some(dx));
        *self
            .da
            .lock()
            .map_err(|_| candle_core::Error::Msg("lora-down-backward: poisoned".into()))? =
            Some(da);
        Ok(())
    }
}

/// The values of a contiguous f32 CPU storage, mutable.
fn cpu_f32_slice_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> Result<&'a mut [f32]> {
    let (lo, hi) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("an in-place kernel got a non-contiguous tensor".into())
    })?;
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&mut v[lo..hi]),
        _ => candle_core::bail!("an in-place kernel got a tensor that is not f32"),
    }
}

/// The values of a contiguous f32 CPU storage.
fn storage_f32<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    let (lo, hi) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("a CPU kernel got a non-contiguous tensor".into())
    })?;
    Ok(&s.as_slice::<f32>()?[lo..hi])
}

/// `dst += beta * xs @ op(w)` in place ([`add_linear_product`]).
struct AddProduct {
    transpose: bool,
    beta: f32,
}

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-linear-product"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dl: &candle_core::Layout,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<()> {
        let (x, wv) = (storage_f32(xs, xl)?, storage_f32(w, wl)?);
        let in_dim = *xl.dims().last().unwrap_or(&1);
        let rows = x.len() / in_dim.max(1);
        let wd = wl.dims();
        if wd.len() != 2 {
            candle_core::bail!("add-linear-product: the weight is not a matrix");
        }
        let wm = kernels::gemm::Mat::new(wv, wd[0], wd[1]);
        let wm = if self.transpose { wm.t() } else { wm };
        let dst = cpu_f32_slice_mut(dst, dl)?;
        kernels::gemm::matmul_acc(dst, kernels::gemm::Mat::new(x, rows, in_dim), wm, self.beta);
        Ok(())
    }
}

/// `dst += src` in place ([`add_into`]).
struct AddInto;

impl candle_core::InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "add-into"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dl: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        sl: &candle_core::Layout,
    ) -> Result<()> {
        let src = storage_f32(src, sl)?;
        kernels::add_into(cpu_f32_slice_mut(dst, dl)?, src);
        Ok(())
    }
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
    let w = weight.clone();
    attach_grad(xs, ys, move |g| rms_norm_backward(&x, &w, g, eps))
}

/// Gradient of [`rms_norm`] with respect to `xs` (the weight is frozen):
/// `dx = r (g w) - x r^3 mean(g w x)`, `r = 1 / sqrt(mean(x^2) + eps)`.
/// One fused pass on the CPU in f32 ([`kernels::rms_norm_backward`]).
pub fn rms_norm_backward(xs: &Tensor, weight: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(&[xs, weight, g]) && xs.shape() == g.shape() {
        let dx = with_cpu_f32(xs, |x| {
            with_cpu_f32(weight, |w| {
                with_cpu_f32(g, |gv| {
                    let mut dx = vec![0f32; x.len()];
                    kernels::rms_norm_backward(x, w, gv, &mut dx, eps as f32);
                    dx
                })
            })
        })???;
        return Tensor::from_vec(dx, xs.shape(), &Device::Cpu);
    }
    let r = (xs.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let gw = g.broadcast_mul(weight)?;
    let dot = (&gw * xs)?.mean_keepdim(D::Minus1)?;
    let coef = (dot * r.powf(3.0)?)?;
    gw.broadcast_mul(&r)? - xs.broadcast_mul(&coef)?
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

/// Inverted dropout with drop probability `p` and the mask of
/// [`kernels::dropout_keeps`] for `seed` (the same mask on every device,
/// and again on every call with the same seed: the backward pass recomputes
/// it instead of keeping it). Not differentiable by itself: used inside
/// hand-written backward passes.
pub fn dropout(xs: &Tensor, seed: u32, p: f32) -> Result<Tensor> {
    if cpu_f32(&[xs]) {
        let y = with_cpu_f32(xs, |x| {
            let mut y = vec![0f32; x.len()];
            kernels::dropout(Some(x), &mut y, seed, p);
            y
        })?;
        return Tensor::from_vec(y, xs.shape(), &Device::Cpu);
    }
    let mut m = vec![1f32; xs.elem_count()];
    kernels::dropout(None, &mut m, seed, p);
    let m = Tensor::from_vec(m, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    xs * m
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
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach_grad(xs, ys, move |g| rope_backward(g, &cos, &neg_sin))
}

/// Gradient of [`rope`]: RoPE is a rotation, so its transpose rotates by
/// the opposite angle. Takes `-sin` (computed once by the caller).
pub fn rope_backward(g: &Tensor, cos: &Tensor, neg_sin: &Tensor) -> Result<Tensor> {
    if g.dtype() != cos.dtype() {
        return rope_composed(g, cos, neg_sin);
    }
    candle_nn::rotary_emb::rope(&g.contiguous()?, cos, neg_sin)
}

/// Sum over rows of `-log softmax(logits)[target]`, with a backward of
/// `softmax(logits) - onehot(target)`: one fused softmax instead of the
/// five passes (and their backward) of a composed log-softmax over the
/// vocabulary, which dominate a training step's elementwise time. On the
/// CPU in f32 both directions are single fused kernels
/// ([`kernels::logsumexp_rows`], [`kernels::softmax_minus_onehot`]).
///
/// # Shapes
/// * `logits`: `(n, vocab)` f32, `targets`: `(n,)` u32; returns a scalar.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[logits]) {
        return cross_entropy_sum_cpu(logits, targets);
    }
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

/// The targets as `u32`, checked against `logits`' `(n, vocab)` shape.
fn checked_targets(logits: &Tensor, targets: &Tensor) -> Result<Vec<u32>> {
    let (n, vocab) = logits.dims2()?;
    let t = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if t.len() != n {
        candle_core::bail!(
            "cross_entropy_sum: {n} rows of logits but {} targets",
            t.len()
        );
    }
    if let Some(bad) = t.iter().find(|&&v| v as usize >= vocab) {
        candle_core::bail!("cross_entropy_sum: target {bad} outside the {vocab} classes");
    }
    Ok(t)
}

/// [`cross_entropy_sum`] and the gradient of `g` times it with respect to
/// the logits, `g * (softmax(logits) - onehot(target))`, outside any
/// autograd graph (for hand-written backward passes).
pub fn cross_entropy_sum_and_grad(
    logits: &Tensor,
    targets: &Tensor,
    g: f64,
) -> Result<(f64, Tensor)> {
    let l = logits.detach().contiguous()?;
    if !cpu_f32(&[&l]) {
        let nll = cross_entropy_sum(&l, targets)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let t = targets.unsqueeze(1)?;
        let p = candle_nn::ops::softmax_last_dim(&l)?;
        let minus_one = Tensor::full(-1f32, t.dims(), t.device())?.to_dtype(p.dtype())?;
        return Ok((nll, (p.scatter_add(&t, &minus_one, 1)? * g)?));
    }
    let (n, vocab) = l.dims2()?;
    let t = checked_targets(&l, targets)?;
    let (nll, dx) = with_cpu_f32(&l, |x| {
        let lse = kernels::logsumexp_rows(x, vocab);
        let nll: f64 = (0..n)
            .map(|r| (lse[r] - x[r * vocab + t[r] as usize]) as f64)
            .sum();
        let mut dx = vec![0f32; x.len()];
        kernels::softmax_minus_onehot(x, &lse, &t, g as f32, &mut dx, vocab);
        (nll, dx)
    })?;
    Ok((nll, Tensor::from_vec(dx, (n, vocab), &Device::Cpu)?))
}

fn cross_entropy_sum_cpu(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    let l = logits.detach().contiguous()?;
    let t = checked_targets(&l, targets)?;
    let (lse, nll) = with_cpu_f32(&l, |x| {
        let lse = kernels::logsumexp_rows(x, vocab);
        let nll: f64 = (0..n)
            .map(|r| (lse[r] - x[r * vocab + t[r] as usize]) as f64)
            .sum();
        (lse, nll as f32)
    })?;
    let nll = Tensor::new(nll, &Device::Cpu)?;
    if !logits.track_op() {
        return Ok(nll);
    }
    attach_grad(logits, nll, move |g| {
        let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let dx = with_cpu_f32(&l, |x| {
            let mut dx = vec![0f32; x.len()];
            kernels::softmax_minus_onehot(x, &lse, &t, g, &mut dx, vocab);
            dx
        })?;
        Tensor::from_vec(dx, (n, vocab), &Device::Cpu)
    })
}

/// Plain differentiable cross-entropy sum, the reference for [`cross_entropy_sum`].
pub fn cross_entropy_sum_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    log_softmax_last_dim(logits)?
        .gather(&targets.unsqueeze(1)?, 1)?
        .sum_all()?
        .neg()
}

/// `silu(gate) * up`, the gated product of a SwiGLU MLP: on the CPU in f32
/// one fused pass forward ([`kernels::silu_mul`]) and one backward,
/// instead of candle's SiLU, product and their separate backward ops.
///
/// # Shapes
/// * `gate`, `up`: the same shape; returns that shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[gate, up]) || gate.shape() != up.shape() {
        return silu_mul_composed(gate, up);
    }
    let (g, u) = (gate.detach().contiguous()?, up.detach().contiguous()?);
    let y = with_cpu_f32(&g, |gs| {
        with_cpu_f32(&u, |us| {
            let mut y = vec![0f32; gs.len()];
            kernels::silu_mul(gs, us, &mut y);
            y
        })
    })??;
    let ys = Tensor::from_vec(y, gate.shape(), &Device::Cpu)?;
    if !tracks(&[gate, up]) {
        return Ok(ys);
    }
    // Two inputs through the three-input bridge: the third gets no gradient.
    attach_grad3((gate, up, up), ys, move |dy| {
        let (dg, du) = silu_mul_backward(&g, &u, dy)?;
        Ok((Some(dg), Some(du), None))
    })
}

/// Gradients of [`silu_mul`] with respect to `gate` and `up`:
/// `dg = dy u s (1 + g (1 - s))`, `du = dy g s`, `s = sigmoid(gate)`.
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let shape = gate.shape().clone();
    if cpu_f32(&[gate, up]) && up.shape() == &shape && dy.shape() == &shape {
        let dy = dy.to_dtype(DType::F32)?;
        let (dg, du) = with_cpu_f32(gate, |gs| {
            with_cpu_f32(up, |us| {
                with_cpu_f32(&dy, |ds| {
                    let (mut dg, mut du) = (vec![0f32; gs.len()], vec![0f32; gs.len()]);
                    kernels::silu_mul_backward(gs, us, ds, &mut dg, &mut du);
                    (dg, du)
                })
            })
        })???;
        return Ok((
            Tensor::from_vec(dg, &shape, &Device::Cpu)?,
            Tensor::from_vec(du, &shape, &Device::Cpu)?,
        ));
    }
    let s = candle_nn::ops::sigmoid(gate)?;
    let gs = (gate * &s)?;
    let du = (dy * &gs)?;
    let ds = (&s + (&gs * (1.0 - &s)?)?)?;
    let dg = ((dy * up)? * ds)?;
    Ok((dg, du))
}

/// Plain differentiable `silu(gate) * up`.
pub fn silu_mul_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Attention weights: softmax over the last dimension of `scale * att`
/// with a causal mask, where query `i` of `seq` sees keys `0..=kv - seq + i`
/// (the first `kv - seq` keys were cached before). On the CPU in f32 one
/// fused kernel ([`kernels::causal_softmax`]) that also skips the masked
/// keys' exponentials; elsewhere scale, mask add and softmax.
///
/// # Shapes
/// * `att`: `(.., seq, kv)` with `kv >= seq`; returns the same shape.
pub fn causal_softmax(att: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = att.dims();
    let (seq, kv) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if kv < seq {
        candle_core::bail!("causal_softmax: {seq} queries but only {kv} keys");
    }
    if !cpu_f32(&[att]) {
        return causal_softmax_composed(att, scale);
    }
    let x = att.detach().contiguous()?;
    let y = with_cpu_f32(&x, |xs| {
        let mut y = vec![0f32; xs.len()];
        kernels::causal_softmax(xs, &mut y, kv, seq, kv - seq, scale as f32);
        y
    })?;
    let ys = Tensor::from_vec(y, att.shape(), &Device::Cpu)?;
    if !att.track_op() {
        return Ok(ys);
    }
    let y = ys.clone();
    attach_grad(att, ys, move |dy| causal_softmax_backward(&y, dy, scale))
}

/// Gradient of [`causal_softmax`] from its output `y`:
/// `dx = scale * y * (dy - <dy, y>)` per row (masked entries have `y = 0`).
pub fn causal_softmax_backward(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32(&[y]) && y.shape() == dy.shape() {
        let kv = y.dim(D::Minus1)?;
        let dy = dy.to_dtype(DType::F32)?;
        let dx = with_cpu_f32(y, |yv| {
            with_cpu_f32(&dy, |dv| {
                let mut dx = vec![0f32; yv.len()];
                kernels::softmax_backward(yv, dv, &mut dx, kv, scale as f32);
                dx
            })
        })??;
        return Tensor::from_vec(dx, y.shape(), &Device::Cpu);
    }
    let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
    (y * dy.broadcast_sub(&dot)?)? * scale
}

/// Plain differentiable scaled, causally masked softmax.
pub fn causal_softmax_composed(att: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = att.dims();
    let (seq, kv) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let offset = kv - seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..kv).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (seq, kv), att.device())?.to_dtype(att.dtype())?;
    softmax_composed(&(att * scale)?.broadcast_add(&mask)?)
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
mod tests;
