//! Postgres backups into the repository and restores out of it.
//!
//! Backup: open a REPEATABLE READ transaction, export its snapshot (`pg_export_snapshot()`),
//! count the configured tables in it, and run `pg_dump --snapshot` on that same snapshot, so
//! the counts describe exactly what the dump holds. pg_dump writes an uncompressed custom
//! archive (`-Z0`) that we compress with multithreaded zstd and stream into a multipart upload
//! while hashing it: no local copy. The upload is committed only when pg_dump succeeded.
//!
//! Restore: stream the dump out of the repository, checking its sha256, decompress it, and
//! feed `pg_restore` (through stdin in one transaction, or from a scratch file with parallel
//! jobs). Passwords travel to the tools in `PGPASSWORD`, never on a command line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
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
use tokio::sync::mpsc;

use crate::layout::{PointId, dump_key};
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
    fn default() -> Self {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2);
        Compression::Zstd { level: 3, workers }
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

    /// The runbook's drill-report counts for cowork-sim: sessions, events, projections,
    /// artifacts, workflows, channel bindings, and deliveries by status.
    pub fn cowork_defaults() -> Vec<CountSpec> {
        vec![
            CountSpec::table("sessions"),
            CountSpec::table("session_events"),
            CountSpec::table("session_projections"),
            CountSpec::table("artifact_index"),
            CountSpec::table("workflows"),
            CountSpec::table("channel_bindings"),
            CountSpec::grouped("channel_deliveries", "status"),
        ]
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
    pub connect_timeout: Duration,
    /// pg_dump gives up instead of queueing behind a lock held this long (e.g. by a
    /// migration); default 2 min.
    pub lock_wait_timeout: Duration,
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
            connect_timeout: Duration::from_secs(15),
            lock_wait_timeout: Duration::from_secs(120),
        }
    }
}

/// A completed dump in the repository, as the point records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgBackupPart {
    /// Repository key of the dump.
    pub key: String,
    pub compression: Compression,
    /// Bytes stored.
    pub size: u64,
    /// sha256 of the bytes stored.
    pub sha256: String,
    /// Bytes pg_dump wrote (before our compression).
    pub dump_size: u64,
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

    let key = dump_key(&options.point, options.compression.is_compressed());
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
    // pg_dump imports the snapshot when it starts; meanwhile we count in the same snapshot.
    let (dumped, counted) = tokio::join!(
        run_and_upload(repo, &key, cmd, &db, options),
        count_tables(&mut conn, &options.counts),
    );
    let (stored, dump_size) =
        dumped.with_context(|| format!("dump database {} into {key}", db.display))?;
    let table_counts = match counted {
        Ok(counts) => counts,
        Err(e) => {
            let _ = repo.store.delete(&key).await;
            return Err(e.context(format!("count tables of {}", db.display)));
        }
    };

    // Read-only: nothing to commit. Closing ends the snapshot.
    let _ = conn.execute("ROLLBACK").await;
    let _ = conn.close().await;
    Ok(PgBackupPart {
        key: key.to_string(),
        compression: options.compression,
        size: stored.size,
        sha256: stored.sha256,
        dump_size,
        database,
        server_version,
        pg_dump_version,
        snapshot,
        started_at,
        finished_at: Utc::now(),
        table_counts,
    })
}

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
    while let Some(chunk) = rx.recv().await {
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
    let outcome = if let Some(e) = upload_error {
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
    repo.make_durable().await?;
    Ok((
        Stored {
            size,
            sha256: hex::encode(hasher.finalize()),
        },
        dump_size,
    ))
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
fn widen_pipe(file: &std::fs::File) {
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

async fn count_tables(
    conn: &mut PgConnection,
    specs: &[CountSpec],
) -> Result<BTreeMap<String, i64>> {
    let mut counts = BTreeMap::new();
    for spec in specs {
        let table = quote_qualified(&spec.table);
        let total: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut *conn)
            .await
            .with_context(|| format!("count rows of {}", spec.table))?;
        counts.insert(spec.name.clone(), total);
        if let Some(column) = &spec.group_by {
            let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT coalesce({col}::text, 'NULL'), count(*) FROM {table} GROUP BY 1",
                col = quote_ident(column)
            )))
            .fetch_all(&mut *conn)
            .await
            .with_context(|| format!("count rows of {} by {column}", spec.table))?;
            for (value, n) in rows {
                counts.insert(format!("{}[{column}={value}]", spec.name), n);
            }
        }
    }
    Ok(counts)
}

/// What [`restore_postgres`] does.
#[derive(Debug, Clone)]
pub struct PgRestoreOptions {
    /// The target database. Restoring into a new, empty database and swapping it in is the
    /// safe way (the runbook's `createdb` + `pg_restore --clean --if-exists`).
    pub database_url: String,
    /// Directory of `pg_restore`; found on PATH or in `/usr/lib/postgresql/*/bin` when unset.
    pub bin_dir: Option<PathBuf>,
    /// Parallel pg_restore jobs; more than 1 needs `scratch_dir`.
    pub jobs: u32,
    /// When set, the dump is fetched, checked and decompressed into a file here first and
    /// restored from it (`pg_restore -j`). When unset, it is streamed into `pg_restore` in a
    /// single transaction; a checksum failure at the end of the stream then aborts that
    /// transaction if pg_restore has not committed yet, so preflight with `verify_point`.
    pub scratch_dir: Option<PathBuf>,
    /// Create the target database first if it does not exist.
    pub create_database: bool,
    pub connect_timeout: Duration,
}

impl PgRestoreOptions {
    pub fn new(database_url: impl Into<String>) -> PgRestoreOptions {
        PgRestoreOptions {
            database_url: database_url.into(),
            bin_dir: None,
            jobs: 1,
            scratch_dir: None,
            create_database: false,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PgRestoreReport {
    pub point: PointId,
    /// Target database name.
    pub database: String,
    /// Streamed into pg_restore (true) or restored from a scratch file (false).
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
    if options.jobs > 1 && options.scratch_dir.is_none() {
        bail!("parallel pg_restore (jobs > 1) needs a scratch directory to hold the archive");
    }
    let db = DbUrl::parse(&options.database_url)?;
    let candidates = tool_candidates("pg_restore", options.bin_dir.as_deref())?;
    let dump_major = major_of(&part.pg_dump_version).unwrap_or(0);
    let (pg_restore, pg_restore_version) = pick_tool(&candidates, "pg_restore", dump_major).await?;
    if options.create_database {
        create_database(&db, options.connect_timeout).await?;
    }
    // Fail on a wrong URL before moving gigabytes.
    connect(&db, options.connect_timeout)
        .await?
        .close()
        .await
        .ok();

    let mut cmd = Command::new(&pg_restore);
    cmd.args([
        "--clean",
        "--if-exists",
        "--no-owner",
        "--no-acl",
        "--exit-on-error",
    ])
    .arg(format!("--dbname={}", db.without_password));
    db.apply_password(&mut cmd);
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);

    let (archive_bytes, streamed) = if let Some(dir) = &options.scratch_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create scratch directory {}", dir.display()))?;
        let file = dir.join(format!("{point}.dump"));
        let bytes = fetch_dump(repo, point, &file).await?;
        cmd.arg(format!("--jobs={}", options.jobs.max(1)))
            .arg(&file)
            .stdin(Stdio::null());
        let result = run_pg_restore(cmd).await;
        let _ = std::fs::remove_file(&file);
        result?;
        (bytes, false)
    } else {
        cmd.arg("--single-transaction").stdin(Stdio::piped());
        let mut child = cmd.spawn().context("start pg_restore")?;
        let stdin = std::fs::File::from(
            child
                .stdin
                .take()
                .context("open pg_restore's input")?
                .into_owned_fd()
                .context("open pg_restore's input")?,
        );
        widen_pipe(&stdin);
        let stderr = collect_stderr(child.stderr.take());
        let (sent, input) = download_dump(repo, &part, Box::new(stdin)).await;
        // If the stream failed while pg_restore still runs, stop it before closing its input,
        // so it cannot commit: its single transaction rolls back.
        let mut stopped_by_us = false;
        if sent.is_err() && matches!(child.try_wait(), Ok(None)) {
            stopped_by_us = true;
            let _ = child.start_kill();
        }
        drop(input);
        let status = child.wait().await.context("wait for pg_restore")?;
        let stderr = stderr.await.unwrap_or_default();
        match sent {
            Ok(_) if !status.success() => bail!(
                "pg_restore into {} failed ({status}): {}",
                db.display,
                last_lines(&stderr, 20)
            ),
            Ok(n) => (n, true),
            Err(e) if stopped_by_us => {
                return Err(e.context(format!(
                    "restore into {}: pg_restore was stopped and its transaction rolled back",
                    db.display
                )));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "restore into {}: pg_restore failed ({status}): {}",
                    db.display,
                    last_lines(&stderr, 20)
                )));
            }
        }
    };
    Ok(PgRestoreReport {
        point: point.clone(),
        database: db.database.clone(),
        streamed,
        archive_bytes,
        pg_restore_version,
        elapsed: started.elapsed(),
    })
}

/// Fetches a point's dump, checks its sha256 and decompresses it into `dest` (a custom-format
/// archive `pg_restore` reads directly). `dest` appears only when complete and correct.
pub async fn fetch_dump(repo: &Repository, point: &PointId, dest: &FsPath) -> Result<u64> {
    let found = repo.read_point(point).await?;
    let Some(part) = found.postgres else {
        bail!("point {point} has no Postgres backup");
    };
    let partial = dest.with_extension("partial");
    let file =
        std::fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let sink = SyncingFile(file);
    let (result, sink) = download_dump(repo, &part, Box::new(sink)).await;
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

/// Streams a dump out of the repository into `sink`, decompressing it, and fails if its
/// size or sha256 differ from the part's. Returns the bytes written to `sink`, and the sink.
pub(crate) async fn download_dump(
    repo: &Repository,
    part: &PgBackupPart,
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
    let compressed = part.compression.is_compressed();
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
