//! Batched scoring on 8-bit weights and activations (`--quantize q8_0
//! --quantize-rows all`) against the f32 path: log-likelihoods of a few
//! hundred multiple-choice items stay close, and every decision whose f32
//! margin is wider than the quantization error is the same.

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use quiver_core::kernels::q8::DotKernel;
use quiver_core::models::weights::{tiny_config, WeightMap};
use quiver_core::models::Llama;
use quiver_core::score::score_batch;
use rand::{Rng, SeedableRng};

/// A small model whose widths are multiples of Q8_0's block of 32.
fn model(quantized: bool) -> Llama {
    let mut cfg = tiny_config();
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    cfg.vocab_size = 96;
    cfg.max_position_embeddings = 128;
    let w = WeightMap::random(&cfg, 11, &Device::Cpu).unwrap();
    let mut m = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    if quantized {
        let n = m.quantize(GgmlDType::Q8_0).unwrap();
        assert_eq!(n, 2 * 7 + 1, "every linear layer takes the 8-bit weight");
        m.set_quantized_max_rows(usize::MAX);
    }
    m
}

#[test]
fn q8_scoring_matches_f32_values_and_decisions() {
    if DotKernel::detect() == DotKernel::Portable {
        eprintln!("no SIMD 8-bit products on this CPU: testing the portable loops");
    }
    let (f32_model, q8_model) = (model(false), model(true));
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (n_items, n_options) = (300, 4);
    let mut pairs = Vec::new();
    for _ in 0..n_items {
        let ctx: Vec<u32> = (0..rng.random_range(8..48))
            .map(|_| rng.random_range(0..96))
            .collect();
        for _ in 0..n_options {
            let cont: Vec<u32> = (0..rng.random_range(1..8))
                .map(|_| rng.random_range(0..96))
                .collect();
            pairs.push((ctx.clone(), cont));
        }
    }
    let exact = score_batch(&f32_model, &pairs, 8).unwrap();
    let quant = score_batch(&q8_model, &pairs, 8).unwrap();
    let tokens: usize = exact.iter().map(|s| s.tokens).sum();
    let errs: Vec<f64> = exact
        .iter()
        .zip(&quant)
        .map(|(e, q)| (e.logprob - q.logprob).abs())
        .collect();
    let per_token = errs.iter().sum::<f64>() / tokens as f64;
    let max_err = errs.iter().cloned().fold(0.0, f64::max);
    let mean_ll = exact.iter().map(|s| s.logprob.abs()).sum::<f64>() / tokens as f64;
    eprintln!(
        "q8 vs f32 on {} continuations: mean |dLL| {per_token:.2e}/token (|LL| {mean_ll:.2}/token), max {max_err:.2e}",
        pairs.len()
    );
    assert!(
        max_err > 0.0,
        "the 8-bit path was not used (scores equal f32 to the bit)"
    );
    // A wrong product is off by the size of the log-likelihoods
    // themselves; 8-bit rounding is two orders of magnitude below them on
    // this random model (and below 1e-2 per token on SmolLM2: bench/README).
    assert!(
        per_token < 0.02 * mean_ll,
        "mean |dLL| {per_token} per token of {mean_ll}"
    );
    assert!(max_err < 1.5, "max |dLL| {max_err}");

    let (mut same, mut clear, mut flipped_clear) = (0, 0, 0);
    for item in 0..n_items {
        let opts = item * n_options..(item + 1) * n_options;
        let pick = |s: &[quiver_core::score::ContinuationScore]| {
            opts.clone()
                .max_by(|&a, &b| s[a].logprob.total_cmp(&s[b].logprob))
                .unwrap()
        };
        let (pe, pq) = (pick(&exact), pick(&quant));
        same += (pe == pq) as usize;
        // The f32 winner's lead over the runner-up; wider than twice the
        // item's largest error, no rounding can change the pick.
        let lead = opts
            .clone()
            .filter(|&o| o != pe)
            .map(|o| exact[pe].logprob - exact[o].logprob)
            .fold(f64::INFINITY, f64::min);
        let err = opts.clone().map(|o| errs[o]).fold(0.0, f64::max);
        if lead > 2.0 * err {
            clear += 1;
            flipped_clear += (pe != pq) as usize;
        }
    }
    eprintln!("decisions: {same}/{n_items} the same; {clear} with a lead wider than the error");
    assert_eq!(flipped_clear, 0, "a decision with a clear f32 lead changed");
    assert!(
        clear >= n_items * 3 / 4,
        "only {clear} clear decisions: the test says little"
    );
    assert!(
        same >= n_items * 95 / 100,
        "{same}/{n_items} decisions the same"
    );
}
