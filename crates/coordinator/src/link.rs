//! `AgentLink`: how the run engine talks to agents — send one command, await its result.
//!
//! The engine sees this trait, never tonic. The link stamps every command with the
//! coordinator's epoch and the current trace context, so neither can be forgotten.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api::model::{Action, AgentName, Command, CommandId, CommandResult, CoordinatorMessage, Epoch};
use opentelemetry::propagation::Injector;
use tokio::sync::oneshot;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::CommandCounters;
use crate::registry::{Registry, SendError};

/// How long past a command's deadline we wait for the agent's own `timed_out` report before
/// giving up on the result.
pub const RESULT_GRACE: Duration = Duration::from_secs(2);

/// A command as the engine asks for it; the link adds epoch and trace context.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: CommandId,
    pub run_id: String,
    pub deadline: SystemTime,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("agent {agent} is not connected")]
    NotConnected { agent: AgentName },
    #[error("agent {agent} is not reading its stream (outbound queue full)")]
    Backlogged { agent: AgentName },
    #[error("agent {agent} disconnected before answering command {command_id}")]
    Disconnected {
        agent: AgentName,
        command_id: CommandId,
    },
    #[error("agent {agent} sent no result for command {command_id} by its deadline")]
    NoResult {
        agent: AgentName,
        command_id: CommandId,
    },
}

pub trait AgentLink: Send + Sync {
    /// The epoch this coordinator stamps on its commands.
    fn epoch(&self) -> Epoch;

    /// Sends one command and waits for its result (at most until the deadline plus
    /// `RESULT_GRACE`). Re-sending the same command id is safe: agents dedupe on it.
    fn send(
        &self,
        agent: &AgentName,
        command: Outgoing,
    ) -> impl Future<Output = Result<CommandResult, LinkError>> + Send;
}

/// The link over the agents' gRPC streams, backed by the registry.
#[derive(Clone)]
pub struct StreamLink {
    pub(crate) registry: Registry,
    pub(crate) epoch: Epoch,
    pub(crate) commands: Arc<CommandCounters>,
}

impl StreamLink {
    pub fn new(registry: Registry, epoch: Epoch, commands: Arc<CommandCounters>) -> StreamLink {
        StreamLink {
            registry,
            epoch,
            commands,
        }
    }
}

impl LinkError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::NotConnected { .. } => "not_connected",
            LinkError::Backlogged { .. } => "backlogged",
            LinkError::Disconnected { .. } => "disconnected",
            LinkError::NoResult { .. } => "no_result",
        }
    }
}

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl AgentLink for StreamLink {
    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn send(
        &self,
        agent: &AgentName,
        command: Outgoing,
    ) -> impl Future<Output = Result<CommandResult, LinkError>> + Send {
        let span = tracing::info_span!(
            "coordinator.link.command",
            agent = %agent,
            command_id = %command.id,
            action = command.action.name(),
            run_id = %command.run_id,
            outcome = tracing::field::Empty,
        );
        let registry = self.registry.clone();
        let epoch = self.epoch;
        let agent = agent.clone();
        let commands = self.commands.clone();
        let action = command.action.name();
        async move {
            let mut trace_context = BTreeMap::new();
            let cx = tracing::Span::current().context();
            opentelemetry::global::get_text_map_propagator(|p| {
                p.inject_context(&cx, &mut MapInjector(&mut trace_context));
            });
            let id = command.id.clone();
            let deadline = command.deadline;
            // The agent gets what is left of the deadline on this clock, as a duration it
            // measures from receipt on its own: skew between the machines changes nothing.
            let time_limit = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let message = CoordinatorMessage::Command(Command {
                id: command.id,
                epoch,
                run_id: command.run_id,
                time_limit,
                trace_context,
                action: command.action,
            });
            let (tx, rx) = oneshot::channel();
            let sent = registry
                .send(&agent, message, Some((id.clone(), tx)))
                .map_err(|e| match e {
                    SendError::NotConnected => LinkError::NotConnected {
                        agent: agent.clone(),
                    },
                    SendError::Backlogged => LinkError::Backlogged {
                        agent: agent.clone(),
                    },
                });
            if let Err(e) = sent {
                commands.count(action, e.kind());
                tracing::Span::current().record("outcome", e.kind());
                return Err(e);
            }
            let wait = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                + RESULT_GRACE;
            let result = match tokio::time::timeout(wait, rx).await {
                Ok(Ok(result)) => Ok(result),
                Ok(Err(_)) => Err(LinkError::Disconnected {
                    agent: agent.clone(),
                    command_id: id.clone(),
                }),
                Err(_) => {
                    registry.forget(&agent, &id);
                    Err(LinkError::NoResult {
                        agent: agent.clone(),
                        command_id: id,
                    })
                }
            };
            let outcome = match &result {
                Ok(r) => r.outcome.as_str(),
                Err(e) => e.kind(),
            };
            commands.count(action, outcome);
            tracing::Span::current().record("outcome", outcome);
            result
        }
        .instrument(span)
    }
}
