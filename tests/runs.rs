//! The run engine against a real in-process fleet: agents with real role control (supervised
//! child processes, exec freeze commands), the real coordinator, a SQLite journal. A plan
//! without data phases (those need the backup repository) exercises ordering, gates against
//! the declared fleet, blocking, abort, and resuming a run after the coordinator is replaced.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::model::{ActionKind, ActionOutput, ScaleOutput};
use coordinator::config::Environment;
use coordinator::engine::{Control, RunConflict, StartRun};
use coordinator::store::{PhaseState, RunKind, RunState};
use e2e::*;

const PLAN: &str = include_str!("plans/roles-only.toml");

fn environment(fleet: &[(&str, u32)], repository: &Path) -> BTreeMap<String, Environment> {
    environment_with(fleet, repository, PLAN)
}

fn environment_with(
    fleet: &[(&str, u32)],
    repository: &Path,
    plan_text: &str,
) -> BTreeMap<String, Environment> {
    let env = test_environment("test", fleet, repository, plan_text);
    BTreeMap::from([("test".to_owned(), env)])
}

struct Fleet3 {
    dir: tempfile::TempDir,
    certs: PathBuf,
    state_url: String,
}

impl Fleet3 {
    fn new() -> Fleet3 {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(
            dir.path(),
            &["web-1:web", "worker-1:worker", "worker-2:worker"],
        );
        let state_url = format!("sqlite://{}/state.db", dir.path().display());
        Fleet3 {
            dir,
            certs,
            state_url,
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("freeze.log")
    }

    /// web-1 freezes by appending to a log (after `freeze_delay`); workers supervise `sh`.
    fn agents(&self, url: &str, freeze_delay: &str) -> Vec<InProcessAgent> {
        let log = self.log();
        let mut web = agent_settings(&self.certs, self.dir.path(), url, "web-1", "web");
        web.control = toml::from_str(&format!(
            r#"
            freeze = "exec"
            [exec]
            freeze = ["sh", "-c", "sleep {freeze_delay}; echo frozen >> {log}"]
            unfreeze = ["sh", "-c", "echo unfrozen >> {log}"]
            "#,
            log = log.display()
        ))
        .unwrap();
        let mut agents = vec![InProcessAgent::start(web)];
        for name in ["worker-1", "worker-2"] {
            agents.push(self.worker(url, name));
        }
        agents
    }

    /// A worker agent supervising two `sh` replicas (its state directory survives restarts).
    fn worker(&self, url: &str, name: &str) -> InProcessAgent {
        let mut s = agent_settings(&self.certs, self.dir.path(), url, name, "worker");
        s.control = toml::from_str(
            r#"
            scale = "process"
            [process]
            program = "sh"
            args = ["-c", "while true; do sleep 0.05; done"]
            replicas = 2
            stop_grace = "1s"
            "#,
        )
        .unwrap();
        InProcessAgent::start(s)
    }

    async fn coordinator(&self, fleet: &[(&str, u32)]) -> InProcessCoordinator {
        InProcessCoordinator::start_full(
            &self.certs,
            &self.state_url,
            Duration::from_secs(5),
            Duration::from_millis(200),
            environment(fleet, &self.dir.path().join("repository")),
        )
        .await
    }
}

async fn wait_state(
    c: &InProcessCoordinator,
    id: &str,
    want: RunState,
) -> coordinator::store::RunRecord {
    let store = c.handle.store().clone();
    eventually(
        &format!("run {id} {want}"),
        Duration::from_secs(60),
        async || {
            let run = store.run(id).await.unwrap().unwrap();
            (run.state == want).then_some(run)
        },
    )
    .await
}

fn start(env: &str) -> StartRun {
    StartRun {
        environment: env.into(),
        kind: RunKind::Drill,
        point_id: None,
        plan: None,
        excluded: Vec::new(),
        to_time: None,
        base_backup: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_executes_its_phases_in_order_and_restores_prior_replicas() {
    let f = Fleet3::new();
    let c = f.coordinator(&[("web", 1), ("worker", 2)]).await;
    let agents = f.agents(&c.agents_url(), "0");
    c.wait_ready(&["web-1", "worker-1", "worker-2"]).await;

    let run = c.handle.engine.start_run(start("test")).await.unwrap();
    let done = wait_state(&c, &run.id, RunState::Succeeded).await;
    assert!(done.finished_at.is_some());

    let store = c.handle.store();
    let phases = store.phases(&run.id).await.unwrap();
    assert!(
        phases.iter().all(|p| p.state == PhaseState::Passed),
        "{phases:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(f.log()).unwrap(),
        "frozen\nunfrozen\n"
    );
    // Workers went 2 → 0 → 2 and report ready again.
    let commands = store.commands(&run.id).await.unwrap();
    let scales: Vec<Option<ActionOutput>> = commands
        .iter()
        .filter(|(c, _)| c.action == ActionKind::Scale && c.agent == "worker-1")
        .map(|(_, r)| r.as_ref().unwrap().output.clone())
        .collect();
    let scaled = |before, now| {
        Some(ActionOutput::Scale(ScaleOutput {
            before,
            now,
            prior: 2,
        }))
    };
    assert_eq!(scales, [scaled(2, 0), scaled(0, 2)]);
    c.wait_ready(&["worker-1", "worker-2"]).await;
    let events = store.events(&run.id, 0, 1000).await.unwrap();
    let report = events.iter().find(|e| e.kind == "report").unwrap();
    let phases = report.payload["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 5, "every phase of the plan");
    assert_eq!(phases[1]["state"], "passed", "{phases:?}");
    assert_eq!(
        phases[4]["state"], "not started",
        "unfreeze comes after the report"
    );
    let stored = f
        .dir
        .path()
        .join(format!("repository/reports/{}.md", run.id));
    let markdown = std::fs::read_to_string(&stored).unwrap();
    assert!(markdown.contains("scale-to-zero"), "{markdown}");
    // One RTO definition: the copy stored once the run finished and the report asked for now
    // measure to the same phase, the unfreeze.
    let stored: serde_json::Value = eventually(
        "the stored report rewritten once the run succeeded",
        Duration::from_secs(10),
        async || {
            let text = std::fs::read(stored.with_extension("json")).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
            (v["run"]["state"] == "succeeded").then_some(v)
        },
    )
    .await;
    let asked = c
        .handle
        .engine
        .report(&run.id, &[])
        .await
        .unwrap()
        .to_json();
    assert_eq!(stored["rto"]["until_phase"], "unfreeze", "{stored}");
    assert_eq!(asked["rto"]["until_phase"], stored["rto"]["until_phase"]);
    assert_eq!(asked["rto"]["until_at"], stored["rto"]["until_at"]);
    assert_eq!(asked["rto"]["measured_ms"], stored["rto"]["measured_ms"]);
    assert_eq!(
        asked["incidents"],
        serde_json::json!([]),
        "a run straight through"
    );

    // The drill's time from start to success is observed once, beside its phases' durations.
    let metrics_addr = c.handle.metrics_addr.unwrap();
    let metrics = eventually(
        "the drill in the restore-duration histogram",
        Duration::from_secs(10),
        async || {
            let text = http_get(metrics_addr, "/metrics").await.ok()?;
            text.contains(
                "rollcall_coordinator_restore_duration_seconds_count{environment=\"test\",kind=\"drill\"} 1\n",
            )
            .then_some(text)
        },
    )
    .await;
    for line in [
        "rollcall_runs_total{kind=\"drill\",outcome=\"succeeded\"} 1\n",
        "rollcall_phase_duration_seconds_bucket{action=\"freeze\",le=\"+Inf\"} 1\n",
        "rollcall_phase_duration_seconds_count{action=\"scale\"} 2\n",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    for a in agents {
        a.stop().await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_counts_declared_agents_that_never_connected_and_abort_keeps_the_freeze() {
    let f = Fleet3::new();
    // Three workers declared, two exist: scaling to zero cannot pass its gate.
    let c = f.coordinator(&[("web", 1), ("worker", 3)]).await;
    let agents = f.agents(&c.agents_url(), "0");
    c.wait_ready(&["web-1", "worker-1", "worker-2"]).await;

    let run = c.handle.engine.start_run(start("test")).await.unwrap();
    let blocked = wait_state(&c, &run.id, RunState::Blocked).await;
    let reason = blocked.reason.unwrap();
    assert!(
        reason.contains("phase scale-to-zero did not pass: succeeded: worker 2/3")
            && reason.contains("never connected: 1 of 3 worker")
            && reason.contains("traffic stays frozen"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read_to_string(f.log()).unwrap(),
        "frozen\n",
        "never unfrozen"
    );
    // While it waits for an operator, nothing else starts in its environment: not another
    // drill, not a backup (its point would straddle whatever the operator decides).
    for kind in [RunKind::Drill, RunKind::Backup] {
        let refused = c
            .handle
            .engine
            .start_run(StartRun {
                kind,
                ..start("test")
            })
            .await
            .unwrap_err();
        assert!(
            refused.downcast_ref::<RunConflict>().is_some(),
            "{refused:#}"
        );
        let text = format!("{refused:#}");
        assert!(
            text.contains(&format!("unfinished drill run {} (blocked)", run.id))
                && text.contains(&format!("rollcall run resume|retry|abort {}", run.id)),
            "{text}"
        );
    }

    let aborted = c
        .handle
        .engine
        .control(&run.id, Control::Abort)
        .await
        .unwrap();
    assert_eq!(aborted.state, RunState::Aborted);
    assert!(aborted.reason.unwrap().contains("the fleet stays frozen"));
    let again = c.handle.engine.control(&run.id, Control::Resume).await;
    assert!(again.unwrap_err().to_string().contains("already aborted"));
    // Once it is finished, the environment takes a new run.
    let next = c.handle.engine.start_run(start("test")).await.unwrap();
    c.handle
        .engine
        .control(&next.id, Control::Abort)
        .await
        .unwrap();

    for a in agents {
        a.stop().await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_coordinator_finishes_the_run_without_executing_a_command_twice() {
    let f = Fleet3::new();
    let first = f.coordinator(&[("web", 1), ("worker", 2)]).await;
    // The freeze takes a second: the coordinator dies while it is in flight.
    let agents = f.agents(&first.agents_url(), "1");
    first.wait_ready(&["web-1", "worker-1", "worker-2"]).await;
    let run = first.handle.engine.start_run(start("test")).await.unwrap();
    let store = first.handle.store().clone();
    eventually("freeze sent", Duration::from_secs(10), async || {
        let commands = store.commands(&run.id).await.unwrap();
        (!commands.is_empty()).then_some(())
    })
    .await;
    let agents_port = first.handle.agents_addr;
    first.stop().await;

    // A new coordinator (new epoch) on the same journal and the same address.
    let second = InProcessCoordinator::start_full_at(
        &f.certs,
        &f.state_url,
        Duration::from_secs(5),
        Duration::from_millis(200),
        environment(
            &[("web", 1), ("worker", 2)],
            &f.dir.path().join("repository"),
        ),
        agents_port,
    )
    .await;
    let done = wait_state(&second, &run.id, RunState::Succeeded).await;
    assert!(
        done.epoch < second.handle.epoch(),
        "the run was created under the old epoch"
    );
    // The freeze command was executed exactly once, though it was sent twice.
    assert_eq!(
        std::fs::read_to_string(f.log()).unwrap(),
        "frozen\nunfrozen\n"
    );
    let commands = second.handle.store().commands(&run.id).await.unwrap();
    let freeze = commands
        .iter()
        .find(|(c, _)| c.action == ActionKind::Freeze)
        .unwrap();
    assert_eq!(
        freeze.0.epoch,
        second.handle.epoch(),
        "re-sent under the new epoch"
    );
    // The report tells the takeover, though the run passed.
    let report = second.handle.engine.report(&run.id, &[]).await.unwrap();
    let kinds: Vec<&str> = report.incidents.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(kinds, ["coordinator took over"], "{:?}", report.incidents);
    assert!(
        report.incidents[0]
            .detail
            .contains(&format!("(epoch {})", second.handle.epoch().get())),
        "{:?}",
        report.incidents
    );
    assert!(
        report.to_markdown().contains("| coordinator took over |"),
        "{}",
        report.to_markdown()
    );

    for a in agents {
        a.stop().await;
    }
    second.stop().await;
}

/// Coordinator A is mid-phase when B takes a newer epoch on the same journal and finishes the
/// run (as when A was paused long enough to be replaced): A's next journal write is refused,
/// A stops driving, and the finished run stays as B left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_replaced_while_paused_changes_nothing_and_stops() {
    let f = Fleet3::new();
    let a = f.coordinator(&[("web", 1), ("worker", 2)]).await;
    // The freeze takes two seconds: B takes over while A waits for it.
    let agents = f.agents(&a.agents_url(), "2");
    a.wait_ready(&["web-1", "worker-1", "worker-2"]).await;
    let run = a.handle.engine.start_run(start("test")).await.unwrap();
    let store = a.handle.store().clone();
    eventually("freeze sent", Duration::from_secs(10), async || {
        let commands = store.commands(&run.id).await.unwrap();
        (!commands.is_empty()).then_some(())
    })
    .await;

    // B: a newer epoch on the same state store, and the run finished under it.
    let b_store = coordinator::store::open(&f.state_url).await.unwrap();
    let b = b_store.next_epoch("coordinator-b").await.unwrap();
    for mut phase in b_store.phases(&run.id).await.unwrap() {
        phase.state = PhaseState::Passed;
        phase.finished_at = Some(chrono::Utc::now());
        b_store.put_phase(&phase, b).await.unwrap();
    }
    b_store
        .set_run_state(&run.id, RunState::Succeeded, None, chrono::Utc::now(), b)
        .await
        .unwrap();
    let phases = b_store.phases(&run.id).await.unwrap();
    let commands = b_store.commands(&run.id).await.unwrap();
    let events = b_store.events(&run.id, 0, 1000).await.unwrap();

    // A's freeze answers; its journal write is fenced and it stops driving.
    tokio::time::timeout(Duration::from_secs(30), a.handle.engine.idle())
        .await
        .expect("the fenced coordinator stops driving");
    let late = a.handle.engine.start_run(start("test")).await.unwrap_err();
    assert!(
        format!("{late:#}").contains("is fenced: a newer coordinator took epoch"),
        "a fenced coordinator starts no run: {late:#}"
    );
    assert_eq!(b_store.phases(&run.id).await.unwrap(), phases);
    assert_eq!(b_store.commands(&run.id).await.unwrap(), commands);
    assert_eq!(b_store.events(&run.id, 0, 1000).await.unwrap(), events);
    let finished = b_store.run(&run.id).await.unwrap().unwrap();
    assert_eq!(finished.state, RunState::Succeeded);
    assert_eq!(b_store.list_runs(10).await.unwrap().len(), 1);
    // Nothing after the freeze ran: the workers were never scaled, nothing unfroze.
    assert_eq!(std::fs::read_to_string(f.log()).unwrap(), "frozen\n");

    for agent in agents {
        agent.stop().await;
    }
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_cannot_pass_blocks_and_resume_completes_once_the_agent_is_back() {
    let f = Fleet3::new();
    // Short phases: the missing agent's gate fails after three seconds.
    let plan = PLAN.replace("timeout = \"20s\"", "timeout = \"3s\"");
    let c = InProcessCoordinator::start_full(
        &f.certs,
        &f.state_url,
        Duration::from_secs(2),
        Duration::from_millis(200),
        environment_with(
            &[("web", 1), ("worker", 2)],
            &f.dir.path().join("repository"),
            &plan,
        ),
    )
    .await;
    let mut agents = f.agents(&c.agents_url(), "0");
    c.wait_ready(&["web-1", "worker-1", "worker-2"]).await;
    // worker-2's agent dies before the run (and the coordinator has seen it go, so its loss
    // is not an incident of the run).
    agents.pop().unwrap().stop().await;
    let handle = c.handle.clone();
    eventually(
        "the registry to see worker-2 go",
        Duration::from_secs(10),
        async || {
            handle
                .agents()
                .into_iter()
                .any(|a| {
                    a.name.as_str() == "worker-2"
                        && a.availability != api::model::Availability::Connected
                })
                .then_some(())
        },
    )
    .await;

    let run = c
        .handle
        .engine
        .start_run(StartRun {
            excluded: vec!["local Desktop threads (stay local)".into()],
            ..start("test")
        })
        .await
        .unwrap();
    let blocked = wait_state(&c, &run.id, RunState::Blocked).await;
    let reason = blocked.reason.unwrap();
    assert!(
        reason.contains("phase scale-to-zero did not pass") && reason.contains("worker-2"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read_to_string(f.log()).unwrap(),
        "frozen\n",
        "frozen, never unfrozen"
    );

    // The agent comes back (same state directory); the operator resumes.
    agents.push(f.worker(&c.agents_url(), "worker-2"));
    c.wait_ready(&["worker-2"]).await;
    let resumed = c
        .handle
        .engine
        .control(&run.id, Control::Resume)
        .await
        .unwrap();
    assert_eq!(resumed.state, RunState::Running);
    wait_state(&c, &run.id, RunState::Succeeded).await;
    // Resume re-sent the same command ids: the freeze ran once, the unfreeze once.
    assert_eq!(
        std::fs::read_to_string(f.log()).unwrap(),
        "frozen\nunfrozen\n"
    );
    let commands = c.handle.store().commands(&run.id).await.unwrap();
    let scale_downs: Vec<_> = commands
        .iter()
        .filter(|(cmd, _)| cmd.action == ActionKind::Scale && cmd.phase_index == 1)
        .collect();
    assert_eq!(
        scale_downs.len(),
        2,
        "one scale-down per worker: {scale_downs:?}"
    );
    // The report tells the blocked attempt, the agent back and the resume, in that order; and
    // what the operator excluded at the start.
    let report = c.handle.engine.report(&run.id, &[]).await.unwrap();
    let kinds: Vec<&str> = report.incidents.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["phase blocked", "agent back", "operator resume"],
        "{:?}",
        report.incidents
    );
    assert_eq!(report.incidents[0].phase.as_deref(), Some("scale-to-zero"));
    assert!(
        report.incidents[0].detail.starts_with("attempt 1: ")
            && report.incidents[0].detail.contains("worker-2"),
        "{:?}",
        report.incidents
    );
    assert_eq!(report.incidents[1].agent.as_deref(), Some("worker-2"));
    assert_eq!(
        report.excluded,
        ["local Desktop threads (stay local) (declared by the operator)"]
    );

    for a in agents {
        a.stop().await;
    }
    c.stop().await;
}

/// `--point latest` takes the point the repository committed last, not the one with the latest
/// stamp: a point committed while a clock ran 10 minutes fast no longer wins. The operator
/// listing keeps commit order, flags the fast point and never counts it as within the RPO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_is_the_last_committed_point_whatever_its_stamp() {
    let f = Fleet3::new();
    let repo_dir = f.dir.path().join("repository");
    let c = InProcessCoordinator::start_full(
        &f.certs,
        &f.state_url,
        Duration::from_secs(5),
        Duration::from_millis(200),
        environment_with(
            &[("web", 1), ("worker", 1), ("objects", 1)],
            &repo_dir,
            include_str!("plans/objects-only.toml"),
        ),
    )
    .await;
    let repo_url = format!("file://{}", repo_dir.display());
    let repo = repository::Repository::open(&repo_url, Default::default())
        .await
        .unwrap();
    let live = f.dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("a.bin"), b"object").unwrap();
    let (store, _) =
        repository::store_from_url(&format!("file://{}", live.display()), &Default::default())
            .unwrap();
    let part = repository::snapshot_objects(
        &repo,
        store,
        &repository::SnapshotOptions::new("file:///live"),
        None,
    )
    .await
    .unwrap();
    let now = chrono::Utc::now();
    let mut committed = Vec::new();
    for stamp in [now + chrono::Duration::minutes(10), now] {
        let point = repo
            .write_point_stamped(
                repository::NewPoint {
                    id: repository::PointId::new("test", stamp).unwrap(),
                    postgres: None,
                    objects: Some(part.clone()),
                    secrets: vec![],
                },
                stamp,
            )
            .await
            .unwrap();
        committed.push(point.id.to_string());
    }
    let (fast, real) = (&committed[0], &committed[1]);

    let run = c
        .handle
        .engine
        .start_run(StartRun {
            point_id: Some("latest".into()),
            ..start("test")
        })
        .await
        .unwrap();
    assert_eq!(run.point_id.as_deref(), Some(real.as_str()));
    c.handle
        .engine
        .control(&run.id, Control::Abort)
        .await
        .unwrap();

    let listing = c.handle.engine.list_points(Some("test")).await.unwrap();
    let ids: Vec<String> = listing
        .points
        .iter()
        .map(|s| s.point.id.to_string())
        .collect();
    assert_eq!(ids, [fast.clone(), real.clone()], "commit order");
    let ahead = listing.points[0].stamped_ahead.unwrap();
    assert!(ahead > Duration::from_secs(9 * 60), "{ahead:?}");
    assert!(
        listing.points[0].stale,
        "a future stamp is not within the RPO"
    );
    assert!(!listing.points[1].stale && listing.points[1].stamped_ahead.is_none());

    // Kept copies of an environment without a database: its quarantines alone, no complaint
    // about database agents it does not declare, and a prune goes ahead.
    let kept = c.handle.engine.list_kept("test").await.unwrap();
    assert!(kept.problems.is_empty(), "{:?}", kept.problems);
    let pruned = c
        .handle
        .engine
        .prune_kept(
            "test",
            false,
            coordinator::engine::kept::PruneRules {
                keep_last: 2,
                older_than: None,
            },
        )
        .await
        .unwrap();
    assert!(pruned.problems.is_empty(), "{:?}", pruned.problems);
    c.stop().await;
}

/// What `rollcall run undo` refuses, read from the journal before anything starts (the undos
/// themselves run in tests/undo.rs): a run still going, a run that changed nothing live, a run
/// a later restore replaced, a run that unfroze without --force; each refusal names why and
/// starts no run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_refusals_are_read_from_the_journal_and_start_nothing() {
    use api::model::Outcome;
    use coordinator::store::{CommandRecord, NewRun, ResultRecord};

    let f = Fleet3::new();
    let c = f.coordinator(&[("web", 1), ("worker", 2)]).await;
    let store = c.handle.store().clone();
    let epoch = store.latest_epoch().await.unwrap().unwrap();
    let base = chrono::Utc::now() - chrono::Duration::minutes(10);
    // A drill journaled by hand: its commands (with a result each) and its final state.
    let journal = async |id: &str, minutes: i64, actions: &[ActionKind], state: RunState| {
        store
            .create_run(&NewRun {
                id: id.to_owned(),
                kind: RunKind::Drill,
                environment: "test".into(),
                point_id: None,
                plan: PLAN.to_owned(),
                params: serde_json::json!({ "plan": "roles-only" }),
                epoch,
                created_at: base + chrono::Duration::minutes(minutes),
            })
            .await
            .unwrap();
        for (i, action) in actions.iter().enumerate() {
            let command_id = format!("{id}/p{i}/web-1/a1/s0/r0");
            store
                .record_command(&CommandRecord {
                    command_id: command_id.clone(),
                    run_id: id.to_owned(),
                    phase_index: i as u32,
                    agent: "web-1".into(),
                    action: *action,
                    payload: serde_json::json!({}),
                    attempt: 1,
                    epoch,
                    created_at: chrono::Utc::now(),
                })
                .await
                .unwrap();
            store
                .record_result(
                    &ResultRecord {
                        command_id,
                        agent: "web-1".into(),
                        epoch,
                        outcome: Outcome::Succeeded,
                        replayed: false,
                        detail: String::new(),
                        output: None,
                        received_at: chrono::Utc::now(),
                    },
                    epoch,
                )
                .await
                .unwrap();
        }
        if state != RunState::Pending {
            store
                .set_run_state(
                    id,
                    state,
                    Some("journaled by the test"),
                    chrono::Utc::now(),
                    epoch,
                )
                .await
                .unwrap();
        }
    };
    let undo = async |id: &str, force: bool| {
        let refused = c
            .handle
            .engine
            .control(id, Control::Undo { force })
            .await
            .unwrap_err();
        format!("{refused:#}")
    };
    use ActionKind::{CommitPostgres, Freeze, Preflight, RestoreObjects, Unfreeze};

    journal("drill-test-nothing", 0, &[Preflight], RunState::Blocked).await;
    let err = undo("drill-test-nothing", false).await;
    assert!(
        err.contains("run drill-test-nothing (blocked) changed nothing live")
            && err.contains("no undo run was started"),
        "{err}"
    );
    store
        .set_run_state(
            "drill-test-nothing",
            RunState::Aborted,
            None,
            chrono::Utc::now(),
            epoch,
        )
        .await
        .unwrap();

    journal(
        "drill-test-older",
        1,
        &[Freeze, CommitPostgres, RestoreObjects, Unfreeze],
        RunState::Succeeded,
    )
    .await;
    journal(
        "drill-test-going",
        2,
        &[Freeze, CommitPostgres],
        RunState::Running,
    )
    .await;
    let err = undo("drill-test-going", true).await;
    assert!(
        err.contains("run drill-test-going is running")
            && err.contains("an undo takes back a run that has stopped"),
        "{err}"
    );
    let err = undo("drill-test-older", true).await;
    assert!(
        err.contains("run drill-test-going restored environment test after run drill-test-older")
            && err.contains("`rollcall run undo drill-test-going`"),
        "{err}"
    );
    store
        .set_run_state(
            "drill-test-going",
            RunState::Succeeded,
            None,
            chrono::Utc::now(),
            epoch,
        )
        .await
        .unwrap();
    // A run whose unfreeze succeeded needs --force.
    journal(
        "drill-test-newest",
        3,
        &[Freeze, CommitPostgres, Unfreeze],
        RunState::Succeeded,
    )
    .await;
    let err = undo("drill-test-newest", false).await;
    assert!(
        err.contains("run drill-test-newest unfroze the fleet")
            && err.contains("`rollcall run undo drill-test-newest --force`"),
        "{err}"
    );
    let runs = store.list_runs(100).await.unwrap();
    assert!(
        runs.iter().all(|r| r.kind != RunKind::Undo),
        "no undo run started: {runs:?}"
    );
}

/// A coordinator that stopped between journaling a scheduled restore test that found no point
/// and marking it failed leaves a pending drill with neither a point nor a time: its successor
/// fails it, saying why, instead of driving phases that can only fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_left_without_a_point_is_failed_by_the_next_coordinator_not_driven() {
    let f = Fleet3::new();
    let store = coordinator::store::open(&f.state_url).await.unwrap();
    let epoch = store.next_epoch("a stopped coordinator").await.unwrap();
    let id = "drill-test-20261206T000000-0bad";
    store
        .create_run(&coordinator::store::NewRun {
            id: id.to_owned(),
            kind: RunKind::Drill,
            environment: "test".to_owned(),
            point_id: None,
            plan: PLAN.to_owned(),
            params: serde_json::json!({
                "plan": "restore-test",
                "restore_test": { "source": "prod", "teardown": "on-success" }
            }),
            epoch,
            created_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    drop(store);

    let c = f.coordinator(&[("web", 1), ("worker", 2)]).await;
    let run = wait_state(&c, id, RunState::Failed).await;
    assert!(
        run.reason
            .as_deref()
            .is_some_and(|r| r.contains("no recovery point to restore")),
        "{run:?}"
    );
    assert!(
        c.handle.store().phases(id).await.unwrap().is_empty(),
        "no phase was driven"
    );
    c.stop().await;
}

/// A base backup is a backup run of the built-in base-backup plan: asked with another kind or
/// a plan of the caller's, or of an environment without a database agent, it is refused at
/// start with one line saying what to do, and nothing is journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backup_runs_are_refused_where_no_database_agent_takes_them() {
    let f = Fleet3::new();
    let c = f.coordinator(&[("web", 1), ("worker", 2)]).await;
    let base = |kind, plan: Option<(String, String)>| StartRun {
        kind,
        plan,
        base_backup: true,
        ..start("test")
    };
    let plan = Some((
        "plan.toml".to_owned(),
        include_str!("../deploy/plans/base-backup.toml").to_owned(),
    ));
    for (request, needle) in [
        (
            base(RunKind::Drill, None),
            "a base backup is a backup run of the built-in base-backup plan: start it with \
             `rollcall backup --env test --base`",
        ),
        (
            base(RunKind::Backup, plan),
            "a base backup is a backup run of the built-in base-backup plan",
        ),
        (
            base(RunKind::Backup, None),
            "environment test declares no database agent: a base backup is taken by the \
             database agent (with [postgres.physical] in its agent.toml)",
        ),
    ] {
        let err = c.handle.engine.start_run(request).await.unwrap_err();
        let text = api::errors::one_line(&*err);
        assert!(text.contains(needle), "{needle:?} in {text}");
    }
    assert!(c.handle.store().list_runs(10).await.unwrap().is_empty());
    c.stop().await;
}
