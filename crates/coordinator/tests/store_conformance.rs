//! One conformance suite for every `Store` adapter: SQLite on a temp file, Postgres on a
//! throwaway cluster this test starts itself. Each case gets a fresh database.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use api::model::{ActionKind, ActionOutput, Epoch, Outcome, ScaleOutput};
use chrono::{DateTime, Duration, TimeZone, Utc};
use coordinator::store::{
    self, CommandRecord, Error, NewRun, PhaseRecord, PhaseState, ResultRecord, RunKind, RunState,
    Store,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        format!("sqlite://{}/state-{n}.db", dir.path().display())
    };
    conformance(&mut fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_conforms() {
    let cluster = ephemeral_pg::Cluster::start().unwrap();
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        let db = format!("state_{n}");
        cluster.create_database(&db).unwrap();
        cluster.url(&db)
    };
    conformance(&mut fresh).await;
}

async fn conformance(fresh: &mut dyn FnMut() -> String) {
    epochs_strictly_increase_across_reopen(&fresh()).await;
    concurrent_coordinators_never_share_an_epoch(&fresh()).await;
    runs_move_forward_and_finished_runs_stay_finished(&fresh()).await;
    phases_are_replaced_in_place(&fresh()).await;
    commands_are_journaled_once_and_results_first_wins(&fresh()).await;
    events_come_back_in_order(&fresh()).await;
    a_replaced_coordinator_changes_nothing(&fresh()).await;
    newest_verdicts_per_environment_and_kind(&fresh()).await;
}

async fn epochs_strictly_increase_across_reopen(url: &str) {
    let store = store::open(url).await.unwrap();
    assert_eq!(store.latest_epoch().await.unwrap(), None);
    let first = store.next_epoch("test/1").await.unwrap();
    let second = store.next_epoch("test/2").await.unwrap();
    assert!(second > first, "{second} > {first}");
    drop(store);

    let reopened = store::open(url).await.unwrap();
    let third = reopened.next_epoch("test/3").await.unwrap();
    assert!(third > second, "{third} > {second} after reopening");
    assert_eq!(reopened.latest_epoch().await.unwrap(), Some(third));
}

async fn concurrent_coordinators_never_share_an_epoch(url: &str) {
    // Two handles on one database, as two coordinator processes have.
    let a = store::open(url).await.unwrap();
    let b = store::open(url).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let s: Arc<dyn Store> = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.next_epoch(&format!("racer/{i}")).await.unwrap()
        }));
    }
    let mut taken = Vec::new();
    for t in tasks {
        taken.push(t.await.unwrap());
    }
    let distinct: BTreeSet<Epoch> = taken.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        taken.len(),
        "every taker got its own epoch: {taken:?}"
    );
    assert_eq!(
        a.latest_epoch().await.unwrap(),
        distinct.last().copied(),
        "the latest epoch is the greatest handed out"
    );
}

fn at(second: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_764_000_000_000 + second * 1000)
        .unwrap()
}

/// The writer's epoch of the journal writes in the cases that take no epoch themselves.
fn w() -> Epoch {
    Epoch::new(6).unwrap()
}

fn new_run(id: &str, created: DateTime<Utc>) -> NewRun {
    NewRun {
        id: id.into(),
        kind: RunKind::Drill,
        environment: "staging".into(),
        point_id: Some("pt-1".into()),
        plan: "[[phase]]\nname = \"freeze\"\n".into(),
        params: json!({"watch": true}),
        epoch: Epoch::new(3).unwrap(),
        created_at: created,
    }
}

async fn runs_move_forward_and_finished_runs_stay_finished(url: &str) {
    let s = store::open(url).await.unwrap();
    s.create_run(&new_run("run-a", at(0))).await.unwrap();
    s.create_run(&new_run("run-b", at(10))).await.unwrap();
    let dup = s.create_run(&new_run("run-a", at(20))).await;
    assert!(matches!(dup, Err(Error::Conflict(_))), "{dup:?}");

    let a = s.run("run-a").await.unwrap().unwrap();
    assert_eq!(a.state, RunState::Pending);
    assert_eq!(a.plan, "[[phase]]\nname = \"freeze\"\n");
    assert_eq!(a.params, json!({"watch": true}));
    assert_eq!((a.created_at, a.finished_at), (at(0), None));
    assert_eq!(s.run("run-zzz").await.unwrap(), None);

    let ids = |runs: Vec<store::RunRecord>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_runs(10).await.unwrap()), ["run-b", "run-a"]);
    assert_eq!(ids(s.list_runs(1).await.unwrap()), ["run-b"]);

    s.set_run_state("run-a", RunState::Running, None, at(1), w())
        .await
        .unwrap();
    s.set_run_state(
        "run-a",
        RunState::Blocked,
        Some("gate web: 0/1 ready"),
        at(2),
        w(),
    )
    .await
    .unwrap();
    let blocked = s.run("run-a").await.unwrap().unwrap();
    assert_eq!(blocked.reason.as_deref(), Some("gate web: 0/1 ready"));
    assert_eq!((blocked.updated_at, blocked.finished_at), (at(2), None));

    s.set_run_state("run-a", RunState::Aborted, Some("operator"), at(3), w())
        .await
        .unwrap();
    let aborted = s.run("run-a").await.unwrap().unwrap();
    assert_eq!(aborted.finished_at, Some(at(3)));
    let reopen = s
        .set_run_state("run-a", RunState::Running, None, at(4), w())
        .await;
    assert!(
        matches!(&reopen, Err(Error::Conflict(m)) if m.contains("already aborted")),
        "{reopen:?}"
    );
    let unknown = s
        .set_run_state("nope", RunState::Running, None, at(4), w())
        .await;
    assert!(matches!(unknown, Err(Error::NotFound(_))), "{unknown:?}");

    assert_eq!(ids(s.unfinished_runs().await.unwrap()), ["run-b"]);

    // Journaled third but stamped first (a coordinator whose clock ran slow): newer all the same.
    s.create_run(&new_run("run-c", at(-100))).await.unwrap();
    let c = s.run("run-c").await.unwrap().unwrap();
    assert_eq!((a.seq, c.seq), (1, 3));
    assert_eq!(
        ids(s.list_runs(10).await.unwrap()),
        ["run-c", "run-b", "run-a"]
    );
    assert_eq!(ids(s.unfinished_runs().await.unwrap()), ["run-b", "run-c"]);
}

async fn phases_are_replaced_in_place(url: &str) {
    let s = store::open(url).await.unwrap();
    s.create_run(&new_run("run-p", at(0))).await.unwrap();
    let phase = |index: u32, name: &str, state| PhaseRecord {
        run_id: "run-p".into(),
        index,
        name: name.into(),
        state,
        attempt: 1,
        started_at: Some(at(1)),
        finished_at: None,
        detail: None,
    };
    s.put_phase(&phase(1, "scale-to-zero", PhaseState::Pending), w())
        .await
        .unwrap();
    s.put_phase(&phase(0, "freeze", PhaseState::Running), w())
        .await
        .unwrap();
    let mut passed = phase(0, "freeze", PhaseState::Passed);
    passed.finished_at = Some(at(5));
    passed.detail = Some("3/3 agents froze".into());
    s.put_phase(&passed, w()).await.unwrap();

    let phases = s.phases("run-p").await.unwrap();
    assert_eq!(phases.len(), 2);
    assert_eq!(phases[0], passed);
    assert_eq!(phases[1].name, "scale-to-zero");

    let orphan = PhaseRecord {
        run_id: "ghost".into(),
        ..passed
    };
    let err = s.put_phase(&orphan, w()).await;
    assert!(matches!(err, Err(Error::NotFound(_))), "{err:?}");
}

async fn commands_are_journaled_once_and_results_first_wins(url: &str) {
    let s = store::open(url).await.unwrap();
    s.create_run(&new_run("run-c", at(0))).await.unwrap();
    let command = CommandRecord {
        command_id: "run-c/0/web-1/1".into(),
        run_id: "run-c".into(),
        phase_index: 0,
        agent: "web-1".into(),
        action: ActionKind::Scale,
        payload: json!({"Scale": {"Replicas": 0}}),
        attempt: 1,
        epoch: Epoch::new(4).unwrap(),
        created_at: at(1),
    };
    s.record_command(&command).await.unwrap();

    // Re-sent by a restarted coordinator: the epoch rises, nothing else changes.
    let resent = CommandRecord {
        epoch: Epoch::new(6).unwrap(),
        created_at: at(30),
        ..command.clone()
    };
    s.record_command(&resent).await.unwrap();
    // A late journal write from the older coordinator never lowers it.
    s.record_command(&command).await.unwrap();
    let listed = s.commands("run-c").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0.epoch, Epoch::new(6).unwrap());
    assert_eq!(listed[0].0.created_at, at(1));
    assert_eq!(listed[0].1, None);

    let different = CommandRecord {
        payload: json!({"Scale": {"Replicas": 1}}),
        ..command.clone()
    };
    let err = s.record_command(&different).await;
    assert!(
        matches!(&err, Err(Error::Conflict(m)) if m.contains("run-c/0/web-1/1")),
        "{err:?}"
    );

    let result = ResultRecord {
        command_id: command.command_id.clone(),
        agent: "web-1".into(),
        epoch: Epoch::new(6).unwrap(),
        outcome: Outcome::Succeeded,
        replayed: false,
        detail: "scaled from 2 to 0 replicas".into(),
        output: Some(ActionOutput::Scale(ScaleOutput {
            before: 2,
            now: 0,
            prior: 2,
        })),
        received_at: at(2),
    };
    assert!(
        s.record_result(&result, w()).await.unwrap(),
        "first result is new"
    );
    let replay = ResultRecord {
        replayed: true,
        received_at: at(40),
        ..result.clone()
    };
    assert!(
        !s.record_result(&replay, w()).await.unwrap(),
        "second is not"
    );
    let listed = s.commands("run-c").await.unwrap();
    assert_eq!(
        listed[0].1.as_ref(),
        Some(&result),
        "the first result stands"
    );

    let orphan = ResultRecord {
        command_id: "never-sent".into(),
        ..result
    };
    let err = s.record_result(&orphan, w()).await;
    assert!(matches!(err, Err(Error::NotFound(_))), "{err:?}");

    let stray = CommandRecord {
        run_id: "ghost".into(),
        command_id: "ghost/0/web-1/1".into(),
        ..command
    };
    let err = s.record_command(&stray).await;
    assert!(matches!(err, Err(Error::NotFound(_))), "{err:?}");
}

async fn events_come_back_in_order(url: &str) {
    let s = store::open(url).await.unwrap();
    s.create_run(&new_run("run-e", at(0))).await.unwrap();
    s.create_run(&new_run("run-f", at(0))).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..5 {
        let run = if i % 2 == 0 { "run-e" } else { "run-f" };
        seqs.push(
            s.append_event(
                run,
                at(i) + Duration::milliseconds(7),
                "phase",
                &json!({"i": i}),
                w(),
            )
            .await
            .unwrap(),
        );
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    let e = s.events("run-e", 0, 100).await.unwrap();
    assert_eq!(
        e.iter()
            .map(|e| e.payload["i"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [0, 2, 4]
    );
    assert_eq!(e[0].at, at(0) + Duration::milliseconds(7));
    let after_first = s.events("run-e", e[0].seq, 1).await.unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].payload, json!({"i": 2}));

    let err = s
        .append_event("ghost", at(0), "phase", &json!({}), w())
        .await;
    assert!(matches!(err, Err(Error::NotFound(_))), "{err:?}");
}

/// Coordinator A drives a run; B takes a newer epoch on the same store (A paused, say) and
/// finishes it. Every write A makes after that is refused as `Fenced` and changes nothing, and
/// the finished run's phases never change, not even for B.
async fn a_replaced_coordinator_changes_nothing(url: &str) {
    let s = store::open(url).await.unwrap();
    let a = s.next_epoch("coordinator-a").await.unwrap();
    s.create_run(&NewRun {
        epoch: a,
        ..new_run("run-x", at(0))
    })
    .await
    .unwrap();
    s.set_run_state("run-x", RunState::Running, None, at(1), a)
        .await
        .unwrap();
    let phase = |state| PhaseRecord {
        run_id: "run-x".into(),
        index: 0,
        name: "restore-postgres".into(),
        state,
        attempt: 1,
        started_at: Some(at(1)),
        finished_at: None,
        detail: None,
    };
    s.put_phase(&phase(PhaseState::Running), a).await.unwrap();
    let command = CommandRecord {
        command_id: "run-x/restore-postgres/db-1/a1/s0/r0".into(),
        run_id: "run-x".into(),
        phase_index: 0,
        agent: "db-1".into(),
        action: ActionKind::RestorePostgres,
        payload: json!({}),
        attempt: 1,
        epoch: a,
        created_at: at(1),
    };
    s.record_command(&command).await.unwrap();

    // B takes over and finishes the run.
    let b = s.next_epoch("coordinator-b").await.unwrap();
    s.record_command(&CommandRecord {
        epoch: b,
        ..command.clone()
    })
    .await
    .unwrap();
    let passed = PhaseRecord {
        finished_at: Some(at(5)),
        ..phase(PhaseState::Passed)
    };
    s.put_phase(&passed, b).await.unwrap();
    s.set_run_state("run-x", RunState::Succeeded, None, at(6), b)
        .await
        .unwrap();
    let events_before = s.events("run-x", 0, 100).await.unwrap().len();

    // A wakes up: nothing it writes lands.
    let fenced = |what: &str, r: Result<(), Error>| {
        assert!(
            matches!(&r, Err(Error::Fenced { writer, newest }) if *writer == a && *newest == b),
            "{what}: {r:?}"
        );
        if let Err(e) = r {
            assert!(
                e.to_string().contains("a newer coordinator took epoch"),
                "{e}"
            );
        }
    };
    fenced("phase", s.put_phase(&phase(PhaseState::Blocked), a).await);
    fenced(
        "run state",
        s.set_run_state("run-x", RunState::Blocked, Some("stale"), at(7), a)
            .await,
    );
    fenced(
        "command",
        s.record_command(&CommandRecord {
            command_id: "run-x/restore-postgres/db-1/a1/s0/r1".into(),
            ..command.clone()
        })
        .await,
    );
    let result = ResultRecord {
        command_id: command.command_id.clone(),
        agent: "db-1".into(),
        epoch: a,
        outcome: Outcome::Failed,
        replayed: false,
        detail: "stale".into(),
        output: None,
        received_at: at(7),
    };
    fenced("result", s.record_result(&result, a).await.map(|_| ()));
    fenced(
        "event",
        s.append_event("run-x", at(7), "run.blocked", &json!({}), a)
            .await
            .map(|_| ()),
    );
    fenced(
        "new run",
        s.create_run(&NewRun {
            epoch: a,
            ..new_run("run-y", at(7))
        })
        .await,
    );
    assert_eq!(
        s.phases("run-x").await.unwrap(),
        std::slice::from_ref(&passed)
    );
    assert_eq!(
        s.run("run-x").await.unwrap().unwrap().state,
        RunState::Succeeded
    );
    assert_eq!(s.commands("run-x").await.unwrap().len(), 1);
    assert_eq!(
        s.events("run-x", 0, 100).await.unwrap().len(),
        events_before
    );
    assert_eq!(s.run("run-y").await.unwrap(), None);

    // A finished run's phases do not change, whoever writes.
    let late = s.put_phase(&phase(PhaseState::Blocked), b).await;
    assert!(
        matches!(&late, Err(Error::Conflict(m)) if m.contains("already succeeded")),
        "{late:?}"
    );
}

#[tokio::test]
async fn unusable_urls_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite://{}/no/such/dir/state.db", dir.path().display());
    let err = store::open(&missing).await.err().unwrap();
    assert!(
        format!("{err:#}").contains("does not exist; create it or set [state] url"),
        "{err:#}"
    );

    let err = store::open("mysql://db/state").await.err().unwrap();
    assert!(
        format!("{err:#}").contains("neither sqlite: nor postgres://"),
        "{err:#}"
    );

    // Nothing listens on the port: the message names the store, never the password.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = store::open(&format!(
        "postgres://rollcall:hunter2@127.0.0.1:{port}/state"
    ))
    .await
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("connect to the Postgres state store"), "{msg}");
    assert!(msg.contains("rollcall:***@127.0.0.1"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

/// The verdict metrics' start: per environment and kind, the newest ended run (blocked
/// counts) and the newest success; running runs and older ones are not returned.
async fn newest_verdicts_per_environment_and_kind(url: &str) {
    let s = store::open(url).await.unwrap();
    assert!(s.newest_verdicts().await.unwrap().is_empty());
    let run = |id: &str, kind: RunKind, env: &str, t: i64| NewRun {
        kind,
        environment: env.into(),
        ..new_run(id, at(t))
    };
    for (id, kind, env, t, state) in [
        ("d1", RunKind::Drill, "prod", 0, Some(RunState::Succeeded)),
        ("d2", RunKind::Drill, "prod", 10, Some(RunState::Succeeded)),
        ("d3", RunKind::Drill, "prod", 20, Some(RunState::Blocked)),
        ("d4", RunKind::Drill, "prod", 30, None), // still running: no verdict yet
        ("b1", RunKind::Backup, "prod", 5, Some(RunState::Succeeded)),
        ("b2", RunKind::Backup, "prod", 15, Some(RunState::Aborted)),
        (
            "s1",
            RunKind::Drill,
            "staging",
            1,
            Some(RunState::Succeeded),
        ),
    ] {
        s.create_run(&run(id, kind, env, t)).await.unwrap();
        s.set_run_state(id, RunState::Running, None, at(t + 1), w())
            .await
            .unwrap();
        if let Some(state) = state {
            s.set_run_state(id, state, None, at(t + 2), w())
                .await
                .unwrap();
        }
    }
    let mut got: Vec<(String, RunState)> = s
        .newest_verdicts()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.state))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("b1".to_owned(), RunState::Succeeded),
            ("b2".to_owned(), RunState::Aborted),
            ("d2".to_owned(), RunState::Succeeded),
            ("d3".to_owned(), RunState::Blocked),
            ("s1".to_owned(), RunState::Succeeded),
        ]
    );
}
