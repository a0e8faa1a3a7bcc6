//! Per-expert manifests (`<name>/quiver_manifest.json`): what `ls` shows
//! without reading weights, the layer shapes the base-model guard checks,
//! and the sha256 of every file that `verify` re-hashes. One manifest per
//! expert, written once, so concurrent writers never share a file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{LibraryError, LibraryResult};
use crate::expert::{BaseModelId, ExpertInfo};
use crate::lora::{LoraConfig, TargetModules};

pub(crate) const EXPERT_FORMAT: &str = "quiver-expert";

/// The sha256 and size of one stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub size: u64,
}

impl FileDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        }
    }
}

/// Everything the library records about one expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertManifest {
    /// `quiver-expert`.
    pub format: String,
    pub version: u32,
    pub name: String,
    #[serde(default)]
    pub tasks: Vec<String>,
    /// `None` for a PEFT adapter imported without Quiver's metadata.
    #[serde(default)]
    pub base_model: Option<BaseModelId>,
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: TargetModules,
    /// `[out_features, in_features]` of every adapted layer, by module name.
    pub modules: BTreeMap<String, [usize; 2]>,
    /// When the expert was trained (seconds since the Unix epoch; 0 if unknown).
    pub created: u64,
    /// When it was added to this library.
    pub added: u64,
    /// Every file of the expert but the manifest itself.
    pub files: BTreeMap<String, FileDigest>,
}

impl ExpertManifest {
    /// A manifest without files, to be filled in when the expert is stored.
    pub(crate) fn draft(
        name: &str,
        config: &LoraConfig,
        info: Option<&ExpertInfo>,
        modules: BTreeMap<String, [usize; 2]>,
    ) -> Self {
        Self {
            format: EXPERT_FORMAT.into(),
            version: super::FORMAT_VERSION,
            name: name.to_string(),
            tasks: info.map(|i| i.tasks.clone()).unwrap_or_default(),
            base_model: info.map(|i| i.base_model.clone()),
            rank: config.rank,
            alpha: config.alpha,
            target_modules: config.target_modules.clone(),
            modules,
            created: info.map(|i| i.created).unwrap_or(0),
            added: 0,
            files: BTreeMap::new(),
        }
    }

    pub(crate) fn parse(bytes: &[u8], location: &str) -> LibraryResult<Self> {
        let m: Self = serde_json::from_slice(bytes).map_err(|e| LibraryError::Corrupt {
            location: location.to_string(),
            reason: format!("invalid manifest: {e}"),
        })?;
        if m.format != EXPERT_FORMAT {
            return Err(LibraryError::Corrupt {
                location: location.to_string(),
                reason: format!("format is `{}`, not `{EXPERT_FORMAT}`", m.format),
            });
        }
        Ok(m)
    }

    /// Total size of the expert's files in bytes.
    pub fn size(&self) -> u64 {
        self.files.values().map(|d| d.size).sum()
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Splits a PEFT tensor name into (module name, 'A' | 'B'), as
/// [`crate::expert::Expert::load`] reads them.
fn peft_module(key: &str) -> Option<(String, char)> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let key = key.strip_suffix(".weight")?;
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

/// `[out, in]` of every adapted layer, from a PEFT safetensors file's
/// header alone (no tensor is read).
pub(crate) fn modules_from_safetensors(
    bytes: &[u8],
    location: &str,
) -> LibraryResult<BTreeMap<String, [usize; 2]>> {
    let bad = |reason: String| LibraryError::Corrupt {
        location: location.to_string(),
        reason,
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut ins: BTreeMap<String, usize> = BTreeMap::new();
    let mut outs: BTreeMap<String, usize> = BTreeMap::new();
    for (key, info) in meta.tensors() {
        let Some((module, which)) = peft_module(&key) else {
            continue;
        };
        let &[rows, cols] = info.shape.as_slice() else {
            return Err(bad(format!(
                "tensor `{key}` has shape {:?}, expected a matrix",
                info.shape
            )));
        };
        if which == 'A' {
            ins.insert(module, cols);
        } else {
            outs.insert(module, rows);
        }
    }
    Ok(ins
        .into_iter()
        .filter_map(|(m, i)| outs.get(&m).map(|&o| (m, [o, i])))
        .collect())
}

/// JSON with object keys sorted and no whitespace, so equal values hash
/// equally whatever order their fields were built in.
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).expect("string"));
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_key_order() {
        let a = serde_json::json!({"b": 1, "a": {"y": [1, 2], "x": "s"}});
        let b = serde_json::json!({"a": {"x": "s", "y": [1, 2]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        assert_ne!(
            canonical_json(&serde_json::json!({"a": 1})),
            canonical_json(&serde_json::json!({"a": 2}))
        );
    }

    #[test]
    fn peft_module_names() {
        assert_eq!(
            peft_module("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".into(), 'A'))
        );
        assert_eq!(
            peft_module("base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"),
            Some(("model.layers.1.mlp.up_proj".into(), 'B'))
        );
        assert_eq!(peft_module("base_model.model.lm_head.weight"), None);
    }
}
