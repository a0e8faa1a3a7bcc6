//! Loading experts out of a library, every load checked: the files against
//! the manifest's digests (hashed as they are read), the manifest against
//! the files (rank, alpha, target modules, layer shapes, base model, tasks)
//! and every weight finite. A corrupt, NaN-filled or edited expert is
//! refused with one sentence naming the expert and the file, wherever it is
//! loaded: routes, merges, MBC, evaluation, export.

use std::path::PathBuf;

use candle_core::{DType, Device};

use super::error::{LibraryError, LibraryResult};
use super::manifest::ExpertManifest;
use super::{expert_modules, ExpertLibrary, MANIFEST};
use crate::expert::{Expert, ExpertFiles, ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_INFO};

impl ExpertLibrary {
    /// Loads expert `name`, checked (see the module's documentation).
    pub fn load_expert(&self, name: &str, device: &Device, dtype: DType) -> LibraryResult<Expert> {
        let (m, files) = self.read_files(name)?;
        let get = |f: &str| {
            files
                .iter()
                .find(|(n, _)| n == f)
                .map(|(_, b)| b.as_slice())
        };
        let missing = |f: &str| LibraryError::Corrupt {
            location: self.storage.display(&format!("{name}/{f}")),
            reason: "the file is missing".into(),
        };
        let expert_files = ExpertFiles {
            config: get(ADAPTER_CONFIG).ok_or_else(|| missing(ADAPTER_CONFIG))?,
            weights: get(ADAPTER_WEIGHTS).ok_or_else(|| missing(ADAPTER_WEIGHTS))?,
            info: get(EXPERT_INFO),
        };
        // Errors name the library's files, not a temporary copy.
        let dir = PathBuf::from(self.storage.display(name));
        let mut expert =
            Expert::from_files(name, &dir, &expert_files, device, dtype).map_err(|e| {
                LibraryError::Corrupt {
                    location: format!("expert `{name}` in library {}", self.uri()),
                    reason: format!("it does not load: {e}"),
                }
            })?;
        expert.name = name.to_string();
        self.check_manifest_describes(&m, &expert)?;
        Ok(expert)
    }

    /// Every expert of the library, in name order, each checked as by
    /// [`ExpertLibrary::load_expert`]. Unlike `list`, which skips a broken
    /// expert with a warning, one broken expert is an error here: a route
    /// over "the library" must not quietly route over part of it.
    pub fn load_experts(&self, device: &Device, dtype: DType) -> LibraryResult<Vec<Expert>> {
        let mut names: Vec<String> = self
            .storage
            .experts()?
            .into_iter()
            .map(|d| d.name)
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(LibraryError::NotALibrary {
                uri: self.uri().into(),
                reason: "it has no experts".into(),
            });
        }
        names
            .iter()
            .map(|n| self.load_expert(n, device, dtype))
            .collect()
    }

    /// The sha256 of expert `name`'s weights, as its manifest records them
    /// (no file is read): the key derived data is cached under.
    pub fn weights_digest(&self, name: &str) -> LibraryResult<String> {
        let m = self.manifest(name)?;
        m.files
            .get(ADAPTER_WEIGHTS)
            .map(|d| d.sha256.clone())
            .ok_or_else(|| LibraryError::Corrupt {
                location: self.storage.display(&format!("{name}/{MANIFEST}")),
                reason: format!("it records no {ADAPTER_WEIGHTS}"),
            })
    }

    /// The manifest says what the files hold: the manifest's metadata is
    /// what `ls`, the base-model guard and the shape guard trust.
    fn check_manifest_describes(&self, m: &ExpertManifest, e: &Expert) -> LibraryResult<()> {
        let mut wrong: Vec<String> = Vec::new();
        let mut differ = |what: &str, manifest: String, files: String, file: &str| {
            if manifest != files {
                wrong.push(format!(
                    "the manifest records {what} {manifest} but {file} has {files}"
                ));
            }
        };
        differ(
            "rank",
            m.rank.to_string(),
            e.config.rank.to_string(),
            ADAPTER_CONFIG,
        );
        differ(
            "alpha",
            m.alpha.to_string(),
            e.config.alpha.to_string(),
            ADAPTER_CONFIG,
        );
        differ(
            "target modules",
            format!("{:?}", m.target_modules),
            format!("{:?}", e.config.target_modules),
            ADAPTER_CONFIG,
        );
        let modules = expert_modules(e)?;
        differ(
            "layer shapes",
            format!("{:?}", m.modules),
            format!("{modules:?}"),
            ADAPTER_WEIGHTS,
        );
        if let Some(info) = &e.info {
            differ(
                "base model",
                format!("{:?}", m.base_model),
                format!("{:?}", Some(&info.base_model)),
                EXPERT_INFO,
            );
            differ(
                "tasks",
                format!("{:?}", m.tasks),
                format!("{:?}", info.tasks),
                EXPERT_INFO,
            );
        }
        match wrong.first() {
            None => Ok(()),
            Some(w) => Err(LibraryError::Corrupt {
                location: self.storage.display(&format!("{}/{MANIFEST}", m.name)),
                reason: w.clone(),
            }),
        }
    }
}
