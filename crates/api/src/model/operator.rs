//! The operator API's view of the fleet.

use serde::{Deserialize, Serialize};

use super::{AgentName, Environment, Invalid, Role};
use crate::pb::operator as op;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    Connected,
    Unavailable,
}

/// One row of `rollcall agents`. Its serde form is the stable `--json` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub capabilities: Vec<String>,
    pub version: String,
    pub availability: Availability,
    pub ready: bool,
    pub detail: String,
    pub last_heartbeat_unix_ms: i64,
    pub connected_since_unix_ms: i64,
    pub peer_address: String,
    /// The agent's clock minus the coordinator's at its last heartbeat, in milliseconds (None:
    /// an agent that does not send its clock). Shown and warned about; nothing depends on it.
    pub clock_offset_ms: Option<i64>,
}

impl TryFrom<op::AgentStatus> for AgentStatus {
    type Error = Invalid;
    fn try_from(m: op::AgentStatus) -> Result<Self, Invalid> {
        let availability = match op::Availability::try_from(m.availability) {
            Ok(op::Availability::Connected) => Availability::Connected,
            Ok(op::Availability::Unavailable) => Availability::Unavailable,
            Ok(op::Availability::Unspecified) | Err(_) => {
                return Err(Invalid::new(
                    "availability",
                    format!("unknown value {}", m.availability),
                ));
            }
        };
        Ok(AgentStatus {
            name: AgentName::parse(&m.name)?,
            role: Role::parse(&m.role)?,
            environment: Environment::parse(&m.environment)?,
            capabilities: m.capabilities,
            version: m.version,
            availability,
            ready: m.ready,
            detail: m.detail,
            last_heartbeat_unix_ms: m.last_heartbeat_unix_ms,
            connected_since_unix_ms: m.connected_since_unix_ms,
            peer_address: m.peer_address,
            clock_offset_ms: m.clock_offset_ms,
        })
    }
}

impl From<AgentStatus> for op::AgentStatus {
    fn from(m: AgentStatus) -> Self {
        let availability = match m.availability {
            Availability::Connected => op::Availability::Connected,
            Availability::Unavailable => op::Availability::Unavailable,
        };
        op::AgentStatus {
            name: m.name.into(),
            role: m.role.into(),
            environment: m.environment.into(),
            capabilities: m.capabilities,
            version: m.version,
            availability: availability as i32,
            ready: m.ready,
            detail: m.detail,
            last_heartbeat_unix_ms: m.last_heartbeat_unix_ms,
            connected_since_unix_ms: m.connected_since_unix_ms,
            peer_address: m.peer_address,
            clock_offset_ms: m.clock_offset_ms,
        }
    }
}
