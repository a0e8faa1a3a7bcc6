//! The storage interface the library is written against: keyed blobs
//! (`<expert>/<file>`, `library.json`, `.aux/...`) plus the one operation
//! whose atomicity differs by backend, publishing an expert. A local
//! directory publishes by renaming a finished temporary directory; an
//! object store uploads the data first and the manifest last, so an expert
//! without its manifest is invisible.

use std::path::Path;

use super::error::LibraryResult;

/// One stored object: its key relative to the library root and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: String,
    pub size: u64,
}

/// An expert directory as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpertDir {
    pub name: String,
    /// Whether it has a manifest. Only local libraries list experts without
    /// one: directories `Expert::save` wrote before libraries had manifests.
    pub sealed: bool,
}

pub(crate) trait Storage: Send + Sync + std::fmt::Debug {
    /// How messages name the library: a path or `s3://bucket/prefix`.
    fn uri(&self) -> &str;

    /// How messages name the object at `key`.
    fn display(&self, key: &str) -> String;

    /// The directory of a local library.
    fn local_root(&self) -> Option<&Path> {
        None
    }

    fn get(&self, key: &str) -> LibraryResult<Option<Vec<u8>>>;

    /// Several objects at once (concurrently where the backend can).
    fn get_many(&self, keys: &[String]) -> LibraryResult<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }

    /// Writes `key` atomically: readers see the old or the new bytes.
    fn put(&self, key: &str, bytes: &[u8]) -> LibraryResult<()>;

    /// Writes `key` only if it does not exist; `false` if it did.
    fn put_new(&self, key: &str, bytes: &[u8]) -> LibraryResult<bool>;

    /// Every object under `prefix` (a key prefix ending at a `/`, or `""`).
    fn list(&self, prefix: &str) -> LibraryResult<Vec<Entry>>;

    /// Removes `key`; a missing key is not an error.
    fn delete(&self, key: &str) -> LibraryResult<()>;

    /// The experts whose directories are complete.
    fn experts(&self) -> LibraryResult<Vec<ExpertDir>>;

    /// Publishes `files` and then `manifest` under `<name>/` so that no
    /// reader ever sees some of them; refuses an existing expert.
    fn publish_expert(
        &self,
        name: &str,
        files: &[(String, Vec<u8>)],
        manifest: &[u8],
    ) -> LibraryResult<()>;

    /// Moves the expert to `.trash/<trash_name>/`, invisible from then on.
    fn trash_expert(&self, name: &str, trash_name: &str) -> LibraryResult<()>;

    /// Deletes the expert and anything an interrupted write left under its name.
    fn purge_expert(&self, name: &str) -> LibraryResult<()>;

    /// One line for each leftover of an interrupted write (harmless: never
    /// listed as an expert).
    fn leftovers(&self) -> LibraryResult<Vec<String>>;
}

/// Test hook: with `QUIVER_LIBRARY_CRASH_AFTER_FILES=N` a publishing
/// process aborts right after writing its N-th file (the manifest counts),
/// as if killed, so tests can check that no half-written expert shows.
pub(crate) fn crash_point(written: usize) {
    if let Ok(v) = std::env::var("QUIVER_LIBRARY_CRASH_AFTER_FILES") {
        if v.trim().parse::<usize>().ok() == Some(written) {
            eprintln!("QUIVER_LIBRARY_CRASH_AFTER_FILES={written}: aborting mid-write");
            std::process::abort();
        }
    }
}

/// A short random hex id for temporary names and lock tokens.
pub(crate) fn random_id() -> String {
    use rand::Rng;
    let v: u64 = rand::rng().random();
    format!("{v:016x}")
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
