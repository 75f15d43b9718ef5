//! Rollcall's agent: dials out to the coordinator, keeps one `Attach` stream open, sends
//! heartbeats with readiness, and executes the commands that come down the stream.
//!
//! The agent opens no inbound port. When the stream breaks it reconnects with jittered
//! exponential backoff (`backon`), forever, until it is told to stop.

pub mod checks;
pub mod config;
pub mod control;
pub mod data;
pub mod executor;
pub mod progress;
pub mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use api::model::{ActionKind, AgentMessage, CommandProgress, CoordinatorMessage, Heartbeat, Hello};
use api::pb::agent as pb;
use api::pb::agent::agent_service_client::AgentServiceClient;
use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

pub use crate::config::Settings;
use crate::control::RoleControl;
use crate::executor::{Executor, Identity};
use crate::state::StateDir;

/// A session that lasted this long was healthy: the next reconnect starts from the shortest
/// backoff again.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The actions every agent executes; role control adds its own (see `RoleControl`).
const CAPABILITIES: [&str; 2] = ["ping", "describe"];

/// How often readiness is re-evaluated for heartbeats.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

pub struct Agent {
    settings: Settings,
    executor: Arc<Executor>,
    endpoint: Endpoint,
    control: Arc<RoleControl>,
    data: Arc<crate::data::DataPlane>,
    capabilities: Vec<String>,
    readiness: Arc<std::sync::Mutex<(bool, String)>>,
}

impl Agent {
    /// Opens the state directory and prepares the TLS endpoint; connects only in `run`.
    pub fn build(settings: Settings) -> Result<Agent> {
        let state = StateDir::open(&settings.state_dir)?;
        let control = Arc::new(RoleControl::from_config(
            &settings.config_file,
            &settings.control,
            &settings.state_dir,
        )?);
        let data = Arc::new(
            crate::data::DataPlane::from_config(
                &settings.config_file,
                settings.name.as_str(),
                settings.environment.as_str(),
                settings.postgres.as_ref(),
                settings.objects.as_ref(),
            )?
            .with_state_dir(&settings.state_dir)?
            .with_teardown(settings.teardown_allowed)
            .with_another_server(settings.another_server),
        );
        let checks = Arc::new(crate::checks::Checks::from_config(
            &settings.config_file,
            &settings.checks,
            &settings.invariants,
            &settings.references,
            settings.smoke.as_ref(),
        )?);
        let mut capabilities = capabilities(&control, &data);
        capabilities.extend(checks.capabilities());
        let executor = Arc::new(
            Executor::new(
                Identity {
                    name: settings.name.clone(),
                    role: settings.role.clone(),
                    environment: settings.environment.clone(),
                    capabilities: capabilities.clone(),
                },
                state,
            )
            .with_control(control.clone())
            .with_data(data.clone())
            .with_checks(checks),
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&settings.ca_pem))
            .identity(TlsIdentity::from_pem(&settings.cert_pem, &settings.key_pem))
            .domain_name(settings.server_name.clone());
        let endpoint = Endpoint::from_shared(settings.coordinator_url.clone())
            .with_context(|| {
                format!(
                    "coordinator.url = {:?} is not a valid URL",
                    settings.coordinator_url
                )
            })?
            .tls_config(tls)
            .context("configure TLS for the coordinator connection")?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        Ok(Agent {
            settings,
            executor,
            endpoint,
            control,
            data,
            capabilities,
            readiness: Arc::new(std::sync::Mutex::new((false, "starting".into()))),
        })
    }

    /// Starts the role (when this agent supervises it), then attaches and re-attaches until
    /// `cancel` fires; on the way out, stops the role's supervised processes.
    pub async fn run(self, cancel: CancellationToken) -> Result<()> {
        // A database agent killed in the middle of a swap may have left the live database
        // refusing connections (or renamed): it accepts them again before anything else.
        match self.data.reopen_interrupted_swaps().await {
            Ok(reopened) => {
                for r in reopened {
                    tracing::warn!("an interrupted restore had left the live database closed: {r}");
                }
            }
            Err(e) => tracing::warn!(
                "cannot check the live database for an interrupted restore: {}",
                api::errors::one_line(&*e)
            ),
        }
        // A restore to a time killed mid-swap may have left the server stopped, or its data
        // directory renamed: a server runs from the live directory before anything else.
        match self.data.finish_interrupted_data_dir_swap().await {
            Ok(repository::Interrupted::Nothing) => {}
            Ok(done) => tracing::warn!("an interrupted data directory swap was finished: {done:?}"),
            Err(e) => tracing::error!(
                "cannot finish an interrupted data directory swap: {}",
                api::errors::one_line(&*e)
            ),
        }
        let supervision = cancel.child_token();
        self.control.start(supervision.clone()).await?;
        self.control.refreeze_after_start(supervision.clone());
        self.spawn_readiness(supervision.clone());
        let result = self.attach_loop(&cancel).await;
        supervision.cancel();
        self.control.stop().await;
        result
    }

    /// Re-evaluates readiness in the background, so a slow health check never delays the
    /// stream.
    fn spawn_readiness(&self, cancel: CancellationToken) {
        let control = self.control.clone();
        let readiness = self.readiness.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(READINESS_INTERVAL);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        let now = control.readiness().await;
                        *readiness.lock().unwrap_or_else(|p| p.into_inner()) = now;
                    }
                }
            }
        });
    }

    async fn attach_loop(&self, cancel: &CancellationToken) -> Result<()> {
        let reconnect = &self.settings.reconnect;
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(reconnect.initial)
            .with_max_delay(reconnect.max)
            .with_jitter()
            .without_max_times();
        let mut backoff = builder.build();
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                outcome = self.session(cancel) => outcome,
            };
            if cancel.is_cancelled() {
                return Ok(());
            }
            if started.elapsed() > HEALTHY_SESSION {
                backoff = builder.build();
            }
            let delay = backoff.next().unwrap_or(reconnect.max);
            match outcome {
                Ok(()) => tracing::warn!(
                    "coordinator closed the stream; reconnecting in {}",
                    humantime::format_duration(delay)
                ),
                Err(e) => tracing::warn!(
                    "attach to {} failed: {e:#}; retrying in {}",
                    self.settings.coordinator_url,
                    humantime::format_duration(delay)
                ),
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Dials the coordinator, says hello and waits for its welcome.
    async fn attach(
        &self,
    ) -> Result<(
        AgentServiceClient<tonic::transport::Channel>,
        mpsc::Sender<pb::AgentMessage>,
        tonic::Streaming<pb::CoordinatorMessage>,
        api::model::Welcome,
    )> {
        let channel = self.endpoint.connect().await.map_err(|e| {
            anyhow!(
                "connect to {}: {}",
                self.settings.coordinator_url,
                api::errors::one_line(&e)
            )
        })?;
        let mut client = AgentServiceClient::new(channel);
        let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(256);
        let hello = Hello {
            name: self.settings.name.clone(),
            role: self.settings.role.clone(),
            environment: self.settings.environment.clone(),
            capabilities: self.capabilities.clone(),
            version: api::VERSION.to_owned(),
            highest_epoch: self.executor.highest_epoch(),
        };
        out_tx
            .send(AgentMessage::Hello(hello).into())
            .await
            .map_err(|_| anyhow!("outbound stream closed before hello"))?;
        let response = client
            .attach(ReceiverStream::new(out_rx))
            .await
            .map_err(|status| anyhow!("coordinator refused attach: {}", status.message()))?;
        let mut inbound = response.into_inner();

        let welcome = match inbound.message().await {
            Ok(Some(message)) => match CoordinatorMessage::try_from(message) {
                Ok(CoordinatorMessage::Welcome(welcome)) => welcome,
                Ok(_) => bail!("coordinator sent a command before its welcome"),
                Err(e) => bail!("coordinator sent an invalid welcome: {e}"),
            },
            Ok(None) => bail!("coordinator closed the stream before its welcome"),
            Err(status) => bail!("coordinator refused attach: {}", status.message()),
        };
        Ok((client, out_tx, inbound, welcome))
    }

    /// One connection: hello, welcome, then heartbeats and commands until the stream ends.
    async fn session(&self, cancel: &CancellationToken) -> Result<()> {
        let limit = self.settings.reconnect.attach_timeout;
        let (_client, out_tx, mut inbound, welcome) =
            match tokio::time::timeout(limit, self.attach()).await {
                Ok(attached) => attached?,
                Err(_) => bail!(
                    "no welcome from the coordinator within {} (reconnect.attach_timeout): \
                     something accepts connections at this address but does not answer as \
                     the coordinator",
                    humantime::format_duration(limit)
                ),
            };
        if !self.executor.observe_epoch(welcome.epoch)? {
            tracing::error!(
                epoch = %welcome.epoch,
                highest = ?self.executor.highest_epoch(),
                "this coordinator's epoch is older than one this agent already obeys: it is \
                 stale, and its commands will be refused"
            );
        }
        tracing::info!(epoch = %welcome.epoch, "attached to coordinator");

        let mut heartbeat = tokio::time::interval(welcome.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let session = cancel.child_token();
        let _stop_on_exit = session.clone().drop_guard();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    let (ready, detail) =
                        self.readiness.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let hb = Heartbeat { ready, detail, sent_at: Some(std::time::SystemTime::now()) };
                    if out_tx.send(AgentMessage::Heartbeat(hb).into()).await.is_err() {
                        bail!("outbound stream closed");
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.dispatch(message, &out_tx, &session),
                    Ok(None) => return Ok(()),
                    Err(status) => bail!("stream lost: {}", status.message()),
                },
            }
        }
    }

    fn dispatch(
        &self,
        message: pb::CoordinatorMessage,
        out_tx: &mpsc::Sender<pb::AgentMessage>,
        session: &CancellationToken,
    ) {
        // An invalid command still gets an answer when it names itself, so the coordinator
        // does not wait for its deadline.
        let fallback_id = match &message.msg {
            Some(pb::coordinator_message::Msg::Command(c)) => Some((c.command_id.clone(), c.epoch)),
            _ => None,
        };
        match CoordinatorMessage::try_from(message) {
            Ok(CoordinatorMessage::Command(command)) => {
                let executor = self.executor.clone();
                let out_tx = out_tx.clone();
                let session = session.clone();
                let reporter = {
                    let (out_tx, id, epoch, run_id) = (
                        out_tx.clone(),
                        command.id.clone(),
                        command.epoch,
                        command.run_id.clone(),
                    );
                    crate::progress::Reporter::new(move |progress| {
                        // Best effort: a full queue drops progress, never a result.
                        let message = AgentMessage::Progress(CommandProgress {
                            command_id: id.clone(),
                            epoch,
                            run_id: run_id.clone(),
                            progress,
                        });
                        let _ = out_tx.try_send(message.into());
                    })
                };
                // Role control changes what the role's readiness is: its heartbeat goes up
                // first, so a gate that needs the role ready sees it with the result instead of
                // a heartbeat interval (plus a readiness interval) later.
                let readiness = matches!(
                    command.action.kind(),
                    ActionKind::Scale
                        | ActionKind::Restart
                        | ActionKind::Freeze
                        | ActionKind::Unfreeze
                        | ActionKind::Smoke
                )
                .then(|| (self.control.clone(), self.readiness.clone()));
                tokio::spawn(async move {
                    let result = executor.execute_reporting(command, reporter).await;
                    // If this session ended meanwhile, the result is recorded: the coordinator
                    // re-sends the command id and gets it replayed.
                    if session.is_cancelled() {
                        return;
                    }
                    if let Some((control, shared)) = readiness {
                        let (ready, detail) = control.readiness().await;
                        *shared.lock().unwrap_or_else(|p| p.into_inner()) = (ready, detail.clone());
                        let hb = Heartbeat {
                            ready,
                            detail,
                            sent_at: Some(std::time::SystemTime::now()),
                        };
                        let _ = out_tx.send(AgentMessage::Heartbeat(hb).into()).await;
                    }
                    let _ = out_tx.send(AgentMessage::Result(result).into()).await;
                });
            }
            Ok(CoordinatorMessage::Welcome(_)) => {
                tracing::warn!("ignoring a second welcome on one stream");
            }
            Err(e) => {
                tracing::warn!("refusing invalid message from coordinator: {e}");
                if let Some((id, epoch)) = fallback_id {
                    let now = api::model::to_unix_ms(std::time::SystemTime::now());
                    let reply = pb::CommandResult {
                        command_id: id,
                        epoch,
                        outcome: pb::Outcome::Unsupported as i32,
                        message: format!(
                            "agent {} cannot execute this command: {e}",
                            self.settings.name
                        ),
                        replayed: false,
                        started_unix_ms: now,
                        finished_unix_ms: now,
                        output_version: 0,
                        detail: None,
                    };
                    let _ = out_tx.try_send(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Result(reply)),
                    });
                }
            }
        }
    }
}

fn capabilities(control: &RoleControl, data: &crate::data::DataPlane) -> Vec<String> {
    CAPABILITIES
        .iter()
        .map(|c| (*c).to_owned())
        .chain(control.capabilities())
        .chain(data.capabilities())
        .collect()
}
