//! The restore drill report: every field of the runbook's "Restore Drill Report Requirements",
//! filled from the run journal (runs, phases, commands with their results, events), never
//! typed by hand. [`build`] reads the journal; [`DrillReport::to_markdown`] renders it as the
//! runbook's `docs/runbooks/restore-drill-report.md`, [`DrillReport::to_json`] for scripts.
//!
//! Every string that came from command output, an operator or the config passes through
//! `api::redact::redact` while the report is built, so both renderings are safe to publish.
//! Secret references are names, not secrets: they pass `api::redact::redact_reference`
//! instead (printed as recorded, a local path in one withheld).
//!
//! Beside the runbook's fields the report tells the run's incidents (phases that blocked,
//! operators' retries and resumes, commands re-sent, coordinators that took the run over,
//! agents lost and back) and, when the plan has worker phases, the runbook's managed-worker
//! drill (worker recovery, checkpoint restore, workflow consistency, BYOK references).
//! Data the journal does not hold is shown as "not recorded", never left out: a gap in a drill
//! report must be visible.
//!
//! The report's fields are in `types.rs`; `journal.rs` builds them from one run's journal, read
//! once; `markdown.rs` renders them.

mod journal;
mod markdown;
#[cfg(test)]
mod tests;
mod types;

pub use journal::build;
pub use types::*;
