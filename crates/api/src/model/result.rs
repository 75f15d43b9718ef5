//! Results: what an agent answers to a command, and how it went.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{
    AgentName, CommandId, Environment, Epoch, Invalid, Output, Role, from_unix_ms, to_unix_ms,
};
use crate::pb::agent as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
    StaleEpoch,
    Unsupported,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::StaleEpoch => "stale_epoch",
            Outcome::Unsupported => "unsupported",
        }
    }
}

impl FromStr for Outcome {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Outcome, Invalid> {
        [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::StaleEpoch,
            Outcome::Unsupported,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| {
            Invalid::new(
                "outcome",
                format!("{s:?} is not an outcome this build knows"),
            )
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    pub name: AgentName,
    pub role: Role,
    pub environment: Environment,
    pub capabilities: Vec<String>,
    pub version: String,
    pub highest_epoch: Option<Epoch>,
    pub recorded_results: u64,
    pub started: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultDetail {
    Ping {
        executions: u64,
    },
    Describe(Description),
    /// The typed output of the other actions ([`super::ActionOutput`]) in its wire form.
    Output(Output),
}

/// What `Scale` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleOutput {
    /// Replicas before this command.
    pub before: u32,
    /// Replicas now.
    pub now: u32,
    /// The count `prior` returns to for this run.
    pub prior: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_id: CommandId,
    pub epoch: Epoch,
    pub outcome: Outcome,
    pub message: String,
    /// True when the agent answered from its record of an earlier execution.
    pub replayed: bool,
    pub started: SystemTime,
    pub finished: SystemTime,
    pub detail: Option<ResultDetail>,
}

impl TryFrom<pb::CommandResult> for CommandResult {
    type Error = Invalid;
    fn try_from(m: pb::CommandResult) -> Result<Self, Invalid> {
        let outcome = match pb::Outcome::try_from(m.outcome) {
            Ok(pb::Outcome::Succeeded) => Outcome::Succeeded,
            Ok(pb::Outcome::Failed) => Outcome::Failed,
            Ok(pb::Outcome::TimedOut) => Outcome::TimedOut,
            Ok(pb::Outcome::StaleEpoch) => Outcome::StaleEpoch,
            Ok(pb::Outcome::Unsupported) => Outcome::Unsupported,
            Ok(pb::Outcome::Unspecified) | Err(_) => {
                return Err(Invalid::new(
                    "outcome",
                    format!("unknown value {}", m.outcome),
                ));
            }
        };
        let detail = match m.detail {
            None => None,
            Some(pb::command_result::Detail::Ping(p)) => Some(ResultDetail::Ping {
                executions: p.executions,
            }),
            Some(pb::command_result::Detail::Describe(d)) => {
                Some(ResultDetail::Describe(Description {
                    name: AgentName::parse(&d.name)?,
                    role: Role::parse(&d.role)?,
                    environment: Environment::parse(&d.environment)?,
                    capabilities: d.capabilities,
                    version: d.version,
                    highest_epoch: Epoch::new(d.highest_epoch).ok(),
                    recorded_results: d.recorded_results,
                    started: from_unix_ms(d.started_unix_ms),
                }))
            }
            Some(pb::command_result::Detail::OutputJson(text)) => {
                Some(ResultDetail::Output(Output {
                    version: m.output_version,
                    body: serde_json::from_str(&text)
                        .map_err(|e| Invalid::new("result output", format!("is not JSON ({e})")))?,
                }))
            }
        };
        Ok(CommandResult {
            command_id: CommandId::parse(&m.command_id)?,
            epoch: Epoch::new(m.epoch)?,
            outcome,
            message: m.message,
            replayed: m.replayed,
            started: from_unix_ms(m.started_unix_ms),
            finished: from_unix_ms(m.finished_unix_ms),
            detail,
        })
    }
}

impl From<CommandResult> for pb::CommandResult {
    fn from(m: CommandResult) -> Self {
        let outcome = match m.outcome {
            Outcome::Succeeded => pb::Outcome::Succeeded,
            Outcome::Failed => pb::Outcome::Failed,
            Outcome::TimedOut => pb::Outcome::TimedOut,
            Outcome::StaleEpoch => pb::Outcome::StaleEpoch,
            Outcome::Unsupported => pb::Outcome::Unsupported,
        };
        let output_version = match &m.detail {
            Some(ResultDetail::Output(o)) => o.version,
            _ => 0,
        };
        let detail = m.detail.map(|d| match d {
            ResultDetail::Ping { executions } => {
                pb::command_result::Detail::Ping(pb::PingResult { executions })
            }
            ResultDetail::Describe(d) => pb::command_result::Detail::Describe(pb::DescribeResult {
                name: d.name.into(),
                role: d.role.into(),
                environment: d.environment.into(),
                capabilities: d.capabilities,
                version: d.version,
                highest_epoch: d.highest_epoch.map_or(0, Epoch::get),
                recorded_results: d.recorded_results,
                started_unix_ms: to_unix_ms(d.started),
            }),
            ResultDetail::Output(output) => {
                pb::command_result::Detail::OutputJson(output.body.to_string())
            }
        });
        pb::CommandResult {
            command_id: m.command_id.0,
            epoch: m.epoch.get(),
            outcome: outcome as i32,
            message: m.message,
            replayed: m.replayed,
            started_unix_ms: to_unix_ms(m.started),
            finished_unix_ms: to_unix_ms(m.finished),
            output_version,
            detail,
        }
    }
}
