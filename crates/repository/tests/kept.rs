//! Kept databases against a throwaway cluster, as the application's owner role (not a
//! superuser, with CREATEDB), the way the database agent runs: the listing names only kept
//! copies of the live database (the `_pre_` and `_undone_` databases swaps kept, and the
//! `_restore_` copies a restore prepared and never swapped in), with sizes and sessions; a drop
//! refuses any other name, a database with a session (named), and any drop while the live
//! database is missing or a swap of the tag may be under way; and drops exactly the named copy
//! otherwise.

use std::time::Duration;

use ephemeral_pg::Cluster;
use repository::*;
use sqlx::Connection;

const OWNER: &str = "app_owner";
const CONNECT: Duration = Duration::from_secs(10);

fn as_owner(cluster: &Cluster, database: &str) -> String {
    cluster
        .url(database)
        .replacen("postgres@", &format!("{OWNER}@"), 1)
}

fn databases(cluster: &Cluster) -> Vec<String> {
    cluster
        .psql(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname LIKE 'live%' ORDER BY 1",
        )
        .expect("query pg_database")
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_databases_are_listed_and_only_idle_kept_copies_dropped() {
    let cluster = Cluster::start().expect("start a throwaway Postgres");
    cluster
        .psql("postgres", &format!("CREATE ROLE {OWNER} LOGIN CREATEDB"))
        .expect("create the owner");
    for db in [
        "live",
        "live_pre_r0000000a",
        "live_pre_r0000000b",
        "live_undone_r0000000b",
        "live_pre_r0000000c",
        "live_restore_r0000000c",
        "live_restore_r0000000e",
        "live_pre_notatag",
        "lively_pre_r0000000d",
    ] {
        cluster
            .psql("postgres", &format!("CREATE DATABASE {db} OWNER {OWNER}"))
            .expect("create a database");
    }
    let url = as_owner(&cluster, "live");

    let (live, kept) = list_kept_databases(&url, CONNECT).await.expect("list");
    assert_eq!(live, "live");
    let names: Vec<(&str, KeptKind, &str)> = kept
        .iter()
        .map(|k| (k.name.as_str(), k.kind, k.tag.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("live_pre_r0000000a", KeptKind::Pre, "r0000000a"),
            ("live_pre_r0000000b", KeptKind::Pre, "r0000000b"),
            ("live_pre_r0000000c", KeptKind::Pre, "r0000000c"),
            ("live_restore_r0000000c", KeptKind::Prepared, "r0000000c"),
            ("live_restore_r0000000e", KeptKind::Prepared, "r0000000e"),
            ("live_undone_r0000000b", KeptKind::Undone, "r0000000b"),
        ]
    );
    assert!(kept.iter().all(|k| k.bytes > 1_000_000), "{kept:?}");
    assert!(kept.iter().all(|k| k.sessions == 0), "{kept:?}");

    // Names that are not kept copies of the live database: refused, nothing dropped.
    for name in [
        "live",
        "live_restore_",
        "live_pre_notatag",
        "lively_pre_r0000000d",
    ] {
        let err = drop_kept_database(&url, name, CONNECT)
            .await
            .expect_err("not a kept copy");
        assert!(
            format!("{err:#}").contains("is not a kept copy of database live"),
            "{name}: {err:#}"
        );
    }
    // A swap of the tag may be under way.
    let err = drop_kept_database(&url, "live_pre_r0000000c", CONNECT)
        .await
        .expect_err("a restore copy of its tag exists");
    assert!(
        format!("{err:#}").contains("live_restore_r0000000c exists"),
        "{err:#}"
    );
    // And the other way: a prepared copy whose tag's `_pre_` exists.
    let err = drop_kept_database(&url, "live_restore_r0000000c", CONNECT)
        .await
        .expect_err("a kept database of its tag exists");
    assert!(
        format!("{err:#}").contains("live_pre_r0000000c exists"),
        "{err:#}"
    );
    // A prepared copy alone (a run aborted after its prepare) goes.
    assert!(
        drop_kept_database(&url, "live_restore_r0000000e", CONNECT)
            .await
            .expect("drop the prepared copy")
    );

    // A session on it: counted in the listing, named by the refusal.
    let session = sqlx::PgConnection::connect(&format!(
        "{}?application_name=reader",
        cluster.url("live_pre_r0000000a")
    ))
    .await
    .expect("connect");
    let (_, kept) = list_kept_databases(&url, CONNECT).await.expect("list");
    assert_eq!(kept[0].sessions, 1, "{kept:?}");
    let err = drop_kept_database(&url, "live_pre_r0000000a", CONNECT)
        .await
        .expect_err("in use");
    let err = format!("{err:#}");
    assert!(
        err.contains("has 1 session(s) right now") && err.contains("application \"reader\""),
        "{err}"
    );
    session.close().await.expect("close");

    // Idle: dropped, exactly that one; a second drop finds it gone.
    ephemeral_pg::eventually("the session to end", Duration::from_secs(20), async || {
        drop_kept_database(&url, "live_pre_r0000000a", CONNECT)
            .await
            .ok()
            .filter(|dropped| *dropped)
    })
    .await;
    assert!(
        !drop_kept_database(&url, "live_pre_r0000000a", CONNECT)
            .await
            .expect("already gone")
    );
    assert!(
        drop_kept_database(&url, "live_undone_r0000000b", CONNECT)
            .await
            .expect("drop the undone copy")
    );
    assert_eq!(
        databases(&cluster),
        [
            "live",
            "live_pre_notatag",
            "live_pre_r0000000b",
            "live_pre_r0000000c",
            "live_restore_r0000000c",
            "lively_pre_r0000000d",
        ]
    );

    // The live database missing (a swap interrupted): nothing is dropped.
    cluster
        .psql("postgres", "ALTER DATABASE live RENAME TO live_elsewhere")
        .expect("rename the live database away");
    let err = drop_kept_database(&url, "live_pre_r0000000b", CONNECT)
        .await
        .expect_err("the live database is missing");
    assert!(
        format!("{err:#}").contains("the live database live does not exist"),
        "{err:#}"
    );
    assert!(databases(&cluster).contains(&"live_pre_r0000000b".to_owned()));
}
