//! Retention: delete an environment's points older than its window, then the dumps and
//! manifests only they used, then every blob no remaining manifest references; and the
//! environment's base backups past the window with the WAL only they needed
//! (`postgres::physical::prune_physical`).
//!
//! Never deleted: the newest point of the environment in commit order (whatever its age or
//! stamp), the newest commit-number markers (`sequence/`, so numbers are never reused), a point the caller
//! says is in use, anything when some point or manifest cannot be read (we could not know
//! what it references). Point files go first, so an interrupted prune leaves orphans that the
//! next prune removes, never a point with missing parts. Runs under the exclusive repository
//! lock, so no snapshot is between listing blobs and writing its manifest meanwhile.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};
use serde::Serialize;

use crate::layout::{POSTGRES, PointId, STAGING, SnapshotId, validate_environment};
use crate::lock::LockKind;
use crate::point::Point;
use crate::repo::{RepoError, Repository};
use crate::snapshot::{Manifest, list_blob_sizes, list_snapshot_ids};

/// What [`Repository::prune`] does.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub environment: String,
    /// Points older than this are deleted (the runbook's 7/14/30 days).
    pub window: Duration,
    /// Points an active run uses: never deleted.
    pub in_use: HashSet<PointId>,
    /// Report what would be deleted without deleting anything.
    pub dry_run: bool,
    /// "Now" for the window (default: the current time).
    pub now: Option<DateTime<Utc>>,
}

impl PruneOptions {
    pub fn new(environment: impl Into<String>, window: Duration) -> PruneOptions {
        PruneOptions {
            environment: environment.into(),
            window,
            in_use: HashSet::new(),
            dry_run: false,
            now: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub deleted_points: Vec<PointId>,
    /// Points of the environment that stay, with why when they are past the window.
    pub kept_points: Vec<KeptPoint>,
    pub deleted_dumps: Vec<String>,
    pub deleted_manifests: Vec<SnapshotId>,
    pub deleted_blobs: u64,
    pub deleted_blob_bytes: u64,
    /// Leftovers of interrupted snapshot uploads.
    pub deleted_staging: u64,
    /// Commit-number markers (`sequence/<n>`) far below the highest.
    pub deleted_sequence_markers: u64,
    /// Why dumps, manifests and blobs were not swept, when they were not.
    pub sweep_skipped: Option<String>,
    /// Base backups of the environment past the window (the newest of those stays).
    pub deleted_base_backups: Vec<String>,
    /// Archived WAL files older than every remaining base backup.
    pub deleted_wal_files: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeptPoint {
    pub id: PointId,
    pub reason: KeepReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    WithinWindow,
    Newest,
    InUse,
}

impl Repository {
    /// Applies the retention window of one environment.
    #[tracing::instrument(name = "repository.prune", skip_all, fields(env = %options.environment, dry_run = options.dry_run))]
    pub async fn prune(&self, options: &PruneOptions) -> Result<PruneReport> {
        validate_environment(&options.environment)?;
        let lock = if options.dry_run {
            None
        } else {
            Some(self.lock(LockKind::Exclusive, "prune").await?)
        };
        let result = self.prune_locked(options).await;
        if let Some(lock) = lock
            && let Err(e) = lock.release().await
        {
            tracing::warn!("release the prune lock: {e:#}");
        }
        result
    }

    async fn prune_locked(&self, options: &PruneOptions) -> Result<PruneReport> {
        let now = options.now.unwrap_or_else(Utc::now);
        let window = chrono::Duration::from_std(options.window)
            .context("the retention window is out of range")?;
        let cutoff = now - window;
        let env = options.environment.as_str();
        let mut report = PruneReport {
            dry_run: options.dry_run,
            ..PruneReport::default()
        };

        let listing = self.list_points(None).await?;
        let newest = listing
            .points
            .iter()
            .filter(|p| p.environment == env)
            .max_by(|a, b| a.commit_order().cmp(&b.commit_order()))
            .map(|p| p.id.clone());
        let mut doomed: Vec<&Point> = Vec::new();
        let mut remaining: Vec<&Point> = Vec::new();
        for point in &listing.points {
            if point.environment != env {
                remaining.push(point);
                continue;
            }
            let reason = if Some(&point.id) == newest.as_ref() {
                Some(KeepReason::Newest)
            } else if options.in_use.contains(&point.id) {
                Some(KeepReason::InUse)
            } else if point.created_at >= cutoff {
                Some(KeepReason::WithinWindow)
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    remaining.push(point);
                    report.kept_points.push(KeptPoint {
                        id: point.id.clone(),
                        reason,
                    });
                }
                None => doomed.push(point),
            }
        }

        // 1. Point files first: from here on the parts are orphans, never a broken point.
        let doomed_keys: Vec<Path> = doomed
            .iter()
            .map(|p| crate::layout::point_key(&p.id))
            .collect();
        self.delete_all(doomed_keys, options.dry_run).await?;
        report.deleted_points = doomed.iter().map(|p| p.id.clone()).collect();
        let markers = self.stale_sequence_markers().await?;
        report.deleted_sequence_markers = markers.len() as u64;
        self.delete_all(markers, options.dry_run).await?;

        // Base backups and the WAL only they need: the same window.
        let physical =
            crate::postgres::physical::prune_physical(self, env, cutoff, options.dry_run).await?;
        report.deleted_base_backups = physical.deleted_base_backups;
        report.deleted_wal_files = physical.deleted_wal_files;

        if !listing.damaged.is_empty() {
            let names: Vec<&str> = listing.damaged.iter().map(|d| d.key.as_str()).collect();
            report.sweep_skipped = Some(format!(
                "point files {} cannot be read, so what they reference is unknown: repair or \
                 remove them, then prune again",
                names.join(", ")
            ));
            return Ok(report);
        }

        // 2. Dumps no remaining point names: those of deleted points, and orphans (from
        //    interrupted backups) of this environment older than the window.
        let live_dumps: HashSet<String> = remaining
            .iter()
            .filter_map(|p| p.postgres.as_ref())
            .flat_map(|pg| pg.archives().into_iter().map(|a| a.key))
            .collect();
        let dumps = self.list(POSTGRES).await?;
        let mut dead_dumps = Vec::new();
        for meta in dumps {
            let key = meta.location.to_string();
            if live_dumps.contains(&key) {
                continue;
            }
            let Some(id) = dump_point_id(&meta.location) else {
                continue; // not ours
            };
            let of_deleted = doomed.iter().any(|p| p.id == id);
            let stale_orphan = id.environment() == env
                && id.timestamp() < cutoff
                && !listing.points.iter().any(|p| p.id == id);
            if of_deleted || stale_orphan {
                dead_dumps.push(meta.location);
            }
        }
        report.deleted_dumps = dead_dumps.iter().map(|k| k.to_string()).collect();
        self.delete_all(dead_dumps, options.dry_run).await?;

        // 3. Manifests no remaining point names: those of deleted points, and unreferenced
        //    snapshots of this environment older than the window.
        let live_snapshots: HashSet<&SnapshotId> = remaining
            .iter()
            .filter_map(|p| p.objects.as_ref().map(|o| &o.snapshot_id))
            .collect();
        let referenced: HashSet<&SnapshotId> = listing
            .points
            .iter()
            .filter_map(|p| p.objects.as_ref().map(|o| &o.snapshot_id))
            .collect();
        let mut manifests: HashMap<SnapshotId, Manifest> = HashMap::new();
        for id in list_snapshot_ids(self).await? {
            match self.read_manifest(&id).await {
                Ok(manifest) => {
                    manifests.insert(id, manifest);
                }
                Err(e) if crate::repo::is_not_found(&e) => {}
                Err(e) if matches!(e.downcast_ref(), Some(RepoError::Damaged { .. })) => {
                    report.sweep_skipped = Some(format!(
                        "{e:#}; its blobs are unknown, so no blob was swept: repair or remove \
                         it, then prune again"
                    ));
                    return Ok(report);
                }
                Err(e) => return Err(e),
            }
        }
        let mut dead_manifests = Vec::new();
        for (id, manifest) in &manifests {
            if live_snapshots.contains(id) {
                continue;
            }
            let of_deleted = doomed
                .iter()
                .any(|p| p.objects.as_ref().is_some_and(|o| &o.snapshot_id == id));
            let stale_orphan = !referenced.contains(id)
                && manifest.environment.as_deref() == Some(env)
                && manifest.finished_at < cutoff;
            if of_deleted || stale_orphan {
                dead_manifests.push(id.clone());
            }
        }
        dead_manifests.sort();
        self.delete_all(
            dead_manifests
                .iter()
                .map(crate::layout::manifest_key)
                .collect(),
            options.dry_run,
        )
        .await?;
        for id in &dead_manifests {
            manifests.remove(id);
        }
        report.deleted_manifests = dead_manifests;

        // 4. Staging leftovers: no snapshot runs while we hold the exclusive lock.
        let staging = self.list(STAGING).await?;
        report.deleted_staging = staging.len() as u64;
        self.delete_all(
            staging.into_iter().map(|m| m.location).collect(),
            options.dry_run,
        )
        .await?;

        // 5. Blobs no remaining manifest references (whatever its environment).
        // By id: in an encrypted repository a blob's name is a keyed hash of its sha256.
        let live_blobs: HashSet<String> = manifests
            .values()
            .flat_map(|m| m.objects.iter().map(|e| self.blob_id(&e.sha256)))
            .collect();
        let blobs = list_blob_sizes(self).await?;
        let mut dead_blobs = Vec::new();
        for (id, size) in &blobs {
            if !live_blobs.contains(id) {
                report.deleted_blobs += 1;
                report.deleted_blob_bytes += size;
                dead_blobs.push(crate::layout::blob_path(id));
            }
        }
        self.delete_all(dead_blobs, options.dry_run).await?;
        Ok(report)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = Path::from(prefix);
        self.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .with_context(|| format!("list {prefix} in repository {}", self.label))
    }

    /// Deletes keys in batches (S3: DeleteObjects); already-missing keys are fine.
    pub(crate) async fn delete_all(&self, keys: Vec<Path>, dry_run: bool) -> Result<()> {
        if dry_run || keys.is_empty() {
            return Ok(());
        }
        let unique: BTreeSet<Path> = keys.into_iter().collect();
        let stream = futures::stream::iter(unique.into_iter().map(Ok)).boxed();
        let store: &dyn ObjectStore = self.store.as_ref();
        let mut results = store.delete_stream(stream);
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("delete from repository {}", self.label)));
                }
            }
        }
        Ok(())
    }
}

/// The point id in `postgres/<id>.dump[.zst]` or `postgres/<id>/<file>`.
fn dump_point_id(key: &Path) -> Option<PointId> {
    // `postgres/<point>/<file>` (parallel dumps) or `postgres/<point>.dump[.zst]`.
    let parts: Vec<_> = key.parts().collect();
    if parts.len() == 3 {
        return PointId::parse(parts[1].as_ref()).ok();
    }
    let name = key.filename()?;
    let stem = name
        .strip_suffix(".dump.zst")
        .or_else(|| name.strip_suffix(".dump"))?;
    PointId::parse(stem).ok()
}
