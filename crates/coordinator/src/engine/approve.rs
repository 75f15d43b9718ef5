//! The two-person rule: operators' approvals and rejections of a run that waits at its approve
//! phase (`rollcall run approve|reject RUN`), and the approve phase's wait for them.
//!
//! A decision is journaled as an event of the run (`run.approved`, `run.rejected`), so it
//! survives a coordinator restart and the drill report lists it; the approve phase reads the
//! decisions back from the journal and asks `planner::approval` where they stand. Nothing is
//! frozen or changed while a run waits: the approve phase comes before the first phase that
//! may change anything (`plan::with_approval`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use serde_json::json;

use super::commands::RunParams;
use super::planner::{self, Approval, Decision};
use super::{Engine, Inner, Starter};
use crate::link::AgentLink;
use crate::plan::{Action, Phase, Plan};
use crate::store::{PhaseState, RunRecord};

/// How often a waiting approve phase reads the journal for new decisions.
const APPROVAL_POLL: Duration = Duration::from_millis(250);
const EVENTS_PAGE: u32 = 1000;

/// A decision the two-person rule refuses: the starter's own approval. The operator API
/// answers it `PermissionDenied`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecisionRefused(String);

impl<L: AgentLink + Clone + 'static> Engine<L> {
    /// Journals `by`'s approval (or rejection, with `reason`) of run `id`; returns the run and
    /// what the decision did. Refused: an unknown or finished run, a run whose plan has no
    /// approve phase or whose approve phase passed already, and the starter's own approval.
    pub async fn decide(
        &self,
        id: &str,
        by: &Starter,
        approve: bool,
        reason: &str,
    ) -> Result<(RunRecord, String)> {
        let store = &self.inner.store;
        let run = store
            .run(id)
            .await?
            .with_context(|| format!("no run {id}; `rollcall runs` lists them"))?;
        if run.state.is_final() {
            bail!(
                "run {id} is already {}; there is nothing to decide",
                run.state
            );
        }
        let env = self.environment(&run.environment)?;
        let plan = Plan::parse(Path::new("journaled plan"), &run.plan, Some(&env.fleet))
            .map_err(|e| anyhow!("the journaled plan of run {id} no longer reads: {e}"))?;
        let Some(phase) = plan.phases.iter().find(|p| p.action == Action::Approve) else {
            bail!(
                "run {id} does not wait for approvals (its environment {} asks for none, or \
                 it is a backup)",
                run.environment
            );
        };
        let passed = store
            .phases(id)
            .await?
            .iter()
            .any(|p| p.index as usize == phase.index && p.state == PhaseState::Passed);
        if passed {
            bail!("run {id} was approved already; its approve phase passed");
        }
        let starter = RunParams::of(&run.params).started_by;
        if approve && starter.as_ref().is_some_and(|s| s.name == by.name) {
            return Err(DecisionRefused(format!(
                "operator {} started run {id} and cannot approve it: the two-person rule needs \
                 another operator (`rollcall run approve {id}` with their certificate or token)",
                by.name
            ))
            .into());
        }
        let decisions = self.inner.decisions(id).await?;
        if decisions
            .iter()
            .any(|d| d.by == by.name && d.approve == approve)
        {
            let what = if approve { "approved" } else { "rejected" };
            return Ok((
                run,
                format!(
                    "operator {} {what} run {id} already; it counts once",
                    by.name
                ),
            ));
        }
        let decision = Decision {
            by: by.name.clone(),
            role: by.role.clone(),
            approve,
            reason: reason.trim().to_owned(),
        };
        let kind = if approve {
            "run.approved"
        } else {
            "run.rejected"
        };
        let mut payload = serde_json::to_value(&decision).context("encode the decision")?;
        payload["via"] = json!(by.via);
        self.inner.event(id, kind, payload).await?;
        let mut all = decisions;
        all.push(decision);
        let need = phase.approvals();
        let message =
            match planner::approval(need, starter.as_ref().map(|s| s.name.as_str()), &all, false) {
                // Blocked already (its wait timed out): the approval stands, the run waits for
                // an operator to go on.
                Approval::Approved { by } if run.state == crate::store::RunState::Blocked => {
                    format!(
                        "run {id} is approved ({}); it blocked when its wait timed out: `rollcall \
                     run retry {id}` continues it",
                        by.join(", ")
                    )
                }
                Approval::Approved { by } => format!(
                    "run {id} is approved ({}); it goes on past its approve phase",
                    by.join(", ")
                ),
                Approval::Waiting { by, need } => format!(
                    "approval recorded: {} of {need}; run {id} waits for more",
                    by.len()
                ),
                Approval::Rejected { by, .. } => format!(
                    "run {id} is rejected (by {by}): it blocks at its approve phase with nothing \
                     frozen or changed; `rollcall run abort {id}` ends it"
                ),
                Approval::TimedOut { .. } => format!("decision on run {id} recorded"),
            };
        let run = store
            .run(id)
            .await?
            .with_context(|| format!("run {id} vanished"))?;
        Ok((run, message))
    }
}

impl<L: AgentLink + Clone + 'static> Inner<L> {
    /// The approvals and rejections journaled for run `id`, oldest first.
    pub(super) async fn decisions(&self, id: &str) -> Result<Vec<Decision>> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.events(id, after, EVENTS_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            after = last.seq;
            for e in &page {
                if matches!(e.kind.as_str(), "run.approved" | "run.rejected") {
                    let d: Decision =
                        serde_json::from_value(e.payload.clone()).with_context(|| {
                            format!("journaled decision {} of run {id} does not read", e.seq)
                        })?;
                    out.push(d);
                }
            }
            if page.len() < EVENTS_PAGE as usize {
                return Ok(out);
            }
        }
    }

    /// The approve phase: waits until enough operators other than the starter approved, an
    /// operator rejected the run, or the phase's timeout (from `started`) passed. Returns
    /// whether it passed and the detail.
    pub(super) async fn await_approval(
        &self,
        run: &RunRecord,
        phase: &Phase,
        started: DateTime<Utc>,
    ) -> Result<(bool, String)> {
        let id = run.id.as_str();
        let starter = RunParams::of(&run.params).started_by.map(|s| s.name);
        let need = phase.approvals();
        let deadline =
            started + chrono::Duration::from_std(phase.timeout).unwrap_or(chrono::Duration::MAX);
        self.event(
            id,
            "approval.waiting",
            json!({
                "approvals": need,
                "started_by": starter,
                "timeout_ms": phase.timeout.as_millis() as u64,
            }),
        )
        .await?;
        tracing::info!(
            run_id = id,
            need,
            "run waits for approval: `rollcall run approve {id}` by another operator"
        );
        loop {
            let decisions = self.decisions(id).await?;
            let timed_out = Utc::now() >= deadline;
            match planner::approval(need, starter.as_deref(), &decisions, timed_out) {
                Approval::Approved { by } => {
                    return Ok((true, format!("approved by {}", by.join(", "))));
                }
                Approval::Rejected { by, reason } => {
                    let why = if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    };
                    return Ok((
                        false,
                        format!(
                            "rejected by {by}{why}; nothing was frozen or changed — a rejection \
                             stands: `rollcall run abort {id}` ends the run"
                        ),
                    ));
                }
                Approval::TimedOut { by, need } => {
                    return Ok((
                        false,
                        format!(
                            "{} of {need} approvals within {}; nothing was frozen or changed — \
                             `rollcall run retry {id}` waits again, or `rollcall run abort {id}`",
                            by.len(),
                            humantime::format_duration(phase.timeout)
                        ),
                    ));
                }
                Approval::Waiting { .. } => tokio::time::sleep(APPROVAL_POLL).await,
            }
        }
    }
}
