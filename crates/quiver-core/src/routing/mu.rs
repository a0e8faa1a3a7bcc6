//! Mean-hidden-state ("mu") prototypes (METHOD.md section 2; mttl's
//! `HiddenStateComputer` with `pool="last"`, `track="each_layer"`): per
//! expert and per wrapped layer, the L2-normalised mean of the layer's
//! input at the last token of ~10 training examples of the expert's task,
//! computed with that expert loaded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{IndexOp, Tensor};

use crate::data::Example;
use crate::error::{Error, Result};
use crate::expert::{detach_all, Expert};
use crate::lora::LinearAdapter;
use crate::models::Llama;
use crate::tokenizer::Tokenizer;
use crate::train::tokenize_example;

use super::prototypes::Prototypes;

/// What the mu prototypes depend on (besides the model and the experts).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MuConfig {
    /// Examples of the expert's task averaged over (mttl: 10).
    pub examples_per_expert: usize,
    /// Inputs longer than this are truncated on the left.
    pub max_input_len: usize,
    /// Targets longer than this are truncated on the right.
    pub max_target_len: usize,
}

impl Default for MuConfig {
    fn default() -> Self {
        Self {
            examples_per_expert: 10,
            max_input_len: 512,
            max_target_len: 64,
        }
    }
}

/// Adds the last position's input to a running sum, then defers to the
/// expert's own adapter.
#[derive(Debug)]
struct CaptureLast {
    inner: Arc<dyn LinearAdapter>,
    sum: Arc<Mutex<Vec<f64>>>,
}

impl LinearAdapter for CaptureLast {
    fn delta(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b_sz, seq_len, _) = xs.dims3()?;
        for row in 0..b_sz {
            let last: Vec<f32> = xs
                .i((row, seq_len - 1))?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            let mut s = self.sum.lock().expect("capture");
            s.iter_mut().zip(last).for_each(|(a, b)| *a += b as f64);
        }
        self.inner.delta(xs)
    }
}

/// The token ids an example is encoded to (input then target), truncated
/// to fit the model.
pub(crate) fn example_ids(
    model: &Llama,
    tok: &Tokenizer,
    ex: &Example,
    max_input_len: usize,
    max_target_len: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let max = model.config().max_position_embeddings;
    let t_len = max_target_len.min(max / 2).max(1);
    let i_len = max_input_len.min(max - t_len).max(1);
    let t = tokenize_example(tok, ex, i_len, t_len)?;
    Ok((t.input, t.target))
}

/// One expert's mu vectors: module -> unit vector (`in`). Leaves the model
/// without adapters.
pub fn expert_mu_vectors(
    model: &mut Llama,
    tok: &Tokenizer,
    expert: &Expert,
    examples: &[Example],
    cfg: &MuConfig,
) -> Result<BTreeMap<String, Vec<f32>>> {
    let examples = &examples[..examples.len().min(cfg.examples_per_expert)];
    if examples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "expert `{}`: no training examples to compute its mean hidden state from",
            expert.name
        )));
    }
    detach_all(model);
    expert.attach(model, None)?;
    let mut sums: BTreeMap<String, Arc<Mutex<Vec<f64>>>> = BTreeMap::new();
    for lin in model.linears_mut() {
        if !expert.weights.contains_key(lin.name()) {
            continue;
        }
        let inner = lin.adapter().cloned().expect("attached");
        let sum = Arc::new(Mutex::new(vec![0f64; lin.in_features()]));
        sums.insert(lin.name().to_string(), sum.clone());
        lin.set_adapter(Some(Arc::new(CaptureLast { inner, sum })));
    }
    let run = || -> Result<()> {
        for ex in examples {
            let (input, target) =
                example_ids(model, tok, ex, cfg.max_input_len, cfg.max_target_len)?;
            let ids: Vec<u32> = input.into_iter().chain(target).collect();
            let n = ids.len();
            let ids = Tensor::from_vec(ids, (1, n), model.device())?;
            model.forward_hidden(&ids, None)?;
        }
        Ok(())
    };
    let res = run();
    detach_all(model);
    res?;
    Ok(sums
        .into_iter()
        .map(|(m, s)| {
            let s = s.lock().expect("capture");
            let norm = s.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            (m, s.iter().map(|x| (x / norm) as f32).collect())
        })
        .collect())
}

/// Mu prototypes of every expert (`examples[e]`: expert `e`'s training
/// examples). Leaves the model without adapters.
pub fn mu_prototypes(
    model: &mut Llama,
    tok: &Tokenizer,
    experts: &[Expert],
    examples: &[Vec<Example>],
    cfg: &MuConfig,
) -> Result<Prototypes> {
    let rows = experts
        .iter()
        .zip(examples)
        .map(|(e, ex)| expert_mu_vectors(model, tok, e, ex, cfg))
        .collect::<Result<Vec<_>>>()?;
    Prototypes::from_rows(experts.iter().map(|e| e.name.clone()).collect(), &rows)
}
