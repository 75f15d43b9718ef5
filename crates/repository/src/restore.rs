//! Restoring an object snapshot into a target store: make the target under a prefix hold
//! exactly the manifest's objects. Idempotent (objects already right are left alone), and
//! never destructive: an object the restore replaces or removes is first copied to a
//! quarantine prefix, and the report lists both.
//!
//! A restore can be split across several processes by [`Shard`]: each owns the keys whose
//! hash falls in its shard, writes only those manifest entries and quarantines only those
//! extra objects, so shards `0..N` together do exactly what one unsharded restore does.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::layout::{PointId, QUARANTINE_ROOT, SnapshotId, quarantine_prefix};
use crate::object_key::check_object_key;
use crate::repo::Repository;
use crate::scratch::BlobScratch;
use crate::snapshot::{
    Manifest, ManifestEntry, ProgressFn, TransferCounters, TransferPhase, for_each_parallel,
    read_hashed,
};
use crate::store::retry;
use crate::undo::{Before, RESTORE_RECORD_VERSION, RecordedKey, RestoreRecord, write_record};

/// One of `count` disjoint parts of a restore, by key hash. Shard `0/1` is the whole restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The whole key space in one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`, checked: `count ≥ 1` and `index < count`.
    pub fn new(index: u32, count: u32) -> Result<Shard> {
        let shard = Shard { index, count };
        shard.validate()?;
        Ok(shard)
    }

    /// Fields are public (the agent and the CLI build shards from the wire and from flags),
    /// so a restore checks them again before it touches anything.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0 {
            bail!(
                "shard {}/{} is not a shard: the number of shards must be at least 1",
                self.index,
                self.count
            );
        }
        if self.index >= self.count {
            bail!(
                "shard {}/{} is not a shard: the index must be below the number of shards \
                 (0..{})",
                self.index,
                self.count,
                self.count
            );
        }
        Ok(())
    }

    /// Which of `count` shards owns `key` (a key relative to the restore prefix): the first
    /// 8 bytes of sha256(key) as a big-endian integer, modulo `count`. Stable across versions
    /// and machines: agents of one restore must agree on it.
    pub fn of_key(key: &str, count: u32) -> u32 {
        let digest = Sha256::digest(key.as_bytes());
        let mut head = [0u8; 8];
        head.copy_from_slice(&digest[..8]);
        (u64::from_be_bytes(head) % u64::from(count.max(1))) as u32
    }

    pub fn owns(&self, key: &str) -> bool {
        self.count <= 1 || Shard::of_key(key, self.count) == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    /// `I/N`, e.g. `0/2` and `1/2` for two halves.
    fn from_str(text: &str) -> Result<Shard> {
        let parsed = text
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        let Some((index, count)) = parsed else {
            bail!("shard {text:?} is not I/N (e.g. 0/2 and 1/2 split a restore in two)");
        };
        Shard::new(index, count)
    }
}

/// What [`restore_objects`] does.
#[derive(Clone)]
pub struct RestoreObjectsOptions {
    /// How messages name the target store (a URL without credentials).
    pub target_label: String,
    /// Restore under this prefix of the target store (manifest keys are relative).
    pub target_prefix: Option<Path>,
    /// Where displaced objects go; default `rollcall-quarantine/<UTC time>-<snapshot id>`.
    /// Keys under [`QUARANTINE_ROOT`] are never treated as extra objects.
    pub quarantine_prefix: Option<Path>,
    /// Keep displaced objects in the repository (under `quarantine_prefix` there) instead of in
    /// the target store: the live store then holds exactly the snapshot (default false). The
    /// restore then also records, before it writes, what it may change (`undo::RestoreRecord`,
    /// beside the quarantine), so `undo_objects` can take it back.
    pub quarantine_in_repository: bool,
    /// Move objects the snapshot does not have into quarantine (default true: the target
    /// then matches the point in time).
    pub remove_extra: bool,
    /// Objects in flight (default 64).
    pub parallelism: usize,
    /// Bodies at least this large are written in parts (default 8 MiB).
    pub multipart_threshold: u64,
    pub part_size: usize,
    pub progress: Option<ProgressFn>,
    /// Restore only the keys this shard owns (default: all of them). Several restores of the
    /// same snapshot, one per shard, may run at once against the same target.
    pub shard: Option<Shard>,
    /// Blob bodies a preflight kept: a body found there is hashed again and written from it
    /// instead of being read from the repository (default: none).
    pub scratch: Option<BlobScratch>,
    /// The directory of a `file://` target ([`crate::local_dir`]): objects get the permission
    /// bits the manifest recorded, written or unchanged (default: none).
    pub local_root: Option<std::path::PathBuf>,
}

impl RestoreObjectsOptions {
    pub fn new(target_label: impl Into<String>) -> RestoreObjectsOptions {
        RestoreObjectsOptions {
            target_label: target_label.into(),
            target_prefix: None,
            quarantine_prefix: None,
            quarantine_in_repository: false,
            remove_extra: true,
            parallelism: 64,
            multipart_threshold: 8 << 20,
            part_size: 8 << 20,
            progress: None,
            shard: None,
            scratch: None,
            local_root: None,
        }
    }
}

impl std::fmt::Debug for RestoreObjectsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreObjectsOptions")
            .field("target_label", &self.target_label)
            .field("target_prefix", &self.target_prefix)
            .field("quarantine_prefix", &self.quarantine_prefix)
            .field("remove_extra", &self.remove_extra)
            .field("parallelism", &self.parallelism)
            .field("shard", &self.shard)
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreObjectsReport {
    pub snapshot_id: Option<SnapshotId>,
    /// Objects written from the snapshot.
    pub restored: u64,
    pub restored_bytes: u64,
    /// Of those, objects whose body came from the preflight's scratch instead of the
    /// repository.
    pub from_scratch: u64,
    /// Objects that already matched the snapshot.
    pub unchanged: u64,
    /// Target keys whose previous content was replaced (a copy is in quarantine).
    pub replaced: Vec<String>,
    /// Target keys the snapshot does not have, moved to quarantine.
    pub removed: Vec<String>,
    pub quarantine_prefix: String,
    /// Which shard of the keys this restore did (`0` of `1`: all of them).
    pub shard: u32,
    pub shards: u32,
}

enum Action {
    Unchanged,
    Write { replaced: bool, from_scratch: bool },
}

/// What the live object at a manifest entry's key tells a restore before any body is read.
/// Preflight takes the same decision to know which blobs the restore may write (the delta).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Live {
    /// No object at the key: the restore writes it.
    Missing,
    /// An object of another size: the restore replaces it.
    Differs,
    /// Same size and the etag the snapshot recorded: the very object the snapshot read, left
    /// alone.
    Same,
    /// Same size and nothing that vouches for its content: the restore hashes it, and replaces
    /// it when it differs.
    Unknown,
}

pub(crate) fn compare_live(entry: &ManifestEntry, current: Option<&ObjectMeta>) -> Live {
    match current {
        None => Live::Missing,
        Some(meta) if meta.size != entry.size => Live::Differs,
        Some(meta) if entry.etag.is_some() && meta.e_tag == entry.etag => Live::Same,
        Some(_) => Live::Unknown,
    }
}

/// The objects under `prefix` of a restore's target, by location, leaving out the quarantine.
pub(crate) async fn list_target(
    target: &Arc<dyn ObjectStore>,
    prefix: &Path,
    label: &str,
) -> Result<HashMap<Path, ObjectMeta>> {
    let quarantine_root = Path::from(QUARANTINE_ROOT);
    let prefix = (!prefix.is_root()).then_some(prefix);
    target
        .list(prefix)
        .try_filter(|m| {
            let keep = !m.location.prefix_matches(&quarantine_root);
            async move { keep }
        })
        .map_ok(|m| (m.location.clone(), m))
        .try_collect()
        .await
        .with_context(|| format!("list the target store {label}"))
}

/// Restores snapshot `snapshot` into `target`.
#[tracing::instrument(name = "repository.objects.restore", skip_all, fields(snapshot = %snapshot))]
pub async fn restore_objects(
    repo: &Repository,
    snapshot: &SnapshotId,
    target: Arc<dyn ObjectStore>,
    options: &RestoreObjectsOptions,
) -> Result<RestoreObjectsReport> {
    let manifest = repo.read_manifest(snapshot).await?;
    restore_manifest(repo, manifest, target, options).await
}

/// Restores the object snapshot of a recovery point into `target`, after checking that its
/// manifest is the very one the point recorded.
#[tracing::instrument(name = "repository.objects.restore_point", skip_all, fields(point = %point))]
pub async fn restore_point_objects(
    repo: &Repository,
    point: &PointId,
    target: Arc<dyn ObjectStore>,
    options: &RestoreObjectsOptions,
) -> Result<RestoreObjectsReport> {
    let found = repo.read_point(point).await?;
    let Some(part) = found.objects else {
        bail!("point {point} has no object snapshot: choose a point that has one");
    };
    let (manifest, sha) = repo.read_manifest_with_sha(&part.snapshot_id).await?;
    if sha != part.manifest_sha256 {
        return Err(repo
            .damaged(
                "object snapshot manifest",
                &Path::from(part.manifest_key.as_str()),
                format!(
                    "its sha256 is {sha}, point {point} recorded {}: it was replaced or modified",
                    part.manifest_sha256
                ),
            )
            .into());
    }
    restore_manifest(repo, manifest, target, options).await
}

async fn restore_manifest(
    repo: &Repository,
    manifest: Manifest,
    target: Arc<dyn ObjectStore>,
    options: &RestoreObjectsOptions,
) -> Result<RestoreObjectsReport> {
    let snapshot = &manifest.id.clone();
    let shard = options.shard.unwrap_or(Shard::WHOLE);
    shard
        .validate()
        .with_context(|| format!("restore snapshot {snapshot}"))?;
    // Preflight refused such a manifest already; the restore checks again before it writes.
    for entry in &manifest.objects {
        if let Err(bad) = check_object_key(&entry.key) {
            bail!(
                "restore snapshot {snapshot}: its object key {:?} {bad}, so no store can hold it \
                 under that name; nothing was written (restore from another point)",
                entry.key
            );
        }
    }
    let target_prefix = options.target_prefix.clone().unwrap_or_default();
    let quarantine = options
        .quarantine_prefix
        .clone()
        .unwrap_or_else(|| quarantine_prefix(snapshot, Utc::now()));
    if !options.quarantine_in_repository
        && !target_prefix.is_root()
        && quarantine.prefix_matches(&target_prefix)
    {
        bail!(
            "the quarantine prefix {quarantine} lies inside the restore prefix {target_prefix}: \
             choose one outside it"
        );
    }

    let existing = list_target(&target, &target_prefix, &options.target_label).await?;

    // Every manifest key is wanted (an object of another shard is never an extra); only the
    // owned ones are this restore's to write.
    let mut wanted = HashMap::new();
    let mut jobs = Vec::new();
    for entry in &manifest.objects {
        let location = join(&target_prefix, &entry.key)?;
        wanted.insert(location.clone(), ());
        if !shard.owns(&entry.key) {
            continue;
        }
        jobs.push((
            entry.clone(),
            location.clone(),
            existing.get(&location).cloned(),
        ));
    }
    let total_bytes: u64 = jobs.iter().map(|(e, _, _)| e.size).sum();
    let progress = Arc::new(Progress::new(
        options.progress.clone(),
        jobs.len() as u64,
        total_bytes,
    ));
    progress.report(TransferPhase::Copying);

    let shared = Arc::new(Shared {
        repo: repo.clone(),
        target: target.clone(),
        quarantine: quarantine.clone(),
        quarantine_in_repository: options.quarantine_in_repository,
        target_prefix: target_prefix.clone(),
        multipart_threshold: options.multipart_threshold.max(1),
        part_size: options.part_size.max(5 << 20),
        progress: progress.clone(),
        scratch: options.scratch.clone(),
        local_root: options.local_root.clone(),
    });
    let extras: Vec<Path> = if options.remove_extra {
        existing
            .keys()
            .filter(|k| !wanted.contains_key(*k) && shard.owns(&shared.relative(k)))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    if options.quarantine_in_repository {
        // Before anything changes: what the restore may write or remove, and what each key
        // held, so `undo_objects` can put the live store back from the repository alone.
        let mut keys: Vec<RecordedKey> = jobs
            .iter()
            .filter(|(entry, _, current)| compare_live(entry, current.as_ref()) != Live::Same)
            .map(|(entry, _, current)| RecordedKey {
                key: entry.key.clone(),
                before: current
                    .as_ref()
                    .map_or(Before::Absent, |m| Before::Present { size: m.size }),
            })
            .collect();
        keys.extend(extras.iter().map(|location| RecordedKey {
            key: shared.relative(location),
            before: Before::Present {
                size: existing.get(location).map_or(0, |m| m.size),
            },
        }));
        let record = RestoreRecord {
            version: RESTORE_RECORD_VERSION,
            snapshot: snapshot.to_string(),
            shard: shard.index,
            shards: shard.count,
            recorded_at: Utc::now(),
            target_prefix: target_prefix.to_string(),
            keys,
        };
        write_record(repo, &quarantine, &record).await?;
    }
    let task = shared.clone();
    let outcomes = for_each_parallel(
        jobs,
        options.parallelism,
        move |(entry, location, current)| {
            let shared = task.clone();
            async move {
                let what = format!("restore object {}", entry.key);
                let action = retry(&shared.repo.options.retry, &what, || {
                    restore_one(&shared, &entry, &location, current.as_ref())
                })
                .await
                .with_context(|| format!("restore object {}", entry.key))?;
                shared.progress.report(TransferPhase::Copying);
                Ok((entry.key, action))
            }
        },
    )
    .await
    .with_context(|| {
        format!(
            "restore snapshot {snapshot} into {}; run the restore again to finish it (objects \
             already restored are skipped)",
            options.target_label
        )
    })?;

    let task = shared.clone();
    let removed = for_each_parallel(extras, options.parallelism, move |location| {
        let shared = task.clone();
        async move {
            let moved = retry(
                &shared.repo.options.retry,
                "quarantine an extra object",
                || async {
                    // Gone since the listing (a role's scratch object, say): what the restore
                    // wanted, and nothing to keep.
                    if !shared.quarantine_copy(&location).await? {
                        return Ok(false);
                    }
                    match shared.target.delete(&location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
                        Err(e) => Err(anyhow::Error::from(e)),
                    }
                },
            )
            .await
            .with_context(|| format!("move extra object {location} to quarantine"))?;
            Ok(moved.then(|| shared.relative(&location)))
        }
    })
    .await?;

    let mut report = RestoreObjectsReport {
        snapshot_id: Some(snapshot.clone()),
        quarantine_prefix: quarantine.to_string(),
        shard: shard.index,
        shards: shard.count,
        ..RestoreObjectsReport::default()
    };
    let by_key: HashMap<&str, u64> = manifest
        .objects
        .iter()
        .map(|e| (e.key.as_str(), e.size))
        .collect();
    for (key, action) in outcomes {
        match action {
            Action::Unchanged => report.unchanged += 1,
            Action::Write {
                replaced,
                from_scratch,
            } => {
                report.restored += 1;
                report.restored_bytes += by_key.get(key.as_str()).copied().unwrap_or(0);
                report.from_scratch += u64::from(from_scratch);
                if replaced {
                    report.replaced.push(key);
                }
            }
        }
    }
    report.removed = removed.into_iter().flatten().collect();
    report.replaced.sort();
    report.removed.sort();
    progress.report(TransferPhase::Done);
    Ok(report)
}

struct Shared {
    repo: Repository,
    target: Arc<dyn ObjectStore>,
    quarantine: Path,
    quarantine_in_repository: bool,
    target_prefix: Path,
    multipart_threshold: u64,
    part_size: usize,
    progress: Arc<Progress>,
    scratch: Option<BlobScratch>,
    local_root: Option<std::path::PathBuf>,
}

impl Shared {
    /// Gives a restored (or unchanged) file the permission bits the manifest recorded.
    fn apply_mode(&self, entry: &ManifestEntry, location: &Path) -> Result<()> {
        let (Some(root), Some(mode)) = (&self.local_root, entry.mode) else {
            return Ok(());
        };
        use std::os::unix::fs::PermissionsExt as _;
        let path = root.join(location.as_ref());
        if crate::snapshot::file_mode(&path) == Some(mode) {
            return Ok(());
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).with_context(|| {
            format!(
                "give {} mode {mode:o} as the point recorded",
                path.display()
            )
        })
    }

    fn relative(&self, location: &Path) -> String {
        if self.target_prefix.is_root() {
            return location.to_string();
        }
        location
            .prefix_match(&self.target_prefix)
            .map(|parts| {
                parts
                    .map(|p| p.as_ref().to_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_else(|| location.to_string())
    }

    /// Copies an object into the quarantine; false if it no longer exists.
    async fn quarantine_copy(&self, location: &Path) -> Result<bool> {
        if self.quarantine_in_repository {
            let destination = self
                .repo
                .quarantine_entry(&self.quarantine, &self.relative(location))?;
            let got = match self.target.get(location).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => {
                    return Err(
                        anyhow::Error::from(e).context(format!("read {location} to quarantine it"))
                    );
                }
            };
            let body = got
                .bytes()
                .await
                .with_context(|| format!("read {location} to quarantine it"))?;
            self.repo
                .store()
                .put(&destination, PutPayload::from_bytes(body))
                .await
                .with_context(|| {
                    format!("copy {location} to quarantine {destination} in the repository")
                })?;
            return Ok(true);
        }
        let destination = join(&self.quarantine, &self.relative(location))?;
        match self.target.copy(location, &destination).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(anyhow::Error::from(e)
                .context(format!("copy {location} to quarantine {destination}"))),
        }
    }
}

async fn restore_one(
    shared: &Shared,
    entry: &ManifestEntry,
    location: &Path,
    current: Option<&ObjectMeta>,
) -> Result<Action> {
    let replaced = match compare_live(entry, current) {
        Live::Missing => false,
        Live::Differs => true,
        Live::Same => {
            shared.apply_mode(entry, location)?;
            shared.progress.done(entry.size, false);
            return Ok(Action::Unchanged);
        }
        Live::Unknown => match read_hashed(&shared.target, location).await {
            Ok((_, sha, _)) if sha == entry.sha256 => {
                shared.apply_mode(entry, location)?;
                shared.progress.done(entry.size, false);
                return Ok(Action::Unchanged);
            }
            Ok(_) => true,
            Err(e) if crate::repo::is_not_found(&e) => false,
            Err(e) => return Err(e.context("read the current object")),
        },
    };
    if replaced {
        shared.quarantine_copy(location).await?;
    }
    let from_scratch = write_from_scratch(shared, entry, location).await;
    if !from_scratch {
        let blob = shared.repo.blob_key(&entry.sha256);
        let got = shared.repo.store.get(&blob).await.with_context(|| {
            format!(
                "read blob {blob} from repository {} (verify the point: it may be incomplete)",
                shared.repo.label
            )
        })?;
        let reason = match write_body(shared, entry, location, got).await {
            Ok(Ok(())) => None,
            Ok(Err(reason)) => Some(reason),
            Err(e) => match crate::sealed::broken_seal(&e) {
                Some(broken) => Some(crate::repo::unsealed_reason(broken)),
                None => return Err(e),
            },
        };
        if let Some(reason) = reason {
            return Err(shared.repo.damaged("blob", &blob, reason).into());
        }
    }
    shared.apply_mode(entry, location)?;
    shared.progress.done(entry.size, true);
    Ok(Action::Write {
        replaced,
        from_scratch,
    })
}

/// Writes the entry from the scratch's copy of its blob, if there is one and it still hashes
/// right; false when the repository's copy must be read instead.
async fn write_from_scratch(shared: &Shared, entry: &ManifestEntry, location: &Path) -> bool {
    let Some(scratch) = &shared.scratch else {
        return false;
    };
    let Some(got) = scratch.get(&entry.sha256, entry.size).await else {
        return false;
    };
    let problem = match write_body(shared, entry, location, got).await {
        Ok(Ok(())) => return true,
        Ok(Err(reason)) => reason,
        Err(e) => format!("{e:#}"),
    };
    tracing::warn!(
        key = entry.key,
        "the scratch copy of blob {} did not restore ({problem}); reading the repository's",
        entry.sha256
    );
    scratch.discard(&entry.sha256, Some(entry.size)).await;
    false
}

/// Streams a blob body to `location`, committing it only once its size and sha256 match the
/// entry. `Ok(Err(reason))`: the body is not the entry's, and the target is untouched.
async fn write_body(
    shared: &Shared,
    entry: &ManifestEntry,
    location: &Path,
    got: object_store::GetResult,
) -> Result<std::result::Result<(), String>> {
    let mut stream = crate::body::body_stream(got);
    let mut hasher = Sha256::new();
    let mut read = 0u64;
    if entry.size < shared.multipart_threshold {
        let mut chunks: Vec<Bytes> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("read the blob")?;
            hasher.update(&chunk);
            read += chunk.len() as u64;
            chunks.push(chunk);
        }
        if let Some(reason) = body_mismatch(entry, read, hasher) {
            return Ok(Err(reason));
        }
        shared
            .target
            .put(location, PutPayload::from_iter(chunks))
            .await
            .with_context(|| format!("write {location} to the target store"))?;
    } else {
        // Written in parts and committed only after the hash matched: a damaged blob leaves
        // the target untouched.
        let upload = shared
            .target
            .put_multipart(location)
            .await
            .with_context(|| format!("start writing {location} to the target store"))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, shared.part_size);
        let streamed: Result<()> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.context("read the blob")?;
                hasher.update(&chunk);
                read += chunk.len() as u64;
                writer
                    .wait_for_capacity(4)
                    .await
                    .context("write to the target")?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        let checked = streamed.map(|()| body_mismatch(entry, read, hasher));
        match checked {
            Ok(None) => {}
            Ok(Some(reason)) => {
                let _ = writer.abort().await;
                return Ok(Err(reason));
            }
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
        writer
            .finish()
            .await
            .with_context(|| format!("complete writing {location} to the target store"))?;
    }
    Ok(Ok(()))
}

/// Why a body of `read` bytes hashed by `hasher` is not the entry's, if it is not.
pub(crate) fn body_mismatch(entry: &ManifestEntry, read: u64, hasher: Sha256) -> Option<String> {
    let sha = hex::encode(hasher.finalize());
    (read != entry.size || sha != entry.sha256).then(|| {
        format!(
            "it holds {read} bytes with sha256 {sha}, the manifest expects {} bytes (key {})",
            entry.size, entry.key
        )
    })
}

/// `prefix/key` for a manifest key (already in object_store's encoded form).
pub(crate) fn join(prefix: &Path, key: &str) -> Result<Path> {
    let joined = if prefix.is_root() {
        key.to_owned()
    } else {
        format!("{prefix}/{key}")
    };
    Path::parse(&joined).with_context(|| format!("object key {key:?} is not a valid path"))
}

struct Progress {
    callback: Option<ProgressFn>,
    counters: TransferCounters,
}

impl Progress {
    fn new(callback: Option<ProgressFn>, objects_total: u64, bytes_total: u64) -> Progress {
        Progress {
            callback,
            counters: TransferCounters::with_totals(objects_total, bytes_total),
        }
    }

    fn done(&self, bytes: u64, copied: bool) {
        self.counters.add_done(bytes);
        if copied {
            self.counters.add_copied(bytes);
        }
    }

    fn report(&self, phase: TransferPhase) {
        self.counters.report(self.callback.as_ref(), phase);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ownership_is_stable() {
        // Fixed values: agents of different versions must split a restore the same way, so a
        // change here breaks mixed-version fleets.
        assert_eq!(Shard::of_key("uploads/00000", 2), 1);
        assert_eq!(Shard::of_key("uploads/00000", 16), 11);
        assert_eq!(Shard::of_key("a", 3), 1);
        assert_eq!(Shard::of_key("a", 16), 10);
        assert_eq!(Shard::of_key("checkpoints/2024/model.bin", 16), 14);
        assert_eq!(Shard::of_key("", 16), 4);
        assert!(Shard::WHOLE.owns("anything"));
        let owners: Vec<u32> = (0..4)
            .filter(|&i| Shard::new(i, 4).expect("shard").owns("a"))
            .collect();
        assert_eq!(owners, vec![Shard::of_key("a", 4)]);
    }

    /// The restore's own check, behind the one reading the manifest: a manifest that reached
    /// it with a bad key (built in memory here) is refused before the target is touched.
    #[tokio::test]
    async fn the_restore_refuses_a_bad_key_before_writing() {
        use object_store::memory::InMemory;
        let repo = Repository::from_store(
            Arc::new(InMemory::new()),
            "memory:///repo",
            crate::repo::RepositoryOptions::default(),
        );
        let target: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let entry = |key: &str| ManifestEntry {
            mode: None,
            key: key.to_owned(),
            size: 1,
            sha256: "ab".repeat(32),
            etag: None,
            version: None,
            last_modified: Utc::now(),
        };
        let manifest = Manifest {
            id: SnapshotId::new(Utc::now()),
            environment: None,
            source: "memory:///live".into(),
            source_prefix: String::new(),
            started_at: Utc::now(),
            finished_at: Utc::now(),
            objects: vec![entry("fine"), entry("/etc/passwd")],
        };
        let err = restore_manifest(
            &repo,
            manifest,
            target.clone(),
            &RestoreObjectsOptions::new("memory:///live"),
        )
        .await
        .expect_err("bad key");
        assert!(
            err.to_string()
                .contains("its object key \"/etc/passwd\" is absolute"),
            "{err:#}"
        );
        let written: Vec<ObjectMeta> = target.list(None).try_collect().await.expect("list");
        assert!(written.is_empty(), "{written:?}");
    }

    #[test]
    fn shards_parse_and_refuse_what_is_not_one() {
        assert_eq!(
            "1/2".parse::<Shard>().expect("1/2"),
            Shard { index: 1, count: 2 }
        );
        assert_eq!(Shard::new(0, 1).expect("0/1"), Shard::WHOLE);
        for (text, needle) in [
            ("2/2", "shard 2/2 is not a shard"),
            ("0/0", "shard 0/0 is not a shard"),
            ("1", "\"1\" is not I/N"),
            ("a/2", "\"a/2\" is not I/N"),
            ("-1/2", "is not I/N"),
        ] {
            let err = text.parse::<Shard>().expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
