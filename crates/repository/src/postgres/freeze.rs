//! Freezing writes at the database, for services without a maintenance mode: the login roles
//! the application connects as get `default_transaction_read_only = on` in the live database
//! (`ALTER ROLE … IN DATABASE … SET`), and their sessions that began before are ended, so they
//! reconnect read-only. Reads keep working; a write fails with SQLSTATE 25006
//! (`read_only_sql_transaction`). Thawing resets the setting and ends the sessions that began
//! frozen, so they reconnect writable.
//!
//! The setting is a default, not a lock: a session that asks for read-write transactions
//! (startup option `-c default_transaction_read_only=off`, `SET …`) still writes. That is how
//! Rollcall's own connections (`conn::connect`) and processes that must write while frozen
//! (a worker running a drill's smoke) opt out; everything else the roles run is read-only.
//!
//! A role setting `IN DATABASE` belongs to the database, not its name: a swap carries it onto
//! the database that takes the live name ([`set_read_only`], called by
//! `DatabaseSwap::carry_freeze`), and the kept copy keeps its own.
//!
//! Nothing changes before the checks pass: every role must exist, and every session of those
//! roles on the live database must be one this role may end. The settings are changed in one
//! transaction, so a failure leaves all roles as they were.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection as _, Row as _};

use super::catalog::quote_ident;
use super::conn::DbUrl;
use super::swap::{MAY_END, SESSION_COLUMNS, Session, maintenance};

/// How long a freeze or thaw waits for the sessions it ended to go.
const ENDED_WITHIN: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

/// What a freeze or a thaw did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeChange {
    /// The live database.
    pub database: String,
    /// When the setting changed, on the server's clock (microseconds since the Unix epoch):
    /// the sessions that began before it are the ones it ends. A repeated freeze passes the
    /// first one's, so sessions that reconnected read-only since are left alone.
    pub since_us: i64,
    /// The sessions it ended.
    pub ended: Vec<Session>,
}

/// The login roles of the live database `live_url` names, to freeze or thaw.
pub struct DatabaseFreeze {
    live: DbUrl,
    roles: Vec<String>,
    admin: PgConnection,
}

impl DatabaseFreeze {
    /// Connects to the maintenance database of the server `live_url` names and checks that
    /// every role in `roles` exists.
    pub async fn connect(
        live_url: &str,
        roles: &[String],
        timeout: Duration,
    ) -> Result<DatabaseFreeze> {
        if roles.is_empty() {
            bail!("a database freeze needs at least one role to make read-only");
        }
        let live = DbUrl::parse(live_url)?;
        let mut admin = maintenance(&live, timeout).await?;
        let missing: Vec<String> = sqlx::query_scalar(
            "SELECT r FROM unnest($1::text[]) AS r \
             WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)",
        )
        .bind(roles)
        .fetch_all(&mut admin)
        .await
        .context("look up the roles to freeze")?;
        if !missing.is_empty() {
            bail!(
                "no role named {} on the server of {}: list the login roles the application \
                 connects as",
                missing.join(", "),
                live.display
            );
        }
        Ok(DatabaseFreeze {
            live,
            roles: roles.to_vec(),
            admin,
        })
    }

    /// The live database's name.
    pub fn database(&self) -> &str {
        &self.live.database
    }

    /// Whether this role could freeze and thaw the roles, changing nothing: it may alter each
    /// of them (it is the role itself, a superuser, or has CREATEROLE and the role is not a
    /// superuser) and end their sessions (a member of the role or of `pg_signal_backend`, or
    /// a superuser; a superuser's sessions only a superuser). What a drill's preflight asks
    /// before anything is frozen.
    pub async fn check(&mut self) -> Result<()> {
        let rows = sqlx::query(
            "SELECT r.rolname::text AS role, \
                    (me.rolsuper OR r.rolname = current_user \
                     OR (me.rolcreaterole AND NOT r.rolsuper)) AS may_alter, \
                    (me.rolsuper OR (NOT r.rolsuper \
                     AND (pg_has_role(current_user, r.oid, 'MEMBER') \
                          OR pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')))) AS may_end \
             FROM pg_roles r, pg_roles me \
             WHERE r.rolname = ANY($1) AND me.rolname = current_user ORDER BY r.rolname",
        )
        .bind(&self.roles)
        .fetch_all(&mut self.admin)
        .await
        .context("read what this role may do to the roles to freeze")?;
        let mut problems = Vec::new();
        for row in &rows {
            let role: String = row.try_get("role")?;
            if !row.try_get::<bool, _>("may_alter")? {
                problems.push(format!(
                    "may not make role {role} read-only (it must be {role} itself, a superuser, \
                     or have CREATEROLE)"
                ));
            }
            if !row.try_get::<bool, _>("may_end")? {
                problems.push(format!(
                    "may not end role {role}'s sessions (grant it {role} or pg_signal_backend)"
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "the database freeze of {} could not hold: {} {}",
                self.live.database,
                current_user(&mut self.admin).await,
                problems.join("; ")
            );
        }
        Ok(())
    }

    /// Makes the roles read-only in the live database and ends their sessions that began
    /// before (or before `since_us`, the time of an earlier freeze this one repeats). Refuses,
    /// changing nothing, while a session of the roles is one this role may not end.
    pub async fn freeze(&mut self, since_us: Option<i64>) -> Result<FreezeChange> {
        self.change(true, since_us).await
    }

    /// Resets the roles' setting in the live database and ends their sessions that began
    /// before, which are read-only for as long as they live.
    pub async fn thaw(&mut self) -> Result<FreezeChange> {
        self.change(false, None).await
    }

    async fn change(&mut self, frozen: bool, since_us: Option<i64>) -> Result<FreezeChange> {
        let database = self.live.database.clone();
        let in_the_way = self.sessions(&database, i64::MAX, false).await?;
        if !in_the_way.is_empty() {
            bail!(
                "sessions of the roles to {} on {database} that {} may not end: {}; nothing \
                 was changed. Give the database agent a role that may end them (a member of \
                 those roles, or of pg_signal_backend), or end them and retry",
                if frozen { "freeze" } else { "thaw" },
                current_user(&mut self.admin).await,
                super::swap::list(&in_the_way)
            );
        }
        let mut tx = self.admin.begin().await.context("begin a transaction")?;
        set_read_only(&mut tx, &database, &self.roles, frozen).await?;
        let now: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1e6)::int8")
                .fetch_one(&mut *tx)
                .await
                .context("read the server's clock")?;
        tx.commit()
            .await
            .with_context(|| format!("commit the roles' setting in {database}"))?;
        let since_us = since_us.unwrap_or(now);
        let ended = self.end_sessions(&database, since_us).await?;
        Ok(FreezeChange {
            database,
            since_us,
            ended,
        })
    }

    /// Ends the roles' sessions on `db` that began before `before_us`, and waits for them to go.
    async fn end_sessions(&mut self, db: &str, before_us: i64) -> Result<Vec<Session>> {
        let ended = self.sessions(db, before_us, true).await?;
        for s in &ended {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(s.pid)
                .execute(&mut self.admin)
                .await
                .with_context(|| format!("end session {s} on {db}"))?;
        }
        let until = Instant::now() + ENDED_WITHIN;
        loop {
            let left: Vec<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1) AND datname = $2",
            )
            .bind(ended.iter().map(|s| s.pid).collect::<Vec<_>>())
            .bind(db)
            .fetch_all(&mut self.admin)
            .await
            .context("wait for the ended sessions to go")?;
            if left.is_empty() {
                return Ok(ended);
            }
            if Instant::now() >= until {
                bail!(
                    "sessions {left:?} on {db} were asked to end and are still there after \
                     {} s",
                    ENDED_WITHIN.as_secs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The client sessions of the roles on `db` that began before `before_us` (Rollcall's own
    /// are never counted): those this role may end when `may_end`, else those it may not. A
    /// role without `pg_read_all_stats` does not see when another role's session began: such
    /// a session counts as older.
    async fn sessions(&mut self, db: &str, before_us: i64, may_end: bool) -> Result<Vec<Session>> {
        let sql = format!(
            "SELECT {} FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid \
             WHERE a.datname = $1 AND a.usename = ANY($2) AND a.pid <> pg_backend_pid() \
               AND coalesce(a.application_name, '') NOT LIKE 'rollcall%' \
               AND coalesce(a.backend_start < to_timestamp($3::float8 / 1e6), true) \
               AND {} ({}) ORDER BY a.pid",
            SESSION_COLUMNS,
            if may_end { "" } else { "NOT" },
            MAY_END
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(db)
            .bind(&self.roles)
            .bind(before_us as f64)
            .fetch_all(&mut self.admin)
            .await
            .with_context(|| format!("list the roles' sessions on {db}"))?;
        Session::from_rows(&rows).with_context(|| format!("read the roles' sessions on {db}"))
    }

    /// Ends the session to the maintenance database.
    pub async fn close(self) {
        let _ = self.admin.close().await;
    }
}

/// Sets (`frozen`) or resets `default_transaction_read_only` for `roles` in database `db`.
pub(super) async fn set_read_only(
    conn: &mut PgConnection,
    db: &str,
    roles: &[String],
    frozen: bool,
) -> Result<()> {
    let me = current_user(conn).await;
    for role in roles {
        let change = if frozen {
            "SET default_transaction_read_only = on"
        } else {
            "RESET default_transaction_read_only"
        };
        let sql = format!(
            "ALTER ROLE {} IN DATABASE {} {change}",
            quote_ident(role),
            quote_ident(db)
        );
        if let Err(e) = sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await {
            return Err(anyhow::Error::new(e).context(format!(
                "{} role {role} in database {db} as {me}: the database agent's role must be \
                 {role} itself, a superuser, or have CREATEROLE",
                if frozen {
                    "make read-only"
                } else {
                    "make writable again"
                }
            )));
        }
    }
    Ok(())
}

async fn current_user(conn: &mut PgConnection) -> String {
    sqlx::query_scalar::<_, String>("SELECT current_user::text")
        .fetch_one(conn)
        .await
        .map_or_else(|_| "this role".to_owned(), |r| format!("role {r}"))
}
