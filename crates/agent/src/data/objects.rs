//! The objects agent's side of the data plane: snapshots, the restore target and scratch
//! preflight proves blobs into, restores into the live store with a quarantine, the live store
//! against a manifest, and lookups of referenced keys.
//!
//! The scratch directory holds one directory per run (named by its tag): preflight removes the
//! others' and keeps the bodies it proved in its own, the restore of that run writes from them
//! (hashing each again) and removes the directory once it succeeded.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use api::model::output::{
    ObjectsAtTime, RestoreObjectsOutput, TeardownObjectsOutput, UndoObjectsOutput,
};
use api::model::{Check, CheckKind, ObjectReferences, RepositoryRef};
use chrono::{DateTime, Utc};
use repository::{
    BlobScratch, ObjectSnapshotPart, PointId, RestoreObjectsOptions, RestoreTarget, S3Options,
    Shard, SnapshotOptions,
};

use super::{DataPlane, ObjectsConfig, VerifyMode, is_run_tag, run_tag};
use crate::progress::Reporter;

/// The rule that brings a store to a time: its bucket's versions, or (`None`) the newest
/// snapshot finished before it; with why.
async fn rule_at(objects: &ObjectsConfig) -> Result<(Option<repository::VersionedBucket>, String)> {
    if !(objects.url.starts_with("s3://") || objects.url.starts_with("s3a://")) {
        return Ok((None, "the store keeps no versions".to_owned()));
    }
    let s3 = S3Options::connection(
        objects.s3_endpoint.clone(),
        objects.s3_region.clone(),
        objects.s3_path_style,
    );
    let bucket = repository::VersionedBucket::open(&objects.url, &s3)?;
    Ok(match bucket.versioning().await? {
        repository::Versioning::Enabled => (Some(bucket), "bucket versioning enabled".to_owned()),
        repository::Versioning::Suspended => (None, "bucket versioning suspended".to_owned()),
        _ => (None, "bucket versioning never enabled".to_owned()),
    })
}

fn shown(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

impl DataPlane {
    /// Preflight of a run to a time: which rule brings the store there, and for the snapshot
    /// rule that a snapshot of this store finished at or before the time exists.
    pub(super) async fn preflight_objects_at(
        &self,
        repo: &RepositoryRef,
        at: DateTime<Utc>,
    ) -> Result<Check> {
        let objects = self.objects()?;
        let (bucket, reason) = rule_at(objects).await?;
        let detail = match bucket {
            Some(_) => format!(
                "rule versions ({reason}): each key's newest version at or before {}",
                shown(at)
            ),
            None => {
                let repo = repo.open().await?;
                let (_, label) = live_store(objects)?;
                let manifest = repository::snapshot_at(&repo, &label, at).await?;
                format!(
                    "rule snapshot ({reason}): snapshot {} finished {}, so the store is known \
                     as of {} and may have changed until {} unseen",
                    manifest.id,
                    manifest.finished_at.to_rfc3339(),
                    manifest.started_at.to_rfc3339(),
                    shown(at)
                )
            }
        };
        Ok(Check {
            name: format!("objects restorable to {}", shown(at)),
            kind: CheckKind::Objects,
            required: true,
            passed: true,
            detail,
        })
    }

    /// Brings the live store to time `at`: a versioned bucket's keys to their newest version
    /// at or before it (shard 0 does the whole bucket: no version is deleted, nothing is
    /// displaced), else this shard of the newest snapshot finished at or before it, displaced
    /// objects quarantined as in any restore.
    pub async fn restore_objects_to_time(
        &self,
        repo_ref: &RepositoryRef,
        at: DateTime<Utc>,
        run_id: &str,
        shard: u32,
        shards: u32,
        progress: &Reporter,
    ) -> Result<RestoreObjectsOutput> {
        let objects = self.objects()?;
        let shard = Shard::new(shard, shards).context("restore objects")?;
        let (bucket, reason) = rule_at(objects).await?;
        let mut at_time = ObjectsAtTime {
            to_time: shown(at),
            rule: String::new(),
            reason,
            uncertain_from: String::new(),
            uncertain_to: String::new(),
            uncertain_ms: 0,
            ambiguous: Vec::new(),
        };
        if let Some(bucket) = bucket {
            at_time.rule = "versions".to_owned();
            let mut out = RestoreObjectsOutput {
                snapshot: String::new(),
                shard: shard.index,
                shards: shard.count,
                restored: 0,
                restored_bytes: 0,
                from_scratch: 0,
                unchanged: 0,
                replaced: 0,
                removed: 0,
                quarantine_prefix: String::new(),
                at_time: None,
            };
            if shard.index == 0 {
                let mut options = repository::VersionsRestoreOptions::new(at);
                options.parallelism = objects.parallelism;
                let report = repository::restore_versions_to_time(&bucket, &options).await?;
                out.restored = report.brought_back.len() as u64;
                out.restored_bytes = report.brought_back.iter().map(|b| b.size).sum();
                out.removed = report.removed.len() as u64;
                out.unchanged = report.unchanged;
                at_time.ambiguous = report.ambiguous;
            }
            out.at_time = Some(at_time);
            return Ok(out);
        }
        at_time.rule = "snapshot".to_owned();
        let repo = repo_ref.open().await?;
        let (live, label) = live_store(objects)?;
        let mut options = RestoreObjectsOptions::new(label);
        options.parallelism = objects.parallelism;
        options.local_root = repository::local_dir(&objects.url);
        options.progress = Some(progress.transfers());
        options.quarantine_in_repository = true;
        options.quarantine_prefix = Some(object_store::path::Path::from(format!(
            "quarantine/{}",
            run_tag(run_id)
        )));
        options.shard = Some(shard);
        let report = repository::restore_snapshot_to_time(&repo, live, &options, at, false).await?;
        at_time.uncertain_from = report.uncertainty.from.to_rfc3339();
        at_time.uncertain_to = report.uncertainty.to.to_rfc3339();
        at_time.uncertain_ms = (report.uncertainty.seconds * 1000.0).max(0.0) as u64;
        let restored = report
            .restore
            .context("the snapshot restore reported nothing restored")?;
        Ok(RestoreObjectsOutput {
            snapshot: report.snapshot_id.as_str().to_owned(),
            shard: restored.shard,
            shards: restored.shards,
            restored: restored.restored,
            restored_bytes: restored.restored_bytes,
            from_scratch: restored.from_scratch,
            unchanged: restored.unchanged,
            replaced: restored.replaced.len() as u64,
            removed: restored.removed.len() as u64,
            quarantine_prefix: restored.quarantine_prefix,
            at_time: Some(at_time),
        })
    }

    pub async fn snapshot_objects(
        &self,
        repo: &RepositoryRef,
        point: &str,
        progress: &Reporter,
    ) -> Result<ObjectSnapshotPart> {
        let objects = self.objects()?;
        PointId::parse(point)?;
        let repo = repo.open().await?;
        let (live, label) = live_store(objects)?;
        let mut options = SnapshotOptions::new(label);
        options.environment = Some(self.environment.clone());
        options.local_root = repository::local_dir(&objects.url);
        options.parallelism = objects.parallelism;
        repository::snapshot_objects(&repo, live, &options, Some(progress.transfers())).await
    }

    /// The live store as preflight's restore target, with run `run_id`'s scratch directory
    /// when `keep` (the other runs' removed first). Without a scratch (not kept, limit 0, or it
    /// cannot be made) the blobs are proved all the same and the restore reads them again.
    pub(super) async fn restore_target(
        &self,
        objects: &ObjectsConfig,
        run_id: &str,
        keep: bool,
    ) -> Result<RestoreTarget> {
        let (store, label) = live_store(objects)?;
        self.remove_other_scratch(run_id);
        let scratch = match objects.scratch_limit_mib {
            _ if !keep => None,
            0 => None,
            mib => {
                let dir = self.scratch_dir(run_id);
                match BlobScratch::open(&dir, mib.saturating_mul(1 << 20)).await {
                    Ok(scratch) => Some(scratch),
                    Err(e) => {
                        tracing::warn!(
                            "no blob scratch for this run, the restore will read every blob \
                             from the repository: {e:#}"
                        );
                        None
                    }
                }
            }
        };
        Ok(RestoreTarget {
            store,
            label,
            hash_all: objects.verify == VerifyMode::Full,
            scratch,
            parallelism: objects.parallelism,
        })
    }

    fn scratch_dir(&self, run_id: &str) -> PathBuf {
        self.scratch_root.join(run_tag(run_id))
    }

    /// Removes the scratch directories of runs other than `run_id` (only directories named like
    /// a run tag: the scratch root may be shared with other files).
    fn remove_other_scratch(&self, run_id: &str) {
        let keep = run_tag(run_id);
        let Ok(entries) = std::fs::read_dir(&self.scratch_root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name == keep || !is_run_tag(name) || !entry.path().is_dir() {
                continue;
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    dir = %entry.path().display(),
                    "removed the blob scratch of an earlier run"
                ),
                Err(e) => tracing::warn!(
                    dir = %entry.path().display(),
                    "remove the blob scratch of an earlier run: {e}"
                ),
            }
        }
    }

    /// Makes the live store equal the point's manifest; displaced objects go to quarantine.
    pub async fn restore_objects(
        &self,
        repo: &RepositoryRef,
        point: &str,
        run_id: &str,
        shard: u32,
        shards: u32,
        progress: &Reporter,
    ) -> Result<RestoreObjectsOutput> {
        let objects = self.objects()?;
        // Several objects agents split one restore by key hash; each gets its shard.
        let shard = Shard::new(shard, shards).context("restore objects")?;
        let repo = repo.open().await?;
        let id = PointId::parse(point)?;
        let point = repo.read_point(&id).await?;
        let snapshot = point
            .objects
            .as_ref()
            .with_context(|| format!("point {id} has no object snapshot"))?
            .snapshot_id
            .clone();
        let (live, label) = live_store(objects)?;
        let mut options = RestoreObjectsOptions::new(label);
        options.parallelism = objects.parallelism;
        options.local_root = repository::local_dir(&objects.url);
        options.progress = Some(progress.transfers());
        // What the restore replaces or removes is kept in the repository, under
        // quarantine/<run tag>/, so the live store ends equal to the point.
        options.quarantine_in_repository = true;
        options.quarantine_prefix = Some(object_store::path::Path::from(format!(
            "quarantine/{}",
            run_tag(run_id)
        )));
        options.shard = Some(shard);
        // What this run's preflight proved and kept; each body is hashed again as it is used.
        let scratch_dir = self.scratch_dir(run_id);
        if scratch_dir.is_dir() {
            let limit = objects.scratch_limit_mib.saturating_mul(1 << 20);
            match BlobScratch::open(&scratch_dir, limit).await {
                Ok(scratch) => options.scratch = Some(scratch),
                Err(e) => tracing::warn!("read every blob from the repository: {e:#}"),
            }
        }
        let report = repository::restore_objects(&repo, &snapshot, live, &options).await?;
        if scratch_dir.is_dir()
            && let Err(e) = std::fs::remove_dir_all(&scratch_dir)
        {
            tracing::warn!(
                dir = %scratch_dir.display(),
                "remove the blob scratch the restore consumed: {e}"
            );
        }
        Ok(RestoreObjectsOutput {
            snapshot: snapshot.as_str().to_owned(),
            shard: report.shard,
            shards: report.shards,
            restored: report.restored,
            restored_bytes: report.restored_bytes,
            from_scratch: report.from_scratch,
            unchanged: report.unchanged,
            replaced: report.replaced.len() as u64,
            removed: report.removed.len() as u64,
            quarantine_prefix: report.quarantine_prefix,
            at_time: None,
        })
    }

    /// Puts this shard of the live store back as it was before run `undone_run`'s object
    /// restore, from the records and quarantine that restore left in the repository
    /// (`quarantine/<its tag>`); what the undo displaces goes to `quarantine/<run_id's tag>`.
    pub async fn undo_objects(
        &self,
        repo: &RepositoryRef,
        undone_run: &str,
        run_id: &str,
        shard: u32,
        shards: u32,
    ) -> Result<UndoObjectsOutput> {
        let objects = self.objects()?;
        let shard = Shard::new(shard, shards).context("undo objects")?;
        let repo = repo.open().await?;
        let (live, label) = live_store(objects)?;
        let quarantine =
            |run: &str| object_store::path::Path::from(format!("quarantine/{}", run_tag(run)));
        let options = repository::UndoObjectsOptions {
            target_label: label,
            restore_quarantine: quarantine(undone_run),
            undo_quarantine: quarantine(run_id),
            shard,
            parallelism: objects.parallelism,
        };
        let report = repository::undo_objects(&repo, live, &options).await?;
        Ok(UndoObjectsOutput {
            shard: shard.index,
            shards: shard.count,
            records: report.records,
            put_back: report.put_back.len() as u64,
            removed: report.removed.len() as u64,
            unchanged: report.unchanged,
            displaced: report.displaced,
            quarantine_prefix: options.undo_quarantine.to_string(),
        })
    }

    /// A restore test's teardown of this shard of run `run_id`'s object restore: the target
    /// store is put back as it was before the run (objects the restore created are taken out,
    /// ones it replaced or removed put back, from the run's records and quarantine), then the
    /// run's quarantine and the teardown's own are deleted from the repository. Nothing the
    /// run did not write is touched. Refused unless the agent allows teardowns.
    pub async fn teardown_objects(
        &self,
        repo: &RepositoryRef,
        run_id: &str,
        shard: u32,
        shards: u32,
    ) -> Result<TeardownObjectsOutput> {
        self.check_teardown_allowed("teardown-objects")?;
        let started = std::time::Instant::now();
        let objects = self.objects()?;
        let shard = Shard::new(shard, shards).context("teardown objects")?;
        let repo = repo.open().await?;
        let (live, label) = live_store(objects)?;
        let restore_tag = run_tag(run_id);
        // What the undo moves out of the target lands in a quarantine of its own, deleted next.
        let teardown_tag = run_tag(&format!("{run_id}/teardown"));
        let quarantine = |tag: &str| object_store::path::Path::from(format!("quarantine/{tag}"));
        let options = repository::UndoObjectsOptions {
            target_label: label,
            restore_quarantine: quarantine(&restore_tag),
            undo_quarantine: quarantine(&teardown_tag),
            shard,
            parallelism: objects.parallelism,
        };
        let report = repository::undo_objects(&repo, live, &options)
            .await
            .context("take the restored objects out of the target store")?;
        let mut deleted = 0;
        // One shard's teardown must not delete the records the other shards still read: only
        // a whole (single-shard) teardown deletes the run's quarantines.
        if shard.count == 1 {
            for tag in [&teardown_tag, &restore_tag] {
                deleted += repo
                    .delete_quarantine(tag)
                    .await
                    .with_context(|| format!("delete quarantine/{tag} of the restore test"))?;
            }
        }
        Ok(TeardownObjectsOutput {
            shard: shard.index,
            shards: shard.count,
            deleted: report.removed.len() as u64,
            put_back: report.put_back.len() as u64,
            quarantine_keys_deleted: deleted,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The objects agent's answer to `check-objects`: does every key the restored rows name
    /// exist in the live store? One check per reference set, naming missing keys.
    pub async fn check_objects(&self, sets: &[ObjectReferences]) -> Result<Vec<Check>> {
        use futures::StreamExt as _;
        let objects = self.objects()?;
        let (live, _) = live_store(objects)?;
        let mut checks = Vec::new();
        for set in sets {
            let answers: Vec<(String, std::result::Result<bool, String>)> =
                futures::stream::iter(set.keys.clone())
                    .map(|key| lookup(live.clone(), key))
                    .buffer_unordered(CHECK_OBJECTS_IN_FLIGHT)
                    .collect()
                    .await;
            let mut missing: Vec<String> = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            for (key, found) in answers {
                match found {
                    Ok(true) => {}
                    Ok(false) => missing.push(key),
                    Err(e) => errors.push(e),
                }
            }
            missing.sort_unstable();
            let scope = if set.sampled {
                format!(
                    "a random sample of {} of {} rows",
                    set.keys.len(),
                    set.total
                )
            } else {
                format!("all {} rows", set.total)
            };
            let passed = missing.is_empty() && errors.is_empty();
            let mut detail = if missing.is_empty() {
                format!("every object present; checked {scope}")
            } else {
                format!(
                    "{} missing from the store: {}{}; checked {scope}",
                    missing.len(),
                    missing
                        .iter()
                        .take(10)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if missing.len() > 10 { ", ..." } else { "" },
                )
            };
            if let Some(first) = errors.first() {
                detail.push_str(&format!(
                    "; {} lookups failed (first: {first})",
                    errors.len()
                ));
            }
            checks.push(Check {
                name: set.name.clone(),
                kind: CheckKind::Reference,
                required: set.required,
                passed,
                detail,
            });
        }
        Ok(checks)
    }
}

/// Whether `key` exists in the live store (`Err`: the lookup itself failed).
async fn lookup(
    live: Arc<dyn object_store::ObjectStore>,
    key: String,
) -> (String, std::result::Result<bool, String>) {
    let found = match object_store::path::Path::parse(&key) {
        Err(e) => Err(format!("{key:?} is not an object key ({e})")),
        Ok(path) => match object_store::ObjectStoreExt::head(&live, &path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(format!("look up {key}: {e}")),
        },
    };
    (key, found)
}

/// Lookups in flight while checking referenced objects.
const CHECK_OBJECTS_IN_FLIGHT: usize = 32;

/// Every manifest key in the live store with its size, and nothing else (quarantine aside).
pub(super) async fn compare_with_manifest(
    o: &ObjectsConfig,
    manifest: &repository::Manifest,
) -> Result<Check> {
    use futures::TryStreamExt;
    let (live, _) = live_store(o)?;
    let listed: Vec<object_store::ObjectMeta> = live
        .list(None)
        .try_collect()
        .await
        .context("list the live object store")?;
    let mut sizes: std::collections::BTreeMap<String, u64> = listed
        .into_iter()
        .filter(|m| !m.location.as_ref().starts_with(repository::QUARANTINE_ROOT))
        .filter(|m| {
            !o.verify_ignore
                .iter()
                .any(|p| m.location.as_ref().starts_with(p.as_str()))
        })
        .map(|m| (m.location.to_string(), m.size))
        .collect();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let ignored = |key: &str| o.verify_ignore.iter().any(|p| key.starts_with(p.as_str()));
    for entry in manifest.objects.iter().filter(|e| !ignored(&e.key)) {
        match sizes.remove(&entry.key) {
            None => missing.push(entry.key.clone()),
            Some(size) if size != entry.size => wrong.push(entry.key.clone()),
            Some(_) => {}
        }
    }
    let extra: Vec<String> = sizes.into_keys().collect();
    let passed = missing.is_empty() && wrong.is_empty() && extra.is_empty();
    let sample = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    let detail = if passed {
        format!(
            "{} objects present with their sizes",
            manifest.objects.len()
        )
    } else {
        format!(
            "{} missing ({}), {} with another size ({}), {} not in the point ({})",
            missing.len(),
            sample(&missing),
            wrong.len(),
            sample(&wrong),
            extra.len(),
            sample(&extra)
        )
    };
    Ok(Check {
        name: "objects match the point".into(),
        kind: CheckKind::Objects,
        required: true,
        passed,
        detail,
    })
}

fn live_store(o: &ObjectsConfig) -> Result<(Arc<dyn object_store::ObjectStore>, String)> {
    let s3 = S3Options::connection(o.s3_endpoint.clone(), o.s3_region.clone(), o.s3_path_style);
    let (store, prefix) = repository::store_from_url(&o.url, &s3).with_context(|| {
        format!(
            "open the live object store {}",
            repository::redact_url(&o.url)
        )
    })?;
    let store: Arc<dyn object_store::ObjectStore> = if prefix.as_ref().is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    };
    Ok((store, repository::redact_url(&o.url)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::path::Path as Key;

    /// Preflight of a run removes other runs' scratch (only directories named like a run tag),
    /// keeps what it proved in its own, and the restore of that run writes from it and removes
    /// it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn preflight_keeps_the_delta_for_its_run_and_the_restore_consumes_it() {
        let dir = tempfile::tempdir().unwrap();
        let live_dir = dir.path().join("live");
        std::fs::create_dir_all(&live_dir).unwrap();
        let repo_url = format!("file://{}", dir.path().join("repo").display());
        let config = ObjectsConfig {
            url: format!("file://{}", live_dir.display()),
            s3_endpoint: None,
            s3_region: None,
            s3_path_style: false,
            parallelism: 4,
            verify_ignore: vec![],
            verify: VerifyMode::Delta,
            scratch_dir: Some("scratch".into()),
            scratch_limit_mib: 16,
            // A file:// repository: `auto` would keep nothing.
            scratch: crate::data::ScratchMode::Always,
        };
        let data = DataPlane::from_config(
            &dir.path().join("agent.toml"),
            "obj-1",
            "dev",
            None,
            Some(&config),
        )
        .unwrap();
        let (live, _) = live_store(&config).unwrap();
        for i in 0..5 {
            let key = Key::from(format!("uploads/{i}"));
            live.put(&key, vec![i as u8; 1000].into()).await.unwrap();
        }
        let repo_ref = RepositoryRef {
            url: repo_url,
            s3_endpoint: None,
            s3_region: None,
            s3_path_style: false,
        };
        let point = PointId::parse("20260421T101500Z-dev-3f2a9c01").unwrap();
        let part = data
            .snapshot_objects(&repo_ref, point.as_str(), &Reporter::none())
            .await
            .unwrap();
        let repo = repo_ref.open().await.unwrap();
        repo.write_point(repository::NewPoint {
            id: point.clone(),
            postgres: None,
            objects: Some(part),
            secrets: vec![],
        })
        .await
        .unwrap();
        live.delete(&Key::from("uploads/3")).await.unwrap();

        let scratch = dir.path().join("scratch");
        let earlier = scratch.join(run_tag("an earlier run"));
        std::fs::create_dir_all(&earlier).unwrap();
        std::fs::create_dir_all(scratch.join("not-ours")).unwrap();
        let out = data
            .preflight(&repo_ref, point.as_str(), "this run")
            .await
            .unwrap();
        let verified = out.verify.unwrap();
        assert_eq!(
            (
                verified.delta_objects,
                verified.blobs_hashed,
                verified.scratch_bytes
            ),
            (1, 1, 1000)
        );
        assert!(!earlier.exists(), "an earlier run's scratch is removed");
        assert!(scratch.join("not-ours").exists(), "only run directories");
        let mine = scratch.join(run_tag("this run"));
        assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 1);

        let restored = data
            .restore_objects(
                &repo_ref,
                point.as_str(),
                "this run",
                0,
                1,
                &Reporter::none(),
            )
            .await
            .unwrap();
        assert_eq!((restored.restored, restored.from_scratch), (1, 1));
        assert!(!mine.exists(), "the restore consumed its scratch");
        let back = live.get(&Key::from("uploads/3")).await.unwrap();
        assert_eq!(back.bytes().await.unwrap().to_vec(), vec![3u8; 1000]);
    }
}
