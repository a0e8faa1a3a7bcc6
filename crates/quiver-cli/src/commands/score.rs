//! `quiver score`: log-likelihood of a continuation, as JSON.

use std::process::ExitCode;

use anyhow::Result;
use quiver_core::score::{encode_pair, score_batch};

use crate::args::ScoreArgs;
use crate::flags::GlobalArgs;

pub fn run(g: &GlobalArgs, a: ScoreArgs) -> Result<ExitCode> {
    let mut lm = super::load_model(g, &a.model)?;
    super::route::apply_route(&mut lm, &a.route)?;
    let pair = encode_pair(&lm.tokenizer, &a.context, &a.continuation)?;
    let s = score_batch(&lm.model, std::slice::from_ref(&pair), 1)?
        .pop()
        .expect("one item in, one score out");
    let mut v = serde_json::json!({
        "logprob": s.logprob,
        "tokens": s.tokens,
        "greedy": s.greedy,
        "context_tokens": pair.0.len(),
    });
    if a.per_token {
        v["token_ids"] = serde_json::json!(pair.1);
        v["token_logprobs"] = serde_json::json!(s.token_logprobs);
    }
    println!("{v}");
    Ok(ExitCode::SUCCESS)
}
