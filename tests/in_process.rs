//! In-process fleet tests: the real coordinator and agents as tasks on loopback with real
//! mTLS certificates. Cheaper than processes, and they can reach inside (the `AgentLink`,
//! rejection counters) to assert exactly what happened.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use api::model::{
    Action, ActionKind, ActionOutput, AgentMessage, AgentName, Availability, CommandId,
    Environment, Hello, Outcome, ResultDetail, Role, ScaleOutput, ScaleTarget,
};
use api::pb::agent::agent_service_client::AgentServiceClient;
use api::pb::operator::operator_service_client::OperatorServiceClient;
use api::pb::{agent as pb, operator as op};
use coordinator::link::{AgentLink, LinkError, Outgoing};
use coordinator::tls::RejectReason;
use e2e::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn ping(id: &str, hold_ms: u64, deadline_in: Duration) -> Outgoing {
    Outgoing {
        id: CommandId::parse(id).unwrap(),
        run_id: "test-run".into(),
        deadline: SystemTime::now() + deadline_in,
        action: Action::Ping {
            hold: Duration::from_millis(hold_ms),
        },
    }
}

fn name(s: &str) -> AgentName {
    AgentName::parse(s).unwrap()
}

fn executions(result: &api::model::CommandResult) -> u64 {
    match result.detail {
        Some(ResultDetail::Ping { executions }) => executions,
        _ => panic!("not a ping result: {result:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_attach_run_commands_and_dedupe() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(
        dir.path(),
        &["web-1:web", "worker-1:worker", "db-1:database"],
    );
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    let coord = InProcessCoordinator::start(&certs, &state_url, Duration::from_secs(5)).await;
    let agents: Vec<_> = [
        ("web-1", "web"),
        ("worker-1", "worker"),
        ("db-1", "database"),
    ]
    .iter()
    .map(|(n, r)| {
        InProcessAgent::start(agent_settings(
            &certs,
            dir.path(),
            &coord.agents_url(),
            n,
            r,
        ))
    })
    .collect();
    coord.wait_ready(&["web-1", "worker-1", "db-1"]).await;
    let status = coord.handle.agents();
    assert_eq!(status.len(), 3);
    let db = status.iter().find(|a| a.name.as_str() == "db-1").unwrap();
    assert_eq!(db.role.as_str(), "database");
    assert_eq!(db.environment.as_str(), "test");
    assert!(db.capabilities.contains(&"ping".to_string()));

    let link = coord.handle.link.clone();
    // Fan out to all three at once.
    let results = futures::future::join_all(["web-1", "worker-1", "db-1"].map(|n| {
        let link = link.clone();
        async move {
            link.send(
                &name(n),
                ping(&format!("fan/{n}"), 0, Duration::from_secs(5)),
            )
            .await
        }
    }))
    .await;
    for r in &results {
        let r = r.as_ref().unwrap();
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.epoch, coord.handle.epoch());
    }

    // The same command id twice: executed once, the same result both times.
    let first = link
        .send(&name("web-1"), ping("dup/1", 0, Duration::from_secs(5)))
        .await
        .unwrap();
    let second = link
        .send(&name("web-1"), ping("dup/1", 0, Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(!first.replayed);
    assert!(second.replayed);
    assert_eq!(
        executions(&first),
        executions(&second),
        "the repeat did not execute"
    );
    assert_eq!(
        first.finished, second.finished,
        "the repeat is the recorded result"
    );
    let third = link
        .send(&name("web-1"), ping("dup/2", 0, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(executions(&third), executions(&first) + 1);

    // Deadlines: the agent reports timed_out instead of hanging.
    let slow = link
        .send(
            &name("worker-1"),
            ping("slow", 30_000, Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert_eq!(slow.outcome, Outcome::TimedOut);
    assert!(slow.message.contains("time limit"), "{}", slow.message);

    // Describe reports what the agent persisted.
    let described = link
        .send(
            &name("db-1"),
            Outgoing {
                id: CommandId::parse("describe/1").unwrap(),
                run_id: String::new(),
                deadline: SystemTime::now() + Duration::from_secs(5),
                action: Action::Describe,
            },
        )
        .await
        .unwrap();
    match described.detail {
        Some(ResultDetail::Describe(d)) => {
            assert_eq!(d.role.as_str(), "database");
            assert_eq!(d.highest_epoch, Some(coord.handle.epoch()));
            assert_eq!(
                d.recorded_results, 0,
                "pings and describes are not written to disk"
            );
        }
        other => panic!("expected a description, got {other:?}"),
    }

    // Metrics count what happened: three agents by role, commands by outcome.
    let metrics = http_get(coord.handle.metrics_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "rollcall_coordinator_agents{role=\"database\",state=\"connected\",ready=\"true\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "rollcall_coordinator_commands_total{action=\"ping\",outcome=\"timed_out\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "rollcall_coordinator_epoch {}",
            coord.handle.epoch()
        )),
        "{metrics}"
    );

    // An agent that leaves is unavailable at once; a command to it fails fast.
    let mut agents = agents.into_iter();
    agents.next().unwrap().stop().await;
    let handle = coord.handle.clone();
    eventually("web-1 unavailable", Duration::from_secs(5), async || {
        handle
            .agents()
            .iter()
            .any(|a| a.name.as_str() == "web-1" && a.availability == Availability::Unavailable)
            .then_some(())
    })
    .await;
    let err = link
        .send(&name("web-1"), ping("gone", 0, Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        LinkError::NotConnected {
            agent: name("web-1")
        }
    );

    for a in agents {
        a.stop().await;
    }
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_refuses_a_stale_coordinator() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path(), &["web-1:web"]);
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    // Two coordinators on one store: the second takes a newer epoch, as a restarted one does;
    // the first lives on as the stale one (a partition, a process nobody stopped).
    let old = InProcessCoordinator::start(&certs, &state_url, Duration::from_secs(5)).await;
    let new = InProcessCoordinator::start(&certs, &state_url, Duration::from_secs(5)).await;
    assert!(
        new.handle.epoch() > old.handle.epoch(),
        "epochs strictly increase"
    );

    let agent = InProcessAgent::start(agent_settings(
        &certs,
        dir.path(),
        &new.agents_url(),
        "web-1",
        "web",
    ));
    new.wait_ready(&["web-1"]).await;
    let ok = new
        .handle
        .link
        .send(&name("web-1"), ping("p/1", 0, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Succeeded);
    let new_epoch = new.handle.epoch();
    agent.stop().await;
    new.stop().await;

    // The agent restarts and, misconfigured or partitioned, reaches the stale coordinator.
    let agent = InProcessAgent::start(agent_settings(
        &certs,
        dir.path(),
        &old.agents_url(),
        "web-1",
        "web",
    ));
    old.wait_ready(&["web-1"]).await;
    let refused = old
        .handle
        .link
        .send(&name("web-1"), ping("p/2", 0, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(refused.outcome, Outcome::StaleEpoch);
    assert!(
        refused.message.contains(&format!(
            "epoch {} is older than epoch {}",
            old.handle.epoch(),
            new_epoch
        )),
        "{}",
        refused.message
    );
    agent.stop().await;
    old.stop().await;
}

async fn raw_attach(
    url: &str,
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    hello: Hello,
) -> Result<tonic::Streaming<pb::CoordinatorMessage>, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage::Hello(hello).into()).await.unwrap();
    // Keep the sender alive for the stream's life.
    std::mem::forget(tx);
    client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// Opens an attach stream (with no hello) over `endpoint`.
async fn attach_on(endpoint: Endpoint) -> Result<(), String> {
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
    AgentServiceClient::new(channel)
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(drop)
        .map_err(|s| s.to_string())
}

/// How long a client refused in the TLS handshake may wait to hear of it.
const REFUSED: Duration = Duration::from_secs(10);

/// What an attempt the coordinator should refuse got: `Some` only if it attached. An error, or
/// no answer within `REFUSED`, is not attached.
async fn refused<T, E>(attempt: impl Future<Output = Result<T, E>>) -> Option<T> {
    tokio::time::timeout(REFUSED, attempt).await.ok()?.ok()
}

fn hello(n: &str, role: &str) -> Hello {
    Hello {
        name: name(n),
        role: Role::parse(role).unwrap(),
        environment: Environment::parse("test").unwrap(),
        capabilities: vec![],
        version: "test".into(),
        highest_epoch: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_refuses_wrong_identities_and_plaintext() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path(), &["web-1:web"]);
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let foreign = e2e::certs(&foreign, &["web-1:web"]);
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    let coord = InProcessCoordinator::start(&certs, &state_url, Duration::from_secs(5)).await;
    let url = coord.agents_url();
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let ca = read(certs.join("ca.pem"));

    // A role its certificate does not carry.
    let err = raw_attach(
        &url,
        &ca,
        &read(certs.join("agents/web-1.pem")),
        &read(certs.join("agents/web-1-key.pem")),
        hello("web-1", "worker"),
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    assert!(
        err.contains("claims role worker, but its certificate carries role web"),
        "{err}"
    );

    // Another agent's name.
    let err = raw_attach(
        &url,
        &ca,
        &read(certs.join("agents/web-1.pem")),
        &read(certs.join("agents/web-1-key.pem")),
        hello("web-2", "web"),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("presented the certificate of agent web-1"),
        "{err}"
    );

    // The operator certificate is no agent certificate.
    let err = raw_attach(
        &url,
        &ca,
        &read(certs.join("operator.pem")),
        &read(certs.join("operator-key.pem")),
        hello("web-1", "web"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("carries no agent identity"), "{err}");

    // A certificate from another CA: refused in the handshake, counted with its reason. With
    // TLS 1.3 the client finishes its side of the handshake before the server refuses, and a
    // client may never hear of the refusal; what this test holds the coordinator to is the
    // refusal and its count, so a client still waiting after `REFUSED` has not attached either.
    let result = refused(raw_attach(
        &url,
        &ca,
        &read(foreign.join("agents/web-1.pem")),
        &read(foreign.join("agents/web-1-key.pem")),
        hello("web-1", "web"),
    ))
    .await;
    assert!(result.is_none(), "a foreign certificate must not attach");
    let handle = coord.handle.clone();
    eventually(
        "untrusted certificate counted",
        Duration::from_secs(5),
        async || {
            (handle
                .agent_rejections
                .get(RejectReason::UntrustedCertificate)
                >= 1)
                .then_some(())
        },
    )
    .await;

    // Plaintext HTTP/2: refused before TLS, counted as plaintext (tonic's channel may retry,
    // so at least once).
    let plain = Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        coord.handle.agents_addr.port()
    ))
    .unwrap();
    let attached = refused(attach_on(plain)).await;
    assert!(attached.is_none(), "plaintext must not attach");
    eventually("plaintext counted", Duration::from_secs(5), async || {
        (handle.agent_rejections.get(RejectReason::Plaintext) >= 1).then_some(())
    })
    .await;
    assert!(
        coord.handle.agents().is_empty(),
        "nothing attached: {:?}",
        coord.handle.agents()
    );

    // No client certificate at all on the agent listener.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name("localhost");
    let anonymous = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let attached = refused(attach_on(anonymous)).await;
    assert!(attached.is_none(), "no certificate must not attach");
    eventually(
        "missing certificate counted",
        Duration::from_secs(5),
        async || (handle.agent_rejections.get(RejectReason::NoCertificate) >= 1).then_some(()),
    )
    .await;

    // Operator API: no credential, wrong token, agent certificate → refused; token or
    // operator certificate → served.
    let operator = |identity: Option<(&str, &str)>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name("localhost");
        if let Some((c, k)) = identity {
            tls = tls.identity(Identity::from_pem(read(certs.join(c)), read(certs.join(k))));
        }
        Endpoint::from_shared(coord.operator_url())
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    let list = async |endpoint: Endpoint, token: Option<&str>| {
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        let mut request = tonic::Request::new(op::ListAgentsRequest {});
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        OperatorServiceClient::new(channel)
            .list_agents(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    let err = list(operator(None), None).await.unwrap_err();
    assert!(
        err.starts_with("Unauthenticated: operator call without an operator certificate or token"),
        "{err}"
    );
    let err = list(operator(None), Some("wrong-token")).await.unwrap_err();
    assert!(
        err.starts_with("Unauthenticated: operator token not recognised"),
        "{err}"
    );
    assert!(!err.contains("wrong-token"));
    let err = list(
        operator(Some(("agents/web-1.pem", "agents/web-1-key.pem"))),
        None,
    )
    .await
    .unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    let ok = list(operator(None), Some("test-operator-token"))
        .await
        .unwrap();
    assert_eq!(ok.epoch, coord.handle.epoch().get());
    list(operator(Some(("operator.pem", "operator-key.pem"))), None)
        .await
        .unwrap();

    coord.stop().await;
}

/// After a coordinator restart the whole fleet reconnects at once. The successor admits the
/// attachments at its attach rate; those refused meanwhile retry with backoff and get in later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_admitted_at_the_attach_rate() {
    const FLEET: usize = 8;
    const RATE: u64 = 2;
    const WINDOW: Duration = Duration::from_secs(1);
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..FLEET).map(|i| format!("storm-{i}")).collect();
    let specs: Vec<String> = names.iter().map(|n| format!("{n}:worker")).collect();
    let certs = certs(
        dir.path(),
        &specs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    let first = InProcessCoordinator::start(&certs, &state_url, Duration::from_secs(5)).await;
    let agents: Vec<_> = names
        .iter()
        .map(|n| {
            InProcessAgent::start(agent_settings(
                &certs,
                dir.path(),
                &first.agents_url(),
                n,
                "worker",
            ))
        })
        .collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    first.wait_ready(&all).await;
    assert_eq!(first.handle.call_refusals.attaches_throttled(), 0);

    let addr = first.handle.agents_addr;
    first.stop().await;
    let limits = coordinator::layers::Limits {
        attaches: RATE,
        attach_window: WINDOW,
        ..Default::default()
    };
    let successor = InProcessCoordinator::start_limited(
        &certs,
        &state_url,
        Duration::from_secs(5),
        Duration::from_millis(200),
        Default::default(),
        addr,
        limits,
    )
    .await;
    let handle = successor.handle.clone();
    let mut attached: Vec<i64> = eventually(
        "the whole fleet attached to the successor",
        Duration::from_secs(30),
        async || {
            let agents = handle.agents();
            (agents.len() == FLEET
                && agents
                    .iter()
                    .all(|a| a.availability == Availability::Connected))
            .then(|| agents.iter().map(|a| a.connected_since_unix_ms).collect())
        },
    )
    .await;
    attached.sort_unstable();

    // At most RATE attachments a window: the i-th came no sooner than i / RATE windows after
    // the first (less a little for the time from admission to the registry).
    let slack = 300;
    for (i, at) in attached.iter().enumerate() {
        let earliest = (i as i64 / RATE as i64) * WINDOW.as_millis() as i64 - slack;
        assert!(
            at - attached[0] >= earliest,
            "attachment {i} came {} ms after the first, sooner than the rate allows: \
             {attached:?}",
            at - attached[0]
        );
    }
    // More agents came at once than the rate and its queue admit: some were refused, and
    // they are all attached now.
    let throttled = successor.handle.call_refusals.attaches_throttled();
    assert!(throttled > 0, "no attachment was refused");
    let metrics = http_get(successor.handle.metrics_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "rollcall_coordinator_attaches_throttled_total {throttled}"
        )),
        "{metrics}"
    );

    for a in agents {
        a.stop().await;
    }
    successor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_marked_unavailable_within_the_timeout() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path(), &["web-1:web"]);
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    let coord = InProcessCoordinator::start(&certs, &state_url, Duration::from_millis(800)).await;
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    // Attaches and then never sends a heartbeat: a hung agent whose TCP stays up.
    let _stream = raw_attach(
        &coord.agents_url(),
        &read(certs.join("ca.pem")),
        &read(certs.join("agents/web-1.pem")),
        &read(certs.join("agents/web-1-key.pem")),
        hello("web-1", "web"),
    )
    .await
    .unwrap();
    let handle = coord.handle.clone();
    eventually("web-1 attached", Duration::from_secs(5), async || {
        handle
            .agents()
            .iter()
            .any(|a| a.availability == Availability::Connected)
            .then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let detail = eventually("web-1 unavailable", Duration::from_secs(5), async || {
        handle
            .agents()
            .into_iter()
            .find(|a| a.availability == Availability::Unavailable)
            .map(|a| a.detail)
    })
    .await;
    assert!(detail.contains("no heartbeat for"), "{detail}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "noticed within the timeout plus a sweep"
    );
    coord.stop().await;
}

/// Role control end to end: the coordinator scales a supervised role to zero and back to its
/// prior count, freezes it through the exec adapter, and sees readiness follow in heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_control_scales_and_freezes_through_the_link() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path(), &["worker-1:worker"]);
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    let coord = InProcessCoordinator::start(&certs, &state_url, Duration::from_secs(5)).await;
    let frozen = dir.path().join("frozen");
    let mut settings = agent_settings(
        &certs,
        dir.path(),
        &coord.agents_url(),
        "worker-1",
        "worker",
    );
    settings.control = toml::from_str(&format!(
        r#"
        scale = "process"
        freeze = "exec"
        [process]
        program = "sh"
        args = ["-c", "while true; do sleep 0.05; done"]
        replicas = 2
        stop_grace = "1s"
        [exec]
        freeze = ["touch", "{frozen}"]
        unfreeze = ["rm", "{frozen}"]
        "#,
        frozen = frozen.display()
    ))
    .unwrap();
    let agent = InProcessAgent::start(settings);
    coord.wait_ready(&["worker-1"]).await;
    let caps = coord.handle.agents()[0].capabilities.clone();
    assert_eq!(
        caps,
        [
            "ping", "describe", "freeze", "unfreeze", "scale", "restart", "verify"
        ]
    );

    let send = |id: &str, action: Action| {
        let link = coord.handle.link.clone();
        let out = Outgoing {
            id: CommandId::parse(id).unwrap(),
            run_id: "run-7".into(),
            deadline: SystemTime::now() + Duration::from_secs(20),
            action,
        };
        async move { link.send(&name("worker-1"), out).await.unwrap() }
    };
    let output = |r: &api::model::CommandResult| match &r.detail {
        Some(ResultDetail::Output(o)) => match ActionOutput::decode(ActionKind::Scale, o) {
            Ok(ActionOutput::Scale(scaled)) => scaled,
            other => panic!("not a scale output: {other:?}"),
        },
        other => panic!("no scale output: {other:?} ({})", r.message),
    };

    let down = send("run-7/scale/1", Action::Scale(ScaleTarget::Replicas(0))).await;
    assert_eq!(down.outcome, Outcome::Succeeded, "{}", down.message);
    assert_eq!(
        output(&down),
        ScaleOutput {
            before: 2,
            now: 0,
            prior: 2
        }
    );
    let handle = coord.handle.clone();
    eventually(
        "scaled-to-zero agent reported not ready",
        Duration::from_secs(10),
        async || {
            let a = &handle.agents()[0];
            (!a.ready && a.detail == "scaled to 0").then_some(())
        },
    )
    .await;

    let frozen_result = send("run-7/freeze/1", Action::Freeze).await;
    assert_eq!(
        frozen_result.outcome,
        Outcome::Succeeded,
        "{}",
        frozen_result.message
    );
    assert!(frozen.exists());

    let up = send("run-7/scale/2", Action::Scale(ScaleTarget::Prior)).await;
    assert_eq!(
        output(&up),
        ScaleOutput {
            before: 0,
            now: 2,
            prior: 2
        }
    );
    // A re-sent scale is not executed again.
    let again = send("run-7/scale/2", Action::Scale(ScaleTarget::Prior)).await;
    assert!(again.replayed);
    coord.wait_ready(&["worker-1"]).await;

    let thawed = send("run-7/unfreeze/1", Action::Unfreeze).await;
    assert_eq!(thawed.outcome, Outcome::Succeeded, "{}", thawed.message);
    assert!(!frozen.exists());

    agent.stop().await;
    coord.stop().await;
}
