//! Sends one agent its commands of a phase, in order, with retries: each command is journaled
//! before it is sent (under a deterministic id, so a resumed run re-sends the same one), each
//! answer when it arrives, with the agent's output decoded by the action sent.

use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow};
use api::model::{Action as AgentAction, ActionOutput, AgentName, Outcome, ResultDetail};
use chrono::Utc;

use super::commands::CommandKey;
use crate::link::{AgentLink, LinkError, Outgoing};
use crate::store::{self, CommandRecord, ResultRecord, Store};

/// Pause before re-sending a command whose agent was not reachable.
const RESEND_PAUSE: Duration = Duration::from_millis(250);
/// Longest pause between retries of a failed command.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(10);

/// Runs a phase's steps on one agent with retries. The outer error is the journal failing
/// (the run cannot continue); the inner one is the agent's failure (the gate judges it).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_steps<L: AgentLink>(
    store: &dyn Store,
    link: &L,
    run_id: &str,
    phase: &str,
    phase_index: usize,
    attempt: u32,
    retries: u32,
    agent: &AgentName,
    steps: &[AgentAction],
    deadline: SystemTime,
) -> Result<std::result::Result<(), String>> {
    for (step, action) in steps.iter().enumerate() {
        let mut last = String::new();
        let mut ok = false;
        for retry in 0..=retries {
            let key = CommandKey {
                run: run_id.to_owned(),
                phase: phase.to_owned(),
                agent: agent.to_string(),
                attempt,
                step,
                retry,
            };
            let id = key.to_string();
            'same_id: loop {
                let command_id = key.id().map_err(|e| anyhow!("command id {id}: {e}"))?;
                store
                    .record_command(&CommandRecord {
                        command_id: id.clone(),
                        run_id: run_id.to_owned(),
                        phase_index: phase_index as u32,
                        agent: agent.to_string(),
                        action: action.kind(),
                        payload: serde_json::to_value(action)?,
                        attempt,
                        epoch: link.epoch(),
                        created_at: Utc::now(),
                    })
                    .await?;
                let sent = link
                    .send(
                        agent,
                        Outgoing {
                            id: command_id,
                            run_id: run_id.to_owned(),
                            deadline,
                            action: action.clone(),
                        },
                    )
                    .await;
                match sent {
                    Ok(mut result) => {
                        // The one place an agent's output is read: typed by the action sent.
                        let output = match result.detail.take() {
                            Some(ResultDetail::Output(o)) => {
                                match ActionOutput::decode(action.kind(), &o) {
                                    Ok(output) => Some(output),
                                    Err(e) => {
                                        result.outcome = Outcome::Failed;
                                        result.message = format!(
                                            "{agent} reported {} but its output cannot be \
                                             read: {e}",
                                            result.outcome
                                        );
                                        None
                                    }
                                }
                            }
                            _ => None,
                        };
                        let recorded = store
                            .record_result(
                                &ResultRecord {
                                    command_id: id.clone(),
                                    agent: agent.to_string(),
                                    epoch: result.epoch,
                                    outcome: result.outcome,
                                    replayed: result.replayed,
                                    detail: result.message.clone(),
                                    output,
                                    received_at: Utc::now(),
                                },
                                link.epoch(),
                            )
                            .await;
                        match recorded {
                            Ok(_) | Err(store::Error::Conflict(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                        if result.outcome == Outcome::Succeeded {
                            ok = true;
                            break 'same_id;
                        }
                        last = format!("{} {}: {}", action.name(), result.outcome, result.message);
                        if matches!(result.outcome, Outcome::StaleEpoch | Outcome::Unsupported) {
                            return Ok(Err(last));
                        }
                    }
                    Err(
                        e @ (LinkError::NotConnected { .. }
                        | LinkError::Disconnected { .. }
                        | LinkError::Backlogged { .. }),
                    ) => {
                        // The command may not have arrived: send the same id again once the agent
                        // is back (it dedupes), for as long as the phase has time.
                        last = e.to_string();
                        if time_left(deadline) > RESEND_PAUSE {
                            tokio::time::sleep(RESEND_PAUSE).await;
                            continue 'same_id;
                        }
                    }
                    Err(e) => last = e.to_string(),
                }
                break 'same_id;
            }
            if ok {
                break;
            }
            if retry < retries {
                let pause = Duration::from_secs(1 << retry.min(4)).min(MAX_RETRY_PAUSE);
                if time_left(deadline) <= pause {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
        }
        if !ok {
            return Ok(Err(last));
        }
    }
    Ok(Ok(()))
}

/// How long until `deadline` (zero once it passed). Comparing what is left, rather than adding
/// to now, cannot overflow whatever the deadline.
fn time_left(deadline: SystemTime) -> Duration {
    deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}
