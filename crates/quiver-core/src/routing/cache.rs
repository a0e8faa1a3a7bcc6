//! Cached routing prototypes (METHOD.md section 2; STYLE.md: derived
//! artefacts are cached in the library, keyed by a hash of the
//! transform's configuration, as mttl's `LibraryTransform`).
//!
//! Until the expert library grows its own auxiliary-data store, a cache is
//! a directory `LIB/.aux/<kind>-<hash>/` with `config.json` (what the hash
//! covers, for people) and one `<expert>.safetensors` per expert holding
//! one vector per module. Each file records the digest of the expert's
//! weights it was computed from, so a retrained expert is recomputed
//! rather than served stale. Files are written to a temporary name and
//! renamed, so a crash never leaves a half-written cache entry.
//! Everything the rest of the module needs goes through [`AuxCache`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

/// Hex sha256 of a configuration's canonical JSON (keys sorted).
pub fn config_hash(config: &serde_json::Value) -> String {
    let text = serde_json::to_string(&sort_keys(config)).expect("json");
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
}

fn sort_keys(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: BTreeMap<&String, serde_json::Value> =
                m.iter().map(|(k, v)| (k, sort_keys(v))).collect();
            serde_json::to_value(sorted).expect("json")
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort_keys).collect()),
        other => other.clone(),
    }
}

/// Hex sha256 of a file's bytes (an expert's weights).
pub fn file_digest(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    h.update(&bytes);
    Ok(format!("{:x}", h.finalize()))
}

/// One cache directory: `LIB/.aux/<kind>-<hash>/`.
#[derive(Debug, Clone)]
pub struct AuxCache {
    dir: PathBuf,
    config: serde_json::Value,
}

const DIGEST_KEY: &str = "expert_weights_sha256";

impl AuxCache {
    pub fn new(library: &Path, kind: &str, config: serde_json::Value) -> Self {
        let dir = library
            .join(".aux")
            .join(format!("{kind}-{}", config_hash(&config)));
        Self { dir, config }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, expert: &str) -> PathBuf {
        self.dir.join(format!("{expert}.safetensors"))
    }

    /// The vectors cached for `expert`, if present and computed from
    /// weights with this `digest`. A damaged file counts as absent (it is
    /// recomputed and replaced).
    pub fn load(&self, expert: &str, digest: &str) -> Option<BTreeMap<String, Vec<f32>>> {
        let path = self.file(expert);
        let bytes = std::fs::read(&path).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        let md = meta.metadata().as_ref()?;
        if md.get(DIGEST_KEY).map(String::as_str) != Some(digest) {
            return None;
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
        let mut out = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
                return None;
            }
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.insert(name, v);
        }
        Some(out)
    }

    /// Writes `expert`'s vectors (temporary file, then rename).
    pub fn store(
        &self,
        expert: &str,
        digest: &str,
        vectors: &BTreeMap<String, Vec<f32>>,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let cfg_path = self.dir.join("config.json");
        if !cfg_path.is_file() {
            let text = serde_json::to_string_pretty(&self.config).expect("json");
            write_atomic(&cfg_path, text.as_bytes())?;
        }
        let bytes: Vec<(String, Vec<u8>, usize)> = vectors
            .iter()
            .map(|(k, v)| {
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (k.clone(), b, v.len())
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(k, b, n)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], b)
                    .map(|view| (k.clone(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Safetensors {
                path: self.file(expert),
                msg: e.to_string(),
            })?;
        let meta: HashMap<String, String> = [(DIGEST_KEY.to_string(), digest.to_string())].into();
        let data = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Safetensors {
            path: self.file(expert),
            msg: e.to_string(),
        })?;
        write_atomic(&self.file(expert), &data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_digest_check() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"b": 1, "a": [1, 2]});
        let c = AuxCache::new(tmp.path(), "arrow", cfg.clone());
        assert_eq!(
            config_hash(&cfg),
            config_hash(&serde_json::json!({"a": [1, 2], "b": 1}))
        );
        let mut v = BTreeMap::new();
        v.insert("m.q_proj".to_string(), vec![1.0f32, -2.5, 3.0]);
        assert!(c.load("e1", "d1").is_none());
        c.store("e1", "d1", &v).unwrap();
        assert_eq!(c.load("e1", "d1").unwrap(), v);
        assert!(c.load("e1", "other").is_none(), "stale digest must miss");
        assert!(c.dir().join("config.json").is_file());
        std::fs::write(c.dir().join("e1.safetensors"), b"garbage").unwrap();
        assert!(c.load("e1", "d1").is_none());
    }
}
