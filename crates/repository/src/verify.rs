//! Verifying a recovery point before anything is frozen: the dump's checksum, the manifest's
//! checksum and shape, and that every blob it references exists with the right size. With
//! `full`, every blob body is re-hashed and the dump is decompressed and its archive header
//! checked.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layout::{PointId, SnapshotId, blob_key};
use crate::postgres::Archive;
use crate::postgres::fetch::download_dump;
use crate::repo::Repository;
use crate::snapshot::{for_each_parallel, list_blob_sizes, read_hashed};

/// Outcome of a verification. `problems` is empty when the point is sound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub point: PointId,
    pub full: bool,
    /// One line per problem, naming the file and what is wrong with it.
    pub problems: Vec<String>,
    /// Bytes of dump read and hashed.
    pub dump_bytes: u64,
    /// Manifest entries whose blob was checked.
    pub objects_checked: u64,
    /// Blob bytes re-hashed (`full` only).
    pub blob_bytes_hashed: u64,
    pub elapsed_ms: u64,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Outcome of checking one snapshot's blobs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotCheck {
    pub problems: Vec<String>,
    pub objects_checked: u64,
    pub blob_bytes_hashed: u64,
}

impl Repository {
    /// Verifies a point. Errors only when the point itself cannot be read (missing, damaged,
    /// repository unreachable); problems with its parts are listed in the report.
    #[tracing::instrument(name = "repository.verify", skip_all, fields(point = %id, full))]
    pub async fn verify_point(&self, id: &PointId, full: bool) -> Result<VerifyReport> {
        let started = Instant::now();
        let point = self.read_point(id).await?;
        let mut report = VerifyReport {
            point: id.clone(),
            full,
            problems: Vec::new(),
            dump_bytes: 0,
            objects_checked: 0,
            blob_bytes_hashed: 0,
            elapsed_ms: 0,
        };
        if let Some(pg) = &point.postgres {
            // Each archive of a parallel dump is checked on its own, so every damaged one is
            // named.
            for archive in pg.archives() {
                match self.check_dump(&archive, full).await {
                    Ok(bytes) => report.dump_bytes += bytes,
                    Err(e) => report.problems.push(format!("{e:#}")),
                }
            }
        }
        if let Some(objects) = &point.objects {
            match self
                .check_snapshot(&objects.snapshot_id, Some(&objects.manifest_sha256), full)
                .await
            {
                Ok(check) => {
                    report.problems.extend(check.problems);
                    report.objects_checked = check.objects_checked;
                    report.blob_bytes_hashed = check.blob_bytes_hashed;
                    if check.objects_checked != objects.objects {
                        report.problems.push(format!(
                            "manifest {} lists {} objects, the point recorded {}",
                            objects.manifest_key, check.objects_checked, objects.objects
                        ));
                    }
                }
                Err(e) => report.problems.push(format!("{e:#}")),
            }
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Checks a snapshot: its manifest (against `expected_sha256` when given) and its blobs.
    pub async fn check_snapshot(
        &self,
        id: &SnapshotId,
        expected_sha256: Option<&str>,
        full: bool,
    ) -> Result<SnapshotCheck> {
        let key = crate::layout::manifest_key(id);
        let (manifest, sha) = self.read_manifest_with_sha(id).await?;
        if let Some(expected) = expected_sha256
            && expected != sha
        {
            return Err(self
                .damaged(
                    "object snapshot manifest",
                    &key,
                    format!(
                        "its sha256 is {sha}, the point recorded {expected}: it was replaced \
                         or modified"
                    ),
                )
                .into());
        }

        let blobs = list_blob_sizes(self).await?;
        let mut check = SnapshotCheck {
            objects_checked: manifest.objects.len() as u64,
            ..SnapshotCheck::default()
        };
        let mut to_hash: HashMap<String, (u64, String)> = HashMap::new();
        for entry in &manifest.objects {
            let blob = blob_key(&entry.sha256);
            match blobs.get(&entry.sha256) {
                None => check
                    .problems
                    .push(format!("blob {blob} (object {}) is missing", entry.key)),
                Some(size) if *size != entry.size => check.problems.push(format!(
                    "blob {blob} (object {}) holds {size} bytes, the manifest expects {}",
                    entry.key, entry.size
                )),
                Some(_) if full => {
                    to_hash
                        .entry(entry.sha256.clone())
                        .or_insert((entry.size, entry.key.clone()));
                }
                Some(_) => {}
            }
        }
        if full {
            let store = self.store.clone();
            let results = for_each_parallel(
                to_hash.into_iter().collect(),
                16,
                move |(sha, (size, key)): (String, (u64, String))| {
                    let store: Arc<dyn object_store::ObjectStore> = store.clone();
                    async move {
                        let blob = blob_key(&sha);
                        let problem = match read_hashed(&store, &blob).await {
                            Ok((_, actual, _)) if actual == sha => None,
                            Ok((_, actual, _)) => Some(format!(
                                "blob {blob} (object {key}) is corrupt: its content hashes to \
                                 {actual}"
                            )),
                            Err(e) => Some(format!("blob {blob} (object {key}) unreadable: {e:#}")),
                        };
                        Ok((size, problem))
                    }
                },
            )
            .await?;
            for (size, problem) in results {
                check.blob_bytes_hashed += size;
                check.problems.extend(problem);
            }
        }
        check.problems.sort();
        Ok(check)
    }

    /// Reads the dump and compares size and sha256 with the point; `full` also decompresses
    /// it and checks the archive header.
    async fn check_dump(&self, part: &Archive, full: bool) -> Result<u64> {
        let key = Path::from(part.key.as_str());
        if full {
            let sink = HeaderCheck::default();
            let seen = sink.seen.clone();
            download_dump(self, part, Box::new(sink)).await.0?;
            let header = seen.lock().map(|h| h.clone()).unwrap_or_default();
            if !header.starts_with(b"PGDMP") {
                anyhow::bail!(
                    "dump {key} decompresses to something that is not a pg_dump custom archive"
                );
            }
            return Ok(part.size);
        }
        let got = match self.store.get(&key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                anyhow::bail!("dump {key} is missing from repository {}", self.label)
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("read dump {key}"))),
        };
        let mut stream = crate::body::body_stream(got);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| anyhow::Error::new(e).context(format!("read dump {key}")))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
        }
        let sha = hex::encode(hasher.finalize());
        if size != part.size || sha != part.sha256 {
            anyhow::bail!(
                "dump {key} is damaged: {size} bytes with sha256 {sha}, the point recorded {} \
                 bytes with sha256 {}",
                part.size,
                part.sha256
            );
        }
        Ok(size)
    }
}

/// Discards a decompressed dump, keeping its first bytes.
#[derive(Default)]
struct HeaderCheck {
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Write for HeaderCheck {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut seen) = self.seen.lock()
            && seen.len() < 5
        {
            let take = (5 - seen.len()).min(data.len());
            seen.extend_from_slice(&data[..take]);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
