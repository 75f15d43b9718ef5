//! The two sqlx adapters of [`Store`]. Both dialects accept the same statements (`$N`
//! placeholders, `ON CONFLICT`, `RETURNING`), so one macro writes both implementations and
//! they cannot drift apart; only opening and migrating differ.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use api::model::{ActionKind, ActionOutput, Epoch, Output};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use repository::redact_url;
use sqlx::Row as _;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{
    CommandRecord, Error, EventRecord, NewRun, PhaseRecord, Result, ResultRecord, RunRecord,
    RunState, Store, from_ms, to_ms,
};

/// How long a writer waits for another (another coordinator on the same SQLite file).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// Column lists as macros, so statements stay `&'static str` (sqlx refuses unaudited dynamic SQL).
macro_rules! run_columns {
    () => {
        "id, kind, environment, point_id, plan, params, state, reason, epoch, created_at, \
         updated_at, finished_at, seq"
    };
}
macro_rules! command_columns {
    () => {
        "c.command_id, c.run_id, c.phase_idx, c.agent, c.action, c.payload, c.attempt, c.epoch, \
         c.created_at"
    };
}
macro_rules! result_columns {
    () => {
        "r.command_id AS r_command_id, r.agent AS r_agent, r.epoch AS r_epoch, \
         r.outcome AS r_outcome, r.replayed AS r_replayed, r.detail AS r_detail, \
         r.output AS r_output, r.output_version AS r_output_version, \
         r.received_at AS r_received_at"
    };
}

/// The embedded default: one SQLite file, WAL, fsync on commit.
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(url: &str) -> anyhow::Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .with_context(|| format!("state store URL {url:?} is not a valid sqlite: URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(SQLITE_BUSY_TIMEOUT);
        let file = options.get_filename().to_owned();
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            anyhow::bail!(
                "state store {}: directory {} does not exist; create it or set [state] url \
                 to a file in an existing directory",
                file.display(),
                dir.display()
            );
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| sqlite_hint(&file))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .with_context(|| format!("migrate the SQLite state store {}", file.display()))?;
        Ok(SqliteStore { pool })
    }
}

fn sqlite_hint(file: &Path) -> String {
    format!(
        "open the SQLite state store {}; check that the file is readable and writable by this \
         user and is a Rollcall state database",
        file.display()
    )
}

/// For several coordinators sharing state. Never the database being restored.
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> anyhow::Result<PostgresStore> {
        let shown = redact_url(url);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(PG_CONNECT_TIMEOUT)
            .connect(url)
            .await
            .with_context(|| {
                format!(
                    "connect to the Postgres state store {shown}; check that it is running and \
                     that [state] url names the right host, database and credentials"
                )
            })?;
        // sqlx takes an advisory lock while migrating: coordinators starting together are safe.
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .with_context(|| format!("migrate the Postgres state store {shown}"))?;
        Ok(PostgresStore { pool })
    }
}

fn backend(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::Backend(anyhow::Error::new(e).context(what))
}

fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_foreign_key_violation())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

fn epoch(value: i64) -> anyhow::Result<Epoch> {
    u64::try_from(value)
        .ok()
        .and_then(|v| Epoch::new(v).ok())
        .with_context(|| format!("epoch {value} in the state store is not a valid epoch"))
}

fn epoch_i64(e: Epoch) -> Result<i64> {
    i64::try_from(e.get())
        .map_err(|_| Error::Backend(anyhow::anyhow!("epoch {e} does not fit the state store")))
}

fn json(text: &str, what: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("{what} in the state store is not JSON"))
}

fn index(value: i64, what: &str) -> anyhow::Result<u32> {
    u32::try_from(value).with_context(|| format!("{what} {value} in the state store is invalid"))
}

fn opt_ms(value: Option<i64>) -> anyhow::Result<Option<DateTime<Utc>>> {
    value.map(from_ms).transpose()
}

macro_rules! sql_store {
    // `$fence` reads the newest epoch inside a journal write: every write applies only while
    // its writer's epoch is still the newest (`newest <= writer`). Postgres locks the counter row for the write's
    // transaction (FOR SHARE), so a concurrent `next_epoch` waits for the write or the write
    // sees the new epoch; SQLite runs one writer at a time anyway.
    ($store:ident, $row:ty, $name:literal, $fence:literal) => {
        impl $store {
            /// `Ok` while `writer` is the newest epoch; else the writer has been fenced.
            async fn fence(&self, writer: Epoch) -> Result<()> {
                match self.latest_epoch().await? {
                    Some(newest) if newest > writer => Err(Error::Fenced { writer, newest }),
                    _ => Ok(()),
                }
            }

            /// Why a write that could only have been stopped by the fence was not applied.
            async fn fenced(&self, writer: Epoch) -> Error {
                match self.fence(writer).await {
                    Err(e) => e,
                    Ok(()) => Error::Backend(anyhow::anyhow!(
                        "a journal write of epoch {writer} was not applied although that epoch \
                         is the newest"
                    )),
                }
            }

            fn run_from_row(row: &$row) -> anyhow::Result<RunRecord> {
                Ok(RunRecord {
                    id: row.try_get("id")?,
                    kind: row.try_get::<String, _>("kind")?.parse()?,
                    environment: row.try_get("environment")?,
                    point_id: row.try_get("point_id")?,
                    plan: row.try_get("plan")?,
                    params: json(&row.try_get::<String, _>("params")?, "run params")?,
                    state: row.try_get::<String, _>("state")?.parse()?,
                    reason: row.try_get("reason")?,
                    epoch: epoch(row.try_get("epoch")?)?,
                    created_at: from_ms(row.try_get("created_at")?)?,
                    updated_at: from_ms(row.try_get("updated_at")?)?,
                    finished_at: opt_ms(row.try_get("finished_at")?)?,
                    seq: row.try_get("seq")?,
                })
            }

            fn phase_from_row(row: &$row) -> anyhow::Result<PhaseRecord> {
                Ok(PhaseRecord {
                    run_id: row.try_get("run_id")?,
                    index: index(row.try_get("idx")?, "phase index")?,
                    name: row.try_get("name")?,
                    state: row.try_get::<String, _>("state")?.parse()?,
                    attempt: index(row.try_get("attempt")?, "phase attempt")?,
                    started_at: opt_ms(row.try_get("started_at")?)?,
                    finished_at: opt_ms(row.try_get("finished_at")?)?,
                    detail: row.try_get("detail")?,
                })
            }

            fn command_from_row(row: &$row) -> anyhow::Result<CommandRecord> {
                Ok(CommandRecord {
                    command_id: row.try_get("command_id")?,
                    run_id: row.try_get("run_id")?,
                    phase_index: index(row.try_get("phase_idx")?, "command phase")?,
                    agent: row.try_get("agent")?,
                    action: row.try_get::<String, _>("action")?.parse()?,
                    payload: json(&row.try_get::<String, _>("payload")?, "command payload")?,
                    attempt: index(row.try_get("attempt")?, "command attempt")?,
                    epoch: epoch(row.try_get("epoch")?)?,
                    created_at: from_ms(row.try_get("created_at")?)?,
                })
            }

            /// The result of a command of `action`, its output decoded as that action's.
            fn result_from_row(
                row: &$row,
                action: ActionKind,
            ) -> anyhow::Result<Option<ResultRecord>> {
                let Some(command_id) = row.try_get::<Option<String>, _>("r_command_id")? else {
                    return Ok(None);
                };
                let body = json(&row.try_get::<String, _>("r_output")?, "result output")?;
                let output = if body.is_null() {
                    None
                } else {
                    let version = row.try_get::<i64, _>("r_output_version")?;
                    let output = Output {
                        version: u32::try_from(version).with_context(|| {
                            format!("output version {version} of {command_id} is invalid")
                        })?,
                        body,
                    };
                    Some(ActionOutput::decode(action, &output).with_context(|| {
                        format!("read the journaled output of {command_id}")
                    })?)
                };
                Ok(Some(ResultRecord {
                    agent: row.try_get("r_agent")?,
                    epoch: epoch(row.try_get("r_epoch")?)?,
                    outcome: row.try_get::<String, _>("r_outcome")?.parse()?,
                    replayed: row.try_get("r_replayed")?,
                    detail: row.try_get("r_detail")?,
                    output,
                    received_at: from_ms(row.try_get("r_received_at")?)?,
                    command_id,
                }))
            }
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> &'static str {
                $name
            }

            async fn next_epoch(&self, holder: &str) -> Result<Epoch> {
                let what = "take the next epoch";
                let mut tx = self.pool.begin().await.map_err(backend(what))?;
                // One row, bumped in place: concurrent takers serialize on its lock.
                let value: i64 = sqlx::query_scalar(
                    "UPDATE epoch_counter SET epoch = epoch + 1 WHERE id = 1 RETURNING epoch",
                )
                .fetch_one(&mut *tx)
                .await
                .map_err(backend(what))?;
                sqlx::query("INSERT INTO epochs (epoch, holder, started_at) VALUES ($1, $2, $3)")
                    .bind(value)
                    .bind(holder)
                    .bind(to_ms(Utc::now()))
                    .execute(&mut *tx)
                    .await
                    .map_err(backend(what))?;
                tx.commit().await.map_err(backend(what))?;
                Ok(epoch(value)?)
            }

            async fn latest_epoch(&self) -> Result<Option<Epoch>> {
                let value: i64 = sqlx::query_scalar("SELECT epoch FROM epoch_counter WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(backend("read the latest epoch"))?;
                Ok(if value == 0 { None } else { Some(epoch(value)?) })
            }

            async fn create_run(&self, run: &NewRun) -> Result<()> {
                let at = to_ms(run.created_at);
                let result = sqlx::query(concat!(
                    "INSERT INTO runs (id, kind, environment, point_id, plan, params, state, \
                     reason, epoch, created_at, updated_at, finished_at, seq) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, NULL, $8, $9, $9, NULL, \
                     (SELECT coalesce(max(seq), 0) + 1 FROM runs) WHERE ",
                    $fence,
                    " <= $8"
                ))
                .bind(&run.id)
                .bind(run.kind.as_str())
                .bind(&run.environment)
                .bind(&run.point_id)
                .bind(&run.plan)
                .bind(run.params.to_string())
                .bind(RunState::Pending.as_str())
                .bind(epoch_i64(run.epoch)?)
                .bind(at)
                .execute(&self.pool)
                .await;
                match result {
                    Ok(done) if done.rows_affected() == 1 => Ok(()),
                    Ok(_) => Err(self.fenced(run.epoch).await),
                    Err(e) if is_unique_violation(&e) => {
                        Err(Error::Conflict(format!("run {} already exists", run.id)))
                    }
                    Err(e) => Err(backend("create a run")(e)),
                }
            }

            async fn run(&self, id: &str) -> Result<Option<RunRecord>> {
                let row = sqlx::query(concat!("SELECT ", run_columns!(), " FROM runs WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(backend("read a run"))?;
                Ok(row.as_ref().map(Self::run_from_row).transpose()?)
            }

            async fn list_runs(&self, limit: u32) -> Result<Vec<RunRecord>> {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM runs ORDER BY seq DESC, id DESC LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(backend("list runs"))?;
                Ok(rows.iter().map(Self::run_from_row).collect::<anyhow::Result<_>>()?)
            }

            async fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM runs WHERE state NOT IN ($1, $2, $3) ORDER BY seq, id"
                ))
                .bind(RunState::FINAL[0].as_str())
                .bind(RunState::FINAL[1].as_str())
                .bind(RunState::FINAL[2].as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(backend("list unfinished runs"))?;
                Ok(rows.iter().map(Self::run_from_row).collect::<anyhow::Result<_>>()?)
            }

            async fn newest_verdicts(&self) -> Result<Vec<RunRecord>> {
                // Row values in `IN` (SQLite 3.15+, Postgres); UNION ALL, deduplicated below.
                let rows = sqlx::query(concat!(
                    "SELECT ", run_columns!(), " FROM runs WHERE (environment, kind, seq) IN \
                     (SELECT environment, kind, MAX(seq) FROM runs \
                      WHERE state IN ($1, $2, $3, $4) GROUP BY environment, kind) \
                     UNION ALL SELECT ", run_columns!(), " FROM runs \
                     WHERE (environment, kind, seq) IN \
                     (SELECT environment, kind, MAX(seq) FROM runs \
                      WHERE state = $2 GROUP BY environment, kind)"
                ))
                .bind(RunState::Blocked.as_str())
                .bind(RunState::Succeeded.as_str())
                .bind(RunState::Failed.as_str())
                .bind(RunState::Aborted.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(backend("read the newest ended runs"))?;
                let mut runs: Vec<RunRecord> =
                    rows.iter().map(Self::run_from_row).collect::<anyhow::Result<_>>()?;
                runs.sort_by(|a, b| a.id.cmp(&b.id));
                runs.dedup_by(|a, b| a.id == b.id);
                Ok(runs)
            }

            async fn set_run_state(
                &self,
                id: &str,
                state: RunState,
                reason: Option<&str>,
                at: DateTime<Utc>,
                writer: Epoch,
            ) -> Result<()> {
                let at = to_ms(at);
                let updated = sqlx::query(concat!(
                    "UPDATE runs SET state = $1, reason = $2, updated_at = $3, finished_at = $4 \
                     WHERE id = $5 AND state NOT IN ($6, $7, $8) AND ",
                    $fence,
                    " <= $9"
                ))
                .bind(state.as_str())
                .bind(reason)
                .bind(at)
                .bind(state.is_final().then_some(at))
                .bind(id)
                .bind(RunState::FINAL[0].as_str())
                .bind(RunState::FINAL[1].as_str())
                .bind(RunState::FINAL[2].as_str())
                .bind(epoch_i64(writer)?)
                .execute(&self.pool)
                .await
                .map_err(backend("update a run's state"))?
                .rows_affected();
                if updated == 1 {
                    return Ok(());
                }
                self.fence(writer).await?;
                match self.run(id).await? {
                    None => Err(Error::NotFound(format!("no run {id}"))),
                    Some(run) => Err(Error::Conflict(format!(
                        "run {id} is already {}; a finished run cannot become {state}",
                        run.state
                    ))),
                }
            }

            async fn put_phase(&self, phase: &PhaseRecord, writer: Epoch) -> Result<()> {
                // Only while the run is not finished (a missing run reads NULL: not written).
                let result = sqlx::query(concat!(
                    "INSERT INTO phases (run_id, idx, name, state, attempt, started_at, \
                     finished_at, detail) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                     WHERE (SELECT state FROM runs WHERE id = $1) NOT IN ($10, $11, $12) AND ",
                    $fence,
                    " <= $9 \
                     ON CONFLICT (run_id, idx) DO UPDATE SET name = excluded.name, \
                     state = excluded.state, attempt = excluded.attempt, \
                     started_at = excluded.started_at, finished_at = excluded.finished_at, \
                     detail = excluded.detail"
                ))
                .bind(&phase.run_id)
                .bind(i64::from(phase.index))
                .bind(&phase.name)
                .bind(phase.state.as_str())
                .bind(i64::from(phase.attempt))
                .bind(phase.started_at.map(to_ms))
                .bind(phase.finished_at.map(to_ms))
                .bind(&phase.detail)
                .bind(epoch_i64(writer)?)
                .bind(RunState::FINAL[0].as_str())
                .bind(RunState::FINAL[1].as_str())
                .bind(RunState::FINAL[2].as_str())
                .execute(&self.pool)
                .await;
                match result {
                    Ok(done) if done.rows_affected() == 1 => Ok(()),
                    Ok(_) => {
                        self.fence(writer).await?;
                        match self.run(&phase.run_id).await? {
                            None => Err(Error::NotFound(format!("no run {}", phase.run_id))),
                            Some(run) => Err(Error::Conflict(format!(
                                "run {} is already {}; the phases of a finished run do not \
                                 change",
                                run.id, run.state
                            ))),
                        }
                    }
                    Err(e) if is_foreign_key_violation(&e) => {
                        Err(Error::NotFound(format!("no run {}", phase.run_id)))
                    }
                    Err(e) => Err(backend("record a phase")(e)),
                }
            }

            async fn phases(&self, run_id: &str) -> Result<Vec<PhaseRecord>> {
                let rows = sqlx::query(
                    "SELECT run_id, idx, name, state, attempt, started_at, finished_at, detail \
                     FROM phases WHERE run_id = $1 ORDER BY idx",
                )
                .bind(run_id)
                .fetch_all(&self.pool)
                .await
                .map_err(backend("read a run's phases"))?;
                Ok(rows.iter().map(Self::phase_from_row).collect::<anyhow::Result<_>>()?)
            }

            async fn record_command(&self, command: &CommandRecord) -> Result<()> {
                let what = "journal a command";
                let epoch = epoch_i64(command.epoch)?;
                let mut tx = self.pool.begin().await.map_err(backend(what))?;
                let inserted = sqlx::query(concat!(
                    "INSERT INTO commands (command_id, run_id, phase_idx, agent, action, \
                     payload, attempt, epoch, created_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE ",
                    $fence,
                    " <= $8 ON CONFLICT (command_id) DO NOTHING"
                ))
                .bind(&command.command_id)
                .bind(&command.run_id)
                .bind(i64::from(command.phase_index))
                .bind(&command.agent)
                .bind(command.action.as_str())
                .bind(command.payload.to_string())
                .bind(i64::from(command.attempt))
                .bind(epoch)
                .bind(to_ms(command.created_at))
                .execute(&mut *tx)
                .await;
                let inserted = match inserted {
                    Ok(done) => done.rows_affected() == 1,
                    Err(e) if is_foreign_key_violation(&e) => {
                        return Err(Error::NotFound(format!("no run {}", command.run_id)));
                    }
                    Err(e) => return Err(backend(what)(e)),
                };
                if !inserted {
                    self.fence(command.epoch).await?;
                    let row = sqlx::query(concat!(
                        "SELECT ",
                        command_columns!(),
                        " FROM commands c WHERE c.command_id = $1"
                    ))
                    .bind(&command.command_id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(backend(what))?;
                    let existing = Self::command_from_row(&row)?;
                    if !same_command(&existing, command) {
                        return Err(Error::Conflict(format!(
                            "command id {} is already journaled for a different command \
                             ({} on {} in run {}); a command id names exactly one command",
                            command.command_id, existing.action, existing.agent, existing.run_id
                        )));
                    }
                    sqlx::query(
                        "UPDATE commands SET epoch = $1 WHERE command_id = $2 AND epoch < $1",
                    )
                    .bind(epoch)
                    .bind(&command.command_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(backend(what))?;
                }
                tx.commit().await.map_err(backend(what))?;
                Ok(())
            }

            async fn record_result(&self, result: &ResultRecord, writer: Epoch) -> Result<bool> {
                let output = result.output.as_ref().map(Output::from);
                let done = sqlx::query(concat!(
                    "INSERT INTO results (command_id, agent, epoch, outcome, replayed, detail, \
                     output, output_version, received_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE ",
                    $fence,
                    " <= $10 ON CONFLICT (command_id) DO NOTHING"
                ))
                .bind(&result.command_id)
                .bind(&result.agent)
                .bind(epoch_i64(result.epoch)?)
                .bind(result.outcome.as_str())
                .bind(result.replayed)
                .bind(&result.detail)
                .bind(output.as_ref().map_or_else(|| "null".to_owned(), |o| o.body.to_string()))
                .bind(output.as_ref().map_or(0, |o| i64::from(o.version)))
                .bind(to_ms(result.received_at))
                .bind(epoch_i64(writer)?)
                .execute(&self.pool)
                .await;
                match done {
                    Ok(done) if done.rows_affected() == 1 => Ok(true),
                    Ok(_) => {
                        self.fence(writer).await?;
                        Ok(false)
                    }
                    Err(e) if is_foreign_key_violation(&e) => Err(Error::NotFound(format!(
                        "no journaled command {}; journal a command before its result",
                        result.command_id
                    ))),
                    Err(e) => Err(backend("journal a command result")(e)),
                }
            }

            async fn commands(
                &self,
                run_id: &str,
            ) -> Result<Vec<(CommandRecord, Option<ResultRecord>)>> {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    command_columns!(),
                    ", ",
                    result_columns!(),
                    " FROM commands c LEFT JOIN results r ON r.command_id = c.command_id \
                     WHERE c.run_id = $1 ORDER BY c.phase_idx, c.agent, c.attempt, c.command_id"
                ))
                .bind(run_id)
                .fetch_all(&self.pool)
                .await
                .map_err(backend("read a run's commands"))?;
                let mut out = Vec::with_capacity(rows.len());
                for row in &rows {
                    let command = Self::command_from_row(row)?;
                    let result = Self::result_from_row(row, command.action)?;
                    out.push((command, result));
                }
                Ok(out)
            }

            async fn append_event(
                &self,
                run_id: &str,
                at: DateTime<Utc>,
                kind: &str,
                payload: &serde_json::Value,
                writer: Epoch,
            ) -> Result<i64> {
                let seq = sqlx::query_scalar(concat!(
                    "INSERT INTO events (run_id, at, kind, payload) SELECT $1, $2, $3, $4 WHERE ",
                    $fence,
                    " <= $5 RETURNING seq"
                ))
                .bind(run_id)
                .bind(to_ms(at))
                .bind(kind)
                .bind(payload.to_string())
                .bind(epoch_i64(writer)?)
                .fetch_optional(&self.pool)
                .await;
                match seq {
                    Ok(Some(seq)) => Ok(seq),
                    Ok(None) => Err(self.fenced(writer).await),
                    Err(e) if is_foreign_key_violation(&e) => {
                        Err(Error::NotFound(format!("no run {run_id}")))
                    }
                    Err(e) => Err(backend("append a run event")(e)),
                }
            }

            async fn events(&self, run_id: &str, after: i64, limit: u32) -> Result<Vec<EventRecord>> {
                let rows = sqlx::query(
                    "SELECT seq, run_id, at, kind, payload FROM events \
                     WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(run_id)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(backend("read run events"))?;
                rows.iter()
                    .map(|row| {
                        Ok(EventRecord {
                            seq: row.try_get("seq")?,
                            run_id: row.try_get("run_id")?,
                            at: from_ms(row.try_get("at")?)?,
                            kind: row.try_get("kind")?,
                            payload: json(&row.try_get::<String, _>("payload")?, "event payload")?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()
                    .map_err(Error::Backend)
            }
        }
    };
}

sql_store!(
    SqliteStore,
    sqlx::sqlite::SqliteRow,
    "sqlite",
    "(SELECT epoch FROM epoch_counter WHERE id = 1)"
);
sql_store!(
    PostgresStore,
    sqlx::postgres::PgRow,
    "postgres",
    "(SELECT epoch FROM epoch_counter WHERE id = 1 FOR SHARE)"
);

/// The same command journaled twice: everything but the epoch it was (re-)sent under and the
/// time it was first decided must match.
fn same_command(a: &CommandRecord, b: &CommandRecord) -> bool {
    a.run_id == b.run_id
        && a.phase_index == b.phase_index
        && a.agent == b.agent
        && a.action == b.action
        && a.payload == b.payload
        && a.attempt == b.attempt
}
