//! The database swap against a throwaway cluster, run as the application's owner role (not a
//! superuser, with CREATEDB): a whole backup → restore → swap as that role, and the failures
//! that must never leave the live database refusing connections — a superuser's session it may
//! not end, a second rename that fails, and a swap killed after blocking or after its first
//! rename; and the undo of a swap, as that role, with the same guarantees. Also the freeze at
//! the database for services without a maintenance mode: held across a swap, thawed, and
//! refused without changing anything when it could not hold.

mod common;

use std::time::Duration;

use common::*;
use ephemeral_pg::Cluster;
use repository::*;
use sqlx::Connection;

const OWNER: &str = "app_owner";
const TAG: &str = "r0a1b2c3d";
const CONNECT: Duration = Duration::from_secs(10);

/// A cluster with `live` owned by a non-superuser role with CREATEDB, one row in `notes`.
fn owned_cluster() -> Cluster {
    owned_cluster_with(&[])
}

/// `owned_cluster` with extra server settings.
fn owned_cluster_with(settings: &[(&str, &str)]) -> Cluster {
    let cluster = Cluster::start_with(ephemeral_pg::Options {
        settings: settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    })
    .expect("start a throwaway Postgres");
    for sql in [
        format!("CREATE ROLE {OWNER} LOGIN CREATEDB"),
        format!("CREATE DATABASE live OWNER {OWNER}"),
    ] {
        cluster
            .psql("postgres", &sql)
            .expect("create the owner and its database");
    }
    cluster
        .psql(
            "live",
            &format!(
                "SET ROLE {OWNER}; CREATE TABLE notes (id int PRIMARY KEY, body text); \
                 INSERT INTO notes VALUES (1, 'before the restore')"
            ),
        )
        .expect("write the live rows");
    cluster
}

/// `database` as the owner role sees it.
fn as_owner(cluster: &Cluster, database: &str) -> String {
    cluster
        .url(database)
        .replacen("postgres@", &format!("{OWNER}@"), 1)
}

fn exists(cluster: &Cluster, database: &str) -> bool {
    cluster
        .psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'"),
        )
        .expect("query pg_database")
        .trim()
        == "1"
}

/// The live database is there under its name, accepts the owner's connections, and holds
/// `rows` notes.
async fn live_and_open(cluster: &Cluster, rows: i64) {
    assert_eq!(
        cluster
            .psql(
                "postgres",
                "SELECT datallowconn FROM pg_database WHERE datname = 'live'"
            )
            .expect("read datallowconn")
            .trim(),
        "t",
        "the live database accepts connections"
    );
    let mut conn = sqlx::PgConnection::connect(&as_owner(cluster, "live"))
        .await
        .expect("the owner connects to the live database");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut conn)
        .await
        .expect("count notes");
    assert_eq!(n, rows);
    conn.close().await.expect("close");
}

/// A prepared swap: the restore copy exists, created by the swap, with two notes.
async fn prepared(cluster: &Cluster) -> DatabaseSwap {
    let mut swap = DatabaseSwap::connect(&as_owner(cluster, "live"), TAG, CONNECT)
        .await
        .expect("connect as the owner")
        .sessions_gone_within(Duration::from_secs(3));
    assert_eq!(
        swap.state().await.expect("read the swap state"),
        SwapState::Fresh {
            stale_restore: false
        }
    );
    let target = swap
        .create_restore_target(false)
        .await
        .expect("create target");
    let mut conn = sqlx::PgConnection::connect(&target).await.expect("target");
    sqlx::raw_sql(
        "CREATE TABLE notes (id int PRIMARY KEY, body text); \
         INSERT INTO notes VALUES (1, 'restored'), (2, 'restored')",
    )
    .execute(&mut conn)
    .await
    .expect("fill the restore copy");
    conn.close().await.expect("close");
    swap
}

/// Waits until no session matching `filter` (a condition on `pg_stat_activity`) is left: a
/// server process exits a moment after its client closed.
async fn backends_gone(cluster: &Cluster, filter: &str) {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE {filter}");
    ephemeral_pg::eventually(
        "the closed sessions' backends to exit",
        Duration::from_secs(10),
        async || {
            let n = cluster.psql("postgres", &sql).ok()?;
            (n.trim() == "0").then_some(())
        },
    )
    .await;
}

/// A superuser's session on `database`, named `holdout`, held until dropped.
async fn superuser_session(cluster: &Cluster, database: &str) -> (sqlx::PgConnection, i32) {
    let mut conn = sqlx::PgConnection::connect(&format!(
        "{}?application_name=holdout",
        cluster.url(database)
    ))
    .await
    .expect("a superuser connects");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("pid");
    (conn, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_role_backs_up_restores_and_swaps() {
    let cluster = owned_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = file_repo(&dir.path().join("repo")).await;
    let id = PointId::new("test", chrono::Utc::now()).expect("point id");
    let mut backup = PgBackupOptions::new(id.clone(), as_owner(&cluster, "live"));
    backup.bin_dir = Some(cluster.bin_dir().to_path_buf());
    backup.counts = CountSelection::Listed(vec![CountSpec::table("notes")]);
    let part = backup_postgres(&repo, &backup)
        .await
        .expect("back up as the owner");
    write_pg_point(&repo, &id, &part).await;
    cluster
        .psql("live", "INSERT INTO notes VALUES (2, 'after the point')")
        .expect("write after the point");

    let mut swap = DatabaseSwap::connect(&as_owner(&cluster, "live"), TAG, CONNECT)
        .await
        .expect("connect as the owner");
    let target = swap.create_restore_target(false).await.expect("target");
    let mut restore = PgRestoreOptions::new(target);
    restore.bin_dir = Some(cluster.bin_dir().to_path_buf());
    restore_postgres(&repo, &id, &restore)
        .await
        .expect("restore as the owner");
    swap.swap().await.expect("swap as the owner");
    assert_eq!(
        swap.state().await.expect("read the swap state"),
        SwapState::Swapped
    );
    swap.close().await;
    live_and_open(&cluster, 1).await;
    assert_eq!(
        cluster
            .psql(&format!("live_pre_{TAG}"), "SELECT count(*) FROM notes")
            .expect("the kept database opens")
            .trim(),
        "2",
        "the database the restore replaced is kept whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_it_may_not_end_is_named_and_nothing_changes() {
    let cluster = owned_cluster();
    let mut swap = prepared(&cluster).await;
    let (holdout, pid) = superuser_session(&cluster, "live").await;
    let in_the_way = swap.sessions_it_may_not_end().await.expect("list sessions");
    assert!(
        in_the_way
            .iter()
            .any(|s| s.pid == pid && s.user == "postgres"),
        "{in_the_way:?}"
    );

    let err = format!(
        "{:#}",
        swap.swap().await.expect_err("a superuser is in the way")
    );
    assert!(
        err.contains(&format!("pid {pid} (postgres, application \"holdout\")"))
            && err.contains(&format!("role {OWNER} may not end"))
            && err.contains("nothing was changed"),
        "{err}"
    );
    live_and_open(&cluster, 1).await;
    assert!(!exists(&cluster, &format!("live_pre_{TAG}")));
    assert!(
        exists(&cluster, &format!("live_restore_{TAG}")),
        "the prepared copy stays"
    );

    // Once the session is gone, the same swap goes through.
    holdout.close().await.expect("close the holdout");
    backends_gone(&cluster, "application_name = 'holdout'").await;
    swap.swap().await.expect("swap once the session is gone");
    swap.close().await;
    live_and_open(&cluster, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_second_rename_puts_the_live_database_back() {
    let cluster = owned_cluster();
    let mut swap = prepared(&cluster).await;
    // Holding the restore copy open makes renaming it fail after the live database was renamed.
    let (holdout, _) = superuser_session(&cluster, &format!("live_restore_{TAG}")).await;
    let err = format!(
        "{:#}",
        swap.swap().await.expect_err("the second rename fails")
    );
    assert!(
        err.contains("the live database live is unchanged and accepts connections again")
            && err.contains(&format!("rename database live_restore_{TAG} to live")),
        "{err}"
    );
    live_and_open(&cluster, 1).await;
    assert!(!exists(&cluster, &format!("live_pre_{TAG}")));
    holdout.close().await.expect("close the holdout");
    backends_gone(&cluster, "application_name = 'holdout'").await;
    swap.swap().await.expect("swap once the copy is free");
    swap.close().await;
    live_and_open(&cluster, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_killed_midway_leaves_nothing_closed() {
    let cluster = owned_cluster();
    let pre = format!("live_pre_{TAG}");

    // Killed after blocking connections: the next swap of the tag reopens the live database.
    prepared(&cluster).await.close().await;
    cluster
        .psql("postgres", "ALTER DATABASE live ALLOW_CONNECTIONS false")
        .expect("block as the killed swap did");
    let mut again = DatabaseSwap::connect(&as_owner(&cluster, "live"), TAG, CONNECT)
        .await
        .expect("connect");
    assert_eq!(
        again.state().await.expect("read the swap state"),
        SwapState::Fresh {
            stale_restore: true
        }
    );
    again.close().await;
    live_and_open(&cluster, 1).await;

    // Killed after blocking, found when the agent starts.
    cluster
        .psql("postgres", "ALTER DATABASE live ALLOW_CONNECTIONS false")
        .expect("block again");
    let reopened = reopen_interrupted_swaps(&as_owner(&cluster, "live"), CONNECT)
        .await
        .expect("reopen");
    assert_eq!(
        reopened,
        [Reopened::Connections {
            database: "live".into()
        }]
    );
    live_and_open(&cluster, 1).await;

    // Killed after the first rename: the live database gets its name back, connections open.
    for sql in [
        "ALTER DATABASE live ALLOW_CONNECTIONS false".to_owned(),
        format!("ALTER DATABASE live RENAME TO {pre}"),
    ] {
        cluster
            .psql("postgres", &sql)
            .expect("rename as the killed swap did");
    }
    let reopened = reopen_interrupted_swaps(&as_owner(&cluster, "live"), CONNECT)
        .await
        .expect("reopen");
    assert_eq!(
        reopened,
        [Reopened::Rename {
            database: "live".into(),
            from: pre.clone()
        }]
    );
    live_and_open(&cluster, 1).await;
    assert!(!exists(&cluster, &pre));
    // Nothing left to put right.
    assert_eq!(
        reopen_interrupted_swaps(&as_owner(&cluster, "live"), CONNECT)
            .await
            .expect("reopen"),
        []
    );
}

/// An autovacuum worker busy on the live database (it runs as no role, so the owner may not
/// end it) does not fail the swap: the rename waits for it (Postgres cancels autovacuum for a
/// rename), and the live database ends up swapped and accepting connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_autovacuum_worker_does_not_fail_the_swap() {
    let cluster = owned_cluster_with(&[
        ("autovacuum_naptime", "1"),
        // Crawl, so the worker is still busy when the swap comes.
        ("autovacuum_vacuum_cost_delay", "100"),
        ("autovacuum_vacuum_cost_limit", "1"),
    ]);
    cluster
        .psql(
            "live",
            &format!(
                "SET ROLE {OWNER}; \
                 CREATE TABLE churn (id int, pad text) WITH (autovacuum_vacuum_threshold = 0, \
                 autovacuum_vacuum_scale_factor = 0); \
                 INSERT INTO churn SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g; \
                 DELETE FROM churn;"
            ),
        )
        .expect("leave many dead rows");
    ephemeral_pg::eventually(
        "an autovacuum worker on the live database",
        Duration::from_secs(30),
        async || {
            let n = cluster
                .psql(
                    "postgres",
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = 'live' AND backend_type = 'autovacuum worker'",
                )
                .ok()?;
            (n.trim() != "0").then_some(())
        },
    )
    .await;
    let mut swap = prepared(&cluster).await;
    swap.swap()
        .await
        .expect("the swap waits out the autovacuum worker");
    assert_eq!(
        swap.state().await.expect("read the swap state"),
        SwapState::Swapped
    );
    swap.close().await;
    live_and_open(&cluster, 2).await;
    assert!(exists(&cluster, &format!("live_pre_{TAG}")));
}

/// A swapped-in restore, as a finished commit leaves it: `live` holds the two restored notes,
/// `live_pre_<TAG>` the one from before.
async fn swapped(cluster: &Cluster) {
    let mut swap = prepared(cluster).await;
    swap.swap().await.expect("swap");
    swap.close().await;
    live_and_open(cluster, 2).await;
}

async fn undo(cluster: &Cluster) -> DatabaseSwap {
    DatabaseSwap::connect_undo(&as_owner(cluster, "live"), TAG, CONNECT)
        .await
        .expect("connect as the owner")
        .sessions_gone_within(Duration::from_secs(3))
}

fn notes(cluster: &Cluster, database: &str) -> String {
    cluster
        .psql(
            database,
            "SELECT string_agg(body, ',' ORDER BY id) FROM notes",
        )
        .expect("read notes")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_role_undoes_a_swap_and_keeps_the_restored_database() {
    let cluster = owned_cluster();
    let (pre, undone) = (format!("live_pre_{TAG}"), format!("live_undone_{TAG}"));
    // Nothing swapped yet: nothing to undo, nothing changes.
    let mut nothing = undo(&cluster).await;
    assert_eq!(
        undo_swap(&mut nothing).await.expect("undo"),
        Undone::NothingSwapped
    );
    nothing.close().await;
    live_and_open(&cluster, 1).await;
    assert!(!exists(&cluster, &undone));

    swapped(&cluster).await;
    // A write after the restore (after the unfreeze): it stays in the kept copy.
    cluster
        .psql("live", "INSERT INTO notes VALUES (3, 'after the unfreeze')")
        .expect("write after the restore");
    let mut swap = undo(&cluster).await;
    assert_eq!(
        swap.names(),
        &SwapNames {
            live: "live".into(),
            restore: pre.clone(),
            pre: undone.clone(),
        }
    );
    assert_eq!(undo_swap(&mut swap).await.expect("undo"), Undone::Swapped);
    assert_eq!(
        undo_swap(&mut swap).await.expect("undo again"),
        Undone::AlreadyUndone
    );
    swap.close().await;
    live_and_open(&cluster, 1).await;
    assert_eq!(notes(&cluster, "live"), "before the restore");
    assert_eq!(
        notes(&cluster, &undone),
        "restored,restored,after the unfreeze",
        "the restored database is kept whole, with what was written since"
    );
    assert!(!exists(&cluster, &pre));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_that_may_not_end_a_session_names_it_and_changes_nothing() {
    let cluster = owned_cluster();
    swapped(&cluster).await;
    let (holdout, pid) = superuser_session(&cluster, "live").await;
    let mut swap = undo(&cluster).await;
    let err = format!(
        "{:#}",
        undo_swap(&mut swap)
            .await
            .expect_err("a superuser is in the way")
    );
    assert!(
        err.contains(&format!("pid {pid} (postgres")) && err.contains("nothing was changed"),
        "{err}"
    );
    live_and_open(&cluster, 2).await;
    holdout.close().await.expect("close the holdout");
    backends_gone(&cluster, "application_name = 'holdout'").await;
    assert_eq!(undo_swap(&mut swap).await.expect("undo"), Undone::Swapped);
    swap.close().await;
    live_and_open(&cluster, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_killed_midway_leaves_the_live_database_open_and_a_second_one_finishes() {
    let cluster = owned_cluster();
    let (pre, undone) = (format!("live_pre_{TAG}"), format!("live_undone_{TAG}"));
    swapped(&cluster).await;
    let owner = as_owner(&cluster, "live");

    // Killed after blocking connections: found when the agent starts.
    cluster
        .psql("postgres", "ALTER DATABASE live ALLOW_CONNECTIONS false")
        .expect("block as the killed undo did");
    assert_eq!(
        reopen_interrupted_swaps(&owner, CONNECT)
            .await
            .expect("reopen"),
        [Reopened::Connections {
            database: "live".into()
        }]
    );
    live_and_open(&cluster, 2).await;

    // Killed after blocking, found by the next attempt, which finishes the undo.
    cluster
        .psql("postgres", "ALTER DATABASE live ALLOW_CONNECTIONS false")
        .expect("block again");
    let mut again = undo(&cluster).await;
    assert_eq!(undo_swap(&mut again).await.expect("undo"), Undone::Swapped);
    again.close().await;
    live_and_open(&cluster, 1).await;

    // Back to swapped, for the renames (a second restore of another tag would do the same).
    for sql in [
        format!("ALTER DATABASE live RENAME TO {pre}"),
        format!("ALTER DATABASE {undone} RENAME TO live"),
    ] {
        cluster.psql("postgres", &sql).expect("swap back");
    }
    live_and_open(&cluster, 2).await;

    // Killed after the first rename: the agent's start puts the live database back.
    for sql in [
        "ALTER DATABASE live ALLOW_CONNECTIONS false".to_owned(),
        format!("ALTER DATABASE live RENAME TO {undone}"),
    ] {
        cluster
            .psql("postgres", &sql)
            .expect("rename as the killed undo did");
    }
    assert_eq!(
        reopen_interrupted_swaps(&owner, CONNECT)
            .await
            .expect("reopen"),
        [Reopened::Rename {
            database: "live".into(),
            from: undone.clone()
        }]
    );
    live_and_open(&cluster, 2).await;

    // Killed after the first rename, and the agent was not restarted: the next attempt
    // finishes the undo from there.
    for sql in [
        "ALTER DATABASE live ALLOW_CONNECTIONS false".to_owned(),
        format!("ALTER DATABASE live RENAME TO {undone}"),
    ] {
        cluster.psql("postgres", &sql).expect("rename again");
    }
    let mut last = undo(&cluster).await;
    assert_eq!(
        undo_swap(&mut last).await.expect("finish the undo"),
        Undone::FinishedInterrupted
    );
    last.close().await;
    live_and_open(&cluster, 1).await;
    assert_eq!(
        cluster
            .psql(
                "postgres",
                &format!("SELECT datallowconn FROM pg_database WHERE datname = '{undone}'")
            )
            .expect("read datallowconn")
            .trim(),
        "t",
        "the kept copy opens too"
    );
    assert!(!exists(&cluster, &pre));
    assert_eq!(
        reopen_interrupted_swaps(&owner, CONNECT)
            .await
            .expect("reopen"),
        []
    );
}

/// A session of the owner role on `database` named `application`.
async fn owner_session(cluster: &Cluster, database: &str, application: &str) -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&format!(
        "{}?application_name={application}",
        as_owner(cluster, database)
    ))
    .await
    .expect("the owner connects")
}

/// Whether a write through `conn` is refused as a write in a read-only transaction.
async fn write_refused(conn: &mut sqlx::PgConnection) -> bool {
    match sqlx::query("INSERT INTO notes VALUES (100, 'while frozen?') ON CONFLICT DO NOTHING")
        .execute(&mut *conn)
        .await
    {
        Ok(_) => false,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25006") => true,
        Err(e) => panic!("a write failed otherwise than read-only: {e}"),
    }
}

async fn freeze_as_owner(cluster: &Cluster, roles: &[&str]) -> anyhow::Result<DatabaseFreeze> {
    let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
    DatabaseFreeze::connect(&as_owner(cluster, "live"), &roles, CONNECT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_freeze_holds_writes_across_a_swap_until_the_thaw() {
    let cluster = owned_cluster();
    // The service's web connected before the freeze, as the same role the agent uses (the
    // real service runs as the database's owner).
    let mut web = owner_session(&cluster, "live", "web").await;
    let mut freeze = freeze_as_owner(&cluster, &[OWNER])
        .await
        .expect("the owner may freeze itself");
    let frozen = freeze.freeze(None).await.expect("freeze");
    assert_eq!(frozen.database, "live");
    assert_eq!(
        frozen
            .ended
            .iter()
            .map(|s| s.application.as_str())
            .collect::<Vec<_>>(),
        ["web"],
        "the web session is ended so it reconnects read-only: {:?}",
        frozen.ended
    );
    assert!(
        sqlx::query("SELECT 1").execute(&mut web).await.is_err(),
        "the ended session is gone"
    );
    let mut web = owner_session(&cluster, "live", "web").await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut web)
        .await
        .expect("reads keep working while frozen");
    assert_eq!(n, 1);
    assert!(
        write_refused(&mut web).await,
        "writes are refused while frozen"
    );
    // A process that must write while frozen (a worker running a smoke) opts out.
    let mut worker = sqlx::PgConnection::connect(&format!(
        "{}?options=-c%20default_transaction_read_only%3Doff",
        as_owner(&cluster, "live")
    ))
    .await
    .expect("a worker connects opting out");
    assert!(
        !write_refused(&mut worker).await,
        "an opted-out session writes"
    );
    drop(worker);

    // Repeated (a re-sent command): sessions that reconnected read-only since stay.
    let again = freeze
        .freeze(Some(frozen.since_us))
        .await
        .expect("freeze again");
    assert!(again.ended.is_empty(), "{:?}", again.ended);
    assert!(write_refused(&mut web).await);
    drop(web);

    // The restored database takes the live name frozen; the kept copy stays frozen too.
    let mut swap = prepared(&cluster)
        .await
        .carry_freeze(&[OWNER.to_owned()], true);
    swap.swap().await.expect("swap while frozen");
    swap.close().await;
    let mut web = owner_session(&cluster, "live", "web").await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut web)
        .await
        .expect("read the restored rows");
    assert_eq!(n, 2, "the restored database is live");
    assert!(
        write_refused(&mut web).await,
        "the freeze was carried onto the restored database"
    );

    // The thaw ends the sessions that began frozen, so they reconnect writable.
    let thawed = freeze.thaw().await.expect("thaw");
    assert_eq!(thawed.ended.len(), 1, "{:?}", thawed.ended);
    freeze.close().await;
    let mut web = owner_session(&cluster, "live", "web").await;
    assert!(!write_refused(&mut web).await, "writes work after the thaw");
    let mut kept = owner_session(&cluster, &format!("live_pre_{TAG}"), "psql").await;
    assert!(
        write_refused(&mut kept).await,
        "the copy kept while frozen stays read-only for the application"
    );
    kept.close().await.expect("close");
    web.close().await.expect("close");

    // Undone after the thaw, the kept copy comes back writable.
    let mut swap = undo(&cluster)
        .await
        .carry_freeze(&[OWNER.to_owned()], false);
    assert_eq!(undo_swap(&mut swap).await.expect("undo"), Undone::Swapped);
    swap.close().await;
    let mut web = owner_session(&cluster, "live", "web").await;
    assert!(
        !write_refused(&mut web).await,
        "the database put back is writable once thawed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_it_may_not_apply_changes_nothing() {
    let cluster = owned_cluster();
    cluster
        .psql(
            "postgres",
            "CREATE ROLE web_app LOGIN; GRANT CONNECT ON DATABASE live TO web_app",
        )
        .expect("a second application role");

    let err = freeze_as_owner(&cluster, &[OWNER, "no_such_role"])
        .await
        .err()
        .expect("an unknown role is refused");
    assert!(
        format!("{err:#}").contains("no role named no_such_role"),
        "{err:#}"
    );

    // A session of a role the owner may not end: named, and nothing changed.
    let mut other =
        sqlx::PgConnection::connect(&cluster.url("live").replacen("postgres@", "web_app@", 1))
            .await
            .expect("web_app connects");
    let mut freeze = freeze_as_owner(&cluster, &[OWNER, "web_app"])
        .await
        .expect("connect");
    // What preflight asks, changing nothing.
    let err = format!("{:#}", freeze.check().await.expect_err("could not hold"));
    assert!(
        err.contains("may not make role web_app read-only")
            && err.contains("may not end role web_app's sessions")
            && !err.contains("role app_owner read-only"),
        "{err}"
    );
    let mut own = freeze_as_owner(&cluster, &[OWNER]).await.expect("connect");
    own.check().await.expect("the owner may freeze itself");
    own.close().await;
    let err = freeze.freeze(None).await.expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("may not end")
            && text.contains("web_app")
            && text.contains("nothing was changed"),
        "{text}"
    );
    let mut web = owner_session(&cluster, "live", "web").await;
    assert!(!write_refused(&mut web).await, "the owner still writes");
    sqlx::query("SELECT 1")
        .execute(&mut other)
        .await
        .expect("the other role's session was left alone");
    other.close().await.expect("close");
    backends_gone(&cluster, "usename = 'web_app'").await;

    // No session in the way, but the owner may not alter another role (no CREATEROLE): the
    // one transaction leaves the owner's own setting unchanged too.
    let err = freeze.freeze(None).await.expect_err("refused");
    let text = format!("{err:#}");
    assert!(text.contains("CREATEROLE"), "{text}");
    freeze.close().await;
    assert!(!write_refused(&mut web).await, "nothing was frozen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_another_role_owns_are_named() {
    let cluster = owned_cluster();
    // A superuser restoring would own every restored table: the owner's `notes` is named.
    let mut as_superuser = sqlx::PgConnection::connect(&cluster.url("live"))
        .await
        .expect("connect");
    assert_eq!(
        tables_owned_by_others(&mut as_superuser, 10)
            .await
            .expect("owners"),
        [("public.notes".to_owned(), OWNER.to_owned())]
    );
    let mut owner = owner_session(&cluster, "live", "agent").await;
    assert!(
        tables_owned_by_others(&mut owner, 10)
            .await
            .expect("owners")
            .is_empty(),
        "the owner restores what it owns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_swap_that_cannot_carry_the_freeze_puts_the_live_database_back() {
    let cluster = owned_cluster();
    cluster
        .psql("postgres", "CREATE ROLE web_app LOGIN")
        .expect("a role the owner may not alter");
    let swap = prepared(&cluster).await;
    swap.close().await;
    // Killed between the renames: no database has the live name.
    cluster
        .psql(
            "postgres",
            &format!("ALTER DATABASE live RENAME TO live_pre_{TAG}"),
        )
        .expect("the first rename");
    let mut swap = DatabaseSwap::connect(&as_owner(&cluster, "live"), TAG, CONNECT)
        .await
        .expect("connect")
        .carry_freeze(&["web_app".to_owned()], true);
    let err = format!(
        "{:#}",
        swap.finish_interrupted()
            .await
            .expect_err("the freeze cannot be carried")
    );
    swap.close().await;
    assert!(
        err.contains("CREATEROLE") && err.contains("live is live again"),
        "{err}"
    );
    live_and_open(&cluster, 1).await;
    assert!(
        exists(&cluster, &format!("live_restore_{TAG}")),
        "the copy stays"
    );
}

/// A database of another server (a managed provider's restored instance) copied into the
/// restore copy as the owner role, counted against the source, and swapped in only under the
/// mark it was prepared with; a source that cannot be dumped leaves the live database alone.
#[tokio::test]
async fn a_copy_from_another_server_is_swapped_in_under_its_mark() {
    let cluster = owned_cluster();
    let source = Cluster::start().expect("start the source server");
    source
        .create_database("restored")
        .expect("create the source database");
    source
        .psql(
            "restored",
            "CREATE TABLE notes (id int PRIMARY KEY, body text); \
             INSERT INTO notes SELECT g, 'restored ' || g FROM generate_series(1, 50) g",
        )
        .expect("write the source rows");
    let options = CopyOptions {
        bin_dir: Some(cluster.bin_dir().to_path_buf()),
        connect_timeout: CONNECT,
    };
    let live = as_owner(&cluster, "live");

    // A source that refuses (no such database): nothing is marked, the live one untouched.
    let mut swap = DatabaseSwap::connect(&live, TAG, CONNECT)
        .await
        .expect("connect the swap");
    let err = copy_into_swap(
        &mut swap,
        &source.url("missing"),
        "copy 1",
        &CountSelection::AllTables,
        &options,
    )
    .await
    .expect_err("no such database");
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
    swap.close().await;
    live_and_open(&cluster, 1).await;

    let mut swap = DatabaseSwap::connect(&live, TAG, CONNECT)
        .await
        .expect("connect the swap");
    let copied = copy_into_swap(
        &mut swap,
        &source.url("restored"),
        "copy 1",
        &CountSelection::AllTables,
        &options,
    )
    .await
    .expect("copy the source");
    assert_eq!(copied.counts.get("notes"), Some(&50));
    assert!(copied.source_version.starts_with("15"), "{copied:?}");
    let wrong = commit_swap_marked(&mut swap, "copy 2", "copy two")
        .await
        .expect_err("prepared under another mark");
    assert!(
        format!("{wrong:#}").contains("no finished preparation of copy two"),
        "{wrong:#}"
    );
    live_and_open(&cluster, 1).await;
    let committed = commit_swap_marked(&mut swap, "copy 1", "copy one")
        .await
        .expect("swap the copy in");
    assert_eq!(committed, Committed::Swapped);
    swap.close().await;
    live_and_open(&cluster, 50).await;
    assert!(exists(&cluster, &format!("live_pre_{TAG}")));
    // The owner role owns what it restored.
    assert_eq!(
        cluster
            .psql(
                "live",
                "SELECT tableowner FROM pg_tables WHERE tablename = 'notes'"
            )
            .expect("read the owner")
            .trim(),
        OWNER
    );
}
