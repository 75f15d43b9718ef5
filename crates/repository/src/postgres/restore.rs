//! Restoring a point's dump into a database: a parallel dump's pre-data, then its data
//! archives several at once (each followed by its own tables' indexes and constraints), then the
//! rest of post-data; a single-archive dump streamed or from a scratch file.

use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Serialize;
use sqlx::postgres::PgConnection;
// Identifiers in dynamic SQL are quoted with `quote_ident`; values are bound.
use sqlx::{AssertSqlSafe, Connection, Executor};
use tokio::process::Command;
use tokio::sync::Semaphore;

use super::catalog::{check_empty, quote_ident};
use super::conn::{
    DbUrl, collect_stderr, connect, last_lines, major_of, pick_tool, tool_candidates, with_database,
};
use super::fetch::{download_dump, fetch_archive, fetch_dump};
use super::parallel_copy;
use super::toc::post_data_plan;
use super::{Archive, DumpContent, DumpFile, PgBackupPart, PgProgress, PgProgressFn, report};
use crate::layout::PointId;
use crate::pipe::widen_pipe;
use crate::repo::Repository;

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
/// ([`parallel_copy`]): pg_restore writes the archive's SQL script, whose COPY rows are dealt
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
    let joining = parallel_copy::Joining {
        slots: split.spare,
        connect: &connect_more,
        max: split.max as usize,
        expected: split.expected,
    };
    let load = async {
        let loaded =
            parallel_copy::load_script(script, vec![conn], parallel_copy::CHUNK, Some(joining))
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
            parallel_copy::ONE_COPY
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
