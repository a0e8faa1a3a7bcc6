//! `config.json` of a Llama-family model, read and written with the field
//! names Hugging Face transformers uses (4.x and 5.x).
//!
//! transformers 5.x moved the RoPE settings from `rope_theta` / `rope_scaling`
//! into one `rope_parameters` object; both spellings are accepted, and
//! [`LlamaConfig::rope`] gives the resolved settings.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which variant of the Llama block a checkpoint uses. They differ only in
/// where biases live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    /// Qwen2: bias on q/k/v projections, none on o.
    Qwen2,
}

/// The subset of a transformers `config.json` Quiver reads. Unknown fields
/// are ignored; missing required fields are an error naming the field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
}

/// `bos_token_id` / `eos_token_id` are a single id or a list of ids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// RoPE parameters as transformers writes them (`rope_scaling` in 4.x,
/// `rope_parameters` in 5.x, which also carries `rope_theta`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// Resolved rotary-embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// Llama 3.1 style frequency scaling, when the checkpoint uses it.
    pub llama3: Option<Llama3Scaling>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

fn default_model_type() -> String {
    "llama".to_string()
}

fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.validate().map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Checks the invariants the model code relies on; returns a message
    /// naming the field at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.family()?;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "`hidden_size` ({}) is not divisible by `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "`num_attention_heads` ({}) is not a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err("`rms_norm_eps` must be positive".into());
        }
        self.rope()?;
        Ok(())
    }

    pub fn family(&self) -> std::result::Result<Family, String> {
        match self.model_type.as_str() {
            "llama" | "smollm" | "smollm2" => Ok(Family::Llama),
            "mistral" => Ok(Family::Mistral),
            "qwen2" => Ok(Family::Qwen2),
            other => Err(format!(
                "`model_type` is \"{other}\"; supported: llama, mistral, qwen2"
            )),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v (and o, for Llama's `attention_bias`) carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.family() {
            Ok(Family::Qwen2) => self.attention_bias.unwrap_or(true),
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    pub fn o_bias(&self) -> bool {
        match self.family() {
            Ok(Family::Qwen2) => false,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// The RoPE settings, wherever the checkpoint put them.
    pub fn rope(&self) -> std::result::Result<Rope, String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = params
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        if theta.is_nan() || theta <= 0.0 {
            return Err("`rope_theta` must be positive".into());
        }
        let kind = params
            .and_then(|p| p.rope_type.clone())
            .unwrap_or_else(|| "default".to_string());
        let llama3 = match kind.as_str() {
            "default" => None,
            "llama3" => {
                let p = params.expect("kind came from params");
                let need = |v: Option<f64>, name: &str| {
                    v.ok_or_else(|| format!("rope type llama3 needs `{name}`"))
                };
                Some(Llama3Scaling {
                    factor: need(p.factor, "factor")?,
                    low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: p
                        .original_max_position_embeddings
                        .ok_or("rope type llama3 needs `original_max_position_embeddings`")?,
                })
            }
            other => {
                return Err(format!(
                    "rope type \"{other}\" is not supported (supported: default, llama3)"
                ))
            }
        };
        Ok(Rope { theta, llama3 })
    }

    /// Inverse frequencies of the rotary embedding, `head_dim / 2` of them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let rope = self.rope().expect("validated config");
        let d = self.head_dim();
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / rope.theta.powf(2.0 * i as f64 / d as f64);
                match &rope.llama3 {
                    None => f as f32,
                    Some(s) => llama3_scale(f, s) as f32,
                }
            })
            .collect()
    }

    /// A config in transformers' 4.x spelling (`rope_theta` at top level)
    /// that both 4.x and 5.x load.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let rope = self.rope().expect("validated config");
        let mut out = self.clone();
        out.rope_parameters = None;
        out.rope_theta = Some(rope.theta);
        out.rope_scaling = rope.llama3.map(|s| RopeParameters {
            rope_theta: None,
            rope_type: Some("llama3".into()),
            factor: Some(s.factor),
            low_freq_factor: Some(s.low_freq_factor),
            high_freq_factor: Some(s.high_freq_factor),
            original_max_position_embeddings: Some(s.original_max_position_embeddings),
        });
        let mut v = serde_json::to_value(&out).expect("config serialises");
        let arch = match self.family() {
            Ok(Family::Mistral) => "MistralForCausalLM",
            Ok(Family::Qwen2) => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        v["architectures"] = serde_json::json!([arch]);
        if self.head_dim.is_none() {
            v["head_dim"] = serde_json::json!(self.head_dim());
        }
        v["torch_dtype"] = serde_json::json!("float32");
        v
    }
}

fn llama3_scale(freq: f64, s: &Llama3Scaling) -> f64 {
    let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings as f64 / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64
        })
    }

    #[test]
    fn rope_theta_from_either_spelling() {
        let mut v4 = base();
        v4["rope_theta"] = 5000.0.into();
        let mut v5 = base();
        v5["rope_parameters"] = serde_json::json!({"rope_theta": 5000.0, "rope_type": "default"});
        let c4: LlamaConfig = serde_json::from_value(v4).unwrap();
        let c5: LlamaConfig = serde_json::from_value(v5).unwrap();
        assert_eq!(c4.rope().unwrap().theta, 5000.0);
        assert_eq!(c5.rope().unwrap().theta, 5000.0);
        assert_eq!(c4.inv_freq(), c5.inv_freq());
    }

    #[test]
    fn unsupported_rope_type_is_an_error() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        let c: LlamaConfig = serde_json::from_value(v).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let mut v = base();
        v["model_type"] = "qwen2".into();
        let c: LlamaConfig = serde_json::from_value(v).unwrap();
        assert!(c.qkv_bias());
        assert!(!c.o_bias());
    }

    #[test]
    fn bad_head_count_is_rejected() {
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        let c: LlamaConfig = serde_json::from_value(v).unwrap();
        assert!(c.validate().unwrap_err().contains("num_key_value_heads"));
    }
}
