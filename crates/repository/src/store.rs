//! Opening object stores from URLs (`file://`, `s3://`, `gs://`, `az://`, `memory://`), telling
//! transient store errors from permanent ones, and retrying the transient ones with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use backon::{ExponentialBuilder, Retryable};
use object_store::aws::AmazonS3Builder;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ClientConfigKey, ClientOptions, ObjectStore, RetryConfig};

use crate::redact::redact_url;

/// How to reach an S3 or S3-compatible store (DigitalOcean Spaces, MinIO, moto...).
///
/// Everything not set here comes from the standard `AWS_*` environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
/// `AWS_ENDPOINT`, ...). Credentials are named by the environment variable that holds them,
/// never given as values.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint of an S3-compatible service, e.g. `https://nyc3.digitaloceanspaces.com`.
    pub endpoint: Option<String>,
    /// Region; defaults to `AWS_REGION`/`AWS_DEFAULT_REGION`, then `us-east-1`.
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted style.
    pub path_style: bool,
    /// Plain HTTP; defaults to true exactly when `endpoint` starts with `http://`.
    pub allow_http: Option<bool>,
    /// Name of the environment variable holding the access key id.
    pub access_key_id_env: Option<String>,
    /// Name of the environment variable holding the secret access key.
    pub secret_access_key_env: Option<String>,
    /// Name of the environment variable holding a session token.
    pub session_token_env: Option<String>,
    /// HTTP-level retries inside `object_store` (default 5).
    pub max_retries: Option<usize>,
    /// Upper bound on one request including its HTTP-level retries (default 60 s).
    pub retry_timeout: Option<Duration>,
    /// TCP connect timeout (default 10 s).
    pub connect_timeout: Option<Duration>,
}

impl S3Options {
    /// The connection settings a command or a config names (credentials stay in the
    /// environment).
    pub fn connection(
        endpoint: Option<String>,
        region: Option<String>,
        path_style: bool,
    ) -> S3Options {
        S3Options {
            endpoint,
            region,
            path_style,
            ..S3Options::default()
        }
    }
}

/// Opens the store a URL names and returns it with the prefix inside it.
///
/// * `file:///abs/dir` — a local directory, which must exist (the prefix is the directory).
/// * `s3://bucket/prefix` — S3 or an S3-compatible service, see [`S3Options`].
/// * `gs://bucket/prefix` — Google Cloud Storage, credentials from `GOOGLE_*` variables.
/// * `az://container/prefix` — Azure Blob Storage, credentials from `AZURE_*` variables.
/// * `memory://` — a fresh in-memory store (tests).
pub fn store_from_url(url: &str, s3: &S3Options) -> Result<(Arc<dyn ObjectStore>, Path)> {
    if url.starts_with('/') {
        bail!("{url} is a path, not a URL: write file://{url}");
    }
    let parsed = url::Url::parse(url).with_context(|| {
        format!(
            "parse store URL {}: expected file:///dir, s3://bucket/prefix, gs://bucket/prefix \
             or az://container/prefix",
            redact_url(url)
        )
    })?;
    let prefix = || -> Result<Path> {
        let raw = parsed.path().trim_matches('/');
        Path::parse(raw).with_context(|| format!("parse the prefix of {}", redact_url(url)))
    };
    match parsed.scheme() {
        "file" => {
            let dir = parsed
                .to_file_path()
                .map_err(|()| anyhow::anyhow!("{url} is not an absolute file:// path"))?;
            if !dir.is_dir() {
                bail!(
                    "directory {} (from {url}) does not exist: create it or fix the URL",
                    dir.display()
                );
            }
            let store = LocalFileSystem::new_with_prefix(&dir)
                .with_context(|| format!("open directory {}", dir.display()))?
                .with_automatic_cleanup(true);
            Ok((Arc::new(store), Path::default()))
        }
        "memory" => Ok((Arc::new(InMemory::new()), prefix()?)),
        "s3" | "s3a" => {
            let bucket = bucket_of(&parsed, url)?;
            let builder = s3_builder(&bucket, s3)?;
            let store = builder
                .build()
                .with_context(|| format!("configure S3 store for {}", redact_url(url)))?;
            Ok((Arc::new(store), prefix()?))
        }
        "gs" => {
            install_crypto_provider();
            let bucket = bucket_of(&parsed, url)?;
            let builder = GoogleCloudStorageBuilder::from_env();
            // GOOGLE_ALLOW_HTTP; the endpoint is https unless a base URL set by the operator,
            // an emulator's say, is not.
            let allow_http =
                builder.get_config_value(&GoogleConfigKey::Client(ClientConfigKey::AllowHttp));
            let store = builder
                .with_bucket_name(bucket)
                .with_retry(retry_config(s3))
                .with_client_options(client_options_keeping_http(s3, allow_http))
                .build()
                .with_context(|| {
                    format!(
                        "configure Google Cloud Storage for {}: set GOOGLE_SERVICE_ACCOUNT \
                         or GOOGLE_APPLICATION_CREDENTIALS",
                        redact_url(url)
                    )
                })?;
            Ok((Arc::new(store), prefix()?))
        }
        "az" | "azure" => {
            install_crypto_provider();
            let container = bucket_of(&parsed, url)?;
            let builder = MicrosoftAzureBuilder::from_env();
            // AZURE_ALLOW_HTTP (the emulator, AZURE_STORAGE_USE_EMULATOR, allows http by
            // itself).
            let allow_http =
                builder.get_config_value(&AzureConfigKey::Client(ClientConfigKey::AllowHttp));
            let store = builder
                .with_container_name(container)
                .with_retry(retry_config(s3))
                .with_client_options(client_options_keeping_http(s3, allow_http))
                .build()
                .with_context(|| {
                    format!(
                        "configure Azure Blob Storage for {}: set AZURE_STORAGE_ACCOUNT_NAME \
                         and a credential (AZURE_STORAGE_ACCOUNT_KEY, a SAS or a service principal)",
                        redact_url(url)
                    )
                })?;
            Ok((Arc::new(store), prefix()?))
        }
        other => bail!(
            "store URL {} has unsupported scheme `{other}`: use file://, s3://, gs:// or az://",
            redact_url(url)
        ),
    }
}

/// reqwest/rustls need a process-wide crypto provider; we use ring only (no cmake).
pub(crate) fn install_crypto_provider() {
    // Err means another provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn bucket_of(parsed: &url::Url, url: &str) -> Result<String> {
    match parsed.host_str() {
        Some(host) if !host.is_empty() => Ok(host.to_owned()),
        _ => bail!(
            "store URL {} names no bucket: write it as {}://BUCKET/optional/prefix",
            redact_url(url),
            parsed.scheme()
        ),
    }
}

fn env_reference(var: &str, what: &str) -> Result<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => bail!(
            "the S3 {what} is configured to come from environment variable {var}, which is unset \
             or empty: export it (or remove the setting to use the AWS_* defaults)"
        ),
    }
}

fn retry_config(s3: &S3Options) -> RetryConfig {
    RetryConfig {
        max_retries: s3.max_retries.unwrap_or(5),
        retry_timeout: s3.retry_timeout.unwrap_or(Duration::from_secs(60)),
        ..RetryConfig::default()
    }
}

fn client_options(s3: &S3Options) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(s3.connect_timeout.unwrap_or(Duration::from_secs(10)))
        .with_timeout(Duration::from_secs(300))
}

/// Our client options for a builder that read `allow_http` from its environment: they replace
/// the builder's, so its value is kept (false when unset).
fn client_options_keeping_http(s3: &S3Options, allow_http: Option<String>) -> ClientOptions {
    client_options(s3).with_config(
        ClientConfigKey::AllowHttp,
        allow_http.unwrap_or_else(|| "false".into()),
    )
}

/// How often and how patiently one repository or store operation is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 5).
    pub attempts: usize,
    /// First delay; each later delay doubles, with jitter (default 100 ms).
    pub min_delay: Duration,
    /// Largest delay (default 10 s).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// A store answered with this HTTP status. Store wrappers (fault injection, proxies) return it
/// inside `object_store::Error::Generic` so [`is_transient`] can classify their failures.
#[derive(Debug, thiserror::Error)]
#[error("the store answered HTTP {0}")]
pub struct HttpStatus(pub u16);

/// Whether an error is worth retrying: HTTP 5xx or 429, a connection that failed or timed out.
/// Not found, permission denied, bad credentials and checksum mismatches are permanent.
pub fn is_transient(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        if let Some(status) = cause.downcast_ref::<HttpStatus>() {
            return status_is_transient(status.0);
        }
        if let Some(http) = cause.downcast_ref::<HttpError>() {
            return matches!(
                http.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            );
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        // object_store's RetryError is not nameable outside the crate; its message carries the
        // status: "Server returned non-2xx status code: 503 Service Unavailable: ...".
        let text = cause.to_string();
        text.split("status code: ")
            .nth(1)
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .is_some_and(status_is_transient)
    })
}

/// 429 and 5xx, except the answers that say the request can never work: 501 Not Implemented
/// (a store or emulator without the operation) and 505 HTTP Version Not Supported.
fn status_is_transient(status: u16) -> bool {
    status == 429 || ((500..600).contains(&status) && status != 501 && status != 505)
}

/// Runs `op` until it succeeds, fails permanently, or runs out of attempts.
pub(crate) async fn retry<T, F, Fut>(policy: &RetryPolicy, what: &str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.attempts.saturating_sub(1))
        .with_jitter();
    op.retry(backoff)
        .when(is_transient)
        .notify(|e: &anyhow::Error, delay: Duration| {
            tracing::warn!(what, ?delay, "transient store error, retrying: {e:#}");
        })
        .await
}

/// The directory a `file://` URL names (None for any other store): where file modes are read
/// and given back.
pub fn local_dir(url: &str) -> Option<std::path::PathBuf> {
    let parsed = url::Url::parse(url).ok()?;
    (parsed.scheme() == "file")
        .then(|| parsed.to_file_path().ok())
        .flatten()
}

/// A multipart upload hashed as it goes: a streamed body (a dump, a base backup) and the size
/// and sha256 the repository records of it, with no local copy.
pub(crate) struct HashedUpload {
    writer: object_store::WriteMultipart,
    hasher: sha2::Sha256,
    size: u64,
}

impl HashedUpload {
    /// Starts uploading `key` (retried like every repository request) in parts of `part`
    /// bytes (at least 5 MiB, S3's smallest).
    pub(crate) async fn start(
        repo: &crate::repo::Repository,
        key: &object_store::path::Path,
        part: usize,
    ) -> anyhow::Result<HashedUpload> {
        use anyhow::Context;
        use object_store::ObjectStoreExt;
        use sha2::Digest;
        let upload = retry(&repo.options.retry, "start an upload", || async {
            repo.store
                .put_multipart(key)
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        .with_context(|| format!("start uploading {key} to repository {}", repo.label))?;
        Ok(HashedUpload {
            writer: object_store::WriteMultipart::new_with_chunk_size(upload, part.max(5 << 20)),
            hasher: sha2::Sha256::new(),
            size: 0,
        })
    }

    /// Adds a chunk, waiting while too many parts are in flight.
    pub(crate) async fn put(&mut self, chunk: bytes::Bytes) -> object_store::Result<()> {
        use sha2::Digest;
        self.hasher.update(&chunk);
        self.size += chunk.len() as u64;
        self.writer.wait_for_capacity(4).await?;
        self.writer.put(chunk);
        Ok(())
    }

    /// Completes the upload; returns the body's size and sha256.
    pub(crate) async fn finish(
        self,
        key: &object_store::path::Path,
    ) -> anyhow::Result<(u64, String)> {
        use anyhow::Context;
        use sha2::Digest;
        self.writer
            .finish()
            .await
            .with_context(|| format!("complete the upload of {key}"))?;
        Ok((self.size, hex::encode(self.hasher.finalize())))
    }

    /// Gives the upload up: an aborted multipart upload never becomes an object.
    pub(crate) async fn abort(self) {
        let _ = self.writer.abort().await;
    }
}

/// The builder `store_from_url` configures for an `s3://` URL's bucket (the same options and
/// credentials), for code that needs what object_store's trait does not offer: object
/// versions ([`crate::versions`]).
pub(crate) fn s3_builder(bucket: &str, s3: &S3Options) -> Result<AmazonS3Builder> {
    install_crypto_provider();
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry_config(s3))
        .with_client_options(client_options(s3));
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let allow_http = s3.allow_http.unwrap_or_else(|| {
        s3.endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
    });
    builder = builder.with_allow_http(allow_http);
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    }
    if s3.path_style {
        builder = builder.with_virtual_hosted_style_request(false);
    }
    if let Some(var) = &s3.access_key_id_env {
        builder = builder.with_access_key_id(env_reference(var, "access key id")?);
    }
    if let Some(var) = &s3.secret_access_key_env {
        builder = builder.with_secret_access_key(env_reference(var, "secret access key")?);
    }
    if let Some(var) = &s3.session_token_env {
        builder = builder.with_token(env_reference(var, "session token")?);
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_transient_errors() {
        let generic = |source: Box<dyn std::error::Error + Send + Sync>| {
            anyhow::Error::new(object_store::Error::Generic {
                store: "test",
                source,
            })
        };
        assert!(is_transient(&generic(Box::new(HttpStatus(503)))));
        assert!(is_transient(&generic(Box::new(HttpStatus(429)))));
        assert!(!is_transient(&generic(Box::new(HttpStatus(404)))));
        assert!(!is_transient(&generic(Box::new(HttpStatus(403)))));
        assert!(!is_transient(&generic(Box::new(HttpStatus(501)))));
        let text: Box<dyn std::error::Error + Send + Sync> =
            "Server returned non-2xx status code: 502 Bad Gateway: <xml/>".into();
        assert!(is_transient(&generic(text)));
        let not_found = anyhow::Error::new(object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        });
        assert!(!is_transient(&not_found));
        let reset = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_transient(&reset.context("get object")));
    }

    #[test]
    fn rejects_unknown_schemes_and_missing_dirs() {
        let err =
            store_from_url("ftp://host/x", &S3Options::default()).expect_err("ftp is refused");
        assert!(
            err.to_string().contains("unsupported scheme `ftp`"),
            "{err}"
        );
        let err = store_from_url("file:///does/not/exist/rollcall", &S3Options::default())
            .expect_err("missing dir is refused");
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = store_from_url("s3:///prefix", &S3Options::default())
            .expect_err("bucketless URL is refused");
        assert!(format!("{err:#}").contains("names no bucket"), "{err:#}");
    }
}
