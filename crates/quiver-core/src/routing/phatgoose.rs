//! Phatgoose gates (METHOD.md section 2; Muqeeth et al. 2024, mttl's
//! `PhatgooseTransform`): after an expert is trained, learn one sigmoid
//! gate vector per wrapped layer on the expert's own data, with the expert
//! frozen: the layer adds `sigmoid(<x, g>) s B A x`. The gate starts at 0,
//! only the gates are trained (AdamW, lr 1e-3, 10% warmup then linear
//! decay, no weight decay, gradient norm clipped at 1, one example per
//! step, 100 steps). At inference the gates are the prototypes of
//! [`super::SelectorKind::Phatgoose`].

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::Example;
use crate::error::{Error, Result};
use crate::expert::{detach_all, Expert};
use crate::lora::LinearAdapter;
use crate::models::Llama;
use crate::ops::{self, matmul_t};
use crate::tokenizer::Tokenizer;
use crate::train::optim::{linear_schedule, AdamW};

use super::mu::example_ids;
use super::prototypes::Prototypes;

/// Phatgoose gate training settings (mttl's `PhatgooseConfig`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhatgooseConfig {
    pub steps: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    /// Seed of the example order.
    pub seed: u64,
    pub max_input_len: usize,
    pub max_target_len: usize,
}

impl Default for PhatgooseConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            lr: 1e-3,
            warmup_ratio: 0.1,
            seed: 0,
            max_input_len: 512,
            max_target_len: 64,
        }
    }
}

/// The expert's LoRA behind a trainable sigmoid gate.
#[derive(Debug)]
struct GatedLora {
    /// `(1, in)`
    gate: Var,
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LinearAdapter for GatedLora {
    fn delta(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let y = (matmul_t(&matmul_t(xs, &self.a)?, &self.b)? * self.scale)?;
        let logit = matmul_t(xs, self.gate.as_tensor())?;
        // sigmoid from basic ops, which all have a backward pass.
        let g = (logit.neg()?.exp()? + 1.0)?.recip()?;
        y.broadcast_mul(&g)
    }
}

/// Mean target-token negative log-likelihood of one example.
fn example_loss(model: &Llama, input: &[u32], target: &[u32]) -> Result<Tensor> {
    let mut seq: Vec<u32> = input.iter().chain(target).copied().collect();
    seq.pop();
    let n = seq.len();
    let ids = Tensor::from_vec(seq, (1, n), model.device())?;
    let hidden = model.forward_hidden(&ids, None)?;
    let h = hidden
        .narrow(1, input.len() - 1, target.len())?
        .squeeze(0)?;
    let logp = ops::log_softmax_last_dim(&model.logits(&h)?.to_dtype(DType::F32)?)?;
    let t = Tensor::new(target, model.device())?.unsqueeze(1)?;
    Ok((logp.gather(&t, 1)?.sum_all()?.neg()? / target.len() as f64)?)
}

/// Trains one expert's gates; returns module -> gate vector (`in`). Leaves
/// the model without adapters.
pub fn expert_phatgoose_gates(
    model: &mut Llama,
    tok: &Tokenizer,
    expert: &Expert,
    examples: &[Example],
    cfg: &PhatgooseConfig,
) -> Result<BTreeMap<String, Vec<f32>>> {
    if examples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "expert `{}`: no training examples to train its Phatgoose gates on",
            expert.name
        )));
    }
    if cfg.steps == 0 || cfg.lr.is_nan() || cfg.lr <= 0.0 {
        return Err(Error::InvalidArgument(
            "Phatgoose needs at least one step and a positive learning rate".into(),
        ));
    }
    let data = examples
        .iter()
        .map(|ex| example_ids(model, tok, ex, cfg.max_input_len, cfg.max_target_len))
        .collect::<Result<Vec<_>>>()?;
    expert.check_fits(model, None)?;
    detach_all(model);
    let device = model.device().clone();
    let dtype = model.dtype();
    let scale = expert.config.scale();
    let mut gates: Vec<(String, Var)> = Vec::new();
    for lin in model.linears_mut() {
        let Some((a, b)) = expert.weights.get(lin.name()) else {
            continue;
        };
        let gate = Var::zeros((1, lin.in_features()), dtype, &device)?;
        gates.push((lin.name().to_string(), gate.clone()));
        lin.set_adapter(Some(Arc::new(GatedLora {
            gate,
            a: a.to_device(&device)?.to_dtype(dtype)?,
            b: b.to_device(&device)?.to_dtype(dtype)?,
            scale,
        })));
    }
    let train = || -> Result<()> {
        let vars: Vec<Var> = gates.iter().map(|(_, v)| v.clone()).collect();
        let mut opt = AdamW::new(vars.clone(), 0.0)?;
        let warmup = (cfg.warmup_ratio * cfg.steps as f64).ceil() as usize;
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut order: Vec<usize> = Vec::new();
        for step in 0..cfg.steps {
            if order.is_empty() {
                order = (0..data.len()).collect();
                order.shuffle(&mut rng);
            }
            let (input, target) = &data[order.pop().expect("refilled")];
            let loss = example_loss(model, input, target)?;
            let grads = loss.backward()?;
            let mut g: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
            clip_grad_norm(&mut g, 1.0)?;
            opt.step(&g, linear_schedule(cfg.lr, step, warmup, cfg.steps))?;
        }
        Ok(())
    };
    let res = train();
    detach_all(model);
    res?;
    gates
        .into_iter()
        .map(|(m, v)| {
            let g = v
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            Ok((m, g))
        })
        .collect()
}

/// Scales gradients so their global L2 norm is at most `max`.
fn clip_grad_norm(grads: &mut [Option<Tensor>], max: f64) -> Result<()> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if norm > max {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * (max / (norm + 1e-6)))?;
        }
    }
    Ok(())
}

/// Phatgoose gates of every expert (`examples[e]`: expert `e`'s training
/// examples). Leaves the model without adapters.
pub fn phatgoose_prototypes(
    model: &mut Llama,
    tok: &Tokenizer,
    experts: &[Expert],
    examples: &[Vec<Example>],
    cfg: &PhatgooseConfig,
) -> Result<Prototypes> {
    let rows = experts
        .iter()
        .zip(examples)
        .map(|(e, ex)| expert_phatgoose_gates(model, tok, e, ex, cfg))
        .collect::<Result<Vec<_>>>()?;
    Prototypes::from_rows(experts.iter().map(|e| e.name.clone()).collect(), &rows)
}
