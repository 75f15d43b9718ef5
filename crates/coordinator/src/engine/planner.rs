//! The pure half of the run engine: from the plan, the journaled phase states and the observed
//! agents, decide what happens next and whether a gate holds. No I/O, no clock reads: every
//! input is an argument, so every rule is a unit test.

use std::collections::{BTreeMap, BTreeSet};

use crate::plan::{Action, Gate, Phase, Plan, Quorum, Replicas};
use crate::store::{PhaseRecord, PhaseState, RunKind, RunRecord, RunState};

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
}
