//! WAL archiving into the repository: what Postgres' `archive_command` pushes and its
//! `restore_command` fetches (`rollcall repo wal-push`, `rollcall repo wal-fetch`).
//!
//! ```text
//! wal/<timeline>/<name>-<sha256>.zst   the file's body, zstd-compressed; the hash is of the
//!                                      uncompressed bytes, so two different bodies never share
//!                                      a key (its keyed hash in an encrypted repository)
//! wal/<timeline>/<name>.json           its record (size, sha256, body key, when), written
//!                                      create-only after the body: the record is the commit
//! wal/history/<name>.zst, .json        timeline history files (`00000002.history`)
//! ```
//!
//! `<timeline>` is the first 8 hex digits of a segment's name (also of its `.partial` and
//! `.backup` files). Pushing is idempotent: the same name with the same bytes again is a
//! success (Postgres retries a push whose answer it missed), and a different body under a name
//! already archived is refused loudly, changing nothing (two servers archiving into one
//! repository, or a reused timeline). Fetching checks the body against its record's sha256 and
//! writes the file atomically; a name the repository does not hold is [`WalError::NotFound`],
//! which `restore_command` reports with a non-zero exit so recovery ends there.

use std::path::Path as FsPath;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStoreExt as _, PutMode, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::repo::{Repository, is_not_found};

pub(crate) const WAL: &str = "wal";
/// zstd level for WAL: segments are mostly compressible page images, and pushing must keep up
/// with the server.
const LEVEL: i32 = 3;

/// One archived WAL file, as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalRecord {
    pub name: String,
    /// Uncompressed size.
    pub size: u64,
    /// sha256 of the uncompressed bytes, hex.
    pub sha256: String,
    /// The compressed body's key in the repository.
    pub body: String,
    pub compressed_size: u64,
    pub pushed_at: DateTime<Utc>,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Archived now.
    Archived,
    /// The same bytes were archived before: nothing to do.
    AlreadyArchived,
}

/// Why a fetch found nothing to give.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL file {name} is not in the repository {repository}")]
    NotFound { name: String, repository: String },
}

/// The kind of WAL file a name is, checked before anything is read or written: a name from
/// Postgres is one of these, and anything else (a path, `..`) is refused.
fn check_name(name: &str) -> Result<&str> {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let segment = |s: &str| s.len() == 24 && hex(s);
    let ok = segment(name)
        || name.strip_suffix(".partial").is_some_and(segment)
        || name
            .strip_suffix(".history")
            .is_some_and(|t| t.len() == 8 && hex(t))
        || name.strip_suffix(".backup").is_some_and(|rest| {
            rest.split_once('.')
                .is_some_and(|(seg, offset)| segment(seg) && offset.len() == 8 && hex(offset))
        });
    if !ok {
        bail!(
            "{name:?} is not the name of a WAL file (a 24-hex-digit segment, its .partial or \
             .backup file, or a timeline's .history): pass %f, or the file at %p"
        );
    }
    Ok(name)
}

/// The prefix a WAL file's keys live under: its timeline's, or `wal/history`.
fn prefix(name: &str) -> String {
    if name.ends_with(".history") {
        format!("{WAL}/history")
    } else {
        format!("{WAL}/{}", &name[..8])
    }
}

pub(crate) fn record_key(name: &str) -> Path {
    Path::from(format!("{}/{name}.json", prefix(name)))
}

fn body_key(name: &str, sha256: &str) -> Path {
    Path::from(format!("{}/{name}-{sha256}.zst", prefix(name)))
}

/// Archives the WAL file at `path` (Postgres' `%p`, relative to its data directory) under its
/// file name.
pub async fn wal_push(repo: &Repository, path: &FsPath) -> Result<Pushed> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?;
    let name = check_name(name)?.to_owned();
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("read the WAL file {}", path.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len() as u64;

    if let Some(earlier) = read_record(repo, &name).await? {
        return if earlier.sha256 == sha256 && earlier.size == size {
            Ok(Pushed::AlreadyArchived)
        } else {
            bail!(
                "WAL file {name} is already archived in {} with other contents (sha256 {} of \
                 {} bytes; this one {sha256} of {size} bytes); nothing was written. Is another \
                 server archiving into this repository, or was the cluster re-created? Give \
                 each cluster its own repository",
                repo.label(),
                earlier.sha256,
                earlier.size
            );
        };
    }

    let compressed = tokio::task::spawn_blocking(move || zstd::bulk::compress(&bytes, LEVEL))
        .await
        .context("compress the WAL file")?
        .context("compress the WAL file")?;
    // An encrypted repository names the body by a keyed hash: no name carries a content hash.
    let body = body_key(&name, &repo.blob_id(&sha256));
    let compressed_size = compressed.len() as u64;
    repo.store()
        .put(&body, PutPayload::from(compressed))
        .await
        .with_context(|| format!("write {body} to {}", repo.label()))?;
    // The body is on disk before the record that commits it.
    repo.make_durable().await?;
    let record = WalRecord {
        name: name.clone(),
        size,
        sha256: sha256.clone(),
        body: body.to_string(),
        compressed_size,
        pushed_at: Utc::now(),
    };
    let key = record_key(&name);
    let encoded = Bytes::from(serde_json::to_vec_pretty(&record).context("encode the record")?);
    match repo
        .store()
        .put_opts(
            &key,
            PutPayload::from_bytes(encoded.clone()),
            PutMode::Create.into(),
        )
        .await
    {
        Ok(_) => {}
        Err(object_store::Error::AlreadyExists { .. }) => {
            // A push of the same file raced this one: fine if it archived the same bytes.
            return match read_record(repo, &name).await? {
                Some(r) if r.sha256 == sha256 => Ok(Pushed::AlreadyArchived),
                _ => bail!(
                    "WAL file {name} was archived in {} with other contents while this push \
                     ran; nothing of this one is committed",
                    repo.label()
                ),
            };
        }
        Err(
            object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. },
        ) => {
            repo.store()
                .put(&key, PutPayload::from_bytes(encoded))
                .await
                .with_context(|| format!("write {key} to {}", repo.label()))?;
        }
        Err(e) => {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("write {key} to {}", repo.label()));
        }
    }
    repo.make_durable().await?;
    Ok(Pushed::Archived)
}

/// Writes the archived WAL file `name` (Postgres' `%f`) to `dest` (`%p`): checked against its
/// record's sha256, written to a temporary file beside `dest`, then renamed into place. A
/// name the repository does not hold is [`WalError::NotFound`].
pub async fn wal_fetch(repo: &Repository, name: &str, dest: &FsPath) -> Result<WalRecord> {
    let (record, bytes) = wal_bytes(repo, name).await?;
    let tmp = dest.with_file_name(format!(
        ".{}.rollcall-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal"),
        std::process::id()
    ));
    tokio::fs::write(&tmp, &bytes)
        .await
        .with_context(|| format!("write {}", tmp.display()))?;
    if let Err(e) = tokio::fs::rename(&tmp, dest).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e).with_context(|| format!("move the WAL file into {}", dest.display()));
    }
    Ok(record)
}

/// An archived WAL file's record and bytes, checked against the record's sha256 and size; a
/// name the repository does not hold is [`WalError::NotFound`].
pub(crate) async fn wal_bytes(repo: &Repository, name: &str) -> Result<(WalRecord, Vec<u8>)> {
    let name = check_name(name)?;
    let Some(record) = read_record(repo, name).await? else {
        return Err(WalError::NotFound {
            name: name.to_owned(),
            repository: repo.label().to_owned(),
        }
        .into());
    };
    let body = repo
        .get_bytes(&Path::from(record.body.as_str()), "WAL file")
        .await?;
    let expected = record.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let bytes = zstd::bulk::decompress(&body, expected.size as usize)
            .context("decompress the archived body")?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if sha256 != expected.sha256 || bytes.len() as u64 != expected.size {
            bail!(
                "the archived body of {} is damaged: sha256 {sha256} of {} bytes, the record \
                 says {} of {} bytes",
                expected.name,
                bytes.len(),
                expected.sha256,
                expected.size
            );
        }
        Ok(bytes)
    })
    .await
    .context("check the archived body")??;
    Ok((record, bytes))
}

/// The records of every archived WAL file, in name order (timelines, then segments). A
/// damaged record fails the listing ([`RepoError::Damaged`](crate::RepoError::Damaged)).
pub async fn wal_list(repo: &Repository) -> Result<Vec<WalRecord>> {
    let (records, damaged) = wal_records(repo).await?;
    match damaged.into_iter().next() {
        Some((_, e)) => Err(e.into()),
        None => Ok(records),
    }
}

/// The records that read, in name order, and the damaged ones apart with their errors.
async fn wal_records(repo: &Repository) -> Result<(Vec<WalRecord>, Vec<(Path, crate::RepoError)>)> {
    use futures::TryStreamExt;
    let prefix = Path::from(WAL);
    let metas: Vec<_> = repo
        .store()
        .list(Some(&prefix))
        .try_collect()
        .await
        .with_context(|| format!("list {prefix}/ in {}", repo.label()))?;
    let mut out = Vec::new();
    let mut damaged = Vec::new();
    for meta in metas {
        if meta.location.extension() != Some("json") {
            continue;
        }
        let read = match repo.get_bytes(&meta.location, "WAL record").await {
            Ok(bytes) => serde_json::from_slice::<WalRecord>(&bytes).map_err(|e| {
                repo.damaged("WAL record", &meta.location, format!("does not read: {e}"))
            }),
            // Deleted by a prune between our listing and our read.
            Err(e) if is_not_found(&e) => continue,
            Err(e) => match e.downcast::<crate::RepoError>() {
                Ok(damage @ crate::RepoError::Damaged { .. }) => Err(damage),
                Ok(other) => return Err(other.into()),
                Err(e) => return Err(e),
            },
        };
        match read {
            Ok(record) => out.push(record),
            Err(damage) => damaged.push((meta.location, damage)),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, damaged))
}

/// What [`wal_verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WalReport {
    /// Segments archived (history, backup and partial files not counted).
    pub segments: usize,
    /// Per timeline, the first and last segment archived.
    pub ranges: Vec<(String, String)>,
    /// Missing runs of segments between the first and last of a timeline, as
    /// `(first missing, last missing)`: recovery cannot pass them.
    pub gaps: Vec<(String, String)>,
    /// Files whose body is missing or (full) does not match its record.
    pub damaged: Vec<String>,
}

impl WalReport {
    pub fn is_ok(&self) -> bool {
        self.gaps.is_empty() && self.damaged.is_empty()
    }
}

/// Segments per log file with the default 16 MiB segments (`0x1_0000_0000 / 16 MiB`).
const SEGMENTS_PER_LOG: u64 = 0x100;

/// Segments per log file with segments of `segment_size` bytes.
pub(crate) fn segments_per_log(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size.max(1)
}

/// A segment's timeline and position on it: `log * 256 + seg` (16 MiB segments).
fn segment_number(name: &str) -> Option<(String, u64)> {
    segment_number_in(name, SEGMENTS_PER_LOG)
}

/// A segment's timeline and position on it with `per_log` segments per log file.
pub(crate) fn segment_number_in(name: &str, per_log: u64) -> Option<(String, u64)> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((name[..8].to_owned(), log * per_log + seg))
}

fn segment_name(timeline: &str, n: u64) -> String {
    segment_name_in(timeline, n, SEGMENTS_PER_LOG)
}

/// The name of segment `n` of `timeline` (8 hex digits) with `per_log` segments per log file.
pub(crate) fn segment_name_in(timeline: &str, n: u64, per_log: u64) -> String {
    format!("{timeline}{:08X}{:08X}", n / per_log, n % per_log)
}

/// One archived WAL file as the repository's listing shows it, its record not read.
#[derive(Debug, Clone)]
pub(crate) struct ListedWal {
    pub(crate) name: String,
    /// When its record was written (the store's clock): when the file was archived.
    pub(crate) archived_at: DateTime<Utc>,
    pub(crate) record: Path,
    /// Its bodies: one, or more when a push of other bytes died before its record.
    pub(crate) bodies: Vec<Path>,
}

/// The archived WAL files (those with a record), in name order, from one listing: no record
/// is read, so a window over thousands of segments costs one list, not a read per segment.
pub(crate) async fn wal_listing(repo: &Repository) -> Result<Vec<ListedWal>> {
    use futures::TryStreamExt;
    let metas: Vec<_> = repo
        .store()
        .list(Some(&Path::from(WAL)))
        .try_collect()
        .await
        .with_context(|| format!("list {WAL}/ in {}", repo.label()))?;
    let mut bodies: std::collections::HashMap<String, Vec<Path>> = Default::default();
    let mut listed = Vec::new();
    for meta in metas {
        let Some(file) = meta.location.filename().map(str::to_owned) else {
            continue;
        };
        if let Some(name) = file.strip_suffix(".json") {
            listed.push(ListedWal {
                name: name.to_owned(),
                archived_at: meta.last_modified,
                record: meta.location,
                bodies: Vec::new(),
            });
        } else if let Some((name, _)) = file.strip_suffix(".zst").and_then(|f| f.rsplit_once('-')) {
            bodies
                .entry(name.to_owned())
                .or_default()
                .push(meta.location);
        }
    }
    for wal in &mut listed {
        wal.bodies = bodies.remove(&wal.name).unwrap_or_default();
    }
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(listed)
}

/// Checks the archived WAL: every record's body is there (`full`: and decompresses to the
/// bytes its sha256 names), and each timeline's segments run without gaps from its first to
/// its last (assuming 16 MiB segments, Postgres' default).
pub async fn wal_verify(repo: &Repository, full: bool) -> Result<WalReport> {
    use futures::TryStreamExt;
    let (records, unreadable) = wal_records(repo).await?;
    let present: std::collections::BTreeSet<String> = repo
        .store()
        .list(Some(&Path::from(WAL)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .with_context(|| format!("list {WAL}/ in {}", repo.label()))?;
    let mut report = WalReport::default();
    report.damaged.extend(
        unreadable
            .into_iter()
            .map(|(key, e)| format!("record {key}: {e}")),
    );
    let mut timelines: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for record in &records {
        if let Some((timeline, n)) = segment_number(&record.name) {
            report.segments += 1;
            timelines.entry(timeline).or_default().push(n);
        }
        if !present.contains(&record.body) {
            report.damaged.push(format!(
                "{}: its body {} is missing",
                record.name, record.body
            ));
        } else if full {
            let body = match repo
                .get_bytes(&Path::from(record.body.as_str()), "WAL file")
                .await
            {
                Ok(body) => body,
                Err(e) if matches!(e.downcast_ref(), Some(crate::RepoError::Damaged { .. })) => {
                    report.damaged.push(format!("{}: {e}", record.name));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let expected = record.clone();
            let problem = tokio::task::spawn_blocking(move || {
                match zstd::bulk::decompress(&body, expected.size as usize) {
                    Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == expected.sha256 => None,
                    Ok(_) => Some(format!(
                        "{}: its body does not match its sha256",
                        expected.name
                    )),
                    Err(e) => Some(format!(
                        "{}: its body does not decompress: {e}",
                        expected.name
                    )),
                }
            })
            .await
            .context("check an archived body")?;
            report.damaged.extend(problem);
        }
    }
    for (timeline, mut numbers) in timelines {
        numbers.sort_unstable();
        let (first, last) = (numbers[0], numbers[numbers.len() - 1]);
        report.ranges.push((
            segment_name(&timeline, first),
            segment_name(&timeline, last),
        ));
        for pair in numbers.windows(2) {
            if pair[1] > pair[0] + 1 {
                report.gaps.push((
                    segment_name(&timeline, pair[0] + 1),
                    segment_name(&timeline, pair[1] - 1),
                ));
            }
        }
    }
    Ok(report)
}

pub(crate) async fn read_record(repo: &Repository, name: &str) -> Result<Option<WalRecord>> {
    let key = record_key(name);
    match repo.get_bytes(&key, "WAL record").await {
        Ok(bytes) => {
            let record: WalRecord = serde_json::from_slice(&bytes)
                .map_err(|e| repo.damaged("WAL record", &key, format!("does not read: {e}")))?;
            if record.name != name {
                return Err(repo
                    .damaged(
                        "WAL record",
                        &key,
                        format!("names {} instead of {name}", record.name),
                    )
                    .into());
            }
            Ok(Some(record))
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn segment_numbers_carry_over_log_files() {
        let (tl, n) = segment_number("0000000100000002000000FF").unwrap();
        assert_eq!(tl, "00000001");
        assert_eq!(segment_name(&tl, n + 1), "000000010000000300000000");
        assert_eq!(segment_number("00000002.history"), None);
    }

    #[test]
    fn only_wal_file_names_are_taken() {
        for ok in [
            "000000010000000000000002",
            "00000001000000000000000A.partial",
            "000000010000000000000002.00000028.backup",
            "00000002.history",
        ] {
            assert_eq!(check_name(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "../000000010000000000000002",
            "00000001000000000000002",
            "0000000100000000000000zz",
            "00000002.history.x",
            "000000010000000000000002.backup",
            "pg_wal/000000010000000000000002",
        ] {
            let err = check_name(bad).unwrap_err().to_string();
            assert!(
                err.contains("is not the name of a WAL file"),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            record_key("000000020000000000000003").to_string(),
            "wal/00000002/000000020000000000000003.json"
        );
        assert_eq!(
            record_key("00000002.history").to_string(),
            "wal/history/00000002.history.json"
        );
    }
}
