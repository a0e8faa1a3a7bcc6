//! The LoRA-aware linear layer every projection of a model goes through,
//! and the LoRA adapter itself (PEFT layout).
//!
//! A LoRA on `y = W x` (`W`: `out x in`) has `A` (`r x in`), `B`
//! (`out x r`) and scale `s = alpha / r`, and adds `s * B A x`
//! (METHOD.md, notation). Adapters plug in through [`LinearAdapter`], so
//! training, single experts and routed mixtures all reuse the same model
//! code (STYLE.md: inject LoRA at the linear layer).

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};

/// Something that adds a term to a linear layer's output given its input.
///
/// # Shapes
/// * `xs`: `(b_sz, seq_len, in)`; returns `(b_sz, seq_len, out)`.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    fn delta(&self, xs: &Tensor) -> Result<Tensor>;
}

/// One LoRA adapter on one linear layer.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `(r, in)`
    pub a: Tensor,
    /// `(out, r)`
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

impl Lora {
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb {
            candle_core::bail!("LoRA rank mismatch: A has {r} rows, B has {rb} columns")
        }
        Ok(Self { a, b, scale })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

impl LinearAdapter for Lora {
    fn delta(&self, xs: &Tensor) -> Result<Tensor> {
        let ax = matmul_t(xs, &self.a)?;
        let bax = matmul_t(&ax, &self.b)?;
        bax * self.scale
    }
}

/// `xs @ w^T` for `xs` of any rank >= 2 and a 2-D `w` of shape `(out, in)`.
pub fn matmul_t(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
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

/// A linear layer (`W`, optional bias) with an optional adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl LoraLinear {
    /// `name` is the module path as in Hugging Face checkpoints, e.g.
    /// `model.layers.0.self_attn.q_proj`.
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            adapter: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// The base layer alone, ignoring any adapter.
    pub fn forward_base(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = matmul_t(xs, &self.weight)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

impl Module for LoraLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.forward_base(xs)?;
        match &self.adapter {
            Some(adapter) => ys + adapter.delta(xs)?,
            None => Ok(ys),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn lora_adds_scaled_ba_x() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let a = Tensor::randn(0f32, 1.0, (2, 5), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (6, 2), &dev)?;
        let xs = Tensor::randn(0f32, 1.0, (3, 4, 5), &dev)?;
        let mut lin = LoraLinear::new("x", w.clone(), None);
        lin.set_adapter(Some(Arc::new(Lora::new(a.clone(), b.clone(), 4.0)?)));
        let got = lin.forward(&xs)?;
        let dense = (w + (b.matmul(&a)? * 4.0)?)?;
        let want = xs.broadcast_matmul(&dense.t()?)?;
        let diff = (got - want)?
            .abs()?
            .max(D::Minus1)?
            .max(D::Minus1)?
            .max(0)?;
        assert!(diff.to_scalar::<f32>()? < 1e-4);
        Ok(())
    }
}
