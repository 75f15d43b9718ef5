//! The database agent's side of the data plane: backups, the live state preflight reads, and
//! restores swapped in for the live database (`repository::DatabaseSwap`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use api::model::output::{
    Counts, FreezeOutput, KeptRefusal, ListKeptOutput, PreparePostgresOutput, PruneKeptOutput,
    RestorePostgresOutput, TeardownPostgresOutput, UndoPostgresOutput,
};
use api::model::{Check, CheckKind, RepositoryRef};
use repository::{
    CountSelection, CountSpec, DatabaseSwap, PgBackupOptions, PgBackupPart, PgRestoreOptions,
    PointId, SwapState, TableColumns,
};
use sqlx::Connection as _;

use super::{DataPlane, run_tag};
use crate::progress::Reporter;

/// How long connecting to the server's maintenance database for a swap may take.
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl DataPlane {
    /// Reopens what a restore killed mid-swap left closed on the live database's server (see
    /// `repository::reopen_interrupted_swaps`); nothing for an agent without `[postgres]`.
    pub async fn reopen_interrupted_swaps(&self) -> Result<Vec<repository::Reopened>> {
        match &self.postgres {
            Some(pg) => {
                repository::reopen_interrupted_swaps(&pg.url()?, ADMIN_CONNECT_TIMEOUT).await
            }
            None => Ok(Vec::new()),
        }
    }

    pub async fn backup_postgres(
        &self,
        repo: &RepositoryRef,
        point: &str,
        progress: &Reporter,
    ) -> Result<PgBackupPart> {
        let pg = self.postgres()?;
        let repo = repo.open().await?;
        let mut options = PgBackupOptions::new(PointId::parse(point)?, pg.url()?);
        options.bin_dir = pg.config.bin_dir.clone();
        options.counts = pg.counts.clone();
        options.progress = Some(progress.postgres());
        repository::backup_postgres(&repo, &options).await
    }

    /// Restores the point's dump into `<db>_restore_<run>` and swaps it in at once: what
    /// `prepare-postgres` and then `commit-postgres` do, for plans that restore in one phase.
    pub async fn restore_postgres(
        &self,
        repo: &RepositoryRef,
        point: &str,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<RestorePostgresOutput> {
        let started = Instant::now();
        let mut swap = self.swap(run_id).await?;
        // A swap this run already finished (or half did) needs no preparation.
        let prepared = match swap.state().await? {
            SwapState::Swapped | SwapState::Interrupted => None,
            _ => Some(self.prepare(&mut swap, repo, point, progress).await?),
        };
        let mut done = self.commit(&mut swap, point, progress).await?;
        swap.close().await;
        if let Some(prepared) = prepared {
            done.archive_bytes = prepared.archive_bytes;
        }
        done.elapsed_ms = millis(started);
        Ok(done)
    }

    /// Restores the point's dump into `<db>_restore_<run>` and checks its counts against the
    /// point, while the live database goes on serving: nothing live changes, so a damaged dump,
    /// a full disk or a wrong credential fails here with the fleet untouched. A copy a finished
    /// preparation of this point left is kept; an unfinished one is dropped and redone.
    pub async fn prepare_postgres(
        &self,
        repo: &RepositoryRef,
        point: &str,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<PreparePostgresOutput> {
        let mut swap = self.swap(run_id).await?;
        let prepared = self.prepare(&mut swap, repo, point, progress).await;
        swap.close().await;
        prepared
    }

    /// Swaps the prepared `<db>_restore_<run>` in: the live database becomes `<db>_pre_<run>`
    /// (kept, never dropped) and the prepared one takes the live name. Re-running after a crash
    /// finishes the swap without losing either database.
    pub async fn commit_postgres(
        &self,
        point: &str,
        run_id: &str,
        progress: &Reporter,
    ) -> Result<RestorePostgresOutput> {
        let mut swap = self.swap(run_id).await?;
        let done = self.commit(&mut swap, point, progress).await;
        swap.close().await;
        done
    }

    /// Undoes run `undone_run`'s swap: `<db>_pre_<tag>` takes the live name again and the
    /// restored database is kept as `<db>_undone_<tag>`; nothing is dropped. Re-running after a
    /// crash finishes it; a run that never swapped leaves everything as it is and says so.
    pub async fn undo_postgres(&self, undone_run: &str) -> Result<UndoPostgresOutput> {
        let started = Instant::now();
        let pg = self.postgres()?;
        let url = pg.url()?;
        let swap =
            DatabaseSwap::connect_undo(&url, &run_tag(undone_run), ADMIN_CONNECT_TIMEOUT).await?;
        let mut swap = self.carry_freeze(swap);
        let undone = repository::undo_swap(&mut swap).await;
        let names = swap.names().clone();
        swap.close().await;
        let undone = undone?;
        // The database put back may lack tables (what the restore was for): count those it has.
        let (counts, _) = live_state(&url, &pg.counts, None)
            .await
            .context("count the live database's rows after the undo")?;
        let swapped = undone != repository::Undone::NothingSwapped;
        Ok(UndoPostgresOutput {
            database: names.live,
            kept_as: if swapped { names.pre } else { String::new() },
            undone: swapped,
            detail: undone.describe().to_owned(),
            counts,
            elapsed_ms: millis(started),
        })
    }

    /// A restore test's teardown of run `run_id`'s swap: the database the swap kept
    /// (`<db>_pre_<tag>`) takes the live name again, and the restored database, kept as
    /// `<db>_undone_<tag>` by that undo, is dropped. Only what the run created goes; a run that
    /// never swapped leaves everything and says so. Refused unless the agent allows teardowns.
    pub async fn teardown_postgres(&self, run_id: &str) -> Result<TeardownPostgresOutput> {
        self.check_teardown_allowed("teardown-postgres")?;
        let started = Instant::now();
        let pg = self.postgres()?;
        let url = pg.url()?;
        let swap =
            DatabaseSwap::connect_undo(&url, &run_tag(run_id), ADMIN_CONNECT_TIMEOUT).await?;
        let mut swap = self.carry_freeze(swap);
        let undone = repository::undo_swap(&mut swap).await;
        let names = swap.names().clone();
        swap.close().await;
        let undone = undone.context("put the database from before the restore test back")?;
        let mut dropped = Vec::new();
        // `names.pre` of an undo's names is where the restored database went.
        if repository::drop_kept_database(&url, &names.pre, ADMIN_CONNECT_TIMEOUT)
            .await
            .with_context(|| format!("drop the restored database {}", names.pre))?
        {
            tracing::info!(database = %names.pre, "restore test torn down: restored database dropped");
            dropped.push(names.pre.clone());
        }
        // A run that failed before its commit left what it prepared (or began to) beside the
        // target: it holds only the point's data.
        let prepared = format!("{}_restore_{}", names.live, run_tag(run_id));
        if repository::drop_kept_database(&url, &prepared, ADMIN_CONNECT_TIMEOUT)
            .await
            .with_context(|| format!("drop the prepared copy {prepared}"))?
        {
            tracing::info!(database = %prepared, "restore test torn down: prepared copy dropped");
            dropped.push(prepared);
        }
        let put_back = undone != repository::Undone::NothingSwapped;
        Ok(TeardownPostgresOutput {
            database: names.live,
            dropped,
            put_back,
            detail: undone.describe().to_owned(),
            elapsed_ms: millis(started),
        })
    }

    /// The databases restores and undos kept beside the live one, with sizes and sessions.
    pub async fn list_kept(&self) -> Result<ListKeptOutput> {
        let pg = self.postgres()?;
        let (database, mut kept) =
            repository::list_kept_databases(&pg.url()?, ADMIN_CONNECT_TIMEOUT).await?;
        // Restores to a time keep data directories beside the live one.
        if let Some(physical) = &pg.config.physical {
            kept.extend(
                repository::list_kept_data_dirs(&physical.data_dir)
                    .await
                    .with_context(|| {
                        format!(
                            "list the kept data directories beside [postgres.physical] \
                             data_dir {}",
                            physical.data_dir.display()
                        )
                    })?,
            );
        }
        Ok(ListKeptOutput { database, kept })
    }

    /// Drops the kept databases (and data directories, named by path) the coordinator's prune
    /// chose, one at a time; each one the server-side rules refuse
    /// (`repository::drop_kept_database`, `repository::drop_kept_data_dir`) is reported with
    /// its reason and the rest go on.
    pub async fn prune_kept(&self, databases: &[String]) -> PruneKeptOutput {
        let mut out = PruneKeptOutput {
            dropped: Vec::new(),
            gone: Vec::new(),
            refused: Vec::new(),
        };
        let url = match self.postgres().and_then(|pg| pg.url()) {
            Ok(url) => url,
            Err(e) => {
                out.refused = databases
                    .iter()
                    .map(|d| KeptRefusal {
                        database: d.clone(),
                        reason: api::errors::one_line(&*e),
                    })
                    .collect();
                return out;
            }
        };
        let data_dir = self
            .postgres()
            .ok()
            .and_then(|pg| pg.config.physical.as_ref())
            .map(|p| p.data_dir.clone());
        for name in databases {
            // A kept data directory is named by its whole path beside data_dir.
            let path = std::path::Path::new(name);
            let dropped = match &data_dir {
                Some(live) if repository::kept_dir_name(live, path).is_some() => {
                    repository::drop_kept_data_dir(live, path).await
                }
                _ => repository::drop_kept_database(&url, name, ADMIN_CONNECT_TIMEOUT).await,
            };
            match dropped {
                Ok(true) => {
                    tracing::info!(database = %name, "dropped a kept database");
                    out.dropped.push(name.clone());
                }
                Ok(false) => out.gone.push(name.clone()),
                Err(e) => {
                    tracing::warn!(database = %name, "kept database not dropped: {e:#}");
                    out.refused.push(KeptRefusal {
                        database: name.clone(),
                        reason: api::errors::one_line(&*e),
                    });
                }
            }
        }
        out
    }

    pub(super) async fn swap(&self, run_id: &str) -> Result<DatabaseSwap> {
        let pg = self.postgres()?;
        let swap =
            DatabaseSwap::connect(&pg.url()?, &run_tag(run_id), ADMIN_CONNECT_TIMEOUT).await?;
        Ok(self.carry_freeze(swap))
    }

    /// A swap gives the database that takes the live name the freeze as it stands now.
    fn carry_freeze(&self, swap: DatabaseSwap) -> DatabaseSwap {
        match (
            self.postgres
                .as_ref()
                .and_then(|p| p.config.freeze.as_ref()),
            &self.frozen,
        ) {
            (Some(freeze), Some(memory)) => swap.carry_freeze(&freeze.roles, memory.frozen()),
            _ => swap,
        }
    }

    /// Freezes writes at the database: the `[postgres.freeze]` roles read-only in the live
    /// database, their older sessions ended. Remembered before anything changes, so a swap
    /// after a crash mid-freeze still carries it; a repeat leaves sessions that reconnected
    /// read-only since alone.
    pub async fn freeze_database(&self) -> Result<FreezeOutput> {
        let (pg, roles, memory) = self.database_freeze()?;
        let earlier = memory.since_us();
        memory.set(true, earlier)?;
        let mut freeze =
            repository::DatabaseFreeze::connect(&pg.url()?, roles, ADMIN_CONNECT_TIMEOUT).await?;
        let changed = freeze.freeze(earlier).await;
        freeze.close().await;
        let changed = changed?;
        memory.set(true, Some(changed.since_us))?;
        Ok(FreezeOutput {
            by: "database".into(),
            frozen: true,
            detail: format!(
                "role{} {} read-only in {}; {} session{} ended to reconnect read-only",
                if roles.len() == 1 { "" } else { "s" },
                roles.join(", "),
                changed.database,
                changed.ended.len(),
                if changed.ended.len() == 1 { "" } else { "s" },
            ),
        })
    }

    /// Thaws writes at the database: the roles' setting reset in the live database and their
    /// sessions that began frozen ended, so they reconnect writable. Forgotten only once done.
    pub async fn thaw_database(&self) -> Result<FreezeOutput> {
        let (pg, roles, memory) = self.database_freeze()?;
        let mut freeze =
            repository::DatabaseFreeze::connect(&pg.url()?, roles, ADMIN_CONNECT_TIMEOUT).await?;
        let changed = freeze.thaw().await;
        freeze.close().await;
        let changed = changed?;
        memory.set(false, None)?;
        Ok(FreezeOutput {
            by: "database".into(),
            frozen: false,
            detail: format!(
                "role{} {} writable again in {}; {} session{} ended to reconnect writable",
                if roles.len() == 1 { "" } else { "s" },
                roles.join(", "),
                changed.database,
                changed.ended.len(),
                if changed.ended.len() == 1 { "" } else { "s" },
            ),
        })
    }

    /// Whether the freeze could hold (the roles exist, this role may alter them and end their
    /// sessions), changing nothing: what preflight asks.
    pub(super) async fn check_database_freeze(&self) -> Result<()> {
        let (pg, roles, _) = self.database_freeze()?;
        let mut freeze =
            repository::DatabaseFreeze::connect(&pg.url()?, roles, ADMIN_CONNECT_TIMEOUT).await?;
        let checked = freeze.check().await;
        freeze.close().await;
        checked
    }

    fn database_freeze(&self) -> Result<(&super::Postgres, &[String], &FrozenMemory)> {
        let pg = self.postgres()?;
        let Some(freeze) = &pg.config.freeze else {
            bail!("this agent has no [postgres.freeze]; list the application's roles there");
        };
        let Some(memory) = &self.frozen else {
            bail!("this agent's data plane was built without its state directory");
        };
        Ok((pg, &freeze.roles, memory))
    }

    async fn prepare(
        &self,
        swap: &mut DatabaseSwap,
        repo: &RepositoryRef,
        point: &str,
        progress: &Reporter,
    ) -> Result<PreparePostgresOutput> {
        let started = Instant::now();
        let pg = self.postgres()?;
        let repo = repo.open().await?;
        let mut options = PgRestoreOptions::new(String::new());
        options.bin_dir = pg.config.bin_dir.clone();
        options.jobs = pg.config.jobs;
        options.copy_streams = pg.config.copy_streams;
        options.scratch_dir = pg.config.scratch_dir.clone();
        options.progress = Some(progress.postgres());
        // Every user table counted: the copy is checked on what the point counted.
        let counts = match &pg.counts {
            CountSelection::AllTables => &[][..],
            CountSelection::Listed(specs) => specs.as_slice(),
        };
        let prepared =
            repository::prepare_swap(&repo, &PointId::parse(point)?, swap, &options, counts)
                .await?;
        let names = swap.names();
        Ok(PreparePostgresOutput {
            database: names.live.clone(),
            restore_database: names.restore.clone(),
            point: point.to_owned(),
            archive_bytes: prepared.archive_bytes,
            counts: prepared.counts,
            elapsed_ms: millis(started),
            physical: None,
        })
    }

    async fn commit(
        &self,
        swap: &mut DatabaseSwap,
        point: &str,
        progress: &Reporter,
    ) -> Result<RestorePostgresOutput> {
        let started = Instant::now();
        progress.report(api::model::Progress {
            stage: "swapping".into(),
            unit: "archives".into(),
            ..api::model::Progress::default()
        });
        let committed = repository::commit_swap(swap, &PointId::parse(point)?).await?;
        let names = swap.names();
        Ok(RestorePostgresOutput {
            database: names.live.clone(),
            pre_restore_database: names.pre.clone(),
            point: point.to_owned(),
            archive_bytes: 0,
            resumed: committed.resumed().to_owned(),
            elapsed_ms: millis(started),
            physical: None,
        })
    }
}

/// Whether writes are frozen at the database, in the state directory (`database-freeze.json`,
/// written atomically and fsync'd), with when the freeze began on the server's clock.
pub(super) struct FrozenMemory {
    path: std::path::PathBuf,
    inner: std::sync::Mutex<FrozenFile>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct FrozenFile {
    frozen: bool,
    /// Microseconds since the Unix epoch on the database server's clock.
    since_us: Option<i64>,
}

impl FrozenMemory {
    pub(super) fn open(state_dir: &std::path::Path) -> Result<FrozenMemory> {
        let path = state_dir.join("database-freeze.json");
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is corrupt; it remembers whether writes are frozen at the database — \
                     fix it, or remove it and run the unfreeze again",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FrozenFile::default(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(FrozenMemory {
            path,
            inner: std::sync::Mutex::new(file),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FrozenFile> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn frozen(&self) -> bool {
        self.lock().frozen
    }

    fn since_us(&self) -> Option<i64> {
        let file = self.lock();
        file.since_us.filter(|_| file.frozen)
    }

    fn set(&self, frozen: bool, since_us: Option<i64>) -> Result<()> {
        let mut file = self.lock();
        let next = FrozenFile { frozen, since_us };
        let bytes = serde_json::to_vec_pretty(&next).context("encode the freeze state")?;
        crate::state::write_atomic(&self.path, &bytes, true)
            .with_context(|| format!("write {}", self.path.display()))?;
        *file = next;
        Ok(())
    }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What preflight reads from the live database before anything is frozen: the counts of the
/// tables it still has (the report's "before"), and the checks on what a disaster left: tables
/// gone (no count; the restore brings them back) and the schema against the point's.
/// Refuses a restore that would lock the application out: a restore makes the agent's role own
/// every table it creates (`--no-owner --no-acl`), so every user table must already be that
/// role's. Checked by preflight, before anything changes.
/// A restore test whose database URL was copied from the source's would restore into the
/// source's live database, unfrozen: when this agent's database has the name the point was
/// dumped from, it is refused unless the two servers' system identifiers prove them different
/// (`ServerIdentity::same_server`; addresses prove nothing), or the operator vouched for it
/// (`another_server`: the identifier cannot be read by the role, or the server is a clone).
pub(super) async fn refuse_the_source_database(
    url: &str,
    point: &repository::Point,
    another_server: bool,
) -> Result<()> {
    let Some(part) = &point.postgres else {
        return Ok(());
    };
    let shown = repository::redact_url(url);
    let mut conn = match sqlx::PgConnection::connect(url).await {
        Ok(conn) => conn,
        // A database that does not exist is not the source's.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("connect to {shown}")),
    };
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("read the database name of {shown}"))?;
    let ours = repository::ServerIdentity::read(&mut conn).await;
    let _ = conn.close().await;
    if database != part.database {
        return Ok(());
    }
    let same = part
        .server
        .as_ref()
        .and_then(|recorded| ours.same_server(recorded));
    match same {
        Some(true) => bail!(
            "point {} of environment {} was dumped from database {database} on the server this \
             agent's database {shown} is on (the same system identifier): that is the source's \
             live database, and a restore test must restore into another database or server \
             (fix [postgres] url); nothing was changed. A clone of the source's server keeps its \
             identifier: if this is one, set [restore_test] another_server = true in this \
             agent's agent.toml",
            point.id,
            point.environment
        ),
        Some(false) => Ok(()),
        None if another_server => Ok(()),
        None => bail!(
            "point {} of environment {} was dumped from a database named {database}, the name \
             of this agent's database {shown}, and nothing proves the servers differ (the point \
             or this role cannot read the cluster's system identifier, pg_control_system()): \
             it may be the source's live database, which a restore test must never touch; \
             nothing was changed. Restore into a database of another name, grant the role \
             pg_monitor, or, if this is certainly another server, set [restore_test] \
             another_server = true in this agent's agent.toml",
            point.id,
            point.environment
        ),
    }
}

pub(super) async fn restorable_as_this_role(url: &str) -> Result<()> {
    let shown = repository::redact_url(url);
    let mut conn = match sqlx::PgConnection::connect(url).await {
        Ok(conn) => conn,
        // The live database's absence is live_state's to explain.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("connect to {shown}")),
    };
    let others = repository::tables_owned_by_others(&mut conn, 6)
        .await
        .with_context(|| format!("read the table owners in {shown}"))?;
    let _ = conn.close().await;
    if others.is_empty() {
        return Ok(());
    }
    let owners: std::collections::BTreeSet<&str> = others.iter().map(|(_, o)| o.as_str()).collect();
    bail!(
        "the live database's tables belong to {} ({}{}), not to the role the database agent \
         connects as: a restore would make that role own every restored table and grant \
         nothing, locking the application out. Connect the database agent as the role that \
         owns the tables (the application's owner role, with CREATEDB); nothing was changed",
        owners.into_iter().collect::<Vec<_>>().join(", "),
        others
            .iter()
            .take(5)
            .map(|(t, o)| format!("{t} of {o}"))
            .collect::<Vec<_>>()
            .join(", "),
        if others.len() > 5 { ", ..." } else { "" }
    )
}

pub(super) async fn live_state(
    url: &str,
    selection: &CountSelection,
    at_point: Option<&TableColumns>,
) -> Result<(Counts, Vec<Check>)> {
    let shown = repository::redact_url(url);
    let mut conn = match sqlx::PgConnection::connect(url).await {
        Ok(conn) => conn,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => bail!(
            "the live database of {shown} does not exist. If it was lost, create it empty \
             (createdb) and retry the run: the restore replaces it and keeps the empty one \
             under the pre-restore name; otherwise check [postgres] url"
        ),
        Err(e) => return Err(e).with_context(|| format!("connect to {shown}")),
    };
    let specs = repository::count_specs(&mut conn, selection)
        .await
        .with_context(|| format!("list the tables to count in {shown}"))?;
    let missing = repository::missing_tables(&mut conn, &specs)
        .await
        .with_context(|| format!("look up the counted tables in {shown}"))?;
    let present: Vec<CountSpec> = specs
        .iter()
        .filter(|s| !missing.contains(&s.table))
        .cloned()
        .collect();
    let counts = repository::count_rows(&mut conn, &present)
        .await
        .with_context(|| format!("count tables in {shown}"))?;
    let mut checks = Vec::new();
    if !missing.is_empty() {
        checks.push(Check {
            name: "counted tables present".into(),
            kind: CheckKind::Preflight,
            required: false,
            passed: false,
            detail: format!(
                "the live database lacks {}: no count before the restore, which brings back \
                 the point's",
                missing.join(", ")
            ),
        });
    }
    if let Some(at_point) = at_point.filter(|c| !c.is_empty()) {
        let live = repository::table_columns(&mut conn)
            .await
            .with_context(|| format!("read the schema of {shown}"))?;
        checks.push(schema_check(at_point, &live));
    }
    let _ = conn.close().await;
    Ok((counts, checks))
}

/// The runbook's recovery boundary "do not drop additive schema columns as part of rollback":
/// tables and columns the live database has and the point does not are what a restore would
/// roll back. Optional: a restore to a point before a migration is sometimes the intent, and
/// the fix is the application's migrations afterwards, so it is a warning and a follow-up.
fn schema_check(at_point: &TableColumns, live: &TableColumns) -> Check {
    let mut newer = Vec::new();
    for (table, columns) in live {
        match at_point.get(table) {
            None => newer.push(format!("table {table}")),
            Some(known) => newer.extend(
                columns
                    .iter()
                    .filter(|c| !known.contains(c))
                    .map(|c| format!("{table}.{c}")),
            ),
        }
    }
    let detail = if newer.is_empty() {
        format!(
            "the live schema has no table or column the point lacks ({} tables)",
            live.len()
        )
    } else {
        let shown = newer
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let more = match newer.len() {
            n if n > 10 => format!(" and {} more", n - 10),
            _ => String::new(),
        };
        format!(
            "the live database has what the point lacks: {shown}{more}; the restore rolls \
             the schema back to the point's. Run the application's migrations after it (a \
             forward fix); never drop or re-add them by hand"
        )
    };
    Check {
        name: "schema not rolled back".into(),
        kind: CheckKind::Schema,
        required: false,
        passed: newer.is_empty(),
        detail,
    }
}

/// Counts rows of the selected tables in the live database, keyed as a point's counts.
pub(super) async fn count_tables(url: &str, selection: &CountSelection) -> Result<Counts> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to {}", repository::redact_url(url)))?;
    let specs = repository::count_specs(&mut conn, selection)
        .await
        .with_context(|| {
            format!(
                "list the tables to count in {}",
                repository::redact_url(url)
            )
        })?;
    repository::count_rows(&mut conn, &specs)
        .await
        .with_context(|| format!("count tables in {}", repository::redact_url(url)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_schema_check_names_what_a_restore_rolls_back() {
        let cols = |pairs: &[(&str, &[&str])]| -> TableColumns {
            pairs
                .iter()
                .map(|(t, c)| (t.to_string(), c.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        let point = cols(&[("public.sessions", &["id", "title"])]);
        let same = schema_check(&point, &point);
        assert!(same.passed && !same.required, "{same:?}");
        // A column dropped since the point comes back with it: nothing is rolled back.
        let fewer = schema_check(&point, &cols(&[("public.sessions", &["id"])]));
        assert!(fewer.passed, "{fewer:?}");
        let newer = schema_check(
            &point,
            &cols(&[
                ("public.sessions", &["id", "title", "note"]),
                ("public.audit", &["id"]),
            ]),
        );
        assert!(!newer.passed, "{newer:?}");
        assert!(
            newer
                .detail
                .starts_with("the live database has what the point lacks: table public.audit, public.sessions.note;"),
            "{newer:?}"
        );
    }
}
