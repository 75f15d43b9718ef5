//! Base backups: pg_basebackup's tar streamed into the repository, committed once the WAL
//! it needs is archived.

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutPayload};
use serde::Deserialize;
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::pipe::{ChunkSink, copy_large, widen_pipe};
use crate::postgres::conn::{DbUrl, collect_stderr, connect, last_lines, tool_candidates};
use crate::repo::Repository;
use crate::store::HashedUpload;

use super::{BaseBackup, body_key, format_lsn, parse_lsn, record_key, segment_name};

const LEVEL: i32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn from_micros(us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).with_context(|| format!("server clock {us} us"))
}

/// What `rollcall repo base-backup` needs.
#[derive(Debug, Clone)]
pub struct BaseBackupOptions {
    /// A role with the REPLICATION attribute (pg_basebackup's connection).
    pub database_url: String,
    /// The environment the backup is recorded under, if any.
    pub env: Option<String>,
    /// Where the PostgreSQL tools are (default: PATH, then /usr/lib/postgresql/*/bin).
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for the server to archive the WAL the backup needs.
    pub wal_timeout: Duration,
}

impl BaseBackupOptions {
    pub fn new(database_url: impl Into<String>) -> BaseBackupOptions {
        BaseBackupOptions {
            database_url: database_url.into(),
            env: None,
            bin_dir: None,
            wal_timeout: Duration::from_secs(120),
        }
    }
}

/// Takes a base backup of the server `options.database_url` names into the repository and
/// commits it once the WAL from its start to its end is archived there.
pub async fn base_backup(repo: &Repository, options: &BaseBackupOptions) -> Result<BaseBackup> {
    let db = DbUrl::parse(&options.database_url)?;
    let mut conn = connect(&db, CONNECT_TIMEOUT).await?;
    let (system_identifier, version_num, segment_size, archive_mode, started_us): (
        String,
        i32,
        String,
        String,
        i64,
    ) = sqlx::query_as(
        "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
         current_setting('server_version_num')::int, \
         (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'), \
         current_setting('archive_mode'), \
         (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
    )
    .fetch_one(&mut conn)
    .await
    .with_context(|| format!("read the server settings of {}", db.display))?;
    let started_at = from_micros(started_us)?;
    if archive_mode == "off" {
        bail!(
            "{} does not archive its WAL (archive_mode = off): a base backup without archived \
             WAL restores to no point in time. Set archive_mode = on and archive_command = \
             'rollcall repo wal-push --repo {} %p', restart the server, then back up again",
            db.display,
            repo.label()
        );
    }
    let wal_segment_size: u64 = segment_size
        .parse()
        .with_context(|| format!("wal_segment_size {segment_size:?} of {}", db.display))?;
    let server_version_num = version_num.max(0) as u32;
    let candidates = tool_candidates("pg_basebackup", options.bin_dir.as_deref())?;
    let (tool, _) =
        crate::postgres::conn::pick_tool(&candidates, "pg_basebackup", server_version_num / 10000)
            .await?;

    let id = format!(
        "{}-{}",
        started_at.format("%Y%m%dT%H%M%SZ"),
        crate::layout::random_suffix()
    );
    let key = body_key(&id);
    let mut cmd = Command::new(&tool);
    cmd.arg("-d")
        .arg(&db.without_password)
        .args([
            "-D", "-", "-F", "tar", "-X", "none", "-c", "fast", "--label",
        ])
        .arg(format!("rollcall {id}"));
    db.apply_password(&mut cmd);
    let streamed = stream_into(repo, &key, cmd).await?;

    let committed = async {
        let (start_lsn, timeline) = parse_label(&streamed.label)?;
        let end_lsn = parse_manifest_end(&streamed.manifest)?;
        let start_wal = segment_name(timeline, start_lsn, wal_segment_size);
        let end_wal = segment_name(timeline, end_lsn.saturating_sub(1), wal_segment_size);
        wait_for_wal(
            repo,
            timeline,
            start_lsn,
            end_lsn,
            wal_segment_size,
            options.wal_timeout,
        )
        .await?;
        let consistent_at: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
                .fetch_one(&mut conn)
                .await
                .with_context(|| format!("read the clock of {}", db.display))?;
        let consistent_at = from_micros(consistent_at)?;
        let record = BaseBackup {
            id: id.clone(),
            env: options.env.clone(),
            system_identifier,
            server_version_num,
            wal_segment_size,
            timeline,
            start_lsn: format_lsn(start_lsn),
            end_lsn: format_lsn(end_lsn),
            start_wal,
            end_wal,
            started_at,
            consistent_at,
            key: key.to_string(),
            size: streamed.size,
            sha256: streamed.sha256.clone(),
            tar_size: streamed.tar_size,
        };
        let encoded = serde_json::to_vec_pretty(&record).context("encode the record")?;
        let record_key = record_key(&id);
        repo.store()
            .put_opts(
                &record_key,
                PutPayload::from(Bytes::from(encoded)),
                PutMode::Create.into(),
            )
            .await
            .with_context(|| format!("write {record_key} to {}", repo.label()))?;
        repo.make_durable().await?;
        Ok(record)
    }
    .await;
    if committed.is_err() {
        // Nothing references the body: leave nothing behind.
        let _ = repo.store().delete(&key).await;
    }
    committed
}

/// `backup_label`: START WAL LOCATION and START TIMELINE.
fn parse_label(label: &str) -> Result<(u64, u32)> {
    let field = |name: &str| {
        label
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let start = field("START WAL LOCATION:")
        .and_then(|v| parse_lsn(v.split_whitespace().next().unwrap_or_default()))
        .context("the backup's backup_label has no START WAL LOCATION")?;
    let timeline = field("START TIMELINE:")
        .and_then(|v| v.parse().ok())
        .context("the backup's backup_label has no START TIMELINE")?;
    Ok((start, timeline))
}

/// The end of the last WAL range `backup_manifest` says the backup needs.
fn parse_manifest_end(manifest: &str) -> Result<u64> {
    #[derive(Deserialize)]
    struct Manifest {
        #[serde(rename = "WAL-Ranges")]
        wal_ranges: Vec<Range>,
    }
    #[derive(Deserialize)]
    struct Range {
        #[serde(rename = "End-LSN")]
        end: String,
    }
    let manifest: Manifest =
        serde_json::from_str(manifest).context("the backup's backup_manifest does not read")?;
    manifest
        .wal_ranges
        .iter()
        .filter_map(|r| parse_lsn(&r.end))
        .max()
        .context("the backup's backup_manifest has no WAL range")
}

async fn wait_for_wal(
    repo: &Repository,
    timeline: u32,
    start: u64,
    end: u64,
    segment_size: u64,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let first = start / segment_size;
    let last = end.saturating_sub(1) / segment_size;
    let mut n = first;
    while n <= last {
        let name = segment_name(timeline, n * segment_size, segment_size);
        if crate::wal::read_record(repo, &name).await?.is_some() {
            n += 1;
            continue;
        }
        if Instant::now() > deadline {
            bail!(
                "the base backup needs WAL segment {name}, which did not arrive in {} within {} \
                 s: is the server's archive_command `rollcall repo wal-push --repo {} %p`? \
                 (pg_stat_archiver shows its failures). Nothing was committed",
                repo.label(),
                timeout.as_secs(),
                repo.label()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// What [`stream_into`] stored, and the two files it read on the way.
struct Streamed {
    size: u64,
    sha256: String,
    tar_size: u64,
    label: String,
    manifest: String,
}

/// A reader that copies what it reads into `out`.
struct Tee<R, W> {
    input: R,
    out: W,
    count: u64,
}

impl<R: Read, W: std::io::Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.out.write_all(&buf[..n])?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Runs pg_basebackup with its tar on stdout: compressed and uploaded while hashed, and read
/// on the way for its `backup_label` and `backup_manifest`. Completed only when pg_basebackup
/// succeeded; aborted otherwise.
async fn stream_into(repo: &Repository, key: &Path, mut cmd: Command) -> Result<Streamed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("start pg_basebackup")?;
    let stdout = std::fs::File::from(
        child
            .stdout
            .take()
            .context("capture pg_basebackup's output")?
            .into_owned_fd()
            .context("capture pg_basebackup's output")?,
    );
    widen_pipe(&stdout);
    let stderr = collect_stderr(child.stderr.take());

    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let compress = tokio::task::spawn_blocking(move || -> Result<(u64, String, String)> {
        let sink = ChunkSink::new(tx, 1 << 20);
        let mut encoder = zstd::stream::write::Encoder::new(sink, LEVEL)?;
        encoder.include_checksum(true)?;
        let mut tee = Tee {
            input: stdout,
            out: encoder,
            count: 0,
        };
        let (mut label, mut manifest) = (String::new(), String::new());
        {
            let mut archive = tar::Archive::new(&mut tee);
            for entry in archive.entries().context("read pg_basebackup's tar")? {
                let mut entry = entry.context("read pg_basebackup's tar")?;
                let path = entry
                    .path()
                    .context("read pg_basebackup's tar")?
                    .to_string_lossy()
                    .into_owned();
                let into = match path.trim_start_matches("./") {
                    "backup_label" => &mut label,
                    "backup_manifest" => &mut manifest,
                    _ => continue,
                };
                entry
                    .read_to_string(into)
                    .context("read pg_basebackup's tar")?;
            }
        }
        // The tar's closing blocks, and anything after them.
        copy_large(&mut tee.input, &mut tee.out)?;
        let mut sink = tee.out.finish()?;
        std::io::Write::flush(&mut sink)?;
        Ok((tee.count, label, manifest))
    });

    let mut upload = HashedUpload::start(repo, key, 16 << 20).await?;
    let mut upload_error = None;
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = upload.put(chunk).await {
            upload_error = Some(e);
            break;
        }
    }
    drop(rx);
    let compressed = compress.await;
    if upload_error.is_some() {
        let _ = child.start_kill();
    }
    let status = child.wait().await.context("wait for pg_basebackup")?;
    let stderr = stderr.await.unwrap_or_default();
    let outcome = if let Some(e) = upload_error {
        Err(anyhow::Error::new(e).context(format!("upload to repository {}", repo.label)))
    } else if !status.success() {
        Err(anyhow::anyhow!(
            "pg_basebackup failed ({status}): {}{}",
            last_lines(&stderr, 10),
            if stderr.contains("replication") {
                " (the role needs the REPLICATION attribute and a pg_hba.conf line for \
                 replication connections)"
            } else {
                ""
            }
        ))
    } else {
        match compressed {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(e)) => Err(e.context("compress pg_basebackup's tar")),
            Err(e) => Err(anyhow::Error::new(e).context("compress pg_basebackup's tar")),
        }
    };
    let (tar_size, label, manifest) = match outcome {
        Ok(read) => read,
        Err(e) => {
            upload.abort().await;
            return Err(e);
        }
    };
    if label.is_empty() || manifest.is_empty() {
        upload.abort().await;
        bail!(
            "pg_basebackup's tar has no {}: is it PostgreSQL 13 or newer?",
            if label.is_empty() {
                "backup_label"
            } else {
                "backup_manifest"
            }
        );
    }
    let (size, sha256) = upload.finish(key).await?;
    Ok(Streamed {
        size,
        sha256,
        tar_size,
        label,
        manifest,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn label_and_manifest_give_the_wal_range() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n";
        assert_eq!(parse_label(label).unwrap(), (0x200_0028, 1));
        assert!(parse_label("LABEL: x\n").is_err());
        let manifest = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]}"#;
        assert_eq!(parse_manifest_end(manifest).unwrap(), 0x200_0100);
        assert!(parse_manifest_end(r#"{"WAL-Ranges": []}"#).is_err());
    }
}
