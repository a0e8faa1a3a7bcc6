//! An adapter trained and saved by Python PEFT
//! (`scripts/interop/make_peft_fixture.py`) loads as an expert and gives
//! PEFT's continuation log-probabilities; bad adapters are refused.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use quiver_core::expert::Expert;
use quiver_core::model::{load_source, ModelSource};
use quiver_core::score::{encode_pair, score_batch};

#[derive(serde::Deserialize)]
struct PeftScore {
    context: String,
    continuation: String,
    continuation_ids: Vec<u32>,
    logprob: f64,
    base_logprob: f64,
}

#[derive(serde::Deserialize)]
struct PeftExpected {
    scores: Vec<PeftScore>,
}

#[test]
fn peft_adapter_scores_like_peft() {
    let mut lm = load_source(
        ModelSource::HfDir(fixture("tiny_llama")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let exp: PeftExpected = serde_json::from_str(
        &std::fs::read_to_string(fixture("peft_tiny_llama/expected.json")).unwrap(),
    )
    .unwrap();
    let items: Vec<_> = exp
        .scores
        .iter()
        .map(|s| encode_pair(&lm.tokenizer, &s.context, &s.continuation).unwrap())
        .collect();
    for (item, s) in items.iter().zip(&exp.scores) {
        assert_eq!(item.1, s.continuation_ids);
    }
    let base = score_batch(&lm.model, &items, 4).unwrap();
    let expert = Expert::load(&fixture("peft_tiny_llama"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(expert.weights.len(), 14, "2 layers x 7 modules");
    expert.attach(&mut lm.model, None).unwrap();
    let with = score_batch(&lm.model, &items, 4).unwrap();
    for ((b, w), s) in base.iter().zip(&with).zip(&exp.scores) {
        assert!(
            (b.logprob - s.base_logprob).abs() < 1e-3,
            "base {} vs {}",
            b.logprob,
            s.base_logprob
        );
        assert!(
            (w.logprob - s.logprob).abs() < 1e-3,
            "adapter {} vs {}",
            w.logprob,
            s.logprob
        );
    }
}

fn copy_fixture(dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("peft_tiny_llama").join(f), dst.join(f)).unwrap();
    }
}

#[test]
fn bad_adapters_are_refused_with_one_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;

    // Not a PEFT directory.
    let err = Expert::load(tmp.path(), &dev, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a PEFT adapter directory"), "{err}");

    // Non-LoRA PEFT config.
    let d = tmp.path().join("ia3");
    copy_fixture(&d);
    let p = d.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["peft_type"] = "IA3".into();
    std::fs::write(&p, c.to_string()).unwrap();
    let err = Expert::load(&d, &dev, DType::F32).unwrap_err().to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("IA3"),
        "{err}"
    );

    // Rank in the config disagrees with the tensors.
    let d = tmp.path().join("rank");
    copy_fixture(&d);
    let p = d.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["r"] = 8.into();
    std::fs::write(&p, c.to_string()).unwrap();
    let err = Expert::load(&d, &dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains("r = 8"), "{err}");

    // Truncated safetensors.
    let d = tmp.path().join("trunc");
    copy_fixture(&d);
    let w = d.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..100]).unwrap();
    let err = Expert::load(&d, &dev, DType::F32).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");

    // Shapes for another model: the Qwen2 fixture has the same sizes, so use
    // a model whose layers differ (the tiny random config, hidden 16).
    let expert = Expert::load(&fixture("peft_tiny_llama"), &dev, DType::F32).unwrap();
    let cfg = quiver_core::models::weights::tiny_config();
    let w = quiver_core::models::WeightMap::random(&cfg, 1, &dev).unwrap();
    let mut other = quiver_core::models::Llama::new(&cfg, &w, &dev).unwrap();
    let err = expert.attach(&mut other, None).unwrap_err().to_string();
    assert!(err.contains("needs A"), "{err}");
    assert!(
        other.linears().iter().all(|l| l.adapter().is_none()),
        "nothing attached on failure"
    );
}
