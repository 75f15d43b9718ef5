//! Dumping a database into the repository: several pg_dumps on one exported snapshot, the
//! largest tables spread over archives of their own, each archive compressed, hashed and
//! uploaded as it is written, and the configured counts taken in the same snapshot.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::Utc;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::catalog::{
    TableSize, count_rows, count_specs, list_tables, table_columns, table_exists,
};
use super::conn::{DbUrl, collect_stderr, connect, last_lines, pick_tool, tool_candidates};
use super::{
    Compression, CountSelection, CountSpec, DumpContent, DumpFile, PgBackupPart, PgProgress,
    PgProgressFn, report,
};
use crate::layout::{PointId, dump_dir, dump_file_key};
use crate::pipe::{ChunkSink, CountingReader, copy_large, widen_pipe};
use crate::repo::Repository;
use crate::store::HashedUpload;

/// What [`backup_postgres`] does.
#[derive(Debug, Clone)]
pub struct PgBackupOptions {
    /// The point this dump belongs to; the dump is stored as `postgres/<point>.dump[.zst]`.
    pub point: PointId,
    /// `postgres://user[:password]@host:port/db[?sslmode=...]`. The password is handed to
    /// `pg_dump` through `PGPASSWORD`.
    pub database_url: String,
    /// Directory of `pg_dump`; found on PATH or in `/usr/lib/postgresql/*/bin` when unset.
    pub bin_dir: Option<PathBuf>,
    /// Tables to count in the dump's snapshot (default: every user table).
    pub counts: CountSelection,
    pub compression: Compression,
    /// Multipart part size (default 16 MiB; S3 needs at least 5 MiB).
    pub part_size: usize,
    /// pg_dump processes dumping data at once (default: the number of cores). The largest
    /// tables are spread over this many data archives by size.
    pub jobs: u32,
    /// Tables smaller than this stay in the main data archive (default 32 MiB): splitting
    /// them off costs one more pg_dump start-up than it saves.
    pub split_min_table_bytes: u64,
    pub connect_timeout: Duration,
    /// pg_dump gives up instead of queueing behind a lock held this long (e.g. by a
    /// migration); default 2 min.
    pub lock_wait_timeout: Duration,
    pub progress: Option<PgProgressFn>,
}

impl PgBackupOptions {
    pub fn new(point: PointId, database_url: impl Into<String>) -> PgBackupOptions {
        PgBackupOptions {
            point,
            database_url: database_url.into(),
            bin_dir: None,
            counts: CountSelection::AllTables,
            compression: Compression::default(),
            part_size: 16 << 20,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
            split_min_table_bytes: 32 << 20,
            connect_timeout: Duration::from_secs(15),
            lock_wait_timeout: Duration::from_secs(120),
            progress: None,
        }
    }
}

/// The sha256 of a `sha256sum` listing of `files`: one digest for the whole dump.
pub(crate) fn listing_sha256(files: &[DumpFile]) -> String {
    let mut hasher = Sha256::new();
    for f in files {
        hasher.update(format!("{}  {}\n", f.sha256, f.key).as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Dumps a database into the repository. Does not write a point: pass the part to
/// [`Repository::write_point`].
#[tracing::instrument(name = "repository.postgres.backup", skip_all, fields(point = %options.point))]
pub async fn backup_postgres(repo: &Repository, options: &PgBackupOptions) -> Result<PgBackupPart> {
    let started_at = Utc::now();
    let db = DbUrl::parse(&options.database_url)?;
    let candidates = tool_candidates("pg_dump", options.bin_dir.as_deref())?;

    let mut conn = connect(&db, options.connect_timeout).await?;
    let (database, server_version, server_num): (String, String, i32) = sqlx::query_as(
        "SELECT current_database(), current_setting('server_version'), \
         current_setting('server_version_num')::int",
    )
    .fetch_one(&mut conn)
    .await
    .with_context(|| format!("read the server version of {}", db.display))?;
    let server = super::ServerIdentity::read(&mut conn).await;
    let server_major = (server_num / 10000) as u32;
    let (pg_dump, pg_dump_version) = pick_tool(&candidates, "pg_dump", server_major).await?;

    // The exporting transaction must stay open until pg_dump has imported the snapshot; we keep
    // it until pg_dump exits. Its session must not be cut for idling meanwhile.
    conn.execute("SET idle_in_transaction_session_timeout = 0")
        .await
        .context("disable the idle transaction timeout for the backup session")?;
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .context("open the backup transaction")?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut conn)
        .await
        .context("export the backup snapshot with pg_export_snapshot()")?;
    let counts = count_specs(&mut conn, &options.counts)
        .await
        .with_context(|| format!("list the tables of {} to count", db.display))?;
    check_tables(&mut conn, &counts, &database).await?;
    let mut table_counts = BTreeMap::new();

    let tables = list_tables(&mut conn).await.with_context(|| {
        format!(
            "list the tables of {} to spread them over pg_dump jobs",
            db.display
        )
    })?;
    let groups = plan_groups(
        &tables,
        options.jobs.max(1) as usize,
        options.split_min_table_bytes,
    );

    let compressed = options.compression.is_compressed();
    let base_command = || {
        let mut cmd = Command::new(&pg_dump);
        cmd.arg("--format=custom")
            .arg("--no-owner")
            .arg("--no-acl")
            .arg(format!("--snapshot={snapshot}"))
            .arg(format!(
                "--lock-wait-timeout={}",
                options.lock_wait_timeout.as_millis().max(1)
            ))
            .arg(format!("--dbname={}", db.without_password));
        if options.compression != Compression::PgDump {
            cmd.arg("--compress=0");
        }
        cmd
    };
    let mut jobs: Vec<(Path, DumpContent, Command)> = Vec::new();
    let mut cmd = base_command();
    cmd.args(["--section=pre-data", "--section=post-data"]);
    jobs.push((
        dump_file_key(&options.point, "schema", compressed),
        DumpContent::Schema,
        cmd,
    ));
    let mut cmd = base_command();
    cmd.arg("--section=data");
    for table in groups.iter().flatten() {
        cmd.arg(format!("--exclude-table-data={}", table.pattern()));
    }
    jobs.push((
        dump_file_key(&options.point, "data", compressed),
        DumpContent::Data,
        cmd,
    ));
    for (n, group) in groups.iter().enumerate() {
        let mut cmd = base_command();
        cmd.arg("--section=data");
        for table in group {
            cmd.arg(format!("--table={}", table.pattern()));
        }
        jobs.push((
            dump_file_key(&options.point, &format!("data-{}", n + 1), compressed),
            DumpContent::Tables {
                tables: group.iter().map(|t| t.name()).collect(),
            },
            cmd,
        ));
    }

    // The pg_dumps import the snapshot when they start; meanwhile we count in the same
    // snapshot. The first pg_dump to fail stops the others.
    let (stop, stopped) = watch::channel(false);
    let (stop, db_ref) = (&stop, &db);
    let archives_total = jobs.len() as u64;
    let (archives_done, bytes_done) = (&AtomicU64::new(0), &AtomicU64::new(0));
    let dumped_so_far = |size: u64| {
        let bytes = bytes_done.fetch_add(size, Ordering::Relaxed) + size;
        let done = archives_done.fetch_add(1, Ordering::Relaxed) + 1;
        report(
            options.progress.as_ref(),
            PgProgress {
                stage: "dumping",
                archives_done: done,
                archives_total,
                bytes_done: bytes,
                bytes_total: 0,
            },
        );
    };
    report(
        options.progress.as_ref(),
        PgProgress {
            stage: "dumping",
            archives_total,
            ..PgProgress::default()
        },
    );
    let dumps = futures::future::join_all(jobs.into_iter().map(|(key, content, cmd)| {
        let stopped = stopped.clone();
        async move {
            let result = run_and_upload(repo, &key, cmd, db_ref, options, stopped).await;
            match &result {
                Ok((stored, _)) => dumped_so_far(stored.size),
                Err(_) => {
                    let _ = stop.send(true);
                }
            }
            (key, content, result)
        }
    }));
    let (dumped, counted) = tokio::join!(dumps, count_tables(&mut conn, &counts));

    let mut files = Vec::new();
    let mut failure: Option<anyhow::Error> = None;
    for (key, content, result) in dumped {
        match result {
            Ok((stored, dump_size)) => files.push(DumpFile {
                key: key.to_string(),
                content,
                size: stored.size,
                sha256: stored.sha256,
                dump_size,
            }),
            Err(e) => {
                let e = e.context(format!("dump database {} into {key}", db.display));
                // Report the part that failed, not the ones it stopped.
                if failure
                    .as_ref()
                    .is_none_or(|f| f.downcast_ref::<Stopped>().is_some())
                {
                    failure = Some(e);
                }
            }
        }
    }
    let mut columns = BTreeMap::new();
    let failure = match (failure, counted) {
        (Some(e), _) => Some(e),
        (None, Err(e)) => Some(e.context(format!("count tables of {}", db.display))),
        (None, Ok(counts)) => {
            table_counts = counts;
            match table_columns(&mut conn).await {
                Ok(found) => {
                    columns = found;
                    None
                }
                Err(e) => Some(e.context(format!("list the columns of {}", db.display))),
            }
        }
    };
    if let Some(e) = failure {
        for file in &files {
            let _ = repo.store.delete(&Path::from(file.key.as_str())).await;
        }
        return Err(e);
    }
    repo.make_durable().await?;

    // Read-only: nothing to commit. Closing ends the snapshot.
    let _ = conn.execute("ROLLBACK").await;
    let _ = conn.close().await;
    Ok(PgBackupPart {
        key: dump_dir(&options.point).to_string(),
        compression: options.compression,
        size: files.iter().map(|f| f.size).sum(),
        sha256: listing_sha256(&files),
        dump_size: files.iter().map(|f| f.dump_size).sum(),
        files,
        database,
        server_version,
        pg_dump_version,
        snapshot,
        started_at,
        finished_at: Utc::now(),
        table_counts,
        columns,
        server: Some(server),
    })
}

/// Spreads the tables of at least `min_bytes` over `jobs` bins by size, largest first onto the
/// lightest bin. Bin 0 is the main data archive, which also holds every smaller table; the
/// other non-empty bins are returned, each to become one data archive.
fn plan_groups(tables: &[TableSize], jobs: usize, min_bytes: u64) -> Vec<Vec<TableSize>> {
    let mut loads = vec![0u64; jobs.max(1)];
    let mut bins: Vec<Vec<TableSize>> = vec![Vec::new(); jobs.max(1)];
    let (mut big, small): (Vec<&TableSize>, Vec<&TableSize>) =
        tables.iter().partition(|t| t.bytes >= min_bytes);
    loads[0] = small.iter().map(|t| t.bytes).sum();
    big.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name().cmp(&b.name())));
    for table in big {
        // Among equally light bins a part of its own first: its rows can be loaded over
        // several connections at restore time, the main archive's cannot.
        let lightest = (0..loads.len())
            .min_by_key(|&i| (loads[i], i == 0))
            .unwrap_or(0);
        loads[lightest] += table.bytes;
        bins[lightest].push(table.clone());
    }
    bins.into_iter().skip(1).filter(|b| !b.is_empty()).collect()
}

/// The error of a pg_dump stopped because another part of the same backup failed.
#[derive(Debug, thiserror::Error)]
#[error("stopped because another part of the backup failed")]
struct Stopped;

struct Stored {
    size: u64,
    sha256: String,
}

/// Runs pg_dump, compresses its output on blocking threads, uploads and hashes it. The upload
/// is completed only if pg_dump exits successfully; otherwise it is aborted.
async fn run_and_upload(
    repo: &Repository,
    key: &Path,
    mut cmd: Command,
    db: &DbUrl,
    options: &PgBackupOptions,
    mut stopped: watch::Receiver<bool>,
) -> Result<(Stored, u64)> {
    db.apply_password(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("start {program}"))?;
    // Read pg_dump's output with plain blocking reads of up to 1 MiB on the compressing
    // thread: bridging each pipe read through the async runtime costs more than zstd does.
    let stdout = std::fs::File::from(
        child
            .stdout
            .take()
            .context("capture pg_dump's output")?
            .into_owned_fd()
            .context("capture pg_dump's output")?,
    );
    widen_pipe(&stdout);
    let stderr = collect_stderr(child.stderr.take());

    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let compression = options.compression;
    let compress = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut input = CountingReader {
            inner: stdout,
            count: 0,
        };
        let mut sink = ChunkSink::new(tx, 1 << 20);
        match compression {
            Compression::Zstd { level, workers } => {
                let mut encoder = zstd::stream::write::Encoder::new(sink, level)?;
                encoder.include_checksum(true)?;
                if workers > 1 {
                    encoder.multithread(workers)?;
                }
                copy_large(&mut input, &mut encoder)?;
                sink = encoder.finish()?;
            }
            Compression::PgDump | Compression::None => {
                copy_large(&mut input, &mut sink)?;
            }
        }
        sink.flush()?;
        Ok(input.count)
    });

    let mut upload = HashedUpload::start(repo, key, options.part_size).await?;
    let mut upload_error = None;
    let mut was_stopped = false;
    loop {
        let chunk = tokio::select! {
            chunk = rx.recv() => chunk,
            () = wait_stopped(&mut stopped) => {
                was_stopped = true;
                let _ = child.start_kill();
                None
            }
        };
        let Some(chunk) = chunk else { break };
        if let Err(e) = upload.put(chunk).await {
            upload_error = Some(e);
            break;
        }
    }
    // Stop the producer if the upload failed, then wait for everyone.
    drop(rx);
    let compressed = compress.await;
    let status = child.wait().await.context("wait for pg_dump")?;
    let stderr = stderr.await.unwrap_or_default();

    let compressed = match compressed {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("compress pg_dump's output")),
        Err(e) => Err(anyhow::Error::new(e).context("compress pg_dump's output")),
    };
    let outcome = if was_stopped {
        Err(anyhow::Error::new(Stopped))
    } else if let Some(e) = upload_error {
        Err(anyhow::Error::new(e).context(format!("upload to repository {}", repo.label)))
    } else if !status.success() {
        Err(anyhow::anyhow!(
            "pg_dump failed ({status}): {}",
            last_lines(&stderr, 20)
        ))
    } else {
        compressed
    };
    let dump_size = match outcome {
        Ok(n) => n,
        Err(e) => {
            // Leave nothing behind: an aborted multipart upload never becomes an object.
            upload.abort().await;
            return Err(e);
        }
    };
    let (size, sha256) = upload.finish(key).await?;
    Ok((Stored { size, sha256 }, dump_size))
}

/// Returns once `stopped` turns true; never if its sender goes away first.
async fn wait_stopped(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Fails, naming the table, when a table to count does not exist.
async fn check_tables(conn: &mut PgConnection, specs: &[CountSpec], database: &str) -> Result<()> {
    for spec in specs {
        if !table_exists(conn, &spec.table).await? {
            bail!(
                "table {} (counted as {:?}) does not exist in database {database}: fix the \
                 tables to count in the Postgres backup configuration",
                spec.table,
                spec.name
            );
        }
    }
    Ok(())
}

/// Counts the tables of `specs` in the dump's snapshot (the transaction open on `conn`).
async fn count_tables(
    conn: &mut PgConnection,
    specs: &[CountSpec],
) -> Result<BTreeMap<String, i64>> {
    // The pg_dumps already keep every core busy: parallel workers for the counts would only
    // add their start-up and hand-over costs (measured: ~0.1 CPU s on 2.2 million rows).
    conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        .await
        .context("disable parallel workers for the counts")?;
    count_rows(conn, specs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_large_tables_over_data_archives_by_size() {
        let t = |table: &str, bytes: u64| TableSize {
            schema: "public".to_owned(),
            table: table.to_owned(),
            bytes,
        };
        let names = |groups: Vec<Vec<TableSize>>| -> Vec<Vec<String>> {
            groups
                .into_iter()
                .map(|g| g.into_iter().map(|t| t.table).collect())
                .collect()
        };
        let tables = [
            t("events", 180),
            t("deliveries", 40),
            t("sessions", 30),
            t("tiny", 1),
        ];
        // Two jobs: the largest table alone in a part, everything else stays in the main one.
        assert_eq!(names(plan_groups(&tables, 2, 10)), [["events"]]);
        // Small tables weigh on the main archive; a large table that fits stays there too.
        let heavy_small = [t("x", 100), t("y", 60), t("s1", 30), t("s2", 30)];
        assert_eq!(names(plan_groups(&heavy_small, 2, 50)), [["x"]]);
        // One job, or nothing large enough: a single data archive.
        assert!(plan_groups(&tables, 1, 0).is_empty());
        assert!(plan_groups(&tables, 4, 1000).is_empty());
        // More jobs than tables: one table per part, none empty, the main archive left with
        // none (nothing large waits there for one connection).
        assert_eq!(
            names(plan_groups(&tables, 8, 0)),
            [["events"], ["deliveries"], ["sessions"], ["tiny"]]
        );
        // Nothing small: the largest table still gets a part of its own.
        let all_large = [t("events", 180), t("sessions", 30), t("deliveries", 40)];
        assert_eq!(names(plan_groups(&all_large, 2, 10)), [["events"]]);
        assert_eq!(t("we\"ird", 1).pattern(), "\"public\".\"we\"\"ird\"");
    }
}
