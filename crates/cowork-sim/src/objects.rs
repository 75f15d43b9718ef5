//! Opening the service's object store from a URL, and reading/writing objects with their sha256.
//!
//! `file:///abs/dir` is a LocalFileSystem rooted at that directory (created if missing).
//! `s3://bucket[/prefix]` is S3 or any S3-compatible server: credentials and defaults come from
//! the usual `AWS_*` environment variables; endpoint, region and plain HTTP can be set in
//! [`ObjectStoreOptions`]. Requests always use path-style addressing, which S3-compatible
//! servers expect.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Settings for `s3://` URLs that are not part of the URL.
#[derive(Debug, Clone, Default)]
pub struct ObjectStoreOptions {
    /// e.g. `http://127.0.0.1:9000` for an S3-compatible server (`AWS_ENDPOINT_URL` otherwise).
    pub s3_endpoint: Option<String>,
    /// Defaults to `AWS_REGION`, else `us-east-1`.
    pub s3_region: Option<String>,
    /// Access key; `AWS_ACCESS_KEY_ID` otherwise. Only tests set it here.
    pub s3_access_key_id: Option<String>,
    /// Secret key; `AWS_SECRET_ACCESS_KEY` otherwise. Only tests set it here.
    pub s3_secret_access_key: Option<String>,
}

/// Installs ring as the process-wide rustls provider (reqwest is built without one). Safe to
/// call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens the object store a URL names.
pub fn open_object_store(url: &str, options: &ObjectStoreOptions) -> Result<Arc<dyn ObjectStore>> {
    if let Some(rest) = url.strip_prefix("file://") {
        let dir = PathBuf::from(rest);
        if !dir.is_absolute() {
            anyhow::bail!(
                "object store URL {url:?} needs an absolute path: write file:///abs/path \
                 (three slashes)"
            );
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create the object store directory {}", dir.display()))?;
        let store = LocalFileSystem::new_with_prefix(&dir)
            .with_context(|| format!("open the object store directory {}", dir.display()))?;
        return Ok(Arc::new(store));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            anyhow::bail!("object store URL {url:?} names no bucket: write s3://bucket[/prefix]");
        }
        install_crypto_provider();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false);
        let endpoint = options
            .s3_endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(endpoint) = endpoint {
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
            builder = builder.with_endpoint(endpoint);
        }
        let region = options
            .s3_region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_owned());
        builder = builder.with_region(region);
        if let Some(key) = &options.s3_access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &options.s3_secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let store = builder.build().with_context(|| {
            format!(
                "open object store {url}: check the bucket name, AWS_* credentials and \
                 --s3-endpoint / AWS_ENDPOINT_URL"
            )
        })?;
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Ok(Arc::new(store));
        }
        let prefix = Path::parse(prefix)
            .with_context(|| format!("object store URL {url:?} has an invalid key prefix"))?;
        return Ok(Arc::new(PrefixStore::new(store, prefix)));
    }
    anyhow::bail!(
        "unsupported object store URL {url:?}: use file:///abs/dir or s3://bucket[/prefix] \
         (--object-store or env OBJECT_STORE_URL)"
    )
}

/// An object as written: its key, size and hex sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
    pub sha256: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn parse_key(key: &str) -> Result<Path> {
    Path::parse(key).with_context(|| format!("{key:?} is not a valid object key"))
}

/// Writes `body` under `key` and returns its size and sha256.
pub async fn put_object(store: &dyn ObjectStore, key: &str, body: Bytes) -> Result<StoredObject> {
    let path = parse_key(key)?;
    let stored = StoredObject {
        key: key.to_owned(),
        size: body.len() as u64,
        sha256: sha256_hex(&body),
    };
    store
        .put(&path, PutPayload::from_bytes(body))
        .await
        .with_context(|| format!("write object {key}"))?;
    Ok(stored)
}

/// Whether `key` is a worker checkpoint (`tenants/<t>/sessions/<s>/checkpoints/...`).
pub fn is_checkpoint(key: &str) -> bool {
    key.contains("/checkpoints/")
}

/// On a `file://` store, makes the object at `key` readable by its owner only (mode 0600), as
/// the real service writes its checkpoints; other stores have no file modes, and nothing
/// changes there.
pub fn make_private(objects_url: &str, key: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(dir) = objects_url.strip_prefix("file://") else {
        return Ok(());
    };
    let path = std::path::Path::new(dir).join(key);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("make {} private (mode 0600)", path.display()))
}

/// Reads an object; `None` when it does not exist.
pub async fn get_object(store: &dyn ObjectStore, key: &str) -> Result<Option<Bytes>> {
    let path = parse_key(key)?;
    match store.get(&path).await {
        Ok(result) => Ok(Some(
            result
                .bytes()
                .await
                .with_context(|| format!("read object {key}"))?,
        )),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read object {key}")),
    }
}

/// Reads an object and hashes it; `None` when it does not exist.
pub async fn object_sha256(store: &dyn ObjectStore, key: &str) -> Result<Option<StoredObject>> {
    Ok(get_object(store, key).await?.map(|body| StoredObject {
        key: key.to_owned(),
        size: body.len() as u64,
        sha256: sha256_hex(&body),
    }))
}

/// Whether an object exists (a HEAD request).
pub async fn object_exists(store: &dyn ObjectStore, key: &str) -> Result<bool> {
    let path = parse_key(key)?;
    match store.head(&path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("look up object {key}")),
    }
}

/// Writes and deletes a small probe object: proves the store accepts writes.
pub async fn write_probe(store: &dyn ObjectStore, name: &str) -> Result<()> {
    write_probe_at(store, &format!("_probe/{name}")).await
}

/// The real profile's readiness probe key, as the real service names it:
/// `health/readiness/<date>/<uuid>.txt` (a verification that lists the store ignores the prefix).
pub fn readiness_probe_key() -> String {
    format!(
        "health/readiness/{}/{}.txt",
        chrono::Utc::now().format("%Y-%m-%d"),
        uuid::Uuid::new_v4()
    )
}

/// Writes and deletes a small probe object at `key`.
pub async fn write_probe_at(store: &dyn ObjectStore, key: &str) -> Result<()> {
    let key = key.to_owned();
    put_object(store, &key, Bytes::from_static(b"probe")).await?;
    let path = parse_key(&key)?;
    match store.delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("delete probe object {key}")),
    }
}

/// The session's key prefix: `tenants/<t>/sessions/<s>`.
pub fn session_prefix(tenant_id: &str, session_id: &str) -> String {
    format!("tenants/{tenant_id}/sessions/{session_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_relative_and_unknown_urls_with_a_hint() {
        let opts = ObjectStoreOptions::default();
        let rel = open_object_store("file://relative/dir", &opts)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(rel.is_some_and(|e| e.contains("three slashes")));
        let gcs = open_object_store("gs://bucket", &opts)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(gcs.is_some_and(|e| e.contains("file:///abs/dir or s3://")));
        let nobucket = open_object_store("s3:///x", &opts)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(nobucket.is_some_and(|e| e.contains("names no bucket")));
    }

    #[tokio::test]
    async fn local_store_round_trips_with_sha() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/objects", dir.path().display());
        let store =
            open_object_store(&url, &ObjectStoreOptions::default()).expect("open local store");
        let stored = put_object(store.as_ref(), "a/b.txt", Bytes::from_static(b"hello"))
            .await
            .expect("put");
        assert_eq!(stored.size, 5);
        let read = object_sha256(store.as_ref(), "a/b.txt").await.expect("get");
        assert_eq!(read, Some(stored));
        assert_eq!(
            object_sha256(store.as_ref(), "a/missing")
                .await
                .expect("get"),
            None
        );
        write_probe(store.as_ref(), "t").await.expect("probe");
        assert!(
            !object_exists(store.as_ref(), "_probe/t")
                .await
                .expect("head")
        );
    }
}
