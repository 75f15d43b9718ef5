//! The pure half of building commands: what each phase sends its agents, which shard of an
//! object restore each objects agent takes, and the ids of runs and commands. No I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use api::model::{Action as AgentAction, CommandId, Invalid, ScaleTarget};
use chrono::{DateTime, Utc};

use crate::plan::{Action, Phase, Replicas};
use crate::store::RunKind;

/// What a run's commands need besides the phase: where its points live and which point.
#[derive(Debug, Clone)]
pub(super) struct RunContext {
    pub run_id: String,
    pub repository: api::model::RepositoryRef,
    pub point: Option<String>,
    /// A run to a time (`--to-time`): the restore actions carry it and no point.
    pub to_time: Option<DateTime<Utc>>,
    /// For `check-references`: the keys the database verifications returned.
    pub references: Vec<api::model::ObjectReferences>,
    /// For undo runs: the run they take back.
    pub undo: Option<UndoOf>,
    /// For restore tests: whose point, and the teardown setting.
    pub restore_test: Option<RestoreTestOf>,
}

/// The run an undo run takes back, as its journaled params hold it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UndoOf {
    pub run: String,
    /// Roles return to their counts from before that run scaled them (it never brought them
    /// back: blocked or aborted), instead of their counts when the undo started.
    pub prior_of_undone: bool,
}

/// A run's journaled params (`NewRun::params`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunParams {
    #[serde(default)]
    pub plan: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undoes: Option<UndoOf>,
    /// Data left out of the restore on purpose (the environment's list and the operator's),
    /// for the drill report; its shape is the report's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<crate::report::Exclusion>,
    /// Who started the run (none for scheduled backups and runs journaled before roles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<Starter>,
    /// A restore test (the environment's `restore_from`, as it was when the run started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_test: Option<RestoreTestOf>,
}

/// What a restore test's run journals of its environment's `restore_from`: whose point it
/// restores, and its teardown setting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreTestOf {
    pub source: String,
    /// `always`, `on-success` or `never`.
    pub teardown: String,
}

impl RestoreTestOf {
    /// The restore test a journaled run's params describe; None for other runs.
    pub fn of_params(params: &serde_json::Value) -> Option<RestoreTestOf> {
        RunParams::of(params).restore_test
    }
}

/// The operator who started a run, as the operator API authenticated them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Starter {
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// `certificate` or `token`.
    pub via: String,
}

impl Starter {
    pub fn of(operator: &crate::grpc::Operator) -> Starter {
        Starter {
            name: operator.name.clone(),
            role: operator.role.as_str().to_owned(),
            via: operator.via.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for Starter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, by {})", self.name, self.role, self.via)
    }
}

impl RunParams {
    /// The params of a journaled run; a run journaled before params were typed reads as none.
    pub fn of(value: &serde_json::Value) -> RunParams {
        serde_json::from_value(value.clone()).unwrap_or_default()
    }
}

pub(super) fn needs_point(action: Action) -> bool {
    matches!(
        action,
        Action::Preflight
            | Action::RestorePostgres
            | Action::PreparePostgres
            | Action::CommitPostgres
            | Action::RestoreObjects
            | Action::Verify
    )
}

/// The agent commands a phase sends to each targeted agent, in order.
pub(super) fn agent_actions(
    phase: &Phase,
    ctx: &RunContext,
) -> std::result::Result<Vec<AgentAction>, String> {
    let target = |r: Replicas| match (r, &ctx.undo) {
        (Replicas::Count(n), _) => ScaleTarget::Replicas(n),
        (Replicas::Prior, Some(undo)) if undo.prior_of_undone => {
            ScaleTarget::PriorOf(undo.run.clone())
        }
        (Replicas::Prior, _) => ScaleTarget::Prior,
    };
    let undone = || {
        ctx.undo.as_ref().map(|u| u.run.clone()).ok_or_else(|| {
            format!(
                "{} in run {} takes back another run's restore, so it runs only in an undo run                  (`rollcall run undo RUN`)",
                phase.action, ctx.run_id
            )
        })
    };
    let repository = ctx.repository.clone();
    let to_time = ctx.to_time;
    let point = || {
        ctx.point.clone().ok_or_else(|| {
            format!(
                "{} in run {} needs a recovery point; start the run with --point",
                phase.action, ctx.run_id
            )
        })
    };
    // A run to a time restores no point: its restore actions carry the time instead.
    let restored = || match to_time {
        Some(_) => Ok(String::new()),
        None => point(),
    };
    Ok(match phase.action {
        Action::Freeze => vec![AgentAction::Freeze],
        Action::Unfreeze => vec![AgentAction::Unfreeze],
        Action::Restart => vec![AgentAction::Restart],
        Action::Scale => match phase.replicas {
            Some(r) => vec![AgentAction::Scale(target(r))],
            None => return Err("scale phase without replicas (plan check refuses this)".into()),
        },
        Action::Report | Action::WritePoint | Action::Approve => Vec::new(),
        Action::BackupPostgres => vec![AgentAction::BackupPostgres {
            repository,
            point: point()?,
        }],
        Action::SnapshotObjects => vec![AgentAction::SnapshotObjects {
            repository,
            point: point()?,
        }],
        Action::BaseBackup => vec![AgentAction::BaseBackup { repository }],
        Action::Preflight => vec![AgentAction::Preflight {
            repository,
            point: restored()?,
            to_time,
        }],
        Action::RestorePostgres => vec![AgentAction::RestorePostgres {
            repository,
            point: point()?,
        }],
        Action::PreparePostgres => vec![AgentAction::PreparePostgres {
            repository,
            point: restored()?,
            to_time,
        }],
        Action::CommitPostgres => vec![AgentAction::CommitPostgres {
            repository,
            point: restored()?,
            to_time,
        }],
        Action::UndoPostgres => vec![AgentAction::UndoPostgres {
            undone_run: undone()?,
        }],
        Action::UndoObjects => vec![AgentAction::UndoObjects {
            repository,
            undone_run: undone()?,
            shard: 0,
            shards: 1,
        }],
        Action::TeardownPostgres => vec![AgentAction::TeardownPostgres],
        Action::TeardownObjects => vec![AgentAction::TeardownObjects {
            repository,
            shard: 0,
            shards: 1,
        }],
        Action::RestoreObjects => vec![AgentAction::RestoreObjects {
            repository,
            point: restored()?,
            shard: 0,
            shards: 1,
            to_time,
        }],
        Action::Verify => vec![AgentAction::Verify {
            repository,
            point: restored()?,
            to_time,
        }],
        Action::CheckReferences => vec![AgentAction::CheckObjects(ctx.references.clone())],
        // Start the replicas the smoke needs (workers never before objects are restored: plan
        // check orders that), then run the agent's smoke command.
        Action::Smoke => {
            // After an undo the data is no longer the point's: the smoke is told no point.
            let smoke = AgentAction::Smoke {
                point: ctx.point.clone().filter(|_| ctx.undo.is_none()),
            };
            match phase.replicas {
                Some(r) => vec![AgentAction::Scale(target(r)), smoke],
                None => vec![smoke],
            }
        }
    })
}

/// Shards for the objects agents of a restore: agents the journal already gave a shard keep
/// it; the others take the free shards in name order. The number of shards is the declared
/// count (at least the agents present, at least one), or the journal's when it has one.
pub(super) fn assign_shards(
    journaled: &BTreeMap<String, (u32, u32)>,
    agents: &[String],
    declared: u32,
) -> BTreeMap<String, (u32, u32)> {
    let count = journaled
        .values()
        .map(|&(_, n)| n)
        .max()
        .unwrap_or_else(|| declared.max(agents.len() as u32).max(1));
    let mut out: BTreeMap<String, (u32, u32)> = journaled.clone();
    let taken: BTreeSet<u32> = out.values().map(|&(s, _)| s).collect();
    let mut free = (0..count).filter(|s| !taken.contains(s));
    let mut fresh: Vec<&String> = agents.iter().filter(|a| !out.contains_key(*a)).collect();
    fresh.sort();
    for agent in fresh {
        // More agents than shards: the extra ones repeat shard 0 (idempotent, harmless).
        let shard = free.next().unwrap_or(0);
        out.insert(agent.clone(), (shard, count));
    }
    out
}

/// A run's id: `<kind>-<environment>-<UTC start, to the second>-<4 hex digits>`, so ids sort
/// by start within an environment and two runs started in one second still differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunId(String);

impl RunId {
    pub fn new(kind: RunKind, environment: &str, at: DateTime<Utc>, salt: u16) -> RunId {
        RunId(format!(
            "{kind}-{environment}-{}-{salt:04x}",
            at.format("%Y%m%dT%H%M%S")
        ))
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one command sits in its run. Its id, `<run>/<phase>/<agent>/a<attempt>/s<step>/r<retry>`,
/// is deterministic: a resumed run re-sends the same ids and agents answer from their records;
/// `retry` starts a new attempt, so new ids. Phase and agent names hold no `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandKey {
    pub run: String,
    pub phase: String,
    pub agent: String,
    pub attempt: u32,
    /// The command's place among the phase's commands to this agent.
    pub step: usize,
    /// Which try of the same step (a failed command is sent again as a new id).
    pub retry: u32,
}

impl CommandKey {
    pub fn id(&self) -> Result<CommandId, Invalid> {
        CommandId::parse(&self.to_string())
    }

    /// The key of a command id of `run`; None for an id of another run or another shape.
    pub fn parse(run: &str, id: &str) -> Option<CommandKey> {
        let rest = id.strip_prefix(run)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [phase, agent, attempt, step, retry] = parts[..] else {
            return None;
        };
        fn number<T: std::str::FromStr>(part: &str, tag: char) -> Option<T> {
            part.strip_prefix(tag)?.parse().ok()
        }
        Some(CommandKey {
            run: run.to_owned(),
            phase: phase.to_owned(),
            agent: agent.to_owned(),
            attempt: number(attempt, 'a')?,
            step: number(step, 's')?,
            retry: number(retry, 'r')?,
        })
        .filter(|k| !k.phase.is_empty() && !k.agent.is_empty())
    }
}

impl fmt::Display for CommandKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/a{}/s{}/r{}",
            self.run, self.phase, self.agent, self.attempt, self.step, self.retry
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn objects_agents_get_one_shard_each_and_keep_the_journaled_one() {
        let none = BTreeMap::new();
        let fresh = assign_shards(&none, &names(&["obj-2", "obj-1"]), 2);
        assert_eq!(fresh["obj-1"], (0, 2));
        assert_eq!(fresh["obj-2"], (1, 2));
        // One agent alone still restores one shard of the declared two (the gate then waits
        // for the other), and a single agent without a declaration restores everything.
        assert_eq!(assign_shards(&none, &names(&["obj-2"]), 2)["obj-2"], (0, 2));
        assert_eq!(assign_shards(&none, &names(&["obj-1"]), 0)["obj-1"], (0, 1));
        // After a coordinator restart obj-2 re-attached first: it keeps its journaled shard
        // and obj-1 takes the one left.
        let journaled = BTreeMap::from([("obj-2".to_owned(), (0, 2))]);
        let again = assign_shards(&journaled, &names(&["obj-1", "obj-2"]), 2);
        assert_eq!(again["obj-2"], (0, 2));
        assert_eq!(again["obj-1"], (1, 2));
    }

    #[test]
    fn command_ids_say_where_the_command_sits_and_read_back() {
        let key = CommandKey {
            run: "r-20261126-abc".into(),
            phase: "restore-objects".into(),
            agent: "obj-1".into(),
            attempt: 1,
            step: 0,
            retry: 2,
        };
        let id = "r-20261126-abc/restore-objects/obj-1/a1/s0/r2";
        assert_eq!(key.to_string(), id);
        assert_eq!(key.id().unwrap().as_str(), id);
        assert_eq!(CommandKey::parse("r-20261126-abc", id), Some(key));
        // Another run's id, a run id that is only a prefix, and ids of other shapes.
        assert_eq!(CommandKey::parse("r-other", id), None);
        assert_eq!(CommandKey::parse("r-20261126", id), None);
        for other in [
            "r-20261126-abc/",
            "r-20261126-abc/restore-objects/obj-1",
            "r-20261126-abc//obj-1/a1/s0/r0",
            "r-20261126-abc/restore-objects/obj-1/a1/s0/rx",
            "r-20261126-abc/restore-objects/obj-1/a1/s0/r0/extra",
        ] {
            assert_eq!(CommandKey::parse("r-20261126-abc", other), None, "{other}");
        }
    }

    #[test]
    fn run_ids_name_kind_environment_and_start() {
        let at = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 26, 10, 20, 30).unwrap();
        assert_eq!(
            RunId::new(RunKind::Drill, "private-beta", at, 0x3f).to_string(),
            "drill-private-beta-20261126T102030-003f"
        );
    }

    #[test]
    fn each_phase_sends_its_actions() {
        let plan = crate::plan::Plan::default_plan(None).unwrap();
        let ctx = RunContext {
            run_id: "r".into(),
            repository: api::model::RepositoryRef::default(),
            point: Some("20261125T073000Z-prod-3f2a9c01".into()),
            to_time: None,
            references: vec![],
            undo: None,
            restore_test: None,
        };
        let sent = |action: Action| -> Vec<&'static str> {
            let phase = plan.phases.iter().find(|p| p.action == action).unwrap();
            agent_actions(phase, &ctx)
                .unwrap()
                .iter()
                .map(AgentAction::name)
                .collect()
        };
        let cases: [(Action, &[&str]); 10] = [
            (Action::Preflight, &["preflight"]),
            (Action::PreparePostgres, &["prepare-postgres"]),
            (Action::Freeze, &["freeze"]),
            (Action::Scale, &["scale"]),
            (Action::CommitPostgres, &["commit-postgres"]),
            (Action::RestoreObjects, &["restore-objects"]),
            (Action::Verify, &["verify"]),
            (Action::CheckReferences, &["check-objects"]),
            // A smoke starts the replicas it needs first.
            (Action::Smoke, &["scale", "smoke"]),
            (Action::Report, &[]),
        ];
        for (action, expected) in cases {
            assert_eq!(sent(action), expected, "{action}");
        }
        // A phase that restores needs the run's point.
        let restore = plan
            .phases
            .iter()
            .find(|p| p.action == Action::CommitPostgres)
            .unwrap();
        let without = RunContext {
            point: None,
            ..ctx.clone()
        };
        let err = agent_actions(restore, &without).unwrap_err();
        assert!(err.contains("needs a recovery point"), "{err}");
    }

    #[test]
    fn undo_phases_name_the_run_they_take_back() {
        let plan = crate::plan::Plan::undo_plan(&crate::plan::tests::fleet()).unwrap();
        let phase = |name: &str| plan.phase(name).unwrap();
        let drill = RunContext {
            run_id: "undo-1".into(),
            repository: api::model::RepositoryRef::default(),
            point: Some("20261125T073000Z-prod-3f2a9c01".into()),
            to_time: None,
            references: vec![],
            undo: None,
            restore_test: None,
        };
        let err = agent_actions(phase("undo-postgres"), &drill).unwrap_err();
        assert!(err.contains("runs only in an undo run"), "{err}");
        let undo = RunContext {
            undo: Some(UndoOf {
                run: "drill-1".into(),
                prior_of_undone: true,
            }),
            ..drill.clone()
        };
        assert_eq!(
            agent_actions(phase("undo-postgres"), &undo).unwrap(),
            [AgentAction::UndoPostgres {
                undone_run: "drill-1".into()
            }]
        );
        // Roles return to where they were before the blocked run stopped them.
        assert_eq!(
            agent_actions(phase("start-web"), &undo).unwrap(),
            [AgentAction::Scale(ScaleTarget::PriorOf("drill-1".into()))]
        );
        let finished = RunContext {
            undo: Some(UndoOf {
                run: "drill-1".into(),
                prior_of_undone: false,
            }),
            ..drill.clone()
        };
        assert_eq!(
            agent_actions(phase("start-web"), &finished).unwrap(),
            [AgentAction::Scale(ScaleTarget::Prior)]
        );
        assert_eq!(
            agent_actions(phase("worker-smoke"), &undo).unwrap()[1],
            AgentAction::Smoke { point: None },
            "after an undo the data is not the point's"
        );
    }
}
