//! The repository handle: an object store plus the rules for reading and writing the small JSON
//! documents (points, manifests, locks) that describe what the store holds.
//!
//! Every document is an envelope `{"format": ..., "sha256": ..., "body": {...}}` whose digest
//! covers the exact bytes of `body`, so a truncated or edited file is reported as damaged
//! instead of being half-read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::cipher::{CONFIG_KEY, DataKey, KEY_VARS, RepositoryConfig, RepositoryKey};
use crate::redact::redact_url;
use crate::store::{RetryPolicy, S3Options, retry, store_from_url};

/// Errors a caller may want to branch on. Everything else is an `anyhow::Error` with context.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{what} {key} does not exist in repository {repo}: {hint}")]
    NotFound {
        what: &'static str,
        key: String,
        repo: String,
        hint: &'static str,
    },
    #[error(
        "{what} {key} in repository {repo} is damaged ({reason}): do not restore from it; \
         restore the file from a copy of the repository or take a new backup"
    )]
    Damaged {
        what: &'static str,
        key: String,
        repo: String,
        reason: String,
    },
    #[error(
        "repository {repo} is locked by {holder}: wait for it to finish (a lock left by a killed \
         process expires at {expires_at})"
    )]
    Busy {
        repo: String,
        holder: String,
        expires_at: String,
    },
}

/// How a repository is opened and how patiently it is used.
#[derive(Debug, Clone)]
pub struct RepositoryOptions {
    /// Connection settings for `s3://` repositories.
    pub s3: S3Options,
    /// Create the directory of a `file://` repository when it is missing (default true).
    pub create: bool,
    /// Make a `file://` repository durable at each commit point (default true: a backup that a
    /// power cut can lose is not a backup). Blobs and dumps are flushed to disk before the
    /// manifest or point naming them is written, and that file before the operation returns.
    pub fsync: bool,
    /// Retries of one store operation on transient errors.
    pub retry: RetryPolicy,
    /// How long a lock lives without being refreshed (default 5 min). A killed process's lock
    /// stops blocking others after this long.
    pub lock_ttl: Duration,
    /// How long to wait for a conflicting lock to go away (default 2 min).
    pub lock_wait: Duration,
    /// The key of an encrypted repository; `None` reads it, when the repository is encrypted,
    /// from `ROLLCALL_REPOSITORY_KEY`, `ROLLCALL_REPOSITORY_KEY_FILE` or (run)
    /// `ROLLCALL_REPOSITORY_KEY_COMMAND`, the first one set.
    pub key: Option<RepositoryKey>,
}

impl Default for RepositoryOptions {
    fn default() -> Self {
        RepositoryOptions {
            s3: S3Options::default(),
            create: true,
            fsync: true,
            retry: RetryPolicy::default(),
            lock_ttl: Duration::from_secs(300),
            lock_wait: Duration::from_secs(120),
            key: None,
        }
    }
}

/// A backup repository. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Repository {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) label: Arc<str>,
    pub(crate) options: RepositoryOptions,
    /// The directory of a `file://` repository whose durability we manage with syncfs.
    durable_root: Option<std::path::PathBuf>,
    /// An encrypted repository's data key (`store` then seals everything) and its key's id.
    data_key: Option<(Arc<DataKey>, String)>,
}

impl Repository {
    /// Opens the repository at `url` (`file:///dir`, `s3://bucket/prefix`, `gs://...`,
    /// `az://...`) and checks that it answers.
    ///
    /// A repository whose config object says it is encrypted is opened with its key
    /// ([`RepositoryOptions::key`], else the environment): everything then read and written
    /// through it is sealed. Without the key, or with another, opening fails with one line.
    pub async fn open(url: &str, options: RepositoryOptions) -> Result<Repository> {
        Repository::open_raw(url, options).await?.configure().await
    }

    /// The repository at `url` as stored, its config object not applied (`repo init`, key
    /// rotation).
    async fn open_raw(url: &str, options: RepositoryOptions) -> Result<Repository> {
        let label = redact_url(url);
        let mut durable_root = None;
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = if url.starts_with("file:") {
            let dir = crate::store::local_dir(url).with_context(|| {
                format!("repository URL {label} is not an absolute file:// path")
            })?;
            if options.create {
                std::fs::create_dir_all(&dir).with_context(|| {
                    format!(
                        "create repository directory {}: check the path and its permissions",
                        dir.display()
                    )
                })?;
            } else if !dir.is_dir() {
                bail!(
                    "repository directory {} does not exist: create it or fix the URL",
                    dir.display()
                );
            }
            // On Linux one syncfs per commit point replaces an fsync per file (far fewer
            // journal commits for thousands of small blobs); elsewhere fsync every file.
            let per_file_fsync = options.fsync && !cfg!(target_os = "linux");
            let store = LocalFileSystem::new_with_prefix(&dir)
                .with_context(|| format!("open repository directory {}", dir.display()))?
                .with_automatic_cleanup(true)
                .with_fsync(per_file_fsync);
            if options.fsync && cfg!(target_os = "linux") {
                durable_root = Some(dir.clone());
            }
            (Arc::new(store), Path::default())
        } else {
            store_from_url(url, &options.s3).with_context(|| format!("open repository {label}"))?
        };
        let store: Arc<dyn ObjectStore> = if prefix.is_root() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        let repo = Repository {
            store,
            label: label.into(),
            options,
            durable_root,
            data_key: None,
        };
        repo.check_reachable().await?;
        Ok(repo)
    }

    /// [`Repository::from_store`], with the store's config object applied (an encrypted
    /// repository is opened with its key, as [`Repository::open`] does).
    pub async fn from_store_configured(
        store: Arc<dyn ObjectStore>,
        label: impl Into<String>,
        options: RepositoryOptions,
    ) -> Result<Repository> {
        Repository::from_store(store, label, options)
            .configure()
            .await
    }

    /// The config object, if the repository has one.
    async fn read_config(&self) -> Result<Option<(RepositoryConfig, Option<String>)>> {
        let Some((bytes, etag)) = self.read_config_bytes().await? else {
            return Ok(None);
        };
        Ok(Some((
            RepositoryConfig::from_bytes(&bytes, &self.label)?,
            etag,
        )))
    }

    /// The config object's bytes and etag, if the repository has one.
    async fn read_config_bytes(&self) -> Result<Option<(Bytes, Option<String>)>> {
        let key = Path::from(CONFIG_KEY);
        let what = format!("read {CONFIG_KEY} from repository {}", self.label);
        // Every open reads it, so a transient store error is retried like any other read.
        let got = crate::store::retry(&self.options.retry, &what, || async {
            let got = match self.store.get(&key).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(anyhow::Error::new(e).context(what.clone())),
            };
            let etag = got.meta.e_tag.clone();
            let bytes = got.bytes().await.with_context(|| what.clone())?;
            Ok(Some((bytes, etag)))
        })
        .await?;
        Ok(got)
    }

    /// Applies the config object: an encrypted repository gets its sealing store.
    async fn configure(mut self) -> Result<Repository> {
        let config = self.read_config().await?;
        let has_config = config.is_some();
        let Some(encryption) = config.and_then(|(c, _)| c.encryption) else {
            // A process that holds a repository key expects an encrypted repository: one that
            // reads as plaintext had its config object deleted or replaced, and writing to it
            // (or trusting what is in it) would silently undo the encryption.
            // The variables are looked at, not read: a key command is not run for this.
            let key_source = match &self.options.key {
                Some(_) => Some("a repository key was given".to_owned()),
                None => [KEY_VARS.value, KEY_VARS.file, KEY_VARS.command]
                    .into_iter()
                    .find(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
                    .map(|var| format!("environment variable {var} is set")),
            };
            if let Some(source) = key_source {
                bail!(
                    "repository {} reads as not encrypted ({}), but {source}: if it was \
                     encrypted, its config object was deleted or replaced, so restore \
                     {CONFIG_KEY} from a copy and write nothing to it until then; if it is a \
                     plaintext repository, unset {} for this process",
                    self.label,
                    if has_config {
                        format!("its {CONFIG_KEY} says plaintext")
                    } else {
                        format!("it has no {CONFIG_KEY}")
                    },
                    KEY_VARS.names()
                );
            }
            return Ok(self);
        };
        let (kek, source) = match &self.options.key {
            Some(key) => (key.clone(), "the key given".to_owned()),
            // A key command may take a while (a KMS round trip): off the async workers.
            None => match tokio::task::spawn_blocking(|| RepositoryKey::from_env(&KEY_VARS))
                .await
                .context("read the repository key")?
                .with_context(|| format!("open encrypted repository {}", self.label))?
            {
                Some(found) => found,
                None => bail!(
                    "repository {} is encrypted (key {}): set {} (its 32-byte key in base64), {} \
                     (a file holding it) or {} (a command printing it) in this process's \
                     environment",
                    self.label,
                    encryption.key_id,
                    KEY_VARS.value,
                    KEY_VARS.file,
                    KEY_VARS.command
                ),
            },
        };
        let data = Arc::new(encryption.unwrap_key(&kek, &self.label, &source)?);
        self.store = Arc::new(crate::sealed::SealedStore::new(
            self.store.clone(),
            data.clone(),
            self.label.clone(),
        ));
        self.data_key = Some((data, encryption.key_id));
        Ok(self)
    }

    /// Writes the repository's config object (`rollcall repo init`): plaintext, or, with `key`,
    /// encrypted under a fresh data key that `key` wraps. Refuses a repository that already
    /// has a config object or holds anything.
    pub async fn init(
        url: &str,
        options: RepositoryOptions,
        key: Option<&RepositoryKey>,
    ) -> Result<RepositoryConfig> {
        Repository::open_raw(url, options)
            .await?
            .init_here(key)
            .await
    }

    /// [`Repository::init`] of a store the caller built (see [`Repository::from_store`]).
    pub async fn init_store(
        store: Arc<dyn ObjectStore>,
        label: impl Into<String>,
        options: RepositoryOptions,
        key: Option<&RepositoryKey>,
    ) -> Result<RepositoryConfig> {
        Repository::from_store(store, label, options)
            .init_here(key)
            .await
    }

    async fn init_here(self, key: Option<&RepositoryKey>) -> Result<RepositoryConfig> {
        let repo = self;
        if let Some((config, _)) = repo.read_config().await? {
            bail!(
                "repository {} is already initialised ({}): nothing was changed",
                repo.label,
                match &config.encryption {
                    Some(e) => format!("encrypted with key {}", e.key_id),
                    None => "not encrypted".to_owned(),
                }
            );
        }
        let listed = repo
            .store
            .list_with_delimiter(None)
            .await
            .with_context(|| format!("list repository {}", repo.label))?;
        let held: Vec<String> = listed
            .common_prefixes
            .iter()
            .map(|p| format!("{p}/"))
            .chain(listed.objects.iter().map(|m| m.location.to_string()))
            .take(3)
            .collect();
        if !held.is_empty() {
            bail!(
                "repository {} already holds data ({}): a repository is initialised (and \
                 encrypted) before anything is written to it; init an empty location instead",
                repo.label,
                held.join(", ")
            );
        }
        let config = match key {
            Some(key) => RepositoryConfig::encrypted(key)?,
            None => RepositoryConfig::plain(),
        };
        repo.put_config(&config, None).await?;
        repo.make_durable().await?;
        Ok(config)
    }

    /// Rewraps an encrypted repository's data key from `old` to `new` (`rollcall repo key
    /// rotate`); no data is rewritten. Returns the new config.
    pub async fn rotate_key(
        url: &str,
        options: RepositoryOptions,
        old: &RepositoryKey,
        new: &RepositoryKey,
    ) -> Result<RepositoryConfig> {
        Repository::open_raw(url, options)
            .await?
            .rotate_here(old, new)
            .await
    }

    /// [`Repository::rotate_key`] of a store the caller built (see [`Repository::from_store`]).
    pub async fn rotate_key_store(
        store: Arc<dyn ObjectStore>,
        label: impl Into<String>,
        options: RepositoryOptions,
        old: &RepositoryKey,
        new: &RepositoryKey,
    ) -> Result<RepositoryConfig> {
        Repository::from_store(store, label, options)
            .rotate_here(old, new)
            .await
    }

    async fn rotate_here(
        self,
        old: &RepositoryKey,
        new: &RepositoryKey,
    ) -> Result<RepositoryConfig> {
        let repo = self;
        let Some((mut config, etag)) = repo.read_config().await? else {
            bail!(
                "repository {} has no config object, so it is not encrypted: nothing to rotate",
                repo.label
            );
        };
        let Some(encryption) = &config.encryption else {
            bail!(
                "repository {} is not encrypted: nothing to rotate",
                repo.label
            );
        };
        config.encryption = Some(encryption.rewrap(old, new, &repo.label)?);
        repo.put_config(&config, Some(etag)).await?;
        repo.make_durable().await?;
        Ok(config)
    }

    /// Writes the config object: create-only, or (`replacing`) only over the version read.
    /// Transient failures are retried; a conflict whose winner is exactly what we wrote (the
    /// answer to an earlier attempt was lost, the write itself was not) is success.
    async fn put_config(
        &self,
        config: &RepositoryConfig,
        replacing: Option<Option<String>>,
    ) -> Result<()> {
        use object_store::{PutMode, UpdateVersion};
        let key = Path::from(CONFIG_KEY);
        let bytes = Bytes::from(config.to_bytes()?);
        let payload = PutPayload::from_bytes(bytes.clone());
        let mode = match &replacing {
            None => PutMode::Create,
            Some(e_tag) => PutMode::Update(UpdateVersion {
                e_tag: e_tag.clone(),
                version: None,
            }),
        };
        let what = format!("write {CONFIG_KEY} to repository {}", self.label);
        let written = retry(&self.options.retry, &what, || async {
            self.store
                .put_opts(&key, payload.clone(), mode.clone().into())
                .await
                .map_err(anyhow::Error::from)
        })
        .await;
        let err = match written {
            Ok(_) => return Ok(()),
            Err(e) => match e.downcast::<object_store::Error>() {
                Ok(err) => err,
                Err(e) => return Err(e.context(what)),
            },
        };
        let conflict = matches!(
            err,
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
        );
        if conflict
            && let Some((now, _)) = self.read_config_bytes().await?
            && now == bytes
        {
            tracing::info!(
                repository = %self.label,
                "{CONFIG_KEY} already holds what this write put there (an earlier attempt \
                 succeeded and its answer was lost)"
            );
            return Ok(());
        }
        match err {
            object_store::Error::AlreadyExists { .. } => bail!(
                "repository {} was initialised by someone else meanwhile: nothing was changed",
                self.label
            ),
            object_store::Error::Precondition { .. } => bail!(
                "the config object of repository {} changed while the key was rotated: run the \
                 rotation again",
                self.label
            ),
            // Stores without conditional writes (a local directory for updates).
            object_store::Error::NotImplemented { .. }
            | object_store::Error::NotSupported { .. }
                if replacing.is_some() =>
            {
                retry(&self.options.retry, &what, || async {
                    self.store
                        .put(&key, payload.clone())
                        .await
                        .map_err(anyhow::Error::from)
                })
                .await
                .map(|_| ())
                .with_context(|| what.clone())
            }
            e => Err(anyhow::Error::new(e).context(what)),
        }
    }

    /// Whether the repository is encrypted, and with which key (its id).
    pub fn encryption_key_id(&self) -> Option<&str> {
        self.data_key.as_ref().map(|(_, id)| id.as_str())
    }

    /// The id a blob whose content has `sha256` is stored under: the sha256 itself, or in an
    /// encrypted repository its keyed hash. Every reader, writer and pruner of blobs maps
    /// through this one function.
    pub(crate) fn blob_id(&self, sha256: &str) -> String {
        match &self.data_key {
            Some((key, _)) => key.blob_id(sha256),
            None => sha256.to_owned(),
        }
    }

    /// Where a quarantine in the repository keeps the live object `key` (relative to the
    /// restore's prefix): `<quarantine>/<key>`, or in an encrypted repository
    /// `<quarantine>/<keyed hash of key>`, so no name in the repository lists the live store's
    /// keys. Restores write and undos read through this one function.
    /// Where a quarantine may hold `key`'s copy, newest naming first: an encrypted repository's
    /// keyed name, then the plain name quarantines of encrypted repositories had before keyed
    /// names (an undo of such a restore must still find what it kept).
    pub(crate) fn quarantine_entries(&self, quarantine: &Path, key: &str) -> Result<Vec<Path>> {
        let mut at = vec![self.quarantine_entry(quarantine, key)?];
        if self.data_key.is_some() {
            at.push(crate::restore::join(quarantine, key)?);
        }
        Ok(at)
    }

    pub(crate) fn quarantine_entry(&self, quarantine: &Path, key: &str) -> Result<Path> {
        match &self.data_key {
            Some((data, _)) => Ok(quarantine.clone().join(data.quarantine_name(key))),
            None => crate::restore::join(quarantine, key),
        }
    }

    /// Where the blob whose content has `sha256` is stored.
    pub(crate) fn blob_key(&self, sha256: &str) -> Path {
        crate::layout::blob_path(&self.blob_id(sha256))
    }

    /// A repository over a store the caller built (tests, request-counting wrappers, stores
    /// with custom credentials). `label` names it in messages; it must hold no secret.
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        label: impl Into<String>,
        options: RepositoryOptions,
    ) -> Repository {
        Repository {
            store,
            label: label.into().into(),
            options,
            durable_root: None,
            data_key: None,
        }
    }

    /// Flushes everything written so far to disk (a `file://` repository with `fsync`); a
    /// no-op for object stores, whose writes are durable when acknowledged.
    pub(crate) async fn make_durable(&self) -> Result<()> {
        let Some(root) = self.durable_root.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || sync_filesystem(&root))
            .await
            .context("flush the repository to disk")?
    }

    /// Flushes a `file://` repository to disk in the background while a long copy runs,
    /// each time `written()` has grown by [`FLUSH_EVERY`] bytes, so the disk works while the
    /// copy hashes and writes and the final [`Repository::make_durable`] finds little left.
    /// `None` when there is nothing to flush (object stores, fsync off).
    pub(crate) fn background_flusher(
        &self,
        written: impl Fn() -> u64 + Send + 'static,
    ) -> Option<Flusher> {
        let root = self.durable_root.clone()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let flushes = Arc::new(AtomicU64::new(0));
        let started = flushes.clone();
        let task = tokio::spawn(async move {
            let mut flushed = 0u64;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tick.tick() => {}
                }
                let now = written();
                if now < flushed + FLUSH_EVERY {
                    continue;
                }
                flushed = now;
                started.fetch_add(1, Ordering::Relaxed);
                let root = root.clone();
                // Best effort: the commit's own make_durable reports a failure.
                if let Ok(Err(e)) =
                    tokio::task::spawn_blocking(move || sync_filesystem(&root)).await
                {
                    tracing::debug!("background flush: {e:#}");
                }
            }
        });
        Some(Flusher {
            stop,
            task,
            flushes,
        })
    }

    /// The repository's URL with credentials removed.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn options(&self) -> &RepositoryOptions {
        &self.options
    }

    /// One cheap listing: proves the endpoint answers, the bucket exists and the credentials
    /// are accepted.
    pub async fn check_reachable(&self) -> Result<()> {
        let result = retry(&self.options.retry, "list repository root", || async {
            self.store
                .list_with_delimiter(None)
                .await
                .map_err(anyhow::Error::from)
        })
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(self.explain_unreachable(e)),
        }
    }

    fn explain_unreachable(&self, e: anyhow::Error) -> anyhow::Error {
        let hint = match e.downcast_ref::<object_store::Error>() {
            Some(object_store::Error::PermissionDenied { .. })
            | Some(object_store::Error::Unauthenticated { .. }) => {
                "the credentials were refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY \
                 (or the configured credential variables) and the bucket policy"
            }
            Some(object_store::Error::NotFound { .. }) => {
                "the bucket or container does not exist: create it or fix the URL"
            }
            _ => {
                "check the URL, the endpoint, the network path to it and the credentials \
                 (`rollcall repo verify --repo URL` retries the same check)"
            }
        };
        e.context(format!("repository {} is unreachable: {hint}", self.label))
    }

    /// Writes a document envelope. Returns the sha256 and size of the bytes written.
    pub(crate) async fn put_document<T: Serialize>(
        &self,
        key: &Path,
        format: &str,
        body: &T,
    ) -> Result<(String, u64)> {
        let bytes = encode_document(format, body)?;
        let sha = hex::encode(Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        let payload = Bytes::from(bytes);
        retry(&self.options.retry, "write document", || async {
            self.store
                .put(key, PutPayload::from_bytes(payload.clone()))
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        .with_context(|| format!("write {key} to repository {}", self.label))?;
        Ok((sha, size))
    }

    /// Reads and checks a document envelope. Returns the body, and the sha256 and size of the
    /// file. A missing file is [`RepoError::NotFound`]; a bad one is [`RepoError::Damaged`].
    pub(crate) async fn get_document<T: DeserializeOwned>(
        &self,
        key: &Path,
        format: &str,
        what: &'static str,
    ) -> Result<(T, String, u64)> {
        let bytes = self.get_bytes(key, what).await?;
        let sha = hex::encode(Sha256::digest(&bytes));
        let body = decode_document(&bytes, format).map_err(|reason| RepoError::Damaged {
            what,
            key: key.to_string(),
            repo: self.label.to_string(),
            reason,
        })?;
        Ok((body, sha, bytes.len() as u64))
    }

    /// The whole body of a (small) object; [`RepoError::NotFound`] when missing.
    pub(crate) async fn get_bytes(&self, key: &Path, what: &'static str) -> Result<Bytes> {
        let result = retry(&self.options.retry, "read object", || async {
            let got = self.store.get(key).await?;
            got.bytes().await.map_err(anyhow::Error::from)
        })
        .await;
        match result {
            Ok(bytes) => Ok(bytes),
            Err(e) => Err(self.read_failure(what, key, e)),
        }
    }

    /// What a failed read of `key` is: [`RepoError::NotFound`] when it is missing,
    /// [`RepoError::Damaged`] when it is an encrypted repository's object that does not open
    /// (changed, cut short, or stored under another name), else the store's error.
    pub(crate) fn read_failure(
        &self,
        what: &'static str,
        key: &Path,
        e: anyhow::Error,
    ) -> anyhow::Error {
        if is_not_found(&e) {
            return RepoError::NotFound {
                what,
                key: key.to_string(),
                repo: self.label.to_string(),
                hint: not_found_hint(what),
            }
            .into();
        }
        if let Some(broken) = crate::sealed::broken_seal(&e) {
            return self.damaged(what, key, unsealed_reason(broken)).into();
        }
        e.context(format!("read {key} from repository {}", self.label))
    }

    pub(crate) fn damaged(&self, what: &'static str, key: &Path, reason: String) -> RepoError {
        RepoError::Damaged {
            what,
            key: key.to_string(),
            repo: self.label.to_string(),
            reason,
        }
    }
}

/// The `Damaged` reason of an object that does not open.
pub(crate) fn unsealed_reason(broken: &crate::sealed::BrokenSeal) -> String {
    format!(
        "it does not open with the repository's data key: {}; it was modified, cut short or \
         stored under another object's name",
        broken.reason
    )
}

/// Bytes a copy writes between two background flushes.
pub(crate) const FLUSH_EVERY: u64 = 32 << 20;

/// A running [`Repository::background_flusher`]; [`Flusher::stop`] ends it.
pub(crate) struct Flusher {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    flushes: Arc<AtomicU64>,
}

impl Flusher {
    /// Flushes started so far.
    #[cfg(test)]
    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Stops flushing, after a flush under way has finished; returns how many it started.
    pub(crate) async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(target_os = "linux")]
fn sync_filesystem(root: &std::path::Path) -> Result<()> {
    let dir = std::fs::File::open(root)
        .with_context(|| format!("open repository directory {}", root.display()))?;
    nix::unistd::syncfs(&dir).with_context(|| {
        format!(
            "flush repository directory {} to disk: check the disk and its free space",
            root.display()
        )
    })
}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem(_root: &std::path::Path) -> Result<()> {
    Ok(()) // every file was fsync'd as it was written
}

/// Whether an error means "no such object", from the store or from us.
pub(crate) fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<object_store::Error>(),
        Some(object_store::Error::NotFound { .. })
    ) || matches!(
        e.downcast_ref::<RepoError>(),
        Some(RepoError::NotFound { .. })
    )
}

fn not_found_hint(what: &str) -> &'static str {
    match what {
        "recovery point" => "check the id; `rollcall points` lists the points",
        "object snapshot manifest" => {
            "check the snapshot id; a snapshot whose manifest is missing did not complete"
        }
        _ => "the repository is incomplete; verify it with `rollcall repo verify`",
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    format: &'a str,
    sha256: String,
    body: &'a RawValue,
}

#[derive(serde::Deserialize)]
struct EnvelopeIn<'a> {
    format: String,
    sha256: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

pub(crate) fn encode_document<T: Serialize>(format: &str, body: &T) -> Result<Vec<u8>> {
    let body = serde_json::to_string(body).context("encode document")?;
    let sha256 = hex::encode(Sha256::digest(body.as_bytes()));
    let raw = RawValue::from_string(body).context("encode document")?;
    let mut out = serde_json::to_vec(&EnvelopeOut {
        format,
        sha256,
        body: &raw,
    })
    .context("encode document")?;
    out.push(b'\n');
    Ok(out)
}

/// Checks the envelope and decodes the body. The error is a reason phrase for `Damaged`.
pub(crate) fn decode_document<T: DeserializeOwned>(
    bytes: &[u8],
    format: &str,
) -> std::result::Result<T, String> {
    let envelope: EnvelopeIn<'_> = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_eof() {
            format!("the file is truncated ({} bytes)", bytes.len())
        } else {
            format!("the file is not a valid document: {e}")
        }
    })?;
    if envelope.format != format {
        return Err(format!(
            "format is {:?}, this rollcall reads {format:?} (written by a different version?)",
            envelope.format
        ));
    }
    let actual = hex::encode(Sha256::digest(envelope.body.get().as_bytes()));
    if actual != envelope.sha256 {
        return Err(format!(
            "its content does not match its recorded sha256 (recorded {}, actual {actual}): it \
             was modified or corrupted after it was written",
            envelope.sha256
        ));
    }
    serde_json::from_str(envelope.body.get())
        .map_err(|e| format!("its content does not have the expected shape: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Doc {
        name: String,
        n: u64,
    }

    #[test]
    fn documents_round_trip_and_detect_damage() {
        let doc = Doc {
            name: "a\"b".into(),
            n: 7,
        };
        let bytes = encode_document("test.v1", &doc).expect("encode");
        assert_eq!(decode_document::<Doc>(&bytes, "test.v1"), Ok(doc));

        let truncated = &bytes[..bytes.len() / 2];
        let err = decode_document::<Doc>(truncated, "test.v1").expect_err("truncated");
        assert!(err.contains("truncated"), "{err}");

        let text = String::from_utf8(bytes.clone()).expect("utf8");
        let tampered = text.replace("\"n\":7", "\"n\":8");
        let err = decode_document::<Doc>(tampered.as_bytes(), "test.v1").expect_err("tampered");
        assert!(err.contains("does not match its recorded sha256"), "{err}");

        let err = decode_document::<Doc>(&bytes, "test.v2").expect_err("format");
        assert!(err.contains("format is"), "{err}");
    }

    /// A store that carries out the first `lose` writes of the config object but answers
    /// each with a 503, as if the answer were lost on the way back.
    #[derive(Debug)]
    struct LostAnswers {
        inner: Arc<dyn ObjectStore>,
        lose: std::sync::atomic::AtomicUsize,
    }

    impl std::fmt::Display for LostAnswers {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "LostAnswers({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for LostAnswers {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let done = self.inner.put_opts(location, payload, opts).await?;
            if location.as_ref() == CONFIG_KEY
                && self
                    .lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(object_store::Error::Generic {
                    store: "LostAnswers",
                    source: Box::new(crate::store::HttpStatus(503)),
                });
            }
            Ok(done)
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[tokio::test]
    async fn a_config_write_whose_answer_was_lost_is_not_reported_as_a_conflict() {
        let raw: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let store: Arc<dyn ObjectStore> = Arc::new(LostAnswers {
            inner: raw.clone(),
            lose: 1.into(),
        });
        let options = RepositoryOptions {
            retry: RetryPolicy {
                attempts: 3,
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
            },
            ..RepositoryOptions::default()
        };
        let key = RepositoryKey::generate().expect("key");
        // init: the create happened, its answer was lost, the retry meets our own object.
        let config =
            Repository::init_store(store.clone(), "memory://t", options.clone(), Some(&key))
                .await
                .expect("init despite the lost answer");
        let stored = raw
            .get(&Path::from(CONFIG_KEY))
            .await
            .expect("config")
            .bytes()
            .await
            .expect("bytes");
        assert_eq!(
            stored.as_ref(),
            config.to_bytes().expect("encode").as_slice()
        );

        // rotate: the conditional update happened, its answer was lost; the retry's
        // precondition fails against our own write, which is success.
        let store: Arc<dyn ObjectStore> = Arc::new(LostAnswers {
            inner: raw.clone(),
            lose: 1.into(),
        });
        let new = RepositoryKey::generate().expect("key");
        let rotated =
            Repository::rotate_key_store(store.clone(), "memory://t", options.clone(), &key, &new)
                .await
                .expect("rotate despite the lost answer");
        assert_eq!(
            rotated.encryption.as_ref().map(|e| e.key_id.clone()),
            Some(new.id())
        );
        let reopened = Repository::from_store_configured(
            raw.clone(),
            "memory://t",
            RepositoryOptions {
                key: Some(new.clone()),
                ..options.clone()
            },
        )
        .await
        .expect("opens with the new key");
        assert_eq!(reopened.encryption_key_id(), Some(new.id().as_str()));

        // A real conflict is still one: someone else's rotation in between.
        let third = RepositoryKey::generate().expect("key");
        let err = Repository::init_store(raw.clone(), "memory://t", options.clone(), Some(&third))
            .await
            .expect_err("already initialised");
        assert!(
            format!("{err:#}").contains("already initialised"),
            "{err:#}"
        );
        let (current, etag) = Repository::from_store(raw.clone(), "memory://t", options.clone())
            .read_config()
            .await
            .expect("read")
            .expect("config");
        let theirs = current
            .encryption
            .as_ref()
            .expect("encrypted")
            .rewrap(&new, &third, "memory://t")
            .expect("rewrap");
        let mut theirs_config = current.clone();
        theirs_config.encryption = Some(theirs);
        let repo = Repository::from_store(raw.clone(), "memory://t", options.clone());
        let stale = Some(Some("not-the-etag".to_owned()));
        assert!(etag.is_some());
        let err = repo
            .put_config(&theirs_config, stale)
            .await
            .expect_err("a stale etag");
        assert!(
            format!("{err:#}").contains("changed while the key was rotated"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn a_long_copy_is_flushed_as_it_goes_only_where_fsync_is_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let written = Arc::new(AtomicU64::new(0));
        let repo = Repository::open(&url, RepositoryOptions::default())
            .await
            .expect("open");
        let counter = written.clone();
        let flusher = repo
            .background_flusher(move || counter.load(Ordering::Relaxed))
            .expect("a file:// repository with fsync flushes");
        // Below the threshold nothing happens; one step past it, one flush.
        written.store(FLUSH_EVERY - 1, Ordering::Relaxed);
        written.store(3 * FLUSH_EVERY, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while flusher.flushes() == 0 {
            assert!(std::time::Instant::now() < deadline, "no flush within 10 s");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(flusher.stop().await, 1);

        let no_fsync = RepositoryOptions {
            fsync: false,
            ..RepositoryOptions::default()
        };
        let repo = Repository::open(&url, no_fsync).await.expect("open");
        assert!(repo.background_flusher(|| u64::MAX).is_none());
    }
}
