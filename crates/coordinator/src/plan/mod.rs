//! Plans: the runbook as data. A plan is a TOML file of phases; each applies one action to the
//! agents of some roles and then waits for its gate. This module holds the plan's types and
//! loads plans; `validate` checks them (`rollcall plan check`), reporting every problem with
//! the line it is on and what to do, all at once; `steps` orders them and renders them for
//! display (`rollcall plan show`).

mod steps;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// The default plan, shipped in `deploy/plans/default.toml` and embedded here.
pub const DEFAULT_PLAN: &str = include_str!("../../../../deploy/plans/default.toml");
pub const DEFAULT_PLAN_NAME: &str = "deploy/plans/default.toml";

/// The plan of backup runs, shipped in `deploy/plans/backup.toml` (which explains its phases)
/// and embedded here; `Plan::backup_plan` drops the phases of roles a fleet does not declare.
pub const BACKUP_PLAN: &str = include_str!("../../../../deploy/plans/backup.toml");

/// The plan of base-backup runs (`rollcall backup --base`, `base_backup_schedule`), shipped
/// in `deploy/plans/base-backup.toml` and embedded here.
pub const BASE_BACKUP_PLAN: &str = include_str!("../../../../deploy/plans/base-backup.toml");

/// The plan of undo runs (`rollcall run undo RUN`), shipped in `deploy/plans/undo.toml` and
/// embedded here; `Plan::undo_plan` drops the phases of roles a fleet does not declare.
pub const UNDO_PLAN: &str = include_str!("../../../../deploy/plans/undo.toml");
pub const UNDO_PLAN_NAME: &str = "deploy/plans/undo.toml";

/// The plan of restore-test environments (`restore_from`), shipped in
/// `deploy/plans/restore-test.toml` and embedded here.
pub const RESTORE_TEST_PLAN: &str = include_str!("../../../../deploy/plans/restore-test.toml");
pub const RESTORE_TEST_PLAN_NAME: &str = "deploy/plans/restore-test.toml";

/// The longest timeout a phase may have, in days. A phase (and its gate) that may take longer
/// than a week is a mistake in the plan, not a restore; refusing it also keeps every deadline
/// the engine computes from a timeout far inside what a clock can hold.
pub const MAX_PHASE_TIMEOUT_DAYS: u64 = 7;
pub const MAX_PHASE_TIMEOUT: Duration = Duration::from_secs(MAX_PHASE_TIMEOUT_DAYS * 24 * 3600);

/// Roles a plan may name when no environment's declared fleet is at hand.
pub const STANDARD_ROLES: [&str; 6] = [
    "web",
    "worker",
    "scheduler",
    "gateway",
    "database",
    "objects",
];

/// The number of agents an environment declares per role.
pub type Fleet = BTreeMap<String, u32>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Verify the recovery point; record the live system's counts.
    Preflight,
    /// Put the role into read-only maintenance.
    Freeze,
    /// Scale to `params.replicas` (a number, or "prior": the count before the run scaled it).
    Scale,
    /// Restart the role's processes (they reconnect to the restored database).
    Restart,
    /// Restore Postgres into a new database and swap it in, in one phase.
    RestorePostgres,
    /// Restore Postgres into `<db>_restore_<run>` and check its counts, changing nothing live:
    /// the first half of `restore-postgres`, run while traffic is still served.
    PreparePostgres,
    /// Swap the prepared database in (the live one kept, renamed): the second half.
    CommitPostgres,
    /// Undo the swap of the run an undo run takes back: `<db>_pre_<tag>` live again, the
    /// restored database kept as `<db>_undone_<tag>` (undo runs only).
    UndoPostgres,
    /// Put the live store back as it was before that run's object restore (undo runs only).
    UndoObjects,
    RestoreObjects,
    /// Health, operator endpoints, count parity, invariant checks.
    Verify,
    /// The objects agents look up every object key the restored rows refer to (the keys the
    /// database agents' verify returned from their `[[reference]]` queries).
    CheckReferences,
    /// A bounded end-to-end command per role (optionally after scaling to `params.replicas`).
    Smoke,
    /// Written by the coordinator; targets no agents.
    Report,
    Unfreeze,
    /// Dump the database into the repository (backup runs).
    BackupPostgres,
    /// Snapshot the live object store into the repository (backup runs).
    SnapshotObjects,
    /// Commit the recovery point from the parts the backup phases produced; coordinator-side.
    WritePoint,
    /// A physical base backup of the database agent's server (base-backup runs).
    BaseBackup,
    /// Wait for `params.approvals` operators other than the run's starter to approve it (the
    /// two-person rule); coordinator-side, changes nothing. The engine puts one before the
    /// first phase that may change anything of an environment with `approvals`
    /// ([`with_approval`]).
    Approve,
    /// A restore test's teardown of the database its run swapped in (restore-test plans only).
    TeardownPostgres,
    /// A restore test's teardown of the objects its run restored (restore-test plans only).
    TeardownObjects,
}

impl Action {
    pub const ALL: [Action; 22] = [
        Action::Preflight,
        Action::Freeze,
        Action::Scale,
        Action::Restart,
        Action::RestorePostgres,
        Action::PreparePostgres,
        Action::CommitPostgres,
        Action::UndoPostgres,
        Action::UndoObjects,
        Action::RestoreObjects,
        Action::Verify,
        Action::CheckReferences,
        Action::Smoke,
        Action::Report,
        Action::Unfreeze,
        Action::BackupPostgres,
        Action::SnapshotObjects,
        Action::WritePoint,
        Action::BaseBackup,
        Action::Approve,
        Action::TeardownPostgres,
        Action::TeardownObjects,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Preflight => "preflight",
            Action::Freeze => "freeze",
            Action::Scale => "scale",
            Action::Restart => "restart",
            Action::RestorePostgres => "restore-postgres",
            Action::PreparePostgres => "prepare-postgres",
            Action::CommitPostgres => "commit-postgres",
            Action::UndoPostgres => "undo-postgres",
            Action::UndoObjects => "undo-objects",
            Action::RestoreObjects => "restore-objects",
            Action::Verify => "verify",
            Action::CheckReferences => "check-references",
            Action::Smoke => "smoke",
            Action::Report => "report",
            Action::Unfreeze => "unfreeze",
            Action::BackupPostgres => "backup-postgres",
            Action::SnapshotObjects => "snapshot-objects",
            Action::WritePoint => "write-point",
            Action::BaseBackup => "base-backup",
            Action::TeardownPostgres => "teardown-postgres",
            Action::TeardownObjects => "teardown-objects",
            Action::Approve => "approve",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The only role this action may target, when there is one.
    pub fn only_role(self) -> Option<&'static str> {
        match self {
            Action::RestorePostgres
            | Action::PreparePostgres
            | Action::CommitPostgres
            | Action::UndoPostgres
            | Action::TeardownPostgres
            | Action::BaseBackup
            | Action::BackupPostgres => Some("database"),
            Action::RestoreObjects
            | Action::UndoObjects
            | Action::TeardownObjects
            | Action::SnapshotObjects
            | Action::CheckReferences => Some("objects"),
            _ => None,
        }
    }

    pub fn targets_agents(self) -> bool {
        !matches!(self, Action::Report | Action::WritePoint | Action::Approve)
    }

    /// Whether the action changes live data (and so needs writes frozen and roles stopped).
    fn is_restore(self) -> bool {
        matches!(
            self,
            Action::RestorePostgres
                | Action::CommitPostgres
                | Action::RestoreObjects
                | Action::UndoPostgres
                | Action::UndoObjects
        )
    }

    /// Whether the action tears a restore test down (restore-test plans only).
    pub fn is_teardown(self) -> bool {
        matches!(self, Action::TeardownPostgres | Action::TeardownObjects)
    }

    /// Whether the action takes back another run's restore (undo plans only).
    pub fn is_undo(self) -> bool {
        matches!(self, Action::UndoPostgres | Action::UndoObjects)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How many of a set of agents must succeed (and be ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    All,
    Majority,
    Count(u32),
    /// 1..=100
    Percent(u32),
}

impl Quorum {
    /// Agents required out of `declared`.
    pub fn required(self, declared: u32) -> u32 {
        match self {
            Quorum::All => declared,
            Quorum::Majority => declared / 2 + 1,
            Quorum::Count(n) => n,
            Quorum::Percent(p) => (u64::from(declared) * u64::from(p)).div_ceil(100) as u32,
        }
    }
}

impl fmt::Display for Quorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quorum::All => f.write_str("all"),
            Quorum::Majority => f.write_str("majority"),
            Quorum::Count(n) => write!(f, "{n}"),
            Quorum::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Over all targeted agents together.
    Overall(Quorum),
    /// Each named role separately; every targeted role must be named.
    PerRole(BTreeMap<String, Quorum>),
    /// A phase without agents (the report).
    None,
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gate::Overall(q) => write!(f, "{q}"),
            Gate::PerRole(roles) => {
                let parts: Vec<String> = roles.iter().map(|(r, q)| format!("{r}: {q}")).collect();
                write!(f, "per role ({})", parts.join(", "))
            }
            Gate::None => f.write_str("-"),
        }
    }
}

/// `params.replicas` of `scale` and `smoke`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicas {
    Count(u32),
    /// What the role ran before this run scaled it.
    Prior,
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Replicas::Count(n) => write!(f, "{n}"),
            Replicas::Prior => f.write_str("prior"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub index: usize,
    pub name: String,
    pub action: Action,
    /// Targeted roles, resolved ("all" expands to every known role); empty for `report`.
    pub roles: Vec<String>,
    pub gate: Gate,
    pub timeout: Duration,
    pub retries: u32,
    pub required: bool,
    /// Indices of the phases that must pass first.
    pub after: Vec<usize>,
    pub replicas: Option<Replicas>,
    /// The action's settings as written.
    pub params: toml::Table,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    pub description: String,
    pub phases: Vec<Phase>,
    /// The document the plan was read from: a run journals it and resumes with it.
    pub source: String,
    /// Phases left out because they target only roles the environment does not declare (a
    /// plan that says `skip_undeclared_roles = true`, as the built-in ones do).
    pub skipped: Vec<Skipped>,
    /// Custom roles the plan names that were not checked, because it was read without a fleet
    /// (`rollcall plan check FILE` without `--env`).
    pub unchecked_roles: Vec<String>,
    /// `restore_test = true`: restores into a restore-test environment's fleet, which serves
    /// nobody, without a freeze first.
    pub restore_test: bool,
}

/// A phase a plan left out for the fleet it was read against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub phase: String,
    /// The roles it targets, none of which the environment declares.
    pub roles: Vec<String>,
}

impl Plan {
    /// The backup plan for a fleet: the phases whose role the fleet declares.
    pub fn backup_plan(fleet: &Fleet) -> Result<Plan, PlanErrors> {
        let declares = |role: &str| fleet.get(role).copied().unwrap_or(0) > 0;
        let mut text = BACKUP_PLAN.to_owned();
        if !declares("database") || !declares("objects") {
            // The catch-up pass only matters when there is a dump to be consistent with.
            text = drop_phase(&text, "catch-up-objects");
        }
        if !declares("database") {
            text = drop_phase(&text, "backup-postgres");
        }
        if !declares("objects") {
            text = drop_phase(&text, "snapshot-objects");
        }
        Plan::parse(Path::new("built-in backup plan"), &text, Some(fleet))
    }

    /// The base-backup plan for a fleet; an error naming the environment's missing database
    /// agent when the fleet declares none (only a database agent takes base backups).
    pub fn base_backup_plan(fleet: &Fleet) -> Result<Plan, PlanErrors> {
        Plan::parse(
            Path::new("built-in base-backup plan"),
            BASE_BACKUP_PLAN,
            Some(fleet),
        )
    }

    /// The undo plan against `fleet`, without the phases of roles it does not declare.
    pub fn undo_plan(fleet: &Fleet) -> Result<Plan, PlanErrors> {
        Plan::parse(Path::new(UNDO_PLAN_NAME), UNDO_PLAN, Some(fleet))
    }

    /// The built-in plan of a restore-test environment, fitted to its fleet.
    pub fn restore_test_plan(fleet: &Fleet) -> Result<Plan, PlanErrors> {
        Plan::parse(
            Path::new(RESTORE_TEST_PLAN_NAME),
            RESTORE_TEST_PLAN,
            Some(fleet),
        )
    }

    /// The default plan against `roles` (None: the standard roles).
    pub fn default_plan(fleet: Option<&Fleet>) -> Result<Plan, PlanErrors> {
        Plan::parse(Path::new(DEFAULT_PLAN_NAME), DEFAULT_PLAN, fleet)
    }

    pub fn load(path: &Path, fleet: Option<&Fleet>) -> Result<Plan, PlanErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let fix = if e.kind() == std::io::ErrorKind::NotFound {
                format!("check the path, or copy {DEFAULT_PLAN_NAME} as a start")
            } else {
                "check that the file is readable by this user".to_owned()
            };
            PlanErrors::single(path, None, format!("cannot read plan ({e})"), fix)
        })?;
        Plan::parse(path, &text, fleet)
    }

    /// Parses and validates. With `fleet`, roles and gates are checked against the declared
    /// agents; without, roles must be standard ones and gates are checked for shape only.
    ///
    /// A plan that says `skip_undeclared_roles = true` fits itself to `fleet`: a standard role
    /// the environment does not declare leaves every phase and per-role gate that names it, a
    /// phase left with no role is skipped (listed in [`Plan::skipped`]), and phases that waited
    /// for it wait for what it waited for. Any other unknown role is still an error.
    pub fn parse(path: &Path, text: &str, fleet: Option<&Fleet>) -> Result<Plan, PlanErrors> {
        let fits = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|doc| doc.get("skip_undeclared_roles").and_then(|v| v.as_bool()))
            == Some(true);
        let Some(fleet) = fleet.filter(|_| fits) else {
            return validate::parse(path, text, fleet);
        };
        // The document as written first, so shape errors name its own lines.
        let whole = validate::parse(path, text, None)?;
        let (fitted, skipped) = fit_to_fleet(text, fleet);
        // Fitting may leave out a smoke, never the plan's reason to exist.
        let action_of = |name: &str| whole.phase(name).map(|p| p.action);
        let mut vital = Vec::new();
        for s in &skipped {
            if let Some(action @ (Action::Freeze | Action::Unfreeze)) = action_of(&s.phase) {
                vital.push(PlanError {
                    line: phase_line(text, &s.phase),
                    problem: format!(
                        "phase {}: the environment declares no {} agents, and without them nothing would {action} traffic",
                        s.phase,
                        s.roles.join(" or ")
                    ),
                    fix: "declare the agents in the environment's fleet".into(),
                });
            }
        }
        let restores =
            |phases: &mut dyn Iterator<Item = Action>| phases.filter(|a| a.is_restore()).count();
        let written = restores(&mut whole.phases.iter().map(|p| p.action));
        let left_out = restores(&mut skipped.iter().filter_map(|s| action_of(&s.phase)));
        if written > 0 && left_out == written {
            vital.push(PlanError {
                line: None,
                problem: "the environment declares no agents for any store this plan restores \
                          (database, objects), so it would restore nothing"
                    .into(),
                fix: "declare the database and objects agents in the environment's fleet".into(),
            });
        }
        if !vital.is_empty() {
            return Err(PlanErrors {
                file: path.display().to_string(),
                errors: vital,
            });
        }
        match validate::parse(path, &fitted, Some(fleet)) {
            Ok(plan) => Ok(Plan { skipped, ..plan }),
            Err(mut e) => {
                // Lines of the fitted document mean nothing to the reader: name the phase's.
                for error in &mut e.errors {
                    error.line = error
                        .problem
                        .strip_prefix("phase ")
                        .and_then(|rest| rest.split_once(':'))
                        .and_then(|(name, _)| phase_line(text, name));
                }
                Err(e)
            }
        }
    }

    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// Whether the plan waits for approvals.
    pub fn approves(&self) -> bool {
        self.phases.iter().any(|p| p.action == Action::Approve)
    }
}

impl Phase {
    /// An approve phase's `params.approvals` (validated to be 1 to
    /// [`crate::config::MAX_APPROVALS`]); 0 for any other phase.
    pub fn approvals(&self) -> u32 {
        match (self.action, self.params.get("approvals")) {
            (Action::Approve, Some(toml::Value::Integer(n))) => u32::try_from(*n).unwrap_or(0),
            _ => 0,
        }
    }
}

/// The name of the approve phase [`with_approval`] adds.
pub const APPROVE_PHASE: &str = "approve";

/// A plan document that waits for `approvals` approvals (for at most `timeout`) before the
/// first phase that may change anything: an approve phase is put before the first phase that
/// is not a preflight or a prepare-postgres (which only read, or restore beside the live
/// database), and every later phase waits for it (by coming next, or in its `after`). A plan
/// that has an approve phase already is left as it is.
pub fn with_approval(text: &str, approvals: u32, timeout: Duration) -> Result<String, String> {
    let mut doc = text
        .parse::<toml::Table>()
        .map_err(|e| format!("the plan is not TOML: {e}"))?;
    let Some(toml::Value::Array(phases)) = doc.get_mut("phase") else {
        return Err("the plan has no phases".into());
    };
    let action = |p: &toml::Value| p.get("action").and_then(|a| a.as_str()).map(str::to_owned);
    if phases
        .iter()
        .any(|p| action(p).as_deref() == Some(Action::Approve.as_str()))
    {
        // The plan's own approve phases ask for at least what the environment asks for.
        let mut raised = false;
        for p in phases.iter_mut() {
            if action(p).as_deref() != Some(Action::Approve.as_str()) {
                continue;
            }
            let Some(table) = p.as_table_mut() else {
                continue;
            };
            let params = table
                .entry("params")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(params) = params.as_table_mut() {
                let has = params.get("approvals").and_then(|v| v.as_integer());
                if has.is_none_or(|n| n < i64::from(approvals)) {
                    params.insert("approvals".into(), i64::from(approvals).into());
                    raised = true;
                }
            }
        }
        if !raised {
            return Ok(text.to_owned());
        }
        return toml::to_string(&doc).map_err(|e| format!("write the plan's approvals: {e}"));
    }
    if phases
        .iter()
        .any(|p| p.get("name").and_then(|n| n.as_str()) == Some(APPROVE_PHASE))
    {
        return Err(format!(
            "the plan has a phase named {APPROVE_PHASE:?} that is not an approve phase; rename it"
        ));
    }
    let reads_only = [Action::Preflight.as_str(), Action::PreparePostgres.as_str()];
    let at = phases
        .iter()
        .position(|p| !action(p).is_some_and(|a| reads_only.contains(&a.as_str())))
        .unwrap_or(phases.len());
    let mut approve = toml::Table::new();
    approve.insert("name".into(), APPROVE_PHASE.into());
    approve.insert("action".into(), Action::Approve.as_str().into());
    approve.insert(
        "timeout".into(),
        humantime::format_duration(timeout).to_string().into(),
    );
    let mut params = toml::Table::new();
    params.insert("approvals".into(), i64::from(approvals).into());
    approve.insert("params".into(), params.into());
    for p in phases.iter_mut().skip(at) {
        if let Some(toml::Value::Array(after)) = p.get_mut("after") {
            after.push(APPROVE_PHASE.into());
        }
    }
    phases.insert(at, approve.into());
    toml::to_string(&doc).map_err(|e| format!("write the plan with its approve phase: {e}"))
}

/// A plan document without the standard roles `fleet` does not declare (or declares none
/// of): they leave each phase's roles and per-role gate, and a phase left with no role is
/// dropped (`drop_phase`) and returned. Roles outside the standard ones are left for
/// validation to name.
fn fit_to_fleet(text: &str, fleet: &Fleet) -> (String, Vec<Skipped>) {
    let Ok(mut doc) = text.parse::<toml::Table>() else {
        return (text.to_owned(), Vec::new());
    };
    let absent =
        |role: &str| STANDARD_ROLES.contains(&role) && fleet.get(role).copied().unwrap_or(0) == 0;
    let mut emptied = Vec::new();
    if let Some(toml::Value::Array(phases)) = doc.get_mut("phase") {
        for p in phases.iter_mut() {
            let mut left_out = Vec::new();
            if let Some(toml::Value::Array(roles)) = p.get_mut("roles") {
                // "all" is every role the environment has agents of.
                if roles.iter().any(|r| r.as_str() == Some("all")) {
                    *roles = fleet
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .map(|(role, _)| toml::Value::String(role.clone()))
                        .collect();
                }
                roles.retain(|r| match r.as_str() {
                    Some(role) if absent(role) => {
                        left_out.push(role.to_owned());
                        false
                    }
                    _ => true,
                });
                if roles.is_empty()
                    && let Some(name) = p.get("name").and_then(|n| n.as_str())
                {
                    emptied.push(Skipped {
                        phase: name.to_owned(),
                        roles: left_out,
                    });
                }
            }
            if let Some(toml::Value::Table(gate)) = p.get_mut("gate") {
                gate.retain(|role, _| !absent(role));
            }
        }
    }
    let mut text = toml::to_string(&doc).unwrap_or_else(|_| text.to_owned());
    for skipped in &emptied {
        text = drop_phase(&text, &skipped.phase);
    }
    (text, emptied)
}

/// The line of `name = "<phase>"` in a plan document.
fn phase_line(text: &str, phase: &str) -> Option<usize> {
    let wanted = format!("name = \"{phase}\"");
    text.lines().position(|l| l.trim() == wanted).map(|i| i + 1)
}

/// Removes a phase from a plan document and from every `after` list: a phase that waited for
/// it (by name, or by coming next with no `after`) waits for what it waited for.
fn drop_phase(text: &str, name: &str) -> String {
    let Ok(mut doc) = text.parse::<toml::Table>() else {
        return text.to_owned();
    };
    if let Some(toml::Value::Array(phases)) = doc.get_mut("phase") {
        let named = |p: &toml::Value| p.get("name").and_then(|n| n.as_str()) == Some(name);
        let Some(at) = phases.iter().position(named) else {
            return text.to_owned();
        };
        let inherited: Vec<toml::Value> = match phases[at].get("after").and_then(|a| a.as_array()) {
            Some(after) => after.clone(),
            // It waited for the phase written before it.
            None => at
                .checked_sub(1)
                .and_then(|prev| phases[prev].get("name").cloned())
                .into_iter()
                .collect(),
        };
        phases.remove(at);
        // The phase written after it, with no `after`, waited for it by coming next.
        if let Some(toml::Value::Table(next)) = phases.get_mut(at)
            && !next.contains_key("after")
            && !inherited.is_empty()
        {
            next.insert("after".into(), toml::Value::Array(inherited.clone()));
        }
        for p in phases.iter_mut() {
            if let Some(toml::Value::Array(after)) = p.get_mut("after")
                && after.iter().any(|a| a.as_str() == Some(name))
            {
                after.retain(|a| a.as_str() != Some(name));
                for dep in &inherited {
                    if !after.contains(dep) {
                        after.push(dep.clone());
                    }
                }
            }
        }
    }
    toml::to_string(&doc).unwrap_or_else(|_| text.to_owned())
}

/// Everything wrong with a plan, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanErrors {
    pub file: String,
    pub errors: Vec<PlanError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub line: Option<usize>,
    pub problem: String,
    pub fix: String,
}

impl PlanErrors {
    fn single(path: &Path, line: Option<usize>, problem: String, fix: String) -> PlanErrors {
        PlanErrors {
            file: path.display().to_string(),
            errors: vec![PlanError { line, problem, fix }],
        }
    }
}

impl fmt::Display for PlanErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match e.line {
                Some(line) => write!(f, "{}:{line}: {}; {}", self.file, e.problem, e.fix)?,
                None => write!(f, "{}: {}; {}", self.file, e.problem, e.fix)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for PlanErrors {}

impl From<PlanErrors> for api::errors::Problems {
    /// One problem per line when shown (`api::errors::one_line`).
    fn from(e: PlanErrors) -> api::errors::Problems {
        api::errors::Problems(e.to_string().lines().map(str::to_owned).collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The runbook's fleet: one of each role, two workers.
    pub(crate) fn fleet() -> Fleet {
        [
            ("web", 1),
            ("worker", 2),
            ("scheduler", 1),
            ("gateway", 1),
            ("database", 1),
            ("objects", 1),
        ]
        .into_iter()
        .map(|(r, n)| (r.to_owned(), n))
        .collect()
    }

    #[test]
    fn the_base_backup_plan_is_one_phase_on_the_database_agent() {
        let plan = Plan::base_backup_plan(&fleet()).unwrap();
        assert_eq!(plan.name, "base-backup");
        let phases: Vec<(&str, Action, Vec<String>)> = plan
            .phases
            .iter()
            .map(|p| (p.name.as_str(), p.action, p.roles.clone()))
            .collect();
        assert_eq!(
            phases,
            [(
                "base-backup",
                Action::BaseBackup,
                vec!["database".to_owned()]
            )]
        );
        assert_eq!(Action::parse("base-backup"), Some(Action::BaseBackup));
        assert_eq!(Action::BaseBackup.only_role(), Some("database"));
        // A fleet without a database agent has nobody to take it.
        let mut no_db = fleet();
        no_db.remove("database");
        assert!(Plan::base_backup_plan(&no_db).is_err());
    }

    #[test]
    fn the_backup_plan_fits_the_fleet() {
        let plan = Plan::backup_plan(&fleet()).unwrap();
        let names = |plan: &Plan, step: &[usize]| -> Vec<String> {
            step.iter().map(|&i| plan.phases[i].name.clone()).collect()
        };
        let steps = plan.steps();
        assert_eq!(
            steps.iter().map(|s| names(&plan, s)).collect::<Vec<_>>(),
            [
                vec!["backup-postgres", "snapshot-objects"],
                vec!["catch-up-objects"],
                vec!["write-point"],
            ],
            "dump and snapshot together, a catch-up snapshot after the dump, then the point"
        );
        let mut no_objects = fleet();
        no_objects.remove("objects");
        let plan = Plan::backup_plan(&no_objects).unwrap();
        assert_eq!(
            plan.steps()
                .iter()
                .map(|s| names(&plan, s))
                .collect::<Vec<_>>(),
            [vec!["backup-postgres"], vec!["write-point"]]
        );
        let mut no_db = fleet();
        no_db.remove("database");
        let plan = Plan::backup_plan(&no_db).unwrap();
        assert_eq!(
            plan.phases
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["snapshot-objects", "write-point"]
        );
    }

    #[test]
    fn the_undo_plan_fits_the_fleet_and_keeps_the_default_plans_order() {
        let names = |plan: &Plan| -> Vec<Vec<String>> {
            plan.steps()
                .iter()
                .map(|s| s.iter().map(|&i| plan.phases[i].name.clone()).collect())
                .collect()
        };
        let plan = Plan::undo_plan(&fleet()).unwrap();
        assert_eq!(
            names(&plan),
            [
                vec!["freeze-writes"],
                vec!["scale-to-zero"],
                vec!["undo-postgres", "undo-objects"],
                vec!["start-web"],
                vec!["verify"],
                vec!["worker-smoke"],
                vec!["scheduler-smoke"],
                vec!["gateway-smoke"],
                vec!["restore-replicas"],
                vec!["report"],
                vec!["unfreeze"],
            ]
        );
        // A fleet without scheduler, gateway and objects: their phases and gates go.
        let small: Fleet = [("web", 1), ("worker", 1), ("database", 1)]
            .into_iter()
            .map(|(r, n)| (r.to_owned(), n))
            .collect();
        let plan = Plan::undo_plan(&small).unwrap();
        assert_eq!(
            plan.phases
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            [
                "freeze-writes",
                "scale-to-zero",
                "undo-postgres",
                "start-web",
                "verify",
                "worker-smoke",
                "restore-replicas",
                "report",
                "unfreeze"
            ]
        );
        assert_eq!(
            plan.phase("scale-to-zero").unwrap().roles,
            ["web", "worker"]
        );
    }

    #[test]
    fn quorum_arithmetic() {
        assert_eq!(Quorum::Majority.required(2), 2);
        assert_eq!(Quorum::Majority.required(3), 2);
        assert_eq!(Quorum::Percent(50).required(3), 2);
        assert_eq!(Quorum::Percent(100).required(7), 7);
        assert_eq!(Quorum::All.required(4), 4);
    }

    #[test]
    fn an_approve_phase_comes_before_anything_changes_and_everything_after_waits_for_it() {
        let base = Plan::default_plan(Some(&fleet())).unwrap();
        let text = with_approval(&base.source, 2, Duration::from_secs(1800)).unwrap();
        let plan = Plan::parse(Path::new("approving"), &text, Some(&fleet())).unwrap();
        assert!(plan.approves() && !base.approves());
        let approve = plan.phase(APPROVE_PHASE).unwrap();
        assert_eq!(approve.action, Action::Approve);
        assert_eq!(approve.approvals(), 2);
        assert_eq!(approve.timeout, Duration::from_secs(1800));
        assert_eq!(approve.roles, Vec::<String>::new());
        // Only what reads (preflight) or restores beside the live data (prepare) comes first.
        let before: Vec<Action> = plan.phases[..approve.index]
            .iter()
            .map(|p| p.action)
            .collect();
        assert_eq!(before, [Action::Preflight, Action::PreparePostgres]);
        // Every later phase waits for it, directly or through the phases it waits for.
        let mut waits = vec![false; plan.phases.len()];
        waits[approve.index] = true;
        for p in &plan.phases[approve.index + 1..] {
            waits[p.index] = p.after.iter().any(|&d| waits[d]);
            assert!(
                waits[p.index],
                "phase {} does not wait for approval",
                p.name
            );
        }
        // A second pass leaves the plan as it is; the undo plan gets one too.
        assert_eq!(
            with_approval(&text, 1, Duration::from_secs(60)).unwrap(),
            text
        );
        let undo = Plan::undo_plan(&fleet()).unwrap();
        let text = with_approval(&undo.source, 1, Duration::from_secs(60)).unwrap();
        let undo = Plan::parse(Path::new("undo"), &text, Some(&fleet())).unwrap();
        assert!(undo.approves());
        let first_change = undo
            .phases
            .iter()
            .position(|p| matches!(p.action, Action::Freeze | Action::Scale) || p.action.is_undo())
            .unwrap();
        assert!(undo.phase(APPROVE_PHASE).unwrap().index < first_change);
    }

    #[test]
    fn approve_phases_are_validated() {
        let head = "name = \"t\"\n";
        let phase = |params: &str| {
            format!(
                "{head}[[phase]]\nname = \"ok\"\naction = \"approve\"\ntimeout = \"1h\"\n{params}"
            )
        };
        let check = |t: &str| {
            Plan::parse(Path::new("p.toml"), t, Some(&fleet())).map_err(|e| e.to_string())
        };
        assert!(check(&phase("params = { approvals = 1 }")).is_ok());
        let err = check(&phase("")).unwrap_err();
        assert!(
            err.contains("phase ok: approve needs params.approvals"),
            "{err}"
        );
        let err = check(&phase("params = { approvals = 0 }")).unwrap_err();
        assert!(
            err.contains("params.approvals = 0 is not a count from 1 to 10"),
            "{err}"
        );
        let err = check(&phase("roles = [\"web\"]\nparams = { approvals = 1 }")).unwrap_err();
        assert!(
            err.contains("runs on the coordinator and targets no roles"),
            "{err}"
        );
        // A plan cannot put its approval after something that changes the fleet.
        let late = format!(
            "{head}[[phase]]\nname = \"freeze\"\naction = \"freeze\"\nroles = [\"web\"]\ngate = \"all\"\n\
             timeout = \"1m\"\n[[phase]]\nname = \"ok\"\naction = \"approve\"\n\
             timeout = \"1h\"\nparams = {{ approvals = 1 }}\n"
        );
        let err = check(&late).unwrap_err();
        assert!(
            err.contains("phase freeze may change the fleet before the plan's approval"),
            "{err}"
        );
    }

    #[test]
    fn the_restore_test_plan_fits_a_data_only_fleet_and_a_whole_one_without_a_freeze() {
        let data: Fleet = [("database".to_owned(), 1), ("objects".to_owned(), 1)].into();
        let small = Plan::restore_test_plan(&data).unwrap();
        assert!(small.restore_test);
        let names: Vec<&str> = small.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "preflight",
                "prepare-postgres",
                "commit-postgres",
                "restore-objects",
                "verify",
                "check-references",
                "restore-replicas",
                "report",
                "teardown-postgres",
                "teardown-objects",
                "start-roles"
            ]
        );
        let whole = Plan::restore_test_plan(&fleet()).unwrap();
        assert!(
            whole
                .phases
                .iter()
                .all(|p| !matches!(p.action, Action::Freeze | Action::Unfreeze))
        );
        // Roles stop before the data changes, and come back for the smokes.
        let index = |name: &str| whole.phase(name).unwrap().index;
        assert!(
            whole
                .phase("commit-postgres")
                .unwrap()
                .after
                .contains(&index("scale-to-zero")),
            "{:?}",
            whole.phase("commit-postgres")
        );
        // The teardown waits for the report, and for the roles to stop.
        for t in ["teardown-postgres", "teardown-objects"] {
            let after = &whole.phase(t).unwrap().after;
            assert!(after.contains(&index("stop-roles")), "{t}: {after:?}");
            assert!(index(t) > index("report"));
        }
        // The same document without `restore_test = true` is refused: it restores unfrozen.
        let plain = RESTORE_TEST_PLAN.replace("restore_test = true", "");
        let err = Plan::parse(Path::new("p.toml"), &plain, Some(&fleet()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("restores data before writes are frozen"),
            "{err}"
        );
        assert!(
            err.contains("teardown-postgres is for restore-test plans only"),
            "{err}"
        );
    }

    #[test]
    fn a_restore_test_plan_with_roles_still_stops_them_before_it_restores() {
        // The built-in plan without its scale-down before the restores: for a fleet with web
        // and worker agents the restores would replace data under running roles.
        let unordered = RESTORE_TEST_PLAN.replace(
            "after = [\"scale-to-zero\"]",
            "after = [\"prepare-postgres\"]",
        );
        let err = Plan::parse(Path::new("p.toml"), &unordered, Some(&fleet()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("phase commit-postgres restores data while roles may still be running")
                && err.contains(
                    "phase restore-objects restores data while roles may still be running"
                ),
            "{err}"
        );
        // The document is checked as written, whatever fleet it is fitted to.
        let data: Fleet = [("database".to_owned(), 1), ("objects".to_owned(), 1)].into();
        assert!(Plan::parse(Path::new("p.toml"), &unordered, Some(&data)).is_err());
        // A restore-test plan that names no role but the data has none to stop: accepted.
        let data_only = r#"
name = "data-only restore test"
restore_test = true
[[phase]]
gate = "all"
timeout = "10m"
name = "preflight"
action = "preflight"
roles = ["database", "objects"]
[[phase]]
gate = "all"
timeout = "10m"
name = "restore-postgres"
action = "restore-postgres"
roles = ["database"]
[[phase]]
gate = "all"
timeout = "10m"
name = "restore-objects"
action = "restore-objects"
roles = ["objects"]
after = ["preflight"]
[[phase]]
gate = "all"
timeout = "10m"
name = "verify"
action = "verify"
roles = ["database", "objects"]
after = ["restore-postgres", "restore-objects"]
"#;
        Plan::parse(Path::new("p.toml"), data_only, Some(&data)).unwrap();
    }
}
