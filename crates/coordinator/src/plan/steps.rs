//! The order a plan's phases run in: steps of phases that may run together, the dependency
//! graph's walks that validation's ordering rules rely on, and the resolved plan for people
//! (`rollcall plan show`).

use std::collections::BTreeSet;

use super::{Fleet, Phase, Plan};

impl Plan {
    /// Phases grouped into steps that may run together: every phase's dependencies are in
    /// earlier steps.
    pub fn steps(&self) -> Vec<Vec<usize>> {
        let mut depth = vec![0usize; self.phases.len()];
        // Validation guarantees dependencies point at earlier indices after ordering; compute
        // depths in topological order.
        for i in topological_order(&self.phases) {
            depth[i] = self.phases[i]
                .after
                .iter()
                .map(|&d| depth[d] + 1)
                .max()
                .unwrap_or(0);
        }
        let mut steps: Vec<Vec<usize>> = Vec::new();
        for (i, &d) in depth.iter().enumerate() {
            if steps.len() <= d {
                steps.resize(d + 1, Vec::new());
            }
            steps[d].push(i);
        }
        steps
    }

    /// Human-readable resolved plan (`rollcall plan show`).
    pub fn render(&self, fleet: Option<&Fleet>) -> String {
        let mut out = format!("plan {}: {}\n", self.name, self.description);
        for (n, step) in self.steps().iter().enumerate() {
            let together = if step.len() > 1 {
                " (concurrently)"
            } else {
                ""
            };
            out.push_str(&format!("step {}{together}\n", n + 1));
            for &i in step {
                let p = &self.phases[i];
                let roles = if p.roles.is_empty() {
                    "coordinator".to_owned()
                } else {
                    p.roles
                        .iter()
                        .map(|r| match fleet.and_then(|f| f.get(r)) {
                            Some(n) => format!("{r}×{n}"),
                            None => r.clone(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut extra = String::new();
                if let Some(r) = p.replicas {
                    extra.push_str(&format!(", replicas {r}"));
                }
                if p.retries > 0 {
                    extra.push_str(&format!(", retries {}", p.retries));
                }
                if !p.required {
                    extra.push_str(", optional");
                }
                let after: Vec<&str> = p
                    .after
                    .iter()
                    .map(|&d| self.phases[d].name.as_str())
                    .collect();
                let after = if after.is_empty() {
                    String::new()
                } else {
                    format!(", after {}", after.join(" + "))
                };
                out.push_str(&format!(
                    "  {:>2}. {:<18} {:<17} on {roles}; gate {}; timeout {}{extra}{after}\n",
                    i,
                    p.name,
                    p.action,
                    p.gate,
                    humantime::format_duration(p.timeout),
                ));
            }
        }
        for s in &self.skipped {
            out.push_str(&format!(
                "skipped: {} (the environment declares no {} agents)\n",
                s.phase,
                s.roles.join(" or ")
            ));
        }
        out
    }
}

/// All transitive dependencies of each phase.
pub(super) fn ancestors(phases: &[Phase]) -> Vec<BTreeSet<usize>> {
    let mut out: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); phases.len()];
    for i in topological_order(phases) {
        let mut set = BTreeSet::new();
        for &d in &phases[i].after {
            set.insert(d);
            set.extend(out[d].iter().copied());
        }
        out[i] = set;
    }
    out
}

/// Kahn's order; phases on a cycle are left out (validation reports the cycle first).
fn topological_order(phases: &[Phase]) -> Vec<usize> {
    let mut remaining: Vec<usize> = phases.iter().map(|p| p.after.len()).collect();
    let mut ready: Vec<usize> = (0..phases.len()).filter(|&i| remaining[i] == 0).collect();
    ready.reverse();
    let mut order = Vec::with_capacity(phases.len());
    while let Some(i) = ready.pop() {
        order.push(i);
        for p in phases {
            if p.after.contains(&i) {
                remaining[p.index] -= 1;
                if remaining[p.index] == 0 {
                    ready.insert(0, p.index);
                }
            }
        }
    }
    order
}

pub(super) fn find_cycle(phases: &[Phase]) -> Option<Vec<usize>> {
    // 0 = unvisited, 1 = on the stack, 2 = done.
    fn visit(
        i: usize,
        phases: &[Phase],
        state: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        state[i] = 1;
        stack.push(i);
        for &d in &phases[i].after {
            if state[d] == 1 {
                let start = stack.iter().position(|&s| s == d).unwrap_or(0);
                // Each phase waits for the next one in this list.
                let mut cycle = stack[start..].to_vec();
                cycle.push(d);
                return Some(cycle);
            }
            if state[d] == 0
                && let Some(c) = visit(d, phases, state, stack)
            {
                return Some(c);
            }
        }
        stack.pop();
        state[i] = 2;
        None
    }
    let mut state = vec![0u8; phases.len()];
    for i in 0..phases.len() {
        if state[i] == 0
            && let Some(c) = visit(i, phases, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::plan::tests::fleet;
    use crate::plan::{Plan, Replicas};

    #[test]
    fn the_default_plan_is_valid_and_runs_the_restores_together() {
        let plan = Plan::default_plan(Some(&fleet())).unwrap();
        assert_eq!(plan.phases.len(), 15);
        let names = |step: &[usize]| {
            step.iter()
                .map(|&i| plan.phases[i].name.clone())
                .collect::<Vec<_>>()
        };
        let steps = plan.steps();
        assert_eq!(names(&steps[0]), ["preflight"]);
        assert_eq!(names(&steps[1]), ["prepare-postgres"], "before any freeze");
        assert_eq!(names(&steps[2]), ["freeze-writes"]);
        assert_eq!(names(&steps[4]), ["commit-postgres", "restore-objects"]);
        assert_eq!(names(steps.last().unwrap()), ["unfreeze"]);
        let replicas = plan.phase("restore-replicas").unwrap();
        assert_eq!(replicas.roles.len(), 6, "all expands to the declared roles");
        assert_eq!(replicas.replicas, Some(Replicas::Prior));
        assert!(plan.render(Some(&fleet())).contains("worker×2"));
        // Without a fleet it validates against the standard roles.
        Plan::default_plan(None).unwrap();
    }
}
