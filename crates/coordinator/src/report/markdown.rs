//! The drill report rendered as the runbook's `docs/runbooks/restore-drill-report.md`: one
//! section per requirement, a value the journal does not hold shown as "not recorded".

use std::time::Duration;

use api::human;
use chrono::{DateTime, Utc};

use super::types::{DrillReport, NOT_RECORDED, Rpo, Rto};

impl DrillReport {
    /// The report as the runbook's `docs/runbooks/restore-drill-report.md`.
    pub fn to_markdown(&self) -> String {
        let mut md = Markdown::default();
        let run = &self.run;
        md.line(&format!(
            "# Restore drill report: {} — {}",
            self.environment.name,
            self.run
                .started_at
                .unwrap_or(self.run.created_at)
                .format("%Y-%m-%d")
        ));
        md.blank();
        md.line(&format!(
            "Filled from the journal of run `{}` by rollcall {} at {}. Secrets, signed URLs \
             and local paths are redacted; a value the journal does not hold reads \
             \"{NOT_RECORDED}\".",
            run.id,
            api::VERSION,
            time(Some(self.generated_at))
        ));

        md.section("Summary");
        let checks_passed = self
            .checks
            .iter()
            .filter(|c| c.passed == Some(true))
            .count();
        let checks_failed = self
            .checks
            .iter()
            .filter(|c| c.required && c.passed == Some(false))
            .count();
        let checks_warned = self
            .checks
            .iter()
            .filter(|c| !c.required && c.passed == Some(false))
            .count();
        let checks_unknown = self.checks.iter().filter(|c| c.passed.is_none()).count();
        md.table(
            &["Field", "Value"],
            vec![
                vec!["Outcome".into(), format!("**{}**", self.outcome)],
                vec!["Environment".into(), self.environment.name.clone()],
                vec![
                    "Restore target".into(),
                    match (&self.target.to_time, &self.target.point_id) {
                        (Some(t), _) => format!("time {}: {}", time(Some(t.to_time)), t.note),
                        (None, Some(id)) => {
                            format!("point `{id}`, taken {}", time(self.target.point_created_at))
                        }
                        (None, None) => NOT_RECORDED.into(),
                    },
                ],
                vec![
                    "Run".into(),
                    format!(
                        "`{}` ({}, plan {}, epoch {})",
                        run.id,
                        run.kind,
                        opt(&run.plan),
                        run.epoch
                    ),
                ],
                vec![
                    "Run state".into(),
                    match &run.reason {
                        Some(reason) => format!("{}: {reason}", run.state),
                        None => run.state.clone(),
                    },
                ],
                vec![
                    "Started by".into(),
                    run.started_by
                        .clone()
                        .unwrap_or_else(|| NOT_RECORDED.to_owned()),
                ],
                vec!["Run started".into(), time(run.started_at)],
                vec![
                    "Run finished".into(),
                    match (run.finished_at, run.state.as_str()) {
                        (Some(at), _) => time(Some(at)),
                        (None, "running" | "pending") => {
                            "still running when this report was written".into()
                        }
                        (None, "blocked") => {
                            "not finished: blocked, waiting for an operator".into()
                        }
                        (None, _) => NOT_RECORDED.into(),
                    },
                ],
                vec![
                    "Postgres restored (swapped in)".into(),
                    time(self.postgres.restored_at),
                ],
                vec!["Object snapshot".into(), opt(&self.objects.snapshot_id)],
                vec!["Measured RTO".into(), self.rto.summary()],
                vec![
                    "Freeze window (writes off)".into(),
                    self.rto.freeze_window_ms.map_or_else(
                        || "traffic not resumed by this run (yet)".to_owned(),
                        human_ms,
                    ),
                ],
                vec![
                    "Whole run".into(),
                    self.rto.run_ms.map_or(NOT_RECORDED.to_owned(), human_ms),
                ],
                vec!["RPO achieved".into(), self.rpo.summary()],
                vec![
                    "Checks".into(),
                    format!(
                        "{checks_passed} passed, {checks_failed} failed, {checks_warned} \
                         warnings (optional checks that failed), {checks_unknown} not recorded"
                    ),
                ],
                vec!["Incidents".into(), self.incidents_summary()],
                vec!["Follow-ups".into(), self.follow_ups.len().to_string()],
            ],
        );

        md.section("Environment");
        let fleet = if self.environment.fleet.is_empty() {
            NOT_RECORDED.to_owned()
        } else {
            self.environment
                .fleet
                .iter()
                .map(|(role, n)| format!("{role} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        md.table(
            &["Field", "Value"],
            vec![
                vec!["Name".into(), self.environment.name.clone()],
                vec![
                    "Backup repository".into(),
                    self.environment.repository.clone(),
                ],
                vec!["Declared fleet".into(), fleet],
                vec!["RPO objective".into(), objective(self.rpo.objective_ms)],
                vec!["RTO objective".into(), objective(self.rto.objective_ms)],
            ],
        );

        if let Some(t) = &self.target.to_time {
            md.section("Restored to a time");
            md.line(&format!("{}.", t.note));
            md.blank();
            md.table(
                &["Field", "Value"],
                vec![
                    vec!["Time restored to".into(), time(Some(t.to_time))],
                    // A managed provider's restore names its instance and the database.
                    vec![
                        "Base backup or provider instance".into(),
                        code(&t.base_backup),
                    ],
                    vec!["Data directory or database".into(), code(&t.data_dir)],
                    vec!["Previous one kept as".into(), code(&t.kept_dir)],
                    vec!["Recovery stopped".into(), opt(&t.stopped)],
                    vec![
                        "Last transaction restored".into(),
                        opt(&t.last_transaction_at),
                    ],
                    vec![
                        "New timeline".into(),
                        t.timeline
                            .map_or_else(|| NOT_RECORDED.to_owned(), |n| n.to_string()),
                    ],
                    vec!["Objects rule".into(), opt(&t.objects_rule)],
                    vec![
                        "Objects uncertainty window".into(),
                        t.objects_uncertainty
                            .clone()
                            .unwrap_or_else(|| "none (or no objects restored)".to_owned()),
                    ],
                    vec![
                        "Objects ambiguous at the time".into(),
                        if t.objects_ambiguous.is_empty() {
                            "none".to_owned()
                        } else {
                            t.objects_ambiguous.join(", ")
                        },
                    ],
                ],
            );
        }

        md.section("Postgres");
        let pg = &self.postgres;
        md.table(
            &["Field", "Value"],
            vec![
                vec![
                    "Backup source".into(),
                    format!(
                        "{} in {}",
                        code(&pg.backup_key),
                        self.environment.repository
                    ),
                ],
                vec!["Backup sha256".into(), code(&pg.backup_sha256)],
                vec!["Backup size".into(), bytes(pg.backup_bytes)],
                vec![
                    "Backup taken".into(),
                    format!(
                        "{} → {}",
                        time(pg.backup_started_at),
                        time(pg.backup_finished_at)
                    ),
                ],
                vec![
                    "Versions".into(),
                    format!(
                        "server {}, pg_dump {}",
                        opt(&pg.server_version),
                        opt(&pg.pg_dump_version)
                    ),
                ],
                vec!["Database restored".into(), code(&pg.database)],
                vec!["Restore agent".into(), opt(&pg.restore_agent)],
                vec!["Restore started".into(), time(pg.restore_started_at)],
                vec![
                    "Restore timestamp (swapped in)".into(),
                    time(pg.restored_at),
                ],
                vec!["Archive read".into(), bytes(pg.archive_bytes)],
                vec![
                    "Restore took".into(),
                    pg.elapsed_ms
                        .map_or(NOT_RECORDED.into(), |ms| human_ms(ms as i64)),
                ],
                vec![
                    "Pre-restore database (kept)".into(),
                    code(&pg.pre_restore_database),
                ],
                vec![
                    "Restore completed after an interruption".into(),
                    pg.resumed.clone().unwrap_or_else(|| "no".into()),
                ],
            ],
        );

        md.section("Object storage");
        let o = &self.objects;
        let n = |v: Option<u64>| v.map_or(NOT_RECORDED.to_owned(), |n| n.to_string());
        md.table(
            &["Field", "Value"],
            vec![
                vec!["Snapshot".into(), code(&o.snapshot_id)],
                vec![
                    "Snapshot size".into(),
                    format!(
                        "{} objects, {}",
                        n(o.snapshot_objects),
                        bytes(o.snapshot_bytes)
                    ),
                ],
                vec!["Restore agent".into(), opt(&o.restore_agent)],
                vec!["Restored at".into(), time(o.restored_at)],
                vec![
                    "Objects written".into(),
                    format!("{} objects, {}", n(o.restored), bytes(o.restored_bytes)),
                ],
                vec!["Objects already matching".into(), n(o.unchanged)],
                vec!["Objects replaced (quarantined)".into(), n(o.replaced)],
                vec!["Objects removed (quarantined)".into(), n(o.removed)],
                vec!["Quarantine prefix".into(), code(&o.quarantine_prefix)],
            ],
        );

        md.section("Secret manager and KMS references");
        md.line("Names, managers, references, versions and KMS keys only; never values.");
        md.blank();
        if self.secret_refs.is_empty() {
            md.line(&format!("No secret references: {NOT_RECORDED}."));
        } else {
            md.table(
                &[
                    "Secret",
                    "Manager",
                    "Reference",
                    "Version",
                    "KMS key",
                    "Rotated",
                    "Source",
                ],
                self.secret_refs
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.manager.clone(),
                            format!("`{}`", s.reference),
                            opt(&s.version),
                            code(&s.kms_key),
                            time(s.rotated_at),
                            s.source.clone(),
                        ]
                    })
                    .collect(),
            );
        }

        md.section("Counts before and after the restore");
        md.line(
            "Before: the live system at preflight. At point: taken in the dump's snapshot. \
             After: the restored system at verify.",
        );
        md.blank();
        if !self.counts.iter().any(|c| c.configured) {
            md.line(&format!(
                "No report rows are configured for environment {env} \
                 (`[environments.{env}.report] rows`): every recorded count is listed by its key.",
                env = self.environment.name
            ));
            md.blank();
        }
        let count = |v: Option<i64>| v.map_or(NOT_RECORDED.to_owned(), |n| n.to_string());
        if self.counts.is_empty() {
            md.line(&format!("No counts: {NOT_RECORDED}."));
        } else {
            md.table(
                &[
                    "Data",
                    "Key",
                    "Before",
                    "At point",
                    "After",
                    "After = point",
                ],
                self.counts
                    .iter()
                    .map(|c| {
                        vec![
                            c.label.clone(),
                            format!("`{}`", c.key),
                            count(c.before),
                            count(c.at_point),
                            count(c.after),
                            match c.matches_point {
                                Some(true) => "yes".into(),
                                Some(false) => "**no**".into(),
                                None => NOT_RECORDED.into(),
                            },
                        ]
                    })
                    .collect(),
            );
        }

        md.section("Checks and smoke commands");
        if self.checks.is_empty() {
            md.line(&format!("No checks: {NOT_RECORDED}."));
        } else {
            md.table(
                &[
                    "Phase", "Agent", "Check", "Kind", "Required", "Result", "Detail",
                ],
                self.checks
                    .iter()
                    .map(|c| {
                        vec![
                            c.phase.clone(),
                            c.agent.clone(),
                            c.name.clone(),
                            c.kind.clone(),
                            if c.required { "yes" } else { "no" }.into(),
                            match (c.passed, c.required) {
                                (Some(true), _) => "passed".into(),
                                (Some(false), true) => "**failed**".into(),
                                (Some(false), false) => "warning".into(),
                                (None, _) => NOT_RECORDED.into(),
                            },
                            c.detail.clone(),
                        ]
                    })
                    .collect(),
            );
        }

        if self.approvals_required > 0 || !self.approvals.is_empty() {
            md.section("Approvals");
            md.line(&format!(
                "The environment is protected: the run waited for {} approval(s) from operators \
                 other than the one who started it.",
                self.approvals_required
            ));
            if self.approvals.is_empty() {
                md.line("No operator approved or rejected the run.");
            } else {
                md.table(
                    &["At", "Operator", "Role", "Decision", "Reason"],
                    self.approvals
                        .iter()
                        .map(|a| {
                            vec![
                                time(Some(a.at)),
                                a.by.clone(),
                                a.role.clone(),
                                a.decision.clone(),
                                a.reason.clone().unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
        }

        md.section("Incidents");
        if self.incidents.is_empty() {
            md.line(
                "Incidents: none. No phase blocked, no command was re-sent, no coordinator took \
                 the run over and no agent of the environment was lost while it ran.",
            );
        } else {
            md.table(
                &["Time", "Incident", "Phase", "Agent", "Detail"],
                self.incidents
                    .iter()
                    .map(|i| {
                        vec![
                            time(i.at),
                            i.kind.clone(),
                            i.phase.clone().unwrap_or_default(),
                            i.agent.clone().unwrap_or_default(),
                            i.detail.clone(),
                        ]
                    })
                    .collect(),
            );
        }

        if let Some(rows) = &self.workers {
            md.section("Managed-worker drill");
            md.line(
                "The runbook's worker-restore template: each line from what the journal holds, \
                 never assumed.",
            );
            md.blank();
            md.table(
                &["Item", "Result", "Evidence"],
                rows.iter()
                    .map(|w| {
                        vec![
                            w.item.clone(),
                            if w.result == "failed" {
                                "**failed**".to_owned()
                            } else {
                                w.result.clone()
                            },
                            w.evidence.clone(),
                        ]
                    })
                    .collect(),
            );
        }

        md.section("Data intentionally excluded");
        if !self.exclusions_declared {
            md.line(&format!(
                "None declared (`rollcall drill --exclude TEXT`, or `[environments.{}.report] \
                 excluded` in the coordinator config).",
                self.environment.name
            ));
            if !self.excluded.is_empty() {
                md.blank();
            }
        }
        for item in &self.excluded {
            md.line(&format!("- {}", inline(item)));
        }

        md.section("Pre-restore data kept");
        md.table(
            &["What", "Where"],
            vec![
                vec![
                    "The database as it was before the restore".into(),
                    code(&self.pre_restore_database),
                ],
                vec![
                    "Objects the restore replaced or removed".into(),
                    code(&self.quarantine_prefix),
                ],
            ],
        );

        if let Some(test) = &self.restore_test {
            md.section("Restore test");
            let n = |v: Option<u64>| v.map_or_else(|| NOT_RECORDED.to_owned(), |n| n.to_string());
            let untouched = match (&test.source_agents_known, test.source_untouched) {
                (Some(known), _) if known.is_empty() => format!(
                    "unknown: the coordinator knew none of {}'s agents when the report was built \
                     (the run commanded {})",
                    test.source,
                    test.agents_commanded.join(", ")
                ),
                (Some(known), true) => format!(
                    "yes: none of its {} agent(s) got a command (the run commanded {})",
                    known.len(),
                    test.agents_commanded.join(", ")
                ),
                (None, true) => format!(
                    "no command to any agent outside {} (the run commanded {})",
                    test.target,
                    test.agents_commanded.join(", ")
                ),
                (_, false) => format!(
                    "NO: commands went to {}",
                    test.source_agents_commanded.join(", ")
                ),
            };
            md.table(
                &["What", "Result"],
                vec![
                    vec![
                        "Point of environment".into(),
                        code(&Some(test.source.clone())),
                    ],
                    vec![
                        "Restored into environment".into(),
                        code(&Some(test.target.clone())),
                    ],
                    vec![format!("{} untouched", test.source), untouched],
                    vec![
                        "Restore time".into(),
                        test.restore_ms.map_or_else(
                            || NOT_RECORDED.to_owned(),
                            |ms| format!("{:.1} s", ms as f64 / 1000.0),
                        ),
                    ],
                    vec![
                        format!("Teardown ({})", test.teardown_setting),
                        test.teardown.clone(),
                    ],
                    vec![
                        "Databases dropped".into(),
                        if test.databases_dropped.is_empty() {
                            "none".into()
                        } else {
                            test.databases_dropped.join(", ")
                        },
                    ],
                    vec![
                        "Objects deleted / put back / quarantine keys deleted".into(),
                        format!(
                            "{} / {} / {}",
                            n(test.objects_deleted),
                            n(test.objects_put_back),
                            n(test.quarantine_keys_deleted)
                        ),
                    ],
                ],
            );
        }

        if let Some(undo) = &self.undo {
            md.section("Undo");
            let n = |v: Option<u64>| v.map_or_else(|| NOT_RECORDED.to_owned(), |n| n.to_string());
            md.table(
                &["What", "Result"],
                vec![
                    vec!["Run taken back".into(), code(&undo.undoes)],
                    vec![
                        "Database".into(),
                        format!("{}: {}", code(&undo.database), opt(&undo.database_detail)),
                    ],
                    vec![
                        "The restored database, kept as".into(),
                        code(&undo.restored_database_kept_as),
                    ],
                    vec![
                        "Objects put back / created by the restore, moved out / already as before"
                            .into(),
                        format!(
                            "{} / {} / {}",
                            n(undo.objects_put_back),
                            n(undo.objects_removed),
                            n(undo.objects_unchanged)
                        ),
                    ],
                    vec![
                        "What the undo displaced, kept in".into(),
                        format!(
                            "{} ({} objects)",
                            code(&undo.quarantine_prefix),
                            n(undo
                                .objects_displaced
                                .map(|d| d + undo.objects_removed.unwrap_or(0)))
                        ),
                    ],
                ],
            );
        }

        md.section("Phases");
        md.table(
            &[
                "#", "Phase", "Action", "State", "Attempt", "Started", "Finished", "Duration",
                "Detail",
            ],
            self.phases
                .iter()
                .map(|p| {
                    vec![
                        p.index.to_string(),
                        p.name.clone(),
                        opt(&p.action),
                        p.state.clone(),
                        p.attempt.map_or(NOT_RECORDED.to_owned(), |a| a.to_string()),
                        time(p.started_at),
                        time(p.finished_at),
                        p.duration_ms.map_or(NOT_RECORDED.to_owned(), human_ms),
                        opt(&p.detail),
                    ]
                })
                .collect(),
        );

        md.section("Recovery objectives");
        md.table(
            &["Objective", "Target", "Measured", "From", "To", "Met"],
            vec![
                vec![
                    "RTO".into(),
                    objective(self.rto.objective_ms),
                    self.rto
                        .measured_ms
                        .map_or(NOT_RECORDED.to_owned(), human_ms),
                    format!("{} ({})", self.rto.measured_from, time(self.rto.from_at)),
                    match &self.rto.until_phase {
                        Some(phase) => {
                            format!("end of phase {phase} ({})", time(self.rto.until_at))
                        }
                        None => NOT_RECORDED.into(),
                    },
                    met(self.rto.met),
                ],
                vec![
                    "RPO (point age)".into(),
                    objective(self.rpo.objective_ms),
                    self.rpo
                        .point_age_ms
                        .map_or(NOT_RECORDED.to_owned(), point_age),
                    format!("point taken ({})", time(self.rpo.point_created_at)),
                    format!(
                        "{} ({})",
                        self.rpo.measured_at_label,
                        time(self.rpo.measured_at)
                    ),
                    met(self.rpo.met),
                ],
            ],
        );

        md.section("Follow-ups");
        if self.follow_ups.is_empty() {
            md.line("None.");
        } else {
            md.table(
                &["Follow-up", "Owner", "Source"],
                self.follow_ups
                    .iter()
                    .map(|f| {
                        vec![
                            f.text.clone(),
                            f.owner.clone().unwrap_or_else(|| "unassigned".into()),
                            f.source.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        md.0
    }
}

impl DrillReport {
    /// `none`, or how many of each kind (`1 phase blocked, 1 operator retry`).
    fn incidents_summary(&self) -> String {
        if self.incidents.is_empty() {
            return "none".to_owned();
        }
        let mut kinds: Vec<(&str, usize)> = Vec::new();
        for i in &self.incidents {
            match kinds.iter_mut().find(|(k, _)| *k == i.kind) {
                Some((_, n)) => *n += 1,
                None => kinds.push((&i.kind, 1)),
            }
        }
        let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!("{} (see Incidents)", list.join(", "))
    }
}

impl Rto {
    fn summary(&self) -> String {
        match self.measured_ms {
            Some(ms) => {
                let mut text = format!(
                    "{} from {} — objective {} — {}",
                    human_ms(ms),
                    self.measured_from,
                    objective(self.objective_ms),
                    met(self.met)
                );
                if let Some(note) = &self.note {
                    text.push_str(&format!(" ({note})"));
                }
                text
            }
            None => format!(
                "{NOT_RECORDED} — objective {}",
                objective(self.objective_ms)
            ),
        }
    }
}

impl Rpo {
    fn summary(&self) -> String {
        match self.point_age_ms {
            Some(ms) if super::journal::stamped_in_future(ms) => format!(
                "point stamped {} in the future at {} (a clock ran fast when it was taken): \
                 its age is unknown — objective {} — {}",
                human_ms(-ms),
                self.measured_at_label,
                objective(self.objective_ms),
                met(self.met)
            ),
            Some(ms) => format!(
                "point {} old at {} — objective {} — {}",
                human_ms(ms),
                self.measured_at_label,
                objective(self.objective_ms),
                met(self.met)
            ),
            None => format!(
                "{NOT_RECORDED} — objective {}",
                objective(self.objective_ms)
            ),
        }
    }
}

/// A Markdown document under construction.
#[derive(Default)]
struct Markdown(String);

impl Markdown {
    fn line(&mut self, text: &str) {
        self.0.push_str(text);
        self.0.push('\n');
    }

    fn blank(&mut self) {
        self.0.push('\n');
    }

    fn section(&mut self, title: &str) {
        self.blank();
        self.line(&format!("## {title}"));
        self.blank();
    }

    fn table(&mut self, headers: &[&str], rows: Vec<Vec<String>>) {
        self.line(&format!("| {} |", headers.join(" | ")));
        self.line(&format!(
            "|{}",
            headers.iter().map(|_| " --- |").collect::<String>()
        ));
        for row in rows {
            let cells: Vec<String> = row.iter().map(|c| inline(c)).collect();
            self.line(&format!("| {} |", cells.join(" | ")));
        }
    }
}

/// Text fit for one table cell or list item: no line breaks, no column separators.
fn inline(text: &str) -> String {
    text.replace('|', "\\|")
        .replace("\r\n", " ")
        .replace(['\n', '\r'], " ")
}

fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| NOT_RECORDED.to_owned())
}

fn code(value: &Option<String>) -> String {
    match value {
        Some(v) => format!("`{}`", v.replace('`', "'")),
        None => NOT_RECORDED.to_owned(),
    }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or(NOT_RECORDED.to_owned(), |t| {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    })
}

/// A size with its exact count beside it (`12.0 MiB (12582912 bytes)`), `512 B` below 1 KiB.
fn bytes(n: Option<u64>) -> String {
    match n {
        None => NOT_RECORDED.to_owned(),
        Some(n) if n < 1024 => human::bytes(n),
        Some(n) => format!("{} ({n} bytes)", human::bytes(n)),
    }
}

/// A point's age, or the marker of a point stamped in the future.
fn point_age(ms: i64) -> String {
    if super::journal::stamped_in_future(ms) {
        format!(
            "stamped {} in the future (a clock ran fast when it was taken)",
            human_ms(-ms)
        )
    } else {
        human_ms(ms)
    }
}

fn human_ms(ms: i64) -> String {
    if ms < 0 {
        return format!("-{}", human_ms(-ms));
    }
    if ms < 1000 {
        return format!("{ms} ms");
    }
    if ms < 60_000 {
        return format!("{:.1} s", ms as f64 / 1000.0);
    }
    humantime::format_duration(Duration::from_secs(ms as u64 / 1000)).to_string()
}

fn objective(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

fn met(met: Option<bool>) -> String {
    match met {
        Some(true) => "met".into(),
        Some(false) => "**not met**".into(),
        None => NOT_RECORDED.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_show_the_exact_count_beside_the_unit() {
        assert_eq!(bytes(Some(12_582_912)), "12.0 MiB (12582912 bytes)");
        assert_eq!(bytes(Some(1024)), "1.0 KiB (1024 bytes)");
        assert_eq!(bytes(Some(512)), "512 B");
        assert_eq!(bytes(Some(0)), "0 B");
        assert_eq!(bytes(None), NOT_RECORDED);
    }
}
