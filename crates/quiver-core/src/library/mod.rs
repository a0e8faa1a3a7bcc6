//! The expert library (METHOD.md section 1; the paper's "library of
//! LoRAs", mttl's `ExpertLibrary`): named LoRA experts for one base model,
//! in a local directory or on S3-compatible object storage, plus the
//! derived data library transforms cache next to them.
//!
//! Layout, the same on every backend (keys relative to the library root):
//!
//! ```text
//! library.json                  format and version
//! base_model.json               the base model every expert must fit (written once)
//! <name>/adapter_config.json    PEFT's files, so any tool loads <name>/ as-is
//! <name>/adapter_model.safetensors
//! <name>/quiver_expert.json     ExpertInfo (absent for plain PEFT imports)
//! <name>/quiver_manifest.json   ExpertManifest: metadata + sha256 of every file; written last
//! .aux/<kind>-<hash of config>/{config.json, <name>...}   transform outputs
//! .trash/<name>.<time>.<id>/    soft-deleted experts
//! ```
//!
//! No file is shared between experts or rewritten, so concurrent writers
//! of different experts never lose each other's work; library-level facts
//! are written once with create-if-absent.

mod aux;
mod error;
mod load;
mod local;
mod manifest;
mod object;
mod storage;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

pub use error::{BaseModelMismatch, LibraryError, LibraryResult, ShapeMismatch};
pub use manifest::{ExpertManifest, FileDigest};
pub use object::StorageOptions;

use crate::error::Error;
use crate::expert::{
    validate_name, BaseModelId, Expert, ExpertInfo, ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_INFO,
};
use crate::lora::{LoraConfig, TargetModules};
use error::short;
use manifest::modules_from_safetensors;
use storage::{now_secs, random_id, Storage};

/// Per-expert manifest file name.
pub const MANIFEST: &str = "quiver_manifest.json";
/// Library-level record of format and version.
pub const LIBRARY_FILE: &str = "library.json";
/// Library-level record of the base model.
pub const BASE_MODEL_FILE: &str = "base_model.json";
/// The layout version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const LIBRARY_FORMAT: &str = "quiver-library";
const AUX_DIR: &str = ".aux";
/// The configuration stored beside auxiliary data.
const AUX_CONFIG: &str = "config.json";
/// The files of an expert besides its manifest, in upload order.
const EXPERT_FILES: [&str; 3] = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, EXPERT_INFO];
/// Files fetched per batch by `verify`.
const VERIFY_BATCH: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LibraryMeta {
    format: String,
    version: u32,
    created: u64,
}

/// One row of [`ExpertLibrary::list`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertEntry {
    pub name: String,
    pub tasks: Vec<String>,
    pub base_model: Option<BaseModelId>,
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's `target_modules` (one regex, or module-name suffixes).
    pub target_modules: Vec<String>,
    /// How many layers it adapts.
    pub modules: usize,
    /// Seconds since the Unix epoch; 0 if unknown.
    pub created: u64,
    /// Bytes of its files.
    pub size: u64,
    /// Whether it has a manifest with file hashes (local experts written
    /// by older code have none).
    pub sealed: bool,
}

impl ExpertEntry {
    fn from_manifest(m: &ExpertManifest, sealed: bool) -> Self {
        Self {
            name: m.name.clone(),
            tasks: m.tasks.clone(),
            base_model: m.base_model.clone(),
            rank: m.rank,
            alpha: m.alpha,
            target_modules: match &m.target_modules {
                TargetModules::Names(v) => v.clone(),
                TargetModules::Regex(r) => vec![r.clone()],
            },
            modules: m.modules.len(),
            created: m.created,
            size: m.size(),
            sealed,
        }
    }
}

/// One corrupt, missing or inconsistent thing found by [`ExpertLibrary::verify`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// The expert concerned, if any.
    pub expert: Option<String>,
    /// The file or object (a path or an `s3://` URL).
    pub location: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.what)
    }
}

/// What [`ExpertLibrary::verify`] checked and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub library: String,
    pub experts: usize,
    pub files: usize,
    pub problems: Vec<Problem>,
    /// Harmless findings: leftovers of interrupted writes, experts without manifests.
    pub notes: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What [`ExpertLibrary::copy_to`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub copied: Vec<String>,
    /// Already in the destination with identical files.
    pub skipped: Vec<String>,
    /// In the destination with different files; left alone.
    pub conflicts: Vec<String>,
    /// Auxiliary objects copied.
    pub aux_copied: usize,
}

/// An expert's files: (file name, bytes).
type Files = Vec<(String, Vec<u8>)>;

/// Progress callback: (done, total, what is being worked on).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

enum Location {
    Local(PathBuf),
    S3,
}

fn parse_uri(uri: &str) -> LibraryResult<Location> {
    if uri.trim().is_empty() {
        return Err(LibraryError::BadUri {
            uri: uri.into(),
            reason: "it is empty".into(),
        });
    }
    if uri.starts_with("s3://") {
        return Ok(Location::S3);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Location::Local(PathBuf::from(path)));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(LibraryError::BadUri {
            uri: uri.into(),
            reason: format!(
                "`{scheme}://` is not supported; use a local directory or s3://bucket/prefix"
            ),
        });
    }
    Ok(Location::Local(PathBuf::from(uri)))
}

fn invalid(msg: String) -> LibraryError {
    LibraryError::Core(Error::InvalidArgument(msg))
}

/// Checks the name of an auxiliary kind or file like an expert name.
fn validate_aux_part(what: &str, s: &str) -> LibraryResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+=".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "`{s}` is not a valid auxiliary {what} (use letters, digits and -_.:+=; no `/`, no leading `.`, no `..`)"
        )))
    }
}

/// `[out, in]` of every layer an in-memory expert adapts.
fn expert_modules(e: &Expert) -> LibraryResult<BTreeMap<String, [usize; 2]>> {
    e.weights
        .iter()
        .map(|(m, (a, b))| {
            let (_, inp) = a.dims2()?;
            let (out, _) = b.dims2()?;
            Ok((m.clone(), [out, inp]))
        })
        .collect()
}

/// `2026-05-01T12:34:56Z` for seconds since the Unix epoch (UTC).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A library of LoRA experts for one base model; see the module docs.
#[derive(Debug)]
pub struct ExpertLibrary {
    storage: Box<dyn Storage>,
}

impl ExpertLibrary {
    fn storage_for(uri: &str, opts: &StorageOptions) -> LibraryResult<Box<dyn Storage>> {
        Ok(match parse_uri(uri)? {
            Location::Local(p) => Box::new(local::LocalStorage::new(p)),
            Location::S3 => Box::new(object::ObjectStorage::s3(uri, opts)?),
        })
    }

    /// Opens an existing library: a local directory (one that only holds
    /// expert directories counts) or `s3://bucket/prefix`, with S3
    /// settings from the `AWS_*` environment.
    pub fn open(uri: &str) -> LibraryResult<Self> {
        Self::open_with(uri, &StorageOptions::default())
    }

    pub fn open_with(uri: &str, opts: &StorageOptions) -> LibraryResult<Self> {
        let lib = Self {
            storage: Self::storage_for(uri, opts)?,
        };
        if let Some(root) = lib.storage.local_root() {
            if !root.is_dir() {
                return Err(LibraryError::NotALibrary {
                    uri: lib.uri().into(),
                    reason: "no such directory".into(),
                });
            }
        }
        match lib.read_meta()? {
            Some(_) => Ok(lib),
            None if lib.is_local() => Ok(lib),
            None => {
                // Listing names a missing bucket (reads of one look like
                // missing keys).
                lib.storage.list("")?;
                Err(LibraryError::NotALibrary {
                uri: lib.uri().into(),
                    reason: format!(
                        "no {LIBRARY_FILE}; `quiver library import` or `quiver library copy` creates one"
                    ),
                })
            }
        }
    }

    /// Creates a new library; fails if `uri` already holds one. S3
    /// buckets must exist already.
    pub fn create(uri: &str) -> LibraryResult<Self> {
        Self::create_with(uri, &StorageOptions::default())
    }

    pub fn create_with(uri: &str, opts: &StorageOptions) -> LibraryResult<Self> {
        let lib = Self {
            storage: Self::storage_for(uri, opts)?,
        };
        lib.init(true)?;
        Ok(lib)
    }

    /// Opens the library at `uri`, creating it if needed.
    pub fn open_or_create(uri: &str) -> LibraryResult<Self> {
        Self::open_or_create_with(uri, &StorageOptions::default())
    }

    pub fn open_or_create_with(uri: &str, opts: &StorageOptions) -> LibraryResult<Self> {
        let lib = Self {
            storage: Self::storage_for(uri, opts)?,
        };
        lib.init(false)?;
        Ok(lib)
    }

    /// A library in any object store (`prefix` inside it), opened or
    /// created; `uri` is how messages name it.
    pub fn from_object_store(
        store: Arc<dyn object_store::ObjectStore>,
        prefix: &str,
        uri: &str,
    ) -> LibraryResult<Self> {
        let lib = Self {
            storage: Box::new(object::ObjectStorage::new(store, prefix, uri)?),
        };
        lib.init(false)?;
        Ok(lib)
    }

    fn init(&self, must_be_new: bool) -> LibraryResult<()> {
        if let Some(root) = self.storage.local_root() {
            std::fs::create_dir_all(root)
                .map_err(|e| error::storage(root.display().to_string(), e))?;
        }
        let meta = LibraryMeta {
            format: LIBRARY_FORMAT.into(),
            version: FORMAT_VERSION,
            created: now_secs(),
        };
        let bytes = serde_json::to_vec_pretty(&meta).expect("json");
        let created = self.storage.put_new(LIBRARY_FILE, &bytes)?;
        if !created && must_be_new {
            return Err(LibraryError::AlreadyExists {
                uri: self.uri().into(),
            });
        }
        self.read_meta()?;
        Ok(())
    }

    fn read_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> LibraryResult<Option<T>> {
        match self.storage.get(key)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| LibraryError::Corrupt {
                    location: self.storage.display(key),
                    reason: format!("invalid JSON: {e}"),
                }),
        }
    }

    fn read_meta(&self) -> LibraryResult<Option<LibraryMeta>> {
        let meta: Option<LibraryMeta> = self.read_json(LIBRARY_FILE)?;
        if let Some(m) = &meta {
            if m.format != LIBRARY_FORMAT {
                return Err(LibraryError::NotALibrary {
                    uri: self.uri().into(),
                    reason: format!("{LIBRARY_FILE} has format `{}`", m.format),
                });
            }
            if m.version > FORMAT_VERSION {
                return Err(LibraryError::UnsupportedVersion {
                    library: self.uri().into(),
                    version: m.version,
                    supported: FORMAT_VERSION,
                });
            }
        }
        Ok(meta)
    }

    /// How messages name the library: its directory or `s3://bucket/prefix`.
    pub fn uri(&self) -> &str {
        self.storage.uri()
    }

    pub fn is_local(&self) -> bool {
        self.storage.local_root().is_some()
    }

    /// The directory of a local library.
    pub fn root(&self) -> Option<&Path> {
        self.storage.local_root()
    }

    /// The directory of expert `name` in a local library (`None` for
    /// object storage, or if there is no such expert).
    pub fn local_path(&self, name: &str) -> Option<PathBuf> {
        let root = self.storage.local_root()?;
        (validate_name(name).is_ok() && self.contains(name).ok()?).then(|| root.join(name))
    }

    /// The base model the library records, once an expert that names one
    /// was added (or [`ExpertLibrary::set_base_model`] was called).
    pub fn base_model(&self) -> LibraryResult<Option<BaseModelId>> {
        self.read_json(BASE_MODEL_FILE)
    }

    /// Records the base model; fine if the same fingerprint is recorded
    /// already, an error if another one is.
    pub fn set_base_model(&self, base: &BaseModelId) -> LibraryResult<()> {
        self.check_base("(library base model)", base)
    }

    /// Records `base` if the library has none; refuses a different one.
    fn check_base(&self, expert: &str, base: &BaseModelId) -> LibraryResult<()> {
        let mismatch = |library_base: BaseModelId| {
            LibraryError::BaseModelMismatch(Box::new(error::BaseModelMismatch {
                library: self.uri().into(),
                expert: expert.into(),
                expert_base: base.clone(),
                library_base,
            }))
        };
        if let Some(lb) = self.base_model()? {
            return if lb.fingerprint == base.fingerprint {
                Ok(())
            } else {
                Err(mismatch(lb))
            };
        }
        let bytes = serde_json::to_vec_pretty(base).expect("json");
        if self.storage.put_new(BASE_MODEL_FILE, &bytes)? {
            return Ok(());
        }
        // Another writer recorded one first.
        match self.base_model()? {
            Some(lb) if lb.fingerprint != base.fingerprint => Err(mismatch(lb)),
            _ => Ok(()),
        }
    }

    /// Whether the library has a (complete) expert called `name`.
    pub fn contains(&self, name: &str) -> LibraryResult<bool> {
        validate_name(name)?;
        if let Some(root) = self.storage.local_root() {
            let dir = root.join(name);
            return Ok(dir.join(MANIFEST).is_file() || dir.join(ADAPTER_CONFIG).is_file());
        }
        Ok(self.storage.get(&format!("{name}/{MANIFEST}"))?.is_some())
    }

    /// The manifest of `name`, and whether it is stored (`false`: computed
    /// from the files of a local expert written before manifests existed).
    fn read_manifest(&self, name: &str) -> LibraryResult<Option<(ExpertManifest, bool)>> {
        let key = format!("{name}/{MANIFEST}");
        if let Some(b) = self.storage.get(&key)? {
            return Ok(Some((
                ExpertManifest::parse(&b, &self.storage.display(&key))?,
                true,
            )));
        }
        if self.is_local() && self.contains(name)? {
            return Ok(Some((self.unsealed_manifest(name)?, false)));
        }
        Ok(None)
    }

    /// A manifest computed from the files of a local expert without one.
    fn unsealed_manifest(&self, name: &str) -> LibraryResult<ExpertManifest> {
        let key = |f: &str| format!("{name}/{f}");
        let cfg_bytes = self
            .storage
            .get(&key(ADAPTER_CONFIG))?
            .ok_or_else(|| self.no_such(name))?;
        let config: LoraConfig =
            serde_json::from_slice(&cfg_bytes).map_err(|e| LibraryError::Corrupt {
                location: self.storage.display(&key(ADAPTER_CONFIG)),
                reason: format!("invalid JSON: {e}"),
            })?;
        let info: Option<ExpertInfo> = self.read_json(&key(EXPERT_INFO))?;
        let weights = self.storage.get(&key(ADAPTER_WEIGHTS))?.unwrap_or_default();
        let modules =
            modules_from_safetensors(&weights, &self.storage.display(&key(ADAPTER_WEIGHTS)))?;
        let mut m = ExpertManifest::draft(name, &config, info.as_ref(), modules);
        m.files
            .insert(ADAPTER_CONFIG.into(), FileDigest::of(&cfg_bytes));
        m.files
            .insert(ADAPTER_WEIGHTS.into(), FileDigest::of(&weights));
        if let Some(b) = self.storage.get(&key(EXPERT_INFO))? {
            m.files.insert(EXPERT_INFO.into(), FileDigest::of(&b));
        }
        Ok(m)
    }

    /// The manifest of expert `name`.
    pub fn manifest(&self, name: &str) -> LibraryResult<ExpertManifest> {
        validate_name(name)?;
        self.read_manifest(name)?
            .map(|(m, _)| m)
            .ok_or_else(|| self.no_such(name))
    }

    fn no_such(&self, name: &str) -> LibraryError {
        let mut names: Vec<String> = self
            .storage
            .experts()
            .map(|d| d.into_iter().map(|d| d.name).collect())
            .unwrap_or_default();
        names.sort();
        let known = match names.len() {
            0 => " (it has none)".to_string(),
            n if n <= 12 => format!(" (it has: {})", names.join(", ")),
            n => format!(" (it has {n}: {}, ...)", names[..12].join(", ")),
        };
        LibraryError::NoSuchExpert {
            library: self.uri().into(),
            name: name.into(),
            known,
        }
    }

    /// Every expert's manifest (and whether it is stored), by name.
    fn manifests(&self) -> LibraryResult<Vec<(ExpertManifest, bool)>> {
        let dirs = self.storage.experts()?;
        let keys: Vec<String> = dirs
            .iter()
            .filter(|d| d.sealed)
            .map(|d| format!("{}/{MANIFEST}", d.name))
            .collect();
        let mut sealed = keys.iter().zip(self.storage.get_many(&keys)?);
        let mut out = Vec::with_capacity(dirs.len());
        for d in dirs {
            let m = if d.sealed {
                let (key, bytes) = sealed.next().expect("one per sealed expert");
                // Removed while we listed.
                let Some(bytes) = bytes else { continue };
                ExpertManifest::parse(&bytes, &self.storage.display(key)).map(|m| (m, true))
            } else {
                self.unsealed_manifest(&d.name).map(|m| (m, false))
            };
            match m {
                Ok(m) => out.push(m),
                // `verify` reports it; listing shows the rest.
                Err(e) => tracing::warn!("skipping expert `{}`: {e}", d.name),
            }
        }
        Ok(out)
    }

    /// Every expert, sorted by name.
    pub fn list(&self) -> LibraryResult<Vec<ExpertEntry>> {
        Ok(self
            .manifests()?
            .iter()
            .map(|(m, sealed)| ExpertEntry::from_manifest(m, *sealed))
            .collect())
    }

    /// The expert's files, each checked against the manifest.
    fn read_files(&self, name: &str) -> LibraryResult<(ExpertManifest, Files)> {
        validate_name(name)?;
        let (m, _) = self
            .read_manifest(name)?
            .ok_or_else(|| self.no_such(name))?;
        let keys: Vec<String> = m.files.keys().map(|f| format!("{name}/{f}")).collect();
        let blobs = self.storage.get_many(&keys)?;
        let mut files = Vec::with_capacity(keys.len());
        for (((file, digest), key), bytes) in m.files.iter().zip(&keys).zip(blobs) {
            let bytes = bytes.ok_or_else(|| LibraryError::Corrupt {
                location: self.storage.display(key),
                reason: "the file is missing".into(),
            })?;
            if let Some(what) = digest_mismatch(digest, &bytes) {
                return Err(LibraryError::Corrupt {
                    location: self.storage.display(key),
                    reason: what,
                });
            }
            files.push((file.clone(), bytes));
        }
        Ok((m, files))
    }

    /// Adds an in-memory expert (refusing an existing name, another base
    /// model, or layer shapes other experts of the library contradict).
    pub fn add_expert(&self, expert: &Expert) -> LibraryResult<()> {
        let name = expert.name.as_str();
        validate_name(name)?;
        expert
            .config
            .validate()
            .map_err(|msg| invalid(format!("expert `{name}`: {msg}")))?;
        let mut e = expert.clone();
        if let Some(info) = &mut e.info {
            info.name = name.to_string();
        }
        let tmp = tempfile::tempdir().map_err(|err| error::storage("temporary directory", err))?;
        e.write_files(tmp.path())?;
        let mut files = Vec::new();
        for f in EXPERT_FILES {
            let p = tmp.path().join(f);
            if p.is_file() {
                let b = std::fs::read(&p)
                    .map_err(|err| error::storage(p.display().to_string(), err))?;
                files.push((f.to_string(), b));
            }
        }
        let mut m = ExpertManifest::draft(name, &e.config, e.info.as_ref(), expert_modules(&e)?);
        if m.created == 0 {
            m.created = now_secs();
        }
        self.add_record(m, files)
    }

    /// Imports a PEFT adapter directory (from Quiver or any other tool)
    /// byte for byte. The name defaults to the one in its
    /// `quiver_expert.json`, else to the directory's name. Returns the name.
    pub fn import_dir(&self, dir: &Path, name: Option<&str>) -> LibraryResult<String> {
        self.import_dir_with(dir, name, false)
    }

    /// [`ExpertLibrary::import_dir`]; a PEFT adapter whose
    /// `base_model_name_or_path` does not name the library's base model is
    /// refused unless `allow_base_mismatch`.
    pub fn import_dir_with(
        &self,
        dir: &Path,
        name: Option<&str>,
        allow_base_mismatch: bool,
    ) -> LibraryResult<String> {
        if let Some(n) = name {
            validate_name(n)?;
        }
        let expert = Expert::load(dir, &Device::Cpu, DType::F32)?;
        if let (None, Some(b), Some(lib_base), false) = (
            &expert.info,
            &expert.config.base_model_name_or_path,
            self.base_model()?,
            allow_base_mismatch,
        ) {
            let names = crate::model::known_names(&lib_base.id);
            if !crate::expert::base_name_matches(b, &names) {
                return Err(invalid(format!(
                    "{}: the adapter was made for base model `{b}` (base_model_name_or_path in its {ADAPTER_CONFIG}), but library {} holds experts for `{}`; pass --allow-base-mismatch if they are the same weights",
                    dir.display(),
                    self.uri(),
                    lib_base.id
                )));
            }
        }
        let name = match name {
            Some(n) => n.to_string(),
            None => match &expert.info {
                Some(info) => info.name.clone(),
                None => std::fs::canonicalize(dir)
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| expert.name.clone()),
            },
        };
        validate_name(&name)?;
        let read = |f: &str| -> LibraryResult<Vec<u8>> {
            let p = dir.join(f);
            std::fs::read(&p).map_err(|e| LibraryError::Core(Error::io(&p, e)))
        };
        let mut files = vec![
            (ADAPTER_WEIGHTS.to_string(), read(ADAPTER_WEIGHTS)?),
            (ADAPTER_CONFIG.to_string(), read(ADAPTER_CONFIG)?),
        ];
        let mut info = expert.info.clone();
        if let Some(info) = &mut info {
            let bytes = if info.name == name {
                read(EXPERT_INFO)?
            } else {
                info.name = name.clone();
                serde_json::to_vec_pretty(info).expect("json")
            };
            files.push((EXPERT_INFO.to_string(), bytes));
        }
        let m = ExpertManifest::draft(
            &name,
            &expert.config,
            info.as_ref(),
            expert_modules(&expert)?,
        );
        self.add_record(m, files)?;
        Ok(name)
    }

    /// Stores an expert's files under the checks every way in shares.
    fn add_record(&self, mut m: ExpertManifest, files: Files) -> LibraryResult<()> {
        let name = m.name.clone();
        validate_name(&name)?;
        if self.contains(&name)? {
            return Err(LibraryError::Duplicate {
                library: self.uri().into(),
                name,
            });
        }
        // Libraries written before library.json existed get one now.
        let meta = LibraryMeta {
            format: LIBRARY_FORMAT.into(),
            version: FORMAT_VERSION,
            created: now_secs(),
        };
        self.storage.put_new(
            LIBRARY_FILE,
            &serde_json::to_vec_pretty(&meta).expect("json"),
        )?;
        self.check_shapes(&name, &m.modules)?;
        if let Some(base) = &m.base_model {
            self.check_base(&name, base)?;
        }
        m.files = files
            .iter()
            .map(|(f, b)| (f.clone(), FileDigest::of(b)))
            .collect();
        m.added = now_secs();
        m.format = manifest::EXPERT_FORMAT.into();
        m.version = FORMAT_VERSION;
        let bytes = serde_json::to_vec_pretty(&m.sealed()).expect("json");
        self.storage.publish_expert(&name, &files, &bytes)
    }

    /// Refuses layers whose shapes contradict those of the library's other
    /// experts (the guard for adapters that carry no base-model fingerprint).
    fn check_shapes(
        &self,
        name: &str,
        modules: &BTreeMap<String, [usize; 2]>,
    ) -> LibraryResult<()> {
        let mut known: BTreeMap<String, ([usize; 2], String)> = BTreeMap::new();
        for (m, _) in self.manifests()? {
            for (module, shape) in &m.modules {
                known
                    .entry(module.clone())
                    .or_insert_with(|| (*shape, m.name.clone()));
            }
        }
        for (module, shape) in modules {
            if let Some((expected, other)) = known.get(module) {
                if expected != shape {
                    return Err(LibraryError::ShapeMismatch(Box::new(
                        error::ShapeMismatch {
                            library: self.uri().into(),
                            expert: name.into(),
                            module: module.clone(),
                            expected: *expected,
                            got: *shape,
                            other: other.clone(),
                        },
                    )));
                }
            }
        }
        Ok(())
    }

    /// Writes expert `name` as a PEFT adapter directory `dir` (which must
    /// not exist, or be empty), after checking its files.
    pub fn export(&self, name: &str, dir: &Path) -> LibraryResult<()> {
        let (_, files) = self.read_files(name)?;
        if dir.exists() {
            let empty = std::fs::read_dir(dir)
                .map(|mut rd| rd.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(invalid(format!(
                    "{}: already exists and is not an empty directory",
                    dir.display()
                )));
            }
            std::fs::remove_dir(dir).map_err(|e| LibraryError::Core(Error::io(dir, e)))?;
        }
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| LibraryError::Core(Error::io(parent, e)))?;
        let tmp = crate::fsutil::temp_dir_in(parent, ".export-")
            .map_err(|e| LibraryError::Core(Error::io(parent, e)))?;
        for (file, bytes) in &files {
            let p = tmp.path().join(file);
            std::fs::write(&p, bytes).map_err(|e| LibraryError::Core(Error::io(&p, e)))?;
        }
        let tmp_path = tmp.keep();
        std::fs::rename(&tmp_path, dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp_path);
            LibraryError::Core(Error::io(dir, e))
        })
    }

    /// Removes expert `name`: into the library's `.trash/` (no longer
    /// listed), or for good with `purge`. Purging a name that only has
    /// leftovers of an interrupted write deletes those.
    pub fn remove(&self, name: &str, purge: bool) -> LibraryResult<()> {
        validate_name(name)?;
        if !self.contains(name)? {
            if purge && !self.storage.list(&format!("{name}/"))?.is_empty() {
                return self.storage.purge_expert(name);
            }
            return Err(self.no_such(name));
        }
        if purge {
            self.storage.purge_expert(name)
        } else {
            let trash = format!("{name}.{}.{}", now_secs(), &random_id()[..8]);
            self.storage.trash_expert(name, &trash)
        }
    }
}

/// Why `bytes` does not match `digest`, if it does not.
fn digest_mismatch(digest: &FileDigest, bytes: &[u8]) -> Option<String> {
    let got = FileDigest::of(bytes);
    (got != *digest).then(|| {
        format!(
            "its sha256 is {}… ({} bytes) but the manifest records {}… ({} bytes)",
            short(&got.sha256),
            got.size,
            short(&digest.sha256),
            digest.size
        )
    })
}

#[cfg(test)]
mod tests;
