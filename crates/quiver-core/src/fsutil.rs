//! File-system helpers shared by every writer of small files.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary sibling and one rename, so
/// readers never see half a file. Creates the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = temp_file_in(dir, ".tmp-").map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// A temporary file in `dir` that becomes a result by a rename: created
/// with the mode of any new file (0666 less the umask), not tempfile's
/// private 0600, so results are as readable as files written directly.
pub fn temp_file_in(dir: &Path, prefix: &str) -> std::io::Result<tempfile::NamedTempFile> {
    builder(prefix, 0o666).tempfile_in(dir)
}

/// A temporary directory in `dir` that becomes a result by a rename (an
/// expert, a converted model): created 0777 less the umask, not 0700, so a
/// shared library stays readable by the others who share it.
pub fn temp_dir_in(dir: &Path, prefix: &str) -> std::io::Result<tempfile::TempDir> {
    builder(prefix, 0o777).tempdir_in(dir)
}

fn builder(prefix: &str, mode: u32) -> tempfile::Builder<'_, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    b
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Results renamed from temporaries get the usual modes (the umask
    /// applied to 0666 / 0777), not tempfile's private ones.
    #[test]
    fn renamed_results_are_not_private() {
        let tmp = tempfile::tempdir().unwrap();
        let umask = {
            let probe = tmp.path().join("probe");
            std::fs::write(&probe, b"").unwrap();
            0o666 & !std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777
        };
        let file = tmp.path().join("out.json");
        write_atomic(&file, b"{}").unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "file mode {mode:o}");
        let d = temp_dir_in(tmp.path(), ".x-").unwrap();
        let mode = std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777 & !umask, "directory mode {mode:o}");
    }
}
