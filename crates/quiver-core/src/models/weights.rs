//! A named set of tensors a model is built from, whichever file they came
//! from, with errors that name that file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{candle_msg, Error, Result};

/// Tensors by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
#[derive(Debug, Clone)]
pub struct WeightMap {
    /// Where they came from, for error messages.
    pub source: PathBuf,
    pub tensors: HashMap<String, Tensor>,
}

impl WeightMap {
    pub fn new(source: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            source: source.into(),
            tensors,
        }
    }

    /// Loads one or more safetensors files, converting every tensor to `dtype`.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in files {
            for (name, t) in load_safetensors(file, device)? {
                tensors.insert(name, t.to_dtype(dtype)?);
            }
        }
        let source = match files {
            [one] => one.clone(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        Ok(Self { source, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingWeight {
            path: self.source.clone(),
            name: name.to_string(),
        })?;
        if t.dims() != shape {
            return Err(Error::WeightShape {
                path: self.source.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Reads a safetensors file with an error that names it when the header or
/// data is damaged.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function
    // returns; a file changed underneath by another process could give
    // wrong values but not unsoundness in safe code we rely on.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    load_safetensors_bytes(path, &bytes, device)
}

/// [`load_safetensors`] of bytes already in memory; `path` names them in
/// errors (a library's object key, say).
pub fn load_safetensors_bytes(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let st = safetensors_header_check(path, bytes)?;
    let mut out = HashMap::with_capacity(st.len());
    for (name, view) in st {
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
            Error::Safetensors {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}`: {}", candle_msg(e)),
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

fn safetensors_header_check<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<Vec<(String, safetensors::tensor::TensorView<'a>)>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(st.tensors())
}

impl WeightMap {
    /// Deterministic random weights for `cfg` (normal, std `0.2`; norms near 1):
    /// tiny models for tests and benchmarks, as mttl's `make_tiny_llama`.
    pub fn random(cfg: &super::LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut normal = |shape: &[usize], mean: f32, std: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            // Box-Muller: no extra crate for a test helper.
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let u1: f32 = rng.random::<f32>().max(1e-7);
                    let u2: f32 = rng.random::<f32>();
                    mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect();
            Ok(Tensor::from_vec(v, shape, device)?)
        };
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let mut t = HashMap::new();
        t.insert(
            "model.embed_tokens.weight".into(),
            normal(&[v, h], 0.0, 0.2)?,
        );
        t.insert("model.norm.weight".into(), normal(&[h], 1.0, 0.1)?);
        if !cfg.tie_word_embeddings {
            t.insert("lm_head.weight".into(), normal(&[v, h], 0.0, 0.2)?);
        }
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, out, inp) in [
                ("self_attn.q_proj", nh * hd, h),
                ("self_attn.k_proj", nkv * hd, h),
                ("self_attn.v_proj", nkv * hd, h),
                ("self_attn.o_proj", h, nh * hd),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                t.insert(format!("{p}.{name}.weight"), normal(&[out, inp], 0.0, 0.2)?);
            }
            if cfg.qkv_bias() {
                for (name, out) in [
                    ("q_proj", nh * hd),
                    ("k_proj", nkv * hd),
                    ("v_proj", nkv * hd),
                ] {
                    t.insert(
                        format!("{p}.self_attn.{name}.bias"),
                        normal(&[out], 0.0, 0.2)?,
                    );
                }
            }
            t.insert(
                format!("{p}.input_layernorm.weight"),
                normal(&[h], 1.0, 0.1)?,
            );
            t.insert(
                format!("{p}.post_attention_layernorm.weight"),
                normal(&[h], 1.0, 0.1)?,
            );
        }
        Ok(Self::new("<random>", t))
    }
}

/// A tiny Llama config (hidden 16, 2 layers, 4 heads, 2 KV heads, vocab 64)
/// for tests.
pub fn tiny_config() -> super::LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
        "rope_theta": 10000.0
    }))
    .expect("valid tiny config")
}
