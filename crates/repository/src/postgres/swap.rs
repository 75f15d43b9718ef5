//! Swapping a restored database in for the live one without destroying either: the restore
//! goes into `<db>_restore_<tag>`, then two renames make the live database `<db>_pre_<tag>`
//! (kept, never dropped) and the restored one the live name.
//!
//! Every step is idempotent by what exists: [`DatabaseSwap::state`] tells a finished swap, one
//! interrupted between its renames, and a fresh start apart from which of the three databases
//! exist, so an agent that died at any point finishes the swap instead of redoing or losing it.
//! Only an incomplete `_restore_` copy of the same tag is ever dropped.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection as _};

use super::catalog::quote_ident;
use super::conn::{DbUrl, connect, with_database};

/// Postgres truncates identifiers longer than this many bytes.
const MAX_IDENTIFIER: usize = 63;
/// How long to keep ending sessions before a rename of the live database gives up.
const RENAME_ATTEMPTS: u32 = 20;
const RENAME_PAUSE: Duration = Duration::from_millis(100);

/// The three databases of one swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapNames {
    /// The live database, as the URL names it.
    pub live: String,
    /// Where the point is restored before the swap.
    pub restore: String,
    /// Where the live database is kept after the swap.
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

/// One swap, over a connection to the server's maintenance database.
pub struct DatabaseSwap {
    live_url: DbUrl,
    names: SwapNames,
    admin: PgConnection,
}

impl DatabaseSwap {
    /// Connects to the maintenance database (`postgres`) of the server `live_url` names.
    pub async fn connect(live_url: &str, tag: &str, timeout: Duration) -> Result<DatabaseSwap> {
        let names = SwapNames::new(live_url, tag)?;
        let live = DbUrl::parse(live_url)?;
        let mut maintenance = live.clone();
        maintenance.full = with_database(live_url, "postgres")?;
        let admin = connect(&maintenance, timeout).await.with_context(|| {
            format!(
                "connect to the maintenance database of {} (restoring needs a role that may \
                 create, rename and disconnect databases)",
                live.display
            )
        })?;
        Ok(DatabaseSwap {
            live_url: live,
            names,
            admin,
        })
    }

    pub fn names(&self) -> &SwapNames {
        &self.names
    }

    /// Which of the swap's databases exist.
    pub async fn state(&mut self) -> Result<SwapState> {
        let live = self.exists(&self.names.live.clone()).await?;
        let pre = self.exists(&self.names.pre.clone()).await?;
        let restore = self.exists(&self.names.restore.clone()).await?;
        Ok(match (live, pre, restore) {
            (true, true, false) => SwapState::Swapped,
            (false, true, true) => SwapState::Interrupted,
            (false, _, _) => SwapState::NoLive,
            (true, _, stale_restore) => SwapState::Fresh { stale_restore },
        })
    }

    /// Finishes a swap interrupted between its renames: the restore copy takes the live name.
    pub async fn finish_interrupted(&mut self) -> Result<()> {
        let (restore, live, pre) = (
            self.names.restore.clone(),
            self.names.live.clone(),
            self.names.pre.clone(),
        );
        self.rename(&restore, &live).await?;
        self.allow_connections(&pre, true).await
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

    /// The swap itself: no new sessions on the live database, end the current ones, rename
    /// the live database to the kept name and the restored one to the live name.
    pub async fn swap(&mut self) -> Result<()> {
        let (live, pre, restore) = (
            self.names.live.clone(),
            self.names.pre.clone(),
            self.names.restore.clone(),
        );
        self.allow_connections(&live, false).await?;
        let mut attempts = 0;
        loop {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&live)
            .execute(&mut self.admin)
            .await
            .context("disconnect sessions from the live database")?;
            match self.rename(&live, &pre).await {
                Ok(()) => break,
                Err(e) if attempts < RENAME_ATTEMPTS => {
                    attempts += 1;
                    tracing::debug!("rename not yet possible: {e:#}");
                    tokio::time::sleep(RENAME_PAUSE).await;
                }
                Err(e) => {
                    self.allow_connections(&live, true).await?;
                    return Err(e);
                }
            }
        }
        self.rename(&restore, &live).await?;
        self.allow_connections(&pre, true).await
    }

    /// Ends the session to the maintenance database.
    pub async fn close(self) {
        let _ = self.admin.close().await;
    }

    async fn exists(&mut self, name: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut self.admin)
            .await
            .context("query pg_database")
    }

    async fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        self.execute(
            format!(
                "ALTER DATABASE {} RENAME TO {}",
                quote_ident(from),
                quote_ident(to)
            ),
            &format!("rename database {from} to {to}"),
        )
        .await
    }

    async fn allow_connections(&mut self, db: &str, allow: bool) -> Result<()> {
        self.execute(
            format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
                quote_ident(db)
            ),
            &format!("set ALLOW_CONNECTIONS {allow} on {db}"),
        )
        .await
    }

    async fn execute(&mut self, sql: String, what: &str) -> Result<()> {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut self.admin)
            .await
            .with_context(|| what.to_owned())?;
        Ok(())
    }
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
}
