//! Verifying a recovery point before anything is frozen: the dump's checksum, the manifest's
//! checksum and keys, and that every blob it references exists with the right size. Given
//! the store a restore would write into, every blob that restore would write (the delta) is
//! read and hashed too, and kept in a scratch directory for the restore. With `full`, every
//! blob body is hashed and the dump is decompressed and its archive header checked.
//!
//! The delta is decided as the restore decides (`restore::compare_live`): an entry whose key is
//! missing from the target, holds another size, or holds the same size with no etag matching
//! the snapshot's is in it; only an object the snapshot itself read (same size and etag) is
//! not. Objects written to the live store after the preflight can add to what the restore
//! writes; those bodies are hashed by the restore itself before it commits them.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layout::{PointId, SnapshotId};
use crate::postgres::Archive;
use crate::postgres::fetch::download_dump;
use crate::repo::{Repository, is_not_found};
use crate::restore::{Live, compare_live, join, list_target};
use crate::scratch::BlobScratch;
use crate::snapshot::{for_each_parallel, list_blob_sizes};
use crate::store::retry;

/// How [`Repository::verify_point_with`] checks a point.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Decompress the dump and check its archive header; hash every blob.
    pub full: bool,
    /// The store the point's objects would be restored into: the blobs that restore would
    /// write are hashed (all of them with `full` or `hash_all`).
    pub restore_target: Option<RestoreTarget>,
}

/// The store an object restore would write into, as preflight sees it.
#[derive(Clone)]
pub struct RestoreTarget {
    /// The target, already narrowed to the restore's prefix.
    pub store: Arc<dyn ObjectStore>,
    /// How messages name it (a URL without credentials).
    pub label: String,
    /// Hash every blob, not only the delta's (an objects agent's `verify = "full"`).
    pub hash_all: bool,
    /// Where the delta's bodies are kept for the restore.
    pub scratch: Option<BlobScratch>,
    /// Blobs read at once.
    pub parallelism: usize,
}

impl std::fmt::Debug for RestoreTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreTarget")
            .field("label", &self.label)
            .field("hash_all", &self.hash_all)
            .field("scratch", &self.scratch)
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

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
    /// Blob bytes re-hashed (the delta's, or all with `full`).
    pub blob_bytes_hashed: u64,
    pub elapsed_ms: u64,
    /// Manifest entries a restore into the target would write, or might (the delta); 0
    /// when no target was given.
    #[serde(default)]
    pub delta_objects: u64,
    /// Blobs whose bodies were read and hashed.
    #[serde(default)]
    pub blobs_hashed: u64,
    /// Bytes of those kept in the scratch directory for the restore.
    #[serde(default)]
    pub scratch_bytes: u64,
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
    pub delta_objects: u64,
    pub blobs_hashed: u64,
    pub scratch_bytes: u64,
}

impl Repository {
    /// Verifies a point. Errors only when the point itself cannot be read (missing, damaged,
    /// repository unreachable); problems with its parts are listed in the report.
    pub async fn verify_point(&self, id: &PointId, full: bool) -> Result<VerifyReport> {
        self.verify_point_with(
            id,
            &VerifyOptions {
                full,
                restore_target: None,
            },
        )
        .await
    }

    /// Verifies a point as [`Repository::verify_point`] does, and with a restore target also
    /// proves every blob a restore into it would write.
    #[tracing::instrument(
        name = "repository.verify",
        skip_all,
        fields(point = %id, full = options.full, delta = options.restore_target.is_some())
    )]
    pub async fn verify_point_with(
        &self,
        id: &PointId,
        options: &VerifyOptions,
    ) -> Result<VerifyReport> {
        let full = options.full;
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
            delta_objects: 0,
            blobs_hashed: 0,
            scratch_bytes: 0,
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
            let checked = self
                .check_objects(
                    &objects.snapshot_id,
                    Some(&objects.manifest_sha256),
                    full,
                    options.restore_target.as_ref(),
                )
                .await;
            match checked {
                Ok(check) => {
                    report.problems.extend(check.problems);
                    report.objects_checked = check.objects_checked;
                    report.blob_bytes_hashed = check.blob_bytes_hashed;
                    report.delta_objects = check.delta_objects;
                    report.blobs_hashed = check.blobs_hashed;
                    report.scratch_bytes = check.scratch_bytes;
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
        self.check_objects(id, expected_sha256, full, None).await
    }

    async fn check_objects(
        &self,
        id: &SnapshotId,
        expected_sha256: Option<&str>,
        full: bool,
        target: Option<&RestoreTarget>,
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

        let (blobs, live) = futures::try_join!(list_blob_sizes(self), async {
            match target {
                Some(t) => list_target(&t.store, &Path::default(), &t.label)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        })?;
        let hash_all = full || target.is_some_and(|t| t.hash_all);
        let mut check = SnapshotCheck {
            objects_checked: manifest.objects.len() as u64,
            ..SnapshotCheck::default()
        };
        // Blob → what proving it takes: its size, the keys naming it, and whether the restore
        // may write it (then it is kept for the restore).
        let mut to_hash: HashMap<String, ToProve> = HashMap::new();
        for entry in &manifest.objects {
            let in_delta = match &live {
                Some(live) => {
                    let location = join(&Path::default(), &entry.key)?;
                    compare_live(entry, live.get(&location)) != Live::Same
                }
                None => false,
            };
            check.delta_objects += u64::from(in_delta);
            let blob = self.blob_key(&entry.sha256);
            match blobs.get(&self.blob_id(&entry.sha256)) {
                None => check
                    .problems
                    .push(format!("blob {blob} (object {}) is missing", entry.key)),
                Some(size) if *size != entry.size => check.problems.push(format!(
                    "blob {blob} (object {}) holds {size} bytes, the manifest expects {}",
                    entry.key, entry.size
                )),
                Some(_) if hash_all || in_delta => {
                    let job = to_hash.entry(entry.sha256.clone()).or_insert(ToProve {
                        size: entry.size,
                        keys: Vec::new(),
                        keep: false,
                    });
                    job.keys.push(entry.key.clone());
                    job.keep |= in_delta;
                }
                Some(_) => {}
            }
        }
        let repo = self.clone();
        let scratch = target.and_then(|t| t.scratch.clone());
        let parallelism = target.map_or(16, |t| t.parallelism.max(1));
        let proofs = for_each_parallel(
            to_hash.into_iter().collect(),
            parallelism,
            move |(sha, job): (String, ToProve)| {
                let (repo, scratch) = (repo.clone(), scratch.clone());
                async move {
                    let scratch = scratch.as_ref().filter(|_| job.keep);
                    Ok(prove_blob(&repo, &sha, &job, scratch).await)
                }
            },
        )
        .await?;
        for proof in proofs {
            check.blobs_hashed += 1;
            check.blob_bytes_hashed += proof.hashed;
            check.scratch_bytes += proof.kept;
            check.problems.extend(proof.problem);
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
                chunk.map_err(|e| self.read_failure("dump", &key, anyhow::Error::new(e)))?;
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

/// One blob to read and hash.
struct ToProve {
    size: u64,
    /// The manifest keys whose body it is (messages name them).
    keys: Vec<String>,
    /// A restore may write it: keep it in the scratch.
    keep: bool,
}

impl ToProve {
    fn named(&self) -> String {
        match self.keys.as_slice() {
            [one] => format!("object {one}"),
            [first, rest @ ..] => format!("objects {first} and {} more", rest.len()),
            [] => "no object".to_owned(),
        }
    }
}

/// What reading one blob showed.
struct Proof {
    /// Bytes read and hashed.
    hashed: u64,
    /// Bytes kept in the scratch.
    kept: u64,
    problem: Option<String>,
}

/// Reads blob `sha` and checks its size and sha256, keeping it in `scratch` when given and
/// there is room. A copy the scratch already holds (a preflight of this run that ran before)
/// is hashed there instead of read again; a wrong one is discarded and read from the
/// repository.
async fn prove_blob(
    repo: &Repository,
    sha: &str,
    job: &ToProve,
    scratch: Option<&BlobScratch>,
) -> Proof {
    let blob = repo.blob_key(sha);
    if let Some(scratch) = scratch
        && let Some(got) = scratch.get(sha, job.size).await
    {
        match hash_body(got, None).await {
            Ok((read, actual)) if read == job.size && actual == sha => {
                return Proof {
                    hashed: read,
                    kept: read,
                    problem: None,
                };
            }
            _ => scratch.discard(sha, Some(job.size)).await,
        }
    }
    let read = retry(&repo.options.retry, "read a blob to verify it", || async {
        let got = repo.store.get(&blob).await?;
        let mut keeper = match scratch {
            Some(scratch) => scratch.keep(sha, job.size).await,
            None => None,
        };
        match hash_body(got, keeper.as_mut()).await {
            Ok((read, actual)) => Ok((read, actual, keeper)),
            Err(e) => {
                // Removed before the error is returned, not by the drop's background task, so
                // nothing half-written is left behind when the proof ends.
                if let Some(mut keeper) = keeper {
                    keeper.abandon().await;
                }
                Err(e)
            }
        }
    })
    .await;
    let objects = job.named();
    match read {
        Ok((read, actual, keeper)) if read == job.size && actual == sha => {
            let kept = match keeper {
                Some(keeper) => u64::from(keeper.commit().await) * read,
                None => 0,
            };
            Proof {
                hashed: read,
                kept,
                problem: None,
            }
        }
        Ok((read, actual, keeper)) => {
            if let Some(mut keeper) = keeper {
                keeper.abandon().await;
            }
            Proof {
                hashed: read,
                kept: 0,
                problem: Some(format!(
                    "blob {blob} ({objects}) is corrupt: its content hashes to {actual} ({read} \
                 bytes), the manifest expects sha256 {sha} ({} bytes)",
                    job.size
                )),
            }
        }
        Err(e) if is_not_found(&e) => Proof {
            hashed: 0,
            kept: 0,
            problem: Some(format!("blob {blob} ({objects}) is missing")),
        },
        Err(e) => Proof {
            hashed: 0,
            kept: 0,
            problem: Some(match crate::sealed::broken_seal(&e) {
                Some(broken) => format!(
                    "blob {blob} ({objects}) is damaged: {}",
                    crate::repo::unsealed_reason(broken)
                ),
                None => format!("blob {blob} ({objects}) unreadable: {e:#}"),
            }),
        },
    }
}

/// Hashes a body as it streams by, handing each chunk to `keeper` too. Returns its length and
/// sha256.
pub(crate) async fn hash_body(
    got: object_store::GetResult,
    mut keeper: Option<&mut crate::scratch::Keeper>,
) -> Result<(u64, String)> {
    let mut stream = crate::body::body_stream(got);
    let mut hasher = Sha256::new();
    let mut read = 0u64;
    while let Some(chunk) = stream.try_next().await? {
        hasher.update(&chunk);
        read += chunk.len() as u64;
        if let Some(keeper) = keeper.as_deref_mut() {
            keeper.write(chunk).await;
        }
    }
    Ok((read, hex::encode(hasher.finalize())))
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
