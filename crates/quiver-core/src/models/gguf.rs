//! Loading a Llama-family GGUF file (llama.cpp's format): the config from
//! its metadata, the weights dequantised to f32 under Hugging Face names,
//! and the tokenizer rebuilt from its vocabulary and merges.
//!
//! llama.cpp permutes the rows of Q and K for its interleaved RoPE; they are
//! un-permuted here so the model uses Hugging Face's rotate-half RoPE and
//! the weights convert back to a transformers checkpoint unchanged.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::config::{LlamaConfig, TokenIds};
use super::weights::WeightMap;
use crate::error::{candle_msg, Error, Result};

/// Everything a GGUF file gives us.
pub struct GgufModel {
    pub config: LlamaConfig,
    pub weights: WeightMap,
    /// A `tokenizer.json` document (Hugging Face tokenizers format).
    pub tokenizer_json: serde_json::Value,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

fn gguf_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md
            .get(key)
            .ok_or_else(|| gguf_err(self.path, format!("metadata key `{key}` is missing")))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|_| gguf_err(self.path, format!("metadata key `{key}` is not an integer")))
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        if self.md.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|_| gguf_err(self.path, format!("metadata key `{key}` is not a float")))
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.clone()))
                .map_err(|_| gguf_err(self.path, format!("metadata key `{key}` is not a string"))),
        }
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = self
            .get(key)?
            .to_vec()
            .map_err(|_| gguf_err(self.path, format!("metadata key `{key}` is not an array")))?;
        arr.iter()
            .map(|v| v.to_string().cloned())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| {
                gguf_err(
                    self.path,
                    format!("metadata key `{key}` is not a string array"),
                )
            })
    }
    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let arr = v
            .to_vec()
            .map_err(|_| gguf_err(self.path, format!("metadata key `{key}` is not an array")))?;
        arr.iter()
            .map(|v| {
                v.to_i32()
                    .map(i64::from)
                    .or_else(|_| v.to_u32().map(i64::from))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|_| {
                gguf_err(
                    self.path,
                    format!("metadata key `{key}` is not an int array"),
                )
            })
    }
}

/// Reads only the header (metadata and tensor table), checking the file is
/// long enough for every tensor it announces.
pub fn read_content(path: &Path) -> Result<Content> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| gguf_err(path, candle_msg(e)))?;
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > file_len {
            return Err(gguf_err(
                path,
                format!(
                    "the file is truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes"
                ),
            ));
        }
    }
    Ok(content)
}

/// Loads a GGUF model, dequantising every tensor to `dtype` on `device`.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    let content = read_content(path)?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let arch = meta
        .string("general.architecture")?
        .unwrap_or_else(|| "llama".into());
    if arch != "llama" && arch != "qwen2" && arch != "mistral" {
        return Err(gguf_err(
            path,
            format!("architecture `{arch}` is not supported (supported: llama, mistral, qwen2)"),
        ));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let p = |k: &str| format!("{arch}.{k}");
    let hidden = meta.usize(&p("embedding_length"))?;
    let n_head = meta.usize(&p("attention.head_count"))?;
    let n_kv = meta
        .usize_opt(&p("attention.head_count_kv"))?
        .unwrap_or(n_head);
    let head_dim = meta
        .usize_opt(&p("attention.key_length"))?
        .or(meta.usize_opt(&p("rope.dimension_count"))?)
        .unwrap_or(hidden / n_head.max(1));
    let vocab = meta.usize_opt(&p("vocab_size"))?.unwrap_or(tokens.len());
    let tied = !content.tensor_infos.contains_key("output.weight");
    let bos = meta.usize_opt("tokenizer.ggml.bos_token_id")?;
    let eos = meta.usize_opt("tokenizer.ggml.eos_token_id")?;
    let config = LlamaConfig {
        model_type: if arch == "qwen2" {
            "qwen2".into()
        } else {
            "llama".into()
        },
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta.usize(&p("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&p("block_count"))?,
        num_attention_heads: n_head,
        num_key_value_heads: Some(n_kv),
        head_dim: Some(head_dim),
        rms_norm_eps: meta.f64(&p("attention.layer_norm_rms_epsilon"))?,
        rope_theta: Some(
            meta.md
                .get(&p("rope.freq_base"))
                .map(|_| meta.f64(&p("rope.freq_base")))
                .transpose()?
                .unwrap_or(10_000.0),
        ),
        rope_scaling: None,
        rope_parameters: None,
        max_position_embeddings: meta.usize(&p("context_length"))?,
        tie_word_embeddings: tied,
        attention_bias: None,
        mlp_bias: false,
        bos_token_id: bos.map(|b| TokenIds::One(b as u32)),
        eos_token_id: eos.map(|e| TokenIds::One(e as u32)),
        sliding_window: None,
        architectures: None,
    };
    config.validate().map_err(|m| gguf_err(path, m))?;
    if tokens.len() != vocab {
        return Err(gguf_err(
            path,
            format!(
                "the tokenizer has {} tokens but the model's vocabulary is {vocab}",
                tokens.len()
            ),
        ));
    }

    let weights = load_weights(path, &content, &config, dtype, device)?;
    let tokenizer_json = tokenizer_json(&meta, &tokens)?;
    let tok_at = |id: Option<usize>| id.and_then(|i| tokens.get(i).cloned());
    Ok(GgufModel {
        chat_template: meta.string("tokenizer.chat_template")?,
        bos_token: tok_at(bos),
        eos_token: tok_at(eos),
        config,
        weights,
        tokenizer_json,
    })
}

/// GGUF tensor name -> Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's Q/K row permutation for interleaved RoPE.
///
/// llama.cpp's converter maps `(n_head, 2, hd/2, ..)` to `(n_head, hd/2, 2, ..)`;
/// this maps it back. Works for weights `(out, in)` and biases `(out,)`.
pub fn unpermute_qk(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let hd = out / n_head;
    let rest: usize = dims[1..].iter().product();
    t.reshape((n_head, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

fn load_weights(
    path: &Path,
    content: &Content,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<WeightMap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            tracing::debug!("ignoring GGUF tensor {name}");
            continue;
        };
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| gguf_err(path, format!("tensor `{name}`: {}", candle_msg(e))))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| gguf_err(path, format!("tensor `{name}`: {}", candle_msg(e))))?;
        if hf.contains("self_attn.q_proj") {
            t = unpermute_qk(&t, cfg.num_attention_heads)?;
        } else if hf.contains("self_attn.k_proj") {
            t = unpermute_qk(&t, cfg.num_kv_heads())?;
        }
        tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    Ok(WeightMap::new(PathBuf::from(path), tensors))
}

/// The pre-tokenizer of a GPT-2 style byte-level BPE, by llama.cpp's
/// `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Option<serde_json::Value> {
    use serde_json::json;
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-bpe" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        _ => return None,
    })
}

/// Builds a Hugging Face `tokenizer.json` from GGUF tokenizer metadata.
fn tokenizer_json(meta: &Meta<'_>, tokens: &[String]) -> Result<serde_json::Value> {
    use serde_json::json;
    let model = meta
        .string("tokenizer.ggml.model")?
        .unwrap_or_else(|| "gpt2".into());
    if model != "gpt2" {
        return Err(gguf_err(
            meta.path,
            format!(
                "tokenizer model `{model}` is not supported yet (only GPT-2 style byte-level BPE); \
                 convert the model to a Hugging Face directory with a tokenizer.json instead"
            ),
        ));
    }
    let pre_name = meta
        .string("tokenizer.ggml.pre")?
        .unwrap_or_else(|| "default".into());
    let pre = pre_tokenizer(&pre_name).ok_or_else(|| {
        gguf_err(
            meta.path,
            format!("pre-tokenizer `{pre_name}` is not supported (supported: default, gpt2, smollm, llama-bpe, qwen2)"),
        )
    })?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types = meta.ints("tokenizer.ggml.token_type")?;
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        let ty = types.as_ref().and_then(|t| t.get(id)).copied().unwrap_or(1);
        // 3 = control, 4 = user-defined: matched whole, never split.
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3
            }));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> candle_core::Result<()> {
        let (n_head, hd, inp) = (3, 8, 5);
        let w = Tensor::arange(0f32, (n_head * hd * inp) as f32, &Device::Cpu)?
            .reshape((n_head * hd, inp))?;
        // llama.cpp's converter: reshape(n_head, 2, hd/2, in).swapaxes(1, 2)
        let permuted = w
            .reshape((n_head, 2, hd / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n_head * hd, inp))?;
        let back = unpermute_qk(&permuted, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
