//! The databases restores and undos kept (`<db>_pre_<tag>`, `<db>_undone_<tag>`; see
//! [`super::swap`]) and the copies restores prepared but never swapped in (`<db>_restore_<tag>`:
//! a run aborted, or blocked, after `prepare-postgres`): listing them with their sizes, and
//! dropping one an operator's prune chose.
//!
//! Which copies may go is the coordinator's decision (it has the journal); this side only
//! refuses what is never safe on the server itself: a name that is not a kept copy of the live
//! database, any drop while the live database is missing or a swap of the tag may be under way,
//! and a database with sessions (named). `DROP DATABASE` without `FORCE` also refuses on its
//! own if a session arrives in between.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

use super::catalog::quote_ident;
use super::conn::DbUrl;
use super::swap::{Session, exists, maintenance};
use crate::layout::is_run_tag;

/// What a kept database holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeptKind {
    /// `<db>_pre_<tag>`: the live database restore `<tag>` replaced.
    Pre,
    /// `<db>_undone_<tag>`: the restored database an undo of restore `<tag>` replaced.
    Undone,
    /// `<db>_restore_<tag>`: the point restore `<tag>` prepared (or began to) and never swapped
    /// in. It holds nothing the repository's point does not.
    Prepared,
    /// `DIR.pre_<tag>`: the data directory a restore to a time replaced (its name is the whole
    /// path; see `physical::kept`).
    DataDirPre,
    /// `DIR.restore_<tag>` (or its partial build): a data directory restore `<tag>` recovered
    /// to a time, or began to, and never swapped in.
    DataDirPrepared,
}

impl KeptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeptKind::Pre => "pre",
            KeptKind::Undone => "undone",
            KeptKind::Prepared => "prepared",
            KeptKind::DataDirPre => "data_dir_pre",
            KeptKind::DataDirPrepared => "data_dir_prepared",
        }
    }
}

/// One kept database on the live database's server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptDatabase {
    pub name: String,
    pub kind: KeptKind,
    /// The run tag in its name (`r` + 8 hex digits): the restore it belongs to.
    pub tag: String,
    /// `pg_database_size`.
    pub bytes: u64,
    /// Sessions connected to it when it was listed.
    pub sessions: u32,
}

/// The kind and tag of `name` when it is a kept copy of database `live`
/// (`<live>_pre_<tag>`, `<live>_undone_<tag>` or `<live>_restore_<tag>` with a run tag), else
/// None.
pub fn kept_name(live: &str, name: &str) -> Option<(KeptKind, String)> {
    let rest = name.strip_prefix(live)?.strip_prefix('_')?;
    let (kind, tag) = if let Some(tag) = rest.strip_prefix("pre_") {
        (KeptKind::Pre, tag)
    } else if let Some(tag) = rest.strip_prefix("undone_") {
        (KeptKind::Undone, tag)
    } else if let Some(tag) = rest.strip_prefix("restore_") {
        (KeptKind::Prepared, tag)
    } else {
        return None;
    };
    is_run_tag(tag).then(|| (kind, tag.to_owned()))
}

/// The live database's name and the databases restores and undos kept beside it, by name.
pub async fn list_kept_databases(
    live_url: &str,
    timeout: Duration,
) -> Result<(String, Vec<KeptDatabase>)> {
    let live = DbUrl::parse(live_url)?;
    let mut admin = maintenance(&live, timeout).await?;
    let listed = list(&mut admin, &live.database).await;
    let _ = admin.close().await;
    Ok((live.database, listed?))
}

async fn list(admin: &mut PgConnection, live: &str) -> Result<Vec<KeptDatabase>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT d.datname::text, pg_database_size(d.oid), \
                (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid \
                   AND a.backend_type IS DISTINCT FROM 'autovacuum worker') \
         FROM pg_database d WHERE starts_with(d.datname, $1) ORDER BY d.datname",
    )
    .bind(format!("{live}_"))
    .fetch_all(&mut *admin)
    .await
    .context("list the kept databases and their sizes")?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, bytes, sessions)| {
            let (kind, tag) = kept_name(live, &name)?;
            Some(KeptDatabase {
                name,
                kind,
                tag,
                bytes: u64::try_from(bytes).unwrap_or(0),
                sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
            })
        })
        .collect())
}

/// Drops the kept database `name` of the live database of `live_url` (see the module doc for
/// what it refuses). A database already gone is not an error: a prune re-sent finds it gone.
/// Returns false when there was nothing to drop.
pub async fn drop_kept_database(live_url: &str, name: &str, timeout: Duration) -> Result<bool> {
    let live = DbUrl::parse(live_url)?;
    let Some((kind, tag)) = kept_name(&live.database, name) else {
        bail!(
            "{name:?} is not a kept copy of database {} (<db>_pre_<tag>, <db>_undone_<tag> or \
             <db>_restore_<tag>); refusing to drop it — `rollcall kept list` names the copies",
            live.database
        );
    };
    let mut admin = maintenance(&live, timeout).await?;
    let dropped = drop_checked(&mut admin, &live.database, name, kind, &tag).await;
    let _ = admin.close().await;
    dropped
}

async fn drop_checked(
    admin: &mut PgConnection,
    live: &str,
    name: &str,
    kind: KeptKind,
    tag: &str,
) -> Result<bool> {
    if !exists(admin, name).await? {
        return Ok(false);
    }
    if !exists(admin, live).await? {
        bail!(
            "the live database {live} does not exist: a swap may have been interrupted and \
             {name} may be the data to put back; nothing dropped (the database agent reopens \
             interrupted swaps when it starts)"
        );
    }
    // The other database of the tag's swap: while both exist, a swap of the tag may be under
    // way (or was interrupted), and either may be what it puts back.
    let other = match kind {
        KeptKind::Prepared => format!("{live}_pre_{tag}"),
        KeptKind::Pre | KeptKind::Undone => format!("{live}_restore_{tag}"),
        KeptKind::DataDirPre | KeptKind::DataDirPrepared => {
            bail!("{name} is a kept data directory, not a database: refused")
        }
    };
    if exists(admin, &other).await? {
        bail!(
            "{other} exists: a swap of {tag} may be under way; {name} is not dropped while it \
             does"
        );
    }
    let rows: Vec<(i32, String, String, String)> = sqlx::query_as(
        "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''), \
                coalesce(backend_type, '') \
         FROM pg_stat_activity WHERE datname = $1 ORDER BY pid",
    )
    .bind(name)
    .fetch_all(&mut *admin)
    .await
    .with_context(|| format!("list the sessions on {name}"))?;
    // DROP DATABASE ends autovacuum workers itself.
    let sessions: Vec<Session> = rows
        .into_iter()
        .map(|(pid, user, application, backend_type)| Session {
            pid,
            user,
            application,
            backend_type,
        })
        .filter(|s| !s.is_autovacuum())
        .collect();
    if !sessions.is_empty() {
        bail!(
            "{name} has {} session(s) right now ({}): someone is using it; end them or wait, \
             then prune again",
            sessions.len(),
            sessions
                .iter()
                .map(Session::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {}",
        quote_ident(name)
    )))
    .execute(&mut *admin)
    .await
    .with_context(|| format!("drop database {name}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kept_copies_of_the_live_database_are_named_kept() {
        assert_eq!(
            kept_name("cowork", "cowork_pre_r1a2b3c4d"),
            Some((KeptKind::Pre, "r1a2b3c4d".into()))
        );
        assert_eq!(
            kept_name("cowork", "cowork_undone_r1a2b3c4d"),
            Some((KeptKind::Undone, "r1a2b3c4d".into()))
        );
        assert_eq!(
            kept_name("cowork", "cowork_restore_r1a2b3c4d"),
            Some((KeptKind::Prepared, "r1a2b3c4d".into()))
        );
        for other in [
            "cowork",
            "cowork_restore_r1a2b3c4",
            "cowork_pre_r1a2b3c4",
            "cowork_pre_r1a2b3c4dz",
            "cowork_pre_R1A2B3C4D",
            "coworkx_pre_r1a2b3c4d",
            "cowork2_pre_r1a2b3c4d",
            "other_pre_r1a2b3c4d",
            "cowork_pre_",
        ] {
            assert_eq!(kept_name("cowork", other), None, "{other}");
        }
    }
}
