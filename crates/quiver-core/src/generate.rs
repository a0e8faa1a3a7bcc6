//! Text generation with a KV cache: greedy, or temperature / top-p
//! sampling from a seeded generator.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::models::Llama;

/// How to pick the next token.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling threshold in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 64,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(format!(
                "--temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "--top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
    /// The caller asked to stop (a stop sequence, a client gone).
    Stopped,
}

/// What a token callback of [`generate_until`] tells the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Picks the next token from `(vocab,)` logits.
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        Ok(self.sample_slice(&logits))
    }

    /// [`Sampler::sample`] from logits already on the host.
    pub fn sample_slice(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.params.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p.1;
                if acc >= self.params.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for (id, p) in &probs {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates up to `params.max_tokens` tokens after `prompt`, calling
/// `on_token` for each new one. Returns the new tokens and why it stopped.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    eos_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, StopReason)> {
    generate_until(model, prompt, params, eos_ids, |id| {
        on_token(id).map(|()| Flow::Continue)
    })
}

/// [`generate`], where the callback may end generation after any token
/// ([`StopReason::Stopped`]); the token it saw is kept in the output.
pub fn generate_until(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    eos_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<Flow>,
) -> Result<(Vec<u32>, StopReason)> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty"));
    }
    let max = model.config().max_position_embeddings;
    if prompt.len() > max {
        return Err(Error::ContextTooLong {
            tokens: prompt.len(),
            max,
        });
    }
    let mut sampler = Sampler::new(params.clone());
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let mut pos = prompt.len();
    loop {
        if out.len() >= params.max_tokens {
            return Ok((out, StopReason::MaxTokens));
        }
        let logits = model.forward_last(&input, Some(&mut cache))?.squeeze(0)?;
        let next = sampler.sample(&logits)?;
        if eos_ids.contains(&next) {
            return Ok((out, StopReason::Eos));
        }
        out.push(next);
        if on_token(next)? == Flow::Stop {
            return Ok((out, StopReason::Stopped));
        }
        if pos >= max {
            return Ok((out, StopReason::ContextFull));
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
        pos += 1;
    }
}
