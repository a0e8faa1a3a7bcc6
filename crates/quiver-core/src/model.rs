//! Resolving `--model` (a built-in name, a Hugging Face directory or a GGUF
//! file) to a loaded model and its tokenizer, and writing a model back out
//! as a Hugging Face directory (`quiver convert`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Deserialize;

use crate::assets;
use crate::error::{candle_msg, Error, Result};
use crate::models::{gguf, Llama, LlamaConfig, WeightMap};
use crate::tokenizer::Tokenizer;

/// Built-in model names and the asset they resolve to.
pub const BUILTIN_MODELS: &[&str] = &["smollm2-135m"];

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
}

impl ModelSource {
    /// Resolves a `--model` argument. Built-in names need `quiver fetch`.
    pub fn resolve(spec: &str) -> Result<Self> {
        if BUILTIN_MODELS.contains(&spec) {
            return Ok(ModelSource::Gguf(assets::smollm2_gguf(
                &assets::quiver_home(),
            )?));
        }
        let path = PathBuf::from(spec);
        if path.is_dir() {
            Ok(ModelSource::HfDir(path))
        } else if path.is_file() {
            Ok(ModelSource::Gguf(path))
        } else {
            Err(Error::invalid(format!(
                "model `{spec}` is neither a built-in name ({}) nor an existing file or directory",
                BUILTIN_MODELS.join(", ")
            )))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// A model ready to run, with its tokenizer.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// The names the model goes by (the `--model` spec, its Hub id for a
    /// built-in name, its file or directory): what a PEFT adapter's
    /// `base_model_name_or_path` is checked against.
    pub names: Vec<String>,
}

/// The Hugging Face Hub ids of the built-in models.
const BUILTIN_HUB_IDS: &[(&str, &str)] = &[("smollm2-135m", "HuggingFaceTB/SmolLM2-135M")];

/// The names a `--model` spec goes by: itself, and the Hub id of a
/// built-in model.
pub fn known_names(spec: &str) -> Vec<String> {
    let mut names = vec![spec.to_string()];
    names.extend(
        BUILTIN_HUB_IDS
            .iter()
            .filter(|(n, _)| *n == spec)
            .map(|(_, id)| id.to_string()),
    );
    names
}

/// Loads a model by `--model` argument onto `device`, in `dtype`.
pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let source = ModelSource::resolve(spec)?;
    let mut lm = load_source(source, device, dtype)?;
    let mut names = known_names(spec);
    names.append(&mut lm.names);
    lm.names = names;
    Ok(lm)
}

pub fn load_source(source: ModelSource, device: &Device, dtype: DType) -> Result<LoadedModel> {
    match &source {
        ModelSource::Gguf(path) => {
            let g = gguf::load(path, dtype, device)?;
            let model = Llama::new(&g.config, &g.weights, device)?;
            let eos = g
                .config
                .eos_token_id
                .as_ref()
                .map(|e| e.to_vec())
                .unwrap_or_default();
            let tokenizer = Tokenizer::from_json_str(
                &g.tokenizer_json.to_string(),
                eos,
                g.chat_template,
                g.bos_token,
                g.eos_token,
            )
            .map_err(|e| Error::Gguf {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            Ok(LoadedModel {
                model,
                tokenizer,
                names: vec![source.path().display().to_string()],
                source,
            })
        }
        ModelSource::HfDir(dir) => {
            let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
            let files = safetensors_files(dir)?;
            let weights = WeightMap::from_safetensors(&files, dtype, device)?;
            let model = Llama::new(&cfg, &weights, device)?;
            let eos = cfg
                .eos_token_id
                .as_ref()
                .map(|e| e.to_vec())
                .unwrap_or_default();
            let tokenizer = Tokenizer::from_dir(dir, eos)?;
            Ok(LoadedModel {
                model,
                tokenizer,
                names: vec![source.path().display().to_string()],
                source,
            })
        }
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Error::invalid(format!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.clone(),
        source: e,
    })?;
    let mut shards: Vec<String> = idx.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    shards
        .into_iter()
        .map(|s| {
            if s.contains('/') || s.contains("..") {
                return Err(Error::invalid(format!(
                    "{}: bad shard name `{s}`",
                    index.display()
                )));
            }
            Ok(dir.join(s))
        })
        .collect()
}

/// Writes `model` as a Hugging Face directory (`config.json`,
/// `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`) that
/// transformers loads as `LlamaForCausalLM` (or Qwen2/Mistral).
///
/// Files are written into a temporary directory next to `out` and renamed
/// into place, so a crash never leaves a half-written model.
pub fn write_hf_dir(model: &Llama, tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::invalid(format!(
            "{}: already exists and is not empty; choose another --out",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp =
        crate::fsutil::temp_dir_in(&parent, ".convert-").map_err(|e| Error::io(&parent, e))?;
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = tmp.path().join(name);
        let text = serde_json::to_string_pretty(v).expect("json serialises");
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write_json("config.json", &model.config().to_hf_json())?;
    let tensors: HashMap<String, candle_core::Tensor> = model
        .named_weights()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let st = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(|e| Error::Safetensors {
        path: st.clone(),
        msg: candle_msg(e),
    })?;
    let tok = tmp.path().join("tokenizer.json");
    std::fs::write(&tok, tokenizer.to_json()).map_err(|e| Error::io(&tok, e))?;
    write_json("tokenizer_config.json", &tokenizer.config_json())?;
    let tmp_path = tmp.keep();
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp_path, out).map_err(|e| Error::io(out, e))?;
    Ok(())
}
