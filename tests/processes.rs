//! Real-process tests: the built `rollcall` binary as coordinator and agents on loopback,
//! with certificates from `rollcall certs init`, SIGKILL and restart, bad config files, and
//! one trace across processes collected by an in-test OTLP collector.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use e2e::*;

/// A coordinator process on the harness's plain config, listening at `agents` and `operator`.
fn start_coordinator(dir: &Path, certs: &Path, agents: SocketAddr, operator: SocketAddr) -> Proc {
    let config = write_coordinator_config(dir, certs, agents, operator, "");
    spawn_rollcall(
        "coordinator",
        dir,
        &["coordinator", "--config", config.to_str().unwrap()],
        &[],
    )
}

fn agent_state(json: &serde_json::Value, name: &str) -> Option<(String, bool)> {
    json["agents"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .map(|a| {
            (
                a["availability"].as_str().unwrap_or_default().to_owned(),
                a["ready"].as_bool().unwrap_or(false),
            )
        })
}

/// Something that accepts connections at the coordinator's address but never answers (a load
/// balancer in front of a stopped coordinator, a hung process): the agent gives each attempt
/// `reconnect.attach_timeout`, retries, and attaches once a coordinator answers there; an
/// operator command gives up with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_the_cli_give_up_on_a_silent_peer_and_attach_when_the_coordinator_answers() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_init(dir.path(), &["web-1:web"]);
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    let silent = std::net::TcpListener::bind(agents_addr).unwrap();
    silent.set_nonblocking(true).unwrap();
    let cfg = write_agent_config(dir.path(), &certs, agents_addr, "web-1", "web", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("max = \"1s\"\n", "max = \"1s\"\nattach_timeout = \"1s\"\n"),
    )
    .unwrap();
    let agent = spawn_rollcall(
        "web-1",
        dir.path(),
        &["agent", "--config", cfg.to_str().unwrap()],
        &[],
    );
    // Accept and hold every connection without a byte in reply.
    let mut held = Vec::new();
    let gave_up = "no welcome from the coordinator within 1s";
    eventually(
        "the agent to give up twice",
        Duration::from_secs(30),
        async || {
            while let Ok((conn, _)) = silent.accept() {
                held.push(conn);
            }
            (agent.log_text().matches(gave_up).count() >= 2).then_some(())
        },
    )
    .await;
    assert!(
        held.len() >= 2,
        "one connection per attempt: {}",
        held.len()
    );
    // An operator command against it ends with one line instead of hanging.
    let out = rollcall(&[
        "agents",
        "--coordinator",
        &format!("https://{agents_addr}"),
        "--certs",
        certs.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no answer within 10s; something accepts connections there"),
        "{stderr}"
    );

    // The coordinator comes up at that address: the agent attaches on its next attempt.
    drop((silent, held));
    let _coordinator = start_coordinator(dir.path(), &certs, agents_addr, operator_addr);
    fleet_ready(
        operator_addr,
        &certs,
        &["web-1"],
        dir.path(),
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_processes_attaches_loses_an_agent_and_gets_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_init(
        dir.path(),
        &["web-1:web", "worker-1:worker", "db-1:database"],
    );
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    let _coordinator = start_coordinator(dir.path(), &certs, agents_addr, operator_addr);

    let roles = [
        ("web-1", "web"),
        ("worker-1", "worker"),
        ("db-1", "database"),
    ];
    let mut agents: Vec<Proc> = roles
        .iter()
        .map(|(n, r)| {
            let cfg = write_agent_config(dir.path(), &certs, agents_addr, n, r, "");
            spawn_rollcall(
                n,
                dir.path(),
                &["agent", "--config", cfg.to_str().unwrap()],
                &[],
            )
        })
        .collect();

    eventually(
        "all three agents connected and ready",
        Duration::from_secs(30),
        async || {
            let json = agents_json(operator_addr, &certs).ok()?;
            roles
                .iter()
                .all(|(n, _)| agent_state(&json, n) == Some(("connected".into(), true)))
                .then_some(())
        },
    )
    .await;
    let json = agents_json(operator_addr, &certs).unwrap();
    let db = json["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "db-1")
        .unwrap();
    assert_eq!(db["role"], "database");
    assert!(db["last_heartbeat_unix_ms"].as_i64().unwrap() > 0);
    assert!(json["epoch"].as_u64().unwrap() >= 1);

    // SIGKILL the worker's agent: the coordinator shows it unavailable within its timeout.
    agents[1].kill();
    let killed_at = std::time::Instant::now();
    eventually(
        "worker-1 unavailable",
        Duration::from_secs(10),
        async || {
            let json = agents_json(operator_addr, &certs).ok()?;
            (agent_state(&json, "worker-1")?.0 == "unavailable").then_some(())
        },
    )
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "noticed within the 2s timeout (plus polling)"
    );
    let json = agents_json(operator_addr, &certs).unwrap();
    assert_eq!(
        agent_state(&json, "web-1"),
        Some(("connected".into(), true)),
        "others unaffected"
    );

    // Restart it: it is back, with its state directory (and so its epoch) intact.
    let cfg = dir.path().join("worker-1.toml");
    agents[1] = spawn_rollcall(
        "worker-1-restarted",
        dir.path(),
        &["agent", "--config", cfg.to_str().unwrap()],
        &[],
    );
    eventually("worker-1 back", Duration::from_secs(30), async || {
        let json = agents_json(operator_addr, &certs).ok()?;
        (agent_state(&json, "worker-1")? == ("connected".into(), true)).then_some(())
    })
    .await;

    // Human output names every agent too.
    let out = rollcall(&[
        "agents",
        "--coordinator",
        &format!("https://127.0.0.1:{}", operator_addr.port()),
        "--certs",
        certs.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    for (n, r) in roles {
        assert!(
            text.lines()
                .any(|l| l.starts_with(n) && l.contains(r) && l.contains("connected")),
            "{text}"
        );
    }

    // Agents stop cleanly on SIGTERM.
    for mut a in agents {
        assert!(
            a.terminate(Duration::from_secs(10)),
            "{} did not exit cleanly: {}",
            a.name,
            a.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_without_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_init(dir.path(), &[]);
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    let _coordinator = start_coordinator(dir.path(), &certs, agents_addr, operator_addr);
    eventually(
        "coordinator listening",
        Duration::from_secs(20),
        async || agents_json(operator_addr, &certs).ok(),
    )
    .await;
    let url = format!("https://127.0.0.1:{}", operator_addr.port());
    let out = rollcall(&[
        "agents",
        "--coordinator",
        &url,
        "--ca",
        certs.join("ca.pem").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("operator call without an operator certificate or token"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// Every bad config exits non-zero with one line naming the file and key, and what to do.
#[test]
fn bad_configs_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_init(dir.path(), &["web-1:web"]);
    let (a, o) = (free_addr(), free_addr());
    let good = write_coordinator_config(dir.path(), &certs, a, o, "");
    let good_text = std::fs::read_to_string(&good).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let agent_good = write_agent_config(dir.path(), &certs, a, "web-1", "web", "");
    let agent_text = std::fs::read_to_string(&agent_good).unwrap();

    let cases: Vec<(&str, std::path::PathBuf, &[&str])> = vec![
        (
            "coordinator",
            dir.path().join("missing.toml"),
            &["missing.toml: cannot read config file", "--config"],
        ),
        (
            "coordinator",
            write("syntax.toml", &good_text.replace("[tls]", "[tls")),
            &["syntax.toml: line", "fix that line"],
        ),
        (
            "coordinator",
            write(
                "unknown.toml",
                &good_text.replace("[agents]", "[agents]\nheartbeat = \"1s\""),
            ),
            &["unknown.toml: line", "unknown field `heartbeat`"],
        ),
        (
            "coordinator",
            write(
                "nocert.toml",
                &good_text.replace("coordinator.pem", "nope.pem"),
            ),
            &[
                "tls.cert = ",
                "nope.pem: file not found",
                "rollcall certs init",
            ],
        ),
        (
            "agent",
            write(
                "agent-nokey.toml",
                &agent_text.replace("web-1-key.pem", "gone-key.pem"),
            ),
            &[
                "agent-nokey.toml: tls.key = ",
                "gone-key.pem: cannot read",
                "rollcall certs init",
            ],
        ),
        (
            "agent",
            write(
                "agent-role.toml",
                &agent_text.replace("role = \"web\"", "role = \"worker\""),
            ),
            &[
                "agent-role.toml: tls.cert = ",
                "but this agent is web-1 with role worker",
                "--agent web-1:worker",
            ],
        ),
        (
            "agent",
            write("agent-unknown.toml", &format!("{agent_text}\nbogus = 1\n")),
            &["agent-unknown.toml: line", "unknown field `bogus`"],
        ),
    ];
    for (command, file, expected) in cases {
        let out = rollcall(&[command, "--config", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "one line for {}: {stderr}", file.display());
        assert!(lines[0].starts_with("error: "), "{stderr}");
        for e in expected {
            assert!(
                stderr.contains(e),
                "{}: expected {e:?} in {stderr}",
                file.display()
            );
        }
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}

/// One command, two processes, one trace: the agent's span is a child of the coordinator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_one_trace_across_coordinator_and_agent() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_init(dir.path(), &["db-1:database"]);
    let collector = Collector::default();
    let cancel = tokio_util::sync::CancellationToken::new();
    let endpoint = collector.serve(cancel.clone()).await;
    let telemetry = format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    let config =
        write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &telemetry);
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let mut coordinator = spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &env,
    );
    let agent_cfg = write_agent_config(
        dir.path(),
        &certs,
        agents_addr,
        "db-1",
        "database",
        &telemetry,
    );
    let mut agent = spawn_rollcall(
        "db-1",
        dir.path(),
        &["agent", "--config", agent_cfg.to_str().unwrap()],
        &env,
    );

    // On attach the coordinator sends the agent a Describe command.
    let (coordinator_span, agent_span) = eventually(
        "spans of the describe command from both processes",
        Duration::from_secs(30),
        async || {
            let spans = collector.snapshot();
            let c = spans.iter().find(|s| {
                s.service == "rollcall-coordinator" && s.name == "coordinator.link.command"
            })?;
            let a = spans.iter().find(|s| {
                s.service == "rollcall-agent"
                    && s.name == "agent.command.execute"
                    && s.trace_id == c.trace_id
            })?;
            Some((c.clone(), a.clone()))
        },
    )
    .await;
    assert_eq!(agent_span.trace_id, coordinator_span.trace_id);
    assert_eq!(
        agent_span.parent_span_id, coordinator_span.span_id,
        "the agent's span is a child of the command span"
    );
    assert!(
        agent.terminate(Duration::from_secs(10)),
        "{}",
        agent.log_text()
    );
    assert!(
        coordinator.terminate(Duration::from_secs(10)),
        "{}",
        coordinator.log_text()
    );
    cancel.cancel();
}

/// The CLI contract for runs, with real processes: a coordinator with an environment, agents
/// supervising their roles, `drill --dry-run`, `drill --watch` (exit 0 on success),
/// `runs --json` and `run show --json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_runs_from_the_cli_against_real_processes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs_init(dir.path(), &["web-1:web", "worker-1:worker"]);
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, include_str!("plans/roles-only.toml")).unwrap();
    let (agents_addr, operator_addr) = (free_addr(), free_addr());
    // Traces go to an in-test OTLP collector: the drill must be one trace.
    let collector = Collector::default();
    let cancel = tokio_util::sync::CancellationToken::new();
    let endpoint = collector.serve(cancel.clone()).await;
    let telemetry = format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
    let env = format!(
        r#"
[environments.test]
rpo = "1h"
rto = "1h"
retention = "1day"
repository = "file://{dir}/repository"
plan = "{plan}"
fleet = {{ web = 1, worker = 1 }}
{telemetry}"#,
        dir = dir.path().display(),
        plan = plan.display()
    );
    let config = write_coordinator_config(dir.path(), &certs, agents_addr, operator_addr, &env);
    let otel = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let _coordinator = spawn_rollcall(
        "coordinator",
        dir.path(),
        &["coordinator", "--config", config.to_str().unwrap()],
        &otel,
    );
    let marker = dir.path().join("frozen");
    let web_control = format!(
        "[control]\nfreeze = \"exec\"\n[control.exec]\nfreeze = [\"touch\", \"{m}\"]\nunfreeze = [\"rm\", \"{m}\"]\n",
        m = marker.display()
    );
    let worker_control = "[control]\nscale = \"process\"\n[control.process]\nprogram = \"sleep\"\nargs = [\"3600\"]\nreplicas = 1\nstop_grace = \"1s\"\n";
    let _agents: Vec<Proc> = [
        ("web-1", "web", web_control.as_str()),
        ("worker-1", "worker", worker_control),
    ]
    .iter()
    .map(|(n, r, extra)| {
        let extra = format!("{extra}{telemetry}");
        let cfg = write_agent_config(dir.path(), &certs, agents_addr, n, r, &extra);
        spawn_rollcall(
            n,
            dir.path(),
            &["agent", "--config", cfg.to_str().unwrap()],
            &otel,
        )
    })
    .collect();
    fleet_ready(
        operator_addr,
        &certs,
        &["web-1", "worker-1"],
        dir.path(),
        Duration::from_secs(30),
    )
    .await;

    let operator = format!("https://{operator_addr}");
    let conn = [
        "--coordinator",
        operator.as_str(),
        "--certs",
        certs.to_str().unwrap(),
    ];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&conn);
        rollcall(&all)
    };

    let dry = run(&["drill", "--env", "test", "--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(
        text.contains("nothing is changed") && text.contains("worker-1 (ready)"),
        "{text}"
    );
    assert!(!marker.exists(), "a dry run touches nothing");

    let unknown = run(&["drill", "--env", "prod"]);
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("no environment \"prod\"") && err.contains("configured: test"),
        "{err}"
    );

    let drill = run(&["drill", "--env", "test", "--watch"]);
    let out = String::from_utf8_lossy(&drill.stdout);
    assert!(
        drill.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&drill.stderr)
    );
    assert!(
        out.contains("phase scale-to-zero passed") && out.contains("succeeded"),
        "{out}"
    );
    assert!(!marker.exists(), "unfrozen at the end");

    let runs = run(&["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let id = runs[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(runs[0]["state"], "succeeded");
    let show = run(&["run", "show", &id, "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["phases"].as_array().unwrap().len(), 5);
    assert!(
        show["commands"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["outcome"] == "succeeded")
    );

    let abort = run(&["run", "abort", &id]);
    assert!(!abort.status.success());
    assert!(String::from_utf8_lossy(&abort.stderr).contains("already succeeded"));

    // One trace per run: the run's root span, its phases, and the work of every agent that
    // took part, joined through the trace context carried in the commands.
    eventually(
        "the drill's spans from the coordinator and both agents",
        Duration::from_secs(30),
        async || {
            let spans = collector.snapshot();
            let root = spans
                .iter()
                .find(|s| s.service == "rollcall-coordinator" && s.name == "rollcall.run")?;
            let in_trace = |service: &str, name: &str, instance: &str| {
                spans.iter().any(|s| {
                    s.trace_id == root.trace_id
                        && s.service == service
                        && s.name == name
                        && (instance.is_empty() || s.instance == instance)
                })
            };
            (in_trace("rollcall-coordinator", "rollcall.phase", "")
                && in_trace("rollcall-coordinator", "coordinator.link.command", "")
                && in_trace("rollcall-agent", "agent.command.execute", "web-1")
                && in_trace("rollcall-agent", "agent.command.execute", "worker-1"))
            .then_some(())
        },
    )
    .await;
    cancel.cancel();
}
