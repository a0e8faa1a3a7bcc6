//! The runtime against transformers: tiny random models saved by Python
//! transformers (`scripts/fixtures/make_tiny_llama.py`) must give the same
//! logits, greedy tokens and continuation scores in Quiver, loaded from the
//! Hugging Face directory, from a GGUF file, and after `convert`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{expected, fixture, max_abs_diff, write_tiny_gguf};
use quiver_core::generate::{generate, SamplingParams};
use quiver_core::model::{load_source, write_hf_dir, ModelSource};
use quiver_core::score::{encode_pair, score_batch};
use quiver_core::LoadedModel;

fn load_dir(name: &str) -> LoadedModel {
    load_source(ModelSource::HfDir(fixture(name)), &Device::Cpu, DType::F32).unwrap()
}

fn check_against_transformers(lm: &LoadedModel, fixture_name: &str) {
    let exp = expected(fixture_name);
    let ids = Tensor::new(exp.input_ids.clone(), &Device::Cpu).unwrap();
    let got = lm.model.forward(&ids, None).unwrap();
    let want = Tensor::new(exp.logits.clone(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-4, "{fixture_name}: max abs logit diff {diff}");

    // Greedy generation with the KV cache matches transformers' generate.
    let params = SamplingParams {
        max_tokens: exp.greedy_ids.len(),
        ..Default::default()
    };
    let (out, _) = generate(&lm.model, &exp.prompt_ids, &params, &[], |_| Ok(())).unwrap();
    assert_eq!(out, exp.greedy_ids, "{fixture_name}: greedy tokens");

    // lm-eval style scoring.
    let (ctx, cont) = encode_pair(&lm.tokenizer, "hello", " world").unwrap();
    assert_eq!(ctx, exp.score.context_ids);
    assert_eq!(cont, exp.score.continuation_ids);
    let s = score_batch(&lm.model, &[(ctx, cont)], 1).unwrap();
    assert_eq!(s[0].tokens, exp.score.tokens);
    assert!(
        (s[0].logprob - exp.score.logprob).abs() < 1e-3,
        "{fixture_name}: logprob {} vs {}",
        s[0].logprob,
        exp.score.logprob
    );
}

#[test]
fn tiny_llama_matches_transformers() {
    check_against_transformers(&load_dir("tiny_llama"), "tiny_llama");
}

#[test]
fn transformers_4x_config_spelling_matches() {
    check_against_transformers(&load_dir("tiny_llama_v4cfg"), "tiny_llama_v4cfg");
}

#[test]
fn tiny_qwen2_with_bias_and_tied_embeddings_matches() {
    check_against_transformers(&load_dir("tiny_qwen2"), "tiny_qwen2");
}

#[test]
fn gguf_with_permuted_qk_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    write_tiny_gguf("tiny_llama", &path);
    let lm = load_source(ModelSource::Gguf(path), &Device::Cpu, DType::F32).unwrap();
    check_against_transformers(&lm, "tiny_llama");
}

#[test]
fn convert_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_tiny_gguf("tiny_llama", &gguf);
    let lm = load_source(ModelSource::Gguf(gguf), &Device::Cpu, DType::F32).unwrap();
    let out = tmp.path().join("converted");
    write_hf_dir(&lm.model, &lm.tokenizer, &out).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let back = load_source(ModelSource::HfDir(out.clone()), &Device::Cpu, DType::F32).unwrap();
    check_against_transformers(&back, "tiny_llama");
    // Refuses to overwrite.
    let err = write_hf_dir(&lm.model, &lm.tokenizer, &out).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn batched_scoring_equals_one_at_a_time() {
    let lm = load_dir("tiny_llama");
    let pairs = [
        ("hello", " world"),
        ("the cat", " sat on the mat"),
        ("a", " b c d e f g"),
    ];
    let items: Vec<_> = pairs
        .iter()
        .map(|(c, x)| encode_pair(&lm.tokenizer, c, x).unwrap())
        .collect();
    let batched = score_batch(&lm.model, &items, 3).unwrap();
    for (i, item) in items.iter().enumerate() {
        let single = score_batch(&lm.model, std::slice::from_ref(item), 1).unwrap();
        assert!((single[0].logprob - batched[i].logprob).abs() < 1e-4);
        assert_eq!(single[0].tokens, batched[i].tokens);
    }
}

#[test]
fn kv_cache_equals_full_forward() {
    let lm = load_dir("tiny_qwen2");
    let ids: Vec<u32> = (3..20).collect();
    let full = lm
        .model
        .forward(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
        )
        .unwrap();
    let mut cache = lm.model.new_cache();
    let a = lm
        .model
        .forward(
            &Tensor::new(&ids[..10], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            Some(&mut cache),
        )
        .unwrap();
    let b = lm
        .model
        .forward(
            &Tensor::new(&ids[10..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            Some(&mut cache),
        )
        .unwrap();
    let stitched = Tensor::cat(&[a, b], 1).unwrap();
    assert!(max_abs_diff(&full, &stitched) < 1e-4);
}

#[test]
fn chat_template_renders() {
    let lm = load_dir("tiny_llama");
    let msgs = [quiver_core::tokenizer::ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    let text = lm.tokenizer.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = lm.tokenizer.encode(&text).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is matched as one special token");
}
