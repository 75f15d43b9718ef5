//! The objects agent's side of the data plane: snapshots, restores into the live store with a
//! quarantine, the live store against a manifest, and lookups of referenced keys.

use std::sync::Arc;

use anyhow::{Context, Result};
use api::model::output::RestoreObjectsOutput;
use api::model::{Check, CheckKind, ObjectReferences, RepositoryRef};
use repository::{
    ObjectSnapshotPart, PointId, RestoreObjectsOptions, S3Options, Shard, SnapshotOptions,
};

use super::{DataPlane, ObjectsConfig, run_tag};
use crate::progress::Reporter;

impl DataPlane {
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
        options.parallelism = objects.parallelism;
        repository::snapshot_objects(&repo, live, &options, Some(progress.transfers())).await
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
        options.progress = Some(progress.transfers());
        // What the restore replaces or removes is kept in the repository, under
        // quarantine/<run tag>/, so the live store ends equal to the point.
        options.quarantine_in_repository = true;
        options.quarantine_prefix = Some(object_store::path::Path::from(format!(
            "quarantine/{}",
            run_tag(run_id)
        )));
        options.shard = Some(shard);
        let report = repository::restore_objects(&repo, &snapshot, live, &options).await?;
        Ok(RestoreObjectsOutput {
            snapshot: snapshot.as_str().to_owned(),
            shard: report.shard,
            shards: report.shards,
            restored: report.restored,
            restored_bytes: report.restored_bytes,
            unchanged: report.unchanged,
            replaced: report.replaced.len() as u64,
            removed: report.removed.len() as u64,
            quarantine_prefix: report.quarantine_prefix,
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
