//! The freeze at the database, through a real agent and coordinator (in process, real mTLS)
//! and a real Postgres: a database agent with `[postgres.freeze]` makes the application's
//! owner role read-only and ends its sessions, remembers the freeze across an agent restart,
//! and thaws it; an agent with nothing to freeze says so.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use api::model::output::FreezeOutput;
use api::model::{
    Action, ActionKind, ActionOutput, AgentName, Availability, CommandId, CommandResult, Outcome,
    ResultDetail,
};
use coordinator::link::{AgentLink, Outgoing};
use e2e::*;
use ephemeral_pg::Cluster;
use sqlx::Connection as _;

const OWNER: &str = "app_owner";

fn owner_url(cluster: &Cluster, application: &str) -> String {
    format!(
        "{}?application_name={application}",
        cluster
            .url("live")
            .replacen("postgres@", &format!("{OWNER}@"), 1)
    )
}

/// Whether a write through `conn` is refused as a write in a read-only transaction.
async fn write_refused(conn: &mut sqlx::PgConnection) -> bool {
    match sqlx::query("INSERT INTO notes VALUES (100) ON CONFLICT DO NOTHING")
        .execute(&mut *conn)
        .await
    {
        Ok(_) => false,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25006") => true,
        Err(e) => panic!("a write failed otherwise than read-only: {e}"),
    }
}

fn freeze_output(result: &CommandResult, kind: ActionKind) -> FreezeOutput {
    assert_eq!(result.outcome, Outcome::Succeeded, "{}", result.message);
    match &result.detail {
        Some(ResultDetail::Output(o)) => match ActionOutput::decode(kind, o).unwrap() {
            ActionOutput::Freeze(out) | ActionOutput::Unfreeze(out) => out,
            other => panic!("not a freeze output: {other:?}"),
        },
        other => panic!("no freeze output: {other:?} ({})", result.message),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_agent_freezes_writes_remembers_it_and_thaws() {
    install_crypto();
    let cluster = Cluster::start().unwrap();
    for sql in [
        format!("CREATE ROLE {OWNER} LOGIN CREATEDB"),
        format!("CREATE DATABASE live OWNER {OWNER}"),
    ] {
        cluster.psql("postgres", &sql).unwrap();
    }
    cluster
        .psql(
            "live",
            &format!("SET ROLE {OWNER}; CREATE TABLE notes (id int PRIMARY KEY)"),
        )
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path(), &["database-1:database", "web-1:web"]);
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    let coord = InProcessCoordinator::start(&certs, &state_url, Duration::from_secs(5)).await;
    // The agent connects as the application's owner role, as the real service runs.
    let url_file = dir.path().join("database-url");
    std::fs::write(&url_file, owner_url(&cluster, "unused")).unwrap();
    let database = || {
        let mut settings = agent_settings(
            &certs,
            dir.path(),
            &coord.agents_url(),
            "database-1",
            "database",
        );
        settings.postgres = Some(
            toml::from_str(&format!(
                "url_file = {:?}\ncounts = []\n[freeze]\nroles = [{OWNER:?}]\n",
                url_file.display().to_string()
            ))
            .unwrap(),
        );
        settings
    };
    let web = InProcessAgent::start(agent_settings(
        &certs,
        dir.path(),
        &coord.agents_url(),
        "web-1",
        "web",
    ));
    let agent = InProcessAgent::start(database());
    coord.wait_ready(&["database-1", "web-1"]).await;
    let caps = coord
        .handle
        .agents()
        .into_iter()
        .find(|a| a.name.as_str() == "database-1")
        .unwrap()
        .capabilities;
    assert!(caps.iter().any(|c| c == "freeze"), "{caps:?}");

    let send = |agent: &str, id: &str, action: Action| {
        let link = coord.handle.link.clone();
        let out = Outgoing {
            id: CommandId::parse(id).unwrap(),
            run_id: "run-9".into(),
            deadline: SystemTime::now() + Duration::from_secs(30),
            action,
        };
        let agent = AgentName::parse(agent).unwrap();
        async move { link.send(&agent, out).await.unwrap() }
    };

    // web has no freeze adapter: it says it froze nothing.
    let nothing = freeze_output(
        &send("web-1", "run-9/freeze/1", Action::Freeze).await,
        ActionKind::Freeze,
    );
    assert_eq!(nothing, FreezeOutput::nothing());

    let mut before = sqlx::PgConnection::connect(&owner_url(&cluster, "web"))
        .await
        .unwrap();
    assert!(!write_refused(&mut before).await);
    let frozen = freeze_output(
        &send("database-1", "run-9/freeze/2", Action::Freeze).await,
        ActionKind::Freeze,
    );
    assert_eq!((frozen.by.as_str(), frozen.frozen), ("database", true));
    assert!(
        frozen.detail.contains("1 session ended"),
        "{}",
        frozen.detail
    );
    assert!(
        sqlx::query("SELECT 1").execute(&mut before).await.is_err(),
        "the session from before the freeze was ended"
    );
    let mut during = sqlx::PgConnection::connect(&owner_url(&cluster, "web"))
        .await
        .unwrap();
    assert!(write_refused(&mut during).await, "writes are frozen");

    // The agent restarts; the freeze is remembered: the same freeze sent again leaves the
    // sessions that reconnected read-only alone.
    agent.stop().await;
    let handle = coord.handle.clone();
    eventually(
        "the registry to see database-1 go",
        Duration::from_secs(10),
        async || {
            handle
                .agents()
                .into_iter()
                .any(|a| {
                    a.name.as_str() == "database-1" && a.availability != Availability::Connected
                })
                .then_some(())
        },
    )
    .await;
    let agent = InProcessAgent::start(database());
    coord.wait_ready(&["database-1"]).await;
    let again = freeze_output(
        &send("database-1", "run-9/freeze/3", Action::Freeze).await,
        ActionKind::Freeze,
    );
    assert!(
        again.detail.contains("0 sessions ended"),
        "{}",
        again.detail
    );
    assert!(
        write_refused(&mut during).await,
        "still frozen, still connected"
    );

    let thawed = freeze_output(
        &send("database-1", "run-9/unfreeze/1", Action::Unfreeze).await,
        ActionKind::Unfreeze,
    );
    assert_eq!((thawed.by.as_str(), thawed.frozen), ("database", false));
    assert!(
        sqlx::query("SELECT 1").execute(&mut during).await.is_err(),
        "the session that began frozen was ended, to reconnect writable"
    );
    let mut after = sqlx::PgConnection::connect(&owner_url(&cluster, "web"))
        .await
        .unwrap();
    assert!(
        !write_refused(&mut after).await,
        "writes work after the thaw"
    );
    let remembered: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("database-1/database-freeze.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(remembered["frozen"], false, "{remembered}");

    agent.stop().await;
    web.stop().await;
    coord.stop().await;
}
