//! Agent → coordinator: the hello, heartbeats and progress reports an agent sends up its stream.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{AgentName, CommandId, CommandResult, Environment, Epoch, Invalid, Role, check_token};
use crate::pb::agent as pb;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub capabilities: Vec<String>,
    pub version: String,
    pub highest_epoch: Option<Epoch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub ready: bool,
    pub detail: String,
    /// The agent's wall clock when it sent the heartbeat (None from older agents).
    pub sent_at: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AgentMessage {
    Hello(Hello),
    Heartbeat(Heartbeat),
    Result(CommandResult),
    Progress(CommandProgress),
}

/// How far a long command has come (best effort; the result is what counts).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// What the command is doing now: `listing`, `copying`, `restoring`, `done`...
    pub stage: String,
    pub objects_done: u64,
    pub objects_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Objects or bytes actually written (the rest were already in place).
    pub objects_copied: u64,
    pub bytes_copied: u64,
    /// What the `objects_*` fields count: `objects`, or `archives` of a Postgres dump (empty:
    /// objects).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
}

/// [`Progress`] of one command, as it travels up the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandProgress {
    pub command_id: CommandId,
    pub epoch: Epoch,
    pub run_id: String,
    pub progress: Progress,
}

impl TryFrom<pb::CommandProgress> for CommandProgress {
    type Error = Invalid;
    fn try_from(m: pb::CommandProgress) -> Result<Self, Invalid> {
        if m.stage.len() > 64 {
            return Err(Invalid::new("progress stage", "longer than 64 characters"));
        }
        if m.unit.len() > 16 {
            return Err(Invalid::new("progress unit", "longer than 16 characters"));
        }
        if m.run_id.len() > 128 {
            return Err(Invalid::new(
                "progress run_id",
                "longer than 128 characters",
            ));
        }
        Ok(CommandProgress {
            command_id: CommandId::parse(&m.command_id)?,
            epoch: Epoch::new(m.epoch)?,
            run_id: m.run_id,
            progress: Progress {
                stage: m.stage,
                objects_done: m.objects_done,
                objects_total: m.objects_total,
                bytes_done: m.bytes_done,
                bytes_total: m.bytes_total,
                objects_copied: m.objects_copied,
                bytes_copied: m.bytes_copied,
                unit: m.unit,
            },
        })
    }
}

impl From<CommandProgress> for pb::CommandProgress {
    fn from(m: CommandProgress) -> Self {
        let p = m.progress;
        pb::CommandProgress {
            command_id: m.command_id.to_string(),
            epoch: m.epoch.get(),
            run_id: m.run_id,
            stage: p.stage,
            objects_done: p.objects_done,
            objects_total: p.objects_total,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            objects_copied: p.objects_copied,
            bytes_copied: p.bytes_copied,
            unit: p.unit,
        }
    }
}

impl TryFrom<pb::Hello> for Hello {
    type Error = Invalid;
    fn try_from(m: pb::Hello) -> Result<Self, Invalid> {
        for cap in &m.capabilities {
            check_token("capability", cap, 64)?;
        }
        if m.version.is_empty() {
            return Err(Invalid::new("version", "must not be empty"));
        }
        Ok(Hello {
            name: AgentName::parse(&m.name)?,
            role: Role::parse(&m.role)?,
            environment: Environment::parse(&m.environment)?,
            capabilities: m.capabilities,
            version: m.version,
            highest_epoch: Epoch::new(m.highest_epoch).ok(),
        })
    }
}

impl From<Hello> for pb::Hello {
    fn from(m: Hello) -> Self {
        pb::Hello {
            name: m.name.into(),
            role: m.role.into(),
            environment: m.environment.into(),
            capabilities: m.capabilities,
            version: m.version,
            highest_epoch: m.highest_epoch.map_or(0, Epoch::get),
        }
    }
}

impl TryFrom<pb::AgentMessage> for AgentMessage {
    type Error = Invalid;
    fn try_from(m: pb::AgentMessage) -> Result<Self, Invalid> {
        match m.msg {
            Some(pb::agent_message::Msg::Hello(h)) => Ok(AgentMessage::Hello(h.try_into()?)),
            Some(pb::agent_message::Msg::Heartbeat(h)) => Ok(AgentMessage::Heartbeat(Heartbeat {
                ready: h.ready,
                detail: h.detail,
                sent_at: (h.sent_unix_ms > 0).then(|| super::from_unix_ms(h.sent_unix_ms)),
            })),
            Some(pb::agent_message::Msg::Result(r)) => Ok(AgentMessage::Result(r.try_into()?)),
            Some(pb::agent_message::Msg::Progress(p)) => Ok(AgentMessage::Progress(p.try_into()?)),
            None => Err(Invalid::new("agent message", "is empty")),
        }
    }
}

impl From<AgentMessage> for pb::AgentMessage {
    fn from(m: AgentMessage) -> Self {
        let msg = match m {
            AgentMessage::Hello(h) => pb::agent_message::Msg::Hello(h.into()),
            AgentMessage::Heartbeat(h) => pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                ready: h.ready,
                detail: h.detail,
                sent_unix_ms: h.sent_at.map_or(0, super::to_unix_ms),
            }),
            AgentMessage::Result(r) => pb::agent_message::Msg::Result(r.into()),
            AgentMessage::Progress(p) => pb::agent_message::Msg::Progress(p.into()),
        };
        pb::AgentMessage { msg: Some(msg) }
    }
}
