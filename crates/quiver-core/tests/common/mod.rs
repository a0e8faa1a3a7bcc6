//! Helpers shared by the integration tests: fixture paths, a tiny GGUF
//! writer that follows llama.cpp's conventions, and tensor comparisons.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use quiver_core::models::weights::load_safetensors;
use quiver_core::models::LlamaConfig;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(serde::Deserialize)]
pub struct Score {
    pub logprob: f64,
    pub tokens: usize,
    pub context_ids: Vec<u32>,
    pub continuation_ids: Vec<u32>,
}

/// What `scripts/fixtures/make_tiny_llama.py` recorded from transformers.
#[derive(serde::Deserialize)]
pub struct Expected {
    pub input_ids: Vec<Vec<u32>>,
    pub logits: Vec<Vec<Vec<f32>>>,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub score: Score,
}

pub fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// llama.cpp's converter permutation of Q/K rows (the inverse of what the
/// loader undoes), written independently of the loader's code.
fn permute_for_llama_cpp(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let hd = out / n_head;
    let v: Vec<Vec<f32>> = w.to_vec2().unwrap();
    let mut rows = Vec::with_capacity(out);
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for half in 0..2 {
                rows.push(v[h * hd + half * hd / 2 + i].clone());
            }
        }
    }
    Tensor::new(rows, &Device::Cpu)
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Writes a GGUF file the way llama.cpp's converter would for the tiny HF
/// fixture `name`: GGUF tensor names, permuted Q/K, tokenizer metadata.
pub fn write_tiny_gguf(name: &str, out: &Path) {
    let dir = fixture(name);
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = load_safetensors(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut q: Vec<(String, QTensor)> = Vec::new();
    for (hf, t) in &tensors {
        let g = hf
            .replace("model.embed_tokens.weight", "token_embd.weight")
            .replace("model.norm.weight", "output_norm.weight")
            .replace("lm_head.weight", "output.weight")
            .replace("model.layers.", "blk.")
            .replace(".self_attn.q_proj", ".attn_q")
            .replace(".self_attn.k_proj", ".attn_k")
            .replace(".self_attn.v_proj", ".attn_v")
            .replace(".self_attn.o_proj", ".attn_output")
            .replace(".mlp.gate_proj", ".ffn_gate")
            .replace(".mlp.up_proj", ".ffn_up")
            .replace(".mlp.down_proj", ".ffn_down")
            .replace(".input_layernorm", ".attn_norm")
            .replace(".post_attention_layernorm", ".ffn_norm");
        let t = if g.ends_with("attn_q.weight") {
            permute_for_llama_cpp(t, cfg.num_attention_heads)
        } else if g.ends_with("attn_k.weight") {
            permute_for_llama_cpp(t, cfg.num_kv_heads())
        } else {
            t.clone()
        };
        q.push((g, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let specials: Vec<u64> = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_u64().unwrap())
        .collect();
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let pair = m.as_array().unwrap();
            Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ))
        })
        .collect();
    let types: Vec<Value> = (0..tokens.len() as u64)
        .map(|i| Value::I32(if specials.contains(&i) { 3 } else { 1 }))
        .collect();
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        (
            "llama.block_count",
            Value::U32(cfg.num_hidden_layers as u32),
        ),
        ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count",
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(cfg.num_kv_heads() as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        (
            "llama.context_length",
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}
