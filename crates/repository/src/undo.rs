//! Taking an object restore back. Before a restore that quarantines into the repository writes
//! anything, it records which keys it may write or remove and what each held then (absent, or
//! present with its size): a [`RestoreRecord`] beside its quarantine, under
//! `<quarantine>.records/`. [`undo_objects`] reads those records and the quarantine alone (no
//! coordinator, no report): a key that held an object gets its quarantined copy back, a key the
//! restore created is moved out of the live store, and whatever the undo displaces goes to the
//! undo's own quarantine, so nothing is destroyed either way.
//!
//! Both are idempotent: a retried restore adds a record (the first record of a key says what it
//! held before any attempt), and an undo run again finds the keys already as they were.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::repo::Repository;
use crate::restore::{Shard, join};
use crate::snapshot::for_each_parallel;

/// The version of [`RestoreRecord`]'s shape; an undo refuses records of a newer one.
pub const RESTORE_RECORD_VERSION: u32 = 1;

/// What one restore (one attempt of one shard) was about to change in the live store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRecord {
    pub version: u32,
    pub snapshot: String,
    pub shard: u32,
    pub shards: u32,
    pub recorded_at: DateTime<Utc>,
    /// The restore's prefix in the target store; keys are relative to it.
    pub target_prefix: String,
    /// Every key the restore may write (missing, or holding other content) or remove (not in
    /// the snapshot), with what it held before the restore touched it.
    pub keys: Vec<RecordedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedKey {
    pub key: String,
    pub before: Before,
}

/// What a key held before a restore touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Before {
    /// No object: the restore created it.
    Absent,
    /// An object of this size: the restore replaced or removed it, after copying it to the
    /// quarantine.
    Present { size: u64 },
}

/// Where the records of the restore quarantining into `quarantine` live: beside it, never
/// inside it (where they could collide with an object's key).
pub fn records_prefix(quarantine: &Path) -> Path {
    Path::from(format!("{quarantine}.records"))
}

/// Writes `record` under `quarantine`'s records, before the restore changes anything.
pub(crate) async fn write_record(
    repo: &Repository,
    quarantine: &Path,
    record: &RestoreRecord,
) -> Result<()> {
    let name = format!(
        "{}-shard-{}-of-{}-{:08x}.json",
        record.recorded_at.format("%Y%m%dT%H%M%S%.6fZ"),
        record.shard,
        record.shards,
        rand::random::<u32>()
    );
    let location = records_prefix(quarantine).join(name.as_str());
    let body = serde_json::to_vec_pretty(record).context("encode the restore record")?;
    repo.store()
        .put(&location, PutPayload::from(body))
        .await
        .with_context(|| format!("write the restore record {location} to the repository"))?;
    Ok(())
}

/// The records of the restore that quarantined into `quarantine`, oldest first.
pub async fn read_records(repo: &Repository, quarantine: &Path) -> Result<Vec<RestoreRecord>> {
    let prefix = records_prefix(quarantine);
    let mut listed: Vec<Path> = repo
        .store()
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .with_context(|| format!("list the restore records under {prefix}"))?;
    listed.sort();
    let mut records = Vec::new();
    for location in listed {
        let body = repo.get_bytes(&location, "restore record").await?;
        let record: RestoreRecord = serde_json::from_slice(&body).with_context(|| {
            format!("restore record {location} is not a record this version reads")
        })?;
        anyhow::ensure!(
            record.version <= RESTORE_RECORD_VERSION,
            "restore record {location} has version {}, newer than this agent's {}: upgrade \
             the agent",
            record.version,
            RESTORE_RECORD_VERSION
        );
        records.push(record);
    }
    Ok(records)
}

/// What [`undo_objects`] does.
#[derive(Debug, Clone)]
pub struct UndoObjectsOptions {
    /// How messages name the live store.
    pub target_label: String,
    /// Where the undone restore quarantined (in the repository), e.g. `quarantine/<tag>`.
    pub restore_quarantine: Path,
    /// Where the undo moves what it displaces (in the repository), e.g.
    /// `quarantine/<undo tag>`.
    pub undo_quarantine: Path,
    /// Undo only the keys this shard owns (default: all of them).
    pub shard: Shard,
    pub parallelism: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UndoObjectsReport {
    /// Restore records read (0: the restore never started writing; nothing to undo).
    pub records: u64,
    /// Keys whose quarantined object was put back.
    pub put_back: Vec<String>,
    /// Keys the restore created, moved from the live store to the undo's quarantine.
    pub removed: Vec<String>,
    /// Keys already as they were before the restore (or that it never got to).
    pub unchanged: u64,
    /// Of `put_back`, keys whose live object (written since the restore) was moved to the
    /// undo's quarantine first.
    pub displaced: u64,
}

enum Undid {
    PutBack { displaced: bool },
    Removed,
    Unchanged,
}

/// Puts the live store back as it was before the restore whose records and quarantine are
/// under `options.restore_quarantine`.
#[tracing::instrument(name = "repository.objects.undo", skip_all, fields(quarantine = %options.restore_quarantine))]
pub async fn undo_objects(
    repo: &Repository,
    target: Arc<dyn ObjectStore>,
    options: &UndoObjectsOptions,
) -> Result<UndoObjectsReport> {
    options.shard.validate()?;
    let records = read_records(repo, &options.restore_quarantine).await?;
    // The first record of a key says what it held before any attempt of the restore.
    let mut keys: BTreeMap<(String, String), Before> = BTreeMap::new();
    for record in &records {
        for k in &record.keys {
            keys.entry((record.target_prefix.clone(), k.key.clone()))
                .or_insert(k.before);
        }
    }
    let jobs: Vec<(String, String, Before)> = keys
        .into_iter()
        .filter(|((_, key), _)| options.shard.owns(key))
        .map(|((prefix, key), before)| (prefix, key, before))
        .collect();
    let shared = Arc::new((repo.clone(), target, options.clone()));
    let done = for_each_parallel(jobs, options.parallelism, move |(prefix, key, before)| {
        let shared = shared.clone();
        async move {
            let (repo, target, options) = &*shared;
            let undid = undo_one(repo, target, options, &prefix, &key, before)
                .await
                .with_context(|| format!("undo the restore of object {key}"))?;
            Ok((key, undid))
        }
    })
    .await
    .with_context(|| {
        format!(
            "undo the object restore in {}; run the undo again to finish it (keys already \
             back are left alone)",
            options.target_label
        )
    })?;
    let mut report = UndoObjectsReport {
        records: records.len() as u64,
        ..UndoObjectsReport::default()
    };
    for (key, undid) in done {
        match undid {
            Undid::PutBack { displaced } => {
                report.displaced += u64::from(displaced);
                report.put_back.push(key);
            }
            Undid::Removed => report.removed.push(key),
            Undid::Unchanged => report.unchanged += 1,
        }
    }
    report.put_back.sort();
    report.removed.sort();
    Ok(report)
}

async fn undo_one(
    repo: &Repository,
    target: &Arc<dyn ObjectStore>,
    options: &UndoObjectsOptions,
    prefix: &str,
    key: &str,
    before: Before,
) -> Result<Undid> {
    let location = join(&Path::from(prefix), key)?;
    let live = read(target, &location)
        .await
        .with_context(|| format!("read {location} in the live store {}", options.target_label))?;
    let kept = match before {
        Before::Absent => None,
        Before::Present { .. } => {
            let mut found = None;
            for copy in repo.quarantine_entries(&options.restore_quarantine, key)? {
                if let Some(body) = read(repo.store(), &copy)
                    .await
                    .map_err(|e| repo.read_failure("quarantined object", &copy, e))?
                {
                    found = Some(body);
                    break;
                }
            }
            match found {
                Some(body) => Some(body),
                // Never copied to the quarantine: the restore never displaced it.
                None => return Ok(Undid::Unchanged),
            }
        }
    };
    if live == kept {
        return Ok(Undid::Unchanged);
    }
    // What the live store holds now (the restore's object, or a write since) is kept first.
    let displaced = match &live {
        Some(body) => {
            let to = repo.quarantine_entry(&options.undo_quarantine, key)?;
            repo.store()
                .put(&to, PutPayload::from_bytes(body.clone()))
                .await
                .with_context(|| format!("copy {location} to the undo's quarantine {to}"))?;
            true
        }
        None => false,
    };
    match kept {
        Some(body) => {
            target
                .put(&location, PutPayload::from_bytes(body))
                .await
                .with_context(|| format!("put {location} back into {}", options.target_label))?;
            Ok(Undid::PutBack { displaced })
        }
        None => {
            match target.delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(anyhow::Error::from(e).context(format!(
                        "remove {location}, which the restore created, from {}",
                        options.target_label
                    )));
                }
            }
            Ok(Undid::Removed)
        }
    }
}

async fn read(store: &Arc<dyn ObjectStore>, location: &Path) -> Result<Option<Bytes>> {
    match store.get(location).await {
        Ok(got) => Ok(Some(got.bytes().await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
