//! Scoring continuations by log-likelihood, batched, the way
//! lm-evaluation-harness does it: the continuation's tokens are the tail of
//! the joint encoding of context + continuation, and no BOS is added.

use candle_core::{DType, IndexOp, Tensor};

use crate::error::{Error, Result};
use crate::models::Llama;
use crate::ops;
use crate::tokenizer::Tokenizer;

/// Log-likelihood of one continuation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ContinuationScore {
    /// Sum of natural-log probabilities of the continuation's tokens.
    pub logprob: f64,
    /// Number of continuation tokens.
    pub tokens: usize,
    /// Whether every continuation token is the model's argmax.
    pub greedy: bool,
    pub token_logprobs: Vec<f32>,
}

/// Token ids of a (context, continuation) pair, lm-evaluation-harness style.
///
/// Trailing whitespace of the context moves to the continuation; the
/// continuation's ids are the joint encoding minus the context's. An empty
/// context is replaced by the end-of-text token so the first continuation
/// token has something to condition on.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let (context, continuation) = if trimmed.len() < context.len() {
        (
            trimmed.to_string(),
            format!("{}{continuation}", &context[trimmed.len()..]),
        )
    } else {
        (context.to_string(), continuation.to_string())
    };
    if continuation.is_empty() {
        return Err(Error::invalid("the continuation is empty"));
    }
    if context.is_empty() {
        let prefix = *tok
            .eos_ids()
            .first()
            .ok_or_else(|| Error::invalid("the context is empty and the tokenizer has no end-of-text token to stand in for it"))?;
        return Ok((vec![prefix], tok.encode(&continuation)?));
    }
    let whole = tok.encode(&format!("{context}{continuation}"))?;
    let ctx = tok.encode(&context)?;
    let n = ctx.len().min(whole.len());
    let cont = whole[n..].to_vec();
    if cont.is_empty() {
        return Err(Error::invalid("the continuation encodes to no tokens"));
    }
    Ok((whole[..n].to_vec(), cont))
}

/// Scores many (context ids, continuation ids) pairs, `batch_size` at a time.
/// Sequences are right-padded, which a causal model ignores for earlier
/// positions.
pub fn score_batch(
    model: &Llama,
    items: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<ContinuationScore>> {
    let max = model.config().max_position_embeddings;
    for (ctx, cont) in items {
        if ctx.is_empty() || cont.is_empty() {
            return Err(Error::invalid(
                "every scored item needs a non-empty context and continuation",
            ));
        }
        if ctx.len() + cont.len() > max {
            return Err(Error::ContextTooLong {
                tokens: ctx.len() + cont.len(),
                max,
            });
        }
    }
    // Longest first, so each batch pads little.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(items[i].0.len() + items[i].1.len()));
    let mut out: Vec<Option<ContinuationScore>> = vec![None; items.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let len = chunk
            .iter()
            .map(|&i| items[i].0.len() + items[i].1.len())
            .max()
            .unwrap_or(0);
        // The last continuation token is never an input.
        let in_len = len - 1;
        let mut ids = Vec::with_capacity(chunk.len() * in_len);
        for &i in chunk {
            let (ctx, cont) = &items[i];
            let mut seq: Vec<u32> = ctx.iter().chain(cont.iter()).copied().collect();
            seq.truncate(in_len);
            seq.resize(in_len, 0);
            ids.extend(seq);
        }
        let input = Tensor::from_vec(ids, (chunk.len(), in_len), model.device())?;
        let hidden = model.forward_hidden(&input, None)?;
        for (row, &i) in chunk.iter().enumerate() {
            let (ctx, cont) = &items[i];
            let h = hidden.i((row, ctx.len() - 1..ctx.len() - 1 + cont.len()))?;
            let logp = ops::log_softmax_last_dim(&model.logits(&h)?.to_dtype(DType::F32)?)?;
            let targets = Tensor::new(cont.as_slice(), model.device())?.unsqueeze(1)?;
            let picked: Vec<f32> = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1()?;
            let argmax: Vec<u32> = logp.argmax(1)?.to_vec1()?;
            out[i] = Some(ContinuationScore {
                logprob: picked.iter().map(|&x| x as f64).sum(),
                tokens: cont.len(),
                greedy: argmax == *cont,
                token_logprobs: picked,
            });
        }
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every item scored"))
        .collect())
}
