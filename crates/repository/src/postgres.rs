//! Postgres backups into the repository and restores out of it.
//!
//! Backup: open a REPEATABLE READ transaction, export its snapshot (`pg_export_snapshot()`),
//! count the configured tables in it, and run several `pg_dump --snapshot` processes on that
//! same snapshot at once, so the counts describe exactly what the dump holds:
//!
//! * `schema`: `--section=pre-data --section=post-data` (definitions; indexes, constraints and
//!   materialized view refreshes);
//! * `data`: `--section=data` for everything but the tables split off (small tables, sequence
//!   values, large objects);
//! * `data-<n>`: `--section=data -t ...` for the largest tables, spread over the parts by size.
//!
//! Each pg_dump writes an uncompressed custom archive (`-Z0`) that we compress with zstd and
//! stream into its own multipart upload while hashing it: no local copy. The uploads are
//! committed only when every pg_dump succeeded; otherwise the completed ones are deleted.
//!
//! Restore: the schema archive (small) is fetched and checked first and restores the pre-data
//! section; the data archives are streamed out of the repository, checked against their sha256
//! and decompressed into one `pg_restore` each, several at once. As each one commits, the
//! indexes and constraints on its own tables are built (`pg_restore -L`, planned from the schema
//! archive's table of contents), while the other archives still load, as `pg_restore -j` does
//! for a single archive; the rest of post-data (foreign keys, triggers, attaches, materialized
//! views) follows all data, with parallel jobs. Dumps of older points (one archive) are
//! streamed into `pg_restore` in one transaction, or restored from a scratch file with parallel
//! jobs.
//! Passwords travel to the tools in `PGPASSWORD`, never on a command line.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection};
// Identifiers in dynamic SQL are quoted with `quote_ident`; values are bound.
use sqlx::{AssertSqlSafe, Connection, Executor};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::layout::{PointId, dump_dir, dump_file_key};
use crate::pipe::{ChannelReader, ChunkSink, CountingReader};
use crate::repo::Repository;
use crate::store::{redact_url, retry};

/// How the dump is compressed in the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Compression {
    /// `pg_dump -Z0`, then zstd at `level` with `workers` threads in this process (default).
    Zstd { level: i32, workers: u32 },
    /// pg_dump's own compression (the runbook's plain `--format=custom`); single-threaded.
    PgDump,
    /// No compression at all.
    None,
}

impl Default for Compression {
    /// Level 1, one thread per archive: the archives of one backup are compressed
    /// concurrently, so more threads per archive only add hand-over costs.
    fn default() -> Self {
        Compression::Zstd {
            level: 1,
            workers: 1,
        }
    }
}

impl Compression {
    pub(crate) fn is_compressed(&self) -> bool {
        matches!(self, Compression::Zstd { .. })
    }
}

/// One count taken at backup time: rows of `table`, optionally broken down by a column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountSpec {
    /// Key in the point's `table_counts` (grouped counts add `name[column=value]` keys).
    pub name: String,
    /// `table` or `schema.table`.
    pub table: String,
    pub group_by: Option<String>,
}

impl CountSpec {
    pub fn table(table: &str) -> CountSpec {
        CountSpec {
            name: table.to_owned(),
            table: table.to_owned(),
            group_by: None,
        }
    }

    pub fn grouped(table: &str, column: &str) -> CountSpec {
        CountSpec {
            name: table.to_owned(),
            table: table.to_owned(),
            group_by: Some(column.to_owned()),
        }
    }

    /// The runbook's counts for cowork-sim: the drill report's (sessions, events, projections,
    /// artifacts, workflows, channel bindings, deliveries by status), and the rest of what its
    /// step 7 verifies: BYOK metadata (`byok_secrets`) and billing state (subscriptions by
    /// status, usage events).
    pub fn cowork_defaults() -> Vec<CountSpec> {
        vec![
            CountSpec::table("sessions"),
            CountSpec::table("session_events"),
            CountSpec::table("session_projections"),
            CountSpec::table("artifact_index"),
            CountSpec::table("workflows"),
            CountSpec::table("channel_bindings"),
            CountSpec::grouped("channel_deliveries", "status"),
            CountSpec::table("byok_secrets"),
            CountSpec::grouped("subscriptions", "status"),
            CountSpec::table("usage_events"),
        ]
    }
}

/// How far a Postgres backup or restore has come, one archive at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PgProgress {
    /// `dumping`, `pre-data`, `data`, `post-data`, `restoring`, `done`.
    pub stage: &'static str,
    pub archives_done: u64,
    pub archives_total: u64,
    /// Archive bytes stored (backup) or handed to pg_restore (restore) so far.
    pub bytes_done: u64,
    /// Archive bytes in all (a restore knows it up front; a backup does not: 0).
    pub bytes_total: u64,
}

/// Called with [`PgProgress`]; must be cheap.
#[derive(Clone)]
pub struct PgProgressFn(pub Arc<dyn Fn(&PgProgress) + Send + Sync>);

impl std::fmt::Debug for PgProgressFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgProgressFn")
    }
}

fn report(progress: Option<&PgProgressFn>, p: PgProgress) {
    if let Some(callback) = progress {
        (callback.0)(&p);
    }
}

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
    /// Tables to count in the dump's snapshot.
    pub counts: Vec<CountSpec>,
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
            counts: CountSpec::cowork_defaults(),
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

/// A completed dump in the repository, as the point records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgBackupPart {
    /// Repository key of the dump: the archive itself (one archive, points before parallel
    /// dumps), or the directory holding [`PgBackupPart::files`].
    pub key: String,
    pub compression: Compression,
    /// Bytes stored (all archives).
    pub size: u64,
    /// sha256 of the bytes stored. For a parallel dump: the sha256 of its `sha256sum` listing,
    /// one line `<sha256>  <key>\n` per file in the order of `files`.
    pub sha256: String,
    /// Bytes pg_dump wrote (before our compression; all archives).
    pub dump_size: u64,
    /// The archives of a parallel dump; empty for a single archive at `key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<DumpFile>,
    /// Database name (no host, user or password).
    pub database: String,
    pub server_version: String,
    pub pg_dump_version: String,
    /// The exported snapshot the dump and the counts were taken in.
    pub snapshot: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Row counts in the dump's snapshot, keyed by [`CountSpec::name`].
    pub table_counts: BTreeMap<String, i64>,
    /// The columns of every table in the dump's snapshot, `schema.table` → column names (empty
    /// for points taken before it was recorded). A restore's preflight compares the live
    /// database with it: what the live schema has and the point lacks, a restore rolls back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: TableColumns,
}

/// One custom-format archive of a parallel dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DumpFile {
    /// Repository key of the archive.
    pub key: String,
    pub content: DumpContent,
    /// Bytes stored.
    pub size: u64,
    /// sha256 of the bytes stored.
    pub sha256: String,
    /// Bytes pg_dump wrote (before our compression).
    pub dump_size: u64,
}

/// What one archive of a parallel dump holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DumpContent {
    /// The pre-data and post-data sections: restored before and after all data.
    Schema,
    /// The data section without the tables split off into [`DumpContent::Tables`] archives.
    Data,
    /// The data of these tables (`schema.table`) and the values of their owned sequences.
    Tables { tables: Vec<String> },
}

/// One stored archive, whichever layout it comes from.
#[derive(Debug, Clone)]
pub(crate) struct Archive {
    pub(crate) key: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) compressed: bool,
}

impl PgBackupPart {
    /// The stored archives: the files of a parallel dump, or the single archive.
    pub(crate) fn archives(&self) -> Vec<Archive> {
        let compressed = self.compression.is_compressed();
        if self.files.is_empty() {
            return vec![Archive {
                key: self.key.clone(),
                size: self.size,
                sha256: self.sha256.clone(),
                compressed,
            }];
        }
        self.files
            .iter()
            .map(|f| Archive {
                key: f.key.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                compressed,
            })
            .collect()
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
    check_tables(&mut conn, &options.counts, &database).await?;
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
    let (dumped, counted) = tokio::join!(dumps, count_tables(&mut conn, &options.counts));

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
    })
}

/// A table whose data may get an archive of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableSize {
    schema: String,
    table: String,
    bytes: u64,
}

impl TableSize {
    fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// A pg_dump pattern matching exactly this table (quoted: no wildcards, any case).
    fn pattern(&self) -> String {
        format!(
            "\"{}\".\"{}\"",
            self.schema.replace('"', "\"\""),
            self.table.replace('"', "\"\"")
        )
    }
}

/// Ordinary tables with data pg_dump dumps (not system or extension tables), largest first.
async fn list_tables(conn: &mut PgConnection) -> Result<Vec<TableSize>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, coalesce(pg_relation_size(c.oid), 0) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
           AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                           AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 3 DESC, 1, 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(schema, table, bytes)| TableSize {
            schema,
            table,
            bytes: bytes.max(0) as u64,
        })
        .collect())
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

    let upload = retry(&repo.options.retry, "start dump upload", || async {
        repo.store
            .put_multipart(key)
            .await
            .map_err(anyhow::Error::from)
    })
    .await
    .with_context(|| format!("start uploading {key} to repository {}", repo.label))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, options.part_size.max(5 << 20));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
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
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if let Err(e) = writer.wait_for_capacity(4).await {
            upload_error = Some(e);
            break;
        }
        writer.put(chunk);
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
            let _ = writer.abort().await;
            return Err(e);
        }
    };
    writer
        .finish()
        .await
        .with_context(|| format!("complete the upload of {key}"))?;
    Ok((
        Stored {
            size,
            sha256: hex::encode(hasher.finalize()),
        },
        dump_size,
    ))
}

/// Returns once `stopped` turns true; never if its sender goes away first.
async fn wait_stopped(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads `input` to its end into `out` in chunks of up to 1 MiB.
fn copy_large(input: &mut impl std::io::Read, out: &mut impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// A 1 MiB pipe instead of 64 KiB: fewer wake-ups of pg_dump and of us. Best effort.
fn widen_pipe(file: &impl std::os::fd::AsFd) {
    #[cfg(target_os = "linux")]
    let _ = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Fails, naming the table, when a table to count does not exist.
async fn check_tables(conn: &mut PgConnection, specs: &[CountSpec], database: &str) -> Result<()> {
    for spec in specs {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(quote_qualified(&spec.table))
            .fetch_one(&mut *conn)
            .await
            .with_context(|| format!("look up table {}", spec.table))?;
        if !exists {
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

/// Tables and their columns: `schema.table` → column names in their order.
pub type TableColumns = BTreeMap<String, Vec<String>>;

/// The tables of `specs` that do not exist on `conn` (as `CountSpec::table` names them).
pub async fn missing_tables(conn: &mut PgConnection, specs: &[CountSpec]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for spec in specs {
        let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(quote_qualified(&spec.table))
            .fetch_one(&mut *conn)
            .await
            .with_context(|| format!("look up table {}", spec.table))?;
        if !found && !missing.contains(&spec.table) {
            missing.push(spec.table.clone());
        }
    }
    Ok(missing)
}

/// The columns of every ordinary and partitioned table outside the system schemas, as
/// `schema.table` → column names in their order. Read in the dump's snapshot at backup, and
/// from the live database at a restore's preflight, so the two compare.
pub async fn table_columns(conn: &mut PgConnection) -> Result<TableColumns> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, a.attname::text
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg\\_%'
          ORDER BY 1, 2, a.attnum",
    )
    .fetch_all(&mut *conn)
    .await
    .context("read the tables' columns from pg_attribute")?;
    let mut columns = TableColumns::new();
    for (schema, table, column) in rows {
        columns
            .entry(format!("{schema}.{table}"))
            .or_default()
            .push(column);
    }
    Ok(columns)
}

/// Counts the rows of the tables of `specs` on `conn`, keyed as a point records them: the
/// total under [`CountSpec::name`], and for a grouped count `name[column=value]` per value
/// (NULL as `NULL`). A grouped count scans its table once: the total is the sum of its groups.
/// Backups count in the dump's snapshot; verification counts the restored database the same
/// way, so the two compare key by key.
pub async fn count_rows(
    conn: &mut PgConnection,
    specs: &[CountSpec],
) -> Result<BTreeMap<String, i64>> {
    let mut counts = BTreeMap::new();
    for spec in specs {
        let table = quote_qualified(&spec.table);
        let Some(column) = &spec.group_by else {
            let total: i64 =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(&mut *conn)
                    .await
                    .with_context(|| format!("count rows of {}", spec.table))?;
            counts.insert(spec.name.clone(), total);
            continue;
        };
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT coalesce({col}::text, 'NULL'), count(*) FROM {table} GROUP BY 1",
            col = quote_ident(column)
        )))
        .fetch_all(&mut *conn)
        .await
        .with_context(|| format!("count rows of {} by {column}", spec.table))?;
        counts.insert(spec.name.clone(), rows.iter().map(|(_, n)| n).sum());
        for (value, n) in rows {
            *counts
                .entry(format!("{}[{column}={value}]", spec.name))
                .or_insert(0) += n;
        }
    }
    Ok(counts)
}

/// What [`restore_postgres`] does.
#[derive(Debug, Clone)]
pub struct PgRestoreOptions {
    /// The target database. Restoring into a new, empty database and swapping it in is the
    /// safe way (the runbook's `createdb` + `pg_restore --clean --if-exists`); a parallel dump
    /// restores only into a database without tables.
    pub database_url: String,
    /// Directory of `pg_restore`; found on PATH or in `/usr/lib/postgresql/*/bin` when unset.
    pub bin_dir: Option<PathBuf>,
    /// Parallel pg_restore jobs. A parallel dump restores this many data archives at once and
    /// builds indexes with this many jobs. A single-archive dump (older points) uses them only
    /// with a `scratch_dir` to hold it, and is streamed with 1 job without one.
    pub jobs: u32,
    /// Where archives are decompressed to when they must be files: the schema archive of a
    /// parallel dump (small; the system temporary directory when unset), and a single-archive
    /// dump restored with `jobs` > 1. A single-archive dump without it is streamed into
    /// `pg_restore` in one transaction; a checksum failure at the end of the stream then aborts
    /// that transaction if pg_restore has not committed yet, so preflight with `verify_point`.
    pub scratch_dir: Option<PathBuf>,
    /// Create the target database first if it does not exist.
    pub create_database: bool,
    /// Connections that load each split-off table of a parallel dump at once (its rows dealt
    /// out in chunks to as many `COPY`s), so one large table is not loaded on one core while
    /// the others idle. Default (`None`): `jobs`. 1 loads each table with one `COPY`, as
    /// pg_restore does.
    pub copy_streams: Option<u32>,
    pub connect_timeout: Duration,
    pub progress: Option<PgProgressFn>,
}

/// Restore jobs when none are configured: this host's cores, as the runbook's `pg_restore -j
/// <cores>`.
pub fn default_restore_jobs() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

impl PgRestoreOptions {
    pub fn new(database_url: impl Into<String>) -> PgRestoreOptions {
        PgRestoreOptions {
            database_url: database_url.into(),
            bin_dir: None,
            jobs: 1,
            scratch_dir: None,
            create_database: false,
            copy_streams: None,
            connect_timeout: Duration::from_secs(15),
            progress: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PgRestoreReport {
    pub point: PointId,
    /// Target database name.
    pub database: String,
    /// Data streamed into pg_restore (true) or restored from a scratch file (false).
    pub streamed: bool,
    /// Bytes of custom-format archive handed to pg_restore.
    pub archive_bytes: u64,
    pub pg_restore_version: String,
    pub elapsed: Duration,
}

/// Restores a point's dump into a database.
#[tracing::instrument(name = "repository.postgres.restore", skip_all, fields(point = %point))]
pub async fn restore_postgres(
    repo: &Repository,
    point: &PointId,
    options: &PgRestoreOptions,
) -> Result<PgRestoreReport> {
    let started = Instant::now();
    let found = repo.read_point(point).await?;
    let Some(part) = found.postgres else {
        bail!("point {point} has no Postgres backup: choose a point that has one");
    };
    if part.files.is_empty() && options.jobs > 1 && options.scratch_dir.is_none() {
        // pg_restore runs jobs only from a file; with nowhere to put one, stream it instead.
        tracing::warn!(
            %point,
            "point {point} was taken as one archive, and a parallel pg_restore of it needs a \
             scratch directory: restoring it with 1 job, streamed"
        );
    }
    let db = DbUrl::parse(&options.database_url)?;
    let candidates = tool_candidates("pg_restore", options.bin_dir.as_deref())?;
    let dump_major = major_of(&part.pg_dump_version).unwrap_or(0);
    let (pg_restore, pg_restore_version) = pick_tool(&candidates, "pg_restore", dump_major).await?;
    if options.create_database {
        create_database(&db, options.connect_timeout).await?;
    }
    // Fail on a wrong URL (or a target that is not empty) before moving gigabytes.
    let mut conn = connect(&db, options.connect_timeout).await?;
    if !part.files.is_empty() {
        check_empty(&mut conn, &db).await?;
    }
    conn.close().await.ok();

    let restore_command = |args: &[&str]| {
        let mut cmd = Command::new(&pg_restore);
        cmd.args(["--no-owner", "--no-acl", "--exit-on-error"])
            .args(args)
            .arg(format!("--dbname={}", db.without_password));
        db.apply_password(&mut cmd);
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    };

    let whole = PgProgress {
        stage: "restoring",
        archives_total: part.archives().len() as u64,
        bytes_total: part.size,
        ..PgProgress::default()
    };
    if part.files.is_empty() {
        report(options.progress.as_ref(), whole.clone());
    }
    let (archive_bytes, streamed) = if !part.files.is_empty() {
        let bytes = restore_parallel_dump(
            repo,
            point,
            &part,
            options,
            (&pg_restore, major_of(&pg_restore_version).unwrap_or(0)),
            &restore_command,
        )
        .await
        .with_context(|| {
            format!(
                "restore point {point} into {}; the database holds a partial restore: \
                     drop it, and restore into a new database",
                db.display
            )
        })?;
        (bytes, true)
    } else if let Some(dir) = &options.scratch_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create scratch directory {}", dir.display()))?;
        let file = dir.join(format!("{point}.dump"));
        let bytes = fetch_dump(repo, point, &file).await?;
        let mut cmd = restore_command(&["--clean", "--if-exists"]);
        cmd.arg(format!("--jobs={}", options.jobs.max(1)))
            .arg(&file)
            .stdin(Stdio::null());
        let result = run_pg_restore(cmd).await;
        let _ = std::fs::remove_file(&file);
        result?;
        (bytes, false)
    } else {
        let cmd = restore_command(&["--clean", "--if-exists", "--single-transaction"]);
        let archive = part.archives().remove(0);
        let bytes = stream_into_pg_restore(repo, &archive, cmd)
            .await
            .with_context(|| format!("restore into {}", db.display))?;
        (bytes, true)
    };
    report(
        options.progress.as_ref(),
        PgProgress {
            stage: "done",
            archives_done: whole.archives_total,
            bytes_done: whole.bytes_total,
            ..whole
        },
    );
    Ok(PgRestoreReport {
        point: point.clone(),
        database: db.database.clone(),
        streamed,
        archive_bytes,
        pg_restore_version,
        elapsed: started.elapsed(),
    })
}

/// Restores a parallel dump: pre-data from the schema archive (fetched and checked first),
/// then the data archives streamed into `jobs` pg_restores at once, each in one transaction
/// (a split-off archive's rows through one or more connections instead, see
/// [`stream_into_connections`]), each followed by the indexes and constraints of its own tables
/// (as `pg_restore -j` builds a table's indexes as soon as its data is in, while other tables
/// still load), then the rest of post-data (foreign keys, triggers, ...) with `jobs` parallel
/// jobs. Returns the archive bytes handed to pg_restore.
async fn restore_parallel_dump(
    repo: &Repository,
    point: &PointId,
    part: &PgBackupPart,
    options: &PgRestoreOptions,
    (pg_restore, pg_restore_major): (&FsPath, u32),
    restore_command: &(dyn Fn(&[&str]) -> Command + Sync),
) -> Result<u64> {
    let compressed = part.compression.is_compressed();
    let archive = |f: &DumpFile| Archive {
        key: f.key.clone(),
        size: f.size,
        sha256: f.sha256.clone(),
        compressed,
    };
    let Some(schema) = part.files.iter().find(|f| f.content == DumpContent::Schema) else {
        bail!(
            "the dump of point {point} has no schema archive: it is damaged; restore from \
             another point"
        );
    };
    let dir = options
        .scratch_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("create scratch directory {}", dir.display()))?;
    let schema_file = dir.join(format!("{point}-{}.schema.dump", uuid::Uuid::new_v4()));
    let (archives_total, bytes_total) = (
        part.files.len() as u64,
        part.files.iter().map(|f| f.size).sum::<u64>(),
    );
    let (archives_done, bytes_done) = (&AtomicU64::new(0), &AtomicU64::new(0));
    let step = |stage: &'static str, size: Option<u64>| {
        if let Some(size) = size {
            archives_done.fetch_add(1, Ordering::Relaxed);
            bytes_done.fetch_add(size, Ordering::Relaxed);
        }
        report(
            options.progress.as_ref(),
            PgProgress {
                stage,
                archives_done: archives_done.load(Ordering::Relaxed),
                archives_total,
                bytes_done: bytes_done.load(Ordering::Relaxed),
                bytes_total,
            },
        );
    };
    step("pre-data", None);
    let mut total = fetch_archive(repo, &archive(schema), &schema_file, false).await?;
    let result = async {
        let mut cmd = restore_command(&[
            "--section=pre-data",
            "--clean",
            "--if-exists",
            "--single-transaction",
        ]);
        cmd.arg(&schema_file).stdin(Stdio::null());
        run_pg_restore(cmd)
            .await
            .context("restore the pre-data section (tables, types, functions)")?;
        step("data", Some(schema.size));

        let data_files: Vec<&DumpFile> = part
            .files
            .iter()
            .filter(|f| f.content != DumpContent::Schema)
            .collect();
        // Which post-data entries each data archive's tables allow right after it; without a
        // readable table of contents, all of post-data waits for all data, as it is safe to.
        let toc = post_data_plan(pg_restore, &schema_file, &data_files).await;
        // Rows are dealt out over several connections only from a UTF-8 script (the text of
        // its statements goes through the database driver as it is), written to our pipe.
        // pg_restore before 12 writes `--file=-` to a file named "-", not to standard output.
        let utf8 =
            matches!(&toc, Ok((_, Some(encoding))) if encoding == "UTF8") && pg_restore_major >= 12;
        let plan = match toc {
            Ok((plan, _)) => Some(plan),
            Err(e) => {
                tracing::warn!(
                    "cannot read the table of contents of the schema archive ({e:#}); indexes \
                     will be built after all data"
                );
                None
            }
        };
        let jobs = options.jobs.max(1);
        let streams = if utf8 {
            options.copy_streams.unwrap_or(jobs).max(1)
        } else {
            1
        };
        let lists = (&dir, point);
        // Owned items: a stream of futures borrowing its items is not `Send` for every
        // lifetime, which a spawned caller needs. Largest first: with fewer jobs than
        // archives, the longest load must not start last.
        let mut work: Vec<(Archive, Vec<u32>, Option<u64>)> = data_files
            .iter()
            .enumerate()
            .map(|(n, file)| {
                let early = plan.as_ref().map(|p| p.early[n].clone());
                // A split-off archive holds rows of its tables and their sequences' values
                // only (no large objects): its script is plain COPYs and setval()s, whose rows
                // more connections can share (with the size of its script, roughly).
                let split = (streams > 1 && matches!(file.content, DumpContent::Tables { .. }))
                    .then_some(file.dump_size);
                (archive(file), early.unwrap_or_default(), split)
            })
            .collect();
        work.sort_by_key(|(archive, _, _)| std::cmp::Reverse(archive.size));
        // Job slots nothing else will use: those beyond the archives from the start, then
        // each one whose archive is done once no archive waits to start. A split-off
        // archive's load takes them as extra connections while it has rows left.
        let spare = &Semaphore::new((jobs as usize).saturating_sub(work.len()));
        let unstarted = &AtomicUsize::new(work.len());
        let restored: Vec<u64> = futures::stream::iter(work)
            .map(|(archive, early, split)| {
                let schema_file = &schema_file;
                async move {
                    unstarted.fetch_sub(1, Ordering::SeqCst);
                    let restored = match split {
                        Some(expected) => {
                            let load = SplitLoad {
                                max: streams,
                                spare,
                                expected,
                            };
                            stream_into_connections(repo, &archive, pg_restore, options, load)
                                .await?
                        }
                        None => {
                            let cmd = restore_command(&["--single-transaction"]);
                            stream_into_pg_restore(repo, &archive, cmd).await?
                        }
                    };
                    step("data", Some(archive.size));
                    if !early.is_empty() {
                        restore_listed(restore_command, schema_file, lists, &early, jobs)
                            .await
                            .with_context(|| {
                                format!(
                                    "build the indexes and constraints of the tables in {}",
                                    archive.key
                                )
                            })?;
                    }
                    if unstarted.load(Ordering::SeqCst) == 0 {
                        spare.add_permits(1);
                    }
                    Ok(restored)
                }
            })
            .buffer_unordered(jobs as usize)
            .collect::<Vec<Result<u64>>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        total += restored.iter().sum::<u64>();

        step("post-data", None);
        let rest = match &plan {
            None => {
                let mut cmd = restore_command(&["--section=post-data"]);
                cmd.arg(format!("--jobs={jobs}"))
                    .arg(&schema_file)
                    .stdin(Stdio::null());
                run_pg_restore(cmd).await
            }
            Some(plan) if plan.rest.is_empty() => Ok(()),
            Some(plan) => {
                restore_listed(restore_command, &schema_file, lists, &plan.rest, jobs).await
            }
        };
        rest.context("restore the post-data section (indexes, constraints, materialized views)")?;
        Ok::<_, anyhow::Error>(total)
    }
    .await;
    let _ = std::fs::remove_file(&schema_file);
    result
}

/// One entry of an archive's table of contents, as `pg_restore --verbose --file=-` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TocEntry {
    id: u32,
    /// `TABLE`, `INDEX`, `CONSTRAINT`, `FK CONSTRAINT`, `TRIGGER`, ...
    kind: String,
    schema: String,
    name: String,
    /// Ids of the entries this one depends on.
    deps: Vec<u32>,
}

/// Parses the comment headers of `pg_restore --verbose --file=-` output (an entry whose name
/// line is missing or unreadable keeps an empty kind, so it is never built early):
///
/// ```text
/// -- TOC entry 3216 (class 2606 OID 16392)
/// -- Dependencies: 214
/// -- Name: a a_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
/// ```
fn parse_toc(sql: &str) -> Vec<TocEntry> {
    let mut entries = Vec::new();
    let mut current: Option<TocEntry> = None;
    for line in sql.lines() {
        if let Some(rest) = line.strip_prefix("-- TOC entry ") {
            entries.extend(current.take());
            current = rest
                .split_whitespace()
                .next()
                .and_then(|id| id.parse().ok())
                .map(|id| TocEntry {
                    id,
                    kind: String::new(),
                    schema: String::new(),
                    name: String::new(),
                    deps: Vec::new(),
                });
        } else if let Some(entry) = current.as_mut() {
            if let Some(deps) = line.strip_prefix("-- Dependencies: ") {
                entry.deps = deps
                    .split_whitespace()
                    .filter_map(|d| d.parse().ok())
                    .collect();
            } else if let Some(header) = line.strip_prefix("-- Name: ") {
                // `Name: N; Type: T; Schema: S; Owner: O`, read from the right: a name may
                // hold "; ", a type or schema name printed here does not.
                let parsed = header.rsplit_once("; Owner: ").and_then(|(left, _)| {
                    let (left, schema) = left.rsplit_once("; Schema: ")?;
                    let (name, kind) = left.rsplit_once("; Type: ")?;
                    Some((name, kind, schema))
                });
                if let Some((name, kind, schema)) = parsed {
                    entry.name = name.to_owned();
                    entry.kind = kind.to_owned();
                    entry.schema = schema.to_owned();
                }
            }
        }
    }
    entries.extend(current);
    entries
}

/// The post-data entries to restore right after each data archive (indexes and constraints
/// on exactly one of its tables, needing nothing else from post-data), and the rest.
#[derive(Debug, Default, PartialEq, Eq)]
struct PostDataPlan {
    /// Per data archive, in the order given.
    early: Vec<Vec<u32>>,
    rest: Vec<u32>,
}

fn plan_post_data(pre: &[TocEntry], post: &[TocEntry], archives: &[&DumpContent]) -> PostDataPlan {
    let tables: HashMap<u32, String> = pre
        .iter()
        .filter(|e| e.kind == "TABLE")
        .map(|e| (e.id, format!("{}.{}", e.schema, e.name)))
        .collect();
    // The data archive each table's rows are in: its own, or the main one.
    let mut split_off: HashMap<&str, usize> = HashMap::new();
    for (n, content) in archives.iter().enumerate() {
        if let DumpContent::Tables { tables } = content {
            split_off.extend(tables.iter().map(|t| (t.as_str(), n)));
        }
    }
    let main = archives.iter().position(|c| **c == DumpContent::Data);
    let archive_of = |table: &str| split_off.get(table).copied().or(main);
    let post_ids: BTreeSet<u32> = post.iter().map(|e| e.id).collect();
    let mut plan = PostDataPlan {
        early: vec![Vec::new(); archives.len()],
        rest: Vec::new(),
    };
    for entry in post {
        let on_one_table = || {
            if !matches!(entry.kind.as_str(), "INDEX" | "CONSTRAINT")
                || entry.deps.iter().any(|d| post_ids.contains(d))
            {
                return None;
            }
            let on: BTreeSet<&String> = entry.deps.iter().filter_map(|d| tables.get(d)).collect();
            match on.into_iter().collect::<Vec<_>>()[..] {
                [table] => archive_of(table),
                _ => None,
            }
        };
        match on_one_table() {
            Some(n) => plan.early[n].push(entry.id),
            None => plan.rest.push(entry.id),
        }
    }
    plan
}

/// Reads the schema archive's table of contents (pre-data for the tables, post-data for what
/// to build) and plans post-data around the data archives. Also returns the client encoding
/// the dump's scripts set (`UTF8`, ...), when they set one.
async fn post_data_plan(
    pg_restore: &FsPath,
    schema_file: &FsPath,
    data_files: &[&DumpFile],
) -> Result<(PostDataPlan, Option<String>)> {
    let read = |args: [&'static str; 3]| async move {
        let out = Command::new(pg_restore)
            .args(args)
            .arg(schema_file)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run pg_restore {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "pg_restore {} failed ({}): {}",
                args.join(" "),
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 5)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (pre, post, listed) = tokio::try_join!(
        read(["--section=pre-data", "--verbose", "--file=-"]),
        read(["--section=post-data", "--verbose", "--file=-"]),
        read(["--section=post-data", "--list", "--file=-"]),
    )?;
    let encoding = pre.lines().find_map(|line| {
        let quoted = line.strip_prefix("SET client_encoding = '")?;
        Some(quoted.strip_suffix("';")?.to_owned())
    });
    // The SQL (no database: --file=-), whose --verbose comments name each entry; the list.
    let (pre, post, listed) = (parse_toc(&pre), parse_toc(&post), listed_ids(&listed));
    // Every post-data entry must land in one list or another: the plan covers exactly what
    // `pg_restore --list` names, or it is not used.
    let parsed: BTreeSet<u32> = post.iter().map(|e| e.id).collect();
    if parsed != listed {
        bail!(
            "its comments name {} post-data entries, its --list {}",
            parsed.len(),
            listed.len()
        );
    }
    let contents: Vec<&DumpContent> = data_files.iter().map(|f| &f.content).collect();
    Ok((plan_post_data(&pre, &post, &contents), encoding))
}

/// The entry ids of `pg_restore --list` output (`3216; 2606 16392 CONSTRAINT ...`; lines
/// starting with `;` are comments).
fn listed_ids(list: &str) -> BTreeSet<u32> {
    list.lines()
        .filter_map(|line| line.trim_start().split_once(';'))
        .filter_map(|(id, _)| id.parse().ok())
        .collect()
}

/// Restores the entries `ids` of the archive `file` with `jobs` parallel jobs (`pg_restore -L`;
/// the list file goes in `dir`, named after the point, and is removed afterwards).
async fn restore_listed(
    restore_command: &(dyn Fn(&[&str]) -> Command + Sync),
    file: &FsPath,
    (dir, point): (&PathBuf, &PointId),
    ids: &[u32],
    jobs: u32,
) -> Result<()> {
    let list = dir.join(format!("{point}-{}.list", uuid::Uuid::new_v4()));
    let text: String = ids.iter().map(|id| format!("{id};\n")).collect();
    std::fs::write(&list, text).with_context(|| format!("write {}", list.display()))?;
    let mut cmd = restore_command(&[]);
    cmd.arg(format!("--jobs={jobs}"))
        .arg(format!("--use-list={}", list.display()))
        .arg(file)
        .stdin(Stdio::null());
    let result = run_pg_restore(cmd).await;
    let _ = std::fs::remove_file(&list);
    result
}

/// Fails, naming the database, when it already holds tables: a parallel dump cannot drop
/// what it replaces in the right order (its constraints come after its data).
async fn check_empty(conn: &mut PgConnection, db: &DbUrl) -> Result<()> {
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') \
           AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'",
    )
    .fetch_one(&mut *conn)
    .await
    .with_context(|| format!("check that database {} is empty", db.display))?;
    if tables > 0 {
        bail!(
            "database {} already holds {tables} tables, views or sequences: restore into a new \
             database (create it, or let the restore create it) and swap it in, or drop it first",
            db.display
        );
    }
    Ok(())
}

/// pg_restore's standard input as a blocking file (written from a blocking thread), its pipe
/// widened.
fn pipe_input(child: &mut tokio::process::Child) -> Result<std::fs::File> {
    let stdin = std::fs::File::from(
        child
            .stdin
            .take()
            .context("open pg_restore's input")?
            .into_owned_fd()
            .context("open pg_restore's input")?,
    );
    widen_pipe(&stdin);
    Ok(stdin)
}

/// Streams one archive out of the repository into a `pg_restore` reading its standard input
/// in one transaction. If the stream fails (e.g. a checksum mismatch at its end) while
/// pg_restore still runs, pg_restore is stopped before its input closes, so it cannot commit.
async fn stream_into_pg_restore(
    repo: &Repository,
    archive: &Archive,
    mut cmd: Command,
) -> Result<u64> {
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().context("start pg_restore")?;
    let stdin = pipe_input(&mut child)?;
    let stderr = collect_stderr(child.stderr.take());
    let (sent, input) = download_dump(repo, archive, Box::new(stdin)).await;
    let mut stopped_by_us = false;
    if sent.is_err() && matches!(child.try_wait(), Ok(None)) {
        stopped_by_us = true;
        let _ = child.start_kill();
    }
    drop(input);
    let status = child.wait().await.context("wait for pg_restore")?;
    let stderr = stderr.await.unwrap_or_default();
    let key = &archive.key;
    match sent {
        Ok(_) if !status.success() => bail!(
            "pg_restore of {key} failed ({status}): {}",
            last_lines(&stderr, 20)
        ),
        Ok(n) => Ok(n),
        Err(e) if stopped_by_us => Err(e.context(format!(
            "restore {key}: pg_restore was stopped and its transaction rolled back"
        ))),
        Err(e) => Err(e.context(format!(
            "restore {key}: pg_restore failed ({status}): {}",
            last_lines(&stderr, 20)
        ))),
    }
}

/// Streams one split-off data archive out of the repository into connections to the target
/// ([`crate::pg_copy`]): pg_restore writes the archive's SQL script, whose COPY rows are dealt
/// out to one connection, and more as job slots come free, each in its own transaction. The
/// transactions commit only once the whole archive has arrived with the point's sha256,
/// pg_restore has finished and every COPY has succeeded; a failure anywhere stops pg_restore
/// and rolls all of them back.
async fn stream_into_connections(
    repo: &Repository,
    archive: &Archive,
    pg_restore: &FsPath,
    options: &PgRestoreOptions,
    split: SplitLoad<'_>,
) -> Result<u64> {
    let key = &archive.key;
    let db = DbUrl::parse(&options.database_url)?;
    let conn = connect(&db, options.connect_timeout).await?;
    let mut cmd = Command::new(pg_restore);
    cmd.args(["--no-owner", "--no-acl", "--exit-on-error", "--file=-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("start pg_restore")?;
    let stdin = pipe_input(&mut child)?;
    let script = child.stdout.take().context("open pg_restore's output")?;
    widen_pipe(&script);
    let stderr = collect_stderr(child.stderr.take());
    // Not reaped before `wait` below, so the pid stays this child's. The side that failed
    // first stops pg_restore, and its error is the one reported.
    let pid = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
    let failed_first = std::sync::OnceLock::<&'static str>::new();
    let stop = |side: &'static str| {
        let _ = failed_first.set(side);
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    };
    let fetch = async {
        let (sent, input) = download_dump(repo, archive, Box::new(stdin)).await;
        if sent.is_err() {
            stop("fetch");
        }
        drop(input); // pg_restore's end of input
        sent
    };
    let connect_more = || -> futures::future::BoxFuture<'_, Result<PgConnection>> {
        Box::pin(connect(&db, options.connect_timeout))
    };
    let joining = crate::pg_copy::Joining {
        slots: split.spare,
        connect: &connect_more,
        max: split.max as usize,
        expected: split.expected,
    };
    let load = async {
        let loaded =
            crate::pg_copy::load_script(script, vec![conn], crate::pg_copy::CHUNK, Some(joining))
                .await;
        if loaded.is_err() {
            stop("load"); // or it blocks writing a script nobody reads
        }
        loaded
    };
    let (sent, loaded) = tokio::join!(fetch, load);
    let status = child.wait().await.context("wait for pg_restore")?;
    let stderr = stderr.await.unwrap_or_default();
    let rolled_back = "the transactions were rolled back";
    if let (Some(&"load"), Err(e)) = (failed_first.get(), &loaded) {
        let said = if stderr.trim().is_empty() {
            String::new()
        } else {
            format!("; pg_restore said: {}", last_lines(&stderr, 20))
        };
        bail!("restore {key}: {e:#}{said}; {rolled_back}");
    }
    let sent = sent.with_context(|| format!("restore {key}: {rolled_back}"))?;
    if !status.success() {
        bail!(
            "pg_restore of {key} failed ({status}): {}; {rolled_back}",
            last_lines(&stderr, 20)
        );
    }
    let mut loaded = loaded.with_context(|| format!("restore {key}: {rolled_back}"))?;
    if loaded.copies == 0 {
        // A split-off archive holds at least one table's rows (even an empty table has its
        // COPY): a script without any did not come from this archive.
        bail!(
            "restore {key}: pg_restore's script of it holds no COPY of any table; {rolled_back}; \
             {}",
            crate::pg_copy::ONE_COPY
        );
    }
    // The slots of connections that joined go back to other loads still running.
    split.spare.add_permits(loaded.joined as usize);
    tracing::debug!(
        archive = %key,
        rows = loaded.rows,
        connections = loaded.conns.len(),
        "rows loaded; committing"
    );
    for conn in &mut loaded.conns {
        conn.execute("COMMIT")
            .await
            .with_context(|| format!("commit the rows of {key} in {}", db.display))?;
    }
    for conn in loaded.conns {
        conn.close().await.ok();
    }
    Ok(sent)
}

/// How a split-off archive's rows may spread: up to `max` connections, the extra ones as
/// slots come free in `spare`; `expected` is the size of its script, roughly.
struct SplitLoad<'a> {
    max: u32,
    spare: &'a Semaphore,
    expected: u64,
}

/// Fetches a point's dump, checks its sha256 and decompresses it into `dest`: a custom-format
/// archive `pg_restore` reads directly, or for a parallel dump a directory holding one such
/// archive per file (`schema.dump`, `data.dump`, `data-1.dump`, ...; restore `--section=pre-data`
/// of the schema, then the data archives, then `--section=post-data` of the schema). `dest`
/// appears only when complete and correct. Returns the archive bytes written.
pub async fn fetch_dump(repo: &Repository, point: &PointId, dest: &FsPath) -> Result<u64> {
    let found = repo.read_point(point).await?;
    let Some(part) = found.postgres else {
        bail!("point {point} has no Postgres backup");
    };
    if part.files.is_empty() {
        let archive = part.archives().remove(0);
        return fetch_archive(repo, &archive, dest, true).await;
    }
    let partial = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("create directory {}", partial.display()))?;
    let result = async {
        let mut total = 0;
        for archive in part.archives() {
            let name = archive
                .key
                .rsplit('/')
                .next()
                .unwrap_or(&archive.key)
                .trim_end_matches(".zst")
                .to_owned();
            total += fetch_archive(repo, &archive, &partial.join(name), true).await?;
        }
        std::fs::rename(&partial, dest)
            .with_context(|| format!("move the archives to {}", dest.display()))?;
        Ok(total)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

/// Fetches one archive into the file `dest`, checked and decompressed; `dest` appears only
/// when complete and correct (and fsync'd with `sync`).
async fn fetch_archive(
    repo: &Repository,
    archive: &Archive,
    dest: &FsPath,
    sync: bool,
) -> Result<u64> {
    let partial = dest.with_extension("partial");
    let file =
        std::fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let sink: Sink = if sync {
        Box::new(SyncingFile(file))
    } else {
        Box::new(std::io::BufWriter::with_capacity(1 << 20, file))
    };
    let (result, sink) = download_dump(repo, archive, sink).await;
    drop(sink);
    match result {
        Ok(n) => {
            std::fs::rename(&partial, dest)
                .with_context(|| format!("move the archive to {}", dest.display()))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// A file that is fsync'd when dropped after a complete write.
struct SyncingFile(std::fs::File);

impl Write for SyncingFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.write(data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.0.sync_all()
    }
}

/// A writer handed back after use, so the caller decides when it closes (closing a child's
/// stdin is end of input for it).
pub(crate) type Sink = Box<dyn Write + Send>;

/// Streams one archive out of the repository into `sink`, decompressing it, and fails if its
/// size or sha256 differ from the point's. Returns the bytes written to `sink`, and the sink.
pub(crate) async fn download_dump(
    repo: &Repository,
    part: &Archive,
    sink: Sink,
) -> (Result<u64>, Option<Sink>) {
    let key = Path::from(part.key.as_str());
    let got = retry(&repo.options.retry, "open dump", || async {
        repo.store.get(&key).await.map_err(anyhow::Error::from)
    })
    .await
    .with_context(|| format!("read dump {key} from repository {}", repo.label));
    let got = match got {
        Ok(got) => got,
        Err(e) => return (Err(e), Some(sink)),
    };
    let mut stream = crate::body::body_stream(got);

    let (tx, rx) = mpsc::channel::<Result<Bytes, String>>(8);
    let compressed = part.compressed;
    let writer = tokio::task::spawn_blocking(move || -> (std::io::Result<u64>, Sink) {
        let mut sink = sink;
        let copy = || -> std::io::Result<u64> {
            let reader = ChannelReader::new(rx);
            let written = if compressed {
                let mut decoder = zstd::stream::read::Decoder::new(reader)?;
                copy_large(&mut decoder, &mut sink)?
            } else {
                let mut reader = reader;
                copy_large(&mut reader, &mut sink)?
            };
            sink.flush()?;
            Ok(written)
        };
        let result = copy();
        (result, sink)
    });

    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut failure: Option<anyhow::Error> = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    break; // the consumer failed; its error is reported below
                }
            }
            Err(e) => {
                let _ = tx.send(Err("reading the dump failed".into())).await;
                failure = Some(anyhow::Error::new(e).context(format!("read dump {key}")));
                break;
            }
        }
    }
    if failure.is_none() {
        let actual = hex::encode(hasher.finalize());
        if size != part.size || actual != part.sha256 {
            let reason = format!(
                "dump {key} in repository {} does not match the point ({size} bytes with \
                 sha256 {actual}; the point recorded {} bytes with sha256 {}): it is damaged; \
                 restore from another point",
                repo.label, part.size, part.sha256
            );
            let _ = tx.send(Err(reason.clone())).await;
            failure = Some(anyhow::anyhow!(reason));
        }
    }
    drop(tx);
    let (written, sink) = match writer.await {
        Ok((written, sink)) => (written, Some(sink)),
        Err(e) => {
            let e = anyhow::Error::new(e).context("decompress the dump");
            return (Err(failure.unwrap_or(e)), None);
        }
    };
    if let Some(e) = failure {
        return (Err(e), sink);
    }
    (
        written.with_context(|| format!("decompress dump {key} and hand it to its reader")),
        sink,
    )
}

async fn run_pg_restore(mut cmd: Command) -> Result<()> {
    let out = cmd.output().await.context("run pg_restore")?;
    if !out.status.success() {
        bail!(
            "pg_restore failed ({}): {}",
            out.status,
            last_lines(&String::from_utf8_lossy(&out.stderr), 20)
        );
    }
    Ok(())
}

async fn create_database(db: &DbUrl, timeout: Duration) -> Result<()> {
    let mut maintenance = db.clone();
    maintenance.full = with_database(&db.full, "postgres")?;
    let mut conn = connect(&maintenance, timeout).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&db.database)
            .fetch_one(&mut conn)
            .await
            .context("look for the target database")?;
    if !exists {
        conn.execute(AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote_ident(&db.database)
        )))
        .await
        .with_context(|| format!("create database {}", db.database))?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// A database URL split for safe use: the password goes to `PGPASSWORD`, never to argv or
/// messages.
#[derive(Clone)]
struct DbUrl {
    full: String,
    without_password: String,
    password: Option<String>,
    display: String,
    database: String,
}

impl DbUrl {
    fn parse(raw: &str) -> Result<DbUrl> {
        let display = redact_url(raw);
        let mut url = url::Url::parse(raw).map_err(|_| {
            anyhow::anyhow!(
                "database URL {display} is not a URL: write it as \
                 postgres://USER@HOST:PORT/DATABASE"
            )
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            bail!("database URL {display} must start with postgres://");
        }
        let database = url.path().trim_start_matches('/').to_owned();
        if database.is_empty() {
            bail!("database URL {display} names no database: add /DATABASE to it");
        }
        let mut password = url
            .password()
            .map(|p| {
                url::form_urlencoded::parse(format!("p={p}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            })
            .filter(|p| !p.is_empty());
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut kept = Vec::new();
        for (k, v) in pairs {
            if k == "password" {
                password = Some(v);
            } else {
                kept.push((k, v));
            }
        }
        let _ = url.set_password(None);
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        Ok(DbUrl {
            full: raw.to_owned(),
            without_password: url.to_string(),
            password,
            display: url.to_string(),
            database: percent_decode(&database),
        })
    }

    fn apply_password(&self, cmd: &mut Command) {
        cmd.env_remove("PGPASSWORD");
        if let Some(password) = &self.password {
            cmd.env("PGPASSWORD", password);
        }
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

fn with_database(raw: &str, database: &str) -> Result<String> {
    let mut url = url::Url::parse(raw).context("parse the database URL")?;
    url.set_path(&format!("/{database}"));
    Ok(url.to_string())
}

async fn connect(db: &DbUrl, timeout: Duration) -> Result<PgConnection> {
    let options = PgConnectOptions::from_str(&db.full)
        .map_err(|_| {
            anyhow::anyhow!(
                "database URL {} is not valid: write it as postgres://USER@HOST:PORT/DATABASE",
                db.display
            )
        })?
        .application_name("rollcall-repository");
    match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "connect to database {}: {e}: check the URL, that the server is running and \
             reachable, and the credentials",
            db.display
        )),
        Err(_) => bail!(
            "connect to database {}: no answer within {timeout:?}: check the host, port and \
             network path",
            db.display
        ),
    }
}

/// Where a Postgres tool might be: the configured directory only, or PATH then Debian's
/// versioned directories (newest first).
fn tool_candidates(name: &str, bin_dir: Option<&FsPath>) -> Result<Vec<PathBuf>> {
    if let Some(dir) = bin_dir {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(vec![path]);
        }
        bail!(
            "{name} was not found in {} (the configured Postgres tools directory): install the \
             PostgreSQL client tools there or fix the setting",
            dir.display()
        );
    }
    let mut found = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                found.push(candidate);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versioned: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let path = e.path().join("bin").join(name);
                path.is_file().then_some((version, path))
            })
            .collect();
        versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
        found.extend(versioned.into_iter().map(|(_, p)| p));
    }
    if found.is_empty() {
        bail!(
            "{name} was not found on PATH or in /usr/lib/postgresql/*/bin: install the \
             PostgreSQL client tools (Debian/Ubuntu: `apt-get install postgresql-client`) or \
             configure the directory that holds {name}"
        );
    }
    Ok(found)
}

/// The first candidate whose major version is at least `min_major`.
async fn pick_tool(
    candidates: &[PathBuf],
    name: &str,
    min_major: u32,
) -> Result<(PathBuf, String)> {
    let mut seen = Vec::new();
    for path in candidates {
        let out = Command::new(path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {} --version", path.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let major = major_of(&version).unwrap_or(0);
        if out.status.success() && major >= min_major {
            return Ok((path.clone(), version));
        }
        seen.push(format!("{} ({version})", path.display()));
    }
    bail!(
        "no {name} of version {min_major} or newer was found (found: {}): install the \
         PostgreSQL {min_major} client tools or configure their directory",
        seen.join(", ")
    )
}

/// `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15.
fn major_of(version: &str) -> Option<u32> {
    version
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .and_then(|w| w.split('.').next())
        .and_then(|m| m.parse().ok())
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn quote_qualified(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

fn collect_stderr(stderr: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let Some(mut stderr) = stderr else {
            return String::new();
        };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match stderr.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    // Keep the tail: the last lines say what went wrong.
                    if buf.len() > 128 << 10 {
                        buf.drain(..buf.len() - (64 << 10));
                    }
                }
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(no error output)".to_owned()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_passwords_off_database_urls() {
        let db = DbUrl::parse("postgres://app:s%40cret@db.internal:5432/cowork?sslmode=require")
            .expect("parse");
        assert_eq!(db.password.as_deref(), Some("s@cret"));
        assert_eq!(
            db.without_password,
            "postgres://app@db.internal:5432/cowork?sslmode=require"
        );
        assert!(!db.display.contains("cret"));
        assert_eq!(db.database, "cowork");

        let db =
            DbUrl::parse("postgresql://app@h/db?password=pw&application_name=x").expect("parse");
        assert_eq!(db.password.as_deref(), Some("pw"));
        assert!(
            !db.without_password.contains("pw"),
            "{}",
            db.without_password
        );

        assert!(DbUrl::parse("mysql://h/db").is_err());
        assert!(DbUrl::parse("postgres://h").is_err());
        let err = DbUrl::parse("postgres://u:hunter2@[bad")
            .err()
            .expect("bad URL is refused");
        assert!(!format!("{err:#}").contains("hunter2"));
    }

    #[test]
    fn reads_tool_versions_and_quotes_identifiers() {
        assert_eq!(
            major_of("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_of("pg_restore (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(
            quote_qualified("public.we\"ird"),
            "\"public\".\"we\"\"ird\""
        );
    }

    /// `pg_restore --verbose --file=-` of a schema with a foreign key, a partitioned table, a
    /// trigger and a commented index (PostgreSQL 15), comment headers only.
    const PRE_DATA: &str = "\
-- TOC entry 219 (class 1255 OID 16424)
-- Name: trg(); Type: FUNCTION; Schema: public; Owner: postgres
-- TOC entry 214 (class 1259 OID 16385)
-- Name: a; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 215 (class 1259 OID 16395)
-- Name: b c; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 216 (class 1259 OID 16408)
-- Name: p; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 217 (class 1259 OID 16413)
-- Dependencies: 216
-- Name: p1; Type: TABLE; Schema: public; Owner: postgres
-- TOC entry 3213 (class 0 OID 0)
-- Dependencies: 217 216
-- Name: p1; Type: TABLE ATTACH; Schema: public; Owner: postgres
";
    const POST_DATA: &str = "\
--
-- TOC entry 3216 (class 2606 OID 16392)
-- Dependencies: 214
-- Name: a a_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
-- Data Pos: 0
--

ALTER TABLE ONLY public.a
    ADD CONSTRAINT a_pkey PRIMARY KEY (id);
-- TOC entry 3220 (class 2606 OID 16401)
-- Dependencies: 215
-- Name: b c b c_pkey; Type: CONSTRAINT; Schema: public; Owner: -
-- TOC entry 3224 (class 2606 OID 16412)
-- Dependencies: 216 216
-- Name: p p_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
-- TOC entry 3227 (class 2606 OID 16417)
-- Dependencies: 3224 217 217 217
-- Name: p1 p1_pkey; Type: CONSTRAINT; Schema: public; Owner: postgres
-- TOC entry 3221 (class 1259 OID 16407)
-- Dependencies: 215 215
-- Name: b_k; Type: INDEX; Schema: public; Owner: postgres
-- TOC entry 3385 (class 0 OID 0)
-- Dependencies: 3221
-- Name: INDEX b_k; Type: COMMENT; Schema: public; Owner: postgres
-- TOC entry 3229 (class 0 OID 0)
-- Dependencies: 3224 3227 217 3224 217 216
-- Name: p1_pkey; Type: INDEX ATTACH; Schema: public; Owner: postgres
-- TOC entry 3231 (class 2620 OID 16425)
-- Dependencies: 214 219
-- Name: a t1; Type: TRIGGER; Schema: public; Owner: postgres
-- TOC entry 3230 (class 2606 OID 16402)
-- Dependencies: 214 3216 215
-- Name: b c b c_a_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: postgres
";

    #[test]
    fn reads_a_table_of_contents_from_pg_restore_comments() {
        let pre = parse_toc(PRE_DATA);
        assert_eq!(pre.len(), 6);
        let b = &pre[2];
        assert_eq!(
            (b.id, b.kind.as_str(), b.schema.as_str(), b.name.as_str()),
            (215, "TABLE", "public", "b c")
        );
        let post = parse_toc(POST_DATA);
        let fk = post.last().expect("entries");
        assert_eq!(
            (fk.id, fk.kind.as_str(), fk.name.as_str(), &fk.deps[..]),
            (
                3230,
                "FK CONSTRAINT",
                "b c b c_a_id_fkey",
                &[214, 3216, 215][..]
            )
        );
        assert_eq!(post[1].name, "b c b c_pkey", "an owner of - parses too");
        assert!(parse_toc("SET statement_timeout = 0;\n").is_empty());
        let unreadable = parse_toc("-- TOC entry 7 (class 0 OID 0)\n-- Name: odd\n");
        assert_eq!((unreadable[0].id, unreadable[0].kind.as_str()), (7, ""));
        assert_eq!(
            listed_ids(concat!(
                ";\n",
                "; Archive created at 2026-11-26\n",
                "3216; 2606 16392 CONSTRAINT public a a_pkey -\n",
                "3385; 0 0 COMMENT public INDEX b_k -\n",
            )),
            BTreeSet::from([3216, 3385])
        );
    }

    /// The schema behind `PRE_DATA` and `POST_DATA`.
    const TOC_SCHEMA: &str = "
        CREATE TABLE a (id int PRIMARY KEY, v text UNIQUE, n int CHECK (n > 0));
        CREATE TABLE \"b c\" (id int PRIMARY KEY, a_id int REFERENCES a (id), k text);
        CREATE INDEX b_k ON \"b c\" (lower(k));
        COMMENT ON INDEX b_k IS 'by key';
        CREATE TABLE p (id int, d date, PRIMARY KEY (id, d)) PARTITION BY RANGE (d);
        CREATE TABLE p1 PARTITION OF p FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
        CREATE INDEX p_d ON p (d);
        CREATE MATERIALIZED VIEW mv AS SELECT count(*) FROM a;
        CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
        CREATE TRIGGER t1 BEFORE INSERT ON a FOR EACH ROW EXECUTE FUNCTION trg();";

    /// The plan from a real schema archive: the comments pg_restore prints are the ones the
    /// parser reads, and every post-data entry is planned once.
    #[tokio::test]
    async fn plans_post_data_from_a_real_schema_archive() {
        let cluster = ephemeral_pg::Cluster::start().expect("start a throwaway Postgres");
        cluster.create_database("app").expect("create app");
        cluster.psql("app", TOC_SCHEMA).expect("schema");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("schema.dump");
        let status = std::process::Command::new(cluster.bin_dir().join("pg_dump"))
            .arg(cluster.url("app"))
            .args([
                // As backup_postgres writes its schema archive.
                "--format=custom",
                "--no-owner",
                "--no-acl",
                "--compress=0",
                "--section=pre-data",
                "--section=post-data",
            ])
            .arg(format!("--file={}", file.display()))
            .status()
            .expect("pg_dump");
        assert!(status.success());
        let file_of = |content: DumpContent| DumpFile {
            key: String::new(),
            content,
            size: 0,
            sha256: String::new(),
            dump_size: 0,
        };
        let data = [
            file_of(DumpContent::Data),
            file_of(DumpContent::Tables {
                tables: vec!["public.b c".into()],
            }),
        ];
        let (plan, encoding) = post_data_plan(
            &cluster.bin_dir().join("pg_restore"),
            &file,
            &[&data[0], &data[1]],
        )
        .await
        .expect("plan");
        assert_eq!(encoding.as_deref(), Some("UTF8"));
        // a's key, a's unique key, p's key and p's index | b c's key and index | the rest:
        // the partition's key and index, two index attaches, the comment, the trigger, the
        // foreign key and the materialized view's data.
        let sizes: Vec<usize> = plan.early.iter().map(Vec::len).collect();
        assert_eq!((sizes, plan.rest.len()), (vec![4, 2], 8), "{plan:?}");
    }

    #[test]
    fn builds_a_table_s_indexes_after_its_own_archive_and_the_rest_after_all() {
        let (pre, post) = (parse_toc(PRE_DATA), parse_toc(POST_DATA));
        let tables = DumpContent::Tables {
            tables: vec!["public.b c".into()],
        };
        let plan = plan_post_data(&pre, &post, &[&DumpContent::Data, &tables]);
        assert_eq!(
            plan,
            PostDataPlan {
                // a's and p's (the parent's own, ON ONLY) primary keys with the main data
                // archive; b c's key and index with its own archive.
                early: vec![vec![3216, 3224], vec![3220, 3221]],
                // What needs another post-data entry or more than one table's rows: the
                // partition's key (attached to p's), the index comment, the attach, the
                // trigger, the foreign key.
                rest: vec![3227, 3385, 3229, 3231, 3230],
            }
        );
        // Without a table of contents nothing is built early.
        let plan = plan_post_data(&[], &post, &[&DumpContent::Data]);
        assert!(plan.early[0].is_empty());
        assert_eq!(plan.rest.len(), post.len());
    }

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

    #[test]
    fn missing_tool_directory_is_named() {
        let err = tool_candidates("pg_dump", Some(FsPath::new("/nonexistent/pg/bin")))
            .expect_err("missing");
        let text = err.to_string();
        assert!(
            text.contains("pg_dump was not found in /nonexistent/pg/bin"),
            "{text}"
        );
    }
}
