//! A library in a local directory, laid out as `quiver train` has always
//! written it (`LIB/<name>/adapter_*`), so code that reads `LIB/<name>`
//! directly keeps working. An expert is published by writing it into
//! `LIB/.tmp/` and renaming the finished directory into place; single
//! files are written to a temporary sibling and renamed (or hard-linked,
//! for create-if-absent), so no reader ever sees a partial file.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::error::{storage, LibraryError, LibraryResult};
use super::storage::{crash_point, random_id, Entry, ExpertDir, Storage};
use super::MANIFEST;
use crate::expert::{validate_name, ADAPTER_CONFIG};

const TMP_DIR: &str = ".tmp";
const TRASH_DIR: &str = ".trash";

#[derive(Debug)]
pub(crate) struct LocalStorage {
    root: PathBuf,
    uri: String,
}

impl LocalStorage {
    pub fn new(root: PathBuf) -> Self {
        let uri = root.display().to_string();
        Self { root, uri }
    }

    fn path(&self, key: &str) -> PathBuf {
        let mut p = self.root.clone();
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p.push(part);
        }
        p
    }

    fn err(&self, path: &Path, e: impl std::fmt::Display) -> LibraryError {
        storage(path.display().to_string(), e)
    }

    /// Writes `bytes` to a new temporary file next to `dest` and syncs it.
    fn write_temp(&self, dest: &Path, bytes: &[u8]) -> LibraryResult<PathBuf> {
        let parent = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(|e| self.err(parent, e))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{name}.tmp-{}", random_id()));
        write_synced(&tmp, bytes).map_err(|e| self.err(&tmp, e))?;
        Ok(tmp)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Makes a rename or a new entry in `dir` durable; best effort (some
/// filesystems cannot sync directories).
fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<Entry>) -> std::io::Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let ft = entry.file_type()?;
        if ft.is_dir() {
            walk(&entry.path(), &key, out)?;
        } else if ft.is_file() {
            out.push(Entry {
                key,
                size: entry.metadata()?.len(),
            });
        }
    }
    Ok(())
}

impl Storage for LocalStorage {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn display(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn get(&self, key: &str) -> LibraryResult<Option<Vec<u8>>> {
        let p = self.path(key);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(&p, e)),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> LibraryResult<()> {
        let dest = self.path(key);
        let tmp = self.write_temp(&dest, bytes)?;
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(self.err(&dest, e));
        }
        if let Some(parent) = dest.parent() {
            sync_dir(parent);
        }
        Ok(())
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> LibraryResult<bool> {
        let dest = self.path(key);
        if dest.exists() {
            return Ok(false);
        }
        let tmp = self.write_temp(&dest, bytes)?;
        // A hard link fails if `dest` exists and never exposes a partial file.
        let res = fs::hard_link(&tmp, &dest);
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => {
                if let Some(parent) = dest.parent() {
                    sync_dir(parent);
                }
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.err(&dest, e)),
        }
    }

    fn list(&self, prefix: &str) -> LibraryResult<Vec<Entry>> {
        let rel = prefix.trim_end_matches('/');
        let dir = self.path(rel);
        let mut out = Vec::new();
        walk(&dir, rel, &mut out).map_err(|e| self.err(&dir, e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> LibraryResult<()> {
        let p = self.path(key);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(&p, e)),
        }
    }

    fn experts(&self) -> LibraryResult<Vec<ExpertDir>> {
        let rd = fs::read_dir(&self.root).map_err(|e| self.err(&self.root, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| self.err(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || validate_name(&name).is_err() {
                continue;
            }
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            if dir.join(MANIFEST).is_file() {
                out.push(ExpertDir { name, sealed: true });
            } else if dir.join(ADAPTER_CONFIG).is_file() {
                out.push(ExpertDir {
                    name,
                    sealed: false,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn publish_expert(
        &self,
        name: &str,
        files: &[(String, Vec<u8>)],
        manifest: &[u8],
    ) -> LibraryResult<()> {
        let dest = self.path(name);
        let duplicate = || LibraryError::Duplicate {
            library: self.uri.clone(),
            name: name.to_string(),
        };
        if dest.exists() {
            return Err(duplicate());
        }
        let tmp_root = self.root.join(TMP_DIR);
        fs::create_dir_all(&tmp_root).map_err(|e| self.err(&tmp_root, e))?;
        let tmp = tmp_root.join(format!("{name}.{}", random_id()));
        fs::create_dir(&tmp).map_err(|e| self.err(&tmp, e))?;
        let result = (|| {
            let all = files
                .iter()
                .map(|(f, b)| (f.as_str(), b.as_slice()))
                .chain([(MANIFEST, manifest)]);
            for (i, (file, bytes)) in all.enumerate() {
                let p = tmp.join(file);
                write_synced(&p, bytes).map_err(|e| self.err(&p, e))?;
                crash_point(i + 1);
            }
            sync_dir(&tmp);
            // rename(2) onto an existing non-empty directory fails, so of
            // two writers of the same name exactly one wins.
            match fs::rename(&tmp, &dest) {
                Ok(()) => {
                    sync_dir(&self.root);
                    Ok(())
                }
                Err(_) if dest.exists() => Err(duplicate()),
                Err(e) => Err(self.err(&dest, e)),
            }
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    fn trash_expert(&self, name: &str, trash_name: &str) -> LibraryResult<()> {
        let src = self.path(name);
        let trash = self.root.join(TRASH_DIR);
        fs::create_dir_all(&trash).map_err(|e| self.err(&trash, e))?;
        let dest = trash.join(trash_name);
        fs::rename(&src, &dest).map_err(|e| self.err(&src, e))?;
        sync_dir(&self.root);
        Ok(())
    }

    fn purge_expert(&self, name: &str) -> LibraryResult<()> {
        let src = self.path(name);
        if !src.exists() {
            return Ok(());
        }
        // Rename first so that no reader sees a half-deleted expert.
        let tmp_root = self.root.join(TMP_DIR);
        fs::create_dir_all(&tmp_root).map_err(|e| self.err(&tmp_root, e))?;
        let tmp = tmp_root.join(format!("purge-{name}.{}", random_id()));
        fs::rename(&src, &tmp).map_err(|e| self.err(&src, e))?;
        sync_dir(&self.root);
        fs::remove_dir_all(&tmp).map_err(|e| self.err(&tmp, e))
    }

    fn leftovers(&self) -> LibraryResult<Vec<String>> {
        let tmp_root = self.root.join(TMP_DIR);
        let rd = match fs::read_dir(&tmp_root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&tmp_root, e)),
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            out.push(format!(
                "{}: left by an interrupted (or ongoing) write or delete; never listed; once no writer runs, `rm -rf {}` deletes it",
                entry.path().display(),
                entry.path().display()
            ));
        }
        out.sort();
        Ok(out)
    }
}
