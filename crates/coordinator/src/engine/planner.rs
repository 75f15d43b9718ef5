//! The pure half of the run engine: from the plan, the journaled phase states and the observed
//! agents, decide what happens next and whether a gate holds. No I/O, no clock reads: every
//! input is an argument, so every rule is a unit test.

use std::collections::{BTreeMap, BTreeSet};

use crate::plan::{Action, Gate, Phase, Plan, Quorum, Replicas};
use api::model::{ActionKind, ActionOutput, Outcome};

use crate::store::{
    CommandRecord, PhaseRecord, PhaseState, ResultRecord, RunKind, RunRecord, RunState,
};

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Start these phases (their dependencies have passed).
    Start(Vec<usize>),
    /// Phases are in flight; wait for one to end.
    Wait,
    /// Every phase passed (or was optional and failed, or skipped).
    Done,
    /// A required phase failed and nothing is in flight: the run stops for an operator.
    Blocked { phase: usize },
}

/// Decides the next step. `states[i]` is phase i's journaled state (None: never started);
/// `in_flight` are phases being executed right now.
pub fn next(plan: &Plan, states: &[Option<PhaseState>], in_flight: &BTreeSet<usize>) -> Next {
    let finished_ok = |i: usize| match states.get(i).copied().flatten() {
        Some(PhaseState::Passed | PhaseState::Skipped) => true,
        Some(PhaseState::Failed) => !plan.phases[i].required,
        _ => false,
    };
    let blocked = plan.phases.iter().find(|p| {
        matches!(
            states.get(p.index).copied().flatten(),
            Some(PhaseState::Blocked) | Some(PhaseState::Failed) if p.required
        )
    });
    if let Some(p) = blocked {
        return if in_flight.is_empty() {
            Next::Blocked { phase: p.index }
        } else {
            // Let running phases end before the run stops; start nothing new.
            Next::Wait
        };
    }
    if plan.phases.iter().all(|p| finished_ok(p.index)) {
        return Next::Done;
    }
    let start: Vec<usize> = plan
        .phases
        .iter()
        .filter(|p| !in_flight.contains(&p.index) && !finished_ok(p.index))
        .filter(|p| {
            !matches!(
                states.get(p.index).copied().flatten(),
                Some(PhaseState::Failed)
            )
        })
        .filter(|p| p.after.iter().all(|&d| finished_ok(d)))
        .map(|p| p.index)
        .collect();
    if start.is_empty() {
        Next::Wait
    } else {
        Next::Start(start)
    }
}

/// Whether a phase's gate also needs the agents to report ready (roles that were started).
pub fn needs_readiness(phase: &Phase) -> bool {
    match phase.action {
        Action::Restart => true,
        Action::Scale | Action::Smoke => !matches!(phase.replicas, Some(Replicas::Count(0))),
        _ => false,
    }
}

/// One targeted agent as the gate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStanding {
    pub role: String,
    /// Its command succeeded under the current epoch.
    pub succeeded: bool,
    /// Connected and reporting ready now.
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateVerdict {
    pub passed: bool,
    /// e.g. "web 1/1, worker 1/2 (needs 2)".
    pub detail: String,
}

/// Evaluates a gate against the declared fleet: an agent that is declared but never connected
/// has no standing and counts as not passing, so a gate never passes vacuously.
pub fn evaluate(
    phase: &Phase,
    fleet: &BTreeMap<String, u32>,
    agents: &[AgentStanding],
) -> GateVerdict {
    let readiness = needs_readiness(phase);
    let good = |a: &AgentStanding| a.succeeded && (!readiness || a.ready);
    let count_in = |roles: &[&String]| -> (u32, u32) {
        let declared: u32 = roles
            .iter()
            .map(|r| fleet.get(*r).copied().unwrap_or(0))
            .sum();
        let passing = agents
            .iter()
            .filter(|a| roles.iter().any(|r| **r == a.role) && good(a))
            .count() as u32;
        (passing, declared)
    };
    let mut parts = Vec::new();
    let passed = match &phase.gate {
        Gate::None => {
            return GateVerdict {
                passed: true,
                detail: "no gate".into(),
            };
        }
        Gate::Overall(q) => {
            let roles: Vec<&String> = phase.roles.iter().collect();
            let (passing, declared) = count_in(&roles);
            let (ok, part) = judge(&phase.roles.join("+"), *q, passing, declared);
            parts.push(part);
            ok
        }
        Gate::PerRole(per) => {
            let mut all = true;
            for (role, q) in per {
                let (passing, declared) = count_in(&[role]);
                let (ok, part) = judge(role, *q, passing, declared);
                parts.push(part);
                all &= ok;
            }
            all
        }
    };
    let what = if readiness {
        "succeeded and ready"
    } else {
        "succeeded"
    };
    GateVerdict {
        passed,
        detail: format!("{what}: {}", parts.join(", ")),
    }
}

fn judge(label: &str, q: Quorum, passing: u32, declared: u32) -> (bool, String) {
    let required = q.required(declared);
    // Declared zero never passes: nothing proved anything.
    let ok = declared > 0 && required > 0 && passing >= required;
    let need = if required == declared {
        String::new()
    } else {
        format!(" (needs {required})")
    };
    (ok, format!("{label} {passing}/{declared}{need}"))
}

/// Whether some agent of freeze phase `phase_index` (attempt `attempt`) froze writes: a plan
/// names every role that could freeze (web's maintenance mode, the database's read-only
/// roles) and agents with nothing to freeze answer so, but a freeze that froze nothing must
/// not pass. An agent from before freeze outputs reported none: its success froze.
pub(super) fn froze_something(
    journal: &[(CommandRecord, Option<ResultRecord>)],
    phase_index: usize,
    attempt: u32,
) -> bool {
    journal.iter().any(|(command, result)| {
        command.phase_index as usize == phase_index
            && command.attempt == attempt
            && command.action == ActionKind::Freeze
            && match result {
                Some(ResultRecord {
                    outcome: Outcome::Succeeded,
                    output,
                    ..
                }) => match output {
                    None => true,
                    Some(ActionOutput::Freeze(out)) => out.frozen,
                    Some(_) => false,
                },
                _ => false,
            }
    })
}

/// What a freeze that froze nothing says.
pub(super) const NOTHING_FROZE: &str = "no agent froze writes: give the web agents a freeze \
    adapter (control.freeze) or the database agent the application's roles ([postgres.freeze]); \
    see the README, \"Freezing writes\"";

/// Whether an unfinished run `other` of the same environment keeps a new run of `kind` from
/// starting. A drill or recovery changes the fleet, so it runs alone: nothing else may be
/// unfinished, blocked runs included (a blocked drill leaves the fleet frozen mid-restore; a
/// blocked backup could be resumed in the middle of the restore). A backup may not start during
/// a drill or recovery either (its point would pair data from either side of the restore), nor
/// next to a running backup; a blocked backup does not stop the next one (the schedule keeps
/// the RPO while an operator looks at the blocked one).
pub(super) fn conflicts(kind: RunKind, other: &RunRecord) -> bool {
    kind != RunKind::Backup || other.kind != RunKind::Backup || other.state != RunState::Blocked
}

/// What a blocked run's reason says about traffic: frozen only once a freeze phase passed (and
/// no unfreeze since); a plan without a freeze (a backup) says nothing.
pub(super) fn freeze_note(plan: &Plan, journal: &[PhaseRecord]) -> &'static str {
    let states = |action: Action| -> Vec<PhaseState> {
        journal
            .iter()
            .filter(|p| {
                plan.phases
                    .get(p.index as usize)
                    .is_some_and(|ph| ph.action == action)
            })
            .map(|p| p.state)
            .collect()
    };
    if !plan.phases.iter().any(|ph| ph.action == Action::Freeze) {
        return "";
    }
    let (freeze, unfreeze) = (states(Action::Freeze), states(Action::Unfreeze));
    if unfreeze.contains(&PhaseState::Passed) {
        ""
    } else if freeze.contains(&PhaseState::Passed) {
        "; traffic stays frozen"
    } else if freeze.iter().any(|s| *s != PhaseState::Pending) {
        "; the freeze did not complete: traffic may be partly frozen"
    } else {
        "; traffic was not frozen"
    }
}

/// What a blocked run's reason says it changed in the live stores, read from its commands and
/// their results over every attempt: whether the live database was swapped for the point's and
/// whether objects were written. A swap that failed reopened the live database under its own
/// name, so only a success (or a command with no answer) may have changed it. Empty for a plan
/// that restores nothing (a backup); the flag says whether anything may have changed (what
/// `undo` would put back).
pub(super) fn changes_note(
    plan: &Plan,
    commands: &[(CommandRecord, Option<ResultRecord>)],
) -> (String, bool) {
    // The outcomes of the commands of these actions (None: sent, no answer yet).
    let outcomes = |kinds: &[ActionKind]| -> Vec<Option<Outcome>> {
        commands
            .iter()
            .filter(|(c, _)| kinds.contains(&c.action))
            .map(|(_, r)| r.as_ref().map(|r| r.outcome))
            .collect()
    };
    let restores = |action: Action| plan.phases.iter().any(|p| p.action == action);
    let mut parts = Vec::new();
    let mut changed = false;
    if restores(Action::RestorePostgres) || restores(Action::CommitPostgres) {
        let swaps = outcomes(&[ActionKind::RestorePostgres, ActionKind::CommitPostgres]);
        parts.push(if swaps.contains(&Some(Outcome::Succeeded)) {
            changed = true;
            "the live database was swapped for the point's (the one it replaced is kept)"
        } else if swaps
            .iter()
            .any(|o| matches!(o, None | Some(Outcome::TimedOut)))
        {
            changed = true;
            "the live database may have been swapped (a swap has no answer: see `rollcall run \
             show`)"
        } else {
            // Never sent, or failed: a failed swap puts the live database back.
            "the live database was not swapped"
        });
    }
    if restores(Action::RestoreObjects) {
        let writes = outcomes(&[ActionKind::RestoreObjects]);
        parts.push(if writes.contains(&Some(Outcome::Succeeded)) {
            changed = true;
            "objects were written (what they replaced is in quarantine)"
        } else if writes
            .iter()
            .any(|o| matches!(o, None | Some(Outcome::Failed | Outcome::TimedOut)))
        {
            changed = true;
            "objects may have been partly written (what they replaced is in quarantine)"
        } else {
            "no object was written"
        });
    }
    if parts.is_empty() {
        return (String::new(), false);
    }
    (format!("; {}", parts.join(" and ")), changed)
}

/// Whether a command of the phase's current attempt got an answer other than success (failed,
/// timed out on the agent, unsupported): then `resume` would replay that answer, and only a new
/// attempt (`retry`) runs it again.
pub(super) fn a_command_failed(
    commands: &[(CommandRecord, Option<ResultRecord>)],
    phase: usize,
    attempt: Option<u32>,
) -> bool {
    commands.iter().any(|(c, r)| {
        c.phase_index as usize == phase
            && Some(c.attempt) == attempt
            && r.as_ref().is_some_and(|r| r.outcome != Outcome::Succeeded)
    })
}

/// What a blocked run's reason tells the operator to do: `retry` when a command failed or timed
/// out (an agent keeps a command's result, so `resume` would replay it), `resume` when agents
/// were missing or not ready; `undo` when the run may have changed the live stores; `abort`.
pub(super) fn next_steps(id: &str, command_failed: bool, changed: bool) -> String {
    let first = if command_failed {
        format!(
            "fix the cause, then `rollcall run retry {id}` (the failed phase runs again as a new \
             attempt; `resume` would replay its results)"
        )
    } else {
        format!(
            "fix the cause, then `rollcall run resume {id}` (re-sends to the agents that were \
             missing or not ready; `retry` runs the phase again as a new attempt)"
        )
    };
    let undo = if changed {
        format!(", `rollcall run undo {id}` (puts back what the run changed)")
    } else {
        String::new()
    };
    format!("{first}{undo}, or `rollcall run abort {id}` (ends the run as it stands)")
}

/// One operator's decision about a run that waits for approval, as journaled (`run.approved`,
/// `run.rejected`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// The operator's name (a certificate's, or a token's configured name).
    pub by: String,
    pub role: String,
    pub approve: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Where a run's approvals stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// Enough operators other than the starter approved (each once, in journal order).
    Approved { by: Vec<String> },
    /// An operator rejected the run: it does not go on, whatever others approved.
    Rejected { by: String, reason: String },
    /// Not enough approvals yet.
    Waiting { by: Vec<String>, need: u32 },
    /// Not enough approvals before the approve phase's timeout.
    TimedOut { by: Vec<String>, need: u32 },
}

/// The two-person rule: `need` approvals from operators other than `starter`, each operator
/// counted once; a rejection stands; past the timeout, waiting ends blocked.
pub fn approval(
    need: u32,
    starter: Option<&str>,
    decisions: &[Decision],
    timed_out: bool,
) -> Approval {
    if let Some(r) = decisions.iter().find(|d| !d.approve) {
        return Approval::Rejected {
            by: r.by.clone(),
            reason: r.reason.clone(),
        };
    }
    let mut by: Vec<String> = Vec::new();
    for d in decisions {
        if Some(d.by.as_str()) != starter && !by.contains(&d.by) {
            by.push(d.by.clone());
        }
    }
    if by.len() as u64 >= u64::from(need) {
        Approval::Approved { by }
    } else if timed_out {
        Approval::TimedOut { by, need }
    } else {
        Approval::Waiting { by, need }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::plan::tests::fleet;
    use chrono::Utc;

    fn plan() -> Plan {
        Plan::default_plan(Some(&fleet())).unwrap()
    }

    fn states(
        plan: &Plan,
        passed: &[&str],
        other: &[(&str, PhaseState)],
    ) -> Vec<Option<PhaseState>> {
        plan.phases
            .iter()
            .map(|p| {
                if passed.contains(&p.name.as_str()) {
                    Some(PhaseState::Passed)
                } else {
                    other.iter().find(|(n, _)| *n == p.name).map(|(_, s)| *s)
                }
            })
            .collect()
    }

    fn idx(plan: &Plan, name: &str) -> usize {
        plan.phase(name).unwrap().index
    }

    #[test]
    fn phases_start_in_dependency_order_and_restores_together() {
        let plan = plan();
        let none = BTreeSet::new();
        assert_eq!(
            next(&plan, &states(&plan, &[], &[]), &none),
            Next::Start(vec![0])
        );
        let s = states(&plan, &["preflight"], &[]);
        assert_eq!(
            next(&plan, &s, &none),
            Next::Start(vec![idx(&plan, "prepare-postgres")]),
            "Postgres is prepared before anything is frozen"
        );
        let s = states(
            &plan,
            &[
                "preflight",
                "prepare-postgres",
                "freeze-writes",
                "scale-to-zero",
            ],
            &[],
        );
        assert_eq!(
            next(&plan, &s, &none),
            Next::Start(vec![
                idx(&plan, "commit-postgres"),
                idx(&plan, "restore-objects")
            ])
        );
        // One restore done, the other in flight: wait, start-web needs both.
        let s = states(
            &plan,
            &[
                "preflight",
                "prepare-postgres",
                "freeze-writes",
                "scale-to-zero",
                "commit-postgres",
            ],
            &[],
        );
        let flying = BTreeSet::from([idx(&plan, "restore-objects")]);
        assert_eq!(next(&plan, &s, &flying), Next::Wait);
        let names: Vec<&str> = plan.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(next(&plan, &states(&plan, &names, &[]), &none), Next::Done);
    }

    #[test]
    fn a_failed_required_phase_blocks_once_nothing_is_in_flight() {
        let plan = plan();
        let s = states(
            &plan,
            &[
                "preflight",
                "prepare-postgres",
                "freeze-writes",
                "scale-to-zero",
            ],
            &[("commit-postgres", PhaseState::Blocked)],
        );
        let flying = BTreeSet::from([idx(&plan, "restore-objects")]);
        assert_eq!(
            next(&plan, &s, &flying),
            Next::Wait,
            "the other restore finishes first"
        );
        assert_eq!(
            next(&plan, &s, &BTreeSet::new()),
            Next::Blocked {
                phase: idx(&plan, "commit-postgres")
            }
        );
    }

    #[test]
    fn a_running_phase_after_a_restart_is_started_again() {
        let plan = plan();
        // Journaled as running, but nothing is in flight in this (new) coordinator.
        let s = states(
            &plan,
            &["preflight", "prepare-postgres"],
            &[("freeze-writes", PhaseState::Running)],
        );
        assert_eq!(
            next(&plan, &s, &BTreeSet::new()),
            Next::Start(vec![idx(&plan, "freeze-writes")])
        );
    }

    fn standing(role: &str, succeeded: bool, ready: bool) -> AgentStanding {
        AgentStanding {
            role: role.into(),
            succeeded,
            ready,
        }
    }

    #[test]
    fn gates_count_against_the_declared_fleet() {
        let plan = plan();
        let scale_down = plan.phase("scale-to-zero").unwrap();
        // Every role answered but the second worker, which never connected.
        let agents = [
            standing("web", true, false),
            standing("worker", true, false),
            standing("scheduler", true, false),
            standing("gateway", true, false),
        ];
        let v = evaluate(scale_down, &fleet(), &agents);
        assert!(!v.passed);
        assert_eq!(v.detail, "succeeded: gateway+scheduler+web+worker 4/5");

        let worker_smoke = plan.phase("worker-smoke").unwrap();
        let v = evaluate(worker_smoke, &fleet(), &[standing("worker", true, false)]);
        assert!(!v.passed, "a started role must also be ready");
        assert_eq!(v.detail, "succeeded and ready: worker 0/2 (needs 1)");
        let v = evaluate(worker_smoke, &fleet(), &[standing("worker", true, true)]);
        assert!(v.passed, "{}", v.detail);

        let replicas = plan.phase("restore-replicas").unwrap();
        let mut all: Vec<AgentStanding> = [
            "web",
            "worker",
            "worker",
            "scheduler",
            "gateway",
            "database",
            "objects",
        ]
        .iter()
        .map(|r| standing(r, true, true))
        .collect();
        assert!(evaluate(replicas, &fleet(), &all).passed);
        all.retain(|a| a.role != "gateway");
        let v = evaluate(replicas, &fleet(), &all);
        assert!(!v.passed);
        assert!(v.detail.contains("gateway 0/1"), "{}", v.detail);
    }

    #[test]
    fn a_blocked_reason_says_frozen_only_after_the_freeze() {
        let plan = Plan::default_plan(None).unwrap();
        let index = |action| plan.phases.iter().position(|p| p.action == action).unwrap() as u32;
        let phase = |index, state| PhaseRecord {
            run_id: "r".into(),
            index,
            name: String::new(),
            state,
            attempt: 1,
            started_at: None,
            finished_at: None,
            detail: None,
        };
        let (freeze, unfreeze) = (index(Action::Freeze), index(Action::Unfreeze));
        let preflight_blocked = [phase(0, PhaseState::Blocked)];
        assert_eq!(
            freeze_note(&plan, &preflight_blocked),
            "; traffic was not frozen"
        );
        let freeze_blocked = [
            phase(0, PhaseState::Passed),
            phase(freeze, PhaseState::Blocked),
        ];
        assert!(freeze_note(&plan, &freeze_blocked).contains("partly frozen"));
        let later = [
            phase(0, PhaseState::Passed),
            phase(freeze, PhaseState::Passed),
            phase(freeze + 1, PhaseState::Blocked),
        ];
        assert_eq!(freeze_note(&plan, &later), "; traffic stays frozen");
        let unfrozen = [
            phase(freeze, PhaseState::Passed),
            phase(unfreeze, PhaseState::Passed),
        ];
        assert_eq!(freeze_note(&plan, &unfrozen), "");
        let backup = Plan::backup_plan(&crate::plan::tests::fleet()).unwrap();
        assert_eq!(freeze_note(&backup, &preflight_blocked), "");
    }

    fn sent(action: ActionKind, outcome: Option<Outcome>) -> (CommandRecord, Option<ResultRecord>) {
        let epoch = api::model::Epoch::new(1).unwrap();
        let command = CommandRecord {
            command_id: format!("r/{}", action.as_str()),
            run_id: "r".into(),
            phase_index: 0,
            agent: "a".into(),
            action,
            payload: serde_json::json!({}),
            attempt: 1,
            epoch,
            created_at: Utc::now(),
        };
        let result = outcome.map(|outcome| ResultRecord {
            command_id: command.command_id.clone(),
            agent: "a".into(),
            epoch,
            outcome,
            replayed: false,
            detail: String::new(),
            output: None,
            received_at: Utc::now(),
        });
        (command, result)
    }

    #[test]
    fn a_freeze_passes_only_when_some_agent_froze() {
        use api::model::output::FreezeOutput;
        let answered = |frozen: Option<bool>| {
            let (command, result) = sent(ActionKind::Freeze, Some(Outcome::Succeeded));
            let result = result.map(|r| ResultRecord {
                output: frozen.map(|frozen| {
                    ActionOutput::Freeze(FreezeOutput {
                        by: if frozen {
                            "database".into()
                        } else {
                            String::new()
                        },
                        frozen,
                        detail: String::new(),
                    })
                }),
                ..r
            });
            (command, result)
        };
        // web with nothing to freeze, the database froze its roles.
        assert!(froze_something(
            &[answered(Some(false)), answered(Some(true))],
            0,
            1
        ));
        // Nobody froze anything: the freeze must not pass.
        assert!(!froze_something(&[answered(Some(false))], 0, 1));
        assert!(!froze_something(&[], 0, 1));
        // A failed or unanswered freeze froze nothing; another attempt or phase is not this one.
        assert!(!froze_something(
            &[
                sent(ActionKind::Freeze, Some(Outcome::Failed)),
                sent(ActionKind::Freeze, None)
            ],
            0,
            1
        ));
        assert!(!froze_something(&[answered(Some(true))], 0, 2));
        assert!(!froze_something(&[answered(Some(true))], 3, 1));
        // An agent from before freeze outputs: its success froze.
        assert!(froze_something(&[answered(None)], 0, 1));
    }

    #[test]
    fn a_blocked_reason_names_what_the_run_changed_in_the_live_stores() {
        use ActionKind::{CommitPostgres, Preflight, PreparePostgres, RestoreObjects};
        let plan = plan();
        let note =
            |commands: &[(CommandRecord, Option<ResultRecord>)]| changes_note(&plan, commands);
        let untouched = (
            "; the live database was not swapped and no object was written".to_owned(),
            false,
        );
        assert_eq!(note(&[]), untouched);
        assert_eq!(
            note(&[
                sent(Preflight, Some(Outcome::Succeeded)),
                sent(PreparePostgres, Some(Outcome::Succeeded)),
                // A failed swap put the live database back.
                sent(CommitPostgres, Some(Outcome::Failed)),
            ]),
            untouched
        );
        let (text, changed) = note(&[sent(CommitPostgres, None)]);
        assert!(changed && text.contains("may have been swapped"), "{text}");
        let (text, changed) = note(&[sent(CommitPostgres, Some(Outcome::TimedOut))]);
        assert!(changed && text.contains("may have been swapped"), "{text}");
        // A later attempt's failure does not hide an earlier attempt's swap.
        let (text, changed) = note(&[
            sent(CommitPostgres, Some(Outcome::Succeeded)),
            sent(CommitPostgres, Some(Outcome::Failed)),
            sent(RestoreObjects, Some(Outcome::Failed)),
        ]);
        assert!(
            changed
                && text.contains("the live database was swapped for the point's")
                && text.contains("objects may have been partly written"),
            "{text}"
        );
        let (text, _) = note(&[sent(RestoreObjects, Some(Outcome::Succeeded))]);
        assert!(text.ends_with("and objects were written (what they replaced is in quarantine)"));
        // A backup restores nothing: nothing to say.
        let backup = Plan::backup_plan(&crate::plan::tests::fleet()).unwrap();
        assert_eq!(changes_note(&backup, &[]), (String::new(), false));
    }

    #[test]
    fn a_timed_out_command_asks_for_a_new_attempt() {
        let mut timed_out = sent(ActionKind::Verify, Some(Outcome::TimedOut));
        timed_out.0.phase_index = 3;
        let commands = [sent(ActionKind::Preflight, None), timed_out];
        assert!(a_command_failed(&commands, 3, Some(1)));
        assert!(!a_command_failed(&commands, 3, Some(2)), "another attempt");
        assert!(!a_command_failed(&commands, 0, Some(1)), "no answer yet");
    }

    #[test]
    fn next_steps_name_retry_for_failed_commands_and_undo_only_when_something_changed() {
        let failed = next_steps("r-1", true, false);
        assert!(
            failed.starts_with("fix the cause, then `rollcall run retry r-1`")
                && !failed.contains("undo")
                && failed.ends_with("or `rollcall run abort r-1` (ends the run as it stands)"),
            "{failed}"
        );
        let missing = next_steps("r-1", false, true);
        assert!(
            missing.starts_with("fix the cause, then `rollcall run resume r-1`")
                && missing.contains("`rollcall run undo r-1` (puts back what the run changed)"),
            "{missing}"
        );
    }

    #[test]
    fn a_drill_runs_alone_and_a_backup_only_passes_blocked_backups() {
        use RunKind::{Backup, Drill, Recovery};
        use RunState::{Blocked, Pending, Running};
        let run = |kind, state| RunRecord {
            id: "r".into(),
            kind,
            environment: "prod".into(),
            point_id: None,
            plan: String::new(),
            params: serde_json::Value::Null,
            state,
            reason: None,
            epoch: api::model::Epoch::new(1).unwrap(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            finished_at: None,
            seq: 1,
        };
        for other in [Drill, Recovery, Backup] {
            for state in [Pending, Running, Blocked] {
                for new in [Drill, Recovery] {
                    assert!(
                        conflicts(new, &run(other, state)),
                        "{new} next to {other} {state}"
                    );
                }
                let backup_may_start = other == Backup && state == Blocked;
                assert_eq!(
                    conflicts(Backup, &run(other, state)),
                    !backup_may_start,
                    "backup next to {other} {state}"
                );
            }
        }
    }

    fn decision(by: &str, approve: bool) -> Decision {
        Decision {
            by: by.into(),
            role: "admin".into(),
            approve,
            reason: if approve {
                String::new()
            } else {
                "not tonight".into()
            },
        }
    }

    #[test]
    fn approvals_come_from_others_each_once_and_a_rejection_stands() {
        let waiting = |by: &[&str]| Approval::Waiting {
            by: by.iter().map(|s| s.to_string()).collect(),
            need: 1,
        };
        // Nobody yet: waiting, and past the timeout blocked.
        assert_eq!(approval(1, Some("alice"), &[], false), waiting(&[]));
        assert_eq!(
            approval(1, Some("alice"), &[], true),
            Approval::TimedOut {
                by: vec![],
                need: 1
            }
        );
        // The starter's own approval never counts (the engine refuses it before it is
        // journaled; this holds even for a journal that has one).
        assert_eq!(
            approval(1, Some("alice"), &[decision("alice", true)], false),
            waiting(&[])
        );
        // A second operator's approval lets it run.
        assert_eq!(
            approval(1, Some("alice"), &[decision("bob", true)], false),
            Approval::Approved {
                by: vec!["bob".into()]
            }
        );
        // The same operator twice counts once.
        let twice = [decision("bob", true), decision("bob", true)];
        assert_eq!(
            approval(2, Some("alice"), &twice, false),
            Approval::Waiting {
                by: vec!["bob".into()],
                need: 2
            }
        );
        let two = [decision("bob", true), decision("carol", true)];
        assert_eq!(
            approval(2, Some("alice"), &two, true),
            Approval::Approved {
                by: vec!["bob".into(), "carol".into()]
            }
        );
        // A rejection blocks it, even next to enough approvals.
        let rejected = [decision("bob", true), decision("carol", false)];
        assert_eq!(
            approval(1, Some("alice"), &rejected, false),
            Approval::Rejected {
                by: "carol".into(),
                reason: "not tonight".into()
            }
        );
    }
}
