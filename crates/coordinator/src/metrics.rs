//! Prometheus metrics of the coordinator, served as text on `listen.metrics` at `/metrics`.
//!
//! Counters live here; gauges (agents by role and readiness) are read from the registry at
//! scrape time, so they cannot drift from what `rollcall agents` shows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use api::model::Availability;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::tls::{RejectReason, Rejections};

/// Counters of commands the link sent, keyed by action and what came of them.
#[derive(Debug, Default)]
pub struct CommandCounters {
    inner: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl CommandCounters {
    /// Counts one command of `action` that ended as `outcome` (a result outcome, or a link
    /// error such as `not_connected`).
    pub fn count(&self, action: &'static str, outcome: &'static str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((action, outcome)).or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What runs did, for scrapes: runs by kind and outcome, phase durations by action, and the
/// newest recovery point of each environment against its RPO.
#[derive(Debug, Default)]
pub struct RunMetrics {
    inner: Mutex<RunTallies>,
}

#[derive(Debug, Default, Clone)]
struct RunTallies {
    runs: BTreeMap<(String, String), u64>,
    phases: BTreeMap<String, (u64, f64)>,
    /// environment → (newest point's creation, unix seconds; RPO seconds)
    newest_point: BTreeMap<String, (i64, u64)>,
}

impl RunMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunTallies> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn run_ended(&self, kind: &str, outcome: &str) {
        *self
            .lock()
            .runs
            .entry((kind.to_owned(), outcome.to_owned()))
            .or_default() += 1;
    }

    pub fn phase_ended(&self, action: &str, seconds: f64) {
        let mut t = self.lock();
        let e = t.phases.entry(action.to_owned()).or_default();
        e.0 += 1;
        e.1 += seconds;
    }

    /// Records a point of `environment` if it is newer than the newest known.
    pub fn point(&self, environment: &str, created_unix: i64, rpo_seconds: u64) {
        let mut t = self.lock();
        let e = t
            .newest_point
            .entry(environment.to_owned())
            .or_insert((created_unix, rpo_seconds));
        if created_unix >= e.0 {
            *e = (created_unix, rpo_seconds);
        }
    }

    fn render(&self, out: &mut String, now_unix: i64) {
        let t = self.lock().clone();
        let _ = writeln!(
            out,
            "# HELP rollcall_runs_total Runs that ended, by kind and outcome."
        );
        let _ = writeln!(out, "# TYPE rollcall_runs_total counter");
        for ((kind, outcome), n) in &t.runs {
            let _ = writeln!(
                out,
                "rollcall_runs_total{{kind=\"{}\",outcome=\"{}\"}} {n}",
                escape(kind),
                escape(outcome)
            );
        }
        let _ = writeln!(
            out,
            "# HELP rollcall_phase_duration_seconds Time phases took, by action."
        );
        let _ = writeln!(out, "# TYPE rollcall_phase_duration_seconds summary");
        for (action, (count, sum)) in &t.phases {
            let a = escape(action);
            let _ = writeln!(
                out,
                "rollcall_phase_duration_seconds_sum{{action=\"{a}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "rollcall_phase_duration_seconds_count{{action=\"{a}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP rollcall_newest_point_age_seconds Age of the newest recovery point per environment."
        );
        let _ = writeln!(out, "# TYPE rollcall_newest_point_age_seconds gauge");
        for (env, (created, _)) in &t.newest_point {
            let _ = writeln!(
                out,
                "rollcall_newest_point_age_seconds{{environment=\"{}\"}} {}",
                escape(env),
                (now_unix - created).max(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP rollcall_rpo_seconds The environment's recovery point objective."
        );
        let _ = writeln!(out, "# TYPE rollcall_rpo_seconds gauge");
        for (env, (created, rpo)) in &t.newest_point {
            let e = escape(env);
            let _ = writeln!(out, "rollcall_rpo_seconds{{environment=\"{e}\"}} {rpo}");
            let stale = u8::from((now_unix - created).max(0) as u64 > *rpo);
            let _ = writeln!(
                out,
                "rollcall_newest_point_older_than_rpo{{environment=\"{e}\"}} {stale}"
            );
        }
    }
}

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub registry: Registry,
    pub epoch: u64,
    pub runs: Arc<RunMetrics>,
    pub commands: Arc<CommandCounters>,
    pub agent_rejections: Arc<Rejections>,
    pub operator_rejections: Arc<Rejections>,
}

/// Renders the Prometheus text exposition format.
pub fn render(sources: &Sources) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP rollcall_coordinator_epoch The fencing epoch this coordinator stamps on commands."
    );
    let _ = writeln!(out, "# TYPE rollcall_coordinator_epoch gauge");
    let _ = writeln!(out, "rollcall_coordinator_epoch {}", sources.epoch);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    sources.runs.render(&mut out, now);

    let mut agents: BTreeMap<(String, &'static str, bool), u64> = BTreeMap::new();
    for a in sources.registry.list() {
        let state = match a.availability {
            Availability::Connected => "connected",
            Availability::Unavailable => "unavailable",
        };
        *agents
            .entry((a.role.to_string(), state, a.ready))
            .or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP rollcall_coordinator_agents Agents known to the coordinator, by role, state and readiness."
    );
    let _ = writeln!(out, "# TYPE rollcall_coordinator_agents gauge");
    for ((role, state, ready), n) in agents {
        let _ = writeln!(
            out,
            "rollcall_coordinator_agents{{role=\"{}\",state=\"{state}\",ready=\"{ready}\"}} {n}",
            escape(&role)
        );
    }

    let _ = writeln!(
        out,
        "# HELP rollcall_coordinator_commands_total Commands sent to agents, by action and outcome."
    );
    let _ = writeln!(out, "# TYPE rollcall_coordinator_commands_total counter");
    for ((action, outcome), n) in sources.commands.snapshot() {
        let _ = writeln!(
            out,
            "rollcall_coordinator_commands_total{{action=\"{action}\",outcome=\"{outcome}\"}} {n}"
        );
    }

    let _ = writeln!(
        out,
        "# HELP rollcall_coordinator_tls_rejections_total Connections refused during the TLS handshake, by listener and reason."
    );
    let _ = writeln!(
        out,
        "# TYPE rollcall_coordinator_tls_rejections_total counter"
    );
    for (listener, rejections) in [
        ("agents", &sources.agent_rejections),
        ("operator", &sources.operator_rejections),
    ] {
        for reason in [
            RejectReason::Plaintext,
            RejectReason::UntrustedCertificate,
            RejectReason::NoCertificate,
            RejectReason::Other,
        ] {
            let _ = writeln!(
                out,
                "rollcall_coordinator_tls_rejections_total{{listener=\"{listener}\",reason=\"{}\"}} {}",
                reason.as_str(),
                rejections.get(reason)
            );
        }
    }
    out
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds the metrics listener (plain HTTP: metrics carry no secrets, and scrapers rarely
/// hold client certificates).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for metrics scrapes on {addr} (listen.metrics)"))
}

pub async fn serve(
    listener: TcpListener,
    sources: Sources,
    cancel: CancellationToken,
) -> Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sources = sources.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    render(&sources),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .context("serve metrics")
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::model::{AgentName, Environment, Heartbeat, Hello, Role};

    #[test]
    fn renders_agents_commands_and_rejections() {
        let registry = Registry::new();
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let hello = Hello {
            name: AgentName::parse("web-1").expect("name"),
            role: Role::parse("web").expect("role"),
            environment: Environment::parse("dev").expect("env"),
            capabilities: vec![],
            version: "0.1.0".into(),
            highest_epoch: None,
        };
        let generation = registry.attach(hello, None, tx);
        registry.heartbeat(
            &AgentName::parse("web-1").expect("name"),
            generation,
            Heartbeat {
                ready: true,
                detail: String::new(),
            },
        );
        let commands = Arc::new(CommandCounters::default());
        commands.count("ping", "succeeded");
        commands.count("ping", "succeeded");
        commands.count("describe", "not_connected");
        let text = render(&Sources {
            registry,
            epoch: 7,
            runs: Arc::default(),
            commands,
            agent_rejections: Arc::default(),
            operator_rejections: Arc::default(),
        });
        assert!(text.contains("rollcall_coordinator_epoch 7\n"), "{text}");
        assert!(
            text.contains(
                "rollcall_coordinator_agents{role=\"web\",state=\"connected\",ready=\"true\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "rollcall_coordinator_commands_total{action=\"ping\",outcome=\"succeeded\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("rollcall_coordinator_commands_total{action=\"describe\",outcome=\"not_connected\"} 1\n"), "{text}");
        assert!(text.contains("rollcall_coordinator_tls_rejections_total{listener=\"agents\",reason=\"plaintext\"} 0\n"), "{text}");
    }

    #[test]
    fn runs_phases_and_point_age_against_the_rpo() {
        let m = RunMetrics::default();
        m.run_ended("drill", "succeeded");
        m.run_ended("drill", "succeeded");
        m.run_ended("backup", "blocked");
        m.phase_ended("restore-postgres", 1.5);
        m.phase_ended("restore-postgres", 0.5);
        m.point("prod", 1_000, 3_600);
        m.point("prod", 500, 3_600); // older: ignored
        m.point("staging", 0, 60);
        let mut out = String::new();
        m.render(&mut out, 1_100);
        for line in [
            "rollcall_runs_total{kind=\"drill\",outcome=\"succeeded\"} 2",
            "rollcall_runs_total{kind=\"backup\",outcome=\"blocked\"} 1",
            "rollcall_phase_duration_seconds_sum{action=\"restore-postgres\"} 2",
            "rollcall_phase_duration_seconds_count{action=\"restore-postgres\"} 2",
            "rollcall_newest_point_age_seconds{environment=\"prod\"} 100",
            "rollcall_newest_point_older_than_rpo{environment=\"prod\"} 0",
            "rollcall_newest_point_older_than_rpo{environment=\"staging\"} 1",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
    }
}
