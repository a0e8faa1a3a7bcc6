//! AdamW over LoRA parameters, with state that can be checkpointed.
//!
//! candle-nn's AdamW keeps its moments private, so a resumed run could not
//! continue exactly where it stopped; this one exposes them.

use candle_core::{Result, Tensor, Var};

/// AdamW (decoupled weight decay), as `torch.optim.AdamW`.
#[derive(Debug)]
pub struct AdamW {
    pub vars: Vec<Var>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Number of steps taken.
    pub t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, weight_decay: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update with learning rate `lr` from per-variable gradients
    /// (`None`: no gradient this step, the variable is left alone).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let mut next = var.as_tensor().clone();
            if self.weight_decay != 0.0 {
                next = (&next * (1.0 - lr * self.weight_decay))?;
            }
            next = (next - (update * lr)?)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Linear warmup to `lr` over `warmup` steps, then linear decay to 0 at
/// `total` (Hugging Face's `get_linear_schedule_with_warmup`, counting the
/// first step as step 1 so it never has a zero learning rate).
pub fn linear_schedule(lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step + 1;
    if s <= warmup {
        lr * s as f64 / warmup.max(1) as f64
    } else {
        let rest = total.saturating_sub(warmup).max(1);
        lr * (total.saturating_sub(step) as f64 / rest as f64).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = 1.0;
        assert!((linear_schedule(lr, 0, 4, 100) - 0.25).abs() < 1e-12);
        assert!((linear_schedule(lr, 3, 4, 100) - 1.0).abs() < 1e-12);
        assert!(linear_schedule(lr, 50, 4, 100) < 1.0);
        assert!(linear_schedule(lr, 99, 4, 100) > 0.0);
    }

    /// Matches torch.optim.AdamW(lr=0.1, weight_decay=0.01) on
    /// p = [1, -2], grads [0.5, 0.5] then [-1, 2]:
    /// ```python
    /// import torch
    /// p = torch.tensor([1., -2.], requires_grad=True)
    /// o = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    /// for g in ([0.5, 0.5], [-1., 2.]):
    ///     p.grad = torch.tensor(g); o.step()
    /// print(p.tolist())  # [0.9347113966941833, -2.1843395233154297]
    /// ```
    #[test]
    fn matches_torch_adamw() -> Result<()> {
        let p = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let mut o = AdamW::new(vec![p.clone()], 0.01)?;
        for g in [[0.5f32, 0.5], [-1.0, 2.0]] {
            o.step(&[Some(Tensor::new(&g, &Device::Cpu)?)], 0.1)?;
        }
        let got = p.as_tensor().to_vec1::<f32>()?;
        let want = [0.934_711_4_f32, -2.184_339_5];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        Ok(())
    }
}
