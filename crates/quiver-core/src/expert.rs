//! An expert: one LoRA adapter in Hugging Face PEFT's on-disk layout
//! (`adapter_config.json` + `adapter_model.safetensors`) plus Quiver's
//! metadata (`quiver_expert.json`), so experts move between Quiver, PEFT
//! and other tools without conversion (METHOD.md section 1).
//!
//! PEFT stores `A` as `r x in` and `B` as `out x r` under names like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{candle_msg, Error, Result};
use crate::lora::{Lora, LoraConfig};
use crate::models::weights::load_safetensors_bytes;
use crate::models::Llama;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const EXPERT_INFO: &str = "quiver_expert.json";

/// Identifies the base model an expert was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModelId {
    /// What the user passed as `--model` (a name or path).
    pub id: String,
    /// [`model_fingerprint`] of the weights.
    pub fingerprint: String,
}

/// Quiver's metadata about an expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertInfo {
    pub name: String,
    /// The tasks whose data trained it (one for a private expert).
    pub tasks: Vec<String>,
    pub base_model: BaseModelId,
    /// The training configuration, as the trainer recorded it.
    #[serde(default)]
    pub training: serde_json::Value,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub created: u64,
}

/// LoRA factors by module name (`model.layers.0.self_attn.q_proj`):
/// (`A`: `r x in`, `B`: `out x r`).
pub type LoraWeights = BTreeMap<String, (Tensor, Tensor)>;

/// A LoRA expert in memory.
#[derive(Debug, Clone)]
pub struct Expert {
    pub name: String,
    pub config: LoraConfig,
    pub weights: LoraWeights,
    pub info: Option<ExpertInfo>,
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// The number of NaN and infinite entries of a tensor.
fn non_finite(t: &Tensor) -> Result<usize> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}

/// The bytes of an expert's files (`quiver_expert.json` is optional).
#[derive(Debug, Clone, Copy)]
pub struct ExpertFiles<'a> {
    pub config: &'a [u8],
    pub weights: &'a [u8],
    pub info: Option<&'a [u8]>,
}

/// Splits a PEFT tensor name into (module name, "A" | "B"): the one parser
/// of PEFT's key layout.
pub(crate) fn parse_peft_key(key: &str) -> Option<(String, char)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let key = key.strip_suffix(".weight")?;
    // `...q_proj.lora_A` or, with an adapter name kept, `...q_proj.lora_A.default`.
    for (marker, which) in [(".lora_A", 'A'), (".lora_B", 'B')] {
        if let Some(idx) = key.rfind(marker) {
            let rest = &key[idx + marker.len()..];
            if rest.is_empty() || (rest.starts_with('.') && !rest[1..].contains('.')) {
                return Some((key[..idx].to_string(), which));
            }
        }
    }
    None
}

impl Expert {
    /// Loads an expert (or any PEFT LoRA adapter directory). Every weight
    /// must be finite: a NaN or an infinity is refused, naming the file.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
            });
        }
        let cfg_path = dir.join(ADAPTER_CONFIG);
        if !cfg_path.is_file() {
            return Err(Error::invalid(format!(
                "{}: not a PEFT adapter directory (no {ADAPTER_CONFIG})",
                dir.display()
            )));
        }
        let w_path = dir.join(ADAPTER_WEIGHTS);
        if !w_path.is_file() {
            return Err(Error::invalid(format!(
                "{}: no {ADAPTER_WEIGHTS} (PEFT's .bin format is not supported; re-save with safe_serialization=True)",
                dir.display()
            )));
        }
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
        let info_path = dir.join(EXPERT_INFO);
        let info = if info_path.is_file() {
            Some(read(&info_path)?)
        } else {
            None
        };
        let fallback = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        Self::from_files(
            &fallback,
            dir,
            &ExpertFiles {
                config: &read(&cfg_path)?,
                weights: &read(&w_path)?,
                info: info.as_deref(),
            },
            device,
            dtype,
        )
    }

    /// An expert from the bytes of its files; `dir` names them in errors
    /// (a directory, or a library's location of the expert) and `fallback`
    /// is its name when it has no `quiver_expert.json`.
    pub fn from_files(
        fallback: &str,
        dir: &Path,
        files: &ExpertFiles<'_>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let config: LoraConfig = parse_json(&cfg_path, files.config)?;
        config.validate().map_err(|msg| Error::Config {
            path: cfg_path.clone(),
            msg,
        })?;
        let w_path = dir.join(ADAPTER_WEIGHTS);
        let tensors = load_safetensors_bytes(&w_path, files.weights, device)?;
        let mut a: HashMap<String, Tensor> = HashMap::new();
        let mut b: HashMap<String, Tensor> = HashMap::new();
        for (key, t) in tensors {
            let Some((module, which)) = parse_peft_key(&key) else {
                return Err(Error::Safetensors {
                    path: w_path.clone(),
                    msg: format!("tensor `{key}` is not a LoRA A or B weight"),
                });
            };
            let t = t.to_dtype(dtype)?;
            if t.rank() != 2 {
                return Err(Error::Safetensors {
                    path: w_path.clone(),
                    msg: format!("tensor `{key}` has shape {:?}, expected a matrix", t.dims()),
                });
            }
            let bad = non_finite(&t)?;
            if bad > 0 {
                return Err(Error::Safetensors {
                    path: w_path.clone(),
                    msg: format!(
                        "tensor `{key}` holds {bad} non-finite value(s) (NaN or infinity) out of {}; the adapter is damaged",
                        t.elem_count()
                    ),
                });
            }
            if which == 'A' { &mut a } else { &mut b }.insert(module, t);
        }
        let mut weights = BTreeMap::new();
        for (module, ta) in a {
            let tb = b.remove(&module).ok_or_else(|| Error::Safetensors {
                path: w_path.clone(),
                msg: format!("module `{module}` has lora_A but no lora_B"),
            })?;
            let (r, _) = ta.dims2()?;
            let (_, rb) = tb.dims2()?;
            if r != config.rank || rb != config.rank {
                return Err(Error::Safetensors {
                    path: w_path.clone(),
                    msg: format!(
                        "module `{module}`: A is {:?} and B is {:?}, but adapter_config.json says r = {}",
                        ta.dims(),
                        tb.dims(),
                        config.rank
                    ),
                });
            }
            weights.insert(module, (ta, tb));
        }
        if let Some(module) = b.keys().next() {
            return Err(Error::Safetensors {
                path: w_path.clone(),
                msg: format!("module `{module}` has lora_B but no lora_A"),
            });
        }
        if weights.is_empty() {
            return Err(Error::Safetensors {
                path: w_path,
                msg: "no LoRA weights".into(),
            });
        }
        let info: Option<ExpertInfo> = match files.info {
            Some(bytes) => Some(parse_json(&dir.join(EXPERT_INFO), bytes)?),
            None => None,
        };
        let name = match &info {
            Some(i) => i.name.clone(),
            None => fallback.to_string(),
        };
        Ok(Self {
            name,
            config,
            weights,
            info,
        })
    }

    /// Writes the expert into `dir` (which must not exist) through a
    /// temporary sibling directory and one rename, so a crash never leaves a
    /// directory that looks complete.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if dir.exists() {
            return Err(Error::invalid(format!("{}: already exists", dir.display())));
        }
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp =
            crate::fsutil::temp_dir_in(&parent, ".expert-").map_err(|e| Error::io(&parent, e))?;
        self.write_files(tmp.path())?;
        let tmp_path = tmp.keep();
        std::fs::rename(&tmp_path, dir).map_err(|e| Error::io(dir, e))?;
        Ok(())
    }

    /// Writes the three files into an existing directory.
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .weights
            .iter()
            .flat_map(|(m, (a, b))| {
                [
                    (format!("base_model.model.{m}.lora_A.weight"), a),
                    (format!("base_model.model.{m}.lora_B.weight"), b),
                ]
            })
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let w_path = dir.join(ADAPTER_WEIGHTS);
        candle_core::safetensors::save(&tensors, &w_path).map_err(|e| Error::Safetensors {
            path: w_path.clone(),
            msg: candle_msg(e),
        })?;
        let write_json = |name: &str, v: serde_json::Value| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_string_pretty(&v).expect("json"))
                .map_err(|e| Error::io(&p, e))
        };
        write_json(
            ADAPTER_CONFIG,
            serde_json::to_value(&self.config).expect("json"),
        )?;
        if let Some(info) = &self.info {
            write_json(EXPERT_INFO, serde_json::to_value(info).expect("json"))?;
        }
        Ok(())
    }

    /// Checks the expert fits `model`: every module exists and shapes match.
    pub fn check_fits(&self, model: &Llama, fingerprint: Option<&str>) -> Result<()> {
        if let (Some(info), Some(fp)) = (&self.info, fingerprint) {
            if info.base_model.fingerprint != fp {
                return Err(Error::invalid(format!(
                    "expert `{}` was trained on base model `{}` (fingerprint {}), not on this model (fingerprint {fp})",
                    self.name,
                    info.base_model.id,
                    short(&info.base_model.fingerprint)
                )));
            }
        }
        let linears: HashMap<&str, (usize, usize)> = model
            .linears()
            .into_iter()
            .map(|l| (l.name(), (l.out_features(), l.in_features())))
            .collect();
        for (module, (a, b)) in &self.weights {
            let Some(&(out, inp)) = linears.get(module.as_str()) else {
                return Err(Error::invalid(format!(
                    "expert `{}` adapts module `{module}`, which this model does not have",
                    self.name
                )));
            };
            let r = self.config.rank;
            if a.dims() != [r, inp] || b.dims() != [out, r] {
                return Err(Error::invalid(format!(
                    "expert `{}`: module `{module}` has A {:?} and B {:?}, but the model's layer needs A [{r}, {inp}] and B [{out}, {r}]",
                    self.name,
                    a.dims(),
                    b.dims()
                )));
            }
        }
        Ok(())
    }

    /// Checks the expert was made for this base model: Quiver's own
    /// fingerprint when the expert records one, else a PEFT adapter's
    /// `base_model_name_or_path` against the model's names
    /// ([`base_name_matches`]).
    pub fn check_base(&self, fingerprint: &str, model_names: &[String]) -> Result<()> {
        if let Some(info) = &self.info {
            if info.base_model.fingerprint != fingerprint {
                return Err(Error::invalid(format!(
                    "expert `{}` was trained on base model `{}` (fingerprint {}), not on this model (fingerprint {}); pass --allow-base-mismatch to use it anyway",
                    self.name,
                    info.base_model.id,
                    short(&info.base_model.fingerprint),
                    short(fingerprint)
                )));
            }
            return Ok(());
        }
        match &self.config.base_model_name_or_path {
            Some(b) if !base_name_matches(b, model_names) => Err(Error::invalid(format!(
                "adapter `{}` was made for base model `{b}` (base_model_name_or_path in its {ADAPTER_CONFIG}), but this model is `{}`; pass --allow-base-mismatch if they are the same weights",
                self.name,
                model_names.first().map(String::as_str).unwrap_or("?")
            ))),
            _ => Ok(()),
        }
    }

    /// Puts this expert's LoRAs on the model's linear layers (replacing any
    /// adapter there) after [`Expert::check_fits`].
    pub fn attach(&self, model: &mut Llama, fingerprint: Option<&str>) -> Result<()> {
        self.check_fits(model, fingerprint)?;
        let scale = self.config.scale();
        let device = model.device().clone();
        let dtype = model.dtype();
        for lin in model.linears_mut() {
            if let Some((a, b)) = self.weights.get(lin.name()) {
                let lora = Lora::new(
                    a.to_device(&device)?.to_dtype(dtype)?,
                    b.to_device(&device)?.to_dtype(dtype)?,
                    scale,
                )?;
                lin.set_adapter(Some(Arc::new(lora)));
            }
        }
        Ok(())
    }
}

/// Whether a PEFT adapter's `base_model_name_or_path` names the model
/// known as `model_names` (its `--model` spec, Hub id, file or directory
/// name): compared on the last path component, lower-cased, letters and
/// digits only, one a prefix of the other (`SmolLM2-135M` matches
/// `smollm2-135m.Q8_0.gguf` and a converted directory `smollm2`). `true`
/// when either side is unknown: then there is nothing to check.
pub fn base_name_matches(adapter_base: &str, model_names: &[String]) -> bool {
    fn norm(s: &str) -> String {
        let last = s
            .trim_end_matches(['/', '\\'])
            .rsplit(['/', '\\'])
            .next()
            .unwrap_or("");
        let last = last.strip_suffix(".gguf").unwrap_or(last);
        last.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    }
    let b = norm(adapter_base);
    let names: Vec<String> = model_names
        .iter()
        .map(|n| norm(n))
        .filter(|n| !n.is_empty())
        .collect();
    b.is_empty()
        || names.is_empty()
        || names
            .iter()
            .any(|n| n.starts_with(b.as_str()) || b.starts_with(n.as_str()))
}

/// Checks that experts can be routed, merged or clustered together: at
/// least one, unique names, one LoRA rank, one base model (where they
/// record it), the same modules with the same shapes. The one such check:
/// routing, merging and MBC all call it.
pub fn check_compatible(experts: &[Expert]) -> Result<()> {
    const NEED: &str = "routing, merging and clustering need";
    let Some(first) = experts.first() else {
        return Err(Error::invalid(
            "there are no experts to route between, merge or cluster (the library is empty)",
        ));
    };
    let mut names = std::collections::BTreeSet::new();
    for e in experts {
        if !names.insert(e.name.as_str()) {
            return Err(Error::invalid(format!(
                "two experts are named `{}`; expert names must be unique",
                e.name
            )));
        }
    }
    for e in &experts[1..] {
        if e.config.rank != first.config.rank {
            return Err(Error::invalid(format!(
                "experts have different LoRA ranks: expert `{}` has LoRA rank {} but expert `{}` has rank {}; {NEED} experts of one rank",
                e.name, e.config.rank, first.name, first.config.rank
            )));
        }
    }
    let with_info: Vec<(&Expert, &BaseModelId)> = experts
        .iter()
        .filter_map(|e| e.info.as_ref().map(|i| (e, &i.base_model)))
        .collect();
    if let Some((a, ba)) = with_info.first() {
        for (b, bb) in &with_info[1..] {
            if bb.fingerprint != ba.fingerprint {
                return Err(Error::invalid(format!(
                    "experts were trained on different base models (`{}` on `{}`, fingerprint {}; `{}` on `{}`, fingerprint {}); {NEED} experts of one base model",
                    a.name,
                    ba.id,
                    short(&ba.fingerprint),
                    b.name,
                    bb.id,
                    short(&bb.fingerprint)
                )));
            }
        }
    }
    for e in &experts[1..] {
        let missing = first.weights.keys().find(|m| !e.weights.contains_key(*m));
        let extra = e.weights.keys().find(|m| !first.weights.contains_key(*m));
        let (m, has, lacks) = match (missing, extra) {
            (Some(m), _) => (m, first, e),
            (None, Some(m)) => (m, e, first),
            (None, None) => {
                for (m, (a, b)) in &e.weights {
                    let (a0, b0) = &first.weights[m];
                    if a.dims() != a0.dims() || b.dims() != b0.dims() {
                        return Err(Error::invalid(format!(
                            "experts have different shapes for module `{m}` (`{}`: A {:?}, B {:?}; `{}`: A {:?}, B {:?})",
                            first.name,
                            a0.dims(),
                            b0.dims(),
                            e.name,
                            a.dims(),
                            b.dims()
                        )));
                    }
                }
                continue;
            }
        };
        return Err(Error::invalid(format!(
            "experts adapt different modules: expert `{}` does not adapt module `{m}`, which expert `{}` adapts; {NEED} experts with the same target modules",
            lacks.name, has.name
        )));
    }
    Ok(())
}

/// Checks an expert name: non-empty, no path separators, no leading dot,
/// no `..`, only letters, digits and `-_.:+=`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+=".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "`{name}` is not a valid expert name (use letters, digits and -_.:+=; no `/`, no leading `.`, no `..`)"
        )))
    }
}

/// The expert name for a task: BIG-bench subtasks (`task/subtask`) become `task__subtask`.
pub fn expert_name_for_task(task: &str) -> String {
    task.replace('/', "__")
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// Removes every adapter from the model.
pub fn detach_all(model: &mut Llama) {
    for lin in model.linears_mut() {
        lin.set_adapter(None);
    }
}

/// A cheap, load-path-independent fingerprint of a model's weights: sha256
/// over every tensor's name, shape and 256 strided values (as f32). The GGUF
/// and the directory `quiver convert` writes from it share a fingerprint.
pub fn model_fingerprint(model: &Llama) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut weights = model.named_weights();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in weights {
        h.update(name.as_bytes());
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        let step = (n / 256).max(1);
        let idx: Vec<u32> = (0..n).step_by(step).take(256).map(|i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), t.device())?;
        let vals: Vec<f32> = flat
            .index_select(&idx, 0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        for v in vals {
            h.update(v.to_le_bytes());
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_match_across_spellings_and_refuse_other_models() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let smol = names(&[
            "smollm2-135m",
            "/cache/models/smollm2-135m/SmolLM2-135M.Q8_0.gguf",
        ]);
        assert!(base_name_matches("HuggingFaceTB/SmolLM2-135M", &smol));
        assert!(base_name_matches("/tmp/work/smollm2", &smol));
        assert!(!base_name_matches("meta-llama/Llama-2-7b-hf", &smol));
        let tiny = names(&["/repo/tests/fixtures/tiny_qwen2"]);
        assert!(!base_name_matches("tiny_llama", &tiny));
        assert!(base_name_matches(
            "tiny_llama",
            &names(&["fixtures/tiny_llama/"])
        ));
        // Nothing to compare: no check.
        assert!(base_name_matches("", &smol));
        assert!(base_name_matches("x", &[]));
    }

    #[test]
    fn peft_keys_parse() {
        assert_eq!(
            parse_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".into(), 'A'))
        );
        assert_eq!(
            parse_peft_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"),
            Some(("model.layers.1.mlp.down_proj".into(), 'B'))
        );
        assert_eq!(parse_peft_key("base_model.model.lm_head.weight"), None);
        assert_eq!(parse_peft_key("x.lora_embedding_A"), None);
    }
}
