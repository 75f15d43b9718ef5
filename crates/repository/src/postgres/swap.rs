//! Swapping a restored database in for the live one without destroying either: the restore
//! goes into `<db>_restore_<tag>`, then two renames make the live database `<db>_pre_<tag>`
//! (kept, never dropped) and the restored one the live name.
//!
//! Every step is idempotent by what exists: [`DatabaseSwap::state`] tells a finished swap, one
//! interrupted between its renames, and a fresh start apart from which of the three databases
//! exist, so an agent that died at any point finishes the swap instead of redoing or losing it.
//! Only an incomplete `_restore_` copy of the same tag is ever dropped.
//!
//! The live database accepts connections whenever the swap is done with it, whatever failed:
//! sessions this role may not end (a superuser's, when the agent runs as the application's
//! owner role) are named before anything changes; once connections are blocked, any failure
//! reopens the live database under its own name (undoing a first rename); and a swap killed
//! mid-way is reopened by the next one of its tag, or by [`reopen_interrupted_swaps`] when the
//! database agent starts.
//!
//! An undo is the same swap the other way ([`SwapNames::undo`], [`undo_swap`]): `<db>_pre_<tag>`
//! takes the live name back and the restored database is kept as `<db>_undone_<tag>`, with the
//! same guarantees; nothing is dropped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection as _, Row as _};

use super::CountSpec;
use super::catalog::{count_rows, quote_ident};
use super::conn::{DbUrl, connect, with_database};
use super::restore::{PgRestoreOptions, restore_postgres};
use crate::layout::PointId;
use crate::repo::Repository;

/// Postgres truncates identifiers longer than this many bytes.
const MAX_IDENTIFIER: usize = 63;
/// How long the swap waits for the live database's last sessions (autovacuum workers, which
/// no role but a superuser may end, and sessions it ended) to go before it gives up.
const SESSIONS_GONE_WITHIN: Duration = Duration::from_secs(30);
const RENAME_PAUSE: Duration = Duration::from_millis(100);

/// Whether this role may end session `a` of `pg_stat_activity` (joined with its role as `r`):
/// `pg_terminate_backend` lets a superuser end any session; another role only sessions of
/// roles it is a member of, or (with `pg_signal_backend`) any session but a superuser's;
/// background processes without a role, such as autovacuum workers, only a superuser.
pub(super) const MAY_END: &str = "coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false) \
     OR (a.usesysid IS NOT NULL AND NOT coalesce(r.rolsuper, false) \
         AND (pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') \
              OR pg_has_role(current_user, a.usesysid, 'MEMBER')))";

/// The three databases of one swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapNames {
    /// The live database, as the URL names it.
    pub live: String,
    /// The database that takes the live name: where the point is restored before the swap
    /// (`<db>_restore_<tag>`), or for an undo the database the restore replaced
    /// (`<db>_pre_<tag>`).
    pub restore: String,
    /// Where the live database is kept after the swap: `<db>_pre_<tag>`, or for an undo
    /// `<db>_undone_<tag>`.
    pub pre: String,
}

impl SwapNames {
    /// The names for swapping the database of `live_url` under `tag` (short, e.g. a run's).
    pub fn new(live_url: &str, tag: &str) -> Result<SwapNames> {
        let live = DbUrl::parse(live_url)?.database;
        let names = SwapNames {
            restore: format!("{live}_restore_{tag}"),
            pre: format!("{live}_pre_{tag}"),
            live,
        };
        if names.pre.len() > MAX_IDENTIFIER || names.restore.len() > MAX_IDENTIFIER {
            bail!(
                "database name {:?} is too long to derive restore names from (Postgres \
                 allows {MAX_IDENTIFIER} bytes)",
                names.live
            );
        }
        Ok(names)
    }

    /// The names for undoing the swap of `tag`: the database it kept (`<db>_pre_<tag>`) takes
    /// the live name again and the live one (the restored database) is kept as
    /// `<db>_undone_<tag>`.
    pub fn undo(live_url: &str, tag: &str) -> Result<SwapNames> {
        let swapped = SwapNames::new(live_url, tag)?;
        let names = SwapNames {
            restore: swapped.pre,
            pre: format!("{}_undone_{tag}", swapped.live),
            live: swapped.live,
        };
        if names.pre.len() > MAX_IDENTIFIER {
            bail!(
                "database name {:?} is too long to derive the undo's names from (Postgres \
                 allows {MAX_IDENTIFIER} bytes)",
                names.live
            );
        }
        Ok(names)
    }
}

/// Where a swap stands, from which of its databases exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapState {
    /// The live and the kept database exist and no restore copy: an earlier execution swapped.
    Swapped,
    /// The kept and the restore copy exist and no live one: interrupted between the renames.
    Interrupted,
    /// Nothing of this swap happened yet (`stale_restore`: an incomplete restore copy of an
    /// earlier attempt is there).
    Fresh { stale_restore: bool },
    /// No live database and no swap of this tag under way.
    NoLive,
}

/// A session on a database, as `pg_stat_activity` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub pid: i32,
    /// Empty for a background process (an autovacuum worker has no role).
    pub user: String,
    pub application: String,
    pub backend_type: String,
}

/// The columns of `pg_stat_activity a` that [`Session::from_rows`] reads.
pub(super) const SESSION_COLUMNS: &str = "a.pid, coalesce(a.usename, '') AS usename, \
     coalesce(a.application_name, '') AS application_name, \
     coalesce(a.backend_type, '') AS backend_type";

impl Session {
    /// The sessions of rows selected with [`SESSION_COLUMNS`].
    pub(super) fn from_rows(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<Session>, sqlx::Error> {
        rows.iter()
            .map(|row| {
                Ok(Session {
                    pid: row.try_get("pid")?,
                    user: row.try_get("usename")?,
                    application: row.try_get("application_name")?,
                    backend_type: row.try_get("backend_type")?,
                })
            })
            .collect()
    }

    /// An autovacuum worker, which the swap waits for (a rename cancels autovacuum) instead of
    /// refusing. A role without `pg_read_all_stats` sees neither the role nor the backend type
    /// of a background process: a session with neither is taken for one (the rename still
    /// fails, naming it, if it is something else that stays).
    pub(super) fn is_autovacuum(&self) -> bool {
        self.backend_type == "autovacuum worker"
            || (self.user.is_empty() && self.backend_type.is_empty())
    }
}

impl std::fmt::Display for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = if self.user.is_empty() {
            "no role"
        } else {
            &self.user
        };
        write!(f, "pid {} ({user}", self.pid)?;
        if !self.application.is_empty() {
            write!(f, ", application {:?}", self.application)?;
        }
        if self.backend_type != "client backend" && !self.backend_type.is_empty() {
            write!(f, ", {}", self.backend_type)?;
        }
        f.write_str(")")
    }
}

/// One swap, over a connection to the server's maintenance database.
pub struct DatabaseSwap {
    live_url: DbUrl,
    names: SwapNames,
    /// The names of the restore's own swap when this one undoes it (see [`undo_swap`]).
    undoes: Option<SwapNames>,
    admin: PgConnection,
    /// How long to wait for sessions to leave the live database once it is blocked.
    sessions_gone_within: Duration,
    /// A database freeze to carry onto the database that takes the live name
    /// ([`DatabaseSwap::carry_freeze`]).
    carry: Option<(Vec<String>, bool)>,
}

impl DatabaseSwap {
    /// Connects to the maintenance database (`postgres`) of the server `live_url` names.
    pub async fn connect(live_url: &str, tag: &str, timeout: Duration) -> Result<DatabaseSwap> {
        let names = SwapNames::new(live_url, tag)?;
        let live = DbUrl::parse(live_url)?;
        let admin = maintenance(&live, timeout).await?;
        Ok(DatabaseSwap {
            live_url: live,
            names,
            undoes: None,
            admin,
            sessions_gone_within: SESSIONS_GONE_WITHIN,
            carry: None,
        })
    }

    /// Like [`DatabaseSwap::connect`], for undoing the swap of `tag` ([`SwapNames::undo`]).
    pub async fn connect_undo(
        live_url: &str,
        tag: &str,
        timeout: Duration,
    ) -> Result<DatabaseSwap> {
        let mut swap = DatabaseSwap::connect(live_url, tag, timeout).await?;
        swap.undoes = Some(std::mem::replace(
            &mut swap.names,
            SwapNames::undo(live_url, tag)?,
        ));
        Ok(swap)
    }

    /// How long a swap waits for the live database's last sessions to go (default 30 s).
    pub fn sessions_gone_within(mut self, wait: Duration) -> DatabaseSwap {
        self.sessions_gone_within = wait;
        self
    }

    /// The login roles a database freeze makes read-only in the live database, and whether
    /// writes are frozen now: before the database that takes the live name gets it, the
    /// roles' `default_transaction_read_only` is set on it (frozen) or reset (not frozen), so
    /// a freeze holds across the swap and a copy kept while frozen is writable when it comes
    /// back after the thaw (see `freeze`).
    pub fn carry_freeze(mut self, roles: &[String], frozen: bool) -> DatabaseSwap {
        if !roles.is_empty() {
            self.carry = Some((roles.to_vec(), frozen));
        }
        self
    }

    /// Gives `db` the live database's freeze setting before it takes the live name.
    async fn carry_onto(&mut self, db: &str) -> Result<()> {
        if let Some((roles, frozen)) = self.carry.clone() {
            super::freeze::set_read_only(&mut self.admin, db, &roles, frozen)
                .await
                .with_context(|| {
                    format!("carry the database freeze onto {db} before it takes the live name")
                })?;
        }
        Ok(())
    }

    pub fn names(&self) -> &SwapNames {
        &self.names
    }

    /// Which of the swap's databases exist. A live database an earlier attempt of this swap
    /// left refusing connections (it was killed between blocking and renaming) is reopened.
    pub async fn state(&mut self) -> Result<SwapState> {
        let names = self.names.clone();
        let live = self.exists(&names.live).await?;
        let pre = self.exists(&names.pre).await?;
        let restore = self.exists(&names.restore).await?;
        if live && restore && !pre && !allows_connections(&mut self.admin, &names.live).await? {
            tracing::warn!(
                database = %names.live,
                "reopening the live database an interrupted swap left refusing connections"
            );
            self.allow_connections(&names.live, true).await?;
        }
        Ok(match (live, pre, restore) {
            (true, true, false) => SwapState::Swapped,
            (false, true, true) => SwapState::Interrupted,
            (false, _, _) => SwapState::NoLive,
            (true, _, stale_restore) => SwapState::Fresh { stale_restore },
        })
    }

    /// Finishes a swap interrupted between its renames: the restore copy takes the live name.
    pub async fn finish_interrupted(&mut self) -> Result<()> {
        let names = self.names.clone();
        if let Err(e) = self.carry_onto(&names.restore).await {
            // The restore copy would go live without the freeze: the database it replaces
            // takes its name back instead, accepting connections, and the swap can be retried.
            return match reopen(&mut self.admin, &names).await {
                Ok(()) => Err(e.context(format!(
                    "the swap was not finished; {} is live again under its own name",
                    names.live
                ))),
                Err(undo) => Err(e.context(format!(
                    "and putting {} back under the live name failed too ({undo:#}): rename \
                     {} to {} by hand",
                    names.pre, names.pre, names.live
                ))),
            };
        }
        self.rename(&names.restore, &names.live).await?;
        self.allow_connections(&names.pre, true).await
    }

    /// Creates the empty restore copy (dropping an incomplete one of an earlier attempt, which
    /// never held live data) and returns its URL.
    pub async fn create_restore_target(&mut self, stale_restore: bool) -> Result<String> {
        let restore = self.names.restore.clone();
        if stale_restore {
            tracing::warn!(database = %restore, "dropping an incomplete restore from an earlier attempt");
            self.execute(
                format!("DROP DATABASE {}", quote_ident(&restore)),
                &format!("drop the incomplete {restore}"),
            )
            .await?;
        }
        self.execute(
            format!(
                "CREATE DATABASE {} TEMPLATE template0",
                quote_ident(&restore)
            ),
            &format!("create database {restore}"),
        )
        .await?;
        with_database(&self.live_url.full, &restore)
    }

    /// Marks the restore copy as a finished preparation of `point`, for the commit to check.
    pub async fn mark_prepared(&mut self, point: &str) -> Result<()> {
        let restore = self.names.restore.clone();
        self.execute(
            format!(
                "COMMENT ON DATABASE {} IS {}",
                quote_ident(&restore),
                quote_literal(&prepared_mark(point))
            ),
            &format!("mark {restore} as prepared"),
        )
        .await
    }

    /// Whether the restore copy exists and a preparation of `point` finished in it.
    pub async fn prepared_for(&mut self, point: &str) -> Result<bool> {
        let mark: Option<Option<String>> = sqlx::query_scalar(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
        )
        .bind(&self.names.restore)
        .fetch_optional(&mut self.admin)
        .await
        .context("read the restore copy's mark")?;
        Ok(mark.flatten().as_deref() == Some(prepared_mark(point).as_str()))
    }

    /// The URL of the restore copy (it may not exist).
    pub fn restore_url(&self) -> Result<String> {
        with_database(&self.live_url.full, &self.names.restore)
    }

    /// The sessions on the live database this role may not end. `pg_terminate_backend` lets a
    /// superuser end any session; another role only sessions of roles it is a member of, or
    /// (with `pg_signal_backend`) any session but a superuser's; background processes without
    /// a role, such as autovacuum workers, only a superuser.
    pub async fn sessions_it_may_not_end(&mut self) -> Result<Vec<Session>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} \
             FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid \
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid() AND NOT ({MAY_END}) \
             ORDER BY a.pid"
        )))
        .bind(&self.names.live)
        .fetch_all(&mut self.admin)
        .await
        .context("list the sessions on the live database")?;
        Session::from_rows(&rows).context("read the sessions on the live database")
    }

    /// The swap itself: no new sessions on the live database, end the current ones, rename
    /// the live database to the kept name and the restored one to the live name. Refuses,
    /// changing nothing, while a session this role may not end is on the live database (an
    /// autovacuum worker is waited for instead); once connections are blocked, any failure
    /// leaves the live database under its own name, accepting connections.
    pub async fn swap(&mut self) -> Result<()> {
        let names = self.names.clone();
        let in_the_way: Vec<Session> = self
            .sessions_it_may_not_end()
            .await?
            .into_iter()
            .filter(|s| !s.is_autovacuum())
            .collect();
        if !in_the_way.is_empty() {
            bail!(
                "the live database {} has sessions that {} may not end: {}; nothing was \
                 changed. End them (pg_terminate_backend as a superuser, or stop their \
                 clients) and retry, or give the database agent a role that may end them",
                names.live,
                self.role().await,
                list(&in_the_way)
            );
        }
        // Before anything live changes: a role this one may not alter fails the swap here.
        self.carry_onto(&names.restore).await?;
        self.allow_connections(&names.live, false).await?;
        let swapped = self.disconnect_and_rename(&names).await;
        if let Err(e) = swapped {
            // Whatever failed, the live database takes connections again under its own name.
            return match reopen(&mut self.admin, &names).await {
                Ok(()) => Err(e.context(format!(
                    "the live database {} is unchanged and accepts connections again",
                    names.live
                ))),
                Err(undo) => {
                    tracing::error!(
                        database = %names.live,
                        "the swap failed and the live database could not be reopened: {undo:#}"
                    );
                    Err(e.context(format!(
                        "and reopening the live database {} failed too ({undo:#}): it may \
                         refuse connections; run ALTER DATABASE {} ALLOW_CONNECTIONS true",
                        names.live,
                        quote_ident(&names.live)
                    )))
                }
            };
        }
        Ok(())
    }

    /// Ends the sessions it may end until the live database can be renamed (or the wait is
    /// over), then renames twice; a failed second rename puts the first one back.
    async fn disconnect_and_rename(&mut self, names: &SwapNames) -> Result<()> {
        let until = Instant::now() + self.sessions_gone_within;
        loop {
            sqlx::query(AssertSqlSafe(format!(
                "SELECT pg_terminate_backend(a.pid) \
                 FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid \
                 WHERE a.datname = $1 AND a.pid <> pg_backend_pid() AND ({MAY_END})"
            )))
            .bind(&names.live)
            .execute(&mut self.admin)
            .await
            .context("disconnect sessions from the live database")?;
            match self.rename(&names.live, &names.pre).await {
                Ok(()) => break,
                Err(e) if Instant::now() < until => {
                    tracing::debug!("rename not yet possible: {e:#}");
                    tokio::time::sleep(RENAME_PAUSE).await;
                }
                Err(e) => {
                    let left = self.sessions_on(&names.live).await.unwrap_or_default();
                    return Err(e.context(format!(
                        "sessions still on the live database after {} s: {}",
                        self.sessions_gone_within.as_secs(),
                        if left.is_empty() {
                            "none listed".to_owned()
                        } else {
                            list(&left)
                        }
                    )));
                }
            }
        }
        if let Err(e) = self.rename(&names.restore, &names.live).await {
            // Never leave the service without its database: the first rename goes back.
            self.rename(&names.pre, &names.live)
                .await
                .context("put the live database back under its name")?;
            return Err(e);
        }
        if let Err(e) = self.allow_connections(&names.pre, true).await {
            // The kept copy refusing connections takes nothing down; say so and go on.
            tracing::warn!(database = %names.pre, "the kept database still refuses connections: {e:#}");
        }
        Ok(())
    }

    /// Ends the session to the maintenance database.
    pub async fn close(self) {
        let _ = self.admin.close().await;
    }

    async fn role(&mut self) -> String {
        sqlx::query_scalar::<_, String>("SELECT current_user::text")
            .fetch_one(&mut self.admin)
            .await
            .map_or_else(|_| "this role".to_owned(), |r| format!("role {r}"))
    }

    async fn sessions_on(&mut self, db: &str) -> Result<Vec<Session>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM pg_stat_activity a \
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid() ORDER BY a.pid"
        )))
        .bind(db)
        .fetch_all(&mut self.admin)
        .await?;
        Ok(Session::from_rows(&rows)?)
    }

    async fn exists(&mut self, name: &str) -> Result<bool> {
        exists(&mut self.admin, name).await
    }

    async fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        rename(&mut self.admin, from, to).await
    }

    async fn allow_connections(&mut self, db: &str, allow: bool) -> Result<()> {
        allow_connections(&mut self.admin, db, allow).await
    }

    async fn execute(&mut self, sql: String, what: &str) -> Result<()> {
        execute(&mut self.admin, sql, what).await
    }
}

/// What [`prepare_swap`] left in the restore copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Bytes of dump restored (0 when an earlier preparation of the point was found whole).
    pub archive_bytes: u64,
    /// The copy's counts, each equal to the point's.
    pub counts: BTreeMap<String, i64>,
}

/// What [`commit_swap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The prepared copy is the live database now.
    Swapped,
    /// An earlier execution had swapped it in.
    AlreadySwapped,
    /// An earlier execution died between the renames; this one finished the swap.
    FinishedInterrupted,
}

impl Committed {
    /// How an interrupted commit was completed; empty when this one swapped.
    pub fn resumed(self) -> &'static str {
        match self {
            Committed::Swapped => "",
            Committed::AlreadySwapped => "already swapped",
            Committed::FinishedInterrupted => "finished an interrupted swap",
        }
    }
}

/// Restores `point`'s dump into the swap's restore copy and checks the copy's counts against
/// the point's, changing nothing live (the live database goes on serving). `options` says how
/// to restore (its target is replaced by the copy's URL); `counts` what to count (empty: what
/// the point counted). A copy a finished preparation of this point left is kept; an unfinished
/// one is dropped and restored again. The copy is marked prepared last, for [`commit_swap`].
pub async fn prepare_swap(
    repo: &Repository,
    point: &PointId,
    swap: &mut DatabaseSwap,
    options: &PgRestoreOptions,
    counts: &[CountSpec],
) -> Result<Prepared> {
    let names = swap.names().clone();
    let stale_restore = match swap.state().await? {
        SwapState::Swapped | SwapState::Interrupted => bail!(
            "point {point} was already swapped in under this tag ({} holds the database it \
             replaced): there is nothing left to prepare",
            names.pre
        ),
        SwapState::NoLive => bail!(no_live(&names)),
        SwapState::Fresh { stale_restore } => stale_restore,
    };
    let at_point = repo.read_point(point).await?.table_counts().cloned();
    let target = swap.restore_url()?;
    let archive_bytes = if stale_restore && swap.prepared_for(point.as_str()).await? {
        0
    } else {
        swap.create_restore_target(stale_restore).await?;
        let mut options = options.clone();
        options.database_url = target.clone();
        options.create_database = false;
        restore_postgres(repo, point, &options).await?.archive_bytes
    };
    let specs = if counts.is_empty() {
        at_point
            .as_ref()
            .map(|c| CountSpec::for_keys(c.keys()))
            .unwrap_or_default()
    } else {
        counts.to_vec()
    };
    let mut conn = connect(&DbUrl::parse(&target)?, options.connect_timeout).await?;
    let found = count_rows(&mut conn, &specs)
        .await
        .with_context(|| format!("count the rows of the prepared copy {}", names.restore))?;
    let _ = conn.close().await;
    if let Some(at_point) = &at_point {
        let wrong: Vec<String> = at_point
            .iter()
            .filter(|(key, want)| found.get(*key).copied().unwrap_or(0) != **want)
            .map(|(key, want)| {
                format!(
                    "{key} has {} rows, the point {want}",
                    found.get(key).copied().unwrap_or(0)
                )
            })
            .collect();
        if !wrong.is_empty() {
            bail!(
                "the copy prepared in {} does not match point {point}: {}; nothing live was \
                 changed",
                names.restore,
                wrong.join(", ")
            );
        }
    }
    swap.mark_prepared(point.as_str()).await?;
    Ok(Prepared {
        archive_bytes,
        counts: found,
    })
}

/// Swaps the copy a finished [`prepare_swap`] of `point` left in for the live database (the
/// live one kept under the swap's pre name), or finishes or reports an earlier commit. Refuses,
/// changing nothing, when no finished preparation of the point is there.
pub async fn commit_swap(swap: &mut DatabaseSwap, point: &PointId) -> Result<Committed> {
    commit_swap_marked(swap, point.as_str(), &format!("point {point}")).await
}

/// [`commit_swap`] of a copy marked prepared with `mark` (a point id, or what a copy from
/// elsewhere was marked with: `copy::copy_into_swap`); `what` names it in messages.
pub async fn commit_swap_marked(
    swap: &mut DatabaseSwap,
    mark: &str,
    what: &str,
) -> Result<Committed> {
    let names = swap.names().clone();
    match swap.state().await? {
        SwapState::Swapped => {
            // Killed after its renames, the swap may have left the kept copy refusing
            // connections: people (and an undo) read it.
            if !allows_connections(&mut swap.admin, &names.pre).await? {
                swap.allow_connections(&names.pre, true).await?;
            }
            return Ok(Committed::AlreadySwapped);
        }
        SwapState::Interrupted => {
            swap.finish_interrupted().await?;
            return Ok(Committed::FinishedInterrupted);
        }
        SwapState::NoLive => bail!(no_live(&names)),
        SwapState::Fresh { .. } => {}
    }
    if !swap.prepared_for(mark).await? {
        bail!(
            "no finished preparation of {what} is in {}: prepare it first (a drill's \
             prepare-postgres; `rollcall run retry` runs it again); nothing live was changed",
            names.restore
        );
    }
    swap.swap().await?;
    Ok(Committed::Swapped)
}

/// What [`undo_swap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undone {
    /// The database the restore replaced is live again; the restored one is kept.
    Swapped,
    /// An earlier execution had undone it.
    AlreadyUndone,
    /// An earlier execution died between the renames; this one finished the undo.
    FinishedInterrupted,
    /// The restore had not swapped anything in (no `<db>_pre_<tag>`): there is nothing to undo.
    /// A restore swap interrupted between its renames is put back first.
    NothingSwapped,
}

impl Undone {
    /// How people read it.
    pub fn describe(self) -> &'static str {
        match self {
            Undone::Swapped => "undone",
            Undone::AlreadyUndone => "already undone",
            Undone::FinishedInterrupted => "finished an interrupted undo",
            Undone::NothingSwapped => "nothing to undo: the restore never swapped the database",
        }
    }
}

/// Puts the database a restore swap replaced back under the live name, keeping the restored
/// one as `<db>_undone_<tag>`, over a swap made by [`DatabaseSwap::connect_undo`]. The same
/// guarantees as the swap's: sessions it may not end are named before anything changes, any
/// failure leaves the live database under its name accepting connections, and a second
/// execution finishes or reports an earlier one. A restore swap of the tag that was itself
/// interrupted between its renames is put back the way it was (the restore never finished).
pub async fn undo_swap(swap: &mut DatabaseSwap) -> Result<Undone> {
    let Some(restore_names) = swap.undoes.clone() else {
        bail!("undo_swap needs a swap made by DatabaseSwap::connect_undo");
    };
    let names = swap.names().clone();
    // The restore's own swap, killed between its renames: its live database (kept as pre) gets
    // its name back, which is what undoing it means.
    if !swap.exists(&names.live).await?
        && swap.exists(&restore_names.pre).await?
        && swap.exists(&restore_names.restore).await?
        && !swap.exists(&names.pre).await?
    {
        reopen(&mut swap.admin, &restore_names).await?;
        return Ok(Undone::NothingSwapped);
    }
    let done = match swap.state().await? {
        SwapState::Swapped => Undone::AlreadyUndone,
        SwapState::Interrupted => {
            swap.finish_interrupted().await?;
            Undone::FinishedInterrupted
        }
        SwapState::NoLive => bail!(no_live(&names)),
        SwapState::Fresh {
            stale_restore: false,
        } => {
            // The restore's swap may have blocked the live database before it was killed.
            if swap.exists(&restore_names.restore).await?
                && !allows_connections(&mut swap.admin, &names.live).await?
            {
                swap.allow_connections(&names.live, true).await?;
            }
            return Ok(Undone::NothingSwapped);
        }
        SwapState::Fresh {
            stale_restore: true,
        } => {
            swap.swap().await?;
            Undone::Swapped
        }
    };
    // The kept database may have been left refusing connections; live now, it must not.
    if !allows_connections(&mut swap.admin, &names.live).await? {
        swap.allow_connections(&names.live, true).await?;
    }
    Ok(done)
}

fn no_live(names: &SwapNames) -> String {
    format!(
        "the live database {} does not exist (and no swap of this tag is under way); check \
         the database URL — refusing to guess",
        names.live
    )
}

/// What [`reopen_interrupted_swaps`] did to one swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reopened {
    /// The live database refused connections next to a restore copy: it accepts them again.
    Connections { database: String },
    /// The live database had been renamed to `pre` and the restored one not yet put in its
    /// place: the live one is back under its name, accepting connections.
    Rename { database: String, from: String },
}

impl std::fmt::Display for Reopened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reopened::Connections { database } => {
                write!(f, "{database} refused connections; it accepts them again")
            }
            Reopened::Rename { database, from } => write!(
                f,
                "{database} had been renamed to {from} and nothing took its place; it has its \
                 name back and accepts connections"
            ),
        }
    }
}

/// Puts right what a swap killed mid-way left behind on the server of `live_url`, so the live
/// database accepts connections again, without swapping anything in: a live database that
/// refuses connections while a `<db>_restore_<tag>` exists (or a `<db>_pre_<tag>` not yet
/// undone) is reopened, and a live database renamed to `<db>_pre_<tag>` whose restore copy
/// never took its place (or, by an undo, to `<db>_undone_<tag>` while `<db>_pre_<tag>` never
/// took its place) gets its name back. The database agent runs this when it starts; a swap
/// re-sent later starts over from there.
pub async fn reopen_interrupted_swaps(live_url: &str, timeout: Duration) -> Result<Vec<Reopened>> {
    let live = DbUrl::parse(live_url)?;
    let mut admin = maintenance(&live, timeout).await?;
    let mut done = Vec::new();
    let db = live.database.clone();
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1) ORDER BY datname",
    )
    .bind(format!("{db}_"))
    .fetch_all(&mut admin)
    .await
    .context("list the databases of interrupted swaps")?;
    let tags = |kind: &str| -> Vec<String> {
        let prefix = format!("{db}_{kind}_");
        names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    };
    let (restores, pres, undones) = (tags("restore"), tags("pre"), tags("undone"));
    // A swap may be under way while a restore copy waits, or (an undo) while a kept database
    // has not been put back yet.
    let swap_possible = !restores.is_empty() || pres.iter().any(|t| !undones.contains(t));
    let live_exists = exists(&mut admin, &db).await?;
    if live_exists {
        if swap_possible && !allows_connections(&mut admin, &db).await? {
            allow_connections(&mut admin, &db, true).await?;
            done.push(Reopened::Connections { database: db });
        }
    } else {
        // The live database renamed away and nothing in its place: a restore's swap (kept as
        // `_pre_`, beside its restore copy) or an undo's (kept as `_undone_`, beside `_pre_`).
        let mut candidates = Vec::new();
        for tag in &pres {
            if restores.contains(tag) {
                candidates.push(SwapNames::new(live_url, tag)?);
            }
            if undones.contains(tag) {
                candidates.push(SwapNames::undo(live_url, tag)?);
            }
        }
        match &candidates[..] {
            [names] => {
                reopen(&mut admin, names).await?;
                done.push(Reopened::Rename {
                    database: names.live.clone(),
                    from: names.pre.clone(),
                });
            }
            [] => {}
            several => tracing::warn!(
                database = %db,
                "the live database is missing and several interrupted swaps could have renamed \
                 it ({}); rename the right one back by hand",
                several.iter().map(|n| n.pre.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    let _ = admin.close().await;
    Ok(done)
}

/// After a failed swap: the live database under its own name, accepting connections.
async fn reopen(admin: &mut PgConnection, names: &SwapNames) -> Result<()> {
    if !exists(admin, &names.live).await? && exists(admin, &names.pre).await? {
        rename(admin, &names.pre, &names.live).await?;
    }
    allow_connections(admin, &names.live, true).await
}

pub(super) async fn maintenance(live: &DbUrl, timeout: Duration) -> Result<PgConnection> {
    let mut maintenance = live.clone();
    maintenance.full = with_database(&live.full, "postgres")?;
    connect(&maintenance, timeout).await.with_context(|| {
        format!(
            "connect to the maintenance database of {} (restoring needs a role that may \
             create, rename and disconnect databases: the database's owner with CREATEDB)",
            live.display
        )
    })
}

pub(super) async fn exists(conn: &mut PgConnection, name: &str) -> Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
        .context("query pg_database")
}

async fn allows_connections(conn: &mut PgConnection, name: &str) -> Result<bool> {
    sqlx::query_scalar("SELECT datallowconn FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(conn)
        .await
        .with_context(|| format!("read whether {name} accepts connections"))
}

async fn rename(conn: &mut PgConnection, from: &str, to: &str) -> Result<()> {
    execute(
        conn,
        format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(from),
            quote_ident(to)
        ),
        &format!("rename database {from} to {to}"),
    )
    .await
}

async fn allow_connections(conn: &mut PgConnection, db: &str, allow: bool) -> Result<()> {
    execute(
        conn,
        format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
            quote_ident(db)
        ),
        &format!("set ALLOW_CONNECTIONS {allow} on {db}"),
    )
    .await
}

async fn execute(conn: &mut PgConnection, sql: String, what: &str) -> Result<()> {
    sqlx::query(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .with_context(|| what.to_owned())?;
    Ok(())
}

/// What a finished preparation leaves as the restore copy's comment.
fn prepared_mark(point: &str) -> String {
    format!("rollcall: prepared point {point}")
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub(super) fn list(sessions: &[Session]) -> String {
    sessions
        .iter()
        .map(Session::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_come_from_the_url_and_fit_postgres() {
        let names =
            SwapNames::new("postgres://u:p@h:5432/cowork?sslmode=disable", "r1a2b3c4d").unwrap();
        assert_eq!(
            names,
            SwapNames {
                live: "cowork".into(),
                restore: "cowork_restore_r1a2b3c4d".into(),
                pre: "cowork_pre_r1a2b3c4d".into(),
            }
        );
        let err = SwapNames::new("postgres://u:secret@h:5432/", "r1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("names no database") && !err.contains("secret"),
            "{err}"
        );
        let long = format!("postgres://h/{}", "d".repeat(50));
        let err = SwapNames::new(&long, "r1a2b3c4d").unwrap_err().to_string();
        assert!(err.contains("too long"), "{err}");
    }

    #[test]
    fn sessions_read_as_people_name_them() {
        let client = Session {
            pid: 4242,
            user: "postgres".into(),
            application: "psql".into(),
            backend_type: "client backend".into(),
        };
        assert_eq!(
            client.to_string(),
            "pid 4242 (postgres, application \"psql\")"
        );
        let worker = Session {
            pid: 7,
            user: String::new(),
            application: String::new(),
            backend_type: "autovacuum worker".into(),
        };
        assert_eq!(worker.to_string(), "pid 7 (no role, autovacuum worker)");
        assert!(worker.is_autovacuum() && !client.is_autovacuum());
        // What a role without pg_read_all_stats sees of the same worker.
        let hidden = Session {
            backend_type: String::new(),
            ..worker
        };
        assert!(hidden.is_autovacuum());
        let hidden_client = Session {
            backend_type: String::new(),
            ..client
        };
        assert!(!hidden_client.is_autovacuum(), "a role is named");
    }
}
