//! Operator roles and the two-person rule through the real `rollcall` binary, over real mTLS,
//! against an in-process coordinator and agents (a plan without data phases: freeze, scale,
//! report, unfreeze; web freezes by appending to a log, so "nothing frozen" is a file's
//! content). Operators are certificates from `certs init --operator NAME:ROLE` picked with
//! `--operator NAME`, and named tokens.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use coordinator::config::Environment;
use coordinator::engine::{StartRun, Starter};
use coordinator::store::{PhaseState, RunKind, RunState};
use e2e::*;

const PLAN: &str = include_str!("plans/roles-only.toml");

struct Setup {
    dir: tempfile::TempDir,
    certs: PathBuf,
    state_url: String,
}

impl Setup {
    fn new() -> Setup {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let certs = certs_with_operators(
            dir.path(),
            &["web-1:web", "worker-1:worker"],
            &["vera:viewer", "oscar:operator", "ada:admin", "adam:admin"],
        );
        let state_url = format!("sqlite://{}/state.db", dir.path().display());
        Setup {
            dir,
            certs,
            state_url,
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("freeze.log")
    }

    fn frozen_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Environment `test`: web and one worker, the roles-only plan.
    fn environment(&self, protected: bool, approvals: u32, timeout: Duration) -> Environment {
        Environment {
            protected,
            approvals,
            approval_timeout: timeout,
            ..test_environment(
                "test",
                &[("web", 1), ("worker", 1)],
                &self.dir.path().join("repository"),
                PLAN,
            )
        }
    }

    /// A coordinator with `env`, its agent listener on `agents` (a replacement listens where
    /// the agents already dial).
    async fn coordinator_at(&self, env: Environment, agents: SocketAddr) -> InProcessCoordinator {
        InProcessCoordinator::start_full_at(
            &self.certs,
            &self.state_url,
            Duration::from_secs(5),
            Duration::from_millis(200),
            BTreeMap::from([("test".to_owned(), env)]),
            agents,
        )
        .await
    }

    async fn coordinator(&self, env: Environment) -> InProcessCoordinator {
        self.coordinator_at(env, "127.0.0.1:0".parse().unwrap())
            .await
    }

    fn agents(&self, url: &str) -> Vec<InProcessAgent> {
        let mut web = agent_settings(&self.certs, self.dir.path(), url, "web-1", "web");
        web.control = toml::from_str(&format!(
            r#"
            freeze = "exec"
            [exec]
            freeze = ["sh", "-c", "echo frozen >> {log}"]
            unfreeze = ["sh", "-c", "echo unfrozen >> {log}"]
            "#,
            log = self.log().display()
        ))
        .unwrap();
        let mut worker = agent_settings(&self.certs, self.dir.path(), url, "worker-1", "worker");
        worker.control = toml::from_str(
            r#"
            scale = "process"
            [process]
            program = "sh"
            args = ["-c", "while true; do sleep 0.05; done"]
            replicas = 1
            stop_grace = "1s"
            "#,
        )
        .unwrap();
        vec![InProcessAgent::start(web), InProcessAgent::start(worker)]
    }
}

/// Who runs a `rollcall` command: an operator certificate, or a token.
enum As<'a> {
    Cert(&'a str),
    Token(&'a str),
}

fn cli(s: &Setup, c: &InProcessCoordinator, who: As<'_>, args: &[&str]) -> Output {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    all.extend(["--coordinator".to_owned(), c.operator_url()]);
    let mut env = Vec::new();
    match who {
        As::Cert(name) => {
            all.extend([
                "--certs".to_owned(),
                s.certs.display().to_string(),
                "--operator".to_owned(),
                name.to_owned(),
            ]);
        }
        As::Token(token) => {
            all.extend([
                "--ca".to_owned(),
                s.certs.join("ca.pem").display().to_string(),
            ]);
            env.push(("ROLLCALL_TOKEN".to_owned(), token.to_owned()));
        }
    }
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    rollcall_with_env(&refs, &env)
}

fn started(out: &Output) -> String {
    let v = ok(out, "drill --json");
    v["id"].as_str().unwrap().to_owned()
}

async fn wait_state(c: &InProcessCoordinator, id: &str, want: RunState) -> String {
    let store = c.handle.store().clone();
    eventually(
        &format!("run {id} {want}"),
        Duration::from_secs(60),
        async || {
            let run = store.run(id).await.unwrap().unwrap();
            (run.state == want).then(|| run.reason.unwrap_or_default())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_from_certificates_and_tokens_decide_who_may_drill() {
    let s = Setup::new();
    // An environment that is not protected: operators drill it, viewers only look.
    let c = s
        .coordinator(s.environment(false, 0, Duration::from_secs(60)))
        .await;
    let agents = s.agents(&c.agents_url());
    c.wait_ready(&["web-1", "worker-1"]).await;

    let drill = ["drill", "--env", "test", "--json"];
    fails_with(
        &cli(&s, &c, As::Cert("vera"), &drill),
        &[
            "operator vera has the viewer role and may not start a drill run of environment test",
            "that needs the operator role",
        ],
    );
    ok(
        &cli(&s, &c, As::Cert("vera"), &["runs", "--json"]),
        "viewer lists runs",
    );
    ok(
        &cli(&s, &c, As::Cert("vera"), &["agents", "--json"]),
        "viewer lists agents",
    );
    fails_with(
        &cli(&s, &c, As::Token("viewer-token"), &drill),
        &[
            "operator tvera has the viewer role",
            "needs the operator role",
        ],
    );
    let id = started(&cli(&s, &c, As::Cert("oscar"), &drill));
    wait_state(&c, &id, RunState::Succeeded).await;
    let show = ok(
        &cli(&s, &c, As::Cert("vera"), &["run", "show", &id, "--json"]),
        "run show",
    );
    assert_eq!(show["run"]["started_by"], "oscar", "{show}");
    assert_eq!(show["run"]["started_by_role"], "operator", "{show}");
    // Prunes take an admin (a dry run only reads).
    fails_with(
        &cli(
            &s,
            &c,
            As::Cert("oscar"),
            &["kept", "prune", "--env", "test"],
        ),
        &["may not prune kept copies: that needs the admin role"],
    );
    let agents_addr = c.handle.agents_addr;
    c.stop().await;

    // The same environment, protected: only admins drill it.
    let c = s
        .coordinator_at(s.environment(true, 0, Duration::from_secs(60)), agents_addr)
        .await;
    c.wait_ready(&["web-1", "worker-1"]).await;
    fails_with(
        &cli(&s, &c, As::Cert("oscar"), &drill),
        &[
            "operator oscar has the operator role and may not start a drill run of environment \
             test (a protected environment): that needs the admin role",
        ],
    );
    fails_with(
        &cli(&s, &c, As::Token("operator-token"), &drill),
        &[
            "operator toscar has the operator role",
            "needs the admin role",
        ],
    );
    fails_with(
        &cli(&s, &c, As::Cert("vera"), &drill),
        &["needs the admin role"],
    );
    let before = s.frozen_log();
    assert_eq!(before, "frozen\nunfrozen\n", "only oscar's drill froze");

    let id = started(&cli(&s, &c, As::Token("admin-token"), &drill));
    wait_state(&c, &id, RunState::Succeeded).await;
    let id = started(&cli(&s, &c, As::Cert("ada"), &drill));
    wait_state(&c, &id, RunState::Succeeded).await;
    let report = cli(
        &s,
        &c,
        As::Cert("vera"),
        &["report", &id, "--format", "json"],
    );
    let report = ok(&report, "report");
    assert_eq!(
        report["run"]["started_by"], "ada (admin, by certificate)",
        "{report}"
    );
    let runs = ok(&cli(&s, &c, As::Cert("vera"), &["runs", "--json"]), "runs");
    let by: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["started_by"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["ada", "tada", "oscar"], "newest first: {runs}");
    // The operator.pem of `certs init` stays an admin.
    let mut args: Vec<String> = ["runs", "--json", "--coordinator"]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    args.extend([
        c.operator_url(),
        "--certs".into(),
        s.certs.display().to_string(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&rollcall(&refs), "operator.pem");

    for a in agents {
        a.stop().await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_drill_waits_for_another_operators_approval() {
    let s = Setup::new();
    let c = s
        .coordinator(s.environment(true, 1, Duration::from_secs(120)))
        .await;
    let agents = s.agents(&c.agents_url());
    c.wait_ready(&["web-1", "worker-1"]).await;
    let store = c.handle.store().clone();
    let approve_phase = |id: String| {
        let store = store.clone();
        async move {
            eventually(
                "the run waiting at its approve phase",
                Duration::from_secs(30),
                async || {
                    let phases = store.phases(&id).await.unwrap();
                    phases
                        .iter()
                        .any(|p| p.name == "approve" && p.state == PhaseState::Running)
                        .then_some(())
                },
            )
            .await
        }
    };

    let drill = ["drill", "--env", "test", "--json"];
    let id = started(&cli(&s, &c, As::Cert("ada"), &drill));
    approve_phase(id.clone()).await;
    let show = ok(
        &cli(&s, &c, As::Cert("vera"), &["run", "show", &id, "--json"]),
        "run show",
    );
    assert_eq!(show["run"]["state"], "running", "{show}");
    assert_eq!(s.frozen_log(), "", "nothing is frozen while it waits");

    // The starter cannot approve their own run; an operator is refused by role.
    fails_with(
        &cli(&s, &c, As::Cert("ada"), &["run", "approve", &id]),
        &[&format!(
            "operator ada started run {id} and cannot approve it"
        )],
    );
    fails_with(
        &cli(&s, &c, As::Cert("oscar"), &["run", "approve", &id]),
        &[
            "may not approve a drill run of environment test",
            "needs the admin role",
        ],
    );
    // A token's role applies the same way: an admin token approves.
    let approved = cli(&s, &c, As::Token("admin-token"), &["run", "approve", &id]);
    ok(&approved, "approve");
    assert!(
        String::from_utf8_lossy(&approved.stdout).contains(&format!("run {id} is approved (tada)")),
        "{}",
        String::from_utf8_lossy(&approved.stdout)
    );
    wait_state(&c, &id, RunState::Succeeded).await;
    assert_eq!(s.frozen_log(), "frozen\nunfrozen\n");
    let report = ok(
        &cli(
            &s,
            &c,
            As::Cert("vera"),
            &["report", &id, "--format", "json"],
        ),
        "report",
    );
    assert_eq!(report["approvals_required"], 1, "{report}");
    assert_eq!(report["approvals"][0]["by"], "tada", "{report}");
    assert_eq!(report["approvals"][0]["decision"], "approved", "{report}");
    let md = cli(&s, &c, As::Cert("vera"), &["report", &id]);
    let md = String::from_utf8_lossy(&md.stdout);
    assert!(
        md.contains("## Approvals") && md.contains("| tada | admin | approved |"),
        "{md}"
    );
    // A decision once the run went on is refused.
    fails_with(
        &cli(&s, &c, As::Cert("adam"), &["run", "approve", &id]),
        &["already succeeded"],
    );

    // A rejection blocks it, with nothing frozen; the same operator approving twice counts
    // once (with two approvals needed it would still wait).
    let id = started(&cli(&s, &c, As::Cert("ada"), &drill));
    approve_phase(id.clone()).await;
    let out = cli(
        &s,
        &c,
        As::Cert("adam"),
        &["run", "reject", &id, "--reason", "not during the sale"],
    );
    ok(&out, "reject");
    let reason = wait_state(&c, &id, RunState::Blocked).await;
    assert!(
        reason.contains("phase approve did not pass: rejected by adam: not during the sale")
            && reason.contains("nothing was frozen or changed"),
        "{reason}"
    );
    assert_eq!(
        s.frozen_log(),
        "frozen\nunfrozen\n",
        "the rejected run froze nothing"
    );
    let watch = cli(&s, &c, As::Cert("vera"), &["run", "watch", &id]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&watch.stdout),
        String::from_utf8_lossy(&watch.stderr)
    );
    assert!(!watch.status.success(), "a blocked run's watch fails");
    assert!(
        text.contains("waiting for 1 approval(s) from operators other than ada")
            && text.contains("rejected by adam (admin): not during the sale"),
        "{text}"
    );
    let report = ok(
        &cli(
            &s,
            &c,
            As::Cert("vera"),
            &["report", &id, "--format", "json"],
        ),
        "report",
    );
    assert_eq!(report["approvals"][0]["decision"], "rejected", "{report}");
    assert_eq!(
        report["approvals"][0]["reason"], "not during the sale",
        "{report}"
    );
    ok(
        &cli(&s, &c, As::Cert("ada"), &["run", "abort", &id]),
        "abort",
    );

    for a in agents {
        a.stop().await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unapproved_run_blocks_at_its_timeout_and_a_retry_waits_again() {
    let s = Setup::new();
    let c = s
        .coordinator(s.environment(true, 2, Duration::from_secs(2)))
        .await;
    let agents = s.agents(&c.agents_url());
    c.wait_ready(&["web-1", "worker-1"]).await;
    let engine = c.handle.engine.clone();
    let as_ = |name: &str| Starter {
        name: name.into(),
        role: "admin".into(),
        via: "certificate".into(),
    };
    let run = engine
        .start_run_by(
            StartRun {
                environment: "test".into(),
                kind: RunKind::Drill,
                point_id: None,
                plan: None,
                excluded: Vec::new(),
                to_time: None,
                base_backup: false,
            },
            Some(as_("ada")),
        )
        .await
        .unwrap();
    // One approval of two, given twice: still one.
    for _ in 0..2 {
        engine
            .decide(&run.id, &as_("adam"), true, "")
            .await
            .unwrap();
    }
    let reason = wait_state(&c, &run.id, RunState::Blocked).await;
    assert!(
        reason.contains("phase approve did not pass: 1 of 2 approvals within 2s")
            && reason.contains(&format!("`rollcall run retry {}` waits again", run.id)),
        "{reason}"
    );
    assert_eq!(s.frozen_log(), "", "a run that timed out froze nothing");

    // A retry waits again, and a second approver lets it run.
    engine
        .control(&run.id, coordinator::engine::Control::Retry)
        .await
        .unwrap();
    engine.decide(&run.id, &as_("bea"), true, "").await.unwrap();
    wait_state(&c, &run.id, RunState::Succeeded).await;
    assert_eq!(s.frozen_log(), "frozen\nunfrozen\n");

    for a in agents {
        a.stop().await;
    }
    c.stop().await;
}

#[test]
fn certs_init_adds_operators_with_their_role_beside_operator_pem() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = rollcall(&[
        "certs",
        "init",
        "--dir",
        certs.to_str().unwrap(),
        "--operator",
        "boss",
        "--operator",
        "kim:viewer",
        "--operator",
        "lee:operator",
    ]);
    ok(&out, "certs init");
    let ids = |path: PathBuf| api::identity::in_certificate_pem(&std::fs::read(path).unwrap());
    use api::identity::{Identity, OperatorRole};
    let operator = |name: &str, role| Identity::Operator {
        name: name.into(),
        role,
    };
    assert_eq!(
        ids(certs.join("operator.pem")),
        [operator("boss", OperatorRole::Admin)]
    );
    assert_eq!(
        ids(certs.join("operators/kim.pem")),
        [operator("kim", OperatorRole::Viewer)]
    );
    assert_eq!(
        ids(certs.join("operators/lee.pem")),
        [operator("lee", OperatorRole::Operator)]
    );
    assert!(certs.join("operators/kim-key.pem").exists());

    fails_with(
        &rollcall(&[
            "certs",
            "init",
            "--dir",
            certs.to_str().unwrap(),
            "--operator",
            "kim:root",
        ]),
        &[
            "--operator \"kim:root\"",
            "not one of viewer, operator, admin",
        ],
    );
    // An operator without a certificate is named, with the command that issues one.
    fails_with(
        &rollcall(&[
            "runs",
            "--certs",
            certs.to_str().unwrap(),
            "--operator",
            "nobody",
        ]),
        &[
            "no certificate for operator nobody",
            "--operator nobody:ROLE",
        ],
    );
}
