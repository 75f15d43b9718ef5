//! Plan validation (`rollcall plan check`): the file's shape, then every phase's action,
//! roles, gate, timeout and dependencies, then the runbook's ordering rules on the dependency
//! graph. Every problem is collected with its line and what to do, so one run names them all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::steps::{ancestors, find_cycle};
use super::{
    Action, DEFAULT_PLAN_NAME, Fleet, Gate, MAX_PHASE_TIMEOUT, MAX_PHASE_TIMEOUT_DAYS, Phase, Plan,
    PlanError, PlanErrors, Quorum, Replicas, STANDARD_ROLES,
};

/// Parses and validates a plan document (`Plan::parse`).
pub(super) fn parse(path: &Path, text: &str, fleet: Option<&Fleet>) -> Result<Plan, PlanErrors> {
    let file: PlanFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let message = e.message().lines().next().unwrap_or("invalid TOML").trim();
        PlanErrors::single(
            path,
            line,
            message.to_owned(),
            format!("fix that line (the format is described in {DEFAULT_PLAN_NAME})"),
        )
    })?;
    let mut v = Validator {
        text,
        errors: Vec::new(),
        fleetless: fleet.is_none(),
        unchecked_roles: BTreeSet::new(),
    };
    let plan = v.resolve(file, fleet);
    if v.errors.is_empty() {
        Ok(Plan {
            source: text.to_owned(),
            unchecked_roles: std::mem::take(&mut v.unchecked_roles).into_iter().collect(),
            ..plan
        })
    } else {
        Err(PlanErrors {
            file: path.display().to_string(),
            errors: v.errors,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    name: Option<String>,
    description: Option<String>,
    /// Read by `Plan::parse`, which fits the document to the fleet before validation.
    #[allow(dead_code)]
    skip_undeclared_roles: Option<bool>,
    /// A plan for restore-test environments: it restores into a fleet that serves nobody, so
    /// no freeze has to come first (config accepts it only on such environments).
    restore_test: Option<bool>,
    #[serde(default, rename = "phase")]
    phases: Vec<Spanned<PhaseFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseFile {
    name: Spanned<String>,
    action: Spanned<String>,
    roles: Option<Spanned<Vec<Spanned<String>>>>,
    gate: Option<Spanned<toml::Value>>,
    timeout: Option<Spanned<String>>,
    retries: Option<u32>,
    required: Option<bool>,
    after: Option<Spanned<Vec<Spanned<String>>>>,
    params: Option<Spanned<toml::Table>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Whether a role a plan read without a fleet names may be a custom role (an agent may declare
/// any role name): a well-formed name that is not a near miss of a standard one (`webb`,
/// `gatewy` stay errors, since a typo would otherwise target no agent at all): one edit away,
/// or two from a name of six letters or more.
fn custom_role(role: &str) -> bool {
    api::model::Role::parse(role).is_ok()
        && !STANDARD_ROLES.iter().any(|s| {
            let d = edit_distance(role, s);
            d <= 1 || (d == 2 && s.len() >= 6)
        })
}

/// Levenshtein distance between two short ASCII names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

struct Validator<'a> {
    text: &'a str,
    errors: Vec<PlanError>,
    /// Read without a fleet (`plan check FILE`): custom role names are accepted, unchecked.
    fleetless: bool,
    /// Custom roles a plan read without a fleet names: only a fleet can say whether they exist.
    unchecked_roles: BTreeSet<String>,
}

impl Validator<'_> {
    fn error(&mut self, offset: usize, problem: impl Into<String>, fix: impl Into<String>) {
        self.errors.push(PlanError {
            line: Some(line_of(self.text, offset)),
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    fn resolve(&mut self, file: PlanFile, fleet: Option<&Fleet>) -> Plan {
        let known_roles: Vec<String> = match fleet {
            Some(f) => f.keys().cloned().collect(),
            None => STANDARD_ROLES.iter().map(|r| (*r).to_owned()).collect(),
        };
        if file.phases.is_empty() {
            self.errors.push(PlanError {
                line: None,
                problem: "the plan has no phases".into(),
                fix: format!("add [[phase]] tables (see {DEFAULT_PLAN_NAME})"),
            });
        }

        // Names first, so `after` can refer to phases written later.
        let mut index_of: BTreeMap<String, usize> = BTreeMap::new();
        for (i, p) in file.phases.iter().enumerate() {
            let name = p.get_ref().name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                self.error(
                    p.get_ref().name.span().start,
                    format!("phase name {name:?} is not a plain name"),
                    "use letters, digits, '-' and '_' only",
                );
            }
            if index_of.insert(name.clone(), i).is_some() {
                self.error(
                    p.get_ref().name.span().start,
                    format!("phase name {name:?} is used twice"),
                    "give every phase its own name",
                );
            }
        }

        let mut phases = Vec::new();
        let mut replicas_spans = Vec::new();
        for (i, p) in file.phases.into_iter().enumerate() {
            let at = p.span().start;
            let p = p.into_inner();
            let name = p.name.get_ref().clone();
            let action = match Action::parse(p.action.get_ref()) {
                Some(a) => a,
                None => {
                    self.error(
                        p.action.span().start,
                        format!("phase {name}: unknown action {:?}", p.action.get_ref()),
                        format!("use one of: {}", Action::ALL.map(|a| a.as_str()).join(", ")),
                    );
                    continue;
                }
            };
            let roles = self.roles(&name, action, p.roles.as_ref(), &known_roles, at);
            let gate = self.gate(&name, action, p.gate.as_ref(), &roles, fleet, at);
            let timeout = match &p.timeout {
                None => {
                    self.error(
                        at,
                        format!("phase {name}: no timeout"),
                        "set timeout = \"10m\" (every phase and its gate must end)",
                    );
                    Duration::ZERO
                }
                Some(t) => match humantime::parse_duration(t.get_ref()) {
                    Ok(d) if d > MAX_PHASE_TIMEOUT => {
                        self.error(
                            t.span().start,
                            format!(
                                "phase {name}: timeout {:?} is longer than the limit of \
                                 {MAX_PHASE_TIMEOUT_DAYS} days",
                                t.get_ref()
                            ),
                            format!(
                                "set at most \"{MAX_PHASE_TIMEOUT_DAYS}d\" (a phase is a step of \
                                 a restore; \"10m\" or \"2h\" is usual)"
                            ),
                        );
                        Duration::ZERO
                    }
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        self.error(
                            t.span().start,
                            format!("phase {name}: a zero timeout can never be met"),
                            "set a positive duration such as \"10m\"",
                        );
                        Duration::ZERO
                    }
                    Err(e) => {
                        self.error(
                            t.span().start,
                            format!(
                                "phase {name}: timeout {:?} is not a duration ({e})",
                                t.get_ref()
                            ),
                            "write it like \"90s\", \"10m\" or \"2h\"",
                        );
                        Duration::ZERO
                    }
                },
            };
            let after = match &p.after {
                None => {
                    if i == 0 {
                        vec![]
                    } else {
                        vec![i - 1]
                    }
                }
                Some(list) => {
                    let mut out = Vec::new();
                    for dep in list.get_ref() {
                        match index_of.get(dep.get_ref()) {
                            Some(&d) if d == i => self.error(
                                dep.span().start,
                                format!("phase {name} waits for itself"),
                                "remove it from its own `after`",
                            ),
                            Some(&d) => out.push(d),
                            None => self.error(
                                dep.span().start,
                                format!(
                                    "phase {name}: `after` names unknown phase {:?}",
                                    dep.get_ref()
                                ),
                                "name a phase of this plan",
                            ),
                        }
                    }
                    out.sort_unstable();
                    out.dedup();
                    out
                }
            };
            let params = p.params.map(|t| t.into_inner()).unwrap_or_default();
            let replicas = self.replicas(&name, action, &params, at);
            self.approvals(&name, action, &params, at);
            replicas_spans.push(at);
            phases.push(Phase {
                index: phases.len(),
                name,
                action,
                roles,
                gate,
                timeout,
                retries: p.retries.unwrap_or(0),
                required: p.required.unwrap_or(true),
                after,
                replicas,
                params,
            });
        }

        // An unknown action drops its phase; indices then no longer line up, and the errors
        // already say what to fix.
        let plan = Plan {
            name: file.name.unwrap_or_else(|| "unnamed".into()),
            description: file.description.unwrap_or_default(),
            phases,
            source: String::new(),
            skipped: Vec::new(),
            unchecked_roles: Vec::new(),
            restore_test: file.restore_test.unwrap_or(false),
        };
        if self.errors.is_empty() {
            self.ordering(&plan, &replicas_spans);
        }
        plan
    }

    fn roles(
        &mut self,
        name: &str,
        action: Action,
        roles: Option<&Spanned<Vec<Spanned<String>>>>,
        known: &[String],
        at: usize,
    ) -> Vec<String> {
        if !action.targets_agents() {
            if let Some(r) = roles {
                self.error(
                    r.span().start,
                    format!(
                        "phase {name}: action {action} runs on the coordinator and targets no roles"
                    ),
                    "remove `roles` from this phase",
                );
            }
            return Vec::new();
        }
        let Some(roles) = roles else {
            self.error(
                at,
                format!("phase {name}: no roles"),
                "set roles = [\"web\"] (or [\"all\"])",
            );
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        for role in roles.get_ref() {
            let r = role.get_ref();
            if r == "all" {
                out.extend(known.iter().cloned());
            } else if known.iter().any(|k| k == r) {
                out.push(r.clone());
            } else if self.fleetless && custom_role(r) {
                self.unchecked_roles.insert(r.clone());
                out.push(r.clone());
            } else {
                self.error(
                    role.span().start,
                    format!("phase {name}: unknown role {r:?}"),
                    format!("use one of: {}, or \"all\"", known.join(", ")),
                );
            }
        }
        out.sort();
        out.dedup();
        if let Some(only) = action.only_role() {
            out.retain(|r| {
                let ok = r == only;
                if !ok {
                    self.errors.push(PlanError {
                        line: Some(line_of(self.text, roles.span().start)),
                        problem: format!("phase {name}: action {action} cannot run on role {r:?}"),
                        fix: format!("target [\"{only}\"] only"),
                    });
                }
                ok
            });
        }
        if out.is_empty() && self.errors.is_empty() {
            self.error(
                roles.span().start,
                format!("phase {name}: targets no roles"),
                "name at least one role",
            );
        }
        out
    }

    fn gate(
        &mut self,
        name: &str,
        action: Action,
        gate: Option<&Spanned<toml::Value>>,
        roles: &[String],
        fleet: Option<&Fleet>,
        at: usize,
    ) -> Gate {
        if !action.targets_agents() {
            if let Some(g) = gate {
                self.error(
                    g.span().start,
                    format!("phase {name}: action {action} has no agents to gate on"),
                    "remove `gate` from this phase",
                );
            }
            return Gate::None;
        }
        let Some(gate) = gate else {
            self.error(
                at,
                format!("phase {name}: no gate"),
                "set gate = \"all\" (or \"majority\", a count, a percentage, or per role)",
            );
            return Gate::Overall(Quorum::All);
        };
        let offset = gate.span().start;
        // With no valid roles the role errors already say what to fix.
        let fleet = fleet.filter(|_| !roles.is_empty());
        let declared = |role: &str| fleet.and_then(|f| f.get(role)).copied();
        match gate.get_ref() {
            toml::Value::Table(table) => {
                let mut per = BTreeMap::new();
                for (role, value) in table {
                    if !roles.contains(role) {
                        self.error(
                            offset,
                            format!("phase {name}: the gate names role {role:?}, which the phase does not target"),
                            "gate only on targeted roles",
                        );
                        continue;
                    }
                    if let Some(q) = self.quorum(name, value, offset) {
                        self.check_reachable(name, q, declared(role), role, offset);
                        per.insert(role.clone(), q);
                    }
                }
                for role in roles {
                    if !per.contains_key(role) && !table.contains_key(role) {
                        self.error(
                            offset,
                            format!("phase {name}: the per-role gate does not say how many {role} agents must pass"),
                            format!("add {role} = \"all\" (or a count) to the gate"),
                        );
                    }
                }
                Gate::PerRole(per)
            }
            value => match self.quorum(name, value, offset) {
                Some(q) => {
                    let total = fleet.and_then(|_| {
                        roles
                            .iter()
                            .map(|r| declared(r))
                            .try_fold(0u32, |acc, n| n.map(|n| acc + n))
                    });
                    self.check_reachable(name, q, total, &roles.join("+"), offset);
                    Gate::Overall(q)
                }
                None => Gate::Overall(Quorum::All),
            },
        }
    }

    fn quorum(&mut self, name: &str, value: &toml::Value, offset: usize) -> Option<Quorum> {
        let fix = "write \"all\", \"majority\", a count such as 1, or a percentage such as \"50%\"";
        let q = match value {
            toml::Value::String(s) if s == "all" => Quorum::All,
            toml::Value::String(s) if s == "majority" => Quorum::Majority,
            toml::Value::String(s) if s.ends_with('%') => {
                match s.trim_end_matches('%').parse::<u32>() {
                    Ok(p) if (1..=100).contains(&p) => Quorum::Percent(p),
                    _ => {
                        self.error(
                            offset,
                            format!("phase {name}: gate {s:?} is not a percentage from 1% to 100%"),
                            fix,
                        );
                        return None;
                    }
                }
            }
            toml::Value::Integer(n) if *n >= 1 && *n <= i64::from(u32::MAX) => {
                Quorum::Count(*n as u32)
            }
            toml::Value::Integer(n) => {
                self.error(
                    offset,
                    format!("phase {name}: a gate of {n} agents passes vacuously or never"),
                    "require at least 1 agent, or make the phase optional with required = false",
                );
                return None;
            }
            other => {
                self.error(
                    offset,
                    format!("phase {name}: gate {other} is not understood"),
                    fix,
                );
                return None;
            }
        };
        Some(q)
    }

    fn check_reachable(
        &mut self,
        name: &str,
        q: Quorum,
        declared: Option<u32>,
        what: &str,
        offset: usize,
    ) {
        let Some(declared) = declared else { return };
        if declared == 0 {
            self.error(
                offset,
                format!("phase {name}: the environment declares no {what} agents, so the gate could only pass vacuously"),
                "declare the agents in the environment's fleet, or remove the role from the phase",
            );
        } else if q.required(declared) > declared {
            self.error(
                offset,
                format!(
                    "phase {name}: the gate needs {} {what} agents but the environment declares {declared}; it can never pass",
                    q.required(declared)
                ),
                "lower the gate or declare more agents",
            );
        }
    }

    fn replicas(
        &mut self,
        name: &str,
        action: Action,
        params: &toml::Table,
        at: usize,
    ) -> Option<Replicas> {
        let value = params.get("replicas");
        let parsed = match value {
            None => None,
            Some(toml::Value::Integer(n)) if *n >= 0 && *n <= i64::from(u32::MAX) => {
                Some(Replicas::Count(*n as u32))
            }
            Some(toml::Value::String(s)) if s == "prior" => Some(Replicas::Prior),
            Some(other) => {
                self.error(
                    at,
                    format!(
                        "phase {name}: params.replicas = {other} is neither a count nor \"prior\""
                    ),
                    "write replicas = 0, a count, or \"prior\"",
                );
                return None;
            }
        };
        match (action, parsed) {
            (Action::Scale, None) => {
                self.error(
                    at,
                    format!("phase {name}: scale needs params.replicas"),
                    "set params = { replicas = 0 } (or a count, or \"prior\")",
                );
                None
            }
            (Action::Scale | Action::Smoke, r) => r,
            (_, Some(_)) => {
                self.error(
                    at,
                    format!("phase {name}: action {action} takes no replicas"),
                    "remove params.replicas, or use a scale phase",
                );
                None
            }
            (_, None) => None,
        }
    }

    /// An approve phase's `params.approvals`: 1 to `MAX_APPROVALS`; no other phase takes it.
    fn approvals(&mut self, name: &str, action: Action, params: &toml::Table, at: usize) {
        let max = crate::config::MAX_APPROVALS;
        match (action, params.get("approvals")) {
            (Action::Approve, Some(toml::Value::Integer(n)))
                if (1..=i64::from(max)).contains(n) => {}
            (Action::Approve, Some(other)) => self.error(
                at,
                format!("phase {name}: params.approvals = {other} is not a count from 1 to {max}"),
                "write params = { approvals = 1 }",
            ),
            (Action::Approve, None) => self.error(
                at,
                format!("phase {name}: approve needs params.approvals"),
                "write params = { approvals = 1 }",
            ),
            (_, Some(_)) => self.error(
                at,
                format!("phase {name}: action {action} takes no approvals"),
                "remove params.approvals, or use an approve phase",
            ),
            (_, None) => {}
        }
    }

    /// The runbook's ordering, as rules on the dependency graph.
    fn ordering(&mut self, plan: &Plan, spans: &[usize]) {
        if let Some(cycle) = find_cycle(&plan.phases) {
            let names: Vec<&str> = cycle
                .iter()
                .map(|&i| plan.phases[i].name.as_str())
                .collect();
            self.error(
                spans[cycle[0]],
                format!(
                    "phases wait for each other in a cycle: {}",
                    names.join(" → ")
                ),
                "break the cycle by removing one of these `after` entries",
            );
            return;
        }
        let before = ancestors(&plan.phases);
        let of = |a: Action| -> Vec<usize> {
            plan.phases
                .iter()
                .filter(|p| p.action == a)
                .map(|p| p.index)
                .collect()
        };
        let restores: Vec<usize> = plan
            .phases
            .iter()
            .filter(|p| p.action.is_restore())
            .map(|p| p.index)
            .collect();
        let scale_downs: Vec<usize> = plan
            .phases
            .iter()
            .filter(|p| p.action == Action::Scale && p.replicas == Some(Replicas::Count(0)))
            .map(|p| p.index)
            .collect();
        let runs_roles = plan.phases.iter().any(|p| {
            p.roles
                .iter()
                .any(|r| !matches!(r.as_str(), "database" | "objects" | "all"))
        });
        for &r in &restores {
            let name = &plan.phases[r].name;
            if !plan.restore_test && !of(Action::Freeze).iter().any(|f| before[r].contains(f)) {
                self.error(
                    spans[r],
                    format!("phase {name} restores data before writes are frozen"),
                    "add `after` on a freeze phase (the runbook freezes writes first)",
                );
            }
            // A restore-test plan's target serves nobody, but roles it runs (web, worker,
            // ...) still read the data a restore replaces: it scales them down first like any
            // plan. One for a fleet of only database and objects agents has none to stop.
            if (!plan.restore_test || runs_roles)
                && !scale_downs.iter().any(|s| before[r].contains(s))
            {
                self.error(
                    spans[r],
                    format!("phase {name} restores data while roles may still be running"),
                    "add `after` on a scale phase with replicas = 0",
                );
            }
        }
        // Nothing starts before every restore has finished (workers never before objects).
        for p in &plan.phases {
            let starts = matches!(p.action, Action::Scale | Action::Smoke | Action::Restart)
                && p.replicas != Some(Replicas::Count(0));
            if starts && scale_downs.iter().any(|s| before[p.index].contains(s)) {
                for &r in &restores {
                    if !before[p.index].contains(&r) {
                        self.error(
                            spans[p.index],
                            format!(
                                "phase {} starts roles before {} has finished",
                                p.name, plan.phases[r].name
                            ),
                            format!("add \"{}\" to its `after`", plan.phases[r].name),
                        );
                    }
                }
            }
        }
        // An approve phase holds back everything that may change the fleet: only what reads
        // (preflight) or restores beside the live database (prepare-postgres) may run before
        // it, so a plan cannot put its approval after the restore.
        let approves = of(Action::Approve);
        if !approves.is_empty() {
            for p in &plan.phases {
                let before_allowed = matches!(
                    p.action,
                    Action::Approve | Action::Preflight | Action::PreparePostgres
                );
                if !before_allowed && !approves.iter().any(|a| before[p.index].contains(a)) {
                    self.error(
                        spans[p.index],
                        format!(
                            "phase {} may change the fleet before the plan's approval",
                            p.name
                        ),
                        format!(
                            "add \"{}\" to its `after` (only preflight and prepare-postgres \
                             may run before an approve phase)",
                            plan.phases[approves[0]].name
                        ),
                    );
                }
            }
        }
        // A commit swaps in what a prepare restored and checked.
        for &c in &of(Action::CommitPostgres) {
            if !of(Action::PreparePostgres)
                .iter()
                .any(|p| before[c].contains(p))
            {
                self.error(
                    spans[c],
                    format!(
                        "phase {} swaps in a prepared database, but no prepare-postgres runs \
                         before it",
                        plan.phases[c].name
                    ),
                    "add a prepare-postgres phase and `after` on it",
                );
            }
        }
        // Reference checks look up the keys a verify of the database returned.
        for &c in &of(Action::CheckReferences) {
            let verified = of(Action::Verify).into_iter().any(|v| {
                before[c].contains(&v) && plan.phases[v].roles.iter().any(|r| r == "database")
            });
            if !verified {
                self.error(
                    spans[c],
                    format!(
                        "phase {} checks the keys of restored rows, but no verify of the database runs before it",
                        plan.phases[c].name
                    ),
                    "add `after` on a verify phase whose roles include \"database\"",
                );
            }
        }
        // A teardown drops what a restore test restored: only in restore-test plans, and
        // after the report has recorded what was verified.
        for p in plan.phases.iter().filter(|p| p.action.is_teardown()) {
            if !plan.restore_test {
                self.error(
                    spans[p.index],
                    format!(
                        "phase {}: {} is for restore-test plans only (restore_test = true)",
                        p.name, p.action
                    ),
                    "remove the phase: a drill in place keeps the restored data live",
                );
            } else if !of(Action::Report)
                .iter()
                .any(|r| before[p.index].contains(r))
            {
                self.error(
                    spans[p.index],
                    format!(
                        "phase {} tears the restore down before the report is written",
                        p.name
                    ),
                    "add `after` on the report phase",
                );
            }
        }
        // Traffic resumes last: after every other phase, the report included.
        for &u in &of(Action::Unfreeze) {
            if !restores.is_empty() && of(Action::Report).is_empty() {
                self.error(
                    spans[u],
                    format!(
                        "phase {} resumes traffic but the plan writes no report",
                        plan.phases[u].name
                    ),
                    "add a report phase before it (traffic resumes only after the report)",
                );
            }
            for p in &plan.phases {
                if p.index != u && p.action != Action::Unfreeze && !before[u].contains(&p.index) {
                    self.error(
                        spans[u],
                        format!(
                            "phase {} resumes traffic before {} has passed",
                            plan.phases[u].name, p.name
                        ),
                        "make unfreeze the last phase (add the missing phase to its `after`)",
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::plan::DEFAULT_PLAN;
    use crate::plan::tests::fleet;

    fn check(text: &str) -> Result<Plan, String> {
        Plan::parse(Path::new("plan.toml"), text, Some(&fleet())).map_err(|e| e.to_string())
    }

    const HEAD: &str = "name = \"t\"\n";

    #[test]
    fn unknown_action_and_role_name_their_line() {
        let text = format!(
            "{HEAD}[[phase]]\nname = \"a\"\naction = \"teleport\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"1m\"\n\n[[phase]]\nname = \"b\"\naction = \"freeze\"\nroles = [\"webb\"]\ngate = \"all\"\ntimeout = \"1m\"\n"
        );
        let err = check(&text).unwrap_err();
        assert!(
            err.contains(
                "plan.toml:4: phase a: unknown action \"teleport\"; use one of: preflight, freeze"
            ),
            "{err}"
        );
        assert!(
            err.contains(
                "plan.toml:12: phase b: unknown role \"webb\"; use one of: database, gateway"
            ),
            "{err}"
        );
    }

    #[test]
    fn gates_that_can_never_pass_are_refused() {
        let phase = |gate: &str| {
            format!(
                "{HEAD}[[phase]]\nname = \"s\"\naction = \"smoke\"\nroles = [\"worker\"]\ngate = {gate}\ntimeout = \"1m\"\n"
            )
        };
        let err = check(&phase("3")).unwrap_err();
        assert!(err.contains("plan.toml:6: phase s: the gate needs 3 worker agents but the environment declares 2; it can never pass"), "{err}");
        let err = check(&phase("0")).unwrap_err();
        assert!(err.contains("passes vacuously or never"), "{err}");
        let err = check(&phase("\"150%\"")).unwrap_err();
        assert!(err.contains("is not a percentage from 1% to 100%"), "{err}");
        let err = check(&phase("{ web = 1 }")).unwrap_err();
        assert!(
            err.contains("the gate names role \"web\", which the phase does not target"),
            "{err}"
        );
        check(&phase("\"50%\"")).unwrap();
        check(&phase("{ worker = \"majority\" }")).unwrap();

        // A plan that does not fit itself to the fleet needs every role it names.
        let mut small = fleet();
        small.insert("gateway".into(), 0);
        let strict = crate::plan::DEFAULT_PLAN.replace("skip_undeclared_roles = true", "");
        let err = Plan::parse(Path::new("strict.toml"), &strict, Some(&small))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("declares no gateway agents, so the gate could only pass vacuously"),
            "{err}"
        );
    }

    /// The built-in plans fit themselves to the fleet: a fleet without a gateway (or with
    /// none declared) skips the gateway's smoke, drops it from the phases and gates that name
    /// it with others, and keeps the order; other plans and unknown roles stay strict.
    #[test]
    fn the_default_plan_skips_the_phases_of_roles_the_fleet_lacks() {
        let full = Plan::default_plan(Some(&fleet())).unwrap();
        assert!(full.skipped.is_empty());
        for lacking in [None, Some(0)] {
            let mut small = fleet();
            match lacking {
                None => small.remove("gateway"),
                Some(n) => small.insert("gateway".into(), n),
            };
            let plan = Plan::default_plan(Some(&small)).unwrap();
            assert_eq!(
                plan.skipped,
                [crate::plan::Skipped {
                    phase: "gateway-smoke".into(),
                    roles: vec!["gateway".into()]
                }]
            );
            assert_eq!(plan.phases.len(), full.phases.len() - 1);
            assert!(plan.phase("gateway-smoke").is_none());
            assert!(
                plan.phases
                    .iter()
                    .all(|p| !p.roles.contains(&"gateway".to_owned()))
            );
            // The phase after the skipped one waits for the one before it.
            let replicas = plan.phase("restore-replicas").unwrap();
            let after: Vec<&str> = replicas
                .after
                .iter()
                .map(|&i| plan.phases[i].name.as_str())
                .collect();
            assert_eq!(after, ["scheduler-smoke"]);
            assert!(matches!(&replicas.gate, Gate::PerRole(per) if !per.contains_key("gateway")));
            let shown = plan.render(Some(&small));
            assert!(
                shown.contains(
                    "skipped: gateway-smoke (the environment declares no gateway agents)"
                ),
                "{shown}"
            );
            let undo = Plan::undo_plan(&small).unwrap();
            assert!(
                undo.skipped.iter().any(|s| s.roles == ["gateway"]),
                "{undo:?}"
            );
        }
        // Only web and the stores: every smoke but none of the data phases is skipped.
        let stores: Fleet = [("web", 1), ("database", 1), ("objects", 1)]
            .into_iter()
            .map(|(r, n)| (r.to_owned(), n))
            .collect();
        let plan = Plan::default_plan(Some(&stores)).unwrap();
        let skipped: Vec<&str> = plan.skipped.iter().map(|s| s.phase.as_str()).collect();
        assert_eq!(
            skipped,
            ["worker-smoke", "scheduler-smoke", "gateway-smoke"]
        );
        assert!(plan.phase("commit-postgres").is_some());

        // Without web, the database freezes writes; the phases after start-web wait for what
        // it waited for (both restores), not for the phase written before it.
        let mut no_web = fleet();
        no_web.remove("web");
        let plan = Plan::default_plan(Some(&no_web)).unwrap();
        assert_eq!(plan.phase("freeze-writes").unwrap().roles, ["database"]);
        let verify = plan.phase("verify").unwrap();
        let after: Vec<&str> = verify
            .after
            .iter()
            .map(|&i| plan.phases[i].name.as_str())
            .collect();
        assert_eq!(after, ["commit-postgres", "restore-objects"]);

        // Never fitted away: the freeze, or every restore.
        no_web.remove("database");
        let err = Plan::default_plan(Some(&no_web)).unwrap_err().to_string();
        assert!(
            err.contains("phase freeze-writes: the environment declares no web or database agents, and without them nothing would freeze traffic"),
            "{err}"
        );
        let mut no_stores = fleet();
        no_stores.remove("database");
        no_stores.remove("objects");
        let err = Plan::default_plan(Some(&no_stores))
            .unwrap_err()
            .to_string();
        assert!(err.contains("so it would restore nothing"), "{err}");

        // A typo is not a missing role: still an error, at its own line.
        let typo =
            crate::plan::DEFAULT_PLAN.replacen("roles = [\"gateway\"]", "roles = [\"gatewy\"]", 1);
        let err = Plan::parse(Path::new("typo.toml"), &typo, Some(&fleet()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown role \"gatewy\""), "{err}");
        assert!(err.starts_with("typo.toml:"), "{err}");
    }

    #[test]
    fn without_a_fleet_custom_roles_are_accepted_unchecked_and_near_misses_refused() {
        let plan = |role: &str| {
            let text = format!(
                "[[phase]]\nname = \"p\"\naction = \"smoke\"\nroles = [\"{role}\", \"web\"]\n\
                 gate = \"all\"\ntimeout = \"1m\"\n"
            );
            Plan::parse(Path::new("p.toml"), &text, None)
        };
        let ok = plan("indexer").unwrap();
        assert_eq!(ok.unchecked_roles, ["indexer"]);
        assert_eq!(ok.phases[0].roles, ["indexer", "web"]);
        assert!(plan("web").unwrap().unchecked_roles.is_empty());
        for custom in ["db", "web-admin", "worker-gpu"] {
            assert_eq!(plan(custom).unwrap().unchecked_roles, [custom]);
        }
        for typo in [
            "webb",
            "wrker",
            "gatewy",
            "object",
            "databses",
            "schedular",
            "Web",
            "a b",
        ] {
            let err = plan(typo).unwrap_err().to_string();
            assert!(
                err.contains(&format!("unknown role {typo:?}")),
                "{typo}: {err}"
            );
        }
        // Against a fleet, only what it declares.
        let err = Plan::parse(
            Path::new("p.toml"),
            "[[phase]]\nname = \"p\"\naction = \"smoke\"\nroles = [\"indexer\"]\n\
             gate = \"all\"\ntimeout = \"1m\"\n",
            Some(&fleet()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown role \"indexer\""), "{err}");
        assert_eq!(edit_distance("gatewy", "gateway"), 1);
        assert_eq!(edit_distance("", "web"), 3);
    }

    #[test]
    fn cycles_and_unsafe_orderings_are_refused() {
        let cycle = format!(
            "{HEAD}[[phase]]\nname = \"a\"\naction = \"verify\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"1m\"\nafter = [\"b\"]\n\n[[phase]]\nname = \"b\"\naction = \"verify\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"1m\"\n"
        );
        let err = check(&cycle).unwrap_err();
        assert!(
            err.contains("phases wait for each other in a cycle: a → b → a"),
            "{err}"
        );

        // The default plan with the object restore no longer waiting for the scale-down.
        let early = DEFAULT_PLAN.replace("after = [\"scale-to-zero\"]", "after = [\"preflight\"]");
        assert_ne!(early, DEFAULT_PLAN);
        let err = check(&early).unwrap_err();
        assert!(
            err.contains("phase restore-objects restores data before writes are frozen"),
            "{err}"
        );
        assert!(
            err.contains("phase restore-objects restores data while roles may still be running"),
            "{err}"
        );

        // Starting web before the object restore has finished.
        let start = DEFAULT_PLAN.replace(
            "after = [\"commit-postgres\", \"restore-objects\"]",
            "after = [\"commit-postgres\"]",
        );
        assert_ne!(start, DEFAULT_PLAN);
        let err = check(&start).unwrap_err();
        assert!(
            err.contains("phase start-web starts roles before restore-objects has finished"),
            "{err}"
        );

        // Swapping in a database no phase prepared.
        let unprepared = DEFAULT_PLAN.replace(
            "name = \"prepare-postgres\"\naction = \"prepare-postgres\"",
            "name = \"prepare-postgres\"\naction = \"preflight\"",
        );
        assert_ne!(unprepared, DEFAULT_PLAN);
        let err = check(&unprepared).unwrap_err();
        assert!(
            err.contains(
                "phase commit-postgres swaps in a prepared database, but no prepare-postgres runs before it"
            ),
            "{err}"
        );

        // Looking up referenced objects before the database was verified.
        let early_refs = DEFAULT_PLAN.replace(
            "action = \"check-references\"\nroles = [\"objects\"]\ngate = \"all\"\ntimeout = \"15m\"\n",
            "action = \"check-references\"\nroles = [\"objects\"]\ngate = \"all\"\ntimeout = \"15m\"\nafter = [\"start-web\"]\n",
        );
        assert_ne!(early_refs, DEFAULT_PLAN);
        let err = check(&early_refs).unwrap_err();
        assert!(
            err.contains(
                "phase check-references checks the keys of restored rows, but no verify of the database runs before it"
            ),
            "{err}"
        );

        // Unfreeze before the report.
        let mut moved = DEFAULT_PLAN.to_owned();
        moved.push_str("\n[[phase]]\nname = \"late-check\"\naction = \"verify\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"1m\"\nafter = [\"report\"]\n");
        let err = check(&moved).unwrap_err();
        assert!(
            err.contains("phase unfreeze resumes traffic before late-check has passed"),
            "{err}"
        );
    }

    #[test]
    fn timeouts_are_positive_durations_of_at_most_seven_days() {
        let plan = |timeout: &str| {
            check(&format!(
                "{HEAD}[[phase]]\nname = \"a\"\naction = \"verify\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"{timeout}\"\n"
            ))
        };
        let too_long = "is longer than the limit of 7 days; set at most \"7d\"";
        for (timeout, refused) in [
            ("90s", None),
            ("2h", None),
            ("7d", None),
            ("168h", None),
            ("7d 1s", Some(too_long)),
            ("8d", Some(too_long)),
            // Overflowed the phase's deadline and panicked its task (issue 18).
            ("18446744073709551615s", Some(too_long)),
            ("99999999999999999999999s", Some("is not a duration")),
            ("0s", Some("a zero timeout can never be met")),
            ("soon", Some("is not a duration")),
        ] {
            match (plan(timeout), refused) {
                (Ok(p), None) => assert!(p.phases[0].timeout <= MAX_PHASE_TIMEOUT, "{timeout}"),
                (Err(err), Some(why)) => assert!(
                    err.contains("plan.toml:7: phase a: ") && err.contains(why),
                    "{timeout}: {err}"
                ),
                (got, want) => panic!("timeout {timeout:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn shape_errors_are_named() {
        let err = check("name = \"t\"\n[[phase]]\nname = \"a\"\naction = \"verify\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"soon\"\nwhen = 1\n").unwrap_err();
        assert!(
            err.starts_with("plan.toml:8: unknown field `when`"),
            "{err}"
        );
        let err = check("name = \"t\"\n[[phase]]\nname = \"a\"\naction = \"verify\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"soon\"\n").unwrap_err();
        assert!(
            err.contains("plan.toml:7: phase a: timeout \"soon\" is not a duration"),
            "{err}"
        );
        let err = check("name = \"t\"\n[[phase]]\nname = \"r\"\naction = \"report\"\nroles = [\"web\"]\ntimeout = \"1m\"\n").unwrap_err();
        assert!(
            err.contains("runs on the coordinator and targets no roles"),
            "{err}"
        );
        let err = check("name = \"t\"\n[[phase]]\nname = \"d\"\naction = \"restore-postgres\"\nroles = [\"web\"]\ngate = \"all\"\ntimeout = \"1m\"\n").unwrap_err();
        assert!(
            err.contains("action restore-postgres cannot run on role \"web\""),
            "{err}"
        );
        let err = check("name = \"t\"\n").unwrap_err();
        assert!(err.contains("the plan has no phases"), "{err}");
        let err = Plan::load(Path::new("/nonexistent/plan.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/plan.toml: cannot read plan"),
            "{err}"
        );
    }
}
