//! A library on object storage (`s3://bucket/prefix`, or any
//! [`ObjectStore`]), with the same key layout as a local directory.
//!
//! Object stores have no rename, so an expert is published by uploading
//! its data files first and its manifest last with create-if-absent: an
//! expert without a manifest is invisible, and a crash at any point leaves
//! either nothing visible or the complete expert. A per-expert write lock
//! (`<name>/.quiver-write.lock`, also create-if-absent) keeps two writers
//! of the same name from interleaving their data files; a lock whose
//! process died (same host) or that is older than an hour is taken over
//! with a compare-and-swap on its ETag. Writers of different names never
//! touch a common object, so concurrent imports lose nothing.
//!
//! The public API is synchronous: the backend owns a small tokio runtime
//! and blocks on it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
use serde::{Deserialize, Serialize};

use super::error::{storage, LibraryError, LibraryResult};
use super::storage::{crash_point, now_secs, random_id, Entry, ExpertDir, Storage};
use super::{format_utc, MANIFEST};
use crate::expert::validate_name;

const LOCK: &str = ".quiver-write.lock";
/// A write lock older than this is abandoned whoever holds it.
const STALE_LOCK_SECS: u64 = 3600;
/// Concurrent requests of `get_many`.
const CONCURRENCY: usize = 16;

/// How to reach object storage, on top of the usual `AWS_*` environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` or
/// `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`, ...).
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    /// S3 settings that override the environment, as (key, value) pairs
    /// with object_store's names: `endpoint`, `region`, `access_key_id`,
    /// `secret_access_key`, `token`, `allow_http`, ...
    pub s3: Vec<(String, String)>,
}

pub(crate) struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    /// Key prefix of the library inside the store, without slashes at the ends.
    prefix: String,
    uri: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("uri", &self.uri)
            .finish()
    }
}

impl Drop for ObjectStorage {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's thread panics; this does not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Splits `s3://bucket/some/prefix` into (`bucket`, `some/prefix`).
pub(crate) fn parse_s3_uri(uri: &str) -> LibraryResult<(String, String)> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| LibraryError::BadUri {
            uri: uri.into(),
            reason: "expected s3://bucket/prefix".into(),
        })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(LibraryError::BadUri {
            uri: uri.into(),
            reason: "the bucket name is empty".into(),
        });
    }
    let prefix = prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|p| p == "." || p == ".." || (p.is_empty() && !prefix.is_empty()))
    {
        return Err(LibraryError::BadUri {
            uri: uri.into(),
            reason: "the prefix has an empty, `.` or `..` component".into(),
        });
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// The error message and its sources, on one line.
/// An object-store error as a sentence a user can act on: the cause first
/// (no credentials, endpoint unreachable, no such bucket, access denied),
/// then the client's own message.
pub(crate) fn explain_s3_error(msg: &str, uri: &str) -> String {
    let bucket = uri
        .strip_prefix("s3://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    let cause = if msg.contains("169.254.169.254") {
        Some("no S3 credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a server other than AWS); the instance-metadata service, the last resort, did not answer".to_string())
    } else if msg.contains("NoSuchBucket") || msg.contains("bucket does not exist") {
        Some(format!("the bucket `{bucket}` does not exist (create it first; Quiver does not create buckets)"))
    } else if msg.contains("InvalidAccessKeyId")
        || msg.contains("SignatureDoesNotMatch")
        || msg.contains("AccessDenied")
        || msg.contains("403 Forbidden")
    {
        Some("access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's permissions".to_string())
    } else if msg.contains("Connection refused")
        || msg.contains("tcp connect error")
        || msg.contains("dns error")
        || msg.contains("timed out")
    {
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .map(|e| format!("at {e}"))
            .unwrap_or_else(|_| "(AWS itself: AWS_ENDPOINT_URL is not set)".into());
        Some(format!("cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL and that the server is running"))
    } else {
        None
    };
    match cause {
        Some(c) => format!("{c} ({msg})"),
        None => msg.to_string(),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !msg.contains(&m) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod explain_tests {
    use super::explain_s3_error;

    #[test]
    fn s3_errors_name_their_cause() {
        let uri = "s3://bkt/lib";
        let e = explain_s3_error(
            "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token",
            uri,
        );
        assert!(
            e.starts_with("no S3 credentials") && e.contains("AWS_ACCESS_KEY_ID"),
            "{e}"
        );
        let e = explain_s3_error("<Code>NoSuchBucket</Code>", uri);
        assert!(e.contains("the bucket `bkt` does not exist"), "{e}");
        let e = explain_s3_error("tcp connect error: Connection refused (os error 111)", uri);
        assert!(e.starts_with("cannot reach the S3 endpoint"), "{e}");
        let e = explain_s3_error("<Code>InvalidAccessKeyId</Code>", uri);
        assert!(e.starts_with("access denied"), "{e}");
        assert_eq!(explain_s3_error("something else", uri), "something else");
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WriteLock {
    token: String,
    host: String,
    pid: u32,
    started: u64,
}

pub(crate) fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

impl WriteLock {
    fn new() -> Self {
        Self {
            token: random_id(),
            host: this_host(),
            pid: std::process::id(),
            started: now_secs(),
        }
    }

    fn is_stale(&self) -> bool {
        (self.host == this_host() && !pid_alive(self.pid))
            || now_secs().saturating_sub(self.started) > STALE_LOCK_SECS
    }

    fn describe(&self) -> String {
        format!(
            "process {} on {} since {}",
            self.pid,
            self.host,
            format_utc(self.started)
        )
    }
}

impl ObjectStorage {
    /// Wraps any object store; `uri` is how messages name the library.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        uri: &str,
    ) -> LibraryResult<ObjectStorage> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| storage(uri, format!("cannot start the I/O runtime: {e}")))?;
        Ok(ObjectStorage {
            store,
            prefix: prefix.trim_matches('/').to_string(),
            uri: uri.trim_end_matches('/').to_string(),
            rt: Some(rt),
        })
    }

    /// An S3 (or S3-compatible) bucket, configured from the environment
    /// and `opts`; plain `http://` endpoints (local servers) are allowed.
    pub fn s3(uri: &str, opts: &StorageOptions) -> LibraryResult<ObjectStorage> {
        let (bucket, prefix) = parse_s3_uri(uri)?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        for (k, v) in &opts.s3 {
            let key: AmazonS3ConfigKey = k.parse().map_err(|_| LibraryError::BadUri {
                uri: uri.into(),
                reason: format!("unknown S3 option `{k}`"),
            })?;
            b = b.with_config(key, v);
        }
        let endpoint = b
            .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
            .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
        if endpoint.is_some_and(|e| e.starts_with("http://")) {
            b = b.with_allow_http(true);
        }
        // Fail in seconds, not minutes, when the endpoint is down.
        for (key, default) in [("connect_timeout", "5s"), ("timeout", "120s")] {
            let k: AmazonS3ConfigKey = key.parse().expect("known client option");
            if b.get_config_value(&k).is_none() {
                b = b.with_config(k, default);
            }
        }
        b = b.with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        });
        let store = b
            .build()
            .map_err(|e| storage(uri, format!("cannot configure S3: {}", chain(&e))))?;
        let uri = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        Self::new(Arc::new(store), &prefix, &uri)
    }

    fn path(&self, key: &str) -> ObjPath {
        let key = key.trim_matches('/');
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else if key.is_empty() {
            ObjPath::from(self.prefix.as_str())
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The key of `p` relative to the library root.
    fn rel(&self, p: &ObjPath) -> Option<String> {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            Some(s.to_string())
        } else {
            s.strip_prefix(&self.prefix)?
                .strip_prefix('/')
                .map(str::to_string)
        }
    }

    fn err(&self, key: &str, e: object_store::Error) -> LibraryError {
        storage(self.display(key), explain_s3_error(&chain(&e), &self.uri))
    }

    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self
            .rt
            .as_ref()
            .expect("runtime lives as long as the storage");
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from async code: block on our runtime in another thread.
            std::thread::scope(|s| {
                s.spawn(|| rt.block_on(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            rt.block_on(f)
        }
    }

    fn exists(&self, key: &str) -> LibraryResult<bool> {
        let p = self.path(key);
        match self.block_on(self.store.head(&p)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(key, e)),
        }
    }

    /// The object's bytes and version, for a later compare-and-swap.
    fn get_versioned(&self, key: &str) -> LibraryResult<Option<(Vec<u8>, UpdateVersion)>> {
        let p = self.path(key);
        let res = self.block_on(async {
            let r = self.store.get(&p).await?;
            let version = UpdateVersion {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            Ok::<_, object_store::Error>((r.bytes().await?.to_vec(), version))
        });
        match res {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    /// Replaces `key` only if it is still at `version`.
    fn put_if_version(
        &self,
        key: &str,
        bytes: &[u8],
        version: UpdateVersion,
    ) -> LibraryResult<bool> {
        if version.e_tag.is_none() && version.version.is_none() {
            return Ok(false);
        }
        let p = self.path(key);
        let opts = PutOptions::from(PutMode::Update(version));
        let payload = PutPayload::from(bytes.to_vec());
        match self.block_on(self.store.put_opts(&p, payload, opts)) {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::NotFound { .. },
            ) => Ok(false),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn acquire_lock(&self, name: &str, lock_key: &str) -> LibraryResult<()> {
        let bytes = serde_json::to_vec(&WriteLock::new()).expect("json");
        let mut holder = String::from("another writer");
        for _ in 0..3 {
            if self.put_new(lock_key, &bytes)? {
                return Ok(());
            }
            let Some((existing, version)) = self.get_versioned(lock_key)? else {
                continue; // released meanwhile
            };
            let lock: Option<WriteLock> = serde_json::from_slice(&existing).ok();
            if let Some(l) = &lock {
                holder = l.describe();
            }
            if !lock.as_ref().is_none_or(WriteLock::is_stale) {
                break;
            }
            tracing::warn!(
                "{}: taking over an abandoned write lock ({holder})",
                self.display(lock_key)
            );
            // Only one of several writers that found it stale wins the swap.
            if self.put_if_version(lock_key, &bytes, version)? {
                return Ok(());
            }
        }
        Err(LibraryError::WriteInProgress {
            library: self.uri.clone(),
            name: name.to_string(),
            holder,
        })
    }
}

impl Storage for ObjectStorage {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn display(&self, key: &str) -> String {
        format!("{}/{}", self.uri, key.trim_matches('/'))
    }

    fn get(&self, key: &str) -> LibraryResult<Option<Vec<u8>>> {
        let p = self.path(key);
        let res = self.block_on(async { self.store.get(&p).await?.bytes().await });
        match res {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn get_many(&self, keys: &[String]) -> LibraryResult<Vec<Option<Vec<u8>>>> {
        // Per key: its bytes (None if absent), or the key and the error.
        type Fetched = Result<Option<Vec<u8>>, (String, object_store::Error)>;
        let results: Vec<Fetched> = self.block_on(async {
            // Owned inputs: the futures must not borrow from the iterator.
            let jobs: Vec<(String, ObjPath)> =
                keys.iter().map(|k| (k.clone(), self.path(k))).collect();
            futures::stream::iter(jobs)
                .map(|(k, p)| {
                    let store = Arc::clone(&self.store);
                    async move {
                        let r = async { store.get(&p).await?.bytes().await }.await;
                        match r {
                            Ok(b) => Ok(Some(b.to_vec())),
                            Err(object_store::Error::NotFound { .. }) => Ok(None),
                            Err(e) => Err((k, e)),
                        }
                    }
                })
                .buffered(CONCURRENCY)
                .collect()
                .await
        });
        results
            .into_iter()
            .map(|r| r.map_err(|(k, e)| self.err(&k, e)))
            .collect()
    }

    fn put(&self, key: &str, bytes: &[u8]) -> LibraryResult<()> {
        let p = self.path(key);
        let payload = PutPayload::from(bytes.to_vec());
        self.block_on(self.store.put(&p, payload))
            .map(|_| ())
            .map_err(|e| self.err(key, e))
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> LibraryResult<bool> {
        let p = self.path(key);
        let payload = PutPayload::from(bytes.to_vec());
        let opts = PutOptions::from(PutMode::Create);
        match self.block_on(self.store.put_opts(&p, payload, opts)) {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> LibraryResult<Vec<Entry>> {
        let prefix = prefix.trim_matches('/');
        let p = self.path(prefix);
        let root = (!self.prefix.is_empty() || !prefix.is_empty()).then_some(&p);
        let metas: Vec<object_store::ObjectMeta> = self
            .block_on(self.store.list(root).try_collect())
            .map_err(|e| self.err(prefix, e))?;
        let mut out: Vec<Entry> = metas
            .into_iter()
            .filter_map(|m| {
                Some(Entry {
                    key: self.rel(&m.location)?,
                    size: m.size,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> LibraryResult<()> {
        let p = self.path(key);
        match self.block_on(self.store.delete(&p)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }

    fn experts(&self) -> LibraryResult<Vec<ExpertDir>> {
        let mut out: Vec<ExpertDir> =
            self.list("")?
                .into_iter()
                .filter_map(|e| {
                    let (name, file) = e.key.split_once('/')?;
                    (file == MANIFEST && !name.starts_with('.') && validate_name(name).is_ok())
                        .then(|| ExpertDir {
                            name: name.to_string(),
                            sealed: true,
                        })
                })
                .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn publish_expert(
        &self,
        name: &str,
        files: &[(String, Vec<u8>)],
        manifest: &[u8],
    ) -> LibraryResult<()> {
        let manifest_key = format!("{name}/{MANIFEST}");
        let duplicate = || LibraryError::Duplicate {
            library: self.uri.clone(),
            name: name.to_string(),
        };
        if self.exists(&manifest_key)? {
            return Err(duplicate());
        }
        let lock_key = format!("{name}/{LOCK}");
        self.acquire_lock(name, &lock_key)?;
        let result = (|| {
            // Someone may have finished the same name before we got the lock.
            if self.exists(&manifest_key)? {
                return Err(duplicate());
            }
            for (i, (file, bytes)) in files.iter().enumerate() {
                self.put(&format!("{name}/{file}"), bytes)?;
                crash_point(i + 1);
            }
            if !self.put_new(&manifest_key, manifest)? {
                return Err(duplicate());
            }
            crash_point(files.len() + 1);
            Ok(())
        })();
        // Data files of a failed write stay behind, invisible without a
        // manifest; the next writer of this name overwrites them.
        let _ = self.delete(&lock_key);
        result
    }

    fn trash_expert(&self, name: &str, trash_name: &str) -> LibraryResult<()> {
        let entries = self.list(&format!("{name}/"))?;
        for e in &entries {
            let rest = &e.key[name.len() + 1..];
            if rest == LOCK {
                continue;
            }
            let to = format!(".trash/{trash_name}/{rest}");
            self.block_on(self.store.copy(&self.path(&e.key), &self.path(&to)))
                .map_err(|err| self.err(&e.key, err))?;
        }
        self.purge_expert(name)
    }

    fn purge_expert(&self, name: &str) -> LibraryResult<()> {
        // The manifest goes first: from then on the expert is invisible.
        self.delete(&format!("{name}/{MANIFEST}"))?;
        for e in self.list(&format!("{name}/"))? {
            self.delete(&e.key)?;
        }
        Ok(())
    }

    fn leftovers(&self) -> LibraryResult<Vec<String>> {
        let mut dirs: std::collections::BTreeMap<String, (usize, bool)> = Default::default();
        for e in self.list("")? {
            let Some((name, file)) = e.key.split_once('/') else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let d = dirs.entry(name.to_string()).or_default();
            d.0 += 1;
            d.1 |= file == MANIFEST;
        }
        Ok(dirs
            .into_iter()
            .filter(|(_, (_, sealed))| !sealed)
            .map(|(name, (n, _))| {
                format!(
                    "{}/: {n} object(s) but no manifest, left by an interrupted (or ongoing) write; never listed, `quiver library rm {name} --purge` deletes them",
                    self.display(&name)
                )
            })
            .collect())
    }
}
