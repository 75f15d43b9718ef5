//! Prometheus metrics of the coordinator, served on `listen.metrics` at `/metrics` in the
//! Prometheus text format (`prometheus-client`).
//!
//! Counters and histograms are `prometheus-client` families kept here. What other parts already
//! hold — agents by role and readiness (the registry), TLS refusals (`tls::Rejections`) and the
//! age of each environment's newest recovery point — is read by a collector at scrape time, so
//! it cannot drift from what `rollcall agents` shows. The verdicts per environment and run
//! kind (the newest ending, the newest success and its duration) are kept here, fed as runs end
//! and, at start-up, from the journal, so a restart does not reset what the alert rules in
//! `deploy/prometheus/` read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use api::model::Availability;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::tls::{RejectReason, Rejections};

/// Upper bounds of the phase-duration buckets, seconds: from a second (freeze, scale) to four
/// hours (a large restore).
pub const PHASE_BUCKETS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// Upper bounds of the restore-duration buckets, seconds: a drill or recovery from start to
/// success, one minute to a day (RTOs are usually set in hours).
pub const RESTORE_BUCKETS: [f64; 14] = [
    60.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0, 5400.0, 7200.0, 10800.0, 14400.0,
    28800.0, 86400.0,
];

type Labels<const N: usize> = [(&'static str, String); N];

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

fn restore_histogram() -> Histogram {
    Histogram::new(RESTORE_BUCKETS)
}

/// Counters of commands the link sent, keyed by action and what came of them.
#[derive(Debug, Default)]
pub struct CommandCounters {
    sent: Family<[(&'static str, &'static str); 2], Counter>,
}

impl CommandCounters {
    /// Counts one command of `action` that ended as `outcome` (a result outcome, or a link
    /// error such as `not_connected`).
    pub fn count(&self, action: &'static str, outcome: &'static str) {
        self.sent
            .get_or_create(&[("action", action), ("outcome", outcome)])
            .inc();
    }
}

/// Webhook deliveries (`notify`), by event and outcome: `delivered`, `failed` (refused, or
/// retries used up) or `dropped` (the webhook's queue was full).
#[derive(Debug, Default)]
pub struct NotifyCounters {
    outcomes: Family<[(&'static str, &'static str); 2], Counter>,
}

impl NotifyCounters {
    pub fn count(&self, event: &'static str, outcome: &'static str) {
        self.outcomes
            .get_or_create(&[("event", event), ("outcome", outcome)])
            .inc();
    }

    /// Creates the series of `event` for every outcome at zero, so a rate or increase over
    /// them sees the first delivery that fails (a series that first appears at 1 shows none).
    pub fn declare(&self, event: &'static str) {
        for outcome in ["delivered", "failed", "dropped"] {
            let _ = self
                .outcomes
                .get_or_create(&[("event", event), ("outcome", outcome)]);
        }
    }

    /// Deliveries of `event` that ended as `outcome` so far.
    pub fn get(&self, event: &'static str, outcome: &'static str) -> u64 {
        self.outcomes
            .get(&[("event", event), ("outcome", outcome)])
            .map_or(0, |c| c.get())
    }
}

/// How the newest run of one kind in one environment ended, for the verdict gauges: the
/// alert rules in `deploy/prometheus/` read them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Verdict {
    /// When the newest run that ended (blocked included) ended, unix seconds.
    ended: f64,
    succeeded: bool,
    /// When the newest successful run ended, and how long it took from its start.
    success: Option<(f64, f64)>,
}

/// One run's ending, as the verdict gauges take it.
#[derive(Debug, Clone, Copy)]
pub struct Ending<'a> {
    pub environment: &'a str,
    pub kind: &'a str,
    pub succeeded: bool,
    pub started_unix: f64,
    pub ended_unix: f64,
}

/// What runs did, for scrapes: runs by kind and outcome, phase durations by action, restore
/// durations by environment and kind, the newest recovery point of each environment against
/// its RPO, and how each environment's newest runs of each kind ended.
#[derive(Debug)]
pub struct RunMetrics {
    runs: Family<Labels<2>, Counter>,
    phases: Family<Labels<1>, Histogram>,
    restores: Family<Labels<2>, Histogram>,
    /// environment → its newest point in commit order and its RPO
    newest_point: Mutex<BTreeMap<String, NewestPoint>>,
    /// (environment, kind) → how its newest runs ended
    verdicts: Mutex<BTreeMap<(String, String), Verdict>>,
    /// environment → its RPO in seconds, for every configured environment
    rpos: Mutex<BTreeMap<String, u64>>,
    /// restore-test environment → the environment whose points it tests
    restore_tests: Mutex<BTreeMap<String, String>>,
    /// Environments with `base_backup_schedule`.
    base_backups_scheduled: Mutex<std::collections::BTreeSet<String>>,
    /// environment → its recoverable window (base backups and archived WAL), as last observed
    windows: Mutex<BTreeMap<String, ObservedWindow>>,
}

/// One window gauge's value from the observed window and the scrape's clock.
type WindowValue = fn(&ObservedWindow, i64) -> i64;

/// An environment's recoverable window as `Engine::observe_wal` last read it, unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedWindow {
    /// Its oldest base backup's `consistent_at`.
    pub from: i64,
    /// When the newest WAL segment reachable without a gap from its newest base backup was
    /// archived (or that backup's `consistent_at`, if later).
    pub until: i64,
    /// The window stops at a missing segment with newer ones archived after it.
    pub gap: bool,
}

impl Default for RunMetrics {
    fn default() -> Self {
        RunMetrics {
            runs: Family::default(),
            phases: Family::new_with_constructor(phase_histogram),
            restores: Family::new_with_constructor(restore_histogram),
            newest_point: Mutex::default(),
            verdicts: Mutex::default(),
            rpos: Mutex::default(),
            restore_tests: Mutex::default(),
            base_backups_scheduled: Mutex::default(),
            windows: Mutex::default(),
        }
    }
}

impl RunMetrics {
    pub fn run_ended(&self, kind: &str, outcome: &str) {
        self.runs
            .get_or_create(&[("kind", kind.to_owned()), ("outcome", outcome.to_owned())])
            .inc();
    }

    /// A run of `kind` succeeded `seconds` after it started: counted as ended, and a drill's
    /// or a recovery's time is observed as a restore duration.
    pub fn run_succeeded(&self, kind: &str, environment: &str, seconds: f64) {
        self.run_ended(kind, "succeeded");
        if matches!(kind, "drill" | "recovery") {
            self.restores
                .get_or_create(&[
                    ("environment", environment.to_owned()),
                    ("kind", kind.to_owned()),
                ])
                .observe(seconds);
        }
    }

    pub fn phase_ended(&self, action: &str, seconds: f64) {
        self.phases
            .get_or_create(&[("action", action.to_owned())])
            .observe(seconds);
    }

    /// Records a point of `environment` (its commit number and stamp, unix seconds) if it was
    /// committed after the newest known: newest by commit number, never by stamp.
    pub fn point(&self, environment: &str, sequence: Option<u64>, created_unix: i64, rpo: u64) {
        let new = NewestPoint {
            sequence,
            created_unix,
            rpo_seconds: rpo,
        };
        let mut points = self.points();
        let e = points.entry(environment.to_owned()).or_insert(new);
        if (sequence, created_unix) >= (e.sequence, e.created_unix) {
            *e = new;
        }
    }

    fn points(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NewestPoint>> {
        self.newest_point.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A configured environment and its RPO: `rollcall_rpo_seconds` is exposed for it before
    /// it has any point, so a rule can tell "no point at all".
    pub fn environment(&self, environment: &str, rpo: u64) {
        lock(&self.rpos).insert(environment.to_owned(), rpo);
    }

    /// A restore-test environment and its source: `rollcall_restore_test_source` tells the
    /// alert rules that it has no points of its own (its points are its source's).
    pub fn restore_test(&self, environment: &str, source: &str) {
        lock(&self.restore_tests).insert(environment.to_owned(), source.to_owned());
    }

    /// An environment that schedules base backups: `rollcall_base_backup_scheduled` lets a rule
    /// tell "scheduled, yet no recoverable window" (base backups that never succeed).
    pub fn base_backups_scheduled(&self, environment: &str) {
        lock(&self.base_backups_scheduled).insert(environment.to_owned());
    }

    /// The recoverable window of `environment` as just observed; `None` once it has no base
    /// backup (its series go away rather than showing a stale window).
    pub fn window(&self, environment: &str, window: Option<ObservedWindow>) {
        let mut windows = lock(&self.windows);
        match window {
            Some(w) => {
                windows.insert(environment.to_owned(), w);
            }
            None => {
                windows.remove(environment);
            }
        }
    }

    /// A run ended (blocked counts: the verdict is what an operator sees now). Only a newer
    /// ending than the one known replaces it, so the journal's runs read at start-up and the
    /// runs that end meanwhile can come in any order.
    pub fn ending(&self, e: Ending<'_>) {
        let mut verdicts = lock(&self.verdicts);
        let v = verdicts
            .entry((e.environment.to_owned(), e.kind.to_owned()))
            .or_default();
        if e.ended_unix >= v.ended {
            v.ended = e.ended_unix;
            v.succeeded = e.succeeded;
        }
        if e.succeeded && v.success.is_none_or(|(at, _)| e.ended_unix >= at) {
            v.success = Some((e.ended_unix, (e.ended_unix - e.started_unix).max(0.0)));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The newest point of an environment as the metrics see it.
#[derive(Debug, Clone, Copy)]
struct NewestPoint {
    sequence: Option<u64>,
    created_unix: i64,
    rpo_seconds: u64,
}

impl NewestPoint {
    /// Seconds since the stamp; zero for a stamp ahead of `now`.
    fn age(&self, now: i64) -> u64 {
        (now - self.created_unix).max(0) as u64
    }

    /// Older than the RPO, or stamped further ahead of `now` than clocks may disagree: such a
    /// stamp proves nothing about the point's age, so it counts as older than the RPO (until
    /// real time passes the stamp or a newer point is committed) rather than hiding staleness
    /// behind an age of zero.
    fn older_than_rpo(&self, now: i64) -> bool {
        let tolerance = repository::CLOCK_TOLERANCE.as_secs() as i64;
        self.age(now) > self.rpo_seconds || self.created_unix - now > tolerance
    }
}

/// Operator calls and attachments the gRPC layers refused (see `layers`).
#[derive(Debug, Default)]
pub struct CallRefusals {
    attaches: Counter,
    operator: Family<[(&'static str, &'static str); 1], Counter>,
}

impl CallRefusals {
    /// Counts an attachment refused by `agents.attach_rate`; returns how many were before it.
    pub fn attach_throttled(&self) -> u64 {
        self.attaches.inc()
    }

    /// Attachments refused by `agents.attach_rate` so far.
    pub fn attaches_throttled(&self) -> u64 {
        self.attaches.get()
    }

    /// Counts an operator call refused for `reason` (`busy`, `timeout`).
    pub fn operator_refused(&self, reason: &'static str) {
        self.operator.get_or_create(&[("reason", reason)]).inc();
    }

    /// Operator calls refused for `reason` so far.
    pub fn operator_refusals(&self, reason: &'static str) -> u64 {
        self.operator
            .get(&[("reason", reason)])
            .map_or(0, |c| c.get())
    }
}

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub registry: Registry,
    pub epoch: u64,
    pub runs: Arc<RunMetrics>,
    pub commands: Arc<CommandCounters>,
    pub refusals: Arc<CallRefusals>,
    pub notifications: Arc<NotifyCounters>,
    pub agent_rejections: Arc<Rejections>,
    pub operator_rejections: Arc<Rejections>,
}

/// Every metric of the coordinator; scrape-time values are read by the collector.
pub fn registry(sources: &Sources) -> prometheus_client::registry::Registry {
    registry_at(sources, unix_now)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn registry_at(sources: &Sources, clock: fn() -> i64) -> prometheus_client::registry::Registry {
    let mut r = prometheus_client::registry::Registry::default();
    // `register` adds the final full stop of each help text.
    r.register(
        "rollcall_runs",
        "Runs that ended, by kind and outcome",
        sources.runs.runs.clone(),
    );
    r.register(
        "rollcall_phase_duration_seconds",
        "Time phases took, by action",
        sources.runs.phases.clone(),
    );
    r.register(
        "rollcall_coordinator_restore_duration_seconds",
        "Time drills and recoveries took from their start to success, by environment and kind",
        sources.runs.restores.clone(),
    );
    r.register(
        "rollcall_coordinator_commands",
        "Commands sent to agents, by action and outcome",
        sources.commands.sent.clone(),
    );
    r.register(
        "rollcall_coordinator_attaches_throttled",
        "Agent attachments refused by agents.attach_rate (the agents retry with backoff)",
        sources.refusals.attaches.clone(),
    );
    r.register(
        "rollcall_coordinator_operator_calls_refused",
        "Operator calls refused for operator.max_concurrent_calls (busy) or operator.call_timeout \
         (timeout), by reason",
        sources.refusals.operator.clone(),
    );
    r.register(
        "rollcall_coordinator_notifications",
        "Webhook deliveries ([[notify]]), by event and outcome: delivered, failed (refused, or \
         retries used up), dropped (the webhook's queue was full)",
        sources.notifications.outcomes.clone(),
    );
    r.register_collector(Box::new(AtScrape {
        sources: sources.clone(),
        clock,
    }));
    r
}

/// Renders every metric in the Prometheus text exposition format.
pub fn render(sources: &Sources) -> String {
    encode(&registry(sources))
}

fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_text::encode(&mut out, registry)
        .expect("writing to a String cannot fail, and the collector fails only when it does");
    out
}

/// The values read at scrape time.
struct AtScrape {
    sources: Sources,
    clock: fn() -> i64,
}

impl std::fmt::Debug for AtScrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtScrape").finish_non_exhaustive()
    }
}

impl Collector for AtScrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.sources;
        ConstGauge::new(s.epoch).encode(encoder.encode_descriptor(
            "rollcall_coordinator_epoch",
            "The fencing epoch this coordinator stamps on commands.",
            None,
            MetricType::Gauge,
        )?)?;

        let mut agents: BTreeMap<(String, &'static str, bool), u64> = BTreeMap::new();
        for a in s.registry.list() {
            let state = match a.availability {
                Availability::Connected => "connected",
                Availability::Unavailable => "unavailable",
            };
            *agents
                .entry((a.role.to_string(), state, a.ready))
                .or_default() += 1;
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_coordinator_agents",
            "Agents known to the coordinator, by role, state and readiness.",
            None,
            MetricType::Gauge,
        )?;
        for ((role, state, ready), n) in &agents {
            let ready = if *ready { "true" } else { "false" };
            let labels = [("role", role.as_str()), ("state", state), ("ready", ready)];
            ConstGauge::new(*n).encode(metric.encode_family(&labels)?)?;
        }

        let mut metric = encoder.encode_descriptor(
            "rollcall_coordinator_tls_rejections",
            "Connections refused during the TLS handshake, by listener and reason.",
            None,
            MetricType::Counter,
        )?;
        for (listener, rejections) in [
            ("agents", &s.agent_rejections),
            ("operator", &s.operator_rejections),
        ] {
            for reason in [
                RejectReason::Plaintext,
                RejectReason::UntrustedCertificate,
                RejectReason::NoCertificate,
                RejectReason::Other,
            ] {
                let labels = [("listener", listener), ("reason", reason.as_str())];
                ConstCounter::new(rejections.get(reason)).encode(metric.encode_family(&labels)?)?;
            }
        }

        let now = (self.clock)();
        let points = s.runs.points().clone();
        let mut metric = encoder.encode_descriptor(
            "rollcall_newest_point_age_seconds",
            "Age of the newest recovery point per environment.",
            None,
            MetricType::Gauge,
        )?;
        for (env, newest) in &points {
            ConstGauge::new(newest.age(now))
                .encode(metric.encode_family(&[("environment", env.as_str())])?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_newest_point_timestamp_seconds",
            "When the newest recovery point (in commit order) per environment was taken, unix \
             seconds.",
            None,
            MetricType::Gauge,
        )?;
        for (env, newest) in &points {
            ConstGauge::new(newest.created_unix)
                .encode(metric.encode_family(&[("environment", env.as_str())])?)?;
        }
        // Every configured environment, and any other a point was seen for.
        let mut rpos = lock(&s.runs.rpos).clone();
        for (env, newest) in &points {
            rpos.entry(env.clone()).or_insert(newest.rpo_seconds);
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_rpo_seconds",
            "The environment's recovery point objective.",
            None,
            MetricType::Gauge,
        )?;
        for (env, rpo) in &rpos {
            ConstGauge::new(*rpo)
                .encode(metric.encode_family(&[("environment", env.as_str())])?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_restore_test_source",
            "1 for each restore-test environment (restore_from), labelled with the environment \
             whose points it restores; it has no points of its own.",
            None,
            MetricType::Gauge,
        )?;
        for (env, source) in lock(&s.runs.restore_tests).iter() {
            ConstGauge::new(1u64).encode(
                metric
                    .encode_family(&[("environment", env.as_str()), ("source", source.as_str())])?,
            )?;
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_base_backup_scheduled",
            "1 for each environment with base_backup_schedule: it should have a recoverable \
             window (rollcall_recoverable_until_timestamp_seconds).",
            None,
            MetricType::Gauge,
        )?;
        for env in lock(&s.runs.base_backups_scheduled).iter() {
            ConstGauge::new(1u64)
                .encode(metric.encode_family(&[("environment", env.as_str())])?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_newest_point_older_than_rpo",
            "1 when the environment's newest recovery point (in commit order) is older than its \
             RPO or stamped in the future, else 0.",
            None,
            MetricType::Gauge,
        )?;
        for (env, newest) in &points {
            ConstGauge::new(u64::from(newest.older_than_rpo(now)))
                .encode(metric.encode_family(&[("environment", env.as_str())])?)?;
        }

        let windows = lock(&s.runs.windows).clone();
        let gauges: [(&str, &str, WindowValue); 4] = [
            (
                "rollcall_recoverable_from_timestamp_seconds",
                "The earliest time the environment's Postgres restores to (its oldest base \
                 backup's consistent_at), unix seconds; only environments with base backups.",
                |w, _| w.from,
            ),
            (
                "rollcall_recoverable_until_timestamp_seconds",
                "The latest time the environment's Postgres restores to: when the newest WAL \
                 segment reachable without a gap from its newest base backup was archived, unix \
                 seconds.",
                |w, _| w.until,
            ),
            (
                "rollcall_wal_newest_age_seconds",
                "The RPO of point-in-time recovery: seconds since the newest WAL segment the \
                 environment can replay (reachable without a gap from its newest base backup) \
                 was archived. Archive time, not the segment's last commit time: the archive \
                 time is known from one listing without reading WAL, and every commit in the \
                 segment happened before it, so the age is an upper bound of what a restore \
                 now would lose.",
                |w, now| (now - w.until).max(0),
            ),
            (
                "rollcall_wal_gap",
                "1 when the environment's recoverable window stops at a missing WAL segment \
                 although newer ones are archived (`rollcall repo verify --repo URL` names it), else 0.",
                |w, _| i64::from(w.gap),
            ),
        ];
        for (name, help, value) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (env, w) in &windows {
                ConstGauge::new(value(w, now))
                    .encode(metric.encode_family(&[("environment", env.as_str())])?)?;
            }
        }

        let verdicts = lock(&s.runs.verdicts).clone();
        let labels =
            |(env, kind): &(String, String)| [("environment", env.clone()), ("kind", kind.clone())];
        let mut metric = encoder.encode_descriptor(
            "rollcall_last_run_succeeded",
            "1 when the newest run of this kind in the environment that ended (blocked, aborted \
             or failed included) succeeded, else 0. kind=\"drill\" is the last drill (in a \
             restore-test environment, the last restore test); kind=\"backup\" the last backup.",
            None,
            MetricType::Gauge,
        )?;
        for (key, v) in &verdicts {
            ConstGauge::new(u64::from(v.succeeded)).encode(metric.encode_family(&labels(key))?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_last_run_end_timestamp_seconds",
            "When the newest run of this kind in the environment that ended (blocked included) \
             ended, unix seconds.",
            None,
            MetricType::Gauge,
        )?;
        for (key, v) in &verdicts {
            ConstGauge::new(v.ended).encode(metric.encode_family(&labels(key))?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_last_success_timestamp_seconds",
            "When the newest successful run of this kind in the environment finished, unix \
             seconds (kind=\"drill\": the last successful drill or restore test).",
            None,
            MetricType::Gauge,
        )?;
        for (key, v) in &verdicts {
            if let Some((at, _)) = v.success {
                ConstGauge::new(at).encode(metric.encode_family(&labels(key))?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "rollcall_last_success_duration_seconds",
            "How long the newest successful run of this kind in the environment took from its \
             start to success (kind=\"drill\": the measured restore time of the last \
             successful drill or restore test).",
            None,
            MetricType::Gauge,
        )?;
        for (key, v) in &verdicts {
            if let Some((_, took)) = v.success {
                ConstGauge::new(took).encode(metric.encode_family(&labels(key))?)?;
            }
        }
        Ok(())
    }
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
    let registry = Arc::new(registry(&sources));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [("content-type", prometheus_text::CONTENT_TYPE)],
                    encode(&registry),
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

    fn sources(
        registry: Registry,
        runs: Arc<RunMetrics>,
        commands: Arc<CommandCounters>,
    ) -> Sources {
        Sources {
            registry,
            epoch: 7,
            runs,
            commands,
            refusals: Arc::default(),
            notifications: Arc::default(),
            agent_rejections: Arc::default(),
            operator_rejections: Arc::default(),
        }
    }

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
                sent_at: None,
            },
        );
        let commands = Arc::new(CommandCounters::default());
        commands.count("ping", "succeeded");
        commands.count("ping", "succeeded");
        commands.count("describe", "not_connected");
        let text = render(&sources(registry, Arc::default(), commands));
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
        let m = Arc::new(RunMetrics::default());
        m.run_ended("drill", "succeeded");
        m.run_ended("drill", "succeeded");
        m.run_ended("backup", "blocked");
        m.phase_ended("restore-postgres", 1.5);
        m.phase_ended("restore-postgres", 0.5);
        m.point("prod", Some(2), 1_000, 3_600);
        // Committed before it, though stamped later (a fast clock): not the newest.
        m.point("prod", Some(1), 1_050, 3_600);
        m.point("staging", Some(7), 0, 60);
        // Stamped 10 minutes ahead of the reader: its age reads zero, and it counts as stale.
        m.point("skewed", Some(3), 1_100 + 600, 3_600);
        m.point("near", Some(4), 1_100 + 30, 3_600);
        let out = encode(&registry_at(
            &sources(Registry::new(), m, Arc::default()),
            || 1_100,
        ));
        for line in [
            "rollcall_runs_total{kind=\"drill\",outcome=\"succeeded\"} 2",
            "rollcall_runs_total{kind=\"backup\",outcome=\"blocked\"} 1",
            "rollcall_phase_duration_seconds_sum{action=\"restore-postgres\"} 2",
            "rollcall_phase_duration_seconds_count{action=\"restore-postgres\"} 2",
            "rollcall_newest_point_age_seconds{environment=\"prod\"} 100",
            "rollcall_newest_point_older_than_rpo{environment=\"prod\"} 0",
            "rollcall_newest_point_older_than_rpo{environment=\"staging\"} 1",
            "rollcall_newest_point_age_seconds{environment=\"skewed\"} 0",
            "rollcall_newest_point_older_than_rpo{environment=\"skewed\"} 1",
            "rollcall_newest_point_older_than_rpo{environment=\"near\"} 0",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
    }

    /// The recoverable-window gauges: the age is measured at scrape time from the archive
    /// time of the newest replayable segment, so it grows between observations; a window
    /// observed gone (no base backup left) drops its series.
    #[test]
    fn the_window_gauges_age_at_scrape_time() {
        let runs = Arc::new(RunMetrics::default());
        runs.window(
            "prod",
            Some(ObservedWindow {
                from: 500,
                until: 1_000,
                gap: false,
            }),
        );
        runs.window(
            "staging",
            Some(ObservedWindow {
                from: 100,
                until: 2_000,
                gap: true,
            }),
        );
        let s = sources(Registry::new(), runs.clone(), Arc::default());
        let text = encode(&registry_at(&s, || 1_100));
        for line in [
            "# TYPE rollcall_wal_newest_age_seconds gauge",
            "rollcall_recoverable_from_timestamp_seconds{environment=\"prod\"} 500",
            "rollcall_recoverable_until_timestamp_seconds{environment=\"prod\"} 1000",
            "rollcall_wal_newest_age_seconds{environment=\"prod\"} 100",
            "rollcall_wal_gap{environment=\"prod\"} 0",
            // Archived after the scrape's clock: an age of zero, never negative.
            "rollcall_wal_newest_age_seconds{environment=\"staging\"} 0",
            "rollcall_wal_gap{environment=\"staging\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let later = encode(&registry_at(&s, || 5_000));
        assert!(
            later
                .lines()
                .any(|l| l == "rollcall_wal_newest_age_seconds{environment=\"prod\"} 4000"),
            "{later}"
        );
        runs.window("prod", None);
        let gone = encode(&registry_at(&s, || 5_000));
        assert!(
            !gone.contains("{environment=\"prod\"}"),
            "prod's series went with its window: {gone}"
        );
    }

    /// Dashboards and alert rules read these names and types; the histograms keep the
    /// `_sum`/`_count` series of the summary they replaced and add `_bucket`.
    #[test]
    fn the_exposition_holds_every_name_and_the_histograms() {
        let runs = Arc::new(RunMetrics::default());
        runs.phase_ended("freeze", 0.2);
        runs.phase_ended("restore-postgres", 42.0);
        runs.run_succeeded("drill", "prod", 1_500.0);
        runs.run_succeeded("backup", "prod", 30.0); // no restore: not observed
        runs.point("prod", Some(1), 1_000, 3_600);
        let refusals = Arc::new(CallRefusals::default());
        refusals.attach_throttled();
        refusals.operator_refused("busy");
        let commands = Arc::new(CommandCounters::default());
        commands.count("ping", "succeeded");
        let mut s = sources(Registry::new(), runs, commands);
        s.refusals = refusals;
        s.notifications.count("run.blocked", "dropped");
        let text = encode(&registry_at(&s, || 1_100));

        for line in [
            "# TYPE rollcall_coordinator_epoch gauge",
            "# TYPE rollcall_coordinator_agents gauge",
            "# TYPE rollcall_coordinator_commands_total counter",
            "# TYPE rollcall_coordinator_tls_rejections_total counter",
            "# TYPE rollcall_runs_total counter",
            "# TYPE rollcall_phase_duration_seconds histogram",
            "# TYPE rollcall_coordinator_restore_duration_seconds histogram",
            "# TYPE rollcall_newest_point_age_seconds gauge",
            "# TYPE rollcall_rpo_seconds gauge",
            "# TYPE rollcall_newest_point_older_than_rpo gauge",
            "# TYPE rollcall_coordinator_attaches_throttled_total counter",
            "# TYPE rollcall_coordinator_operator_calls_refused_total counter",
            "# TYPE rollcall_coordinator_notifications_total counter",
            "# TYPE rollcall_newest_point_timestamp_seconds gauge",
            "# TYPE rollcall_last_run_succeeded gauge",
            "# TYPE rollcall_last_run_end_timestamp_seconds gauge",
            "# TYPE rollcall_last_success_timestamp_seconds gauge",
            "# TYPE rollcall_last_success_duration_seconds gauge",
            "# TYPE rollcall_recoverable_from_timestamp_seconds gauge",
            "# TYPE rollcall_recoverable_until_timestamp_seconds gauge",
            "# TYPE rollcall_wal_newest_age_seconds gauge",
            "# TYPE rollcall_wal_gap gauge",
            // A sub-second phase falls in the first bucket; buckets are cumulative.
            "rollcall_phase_duration_seconds_bucket{action=\"freeze\",le=\"1\"} 1",
            "rollcall_phase_duration_seconds_bucket{action=\"restore-postgres\",le=\"30\"} 0",
            "rollcall_phase_duration_seconds_bucket{action=\"restore-postgres\",le=\"60\"} 1",
            "rollcall_phase_duration_seconds_bucket{action=\"restore-postgres\",le=\"14400\"} 1",
            "rollcall_phase_duration_seconds_bucket{action=\"restore-postgres\",le=\"+Inf\"} 1",
            "rollcall_phase_duration_seconds_sum{action=\"restore-postgres\"} 42",
            "rollcall_phase_duration_seconds_count{action=\"restore-postgres\"} 1",
            "rollcall_coordinator_restore_duration_seconds_bucket{environment=\"prod\",kind=\"drill\",le=\"1200\"} 0",
            "rollcall_coordinator_restore_duration_seconds_bucket{environment=\"prod\",kind=\"drill\",le=\"1800\"} 1",
            "rollcall_coordinator_restore_duration_seconds_sum{environment=\"prod\",kind=\"drill\"} 1500",
            "rollcall_coordinator_restore_duration_seconds_count{environment=\"prod\",kind=\"drill\"} 1",
            "rollcall_runs_total{kind=\"drill\",outcome=\"succeeded\"} 1",
            "rollcall_runs_total{kind=\"backup\",outcome=\"succeeded\"} 1",
            "rollcall_rpo_seconds{environment=\"prod\"} 3600",
            "rollcall_coordinator_attaches_throttled_total 1",
            "rollcall_coordinator_operator_calls_refused_total{reason=\"busy\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("kind=\"backup\",le="), "{text}");
        // Every family is declared once.
        let declared = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(declared, 24, "{text}");
    }

    /// The verdict gauges the alert rules read: the newest ending of each environment and
    /// kind, its result, and the newest success with its duration, whatever order they come in.
    #[test]
    fn verdicts_keep_the_newest_ending_and_the_newest_success() {
        let m = Arc::new(RunMetrics::default());
        m.environment("prod", 86_400);
        m.environment("staging", 3_600);
        let end = |env, kind, succeeded, started_unix, ended_unix| Ending {
            environment: env,
            kind,
            succeeded,
            started_unix,
            ended_unix,
        };
        m.ending(end("prod", "drill", true, 900.0, 1_000.0));
        m.ending(end("prod", "drill", false, 1_900.0, 2_000.0));
        // Read from the journal after the blocked one was seen: older, changes nothing.
        m.ending(end("prod", "drill", true, 400.0, 500.0));
        m.ending(end("prod", "backup", true, 1_990.0, 2_000.5));
        let notifications = Arc::new(NotifyCounters::default());
        notifications.count("run.blocked", "delivered");
        notifications.count("run.finished", "failed");
        notifications.count("run.finished", "failed");
        let mut s = sources(Registry::new(), m.clone(), Arc::default());
        s.notifications = notifications;
        let text = encode(&registry_at(&s, || 3_000));
        for line in [
            "rollcall_last_run_succeeded{environment=\"prod\",kind=\"drill\"} 0",
            "rollcall_last_run_end_timestamp_seconds{environment=\"prod\",kind=\"drill\"} 2000.0",
            "rollcall_last_success_timestamp_seconds{environment=\"prod\",kind=\"drill\"} 1000.0",
            "rollcall_last_success_duration_seconds{environment=\"prod\",kind=\"drill\"} 100.0",
            "rollcall_last_run_succeeded{environment=\"prod\",kind=\"backup\"} 1",
            "rollcall_last_success_timestamp_seconds{environment=\"prod\",kind=\"backup\"} 2000.5",
            "rollcall_last_success_duration_seconds{environment=\"prod\",kind=\"backup\"} 10.5",
            // Every configured environment has its RPO, with or without a point.
            "rollcall_rpo_seconds{environment=\"prod\"} 86400",
            "rollcall_rpo_seconds{environment=\"staging\"} 3600",
            "rollcall_coordinator_notifications_total{event=\"run.blocked\",outcome=\"delivered\"} 1",
            "rollcall_coordinator_notifications_total{event=\"run.finished\",outcome=\"failed\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // No point yet: no point timestamp (the rules tell "no point" by its absence).
        assert!(
            !text.contains("rollcall_newest_point_timestamp_seconds{"),
            "{text}"
        );
        m.point("prod", Some(3), 2_500, 86_400);
        let text = encode(&registry_at(&s, || 3_000));
        assert!(
            text.contains("rollcall_newest_point_timestamp_seconds{environment=\"prod\"} 2500\n"),
            "{text}"
        );
        // A later success replaces the success and the result.
        m.ending(end("prod", "drill", true, 2_900.0, 2_960.0));
        let text = encode(&registry_at(&s, || 3_000));
        assert!(
            text.contains("rollcall_last_run_succeeded{environment=\"prod\",kind=\"drill\"} 1")
        );
        assert!(
            text.contains(
                "rollcall_last_success_duration_seconds{environment=\"prod\",kind=\"drill\"} 60.0"
            ),
            "{text}"
        );
    }
}
