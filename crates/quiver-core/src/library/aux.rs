//! The library's one store of derived artefacts (Arrow, mu and PHATGOOSE
//! prototypes, MBC clusterings), on local disk and S3 alike:
//! `.aux/<kind>-<hash>/<name>`, the hash being [`config_hash`] of the
//! transform's configuration, with that configuration beside the data as
//! `config.json` for people browsing the library. Per-expert vectors record
//! the digest of the weights they were computed from, so a retrained
//! expert is recomputed rather than served stale.

use std::collections::{BTreeMap, HashMap};

use super::error::{storage, LibraryResult};
use super::{invalid, validate_aux_part, ExpertLibrary, AUX_CONFIG, AUX_DIR};
use crate::hash::{config_hash, sha256_hex};

/// The metadata key of per-expert vectors that records the weights' digest.
const DIGEST_KEY: &str = "expert_weights_sha256";

impl ExpertLibrary {
    /// A fingerprint of some experts' exact contents (names and file
    /// hashes), for transform configurations: a cached result keyed by a
    /// config that includes it is reused only for the same experts.
    pub fn experts_fingerprint(&self, names: &[&str]) -> LibraryResult<String> {
        let mut names: Vec<&str> = names.to_vec();
        names.sort_unstable();
        names.dedup();
        let mut text = String::new();
        for name in names {
            let m = self.manifest(name)?;
            text.push_str(name);
            for (file, d) in &m.files {
                text.push_str(&format!("\0{file}\0{}", d.sha256));
            }
            text.push('\n');
        }
        Ok(sha256_hex(text.as_bytes()))
    }

    /// `<kind>-<hash>`, the hash being the first 16 hex digits of the
    /// sha256 of the canonical JSON of `config`: the directory under
    /// `.aux/` where a transform of `kind` run with `config` keeps its
    /// outputs.
    pub fn aux_key(kind: &str, config: &serde_json::Value) -> LibraryResult<String> {
        validate_aux_part("kind", kind)?;
        Ok(format!("{kind}-{}", config_hash(config)))
    }

    /// How messages name the auxiliary data of `kind` and `config`.
    pub fn aux_location(&self, kind: &str, config: &serde_json::Value) -> LibraryResult<String> {
        Ok(self
            .storage
            .display(&format!("{AUX_DIR}/{}", Self::aux_key(kind, config)?)))
    }

    fn aux_file(kind: &str, config: &serde_json::Value, name: &str) -> LibraryResult<String> {
        let key = Self::aux_key(kind, config)?;
        validate_aux_part("name", name)?;
        if name == AUX_CONFIG {
            return Err(invalid(format!(
                "`{AUX_CONFIG}` is reserved for the configuration of auxiliary data"
            )));
        }
        Ok(format!("{AUX_DIR}/{key}/{name}"))
    }

    /// Stores auxiliary data (prototypes, embeddings, clusterings) named
    /// `name`, computed by a transform of `kind` with `config`, replacing
    /// what was stored under the same name (atomically).
    pub fn put_aux(
        &self,
        kind: &str,
        config: &serde_json::Value,
        name: &str,
        bytes: &[u8],
    ) -> LibraryResult<()> {
        let file = Self::aux_file(kind, config, name)?;
        // The config beside the data, for people browsing the library.
        let cfg_key = format!("{AUX_DIR}/{}/{AUX_CONFIG}", Self::aux_key(kind, config)?);
        let pretty = serde_json::to_string_pretty(config).expect("json");
        self.storage.put_new(&cfg_key, pretty.as_bytes())?;
        self.storage.put(&file, bytes)
    }

    /// The auxiliary data stored by [`ExpertLibrary::put_aux`] with the
    /// same `kind`, an equal `config` (whatever the order of its keys) and
    /// `name`, if any.
    pub fn get_aux(
        &self,
        kind: &str,
        config: &serde_json::Value,
        name: &str,
    ) -> LibraryResult<Option<Vec<u8>>> {
        self.storage.get(&Self::aux_file(kind, config, name)?)
    }

    /// The names stored for `kind` and `config`.
    pub fn aux_names(&self, kind: &str, config: &serde_json::Value) -> LibraryResult<Vec<String>> {
        let prefix = format!("{AUX_DIR}/{}/", Self::aux_key(kind, config)?);
        Ok(self
            .storage
            .list(&prefix)?
            .into_iter()
            .filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_string))
            .filter(|n| n != AUX_CONFIG && !n.contains('/') && !n.starts_with('.'))
            .collect())
    }

    /// The vectors (one per module) stored for `expert` by a transform of
    /// `kind` with `config`, if present and computed from weights with
    /// `digest`. A damaged entry counts as absent: it is recomputed and
    /// replaced.
    pub fn get_vectors(
        &self,
        kind: &str,
        config: &serde_json::Value,
        expert: &str,
        digest: &str,
    ) -> LibraryResult<Option<BTreeMap<String, Vec<f32>>>> {
        let Some(bytes) = self.get_aux(kind, config, &format!("{expert}.safetensors"))? else {
            return Ok(None);
        };
        Ok(decode_vectors(&bytes, digest))
    }

    /// Stores `expert`'s vectors (replacing an older entry atomically).
    pub fn put_vectors(
        &self,
        kind: &str,
        config: &serde_json::Value,
        expert: &str,
        digest: &str,
        vectors: &BTreeMap<String, Vec<f32>>,
    ) -> LibraryResult<()> {
        let name = format!("{expert}.safetensors");
        let bytes =
            encode_vectors(vectors, digest).map_err(|e| storage(self.storage.display(&name), e))?;
        self.put_aux(kind, config, &name, &bytes)
    }
}

fn decode_vectors(bytes: &[u8], digest: &str) -> Option<BTreeMap<String, Vec<f32>>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    if meta
        .metadata()
        .as_ref()?
        .get(DIGEST_KEY)
        .map(String::as_str)
        != Some(digest)
    {
        return None;
    }
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
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
        if v.iter().any(|x| !x.is_finite()) {
            return None;
        }
        out.insert(name, v);
    }
    Some(out)
}

fn encode_vectors(
    vectors: &BTreeMap<String, Vec<f32>>,
    digest: &str,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let bytes: Vec<(String, Vec<u8>, usize)> = vectors
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                v.len(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, n)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], b)
                .map(|view| (k.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta: HashMap<String, String> = [(DIGEST_KEY.to_string(), digest.to_string())].into();
    safetensors::serialize(views, Some(meta))
}
