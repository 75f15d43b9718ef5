//! Object snapshots: copy every body of the live store not already in `objects/blobs/`, then
//! write the manifest (key → size, sha256, etag, version).
//!
//! Costs per object: unchanged since the previous snapshot of the same source (same size,
//! etag and modification time, blob present) → no request at all; changed or new → one GET
//! from the source and, if its content is not already a blob, one PUT to the repository (no
//! HEAD: which blobs exist is learnt from one listing at the start). Bodies of
//! `multipart_threshold` bytes or more are streamed in parts to a staging key and renamed to
//! their blob key once their hash is known.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::layout::{
    BLOBS, QUARANTINE_ROOT, SNAPSHOTS, STAGING, SnapshotId, blob_id_of, manifest_key,
};
use crate::lock::LockKind;
use crate::object_key::check_object_key;
use crate::repo::{RepoError, Repository};
use crate::store::retry;

pub(crate) const MANIFEST_FORMAT: &str = "rollcall.manifest.v1";
const MEMORY_UNIT: u64 = 64 << 10;

/// `objects/snapshots/<id>.json`: what the live store held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: SnapshotId,
    pub environment: Option<String>,
    /// The live store, as named by the caller (no credentials).
    pub source: String,
    /// Prefix inside the live store; keys below are relative to it.
    pub source_prefix: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Sorted by key.
    pub objects: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub last_modified: DateTime<Utc>,
    /// The file's permission bits (`0o600`), for a `file://` source; a `file://` restore
    /// gives them back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// Which earlier snapshot may vouch for unchanged objects (saving their GETs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PreviousSnapshot {
    /// The newest snapshot of the same source and prefix (default).
    #[default]
    Auto,
    /// Read and hash every object.
    None,
    Id(SnapshotId),
}

/// What [`snapshot_objects`] does.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Recorded in the manifest; prune uses it for snapshots no point references.
    pub environment: Option<String>,
    /// How the manifest names the live store (a URL without credentials).
    pub source_label: String,
    /// Snapshot only keys under this prefix of the live store.
    pub source_prefix: Option<Path>,
    /// Object copies in flight (default 64).
    pub parallelism: usize,
    /// Bodies at least this large are streamed in parts (default 8 MiB).
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (default 8 MiB).
    pub part_size: usize,
    /// Bodies buffered in memory at once, in bytes (default 256 MiB).
    pub memory_budget: u64,
    pub previous: PreviousSnapshot,
    /// Keys under these prefixes of the live store are left out (default: the quarantine
    /// root that object restores move replaced objects to).
    pub exclude: Vec<Path>,
    /// The directory of a `file://` live store ([`crate::local_dir`]): each object's
    /// permission bits are recorded (default: none).
    pub local_root: Option<std::path::PathBuf>,
}

impl SnapshotOptions {
    pub fn new(source_label: impl Into<String>) -> SnapshotOptions {
        SnapshotOptions {
            environment: None,
            source_label: source_label.into(),
            source_prefix: None,
            parallelism: 64,
            multipart_threshold: 8 << 20,
            part_size: 8 << 20,
            memory_budget: 256 << 20,
            previous: PreviousSnapshot::Auto,
            exclude: vec![Path::from(QUARANTINE_ROOT)],
            local_root: None,
        }
    }
}

/// A completed snapshot, as a point records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectSnapshotPart {
    pub snapshot_id: SnapshotId,
    pub manifest_key: String,
    /// sha256 of the manifest file's bytes.
    pub manifest_sha256: String,
    pub manifest_size: u64,
    pub objects: u64,
    /// Sum of the objects' sizes.
    pub bytes: u64,
    /// Bodies this snapshot uploaded (the rest were already blobs).
    pub copied_objects: u64,
    pub copied_bytes: u64,
    pub source: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferPhase {
    #[default]
    Listing,
    Copying,
    WritingManifest,
    Done,
}

/// Progress of a snapshot or an object restore, reported after the listing and after every
/// object.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferProgress {
    pub phase: TransferPhase,
    pub objects_total: u64,
    pub bytes_total: u64,
    /// Objects accounted for (reused or read).
    pub objects_done: u64,
    pub bytes_done: u64,
    /// Bodies written (to the repository by a snapshot, to the target by a restore).
    pub objects_copied: u64,
    pub bytes_copied: u64,
}

/// Called with progress; must be cheap (it runs on the copying tasks).
pub type ProgressFn = Arc<dyn Fn(&TransferProgress) + Send + Sync>;

/// The counts behind [`TransferProgress`], added to by many tasks at once (a snapshot's and an
/// object restore's).
#[derive(Default)]
pub(crate) struct TransferCounters {
    objects_total: AtomicU64,
    bytes_total: AtomicU64,
    objects_done: AtomicU64,
    bytes_done: AtomicU64,
    objects_copied: AtomicU64,
    bytes_copied: AtomicU64,
}

impl TransferCounters {
    /// Counters for a transfer whose size is known up front.
    pub(crate) fn with_totals(objects: u64, bytes: u64) -> TransferCounters {
        TransferCounters {
            objects_total: AtomicU64::new(objects),
            bytes_total: AtomicU64::new(bytes),
            ..TransferCounters::default()
        }
    }

    /// One more object to transfer, of `bytes`.
    pub(crate) fn add_total(&self, bytes: u64) {
        self.objects_total.fetch_add(1, Ordering::Relaxed);
        self.bytes_total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// One more object accounted for (reused, already right, or written), of `bytes`.
    pub(crate) fn add_done(&self, bytes: u64) {
        self.objects_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// One more body written, of `bytes`.
    pub(crate) fn add_copied(&self, bytes: u64) {
        self.objects_copied.fetch_add(1, Ordering::Relaxed);
        self.bytes_copied.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn objects_copied(&self) -> u64 {
        self.objects_copied.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes_copied(&self) -> u64 {
        self.bytes_copied.load(Ordering::Relaxed)
    }

    /// Tells `callback`, if there is one, the counts so far.
    pub(crate) fn report(&self, callback: Option<&ProgressFn>, phase: TransferPhase) {
        if let Some(callback) = callback {
            callback(&TransferProgress {
                phase,
                objects_total: self.objects_total.load(Ordering::Relaxed),
                bytes_total: self.bytes_total.load(Ordering::Relaxed),
                objects_done: self.objects_done.load(Ordering::Relaxed),
                bytes_done: self.bytes_done.load(Ordering::Relaxed),
                objects_copied: self.objects_copied(),
                bytes_copied: self.bytes_copied(),
            });
        }
    }
}

/// Snapshots the live store `source` into the repository. Holds a shared repository lock
/// until the manifest is written, so a concurrent prune cannot sweep a blob it relies on.
#[tracing::instrument(name = "repository.objects.snapshot", skip_all, fields(source = %options.source_label))]
pub async fn snapshot_objects(
    repo: &Repository,
    source: Arc<dyn ObjectStore>,
    options: &SnapshotOptions,
    progress: Option<ProgressFn>,
) -> Result<ObjectSnapshotPart> {
    if options.parallelism == 0 {
        bail!("snapshot parallelism must be at least 1");
    }
    if let Some(env) = &options.environment {
        crate::layout::validate_environment(env)?;
    }
    let lock = repo.lock(LockKind::Shared, "object snapshot").await?;
    let result = run_snapshot(repo, source, options, progress, &lock).await;
    let released = lock.release().await;
    let part = result?;
    if let Err(e) = released {
        tracing::warn!("release the snapshot lock: {e:#}");
    }
    Ok(part)
}

struct Ctx {
    repo: Repository,
    source: Arc<dyn ObjectStore>,
    source_prefix: Path,
    staging: Path,
    multipart_threshold: u64,
    part_size: usize,
    /// Blobs known to exist or being uploaded by this snapshot, by id
    /// ([`Repository::blob_id`]).
    known: Mutex<HashSet<String>>,
    memory: Arc<Semaphore>,
    memory_units: u32,
    counters: TransferCounters,
    progress: Option<ProgressFn>,
}

impl Ctx {
    fn report(&self, phase: TransferPhase) {
        self.counters.report(self.progress.as_ref(), phase);
    }

    /// Claims a blob for upload; false when it exists or another task uploads it.
    fn claim(&self, sha: &str) -> bool {
        self.known
            .lock()
            .map(|mut known| known.insert(self.repo.blob_id(sha)))
            .unwrap_or(false)
    }

    fn unclaim(&self, sha: &str) {
        if let Ok(mut known) = self.known.lock() {
            known.remove(&self.repo.blob_id(sha));
        }
    }

    fn has_blob(&self, sha: &str) -> bool {
        self.known
            .lock()
            .map(|known| known.contains(&self.repo.blob_id(sha)))
            .unwrap_or(false)
    }

    fn relative_key(&self, location: &Path) -> Option<String> {
        if self.source_prefix.is_root() {
            return Some(location.to_string());
        }
        let parts: Vec<String> = location
            .prefix_match(&self.source_prefix)?
            .map(|p| p.as_ref().to_owned())
            .collect();
        (!parts.is_empty()).then(|| parts.join("/"))
    }
}

async fn run_snapshot(
    repo: &Repository,
    source: Arc<dyn ObjectStore>,
    options: &SnapshotOptions,
    progress: Option<ProgressFn>,
    lock: &crate::lock::LockGuard,
) -> Result<ObjectSnapshotPart> {
    let started_at = Utc::now();
    let id = SnapshotId::new(started_at);
    let source_prefix = options.source_prefix.clone().unwrap_or_default();
    let memory_units = (options.memory_budget / MEMORY_UNIT).clamp(1, u32::MAX as u64 / 2) as u32;
    let ctx = Arc::new(Ctx {
        repo: repo.clone(),
        source: source.clone(),
        source_prefix: source_prefix.clone(),
        staging: Path::from(format!("{STAGING}/{id}")),
        multipart_threshold: options.multipart_threshold.max(1),
        part_size: options.part_size.max(5 << 20),
        known: Mutex::new(HashSet::new()),
        memory: Arc::new(Semaphore::new(memory_units as usize)),
        memory_units,
        counters: TransferCounters::default(),
        progress,
    });
    ctx.report(TransferPhase::Listing);

    let listing = async {
        let prefix = (!source_prefix.is_root()).then_some(&source_prefix);
        source
            .list(prefix)
            .try_collect::<Vec<ObjectMeta>>()
            .await
            .with_context(|| {
                format!(
                    "list the live store {}: check its URL and credentials",
                    options.source_label
                )
            })
    };
    let (metas, blobs, previous) = futures::try_join!(
        listing,
        list_blobs(repo),
        previous_manifest(repo, options, &source_prefix)
    )?;
    *ctx.known
        .lock()
        .map_err(|_| anyhow::anyhow!("blob set lock poisoned"))? = blobs;

    let previous: HashMap<String, ManifestEntry> = previous
        .map(|m| m.objects.into_iter().map(|e| (e.key.clone(), e)).collect())
        .unwrap_or_default();

    let mut entries = Vec::with_capacity(metas.len());
    let mut to_copy = Vec::new();
    for meta in metas {
        if options
            .exclude
            .iter()
            .any(|prefix| meta.location.prefix_matches(prefix))
        {
            continue;
        }
        let Some(key) = ctx.relative_key(&meta.location) else {
            continue;
        };
        ctx.counters.add_total(meta.size);
        match previous.get(&key) {
            Some(prev)
                if prev.size == meta.size
                    && prev.etag.is_some()
                    && prev.etag == meta.e_tag
                    && prev.last_modified == meta.last_modified
                    && ctx.has_blob(&prev.sha256) =>
            {
                ctx.counters.add_done(meta.size);
                entries.push(prev.clone());
            }
            _ => to_copy.push((key, meta)),
        }
    }
    ctx.report(TransferPhase::Copying);

    let flusher = {
        let ctx = ctx.clone();
        repo.background_flusher(move || ctx.counters.bytes_copied())
    };
    let task_ctx = ctx.clone();
    let copied = for_each_parallel(to_copy, options.parallelism, move |(key, meta)| {
        let ctx = task_ctx.clone();
        async move {
            let what = format!("copy object {key}");
            let entry = retry(&ctx.repo.options.retry, &what, || {
                copy_object(&ctx, &key, &meta)
            })
            .await
            .with_context(|| format!("copy object {key} into the repository"))?;
            ctx.report(TransferPhase::Copying);
            Ok(entry)
        }
    })
    .await;
    if let Some(flusher) = flusher {
        let flushes = flusher.stop().await;
        tracing::debug!(flushes, "background flushes while copying");
    }
    let copied = copied.map_err(|e| {
        e.context(format!(
            "snapshot {id} of {} failed; no manifest was written (blobs already copied are \
             reused by the next snapshot)",
            options.source_label
        ))
    })?;
    // `None`: deleted from the live store since the listing.
    entries.extend(copied.into_iter().flatten());

    ctx.report(TransferPhase::WritingManifest);
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    // Read for every entry, vouched-for ones too (a mode may change with no content change);
    // never carried over from an earlier snapshot.
    let mode_root = options
        .local_root
        .as_ref()
        .map(|root| root.join(source_prefix.as_ref()));
    for entry in &mut entries {
        entry.mode = mode_root
            .as_ref()
            .and_then(|root| file_mode(&root.join(&entry.key)));
    }
    let bytes = entries.iter().map(|e| e.size).sum();
    let manifest = Manifest {
        id: id.clone(),
        environment: options.environment.clone(),
        source: options.source_label.clone(),
        source_prefix: source_prefix.to_string(),
        started_at,
        finished_at: Utc::now(),
        objects: entries,
    };
    lock.check()?;
    // The blobs reach the disk before the manifest that names them.
    repo.make_durable().await?;
    let key = manifest_key(&id);
    let (manifest_sha256, manifest_size) = repo
        .put_document(&key, MANIFEST_FORMAT, &manifest)
        .await
        .with_context(|| format!("write manifest of snapshot {id}"))?;
    repo.make_durable().await?;
    ctx.report(TransferPhase::Done);
    Ok(ObjectSnapshotPart {
        snapshot_id: id,
        manifest_key: key.to_string(),
        manifest_sha256,
        manifest_size,
        objects: manifest.objects.len() as u64,
        bytes,
        copied_objects: ctx.counters.objects_copied(),
        copied_bytes: ctx.counters.bytes_copied(),
        source: options.source_label.clone(),
        started_at,
        finished_at: manifest.finished_at,
    })
}

/// Copies one object; `None` when it vanished from the live store since the listing.
async fn copy_object(ctx: &Ctx, key: &str, listed: &ObjectMeta) -> Result<Option<ManifestEntry>> {
    let units = (listed.size.div_ceil(MEMORY_UNIT).max(1) as u32).min(ctx.memory_units);
    let small = listed.size < ctx.multipart_threshold;
    let _memory = if small {
        Some(ctx.memory.clone().acquire_many_owned(units).await?)
    } else {
        None
    };
    let got = match ctx.source.get(&listed.location).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            tracing::warn!(
                key,
                "object deleted from the live store during the snapshot"
            );
            return Ok(None);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("read it from the live store")),
    };
    let meta = got.meta.clone();
    let mut stream = crate::body::body_stream(got);
    let mut hasher = Sha256::new();
    let mut read = 0u64;
    let sha;
    if meta.size < ctx.multipart_threshold {
        let mut chunks: Vec<Bytes> = Vec::new();
        while let Some(chunk) = stream
            .try_next()
            .await
            .context("read it from the live store")?
        {
            hasher.update(&chunk);
            read += chunk.len() as u64;
            chunks.push(chunk);
        }
        check_length(read, meta.size)?;
        sha = hex::encode(hasher.finalize());
        if ctx.claim(&sha) {
            let put = ctx
                .repo
                .store
                .put(&ctx.repo.blob_key(&sha), PutPayload::from_iter(chunks))
                .await;
            if let Err(e) = put {
                ctx.unclaim(&sha);
                return Err(anyhow::Error::new(e).context("write its blob"));
            }
            ctx.counters.add_copied(meta.size);
        }
    } else {
        let staging = ctx.staging.clone().join(uuid::Uuid::new_v4().to_string());
        let upload = ctx
            .repo
            .store
            .put_multipart(&staging)
            .await
            .context("start the upload of its blob")?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, ctx.part_size);
        let streamed: Result<()> = async {
            while let Some(chunk) = stream
                .try_next()
                .await
                .context("read it from the live store")?
            {
                hasher.update(&chunk);
                read += chunk.len() as u64;
                writer
                    .wait_for_capacity(4)
                    .await
                    .context("upload its blob")?;
                writer.put(chunk);
            }
            check_length(read, meta.size)
        }
        .await;
        if let Err(e) = streamed {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer
            .finish()
            .await
            .context("complete the upload of its blob")?;
        sha = hex::encode(hasher.finalize());
        if ctx.claim(&sha) {
            if let Err(e) = ctx
                .repo
                .store
                .rename(&staging, &ctx.repo.blob_key(&sha))
                .await
            {
                ctx.unclaim(&sha);
                let _ = ctx.repo.store.delete(&staging).await;
                return Err(anyhow::Error::new(e).context("move its blob into place"));
            }
            ctx.counters.add_copied(meta.size);
        } else {
            ctx.repo
                .store
                .delete(&staging)
                .await
                .context("remove a duplicate staged blob")?;
        }
    }
    ctx.counters.add_done(meta.size);
    Ok(Some(ManifestEntry {
        key: key.to_owned(),
        size: meta.size,
        sha256: sha,
        etag: meta.e_tag,
        version: meta.version,
        last_modified: meta.last_modified,
        mode: None,
    }))
}

/// The permission bits of a file, if it can be read.
pub(crate) fn file_mode(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

fn check_length(read: u64, expected: u64) -> Result<()> {
    if read != expected {
        return Err(anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("read {read} bytes, the store announced {expected}"),
        )));
    }
    Ok(())
}

/// Every blob in the repository by id ([`Repository::blob_id`], the sha256 in a plaintext
/// repository), with its size.
pub(crate) async fn list_blob_sizes(repo: &Repository) -> Result<HashMap<String, u64>> {
    let prefix = Path::from(BLOBS);
    let mut blobs = HashMap::new();
    let mut stream = repo.store.list(Some(&prefix));
    while let Some(meta) = stream
        .try_next()
        .await
        .with_context(|| format!("list blobs in repository {}", repo.label))?
    {
        if let Some(id) = blob_id_of(&meta.location) {
            blobs.insert(id, meta.size);
        }
    }
    Ok(blobs)
}

async fn list_blobs(repo: &Repository) -> Result<HashSet<String>> {
    Ok(list_blob_sizes(repo).await?.into_keys().collect())
}

/// Snapshot ids in the repository, newest first.
pub(crate) async fn list_snapshot_ids(repo: &Repository) -> Result<Vec<SnapshotId>> {
    let prefix = Path::from(SNAPSHOTS);
    let metas: Vec<ObjectMeta> = repo
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .with_context(|| format!("list snapshots in repository {}", repo.label))?;
    let mut ids: Vec<SnapshotId> = metas
        .iter()
        .filter_map(|m| m.location.filename()?.strip_suffix(".json"))
        .filter_map(|stem| SnapshotId::parse(stem).ok())
        .collect();
    ids.sort_by(|a, b| b.cmp(a));
    Ok(ids)
}

async fn previous_manifest(
    repo: &Repository,
    options: &SnapshotOptions,
    source_prefix: &Path,
) -> Result<Option<Manifest>> {
    match &options.previous {
        PreviousSnapshot::None => Ok(None),
        PreviousSnapshot::Id(id) => Ok(Some(repo.read_manifest(id).await?)),
        PreviousSnapshot::Auto => {
            // Look at a few of the newest; an older match is not worth many reads.
            for id in list_snapshot_ids(repo).await?.into_iter().take(8) {
                match repo.read_manifest(&id).await {
                    Ok(m)
                        if m.source == options.source_label
                            && m.source_prefix == source_prefix.as_ref() =>
                    {
                        return Ok(Some(m));
                    }
                    Ok(_) => {}
                    Err(e) if matches!(e.downcast_ref(), Some(RepoError::Damaged { .. })) => {
                        tracing::warn!("skip damaged manifest {id} as a base: {e:#}");
                    }
                    Err(e) if crate::repo::is_not_found(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(None)
        }
    }
}

impl Repository {
    /// Reads and checks a snapshot manifest.
    pub async fn read_manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        Ok(self.read_manifest_with_sha(id).await?.0)
    }

    /// Reads and checks a snapshot manifest; also returns the sha256 of its file.
    pub(crate) async fn read_manifest_with_sha(
        &self,
        id: &SnapshotId,
    ) -> Result<(Manifest, String)> {
        let key = manifest_key(id);
        let (manifest, sha, _): (Manifest, _, _) = self
            .get_document(&key, MANIFEST_FORMAT, "object snapshot manifest")
            .await?;
        if &manifest.id != id {
            return Err(self
                .damaged(
                    "object snapshot manifest",
                    &key,
                    format!("the file holds snapshot {} instead", manifest.id),
                )
                .into());
        }
        // Every bad entry is named (up to a screenful), so one repair fixes them all.
        let bad: Vec<String> = manifest
            .objects
            .iter()
            .filter_map(|entry| match check_object_key(&entry.key) {
                Err(why) => Some(format!("object key {:?} {why}", entry.key)),
                Ok(()) if !crate::layout::is_sha256_hex(&entry.sha256) => Some(format!(
                    "object {:?} has the malformed sha256 {:?}",
                    entry.key, entry.sha256
                )),
                Ok(()) => None,
            })
            .collect();
        if let Some(first) = bad.first() {
            const SHOWN: usize = 10;
            let mut reason = if bad.len() == 1 {
                first.clone()
            } else {
                format!(
                    "{} bad entries: {}",
                    bad.len(),
                    bad[..bad.len().min(SHOWN)].join("; ")
                )
            };
            if bad.len() > SHOWN {
                reason.push_str("; ...");
            }
            return Err(self
                .damaged("object snapshot manifest", &key, reason)
                .into());
        }
        Ok((manifest, sha))
    }

    /// Lists snapshot ids, newest first.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotId>> {
        list_snapshot_ids(self).await
    }
}

/// Runs `f` over `items` with at most `parallelism` in flight on spawned tasks; stops at the
/// first error.
pub(crate) async fn for_each_parallel<T, R, F, Fut>(
    items: Vec<T>,
    parallelism: usize,
    f: F,
) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R>> + Send + 'static,
{
    let f = Arc::new(f);
    let mut tasks = JoinSet::new();
    let mut pending = items.into_iter();
    let mut results = Vec::new();
    loop {
        while tasks.len() < parallelism.max(1) {
            let Some(item) = pending.next() else {
                break;
            };
            let f = f.clone();
            tasks.spawn(async move { f(item).await });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let result = joined
            .map_err(|e| anyhow::Error::new(e).context("a parallel task failed"))
            .and_then(|r| r);
        match result {
            Ok(r) => results.push(r),
            Err(e) => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return Err(e);
            }
        }
    }
    Ok(results)
}

/// Reads a whole stream of chunks, hashing it. Returns the chunks and their sha256.
pub(crate) async fn read_hashed(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
) -> Result<(Vec<Bytes>, String, ObjectMeta)> {
    let got = store.get(key).await?;
    let meta = got.meta.clone();
    let mut stream = crate::body::body_stream(got);
    let mut hasher = Sha256::new();
    let mut chunks = Vec::new();
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        read += chunk.len() as u64;
        chunks.push(chunk);
    }
    check_length(read, meta.size)?;
    Ok((chunks, hex::encode(hasher.finalize()), meta))
}
