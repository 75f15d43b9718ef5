//! Objects at the same instant as a point-in-time recovery of Postgres: a live object store
//! brought back to time T.
//!
//! * A versioned S3 bucket ([`restore_versions_to_time`]): each key under the prefix gets the
//!   newest version whose LastModified is at or before T; a key deleted at T, or not yet
//!   written, is removed. Nothing is destroyed: bringing a version back writes it again as a
//!   new version, removing a key adds a delete marker, so every version stays listed and a
//!   second restore can go anywhere again. Each run recomputes from the versions, so a run
//!   interrupted halfway is finished by the next, and a run after a complete one changes
//!   nothing.
//! * Any other store ([`restore_snapshot_to_time`]): the newest object snapshot of the store
//!   in the repository finished at or before T, restored with quarantine like any snapshot.
//!   Objects may have changed between that snapshot and T: the report gives the window.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    WriteMultipart,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::layout::{QUARANTINE_ROOT, SnapshotId};
use crate::repo::Repository;
use crate::restore::{RestoreObjectsOptions, RestoreObjectsReport, restore_objects};
use crate::snapshot::for_each_parallel;
use crate::versions::{
    ObjectVersion, VersionedBucket, ambiguous_at, by_key, current, version_to_restore,
};

/// Bodies at least this large are written back in parts.
const MULTIPART_AT: u64 = 8 << 20;

/// What [`restore_versions_to_time`] does.
#[derive(Debug, Clone)]
pub struct VersionsRestoreOptions {
    pub to_time: DateTime<Utc>,
    /// Compute and report the changes, make none.
    pub dry_run: bool,
    /// Keys written or removed at once (default 16).
    pub parallelism: usize,
}

impl VersionsRestoreOptions {
    pub fn new(to_time: DateTime<Utc>) -> VersionsRestoreOptions {
        VersionsRestoreOptions {
            to_time,
            dry_run: false,
            parallelism: 16,
        }
    }
}

/// A version written back onto its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BroughtBack {
    pub key: String,
    pub version_id: String,
    pub last_modified: DateTime<Utc>,
    pub size: u64,
}

/// What a restore of a versioned bucket to a time changed (or, dry, would change).
#[derive(Debug, Clone, Serialize)]
pub struct VersionsRestoreReport {
    /// Always `versions`: each key's newest version at or before the time.
    pub rule: &'static str,
    pub store: String,
    pub to_time: DateTime<Utc>,
    pub dry_run: bool,
    /// Keys with at least one version under the prefix.
    pub keys: u64,
    /// Versions and delete markers listed.
    pub versions: u64,
    /// Keys whose version at the time was written back (sorted by key).
    pub brought_back: Vec<BroughtBack>,
    /// Keys deleted at the time, or not yet written, that existed: now delete-marked.
    pub removed: Vec<String>,
    /// Keys already as they were at the time (present or absent).
    pub unchanged: u64,
    /// Keys with a version stamped in the time's own second (S3 keeps whole seconds), so what
    /// they held at the time cannot be told from what they held a moment later: a delete
    /// there was not applied (sorted by key).
    pub ambiguous: Vec<String>,
}

/// What one key needs, decided from its versions alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Already as at the time: the same version is current, or a version with the same
    /// size and ETag, or the key is absent as it was.
    Unchanged,
    /// Absent at the time, present now.
    Remove,
    /// Present at the time with other content than now (or absent now).
    BringBack(ObjectVersion),
    /// Same size but the ETags cannot tell (a multipart ETag on either side): compare the
    /// bodies.
    Compare {
        wanted: ObjectVersion,
        live: ObjectVersion,
    },
}

/// The decision for one key's history (newest first).
pub(crate) fn decide(history: &[ObjectVersion], at: DateTime<Utc>) -> Decision {
    let wanted = version_to_restore(history, at).filter(|v| !v.delete_marker);
    let live = current(history).filter(|v| !v.delete_marker);
    match (wanted, live) {
        (None, None) => Decision::Unchanged,
        (None, Some(_)) => Decision::Remove,
        (Some(wanted), None) => Decision::BringBack(wanted.clone()),
        (Some(wanted), Some(live)) => {
            if wanted.version_id == live.version_id {
                return Decision::Unchanged;
            }
            if wanted.size != live.size {
                return Decision::BringBack(wanted.clone());
            }
            match (&wanted.etag, &live.etag) {
                // A single-part ETag is the body's MD5: equal ETags, equal bodies.
                (Some(a), Some(b)) if a == b && !a.contains('-') => Decision::Unchanged,
                // Two single-part ETags that differ: the bodies differ.
                (Some(a), Some(b)) if !a.contains('-') && !b.contains('-') => {
                    Decision::BringBack(wanted.clone())
                }
                _ => Decision::Compare {
                    wanted: wanted.clone(),
                    live: live.clone(),
                },
            }
        }
    }
}

/// The key as object_store names it, refused (with what to do) when it cannot.
fn object_path(key: &str, label: &str) -> Result<Path> {
    let refuse = || {
        format!(
            "key {key:?} in {label} is not a key rollcall can restore (empty or '.'/'..' path \
             segments, a slash at either end, or control characters): restore it by hand, or \
             narrow the store URL's prefix to leave it out"
        )
    };
    let path = Path::parse(key).with_context(refuse)?;
    // Path::parse drops a slash at either end: that would name another key.
    if path.as_ref() != key {
        bail!(refuse());
    }
    Ok(path)
}

/// Restores the keys under the bucket's prefix to `options.to_time` from their versions.
/// Refuses a bucket without versioning enabled before listing anything.
#[tracing::instrument(name = "repository.objects.restore_versions", skip_all, fields(store = %bucket.label, to_time = %options.to_time))]
pub async fn restore_versions_to_time(
    bucket: &VersionedBucket,
    options: &VersionsRestoreOptions,
) -> Result<VersionsRestoreReport> {
    bucket.require_versioning().await?;
    let listed = bucket.list_versions().await?;
    let versions = listed.len() as u64;
    let quarantine = if bucket.prefix.is_empty() {
        format!("{QUARANTINE_ROOT}/")
    } else {
        format!("{}/{QUARANTINE_ROOT}/", bucket.prefix)
    };
    let keys = by_key(listed);
    let mut report = VersionsRestoreReport {
        rule: "versions",
        store: bucket.label.clone(),
        to_time: options.to_time,
        dry_run: options.dry_run,
        keys: 0,
        versions,
        brought_back: Vec::new(),
        removed: Vec::new(),
        unchanged: 0,
        ambiguous: Vec::new(),
    };
    // Decide every key first, and check that every key to change can be named, before
    // anything is written.
    let mut work = Vec::new();
    for (key, history) in &keys {
        // Object restores from snapshots keep what they displace there; not the service's.
        if key.starts_with(&quarantine) {
            continue;
        }
        report.keys += 1;
        if ambiguous_at(history, options.to_time) {
            report.ambiguous.push(key.clone());
        }
        let decision = decide(history, options.to_time);
        if decision != Decision::Unchanged {
            work.push((object_path(key, &bucket.label)?, key.clone(), decision));
        } else {
            report.unchanged += 1;
        }
    }
    let store: Arc<dyn ObjectStore> = bucket.store.clone();
    let label = Arc::new(bucket.label.clone());
    let dry_run = options.dry_run;
    let outcomes = for_each_parallel(
        work,
        options.parallelism.max(1),
        move |(path, key, decision)| {
            let store = store.clone();
            let label = label.clone();
            async move {
                let decision = match decision {
                    Decision::Compare { wanted, live } => {
                        let same = same_body(&store, &path, &wanted, &live)
                            .await
                            .with_context(|| format!("compare versions of {key:?} in {label}"))?;
                        if same {
                            Decision::Unchanged
                        } else {
                            Decision::BringBack(wanted)
                        }
                    }
                    other => other,
                };
                if !dry_run {
                    match &decision {
                        Decision::Remove => store.delete(&path).await.with_context(|| {
                            format!("delete {key:?} in {label} (adds a delete marker)")
                        })?,
                        Decision::BringBack(version) => {
                            write_back(&store, &path, version).await.with_context(|| {
                                format!(
                                    "bring back version {} of {key:?} in {label}",
                                    version.version_id
                                )
                            })?
                        }
                        Decision::Unchanged | Decision::Compare { .. } => {}
                    }
                }
                Ok((key, decision))
            }
        },
    )
    .await?;
    for (key, decision) in outcomes {
        match decision {
            Decision::Remove => report.removed.push(key),
            Decision::BringBack(v) => report.brought_back.push(BroughtBack {
                key,
                version_id: v.version_id,
                last_modified: v.last_modified,
                size: v.size,
            }),
            Decision::Unchanged | Decision::Compare { .. } => report.unchanged += 1,
        }
    }
    report.removed.sort();
    report.ambiguous.sort();
    report.brought_back.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

fn get_version(version: &ObjectVersion) -> GetOptions {
    GetOptions {
        version: Some(version.version_id.clone()),
        ..GetOptions::default()
    }
}

/// sha256 and length of one version's body.
async fn hash_version(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    version: &ObjectVersion,
) -> Result<(String, u64)> {
    let got = store.get_opts(path, get_version(version)).await?;
    let mut stream = got.into_stream();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

async fn same_body(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    wanted: &ObjectVersion,
    live: &ObjectVersion,
) -> Result<bool> {
    Ok(hash_version(store, path, wanted).await? == hash_version(store, path, live).await?)
}

/// Writes `version`'s body and attributes (content type and the like) onto its key as a new
/// version.
async fn write_back(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    version: &ObjectVersion,
) -> Result<()> {
    let got = store.get_opts(path, get_version(version)).await?;
    let attributes = got.attributes.clone();
    let expected = version.size;
    let mut written = 0u64;
    if expected < MULTIPART_AT {
        let body = got.bytes().await?;
        written = body.len() as u64;
        check_read(written, expected)?;
        store
            .put_opts(
                path,
                PutPayload::from(body),
                PutOptions {
                    attributes,
                    ..PutOptions::default()
                },
            )
            .await?;
        return Ok(());
    }
    let upload = store
        .put_multipart_opts(
            path,
            PutMultipartOptions {
                attributes,
                ..PutMultipartOptions::default()
            },
        )
        .await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_AT as usize);
    let mut stream = got.into_stream();
    let streamed: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            written += chunk.len() as u64;
            writer.wait_for_capacity(4).await?;
            writer.put(chunk);
        }
        check_read(written, expected)
    }
    .await;
    match streamed {
        Ok(()) => {
            writer.finish().await?;
            Ok(())
        }
        Err(e) => {
            // An aborted upload never becomes a version.
            let _ = writer.abort().await;
            Err(e)
        }
    }
}

fn check_read(read: u64, expected: u64) -> Result<()> {
    if read != expected {
        bail!(
            "read {read} bytes of a version listed with {expected}: it changed or the read was cut short"
        );
    }
    Ok(())
}

/// The uncertainty of a restore by the snapshot rule: the objects are as the snapshot read
/// them (between its start and finish); what changed from its start to T is not restored.
#[derive(Debug, Clone, Serialize)]
pub struct UncertaintyWindow {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub seconds: f64,
}

/// What a restore of a store without versions to a time did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRestoreReport {
    /// Always `snapshot`: the newest object snapshot of the store finished at or before the
    /// time.
    pub rule: &'static str,
    pub store: String,
    pub to_time: DateTime<Utc>,
    pub dry_run: bool,
    pub snapshot_id: SnapshotId,
    pub snapshot_started_at: DateTime<Utc>,
    pub snapshot_finished_at: DateTime<Utc>,
    pub objects: u64,
    pub uncertainty: UncertaintyWindow,
    /// The restore (none on a dry run).
    pub restore: Option<RestoreObjectsReport>,
}

/// The snapshot the snapshot rule picks for store `source` (as the manifests name it) at
/// `to_time`: of those finished at or before it, the one started last. Refuses a time before
/// the first.
pub async fn snapshot_at(
    repo: &Repository,
    source: &str,
    to_time: DateTime<Utc>,
) -> Result<crate::snapshot::Manifest> {
    // Newest first by id, which is stamped (to the second) when its snapshot started.
    let ids = repo.list_snapshots().await?;
    let mut later = Vec::new();
    let mut best: Option<crate::snapshot::Manifest> = None;
    for id in &ids {
        // One started after T cannot be it.
        if id.timestamp() > to_time {
            later.push(id);
            continue;
        }
        // Ids of one second are in no particular order: look at all of the best one's second.
        if best
            .as_ref()
            .is_some_and(|b| id.timestamp() < b.id.timestamp())
        {
            break;
        }
        let manifest = repo
            .read_manifest(id)
            .await
            .with_context(|| format!("read snapshot {id} to see whether it is of {source}"))?;
        if manifest.source != source {
            continue;
        }
        if manifest.finished_at > to_time {
            later.push(id);
            continue;
        }
        let newer = best.as_ref().is_none_or(|b| {
            (manifest.started_at, manifest.finished_at) > (b.started_at, b.finished_at)
        });
        if newer {
            best = Some(manifest);
        }
    }
    if let Some(best) = best {
        return Ok(best);
    }
    // No snapshot of the store at T: name the one finished first after it (or that there is
    // none). Ids in one second are in no particular order, so read on until past its finish.
    later.sort();
    let mut first: Option<crate::snapshot::Manifest> = None;
    for id in later {
        if first
            .as_ref()
            .is_some_and(|f| id.timestamp() > f.finished_at)
        {
            break;
        }
        let manifest = repo.read_manifest(id).await?;
        if manifest.source == source
            && first
                .as_ref()
                .is_none_or(|f| manifest.finished_at < f.finished_at)
        {
            first = Some(manifest);
        }
    }
    if let Some(first) = first {
        bail!(
            "{to_time} is before the first snapshot of {source} that finished (snapshot {}, \
             {} to {}): nothing in repository {} shows the store at that time; choose a time \
             at or after {}",
            first.id,
            first.started_at.to_rfc3339(),
            first.finished_at.to_rfc3339(),
            repo.label(),
            first.finished_at.to_rfc3339()
        );
    }
    bail!(
        "repository {} holds no object snapshot of {source} finished at or before {to_time} \
         (snapshots are matched by the store URL they were taken from: `rollcall repo \
         snapshot --store {source}`)",
        repo.label()
    )
}

/// Restores `target` (named `options.target_label`, which must be the URL its snapshots were
/// taken from) to the newest snapshot of it finished at or before `to_time`.
#[tracing::instrument(name = "repository.objects.restore_snapshot_at", skip_all, fields(to_time = %to_time))]
pub async fn restore_snapshot_to_time(
    repo: &Repository,
    target: Arc<dyn ObjectStore>,
    options: &RestoreObjectsOptions,
    to_time: DateTime<Utc>,
    dry_run: bool,
) -> Result<SnapshotRestoreReport> {
    let manifest = snapshot_at(repo, &options.target_label, to_time).await?;
    let restore = if dry_run {
        None
    } else {
        Some(restore_objects(repo, &manifest.id, target, options).await?)
    };
    let gap = to_time - manifest.started_at;
    Ok(SnapshotRestoreReport {
        rule: "snapshot",
        store: options.target_label.clone(),
        to_time,
        dry_run,
        snapshot_id: manifest.id.clone(),
        snapshot_started_at: manifest.started_at,
        snapshot_finished_at: manifest.finished_at,
        objects: manifest.objects.len() as u64,
        uncertainty: UncertaintyWindow {
            from: manifest.started_at,
            to: to_time,
            seconds: gap.num_milliseconds() as f64 / 1000.0,
        },
        restore,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-12-06T10:00:{second:02}Z"))
            .expect("time")
            .with_timezone(&Utc)
    }

    fn v(id: &str, second: u32, latest: bool, etag: &str, size: u64) -> ObjectVersion {
        ObjectVersion {
            key: "k".into(),
            version_id: id.into(),
            last_modified: at(second),
            is_latest: latest,
            delete_marker: false,
            etag: Some(etag.into()),
            size,
        }
    }

    fn marker(id: &str, second: u32, latest: bool) -> ObjectVersion {
        ObjectVersion {
            delete_marker: true,
            etag: None,
            size: 0,
            ..v(id, second, latest, "", 0)
        }
    }

    #[test]
    fn names_keys_object_store_cannot_address() {
        assert!(object_path("app/b c/é 日本.txt", "s3://live/app").is_ok());
        for bad in ["app//x", "app/../x", "app/x/", "/app/x", "app/\u{1}x"] {
            let err = object_path(bad, "s3://live/app").expect_err(bad);
            let text = format!("{err:#}");
            assert!(
                text.contains("not a key rollcall can restore") && text.contains("s3://live/app"),
                "{text}"
            );
        }
    }

    #[test]
    fn decides_each_key_from_its_versions() {
        // Overwritten after T: the old version comes back.
        let overwritten = [v("2", 5, true, "b", 3), v("1", 1, false, "a", 3)];
        assert_eq!(
            decide(&overwritten, at(2)),
            Decision::BringBack(overwritten[1].clone())
        );
        // The current version is the one at T.
        assert_eq!(decide(&overwritten, at(6)), Decision::Unchanged);
        // Brought back before: a newer version with the same content (same single-part ETag).
        let restored = [
            v("3", 7, true, "a", 3),
            v("2", 5, false, "b", 3),
            v("1", 1, false, "a", 3),
        ];
        assert_eq!(decide(&restored, at(2)), Decision::Unchanged);
        // Deleted after T: brought back.
        let deleted = [marker("2", 5, true), v("1", 1, false, "a", 3)];
        assert_eq!(
            decide(&deleted, at(2)),
            Decision::BringBack(deleted[1].clone())
        );
        // Deleted before T and still deleted: nothing to do; written again since: removed.
        assert_eq!(decide(&deleted, at(6)), Decision::Unchanged);
        let rewritten = [
            v("3", 8, true, "c", 3),
            marker("2", 5, false),
            v("1", 1, false, "a", 3),
        ];
        assert_eq!(decide(&rewritten, at(6)), Decision::Remove);
        // A delete stamped in T's own second may have come just after T: not applied, and
        // the key is ambiguous; a delete in an earlier second is.
        let same_second = [marker("2", 2, true), v("1", 1, false, "a", 3)];
        let t = at(2) + chrono::Duration::milliseconds(300);
        assert_eq!(
            decide(&same_second, t),
            Decision::BringBack(same_second[1].clone())
        );
        assert!(crate::versions::ambiguous_at(&same_second, t));
        assert!(!crate::versions::ambiguous_at(&same_second, at(3)));
        assert_eq!(
            decide(&same_second, at(3)),
            Decision::Unchanged,
            "deleted before T"
        );
        // Not written yet at T: removed; already removed: unchanged.
        assert_eq!(decide(&overwritten, at(0)), Decision::Remove);
        let removed = [marker("9", 9, true), v("1", 1, false, "a", 3)];
        assert_eq!(decide(&removed, at(0)), Decision::Unchanged);
        // Multipart ETags cannot vouch: the bodies are compared.
        let multipart = [v("2", 5, true, "m-2", 3), v("1", 1, false, "m-2", 3)];
        assert!(matches!(
            decide(&multipart, at(2)),
            Decision::Compare { .. }
        ));
        // Same size, other single-part ETag: different bodies.
        let other = [v("2", 5, true, "x", 3), v("1", 1, false, "y", 3)];
        assert_eq!(decide(&other, at(2)), Decision::BringBack(other[1].clone()));
    }
}
