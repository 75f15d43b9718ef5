//! The quarantines fleet restores and undos keep in the repository (`quarantine/<tag>/` with
//! their records under `quarantine/<tag>.records/`; see `layout`): listing them with their sizes,
//! and deleting one an operator's prune chose. Which may go is the coordinator's decision.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::layout::{QUARANTINE, is_run_tag};
use crate::repo::Repository;

/// One run's quarantine in the repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptQuarantine {
    /// The run tag (`quarantine/<tag>/`).
    pub tag: String,
    /// Objects under `quarantine/<tag>/` and their bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Restore records under `quarantine/<tag>.records/` and their bytes.
    pub records: u64,
    pub record_bytes: u64,
    /// When the oldest of them was written (the store's last-modified time).
    pub oldest: Option<DateTime<Utc>>,
}

impl KeptQuarantine {
    /// The prefix an operator reads: `quarantine/<tag>/`.
    pub fn prefix(&self) -> String {
        format!("{QUARANTINE}/{}/", self.tag)
    }
}

impl Repository {
    /// Every run's quarantine, by tag. Keys under `quarantine/` that are not of a run tag are
    /// not listed (nothing here writes them, so nothing here deletes them).
    pub async fn list_quarantines(&self) -> Result<Vec<KeptQuarantine>> {
        let root = Path::from(QUARANTINE);
        let store: &dyn ObjectStore = self.store().as_ref();
        let metas: Vec<_> = store
            .list(Some(&root))
            .try_collect()
            .await
            .with_context(|| format!("list {root}/ in repository {}", self.label()))?;
        let mut out: BTreeMap<String, KeptQuarantine> = BTreeMap::new();
        for meta in metas {
            let Some(first) = meta.location.parts().nth(1) else {
                continue;
            };
            let first = first.as_ref();
            let (tag, records) = match first.strip_suffix(".records") {
                Some(tag) => (tag, true),
                None => (first, false),
            };
            if !is_run_tag(tag) {
                continue;
            }
            let q = out.entry(tag.to_owned()).or_insert_with(|| KeptQuarantine {
                tag: tag.to_owned(),
                ..KeptQuarantine::default()
            });
            if records {
                q.records += 1;
                q.record_bytes += meta.size;
            } else {
                q.objects += 1;
                q.bytes += meta.size;
            }
            q.oldest = Some(
                q.oldest
                    .map_or(meta.last_modified, |o| o.min(meta.last_modified)),
            );
        }
        Ok(out.into_values().collect())
    }

    /// Deletes run `tag`'s quarantine and its restore records; returns how many keys went.
    /// Records go last, so an interrupted delete never leaves objects without the records
    /// that say what they were.
    pub async fn delete_quarantine(&self, tag: &str) -> Result<u64> {
        if !is_run_tag(tag) {
            bail!(
                "{tag:?} is not a run tag (r and 8 hex digits); refusing to delete under \
                 {QUARANTINE}/ — `rollcall kept list` names the quarantines"
            );
        }
        let mut deleted = 0;
        for prefix in [
            Path::from(format!("{QUARANTINE}/{tag}")),
            Path::from(format!("{QUARANTINE}/{tag}.records")),
        ] {
            let store: &dyn ObjectStore = self.store().as_ref();
            let keys: Vec<Path> = store
                .list(Some(&prefix))
                .map_ok(|m| m.location)
                .try_collect()
                .await
                .with_context(|| format!("list {prefix}/ in repository {}", self.label()))?;
            deleted += keys.len() as u64;
            let mut results =
                store.delete_stream(futures::stream::iter(keys.into_iter().map(Ok)).boxed());
            while let Some(result) = results.next().await {
                match result {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        return Err(anyhow::Error::new(e).context(format!(
                            "delete {prefix}/ from repository {}",
                            self.label()
                        )));
                    }
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt as _, PutPayload};

    use super::*;
    use crate::repo::RepositoryOptions;

    #[tokio::test]
    async fn quarantines_list_by_tag_and_delete_with_their_records_only() {
        let store = Arc::new(InMemory::new());
        let repo = Repository::from_store(store.clone(), "memory", RepositoryOptions::default());
        for (key, len) in [
            ("quarantine/r0000000a/a.txt", 3),
            ("quarantine/r0000000a/dir/b.txt", 5),
            ("quarantine/r0000000a.records/0.json", 7),
            ("quarantine/r0000000b/c.txt", 11),
            ("quarantine/r0000000ab/c.txt", 1),
            ("quarantine/notatag/x", 1),
            ("points/p.json", 2),
        ] {
            store
                .put(&Path::from(key), PutPayload::from(vec![0u8; len]))
                .await
                .unwrap();
        }
        let listed = repo.list_quarantines().await.unwrap();
        let summary: Vec<_> = listed
            .iter()
            .map(|q| {
                (
                    q.tag.as_str(),
                    q.objects,
                    q.bytes,
                    q.records,
                    q.record_bytes,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [("r0000000a", 2, 8, 1, 7), ("r0000000b", 1, 11, 0, 0)]
        );
        assert_eq!(listed[0].prefix(), "quarantine/r0000000a/");
        assert!(listed[0].oldest.is_some());

        assert_eq!(repo.delete_quarantine("r0000000a").await.unwrap(), 3);
        let left: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            left,
            [
                "points/p.json",
                "quarantine/notatag/x",
                "quarantine/r0000000ab/c.txt",
                "quarantine/r0000000b/c.txt",
            ]
        );
        let err = repo.delete_quarantine("../points").await.unwrap_err();
        assert!(err.to_string().contains("not a run tag"), "{err}");
    }
}
