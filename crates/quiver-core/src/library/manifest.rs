//! Per-expert manifests (`<name>/quiver_manifest.json`): what `ls` shows
//! without reading weights, the layer shapes the base-model guard checks,
//! and the sha256 of every file that `verify` re-hashes. One manifest per
//! expert, written once, so concurrent writers never share a file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
            sha256: crate::hash::sha256_hex(bytes),
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
    /// sha256 of the canonical JSON of every other field: the manifest's
    /// own checksum, so an edit of its metadata (rank, alpha, target
    /// modules, base model, the file digests) is caught by `verify` and on
    /// load. Absent in manifests written before Quiver sealed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
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
            seal: None,
        }
    }

    /// The checksum [`ExpertManifest::seal`] records for the current fields.
    pub(crate) fn compute_seal(&self) -> String {
        let mut v = serde_json::to_value(self).expect("manifest serialises");
        if let serde_json::Value::Object(map) = &mut v {
            map.remove("seal");
        }
        crate::hash::sha256_hex(crate::hash::canonical_json(&v).as_bytes())
    }

    /// Records the checksum of the fields as they are now.
    pub(crate) fn sealed(mut self) -> Self {
        self.seal = Some(self.compute_seal());
        self
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
        if let Some(seal) = &m.seal {
            let got = m.compute_seal();
            if &got != seal {
                return Err(LibraryError::Corrupt {
                    location: location.to_string(),
                    reason: format!(
                        "its fields were edited after it was written (their checksum is {}…, the manifest records {}…)",
                        &got[..12],
                        &seal[..seal.len().min(12)]
                    ),
                });
            }
        }
        Ok(m)
    }

    /// Total size of the expert's files in bytes.
    pub fn size(&self) -> u64 {
        self.files.values().map(|d| d.size).sum()
    }
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
        let Some((module, which)) = crate::expert::parse_peft_key(&key) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ExpertManifest {
        let config: LoraConfig = serde_json::from_value(serde_json::json!({
            "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]
        }))
        .unwrap();
        let mut m = ExpertManifest::draft("e", &config, None, BTreeMap::new());
        m.files
            .insert("adapter_model.safetensors".into(), FileDigest::of(b"w"));
        m.sealed()
    }

    #[test]
    fn a_sealed_manifest_parses_and_any_edit_of_its_fields_is_corrupt() {
        let m = manifest();
        let bytes = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(ExpertManifest::parse(&bytes, "m").unwrap(), m);
        // Edit one field at a time in the JSON text, as a user's editor would.
        let text = String::from_utf8(bytes).unwrap();
        for (from, to) in [
            ("\"alpha\": 8.0", "\"alpha\": 9.0"),
            ("\"rank\": 4", "\"rank\": 8"),
        ] {
            assert!(text.contains(from), "{from} in {text}");
            let edited = text.replacen(from, to, 1);
            let e = ExpertManifest::parse(edited.as_bytes(), "LIB/e/quiver_manifest.json")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("LIB/e/quiver_manifest.json") && e.contains("edited"),
                "{e}"
            );
        }
        // A manifest from before seals were recorded still parses.
        let mut old = m.clone();
        old.seal = None;
        let bytes = serde_json::to_vec(&old).unwrap();
        assert_eq!(ExpertManifest::parse(&bytes, "m").unwrap().seal, None);
    }
}
