//! Rollcall's coordinator: attaches agents over mTLS, tracks their readiness, sends them
//! commands through the `AgentLink` port, journals state in a `Store`, serves the operator API.
//!
//! `Coordinator::start` takes already-bound listeners and an opened store, so every test tier
//! can run the real thing in-process on `127.0.0.1:0`.

pub mod access;
pub mod certs;
pub mod config;
pub mod cron;
pub mod engine;
pub mod grpc;
pub mod layers;
pub mod limits;
pub mod link;
pub mod metrics;
pub mod notify;
pub mod plan;
pub mod registry;
pub mod report;
pub mod schedule;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use api::model::{AgentStatus, Epoch};
use api::pb::agent::agent_service_server::AgentServiceServer;
use api::pb::operator::operator_service_server::OperatorServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::grpc::{AgentStream, OperatorApi, OperatorAuth};
use crate::layers::{DeadlineLayer, Limits, OperatorAuthLayer};
use crate::link::StreamLink;
use crate::registry::Registry;
use crate::store::Store;
use crate::tls::{ClientAuth, Rejections, TlsMaterial};

/// How long shutdown waits for streams to drain before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the coordinator needs besides its listeners and store.
pub struct Settings {
    pub tls: TlsMaterial,
    pub heartbeat_interval: Duration,
    pub agent_timeout: Duration,
    /// SHA-256 of each accepted operator bearer token of `operator.token_sha256`: admins
    /// named `token`.
    pub operator_token_hashes: Vec<[u8; 32]>,
    /// The named tokens of `[[operator.token]]`, each with its role.
    pub operator_tokens: Vec<grpc::OperatorToken>,
    /// The environments runs can target.
    pub environments: std::collections::BTreeMap<String, config::Environment>,
    /// Attach rate, operator calls in flight and their deadline.
    pub limits: Limits,
    /// The `[[notify]]` webhooks told of runs that finish, block or fail.
    pub notify: Vec<notify::Webhook>,
    /// How often repositories are read for the recoverable-window gauges (`[metrics]
    /// observe_interval`).
    pub observe_interval: Duration,
}

pub struct Listeners {
    pub agents: TcpListener,
    pub operator: TcpListener,
    /// Prometheus scrapes (plain HTTP); none when not configured.
    pub metrics: Option<TcpListener>,
}

/// Pending connections the kernel may queue per listener. After a coordinator restart every
/// agent reconnects at once; a short queue turns that into SYN retransmits of whole seconds.
const LISTEN_BACKLOG: u32 = 4096;

impl Listeners {
    pub async fn bind(
        agents: SocketAddr,
        operator: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> Result<Listeners> {
        let metrics = match metrics {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        Ok(Listeners {
            metrics,
            agents: listen(agents)
                .with_context(|| format!("listen for agents on {agents} (listen.agents)"))?,
            operator: listen(operator)
                .with_context(|| format!("listen for operators on {operator} (listen.operator)"))?,
        })
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

pub struct Coordinator {
    settings: Settings,
    listeners: Listeners,
    handle: Handle,
    /// Stops run drivers when the coordinator stops.
    engine_shutdown: CancellationToken,
}

/// A cheap-clone handle for talking to a running coordinator in-process.
#[derive(Clone)]
pub struct Handle {
    pub link: StreamLink,
    pub engine: engine::Engine<StreamLink>,
    registry: Registry,
    store: Arc<dyn Store>,
    pub agents_addr: SocketAddr,
    pub operator_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub agent_rejections: Arc<Rejections>,
    pub operator_rejections: Arc<Rejections>,
    /// Attachments and operator calls the gRPC layers refused.
    pub call_refusals: Arc<metrics::CallRefusals>,
    /// Webhook deliveries by event and outcome.
    pub notifications: Arc<metrics::NotifyCounters>,
}

impl Handle {
    pub fn epoch(&self) -> Epoch {
        self.link.epoch
    }

    pub fn agents(&self) -> Vec<AgentStatus> {
        self.registry.list()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

impl Coordinator {
    /// Takes a new epoch from the store (strictly greater than any earlier coordinator's) and
    /// prepares to serve.
    pub async fn start(
        settings: Settings,
        listeners: Listeners,
        store: Arc<dyn Store>,
    ) -> Result<Coordinator> {
        let epoch = store
            .next_epoch(&holder_name())
            .await
            .context("take a new epoch from the state store")?;
        let registry = Registry::new();
        let link = StreamLink::new(registry.clone(), epoch, Arc::default());
        let engine_shutdown = CancellationToken::new();
        let notifications = Arc::new(metrics::NotifyCounters::default());
        let notifier = notify::Notifier::start(
            settings.notify.clone(),
            notifications.clone(),
            engine_shutdown.clone(),
        )?;
        let run_metrics = Arc::new(metrics::RunMetrics::default());
        for (name, env) in &settings.environments {
            run_metrics.environment(name, env.rpo.as_secs());
            if let Some(test) = &env.restore_test {
                run_metrics.restore_test(name, &test.source);
            }
            if env.base_backup_schedule.is_some() {
                run_metrics.base_backups_scheduled(name);
            }
        }
        let engine = engine::Engine::new(
            store.clone(),
            link.clone(),
            Arc::new(registry.clone()),
            settings.environments.clone(),
            engine_shutdown.clone(),
            settings.agent_timeout,
            engine::Observers {
                metrics: run_metrics,
                notifier,
            },
        );
        // The verdict gauges start from the journal, so a restart does not forget them.
        match engine.observe_verdicts().await {
            Ok(n) => tracing::debug!(runs = n, "verdict metrics read from the journal"),
            Err(e) => tracing::warn!("cannot read the newest runs' verdicts for /metrics: {e:#}"),
        }
        let handle = Handle {
            link,
            engine,
            registry,
            store,
            agents_addr: listeners.agents.local_addr()?,
            operator_addr: listeners.operator.local_addr()?,
            metrics_addr: listeners
                .metrics
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
            agent_rejections: Arc::default(),
            operator_rejections: Arc::default(),
            call_refusals: Arc::default(),
            notifications,
        };
        tracing::info!(
            %epoch,
            agents = %handle.agents_addr,
            operator = %handle.operator_addr,
            "coordinator started"
        );
        Ok(Coordinator {
            settings,
            listeners,
            handle,
            engine_shutdown,
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) -> Result<()> {
        let Coordinator {
            settings,
            listeners,
            handle,
            engine_shutdown,
        } = self;
        let epoch = handle.epoch();
        let agent_tls = tls::server_config(&settings.tls, ClientAuth::Required)?;
        let operator_tls = tls::server_config(&settings.tls, ClientAuth::Optional)?;

        let agent_incoming = tls::incoming(
            listeners.agents,
            agent_tls,
            handle.agent_rejections.clone(),
            "agents",
            cancel.clone(),
        );
        let operator_incoming = tls::incoming(
            listeners.operator,
            operator_tls,
            handle.operator_rejections.clone(),
            "operator",
            cancel.clone(),
        );

        let limits = &settings.limits;
        let agents_server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            // New attachments pass at `agents.attach_rate`; a second's worth more wait, the
            // rest are refused (`Unavailable`) and the agents retry with backoff. The buffer
            // makes the one rate limiter shared by every connection.
            .layer(
                ServiceBuilder::new()
                    .map_err(layers::attach_refusal(limits, handle.call_refusals.clone()))
                    .load_shed()
                    .buffer(limits.attach_queue())
                    .rate_limit(limits.attaches, limits.attach_window),
            )
            .add_service(AgentServiceServer::new(AgentStream {
                registry: handle.registry.clone(),
                link: handle.link.clone(),
                epoch,
                heartbeat_interval: settings.heartbeat_interval,
            }))
            .serve_with_incoming_shutdown(agent_incoming, cancel.clone().cancelled_owned());

        let legacy = settings
            .operator_token_hashes
            .iter()
            .map(|&sha256| grpc::OperatorToken {
                name: "token".into(),
                role: api::identity::OperatorRole::Admin,
                sha256,
            });
        let auth = OperatorAuth {
            tokens: Arc::new(settings.operator_tokens.into_iter().chain(legacy).collect()),
        };
        let operator_server = tonic::transport::Server::builder()
            // Authentication first, so a refused call uses up no capacity; then at most
            // `operator.max_concurrent_calls` in flight (one more is refused at once), each
            // within `operator.call_timeout` unless it is one of `layers::LONG_CALLS`.
            .layer(
                ServiceBuilder::new()
                    .layer(OperatorAuthLayer::new(auth))
                    .map_err(layers::operator_refusal(
                        limits,
                        handle.call_refusals.clone(),
                    ))
                    .load_shed()
                    .concurrency_limit(limits.operator_calls)
                    .layer(DeadlineLayer::new(limits.operator_call_timeout)),
            )
            .add_service(OperatorServiceServer::new(OperatorApi {
                registry: handle.registry.clone(),
                epoch,
                engine: handle.engine.clone(),
            }))
            .serve_with_incoming_shutdown(operator_incoming, cancel.clone().cancelled_owned());

        let sweeper = sweep_silent_agents(
            handle.registry.clone(),
            settings.agent_timeout,
            cancel.clone(),
        );

        let metrics_server = {
            let sources = metrics::Sources {
                registry: handle.registry.clone(),
                epoch: epoch.get(),
                runs: handle.engine.metrics().clone(),
                commands: handle.link.commands.clone(),
                refusals: handle.call_refusals.clone(),
                notifications: handle.notifications.clone(),
                agent_rejections: handle.agent_rejections.clone(),
                operator_rejections: handle.operator_rejections.clone(),
            };
            let cancel = cancel.clone();
            async move {
                match listeners.metrics {
                    Some(listener) => metrics::serve(listener, sources, cancel).await,
                    None => Ok(()),
                }
            }
        };

        // Runs a previous coordinator left unfinished continue under this epoch.
        match handle.engine.resume_unfinished().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "resumed unfinished runs"),
            Err(e) => tracing::error!("cannot read unfinished runs from the journal: {e:#}"),
        }
        let _stop_runs = engine_shutdown.drop_guard();
        {
            let engine = handle.engine.clone();
            tokio::spawn(async move { engine.observe_points().await });
            // The WAL keeps coming whatever runs do: its gauges are read again every interval.
            let (engine, stop, every) = (
                handle.engine.clone(),
                cancel.clone(),
                settings.observe_interval.max(Duration::from_secs(1)),
            );
            tokio::spawn(async move {
                loop {
                    engine.observe_wal(every).await;
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                    }
                }
            });
            tokio::spawn(schedule::run(handle.engine.clone(), cancel.clone()));
            let (engine, reports) = (handle.engine.clone(), handle.registry.subscribe_progress());
            let stop = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = engine.journal_progress(reports) => {}
                }
            });
            let (engine, changes) = (handle.engine.clone(), handle.registry.subscribe_presence());
            let stop = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = engine.journal_presence(changes) => {}
                }
            });
        }

        let servers = async {
            let (a, o, m, ()) =
                tokio::join!(agents_server, operator_server, metrics_server, sweeper);
            a.context("serve the agent stream")?;
            o.context("serve the operator API")?;
            m?;
            anyhow::Ok(())
        };
        tokio::pin!(servers);
        tokio::select! {
            result = &mut servers => return result,
            () = cancel.cancelled() => {}
        }
        // Run drivers stop first: nothing more is journaled from a coordinator on its way out
        // (its successor resumes from the journal, as after a crash).
        handle.engine.stop_drivers();
        // Attach streams never end on their own: end them so graceful shutdown can finish.
        handle.registry.detach_all("coordinator shutting down");
        match tokio::time::timeout(SHUTDOWN_GRACE, servers).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!("streams did not drain within {SHUTDOWN_GRACE:?}; dropping them");
                Ok(())
            }
        }
    }
}

async fn sweep_silent_agents(registry: Registry, timeout: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for name in registry.expire(timeout) {
            tracing::warn!(
                agent = %name,
                "agent unavailable: no heartbeat for {}",
                humantime::format_duration(timeout)
            );
        }
    }
}

/// Names this coordinator in the epoch history: host and process id.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{host}/pid {}", std::process::id())
}
